//! x509-limbo path-validation cases through keyproof's chain verifier
//! (`keyproof_identity::verify::verify_path`, the path-validation half of the
//! `SvidVerifier` the proxy uses for every peer).
//!
//! Skipped, because the verifier does not do what they test: peer-name
//! matching (SPIFFE authorizes by URI SAN, not DNS/IP/CN names), maximum chain
//! depth, and key-usage-only cases. Every other case must agree with
//! `expected_result`, except the deliberate disagreements listed below, and
//! the list must be exact: a case that starts agreeing fails the test too, so
//! the list never goes stale.

use std::collections::BTreeMap;
use std::path::PathBuf;

use keyproof_identity::keys::certs_from_pem;
use keyproof_identity::verify::{verify_path, TrustBundle};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::Value;

const NO_CRL: &str =
    "no CRL checking: SVIDs are short-lived and revoked by expiry, as SPIFFE recommends";
const AKI_SKI: &str =
    "webpki builds paths by name and signature and does not require or cross-check AKI/SKI \
     (RFC 5280 SHOULDs); keyproof-ca always writes both";
const ANCHOR: &str =
    "a trust anchor is a configured name and key: webpki does not re-validate its extensions \
     (keyproof adds only the anchor validity-period check)";
const SERIAL: &str = "serial-number encoding is not validated (pedantic)";
const EMAIL_NC: &str = "rfc822Name constraints are not evaluated and make webpki fail closed; SVIDs carry no email names";
const DN_NC: &str = "directoryName constraints are not evaluated and make webpki fail closed";
const NC_LENIENT: &str =
    "webpki accepts a name-constraints encoding or placement that RFC 5280 forbids; \
     the constraints still apply to every name";
const STRICTER: &str =
    "webpki is stricter here and fails closed (no self-issued exemption, no constraints in leaves)";
const CA_LEAF: &str = "a CA certificate is never accepted as an end entity; the X.509-SVID rules forbid cA=true leaves too";
const SAN_SYNTAX: &str =
    "DNS/IP SAN syntax is checked only when matching a peer name; SPIFFE authorizes by the URI SAN";
const LEAF_KU: &str = "path validation ignores key usage; the X.509-SVID rules reject a keyCertSign leaf (asserted below)";
const EKU: &str = "pedantic EKU expectations rustls-webpki does not enforce; an X.509-SVID may omit EKU (SPIFFE X.509-SVID §4.4)";
const WEAK_KEY: &str = "checked at the handshake instead: rustls verifies CertificateVerify only with P-256/P-384/Ed25519 \
     and RSA 2048-8192 keys, so such a leaf cannot complete a handshake";

/// Cases where keyproof deliberately differs from x509-limbo, and why.
const DISAGREEMENTS: &[(&str, &str)] = &[
    ("crl::crlnumber-critical", NO_CRL),
    ("crl::crlnumber-missing", NO_CRL),
    ("crl::issuer-missing-crlsign", NO_CRL),
    ("crl::revoked-certificate-with-crl", NO_CRL),
    ("pathlen::self-issued-certs-pathlen", STRICTER),
    ("pathlen::validation-ignores-pathlen-in-leaf", STRICTER),
    ("pathological::nc-dos-3", "the chain stays within webpki's name-constraint work budget, so it is judged on its merits"),
    ("rfc5280::aki::critical-aki", AKI_SKI),
    ("rfc5280::aki::cross-signed-root-missing-aki", AKI_SKI),
    ("rfc5280::aki::intermediate-missing-aki", AKI_SKI),
    ("rfc5280::aki::leaf-missing-aki", AKI_SKI),
    ("rfc5280::ca-as-leaf", CA_LEAF),
    ("rfc5280::ca-empty-subject", "an empty CA subject is not rejected; keyproof-ca never issues one"),
    ("rfc5280::leaf-ku-keycertsign", LEAF_KU),
    ("rfc5280::nc::invalid-dnsname-leading-period", NC_LENIENT),
    ("rfc5280::nc::nc-permits-email-domain", EMAIL_NC),
    ("rfc5280::nc::nc-permits-email-exact", EMAIL_NC),
    ("rfc5280::nc::nc-permits-email-literal-asterisk-exact-match", EMAIL_NC),
    ("rfc5280::nc::nc-permits-email-literal-double-asterisk", EMAIL_NC),
    ("rfc5280::nc::nc-permits-email-literal-mid-asterisk", EMAIL_NC),
    ("rfc5280::nc::not-allowed-in-ee-critical", NC_LENIENT),
    ("rfc5280::nc::not-allowed-in-ee-noncritical", NC_LENIENT),
    ("rfc5280::nc::permitted-dn-match", DN_NC),
    ("rfc5280::nc::permitted-dns-match-noncritical", NC_LENIENT),
    ("rfc5280::nc::permitted-self-issued", STRICTER),
    ("rfc5280::pc::ica-noncritical-pc", "certificate policies are not processed"),
    ("rfc5280::root-inconsistent-ca-extensions", ANCHOR),
    ("rfc5280::root-missing-basic-constraints", ANCHOR),
    ("rfc5280::root-non-critical-basic-constraints", ANCHOR),
    ("rfc5280::san::ip-in-dns", SAN_SYNTAX),
    ("rfc5280::san::noncritical-with-empty-subject", SAN_SYNTAX),
    ("rfc5280::san::underscore-dns", SAN_SYNTAX),
    ("rfc5280::serial::too-long", SERIAL),
    ("rfc5280::serial::zero", SERIAL),
    ("rfc5280::ski::critical-ski", AKI_SKI),
    ("rfc5280::ski::intermediate-missing-ski", AKI_SKI),
    ("rfc5280::ski::root-missing-ski", AKI_SKI),
    ("rfc5280::unknown-critical-extension-root", ANCHOR),
    ("webpki::aki::root-with-aki-all-fields", ANCHOR),
    ("webpki::aki::root-with-aki-authoritycertissuer", ANCHOR),
    ("webpki::aki::root-with-aki-authoritycertserialnumber", ANCHOR),
    ("webpki::aki::root-with-aki-missing-keyidentifier", ANCHOR),
    ("webpki::aki::root-with-aki-ski-mismatch", ANCHOR),
    ("webpki::eku::ee-anyeku", EKU),
    ("webpki::eku::ee-critical-eku", EKU),
    ("webpki::eku::ee-without-eku", EKU),
    ("webpki::eku::root-has-eku", EKU),
    ("webpki::forbidden-dsa-leaf", WEAK_KEY),
    ("webpki::forbidden-p192-leaf", WEAK_KEY),
    ("webpki::forbidden-rsa-key-not-divisible-by-8-in-leaf", WEAK_KEY),
    ("webpki::forbidden-rsa-not-divisible-by-8-in-root", ANCHOR),
    ("webpki::forbidden-weak-rsa-in-leaf", WEAK_KEY),
    ("webpki::malformed-aia", "AIA is never fetched, so its encoding is not checked"),
    ("webpki::nc::intermediate-permitted-excluded-subtrees-both-empty-sequences", NC_LENIENT),
    ("webpki::nc::intermediate-permitted-excluded-subtrees-both-null", NC_LENIENT),
];

fn limbo_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/x509-limbo/limbo.json")
}

fn is_skipped(case: &Value) -> Option<&'static str> {
    let id = case["id"].as_str().unwrap_or_default();
    if id.starts_with("webpki::cn::")
        || id.starts_with("webpki::san::")
        || id == "rfc5280::ca-as-leaf-wrong-san"
    {
        return Some("peer-name");
    }
    if !case["max_chain_depth"].is_null() {
        return Some("max-depth");
    }
    if case["signature_algorithms"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        return Some("signature-algorithm");
    }
    if case["key_usage"].as_array().is_some_and(|a| !a.is_empty()) {
        return Some("key-usage");
    }
    None
}

fn pem_list(v: &Value) -> Vec<CertificateDer<'static>> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .flat_map(|p| certs_from_pem(p.as_bytes()).unwrap_or_default())
        .collect()
}

/// Runs one case; `true` means the chain validated.
fn validates(case: &Value) -> bool {
    let roots = pem_list(&case["trusted_certs"]);
    let Ok(bundle) = TrustBundle::new(roots) else {
        return false;
    };
    let intermediates = pem_list(&case["untrusted_intermediates"]);
    let Some(leaf) = case["peer_certificate"]
        .as_str()
        .and_then(|p| certs_from_pem(p.as_bytes()).ok())
        .and_then(|mut v| (!v.is_empty()).then(|| v.swap_remove(0)))
    else {
        return false;
    };
    let now = match case["validation_time"].as_str() {
        Some(t) => {
            let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .expect("validation_time is RFC 3339");
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.unix_timestamp() as u64))
        }
        None => UnixTime::now(),
    };
    let ekus: Vec<&str> = case["extended_key_usage"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str())
        .collect();
    let usage = match (ekus.as_slice(), case["validation_kind"].as_str()) {
        (["clientAuth"], _) | ([], Some("CLIENT")) => webpki::KeyUsage::client_auth(),
        _ => webpki::KeyUsage::server_auth(),
    };
    verify_path(&bundle, &leaf, &intermediates, now, usage).is_ok()
}

#[test]
fn x509_limbo_chain_validation_agrees() {
    let text = std::fs::read_to_string(limbo_path()).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the shared test data lives beside the checkout in ../shared)",
            limbo_path().display()
        )
    });
    let doc: Value = serde_json::from_str(&text).expect("limbo.json parses");
    let cases = doc["testcases"].as_array().expect("testcases");
    let mut skipped: BTreeMap<&str, usize> = BTreeMap::new();
    let mut applied = 0;
    let mut disagree: Vec<String> = Vec::new();
    for case in cases {
        if let Some(why) = is_skipped(case) {
            *skipped.entry(why).or_default() += 1;
            continue;
        }
        applied += 1;
        let want = case["expected_result"].as_str() == Some("SUCCESS");
        if validates(case) != want {
            disagree.push(case["id"].as_str().unwrap_or_default().to_owned());
        }
    }
    eprintln!(
        "x509-limbo: {} cases, {applied} applied, skipped {skipped:?}",
        cases.len()
    );
    disagree.sort();
    let mut expected: Vec<String> = DISAGREEMENTS.iter().map(|(id, _)| id.to_string()).collect();
    expected.sort();
    assert_eq!(
        disagree, expected,
        "disagreements with x509-limbo changed (left: actual, right: the documented list)"
    );
    assert!(applied >= 160, "only {applied} cases applied");
    for (id, why) in DISAGREEMENTS {
        assert!(!why.is_empty(), "{id} needs a reason");
    }

    // The one disagreement the SVID layer closes: a keyCertSign leaf.
    let case = cases
        .iter()
        .find(|c| c["id"] == "rfc5280::leaf-ku-keycertsign")
        .expect("case present");
    let leaf = certs_from_pem(
        case["peer_certificate"]
            .as_str()
            .unwrap_or_default()
            .as_bytes(),
    )
    .expect("leaf parses");
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf[0]).expect("leaf parses");
    assert!(keyproof_identity::svid::leaf_violations(&parsed)
        .contains(&keyproof_identity::svid::SvidError::LeafKeyCertSign));
}
