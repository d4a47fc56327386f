//! Shared fixtures: workload keys and certificates from rcgen, a verifier, a
//! signer, and helpers that run the challenge -> sign -> verify flow.
#![allow(dead_code)]

use http::request::Parts;
use http::{HeaderValue, Request};
use keyproof_stepup::{
    Challenge, Peer, RequestView, SignedHeaders, Signer, StepUpConfig, Verifier,
};

pub const NOW: u64 = 1_795_000_000; // 2026-11-18, inside u32 range
pub const ROUTE: &str = "/admin";

pub struct Workload {
    pub cert_der: Vec<u8>,
    pub pkcs8_der: Vec<u8>,
}

pub fn workload(alg: &'static rcgen::SignatureAlgorithm) -> Workload {
    let kp = rcgen::KeyPair::generate_for(alg).expect("keygen");
    let params = rcgen::CertificateParams::new(vec!["workload.test".to_string()]).expect("params");
    let cert = params.self_signed(&kp).expect("self-signed");
    Workload {
        cert_der: cert.der().to_vec(),
        pkcs8_der: kp.serialize_der(),
    }
}

pub fn p256() -> Workload {
    workload(&rcgen::PKCS_ECDSA_P256_SHA256)
}

pub fn ed25519() -> Workload {
    workload(&rcgen::PKCS_ED25519)
}

pub struct Fixture {
    pub verifier: Verifier,
    pub signer: Signer,
    pub peer: Peer,
    pub exporter: [u8; 32],
}

pub fn fixture_with(w: &Workload, cfg: StepUpConfig) -> Fixture {
    let exporter = [0x5a; 32];
    Fixture {
        verifier: Verifier::new(cfg).expect("verifier"),
        signer: Signer::from_pkcs8_and_cert(&w.pkcs8_der, &w.cert_der).expect("signer"),
        peer: Peer::from_cert_der(&w.cert_der, Some(exporter)).expect("peer"),
        exporter,
    }
}

pub fn fixture(w: &Workload) -> Fixture {
    fixture_with(w, StepUpConfig::default())
}

pub fn request(method: &str, uri: &str, content_type: Option<&str>) -> Parts {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "payments.default.svc");
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    b.body(()).expect("request").into_parts().0
}

impl Fixture {
    /// Challenge for `parts` on `route` at `now`, parsed as the signer sees it.
    pub fn challenge(&self, parts: &Parts, route: &str, now: u64) -> Challenge {
        let view = RequestView::from_parts(parts);
        let ch = self
            .verifier
            .challenge(&self.peer, route, view.has_content_type(), None, now)
            .expect("challenge");
        Challenge::from_headers(&{
            let mut h = http::HeaderMap::new();
            ch.apply_challenge(&mut h);
            h
        })
        .expect("parse")
        .expect("stepup member")
    }

    /// Signs `parts` in place for `ch` at `sign_now`.
    pub fn sign(
        &self,
        ch: &Challenge,
        parts: &mut Parts,
        body: &[u8],
        sign_now: u64,
    ) -> SignedHeaders {
        let view = RequestView::from_parts(parts);
        let signed = self
            .signer
            .sign(ch, &view, body, &self.exporter, sign_now)
            .expect("sign");
        signed.apply(&mut parts.headers);
        signed
    }

    /// A fully signed request on `route` (challenge and signature at NOW).
    pub fn signed(
        &self,
        method: &str,
        uri: &str,
        ct: Option<&str>,
        body: &[u8],
        route: &str,
    ) -> Parts {
        let mut parts = request(method, uri, ct);
        let ch = self.challenge(&parts, route, NOW);
        self.sign(&ch, &mut parts, body, NOW);
        parts
    }

    pub fn verify(
        &self,
        parts: &Parts,
        body: &[u8],
        route: &str,
        now: u64,
    ) -> keyproof_stepup::Outcome {
        self.verifier.verify(
            &self.peer,
            route,
            &RequestView::from_parts(parts),
            body,
            now,
        )
    }
}

pub fn set(parts: &mut Parts, name: &'static str, value: &str) {
    parts
        .headers
        .insert(name, HeaderValue::from_str(value).expect("header value"));
}

pub fn get(parts: &Parts, name: &str) -> String {
    parts
        .headers
        .get(name)
        .expect("header")
        .to_str()
        .expect("text")
        .to_string()
}

/// PEM of a PKCS#8 key for Python's `cryptography`, which rejects rcgen's
/// PKCS#8 v2 Ed25519 documents: those are rewritten as v1 (RFC 8410 §7).
pub fn python_key_pem(w: &Workload) -> String {
    let der = &w.pkcs8_der;
    let is_ed25519 = der.windows(5).any(|x| x == [0x06, 0x03, 0x2b, 0x65, 0x70]);
    let doc = match der.windows(4).position(|x| x == [0x04, 0x22, 0x04, 0x20]) {
        Some(at) if is_ed25519 => {
            let mut v1 = vec![
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20,
            ];
            v1.extend_from_slice(&der[at + 4..at + 36]);
            v1
        }
        _ => der.clone(),
    };
    pem("PRIVATE KEY", &doc)
}

pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
