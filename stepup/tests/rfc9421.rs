//! RFC 9421 Appendix B test vectors: B.2.6 (Ed25519) signed byte for byte,
//! B.2.4 (ECDSA P-256) verified. Keys and values from RFC 9421 B.1.3/B.1.4/B.2.
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::Request;
use keyproof_stepup::base::{request_signature_base, serialize_signature_params, signature_base};
use keyproof_stepup::{PeerKey, RequestView, Signer};
use sfv::{Dictionary, ListEntry, Parser};

/// RFC 9421 B.1.4 test-key-ed25519, private key (PKCS#8).
const ED25519_PKCS8: &str = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF";
/// RFC 9421 B.1.4 test-key-ed25519, public key (SPKI).
const ED25519_SPKI: &str = "MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=";
/// RFC 9421 B.1.3 test-key-ecc-p256, public key (SPKI).
const P256_SPKI: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqIVYZVLCrPZHGHjP17CTW0/+D9Lfw0EkjqF7xB4FivAxzic30tMM4GF+hR6Dxh71Z50VGGdldkkDXZCnTNnoXQ==";

const B26_INPUT: &str = r#"sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519""#;
const B26_SIGNATURE: &str =
    "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==:";
const B26_BASE: &str = concat!(
    "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n",
    "\"@method\": POST\n",
    "\"@path\": /foo\n",
    "\"@authority\": example.com\n",
    "\"content-type\": application/json\n",
    "\"content-length\": 18\n",
    "\"@signature-params\": (\"date\" \"@method\" \"@path\" \"@authority\" \"content-type\" \"content-length\");created=1618884473;keyid=\"test-key-ed25519\""
);

const B24_INPUT: &str = r#"sig-b24=("@status" "content-type" "content-digest" "content-length");created=1618884473;keyid="test-key-ecc-p256""#;
const B24_SIGNATURE: &str =
    "sig-b24=:wNmSUAhwb5LxtOtOpNa6W5xj067m5hFrj0XQ4fvpaCLx0NKocgPquLgyahnzDnDAUy5eCdlYUEkLIj+32oiasw==:";

fn member(input: &str, label: &str) -> sfv::InnerList {
    let d: Dictionary = Parser::new(input).parse().expect("signature-input");
    match d.get(label) {
        Some(ListEntry::InnerList(il)) => il.clone(),
        _ => panic!("no inner list"),
    }
}

fn signature_bytes(sig: &str, label: &str) -> Vec<u8> {
    let d: Dictionary = Parser::new(sig).parse().expect("signature");
    match d.get(label) {
        Some(ListEntry::Item(i)) => i.bare_item.as_byte_sequence().expect("bytes").to_vec(),
        _ => panic!("no item"),
    }
}

/// The B.2 test request (RFC 9421 §2.5 example / B.2).
fn b2_request() -> http::request::Parts {
    Request::builder()
        .method("POST")
        .uri("/foo?param=Value&Pet=dog")
        .header("host", "example.com")
        .header("date", "Tue, 20 Apr 2021 02:07:55 GMT")
        .header("content-type", "application/json")
        .header("content-digest", "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:")
        .header("content-length", "18")
        .body(())
        .expect("request")
        .into_parts()
        .0
}

#[test]
fn b26_ed25519_base_and_signature_byte_for_byte() {
    let parts = b2_request();
    let view = RequestView::from_parts(&parts);
    let base = request_signature_base(&view, &member(B26_INPUT, "sig-b26")).expect("base");
    assert_eq!(String::from_utf8(base.clone()).expect("utf8"), B26_BASE);

    let signer = Signer::from_pkcs8(&STANDARD.decode(ED25519_PKCS8).expect("b64")).expect("key");
    let sig = signer.sign_raw(&base).expect("sign");
    // Ed25519 is deterministic: the RFC's bytes exactly.
    assert_eq!(sig, signature_bytes(B26_SIGNATURE, "sig-b26"));
    let mut ser = sfv::DictSerializer::new();
    let _ = ser.bare_item(sfv::key_ref("sig-b26"), sig.as_slice());
    assert_eq!(ser.finish().expect("ser"), B26_SIGNATURE);

    // And it verifies with the published public key; keyid derivation works on it.
    let spki = STANDARD.decode(ED25519_SPKI).expect("b64");
    let key = PeerKey::from_spki_der(&spki).expect("spki");
    assert_eq!(key.alg().name(), "ed25519");
    assert_eq!(
        key.keyid(),
        signer.keyid(),
        "keyid from the private key's SPKI equals the public SPKI's"
    );
    assert!(key.verify(&base, &sig));
}

#[test]
fn b24_ecdsa_p256_verified() {
    // B.2.4 signs a response; @status is not a request component, so the
    // base is assembled from the RFC's component values with our builder.
    let m = member(B24_INPUT, "sig-b24");
    let params = serialize_signature_params(&m).expect("params");
    let base = signature_base(
        [
            ("@status", "200"),
            ("content-type", "application/json"),
            (
                "content-digest",
                "sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ41QJgJc4GTsPp29l5oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:",
            ),
            ("content-length", "23"),
        ],
        &params,
    );
    let expected_base = concat!(
        "\"@status\": 200\n",
        "\"content-type\": application/json\n",
        "\"content-digest\": sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ41QJgJc4GTsPp29l5oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:\n",
        "\"content-length\": 23\n",
        "\"@signature-params\": (\"@status\" \"content-type\" \"content-digest\" \"content-length\");created=1618884473;keyid=\"test-key-ecc-p256\""
    );
    assert_eq!(
        String::from_utf8(base.clone()).expect("utf8"),
        expected_base
    );

    let key = PeerKey::from_spki_der(&STANDARD.decode(P256_SPKI).expect("b64")).expect("spki");
    assert_eq!(key.alg().name(), "ecdsa-p256-sha256");
    let sig = signature_bytes(B24_SIGNATURE, "sig-b24");
    assert_eq!(sig.len(), 64, "RFC 9421 §3.3.4: r || s");
    assert!(key.verify(&base, &sig));
    // One flipped bit anywhere fails.
    let mut bad = base.clone();
    bad[3] ^= 1;
    assert!(!key.verify(&bad, &sig));
}
