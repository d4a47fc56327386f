//! Where the CA's private keys live, and signing with them.
//!
//! A root or intermediate key is one of:
//!
//! - a file in the CA directory (`root.key`, `intermediate.key`): what every
//!   CA made before keys could live anywhere else, and still the default;
//! - an offline file (roots only): written once, outside the CA directory,
//!   to a path the operator chose (`init --root-key-out`, `rotate root
//!   prepare --root-key-out`), and read back only when given on the command
//!   line (`rotate intermediate --root-key`);
//! - a key pair in a PKCS#11 token, found by its `CKA_LABEL`. The token
//!   never hands the key out; keyproof asks it to sign.
//!
//! `ca.json` records each key's location ([`CaKeys`]); a location left out
//! is a file in the directory, so a `ca.json` written before this existed
//! opens unchanged, and a file CA's `ca.json` is written byte for byte as
//! before.
//!
//! # Token key labels
//!
//! Keys keyproof generates in a token are labelled `keyproof-root-<kid>` and
//! `keyproof-intermediate-<kid>`, where `<kid>` is 12 random hex digits
//! chosen before the key is generated (a label cannot be changed afterwards
//! through the key interface, so it cannot be derived from the public key).
//! The same `<kid>` names the certificate (`CN=<td> root <kid>`), so the
//! token object and its certificate are easy to match. Every generation
//! gets a new label; keys that stop being used are left in the token and
//! named in a note under `archive/` (keyproof never deletes token objects).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use keyproof_identity::keys::{self, KeyType};
use keyproof_identity::pkcs11::{Pkcs11Error, Pkcs11Key, TokenSpec};
use rcgen::{KeyPair, PublicKeyData, SigningKey};
use serde::{Deserialize, Serialize};

/// A key pair in a PKCS#11 token, as `ca.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenKeyRef {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// `CKA_LABEL` of the token.
    pub token_label: String,
    /// The PIN file used when the key was generated (`--pin-file` on later
    /// commands overrides it).
    pub pin_file: PathBuf,
    /// `CKA_LABEL` of the key pair.
    pub label: String,
}

impl TokenKeyRef {
    /// The token to open, with the PIN file `pin_override` if given.
    pub fn spec(&self, pin_override: Option<&Path>) -> TokenSpec {
        TokenSpec {
            module: self.module.clone(),
            token_label: self.token_label.clone(),
            pin_file: pin_override
                .map(Path::to_path_buf)
                .unwrap_or_else(|| self.pin_file.clone()),
        }
    }

    /// The RFC 7512 URI of the private key.
    pub fn uri(&self) -> String {
        keyproof_identity::pkcs11::key_uri(&self.token_label, &self.label)
    }
}

/// An offline root key file, as `ca.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineRef {
    /// Where the key was written (on the machine that ran the command), or
    /// `(standard output)`. Only a reminder for error messages: it is never
    /// read unless given again with `--root-key`.
    pub written_to: PathBuf,
}

/// Where one CA key lives.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyLocation {
    /// A file in the CA directory (`<stem>.key`).
    #[default]
    File,
    /// A file kept outside the CA directory (roots only).
    Offline(OfflineRef),
    /// A key pair in a PKCS#11 token.
    Pkcs11(TokenKeyRef),
}

impl KeyLocation {
    /// Whether this is the default (a file in the directory).
    pub fn is_file(&self) -> bool {
        *self == KeyLocation::File
    }

    /// `file`, `offline` or `pkcs11`.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyLocation::File => "file",
            KeyLocation::Offline(_) => "offline",
            KeyLocation::Pkcs11(_) => "pkcs11",
        }
    }

    /// One line saying where the key is, for messages and `check`.
    pub fn describe(&self, stem: &str) -> String {
        match self {
            KeyLocation::File => format!("file {stem}.key in the CA directory"),
            KeyLocation::Offline(o) => format!(
                "offline file, not in the CA directory (written to {})",
                o.written_to.display()
            ),
            KeyLocation::Pkcs11(t) => format!("{} (module {})", t.uri(), t.module.display()),
        }
    }
}

/// The location of every CA key: the `keys` object of `ca.json`. Absent
/// members (and an absent object) are files in the directory.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaKeys {
    /// The root issuance chains to (`root.crt`).
    #[serde(default, skip_serializing_if = "KeyLocation::is_file")]
    pub root: KeyLocation,
    /// The issuing intermediate (`intermediate.crt`).
    #[serde(default, skip_serializing_if = "KeyLocation::is_file")]
    pub intermediate: KeyLocation,
    /// The prepared root (`next/root.crt`), during a root rotation.
    #[serde(default, skip_serializing_if = "KeyLocation::is_file")]
    pub next_root: KeyLocation,
    /// The prepared intermediate (`next/intermediate.crt`).
    #[serde(default, skip_serializing_if = "KeyLocation::is_file")]
    pub next_intermediate: KeyLocation,
}

impl CaKeys {
    /// Whether every key is a file in the directory (nothing to record).
    pub fn is_default(&self) -> bool {
        *self == CaKeys::default()
    }
}

/// Per-command ways to reach the keys, overriding what `ca.json` records.
#[derive(Debug, Clone, Default)]
pub struct KeyAccess {
    /// `--pin-file`: the PIN file for token keys (the root's too when it is
    /// in the intermediate's token and no `root_pin_file` is given).
    pub pin_file: Option<PathBuf>,
    /// `--root-pin-file`: the PIN file for a root key in its own token.
    pub root_pin_file: Option<PathBuf>,
    /// `--root-key`: an offline root key file.
    pub root_key: Option<PathBuf>,
}

impl KeyAccess {
    /// The PIN file override for the intermediate's token.
    pub fn intermediate_pin(&self) -> Option<&Path> {
        self.pin_file.as_deref()
    }

    /// The PIN file override for a root key in `root`'s token, given that
    /// the intermediate is at `intermediate`: `--root-pin-file`, else
    /// `--pin-file` when both keys share a token.
    pub fn root_pin(&self, root: &TokenKeyRef, intermediate: &KeyLocation) -> Option<&Path> {
        if let Some(p) = &self.root_pin_file {
            return Some(p);
        }
        match intermediate {
            KeyLocation::Pkcs11(i)
                if i.module == root.module && i.token_label == root.token_label =>
            {
                self.pin_file.as_deref()
            }
            // No token for the intermediate: the one PIN flag is the root's.
            KeyLocation::File | KeyLocation::Offline(_) => self.pin_file.as_deref(),
            KeyLocation::Pkcs11(_) => None,
        }
    }
}

/// Where a new key is to be generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyHome {
    /// A file in the CA directory.
    Dir,
    /// A file outside the CA directory (roots only), created (never
    /// replaced) with mode 0600.
    Offline(PathBuf),
    /// A new key pair in this token.
    Token(TokenSpec),
}

impl KeyHome {
    /// The home of the next generation of a key now at `loc`: the same
    /// place (the same token, or the CA directory). An offline root has
    /// none: its successor's file must be named.
    pub fn same_as(loc: &KeyLocation, pin_override: Option<&Path>) -> Option<KeyHome> {
        match loc {
            KeyLocation::File => Some(KeyHome::Dir),
            KeyLocation::Offline(_) => None,
            KeyLocation::Pkcs11(t) => Some(KeyHome::Token(t.spec(pin_override))),
        }
    }
}

/// A CA signing key: a key pair in memory (read from a file or just
/// generated) or a key in a PKCS#11 token.
pub enum CaKey {
    /// In memory.
    File(KeyPair),
    /// In a token; the last signing failure is kept for the error message
    /// (rcgen only reports that a remote key failed, not why).
    Pkcs11 {
        /// The token key.
        key: Pkcs11Key,
        /// Why the last signature failed.
        last_error: Mutex<Option<Pkcs11Error>>,
    },
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaKey::File(_) => f.write_str("CaKey::File(..)"),
            CaKey::Pkcs11 { key, .. } => write!(f, "CaKey::Pkcs11({})", key.uri()),
        }
    }
}

impl From<KeyPair> for CaKey {
    fn from(k: KeyPair) -> CaKey {
        CaKey::File(k)
    }
}

impl From<Pkcs11Key> for CaKey {
    fn from(key: Pkcs11Key) -> CaKey {
        CaKey::Pkcs11 {
            key,
            last_error: Mutex::new(None),
        }
    }
}

/// Why a CA key could not sign a probe.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProbeError {
    /// The token failed.
    #[error("{0}")]
    Pkcs11(#[from] Pkcs11Error),
    /// A key in memory could not sign (not expected to happen).
    #[error("signing failed: {0}")]
    Sign(String),
}

impl CaKey {
    /// `file` (in memory, from a file) or `pkcs11`.
    pub fn kind(&self) -> &'static str {
        match self {
            CaKey::File(_) => "file",
            CaKey::Pkcs11 { .. } => "pkcs11",
        }
    }

    /// The token key, if this is one.
    pub fn pkcs11(&self) -> Option<&Pkcs11Key> {
        match self {
            CaKey::File(_) => None,
            CaKey::Pkcs11 { key, .. } => Some(key),
        }
    }

    /// Whether the key can sign as far as is known without trying: always
    /// for a key in memory; for a token key, whether its last operation
    /// succeeded ([`Pkcs11Key::is_available`]).
    pub fn is_available(&self) -> bool {
        match self {
            CaKey::File(_) => true,
            CaKey::Pkcs11 { key, .. } => key.is_available(),
        }
    }

    /// Signs a fixed message: whether the key works now (a token key is
    /// reopened when due).
    pub fn probe(&self) -> Result<(), ProbeError> {
        match self {
            CaKey::File(k) => k
                .sign(b"keyproof-ca key probe")
                .map(|_| ())
                .map_err(|e| ProbeError::Sign(e.to_string())),
            CaKey::Pkcs11 { key, .. } => Ok(key.probe()?),
        }
    }

    /// Why the last signature of a token key failed, if it did.
    pub fn last_error(&self) -> Option<Pkcs11Error> {
        match self {
            CaKey::File(_) => None,
            CaKey::Pkcs11 { last_error, .. } => {
                last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
            }
        }
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki(&self) -> Vec<u8> {
        self.subject_public_key_info()
    }

    /// The kid of a key kept in memory: the first 6 bytes of SHA-256 of the
    /// public key, in hex (the certificate names it).
    pub fn public_kid(&self) -> String {
        hex::encode(&keys::sha256(self.der_bytes())[..6])
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::File(k) => k.der_bytes(),
            CaKey::Pkcs11 { key, .. } => key.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            CaKey::File(k) => PublicKeyData::algorithm(k),
            CaKey::Pkcs11 { key, .. } => key.algorithm(),
        }
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::File(k) => k.sign(msg),
            CaKey::Pkcs11 { key, last_error } => {
                let r = key.sign_der(msg);
                let mut last = last_error.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok(sig) => {
                        *last = None;
                        Ok(sig)
                    }
                    Err(e) => {
                        *last = Some(e);
                        Err(rcgen::Error::RemoteKeyError)
                    }
                }
            }
        }
    }
}

/// 48 random bits in hex: the `<kid>` of a new token key's label.
pub(crate) fn random_kid() -> String {
    let mut b = [0u8; 6];
    // As for serial numbers: without entropy nothing can be made safely.
    aws_lc_rs::rand::fill(&mut b).expect("system random number generator failed");
    hex::encode(b)
}

/// A freshly generated key, its kid (for the certificate's name) and where
/// it lives.
pub(crate) struct NewKey {
    pub key: CaKey,
    pub kid: String,
    pub location: KeyLocation,
}

/// Generates a `what` (`root` or `intermediate`) key of type `kt` at `home`.
/// An offline key is only generated here; the caller writes it.
pub(crate) fn generate(home: &KeyHome, what: &str, kt: KeyType) -> Result<NewKey, CaKeyError> {
    match home {
        KeyHome::Dir | KeyHome::Offline(_) => {
            let key = CaKey::File(
                kt.generate()
                    .map_err(|e| CaKeyError::Generate(e.to_string()))?,
            );
            let kid = key.public_kid();
            let location = match home {
                KeyHome::Offline(p) if is_stdout(p) => KeyLocation::Offline(OfflineRef {
                    written_to: "(standard output)".into(),
                }),
                KeyHome::Offline(p) => KeyLocation::Offline(OfflineRef {
                    written_to: std::path::absolute(p).unwrap_or_else(|_| p.clone()),
                }),
                _ => KeyLocation::File,
            };
            Ok(NewKey { key, kid, location })
        }
        KeyHome::Token(spec) => {
            warn_if_pin_readable(&spec.pin_file);
            // A taken label (a collision of 48 random bits, or a leftover)
            // is never reused: try another.
            let mut attempts = 0;
            loop {
                let kid = random_kid();
                let label = format!("keyproof-{what}-{kid}");
                let generated = crate::pin_memory::guard(
                    crate::pin_memory::dir(),
                    &spec.pin_file,
                    &spec.token_label,
                    || Pkcs11Key::generate(spec, &label, kt),
                );
                match generated {
                    Ok(key) => {
                        let location = KeyLocation::Pkcs11(TokenKeyRef {
                            module: spec.module.clone(),
                            token_label: spec.token_label.clone(),
                            pin_file: std::path::absolute(&spec.pin_file)
                                .unwrap_or_else(|_| spec.pin_file.clone()),
                            label,
                        });
                        return Ok(NewKey {
                            key: key.into(),
                            kid,
                            location,
                        });
                    }
                    Err(Pkcs11Error::KeyExists { .. }) if attempts < 3 => attempts += 1,
                    Err(e) => {
                        return Err(CaKeyError::Pkcs11 {
                            what: format!("new {what} key"),
                            source: e,
                        })
                    }
                }
            }
        }
    }
}

/// Why a CA key cannot be generated or opened.
#[derive(Debug, thiserror::Error)]
pub enum CaKeyError {
    /// The token refused or failed.
    #[error("{what}: {source}")]
    Pkcs11 {
        /// Which key (`intermediate key`, `root key`, `new root key`...).
        what: String,
        /// The token's error.
        #[source]
        source: Pkcs11Error,
    },
    /// Generating a key in memory failed.
    #[error("key generation failed: {0}")]
    Generate(String),
}

/// A token PIN file every user may read is used, and said, by the CA and
/// the sidecar alike (refusing it would stop a process whose operator
/// mounted a group-readable Secret; one others may write is refused when
/// it is read).
pub fn warn_if_pin_readable(pin_file: &Path) {
    if let Some(mode) = keyproof_identity::filemode::readable_by_all(pin_file) {
        tracing::warn!(file = %pin_file.display(), mode = format!("{mode:o}"), "the token PIN is readable by every user of this machine; chmod 600 (a Kubernetes Secret: defaultMode 0440)");
    }
}

/// Opens the token key `r` (named `what` in errors).
pub(crate) fn open_token_key(
    r: &TokenKeyRef,
    pin_override: Option<&Path>,
    what: &str,
) -> Result<CaKey, CaKeyError> {
    let spec = r.spec(pin_override);
    warn_if_pin_readable(&spec.pin_file);
    crate::pin_memory::guard(
        crate::pin_memory::dir(),
        &spec.pin_file,
        &spec.token_label,
        || Pkcs11Key::open(&spec, &r.label),
    )
    .map(CaKey::from)
    .map_err(|source| CaKeyError::Pkcs11 {
        what: what.to_owned(),
        source,
    })
}

/// `-` as an offline key path: the key goes to standard output (for a CA
/// run through `kubectl exec`, whose image has no shell to copy a file out).
pub fn is_stdout(path: &std::path::Path) -> bool {
    path.as_os_str() == "-"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_serialise_as_the_contract_says_and_files_are_left_out() {
        let keys = CaKeys {
            root: KeyLocation::Offline(OfflineRef {
                written_to: "/secure/root.key".into(),
            }),
            intermediate: KeyLocation::Pkcs11(TokenKeyRef {
                module: "/usr/lib/softhsm/libsofthsm2.so".into(),
                token_label: "ca".into(),
                pin_file: "/run/pin".into(),
                label: "keyproof-intermediate-0a1b2c3d4e5f".into(),
            }),
            ..CaKeys::default()
        };
        let v = serde_json::to_value(&keys).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "root": {"offline": {"written_to": "/secure/root.key"}},
                "intermediate": {"pkcs11": {
                    "module": "/usr/lib/softhsm/libsofthsm2.so",
                    "token_label": "ca",
                    "pin_file": "/run/pin",
                    "label": "keyproof-intermediate-0a1b2c3d4e5f"
                }}
            })
        );
        let back: CaKeys = serde_json::from_value(v).unwrap();
        assert_eq!(back, keys);
        assert!(serde_json::to_value(CaKeys::default())
            .unwrap()
            .as_object()
            .unwrap()
            .is_empty());
        let explicit: CaKeys = serde_json::from_str(r#"{"root": "file"}"#).unwrap();
        assert!(explicit.is_default());
        assert!(serde_json::from_str::<CaKeys>(r#"{"root": {"hsm": {}}}"#).is_err());
        assert!(serde_json::from_str::<CaKeys>(r#"{"rooot": "file"}"#).is_err());
    }

    #[test]
    fn the_root_pin_override_follows_the_token() {
        let t = |token: &str| TokenKeyRef {
            module: "/m.so".into(),
            token_label: token.into(),
            pin_file: "/stored".into(),
            label: "l".into(),
        };
        let access = KeyAccess {
            pin_file: Some("/pin".into()),
            ..KeyAccess::default()
        };
        let same = KeyLocation::Pkcs11(t("ca"));
        let other = KeyLocation::Pkcs11(t("other"));
        assert_eq!(access.root_pin(&t("ca"), &same), Some(Path::new("/pin")));
        assert_eq!(access.root_pin(&t("root"), &other), None);
        assert_eq!(
            access.root_pin(&t("root"), &KeyLocation::File),
            Some(Path::new("/pin"))
        );
        let both = KeyAccess {
            root_pin_file: Some("/root-pin".into()),
            ..access
        };
        assert_eq!(
            both.root_pin(&t("root"), &other),
            Some(Path::new("/root-pin"))
        );
        assert_eq!(
            t("ca").spec(Some(Path::new("/x"))).pin_file,
            PathBuf::from("/x")
        );
        assert_eq!(t("ca").spec(None).pin_file, PathBuf::from("/stored"));
    }
}
