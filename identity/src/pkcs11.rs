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
//! # Static executables
//!
//! A module is a shared library loaded with `dlopen`. The release builds
//! `cargo build-proxy` and `cargo build-ca` link glibc in statically, and a
//! module loaded into such a process runs against a second copy of libc
//! (SoftHSM2 crashes there). Those builds refuse to load a module, naming
//! the dynamically linked build to use instead.
//!
//! # Signature formats
//!
//! [`Pkcs11Key::sign_raw`] gives what the token gives: ECDSA `r || s` (64
//! bytes for P-256, computed with `CKM_ECDSA` over a SHA-256 digest made
//! here, which every token supports) and Ed25519 (`CKM_EDDSA`). TLS and
//! X.509 want ECDSA as a DER `ECDSA-Sig-Value`; [`Pkcs11Key::sign_der`]
//! gives that. The rustls adapter ([`Pkcs11Key::rustls_signing_key`]) and
//! the rcgen one (`impl rcgen::SigningKey`) use the DER form.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::keys::{ecdsa_raw_to_der, sha256, ExternalKey, KeyError, KeyType};

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
    /// Several private keys share the label: which one is meant is unknown.
    #[error("PKCS#11 token {token:?}: {count} private keys are labelled {label:?}")]
    Duplicate {
        /// The token label.
        token: String,
        /// The key label.
        label: String,
        /// How many.
        count: usize,
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
    /// Every session this key may open is in use and none came back in
    /// time: load, not a token failure.
    #[error("PKCS#11 token {token:?}: all {max} sessions stayed busy")]
    Busy {
        /// The token label.
        token: String,
        /// The session limit.
        max: usize,
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
            Pkcs11Error::BadKey { .. } | Pkcs11Error::Duplicate { .. } => "bad_key",
            Pkcs11Error::Operation { .. } => "operation",
            Pkcs11Error::Busy { .. } => "busy",
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
    /// The public key as read when the key was first opened; a reopen that
    /// finds another key under the label is refused.
    spki: Vec<u8>,
    /// The private key's CKA_ID, which a reopen looks for (empty: none).
    id: Vec<u8>,
    available: AtomicBool,
    observer: RwLock<Option<Observer>>,
    state: Mutex<State>,
    /// Signalled when a session goes back to the pool.
    returned: std::sync::Condvar,
}

/// What a (re)open establishes, and the pool of sessions on it.
#[derive(Default)]
struct State {
    /// Set while the token is open; `None` after a failure.
    open: Option<Open>,
    /// Sessions not in use now.
    idle: Vec<Pooled>,
    /// Bumped on every reset: a session taken before it is not returned.
    generation: u64,
    /// When the last failure happened and what it was.
    failed: Option<(Instant, Pkcs11Error)>,
    /// Sessions open now (idle or in use), bounded by [`MAX_SESSIONS`].
    sessions: usize,
    /// A reopen is under way (outside the lock); others fail fast.
    reopening: bool,
    /// SHA-256 of a PIN the token refused: never offered again, so that a
    /// wrong PIN file cannot lock the token by retries; a changed file is
    /// tried at once.
    refused_pin: Option<[u8; 32]>,
}

impl Drop for State {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            open.module.close(std::mem::take(&mut self.idle));
        }
    }
}

/// A session and the module epoch it was opened in. Sessions never close
/// themselves on drop: after a re-initialisation their handle numbers are
/// handed out again, and closing a stale one would close someone else's
/// new session. [`Module::close`] closes only sessions of the current epoch.
struct Pooled {
    session: Session,
    epoch: u64,
}

#[derive(Clone)]
struct Open {
    module: Arc<Module>,
    /// The module epoch the slot and key handles belong to.
    epoch: u64,
    slot: Slot,
    key: ObjectHandle,
}

/// A loaded module. Every call into it holds `gate` shared; re-initialising
/// it (`C_Finalize` + `C_Initialize`) holds it exclusively, because a module
/// finalised under a thread that is inside `C_Sign` may crash the process.
struct Module {
    path: PathBuf,
    ctx: Pkcs11,
    gate: RwLock<()>,
    /// Bumped by every re-initialisation (under `gate` held exclusively).
    epoch: std::sync::atomic::AtomicU64,
}

impl Module {
    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Finalises and initialises the module again, so that it enumerates
    /// its tokens afresh (SoftHSM2 and most modules read their slot list at
    /// `C_Initialize`, and a token that went away stays broken in the old
    /// one). Every session of every key of this module is gone afterwards;
    /// those keys reopen on their next operation.
    fn reinitialize(&self) -> Result<(), Pkcs11Error> {
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.fetch_add(1, Ordering::Relaxed);
        let _ = self.ctx.clone().finalize();
        match self.ctx.initialize(init_args()) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            Err(e) => Err(module_err(&self.path, format!("C_Initialize: {}", rv(&e)))),
        }
    }

    /// Opens a session (logged in if the token is) in the current epoch;
    /// the caller holds `gate` shared.
    fn session(&self, slot: Slot, rw: bool) -> Result<Pooled, CkError> {
        let session = if rw {
            self.ctx.open_rw_session_no_drop(slot)
        } else {
            self.ctx.open_ro_session_no_drop(slot)
        }?;
        Ok(Pooled {
            session,
            epoch: self.epoch.load(Ordering::Relaxed),
        })
    }

    /// Closes sessions of the current epoch, with `gate` held shared; those
    /// of an earlier epoch died with it and are only forgotten.
    fn close(&self, sessions: Vec<Pooled>) {
        let _shared = self.shared();
        let epoch = self.epoch.load(Ordering::Relaxed);
        for p in sessions {
            if p.epoch == epoch {
                let _ = p.session.close();
            }
        }
    }
}

/// Sessions kept open for reuse; more are opened under load and closed
/// when returned to a full pool.
const MAX_IDLE_SESSIONS: usize = 8;
/// Sessions open at once per key: tokens allow few (a TPM a handful, a
/// smart card one or two), and past this a signer waits for one.
const MAX_SESSIONS: usize = 16;
/// How long a generator waits before it opens the key it settles on, so
/// that generators racing on one label agree (see [`Pkcs11Key::generate`]).
const GENERATION_SETTLE: Duration = Duration::from_millis(300);
/// How long a signer waits for a session before it gives up (`busy`).
const SESSION_WAIT: Duration = Duration::from_secs(2);

impl fmt::Debug for Pkcs11Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Key")
            .field("uri", &self.uri())
            .field("key_type", &self.inner.key_type)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves the pool consistent
    // enough: the worst case is a session that is dropped (closed).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One PKCS#11 context per module path for the whole process: a module may
/// be initialised only once, and the CA opens two keys of one module.
fn modules() -> &'static Mutex<HashMap<PathBuf, Arc<Module>>> {
    static MODULES: std::sync::OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> =
        std::sync::OnceLock::new();
    MODULES.get_or_init(Default::default)
}

fn init_args() -> CInitializeArgs {
    CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)
}

fn rv(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, _) => format!("{rv:?}"),
        other => other.to_string(),
    }
}

fn module_err(module: &Path, e: impl fmt::Display) -> Pkcs11Error {
    Pkcs11Error::Module {
        module: module.display().to_string(),
        msg: e.to_string(),
    }
}

/// Why a static executable refuses to load a module.
const STATIC_BUILD: &str = "this executable is statically linked (`cargo build-proxy`, \
    `cargo build-ca`), and a PKCS#11 module (a shared library with its own libc) cannot be \
    loaded into it safely; use the dynamically linked build (`cargo build --release`, or the \
    container image's `pkcs11` target)";

/// The module at `path`, loaded and initialised on first use.
fn module(path: &Path) -> Result<Arc<Module>, Pkcs11Error> {
    // glibc linked in statically can dlopen a library, but the library then
    // runs against a second libc: SoftHSM2 crashes in it (seen here).
    if cfg!(target_feature = "crt-static") {
        return Err(module_err(path, STATIC_BUILD));
    }
    // One entry per library, however its path is spelled (Debian's
    // libsofthsm2.so is a symbolic link): two entries would initialise one
    // library twice and finalise it under each other.
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let path = canonical.as_path();
    let mut map = lock(modules());
    if let Some(m) = map.get(path) {
        return Ok(m.clone());
    }
    crate::filemode::refuse_writable(
        path,
        "whoever can rewrite the module runs their code in this process, with its session to the token",
    )
    .map_err(|e| module_err(path, e))?;
    let ctx = Pkcs11::new(path).map_err(|e| module_err(path, e))?;
    match ctx.initialize(init_args()) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(module_err(path, format!("C_Initialize: {}", rv(&e)))),
    }
    let m = Arc::new(Module {
        path: path.to_owned(),
        ctx,
        gate: RwLock::new(()),
        epoch: Default::default(),
    });
    map.insert(path.to_owned(), m.clone());
    Ok(m)
}

/// DER OID of prime256v1 (CKA_EC_PARAMS of a P-256 key).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER OID id-Ed25519 (RFC 8410), CKA_EC_PARAMS of an Ed25519 key.
const ED25519_OID_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// PrintableString "edwards25519", the older CKA_EC_PARAMS of Ed25519 keys
/// (PKCS#11 3.0 allows both; pkcs11-tool writes this one).
const ED25519_NAME_PARAMS: &[u8] = b"\x13\x0cedwards25519";

fn spki_for(kt: KeyType, point: &[u8]) -> Vec<u8> {
    let alg = kt.spki_algorithm_der();
    let inner_len = alg.len() + 3 + point.len();
    let mut out = Vec::with_capacity(inner_len + 2);
    out.push(0x30);
    out.push(inner_len as u8);
    out.extend_from_slice(alg);
    out.push(0x03);
    out.push((point.len() + 1) as u8);
    out.push(0x00);
    out.extend_from_slice(point);
    out
}

/// The raw public key from CKA_EC_POINT, which tokens give either as the
/// DER OCTET STRING PKCS#11 specifies or bare.
fn ec_point(kt: KeyType, attr: &[u8]) -> Option<&[u8]> {
    let want = match kt {
        KeyType::EcdsaP256 => 65,
        KeyType::Ed25519 => 32,
    };
    if attr.len() == want + 2 && attr[0] == 0x04 && usize::from(attr[1]) == want {
        return Some(&attr[2..]);
    }
    if attr.len() == want && (kt == KeyType::Ed25519 || attr[0] == 0x04) {
        return Some(attr);
    }
    None
}

fn read_pin(path: &Path) -> Result<AuthPin, Pkcs11Error> {
    let pin_err = |msg: String| Pkcs11Error::PinFile {
        path: path.display().to_string(),
        msg,
    };
    let raw = read_small(path).map_err(|e| pin_err(e.to_string()))?;
    crate::filemode::refuse_writable(
        path,
        "whoever can rewrite the PIN can lock this process out of the token",
    )
    .map_err(|e| pin_err(e.to_string()))?;
    let raw = String::from_utf8(raw).map_err(|_| pin_err("not UTF-8".into()))?;
    let pin = raw.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(pin_err("empty".into()));
    }
    Ok(AuthPin::from(pin.to_owned()))
}

/// A PIN file's content: a regular file of at most [`MAX_PIN_FILE`] bytes
/// (a device, a FIFO or a wrong path must not be read forever).
fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    // Only a regular file (a Secret volume's symbolic link to one counts):
    // opening a FIFO would block the thread that needs a signature until
    // someone writes to it, and a device never ends.
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_PIN_FILE + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_PIN_FILE {
        return Err(std::io::Error::other(format!(
            "longer than {MAX_PIN_FILE} bytes: not a PIN file"
        )));
    }
    Ok(buf)
}

/// The longest PIN file read.
const MAX_PIN_FILE: u64 = 1024;

/// SHA-256 of the PIN file's content as it would be offered, or `None`
/// when it cannot be read.
fn pin_digest(path: &Path) -> Option<[u8; 32]> {
    let raw = read_small(path).ok()?;
    let mut end = raw.len();
    while end > 0 && matches!(raw[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    Some(sha256(&raw[..end]))
}

/// Whether `sig` (the raw form [`Pkcs11Key::sign_raw`] gives) is a
/// signature of `msg` by the public key `spki`.
fn verifies(kt: KeyType, spki: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ED25519};
    let point = spki
        .get(2 + kt.spki_algorithm_der().len() + 3..)
        .unwrap_or_default();
    match kt {
        KeyType::EcdsaP256 => {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(msg, sig)
        }
        KeyType::Ed25519 => UnparsedPublicKey::new(&ED25519, point).verify(msg, sig),
    }
    .is_ok()
}

/// What `open` and every reopen sign and verify: the private key must be
/// the pair of the public key read (a private key swapped under the label
/// would otherwise sign every handshake wrongly while reported healthy).
const PROOF: &[u8] = b"keyproof pkcs11 key proof";

/// Which private key a label names when several share it.
enum Pick {
    /// Exactly one, or it is an error ([`Pkcs11Error::Duplicate`]).
    Unique,
    /// The one with the lowest CKA_ID: what racing generators agree on.
    Lowest,
    /// The one with this CKA_ID (the key opened before; empty: `Unique`).
    Id(Vec<u8>),
}

/// A key found in an open token.
struct Found {
    open: Open,
    session: Pooled,
    key_type: KeyType,
    spki: Vec<u8>,
    /// The private key's CKA_ID (empty when it has none).
    id: Vec<u8>,
}

/// The outcome of one signature attempt.
enum Attempt {
    Signed(Vec<u8>),
    /// The session or handles predate a re-initialisation of the module.
    Stale,
    Failed(Pkcs11Error),
}

impl TokenSpec {
    fn op_err(&self, op: &'static str, e: &CkError) -> Pkcs11Error {
        Pkcs11Error::Operation {
            token: self.token_label.clone(),
            op,
            msg: rv(e),
        }
    }

    /// Opens the token and finds the key: `(open, session, key type,
    /// spki)`. When the token is missing or an operation fails, the module
    /// is re-initialised and it is tried once more: a token that was added,
    /// or removed and put back, is only seen by a fresh module. A missing
    /// key does that only when `known` (the key was there before: a stale
    /// token shows no objects), never for a first open or a generation,
    /// which would cut every other key of the module off for nothing.
    fn open_key(&self, label: &str, known: bool, pick: &Pick) -> Result<Found, Pkcs11Error> {
        let m = module(&self.module)?;
        match self.open_key_on(&m, label, pick) {
            Ok(r) => Ok(r),
            Err(e @ (Pkcs11Error::Login { .. } | Pkcs11Error::PinFile { .. })) => Err(e),
            Err(
                e @ (Pkcs11Error::NoKey { .. }
                | Pkcs11Error::BadKey { .. }
                | Pkcs11Error::Duplicate { .. }),
            ) if !known => Err(e),
            Err(_) => {
                m.reinitialize()?;
                self.open_key_on(&m, label, pick)
            }
        }
    }

    fn open_key_on(&self, m: &Arc<Module>, label: &str, pick: &Pick) -> Result<Found, Pkcs11Error> {
        let _shared = m.shared();
        let slot = self.slot(&m.ctx)?;
        let session = self.login(m, slot, false)?;
        let (key, kt, spki, id) = match self.find_key(&session.session, label, pick) {
            Ok(found) => found,
            Err(e) => {
                let _ = session.session.close();
                return Err(e);
            }
        };
        let open = Open {
            module: m.clone(),
            epoch: m.epoch.load(Ordering::Relaxed),
            slot,
            key,
        };
        Ok(Found {
            open,
            session,
            key_type: kt,
            spki,
            id,
        })
    }

    /// The slot holding the token ([`Pkcs11Error::NoToken`] listing the
    /// labels present otherwise); the caller holds the module's gate shared.
    fn slot(&self, ctx: &Pkcs11) -> Result<Slot, Pkcs11Error> {
        self.find_slot(ctx)?
            .map_err(|present| Pkcs11Error::NoToken {
                token: self.token_label.clone(),
                module: self.module.display().to_string(),
                present,
            })
    }

    /// The slot holding the token, or the labels that are present.
    fn find_slot(&self, ctx: &Pkcs11) -> Result<Result<Slot, String>, Pkcs11Error> {
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| self.op_err("C_GetSlotList", &e))?;
        let mut present = Vec::new();
        for slot in slots {
            let Ok(info) = ctx.get_token_info(slot) else {
                continue;
            };
            let label = info.label().trim_end().to_owned();
            if label == self.token_label {
                return Ok(Ok(slot));
            }
            // An uninitialised token (SoftHSM2's free slot) has no label.
            if info.token_initialized() && !label.is_empty() {
                present.push(label);
            }
        }
        Ok(Err(if present.is_empty() {
            "none".to_owned()
        } else {
            present.join(", ")
        }))
    }

    /// A session on the token, logged in as the user; the caller holds the
    /// module's gate shared.
    fn login(&self, m: &Module, slot: Slot, rw: bool) -> Result<Pooled, Pkcs11Error> {
        let p = m
            .session(slot, rw)
            .map_err(|e| self.op_err("C_OpenSession", &e))?;
        let result = read_pin(&self.pin_file).and_then(|pin| {
            match p.session.login(UserType::User, Some(&pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
                // The PIN itself was refused: `Login`, which is never
                // retried with the same PIN.
                Err(
                    e @ CkError::Pkcs11(
                        RvError::PinIncorrect
                        | RvError::PinLocked
                        | RvError::PinExpired
                        | RvError::PinLenRange
                        | RvError::PinInvalid
                        | RvError::UserPinNotInitialized,
                        _,
                    ),
                ) => Err(Pkcs11Error::Login {
                    token: self.token_label.clone(),
                    msg: rv(&e),
                }),
                // A device fault at login (token removed, session gone)
                // is an operation failure, which reopens.
                Err(e) => Err(self.op_err("C_Login", &e)),
            }
        });
        match result {
            Ok(()) => Ok(p),
            Err(e) => {
                let _ = p.session.close();
                Err(e)
            }
        }
    }

    /// Whether another private key labelled `label` has a lower CKA_ID than
    /// ours (`id`): the rule every generator applies after generating.
    fn lost_generation_race(
        &self,
        session: &Session,
        label: &str,
        id: &[u8],
    ) -> Result<bool, Pkcs11Error> {
        for k in self.private_keys(session, label)? {
            // Destroyed meanwhile by another generator: not a contender.
            let Ok(attrs) = session.get_attributes(k, &[AttributeType::Id]) else {
                continue;
            };
            for a in attrs {
                if let Attribute::Id(other) = a {
                    if other.as_slice() < id {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Destroys the key pair with CKA_ID `id` in the token `key` is open
    /// in (best effort: a failure leaves an unused key behind).
    fn destroy_by_id(&self, key: &Pkcs11Key, id: &[u8]) {
        let st = lock(&key.inner.state);
        let Some(open) = st.open.clone() else {
            return;
        };
        drop(st);
        let _shared = open.module.shared();
        let Ok(p) = open.module.session(open.slot, true) else {
            return;
        };
        if let Ok(objects) = p.session.find_objects(&[Attribute::Id(id.to_vec())]) {
            for o in objects {
                let _ = p.session.destroy_object(o);
            }
        }
        let _ = p.session.close();
    }

    /// The private key objects labelled `label`.
    fn private_keys(
        &self,
        session: &Session,
        label: &str,
    ) -> Result<Vec<ObjectHandle>, Pkcs11Error> {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| self.op_err("C_FindObjects", &e))
    }

    /// Finds the private key and reads its type and public key (from the
    /// public key object of the same label).
    #[allow(clippy::type_complexity)]
    fn find_key(
        &self,
        session: &Session,
        label: &str,
        pick: &Pick,
    ) -> Result<(ObjectHandle, KeyType, Vec<u8>, Vec<u8>), Pkcs11Error> {
        let bad = |msg: String| Pkcs11Error::BadKey {
            token: self.token_label.clone(),
            label: label.to_owned(),
            msg,
        };
        // Each candidate with its CKA_ID (an object destroyed meanwhile by
        // a racing generator is skipped).
        let mut keys: Vec<(ObjectHandle, Vec<u8>)> = Vec::new();
        for k in self.private_keys(session, label)? {
            let Ok(attrs) = session.get_attributes(k, &[AttributeType::Id]) else {
                continue;
            };
            let id = attrs
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Id(v) => Some(v),
                    _ => None,
                })
                .unwrap_or_default();
            keys.push((k, id));
        }
        if let Pick::Id(want) = pick {
            if !want.is_empty() {
                keys.retain(|(_, id)| id == want);
            }
        }
        if keys.len() > 1 && matches!(pick, Pick::Lowest) {
            keys.sort_by(|a, b| a.1.cmp(&b.1));
            keys.truncate(1);
        }
        let key = match keys.as_slice() {
            [] => {
                return Err(Pkcs11Error::NoKey {
                    token: self.token_label.clone(),
                    label: label.to_owned(),
                })
            }
            [(one, _)] => *one,
            many => {
                return Err(Pkcs11Error::Duplicate {
                    token: self.token_label.clone(),
                    label: label.to_owned(),
                    count: many.len(),
                })
            }
        };
        // A key that could be copied out of the token, or that ever could
        // (imported from a file whose copy may be kept, or exportable once
        // and made fast later, a change PKCS#11 allows), is not what a
        // `pkcs11` location promises: refused, not reported as such. The
        // token sets CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE itself,
        // and only for a key generated in it that never was either.
        let guard = session
            .get_attributes(
                key,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Id,
                ],
            )
            .map_err(|e| self.op_err("C_GetAttributeValue", &e))?;
        let mut id = Vec::new();
        for a in guard {
            match a {
                Attribute::Id(v) => id = v,
                Attribute::Sensitive(false) => {
                    return Err(bad(
                        "the private key is not CKA_SENSITIVE: the token would reveal it".into(),
                    ))
                }
                Attribute::Extractable(true) => {
                    return Err(bad(
                        "the private key is CKA_EXTRACTABLE: it could be copied out of the token \
                         (wrapped); make it with CKA_EXTRACTABLE false"
                            .into(),
                    ))
                }
                Attribute::AlwaysSensitive(false) | Attribute::NeverExtractable(false) => {
                    return Err(bad(
                        "the private key has been outside the token, or could have been \
                         (not CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE: imported, or \
                         exportable once), so a copy may exist; generate it in the token"
                            .into(),
                    ))
                }
                _ => {}
            }
        }
        // The public half: by the private key's CKA_ID (the pairing PKCS#11
        // tools keep, and the only one where the two labels differ), else
        // by the label. Whichever is found, `open` proves with a signature
        // that it is the private key's pair.
        let find = |attrs: &[Attribute]| {
            session
                .find_objects(attrs)
                .map_err(|e| self.op_err("C_FindObjects", &e))
        };
        let private_id = id.clone();
        let mut publics = Vec::new();
        if !id.is_empty() {
            publics = find(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])?;
            if publics.is_empty() {
                publics = find(&[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Id(id)])?;
            }
        }
        if publics.is_empty() {
            publics = find(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])?;
        }
        let [public] = publics.as_slice() else {
            return Err(bad(format!(
                "needs exactly one public key object with the same label, found {}",
                publics.len()
            )));
        };
        let attrs = session
            .get_attributes(
                *public,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                ],
            )
            .map_err(|e| self.op_err("C_GetAttributeValue", &e))?;
        let (mut ck_type, mut params, mut point) = (None, None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(t) => ck_type = Some(t),
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = Some(p),
                _ => {}
            }
        }
        let params = params.unwrap_or_default();
        let kt = match ck_type {
            Some(t) if t == CkKeyType::EC && params == P256_PARAMS => KeyType::EcdsaP256,
            Some(t)
                if t == CkKeyType::EC_EDWARDS
                    && (params == ED25519_OID_PARAMS || params == ED25519_NAME_PARAMS) =>
            {
                KeyType::Ed25519
            }
            Some(t) => {
                return Err(bad(format!(
                    "unsupported key ({t} with parameters {}); keyproof uses ecdsa-p256 or ed25519",
                    hex::encode(&params)
                )))
            }
            None => return Err(bad("the public key has no CKA_KEY_TYPE".into())),
        };
        let point = point.unwrap_or_default();
        let raw = ec_point(kt, &point).ok_or_else(|| {
            bad(format!(
                "CKA_EC_POINT of {} bytes is not a {kt} public key",
                point.len()
            ))
        })?;
        Ok((key, kt, spki_for(kt, raw), private_id))
    }
}

impl Pkcs11Key {
    /// Opens the private key labelled `key_label` (and its public key, same
    /// label) in the token of `spec`.
    pub fn open(spec: &TokenSpec, key_label: &str) -> Result<Pkcs11Key, Pkcs11Error> {
        Pkcs11Key::open_with(spec, key_label, &Pick::Unique)
    }

    fn open_with(spec: &TokenSpec, key_label: &str, pick: &Pick) -> Result<Pkcs11Key, Pkcs11Error> {
        let Found {
            open,
            session,
            key_type,
            spki,
            id,
        } = spec.open_key(key_label, false, pick)?;
        let state = State {
            open: Some(open),
            idle: vec![session],
            generation: 0,
            failed: None,
            sessions: 1,
            reopening: false,
            refused_pin: None,
        };
        let k = Pkcs11Key {
            inner: Arc::new(Inner {
                spec: spec.clone(),
                label: key_label.to_owned(),
                key_type,
                spki,
                id,
                available: AtomicBool::new(true),
                observer: RwLock::new(None),
                state: Mutex::new(state),
                returned: std::sync::Condvar::new(),
            }),
        };
        // Prove the key signs now, and is the pair of the public key read,
        // so a key that cannot (no CKA_SIGN, a mechanism the token lacks)
        // or a mismatched pair is a startup error, not a failed handshake
        // later.
        let bad = |msg: String| Pkcs11Error::BadKey {
            token: spec.token_label.clone(),
            label: key_label.to_owned(),
            msg,
        };
        let sig = k.sign_raw(PROOF).map_err(|e| match e {
            Pkcs11Error::Operation { msg, .. } => bad(format!("cannot sign: {msg}")),
            other => other,
        })?;
        if !verifies(k.inner.key_type, &k.inner.spki, PROOF, &sig) {
            return Err(bad(
                "the private key is not the pair of the public key object found for it".into(),
            ));
        }
        Ok(k)
    }

    /// Generates a new key pair of type `kt` in the token, labelled
    /// `key_label`: private key sensitive, not extractable, token object.
    /// Refuses ([`Pkcs11Error::KeyExists`]) when the label is taken.
    ///
    /// Two processes may generate under one label at once (an old and a
    /// new pod of a rollout, sidecars sharing a network HSM). Each key gets
    /// a random CKA_ID; after generating, a process that sees a key with a
    /// lower CKA_ID destroys its own, and every generator opens, after a
    /// short settle, the key with the lowest CKA_ID: they end on one key.
    pub fn generate(
        spec: &TokenSpec,
        key_label: &str,
        kt: KeyType,
    ) -> Result<Pkcs11Key, Pkcs11Error> {
        // Open first: it finds the token (re-enumerating if needed) and
        // tells a taken label apart from a missing one.
        let (m, slot) = match spec.open_key(key_label, false, &Pick::Lowest) {
            Ok(found) => {
                found.open.module.close(vec![found.session]);
                return Err(Pkcs11Error::KeyExists {
                    token: spec.token_label.clone(),
                    label: key_label.to_owned(),
                });
            }
            Err(Pkcs11Error::NoKey { .. }) => {
                let m = module(&spec.module)?;
                let shared = m.shared();
                let slot = spec.slot(&m.ctx)?;
                drop(shared);
                (m, slot)
            }
            Err(e) => return Err(e),
        };
        let shared = m.shared();
        let pooled = spec.login(&m, slot, true)?;
        let session = &pooled.session;
        let taken = spec.private_keys(session, key_label);
        if !matches!(&taken, Ok(k) if k.is_empty()) {
            let _ = pooled.session.close();
            taken?;
            return Err(Pkcs11Error::KeyExists {
                token: spec.token_label.clone(),
                label: key_label.to_owned(),
            });
        }
        // A random CKA_ID: two processes generating under one label at once
        // (an old and a new pod in a rollout) tell their keys apart by it,
        // and all agree to keep the one with the lowest.
        let mut id = vec![0u8; 16];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| Pkcs11Error::Operation {
            token: spec.token_label.clone(),
            op: "random",
            msg: "no randomness for CKA_ID".into(),
        })?;
        let label = Attribute::Label(key_label.as_bytes().to_vec());
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            label.clone(),
            Attribute::Id(id.clone()),
        ];
        let generated = match kt {
            KeyType::EcdsaP256 => session.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template(P256_PARAMS, &label, &id),
                &private,
            ),
            KeyType::Ed25519 => session
                .generate_key_pair(
                    &Mechanism::EccEdwardsKeyPairGen,
                    &public_template(ED25519_OID_PARAMS, &label, &id),
                    &private,
                )
                .or_else(|_| {
                    session.generate_key_pair(
                        &Mechanism::EccEdwardsKeyPairGen,
                        &public_template(ED25519_NAME_PARAMS, &label, &id),
                        &private,
                    )
                }),
        };
        let generated = match generated {
            Ok(handles) => handles,
            Err(e) => {
                let _ = pooled.session.close();
                return Err(spec.op_err("C_GenerateKeyPair", &e));
            }
        };
        let lost = spec.lost_generation_race(session, key_label, &id);
        if let Ok(true) = lost {
            // Another process generated under this label at the same time
            // and its key wins: ours goes, and theirs is opened below.
            let _ = session.destroy_object(generated.1);
            let _ = session.destroy_object(generated.0);
        }
        let _ = pooled.session.close();
        lost?;
        drop(shared);
        // Generators that started together all see each other's keys by
        // now, and all open the lowest: one key for every one of them.
        std::thread::sleep(GENERATION_SETTLE);
        let key = Pkcs11Key::open_with(spec, key_label, &Pick::Lowest)?;
        if key.inner.id != id {
            // Another generator's key won after ours was checked: ours is
            // garbage now (best effort; a leftover is never picked).
            spec.destroy_by_id(&key, &id);
        }
        Ok(key)
    }

    /// [`Pkcs11Key::open`], or [`Pkcs11Key::generate`] when no key has this
    /// label; the flag says whether it was generated.
    pub fn open_or_generate(
        spec: &TokenSpec,
        key_label: &str,
        kt: KeyType,
    ) -> Result<(Pkcs11Key, bool), Pkcs11Error> {
        match Pkcs11Key::open_with(spec, key_label, &Pick::Lowest) {
            Ok(k) => Ok((k, false)),
            Err(Pkcs11Error::NoKey { .. }) => match Pkcs11Key::generate(spec, key_label, kt) {
                Ok(k) => Ok((k, true)),
                // Another process generated it in between: use that one.
                Err(Pkcs11Error::KeyExists { .. } | Pkcs11Error::Duplicate { .. }) => {
                    Pkcs11Key::open_with(spec, key_label, &Pick::Lowest).map(|k| (k, false))
                }
                // A token busy with another generator may refuse one
                // (SoftHSM2 does): that one's key, or one more try.
                Err(Pkcs11Error::Operation { .. }) => {
                    std::thread::sleep(GENERATION_SETTLE);
                    match Pkcs11Key::open_with(spec, key_label, &Pick::Lowest) {
                        Ok(k) => Ok((k, false)),
                        Err(Pkcs11Error::NoKey { .. }) => {
                            Pkcs11Key::generate(spec, key_label, kt).map(|k| (k, true))
                        }
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            },
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

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.inner.key_type
    }

    /// The public key, a DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.inner.spki
    }

    /// An RFC 7512 URI naming the key (`pkcs11:token=...;object=...`), for
    /// logs and `/identity`.
    pub fn uri(&self) -> String {
        key_uri(&self.inner.spec.token_label, &self.inner.label)
    }

    /// Sets the observer told the result of every private-key operation
    /// (replacing any earlier one).
    pub fn on_operation(&self, observer: Observer) {
        *self
            .inner
            .observer
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(observer);
    }

    /// Whether the last operation succeeded (or none failed yet).
    pub fn is_available(&self) -> bool {
        self.inner.available.load(Ordering::Relaxed)
    }

    /// Signs a fixed message: tells whether the token works now (and
    /// reopens it when due). Counted like any operation.
    pub fn probe(&self) -> Result<(), Pkcs11Error> {
        self.sign_raw(b"keyproof pkcs11 probe").map(|_| ())
    }

    fn observe(&self, r: OpResult) {
        let obs = self
            .inner
            .observer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(obs) = obs {
            obs(r);
        }
    }

    /// ECDSA `r || s` over SHA-256 of `msg`, or an Ed25519 signature of
    /// `msg`.
    pub fn sign_raw(&self, msg: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        let r = self.sign_once(msg);
        match &r {
            Ok(_) => {
                self.inner.available.store(true, Ordering::Relaxed);
                self.observe(OpResult::Ok);
            }
            Err(Pkcs11Error::Unavailable { .. }) => self.observe(OpResult::Unavailable),
            // Load, not the token: counted, readiness unchanged.
            Err(Pkcs11Error::Busy { .. }) => self.observe(OpResult::Failed),
            Err(_) => {
                self.inner.available.store(false, Ordering::Relaxed);
                self.observe(OpResult::Failed);
            }
        }
        r
    }

    /// One signature: on a pooled session if the token is open, after a
    /// reopen otherwise. A session from before a re-initialisation of the
    /// module (by another key) is stale and is retried on a fresh one
    /// without counting as a failure; a failure on a pooled session earns
    /// one retry after a reopen (the token may have been re-enumerated).
    fn sign_once(&self, msg: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        let mut retried = false;
        for _ in 0..4 {
            let (session, open, generation, fresh) = self.checkout()?;
            match self.sign_on(&session, &open, msg) {
                Attempt::Signed(sig) => {
                    self.checkin(&open, session, generation);
                    return Ok(sig);
                }
                Attempt::Stale => {
                    self.discard(&open, vec![session]);
                    self.reset(generation, None);
                }
                Attempt::Failed(e) => {
                    self.discard(&open, vec![session]);
                    if fresh || retried {
                        self.reset(generation, Some(&e));
                        return Err(e);
                    }
                    retried = true;
                    // Not marked failed: the retry reopens at once.
                    self.reset(generation, None);
                }
            }
        }
        Err(Pkcs11Error::Unavailable {
            token: self.inner.spec.token_label.clone(),
            last: "the module was re-initialised under every attempt".into(),
        })
    }

    /// Signs on `session`, with the module held shared so that it cannot be
    /// re-initialised meanwhile; handles from an earlier epoch are never
    /// used (their numbers may name another session or object now).
    fn sign_on(&self, session: &Pooled, open: &Open, msg: &[u8]) -> Attempt {
        let _shared = open.module.shared();
        let epoch = open.module.epoch.load(Ordering::Relaxed);
        if session.epoch != epoch || open.epoch != epoch {
            return Attempt::Stale;
        }
        let r = match self.inner.key_type {
            KeyType::EcdsaP256 => session
                .session
                .sign(&Mechanism::Ecdsa, open.key, &sha256(msg)),
            KeyType::Ed25519 => session.session.sign(
                &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                open.key,
                msg,
            ),
        };
        let sig = match r {
            Ok(sig) => sig,
            Err(e) => return Attempt::Failed(self.inner.spec.op_err("C_Sign", &e)),
        };
        if sig.len() != 64 {
            return Attempt::Failed(Pkcs11Error::BadKey {
                token: self.inner.spec.token_label.clone(),
                label: self.inner.label.clone(),
                msg: format!(
                    "the token returned a {}-byte signature, expected 64",
                    sig.len()
                ),
            });
        }
        Attempt::Signed(sig)
    }

    fn unavailable(&self, last: impl fmt::Display) -> Pkcs11Error {
        Pkcs11Error::Unavailable {
            token: self.inner.spec.token_label.clone(),
            last: last.to_string(),
        }
    }

    /// A session to sign on: `(session, open, generation, fresh)`, where
    /// `fresh` says the token was (re)opened just now. The reopen runs
    /// outside the lock; signers arriving meanwhile fail fast rather than
    /// queue behind it.
    fn checkout(&self) -> Result<(Pooled, Open, u64, bool), Pkcs11Error> {
        let mut st = lock(&self.inner.state);
        let mut fresh = false;
        if st.open.is_none() {
            if st.reopening {
                return Err(self.unavailable("the token is being reopened"));
            }
            if let Some((at, last)) = &st.failed {
                if at.elapsed() < REOPEN_INTERVAL {
                    return Err(self.unavailable(last));
                }
            }
            if let Some(refused) = st.refused_pin {
                if pin_digest(&self.inner.spec.pin_file) == Some(refused) {
                    let e = self.unavailable(
                        "the token refused the PIN in the PIN file; it is not offered again \
                         until the file changes",
                    );
                    st.failed = Some((Instant::now(), e.clone()));
                    return Err(e);
                }
            }
            st.reopening = true;
            drop(st);
            let reopened = self.reopen();
            st = lock(&self.inner.state);
            st.reopening = false;
            match reopened {
                Ok((open, session)) => {
                    st.open = Some(open);
                    st.idle.push(session);
                    st.sessions += 1;
                    st.failed = None;
                    st.refused_pin = None;
                    fresh = true;
                }
                Err(e) => {
                    if let Pkcs11Error::Login { .. } = e {
                        st.refused_pin = pin_digest(&self.inner.spec.pin_file);
                    }
                    st.failed = Some((Instant::now(), e.clone()));
                    return Err(e);
                }
            }
        }
        let deadline = Instant::now() + SESSION_WAIT;
        loop {
            let Some(open) = st.open.clone() else {
                return Err(self.unavailable("closed after a failure"));
            };
            let generation = st.generation;
            if let Some(s) = st.idle.pop() {
                return Ok((s, open, generation, fresh));
            }
            if st.sessions < MAX_SESSIONS {
                st.sessions += 1;
                drop(st);
                // Logged-in state is per token, not per session: a new
                // session on the same slot is logged in already.
                let opened = {
                    let _shared = open.module.shared();
                    open.module.session(open.slot, false)
                };
                return match opened {
                    Ok(s) => Ok((s, open, generation, fresh)),
                    Err(e) => {
                        self.release(1);
                        Err(self.inner.spec.op_err("C_OpenSession", &e))
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Pkcs11Error::Busy {
                    token: self.inner.spec.token_label.clone(),
                    max: MAX_SESSIONS,
                });
            }
            st = self
                .inner
                .returned
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Gives `n` session slots back (sessions closed or forgotten).
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut st = lock(&self.inner.state);
        st.sessions = st.sessions.saturating_sub(n);
        drop(st);
        self.inner.returned.notify_all();
    }

    /// Closes sessions (those of an earlier epoch are only forgotten) and
    /// gives their slots back.
    fn discard(&self, open: &Open, sessions: Vec<Pooled>) {
        let n = sessions.len();
        open.module.close(sessions);
        self.release(n);
    }

    fn checkin(&self, open: &Open, session: Pooled, generation: u64) {
        let mut st = lock(&self.inner.state);
        if st.generation == generation && st.open.is_some() && st.idle.len() < MAX_IDLE_SESSIONS {
            st.idle.push(session);
            drop(st);
            self.inner.returned.notify_one();
            return;
        }
        drop(st);
        self.discard(open, vec![session]);
    }

    /// Forgets the open token after a failure (unless a later reset or
    /// reopen already did), closing the pooled sessions. With `failure`,
    /// the next reopen waits for [`REOPEN_INTERVAL`].
    fn reset(&self, generation: u64, failure: Option<&Pkcs11Error>) {
        let mut st = lock(&self.inner.state);
        if st.generation != generation {
            return;
        }
        st.generation += 1;
        let open = st.open.take();
        let idle = std::mem::take(&mut st.idle);
        st.failed = failure.map(|e| (Instant::now(), e.clone()));
        drop(st);
        if let Some(open) = open {
            self.discard(&open, idle);
        }
    }

    /// Opens the token and finds the key again; it must be the same key.
    /// Another key of the same module may re-initialise it meanwhile (its
    /// own token went away): that says nothing about this key, so the
    /// reopen starts over, a few times.
    fn reopen(&self) -> Result<(Open, Pooled), Pkcs11Error> {
        let mut tries = 0;
        loop {
            match self.reopen_once() {
                Err(Reopen::Stale) if tries < 3 => tries += 1,
                Err(Reopen::Stale) => {
                    return Err(Pkcs11Error::BadKey {
                        token: self.inner.spec.token_label.clone(),
                        label: self.inner.label.clone(),
                        msg: "the module was re-initialised while reopening, four times over"
                            .into(),
                    })
                }
                Err(Reopen::Failed(e)) => return Err(e),
                Ok(found) => return Ok(found),
            }
        }
    }

    fn reopen_once(&self) -> Result<(Open, Pooled), Reopen> {
        let spec = &self.inner.spec;
        let Found {
            open,
            session,
            spki,
            ..
        } = spec
            .open_key(&self.inner.label, true, &Pick::Id(self.inner.id.clone()))
            .map_err(Reopen::Failed)?;
        let bad = |msg: &str| {
            Reopen::Failed(Pkcs11Error::BadKey {
                token: spec.token_label.clone(),
                label: self.inner.label.clone(),
                msg: msg.into(),
            })
        };
        if spki != self.inner.spki {
            open.module.close(vec![session]);
            return Err(bad(
                "the key under this label is no longer the one opened at startup",
            ));
        }
        match self.sign_on(&session, &open, PROOF) {
            Attempt::Signed(sig) if verifies(self.inner.key_type, &spki, PROOF, &sig) => {
                Ok((open, session))
            }
            Attempt::Signed(_) => {
                open.module.close(vec![session]);
                Err(bad(
                    "the private key under this label is no longer the pair of the one opened \
                     at startup",
                ))
            }
            Attempt::Stale => {
                open.module.close(vec![session]);
                Err(Reopen::Stale)
            }
            Attempt::Failed(e) => {
                open.module.close(vec![session]);
                Err(Reopen::Failed(e))
            }
        }
    }
}

/// Why one attempt at [`Pkcs11Key::reopen`] failed.
enum Reopen {
    /// The module was re-initialised between opening and the proof
    /// signature: try again.
    Stale,
    /// Anything else.
    Failed(Pkcs11Error),
}

impl Pkcs11Key {
    /// As [`Pkcs11Key::sign_raw`], ECDSA as a DER `ECDSA-Sig-Value` (the
    /// form TLS 1.3 CertificateVerify and X.509 signatures carry).
    pub fn sign_der(&self, msg: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        let raw = self.sign_raw(msg)?;
        match self.inner.key_type {
            KeyType::Ed25519 => Ok(raw),
            KeyType::EcdsaP256 => ecdsa_raw_to_der(&raw).ok_or_else(|| Pkcs11Error::BadKey {
                token: self.inner.spec.token_label.clone(),
                label: self.inner.label.clone(),
                msg: "malformed ECDSA signature".into(),
            }),
        }
    }

    /// The key as rustls signs with it (TLS 1.3 CertificateVerify). A
    /// failed signature fails the handshake.
    pub fn rustls_signing_key(&self) -> Arc<dyn rustls::sign::SigningKey> {
        Arc::new(TlsKey(self.clone()))
    }
}

fn public_template(params: &[u8], label: &Attribute, id: &[u8]) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::EcParams(params.to_vec()),
        label.clone(),
        Attribute::Id(id.to_vec()),
    ]
}

/// The RFC 7512 URI of the private key labelled `key_label` in the token
/// labelled `token_label`: the one spelling every binary logs and shows.
pub fn key_uri(token_label: &str, key_label: &str) -> String {
    format!(
        "pkcs11:token={};object={};type=private",
        pct(token_label),
        pct(key_label)
    )
}

/// Percent-encodes what RFC 7512 does not allow bare in a path attribute.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:[]@!$'()*+,=&".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a TLS handshake fails with when our own token key could not sign
/// its CertificateVerify: carried in `rustls::Error::Other`, so that the
/// refusal is told apart from a peer's fault.
#[derive(Debug)]
pub struct OwnKeyFailed(pub Pkcs11Error);

impl fmt::Display for OwnKeyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "our private key could not sign: {}", self.0)
    }
}

impl std::error::Error for OwnKeyFailed {}

/// rustls' view of a token key.
#[derive(Debug)]
struct TlsKey(Pkcs11Key);

impl TlsKey {
    fn scheme(&self) -> SignatureScheme {
        match self.0.inner.key_type {
            KeyType::EcdsaP256 => SignatureScheme::ECDSA_NISTP256_SHA256,
            KeyType::Ed25519 => SignatureScheme::ED25519,
        }
    }
}

impl rustls::sign::SigningKey for TlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        let scheme = self.scheme();
        offered.contains(&scheme).then(|| {
            Box::new(TlsSigner {
                key: self.0.clone(),
                scheme,
            }) as Box<dyn rustls::sign::Signer>
        })
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.0.inner.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.0.inner.key_type {
            KeyType::EcdsaP256 => SignatureAlgorithm::ECDSA,
            KeyType::Ed25519 => SignatureAlgorithm::ED25519,
        }
    }
}

#[derive(Debug)]
struct TlsSigner {
    key: Pkcs11Key,
    scheme: SignatureScheme,
}

impl rustls::sign::Signer for TlsSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.key
            .sign_der(message)
            .map_err(|e| rustls::Error::Other(rustls::OtherError(Arc::new(OwnKeyFailed(e)))))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
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

/// Against a real SoftHSM2 (Debian `softhsm2`, installed by `test.sh`); the
/// tests say so and pass when it is not installed and `CI` is unset.
#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::OnceLock;

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const PIN: &str = "5678";
    const TOKENS: [&str; 11] = [
        "t-files",
        "t-gen",
        "t-errors",
        "t-remove",
        "t-rcgen",
        "t-stress",
        "t-other",
        "t-pin",
        "t-swap",
        "t-race",
        "t-imported",
    ];

    struct Hsm {
        dir: PathBuf,
        pin_file: PathBuf,
    }

    /// One SoftHSM2 configuration for the test process (the module reads
    /// `SOFTHSM2_CONF` once), with a token per test, made before any test
    /// initialises the module.
    fn hsm() -> Option<&'static Hsm> {
        static HSM: OnceLock<Option<Hsm>> = OnceLock::new();
        HSM.get_or_init(|| {
            if cfg!(target_feature = "crt-static") {
                let e = module(Path::new(MODULE)).err().expect("refused");
                assert!(e.to_string().contains("statically linked"), "{e}");
                eprintln!("SKIP: a static build refuses PKCS#11 modules");
                return None;
            }
            if !Path::new(MODULE).exists() {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "{MODULE} missing: install softhsm2 (test.sh does)"
                );
                eprintln!("SKIP: {MODULE} is not installed");
                return None;
            }
            let dir = std::env::temp_dir().join(format!("keyproof-pkcs11-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("tokens")).unwrap();
            let conf = dir.join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!(
                    "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                    dir.join("tokens").display()
                ),
            )
            .unwrap();
            // Set before the module is loaded by any test (all go through
            // this function first); the tests never read it concurrently.
            std::env::set_var("SOFTHSM2_CONF", &conf);
            for t in TOKENS {
                let out = Command::new("softhsm2-util")
                    .args([
                        "--init-token",
                        "--free",
                        "--label",
                        t,
                        "--so-pin",
                        "1234",
                        "--pin",
                        PIN,
                    ])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let pin_file = dir.join("pin");
            std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
            Some(Hsm { dir, pin_file })
        })
        .as_ref()
    }

    fn spec(h: &Hsm, token: &str) -> TokenSpec {
        TokenSpec {
            module: PathBuf::from(MODULE),
            token_label: token.into(),
            pin_file: h.pin_file.clone(),
        }
    }

    fn verify(key: &Pkcs11Key, msg: &[u8], raw: &[u8]) {
        use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ED25519};
        let point = rcgen::PublicKeyData::der_bytes(key);
        match key.key_type() {
            KeyType::EcdsaP256 => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                .verify(msg, raw)
                .unwrap(),
            KeyType::Ed25519 => UnparsedPublicKey::new(&ED25519, point)
                .verify(msg, raw)
                .unwrap(),
        }
    }

    #[test]
    fn opens_a_key_made_by_pkcs11_tool_and_signs() {
        let Some(h) = hsm() else { return };
        let out = Command::new("pkcs11-tool")
            .args([
                "--module",
                MODULE,
                "--token-label",
                "t-files",
                "--login",
                "--pin",
                PIN,
            ])
            .args([
                "--keypairgen",
                "--key-type",
                "EC:prime256v1",
                "--label",
                "workload",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = Pkcs11Key::open(&spec(h, "t-files"), "workload").unwrap();
        assert_eq!(key.key_type(), KeyType::EcdsaP256);
        let sig = key.sign_raw(b"hello").unwrap();
        verify(&key, b"hello", &sig);
        assert_eq!(
            key.uri(),
            "pkcs11:token=t-files;object=workload;type=private"
        );
    }

    #[test]
    fn generates_keys_that_sign_and_refuses_a_taken_label() {
        let Some(h) = hsm() else { return };
        let s = spec(h, "t-gen");
        for (label, kt) in [("p256", KeyType::EcdsaP256), ("ed", KeyType::Ed25519)] {
            let (key, generated) = Pkcs11Key::open_or_generate(&s, label, kt).unwrap();
            assert!(generated);
            assert_eq!(key.key_type(), kt);
            let sig = key.sign_raw(b"msg").unwrap();
            verify(&key, b"msg", &sig);
            let (again, generated) = Pkcs11Key::open_or_generate(&s, label, kt).unwrap();
            assert!(!generated);
            assert_eq!(again.spki_der(), key.spki_der());
            let e = Pkcs11Key::generate(&s, label, kt).unwrap_err();
            assert_eq!(e.reason(), "key_exists", "{e}");
        }
    }

    #[test]
    fn errors_name_what_is_wrong_and_never_the_pin() {
        let Some(h) = hsm() else { return };
        let s = spec(h, "t-errors");
        Pkcs11Key::generate(&s, "k", KeyType::EcdsaP256).unwrap();
        let e = Pkcs11Key::open(&s, "other").unwrap_err();
        assert_eq!(e.reason(), "no_key", "{e}");
        assert!(e.to_string().contains("\"other\""), "{e}");
        let e = Pkcs11Key::open(&spec(h, "absent"), "k").unwrap_err();
        assert_eq!(e.reason(), "no_token", "{e}");
        assert!(
            e.to_string().contains("t-errors"),
            "lists present tokens: {e}"
        );
        let wrong = h.dir.join("wrong-pin");
        std::fs::write(&wrong, "0000\n").unwrap();
        let e = Pkcs11Key::open(
            &TokenSpec {
                pin_file: wrong,
                ..s.clone()
            },
            "k",
        )
        .unwrap_err();
        assert_eq!(e.reason(), "login", "{e}");
        assert!(
            !e.to_string().contains("0000") && !e.to_string().contains(PIN),
            "{e}"
        );
        let e = Pkcs11Key::open(
            &TokenSpec {
                pin_file: h.dir.join("nope"),
                ..s.clone()
            },
            "k",
        )
        .unwrap_err();
        assert_eq!(e.reason(), "pin_file", "{e}");
        // One others may write (round 10, keys F4).
        let open_pin = h.dir.join("open-pin");
        std::fs::write(&open_pin, format!("{PIN}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open_pin, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = Pkcs11Key::open(
            &TokenSpec {
                pin_file: open_pin,
                ..s.clone()
            },
            "k",
        )
        .unwrap_err();
        assert_eq!(e.reason(), "pin_file", "{e}");
        assert!(e.to_string().contains("writable by others"), "{e}");
        // Not regular files: refused at once, never read (or waited on).
        let fifo = h.dir.join("pin-fifo");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        for odd in [fifo, PathBuf::from("/dev/zero"), h.dir.clone()] {
            let e = Pkcs11Key::open(
                &TokenSpec {
                    pin_file: odd.clone(),
                    ..s.clone()
                },
                "k",
            )
            .unwrap_err();
            assert_eq!(e.reason(), "pin_file", "{}: {e}", odd.display());
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        let e = Pkcs11Key::open(
            &TokenSpec {
                module: "/nonexistent/libp11.so".into(),
                ..s
            },
            "k",
        )
        .unwrap_err();
        assert_eq!(e.reason(), "module", "{e}");
    }

    /// rcgen signs a certificate through the token; rustls accepts the pair.
    #[test]
    fn rcgen_and_rustls_sign_through_the_token() {
        let Some(h) = hsm() else { return };
        let s = spec(h, "t-rcgen");
        for (label, kt) in [("p256", KeyType::EcdsaP256), ("ed", KeyType::Ed25519)] {
            let key = Pkcs11Key::generate(&s, label, kt).unwrap();
            let params = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
            let cert = params.self_signed(&key).unwrap();
            let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
            assert_eq!(parsed.public_key().raw, key.spki_der());
            let ck =
                rustls::sign::CertifiedKey::new(vec![cert.der().clone()], key.rustls_signing_key());
            ck.keys_match().unwrap();
            let scheme = match kt {
                KeyType::EcdsaP256 => SignatureScheme::ECDSA_NISTP256_SHA256,
                KeyType::Ed25519 => SignatureScheme::ED25519,
            };
            let signer = ck.key.choose_scheme(&[scheme]).unwrap();
            let sig = signer.sign(b"tls").unwrap();
            use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ED25519};
            let alg: &dyn aws_lc_rs::signature::VerificationAlgorithm = match kt {
                KeyType::EcdsaP256 => &ECDSA_P256_SHA256_ASN1,
                KeyType::Ed25519 => &ED25519,
            };
            UnparsedPublicKey::new(alg, rcgen::PublicKeyData::der_bytes(&key))
                .verify(b"tls", &sig)
                .unwrap();
        }
    }

    /// A token whose files vanish fails closed, is reported unavailable,
    /// and is used again once it is back, without reopening by hand.
    #[test]
    fn a_removed_token_fails_closed_and_recovers() {
        let Some(h) = hsm() else { return };
        let s = spec(h, "t-remove");
        let key = Pkcs11Key::generate(&s, "k", KeyType::EcdsaP256).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        key.on_operation(Arc::new(move |r| lock(&seen2).push(r)));
        key.probe().unwrap();
        assert!(key.is_available());
        // Find this token's directory (SoftHSM2 names it by serial).
        let token_dir = token_dir(h, "t-remove");
        let away = h.dir.join("removed");
        std::fs::rename(&token_dir, &away).unwrap();
        let e = key.probe().unwrap_err();
        assert!(!key.is_available(), "{e}");
        let e2 = key.probe().unwrap_err();
        assert_eq!(e2.reason(), "unavailable", "{e2}");
        std::fs::rename(&away, &token_dir).unwrap();
        std::thread::sleep(REOPEN_INTERVAL + Duration::from_millis(100));
        key.probe().unwrap();
        assert!(key.is_available());
        let seen = lock(&seen).clone();
        assert_eq!(seen.first(), Some(&OpResult::Ok));
        assert!(seen.contains(&OpResult::Failed), "{seen:?}");
        assert!(seen.contains(&OpResult::Unavailable), "{seen:?}");
        assert_eq!(seen.last(), Some(&OpResult::Ok));
    }

    /// The directory SoftHSM2 keeps `label`'s token in (named by serial).
    fn token_dir(h: &Hsm, label: &str) -> PathBuf {
        std::fs::read_dir(h.dir.join("tokens"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                std::fs::read(p.join("token.object"))
                    .map(|b| b.windows(label.len()).any(|w| w == label.as_bytes()))
                    .unwrap_or(false)
            })
            .expect("token directory")
    }

    /// Signers on several threads while the token goes away and comes back
    /// twice: every signature is either valid or an error (never a crash or
    /// a wrong signature), and the key works afterwards.
    #[test]
    fn concurrent_signers_survive_removal_and_reinitialisation() {
        let Some(h) = hsm() else { return };
        let s = spec(h, "t-stress");
        let key = Pkcs11Key::generate(&s, "k", KeyType::EcdsaP256).unwrap();
        // A second key of the same module, on a token that stays: every
        // re-initialisation the first key's reopen does renumbers its
        // sessions and objects, and it must never sign with a stale handle
        // (which could name the other key now).
        let other = Pkcs11Key::generate(&spec(h, "t-other"), "k", KeyType::EcdsaP256).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|i| {
                let key = if i % 2 == 0 {
                    key.clone()
                } else {
                    other.clone()
                };
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0u32, 0u32);
                    while !stop.load(Ordering::Relaxed) {
                        let msg = format!("worker {i} {ok} {failed}");
                        match key.sign_raw(msg.as_bytes()) {
                            Ok(sig) => {
                                verify(&key, msg.as_bytes(), &sig);
                                ok += 1;
                            }
                            Err(_) => failed += 1,
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        let dir = token_dir(h, "t-stress");
        let away = h.dir.join("stress-away");
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::rename(&dir, &away).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            std::fs::rename(&away, &dir).unwrap();
            std::thread::sleep(REOPEN_INTERVAL + Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
        let mut total_ok = 0;
        for w in workers {
            let (ok, _) = w.join().unwrap();
            total_ok += ok;
        }
        assert!(total_ok > 0);
        key.probe().unwrap();
        other.probe().unwrap();
        assert!(key.is_available() && other.is_available());
    }

    /// A PIN the token refused is not offered again (a token locks after a
    /// few wrong PINs), and a corrected PIN file is used at once.
    #[test]
    fn a_refused_pin_is_not_retried_until_the_file_changes() {
        let Some(h) = hsm() else { return };
        let pin_file = h.dir.join("t-pin.pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        let s = TokenSpec {
            pin_file: pin_file.clone(),
            ..spec(h, "t-pin")
        };
        let key = Pkcs11Key::generate(&s, "k", KeyType::EcdsaP256).unwrap();
        let dir = token_dir(h, "t-pin");
        let away = h.dir.join("t-pin-away");
        std::fs::rename(&dir, &away).unwrap();
        key.probe().unwrap_err();
        std::fs::write(&pin_file, "0000\n").unwrap();
        std::fs::rename(&away, &dir).unwrap();
        std::thread::sleep(REOPEN_INTERVAL + Duration::from_millis(100));
        let e = key.probe().unwrap_err();
        assert_eq!(e.reason(), "login", "{e}");
        std::thread::sleep(REOPEN_INTERVAL + Duration::from_millis(100));
        let e = key.probe().unwrap_err();
        assert_eq!(e.reason(), "unavailable", "{e}");
        assert!(e.to_string().contains("until the file changes"), "{e}");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        std::thread::sleep(REOPEN_INTERVAL + Duration::from_millis(100));
        key.probe().unwrap();
        assert!(key.is_available());
    }

    /// Runs OpenSC's pkcs11-tool, logged in to `token`, which must succeed.
    fn pkcs11_tool(token: &str, args: &[&str]) {
        let out = Command::new("pkcs11-tool")
            .args([
                "--module",
                MODULE,
                "--token-label",
                token,
                "--login",
                "--pin",
                PIN,
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A private key swapped under the label (public object left behind)
    /// is refused at open: it would sign every handshake wrongly.
    #[test]
    fn a_private_key_that_is_not_the_public_keys_pair_is_refused() {
        let Some(h) = hsm() else { return };
        let tool = |args: &[&str]| pkcs11_tool("t-swap", args);
        for (label, id) in [("sw", "01"), ("other", "02")] {
            tool(&[
                "--keypairgen",
                "--key-type",
                "EC:prime256v1",
                "--label",
                label,
                "--id",
                id,
            ]);
        }
        // The other pair's public key takes the place of sw's.
        tool(&["--delete-object", "--type", "pubkey", "--id", "01"]);
        tool(&["--type", "pubkey", "--id", "02", "--set-id", "01"]);
        let e = Pkcs11Key::open(&spec(h, "t-swap"), "sw").unwrap_err();
        assert_eq!(e.reason(), "bad_key", "{e}");
        assert!(e.to_string().contains("not the pair"), "{e}");
    }

    /// A private key imported into the token (a copy of it may be kept
    /// outside), or one made exportable, is refused: `pkcs11` promises a
    /// key that never left the token (round 10, keys F1).
    #[test]
    fn a_key_that_was_ever_outside_the_token_is_refused() {
        let Some(h) = hsm() else { return };
        let tool = |args: &[&str]| pkcs11_tool("t-imported", args);
        let copy = KeyType::EcdsaP256.generate().unwrap();
        let p8 = h.dir.join("copy.p8");
        std::fs::write(&p8, copy.serialize_der()).unwrap();
        tool(&[
            "--write-object",
            p8.to_str().unwrap(),
            "--type",
            "privkey",
            "--label",
            "imported",
            "--usage-sign",
            "--sensitive",
        ]);
        let e = Pkcs11Key::open(&spec(h, "t-imported"), "imported").unwrap_err();
        assert_eq!(e.reason(), "bad_key", "{e}");
        assert!(e.to_string().contains("CKA_NEVER_EXTRACTABLE"), "{e}");
    }

    /// Generators racing on one label end with one key, which all of them
    /// open.
    #[test]
    fn concurrent_generation_under_one_label_keeps_one_key() {
        let Some(h) = hsm() else { return };
        let s = spec(h, "t-race");
        // Collected first: all four run at once.
        #[allow(clippy::needless_collect)]
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    Pkcs11Key::open_or_generate(&s, "shared", KeyType::EcdsaP256)
                        .map(|(k, _)| k.spki_der().to_vec())
                })
            })
            .collect();
        let spkis: Vec<_> = workers
            .into_iter()
            .map(|w| w.join().unwrap().unwrap())
            .collect();
        assert!(spkis.windows(2).all(|w| w[0] == w[1]));
        let key = Pkcs11Key::open(&s, "shared").unwrap();
        assert_eq!(key.spki_der(), spkis[0].as_slice());
    }
}
