//! `keyproof-ca renew`: keeps a certificate and key held in files fresh
//! from `keyproof-ca serve`, for workloads that read their identity from
//! disk (`[identity.files]`, nginx, databases), as `step ca renew --daemon`
//! does.
//!
//! Each renewal authenticates with the current certificate as the TLS
//! client certificate, sends a CSR for a newly generated key of the same
//! type, and replaces the files:
//!
//! 1. the new bundle (only when the CA's bundle changed), by an atomic
//!    rename: it must trust whatever the new certificate chains to before
//!    anything presents it;
//! 2. the new key and certificate are written and synced to staging files
//!    beside them (`.NAME.keyproof-new`), the key 0600;
//! 3. the key is renamed over the old key, then the certificate over the
//!    old certificate, and the directories are synced.
//!
//! Between the two renames (microseconds) a reader opening both files may
//! see the new key with the old certificate; readers that check the pair
//! (keyproof-proxy's `[identity.files]` does) keep their previous identity
//! and retry, and a `--exec` hook only runs once both are in place. A crash
//! in that window leaves the new certificate staged: the next `renew`
//! finds the key on disk matching it and completes the replacement, since
//! the old certificate alone could no longer be used or renewed.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use keyproof_identity::keys::{self, KeyType};
use keyproof_identity::spiffe::{ca_server_id, IdPattern, SpiffeId};
use keyproof_identity::svid;
use keyproof_identity::verify::{SvidVerifier, TrustBundle};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ca;
use crate::client::{certified_key, new_key, CaClient, ClientError};
use crate::fsutil::{self, PUBLIC, SECRET};
use crate::renewer::renew_after_from_now;

/// First retry delay in daemon mode; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the daemon fetches the bundle between renewals, so a root
/// rotation reaches the bundle file long before the certificates move.
const BUNDLE_REFRESH: Duration = Duration::from_secs(300);

/// What `keyproof-ca renew` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Certificate chain PEM (leaf first), replaced on renewal.
    pub cert: PathBuf,
    /// Private key PEM, replaced on renewal.
    pub key: PathBuf,
    /// `https://host:port` of `keyproof-ca serve`: one, or several replicas
    /// tried in order with failover (starting from the last that answered).
    pub ca_url: Vec<String>,
    /// Bundle PEM authenticating the CA; rewritten when the CA's changes.
    pub bundle: PathBuf,
    /// The CA server's SPIFFE ID; `spiffe://<td>/keyproof-ca` when unset.
    pub server_id: Option<String>,
    /// Run with `sh -c` after each renewal (and bundle update).
    pub exec: Option<String>,
    /// Renew even if not yet due.
    pub force: bool,
}

/// Why a renewal could not be done.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("--{flag} {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--{flag} {}: {msg}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        msg: String,
    },
    #[error(
        "--cert {}: the certificate expired at {at}; it cannot be renewed (renewal authenticates \
         with the current certificate): issue a new one with `keyproof-ca issue`, or bootstrap the \
         workload again",
        path.display()
    )]
    Expired { path: PathBuf, at: String },
    #[error("--server-id {id:?}: {msg}")]
    ServerId { id: String, msg: String },
    #[error("--ca-url {url:?}: expected https://host:port")]
    BadUrl { url: String },
    #[error(transparent)]
    Ca(#[from] ClientError),
    #[error("the CA issued a certificate for {got}, but {want} asked for it")]
    WrongIdentity { got: String, want: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("renewed, but --exec {cmd:?} failed: {msg}")]
    Exec { cmd: String, msg: String },
}

/// The certificate and key on disk.
struct Held {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    spiffe_id: SpiffeId,
    key_type: KeyType,
    serial: String,
    not_before: i64,
    not_after: i64,
}

impl Held {
    /// When it is due: two thirds of its lifetime, notBefore to notAfter.
    fn due(&self) -> i64 {
        self.not_before + (self.not_after - self.not_before) * 2 / 3
    }
}

/// What a one-shot run did.
#[derive(Debug)]
pub enum Outcome {
    /// Renewed; the files hold the new pair.
    Renewed {
        spiffe_id: String,
        serial: String,
        not_after: i64,
    },
    /// Not yet due (and not forced).
    NotDue {
        spiffe_id: String,
        serial: String,
        due: i64,
        not_after: i64,
    },
}

fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(ca::rfc3339)
        .unwrap_or_else(|_| unix.to_string())
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Renewed {
                spiffe_id,
                serial,
                not_after,
            } => write!(
                f,
                "renewed {spiffe_id}: serial {serial} valid until {}",
                when(*not_after)
            ),
            Outcome::NotDue {
                spiffe_id,
                serial,
                due,
                not_after,
            } => write!(
                f,
                "not due: {spiffe_id} (serial {serial}) is renewed from {} (two thirds of its \
                 lifetime) and expires {}; pass --force to renew now",
                when(*due),
                when(*not_after)
            ),
        }
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, RenewError> {
    crate::fsutil::read_input(path, crate::fsutil::MAX_INPUT).map_err(|source| RenewError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

fn invalid(flag: &'static str, path: &Path, msg: impl ToString) -> RenewError {
    RenewError::Invalid {
        flag,
        path: path.to_owned(),
        msg: msg.to_string(),
    }
}

/// Parses a chain and key, checking they belong together.
fn parse_pair(
    opts: &Options,
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
) -> Result<Held, RenewError> {
    let chain = keys::certs_from_pem(cert_pem).map_err(|e| invalid("cert", cert_path, e))?;
    let key = keys::private_key_from_pem(key_pem).map_err(|e| invalid("key", &opts.key, e))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| invalid("cert", cert_path, e))?;
    let spiffe_id = svid::spiffe_id_of(&leaf)
        .map_err(|e| invalid("cert", cert_path, format!("not an X.509-SVID: {e}")))?;
    let key_type =
        KeyType::of_spki(leaf.public_key()).map_err(|e| invalid("cert", cert_path, e))?;
    certified_key(chain.clone(), &key).map_err(|_| {
        invalid(
            "key",
            &opts.key,
            format!("does not match the certificate in {}", cert_path.display()),
        )
    })?;
    Ok(Held {
        serial: ca::serial_hex(leaf.raw_serial()),
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
        spiffe_id,
        key_type,
        chain,
        key,
    })
}

fn load(opts: &Options) -> Result<Held, RenewError> {
    let cert = read("cert", &opts.cert)?;
    let key = read("key", &opts.key)?;
    parse_pair(opts, &cert, &key, &opts.cert)
}

/// Where a replacement is staged before it is renamed into place.
fn staged(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.keyproof-new"))
}

/// Finishes or discards a replacement a crash interrupted (see the module
/// documentation). Returns what it did, for the log.
fn recover(opts: &Options) -> Result<Option<String>, RenewError> {
    let (skey, scert) = (staged(&opts.key), staged(&opts.cert));
    if !scert.exists() {
        if skey.exists() {
            let _ = std::fs::remove_file(&skey);
        }
        return Ok(None);
    }
    let key = read("key", &opts.key)?;
    let staged_cert = read("cert", &scert)?;
    if parse_pair(opts, &staged_cert, &key, &scert).is_ok() {
        // The key was replaced, the certificate not yet.
        std::fs::rename(&scert, &opts.cert).map_err(|source| RenewError::Write {
            path: opts.cert.clone(),
            source,
        })?;
        let _ = fsutil::sync_parent(&opts.cert);
        let _ = std::fs::remove_file(&skey);
        return Ok(Some(format!(
            "completed an interrupted replacement: {} now holds the certificate staged in {}",
            opts.cert.display(),
            scert.display()
        )));
    }
    // Neither was renamed: the staged pair was never in use; drop it.
    let _ = std::fs::remove_file(&scert);
    let _ = std::fs::remove_file(&skey);
    Ok(Some(format!(
        "discarded an unfinished renewal staged in {}",
        scert.display()
    )))
}

fn pem_private_key(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> RenewError + '_ {
    move |source| RenewError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Logs each failover to the next CA endpoint.
struct LogFailover;

impl crate::client::EndpointObserver for LogFailover {
    fn failed_over(&self, op: &'static str, from: &str, error: &ClientError) {
        log(format!(
            "{op}: {from} failed ({error}); trying the next CA endpoint"
        ));
    }
}

/// Talks to the CA for one pair of files.
struct Renewer<'a> {
    opts: &'a Options,
    client: CaClient,
    verifier: Arc<ArcSwap<SvidVerifier>>,
    trust_domain: keyproof_identity::spiffe::TrustDomain,
    /// The bundle file's roots, as last read or written.
    bundle: Vec<CertificateDer<'static>>,
}

impl<'a> Renewer<'a> {
    fn new(opts: &'a Options, held: &Held) -> Result<Self, RenewError> {
        let trust_domain = held.spiffe_id.trust_domain();
        let pem = read("bundle", &opts.bundle)?;
        let bundle = keys::certs_from_pem(&pem).map_err(|e| invalid("bundle", &opts.bundle, e))?;
        let tb =
            TrustBundle::new(bundle.clone()).map_err(|e| invalid("bundle", &opts.bundle, e))?;
        let verifier = Arc::new(ArcSwap::from_pointee(SvidVerifier::new(
            trust_domain.clone(),
            tb,
        )));
        let id = opts
            .server_id
            .clone()
            .unwrap_or_else(|| ca_server_id(trust_domain.as_str()));
        let pattern = IdPattern::parse(&id).map_err(|e| RenewError::ServerId {
            id: id.clone(),
            msg: e.to_string(),
        })?;
        if !keyproof_identity::spiffe::names_only_ca_servers(&pattern, trust_domain.as_str()) {
            return Err(RenewError::ServerId {
                id,
                msg: format!(
                    "may match a workload's ID: whoever held one would be taken for the CA and sent this workload's CSRs; use {} or an ID or pattern below it, which the CA never issues to a workload",
                    ca_server_id(trust_domain.as_str())
                ),
            });
        }
        let client = CaClient::with_urls(&opts.ca_url, verifier.clone(), pattern)
            .map_err(|e| match e {
                ClientError::BadUrl(url) => RenewError::BadUrl { url },
                other => RenewError::Ca(other),
            })?
            .with_observer(Arc::new(LogFailover));
        Ok(Renewer {
            opts,
            client,
            verifier,
            trust_domain,
            bundle,
        })
    }

    /// Writes the bundle file if `roots` differ from it; true if it did.
    fn install_bundle(&mut self, roots: Vec<CertificateDer<'static>>) -> Result<bool, RenewError> {
        if roots == self.bundle || roots.is_empty() {
            return Ok(false);
        }
        let tb = TrustBundle::new(roots.clone())
            .map_err(|e| RenewError::Ca(ClientError::Protocol(format!("bundle: {e}"))))?;
        let pem: String = roots.iter().map(|c| keys::cert_pem(c)).collect();
        fsutil::write_atomic(&self.opts.bundle, pem.as_bytes(), PUBLIC)
            .map_err(write_err(&self.opts.bundle))?;
        self.verifier
            .store(Arc::new(SvidVerifier::new(self.trust_domain.clone(), tb)));
        self.bundle = roots;
        Ok(true)
    }

    /// One renewal: a new key, the CA's certificate for it, the files
    /// replaced. Returns the new pair as held.
    async fn renew(&mut self, held: &Held) -> Result<Held, RenewError> {
        let opts = self.opts;
        let current = certified_key(held.chain.clone(), &held.key)?;
        let new = new_key(held.key_type, held.spiffe_id.as_str())?;
        let issued = self.client.renew(Arc::new(current), &new.csr_pem).await?;
        if issued.spiffe_id != held.spiffe_id.as_str() {
            return Err(RenewError::WrongIdentity {
                got: issued.spiffe_id,
                want: held.spiffe_id.to_string(),
            });
        }
        let key_pem = pem_private_key(new.key_der.secret_der());
        let chain_pem: String = issued.chain.iter().map(|c| keys::cert_pem(c)).collect();
        // Proves the chain matches the key (and parses) before anything is
        // written.
        let renewed = parse_pair(opts, chain_pem.as_bytes(), key_pem.as_bytes(), &opts.cert)?;
        self.install_bundle(issued.bundle)?;
        let (skey, scert) = (staged(&opts.key), staged(&opts.cert));
        fsutil::write_atomic(&skey, key_pem.as_bytes(), SECRET).map_err(write_err(&skey))?;
        fsutil::write_atomic(&scert, chain_pem.as_bytes(), PUBLIC).map_err(write_err(&scert))?;
        std::fs::rename(&skey, &opts.key).map_err(write_err(&opts.key))?;
        std::fs::rename(&scert, &opts.cert).map_err(write_err(&opts.cert))?;
        fsutil::sync_parent(&opts.key).map_err(write_err(&opts.key))?;
        fsutil::sync_parent(&opts.cert).map_err(write_err(&opts.cert))?;
        Ok(renewed)
    }
}

/// Runs `--exec` with `sh -c`, waiting for it.
async fn run_exec(cmd: &str) -> Result<(), RenewError> {
    let owned = cmd.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&owned)
            .stdin(std::process::Stdio::null())
            .status()
    })
    .await
    .map_err(|e| RenewError::Exec {
        cmd: cmd.to_owned(),
        msg: e.to_string(),
    })?;
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(RenewError::Exec {
            cmd: cmd.to_owned(),
            msg: s.to_string(),
        }),
        Err(e) => Err(RenewError::Exec {
            cmd: cmd.to_owned(),
            msg: e.to_string(),
        }),
    }
}

fn now() -> i64 {
    ca::now().unix_timestamp()
}

fn check_unexpired(opts: &Options, held: &Held) -> Result<(), RenewError> {
    if held.not_after <= now() {
        return Err(RenewError::Expired {
            path: opts.cert.clone(),
            at: when(held.not_after),
        });
    }
    Ok(())
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("{} keyproof-ca renew: {msg}", ca::rfc3339(ca::now()));
}

/// Renews once if the certificate is past two thirds of its life (or
/// `force`); otherwise says when it will be due.
pub async fn once(opts: &Options) -> Result<Outcome, RenewError> {
    if let Some(msg) = recover(opts)? {
        log(msg);
    }
    let held = load(opts)?;
    // Every input is checked on every run, due or not: a cron job with a
    // bad --bundle or --ca-url must fail the day it is set up, not months
    // later when the certificate falls due.
    let mut renewer = Renewer::new(opts, &held)?;
    check_unexpired(opts, &held)?;
    if !opts.force && now() < held.due() {
        return Ok(Outcome::NotDue {
            spiffe_id: held.spiffe_id.to_string(),
            due: held.due(),
            serial: held.serial,
            not_after: held.not_after,
        });
    }
    let renewed = renewer
        .renew(&held)
        .await
        .map_err(|e| expired_or(opts, &held, e))?;
    if let Some(cmd) = &opts.exec {
        run_exec(cmd).await?;
    }
    Ok(Outcome::Renewed {
        spiffe_id: renewed.spiffe_id.to_string(),
        serial: renewed.serial,
        not_after: renewed.not_after,
    })
}

/// A refusal because the certificate lapsed meanwhile becomes the clear
/// "cannot renew" error.
fn expired_or(opts: &Options, held: &Held, e: RenewError) -> RenewError {
    let lapsed = matches!(&e, RenewError::Ca(c) if c.code() == Some("client_certificate_expired"));
    if lapsed || held.not_after <= now() {
        RenewError::Expired {
            path: opts.cert.clone(),
            at: when(held.not_after),
        }
    } else {
        e
    }
}

/// Sleeps until `at`; false if `shutdown` fired first.
async fn sleep_until<F: Future<Output = ()>>(
    at: Instant,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(at.into()) => true,
        _ = shutdown.as_mut() => false,
    }
}

fn instant_at(unix: i64) -> Instant {
    Instant::now() + Duration::from_secs(unix.saturating_sub(now()).max(0) as u64)
}

/// Runs until `shutdown` resolves: renews at two thirds of each
/// certificate's life (jittered), retries failures with exponential
/// backoff inside the certificate's remaining life, refreshes the bundle
/// in between, and runs `--exec` after each change. Returns an error only
/// when the certificate can no longer be renewed (or the files are
/// unusable at start).
pub async fn daemon<F: Future<Output = ()>>(opts: &Options, shutdown: F) -> Result<(), RenewError> {
    tokio::pin!(shutdown);
    if let Some(msg) = recover(opts)? {
        log(msg);
    }
    let mut held = load(opts)?;
    check_unexpired(opts, &held)?;
    let mut renewer = Renewer::new(opts, &held)?;
    let mut renew_at = if opts.force {
        Instant::now()
    } else {
        instant_at(held.due())
    };
    log(format!(
        "{} (serial {}, expires {}): next renewal at {}",
        held.spiffe_id,
        held.serial,
        when(held.not_after),
        when(now() + renew_at.saturating_duration_since(Instant::now()).as_secs() as i64)
    ));
    let mut backoff = MIN_BACKOFF;
    let mut next_bundle = Instant::now() + BUNDLE_REFRESH;
    loop {
        if !sleep_until(renew_at.min(next_bundle), &mut shutdown).await {
            log("stopping (signal)");
            return Ok(());
        }
        if Instant::now() < renew_at {
            next_bundle = Instant::now() + BUNDLE_REFRESH;
            let fetched = tokio::select! {
                r = renewer.client.bundle() => r,
                _ = shutdown.as_mut() => {
                    log("stopping (signal)");
                    return Ok(());
                }
            };
            match fetched.map_err(RenewError::from) {
                Ok(roots) => match renewer.install_bundle(roots) {
                    Ok(true) => {
                        log(format!(
                            "the CA's bundle changed: {} now holds {} root(s)",
                            opts.bundle.display(),
                            renewer.bundle.len()
                        ));
                        if let Some(cmd) = &opts.exec {
                            if let Err(e) = run_exec(cmd).await {
                                log(format!("warning: {e}"));
                            }
                        }
                    }
                    Ok(false) => {}
                    Err(e) => log(format!("bundle refresh failed: {e}")),
                },
                Err(e) => log(format!("bundle refresh failed: {e}")),
            }
            continue;
        }
        // The files are the truth: someone may have replaced them meanwhile.
        match load(opts) {
            Ok(on_disk) if on_disk.serial != held.serial => {
                log(format!(
                    "{} was replaced (serial {}); rescheduling",
                    opts.cert.display(),
                    on_disk.serial
                ));
                renew_at = instant_at(on_disk.due());
                held = on_disk;
                continue;
            }
            Ok(_) => {}
            Err(e) => log(format!("warning: {e}; renewing the pair held in memory")),
        }
        check_unexpired(opts, &held)?;
        let attempt = tokio::select! {
            r = renewer.renew(&held) => r,
            _ = shutdown.as_mut() => {
                log("stopping (signal)");
                return Ok(());
            }
        };
        match attempt {
            Ok(renewed) => {
                let next = renew_after_from_now(renewed.not_after);
                log(format!(
                    "renewed {}: serial {} valid until {}; next renewal in {}",
                    renewed.spiffe_id,
                    renewed.serial,
                    when(renewed.not_after),
                    keyproof_identity::duration::format(next)
                ));
                held = renewed;
                renew_at = Instant::now() + next;
                backoff = MIN_BACKOFF;
                if let Some(cmd) = &opts.exec {
                    match run_exec(cmd).await {
                        Ok(()) => log(format!("--exec {cmd:?} done")),
                        Err(e) => log(format!("warning: {e}")),
                    }
                }
            }
            Err(e) => {
                let e = expired_or(opts, &held, e);
                if matches!(e, RenewError::Expired { .. }) {
                    return Err(e);
                }
                // Several attempts must fit before the certificate lapses,
                // however short-lived it is.
                let remaining =
                    Duration::from_secs(held.not_after.saturating_sub(now()).max(0) as u64);
                let retry_in = backoff.min((remaining / 4).max(Duration::from_millis(200)));
                log(format!(
                    "renewal failed: {e}; retrying in {}",
                    keyproof_identity::duration::format(retry_in)
                ));
                renew_at = Instant::now() + retry_in;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_sit_beside_their_destination() {
        assert_eq!(
            staged(Path::new("/etc/tls/web.key")),
            PathBuf::from("/etc/tls/.web.key.keyproof-new")
        );
        assert_eq!(
            staged(Path::new("web.crt")),
            PathBuf::from(".web.crt.keyproof-new")
        );
    }

    #[test]
    fn private_keys_are_pkcs8_pem() {
        let kp = KeyType::EcdsaP256.generate().unwrap();
        let pem = pem_private_key(&kp.serialize_der());
        assert_eq!(pem, kp.serialize_pem());
    }
}
