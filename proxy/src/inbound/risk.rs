//! Risk rules: per request on a `step_up = "risk"` route, whether the caller
//! must answer a fresh challenge, or is refused.
//!
//! SKELETON: the interface the inbound is written against; the engine
//! (bounded per-identity state, rule evaluation) is filled in separately.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use keyproof_identity::SpiffeId;

use crate::config::{RiskAction, RiskRuleConfig};
use crate::metrics::Metrics;

/// Wall-clock time of a request, in milliseconds since the Unix epoch
/// (rates need better than seconds; `hours` needs the time of day).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Now(pub u64);

impl Now {
    /// The system clock.
    pub fn system() -> Now {
        Now(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0))
    }
}

/// Why a caller's refusal is recorded (all feed `after_failure`;
/// bad handshakes do not feed `failures_above`: a certificate is public, and
/// anyone holding a copy could lock its owner out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A step-up verification refused (bad signature, replay, ...).
    StepUp,
    /// A 403 from the route policy or the deny list.
    Forbidden,
    /// A TLS handshake that presented this identity and failed.
    Handshake,
}

/// The per-identity risk state of the whole process. It outlives policy
/// reloads: failures and lockouts survive them; per-route state (when each
/// caller was last served, request rates) starts again with a new policy,
/// which only ever makes callers "new" again (challenged).
pub struct RiskTable {
    max_identities: usize,
}

impl std::fmt::Debug for RiskTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RiskTable")
            .field("max_identities", &self.max_identities)
            .finish_non_exhaustive()
    }
}

impl RiskTable {
    /// A table of at most `max_identities` callers; registers its metrics.
    pub fn new(
        max_identities: usize,
        metrics: &Metrics,
    ) -> Result<Arc<RiskTable>, prometheus::Error> {
        let _ = metrics;
        Ok(Arc::new(RiskTable { max_identities }))
    }

    /// Records a refusal of `peer`.
    pub fn record_failure(&self, peer: &str, kind: Failure, now: Now) {
        let _ = (peer, kind, now);
    }

    /// Identities currently tracked.
    pub fn tracked(&self) -> usize {
        0
    }
}

/// The outcome of a route's risk rules for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No rule fired.
    Pass,
    /// A `challenge` rule fired (its name; the first listed wins).
    Challenge(Arc<str>),
    /// A `deny` rule fired (its name): 403.
    Deny(Arc<str>),
}

/// One route's compiled risk rules (`risk = [...]`).
pub struct RouteRisk {
    rules: Vec<(Arc<str>, RiskAction)>,
}

impl std::fmt::Debug for RouteRisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteRisk")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl RouteRisk {
    /// Compiles route `route_index` of policy `generation` (a number that
    /// changes with every policy load) with the rules named in `names`, all
    /// of which are in `rules` (the configuration checked that).
    pub fn new(
        table: &Arc<RiskTable>,
        generation: u64,
        route_index: usize,
        route_id: &str,
        names: &[String],
        rules: &[RiskRuleConfig],
        metrics: &Metrics,
    ) -> Result<RouteRisk, prometheus::Error> {
        let _ = (table, generation, route_index, route_id, metrics);
        Ok(RouteRisk {
            rules: names
                .iter()
                .filter_map(|n| rules.iter().find(|r| &r.name == n))
                .map(|r| (Arc::from(r.name.as_str()), r.action))
                .collect(),
        })
    }

    /// Evaluates the rules for one request of `peer` (counting it towards
    /// `rate_above`). `deny` rules are checked first; a deny is counted
    /// (`keyproof_risk_denied_total{route, rule}`).
    pub fn evaluate(&self, peer: &SpiffeId, headers: &HeaderMap, now: Now) -> Verdict {
        let _ = (peer, headers, now);
        Verdict::Pass
    }

    /// Records that `peer` was served on this route (`new_peer`).
    pub fn served(&self, peer: &SpiffeId, now: Now) {
        let _ = (peer, now);
    }

    /// A description of each rule for `check-config`.
    pub fn explain(&self) -> Vec<String> {
        self.rules.iter().map(|(n, _)| n.to_string()).collect()
    }
}

/// Parses `"N/window"` (e.g. `"30/1m"`).
pub fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    crate::config::parse_rate(s)
}
