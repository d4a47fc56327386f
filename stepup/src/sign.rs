//! The outbound signer: reads a stepup challenge and signs a request with the
//! workload key, refusing challenges that do not fit its key.

use std::convert::Infallible;
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
use sfv::visitor::{
    DictionaryVisitor, EntryVisitor, Ignored, InnerListVisitor, ItemVisitor, ParameterVisitor,
};
use sfv::{BareItemFromInput, KeyRef};

use crate::alg::{keyid_for_spki, Alg, KeyError};
use crate::base::{self, Component, RequestView};
use crate::der;
use crate::digest;
use crate::headers::{
    ACCEPT_SIGNATURE, CONTENT_DIGEST, SIGNATURE, SIGNATURE_INPUT, STEPUP_BINDING,
};
use crate::sf;
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
        parse_challenge(value)
    }

    /// The stepup challenge in a response's headers, if any.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Challenge>, ChallengeError> {
        match sf::combined(headers, &ACCEPT_SIGNATURE, MAX_ACCEPT_SIGNATURE_LEN) {
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
        self.clone().apply_into(headers);
    }

    /// [`SignedHeaders::apply`], moving the values in: a clone of a freshly
    /// built value costs an allocation each.
    pub fn apply_into(self, headers: &mut HeaderMap) {
        headers.reserve(4);
        headers.insert(CONTENT_DIGEST, self.content_digest);
        headers.insert(STEPUP_BINDING, self.stepup_binding);
        headers.insert(SIGNATURE_INPUT, self.signature_input);
        headers.insert(SIGNATURE, self.signature);
    }
}

enum KeyKind {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    /// A key in a token: signs through it, never read.
    External(std::sync::Arc<dyn keyproof_identity::keys::ExternalKey>),
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

    /// From a key held outside the process (a PKCS#11 token) and the
    /// workload certificate (DER); checks that they belong together, as
    /// [`Signer::from_pkcs8_and_cert`] does.
    pub fn from_external_and_cert(
        key: std::sync::Arc<dyn keyproof_identity::keys::ExternalKey>,
        cert_der: &[u8],
    ) -> Result<Signer, KeyError> {
        let alg = Alg::from_spki_der(key.spki_der())?;
        let keyid = keyid_for_spki(key.spki_der());
        let spki = der::cert_spki(cert_der).ok_or(KeyError::MalformedCertificate)?;
        if keyid_for_spki(spki) != keyid {
            return Err(KeyError::KeyCertMismatch);
        }
        Ok(Signer {
            key: KeyKind::External(key),
            alg,
            keyid,
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
            KeyKind::External(k) => k.sign_raw(message).map_err(|_| SignError::Crypto),
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
        // The nonce is copied into a header: it must be a valid sf-string
        // (the keyid is base64url, always valid).
        sfv::StringRef::from_str(&challenge.nonce).map_err(|_| SignError::Encoding)?;
        let created = i64::try_from(now)
            .ok()
            .filter(|n| *n <= MAX_SF_INTEGER)
            .ok_or(SignError::Encoding)?;
        let has_content_type = req.has_content_type();

        let content_digest = if body.is_empty() {
            EMPTY_CONTENT_DIGEST.to_owned()
        } else {
            digest::content_digest(body)
        };
        let mut binding = String::with_capacity(2 + BINDING_B64_LEN);
        binding.push(':');
        STANDARD.encode_string(exporter, &mut binding);
        binding.push(':');

        // `Signature-Input` is `stepup=` and the signature parameters, which
        // the base's last line repeats: written once, borrowed for the base.
        let mut input = Vec::with_capacity(INPUT_CAPACITY);
        input.extend_from_slice(b"stepup=");
        input.extend_from_slice(signature_params_start(has_content_type).as_bytes());
        sf::push_integer(&mut input, created);
        input.extend_from_slice(b";nonce=");
        sf::push_string(&mut input, &challenge.nonce);
        input.extend_from_slice(b";alg=\"");
        input.extend_from_slice(self.alg.name().as_bytes());
        input.extend_from_slice(b"\";keyid=\"");
        input.extend_from_slice(self.keyid.as_bytes());
        input.extend_from_slice(b"\";tag=\"");
        input.extend_from_slice(TAG.as_bytes());
        input.push(b'"');
        let params = &input[LABEL.len() + 1..];

        let mut base = Vec::with_capacity(BASE_CAPACITY + params.len());
        for &c in Component::required(has_content_type) {
            base::push_line_start(&mut base, c);
            match c {
                Component::ContentDigest => base.extend_from_slice(content_digest.as_bytes()),
                Component::StepupBinding => base.extend_from_slice(binding.as_bytes()),
                other => {
                    if !req.push_component_value(other, &mut base) {
                        return Err(SignError::NoAuthority);
                    }
                }
            }
            base.push(b'\n');
        }
        base.extend_from_slice(base::SIGNATURE_PARAMS_LINE);
        base.extend_from_slice(params);
        let sig = self.sign_raw(&base)?;

        let mut signature = String::with_capacity(LABEL.len() + 3 + SIGNATURE_B64_LEN);
        signature.push_str(LABEL);
        signature.push_str("=:");
        STANDARD.encode_string(&sig, &mut signature);
        signature.push(':');

        let hv = |s: String| HeaderValue::try_from(s).map_err(|_| SignError::Encoding);
        let mut signature_input = HeaderValue::from_maybe_shared(bytes::Bytes::from(input))
            .map_err(|_| SignError::Encoding)?;
        let mut signature = hv(signature)?;
        // Single-use values: never worth a place in an HPACK table, where
        // each would push out fields that do repeat (RFC 7541 §7.1.3).
        signature_input.set_sensitive(true);
        signature.set_sensitive(true);
        Ok(SignedHeaders {
            content_digest: hv(content_digest)?,
            stepup_binding: hv(binding)?,
            signature_input,
            signature,
        })
    }
}

/// The largest sf-integer (RFC 9651 §3.3.1).
const MAX_SF_INTEGER: i64 = 999_999_999_999_999;
/// `Content-Digest` of an empty body (SHA-256 of nothing).
const EMPTY_CONTENT_DIGEST: &str = "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:";
/// Base64 of the 32-byte binding and of a 64-byte signature.
const BINDING_B64_LEN: usize = 44;
const SIGNATURE_B64_LEN: usize = 88;
/// Room for `Signature-Input` and for a base's component lines.
const INPUT_CAPACITY: usize = 320;
const BASE_CAPACITY: usize = 320;

/// The signature parameters up to `created`'s value: the component list in
/// the design's order.
const fn signature_params_start(has_content_type: bool) -> &'static str {
    if has_content_type {
        r#"("@method" "@authority" "@path" "@query" "content-type" "content-digest" "stepup-binding");created="#
    } else {
        r#"("@method" "@authority" "@path" "@query" "content-digest" "stepup-binding");created="#
    }
}

// ---------------------------------------------------------------------------
// Reading `Accept-Signature`: the same results as a parsed `Dictionary`
// (RFC 9651: the last of duplicate keys wins), without building one.
// ---------------------------------------------------------------------------

/// One string parameter of a challenge, as the last occurrence left it.
#[derive(Default)]
enum Param {
    #[default]
    Missing,
    /// Present, but not a string.
    Bad,
    Value(std::string::String),
}

impl Param {
    fn take(self, name: &'static str) -> Result<std::string::String, ChallengeError> {
        match self {
            Param::Value(s) => Ok(s),
            Param::Missing | Param::Bad => Err(ChallengeError::MissingParam(name)),
        }
    }
}

/// The `stepup` member of an `Accept-Signature` dictionary, as read.
#[derive(Default)]
struct ChallengeVisitor {
    found: bool,
    bad_components: bool,
    components: Vec<std::string::String>,
    nonce: Param,
    alg: Param,
    keyid: Param,
    tag: Param,
}

impl ChallengeVisitor {
    fn into_challenge(self) -> Result<Option<Challenge>, ChallengeError> {
        if !self.found {
            return Ok(None);
        }
        if self.bad_components {
            return Err(ChallengeError::Components);
        }
        Ok(Some(Challenge {
            components: self.components,
            nonce: self.nonce.take("nonce")?,
            alg: self.alg.take("alg")?,
            keyid: self.keyid.take("keyid")?,
            tag: self.tag.take("tag")?,
        }))
    }
}

/// Parses an `Accept-Signature` value into its `stepup` member: the same
/// results as reading it from a parsed `Dictionary` (syntax errors first,
/// then the member's shape, then each parameter in turn), in one visitor
/// pass, or one scan when it is written canonically.
fn parse_challenge(input: &str) -> Result<Option<Challenge>, ChallengeError> {
    if let Some(ch) = canonical_challenge(input) {
        return ch;
    }
    sfv::Parser::new(input)
        .parse_dictionary_with_visitor(ChallengeVisitor::default())
        .map_err(|_| ChallengeError::Syntax)?
        .into_challenge()
}

/// The common case of [`parse_challenge`] in one scan: a field that is
/// exactly the serialisation of a single `stepup` member ([`scan_member`]),
/// as verifiers write it. `None` for anything else (the general parser's).
fn canonical_challenge(input: &str) -> Option<Result<Option<Challenge>, ChallengeError>> {
    let scanned = sf::scan_member(input.strip_prefix("stepup=")?)?;
    let mut v = ChallengeVisitor {
        found: true,
        components: scanned
            .components
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect(),
        ..ChallengeVisitor::default()
    };
    for (key, value) in scanned.params {
        let slot = match key.as_str() {
            "nonce" => &mut v.nonce,
            "alg" => &mut v.alg,
            "keyid" => &mut v.keyid,
            "tag" => &mut v.tag,
            _ => continue,
        };
        *slot = match value {
            sf::Scalar::String(s) => Param::Value(s.as_str().to_owned()),
            sf::Scalar::Integer(_) | sf::Scalar::True => Param::Bad,
        };
    }
    Some(v.into_challenge())
}

impl<'de> DictionaryVisitor<'de> for ChallengeVisitor {
    type Out = ChallengeVisitor;
    type Error = Infallible;

    fn entry(&mut self, key: &'de KeyRef) -> Result<impl EntryVisitor<'de>, Self::Error> {
        Ok(if key.as_str() == crate::LABEL {
            // The last `stepup` member is the one that counts.
            *self = ChallengeVisitor {
                found: true,
                ..ChallengeVisitor::default()
            };
            Some(self)
        } else {
            None
        })
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(self)
    }
}

impl<'de> EntryVisitor<'de> for &mut ChallengeVisitor {
    type Error = Infallible;

    fn item(self) -> Result<impl ItemVisitor<'de>, Self::Error> {
        // A signature request is an inner list of component names.
        self.bad_components = true;
        Ok(Ignored)
    }

    fn inner_list(self) -> Result<impl InnerListVisitor<'de>, Self::Error> {
        Ok(self)
    }
}

impl<'de> InnerListVisitor<'de> for &mut ChallengeVisitor {
    type Error = Infallible;

    fn item(&mut self) -> Result<impl ItemVisitor<'de>, Self::Error> {
        Ok(ChallengeComponent(self))
    }

    fn finish(self) -> Result<impl ParameterVisitor<'de>, Self::Error> {
        Ok(ChallengeParams(self))
    }
}

struct ChallengeComponent<'a>(&'a mut ChallengeVisitor);

impl<'de> ItemVisitor<'de> for ChallengeComponent<'_> {
    type Out = ();
    type Error = Infallible;

    fn bare_item(
        self,
        v: BareItemFromInput<'de>,
    ) -> Result<impl ParameterVisitor<'de, Out = Self::Out>, Self::Error> {
        match v {
            BareItemFromInput::String(s) => self.0.components.push(s.as_str().to_owned()),
            _ => self.0.bad_components = true,
        }
        Ok(self)
    }
}

impl<'de> ParameterVisitor<'de> for ChallengeComponent<'_> {
    type Out = ();
    type Error = Infallible;

    fn parameter(&mut self, _: &'de KeyRef, _: BareItemFromInput<'de>) -> Result<(), Self::Error> {
        self.0.bad_components = true;
        Ok(())
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(())
    }
}

struct ChallengeParams<'a>(&'a mut ChallengeVisitor);

impl<'de> ParameterVisitor<'de> for ChallengeParams<'_> {
    type Out = ();
    type Error = Infallible;

    fn parameter(
        &mut self,
        key: &'de KeyRef,
        v: BareItemFromInput<'de>,
    ) -> Result<(), Self::Error> {
        let slot = match key.as_str() {
            "nonce" => &mut self.0.nonce,
            "alg" => &mut self.0.alg,
            "keyid" => &mut self.0.keyid,
            "tag" => &mut self.0.tag,
            // Other parameters (`created`, future ones) are not read.
            _ => return Ok(()),
        };
        *slot = match v {
            BareItemFromInput::String(s) => Param::Value(s.as_str().to_owned()),
            _ => Param::Bad,
        };
        Ok(())
    }

    fn finish(self) -> Result<Self::Out, Self::Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use sfv::{BareItem, Dictionary, ListEntry, Parser};

    use crate::sf::shortcut_tests::{mutate, Rng};

    /// `Challenge::parse` as it was written over a parsed `Dictionary`.
    fn challenge_by_dictionary(value: &str) -> Result<Option<Challenge>, ChallengeError> {
        let dict: Dictionary = Parser::new(value)
            .parse()
            .map_err(|_| ChallengeError::Syntax)?;
        let Some(entry) = dict.get(crate::LABEL) else {
            return Ok(None);
        };
        let ListEntry::InnerList(member) = entry else {
            return Err(ChallengeError::Components);
        };
        let mut components = Vec::new();
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

    #[test]
    fn challenges_read_as_from_a_dictionary() {
        let ok = r#"stepup=("@method" "@path");created;nonce="n";alg="ed25519";keyid="k";tag="stepup-v1""#;
        for input in [
            ok,
            "",
            "stepup=(",
            "other=(\"@method\")",
            r#"stepup=("@method");nonce="n1";nonce="n2";alg="a";keyid="k";tag="t""#,
            r#"stepup=("@method");nonce=1;nonce="n2";alg="a";keyid="k";tag="t""#,
            r#"stepup=("@method");nonce="n";nonce=2;alg="a";keyid="k";tag="t""#,
            r#"stepup=("@method");nonce="n";alg="a";keyid="k""#,
            r#"stepup=("@method");alg="a";keyid="k";tag="t""#,
            r#"stepup=("@method";x);nonce="n";alg="a";keyid="k";tag="t""#,
            r#"stepup=(@method);nonce="n";alg="a";keyid="k";tag="t""#,
            r#"stepup="x";nonce="n";alg="a";keyid="k";tag="t""#,
            r#"stepup;nonce="n";alg="a";keyid="k";tag="t""#,
            r#"stepup=("a"), stepup=("b");nonce="n";alg="a";keyid="k";tag="t""#,
            r#"stepup=("a");nonce="n";alg="a";keyid="k";tag="t", stepup=(1)"#,
            r#"stepup=("a");nonce="n";alg="a";keyid="k";tag="t", stepup=?1"#,
            r#"x=1, stepup=("a" "b");nonce="n";alg="a";keyid="k";tag="t";other=:AA==:, y"#,
            r#"stepup=();nonce="";alg="";keyid="";tag="""#,
            r#"stepup=("\"q\\");nonce="n\"";alg="a";keyid="k";tag="t""#,
        ] {
            assert_eq!(
                parse_challenge(input),
                challenge_by_dictionary(input),
                "{input}"
            );
        }
    }

    const CHALLENGES: &[&str] = &[
        r#"stepup=("@method" "@authority" "@path" "@query" "content-type" "content-digest" "stepup-binding");created;nonce="AbC-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH";alg="ed25519";keyid="k-_Z";tag="stepup-v1""#,
        r#"stepup=("a");nonce="n";alg="a";keyid="k";tag="t""#,
        r#"stepup=();x;nonce=1;alg="a""#,
    ];

    #[test]
    fn challenges_read_alike() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut shortcut = 0;
        for n in 0..60_000 {
            let seed = CHALLENGES[n % CHALLENGES.len()];
            let input = if n < CHALLENGES.len() {
                seed.to_owned()
            } else {
                mutate(&mut rng, seed)
            };
            shortcut += usize::from(canonical_challenge(&input).is_some());
            assert_eq!(
                parse_challenge(&input),
                challenge_by_dictionary(&input),
                "{input}"
            );
        }
        assert!(shortcut > 5_000, "{shortcut}");
    }

    #[test]
    fn fixed_strings_match_what_they_stand_for() {
        assert_eq!(EMPTY_CONTENT_DIGEST, digest::content_digest(b""));
        for has_content_type in [true, false] {
            let names: Vec<String> = Component::required(has_content_type)
                .iter()
                .map(|c| format!("\"{}\"", c.name()))
                .collect();
            assert_eq!(
                signature_params_start(has_content_type),
                format!("({});created=", names.join(" "))
            );
        }
        assert_eq!(STANDARD.encode([0u8; BINDING_LEN]).len(), BINDING_B64_LEN);
        assert_eq!(STANDARD.encode([0u8; 64]).len(), SIGNATURE_B64_LEN);
    }
}
