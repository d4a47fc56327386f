//! Verifying a projected ServiceAccount token, as `keyproof-ca serve` does
//! for every Kubernetes bootstrap: structure, signature against the JWKS,
//! issuer, audience, time and the `kubernetes.io` claims. RS256 (RSA 2048)
//! and ES256, the two algorithms API servers sign with. Compare with
//! `issue/from_csr_ecdsa_p256`: the rest of a bootstrap.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keyproof_ca::attest::{SaAttestor, SaConfig};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A key, its JWK (with a kid) and a token it signed with the claim layout
/// the API server writes into a pod's projected volume.
fn token(alg: Algorithm, now: i64) -> (Jwk, String) {
    let (kp, enc) = match alg {
        Algorithm::RS256 => {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
            let enc = EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes()).expect("RSA");
            (kp, enc)
        }
        _ => {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).expect("EC");
            (kp, enc)
        }
    };
    drop(kp);
    let kid = format!("bench-{alg:?}");
    let mut jwk = Jwk::from_encoding_key(&enc, alg).expect("JWK");
    jwk.common.key_id = Some(kid.clone());
    let claims = serde_json::json!({
        "aud": ["keyproof-ca"],
        "exp": now + 3600,
        "iat": now,
        "iss": ISSUER,
        "jti": "6a1c3d1e-2f0b-4c55-9d3e-0f6c2b9a7e41",
        "kubernetes.io": {
            "namespace": "shop",
            "node": {"name": "node-a", "uid": "0b8e5a52-5c1f-4b8e-9a51-8f1d2c3b4a59"},
            "pod": {"name": "web-7c9d8f6b5-x2k4q", "uid": "2f9d4e1a-8b7c-4d3e-a1f2-3c4b5d6e7f80"},
            "serviceaccount": {"name": "web", "uid": "9c8b7a65-4321-4fed-8cba-0987654321fe"}
        },
        "nbf": now,
        "sub": "system:serviceaccount:shop:web",
    });
    let mut header = Header::new(alg);
    header.typ = None;
    header.kid = Some(kid);
    let token = jsonwebtoken::encode(&header, &claims, &enc).expect("sign");
    (jwk, token)
}

fn verify(c: &mut Criterion) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rsa_jwk, rsa_token) = token(Algorithm::RS256, now);
    let (ec_jwk, ec_token) = token(Algorithm::ES256, now);
    let jwks = tmp.path().join("jwks.json");
    let set = JwkSet {
        keys: vec![rsa_jwk, ec_jwk],
    };
    std::fs::write(&jwks, serde_json::to_string(&set).expect("JWKS")).expect("write");
    let attestor = SaAttestor::new(SaConfig {
        jwks,
        issuer: ISSUER.to_owned(),
        audience: "keyproof-ca".to_owned(),
        leeway: Duration::from_secs(60),
        max_lifetime: Some(Duration::from_secs(24 * 3600)),
    })
    .expect("attestor");

    let mut g = c.benchmark_group("attest");
    g.throughput(Throughput::Elements(1));
    for (name, token) in [("verify_rs256", &rsa_token), ("verify_es256", &ec_token)] {
        g.bench_function(name, |b| {
            b.iter(|| std::hint::black_box(attestor.verify(token, now).expect("verifies")))
        });
    }
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
