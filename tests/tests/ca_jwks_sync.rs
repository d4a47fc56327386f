//! `keyproof-ca k8s-jwks`: the real binary against a real HTTPS server.
//!
//! The server here is the STAND-IN for the Kubernetes API server
//! (`keyproof_tests::kube_api`: a certificate for DNS `localhost` from a test
//! cluster CA written to a file, as the kubelet writes `ca.crt`, and a
//! Kubernetes-style 401 Status to callers without the expected bearer
//! token), answering its discovery endpoint `GET /openid/v1/jwks` with the
//! JWKS of a test token issuer (`keyproof_tests::k8s::ClusterIssuer`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use jsonwebtoken::Algorithm;
use keyproof_tests::cmd;
use keyproof_tests::k8s::{ClusterIssuer, ISSUER};
use keyproof_tests::kube_api::{self, run_once, wait_for, ApiServer, ClusterCa, Daemon, TOKEN};

/// What the stand-in answers at `/openid/v1/jwks`, changeable while it runs.
struct Answer {
    status: StatusCode,
    body: String,
}

/// The stand-in for the API server's `/openid/v1/jwks`.
struct StandInApiServer {
    api: ApiServer,
    answer: Arc<Mutex<Answer>>,
}

impl StandInApiServer {
    fn start(ca: &ClusterCa, body: String, token: &str) -> StandInApiServer {
        let answer = Arc::new(Mutex::new(Answer {
            status: StatusCode::OK,
            body,
        }));
        let a = answer.clone();
        let api = ApiServer::start(ca, token, move |req| {
            if req.path != "/openid/v1/jwks" {
                return kube_api::status(StatusCode::NOT_FOUND, "NotFound");
            }
            let a = a.lock().unwrap();
            let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                a.body.clone(),
            )));
            *r.status_mut() = a.status;
            r
        });
        StandInApiServer { api, answer }
    }

    fn url(&self) -> String {
        self.api.url()
    }

    fn serve(&self, status: StatusCode, body: String) {
        let mut a = self.answer.lock().unwrap();
        a.status = status;
        a.body = body;
    }

    fn hits(&self) -> usize {
        self.api.hits()
    }
}

/// A throwaway directory with the token file, the CA file and room for the
/// output, as the sidecar's volumes would hold them.
struct Fixture {
    dir: tempfile::TempDir,
    ca: ClusterCa,
    ca_file: PathBuf,
    token_file: PathBuf,
    out: PathBuf,
    issuer: ClusterIssuer,
    server: StandInApiServer,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::new("stand-in cluster CA");
        let ca_file = ca.write(&dir.path().join("ca.crt"));
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let out_dir = dir.path().join("jwks");
        std::fs::create_dir(&out_dir).unwrap();
        let issuer = ClusterIssuer::new(ISSUER, Algorithm::RS256);
        let server = StandInApiServer::start(&ca, issuer.jwks_json(), TOKEN);
        Fixture {
            out: out_dir.join("jwks.json"),
            dir,
            ca,
            ca_file,
            token_file,
            issuer,
            server,
        }
    }

    fn command(&self, ca_file: &Path, api_server: &str) -> std::process::Command {
        let mut c = cmd("keyproof-ca");
        c.arg("k8s-jwks")
            .arg("--out")
            .arg(&self.out)
            .args(["--api-server", api_server])
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--ca-file")
            .arg(ca_file);
        c
    }

    /// `--once`; returns (exit code, stdout, stderr).
    fn once_with(&self, ca_file: &Path, api_server: &str) -> (i32, String, String) {
        run_once(self.command(ca_file, api_server).arg("--once"))
    }

    fn once(&self) -> (i32, String, String) {
        self.once_with(&self.ca_file, &self.server.url())
    }

    fn out_content(&self) -> Option<String> {
        std::fs::read_to_string(&self.out).ok()
    }

    /// Files in the output directory: the JWKS and nothing half-written.
    fn out_dir_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The sync as it runs in the pod, every second.
    fn daemon(&self) -> Daemon {
        let log = self
            .dir
            .path()
            .join(format!("sync-{}.log", self.server.hits()));
        Daemon::spawn(
            self.command(&self.ca_file, &self.server.url())
                .args(["--interval", "1s"]),
            log,
        )
    }
}

#[test]
fn once_writes_the_jwks_with_the_bearer_token() {
    let fx = Fixture::new();
    let (code, stdout, stderr) = fx.once();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("wrote the cluster JWKS (1 keys)"),
        "{stdout}"
    );
    assert_eq!(fx.out_content().as_deref(), Some(&*fx.issuer.jwks_json()));
    let mode = std::fs::metadata(&fx.out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "the CA reads it as another user may");
    assert_eq!(fx.out_dir_entries(), ["jwks.json"]);
    let mtime = std::fs::metadata(&fx.out).unwrap().modified().unwrap();

    // The same JWKS again: a fetch, no write (serve would reload for nothing).
    std::thread::sleep(Duration::from_millis(20));
    let (code, stdout, stderr) = fx.once();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("is up to date (1 keys)"), "{stdout}");
    assert_eq!(
        std::fs::metadata(&fx.out).unwrap().modified().unwrap(),
        mtime
    );
    assert_eq!(fx.server.hits(), 2);

    // A token the API server does not accept: a clear error, file kept.
    std::fs::write(&fx.token_file, "some-other-token").unwrap();
    let (code, _, stderr) = fx.once();
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("answered 401") && stderr.contains("--token-file"),
        "{stderr}"
    );
    assert_eq!(fx.out_content().as_deref(), Some(&*fx.issuer.jwks_json()));

    // A missing token file names the flag.
    std::fs::remove_file(&fx.token_file).unwrap();
    let (code, _, stderr) = fx.once();
    assert_eq!(code, 2);
    assert!(stderr.contains("--token-file"), "{stderr}");
}

#[test]
fn a_wrong_ca_file_fails_clearly_and_writes_nothing() {
    let fx = Fixture::new();
    let other = ClusterCa::new("another cluster's CA").write(&fx.dir.path().join("other.crt"));
    let (code, stdout, stderr) = fx.once_with(&other, &fx.server.url());
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("TLS with the API server at localhost:")
            && stderr.contains("invalid peer certificate")
            && stderr.contains("UnknownIssuer")
            && stderr.contains("--ca-file"),
        "{stderr}"
    );
    assert_eq!(fx.out_content(), None);
    assert!(
        fx.out_dir_entries().is_empty(),
        "{:?}",
        fx.out_dir_entries()
    );

    // The right CA but another name than the certificate's: webpki refuses.
    let (code, _, stderr) = fx.once_with(
        &fx.ca_file,
        &format!("https://127.0.0.1:{}", fx.server.api.port()),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("invalid peer certificate") && stderr.contains("127.0.0.1"),
        "{stderr}"
    );
    assert_eq!(fx.out_content(), None);

    // A CA file that holds no certificate.
    let junk = fx.dir.path().join("junk.crt");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let (code, _, stderr) = fx.once_with(&junk, &fx.server.url());
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--ca-file") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
    assert!(fx.out_dir_entries().is_empty());
    let _ = &fx.ca;
}

#[test]
fn the_running_sync_follows_a_changed_jwks_and_token() {
    let mut fx = Fixture::new();
    let d = fx.daemon();
    let v1 = fx.issuer.jwks_json();
    assert!(
        wait_for(Duration::from_secs(15), || fx.out_content().as_deref()
            == Some(&*v1)),
        "the first sync never wrote the JWKS:\n{}",
        d.log()
    );

    // The cluster rotates its signing key: old and new key published.
    fx.issuer.rotate(Algorithm::ES256);
    let v2 = fx.issuer.jwks_json();
    assert_ne!(v1, v2);
    fx.server.serve(StatusCode::OK, v2.clone());
    let changed = Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || fx.out_content().as_deref()
            == Some(&*v2)),
        "the rotated JWKS was not picked up:\n{}",
        d.log()
    );
    // --interval 1s, plus a fetch and a process that shares two cores.
    assert!(
        changed.elapsed() < Duration::from_secs(5),
        "took {:?}",
        changed.elapsed()
    );

    // The kubelet refreshes the projected token: the next fetch uses it.
    std::fs::write(&fx.token_file, "refreshed-token").unwrap();
    fx.server.api.set_token("refreshed-token");
    fx.issuer.retire_old_keys();
    let v3 = fx.issuer.jwks_json();
    fx.server.serve(StatusCode::OK, v3.clone());
    assert!(
        wait_for(Duration::from_secs(10), || fx.out_content().as_deref()
            == Some(&*v3)),
        "the refreshed token was not used:\n{}",
        d.log()
    );
    assert_eq!(fx.out_dir_entries(), ["jwks.json"]);
    let log = d.log();
    assert!(log.contains("wrote the cluster JWKS (2 keys)"), "{log}");
    assert!(
        !log.contains("\u{1b}["),
        "no colour codes in a log file:\n{log}"
    );
}

#[test]
fn a_non_jwks_answer_keeps_the_old_file() {
    let fx = Fixture::new();
    let v1 = fx.issuer.jwks_json();
    assert_eq!(fx.once().0, 0);
    assert_eq!(fx.out_content().as_deref(), Some(&*v1));

    for (body, expect) in [
        ("<html>maintenance</html>".to_owned(), "is not a JWKS"),
        (r#"{"kind":"Status"}"#.to_owned(), "is not a JWKS"),
        (r#"{"keys":[]}"#.to_owned(), "a JWKS without keys"),
        ("x".repeat(1024 * 1024 + 1), "larger than 1048576 bytes"),
    ] {
        fx.server.serve(StatusCode::OK, body);
        let (code, stdout, stderr) = fx.once();
        assert_eq!(code, 2, "{stdout}{stderr}");
        assert!(stderr.contains(expect), "{expect}: {stderr}");
        assert_eq!(fx.out_content().as_deref(), Some(&*v1));
        assert_eq!(fx.out_dir_entries(), ["jwks.json"]);
    }
    fx.server
        .serve(StatusCode::SERVICE_UNAVAILABLE, "overloaded".into());
    let (code, _, stderr) = fx.once();
    assert_eq!(code, 2);
    assert!(stderr.contains("answered 503"), "{stderr}");
    assert_eq!(fx.out_content().as_deref(), Some(&*v1));

    // The running sync: failures are logged, retried, and leave the file;
    // the next good answer is written.
    fx.server
        .serve(StatusCode::OK, "<html>maintenance</html>".into());
    let d = fx.daemon();
    let before = fx.server.hits();
    assert!(
        wait_for(Duration::from_secs(10), || fx.server.hits() >= before + 2),
        "no retry:\n{}",
        d.log()
    );
    assert!(
        d.log()
            .contains("JWKS sync failed; the current file is kept"),
        "{}",
        d.log()
    );
    assert_eq!(fx.out_content().as_deref(), Some(&*v1));
    let mut issuer = ClusterIssuer::new(ISSUER, Algorithm::ES256);
    issuer.rotate(Algorithm::RS256);
    let v2 = issuer.jwks_json();
    fx.server.serve(StatusCode::OK, v2.clone());
    assert!(
        wait_for(Duration::from_secs(10), || fx.out_content().as_deref()
            == Some(&*v2)),
        "no recovery:\n{}",
        d.log()
    );
}
