//! Sign -> verify round trips for both algorithms, the challenge's exact wire
//! form, steady state, and the signer's refusals.
mod common;

use common::*;
use keyproof_stepup::{Challenge, Outcome, RequestView, SignError, SignRefusal, Signer};

#[test]
fn round_trip_both_algorithms_with_and_without_content_type() {
    for (name, w) in [("p256", p256()), ("ed25519", ed25519())] {
        let fx = fixture(&w);
        for (ct, body) in [
            (Some("application/json"), &br#"{"a":1}"#[..]),
            (None, &b""[..]),
        ] {
            for uri in ["/admin/rotate?x=1&y=%20", "/admin", "/"] {
                let parts = fx.signed("POST", uri, ct, body, ROUTE);
                assert_eq!(
                    fx.verify(&parts, body, ROUTE, NOW + 5),
                    Outcome::Ok,
                    "{name} {uri} {ct:?}"
                );
                assert_eq!(
                    fx.verify(&parts, body, ROUTE, NOW + 5),
                    Outcome::Replay,
                    "{name} {uri}"
                );
            }
        }
    }
}

#[test]
fn challenge_wire_format_is_exact() {
    let fx = fixture(&p256());
    let ch = fx
        .verifier
        .challenge(&fx.peer, ROUTE, false, None, NOW)
        .expect("challenge");
    assert_eq!(ch.www_authenticate, "StepUp error=\"stepup_required\"");
    assert_eq!(ch.cache_control, "no-store");
    let accept = ch.accept_signature.to_str().expect("text").to_string();
    let parsed = Challenge::parse(&accept).expect("parse").expect("member");
    assert_eq!(parsed.nonce.len(), 48);
    assert_eq!(
        accept,
        format!(
            "stepup=(\"@method\" \"@authority\" \"@path\" \"@query\" \"content-digest\" \"stepup-binding\");created;nonce=\"{}\";alg=\"ecdsa-p256-sha256\";keyid=\"{}\";tag=\"stepup-v1\"",
            parsed.nonce,
            fx.signer.keyid()
        )
    );
    let with_ct = fx
        .verifier
        .challenge(&fx.peer, ROUTE, true, Some(Outcome::BadNonce), NOW)
        .expect("challenge");
    assert_eq!(with_ct.www_authenticate, "StepUp error=\"bad_nonce\"");
    assert!(with_ct
        .accept_signature
        .to_str()
        .expect("text")
        .starts_with("stepup=(\"@method\" \"@authority\" \"@path\" \"@query\" \"content-type\" \"content-digest\" \"stepup-binding\");created;nonce=\""));
    let ed = fixture(&ed25519());
    let ch = ed
        .verifier
        .challenge(&ed.peer, ROUTE, false, None, NOW)
        .expect("challenge");
    assert!(ch
        .accept_signature
        .to_str()
        .expect("text")
        .contains(";alg=\"ed25519\";"));
    assert_eq!(ed.peer.key().keyid(), ed.signer.keyid());
}

#[test]
fn signed_request_wire_format() {
    let fx = fixture(&p256());
    let mut parts = request("POST", "/admin/rotate?x=1", Some("application/json"));
    let ch = fx.challenge(&parts, ROUTE, NOW);
    let signed = fx.sign(&ch, &mut parts, b"", NOW);
    assert_eq!(
        signed.content_digest,
        "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    );
    assert_eq!(
        signed.stepup_binding,
        ":WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo=:"
    );
    assert_eq!(
        signed.signature_input,
        format!(
            "stepup=(\"@method\" \"@authority\" \"@path\" \"@query\" \"content-type\" \"content-digest\" \"stepup-binding\");created={NOW};nonce=\"{}\";alg=\"ecdsa-p256-sha256\";keyid=\"{}\";tag=\"stepup-v1\"",
            ch.nonce,
            fx.signer.keyid()
        )
    );
    let sig = signed.signature.to_str().expect("text");
    assert!(
        sig.starts_with("stepup=:") && sig.ends_with(':') && sig.len() == "stepup=::".len() + 88
    );
}

#[test]
fn verifier_never_reorders_parameters() {
    // A signer (another RFC 9421 implementation) that orders parameters and
    // components differently still verifies: the base uses the order received.
    let fx = fixture(&ed25519());
    let mut parts = request("GET", "/admin?q", None);
    let ch = fx.challenge(&parts, ROUTE, NOW);
    let view = RequestView::from_parts(&parts);
    let ours = fx
        .signer
        .sign(&ch, &view, b"", &fx.exporter, NOW)
        .expect("sign");
    let digest = ours.content_digest.to_str().expect("text").to_string();
    let binding = ours.stepup_binding.to_str().expect("text").to_string();
    let params = format!(
        "(\"stepup-binding\" \"content-digest\" \"@query\" \"@path\" \"@authority\" \"@method\");tag=\"stepup-v1\";keyid=\"{}\";alg=\"ed25519\";nonce=\"{}\";created={NOW}",
        fx.signer.keyid(),
        ch.nonce
    );
    let base = format!(
        "\"stepup-binding\": {binding}\n\"content-digest\": {digest}\n\"@query\": ?q\n\"@path\": /admin\n\"@authority\": payments.default.svc\n\"@method\": GET\n\"@signature-params\": {params}"
    );
    let sig = fx.signer.sign_raw(base.as_bytes()).expect("sign");
    set(&mut parts, "content-digest", &digest);
    set(&mut parts, "stepup-binding", &binding);
    set(&mut parts, "signature-input", &format!("stepup={params}"));
    use base64::Engine;
    set(
        &mut parts,
        "signature",
        &format!(
            "stepup=:{}:",
            base64::engine::general_purpose::STANDARD.encode(sig)
        ),
    );
    assert_eq!(fx.verify(&parts, b"", ROUTE, NOW), Outcome::Ok);
}

#[test]
fn steady_state_nonce_from_a_successful_response() {
    let fx = fixture(&p256());
    let parts = fx.signed("POST", "/admin/a", None, b"1", ROUTE);
    assert_eq!(fx.verify(&parts, b"1", ROUTE, NOW), Outcome::Ok);
    // The success response carries the next nonce.
    let next = fx
        .verifier
        .challenge(&fx.peer, ROUTE, false, None, NOW)
        .expect("next");
    let mut resp = http::HeaderMap::new();
    next.apply_next(&mut resp);
    assert!(resp.get("www-authenticate").is_none());
    assert_eq!(resp.get("cache-control").expect("cc"), "no-store");
    let ch = Challenge::from_headers(&resp)
        .expect("parse")
        .expect("member");
    // Next request differs (has a Content-Type): still signable up front.
    let mut parts = request("PUT", "/admin/b", Some("text/plain"));
    fx.sign(&ch, &mut parts, b"2", NOW + 1);
    assert_eq!(fx.verify(&parts, b"2", ROUTE, NOW + 1), Outcome::Ok);
    keyproof_stepup::strip_stepup_headers(&mut parts.headers);
    for h in [
        "signature",
        "signature-input",
        "stepup-binding",
        "accept-signature",
    ] {
        assert!(parts.headers.get(h).is_none());
    }
    assert!(parts.headers.get("content-digest").is_some());
}

#[test]
fn signer_refuses_foreign_keyid_and_wrong_alg() {
    let fx = fixture(&p256());
    let parts = request("POST", "/admin", None);
    let ch = fx.challenge(&parts, ROUTE, NOW);
    let view = RequestView::from_parts(&parts);
    let try_sign = |c: &Challenge| fx.signer.sign(c, &view, b"", &fx.exporter, NOW).map(|_| ());

    let mut foreign = ch.clone();
    foreign.keyid = Signer::from_pkcs8(&p256().pkcs8_der)
        .expect("key")
        .keyid()
        .to_string();
    assert_eq!(
        try_sign(&foreign),
        Err(SignError::Refused(SignRefusal::KeyidMismatch))
    );
    for alg in ["ed25519", "hmac-sha256", "rsa-v1_5-sha256", ""] {
        let mut c = ch.clone();
        c.alg = alg.to_string();
        assert_eq!(
            try_sign(&c),
            Err(SignError::Refused(SignRefusal::AlgMismatch)),
            "{alg}"
        );
    }
    let mut c = ch.clone();
    c.tag = "other".into();
    assert_eq!(try_sign(&c), Err(SignError::Refused(SignRefusal::WrongTag)));
    let mut c = ch.clone();
    c.components.push("authorization".into());
    assert_eq!(
        try_sign(&c),
        Err(SignError::Refused(SignRefusal::UnexpectedComponents))
    );
    assert_eq!(SignRefusal::KeyidMismatch.as_str(), "keyid_mismatch");

    // An Ed25519 signer refuses an ECDSA challenge.
    let ed = fixture(&ed25519());
    assert_eq!(ed.signer.check(&ch), Err(SignRefusal::AlgMismatch));
    assert!(try_sign(&ch).is_ok());
}

#[test]
fn challenge_parsing_and_detection() {
    assert_eq!(
        Challenge::parse("other=(\"@method\")").expect("parse"),
        None
    );
    assert!(Challenge::parse("stepup=(").is_err());
    assert!(Challenge::parse("stepup=(\"@method\");alg=\"ed25519\"").is_err());
    let mut h = http::HeaderMap::new();
    h.insert(
        "www-authenticate",
        http::HeaderValue::from_static("StepUp error=\"bad_nonce\""),
    );
    assert!(keyproof_stepup::is_stepup_challenge(
        http::StatusCode::UNAUTHORIZED,
        &h
    ));
    assert!(!keyproof_stepup::is_stepup_challenge(
        http::StatusCode::FORBIDDEN,
        &h
    ));
    h.insert("www-authenticate", http::HeaderValue::from_static("Bearer"));
    assert!(!keyproof_stepup::is_stepup_challenge(
        http::StatusCode::UNAUTHORIZED,
        &h
    ));
}

#[test]
fn key_loading() {
    let w = p256();
    let other = p256();
    assert!(Signer::from_pkcs8_and_cert(&w.pkcs8_der, &other.cert_der).is_err());
    assert!(Signer::from_pkcs8(b"not a key").is_err());
    assert!(keyproof_stepup::PeerKey::from_cert_der(b"\x30\x03\x02\x01\x01").is_err());
    let rsa_like = keyproof_stepup::PeerKey::from_spki_der(&[
        0x30, 0x0a, 0x30, 0x03, 0x06, 0x01, 0x00, 0x03, 0x03, 0x00, 0x01, 0x02,
    ]);
    assert_eq!(
        rsa_like.unwrap_err(),
        keyproof_stepup::KeyError::UnsupportedKey
    );
    let key = keyproof_stepup::PeerKey::from_cert_der(&w.cert_der).expect("peer");
    assert_eq!(
        key.keyid(),
        Signer::from_pkcs8(&w.pkcs8_der).expect("key").keyid()
    );
}
