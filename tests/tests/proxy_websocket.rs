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
    let py = std::env::var("KEYPROOF_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import websockets"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(py);
    }
    if std::env::var_os("KEYPROOF_INTEROP").is_some() {
        panic!("KEYPROOF_INTEROP is set but {py} lacks websockets");
    }
    eprintln!("skipping: {py} lacks websockets (set KEYPROOF_PYTHON)");
    None
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
/// `/admin` (ops only), and demands step-up on `/pay`.
fn mesh(py: String) -> Mesh {
    let pki = Pki::new(TD);
    let closes = pki.tmp.path().join("closes");
    let app = WsApp::start(&py, &closes);
    let server = pki.issue("server", "/ns/default/sa/api");
    let client = pki.issue("client", "/ns/default/sa/web");
    let web = pki.id("/ns/default/sa/web");
    let ops = pki.id("/ns/ops/sa/admin");
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{}\"\ndefault_policy = \"deny\"\n\
             [[inbound.routes]]\npath_prefix = \"/chat\"\nallow = [\"{web}\"]\n\
             [[inbound.routes]]\npath_prefix = \"/reject\"\nallow = [\"{web}\"]\n\
             [[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"{ops}\"]\n\
             [[inbound.routes]]\npath_prefix = \"/pay\"\nallow = [\"{web}\"]\nstep_up = true\n\
             [admin]\nlisten = \"{in_admin}\"\n",
            identity_toml(&pki.bundle, &server),
            app.addr
        ),
        in_admin,
    );
    let outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\n\
             [[outbound.upstreams]]\nhost = \"api.default.svc\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://{TD}/ns/default/sa/api\"\n\
             [admin]\nlisten = \"{out_admin}\"\n",
            identity_toml(&pki.bundle, &client)
        ),
        out_admin,
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
        let out = Command::new(&self.py)
            .arg(script())
            .args([
                "client",
                &self.out_addr.port().to_string(),
                "api.default.svc",
                path,
                &messages.to_string(),
            ])
            .output()
            .expect("ws client");
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
    // A step-up route does not carry switches, and says so.
    let r = m.client("/pay/socket", 1);
    assert_eq!(r["status"], 501, "{r}");
    assert!(r["body"].as_str().unwrap().contains("step-up"), "{r}");
    // The app's own refusal reaches the client as it gave it.
    let r = m.client("/reject/here", 1);
    assert_eq!(r["status"], 404, "{r}");
    assert_eq!(r["body"], "no such socket here\n", "{r}");

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
