//! `keyproof-ca k8s-jwks`: the real binary against a real HTTPS server.
//!
//! The server here is a STAND-IN for the Kubernetes API server's discovery
//! endpoint `GET /openid/v1/jwks`: tokio-rustls and hyper with a certificate
//! for DNS `localhost` from a test cluster CA (written to a file, as the
//! kubelet writes `ca.crt`), serving the JWKS of a test token issuer
//! (`keyproof_tests::k8s::ClusterIssuer`) to callers with the expected bearer
//! token, and a Kubernetes-style 401 Status to anyone else.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;
use keyproof_tests::k8s::{ClusterIssuer, ISSUER};
use keyproof_tests::{cmd, run};

/// What the stand-in answers, changeable while it runs.
struct Answer {
    status: StatusCode,
    body: String,
    /// The bearer token it accepts.
    token: String,
}

/// The stand-in for the API server's `/openid/v1/jwks`.
struct StandInApiServer {
    port: u16,
    answer: Arc<Mutex<Answer>>,
    /// Requests that reached the handler (any path, any token).
    hits: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

/// A test cluster CA: its certificate in PEM and an issuer for leaves.
struct ClusterCa {
    pem: String,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

impl ClusterCa {
    fn new(name: &str) -> ClusterCa {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("CA cert").pem();
        ClusterCa { pem, params, key }
    }

    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.pem).expect("write CA file");
        path.to_owned()
    }

    /// A serving certificate for DNS `localhost` only (no IP SAN).
    fn server_config(&self) -> rustls::ServerConfig {
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("server key");
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &issuer).expect("server cert");
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config")
    }
}

impl StandInApiServer {
    fn start(ca: &ClusterCa, body: String, token: &str) -> StandInApiServer {
        let answer = Arc::new(Mutex::new(Answer {
            status: StatusCode::OK,
            body,
            token: token.to_owned(),
        }));
        let hits = Arc::new(AtomicUsize::new(0));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config()));
        let (answer2, hits2) = (answer.clone(), hits.clone());
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, answer, hits) = (acceptor.clone(), answer2.clone(), hits2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            hits.fetch_add(1, Ordering::SeqCst);
                            let a = answer.lock().unwrap();
                            let auth = req
                                .headers()
                                .get(http::header::AUTHORIZATION)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("");
                            let resp = if auth != format!("Bearer {}", a.token) {
                                status(StatusCode::UNAUTHORIZED, "Unauthorized")
                            } else if req.uri().path() != "/openid/v1/jwks" {
                                status(StatusCode::NOT_FOUND, "NotFound")
                            } else {
                                let mut r = Response::new(Full::new(Bytes::from(a.body.clone())));
                                *r.status_mut() = a.status;
                                r
                            };
                            async move { Ok::<_, std::convert::Infallible>(resp) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        StandInApiServer {
            port,
            answer,
            hits,
            _rt: rt,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    fn serve(&self, status: StatusCode, body: String) {
        let mut a = self.answer.lock().unwrap();
        a.status = status;
        a.body = body;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A Kubernetes `Status` object, as the API server sends with errors.
fn status(code: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": reason.to_lowercase(), "reason": reason, "code": code.as_u16(),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r
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

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.stand-in-token.sig";

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
        let out = run(self.command(ca_file, api_server).arg("--once"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
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
        let child = self
            .command(&self.ca_file, &self.server.url())
            .args(["--interval", "1s"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn keyproof-ca k8s-jwks");
        Daemon { child, log }
    }
}

/// A running `k8s-jwks`, stopped when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `f` holds, up to `limit`; false if it never did.
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
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
        &format!("https://127.0.0.1:{}", fx.server.port),
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
    fx.server.answer.lock().unwrap().token = "refreshed-token".into();
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
