//! A sidecar pair: app -> outbound (plaintext) -> mutual TLS -> inbound ->
//! app. Origin-form and absolute-form requests, host routing, server
//! identity checks, connection reuse, streaming bodies, graceful shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use keyproof_tests::free_port;
use keyproof_tests::proxy_support::*;

const TD: &str = "mesh.test";

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

struct Pair {
    /// Accepts TCP (via the backlog) but never speaks TLS.
    _silent: std::net::TcpListener,
    pki: Pki,
    _app: EchoApp,
    inbound: ProxyProc,
    outbound: ProxyProc,
    in_addr: SocketAddr,
    out_addr: SocketAddr,
}

fn pair(extra_inbound: &str) -> Pair {
    pair_with(extra_inbound, "")
}

fn pair_with(extra_inbound: &str, extra_outbound: &str) -> Pair {
    let pki = Pki::new(TD);
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let client = pki.issue("client", "/ns/default/sa/web");
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{}\"\n{extra_inbound}\n[admin]\nlisten = \"{in_admin}\"\n[runtime]\nshutdown_grace = \"10s\"\n",
            identity_toml(&pki.bundle, &server),
            app.addr
        ),
        in_admin,
    );
    let dead = addr();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\nconnect_timeout = \"1s\"\nhandshake_timeout = \"1s\"\n{extra_outbound}\n\
             [[outbound.upstreams]]\nhost = \"api.default.svc\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://{TD}/ns/default/sa/api\"\n\
             [[outbound.upstreams]]\nhost = \"prefix.default.svc\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://{TD}/ns/default/*\"\n\
             [[outbound.upstreams]]\nhost = \"payments.default.svc\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://{TD}/ns/default/sa/payments\"\n\
             [[outbound.upstreams]]\nhost = \"down.default.svc\"\naddress = \"{dead}\"\nidentity = \"spiffe://{TD}/ns/default/sa/api\"\n\
             [[outbound.upstreams]]\nhost = \"silent.default.svc\"\naddress = \"{silent_addr}\"\nidentity = \"spiffe://{TD}/ns/default/sa/api\"\n\
             [admin]\nlisten = \"{out_admin}\"\n",
            identity_toml(&pki.bundle, &client)
        ),
        out_admin,
    );
    Pair {
        _silent: silent,
        pki,
        _app: app,
        inbound,
        outbound,
        in_addr,
        out_addr,
    }
}

#[test]
fn origin_form_absolute_form_and_host_routing() {
    let p = pair("");
    let out = format!("http://{}", p.out_addr);
    // Origin-form with a Host header, as an app configured with the
    // sidecar's address sends.
    let (code, body, _) = curl(&["-H", "Host: api.default.svc", &format!("{out}/hello?q=1")]);
    assert_eq!(code, 200, "{body}\n{}", p.outbound.log_text());
    assert!(body.starts_with("GET /hello HTTP/1.1"), "{body}");
    assert!(body.contains("host: api.default.svc\n"), "{body}");
    assert!(
        body.contains(&format!("URI=spiffe://{TD}/ns/default/sa/web")),
        "{body}"
    );
    // Absolute-form, as HTTP_PROXY clients send. A Host that disagrees
    // with the target's authority is refused (RFC 9112 section 3.2.2 lets
    // the target win; two parties could still read different hosts).
    let (code, body, _) = curl(&[
        "-x",
        &out,
        "-H",
        "Host: spoofed.example",
        "http://api.default.svc/via-proxy",
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("disagrees"), "{body}");
    let (code, body, _) = curl(&["-x", &out, "http://api.default.svc/via-proxy"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("GET /via-proxy HTTP/1.1"), "{body}");
    assert!(body.contains("host: api.default.svc\n"), "{body}");
    assert!(
        !body.to_ascii_lowercase().contains("proxy-connection"),
        "{body}"
    );
    // Identity by prefix pattern.
    let (code, body, _) = curl(&["-x", &out, "http://prefix.default.svc/p"]);
    assert_eq!(code, 200, "{body}");
    // HTTP/2 with prior knowledge (gRPC-style apps).
    let (code, body, _) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: api.default.svc",
        &format!("{out}/h2c"),
    ]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("GET /h2c HTTP/1.1"), "{body}");
    assert!(body.contains("host: api.default.svc\n"), "{body}");
    let (code, body, _) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: api.default.svc",
        "-H",
        "content-type: application/grpc+proto",
        "-d",
        "",
        &format!("{out}/pkg.Svc/Call"),
    ]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("POST /pkg.Svc/Call HTTP/2.0"), "{body}");
    assert!(body.contains(":authority: api.default.svc\n"), "{body}");
    // Unknown host, no catch-all.
    let (code, body, _) = curl(&["-x", &out, "http://nope.example/"]);
    assert_eq!(code, 502);
    assert_eq!(body.trim(), "no upstream for host nope.example");
    // Streaming a 4 MiB upload both ways through the pair.
    let big = p.pki.path("big.bin");
    std::fs::write(&big, vec![b'x'; 4 << 20]).unwrap();
    let (code, body, _) = curl(&[
        "-x",
        &out,
        "--data-binary",
        &format!("@{}", big.display()),
        "http://api.default.svc/upload",
    ]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("body-bytes: {}", 4 << 20)), "{body}");

    // Keep-alive reuse: many requests, few handshakes.
    for i in 0..20 {
        let (code, _, _) = curl(&["-x", &out, &format!("http://api.default.svc/r{i}")]);
        assert_eq!(code, 200);
    }
    let ok = p
        .outbound
        .metric("keyproof_tls_handshakes_total{direction=\"outbound\",result=\"ok\"}");
    assert!(
        (1.0..=4.0).contains(&ok),
        "mesh connections not reused: {ok} handshakes"
    );
    assert!(
        p.outbound
            .metric("keyproof_requests_total{code=\"2xx\",direction=\"outbound\"}")
            >= 25.0
    );
    let _ = p.in_addr;
}

/// Bodies larger than the HTTP/2 windows (2 MB per stream, 5 MB per
/// connection) stream through the pair both ways, several at once, and
/// arrive whole.
#[test]
fn large_bodies_stream_both_ways_under_flow_control() {
    let p = pair("");
    let out = format!("http://{}", p.out_addr);
    const N: usize = 12_000_000;
    let upload = p.pki.path("upload.bin");
    std::fs::write(&upload, vec![7u8; N]).unwrap();
    let data = format!("@{}", upload.display());
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let (out, data) = (out.clone(), data.clone());
            std::thread::spawn(move || {
                let down = curl(&["-H", "Host: api.default.svc", &format!("{out}/bytes/{N}")]);
                let up = curl(&[
                    "-H",
                    "Host: api.default.svc",
                    "--data-binary",
                    &data,
                    &format!("{out}/upload/{i}"),
                ]);
                (down, up)
            })
        })
        .collect();
    for h in handles {
        let ((code, body, _), (up_code, up_body, _)) = h.join().unwrap();
        assert_eq!(code, 200, "{}", p.outbound.log_text());
        assert_eq!(body.len(), N, "download arrived whole");
        assert!(body.bytes().all(|b| b == b'x'));
        assert_eq!(up_code, 200, "{up_body}");
        assert!(up_body.contains(&format!("body-bytes: {N}\n")), "{up_body}");
    }
}

/// The inbound closes an idle mesh connection (GOAWAY, then FIN) between
/// one and two idle periods after its last use; the next request goes on a
/// new connection and succeeds, however the close and the request
/// interleave.
#[test]
fn an_idle_closed_mesh_connection_costs_no_request() {
    let p = pair("idle_timeout = \"1s\"");
    let out = format!("http://{}", p.out_addr);
    for (round, wait_ms) in [0u64, 2200, 1500, 2200, 1800].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(wait_ms));
        let (code, body, _) = curl(&["-H", "Host: api.default.svc", &format!("{out}/r{round}")]);
        assert_eq!(
            code,
            200,
            "round {round}: {body}\n{}",
            p.outbound.log_text()
        );
    }
    assert!(
        p.outbound
            .metric("keyproof_tls_handshakes_total{direction=\"outbound\",result=\"ok\"}")
            >= 3.0,
        "each 2.2 s pause outlasts the idle timeout: a new connection after each"
    );
}

#[test]
fn wrong_server_identity_and_unreachable_upstream() {
    let p = pair("");
    let out = format!("http://{}", p.out_addr);
    let (code, body, _) = curl(&["-x", &out, "http://payments.default.svc/pay"]);
    assert_eq!(code, 502, "{body}");
    assert_eq!(
        body.trim(),
        format!(
            "peer identity mismatch: expected spiffe://{TD}/ns/default/sa/payments, got spiffe://{TD}/ns/default/sa/api"
        )
    );
    assert_eq!(
        p.outbound.metric(
            "keyproof_tls_handshakes_total{direction=\"outbound\",result=\"identity_mismatch\"}"
        ),
        1.0
    );
    let start = Instant::now();
    let (code, body, _) = curl(&["-x", &out, "http://down.default.svc/"]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("connect to"), "{body}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // A peer that accepts but never answers the handshake: 504 with why.
    let start = Instant::now();
    let (code, body, _) = curl(&["-x", &out, "http://silent.default.svc/"]);
    assert_eq!(code, 504, "{body}");
    assert!(
        body.contains("TLS handshake with") && body.contains("timed out"),
        "{body}"
    );
    assert!(start.elapsed() < Duration::from_secs(4));
    assert_eq!(
        p.outbound
            .metric("keyproof_tls_handshakes_total{direction=\"outbound\",result=\"timeout\"}"),
        1.0
    );
}

#[test]
fn callers_leave_a_connection_whose_app_has_gone() {
    // Round 9 F2: a terminating pod's app exits before its native sidecar
    // hears of it, and callers' long-lived mesh connections kept bringing
    // requests, each answered 503 until the sidecar itself stopped.
    let Pair {
        _silent,
        pki: _pki,
        _app: app,
        inbound: _inbound,
        outbound,
        in_addr: _,
        out_addr,
    } = pair("");
    let out = format!("http://{out_addr}");
    let get = || curl(&["-x", &out, "http://api.default.svc/x"]);
    let dials =
        || outbound.metric("keyproof_tls_handshakes_total{direction=\"outbound\",result=\"ok\"}");
    assert_eq!(get().0, 200);
    assert_eq!(get().0, 200);
    assert_eq!(dials(), 1.0, "one mesh connection");
    drop(app);
    // The inbound refuses the stream (nothing reached the app) and ends
    // that connection gracefully: the request goes again on a new one (to
    // another endpoint, behind a Service; here the same, whose app is
    // still gone).
    let (code, body, _) = get();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("refused the request without processing it"),
        "{body}"
    );
    assert_eq!(
        dials(),
        2.0,
        "a new mesh connection\n{}",
        outbound.log_text()
    );
    // Told at most every few seconds: a crash-looping app does not cost a
    // handshake per request.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get().0, 503);
    assert_eq!(get().0, 503);
    assert_eq!(dials(), 2.0);
}

#[test]
fn a_request_the_app_never_saw_goes_again_to_another_endpoint() {
    // A terminating pod's app exits before its sidecar does, and callers'
    // mesh connections to it still bring requests: each of them, refused
    // by the app's closed port, reached nothing, and the caller's sidecar
    // sends it again on a new connection, which the Service (here a
    // round-robin balancer) gives to a pod whose app is there. The caller's
    // app sees no failure.
    let pki = Pki::new(TD);
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let client = pki.issue("client", "/ns/default/sa/web");
    let inbound = |name: &str, app: SocketAddr| {
        let (listen, admin) = (addr(), addr());
        let p = ProxyProc::start(
            pki.tmp.path(),
            name,
            &format!(
                "{}[inbound]\nlisten = \"{listen}\"\napp = \"{app}\"\n[admin]\nlisten = \"{admin}\"\n",
                identity_toml(&pki.bundle, &server),
            ),
            admin,
        );
        (p, listen)
    };
    // Nothing listens on the first pod's app port.
    let (gone, gone_addr) = inbound("in-gone", addr());
    let (live, live_addr) = inbound("in-live", app.addr);
    let service = RoundRobin::start(vec![gone_addr, live_addr]);
    let api = format!("spiffe://{TD}/ns/default/sa/api");
    let (outbound, out_addr) = outbound_to(&pki, &pki.bundle, &client, service.addr, &api);
    let out = format!("http://{out_addr}");
    // The first request (with a body, which goes again whole) meets the
    // gone app.
    let (code, body, _) = curl(&["-x", &out, "-d", "hello", "http://api.default.svc/pay"]);
    assert_eq!(code, 200, "{body}\n{}", outbound.log_text());
    assert!(body.starts_with("POST /pay"), "{body}");
    assert!(body.contains("body-bytes: 5"), "{body}");
    let retried = |why: &str| {
        outbound.sample(
            "keyproof_requests_retried_total",
            &[("direction", "outbound"), ("reason", why)],
        )
    };
    assert_eq!(retried("refused_stream"), 1.0);
    // The gone pod counted what it refused; the live one served it.
    let answered = |p: &ProxyProc, code: &str| {
        p.sample(
            "keyproof_requests_total",
            &[("direction", "inbound"), ("code", code)],
        )
    };
    assert_eq!(answered(&gone, "5xx"), 1.0);
    assert_eq!(answered(&live, "2xx"), 1.0);
    // Later requests stay on the live pod's connection.
    for _ in 0..3 {
        assert_eq!(curl(&["-x", &out, "http://api.default.svc/"]).0, 200);
    }
    assert_eq!(retried("refused_stream"), 1.0);

    // A caller speaking HTTP/1.1 straight to the inbound has no such
    // signal: it gets the 503, and the connection closes with it.
    let (code, body, _) = curl_mtls(gone_addr, &pki, &client, "/", &["--http1.1", "-i"]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("app unavailable"), "{body}");
    assert!(
        body.to_ascii_lowercase().contains("connection: close"),
        "{body}"
    );
}

#[test]
fn graceful_shutdown_lets_in_flight_request_finish() {
    let p = pair("");
    let mut inbound = p.inbound;
    let out = format!("http://{}", p.out_addr);
    let slow = std::thread::spawn(move || curl(&["-x", &out, "http://api.default.svc/slow"]));
    // Let the request reach the app, then ask the inbound to stop.
    std::thread::sleep(Duration::from_millis(600));
    inbound.terminate();
    std::thread::sleep(Duration::from_millis(200));
    let (ready, _) = http_get(inbound.admin, "/ready").unwrap_or((0, String::new()));
    assert_eq!(ready, 503, "/ready must turn 503 while draining");
    // New connections are refused while draining.
    assert!(std::net::TcpStream::connect(p.in_addr).is_err());
    let (code, body, _) = slow.join().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("slow done"), "{body}");
    let st = inbound
        .wait(Duration::from_secs(10))
        .expect("inbound did not exit");
    assert!(st.success(), "exit status {st}\n{}", inbound.log_text());
}

#[test]
fn sighup_is_a_reload_not_a_stop() {
    // Supervisors and operators send SIGHUP for "reload"; its default
    // action would end the sidecar without a drain, dropping the request
    // in flight.
    let p = pair("");
    let out = format!("http://{}", p.out_addr);
    let slow = std::thread::spawn(move || curl(&["-x", &out, "http://api.default.svc/slow"]));
    std::thread::sleep(Duration::from_millis(600));
    for proc in [&p.inbound, &p.outbound] {
        let st = std::process::Command::new("kill")
            .args(["-HUP", &proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let (code, body, _) = slow.join().unwrap();
    assert_eq!(code, 200, "{body}\n{}", p.inbound.log_text());
    assert!(body.contains("slow done"), "{body}");
    let out = format!("http://{}", p.out_addr);
    let (code, body, _) = curl(&["-x", &out, "http://api.default.svc/"]);
    assert_eq!(code, 200, "still serving after SIGHUP: {body}");
    for proc in [&p.inbound, &p.outbound] {
        let log = proc.log_text();
        assert!(log.contains("SIGHUP: looking at"), "{log}");
        assert!(!log.contains("stopped"), "{log}");
    }
}

/// An upstream that only offers `http/1.1` (openssl s_server, mutual TLS):
/// the outbound falls back from its shared h2 connection to an HTTP/1.1 pool,
/// and refuses gRPC-style HTTP/2 to it with a clear reason.
#[test]
fn http1_only_upstream_falls_back_to_a_pool() {
    if !keyproof_tests::have("openssl") {
        eprintln!("openssl not installed; skipping");
        return;
    }
    let pki = Pki::new(TD);
    let server = pki.issue("legacy", "/ns/default/sa/legacy");
    let client = pki.issue("client", "/ns/default/sa/web");
    let www = pki.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from s_server\n").unwrap();
    let port = free_port();
    let mut s_server = std::process::Command::new("openssl")
        .current_dir(&www)
        .args(["s_server", "-WWW", "-quiet", "-tls1_3", "-alpn", "http/1.1"])
        .args(["-accept", &port.to_string(), "-Verify", "1"])
        .arg("-cert")
        .arg(&server.crt)
        .arg("-cert_chain")
        .arg(&server.crt)
        .arg("-key")
        .arg(&server.key)
        .arg("-CAfile")
        .arg(&pki.bundle)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    keyproof_tests::wait_for_port(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(5),
    );
    let (out_addr, out_admin) = (addr(), addr());
    let outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\n[[outbound.upstreams]]\nhost = \"legacy.default.svc\"\naddress = \"127.0.0.1:{port}\"\nidentity = \"spiffe://{TD}/ns/default/sa/legacy\"\n[admin]\nlisten = \"{out_admin}\"\n",
            identity_toml(&pki.bundle, &client)
        ),
        out_admin,
    );
    let out = format!("http://{out_addr}");
    for _ in 0..2 {
        let (code, body, _) = curl(&["-x", &out, "http://legacy.default.svc/hello.txt"]);
        assert_eq!(code, 200, "{body}\n{}", outbound.log_text());
        assert_eq!(body, "hello from s_server\n");
    }
    let (code, body, _) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: legacy.default.svc",
        "-H",
        "content-type: application/grpc",
        "-d",
        "",
        &format!("{out}/pkg.Svc/Call"),
    ]);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("does not offer HTTP/2"), "{body}");
    let _ = s_server.kill();
    let _ = s_server.wait();
}

/// One response read off a raw HTTP/1.1 connection: status, header fields
/// (names lowercased), body (by Content-Length or chunked; none for HEAD).
fn read_response(
    r: &mut BufReader<TcpStream>,
    head_only: bool,
) -> (u16, Vec<(String, String)>, String) {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut fields = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("a field");
        fields.push((k.to_ascii_lowercase(), v.trim().to_owned()));
    }
    let get = |k: &str| fields.iter().find(|f| f.0 == k).map(|f| f.1.clone());
    let mut body = Vec::new();
    if head_only || status == 100 {
    } else if let Some(n) = get("content-length") {
        body.resize(n.parse().unwrap(), 0);
        r.read_exact(&mut body).expect("body");
    } else if get("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim_end(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    (status, fields, String::from_utf8_lossy(&body).into_owned())
}

fn raw(addr: SocketAddr) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

/// Whether the peer closes the connection (EOF, or a reset) within 5 s,
/// sending nothing more.
fn closed(r: &mut BufReader<TcpStream>) -> bool {
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let ended = match r.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    ended && rest.is_empty()
}

/// The outbound's own HTTP/1.1 server, on the wire: pipelining, HEAD,
/// HTTP/1.0 keep-alive rules, chunked uploads on a kept-alive connection,
/// `Expect: 100-continue` (with curl), and the refusals: request smuggling
/// shapes, oversized and slow heads, garbage.
#[test]
fn the_outbound_serves_http1_strictly() {
    let p = pair_with(
        "",
        "header_read_timeout = \"1s\"\nmax_header_bytes = 8192\nidle_timeout = \"1s\"",
    );
    let log = || p.outbound.log_text();
    let host = "Host: api.default.svc\r\n";

    // Two pipelined requests in one write: answered in order.
    let (mut s, mut r) = raw(p.out_addr);
    write!(
        s,
        "GET /one HTTP/1.1\r\n{host}\r\nGET /two HTTP/1.1\r\n{host}\r\n"
    )
    .unwrap();
    let (c1, _, b1) = read_response(&mut r, false);
    let (c2, _, b2) = read_response(&mut r, false);
    assert_eq!((c1, c2), (200, 200), "{}", log());
    assert!(b1.starts_with("GET /one"), "{b1}");
    assert!(b2.starts_with("GET /two"), "{b2}");
    // HEAD: the length the GET would have, no body; the connection goes on.
    write!(s, "HEAD /bytes/1000 HTTP/1.1\r\n{host}\r\n").unwrap();
    let (code, fields, _) = read_response(&mut r, true);
    assert_eq!(code, 200);
    assert!(
        fields.contains(&("content-length".into(), "1000".into())),
        "{fields:?}"
    );
    // A chunked upload reaches the app whole, and the connection is reused.
    write!(
        s,
        "POST /up HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    )
    .unwrap();
    let (code, _, body) = read_response(&mut r, false);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("body-bytes: 11\n"), "{body}");
    write!(s, "GET /after HTTP/1.1\r\n{host}Connection: close\r\n\r\n").unwrap();
    let (code, fields, body) = read_response(&mut r, false);
    assert!(body.starts_with("GET /after"), "{code} {body}");
    assert!(
        fields.contains(&("connection".into(), "close".into())),
        "{fields:?}"
    );
    assert!(closed(&mut r), "closed after `connection: close`");

    // HTTP/1.0 closes unless asked to keep alive.
    let (mut s, mut r) = raw(p.out_addr);
    write!(s, "GET /ten HTTP/1.0\r\n{host}\r\n").unwrap();
    let (code, fields, _) = read_response(&mut r, false);
    assert_eq!(code, 200);
    assert!(
        fields.contains(&("connection".into(), "close".into())),
        "{fields:?}"
    );
    assert!(closed(&mut r));
    let (mut s, mut r) = raw(p.out_addr);
    for _ in 0..2 {
        write!(
            s,
            "GET /ten HTTP/1.0\r\n{host}Connection: keep-alive\r\n\r\n"
        )
        .unwrap();
        let (code, fields, _) = read_response(&mut r, false);
        assert_eq!(code, 200);
        assert!(
            fields.contains(&("connection".into(), "keep-alive".into())),
            "{fields:?}"
        );
    }

    // A body the proxy answers without reading (no upstream for the host):
    // the answer arrives whole, says the connection closes, and it does.
    let (mut s, mut r) = raw(p.out_addr);
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: nowhere.svc\r\nContent-Length: 10\r\n\r\n0123456789"
    )
    .unwrap();
    let (code, fields, body) = read_response(&mut r, false);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("no upstream for host nowhere.svc"), "{body}");
    assert!(
        fields.iter().any(|f| f.0 == "date"),
        "a proxy-made response has a Date: {fields:?}"
    );
    assert!(
        fields.contains(&("connection".into(), "close".into())),
        "the unread body ends the connection, and the answer says so: {fields:?}"
    );
    assert!(closed(&mut r));

    // Refused, each with the connection closed after the answer.
    let refusals: [(&str, u16); 4] = [
        // Both framings: a request smuggling shape (RFC 9112 section 6.1).
        (
            "POST / HTTP/1.1\r\nHost: api.default.svc\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        ("POST / HTTP/1.1\r\nHost: api.default.svc\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
        ("HELLO THERE\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nHost: api.default.svc\r\nExpect: teapot\r\n\r\n", 417),
    ];
    for (req, want) in refusals {
        let (mut s, mut r) = raw(p.out_addr);
        s.write_all(req.as_bytes()).unwrap();
        let (code, _, body) = read_response(&mut r, false);
        assert_eq!(code, want, "{req:?}: {body}");
        assert!(
            closed(&mut r),
            "{req:?}: connection closed after the refusal"
        );
    }
    let (mut s, mut r) = raw(p.out_addr);
    write!(
        s,
        "GET / HTTP/1.1\r\n{host}x-big: {}\r\n\r\n",
        "a".repeat(10_000)
    )
    .unwrap();
    assert_eq!(read_response(&mut r, false).0, 431);
    // A head that stops half-way is cut at `header_read_timeout`.
    let (mut s, mut r) = raw(p.out_addr);
    let t = Instant::now();
    write!(s, "GET / HTTP/1.1\r\nHost: api.def").unwrap();
    assert_eq!(read_response(&mut r, false).0, 408);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // A connection silent after a request is closed by the idle timeout
    // (between one and two periods).
    let (mut s, mut r) = raw(p.out_addr);
    write!(s, "GET /idle HTTP/1.1\r\n{host}\r\n").unwrap();
    assert_eq!(read_response(&mut r, false).0, 200);
    let t = Instant::now();
    assert!(closed(&mut r));
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // curl's `Expect: 100-continue` gets its 100 at once.
    let upload = p.pki.path("expect.bin");
    std::fs::write(&upload, vec![1u8; 100_000]).unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-v",
            "--expect100-timeout",
            "10",
            "-H",
            "Host: api.default.svc",
        ])
        .args(["-H", "Expect: 100-continue", "--data-binary"])
        .arg(format!("@{}", upload.display()))
        .arg(format!("http://{}/expect", p.out_addr))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stderr.contains("HTTP/1.1 100 Continue"), "{stderr}");
    assert!(stdout.contains("body-bytes: 100000\n"), "{stdout}");
    assert!(
        !stdout.to_ascii_lowercase().contains("expect:"),
        "handled at the sidecar: {stdout}"
    );
}
