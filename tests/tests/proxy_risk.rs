//! Adaptive step-up through the mesh: real sidecar pairs (the real binary,
//! real mutual TLS), a real app that records what it receives and can ask
//! for a caller's proof ([`AskingApp`]), curl as the caller's app, and a
//! direct mTLS caller for what only an attacker sends (replays, expired
//! certificates). Each test checks one behaviour by its outcomes: the status
//! the caller's app got, what the app behind the inbound saw
//! (`x-keyproof-step-up`, `x-keyproof-step-up-reason`), and the inbound's
//! counters.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use http::{HeaderMap, StatusCode};
use keyproof_tests::asking_app::{AskingApp, Seen, ASKED, STEP_UP, STEP_UP_REASON};
use keyproof_tests::load::Load;
use keyproof_tests::proxy_support::*;
use keyproof_tests::stepup_caller::Caller;
use keyproof_tests::{cmd, free_port, run, run_err};
use serde_json::Value;

const TD: &str = "risk.test";
const AUTHORITY: &str = "api.default.svc";
const WEB: &str = "/ns/default/sa/web";
const OPS: &str = "/ns/ops/sa/admin";
/// Every workload of the trust domain.
const ALL: &str = "spiffe://risk.test/ns/*";

fn id(path: &str) -> String {
    format!("spiffe://{TD}{path}")
}

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A caller workload: its certificate and its outbound sidecar.
struct Workload {
    name: String,
    cert: Cert,
    outbound: ProxyProc,
    out_addr: SocketAddr,
}

/// An app behind an inbound sidecar, called by workloads through their
/// outbound sidecars.
struct Mesh {
    app: AskingApp,
    inbound: ProxyProc,
    in_addr: SocketAddr,
    callers: Vec<Workload>,
    pki: Pki,
}

/// A config line `key = "value"` list: `["a", "b"]`.
fn list(items: &[&str]) -> String {
    let q: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", q.join(", "))
}

/// `[[inbound.routes]]` for `prefix`, admitting every workload.
fn route(prefix: &str, step_up: &str, risk: &[&str]) -> String {
    let mut s = format!(
        "[[inbound.routes]]\npath_prefix = \"{prefix}\"\nallow = [\"{ALL}\"]\nstep_up = {step_up}\n"
    );
    if !risk.is_empty() {
        s.push_str(&format!("risk = {}\n", list(risk)));
    }
    s
}

/// `[[inbound.risk_rules]]` with the given body lines.
fn rule(name: &str, body: &str) -> String {
    format!("[[inbound.risk_rules]]\nname = \"{name}\"\n{body}\n")
}

fn outbound_config(
    pki: &Pki,
    cert: &Cert,
    listen: SocketAddr,
    admin: SocketAddr,
    to: SocketAddr,
) -> String {
    format!(
        "{}[outbound]\nlisten = \"{listen}\"\nconnect_timeout = \"2s\"\n[outbound.stepup]\nmax_body = 200000\n\
         [[outbound.upstreams]]\nhost = \"{AUTHORITY}\"\naddress = \"{to}\"\nidentity = \"{}\"\n\
         [admin]\nlisten = \"{admin}\"\n",
        identity_toml(&pki.bundle, cert),
        id("/ns/default/sa/api")
    )
}

impl Mesh {
    /// Issues certificates for `callers` (name, SPIFFE ID path), starts the
    /// app, the inbound (its `[inbound]` section continued by what `inbound`
    /// returns: keys, then tables) and one outbound per caller.
    fn start(callers: &[(&str, &str)], inbound: impl FnOnce(&Pki, &[Cert]) -> String) -> Mesh {
        let pki = Pki::new(TD);
        let app = AskingApp::start();
        let server = pki.issue("server", "/ns/default/sa/api");
        let certs: Vec<Cert> = callers.iter().map(|(n, p)| pki.issue(n, p)).collect();
        let (in_addr, in_admin) = (addr(), addr());
        let identity = identity_toml(&pki.bundle, &server).replacen(
            "[identity]\n",
            "[identity]\nreload_interval = \"1s\"\n",
            1,
        );
        let cfg = format!(
            "{identity}[inbound]\nlisten = \"{in_addr}\"\napp = \"{}\"\n{}[admin]\nlisten = \"{in_admin}\"\n",
            app.addr,
            inbound(&pki, &certs)
        );
        let inbound = ProxyProc::start(pki.tmp.path(), "in", &cfg, in_admin);
        let callers = callers
            .iter()
            .zip(certs)
            .map(|((name, _), cert)| {
                let (out_addr, out_admin) = (addr(), addr());
                let outbound = ProxyProc::start(
                    pki.tmp.path(),
                    &format!("out-{name}"),
                    &outbound_config(&pki, &cert, out_addr, out_admin, in_addr),
                    out_admin,
                );
                Workload {
                    name: name.to_string(),
                    cert,
                    outbound,
                    out_addr,
                }
            })
            .collect();
        Mesh {
            app,
            inbound,
            in_addr,
            callers,
            pki,
        }
    }

    fn caller(&self, name: &str) -> &Workload {
        self.callers
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no caller {name}"))
    }

    /// The caller's app sends a request through its outbound sidecar with
    /// curl (`args` before the URL, e.g. `-H` or `-d`): (status, body).
    fn call(&self, caller: &str, path: &str, args: &[&str]) -> (u16, String) {
        let w = self.caller(caller);
        let proxy = format!("http://{}", w.out_addr);
        let url = format!("http://{AUTHORITY}{path}");
        let mut all = vec!["-x", proxy.as_str()];
        all.extend_from_slice(args);
        all.push(&url);
        let (code, body, _) = curl(&all);
        (code, body)
    }

    /// [`Mesh::call`] that must be answered 200; returns what the app
    /// behind the inbound saw of it (the last request it received).
    fn ok(&self, caller: &str, path: &str, args: &[&str]) -> Seen {
        let (code, body) = self.call(caller, path, args);
        assert_eq!(
            code,
            200,
            "{caller} {path}: {body}\ninbound log:\n{}\noutbound log:\n{}",
            self.inbound.log_text(),
            self.caller(caller).outbound.log_text()
        );
        assert!(
            !body.contains(ASKED),
            "the app's `required` answer leaked: {body}"
        );
        let seen = self.app.seen();
        let last = seen.last().expect("the app saw the request").clone();
        assert_eq!(last.path, path.split('?').next().unwrap(), "{body}");
        last
    }

    fn challenges(&self, route: &str, reason: &str) -> f64 {
        self.inbound.sample(
            "keyproof_stepup_challenges_total",
            &[("route", route), ("reason", reason)],
        )
    }

    fn verifications(&self, result: &str) -> f64 {
        self.inbound
            .sample("keyproof_stepup_verifications_total", &[("result", result)])
    }
}

/// Asserts that a request reached the app with no step-up at all.
#[track_caller]
fn plain(seen: &Seen) {
    assert!(
        seen.values(STEP_UP).is_empty() && seen.values(STEP_UP_REASON).is_empty(),
        "expected an unverified request: {seen:?}"
    );
}

/// Asserts that a request reached the app verified, for `reason`, with one
/// value of each field.
#[track_caller]
fn verified(seen: &Seen, reason: &str) {
    assert_eq!(seen.values(STEP_UP), ["verified"], "{seen:?}");
    assert_eq!(seen.values(STEP_UP_REASON), [reason], "{seen:?}");
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A certificate for `path` that expired an hour ago, from the trust
/// domain's own CA: presenting it fails the handshake.
fn expired(pki: &Pki, name: &str, path: &str) -> Cert {
    pki.craft(name, &[&id(path)], -7200, -3600)
}

/// Presents `cert` to the inbound `n` times (each handshake refused for
/// `result`) and waits until all `n` are counted.
fn failed_handshakes(mesh: &Mesh, cert: &Cert, result: &str, n: usize) {
    let labels = [("direction", "inbound"), ("result", result)];
    let before = mesh
        .inbound
        .sample("keyproof_tls_handshakes_total", &labels);
    for _ in 0..n {
        let (code, _, _) = curl_mtls(mesh.in_addr, &mesh.pki, cert, "/x", &[]);
        assert_eq!(code, 0, "a {result} certificate was accepted");
    }
    let after =
        mesh.inbound
            .wait_sample("keyproof_tls_handshakes_total", &labels, before + n as f64);
    assert_eq!(after, before + n as f64, "{}", mesh.inbound.log_text());
}

/// Sends a captured (already used) signed request to `path` again `n`
/// times straight to the inbound as `cert`: each is refused as a replay.
fn replays(mesh: &Mesh, cert: &Cert, path: &str, n: usize) -> HeaderMap {
    rt().block_on(async {
        let mut c = Caller::connect(mesh.in_addr, &mesh.pki, cert, AUTHORITY).await;
        let captured = c.spent_proof(path).await;
        for _ in 0..n {
            let r = c.send(path, &captured).await;
            assert_eq!(
                (r.status, r.www()),
                (
                    StatusCode::UNAUTHORIZED,
                    "StepUp error=\"replay\"".to_owned()
                )
            );
        }
        captured
    })
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.find('{').map(|i| &l[i..]))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("result").is_some() && v.get("route").is_some())
        .collect()
}

#[test]
fn new_caller_is_challenged_first_and_not_again_within_the_window() {
    let mesh = Mesh::start(&[("web", WEB), ("ops", OPS)], |_, _| {
        [
            "[inbound.stepup]\naudit_log = true\n".to_owned(),
            rule("new-caller", "new_peer = \"1h\""),
            rule("just-now", "new_peer = \"1s\""),
            route("/new", "\"risk\"", &["new-caller"]),
            route("/fresh", "\"risk\"", &["just-now"]),
        ]
        .concat()
    });

    // First request: challenged, answered by the outbound, verified.
    verified(&mesh.ok("web", "/new/a", &[]), "new-caller");
    assert_eq!(mesh.challenges("/new", "new-caller"), 1.0);
    // Served now: the next ones pass unchallenged, unverified.
    plain(&mesh.ok("web", "/new/b", &[]));
    plain(&mesh.ok("web", "/new/a", &[]));
    // Another identity is new on its own.
    verified(&mesh.ok("ops", "/new/a", &[]), "new-caller");
    plain(&mesh.ok("ops", "/new/c", &[]));
    assert_eq!(mesh.challenges("/new", "new-caller"), 2.0);
    assert_eq!(mesh.verifications("ok"), 2.0);
    assert_eq!(mesh.verifications("missing"), 2.0);
    assert_eq!(
        mesh.app.seen_under("/new").len(),
        5,
        "each request reached the app once"
    );
    // The rule-triggered verification handed out no next nonce, so nothing
    // was signed up front either.
    assert_eq!(
        mesh.caller("web")
            .outbound
            .sample("keyproof_stepup_signatures_total", &[("result", "ok")]),
        1.0
    );

    // "Served" is per route: web is new on /fresh.
    verified(&mesh.ok("web", "/fresh/1", &[]), "just-now");
    // Once the window has passed without a request, it is new again. (A
    // wait, not a synchronisation: the window is what is tested.)
    std::thread::sleep(Duration::from_millis(1500));
    verified(&mesh.ok("web", "/fresh/2", &[]), "just-now");
    assert_eq!(mesh.challenges("/fresh", "just-now"), 2.0);

    // audit_log = true: JSON lines on standard output.
    let ok = eventually(Duration::from_secs(5), || {
        json_lines(&mesh.inbound.log_text())
            .iter()
            .filter(|r| r["route"] == "/new" && r["reason"] == "new-caller")
            .count()
            >= 4
    });
    assert!(
        ok,
        "no audit records on stdout:\n{}",
        mesh.inbound.log_text()
    );
}

#[test]
fn burst_past_the_rate_is_challenged() {
    let mesh = Mesh::start(&[("web", WEB), ("ops", OPS)], |_, _| {
        [
            rule("burst", "rate_above = \"3/1m\""),
            route("/burst", "\"risk\"", &["burst"]),
        ]
        .concat()
    });
    // A burst of 3 passes.
    for i in 0..3 {
        plain(&mesh.ok("web", &format!("/burst/{i}"), &[]));
    }
    // The 4th fires (and so does its signed resend, which counts too).
    verified(&mesh.ok("web", "/burst/3", &[]), "burst");
    assert_eq!(mesh.challenges("/burst", "burst"), 1.0);
    // Per identity: ops has sent nothing yet.
    plain(&mesh.ok("ops", "/burst/0", &[]));
    // Still above the rate within the minute.
    verified(&mesh.ok("web", "/burst/4", &[]), "burst");
    assert_eq!(mesh.challenges("/burst", "burst"), 2.0);
    assert_eq!(mesh.verifications("ok"), 2.0);
}

#[test]
fn header_above_the_threshold_is_challenged_and_below_is_not() {
    let mesh = Mesh::start(&[("web", WEB)], |_, _| {
        [
            rule("big", "header = \"x-amount\"\nabove = 1000"),
            rule("embargo", "header = \"x-country\"\nequals = \"XX\""),
            rule(
                "risky-kind",
                "header = \"x-kind\"\none_of = [\"wire\", \"crypto\"]",
            ),
            rule("flagged", "header = \"x-flag\"\npresent = true"),
            route("/pay", "\"risk\"", &["big"]),
            route("/geo", "\"risk\"", &["embargo"]),
            route("/kind", "\"risk\"", &["risky-kind"]),
            route("/multi", "\"risk\"", &["big", "flagged"]),
        ]
        .concat()
    });
    let cases: &[(&str, &[&str], Option<&str>)] = &[
        ("/pay/t", &["x-amount: 999"], None),
        ("/pay/t", &["x-amount: 1000"], None),
        ("/pay/t", &[], None),
        ("/pay/t", &["x-amount: 1000.5"], Some("big")),
        ("/pay/t", &["x-amount: 25000"], Some("big")),
        // Not a number: counts as above, the safe direction.
        ("/pay/t", &["x-amount: lots"], Some("big")),
        ("/geo/t", &["x-country: YY"], None),
        ("/geo/t", &["x-country: XX"], Some("embargo")),
        ("/kind/t", &["x-kind: cash"], None),
        ("/kind/t", &["x-kind: wire"], Some("risky-kind")),
        ("/multi/t", &[], None),
        ("/multi/t", &["x-flag: 1"], Some("flagged")),
        // Both fire: the first listed names the reason.
        ("/multi/t", &["x-flag: 1", "x-amount: 5000"], Some("big")),
    ];
    for (path, headers, reason) in cases {
        let mut args = Vec::new();
        for h in *headers {
            args.extend_from_slice(&["-H", h]);
        }
        let seen = mesh.ok("web", path, &args);
        match reason {
            Some(r) => verified(&seen, r),
            None => plain(&seen),
        }
    }
    for (route, reason, n) in [
        ("/pay", "big", 3.0),
        ("/geo", "embargo", 1.0),
        ("/kind", "risky-kind", 1.0),
        ("/multi", "flagged", 1.0),
        ("/multi", "big", 1.0),
    ] {
        assert_eq!(mesh.challenges(route, reason), n, "{route} {reason}");
    }
    assert_eq!(mesh.verifications("ok"), 7.0);
}

#[test]
fn after_a_refused_replay_the_identity_is_challenged() {
    let mesh = Mesh::start(&[("web", WEB), ("ops", OPS)], |_, _| {
        [
            rule("after-refusal", "after_failure = \"1m\""),
            route("/admin", "\"always\"", &[]),
            route("/after", "\"risk\"", &["after-refusal"]),
        ]
        .concat()
    });
    plain(&mesh.ok("web", "/after/1", &[]));

    // An attacker replays web's captured signed request: refused.
    replays(&mesh, &mesh.caller("web").cert, "/admin/rotate", 1);
    assert_eq!(mesh.verifications("replay"), 1.0);

    // web is challenged from now on, within the window; ops is not.
    verified(&mesh.ok("web", "/after/2", &[]), "after-refusal");
    verified(&mesh.ok("web", "/after/3", &[]), "after-refusal");
    plain(&mesh.ok("ops", "/after/1", &[]));
    assert_eq!(mesh.challenges("/after", "after-refusal"), 2.0);

    assert_eq!(mesh.challenges("/after", "after-refusal"), 2.0);
}

#[test]
fn a_certificate_that_does_not_chain_never_raises_the_risk_of_the_id_it_claims() {
    let mesh = Mesh::start(&[("web", WEB), ("ops", OPS)], |_, _| {
        [
            rule("after-refusal", "after_failure = \"1m\""),
            route("/admin", "\"always\"", &[]),
            route("/after", "\"risk\"", &["after-refusal"]),
        ]
        .concat()
    });
    plain(&mesh.ok("ops", "/after/1", &[]));
    // Anyone can make a CA of their own naming the trust domain and issue
    // a certificate claiming ops's ID; refused at the handshake, it says
    // nothing about ops.
    let rogue = Pki::new(TD);
    let claim = rogue.issue("ops-rogue", OPS);
    failed_handshakes(&mesh, &claim, "unknown_ca", 3);
    // Nor does an expired certificate: its dates are refused before its
    // chain is checked, so it may be anyone's making too.
    let old = expired(&mesh.pki, "ops-expired", OPS);
    failed_handshakes(&mesh, &old, "expired", 3);
    plain(&mesh.ok("ops", "/after/2", &[]));
    assert_eq!(mesh.challenges("/after", "after-refusal"), 0.0);
    // The control: the rule is live, a refused replay of ops's makes it
    // fire.
    replays(&mesh, &mesh.caller("ops").cert, "/admin/rotate", 1);
    verified(&mesh.ok("ops", "/after/3", &[]), "after-refusal");
}

#[test]
fn lockout_refuses_with_403_for_the_window_and_counts() {
    let mesh = Mesh::start(&[("web", WEB), ("ops", OPS)], |_, _| {
        [
            rule("lockout", "failures_above = \"2/5s\"\naction = \"deny\""),
            route("/admin", "\"always\"", &[]),
            route("/vault", "\"risk\"", &["lockout"]),
        ]
        .concat()
    });
    let denied = |m: &Mesh| {
        m.inbound.sample(
            "keyproof_risk_denied_total",
            &[("route", "/vault"), ("rule", "lockout")],
        )
    };
    plain(&mesh.ok("web", "/vault/1", &[]));

    // Refused handshakes do not count towards a lockout: a certificate is
    // public, and anyone holding a copy could lock its owner out.
    let web_expired = expired(&mesh.pki, "web-expired", WEB);
    failed_handshakes(&mesh, &web_expired, "expired", 4);
    plain(&mesh.ok("web", "/vault/2", &[]));

    // Three refused replays: more than 2 within 5 s.
    replays(&mesh, &mesh.caller("web").cert, "/admin/rotate", 3);
    let before = mesh.app.seen_under("/vault").len();
    let (code, body) = mesh.call("web", "/vault/3", &[]);
    assert_eq!(code, 403, "{body}\n{}", mesh.inbound.log_text());
    assert_eq!(denied(&mesh), 1.0);
    assert_eq!(
        mesh.app.seen_under("/vault").len(),
        before,
        "a denied request reached the app"
    );
    assert_eq!(mesh.challenges("/vault", "lockout"), 0.0);
    // Only that identity.
    plain(&mesh.ok("ops", "/vault/1", &[]));

    // The lock lasts the window and is not extended by the locked caller's
    // own refused requests: polling keeps hitting it, and it lifts anyway.
    let mut refused = 1;
    let lifted = eventually(Duration::from_secs(20), || {
        match mesh.call("web", "/vault/4", &[]) {
            (200, _) => true,
            (403, _) => {
                refused += 1;
                false
            }
            (other, body) => panic!("{other}: {body}"),
        }
    });
    assert!(
        lifted,
        "the lockout never lifted:\n{}",
        mesh.inbound.log_text()
    );
    assert_eq!(
        denied(&mesh),
        refused as f64,
        "every risk denial is counted"
    );
    assert_eq!(
        mesh.inbound
            .sample("keyproof_authz_denied_total", &[("route", "/vault")]),
        0.0,
        "a lockout is not an allow-list refusal"
    );
}

#[test]
fn a_path_no_route_names_is_refused_but_not_held_against_the_caller() {
    // Round 10 F4: under default deny, a well-behaved caller's stray
    // requests (/favicon.ico) locked its identity out of a lockout route.
    let mesh = Mesh::start(&[("web", WEB)], |_, _| {
        [
            "default_policy = \"deny\"\n".to_owned(),
            rule("lockout", "failures_above = \"2/5m\"\naction = \"deny\""),
            route("/vault", "\"risk\"", &["lockout"]),
        ]
        .concat()
    });
    for _ in 0..4 {
        let (code, body) = mesh.call("web", "/favicon.ico", &[]);
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("no route matches"), "{body}");
    }
    plain(&mesh.ok("web", "/vault/1", &[]));
    assert_eq!(
        mesh.inbound
            .sample("keyproof_authz_denied_total", &[("route", "default")]),
        4.0
    );
}

/// `0A:1B:..`: a serial as an operator copies it from `openssl x509
/// -serial`, upper case with colons and a leading zero byte.
fn operator_serial(hex: &str) -> String {
    let even = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex.to_owned()
    };
    let bytes: Vec<String> = even
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect();
    format!("00:{}", bytes.join(":"))
}

#[test]
fn deny_list_refuses_by_spiffe_id_and_by_serial_and_counts() {
    let mut ops_serial = String::new();
    let mesh = Mesh::start(&[("ops", OPS)], |_, certs| {
        let serial = serial_hex(&certs[0].leaf);
        ops_serial = serial.clone();
        [
            rule("new-caller", "new_peer = \"1h\""),
            route("/plain", "false", &[]),
            route("/admin", "true", &[]),
            route("/risky", "\"risk\"", &["new-caller"]),
            "[[inbound.deny]]\nspiffe_id = \"spiffe://risk.test/ns/stolen/*\"\n".to_owned(),
            format!(
                "[[inbound.deny]]\nserial = \"{}\"\n",
                operator_serial(&serial)
            ),
        ]
        .concat()
    });
    let thief = mesh.pki.issue("thief", "/ns/stolen/sa/thief");
    let ops = mesh.caller("ops").cert.clone();
    // The same identity, reissued: another serial, not denied.
    let ops2 = mesh.pki.issue("ops2", OPS);
    let web = mesh.pki.issue("web", WEB);
    assert_ne!(serial_hex(&ops2.leaf), ops_serial);

    // (path, status when not denied)
    let paths = [
        ("/plain/x", 200),
        ("/admin/x", 401),
        ("/risky/x", 401),
        ("/elsewhere", 200),
    ];
    for (path, status) in paths {
        for (who, cert) in [("thief", &thief), ("ops", &ops)] {
            let (code, text, _) = curl_mtls(mesh.in_addr, &mesh.pki, cert, path, &["-D", "-"]);
            assert_eq!(code, 403, "{who} {path}: {text}");
            assert!(
                !text.to_ascii_lowercase().contains("accept-signature"),
                "a denied caller got a challenge: {text}"
            );
        }
        for cert in [&ops2, &web] {
            let (code, text, _) = curl_mtls(mesh.in_addr, &mesh.pki, cert, path, &[]);
            assert_eq!(code, status, "{path}: {text}");
        }
    }
    // Through the mesh too.
    assert_eq!(mesh.call("ops", "/plain/y", &[]).0, 403);

    let refused = |entry: &str| {
        mesh.inbound
            .sample("keyproof_deny_list_refused_total", &[("entry", entry)])
    };
    assert_eq!(refused("spiffe://risk.test/ns/stolen/*"), 4.0);
    assert_eq!(refused(&format!("serial:{ops_serial}")), 5.0);
    // Nothing of a denied caller reached the app: only ops2's and web's
    // two 200s each.
    assert_eq!(mesh.app.seen().len(), 4, "{:?}", mesh.app.seen());
    assert_eq!(mesh.challenges("/admin", "always"), 2.0);
    assert_eq!(mesh.challenges("/risky", "new-caller"), 2.0);
}

#[test]
fn app_asking_for_proof_gets_the_request_again_verified() {
    let mesh = Mesh::start(&[("web", WEB)], |_, _| {
        [
            "[inbound.stepup]\nmax_body = 4096\n".to_owned(),
            rule("big", "header = \"x-amount\"\nabove = 1000"),
            route("/orders", "\"risk\"", &["big"]),
            route("/admin", "\"always\"", &[]),
            route("/plain", "\"never\"", &[]),
        ]
        .concat()
    });
    let body = "x".repeat(100);

    // The app asks; the caller's app sees exactly one response, the 200 of
    // the verified request.
    let (code, text) = mesh.call("web", "/orders/ask", &["-d", &body]);
    assert_eq!(code, 200, "{text}\n{}", mesh.inbound.log_text());
    assert!(!text.contains(ASKED), "{text}");
    assert!(text.contains("x-keyproof-step-up: verified\n"), "{text}");
    assert!(text.contains("x-keyproof-step-up-reason: app\n"), "{text}");
    let seen = mesh.app.seen_under("/orders/ask");
    assert_eq!(seen.len(), 2, "{seen:?}");
    plain(&seen[0]);
    assert!(seen[0].asked);
    verified(&seen[1], "app");
    assert!(!seen[1].asked);
    assert_eq!(
        (seen[0].body_len, seen[1].body_len),
        (100, 100),
        "the body is sent again"
    );
    assert_eq!(
        (seen[0].method.as_str(), seen[1].method.as_str()),
        ("POST", "POST")
    );
    assert_eq!(mesh.challenges("/orders", "app"), 1.0);
    assert_eq!(mesh.verifications("ok"), 1.0);

    // A body over [inbound.stepup] max_body cannot be verified: a clear
    // 413 instead of a challenge that could never be met.
    let big = "y".repeat(10_000);
    let (code, text) = mesh.call("web", "/orders/ask-big", &["-d", &big]);
    assert_eq!(code, 413, "{text}");
    assert!(!text.contains(ASKED), "{text}");
    assert_eq!(mesh.app.seen_under("/orders/ask-big").len(), 1);
    assert_eq!(mesh.challenges("/orders", "app"), 1.0);

    // An app that asks again about a request it received verified already
    // had its proof: 502, never its `required` answer.
    for (path, args) in [
        ("/orders/ask-again", vec!["-d", "{}"]),
        ("/orders/ask-again", vec!["-H", "x-amount: 5000"]),
        ("/admin/ask-again", vec!["-d", "{}"]),
        // No step-up on the route (or no route): nothing to ask for.
        ("/plain/ask", vec![]),
        ("/elsewhere/ask", vec![]),
    ] {
        let (code, text) = mesh.call("web", path, &args);
        assert_eq!(code, 502, "{path} {args:?}: {text}");
        assert!(!text.contains(ASKED), "{text}");
    }

    // The app's own x-keyproof-step-up never reaches a caller. Whatever
    // its value, it is the app asking (fail closed): 502 where nothing can
    // be asked for, or where the request came verified already; a caller
    // without a sidecar is challenged.
    for (path, direct) in [("/plain/leak", 502), ("/orders/leak", 401)] {
        let (code, text) = mesh.call("web", path, &["-D", "-"]);
        assert_eq!(code, 502, "{text}");
        let head = text
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(!head.contains("x-keyproof-step-up"), "{text}");
        let (code, text, _) = curl_mtls(
            mesh.in_addr,
            &mesh.pki,
            &mesh.caller("web").cert,
            path,
            &["-D", "-"],
        );
        assert_eq!(code, direct, "{text}");
        let head = text
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(!head.contains("x-keyproof-step-up"), "{text}");
    }
}

#[test]
fn app_asking_on_every_request_costs_one_round_trip_after_the_first() {
    let mesh = Mesh::start(&[("web", WEB)], |_, _| {
        [
            rule("big", "header = \"x-amount\"\nabove = 1000"),
            route("/orders", "\"risk\"", &["big"]),
        ]
        .concat()
    });
    const N: usize = 6;
    for i in 0..N {
        let seen = mesh.ok("web", "/orders/ask-each", &["-d", "{\"n\":1}"]);
        verified(&seen, "app");
        assert_eq!(seen.body_len, 7, "request {i}");
    }
    // The first was asked about and challenged; from then on each request
    // arrived signed with the nonce the previous response carried.
    let seen = mesh.app.seen_under("/orders/ask-each");
    assert_eq!(seen.len(), N + 1, "{seen:?}");
    assert_eq!(seen.iter().filter(|s| s.asked).count(), 1);
    assert_eq!(mesh.challenges("/orders", "app"), 1.0);
    assert_eq!(mesh.verifications("ok"), N as f64);
    let code = |c: &str| {
        mesh.inbound.sample(
            "keyproof_requests_total",
            &[("code", c), ("direction", "inbound")],
        )
    };
    assert_eq!((code("2xx"), code("4xx")), (N as f64, 1.0));
}

#[test]
fn caller_sent_step_up_fields_never_reach_the_app() {
    let mesh = Mesh::start(&[("web", WEB)], |_, _| {
        [
            rule("big", "header = \"x-amount\"\nabove = 1000"),
            route("/orders", "\"risk\"", &["big"]),
            route("/admin", "\"always\"", &[]),
            route("/plain", "\"never\"", &[]),
        ]
        .concat()
    });
    let forged = [
        "-H",
        "x-keyproof-step-up: verified",
        "-H",
        "X-Keyproof-Step-Up-Reason: app",
    ];
    let web = mesh.caller("web").cert.clone();
    // Straight to the inbound (no outbound to clean up after the caller),
    // on every kind of route.
    for path in ["/plain/x", "/orders/x", "/elsewhere"] {
        let (code, text, _) = curl_mtls(mesh.in_addr, &mesh.pki, &web, path, &forged);
        assert_eq!(code, 200, "{path}: {text}");
        plain(mesh.app.seen().last().unwrap());
    }
    // Through the mesh, with a real verification: only the sidecar's values.
    let mut args = forged.to_vec();
    args.extend_from_slice(&["-H", "x-amount: 5000"]);
    verified(&mesh.ok("web", "/orders/x", &args), "big");
    let mut args = forged.to_vec();
    args.extend_from_slice(&["-d", "{}"]);
    verified(&mesh.ok("web", "/admin/x", &args), "always");
    plain(&mesh.ok("web", "/plain/x", &forged));
}

fn reloads(mesh: &Mesh, result: &str) -> f64 {
    mesh.inbound
        .sample("keyproof_policy_reloads_total", &[("result", result)])
}

#[test]
fn policy_file_edited_under_load_takes_effect_with_zero_failed_requests() {
    let both = list(&[&id(WEB), &id(OPS)]);
    let v1 = format!("[[routes]]\npath_prefix = \"/p\"\nallow = {both}\n");
    let mut policy_path = None;
    let mesh = Mesh::start(&[("web", WEB), ("ops", OPS)], |pki, _| {
        let p = pki.path("policy.toml");
        std::fs::write(&p, &v1).unwrap();
        let line = format!("policy_file = {:?}\n", p.display().to_string());
        policy_path = Some(p);
        line
    });
    let policy = policy_path.unwrap();
    plain(&mesh.ok("ops", "/p/x", &[]));
    plain(&mesh.ok("web", "/p/x", &[]));

    let load = Load::start(mesh.caller("web").out_addr, AUTHORITY, "/p/load", 4);
    assert!(
        load.wait_more(40, Duration::from_secs(30)),
        "the load does not run"
    );

    // Incident: require a proof on /p and lock ops out.
    write_renamed(
        &policy,
        &format!(
            "{v1}step_up = \"always\"\n[[deny]]\nspiffe_id = \"{}\"\n",
            id(OPS)
        ),
    );
    let ok = mesh
        .inbound
        .wait_sample("keyproof_policy_reloads_total", &[("result", "ok")], 1.0);
    assert!(
        ok >= 1.0,
        "policy not reloaded:\n{}",
        mesh.inbound.log_text()
    );
    // The new policy serves the load's requests, on connections made before
    // the reload.
    let took = eventually(Duration::from_secs(30), || {
        mesh.app
            .seen_under("/p/load")
            .iter()
            .filter(|s| s.verified())
            .count()
            >= 20
    });
    assert!(
        took,
        "/p never required step-up:\n{}",
        mesh.inbound.log_text()
    );
    assert!(load.wait_more(20, Duration::from_secs(30)));
    let statuses = load.stop();
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the reload: {failed:?}\n{}",
        failed.len(),
        statuses.len(),
        mesh.inbound.log_text()
    );
    for s in mesh
        .app
        .seen_under("/p/load")
        .iter()
        .filter(|s| s.verified())
    {
        verified(s, "always");
    }

    let (code, body) = mesh.call("ops", "/p/x", &[]);
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        mesh.inbound
            .sample("keyproof_deny_list_refused_total", &[("entry", &id(OPS))]),
        1.0
    );
    verified(&mesh.ok("web", "/p/x", &[]), "always");
    assert_eq!(reloads(&mesh, "failed"), 0.0);
}

#[test]
fn bad_policy_file_is_refused_logged_and_the_old_one_keeps_serving() {
    let both = list(&[&id(WEB), &id(OPS)]);
    let good = format!(
        "[[routes]]\npath_prefix = \"/p\"\nallow = {both}\nstep_up = \"always\"\n\
         [[deny]]\nspiffe_id = \"{}\"\n",
        id(OPS)
    );
    let mut policy_path = None;
    let mesh = Mesh::start(&[("web", WEB), ("ops", OPS)], |pki, _| {
        let p = pki.path("policy.toml");
        std::fs::write(&p, &good).unwrap();
        let line = format!("policy_file = {:?}\n", p.display().to_string());
        policy_path = Some(p);
        line
    });
    let policy = policy_path.unwrap();
    let serving_the_old = |m: &Mesh| {
        verified(&m.ok("web", "/p/x", &["-d", "{}"]), "always");
        assert_eq!(m.call("ops", "/p/x", &[]).0, 403, "the old deny list");
    };
    serving_the_old(&mesh);

    // Would admit ops, if it were valid: it names a rule that does not exist.
    write_renamed(
        &policy,
        &format!("[[routes]]\npath_prefix = \"/p\"\nallow = {both}\nstep_up = \"risk\"\nrisk = [\"nope\"]\n"),
    );
    let failed = mesh.inbound.wait_sample(
        "keyproof_policy_reloads_total",
        &[("result", "failed")],
        1.0,
    );
    assert!(failed >= 1.0, "{}", mesh.inbound.log_text());
    let log = mesh.inbound.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("routes[0].risk") && l.contains("policy.toml")),
        "the refusal is not logged with the file and key:\n{log}"
    );
    serving_the_old(&mesh);

    // Not even TOML.
    write_renamed(&policy, "[[routes]\npath_prefix = \n");
    let again = mesh.inbound.wait_sample(
        "keyproof_policy_reloads_total",
        &[("result", "failed")],
        failed + 1.0,
    );
    assert!(again > failed, "{}", mesh.inbound.log_text());
    serving_the_old(&mesh);

    // What is no regular file is not read: a FIFO (no writer ever comes;
    // reading it would block the watcher for good) and a device (a
    // symlink to /dev/zero would be read until memory ran out).
    let mut seen = again;
    let fifo = policy.with_extension("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let zero = policy.with_extension("zero");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    for (odd, what) in [(&fifo, "a FIFO"), (&zero, "a character device")] {
        // An unreadable file is reported once until it is readable again:
        // a readable (bad) file between the two.
        write_renamed(&policy, "[[routes]\n");
        seen = mesh.inbound.wait_sample(
            "keyproof_policy_reloads_total",
            &[("result", "failed")],
            seen + 1.0,
        );
        std::fs::rename(odd, &policy).unwrap();
        let now = mesh.inbound.wait_sample(
            "keyproof_policy_reloads_total",
            &[("result", "failed")],
            seen + 1.0,
        );
        assert!(now > seen, "{what}: {}", mesh.inbound.log_text());
        seen = now;
        assert!(
            mesh.inbound.log_text().contains(what),
            "{}",
            mesh.inbound.log_text()
        );
        serving_the_old(&mesh);
    }
    assert_eq!(reloads(&mesh, "ok"), 0.0);

    // A good file after bad ones is taken.
    write_renamed(
        &policy,
        &format!("[[routes]]\npath_prefix = \"/p\"\nallow = {both}\n"),
    );
    let ok = mesh
        .inbound
        .wait_sample("keyproof_policy_reloads_total", &[("result", "ok")], 1.0);
    assert!(ok >= 1.0, "{}", mesh.inbound.log_text());
    plain(&mesh.ok("ops", "/p/x", &[]));
}

/// A signed request's nonce and signature, which must never be logged.
fn secrets(signed: &HeaderMap) -> Vec<String> {
    let input = signed
        .get("signature-input")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let nonce = input
        .split("nonce=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_default()
        .to_owned();
    let sig = signed
        .get("signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let sig = sig
        .trim_start_matches("stepup=:")
        .trim_end_matches(':')
        .to_owned();
    assert!(nonce.len() > 20 && sig.len() > 20, "{signed:?}");
    vec![nonce, sig]
}

#[test]
fn audit_log_file_records_each_decision_and_verification() {
    let mut audit_path = None;
    let mesh = Mesh::start(&[("web", WEB)], |pki, _| {
        let p = pki.path("audit.log");
        let s = format!(
            "[inbound.stepup]\naudit_log = {:?}\n",
            p.display().to_string()
        );
        audit_path = Some(p);
        [
            s,
            rule("new-caller", "new_peer = \"1h\""),
            rule(
                "blocked",
                "header = \"x-block\"\npresent = true\naction = \"deny\"",
            ),
            rule("big", "header = \"x-amount\"\nabove = 1000"),
            route("/new", "\"risk\"", &["new-caller"]),
            route("/orders", "\"risk\"", &["blocked", "big"]),
            route("/admin", "\"always\"", &[]),
        ]
        .concat()
    });
    let audit = audit_path.unwrap();
    let web = mesh.caller("web").cert.clone();

    verified(&mesh.ok("web", "/new/1", &[]), "new-caller");
    verified(&mesh.ok("web", "/orders/ask", &["-d", "{}"]), "app");
    assert_eq!(
        mesh.call("web", "/orders/x", &["-H", "x-block: yes"]).0,
        403
    );
    let captured = replays(&mesh, &web, "/admin/rotate", 1);

    let expected: &[(&str, &str, &str)] = &[
        ("/new", "new-caller", "challenged"),
        ("/new", "new-caller", "ok"),
        ("/orders", "app", "challenged"),
        ("/orders", "app", "ok"),
        ("/orders", "blocked", "denied"),
        ("/admin", "always", "challenged"),
        ("/admin", "always", "ok"),
        ("/admin", "always", "replay"),
    ];
    let records = || -> Vec<Value> {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        text.lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
            })
            .collect()
    };
    let has = |rs: &[Value], (route, reason, result): (&str, &str, &str)| {
        rs.iter()
            .any(|r| r["route"] == route && r["reason"] == reason && r["result"] == result)
    };
    let complete = eventually(Duration::from_secs(10), || {
        let rs = records();
        expected.iter().all(|e| has(&rs, *e))
    });
    let rs = records();
    assert!(
        complete,
        "missing audit records; have:\n{}",
        std::fs::read_to_string(&audit).unwrap_or_default()
    );

    let mode = std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "audit log mode {mode:o}");

    let serial = serial_hex(&web.leaf);
    for r in &rs {
        let obj = r.as_object().expect("a JSON object");
        for k in obj.keys() {
            assert!(
                [
                    "time",
                    "peer",
                    "serial",
                    "route",
                    "reason",
                    "result",
                    "nonce_age_ms"
                ]
                .contains(&k.as_str()),
                "unexpected field {k}: {r}"
            );
        }
        assert_eq!(r["peer"], id(WEB), "{r}");
        let logged = r["serial"].as_str().expect("serial").to_ascii_lowercase();
        assert_eq!(logged.trim_start_matches('0'), serial, "{r}");
        let t = r["time"].as_str().expect("time");
        assert!(t.ends_with('Z'), "not UTC: {t}");
        let when = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("time {t}: {e}"));
        let age = (time::OffsetDateTime::now_utc() - when).whole_seconds();
        assert!((0..600).contains(&age), "time {t} is {age}s old");
        let result = r["result"].as_str().expect("result");
        let is_decision = result == "challenged" || result == "denied";
        // A replayed nonce is gone from the table with its time of issue
        // to the millisecond: no age rather than a wrong one.
        let has_age = !is_decision && result != "replay";
        assert_eq!(
            r.get("nonce_age_ms").is_some(),
            has_age,
            "nonce_age_ms exactly on verifications of an outstanding nonce: {r}"
        );
        if has_age {
            let age = r["nonce_age_ms"].as_u64().expect("nonce_age_ms is a count");
            assert!(age < 60_000, "{r}");
        }
    }
    // Exactly one record per verification.
    for (route, reason, result) in expected.iter().filter(|e| e.2 != "challenged") {
        let n = rs
            .iter()
            .filter(|r| r["route"] == *route && r["reason"] == *reason && r["result"] == *result)
            .count();
        assert_eq!(n, 1, "{route} {reason} {result}: {rs:?}");
    }
    let text = std::fs::read_to_string(&audit).unwrap();
    for s in secrets(&captured) {
        assert!(
            !text.contains(&s),
            "the audit log holds a nonce or signature"
        );
    }
}

fn check_config(dir: &Path, name: &str, text: &str) -> (bool, String, String) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let out = run(cmd("keyproof-proxy")
        .arg("check-config")
        .arg("--config")
        .arg(&path));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_explains_the_effective_rules_and_names_bad_keys() {
    let pki = Pki::new(TD);
    let server = pki.issue("server", "/ns/default/sa/api");
    let head = format!(
        "{}[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"127.0.0.1:2\"\n",
        identity_toml(&pki.bundle, &server)
    );
    let rules = [
        rule("new-caller", "new_peer = \"24h\""),
        rule("burst", "rate_above = \"30/1m\""),
        rule("big-transfer", "header = \"x-amount\"\nabove = 10000"),
        rule("after-refusal", "after_failure = \"15m\""),
        rule("night", "hours = \"22:00-06:00\""),
        rule("lockout", "failures_above = \"5/15m\"\naction = \"deny\""),
    ]
    .concat();
    let all = [
        "new-caller",
        "burst",
        "big-transfer",
        "after-refusal",
        "night",
        "lockout",
    ];
    let text = format!(
        "{head}[inbound.stepup]\nmax_tracked_identities = 500\naudit_log = false\n{rules}{}{}\
         [[inbound.deny]]\nspiffe_id = \"spiffe://risk.test/ns/stolen/*\"\n\
         [[inbound.deny]]\nserial = \"00:0A:1B:2C\"\n",
        route("/payments", "\"risk\"", &all),
        route("/admin", "\"always\"", &[]),
    );
    let (ok, out, err) = check_config(pki.tmp.path(), "good", &text);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("route /payments"))
        .unwrap_or_else(|| panic!("no /payments route in:\n{out}"));
    for needle in [
        "step-up by risk",
        "challenge when",
        "new-caller",
        "24h",
        "burst",
        "30",
        "1m",
        "big-transfer",
        "x-amount",
        "10000",
        "after-refusal",
        "15m",
        "night",
        "22:00",
        "06:00",
        "deny when",
        "lockout",
        "5",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line:?}");
    }
    // Deny rules come after the challenge rules.
    assert!(
        line.find("deny when").unwrap() > line.find("challenge when").unwrap(),
        "{line}"
    );
    assert!(out.contains("spiffe://risk.test/ns/stolen/*"), "{out}");
    assert!(out.contains("a1b2c"), "serial shown normalized:\n{out}");
    assert!(out.contains("route /admin"), "{out}");

    // From a policy file.
    let policy = pki.path("policy.toml");
    let file_text = format!(
        "{}{}[[deny]]\nserial = \"0a1b2c\"\n",
        rules.replace("[[inbound.risk_rules]]", "[[risk_rules]]"),
        route("/payments", "\"risk\"", &["burst"]).replace("[[inbound.routes]]", "[[routes]]"),
    );
    std::fs::write(&policy, &file_text).unwrap();
    let with_file = format!("{head}policy_file = {:?}\n", policy.display().to_string());
    let (ok, out, err) = check_config(pki.tmp.path(), "file", &with_file);
    assert!(ok, "{err}");
    assert!(out.contains(&policy.display().to_string()), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("route /payments") && l.contains("burst")),
        "{out}"
    );

    // Refused, naming the key.
    let r = |prefix: &str, body: &str| {
        format!("[[inbound.routes]]\npath_prefix = \"{prefix}\"\nallow = [\"{ALL}\"]\n{body}\n")
    };
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "{rules}{}",
                r("/a", "step_up = \"risk\"\nrisk = [\"burst\", \"nope\"]")
            ),
            "inbound.routes[0].risk[1]",
        ),
        (
            format!(
                "{rules}{}",
                r("/a", "step_up = \"always\"\nrisk = [\"burst\"]")
            ),
            "inbound.routes[0].risk",
        ),
        (
            format!("{rules}{}", r("/a", "step_up = \"risk\"")),
            "inbound.routes[0].risk",
        ),
        (
            format!("{rules}{}", r("/a", "step_up = \"risk\"\nrisk = []")),
            "inbound.routes[0].risk",
        ),
        (
            r("/a", "step_up = \"sometimes\""),
            "inbound.routes[0].step_up",
        ),
        (
            rule("two", "new_peer = \"1h\"\nafter_failure = \"1h\""),
            "inbound.risk_rules[0]",
        ),
        (rule("none", ""), "inbound.risk_rules[0]"),
        (
            rule("rate", "rate_above = \"0/1m\""),
            "inbound.risk_rules[0].rate_above",
        ),
        (
            rule("rate", "rate_above = \"30\""),
            "inbound.risk_rules[0].rate_above",
        ),
        (
            rule("rate", "rate_above = \"30/0s\""),
            "inbound.risk_rules[0].rate_above",
        ),
        (
            rule("w", "new_peer = \"soon\""),
            "inbound.risk_rules[0].new_peer",
        ),
        (
            rule("h", "hours = \"22:00-22:00\""),
            "inbound.risk_rules[0].hours",
        ),
        (
            rule("h", "hours = \"25:00-06:00\""),
            "inbound.risk_rules[0].hours",
        ),
        (
            rule("a", "after_failure = \"1h\"\naction = \"maybe\""),
            "inbound.risk_rules[0].action",
        ),
        (
            rule("bad name!", "new_peer = \"1h\""),
            "inbound.risk_rules[0].name",
        ),
        (
            [
                rule("x", "new_peer = \"1h\""),
                rule("x", "new_peer = \"2h\""),
            ]
            .concat(),
            "inbound.risk_rules[1].name",
        ),
        (
            rule("hdr", "header = \"x-a\"\nabove = 1\nequals = \"b\""),
            "inbound.risk_rules[0]",
        ),
        (rule("hdr", "header = \"x-a\""), "inbound.risk_rules[0]"),
        (rule("hdr", "above = 5"), "inbound.risk_rules[0]"),
        (
            format!(
                "[[inbound.deny]]\nspiffe_id = \"{}\"\nserial = \"0a\"\n",
                id(WEB)
            ),
            "inbound.deny[0]",
        ),
        ("[[inbound.deny]]\n".to_owned(), "inbound.deny[0]"),
        (
            "[[inbound.deny]]\nserial = \"xyz\"\n".to_owned(),
            "inbound.deny[0].serial",
        ),
        (
            "[[inbound.deny]]\nspiffe_id = \"https://nope\"\n".to_owned(),
            "inbound.deny[0].spiffe_id",
        ),
        (
            "[inbound.stepup]\nmax_tracked_identities = 0\n".to_owned(),
            "inbound.stepup.max_tracked_identities",
        ),
        (
            "[inbound.stepup]\naudit_log = 5\n".to_owned(),
            "inbound.stepup.audit_log",
        ),
    ];
    for (i, (body, key)) in cases.iter().enumerate() {
        let (ok, out, err) =
            check_config(pki.tmp.path(), &format!("bad{i}"), &format!("{head}{body}"));
        assert!(!ok, "accepted:\n{body}\n{out}");
        assert!(err.contains(key), "{key:?} not named for\n{body}\n{err}");
    }

    // policy_file excludes inline policy.
    let (ok, _, err) = check_config(
        pki.tmp.path(),
        "both",
        &format!("{with_file}{}", route("/a", "false", &[])),
    );
    assert!(
        !ok && err.contains("inbound.routes") && err.contains("policy_file"),
        "{err}"
    );
    // A bad policy file names the file and its key.
    let bad = pki.path("bad-policy.toml");
    std::fs::write(
        &bad,
        "[[routes]]\npath_prefix = \"/a\"\nallow = [\"https://nope\"]\n",
    )
    .unwrap();
    let err = run_err(
        cmd("keyproof-proxy")
            .arg("check-config")
            .arg("--config")
            .arg({
                let p = pki.path("with-bad.toml");
                std::fs::write(
                    &p,
                    format!("{head}policy_file = {:?}\n", bad.display().to_string()),
                )
                .unwrap();
                p
            }),
    );
    assert!(
        err.contains("bad-policy.toml") && err.contains("routes[0].allow[0]"),
        "{err}"
    );
    // And the proxy refuses to start with it.
    let err = run_err(
        cmd("keyproof-proxy")
            .arg("run")
            .arg("--config")
            .arg(pki.path("with-bad.toml")),
    );
    assert!(err.contains("routes[0].allow[0]"), "{err}");
}

#[test]
fn quickstart_shows_a_risk_triggered_and_an_app_requested_step_up() {
    let out = keyproof_tests::run_ok(cmd("keyproof-proxy").args(["quickstart", "--once"]));
    let line_after = |marker: &str| -> String {
        let mut lines = out.lines().skip_while(|l| !l.contains(marker));
        let head = lines
            .next()
            .unwrap_or_else(|| panic!("no {marker:?} in:\n{out}"));
        format!("{head} {}", lines.next().unwrap_or_default())
    };
    let small = line_after("x-amount 50 ");
    assert!(
        small.contains("200 OK") && !small.contains("step-up verified"),
        "{small}"
    );
    let big = line_after("x-amount 25000");
    assert!(
        big.contains("200 OK") && big.contains("step-up verified (reason big-transfer)"),
        "{big}"
    );
    let asked = line_after("/payments/approve");
    assert!(
        asked.contains("200 OK") && asked.contains("step-up verified (reason app)"),
        "{asked}"
    );
    assert!(
        !out.contains("proof needed"),
        "the app's request for proof leaked:\n{out}"
    );
}

#[test]
fn a_forgotten_caller_counts_as_new_again() {
    let mesh = Mesh::start(&[("web", WEB), ("ops", OPS)], |_, _| {
        [
            "[inbound.stepup]\nmax_tracked_identities = 1\n".to_owned(),
            rule("new-caller", "new_peer = \"1h\""),
            route("/new", "\"risk\"", &["new-caller"]),
        ]
        .concat()
    });
    verified(&mesh.ok("web", "/new/1", &[]), "new-caller");
    plain(&mesh.ok("web", "/new/2", &[]));
    // Room for one caller: ops pushes web out...
    verified(&mesh.ok("ops", "/new/1", &[]), "new-caller");
    // ...so web is new again: challenged, never waved through.
    verified(&mesh.ok("web", "/new/3", &[]), "new-caller");
    assert_eq!(mesh.challenges("/new", "new-caller"), 3.0);
    assert!(mesh.inbound.sample("keyproof_risk_evictions_total", &[]) >= 1.0);
    assert_eq!(
        mesh.inbound.sample("keyproof_risk_tracked_identities", &[]),
        1.0
    );
}

#[test]
fn a_lockout_survives_a_policy_reload() {
    let policy_text = |extra: &str| {
        format!(
            "[[risk_rules]]\nname = \"lockout\"\nfailures_above = \"2/1m\"\naction = \"deny\"\n\
             [[routes]]\npath_prefix = \"/admin\"\nallow = [\"{ALL}\"]\nstep_up = \"always\"\n\
             [[routes]]\npath_prefix = \"/vault\"\nallow = [\"{ALL}\"]\nstep_up = \"risk\"\nrisk = [\"lockout\"]\n{extra}"
        )
    };
    let mut policy_path = None;
    let mesh = Mesh::start(&[("web", WEB)], |pki, _| {
        let p = pki.path("policy.toml");
        std::fs::write(&p, policy_text("")).unwrap();
        let line = format!("policy_file = {:?}\n", p.display().to_string());
        policy_path = Some(p);
        line
    });
    let policy = policy_path.unwrap();
    plain(&mesh.ok("web", "/vault/1", &[]));
    replays(&mesh, &mesh.caller("web").cert, "/admin/rotate", 3);
    assert_eq!(mesh.call("web", "/vault/2", &[]).0, 403);

    write_renamed(
        &policy,
        &policy_text(&format!(
            "[[routes]]\npath_prefix = \"/new\"\nallow = [\"{ALL}\"]\n"
        )),
    );
    let ok = mesh
        .inbound
        .wait_sample("keyproof_policy_reloads_total", &[("result", "ok")], 1.0);
    assert!(ok >= 1.0, "{}", mesh.inbound.log_text());
    plain(&mesh.ok("web", "/new/1", &[]));
    assert_eq!(
        mesh.call("web", "/vault/3", &[]).0,
        403,
        "the reload lifted the lockout"
    );
    assert_eq!(
        mesh.inbound.sample(
            "keyproof_risk_denied_total",
            &[("route", "/vault"), ("rule", "lockout")]
        ),
        2.0,
        "both denials, counted across the reload"
    );
}

/// Sends `raw` (a whole HTTP/1.1 request, `Connection: close`) to `addr`
/// and returns the status of the response.
fn raw_call(addr: SocketAddr, raw: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[test]
fn trailer_fields_read_by_header_rules_never_reach_the_app_unevaluated() {
    let mesh = Mesh::start(&[("web", WEB)], |_, _| {
        [
            rule("big", "header = \"x-amount\"\nabove = 1000"),
            route("/pay", "\"risk\"", &["big"]),
            route("/open", "\"never\"", &[]),
        ]
        .concat()
    });
    let out = mesh.caller("web").out_addr;
    let request = |path: &str| {
        format!(
            "POST http://{AUTHORITY}{path} HTTP/1.1\r\nhost: {AUTHORITY}\r\ntransfer-encoding: chunked\r\n\
             trailer: x-amount, x-note\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\
             x-amount: 99999\r\nX_Amount: 99999\r\nx-note: kept\r\n\r\n"
        )
    };
    let trailers = |path: &str| -> Vec<(String, String)> {
        let (code, text) = raw_call(out, &request(path));
        assert_eq!(code, 200, "{path}: {text}\n{}", mesh.inbound.log_text());
        let seen = mesh.app.seen_under(path);
        assert_eq!(seen.len(), 1, "{path}: {seen:?}");
        assert_eq!(seen[0].body_len, 3);
        plain(&seen[0]);
        seen[0].trailers.clone()
    };
    // Where no rule reads it, a trailer field goes on as sent (so the
    // check below can fail).
    let open = trailers("/open/t");
    assert!(
        open.iter().any(|(k, v)| k == "x-amount" && v == "99999"),
        "{open:?}"
    );
    // On the route whose rule reads x-amount: neither spelling arrives
    // unevaluated; other trailer fields do.
    let pay = trailers("/pay/t");
    assert!(
        pay.iter()
            .all(|(k, _)| !k.replace('_', "-").eq_ignore_ascii_case("x-amount")),
        "{pay:?}"
    );
    assert!(
        pay.iter().any(|(k, v)| k == "x-note" && v == "kept"),
        "{pay:?}"
    );
    assert_eq!(mesh.challenges("/pay", "big"), 0.0);
}

/// A body read whole (to sign it, to verify it, to send it again after a
/// challenge or an app's ask) goes on with its trailer section: a request
/// whose trailers are lost on the way is another request (round 8: the
/// resent request lost them).
#[test]
fn trailers_go_on_through_every_step_up_path() {
    let mesh = Mesh::start(&[("web", WEB)], |_, _| {
        [
            rule("big", "header = \"x-amount\"\nabove = 1000"),
            route("/su", "\"always\"", &[]),
            route("/asks", "\"risk\"", &["big"]),
        ]
        .concat()
    });
    let out = mesh.caller("web").out_addr;
    let call = |path: &str| {
        let raw = format!(
            "POST http://{AUTHORITY}{path} HTTP/1.1\r\nhost: {AUTHORITY}\r\ntransfer-encoding: chunked\r\n\
             trailer: x-sum, x-amount\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\nx-sum: 42\r\n\
             x-amount: 99999\r\n\r\n"
        );
        let (code, text) = raw_call(out, &raw);
        assert_eq!(code, 200, "{path}: {text}\n{}", mesh.inbound.log_text());
        let seen = mesh.app.seen_under(path);
        let last = seen.last().expect("the app saw it").clone();
        assert_eq!(last.body_len, 3, "{seen:?}");
        assert!(
            last.trailers.iter().any(|(k, v)| k == "x-sum" && v == "42"),
            "{path}: the trailers were lost: {seen:?}"
        );
        seen
    };
    // The first request to the path: streamed, challenged, resent from
    // the outbound's copy.
    let first = call("/su/first");
    assert_eq!(first.len(), 1, "{first:?}");
    verified(&first[0], "always");
    // Then a path known to need step-up: read whole and signed up front.
    let known = call("/su/known");
    verified(&known[0], "always");
    assert!(known[0].trailers.iter().any(|(k, _)| k == "x-amount"));
    // The app asks: the caller's sidecar resends it, signed. The field
    // the route's rule reads does not reach the app from the trailers,
    // verified or not (it was never evaluated).
    let asked = call("/asks/ask-t");
    assert_eq!(asked.len(), 2, "asked, then verified: {asked:?}");
    verified(&asked[1], "app");
    for seen in &asked {
        assert!(
            seen.trailers.iter().all(|(k, _)| k != "x-amount"),
            "{seen:?}"
        );
    }
}

#[test]
fn an_app_asking_in_another_spelling_or_value_is_heard() {
    let mesh = Mesh::start(&[("web", WEB)], |_, _| {
        [
            rule("big", "header = \"x-amount\"\nabove = 1000"),
            route("/orders", "\"risk\"", &["big"]),
            route("/plain", "\"never\"", &[]),
        ]
        .concat()
    });
    // `x_keyproof_step_up: "Required"`: the app asked; the caller's app
    // sees the one 200 of the verified request.
    let (code, text) = mesh.call("web", "/orders/odd", &["-D", "-"]);
    assert_eq!(code, 200, "{text}\n{}", mesh.inbound.log_text());
    let seen = mesh.app.seen_under("/orders/odd");
    assert_eq!(seen.len(), 2, "{seen:?}");
    plain(&seen[0]);
    verified(&seen[1], "app");
    assert!(
        !text.to_ascii_lowercase().contains("keyproof_step_up"),
        "{text}"
    );
    assert_eq!(mesh.challenges("/orders", "app"), 1.0);
    // Where nothing can be asked for, such an answer is never passed on.
    let (code, text) = mesh.call("web", "/plain/odd", &["-D", "-"]);
    assert_eq!(code, 502, "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("keyproof_step_up"),
        "{text}"
    );
}

/// Round 11 (auth F7): a request stream open across a policy change that
/// drops its caller from the route's `allow` is decided on again at its
/// next frame and ends, as tunnels and switched connections are: the app
/// gets no more of it. A chunked upload through the caller's sidecar
/// stands in for a gRPC client stream.
#[test]
fn a_stream_the_new_policy_refuses_ends_at_its_next_message() {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    // The app: reads one request's body as it comes, records it, never
    // answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::<u8>::new()));
    let record = got.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { return };
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tcp.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let pki = Pki::new(TD);
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", WEB);
    let policy = pki.path("policy.toml");
    let v1 = format!(
        "[[routes]]\npath_prefix = \"/p\"\nallow = {}\n",
        list(&[&id(WEB)])
    );
    std::fs::write(&policy, &v1).unwrap();
    let (in_addr, in_admin) = (addr(), addr());
    let identity = identity_toml(&pki.bundle, &server).replacen(
        "[identity]\n",
        "[identity]\nreload_interval = \"1s\"\n",
        1,
    );
    let inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &format!(
            "{identity}[inbound]\nlisten = \"{in_addr}\"\napp = \"{app_addr}\"\npolicy_file = {:?}\n[admin]\nlisten = \"{in_admin}\"\n",
            policy.display().to_string()
        ),
        in_admin,
    );
    let (out_addr, out_admin) = (addr(), addr());
    let _outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &outbound_config(&pki, &web, out_addr, out_admin, in_addr),
        out_admin,
    );
    let mut c = std::net::TcpStream::connect(out_addr).unwrap();
    write!(
        c,
        "POST /p/stream HTTP/1.1\r\nHost: {AUTHORITY}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nmsg1\n\r\n"
    )
    .unwrap();
    let seen = |what: &str| {
        let got = got.clone();
        let what = what.to_owned();
        move || String::from_utf8_lossy(&got.lock().unwrap()).contains(&what)
    };
    assert!(
        eventually(Duration::from_secs(10), seen("msg1")),
        "the stream never reached the app:\n{}",
        inbound.log_text()
    );
    // The incident: web is no longer allowed on /p.
    write_renamed(
        &policy,
        &format!(
            "[[routes]]\npath_prefix = \"/p\"\nallow = {}\n",
            list(&[&id(OPS)])
        ),
    );
    assert!(
        inbound.wait_sample("keyproof_policy_reloads_total", &[("result", "ok")], 1.0) >= 1.0,
        "{}",
        inbound.log_text()
    );
    let _ = write!(c, "5\r\nmsg2\n\r\n");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !seen("msg2")(),
        "the app got a message after the policy refused its caller:\n{}",
        inbound.log_text()
    );
    assert!(
        inbound
            .log_text()
            .contains("a request in flight that the new policy refuses"),
        "{}",
        inbound.log_text()
    );
}
