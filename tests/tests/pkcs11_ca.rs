//! `keyproof-ca` with its keys in a PKCS#11 token (SoftHSM2): `init` in the
//! token leaves no key file in the CA directory, `issue`, `serve`, `rotate
//! intermediate` and a full root rotation sign through the token while
//! sidecars keep working; and the offline root (a file outside the CA
//! directory, or another token) is needed only to rotate.
//!
//! Each test makes its own SoftHSM2 (`SOFTHSM2_CONF` passed to the
//! children only). Without SoftHSM2 and OpenSC the tests print SKIP, or
//! fail when `CI` is set.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keyproof_tests::ca_server::CaServer;
use keyproof_tests::proxy_support::*;
use keyproof_tests::softhsm::{self, SoftHsm, Token};
use keyproof_tests::{cmd, free_port, run, run_err, run_ok, TestCa};
use serde_json::Value;

const TD: &str = "pkcs11-ca.test";
const API: &str = "/ns/default/sa/api";
const WEB: &str = "/ns/default/sa/web";
const AUTHORITY: &str = "api.default.svc";

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

/// `keyproof-ca ARGS` with `SOFTHSM2_CONF` set.
fn ca_cmd(hsm: &SoftHsm, args: &[&str]) -> Command {
    let mut c = cmd("keyproof-ca");
    let (k, v) = hsm.env();
    c.env(k, v).args(args);
    c
}

/// `--dir DIR` as arguments.
fn dir_args(dir: &Path) -> [String; 2] {
    ["--dir".into(), dir.display().to_string()]
}

/// `keyproof-ca init` into a fresh temp dir with `extra` arguments.
fn init(hsm: &SoftHsm, extra: &[&str]) -> TestCa {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    run_ok(
        ca_cmd(hsm, &["init", "--trust-domain", TD, "--dir"])
            .arg(&dir)
            .args(extra),
    );
    TestCa {
        tmp,
        dir,
        trust_domain: TD.into(),
    }
}

/// `keyproof-ca issue --key-out` for `path` with the token reachable;
/// returns (chain, key).
fn issue(hsm: &SoftHsm, ca: &TestCa, name: &str, path: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        ca.path(&format!("{name}.crt")),
        ca.path(&format!("{name}.key")),
    );
    run_ok(
        ca_cmd(
            hsm,
            &["issue", "--spiffe-id", &format!("spiffe://{TD}{path}")],
        )
        .args(dir_args(&ca.dir))
        .arg("--key-out")
        .arg(&key)
        .arg("--cert-out")
        .arg(&crt),
    );
    (crt, key)
}

/// `openssl verify` of a chain file (leaf, intermediate) against the CA's
/// bundle, with the intermediate as untrusted.
fn openssl_verify(ca: &TestCa, chain: &Path) -> Result<(), String> {
    let text = fs::read_to_string(chain).unwrap();
    let end = "-----END CERTIFICATE-----\n";
    let cut = text.find(end).unwrap() + end.len();
    let leaf = chain.with_extension("leaf.pem");
    let rest = chain.with_extension("untrusted.pem");
    fs::write(&leaf, &text[..cut]).unwrap();
    fs::write(&rest, &text[cut..]).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca.bundle())
        .arg("-untrusted")
        .arg(&rest)
        .arg(&leaf)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn sha_of_first_cert(pem_file: &Path) -> String {
    let der = keyproof_identity::keys::certs_from_pem(&fs::read(pem_file).unwrap())
        .unwrap()
        .remove(0);
    sha256_hex(&der)
}

fn identity(admin: SocketAddr) -> Value {
    match http_get(admin, "/identity") {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn roots(admin: SocketAddr) -> usize {
    identity(admin)["trust_roots"]
        .as_array()
        .map_or(0, |a| a.len())
}

fn no_key_files(ca: &TestCa, when: &str) {
    let found = softhsm::key_files(&ca.dir);
    assert!(
        found.is_empty(),
        "{when}: key files in the CA directory: {found:?}"
    );
}

/// The private key labels of `token` that start with `prefix`.
fn labels(hsm: &SoftHsm, token: &Token, prefix: &str) -> Vec<String> {
    hsm.private_keys(token)
        .into_iter()
        .filter(|l| l.starts_with(prefix))
        .collect()
}

/// A sidecar configuration obtaining its identity from the CA server.
fn ca_identity_toml(ca: &TestCa, port: u16, path: &str, name: &str) -> String {
    let token = run_ok(
        cmd("keyproof-ca")
            .args(["token", "create", "--dir"])
            .arg(&ca.dir)
            .args(["--spiffe-id", &format!("spiffe://{TD}{path}")]),
    );
    let token_file = ca.path(&format!("{name}.token"));
    fs::write(&token_file, token).unwrap();
    let bootstrap = ca.path(&format!("{name}-bootstrap.pem"));
    fs::copy(ca.bundle(), &bootstrap).unwrap();
    format!(
        "[identity]\ntrust_bundle = {bootstrap:?}\n[identity.ca]\nurl = \"https://127.0.0.1:{port}\"\n\
         spiffe_id = \"spiffe://{TD}{path}\"\njoin_token_file = {token_file:?}\nbundle_refresh = \"1s\"\n"
    )
}

/// `check` names the root and intermediate keys by their token URIs and
/// says they sign.
fn check_names_token_keys(checked: &str, root: &str, int: &str) {
    for (what, label) in [("root key", root), ("intermediate key", int)] {
        let uri = format!("pkcs11:token=ca-token;object={label};type=private");
        assert!(
            checked.lines().any(|l| l.starts_with("ok")
                && l.contains(what)
                && l.contains(&uri)
                && l.contains("signs")),
            "check does not report the {what} {uri} as usable:\n{checked}"
        );
    }
}

#[test]
fn a_ca_in_a_token_issues_serves_and_rotates_with_no_key_file() {
    let Some(hsm) = SoftHsm::new("a_ca_in_a_token") else {
        return;
    };
    let token = hsm.init_token("ca-token", "7777-ca");
    let pin = hsm.pin_file("ca.pin", &token.pin);
    let pin_s = pin.display().to_string();
    let ca = init(
        &hsm,
        &[
            "--pkcs11-module",
            softhsm::MODULE,
            "--pkcs11-token",
            "ca-token",
            "--pin-file",
            &pin_s,
        ],
    );
    no_key_files(&ca, "after init");
    let (roots0, ints0) = (
        labels(&hsm, &token, "keyproof-root-"),
        labels(&hsm, &token, "keyproof-intermediate-"),
    );
    assert_eq!(
        (roots0.len(), ints0.len()),
        (1, 1),
        "{:?}",
        hsm.objects(&token)
    );
    let ca_json = fs::read_to_string(ca.dir.join("ca.json")).expect("ca.json");
    for want in ["pkcs11", "ca-token", roots0[0].as_str(), ints0[0].as_str()] {
        assert!(ca_json.contains(want), "ca.json lacks {want:?}:\n{ca_json}");
    }
    assert!(!ca_json.contains("7777-ca"), "the PIN is in ca.json");
    // `check` says where each key lives and that it signs.
    let checked = run_ok(ca_cmd(&hsm, &["check"]).args(dir_args(&ca.dir)));
    check_names_token_keys(&checked, &roots0[0], &ints0[0]);

    // Issue through the token; the leaf verifies with openssl.
    let (leaf, _) = issue(&hsm, &ca, "first", WEB);
    openssl_verify(&ca, &leaf).expect("leaf from the token's intermediate");
    no_key_files(&ca, "after issue");

    // serve: sidecars bootstrap from it (their own keys are in memory).
    let server = CaServer::start_env(
        &ca,
        free_port(),
        &["--ttl", "10s", "--rate-limit", "0"],
        &[(hsm.env().0, hsm.env().1.as_path())],
    );
    let app = EchoApp::start();
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let inb = ProxyProc::start(
        ca.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{}\"\n[admin]\nlisten = \"{in_admin}\"\n",
            ca_identity_toml(&ca, server.port, API, "api"),
            app.addr
        ),
        in_admin,
    );
    let out = ProxyProc::start(
        ca.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\n\
             [[outbound.upstreams]]\nhost = \"{AUTHORITY}\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://{TD}{API}\"\n\
             [admin]\nlisten = \"{out_admin}\"\n",
            ca_identity_toml(&ca, server.port, WEB, "web")
        ),
        out_admin,
    );
    let logs = || {
        format!(
            "--- in\n{}\n--- out\n{}\n--- serve\n{}",
            inb.log_text(),
            out.log_text(),
            server.log()
        )
    };
    for admin in [in_admin, out_admin] {
        assert_eq!(
            identity(admin)["key"]["location"].as_str(),
            Some("memory"),
            "{}",
            identity(admin)
        );
    }
    // Requests through the pair, and a new handshake straight to the inbound.
    let mut sent = 0;
    let mut through = |stage: &str, client: &(PathBuf, PathBuf)| {
        let (code, body, _) = curl(&[
            "-x",
            &format!("http://{out_addr}"),
            &format!("http://{AUTHORITY}/{stage}"),
        ]);
        assert_eq!(code, 200, "{stage}, through the pair: {body}\n{}", logs());
        let (code, body, _) = curl(&[
            "-k",
            "--cert",
            client.0.to_str().unwrap(),
            "--key",
            client.1.to_str().unwrap(),
            &format!("https://{in_addr}/{stage}"),
        ]);
        assert_eq!(code, 200, "{stage}, new handshake: {body}\n{}", logs());
        sent += 2;
    };
    let client0 = issue(&hsm, &ca, "client0", "/ns/default/sa/peer");
    through("bootstrapped", &client0);

    // A full root rotation with every key in the token.
    run_ok(ca_cmd(&hsm, &["rotate", "root", "prepare"]).args(dir_args(&ca.dir)));
    let roots1 = labels(&hsm, &token, "keyproof-root-");
    assert_eq!(
        roots1.len(),
        2,
        "prepare made no new root key in the token: {roots1:?}"
    );
    no_key_files(&ca, "after prepare");
    wait_until(
        "both sidecars to trust both roots",
        Duration::from_secs(20),
        || roots(in_admin) == 2 && roots(out_admin) == 2,
    );
    through("prepared", &client0);
    run_ok(ca_cmd(&hsm, &["rotate", "root", "activate"]).args(dir_args(&ca.dir)));
    assert_eq!(
        labels(&hsm, &token, "keyproof-intermediate-").len(),
        2,
        "activate made no new intermediate key in the token"
    );
    no_key_files(&ca, "after activate");
    let new_int = sha_of_first_cert(&ca.dir.join("intermediate.crt"));
    let on_new = |admin| identity(admin)["chain"][1]["sha256"].as_str() == Some(new_int.as_str());
    wait_until(
        "both sidecars to renew on the new chain",
        Duration::from_secs(30),
        || on_new(in_admin) && on_new(out_admin),
    );
    let client1 = issue(&hsm, &ca, "client1", "/ns/default/sa/peer");
    openssl_verify(&ca, &client1.0).expect("a leaf of the new root");
    through("activated", &client1);
    run_ok(ca_cmd(&hsm, &["rotate", "root", "finish", "--force"]).args(dir_args(&ca.dir)));
    wait_until(
        "both sidecars to drop the old root",
        Duration::from_secs(20),
        || roots(in_admin) == 1 && roots(out_admin) == 1,
    );
    through("finished", &client1);
    assert!(
        openssl_verify(&ca, &leaf).is_err(),
        "a leaf of the old root still verifies after finish"
    );

    // An intermediate rotation: a new key in the token, serve follows.
    let ints2 = labels(&hsm, &token, "keyproof-intermediate-");
    run_ok(ca_cmd(&hsm, &["rotate", "intermediate"]).args(dir_args(&ca.dir)));
    let ints3 = labels(&hsm, &token, "keyproof-intermediate-");
    assert_eq!(ints3.len(), 3, "{ints3:?}");
    let int3 = sha_of_first_cert(&ca.dir.join("intermediate.crt"));
    let client2 = issue(&hsm, &ca, "client2", "/ns/default/sa/peer");
    openssl_verify(&ca, &client2.0).expect("a leaf of the rotated intermediate");
    wait_until(
        "a renewal from the rotated intermediate",
        Duration::from_secs(30),
        || identity(in_admin)["chain"][1]["sha256"].as_str() == Some(int3.as_str()),
    );
    through("intermediate-rotated", &client2);
    no_key_files(&ca, "at the end");
    assert_eq!(sent, 10);
    // `check` fails now (the first leaf was left on the old root by
    // `finish --force`) but still reports the keys in the token.
    let check = run(ca_cmd(&hsm, &["check"]).args(dir_args(&ca.dir)));
    let checked = String::from_utf8_lossy(&check.stdout).into_owned();
    let (root_now, int_now) = (
        labels(&hsm, &token, "keyproof-root-")
            .into_iter()
            .find(|l| !roots0.contains(l))
            .expect("the new root key"),
        ints3
            .into_iter()
            .find(|l| !ints2.contains(l))
            .expect("the current intermediate key"),
    );
    check_names_token_keys(&checked, &root_now, &int_now);
    for text in [server.log(), inb.log_text(), out.log_text(), checked] {
        assert!(!text.contains("7777-ca"), "the PIN was printed:\n{text}");
    }
}

#[test]
fn the_ca_pin_file_is_overridable_and_a_wrong_pin_is_a_clear_error() {
    let Some(hsm) = SoftHsm::new("the_ca_pin_file") else {
        return;
    };
    let token = hsm.init_token("ca-token", "8888-ca");
    let pin = hsm.pin_file("ca.pin", &token.pin);
    let pin_s = pin.display().to_string();
    let ca = init(
        &hsm,
        &[
            "--pkcs11-module",
            softhsm::MODULE,
            "--pkcs11-token",
            "ca-token",
            "--pin-file",
            &pin_s,
        ],
    );
    // The PIN moves: the stored path is gone, --pin-file names the new one.
    let moved = hsm.pin_file("moved.pin", &token.pin);
    fs::remove_file(&pin).unwrap();
    let crt = ca.path("moved.crt");
    let key = ca.path("moved.key");
    let base = |c: &mut Command| {
        c.args(dir_args(&ca.dir))
            .args(["--spiffe-id", &format!("spiffe://{TD}{WEB}")])
            .arg("--key-out")
            .arg(&key)
            .arg("--cert-out")
            .arg(&crt)
            .arg("--force");
    };
    let mut c = ca_cmd(&hsm, &["issue"]);
    base(&mut c);
    let err = run_err(&mut c);
    assert!(
        err.contains(&pin_s) || err.to_lowercase().contains("pin"),
        "{err}"
    );
    let mut c = ca_cmd(&hsm, &["issue", "--pin-file"]);
    c.arg(&moved);
    base(&mut c);
    run_ok(&mut c);
    openssl_verify(&ca, &crt).expect("issued with the moved PIN file");
    // A wrong PIN: refused, the message says so, no PIN printed.
    let wrong = hsm.pin_file("wrong.pin", "0000-wrong");
    let mut c = ca_cmd(&hsm, &["issue", "--pin-file"]);
    c.arg(&wrong);
    base(&mut c);
    let out = run(&mut c);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "a wrong PIN was accepted: {said}");
    assert!(
        said.contains("login") || said.contains("PIN"),
        "the error does not say the PIN was refused: {said}"
    );
    assert!(
        !said.contains("0000-wrong") && !said.contains("8888-ca"),
        "{said}"
    );
}

#[test]
fn an_offline_root_file_is_needed_only_to_rotate_the_intermediate() {
    // No token here: a file CA whose root key lives outside its directory.
    let keep = tempfile::tempdir().unwrap();
    let root_key = keep.path().join("offline-root.key");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    run_ok(
        cmd("keyproof-ca")
            .args(["init", "--trust-domain", TD, "--dir"])
            .arg(&dir)
            .arg("--root-key-out")
            .arg(&root_key),
    );
    let ca = TestCa {
        tmp,
        dir,
        trust_domain: TD.into(),
    };
    assert!(
        !ca.dir.join("root.key").exists(),
        "root.key in the CA directory"
    );
    let found: Vec<_> = softhsm::key_files(&ca.dir)
        .into_iter()
        .filter(|p| !p.ends_with("intermediate.key"))
        .collect();
    assert!(found.is_empty(), "{found:?}");
    let mode = fs::metadata(&root_key)
        .expect("the root key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "root key file mode");
    assert!(fs::read_to_string(&root_key)
        .unwrap()
        .contains("PRIVATE KEY"));

    // issue never needs the root.
    let (leaf, _) = ca.issue("leaf0", WEB, &[]);
    openssl_verify(&ca, &leaf).expect("leaf of the offline-root CA");
    let int_before = fs::read(ca.dir.join("intermediate.crt")).unwrap();

    // rotate intermediate without the root: a clear error, nothing changed.
    let err = run_err(
        cmd("keyproof-ca")
            .args(["rotate", "intermediate", "--dir"])
            .arg(&ca.dir),
    );
    assert!(
        err.contains("--root-key"),
        "the error does not say what is needed: {err}"
    );
    assert_eq!(
        fs::read(ca.dir.join("intermediate.crt")).unwrap(),
        int_before
    );
    // With it: rotated, and the root key was not copied in.
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "intermediate", "--dir"])
            .arg(&ca.dir)
            .arg("--root-key")
            .arg(&root_key),
    );
    assert_ne!(
        fs::read(ca.dir.join("intermediate.crt")).unwrap(),
        int_before
    );
    assert!(
        !ca.dir.join("root.key").exists(),
        "rotate copied the root key in"
    );
    let (leaf1, _) = ca.issue("leaf1", WEB, &[]);
    openssl_verify(&ca, &leaf1).expect("leaf of the rotated intermediate");
    openssl_verify(&ca, &leaf).expect("the old leaf still verifies");
    // A wrong root key file is refused.
    let other = keep.path().join("other.key");
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    fs::write(&other, kp.serialize_pem()).unwrap();
    fs::set_permissions(&other, fs::Permissions::from_mode(0o600)).unwrap();
    run_err(
        cmd("keyproof-ca")
            .args(["rotate", "intermediate", "--dir"])
            .arg(&ca.dir)
            .arg("--root-key")
            .arg(&other),
    );
    let (leaf2, _) = ca.issue("leaf2", WEB, &[]);
    openssl_verify(&ca, &leaf2).expect("still issuing after the refused rotation");
}

#[test]
fn an_offline_root_in_another_token_is_needed_only_to_rotate() {
    let Some(hsm) = SoftHsm::new("an_offline_root_in_another_token") else {
        return;
    };
    let online = hsm.init_token("ca-token", "1212-online");
    let offline = hsm.init_token("root-token", "3434-offline");
    let pin = hsm.pin_file("ca.pin", &online.pin);
    let root_pin = hsm.pin_file("root.pin", &offline.pin);
    let (pin_s, root_pin_s) = (pin.display().to_string(), root_pin.display().to_string());
    let ca = init(
        &hsm,
        &[
            "--pkcs11-module",
            softhsm::MODULE,
            "--pkcs11-token",
            "ca-token",
            "--pin-file",
            &pin_s,
            "--root-pkcs11-token",
            "root-token",
            "--root-pin-file",
            &root_pin_s,
        ],
    );
    no_key_files(&ca, "after init");
    assert_eq!(
        labels(&hsm, &offline, "keyproof-root-").len(),
        1,
        "{:?}",
        hsm.objects(&offline)
    );
    assert_eq!(
        labels(&hsm, &online, "keyproof-root-").len(),
        0,
        "{:?}",
        hsm.objects(&online)
    );
    assert_eq!(labels(&hsm, &online, "keyproof-intermediate-").len(), 1);

    // The root token goes back in the safe: issuing needs only the online one.
    let away = hsm.remove_token("root-token");
    let (leaf, _) = issue(&hsm, &ca, "leaf0", WEB);
    openssl_verify(&ca, &leaf).expect("issued without the root token");
    let err = run_err(ca_cmd(&hsm, &["rotate", "intermediate"]).args(dir_args(&ca.dir)));
    assert!(
        err.contains("root-token"),
        "the error does not name the root's token: {err}"
    );
    away.put_back();
    run_ok(ca_cmd(&hsm, &["rotate", "intermediate"]).args(dir_args(&ca.dir)));
    assert_eq!(labels(&hsm, &online, "keyproof-intermediate-").len(), 2);
    let (leaf1, _) = issue(&hsm, &ca, "leaf1", WEB);
    openssl_verify(&ca, &leaf1).expect("leaf of the rotated intermediate");
    no_key_files(&ca, "after rotation");
}

#[test]
fn ca_serve_fails_closed_while_its_token_is_away_and_recovers() {
    let Some(hsm) = SoftHsm::new("ca_serve_fails_closed") else {
        return;
    };
    let token = hsm.init_token("ca-token", "5656-ca");
    let pin = hsm.pin_file("ca.pin", &token.pin);
    let pin_s = pin.display().to_string();
    let ca = init(
        &hsm,
        &[
            "--pkcs11-module",
            softhsm::MODULE,
            "--pkcs11-token",
            "ca-token",
            "--pin-file",
            &pin_s,
        ],
    );
    let server = CaServer::start_env(
        &ca,
        free_port(),
        &["--rate-limit", "0"],
        &[(hsm.env().0, hsm.env().1.as_path())],
    );
    let join = |path: &str| {
        run_ok(
            cmd("keyproof-ca")
                .args(["token", "create", "--dir"])
                .arg(&ca.dir)
                .args(["--spiffe-id", &format!("spiffe://{TD}{path}")]),
        )
        .trim()
        .to_owned()
    };
    let bootstrap = |path: &str, token: &str| {
        let id = format!("spiffe://{TD}{path}");
        let k = keyproof_ca::client::new_key(keyproof_identity::keys::KeyType::EcdsaP256, &id)
            .expect("key");
        keyproof_tests::ca_server::curl_bootstrap(
            &ca,
            server.port,
            &k.csr_pem,
            &["-H", &format!("Authorization: Bearer {token}")],
            "",
        )
    };
    let ready = || server.admin_get("/ready").0;
    let ops = |result: &str| {
        keyproof_tests::ca_server::sample(
            &server.scrape(),
            &format!("keyproof_ca_key_operations_total{{result=\"{result}\"}}"),
        )
        .unwrap_or(-1.0)
    };
    assert_eq!(ready(), 200, "{}", server.log());
    let (status, code, body) = bootstrap(WEB, &join(WEB));
    assert_eq!(
        (status, code.as_str()),
        (200, "ok"),
        "{body}\n{}",
        server.log()
    );
    assert!(ops("ok") >= 1.0, "{}", server.scrape());

    let away = hsm.remove_token("ca-token");
    let kept = join(API);
    let (status, code, body) = bootstrap(API, &kept);
    assert_eq!(
        (status, code.as_str()),
        (503, "signing_key_unavailable"),
        "issuing without the token: {body}\n{}",
        server.log()
    );
    wait_until(
        "/ready 503 without the token",
        Duration::from_secs(5),
        || ready() == 503,
    );
    assert!(ops("failed") >= 1.0, "{}", server.scrape());

    away.put_back();
    wait_until(
        "/ready 200 with the token back",
        Duration::from_secs(8),
        || ready() == 200,
    );
    // The refused bootstrap did not spend its join token.
    let (status, code, body) = bootstrap(API, &kept);
    assert_eq!(
        (status, code.as_str()),
        (200, "ok"),
        "{body}\n{}",
        server.log()
    );
    assert!(!server.log().contains("5656-ca"), "the PIN is in the log");
}
