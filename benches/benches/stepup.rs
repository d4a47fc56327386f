//! stepup-v1 verification cost.
//!
//! `verify_full`: the whole per-request path of the inbound verifier (parse
//! the four headers with sfv, nonce MAC + clock, channel binding, SHA-256 of a
//! small body, ECDSA P-256 verify, nonce-table removal) for a freshly signed
//! request each iteration (signing and nonce issuing are in the untimed
//! setup). Target: < 60 µs on one core.
//!
//! Beside it, the other pieces of a step-up request: steps 1-7 alone, a
//! replay, the inbound's next nonce, the outbound reading it, and the raw
//! ECDSA signature and verification (the crypto floor) against the whole
//! outbound signature.
//!
//! `cargo bench -p keyproof-benches --bench stepup -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::request::Parts;
use keyproof_stepup::{Challenge, Outcome, Peer, RequestView, Signer, StepUpConfig, Verifier};

const ROUTE: &str = "/admin";
const CHUNK: u64 = 1000;
const BODY: &[u8] = br#"{"rotate":true,"key":"payments-2026-11"}"#;

struct Fx {
    verifier: Verifier,
    signer: Signer,
    peer: Peer,
    exporter: [u8; 32],
}

fn fixture(alg: &'static rcgen::SignatureAlgorithm) -> Fx {
    let kp = rcgen::KeyPair::generate_for(alg).expect("keygen");
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .expect("params")
        .self_signed(&kp)
        .expect("cert");
    let exporter = [0x42; 32];
    Fx {
        verifier: Verifier::new(StepUpConfig {
            max_outstanding: 10_000_000,
            max_outstanding_per_peer: 10_000_000,
            ..StepUpConfig::default()
        })
        .expect("verifier"),
        signer: Signer::from_pkcs8_and_cert(&kp.serialize_der(), cert.der()).expect("signer"),
        peer: Peer::from_cert_der(cert.der(), Some(exporter)).expect("peer"),
        exporter,
    }
}

fn request() -> Parts {
    http::Request::builder()
        .method("POST")
        .uri("/admin/rotate?x=1")
        .header("host", "payments.default.svc")
        .header("content-type", "application/json")
        .header("user-agent", "bench/1")
        .body(())
        .expect("request")
        .into_parts()
        .0
}

fn signed(fx: &Fx, now: u64) -> Parts {
    let mut parts = request();
    let ch = fx
        .verifier
        .challenge(&fx.peer, ROUTE, true, None, now)
        .expect("challenge");
    let ch = Challenge::parse(ch.accept_signature.to_str().expect("text"))
        .expect("parse")
        .expect("member");
    let view = RequestView::from_parts(&parts);
    fx.signer
        .sign(&ch, &view, BODY, &fx.exporter, now)
        .expect("sign")
        .apply(&mut parts.headers);
    parts
}

fn bench(c: &mut Criterion) {
    let now = keyproof_stepup::unix_now();
    for (name, alg) in [
        ("ecdsa-p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("ed25519", &rcgen::PKCS_ED25519),
    ] {
        let fx = fixture(alg);
        c.bench_function(&format!("stepup/verify_full/{name}"), |b| {
            // Requests are signed in untimed chunks (each needs a fresh
            // nonce), then verified back to back as a busy proxy would.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(CHUNK);
                    let batch: Vec<Parts> = (0..n).map(|_| signed(&fx, now)).collect();
                    let start = Instant::now();
                    for parts in &batch {
                        let out = fx.verifier.verify(
                            &fx.peer,
                            ROUTE,
                            &RequestView::from_parts(black_box(parts)),
                            black_box(BODY),
                            now,
                        );
                        assert_eq!(out, Outcome::Ok);
                    }
                    total += start.elapsed();
                    left -= n;
                }
                total
            })
        });
    }

    let fx = fixture(&rcgen::PKCS_ECDSA_P256_SHA256);
    // Steps 1-7 only (everything before the body and the signature).
    c.bench_function("stepup/begin_headers_only/ecdsa-p256", |b| {
        let parts = signed(&fx, now);
        b.iter(|| {
            let view = RequestView::from_parts(black_box(&parts));
            fx.verifier
                .begin(&fx.peer, ROUTE, &view, now)
                .map(|p| p.max_body())
                .ok()
        })
    });
    // A replayed request: full path up to the table (what a replay costs us).
    c.bench_function("stepup/replay_refused/ecdsa-p256", |b| {
        let parts = signed(&fx, now);
        let view = RequestView::from_parts(&parts);
        assert_eq!(
            fx.verifier.verify(&fx.peer, ROUTE, &view, BODY, now),
            Outcome::Ok
        );
        b.iter(|| {
            fx.verifier
                .verify(&fx.peer, ROUTE, &view, black_box(BODY), now)
        })
    });
    // The floor: one ECDSA P-256 verification and nothing else.
    c.bench_function("stepup/raw_ecdsa_p256_verify", |b| {
        let msg = [0x61u8; 300];
        let sig = fx.signer.sign_raw(&msg).expect("sign");
        b.iter(|| fx.peer.key().verify(black_box(&msg), black_box(&sig)))
    });
    // The inbound's next nonce: issue, seal, `Accept-Signature` and the
    // header values (the nonces are taken back untimed, in chunks).
    c.bench_function("stepup/next_nonce/ecdsa-p256", |b| {
        b.iter(|| {
            fx.verifier
                .challenge(&fx.peer, ROUTE, true, None, now)
                .map(|c| c.accept_signature)
        })
    });
    // The outbound reading a response's `Accept-Signature`.
    c.bench_function("stepup/parse_challenge", |b| {
        let ch = fx
            .verifier
            .challenge(&fx.peer, ROUTE, true, None, now)
            .expect("challenge");
        let mut headers = http::HeaderMap::new();
        ch.apply_next(&mut headers);
        b.iter(|| Challenge::from_headers(black_box(&headers)))
    });
    c.bench_function("stepup/raw_ecdsa_p256_sign", |b| {
        let msg = [0x61u8; 300];
        b.iter(|| fx.signer.sign_raw(black_box(&msg)))
    });
    c.bench_function("stepup/sign/ecdsa-p256", |b| {
        let parts = request();
        let ch = fx
            .verifier
            .challenge(&fx.peer, ROUTE, true, None, now)
            .expect("challenge");
        let ch = Challenge::parse(ch.accept_signature.to_str().expect("text"))
            .expect("parse")
            .expect("member");
        let view = RequestView::from_parts(&parts);
        b.iter(|| {
            fx.signer
                .sign(&ch, &view, black_box(BODY), &fx.exporter, now)
                .map(|s| s.signature)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
