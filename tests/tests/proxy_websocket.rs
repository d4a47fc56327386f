//! WebSocket through a sidecar pair: a real client (Python `websockets`)
//! -> outbound (HTTP/1.1 `Upgrade`) -> extended CONNECT over mutual TLS
//! (RFC 8441) -> inbound -> a real WebSocket server. The route policy, the
//! canonical path and XFCC apply to the switch as to any request; the app's
//! refusal reaches the client as the app gave it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use keyproof_tests::free_port;
use keyproof_tests::proxy_support::*;
use serde_json::Value;

const TD: &str = "ws.test";

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn script() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ws.py")
}

/// The venv's Python with `websockets`, or `None` (skipped) unless
/// `KEYPROOF_INTEROP` says it must be there (`test.sh` installs it).
fn python() -> Option<String> {
    interop_python("websockets")
}

/// The WebSocket app, killed on drop.
struct WsApp {
    child: Child,
    addr: SocketAddr,
}

impl WsApp {
    fn start(py: &str, closes: &std::path::Path) -> WsApp {
        let addr = addr();
        let mut child = Command::new(py)
            .arg(script())
            .args(["server", &addr.port().to_string()])
            .env("WS_CLOSES", closes)
            .stdout(Stdio::piped())
            .spawn()
            .expect("ws server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        WsApp { child, addr }
    }
}

impl Drop for WsApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// api's inbound before `app`, with `extra` (lines ending in a newline)
/// after the `[inbound]` keys it sets; its listen address second.
fn inbound_alone(pki: &Pki, app: SocketAddr, extra: &str) -> (ProxyProc, SocketAddr) {
    let server = pki.issue("server", "/ns/default/sa/api");
    let (in_addr, in_admin) = (addr(), addr());
    let inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{app}\"\n{extra}\
             [admin]\nlisten = \"{in_admin}\"\n",
            identity_toml(&pki.bundle, &server),
        ),
        in_admin,
    );
    (inbound, in_addr)
}

/// A multi-threaded runtime of `workers` threads for a test's clients and
/// raw apps.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A sidecar pair: api's inbound before `app`, with `inbound_extra` in
/// `[inbound]`, and web's outbound routing `api.default.svc` to it. The
/// outbound's listen address last.
fn pair(pki: &Pki, app: SocketAddr, inbound_extra: &str) -> (ProxyProc, ProxyProc, SocketAddr) {
    let (inbound, in_addr) = inbound_alone(pki, app, inbound_extra);
    let client = pki.issue("client", "/ns/default/sa/web");
    let api = format!("spiffe://{TD}/ns/default/sa/api");
    let (outbound, out_addr) = outbound_to(pki, &pki.bundle, &client, in_addr, &api);
    (inbound, outbound, out_addr)
}

struct Mesh {
    pki: Pki,
    app: WsApp,
    _inbound: ProxyProc,
    outbound: ProxyProc,
    out_addr: SocketAddr,
    py: String,
    closes: std::path::PathBuf,
}

/// A pair whose inbound admits web on `/chat` and `/reject`, refuses it on
/// `/admin` (ops only), demands step-up on `/pay`, and decides by risk on
/// `/ask` (a rule no client here fires: the app asks).
fn mesh(py: String) -> Mesh {
    let pki = Pki::new(TD);
    let closes = pki.tmp.path().join("closes");
    let app = WsApp::start(&py, &closes);
    let web = pki.id("/ns/default/sa/web");
    let ops = pki.id("/ns/ops/sa/admin");
    let (inbound, outbound, out_addr) = pair(
        &pki,
        app.addr,
        &format!(
            "default_policy = \"deny\"\n\
             [[inbound.routes]]\npath_prefix = \"/chat\"\nallow = [\"{web}\"]\n\
             [[inbound.routes]]\npath_prefix = \"/reject\"\nallow = [\"{web}\"]\n\
             [[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"{ops}\"]\n\
             [[inbound.routes]]\npath_prefix = \"/pay\"\nallow = [\"{web}\"]\nstep_up = true\n\
             [[inbound.routes]]\npath_prefix = \"/ask\"\nallow = [\"{web}\"]\nstep_up = \"risk\"\nrisk = [\"flagged\"]\n\
             [[inbound.risk_rules]]\nname = \"flagged\"\nheader = \"x-flagged\"\npresent = true\n"
        ),
    );
    Mesh {
        pki,
        app,
        _inbound: inbound,
        outbound,
        out_addr,
        py,
        closes,
    }
}

impl Mesh {
    /// Runs the client on `path` of `api.default.svc`.
    fn client(&self, path: &str, messages: usize) -> Value {
        self.run_client("api.default.svc", path, messages, false)
    }

    /// Runs the client on `path` of `host` as an app with `HTTP_PROXY` set
    /// to the outbound: the library asks for a `CONNECT` tunnel.
    fn client_via_proxy(&self, host: &str, path: &str, messages: usize) -> Value {
        self.run_client(host, path, messages, true)
    }

    fn run_client(&self, host: &str, path: &str, messages: usize, via_proxy: bool) -> Value {
        let mut cmd = Command::new(&self.py);
        cmd.arg(script()).args([
            "client",
            &self.out_addr.port().to_string(),
            host,
            path,
            &messages.to_string(),
        ]);
        for var in [
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            cmd.env_remove(var);
        }
        if via_proxy {
            cmd.env("WS_VIA_PROXY", "1");
        }
        let out = cmd.output().expect("ws client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client failed: {stdout}\n{}\noutbound log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.outbound.log_text()
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }
}

/// A WebSocket handshake written byte for byte to the outbound, with
/// `extra` header lines, then one masked text frame: (the status line, and
/// on 101 the echo of that frame's payload).
fn raw_ws(out: SocketAddr, path: &str, extra: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(out).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: api.default.svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap_or(0) == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    if !status.contains(" 101 ") {
        return (status, Vec::new());
    }
    let frame = |s: &mut std::net::TcpStream| {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        let mut n = usize::from(b[1] & 0x7f);
        if n == 126 {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            n = usize::from(u16::from_be_bytes(l));
        }
        let mut p = vec![0u8; n];
        s.read_exact(&mut p).unwrap();
        p
    };
    // The app's first message (what it saw), then the echo.
    frame(&mut s);
    let mask = [1u8, 2, 3, 4];
    let mut out = vec![0x81, 0x80 | 4];
    out.extend_from_slice(&mask);
    out.extend(b"ping".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&out).unwrap();
    (status, frame(&mut s))
}

#[test]
fn a_websocket_crosses_the_mesh_under_the_route_policy() {
    let Some(py) = python() else { return };
    let m = mesh(py);
    let web = m.pki.id("/ns/default/sa/web");

    // Messages both ways, a 1 MiB one included, on the canonical path, and
    // the app sees the caller's identity in XFCC.
    let r = m.client("/chat/./room//1", 5);
    assert_eq!(r["echoed"], 5, "{r}");
    assert_eq!(r["big"], true, "{r}");
    assert_eq!(r["seen"]["path"], "/chat/room/1", "{r}");
    assert_eq!(r["seen"]["host"], "api.default.svc", "{r}");
    let xfcc = r["seen"]["xfcc"].as_str().unwrap_or_default();
    assert!(xfcc.contains(&format!("URI={web}")), "{r}");

    // The close handshake reaches the app with the client's code.
    let ok = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::read_to_string(&m.closes).is_ok_and(|s| s.lines().any(|l| l == "1000"))
    });
    assert!(ok, "the app never saw close code 1000");

    // The policy decides on the switch: another identity's route is 403,
    // and the app never sees the request.
    let r = m.client("/admin/socket", 1);
    assert_eq!(r["status"], 403, "{r}");
    let r = m.client("/chat/../admin/socket", 1);
    assert_eq!(r["status"], 403, "{r}");
    // On a step-up route the switch is proven: the caller's sidecar
    // answers the challenge by signing the extended CONNECT, and the app
    // learns it was. Unsigned switches carry no such field.
    assert_eq!(r_stepup(&m.client("/chat/plain", 1)), (None, None));
    for _ in 0..2 {
        let r = m.client("/pay/socket", 2);
        assert_eq!(r["echoed"], 2, "{r}");
        assert_eq!(
            r_stepup(&r),
            (Some("verified".into()), Some("always".into())),
            "{r}"
        );
    }
    // On a risk route where no rule fires, the app may ask for a proof of
    // the switch: its answer is discarded, the caller's sidecar proves it,
    // and the app gets the handshake again, verified, reason `app`.
    let r = m.client("/ask/socket", 1);
    assert_eq!(r["echoed"], 1, "{r}");
    assert_eq!(
        r_stepup(&r),
        (Some("verified".into()), Some("app".into())),
        "{r}"
    );
    let signed = m
        .outbound
        .metric("keyproof_stepup_signatures_total{result=\"ok\"}");
    assert_eq!(signed, 3.0, "one signature per proven switch");
    // The app's own refusal reaches the client as it gave it.
    let r = m.client("/reject/here", 1);
    assert_eq!(r["status"], 404, "{r}");
    assert_eq!(r["body"], "no such socket here\n", "{r}");

    // Clients that frame the handshake in their own ways: a zero length
    // (the stream must not be held to it), a field the client's
    // Connection names (hop-by-hop, not passed on).
    for extra in [
        "Content-Length: 0\r\n",
        "Connection: x-trace\r\nX-Trace: 1\r\n",
    ] {
        let (status, echo) = raw_ws(m.out_addr, "/chat/raw", extra);
        assert_eq!(status, "HTTP/1.1 101 Switching Protocols", "{extra}");
        assert_eq!(echo, b"ping", "{extra}");
    }
    // Offers the mesh cannot carry: 501, saying why.
    let (status, _) = raw_ws(m.out_addr, "/chat/raw", "Upgrade: other\r\n");
    assert!(status.starts_with("HTTP/1.1 501"), "{status}");

    // Several sockets at once, each its own stream.
    let both: Vec<_> = (0..3)
        .map(|_| {
            let (py, port) = (m.py.clone(), m.out_addr.port().to_string());
            std::thread::spawn(move || {
                Command::new(py)
                    .arg(script())
                    .args(["client", &port, "api.default.svc", "/chat/many", "20"])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for t in both {
        let out = t.join().unwrap();
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["echoed"], 20, "{r}");
    }
    drop(m.app);
}

/// The `x-keyproof-step-up` fields the app saw on a client's handshake.
fn r_stepup(r: &Value) -> (Option<String>, Option<String>) {
    let field = |k: &str| r["seen"][k].as_str().map(str::to_owned);
    (field("stepup"), field("stepup_reason"))
}

/// Writes `head` to the outbound, reads the answer's status line and what
/// follows it up to the end of its head; then, if it was a 200, writes
/// `inner` and reads what comes back until the connection closes or 2 s
/// pass: (status line, what came back inside).
fn tunnel_exchange(out: SocketAddr, head: &str, inner: &[u8]) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(out).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => break,
        }
    }
    let got = String::from_utf8_lossy(&got).into_owned();
    let status = got.lines().next().unwrap_or_default().to_owned();
    let mut back = Vec::new();
    if status.starts_with("HTTP/1.1 200") {
        s.write_all(inner).unwrap();
        let _ = s.read_to_end(&mut back);
    }
    (status, String::from_utf8_lossy(&back).into_owned())
}

#[test]
fn a_websocket_client_behind_http_proxy_gets_its_tunnel_served_as_the_mesh_serves_http() {
    let Some(py) = python() else { return };
    let m = mesh(py);
    let web = m.pki.id("/ns/default/sa/web");

    // `websockets` with HTTP_PROXY sends `CONNECT api.default.svc:80`;
    // inside, its handshake crosses the mesh as any other: canonical path,
    // XFCC, messages both ways.
    let r = m.client_via_proxy("api.default.svc", "/chat/./room", 3);
    assert_eq!(r["echoed"], 3, "{r}");
    assert_eq!(r["big"], true, "{r}");
    assert_eq!(r["seen"]["path"], "/chat/room", "{r}");
    let xfcc = r["seen"]["xfcc"].as_str().unwrap_or_default();
    assert!(xfcc.contains(&format!("URI={web}")), "{r}");
    // The tunnel is no way around the route policy.
    let r = m.client_via_proxy("api.default.svc", "/admin/socket", 1);
    assert_eq!(r["status"], 403, "{r}");
    // A host no rule takes gets no tunnel.
    let r = m.client_via_proxy("elsewhere.example", "/chat", 1);
    assert_eq!(r["proxy_status"], 502, "{r}");

    let connect = "CONNECT api.default.svc:80 HTTP/1.1\r\nHost: api.default.svc:80\r\n\r\n";
    // What the tunnel carries is read as HTTP, request by request: an
    // owned field is removed and a refused path refused, as outside it.
    let (status, back) = tunnel_exchange(
        m.out_addr,
        connect,
        b"GET /admin/x HTTP/1.1\r\nHost: api.default.svc\r\nConnection: close\r\n\r\n",
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(back.starts_with("HTTP/1.1 403"), "{back}");
    // TLS of the app's own is not passed to the peer: 400, closed.
    let hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03";
    let (status, back) = tunnel_exchange(m.out_addr, connect, hello);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(back.starts_with("HTTP/1.1 400"), "{back}");
    // No tunnel in a tunnel.
    let (_, back) = tunnel_exchange(m.out_addr, connect, connect.as_bytes());
    assert!(back.starts_with("HTTP/1.1 405"), "{back}");
    // An HTTP/1.0 client's CONNECT is served too; one with content, or
    // without a port, is not.
    let (status, _) = tunnel_exchange(
        m.out_addr,
        "CONNECT api.default.svc:80 HTTP/1.0\r\n\r\n",
        b"",
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    for bad in [
        "CONNECT api.default.svc:80 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
        "CONNECT api.default.svc HTTP/1.1\r\n\r\n",
        "CONNECT api.default.svc:0 HTTP/1.1\r\n\r\n",
        "CONNECT api.default.svc:+80 HTTP/1.1\r\n\r\n",
        "CONNECT user:pw@api.default.svc:80 HTTP/1.1\r\n\r\n",
        // Tunnel bytes with the head: refused, not a 200 and a close.
        "CONNECT api.default.svc:80 HTTP/1.1\r\n\r\nGET /chat HTTP/1.1\r\nHost: api.default.svc\r\n\r\n",
    ] {
        let (status, _) = tunnel_exchange(m.out_addr, bad, b"");
        assert!(status.starts_with("HTTP/1.1 400"), "{bad:?}: {status}");
    }
    drop(m.app);
}

// ---- the inbound alone, under a caller's own extended CONNECT ---------------

/// A raw HTTP/1.1 app: records each request head; `/silent` is never
/// answered, `/deny` is declined with 403 and a body, `/plain` answered 200
/// as if `Upgrade` were not there, `/reset` switched, sent `partial`, then
/// reset, `/stream` (not an upgrade) answered 200 with a body that never
/// ends; anything else is switched (101) and echoed from then on, what
/// followed the head included (`/slow` 1.5 s late).
struct RawApp {
    addr: SocketAddr,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

async fn raw_app() -> RawApp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                seen.lock().unwrap().push(head.clone());
                if head.starts_with("GET /slow") {
                    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                }
                if head.starts_with("GET /silent") {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    return;
                }
                if head.starts_with("GET /reset") {
                    let _ = s
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\npartial")
                        .await;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    // A zero linger never blocks: the close is a reset.
                    #[allow(deprecated)]
                    let _ = s.set_linger(Some(std::time::Duration::ZERO));
                    return;
                }
                if head.starts_with("GET /stream") && !head.contains("upgrade") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                        .await;
                    while s.write_all(b"5\r\nhello\r\n").await.is_ok() {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    return;
                }
                if head.starts_with("GET /plain") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    return;
                }
                if head.starts_with("GET /deny") {
                    let _ = s
                        .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 6\r\n\r\nno way")
                        .await;
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: from-the-app\r\n\r\n")
                    .await;
                let _ = s.write_all(&buf[end..]).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    RawApp { addr, heads }
}

type H2Send = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// An HTTP/2 connection to the inbound at `to` as `cert`, hyper's own
/// client.
async fn h2_caller(to: SocketAddr, pki: &Pki, cert: &Cert) -> H2Send {
    h2_caller_bound(to, pki, cert).await.0
}

/// [`h2_caller`], with the connection's `EXPORTER-Channel-Binding` (what a
/// step-up proof binds).
async fn h2_caller_bound(to: SocketAddr, pki: &Pki, cert: &Cert) -> (H2Send, [u8; 32]) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tls = mtls_stream(to, pki, cert, b"h2").await;
    let mut exporter = [0u8; 32];
    tls.get_ref()
        .1
        .export_keying_material(&mut exporter, b"EXPORTER-Channel-Binding", None)
        .expect("exporter");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    (send, exporter)
}

/// A `CONNECT` to `target`: extended (a switch to `protocol`, `target` a
/// URI) or plain (`None`, `target` an authority).
fn connect_req(
    target: &str,
    protocol: Option<&'static str>,
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target);
    if let Some(p) = protocol {
        req = req.extension(hyper::ext::Protocol::from_static(p));
    }
    req.body(http_body_util::Empty::new()).expect("request")
}

/// An extended CONNECT for `protocol` on `path`, with `fields`, from hyper's
/// own HTTP/2 client: (status, the app's answer fields, and on 200 what
/// came back for `send` before the far side ended; else the body).
async fn switch(
    send: &mut H2Send,
    protocol: &'static str,
    path: &str,
    fields: &[(&str, &str)],
    payload: &[u8],
) -> (u16, http::HeaderMap, String) {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://api.default.svc{path}"))
        .extension(hyper::ext::Protocol::from_static(protocol))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (k, v) in fields {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(http_body_util::Empty::new()).unwrap())
        .await
        .expect("an answer");
    let (status, fields) = (resp.status().as_u16(), resp.headers().clone());
    if status != 200 {
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        return (status, fields, String::from_utf8_lossy(&body).into_owned());
    }
    let up = hyper::upgrade::on(resp).await.expect("upgraded");
    let mut io = hyper_util::rt::TokioIo::new(up);
    io.write_all(payload).await.expect("write");
    io.shutdown().await.expect("our end");
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), io.read_to_end(&mut got))
        .await
        .expect("the far side's end in time")
        .expect("read");
    (status, fields, String::from_utf8_lossy(&got).into_owned())
}

#[test]
fn the_inbound_decides_on_an_extended_connect_as_the_get_it_stands_for() {
    let rt = runtime(2);
    let app = rt.block_on(raw_app());
    let pki = Pki::new(TD);
    let web_cert = pki.issue("web", "/ns/default/sa/web");
    let web = pki.id("/ns/default/sa/web");
    let (inbound, in_addr) = inbound_alone(
        &pki,
        app.addr,
        &format!(
            "default_policy = \"deny\"\n\
             max_tunnels_per_peer = 2\napp_connect_timeout = \"1s\"\nheader_read_timeout = \"1s\"\n\
             [[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"spiffe://{TD}/ns/ops/sa/admin\"]\n\
             [[inbound.routes]]\npath_prefix = \"/\"\nallow = [\"{web}\"]\n"
        ),
    );
    rt.block_on(async {
        let mut send = h2_caller(in_addr, &pki, &web_cert).await;
        // Switched: the app gets the GET it expects, with the sidecar's XFCC
        // only, none of the caller's owned fields, the canonical path, and
        // the bytes that follow; its fields come back on the 200.
        let (status, fields, got) = switch(
            &mut send,
            "websocket",
            "/chat/./a//b",
            &[
                ("x-forwarded-client-cert", "By=forged;URI=spiffe://evil"),
                ("x-keyproof-step-up", "verified"),
                ("sec-websocket-protocol", "chat"),
            ],
            b"frames",
        )
        .await;
        assert_eq!(status, 200, "{got}\n{}", inbound.log_text());
        assert_eq!(fields["sec-websocket-accept"], "from-the-app");
        assert_eq!(got, "frames");
        let head = app.heads.lock().unwrap().last().cloned().unwrap();
        let lower = head.to_ascii_lowercase();
        assert!(head.starts_with("GET /chat/a/b HTTP/1.1\r\n"), "{head}");
        for f in [
            "connection: upgrade\r\n",
            "upgrade: websocket\r\n",
            "host: api.default.svc\r\n",
            "sec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n",
            "sec-websocket-protocol: chat\r\n",
        ] {
            assert!(lower.contains(f), "{f:?} missing: {head}");
        }
        assert!(lower.contains(&format!("uri={web}")), "{head}");
        assert!(
            !lower.contains("forged") && !lower.contains("x-keyproof-step-up"),
            "{head}"
        );
        assert_eq!(
            lower.matches("x-forwarded-client-cert").count(),
            1,
            "{head}"
        );

        let heads = || app.heads.lock().unwrap().len();
        let before = heads();
        // Refused before the app is dialled, at once (the stream, which
        // never ends, is not drained first): the policy, any path shape...
        for path in ["/admin/x", "/chat/../admin/x", "/%61dmin/x"] {
            let start = std::time::Instant::now();
            let (status, _, body) = switch(&mut send, "websocket", path, &[], b"").await;
            assert_eq!(status, 403, "{path}: {body}");
            assert!(start.elapsed() < std::time::Duration::from_millis(400));
        }
        // ... a length on the stream that is to carry the tunnel...
        let (status, _, body) = switch(
            &mut send,
            "websocket",
            "/chat",
            &[("content-length", "0")],
            b"",
        )
        .await;
        assert_eq!(status, 400, "{body}");
        // ... a :protocol that is no token, or one the sidecar does not
        // carry: h2c would hand the app requests no route decided on.
        let (status, _, body) = switch(&mut send, "web socket", "/chat", &[], b"").await;
        assert_eq!(status, 400, "{body}");
        for other in ["h2c", "H2C", "TLS/1.2", "websocket2"] {
            let (status, _, body) = switch(&mut send, other, "/chat", &[], b"").await;
            assert_eq!(status, 501, "{other}: {body}");
        }
        assert_eq!(heads(), before, "the app saw a refused switch");

        // The app's refusal, as it gave it; an app that ignores Upgrade
        // and answers 200 did not switch: 502.
        let (status, _, body) = switch(&mut send, "websocket", "/deny", &[], b"").await;
        assert_eq!((status, body.as_str()), (403, "no way"));
        let (status, _, body) = switch(&mut send, "websocket", "/plain", &[], b"").await;
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("without switching"), "{body}");
        // An app that never answers: 504 in time.
        let start = std::time::Instant::now();
        let (status, _, body) = switch(&mut send, "websocket", "/silent", &[], b"").await;
        assert_eq!(status, 504, "{body}");
        assert!(start.elapsed() < std::time::Duration::from_secs(5));

        // Switched connections hold tunnel places: a third at once is 503.
        let mut open = Vec::new();
        for _ in 0..2 {
            let req = connect_req("https://api.default.svc/chat", Some("websocket"));
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            open.push(hyper::upgrade::on(resp).await.unwrap());
        }
        let (status, _, body) = switch(&mut send, "websocket", "/chat", &[], b"").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("max_tunnels_per_peer"), "{body}");
        drop(open);
        // Places come back when the switched connections end.
        let mut ok = false;
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let (status, _, _) = switch(&mut send, "websocket", "/chat", &[], b"x").await;
            if status == 200 {
                ok = true;
                break;
            }
        }
        assert!(ok, "tunnel places never came back");
    });
    let limited =
        inbound.metric("keyproof_tcp_connections_total{direction=\"inbound\",result=\"limited\"}");
    assert!(limited >= 1.0, "{limited}");
}

/// The step-up fields `signer` makes for an extended CONNECT (as `method`)
/// to `path` of api.default.svc, for `ch` on the connection `exporter`
/// names, with no body.
fn signed_switch(
    signer: &keyproof_stepup::Signer,
    ch: &keyproof_stepup::Challenge,
    method: http::Method,
    path: &str,
    exporter: &[u8; 32],
) -> Vec<(String, String)> {
    let uri: http::Uri = format!("https://api.default.svc{path}").parse().unwrap();
    let mut h = http::HeaderMap::new();
    let view = keyproof_stepup::RequestView::new(&method, &uri, &h);
    let signed = signer
        .sign(ch, &view, b"", exporter, keyproof_stepup::unix_now())
        .expect("signed");
    signed.apply_into(&mut h);
    h.iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn a_switch_on_a_step_up_route_is_proven_over_the_connect_as_sent_and_never_replayed() {
    use keyproof_stepup::Challenge;
    use keyproof_tests::stepup_caller::signer_for;
    let rt = runtime(2);
    let app = rt.block_on(raw_app());
    let pki = Pki::new(TD);
    let web_cert = pki.issue("web", "/ns/default/sa/web");
    let web = pki.id("/ns/default/sa/web");
    let (inbound, in_addr) = inbound_alone(
        &pki,
        app.addr,
        &format!(
            "default_policy = \"deny\"\n\
             [[inbound.routes]]\npath_prefix = \"/pay\"\nallow = [\"{web}\"]\nstep_up = true\n"
        ),
    );
    let signer = signer_for(&web_cert);
    rt.block_on(async {
        let (mut send, exporter) = h2_caller_bound(in_addr, &pki, &web_cert).await;
        let heads = || app.heads.lock().unwrap().len();

        // Unsigned: a challenge, and the app never hears of it.
        let (status, fields, body) = switch(&mut send, "websocket", "/pay/ws", &[], b"").await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(heads(), 0);
        let ch = Challenge::from_headers(&fields)
            .unwrap()
            .expect("a challenge");

        // Signed over what travels (CONNECT, :authority, :path, no body):
        // switched, and the app learns it was proven, without the proof.
        let proof = signed_switch(&signer, &ch, http::Method::CONNECT, "/pay/ws", &exporter);
        let refs: Vec<(&str, &str)> = proof
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (status, _, got) = switch(&mut send, "websocket", "/pay/ws", &refs, b"frames").await;
        assert_eq!(status, 200, "{got}\n{}", inbound.log_text());
        assert_eq!(got, "frames");
        let head = app
            .heads
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap()
            .to_ascii_lowercase();
        assert!(head.starts_with("get /pay/ws http/1.1\r\n"), "{head}");
        assert!(head.contains("x-keyproof-step-up: verified\r\n"), "{head}");
        assert!(
            head.contains("x-keyproof-step-up-reason: always\r\n"),
            "{head}"
        );
        for f in ["signature", "signature-input", "stepup-binding"] {
            assert!(!head.contains(&format!("\n{f}:")), "{f}: {head}");
        }

        // The same proof again: a replay, refused; the app sees nothing.
        let before = heads();
        let (status, fields, _) = switch(&mut send, "websocket", "/pay/ws", &refs, b"").await;
        assert_eq!(status, 401);
        let www = fields[http::header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(www.contains("replay"), "{www}");
        // Signed as the GET the app is handed, not the CONNECT sent: no.
        let ch = Challenge::from_headers(&fields)
            .unwrap()
            .expect("a fresh challenge");
        let as_get = signed_switch(&signer, &ch, http::Method::GET, "/pay/ws", &exporter);
        let refs: Vec<(&str, &str)> = as_get
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (status, fields, _) = switch(&mut send, "websocket", "/pay/ws", &refs, b"").await;
        assert_eq!(status, 401);
        let www = fields[http::header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(www.contains("bad_signature"), "{www}");
        assert_eq!(heads(), before, "the app saw a refused switch");
    });
    assert_eq!(
        inbound.metric("keyproof_stepup_verifications_total{result=\"replay\"}"),
        1.0
    );
}

/// Sends through a tunnel or switch opened to [`raw_app`] (which reads a
/// head first, then echoes) and waits for the echo: it carries bytes.
async fn carries(io: &mut hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    io.write_all(b"GET /t HTTP/1.1\r\n\r\nhello").await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"hello") {
        let mut b = [0u8; 256];
        let n = io.read(&mut b).await.unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&b[..n]);
    }
}

#[test]
fn a_policy_change_cuts_the_tunnels_sockets_and_connections_it_no_longer_allows() {
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncReadExt;
    let rt = runtime(2);
    let (app, tcp_app) = rt.block_on(async { (raw_app().await, raw_app().await) });
    let pki = Pki::new(TD);
    let web_cert = pki.issue("web", "/ns/default/sa/web");
    let web = pki.id("/ns/default/sa/web");
    let port = tcp_app.addr.port();
    let v1 = format!(
        "[[routes]]\npath_prefix = \"/\"\nallow = [\"{web}\"]\n\
         [[tcp]]\nport = {port}\nallow = [\"{web}\"]\n"
    );
    let policy = pki.path("policy.toml");
    std::fs::write(&policy, &v1).unwrap();
    let (inbound, in_addr) = inbound_alone(
        &pki,
        app.addr,
        &format!("policy_file = {:?}\n", policy.display().to_string()),
    );
    rt.block_on(async {
        let mut send = h2_caller(in_addr, &pki, &web_cert).await;
        // A switched connection and an opaque TCP tunnel, both open and
        // carrying bytes.
        let mut open = Vec::new();
        for (uri, protocol) in [
            ("https://api.default.svc/chat".to_owned(), Some("websocket")),
            (format!("127.0.0.1:{port}"), None),
        ] {
            let resp = send
                .send_request(connect_req(&uri, protocol))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{}", inbound.log_text());
            let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
            carries(&mut io).await;
            open.push(io);
        }
        // A switch still being set up when the policy changes: the app
        // takes its time to answer.
        let mut late = send.clone();
        let setting_up = tokio::spawn(async move {
            let req = connect_req("https://api.default.svc/slow", Some("websocket"));
            late.send_request(req).await.unwrap().status()
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // web is no longer allowed: the route and the tcp rule now name
        // ops only.
        let ops = pki.id("/ns/ops/sa/admin");
        write_renamed(
            &policy,
            &format!(
                "[[routes]]\npath_prefix = \"/\"\nallow = [\"{ops}\"]\n\
                 [[tcp]]\nport = {port}\nallow = [\"{ops}\"]\n"
            ),
        );
        // Both are cut (a reset, not a clean end) within the reload.
        for mut io in open {
            let mut b = [0u8; 64];
            let end = tokio::time::timeout(std::time::Duration::from_secs(10), io.read(&mut b))
                .await
                .expect("cut in time");
            assert!(end.is_err(), "a clean end instead of a reset: {end:?}");
        }
        // The one being set up is refused, not opened for a moment.
        assert_eq!(setting_up.await.unwrap(), 403);
        // And a new switch is refused.
        let req = connect_req("https://api.default.svc/chat", Some("websocket"));
        assert_eq!(send.send_request(req).await.unwrap().status(), 403);

        // web allowed again, and on a response that streams for ever...
        write_renamed(&policy, &v1);
        let mut body = None;
        for _ in 0..100 {
            let req = http::Request::get("https://api.default.svc/stream")
                .body(http_body_util::Empty::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            if resp.status() == 200 {
                body = Some(resp.into_body());
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let mut body = body.expect("web allowed again");
        use http_body_util::BodyExt;
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        // ... until web goes on the deny list: its connection closes with
        // all it carries.
        write_renamed(&policy, &format!("{v1}[[deny]]\nspiffe_id = \"{web}\"\n"));
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while let Some(Ok(_)) = body.frame().await {}
        })
        .await;
        assert!(ended.is_ok(), "the stream outlived the deny list");
        let req = http::Request::get("https://api.default.svc/chat")
            .body(http_body_util::Empty::new())
            .unwrap();
        assert!(
            send.send_request(req).await.is_err(),
            "the connection is still open"
        );
        // A new connection of the deny-listed caller gets the deny list's
        // 403, then ends: a denied caller holds no connection place.
        let mut again = h2_caller(in_addr, &pki, &web_cert).await;
        let get = || {
            http::Request::get("https://api.default.svc/chat")
                .body(http_body_util::Empty::new())
                .unwrap()
        };
        let resp = again.send_request(get()).await.expect("an answer");
        assert_eq!(resp.status(), 403);
        let mut ended = false;
        for _ in 0..50 {
            if again.send_request(get()).await.is_err() {
                ended = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(ended, "a deny-listed caller's connection stays open");
    });
    assert_eq!(
        inbound.metric("keyproof_tcp_connections_total{direction=\"inbound\",result=\"revoked\"}"),
        3.0
    );
    assert_eq!(
        inbound.metric("keyproof_policy_closed_connections_total"),
        1.0
    );
}

/// Writes `text` over the policy file `policy` of `inbound` and waits for
/// its reload.
fn reload_policy(inbound: &ProxyProc, policy: &std::path::Path, text: &str) {
    let reloads = || inbound.metric("keyproof_policy_reloads_total{result=\"ok\"}");
    let before = reloads();
    write_renamed(policy, text);
    for _ in 0..100 {
        if reloads() > before {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the policy was not reloaded:\n{}", inbound.log_text());
}

/// A switch proven on an `always` route was decided on by that route's
/// rules: a reload that makes the route decide by risk, with a deny rule
/// that fires for the handshake, cuts it, as it refuses it made again. Its
/// proof does not carry it past rules that never saw it.
#[test]
fn a_proven_switch_is_cut_when_its_route_gets_rules_that_deny_it() {
    use std::io::{Read, Write};
    let rt = runtime(1);
    let app = rt.block_on(raw_app());
    let pki = Pki::new(TD);
    let web = pki.id("/ns/default/sa/web");
    let rest = format!("[[routes]]\npath_prefix = \"/\"\nallow = [\"{web}\"]\n");
    let always = format!(
        "[[routes]]\npath_prefix = \"/ws\"\nallow = [\"{web}\"]\nstep_up = \"always\"\n{rest}"
    );
    let risky = format!(
        "[[routes]]\npath_prefix = \"/ws\"\nallow = [\"{web}\"]\nstep_up = \"risk\"\nrisk = [\"kp\"]\n{rest}\
         [[risk_rules]]\nname = \"kp\"\nheader = \"x-country\"\none_of = [\"KP\"]\naction = \"deny\"\n"
    );
    let policy = pki.path("policy.toml");
    std::fs::write(&policy, &always).unwrap();
    let (inbound, outbound, out_addr) = pair(
        &pki,
        app.addr,
        &format!("policy_file = {:?}\n", policy.display().to_string()),
    );
    // An HTTP/1.1 switch through the outbound, which proves it: the
    // status line, and the connection.
    let open = || {
        let mut s = std::net::TcpStream::connect(out_addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
            .unwrap();
        write!(
            s,
            "GET /ws/chat HTTP/1.1\r\nHost: api.default.svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Country: KP\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        (head.lines().next().unwrap_or_default().to_owned(), s)
    };
    let echoes = |s: &mut std::net::TcpStream| {
        let mut b = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
    };
    let (status, mut ws) = open();
    assert!(status.contains(" 101 "), "{status}");
    assert!(echoes(&mut ws), "the proven switch carries nothing");
    assert_eq!(
        outbound.metric("keyproof_stepup_signatures_total{result=\"ok\"}"),
        1.0
    );
    reload_policy(&inbound, &policy, &risky);
    let mut b = [0u8; 16];
    // The reset comes within a few seconds of the reload; a read that
    // times out found the switch still open.
    let ended = match ws.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    assert!(ended, "a proven switch outlived rules that deny it");
    let (status, _) = open();
    assert!(status.contains(" 403 "), "made again: {status}");
}

#[test]
fn a_switch_is_decided_again_when_its_route_turns_to_risk_or_its_rules_change() {
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = runtime(2);
    let app = rt.block_on(raw_app());
    let pki = Pki::new(TD);
    let web_cert = pki.issue("web", "/ns/default/sa/web");
    let web = pki.id("/ns/default/sa/web");
    let open_route = format!("[[routes]]\npath_prefix = \"/\"\nallow = [\"{web}\"]\n");
    // /ws decides by risk: a caller from KP is refused; `extra` lists more.
    let risk_route = |extra: &str| {
        format!(
            "[[routes]]\npath_prefix = \"/ws\"\nallow = [\"{web}\"]\nstep_up = \"risk\"\nrisk = [\"kp\"{extra}]\n\
             {open_route}\
             [[risk_rules]]\nname = \"kp\"\nheader = \"x-country\"\none_of = [\"KP\"]\naction = \"deny\"\n\
             [[risk_rules]]\nname = \"new\"\nnew_peer = \"1h\"\n"
        )
    };
    let policy = pki.path("policy.toml");
    std::fs::write(&policy, &open_route).unwrap();
    let (inbound, in_addr) = inbound_alone(
        &pki,
        app.addr,
        &format!("policy_file = {:?}\n", policy.display().to_string()),
    );
    let reload = |text: &str| reload_policy(&inbound, &policy, text);
    rt.block_on(async {
        let send = h2_caller(in_addr, &pki, &web_cert).await;
        // A switch on /ws, carrying bytes, or its status when refused.
        let open = |country: &'static str| {
            let mut send = send.clone();
            async move {
                let mut req = connect_req("https://api.default.svc/ws/chat", Some("websocket"));
                req.headers_mut()
                    .insert("x-country", country.parse().unwrap());
                let resp = send.send_request(req).await.unwrap();
                if resp.status() != 200 {
                    return Err(resp.status().as_u16());
                }
                let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
                carries(&mut io).await;
                Ok(io)
            }
        };
        async fn cut(io: &mut TokioIo<hyper::upgrade::Upgraded>) -> bool {
            let mut b = [0u8; 64];
            match tokio::time::timeout(std::time::Duration::from_secs(3), io.read(&mut b)).await {
                Ok(r) => r.is_err(),
                Err(_) => false,
            }
        }
        async fn alive(io: &mut TokioIo<hyper::upgrade::Upgraded>) -> bool {
            if io.write_all(b"ping").await.is_err() {
                return false;
            }
            let mut b = [0u8; 4];
            matches!(
                tokio::time::timeout(std::time::Duration::from_secs(3), io.read_exact(&mut b))
                    .await,
                Ok(Ok(4))
            ) && &b == b"ping"
        }
        // Made when no rule decided on /ws; /ws then decides by risk, and
        // its deny rule fires for this caller: cut, as a new one is refused.
        let mut kp = open("KP").await.expect("no rule on /ws yet");
        reload(&risk_route(""));
        assert!(
            cut(&mut kp).await,
            "a switch the new rules deny stayed open"
        );
        assert_eq!(open("KP").await.err(), Some(403));
        // Made under these rules (none fired): a reload that leaves /ws
        // and its rules as they are keeps it...
        let mut de = open("DE").await.expect("no rule fires");
        let other = pki.id("/ns/other/sa/x");
        reload(&format!(
            "{}[[deny]]\nspiffe_id = \"{other}\"\n",
            risk_route("")
        ));
        assert!(alive(&mut de).await, "an unrelated change cut the switch");
        // ... and one that changes them decides on it again (made again,
        // it meets `new`, a challenge).
        reload(&risk_route(", \"new\""));
        assert!(
            cut(&mut de).await,
            "a switch outlived a change of its route's rules"
        );
        assert_eq!(open("DE").await.err(), Some(401));
    });
    assert_eq!(
        inbound.metric("keyproof_tcp_connections_total{direction=\"inbound\",result=\"revoked\"}"),
        2.0
    );
}

#[test]
fn an_apps_reset_reaches_the_client_through_the_mesh_as_a_reset() {
    use std::io::{Read, Write};
    let rt = runtime(1);
    let app = rt.block_on(raw_app());
    let pki = Pki::new(TD);
    let (_inbound, _outbound, out_addr) = pair(&pki, app.addr, "");
    let mut s = std::net::TcpStream::connect(out_addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"GET /reset HTTP/1.1\r\nHost: api.default.svc\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let end = loop {
        let mut b = [0u8; 1024];
        match s.read(&mut b) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) => break Err(e),
        }
    };
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 101 "), "{got}");
    assert!(got.ends_with("partial"), "{got}");
    // A clean end would pass the truncated stream off as complete.
    let e = end.expect_err("a clean end instead of a reset");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

/// One HTTP/2 `GET` of `path`, written frame by frame: the preface, empty
/// SETTINGS, and a HEADERS frame whose fields are HPACK literals (no
/// Huffman, no indexing). Nothing else is ever sent: no SETTINGS ack, no
/// PING answer.
fn bare_h2_get(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (k, v) in [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "api.default.svc"),
    ] {
        block.push(0x00);
        block.push(k.len() as u8);
        block.extend_from_slice(k.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let len = block.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    // HEADERS, END_STREAM | END_HEADERS, stream 1.
    out.extend_from_slice(&[1, 0x5, 0, 0, 0, 1]);
    out.extend_from_slice(&block);
    out
}

#[test]
fn a_denied_caller_that_will_not_end_gracefully_is_cut_and_frees_its_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = runtime(2);
    let app = rt.block_on(raw_app());
    let pki = Pki::new(TD);
    let (web_cert, ops_cert) = (
        pki.issue("web", "/ns/default/sa/web"),
        pki.issue("ops", "/ns/ops/sa/admin"),
    );
    let (web, ops) = (pki.id("/ns/default/sa/web"), pki.id("/ns/ops/sa/admin"));
    let (_inbound, in_addr) = inbound_alone(
        &pki,
        app.addr,
        &format!(
            "max_connections = 1\n\
             [[inbound.routes]]\npath_prefix = \"/\"\nallow = [\"{web}\", \"{ops}\"]\n\
             [[inbound.deny]]\nspiffe_id = \"{web}\"\n"
        ),
    );
    rt.block_on(async {
        // web, on the deny list, takes the only connection place and never
        // answers the PING a graceful HTTP/2 end waits for.
        let mut tls = mtls_stream(in_addr, &pki, &web_cert, b"h2").await;
        tls.write_all(&bare_h2_get("/stream")).await.unwrap();
        let start = std::time::Instant::now();
        let mut seen = Vec::new();
        let end = tokio::time::timeout(std::time::Duration::from_secs(8), async {
            let mut b = [0u8; 4096];
            loop {
                match tls.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&b[..n]),
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the denied caller's connection was never cut");
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        // Its 403 went out first (the refusal's body names the deny list).
        let text = String::from_utf8_lossy(&seen);
        assert!(
            text.contains("deny list"),
            "no refusal before the cut: {text:?}"
        );
        // The place is free: an allowed caller is served.
        let mut ops_send = h2_caller(in_addr, &pki, &ops_cert).await;
        let req = http::Request::get("https://api.default.svc/plain")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            ops_send.send_request(req),
        )
        .await
        .expect("ops waited for a place")
        .unwrap();
        assert_eq!(resp.status(), 200);
    });
}
