//! Keeps a workload's SVID fresh from `keyproof-ca serve`: bootstrap with a
//! join token or a Kubernetes ServiceAccount token, then renew at two thirds
//! of each certificate's remaining life (±10% jitter so a fleet does not
//! renew in lockstep), retry with exponential backoff, and refresh the trust
//! bundle (and its `spiffe_sequence`) in between.
//!
//! A certificate that lapsed (the CA was down longer than its lifetime) can
//! no longer be renewed. With a ServiceAccount token, which stays valid for
//! many bootstraps, the renewer then bootstraps again by itself; a join token
//! is single-use, so with one it keeps asking for a renewal and says that a
//! new token is needed.
//!
//! The key is generated in memory for every issuance and never written. The
//! caller installs each new SVID through [`Handler::install`] (which may
//! refuse it) and keeps serving on the previous one until it does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyproof_identity::keys::KeyType;
use keyproof_identity::spiffe::SpiffeId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::client::{certified_key, new_key, CaClient, ClientError, IssuedSvid};

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

/// A newly issued identity for the caller to install.
pub struct NewIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub bundle: Vec<CertificateDer<'static>>,
    /// When the leaf expires (seconds since the epoch).
    pub not_after: i64,
    /// The bundle's `spiffe_sequence` as the CA stated it with the issuance
    /// (None from a CA that does not say).
    pub spiffe_sequence: Option<u64>,
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
    /// The join token file could not be read (bootstrap only).
    TokenUnreadable,
    /// The handler refused the issued identity ([`Handler::install`]).
    Rejected,
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
        }
    }

    fn of(e: &ClientError) -> FailureKind {
        match e {
            ClientError::Unreachable { .. } => FailureKind::CaUnreachable,
            ClientError::Refused { .. } => FailureKind::CaRefused,
            ClientError::BadUrl(_) | ClientError::Protocol(_) => FailureKind::Protocol,
        }
    }
}

/// What happened, for metrics and logs.
#[derive(Debug)]
pub enum Event<'a> {
    /// An SVID was issued and installed (`bootstrap` or `renew`).
    Renewed { how: &'static str, not_after: i64 },
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
}

/// A uniformly random factor in [0.9, 1.1].
fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut b);
    0.9 + 0.2 * (u16::from_le_bytes(b) as f64 / u16::MAX as f64)
}

/// When to renew a certificate received now that expires at `not_after`:
/// two thirds of the remaining life, jittered. Measured from receipt, not
/// from notBefore, because notBefore is backdated for clock skew.
pub fn renew_after(not_after: i64, now: i64) -> Duration {
    let remaining = (not_after - now).max(1) as f64;
    Duration::from_secs_f64(remaining * 2.0 / 3.0 * jitter())
}

/// The next retry: exponential backoff, but never more than a quarter of the
/// held certificate's remaining life, so several attempts fit before it
/// expires however short-lived it is.
fn retry_delay(backoff: Duration, held_until: Option<i64>, now: i64) -> Duration {
    match held_until {
        Some(until) if until > now => {
            let quarter = Duration::from_secs((until - now) as u64) / 4;
            backoff.min(quarter.max(Duration::from_millis(200)))
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
    /// Present the credential (no certificate held, or the held one lapsed
    /// and the credential is reusable).
    Bootstrap,
    /// Authenticate with the certificate held.
    Renew(Arc<CertifiedKey>),
}

/// Whether to renew with `current` or bootstrap again: a lapsed certificate
/// cannot authenticate a renewal, so with a reusable credential the renewer
/// goes straight to a bootstrap instead of collecting a refusal first.
fn ask_for(credential: &Credential, current: Option<Arc<CertifiedKey>>, now: i64) -> Ask {
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
            } else {
                Ask::Renew(ck)
            }
        }
    }
}

/// After a failed renewal: whether to bootstrap at once instead (the CA
/// said the held certificate can no longer renew, and the credential can be
/// presented again). Says which way it goes.
fn bootstrap_after_refusal(credential: &Credential, e: &ClientError) -> bool {
    let Some(code) = e.code().filter(|c| RENEWAL_NEEDS_BOOTSTRAP.contains(c)) else {
        return false;
    };
    if credential.reusable() {
        tracing::info!(
            code,
            credential = credential.describe(),
            "the CA will not renew the certificate held; bootstrapping again with the {}",
            credential.describe()
        );
        true
    } else {
        tracing::warn!(
            code,
            credential = credential.describe(),
            "the CA will not renew the certificate held, and a join token is single-use: \
             a new join token (or a restart with a fresh one) is needed; retrying the renewal"
        );
        false
    }
}

async fn bootstrap(
    cfg: &RenewerConfig,
    csr_pem: &str,
) -> Result<IssuedSvid, (FailureKind, String)> {
    let path = cfg.bootstrap.path();
    let token = tokio::fs::read_to_string(path).await.map_err(|e| {
        (
            FailureKind::TokenUnreadable,
            format!("{} {}: {e}", cfg.bootstrap.describe(), path.display()),
        )
    })?;
    // Names the identity wanted, so that a credential for another one
    // (another namespace's ServiceAccount, another workload's join token)
    // is refused by the CA (`id_mismatch`) instead of issued and dropped.
    cfg.client
        .bootstrap_for(token.trim(), csr_pem, Some(cfg.spiffe_id.as_str()))
        .await
        .map_err(|e| (FailureKind::of(&e), e.to_string()))
}

async fn obtain(
    cfg: &RenewerConfig,
    current: Option<Arc<CertifiedKey>>,
) -> Result<(NewIdentity, &'static str), (FailureKind, String)> {
    let failed = |e: ClientError| (FailureKind::of(&e), e.to_string());
    let key = new_key(cfg.key_type, cfg.spiffe_id.as_str()).map_err(failed)?;
    let now = crate::ca::now().unix_timestamp();
    let (issued, how): (IssuedSvid, _) = match ask_for(&cfg.bootstrap, current, now) {
        Ask::Renew(ck) => match cfg.client.renew(ck, &key.csr_pem).await {
            Ok(issued) => (issued, "renew"),
            Err(e) if bootstrap_after_refusal(&cfg.bootstrap, &e) => {
                (bootstrap(cfg, &key.csr_pem).await?, "bootstrap")
            }
            Err(e) => return Err(failed(e)),
        },
        Ask::Bootstrap => (bootstrap(cfg, &key.csr_pem).await?, "bootstrap"),
    };
    if issued.spiffe_id != cfg.spiffe_id.as_str() {
        return Err((
            FailureKind::Protocol,
            format!(
                "the CA issued {} but this workload is {}",
                issued.spiffe_id, cfg.spiffe_id
            ),
        ));
    }
    // Proves the chain matches the key before anyone installs it.
    certified_key(issued.chain.clone(), &key.key_der).map_err(failed)?;
    let not_after = leaf_not_after(&issued.chain).map_err(failed)?;
    Ok((
        NewIdentity {
            not_after,
            chain: issued.chain,
            key: key.key_der,
            bundle: issued.bundle,
            // Sequences start at 1; 0 is what a CA that does not say gives.
            spiffe_sequence: (issued.spiffe_sequence > 0).then_some(issued.spiffe_sequence),
        },
        how,
    ))
}

/// Runs forever: obtains and renews the SVID, refreshing the bundle.
pub async fn run(cfg: RenewerConfig, handler: Arc<dyn Handler>) {
    let mut backoff = MIN_BACKOFF;
    let mut renew_at = Instant::now();
    let mut last_bundle: Option<(Vec<CertificateDer<'static>>, Option<u64>)> = None;
    // Expiry of the certificate held, to keep retries inside its lifetime.
    let mut held_until: Option<i64> = None;
    loop {
        let now = Instant::now();
        if now >= renew_at {
            let current = handler.current();
            // For the failure event; obtain may still switch to a bootstrap.
            let how = if current.is_some() {
                "renew"
            } else {
                "bootstrap"
            };
            let outcome = match obtain(&cfg, current).await {
                Ok((id, how)) => {
                    let not_after = id.not_after;
                    let bundle = (id.bundle.clone(), id.spiffe_sequence);
                    handler
                        .install(id)
                        .map(|()| (how, not_after, bundle))
                        .map_err(|e| (FailureKind::Rejected, e))
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok((how, not_after, bundle)) => {
                    handler.event(Event::Renewed { how, not_after });
                    last_bundle = Some(bundle);
                    held_until = Some(not_after);
                    backoff = MIN_BACKOFF;
                    let wall = crate::ca::now().unix_timestamp();
                    renew_at = Instant::now() + renew_after(not_after, wall);
                }
                Err((kind, error)) => {
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
                if last_bundle.as_ref() != Some(&fetched) {
                    let roots = fetched.0.len();
                    if handler
                        .install_bundle_with_sequence(fetched.0.clone(), fetched.1)
                        .is_ok()
                    {
                        handler.event(Event::BundleUpdated { roots });
                        last_bundle = Some(fetched);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_two_thirds_of_the_remaining_life_with_jitter() {
        for _ in 0..1000 {
            let d = renew_after(1_000 + 30, 1_000).as_secs_f64();
            assert!((18.0..=22.0).contains(&d), "{d}");
        }
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
            assert!(!renews(ask_for(&credential, None, now)), "{credential:?}");
            // Still valid: renew, whatever the credential.
            assert!(renews(ask_for(&credential, Some(held(now + 60)), now)));
        }
        assert!(!renews(ask_for(&sa(), Some(held(now - 1)), now)));
        // A spent join token would only earn `token_reused`.
        assert!(renews(ask_for(&join(), Some(held(now - 1)), now)));
    }

    #[test]
    fn a_renewal_refused_for_the_certificate_held_bootstraps_again_with_a_service_account_token() {
        let refused = |code: &str| ClientError::Refused {
            status: 401,
            code: code.into(),
            message: String::new(),
        };
        for code in RENEWAL_NEEDS_BOOTSTRAP {
            assert!(bootstrap_after_refusal(&sa(), &refused(code)), "{code}");
            assert!(!bootstrap_after_refusal(&join(), &refused(code)), "{code}");
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
            assert!(!bootstrap_after_refusal(&sa(), &e), "{e}");
        }
    }

    #[test]
    fn retries_stay_inside_the_remaining_lifetime() {
        let s = Duration::from_secs;
        assert_eq!(retry_delay(s(30), Some(1_008), 1_000), s(2));
        assert_eq!(retry_delay(s(1), Some(2_000), 1_000), s(1));
        assert_eq!(retry_delay(s(8), None, 1_000), s(8));
        assert_eq!(retry_delay(s(8), Some(1_000), 1_000), s(8));
    }
}
