//! Step-up (`stepup-v1`) wired into the real sidecars: an app's plain POST
//! through the mesh, interop with an independent RFC 9421 implementation
//! (Python `http-message-signatures`) in both directions, and attacks
//! against the real inbound, each refused with the right `result` counted on
//! `/metrics`. The library's own tests cover the full attack matrix at unit
//! level; these prove the wiring.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyproof_stepup::{unix_now, Peer, RequestView, StepUpConfig, Verifier};
use keyproof_tests::free_port;
use keyproof_tests::proxy_support::*;
use keyproof_tests::stepup_caller::Caller;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject;
use serde_json::{json, Value};

const TD: &str = "stepup.test";
const AUTHORITY: &str = "api.default.svc";

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `/admin` and `/super` demand step-up from web (and ops on `/admin`);
/// `/ops` demands step-up but only admits ops; `/plain` has no step-up;
/// `/slow` (the app answers it after two seconds) demands it from web.
fn inbound_config(
    pki: &Pki,
    server: &Cert,
    listen: SocketAddr,
    app: SocketAddr,
    admin: SocketAddr,
) -> String {
    let web = pki.id("/ns/default/sa/web");
    let ops = pki.id("/ns/ops/sa/admin");
    format!(
        "{}[inbound]\nlisten = \"{listen}\"\napp = \"{app}\"\n\
         [[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"{web}\", \"{ops}\"]\nstep_up = true\n\
         [[inbound.routes]]\npath_prefix = \"/super\"\nallow = [\"{web}\"]\nstep_up = true\n\
         [[inbound.routes]]\npath_prefix = \"/ops\"\nallow = [\"{ops}\"]\nstep_up = true\n\
         [[inbound.routes]]\npath_prefix = \"/plain\"\nallow = [\"{web}\"]\n\
         [[inbound.routes]]\npath_prefix = \"/slow\"\nallow = [\"{web}\"]\nstep_up = true\n\
         [admin]\nlisten = \"{admin}\"\n",
        identity_toml(&pki.bundle, server)
    )
}

fn outbound_config(
    pki: &Pki,
    client: &Cert,
    listen: SocketAddr,
    admin: SocketAddr,
    upstreams: &[(&str, SocketAddr)],
) -> String {
    // Re-read every second: one test hot-reloads the outbound's identity.
    let identity = identity_toml(&pki.bundle, client).replacen(
        "[identity]\n",
        "[identity]\nreload_interval = \"1s\"\n",
        1,
    );
    let mut s = format!(
        "{identity}[outbound]\nlisten = \"{listen}\"\nconnect_timeout = \"2s\"\n[outbound.stepup]\nmax_body = 200000\n"
    );
    for (host, a) in upstreams {
        s.push_str(&format!(
            "[[outbound.upstreams]]\nhost = \"{host}\"\naddress = \"{a}\"\nidentity = \"{}\"\n",
            pki.id("/ns/default/sa/api")
        ));
    }
    s.push_str(&format!("[admin]\nlisten = \"{admin}\"\n"));
    s
}

fn stepup_metric(p: &ProxyProc, result: &str) -> f64 {
    p.metric(&format!(
        "keyproof_stepup_verifications_total{{result=\"{result}\"}}"
    ))
}

fn post_via(out: SocketAddr, path: &str, extra: &[&str]) -> (u16, String) {
    let url = format!("http://{AUTHORITY}{path}");
    let proxy = format!("http://{out}");
    let mut args = vec!["-x", proxy.as_str(), "-H", "content-type: application/json"];
    args.extend_from_slice(extra);
    if !extra.contains(&"--data-binary") {
        args.extend_from_slice(&["-d", "{\"a\":1}"]);
    }
    args.push(url.as_str());
    let (code, body, _) = curl(&args);
    (code, body)
}

fn assert_no_stepup_headers(body: &str) {
    for h in [
        "signature:",
        "signature-input:",
        "stepup-binding:",
        "accept-signature:",
    ] {
        assert!(
            !body.lines().any(|l| l.starts_with(h)),
            "{h} reached the app:\n{body}"
        );
    }
}

fn promtool_clean(exposition: &str) {
    if !keyproof_tests::have("promtool") {
        eprintln!("skipping promtool check metrics: promtool not installed");
        return;
    }
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{exposition}"
    );
}

/// The echo app behind api's inbound ([`inbound_config`]), and web's
/// outbound to it.
struct Mesh {
    app: EchoApp,
    web: Cert,
    in_cfg: String,
    in_admin: SocketAddr,
    out_addr: SocketAddr,
    inb: ProxyProc,
    outbound: ProxyProc,
}

fn mesh(pki: &Pki) -> Mesh {
    mesh_with(pki, "")
}

/// [`mesh`], with more TOML for the inbound.
fn mesh_with(pki: &Pki, inbound_extra: &str) -> Mesh {
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let in_cfg = inbound_config(pki, &server, in_addr, app.addr, in_admin) + inbound_extra;
    let inb = ProxyProc::start(pki.tmp.path(), "in", &in_cfg, in_admin);
    let outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &outbound_config(pki, &web, out_addr, out_admin, &[(AUTHORITY, in_addr)]),
        out_admin,
    );
    Mesh {
        app,
        web,
        in_cfg,
        in_admin,
        out_addr,
        inb,
        outbound,
    }
}

#[test]
fn mesh_post_passes_step_up_in_one_round_trip_and_survives_a_restart() {
    let pki = Pki::new(TD);
    let Mesh {
        app: _app,
        web,
        in_cfg,
        in_admin,
        out_addr,
        inb,
        outbound,
    } = mesh(&pki);
    // Every result is exported from the start.
    let m = inb.metrics();
    for r in [
        "ok",
        "missing",
        "malformed",
        "bad_alg",
        "keyid_mismatch",
        "bad_nonce",
        "expired",
        "binding_mismatch",
        "digest_mismatch",
        "bad_signature",
        "replay",
    ] {
        assert!(
            m.contains(&format!(
                "keyproof_stepup_verifications_total{{result=\"{r}\"}} 0"
            )),
            "{r} not pre-initialised:\n{m}"
        );
    }
    assert!(m.contains("keyproof_stepup_nonce_capacity 100000"), "{m}");
    assert!(
        m.contains("keyproof_stepup_challenges_total{reason=\"always\",route=\"/admin\"} 0"),
        "{m}"
    );

    // The app's plain POST, five times: the first is challenged and answered
    // by the outbound, the rest are signed up front with the kept nonce.
    const N: usize = 5;
    for i in 0..N {
        let (code, body) = post_via(out_addr, "/admin/rotate?x=1", &[]);
        assert_eq!(
            code,
            200,
            "request {i}: {body}\n{}\n{}",
            outbound.log_text(),
            inb.log_text()
        );
        assert!(body.starts_with("POST /admin/rotate HTTP/1.1"), "{body}");
        assert!(body.contains("x-keyproof-step-up: verified\n"), "{body}");
        assert!(body.contains("body-bytes: 7\n"), "{body}");
        assert!(body.contains(&format!("host: {AUTHORITY}\n")), "{body}");
        assert_no_stepup_headers(&body);
    }
    assert_eq!(
        inb.metric("keyproof_stepup_challenges_total{reason=\"always\",route=\"/admin\"}"),
        1.0,
        "steady state must not be re-challenged"
    );
    assert_eq!(stepup_metric(&inb, "missing"), 1.0);
    assert_eq!(stepup_metric(&inb, "ok"), N as f64);
    // One round trip per request in steady state: N app requests reached
    // the inbound as N + 1 requests (the single challenge).
    let in_2xx = inb.metric("keyproof_requests_total{code=\"2xx\",direction=\"inbound\"}");
    let in_4xx = inb.metric("keyproof_requests_total{code=\"4xx\",direction=\"inbound\"}");
    assert_eq!((in_2xx, in_4xx), (N as f64, 1.0));
    assert_eq!(
        outbound.metric("keyproof_stepup_signatures_total{result=\"ok\"}"),
        N as f64
    );

    // Concurrent requests on the one mesh connection: each takes its own
    // kept nonce or is challenged; none is refused for a full nonce table.
    let handles: Vec<_> = (0..12)
        .map(|_| std::thread::spawn(move || post_via(out_addr, "/admin/rotate?x=1", &[])))
        .collect();
    for h in handles {
        let (code, body) = h.join().unwrap();
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(inb.metric("keyproof_stepup_nonce_table_full_total"), 0.0);
    assert_eq!(stepup_metric(&inb, "ok"), (N + 12) as f64);
    for r in ["replay", "bad_nonce", "binding_mismatch", "expired"] {
        assert_eq!(stepup_metric(&inb, r), 0.0, "{r}");
    }

    // Hot reload of the outbound's identity (same SPIFFE ID, new key). The
    // mesh connection made before it is authenticated with the old key, so
    // the inbound's challenges and kept nonces name that key: they are
    // signed with it, never refused as someone else's.
    let web2 = pki.issue("web2", "/ns/default/sa/web");
    let (crt2, key2) = (
        std::fs::read(&web2.crt).unwrap(),
        std::fs::read(&web2.key).unwrap(),
    );
    std::fs::write(&web.key, key2).unwrap();
    std::fs::write(&web.crt, crt2).unwrap();
    let reloads = outbound.wait_metric("keyproof_identity_reloads_total{result=\"ok\"}", 1.0);
    assert!(
        reloads >= 1.0,
        "identity not reloaded:\n{}",
        outbound.log_text()
    );
    for _ in 0..3 {
        let (code, body) = post_via(out_addr, "/admin/rotate?x=1", &[]);
        assert_eq!(code, 200, "after reload: {body}\n{}", outbound.log_text());
    }
    for r in ["keyid_mismatch", "rejected", "no_key"] {
        assert_eq!(
            outbound.metric(&format!(
                "keyproof_stepup_signatures_total{{result=\"{r}\"}}"
            )),
            0.0,
            "{r}"
        );
    }

    // The exposition, step-up families included, passes promtool's lint.
    promtool_clean(&inb.metrics());
    promtool_clean(&outbound.metrics());

    // A route without step-up is untouched; a caller-sent verified header is dropped.
    let (code, body) = post_via(
        out_addr,
        "/plain/x",
        &["-H", "x-keyproof-step-up: verified"],
    );
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("x-keyproof-step-up"), "{body}");

    // A first request with a 100 KiB body to a new step-up path is replayed
    // from the outbound's copy after the challenge.
    let big = pki.path("big.bin");
    std::fs::write(&big, vec![b'x'; 100 * 1024]).unwrap();
    let at_big = format!("@{}", big.display());
    let (code, body) = post_via(out_addr, "/admin/upload", &["--data-binary", &at_big]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("body-bytes: 102400\n") && body.contains("x-keyproof-step-up: verified\n"),
        "{body}"
    );
    // Larger than [outbound.stepup] max_body: a clear 413, not a silent failure.
    let huge = pki.path("huge.bin");
    std::fs::write(&huge, vec![b'y'; 300 * 1024]).unwrap();
    let at_huge = format!("@{}", huge.display());
    let (code, body) = post_via(out_addr, "/admin/upload", &["--data-binary", &at_huge]);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("outbound.stepup.max_body"), "{body}");

    // Restart the inbound: its nonces are gone with its MAC key. The app
    // simply gets 200 (the outbound is challenged again and answers).
    drop(inb);
    let inb = ProxyProc::start(pki.tmp.path(), "in2", &in_cfg, in_admin);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..2 {
        let (code, body) = post_via(out_addr, "/admin/rotate?x=1", &[]);
        assert_eq!(code, 200, "after restart: {body}\n{}", outbound.log_text());
        assert!(body.contains("x-keyproof-step-up: verified\n"), "{body}");
    }
    assert_eq!(stepup_metric(&inb, "ok"), 2.0);
    assert_eq!(
        inb.metric("keyproof_stepup_challenges_total{reason=\"always\",route=\"/admin\"}"),
        1.0
    );
}

// ---- a direct mTLS caller (the attacker's view) ---------------------------

async fn caller(inbound: SocketAddr, pki: &Pki, cert: &Cert) -> Caller {
    Caller::connect(inbound, pki, cert, AUTHORITY).await
}

/// Requests to a step-up route that the app takes its time to answer, all
/// at once, bodiless (GET) and with a small body: how many got 200, and the
/// other answers.
fn at_once(out: SocketAddr, n: usize) -> (usize, Vec<(u16, String)>) {
    let url = format!("http://{AUTHORITY}/slow");
    let proxy = format!("http://{out}");
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let (url, proxy) = (url.clone(), proxy.clone());
        handles.push(std::thread::spawn(move || {
            let mut args = vec!["-x", proxy.as_str()];
            if i % 4 == 0 {
                args.extend_from_slice(&["-d", "{\"a\":1}"]);
            }
            args.push(url.as_str());
            let (code, body, _) = curl(&args);
            (code, body)
        }));
    }
    let answers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = answers.iter().filter(|(c, _)| *c == 200).count();
    (ok, answers.into_iter().filter(|(c, _)| *c != 200).collect())
}

#[test]
fn many_concurrent_step_up_requests_of_one_caller_all_pass_and_leave_no_nonce_behind() {
    // `/slow` answers after two seconds: every request is in flight at the
    // inbound at once. A bodiless request used to hold `max_body` of
    // `max_buffered` until answered (a caller's quarter: 16 of 1 MiB, the
    // defaults), so the rest got 503, and the nonce each carried stayed
    // outstanding for its life: past 64 per caller (the default then),
    // every request was 429 for 30 s.
    let pki = Pki::new(TD);
    let m = mesh(&pki);
    let (out_addr, inb) = (m.out_addr, &m.inb);
    const N: usize = 40;
    // The first wave is challenged (the path is new to the outbound); the
    // second is signed up front with the nonces the first brought back.
    for wave in ["challenged", "signed up front"] {
        let (ok, others) = at_once(out_addr, N);
        assert_eq!(
            ok,
            N,
            "{wave}: {} of {N} refused, e.g. {:?}\n{}",
            others.len(),
            others.first(),
            inb.log_text()
        );
    }
    assert_eq!(stepup_metric(inb, "ok"), (2 * N) as f64);
    assert_eq!(inb.metric("keyproof_stepup_nonce_table_full_total"), 0.0);
    assert_eq!(inb.metric("keyproof_stepup_body_budget_full_total"), 0.0);
    assert!(
        inb.metric("keyproof_stepup_nonces_outstanding") <= N as f64,
        "{}",
        inb.metrics()
    );
}

#[test]
fn renewing_the_callers_certificate_under_step_up_load_fails_nothing_and_strands_no_nonce() {
    // Each renewal makes the caller's sidecar dial a new mesh connection;
    // the nonces it kept for the old one (about one per request in flight)
    // used to count against the caller's bound until they expired (round
    // 9 F1: 28,037 of 34,246 requests 429 over five renewals). A bound of
    // 24 with 8 requests in flight: three renewals used to reach it.
    const WORKERS: usize = 8;
    let pki = Pki::new(TD);
    let m = mesh_with(&pki, "[inbound.stepup]\nmax_outstanding_per_peer = 24\n");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (stop, out) = (stop.clone(), m.out_addr);
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                let mut sent = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (code, body) = post_via(out, "/admin/rotate", &[]);
                    sent += 1;
                    if code != 200 {
                        failed.push((code, body));
                    }
                }
                (sent, failed)
            })
        })
        .collect();
    for i in 0..3 {
        std::thread::sleep(Duration::from_secs(3));
        let next = pki.issue(&format!("web-{i}"), "/ns/default/sa/web");
        write_renamed(&m.web.key, &std::fs::read_to_string(&next.key).unwrap());
        write_renamed(&m.web.crt, &std::fs::read_to_string(&next.crt).unwrap());
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sent, mut failed) = (0, Vec::new());
    for w in workers {
        let (s, f) = w.join().unwrap();
        sent += s;
        failed.extend(f);
    }
    assert!(
        m.outbound
            .metric("keyproof_identity_reloads_total{result=\"ok\"}")
            >= 3.0,
        "{}",
        m.outbound.log_text()
    );
    assert!(
        failed.is_empty(),
        "{} of {sent} failed, e.g. {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(m.inb.metric("keyproof_stepup_nonce_table_full_total"), 0.0);
    // Idle now: what is outstanding is the live connection's kept pool.
    let outstanding = m.inb.metric("keyproof_stepup_nonces_outstanding");
    assert!(outstanding <= WORKERS as f64, "{outstanding} outstanding");
}

#[test]
fn attacks_against_the_real_inbound_are_refused_and_counted() {
    let pki = Pki::new(TD);
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let ops = pki.issue("ops", "/ns/ops/sa/admin");
    let (in_addr, in_admin) = (addr(), addr());
    let in_cfg = inbound_config(&pki, &server, in_addr, app.addr, in_admin);
    let mut inbound = ProxyProc::start(pki.tmp.path(), "in", &in_cfg, in_admin);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let (old_nonce, captured) = rt.block_on(async {
        // Challenge, sign, accepted; the response carries the next nonce.
        let mut c1 = caller(in_addr, &pki, &web).await;
        let a = c1.send("/admin/rotate", &HeaderMap::new()).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(a.www(), "StepUp error=\"stepup_required\"");
        assert_eq!(a.headers.get("cache-control").unwrap(), "no-store");
        let signed = c1.sign(&a.challenge(), "/admin/rotate");
        let ok = c1.send("/admin/rotate", &signed).await;
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(ok.headers.get("cache-control").unwrap(), "no-store");
        let next = ok.challenge();

        // 1. The captured signed request replayed on the same connection.
        let r = c1.send("/admin/rotate", &signed).await;
        assert_eq!(
            (r.status, r.www()),
            (
                StatusCode::UNAUTHORIZED,
                "StepUp error=\"replay\"".to_owned()
            )
        );
        assert!(
            r.headers.contains_key("accept-signature"),
            "a refusal carries a fresh challenge"
        );

        // 2. On another connection of the same identity: bound to the first.
        let mut c2 = caller(in_addr, &pki, &web).await;
        let r = c2.send("/admin/rotate", &signed).await;
        assert_eq!(r.www(), "StepUp error=\"binding_mismatch\"");

        // 3. From another identity (allowed on the route).
        let mut c3 = caller(in_addr, &pki, &ops).await;
        let r = c3.send("/admin/rotate", &signed).await;
        assert_eq!(r.www(), "StepUp error=\"keyid_mismatch\"");

        // 4. A nonce issued for route /admin used on route /super.
        let cross = c1.sign(&next, "/super/x");
        let r = c1.send("/super/x", &cross).await;
        assert_eq!(r.www(), "StepUp error=\"bad_nonce\"");
        // ... while the same nonce is still good on its own route.
        let good = c1.sign(&next, "/admin/rotate");
        assert_eq!(c1.send("/admin/rotate", &good).await.status, StatusCode::OK);

        // 5. A caller not allowed on a step-up route: 403, never a challenge.
        let r = c1.send("/ops/x", &HeaderMap::new()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(!r.headers.contains_key("accept-signature"));

        // A correctly signed body over [inbound.stepup] max_body: 413 with
        // the reason, never forwarded (the nonce stays unused).
        let big = Bytes::from(vec![b'z'; (1 << 20) + 1]);
        let ch = c1
            .send("/admin/rotate", &HeaderMap::new())
            .await
            .challenge();
        let h = c1.sign_body(&ch, "/admin/big", &big);
        let r = c1.send_body("/admin/big", &h, big).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);

        // A nonce to try after the restart.
        let fresh = c1
            .send("/admin/rotate", &HeaderMap::new())
            .await
            .challenge();
        (fresh, signed)
    });
    assert_eq!(stepup_metric(&inbound, "ok"), 2.0);
    assert_eq!(stepup_metric(&inbound, "replay"), 1.0);
    assert_eq!(stepup_metric(&inbound, "binding_mismatch"), 1.0);
    assert_eq!(stepup_metric(&inbound, "keyid_mismatch"), 1.0);
    assert_eq!(stepup_metric(&inbound, "bad_nonce"), 1.0);
    assert_eq!(
        inbound.metric("keyproof_stepup_challenges_total{reason=\"always\",route=\"/ops\"}"),
        0.0
    );
    assert_eq!(
        inbound.metric("keyproof_authz_denied_total{route=\"/ops\"}"),
        1.0
    );
    let log = inbound.log_text();
    assert!(
        log.lines().any(|l| l.contains("result=\"replay\"")
            && l.contains("route=\"/admin\"")
            && l.contains("peer_id=spiffe://stepup.test/ns/default/sa/web")),
        "replay refusal not logged with peer and result:\n{log}"
    );
    let _ = captured;

    // 6. A restarted sidecar refuses the nonces of its previous life.
    drop(inbound);
    inbound = ProxyProc::start(pki.tmp.path(), "in2", &in_cfg, in_admin);
    rt.block_on(async {
        let mut c = caller(in_addr, &pki, &web).await;
        let stale = c.sign(&old_nonce, "/admin/rotate");
        let r = c.send("/admin/rotate", &stale).await;
        assert_eq!(r.www(), "StepUp error=\"bad_nonce\"");
        // ... and the caller is simply challenged again.
        let again = c.sign(&r.challenge(), "/admin/rotate");
        assert_eq!(c.send("/admin/rotate", &again).await.status, StatusCode::OK);
    });
    assert_eq!(stepup_metric(&inbound, "bad_nonce"), 1.0);
    assert_eq!(stepup_metric(&inbound, "ok"), 1.0);
}

// ---- interop with an independent RFC 9421 implementation -------------------

fn python() -> Option<String> {
    interop_python("http_message_signatures, OpenSSL, http_sf")
}

/// A TLS server standing in for an inbound sidecar: it challenges with the
/// real `Verifier`, records every signed request as received (before any
/// stripping) and answers 200 when the library accepts it.
struct Capture {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Value>>>,
    _rt: tokio::runtime::Runtime,
}

fn capture_server(pki: &Pki, server: &Cert) -> Capture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&server.crt)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&server.key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for r in CertificateDer::pem_file_iter(&pki.bundle).unwrap() {
        roots.add(r.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verifier = Arc::new(Verifier::new(StepUpConfig::default()).unwrap());
    let seen2 = seen.clone();
    let own = server.leaf.clone();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let own_leaf = own.clone();
            let acceptor = acceptor.clone();
            let verifier = verifier.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let (_, s) = tls.get_ref();
                let mut exporter = [0u8; 32];
                s.export_keying_material(&mut exporter, b"EXPORTER-Channel-Binding", None).unwrap();
                let leaf = s.peer_certificates().unwrap()[0].to_vec();
                let peer = Arc::new(Peer::from_cert_der(&leaf, Some(exporter)).unwrap());
                // `/foreign*` is challenged for another key (this server's own).
                let foreign = Arc::new(Peer::from_cert_der(&own_leaf, None).unwrap());
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (verifier, peer, seen) = (verifier.clone(), peer.clone(), seen.clone());
                    let foreign = foreign.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let view = RequestView::from_parts(&parts);
                        let now = unix_now();
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        if !parts.headers.contains_key("signature") {
                            let who = if parts.uri.path().starts_with("/foreign") { &foreign } else { &peer };
                            let ch = verifier.challenge(who, "/admin", view.has_content_type(), None, now).unwrap();
                            ch.apply_challenge(resp.headers_mut());
                            *resp.status_mut() = StatusCode::UNAUTHORIZED;
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let outcome = verifier.verify(&peer, "/admin", &view, &body, now);
                        seen.lock().unwrap().push(json!({
                            "method": parts.method.as_str(),
                            "url": format!("https://{}{}", view.authority.unwrap_or(""), parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")),
                            "headers": parts.headers.iter().map(|(k, v)| json!([k.as_str(), v.to_str().unwrap_or("")])).collect::<Vec<_>>(),
                            "body_b64": B64.encode(&body),
                            "exporter_b64": B64.encode(exporter),
                            "outcome": outcome.as_str(),
                        }));
                        if !outcome.is_ok() {
                            *resp.status_mut() = StatusCode::UNAUTHORIZED;
                        }
                        Ok(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Capture {
        addr,
        seen,
        _rt: rt,
    }
}

#[test]
fn outbound_never_signs_a_challenge_for_another_key() {
    let pki = Pki::new(TD);
    let web = pki.issue("web", "/ns/default/sa/web");
    let cap = capture_server(&pki, &pki.issue("capture", "/ns/default/sa/api"));
    let (out_addr, out_admin) = (addr(), addr());
    let outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &outbound_config(
            &pki,
            &web,
            out_addr,
            out_admin,
            &[("capture.default.svc", cap.addr)],
        ),
        out_admin,
    );
    let (code, text, _) = curl(&[
        "-D",
        "-",
        "-x",
        &format!("http://{out_addr}"),
        "-d",
        "{}",
        "http://capture.default.svc/foreign/x",
    ]);
    assert_eq!(code, 401, "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains("x-keyproof-step-up-error: keyid_mismatch"),
        "{text}"
    );
    assert!(lower.contains("www-authenticate: stepup"), "{text}");
    assert!(
        cap.seen.lock().unwrap().is_empty(),
        "nothing signed was sent"
    );
    assert_eq!(
        outbound.metric("keyproof_stepup_signatures_total{result=\"keyid_mismatch\"}"),
        1.0
    );
    assert_eq!(
        outbound.metric("keyproof_stepup_signatures_total{result=\"ok\"}"),
        0.0
    );
}

#[test]
fn interop_python_signs_for_the_inbound_and_verifies_the_outbound() {
    let Some(py) = python() else { return };
    let pki = Pki::new(TD);
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let (in_addr, in_admin) = (addr(), addr());
    let inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &inbound_config(&pki, &server, in_addr, app.addr, in_admin),
        in_admin,
    );

    // Python (http-message-signatures + pyOpenSSL) is the caller, straight
    // against the real inbound over mutual TLS: whether it ended with a
    // 2xx, its output, and a report for a failed assertion.
    let sign_client = |request: &[&str]| {
        let out = Command::new(&py)
            .arg(repo().join("stepup/interop/sign_client.py"))
            .args([
                "--connect",
                &in_addr.to_string(),
                "--server-name",
                "localhost",
            ])
            .arg("--cert")
            .arg(&web.crt)
            .arg("--key")
            .arg(&web.key)
            .arg("--ca")
            .arg(&pki.bundle)
            .args(request)
            .output()
            .expect("run sign_client.py");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report = format!(
            "sign_client.py:\n{stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            inbound.log_text()
        );
        (out.status.success(), stdout, report)
    };
    let (ok, stdout, report) = sign_client(&[
        "--method",
        "POST",
        "--path",
        "/admin/rotate?x=1",
        "--content-type",
        "application/json",
        "--body",
        "{\"a\":1}",
    ]);
    assert!(ok, "{report}");
    assert!(
        stdout.contains("first response: 401") && stdout.contains("signed response: 200"),
        "{stdout}"
    );
    assert!(stdout.contains("x-keyproof-step-up: verified"), "{stdout}");
    assert_eq!(stepup_metric(&inbound, "ok"), 1.0);

    // RFC 9421 signs `@path` as sent: a target the inbound normalizes
    // (`//`, `%7E`, a dot segment) verifies as the caller signed it.
    let (ok, stdout, report) = sign_client(&[
        "--method",
        "POST",
        "--path",
        "/admin//x/./%7Euser?x=1",
        "--body",
        "{}",
    ]);
    assert!(
        ok && stdout.contains("signed response: 200"),
        "a signature over the path as sent failed: {report}"
    );
    assert_eq!(stepup_metric(&inbound, "ok"), 2.0);

    // The other way: the outbound sidecar signs; a capturing server records
    // the request as it arrives; Python verifies it.
    let cap = capture_server(&pki, &pki.issue("capture", "/ns/default/sa/api"));
    let (out_addr, out_admin) = (addr(), addr());
    let outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &outbound_config(
            &pki,
            &web,
            out_addr,
            out_admin,
            &[("capture.default.svc", cap.addr)],
        ),
        out_admin,
    );
    let (code, body, _) = curl(&[
        "-x",
        &format!("http://{out_addr}"),
        "-H",
        "content-type: application/json",
        "-d",
        "{\"rotate\":true}",
        "http://capture.default.svc/admin/rotate?x=1&y=two",
    ]);
    assert_eq!(code, 200, "{body}\n{}", outbound.log_text());
    let seen = cap.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let mut captured = seen[0].clone();
    assert_eq!(captured["outcome"], "ok", "{captured}");
    let exporter = captured["exporter_b64"].as_str().unwrap().to_owned();
    captured["cert_pem"] = json!(keyproof_identity::keys::cert_pem(&web.leaf));
    let file = pki.path("captured.json");
    std::fs::write(&file, captured.to_string()).unwrap();
    let v = Command::new(&py)
        .arg(repo().join("stepup/interop/verify.py"))
        .arg(&file)
        .args(["--exporter-b64", &exporter])
        .output()
        .expect("run verify.py");
    let vout = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.status.success() && vout.starts_with("OK "),
        "verify.py refused the outbound's signature:\n{vout}\n{}",
        String::from_utf8_lossy(&v.stderr)
    );
    // A tampered copy fails in Python too (the check can fail).
    let mut tampered = captured.clone();
    tampered["body_b64"] = json!(B64.encode(b"{\"rotate\":false}"));
    std::fs::write(&file, tampered.to_string()).unwrap();
    let v = Command::new(&py)
        .arg(repo().join("stepup/interop/verify.py"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !v.status.success(),
        "{}",
        String::from_utf8_lossy(&v.stdout)
    );
}
