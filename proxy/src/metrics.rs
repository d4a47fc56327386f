//! One Prometheus registry per proxy instance, with the label children the
//! hot path needs resolved up front (a `with_label_values` lookup takes a
//! lock and hashes the labels; a pre-resolved child is a single atomic add).
//!
//! Every metric and every label list is defined here, so that the names and
//! labels a dashboard or alert relies on are in one place (and
//! `tests/deploy_checks.rs` can hold the deploy files to them).

use std::collections::HashMap;

use keyproof_identity::tls::GROUP_LABELS;
use keyproof_stepup::Outcome;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every `result` label of `keyproof_identity_reloads_total`.
pub const RELOAD_RESULTS: [&str; 9] = [
    "ok",
    "unreadable",
    "invalid",
    "key_mismatch",
    "expired",
    "not_yet_valid",
    "unknown_ca",
    "foreign_trust_domain",
    "id_changed",
];

/// Every `op` label of `keyproof_identity_ca_failovers_total`.
pub const CA_FAILOVER_OPS: [&str; 3] = ["bootstrap", "renew", "bundle"];

/// Every `result` label of `keyproof_identity_renewals_total`.
pub const RENEWAL_RESULTS: [&str; 8] = [
    "ok",
    // The CA could not be reached (network, TLS, timeout).
    "ca_unreachable",
    // The CA answered with an error (token, rate limit, id mismatch...).
    "ca_refused",
    // The CA's answer was malformed.
    "protocol",
    // The issued certificate or bundle failed the proxy's own checks.
    "invalid",
    // The credential file could not be read, is empty or holds more than
    // one token (bootstrap only).
    "token_unreadable",
    // The CA rejected the client certificate in the TLS handshake (its
    // root is no longer trusted); a ServiceAccount sidecar bootstraps again.
    "client_cert_rejected",
    // The PKCS#11 token holding the workload key could not sign the CSR.
    "key_unavailable",
];

/// Every `side` label of `keyproof_http2_flood_closed_total`, in
/// [`crate::http::frame_guard::Side`] order: `server` (a connection the
/// proxy serves: inbound callers, the outbound's local app), `client` (the
/// outbound's mesh connection to an upstream).
pub const FLOOD_SIDES: [crate::http::frame_guard::Side; 2] = [
    crate::http::frame_guard::Side::Server,
    crate::http::frame_guard::Side::Client,
];

/// Every `location` label of `keyproof_identity_key_location`: where the
/// workload key lives.
pub const KEY_LOCATIONS: [&str; 3] = ["file", "memory", "pkcs11"];

/// Every `result` label of `keyproof_identity_key_operations_total`: the
/// token signed, failed (or could not be reopened), or was not asked
/// because it failed less than a second ago.
pub const KEY_OPERATION_RESULTS: [&str; 3] = ["ok", "failed", "unavailable"];

/// Every `result` label of `keyproof_tls_handshakes_total`.
pub const HANDSHAKE_RESULTS: [&str; 15] = [
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
    // Ours, not the peer's: the token holding our key could not sign.
    "key_unavailable",
    // Under a root of the bundle, but not a valid path (a path length, an
    // unknown critical extension, a name constraint).
    "bad_chain",
    // The peer refused our certificate with an alert: inbound, during the
    // handshake; outbound, after it completed here (an alert on the first
    // read), counted besides its `ok`.
    "refused_by_peer",
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
    refused: [IntCounter; crate::http::path::REFUSAL_REASONS.len()],
    /// `keyproof_headers_with_underscores_total{direction,action}`:
    /// dropped, rejected.
    underscores: [IntCounter; 2],
    retries: [IntCounter; RETRY_REASONS.len()],
}

/// Why a request was sent again, in the order of the
/// `keyproof_requests_retried_total` children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The peer refused the stream unprocessed (HTTP/2 `REFUSED_STREAM`,
    /// RFC 9113 section 8.7): out of memory or streams for now.
    RefusedStream,
    /// The connection was closing (GOAWAY) before the request went out,
    /// or its GOAWAY left the request's stream out (RFC 9113 section 6.8).
    ConnectionClosing,
}

/// The `reason` label values of `keyproof_requests_retried_total`.
pub const RETRY_REASONS: [&str; 2] = ["refused_stream", "connection_closing"];

impl DirectionMetrics {
    /// Counts a request sent again, unseen by the peer's app the first time.
    pub fn retried(&self, why: Retry) {
        self.retries[why as usize].inc();
    }

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
    pub fn refused(&self, why: crate::http::path::PathError) {
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
    /// Both certificate gauges are registered with the first identity
    /// installed: before it (an `[identity.ca]` sidecar waiting for the
    /// CA) a 0 would read as a certificate that expired in 1970, and page
    /// as one.
    cert_registered: std::sync::Arc<std::sync::Once>,
    reloads: IntCounterVec,
    renewals: IntCounterVec,
    ca_failovers: IntCounterVec,
    ca_endpoint: IntGaugeVec,
    /// `keyproof_identity_key_location`, one child per [`KEY_LOCATIONS`].
    key_location: [IntGauge; 3],
    /// `keyproof_identity_key_operations_total`, one child per
    /// [`KEY_OPERATION_RESULTS`].
    key_operations: [IntCounter; 3],
    policy_reloads: [IntCounter; 2],
    upstream_reloads: [IntCounter; 2],
    /// `keyproof_policy_generation`: 0 for the policy read at startup, one
    /// more for each file change taken into use.
    pub policy_generation: IntGauge,
    /// `keyproof_policy_closed_connections_total`: inbound connections
    /// closed because a policy change put their caller on the deny list.
    pub policy_closed: IntCounter,
    /// `keyproof_admin_connections_shed_total`: admin connections closed
    /// to make room for a newer one ([`crate::admin::MAX_CONNECTIONS`]).
    pub admin_shed: IntCounter,
    /// `keyproof_audit_records_total` by result, in [`AUDIT_RESULTS`] order.
    pub audit_records: [IntCounter; 3],
    sig_cache: [IntCounter; 2],
    sig_cache_sync: std::sync::Arc<std::sync::Mutex<()>>,
    /// `keyproof_http2_flood_closed_total`, one child per
    /// [`FLOOD_SIDES`], brought up to the process-wide counts at render.
    flood_closed: [IntCounter; 2],
    bundle: TrustBundleMetrics,
    /// Opaque TCP carried over the mesh.
    pub tcp: TcpMetrics,
    /// The memory budget (`memory.rs`).
    pub memory: MemoryMetrics,
}

/// `keyproof_memory_*`: what the process holds, its limit, and the
/// connections closed to stay under it (`memory.rs`).
#[derive(Clone)]
pub struct MemoryMetrics {
    heap: IntGauge,
    resident: IntGauge,
    limit: IntGauge,
    registry: Registry,
    /// `keyproof_memory_shed_connections_total`.
    pub shed: IntCounter,
    /// `keyproof_memory_refused_requests_total`.
    pub refused: IntCounter,
}

impl MemoryMetrics {
    /// Sets the heap gauge, in bytes.
    pub fn set_heap(&self, bytes: u64) {
        self.heap.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Sets the resident gauge, in bytes.
    pub fn set_resident(&self, bytes: u64) {
        self.resident.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Exports the limit in use. Without one there is no series: a 0 would
    /// make `heap / limit` read as infinitely over.
    pub fn limit(&self, bytes: u64) {
        self.limit.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        if let Err(e) = self.registry.register(Box::new(self.limit.clone())) {
            tracing::debug!(error = %e, "memory limit gauge registered already");
        }
    }
}

/// Results of `keyproof_tcp_connections_total`, one child each per
/// direction, created at startup so that dashboards see zeros:
/// - `ok`: the tunnel was set up (outbound: the peer accepted the CONNECT;
///   inbound: the app accepted the connection);
/// - `denied`: no `[[inbound.tcp]]` rule for the port, or the caller is not
///   allowed by it (inbound), or the peer refused the tunnel (outbound);
/// - `unmeshed_denied`: an outbound destination outside the mesh with
///   `unmeshed = "deny"`;
/// - `passthrough`: an outbound destination outside the mesh, connected to
///   directly without TLS;
/// - `failed`: the mesh connection, the CONNECT or the app connection
///   failed;
/// - `limited`: a tunnel refused (503) because `[inbound] max_tunnels` or
///   `max_tunnels_per_peer` tunnels were open already (inbound: refused
///   here; outbound: the peer answered so);
/// - `loop`: a redirected connection that was the outbound's own dial (the
///   sidecar's uid is not the one `redirect --proxy-uid` exempts), refused;
/// - `revoked`: a tunnel or switched connection that a policy change
///   (`policy_file`: a deny-list entry, a narrowed `allow`) no longer
///   allows: reset if open, 403 if still being set up (inbound).
pub const TCP_RESULTS: [&str; 8] = [
    "ok",
    "denied",
    "unmeshed_denied",
    "passthrough",
    "failed",
    "limited",
    "loop",
    "revoked",
];

/// `keyproof_tcp_*`: opaque TCP connections over the mesh (HTTP/2 CONNECT
/// streams), by direction.
#[derive(Clone)]
pub struct TcpMetrics {
    connections: IntCounterVec,
    bytes: IntCounterVec,
}

impl TcpMetrics {
    /// Counts one TCP connection's outcome; `result` is one of
    /// [`TCP_RESULTS`].
    pub fn connection(&self, direction: Direction, result: &'static str) {
        debug_assert!(TCP_RESULTS.contains(&result), "unknown TCP result {result}");
        self.connections
            .with_label_values(&[direction.as_str(), result])
            .inc();
    }

    /// Adds the bytes a finished (or failed) tunnel carried: from the
    /// connecting client towards the server, and back.
    pub fn bytes(&self, direction: Direction, client_to_server: u64, server_to_client: u64) {
        let d = direction.as_str();
        self.bytes
            .with_label_values(&[d, "client_to_server"])
            .inc_by(client_to_server);
        self.bytes
            .with_label_values(&[d, "server_to_client"])
            .inc_by(server_to_client);
    }
}

/// `keyproof_trust_bundle_*`: what the trust bundle in use holds, so that a
/// root rotation can be followed converging across a fleet. Every series
/// carries the bare `trust_domain` name (e.g. `prod.example.com`), so that
/// one Prometheus watching several trust domains compares each CA's
/// sequence only with its own sidecars'.
#[derive(Clone)]
struct TrustBundleMetrics {
    /// Label `trust_domain`; no series before a bundle is installed.
    roots: IntGaugeVec,
    /// Labels `trust_domain`, `fingerprint`.
    root_expiry: GaugeVec,
    /// Label `trust_domain`; a child exists only while the CA has stated a
    /// sequence, so `[identity.files]` exports no series at all rather
    /// than a 0.
    sequence: IntGaugeVec,
    /// The trust domain and fingerprints exported now, so that roots which
    /// left the bundle lose their series (the lock also keeps two installs
    /// from interleaving their updates).
    exported: std::sync::Arc<std::sync::Mutex<(String, Vec<String>)>>,
}

/// A root of the trust bundle in use, as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRoot {
    /// SHA-256 of the root's DER, hex (the `fingerprint` label).
    pub fingerprint: String,
    /// notAfter, seconds since the epoch.
    pub not_after: i64,
}

/// The `result` labels of `keyproof_audit_records_total`.
pub const AUDIT_RESULTS: [&str; 3] = ["written", "dropped", "failed"];

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
        let retries = IntCounterVec::new(
            Opts::new(
                "keyproof_requests_retried_total",
                "Requests sent again because the peer had not processed them: it refused the \
                 stream (REFUSED_STREAM) or its connection was closing.",
            ),
            &["direction", "reason"],
        )?;
        registry.register(Box::new(retries.clone()))?;
        let authz_denied = IntCounterVec::new(
            Opts::new(
                "keyproof_authz_denied_total",
                "Inbound requests refused by route policy, by route path_prefix (or default; own_port and not_http_port for redirected connections to a port of the sidecar itself or not in http_ports).",
            ),
            &["route"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "keyproof_http_requests_refused_total",
                "Requests refused with 400 before any route decision, by direction and \
                 reason (a path with no safe normal form: encoded_slash, backslash, \
                 encoded_control, bad_percent_encoding, above_root, not_absolute, \
                 semicolon, invalid_character, encoded_delimiter, double_encoded).",
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
        let ca_failovers = IntCounterVec::new(
            Opts::new(
                "keyproof_identity_ca_failovers_total",
                "[identity.ca] calls that moved on to the next CA endpoint because one could \
                 not be reached or answered a server error (5xx), by op: bootstrap, renew or \
                 bundle. A failover that then succeeded is no failed renewal.",
            ),
            &["op"],
        )?;
        let ca_endpoint = IntGaugeVec::new(
            Opts::new(
                "keyproof_identity_ca_endpoint",
                "1 for the [identity.ca] endpoint (configured URL, and the address it resolved \
                 to) that issued the certificate in use; one series at a time.",
            ),
            &["url", "address"],
        )?;
        registry.register(Box::new(ca_failovers.clone()))?;
        registry.register(Box::new(ca_endpoint.clone()))?;
        for op in CA_FAILOVER_OPS {
            ca_failovers.with_label_values(&[op]);
        }
        let key_location = IntGaugeVec::new(
            Opts::new(
                "keyproof_identity_key_location",
                "Where the workload private key lives: 1 for the location in use (file, memory \
                 or pkcs11), 0 for the others.",
            ),
            &["location"],
        )?;
        let key_operations = IntCounterVec::new(
            Opts::new(
                "keyproof_identity_key_operations_total",
                "Private-key operations of a PKCS#11 workload key (handshake signatures, \
                 step-up signatures, CSRs, probes), by result: ok, failed, or unavailable (not \
                 attempted: the token failed less than a second ago).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(key_location.clone()))?;
        registry.register(Box::new(key_operations.clone()))?;
        let policy_reloads = IntCounterVec::new(
            Opts::new(
                "keyproof_policy_reloads_total",
                "[inbound] policy_file changes seen, by result: ok (in use) or failed (refused; \
                 the policy in use before keeps serving).",
            ),
            &["result"],
        )?;
        let policy_generation = IntGauge::new(
            "keyproof_policy_generation",
            "The inbound policy in use: 0 as read at startup, one more per policy_file \
             change taken into use.",
        )?;
        registry.register(Box::new(policy_reloads.clone()))?;
        let upstream_reloads = IntCounterVec::new(
            Opts::new(
                "keyproof_upstream_reloads_total",
                "[outbound] upstreams_file changes seen, by result: ok (in use) or failed \
                 (refused; the upstream rules in use before keep serving).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(upstream_reloads.clone()))?;
        registry.register(Box::new(policy_generation.clone()))?;
        let policy_closed = IntCounter::new(
            "keyproof_policy_closed_connections_total",
            "Inbound connections closed, with all they carried (streams, tunnels), because a \
             policy_file change put their caller on the deny list.",
        )?;
        registry.register(Box::new(policy_closed.clone()))?;
        let admin_shed = IntCounter::new(
            "keyproof_admin_connections_shed_total",
            "Admin listener connections closed to make room for a newer one, because as many \
             as the admin listener keeps were open.",
        )?;
        registry.register(Box::new(admin_shed.clone()))?;
        let audit_records = IntCounterVec::new(
            Opts::new(
                "keyproof_audit_records_total",
                "Step-up audit records ([inbound.stepup] audit_log), by result: written, \
                 dropped (the writer fell behind) or failed (the write failed).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(audit_records.clone()))?;
        // Every label at 0 from the start, so increase() sees the first event.
        for r in RELOAD_RESULTS {
            reloads.with_label_values(&[r]);
        }
        for r in RENEWAL_RESULTS {
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
        let bundle_roots = IntGaugeVec::new(
            Opts::new(
                "keyproof_trust_bundle_roots",
                "Roots in the trust bundle in use (two while a root rotation is under way), \
                 by trust domain.",
            ),
            &["trust_domain"],
        )?;
        let root_expiry = GaugeVec::new(
            Opts::new(
                "keyproof_trust_bundle_root_expiry_timestamp_seconds",
                "notAfter of each root of the trust bundle in use, by trust domain and \
                 fingerprint (hex SHA-256 of the root's DER), seconds since the epoch.",
            ),
            &["trust_domain", "fingerprint"],
        )?;
        let sequence = IntGaugeVec::new(
            Opts::new(
                "keyproof_trust_bundle_sequence",
                "spiffe_sequence of the trust bundle in use, as the CA states it \
                 ([identity.ca] only), by trust domain; equal across a trust domain's \
                 fleet once a rotation converged.",
            ),
            &["trust_domain"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "keyproof_build_info",
                "Always 1; the binary and its version as labels.",
            ),
            &["binary", "version"],
        )?;
        build_info
            .with_label_values(&["keyproof-proxy", env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(bundle_roots.clone()))?;
        registry.register(Box::new(root_expiry.clone()))?;
        registry.register(Box::new(sequence.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(renewals.clone()))?;
        registry.register(Box::new(sig_cache.clone()))?;
        let flood_closed = IntCounterVec::new(
            Opts::new(
                "keyproof_http2_flood_closed_total",
                "HTTP/2 connections closed (GOAWAY ENHANCE_YOUR_CALM) because the peer sent \
                 more WINDOW_UPDATE, PRIORITY or unknown frames than the connection's traffic \
                 allows, by side: server (the proxy served the connection: inbound callers, \
                 the outbound's local app) or client (the outbound's connection to an \
                 upstream). Counted for the whole process.",
            ),
            &["side"],
        )?;
        registry.register(Box::new(flood_closed.clone()))?;
        let tcp_connections = IntCounterVec::new(
            Opts::new(
                "keyproof_tcp_connections_total",
                "Opaque TCP connections carried over the mesh, by direction and result (ok, denied, unmeshed_denied, passthrough, failed, limited, loop).",
            ),
            &["direction", "result"],
        )?;
        let tcp_bytes = IntCounterVec::new(
            Opts::new(
                "keyproof_tcp_bytes_total",
                "Bytes carried by opaque TCP connections, by direction and way (client_to_server, server_to_client).",
            ),
            &["direction", "way"],
        )?;
        for d in [Direction::Inbound, Direction::Outbound] {
            for r in TCP_RESULTS {
                tcp_connections.with_label_values(&[d.as_str(), r]);
            }
            for w in ["client_to_server", "server_to_client"] {
                tcp_bytes.with_label_values(&[d.as_str(), w]);
            }
        }
        registry.register(Box::new(tcp_connections.clone()))?;
        registry.register(Box::new(tcp_bytes.clone()))?;
        let memory = MemoryMetrics {
            heap: IntGauge::new(
                "keyproof_memory_heap_bytes",
                "Bytes the allocator has handed out and not had back: what runtime.memory_limit \
                 holds the sidecar under.",
            )?,
            resident: IntGauge::new(
                "keyproof_memory_resident_bytes",
                "Resident memory of the process, as the kernel counts it.",
            )?,
            limit: IntGauge::new(
                "keyproof_memory_limit_bytes",
                "runtime.memory_limit in use (absent when there is none): above it \
                 connections are shed.",
            )?,
            registry: registry.clone(),
            shed: IntCounter::new(
                "keyproof_memory_shed_connections_total",
                "Connections closed because memory was above runtime.memory_limit (inbound \
                 callers' and the app's), from the holder of the most connections first.",
            )?,
            refused: IntCounter::new(
                "keyproof_memory_refused_requests_total",
                "Requests refused because the request heads in flight had taken their share of \
                 runtime.memory_limit (a quarter of it, a sixteenth per caller identity or the \
                 app): HTTP/2 with REFUSED_STREAM (safe to retry), an unfinished HTTP/1.1 head \
                 by closing its connection.",
            )?,
        };
        registry.register(Box::new(memory.heap.clone()))?;
        registry.register(Box::new(memory.resident.clone()))?;
        registry.register(Box::new(memory.shed.clone()))?;
        registry.register(Box::new(memory.refused.clone()))?;
        let dir = |d: Direction| DirectionMetrics {
            handshakes: HANDSHAKE_RESULTS.map(|r| handshakes.with_label_values(&[d.as_str(), r])),
            key_exchanges: GROUP_LABELS.map(|g| key_exchanges.with_label_values(&[d.as_str(), g])),
            connections_open: open.with_label_values(&[d.as_str()]),
            handshakes_shed: shed.with_label_values(&[d.as_str()]),
            codes: CODES.map(|c| requests.with_label_values(&[d.as_str(), c])),
            duration: duration.with_label_values(&[d.as_str()]),
            refused: crate::http::path::REFUSAL_REASONS
                .map(|r| refused.with_label_values(&[d.as_str(), r])),
            underscores: ["dropped", "rejected"]
                .map(|a| underscores.with_label_values(&[d.as_str(), a])),
            retries: RETRY_REASONS.map(|r| retries.with_label_values(&[d.as_str(), r])),
        };
        Ok(Metrics {
            inbound: dir(Direction::Inbound),
            outbound: dir(Direction::Outbound),
            registry,
            authz_denied,
            cert_expiry,
            cert_issued,
            cert_registered: std::sync::Arc::new(std::sync::Once::new()),
            reloads,
            renewals,
            ca_failovers,
            ca_endpoint,
            key_location: KEY_LOCATIONS.map(|l| key_location.with_label_values(&[l])),
            key_operations: KEY_OPERATION_RESULTS.map(|r| key_operations.with_label_values(&[r])),
            policy_reloads: ["ok", "failed"].map(|r| policy_reloads.with_label_values(&[r])),
            upstream_reloads: ["ok", "failed"].map(|r| upstream_reloads.with_label_values(&[r])),
            policy_generation,
            policy_closed,
            admin_shed,
            audit_records: AUDIT_RESULTS.map(|r| audit_records.with_label_values(&[r])),
            sig_cache: ["hit", "miss"].map(|r| sig_cache.with_label_values(&[r])),
            sig_cache_sync: Default::default(),
            flood_closed: FLOOD_SIDES.map(|s| flood_closed.with_label_values(&[s.as_str()])),
            bundle: TrustBundleMetrics {
                roots: bundle_roots,
                root_expiry,
                sequence,
                exported: Default::default(),
            },
            tcp: TcpMetrics {
                connections: tcp_connections,
                bytes: tcp_bytes,
            },
            memory,
        })
    }

    /// Brings the signature-cache counters up to the process-wide cache's
    /// own counts (it lives in `keyproof-ca`, which has no registry), and
    /// the HTTP/2 flood counters up to the frame guards'.
    fn sync_sig_cache(&self) {
        let _one_at_a_time = self
            .sig_cache_sync
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let stats = keyproof_identity::sigcache::SigCache::global().stats();
        for (counter, total) in self.sig_cache.iter().zip([stats.hits, stats.misses]) {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        // The HTTP/2 frame guards count below every registry too.
        for (counter, side) in self.flood_closed.iter().zip(FLOOD_SIDES) {
            let total = crate::http::frame_guard::closed(side);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Counts one `[identity.files]` reload outcome.
    pub fn reload(&self, result: &str) {
        self.reloads.with_label_values(&[result]).inc();
    }

    /// Counts one `[inbound] policy_file` change: taken into use (`ok`) or
    /// refused.
    pub fn policy_reload(&self, ok: bool) {
        self.policy_reloads[usize::from(!ok)].inc();
    }

    /// Counts one `[outbound] upstreams_file` change: taken into use
    /// (`ok`) or refused.
    pub fn upstream_reload(&self, ok: bool) {
        self.upstream_reloads[usize::from(!ok)].inc();
    }

    /// Sets `keyproof_identity_key_location`: 1 for `location` (one of
    /// [`KEY_LOCATIONS`]), 0 for the others.
    pub fn key_location(&self, location: &str) {
        for (l, g) in KEY_LOCATIONS.iter().zip(&self.key_location) {
            g.set(i64::from(*l == location));
        }
    }

    /// Counts one private-key operation of a token key (`result` one of
    /// [`KEY_OPERATION_RESULTS`]; anything else counts as `failed`).
    pub fn key_operation(&self, result: &str) {
        let i = KEY_OPERATION_RESULTS
            .iter()
            .position(|r| *r == result)
            .unwrap_or(1);
        self.key_operations[i].inc();
    }

    /// Counts one `[identity.ca]` failover to the next CA endpoint (`op`
    /// one of [`CA_FAILOVER_OPS`]).
    pub fn ca_failover(&self, op: &str) {
        self.ca_failovers.with_label_values(&[op]).inc();
    }

    /// Sets `keyproof_identity_ca_endpoint` to the endpoint that issued the
    /// certificate in use.
    pub fn ca_endpoint(&self, url: &str, address: &str) {
        self.ca_endpoint.reset();
        self.ca_endpoint.with_label_values(&[url, address]).set(1);
    }

    /// Counts one `[identity.ca]` issuance outcome.
    pub fn renewal(&self, result: &str) {
        self.renewals.with_label_values(&[result]).inc();
    }

    /// Sets the certificate gauges for the identity now in use (its
    /// validity, in Unix seconds).
    pub fn identity_installed(&self, not_before: i64, not_after: i64) {
        self.cert_expiry.set(not_after as f64);
        self.cert_issued.set(not_before as f64);
        self.cert_registered.call_once(|| {
            for g in [&self.cert_expiry, &self.cert_issued] {
                if let Err(e) = self.registry.register(Box::new(g.clone())) {
                    tracing::error!(error = %e, "certificate gauge not registered");
                }
            }
        });
    }

    /// Sets the trust bundle gauges for the bundle of `trust_domain` now in
    /// use: its roots (the series of roots no longer in it are removed) and,
    /// when the CA stated one, its `spiffe_sequence`. Called when an
    /// identity or a bundle is installed, never on the request path.
    pub fn trust_bundle_installed(
        &self,
        trust_domain: &str,
        roots: &[BundleRoot],
        sequence: Option<u64>,
    ) {
        let b = &self.bundle;
        let mut exported = b
            .exported
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (old_td, old_roots) = &*exported;
        for gone in old_roots
            .iter()
            .filter(|f| old_td != trust_domain || !roots.iter().any(|r| &r.fingerprint == *f))
        {
            let _ = b.root_expiry.remove_label_values(&[old_td, gone]);
        }
        if old_td != trust_domain && !old_td.is_empty() {
            let _ = b.roots.remove_label_values(&[old_td]);
            let _ = b.sequence.remove_label_values(&[old_td]);
        }
        for r in roots {
            b.root_expiry
                .with_label_values(&[trust_domain, &r.fingerprint])
                .set(r.not_after as f64);
        }
        *exported = (
            trust_domain.to_owned(),
            roots.iter().map(|r| r.fingerprint.clone()).collect(),
        );
        b.roots
            .with_label_values(&[trust_domain])
            .set(i64::try_from(roots.len()).unwrap_or(i64::MAX));
        match sequence {
            Some(seq) => b
                .sequence
                .with_label_values(&[trust_domain])
                .set(i64::try_from(seq).unwrap_or(i64::MAX)),
            None => {
                let _ = b.sequence.remove_label_values(&[trust_domain]);
            }
        }
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

// Step-up: inbound `keyproof_stepup_challenges_total{route, reason}`,
// `keyproof_stepup_verifications_total{result}` (every design-doc result,
// at 0 from the start so that `increase()` works from the first refusal),
// `keyproof_stepup_nonces_outstanding`, `keyproof_stepup_nonce_table_full_total`
// and `keyproof_stepup_nonce_capacity` (the alert rules divide by it);
// outbound `keyproof_stepup_signatures_total{result}`.

/// Inbound (verifier) metrics.
#[derive(Clone)]
pub struct VerifierMetrics {
    /// Route, then reason: looked up with two `&str` without building a key.
    challenges: HashMap<String, HashMap<String, IntCounter>>,
    challenges_vec: IntCounterVec,
    verifications: [IntCounter; Outcome::ALL.len()],
    /// `keyproof_stepup_nonces_outstanding`.
    pub outstanding: IntGauge,
    /// `keyproof_stepup_nonce_table_full_total`.
    pub table_full: IntCounter,
    /// `keyproof_stepup_body_budget_full_total`.
    pub budget_full: IntCounter,
}

impl VerifierMetrics {
    /// Registers the inbound step-up metrics; `routes` are the step-up
    /// routes' ids (path prefixes), each with the reasons it can challenge
    /// for (`always`; or `app` and its challenge rules' names), whose
    /// challenge counters start at 0.
    pub fn register<'a, R>(
        metrics: &Metrics,
        routes: impl IntoIterator<Item = (&'a str, R)>,
        capacity: usize,
    ) -> Result<VerifierMetrics, prometheus::Error>
    where
        R: IntoIterator<Item = &'a str>,
    {
        let challenges_vec = IntCounterVec::new(
            Opts::new(
                "keyproof_stepup_challenges_total",
                "Step-up challenges (401 with a fresh nonce) issued, by route path_prefix and \
                 reason (always, app, or the name of the risk rule that fired).",
            ),
            &["route", "reason"],
        )?;
        let verifications_vec = IntCounterVec::new(
            Opts::new(
                "keyproof_stepup_verifications_total",
                "Step-up verifications on privileged routes, by result (stepup-v1 verification order).",
            ),
            &["result"],
        )?;
        let outstanding = IntGauge::new(
            "keyproof_stepup_nonces_outstanding",
            "Step-up nonces issued and not yet used (expired ones until purged).",
        )?;
        let table_full = IntCounter::new(
            "keyproof_stepup_nonce_table_full_total",
            "Nonces not issued because the table was full (globally: 503, per peer: 429).",
        )?;
        let budget_full = IntCounter::new(
            "keyproof_stepup_body_budget_full_total",
            "Signed requests answered 503 because the bodies held for verification had used \
             their budget (globally, or this caller's share).",
        )?;
        let capacity_gauge = IntGauge::new(
            "keyproof_stepup_nonce_capacity",
            "Bound on outstanding step-up nonces ([inbound.stepup] max_outstanding).",
        )?;
        capacity_gauge.set(i64::try_from(capacity).unwrap_or(i64::MAX));
        metrics.register(Box::new(challenges_vec.clone()))?;
        metrics.register(Box::new(verifications_vec.clone()))?;
        metrics.register(Box::new(outstanding.clone()))?;
        metrics.register(Box::new(table_full.clone()))?;
        metrics.register(Box::new(budget_full.clone()))?;
        metrics.register(Box::new(capacity_gauge))?;
        let mut challenges: HashMap<String, HashMap<String, IntCounter>> = HashMap::new();
        for (route, reasons) in routes {
            let by_reason = challenges.entry(route.to_owned()).or_default();
            for reason in reasons {
                by_reason.insert(
                    reason.to_owned(),
                    challenges_vec.with_label_values(&[route, reason]),
                );
            }
        }
        Ok(VerifierMetrics {
            challenges,
            challenges_vec,
            verifications: Outcome::ALL.map(|o| verifications_vec.with_label_values(&[o.as_str()])),
            outstanding,
            table_full,
            budget_full,
        })
    }

    /// Counts one verification outcome.
    pub fn verification(&self, outcome: Outcome) {
        // `ALL` lists every variant, so the position always exists.
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.verifications[i].inc();
        }
    }

    /// Starts the challenge counters of `routes` (as for [`register`]) at
    /// 0 when they do not exist yet: for the routes and rules of a policy
    /// taken into use after startup, so that `increase()` sees their first
    /// challenge.
    ///
    /// [`register`]: VerifierMetrics::register
    pub fn precreate<'a, R>(&self, routes: impl IntoIterator<Item = (&'a str, R)>)
    where
        R: IntoIterator<Item = &'a str>,
    {
        for (route, reasons) in routes {
            for reason in reasons {
                self.challenges_vec.with_label_values(&[route, reason]);
            }
        }
    }

    /// Counts one challenge on `route` for `reason`.
    pub fn challenge(&self, route: &str, reason: &str) {
        match self.challenges.get(route).and_then(|r| r.get(reason)) {
            Some(c) => c.inc(),
            // Routes and rules of a policy loaded after startup; resolving
            // late is a fallback.
            None => self
                .challenges_vec
                .with_label_values(&[route, reason])
                .inc(),
        }
    }
}

/// Every `result` of `keyproof_stepup_signatures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignResult {
    /// A request was signed (up front with a kept nonce, or for a challenge).
    Ok,
    /// The challenge named another key; not signed.
    KeyidMismatch,
    /// The challenge's `alg` does not fit our key; not signed.
    AlgMismatch,
    /// The challenge's tag is not `stepup-v1`; not signed.
    WrongTag,
    /// The challenge asks for components stepup-v1 does not sign; not signed.
    UnexpectedComponents,
    /// `Accept-Signature` missing or unreadable.
    BadChallenge,
    /// The body to replay is larger than `[outbound.stepup] max_body`.
    BodyTooLarge,
    /// The workload key cannot sign (unsupported type or format).
    NoKey,
    /// The upstream refused a request we signed.
    Rejected,
    /// Signing failed otherwise (no authority, encoding, crypto).
    Error,
}

impl SignResult {
    /// Every result, for pre-initialisation.
    pub const ALL: [SignResult; 10] = [
        SignResult::Ok,
        SignResult::KeyidMismatch,
        SignResult::AlgMismatch,
        SignResult::WrongTag,
        SignResult::UnexpectedComponents,
        SignResult::BadChallenge,
        SignResult::BodyTooLarge,
        SignResult::NoKey,
        SignResult::Rejected,
        SignResult::Error,
    ];

    /// The label value (also the `x-keyproof-step-up-error` reason).
    pub const fn as_str(self) -> &'static str {
        match self {
            SignResult::Ok => "ok",
            SignResult::KeyidMismatch => "keyid_mismatch",
            SignResult::AlgMismatch => "alg_mismatch",
            SignResult::WrongTag => "wrong_tag",
            SignResult::UnexpectedComponents => "unexpected_components",
            SignResult::BadChallenge => "bad_challenge",
            SignResult::BodyTooLarge => "body_too_large",
            SignResult::NoKey => "no_key",
            SignResult::Rejected => "rejected",
            SignResult::Error => "error",
        }
    }

    /// From the library's refusal.
    pub fn from_refusal(r: keyproof_stepup::SignRefusal) -> SignResult {
        use keyproof_stepup::SignRefusal as R;
        match r {
            R::KeyidMismatch => SignResult::KeyidMismatch,
            R::AlgMismatch => SignResult::AlgMismatch,
            R::WrongTag => SignResult::WrongTag,
            R::UnexpectedComponents => SignResult::UnexpectedComponents,
        }
    }
}

/// Outbound (signer) metrics.
#[derive(Clone)]
pub struct SignerMetrics {
    results: [IntCounter; SignResult::ALL.len()],
}

impl SignerMetrics {
    /// Registers `keyproof_stepup_signatures_total`.
    pub fn register(metrics: &Metrics) -> Result<SignerMetrics, prometheus::Error> {
        let vec = IntCounterVec::new(
            Opts::new(
                "keyproof_stepup_signatures_total",
                "Outbound step-up signatures, by result (ok, or why a challenge was not answered).",
            ),
            &["result"],
        )?;
        metrics.register(Box::new(vec.clone()))?;
        Ok(SignerMetrics {
            results: SignResult::ALL.map(|r| vec.with_label_values(&[r.as_str()])),
        })
    }

    /// Counts one result.
    pub fn count(&self, r: SignResult) {
        if let Some(i) = SignResult::ALL.iter().position(|x| *x == r) {
            self.results[i].inc();
        }
    }
}

/// The value of one sample of `name` with exactly these labels in the
/// exposition `text` (`None` when there is no such sample).
#[cfg(test)]
pub(crate) fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, got) = match series.split_once('{') {
                Some((m, rest)) => {
                    let mut got: Vec<String> = rest
                        .strip_suffix('}')?
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned)
                        .collect();
                    got.sort();
                    (m, got)
                }
                None => (series, Vec::new()),
            };
            (metric == name && got == want).then(|| value.parse().ok())?
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::path::{PathError, REFUSAL_REASONS};

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).expect("UTF-8 exposition")
    }

    fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&text(m), name, labels).unwrap_or_else(|| panic!("{name} {labels:?} not exported"))
    }

    const DIRECTIONS: [&str; 2] = ["inbound", "outbound"];

    #[test]
    fn the_key_location_is_one_for_the_location_in_use_and_operations_count_by_result() {
        let m = Metrics::new().expect("metrics");
        m.key_location("pkcs11");
        m.key_operation("ok");
        m.key_operation("ok");
        m.key_operation("failed");
        m.key_operation("bogus");
        let t = text(&m);
        let loc = |l| sample(&t, "keyproof_identity_key_location", &[("location", l)]);
        assert_eq!(
            (loc("file"), loc("memory"), loc("pkcs11")),
            (Some(0.0), Some(0.0), Some(1.0))
        );
        let ops = |r| {
            sample(
                &t,
                "keyproof_identity_key_operations_total",
                &[("result", r)],
            )
        };
        assert_eq!(
            (ops("ok"), ops("failed"), ops("unavailable")),
            (Some(2.0), Some(2.0), Some(0.0))
        );
        m.key_location("file");
        let t = text(&m);
        let loc = |l| sample(&t, "keyproof_identity_key_location", &[("location", l)]);
        assert_eq!((loc("file"), loc("pkcs11")), (Some(1.0), Some(0.0)));
    }

    #[test]
    fn every_label_of_every_list_is_exported_at_zero_from_the_start() {
        let m = Metrics::new().expect("metrics");
        VerifierMetrics::register(
            &m,
            [("/admin", vec!["always"]), ("/pay", vec!["app", "burst"])],
            10,
        )
        .expect("verifier metrics");
        SignerMetrics::register(&m).expect("signer metrics");
        let t = text(&m);
        let mut checked = 0;
        let mut zero = |name: &str, labels: &[(&str, &str)]| {
            assert_eq!(sample(&t, name, labels), Some(0.0), "{name} {labels:?}");
            checked += 1;
        };
        for d in DIRECTIONS {
            for r in HANDSHAKE_RESULTS {
                zero(
                    "keyproof_tls_handshakes_total",
                    &[("direction", d), ("result", r)],
                );
            }
            for r in REFUSAL_REASONS {
                zero(
                    "keyproof_http_requests_refused_total",
                    &[("direction", d), ("reason", r)],
                );
            }
            for g in GROUP_LABELS {
                zero(
                    "keyproof_tls_key_exchange_total",
                    &[("direction", d), ("group", g)],
                );
            }
            for c in CODES {
                zero("keyproof_requests_total", &[("direction", d), ("code", c)]);
            }
            for a in ["dropped", "rejected"] {
                zero(
                    "keyproof_headers_with_underscores_total",
                    &[("direction", d), ("action", a)],
                );
            }
            zero("keyproof_connections_open", &[("direction", d)]);
            zero("keyproof_tls_handshakes_shed_total", &[("direction", d)]);
        }
        for r in RELOAD_RESULTS {
            zero("keyproof_identity_reloads_total", &[("result", r)]);
        }
        for r in RENEWAL_RESULTS {
            zero("keyproof_identity_renewals_total", &[("result", r)]);
        }
        // Where the key lives is set at start; before, no location is 1.
        for l in KEY_LOCATIONS {
            zero("keyproof_identity_key_location", &[("location", l)]);
        }
        for r in KEY_OPERATION_RESULTS {
            zero("keyproof_identity_key_operations_total", &[("result", r)]);
        }
        for o in Outcome::ALL {
            zero(
                "keyproof_stepup_verifications_total",
                &[("result", o.as_str())],
            );
        }
        for r in SignResult::ALL {
            zero(
                "keyproof_stepup_signatures_total",
                &[("result", r.as_str())],
            );
        }
        for (route, reason) in [("/admin", "always"), ("/pay", "app"), ("/pay", "burst")] {
            zero(
                "keyproof_stepup_challenges_total",
                &[("route", route), ("reason", reason)],
            );
        }
        for r in ["ok", "failed"] {
            zero("keyproof_policy_reloads_total", &[("result", r)]);
            zero("keyproof_upstream_reloads_total", &[("result", r)]);
        }
        zero("keyproof_policy_generation", &[]);
        for r in AUDIT_RESULTS {
            zero("keyproof_audit_records_total", &[("result", r)]);
        }
        zero("keyproof_stepup_nonces_outstanding", &[]);
        zero("keyproof_stepup_nonce_table_full_total", &[]);
        assert_eq!(
            checked,
            2 * (15 + 10 + 5 + 5 + 2 + 2) + 9 + 8 + 3 + 3 + 11 + 10 + 3 + 2 + 2 + 1 + 3 + 2
        );
        // No certificate, no expiry: a 0 would page as one expired in 1970.
        assert!(
            !t.contains("\nkeyproof_identity_cert_expiry_timestamp_seconds"),
            "{t}"
        );
        assert!(!t.contains("\nkeyproof_identity_cert_issued_timestamp_seconds"));
        m.identity_installed(1_000, 2_000);
        m.identity_installed(1_500, 2_500);
        let t = text(&m);
        assert_eq!(
            sample(&t, "keyproof_identity_cert_expiry_timestamp_seconds", &[]),
            Some(2_500.0)
        );
        assert_eq!(
            sample(&t, "keyproof_identity_cert_issued_timestamp_seconds", &[]),
            Some(1_500.0)
        );
        // Nothing to say before a bundle is installed (not even its trust
        // domain), and no sequence unless a CA states one.
        assert!(!t.contains("\nkeyproof_trust_bundle_roots"), "{t}");
        assert!(!t.contains("keyproof_trust_bundle_root_expiry_timestamp_seconds{"));
        assert!(!t.contains("\nkeyproof_trust_bundle_sequence"), "{t}");
        assert_eq!(
            sample(&t, "keyproof_stepup_nonce_capacity", &[]),
            Some(10.0)
        );
        assert!(t.contains("# TYPE keyproof_request_duration_seconds histogram"));
    }

    #[test]
    fn label_lists_have_no_duplicates() {
        fn unique(list: &[&str]) {
            let set: std::collections::BTreeSet<_> = list.iter().collect();
            assert_eq!(set.len(), list.len(), "{list:?}");
        }
        unique(&HANDSHAKE_RESULTS);
        unique(&RELOAD_RESULTS);
        unique(&RENEWAL_RESULTS);
        unique(&REFUSAL_REASONS);
        unique(&Outcome::ALL.map(Outcome::as_str));
        unique(&SignResult::ALL.map(SignResult::as_str));
        assert_eq!(HANDSHAKE_RESULTS[PROTOCOL], "protocol");
    }

    #[test]
    fn a_handshake_result_outside_the_list_counts_as_protocol() {
        let m = Metrics::new().expect("metrics");
        let hs = |d: &str, r: &str| {
            value(
                &m,
                "keyproof_tls_handshakes_total",
                &[("direction", d), ("result", r)],
            )
        };
        m.inbound.handshake("expired");
        m.inbound.handshake("no_such_result");
        m.outbound.handshake("ok");
        assert_eq!(hs("inbound", "expired"), 1.0);
        assert_eq!(hs("inbound", "protocol"), 1.0);
        assert_eq!(hs("outbound", "ok"), 1.0);
        assert_eq!(hs("outbound", "expired"), 0.0);
        // No series for the unknown label was created.
        assert!(!text(&m).contains("no_such_result"));
    }

    #[test]
    fn counters_land_on_their_labels() {
        let m = Metrics::new().expect("metrics");
        m.inbound.refused(PathError::Semicolon);
        m.outbound.refused(PathError::AboveRoot);
        assert_eq!(
            value(
                &m,
                "keyproof_http_requests_refused_total",
                &[("direction", "inbound"), ("reason", "semicolon")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &m,
                "keyproof_http_requests_refused_total",
                &[("direction", "outbound"), ("reason", "above_root")]
            ),
            1.0
        );
        for (status, class) in [
            (101, "1xx"),
            (204, "2xx"),
            (308, "3xx"),
            (431, "4xx"),
            (503, "5xx"),
        ] {
            m.direction(Direction::Outbound)
                .request(http::StatusCode::from_u16(status).expect("status"), 0.01);
            assert_eq!(
                value(
                    &m,
                    "keyproof_requests_total",
                    &[("direction", "outbound"), ("code", class)]
                ),
                1.0,
                "{status}"
            );
        }
        assert_eq!(
            value(
                &m,
                "keyproof_request_duration_seconds_count",
                &[("direction", "outbound")]
            ),
            5.0
        );
        m.inbound.underscores(false, 3);
        m.inbound.underscores(true, 1);
        let us = |a: &str| {
            value(
                &m,
                "keyproof_headers_with_underscores_total",
                &[("direction", "inbound"), ("action", a)],
            )
        };
        assert_eq!((us("dropped"), us("rejected")), (3.0, 1.0));
        m.inbound.key_exchange(Some(rustls::NamedGroup::X25519));
        m.inbound.key_exchange(None);
        let kx = |g: &str| {
            value(
                &m,
                "keyproof_tls_key_exchange_total",
                &[("direction", "inbound"), ("group", g)],
            )
        };
        assert_eq!((kx("x25519"), kx("other")), (1.0, 1.0));
        m.reload("expired");
        m.renewal("ca_refused");
        assert_eq!(
            value(
                &m,
                "keyproof_identity_reloads_total",
                &[("result", "expired")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &m,
                "keyproof_identity_renewals_total",
                &[("result", "ca_refused")]
            ),
            1.0
        );
        m.authz_denied("/admin").inc();
        assert_eq!(
            value(&m, "keyproof_authz_denied_total", &[("route", "/admin")]),
            1.0
        );
        m.identity_installed(1_700_000_000, 1_700_086_400);
        assert_eq!(
            value(&m, "keyproof_identity_cert_issued_timestamp_seconds", &[]),
            1_700_000_000.0
        );
        assert_eq!(
            value(&m, "keyproof_identity_cert_expiry_timestamp_seconds", &[]),
            1_700_086_400.0
        );
    }

    #[test]
    fn build_info_names_the_binary_and_its_version() {
        let m = Metrics::new().expect("metrics");
        assert_eq!(
            value(
                &m,
                "keyproof_build_info",
                &[
                    ("binary", "keyproof-proxy"),
                    ("version", env!("CARGO_PKG_VERSION"))
                ]
            ),
            1.0
        );
    }

    #[test]
    fn the_trust_bundle_gauges_follow_the_bundle_installed() {
        const TD: &str = "prod.example.com";
        let m = Metrics::new().expect("metrics");
        let root = |fp: &str, not_after: i64| BundleRoot {
            fingerprint: fp.to_owned(),
            not_after,
        };
        let expiry = |m: &Metrics, td: &str, fp: &str| {
            sample(
                &text(m),
                "keyproof_trust_bundle_root_expiry_timestamp_seconds",
                &[("trust_domain", td), ("fingerprint", fp)],
            )
        };
        let sequence = |m: &Metrics, td: &str| {
            sample(
                &text(m),
                "keyproof_trust_bundle_sequence",
                &[("trust_domain", td)],
            )
        };
        let roots = |m: &Metrics, td: &str| {
            sample(
                &text(m),
                "keyproof_trust_bundle_roots",
                &[("trust_domain", td)],
            )
        };
        // A rotation: old root, then both, then the new one alone.
        m.trust_bundle_installed(TD, &[root("aa", 2_000_000_000)], Some(1));
        assert_eq!(roots(&m, TD), Some(1.0));
        assert_eq!(expiry(&m, TD, "aa"), Some(2_000_000_000.0));
        assert_eq!(sequence(&m, TD), Some(1.0));
        m.trust_bundle_installed(
            TD,
            &[root("aa", 2_000_000_000), root("bb", 2_100_000_000)],
            Some(2),
        );
        assert_eq!(roots(&m, TD), Some(2.0));
        assert_eq!(expiry(&m, TD, "bb"), Some(2_100_000_000.0));
        assert_eq!(sequence(&m, TD), Some(2.0));
        m.trust_bundle_installed(TD, &[root("bb", 2_100_000_000)], Some(3));
        assert_eq!(roots(&m, TD), Some(1.0));
        assert_eq!(
            expiry(&m, TD, "aa"),
            None,
            "a root that left keeps its series"
        );
        assert_eq!(expiry(&m, TD, "bb"), Some(2_100_000_000.0));
        assert_eq!(sequence(&m, TD), Some(3.0));
        // A source that states no sequence exports none.
        m.trust_bundle_installed(TD, &[root("bb", 2_100_000_000)], None);
        assert_eq!(sequence(&m, TD), None);
        assert!(!text(&m).contains("\nkeyproof_trust_bundle_sequence"));
        // Another trust domain replaces every series of the first.
        m.trust_bundle_installed("other.example.com", &[root("cc", 2_200_000_000)], Some(9));
        let t = text(&m);
        assert!(!t.contains("prod.example.com"), "{t}");
        assert_eq!(roots(&m, "other.example.com"), Some(1.0));
        assert_eq!(sequence(&m, "other.example.com"), Some(9.0));
        assert_eq!(expiry(&m, "other.example.com", "cc"), Some(2_200_000_000.0));
    }

    #[test]
    fn step_up_counters_land_on_their_labels() {
        let m = Metrics::new().expect("metrics");
        let v =
            VerifierMetrics::register(&m, [("/admin", ["always"])], 4).expect("verifier metrics");
        let s = SignerMetrics::register(&m).expect("signer metrics");
        v.verification(Outcome::Replay);
        v.challenge("/admin", "always");
        // A route or rule of a policy loaded later still counts (resolved
        // on first use).
        v.challenge("/late", "app");
        v.challenge("/admin", "burst");
        s.count(SignResult::BodyTooLarge);
        let result = |name: &str, r: &str| value(&m, name, &[("result", r)]);
        assert_eq!(result("keyproof_stepup_verifications_total", "replay"), 1.0);
        assert_eq!(result("keyproof_stepup_verifications_total", "ok"), 0.0);
        assert_eq!(
            result("keyproof_stepup_signatures_total", "body_too_large"),
            1.0
        );
        for (route, reason) in [("/admin", "always"), ("/late", "app"), ("/admin", "burst")] {
            assert_eq!(
                value(
                    &m,
                    "keyproof_stepup_challenges_total",
                    &[("route", route), ("reason", reason)]
                ),
                1.0
            );
        }
        assert_eq!(
            sample(
                &text(&m),
                "keyproof_stepup_challenges_total",
                &[("route", "/late"), ("reason", "always")]
            ),
            None
        );
        m.policy_reload(true);
        m.policy_reload(false);
        m.policy_reload(false);
        m.policy_generation.set(1);
        let reloads = |r: &str| value(&m, "keyproof_policy_reloads_total", &[("result", r)]);
        assert_eq!((reloads("ok"), reloads("failed")), (1.0, 2.0));
        assert_eq!(value(&m, "keyproof_policy_generation", &[]), 1.0);
        // Registering twice in one registry is refused, not double-counted.
        assert!(SignerMetrics::register(&m).is_err());
    }

    #[test]
    fn sign_refusals_map_to_their_results() {
        use keyproof_stepup::SignRefusal as R;
        for (r, want) in [
            (R::KeyidMismatch, "keyid_mismatch"),
            (R::AlgMismatch, "alg_mismatch"),
            (R::WrongTag, "wrong_tag"),
            (R::UnexpectedComponents, "unexpected_components"),
        ] {
            assert_eq!(SignResult::from_refusal(r).as_str(), want);
        }
    }

    #[test]
    fn the_signature_cache_counters_follow_the_process_wide_cache() {
        let m = Metrics::new().expect("metrics");
        let before = keyproof_identity::sigcache::SigCache::global().stats();
        // Loading an identity verifies its chain: a fresh one is a miss.
        let pki = crate::identity::store::test_pki::Pki::shared("metrics.keyproof.test");
        pki.identity("/ns/demo/sa/api");
        let cache = |r: &str| {
            value(
                &m,
                "keyproof_tls_chain_signature_cache_total",
                &[("result", r)],
            )
        };
        // Other tests use the cache concurrently: at least, never exactly.
        assert!(cache("miss") > before.misses as f64);
        assert!(cache("hit") >= before.hits as f64);
    }

    #[tokio::test]
    async fn http2_floods_closed_are_exported_by_side_from_the_process_wide_count() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        use crate::http::frame_guard::{Budget, FrameGuard, Side};
        let m = Metrics::new().expect("metrics");
        let server = |t: &str| {
            sample(
                t,
                "keyproof_http2_flood_closed_total",
                &[("side", "server")],
            )
        };
        let before = server(&text(&m)).expect("exported from the start");
        assert!(sample(
            &text(&m),
            "keyproof_http2_flood_closed_total",
            &[("side", "client")]
        )
        .is_some());
        // A server-side guard whose caller sends two WINDOW_UPDATEs where
        // one is allowed.
        let budget = Budget {
            base: 1,
            ..Budget::DEFAULT
        };
        let (mut peer, near) = tokio::io::duplex(1024);
        let mut g = FrameGuard::new(near, Side::Server, budget);
        let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for _ in 0..2 {
            flood.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        }
        peer.write_all(&flood).await.expect("write");
        let mut buf = vec![0; flood.len()];
        g.read_exact(&mut buf).await.expect("read");
        assert!(g.trip().is_set());
        let after = server(&text(&m)).expect("exported");
        // Other tests in this process may close some too.
        assert!(after >= before + 1.0, "{before} then {after}");
    }
}
