//! Zero-touch workload identity on Kubernetes, with the real binaries: a
//! `keyproof-ca serve` that accepts the cluster's ServiceAccount tokens
//! (`--k8s-jwks`, `--k8s-issuer`) and a `keyproof-proxy` whose `[identity.ca]`
//! bootstraps with the pod's projected token
//! (`service_account_token_file`). The tokens are minted by a stand-in for
//! the API server's issuer (`keyproof_tests::k8s`).
//!
//! - A sidecar killed and restarted three times is ready again every time
//!   with no human step, while the kubelet rewrites the token file and the
//!   cluster rotates its signing key; its metrics show the trust bundle.
//! - A sidecar whose certificate lapsed while the CA was down bootstraps
//!   again by itself once the CA is back.
//! - A sidecar holding a token for another namespace than its `spiffe_id`
//!   stays unready and counts the CA's refusal.
//! - After `rotate root finish --force` drops the root its certificate
//!   chains to, a sidecar bootstraps again at once (the CA's rejection of
//!   its certificate in the handshake is counted as `client_cert_rejected`).
//! - A sidecar started with a stale bootstrap bundle file reaches the CA as
//!   soon as the file is replaced, without a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;
use keyproof_tests::k8s::{ClusterIssuer, SaToken, ISSUER};
use keyproof_tests::proxy_support::{http_get, sha256_hex, ProxyProc};
use keyproof_tests::{bin, cmd, free_port, wait_for_port, TestCa};
use serde_json::Value;

const TD: &str = "k8s.keyproof.test";
const NS: &str = "shop";
const SA: &str = "web";

fn web_id() -> String {
    format!("spiffe://{TD}/ns/{NS}/sa/{SA}")
}

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn wait_until(
    what: &str,
    limit: Duration,
    mut ok: impl FnMut() -> bool,
    logs: impl Fn() -> String,
) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the sample `sample` (name and labels exactly as exported)
/// in a Prometheus text exposition.
fn sample(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `keyproof-ca serve` with ServiceAccount attestation, killed when dropped.
struct CaServer {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl CaServer {
    /// Starts on `port` with `ttl` SVIDs and no rate limit (the test
    /// bootstraps the same identity several times a minute).
    fn start(ca: &TestCa, port: u16, jwks: &Path, ttl: &str) -> CaServer {
        let admin = addr();
        let log = ca.path(&format!("serve-{port}-{}.log", now()));
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd("keyproof-ca")
            .args(["serve", "--ttl", ttl, "--rate-limit", "0", "--dir"])
            .arg(&ca.dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-listen")
            .arg(admin.to_string())
            .arg("--k8s-jwks")
            .arg(jwks)
            .args(["--k8s-issuer", ISSUER])
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start keyproof-ca serve");
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(20));
        CaServer { child, admin, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A trust domain's CA, the cluster's token issuer and its JWKS file.
struct Cluster {
    ca: TestCa,
    issuer: ClusterIssuer,
    jwks: PathBuf,
    port: u16,
}

impl Cluster {
    fn new() -> Cluster {
        let ca = TestCa::new(TD);
        let issuer = ClusterIssuer::new(ISSUER, Algorithm::RS256);
        let jwks = ca.path("jwks.json");
        issuer.write_jwks(&jwks);
        Cluster {
            ca,
            issuer,
            jwks,
            port: free_port(),
        }
    }

    /// The CA server, issuing 10-second SVIDs.
    fn serve(&self) -> CaServer {
        self.serve_ttl("10s")
    }

    fn serve_ttl(&self, ttl: &str) -> CaServer {
        CaServer::start(&self.ca, self.port, &self.jwks, ttl)
    }

    /// `keyproof-ca rotate root <step>` (with `extra` arguments).
    fn rotate(&self, step: &str, extra: &[&str]) -> String {
        keyproof_tests::run_ok(
            cmd("keyproof-ca")
                .args(["rotate", "root", step])
                .args(extra)
                .arg("--dir")
                .arg(&self.ca.dir),
        )
    }

    /// Writes a fresh projected token for `ns`/`sa` of pod `pod` into
    /// `file`, atomically, as the kubelet does; returns it.
    fn project_token(&self, file: &Path, ns: &str, sa: &str, pod: &str) -> String {
        let mut t = SaToken::new(ns, sa);
        t.pod = pod.to_owned();
        let token = self.issuer.token(&t);
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, &token).unwrap();
        std::fs::rename(&tmp, file).unwrap();
        token
    }

    /// A sidecar configuration: `[identity.ca]` for `spiffe_id` with the
    /// token in `token_file`, an outbound listener and the admin listener.
    fn sidecar_toml(
        &self,
        name: &str,
        spiffe_id: &str,
        token_file: &Path,
        admin: SocketAddr,
    ) -> String {
        // The bootstrap bundle is a copy, as a ConfigMap would be.
        let bootstrap = self.ca.path(&format!("{name}-bootstrap.pem"));
        std::fs::copy(self.ca.bundle(), &bootstrap).unwrap();
        format!(
            "[identity]\ntrust_bundle = {bootstrap:?}\n\
             [identity.ca]\nurl = \"https://127.0.0.1:{port}\"\nspiffe_id = \"{spiffe_id}\"\n\
             service_account_token_file = {token_file:?}\nbundle_refresh = \"1s\"\n\
             [outbound]\nlisten = \"{out}\"\n\
             [admin]\nlisten = \"{admin}\"\n",
            port = self.port,
            out = addr(),
        )
    }
}

/// `/identity` of a sidecar (Null unless 200).
fn identity(admin: SocketAddr) -> Value {
    match http_get(admin, "/identity") {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// The fingerprints of the roots `/identity` shows.
fn trust_roots(id: &Value) -> Vec<String> {
    id["trust_roots"]
        .as_array()
        .map(|roots| {
            roots
                .iter()
                .filter_map(|r| r["sha256"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A trust-bundle series of the proxy, labelled with the trust domain.
fn bundle_series(name: &str) -> String {
    format!("keyproof_trust_bundle_{name}{{trust_domain=\"{TD}\"}}")
}

/// The SHA-256 (hex) of the first root in a PEM bundle.
fn root_fingerprint(bundle: &Path) -> String {
    let pem = std::fs::read(bundle).unwrap();
    let der = keyproof_identity::keys::certs_from_pem(&pem).unwrap();
    sha256_hex(&der[0])
}

#[test]
fn a_service_account_sidecar_is_ready_after_every_restart_with_no_human_step() {
    let mut cluster = Cluster::new();
    let server = cluster.serve();
    let token_file = cluster.ca.path("token");
    let mut token = cluster.project_token(&token_file, NS, SA, "web-7c9d8f6b5-x2k4q");
    let admin = addr();
    let config = cluster.sidecar_toml("web", &web_id(), &token_file, admin);
    let root_fp = root_fingerprint(&cluster.ca.bundle());

    let mut serials = Vec::new();
    let mut proxy = ProxyProc::start(cluster.ca.tmp.path(), "web-0", &config, admin);
    for restart in 0..=3 {
        let logs = || {
            format!(
                "--- proxy\n{}\n--- ca\n{}",
                proxy.log_text(),
                server.log_text()
            )
        };
        // Ready (ProxyProc::start waited for /ready 200) as the pod's own
        // ServiceAccount identity.
        let id = identity(admin);
        assert_eq!(
            id["spiffe_id"],
            web_id().as_str(),
            "restart {restart}: {id}\n{}",
            logs()
        );
        assert!(id["not_after_unix"].as_i64().unwrap() > now(), "{id}");
        assert_eq!(
            id["source"]["credential"], "service_account_token_file",
            "{id}"
        );
        let (_, body) = http_get(admin, "/identity").unwrap();
        assert!(!body.contains(&token), "/identity shows the token:\n{body}");
        // A new certificate every time: the key lived in the killed process.
        let serial = id["serial"].as_str().unwrap().to_owned();
        assert!(
            !serials.contains(&serial),
            "restart {restart}: serial {serial} again"
        );
        serials.push(serial);

        // The trust bundle is exported, with the CA's sequence.
        let m = proxy.metrics();
        assert_eq!(sample(&m, &bundle_series("roots")), Some(1.0), "{m}");
        assert_eq!(sample(&m, &bundle_series("sequence")), Some(1.0), "{m}");
        let expiry = sample(
            &m,
            &format!(
                "keyproof_trust_bundle_root_expiry_timestamp_seconds{{fingerprint=\"{root_fp}\",trust_domain=\"{TD}\"}}"
            ),
        )
        .unwrap_or_else(|| panic!("no expiry for root {root_fp}:\n{m}"));
        assert!(expiry > now() as f64, "{expiry}");
        assert!(
            m.lines().any(|l| l.starts_with("keyproof_build_info{")
                && l.contains("binary=\"keyproof-proxy\"")
                && l.ends_with(" 1")),
            "{m}"
        );
        assert_eq!(
            sample(&m, "keyproof_identity_renewals_total{result=\"ok\"}").map(|v| v >= 1.0),
            Some(true),
            "{m}"
        );
        if restart == 3 {
            break;
        }

        // Kill it (SIGKILL: nothing is handed over) and start it again.
        drop(proxy);
        match restart {
            // The kubelet refreshed the token in the meantime.
            1 => token = cluster.project_token(&token_file, NS, SA, "web-7c9d8f6b5-x2k4q"),
            // The cluster rotated its signing key and retired the old one:
            // only the token now in the file is accepted, so readiness
            // proves the file was read again. The pod was rescheduled too.
            2 => {
                cluster.issuer.rotate(Algorithm::ES256);
                cluster.issuer.retire_old_keys();
                cluster.issuer.write_jwks(&cluster.jwks);
                token = cluster.project_token(&token_file, NS, SA, "web-7c9d8f6b5-m4n7p");
            }
            _ => {}
        }
        proxy = ProxyProc::start(
            cluster.ca.tmp.path(),
            &format!("web-{}", restart + 1),
            &config,
            admin,
        );
    }

    // A root rotation starts: the sidecar follows the CA's bundle, and its
    // gauges show it converging (sequence 2, both roots).
    keyproof_tests::run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "prepare", "--dir"])
            .arg(&cluster.ca.dir),
    );
    wait_until(
        "the sidecar to hold the CA's new bundle",
        Duration::from_secs(15),
        || {
            let m = proxy.metrics();
            sample(&m, &bundle_series("sequence")) == Some(2.0)
                && sample(&m, &bundle_series("roots")) == Some(2.0)
        },
        || format!("{}\n{}", proxy.metrics(), proxy.log_text()),
    );
    let m = proxy.metrics();
    let expiries = m
        .lines()
        .filter(|l| l.starts_with("keyproof_trust_bundle_root_expiry_timestamp_seconds{"))
        .count();
    assert_eq!(expiries, 2, "{m}");
    assert_eq!(identity(admin)["trust_bundle_sequence"], 2);

    // The CA counted every ServiceAccount bootstrap.
    let m = server.metrics();
    let bootstraps = sample(
        &m,
        "keyproof_ca_issuances_total{kind=\"bootstrap_sa\",result=\"ok\"}",
    )
    .unwrap_or_else(|| panic!("no bootstrap_sa issuances:\n{m}"));
    assert!(bootstraps >= 4.0, "{bootstraps}\n{m}");
}

#[test]
fn a_sidecar_whose_certificate_lapsed_bootstraps_again_by_itself() {
    let cluster = Cluster::new();
    let server = cluster.serve();
    let token_file = cluster.ca.path("token");
    cluster.project_token(&token_file, NS, SA, "web-7c9d8f6b5-x2k4q");
    let admin = addr();
    let config = cluster.sidecar_toml("web", &web_id(), &token_file, admin);
    let proxy = ProxyProc::start(cluster.ca.tmp.path(), "web", &config, admin);
    let before = identity(admin);

    // The CA goes away for longer than the 10-second certificate lives.
    drop(server);
    let lapsed_at = before["not_after_unix"].as_i64().unwrap();
    wait_until(
        "the certificate held to expire",
        Duration::from_secs(30),
        || {
            identity(admin)["not_after_unix"]
                .as_i64()
                .is_some_and(|t| t < now())
        },
        || proxy.log_text(),
    );
    let server = cluster.serve();
    let logs = || {
        format!(
            "--- proxy\n{}\n--- ca\n{}",
            proxy.log_text(),
            server.log_text()
        )
    };
    // Renewing with the lapsed certificate cannot succeed; the sidecar
    // presents its ServiceAccount token again instead.
    wait_until(
        "a new certificate",
        Duration::from_secs(45),
        || {
            identity(admin)["not_after_unix"]
                .as_i64()
                .is_some_and(|t| t > now())
        },
        logs,
    );
    let after = identity(admin);
    assert_eq!(after["spiffe_id"], web_id().as_str());
    assert_ne!(after["serial"], before["serial"]);
    assert!(after["not_after_unix"].as_i64().unwrap() > lapsed_at);
    assert!(
        proxy.log_text().contains("bootstrapping again"),
        "{}",
        logs()
    );
    let m = server.metrics();
    assert!(
        sample(
            &m,
            "keyproof_ca_issuances_total{kind=\"bootstrap_sa\",result=\"ok\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert_eq!(http_get(admin, "/ready").unwrap().0, 200);
}

/// A `keyproof-proxy run` that is not expected to become ready; killed
/// when dropped.
struct Unready {
    child: Child,
    log: PathBuf,
}

impl Unready {
    /// Starts the `web` sidecar of `cluster` with `config` (written to
    /// `web.toml`), its output in `web.log`.
    fn start(cluster: &Cluster, config: &str) -> Unready {
        let config_file = cluster.ca.path("web.toml");
        std::fs::write(&config_file, config).unwrap();
        let log = cluster.ca.path("web.log");
        let f = std::fs::File::create(&log).unwrap();
        Unready {
            child: Command::new(bin("keyproof-proxy"))
                .arg("run")
                .arg("--config")
                .arg(&config_file)
                .env("RUST_LOG", "info")
                .stdout(f.try_clone().unwrap())
                .stderr(f)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn keyproof-proxy"),
            log,
        }
    }

    /// The sidecar's and the CA's logs, for a failure message.
    fn logs(&self, server: &CaServer) -> String {
        format!(
            "--- proxy\n{}\n--- ca\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            server.log_text()
        )
    }
}

impl Drop for Unready {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `keyproof_identity_renewals_total{result="<result>"}` of the sidecar
/// whose admin listener is `admin`; 0 while it does not answer.
fn renewals(admin: SocketAddr, result: &str) -> f64 {
    http_get(admin, "/metrics")
        .ok()
        .and_then(|(_, m)| {
            sample(
                &m,
                &format!("keyproof_identity_renewals_total{{result=\"{result}\"}}"),
            )
        })
        .unwrap_or(0.0)
}

#[test]
fn a_token_for_another_namespace_leaves_the_sidecar_unready_and_counted() {
    let cluster = Cluster::new();
    let server = cluster.serve();
    let token_file = cluster.ca.path("token");
    // The pod runs in `billing`, but its sidecar claims to be shop/web.
    cluster.project_token(&token_file, "billing", SA, "web-7c9d8f6b5-x2k4q");
    let admin = addr();
    let config = cluster.sidecar_toml("web", &web_id(), &token_file, admin);
    let proxy = Unready::start(&cluster, &config);
    let logs = || proxy.logs(&server);
    let refused = || renewals(admin, "ca_refused");
    wait_until(
        "the CA's refusal to be counted",
        Duration::from_secs(20),
        || refused() >= 1.0,
        logs,
    );
    // Still refused a few retries later, never ready, no identity.
    std::thread::sleep(Duration::from_secs(3));
    assert!(refused() >= 2.0, "{}", logs());
    let (status, body) = http_get(admin, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    let (status, body) = http_get(admin, "/identity").unwrap();
    assert_eq!(status, 503, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["source"]["credential"], "service_account_token_file");
    let m = http_get(admin, "/metrics").unwrap().1;
    assert_eq!(
        sample(&m, "keyproof_identity_renewals_total{result=\"ok\"}"),
        Some(0.0)
    );
    assert!(logs().contains("id_mismatch"), "{}", logs());
    // The CA counted it under its code, and issued nothing.
    let m = server.metrics();
    assert!(
        sample(&m, "keyproof_ca_refusals_total{code=\"id_mismatch\"}").is_some_and(|v| v >= 1.0),
        "{m}"
    );
}

#[test]
fn a_forced_root_rotation_makes_a_service_account_sidecar_bootstrap_again_at_once() {
    let cluster = Cluster::new();
    // Ten-minute certificates: no renewal is due during the test, so only
    // the rotation can make the sidecar change its certificate.
    let server = cluster.serve_ttl("10m");
    let token_file = cluster.ca.path("token");
    cluster.project_token(&token_file, NS, SA, "web-7c9d8f6b5-x2k4q");
    let admin = addr();
    let config = cluster.sidecar_toml("web", &web_id(), &token_file, admin);
    let proxy = ProxyProc::start(cluster.ca.tmp.path(), "web", &config, admin);
    let logs = || {
        format!(
            "--- proxy\n{}\n--- ca\n{}",
            proxy.log_text(),
            server.log_text()
        )
    };
    let before = identity(admin);
    let old_root = root_fingerprint(&cluster.ca.bundle());
    let sequence = || sample(&proxy.metrics(), &bundle_series("sequence"));

    // Prepared: the sidecar trusts both roots (and so still reaches the CA
    // once the CA's own certificate moves to the new root).
    cluster.rotate("prepare", &[]);
    wait_until(
        "the sidecar to hold the bundle with both roots",
        Duration::from_secs(15),
        || sequence() == Some(2.0),
        logs,
    );
    cluster.rotate("activate", &[]);
    // Finished by force while the sidecar's certificate (from the old
    // root) has nine minutes left: the CA no longer accepts it.
    cluster.rotate("finish", &["--force"]);
    let new_root = root_fingerprint(&cluster.ca.bundle());
    assert_ne!(new_root, old_root);
    let started = Instant::now();
    wait_until(
        "the sidecar to bootstrap again under the new root",
        Duration::from_secs(15),
        || {
            let id = identity(admin);
            id["serial"] != before["serial"] && trust_roots(&id) == [new_root.clone()]
        },
        logs,
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let after = identity(admin);
    assert_eq!(after["spiffe_id"], web_id().as_str());
    assert_eq!(after["trust_bundle_sequence"], 3, "{after}");
    let m = proxy.metrics();
    assert_eq!(sample(&m, &bundle_series("sequence")), Some(3.0), "{m}");
    assert_eq!(sample(&m, &bundle_series("roots")), Some(1.0), "{m}");
    assert!(
        sample(
            &m,
            "keyproof_identity_renewals_total{result=\"client_cert_rejected\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{m}\n{}",
        logs()
    );
    assert_eq!(
        sample(
            &m,
            "keyproof_identity_renewals_total{result=\"ca_unreachable\"}"
        ),
        Some(0.0),
        "{m}\n{}",
        logs()
    );
    assert_eq!(http_get(admin, "/ready").unwrap().0, 200);
    // No flood: a few more refreshes later, the refused bundle was logged
    // at most once.
    std::thread::sleep(Duration::from_secs(3));
    let refusals = proxy
        .log_text()
        .matches("refreshed trust bundle refused")
        .count();
    assert!(refusals <= 1, "{refusals} refusals logged\n{}", logs());
}

#[test]
fn a_sidecar_started_with_a_stale_bootstrap_bundle_recovers_when_the_file_is_replaced() {
    let cluster = Cluster::new();
    let stale = std::fs::read(cluster.ca.bundle()).unwrap();
    // The whole rotation happens before the CA server starts: it serves
    // from the new root alone.
    cluster.rotate("prepare", &[]);
    cluster.rotate("activate", &[]);
    cluster.rotate("finish", &["--force"]);
    let server = cluster.serve();
    let token_file = cluster.ca.path("token");
    cluster.project_token(&token_file, NS, SA, "web-7c9d8f6b5-x2k4q");
    let admin = addr();
    let config = cluster.sidecar_toml("web", &web_id(), &token_file, admin);
    // The ConfigMap was created before the rotation and never updated.
    let bootstrap = cluster.ca.path("web-bootstrap.pem");
    std::fs::write(&bootstrap, &stale).unwrap();
    let proxy = Unready::start(&cluster, &config);
    let logs = || proxy.logs(&server);
    let unreachable = || renewals(admin, "ca_unreachable");
    wait_until(
        "a bootstrap to fail on the stale bundle",
        Duration::from_secs(20),
        || unreachable() >= 1.0,
        logs,
    );
    assert_eq!(http_get(admin, "/ready").unwrap().0, 503);
    // The ConfigMap is updated (atomically, as the kubelet swaps it).
    let tmp = cluster.ca.path("web-bootstrap.pem.tmp");
    std::fs::copy(cluster.ca.bundle(), &tmp).unwrap();
    std::fs::rename(&tmp, &bootstrap).unwrap();
    wait_until(
        "the sidecar to become ready without a restart",
        Duration::from_secs(20),
        || http_get(admin, "/ready").is_ok_and(|(status, _)| status == 200),
        logs,
    );
    let id = identity(admin);
    assert_eq!(id["spiffe_id"], web_id().as_str());
    assert_eq!(
        trust_roots(&id),
        [root_fingerprint(&cluster.ca.bundle())],
        "{id}"
    );
}
