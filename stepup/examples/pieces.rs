//! Runs one piece of the step-up request path `N` times, for instruction
//! counts under callgrind: repeatable whatever else the machine is doing,
//! unlike the timings of `benches/benches/stepup.rs`. The request is the
//! one `benches/stepup-mesh.sh` sends (a GET without a body, P-256 keys).
//!
//! Pieces: `begin` (the inbound's steps 1-7), `next` (the inbound's next
//! nonce: issue, seal, `Accept-Signature`), `parse` (the outbound reading
//! that `Accept-Signature`), `sign` (the outbound's whole signature) and
//! `sign_raw` (its ECDSA part alone).
//!
//! ```text
//! cargo build --release -p keyproof-stepup --example pieces
//! for n in 200 1200; do valgrind --tool=callgrind --callgrind-out-file=cg.$n \
//!   target/release/examples/pieces begin $n; done
//! # instructions per call: (total of cg.1200 - total of cg.200) / 1000
//! ```

use std::hint::black_box;

use http::request::Parts;
use keyproof_stepup::{Challenge, Peer, RequestView, Signer, StepUpConfig, Verifier};

const ROUTE: &str = "/su";

fn request() -> Parts {
    http::Request::builder()
        .method("GET")
        .uri("https://127.0.0.1:15001/su")
        .header("user-agent", "wrk")
        .body(())
        .expect("request")
        .into_parts()
        .0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(piece), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok())) else {
        eprintln!("usage: pieces begin|next|parse|sign|sign_raw N");
        std::process::exit(2);
    };
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .expect("params")
        .self_signed(&kp)
        .expect("certificate");
    let exporter = [0x42; 32];
    let verifier = Verifier::new(StepUpConfig {
        max_outstanding: 10_000_000,
        max_outstanding_per_peer: 10_000_000,
        ..StepUpConfig::default()
    })
    .expect("verifier");
    let signer = Signer::from_pkcs8_and_cert(&kp.serialize_der(), cert.der()).expect("signer");
    let peer = Peer::from_cert_der(cert.der(), Some(exporter)).expect("peer");
    let now = keyproof_stepup::unix_now();
    let mut response = http::HeaderMap::new();
    verifier
        .challenge(&peer, ROUTE, false, None, now)
        .expect("challenge")
        .into_next(&mut response);
    let challenge = Challenge::from_headers(&response)
        .expect("parse")
        .expect("stepup member");
    let parts = request();
    let view = RequestView::from_parts(&parts);
    let mut signed = request();
    signer
        .sign(&challenge, &view, b"", &exporter, now)
        .expect("sign")
        .apply_into(&mut signed.headers);
    let signed = RequestView::from_parts(&signed);
    for _ in 0..n {
        match piece.as_str() {
            "begin" => {
                let pending = verifier.begin(&peer, ROUTE, black_box(&signed), now);
                black_box(pending.expect("steps 1-7").max_body());
            }
            "next" => {
                black_box(verifier.challenge(&peer, ROUTE, false, None, now)).expect("nonce");
            }
            "parse" => {
                black_box(Challenge::from_headers(black_box(&response))).expect("parse");
            }
            "sign" => {
                black_box(signer.sign(&challenge, &view, b"", &exporter, now)).expect("sign");
            }
            "sign_raw" => {
                black_box(signer.sign_raw(black_box(&[0x61u8; 450]))).expect("sign");
            }
            other => {
                eprintln!("unknown piece {other}");
                std::process::exit(2);
            }
        }
    }
}
