//! Signature algorithms and peer keys. The algorithm is always taken from the
//! peer certificate's key, never from the request (RFC 9421 §3.3.7: a verifier
//! must not let the message pick the algorithm).

use std::fmt;

use aws_lc_rs::signature::{ParsedPublicKey, ECDSA_P256_SHA256_FIXED, ED25519};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use keyproof_identity::keys::{self, KeyType};

use crate::der;

/// The signature algorithms stepup-v1 accepts: one per key type an
/// X.509-SVID may hold ([`KeyType`], defined with the SVID rules), so a
/// workload can sign with whatever key its certificate has. HMAC is
/// deliberately absent: a shared secret cannot prove which workload signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    /// `ecdsa-p256-sha256`, 64-byte `r || s` signatures (RFC 9421 §3.3.4).
    EcdsaP256Sha256,
    /// `ed25519` (RFC 9421 §3.3.6).
    Ed25519,
}

impl Alg {
    /// The RFC 9421 algorithm name.
    pub const fn name(self) -> &'static str {
        match self {
            Alg::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            Alg::Ed25519 => "ed25519",
        }
    }

    /// Parses an RFC 9421 algorithm name; `None` for anything else
    /// (including `hmac-sha256`).
    pub fn from_name(name: &str) -> Option<Alg> {
        match name {
            "ecdsa-p256-sha256" => Some(Alg::EcdsaP256Sha256),
            "ed25519" => Some(Alg::Ed25519),
            _ => None,
        }
    }

    /// The algorithm that signs with a key of this type. Exhaustive on
    /// purpose: a key type added to the SVID rules does not compile here
    /// until step-up decides how it signs.
    const fn of_key_type(key_type: KeyType) -> Alg {
        match key_type {
            KeyType::EcdsaP256 => Alg::EcdsaP256Sha256,
            KeyType::Ed25519 => Alg::Ed25519,
        }
    }

    /// The algorithm fixed by a SubjectPublicKeyInfo.
    pub fn from_spki_der(spki_der: &[u8]) -> Result<Alg, KeyError> {
        let alg_id = der::spki_algorithm(spki_der).ok_or(KeyError::MalformedKey)?;
        KeyType::from_spki_algorithm_der(alg_id)
            .map(Alg::of_key_type)
            .ok_or(KeyError::UnsupportedKey)
    }

    /// Length in bytes of a valid signature (both are 64).
    pub const fn signature_len(self) -> usize {
        64
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a certificate or key cannot be used for stepup-v1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The certificate is not a DER X.509 certificate we can walk.
    #[error("certificate is not well-formed DER")]
    MalformedCertificate,
    /// The SubjectPublicKeyInfo or private key does not parse.
    #[error("public or private key is not well-formed")]
    MalformedKey,
    /// The key is neither P-256 nor Ed25519.
    #[error("key algorithm is not supported by stepup-v1 (only P-256 and Ed25519)")]
    UnsupportedKey,
    /// The private key does not belong to the certificate.
    #[error("private key does not match the certificate's public key")]
    KeyCertMismatch,
}

/// `keyid`: base64url without padding of SHA-256 over the SPKI DER.
pub fn keyid_for_spki(spki_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(keys::sha256(spki_der))
}

/// A peer's public key as the verifier needs it, built once per connection
/// from the verified leaf certificate: algorithm, SPKI hash, keyid and a
/// pre-parsed key (so each verification skips point decoding).
pub struct PeerKey {
    alg: Alg,
    spki_sha256: [u8; 32],
    keyid: String,
    key: ParsedPublicKey,
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerKey")
            .field("alg", &self.alg)
            .field("keyid", &self.keyid)
            .finish_non_exhaustive()
    }
}

impl PeerKey {
    /// From the peer's (already verified) leaf certificate, DER.
    pub fn from_cert_der(cert_der: &[u8]) -> Result<PeerKey, KeyError> {
        let spki = der::cert_spki(cert_der).ok_or(KeyError::MalformedCertificate)?;
        PeerKey::from_spki_der(spki)
    }

    /// From a SubjectPublicKeyInfo, DER.
    pub fn from_spki_der(spki_der: &[u8]) -> Result<PeerKey, KeyError> {
        let alg = Alg::from_spki_der(spki_der)?;
        let verification: &'static dyn aws_lc_rs::signature::VerificationAlgorithm = match alg {
            Alg::EcdsaP256Sha256 => &ECDSA_P256_SHA256_FIXED,
            Alg::Ed25519 => &ED25519,
        };
        let key =
            ParsedPublicKey::new(verification, spki_der).map_err(|_| KeyError::MalformedKey)?;
        // The identity library's SPKI hash, the one `VerifiedSvid::spki_sha256`
        // holds, so the proxy and step-up name a peer by the same bytes.
        let spki_sha256 = keys::sha256(spki_der);
        Ok(PeerKey {
            alg,
            spki_sha256,
            keyid: URL_SAFE_NO_PAD.encode(spki_sha256),
            key,
        })
    }

    /// The algorithm fixed by the key.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// SHA-256 of the SPKI DER (the peer identity nonces are bound to).
    pub fn spki_sha256(&self) -> &[u8; 32] {
        &self.spki_sha256
    }

    /// The expected `keyid`.
    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    /// Verifies `signature` over `message`. Wrong-length signatures (e.g. a
    /// DER-encoded ECDSA signature) are rejected before any curve arithmetic.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        signature.len() == self.alg.signature_len()
            && self.key.verify_sig(message, signature).is_ok()
    }
}
