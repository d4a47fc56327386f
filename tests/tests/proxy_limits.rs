//! Listener limits: oversized request heads, the connection cap (which
//! must queue authenticated clients, not refuse them, and is not taken by
//! connections still in their handshake), and the HTTP/2 control-frame
//! budget.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keyproof_tests::free_port;
use keyproof_tests::proxy_support::*;

/// An inbound sidecar presenting `server` in front of `app`, with `extra`
/// lines in its `[inbound]` section; and its port.
fn inbound(pki: &Pki, server: &Cert, app: &EchoApp, extra: &str) -> (ProxyProc, u16) {
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"127.0.0.1:{port}\"\napp = \"{}\"\n{extra}[admin]\nlisten = \"{admin}\"\n",
            identity_toml(&pki.bundle, server),
            app.addr
        ),
        admin,
    );
    (proxy, port)
}

#[test]
fn header_limit_and_connection_backpressure() {
    let pki = Pki::new("limits.test");
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let (proxy, port) = inbound(
        &pki,
        &server,
        &app,
        "handshake_timeout = \"5s\"\nmax_header_bytes = 16384\nmax_connections = 2\nidle_timeout = \"1s\"\n",
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

/// A caller flooding WINDOW_UPDATE frames (which h2 itself does not bound)
/// is closed with GOAWAY ENHANCE_YOUR_CALM within seconds, logged and
/// counted, and everyone else is still served.
#[test]
fn a_window_update_flood_is_closed_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = Pki::new("flood.test");
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let evil = pki.issue("evil", "/ns/default/sa/evil");
    let web = pki.issue("web", "/ns/default/sa/web");
    let (proxy, port) = inbound(&pki, &server, &app, "");
    let inbound: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (got, sent, took) = rt.block_on(async {
        let tls = mtls_stream(inbound, &pki, &evil, b"h2").await;
        let (mut rd, mut wr) = tokio::io::split(tls);
        wr.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0; 1 << 16];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let wu = [0u8, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let blob: Vec<u8> = wu.iter().copied().cycle().take(wu.len() * 1000).collect();
        let start = Instant::now();
        let flood = tokio::spawn(async move {
            let mut sent = 0u64;
            while start.elapsed() < Duration::from_secs(20) && wr.write_all(&blob).await.is_ok() {
                sent += 1000;
            }
            sent
        });
        let got = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the flooding connection closed in time")
            .unwrap();
        let took = start.elapsed();
        (got, flood.await.unwrap(), took)
    });
    assert!(took < Duration::from_secs(10), "closed after {took:?}");
    // The server's frames: find its GOAWAY and the reason in it.
    let mut rest = &got[..];
    let mut reason = None;
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        if rest.len() < 9 + len {
            break;
        }
        if rest[3] == 7 && len >= 8 {
            reason = Some(u32::from_be_bytes([rest[13], rest[14], rest[15], rest[16]]));
        }
        rest = &rest[9 + len..];
    }
    assert_eq!(
        reason,
        Some(11),
        "GOAWAY ENHANCE_YOUR_CALM after {sent} frames"
    );
    assert!(
        proxy.wait_sample(
            "keyproof_http2_flood_closed_total",
            &[("side", "server")],
            1.0
        ) >= 1.0
    );
    let log = proxy.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("control-frame flood"))
        .unwrap_or_else(|| panic!("no flood line in {log}"));
    assert!(line.contains("127.0.0.1:"), "the caller is named: {line}");
    let (code, body) = rt.block_on(async {
        let tls = mtls_stream(inbound, &pki, &web, b"http/1.1").await;
        raw_http1(
            tls,
            b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        )
        .await
    });
    assert_eq!(code, 200, "{body}");
}
