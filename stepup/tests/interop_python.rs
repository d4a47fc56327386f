//! Interop with an independent RFC 9421 implementation: PyPI
//! `http-message-signatures` (+ `pyOpenSSL`), through the scripts in
//! `stepup/interop/`.
//!
//! Skipped (passes with a note) when python3 or the packages are missing,
//! unless `KEYPROOF_INTEROP=1` is set, which makes their absence a failure.
//! Install: `pip install http-message-signatures pyOpenSSL`.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::*;
use keyproof_stepup::{Outcome, RequestView};
use serde_json::{json, Value};

/// The interpreter with the interop packages: `KEYPROOF_PYTHON` (CI points it
/// at a virtualenv), else `python3` from PATH.
fn python() -> String {
    std::env::var("KEYPROOF_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn python_ready() -> bool {
    let ok = Command::new(python())
        .args(["-c", "import http_message_signatures, http_sf, OpenSSL"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("KEYPROOF_INTEROP").as_deref() != Ok("1"),
            "KEYPROOF_INTEROP=1 but python3 with http-message-signatures/pyOpenSSL is not available"
        );
        eprintln!("skipping: python3 with http-message-signatures and pyOpenSSL not available");
    }
    ok
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join(name)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stepup-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tmp");
    d
}

fn headers_json(parts: &http::request::Parts) -> Value {
    Value::Array(
        parts
            .headers
            .iter()
            .map(|(k, v)| json!([k.as_str(), v.to_str().expect("text")]))
            .collect(),
    )
}

const BODY: &[u8] = br#"{"rotate":true}"#;
const URI: &str = "/admin/rotate?x=1&y=two";

#[test]
fn python_signs_keyproof_verifies() {
    if !python_ready() {
        return;
    }
    for (name, w) in [("p256", p256()), ("ed25519", ed25519())] {
        let fx = fixture(&w);
        let parts = request("POST", URI, Some("application/json"));
        let view = RequestView::from_parts(&parts);
        let ch = fx
            .verifier
            .challenge(&fx.peer, ROUTE, true, None, NOW)
            .expect("challenge");
        let dir = tmpdir(&format!("py-sign-{name}"));
        std::fs::write(dir.join("key.pem"), python_key_pem(&w)).expect("key");
        let challenge = json!({
            "method": "POST",
            "url": format!("https://payments.default.svc{URI}"),
            "headers": headers_json(&parts),
            "body_b64": STANDARD.encode(BODY),
            "accept_signature": ch.accept_signature.to_str().expect("text"),
            "exporter_b64": STANDARD.encode(fx.exporter),
            "now": NOW,
        });
        std::fs::write(dir.join("challenge.json"), challenge.to_string()).expect("challenge");
        let out = Command::new(python())
            .arg(script("sign_client.py"))
            .arg("--offline")
            .arg(dir.join("challenge.json"))
            .arg("--key")
            .arg(dir.join("key.pem"))
            .output()
            .expect("python3");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let signed: Value = serde_json::from_slice(&out.stdout).expect("json");
        let mut b = http::Request::builder().method("POST").uri(URI);
        for h in signed["headers"].as_array().expect("headers") {
            b = b.header(h[0].as_str().expect("name"), h[1].as_str().expect("value"));
        }
        let signed_parts = b.body(()).expect("request").into_parts().0;
        assert!(view.has_content_type());
        assert_eq!(
            fx.verify(&signed_parts, BODY, ROUTE, NOW),
            Outcome::Ok,
            "{name}"
        );
        assert_eq!(
            fx.verify(&signed_parts, BODY, ROUTE, NOW),
            Outcome::Replay,
            "{name}"
        );
    }
}

#[test]
fn keyproof_signs_python_verifies() {
    if !python_ready() {
        return;
    }
    for (name, w) in [("p256", p256()), ("ed25519", ed25519())] {
        let fx = fixture(&w);
        let parts = fx.signed("POST", URI, Some("application/json"), BODY, ROUTE);
        let dir = tmpdir(&format!("py-verify-{name}"));
        let req = json!({
            "method": "POST",
            "url": format!("https://payments.default.svc{URI}"),
            "headers": headers_json(&parts),
            "body_b64": STANDARD.encode(BODY),
            "cert_pem": pem("CERTIFICATE", &w.cert_der),
        });
        std::fs::write(dir.join("req.json"), req.to_string()).expect("req");
        let run = |extra: &[&str]| {
            Command::new(python())
                .arg(script("verify.py"))
                .arg(dir.join("req.json"))
                .args(extra)
                .output()
                .expect("python3")
        };
        let ok = run(&["--exporter-b64", &STANDARD.encode(fx.exporter)]);
        assert!(
            ok.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&ok.stdout),
            String::from_utf8_lossy(&ok.stderr)
        );
        // The Python verifier must also notice tampering and a wrong binding.
        let wrong = run(&["--exporter-b64", &STANDARD.encode([0u8; 32])]);
        assert!(!wrong.status.success(), "{name}: wrong binding accepted");
        let mut tampered = req.clone();
        tampered["url"] = json!(format!("https://payments.default.svc{URI}&z=1"));
        std::fs::write(dir.join("req.json"), tampered.to_string()).expect("req");
        assert!(
            !run(&[]).status.success(),
            "{name}: tampered query accepted"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
