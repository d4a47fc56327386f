//! Interop driver for the Python scripts in `stepup/interop/` (an independent
//! RFC 9421 implementation, PyPI `http-message-signatures`).
//!
//! * `signed-json [p256|ed25519]`: signs a request with keyproof's [`Signer`]
//!   (after a real challenge from keyproof's [`Verifier`]) and prints it as
//!   JSON for `interop/verify.py`.
//! * `python-signs [p256|ed25519] [path/to/sign_client.py]`: issues a
//!   challenge, lets `sign_client.py --offline` answer it, and verifies the
//!   Python-signed request with keyproof's verifier (then checks its replay is
//!   refused). Exit status 0 only if the answer is `ok` then `replay`.
//!
//! ```text
//! cargo run -q -p keyproof-stepup --example interop -- signed-json p256 > /tmp/req.json
//! python3 stepup/interop/verify.py /tmp/req.json
//! cargo run -q -p keyproof-stepup --example interop -- python-signs ed25519
//! ```

use std::process::{Command, ExitCode};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::request::Parts;
use keyproof_stepup::{Challenge, Outcome, Peer, RequestView, Signer, StepUpConfig, Verifier};
use serde_json::{json, Value};

const ROUTE: &str = "/admin";
const AUTHORITY: &str = "payments.default.svc";
const EXPORTER: [u8; 32] = [0x7e; 32];

fn key(kind: &str) -> rcgen::KeyPair {
    let alg = match kind {
        "ed25519" => &rcgen::PKCS_ED25519,
        _ => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    rcgen::KeyPair::generate_for(alg).expect("keygen")
}

fn cert(kp: &rcgen::KeyPair) -> Vec<u8> {
    rcgen::CertificateParams::new(vec![AUTHORITY.to_string()])
        .expect("params")
        .self_signed(kp)
        .expect("cert")
        .der()
        .to_vec()
}

fn request(body_len: usize) -> Parts {
    http::Request::builder()
        .method("POST")
        .uri("/admin/rotate?x=1&y=two")
        .header("host", AUTHORITY)
        .header("content-type", "application/json")
        .header("content-length", body_len.to_string())
        .body(())
        .expect("request")
        .into_parts()
        .0
}

fn headers_json(parts: &Parts) -> Value {
    Value::Array(
        parts
            .headers
            .iter()
            .map(|(k, v)| json!([k.as_str(), v.to_str().unwrap_or_default()]))
            .collect(),
    )
}

fn url(parts: &Parts) -> String {
    format!("https://{AUTHORITY}{}", parts.uri)
}

fn signed_json(kind: &str) -> ExitCode {
    let kp = key(kind);
    let cert = cert(&kp);
    let verifier = Verifier::new(StepUpConfig::default()).expect("verifier");
    let peer = Peer::from_cert_der(&cert, Some(EXPORTER)).expect("peer");
    let signer = Signer::from_pkcs8_and_cert(&kp.serialize_der(), &cert).expect("signer");
    let body = br#"{"rotate":true}"#;
    let mut parts = request(body.len());
    let now = keyproof_stepup::unix_now();
    let ch = verifier
        .challenge(&peer, ROUTE, true, None, now)
        .expect("challenge");
    let ch = Challenge::parse(ch.accept_signature.to_str().expect("text"))
        .expect("parse")
        .expect("member");
    let view = RequestView::from_parts(&parts);
    signer
        .sign(&ch, &view, body, &EXPORTER, now)
        .expect("sign")
        .apply(&mut parts.headers);
    // Sanity: keyproof's own verifier accepts it (without consuming: begin only).
    let view = RequestView::from_parts(&parts);
    assert!(verifier.begin(&peer, ROUTE, &view, now).is_ok());
    let out = json!({
        "method": parts.method.as_str(),
        "url": url(&parts),
        "headers": headers_json(&parts),
        "body_b64": STANDARD.encode(body),
        "public_key_pem": kp.public_key_pem(),
        "exporter_b64": STANDARD.encode(EXPORTER),
    });
    println!("{out}");
    ExitCode::SUCCESS
}

/// PEM for Python's `cryptography`: it rejects rcgen's PKCS#8 v2 Ed25519
/// documents, so those are rewritten as v1 (RFC 8410 §7) from the seed.
fn python_key_pem(kind: &str, kp: &rcgen::KeyPair) -> String {
    if kind != "ed25519" {
        return kp.serialize_pem();
    }
    let der = kp.serialize_der();
    let at = der
        .windows(4)
        .position(|w| w == [0x04, 0x22, 0x04, 0x20])
        .expect("seed in PKCS#8");
    let mut v1 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    v1.extend_from_slice(&der[at + 4..at + 36]);
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(v1)
    )
}

fn python_signs(kind: &str, script: &str) -> ExitCode {
    let kp = key(kind);
    let cert = cert(&kp);
    let verifier = Verifier::new(StepUpConfig::default()).expect("verifier");
    let peer = Peer::from_cert_der(&cert, Some(EXPORTER)).expect("peer");
    let body = br#"{"rotate":true}"#;
    let parts = request(body.len());
    let now = keyproof_stepup::unix_now();
    let ch = verifier
        .challenge(&peer, ROUTE, true, None, now)
        .expect("challenge");
    let dir = std::env::temp_dir().join(format!("stepup-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let key_path = dir.join("key.pem");
    let ch_path = dir.join("challenge.json");
    std::fs::write(&key_path, python_key_pem(kind, &kp)).expect("write key");
    let challenge = json!({
        "method": parts.method.as_str(),
        "url": url(&parts),
        "headers": headers_json(&parts),
        "body_b64": STANDARD.encode(body),
        "accept_signature": ch.accept_signature.to_str().expect("text"),
        "exporter_b64": STANDARD.encode(EXPORTER),
        "now": now,
    });
    std::fs::write(&ch_path, challenge.to_string()).expect("write challenge");
    let out = Command::new("python3")
        .arg(script)
        .arg("--offline")
        .arg(&ch_path)
        .arg("--key")
        .arg(&key_path)
        .output()
        .expect("run python3");
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        eprintln!(
            "sign_client.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return ExitCode::FAILURE;
    }
    let signed: Value = serde_json::from_slice(&out.stdout).expect("python output is JSON");
    let mut builder = http::Request::builder()
        .method(signed["method"].as_str().expect("method"))
        .uri(parts.uri.clone());
    for h in signed["headers"].as_array().expect("headers") {
        builder = builder.header(h[0].as_str().expect("name"), h[1].as_str().expect("value"));
    }
    let signed_parts = builder.body(()).expect("request").into_parts().0;
    for name in [
        "content-digest",
        "stepup-binding",
        "signature-input",
        "signature",
    ] {
        if let Some(v) = signed_parts.headers.get(name) {
            println!("{name}: {}", v.to_str().unwrap_or("?"));
        }
    }
    let view = RequestView::from_parts(&signed_parts);
    let first = verifier.verify(&peer, ROUTE, &view, body, now);
    let second = verifier.verify(&peer, ROUTE, &view, body, now);
    println!("keyproof verifier: first={first} replay={second}");
    if first == Outcome::Ok && second == Outcome::Replay {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind = args.get(1).map(String::as_str).unwrap_or("p256");
    match args.first().map(String::as_str) {
        Some("signed-json") => signed_json(kind),
        Some("python-signs") => {
            let default = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/sign_client.py");
            python_signs(kind, args.get(2).map(String::as_str).unwrap_or(default))
        }
        _ => {
            eprintln!("usage: interop signed-json|python-signs [p256|ed25519] [sign_client.py]");
            ExitCode::from(2)
        }
    }
}
