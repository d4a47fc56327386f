//! The workload's private key, wherever it lives: a PEM file
//! (`[identity.files] key`), process memory (generated for each
//! `[identity.ca]` issuance), or a PKCS#11 token (`[identity.pkcs11]`).
//!
//! Everything that signs with the workload key (rustls for the
//! CertificateVerify of both directions, the step-up signer, the CSR) takes
//! it from a [`WorkloadKey`], so none of them needs to know where the key
//! is. A token key is never in this process: rustls gets the token's
//! signing adapter, step-up an [`ExternalKey`], and the material digest its
//! public key and URI (what identifies it, no secret).
//!
//! A token can go away while the proxy runs. [`TokenKey`] remembers the
//! last failure for `/ready`, and [`TokenKey::spawn_probe`] signs a probe
//! message now and then (every [`PROBE_WHILE_DOWN`] while the key is
//! unavailable, every [`PROBE_WHILE_UP`] otherwise), so that loss and
//! recovery are noticed without traffic and without a restart.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyproof_identity::keys::{ExternalKey, KeyType};
use keyproof_identity::pkcs11::{OpResult, Pkcs11Error, Pkcs11Key};
use rustls_pki_types::PrivateKeyDer;

use crate::config::Pkcs11Config;
use crate::identity::store::IdentityError;
use crate::metrics::Metrics;

/// How often an unavailable token key is probed (its recovery is noticed
/// within this).
pub const PROBE_WHILE_DOWN: Duration = Duration::from_secs(1);
/// How often a working token key is probed (its loss, without traffic, is
/// noticed within this).
pub const PROBE_WHILE_UP: Duration = Duration::from_secs(10);

/// Where the workload key lives: the `location` of `/identity` and of
/// `keyproof_identity_key_location`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLocation {
    /// A PEM file (`[identity.files] key`).
    File,
    /// Process memory (`[identity.ca]` without a token).
    Memory,
    /// A PKCS#11 token (`[identity.pkcs11]`).
    Pkcs11,
}

impl KeyLocation {
    /// Every location, in a fixed order (the metric's label values).
    pub const ALL: [KeyLocation; 3] = [KeyLocation::File, KeyLocation::Memory, KeyLocation::Pkcs11];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyLocation::File => "file",
            KeyLocation::Memory => "memory",
            KeyLocation::Pkcs11 => "pkcs11",
        }
    }
}

/// The configuration key a token error is about, for startup errors:
/// the module that would not load, the token not found, the PIN file that
/// could not be read or whose PIN was refused, the key not found or
/// unusable.
pub fn pkcs11_config_key(e: &Pkcs11Error) -> &'static str {
    match e.reason() {
        "module" => "identity.pkcs11.module",
        "no_token" => "identity.pkcs11.token_label",
        "pin_file" | "login" => "identity.pkcs11.pin_file",
        "no_key" | "bad_key" | "key_exists" => "identity.pkcs11.key_label",
        _ => "identity.pkcs11",
    }
}

/// A key in a PKCS#11 token, with what the proxy tracks about it.
pub struct TokenKey {
    key: Pkcs11Key,
    /// The last failure seen by the probe (or at open), for `/ready`;
    /// None once the key works again.
    last_error: Mutex<Option<String>>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("uri", &self.key.uri())
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Opens the key `cfg` names. With `generate`, a key of that type is
    /// generated in the token when none has the label (`[identity.ca]`);
    /// without, a missing key is an error naming `identity.pkcs11.key_label`
    /// (`[identity.files]`: the certificate is for a key that must exist).
    /// Blocking (the token is opened and logged in to).
    pub fn open(
        cfg: &Pkcs11Config,
        generate: Option<KeyType>,
    ) -> Result<Arc<TokenKey>, IdentityError> {
        let spec = cfg.token_spec();
        let opened = match generate {
            Some(kt) => Pkcs11Key::open_or_generate(&spec, &cfg.key_label, kt).map(|(k, new)| {
                if new {
                    tracing::info!(
                        uri = %k.uri(),
                        key_type = %kt,
                        "generated the workload key in the PKCS#11 token (not extractable)"
                    );
                }
                k
            }),
            None => Pkcs11Key::open(&spec, &cfg.key_label),
        };
        let key = opened.map_err(|e| IdentityError::Invalid {
            key: pkcs11_config_key(&e),
            msg: e.to_string(),
        })?;
        tracing::info!(uri = %key.uri(), key_type = %key.key_type(), "workload key opened in the PKCS#11 token");
        Ok(Arc::new(TokenKey::new(key)))
    }

    /// Tracks `key` (already opened).
    pub fn new(key: Pkcs11Key) -> TokenKey {
        TokenKey {
            key,
            last_error: Mutex::new(None),
        }
    }

    /// The token key.
    pub fn key(&self) -> &Pkcs11Key {
        &self.key
    }

    /// Counts every private-key operation of the key in
    /// `keyproof_identity_key_operations_total`.
    pub fn observe(&self, metrics: &Metrics) {
        let metrics = metrics.clone();
        self.key.on_operation(Arc::new(move |r: OpResult| {
            metrics.key_operation(r.as_str())
        }));
    }

    /// Why the key cannot sign now, or None while it can.
    pub fn unavailable(&self) -> Option<String> {
        if self.key.is_available() {
            return None;
        }
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Some(last.unwrap_or_else(|| format!("{} failed its last operation", self.key.uri())))
    }

    /// One probe signature on a blocking thread; records and logs each
    /// change between working and failing. Returns whether it signed.
    pub async fn probe_once(self: &Arc<Self>) -> bool {
        let me = self.clone();
        let outcome = tokio::task::spawn_blocking(move || me.key.probe())
            .await
            .map_err(|e| format!("probe task: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => {
                if last.take().is_some() {
                    tracing::info!(uri = %self.key.uri(), "the PKCS#11 workload key works again");
                }
                true
            }
            Err(e) => {
                if last.is_none() {
                    tracing::warn!(
                        uri = %self.key.uri(),
                        error = %e,
                        "the PKCS#11 workload key is unavailable; handshakes and step-up signatures fail until it is back"
                    );
                }
                *last = Some(e);
                false
            }
        }
    }

    /// Probes the key until the task is aborted: every [`PROBE_WHILE_UP`]
    /// while it works, every [`PROBE_WHILE_DOWN`] while it does not (a
    /// handshake that fails in between also makes it unavailable, which
    /// shortens the next wait).
    pub fn spawn_probe(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut waited = Duration::ZERO;
            loop {
                let step = if me.key.is_available() {
                    PROBE_WHILE_UP
                } else {
                    PROBE_WHILE_DOWN
                };
                // Sleeps in short steps so that a failure seen by a
                // handshake switches to the fast probe at once.
                tokio::time::sleep(PROBE_WHILE_DOWN).await;
                waited += PROBE_WHILE_DOWN;
                if waited >= step || !me.key.is_available() {
                    waited = Duration::ZERO;
                    me.probe_once().await;
                }
            }
        })
    }
}

/// The workload key of one identity.
pub enum WorkloadKey {
    /// A key in process memory, read from a file or generated here.
    InProcess {
        /// PKCS#8, SEC1 or PKCS#1 DER. Never logged.
        der: PrivateKeyDer<'static>,
        /// [`KeyLocation::File`] or [`KeyLocation::Memory`].
        location: KeyLocation,
    },
    /// A key in a PKCS#11 token.
    Pkcs11(Arc<TokenKey>),
}

impl fmt::Debug for WorkloadKey {
    // Hand-written so that key bytes never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadKey::InProcess { location, .. } => f
                .debug_struct("WorkloadKey")
                .field("location", &location.as_str())
                .finish_non_exhaustive(),
            WorkloadKey::Pkcs11(t) => f
                .debug_struct("WorkloadKey")
                .field("location", &"pkcs11")
                .field("uri", &t.key.uri())
                .finish(),
        }
    }
}

/// A key read from a file: what tests and `[identity.files]` build.
impl From<PrivateKeyDer<'static>> for WorkloadKey {
    fn from(der: PrivateKeyDer<'static>) -> WorkloadKey {
        WorkloadKey::file(der)
    }
}

impl From<Arc<TokenKey>> for WorkloadKey {
    fn from(t: Arc<TokenKey>) -> WorkloadKey {
        WorkloadKey::Pkcs11(t)
    }
}

impl WorkloadKey {
    /// A key read from `[identity.files] key`.
    pub fn file(der: PrivateKeyDer<'static>) -> WorkloadKey {
        WorkloadKey::InProcess {
            der,
            location: KeyLocation::File,
        }
    }

    /// A key generated in memory for an `[identity.ca]` issuance.
    pub fn memory(der: PrivateKeyDer<'static>) -> WorkloadKey {
        WorkloadKey::InProcess {
            der,
            location: KeyLocation::Memory,
        }
    }

    /// Where it lives.
    pub fn location(&self) -> KeyLocation {
        match self {
            WorkloadKey::InProcess { location, .. } => *location,
            WorkloadKey::Pkcs11(_) => KeyLocation::Pkcs11,
        }
    }

    /// The same key (in-process bytes copied; a token key shared).
    pub fn clone_key(&self) -> WorkloadKey {
        match self {
            WorkloadKey::InProcess { der, location } => WorkloadKey::InProcess {
                der: der.clone_key(),
                location: *location,
            },
            WorkloadKey::Pkcs11(t) => WorkloadKey::Pkcs11(t.clone()),
        }
    }

    /// The token key, when the key is in a token.
    pub fn token(&self) -> Option<&Arc<TokenKey>> {
        match self {
            WorkloadKey::Pkcs11(t) => Some(t),
            WorkloadKey::InProcess { .. } => None,
        }
    }

    /// The key as rustls signs with it; for a token key, every signature
    /// is made by the token (and a failed one fails the handshake).
    pub fn rustls_signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        match self {
            WorkloadKey::InProcess { der, .. } => {
                rustls::crypto::aws_lc_rs::sign::any_supported_type(der)
            }
            WorkloadKey::Pkcs11(t) => Ok(t.key.rustls_signing_key()),
        }
    }

    /// The public key (DER SubjectPublicKeyInfo) of a token key; None for a
    /// key in process memory (rustls derives it).
    pub fn spki_der(&self) -> Option<&[u8]> {
        match self {
            WorkloadKey::Pkcs11(t) => Some(ExternalKey::spki_der(&t.key)),
            WorkloadKey::InProcess { .. } => None,
        }
    }

    /// Feeds what identifies the key to a digest: the secret bytes of a key
    /// in memory (hashed in place, never copied); the public key and URI of
    /// a token key (it has no bytes here, and the same token key must digest
    /// the same).
    pub fn digest_parts(&self, part: &mut dyn FnMut(&[u8])) {
        match self {
            WorkloadKey::InProcess { der, .. } => part(der.secret_der()),
            WorkloadKey::Pkcs11(t) => {
                part(b"pkcs11");
                part(ExternalKey::spki_der(&t.key));
                part(t.key.uri().as_bytes());
            }
        }
    }

    /// Why the key cannot sign now (a token that went away), or None.
    pub fn unavailable(&self) -> Option<String> {
        self.token().and_then(|t| t.unavailable())
    }

    /// The `key` object of `/identity`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "location": self.location().as_str(),
            "available": self.unavailable().is_none(),
        });
        if let WorkloadKey::Pkcs11(t) = self {
            json["uri"] = t.key.uri().into();
            json["key_type"] = t.key.key_type().as_str().into();
        }
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_errors_name_the_configuration_key() {
        let cases = [
            (
                Pkcs11Error::Module {
                    module: "/x.so".into(),
                    msg: "not found".into(),
                },
                "identity.pkcs11.module",
            ),
            (
                Pkcs11Error::NoToken {
                    token: "t".into(),
                    module: "/x.so".into(),
                    present: "none".into(),
                },
                "identity.pkcs11.token_label",
            ),
            (
                Pkcs11Error::PinFile {
                    path: "/pin".into(),
                    msg: "missing".into(),
                },
                "identity.pkcs11.pin_file",
            ),
            (
                Pkcs11Error::Login {
                    token: "t".into(),
                    msg: "CKR_PIN_INCORRECT".into(),
                },
                "identity.pkcs11.pin_file",
            ),
            (
                Pkcs11Error::NoKey {
                    token: "t".into(),
                    label: "k".into(),
                },
                "identity.pkcs11.key_label",
            ),
            (
                Pkcs11Error::BadKey {
                    token: "t".into(),
                    label: "k".into(),
                    msg: "RSA".into(),
                },
                "identity.pkcs11.key_label",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(pkcs11_config_key(&e), want, "{e}");
        }
    }

    #[test]
    fn a_key_in_memory_says_where_it_lives_and_never_shows_its_bytes() {
        let kp = keyproof_identity::keys::KeyType::EcdsaP256
            .generate()
            .expect("key");
        let der = PrivateKeyDer::try_from(kp.serialize_der()).expect("DER");
        let secret = hex::encode(der.secret_der());
        let file = WorkloadKey::from(der.clone_key());
        assert_eq!(file.location(), KeyLocation::File);
        let mem = WorkloadKey::memory(der);
        assert_eq!(mem.location(), KeyLocation::Memory);
        assert_eq!(
            mem.to_json(),
            serde_json::json!({"location": "memory", "available": true})
        );
        let shown = format!("{mem:?}");
        assert!(!shown.contains(&secret[..16]), "{shown}");
        assert!(mem.rustls_signing_key().is_ok());
        assert!(mem.spki_der().is_none() && mem.token().is_none());
    }
}
