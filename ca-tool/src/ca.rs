//! A CA directory: its layout, its state, and loading the issuing chain.
//!
//! ```text
//! DIR/                      0700
//!   ca.json                 trust domain, key type, bundle sequence, rotation stage
//!   root.crt   root.key     the root that issuance currently chains to
//!   intermediate.crt/.key   the issuing intermediate
//!   bundle.pem              every trusted root (more than one during a root move)
//!   bundle.spiffe.json      the same as a SPIFFE trust bundle
//!   ledger.jsonl            one line per issued certificate
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
use keyproof_identity::spiffe::{SpiffeIdError, TrustDomain};
use rcgen::PublicKeyData;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bundle;
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

/// Now, truncated to whole seconds: X.509 times have no fractions, and the
/// ledger should say exactly what the certificate says.
pub(crate) fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}

/// A serial number as lowercase hex without leading zero bytes, as
/// `openssl x509 -serial` prints it.
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    hex::encode(&bytes[start..])
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
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

/// Names a CA certificate by its key, so two generations of a root or an
/// intermediate never share a subject (path building and operators alike
/// tell them apart).
fn ca_dn(td: &TrustDomain, what: &str, key: &KeyPair) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "keyproof");
    let kid = hex::encode(&keys::sha256(key.public_key_raw())[..6]);
    dn.push(DnType::CommonName, format!("{} {what} {kid}", td.as_str()));
    dn
}

/// Parameters for a CA certificate of the trust domain.
fn ca_params(
    td: &TrustDomain,
    what: &str,
    key: &KeyPair,
    path_len: u8,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = ca_dn(td, what, key);
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
    pub key: KeyPair,
}

/// Generates a self-signed root (path length 1).
pub(crate) fn new_root(td: &TrustDomain, kt: KeyType, ttl: Duration) -> Result<NewCa, CaError> {
    let now = now();
    let not_after = Lifetime::Root.end(now, ttl)?;
    let start = now - BACKDATE;
    let key = kt.generate()?;
    let params = ca_params(td, "root", &key, 1, start, not_after)?;
    let cert = params.self_signed(&key)?;
    Ok(NewCa {
        cert: cert.der().clone(),
        key,
    })
}

/// Generates an intermediate (path length 0) under `root`, never outliving it.
pub(crate) fn new_intermediate(
    td: &TrustDomain,
    kt: KeyType,
    ttl: Duration,
    root: &NewCa,
) -> Result<NewCa, CaError> {
    let now = now();
    let root_not_after = not_after_of(&root.cert)?;
    let not_after = Lifetime::Intermediate.end(now, ttl)?.min(root_not_after);
    // Capped by a root about to expire, it would be born (nearly) expired.
    if not_after - now < Lifetime::Intermediate.min() {
        return Err(LifetimeError::RootExpiresTooSoon {
            root_not_after: rfc3339(root_not_after),
            min: duration::format(Lifetime::Intermediate.min()),
        }
        .into());
    }
    let start = now - BACKDATE;
    let key = kt.generate()?;
    let params = ca_params(td, "intermediate", &key, 0, start, not_after)?;
    let issuer = Issuer::from_ca_cert_der(&root.cert, &root.key)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(NewCa {
        cert: cert.der().clone(),
        key,
    })
}

pub(crate) fn not_after_of(der: &[u8]) -> Result<OffsetDateTime, CaError> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Corrupt {
        path: PathBuf::from("<certificate>"),
        msg: e.to_string(),
    })?;
    Ok(c.validity().not_after.to_datetime())
}

/// Writes a key (0600) and its certificate into `dir` under `stem`.
pub(crate) fn write_pair(dir: &Path, stem: &str, ca: &NewCa) -> Result<(), CaError> {
    let key_path = dir.join(format!("{stem}.key"));
    fsutil::write_atomic(&key_path, ca.key.serialize_pem().as_bytes(), SECRET)
        .map_err(io_err(&key_path))?;
    let crt_path = dir.join(format!("{stem}.crt"));
    fsutil::write_atomic(&crt_path, keys::cert_pem(&ca.cert).as_bytes(), PUBLIC)
        .map_err(io_err(&crt_path))?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    fs::read(path).map_err(io_err(path))
}

/// An opened CA directory, ready to issue.
pub struct Ca {
    dir: PathBuf,
    state: CaState,
    trust_domain: TrustDomain,
    root: CertificateDer<'static>,
    intermediate: CertificateDer<'static>,
    pub(crate) intermediate_not_before: OffsetDateTime,
    pub(crate) intermediate_not_after: OffsetDateTime,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    /// Hex SKI of the intermediate (the ledger's issuer key id).
    pub(crate) issuer_key_id: String,
    /// SHA-256 of the root DER, to know which root a ledger entry chains to.
    pub(crate) root_sha256: String,
    bundle: Vec<CertificateDer<'static>>,
}

impl Ca {
    /// Creates a new trust domain in `dir`, which must not exist or be an
    /// empty directory (a mounted volume, say). Anything else is refused
    /// untouched: an existing CA is never overwritten.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<Ca, CaError> {
        check_ca_lifetimes(opts.root_ttl, opts.intermediate_ttl)?;
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
        // Build everything in memory first, then write into a staging
        // directory moved into place, so a failure leaves nothing behind.
        let root = new_root(&opts.trust_domain, opts.key_type, opts.root_ttl)?;
        let int = new_intermediate(
            &opts.trust_domain,
            opts.key_type,
            opts.intermediate_ttl,
            &root,
        )?;
        let state = CaState {
            version: 1,
            trust_domain: opts.trust_domain.to_string(),
            key_type: opts.key_type,
            spiffe_sequence: 1,
            refresh_hint_secs: 300,
            rotation: RotationStage::Idle,
        };
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
        write_pair(sdir, "root", &root)?;
        write_pair(sdir, "intermediate", &int)?;
        write_state(sdir, &state)?;
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
        Ca::open(dir)
    }

    /// Opens an existing CA directory.
    pub fn open(dir: &Path) -> Result<Ca, CaError> {
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
        let state: CaState =
            serde_json::from_slice(&read(&state_path)?).map_err(|e| CaError::Corrupt {
                path: state_path.clone(),
                msg: e.to_string(),
            })?;
        let trust_domain = TrustDomain::parse(&state.trust_domain)?;
        let root = first_cert(&dir.join(files::ROOT_CRT))?;
        let int_path = dir.join(files::INT_CRT);
        let intermediate = first_cert(&int_path)?;
        let int_key_path = dir.join(files::INT_KEY);
        let int_key_pem =
            String::from_utf8(read(&int_key_path)?).map_err(|_| CaError::Corrupt {
                path: int_key_path.clone(),
                msg: "not UTF-8 PEM".into(),
            })?;
        let int_key = keys::key_pair_from_pem(&int_key_pem).map_err(|e| CaError::Corrupt {
            path: int_key_path.clone(),
            msg: e.to_string(),
        })?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&intermediate).map_err(|e| CaError::Corrupt {
                path: int_path.clone(),
                msg: e.to_string(),
            })?;
        if parsed.public_key().raw != int_key.subject_public_key_info().as_slice() {
            return Err(CaError::Corrupt {
                path: int_key_path,
                msg: "key does not match intermediate.crt".into(),
            });
        }
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
        let issuer = Issuer::from_ca_cert_der(&intermediate, int_key)?;
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
            issuer,
            issuer_key_id,
            bundle,
        })
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
    let mut json = serde_json::to_vec_pretty(state).map_err(|e| CaError::Corrupt {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    json.push(b'\n');
    fsutil::write_atomic(&path, &json, PUBLIC).map_err(io_err(&path))
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
                crate::rotate::intermediate(&dir, ttl),
                Err(CaError::Lifetime(_))
            ));
            assert!(matches!(
                crate::rotate::prepare(&dir, ttl, day),
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
