//! Opaque TCP tunnels through the real inbound binary: an HTTP/2 CONNECT
//! over mutual TLS reaches a local port its `[[inbound.tcp]]` rule opens,
//! a port without one is refused, curl's CONNECT over HTTP/1.1 gets 405,
//! and `check-config` says what is open to whom.

use std::net::SocketAddr;
use std::process::Command;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyproof_tests::netns::{can_run, PodNginx, Pods, Sidecar};
use keyproof_tests::proxy_support::*;
use keyproof_tests::{bin, cmd, free_port, run, run_ok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "prod.test";

/// What the caller sends through the tunnel: HTTP/1.1, which the app sees
/// as it was sent.
const REQ: &[u8] = b"GET /through HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n";

struct Setup {
    pki: Pki,
    app: EchoApp,
    proxy: ProxyProc,
    inbound: SocketAddr,
    web: Cert,
}

/// An inbound for `api` with `rules` (TOML after `[inbound]`), the echo app
/// on a loopback port of its own.
fn setup(rules: impl Fn(u16) -> String) -> Setup {
    let pki = Pki::new(TD);
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = format!(
        "{}[inbound]\nlisten = \"127.0.0.1:{port}\"\napp = \"127.0.0.1:9\"\n{}\n[admin]\nlisten = \"{admin}\"\n",
        identity_toml(&pki.bundle, &server),
        rules(app.addr.port())
    );
    let proxy = ProxyProc::start(pki.tmp.path(), "inbound", &cfg, admin);
    Setup {
        pki,
        app,
        proxy,
        inbound: format!("127.0.0.1:{port}").parse().unwrap(),
        web,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// CONNECT `127.0.0.1:<port>` over HTTP/2 as `cert`; on 200, sends `send`
/// through the tunnel and reads until the far side ends.
/// (status, what came back or the refusal's body).
async fn tunnel(s: &Setup, cert: &Cert, port: u16, send: &[u8]) -> (u16, String) {
    tunnel_to(s, cert, &format!("127.0.0.1:{port}"), send).await
}

/// [`tunnel`] with the CONNECT authority given as is.
async fn tunnel_to(s: &Setup, cert: &Cert, authority: &str, send: &[u8]) -> (u16, String) {
    let tls = mtls_stream(s.inbound, &s.pki, cert, b"h2").await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = h2.send_request(req).await.expect("an answer");
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        return (status, String::from_utf8_lossy(&body).into_owned());
    }
    let up = hyper::upgrade::on(resp).await.expect("upgraded");
    let mut io = TokioIo::new(up);
    // Our side stays open: hyper's HTTP/1 server (the app) drops a
    // connection whose read side ends before it has answered.
    io.write_all(send).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), io.read_to_end(&mut got))
        .await
        .expect("the far side's end in time")
        .expect("read");
    // Then ours, which ends the tunnel; the connection's task (run only
    // while this runtime is) sends it.
    io.shutdown().await.expect("end our side");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    (status, String::from_utf8_lossy(&got).into_owned())
}

fn tcp_metric(s: &Setup, result: &str) -> f64 {
    s.proxy.metric(&format!(
        "keyproof_tcp_connections_total{{direction=\"inbound\",result=\"{result}\"}}"
    ))
}

#[test]
fn a_tunnel_reaches_the_port_its_rule_opens_and_only_that() {
    let s = setup(|port| {
        format!("[[inbound.tcp]]\nport = {port}\nallow = [\"spiffe://{TD}/ns/default/sa/web\"]\n")
    });
    let rt = rt();
    // HTTP/1.1 inside the tunnel: the app sees bytes, not a proxied request.
    let (status, got) = rt.block_on(tunnel(&s, &s.web, s.app.addr.port(), REQ));
    assert_eq!(status, 200, "{got}\n{}", s.proxy.log_text());
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("GET /through"), "{got}");
    // Nothing added on the way: no XFCC inside an opaque tunnel.
    assert!(!got.contains("x-forwarded-client-cert"), "{got}");
    assert_eq!(tcp_metric(&s, "ok"), 1.0);
    let up = s.proxy.wait_metric(
        "keyproof_tcp_bytes_total{direction=\"inbound\",way=\"client_to_server\"}",
        1.0,
    );
    assert_eq!(up, REQ.len() as f64);
    let down = s
        .proxy
        .metric("keyproof_tcp_bytes_total{direction=\"inbound\",way=\"server_to_client\"}");
    assert_eq!(down, got.len() as f64);

    // Another identity: not in the rule.
    let ops = s.pki.issue("ops", "/ns/ops/sa/x");
    let (status, body) = rt.block_on(tunnel(&s, &ops, s.app.addr.port(), b""));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("does not allow"), "{body}");
    // Another port: no rule.
    let (status, body) = rt.block_on(tunnel(&s, &s.web, free_port(), b""));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no tcp rule"), "{body}");
    assert_eq!(tcp_metric(&s, "denied"), 2.0);
    let log = s.proxy.log_text();
    assert!(
        log.contains("tunnel refused by policy") && log.contains("spiffe://prod.test/ns/ops/sa/x"),
        "{log}"
    );
}

#[test]
fn curls_connect_over_http1_gets_405() {
    let s = setup(|port| {
        format!("[[inbound.tcp]]\nport = {port}\nallow = [\"spiffe://{TD}/ns/default/sa/web\"]\n")
    });
    let proxy = format!("https://localhost:{}", s.inbound.port());
    let target = format!("http://127.0.0.1:{}/", s.app.addr.port());
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "15",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
        ])
        .args(["--proxytunnel", "--proxy", &proxy])
        .arg("--proxy-cacert")
        .arg(&s.pki.bundle)
        .arg("--proxy-cert")
        .arg(&s.web.crt)
        .arg("--proxy-key")
        .arg(&s.web.key)
        .arg(&target)
        .output()
        .expect("run curl");
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        code.trim(),
        "405",
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.proxy.log_text()
    );
    assert_eq!(tcp_metric(&s, "ok") + tcp_metric(&s, "denied"), 0.0);
}

#[test]
fn check_config_lists_the_open_ports_and_who_may_tunnel() {
    let pki = Pki::new(TD);
    let server = pki.issue("server", "/ns/default/sa/api");
    let policy = pki.path("policy.toml");
    std::fs::write(
        &policy,
        format!("routes = []\n[[tcp]]\nport = 5432\nallow = [\"spiffe://{TD}/ns/shop/*\"]\n"),
    )
    .unwrap();
    let cfg = pki.path("inbound.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}[inbound]\nlisten = \"127.0.0.1:15443\"\napp = \"127.0.0.1:8080\"\npolicy_file = {:?}\n",
            identity_toml(&pki.bundle, &server),
            policy.display().to_string()
        ),
    )
    .unwrap();
    let out = run_ok(
        cmd("keyproof-proxy")
            .arg("check-config")
            .arg("--config")
            .arg(&cfg),
    );
    assert!(
        out.contains(&format!(
            "tcp port 5432 (HTTP/2 CONNECT -> 127.0.0.1:5432): allow [spiffe://{TD}/ns/shop/*]"
        )),
        "{out}"
    );
}

/// A tunnel held open (its connection and stream live as long as this).
async fn hold_tunnel(s: &Setup, cert: &Cert, port: u16) -> (u16, Option<hyper::upgrade::Upgraded>) {
    let tls = mtls_stream(s.inbound, &s.pki, cert, b"h2").await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("127.0.0.1:{port}"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = h2.send_request(req).await.expect("an answer");
    let status = resp.status().as_u16();
    if status != 200 {
        return (status, None);
    }
    (
        status,
        Some(hyper::upgrade::on(resp).await.expect("upgraded")),
    )
}

#[test]
fn tunnels_beyond_max_tunnels_get_503_counted_limited() {
    let s = setup(|port| {
        format!(
            "max_tunnels = 2\nmax_tunnels_per_peer = 1\n\
             [[inbound.tcp]]\nport = {port}\nallow = [\"spiffe://{TD}/ns/*\"]\n"
        )
    });
    let ops = s.pki.issue("ops", "/ns/ops/sa/x");
    let bad = s.pki.issue("other", "/ns/other/sa/y");
    let rt = rt();
    let port = s.app.addr.port();
    rt.block_on(async {
        let (status, _held) = hold_tunnel(&s, &s.web, port).await;
        assert_eq!(status, 200, "{}", s.proxy.log_text());
        // The same caller again: its own bound.
        let (status, body) = tunnel(&s, &s.web, port, b"").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("max_tunnels_per_peer"), "{body}");
        let (status, _held2) = hold_tunnel(&s, &ops, port).await;
        assert_eq!(status, 200);
        // A third caller: the pod's bound.
        let (status, body) = tunnel(&s, &bad, port, b"").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("(max_tunnels)"), "{body}");
    });
    assert_eq!(tcp_metric(&s, "limited"), 2.0);
    assert_eq!(tcp_metric(&s, "ok"), 2.0);
    let log = s.proxy.log_text();
    assert!(log.contains("tunnel refused"), "{log}");
}

#[test]
fn connect_to_the_sidecars_own_port_or_with_a_lax_authority_is_refused() {
    let s = setup(|port| {
        format!("[[inbound.tcp]]\nport = {port}\nallow = [\"spiffe://{TD}/ns/default/sa/web\"]\n")
    });
    let rt = rt();
    let admin = s.proxy.admin.port();
    let (status, body) = rt.block_on(tunnel(&s, &s.web, admin, b""));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(&format!(
            "port {admin} is a port of this workload's sidecar"
        )),
        "{body}"
    );
    let port = s.app.addr.port();
    for a in [
        format!("x:+{port}"),
        format!("x:0{port}"),
        format!("u@x:{port}"),
        format!("user:pw@x:{port}"),
    ] {
        let (status, body) = rt.block_on(tunnel_to(&s, &s.web, &a, b""));
        assert_eq!(status, 400, "{a}: {body}");
    }
    assert_eq!(tcp_metric(&s, "denied"), 5.0);
    assert_eq!(tcp_metric(&s, "ok"), 0.0);
}

#[test]
fn a_tcp_rule_on_an_http_port_or_a_sidecar_port_is_a_startup_error() {
    let pki = Pki::new(TD);
    let server = pki.issue("server", "/ns/default/sa/api");
    let cfg = pki.path("inbound.toml");
    let write = |port: u16, extra: &str| {
        std::fs::write(
            &cfg,
            format!(
                "{}[inbound]\nlisten = \"127.0.0.1:15443\"\napp = \"127.0.0.1:8080\"\n{extra}\
                 [[inbound.tcp]]\nport = {port}\nallow = [\"spiffe://{TD}/ns/shop/*\"]\n\
                 [admin]\nlisten = \"127.0.0.1:15090\"\n",
                identity_toml(&pki.bundle, &server),
            ),
        )
        .unwrap();
    };
    for (port, extra, why) in [
        (8080, "", "also in inbound.http_ports"),
        (
            5432,
            "http_ports = [8080, 5432]\n",
            "also in inbound.http_ports",
        ),
        (15090, "", "listen port of this proxy"),
        (15443, "", "listen port of this proxy"),
    ] {
        write(port, extra);
        let out = cmd("keyproof-proxy")
            .arg("check-config")
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run check-config");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted port {port}");
        assert!(
            err.contains("inbound.tcp[0].port") && err.contains(why),
            "{err}"
        );
    }
    // A good one says which ports take HTTP.
    write(5432, "http_ports = [8080, 9000]\n");
    let out = run_ok(
        cmd("keyproof-proxy")
            .arg("check-config")
            .arg("--config")
            .arg(&cfg),
    );
    assert!(out.contains("http_ports [8080, 9000]"), "{out}");
}

/// With real iptables redirection in a pod: a peer's HTTP to a port of the
/// pod that is not in `http_ports` (a service meant to stay local, or a
/// port with a tcp rule) is refused by the inbound and never reaches the
/// service; an HTTP port is still forwarded. Needs root (CI runs as root):
/// without it the test prints a notice and passes, unless `CI` is set.
#[test]
fn in_a_pod_redirected_http_reaches_only_the_http_ports() {
    if !can_run(&["nginx", "curl", "setpriv", "iptables"]) {
        return;
    }
    let pods = Pods::create();
    let (a, b) = (&pods.a, &pods.b);
    let pki = Pki::new(TD);
    let web = pki.issue("web", "/ns/default/sa/web");
    let api = pki.issue("api", "/ns/default/sa/api");
    // The service on 6060 stands for one bound to loopback only (a debug
    // endpoint): the inbound is what could expose it.
    let debug = PodNginx::start(&pods, b, 6060);
    let side = Sidecar::start(
        &pods,
        b,
        "b",
        &format!(
            "{}[inbound]\nlisten = \"0.0.0.0:15443\"\napp = \"127.0.0.1:8080\"\n\
             [[inbound.tcp]]\nport = 5432\nallow = [\"spiffe://{TD}/ns/default/sa/web\"]\n\
             [admin]\nlisten = \"0.0.0.0:15090\"\n",
            identity_toml(&pki.bundle, &api)
        ),
        15090,
    );
    run_ok(
        b.cmd(bin("keyproof-proxy"))
            .args(["redirect", "--proxy-uid", "0"]),
    );
    // A peer with a certificate of the trust domain, dialling B's ports
    // with mutual TLS as a peer sidecar would.
    let get = |port: u16, path: &str| -> (u16, String) {
        let out = run(a
            .cmd("curl")
            .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(&pki.bundle)
            .arg("--cert")
            .arg(&web.crt)
            .arg("--key")
            .arg(&web.key)
            .arg("--connect-to")
            .arg(format!("localhost:{port}:{}:{port}", b.ip))
            .arg(format!("https://localhost:{port}{path}")));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    };
    let (code, body) = get(6060, "/debug/pprof");
    assert_eq!(code, 403, "{body}\n{}", side.log_text());
    assert!(
        body.contains("port 6060 is not an HTTP port of this workload"),
        "{body}"
    );
    // A port with a tcp rule takes tunnels only, even from the caller the
    // rule allows.
    let (code, body) = get(5432, "/");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("port 5432 is not an HTTP port"), "{body}");
    // The app port is forwarded, after the policy let it through; nothing
    // listens there, so the inbound refuses the stream (curl, an HTTP/2
    // caller, tries again a few times and gives up: no status) and counts
    // a 5xx each time.
    let (code, body) = get(8080, "/");
    assert_eq!(code, 0, "{body}");
    assert!(
        side.sample(
            "keyproof_requests_total",
            &[("direction", "inbound"), ("code", "5xx")]
        ) >= 1.0,
        "{}",
        side.log_text()
    );
    assert_eq!(
        side.sample("keyproof_authz_denied_total", &[("route", "not_http_port")]),
        2.0
    );
    assert!(
        debug.access_log().trim().is_empty(),
        "the local-only service was reached: {}",
        debug.access_log()
    );
    let log = side.log_text();
    assert!(
        log.contains("not an HTTP port") && log.contains("spiffe://prod.test/ns/default/sa/web"),
        "{log}"
    );
    run_ok(b.cmd(bin("keyproof-proxy")).args(["redirect", "--remove"]));
}
