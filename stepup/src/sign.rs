//! The outbound signer: reads a stepup challenge and signs a request with the
//! workload key, refusing challenges that do not fit its key.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::header::{HeaderValue, WWW_AUTHENTICATE};
use http::{HeaderMap, StatusCode};
use sfv::{BareItem, Dictionary, ListEntry, Parser};

use crate::alg::{keyid_for_spki, Alg, KeyError};
use crate::base::{self, Component, RequestView};
use crate::der;
use crate::digest;
use crate::headers::{
    ACCEPT_SIGNATURE, CONTENT_DIGEST, SIGNATURE, SIGNATURE_INPUT, STEPUP_BINDING,
};
use crate::{BINDING_LEN, LABEL, TAG};

/// Largest `Accept-Signature` the signer reads.
pub const MAX_ACCEPT_SIGNATURE_LEN: usize = 2048;

/// A stepup-v1 signature request, from `Accept-Signature: stepup=...` on a 401
/// challenge or on a successful response (the nonce for the next request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Requested component identifiers, as sent.
    pub components: Vec<String>,
    /// The single-use nonce.
    pub nonce: String,
    /// The requested algorithm name, as sent.
    pub alg: String,
    /// The requested key id, as sent.
    pub keyid: String,
    /// The tag, as sent.
    pub tag: String,
}

/// Why an `Accept-Signature` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    /// The field is too large, not text, or not a structured dictionary.
    #[error("Accept-Signature is not a valid structured-field dictionary")]
    Syntax,
    /// The `stepup` member is not an inner list of strings.
    #[error("Accept-Signature stepup member is not a list of component names")]
    Components,
    /// A required parameter (`nonce`, `alg`, `keyid`, `tag`) is missing or not a string.
    #[error("Accept-Signature stepup member lacks parameter {0}")]
    MissingParam(&'static str),
}

/// Why the signer refuses a (well-formed) challenge. [`SignRefusal::as_str`]
/// is suitable for the header that tells the application why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignRefusal {
    /// The challenge names another key: never sign for someone else's key id.
    #[error("challenge keyid is not this workload's key")]
    KeyidMismatch,
    /// The challenge asks for an algorithm that does not fit this key
    /// (including `hmac-sha256` and unknown names).
    #[error("challenge alg does not match this workload's key")]
    AlgMismatch,
    /// The tag is not `stepup-v1`.
    #[error("challenge tag is not stepup-v1")]
    WrongTag,
    /// The component list is not the stepup-v1 set.
    #[error("challenge asks for components stepup-v1 does not sign")]
    UnexpectedComponents,
}

impl SignRefusal {
    /// Short machine-readable reason.
    pub const fn as_str(self) -> &'static str {
        match self {
            SignRefusal::KeyidMismatch => "keyid_mismatch",
            SignRefusal::AlgMismatch => "alg_mismatch",
            SignRefusal::WrongTag => "wrong_tag",
            SignRefusal::UnexpectedComponents => "unexpected_components",
        }
    }
}

/// Why a request could not be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The challenge does not fit this signer.
    #[error("refusing to sign: {0}")]
    Refused(#[from] SignRefusal),
    /// The request has no authority (`:authority` or `Host`) to sign.
    #[error("request has no authority to sign")]
    NoAuthority,
    /// The signing operation failed.
    #[error("signing failed")]
    Crypto,
    /// A header value could not be encoded.
    #[error("could not encode a signature header")]
    Encoding,
}

impl Challenge {
    /// Parses an `Accept-Signature` value. `Ok(None)` if it has no `stepup` member.
    pub fn parse(value: &str) -> Result<Option<Challenge>, ChallengeError> {
        let dict: Dictionary = Parser::new(value)
            .parse()
            .map_err(|_| ChallengeError::Syntax)?;
        let Some(entry) = dict.get(LABEL) else {
            return Ok(None);
        };
        let ListEntry::InnerList(member) = entry else {
            return Err(ChallengeError::Components);
        };
        let mut components = Vec::with_capacity(member.items.len());
        for item in &member.items {
            let name = item
                .bare_item
                .as_string()
                .ok_or(ChallengeError::Components)?;
            if !item.params.is_empty() {
                return Err(ChallengeError::Components);
            }
            components.push(name.as_str().to_owned());
        }
        let param = |k: &'static str| match member.params.get(k) {
            Some(BareItem::String(s)) => Ok(s.as_str().to_owned()),
            _ => Err(ChallengeError::MissingParam(k)),
        };
        Ok(Some(Challenge {
            components,
            nonce: param("nonce")?,
            alg: param("alg")?,
            keyid: param("keyid")?,
            tag: param("tag")?,
        }))
    }

    /// The stepup challenge in a response's headers, if any.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Challenge>, ChallengeError> {
        match crate::sf::combined(headers, &ACCEPT_SIGNATURE, MAX_ACCEPT_SIGNATURE_LEN) {
            Ok(None) => Ok(None),
            Ok(Some(v)) => Challenge::parse(&v),
            Err(_) => Err(ChallengeError::Syntax),
        }
    }
}

/// True if a response is a step-up challenge: 401 with a `WWW-Authenticate`
/// whose scheme is `StepUp` (auth schemes are case-insensitive).
pub fn is_stepup_challenge(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::UNAUTHORIZED
        && headers.get_all(WWW_AUTHENTICATE).iter().any(|v| {
            v.as_bytes()
                .get(..6)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"stepup"))
                && matches!(v.as_bytes().get(6), None | Some(b' '))
        })
}

/// The four headers of a signed request.
#[derive(Debug, Clone)]
pub struct SignedHeaders {
    /// `Content-Digest: sha-256=:...:`
    pub content_digest: HeaderValue,
    /// `Stepup-Binding: :...:`
    pub stepup_binding: HeaderValue,
    /// `Signature-Input: stepup=(...);created=...;nonce=...;alg=...;keyid=...;tag="stepup-v1"`
    pub signature_input: HeaderValue,
    /// `Signature: stepup=:...:`
    pub signature: HeaderValue,
}

impl SignedHeaders {
    /// Sets the four headers on the outgoing request, replacing any present.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(CONTENT_DIGEST, self.content_digest.clone());
        headers.insert(STEPUP_BINDING, self.stepup_binding.clone());
        headers.insert(SIGNATURE_INPUT, self.signature_input.clone());
        headers.insert(SIGNATURE, self.signature.clone());
    }
}

enum KeyKind {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// The outbound signer: the workload's private key and its key id.
pub struct Signer {
    key: KeyKind,
    alg: Alg,
    keyid: String,
    rng: SystemRandom,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("alg", &self.alg)
            .field("keyid", &self.keyid)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// From an unencrypted PKCS#8 private key (P-256 or Ed25519). The keyid
    /// is computed from the key's canonical SPKI.
    pub fn from_pkcs8(pkcs8_der: &[u8]) -> Result<Signer, KeyError> {
        let (key, spki) =
            if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8_der) {
                let spki = k
                    .public_key()
                    .as_der()
                    .map_err(|_| KeyError::MalformedKey)?;
                let spki = spki.as_ref().to_vec();
                (KeyKind::Ecdsa(k), spki)
            } else if let Ok(k) = Ed25519KeyPair::from_pkcs8(pkcs8_der) {
                let spki = k
                    .public_key()
                    .as_der()
                    .map_err(|_| KeyError::MalformedKey)?;
                let spki = spki.as_ref().to_vec();
                (KeyKind::Ed25519(k), spki)
            } else {
                return Err(KeyError::UnsupportedKey);
            };
        let alg = Alg::from_spki_der(&spki)?;
        Ok(Signer {
            key,
            alg,
            keyid: keyid_for_spki(&spki),
            rng: SystemRandom::new(),
        })
    }

    /// From the private key and the workload certificate (DER); checks that
    /// they belong together and takes the keyid from the certificate's SPKI,
    /// exactly as the verifier will.
    pub fn from_pkcs8_and_cert(pkcs8_der: &[u8], cert_der: &[u8]) -> Result<Signer, KeyError> {
        let signer = Signer::from_pkcs8(pkcs8_der)?;
        let spki = der::cert_spki(cert_der).ok_or(KeyError::MalformedCertificate)?;
        if keyid_for_spki(spki) != signer.keyid {
            return Err(KeyError::KeyCertMismatch);
        }
        Ok(signer)
    }

    /// The algorithm of the key.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// This key's `keyid`.
    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    /// Checks that a challenge is one this signer may answer.
    pub fn check(&self, challenge: &Challenge) -> Result<(), SignRefusal> {
        if challenge.tag != TAG {
            return Err(SignRefusal::WrongTag);
        }
        if Alg::from_name(&challenge.alg) != Some(self.alg) {
            return Err(SignRefusal::AlgMismatch);
        }
        if challenge.keyid != self.keyid {
            return Err(SignRefusal::KeyidMismatch);
        }
        let names = || challenge.components.iter().map(String::as_str);
        if !base::is_required_set(names(), true) && !base::is_required_set(names(), false) {
            return Err(SignRefusal::UnexpectedComponents);
        }
        Ok(())
    }

    /// Raw signature over `message` (64 bytes: ECDSA `r || s` or Ed25519).
    pub fn sign_raw(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match &self.key {
            KeyKind::Ecdsa(k) => k
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignError::Crypto),
            KeyKind::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
        }
    }

    /// Signs `req` with `body` for `challenge`, on the connection whose TLS
    /// exporter is `exporter`, at time `now`. The component list is the
    /// stepup-v1 set for this request (with `content-type` iff it has one),
    /// so a nonce kept from an earlier response can sign any request.
    pub fn sign(
        &self,
        challenge: &Challenge,
        req: &RequestView<'_>,
        body: &[u8],
        exporter: &[u8; BINDING_LEN],
        now: u64,
    ) -> Result<SignedHeaders, SignError> {
        self.check(challenge)?;
        let nonce = sfv::StringRef::from_str(&challenge.nonce).map_err(|_| SignError::Encoding)?;
        let keyid = sfv::StringRef::from_str(&self.keyid).map_err(|_| SignError::Encoding)?;
        let created = sfv::Integer::try_from(now).map_err(|_| SignError::Encoding)?;
        let components = Component::required(req.has_content_type());

        let content_digest = digest::content_digest(body);
        let mut binding = String::with_capacity(46);
        binding.push(':');
        binding.push_str(&STANDARD.encode(exporter));
        binding.push(':');

        let mut ser = sfv::ListSerializer::new();
        {
            let mut inner = ser.inner_list();
            for c in components {
                let _ = inner.bare_item(sfv::string_ref(c.name()));
            }
            let _ = inner
                .finish()
                .parameter(sfv::key_ref("created"), created)
                .parameter(sfv::key_ref("nonce"), nonce)
                .parameter(sfv::key_ref("alg"), sfv::string_ref(self.alg.name()))
                .parameter(sfv::key_ref("keyid"), keyid)
                .parameter(sfv::key_ref("tag"), sfv::string_ref(TAG));
        }
        let params = ser.finish().ok_or(SignError::Encoding)?;

        let mut values: Vec<(&str, Vec<u8>)> = Vec::with_capacity(components.len());
        for c in components {
            let v = match c {
                Component::ContentDigest => content_digest.as_bytes().to_vec(),
                Component::StepupBinding => binding.as_bytes().to_vec(),
                other => req
                    .component_value(other.name())
                    .ok_or(SignError::NoAuthority)?
                    .into_owned(),
            };
            values.push((c.name(), v));
        }
        let base = base::signature_base(values, &params);
        let sig = self.sign_raw(&base)?;

        let mut sig_ser = sfv::DictSerializer::new();
        let _ = sig_ser.bare_item(sfv::key_ref(LABEL), sig.as_slice());
        let signature = sig_ser.finish().ok_or(SignError::Encoding)?;

        let hv = |s: String| HeaderValue::try_from(s).map_err(|_| SignError::Encoding);
        Ok(SignedHeaders {
            content_digest: hv(content_digest)?,
            stepup_binding: hv(binding)?,
            signature_input: hv(format!("{LABEL}={params}"))?,
            signature: hv(signature)?,
        })
    }
}
