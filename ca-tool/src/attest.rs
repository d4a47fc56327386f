//! Kubernetes ServiceAccount attestation: a projected ServiceAccount token
//! (a JWT the API server signs) as the caller's proof for bootstrap.
//!
//! # What is verified, and why
//!
//! The CA verifies the token offline against the cluster's signing keys (the
//! JWKS the API server publishes at `/openid/v1/jwks`, kept in a file that
//! is re-read when it changes), in this order:
//!
//! 1. **Structure**: a JWS compact serialization of at most 16 KiB, whose
//!    header and payload are base64url JSON objects, with `alg` one of
//!    RS256, ES256, ES384 (what the API server signs with). `none`, HMAC
//!    (`HS*`, the classic "public key as HMAC secret" confusion), PS/RS384
//!    and anything else are refused here, before any key is looked at.
//! 2. **Signature**: against the JWK named by `kid` (any compatible key
//!    when there is no `kid`). The key must fit the algorithm (RS256 an RSA
//!    key, ES256 a P-256 key, ES384 a P-384 key, and the JWK's own `alg` if
//!    it has one): a token naming a key that cannot have made its signature
//!    is a signature failure, not a structural one. Nothing in the payload is
//!    trusted, or even reported on, before this step passes, so a caller
//!    without a cluster key learns nothing about the claim checks.
//! 3. **Issuer**: `iss` equals the configured issuer.
//! 4. **Audience**: `aud` (a string or an array) contains the configured
//!    audience, so a token minted for another service (the API server
//!    itself, a vault) cannot be replayed here.
//! 5. **Time**: `exp` is required and `now < exp + leeway`. A token whose
//!    `nbf` or `iat` is more than the leeway in the future is refused as
//!    malformed (`not yet valid`), not as expired: a fresh token would not
//!    help the caller, the clocks (or the token) are wrong.
//! 6. **Kubernetes claims**: the token is bound to a pod (`kubernetes.io.pod`
//!    with a name and uid; tokens bound to a Secret or to nothing, the
//!    long-lived legacy kind, are refused), `sub` is
//!    `system:serviceaccount:<namespace>:<name>` and agrees with
//!    `kubernetes.io.namespace` and `kubernetes.io.serviceaccount.name`, the
//!    namespace is a DNS-1123 label and the names are DNS-1123 subdomains
//!    (which keeps the SPIFFE path `/ns/<namespace>/sa/<name>` valid), and
//!    the uids are present.
//!
//! A token stays reusable within its lifetime (a restarted pod bootstraps
//! again with the token the kubelet keeps refreshing), so the replay window
//! is the token's lifetime: the projected volume should ask for a short one.
//! What bounds a replayed token's use is the rest of the bootstrap: it
//! travels only inside TLS to the CA, and the certificate goes to the key
//! that signed the CSR (proof of possession), so a stolen token gets the
//! thief a certificate for the ServiceAccount, not the victim's key; the
//! audience keeps tokens meant for other services out.
//!
//! # Not built: TokenReview
//!
//! The alternative is to send each token to the API server's TokenReview
//! API. It would add what offline verification cannot see: that the bound
//! pod (and its ServiceAccount) still exist, so a token of a deleted pod
//! stops working before it expires, and no JWKS file to keep in sync. It
//! costs a round trip to the API server per bootstrap, RBAC for
//! `tokenreviews/create`, and makes the CA depend on the API server being
//! up. The offline mode here needs none of that.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use keyproof_identity::spiffe::{SpiffeId, TrustDomain};
use serde_json::{Map, Value};

/// Longest token accepted. Real ones are about 1 KiB; the bound keeps a
/// caller from making the CA decode and hash megabytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Largest JWKS file read; a cluster publishes a handful of keys.
const MAX_JWKS_LEN: u64 = 1024 * 1024;

/// How often the verify path looks at the JWKS file, and how often a token
/// with an unknown `kid` may make it re-read the file.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// What `serve --k8s-jwks/--k8s-issuer/--k8s-audience` configure.
#[derive(Debug, Clone)]
pub struct SaConfig {
    /// The cluster's JWKS (`/openid/v1/jwks`), re-read when it changes.
    pub jwks: PathBuf,
    /// The expected `iss` (the API server's `--service-account-issuer`).
    pub issuer: String,
    /// The expected `aud` entry (default `keyproof-ca`).
    pub audience: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// The longest lifetime (`exp` - `iat`) a token may have, `None` for
    /// no bound. TokenReview is not asked whether the token's pod still
    /// exists, so a token stays usable for its whole life; this keeps a
    /// long-lived one (`kubectl create token --duration 8760h`), leaked,
    /// from being a bootstrap credential for that long.
    pub max_lifetime: Option<Duration>,
}

/// Startup failure (the JWKS cannot be read or holds no usable key, or the
/// issuer or audience cannot be right).
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The JWKS file is unreadable, not a JWKS, or has no usable key.
    #[error("--k8s-jwks {path}: {msg}")]
    Jwks { path: PathBuf, msg: String },
    /// The issuer is empty or not an https URL.
    #[error("--k8s-issuer: {0}")]
    Issuer(String),
    /// The audience is empty.
    #[error("--k8s-audience: {0}")]
    Audience(String),
}

/// Why a token was refused. [`SaTokenError::code`] is the stable API code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaTokenError {
    /// `exp` (plus the leeway) has passed.
    #[error("service account token expired")]
    Expired,
    /// `aud` is missing or lacks the configured audience.
    #[error("service account token is for another audience")]
    Audience,
    /// `iss` is missing or is not the configured issuer.
    #[error("service account token is from another issuer")]
    Issuer,
    /// No key of the JWKS fits the token, or the signature does not verify.
    #[error("service account token signature does not verify against the cluster's keys")]
    Signature,
    /// Not a JWS, a refused algorithm, or claims missing or invalid (the
    /// message says which); also a token not yet valid (`nbf`/`iat` in the
    /// future beyond the leeway).
    #[error("service account token is malformed: {0}")]
    Malformed(String),
}

impl SaTokenError {
    /// Stable error code for API responses, logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            SaTokenError::Expired => "sa_token_expired",
            SaTokenError::Audience => "sa_token_audience",
            SaTokenError::Issuer => "sa_token_issuer",
            SaTokenError::Signature => "sa_token_signature",
            SaTokenError::Malformed(_) => "sa_token_malformed",
        }
    }

    /// Every code, for metrics that start at zero.
    pub const CODES: [&'static str; 5] = [
        "sa_token_expired",
        "sa_token_audience",
        "sa_token_issuer",
        "sa_token_signature",
        "sa_token_malformed",
    ];
}

fn malformed(msg: impl Into<String>) -> SaTokenError {
    SaTokenError::Malformed(msg.into())
}

/// The verified `kubernetes.io` claims of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaClaims {
    /// `kubernetes.io.namespace`.
    pub namespace: String,
    /// `kubernetes.io.serviceaccount.name`.
    pub service_account: String,
    /// `kubernetes.io.serviceaccount.uid`.
    pub service_account_uid: String,
    /// `kubernetes.io.pod.name`.
    pub pod_name: String,
    /// `kubernetes.io.pod.uid`.
    pub pod_uid: String,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
}

impl SaClaims {
    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, td: &TrustDomain) -> Result<SpiffeId, String> {
        SpiffeId::parse(&format!(
            "spiffe://{}/ns/{}/sa/{}",
            td.as_str(),
            self.namespace,
            self.service_account
        ))
        .map_err(|e| e.to_string())
    }

    /// The token's `sub`, `system:serviceaccount:<namespace>:<name>`: how
    /// logs name the caller (never the token itself).
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// The JWKS state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JwksStatus {
    /// Usable keys in the JWKS in use.
    pub keys: usize,
    /// Successful re-reads since start (the first read not counted).
    pub reloads_ok: u64,
    /// Re-reads that failed (the previous keys stay in use).
    pub reloads_failed: u64,
}

/// The key types the API server signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (KeyKind::Rsa, Algorithm::RS256)
                | (KeyKind::P256, Algorithm::ES256)
                | (KeyKind::P384, Algorithm::ES384)
        )
    }
}

/// One usable key of the JWKS.
#[derive(Debug)]
struct VerifyingKey {
    kid: Option<String>,
    kind: KeyKind,
    /// The JWK's `alg`, when it names one: then only that algorithm.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl VerifyingKey {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// The usable keys of one version of the JWKS file.
#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<VerifyingKey>,
}

impl KeySet {
    fn kids(&self) -> Vec<&str> {
        self.keys
            .iter()
            .map(|k| k.kid.as_deref().unwrap_or("(no kid)"))
            .collect()
    }
}

/// What identifies a version of the JWKS file without reading it. A sync
/// job replaces the file by renaming (new inode); an editor or `cp` rewrites
/// it in place (new mtime and usually length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        }
    }
}

/// The reload bookkeeping, touched only by the thread that checks the file.
#[derive(Debug, Default)]
struct ReloadState {
    /// Last look at the file's stamp on the verify path.
    last_check: Option<Instant>,
    /// Last re-read caused by an unknown `kid`.
    last_forced: Option<Instant>,
    /// The stamp of the file last looked at; `None` when it could not be
    /// stat'ed (so a missing file is reported once, not every second).
    stamp: Option<FileStamp>,
    /// SHA-256 of the content of the keys in use, so that a re-read of
    /// unchanged content is not counted as a reload.
    digest: [u8; 32],
    /// The broken version last reported, so that each is counted and
    /// logged once, not at every check.
    failed: Option<Broken>,
}

/// A version of the JWKS file that could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    Unreadable,
    Content([u8; 32]),
}

/// Verifies ServiceAccount tokens against the cluster's JWKS.
///
/// Readers take the key set without a lock (`ArcSwap`); the file check is
/// done by one verifying thread at a time, the others go on with the keys
/// in use.
#[derive(Debug)]
pub struct SaAttestor {
    cfg: SaConfig,
    keys: ArcSwap<KeySet>,
    reload: Mutex<ReloadState>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// [`RELOAD_INTERVAL`]; tests shorten it rather than sleep.
    interval: Duration,
}

impl SaAttestor {
    /// Reads the JWKS; fails when it is unreadable or holds no usable key,
    /// when the issuer is not an https URL or the audience is empty.
    pub fn new(cfg: SaConfig) -> Result<SaAttestor, AttestError> {
        check_issuer(&cfg.issuer).map_err(AttestError::Issuer)?;
        if cfg.audience.trim().is_empty() {
            return Err(AttestError::Audience("must not be empty".into()));
        }
        let jwks_err = |msg: String| AttestError::Jwks {
            path: cfg.jwks.clone(),
            msg,
        };
        let (stamp, bytes) = read_jwks(&cfg.jwks).map_err(jwks_err)?;
        let set = parse_jwks(&bytes).map_err(jwks_err)?;
        tracing::info!(
            path = %cfg.jwks.display(),
            keys = set.keys.len(),
            kids = ?set.kids(),
            "service account JWKS loaded"
        );
        let state = ReloadState {
            last_check: Some(Instant::now()),
            last_forced: None,
            stamp: Some(stamp),
            digest: sha256(&bytes),
            failed: None,
        };
        Ok(SaAttestor {
            cfg,
            keys: ArcSwap::from_pointee(set),
            reload: Mutex::new(state),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            interval: RELOAD_INTERVAL,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SaConfig {
        &self.cfg
    }

    /// Verifies `token` at `now` (seconds since the epoch). Re-reads the
    /// JWKS first when its file changed (checked at most once a second, and
    /// at once for a `kid` it does not know).
    ///
    /// The checks, in order, each with its error: structure and algorithm
    /// ([`SaTokenError::Malformed`]), signature ([`SaTokenError::Signature`]),
    /// `iss` ([`SaTokenError::Issuer`]), `aud` ([`SaTokenError::Audience`]),
    /// `exp` ([`SaTokenError::Expired`]; `nbf`/`iat` in the future beyond
    /// the leeway is `Malformed("not yet valid ...")`), then the
    /// `kubernetes.io` claims (`Malformed`). See the module documentation.
    pub fn verify(&self, token: &str, now: i64) -> Result<SaClaims, SaTokenError> {
        self.check_file(false);
        let jws = Jws::parse(token)?;
        self.check_signature(&jws)?;
        check_claims(&jws.claims, &self.cfg, now)
    }

    /// The JWKS state.
    pub fn status(&self) -> JwksStatus {
        JwksStatus {
            keys: self.keys.load().keys.len(),
            reloads_ok: self.reloads_ok.load(Ordering::Relaxed),
            reloads_failed: self.reloads_failed.load(Ordering::Relaxed),
        }
    }

    fn check_signature(&self, jws: &Jws<'_>) -> Result<(), SaTokenError> {
        let mut keys = self.keys.load_full();
        if let Some(kid) = &jws.kid {
            if !keys.keys.iter().any(|k| k.kid.as_ref() == Some(kid)) {
                // The cluster may have rotated its key before the sync job
                // (or this CA's periodic check) caught up.
                self.check_file(true);
                keys = self.keys.load_full();
            }
        }
        let mut candidates = keys
            .keys
            .iter()
            .filter(|k| jws.kid.is_none() || k.kid == jws.kid)
            .peekable();
        if candidates.peek().is_none() {
            tracing::debug!(kid = ?jws.kid, "no JWKS key with the token's kid");
            return Err(SaTokenError::Signature);
        }
        let mut fitting = candidates.filter(|k| k.accepts(jws.alg)).peekable();
        if fitting.peek().is_none() {
            tracing::debug!(kid = ?jws.kid, alg = ?jws.alg, "no JWKS key of the token's kid fits its alg");
            return Err(SaTokenError::Signature);
        }
        let verified = fitting.any(|k| {
            jsonwebtoken::crypto::verify(jws.signature, jws.message.as_bytes(), &k.key, jws.alg)
                .unwrap_or(false)
        });
        if verified {
            Ok(())
        } else {
            Err(SaTokenError::Signature)
        }
    }

    /// Looks at the JWKS file and swaps in its keys if its content changed.
    /// `unknown_kid`: a token named a key not in use; look now (at most once
    /// per interval for this reason) and re-read even if the file's stamp
    /// looks the same, since a coarse mtime can hide a rewrite.
    fn check_file(&self, unknown_kid: bool) {
        let now = Instant::now();
        let mut state = if unknown_kid {
            // Wait for a check in progress: it may be loading that key.
            lock(&self.reload)
        } else {
            match self.reload.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                // Another request is checking; go on with the keys in use.
                Err(std::sync::TryLockError::WouldBlock) => return,
            }
        };
        let due =
            |last: Option<Instant>| last.is_none_or(|t| now.duration_since(t) >= self.interval);
        if unknown_kid {
            if !due(state.last_forced) {
                return;
            }
            state.last_forced = Some(now);
        } else if !due(state.last_check) {
            return;
        }
        state.last_check = Some(now);

        let path = &self.cfg.jwks;
        let stamp = fs::metadata(path).ok().map(|m| FileStamp::of(&m));
        if stamp == state.stamp && !unknown_kid {
            return;
        }
        state.stamp = stamp;
        let outcome = match read_jwks(path) {
            Err(msg) => Err((Broken::Unreadable, msg)),
            Ok((stamp, bytes)) => {
                // The stamp of what was read, which may be newer than the
                // one looked at: the next check compares with this.
                state.stamp = Some(stamp);
                let digest = sha256(&bytes);
                if digest == state.digest {
                    Ok(None)
                } else {
                    parse_jwks(&bytes)
                        .map(|set| Some((digest, set)))
                        .map_err(|msg| (Broken::Content(digest), msg))
                }
            }
        };
        match outcome {
            Ok(None) => state.failed = None,
            Ok(Some((digest, set))) => {
                state.digest = digest;
                state.failed = None;
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    path = %path.display(),
                    keys = set.keys.len(),
                    kids = ?set.kids(),
                    "service account JWKS reloaded"
                );
                self.keys.store(Arc::new(set));
            }
            Err((broken, _)) if state.failed == Some(broken) => {}
            Err((broken, msg)) => {
                state.failed = Some(broken);
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    path = %path.display(),
                    error = %msg,
                    keys_in_use = self.keys.load().keys.len(),
                    "service account JWKS reload failed; keeping the keys in use"
                );
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent at every step, so a panic elsewhere while
    // holding it leaves nothing half-done.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Kubernetes requires an https issuer for OIDC discovery, and the issuer is
/// compared byte for byte: catch a missing scheme or stray text at startup.
fn check_issuer(issuer: &str) -> Result<(), String> {
    if issuer.is_empty() {
        return Err("must not be empty".into());
    }
    let Some(rest) = issuer.strip_prefix("https://") else {
        return Err(format!(
            "{issuer:?} is not an https URL (the API server's --service-account-issuer)"
        ));
    };
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(format!("{issuer:?} has no host"));
    }
    if issuer
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err(format!(
            "{issuer:?} must not hold whitespace, a query or a fragment"
        ));
    }
    Ok(())
}

/// Reads the file and the stamp of what was read (from the open handle, so
/// that a replacement between the two is seen at the next check).
fn read_jwks(path: &Path) -> Result<(FileStamp, Vec<u8>), String> {
    keyproof_identity::filemode::refuse_writable(
        path,
        "whoever can rewrite the JWKS can sign ServiceAccount tokens for any workload",
    )
    .map_err(|e| e.to_string())?;
    let (meta, bytes) =
        crate::fsutil::read_regular(path, MAX_JWKS_LEN).map_err(|e| format!("cannot read: {e}"))?;
    Ok((FileStamp::of(&meta), bytes))
}

/// Parses a JWKS document, keeping its usable signature keys. Keys of other
/// kinds (encryption keys, Ed25519, P-521, unknown `kty`) are skipped, not
/// errors: a cluster may publish them, and they do not sign ServiceAccount
/// tokens.
fn parse_jwks(bytes: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<Value>,
    }
    let doc: Doc =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut set = KeySet::default();
    let mut skipped = Vec::new();
    for (i, v) in doc.keys.into_iter().enumerate() {
        let kid = v.get("kid").and_then(Value::as_str).map(str::to_owned);
        match usable_key(v) {
            Ok(k) => set.keys.push(k),
            Err(why) => skipped.push(format!("key {i} (kid {kid:?}): {why}")),
        }
    }
    for s in &skipped {
        tracing::debug!("JWKS: skipped {s}");
    }
    if set.keys.is_empty() {
        let mut msg = String::from("no usable signature key (RSA, EC P-256 or P-384)");
        if !skipped.is_empty() {
            msg.push_str(": ");
            msg.push_str(&skipped.join("; "));
        }
        return Err(msg);
    }
    Ok(set)
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| format!("{field} is not base64url: {e}"))
}

fn usable_key(v: Value) -> Result<VerifyingKey, String> {
    let jwk: Jwk = serde_json::from_value(v).map_err(|e| format!("not a JWK: {e}"))?;
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(other) => return Err(format!("use {other:?}, not a signature key")),
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.iter().any(|o| matches!(o, KeyOperations::Verify)) {
            return Err("key_ops lacks verify".into());
        }
    }
    let alg = match &jwk.common.key_algorithm {
        None => None,
        Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
        Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
        Some(KeyAlgorithm::ES384) => Some(Algorithm::ES384),
        Some(other) => return Err(format!("alg {other:?} is not accepted")),
    };
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let n = b64("n", &p.n)?;
            let e = b64("e", &p.e)?;
            let n = strip_leading_zeros(&n);
            let bits = match n.first() {
                Some(top) => n.len() * 8 - top.leading_zeros() as usize,
                None => 0,
            };
            if !(2048..=8192).contains(&bits) {
                return Err(format!("RSA modulus of {bits} bits (2048 to 8192)"));
            }
            if strip_leading_zeros(&e).is_empty() {
                return Err("RSA exponent is zero".into());
            }
            KeyKind::Rsa
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let (kind, len, verify_alg) = match p.curve {
                EllipticCurve::P256 => (
                    KeyKind::P256,
                    32,
                    &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
                ),
                EllipticCurve::P384 => (
                    KeyKind::P384,
                    48,
                    &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED,
                ),
                ref other => return Err(format!("curve {other:?} is not accepted")),
            };
            let x = b64("x", &p.x)?;
            let y = b64("y", &p.y)?;
            if x.len() != len || y.len() != len {
                return Err(format!("EC coordinates are not {len} bytes"));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            // Checks the point is on the curve, once, rather than failing
            // every verification with it.
            aws_lc_rs::signature::ParsedPublicKey::new(verify_alg, &point)
                .map_err(|e| format!("EC point rejected: {e}"))?;
            kind
        }
        _ => return Err("key type not accepted (RSA or EC only)".into()),
    };
    if let Some(alg) = alg {
        if !kind.fits(alg) {
            return Err(format!("alg {alg:?} does not fit a {kind:?} key"));
        }
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable: {e}"))?;
    Ok(VerifyingKey {
        kid: jwk.common.key_id,
        kind,
        alg,
        key,
    })
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

/// A token split and decoded, not yet verified.
struct Jws<'a> {
    alg: Algorithm,
    kid: Option<String>,
    /// `header.payload`, what the signature covers.
    message: &'a str,
    /// The base64url signature, as `jsonwebtoken::crypto::verify` takes it.
    signature: &'a str,
    claims: Map<String, Value>,
}

/// Shortens caller-supplied text quoted in an error message.
fn quote(s: &str) -> String {
    let mut q: String = s.chars().take(32).collect();
    if q.len() < s.len() {
        q.push_str("...");
    }
    format!("{q:?}")
}

impl<'a> Jws<'a> {
    fn parse(token: &'a str) -> Result<Jws<'a>, SaTokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed(format!("longer than {MAX_TOKEN_LEN} bytes")));
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, signature] = parts[..] else {
            return Err(malformed(format!(
                "{} dot-separated parts, a JWS has 3",
                parts.len()
            )));
        };
        let decode = |what: &str, part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| malformed(format!("{what} is not base64url")))
        };
        let object = |what: &str, bytes: Vec<u8>| match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(malformed(format!("{what} is not a JSON object"))),
        };
        let h = object("header", decode("header", header)?)?;
        let alg = match h.get("alg") {
            Some(Value::String(a)) => match a.as_str() {
                "RS256" => Algorithm::RS256,
                "ES256" => Algorithm::ES256,
                "ES384" => Algorithm::ES384,
                other => {
                    return Err(malformed(format!(
                        "alg {} is not accepted (RS256, ES256 or ES384)",
                        quote(other)
                    )))
                }
            },
            _ => return Err(malformed("header has no alg")),
        };
        let kid = match h.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(malformed("kid is not a string")),
        };
        // Critical extensions must be understood (RFC 7515 4.1.11); none are.
        if h.contains_key("crit") {
            return Err(malformed("crit header parameters are not supported"));
        }
        let claims = object("payload", decode("payload", payload)?)?;
        if signature.is_empty() {
            return Err(malformed("no signature"));
        }
        decode("signature", signature)?;
        Ok(Jws {
            alg,
            kid,
            message: &token[..header.len() + 1 + payload.len()],
            signature,
            claims,
        })
    }
}

/// A NumericDate claim, in whole seconds (fractions dropped).
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, SaTokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && f.abs() < 1e15)
                    .map(|f| f.floor() as i64)
            })
            .map(Some)
            .ok_or_else(|| malformed(format!("{name} is out of range"))),
        Some(_) => Err(malformed(format!("{name} is not a number"))),
    }
}

fn str_at<'v>(v: &'v Value, path: &str) -> Result<&'v str, SaTokenError> {
    let mut cur = v;
    for seg in path.split('/') {
        cur = cur.get(seg).ok_or_else(|| {
            malformed(format!("kubernetes.io.{} missing", path.replace('/', ".")))
        })?;
    }
    cur.as_str().ok_or_else(|| {
        malformed(format!(
            "kubernetes.io.{} is not a string",
            path.replace('/', ".")
        ))
    })
}

/// The claim checks after the signature: issuer, audience, time, then the
/// Kubernetes claims.
fn check_claims(
    claims: &Map<String, Value>,
    cfg: &SaConfig,
    now: i64,
) -> Result<SaClaims, SaTokenError> {
    match claims.get("iss") {
        Some(Value::String(iss)) if *iss == cfg.issuer => {}
        // Absent too: the legacy Secret-based tokens say
        // "kubernetes/serviceaccount", a foreign token may say nothing.
        None | Some(Value::String(_)) => return Err(SaTokenError::Issuer),
        Some(_) => return Err(malformed("iss is not a string")),
    }
    let audience_ok = match claims.get("aud") {
        None => false,
        Some(Value::String(a)) => *a == cfg.audience,
        Some(Value::Array(items)) => {
            let mut found = false;
            for a in items {
                let a = a
                    .as_str()
                    .ok_or_else(|| malformed("aud holds a non-string"))?;
                found |= a == cfg.audience;
            }
            found
        }
        Some(_) => return Err(malformed("aud is neither a string nor an array")),
    };
    if !audience_ok {
        return Err(SaTokenError::Audience);
    }

    let leeway = i64::try_from(cfg.leeway.as_secs()).unwrap_or(i64::MAX);
    let exp = numeric_date(claims, "exp")?.ok_or_else(|| malformed("exp missing"))?;
    if exp.saturating_add(leeway) <= now {
        return Err(SaTokenError::Expired);
    }
    for name in ["nbf", "iat"] {
        if let Some(t) = numeric_date(claims, name)? {
            if t.saturating_sub(leeway) > now {
                return Err(malformed(format!(
                    "not yet valid: {name} is {} s ahead of this CA's clock, beyond the {leeway} s leeway",
                    t.saturating_sub(now)
                )));
            }
        }
    }
    if let Some(max) = cfg.max_lifetime {
        let max = i64::try_from(max.as_secs()).unwrap_or(i64::MAX);
        let iat = numeric_date(claims, "iat")?
            .ok_or_else(|| malformed("iat missing: the token's lifetime cannot be bounded"))?;
        let lifetime = exp.saturating_sub(iat);
        if lifetime > max {
            return Err(malformed(format!(
                "lifetime {lifetime} s is over --k8s-max-token-lifetime ({max} s): ask for a shorter-lived token (projected volume expirationSeconds)"
            )));
        }
    }

    let sub = match claims.get("sub") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(malformed("sub is not a string")),
        None => return Err(malformed("sub missing")),
    };
    let (sub_ns, sub_sa) = sub
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| {
            malformed(format!(
                "sub {} is not system:serviceaccount:<namespace>:<name>",
                quote(sub)
            ))
        })?;
    let k8s = claims
        .get("kubernetes.io")
        .filter(|v| v.is_object())
        .ok_or_else(|| malformed("kubernetes.io claims missing"))?;
    let namespace = str_at(k8s, "namespace")?;
    let service_account = str_at(k8s, "serviceaccount/name")?;
    let service_account_uid = str_at(k8s, "serviceaccount/uid")?;
    // Only pod-bound tokens: they die with the pod (and the kubelet
    // refreshes them); a Secret-bound or unbound token can outlive it.
    if k8s.get("pod").is_none() {
        return Err(malformed(
            "not bound to a pod (kubernetes.io.pod missing): use a projected token",
        ));
    }
    let pod_name = str_at(k8s, "pod/name")?;
    let pod_uid = str_at(k8s, "pod/uid")?;
    if sub_ns != namespace || sub_sa != service_account {
        return Err(malformed(format!(
            "sub {} does not match kubernetes.io namespace {} and serviceaccount {}",
            quote(sub),
            quote(namespace),
            quote(service_account)
        )));
    }
    if !is_dns_label(namespace) {
        return Err(malformed(format!(
            "namespace {} is not a DNS-1123 label",
            quote(namespace)
        )));
    }
    for (what, name) in [("serviceaccount", service_account), ("pod", pod_name)] {
        if !is_dns_subdomain(name) {
            return Err(malformed(format!(
                "{what} name {} is not a DNS-1123 subdomain",
                quote(name)
            )));
        }
    }
    for (what, uid) in [("serviceaccount", service_account_uid), ("pod", pod_uid)] {
        if !is_uid(uid) {
            return Err(malformed(format!("{what} uid {} is not a uid", quote(uid))));
        }
    }
    Ok(SaClaims {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        service_account_uid: service_account_uid.to_owned(),
        pod_name: pod_name.to_owned(),
        pod_uid: pod_uid.to_owned(),
        expires_at: exp,
    })
}

/// `[a-z0-9-]+`, starting and ending alphanumeric.
fn is_label_shaped(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// RFC 1123 label as Kubernetes checks namespaces: at most 63 characters.
fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && is_label_shaped(s)
}

/// RFC 1123 subdomain as Kubernetes checks ServiceAccount and pod names: at
/// most 253 characters of dot-separated labels (Kubernetes bounds only the
/// total). No `.` or `..` segment can result, so the SPIFFE path stays
/// valid.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label_shaped)
}

/// Kubernetes uids are UUIDs; accept any short alphanumeric-and-dash text
/// rather than one UUID layout.
fn is_uid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Whether a bearer credential is shaped like a JWT (three base64url parts)
/// rather than a join token (`kpt_...`). The signature part may be empty:
/// an unsecured JWT (`header.payload.`) is still a ServiceAccount-token
/// attempt, and is refused as such (`sa_token_malformed`) rather than as a
/// bad join token.
pub fn looks_like_jwt(bearer: &str) -> bool {
    let mut parts = bearer.split('.');
    let b64 = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let ok = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && b64(p));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_some_and(b64) && parts.next().is_none()
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
    const AUDIENCE: &str = "keyproof-ca";
    const NOW: i64 = 1_750_000_000;

    /// A signing key of a test cluster, and the JWK it publishes.
    struct TestKey {
        alg: Algorithm,
        kid: String,
        enc: EncodingKey,
        jwk: Jwk,
    }

    impl TestKey {
        fn generate(alg: Algorithm, kid: &str) -> TestKey {
            let (sig_alg, key_alg) = match alg {
                Algorithm::RS256 => (&rcgen::PKCS_RSA_SHA256, KeyAlgorithm::RS256),
                Algorithm::ES256 => (&rcgen::PKCS_ECDSA_P256_SHA256, KeyAlgorithm::ES256),
                Algorithm::ES384 => (&rcgen::PKCS_ECDSA_P384_SHA384, KeyAlgorithm::ES384),
                other => panic!("no test key for {other:?}"),
            };
            let kp = rcgen::KeyPair::generate_for(sig_alg).expect("key pair");
            let pem = kp.serialize_pem();
            let enc = match alg {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(pem.as_bytes()),
                _ => EncodingKey::from_ec_pem(pem.as_bytes()),
            }
            .expect("encoding key");
            let mut jwk = Jwk::from_encoding_key(&enc, alg).expect("JWK");
            jwk.common.key_id = Some(kid.to_owned());
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            jwk.common.key_algorithm = Some(key_alg);
            TestKey {
                alg,
                kid: kid.to_owned(),
                enc,
                jwk,
            }
        }

        /// Signs with the header the API server writes: `alg` and `kid`.
        fn sign(&self, claims: &Value) -> String {
            let mut h = Header::new(self.alg);
            h.typ = None;
            h.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&h, claims, &self.enc).expect("sign")
        }
    }

    /// Keys are slow to make (RSA); every test shares these.
    struct Keys {
        rsa: TestKey,
        p256: TestKey,
        p384: TestKey,
        /// Not in the cluster's JWKS until a rotation publishes it.
        rsa_next: TestKey,
        /// Another cluster's key.
        foreign: TestKey,
    }

    fn keys() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| Keys {
            rsa: TestKey::generate(Algorithm::RS256, "rsa-1"),
            p256: TestKey::generate(Algorithm::ES256, "p256-1"),
            p384: TestKey::generate(Algorithm::ES384, "p384-1"),
            rsa_next: TestKey::generate(Algorithm::RS256, "rsa-2"),
            foreign: TestKey::generate(Algorithm::ES256, "foreign-1"),
        })
    }

    fn jwks_json(keys: &[&TestKey]) -> String {
        serde_json::to_string(&JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        })
        .expect("JWKS")
    }

    /// Replaces the file by rename, as a sync job does.
    fn write(path: &Path, content: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, content).expect("write");
        fs::rename(&tmp, path).expect("rename");
    }

    struct Cluster {
        dir: tempfile::TempDir,
        att: SaAttestor,
    }

    impl Cluster {
        fn jwks_path(&self) -> PathBuf {
            self.dir.path().join("jwks.json")
        }
    }

    fn config(path: &Path) -> SaConfig {
        SaConfig {
            jwks: path.to_owned(),
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            leeway: Duration::from_secs(60),
            max_lifetime: Some(Duration::from_secs(24 * 3600)),
        }
    }

    fn cluster(keys: &[&TestKey]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        write(&path, &jwks_json(keys));
        let att = SaAttestor::new(config(&path)).expect("attestor");
        Cluster { dir, att }
    }

    fn default_cluster() -> Cluster {
        let k = keys();
        cluster(&[&k.rsa, &k.p256, &k.p384])
    }

    /// The claims of a projected token, laid out as the API server writes
    /// them for a pod's projected volume (audience `keyproof-ca`).
    fn claims(ns: &str, sa: &str) -> Value {
        json!({
            "aud": [AUDIENCE],
            "exp": NOW + 600,
            "iat": NOW,
            "iss": ISSUER,
            "jti": "1f0c3a56-6c2f-4b55-9a36-0d2b8f3c9e41",
            "kubernetes.io": {
                "namespace": ns,
                "node": {"name": "node-a", "uid": "5b0e1c2d-8f3a-4e6b-9c7d-1a2b3c4d5e6f"},
                "pod": {"name": format!("{sa}-7c9d8f6b5-x2k4q"), "uid": "9e8d7c6b-5a49-4382-a716-151413121110"},
                "serviceaccount": {"name": sa, "uid": "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3"},
            },
            "nbf": NOW,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
        })
    }

    fn shop() -> Value {
        claims("shop", "checkout")
    }

    fn b64j(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
    }

    /// A token with any header and payload and a given signature part.
    fn raw(header: &Value, payload: &Value, sig: &str) -> String {
        format!("{}.{}.{sig}", b64j(header), b64j(payload))
    }

    fn is_malformed(r: Result<SaClaims, SaTokenError>, needle: &str) {
        match r {
            Err(SaTokenError::Malformed(m)) => {
                assert!(m.contains(needle), "{m:?} should mention {needle:?}")
            }
            other => panic!("expected Malformed({needle:?}), got {other:?}"),
        }
    }

    #[test]
    fn accepts_rs256_es256_es384() {
        let c = default_cluster();
        let k = keys();
        for key in [&k.rsa, &k.p256, &k.p384] {
            let got = c.att.verify(&key.sign(&shop()), NOW).expect("verifies");
            assert_eq!(
                got,
                SaClaims {
                    namespace: "shop".into(),
                    service_account: "checkout".into(),
                    service_account_uid: "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3".into(),
                    pod_name: "checkout-7c9d8f6b5-x2k4q".into(),
                    pod_uid: "9e8d7c6b-5a49-4382-a716-151413121110".into(),
                    expires_at: NOW + 600,
                }
            );
            assert_eq!(got.subject(), "system:serviceaccount:shop:checkout");
            let td = TrustDomain::parse("example.org").expect("td");
            assert_eq!(
                got.spiffe_id(&td).expect("id").as_str(),
                "spiffe://example.org/ns/shop/sa/checkout"
            );
        }
        assert_eq!(
            c.att.status(),
            JwksStatus {
                keys: 3,
                reloads_ok: 0,
                reloads_failed: 0
            }
        );
    }

    #[test]
    fn without_kid_any_fitting_key_verifies() {
        let c = default_cluster();
        let k = keys();
        let mut h = Header::new(Algorithm::ES256);
        h.typ = None;
        let t = jsonwebtoken::encode(&h, &shop(), &k.p256.enc).expect("sign");
        assert!(c.att.verify(&t, NOW).is_ok());
        // The same without kid from a key the cluster does not publish.
        let t = jsonwebtoken::encode(&h, &shop(), &k.foreign.enc).expect("sign");
        assert_eq!(c.att.verify(&t, NOW), Err(SaTokenError::Signature));
    }

    #[test]
    fn audience() {
        let c = default_cluster();
        let k = &keys().p256;
        let mut v = shop();
        v["aud"] = json!(["https://kubernetes.default.svc.cluster.local"]);
        assert_eq!(c.att.verify(&k.sign(&v), NOW), Err(SaTokenError::Audience));
        v["aud"] = json!("vault");
        assert_eq!(c.att.verify(&k.sign(&v), NOW), Err(SaTokenError::Audience));
        v.as_object_mut().expect("object").remove("aud");
        assert_eq!(c.att.verify(&k.sign(&v), NOW), Err(SaTokenError::Audience));
        v["aud"] = json!("keyproof-ca");
        assert!(c.att.verify(&k.sign(&v), NOW).is_ok());
        v["aud"] = json!(["vault", "keyproof-ca"]);
        assert!(c.att.verify(&k.sign(&v), NOW).is_ok());
        v["aud"] = json!(7);
        is_malformed(c.att.verify(&k.sign(&v), NOW), "aud");
        v["aud"] = json!(["keyproof-ca", 7]);
        is_malformed(c.att.verify(&k.sign(&v), NOW), "aud");
    }

    #[test]
    fn expiry_with_leeway() {
        let c = default_cluster();
        let k = &keys().rsa;
        let t = k.sign(&shop());
        let exp = NOW + 600;
        assert!(c.att.verify(&t, exp - 1).is_ok());
        assert!(c.att.verify(&t, exp).is_ok(), "within the leeway");
        assert!(c.att.verify(&t, exp + 59).is_ok(), "within the leeway");
        assert_eq!(c.att.verify(&t, exp + 60), Err(SaTokenError::Expired));
        assert_eq!(c.att.verify(&t, exp + 3600), Err(SaTokenError::Expired));

        let mut v = shop();
        v.as_object_mut().expect("object").remove("exp");
        is_malformed(c.att.verify(&k.sign(&v), NOW), "exp missing");
        v["exp"] = json!("tomorrow");
        is_malformed(c.att.verify(&k.sign(&v), NOW), "exp");
        v["exp"] = json!((NOW + 600) as f64 + 0.5);
        assert!(c.att.verify(&k.sign(&v), NOW).is_ok(), "fractional exp");

        // A token that lives longer than the bound (24 h here) is refused
        // however fresh (round 10, keys F3), and so is one without `iat`.
        let mut v = shop();
        v["exp"] = json!(NOW + 24 * 3600);
        assert!(c.att.verify(&k.sign(&v), NOW).is_ok(), "24 h");
        v["exp"] = json!(NOW + 24 * 3600 + 1);
        is_malformed(c.att.verify(&k.sign(&v), NOW), "--k8s-max-token-lifetime");
        v["iat"] = json!(NOW - 10 * 365 * 24 * 3600);
        v["exp"] = json!(NOW + 600);
        is_malformed(c.att.verify(&k.sign(&v), NOW), "--k8s-max-token-lifetime");
        v.as_object_mut().expect("object").remove("iat");
        is_malformed(c.att.verify(&k.sign(&v), NOW), "iat missing");
    }

    /// A token from the future is `Malformed("not yet valid ...")`, not
    /// `Expired`: fetching a fresh token would not help.
    #[test]
    fn not_yet_valid_is_malformed() {
        let c = default_cluster();
        let k = &keys().p256;
        let t = k.sign(&shop());
        assert!(c.att.verify(&t, NOW - 60).is_ok(), "within the leeway");
        is_malformed(c.att.verify(&t, NOW - 61), "not yet valid: nbf");
        let mut v = shop();
        v.as_object_mut().expect("object").remove("nbf");
        let t = k.sign(&v);
        is_malformed(c.att.verify(&t, NOW - 61), "not yet valid: iat");
        // Without `iat` the lifetime cannot be bounded (Kubernetes always
        // sets it); `nbf` is optional.
        v.as_object_mut().expect("object").remove("iat");
        is_malformed(c.att.verify(&k.sign(&v), NOW - 3600), "iat missing");
    }

    #[test]
    fn another_issuer() {
        let c = default_cluster();
        let k = &keys().rsa;
        let mut v = shop();
        v["iss"] = json!("https://oidc.eks.eu-west-1.amazonaws.com/id/ABC");
        assert_eq!(c.att.verify(&k.sign(&v), NOW), Err(SaTokenError::Issuer));
        v["iss"] = json!("kubernetes/serviceaccount");
        assert_eq!(c.att.verify(&k.sign(&v), NOW), Err(SaTokenError::Issuer));
        v.as_object_mut().expect("object").remove("iss");
        assert_eq!(c.att.verify(&k.sign(&v), NOW), Err(SaTokenError::Issuer));
        v["iss"] = json!(["https://kubernetes.default.svc.cluster.local"]);
        is_malformed(c.att.verify(&k.sign(&v), NOW), "iss");
    }

    #[test]
    fn another_issuers_key() {
        let c = default_cluster();
        let k = keys();
        // Same iss, a key the cluster never published.
        assert_eq!(
            c.att.verify(&k.foreign.sign(&shop()), NOW),
            Err(SaTokenError::Signature)
        );
        // Claiming one of the cluster's kids.
        let mut h = Header::new(Algorithm::ES256);
        h.typ = None;
        h.kid = Some(k.p256.kid.clone());
        let t = jsonwebtoken::encode(&h, &shop(), &k.foreign.enc).expect("sign");
        assert_eq!(c.att.verify(&t, NOW), Err(SaTokenError::Signature));
        // The unknown kid made it look at the file once; nothing changed.
        assert_eq!(c.att.status().reloads_ok, 0);
        assert_eq!(c.att.status().reloads_failed, 0);
    }

    /// The signature is checked before any claim: a tampered payload, even
    /// one whose claims are wrong, is a signature failure.
    #[test]
    fn tampered_token_is_a_signature_failure() {
        let c = default_cluster();
        for key in [&keys().rsa, &keys().p256] {
            let t = key.sign(&shop());
            let parts: Vec<&str> = t.split('.').collect();
            let other = claims("payments", "checkout");
            let forged = format!("{}.{}.{}", parts[0], b64j(&other), parts[2]);
            assert_eq!(c.att.verify(&forged, NOW), Err(SaTokenError::Signature));

            let mut unbound = shop();
            unbound["kubernetes.io"]
                .as_object_mut()
                .expect("object")
                .remove("pod");
            let forged = format!("{}.{}.{}", parts[0], b64j(&unbound), parts[2]);
            assert_eq!(c.att.verify(&forged, NOW), Err(SaTokenError::Signature));

            let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).expect("sig");
            sig[10] ^= 1;
            let forged = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig));
            assert_eq!(c.att.verify(&forged, NOW), Err(SaTokenError::Signature));
        }
    }

    #[test]
    fn refused_algorithms_are_malformed() {
        let c = default_cluster();
        let k = keys();
        // alg none, with and without a signature.
        let none = json!({"alg": "none", "kid": k.rsa.kid});
        is_malformed(c.att.verify(&raw(&none, &shop(), ""), NOW), "alg \"none\"");
        is_malformed(c.att.verify(&raw(&none, &shop(), "AAAA"), NOW), "alg");
        is_malformed(
            c.att
                .verify(&raw(&json!({"typ": "JWT"}), &shop(), "AAAA"), NOW),
            "no alg",
        );
        // HS256 keyed with the cluster's public key (what a verifier that
        // trusts the header's alg would accept).
        for secret in [
            jwks_json(&[&k.rsa]),
            serde_json::to_string(&k.rsa.jwk).expect("jwk"),
        ] {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some(k.rsa.kid.clone());
            let t = jsonwebtoken::encode(
                &h,
                &shop(),
                &EncodingKey::from_secret(secret.as_bytes()).expect("hmac key"),
            )
            .expect("sign");
            is_malformed(c.att.verify(&t, NOW), "alg \"HS256\"");
        }
        for alg in ["RS384", "RS512", "PS256", "ES512", "EdDSA", "rs256"] {
            let h = json!({"alg": alg, "kid": k.rsa.kid});
            is_malformed(c.att.verify(&raw(&h, &shop(), "AAAA"), NOW), "not accepted");
        }
        // Critical extensions are not understood.
        let t = k.rsa.sign(&shop());
        let parts: Vec<&str> = t.split('.').collect();
        let h = json!({"alg": "RS256", "kid": k.rsa.kid, "crit": ["exp"], "exp": 1});
        is_malformed(
            c.att
                .verify(&format!("{}.{}.{}", b64j(&h), parts[1], parts[2]), NOW),
            "crit",
        );
    }

    /// An acceptable alg naming a key of another type (RS256 with an EC
    /// key's kid) is a signature failure: the key cannot have made it.
    #[test]
    fn alg_that_does_not_fit_the_key_is_a_signature_failure() {
        let c = default_cluster();
        let k = keys();
        let mut h = Header::new(Algorithm::RS256);
        h.typ = None;
        h.kid = Some(k.p256.kid.clone());
        let t = jsonwebtoken::encode(&h, &shop(), &k.rsa.enc).expect("sign");
        assert_eq!(c.att.verify(&t, NOW), Err(SaTokenError::Signature));
        // ES256 naming the P-384 key, signed by the P-256 key.
        let mut h = Header::new(Algorithm::ES256);
        h.typ = None;
        h.kid = Some(k.p384.kid.clone());
        let t = jsonwebtoken::encode(&h, &shop(), &k.p256.enc).expect("sign");
        assert_eq!(c.att.verify(&t, NOW), Err(SaTokenError::Signature));
    }

    #[test]
    fn structure_is_checked_first() {
        let c = default_cluster();
        let k = &keys().rsa;
        let good = k.sign(&shop());
        let parts: Vec<&str> = good.split('.').collect();
        is_malformed(c.att.verify("", NOW), "1 dot-separated parts");
        is_malformed(c.att.verify("kpt_abc", NOW), "parts");
        is_malformed(
            c.att.verify(&format!("{}.{}", parts[0], parts[1]), NOW),
            "2 dot",
        );
        is_malformed(c.att.verify(&format!("{good}.x.y"), NOW), "5 dot");
        is_malformed(
            c.att
                .verify(&format!("{}!.{}.{}", parts[0], parts[1], parts[2]), NOW),
            "header is not base64url",
        );
        is_malformed(
            c.att
                .verify(&format!("{}=.{}.{}", parts[0], parts[1], parts[2]), NOW),
            "header is not base64url",
        );
        let not_json = URL_SAFE_NO_PAD.encode("{\"alg\":");
        is_malformed(
            c.att
                .verify(&format!("{not_json}.{}.{}", parts[1], parts[2]), NOW),
            "header is not a JSON object",
        );
        // An unparsable payload is malformed even though the signature
        // (which covers it) would also fail.
        let not_json = URL_SAFE_NO_PAD.encode("[1,2]");
        is_malformed(
            c.att
                .verify(&format!("{}.{not_json}.{}", parts[0], parts[2]), NOW),
            "payload is not a JSON object",
        );
        is_malformed(
            c.att.verify(&format!("{}.{}.", parts[0], parts[1]), NOW),
            "no signature",
        );
        is_malformed(
            c.att.verify(&format!("{}.{}.a+b", parts[0], parts[1]), NOW),
            "signature is not base64url",
        );
        let mut big = shop();
        big["padding"] = json!("x".repeat(MAX_TOKEN_LEN));
        is_malformed(c.att.verify(&k.sign(&big), NOW), "longer than 16384");
        let h = json!({"alg": "RS256", "kid": 5});
        is_malformed(c.att.verify(&raw(&h, &shop(), "AAAA"), NOW), "kid");
    }

    #[test]
    fn kubernetes_claims() {
        let c = default_cluster();
        let k = &keys().p256;
        let check = |v: &Value, needle: &str| is_malformed(c.att.verify(&k.sign(v), NOW), needle);

        let mut v = shop();
        v["kubernetes.io"]
            .as_object_mut()
            .expect("object")
            .remove("pod");
        check(&v, "not bound to a pod");
        // The legacy Secret binding is not a pod binding.
        v["kubernetes.io"]["secret"] = json!({"name": "checkout-token", "uid": "1234"});
        check(&v, "not bound to a pod");

        let mut v = shop();
        v["sub"] = json!("system:serviceaccount:payments:checkout");
        check(&v, "does not match");
        v["sub"] = json!("system:serviceaccount:shop:admin");
        check(&v, "does not match");
        v["sub"] = json!("system:node:node-a");
        check(&v, "is not system:serviceaccount");
        v["sub"] = json!("system:serviceaccount:shop");
        check(&v, "is not system:serviceaccount");
        v.as_object_mut().expect("object").remove("sub");
        check(&v, "sub missing");

        let mut v = shop();
        v.as_object_mut().expect("object").remove("kubernetes.io");
        check(&v, "kubernetes.io claims missing");
        let mut v = shop();
        v["kubernetes.io"]["serviceaccount"]["uid"] = json!("");
        check(&v, "serviceaccount uid");
        let mut v = shop();
        v["kubernetes.io"]["pod"]["uid"] = json!("a/b");
        check(&v, "pod uid");
        let mut v = shop();
        v["kubernetes.io"]["pod"]["name"] = json!(5);
        check(&v, "kubernetes.io.pod.name is not a string");
        let mut v = shop();
        v["kubernetes.io"]["serviceaccount"]
            .as_object_mut()
            .expect("object")
            .remove("name");
        check(&v, "kubernetes.io.serviceaccount.name missing");

        // Names that are not DNS-1123 (or would break the SPIFFE path).
        for (ns, sa, needle) in [
            ("Shop", "checkout", "namespace"),
            ("shop.eu", "checkout", "namespace"),
            ("-shop", "checkout", "namespace"),
            (&"n".repeat(64) as &str, "checkout", "namespace"),
            ("shop", "check_out", "serviceaccount name"),
            ("shop", "..", "serviceaccount name"),
            ("shop", "a..b", "serviceaccount name"),
            ("shop", "a/b", "serviceaccount name"),
            ("shop", "checkout.", "serviceaccount name"),
        ] {
            check(&claims(ns, sa), needle);
        }
        // Valid ones, at the edges.
        for (ns, sa) in [
            (&"n".repeat(63) as &str, "checkout"),
            ("shop", "checkout.v2"),
            ("0", "1-a"),
        ] {
            let got = c.att.verify(&k.sign(&claims(ns, sa)), NOW).expect("valid");
            assert_eq!(
                (got.namespace.as_str(), got.service_account.as_str()),
                (ns, sa)
            );
        }
    }

    #[test]
    fn jwks_rotation() {
        let k = keys();
        let mut c = cluster(&[&k.rsa]);
        // Time passing is simulated by clearing the last-look instants, so
        // a slow machine cannot make a rate-limited look due.
        c.att.interval = Duration::from_secs(3600);
        let path = c.jwks_path();
        let next = k.rsa_next.sign(&shop());
        assert_eq!(c.att.verify(&next, NOW), Err(SaTokenError::Signature));

        // The cluster publishes its next key: a token with that kid makes
        // the attestor look at once, without waiting for the periodic check.
        write(&path, &jwks_json(&[&k.rsa, &k.rsa_next]));
        // Within the second since the last unknown-kid look: not yet.
        assert_eq!(c.att.verify(&next, NOW), Err(SaTokenError::Signature));
        lock(&c.att.reload).last_forced = None;
        assert!(c.att.verify(&next, NOW).is_ok());
        assert_eq!(
            c.att.status(),
            JwksStatus {
                keys: 2,
                reloads_ok: 1,
                reloads_failed: 0
            }
        );
        assert!(c.att.verify(&k.rsa.sign(&shop()), NOW).is_ok());

        // The old key is retired; a known kid does not force a look, so the
        // periodic check (once a second) is what drops it.
        write(&path, &jwks_json(&[&k.rsa_next]));
        let old = k.rsa.sign(&shop());
        assert!(c.att.verify(&old, NOW).is_ok(), "rate limited");
        lock(&c.att.reload).last_check = None;
        assert_eq!(c.att.verify(&old, NOW), Err(SaTokenError::Signature));
        assert!(c.att.verify(&next, NOW).is_ok());
        assert_eq!(c.att.status().keys, 1);
        assert_eq!(c.att.status().reloads_ok, 2);

        // Rewriting the same content is not a reload.
        write(&path, &jwks_json(&[&k.rsa_next]));
        lock(&c.att.reload).last_check = None;
        assert!(c.att.verify(&next, NOW).is_ok());
        assert_eq!(c.att.status().reloads_ok, 2);
    }

    #[test]
    fn bad_jwks_keeps_the_keys_in_use() {
        let k = keys();
        let mut c = cluster(&[&k.p256]);
        c.att.interval = Duration::ZERO;
        let path = c.jwks_path();
        let t = k.p256.sign(&shop());

        write(&path, "{\"keys\": [");
        assert!(c.att.verify(&t, NOW).is_ok());
        assert_eq!(
            c.att.status(),
            JwksStatus {
                keys: 1,
                reloads_ok: 0,
                reloads_failed: 1
            }
        );
        // The same broken file is one failure, not one per check, even when
        // an unknown kid forces a re-read.
        assert!(c.att.verify(&t, NOW).is_ok());
        assert_eq!(
            c.att.verify(&k.foreign.sign(&shop()), NOW),
            Err(SaTokenError::Signature)
        );
        assert_eq!(c.att.status().reloads_failed, 1);

        // A JWKS with no usable key is a failure too.
        let enc_only =
            json!({"keys": [{"kty": "RSA", "use": "enc", "kid": "e", "n": "AQAB", "e": "AQAB"}]});
        write(&path, &enc_only.to_string());
        assert!(c.att.verify(&t, NOW).is_ok());
        assert_eq!(c.att.status().reloads_failed, 2);

        // A missing file, counted once.
        fs::remove_file(&path).expect("remove");
        assert!(c.att.verify(&t, NOW).is_ok());
        assert!(c.att.verify(&t, NOW).is_ok());
        assert_eq!(c.att.status().reloads_failed, 3);

        // The content in use again: neither a reload nor a failure; broken
        // again afterwards, a new failure.
        write(&path, &jwks_json(&[&k.p256]));
        assert!(c.att.verify(&t, NOW).is_ok());
        write(&path, "{\"keys\": [");
        assert!(c.att.verify(&t, NOW).is_ok());
        assert_eq!(
            c.att.status(),
            JwksStatus {
                keys: 1,
                reloads_ok: 0,
                reloads_failed: 4
            }
        );

        // Back: a reload.
        write(&path, &jwks_json(&[&k.p256, &k.p384]));
        assert!(c.att.verify(&t, NOW).is_ok());
        assert_eq!(
            c.att.status(),
            JwksStatus {
                keys: 2,
                reloads_ok: 1,
                reloads_failed: 4
            }
        );
    }

    #[test]
    fn startup_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        let err = |cfg: SaConfig| SaAttestor::new(cfg).expect_err("refused").to_string();

        let e = err(config(&path));
        assert!(
            e.starts_with("--k8s-jwks ") && e.contains("cannot read"),
            "{e}"
        );
        fs::write(&path, "<html>").expect("write");
        assert!(err(config(&path)).contains("not a JWKS document"));
        fs::write(&path, "{\"keys\": []}").expect("write");
        assert!(err(config(&path)).contains("no usable signature key"));

        // Keys that are not usable signature keys are skipped, not errors.
        let mut odd = serde_json::to_value(keys().p256.jwk.clone()).expect("jwk");
        let others = vec![
            json!({"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
            json!({"kty": "foo", "kid": "foo"}),
            json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
            json!({"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "empty", "n": "", "e": ""}),
            json!({"kty": "EC", "crv": "P-256", "kid": "off-curve", "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "y": URL_SAFE_NO_PAD.encode([2u8; 32])}),
            json!(42),
        ];
        fs::write(&path, json!({"keys": others}).to_string()).expect("write");
        let e = err(config(&path));
        assert!(e.contains("no usable signature key"), "{e}");
        assert!(e.contains("\"small\"") && e.contains("off-curve"), "{e}");
        let mut with_good = others.clone();
        with_good.push(odd.clone());
        // A signature key whose alg does not fit it is skipped as well.
        odd["alg"] = json!("RS256");
        odd["kid"] = json!("misfit");
        with_good.push(odd);
        fs::write(&path, json!({"keys": with_good}).to_string()).expect("write");
        let att = SaAttestor::new(config(&path)).expect("one usable key");
        assert_eq!(att.status().keys, 1);
        assert!(att.verify(&keys().p256.sign(&shop()), NOW).is_ok());
        // A JWKS others may rewrite (round 10, keys F4): whoever can would
        // sign tokens for any ServiceAccount.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("chmod");
            let e = err(config(&path));
            assert!(e.contains("writable by others"), "{e}");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        }

        for issuer in [
            "",
            "http://kubernetes.default.svc",
            "kubernetes.default.svc",
            "https://",
            "https:///x",
            "https://k8s.example?x=1",
            "https://k8s example",
        ] {
            let mut cfg = config(&path);
            cfg.issuer = issuer.into();
            assert!(err(cfg).starts_with("--k8s-issuer:"), "{issuer:?}");
        }
        let mut cfg = config(&path);
        cfg.audience = String::new();
        assert!(err(cfg).starts_with("--k8s-audience:"));
    }

    #[test]
    fn jwt_shape() {
        let t = keys().p256.sign(&shop());
        assert!(looks_like_jwt(&t));
        assert!(looks_like_jwt("a.b.c"));
        assert!(looks_like_jwt("eyJ-_.x.y"));
        // Unsecured (no signature): still routed to ServiceAccount checks.
        assert!(looks_like_jwt("a.b."));
        for s in [
            "",
            "kpt_0123456789abcdef",
            "a.b",
            "a.b.c.d",
            "a..c",
            ".b.c",
            "a.b=.c",
            "a.b+/.c",
            "a. b.c",
            "Bearer a.b.c",
        ] {
            assert!(!looks_like_jwt(s), "{s:?}");
        }
    }

    #[test]
    fn codes_are_stable() {
        let all = [
            SaTokenError::Expired,
            SaTokenError::Audience,
            SaTokenError::Issuer,
            SaTokenError::Signature,
            SaTokenError::Malformed(String::new()),
        ];
        let codes: Vec<&str> = all.iter().map(SaTokenError::code).collect();
        assert_eq!(codes, SaTokenError::CODES);
    }
}
