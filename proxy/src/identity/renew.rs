//! `[identity.ca]`: the workload identity comes from `keyproof-ca serve`.
//!
//! [`keyproof_ca::renewer`] does the protocol (bootstrap with the join token,
//! renewal at two thirds of the life with jitter, backoff, bundle refresh);
//! this module is its [`Handler`]: it turns each issued chain, in-memory key
//! and bundle into an [`Identity`] with the same checks as file-based
//! material, swaps it into the [`IdentityStore`], keeps the verifier that
//! authenticates the CA server on the newest bundle, and counts renewals.
//!
//! `[identity] trust_bundle` is only the bootstrap trust for reaching the CA;
//! from the first issuance on, the bundle the CA hands out is authoritative
//! (it arrives over a connection authenticated with the previous one).

use std::sync::Arc;

use arc_swap::ArcSwap;
use keyproof_ca::client::CaClient;
use keyproof_ca::renewer::{self, Event, Handler, NewIdentity, RenewerConfig};
use keyproof_identity::tls::SharedVerifier;
use keyproof_identity::{SvidVerifier, TrustBundle, Usage};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;

use crate::config::{CaSourceConfig, IdentityConfig};
use crate::identity::store::{Identity, IdentityError, IdentityStore, MaterialError};
use crate::metrics::Metrics;

/// The renewer's handler: installs identities into the store.
pub struct CaIdentity {
    store: Arc<IdentityStore>,
    metrics: Metrics,
    usages: Vec<Usage>,
    cfg: CaSourceConfig,
    /// Authenticates the CA server; follows the newest bundle.
    ca_trust: SharedVerifier,
}

impl CaIdentity {
    fn refuse(&self, e: MaterialError) -> String {
        format!("issued identity refused ({}): {e}", e.reason())
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

impl Handler for CaIdentity {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.store.get().map(|i| i.certified.clone())
    }

    fn install(&self, id: NewIdentity) -> Result<(), String> {
        let next = Identity::from_parts(
            id.chain,
            id.key,
            id.bundle,
            &self.usages,
            Some(&self.cfg.spiffe_id),
        )
        .map_err(|e| self.refuse(e))?;
        self.trust_ca(&next);
        self.store
            .install(next, &self.metrics, "certificate issued by the CA");
        Ok(())
    }

    fn install_bundle(&self, bundle: Vec<CertificateDer<'static>>) -> Result<(), String> {
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
        self.trust_ca(&next);
        tracing::info!(
            trust_roots = next.roots.len(),
            "trust bundle refreshed from the CA"
        );
        self.store.replace(next);
        Ok(())
    }

    fn event(&self, e: Event<'_>) {
        match e {
            Event::Renewed { how, not_after } => {
                self.metrics.renewal("ok");
                tracing::debug!(how, not_after, "identity renewed");
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
                    url = %self.cfg.url,
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
    let pem = std::fs::read(&identity.trust_bundle).map_err(|source| IdentityError::Read {
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
/// which installs every identity into `store`. Errors name the key.
pub fn start(
    identity: &IdentityConfig,
    cfg: &CaSourceConfig,
    store: Arc<IdentityStore>,
    metrics: Metrics,
    usages: Vec<Usage>,
) -> Result<tokio::task::JoinHandle<()>, IdentityError> {
    let ca_trust = bootstrap_trust(identity, cfg)?;
    let client = CaClient::new(&cfg.url, ca_trust.clone(), cfg.server_id.clone()).map_err(|e| {
        IdentityError::Invalid {
            key: "identity.ca.url",
            msg: e.to_string(),
        }
    })?;
    let handler = Arc::new(CaIdentity {
        store,
        metrics,
        usages,
        cfg: cfg.clone(),
        ca_trust,
    });
    tracing::info!(url = %cfg.url, spiffe_id = %cfg.spiffe_id, "obtaining the identity from the CA");
    Ok(tokio::spawn(renewer::run(
        RenewerConfig {
            client,
            spiffe_id: cfg.spiffe_id.clone(),
            key_type: cfg.key_type,
            join_token_file: cfg.join_token_file.clone(),
            bundle_refresh: cfg.bundle_refresh,
        },
        handler,
    )))
}
