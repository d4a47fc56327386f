//! Certificate rotation under load: a sidecar pair carries
//! continuous traffic (keep-alive clients plus bursts of new connections)
//! while leaves are replaced through a Kubernetes `..data` symlink swap, the
//! root moves, and (`[identity.ca]`) a real `keyproof-ca serve` renews
//! 10-second certificates through a full root rotation. Zero requests may
//! fail. Bad material is refused and counted while the old identity keeps
//! serving; `/ready` waits for the first certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use keyproof_identity::keys;
use keyproof_tests::proxy_support::*;
use keyproof_tests::{cmd, free_port, run_ok, wait_for_port, TestCa};
use serde_json::Value;

const TD: &str = "rotate.test";
const API: &str = "/ns/default/sa/api";
const WEB: &str = "/ns/default/sa/web";
const HOST: &str = "api.default.svc";
const LATE: &str = "late.default.svc";

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/identity` of a proxy.
fn identity(admin: SocketAddr) -> Value {
    let (code, body) = http_get(admin, "/identity").expect("GET /identity");
    if code != 200 {
        return Value::Null;
    }
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

fn leaf_sha(admin: SocketAddr) -> String {
    identity(admin)["chain"][0]["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn roots(admin: SocketAddr) -> usize {
    identity(admin)["trust_roots"]
        .as_array()
        .map_or(0, |a| a.len())
}

/// The leaf a server presents to a new handshake, as curl saw it.
fn presented_leaf(addr: SocketAddr, crt: &Path, key: &Path) -> String {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-k",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{certs}",
        ])
        .arg("--cert")
        .arg(crt)
        .arg("--key")
        .arg(key)
        .arg(format!("https://{addr}/"))
        .output()
        .expect("run curl");
    keys::certs_from_pem(&out.stdout)
        .ok()
        .and_then(|c| c.first().map(|c| keys::fingerprint(c)))
        .unwrap_or_else(|| format!("no certificate: {}", String::from_utf8_lossy(&out.stderr)))
}

fn first_cert_sha(pem_path: &Path) -> String {
    let pem = std::fs::read(pem_path).expect("read pem");
    keys::fingerprint(&keys::certs_from_pem(&pem).expect("pem")[0])
}

/// A Secret volume as the kubelet writes it: `..<ts>/` directories, an
/// atomically swapped `..data` symlink, and the visible files as symlinks
/// through `..data`.
struct Mount {
    dir: PathBuf,
    n: u32,
    current: Option<PathBuf>,
}

impl Mount {
    fn new(dir: PathBuf) -> Mount {
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
        Mount {
            dir,
            n: 0,
            current: None,
        }
    }

    fn publish(&mut self, crt: &[u8], key: &[u8], ca: &[u8]) {
        self.n += 1;
        let ts = format!("..2026_11_22_{:06}", self.n);
        let d = self.dir.join(&ts);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("tls.crt"), crt).unwrap();
        std::fs::write(d.join("tls.key"), key).unwrap();
        std::fs::write(d.join("ca.crt"), ca).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        // The kubelet removes the previous directory right after the swap.
        if let Some(old) = self.current.replace(d) {
            std::fs::remove_dir_all(old).unwrap();
        }
    }

    fn publish_files(&mut self, crt: &Path, key: &Path, ca: &Path) {
        let r = |p: &Path| std::fs::read(p).unwrap();
        self.publish(&r(crt), &r(key), &r(ca));
    }

    fn identity_toml(&self) -> String {
        format!(
            "[identity]\ntrust_bundle = {:?}\nreload_interval = \"1s\"\n[identity.files]\ncert = {:?}\nkey = {:?}\n",
            self.dir.join("ca.crt"),
            self.dir.join("tls.crt"),
            self.dir.join("tls.key")
        )
    }
}

fn inbound_toml(identity: &str, listen: SocketAddr, app: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "{identity}[inbound]\nlisten = \"{listen}\"\napp = \"{app}\"\n[admin]\nlisten = \"{admin}\"\n"
    )
}

fn outbound_toml(
    identity: &str,
    listen: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
) -> String {
    // `LATE` is the same inbound under another name: its mesh connection
    // is dialled only when the test first uses it, after the rotation.
    format!(
        "{identity}[outbound]\nlisten = \"{listen}\"\n\
         [[outbound.upstreams]]\nhost = \"{HOST}\"\naddress = \"{inbound}\"\nidentity = \"spiffe://{TD}{API}\"\n\
         [[outbound.upstreams]]\nhost = \"{LATE}\"\naddress = \"{inbound}\"\nidentity = \"spiffe://{TD}{API}\"\n\
         [admin]\nlisten = \"{admin}\"\n"
    )
}

/// The SHA-256 of the client certificate the inbound saw on a request from
/// the outbound to `host` (from `x-forwarded-client-cert`).
fn client_leaf_seen(out: SocketAddr, host: &str) -> String {
    let (code, body, _) = curl(&[
        "-H",
        &format!("Host: {host}"),
        &format!("http://{out}/late"),
    ]);
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
        .and_then(|x| x.split(';').find_map(|p| p.strip_prefix("Hash=")))
        .unwrap_or_default()
        .to_owned()
}

// ---- a peer sidecar ------------------------------------------------------

/// What a correctly rotated peer sidecar does: every connection is a new
/// mutual-TLS handshake straight to the inbound, presenting the peer's
/// current certificate and checking the server against its current bundle.
/// (The outbound multiplexes everything over one long-lived HTTP/2
/// connection, so it alone would not handshake often.)
struct Peer {
    key: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
    trust: keyproof_identity::tls::SharedVerifier,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Peer")
    }
}

fn certified(crt: &Path, key: &Path) -> rustls::sign::CertifiedKey {
    let chain = keys::certs_from_pem(&std::fs::read(crt).unwrap()).unwrap();
    let key = keys::private_key_from_pem(&std::fs::read(key).unwrap()).unwrap();
    keyproof_ca::client::certified_key(chain, &key).unwrap()
}

fn verifier(bundle: &Path) -> keyproof_identity::SvidVerifier {
    keyproof_identity::SvidVerifier::new(
        keyproof_identity::TrustDomain::parse(TD).unwrap(),
        keyproof_identity::TrustBundle::from_pem(&std::fs::read(bundle).unwrap()).unwrap(),
    )
}

impl Peer {
    fn new(crt: &Path, key: &Path, bundle: &Path) -> Arc<Peer> {
        Arc::new_cyclic(|weak: &std::sync::Weak<Peer>| {
            let trust: keyproof_identity::tls::SharedVerifier =
                Arc::new(arc_swap::ArcSwap::from_pointee(verifier(bundle)));
            let resolver = Arc::new(WeakPeerCert(weak.clone()));
            let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(keyproof_identity::tls::SvidServerVerifier::new(
                keyproof_identity::tls::Shared(trust.clone()),
                keyproof_identity::IdPattern::parse(&format!("spiffe://{TD}{API}")).unwrap(),
            ))
            .with_client_cert_resolver(resolver);
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            cfg.resumption = rustls::client::Resumption::disabled();
            Peer {
                key: arc_swap::ArcSwap::from_pointee(certified(crt, key)),
                trust,
                tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            }
        })
    }

    fn use_cert(&self, crt: &Path, key: &Path) {
        self.key.store(Arc::new(certified(crt, key)));
    }

    fn use_bundle(&self, bundle: &Path) {
        self.trust.store(Arc::new(verifier(bundle)));
    }

    /// One request on a new connection.
    async fn request(&self, inbound: SocketAddr) -> Result<(), String> {
        let fut = async {
            let tcp = tokio::net::TcpStream::connect(inbound)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            one_request(&mut sender, true).await
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .map_err(|_| "no answer within 10s".to_owned())?
    }
}

/// The resolver holds the peer weakly (the peer owns the TLS config).
#[derive(Debug)]
struct WeakPeerCert(std::sync::Weak<Peer>);

impl rustls::client::ResolvesClientCert for WeakPeerCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.upgrade().map(|p| p.key.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// ---- load ------------------------------------------------------------------

/// Continuous traffic into an outbound listener: keep-alive clients plus
/// bursts of new connections. Every failure is recorded.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    rt: tokio::runtime::Runtime,
    started: Instant,
}

async fn one_request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    close: bool,
) -> Result<(), String> {
    let mut req = http::Request::get("/load").header(http::header::HOST, HOST);
    if close {
        req = req.header(http::header::CONNECTION, "close");
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let fut = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        if status != 200 || !body.starts_with("GET /load") {
            return Err(format!("{status}: {body}"));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "no answer within 10s".to_owned())?
}

async fn connect(
    out: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(out)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

impl Load {
    /// Load into the outbound at `out`; with `peer`, also new mutual-TLS
    /// connections from that peer straight to the inbound.
    fn start(out: SocketAddr, peer: Option<(Arc<Peer>, SocketAddr)>) -> Load {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let fail = |f: &Arc<Mutex<Vec<String>>>, what: String| {
            let mut v = f.lock().unwrap();
            if v.len() < 50 {
                v.push(what);
            }
        };
        // Keep-alive clients.
        for w in 0..3 {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut sender = match connect(out).await {
                        Ok(s) => s,
                        Err(e) => {
                            fail(&failures, format!("keep-alive {w}: {e}"));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    while !stop.load(Ordering::Relaxed) {
                        match one_request(&mut sender, false).await {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                fail(&failures, format!("keep-alive {w}: {e}"));
                                break;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            });
        }
        // Bursts of new app connections, one request each.
        {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut burst = Vec::new();
                    for _ in 0..6 {
                        burst.push(tokio::spawn(async move {
                            let mut s = connect(out).await?;
                            one_request(&mut s, true).await
                        }));
                    }
                    for b in burst {
                        match b.await {
                            Ok(Ok(())) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Err(e)) => fail(&failures, format!("new connection: {e}")),
                            Err(e) => fail(&failures, format!("new connection task: {e}")),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(350)).await;
                }
            });
        }
        if let Some((peer, inbound)) = peer {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match peer.request(inbound).await {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => fail(&failures, format!("peer: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            });
        }
        Load {
            stop,
            ok,
            failures,
            rt,
            started: Instant::now(),
        }
    }

    /// Keeps going until it has run for at least `d` in total.
    fn run_until(&self, d: Duration) {
        if let Some(rest) = d.checked_sub(self.started.elapsed()) {
            std::thread::sleep(rest);
        }
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Stops; returns (requests answered, failures).
    fn finish(self) -> (u64, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        // Let in-flight requests complete; they count too.
        std::thread::sleep(Duration::from_millis(300));
        let took = self.started.elapsed();
        let ok = self.ok.load(Ordering::Relaxed);
        let failures = self.failures();
        self.rt.shutdown_timeout(Duration::from_secs(2));
        (ok, failures, took)
    }
}

fn counter(p: &ProxyProc, name: &str, result: &str) -> f64 {
    p.metric(&format!("{name}{{result=\"{result}\"}}"))
}

fn non_ok(p: &ProxyProc, name: &str) -> Vec<String> {
    p.metrics()
        .lines()
        .filter(|l| l.starts_with(name) && !l.contains("result=\"ok\"") && !l.ends_with(" 0"))
        .map(str::to_owned)
        .collect()
}

fn handshakes(p: &ProxyProc, dir: &str) -> f64 {
    p.metric(&format!(
        "keyproof_tls_handshakes_total{{direction=\"{dir}\",result=\"ok\"}}"
    ))
}

// ---- [identity.files] ------------------------------------------------------

/// Issues a leaf with the `keyproof-ca` binary; returns (crt, key).
fn issue(ca: &TestCa, name: &str, path: &str) -> (PathBuf, PathBuf) {
    ca.issue(name, path, &["--ttl", "1h"])
}

#[test]
fn files_rotation_and_root_move_under_load_fail_no_request() {
    let ca = TestCa::new(TD);
    let app = EchoApp::start();
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let mut m_in = Mount::new(ca.path("in"));
    let mut m_out = Mount::new(ca.path("out"));
    let (s_crt, s_key) = issue(&ca, "api-0", API);
    let (c_crt, c_key) = issue(&ca, "web-0", WEB);
    // A client leaf of the original root, tried again once that root is gone.
    let (old_crt, old_key) = issue(&ca, "web-old-root", WEB);
    m_in.publish_files(&s_crt, &s_key, &ca.bundle());
    m_out.publish_files(&c_crt, &c_key, &ca.bundle());
    let inbound = ProxyProc::start(
        ca.tmp.path(),
        "in",
        &inbound_toml(&m_in.identity_toml(), in_addr, app.addr, in_admin),
        in_admin,
    );
    let outbound = ProxyProc::start(
        ca.tmp.path(),
        "out",
        &outbound_toml(&m_out.identity_toml(), out_addr, in_addr, out_admin),
        out_admin,
    );
    let hs_before = (
        handshakes(&outbound, "outbound"),
        handshakes(&inbound, "inbound"),
    );
    let peer_id = "/ns/default/sa/peer";
    let (p_crt, p_key) = issue(&ca, "peer-0", peer_id);
    let peer = Peer::new(&p_crt, &p_key, &ca.bundle());
    let load = Load::start(out_addr, Some((peer.clone(), in_addr)));
    let logs = || {
        format!(
            "--- in\n{}\n--- out\n{}",
            inbound.log_text(),
            outbound.log_text()
        )
    };

    // Leaves every 2 s, each pair published and seen by both proxies.
    let mut n = 0;
    let mut swap_leaves = |ca: &TestCa, m_in: &mut Mount, m_out: &mut Mount| {
        n += 1;
        let (s_crt, s_key) = issue(ca, &format!("api-{n}"), API);
        let (c_crt, c_key) = issue(ca, &format!("web-{n}"), WEB);
        let bundle = ca.bundle();
        m_in.publish_files(&s_crt, &s_key, &bundle);
        m_out.publish_files(&c_crt, &c_key, &bundle);
        let (s_sha, c_sha) = (first_cert_sha(&s_crt), first_cert_sha(&c_crt));
        wait_until(
            "both proxies to use the new leaves",
            Duration::from_secs(5),
            || leaf_sha(in_admin) == s_sha && leaf_sha(out_admin) == c_sha,
        );
        // The very next handshake presents it, and the outbound's next
        // request goes on a connection presenting its new leaf: the callee
        // attributes it to the certificate the caller holds now.
        assert_eq!(presented_leaf(in_addr, &c_crt, &c_key), s_sha);
        assert_eq!(
            client_leaf_seen(out_addr, HOST),
            c_sha,
            "{}",
            outbound.log_text()
        );
        (s_crt, s_key, c_crt, c_key)
    };
    let mut last = (s_crt, s_key, c_crt, c_key);
    for _ in 0..5 {
        let t = Instant::now();
        last = swap_leaves(&ca, &mut m_in, &mut m_out);
        std::thread::sleep(Duration::from_secs(2).saturating_sub(t.elapsed()));
    }
    assert!(
        load.failures().is_empty(),
        "{:?}\n{}",
        load.failures(),
        logs()
    );

    // Root move, step 1: the bundle becomes old + new; leaves unchanged.
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "prepare", "--dir"])
            .arg(&ca.dir),
    );
    m_in.publish_files(&last.0, &last.1, &ca.bundle());
    m_out.publish_files(&last.2, &last.3, &ca.bundle());
    wait_until(
        "both proxies to trust old + new roots",
        Duration::from_secs(5),
        || roots(in_admin) == 2 && roots(out_admin) == 2,
    );
    peer.use_bundle(&ca.bundle());
    // The old-root client leaf is still accepted (the control for below).
    let in_url = format!("https://{in_addr}/load");
    let old_args = [
        "-k",
        "--cert",
        old_crt.to_str().unwrap(),
        "--key",
        old_key.to_str().unwrap(),
        "-H",
        "Host: api",
        &in_url,
    ];
    let (code, body, _) = curl(&old_args);
    assert_eq!(code, 200, "{body}");
    std::thread::sleep(Duration::from_secs(2));

    // Step 2: leaves from the new root, twice.
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "activate", "--dir"])
            .arg(&ca.dir),
    );
    for _ in 0..2 {
        let t = Instant::now();
        last = swap_leaves(&ca, &mut m_in, &mut m_out);
        std::thread::sleep(Duration::from_secs(2).saturating_sub(t.elapsed()));
    }
    let (p_crt, p_key) = issue(&ca, "peer-1", peer_id);
    peer.use_cert(&p_crt, &p_key);
    // Step 3: the old root leaves the bundle.
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "finish", "--force", "--dir"])
            .arg(&ca.dir),
    );
    m_in.publish_files(&last.0, &last.1, &ca.bundle());
    m_out.publish_files(&last.2, &last.3, &ca.bundle());
    wait_until(
        "both proxies to trust only the new root",
        Duration::from_secs(5),
        || roots(in_admin) == 1 && roots(out_admin) == 1,
    );
    peer.use_bundle(&ca.bundle());
    // A new mesh connection from the outbound presents its newest leaf.
    let newest = leaf_sha(out_admin);
    assert_eq!(client_leaf_seen(out_addr, LATE), newest);
    load.run_until(Duration::from_secs(22));
    let (ok, failures, took) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed requests: {failures:?}\n{}",
        failures.len(),
        logs()
    );
    assert!(took >= Duration::from_secs(20), "{took:?}");
    assert!(ok > 300, "only {ok} requests in {took:?}");
    // The outbound dialled anew after each of its renewals and each change
    // of roots, while the peer made new handshakes all along.
    let hs_after = (
        handshakes(&outbound, "outbound"),
        handshakes(&inbound, "inbound"),
    );
    assert!(
        hs_after.0 - hs_before.0 >= 7.0,
        "{hs_before:?} -> {hs_after:?}"
    );
    assert!(
        hs_after.1 - hs_before.1 >= 100.0,
        "{hs_before:?} -> {hs_after:?}"
    );
    // 5 + 2 leaf swaps and 2 bundle changes, each applied once, none refused.
    for p in [&inbound, &outbound] {
        assert_eq!(
            counter(p, "keyproof_identity_reloads_total", "ok"),
            9.0,
            "{}",
            p.metrics()
        );
        assert!(
            non_ok(p, "keyproof_identity_reloads_total").is_empty(),
            "{}",
            p.metrics()
        );
    }
    println!("files rotation: {ok} requests in {took:?}, 0 failed");

    // The removed root is refused for new handshakes, counted as unknown_ca.
    let before = inbound
        .metric("keyproof_tls_handshakes_total{direction=\"inbound\",result=\"unknown_ca\"}");
    let (code, _, _) = curl(&old_args);
    assert_ne!(code, 200);
    let after = inbound.wait_metric(
        "keyproof_tls_handshakes_total{direction=\"inbound\",result=\"unknown_ca\"}",
        before + 1.0,
    );
    assert_eq!(after, before + 1.0, "{}", inbound.metrics());
    // ...and as the proxy's own leaf it is refused too.
    m_out.publish_files(&old_crt, &old_key, &ca.bundle());
    assert_eq!(
        outbound.wait_metric(
            "keyproof_identity_reloads_total{result=\"unknown_ca\"}",
            1.0
        ),
        1.0
    );
    assert_eq!(leaf_sha(out_admin), first_cert_sha(&last.2));
}

// ---- bad material ----------------------------------------------------------

/// Expected `result`, then tls.crt, tls.key and ca.crt contents.
type Material = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>);

#[test]
fn bad_material_is_refused_counted_and_the_old_identity_keeps_serving() {
    let pki = Pki::new(TD);
    let stranger = Pki::new(TD);
    let foreign = Pki::new("elsewhere.test");
    let app = EchoApp::start();
    let (in_addr, in_admin) = (addr(), addr());
    let server = pki.issue("server", API);
    let client = pki.issue("client", WEB);
    let mut m = Mount::new(pki.path("mount"));
    let bundle = std::fs::read(&pki.bundle).unwrap();
    m.publish_files(&server.crt, &server.key, &pki.bundle);
    let proxy = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &inbound_toml(&m.identity_toml(), in_addr, app.addr, in_admin),
        in_admin,
    );
    let served = first_cert_sha(&server.crt);
    let url = format!("https://{in_addr}/after");
    let request = || {
        curl(&[
            "-k",
            "--cert",
            client.crt.to_str().unwrap(),
            "--key",
            client.key.to_str().unwrap(),
            &url,
        ])
    };
    let (code, body, _) = request();
    assert_eq!(code, 200, "{body}");

    let r = |p: &Path| std::fs::read(p).unwrap();
    let next = pki.issue("next", API);
    let expired = pki.craft("expired", &[&pki.id(API)], -7200, -3600);
    let other_root = stranger.issue("stranger", API);
    let elsewhere = foreign.issue("foreign", API);
    let other_id = pki.issue("other-id", "/ns/default/sa/other");
    // (expected result, tls.crt, tls.key, ca.crt)
    let cases: Vec<Material> = vec![
        (
            "invalid",
            b"not a certificate\n".to_vec(),
            r(&server.key),
            bundle.clone(),
        ),
        ("key_mismatch", r(&next.crt), r(&server.key), bundle.clone()),
        ("expired", r(&expired.crt), r(&expired.key), bundle.clone()),
        (
            "unknown_ca",
            r(&other_root.crt),
            r(&other_root.key),
            bundle.clone(),
        ),
        (
            "foreign_trust_domain",
            r(&elsewhere.crt),
            r(&elsewhere.key),
            r(&foreign.bundle),
        ),
        (
            "id_changed",
            r(&other_id.crt),
            r(&other_id.key),
            bundle.clone(),
        ),
        (
            "invalid",
            r(&server.crt),
            r(&server.key),
            b"garbage bundle".to_vec(),
        ),
    ];
    let mut want_invalid = 0.0;
    for (result, crt, key, ca) in cases {
        let sample = format!("keyproof_identity_reloads_total{{result=\"{result}\"}}");
        let before = proxy.metric(&sample);
        if result == "invalid" {
            want_invalid += 1.0;
        }
        m.publish(&crt, &key, &ca);
        let got = proxy.wait_metric(&sample, before + 1.0);
        assert_eq!(
            got,
            before + 1.0,
            "{result}: {}\n{}",
            proxy.metrics(),
            proxy.log_text()
        );
        assert_eq!(leaf_sha(in_admin), served, "{result}: identity changed");
        assert_eq!(
            presented_leaf(in_addr, &client.crt, &client.key),
            served,
            "{result}"
        );
        let (code, body, _) = request();
        assert_eq!(code, 200, "{result}: {body}");
    }
    assert_eq!(
        proxy.metric("keyproof_identity_reloads_total{result=\"invalid\"}"),
        want_invalid
    );
    // Refused material is counted once, not on every periodic re-read.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        proxy.metric("keyproof_identity_reloads_total{result=\"invalid\"}"),
        want_invalid
    );
    assert_eq!(
        proxy.metric("keyproof_identity_reloads_total{result=\"ok\"}"),
        0.0
    );
    let log = proxy.log_text();
    assert!(log.contains("new identity files refused"), "{log}");
    assert!(
        !log.contains("PRIVATE KEY"),
        "key material in the log:\n{log}"
    );

    // Half-written: the certificate arrives before its key. Retried, then
    // applied once the key follows; nothing is counted as refused.
    let mismatches = proxy.metric("keyproof_identity_reloads_total{result=\"key_mismatch\"}");
    m.publish(&r(&next.crt), &r(&server.key), &bundle);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(leaf_sha(in_admin), served);
    m.publish(&r(&next.crt), &r(&next.key), &bundle);
    assert_eq!(
        proxy.wait_metric("keyproof_identity_reloads_total{result=\"ok\"}", 1.0),
        1.0
    );
    assert_eq!(leaf_sha(in_admin), first_cert_sha(&next.crt));
    assert_eq!(
        presented_leaf(in_addr, &client.crt, &client.key),
        first_cert_sha(&next.crt)
    );
    assert_eq!(
        proxy.metric("keyproof_identity_reloads_total{result=\"key_mismatch\"}"),
        mismatches
    );
    let (code, body, _) = request();
    assert_eq!(code, 200, "{body}");
    // The gauges follow the certificate in use.
    let id = identity(in_admin);
    assert_eq!(
        proxy.metric("keyproof_identity_cert_expiry_timestamp_seconds"),
        id["not_after_unix"].as_f64().unwrap()
    );
    assert_eq!(
        proxy.metric("keyproof_identity_cert_issued_timestamp_seconds"),
        id["not_before_unix"].as_f64().unwrap()
    );
}

// ---- [identity.ca] ---------------------------------------------------------

struct CaServer {
    child: Child,
}

impl Drop for CaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(ca: &TestCa, port: u16) -> CaServer {
    let log = std::fs::File::create(ca.path(&format!("serve-{port}.log"))).unwrap();
    let child = cmd("keyproof-ca")
        .args(["serve", "--ttl", "10s", "--rate-limit", "0", "--dir"])
        .arg(&ca.dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        // Its own admin port: the default 9090 would collide across tests.
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start keyproof-ca serve");
    wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(20));
    CaServer { child }
}

fn ca_identity_toml(ca: &TestCa, port: u16, path: &str, name: &str) -> String {
    let token = run_ok(
        cmd("keyproof-ca")
            .args(["token", "create", "--dir"])
            .arg(&ca.dir)
            .args(["--spiffe-id", &format!("spiffe://{TD}{path}")]),
    );
    let token_file = ca.path(&format!("{name}.token"));
    std::fs::write(&token_file, token).unwrap();
    // The bootstrap bundle is a copy: the CA's own file changes under
    // rotation, and the proxy must follow the CA, not this file.
    let bootstrap = ca.path(&format!("{name}-bootstrap.pem"));
    std::fs::copy(ca.bundle(), &bootstrap).unwrap();
    format!(
        "[identity]\ntrust_bundle = {bootstrap:?}\n[identity.ca]\nurl = \"https://127.0.0.1:{port}\"\n\
         spiffe_id = \"spiffe://{TD}{path}\"\njoin_token_file = {token_file:?}\nbundle_refresh = \"1s\"\n"
    )
}

#[test]
fn ca_identity_renews_through_a_root_rotation_under_load_fail_no_request() {
    let ca = TestCa::new(TD);
    let port = free_port();
    let _server = serve(&ca, port);
    let app = EchoApp::start();
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let inbound = ProxyProc::start(
        ca.tmp.path(),
        "in",
        &inbound_toml(
            &ca_identity_toml(&ca, port, API, "api"),
            in_addr,
            app.addr,
            in_admin,
        ),
        in_admin,
    );
    let outbound = ProxyProc::start(
        ca.tmp.path(),
        "out",
        &outbound_toml(
            &ca_identity_toml(&ca, port, WEB, "web"),
            out_addr,
            in_addr,
            out_admin,
        ),
        out_admin,
    );
    let logs = || {
        format!(
            "--- in\n{}\n--- out\n{}\n--- serve\n{}",
            inbound.log_text(),
            outbound.log_text(),
            std::fs::read_to_string(ca.path(&format!("serve-{port}.log"))).unwrap_or_default()
        )
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    for admin in [in_admin, out_admin] {
        let left = identity(admin)["not_after_unix"].as_i64().unwrap() - now();
        assert!(left <= 11, "a 10 s certificate: {}", identity(admin));
    }
    // A peer with leaves from `keyproof-ca issue`, following the rotation
    // as a correctly configured [identity.files] sidecar would.
    let peer_id = "/ns/default/sa/peer";
    let (p_crt, p_key) = ca.issue("peer-0", peer_id, &["--ttl", "1h"]);
    let peer = Peer::new(&p_crt, &p_key, &ca.bundle());
    let hs_before = handshakes(&inbound, "inbound");
    let load = Load::start(out_addr, Some((peer.clone(), in_addr)));
    std::thread::sleep(Duration::from_secs(3));

    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "prepare", "--dir"])
            .arg(&ca.dir),
    );
    wait_until(
        "both proxies to get the old + new bundle",
        Duration::from_secs(10),
        || roots(in_admin) == 2 && roots(out_admin) == 2,
    );
    peer.use_bundle(&ca.bundle());
    std::thread::sleep(Duration::from_secs(1));
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "activate", "--dir"])
            .arg(&ca.dir),
    );
    let new_int = first_cert_sha(&ca.dir.join("intermediate.crt"));
    let on_new_chain = |admin| identity(admin)["chain"][1]["sha256"].as_str() == Some(&new_int);
    wait_until(
        "both proxies to renew from the new root",
        Duration::from_secs(15),
        || on_new_chain(in_admin) && on_new_chain(out_admin),
    );
    let (p_crt, p_key) = ca.issue("peer-1", peer_id, &["--ttl", "1h"]);
    peer.use_cert(&p_crt, &p_key);
    // Nothing unexpired chains only to the old root any more but the CA
    // server's own certificate, which it replaces on the next request.
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "finish", "--force", "--dir"])
            .arg(&ca.dir),
    );
    wait_until(
        "both proxies to drop the old root",
        Duration::from_secs(10),
        || roots(in_admin) == 1 && roots(out_admin) == 1,
    );
    peer.use_bundle(&ca.bundle());
    // Renewals keep working against the new root alone.
    let renewed = |p: &ProxyProc| counter(p, "keyproof_identity_renewals_total", "ok");
    let (r_in, r_out) = (renewed(&inbound), renewed(&outbound));
    wait_until(
        "a renewal on the new root alone",
        Duration::from_secs(15),
        || renewed(&inbound) > r_in && renewed(&outbound) > r_out,
    );
    // A new mesh connection from the outbound presents its current leaf
    // (renewals are frequent, so it may have just been replaced).
    let before = leaf_sha(out_admin);
    let seen = client_leaf_seen(out_addr, LATE);
    assert!(seen == before || seen == leaf_sha(out_admin), "{seen}");
    load.run_until(Duration::from_secs(20));
    let (ok, failures, took) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed requests: {failures:?}\n{}",
        failures.len(),
        logs()
    );
    assert!(ok > 300, "only {ok} requests in {took:?}");
    for p in [&inbound, &outbound] {
        assert!(renewed(p) >= 3.0, "{}", p.metrics());
        assert!(
            non_ok(p, "keyproof_identity_renewals_total").is_empty(),
            "{}\n{}",
            p.metrics(),
            logs()
        );
        let log = p.log_text();
        assert!(!log.contains("PRIVATE KEY"), "{log}");
    }
    let hs_after = handshakes(&inbound, "inbound");
    assert!(hs_after - hs_before >= 100.0, "{hs_before} -> {hs_after}");
    println!("[identity.ca] rotation: {ok} requests in {took:?}, 0 failed");
}

/// A proxy started without waiting for `/ready`.
struct Unready {
    child: Child,
    log: PathBuf,
}

impl Drop for Unready {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ready_only_once_a_certificate_is_held() {
    let ca = TestCa::new(TD);
    let port = free_port();
    let app = EchoApp::start();
    let (in_addr, in_admin) = (addr(), addr());
    let cfg = ca.path("in.toml");
    std::fs::write(
        &cfg,
        inbound_toml(
            &ca_identity_toml(&ca, port, API, "api"),
            in_addr,
            app.addr,
            in_admin,
        ),
    )
    .unwrap();
    let log = ca.path("in.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(keyproof_tests::bin("keyproof-proxy"))
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let p = Unready { child, log };
    let text = || std::fs::read_to_string(&p.log).unwrap_or_default();
    wait_for_port(in_admin, Duration::from_secs(10));
    // The CA is down: not ready, no identity, the inbound not bound.
    let renewals = |result: &str| -> f64 {
        let (_, m) = http_get(in_admin, "/metrics").unwrap();
        m.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "keyproof_identity_renewals_total{{result=\"{result}\"}} "
                ))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    wait_until("a failed bootstrap", Duration::from_secs(5), || {
        renewals("ca_unreachable") >= 1.0
    });
    // No certificate, no expiry gauge: a 0 would page as a certificate
    // that expired in 1970 (KeyproofCertExpiringSoon) on every pod waiting
    // for the CA.
    let (_, m) = http_get(in_admin, "/metrics").unwrap();
    for g in [
        "keyproof_identity_cert_expiry_timestamp_seconds",
        "keyproof_identity_cert_issued_timestamp_seconds",
    ] {
        assert!(
            !m.contains(&format!("\n{g} ")),
            "{g} before a certificate:\n{m}"
        );
    }
    for _ in 0..3 {
        let (code, body) = http_get(in_admin, "/ready").unwrap();
        assert_eq!(code, 503, "{body}");
        assert_eq!(http_get(in_admin, "/identity").unwrap().0, 503);
        assert!(
            std::net::TcpStream::connect(in_addr).is_err(),
            "inbound bound early"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(renewals("ok"), 0.0);
    // The CA comes up; the proxy bootstraps on its next retry.
    let _server = serve(&ca, port);
    wait_until("ready after bootstrap", Duration::from_secs(20), || {
        matches!(http_get(in_admin, "/ready"), Ok((200, _)))
    });
    assert_eq!(renewals("ok"), 1.0, "{}", text());
    assert_eq!(
        identity(in_admin)["spiffe_id"].as_str(),
        Some(format!("spiffe://{TD}{API}").as_str())
    );
    let (_, m) = http_get(in_admin, "/metrics").unwrap();
    let expiry = m
        .lines()
        .find_map(|l| l.strip_prefix("keyproof_identity_cert_expiry_timestamp_seconds "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(expiry, identity(in_admin)["not_after_unix"].as_f64(), "{m}");
    let client = ca.issue("client", WEB, &[]);
    let (code, body, _) = curl(&[
        "-k",
        "--cert",
        client.0.to_str().unwrap(),
        "--key",
        client.1.to_str().unwrap(),
        &format!("https://{in_addr}/hello"),
    ]);
    assert_eq!(code, 200, "{body}\n{}", text());
    // The key was generated in memory: nothing but the config, token and
    // bootstrap bundle next to it, and nothing secret in the log.
    assert!(!text().contains("PRIVATE KEY"));
}

#[test]
fn ca_identity_config_is_checked_and_errors_name_the_key() {
    let ca = TestCa::new(TD);
    let port = free_port();
    let base = inbound_toml(
        &ca_identity_toml(&ca, port, API, "api"),
        addr(),
        addr(),
        addr(),
    );
    let check = |name: &str, text: &str| {
        let p = ca.path(name);
        std::fs::write(&p, text).unwrap();
        keyproof_tests::run(
            cmd("keyproof-proxy")
                .arg("check-config")
                .arg("--config")
                .arg(&p),
        )
    };
    let out = check("ok.toml", &base);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("will be obtained from"), "{stdout}");
    for (name, text, want) in [
        (
            "url",
            base.replace("https://127.0.0.1", "http://127.0.0.1"),
            "identity.ca.url: ",
        ),
        (
            "id",
            base.replace(
                &format!("spiffe_id = \"spiffe://{TD}"),
                "spiffe_id = \"https://elsewhere",
            ),
            "identity.ca.spiffe_id: ",
        ),
        (
            "both",
            base.replace(
                "[identity.ca]",
                "[identity.files]\ncert = \"c\"\nkey = \"k\"\n[identity.ca]",
            ),
            "mutually exclusive",
        ),
        (
            "bundle",
            base.replace("api-bootstrap.pem", "missing.pem"),
            "identity.trust_bundle: cannot read",
        ),
    ] {
        let out = check(&format!("{name}.toml"), &text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {text}");
        assert!(err.contains(want), "{name}: expected {want:?} in {err}");
    }
}
