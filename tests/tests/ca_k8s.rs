//! `keyproof-ca serve --k8s-jwks/--k8s-issuer`: bootstrap with a projected
//! Kubernetes ServiceAccount token, end to end. The real server binary over
//! mutual TLS; tokens minted by a test issuer with the exact claim layout the
//! API server writes (`keyproof_tests::k8s`), its JWKS written to a file as a
//! sync job would.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use keyproof_ca::client::{new_key, CaClient};
use keyproof_identity::keys::KeyType;
use keyproof_tests::ca_server::{self, client, code, rt, sample, CaServer};
use keyproof_tests::k8s::{self, ClusterIssuer, SaToken};
use keyproof_tests::{cmd, free_port, TestCa};
use serde_json::Value;

const TD: &str = "prod.example.com";
const WEB: &str = "spiffe://prod.example.com/ns/demo/sa/web";

/// A CA that accepts tokens of `issuer`, its JWKS at `jwks`.
fn start_k8s(ca: &TestCa, issuer: &ClusterIssuer) -> (CaServer, PathBuf) {
    let jwks = ca.path("jwks.json");
    issuer.write_jwks(&jwks);
    let srv = CaServer::start(
        ca,
        &[
            "--k8s-jwks",
            jwks.to_str().unwrap(),
            "--k8s-issuer",
            k8s::ISSUER,
        ],
    );
    (srv, jwks)
}

/// Bootstraps with `token` and a new key; the API code, or `ok`.
fn bootstrap(c: &CaClient, token: &str) -> String {
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    code(rt().block_on(c.bootstrap(token, &k.csr_pem)))
}

/// Retries `bootstrap` for up to ~3 s until it answers `want`; the last
/// answer.
fn bootstrap_until(c: &CaClient, token: &str, want: &str) -> String {
    let start = Instant::now();
    loop {
        let got = bootstrap(c, token);
        if got == want || start.elapsed() > Duration::from_secs(3) {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn refusals(metrics: &str, code: &str) -> Option<f64> {
    sample(
        metrics,
        &format!("keyproof_ca_refusals_total{{code=\"{code}\"}}"),
    )
}

/// `token` with its payload's namespace changed and its signature kept.
fn tampered(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["kubernetes.io"]["namespace"] = "kube-system".into();
    claims["sub"] = "system:serviceaccount:kube-system:web".into();
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

/// A bootstrap with curl, to ask for a particular `?spiffe_id=`: (status,
/// error code).
fn curl_bootstrap(ca: &TestCa, port: u16, token: &str, query: &str) -> (u16, String) {
    curl_bootstrap_with(ca, port, &format!("Bearer {token}"), &[], query)
}

/// [`curl_bootstrap`] with the whole `Authorization` value and more curl
/// arguments (e.g. `--http2`).
fn curl_bootstrap_with(
    ca: &TestCa,
    port: u16,
    authorization: &str,
    args: &[&str],
    query: &str,
) -> (u16, String) {
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    let header = format!("Authorization: {authorization}");
    let args = [&["-H", &*header], args].concat();
    let (status, code, _) = ca_server::curl_bootstrap(ca, port, &k.csr_pem, &args, query);
    (status, code)
}

#[test]
fn a_service_account_token_bootstraps_its_identity_and_bad_ones_are_refused_and_counted() {
    let ca = TestCa::new(TD);
    let issuer = ClusterIssuer::new(k8s::ISSUER, Algorithm::ES256);
    let (srv, _jwks) = start_k8s(&ca, &issuer);
    let c = client(&ca, srv.port);
    let rt = rt();

    // A projected token for demo/web: the identity is the ServiceAccount's.
    let token = issuer.token(&SaToken::new("demo", "web"));
    let k = new_key(KeyType::EcdsaP256, WEB).unwrap();
    let svid = rt
        .block_on(c.bootstrap(&token, &k.csr_pem))
        .expect("bootstrap");
    assert_eq!(svid.spiffe_id, WEB);
    assert_eq!(
        keyproof_identity::svid::check_leaf_der(&svid.chain[0])
            .unwrap()
            .as_str(),
        WEB
    );
    // The same token again (a restarted pod): still good.
    assert_eq!(bootstrap(&c, &token), "ok");
    // Asking for its own identity explicitly is fine too.
    assert_eq!(
        curl_bootstrap(&ca, srv.port, &token, &format!("?spiffe_id={WEB}")),
        (200, "ok".into())
    );

    // Refusals, each with its code.
    let mut wrong_aud = SaToken::new("demo", "web");
    wrong_aud.audience = vec!["https://kubernetes.default.svc".into()];
    let mut expired = SaToken::new("demo", "web");
    expired.issued_at = k8s::now() - 2 * 3600;
    expired.lifetime = 3600;
    let stranger = ClusterIssuer::new(k8s::ISSUER, Algorithm::ES256);
    let cases = [
        (
            "wrong audience",
            issuer.token(&wrong_aud),
            "sa_token_audience",
        ),
        ("expired", issuer.token(&expired), "sa_token_expired"),
        (
            "another issuer's key",
            stranger.token(&SaToken::new("demo", "web")),
            "sa_token_signature",
        ),
        ("tampered", tampered(&token), "sa_token_signature"),
        (
            "join-token-shaped garbage",
            "kpt_garbage".into(),
            "invalid_token",
        ),
        ("neither shape", "garbage".into(), "invalid_token"),
    ];
    for (what, t, want) in &cases {
        assert_eq!(bootstrap(&c, t), *want, "{what}");
    }
    // A token for another namespace than the identity asked for.
    let other = issuer.token(&SaToken::new("other", "web"));
    assert_eq!(
        curl_bootstrap(&ca, srv.port, &other, &format!("?spiffe_id={WEB}")),
        (403, "id_mismatch".into())
    );

    // Counted.
    let m = srv.scrape();
    for (code, n) in [
        ("sa_token_audience", 1.0),
        ("sa_token_expired", 1.0),
        ("sa_token_signature", 2.0),
        ("invalid_token", 2.0),
        ("id_mismatch", 1.0),
        ("sa_token_issuer", 0.0),
        ("sa_token_malformed", 0.0),
        ("sa_token_not_accepted", 0.0),
    ] {
        assert_eq!(refusals(&m, code), Some(n), "{code}: {m}");
    }
    for (series, n) in [
        (
            "keyproof_ca_issuances_total{kind=\"bootstrap_sa\",result=\"ok\"}",
            3.0,
        ),
        (
            "keyproof_ca_issuances_total{kind=\"bootstrap_sa\",result=\"refused\"}",
            5.0,
        ),
        (
            "keyproof_ca_issuances_total{kind=\"bootstrap_token\",result=\"refused\"}",
            2.0,
        ),
        ("keyproof_ca_jwks_keys", 1.0),
    ] {
        assert_eq!(sample(&m, series), Some(n), "{series}: {m}");
    }

    // The ledger names the ServiceAccount and the pod.
    let ledger = fs::read_to_string(ca.dir.join("ledger.jsonl")).unwrap();
    let pod = SaToken::new("demo", "web").pod;
    assert!(
        ledger.contains(&format!(
            "\"requester\":\"bootstrap:sa:system:serviceaccount:demo:web/{pod}\""
        )),
        "{ledger}"
    );

    // Logged with code, peer and the caller's sub; never a token.
    let log = srv.log();
    for (_, t, _) in &cases {
        assert!(!log.contains(t.as_str()), "a token was logged:\n{log}");
    }
    assert!(!log.contains(&token), "a token was logged:\n{log}");
    let expired_line = log
        .lines()
        .find(|l| l.contains("sa_token_expired"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        expired_line.contains("system:serviceaccount:demo:web")
            && expired_line.contains("peer=127.0.0.1:"),
        "{expired_line}"
    );
    let mismatch = log
        .lines()
        .find(|l| l.contains("id_mismatch"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        mismatch.contains("sub=\"system:serviceaccount:other:web\"")
            || mismatch.contains("sub=system:serviceaccount:other:web"),
        "{mismatch}"
    );
}

#[test]
fn a_ca_without_a_jwks_refuses_service_account_tokens() {
    let ca = TestCa::new(TD);
    let srv = CaServer::start(&ca, &[]);
    let issuer = ClusterIssuer::new(k8s::ISSUER, Algorithm::ES256);
    let token = issuer.token(&SaToken::new("demo", "web"));
    assert_eq!(
        bootstrap(&client(&ca, srv.port), &token),
        "sa_token_not_accepted"
    );
    // An unsecured JWT is a ServiceAccount token attempt too.
    assert_eq!(
        bootstrap(&client(&ca, srv.port), &unsecured("demo", "web")),
        "sa_token_not_accepted"
    );
    let m = srv.scrape();
    assert_eq!(refusals(&m, "sa_token_not_accepted"), Some(2.0), "{m}");
    assert_eq!(refusals(&m, "invalid_token"), Some(0.0), "{m}");
    assert_eq!(
        sample(
            &m,
            "keyproof_ca_issuances_total{kind=\"bootstrap_sa\",result=\"refused\"}"
        ),
        Some(2.0)
    );
    // The log names who the token claims to be (unverified), never the token.
    let log = srv.log();
    assert!(!log.contains(&token), "{log}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sa_token_not_accepted"))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("claimed_sub=\"system:serviceaccount:demo:web\"")),
        "{log}"
    );
}

/// A JWT-shaped credential claiming `system:serviceaccount:<ns>:<sa>`, with
/// `alg: none` and no signature.
fn unsecured(ns: &str, sa: &str) -> String {
    let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        part(serde_json::json!({"alg": "none", "typ": "JWT"})),
        part(serde_json::json!({"sub": format!("system:serviceaccount:{ns}:{sa}")}))
    )
}

/// A JWT-shaped credential of about `len` bytes (signature not valid).
fn oversized(len: usize) -> String {
    let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        part(serde_json::json!({"alg": "ES256"})),
        part(serde_json::json!({"sub": "system:serviceaccount:demo:big"})),
        "A".repeat(len)
    )
}

#[test]
fn odd_oversized_and_unsecured_service_account_tokens_are_answered_by_the_api() {
    let ca = TestCa::new(TD);
    let issuer = ClusterIssuer::new(k8s::ISSUER, Algorithm::ES256);
    let (srv, _jwks) = start_k8s(&ca, &issuer);
    let token = issuer.token(&SaToken::new("demo", "web"));

    // The scheme in any case, then any spaces or tabs.
    for auth in [
        format!("bearer {token}"),
        format!("BEARER\t{token}"),
        format!("Bearer \t {token} "),
    ] {
        for proto in ["--http1.1", "--http2"] {
            assert_eq!(
                curl_bootstrap_with(&ca, srv.port, &auth, &[proto], ""),
                (200, "ok".into()),
                "{proto} {}",
                &auth[..8]
            );
        }
    }

    // Over the token size limit but within the request head limit: the API
    // refuses it, on either protocol.
    let big = oversized(attest_max() + 4096);
    for proto in ["--http1.1", "--http2"] {
        assert_eq!(
            curl_bootstrap_with(&ca, srv.port, &format!("Bearer {big}"), &[proto], ""),
            (401, "sa_token_malformed".into()),
            "{proto}"
        );
    }
    // Unsecured.
    assert_eq!(
        curl_bootstrap_with(
            &ca,
            srv.port,
            &format!("Bearer {}", unsecured("demo", "web")),
            &[],
            ""
        ),
        (401, "sa_token_malformed".into())
    );
    // Over the request head limit: the HTTP layer refuses it. On HTTP/1.1
    // with 431, counted and logged; on HTTP/2 the stream is refused
    // (REFUSED_STREAM, which the server cannot see to count).
    let huge = oversized(80 * 1024);
    let (status, _) =
        curl_bootstrap_with(&ca, srv.port, &format!("Bearer {huge}"), &["--http1.1"], "");
    assert_eq!(status, 431);
    let (status, _) =
        curl_bootstrap_with(&ca, srv.port, &format!("Bearer {huge}"), &["--http2"], "");
    assert_ne!(status, 200);

    let m = srv.scrape();
    assert_eq!(refusals(&m, "sa_token_malformed"), Some(3.0), "{m}");
    assert_eq!(refusals(&m, "invalid_token"), Some(0.0), "{m}");
    assert_eq!(refusals(&m, "request_header_too_large"), Some(1.0), "{m}");
    assert_eq!(
        sample(
            &m,
            "keyproof_ca_issuances_total{kind=\"bootstrap_sa\",result=\"refused\"}"
        ),
        Some(3.0),
        "{m}"
    );
    let log = srv.log();
    let malformed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sa_token_malformed"))
        .collect();
    assert_eq!(malformed.len(), 3, "{log}");
    assert!(
        malformed[..2]
            .iter()
            .all(|l| l.contains("claimed_sub=\"system:serviceaccount:demo:big\"")),
        "{log}"
    );
    assert!(
        malformed[2].contains("claimed_sub=\"system:serviceaccount:demo:web\""),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("request_header_too_large") && l.contains("peer=127.0.0.1:")),
        "{log}"
    );
    assert!(!log.contains(&big[..2000]), "a token was logged");
}

fn attest_max() -> usize {
    keyproof_ca::attest::MAX_TOKEN_LEN
}

#[test]
fn the_flags_are_checked_at_startup() {
    let ca = TestCa::new(TD);
    let err = keyproof_tests::run_err(
        cmd("keyproof-ca")
            .args(["serve", "--dir"])
            .arg(&ca.dir)
            .args(["--k8s-jwks", "/nonexistent/jwks.json"]),
    );
    assert!(err.contains("--k8s-issuer"), "{err}");
    let err = keyproof_tests::run_err(
        cmd("keyproof-ca")
            .args(["serve", "--dir"])
            .arg(&ca.dir)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--k8s-jwks", "/nonexistent/jwks.json"])
            .args(["--k8s-issuer", k8s::ISSUER]),
    );
    assert!(err.contains("--k8s-jwks"), "{err}");
    // The admin address taken: the error names the flag.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = keyproof_tests::run_err(
        cmd("keyproof-ca")
            .args(["serve", "--dir"])
            .arg(&ca.dir)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-listen", &busy.local_addr().unwrap().to_string()]),
    );
    assert!(err.contains("--admin-listen"), "{err}");
    let err = keyproof_tests::run_err(
        cmd("keyproof-ca")
            .args(["serve", "--dir"])
            .arg(&ca.dir)
            .args(["--listen", &busy.local_addr().unwrap().to_string()])
            .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())]),
    );
    assert!(err.contains("--listen"), "{err}");
}

#[test]
fn jwks_rotation_while_serving_rs256_to_es256() {
    let ca = TestCa::new(TD);
    let mut issuer = ClusterIssuer::new(k8s::ISSUER, Algorithm::RS256);
    let (srv, jwks) = start_k8s(&ca, &issuer);
    let c = client(&ca, srv.port);

    // RS256, as many API servers sign.
    let old = issuer.token(&SaToken::new("demo", "web"));
    assert_eq!(bootstrap(&c, &old), "ok");

    // The cluster adds an ES256 key and signs with it: accepted without a
    // restart once the JWKS file has it.
    issuer.rotate(Algorithm::ES256);
    issuer.write_jwks(&jwks);
    let new = issuer.token(&SaToken::new("demo", "web"));
    assert_eq!(bootstrap_until(&c, &new, "ok"), "ok");
    assert_eq!(bootstrap(&c, &old), "ok", "both keys are published");

    // The old key is retired: its tokens no longer verify.
    issuer.retire_old_keys();
    issuer.write_jwks(&jwks);
    assert_eq!(
        bootstrap_until(&c, &old, "sa_token_signature"),
        "sa_token_signature"
    );
    assert_eq!(bootstrap(&c, &new), "ok");

    let m = srv.scrape();
    assert_eq!(sample(&m, "keyproof_ca_jwks_keys"), Some(1.0), "{m}");
    assert!(
        sample(&m, "keyproof_ca_jwks_reloads_total{result=\"ok\"}").is_some_and(|n| n >= 2.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "keyproof_ca_jwks_reloads_total{result=\"failed\"}"),
        Some(0.0),
        "{m}"
    );
}
