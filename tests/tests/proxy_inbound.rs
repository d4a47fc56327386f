//! The inbound sidecar against real clients (curl, openssl s_client):
//! mutual TLS, refusals counted by reason, x-forwarded-client-cert, route
//! policy, fail-closed step-up, app down.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyproof_tests::proxy_support::*;
use keyproof_tests::{free_port, have};

const TD: &str = "prod.test";

struct Setup {
    pki: Pki,
    app: EchoApp,
    proxy: ProxyProc,
    port: u16,
    web: Cert,
}

fn setup(extra_bundle: Option<&Pki>, routes: &str, app: Option<SocketAddr>) -> Setup {
    let pki = Pki::new(TD);
    let echo = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let mut bundle = pki.bundle.clone();
    if let Some(other) = extra_bundle {
        // Federation-like bundle: trust another domain's root too, so its
        // certificates chain and only the trust-domain check can refuse them.
        bundle = pki.path("bundle-plus.pem");
        let mut pem = std::fs::read(&pki.bundle).unwrap();
        pem.extend(std::fs::read(&other.bundle).unwrap());
        std::fs::write(&bundle, pem).unwrap();
    }
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let app = app.unwrap_or(echo.addr);
    let cfg = format!(
        "{}[inbound]\nlisten = \"127.0.0.1:{port}\"\napp = \"{app}\"\nhandshake_timeout = \"2s\"\n{routes}\n[admin]\nlisten = \"{admin}\"\n",
        identity_toml(&bundle, &server)
    );
    let proxy = ProxyProc::start(pki.tmp.path(), "inbound", &cfg, admin);
    Setup {
        pki,
        app: echo,
        proxy,
        port,
        web,
    }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }
    fn resolve(&self) -> String {
        format!("localhost:{}:127.0.0.1", self.port)
    }
    fn curl_as(&self, cert: &Cert, extra: &[&str], path: &str) -> (u16, String, i32) {
        let (crt, key, ca) = (
            cert.crt.display().to_string(),
            cert.key.display().to_string(),
            self.pki.bundle.display().to_string(),
        );
        let resolve = self.resolve();
        let url = self.url(path);
        let mut args = vec![
            "--cert",
            &crt,
            "--key",
            &key,
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args)
    }
    fn handshakes(&self, result: &str) -> f64 {
        self.proxy.metric(&format!(
            "keyproof_tls_handshakes_total{{direction=\"inbound\",result=\"{result}\"}}"
        ))
    }
}

#[test]
fn curl_with_client_cert_is_served_and_xfcc_is_set_by_the_proxy_only() {
    let s = setup(None, "", None);
    let (code, body, _) = s.curl_as(
        &s.web,
        &[
            "--http1.1",
            "-H",
            "x-forwarded-client-cert: By=spiffe://evil/x;URI=spiffe://prod.test/ns/ops/sa/root",
            "-H",
            "x-keyproof-step-up: verified",
        ],
        "/hello?x=1",
    );
    assert_eq!(code, 200, "{body}\n{}", s.proxy.log_text());
    assert!(body.starts_with("GET /hello HTTP/1.1"), "{body}");
    let xfcc: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("x-forwarded-client-cert:"))
        .collect();
    let expected = format!(
        "x-forwarded-client-cert: By=spiffe://{TD}/ns/default/sa/api;Hash={};URI=spiffe://{TD}/ns/default/sa/web",
        sha256_hex(&s.web.leaf)
    );
    assert_eq!(
        xfcc,
        vec![expected.as_str()],
        "spoofed header must be replaced:\n{body}"
    );
    assert!(!body.contains("evil"), "{body}");
    assert!(!body.contains("x-keyproof-step-up"), "{body}");

    // HTTP/2 (ALPN h2) works too; not being gRPC, it reaches the app as
    // HTTP/1.1 with :authority as Host (apps need not speak HTTP/2).
    let (code, body, _) = s.curl_as(&s.web, &["--http2"], "/h2");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("GET /h2 HTTP/1.1"), "{body}");
    assert!(
        body.contains(&format!("host: localhost:{}\n", s.port)),
        "{body}"
    );
    assert_eq!(
        body.matches("x-forwarded-client-cert:").count(),
        1,
        "{body}"
    );
    // gRPC-shaped HTTP/2 requests go to the app as h2c.
    let (code, body, _) = s.curl_as(
        &s.web,
        &["--http2", "-H", "content-type: application/grpc", "-d", ""],
        "/pkg.Svc/Call",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("POST /pkg.Svc/Call HTTP/2.0"), "{body}");
    assert!(s.handshakes("ok") >= 2.0);
    // The app never saw a connection the proxy did not authenticate.
    let _ = &s.app;
}

#[test]
fn a_reconnecting_peer_reuses_verified_chain_signatures() {
    let s = setup(None, "", None);
    let cache = |r: &str| {
        s.proxy.metric(&format!(
            "keyproof_tls_chain_signature_cache_total{{result=\"{r}\"}}"
        ))
    };
    let (code, body, _) = s.curl_as(&s.web, &[], "/first");
    assert_eq!(code, 200, "{body}");
    let (hits, misses) = (cache("hit"), cache("miss"));
    // The first connection verified web's leaf signature (a miss).
    assert!(misses >= 1.0, "{}", s.proxy.metrics());
    // A new connection with the same chain: its two chain signatures (leaf
    // by intermediate, intermediate by root) come from the cache, and
    // nothing new is computed. The handshake itself is full (CertificateVerify
    // is still checked: see the test below with a mismatched key).
    let (code, body, _) = s.curl_as(&s.web, &[], "/second");
    assert_eq!(code, 200, "{body}");
    assert_eq!(cache("hit"), hits + 2.0, "{}", s.proxy.metrics());
    assert_eq!(cache("miss"), misses, "{}", s.proxy.metrics());
    assert_eq!(s.handshakes("ok"), 2.0);

    // The cached chain proves nothing about key possession: web's
    // certificate presented with another workload's key is refused.
    let thief = Cert {
        key: s.pki.issue("thief", "/ns/default/sa/thief").key,
        ..s.web.clone()
    };
    let (code, _, rc) = s.curl_as(&thief, &[], "/stolen");
    assert_eq!(code, 0);
    assert_ne!(rc, 0);
    assert_eq!(s.handshakes("ok"), 2.0);
}

#[test]
fn aes_128_gcm_is_preferred_whatever_the_client_order() {
    if !have("openssl") {
        return;
    }
    let s = setup(None, "", None);
    let suite = |offered: &str| {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{}", s.port)])
            .args(["-CAfile", &s.pki.bundle.display().to_string()])
            .args(["-cert", &s.web.crt.display().to_string()])
            .args(["-key", &s.web.key.display().to_string()])
            .args(["-tls1_3", "-ciphersuites", offered, "-brief"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("Ciphersuite: "))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no ciphersuite in: {text}"))
    };
    // openssl's own order puts AES-256 first; the server's order decides.
    assert_eq!(
        suite("TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"),
        "TLS_AES_128_GCM_SHA256"
    );
    // Clients that offer only the other suites are still served.
    assert_eq!(suite("TLS_AES_256_GCM_SHA384"), "TLS_AES_256_GCM_SHA384");
    assert_eq!(
        suite("TLS_CHACHA20_POLY1305_SHA256"),
        "TLS_CHACHA20_POLY1305_SHA256"
    );
}

#[test]
fn refused_handshakes_are_counted_by_reason() {
    let foreign = Pki::new("other.test");
    let s = setup(Some(&foreign), "", None);

    // No client certificate (openssl s_client): refused, nothing served.
    if have("openssl") {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{}", s.port)])
            .args([
                "-CAfile",
                &s.pki.bundle.display().to_string(),
                "-tls1_3",
                "-quiet",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
            std::thread::sleep(Duration::from_millis(500));
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stdout.contains("HTTP/1.1 200"),
            "served without a client cert: {stdout}"
        );
        assert!(
            stderr.contains("certificate required") || stderr.contains("alert"),
            "expected a TLS alert, got: {stderr}"
        );
        assert!(
            s.proxy.wait_metric(
                "keyproof_tls_handshakes_total{direction=\"inbound\",result=\"no_client_cert\"}",
                1.0
            ) >= 1.0,
            "{}",
            s.proxy.metrics()
        );
    }

    // curl without a client certificate: refused too.
    let resolve = s.resolve();
    let ca = s.pki.bundle.display().to_string();
    let (code, _, rc) = curl(&["--cacert", &ca, "--resolve", &resolve, &s.url("/")]);
    assert_eq!(code, 0);
    assert_ne!(rc, 0);

    // Another CA with the same trust domain name: unknown_ca.
    let stranger = Pki::new(TD);
    let c = stranger.issue("stranger", "/ns/default/sa/web");
    let (code, _, _) = s.curl_as(&c, &[], "/");
    assert_eq!(code, 0);

    // Expired.
    let expired = s
        .pki
        .craft("expired", &[&s.pki.id("/ns/default/sa/web")], -7200, -3600);
    let (code, _, _) = s.curl_as(&expired, &[], "/");
    assert_eq!(code, 0);

    // Not yet valid.
    let future = s
        .pki
        .craft("future", &[&s.pki.id("/ns/default/sa/web")], 3600, 7200);
    let (code, _, _) = s.curl_as(&future, &[], "/");
    assert_eq!(code, 0);

    // Two URI SANs: not an X.509-SVID.
    let two = s.pki.craft(
        "two",
        &[
            &s.pki.id("/ns/default/sa/web"),
            &s.pki.id("/ns/ops/sa/root"),
        ],
        -60,
        3600,
    );
    let (code, _, _) = s.curl_as(&two, &[], "/");
    assert_eq!(code, 0);

    let want = [
        ("no_client_cert", 1.0),
        ("unknown_ca", 1.0),
        ("expired", 1.0),
        ("not_yet_valid", 1.0),
        ("bad_identity", 1.0),
    ];
    for (r, n) in want {
        let v = s.proxy.wait_metric(
            &format!("keyproof_tls_handshakes_total{{direction=\"inbound\",result=\"{r}\"}}"),
            n,
        );
        assert!(v >= n, "result {r}: {v}\n{}", s.proxy.metrics());
    }
    // A foreign trust domain whose root we do trust: bad_identity (the
    // second one), and the log names the peer id.
    let before = s.handshakes("bad_identity");
    let f = foreign.issue("foreign", "/ns/default/sa/web");
    let (code, _, _) = s.curl_as(&f, &[], "/");
    assert_eq!(code, 0);
    let after = s.proxy.wait_metric(
        "keyproof_tls_handshakes_total{direction=\"inbound\",result=\"bad_identity\"}",
        before + 1.0,
    );
    assert_eq!(after, before + 1.0, "{}", s.proxy.metrics());
    assert_eq!(s.handshakes("ok"), 0.0, "nothing should have been accepted");
    let log = s.proxy.log_text();
    assert!(
        log.contains("spiffe://other.test/ns/default/sa/web"),
        "{log}"
    );
    assert!(log.contains("inbound TLS handshake refused"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

#[test]
fn slow_tls_client_is_cut_at_the_handshake_timeout() {
    let s = setup(None, "", None);
    let start = Instant::now();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    use std::io::Read;
    let n = tcp.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "connection should be closed, not answered");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(s.handshakes("timeout"), 1.0);
}

#[test]
fn route_policy_by_id_prefix_and_method() {
    let routes = format!(
        "[[inbound.routes]]\npath_prefix = \"/admin\"\nmethods = [\"POST\", \"DELETE\"]\nallow = [\"spiffe://{TD}/ns/ops/*\"]\n\
         [[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"spiffe://{TD}/ns/default/sa/web\"]\n\
         [[inbound.routes]]\npath_prefix = \"/private\"\nallow = []\n\
         [[inbound.routes]]\npath_prefix = \"/privileged\"\nallow = [\"spiffe://{TD}/ns/default/sa/web\"]\nstep_up = true\n"
    );
    let s = setup(None, &routes, None);
    let ops = s.pki.issue("ops", "/ns/ops/sa/deployer");
    let web = s.web.clone();

    // Exact id on the second /admin route (GET is not in the first's methods).
    assert_eq!(s.curl_as(&web, &[], "/admin/users").0, 200);
    // POST matches the first route: only ns/ops/* may.
    let (code, body, _) = s.curl_as(&web, &["-X", "POST"], "/admin/users");
    assert_eq!(code, 403);
    assert!(body.contains("route /admin"), "{body}");
    assert_eq!(s.curl_as(&ops, &["-X", "POST"], "/admin/users").0, 200);
    assert_eq!(s.curl_as(&ops, &["-X", "DELETE"], "/admin").0, 200);
    // ops on GET /admin hits the second route, which allows only web.
    assert_eq!(s.curl_as(&ops, &[], "/admin").0, 403);
    // Prefix is segment-aware: /administrator is not /admin.
    assert_eq!(s.curl_as(&ops, &[], "/administrator").0, 200);
    // Empty allow list: nobody.
    let (code, body, _) = s.curl_as(&web, &[], "/private/x");
    assert_eq!(code, 403);
    assert!(body.contains("/private"), "{body}");
    // Default policy allow-trust-domain.
    assert_eq!(s.curl_as(&ops, &[], "/other").0, 200);
    // Step-up route: an allowed caller without a signature is challenged
    // (tests/proxy_stepup.rs covers answering it).
    let (code, body, rc) = s.curl_as(&web, &["-X", "POST", "-d", "x"], "/privileged/op");
    assert_eq!(code, 401, "curl rc {rc}: {body}\n{}", s.proxy.log_text());
    assert!(body.contains("step-up"), "{body}");
    assert!(
        !body.contains("body-bytes"),
        "must never reach the app: {body}"
    );
    // Not allowed on a step-up route: 403, never a challenge.
    assert_eq!(s.curl_as(&ops, &[], "/privileged/op").0, 403);

    assert_eq!(
        s.proxy
            .metric("keyproof_authz_denied_total{route=\"/admin\"}"),
        2.0
    );
    assert_eq!(
        s.proxy
            .metric("keyproof_authz_denied_total{route=\"/private\"}"),
        1.0
    );
    assert_eq!(
        s.proxy
            .metric("keyproof_authz_denied_total{route=\"/privileged\"}"),
        1.0
    );
    assert!(
        s.proxy
            .metric("keyproof_requests_total{code=\"4xx\",direction=\"inbound\"}")
            >= 4.0
    );
}

#[test]
fn after_sigterm_new_callers_are_served_for_the_drain_delay_then_it_stops() {
    // Kubernetes takes a terminating pod out of its Service's endpoints
    // while it delivers SIGTERM: callers keep arriving for a few seconds
    // (round 9 F2: every one was refused, the listener closed at once).
    let mut s = setup(
        None,
        &format!("[[inbound.routes]]\npath_prefix = \"/\"\nallow = [\"spiffe://{TD}/*\"]\n[runtime]\ndrain_delay = \"2s\"\n"),
        None,
    );
    assert_eq!(s.curl_as(&s.web, &[], "/before").0, 200);
    let sent = Instant::now();
    s.proxy.terminate();
    std::thread::sleep(Duration::from_millis(300));
    let (ready, body) = http_get(s.proxy.admin, "/ready").expect("admin answers");
    assert_eq!(ready, 503, "{body}");
    // A new connection, and a request on it.
    let (code, body, _) = s.curl_as(&s.web, &[], "/during");
    assert_eq!(code, 200, "{body}\n{}", s.proxy.log_text());
    let status = s.proxy.wait(Duration::from_secs(10)).expect("it stops");
    assert!(status.success(), "{status:?}");
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "stopped before the drain delay was over"
    );
    let (code, _, exit) = s.curl_as(&s.web, &[], "/after");
    assert_eq!((code, exit), (0, 7), "connection refused once stopped");
}

#[test]
fn default_deny_and_app_down() {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let s = setup(
        None,
        &format!("default_policy = \"deny\"\n[[inbound.routes]]\npath_prefix = \"/ok\"\nallow = [\"spiffe://{TD}/*\"]\n"),
        Some(dead),
    );
    let (code, body, _) = s.curl_as(&s.web, &[], "/nope");
    assert_eq!(code, 403);
    assert!(body.contains("default_policy"), "{body}");
    assert_eq!(
        s.proxy
            .metric("keyproof_authz_denied_total{route=\"default\"}"),
        1.0
    );
    let start = Instant::now();
    let (code, body, _) = s.curl_as(&s.web, &["--http1.1"], "/ok");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("app unavailable"), "{body}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // Over HTTP/2 the stream is refused instead: nothing reached the app,
    // and the caller may send the request elsewhere (curl tries again a
    // few times, then gives up: exit code 56, a failure receiving).
    let (code, _, exit) = s.curl_as(&s.web, &[], "/ok");
    assert_eq!((code, exit), (0, 56));
}

#[test]
fn admin_endpoints() {
    let s = setup(None, "", None);
    let (code, body) = http_get(s.proxy.admin, "/identity").unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["spiffe_id"], format!("spiffe://{TD}/ns/default/sa/api"));
    assert_eq!(v["trust_roots"].as_array().unwrap().len(), 1);
    assert_eq!(v["trust_roots"][0]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(http_get(s.proxy.admin, "/live").unwrap().0, 200);
    let m = s.proxy.metrics();
    for name in [
        "keyproof_tls_handshakes_total",
        "keyproof_connections_open",
        "keyproof_requests_total",
        "keyproof_request_duration_seconds",
        "keyproof_identity_cert_expiry_timestamp_seconds",
    ] {
        assert!(
            m.contains(&format!("# TYPE {name}")),
            "{name} missing:\n{m}"
        );
    }
    if have("promtool") {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A hand-written HTTP/1.1 app that counts the connections it accepts and
/// answers, all kept alive: `/len` (Content-Length), `/chunked`, `/empty`
/// (204) and `HEAD`; `/bye` answers and then closes the connection, as an
/// app closes an idle keep-alive connection.
fn counting_app() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut out = tcp.try_clone().unwrap();
                let mut r = BufReader::new(tcp);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut words = line.split_whitespace();
                    let (method, path) = (
                        words.next().unwrap_or("").to_owned(),
                        words.next().unwrap_or("").to_owned(),
                    );
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    if path == "/early" {
                        // Refuses an upload without reading it, then closes
                        // the way servers do (lingering): no more writes,
                        // the rest of the request read and dropped.
                        let _ = out.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n");
                        let _ = out.shutdown(std::net::Shutdown::Write);
                        let _ = std::io::copy(&mut r, &mut std::io::sink());
                        return;
                    }
                    let resp: &[u8] = match (method.as_str(), path.as_str()) {
                        ("HEAD", _) => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                        (_, "/until-close") => b"HTTP/1.1 200 OK\r\n\r\nuntil-close-body",
                        (_, "/bad-length") => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                        (_, "/truncated") => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
                        (_, "/trailers") => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwith\r\n0\r\nx-checksum: abc\r\n\r\n",
                        (_, "/chunked") => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n",
                        (_, "/empty") => b"HTTP/1.1 204 No Content\r\n\r\n",
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                    };
                    let last = ["/bye", "/until-close", "/bad-length", "/truncated"];
                    if out.write_all(resp).is_err() || last.contains(&path.as_str()) {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[test]
fn app_connections_are_kept_alive_and_a_closed_one_costs_no_request() {
    use std::sync::atomic::Ordering;
    let (app, accepted) = counting_app();
    let s = setup(None, "", Some(app));
    // Sequential requests of every body shape reuse one app connection:
    // each goes back to the pool when its response ends (no body at all
    // for HEAD and 204).
    for _ in 0..3 {
        for (extra, path, want_code, want_body) in [
            (&[][..], "/len", 200, "hello"),
            (&[][..], "/chunked", 200, "chunked"),
            (&[][..], "/empty", 204, ""),
            (&["-I"][..], "/len", 200, ""),
        ] {
            let (code, body, _) = s.curl_as(&s.web, extra, path);
            assert_eq!(code, want_code, "{path}: {body}\n{}", s.proxy.log_text());
            if extra.is_empty() {
                assert_eq!(body, want_body, "{path}");
            }
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one kept-alive app connection"
    );
    // The app closes the connection after this answer; the next request
    // gets a new connection and succeeds, whether the pool noticed the
    // close first or retried the request that found it.
    for round in 0..5 {
        let (code, body, _) = s.curl_as(&s.web, &[], "/bye");
        assert_eq!((code, body.as_str()), (200, "hello"), "round {round}");
        let (code, body, _) = s.curl_as(&s.web, &[], "/len");
        assert_eq!(
            (code, body.as_str()),
            (200, "hello"),
            "round {round}\n{}",
            s.proxy.log_text()
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
}

#[test]
fn app_responses_are_framed_strictly_and_broken_connections_are_not_reused() {
    use std::sync::atomic::Ordering;
    let (app, accepted) = counting_app();
    let s = setup(None, "", Some(app));
    // No length: the body runs until the app closes.
    let (code, body, _) = s.curl_as(&s.web, &[], "/until-close");
    assert_eq!((code, body.as_str()), (200, "until-close-body"));
    // Chunked with a trailer section: the data arrives, the connection is
    // kept (the next request does not count a new one).
    let (code, body, _) = s.curl_as(&s.web, &[], "/trailers");
    assert_eq!((code, body.as_str()), (200, "with"));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // Two lengths: which one ends the message is ambiguous, so neither.
    let (code, body, _) = s.curl_as(&s.web, &[], "/bad-length");
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("invalid content-length"), "{body}");
    // Shorter than declared: the caller sees a broken response, never a
    // complete-looking one.
    let (code, body, exit) = s.curl_as(&s.web, &[], "/truncated");
    assert_ne!(exit, 0, "{code} {body:?}");
    // An app that answers before reading the upload: the answer reaches
    // the caller.
    let big = s.pki.path("big.bin");
    std::fs::write(&big, vec![b'u'; 4 << 20]).unwrap();
    let upload = format!("@{}", big.display());
    let (code, body, _) = s.curl_as(&s.web, &["--data-binary", &upload], "/early");
    assert_eq!((code, body.as_str()), (413, "too big\n"));
    // Each of the last three went on the connection the one before had
    // left, or a new one, and closed it: a new one serves the next.
    let (code, body, _) = s.curl_as(&s.web, &[], "/len");
    assert_eq!((code, body.as_str()), (200, "hello"));
    assert_eq!(accepted.load(Ordering::SeqCst), 5, "{}", s.proxy.log_text());
}

#[test]
fn uploads_of_unknown_length_reach_the_app_whole_in_chunked_coding() {
    let s = setup(None, "", None);
    let big = s.pki.path("upload.bin");
    std::fs::write(&big, vec![b'c'; 3 << 20]).unwrap();
    let upload = format!("@{}", big.display());
    // HTTP/1.1 caller, chunked upload: no length for the proxy to pass on.
    let (code, body, _) = s.curl_as(
        &s.web,
        &[
            "--http1.1",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &upload,
        ],
        "/up",
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("transfer-encoding: chunked"), "{body}");
    assert!(body.contains(&format!("body-bytes: {}", 3 << 20)), "{body}");
    // HTTP/2 caller with a length: the app gets Content-Length.
    let (code, body, _) = s.curl_as(&s.web, &["--data-binary", &upload], "/up");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(&format!("content-length: {}", 3 << 20)),
        "{body}"
    );
    assert!(body.contains(&format!("body-bytes: {}", 3 << 20)), "{body}");
}

/// The handshake checks the caller's certificate once; an HTTP/2
/// connection that lives on past the certificate's expiry ends then (as a
/// new handshake with it would fail), rather than go on passing route
/// policy with an expired identity.
#[test]
fn a_connection_ends_when_its_callers_certificate_expires() {
    let s = setup(None, "", None);
    let id = s.pki.id("/ns/default/sa/web");
    let short = s.pki.craft("short", &[&id], -60, 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let addr: SocketAddr = format!("127.0.0.1:{}", s.port).parse().unwrap();
        let tls = mtls_stream(addr, &s.pki, &short, b"h2").await;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        let conn = tokio::spawn(conn);
        let get = || {
            http::Request::get("https://localhost/x")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap()
        };
        let first = send
            .send_request(get())
            .await
            .expect("served before expiry");
        assert_eq!(first.status(), 200);
        // Past the expiry (and the bounded grace of an ending connection):
        // the connection is gone, and no request on it is served.
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let later = send.send_request(get()).await;
        assert!(
            later.as_ref().map_or(true, |r| r.status() != 200),
            "served after the certificate expired: {:?}",
            later.map(|r| r.status())
        );
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
        assert!(ended.is_ok(), "the connection outlived the certificate");
    });
}
