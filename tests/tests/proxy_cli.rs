//! `keyproof-proxy check-config`, startup errors and `quickstart --once`.

use std::time::Duration;

use keyproof_tests::proxy_support::*;
use keyproof_tests::{cmd, free_port, run_err, run_ok};

fn check(pki: &Pki, name: &str, text: &str) -> String {
    let path = pki.path(&format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    run_err(
        cmd("keyproof-proxy")
            .arg("check-config")
            .arg("--config")
            .arg(&path),
    )
}

#[test]
fn check_config_accepts_the_bench_contract_and_names_bad_keys() {
    let pki = Pki::new("bench.local");
    let server = pki.issue("server", "/ns/default/sa/server");
    let client = pki.issue("client", "/ns/default/sa/client");
    let id = identity_toml(&pki.bundle, &server);

    // Exactly what ../shared/bench/sidecars.sh writes.
    let bench_in = format!(
        "[identity]\ntrust_bundle = {:?}\n[runtime]\nworker_threads = 1\n[identity.files]\ncert = {:?}\nkey = {:?}\n[inbound]\nlisten = \"127.0.0.1:15443\"\napp = \"127.0.0.1:18080\"\n[admin]\nlisten = \"127.0.0.1:15092\"\n",
        pki.bundle, server.crt, server.key
    );
    let bench_out = format!(
        "[identity]\ntrust_bundle = {:?}\n[runtime]\nworker_threads = 1\n[identity.files]\ncert = {:?}\nkey = {:?}\n[outbound]\nlisten = \"127.0.0.1:15001\"\n[[outbound.upstreams]]\nhost = \"*\"\naddress = \"127.0.0.1:15443\"\nidentity = \"spiffe://bench.local/ns/default/sa/server\"\n[admin]\nlisten = \"127.0.0.1:15091\"\n",
        pki.bundle, client.crt, client.key
    );
    for (n, t) in [("bench-in", &bench_in), ("bench-out", &bench_out)] {
        let p = pki.path(&format!("{n}.toml"));
        std::fs::write(&p, t).unwrap();
        let out = run_ok(
            cmd("keyproof-proxy")
                .arg("check-config")
                .arg("--config")
                .arg(&p),
        );
        assert!(out.contains("configuration OK"), "{out}");
    }

    let inbound = "[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"127.0.0.1:2\"\n";
    let stranger = Pki::new("bench.local");
    let cases = [
        (
            format!("{id}{inbound}[[inbound.routes]]\npath_prefix = \"/a\"\n[[inbound.routes]]\npath_prefix = \"/b\"\nallow = [\"spiffe://bench.local/ok\", \"https://nope\"]\n"),
            "inbound.routes[1].allow[1]: invalid SPIFFE ID",
        ),
        (format!("{id}{inbound}colour = \"blue\"\n"), "colour"),
        (
            format!("{id}{inbound}[[inbound.routes]]\npath_prefix = \"/\"\nallow = [\"spiffe://elsewhere.test/ns/x/*\"]\n"),
            "inbound.routes[0].allow[0]: spiffe://elsewhere.test/ns/x/* is in trust domain elsewhere.test",
        ),
        (format!("{id}[outbound]\nlisten = \"localhost\"\n"), "outbound.listen"),
        (
            format!("{id}[outbound]\nlisten = \"127.0.0.1:1\"\n[[outbound.upstreams]]\nhost = \"x\"\naddress = \"no-port\"\nidentity = \"spiffe://bench.local/x\"\n"),
            "outbound.upstreams[0].address",
        ),
        (format!("{id}{inbound}default_policy = \"maybe\"\n"), "inbound.default_policy"),
        (format!("{id}{inbound}handshake_timeout = \"soon\"\n"), "inbound.handshake_timeout"),
        (format!("{id}{inbound}[inbound.stepup]\nnonce_ttl = \"x\"\n"), "inbound.stepup.nonce_ttl"),
        (format!("{id}{inbound}[runtime]\nlog_format = \"xml\"\n"), "runtime.log_format"),
        (
            format!("[identity]\ntrust_bundle = {:?}\n[identity.files]\ncert = \"/nonexistent/tls.crt\"\nkey = {:?}\n{inbound}", pki.bundle, server.key),
            "identity.files.cert: cannot read /nonexistent/tls.crt",
        ),
        (
            // The client's key with the server's certificate.
            format!("[identity]\ntrust_bundle = {:?}\n[identity.files]\ncert = {:?}\nkey = {:?}\n{inbound}", pki.bundle, server.crt, client.key),
            "identity.files.key: private key does not match",
        ),
        (
            // Not an SVID: the bundle (a CA certificate) as the leaf.
            format!("[identity]\ntrust_bundle = {:?}\n[identity.files]\ncert = {:?}\nkey = {:?}\n{inbound}", pki.bundle, pki.bundle, server.key),
            "identity.files.cert: not a valid X.509-SVID",
        ),
        (
            // A bundle from another CA.
            format!("[identity]\ntrust_bundle = {:?}\n[identity.files]\ncert = {:?}\nkey = {:?}\n{inbound}", stranger.bundle, server.crt, server.key),
            "identity.files.cert: does not verify against identity.trust_bundle",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let err = check(&pki, &format!("bad{i}"), text);
        assert!(err.contains(want), "case {i}: expected {want:?} in:\n{err}");
    }
}

#[test]
fn run_fails_before_binding_on_bad_identity() {
    let pki = Pki::new("prod.test");
    let server = pki.issue("server", "/ns/default/sa/api");
    let other = pki.issue("other", "/ns/default/sa/other");
    let port = free_port();
    let text = format!(
        "[identity]\ntrust_bundle = {:?}\n[identity.files]\ncert = {:?}\nkey = {:?}\n[inbound]\nlisten = \"127.0.0.1:{port}\"\napp = \"127.0.0.1:1\"\n",
        pki.bundle, server.crt, other.key
    );
    let path = pki.path("bad.toml");
    std::fs::write(&path, text).unwrap();
    let err = run_err(cmd("keyproof-proxy").arg("run").arg("--config").arg(&path));
    assert!(err.contains("identity.files.key"), "{err}");
    // The port was never bound.
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[test]
fn quickstart_once_exits_zero() {
    let start = std::time::Instant::now();
    let full = cmd("keyproof-proxy")
        .args(["quickstart", "--once"])
        .output()
        .expect("run quickstart");
    assert!(full.status.success(), "{full:?}");
    let out = String::from_utf8_lossy(&full.stdout).into_owned();
    // Its keys are written 0600 like every key (round 11: 0644, and the
    // sidecars warned about their own demo keys).
    let err = String::from_utf8_lossy(&full.stderr);
    assert!(!err.contains("readable by every user"), "{err}");
    assert!(out.contains("200 OK"), "{out}");
    assert!(out.contains("403 Forbidden"), "{out}");
    assert!(out.contains("/metrics"), "{out}");
    assert!(out.contains("curl "), "{out}");
    assert!(start.elapsed() < Duration::from_secs(30));
}
