//! The upstream rules in use with the upstreams made for them up front,
//! and what a redirected connection routes its requests by.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{OutboundConfig, UpstreamConfig, UpstreamRule};
use crate::identity::store::IdentityStore;
use crate::metrics::Metrics;
use crate::outbound::rules::{Candidates, RuleSet};
use crate::outbound::upstream::{OutboundError, Upstream};

/// What a redirected HTTP connection routes by: its original destination,
/// and the rules whose destination conditions hold for it in the table in
/// use when it was accepted (each request routes by the table in use
/// then, and finds the candidates again after a reload).
pub struct Route {
    /// The rules in use when the connection was accepted.
    pub table: Arc<Table>,
    /// The rules of `table` whose destination conditions hold.
    pub candidates: Candidates,
    /// The original destination.
    pub dst: SocketAddr,
}

/// The upstream rules in use and the upstreams built with them: one per
/// rule that names its address and a fixed identity (the explicit table of
/// before rules had patterns).
pub struct Table {
    rules: RuleSet,
    fixed: Vec<Option<Arc<Upstream>>>,
}

impl Table {
    /// Builds the upstreams of the rules that name a fixed address and
    /// identity; those of `old` with the same address and identity are
    /// kept, with their connections.
    pub fn build(
        rules: Vec<UpstreamRule>,
        cfg: &OutboundConfig,
        store: &Arc<IdentityStore>,
        metrics: &Metrics,
        old: Option<&Table>,
    ) -> Result<Table, OutboundError> {
        let mut fixed = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let Some(address) = r
                .address
                .as_ref()
                .filter(|_| !r.identity.has_placeholders())
            else {
                fixed.push(None);
                continue;
            };
            let kept = old.and_then(|t| {
                t.fixed
                    .iter()
                    .flatten()
                    .find(|u| &u.cfg.address == address && u.cfg.identity == r.identity.fixed)
            });
            let up = match kept {
                Some(u) => u.clone(),
                None => {
                    let u = UpstreamConfig {
                        host: r
                            .host
                            .as_ref()
                            .map_or_else(|| address.clone(), ToString::to_string),
                        address: address.clone(),
                        identity: r.identity.fixed.clone(),
                    };
                    Arc::new(Upstream::new(i, &u, cfg, store, metrics)?)
                }
            };
            fixed.push(Some(up));
        }
        Ok(Table {
            rules: RuleSet::new(rules),
            fixed,
        })
    }

    /// The rules.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// The upstream built for rule `i`, when it names a fixed address and
    /// identity.
    pub fn fixed(&self, i: usize) -> Option<&Arc<Upstream>> {
        self.fixed.get(i).and_then(Option::as_ref)
    }
}
