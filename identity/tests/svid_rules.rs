//! Every X.509-SVID rule and every verifier outcome has a negative case here:
//! certificates are crafted with rcgen to break exactly one rule each.

use keyproof_identity::svid::{self, SvidError};
use keyproof_identity::verify::{SvidVerifier, TrustBundle, Usage, VerifyError};
use keyproof_identity::TrustDomain;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};

struct Chain {
    root: CertificateDer<'static>,
    int: CertificateDer<'static>,
    int_issuer: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str, path_len: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    p.not_after = OffsetDateTime::now_utc() + Duration::days(30);
    p
}

fn chain_with(int_params: CertificateParams) -> Chain {
    let root_key = KeyPair::generate().unwrap();
    let root = ca_params("root", 1).self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(ca_params("root", 1), root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut ip = int_params;
    ip.use_authority_key_identifier_extension = true;
    let int = ip.signed_by(&int_key, &root_issuer).unwrap();
    Chain {
        root: root.der().clone(),
        int: int.der().clone(),
        int_issuer: Issuer::new(ip, int_key),
    }
}

fn chain() -> Chain {
    chain_with(ca_params("intermediate", 0))
}

/// A valid leaf's parameters; tests break one thing at a time.
fn leaf_params(uri: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
    p.not_after = OffsetDateTime::now_utc() + Duration::hours(1);
    p
}

fn sign(c: &Chain, p: &CertificateParams) -> CertificateDer<'static> {
    let k = KeyPair::generate().unwrap();
    p.signed_by(&k, &c.int_issuer).unwrap().der().clone()
}

fn violations(der: &[u8]) -> Vec<SvidError> {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    svid::leaf_violations(&c)
}

const ID: &str = "spiffe://td.example/ns/default/sa/web";

#[test]
fn a_valid_leaf_passes_every_rule() {
    let c = chain();
    let leaf = sign(&c, &leaf_params(ID));
    assert_eq!(violations(&leaf), vec![]);
    let v = SvidVerifier::new(
        TrustDomain::parse("td.example").unwrap(),
        TrustBundle::new(vec![c.root.clone()]).unwrap(),
    );
    let ok = v
        .verify(
            &leaf,
            std::slice::from_ref(&c.int),
            UnixTime::now(),
            Usage::ClientAuth,
        )
        .unwrap();
    assert_eq!(ok.spiffe_id.as_str(), ID);
    // EKU absent is allowed.
    let mut p = leaf_params(ID);
    p.extended_key_usages.clear();
    assert_eq!(violations(&sign(&c, &p)), vec![]);
}

#[test]
fn each_leaf_rule_has_its_own_error() {
    let c = chain();
    let mut cases: Vec<(CertificateParams, SvidError)> = Vec::new();

    let mut p = leaf_params(ID);
    p.subject_alt_names = vec![SanType::DnsName("web.example".try_into().unwrap())];
    cases.push((p, SvidError::NoUriSan));

    let mut p = leaf_params(ID);
    p.subject_alt_names.push(SanType::URI(
        "spiffe://td.example/ns/other".try_into().unwrap(),
    ));
    cases.push((p, SvidError::MultipleUriSans(2)));

    let p = leaf_params("spiffe://td.example/a//b");
    cases.push((
        p,
        SvidError::InvalidSpiffeId(keyproof_identity::SpiffeIdError::EmptySegment),
    ));

    let p = leaf_params("spiffe://td.example");
    cases.push((p, SvidError::RootPathId("spiffe://td.example".into())));

    let mut p = leaf_params(ID);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    cases.push((p, SvidError::LeafIsCa));

    let mut p = leaf_params(ID);
    p.key_usages.clear();
    cases.push((p, SvidError::KeyUsageMissing));

    let mut p = leaf_params(ID);
    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    cases.push((p, SvidError::NoDigitalSignature));

    let mut p = leaf_params(ID);
    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    cases.push((p, SvidError::LeafKeyCertSign));

    let mut p = leaf_params(ID);
    p.key_usages.push(KeyUsagePurpose::CrlSign);
    cases.push((p, SvidError::LeafCrlSign));

    let mut p = leaf_params(ID);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    cases.push((p, SvidError::EkuNoServerAuth));

    let mut p = leaf_params(ID);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    cases.push((p, SvidError::EkuNoClientAuth));

    // Key usage present but not critical: rcgen always marks it critical, so
    // write the extension by hand (digitalSignature = bit 0).
    let mut p = leaf_params(ID);
    p.key_usages.clear();
    let mut ku = CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
    ku.set_criticality(false);
    p.custom_extensions.push(ku);
    cases.push((p, SvidError::KeyUsageNotCritical));

    for (params, want) in cases {
        let leaf = sign(&c, &params);
        let got = violations(&leaf);
        assert_eq!(got.first(), Some(&want), "all violations: {got:?}");
        // The verifier refuses it with the same rule.
        let v = SvidVerifier::new(
            TrustDomain::parse("td.example").unwrap(),
            TrustBundle::new(vec![c.root.clone()]).unwrap(),
        );
        let err = v
            .verify(
                &leaf,
                std::slice::from_ref(&c.int),
                UnixTime::now(),
                Usage::ClientAuth,
            )
            .unwrap_err();
        // A CA leaf and a leaf without clientAuth are refused by path
        // validation before the SVID rules run, under the same reason; the
        // latter chains, for the other purpose, so it says so.
        if want == SvidError::LeafIsCa {
            assert!(matches!(err, VerifyError::BadKeyUsage(_)), "{want}: {err}");
        } else if want == SvidError::EkuNoClientAuth {
            assert!(matches!(err, VerifyError::WrongPurpose(_)), "{want}: {err}");
        } else {
            assert_eq!(err, VerifyError::Svid(want.clone()), "{want}");
        }
        let reason = if want.is_key_usage() {
            "bad_key_usage"
        } else {
            "bad_identity"
        };
        assert_eq!(err.reason(), reason, "{want}");
    }
}

#[test]
fn only_p256_and_ed25519_leaf_keys_are_svids() {
    let c = chain();
    let v = SvidVerifier::new(
        TrustDomain::parse("td.example").unwrap(),
        TrustBundle::new(vec![c.root.clone()]).unwrap(),
    );
    let cases: [(&'static rcgen::SignatureAlgorithm, Option<&str>); 4] = [
        (&rcgen::PKCS_ECDSA_P256_SHA256, None),
        (&rcgen::PKCS_ED25519, None),
        (&rcgen::PKCS_ECDSA_P384_SHA384, Some("P-384")),
        (&rcgen::PKCS_RSA_SHA256, Some("RSA")),
    ];
    for (alg, refused) in cases {
        let key = if alg == &rcgen::PKCS_RSA_SHA256 {
            rsa_key(alg)
        } else {
            KeyPair::generate_for(alg).unwrap()
        };
        let leaf = leaf_params(ID)
            .signed_by(&key, &c.int_issuer)
            .unwrap()
            .der()
            .clone();
        for usage in [Usage::ClientAuth, Usage::ServerAuth] {
            let got = v.verify(&leaf, std::slice::from_ref(&c.int), UnixTime::now(), usage);
            match refused {
                None => assert!(got.is_ok(), "{alg:?}: {got:?}"),
                Some(name) => {
                    let err = got.unwrap_err();
                    assert!(
                        matches!(&err, VerifyError::Svid(SvidError::UnsupportedKey(m)) if m.contains(name)),
                        "{alg:?}: {err}"
                    );
                    assert_eq!(err.reason(), "unsupported_key");
                }
            }
        }
        let errs = violations(&leaf);
        assert_eq!(errs.len(), usize::from(refused.is_some()), "{errs:?}");
        if let Some(e) = errs.first() {
            assert_eq!(e.rule(), "key is ECDSA P-256 or Ed25519");
            assert_eq!(e.code(), "unsupported_key");
        }
    }
}

/// An RSA-2048 key pair (rcgen cannot generate RSA keys; aws-lc-rs can).
fn rsa_key(alg: &'static rcgen::SignatureAlgorithm) -> KeyPair {
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der =
        aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'_>>::as_der(&kp).unwrap();
    let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_ref().to_vec());
    KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, alg).unwrap()
}

#[test]
fn signing_certificate_rules() {
    // Intermediate without keyCertSign: the verifier names the signing rule.
    let mut p = ca_params("intermediate", 0);
    p.key_usages = vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let c = chain_with(p);
    let (_, int) = x509_parser::parse_x509_certificate(&c.int).unwrap();
    assert_eq!(
        svid::signing_violations(&int),
        vec![SvidError::SigningNoKeyCertSign]
    );
    let leaf = sign(&c, &leaf_params(ID));
    let v = SvidVerifier::new(
        TrustDomain::parse("td.example").unwrap(),
        TrustBundle::new(vec![c.root.clone()]).unwrap(),
    );
    assert_eq!(
        v.verify(
            &leaf,
            std::slice::from_ref(&c.int),
            UnixTime::now(),
            Usage::ClientAuth
        )
        .unwrap_err(),
        VerifyError::Svid(SvidError::SigningNoKeyCertSign)
    );
    // A certificate that is not a CA at all fails the cA rule.
    let leaf_cert = sign(&chain(), &leaf_params(ID));
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf_cert).unwrap();
    assert!(svid::signing_violations(&parsed).contains(&SvidError::SigningNotCa));
}

#[test]
fn verifier_outcomes_have_the_right_reason() {
    let c = chain();
    let td = TrustDomain::parse("td.example").unwrap();
    let verifier = SvidVerifier::new(td.clone(), TrustBundle::new(vec![c.root.clone()]).unwrap());
    let ints = [c.int.clone()];
    let check = |leaf: &CertificateDer<'_>, ints: &[CertificateDer<'static>]| {
        verifier.verify(leaf, ints, UnixTime::now(), Usage::ClientAuth)
    };

    // Foreign trust domain, signed by our own CA.
    let foreign = sign(&c, &leaf_params("spiffe://other.example/ns/x"));
    let err = check(&foreign, &ints).unwrap_err();
    assert!(
        matches!(err, VerifyError::ForeignTrustDomain { .. }),
        "{err}"
    );
    assert_eq!(err.reason(), "bad_identity");

    // Another CA.
    let other = chain();
    let stranger = sign(&other, &leaf_params(ID));
    let err = check(&stranger, std::slice::from_ref(&other.int)).unwrap_err();
    assert_eq!(err, VerifyError::UnknownIssuer);
    assert_eq!(err.reason(), "unknown_ca");

    // Missing intermediate.
    let leaf = sign(&c, &leaf_params(ID));
    assert_eq!(check(&leaf, &[]).unwrap_err().reason(), "unknown_ca");

    // Expired and not yet valid.
    let mut p = leaf_params(ID);
    p.not_before = OffsetDateTime::now_utc() - Duration::hours(2);
    p.not_after = OffsetDateTime::now_utc() - Duration::hours(1);
    let err = check(&sign(&c, &p), &ints).unwrap_err();
    assert_eq!(
        (err.clone(), err.reason()),
        (VerifyError::Expired, "expired")
    );
    let mut p = leaf_params(ID);
    p.not_before = OffsetDateTime::now_utc() + Duration::hours(1);
    p.not_after = OffsetDateTime::now_utc() + Duration::hours(2);
    let err = check(&sign(&c, &p), &ints).unwrap_err();
    assert_eq!(
        (err.clone(), err.reason()),
        (VerifyError::NotYetValid, "not_yet_valid")
    );

    // An expired root is not trusted even though webpki ignores anchor validity.
    let root_key = KeyPair::generate().unwrap();
    let mut rp = ca_params("old root", 1);
    rp.not_before = OffsetDateTime::now_utc() - Duration::days(10);
    rp.not_after = OffsetDateTime::now_utc() - Duration::days(1);
    let old_root = rp.self_signed(&root_key).unwrap();
    let old_issuer = Issuer::new(rp, root_key);
    let leaf = sign(
        &Chain {
            root: old_root.der().clone(),
            int: old_root.der().clone(),
            int_issuer: old_issuer,
        },
        &leaf_params(ID),
    );
    let v = SvidVerifier::new(td, TrustBundle::new(vec![old_root.der().clone()]).unwrap());
    assert_eq!(
        v.verify(&leaf, &[], UnixTime::now(), Usage::ClientAuth)
            .unwrap_err(),
        VerifyError::Expired
    );
    assert_eq!(
        TrustBundle::new(vec![]).unwrap_err(),
        VerifyError::EmptyBundle
    );
}
