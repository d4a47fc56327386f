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
        assert_eq!(body, "xfcc=URI=spiffe://x/probe\nstepup=\n");
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

    // B: every route and the PostgreSQL port admit A only; /su demands
    // step-up.
    let side_b = Sidecar::start(
        &pods,
        b,
        "b",
        &sidecar_config(
            &identity_toml(&pki.bundle, &cert_b),
            &format!(
                "[[inbound.routes]]\npath_prefix = \"/su\"\nallow = [\"{id_a}\"]\nstep_up = true\n\
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
    let (code, body, rc) = curl(a, &[&url]);
    a_conns += 1;
    assert_eq!((code, rc), (200, 0), "{body}\n{}", logs());
    assert!(
        body.starts_with("xfcc=") && body.contains(&format!("URI={id_a}")),
        "B's app must see A's SPIFFE ID in XFCC: {body}"
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
    let big = "select count(*) from generate_series(1, 200000)";
    assert_eq!(psql(a, b.addr(PG), big).as_deref(), Ok("200000"));
    a_conns += 1;
    let text = cap.stop();
    // The sidecar dialled B's address and port itself (B redirected it).
    assert!(text.contains(&format!("{}.{HTTP}", b.ip)), "{text}");
    assert!(text.contains(&format!("{}.{PG}", b.ip)), "{text}");
    for plain in [REQUEST_LINE, "xfcc=", "select 1", "generate_series"] {
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
    // Everything nginx saw came from B's own inbound over loopback.
    assert!(
        !log.is_empty() && log.lines().all(|l| l.starts_with("127.0.0.1 ")),
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
    assert_eq!((code, body.as_str()), (200, "xfcc=\nstepup=\n"));
    let last = nginx.access_log();
    assert!(last.ends_with(&format!("{} 200 /\n", a.ip)), "{last}");
}
