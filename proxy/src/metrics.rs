//! One Prometheus registry per proxy instance, with the label children the
//! hot path needs resolved up front (a `with_label_values` lookup takes a
//! lock and hashes the labels; a pre-resolved child is a single atomic add).

use keyproof_identity::tls::GROUP_LABELS;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every `result` label of `keyproof_tls_handshakes_total`.
pub const HANDSHAKE_RESULTS: [&str; 12] = [
    "ok",
    "no_client_cert",
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "bad_identity",
    "identity_mismatch",
    "protocol",
    "timeout",
    "possession_failed",
    "bad_key_usage",
    "unsupported_key",
];

/// Index of `protocol` in [`HANDSHAKE_RESULTS`], where unknown results go.
const PROTOCOL: usize = 7;

/// Traffic direction label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Callers into the local app.
    Inbound,
    /// The local app calling out.
    Outbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Pre-resolved per-direction children.
#[derive(Clone)]
pub struct DirectionMetrics {
    handshakes: [IntCounter; HANDSHAKE_RESULTS.len()],
    key_exchanges: [IntCounter; GROUP_LABELS.len()],
    /// `keyproof_connections_open{direction}`.
    pub connections_open: IntGauge,
    /// `keyproof_tls_handshakes_shed_total{direction}`.
    pub handshakes_shed: IntCounter,
    codes: [IntCounter; 5],
    /// `keyproof_request_duration_seconds{direction}`.
    pub duration: Histogram,
    refused: [IntCounter; crate::path::REFUSAL_REASONS.len()],
    /// `keyproof_headers_with_underscores_total{direction,action}`:
    /// dropped, rejected.
    underscores: [IntCounter; 2],
}

impl DirectionMetrics {
    /// Counts one handshake outcome; `result` must be one of
    /// [`HANDSHAKE_RESULTS`] (anything else is counted as `protocol`).
    pub fn handshake(&self, result: &str) {
        let i = HANDSHAKE_RESULTS
            .iter()
            .position(|r| *r == result)
            .unwrap_or(PROTOCOL);
        self.handshakes[i].inc();
    }

    /// Counts a request refused with 400 because its path has no safe
    /// normal form.
    pub fn refused(&self, why: crate::path::PathError) {
        self.refused[why.index()].inc();
    }

    /// Counts the key-exchange group of a completed handshake.
    pub fn key_exchange(&self, group: Option<rustls::NamedGroup>) {
        let label = group.map_or("other", keyproof_identity::tls::group_label);
        let i = GROUP_LABELS
            .iter()
            .position(|g| *g == label)
            .unwrap_or(GROUP_LABELS.len() - 1);
        self.key_exchanges[i].inc();
    }

    /// Counts header fields with `_` in their name that were dropped
    /// (`n` of them), or a request rejected for one.
    pub fn underscores(&self, rejected: bool, n: u64) {
        self.underscores[usize::from(rejected)].inc_by(n);
    }

    /// Counts a finished request by status class and records its duration.
    pub fn request(&self, status: http::StatusCode, seconds: f64) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.codes[class].inc();
        self.duration.observe(seconds);
    }
}

/// The proxy's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Inbound children.
    pub inbound: DirectionMetrics,
    /// Outbound children.
    pub outbound: DirectionMetrics,
    authz_denied: IntCounterVec,
    /// `keyproof_identity_cert_expiry_timestamp_seconds`.
    pub cert_expiry: Gauge,
    /// `keyproof_identity_cert_issued_timestamp_seconds`.
    pub cert_issued: Gauge,
    reloads: IntCounterVec,
    renewals: IntCounterVec,
    sig_cache: [IntCounter; 2],
    sig_cache_sync: std::sync::Arc<std::sync::Mutex<()>>,
}

const CODES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let handshakes = IntCounterVec::new(
            Opts::new(
                "keyproof_tls_handshakes_total",
                "TLS handshakes by direction and result.",
            ),
            &["direction", "result"],
        )?;
        // A counter of its own rather than a `group` label on
        // keyproof_tls_handshakes_total: that metric is a contract of rules,
        // dashboards and tests, a new label would change what every query
        // without `sum by` aggregates, and failed handshakes have no group.
        let key_exchanges = IntCounterVec::new(
            Opts::new(
                "keyproof_tls_key_exchange_total",
                "Completed TLS handshakes by direction and negotiated key-exchange group \
                 (x25519mlkem768 is the post-quantum hybrid).",
            ),
            &["direction", "group"],
        )?;
        let open = IntGaugeVec::new(
            Opts::new(
                "keyproof_connections_open",
                "Connections currently open, by direction.",
            ),
            &["direction"],
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "keyproof_tls_handshakes_shed_total",
                "Pending TLS handshakes closed to make room for a newer one, because \
                 max_handshakes were in progress, by direction.",
            ),
            &["direction"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "keyproof_requests_total",
                "Requests answered, by direction and status class.",
            ),
            &["direction", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "keyproof_request_duration_seconds",
                "Time from request head to response head, by direction.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["direction"],
        )?;
        let underscores = IntCounterVec::new(
            Opts::new(
                "keyproof_headers_with_underscores_total",
                "Header fields with '_' in their name dropped, or requests rejected for one \
                 (inbound.headers_with_underscores); owned fields in disguise are not counted.",
            ),
            &["direction", "action"],
        )?;
        registry.register(Box::new(underscores.clone()))?;
        let authz_denied = IntCounterVec::new(
            Opts::new(
                "keyproof_authz_denied_total",
                "Inbound requests refused by route policy, by route path_prefix (or default).",
            ),
            &["route"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "keyproof_http_requests_refused_total",
                "Requests refused with 400 before any route decision, by direction and \
                 reason (a path with no safe normal form: encoded_slash, backslash, \
                 encoded_control, bad_percent_encoding, above_root, not_absolute, \
                 semicolon, invalid_character).",
            ),
            &["direction", "reason"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        let cert_expiry = Gauge::new(
            "keyproof_identity_cert_expiry_timestamp_seconds",
            "notAfter of the workload certificate in use, seconds since the epoch.",
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(key_exchanges.clone()))?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(authz_denied.clone()))?;
        registry.register(Box::new(cert_expiry.clone()))?;
        let cert_issued = Gauge::new(
            "keyproof_identity_cert_issued_timestamp_seconds",
            "notBefore of the workload certificate in use, seconds since the epoch.",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "keyproof_identity_reloads_total",
                "[identity.files] changes seen, by result: ok (in use) or why they were refused.",
            ),
            &["result"],
        )?;
        let renewals = IntCounterVec::new(
            Opts::new(
                "keyproof_identity_renewals_total",
                "[identity.ca] bootstraps and renewals, by result.",
            ),
            &["result"],
        )?;
        // Every label at 0 from the start, so increase() sees the first event.
        for r in crate::identity::RELOAD_RESULTS {
            reloads.with_label_values(&[r]);
        }
        for r in crate::ca_identity::RENEWAL_RESULTS {
            renewals.with_label_values(&[r]);
        }
        let sig_cache = IntCounterVec::new(
            Opts::new(
                "keyproof_tls_chain_signature_cache_total",
                "Certificate-chain signatures checked (peer chains in handshakes, both \
                 directions, and the proxy's own chain when it loads an identity), by \
                 result: hit (these exact bytes already verified under this key) or miss \
                 (verified now). Proof-of-possession signatures never use the cache.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(cert_issued.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(renewals.clone()))?;
        registry.register(Box::new(sig_cache.clone()))?;
        let dir = |d: Direction| DirectionMetrics {
            handshakes: HANDSHAKE_RESULTS.map(|r| handshakes.with_label_values(&[d.as_str(), r])),
            key_exchanges: GROUP_LABELS.map(|g| key_exchanges.with_label_values(&[d.as_str(), g])),
            connections_open: open.with_label_values(&[d.as_str()]),
            handshakes_shed: shed.with_label_values(&[d.as_str()]),
            codes: CODES.map(|c| requests.with_label_values(&[d.as_str(), c])),
            duration: duration.with_label_values(&[d.as_str()]),
            refused: crate::path::REFUSAL_REASONS
                .map(|r| refused.with_label_values(&[d.as_str(), r])),
            underscores: ["dropped", "rejected"]
                .map(|a| underscores.with_label_values(&[d.as_str(), a])),
        };
        Ok(Metrics {
            inbound: dir(Direction::Inbound),
            outbound: dir(Direction::Outbound),
            registry,
            authz_denied,
            cert_expiry,
            cert_issued,
            reloads,
            renewals,
            sig_cache: ["hit", "miss"].map(|r| sig_cache.with_label_values(&[r])),
            sig_cache_sync: Default::default(),
        })
    }

    /// Brings the signature-cache counters up to the process-wide cache's
    /// own counts (it lives in `keyproof-ca`, which has no registry).
    fn sync_sig_cache(&self) {
        let _one_at_a_time = self
            .sig_cache_sync
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let stats = keyproof_identity::sigcache::SigCache::global().stats();
        for (counter, total) in self.sig_cache.iter().zip([stats.hits, stats.misses]) {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Counts one `[identity.files]` reload outcome.
    pub fn reload(&self, result: &str) {
        self.reloads.with_label_values(&[result]).inc();
    }

    /// Counts one `[identity.ca]` issuance outcome.
    pub fn renewal(&self, result: &str) {
        self.renewals.with_label_values(&[result]).inc();
    }

    /// Sets the certificate gauges for the identity now in use.
    pub fn identity_installed(&self, identity: &crate::identity::Identity) {
        self.cert_expiry.set(identity.not_after as f64);
        self.cert_issued.set(identity.not_before as f64);
    }

    /// Children for one direction.
    pub fn direction(&self, d: Direction) -> &DirectionMetrics {
        match d {
            Direction::Inbound => &self.inbound,
            Direction::Outbound => &self.outbound,
        }
    }

    /// A child of `keyproof_authz_denied_total`, resolved once per route at
    /// startup.
    pub fn authz_denied(&self, route: &str) -> IntCounter {
        self.authz_denied.with_label_values(&[route])
    }

    /// Registers an extra collector (the step-up verifier's metrics).
    pub fn register(
        &self,
        c: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(c)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        self.sync_sig_cache();
        let mut buf = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail on I/O; a collector error would
        // only drop that family.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}
