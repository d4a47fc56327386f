//! `keyproof-ca serve` end to end: the real server binary over mutual TLS,
//! driven by keyproof's CA client and by curl.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keyproof_ca::client::{certified_key, new_key, ClientError};
use keyproof_identity::keys::KeyType;
use keyproof_identity::verify::TrustBundle;
use keyproof_tests::ca_server::{self, client, code, rt, sample, CaServer};
use keyproof_tests::proxy_support::{capture_client_hello, GROUP_X25519, GROUP_X25519MLKEM768};
use keyproof_tests::{cmd, free_port, run_ok, TestCa};
use serde_json::Value;

const TD: &str = "prod.example.com";
const WEB: &str = "spiffe://prod.example.com/ns/default/sa/web";

fn token(ca: &TestCa, id: &str, ttl: &str) -> String {
    run_ok(
        cmd("keyproof-ca")
            .args(["token", "create", "--dir"])
            .arg(&ca.dir)
            .args(["--spiffe-id", id, "--ttl", ttl]),
    )
    .trim()
    .to_owned()
}

#[test]
fn bootstrap_then_renew_with_single_use_tokens() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let c = client(&ca, srv.port);
    let rt = rt();
    let t = token(&ca, WEB, "1h");
    // Only the hash is stored.
    let stored = fs::read_to_string(ca.dir.join("tokens.jsonl")).unwrap();
    assert!(!stored.contains(&t));

    // A tampered CSR is refused and does not burn the token.
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    let tampered = k.csr_pem.replacen("MI", "MJ", 1);
    assert!(matches!(
        code(rt.block_on(c.bootstrap(&t, &tampered))).as_str(),
        "bad_csr" | "bad_csr_signature"
    ));
    let svid = rt.block_on(c.bootstrap(&t, &k.csr_pem)).expect("bootstrap");
    assert_eq!(svid.spiffe_id, WEB);
    assert_eq!(svid.chain.len(), 2);
    assert_eq!(svid.bundle.len(), 1);

    // Reuse, garbage, expiry, id mismatch.
    let k2 = new_key(KeyType::EcdsaP256, WEB).unwrap();
    assert_eq!(
        code(rt.block_on(c.bootstrap(&t, &k2.csr_pem))),
        "token_reused"
    );
    assert_eq!(
        code(rt.block_on(c.bootstrap("kpt_nonsense", &k2.csr_pem))),
        "invalid_token"
    );
    let short = token(&ca, WEB, "1s");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        code(rt.block_on(c.bootstrap(&short, &k2.csr_pem))),
        "token_expired"
    );

    // Renew with the SVID just issued: same identity, new key.
    let current = Arc::new(certified_key(svid.chain.clone(), &k.key_der).unwrap());
    let k3 = new_key(KeyType::EcdsaP256, WEB).unwrap();
    let renewed = rt
        .block_on(c.renew(current.clone(), &k3.csr_pem))
        .expect("renew");
    assert_eq!(renewed.spiffe_id, WEB);
    assert_ne!(renewed.chain[0], svid.chain[0]);

    // Ed25519 CSRs are allowed; RSA is not.
    let ed = new_key(KeyType::Ed25519, WEB).unwrap();
    assert_eq!(
        code(rt.block_on(c.renew(current.clone(), &ed.csr_pem))),
        "ok"
    );
    let rsa_csr = ca.path("rsa.csr");
    run_ok(
        Command::new("openssl")
            .args([
                "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=x", "-keyout",
            ])
            .arg(ca.path("rsa.key"))
            .arg("-out")
            .arg(&rsa_csr),
    );
    let rsa = fs::read_to_string(&rsa_csr).unwrap();
    assert_eq!(
        code(rt.block_on(c.renew(current, &rsa))),
        "csr_key_type_not_allowed"
    );

    // The ledger names who asked.
    let ledger = fs::read_to_string(ca.dir.join("ledger.jsonl")).unwrap();
    let requesters: Vec<String> = ledger
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["requester"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        requesters.iter().any(|r| r.starts_with("bootstrap:")),
        "{requesters:?}"
    );
    assert!(
        requesters.contains(&format!("renew:{WEB}")),
        "{requesters:?}"
    );
}

/// curl with a client certificate, straight at the API.
fn curl(ca: &TestCa, port: u16, args: &[&str], path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(ca.bundle())
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let body = format!("{body}{}", String::from_utf8_lossy(&out.stderr));
    (status.trim().parse().unwrap_or(0), body)
}

#[test]
fn renewal_is_only_for_the_callers_own_identity_and_rate_limited() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &["--rate-limit", "3"]);
    let (cert, key) = ca.issue("web", "/ns/default/sa/web", &[]);
    let (csr, _) = openssl_csr(&ca, "new");
    let cert_s = cert.display().to_string();
    let key_s = key.display().to_string();
    let data = format!("@{}", csr.display());
    let renew_from = |source: &str, path: &str| {
        curl(
            &ca,
            srv.port,
            &[
                "--interface",
                source,
                "--cert",
                &cert_s,
                "--key",
                &key_s,
                "--data-binary",
                &data,
                "-H",
                "Content-Type: application/pkcs10",
            ],
            path,
        )
    };
    let renew = |path: &str| renew_from("127.0.0.1", path);
    let (status, body) = renew("/v1/renew");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["spiffe_id"], WEB);

    let (status, body) =
        renew("/v1/renew?spiffe_id=spiffe://prod.example.com/ns/kube-system/sa/admin");
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "id_mismatch"
    );

    // Without a client certificate.
    let (status, body) = curl(&ca, srv.port, &["--data-binary", &data], "/v1/renew");
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "client_certificate_required"
    );

    // Rate limit: 3 per minute per identity and address (one used above).
    assert_eq!(renew("/v1/renew").0, 200);
    assert_eq!(renew("/v1/renew").0, 200);
    let (status, body) = renew("/v1/renew");
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "rate_limited"
    );
    // Another replica of the identity (another address) still renews: one
    // replica cannot use up what the others need (round 10, keys F6).
    let (status, body) = renew_from("127.0.0.2", "/v1/renew");
    assert_eq!(status, 200, "{body}");

    // Bundle: PEM by default, SPIFFE JSON on request.
    let (status, pem) = curl(&ca, srv.port, &[], "/v1/bundle");
    assert_eq!(status, 200);
    assert_eq!(pem, fs::read_to_string(ca.bundle()).unwrap());
    let (_, json) = curl(
        &ca,
        srv.port,
        &["-H", "Accept: application/json"],
        "/v1/bundle",
    );
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["keys"][0]["use"], "x509-svid");
}

#[test]
fn a_certificate_of_another_ca_cannot_renew() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let other = TestCa::new(TD);
    let (cert, key) = other.issue("web", "/ns/default/sa/web", &[]);
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(ca.bundle())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["-X", "POST", "--data-binary", "x"])
        .arg(format!("https://localhost:{}/v1/renew", srv.port))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the handshake must fail");
}

#[test]
fn unreachable_ca_is_a_clear_error_and_recovery_follows() {
    let ca = TestCa::new(TD);
    let port = free_port();
    let c = client(&ca, port);
    let rt = rt();
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    let t = token(&ca, WEB, "1h");
    let err = rt.block_on(c.bootstrap(&t, &k.csr_pem)).unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("cannot reach the CA"), "{err}");
    let _srv = CaServer::start_on(&ca, port, &[]);
    let svid = rt
        .block_on(c.bootstrap(&t, &k.csr_pem))
        .expect("the CA is back");
    assert_eq!(svid.spiffe_id, WEB);
}

#[test]
fn serve_follows_a_root_rotation_without_restart() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let rt = rt();
    let rot = |step: &str| {
        run_ok(
            cmd("keyproof-ca")
                .args(["rotate", "root", step, "--dir"])
                .arg(&ca.dir),
        );
    };
    rot("prepare");
    std::thread::sleep(Duration::from_millis(1200));
    let c = client(&ca, srv.port);
    let bundle = rt.block_on(c.bundle()).unwrap();
    assert_eq!(bundle.len(), 2, "the server publishes the prepared bundle");
    rot("activate");
    std::thread::sleep(Duration::from_millis(1200));
    // The client trusts both roots now; the server's own certificate and new
    // SVIDs come from the new root.
    let c = client(&ca, srv.port);
    let t = token(&ca, WEB, "1h");
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    let svid = rt.block_on(c.bootstrap(&t, &k.csr_pem)).unwrap();
    let new_root = fs::read(ca.dir.join("root.crt")).unwrap();
    let root = keyproof_identity::keys::certs_from_pem(&new_root)
        .unwrap()
        .remove(0);
    let tb = TrustBundle::new(vec![root]).unwrap();
    keyproof_identity::verify::verify_path(
        &tb,
        &svid.chain[0],
        &svid.chain[1..],
        rustls_pki_types::UnixTime::now(),
        webpki_client_auth(),
    )
    .expect("new SVIDs chain to the new root");
}

fn webpki_client_auth() -> keyproof_identity::verify::EkuUsage {
    keyproof_identity::verify::EkuUsage::client_auth()
}

/// A leaf for `key` under the CA directory's intermediate, otherwise a
/// valid X.509-SVID for `id`: what the CA would never issue.
fn craft(ca: &TestCa, name: &str, id: &str, key: rcgen::KeyPair) -> (PathBuf, PathBuf) {
    let int_der = keyproof_identity::keys::certs_from_pem(
        &fs::read(ca.dir.join("intermediate.crt")).unwrap(),
    )
    .unwrap()
    .remove(0);
    let int_key =
        rcgen::KeyPair::from_pem(&fs::read_to_string(ca.dir.join("intermediate.key")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&int_der, int_key).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    let leaf = p.signed_by(&key, &issuer).unwrap();
    let (crt, key_path) = (
        ca.path(&format!("{name}.crt")),
        ca.path(&format!("{name}.key")),
    );
    fs::write(
        &crt,
        keyproof_identity::keys::cert_pem(leaf.der())
            + &keyproof_identity::keys::cert_pem(&int_der),
    )
    .unwrap();
    fs::write(&key_path, key.serialize_pem()).unwrap();
    (crt, key_path)
}

#[test]
fn ca_client_and_server_use_x25519mlkem768_and_the_server_refuses_foreign_keys() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let rt = rt();

    // The CA client (the proxy's [identity.ca] renewer uses it) offers
    // X25519MLKEM768 first, with its key share and an X25519 one.
    let catcher = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let catch_port = catcher.local_addr().unwrap().port();
    let hello = std::thread::spawn(move || capture_client_hello(&catcher));
    assert!(rt.block_on(client(&ca, catch_port).connect(None)).is_err());
    let hello = hello.join().unwrap();
    assert_eq!(
        hello.groups.first(),
        Some(&GROUP_X25519MLKEM768),
        "{hello:?}"
    );
    assert_eq!(
        hello.shares,
        vec![(GROUP_X25519MLKEM768, 1216), (GROUP_X25519, 32)],
        "{hello:?}"
    );

    // Against the real server: the hybrid.
    let session = rt.block_on(client(&ca, srv.port).connect(None)).unwrap();
    assert_eq!(
        session.key_exchange_group(),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    drop(session);

    if keyproof_tests::have("openssl") {
        // A client without ML-KEM gets X25519.
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{}", srv.port)])
            .args(["-tls1_3", "-groups", "X25519:P-256", "-CAfile"])
            .arg(ca.bundle())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("Server Temp Key: X25519"), "{stdout}");
    }

    // A P-256 client certificate is accepted in the handshake; RSA and
    // P-384 ones chained to the same intermediate are not, even on the
    // endpoint that needs no client certificate.
    let (p256, p256_key) = craft(
        &ca,
        "p256",
        WEB,
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
    );
    let (status, body) = curl(
        &ca,
        srv.port,
        &[
            "--cert",
            p256.to_str().unwrap(),
            "--key",
            p256_key.to_str().unwrap(),
        ],
        "/v1/bundle",
    );
    assert_eq!(status, 200, "{body}");
    for (name, key) in [
        ("rsa", keyproof_tests::proxy_support::rsa_key_pair()),
        (
            "p384",
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        ),
    ] {
        let (crt, key_path) = craft(&ca, name, WEB, key);
        let (status, body) = curl(
            &ca,
            srv.port,
            &[
                "--cert",
                crt.to_str().unwrap(),
                "--key",
                key_path.to_str().unwrap(),
            ],
            "/v1/bundle",
        );
        assert_eq!(status, 0, "{name}: {body}");
    }
}

#[test]
fn admin_listener_answers_health_and_metrics_that_follow_the_api() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let c = client(&ca, srv.port);
    let rt = rt();

    assert_eq!(srv.admin_get("/healthz"), (200, "ok\n".into()));
    assert_eq!(srv.admin_get("/ready"), (200, "ready\n".into()));
    assert_eq!(srv.admin_get("/nothing").0, 404);

    let m = srv.scrape();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(
            &m,
            &format!("keyproof_build_info{{binary=\"keyproof-ca\",version=\"{version}\"}}")
        ),
        Some(1.0),
        "{m}"
    );
    // Known codes start at zero, so that alerts can take rate() of them.
    for code in [
        "invalid_token",
        "token_reused",
        "id_mismatch",
        "sa_token_expired",
    ] {
        assert_eq!(
            sample(
                &m,
                &format!("keyproof_ca_refusals_total{{code=\"{code}\"}}")
            ),
            Some(0.0),
            "{code}: {m}"
        );
    }
    assert_eq!(
        sample(&m, "keyproof_ca_rotation_stage{stage=\"idle\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "keyproof_ca_rotation_stage{stage=\"prepared\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &m,
            &format!("keyproof_ca_bundle_sequence{{trust_domain=\"{TD}\"}}")
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "keyproof_ca_ready"), Some(1.0), "{m}");
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    for cert in ["root", "intermediate", "server"] {
        let exp = sample(
            &m,
            &format!("keyproof_ca_certificate_expiry_timestamp_seconds{{cert=\"{cert}\"}}"),
        )
        .unwrap_or_else(|| panic!("{cert}: {m}"));
        assert!(exp > now, "{cert} expires at {exp}");
    }
    let root = keyproof_identity::keys::certs_from_pem(&fs::read(ca.bundle()).unwrap())
        .unwrap()
        .remove(0);
    let fp = keyproof_identity::keys::fingerprint(&root);
    assert!(
        sample(
            &m,
            &format!(
                "keyproof_ca_bundle_root_expiry_timestamp_seconds{{fingerprint=\"{fp}\",trust_domain=\"{TD}\"}}"
            )
        )
        .is_some_and(|e| e > now),
        "{m}"
    );
    // No ServiceAccount attestation, no JWKS metrics.
    assert!(!m.contains("keyproof_ca_jwks_keys"), "{m}");

    // A refused bootstrap, a good one, a reused token and a renewal.
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    assert_eq!(
        code(rt.block_on(c.bootstrap("kpt_nonsense", &k.csr_pem))),
        "invalid_token"
    );
    let t = token(&ca, WEB, "1h");
    let svid = rt.block_on(c.bootstrap(&t, &k.csr_pem)).expect("bootstrap");
    assert_eq!(
        code(rt.block_on(c.bootstrap(&t, &k.csr_pem))),
        "token_reused"
    );
    let current = Arc::new(certified_key(svid.chain.clone(), &k.key_der).unwrap());
    let k2 = new_key(KeyType::EcdsaP256, WEB).unwrap();
    rt.block_on(c.renew(current, &k2.csr_pem)).expect("renew");

    let m = srv.scrape();
    for (series, want) in [
        ("keyproof_ca_refusals_total{code=\"invalid_token\"}", 1.0),
        ("keyproof_ca_refusals_total{code=\"token_reused\"}", 1.0),
        ("keyproof_ca_refusals_total{code=\"id_mismatch\"}", 0.0),
        (
            "keyproof_ca_issuances_total{kind=\"bootstrap_token\",result=\"refused\"}",
            2.0,
        ),
        (
            "keyproof_ca_issuances_total{kind=\"bootstrap_token\",result=\"ok\"}",
            1.0,
        ),
        (
            "keyproof_ca_issuances_total{kind=\"renew\",result=\"ok\"}",
            1.0,
        ),
        (
            "keyproof_ca_issuances_total{kind=\"renew\",result=\"error\"}",
            0.0,
        ),
        ("keyproof_ca_ledger_commit_seconds_count", 2.0),
    ] {
        assert_eq!(sample(&m, series), Some(want), "{series}: {m}");
    }

    // Every refusal is logged with its code, the peer and the caller, never
    // the token; the log is a file, so no colour codes.
    let log = srv.log();
    assert!(!log.contains("\x1b["), "ANSI escape in a log file:\n{log}");
    assert!(!log.contains(&t), "the token was logged:\n{log}");
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .collect();
    assert_eq!(refusals.len(), 2, "{log}");
    assert!(
        refusals[0].contains("code=\"invalid_token\"")
            || refusals[0].contains("code=invalid_token"),
        "{log}"
    );
    assert!(
        refusals.iter().all(|l| l.contains("peer=127.0.0.1:")),
        "{log}"
    );
    let token_id = &fs::read_to_string(ca.dir.join("tokens.jsonl"))
        .unwrap()
        .lines()
        .next()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .unwrap();
    assert!(
        refusals[1].contains("token_reused") && refusals[1].contains(token_id.as_str()),
        "{log}"
    );
    assert!(
        log.contains(&format!("admin_listen=127.0.0.1:{}", srv.admin)),
        "{log}"
    );

    // Not ready while the CA directory cannot be loaded; ready again once
    // it can.
    let state = ca.dir.join("ca.json");
    let good = fs::read(&state).unwrap();
    fs::write(&state, "not json").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (status, body) = srv.admin_get("/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot be loaded"), "{body}");
    assert!(!body.contains("ca.json"), "{body}");
    assert_eq!(srv.admin_get("/healthz").0, 200);
    fs::write(&state, good).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(srv.admin_get("/ready"), (200, "ready\n".into()));
}

#[test]
fn json_logs_are_one_object_a_line() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &["--log-format", "json"]);
    let rt = rt();
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    assert_eq!(
        code(rt.block_on(client(&ca, srv.port).bootstrap("kpt_nonsense", &k.csr_pem))),
        "invalid_token"
    );
    // The refusal is logged before the answer is sent.
    let log = srv.log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 2, "{log}");
    let refused = lines
        .iter()
        .find(|v| v["fields"]["code"] == "invalid_token")
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert_eq!(refused["level"], "WARN");
    assert!(
        refused["fields"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{refused}"
    );
}

/// A bootstrap with curl and a new key for `WEB`: `args` add headers or
/// pick the protocol; (status, error code or `ok`, response headers and
/// body).
fn curl_bootstrap(ca: &TestCa, port: u16, args: &[&str], query: &str) -> (u16, String, String) {
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    ca_server::curl_bootstrap(ca, port, &k.csr_pem, args, query)
}

fn token_used(ca: &TestCa, token: &str) -> bool {
    let id = keyproof_ca::token::id_of(token);
    fs::read_to_string(ca.dir.join("tokens.jsonl"))
        .unwrap()
        .lines()
        .any(|l| l.contains("\"used\"") && l.contains(&id))
}

#[test]
fn a_join_token_is_spent_only_on_a_certificate() {
    let ca = TestCa::new(TD);
    let rt = rt();
    let (t1, t2, t3, t4) = (
        token(&ca, WEB, "1h"),
        token(&ca, WEB, "1h"),
        token(&ca, WEB, "1h"),
        token(&ca, WEB, "1h"),
    );
    {
        // One issuance a minute: the second token is refused for the rate,
        // and stays usable (not `token_reused`, not marked used).
        let srv = CaServer::start(&ca, &["--rate-limit", "1"]);
        let c = client(&ca, srv.port);
        let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
        assert_eq!(code(rt.block_on(c.bootstrap(&t1, &k.csr_pem))), "ok");
        assert!(token_used(&ca, &t1));
        for _ in 0..2 {
            assert_eq!(
                code(rt.block_on(c.bootstrap(&t2, &k.csr_pem))),
                "rate_limited"
            );
        }
        assert!(!token_used(&ca, &t2));
    }
    // A new rate window (a restarted server starts one): the token works.
    let srv = CaServer::start(&ca, &[]);
    let c = client(&ca, srv.port);
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    assert_eq!(code(rt.block_on(c.bootstrap(&t2, &k.csr_pem))), "ok");
    assert!(token_used(&ca, &t2));

    // Asking for another identity is refused and does not spend it either.
    let (status, err, body) = curl_bootstrap(
        &ca,
        srv.port,
        &["-H", &format!("Authorization: Bearer {t3}")],
        "?spiffe_id=spiffe://prod.example.com/ns/default/sa/other",
    );
    assert_eq!((status, err.as_str()), (403, "id_mismatch"), "{body}");
    assert!(!token_used(&ca, &t3));
    assert_eq!(code(rt.block_on(c.bootstrap(&t3, &k.csr_pem))), "ok");

    // The ledger cannot be written: 503, and the token stays usable for
    // when it can.
    let ledger = ca.dir.join("ledger.jsonl");
    let saved = ca.path("ledger.saved");
    fs::rename(&ledger, &saved).unwrap();
    fs::create_dir(&ledger).unwrap();
    assert_eq!(
        code(rt.block_on(c.bootstrap(&t4, &k.csr_pem))),
        "ledger_unavailable"
    );
    assert!(!token_used(&ca, &t4));
    fs::remove_dir(&ledger).unwrap();
    fs::rename(&saved, &ledger).unwrap();
    assert_eq!(code(rt.block_on(c.bootstrap(&t4, &k.csr_pem))), "ok");
    let m = srv.scrape();
    assert_eq!(
        sample(&m, "keyproof_ca_refusals_total{code=\"token_reused\"}"),
        Some(0.0),
        "{m}"
    );
}

#[test]
fn one_join_token_used_concurrently_gives_one_certificate() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &["--rate-limit", "0"]);
    let t = token(&ca, WEB, "1h");
    // Every thread gets ready, then all send at once.
    let start_line = std::sync::Barrier::new(20);
    let mut codes: Vec<String> = Vec::new();
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 0..20 {
            handles.push(s.spawn(|| {
                let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
                let c = client(&ca, srv.port);
                let rt = rt();
                start_line.wait();
                code(rt.block_on(c.bootstrap(&t, &k.csr_pem)))
            }));
        }
        for h in handles {
            codes.push(h.join().unwrap());
        }
    });
    assert_eq!(codes.iter().filter(|c| *c == "ok").count(), 1, "{codes:?}");
    assert!(
        codes.iter().all(|c| c == "ok" || c == "token_reused"),
        "{codes:?}"
    );
    let ledger = fs::read_to_string(ca.dir.join("ledger.jsonl")).unwrap();
    assert_eq!(ledger.lines().count(), 1, "{ledger}");
}

#[test]
fn the_bootstrap_request_is_read_leniently_where_it_is_safe_and_strictly_where_not() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let bearer = |scheme_and_space: &str| {
        let t = token(&ca, WEB, "1h");
        curl_bootstrap(
            &ca,
            srv.port,
            &["-H", &format!("Authorization: {scheme_and_space}{t}  ")],
            "",
        )
    };
    // The scheme is case-insensitive, followed by any spaces or tabs.
    for s in ["bearer ", "BEARER ", "Bearer\t", "Bearer \t  "] {
        let (status, err, body) = bearer(s);
        assert_eq!((status, err.as_str()), (200, "ok"), "{s:?}: {body}");
    }
    let (status, err, _) = bearer("Basic ");
    assert_eq!((status, err.as_str()), (401, "missing_token"));

    // The query is form-decoded; spiffe_id may be given once, and nothing
    // else may be.
    let q = |query: &str| {
        let t = token(&ca, WEB, "1h");
        let (status, err, body) = curl_bootstrap(
            &ca,
            srv.port,
            &["-H", &format!("Authorization: Bearer {t}")],
            query,
        );
        (status, err, body, t)
    };
    let (status, err, body, _) =
        q("?spiffe_id=spiffe%3A%2F%2Fprod.example.com%2Fns%2Fdefault%2Fsa%2Fweb");
    assert_eq!((status, err.as_str()), (200, "ok"), "{body}");
    let other = "spiffe://prod.example.com/ns/default/sa/other";
    for query in [
        format!("?spiffe_id={WEB}&spiffe_id={other}"),
        format!("?spiffe_id={other}&spiffe_id={WEB}"),
        format!("?x=1;spiffe_id={other}"),
        format!("?spiffe-id={other}"),
    ] {
        let (status, err, body, t) = q(&query);
        assert_eq!(
            (status, err.as_str()),
            (400, "bad_request"),
            "{query}: {body}"
        );
        assert!(!token_used(&ca, &t), "{query}");
    }

    // 405 names the allowed method.
    let (status, body) = curl(&ca, srv.port, &["-i"], "/v1/bootstrap");
    assert_eq!(status, 405, "{body}");
    assert!(body.to_ascii_lowercase().contains("allow: post"), "{body}");
}

#[test]
fn idle_or_slow_sockets_cannot_starve_the_admin_listener() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], srv.admin).into();
    let probe = || {
        let started = std::time::Instant::now();
        let (status, body) = srv.admin_get("/healthz");
        (status, body, started.elapsed())
    };
    // Idle sockets, then ones sending a request head a byte at a time.
    let mut held: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for s in held.iter_mut().take(32) {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let (status, body, took) = probe();
        assert_eq!(status, 200, "{body}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    // Kept-alive connections that made a request and then sit idle.
    let mut kept: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            s
        })
        .collect();
    let (status, body, took) = probe();
    assert_eq!(status, 200, "{body}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Idle ones are closed after the header timeout (2 s).
    std::thread::sleep(Duration::from_millis(2500));
    let mut closed = 0;
    for s in kept.iter_mut().chain(held.iter_mut()) {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 512];
        if matches!(s.read(&mut buf), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 128);

    // HEAD works; other methods get 405 with Allow.
    let out = Command::new("curl")
        .args(["-sS", "-I", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{}/healthz", srv.admin))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).ends_with("200"),
        "{out:?}"
    );
    let out = Command::new("curl")
        .args(["-sS", "-i", "-X", "POST"])
        .arg(format!("http://127.0.0.1:{}/healthz", srv.admin))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 405"), "{text}");
    assert!(text.contains("allow: get, head"), "{text}");
}

#[test]
fn ready_follows_the_ledger_within_a_second_and_logs_only_changes() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let c = client(&ca, srv.port);
    let t = token(&ca, WEB, "1h");
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    rt().block_on(c.bootstrap(&t, &k.csr_pem))
        .expect("bootstrap");
    assert_eq!(srv.admin_get("/ready").0, 200);
    // Right after a good commit, the ledger breaks.
    let ledger = ca.dir.join("ledger.jsonl");
    let saved = ca.path("ledger.saved");
    fs::rename(&ledger, &saved).unwrap();
    fs::create_dir(&ledger).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    for _ in 0..3 {
        let (status, body) = srv.admin_get("/ready");
        assert_eq!(status, 503, "{body}");
        // What is wrong, without the path: the port answers anyone.
        assert!(body.contains("the ledger cannot be appended to"), "{body}");
        assert!(!body.contains('/'), "{body}");
    }
    fs::remove_dir(&ledger).unwrap();
    fs::rename(&saved, &ledger).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(srv.admin_get("/ready"), (200, "ready\n".into()));
    let log = srv.log();
    assert!(
        log.contains("ledger.jsonl"),
        "the log has the details: {log}"
    );
    assert_eq!(log.matches("not ready").count(), 1, "{log}");
    assert_eq!(log.matches("ready again").count(), 1, "{log}");
}

/// An HTTP/2 connection with nothing in flight is closed (GOAWAY first)
/// after the idle timeout, whether it never made a request or made one;
/// a request body that stops arriving is answered 408.
#[test]
fn idle_api_connections_are_closed_and_a_stalled_body_times_out() {
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let (cert, key) = ca.issue("web", "/ns/default/sa/web", &[]);
    rt().block_on(async {
        // Unauthenticated, the preface and then nothing.
        let mut silent = Vec::new();
        for _ in 0..3 {
            let mut s = ca_server::tls_connect(&ca, srv.port, b"h2", None)
                .await
                .unwrap();
            s.write_all(ca_server::H2_PREFACE).await.unwrap();
            silent.push(s);
        }
        // Authenticated, one request, then nothing (the client keeps it).
        let tls = ca_server::tls_connect(&ca, srv.port, b"h2", Some((&cert, &key)))
            .await
            .unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        let driver = tokio::spawn(conn);
        let resp = send
            .send_request(
                http::Request::get("https://localhost/v1/bundle")
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let answered = Instant::now();
        // HTTP/1.1 whose body stops after a few bytes.
        let mut slow = ca_server::tls_connect(&ca, srv.port, b"http/1.1", None)
            .await
            .unwrap();
        slow.write_all(
            b"POST /v1/bootstrap HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer kpt_x\r\n\
              Content-Type: application/pkcs10\r\nContent-Length: 100\r\n\r\nMIIB",
        )
        .await
        .unwrap();
        let sent = Instant::now();
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(read.is_ok(), "no answer to a stalled body: {answer:?}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(
            sent.elapsed() >= Duration::from_secs(9),
            "{:?}",
            sent.elapsed()
        );
        // The silent ones got a GOAWAY at the idle timeout, and the close
        // at most 10 s later (they never acknowledge the server's PING).
        for s in &mut silent {
            let (closed, goaway) = ca_server::h2_until_closed(s, Duration::from_secs(15)).await;
            assert!(closed, "an idle HTTP/2 connection is still open");
            assert!(goaway, "closed without a GOAWAY");
        }
        // So did the one that made a request, counted from its answer.
        tokio::time::timeout(Duration::from_secs(15), driver)
            .await
            .expect("the client's idle connection is still open")
            .unwrap()
            .unwrap();
        assert!(
            answered.elapsed() >= Duration::from_secs(9),
            "{:?}",
            answered.elapsed()
        );
    });
    let m = srv.scrape();
    assert!(
        sample(&m, "keyproof_ca_connections_closed_total{reason=\"idle\"}").unwrap() >= 4.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "keyproof_ca_refusals_total{code=\"request_timeout\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&m, "keyproof_ca_connections_open"), Some(0.0), "{m}");
}

/// One client address holds at most `--max-connections-per-ip` (64 by
/// default) API connections: more from it close its own oldest idle ones,
/// so a client holding sockets open locks nobody out, itself included.
#[test]
fn one_address_cannot_hold_every_api_connection() {
    use tokio::io::AsyncWriteExt;

    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let (cert, key) = ca.issue("web", "/ns/default/sa/web", &[]);
    let (csr, _) = openssl_csr(&ca, "new");
    let rt = rt();
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..100 {
            // Later ones evict earlier ones, which may fail mid-handshake.
            if let Ok(mut s) = ca_server::tls_connect(&ca, srv.port, b"h2", None).await {
                let _ = s.write_all(ca_server::H2_PREFACE).await;
                held.push(s);
            }
        }
        held
    });
    let m = srv.scrape();
    let open = sample(&m, "keyproof_ca_connections_open").expect("connections_open");
    assert!(open <= 64.0, "{open} open: {m}");
    assert!(
        sample(
            &m,
            "keyproof_ca_connections_closed_total{reason=\"evicted\"}"
        )
        .unwrap()
            >= 36.0,
        "{m}"
    );
    // A renewal from the same address still gets through, at once.
    let started = std::time::Instant::now();
    let (status, body) = curl(
        &ca,
        srv.port,
        &[
            "-m",
            "5",
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "--data-binary",
            &format!("@{}", csr.display()),
            "-H",
            "Content-Type: application/pkcs10",
        ],
        "/v1/renew",
    );
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(held);
}

/// `spiffe://<td>/keyproof-ca` (and below it), and a server's configured
/// `--spiffe-id`, are the CA's own: never issued, as a join token's
/// identity, at bootstrap or at renewal.
#[test]
fn the_cas_own_identity_is_never_issued() {
    let ca = TestCa::new(TD);
    let own = format!("spiffe://{TD}/keyproof-ca");
    // The command line: issue and token create.
    for id in [own.clone(), format!("{own}/replica-1")] {
        let err = keyproof_tests::run_err(
            cmd("keyproof-ca")
                .args(["issue", "--dir"])
                .arg(&ca.dir)
                .args(["--spiffe-id", &id, "--key-out"])
                .arg(ca.path("own.key"))
                .arg("--cert-out")
                .arg(ca.path("own.crt")),
        );
        assert!(err.contains("reserved for the CA server"), "{err}");
        assert!(!ca.path("own.crt").exists());
        let err = keyproof_tests::run_err(
            cmd("keyproof-ca")
                .args(["token", "create", "--dir"])
                .arg(&ca.dir)
                .args(["--spiffe-id", &id]),
        );
        assert!(err.contains("reserved for the CA server"), "{err}");
    }
    // Not a prefix match on the string.
    ca.issue("near", "/keyproof-cafe", &[]);

    // A server's own --spiffe-id must be the CA's: clients take the CA by
    // no other (`[identity.ca] server_id`, `renew --server-id`), and one
    // outside /keyproof-ca is an ID a workload may hold.
    let custom = format!("spiffe://{TD}/ns/keyproof/sa/ca");
    let err = keyproof_tests::run_err(
        cmd("keyproof-ca")
            .args(["serve", "--dir"])
            .arg(&ca.dir)
            .args(["--listen", "127.0.0.1:0", "--spiffe-id", &custom]),
    );
    assert!(err.contains("not the CA's own ID"), "{err}");
    let srv = CaServer::start(&ca, &["--spiffe-id", &format!("{own}/replica-1")]);

    // A certificate for the CA's ID made without the CA's consent (as an
    // older keyproof-ca issued one) cannot renew.
    let (cert, key) = craft(
        &ca,
        "own",
        &own,
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
    );
    let csr = new_key(KeyType::EcdsaP256, &own).unwrap();
    let csr_file = ca.path("own.csr");
    fs::write(&csr_file, &csr.csr_pem).unwrap();
    let (status, body) = curl(
        &ca,
        srv.port,
        &[
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "--data-binary",
            &format!("@{}", csr_file.display()),
            "-H",
            "Content-Type: application/pkcs10",
        ],
        "/v1/renew",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("id_not_allowed"), "{body}");
    let ledger = fs::read_to_string(ca.dir.join("ledger.jsonl")).unwrap_or_default();
    assert!(!ledger.contains(&format!("\"{own}\"")), "{ledger}");
    assert!(!ledger.contains(&format!("\"{custom}\"")), "{ledger}");
}

/// After `rotate root finish --force`, a certificate that chains only to
/// the root that left the bundle renews neither on a connection opened
/// before the rotation nor on the first one after it: a renewal verifies
/// the client's chain against the bundle in force at the request.
#[test]
fn a_certificate_of_a_root_rotated_out_cannot_renew_on_any_connection() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let (cert, key) = ca.issue("old", "/ns/default/sa/web", &[]);
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    let renew_req = || {
        http::Request::post("/v1/renew")
            .header("host", "localhost")
            .header("content-type", "application/pkcs10")
            .body(Full::new(Bytes::from(k.csr_pem.clone())))
            .unwrap()
    };
    let rot = |step: &[&str]| {
        run_ok(
            cmd("keyproof-ca")
                .args(["rotate", "root"])
                .args(step)
                .arg("--dir")
                .arg(&ca.dir),
        );
    };
    rt().block_on(async {
        // Opened, and renewing, before the rotation.
        let tls = ca_server::tls_connect(&ca, srv.port, b"http/1.1", Some((&cert, &key)))
            .await
            .unwrap();
        let (mut held, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let r = held.send_request(renew_req()).await.unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.into_body().collect().await;

        rot(&["prepare"]);
        rot(&["activate"]);
        rot(&["finish", "--force"]);

        // The first new connection, at once (the server may not have looked
        // at the directory since): refused in the handshake, or 401.
        let answer = async {
            let tls =
                ca_server::tls_connect(&ca, srv.port, b"http/1.1", Some((&cert, &key))).await?;
            let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            let r = s
                .send_request(renew_req())
                .await
                .map_err(std::io::Error::other)?;
            let status = r.status();
            let body = r
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((
                status,
                String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            ))
        }
        .await;
        if let Ok((status, body)) = &answer {
            assert_eq!(status.as_u16(), 401, "first new connection: {body}");
            assert!(body.contains("client_certificate_untrusted"), "{body}");
        }

        // The held connection: 401 now.
        let r = held.send_request(renew_req()).await.unwrap();
        let status = r.status();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status.as_u16(), 401, "held connection: {body}");
        assert!(body.contains("client_certificate_untrusted"), "{body}");
    });
    // Nothing was issued after the rotation.
    let ledger = fs::read_to_string(ca.dir.join("ledger.jsonl")).unwrap();
    let renewals = ledger
        .lines()
        .filter(|l| l.contains(&format!("renew:{WEB}")))
        .count();
    assert_eq!(renewals, 1, "{ledger}");
    assert!(
        sample(
            &srv.scrape(),
            "keyproof_ca_refusals_total{code=\"client_certificate_untrusted\"}"
        )
        .unwrap()
            >= 1.0
    );
}

/// A new P-256 key and a CSR for it, with openssl: (csr, key).
fn openssl_csr(ca: &TestCa, name: &str) -> (PathBuf, PathBuf) {
    let (csr, key) = (
        ca.path(&format!("{name}.csr")),
        ca.path(&format!("{name}.key")),
    );
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=x",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    );
    (csr, key)
}

/// `POST /v1/renew` with curl: (status, the `error` code or `ok`, the
/// answer's JSON).
fn curl_renew(ca: &TestCa, port: u16, cert: &Path, key: &Path, csr: &Path) -> (u16, String, Value) {
    let (status, body) = curl(
        ca,
        port,
        &[
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
            "--data-binary",
            &format!("@{}", csr.display()),
            "-H",
            "Content-Type: application/pkcs10",
        ],
        "/v1/renew",
    );
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let code = v["error"].as_str().unwrap_or("ok").to_owned();
    (status, code, v)
}

/// A stolen certificate cannot escape a revocation by renewing: revoking
/// its serial also revokes what was renewed from it (the ledger links each
/// renewal to its parent), and revoking an ID revokes all of its
/// certificates while a new bootstrap starts afresh.
#[test]
fn a_revoked_certificate_and_whatever_was_renewed_from_it_renew_no_more() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let (stolen, stolen_key) = ca.issue("stolen", "/ns/shop/sa/payments", &[]);
    let (other, other_key) = ca.issue("other", "/ns/default/sa/web", &[]);
    let serial_of = |cert: &Path| {
        let out = run_ok(
            Command::new("openssl")
                .args(["x509", "-noout", "-serial", "-in"])
                .arg(cert),
        );
        out.trim().trim_start_matches("serial=").to_owned()
    };
    // The thief renews before the revocation, then renews its renewal.
    let mut held = (stolen.clone(), stolen_key.clone());
    for i in 0..2 {
        let (csr, key) = openssl_csr(&ca, &format!("thief{i}"));
        let (status, code, v) = curl_renew(&ca, srv.port, &held.0, &held.1, &csr);
        assert_eq!((status, code.as_str()), (200, "ok"), "{v}");
        let crt = ca.path(&format!("thief{i}.crt"));
        fs::write(&crt, v["chain_pem"].as_str().unwrap()).unwrap();
        held = (crt, key);
    }
    let ledger = fs::read_to_string(ca.dir.join("ledger.jsonl")).unwrap();
    // As the ledger writes serials.
    let stolen_serial = keyproof_ca::revoke::normalize_serial(&serial_of(&stolen)).unwrap();
    assert!(
        ledger.contains(&format!("\"renewed_from\":\"{stolen_serial}\"")),
        "{ledger}"
    );

    let out = run_ok(
        cmd("keyproof-ca")
            .args(["revoke", "--dir"])
            .arg(&ca.dir)
            .args(["--serial", &serial_of(&stolen), "--reason", "stolen"]),
    );
    assert_eq!(out.matches("revoked spiffe://").count(), 3, "{out}");
    // The stolen certificate and both of the thief's renewals: refused.
    for (cert, key) in [(&stolen, &stolen_key), (&held.0, &held.1)] {
        let (csr, _) = openssl_csr(&ca, "after");
        let (status, code, v) = curl_renew(&ca, srv.port, cert, key, &csr);
        assert_eq!((status, code.as_str()), (403, "certificate_revoked"), "{v}");
    }
    // Other identities are untouched.
    let (csr, _) = openssl_csr(&ca, "web");
    assert_eq!(curl_renew(&ca, srv.port, &other, &other_key, &csr).0, 200);
    // Again: nothing new.
    let out = run_ok(
        cmd("keyproof-ca")
            .args(["revoke", "--dir"])
            .arg(&ca.dir)
            .args(["--serial", &serial_of(&stolen)]),
    );
    assert!(out.contains("nothing new"), "{out}");
    // A typo is not a revocation.
    let err = keyproof_tests::run_err(
        cmd("keyproof-ca")
            .args(["revoke", "--dir"])
            .arg(&ca.dir)
            .args(["--serial", "abcdef"]),
    );
    assert!(err.contains("no unexpired certificate"), "{err}");

    // By ID: every certificate of web goes; a new bootstrap is not revoked.
    run_ok(
        cmd("keyproof-ca")
            .args(["revoke", "--dir"])
            .arg(&ca.dir)
            .args(["--spiffe-id", WEB]),
    );
    let (csr, _) = openssl_csr(&ca, "web2");
    assert_eq!(
        curl_renew(&ca, srv.port, &other, &other_key, &csr).1,
        "certificate_revoked"
    );
    let c = client(&ca, srv.port);
    let rt = rt();
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    let svid = rt
        .block_on(c.bootstrap(&token(&ca, WEB, "1h"), &k.csr_pem))
        .expect("bootstrap after the revocation");
    let current = Arc::new(certified_key(svid.chain.clone(), &k.key_der).unwrap());
    let k2 = new_key(KeyType::EcdsaP256, WEB).unwrap();
    assert_eq!(code(rt.block_on(c.renew(current, &k2.csr_pem))), "ok");
    let m = srv.scrape();
    assert_eq!(
        sample(
            &m,
            "keyproof_ca_refusals_total{code=\"certificate_revoked\"}"
        ),
        Some(3.0),
        "{m}"
    );
}

/// An HTTP/2 connection with no client certificate.
async fn h2_client<B>(ca: &TestCa, port: u16) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tls = ca_server::tls_connect(ca, port, b"h2", None).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A request body that sends 1 KiB and then never ends (nor announces a
/// length): what a client with no credentials can hold open.
struct StalledBody(bool);

impl hyper::body::Body for StalledBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes::Bytes::from(
            vec![b'A'; 1024],
        )))))
    }
}

/// Request bodies in flight share one budget (4 MiB) whatever the number
/// of connections, and an HTTP/2 connection carries a few streams, not
/// 64: before, every stream of every connection could hold 64 KiB for
/// 10 s with no credential, and a handful of clients took the CA's memory
/// past its container limit (adv33 F2). Beyond the budget a request gets
/// 503 `server_busy` at once.
#[test]
fn request_bodies_in_flight_share_a_bounded_budget() {
    use std::time::Instant;

    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    rt().block_on(async {
        let post = || {
            http::Request::post("https://localhost/v1/bootstrap")
                .header("authorization", "Bearer kpt_x")
                .body(StalledBody(false))
                .unwrap()
        };
        // 64 KiB reserved per body of unknown length: 64 of them take the
        // whole budget, over 16 connections of 4 streams.
        let (mut stalled, mut senders) = (Vec::new(), Vec::new());
        for _ in 0..16 {
            let mut send = h2_client(&ca, srv.port).await;
            for _ in 0..4 {
                let fut = send.send_request(post());
                stalled.push(tokio::spawn(fut));
            }
            senders.push(send);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut send = h2_client(&ca, srv.port).await;
        let started = Instant::now();
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            send.send_request(
                http::Request::post("https://localhost/v1/bootstrap")
                    .header("authorization", "Bearer kpt_x")
                    .header("content-length", "100")
                    .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                        b'A';
                        100
                    ])))
                    .unwrap(),
            ),
        )
        .await
        .expect("a request over the body budget waited instead of a 503")
        .unwrap();
        assert_eq!(resp.status(), 503);
        assert!(started.elapsed() < Duration::from_secs(5));
        for t in stalled {
            t.abort();
        }
        drop(senders);
    });
    let m = srv.scrape();
    assert!(
        sample(&m, "keyproof_ca_refusals_total{code=\"server_busy\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

/// A server that cannot load the CA's latest state (here an
/// intermediate.key that is not the certificate's, as a rotation killed
/// between its renames leaves it) still follows revoked.json: revocation
/// does not depend on the signing chain, and before, the previous
/// revocation list was kept with the previous state (adv33 F3).
#[test]
fn a_revocation_takes_effect_while_the_rest_of_the_ca_fails_to_reload() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let (stolen, stolen_key) = ca.issue("stolen", "/ns/shop/sa/payments", &[]);
    let serial = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(&stolen),
    )
    .trim()
    .trim_start_matches("serial=")
    .to_owned();
    // Another P-256 key in place of the intermediate's.
    let (_, other_key) = openssl_csr(&ca, "other");
    fs::copy(&other_key, ca.dir.join("intermediate.key")).unwrap();
    // ca.json rewritten as it was: the server sees a change and reloads.
    let state = fs::read(ca.dir.join("ca.json")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::write(ca.dir.join("ca.json"), state).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (csr, _) = openssl_csr(&ca, "probe");
    // The reload failed: the server signs with the previous state.
    let (status, code, v) = curl_renew(&ca, srv.port, &stolen, &stolen_key, &csr);
    assert_eq!((status, code.as_str()), (200, "ok"), "{v}");
    assert!(srv.log().contains("could not be loaded"), "{}", srv.log());
    run_ok(
        cmd("keyproof-ca")
            .args(["revoke", "--dir"])
            .arg(&ca.dir)
            .args(["--serial", &serial, "--reason", "stolen"]),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (csr, _) = openssl_csr(&ca, "after");
    let (status, code, v) = curl_renew(&ca, srv.port, &stolen, &stolen_key, &csr);
    assert_eq!((status, code.as_str()), (403, "certificate_revoked"), "{v}");
}

/// A renewal that raced `revoke` (issued after it read the ledger) is not
/// on the revocation list, but the certificate it was renewed from is:
/// serve refuses to renew it (adv33 F5). Simulated by taking the renewal's
/// entry out of revoked.json again.
#[test]
fn a_renewal_that_raced_the_revocation_renews_no_more() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let (stolen, stolen_key) = ca.issue("stolen", "/ns/shop/sa/payments", &[]);
    let serial = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(&stolen),
    )
    .trim()
    .trim_start_matches("serial=")
    .to_owned();
    let (csr, key) = openssl_csr(&ca, "escaped");
    let (status, code, v) = curl_renew(&ca, srv.port, &stolen, &stolen_key, &csr);
    assert_eq!((status, code.as_str()), (200, "ok"), "{v}");
    let escaped = ca.path("escaped.crt");
    fs::write(&escaped, v["chain_pem"].as_str().unwrap()).unwrap();
    let escaped_serial = v["serial"].as_str().unwrap().to_owned();
    run_ok(
        cmd("keyproof-ca")
            .args(["revoke", "--dir"])
            .arg(&ca.dir)
            .args(["--serial", &serial]),
    );
    // As if `revoke` had read the ledger before the renewal was recorded.
    let path = ca.dir.join("revoked.json");
    let mut list: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    list["revoked"]
        .as_array_mut()
        .unwrap()
        .retain(|r| r["serial"] != escaped_serial.as_str());
    assert_eq!(list["revoked"].as_array().unwrap().len(), 1, "{list}");
    fs::write(&path, serde_json::to_vec(&list).unwrap()).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (csr, _) = openssl_csr(&ca, "again");
    let (status, code, v) = curl_renew(&ca, srv.port, &escaped, &key, &csr);
    assert_eq!((status, code.as_str()), (403, "certificate_revoked"), "{v}");
}
