//! `[identity.ca]`: the workload identity comes from `keyproof-ca serve`.
//!
//! [`keyproof_ca::renewer`] does the protocol (bootstrap with the join token
//! or the ServiceAccount token, bootstrap again with the latter when the
//! certificate lapsed, renewal at two thirds of the life with jitter,
//! backoff, bundle refresh);
//! this module is its [`Handler`]: it turns each issued chain, in-memory key
//! and bundle into an [`Identity`] with the same checks as file-based
//! material, swaps it into the [`IdentityStore`], keeps the verifier that
//! authenticates the CA server on the newest bundle, and counts renewals.
//!
//! `[identity] trust_bundle` is only the bootstrap trust for reaching the CA;
//! from the first issuance on, the bundle the CA hands out is authoritative
//! (it arrives over a connection authenticated with the previous one). The
//! file is read again before every bootstrap and its roots added to that
//! trust, so that replacing a stale file (or its ConfigMap) after a root
//! rotation lets a sidecar reach the CA without a restart.
//!
//! `identity.ca.url` may list several CA replicas (and a name may resolve to
//! several addresses, a headless Service): the client tries them in order
//! from the last that answered, failing over on unreachable endpoints and
//! server errors, never on a refusal. Each failover is counted
//! (`keyproof_identity_ca_failovers_total{op}`) and logged; the endpoint
//! that issued the certificate in use is on `/identity` (`ca_endpoint`) and
//! in `keyproof_identity_ca_endpoint{url,address}`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use keyproof_ca::client::{CaClient, ClientError, EndpointObserver, IssuedKey};
use keyproof_ca::renewer::{self, Event, Handler, KeySource, NewIdentity, RenewerConfig};
use keyproof_identity::tls::SharedVerifier;
use keyproof_identity::{SvidVerifier, TrustBundle, Usage};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

use crate::config::{CaSourceConfig, IdentityConfig};
use crate::identity::key::{TokenKey, WorkloadKey};
use crate::identity::store::{self, Identity, IdentityError, IdentityStore, MaterialError};
use crate::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Mutex;

/// The renewer's handler: installs identities into the store.
pub struct CaIdentity {
    store: Arc<IdentityStore>,
    metrics: Metrics,
    usages: Vec<Usage>,
    cfg: CaSourceConfig,
    /// Authenticates the CA server; follows the newest bundle.
    ca_trust: SharedVerifier,
    /// `[identity] trust_bundle`, read again before every bootstrap.
    bootstrap_bundle: PathBuf,
    /// What the last read of it gave (its roots, or the error), so that
    /// only a change is logged.
    last_bootstrap_read: Mutex<Option<Result<Vec<CertificateDer<'static>>, String>>>,
    /// The token key every certificate is requested for, with
    /// `[identity.pkcs11]` (None: a new key in memory each time).
    token: Option<Arc<TokenKey>>,
}

impl CaIdentity {
    fn refuse(&self, e: MaterialError) -> String {
        format!("issued identity refused ({}): {e}", e.reason())
    }

    /// Re-reads the bootstrap bundle file and trusts its roots for the CA
    /// server, in addition to the roots trusted now (the file may be older
    /// than the CA's latest bundle, or newer). A file that cannot be read
    /// or parsed changes nothing; each new outcome is logged once.
    fn reread_bootstrap_bundle(&self) {
        let read = keyproof_identity::filemode::refuse_writable(
            &self.bootstrap_bundle,
            store::BUNDLE_WRITERS,
        )
        .map_err(|e| e.to_string())
        .and_then(|()| crate::files::read(&self.bootstrap_bundle).map_err(|e| e.to_string()))
        .and_then(|pem| TrustBundle::from_pem(&pem).map_err(|e| e.to_string()))
        .map(|b| b.roots().to_vec());
        {
            let mut last = self
                .last_bootstrap_read
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.as_ref() != Some(&read) {
                match &read {
                    Ok(roots) => tracing::info!(
                        path = %self.bootstrap_bundle.display(),
                        roots = roots.len(),
                        "identity.trust_bundle read for the bootstrap"
                    ),
                    Err(error) => tracing::warn!(
                        path = %self.bootstrap_bundle.display(),
                        error,
                        "identity.trust_bundle unusable for the bootstrap; keeping the trust held"
                    ),
                }
                *last = Some(read.clone());
            }
        }
        let Ok(file_roots) = read else { return };
        let current = self.ca_trust.load_full();
        let mut roots = current.bundle().roots().to_vec();
        let before = roots.len();
        for r in file_roots {
            if !roots.contains(&r) {
                roots.push(r);
            }
        }
        if roots.len() == before {
            return;
        }
        if let Ok(bundle) = TrustBundle::new(roots) {
            self.ca_trust.store(Arc::new(SvidVerifier::new(
                current.trust_domain().clone(),
                bundle,
            )));
        }
    }

    fn trust_ca(&self, identity: &Identity) {
        // Built from roots that formed a bundle a moment ago; cannot fail.
        if let Ok(bundle) = TrustBundle::new(identity.verifier.bundle().roots().to_vec()) {
            self.ca_trust.store(Arc::new(SvidVerifier::new(
                identity.id.trust_domain(),
                bundle,
            )));
        }
    }
}

/// Counts and logs each failover to the next CA endpoint.
struct FailoverMetrics {
    metrics: Metrics,
}

impl EndpointObserver for FailoverMetrics {
    fn failed_over(&self, op: &'static str, from: &str, error: &ClientError) {
        self.metrics.ca_failover(op);
        tracing::warn!(
            op,
            endpoint = from,
            %error,
            "CA endpoint failed; trying the next one"
        );
    }
}

impl Handler for CaIdentity {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.store.get().map(|i| i.certified.clone())
    }

    fn install(&self, id: NewIdentity) -> Result<(), String> {
        let key = match id.key {
            IssuedKey::Memory(der) => WorkloadKey::memory(der),
            // The same token key as held: shares what the proxy tracks
            // about it (its last failure, its observer).
            IssuedKey::Pkcs11(k) => match &self.token {
                Some(t) if t.key().uri() == k.uri() => WorkloadKey::Pkcs11(t.clone()),
                _ => WorkloadKey::Pkcs11(Arc::new(TokenKey::new(k))),
            },
        };
        let next = Identity::from_parts(
            id.chain,
            key,
            id.bundle,
            &self.usages,
            Some(&self.cfg.spiffe_id),
        )
        .map_err(|e| self.refuse(e))?
        .with_sequence(id.spiffe_sequence)
        .with_ca_endpoint(id.ca_endpoint.clone());
        if let Some(ep) = &id.ca_endpoint {
            self.metrics.ca_endpoint(&ep.url, &ep.addr.to_string());
        }
        self.trust_ca(&next);
        self.store
            .install(next, &self.metrics, "certificate issued by the CA");
        Ok(())
    }

    fn install_bundle(&self, bundle: Vec<CertificateDer<'static>>) -> Result<(), String> {
        self.install_bundle_with_sequence(bundle, None)
    }

    fn held_chains_to(&self, roots: &[CertificateDer<'static>]) -> bool {
        let Some(held) = self.store.get() else {
            return true;
        };
        // A malformed bundle is the install's to refuse, with its reason.
        let Ok(bundle) = TrustBundle::new(roots.to_vec()) else {
            return true;
        };
        let verifier = SvidVerifier::new(held.id.trust_domain(), bundle);
        // Checked at a time inside the leaf's validity: the question is the
        // root, not whether the certificate has lapsed meanwhile.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let at = now.clamp(held.not_before, (held.not_after - 1).max(held.not_before));
        let at = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(at).unwrap_or(0),
        ));
        let cert = &held.certified.cert;
        let Some(usage) = self.usages.first() else {
            return true;
        };
        match verifier.verify(&cert[0], &cert[1..], at, *usage) {
            Ok(_) => true,
            Err(e) => {
                let chains = e.reason() != "unknown_ca";
                if !chains {
                    tracing::warn!(
                        serial = %held.serial,
                        error = %e,
                        "the CA's trust bundle no longer holds the root of the certificate held"
                    );
                }
                chains
            }
        }
    }

    fn before_bootstrap(&self) {
        self.reread_bootstrap_bundle();
    }

    fn install_bundle_with_sequence(
        &self,
        bundle: Vec<CertificateDer<'static>>,
        sequence: Option<u64>,
    ) -> Result<(), String> {
        let current = self
            .store
            .get()
            .ok_or_else(|| "no identity yet to pair the bundle with".to_owned())?;
        let next = current.with_bundle(bundle, &self.usages).map_err(|e| {
            // The renewer reports no event for this; the next renewal brings
            // a certificate and bundle that fit together.
            tracing::warn!(result = e.reason(), error = %e, "refreshed trust bundle refused; keeping the current one");
            format!("bundle refused ({}): {e}", e.reason())
        })?;
        // A CA answering PEM states no sequence: none is exported then,
        // rather than the previous bundle's.
        let next = next.with_sequence(sequence);
        self.trust_ca(&next);
        self.store.install_bundle(next, &self.metrics);
        Ok(())
    }

    fn event(&self, e: Event<'_>) {
        match e {
            Event::Renewed {
                how,
                not_after,
                endpoint,
            } => {
                self.metrics.renewal("ok");
                let endpoint = endpoint.map(|e| e.to_string());
                tracing::debug!(how, not_after, endpoint, "identity renewed");
            }
            Event::Failed {
                how,
                kind,
                error,
                retry_in,
            } => {
                let result = kind.as_str();
                self.metrics.renewal(result);
                let held = self.store.get().map(|i| i.not_after);
                tracing::warn!(
                    how,
                    result,
                    error,
                    retry_in = ?retry_in,
                    current_not_after = ?held,
                    urls = %self.cfg.urls.join(", "),
                    "could not obtain a certificate from the CA; retrying"
                );
            }
            Event::BundleUpdated { roots } => {
                tracing::debug!(roots, "bundle update installed");
            }
        }
    }
}

/// The bootstrap trust for the CA server: `[identity] trust_bundle` with
/// the trust domain of `identity.ca.spiffe_id`. Errors name the key.
pub fn bootstrap_trust(
    identity: &IdentityConfig,
    cfg: &CaSourceConfig,
) -> Result<SharedVerifier, IdentityError> {
    const BUNDLE: &str = "identity.trust_bundle";
    keyproof_identity::filemode::refuse_writable(&identity.trust_bundle, store::BUNDLE_WRITERS)
        .map_err(|e| IdentityError::Invalid {
            key: BUNDLE,
            msg: e.to_string(),
        })?;
    let pem = crate::files::read(&identity.trust_bundle).map_err(|source| IdentityError::Read {
        key: BUNDLE,
        path: identity.trust_bundle.display().to_string(),
        source,
    })?;
    let bundle = TrustBundle::from_pem(&pem).map_err(|e| IdentityError::Invalid {
        key: BUNDLE,
        msg: e.to_string(),
    })?;
    Ok(Arc::new(ArcSwap::from_pointee(SvidVerifier::new(
        cfg.spiffe_id.trust_domain(),
        bundle,
    ))))
}

/// Builds the CA client from the bootstrap bundle and starts the renewer,
/// which installs every identity into `store`; with `token`, every
/// certificate is requested for that key (CSR signed in the token).
/// Errors name the key.
pub fn start(
    identity: &IdentityConfig,
    cfg: &CaSourceConfig,
    store: Arc<IdentityStore>,
    metrics: Metrics,
    usages: Vec<Usage>,
    token: Option<Arc<TokenKey>>,
) -> Result<tokio::task::JoinHandle<()>, IdentityError> {
    let ca_trust = bootstrap_trust(identity, cfg)?;
    let client = CaClient::with_urls(&cfg.urls, ca_trust.clone(), cfg.server_id.clone())
        .map_err(|e| IdentityError::Invalid {
            key: "identity.ca.url",
            msg: e.to_string(),
        })?
        .with_observer(Arc::new(FailoverMetrics {
            metrics: metrics.clone(),
        }));
    let handler = Arc::new(CaIdentity {
        store,
        metrics,
        usages,
        cfg: cfg.clone(),
        ca_trust,
        bootstrap_bundle: identity.trust_bundle.clone(),
        last_bootstrap_read: Mutex::new(None),
        token: token.clone(),
    });
    let source = match &token {
        Some(t) => KeySource::Pkcs11(t.key().clone()),
        None => KeySource::Fresh,
    };
    tracing::info!(
        urls = %cfg.urls.join(", "),
        spiffe_id = %cfg.spiffe_id,
        credential = cfg.credential_key(),
        credential_file = %cfg.credential.path().display(),
        key = %token.as_ref().map_or_else(|| "memory".to_owned(), |t| t.key().uri()),
        "obtaining the identity from the CA"
    );
    Ok(tokio::spawn(renewer::run_with_key(
        RenewerConfig {
            client,
            spiffe_id: cfg.spiffe_id.clone(),
            key_type: cfg.key_type,
            bootstrap: cfg.credential.clone(),
            bundle_refresh: cfg.bundle_refresh,
        },
        source,
        handler,
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::time::Duration;

    use keyproof_ca::renewer::FailureKind;

    use super::*;
    use crate::config::{Config, IdentitySource};
    use crate::identity::store::test_pki::{Pki, BOTH};
    use crate::metrics::{sample, RENEWAL_RESULTS};

    const TD: &str = "renew.keyproof.test";
    const API: &str = "/ns/demo/sa/api";
    const WEB: &str = "/ns/demo/sa/web";

    /// `[identity.ca]` for API, with the bootstrap bundle and join token in
    /// `dir` and the CA at `url`.
    fn ca_config(dir: &Path, url: &str) -> (IdentityConfig, CaSourceConfig) {
        let text = format!(
            "[identity]\ntrust_bundle = {:?}\n[identity.ca]\nurl = \"{url}\"\nspiffe_id = \"spiffe://{TD}{API}\"\njoin_token_file = {:?}\n[outbound]\nlisten = \"127.0.0.1:1\"\n",
            dir.join("bundle.pem"),
            dir.join("token"),
        );
        let identity = Config::parse(&text).expect("config").identity;
        let IdentitySource::Ca(ca) = identity.source.clone() else {
            panic!("not [identity.ca]")
        };
        (identity, ca)
    }

    fn handler(pki: &Pki, dir: &Path) -> (CaIdentity, Arc<IdentityStore>, Metrics) {
        std::fs::write(dir.join("bundle.pem"), pki.bundle_pem()).expect("bundle");
        let (identity, cfg) = ca_config(dir, "https://127.0.0.1:1");
        let store = IdentityStore::empty();
        let metrics = Metrics::new().expect("metrics");
        let ca_trust = bootstrap_trust(&identity, &cfg).expect("bootstrap trust");
        (
            CaIdentity {
                store: store.clone(),
                metrics: metrics.clone(),
                usages: BOTH.to_vec(),
                cfg,
                ca_trust,
                bootstrap_bundle: identity.trust_bundle.clone(),
                last_bootstrap_read: Mutex::new(None),
                token: None,
            },
            store,
            metrics,
        )
    }

    fn new_identity(pki: &Pki, path: &str, bundle: Vec<CertificateDer<'static>>) -> NewIdentity {
        let s = pki.issue(path);
        NewIdentity {
            chain: s.chain,
            key: IssuedKey::Memory(s.key),
            bundle,
            not_after: 0,
            spiffe_sequence: Some(4),
            ca_endpoint: None,
        }
    }

    /// The trust bundle gauges of `TD` in a scrape: (roots, sequence).
    fn bundle_gauges(metrics: &Metrics) -> (Option<f64>, Option<f64>) {
        let text = String::from_utf8(metrics.render()).expect("UTF-8");
        let gauge = |name| sample(&text, name, &[("trust_domain", TD)]);
        (
            gauge("keyproof_trust_bundle_roots"),
            gauge("keyproof_trust_bundle_sequence"),
        )
    }

    fn renewals(metrics: &Metrics, result: &str) -> f64 {
        let text = String::from_utf8(metrics.render()).expect("UTF-8");
        sample(
            &text,
            "keyproof_identity_renewals_total",
            &[("result", result)],
        )
        .expect("every renewal result is exported")
    }

    #[test]
    fn the_bootstrap_trust_is_the_bundle_file_for_the_trust_domain_of_the_id() {
        let pki = Pki::shared(TD);
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("bundle.pem"), pki.bundle_pem()).expect("bundle");
        let (identity, cfg) = ca_config(dir.path(), "https://ca.svc:8443");
        let trust = bootstrap_trust(&identity, &cfg).expect("trust");
        let v = trust.load();
        assert_eq!(v.trust_domain().as_str(), TD);
        assert_eq!(v.bundle().roots(), pki.roots().as_slice());
    }

    #[test]
    fn a_bad_bootstrap_bundle_names_identity_trust_bundle() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (identity, cfg) = ca_config(dir.path(), "https://ca.svc:8443");
        match bootstrap_trust(&identity, &cfg).unwrap_err() {
            IdentityError::Read { key, path, .. } => {
                assert_eq!(key, "identity.trust_bundle");
                assert!(path.ends_with("bundle.pem"), "{path}");
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(dir.path().join("bundle.pem"), "not PEM").expect("write");
        let e = bootstrap_trust(&identity, &cfg).unwrap_err();
        assert!(
            matches!(
                e,
                IdentityError::Invalid {
                    key: "identity.trust_bundle",
                    ..
                }
            ),
            "{e:?}"
        );
        let metrics = Metrics::new().expect("metrics");
        let e = start(
            &identity,
            &cfg,
            IdentityStore::empty(),
            metrics,
            BOTH.to_vec(),
            None,
        )
        .map(|_| ())
        .unwrap_err();
        assert!(e.to_string().starts_with("identity.trust_bundle"), "{e}");
    }

    #[test]
    fn an_issued_identity_is_installed_and_the_ca_is_then_trusted_by_its_bundle() {
        let pki = Pki::shared(TD);
        let next_root = Pki::new(TD);
        let dir = tempfile::tempdir().expect("temp dir");
        let (h, store, metrics) = handler(pki, dir.path());
        assert!(h.current().is_none());
        let bundle = [pki.roots(), next_root.roots()].concat();
        h.install(new_identity(pki, API, bundle.clone()))
            .expect("installed");
        let held = store.current();
        assert_eq!(held.id, pki.id(API));
        assert!(Arc::ptr_eq(&h.current().expect("current"), &held.certified));
        assert_eq!(h.ca_trust.load().bundle().roots(), bundle.as_slice());
        assert_eq!(metrics.cert_expiry.get(), held.not_after as f64);
        // The bundle as the CA stated it, sequence included.
        assert_eq!(bundle_gauges(&metrics), (Some(2.0), Some(4.0)));
        assert_eq!(held.bundle_sequence, Some(4));
        // Counting is the renewer's event's job, not install's.
        assert_eq!(renewals(&metrics, "ok"), 0.0);
    }

    #[test]
    fn an_issued_identity_that_fails_the_checks_is_refused_with_its_reason() {
        let pki = Pki::shared(TD);
        let dir = tempfile::tempdir().expect("temp dir");
        let (h, store, _) = handler(pki, dir.path());
        let before = h.ca_trust.load_full();
        let other = Pki::shared("other.keyproof.test");
        for (id, want) in [
            (new_identity(pki, WEB, pki.roots()), "(id_changed)"),
            (
                new_identity(other, API, other.roots()),
                "(foreign_trust_domain)",
            ),
            (
                new_identity(&Pki::new(TD), API, pki.roots()),
                "(unknown_ca)",
            ),
        ] {
            let e = h.install(id).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
            assert!(store.get().is_none(), "{want}: installed anyway");
            assert!(Arc::ptr_eq(&h.ca_trust.load_full(), &before), "{want}");
        }
    }

    #[test]
    fn a_refreshed_bundle_must_still_trust_our_certificate() {
        let pki = Pki::shared(TD);
        let next_root = Pki::new(TD);
        let dir = tempfile::tempdir().expect("temp dir");
        let (h, store, _) = handler(pki, dir.path());
        let e = h.install_bundle(pki.roots()).unwrap_err();
        assert!(e.contains("no identity"), "{e}");

        h.install(new_identity(pki, API, pki.roots()))
            .expect("installed");
        let held = store.current();
        // Only the new root: our own leaf would not verify; kept as is.
        let e = h.install_bundle(next_root.roots()).unwrap_err();
        assert!(e.contains("(unknown_ca)"), "{e}");
        assert!(Arc::ptr_eq(&store.current(), &held));
        assert_eq!(h.ca_trust.load().bundle().roots(), pki.roots().as_slice());

        // Both roots: same certificate, wider trust, for peers and the CA.
        let both = [pki.roots(), next_root.roots()].concat();
        h.install_bundle_with_sequence(both.clone(), Some(5))
            .expect("bundle");
        let now = store.current();
        assert_eq!(now.certified.cert, held.certified.cert);
        assert_eq!(now.verifier.bundle().roots(), both.as_slice());
        assert_eq!(h.ca_trust.load().bundle().roots(), both.as_slice());
        assert_eq!(now.bundle_sequence, Some(5));
        assert_eq!(bundle_gauges(&h.metrics), (Some(2.0), Some(5.0)));
        // Without a stated sequence (a CA answering PEM), none is exported.
        h.install_bundle(both).expect("bundle");
        assert_eq!(store.current().bundle_sequence, None);
        assert_eq!(bundle_gauges(&h.metrics).1, None);
    }

    /// A compile-time check that `kinds` below lists every failure.
    fn _every_failure_kind(k: FailureKind) {
        match k {
            FailureKind::CaUnreachable
            | FailureKind::CaRefused
            | FailureKind::Protocol
            | FailureKind::TokenUnreadable
            | FailureKind::Rejected
            | FailureKind::ClientCertRejected
            | FailureKind::KeyUnavailable => {}
        }
    }

    #[test]
    fn renewer_events_are_counted_under_the_renewal_results() {
        let pki = Pki::shared(TD);
        let dir = tempfile::tempdir().expect("temp dir");
        let (h, _, metrics) = handler(pki, dir.path());
        for r in RENEWAL_RESULTS {
            assert_eq!(renewals(&metrics, r), 0.0, "{r} not exported at 0");
        }
        let kinds = [
            FailureKind::CaUnreachable,
            FailureKind::CaRefused,
            FailureKind::Protocol,
            FailureKind::TokenUnreadable,
            FailureKind::Rejected,
            FailureKind::ClientCertRejected,
            FailureKind::KeyUnavailable,
        ];
        let mut labels = BTreeSet::from(["ok"]);
        h.event(Event::Renewed {
            how: "renew",
            not_after: 0,
            endpoint: None,
        });
        for kind in kinds {
            h.event(Event::Failed {
                how: "renew",
                kind,
                error: "test",
                retry_in: Duration::from_secs(1),
            });
            labels.insert(kind.as_str());
        }
        h.event(Event::BundleUpdated { roots: 1 });
        assert_eq!(labels, BTreeSet::from(RENEWAL_RESULTS));
        for r in RENEWAL_RESULTS {
            assert_eq!(renewals(&metrics, r), 1.0, "{r}");
        }
        // A refused issuance is counted as `invalid`.
        assert_eq!(FailureKind::Rejected.as_str(), "invalid");
    }

    async fn first_failure(dir: &Path, url: &str, want: &str) {
        let pki = Pki::shared(TD);
        std::fs::write(dir.join("bundle.pem"), pki.bundle_pem()).expect("bundle");
        let (identity, cfg) = ca_config(dir, url);
        let metrics = Metrics::new().expect("metrics");
        let store = IdentityStore::empty();
        let task = start(
            &identity,
            &cfg,
            store.clone(),
            metrics.clone(),
            BOTH.to_vec(),
            None,
        )
        .expect("started");
        let counted = tokio::time::timeout(Duration::from_secs(5), async {
            while renewals(&metrics, want) == 0.0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        task.abort();
        counted.unwrap_or_else(|_| panic!("no {want} counted"));
        assert!(store.get().is_none());
        assert_eq!(renewals(&metrics, "ok"), 0.0);
    }

    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    #[tokio::test]
    async fn a_bootstrap_without_its_join_token_is_token_unreadable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("https://127.0.0.1:{}", closed_port());
        first_failure(dir.path(), &url, "token_unreadable").await;
    }

    #[tokio::test]
    async fn a_bootstrap_with_no_ca_listening_is_ca_unreachable() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("token"), "a-join-token\n").expect("token");
        let url = format!("https://127.0.0.1:{}", closed_port());
        first_failure(dir.path(), &url, "ca_unreachable").await;
    }
}
