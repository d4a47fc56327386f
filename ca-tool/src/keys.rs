//! Key types, key generation and loading, PEM helpers and fingerprints.

use std::fmt;
use std::str::FromStr;

use rcgen::{KeyPair, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::x509::SubjectPublicKeyInfo;

/// A key or PEM input problem.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no PEM certificate found")]
    NoCertificate,
    #[error("no PEM private key found")]
    NoPrivateKey,
    #[error("PEM is malformed: {0}")]
    Pem(String),
    #[error("unsupported key type {0}; keyproof uses ecdsa-p256 or ed25519")]
    Unsupported(String),
    #[error("key generation or parsing failed: {0}")]
    Crypto(String),
}

/// The key algorithms keyproof issues and accepts for workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256.
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Ed25519 => "ed25519",
        }
    }

    /// rcgen's signature algorithm for this key type.
    pub fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &PKCS_ECDSA_P256_SHA256,
            KeyType::Ed25519 => &PKCS_ED25519,
        }
    }

    /// Generates a fresh key pair.
    pub fn generate(self) -> Result<KeyPair, KeyError> {
        KeyPair::generate_for(self.signature_algorithm())
            .map_err(|e| KeyError::Crypto(e.to_string()))
    }

    /// The key type of a parsed SubjectPublicKeyInfo.
    pub fn of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyType, KeyError> {
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_SIG_ED25519 {
            return Ok(KeyType::Ed25519);
        }
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            if curve.as_ref() == Some(&OID_EC_P256) {
                return Ok(KeyType::EcdsaP256);
            }
            let curve = curve.map(|c| c.to_id_string());
            return Err(KeyError::Unsupported(format!(
                "EC key on curve {}",
                curve.as_deref().map(oid_name).unwrap_or("?")
            )));
        }
        Err(KeyError::Unsupported(
            oid_name(&alg.to_id_string()).to_owned(),
        ))
    }
}

/// A readable name for the key algorithms and curves a refused key is likely
/// to have (the dotted OID otherwise), so that refusals say what was seen.
fn oid_name(dotted: &str) -> &str {
    match dotted {
        "1.2.840.113549.1.1.1" => "RSA",
        "1.2.840.113549.1.1.10" => "RSA-PSS",
        "1.3.132.0.34" => "P-384",
        "1.3.132.0.35" => "P-521",
        "1.3.132.0.10" => "secp256k1",
        "1.3.101.113" => "Ed448",
        "1.3.101.110" => "X25519",
        "1.2.840.10040.4.1" => "DSA",
        other => other,
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ecdsa-p256" => Ok(KeyType::EcdsaP256),
            "ed25519" => Ok(KeyType::Ed25519),
            other => Err(format!(
                "unknown key type {other:?}; use ecdsa-p256 or ed25519"
            )),
        }
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Uppercase colon-free hex SHA-256 fingerprint of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(sha256(der))
}

/// All certificates in a PEM file, in order.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KeyError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(KeyError::NoCertificate);
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn private_key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, KeyError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => KeyError::NoPrivateKey,
        other => KeyError::Pem(other.to_string()),
    })
}

/// Loads a PKCS#8 PEM key pair for signing with rcgen.
pub fn key_pair_from_pem(pem: &str) -> Result<KeyPair, KeyError> {
    KeyPair::from_pem(pem).map_err(|e| KeyError::Crypto(e.to_string()))
}

/// A PEM block for one DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
