//! Certificate signing requests: parse (PEM or DER), verify the
//! self-signature, and extract the public key. The CA takes nothing else from
//! a CSR: the identity is the CA's decision, never the requester's.

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ED25519};
use keyproof_identity::keys::KeyType;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ED25519};
use x509_parser::prelude::FromDer;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not valid PEM or DER: {0}")]
    Malformed(String),
    #[error("CSR key type not allowed: {0}")]
    KeyTypeNotAllowed(String),
    #[error("CSR signature algorithm {0} does not match its key")]
    AlgorithmMismatch(String),
    #[error("CSR signature does not verify: the requester does not hold the key")]
    BadSignature,
}

impl CsrError {
    /// A stable code for JSON error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            CsrError::Malformed(_) => "bad_csr",
            CsrError::KeyTypeNotAllowed(_) => "csr_key_type_not_allowed",
            CsrError::AlgorithmMismatch(_) => "bad_csr",
            CsrError::BadSignature => "bad_csr_signature",
        }
    }
}

/// A public key proven by a verified CSR, ready for rcgen to certify.
#[derive(Debug, Clone)]
pub struct SubjectKey {
    key_type: KeyType,
    /// The subjectPublicKey bits (EC point or Ed25519 key).
    raw: Vec<u8>,
}

impl SubjectKey {
    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// From a key pair the caller holds (the `--key-out` path).
    pub fn from_key_pair(kp: &rcgen::KeyPair, key_type: KeyType) -> Self {
        SubjectKey {
            key_type,
            raw: kp.public_key_raw().to_vec(),
        }
    }
}

impl rcgen::PublicKeyData for SubjectKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key_type.signature_algorithm()
    }
}

/// Decodes PEM (`CERTIFICATE REQUEST`) or raw DER.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, CsrError> {
    if input.first() == Some(&0x30) {
        return Ok(input.to_vec());
    }
    CertificateSigningRequestDer::from_pem_slice(input)
        .map(|der| der.as_ref().to_vec())
        .map_err(|_| CsrError::Malformed("no CERTIFICATE REQUEST PEM block".into()))
}

/// Parses a DER CSR, verifies its signature and returns its key.
pub fn verify(der: &[u8]) -> Result<SubjectKey, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing data after CSR".into()));
    }
    let info = &csr.certification_request_info;
    let key_type = KeyType::of_spki(&info.subject_pki)
        .map_err(|e| CsrError::KeyTypeNotAllowed(e.to_string()))?;
    let sig_alg = &csr.signature_algorithm.algorithm;
    let raw_key = info.subject_pki.subject_public_key.data.as_ref();
    let verified = match key_type {
        KeyType::EcdsaP256 if *sig_alg == OID_SIG_ECDSA_WITH_SHA256 => {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, raw_key)
                .verify(info.raw, csr.signature_value.data.as_ref())
        }
        KeyType::Ed25519 if *sig_alg == OID_SIG_ED25519 => {
            UnparsedPublicKey::new(&ED25519, raw_key)
                .verify(info.raw, csr.signature_value.data.as_ref())
        }
        _ => return Err(CsrError::AlgorithmMismatch(sig_alg.to_id_string())),
    };
    verified.map_err(|_| CsrError::BadSignature)?;
    Ok(SubjectKey {
        key_type,
        raw: raw_key.to_vec(),
    })
}

/// Builds a PEM CSR for `key` (used by the proxy and the tests; the subject
/// and SANs are informational only).
pub fn build_pem<K: rcgen::SigningKey>(key: &K, spiffe_id: &str) -> Result<String, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Ok(uri) = spiffe_id.try_into() {
        params.subject_alt_names.push(rcgen::SanType::URI(uri));
    }
    params.serialize_request(key)?.pem()
}
