//! Listener limits: oversized request heads and the connection cap (which
//! must queue authenticated clients, not refuse them, and is not taken by
//! connections still in their handshake).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keyproof_tests::free_port;
use keyproof_tests::proxy_support::*;

#[test]
fn header_limit_and_connection_backpressure() {
    let pki = Pki::new("limits.test");
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"127.0.0.1:{port}\"\napp = \"{}\"\nhandshake_timeout = \"5s\"\nmax_header_bytes = 16384\nmax_connections = 2\nidle_timeout = \"1s\"\n[admin]\nlisten = \"{admin}\"\n",
            identity_toml(&pki.bundle, &server),
            app.addr
        ),
        admin,
    );
    let (crt, key, ca) = (
        web.crt.display().to_string(),
        web.key.display().to_string(),
        pki.bundle.display().to_string(),
    );
    let resolve = format!("localhost:{port}:127.0.0.1");
    let url = format!("https://localhost:{port}/");
    let base = [
        "--http1.1",
        "--cert",
        &crt,
        "--key",
        &key,
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
    ];

    let big = format!("x-big: {}", "a".repeat(20_000));
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["-H", &big, &url]);
    let (code, body, _) = curl(&args);
    assert_eq!(code, 431, "{body}");
    let mut args: Vec<&str> = base.to_vec();
    args.push(&url);
    assert_eq!(curl(&args).0, 200);

    // Two silent clients are pending handshakes, not connections: they
    // take no slot, and a caller is served at once (had they taken both
    // slots, it would wait for the 5 s handshake timeout).
    let _a = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _b = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let (code, body, _) = curl(&args);
    assert_eq!(code, 200, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // Two authenticated, idle connections take both slots; another
    // caller waits (after its handshake) and is served once the idle
    // timeout frees one. (A third connection of the same caller would be
    // beyond its `max_connections_per_peer` share, and closed.)
    let other = pki.issue("other", "/ns/default/sa/other");
    let (other_crt, other_key) = (
        other.crt.display().to_string(),
        other.key.display().to_string(),
    );
    let mut args: Vec<&str> = base.to_vec();
    args[2] = &other_crt;
    args[4] = &other_key;
    args.push(&url);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let held = rt.block_on(async {
        let a = mtls_http1(format!("127.0.0.1:{port}").parse().unwrap(), &pki, &web).await;
        let b = mtls_http1(format!("127.0.0.1:{port}").parse().unwrap(), &pki, &web).await;
        (a, b)
    });
    let start = Instant::now();
    let (code, body, _) = curl(&args);
    let took = start.elapsed();
    assert_eq!(code, 200, "{body}");
    assert!(took >= Duration::from_millis(800), "not queued: {took:?}");
    drop(held);
    assert!(
        proxy.wait_metric(
            "keyproof_tls_handshakes_total{direction=\"inbound\",result=\"timeout\"}",
            2.0
        ) >= 2.0
    );
}
