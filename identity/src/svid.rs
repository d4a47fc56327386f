//! The X.509-SVID rules (SPIFFE X.509-SVID specification, sections 4 and 5).
//!
//! Each rule has its own error so that `keyproof-ca inspect`, the proxy's
//! handshake log and the tests can all say exactly which rule failed.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::keys::KeyType;
use crate::spiffe::{SpiffeId, SpiffeIdError};

/// One violated X.509-SVID rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate could not be parsed: {0}")]
    Parse(String),
    #[error("leaf has no URI SAN; an X.509-SVID carries its SPIFFE ID there")]
    NoUriSan,
    #[error("leaf has {0} URI SANs; an X.509-SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(#[source] SpiffeIdError),
    #[error("leaf SPIFFE ID {0} has no path; a workload ID needs one")]
    RootPathId(String),
    #[error("leaf has cA=true; an X.509-SVID leaf must not be a CA")]
    LeafIsCa,
    #[error("key usage extension is missing")]
    KeyUsageMissing,
    #[error("key usage extension is not marked critical")]
    KeyUsageNotCritical,
    #[error("leaf key usage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("leaf key usage has keyCertSign")]
    LeafKeyCertSign,
    #[error("leaf key usage has cRLSign")]
    LeafCrlSign,
    #[error("extended key usage lacks serverAuth")]
    EkuNoServerAuth,
    #[error("extended key usage lacks clientAuth")]
    EkuNoClientAuth,
    #[error("leaf key: {0}")]
    UnsupportedKey(String),
    #[error("signing certificate is not a CA (basicConstraints cA is not true)")]
    SigningNotCa,
    #[error("signing certificate key usage lacks keyCertSign")]
    SigningNoKeyCertSign,
}

/// The leaf rules, in order, as `inspect` lists them.
pub const LEAF_RULES: &[&str] = &[
    "exactly one URI SAN, a workload SPIFFE ID",
    "not a CA (cA=false)",
    "key usage present and critical",
    "key usage has digitalSignature",
    "key usage has neither keyCertSign nor cRLSign",
    "extended key usage, if present, has serverAuth and clientAuth",
    "key is ECDSA P-256 or Ed25519",
];

/// The signing-certificate rules, in order.
pub const SIGNING_RULES: &[&str] = &["a CA (cA=true)", "key usage has keyCertSign"];

impl SvidError {
    /// The rule (an entry of [`LEAF_RULES`] or [`SIGNING_RULES`]) this
    /// violates.
    pub fn rule(&self) -> &'static str {
        match self {
            SvidError::Parse(_)
            | SvidError::NoUriSan
            | SvidError::MultipleUriSans(_)
            | SvidError::InvalidSpiffeId(_)
            | SvidError::RootPathId(_) => LEAF_RULES[0],
            SvidError::LeafIsCa => LEAF_RULES[1],
            SvidError::KeyUsageMissing | SvidError::KeyUsageNotCritical => LEAF_RULES[2],
            SvidError::NoDigitalSignature => LEAF_RULES[3],
            SvidError::LeafKeyCertSign | SvidError::LeafCrlSign => LEAF_RULES[4],
            SvidError::EkuNoServerAuth | SvidError::EkuNoClientAuth => LEAF_RULES[5],
            SvidError::UnsupportedKey(_) => LEAF_RULES[6],
            SvidError::SigningNotCa => SIGNING_RULES[0],
            SvidError::SigningNoKeyCertSign => SIGNING_RULES[1],
        }
    }

    /// Whether the rule broken is about what the certificate may be used
    /// for (basic constraints, key usage, extended key usage) rather than
    /// whom it names or what key it holds.
    pub fn is_key_usage(&self) -> bool {
        matches!(
            self,
            SvidError::LeafIsCa
                | SvidError::KeyUsageMissing
                | SvidError::KeyUsageNotCritical
                | SvidError::NoDigitalSignature
                | SvidError::LeafKeyCertSign
                | SvidError::LeafCrlSign
                | SvidError::EkuNoServerAuth
                | SvidError::EkuNoClientAuth
                | SvidError::SigningNotCa
                | SvidError::SigningNoKeyCertSign
        )
    }

    /// A short stable name, used in JSON output and logs.
    pub fn code(&self) -> &'static str {
        match self {
            SvidError::Parse(_) => "parse",
            SvidError::NoUriSan => "no_uri_san",
            SvidError::MultipleUriSans(_) => "multiple_uri_sans",
            SvidError::InvalidSpiffeId(_) => "invalid_spiffe_id",
            SvidError::RootPathId(_) => "root_path_id",
            SvidError::LeafIsCa => "leaf_is_ca",
            SvidError::KeyUsageMissing => "key_usage_missing",
            SvidError::KeyUsageNotCritical => "key_usage_not_critical",
            SvidError::NoDigitalSignature => "no_digital_signature",
            SvidError::LeafKeyCertSign => "leaf_key_cert_sign",
            SvidError::LeafCrlSign => "leaf_crl_sign",
            SvidError::EkuNoServerAuth => "eku_no_server_auth",
            SvidError::EkuNoClientAuth => "eku_no_client_auth",
            SvidError::UnsupportedKey(_) => "unsupported_key",
            SvidError::SigningNotCa => "signing_not_ca",
            SvidError::SigningNoKeyCertSign => "signing_no_key_cert_sign",
        }
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Parse(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The SPIFFE ID a certificate carries, when it has exactly one URI SAN that
/// parses as one. This checks only the SAN rules.
pub fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let uris = uri_sans(cert)?;
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [one] => SpiffeId::parse(one).map_err(SvidError::InvalidSpiffeId),
        many => Err(SvidError::MultipleUriSans(many.len())),
    }
}

/// Every leaf rule this certificate violates, in rule order (empty when it is
/// a valid X.509-SVID leaf).
pub fn leaf_violations(cert: &X509Certificate<'_>) -> Vec<SvidError> {
    let mut errs = Vec::new();
    match spiffe_id_of(cert) {
        Ok(id) if !id.is_workload() => errs.push(SvidError::RootPathId(id.to_string())),
        Ok(_) => {}
        Err(e) => errs.push(e),
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => errs.push(SvidError::LeafIsCa),
        Ok(_) => {}
        Err(e) => errs.push(SvidError::Parse(format!("basicConstraints: {e}"))),
    }
    match cert.key_usage() {
        Ok(None) => errs.push(SvidError::KeyUsageMissing),
        Ok(Some(ku)) => {
            if !ku.critical {
                errs.push(SvidError::KeyUsageNotCritical);
            }
            if !ku.value.digital_signature() {
                errs.push(SvidError::NoDigitalSignature);
            }
            if ku.value.key_cert_sign() {
                errs.push(SvidError::LeafKeyCertSign);
            }
            if ku.value.crl_sign() {
                errs.push(SvidError::LeafCrlSign);
            }
        }
        Err(e) => errs.push(SvidError::Parse(format!("keyUsage: {e}"))),
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if !eku.value.any => {
            if !eku.value.server_auth {
                errs.push(SvidError::EkuNoServerAuth);
            }
            if !eku.value.client_auth {
                errs.push(SvidError::EkuNoClientAuth);
            }
        }
        Ok(_) => {}
        Err(e) => errs.push(SvidError::Parse(format!("extendedKeyUsage: {e}"))),
    }
    // Only the key types keyproof-ca issues: a workload presenting any other
    // key did not get its certificate from this trust domain's CA as a
    // workload, and step-up signs and verifies with exactly these (it takes
    // them from the same `KeyType`).
    if let Err(e) = KeyType::of_spki(cert.public_key()) {
        errs.push(SvidError::UnsupportedKey(e.to_string()));
    }
    errs
}

/// Checks every leaf rule and returns the SPIFFE ID, or the first violation.
pub fn check_leaf(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    if let Some(first) = leaf_violations(cert).into_iter().next() {
        return Err(first);
    }
    spiffe_id_of(cert)
}

/// Every signing-certificate rule this certificate violates.
pub fn signing_violations(cert: &X509Certificate<'_>) -> Vec<SvidError> {
    let mut errs = Vec::new();
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => errs.push(SvidError::SigningNotCa),
        Err(e) => errs.push(SvidError::Parse(format!("basicConstraints: {e}"))),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => {}
        Ok(_) => errs.push(SvidError::SigningNoKeyCertSign),
        Err(e) => errs.push(SvidError::Parse(format!("keyUsage: {e}"))),
    }
    errs
}

/// Checks the signing-certificate rules.
pub fn check_signing(cert: &X509Certificate<'_>) -> Result<(), SvidError> {
    match signing_violations(cert).into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Parses DER and checks the leaf rules.
pub fn check_leaf_der(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| SvidError::Parse(e.to_string()))?;
    check_leaf(&cert)
}
