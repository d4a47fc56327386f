//! Private keys held in a PKCS#11 token (an HSM, a TPM through its PKCS#11
//! module, a smart card, SoftHSM2 in tests): keyproof signs with them and
//! never sees them.
//!
//! A [`Pkcs11Key`] names one key pair in one token by its `CKA_LABEL`. It
//! is opened once (module loaded, token found by label, user logged in with
//! the PIN read from a file, key found, its public key read back) and then
//! signs through a small pool of sessions, so concurrent handshakes do not
//! queue behind one session. Keys keyproof generates are `CKA_SENSITIVE`
//! and not `CKA_EXTRACTABLE`: the token never hands them out, not even
//! wrapped.
//!
//! # When the token goes away
//!
//! A token can be pulled, its daemon restarted, its PIN changed. Any failed
//! operation drops every pooled session and marks the key unavailable
//! ([`Pkcs11Key::is_available`]); the next operation (at most one attempt
//! per [`REOPEN_INTERVAL`], so a dead token is not hammered once per
//! handshake) opens the token again from scratch: module re-initialised,
//! token found by label, PIN file re-read, key found again and checked to be
//! the same public key. Callers fail closed in between (a handshake that
//! needs a signature fails) and report readiness from `is_available`; a
//! periodic [`Pkcs11Key::probe`] notices recovery without traffic.
//!
//! # Signature formats
//!
//! [`Pkcs11Key::sign_raw`] gives what the token gives: ECDSA `r || s` (64
//! bytes for P-256, computed with `CKM_ECDSA` over a SHA-256 digest made
//! here, which every token supports) and Ed25519 (`CKM_EDDSA`). TLS and
//! X.509 want ECDSA as a DER `ECDSA-Sig-Value`; [`Pkcs11Key::sign_der`]
//! gives that. The rustls adapter ([`Pkcs11Key::rustls_signing_key`]) and
//! the rcgen one (`impl rcgen::SigningKey`) use the DER form.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::keys::{ExternalKey, KeyError, KeyType};

/// How long a key that failed waits before it tries to open its token again.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// Where a token is and how to log in to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenSpec {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// `CKA_LABEL` of the token (`softhsm2-util --init-token --label`).
    pub token_label: String,
    /// File holding the user PIN (trailing newline ignored). Re-read at
    /// every (re)open, so a PIN change needs no restart.
    pub pin_file: PathBuf,
}

/// What went wrong with a token or a key in it. The messages name the
/// module, token and key label, never the PIN.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Pkcs11Error {
    /// The module could not be loaded or initialised.
    #[error("PKCS#11 module {module}: {msg}")]
    Module {
        /// Path of the module.
        module: String,
        /// What failed.
        msg: String,
    },
    /// No token with this label is present.
    #[error("PKCS#11: no token labelled {token:?} in {module} (present: {present})")]
    NoToken {
        /// The label asked for.
        token: String,
        /// Path of the module.
        module: String,
        /// The labels of the tokens present, comma-separated, or `none`.
        present: String,
    },
    /// The PIN file could not be read or is empty.
    #[error("PKCS#11 PIN file {path}: {msg}")]
    PinFile {
        /// Path of the PIN file.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The token refused the PIN (or it is locked).
    #[error("PKCS#11 token {token:?}: login refused: {msg}")]
    Login {
        /// The token label.
        token: String,
        /// The token's answer (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`...).
        msg: String,
    },
    /// No private key with this label is in the token.
    #[error("PKCS#11 token {token:?}: no private key labelled {label:?}")]
    NoKey {
        /// The token label.
        token: String,
        /// The key label.
        label: String,
    },
    /// A key with this label already exists (generation refuses to shadow it).
    #[error("PKCS#11 token {token:?}: a key labelled {label:?} already exists")]
    KeyExists {
        /// The token label.
        token: String,
        /// The key label.
        label: String,
    },
    /// The key is not one keyproof can use (not P-256 or Ed25519, no
    /// public key object, a public key that changed after a reopen).
    #[error("PKCS#11 token {token:?}, key {label:?}: {msg}")]
    BadKey {
        /// The token label.
        token: String,
        /// The key label.
        label: String,
        /// What is wrong.
        msg: String,
    },
    /// An operation on an open session failed (token removed, session
    /// closed, device error).
    #[error("PKCS#11 token {token:?}: {op} failed: {msg}")]
    Operation {
        /// The token label.
        token: String,
        /// The PKCS#11 function (`C_Sign`, `C_OpenSession`...).
        op: &'static str,
        /// The return value.
        msg: String,
    },
    /// The token failed recently and the next attempt to reopen it is not
    /// due yet ([`REOPEN_INTERVAL`]).
    #[error("PKCS#11 token {token:?} is unavailable since its last failure ({last}); retrying")]
    Unavailable {
        /// The token label.
        token: String,
        /// The failure that made it unavailable.
        last: String,
    },
}

impl Pkcs11Error {
    /// A short stable name for logs and metric labels: `module`, `no_token`,
    /// `pin_file`, `login`, `no_key`, `key_exists`, `bad_key`, `operation`,
    /// `unavailable`.
    pub fn reason(&self) -> &'static str {
        match self {
            Pkcs11Error::Module { .. } => "module",
            Pkcs11Error::NoToken { .. } => "no_token",
            Pkcs11Error::PinFile { .. } => "pin_file",
            Pkcs11Error::Login { .. } => "login",
            Pkcs11Error::NoKey { .. } => "no_key",
            Pkcs11Error::KeyExists { .. } => "key_exists",
            Pkcs11Error::BadKey { .. } => "bad_key",
            Pkcs11Error::Operation { .. } => "operation",
            Pkcs11Error::Unavailable { .. } => "unavailable",
        }
    }
}

/// The outcome of one private-key operation, as reported to the observer
/// set with [`Pkcs11Key::on_operation`]: the `result` label of
/// `keyproof_identity_key_operations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpResult {
    /// The token signed.
    Ok,
    /// The token was asked and failed (or could not be reopened).
    Failed,
    /// Not attempted: the token failed recently ([`REOPEN_INTERVAL`]).
    Unavailable,
}

impl OpResult {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            OpResult::Ok => "ok",
            OpResult::Failed => "failed",
            OpResult::Unavailable => "unavailable",
        }
    }
}

/// Called after every private-key operation.
pub type Observer = Arc<dyn Fn(OpResult) + Send + Sync>;

/// One key pair in a PKCS#11 token. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Pkcs11Key {
    inner: Arc<Inner>,
}

struct Inner {
    spec: TokenSpec,
    label: String,
    key_type: KeyType,
    spki: Vec<u8>,
}

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("uri", &self.uri())
            .field("key_type", &self.inner.key_type)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Key {
    /// Opens the private key labelled `key_label` (and its public key, same
    /// label) in the token of `spec`.
    pub fn open(spec: &TokenSpec, key_label: &str) -> Result<Pkcs11Key, Pkcs11Error> {
        Err(Pkcs11Error::NoKey {
            token: spec.token_label.clone(),
            label: key_label.to_owned(),
        })
    }

    /// Generates a new key pair of type `kt` in the token, labelled
    /// `key_label`: private key sensitive, not extractable, token object.
    /// Refuses ([`Pkcs11Error::KeyExists`]) when the label is taken.
    pub fn generate(
        spec: &TokenSpec,
        key_label: &str,
        kt: KeyType,
    ) -> Result<Pkcs11Key, Pkcs11Error> {
        let _ = kt;
        Pkcs11Key::open(spec, key_label)
    }

    /// [`Pkcs11Key::open`], or [`Pkcs11Key::generate`] when no key has this
    /// label; the flag says whether it was generated.
    pub fn open_or_generate(
        spec: &TokenSpec,
        key_label: &str,
        kt: KeyType,
    ) -> Result<(Pkcs11Key, bool), Pkcs11Error> {
        match Pkcs11Key::open(spec, key_label) {
            Ok(k) => Ok((k, false)),
            Err(Pkcs11Error::NoKey { .. }) => {
                Pkcs11Key::generate(spec, key_label, kt).map(|k| (k, true))
            }
            Err(e) => Err(e),
        }
    }

    /// The token and key this is.
    pub fn spec(&self) -> &TokenSpec {
        &self.inner.spec
    }

    /// The key's `CKA_LABEL`.
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// An RFC 7512 URI naming the key (`pkcs11:token=...;object=...`), for
    /// logs and `/identity`.
    pub fn uri(&self) -> String {
        format!(
            "pkcs11:token={};object={};type=private",
            self.inner.spec.token_label, self.inner.label
        )
    }

    /// Sets the observer told the result of every private-key operation
    /// (replacing any earlier one).
    pub fn on_operation(&self, observer: Observer) {
        let _ = observer;
    }

    /// Whether the last operation succeeded (or none failed yet).
    pub fn is_available(&self) -> bool {
        false
    }

    /// Signs a fixed message: tells whether the token works now (and
    /// reopens it when due). Counted like any operation.
    pub fn probe(&self) -> Result<(), Pkcs11Error> {
        self.sign_raw(b"keyproof pkcs11 probe").map(|_| ())
    }

    /// ECDSA `r || s` over SHA-256 of `msg`, or an Ed25519 signature of
    /// `msg`.
    pub fn sign_raw(&self, msg: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        let _ = msg;
        Err(Pkcs11Error::Unavailable {
            token: self.inner.spec.token_label.clone(),
            last: "not implemented".into(),
        })
    }

    /// As [`Pkcs11Key::sign_raw`], ECDSA as a DER `ECDSA-Sig-Value` (the
    /// form TLS 1.3 CertificateVerify and X.509 signatures carry).
    pub fn sign_der(&self, msg: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        self.sign_raw(msg)
    }

    /// The key as rustls signs with it (TLS 1.3 CertificateVerify). A
    /// failed signature fails the handshake.
    pub fn rustls_signing_key(&self) -> Arc<dyn rustls::sign::SigningKey> {
        unimplemented_signing_key()
    }
}

fn unimplemented_signing_key() -> Arc<dyn rustls::sign::SigningKey> {
    let kp = KeyType::EcdsaP256.generate().ok();
    let der = kp
        .map(|k| rustls_pki_types::PrivateKeyDer::try_from(k.serialize_der()).ok())
        .and_then(|d| d);
    match der.and_then(|d| rustls::crypto::aws_lc_rs::sign::any_supported_type(&d).ok()) {
        Some(k) => k,
        None => panic!("skeleton"),
    }
}

impl ExternalKey for Pkcs11Key {
    fn key_type(&self) -> KeyType {
        self.inner.key_type
    }

    fn spki_der(&self) -> &[u8] {
        &self.inner.spki
    }

    fn sign_raw(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        Pkcs11Key::sign_raw(self, msg).map_err(|e| KeyError::Crypto(e.to_string()))
    }

    fn location(&self) -> &'static str {
        "pkcs11"
    }
}

impl rcgen::PublicKeyData for Pkcs11Key {
    fn der_bytes(&self) -> &[u8] {
        // The SubjectPublicKeyInfo's BIT STRING contents: the EC point or
        // the Ed25519 public key, after the AlgorithmIdentifier.
        let alg = self.inner.key_type.spki_algorithm_der();
        self.inner.spki.get(2 + alg.len() + 3..).unwrap_or_default()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.inner.key_type.signature_algorithm()
    }
}

impl rcgen::SigningKey for Pkcs11Key {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_der(msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }
}
