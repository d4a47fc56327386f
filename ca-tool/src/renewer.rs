//! Keeps a workload's SVID fresh from `keyproof-ca serve`: bootstrap with a
//! join token or a Kubernetes ServiceAccount token, then renew at 85% to 95%
//! of two thirds of each certificate's remaining life (jitter so a fleet
//! does not renew in lockstep, only downward so that every renewal happens
//! before the last third that `keyproof-ca check` warns about), retry with
//! exponential backoff, and refresh the trust bundle (and its
//! `spiffe_sequence`) in between.
//!
//! A certificate that lapsed (the CA was down longer than its lifetime),
//! that the CA rejects in the TLS handshake, or whose root left the CA's
//! bundle (`rotate root finish --force`) can no longer be renewed. With a
//! ServiceAccount token, which stays valid for many bootstraps, the renewer
//! then bootstraps again by itself; a join token is single-use, so with one
//! it keeps asking for a renewal and says (once) that a new token is needed.
//!
//! The key is generated in memory for every issuance and never written, or
//! (with [`run_with_key`] and [`KeySource::Pkcs11`]) it is one key held in a
//! PKCS#11 token, which signs every CSR and is reused for every issuance:
//! the token never hands it out, and a fresh key per renewal would only
//! fill the token with keys nobody can delete safely. The
//! caller installs each new SVID through [`Handler::install`] (which may
//! refuse it) and keeps serving on the previous one until it does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyproof_identity::keys::KeyType;
use keyproof_identity::pkcs11::Pkcs11Key;
use keyproof_identity::spiffe::SpiffeId;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

use crate::client::{
    certified_key, new_key, token_csr, CaClient, ClientError, Endpoint, IssuedKey, IssuedSvid,
};

/// First retry delay; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the renewer needs.
pub struct RenewerConfig {
    pub client: CaClient,
    pub spiffe_id: SpiffeId,
    pub key_type: KeyType,
    /// What proves the workload's claim when it holds no certificate.
    pub bootstrap: Credential,
    /// How often to fetch `/v1/bundle` between renewals.
    pub bundle_refresh: Duration,
}

/// The bootstrap credential, read from its file at every bootstrap (a
/// Kubernetes Secret may be mounted late; the kubelet refreshes a projected
/// ServiceAccount token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A single-use join token (`keyproof-ca token create`).
    JoinToken(PathBuf),
    /// A projected Kubernetes ServiceAccount token (audience `keyproof-ca`).
    ServiceAccountToken(PathBuf),
}

impl Credential {
    /// Whether the credential can be presented again after a first
    /// bootstrap. A ServiceAccount token can (for its lifetime, and the
    /// kubelet refreshes the file); a join token is spent by its first use,
    /// so bootstrapping again with it only earns `token_reused`.
    pub fn reusable(&self) -> bool {
        matches!(self, Credential::ServiceAccountToken(_))
    }

    /// The file it is read from.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Credential::JoinToken(p) | Credential::ServiceAccountToken(p) => p,
        }
    }

    /// How logs name it.
    pub fn describe(&self) -> &'static str {
        match self {
            Credential::JoinToken(_) => "join token file",
            Credential::ServiceAccountToken(_) => "service account token file",
        }
    }
}

/// Where the key of each issuance comes from.
#[derive(Debug, Clone, Default)]
pub enum KeySource {
    /// A fresh key generated in memory for every issuance
    /// ([`RenewerConfig::key_type`]).
    #[default]
    Fresh,
    /// One key in a PKCS#11 token, which signs every CSR; reused for every
    /// issuance. [`RenewerConfig::key_type`] is not used (the key has its
    /// own type).
    Pkcs11(Pkcs11Key),
}

/// A newly issued identity for the caller to install.
pub struct NewIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    /// The key the chain certifies: in memory, or the token key.
    pub key: IssuedKey,
    pub bundle: Vec<CertificateDer<'static>>,
    /// When the leaf expires (seconds since the epoch).
    pub not_after: i64,
    /// The bundle's `spiffe_sequence` as the CA stated it with the issuance
    /// (None from a CA that does not say).
    pub spiffe_sequence: Option<u64>,
    /// The CA endpoint (replica) that issued it.
    pub ca_endpoint: Option<Endpoint>,
}

/// The API error codes of a renewal that no retry can turn into a success:
/// the certificate the caller authenticates with has lapsed (or was not
/// accepted as a client certificate at all). Only a new bootstrap helps.
pub const RENEWAL_NEEDS_BOOTSTRAP: [&str; 2] =
    ["client_certificate_expired", "client_certificate_required"];

/// Why an attempt failed, for the `result` label of renewal metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The CA could not be reached (network, TLS, timeout).
    CaUnreachable,
    /// The CA answered with an error (token, rate limit, id mismatch...).
    CaRefused,
    /// The CA's answer was malformed or for the wrong identity.
    Protocol,
    /// The credential file could not be read, or does not hold exactly
    /// one token (bootstrap only).
    TokenUnreadable,
    /// The handler refused the issued identity ([`Handler::install`]).
    Rejected,
    /// The workload key could not sign the CSR (its PKCS#11 token is
    /// unavailable or refused).
    KeyUnavailable,
    /// The CA rejected the client certificate held in the TLS handshake
    /// (its root is no longer trusted, typically after `rotate root finish
    /// --force`).
    ClientCertRejected,
}

impl FailureKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::CaUnreachable => "ca_unreachable",
            FailureKind::CaRefused => "ca_refused",
            FailureKind::Protocol => "protocol",
            FailureKind::TokenUnreadable => "token_unreadable",
            FailureKind::Rejected => "invalid",
            FailureKind::KeyUnavailable => "key_unavailable",
            FailureKind::ClientCertRejected => "client_cert_rejected",
        }
    }

    fn of(e: &ClientError) -> FailureKind {
        match e {
            ClientError::Unreachable { .. } => FailureKind::CaUnreachable,
            ClientError::ClientCertRejected { .. } => FailureKind::ClientCertRejected,
            ClientError::Refused { .. } => FailureKind::CaRefused,
            ClientError::BadUrl(_) | ClientError::Protocol(_) => FailureKind::Protocol,
            // Named after the last endpoint's failure: only unreachable
            // endpoints and server errors fail over.
            ClientError::AllFailed(tried) => tried
                .last()
                .map_or(FailureKind::CaUnreachable, |a| FailureKind::of(&a.error)),
        }
    }
}

/// What happened, for metrics and logs.
#[derive(Debug)]
pub enum Event<'a> {
    /// An SVID was issued and installed (`bootstrap` or `renew`) by the
    /// CA endpoint `endpoint`.
    Renewed {
        how: &'static str,
        not_after: i64,
        endpoint: Option<&'a Endpoint>,
    },
    /// Issuance failed; the current identity keeps serving.
    Failed {
        how: &'static str,
        kind: FailureKind,
        error: &'a str,
        retry_in: Duration,
    },
    /// A newer bundle was fetched and installed.
    BundleUpdated { roots: usize },
}

/// The caller's side: install identities and bundles, observe events.
pub trait Handler: Send + Sync {
    /// The certificate currently held, for renewal (None before bootstrap).
    fn current(&self) -> Option<Arc<CertifiedKey>>;
    /// Installs a new identity; an error keeps the old one and is retried.
    fn install(&self, id: NewIdentity) -> Result<(), String>;
    /// Installs a refreshed bundle (same leaf); an error keeps the old one.
    fn install_bundle(&self, bundle: Vec<CertificateDer<'static>>) -> Result<(), String>;
    /// Installs a refreshed bundle with its `spiffe_sequence` (None when
    /// the CA did not state one). By default the sequence is dropped and
    /// [`Handler::install_bundle`] does the work.
    fn install_bundle_with_sequence(
        &self,
        bundle: Vec<CertificateDer<'static>>,
        _sequence: Option<u64>,
    ) -> Result<(), String> {
        self.install_bundle(bundle)
    }
    /// Counts and logs.
    fn event(&self, e: Event<'_>);
    /// Whether the certificate held still chains to one of `roots` (a
    /// bundle refreshed from the CA). False makes the renewer stop renewing
    /// that certificate: the CA, which serves that bundle, no longer
    /// trusts it either. By default true (cannot tell).
    fn held_chains_to(&self, _roots: &[CertificateDer<'static>]) -> bool {
        true
    }
    /// Called before every bootstrap attempt, so that the trust used to
    /// reach the CA can be read again (a bootstrap bundle file updated
    /// since the start). Does nothing by default.
    fn before_bootstrap(&self) {}
}

/// A uniformly random factor in [0.85, 0.95].
fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut b);
    0.85 + 0.1 * (u16::from_le_bytes(b) as f64 / u16::MAX as f64)
}

/// The time one CA endpoint is given to answer an issuance while a
/// certificate valid until `held_until` is held: a third of its remaining
/// life, between 2 s and 10 s, so that with a short-lived certificate a
/// replica that accepts connections and never answers leaves time to fail
/// over to the next one before the certificate lapses.
fn answer_timeout(held_until: Option<i64>, now: i64) -> Duration {
    const MAX: Duration = Duration::from_secs(10);
    match held_until {
        Some(until) if until > now => {
            (Duration::from_secs((until - now) as u64) / 3).clamp(Duration::from_secs(2), MAX)
        }
        _ => MAX,
    }
}

/// When to renew a certificate received now that expires at `not_after`:
/// two thirds of the remaining life times a random factor in [0.85, 0.95].
/// Measured from receipt, not from notBefore, because notBefore is
/// backdated for clock skew. The jitter only goes down so that a renewal
/// never reaches the last third of the life, where `keyproof-ca check`
/// warns that renewal is overdue; the 5% to 15% left over is the margin for
/// a slow answer or a retry.
pub fn renew_after(not_after: i64, now: i64) -> Duration {
    renew_in((not_after - now) as f64)
}

/// [`renew_after`] from the current time, to the sub-second: with a
/// short-lived certificate, a clock truncated to whole seconds would eat
/// most of the margin before the last third.
pub fn renew_after_from_now(not_after: i64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    renew_in(not_after as f64 - now)
}

fn renew_in(remaining_secs: f64) -> Duration {
    Duration::from_secs_f64(remaining_secs.max(1.0) * 2.0 / 3.0 * jitter())
}

/// The next retry: exponential backoff, but never more than a quarter of the
/// held certificate's remaining life, so several attempts fit before it
/// expires however short-lived it is; never less than [`MIN_BACKOFF`]
/// either, so that a certificate about to lapse does not turn into a flood.
fn retry_delay(backoff: Duration, held_until: Option<i64>, now: i64) -> Duration {
    match held_until {
        Some(until) if until > now => {
            let quarter = Duration::from_secs((until - now) as u64) / 4;
            backoff.min(quarter.max(MIN_BACKOFF))
        }
        _ => backoff,
    }
}

fn leaf_not_after(chain: &[CertificateDer<'_>]) -> Result<i64, ClientError> {
    let leaf = chain
        .first()
        .ok_or_else(|| ClientError::Protocol("empty chain".into()))?;
    let (_, c) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| ClientError::Protocol(format!("issued certificate: {e}")))?;
    Ok(c.validity().not_after.timestamp())
}

/// How an attempt asks the CA for a certificate.
enum Ask {
    /// Present the credential (no certificate held, or the held one can no
    /// longer renew and the credential is reusable).
    Bootstrap,
    /// Authenticate with the certificate held.
    Renew(Arc<CertifiedKey>),
}

/// Whether to renew with `current` or bootstrap again: a lapsed certificate
/// (or one the CA no longer trusts: `untrusted`) cannot authenticate a
/// renewal, so with a reusable credential the renewer goes straight to a
/// bootstrap instead of collecting a refusal first.
fn ask_for(
    credential: &Credential,
    current: Option<Arc<CertifiedKey>>,
    now: i64,
    untrusted: bool,
) -> Ask {
    match current {
        None => Ask::Bootstrap,
        Some(ck) => {
            let lapsed = ck
                .cert
                .first()
                .and_then(|leaf| leaf_not_after(std::slice::from_ref(leaf)).ok())
                .is_some_and(|not_after| not_after < now);
            if lapsed && credential.reusable() {
                tracing::info!(
                    credential = credential.describe(),
                    "the certificate held has expired; bootstrapping again with the {}",
                    credential.describe()
                );
                Ask::Bootstrap
            } else if untrusted && credential.reusable() {
                Ask::Bootstrap
            } else {
                Ask::Renew(ck)
            }
        }
    }
}

/// Why a failed renewal means the certificate held can never renew: the CA
/// said so (an API code of [`RENEWAL_NEEDS_BOOTSTRAP`]) or rejected it in
/// the TLS handshake. None for failures a retry may turn into a success.
fn renewal_hopeless(e: &ClientError) -> Option<&str> {
    match e {
        ClientError::ClientCertRejected { .. } => Some("client_cert_rejected"),
        _ => e.code().filter(|c| RENEWAL_NEEDS_BOOTSTRAP.contains(c)),
    }
}

/// Says, once per certificate held (`warned` remembers), that a join token
/// cannot recover an identity the CA no longer accepts.
fn warn_join_token_spent(credential: &Credential, why: &str, warned: &mut bool) {
    if *warned {
        return;
    }
    *warned = true;
    tracing::warn!(
        why,
        credential = credential.describe(),
        "the identity held is no longer trusted by the CA ({why}) and a join token is \
         single-use: a new join token (and a restart with it) is needed; retrying the renewal \
         meanwhile"
    );
}

/// After a failed renewal: whether to bootstrap at once instead (the held
/// certificate can never renew, and the credential can be presented
/// again). Says which way it goes; with a join token only once (`warned`).
fn bootstrap_after_refusal(credential: &Credential, e: &ClientError, warned: &mut bool) -> bool {
    let Some(why) = renewal_hopeless(e) else {
        return false;
    };
    if credential.reusable() {
        tracing::info!(
            why,
            credential = credential.describe(),
            "the CA will not renew the certificate held ({why}); bootstrapping again with the {}",
            credential.describe()
        );
        true
    } else {
        warn_join_token_spent(credential, why, warned);
        false
    }
}

/// The one token a credential file holds: surrounding whitespace and a
/// final newline are dropped; an empty file or one with several non-empty
/// lines is refused here rather than sent to the CA (which would answer
/// `missing_token`, or choke on a header with a newline).
fn one_token(text: &str) -> Result<&str, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    match (lines.next(), lines.count()) {
        (None, _) => Err("empty".into()),
        (Some(token), 0) => Ok(token),
        (Some(_), more) => Err(format!(
            "must hold one token, found {} non-empty lines",
            more + 1
        )),
    }
}

/// A failed attempt: its kind, the error, and how it asked (`bootstrap` or
/// `renew`).
type Failure = (FailureKind, String, &'static str);

async fn bootstrap(
    cfg: &RenewerConfig,
    handler: &dyn Handler,
    csr_pem: &str,
) -> Result<IssuedSvid, Failure> {
    handler.before_bootstrap();
    let path = cfg.bootstrap.path();
    let unreadable = |msg: String| {
        (
            FailureKind::TokenUnreadable,
            format!("{} {}: {msg}", cfg.bootstrap.describe(), path.display()),
            "bootstrap",
        )
    };
    // A small regular file (a projected token, a join token Secret): read
    // bounded, and a FIFO or a device is refused rather than waited on.
    let raw = crate::fsutil::read_input(path, crate::fsutil::MAX_INPUT)
        .map_err(|e| unreadable(e.to_string()))?;
    let text = String::from_utf8(raw).map_err(|_| unreadable("not UTF-8".into()))?;
    let token = one_token(&text).map_err(unreadable)?;
    // Names the identity wanted, so that a credential for another one
    // (another namespace's ServiceAccount, another workload's join token)
    // is refused by the CA (`id_mismatch`) instead of issued and dropped.
    cfg.client
        .bootstrap_for(token, csr_pem, Some(cfg.spiffe_id.as_str()))
        .await
        .map_err(|e| (FailureKind::of(&e), e.to_string(), "bootstrap"))
}

/// What the renewer knows about the certificate held beyond its expiry.
#[derive(Default)]
struct HeldState {
    /// The CA no longer trusts it (handshake rejection, or its root left
    /// the CA's bundle): bootstrap instead of renewing, when possible.
    untrusted: bool,
    /// The join-token warning for it was logged.
    warned: bool,
}

/// The key of one issuance and the CSR made with it.
struct Keyed {
    csr_pem: String,
    key: IssuedKey,
}

/// The key of this issuance and its CSR: a new key in memory, or the token
/// key (the CSR signed in the token, on a blocking thread: a PKCS#11
/// signature is a blocking call, and a slow token must not stall the
/// runtime's workers).
async fn key_for_issuance(
    cfg: &RenewerConfig,
    source: &KeySource,
    how: &'static str,
) -> Result<Keyed, Failure> {
    match source {
        KeySource::Fresh => {
            let k = new_key(cfg.key_type, cfg.spiffe_id.as_str())
                .map_err(|e| (FailureKind::of(&e), e.to_string(), how))?;
            Ok(Keyed {
                csr_pem: k.csr_pem,
                key: IssuedKey::Memory(k.key_der),
            })
        }
        KeySource::Pkcs11(token_key) => {
            let k = token_key.clone();
            let id = cfg.spiffe_id.to_string();
            let csr_pem = tokio::task::spawn_blocking(move || token_csr(&k, &id))
                .await
                .map_err(|e| {
                    (
                        FailureKind::KeyUnavailable,
                        format!("CSR signing task: {e}"),
                        how,
                    )
                })?
                .map_err(|e| (FailureKind::KeyUnavailable, e.to_string(), how))?;
            Ok(Keyed {
                csr_pem,
                key: IssuedKey::Pkcs11(token_key.clone()),
            })
        }
    }
}

async fn obtain(
    cfg: &RenewerConfig,
    source: &KeySource,
    handler: &dyn Handler,
    current: Option<Arc<CertifiedKey>>,
    state: &mut HeldState,
) -> Result<(NewIdentity, &'static str), Failure> {
    let how = if current.is_some() {
        "renew"
    } else {
        "bootstrap"
    };
    let key = key_for_issuance(cfg, source, how).await?;
    let now = crate::ca::now().unix_timestamp();
    let held_until = current
        .as_ref()
        .and_then(|ck| ck.cert.first())
        .and_then(|leaf| leaf_not_after(std::slice::from_ref(leaf)).ok());
    let client = cfg
        .client
        .clone()
        .with_answer_timeout(answer_timeout(held_until, now));
    let (issued, how): (IssuedSvid, _) =
        match ask_for(&cfg.bootstrap, current, now, state.untrusted) {
            Ask::Renew(ck) => match client.renew(ck, &key.csr_pem).await {
                Ok(issued) => (issued, "renew"),
                Err(e) if bootstrap_after_refusal(&cfg.bootstrap, &e, &mut state.warned) => {
                    // Counted and logged as what it was before the bootstrap
                    // that follows at once.
                    handler.event(Event::Failed {
                        how: "renew",
                        kind: FailureKind::of(&e),
                        error: &e.to_string(),
                        retry_in: Duration::ZERO,
                    });
                    state.untrusted = true;
                    (bootstrap(cfg, handler, &key.csr_pem).await?, "bootstrap")
                }
                Err(e) => return Err((FailureKind::of(&e), e.to_string(), "renew")),
            },
            Ask::Bootstrap => (bootstrap(cfg, handler, &key.csr_pem).await?, "bootstrap"),
        };
    let failed = |e: ClientError| (FailureKind::of(&e), e.to_string(), how);
    if issued.spiffe_id != cfg.spiffe_id.as_str() {
        return Err((
            FailureKind::Protocol,
            format!(
                "the CA issued {} but this workload is {}",
                issued.spiffe_id, cfg.spiffe_id
            ),
            how,
        ));
    }
    // Proves the chain matches the key before anyone installs it.
    certified_key(issued.chain.clone(), &key.key).map_err(failed)?;
    let not_after = leaf_not_after(&issued.chain).map_err(failed)?;
    Ok((
        NewIdentity {
            not_after,
            chain: issued.chain,
            key: key.key,
            bundle: issued.bundle,
            // Sequences start at 1; 0 is what a CA that does not say gives.
            spiffe_sequence: (issued.spiffe_sequence > 0).then_some(issued.spiffe_sequence),
            ca_endpoint: issued.endpoint,
        },
        how,
    ))
}

/// Runs forever: obtains and renews the SVID, refreshing the bundle; a new
/// key in memory for every issuance.
pub async fn run(cfg: RenewerConfig, handler: Arc<dyn Handler>) {
    run_with_key(cfg, KeySource::Fresh, handler).await
}

/// As [`run`], with the key of every issuance from `source` (a PKCS#11
/// token key is reused for every issuance).
pub async fn run_with_key(cfg: RenewerConfig, source: KeySource, handler: Arc<dyn Handler>) {
    type Bundle = (Vec<CertificateDer<'static>>, Option<u64>);
    let mut backoff = MIN_BACKOFF;
    let mut renew_at = Instant::now();
    let mut last_bundle: Option<Bundle> = None;
    // The last bundle the handler refused (or that no longer holds our
    // root): not offered again, so that a refusal is logged once per
    // bundle rather than at every refresh.
    let mut refused_bundle: Option<Bundle> = None;
    let mut state = HeldState::default();
    // Expiry of the certificate held, to keep retries inside its lifetime.
    let mut held_until: Option<i64> = None;
    loop {
        let now = Instant::now();
        if now >= renew_at {
            let current = handler.current();
            let outcome = match obtain(&cfg, &source, handler.as_ref(), current, &mut state).await {
                Ok((id, how)) => {
                    let not_after = id.not_after;
                    let bundle = (id.bundle.clone(), id.spiffe_sequence);
                    let endpoint = id.ca_endpoint.clone();
                    handler
                        .install(id)
                        .map(|()| (how, not_after, bundle, endpoint))
                        .map_err(|e| (FailureKind::Rejected, e, how))
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok((how, not_after, bundle, endpoint)) => {
                    handler.event(Event::Renewed {
                        how,
                        not_after,
                        endpoint: endpoint.as_ref(),
                    });
                    last_bundle = Some(bundle);
                    refused_bundle = None;
                    state = HeldState::default();
                    held_until = Some(not_after);
                    backoff = MIN_BACKOFF;
                    renew_at = Instant::now() + renew_after_from_now(not_after);
                }
                Err((kind, error, how)) => {
                    let retry_in =
                        retry_delay(backoff, held_until, crate::ca::now().unix_timestamp());
                    handler.event(Event::Failed {
                        how,
                        kind,
                        error: &error,
                        retry_in,
                    });
                    renew_at = Instant::now() + retry_in;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        // Sleep until the renewal or the next bundle check, whichever is first.
        let wake = renew_at.min(Instant::now() + cfg.bundle_refresh);
        tokio::time::sleep_until(wake.into()).await;
        if Instant::now() < renew_at && handler.current().is_some() {
            if let Ok(doc) = cfg.client.bundle_document().await {
                let fetched = (doc.roots, doc.spiffe_sequence);
                if last_bundle.as_ref() == Some(&fetched)
                    || refused_bundle.as_ref() == Some(&fetched)
                {
                    continue;
                }
                if !handler.held_chains_to(&fetched.0) {
                    // The CA dropped the root our certificate chains to: it
                    // will reject that certificate, and so will peers. A
                    // renewal now lets the CA confirm it (a rejection in
                    // the handshake), which leads to a bootstrap at once.
                    refused_bundle = Some(fetched);
                    if cfg.bootstrap.reusable() {
                        tracing::info!(
                            credential = cfg.bootstrap.describe(),
                            "the CA's trust bundle no longer holds the root of the certificate \
                             held; renewing now, and bootstrapping again with the {} if the CA \
                             rejects it",
                            cfg.bootstrap.describe()
                        );
                        renew_at = Instant::now();
                        backoff = MIN_BACKOFF;
                    } else {
                        warn_join_token_spent(
                            &cfg.bootstrap,
                            "root_left_bundle",
                            &mut state.warned,
                        );
                    }
                    continue;
                }
                let roots = fetched.0.len();
                if handler
                    .install_bundle_with_sequence(fetched.0.clone(), fetched.1)
                    .is_ok()
                {
                    handler.event(Event::BundleUpdated { roots });
                    last_bundle = Some(fetched);
                } else {
                    refused_bundle = Some(fetched);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::PrivateKeyDer;

    #[test]
    fn renews_before_two_thirds_of_the_remaining_life_with_downward_jitter() {
        let (mut lowest, mut highest) = (f64::MAX, 0.0f64);
        for _ in 0..2000 {
            let d = renew_after(1_000 + 300, 1_000).as_secs_f64();
            // 200 s is two thirds; 85% to 95% of it.
            assert!((170.0..=190.0).contains(&d), "{d}");
            lowest = lowest.min(d);
            highest = highest.max(d);
        }
        // Spread over the range, not stuck at one end.
        assert!(lowest < 175.0 && highest > 185.0, "{lowest}..{highest}");
        // Already expired: renew (almost) at once.
        assert!(renew_after(10, 1_000) < Duration::from_secs(1));
    }

    /// A certificate and key valid until `not_after` (seconds since the
    /// epoch).
    fn held(not_after: i64) -> Arc<CertifiedKey> {
        let kp = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.not_before =
            time::OffsetDateTime::from_unix_timestamp(not_after - 3600).expect("not_before");
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).expect("not_after");
        let der = params.self_signed(&kp).expect("self-signed").der().clone();
        let key = PrivateKeyDer::try_from(kp.serialize_der()).expect("key DER");
        Arc::new(certified_key(vec![der], &key).expect("certified key"))
    }

    fn sa() -> Credential {
        Credential::ServiceAccountToken("/var/run/secrets/tokens/keyproof".into())
    }

    fn join() -> Credential {
        Credential::JoinToken("/var/run/keyproof/token".into())
    }

    #[test]
    fn only_a_service_account_token_is_presented_again() {
        assert!(sa().reusable());
        assert!(!join().reusable());
    }

    #[test]
    fn a_lapsed_certificate_bootstraps_again_only_with_a_reusable_credential() {
        let now = 1_800_000_000;
        let renews = |a: Ask| matches!(a, Ask::Renew(_));
        for credential in [sa(), join()] {
            assert!(
                !renews(ask_for(&credential, None, now, false)),
                "{credential:?}"
            );
            // Still valid: renew, whatever the credential.
            assert!(renews(ask_for(
                &credential,
                Some(held(now + 60)),
                now,
                false
            )));
        }
        assert!(!renews(ask_for(&sa(), Some(held(now - 1)), now, false)));
        // A spent join token would only earn `token_reused`.
        assert!(renews(ask_for(&join(), Some(held(now - 1)), now, false)));
        // Valid but no longer trusted by the CA: the same.
        assert!(!renews(ask_for(&sa(), Some(held(now + 60)), now, true)));
        assert!(renews(ask_for(&join(), Some(held(now + 60)), now, true)));
    }

    #[test]
    fn a_credential_file_must_hold_exactly_one_token() {
        assert_eq!(one_token("kpt_abc\n"), Ok("kpt_abc"));
        assert_eq!(one_token("\r\n  kpt_abc \r\n\n"), Ok("kpt_abc"));
        for empty in ["", "\n", "  \t\r\n \n"] {
            assert_eq!(one_token(empty), Err("empty".into()), "{empty:?}");
        }
        let e = one_token("kpt_a\nkpt_b\n").unwrap_err();
        assert!(e.contains("must hold one token"), "{e}");
    }

    #[test]
    fn a_renewal_refused_for_the_certificate_held_bootstraps_again_with_a_service_account_token() {
        let refused = |code: &str| ClientError::Refused {
            status: 401,
            code: code.into(),
            message: String::new(),
        };
        let rejected = ClientError::ClientCertRejected {
            addr: "ca:8443".into(),
            alert: "UnknownCA".into(),
        };
        let mut warned = false;
        for e in RENEWAL_NEEDS_BOOTSTRAP
            .map(refused)
            .into_iter()
            .chain([rejected])
        {
            assert!(bootstrap_after_refusal(&sa(), &e, &mut false), "{e}");
            assert!(!bootstrap_after_refusal(&join(), &e, &mut warned), "{e}");
            // Said once, not at every retry.
            assert!(warned);
        }
        // Anything else is retried as a renewal: another bootstrap would
        // not fare better (rate limits, a CA in trouble, a bad CSR).
        for e in [
            refused("rate_limited"),
            refused("id_mismatch"),
            ClientError::Unreachable {
                addr: "ca:8443".into(),
                msg: "refused".into(),
            },
            ClientError::Protocol("x".into()),
        ] {
            assert!(!bootstrap_after_refusal(&sa(), &e, &mut false), "{e}");
        }
    }

    #[test]
    fn a_short_lived_certificate_gives_each_endpoint_less_time_to_answer() {
        let s = Duration::from_secs;
        assert_eq!(answer_timeout(None, 1_000), s(10));
        assert_eq!(answer_timeout(Some(1_000 + 24 * 3600), 1_000), s(10));
        assert_eq!(answer_timeout(Some(1_009), 1_000), s(3));
        assert_eq!(answer_timeout(Some(1_004), 1_000), s(2));
        // Lapsed: renewing cannot be in a hurry any more.
        assert_eq!(answer_timeout(Some(990), 1_000), s(10));
    }

    #[test]
    fn retries_stay_inside_the_remaining_lifetime() {
        let s = Duration::from_secs;
        assert_eq!(retry_delay(s(30), Some(1_008), 1_000), s(2));
        // Never faster than once a second, even about to lapse.
        assert_eq!(retry_delay(s(30), Some(1_001), 1_000), s(1));
        assert_eq!(retry_delay(s(1), Some(2_000), 1_000), s(1));
        assert_eq!(retry_delay(s(8), None, 1_000), s(8));
        assert_eq!(retry_delay(s(8), Some(1_000), 1_000), s(8));
    }
}
