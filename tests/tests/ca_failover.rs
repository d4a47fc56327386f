//! `[identity.ca]` and `keyproof-ca renew` with several CA replicas, with
//! the real binaries on loopback: two `keyproof-ca serve` on one CA
//! directory (the directory store; PostgreSQL is the same for the client).
//!
//! - A sidecar pair renewing 10 s SVIDs from `url = [A, B]` under steady
//!   traffic while A is killed (its address then blackholed: connections
//!   accepted, TLS never answered), restarted, and then B killed: no failed
//!   renewal, no failed request, and the renewals while A was down came
//!   from B (then from A while B was).
//! - A list whose first URLs are dead (a closed port, a listener that never
//!   answers TLS) bootstraps through the next one.
//! - Every URL dead: the error names each URL tried.
//! - A name resolving to several addresses is one endpoint per address.
//! - A refusal (4xx) is the CA's answer: no failover.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keyproof_ca::client::{new_key, CaClient, ClientError};
use keyproof_identity::keys::KeyType;
use keyproof_tests::ca_server::{rt, CaServer};
use keyproof_tests::load::Load;
use keyproof_tests::proxy_support::{http_get, EchoApp, ProxyProc};
use keyproof_tests::{cmd, free_port, run, run_ok, TestCa};
use serde_json::Value;

const TD: &str = "failover.keyproof.test";
const API: &str = "/ns/default/sa/api";
const WEB: &str = "/ns/default/sa/web";
const HOST: &str = "api.default.svc";

/// Every non-`ok` result of `keyproof_identity_renewals_total`.
const FAILED_RESULTS: [&str; 7] = [
    "ca_unreachable",
    "ca_refused",
    "protocol",
    "token_unreadable",
    "invalid",
    "key_unavailable",
    "client_cert_rejected",
];

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// `keyproof-ca serve` with 10 s SVIDs (the issue's figure; the CA allows
/// down to 1 s) and no rate limit (sidecars renew every ~6 s).
fn serve(ca: &TestCa, port: u16) -> CaServer {
    CaServer::start_on(ca, port, &["--ttl", "10s", "--rate-limit", "0"])
}

fn token(ca: &TestCa, path: &str, name: &str) -> PathBuf {
    let token = run_ok(
        cmd("keyproof-ca")
            .args(["token", "create", "--dir"])
            .arg(&ca.dir)
            .args(["--spiffe-id", &format!("spiffe://{TD}{path}")]),
    );
    let file = ca.path(&format!("{name}.token"));
    std::fs::write(&file, token).unwrap();
    file
}

/// `[identity]` with `[identity.ca] url = urls` and a join token for
/// `path`.
fn identity_toml(ca: &TestCa, urls: &[String], path: &str, name: &str) -> String {
    let token_file = token(ca, path, name);
    let bootstrap = ca.path(&format!("{name}-bootstrap.pem"));
    std::fs::copy(ca.bundle(), &bootstrap).unwrap();
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[identity]\ntrust_bundle = {bootstrap:?}\n[identity.ca]\nurl = [{list}]\n\
         spiffe_id = \"spiffe://{TD}{path}\"\njoin_token_file = {token_file:?}\nbundle_refresh = \"1s\"\n"
    )
}

fn identity(admin: SocketAddr) -> Value {
    let (_, body) = http_get(admin, "/identity").unwrap();
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// The URL of the CA endpoint that issued the certificate in use.
fn issued_by(admin: SocketAddr) -> String {
    identity(admin)["ca_endpoint"]["url"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn renewals(p: &ProxyProc, result: &str) -> f64 {
    p.sample("keyproof_identity_renewals_total", &[("result", result)])
}

fn failovers(p: &ProxyProc) -> f64 {
    p.sample("keyproof_identity_ca_failovers_total", &[])
}

fn failed_renewals(p: &ProxyProc) -> Vec<(&'static str, f64)> {
    FAILED_RESULTS
        .iter()
        .map(|r| (*r, renewals(p, r)))
        .filter(|(_, n)| *n > 0.0)
        .collect()
}

fn wait_until(
    what: &str,
    limit: Duration,
    mut ok: impl FnMut() -> bool,
    logs: impl Fn() -> String,
) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sidecars_renew_through_the_other_replica_while_one_is_killed_and_no_request_fails() {
    let ca = TestCa::new(TD);
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = Some(serve(&ca, port_a));
    let mut b = Some(serve(&ca, port_b));
    let urls = [url(port_a), url(port_b)];
    let app = EchoApp::start();
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let inbound = ProxyProc::start(
        ca.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{}\"\n[admin]\nlisten = \"{in_admin}\"\n",
            identity_toml(&ca, &urls, API, "api"),
            app.addr
        ),
        in_admin,
    );
    let outbound = ProxyProc::start(
        ca.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\n\
             [[outbound.upstreams]]\nhost = \"{HOST}\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://{TD}{API}\"\n\
             [admin]\nlisten = \"{out_admin}\"\n",
            identity_toml(&ca, &urls, WEB, "web"),
        ),
        out_admin,
    );
    let serve_logs = |port: u16| {
        std::fs::read_to_string(ca.path(&format!("serve-{port}.log"))).unwrap_or_default()
    };
    let logs = || {
        format!(
            "--- in\n{}\n--- out\n{}\n--- serve A\n{}\n--- serve B\n{}",
            inbound.log_text(),
            outbound.log_text(),
            serve_logs(port_a),
            serve_logs(port_b)
        )
    };
    let proxies = [(&inbound, in_admin), (&outbound, out_admin)];
    // Both bootstrapped from A, the first URL.
    for (_, admin) in proxies {
        assert_eq!(issued_by(admin), urls[0], "{}", identity(admin));
        let left = identity(admin)["not_after_unix"].as_i64().unwrap()
            - std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
        assert!(left <= 11, "a 10 s certificate: {}", identity(admin));
    }
    let load = Load::start(out_addr, HOST, "/", 4);
    assert!(load.wait_more(50, Duration::from_secs(20)), "{}", logs());
    let oks = |p: &ProxyProc| renewals(p, "ok");
    // Waits for two renewals of each sidecar from the replica at `want`.
    let renewed_from = |want: &str, phase: &str| {
        let before: Vec<f64> = proxies.iter().map(|(p, _)| oks(p)).collect();
        wait_until(
            &format!("two renewals of each sidecar from {want} ({phase})"),
            Duration::from_secs(40),
            || {
                proxies
                    .iter()
                    .zip(&before)
                    .all(|((p, admin), b)| oks(p) >= b + 2.0 && issued_by(*admin) == want)
            },
            logs,
        );
    };
    renewed_from(&urls[0], "both replicas up");

    // A goes away, and its address turns into a blackhole (connections
    // accepted, TLS never answered): renewals continue from B.
    drop(a.take());
    let blackhole = std::net::TcpListener::bind(("127.0.0.1", port_a)).unwrap();
    renewed_from(&urls[1], "A killed");
    let b_issued_while_a_down: Vec<String> =
        proxies.iter().map(|(_, admin)| issued_by(*admin)).collect();

    // A is back; the sidecars stay on B, which still answers.
    drop(blackhole);
    a = Some(serve(&ca, port_a));
    renewed_from(&urls[1], "A restarted");

    // B goes away: renewals continue from the restarted A.
    drop(b.take());
    renewed_from(&urls[0], "B killed");
    assert!(load.wait_more(50, Duration::from_secs(20)), "{}", logs());

    let statuses = load.stop();
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}\n{}",
        failed.len(),
        statuses.len(),
        logs()
    );
    assert!(statuses.len() > 200, "only {} requests", statuses.len());
    assert_eq!(b_issued_while_a_down, [urls[1].clone(), urls[1].clone()]);
    for (p, admin) in proxies {
        assert!(
            failed_renewals(p).is_empty(),
            "failed renewals {:?}\n{}",
            failed_renewals(p),
            logs()
        );
        // Each replica's death was noticed and passed over at least once.
        assert!(failovers(p) >= 2.0, "{}", p.metrics());
        // The metric names the endpoint of the certificate in use.
        assert_eq!(
            p.sample(
                "keyproof_identity_ca_endpoint",
                &[
                    ("url", urls[0].as_str()),
                    ("address", &format!("127.0.0.1:{port_a}"))
                ]
            ),
            1.0,
            "{}",
            p.metrics()
        );
        assert_eq!(identity(admin)["source"]["urls"], serde_json::json!(urls));
        let log = p.log_text();
        assert!(log.contains("trying the next one"), "{log}");
        assert!(!log.contains("PRIVATE KEY"), "{log}");
    }
    println!(
        "failover: {} requests, 0 failed; renewals ok in/out: {}/{}; failovers in/out: {}/{}",
        statuses.len(),
        oks(&inbound),
        oks(&outbound),
        failovers(&inbound),
        failovers(&outbound)
    );
    drop(a);
}

#[test]
fn a_list_with_dead_first_urls_bootstraps_through_the_next() {
    let ca = TestCa::new(TD);
    let live = serve(&ca, free_port());
    // A closed port (refused at once) and a listener that accepts TCP but
    // never answers TLS (a blackholed replica: the per-attempt timeout).
    let closed = free_port();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let urls = [url(closed), url(silent_port), url(live.port)];
    let admin = addr();
    let p = ProxyProc::start(
        ca.tmp.path(),
        "web",
        &format!(
            "{}[outbound]\nlisten = \"{}\"\n[admin]\nlisten = \"{admin}\"\n",
            identity_toml(&ca, &urls, WEB, "web"),
            addr()
        ),
        admin,
    );
    assert_eq!(issued_by(admin), urls[2], "{}", identity(admin));
    assert_eq!(
        identity(admin)["ca_endpoint"]["address"],
        format!("127.0.0.1:{}", live.port)
    );
    assert_eq!(
        p.sample(
            "keyproof_identity_ca_failovers_total",
            &[("op", "bootstrap")]
        ),
        2.0,
        "{}",
        p.metrics()
    );
    assert!(renewals(&p, "ok") >= 1.0, "{}", p.metrics());
    assert!(failed_renewals(&p).is_empty(), "{}", p.metrics());
    let log = p.log_text();
    for u in &urls[..2] {
        assert!(log.contains(u.as_str()), "{u} not in\n{log}");
    }
    drop(silent);
}

/// `keyproof-ca renew --force` of a fresh certificate with `--ca-url` for
/// each of `urls`: (success, stdout + stderr).
fn renew_once(ca: &TestCa, name: &str, urls: &[String]) -> (bool, String) {
    let (crt, key) = ca.issue(name, WEB, &["--ttl", "1h"]);
    let bundle = ca.path("renew-bundle.pem");
    std::fs::copy(ca.bundle(), &bundle).unwrap();
    let mut c = cmd("keyproof-ca");
    c.arg("renew")
        .arg("--cert")
        .arg(&crt)
        .arg("--key")
        .arg(&key);
    c.arg("--bundle").arg(&bundle).arg("--force");
    for u in urls {
        c.args(["--ca-url", u]);
    }
    let out = run(&mut c);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn renew_takes_several_ca_urls_and_names_every_one_when_all_are_down() {
    let ca = TestCa::new(TD);
    let dead = [url(free_port()), url(free_port())];
    let (ok, out) = renew_once(&ca, "dead", &dead);
    assert!(!ok, "{out}");
    assert!(out.contains("no CA endpoint answered"), "{out}");
    for u in &dead {
        assert!(out.contains(u.as_str()), "{u} not in {out}");
    }
    // The same with a live replica last: renewed through it.
    let live = serve(&ca, free_port());
    let (ok, out) = renew_once(
        &ca,
        "live",
        &[dead[0].clone(), dead[1].clone(), url(live.port)],
    );
    assert!(ok, "{out}");
    assert!(out.contains("renewed spiffe://"), "{out}");
    assert!(out.contains("trying the next CA endpoint"), "{out}");
}

#[test]
fn a_refusal_is_the_answer_and_does_not_fail_over() {
    let ca = TestCa::new(TD);
    let (a, b) = (serve(&ca, free_port()), serve(&ca, free_port()));
    let verifier = {
        use keyproof_identity::verify::{SvidVerifier, TrustBundle};
        let bundle = TrustBundle::from_pem(&std::fs::read(ca.bundle()).unwrap()).unwrap();
        std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(SvidVerifier::new(
            keyproof_identity::TrustDomain::parse(TD).unwrap(),
            bundle,
        )))
    };
    let client = CaClient::with_urls(
        &[url(a.port), url(b.port)],
        verifier,
        keyproof_identity::IdPattern::parse(&format!("spiffe://{TD}/keyproof-ca")).unwrap(),
    )
    .unwrap();
    let id = format!("spiffe://{TD}{WEB}");
    let key = new_key(KeyType::EcdsaP256, &id).unwrap();
    let e = rt()
        .block_on(client.bootstrap_for("kpt_not-a-token", &key.csr_pem, Some(&id)))
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Refused { status: 401, .. }),
        "{e}"
    );
    assert!(!e.fails_over());
    assert_eq!(client.last_endpoint().unwrap().url, url(a.port));
    let refusals = |s: &CaServer| {
        keyproof_tests::ca_server::sample(
            &s.scrape(),
            "keyproof_ca_refusals_total{code=\"invalid_token\"}",
        )
        .unwrap_or(0.0)
    };
    assert_eq!(refusals(&a), 1.0, "{}", a.scrape());
    assert_eq!(refusals(&b), 0.0, "B was asked too:\n{}", b.log());
    // A real token from the same client is then issued by A, the replica
    // that answered last.
    let good = std::fs::read_to_string(token(&ca, WEB, "good")).unwrap();
    let issued = rt()
        .block_on(client.bootstrap_for(&good, &key.csr_pem, Some(&id)))
        .unwrap();
    assert_eq!(issued.endpoint.unwrap().url, url(a.port));
}

#[test]
fn a_name_resolving_to_several_addresses_is_one_endpoint_per_address() {
    use std::net::ToSocketAddrs;
    let ca = TestCa::new(TD);
    // Listening on 127.0.0.1 only: when `localhost` also resolves to ::1
    // (as /etc/hosts usually has it), that address is refused and the call
    // fails over to the next address of the same name.
    let server = serve(&ca, free_port());
    let name = format!("https://localhost:{}", server.port);
    let addrs: Vec<SocketAddr> = ("localhost", server.port)
        .to_socket_addrs()
        .unwrap()
        .collect();
    let verifier = {
        use keyproof_identity::verify::{SvidVerifier, TrustBundle};
        let bundle = TrustBundle::from_pem(&std::fs::read(ca.bundle()).unwrap()).unwrap();
        std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(SvidVerifier::new(
            keyproof_identity::TrustDomain::parse(TD).unwrap(),
            bundle,
        )))
    };
    let client = CaClient::with_urls(
        std::slice::from_ref(&name),
        verifier,
        keyproof_identity::IdPattern::parse(&format!("spiffe://{TD}/keyproof-ca")).unwrap(),
    )
    .unwrap();
    for _ in 0..2 {
        let roots = rt().block_on(client.bundle()).unwrap();
        assert!(!roots.is_empty());
        let ep = client.last_endpoint().unwrap();
        assert_eq!(ep.url, name);
        assert_eq!(
            ep.addr,
            SocketAddr::from(([127, 0, 0, 1], server.port)),
            "{addrs:?}"
        );
        assert_eq!(
            ep.to_string(),
            format!("{name} (127.0.0.1:{})", server.port)
        );
    }
}
