//! A CA directory: its layout, its state, and loading the issuing chain.
//!
//! ```text
//! DIR/                      0700
//!   ca.json                 trust domain, key type, bundle sequence, rotation stage
//!   root.crt   root.key     the root that issuance currently chains to
//!   intermediate.crt/.key   the issuing intermediate
//!                           (a `.key` only for keys kept here: a key in a
//!                           PKCS#11 token or an offline root has none, and
//!                           ca.json's `keys` says where it is; see
//!                           [`crate::cakey`])
//!   bundle.pem              every trusted root (more than one during a root move)
//!   bundle.spiffe.json      the same as a SPIFFE trust bundle
//!   ledger.jsonl            one line per issued certificate
//!   revoked.json            certificates `serve` no longer renews
//!   next/                   the prepared root and intermediate (root rotation)
//!   previous-root.crt       the outgoing root, once the new one is active
//!   archive/                retired keys and certificates
//! ```
//!
//! Keys are 0600; every write is atomic (see [`crate::fsutil`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyproof_identity::duration;
use keyproof_identity::keys::{self, KeyError, KeyType};
use keyproof_identity::pkcs11::Pkcs11Error;
use keyproof_identity::spiffe::{SpiffeIdError, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bundle;
pub use crate::cakey::is_stdout;
use crate::cakey::{self, CaKey, CaKeyError, CaKeys, KeyAccess, KeyHome, KeyLocation, NewKey};
use crate::csr::CsrError;
use crate::fsutil::{self, PUBLIC, SECRET};

/// File names inside a CA directory.
pub mod files {
    pub const STATE: &str = "ca.json";
    pub const ROOT_CRT: &str = "root.crt";
    pub const ROOT_KEY: &str = "root.key";
    pub const INT_CRT: &str = "intermediate.crt";
    pub const INT_KEY: &str = "intermediate.key";
    pub const BUNDLE_PEM: &str = crate::bundle::PEM_FILE;
    pub const BUNDLE_JSON: &str = crate::bundle::SPIFFE_FILE;
    pub const LEDGER: &str = "ledger.jsonl";
    pub const TOKENS: &str = "tokens.jsonl";
    /// Certificates `serve` no longer renews (see [`crate::revoke`]).
    pub const REVOKED: &str = "revoked.json";
    pub const NEXT: &str = "next";
    pub const PREVIOUS_ROOT: &str = "previous-root.crt";
    pub const ARCHIVE: &str = "archive";
}

/// Everything that can go wrong with a CA directory or an issuance.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to initialise {}: it already exists and is not empty (--dir must not exist, or be an empty directory)", .0.display())]
    AlreadyExists(PathBuf),
    #[error("refusing to initialise {}: it exists and is not a directory (--dir must not exist, or be an empty directory)", .0.display())]
    NotADirectory(PathBuf),
    #[error("--dir {}: not a keyproof CA directory (no {})", .0.display(), files::STATE)]
    NotACa(PathBuf),
    #[error("--dir {}: no such directory", .0.display())]
    NoSuchDirectory(PathBuf),
    /// `migrate` moved this directory's CA into a store (see
    /// [`crate::migrated`]): its files are no longer the CA's state.
    #[error(transparent)]
    Migrated(#[from] crate::migrated::MigratedDir),
    #[error("refusing to initialise {}: it is a symbolic link to {}, which does not exist (--dir must not exist, or be an empty directory)", dir.display(), target.display())]
    DanglingLink { dir: PathBuf, target: PathBuf },
    #[error("refusing to initialise {}: its parent directory {} does not exist; create it first (--dir is created, its parents are not)", dir.display(), parent.display())]
    NoParent { dir: PathBuf, parent: PathBuf },
    #[error("{0}")]
    Lifetime(#[from] LifetimeError),
    #[error("{}: {msg}", path.display())]
    Corrupt { path: PathBuf, msg: String },
    #[error("invalid SPIFFE ID: {0}")]
    SpiffeId(#[from] SpiffeIdError),
    #[error("SPIFFE ID {id} is not in this CA's trust domain {trust_domain}")]
    ForeignTrustDomain { id: String, trust_domain: String },
    #[error("SPIFFE ID {0} has no path; a workload ID needs one (e.g. /ns/default/sa/web)")]
    NotAWorkloadId(String),
    /// An ID the CA keeps for itself: whoever held it would be taken for
    /// the CA by every client (see [`crate::issue::reserved_for_the_ca`]).
    #[error("SPIFFE ID {0} is reserved for the CA server itself (workloads authenticate the CA by it); it is never issued to anyone else")]
    ReservedId(String),
    /// `revoke` could not do what it was asked.
    #[error("{0}")]
    Revocation(String),
    #[error("{0}")]
    Csr(#[from] CsrError),
    #[error("the issuing intermediate expired at {0}; run `keyproof-ca rotate intermediate`")]
    IntermediateExpired(String),
    #[error("the issuing intermediate is not valid until {0}")]
    IntermediateNotYetValid(String),
    #[error("invalid --ttl: {0}")]
    BadTtl(String),
    #[error("invalid DNS name {0:?}")]
    BadDnsName(String),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Rotation(String),
    #[error("{0}")]
    KeyStore(#[from] CaKeyError),
    /// The root key is needed and is not reachable from here.
    #[error("{0}")]
    RootKeyOffline(String),
    /// A key flag that does not fit where the key is.
    #[error("{0}")]
    KeyAccess(String),
    /// A key that is not the key of its certificate.
    #[error("the {what} ({location}) is not the key of {}", cert.display())]
    KeyMismatch {
        what: &'static str,
        location: String,
        cert: PathBuf,
    },
    /// A token key failed to sign.
    #[error("the {what} ({uri}) cannot sign: {source}")]
    SigningKey {
        what: &'static str,
        uri: String,
        #[source]
        source: keyproof_identity::pkcs11::Pkcs11Error,
    },
    /// The PostgreSQL store ([`crate::store`]).
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    /// The CA was opened without its signing key ([`Ca::open_public`]).
    #[error("the CA was opened without its signing key")]
    NoSigningKey,
    /// A step failed after generating keys in a token, which keeps them.
    #[error("{error} (keys generated in the token for this step are left there unused: {keys})")]
    LeftInToken { error: Box<CaError>, keys: String },
    /// A join token reserved here was spent meanwhile by another process
    /// serving the same CA directory.
    #[error("join token {0} was spent by another keyproof-ca serve on this CA directory")]
    TokenSpent(String),
}

/// Names the token keys a failed step generated (a token keeps every key it
/// is given; the operator may delete them).
pub(crate) fn left_in_token(error: CaError, made: &[&KeyLocation]) -> CaError {
    let keys: Vec<String> = made
        .iter()
        .filter_map(|l| match l {
            KeyLocation::Pkcs11(t) => Some(t.uri()),
            _ => None,
        })
        .collect();
    if keys.is_empty() {
        error
    } else {
        CaError::LeftInToken {
            error: Box::new(error),
            keys: keys.join(", "),
        }
    }
}

/// Turns rcgen's error for a failed remote key into the token's own error.
pub(crate) fn signing_error(e: rcgen::Error, what: &'static str, key: &CaKey) -> CaError {
    match (&e, key.pkcs11()) {
        // Any remote-key failure of a token key is the token's, even when a
        // concurrent signature cleared the error it left behind: the refusal
        // must read `signing_key_unavailable`, not a generic CA failure.
        (rcgen::Error::RemoteKeyError, Some(k)) => CaError::SigningKey {
            what,
            uri: k.uri(),
            source: key
                .last_error()
                .unwrap_or_else(|| Pkcs11Error::Unavailable {
                    token: k.spec().token_label.clone(),
                    last: "the token failed to sign".into(),
                }),
        },
        _ => CaError::Rcgen(e),
    }
}

/// Attaches a path to an I/O error.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a root rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RotationStage {
    /// One root, nothing in flight.
    #[default]
    Idle,
    /// A new root is in the bundle; issuance still uses the old chain.
    Prepared,
    /// Issuance uses the new chain; the old root is still trusted.
    Activated,
}

/// `ca.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaState {
    pub version: u32,
    pub trust_domain: String,
    pub key_type: KeyType,
    /// Increases each time the bundle changes (SPIFFE `spiffe_sequence`).
    pub spiffe_sequence: u64,
    /// Seconds; published as `spiffe_refresh_hint`.
    pub refresh_hint_secs: u64,
    #[serde(default)]
    pub rotation: RotationStage,
    /// Where each key lives; left out when every key is a file in the
    /// directory (as before keys could be anywhere else).
    #[serde(default, skip_serializing_if = "CaKeys::is_default")]
    pub keys: CaKeys,
}

impl CaState {
    /// What the bundle document publishes from the state.
    pub fn bundle_meta(&self) -> bundle::Meta {
        bundle::Meta {
            sequence: self.spiffe_sequence,
            refresh_hint_secs: self.refresh_hint_secs,
        }
    }
}

impl From<bundle::WriteError> for CaError {
    fn from(e: bundle::WriteError) -> CaError {
        CaError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// Options for `init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub trust_domain: TrustDomain,
    pub key_type: KeyType,
    pub root_ttl: Duration,
    pub intermediate_ttl: Duration,
}

/// Clock skew allowance: certificates are valid from five minutes ago.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// What a lifetime is for. Every lifetime the CA is given (the command
/// line's TTL flags and the library's options alike) is checked against
/// [`Lifetime::check`]: one rule for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// An issued X.509-SVID (`issue --ttl`, `serve --ttl`).
    Svid,
    /// A join token (`token create --ttl`).
    JoinToken,
    /// An intermediate (`--intermediate-ttl`, `rotate intermediate --ttl`).
    Intermediate,
    /// A root (`--root-ttl`).
    Root,
}

/// The longest lifetime of anything: 100 years (of 365 days). Far inside
/// what X.509 (year 9999) and the date arithmetic can represent, and far
/// past anything sensible, so a typo such as `99999y` is refused instead of
/// overflowing.
pub const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Why a lifetime is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifetimeError {
    /// Below the kind's floor (for a certificate: born expired, or a CA that
    /// expires before anything it issues is renewed).
    #[error("{what} lifetime {given} is too short: it must be at least {min}")]
    TooShort {
        what: &'static str,
        given: String,
        min: String,
    },
    /// Above [`MAX_LIFETIME`].
    #[error("{what} lifetime {given} is too long: it must be at most {max}")]
    TooLong {
        what: &'static str,
        given: String,
        max: String,
    },
    /// An intermediate asked to outlive its root.
    #[error(
        "the intermediate lifetime {intermediate} is longer than the root lifetime {root}: an \
         intermediate cannot outlive its root"
    )]
    IntermediateOutlivesRoot { intermediate: String, root: String },
    /// The root expires too soon to sign an intermediate of useful length.
    #[error(
        "the root expires at {root_not_after}, too soon for a new intermediate (it would be \
         valid for less than {min}); move to a new root first (`rotate root prepare`)"
    )]
    RootExpiresTooSoon { root_not_after: String, min: String },
    /// A date past what the calendar arithmetic can represent.
    #[error("{what} lifetime {given} ends past the representable dates")]
    Unrepresentable { what: &'static str, given: String },
}

impl Lifetime {
    /// The shortest lifetime allowed: a second for SVIDs and tokens (they
    /// are renewed continually), an hour for an intermediate and a day for a
    /// root (a shorter CA expires before its operator can rotate it).
    pub fn min(self) -> Duration {
        match self {
            Lifetime::Svid | Lifetime::JoinToken => Duration::from_secs(1),
            Lifetime::Intermediate => Duration::from_secs(3600),
            Lifetime::Root => Duration::from_secs(86_400),
        }
    }

    /// The longest lifetime allowed ([`MAX_LIFETIME`] for every kind).
    pub fn max(self) -> Duration {
        MAX_LIFETIME
    }

    fn what(self) -> &'static str {
        match self {
            Lifetime::Svid => "certificate",
            Lifetime::JoinToken => "token",
            Lifetime::Intermediate => "intermediate",
            Lifetime::Root => "root",
        }
    }

    /// Checks `d` against this kind's bounds.
    pub fn check(self, d: Duration) -> Result<Duration, LifetimeError> {
        if d < self.min() {
            return Err(LifetimeError::TooShort {
                what: self.what(),
                given: duration::format(d),
                min: duration::format(self.min()),
            });
        }
        if d > self.max() {
            return Err(LifetimeError::TooLong {
                what: self.what(),
                given: duration::format(d),
                max: duration::format(self.max()),
            });
        }
        Ok(d)
    }

    /// `start + d`, with `d` checked against this kind's bounds: an error,
    /// never a panic, whatever `d` is.
    pub fn end(self, start: OffsetDateTime, d: Duration) -> Result<OffsetDateTime, LifetimeError> {
        self.check(d)?;
        time::Duration::try_from(d)
            .ok()
            .and_then(|d| start.checked_add(d))
            .ok_or_else(|| LifetimeError::Unrepresentable {
                what: self.what(),
                given: duration::format(d),
            })
    }
}

/// Checks a root and intermediate lifetime pair: each within its bounds,
/// and the intermediate no longer than the root.
pub fn check_ca_lifetimes(root: Duration, intermediate: Duration) -> Result<(), LifetimeError> {
    Lifetime::Root.check(root)?;
    Lifetime::Intermediate.check(intermediate)?;
    if intermediate > root {
        return Err(LifetimeError::IntermediateOutlivesRoot {
            intermediate: duration::format(intermediate),
            root: duration::format(root),
        });
    }
    Ok(())
}

pub(crate) use crate::fsutil::{now, rfc3339};

/// A serial number as lowercase hex without leading zero bytes, as
/// `openssl x509 -serial` prints it.
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    hex::encode(&bytes[start..])
}

/// 128 bits from the system CSPRNG, as a positive DER INTEGER (a leading zero
/// byte keeps the top bit from making it negative).
pub(crate) fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 17];
    // aws-lc's RNG only fails if the OS has no entropy source; nothing can be
    // issued safely then, so treat it as fatal.
    aws_lc_rs::rand::fill(&mut bytes[1..]).expect("system random number generator failed");
    rcgen::SerialNumber::from_slice(&bytes)
}

/// Names a CA certificate by its key's kid (a hash of the public key, or
/// for a token key the random id in its label: see [`crate::cakey`]), so
/// two generations of a root or an intermediate never share a subject (path
/// building and operators alike tell them apart).
fn ca_dn(td: &TrustDomain, what: &str, kid: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "keyproof");
    dn.push(DnType::CommonName, format!("{} {what} {kid}", td.as_str()));
    dn
}

/// Parameters for a CA certificate of the trust domain.
fn ca_params(
    td: &TrustDomain,
    what: &str,
    kid: &str,
    path_len: u8,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_dn(td, what, kid);
    p.serial_number = Some(random_serial());
    p.not_before = not_before;
    p.not_after = not_after;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(td.id_string().try_into()?)];
    p.use_authority_key_identifier_extension = path_len == 0;
    Ok(p)
}

/// A freshly generated root or intermediate.
pub(crate) struct NewCa {
    pub cert: CertificateDer<'static>,
    pub key: CaKey,
    pub location: KeyLocation,
}

/// Generates a self-signed root (path length 1) with a new key at `home`.
pub(crate) fn new_root(
    td: &TrustDomain,
    kt: KeyType,
    ttl: Duration,
    home: &KeyHome,
) -> Result<NewCa, CaError> {
    let now = now();
    let not_after = Lifetime::Root.end(now, ttl)?;
    let start = now - BACKDATE;
    let NewKey { key, kid, location } = cakey::generate(home, "root", kt)?;
    let params = ca_params(td, "root", &kid, 1, start, not_after)?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| signing_error(e, "new root key", &key))?;
    Ok(NewCa {
        cert: cert.der().clone(),
        key,
        location,
    })
}

/// Generates an intermediate (path length 0) with a new key at `home`,
/// signed by `root_key` under `root_cert`, never outliving it.
pub(crate) fn new_intermediate(
    td: &TrustDomain,
    kt: KeyType,
    ttl: Duration,
    root_cert: &CertificateDer<'static>,
    root_key: &CaKey,
    home: &KeyHome,
) -> Result<NewCa, CaError> {
    let now = now();
    let root_not_after = not_after_of(root_cert)?;
    let not_after = Lifetime::Intermediate.end(now, ttl)?.min(root_not_after);
    // Capped by a root about to expire, it would be born (nearly) expired.
    if not_after - now < Lifetime::Intermediate.min() {
        return Err(LifetimeError::RootExpiresTooSoon {
            root_not_after: rfc3339(root_not_after),
            min: duration::format(Lifetime::Intermediate.min()),
        }
        .into());
    }
    // The root must be able to sign before a key is made for nothing in a
    // token (which keeps every key it is given).
    if let Some(k) = root_key.pkcs11() {
        k.probe().map_err(|source| CaError::SigningKey {
            what: "root key",
            uri: k.uri(),
            source,
        })?;
    }
    let start = now - BACKDATE;
    let NewKey { key, kid, location } = cakey::generate(home, "intermediate", kt)?;
    let params = ca_params(td, "intermediate", &kid, 0, start, not_after)?;
    let issuer = Issuer::from_ca_cert_der(root_cert, root_key)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| signing_error(e, "root key", root_key))?;
    Ok(NewCa {
        cert: cert.der().clone(),
        key,
        location,
    })
}

pub(crate) fn not_after_of(der: &[u8]) -> Result<OffsetDateTime, CaError> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Corrupt {
        path: PathBuf::from("<certificate>"),
        msg: e.to_string(),
    })?;
    Ok(c.validity().not_after.to_datetime())
}

/// Writes a certificate into `dir` under `stem`, and its key (0600) when
/// the key is kept in the directory (a token key has no file; an offline
/// one is written by [`write_offline_key`]).
pub(crate) fn write_pair(dir: &Path, stem: &str, ca: &NewCa) -> Result<(), CaError> {
    for (name, data, mode) in pair_files(stem, ca) {
        let path = dir.join(name);
        fsutil::write_atomic(&path, &data, mode).map_err(io_err(&path))?;
    }
    Ok(())
}

/// The files of a new CA certificate and, when it is a file, its key
/// (`<stem>.key` first): name, contents and mode.
pub(crate) fn pair_files(stem: &str, ca: &NewCa) -> Vec<(String, Vec<u8>, u32)> {
    let mut out = Vec::with_capacity(2);
    if let (KeyLocation::File, CaKey::File(k)) = (&ca.location, &ca.key) {
        out.push((
            format!("{stem}.key"),
            k.serialize_pem().into_bytes(),
            SECRET,
        ));
    }
    out.push((
        format!("{stem}.crt"),
        keys::cert_pem(&ca.cert).into_bytes(),
        PUBLIC,
    ));
    out
}

/// Reads a CA file or a key file named by a flag (`--root-key`, which may
/// be `/dev/stdin`): bounded, and never a FIFO or a device.
fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    crate::fsutil::read_input(path, crate::fsutil::MAX_INPUT).map_err(io_err(path))
}

/// `path` with its directory resolved (links, `..`), for comparing places.
fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = fs::canonicalize(path) {
        return Some(p);
    }
    let name = path.file_name()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(fs::canonicalize(parent).ok()?.join(name))
}

/// Checks that an offline key file named by `--{flag}` may be created for
/// the CA in `dir` (which need not exist yet): outside the CA directory,
/// in an existing directory, and not there yet (a key is never replaced).
pub(crate) fn check_offline_key_path(dir: &Path, flag: &str, path: &Path) -> Result<(), CaError> {
    if is_stdout(path) {
        return Ok(());
    }
    let bad = |why: &str| CaError::KeyAccess(format!("--{flag} {}: {why}", path.display()));
    let inside = |ca_dir: &Path| {
        bad(&format!(
            "is inside the CA directory {}; an offline root key must live elsewhere (another \
             machine, removable media)",
            ca_dir.display()
        ))
    };
    // Spelled inside (before anything is resolved: the directory may not
    // exist yet)...
    if let (Ok(p), Ok(d)) = (std::path::absolute(path), std::path::absolute(dir)) {
        if p.starts_with(&d) {
            return Err(inside(dir));
        }
    }
    let target = resolved(path).ok_or_else(|| {
        bad("its directory does not exist (the offline key is created, its directory is not)")
    })?;
    // ...or leading inside through links and `..`.
    let ca_dir = resolved(dir).unwrap_or_else(|| dir.to_owned());
    if target.starts_with(&ca_dir) {
        return Err(inside(&ca_dir));
    }
    if fs::symlink_metadata(path).is_ok() {
        return Err(bad("already exists; keyproof-ca never replaces a key file"));
    }
    Ok(())
}

/// Writes an offline key to `path` (mode 0600), never replacing a file, or
/// as PEM to standard output for `-`.
pub(crate) fn write_offline_key(flag: &str, path: &Path, key: &CaKey) -> Result<(), CaError> {
    let CaKey::File(k) = key else {
        return Err(CaError::KeyAccess(format!(
            "--{flag}: only a key generated in memory can be written to a file"
        )));
    };
    let err = |e: std::io::Error| CaError::KeyAccess(format!("--{flag} {}: {e}", path.display()));
    if is_stdout(path) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        return out
            .write_all(k.serialize_pem().as_bytes())
            .and_then(|()| out.flush())
            .map_err(err);
    }
    fsutil::stage(path, k.serialize_pem().as_bytes(), SECRET)
        .and_then(|s| s.commit(path, false))
        .map_err(err)
}

/// A key file in the CA directory (or key directory) that others can read
/// or anyone but its owner replace signs for whoever can: refused, as
/// keyproof-ca writes its keys 0600 (a Secret mounted 0440 with an fsGroup
/// passes). An offline root key given with --root-key is not held to it:
/// removable media may show every file 0644.
fn check_key_file_mode(path: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o026 != 0 {
        return Err(CaError::Corrupt {
            path: path.to_owned(),
            msg: format!(
                "a CA private key readable by others or writable by anyone but its owner (mode {mode:o}); chmod 600"
            ),
        });
    }
    Ok(())
}

/// Reads a PEM key file named by `--{flag}` (or in the CA directory).
pub(crate) fn read_key_file(path: &Path) -> Result<CaKey, CaError> {
    let pem = String::from_utf8(read(path)?).map_err(|_| CaError::Corrupt {
        path: path.to_owned(),
        msg: "not UTF-8 PEM".into(),
    })?;
    keys::key_pair_from_pem(&pem)
        .map(CaKey::File)
        .map_err(|e| CaError::Corrupt {
            path: path.to_owned(),
            msg: e.to_string(),
        })
}

/// Checks that `key` is the key of the certificate `cert` (read from
/// `cert_path`).
pub(crate) fn check_key_matches(
    what: &'static str,
    location: String,
    key: &CaKey,
    cert: &[u8],
    cert_path: &Path,
) -> Result<(), CaError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| CaError::Corrupt {
        path: cert_path.to_owned(),
        msg: e.to_string(),
    })?;
    if parsed.public_key().raw != key.spki().as_slice() {
        return Err(CaError::KeyMismatch {
            what,
            location,
            cert: cert_path.to_owned(),
        });
    }
    Ok(())
}

/// Opens the key of `<stem>.crt` in `dir` from where `loc` says it is, and
/// checks that it is the certificate's key. `pin` overrides a token's PIN
/// file. An offline key cannot be opened here (see [`Ca::root_key`]).
pub(crate) fn open_key(
    dir: &Path,
    stem: &str,
    what: &'static str,
    loc: &KeyLocation,
    pin: Option<&Path>,
) -> Result<CaKey, CaError> {
    let key = match loc {
        KeyLocation::File => {
            let path = dir.join(format!("{stem}.key"));
            check_key_file_mode(&path)?;
            read_key_file(&path)?
        }
        KeyLocation::Pkcs11(r) => cakey::open_token_key(r, pin, what)?,
        KeyLocation::Offline(_) => {
            return Err(CaError::RootKeyOffline(format!(
                "the {what} is offline ({}): pass --root-key FILE",
                loc.describe(stem)
            )))
        }
    };
    let cert_path = dir.join(format!("{stem}.crt"));
    let cert = first_cert(&cert_path)?;
    check_key_matches(what, loc.describe(stem), &key, &cert, &cert_path)?;
    Ok(key)
}

/// Where `init` puts the root and intermediate keys.
#[derive(Debug, Clone)]
pub struct InitKeys {
    /// The intermediate key: [`KeyHome::Dir`] or [`KeyHome::Token`].
    pub intermediate: KeyHome,
    /// The root key: the directory, a token (the intermediate's or another
    /// one), or an offline file (outside the directory, created 0600).
    pub root: KeyHome,
}

impl Default for InitKeys {
    /// Both keys as files in the directory, as always.
    fn default() -> InitKeys {
        InitKeys {
            intermediate: KeyHome::Dir,
            root: KeyHome::Dir,
        }
    }
}

/// An opened CA directory, ready to issue (or, opened with
/// [`Ca::open_public`], only to be read).
pub struct Ca {
    dir: PathBuf,
    state: CaState,
    trust_domain: TrustDomain,
    root: CertificateDer<'static>,
    intermediate: CertificateDer<'static>,
    pub(crate) intermediate_not_before: OffsetDateTime,
    pub(crate) intermediate_not_after: OffsetDateTime,
    /// The intermediate and its key; `None` when opened without keys.
    issuer: Option<Issuer<'static, CaKey>>,
    /// Hex SKI of the intermediate (the ledger's issuer key id).
    pub(crate) issuer_key_id: String,
    /// SHA-256 of the root DER, to know which root a ledger entry chains to.
    pub(crate) root_sha256: String,
    bundle: Vec<CertificateDer<'static>>,
}

impl Ca {
    /// Creates a new trust domain in `dir`, which must not exist or be an
    /// empty directory (a mounted volume, say). Anything else is refused
    /// untouched: an existing CA is never overwritten. Both keys are files
    /// in `dir` ([`Ca::init_with`] puts them elsewhere).
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Ca, CaError> {
        Ca::init_with(dir, opts, &InitKeys::default())
    }

    /// [`Ca::init`] with the keys where `keys` says. Every check is made
    /// before any key is generated; an offline root key file is created
    /// before the directory is and removed again if the directory cannot
    /// be made. Keys generated in a token stay there if a later step fails
    /// (the error names them).
    pub fn init_with(dir: &Path, opts: &InitOptions, keys: &InitKeys) -> Result<Ca, CaError> {
        check_ca_lifetimes(opts.root_ttl, opts.intermediate_ttl)?;
        if let KeyHome::Offline(_) = keys.intermediate {
            return Err(CaError::KeyAccess(
                "the intermediate key cannot be offline: `serve` and `issue` sign with it".into(),
            ));
        }
        // Follows a symbolic link: a link to an empty directory is an empty
        // directory.
        let existing = match fs::metadata(dir) {
            Ok(m) if !m.is_dir() => return Err(CaError::NotADirectory(dir.to_owned())),
            Ok(_) => {
                let empty = fs::read_dir(dir).map_err(io_err(dir))?.next().is_none();
                if !empty {
                    return Err(CaError::AlreadyExists(dir.to_owned()));
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A link to nowhere: the rename below could not replace it,
                // and following it would create a directory elsewhere.
                if let Ok(target) = fs::read_link(dir) {
                    return Err(CaError::DanglingLink {
                        dir: dir.to_owned(),
                        target,
                    });
                }
                false
            }
            Err(e) => return Err(io_err(dir)(e)),
        };
        // The directory is created, never its parents: a mistyped path
        // would otherwise leave a CA (with its keys) somewhere unexpected.
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        if !existing && !parent.is_dir() {
            return Err(CaError::NoParent {
                dir: dir.to_owned(),
                parent,
            });
        }
        if let KeyHome::Offline(path) = &keys.root {
            check_offline_key_path(dir, "root-key-out", path)?;
        }
        // Build everything in memory (or in the token) first, then write
        // into a staging directory moved into place, so a failure leaves
        // nothing behind in the file system.
        let root = new_root(&opts.trust_domain, opts.key_type, opts.root_ttl, &keys.root)?;
        let int = new_intermediate(
            &opts.trust_domain,
            opts.key_type,
            opts.intermediate_ttl,
            &root.cert,
            &root.key,
            &keys.intermediate,
        )
        .map_err(|e| left_in_token(e, &[&root.location]))?;
        let state = CaState {
            version: 1,
            trust_domain: opts.trust_domain.to_string(),
            key_type: opts.key_type,
            spiffe_sequence: 1,
            refresh_hint_secs: 300,
            rotation: RotationStage::Idle,
            keys: CaKeys {
                root: root.location.clone(),
                intermediate: int.location.clone(),
                ..CaKeys::default()
            },
        };
        let made = [&root.location, &int.location];
        let offline = match &keys.root {
            KeyHome::Offline(path) => {
                write_offline_key("root-key-out", path, &root.key)
                    .map_err(|e| left_in_token(e, &made))?;
                Some(path.clone())
            }
            _ => None,
        };
        let written = Ca::write_new(dir, existing, parent, &state, &root, &int);
        if let (Err(_), Some(path)) = (&written, &offline) {
            // The key of a CA that does not exist.
            if !is_stdout(path) {
                let _ = fs::remove_file(path);
            }
        }
        written.map_err(|e| left_in_token(e, &made))?;
        Ca::open(dir)
    }

    /// Writes a new CA's files into `dir` through a staging directory.
    fn write_new(
        dir: &Path,
        existing: bool,
        parent: PathBuf,
        state: &CaState,
        root: &NewCa,
        int: &NewCa,
    ) -> Result<(), CaError> {
        // An existing directory may be a mount point, which can be neither
        // removed nor replaced: stage inside it and move the files out.
        // Otherwise stage beside it and rename the whole directory.
        let stage_in = if existing { dir.to_owned() } else { parent };
        let staging = tempfile::Builder::new()
            .prefix(".keyproof-ca-init-")
            .tempdir_in(&stage_in)
            .map_err(io_err(&stage_in))?;
        let sdir = staging.path();
        set_mode(sdir, 0o700)?;
        write_pair(sdir, "root", root)?;
        write_pair(sdir, "intermediate", int)?;
        write_state(sdir, state)?;
        bundle::write(sdir, state.bundle_meta(), std::slice::from_ref(&root.cert))?;
        let ledger = sdir.join(files::LEDGER);
        fsutil::write_atomic(&ledger, b"", 0o600).map_err(io_err(&ledger))?;
        if existing {
            set_mode(dir, 0o700)?;
            move_staged_files(sdir, dir)?;
            staging.close().map_err(io_err(dir))?;
        } else {
            let staged = staging.keep();
            fs::rename(&staged, dir).map_err(|e| {
                let _ = fs::remove_dir_all(&staged);
                CaError::Io {
                    path: dir.to_owned(),
                    source: e,
                }
            })?;
        }
        Ok(())
    }

    /// Opens an existing CA directory with its intermediate key, from where
    /// `ca.json` says it is.
    pub fn open(dir: &Path) -> Result<Ca, CaError> {
        Ca::open_with(dir, &KeyAccess::default())
    }

    /// [`Ca::open`], reaching token keys as `access` says (`--pin-file`).
    /// The root key is never opened here.
    pub fn open_with(dir: &Path, access: &KeyAccess) -> Result<Ca, CaError> {
        let mut ca = Ca::open_public(dir)?;
        let key = open_key(
            dir,
            "intermediate",
            "intermediate key",
            &ca.state.keys.intermediate,
            access.intermediate_pin(),
        )?;
        ca.issuer = Some(Issuer::from_ca_cert_der(&ca.intermediate, key)?);
        Ok(ca)
    }

    /// Opens an existing CA directory without any key: enough to read its
    /// state, certificates and bundle (`bundle`, `check`), not to sign.
    pub fn open_public(dir: &Path) -> Result<Ca, CaError> {
        if !dir.is_dir() {
            return Err(if dir.exists() {
                CaError::NotACa(dir.to_owned())
            } else {
                CaError::NoSuchDirectory(dir.to_owned())
            });
        }
        let state_path = dir.join(files::STATE);
        if !state_path.exists() {
            return Err(CaError::NotACa(dir.to_owned()));
        }
        crate::migrated::refuse(dir)?;
        let state: CaState =
            serde_json::from_slice(&read(&state_path)?).map_err(|e| CaError::Corrupt {
                path: state_path.clone(),
                msg: e.to_string(),
            })?;
        let trust_domain = TrustDomain::parse(&state.trust_domain)?;
        let root = first_cert(&dir.join(files::ROOT_CRT))?;
        let int_path = dir.join(files::INT_CRT);
        let intermediate = first_cert(&int_path)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&intermediate).map_err(|e| CaError::Corrupt {
                path: int_path.clone(),
                msg: e.to_string(),
            })?;
        let issuer_key_id = parsed
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(hex::encode(k.0))
                }
                _ => None,
            })
            .unwrap_or_default();
        let intermediate_not_before = parsed.validity().not_before.to_datetime();
        let intermediate_not_after = parsed.validity().not_after.to_datetime();
        let bundle_path = dir.join(files::BUNDLE_PEM);
        let bundle = keys::certs_from_pem(&read(&bundle_path)?).map_err(|e| CaError::Corrupt {
            path: bundle_path,
            msg: e.to_string(),
        })?;
        Ok(Ca {
            dir: dir.to_owned(),
            root_sha256: keys::fingerprint(&root),
            state,
            trust_domain,
            root,
            intermediate,
            intermediate_not_before,
            intermediate_not_after,
            issuer: None,
            issuer_key_id,
            bundle,
        })
    }

    /// The intermediate and its key, to sign with.
    pub(crate) fn issuer(&self) -> Result<&Issuer<'static, CaKey>, CaError> {
        self.issuer.as_ref().ok_or(CaError::NoSigningKey)
    }

    /// The intermediate's key, when opened with it.
    pub fn intermediate_key(&self) -> Option<&CaKey> {
        self.issuer.as_ref().map(|i| i.key())
    }

    /// Opens the root key (of `root.crt`) for `rotate intermediate`: from the
    /// directory, its token, or the offline file `access.root_key`
    /// (`--root-key`). Refuses clearly when it is not reachable.
    pub fn root_key(&self, access: &KeyAccess) -> Result<CaKey, CaError> {
        let loc = &self.state.keys.root;
        let cert_path = self.dir.join(files::ROOT_CRT);
        match (loc, &access.root_key) {
            (KeyLocation::Pkcs11(r), Some(_)) => Err(CaError::KeyAccess(format!(
                "--root-key: the root key is in a PKCS#11 token ({}), not in a file",
                r.uri()
            ))),
            (KeyLocation::Pkcs11(r), None) => {
                let pin = access.root_pin(r, &self.state.keys.intermediate);
                open_key(&self.dir, "root", "root key", loc, pin)
            }
            (KeyLocation::File | KeyLocation::Offline(_), Some(path)) => {
                let key = read_key_file(path).map_err(|e| match e {
                    CaError::Io { source, .. } => {
                        CaError::KeyAccess(format!("--root-key {}: {source}", path.display()))
                    }
                    e => e,
                })?;
                check_key_matches(
                    "root key",
                    format!("--root-key {}", path.display()),
                    &key,
                    &self.root,
                    &cert_path,
                )?;
                Ok(key)
            }
            (KeyLocation::Offline(o), None) => Err(CaError::RootKeyOffline(format!(
                "the root key is offline (it was written to {}): pass --root-key FILE",
                o.written_to.display()
            ))),
            (KeyLocation::File, None) => {
                let path = self.dir.join(files::ROOT_KEY);
                if !path.exists() {
                    return Err(CaError::RootKeyOffline(format!(
                        "the root key is not in the CA directory (no {}): pass --root-key FILE",
                        files::ROOT_KEY
                    )));
                }
                open_key(&self.dir, "root", "root key", loc, None)
            }
        }
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ca.json` as loaded.
    pub fn state(&self) -> &CaState {
        &self.state
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The key type new keys are generated with.
    pub fn key_type(&self) -> KeyType {
        self.state.key_type
    }

    /// The root issuance chains to.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The issuing intermediate.
    pub fn intermediate(&self) -> &CertificateDer<'static> {
        &self.intermediate
    }

    /// Every trusted root (the bundle).
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The bundle as PEM.
    pub fn bundle_pem(&self) -> String {
        self.bundle.iter().map(|c| keys::cert_pem(c)).collect()
    }

    /// The bundle as a SPIFFE trust bundle (JWK set).
    pub fn bundle_spiffe_json(&self) -> String {
        bundle::spiffe_json(self.state.bundle_meta(), &self.bundle)
    }
}

pub(crate) fn write_state(dir: &Path, state: &CaState) -> Result<(), CaError> {
    let path = dir.join(files::STATE);
    fsutil::write_atomic(&path, &state_json(dir, state)?, PUBLIC).map_err(io_err(&path))
}

/// `ca.json`'s contents for `state` (of the CA directory `dir`).
pub(crate) fn state_json(dir: &Path, state: &CaState) -> Result<Vec<u8>, CaError> {
    let mut json = serde_json::to_vec_pretty(state).map_err(|e| CaError::Corrupt {
        path: dir.join(files::STATE),
        msg: e.to_string(),
    })?;
    json.push(b'\n');
    Ok(json)
}

/// Moves every file of `staged` into `dir`, `ca.json` last: until it is in
/// place the directory is not a CA, so a failure half way never leaves
/// something that opens as one. On failure the files already moved are
/// removed again, leaving `dir` as empty as it was.
fn move_staged_files(staged: &Path, dir: &Path) -> Result<(), CaError> {
    let mut names: Vec<std::ffi::OsString> = fs::read_dir(staged)
        .map_err(io_err(staged))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort_by_key(|n| n == files::STATE);
    let mut moved = Vec::new();
    for name in names {
        let (src, dst) = (staged.join(&name), dir.join(&name));
        if let Err(e) = fs::rename(&src, &dst) {
            for m in &moved {
                let _ = fs::remove_file(m);
            }
            return Err(io_err(&dst)(e));
        }
        moved.push(dst);
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

pub(crate) fn first_cert(path: &Path) -> Result<CertificateDer<'static>, CaError> {
    let pem = read(path)?;
    keys::certs_from_pem(&pem)
        .map_err(|e| CaError::Corrupt {
            path: path.to_owned(),
            msg: e.to_string(),
        })
        .map(|mut v| v.swap_remove(0))
}

#[cfg(test)]
mod lifetime_tests {
    use super::*;
    use crate::csr::SubjectKey;
    use crate::issue::IssueRequest;
    use keyproof_identity::spiffe::SpiffeId;

    const YEAR: u64 = 365 * 86_400;

    fn opts(root: Duration, intermediate: Duration) -> InitOptions {
        InitOptions {
            trust_domain: TrustDomain::parse("lifetime.test").unwrap(),
            key_type: KeyType::EcdsaP256,
            root_ttl: root,
            intermediate_ttl: intermediate,
        }
    }

    #[test]
    fn every_kind_has_a_floor_and_the_same_ceiling() {
        for (kind, min) in [
            (Lifetime::Svid, 1),
            (Lifetime::JoinToken, 1),
            (Lifetime::Intermediate, 3600),
            (Lifetime::Root, 86_400),
        ] {
            let min = Duration::from_secs(min);
            assert_eq!(kind.check(min), Ok(min));
            assert!(matches!(
                kind.check(min - Duration::from_millis(1)),
                Err(LifetimeError::TooShort { .. })
            ));
            assert!(kind.check(Duration::ZERO).is_err());
            assert_eq!(kind.check(MAX_LIFETIME), Ok(MAX_LIFETIME));
            for huge in [
                MAX_LIFETIME + Duration::from_secs(1),
                Duration::from_secs(99_999 * YEAR),
                Duration::MAX,
            ] {
                assert!(matches!(
                    kind.check(huge),
                    Err(LifetimeError::TooLong { .. })
                ));
                // Never a panic, whatever the start.
                assert!(kind.end(now(), huge).is_err());
                assert!(kind
                    .end(
                        OffsetDateTime::new_utc(time::Date::MAX, time::Time::MIDNIGHT),
                        MAX_LIFETIME
                    )
                    .is_err());
            }
        }
        assert!(check_ca_lifetimes(Duration::from_secs(YEAR), Duration::from_secs(YEAR)).is_ok());
        assert!(matches!(
            check_ca_lifetimes(Duration::from_secs(86_400), Duration::from_secs(YEAR)),
            Err(LifetimeError::IntermediateOutlivesRoot { .. })
        ));
    }

    #[test]
    fn the_library_refuses_bad_lifetimes_with_errors_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86_400);
        for (root, int) in [
            (Duration::ZERO, day),
            (day, Duration::ZERO),
            (Duration::from_secs(8000 * YEAR), day),
            (day, Duration::MAX),
            (day, Duration::from_secs(2 * 86_400)),
        ] {
            let dir = tmp.path().join("ca");
            assert!(matches!(
                Ca::init(&dir, &opts(root, int)),
                Err(CaError::Lifetime(_))
            ));
            assert!(!dir.exists());
        }
        let dir = tmp.path().join("ca");
        let ca = Ca::init(&dir, &opts(Duration::from_secs(YEAR), day)).unwrap();
        let kp = KeyType::EcdsaP256.generate().unwrap();
        for ttl in [
            Duration::ZERO,
            Duration::from_secs(99_999 * YEAR),
            Duration::from_secs(9_999_999_999_999_999),
            Duration::MAX,
        ] {
            let req = IssueRequest {
                spiffe_id: SpiffeId::parse("spiffe://lifetime.test/a").unwrap(),
                key: SubjectKey::from_key_pair(&kp, KeyType::EcdsaP256),
                ttl,
                dns: Vec::new(),
            };
            assert!(
                matches!(ca.sign(&req, "test"), Err(CaError::Lifetime(_))),
                "{ttl:?}"
            );
        }
        let before = fs::read(dir.join(files::INT_CRT)).unwrap();
        for ttl in [Duration::ZERO, Duration::from_secs(99_999 * YEAR)] {
            assert!(matches!(
                crate::rotate::intermediate(&dir, ttl, &KeyAccess::default()),
                Err(CaError::Lifetime(_))
            ));
            assert!(matches!(
                crate::rotate::prepare(&dir, ttl, day, &KeyAccess::default(), None),
                Err(CaError::Lifetime(_))
            ));
        }
        assert_eq!(fs::read(dir.join(files::INT_CRT)).unwrap(), before);
        assert!(!dir.join(files::NEXT).exists());
    }

    #[test]
    fn init_creates_the_directory_but_never_its_parents_or_through_a_dangling_link() {
        let tmp = tempfile::tempdir().unwrap();
        let o = opts(Duration::from_secs(YEAR), Duration::from_secs(86_400));
        let deep = tmp.path().join("no/such/ca");
        assert!(matches!(Ca::init(&deep, &o), Err(CaError::NoParent { .. })));
        assert!(!tmp.path().join("no").exists());
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &link).unwrap();
        let err = Ca::init(&link, &o).err().unwrap();
        assert!(matches!(err, CaError::DanglingLink { .. }), "{err}");
        assert!(err.to_string().contains("--dir"), "{err}");
        assert!(!tmp.path().join("nowhere").exists());
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;
    use crate::cakey::OfflineRef;
    use crate::csr::SubjectKey;
    use crate::issue::IssueRequest;
    use crate::rotate;
    use keyproof_identity::spiffe::SpiffeId;

    const DAY: Duration = Duration::from_secs(86_400);

    fn opts() -> InitOptions {
        InitOptions {
            trust_domain: TrustDomain::parse("keys.test").unwrap(),
            key_type: KeyType::EcdsaP256,
            root_ttl: 365 * DAY,
            intermediate_ttl: 30 * DAY,
        }
    }

    fn offline(path: &Path) -> InitKeys {
        InitKeys {
            intermediate: KeyHome::Dir,
            root: KeyHome::Offline(path.to_owned()),
        }
    }

    fn access(root_key: Option<&Path>) -> KeyAccess {
        KeyAccess {
            root_key: root_key.map(Path::to_path_buf),
            ..KeyAccess::default()
        }
    }

    fn issue(ca: &Ca) {
        let kp = KeyType::EcdsaP256.generate().unwrap();
        let req = IssueRequest {
            spiffe_id: SpiffeId::parse("spiffe://keys.test/web").unwrap(),
            key: SubjectKey::from_key_pair(&kp, KeyType::EcdsaP256),
            ttl: DAY,
            dns: Vec::new(),
        };
        ca.issue(&req, "test").unwrap();
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_file_ca_writes_ca_json_as_before_and_an_old_one_still_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        Ca::init(&dir, &opts()).unwrap();
        let json = fs::read_to_string(dir.join(files::STATE)).unwrap();
        assert!(!json.contains("\"keys\""), "{json}");
        assert!(dir.join(files::ROOT_KEY).exists());
        // A ca.json from before `rotation` and `keys` existed.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_object_mut().unwrap().remove("rotation");
        fs::write(dir.join(files::STATE), v.to_string()).unwrap();
        let ca = Ca::open(&dir).unwrap();
        assert!(ca.state().keys.is_default());
        assert_eq!(ca.intermediate_key().unwrap().kind(), "file");
        issue(&ca);
        // Unknown members are still refused.
        v["keys"] = serde_json::json!({"root": {"hsm": {}}});
        fs::write(dir.join(files::STATE), v.to_string()).unwrap();
        assert!(matches!(Ca::open(&dir), Err(CaError::Corrupt { .. })));
    }

    #[test]
    fn an_offline_root_is_written_outside_the_directory_and_needed_only_to_rotate() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let root_key = tmp.path().join("root.key");
        let ca = Ca::init_with(&dir, &opts(), &offline(&root_key)).unwrap();
        assert!(!dir.join(files::ROOT_KEY).exists());
        assert!(dir.join(files::INT_KEY).exists());
        assert_eq!(mode(&root_key), 0o600);
        assert_eq!(
            ca.state().keys.root,
            KeyLocation::Offline(OfflineRef {
                written_to: root_key.clone()
            })
        );
        // Issuing never needs the root.
        issue(&ca);
        // Rotating the intermediate does, and says how to give it.
        let err = rotate::intermediate(&dir, DAY, &access(None)).unwrap_err();
        assert!(matches!(err, CaError::RootKeyOffline(_)), "{err}");
        assert!(err.to_string().contains("--root-key FILE"), "{err}");
        assert!(err.to_string().contains("root.key"), "{err}");
        // Not any key: the root's.
        let other = tmp.path().join("other.key");
        fs::write(
            &other,
            KeyType::EcdsaP256.generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let err = rotate::intermediate(&dir, DAY, &access(Some(&other))).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
        let err =
            rotate::intermediate(&dir, DAY, &access(Some(&tmp.path().join("nope")))).unwrap_err();
        assert!(err.to_string().contains("--root-key"), "{err}");
        let before = fs::read(dir.join(files::INT_CRT)).unwrap();
        rotate::intermediate(&dir, DAY, &access(Some(&root_key))).unwrap();
        assert_ne!(fs::read(dir.join(files::INT_CRT)).unwrap(), before);
        issue(&Ca::open(&dir).unwrap());
        assert!(!dir.join(files::ROOT_KEY).exists());
    }

    #[test]
    fn a_root_rotation_keeps_an_offline_root_offline() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let root_key = tmp.path().join("root.key");
        Ca::init_with(&dir, &opts(), &offline(&root_key)).unwrap();
        let err = rotate::prepare(&dir, 365 * DAY, 30 * DAY, &access(None), None).unwrap_err();
        assert!(matches!(err, CaError::RootKeyOffline(_)), "{err}");
        assert!(err.to_string().contains("--root-key-out"), "{err}");
        for inside in [dir.join("next.key"), dir.join("next/root.key")] {
            let err = rotate::prepare(&dir, 365 * DAY, 30 * DAY, &access(None), Some(&inside))
                .unwrap_err();
            assert!(err.to_string().contains("inside the CA directory"), "{err}");
        }
        let err =
            rotate::prepare(&dir, 365 * DAY, 30 * DAY, &access(None), Some(&root_key)).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert!(!dir.join(files::NEXT).exists());
        let new_key = tmp.path().join("root-2.key");
        rotate::prepare(&dir, 365 * DAY, 30 * DAY, &access(None), Some(&new_key)).unwrap();
        assert_eq!(mode(&new_key), 0o600);
        assert!(!dir.join(files::NEXT).join(files::ROOT_KEY).exists());
        rotate::activate(&dir, &access(None)).unwrap();
        rotate::finish(&dir, true).unwrap();
        let ca = Ca::open(&dir).unwrap();
        assert!(!dir.join(files::ROOT_KEY).exists());
        assert!(
            matches!(&ca.state().keys.root, KeyLocation::Offline(o) if o.written_to == new_key)
        );
        assert!(ca.state().keys.next_root.is_file());
        issue(&ca);
        // The old root key no longer signs intermediates; the new one does.
        assert!(matches!(
            rotate::intermediate(&dir, DAY, &access(Some(&root_key))),
            Err(CaError::KeyMismatch { .. })
        ));
        rotate::intermediate(&dir, DAY, &access(Some(&new_key))).unwrap();
    }

    #[test]
    fn an_activate_killed_at_any_step_is_finished_by_running_it_again() {
        // `activate` moves four files and then writes ca.json; a kill
        // between any two leaves a directory that running it again
        // completes, into the same CA as an uninterrupted run.
        let moves = [
            files::ROOT_KEY,
            files::INT_KEY,
            files::ROOT_CRT,
            files::INT_CRT,
        ];
        for done in 0..=moves.len() + 1 {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("ca");
            Ca::init(&dir, &opts()).unwrap();
            let old_root = first_cert(&dir.join(files::ROOT_CRT)).unwrap();
            rotate::prepare(&dir, 365 * DAY, 30 * DAY, &access(None), None).unwrap();
            let next = dir.join(files::NEXT);
            let new_root = first_cert(&next.join(files::ROOT_CRT)).unwrap();
            if done > 0 {
                // What the run did before its first move.
                fs::copy(dir.join(files::ROOT_CRT), dir.join(files::PREVIOUS_ROOT)).unwrap();
            }
            for f in moves.iter().take(done) {
                fs::rename(next.join(f), dir.join(f)).unwrap();
            }
            if done > moves.len() {
                fs::remove_dir(&next).unwrap();
            }
            rotate::activate(&dir, &access(None)).unwrap_or_else(|e| panic!("{done}: {e}"));
            let ca = Ca::open(&dir).unwrap_or_else(|e| panic!("{done}: {e}"));
            assert_eq!(ca.state().rotation, RotationStage::Activated, "{done}");
            assert_eq!(ca.root(), &new_root, "{done}");
            issue(&ca);
            let prev = first_cert(&dir.join(files::PREVIOUS_ROOT)).unwrap();
            assert_eq!(prev, old_root, "{done}");
            rotate::finish(&dir, true).unwrap_or_else(|e| panic!("{done}: {e}"));
            let ca = Ca::open(&dir).unwrap();
            assert_eq!(ca.bundle(), std::slice::from_ref(&new_root), "{done}");
            rotate::intermediate(&dir, DAY, &access(None)).unwrap();
        }
    }

    #[test]
    fn a_root_left_in_the_bundle_by_an_interrupted_prepare_does_not_stay() {
        // prepare writes the bundle before ca.json: killed between them, the
        // bundle holds a root the state does not know. The next prepare,
        // and finish, build the bundle from the CA's own roots.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        Ca::init(&dir, &opts()).unwrap();
        let state = fs::read(dir.join(files::STATE)).unwrap();
        rotate::prepare(&dir, 365 * DAY, 30 * DAY, &access(None), None).unwrap();
        let orphan = first_cert(&dir.join(files::NEXT).join(files::ROOT_CRT)).unwrap();
        fs::write(dir.join(files::STATE), &state).unwrap();
        assert_eq!(Ca::open(&dir).unwrap().bundle().len(), 2);
        rotate::prepare(&dir, 365 * DAY, 30 * DAY, &access(None), None).unwrap();
        let ca = Ca::open(&dir).unwrap();
        assert_eq!(ca.bundle().len(), 2);
        assert!(!ca.bundle().contains(&orphan));
        rotate::activate(&dir, &access(None)).unwrap();
        rotate::finish(&dir, true).unwrap();
        let ca = Ca::open(&dir).unwrap();
        assert_eq!(ca.bundle(), std::slice::from_ref(ca.root()));
    }

    #[test]
    fn a_root_in_the_directory_can_move_offline_at_a_root_rotation() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        Ca::init(&dir, &opts()).unwrap();
        let new_key = tmp.path().join("root-2.key");
        rotate::prepare(&dir, 365 * DAY, 30 * DAY, &access(None), Some(&new_key)).unwrap();
        rotate::activate(&dir, &access(None)).unwrap();
        // The old root's key is archived, not left looking current.
        assert!(!dir.join(files::ROOT_KEY).exists());
        let archived = fs::read_dir(dir.join(files::ARCHIVE))
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with("-root.key"));
        assert!(archived);
        let err = rotate::intermediate(&dir, DAY, &access(None)).unwrap_err();
        assert!(err.to_string().contains("--root-key FILE"), "{err}");
        rotate::intermediate(&dir, DAY, &access(Some(&new_key))).unwrap();
    }

    #[test]
    fn root_key_out_is_refused_inside_the_directory_or_over_a_file_and_nothing_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let existing = tmp.path().join("exists.key");
        fs::write(&existing, "x").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        fs::create_dir(&dir).unwrap();
        fs::create_dir(tmp.path().join("x")).unwrap();
        for (path, why) in [
            (dir.join("root.key"), "inside the CA directory"),
            (link.join("root.key"), "inside the CA directory"),
            (
                tmp.path().join("x/../ca/root.key"),
                "inside the CA directory",
            ),
            (existing.clone(), "already exists"),
            (tmp.path().join("no/such/root.key"), "does not exist"),
        ] {
            let err = Ca::init_with(&dir, &opts(), &offline(&path)).err().unwrap();
            assert!(err.to_string().contains("--root-key-out"), "{err}");
            assert!(err.to_string().contains(why), "{err}");
            assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        }
        assert_eq!(fs::read(&existing).unwrap(), b"x");
        // A directory that does not exist yet is inside all the same.
        let fresh = tmp.path().join("fresh");
        let err = Ca::init_with(&fresh, &opts(), &offline(&fresh.join("root.key")))
            .err()
            .unwrap();
        assert!(err.to_string().contains("inside the CA directory"), "{err}");
        assert!(!fresh.exists());
        // The intermediate is never offline.
        let err = Ca::init_with(
            &fresh,
            &opts(),
            &InitKeys {
                intermediate: KeyHome::Offline(tmp.path().join("i.key")),
                root: KeyHome::Dir,
            },
        )
        .err()
        .unwrap();
        assert!(matches!(err, CaError::KeyAccess(_)), "{err}");
        assert!(!fresh.exists());
    }

    #[test]
    fn a_root_key_missing_from_the_directory_is_named_and_a_token_root_refuses_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        Ca::init(&dir, &opts()).unwrap();
        let moved = tmp.path().join("moved.key");
        fs::rename(dir.join(files::ROOT_KEY), &moved).unwrap();
        let err = rotate::intermediate(&dir, DAY, &access(None)).unwrap_err();
        assert!(matches!(err, CaError::RootKeyOffline(_)), "{err}");
        rotate::intermediate(&dir, DAY, &access(Some(&moved))).unwrap();
        let report = crate::check::check_dir(&dir, None, &access(None)).unwrap();
        let text = report.render();
        assert_eq!(report.exit_code(), 0, "{text}");
        assert!(
            text.contains(
                "ok   intermediate key: file intermediate.key in the CA directory: signs"
            ),
            "{text}"
        );
        assert!(
            text.contains("ok   root key: not in the CA directory"),
            "{text}"
        );
        // A root recorded in a token takes no --root-key (and the token is
        // not even tried).
        let mut state = Ca::open(&dir).unwrap().state().clone();
        state.keys.root = KeyLocation::Pkcs11(crate::cakey::TokenKeyRef {
            module: "/nonexistent/module.so".into(),
            token_label: "t".into(),
            pin_file: "/nonexistent/pin".into(),
            label: "keyproof-root-000000000000".into(),
        });
        write_state(&dir, &state).unwrap();
        let err = rotate::intermediate(&dir, DAY, &access(Some(&moved))).unwrap_err();
        assert!(matches!(err, CaError::KeyAccess(_)), "{err}");
        assert!(err.to_string().contains("PKCS#11 token"), "{err}");
        let err = rotate::prepare(
            &dir,
            365 * DAY,
            30 * DAY,
            &access(None),
            Some(&tmp.path().join("n.key")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--root-key-out"), "{err}");
    }
}
