//! `[outbound] upstreams_file` through the real binaries: a changed file
//! routes the next requests without a restart, a broken one is refused,
//! logged with the file and key, counted, and the rules in use keep
//! serving.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keyproof_tests::free_port;
use keyproof_tests::proxy_support::*;

const TD: &str = "reload.test";

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn rule(host: &str, address: SocketAddr) -> String {
    format!(
        "[[upstreams]]\nhost = \"{host}\"\naddress = \"{address}\"\nidentity = \"spiffe://{TD}/ns/default/sa/api\"\n"
    )
}

/// The status of a plain GET for `host` through the outbound.
fn status(out: SocketAddr, host: &str) -> u16 {
    curl(&[
        "--noproxy",
        "*",
        "-H",
        &format!("Host: {host}"),
        &format!("http://{out}/x"),
    ])
    .0
}

/// Polls until a GET for `host` answers `want` (a reload is asynchronous).
fn wait_status(out: SocketAddr, host: &str, want: u16, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = status(out, host);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host}: {got}, wanted {want}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_changed_upstreams_file_routes_without_a_restart_and_a_broken_one_is_refused() {
    let pki = Pki::new(TD);
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let client = pki.issue("client", "/ns/default/sa/web");
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let _inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{}\"\n[admin]\nlisten = \"{in_admin}\"\n",
            identity_toml(&pki.bundle, &server),
            app.addr
        ),
        in_admin,
    );
    let file = pki.path("upstreams.toml");
    std::fs::write(&file, rule("a.test", in_addr)).unwrap();
    let outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\nupstreams_file = {:?}\n[admin]\nlisten = \"{out_admin}\"\n",
            identity_toml(&pki.bundle, &client),
            file.display().to_string()
        ),
        out_admin,
    );
    let log = || outbound.log_text();
    assert_eq!(status(out_addr, "a.test"), 200, "{}", log());
    assert_eq!(status(out_addr, "b.test"), 502, "{}", log());

    // b.test added: taken into use without a restart.
    write_renamed(
        &file,
        &format!("{}{}", rule("a.test", in_addr), rule("b.test", in_addr)),
    );
    wait_status(out_addr, "b.test", 200, log);
    assert!(
        outbound.wait_sample("keyproof_upstream_reloads_total", &[("result", "ok")], 1.0) >= 1.0
    );

    // A rule of another trust domain: refused, named, counted; both hosts
    // still served by the rules in use.
    write_renamed(
        &file,
        "[[upstreams]]\nhost = \"a.test\"\naddress = \"127.0.0.1:9\"\nidentity = \"spiffe://elsewhere.test/ns/x/sa/y\"\n",
    );
    let failed = outbound.wait_sample(
        "keyproof_upstream_reloads_total",
        &[("result", "failed")],
        1.0,
    );
    assert!(failed >= 1.0, "{}", log());
    let text = log();
    assert!(
        text.lines()
            .any(|l| l.contains("upstreams.toml") && l.contains("upstreams[0].identity")),
        "the refusal does not name the file and key:\n{text}"
    );
    assert_eq!(status(out_addr, "a.test"), 200, "{}", log());
    assert_eq!(status(out_addr, "b.test"), 200, "{}", log());

    // Not TOML at all: refused again, still serving.
    write_renamed(&file, "[[upstreams]\nhost = ");
    let again = outbound.wait_sample(
        "keyproof_upstream_reloads_total",
        &[("result", "failed")],
        failed + 1.0,
    );
    assert!(again > failed, "{}", log());
    assert_eq!(status(out_addr, "b.test"), 200, "{}", log());

    // A good file after bad ones: b.test gone, a.test kept.
    write_renamed(&file, &rule("a.test", in_addr));
    wait_status(out_addr, "b.test", 502, log);
    assert_eq!(status(out_addr, "a.test"), 200, "{}", log());
}
