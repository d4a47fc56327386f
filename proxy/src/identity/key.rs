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
use crate::identity::error::IdentityError;
use crate::metrics::Metrics;

/// How often an unavailable token key is probed (its recovery is noticed
/// within this).
pub const PROBE_WHILE_DOWN: Duration = Duration::from_secs(1);
/// How often a working token key is probed (its loss, without traffic, is
/// noticed within this).
pub const PROBE_WHILE_UP: Duration = Duration::from_secs(10);

/// How many times a token missing at startup is looked for again.
const START_RETRIES: u32 = 5;
/// Pause between those looks.
const START_RETRY_EVERY: Duration = Duration::from_millis(200);

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
        let mut opened = TokenKey::open_once(cfg, &spec, generate);
        // A token another process is writing at this moment (SoftHSM2 with
        // two sidecars starting together) can be missing from the slot
        // list for an instant; so can one whose daemon is still starting.
        // A few short retries before "no such token" is final.
        for _ in 0..START_RETRIES {
            match &opened {
                Err(e) if e.reason() == "no_token" => {
                    std::thread::sleep(START_RETRY_EVERY);
                    opened = TokenKey::open_once(cfg, &spec, generate);
                }
                _ => break,
            }
        }
        let key = opened.map_err(|e| IdentityError::Invalid {
            key: pkcs11_config_key(&e),
            msg: e.to_string(),
        })?;
        // As for a key file: one others may write was refused on reading;
        // one every user may read is used, and said.
        keyproof_ca::cakey::warn_if_pin_readable(&cfg.pin_file);
        tracing::info!(uri = %key.uri(), key_type = %key.key_type(), "workload key opened in the PKCS#11 token");
        Ok(Arc::new(TokenKey::new(key)))
    }

    /// What `check-config` can check of the token key `[identity.ca]`
    /// generates when it is absent: the module loads, the token is there,
    /// the PIN logs in, and a key already under the label is one keyproof
    /// would use. Nothing is generated.
    pub fn check(cfg: &Pkcs11Config) -> Result<(), IdentityError> {
        match Pkcs11Key::open(&cfg.token_spec(), &cfg.key_label) {
            Ok(_) => Ok(()),
            Err(e) if e.reason() == "no_key" => Ok(()),
            Err(e) => Err(IdentityError::Invalid {
                key: pkcs11_config_key(&e),
                msg: e.to_string(),
            }),
        }
    }

    fn open_once(
        cfg: &Pkcs11Config,
        spec: &keyproof_identity::pkcs11::TokenSpec,
        generate: Option<KeyType>,
    ) -> Result<Pkcs11Key, Pkcs11Error> {
        match generate {
            Some(kt) => Pkcs11Key::open_or_generate(spec, &cfg.key_label, kt).map(|(k, new)| {
                if new {
                    tracing::info!(
                        uri = %k.uri(),
                        key_type = %kt,
                        "generated the workload key in the PKCS#11 token (not extractable)"
                    );
                }
                k
            }),
            None => Pkcs11Key::open(spec, &cfg.key_label),
        }
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

    /// In-process tests against a real SoftHSM2 token. `SOFTHSM2_CONF` is
    /// set once for the process (a per-process token directory); each test
    /// makes its own token, so they can run in parallel.
    mod softhsm {
        use std::path::{Path, PathBuf};
        use std::process::Command;
        use std::sync::OnceLock;

        use keyproof_identity::keys::KeyType;
        use keyproof_identity::pkcs11::{Pkcs11Key, TokenSpec};

        use crate::config::{FilesSourceConfig, IdentityConfig, IdentitySource, Pkcs11Config};
        use crate::identity::key::{KeyLocation, TokenKey};
        use crate::identity::store::test_pki::{Pki, BOTH};
        use crate::identity::store::{Identity, IdentityError};

        const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
        const TD: &str = "pkcs11.keyproof.test";
        const API: &str = "/ns/demo/sa/api";

        /// The per-process SoftHSM2 configuration, or None when SoftHSM2 is
        /// not installed (the test is then skipped, loudly).
        fn conf() -> Option<&'static Path> {
            static CONF: OnceLock<Option<PathBuf>> = OnceLock::new();
            CONF.get_or_init(|| {
                if !Path::new(MODULE).exists() {
                    eprintln!("SoftHSM2 not installed ({MODULE}); skipping");
                    return None;
                }
                let dir = tempfile::tempdir().expect("temp dir").keep();
                std::fs::create_dir_all(dir.join("tokens")).expect("token dir");
                let conf = dir.join("softhsm2.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                        dir.join("tokens").display()
                    ),
                )
                .expect("conf");
                // Set once, before any test of this module touches the
                // module, and never changed: every test reads the same.
                std::env::set_var("SOFTHSM2_CONF", &conf);
                Some(conf)
            })
            .as_deref()
        }

        /// SoftHSM keeps every token of this process in one directory, and
        /// a token being created is half written there for a moment: a
        /// test that scans the slots then (another test's `--init-token`,
        /// or the module in this process) fails ("Could not get info about
        /// the token in slot 0", seen in CI). The tests take turns.
        static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

        /// A fresh token labelled `label` (PIN 5678) and a PIN file for it.
        fn token(label: &str, dir: &Path) -> Option<Pkcs11Config> {
            let conf = conf()?;
            let out = Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", conf)
                .args(["--init-token", "--free", "--label", label])
                .args(["--so-pin", "1234", "--pin", "5678"])
                .output()
                .expect("softhsm2-util");
            assert!(out.status.success(), "{out:?}");
            let pin = dir.join("pin");
            std::fs::write(&pin, "5678\n").expect("pin");
            Some(Pkcs11Config {
                module: MODULE.into(),
                token_label: label.into(),
                key_label: "workload".into(),
                pin_file: pin,
            })
        }

        fn spec(p: &Pkcs11Config) -> TokenSpec {
            p.token_spec()
        }

        fn files_config(dir: &Path, p: &Pkcs11Config) -> IdentityConfig {
            IdentityConfig {
                trust_bundle: dir.join("bundle.pem"),
                source: IdentitySource::Files(FilesSourceConfig {
                    cert: dir.join("tls.crt"),
                    key: None,
                }),
                reload_interval: std::time::Duration::from_secs(10),
                pkcs11: Some(p.clone()),
            }
        }

        fn key_of(e: &IdentityError) -> &'static str {
            match e {
                IdentityError::Read { key, .. } | IdentityError::Invalid { key, .. } => key,
            }
        }

        #[test]
        fn a_certificate_file_with_the_key_in_a_token_is_an_identity_that_signs_in_the_token() {
            let _turn = TURN.blocking_lock();
            let dir = tempfile::tempdir().expect("temp dir");
            let Some(p) = token("kp-files", dir.path()) else {
                return;
            };
            let pki = Pki::shared(TD);
            let key =
                Pkcs11Key::generate(&spec(&p), &p.key_label, KeyType::EcdsaP256).expect("generate");
            let csr = keyproof_ca::client::token_csr(&key, pki.id(API).as_str()).expect("CSR");
            let chain = pki.issue_for_csr(API, &csr);
            let pem: String = chain
                .iter()
                .map(|c| keyproof_identity::keys::cert_pem(c))
                .collect();
            std::fs::write(dir.path().join("tls.crt"), pem).expect("cert");
            std::fs::write(dir.path().join("bundle.pem"), pki.bundle_pem()).expect("bundle");
            let cfg = files_config(dir.path(), &p);

            let id = Identity::load(&cfg, BOTH).expect("identity");
            assert_eq!(id.key.location(), KeyLocation::Pkcs11);
            let json = id.to_json();
            assert_eq!(json["key"]["location"], "pkcs11");
            assert_eq!(json["key"]["available"], true);
            assert_eq!(
                json["key"]["uri"],
                "pkcs11:token=kp-files;object=workload;type=private"
            );
            // Step-up signs through the token, with the certificate's keyid.
            let signer = crate::outbound::signer::signer_for(&id).expect("signer");
            assert!(!signer.keyid().is_empty());
            // rustls signs through the token.
            let signing = id
                .certified
                .key
                .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256]);
            let sig = signing
                .expect("scheme")
                .sign(b"handshake transcript")
                .expect("signature");
            assert!(!sig.is_empty());
            // The same token key digests the same (a reload of the same
            // files is no change).
            let again = Identity::load(&cfg, BOTH).expect("identity");
            assert_eq!(again.material, id.material);

            // A certificate for another key: refused, naming the key label.
            let other = pki.issue(API);
            let pem: String = other
                .chain
                .iter()
                .map(|c| keyproof_identity::keys::cert_pem(c))
                .collect();
            std::fs::write(dir.path().join("tls.crt"), pem).expect("cert");
            let e = Identity::load(&cfg, BOTH).unwrap_err();
            assert_eq!(key_of(&e), "identity.pkcs11.key_label", "{e}");
            assert!(
                e.to_string()
                    .contains("not the one identity.files.cert certifies"),
                "{e}"
            );
        }

        #[tokio::test]
        async fn a_new_certificate_for_the_token_key_is_reloaded_and_one_for_another_key_refused() {
            use crate::identity::reload::{IdentityFiles, ReloadOutcome, Reloader};
            use crate::identity::store::IdentityStore;
            let _turn = TURN.lock().await;
            let dir = tempfile::tempdir().expect("temp dir");
            let Some(p) = token("kp-reload", dir.path()) else {
                return;
            };
            let pki = Pki::shared(TD);
            let key =
                Pkcs11Key::generate(&spec(&p), &p.key_label, KeyType::EcdsaP256).expect("generate");
            let write_chain = |chain: &[rustls_pki_types::CertificateDer<'_>]| {
                let pem: String = chain
                    .iter()
                    .map(|c| keyproof_identity::keys::cert_pem(c))
                    .collect();
                std::fs::write(dir.path().join("tls.crt"), pem).expect("cert");
            };
            let csr = keyproof_ca::client::token_csr(&key, pki.id(API).as_str()).expect("CSR");
            write_chain(&pki.issue_for_csr(API, &csr));
            std::fs::write(dir.path().join("bundle.pem"), pki.bundle_pem()).expect("bundle");
            let cfg = files_config(dir.path(), &p);
            let token = TokenKey::open(&p, None).expect("token");
            let id = Identity::load_with(&cfg, Some(token.clone()), BOTH).expect("identity");
            let serial = id.serial.clone();
            let store = IdentityStore::new(id);
            let metrics = crate::metrics::Metrics::new().expect("metrics");
            let mut reloader = Reloader::new(
                IdentityFiles {
                    cert: dir.path().join("tls.crt"),
                    key: None,
                    bundle: dir.path().join("bundle.pem"),
                },
                store.clone(),
                metrics,
                BOTH.to_vec(),
            )
            .with_token(Some(token));
            assert_eq!(reloader.check().await, ReloadOutcome::Unchanged);
            // A renewed certificate for the same token key.
            let csr = keyproof_ca::client::token_csr(&key, pki.id(API).as_str()).expect("CSR");
            write_chain(&pki.issue_for_csr(API, &csr));
            assert_eq!(reloader.check().await, ReloadOutcome::Applied);
            assert_ne!(store.current().serial, serial);
            assert_eq!(store.current().key.location(), KeyLocation::Pkcs11);
            // A certificate for a key that is not the token's: refused
            // (after the settle time), the token identity keeps serving.
            let applied = store.current().serial.clone();
            write_chain(&pki.issue(API).chain);
            assert_eq!(
                reloader.check().await,
                ReloadOutcome::Rejected("key_mismatch")
            );
            assert_eq!(store.current().serial, applied);
        }

        #[test]
        fn token_problems_at_startup_name_the_pkcs11_key_and_never_the_pin() {
            let _turn = TURN.blocking_lock();
            let dir = tempfile::tempdir().expect("temp dir");
            let Some(p) = token("kp-errors", dir.path()) else {
                return;
            };
            Pkcs11Key::generate(&spec(&p), "present", KeyType::EcdsaP256).expect("generate");
            let wrong_pin = dir.path().join("wrong-pin");
            std::fs::write(&wrong_pin, "0000\n").expect("pin");
            let cases = [
                (
                    Pkcs11Config {
                        module: "/nonexistent/libpkcs11.so".into(),
                        ..p.clone()
                    },
                    "identity.pkcs11.module",
                ),
                (
                    Pkcs11Config {
                        token_label: "no-such-token".into(),
                        ..p.clone()
                    },
                    "identity.pkcs11.token_label",
                ),
                (
                    Pkcs11Config {
                        pin_file: dir.path().join("missing-pin"),
                        ..p.clone()
                    },
                    "identity.pkcs11.pin_file",
                ),
                (
                    Pkcs11Config {
                        pin_file: wrong_pin,
                        key_label: "present".into(),
                        ..p.clone()
                    },
                    "identity.pkcs11.pin_file",
                ),
                (
                    Pkcs11Config {
                        key_label: "absent".into(),
                        ..p.clone()
                    },
                    "identity.pkcs11.key_label",
                ),
            ];
            for (cfg, want) in cases {
                let e = TokenKey::open(&cfg, None).unwrap_err();
                assert_eq!(key_of(&e), want, "{e}");
                let shown = format!("{e} {e:?}");
                assert!(
                    !shown.contains("5678") && !shown.contains("0000"),
                    "{shown}"
                );
            }
            // With [identity.ca], an absent key is generated, then reused.
            let ca = Pkcs11Config {
                key_label: "made-here".into(),
                ..p.clone()
            };
            let made = TokenKey::open(&ca, Some(KeyType::EcdsaP256)).expect("generated");
            let again = TokenKey::open(&ca, Some(KeyType::EcdsaP256)).expect("reopened");
            assert_eq!(
                keyproof_identity::keys::ExternalKey::spki_der(made.key()),
                keyproof_identity::keys::ExternalKey::spki_der(again.key())
            );
        }
    }
}
