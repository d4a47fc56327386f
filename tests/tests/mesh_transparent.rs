//! The transparent mesh between two "pods" on one machine: network
//! namespaces A, B and C on one bridge (`keyproof_tests::netns`). A runs
//! unmodified curl and psql as an unprivileged uid, B runs nginx on :8080
//! and PostgreSQL on :5432 on all its addresses, A and B each run a sidecar
//! and `keyproof-proxy redirect`; C has neither.
//!
//! The sidecars run as root and `redirect --proxy-uid 0`, the apps and
//! clients as uid 65534: the temp directories holding keys and configs are
//! root-only and the binary may sit under a directory another uid cannot
//! traverse, while the uid-owner exclusion is the same rule for any uid.
//!
//! Needs root (CI runs as root). Without it the tests print a notice and
//! pass, unless `CI` is set.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keyproof_tests::netns::{
    can_run, curl, list_namespaces, namespace_pids, psql, redirected_connections, Capture, Pod,
    PodNginx, PodPostgres, Pods, Sidecar, SUBNET,
};
use keyproof_tests::proxy_support::{identity_toml, Pki};
use keyproof_tests::{bin, run, run_ok};

const TD: &str = "pods.test";
const TOOLS: &[&str] = &["nginx", "psql", "tcpdump", "setpriv", "curl", "bash"];
const INBOUND: u16 = 15443;
const OUTBOUND: u16 = 15001;
const ADMIN: u16 = 15090;
const HTTP: u16 = 8080;
const PG: u16 = 5432;

/// The request line an intercepted curl sends; it must never be seen on the
/// wire between the pods.
const REQUEST_LINE: &str = "GET / HTTP/1.1";

/// The harness alone, no sidecar: pods reach each other, nginx and
/// PostgreSQL in B answer A's unprivileged clients, the capture sees plain
/// HTTP when there is some (so the mesh test's "TLS only" check can fail),
/// and everything is gone after drop, stale namespaces of a dead process
/// included.
#[test]
fn harness_pods_services_capture_and_teardown() {
    if !can_run(TOOLS) {
        return;
    }
    // A namespace left behind by a test process that no longer exists,
    // with a process still in it: the next Pods::create() removes both.
    let stale = "kp-999999999-0-a";
    run(Command::new("ip").args(["netns", "del", stale]));
    run_ok(Command::new("ip").args(["netns", "add", stale]));
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", stale, "sleep", "300"])
        .spawn()
        .expect("spawn sleep");
    // (Another test's Pods::create() may sweep it first: either way it must
    // be gone, with its process, once ours returns.)
    std::thread::sleep(Duration::from_millis(100));

    let names: Vec<String>;
    let pids: Vec<u32>;
    {
        let pods = Pods::create();
        assert!(
            !list_namespaces().iter().any(|n| n == stale),
            "stale namespace not swept"
        );
        assert!(
            sleeper.try_wait().expect("try_wait").is_some(),
            "the stale namespace's process still runs"
        );
        names = pods.names().iter().map(|s| s.to_string()).collect();
        let all = list_namespaces();
        for n in &names {
            assert!(all.contains(n), "{n} missing from {all:?}");
        }

        let nginx = PodNginx::start(&pods, &pods.b, HTTP);
        let pg = PodPostgres::start(&pods, &pods.b, PG);

        // The app uid really is the app uid.
        let uid = run_ok(pods.a.cmd_app("id").arg("-u"));
        assert_eq!(uid.trim(), "65534");

        // Plain HTTP from A to B, captured on B's interface: the request
        // line is there to be found, and nginx echoes the header it got.
        let cap = Capture::start(&pods, &pods.b, "plain");
        let url = format!("http://{}/", pods.b.addr(HTTP));
        let (code, body, rc) = curl(
            &pods.a,
            &["-H", "x-forwarded-client-cert: URI=spiffe://x/probe", &url],
        );
        assert_eq!((code, rc), (200, 0), "{body}\n{}", nginx.error_log());
        assert_eq!(body, "xfcc=URI=spiffe://x/probe\nxff=\nstepup=\n");
        let text = cap.stop();
        assert!(
            text.contains(REQUEST_LINE),
            "the capture missed a plain request:\n{text}"
        );
        assert!(text.contains(&format!("{}.{HTTP}", pods.b.ip)), "{text}");
        let log = nginx.access_log();
        assert_eq!(log, format!("{} 200 /\n", pods.a.ip), "{log}");

        // psql from A as the app uid, over TCP to B's address.
        assert_eq!(
            psql(&pods.a, pods.b.addr(PG), "select 1").as_deref(),
            Ok("1"),
            "{}",
            pg.log_text()
        );
        // C reaches B as well.
        let (code, _, _) = curl(&pods.c, &[&url]);
        assert_eq!(code, 200);
        // A fresh namespace's nat table is the same in two dumps (the
        // before/after comparison of `redirect --remove` relies on it).
        assert_eq!(pods.a.nat_rules(), pods.a.nat_rules());

        pids = names.iter().flat_map(|n| namespace_pids(n)).collect();
        assert!(pids.contains(&nginx.pid()), "{pids:?}");
        assert!(
            pids.len() >= 3,
            "nginx and the postmaster's family: {pids:?}"
        );
        drop(pg);
        drop(nginx);
    }
    let all = list_namespaces();
    for n in &names {
        assert!(!all.contains(n), "{n} left behind: {all:?}");
    }
    for p in pids {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists(),
            "process {p} of a pod survived the teardown"
        );
    }
    let _ = sleeper.wait();
}

/// `keyproof-proxy redirect ARGS` in `pod`; must succeed.
fn redirect(pod: &Pod, args: &[&str]) -> String {
    run_ok(pod.cmd(bin("keyproof-proxy")).arg("redirect").args(args))
}

fn sidecar_config(identity: &str, inbound_extra: &str, outbound_extra: &str) -> String {
    format!(
        "{identity}[inbound]\nlisten = \"0.0.0.0:{INBOUND}\"\napp = \"127.0.0.1:{HTTP}\"\n{inbound_extra}\n\
         [outbound]\nlisten = \"127.0.0.1:{OUTBOUND}\"\nconnect_timeout = \"2s\"\n{outbound_extra}\n\
         [admin]\nlisten = \"0.0.0.0:{ADMIN}\"\n"
    )
}

#[test]
fn transparent_mesh_between_pods() {
    if !can_run(TOOLS) {
        return;
    }
    let pods = Pods::create();
    let (a, b, c) = (&pods.a, &pods.b, &pods.c);
    let nat_before = [a.nat_rules(), b.nat_rules(), c.nat_rules()];

    let pki = Pki::new(TD);
    let cert_a = pki.issue("a", "/ns/shop/sa/client");
    let cert_b = pki.issue("b", "/ns/db/sa/server");
    let id_a = pki.id("/ns/shop/sa/client");
    let nginx = PodNginx::start(&pods, b, HTTP);
    let pg = PodPostgres::start(&pods, b, PG);
    // A WebSocket app in B (the `websockets` library), where it is
    // installed (test.sh installs it; KEYPROOF_INTEROP makes it a must).
    let ws_app = ws_python().map(|py| {
        let mut server = b.cmd(py);
        server
            .arg(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ws.py"))
            .args(["server", &WS.to_string()]);
        let app = b.spawn(server, &pods.path("ws.out"));
        let local = std::net::SocketAddr::from(([127, 0, 0, 1], WS));
        assert!(b.wait_port(local, Duration::from_secs(10)));
        app
    });

    // B: every route and the PostgreSQL port admit A only; /su demands
    // step-up.
    let side_b = Sidecar::start(
        &pods,
        b,
        "b",
        &sidecar_config(
            &identity_toml(&pki.bundle, &cert_b),
            &format!(
                "http_ports = [{HTTP}, {WS}]\n\
                 [[inbound.routes]]\npath_prefix = \"/su\"\nallow = [\"{id_a}\"]\nstep_up = true\n\
                 [[inbound.routes]]\npath_prefix = \"/\"\nallow = [\"{id_a}\"]\n\
                 [[inbound.tcp]]\nport = {PG}\nallow = [\"{id_a}\"]\n"
            ),
            "",
        ),
        ADMIN,
    );
    // A: everything on the pods' subnet is meshed, any identity of the
    // trust domain (B's inbound policy is what protects B).
    let side_a = Sidecar::start(
        &pods,
        a,
        "a",
        &sidecar_config(
            &identity_toml(&pki.bundle, &cert_a),
            "",
            &format!(
                "[outbound.stepup]\nmax_body = 200000\n\
                 [[outbound.upstreams]]\ncidr = \"{SUBNET}\"\nidentity = \"spiffe://{TD}/*\"\n"
            ),
        ),
        ADMIN,
    );
    let logs = || {
        format!(
            "--- sidecar A:\n{}\n--- sidecar B:\n{}\n--- nginx:\n{}",
            side_a.log_text(),
            side_b.log_text(),
            nginx.error_log()
        )
    };

    for pod in [a, b] {
        redirect(pod, &["--proxy-uid", "0"]);
    }
    // Idempotent: a second run leaves one copy of the rules.
    let nat_a = a.nat_rules();
    assert_ne!(nat_a, nat_before[0], "redirect installed nothing");
    redirect(a, &["--proxy-uid", "0"]);
    assert_eq!(a.nat_rules(), nat_a, "a second redirect changed the rules");
    // Connections the apps in A make; each must be redirected exactly once.
    let mut a_conns = 0;

    // HTTP: unmodified curl, intercepted both ends, TLS only on the wire.
    let cap = Capture::start(&pods, b, "mesh");
    let url = format!("http://{}/", b.addr(HTTP));
    let (code, body, rc) = curl(a, &["-H", "X-Forwarded-For: 127.0.0.1", &url]);
    a_conns += 1;
    assert_eq!((code, rc), (200, 0), "{body}\n{}", logs());
    assert!(
        body.starts_with("xfcc=") && body.contains(&format!("URI={id_a}")),
        "B's app must see A's SPIFFE ID in XFCC: {body}"
    );
    // And A's address as the last hop, after what A's app claimed.
    assert!(
        body.contains(&format!("\nxff=127.0.0.1, {}\n", a.ip)),
        "{body}"
    );
    assert!(body.ends_with("stepup=\n"), "{body}");
    // psql through the tunnel, in the same capture.
    assert_eq!(
        psql(a, b.addr(PG), "select 1").as_deref(),
        Ok("1"),
        "{}\n--- postgres:\n{}",
        logs(),
        pg.log_text()
    );
    a_conns += 1;
    // PostgreSQL sees the tunnel come from 127.0.0.6, which its default
    // pg_hba.conf (trust for 127.0.0.1) does not trust.
    assert_eq!(
        psql(a, b.addr(PG), "select inet_client_addr()").as_deref(),
        Ok("127.0.0.6")
    );
    a_conns += 1;
    let big = "select count(*) from generate_series(1, 200000)";
    assert_eq!(psql(a, b.addr(PG), big).as_deref(), Ok("200000"));
    a_conns += 1;
    // A WebSocket from an unmodified client: switched at B's app, its
    // messages carried both ways, A's identity in the app's XFCC.
    if ws_app.is_some() {
        let mut client = a.cmd_app("/usr/bin/python3");
        client.args(["-c", WS_CLIENT, &b.ip.to_string(), &WS.to_string()]);
        let out = run(&mut client);
        a_conns += 1;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.first().copied(),
            Some("HTTP/1.1 101 Switching Protocols"),
            "{text}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs()
        );
        assert_eq!(lines.get(1).copied(), Some("accept-ok"), "{text}");
        let seen: serde_json::Value =
            serde_json::from_str(lines.get(2).copied().unwrap_or_default())
                .unwrap_or_else(|e| panic!("the app's JSON: {e}\n{text}"));
        assert_eq!(seen["path"], "/ws/chat", "{text}");
        assert!(
            seen["xfcc"]
                .as_str()
                .is_some_and(|x| x.contains(&format!("URI={id_a}"))),
            "{text}"
        );
        assert_eq!(
            lines.get(3).copied(),
            Some("echo: hello through the mesh"),
            "{text}"
        );
        assert_eq!(lines.get(4).copied(), Some("close: 1000"), "{text}");
    }
    let text = cap.stop();
    // The sidecar dialled B's address and port itself (B redirected it).
    assert!(text.contains(&format!("{}.{HTTP}", b.ip)), "{text}");
    assert!(text.contains(&format!("{}.{PG}", b.ip)), "{text}");
    for plain in [
        REQUEST_LINE,
        "xfcc=",
        "select 1",
        "generate_series",
        "GET /ws/chat",
        "URI=spiffe",
    ] {
        assert!(
            !text.contains(plain),
            "{plain:?} crossed between the pods in clear:\n{text}"
        );
    }
    assert!(
        side_b.sample(
            "keyproof_tcp_connections_total",
            &[("direction", "inbound"), ("result", "ok")]
        ) >= 2.0,
        "{}",
        side_b.admin("/metrics").1
    );
    assert!(
        side_a.sample(
            "keyproof_tcp_connections_total",
            &[("direction", "outbound"), ("result", "ok")]
        ) >= 2.0,
        "{}",
        side_a.admin("/metrics").1
    );

    // A step-up route, for the same unmodified curl: A's outbound answers
    // the challenge.
    let (code, body, _) = curl(a, &["-d", "amount=5", &format!("{url}su/pay")]);
    a_conns += 1;
    assert_eq!(code, 200, "{body}\n{}", logs());
    assert!(body.ends_with("stepup=verified\n"), "{body}");
    assert!(
        side_b.sample("keyproof_stepup_verifications_total", &[("result", "ok")]) >= 1.0,
        "{}",
        side_b.admin("/metrics").1
    );

    // C has no sidecar: straight to B:8080 and B:5432 it lands on B's
    // inbound, fails the handshake, and B's apps never see it.
    let (code, body, _) = curl(c, &[&format!("{url}from-c")]);
    assert_eq!(code, 0, "C was served: {body}");
    let (connected, reply) = c.raw_tcp(b.addr(HTTP), "GET /raw-c HTTP/1.1\r\nHost: b\r\n\r\n");
    assert!(
        !reply.contains("xfcc=") && !reply.contains("200 OK"),
        "C got an answer (connected: {connected}): {reply}"
    );
    assert!(
        psql(c, b.addr(PG), "select 1").is_err(),
        "C reached PostgreSQL"
    );
    let log = nginx.access_log();
    assert!(
        !log.contains(&c.ip.to_string()) && !log.contains("from-c") && !log.contains("raw-c"),
        "nginx saw C: {log}"
    );
    // Everything nginx saw came from B's own inbound over loopback, from
    // 127.0.0.6: never from 127.0.0.1, which apps trust as a local
    // process.
    assert!(
        !log.is_empty() && log.lines().all(|l| l.starts_with("127.0.0.6 ")),
        "{log}"
    );
    assert!(
        !pg.log_text().contains(&c.ip.to_string()),
        "{}",
        pg.log_text()
    );

    // Not looped: A's nat redirected exactly the apps' connections (the
    // sidecar's own dials, and the sidecars' admin probes, were left alone).
    assert_eq!(
        redirected_connections(a, OUTBOUND),
        a_conns,
        "{}",
        run_ok(a.cmd("iptables-save").args(["-c", "-t", "nat"]))
    );
    // B redirected the mesh connections and C's attempts, nothing else.
    assert!(redirected_connections(b, INBOUND) >= 2);
    assert_eq!(redirected_connections(b, OUTBOUND), 0, "B's inbound looped");

    // --remove restores both namespaces; C was never touched.
    for pod in [a, b] {
        redirect(pod, &["--remove"]);
    }
    assert_eq!(a.nat_rules(), nat_before[0], "A after --remove");
    assert_eq!(b.nat_rules(), nat_before[1], "B after --remove");
    assert_eq!(c.nat_rules(), nat_before[2], "C changed");
    // Without the rules, A's curl goes straight to nginx, unmeshed.
    let (code, body, _) = curl(a, &[&url]);
    assert_eq!((code, body.as_str()), (200, "xfcc=\nxff=\nstepup=\n"));
    let last = nginx.access_log();
    assert!(last.ends_with(&format!("{} 200 /\n", a.ip)), "{last}");
}

/// The WebSocket app's port in B.
const WS: u16 = 8081;

/// The venv's Python with `websockets` (root only: the venv's interpreter
/// is the image's pyenv one, under root's home).
fn ws_python() -> Option<String> {
    keyproof_tests::proxy_support::interop_python("websockets")
}

/// An unmodified WebSocket client in A (the standard library only, as the
/// unprivileged uid): the handshake to ADDR PORT /ws/chat, the app's first
/// message (its JSON), one text message and its echo, then the close
/// handshake. Prints the status line, whether the accept key is right, the
/// JSON, `echo: TEXT` and `close: CODE`.
const WS_CLIENT: &str = r#"
import base64, hashlib, os, socket, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
c = socket.create_connection((host, port), timeout=10)
key = base64.b64encode(os.urandom(16)).decode()
c.sendall(("GET /ws/chat HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\n"
           "Upgrade: websocket\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
           % (host, port, key)).encode())
buf = b""
while b"\r\n\r\n" not in buf:
    d = c.recv(4096)
    if not d:
        print("closed: " + repr(buf)); sys.exit(0)
    buf += d
head, buf = buf.split(b"\r\n\r\n", 1)
print(head.split(b"\r\n")[0].decode())
accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
print("accept-ok" if accept in head else "accept-bad")
def need(n):
    global buf
    while len(buf) < n:
        d = c.recv(65536)
        if not d:
            raise SystemExit("closed inside a frame")
        buf += d
    out, buf = buf[:n], buf[n:]
    return out
def frame():
    b0, b1 = need(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", need(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", need(8))[0]
    return b0 & 0x0F, need(n)
def send(op, payload):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    c.sendall(bytes([0x80 | op, 0x80 | len(payload)]) + mask + masked)
print(frame()[1].decode())
send(1, b"hello through the mesh")
print("echo: " + frame()[1].decode())
send(8, struct.pack("!H", 1000))
op, payload = frame()
print("close: %d" % struct.unpack("!H", payload[:2])[0] if op == 8 else "no close frame")
"#;

/// A plain HTTP/1.1 server outside the mesh (pod C): answers every request
/// 200 on a kept connection, and writes every byte it receives to a file.
const RECORDING_SERVER: &str = r#"
import socket, sys, threading
port, log = int(sys.argv[1]), sys.argv[2]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(16)
def serve(c):
    buf = b""
    while True:
        d = c.recv(65536)
        if not d:
            return
        with open(log, "ab") as f:
            f.write(d)
        buf += d
        while b"\r\n\r\n" in buf:
            _, buf = buf.split(b"\r\n\r\n", 1)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// An app in A: one connection to ADDR PORT, each argument a request sent
/// after the previous one's response; prints each response's status line,
/// or how the connection ended.
const KEEPALIVE_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
c = socket.create_connection((host, port), timeout=5)
for req in sys.argv[3:]:
    try:
        c.sendall(req.encode().decode("unicode_escape").encode("latin-1"))
        got = c.recv(4096)
        print(got.split(b"\r\n")[0].decode() if got else "closed")
    except OSError as e:
        print("error", e.errno)
"#;

#[test]
fn a_passed_through_connection_never_carries_a_meshed_request() {
    if !can_run(&["python3", "setpriv", "bash"]) {
        return;
    }
    let pods = Pods::create();
    let (a, c) = (&pods.a, &pods.c);
    let pki = Pki::new(TD);
    let cert_a = pki.issue("a", "/ns/shop/sa/client");
    // C has no sidecar and no rule names its address: outside the mesh.
    let log = pods.path("plain.log");
    let mut server = c.cmd("/usr/bin/python3");
    server.args(["-c", RECORDING_SERVER, "8080"]).arg(&log);
    let _plain = c.spawn(server, &pods.path("plain.out"));
    assert!(c.wait_port(c.addr(HTTP), Duration::from_secs(10)));
    // A meshes Kubernetes service names only.
    let side_a = Sidecar::start(
        &pods,
        a,
        "a",
        &sidecar_config(
            &identity_toml(&pki.bundle, &cert_a),
            "",
            &format!(
                "[[outbound.upstreams]]\nhost = \"*.{{namespace}}.svc.cluster.local\"\n\
                 identity = \"spiffe://{TD}/ns/{{namespace}}/sa/*\"\n"
            ),
        ),
        ADMIN,
    );
    redirect(a, &["--proxy-uid", "0"]);
    let client = |requests: &[&str]| {
        let mut cmd = a.cmd_app("/usr/bin/python3");
        cmd.args(["-c", KEEPALIVE_CLIENT, &c.ip.to_string(), "8080"]);
        cmd.args(requests);
        run(&mut cmd)
    };
    let plain = r"GET /plain HTTP/1.1\r\nHost: example.org\r\n\r\n";
    let meshed = r"GET /meshed HTTP/1.1\r\nHost: api.db.svc.cluster.local\r\nAuthorization: Bearer s3cret-1\r\n\r\n";
    // A WebSocket handshake the server declines (it answers 200 and reads
    // on), then the meshed request: still judged.
    let declined = r"GET /ws HTTP/1.1\r\nHost: example.org\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    let smuggled = r"POST /cl-te HTTP/1.1\r\nHost: example.org\r\nTransfer-Encoding: chunked\r\nContent-Length: 70\r\n\r\n0\r\n\r\nGET /m HTTP/1.1\r\nHost: api.db.svc.cluster.local\r\nX-S: s3cret-2\r\n\r\n";
    // Methods some servers take and others refuse (round 11 mesh F1: taken
    // for opaque TCP, the connection went on unjudged).
    let lowercase = r"get /lower HTTP/1.1\r\nHost: example.org\r\n\r\n";
    let custom = r"PURGE_CACHE /custom HTTP/1.1\r\nHost: example.org\r\n\r\n";
    for (requests, first) in [
        (vec![plain, meshed], "HTTP/1.1 200 OK"),
        (vec![declined, meshed], "HTTP/1.1 200 OK"),
        (vec![plain, smuggled], "HTTP/1.1 200 OK"),
        (vec![lowercase, meshed], "HTTP/1.1 200 OK"),
        (vec![custom, meshed], "HTTP/1.1 200 OK"),
    ] {
        let out = client(&requests);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.first().copied(),
            Some(first),
            "{text}\n{}\n--- sidecar A:\n{}",
            String::from_utf8_lossy(&out.stderr),
            side_a.log_text()
        );
        assert!(
            lines.get(1).is_some_and(|l| *l != "HTTP/1.1 200 OK"),
            "the second request was answered: {text}"
        );
    }
    // A raw byte beyond ASCII in the target (Node sends `/José` so), tabs,
    // a version in lower case: HTTP/1 all the same, served or refused, and
    // the meshed request after it never leaves in plain text.
    for odd in [
        r"GET /Jos\xe9 HTTP/1.1\r\nHost: example.org\r\n\r\n",
        r"GET\t/tab HTTP/1.1\r\nHost: example.org\r\n\r\n",
        r"GET /lower http/1.1\r\nHost: example.org\r\n\r\n",
    ] {
        let _ = client(&[odd, meshed]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let seen = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    assert!(seen.contains("/plain") && seen.contains("/ws"), "{seen}");
    assert!(
        !seen.contains("s3cret") && !seen.contains("api.db"),
        "a meshed request reached the plain server:\n{seen}"
    );
    assert!(
        side_a.sample(
            "keyproof_tcp_connections_total",
            &[("direction", "outbound"), ("result", "passthrough")]
        ) >= 3.0,
        "{}",
        side_a.admin("/metrics").1
    );
    // HTTP/2 without TLS (a gRPC client, say) to a server outside the
    // mesh: A's sidecar serves it stream by stream, and the stream no rule
    // takes goes on in plain HTTP/2 to where curl sent it.
    let h2c = PodNginx::start_h2c(&pods, c, H2C);
    let url = format!("http://{}:{H2C}/h2c-outside", c.ip);
    let (code, body, rc) = curl(a, &["--http2-prior-knowledge", &url]);
    assert_eq!(
        (code, rc),
        (200, 0),
        "{body}\n--- sidecar A:\n{}\n--- nginx:\n{}",
        side_a.log_text(),
        h2c.error_log()
    );
    assert!(body.starts_with("xfcc=\n"), "{body}");
    assert!(
        h2c.access_log().contains("/h2c-outside"),
        "{}",
        h2c.access_log()
    );
    redirect(a, &["--remove"]);
}

/// An HTTP/2-only server (prior knowledge) in pod C.
const H2C: u16 = 8082;

/// A dual-stack server (`[::]`, as Go, Java and Node listen by default):
/// answers `plain` to every connection.
const DUAL_STACK_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1]))); s.listen(16)
while True:
    c, _ = s.accept()
    c.sendall(b"plain\n"); c.close()
"#;

/// Connects to ADDR PORT; prints what came back, or the error number.
const PROBE_CLIENT: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print(c.recv(64).decode().strip() or "closed")
except OSError as e:
    print("error", e.errno)
"#;

/// The pod's IPv6 link-local address as `fe80::...%iface`, once it has
/// left duplicate address detection.
fn link_local(pod: &Pod) -> Option<String> {
    for _ in 0..50 {
        let out = run_ok(pod.cmd("ip").args([
            "-6", "-o", "addr", "show", "dev", pod.iface, "scope", "link",
        ]));
        if let Some(line) = out.lines().find(|l| l.contains("fe80::")) {
            if !line.contains("tentative") {
                let addr = line
                    .split_whitespace()
                    .skip_while(|w| *w != "inet6")
                    .nth(1)?;
                let addr = addr.split('/').next()?;
                return Some(format!("{addr}%{}", pod.iface));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn ipv6_is_refused_not_let_past_the_sidecar() {
    if !can_run(&["python3", "setpriv"]) {
        return;
    }
    if !Path::new("/proc/net/if_inet6").exists() {
        eprintln!("NOTICE: no IPv6 in this kernel: nothing to refuse");
        return;
    }
    let pods = Pods::create();
    let (a, b, c) = (&pods.a, &pods.b, &pods.c);
    const PORT: &str = "8083";
    let mut server = b.cmd("/usr/bin/python3");
    server.args(["-c", DUAL_STACK_SERVER, PORT]);
    let _b_app = b.spawn(server, &pods.path("dual-b.out"));
    let mut server = c.cmd("/usr/bin/python3");
    server.args(["-c", DUAL_STACK_SERVER, PORT]);
    let _c_app = c.spawn(server, &pods.path("dual-c.out"));
    assert!(b.wait_port(b.addr(8083), Duration::from_secs(10)));
    assert!(c.wait_port(c.addr(8083), Duration::from_secs(10)));
    let (b6, c6) = (
        link_local(b).expect("B's link-local address"),
        link_local(c).expect("C's link-local address"),
    );
    // A dials from its own, which must have left duplicate address
    // detection too.
    link_local(a).expect("A's link-local address");
    let probe = |from: &Pod, to: &str, app: bool| {
        let mut cmd = if app {
            from.cmd_app("/usr/bin/python3")
        } else {
            from.cmd("/usr/bin/python3")
        };
        cmd.args(["-c", PROBE_CLIENT, to, PORT]);
        String::from_utf8_lossy(&run(&mut cmd).stdout)
            .trim()
            .to_owned()
    };
    // Without the rules, a pod with no sidecar reaches B's app over
    // link-local IPv6, in plain text; and A's app reaches C.
    assert_eq!(probe(c, &b6, false), "plain");
    assert_eq!(probe(a, &c6, true), "plain");
    redirect(b, &["--proxy-uid", "2102"]);
    redirect(a, &["--proxy-uid", "2102"]);
    // With them, IPv6 TCP is refused both ways (reset: ECONNREFUSED), as
    // IPv4 goes to the sidecar.
    assert_eq!(probe(c, &b6, false), "error 111", "into B");
    assert_eq!(probe(a, &c6, true), "error 111", "out of A");
    // The proxy's uid still dials out.
    let mut as_proxy = a.cmd_as(2102, 2102, "/usr/bin/python3");
    as_proxy.args(["-c", PROBE_CLIENT, &c6, PORT]);
    assert_eq!(
        String::from_utf8_lossy(&run(&mut as_proxy).stdout).trim(),
        "plain"
    );
    let filter6 = run_ok(b.cmd("ip6tables").args(["-S"]));
    assert!(
        filter6.contains("-A INPUT -p tcp -j KEYPROOF_INBOUND"),
        "{filter6}"
    );
    // --remove restores both families.
    redirect(b, &["--remove"]);
    redirect(a, &["--remove"]);
    let filter6 = run_ok(b.cmd("ip6tables").args(["-S"]));
    assert!(!filter6.contains("KEYPROOF"), "{filter6}");
    assert_eq!(probe(c, &b6, false), "plain");
}

/// The Service range 10.96.0.0/16 as a cluster has it: pod A routes it to
/// the node, and the node translates it as kube-proxy does (iptables mode):
/// each of `dnat` is one `PREROUTING` DNAT rule, its match and where it
/// sends the connection. The backends see the node's address.
fn service_range(pods: &Pods, dnat: &[(String, std::net::SocketAddr)]) {
    const GATEWAY: &str = "10.77.0.254";
    let node = |line: String| {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &pods.node])
                .args(line.split_whitespace()),
        )
    };
    node(format!("ip addr add {GATEWAY}/24 dev br0"));
    node("sysctl -qw net.ipv4.ip_forward=1".into());
    for (matches, to) in dnat {
        node(format!(
            "iptables -t nat -A PREROUTING -p tcp {matches} -j DNAT --to-destination {to}"
        ));
    }
    node(format!(
        "iptables -t nat -A POSTROUTING -d {SUBNET} -m conntrack --ctstate DNAT -j MASQUERADE"
    ));
    run_ok(
        pods.a
            .cmd("ip")
            .args(["route", "add", "10.96.0.0/16", "via", GATEWAY]),
    );
}

/// A Service address: kube-proxy's DNAT in the node, half the connections
/// to B and half to C, both meshed. Each of A's app connections (and each
/// TCP tunnel) gets a mesh connection of its own, dialled to the Service
/// address, so kube-proxy balances them as it would without the mesh; a
/// sidecar pooling one connection per destination would send all of them
/// to whichever backend its first dial met.
#[test]
fn a_service_address_is_balanced_per_app_connection() {
    if !can_run(TOOLS) {
        return;
    }
    const VIP: &str = "10.96.0.10";
    let pods = Pods::create();
    let (a, b, c) = (&pods.a, &pods.b, &pods.c);
    let pki = Pki::new(TD);
    let cert_a = pki.issue("a", "/ns/shop/sa/client");
    let cert_srv = pki.issue("srv", "/ns/web/sa/server");
    let id_a = pki.id("/ns/shop/sa/client");
    // The node balances the Service address, as kube-proxy does.
    service_range(
        &pods,
        &[
            (
                format!("-d {VIP} --dport 80 -m statistic --mode random --probability 0.5"),
                b.addr(HTTP),
            ),
            (format!("-d {VIP} --dport 80"), c.addr(HTTP)),
        ],
    );

    let nginx_b = PodNginx::start(&pods, b, HTTP);
    let nginx_c = PodNginx::start(&pods, c, HTTP);
    let server = sidecar_config(
        &identity_toml(&pki.bundle, &cert_srv),
        &format!("[[inbound.routes]]\npath_prefix = \"/\"\nallow = [\"{id_a}\"]\n"),
        "",
    );
    let side_b = Sidecar::start(&pods, b, "b", &server, ADMIN);
    let side_c = Sidecar::start(&pods, c, "c", &server, ADMIN);
    // The Service range meshed by a cidr rule, `balance` left to its
    // default.
    let side_a = Sidecar::start(
        &pods,
        a,
        "a",
        &sidecar_config(
            &identity_toml(&pki.bundle, &cert_a),
            "",
            &format!(
                "[[outbound.upstreams]]\ncidr = \"10.96.0.0/16\"\nidentity = \"spiffe://{TD}/ns/web/*\"\n"
            ),
        ),
        ADMIN,
    );
    for pod in [a, b, c] {
        redirect(pod, &["--proxy-uid", "0"]);
    }
    let logs = || {
        format!(
            "--- sidecar A:\n{}\n--- sidecar B:\n{}\n--- sidecar C:\n{}",
            side_a.log_text(),
            side_b.log_text(),
            side_c.log_text()
        )
    };
    let url = format!("http://{VIP}/");
    const RUNS: usize = 20;
    for i in 0..RUNS {
        // A new curl, so a new app connection, each time.
        let (code, body, rc) = curl(a, &[&url]);
        assert_eq!((code, rc), (200, 0), "run {i}: {body}\n{}", logs());
        assert!(body.contains(&format!("URI={id_a}")), "run {i}: {body}");
    }
    let served = |n: &PodNginx| {
        n.access_log()
            .lines()
            .filter(|l| l.contains(" 200 /"))
            .count()
    };
    let (on_b, on_c) = (served(&nginx_b), served(&nginx_c));
    assert_eq!(
        on_b + on_c,
        RUNS,
        "B:\n{}\nC:\n{}",
        nginx_b.access_log(),
        nginx_c.access_log()
    );
    // All 20 on one side has probability 2^-19 with per-connection
    // balancing, and is certain with one pooled connection.
    assert!(
        on_b > 0 && on_c > 0,
        "B served {on_b}, C served {on_c}\n{}",
        logs()
    );
}

/// A Service whose `port` is not its `targetPort` (6432 to PostgreSQL's
/// 5432, as a pgbouncer-style Service maps it): A's outbound names the
/// Service's port in its CONNECT (that is what the app dialled), the node
/// translates the connection to B's 5432, and B's inbound tunnels to the
/// port the connection was delivered to, as HTTP goes there, never to a
/// local 127.0.0.1:6432 that only shares the Service's number (round 11
/// mesh F5: the tunnel went to the authority's port).
#[test]
fn a_tunnel_through_a_service_goes_to_the_port_the_connection_was_delivered_to() {
    if !can_run(TOOLS) {
        return;
    }
    const VIP: &str = "10.96.0.12";
    const SERVICE_PORT: u16 = 6432;
    let pods = Pods::create();
    let (a, b) = (&pods.a, &pods.b);
    let pki = Pki::new(TD);
    let cert_a = pki.issue("a", "/ns/shop/sa/client");
    let cert_b = pki.issue("b", "/ns/db/sa/server");
    let id_a = pki.id("/ns/shop/sa/client");
    service_range(
        &pods,
        &[(format!("-d {VIP} --dport {SERVICE_PORT}"), b.addr(PG))],
    );
    let _pg = PodPostgres::start(&pods, b, PG);
    // Without the mesh the Service reaches PostgreSQL.
    assert_eq!(
        psql(
            a,
            format!("{VIP}:{SERVICE_PORT}").parse().unwrap(),
            "select 1"
        )
        .as_deref(),
        Ok("1")
    );
    // A rule for the Service's port number too: the tunnel must still go
    // to 5432, where nothing on 6432 would answer.
    let side_b = Sidecar::start(
        &pods,
        b,
        "b",
        &sidecar_config(
            &identity_toml(&pki.bundle, &cert_b),
            &format!(
                "[[inbound.tcp]]\nport = {PG}\nallow = [\"{id_a}\"]\n\
                 [[inbound.tcp]]\nport = {SERVICE_PORT}\nallow = [\"{id_a}\"]\n"
            ),
            "",
        ),
        ADMIN,
    );
    let side_a = Sidecar::start(
        &pods,
        a,
        "a",
        &sidecar_config(
            &identity_toml(&pki.bundle, &cert_a),
            "",
            &format!(
                "opaque_ports = [{SERVICE_PORT}]\n[[outbound.upstreams]]\ncidr = \"10.96.0.0/16\"\nidentity = \"spiffe://{TD}/ns/db/*\"\n"
            ),
        ),
        ADMIN,
    );
    for pod in [a, b] {
        redirect(pod, &["--proxy-uid", "0"]);
    }
    let got = psql(
        a,
        format!("{VIP}:{SERVICE_PORT}").parse().unwrap(),
        "select 1",
    );
    assert_eq!(
        got.as_deref(),
        Ok("1"),
        "--- sidecar A:\n{}\n--- sidecar B:\n{}",
        side_a.log_text(),
        side_b.log_text()
    );
    assert_eq!(
        side_b.sample(
            "keyproof_tcp_connections_total",
            &[("direction", "inbound"), ("result", "ok")]
        ),
        1.0
    );
}
