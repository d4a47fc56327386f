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
    /// A key of an accepted type that no private key can stand behind, or
    /// in an encoding other verifiers refuse.
    #[error("public key refused: {0}")]
    Refused(&'static str),
}

/// Ed25519 public keys of small order (RFC 8032 points whose multiple by
/// the cofactor 8 is the identity), as encoded canonically and with `y`
/// one `p` higher, sign bit aside (libsodium's list). A signature
/// `R = identity, S = 0` verifies under the identity for every message, and
/// under the others for one message in two to eight: a certificate holding
/// one proves no possession of anything.
const ED25519_SMALL_ORDER: [[u8; 32]; 7] = {
    let mut l = [[0u8; 32]; 7];
    // 0 (order 4) stays all zeros; 1 (order 1):
    l[1][0] = 1;
    l[2] = [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ];
    l[3] = [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ];
    // p - 1 (order 2), p (0 again, order 4), p + 1 (1 again, order 1).
    let mut i = 4;
    while i < 7 {
        let mut k = 1;
        while k < 31 {
            l[i][k] = 0xff;
            k += 1;
        }
        l[i][31] = 0x7f;
        l[i][0] = 0xec + (i as u8 - 4);
        i += 1;
    }
    l
};

/// Whether `key` (the 32 bytes of an Ed25519 public key) encodes a point
/// of small order, or `y` not reduced mod `p` (RFC 8032 section 5.1.3
/// refuses that encoding).
fn ed25519_refused(key: &[u8]) -> bool {
    let Ok(key) = <&[u8; 32]>::try_from(key) else {
        return true;
    };
    let mut y = *key;
    y[31] &= 0x7f;
    let small = ED25519_SMALL_ORDER.contains(&y);
    // y >= p = 2^255 - 19: all ones above byte 0, and byte 0 at least 0xed.
    let unreduced = y[0] >= 0xed && y[1..31].iter().all(|b| *b == 0xff) && y[31] == 0x7f;
    small || unreduced
}

/// The key algorithms keyproof issues and accepts for workloads: the one
/// list of what an X.509-SVID leaf may hold, shared by the CA (what it
/// certifies), the SVID rules (what a peer may present) and step-up (what a
/// workload signs with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256.
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

/// DER AlgorithmIdentifier of id-ecPublicKey with namedCurve prime256v1.
const P256_SPKI_ALGORITHM: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];
/// DER AlgorithmIdentifier of id-Ed25519 (RFC 8410: parameters absent).
const ED25519_SPKI_ALGORITHM: &[u8] = &[0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];

impl KeyType {
    /// Every key type, in a fixed order.
    pub const ALL: [KeyType; 2] = [KeyType::EcdsaP256, KeyType::Ed25519];

    /// The DER AlgorithmIdentifier (the whole TLV) that a
    /// SubjectPublicKeyInfo of this type carries.
    pub const fn spki_algorithm_der(self) -> &'static [u8] {
        match self {
            KeyType::EcdsaP256 => P256_SPKI_ALGORITHM,
            KeyType::Ed25519 => ED25519_SPKI_ALGORITHM,
        }
    }

    /// The key type whose SubjectPublicKeyInfo AlgorithmIdentifier is exactly
    /// `der` (the whole TLV), for callers that walk DER themselves rather
    /// than parse the certificate. The match is on bytes, so an encoding DER
    /// does not allow (Ed25519 with explicit NULL parameters, an EC key with
    /// explicit curve parameters) is no key type.
    pub fn from_spki_algorithm_der(der: &[u8]) -> Option<KeyType> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.spki_algorithm_der() == der)
    }

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

    /// Generates a fresh key pair. An Ed25519 key is kept (and so written)
    /// as PKCS#8 v1, RFC 8410's form: the v2 document the generator makes
    /// (RFC 5958, the public key appended) is refused by OpenSSL 3.0 and
    /// Python's `cryptography`, which operators and other sidecars use to
    /// read key files. Both forms load here.
    pub fn generate(self) -> Result<KeyPair, KeyError> {
        let crypto = |e: &dyn fmt::Display| KeyError::Crypto(e.to_string());
        let kp = KeyPair::generate_for(self.signature_algorithm()).map_err(|e| crypto(&e))?;
        if self != KeyType::Ed25519 {
            return Ok(kp);
        }
        let v1 = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(kp.serialized_der())
            .map_err(|e| crypto(&e))?
            .to_pkcs8v1()
            .map_err(|e| crypto(&e))?;
        KeyPair::from_pkcs8_der_and_sign_algo(&v1.as_ref().into(), &PKCS_ED25519)
            .map_err(|e| crypto(&e))
    }

    /// The key type of a parsed SubjectPublicKeyInfo.
    /// The key itself is checked too: an Ed25519 key of small order (or
    /// an unreduced encoding) and a P-256 point not in uncompressed form
    /// are refused, whoever asks (the CA for a CSR, a peer's certificate).
    pub fn of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyType, KeyError> {
        let alg = &spki.algorithm.algorithm;
        let key = spki.subject_public_key.data.as_ref();
        if *alg == OID_SIG_ED25519 {
            if ed25519_refused(key) {
                return Err(KeyError::Refused(
                    "an Ed25519 key of small order, or not canonically encoded: no private key proves possession of it",
                ));
            }
            return Ok(KeyType::Ed25519);
        }
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            if curve.as_ref() == Some(&OID_EC_P256) {
                // SEC 1 uncompressed: 0x04, x, y. A compressed point is
                // one other verifiers (ring, Go) refuse.
                if key.len() != 65 || key[0] != 0x04 {
                    return Err(KeyError::Refused(
                        "a P-256 point not in uncompressed form (0x04 || x || y)",
                    ));
                }
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

/// A private key held outside this process, in a PKCS#11 token
/// ([`crate::pkcs11::Pkcs11Key`]): it signs, and never reveals itself. The
/// step-up signer and the proxy's identity take keys through this trait, so
/// they need not know where a key lives.
pub trait ExternalKey: Send + Sync + fmt::Debug {
    /// The key's type.
    fn key_type(&self) -> KeyType;
    /// The public key as a DER SubjectPublicKeyInfo.
    fn spki_der(&self) -> &[u8];
    /// ECDSA `r || s` over SHA-256 of `msg`, or an Ed25519 signature of
    /// `msg` (the formats of [`KeyType::signature_algorithm`] before any
    /// DER wrapping).
    fn sign_raw(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Where the key lives, as `/identity` and the metrics name it
    /// (`pkcs11`).
    fn location(&self) -> &'static str;
}

/// An ECDSA `r || s` signature (two big-endian integers of `half` bytes
/// each) as the DER `ECDSA-Sig-Value` that TLS and X.509 carry.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) || raw.len() > 2 * 66 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    fn integer(out: &mut Vec<u8>, v: &[u8]) {
        let start = v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1);
        let v = &v[start..];
        let pad = v[0] & 0x80 != 0;
        out.push(0x02);
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    let mut body = Vec::with_capacity(raw.len() + 6);
    integer(&mut body, r);
    integer(&mut body, s);
    let mut out = Vec::with_capacity(body.len() + 3);
    out.push(0x30);
    if body.len() >= 0x80 {
        out.push(0x81);
    }
    out.push(body.len() as u8);
    out.extend_from_slice(&body);
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-level definition (for DER walkers) and the parsed one
    /// ([`KeyType::of_spki`]) must name the same key types.
    #[test]
    fn spki_algorithm_der_agrees_with_of_spki() {
        use x509_parser::prelude::FromDer;
        for kt in KeyType::ALL {
            let kp = kt.generate().unwrap();
            let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
            let (_, parsed) = SubjectPublicKeyInfo::from_der(&spki).unwrap();
            assert_eq!(KeyType::of_spki(&parsed).unwrap(), kt);
            // SEQUENCE { AlgorithmIdentifier, BIT STRING }, short-form length.
            let alg_id = &spki[2..2 + kt.spki_algorithm_der().len()];
            assert_eq!(KeyType::from_spki_algorithm_der(alg_id), Some(kt));
        }
        assert_eq!(KeyType::from_spki_algorithm_der(&[0x30, 0x00]), None);
    }

    /// Keys no private key stands behind (Ed25519 of small order, or an
    /// unreduced encoding) and P-256 points other verifiers refuse
    /// (compressed) are no key type; genuine keys are.
    #[test]
    fn keys_proving_no_possession_are_refused() {
        use x509_parser::prelude::FromDer;
        let ed = |key: &[u8; 32]| {
            let mut der = vec![
                0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
            ];
            der.extend_from_slice(key);
            der
        };
        let of = |der: &[u8]| {
            let (_, spki) = SubjectPublicKeyInfo::from_der(der).expect("SPKI");
            KeyType::of_spki(&spki)
        };
        for (i, small) in ED25519_SMALL_ORDER.iter().enumerate() {
            for sign in [0u8, 0x80] {
                let mut k = *small;
                k[31] |= sign;
                assert!(
                    matches!(of(&ed(&k)), Err(KeyError::Refused(_))),
                    "{i} {sign:#x}"
                );
            }
        }
        // y = p + 2 ... 2^255 - 1: not reduced.
        let mut unreduced = [0xff; 32];
        unreduced[31] = 0x7f;
        unreduced[0] = 0xf0;
        assert!(matches!(of(&ed(&unreduced)), Err(KeyError::Refused(_))));
        for kt in KeyType::ALL {
            let kp = kt.generate().unwrap();
            let spki = rcgen::PublicKeyData::subject_public_key_info(&kp);
            assert_eq!(of(&spki).unwrap(), kt);
        }
        // The same P-256 point, compressed.
        let kp = KeyType::EcdsaP256.generate().unwrap();
        let raw = rcgen::PublicKeyData::der_bytes(&kp);
        let mut der = vec![
            0x30, 0x39, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x22, 0x00,
        ];
        der.push(0x02 | (raw[64] & 1));
        der.extend_from_slice(&raw[1..33]);
        assert!(matches!(of(&der), Err(KeyError::Refused(_))));
    }

    /// Ed25519 keys are PKCS#8 v1 (version 0, no public key after the
    /// private one), which OpenSSL 3.0 and Python's `cryptography` read;
    /// they sign, and a v2 document still loads.
    #[test]
    fn ed25519_keys_are_pkcs8_v1_and_both_forms_load() {
        let kp = KeyType::Ed25519.generate().unwrap();
        let der = kp.serialized_der();
        // SEQUENCE (46) { INTEGER 0, AlgorithmIdentifier, OCTET STRING }.
        assert_eq!(der.len(), 48, "{der:02x?}");
        assert_eq!(&der[..5], &[0x30, 0x2e, 0x02, 0x01, 0x00]);
        let msg = b"x";
        let sig = rcgen::SigningKey::sign(&kp, msg).unwrap();
        let public = rcgen::PublicKeyData::der_bytes(&kp).to_vec();
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, public)
            .verify(msg, &sig)
            .unwrap();
        let v2 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        assert_eq!(v2.as_ref()[4], 0x01, "the generator's own form is v2");
        KeyPair::from_pkcs8_der_and_sign_algo(&v2.as_ref().into(), &PKCS_ED25519).unwrap();
    }

    /// The DER form must verify where aws-lc-rs' own ASN.1 signatures do,
    /// including the leading-zero and high-bit cases (checked over many
    /// random signatures, so both occur).
    #[test]
    fn ecdsa_raw_to_der_verifies() {
        use aws_lc_rs::signature::{
            EcdsaKeyPair, KeyPair as _, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
            ECDSA_P256_SHA256_FIXED_SIGNING,
        };
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, kp.public_key().as_ref());
        for i in 0..200u32 {
            let msg = i.to_be_bytes();
            let raw = kp.sign(&rng, &msg).unwrap();
            let der = ecdsa_raw_to_der(raw.as_ref()).unwrap();
            public.verify(&msg, &der).unwrap();
        }
        assert_eq!(ecdsa_raw_to_der(&[]), None);
        assert_eq!(ecdsa_raw_to_der(&[1, 2, 3]), None);
        // All-zero halves still encode as one zero byte each.
        assert_eq!(
            ecdsa_raw_to_der(&[0; 4]).unwrap(),
            [0x30, 6, 2, 1, 0, 2, 1, 0]
        );
    }
}
