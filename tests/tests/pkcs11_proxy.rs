//! Sidecars whose workload keys live in a PKCS#11 token (SoftHSM2): the real
//! `keyproof-proxy` pair with `[identity.pkcs11]`, certificates from files or
//! from a real `keyproof-ca serve`, step-up through the mesh, startup errors
//! that name the key, and a token pulled mid-traffic (the sidecar fails
//! closed and recovers without a restart).
//!
//! Each test makes its own SoftHSM2 (config and token directory in a temp
//! dir, `SOFTHSM2_CONF` passed to the children only). Without SoftHSM2 and
//! OpenSC installed the tests print SKIP, or fail when `CI` is set.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyproof_tests::ca_server::CaServer;
use keyproof_tests::proxy_support::*;
use keyproof_tests::softhsm::{self, SoftHsm, Token, TokenCert};
use keyproof_tests::{cmd, free_port, run, run_ok, TestCa};
use serde_json::Value;

const TD: &str = "pkcs11.test";
const AUTHORITY: &str = "api.default.svc";
/// The same inbound under a second name: the outbound dials a new mesh
/// connection for it the first time it is used.
const LATE: &str = "late.default.svc";
const API: &str = "/ns/default/sa/api";
const WEB: &str = "/ns/default/sa/web";

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/identity` of a sidecar (`Null` unless 200).
fn identity(admin: SocketAddr) -> Value {
    match http_get(admin, "/identity") {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// `[identity.pkcs11]` for `key_label` in `token`.
fn pkcs11_toml(token_label: &str, key_label: &str, pin_file: &Path) -> String {
    format!(
        "[identity.pkcs11]\nmodule = {:?}\ntoken_label = {token_label:?}\nkey_label = {key_label:?}\npin_file = {:?}\n",
        softhsm::MODULE,
        pin_file.display().to_string()
    )
}

/// `[identity]` with the certificate from a file and the key in a token.
fn files_token_identity(
    pki: &Pki,
    cert: &TokenCert,
    token: &Token,
    key: &str,
    pin: &Path,
) -> String {
    format!(
        "[identity]\ntrust_bundle = {:?}\n[identity.files]\ncert = {:?}\n{}",
        pki.bundle.display().to_string(),
        cert.crt.display().to_string(),
        pkcs11_toml(&token.label, key, pin)
    )
}

fn inbound_toml(identity: &str, listen: SocketAddr, app: SocketAddr, admin: SocketAddr) -> String {
    format!(
        "{identity}[inbound]\nlisten = \"{listen}\"\napp = \"{app}\"\n[admin]\nlisten = \"{admin}\"\n"
    )
}

/// An outbound with two names (`AUTHORITY`, `LATE`) for the same inbound,
/// expected to be `API`.
fn outbound_toml(
    td: &str,
    identity: &str,
    listen: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
) -> String {
    format!(
        "{identity}[outbound]\nlisten = \"{listen}\"\nconnect_timeout = \"2s\"\n\
         [[outbound.upstreams]]\nhost = \"{AUTHORITY}\"\naddress = \"{inbound}\"\nidentity = \"spiffe://{td}{API}\"\n\
         [[outbound.upstreams]]\nhost = \"{LATE}\"\naddress = \"{inbound}\"\nidentity = \"spiffe://{td}{API}\"\n\
         [admin]\nlisten = \"{admin}\"\n"
    )
}

/// GET through the outbound (plain HTTP proxy) to `host`: (status, body).
fn get_via(out: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let (code, body, _) = curl(&[
        "-x",
        &format!("http://{out}"),
        &format!("http://{host}{path}"),
    ]);
    (code, body)
}

/// The `x-forwarded-client-cert` the app saw, from the echo app's body.
fn xfcc(body: &str) -> String {
    body.lines()
        .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
        .unwrap_or_default()
        .to_owned()
}

/// `keyproof_identity_key_operations_total{result}` of a sidecar.
fn key_ops(p: &ProxyProc, result: &str) -> f64 {
    p.sample(
        "keyproof_identity_key_operations_total",
        &[("result", result)],
    )
}

/// Checks what `/identity` and `/metrics` say about where the key lives.
fn assert_key_location(p: &ProxyProc, location: &str, uri: Option<&str>) {
    let id = identity(p.admin);
    assert_eq!(
        id["key"]["location"].as_str(),
        Some(location),
        "/identity: {id}"
    );
    assert_eq!(
        id["key"]["available"].as_bool(),
        Some(true),
        "/identity: {id}"
    );
    assert_eq!(id["key"]["uri"].as_str(), uri, "/identity: {id}");
    let m = p.metrics();
    assert_eq!(
        sum_samples(
            &m,
            "keyproof_identity_key_location",
            &[("location", location)]
        ),
        1.0,
        "keyproof_identity_key_location{{location=\"{location}\"}} is not 1:\n{m}"
    );
    for other in ["file", "memory", "pkcs11"] {
        if other != location {
            assert_eq!(
                sum_samples(&m, "keyproof_identity_key_location", &[("location", other)]),
                0.0,
                "{other}:\n{m}"
            );
        }
    }
}

fn uri(token: &str, key: &str) -> String {
    format!("pkcs11:token={token};object={key};type=private")
}

/// Neither the log nor anything else the sidecar wrote names a PIN.
fn assert_no_pin(p: &ProxyProc, pins: &[&str]) {
    let log = p.log_text();
    for pin in pins {
        assert!(!log.contains(pin), "the PIN {pin:?} is in the log:\n{log}");
    }
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

#[test]
fn files_identity_with_token_keys_carries_the_mesh_and_says_where_the_key_lives() {
    let Some(hsm) = SoftHsm::new("files_identity_with_token_keys") else {
        return;
    };
    let pki = Pki::new(TD);
    let (t_in, t_out) = (
        hsm.init_token("api-token", "1111-api"),
        hsm.init_token("web-token", "2222-web"),
    );
    let k_in = hsm.keygen(&t_in, "api", "EC:prime256v1");
    let k_out = hsm.keygen(&t_out, "web", "EC:prime256v1");
    let c_in = softhsm::certify(&hsm, &pki, "api", API, &k_in);
    let c_out = softhsm::certify(&hsm, &pki, "web", WEB, &k_out);
    let (pin_in, pin_out) = (
        hsm.pin_file("api.pin", &t_in.pin),
        hsm.pin_file("web.pin", &t_out.pin),
    );
    let (conf_k, conf_v) = hsm.env();
    let env = [(conf_k, conf_v.as_path())];
    let app = EchoApp::start();
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let inb = ProxyProc::start_env(
        pki.tmp.path(),
        "in",
        &inbound_toml(
            &files_token_identity(&pki, &c_in, &t_in, "api", &pin_in),
            in_addr,
            app.addr,
            in_admin,
        ),
        in_admin,
        &env,
    );
    let out = ProxyProc::start_env(
        pki.tmp.path(),
        "out",
        &outbound_toml(
            TD,
            &files_token_identity(&pki, &c_out, &t_out, "web", &pin_out),
            out_addr,
            in_addr,
            out_admin,
        ),
        out_admin,
        &env,
    );
    let logs = || format!("--- in\n{}\n--- out\n{}", inb.log_text(), out.log_text());

    // Through the pair: both CertificateVerify signatures come from tokens.
    let (code, body) = get_via(out_addr, AUTHORITY, "/hello");
    assert_eq!(code, 200, "{body}\n{}", logs());
    let x = xfcc(&body);
    assert!(
        x.contains(&format!("URI={}", pki.id(WEB))),
        "xfcc {x:?}\n{body}"
    );
    assert!(
        x.contains(&format!("Hash={}", sha256_hex(&c_out.leaf))),
        "the inbound saw another client certificate: {x:?}"
    );
    // A caller with a file key straight to the inbound: curl checks the
    // server's certificate (name localhost) and its signature, made in the token.
    let peer = pki.issue("peer", "/ns/default/sa/peer");
    let (code, body, rc) = curl_mtls(in_addr, &pki, &peer, "/direct", &[]);
    assert_eq!((code, rc), (200, 0), "{body}\n{}", logs());
    assert!(
        xfcc(&body).contains(&format!("URI={}", pki.id("/ns/default/sa/peer"))),
        "{body}"
    );

    // Where the keys live, and that the signatures were the token's.
    assert_key_location(&inb, "pkcs11", Some(&uri("api-token", "api")));
    assert_key_location(&out, "pkcs11", Some(&uri("web-token", "web")));
    assert!(
        key_ops(&inb, "ok") >= 2.0,
        "two server handshakes:\n{}",
        inb.metrics()
    );
    assert!(
        key_ops(&out, "ok") >= 1.0,
        "one client handshake:\n{}",
        out.metrics()
    );
    for p in [&inb, &out] {
        assert_eq!(key_ops(p, "failed"), 0.0, "{}", p.metrics());
    }
    assert_eq!(
        identity(in_admin)["chain"][0]["sha256"].as_str(),
        Some(sha256_hex(&c_in.leaf).as_str())
    );
    assert_no_pin(&inb, &["1111-api", "2222-web"]);
    assert_no_pin(&out, &["1111-api", "2222-web"]);
    // check-config says where the key lives, and does not need the key file.
    let said = run_ok(
        cmd("keyproof-proxy")
            .env(conf_k, &conf_v)
            .args(["check-config", "--config"])
            .arg(pki.path("in.toml")),
    );
    assert!(said.contains("pkcs11"), "check-config: {said}");
}

/// A sidecar pair for step-up: the caller's (OUT) key is `web` in the
/// SoftHSM2 token `web-token` (PIN `pin`), with its certificate from a file;
/// the callee's (IN) key is a file. IN routes `/admin` with step-up and
/// `/plain` without, both for the caller.
struct StepUpPair {
    // Dropped in this order: the sidecars before the app and the token.
    inb: ProxyProc,
    out: ProxyProc,
    out_addr: SocketAddr,
    out_admin: SocketAddr,
    web: String,
    _app: EchoApp,
    _pki: Pki,
    hsm: SoftHsm,
}

impl StepUpPair {
    fn start(name: &str, pin: &str) -> Option<StepUpPair> {
        let hsm = SoftHsm::new(name)?;
        let pki = Pki::new(TD);
        let token = hsm.init_token("web-token", pin);
        let key = hsm.keygen(&token, "web", "EC:prime256v1");
        let cert = softhsm::certify(&hsm, &pki, "web", WEB, &key);
        let pin = hsm.pin_file("web.pin", &token.pin);
        let (conf_k, conf_v) = hsm.env();
        let server = pki.issue("api", API);
        let app = EchoApp::start();
        let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
        let web = pki.id(WEB);
        let in_cfg = format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{}\"\n\
             [[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"{web}\"]\nstep_up = true\n\
             [[inbound.routes]]\npath_prefix = \"/plain\"\nallow = [\"{web}\"]\n\
             [admin]\nlisten = \"{in_admin}\"\n",
            identity_toml(&pki.bundle, &server),
            app.addr
        );
        let inb = ProxyProc::start(pki.tmp.path(), "in", &in_cfg, in_admin);
        let out = ProxyProc::start_env(
            pki.tmp.path(),
            "out",
            &outbound_toml(
                TD,
                &files_token_identity(&pki, &cert, &token, "web", &pin),
                out_addr,
                in_addr,
                out_admin,
            ),
            out_admin,
            &[(conf_k, conf_v.as_path())],
        );
        Some(StepUpPair {
            inb,
            out,
            out_addr,
            out_admin,
            web,
            _app: app,
            _pki: pki,
            hsm,
        })
    }
}

#[test]
fn step_up_through_the_mesh_is_signed_in_the_token() {
    let Some(pair) = StepUpPair::start("step_up_through_the_mesh", "3333-web") else {
        return;
    };
    let StepUpPair {
        inb,
        out,
        out_addr,
        ref web,
        ..
    } = pair;
    let logs = || format!("--- in\n{}\n--- out\n{}", inb.log_text(), out.log_text());
    // The mesh connection first (its handshake signs once), then only step-up.
    let (code, body) = get_via(out_addr, AUTHORITY, "/plain");
    assert_eq!(code, 200, "{body}\n{}", logs());
    let (ops_before, verified_before) = (
        key_ops(&out, "ok"),
        inb.sample("keyproof_stepup_verifications_total", &[("result", "ok")]),
    );
    const N: usize = 5;
    for i in 0..N {
        let (code, body, _) = curl(&[
            "-x",
            &format!("http://{out_addr}"),
            "-H",
            "content-type: application/json",
            "-d",
            "{\"a\":1}",
            &format!("http://{AUTHORITY}/admin/rotate"),
        ]);
        assert_eq!(code, 200, "request {i}: {body}\n{}", logs());
        assert!(body.starts_with("POST /admin/rotate"), "{body}");
        assert!(xfcc(&body).contains(&format!("URI={web}")), "{body}");
    }
    let verified =
        inb.sample("keyproof_stepup_verifications_total", &[("result", "ok")]) - verified_before;
    assert!(
        verified >= N as f64,
        "{verified} step-up verifications\n{}",
        inb.metrics()
    );
    let signed = key_ops(&out, "ok") - ops_before;
    assert!(
        signed >= N as f64,
        "{signed} signatures in the token for {N} step-up requests\n{}",
        out.metrics()
    );
    assert_eq!(key_ops(&out, "failed"), 0.0, "{}", out.metrics());
    assert!(
        out.sample("keyproof_stepup_signatures_total", &[("result", "ok")]) >= N as f64,
        "{}",
        out.metrics()
    );
    assert_key_location(&out, "pkcs11", Some(&uri("web-token", "web")));
    assert_key_location(&inb, "file", None);
    assert_no_pin(&out, &["3333-web"]);
}

/// The public key (PEM) of the leaf a server presents to a new handshake.
fn presented_pubkey(addr: SocketAddr, crt: &Path, key: &Path) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-cert"])
        .arg(crt)
        .arg("-key")
        .arg(key)
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("-----BEGIN CERTIFICATE-----").unwrap_or_else(|| {
        panic!(
            "no server certificate:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let end = text[start..]
        .find("-----END CERTIFICATE-----")
        .expect("end")
        + start
        + 25;
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text[start..end].as_bytes())
        .unwrap();
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned()
}

#[test]
fn ca_identity_generates_the_key_in_the_token_and_renews_with_it() {
    let Some(hsm) = SoftHsm::new("ca_identity_generates_the_key_in_the_token") else {
        return;
    };
    let ca = TestCa::new(TD);
    let server = CaServer::start(&ca, &["--ttl", "10s", "--rate-limit", "0"]);
    let token = hsm.init_token("api-token", "4444-api");
    assert!(hsm.private_keys(&token).is_empty());
    let pin = hsm.pin_file("api.pin", &token.pin);
    let (conf_k, conf_v) = hsm.env();
    let join = run_ok(
        cmd("keyproof-ca")
            .args(["token", "create", "--dir"])
            .arg(&ca.dir)
            .args(["--spiffe-id", &format!("spiffe://{TD}{API}")]),
    );
    let join_file = ca.path("api.token");
    std::fs::write(&join_file, join).unwrap();
    let bootstrap = ca.path("api-bootstrap.pem");
    std::fs::copy(ca.bundle(), &bootstrap).unwrap();
    let identity_cfg = format!(
        "[identity]\ntrust_bundle = {bootstrap:?}\n[identity.ca]\nurl = \"https://127.0.0.1:{}\"\n\
         spiffe_id = \"spiffe://{TD}{API}\"\njoin_token_file = {join_file:?}\nbundle_refresh = \"1s\"\n{}",
        server.port,
        pkcs11_toml("api-token", "api", &pin)
    );
    let app = EchoApp::start();
    let (in_addr, in_admin) = (addr(), addr());
    // check-config opens the token and generates nothing: the key may be
    // absent still; a module that is not there is refused (round 10, keys
    // F7: it said "configuration OK" for a sidecar that could not start).
    let check = |identity_cfg: &str| {
        let p = ca.path("check.toml");
        std::fs::write(&p, inbound_toml(identity_cfg, in_addr, app.addr, in_admin)).unwrap();
        run(cmd("keyproof-proxy")
            .env(conf_k, &conf_v)
            .args(["check-config", "--config"])
            .arg(&p))
    };
    let ok = check(&identity_cfg);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(hsm.private_keys(&token).is_empty());
    let missing = check(&identity_cfg.replace(softhsm::MODULE, "/nonexistent/libpkcs11.so"));
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(said.contains("identity.pkcs11.module"), "{said}");
    // A PIN every user may read is used, and said (one others may write
    // is refused: keyproof_identity::pkcs11 tests).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let inb = ProxyProc::start_env(
        ca.tmp.path(),
        "in",
        &inbound_toml(&identity_cfg, in_addr, app.addr, in_admin),
        in_admin,
        &[(conf_k, conf_v.as_path())],
    );
    let logs = || format!("--- in\n{}\n--- serve\n{}", inb.log_text(), server.log());
    // The sidecar made its key in the token (one key, under the label).
    assert_eq!(
        hsm.private_keys(&token),
        vec!["api".to_owned()],
        "{}",
        logs()
    );
    let spki = hsm
        .public_key(&token, "api")
        .expect("public key object next to it");
    let token_pub = softhsm::TokenKey {
        token: token.clone(),
        label: "api".into(),
        spki,
    }
    .spki_pem();
    assert_key_location(&inb, "pkcs11", Some(&uri("api-token", "api")));
    assert!(
        inb.log_text().contains("PIN is readable by every user"),
        "{}",
        logs()
    );
    let (c_crt, c_key) = ca.issue("client", WEB, &[]);
    let call = || {
        curl(&[
            "-k",
            "--cert",
            c_crt.to_str().unwrap(),
            "--key",
            c_key.to_str().unwrap(),
            &format!("https://{in_addr}/hello"),
        ])
    };
    let (code, body, _) = call();
    assert_eq!(code, 200, "{body}\n{}", logs());
    assert_eq!(
        presented_pubkey(in_addr, &c_crt, &c_key),
        token_pub,
        "the bootstrap certificate is not for the token key"
    );
    let first_leaf = identity(in_admin)["chain"][0]["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let renewed = || inb.sample("keyproof_identity_renewals_total", &[("result", "ok")]);
    assert!(renewed() >= 1.0, "{}", inb.metrics());
    // A 10 s certificate is renewed after about 7 s, with the same key.
    wait_until("a renewal", Duration::from_secs(15), || renewed() >= 2.0);
    let leaf = identity(in_admin)["chain"][0]["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_ne!(leaf, first_leaf, "renewed but the same leaf?");
    let (code, body, _) = call();
    assert_eq!(code, 200, "{body}\n{}", logs());
    assert_eq!(
        presented_pubkey(in_addr, &c_crt, &c_key),
        token_pub,
        "the renewed certificate is not for the token key"
    );
    assert_eq!(
        hsm.private_keys(&token),
        vec!["api".to_owned()],
        "a renewal made another key"
    );
    assert!(
        key_ops(&inb, "ok") >= 3.0,
        "two CSRs and handshakes:\n{}",
        inb.metrics()
    );
    assert_eq!(
        inb.sample("keyproof_identity_renewals_total", &[]) - renewed(),
        0.0,
        "renewals that were not ok:\n{}\n{}",
        inb.metrics(),
        logs()
    );

    // The token is away when the next renewal is due: the CSR cannot be
    // signed, the renewal fails as `key_unavailable`, and the sidecar does
    // not fall back to a key of its own. Back before the certificate
    // lapses (10 s, renewed at about 7 s, retried after 1 s), the retry
    // renews with the token key.
    let away = hsm.remove_token("api-token");
    let unavailable = || {
        inb.sample(
            "keyproof_identity_renewals_total",
            &[("result", "key_unavailable")],
        )
    };
    wait_until(
        "a renewal refused for want of the key",
        Duration::from_secs(12),
        || unavailable() >= 1.0,
    );
    assert_eq!(
        http_get(in_admin, "/ready").map(|r| r.0).ok(),
        Some(503),
        "ready while the token is away"
    );
    let before = renewed();
    away.put_back();
    wait_until(
        "a renewal once the token is back",
        Duration::from_secs(8),
        || renewed() > before,
    );
    wait_until("/ready 200", Duration::from_secs(5), || {
        matches!(http_get(in_admin, "/ready"), Ok((200, _)))
    });
    assert_key_location(&inb, "pkcs11", Some(&uri("api-token", "api")));
    assert_eq!(
        presented_pubkey(in_addr, &c_crt, &c_key),
        token_pub,
        "after the outage the certificate is not for the token key"
    );
    assert_eq!(hsm.private_keys(&token), vec!["api".to_owned()]);
    assert_no_pin(&inb, &["4444-api"]);
    // No key file next to the config: only the CA's own (a file CA here)
    // and the test client's.
    let stray: Vec<_> = softhsm::key_files(ca.tmp.path())
        .into_iter()
        .filter(|p| !p.starts_with(&ca.dir) && !p.ends_with("client.key"))
        .collect();
    assert!(stray.is_empty(), "key files: {stray:?}");
}

/// Runs `keyproof-proxy run` on `config` (in `dir`) expecting it to exit
/// by itself within 15 s; returns (success, stdout + stderr).
fn run_to_exit(dir: &Path, name: &str, config: &str, hsm: &SoftHsm) -> (bool, String) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let (k, v) = hsm.env();
    let mut child = cmd("keyproof-proxy")
        .args(["run", "--config"])
        .arg(&cfg)
        .env(k, v)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyproof-proxy");
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{name}: keyproof-proxy still running after 15 s:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
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
fn startup_errors_name_the_pkcs11_setting_and_never_the_pin() {
    let Some(hsm) = SoftHsm::new("startup_errors_name_the_pkcs11_setting") else {
        return;
    };
    let pki = Pki::new(TD);
    const RIGHT: &str = "5555-right-pin";
    const WRONG: &str = "9999-wrong-pin";
    let token = hsm.init_token("api-token", RIGHT);
    let key = hsm.keygen(&token, "api", "EC:prime256v1");
    let cert = softhsm::certify(&hsm, &pki, "api", API, &key);
    let good_pin = hsm.pin_file("good.pin", RIGHT);
    let wrong_pin = hsm.pin_file("wrong.pin", WRONG);
    let other = pki.issue("other", API);
    let cfg = |identity: String| inbound_toml(&identity, addr(), addr(), addr());
    let files = |crt: &Path| {
        format!(
            "[identity]\ntrust_bundle = {:?}\n[identity.files]\ncert = {:?}\n",
            pki.bundle.display().to_string(),
            crt.display().to_string()
        )
    };
    let p11 = |module: &str, token: &str, label: &str, pin: &Path| {
        format!(
            "[identity.pkcs11]\nmodule = {module:?}\ntoken_label = {token:?}\nkey_label = {label:?}\npin_file = {:?}\n",
            pin.display().to_string()
        )
    };
    let m = softhsm::MODULE;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong-pin",
            cfg(files(&cert.crt) + &p11(m, "api-token", "api", &wrong_pin)),
            "identity.pkcs11.pin_file",
        ),
        (
            "no-pin-file",
            cfg(files(&cert.crt) + &p11(m, "api-token", "api", &pki.path("absent.pin"))),
            "identity.pkcs11.pin_file",
        ),
        (
            "no-key",
            cfg(files(&cert.crt) + &p11(m, "api-token", "absent-key", &good_pin)),
            "identity.pkcs11.key_label",
        ),
        (
            "no-token",
            cfg(files(&cert.crt) + &p11(m, "absent-token", "api", &good_pin)),
            "identity.pkcs11.token_label",
        ),
        (
            "no-module",
            cfg(files(&cert.crt)
                + &p11(
                    "/nonexistent/libnope-pkcs11.so",
                    "api-token",
                    "api",
                    &good_pin,
                )),
            "identity.pkcs11.module",
        ),
        (
            "key-and-token",
            cfg(files(&cert.crt).replace(
                "[identity.files]\n",
                &format!(
                    "[identity.files]\nkey = {:?}\n",
                    other.key.display().to_string()
                ),
            ) + &p11(m, "api-token", "api", &good_pin)),
            "identity.files.key",
        ),
    ];
    for (name, text, want) in &cases {
        let (ok, said) = run_to_exit(pki.tmp.path(), name, text, &hsm);
        assert!(!ok, "{name}: started anyway:\n{said}");
        assert!(said.contains(want), "{name}: expected {want:?} in:\n{said}");
        for pin in [RIGHT, WRONG] {
            assert!(
                !said.contains(pin),
                "{name}: the PIN is in the output:\n{said}"
            );
        }
    }
    // The certificate is for another key than the token's: refused too.
    let (ok, said) = run_to_exit(
        pki.tmp.path(),
        "mismatch",
        &cfg(files(&other.crt) + &p11(m, "api-token", "api", &good_pin)),
        &hsm,
    );
    assert!(!ok, "a certificate for another key was accepted:\n{said}");
    assert!(!said.contains(RIGHT), "{said}");
    // The same configuration with the right PIN starts (the cases above
    // failed for the reason given, not for another one).
    let admin = addr();
    let (k, v) = hsm.env();
    let good = ProxyProc::start_env(
        pki.tmp.path(),
        "good",
        &inbound_toml(
            &(files(&cert.crt) + &p11(m, "api-token", "api", &good_pin)),
            addr(),
            addr(),
            admin,
        ),
        admin,
        &[(k, v.as_path())],
    );
    assert_key_location(&good, "pkcs11", Some(&uri("api-token", "api")));
}

#[test]
fn a_removed_token_fails_closed_and_the_sidecar_recovers_without_restart() {
    let Some(hsm) = SoftHsm::new("a_removed_token_fails_closed") else {
        return;
    };
    let pki = Pki::new(TD);
    let token = hsm.init_token("api-token", "6666-api");
    let key = hsm.keygen(&token, "api", "EC:prime256v1");
    let cert = softhsm::certify(&hsm, &pki, "api", API, &key);
    let pin = hsm.pin_file("api.pin", &token.pin);
    let (conf_k, conf_v) = hsm.env();
    let web = pki.issue("web", WEB);
    let peer = pki.issue("peer", "/ns/default/sa/peer");
    let app = EchoApp::start();
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let inb = ProxyProc::start_env(
        pki.tmp.path(),
        "in",
        &inbound_toml(
            &files_token_identity(&pki, &cert, &token, "api", &pin),
            in_addr,
            app.addr,
            in_admin,
        ),
        in_admin,
        &[(conf_k, conf_v.as_path())],
    );
    let out = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &outbound_toml(
            TD,
            &identity_toml(&pki.bundle, &web),
            out_addr,
            in_addr,
            out_admin,
        ),
        out_admin,
    );
    let logs = || format!("--- in\n{}\n--- out\n{}", inb.log_text(), out.log_text());
    let pid = inb.pid();
    assert_key_location(&out, "file", None);
    assert_eq!(get_via(out_addr, AUTHORITY, "/before").0, 200, "{}", logs());
    assert_eq!(
        curl_mtls(in_addr, &pki, &peer, "/before", &[]).0,
        200,
        "{}",
        logs()
    );
    let ok_before = key_ops(&inb, "ok");

    let removed = hsm.remove_token("api-token");
    // Every new handshake needs a signature the token cannot make: none
    // gets through, directly or through the outbound's first connection to LATE.
    for i in 0..3 {
        let (code, body, _) = curl_mtls(in_addr, &pki, &peer, "/during", &[]);
        assert_ne!(
            code,
            200,
            "handshake {i} succeeded without the token: {body}\n{}",
            logs()
        );
    }
    let (code, body) = get_via(out_addr, LATE, "/during");
    assert_ne!(
        code,
        200,
        "a new mesh connection without the token: {body}\n{}",
        logs()
    );
    wait_until("/ready 503", Duration::from_secs(5), || {
        matches!(http_get(in_admin, "/ready"), Ok((503, _)))
    });
    let (_, ready_body) = http_get(in_admin, "/ready").unwrap();
    assert!(
        ready_body.contains("identity key unavailable"),
        "/ready: {ready_body}"
    );
    assert!(
        key_ops(&inb, "failed") >= 1.0,
        "no failed key operation counted:\n{}",
        inb.metrics()
    );
    let id = identity(in_admin);
    assert_eq!(
        id["key"]["available"].as_bool(),
        Some(false),
        "/identity: {id}"
    );
    assert_no_pin(&inb, &["6666-api"]);

    // The token comes back while the PIN file holds a wrong PIN (it is
    // re-read at every reopen): still unavailable, login refused.
    std::fs::write(&pin, "0000-wrong\n").unwrap();
    removed.put_back();
    let failed = key_ops(&inb, "failed");
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        let (code, body) = http_get(in_admin, "/ready").unwrap();
        assert_eq!(code, 503, "ready with a wrong PIN: {body}\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(curl_mtls(in_addr, &pki, &peer, "/wrong-pin", &[]).0, 200);
    assert!(key_ops(&inb, "failed") > failed, "{}", inb.metrics());
    assert_no_pin(&inb, &["6666-api", "0000-wrong"]);
    // The right PIN back: the probe (1 s while unavailable) recovers.
    std::fs::write(&pin, "6666-api\n").unwrap();
    wait_until(
        "/ready 200 after the token is back",
        Duration::from_secs(8),
        || matches!(http_get(in_admin, "/ready"), Ok((200, _))),
    );
    let (code, body, _) = curl_mtls(in_addr, &pki, &peer, "/after", &[]);
    assert_eq!(code, 200, "{body}\n{}", logs());
    // The outbound may hold its failed dial against LATE for a moment.
    let mut last = (0, String::new());
    wait_until(
        "a new mesh connection after the token is back",
        Duration::from_secs(5),
        || {
            last = get_via(out_addr, LATE, "/after");
            last.0 == 200
        },
    );
    assert!(xfcc(&last.1).contains(&pki.id(WEB)), "{}", last.1);
    assert_eq!(inb.pid(), pid);
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the sidecar restarted"
    );
    assert!(key_ops(&inb, "ok") > ok_before, "{}", inb.metrics());
    assert_key_location(&inb, "pkcs11", Some(&uri("api-token", "api")));
}

/// `[identity]` from `keyproof-ca serve` with a join token for `path`, the
/// key (type `key_type`) in `token` under `key_label`.
fn ca_token_identity(
    ca: &TestCa,
    port: u16,
    path: &str,
    key_type: &str,
    token: &str,
    key_label: &str,
    pin: &Path,
) -> String {
    let join = run_ok(
        cmd("keyproof-ca")
            .args(["token", "create", "--dir"])
            .arg(&ca.dir)
            .args(["--spiffe-id", &format!("spiffe://{TD}{path}")]),
    );
    let join_file = ca.path(&format!("{key_label}.join"));
    std::fs::write(&join_file, join).unwrap();
    let bootstrap = ca.path(&format!("{key_label}-bootstrap.pem"));
    std::fs::copy(ca.bundle(), &bootstrap).unwrap();
    format!(
        "[identity]\ntrust_bundle = {bootstrap:?}\n[identity.ca]\nurl = \"https://127.0.0.1:{port}\"\n\
         spiffe_id = \"spiffe://{TD}{path}\"\njoin_token_file = {join_file:?}\nkey_type = {key_type:?}\n{}",
        pkcs11_toml(token, key_label, pin)
    )
}

#[test]
fn ed25519_token_keys_carry_handshakes_and_step_up() {
    let Some(hsm) = SoftHsm::new("ed25519_token_keys") else {
        return;
    };
    let ca = TestCa::with_args(TD, &["--key-type", "ed25519"]);
    let server = CaServer::start(&ca, &["--rate-limit", "0"]);
    let token = hsm.init_token("mesh-token", "7777-mesh");
    let pin = hsm.pin_file("mesh.pin", &token.pin);
    let (conf_k, conf_v) = hsm.env();
    let env = [(conf_k, conf_v.as_path())];
    let app = EchoApp::start();
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let web = format!("spiffe://{TD}{WEB}");
    let inb = ProxyProc::start_env(
        ca.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{}\"\n\
             [[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"{web}\"]\nstep_up = true\n\
             [[inbound.routes]]\npath_prefix = \"/plain\"\nallow = [\"{web}\"]\n\
             [admin]\nlisten = \"{in_admin}\"\n",
            ca_token_identity(&ca, server.port, API, "ed25519", "mesh-token", "api", &pin),
            app.addr
        ),
        in_admin,
        &env,
    );
    let out = ProxyProc::start_env(
        ca.tmp.path(),
        "out",
        &outbound_toml(
            TD,
            &ca_token_identity(&ca, server.port, WEB, "ed25519", "mesh-token", "web", &pin),
            out_addr,
            in_addr,
            out_admin,
        ),
        out_admin,
        &env,
    );
    let logs = || {
        format!(
            "--- in\n{}\n--- out\n{}\n--- serve\n{}",
            inb.log_text(),
            out.log_text(),
            server.log()
        )
    };
    // Both keys were generated in the token, as Ed25519 keys.
    let mut keys = hsm.private_keys(&token);
    keys.sort();
    assert_eq!(keys, vec!["api".to_owned(), "web".to_owned()], "{}", logs());
    for label in ["api", "web"] {
        let spki = hsm.public_key(&token, label).expect("public key");
        // id-Ed25519 (1.3.101.112): 06 03 2b 65 70.
        assert!(
            spki.windows(5).any(|w| w == [0x06, 0x03, 0x2b, 0x65, 0x70]),
            "{label} is not an Ed25519 key: {spki:02x?}"
        );
    }
    let (code, body) = get_via(out_addr, AUTHORITY, "/plain");
    assert_eq!(code, 200, "{body}\n{}", logs());
    let before = key_ops(&out, "ok");
    for i in 0..3 {
        let (code, body, _) = curl(&[
            "-x",
            &format!("http://{out_addr}"),
            "-H",
            "content-type: application/json",
            "-d",
            "{\"a\":1}",
            &format!("http://{AUTHORITY}/admin/x"),
        ]);
        assert_eq!(code, 200, "step-up {i}: {body}\n{}", logs());
    }
    assert!(key_ops(&out, "ok") - before >= 3.0, "{}", out.metrics());
    assert!(
        inb.sample("keyproof_stepup_verifications_total", &[("result", "ok")]) >= 3.0,
        "{}",
        inb.metrics()
    );
    for p in [&inb, &out] {
        assert_eq!(key_ops(p, "failed"), 0.0, "{}", p.metrics());
        assert_no_pin(p, &["7777-mesh"]);
    }
    assert_key_location(&inb, "pkcs11", Some(&uri("mesh-token", "api")));
    assert_key_location(&out, "pkcs11", Some(&uri("mesh-token", "web")));
    for admin in [in_admin, out_admin] {
        let id = identity(admin);
        assert_eq!(id["key"]["key_type"].as_str(), Some("ed25519"), "{id}");
    }
}

#[test]
fn a_removed_token_stops_step_up_signatures_on_an_open_connection_and_recovers() {
    let Some(pair) = StepUpPair::start("a_removed_token_stops_step_up", "8181-web") else {
        return;
    };
    let StepUpPair {
        ref hsm,
        inb,
        out,
        out_addr,
        out_admin,
        ..
    } = pair;
    let logs = || format!("--- in\n{}\n--- out\n{}", inb.log_text(), out.log_text());
    let post = || {
        let (code, body, _) = curl(&[
            "-x",
            &format!("http://{out_addr}"),
            "-H",
            "content-type: application/json",
            "-d",
            "{\"a\":1}",
            &format!("http://{AUTHORITY}/admin/x"),
        ]);
        (code, body)
    };
    assert_eq!(post().0, 200, "{}", logs());
    let verified = || inb.sample("keyproof_stepup_verifications_total", &[("result", "ok")]);
    let v_before = verified();

    let away = hsm.remove_token("web-token");
    // The mesh connection is open (no handshake needed), but every step-up
    // request needs a signature the token cannot make now: none reaches the
    // app, and nothing unsigned is let through.
    for i in 0..3 {
        let (code, body) = post();
        assert_ne!(
            code,
            200,
            "step-up {i} without the token: {body}\n{}",
            logs()
        );
        assert!(!body.starts_with("POST /admin"), "reached the app: {body}");
    }
    // The plain route on the open connection needs no signature.
    let (code, body) = get_via(out_addr, AUTHORITY, "/plain");
    assert_eq!(code, 200, "{body}\n{}", logs());
    // A new mesh connection needs the outbound's client CertificateVerify.
    let (code, body) = get_via(out_addr, LATE, "/plain");
    assert_ne!(
        code,
        200,
        "a new connection without the client's token: {body}\n{}",
        logs()
    );
    assert_eq!(verified(), v_before, "{}", inb.metrics());
    wait_until("the outbound's /ready 503", Duration::from_secs(5), || {
        matches!(http_get(out_admin, "/ready"), Ok((503, _)))
    });
    assert!(key_ops(&out, "failed") >= 1.0, "{}", out.metrics());

    away.put_back();
    wait_until("the outbound's /ready 200", Duration::from_secs(8), || {
        matches!(http_get(out_admin, "/ready"), Ok((200, _)))
    });
    let (code, body) = post();
    assert_eq!(code, 200, "{body}\n{}", logs());
    assert!(verified() > v_before, "{}", inb.metrics());
    wait_until(
        "a new mesh connection once the token is back",
        Duration::from_secs(5),
        || get_via(out_addr, LATE, "/plain").0 == 200,
    );
    assert_no_pin(&out, &["8181-web"]);
}

#[test]
fn a_token_lost_without_traffic_is_noticed_by_the_probe() {
    let Some(hsm) = SoftHsm::new("a_token_lost_without_traffic") else {
        return;
    };
    let pki = Pki::new(TD);
    let token = hsm.init_token("api-token", "9191-api");
    let key = hsm.keygen(&token, "api", "EC:prime256v1");
    let cert = softhsm::certify(&hsm, &pki, "api", API, &key);
    let pin = hsm.pin_file("api.pin", &token.pin);
    let (conf_k, conf_v) = hsm.env();
    let app = EchoApp::start();
    let (in_addr, in_admin) = (addr(), addr());
    let inb = ProxyProc::start_env(
        pki.tmp.path(),
        "in",
        &inbound_toml(
            &files_token_identity(&pki, &cert, &token, "api", &pin),
            in_addr,
            app.addr,
            in_admin,
        ),
        in_admin,
        &[(conf_k, conf_v.as_path())],
    );
    let away = hsm.remove_token("api-token");
    // No handshake asks for a signature: the probe (every 10 s while the
    // key works) is what notices.
    wait_until("/ready 503 from the probe", Duration::from_secs(13), || {
        matches!(http_get(in_admin, "/ready"), Ok((503, _)))
    });
    assert!(key_ops(&inb, "failed") >= 1.0, "{}", inb.metrics());
    assert_eq!(
        identity(in_admin)["key"]["available"].as_bool(),
        Some(false)
    );
    away.put_back();
    wait_until("/ready 200 from the probe", Duration::from_secs(5), || {
        matches!(http_get(in_admin, "/ready"), Ok((200, _)))
    });
    let peer = pki.issue("peer", "/ns/default/sa/peer");
    assert_eq!(
        curl_mtls(in_addr, &pki, &peer, "/after", &[]).0,
        200,
        "{}",
        inb.log_text()
    );
}
