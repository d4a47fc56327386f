//! The metrics `keyproof-ca serve` exports on its admin listener
//! (`GET /metrics`), in a registry of their own.
//!
//! Every metric and label value is defined here, so that what dashboards and
//! alerts rely on is in one place:
//!
//! - `keyproof_ca_issuances_total{kind,result}`: API calls that ask for a
//!   certificate; `kind` is `renew`, `bootstrap_token` or `bootstrap_sa`,
//!   `result` is `ok`, `refused` (a 4xx answer) or `error` (a 5xx answer).
//! - `keyproof_ca_refusals_total{code}`: every API error answer, by its
//!   stable `error` code (every known code starts at 0).
//! - `keyproof_ca_ledger_commit_seconds`: how long each group commit (one
//!   write and fsync of `ledger.jsonl`, or one PostgreSQL transaction, for
//!   a batch of issuances) took.
//! - `keyproof_ca_certificate_expiry_timestamp_seconds{cert}`: `not_after`
//!   of the `root`, the `intermediate` and the server's own (`server`)
//!   certificate.
//! - `keyproof_ca_certificate_issued_timestamp_seconds{cert}`: `not_before`
//!   of the `root` and the `intermediate`, so that an alert can measure how
//!   much of their lifetime is left (the server certificate always lives
//!   24 h).
//! - `keyproof_ca_bundle_root_expiry_timestamp_seconds{fingerprint,trust_domain}`:
//!   `not_after` of every root in the bundle, by hex SHA-256 of its DER.
//! - `keyproof_ca_bundle_sequence{trust_domain}`: the bundle's
//!   `spiffe_sequence`. `trust_domain` is the bare name
//!   (`prod.example.com`), as on the sidecars' `keyproof_trust_bundle_*`
//!   metrics: sequences of different CAs are not comparable.
//! - `keyproof_ca_ready`: 1 while `GET /ready` would answer 200 (CA loaded,
//!   its intermediate key signing, ledger writable: with `--store`, the
//!   database reachable), 0 otherwise; updated at
//!   every scrape.
//! - `keyproof_ca_rotation_stage{stage}`: 1 for the current root-rotation
//!   stage (`idle`, `prepared`, `activated`), 0 for the others.
//! - `keyproof_ca_jwks_keys`, `keyproof_ca_jwks_reloads_total{result}`:
//!   usable keys in the cluster's JWKS and its re-reads (`ok`, `failed`);
//!   only when ServiceAccount attestation is configured.
//! - `keyproof_ca_key_operations_total{result}`: signatures (issuances,
//!   the server's own certificate, probes) by the intermediate's key when it
//!   is in a PKCS#11 token: `ok`, `failed` (the token was asked and
//!   failed), `unavailable` (not asked: it failed under a second ago).
//! - `keyproof_ca_store_up`, `keyproof_ca_store_errors_total{op}`,
//!   `keyproof_ca_store_generation`: only with `--store` (PostgreSQL).
//!   `store_up` is 1 while the database answers (the last ping, at most a
//!   second old, or the last statement succeeded), 0 otherwise; `errors`
//!   counts failed store operations by `op` ([`STORE_OPS`]);
//!   `generation` is the generation of the CA documents the replica
//!   serves, so that replicas lagging behind a rotation show;
//!   `keyproof_ca_store_state_current` is 0 while the replica keeps
//!   serving its previous state because the store's latest cannot be
//!   loaded yet (typically: a rotated file key has not reached its key
//!   directory), 1 otherwise.
//! - `keyproof_ca_connections_open`: connections open on the API
//!   listener (handshaking, idle or busy; see [`crate::conns`]).
//! - `keyproof_ca_connections_closed_total{reason}`: API connections the
//!   server closed or refused, by [`CONNECTION_CLOSE_REASONS`]: `ended`
//!   (the client closed it, or it failed), `handshake_failed`,
//!   `handshake_timeout`, `idle` (nothing in flight for the idle timeout:
//!   HTTP/2 gets a GOAWAY), `evicted` (to make room at the per-address or
//!   the total bound), `refused_per_ip` and `refused_full` (no room, and
//!   nothing that could give way).
//! - `keyproof_build_info{binary="keyproof-ca",version}`: 1.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::attest::{JwksStatus, SaTokenError};
use crate::ca::RotationStage;

/// Every `kind` of `keyproof_ca_issuances_total`.
pub const ISSUANCE_KINDS: [&str; 3] = ["renew", "bootstrap_token", "bootstrap_sa"];

/// Every `result` of `keyproof_ca_issuances_total`.
pub const ISSUANCE_RESULTS: [&str; 3] = ["ok", "refused", "error"];

/// Every API error code `serve` answers with besides the ServiceAccount
/// token ones ([`SaTokenError::CODES`]); `keyproof_ca_refusals_total` starts
/// each of them at 0 so that alerts can take `rate()` of a code never seen.
pub const API_CODES: [&str; 25] = [
    "bad_request",
    "not_found",
    "method_not_allowed",
    "missing_token",
    "invalid_token",
    "token_expired",
    "token_reused",
    "sa_token_not_accepted",
    "id_mismatch",
    "id_not_allowed",
    "bad_csr",
    "bad_csr_signature",
    "csr_key_type_not_allowed",
    "client_certificate_required",
    "client_certificate_expired",
    "client_certificate_untrusted",
    "certificate_revoked",
    "rate_limited",
    "ca_unavailable",
    "ledger_unavailable",
    "signing_key_unavailable",
    "request_header_too_large",
    "store_unavailable",
    "request_timeout",
    "server_busy",
];

/// Every `op` of `keyproof_ca_store_errors_total`: the store operations
/// `serve` performs.
pub const STORE_OPS: [&str; 5] = [
    "ping",
    "refresh",
    "token_take",
    "token_give_back",
    "ledger_append",
];

/// Every `reason` of `keyproof_ca_connections_closed_total`.
pub const CONNECTION_CLOSE_REASONS: [&str; 7] = [
    "ended",
    "handshake_failed",
    "handshake_timeout",
    "idle",
    "evicted",
    "refused_per_ip",
    "refused_full",
];

/// Every `stage` of `keyproof_ca_rotation_stage`.
pub const ROTATION_STAGES: [&str; 3] = ["idle", "prepared", "activated"];

/// What kind of issuance an API call asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuanceKind {
    /// `POST /v1/renew` with the caller's current SVID.
    Renew,
    /// `POST /v1/bootstrap` with a join token (or no usable credential).
    BootstrapToken,
    /// `POST /v1/bootstrap` with a ServiceAccount token.
    BootstrapSa,
}

impl IssuanceKind {
    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            IssuanceKind::Renew => "renew",
            IssuanceKind::BootstrapToken => "bootstrap_token",
            IssuanceKind::BootstrapSa => "bootstrap_sa",
        }
    }
}

/// What the certificate gauges show, read from the loaded CA.
#[derive(Debug, Clone, Default)]
pub struct CaGauges {
    /// `not_after` of the root, seconds since the epoch.
    pub root_expiry: i64,
    /// `not_after` of the intermediate.
    pub intermediate_expiry: i64,
    /// `not_after` of the server's own certificate.
    pub server_expiry: i64,
    /// `not_before` of the root.
    pub root_issued: i64,
    /// `not_before` of the intermediate.
    pub intermediate_issued: i64,
    /// The CA's trust domain (bare name), the `trust_domain` label.
    pub trust_domain: String,
    /// (hex SHA-256, `not_after`) of every root in the bundle.
    pub bundle_roots: Vec<(String, i64)>,
    /// The bundle's `spiffe_sequence`.
    pub sequence: u64,
    /// The root-rotation stage.
    pub stage: Option<RotationStage>,
}

/// The CA server's metrics.
pub struct CaMetrics {
    registry: Registry,
    issuances: IntCounterVec,
    refusals: IntCounterVec,
    ledger_commit: Histogram,
    cert_expiry: IntGaugeVec,
    cert_issued: IntGaugeVec,
    bundle_root_expiry: IntGaugeVec,
    bundle_sequence: IntGaugeVec,
    ready: IntGauge,
    rotation_stage: IntGaugeVec,
    jwks: Option<(IntGauge, IntCounterVec)>,
    key_operations: IntCounterVec,
    connections_open: IntGauge,
    connections_closed: IntCounterVec,
    store: Option<StoreMetrics>,
}

/// The PostgreSQL store's metrics (see the module doc).
struct StoreMetrics {
    up: IntGauge,
    errors: IntCounterVec,
    generation: IntGauge,
    current: IntGauge,
}

impl CaMetrics {
    /// A new registry with every metric registered and every known label
    /// set at 0. `with_jwks` adds the JWKS metrics (ServiceAccount
    /// attestation configured).
    pub fn new(with_jwks: bool) -> CaMetrics {
        CaMetrics::with(with_jwks, false)
    }

    /// [`CaMetrics::new`], with the store metrics when `with_store`
    /// (`serve --store`).
    pub fn with(with_jwks: bool, with_store: bool) -> CaMetrics {
        let registry = Registry::new();
        let issuances = IntCounterVec::new(
            Opts::new(
                "keyproof_ca_issuances_total",
                "Certificate requests by kind (renew, bootstrap_token, bootstrap_sa) and result (ok, refused: 4xx, error: 5xx)",
            ),
            &["kind", "result"],
        )
        .expect("valid metric");
        for kind in ISSUANCE_KINDS {
            for result in ISSUANCE_RESULTS {
                issuances.with_label_values(&[kind, result]);
            }
        }
        let refusals = IntCounterVec::new(
            Opts::new(
                "keyproof_ca_refusals_total",
                "API error answers by their error code",
            ),
            &["code"],
        )
        .expect("valid metric");
        for code in API_CODES.iter().chain(SaTokenError::CODES.iter()) {
            refusals.with_label_values(&[code]);
        }
        let ledger_commit = Histogram::with_opts(
            HistogramOpts::new(
                "keyproof_ca_ledger_commit_seconds",
                "Duration of each ledger group commit (one write and fsync per batch of issuances)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        let cert_expiry = IntGaugeVec::new(
            Opts::new(
                "keyproof_ca_certificate_expiry_timestamp_seconds",
                "not_after of the CA's root, intermediate and the server's own certificate",
            ),
            &["cert"],
        )
        .expect("valid metric");
        let cert_issued = IntGaugeVec::new(
            Opts::new(
                "keyproof_ca_certificate_issued_timestamp_seconds",
                "not_before of the CA's root and intermediate certificate",
            ),
            &["cert"],
        )
        .expect("valid metric");
        let bundle_root_expiry = IntGaugeVec::new(
            Opts::new(
                "keyproof_ca_bundle_root_expiry_timestamp_seconds",
                "not_after of each root in the trust bundle, by hex SHA-256 fingerprint",
            ),
            &["fingerprint", "trust_domain"],
        )
        .expect("valid metric");
        let bundle_sequence = IntGaugeVec::new(
            Opts::new(
                "keyproof_ca_bundle_sequence",
                "spiffe_sequence of the trust bundle the CA serves, by trust domain",
            ),
            &["trust_domain"],
        )
        .expect("valid metric");
        let ready = IntGauge::new(
            "keyproof_ca_ready",
            "1 while the CA is ready (CA directory loaded, its key signing, ledger writable): what GET /ready answers",
        )
        .expect("valid metric");
        let rotation_stage = IntGaugeVec::new(
            Opts::new(
                "keyproof_ca_rotation_stage",
                "1 for the current root rotation stage (idle, prepared, activated)",
            ),
            &["stage"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "keyproof_build_info",
                "keyproof build information; always 1",
            ),
            &["binary", "version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&["keyproof-ca", env!("CARGO_PKG_VERSION")])
            .set(1);
        let jwks = with_jwks.then(|| {
            let keys = IntGauge::new(
                "keyproof_ca_jwks_keys",
                "Usable keys in the cluster's JWKS for ServiceAccount tokens",
            )
            .expect("valid metric");
            let reloads = IntCounterVec::new(
                Opts::new(
                    "keyproof_ca_jwks_reloads_total",
                    "Re-reads of the cluster's JWKS after it changed, by result (ok, failed)",
                ),
                &["result"],
            )
            .expect("valid metric");
            for r in ["ok", "failed"] {
                reloads.with_label_values(&[r]);
            }
            (keys, reloads)
        });
        let key_operations = IntCounterVec::new(
            Opts::new(
                "keyproof_ca_key_operations_total",
                "Signatures by the intermediate's PKCS#11 token key, by result (ok, failed, unavailable)",
            ),
            &["result"],
        )
        .expect("valid metric");
        for r in ["ok", "failed", "unavailable"] {
            key_operations.with_label_values(&[r]);
        }
        let connections_open = IntGauge::new(
            "keyproof_ca_connections_open",
            "Connections open on the API listener (handshaking, idle or busy)",
        )
        .expect("valid metric");
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "keyproof_ca_connections_closed_total",
                "API connections closed or refused, by reason (ended, handshake_failed, handshake_timeout, idle, evicted, refused_per_ip, refused_full)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for r in CONNECTION_CLOSE_REASONS {
            connections_closed.with_label_values(&[r]);
        }
        for c in [
            Box::new(issuances.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(connections_open.clone()),
            Box::new(connections_closed.clone()),
            Box::new(key_operations.clone()),
            Box::new(refusals.clone()),
            Box::new(ledger_commit.clone()),
            Box::new(cert_expiry.clone()),
            Box::new(cert_issued.clone()),
            Box::new(bundle_root_expiry.clone()),
            Box::new(bundle_sequence.clone()),
            Box::new(ready.clone()),
            Box::new(rotation_stage.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("unique metric");
        }
        if let Some((keys, reloads)) = &jwks {
            registry
                .register(Box::new(keys.clone()))
                .expect("unique metric");
            registry
                .register(Box::new(reloads.clone()))
                .expect("unique metric");
        }
        let store = with_store.then(|| {
            let up = IntGauge::new(
                "keyproof_ca_store_up",
                "1 while the CA's PostgreSQL store answers (last ping at most a second old, or the last statement succeeded)",
            )
            .expect("valid metric");
            let errors = IntCounterVec::new(
                Opts::new(
                    "keyproof_ca_store_errors_total",
                    "Failed operations on the CA's PostgreSQL store, by operation",
                ),
                &["op"],
            )
            .expect("valid metric");
            for op in STORE_OPS {
                errors.with_label_values(&[op]);
            }
            let generation = IntGauge::new(
                "keyproof_ca_store_generation",
                "Generation of the CA documents this replica serves",
            )
            .expect("valid metric");
            let current = IntGauge::new(
                "keyproof_ca_store_state_current",
                "1 while this replica serves the store's latest CA state, 0 while it keeps serving the previous one because the latest cannot be loaded yet",
            )
            .expect("valid metric");
            current.set(1);
            for c in [
                Box::new(up.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(errors.clone()),
                Box::new(generation.clone()),
                Box::new(current.clone()),
            ] {
                registry.register(c).expect("unique metric");
            }
            StoreMetrics {
                up,
                errors,
                generation,
                current,
            }
        });
        CaMetrics {
            registry,
            issuances,
            refusals,
            ledger_commit,
            cert_expiry,
            cert_issued,
            bundle_root_expiry,
            bundle_sequence,
            ready,
            rotation_stage,
            jwks,
            key_operations,
            connections_open,
            connections_closed,
            store,
        }
    }

    /// Sets `keyproof_ca_connections_open`.
    pub fn set_connections_open(&self, n: usize) {
        self.connections_open
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts an API connection closed or refused for `reason` (one of
    /// [`CONNECTION_CLOSE_REASONS`]).
    pub fn connection_closed(&self, reason: &str) {
        self.connections_closed.with_label_values(&[reason]).inc();
    }

    /// Sets `keyproof_ca_store_up`.
    pub fn set_store_up(&self, up: bool) {
        if let Some(s) = &self.store {
            s.up.set(i64::from(up));
        }
    }

    /// Counts a failed store operation (`op` is one of [`STORE_OPS`]).
    pub fn store_error(&self, op: &str) {
        if let Some(s) = &self.store {
            s.errors.with_label_values(&[op]).inc();
        }
    }

    /// The `keyproof_ca_store_errors_total{op}` counter, for the ledger
    /// writer (a detached counter without a store).
    pub fn store_error_counter(&self, op: &str) -> prometheus::IntCounter {
        match &self.store {
            Some(s) => s.errors.with_label_values(&[op]),
            None => {
                prometheus::IntCounter::new("detached", "not registered").expect("valid metric")
            }
        }
    }

    /// Sets `keyproof_ca_store_state_current`.
    pub fn set_store_state_current(&self, current: bool) {
        if let Some(s) = &self.store {
            s.current.set(i64::from(current));
        }
    }

    /// Sets `keyproof_ca_store_generation`.
    pub fn set_store_generation(&self, generation: i64) {
        if let Some(s) = &self.store {
            s.generation.set(generation);
        }
    }

    /// The `keyproof_ca_key_operations_total` counter, for the key's
    /// observer.
    pub fn key_operations(&self) -> IntCounterVec {
        self.key_operations.clone()
    }

    /// Counts an API error answer.
    pub fn refusal(&self, code: &str) {
        self.refusals.with_label_values(&[code]).inc();
    }

    /// Counts the outcome of a certificate request; `status` is the answer's.
    pub fn issuance(&self, kind: IssuanceKind, status: http::StatusCode) {
        let result = if status.is_success() {
            "ok"
        } else if status.is_server_error() {
            "error"
        } else {
            "refused"
        };
        self.issuances
            .with_label_values(&[kind.as_str(), result])
            .inc();
    }

    /// A handle to the ledger commit histogram, for the ledger writer task.
    pub fn ledger_commit(&self) -> Histogram {
        self.ledger_commit.clone()
    }

    /// Sets the certificate, bundle and rotation gauges.
    pub fn set_ca(&self, g: &CaGauges) {
        for (cert, v) in [
            ("root", g.root_expiry),
            ("intermediate", g.intermediate_expiry),
            ("server", g.server_expiry),
        ] {
            self.cert_expiry.with_label_values(&[cert]).set(v);
        }
        for (cert, v) in [
            ("root", g.root_issued),
            ("intermediate", g.intermediate_issued),
        ] {
            self.cert_issued.with_label_values(&[cert]).set(v);
        }
        // A root that left the bundle must leave the metric too.
        self.bundle_root_expiry.reset();
        for (fp, not_after) in &g.bundle_roots {
            self.bundle_root_expiry
                .with_label_values(&[fp, &g.trust_domain])
                .set(*not_after);
        }
        // One series only, even if the directory were swapped for another
        // trust domain's.
        self.bundle_sequence.reset();
        self.bundle_sequence
            .with_label_values(&[&g.trust_domain])
            .set(i64::try_from(g.sequence).unwrap_or(i64::MAX));
        let current = g.stage.map(|s| match s {
            RotationStage::Idle => "idle",
            RotationStage::Prepared => "prepared",
            RotationStage::Activated => "activated",
        });
        for stage in ROTATION_STAGES {
            self.rotation_stage
                .with_label_values(&[stage])
                .set(i64::from(current == Some(stage)));
        }
    }

    /// Sets `keyproof_ca_ready` from what `/ready` would answer now.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Sets the JWKS metrics from the attestor's counters.
    pub fn set_jwks(&self, s: JwksStatus) {
        let Some((keys, reloads)) = &self.jwks else {
            return;
        };
        keys.set(i64::try_from(s.keys).unwrap_or(i64::MAX));
        // The attestor counts; the counters follow its totals.
        for (label, total) in [("ok", s.reloads_ok), ("failed", s.reloads_failed)] {
            let c = reloads.with_label_values(&[label]);
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for metrics this registry accepted.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &CaMetrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn known_labels_start_at_zero_and_count() {
        let m = CaMetrics::new(false);
        let t = text(&m);
        assert!(t.contains("keyproof_ca_refusals_total{code=\"invalid_token\"} 0"));
        assert!(t.contains("keyproof_ca_refusals_total{code=\"sa_token_expired\"} 0"));
        assert!(
            t.contains("keyproof_ca_issuances_total{kind=\"bootstrap_sa\",result=\"refused\"} 0")
        );
        assert!(t.contains(&format!(
            "keyproof_build_info{{binary=\"keyproof-ca\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(!t.contains("keyproof_ca_jwks_keys"));
        m.refusal("invalid_token");
        m.issuance(IssuanceKind::Renew, http::StatusCode::OK);
        m.issuance(IssuanceKind::Renew, http::StatusCode::FORBIDDEN);
        m.issuance(IssuanceKind::Renew, http::StatusCode::SERVICE_UNAVAILABLE);
        m.ledger_commit().observe(0.002);
        let t = text(&m);
        assert!(t.contains("keyproof_ca_refusals_total{code=\"invalid_token\"} 1"));
        for r in ["ok", "refused", "error"] {
            assert!(t.contains(&format!(
                "keyproof_ca_issuances_total{{kind=\"renew\",result=\"{r}\"}} 1"
            )));
        }
        assert!(t.contains("keyproof_ca_ledger_commit_seconds_count 1"));
        assert!(!t.contains("keyproof_ca_store_"), "{t}");
    }

    #[test]
    fn store_metrics_only_with_a_store() {
        let m = CaMetrics::with(false, true);
        let t = text(&m);
        assert!(t.contains("keyproof_ca_store_up 0"), "{t}");
        assert!(t.contains("keyproof_ca_store_errors_total{op=\"ledger_append\"} 0"));
        assert!(t.contains("keyproof_ca_refusals_total{code=\"store_unavailable\"} 0"));
        m.set_store_up(true);
        m.store_error("ping");
        m.set_store_generation(7);
        let t = text(&m);
        assert!(t.contains("keyproof_ca_store_up 1"), "{t}");
        assert!(t.contains("keyproof_ca_store_errors_total{op=\"ping\"} 1"));
        assert!(t.contains("keyproof_ca_store_generation 7"));
    }

    #[test]
    fn gauges_follow_the_ca_and_the_jwks() {
        let m = CaMetrics::new(true);
        m.set_ca(&CaGauges {
            root_expiry: 2000,
            intermediate_expiry: 1500,
            server_expiry: 1000,
            root_issued: 100,
            intermediate_issued: 200,
            trust_domain: "prod.example.com".into(),
            bundle_roots: vec![("aa".into(), 2000), ("bb".into(), 3000)],
            sequence: 2,
            stage: Some(RotationStage::Prepared),
        });
        m.set_ca(&CaGauges {
            root_expiry: 3000,
            intermediate_expiry: 1500,
            server_expiry: 1000,
            root_issued: 150,
            intermediate_issued: 200,
            trust_domain: "prod.example.com".into(),
            bundle_roots: vec![("bb".into(), 3000)],
            sequence: 3,
            stage: Some(RotationStage::Idle),
        });
        let t = text(&m);
        assert!(t.contains("keyproof_ca_certificate_expiry_timestamp_seconds{cert=\"root\"} 3000"));
        assert!(t.contains("keyproof_ca_certificate_issued_timestamp_seconds{cert=\"root\"} 150"));
        assert!(t.contains(
            "keyproof_ca_bundle_root_expiry_timestamp_seconds{fingerprint=\"bb\",trust_domain=\"prod.example.com\"} 3000"
        ), "{t}");
        assert!(!t.contains("fingerprint=\"aa\""), "{t}");
        assert!(
            t.contains("keyproof_ca_bundle_sequence{trust_domain=\"prod.example.com\"} 3"),
            "{t}"
        );
        assert!(t.contains("keyproof_ca_ready 0"), "{t}");
        m.set_ready(true);
        assert!(text(&m).contains("keyproof_ca_ready 1"));
        assert!(t.contains("keyproof_ca_rotation_stage{stage=\"idle\"} 1"));
        assert!(t.contains("keyproof_ca_rotation_stage{stage=\"prepared\"} 0"));
        m.set_jwks(JwksStatus {
            keys: 2,
            reloads_ok: 3,
            reloads_failed: 1,
        });
        m.set_jwks(JwksStatus {
            keys: 1,
            reloads_ok: 4,
            reloads_failed: 1,
        });
        let t = text(&m);
        assert!(t.contains("keyproof_ca_jwks_keys 1"));
        assert!(t.contains("keyproof_ca_jwks_reloads_total{result=\"ok\"} 4"));
        assert!(t.contains("keyproof_ca_jwks_reloads_total{result=\"failed\"} 1"));
    }
}
