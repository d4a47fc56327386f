//! The attacks step-up exists to stop (replay, nonce theft across routes,
//! peers and connections, forgery, tampering after signing, algorithm
//! substitution, malformed and oversized headers, channel-binding mismatch),
//! each refused with the result the design doc gives it, so a regression
//! shows which defence broke.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use keyproof_stepup::{IssueError, Outcome, Peer, RequestView, StepUpConfig, Verifier};

const BODY: &[u8] = br#"{"rotate":true}"#;
const URI: &str = "/admin/rotate?x=1";
const CT: Option<&str> = Some("application/json");

type Change = Box<dyn Fn(&mut http::request::Parts)>;

fn signed_p256() -> (Fixture, http::request::Parts) {
    let fx = fixture(&p256());
    let parts = fx.signed("POST", URI, CT, BODY, ROUTE);
    (fx, parts)
}

#[test]
fn valid_request_is_ok_and_its_replay_is_refused() {
    let (fx, parts) = signed_p256();
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::Ok);
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::Replay);
    assert_eq!(fx.verifier.outstanding(), 0);
}

#[test]
fn unsigned_request_is_missing() {
    let fx = fixture(&p256());
    let parts = request("POST", URI, CT);
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::Missing);
}

#[test]
fn replay_on_another_connection_of_the_same_identity() {
    let w = p256();
    let fx = fixture(&w);
    let parts = fx.signed("POST", URI, CT, BODY, ROUTE);
    // Same certificate, another TLS connection: another exporter.
    let other_conn = Peer::from_cert_der(&w.cert_der, Some([0x11; 32])).expect("peer");
    let view = RequestView::from_parts(&parts);
    assert_eq!(
        fx.verifier.verify(&other_conn, ROUTE, &view, BODY, NOW),
        Outcome::BindingMismatch
    );
    // A connection without an exporter never passes the binding check.
    let no_exporter = Peer::from_cert_der(&w.cert_der, None).expect("peer");
    assert_eq!(
        fx.verifier.verify(&no_exporter, ROUTE, &view, BODY, NOW),
        Outcome::BindingMismatch
    );
    // The nonce was not consumed by the failures: the original still passes once.
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::Ok);
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::Replay);
}

#[test]
fn replay_from_another_identity() {
    let (fx, parts) = signed_p256();
    let other = p256();
    let other_peer = Peer::from_cert_der(&other.cert_der, Some(fx.exporter)).expect("peer");
    let view = RequestView::from_parts(&parts);
    assert_eq!(
        fx.verifier.verify(&other_peer, ROUTE, &view, BODY, NOW),
        Outcome::KeyidMismatch
    );
    let ed = ed25519();
    let ed_peer = Peer::from_cert_der(&ed.cert_der, Some(fx.exporter)).expect("peer");
    assert_eq!(
        fx.verifier.verify(&ed_peer, ROUTE, &view, BODY, NOW),
        Outcome::BadAlg
    );
}

#[test]
fn nonce_for_route_a_used_on_route_b() {
    let (fx, parts) = signed_p256();
    assert_eq!(fx.verify(&parts, BODY, "/other", NOW), Outcome::BadNonce);
}

#[test]
fn another_peers_nonce() {
    let fx = fixture(&p256());
    let other = fixture(&p256());
    let mut parts = request("POST", URI, CT);
    // A nonce issued (by the same verifier) to another peer.
    let view = RequestView::from_parts(&parts);
    let ch = fx
        .verifier
        .challenge(&other.peer, ROUTE, view.has_content_type(), None, NOW)
        .expect("challenge");
    let mut theirs = keyproof_stepup::Challenge::parse(ch.accept_signature.to_str().expect("text"))
        .expect("parse")
        .expect("member");
    theirs.keyid = fx.signer.keyid().to_string();
    fx.sign(&theirs, &mut parts, BODY, NOW);
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::BadNonce);
}

#[test]
fn expired_nonce() {
    let (fx, parts) = signed_p256();
    let ttl = fx.verifier.config().nonce_ttl.as_secs();
    assert_eq!(
        fx.verify(&parts, BODY, ROUTE, NOW + ttl + 1),
        Outcome::Expired
    );
    // Still valid on its last second.
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW + ttl), Outcome::Ok);
}

#[test]
fn forged_nonces() {
    let (fx, parts) = signed_p256();
    let input = get(&parts, "signature-input");
    let nonce = input
        .split("nonce=\"")
        .nth(1)
        .expect("nonce")
        .split('"')
        .next()
        .expect("end")
        .to_string();
    let mut raw = URL_SAFE_NO_PAD.decode(&nonce).expect("b64");
    // Push the expiry far out: the MAC no longer matches.
    raw[16] = 0xff;
    let extended = URL_SAFE_NO_PAD.encode(&raw);
    let random = URL_SAFE_NO_PAD.encode([0x42u8; 36]);
    for forged in [
        extended.as_str(),
        random.as_str(),
        "AAAA",
        &"A".repeat(47),
        &"=".repeat(48),
    ] {
        let mut p = parts.clone();
        set(&mut p, "signature-input", &input.replace(&nonce, forged));
        assert_eq!(
            fx.verify(&p, BODY, ROUTE, NOW),
            Outcome::BadNonce,
            "{forged}"
        );
    }
}

#[test]
fn request_changed_after_signing() {
    let (fx, parts) = signed_p256();
    let cases: Vec<(&str, Change)> = vec![
        ("method", Box::new(|p| p.method = http::Method::PUT)),
        (
            "path",
            Box::new(|p| p.uri = "/admin/delete?x=1".parse().expect("uri")),
        ),
        (
            "query",
            Box::new(|p| p.uri = "/admin/rotate?x=2".parse().expect("uri")),
        ),
        (
            "query removed",
            Box::new(|p| p.uri = "/admin/rotate".parse().expect("uri")),
        ),
        (
            "authority",
            Box::new(|p| set(p, "host", "evil.default.svc")),
        ),
        (
            "content-type",
            Box::new(|p| set(p, "content-type", "text/plain")),
        ),
    ];
    for (what, change) in cases {
        let mut p = parts.clone();
        change(&mut p);
        assert_eq!(
            fx.verify(&p, BODY, ROUTE, NOW),
            Outcome::BadSignature,
            "{what}"
        );
    }
    // Content-Type dropped: the component set no longer fits the request.
    let mut p = parts.clone();
    p.headers.remove("content-type");
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    // Body changed.
    assert_eq!(
        fx.verify(&parts, br#"{"rotate":false}"#, ROUTE, NOW),
        Outcome::DigestMismatch
    );
    assert_eq!(fx.verify(&parts, b"", ROUTE, NOW), Outcome::DigestMismatch);
    // None of the failures consumed the nonce.
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::Ok);
}

#[test]
fn content_digest_missing_or_wrong() {
    let (fx, parts) = signed_p256();
    let mut p = parts.clone();
    p.headers.remove("content-digest");
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    // A digest of another body (the body is then checked against it first).
    let mut p = parts.clone();
    set(
        &mut p,
        "content-digest",
        &keyproof_stepup::digest::content_digest(b"other"),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::DigestMismatch);
    // Matching the new body, but not what was signed.
    assert_eq!(fx.verify(&p, b"other", ROUTE, NOW), Outcome::BadSignature);
    // Only another algorithm: no sha-256 member.
    let mut p = parts.clone();
    set(&mut p, "content-digest", "sha-512=:AAAA:");
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    let mut p = parts.clone();
    set(&mut p, "content-digest", "sha-256=:AAAA:");
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
}

/// Encodes a 64-byte r||s ECDSA signature as DER (the X9.62 form).
fn der_signature(rs: &[u8]) -> Vec<u8> {
    fn int(x: &[u8]) -> Vec<u8> {
        let mut x: Vec<u8> = x.iter().copied().skip_while(|b| *b == 0).collect();
        if x.first().is_none_or(|b| *b & 0x80 != 0) {
            x.insert(0, 0);
        }
        let mut out = vec![0x02, x.len() as u8];
        out.extend(x);
        out
    }
    let mut body = int(&rs[..32]);
    body.extend(int(&rs[32..]));
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

#[test]
fn der_encoded_ecdsa_signature_is_bad_signature() {
    let (fx, parts) = signed_p256();
    let sig = get(&parts, "signature");
    let rs = STANDARD
        .decode(sig.trim_start_matches("stepup=:").trim_end_matches(':'))
        .expect("b64");
    assert_eq!(rs.len(), 64);
    let der = der_signature(&rs);
    let mut p = parts.clone();
    set(
        &mut p,
        "signature",
        &format!("stepup=:{}:", STANDARD.encode(&der)),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::BadSignature);
    // Garbage of the right length too.
    let mut p = parts.clone();
    set(
        &mut p,
        "signature",
        &format!("stepup=:{}:", STANDARD.encode([7u8; 64])),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::BadSignature);
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::Ok);
}

#[test]
fn alg_changed() {
    let (fx, parts) = signed_p256();
    let input = get(&parts, "signature-input");
    for alg in [
        "hmac-sha256",
        "ed25519",
        "ecdsa-p384-sha384",
        "rsa-pss-sha512",
        "",
    ] {
        let mut p = parts.clone();
        set(
            &mut p,
            "signature-input",
            &input.replace("alg=\"ecdsa-p256-sha256\"", &format!("alg=\"{alg}\"")),
        );
        assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::BadAlg, "{alg}");
    }
    // An Ed25519 peer claiming ECDSA.
    let ed = fixture(&ed25519());
    let parts = ed.signed("POST", URI, CT, BODY, ROUTE);
    let mut p = parts.clone();
    let input = get(&parts, "signature-input");
    set(
        &mut p,
        "signature-input",
        &input.replace("alg=\"ed25519\"", "alg=\"ecdsa-p256-sha256\""),
    );
    assert_eq!(ed.verify(&p, BODY, ROUTE, NOW), Outcome::BadAlg);
    assert_eq!(ed.verify(&parts, BODY, ROUTE, NOW), Outcome::Ok);
}

#[test]
fn another_keys_keyid() {
    let (fx, parts) = signed_p256();
    let input = get(&parts, "signature-input");
    let other = keyproof_stepup::Signer::from_pkcs8(&p256().pkcs8_der).expect("key");
    let mut p = parts.clone();
    set(
        &mut p,
        "signature-input",
        &input.replace(fx.signer.keyid(), other.keyid()),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::KeyidMismatch);
}

#[test]
fn created_far_past_or_future() {
    let fx = fixture(&p256());
    let skew = fx.verifier.config().max_clock_skew.as_secs();
    for created in [NOW - skew - 1, NOW + skew + 1, 0, NOW - 86_400] {
        let mut parts = request("POST", URI, CT);
        let ch = fx.challenge(&parts, ROUTE, NOW);
        fx.sign(&ch, &mut parts, BODY, created);
        assert_eq!(
            fx.verify(&parts, BODY, ROUTE, NOW),
            Outcome::Expired,
            "created={created}"
        );
    }
    // Inside the skew on both sides is fine.
    for created in [NOW - skew, NOW + skew] {
        let mut parts = request("POST", URI, CT);
        let ch = fx.challenge(&parts, ROUTE, NOW);
        fx.sign(&ch, &mut parts, BODY, created);
        assert_eq!(
            fx.verify(&parts, BODY, ROUTE, NOW),
            Outcome::Ok,
            "created={created}"
        );
    }
}

#[test]
fn two_signature_input_members() {
    let (fx, parts) = signed_p256();
    let input = get(&parts, "signature-input");
    let sig = get(&parts, "signature");
    // Same label twice (sfv alone would keep the last one silently).
    let mut p = parts.clone();
    set(&mut p, "signature-input", &format!("{input}, {input}"));
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    // A second field line with another label.
    let mut p = parts.clone();
    p.headers.append(
        "signature-input",
        http::HeaderValue::from_static(r#"other=("@method");created=1"#),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    // Two signatures.
    let mut p = parts.clone();
    set(&mut p, "signature", &format!("{sig}, other=:AAAA:"));
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    // Only another label.
    let mut p = parts.clone();
    set(
        &mut p,
        "signature-input",
        &input.replacen("stepup=", "sig1=", 1),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
}

#[test]
fn oversized_headers() {
    let (fx, parts) = signed_p256();
    let input = get(&parts, "signature-input");
    let sig = get(&parts, "signature");
    let mut p = parts.clone();
    set(
        &mut p,
        "signature-input",
        &format!("{input};x=\"{}\"", "a".repeat(2000)),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    let mut p = parts.clone();
    set(
        &mut p,
        "signature",
        &format!("{sig};x=\"{}\"", "a".repeat(600)),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    let mut p = parts.clone();
    for _ in 0..200 {
        p.headers
            .append("signature", http::HeaderValue::from_static("x=1"));
    }
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    let mut p = parts.clone();
    set(
        &mut p,
        "content-digest",
        &format!("sha-256=:{}:", "A".repeat(2000)),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
    let mut p = parts.clone();
    set(&mut p, "stepup-binding", &format!(":{}:", "A".repeat(200)));
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::Malformed);
}

#[test]
fn malformed_profiles() {
    let (fx, parts) = signed_p256();
    let input = get(&parts, "signature-input");
    let cases = [
        ("wrong tag", input.replace("stepup-v1", "stepup-v2")),
        ("no tag", input.replace(";tag=\"stepup-v1\"", "")),
        ("no created", input.replace(&format!(";created={NOW}"), "")),
        (
            "created as string",
            input.replace(&format!("created={NOW}"), &format!("created=\"{NOW}\"")),
        ),
        ("unknown param", format!("{input};foo=1")),
        (
            "component param",
            input.replace("\"@path\"", "\"@path\";sf"),
        ),
        (
            "extra component",
            input.replace("\"@method\"", "\"@method\" \"@target-uri\""),
        ),
        (
            "duplicate component",
            input.replace("\"@method\"", "\"@method\" \"@method\""),
        ),
        ("missing component", input.replace("\"stepup-binding\"", "")),
        ("not a list", "stepup=\"x\";tag=\"stepup-v1\"".to_string()),
        ("syntax", input.replace('(', "[")),
    ];
    for (what, value) in cases {
        let mut p = parts.clone();
        set(&mut p, "signature-input", &value);
        assert_eq!(
            fx.verify(&p, BODY, ROUTE, NOW),
            Outcome::Malformed,
            "{what}"
        );
    }
    let mut p = parts.clone();
    p.headers.remove("signature");
    assert_eq!(
        fx.verify(&p, BODY, ROUTE, NOW),
        Outcome::Malformed,
        "signature missing"
    );
    let mut p = parts.clone();
    p.headers.remove("stepup-binding");
    assert_eq!(
        fx.verify(&p, BODY, ROUTE, NOW),
        Outcome::Malformed,
        "binding missing"
    );
    let mut p = parts.clone();
    set(
        &mut p,
        "stepup-binding",
        &format!(":{}:", STANDARD.encode([0x5a; 31])),
    );
    assert_eq!(
        fx.verify(&p, BODY, ROUTE, NOW),
        Outcome::Malformed,
        "binding length"
    );
    let mut p = parts.clone();
    set(&mut p, "signature", "stepup=\"notbytes\"");
    assert_eq!(
        fx.verify(&p, BODY, ROUTE, NOW),
        Outcome::Malformed,
        "signature type"
    );
}

#[test]
fn binding_mismatch() {
    let (fx, parts) = signed_p256();
    let mut p = parts.clone();
    set(
        &mut p,
        "stepup-binding",
        &format!(":{}:", STANDARD.encode([0x5b; 32])),
    );
    assert_eq!(fx.verify(&p, BODY, ROUTE, NOW), Outcome::BindingMismatch);
}

#[test]
fn channel_binding_off_skips_only_the_comparison() {
    let w = p256();
    let fx = fixture_with(
        &w,
        StepUpConfig {
            channel_binding: false,
            ..StepUpConfig::default()
        },
    );
    let parts = fx.signed("POST", URI, CT, BODY, ROUTE);
    let no_exporter = Peer::from_cert_der(&w.cert_der, None).expect("peer");
    let view = RequestView::from_parts(&parts);
    assert_eq!(
        fx.verifier.verify(&no_exporter, ROUTE, &view, BODY, NOW),
        Outcome::Ok
    );
}

#[test]
fn full_table_fails_closed_globally_and_per_peer() {
    let w = p256();
    let cfg = StepUpConfig {
        max_outstanding: 4,
        max_outstanding_per_peer: 2,
        ..StepUpConfig::default()
    };
    let fx = fixture_with(&w, cfg);
    let other = p256();
    let other_peer = Peer::from_cert_der(&other.cert_der, Some(fx.exporter)).expect("peer");
    let third = p256();
    let third_peer = Peer::from_cert_der(&third.cert_der, Some(fx.exporter)).expect("peer");

    let mut parts = request("POST", URI, CT);
    let ch = fx.challenge(&parts, ROUTE, NOW);
    let _second = fx.challenge(&parts, ROUTE, NOW);
    // Per peer: 429.
    assert!(matches!(
        fx.verifier.challenge(&fx.peer, ROUTE, true, None, NOW),
        Err(IssueError::PeerFull { .. })
    ));
    fx.verifier
        .challenge(&other_peer, ROUTE, true, None, NOW)
        .expect("other 1");
    fx.verifier
        .challenge(&other_peer, ROUTE, true, None, NOW)
        .expect("other 2");
    // Global: 503 with Retry-After; nothing was evicted to make room.
    match fx.verifier.challenge(&third_peer, ROUTE, true, None, NOW) {
        Err(IssueError::GlobalFull { retry_after_secs }) => assert_eq!(retry_after_secs, 30),
        other => panic!("expected GlobalFull, got {other:?}"),
    }
    assert_eq!(fx.verifier.outstanding(), 4);
    // The live nonce still works, and using it frees a slot.
    fx.sign(&ch, &mut parts, BODY, NOW);
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::Ok);
    fx.verifier
        .challenge(&third_peer, ROUTE, true, None, NOW)
        .expect("room again");
    // After expiry, a full table purges and issues again.
    let later = NOW + 31;
    fx.verifier
        .challenge(&third_peer, ROUTE, true, None, later)
        .expect("purged");
    assert_eq!(fx.verifier.outstanding(), 1);
}

#[test]
fn one_identitys_keys_share_its_per_peer_bound() {
    // Replicas and renewals of one SPIFFE ID hold different keys; each key
    // must not bring a share of its own (the wire format bounds the table
    // per peer identity).
    let w = p256();
    let cfg = StepUpConfig {
        max_outstanding: 100,
        max_outstanding_per_peer: 2,
        ..StepUpConfig::default()
    };
    let fx = fixture_with(&w, cfg);
    const ID: &str = "spiffe://example.org/ns/shop/sa/web";
    let keys: Vec<_> = (0..3).map(|_| p256()).collect();
    let peers: Vec<Peer> = keys
        .iter()
        .map(|k| {
            Peer::from_cert_der(&k.cert_der, Some(fx.exporter))
                .expect("peer")
                .bounded_as(ID)
        })
        .collect();
    fx.verifier
        .challenge(&peers[0], ROUTE, true, None, NOW)
        .expect("first");
    fx.verifier
        .challenge(&peers[1], ROUTE, true, None, NOW)
        .expect("second, another key");
    for p in &peers {
        assert!(
            matches!(
                fx.verifier.challenge(p, ROUTE, true, None, NOW),
                Err(IssueError::PeerFull { .. })
            ),
            "every key of the identity is over its bound"
        );
    }
    // Another identity still gets its own share.
    let other = Peer::from_cert_der(&keys[2].cert_der, Some(fx.exporter))
        .expect("peer")
        .bounded_as("spiffe://example.org/ns/shop/sa/api");
    fx.verifier
        .challenge(&other, ROUTE, true, None, NOW)
        .expect("another identity");
    assert_eq!(fx.verifier.outstanding(), 3);
}

#[test]
fn restarted_verifier_refuses_old_nonces() {
    let (fx, parts) = signed_p256();
    let restarted = Verifier::new(StepUpConfig::default()).expect("verifier");
    let view = RequestView::from_parts(&parts);
    assert_eq!(
        restarted.verify(&fx.peer, ROUTE, &view, BODY, NOW),
        Outcome::BadNonce
    );
}

#[test]
fn thousand_concurrent_replays_exactly_one_ok() {
    let (fx, parts) = signed_p256();
    const THREADS: usize = 8;
    const ATTEMPTS: usize = 1000;
    let ok = AtomicUsize::new(0);
    let replay = AtomicUsize::new(0);
    let other = AtomicUsize::new(0);
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (fx, parts, ok, replay, other, barrier) =
                (&fx, &parts, &ok, &replay, &other, &barrier);
            s.spawn(move || {
                barrier.wait();
                let mut i = t;
                while i < ATTEMPTS {
                    match fx.verify(parts, BODY, ROUTE, NOW) {
                        Outcome::Ok => ok.fetch_add(1, Ordering::SeqCst),
                        Outcome::Replay => replay.fetch_add(1, Ordering::SeqCst),
                        _ => other.fetch_add(1, Ordering::SeqCst),
                    };
                    i += THREADS;
                }
            });
        }
    });
    assert_eq!(ok.load(Ordering::SeqCst), 1);
    assert_eq!(replay.load(Ordering::SeqCst), 999);
    assert_eq!(other.load(Ordering::SeqCst), 0);
}

#[test]
fn a_body_that_arrives_after_its_nonce_expired_is_refused_and_uses_the_nonce_up() {
    let (fx, parts) = signed_p256();
    let view = RequestView::from_parts(&parts);
    let pending = fx
        .verifier
        .begin(&fx.peer, ROUTE, &view, NOW)
        .expect("headers ok");
    let late = pending.nonce_expires_at() + 1;
    assert_eq!(pending.finish(BODY, late), Outcome::Expired);
    assert_eq!(fx.verify(&parts, BODY, ROUTE, NOW), Outcome::Replay);
}

#[test]
fn two_phase_api_checks_headers_before_the_body() {
    let (fx, parts) = signed_p256();
    let view = RequestView::from_parts(&parts);
    let pending = fx
        .verifier
        .begin(&fx.peer, ROUTE, &view, NOW)
        .expect("headers ok");
    assert_eq!(pending.max_body(), 1024 * 1024);
    assert!(pending.signature_base().starts_with(b"\"@method\": POST\n"));
    assert_eq!(
        pending.finish_with_body_sha256(&keyproof_stepup::digest::sha256(BODY), NOW),
        Outcome::Ok
    );
    // A bad nonce is known before any body is read.
    let err = fx
        .verifier
        .begin(&fx.peer, "/elsewhere", &view, NOW)
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err, Outcome::BadNonce);
}

#[test]
fn a_closed_connections_unused_nonces_are_withdrawn_and_its_used_ones_left_alone() {
    let w = p256();
    let cfg = StepUpConfig {
        max_outstanding: 100,
        max_outstanding_per_peer: 4,
        ..StepUpConfig::default()
    };
    let fx = fixture_with(&w, cfg);
    let mut used = request("POST", URI, CT);
    let ch = fx.challenge(&used, ROUTE, NOW);
    let mut kept = request("POST", URI, CT);
    let kept_ch = fx.challenge(&kept, ROUTE, NOW);
    let _third = fx.challenge(&kept, ROUTE, NOW);
    fx.sign(&ch, &mut used, BODY, NOW);
    assert_eq!(fx.verify(&used, BODY, ROUTE, NOW), Outcome::Ok);
    assert_eq!(fx.verifier.outstanding(), 2);
    // The connection is gone: its two unused nonces stop counting against
    // the caller at once, not when they expire.
    assert_eq!(fx.verifier.withdraw_issued(&fx.peer), 2);
    assert_eq!(fx.verifier.outstanding(), 0);
    assert_eq!(fx.verifier.withdraw_issued(&fx.peer), 0, "nothing twice");
    // A withdrawn nonce is spent: it can never be used.
    fx.sign(&kept_ch, &mut kept, BODY, NOW);
    assert_eq!(fx.verify(&kept, BODY, ROUTE, NOW), Outcome::Replay);
    // A connection tracks no more than the per-peer bound allows: the
    // caller can again hold four.
    for i in 0..4 {
        fx.verifier
            .challenge(&fx.peer, ROUTE, true, None, NOW)
            .unwrap_or_else(|e| panic!("challenge {i}: {e}"));
    }
    assert_eq!(fx.verifier.withdraw_issued(&fx.peer), 4);
}
