//! The TOML configuration: parsed with serde (unknown keys refused), then
//! validated into typed values. Every error names the offending key, because
//! an operator reading a CrashLoopBackOff log has nothing else to go on.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyproof_identity::IdPattern;
use serde::Deserialize;

pub use keyproof_ca::renewer::Credential;

pub use crate::http::path::Mode as PathMode;

/// A configuration problem, naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A value failed validation.
    #[error("{key}: {msg}")]
    Invalid {
        /// The dotted key, e.g. `inbound.routes[1].allow[0]`.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
}

fn invalid(key: impl Into<String>, msg: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        msg: msg.to_string(),
    }
}

// ---- raw (serde) shapes -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    identity: RawIdentity,
    inbound: Option<RawInbound>,
    outbound: Option<RawOutbound>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    runtime: RawRuntime,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    trust_bundle: PathBuf,
    files: Option<RawIdentityFiles>,
    ca: Option<RawIdentityCa>,
    pkcs11: Option<RawIdentityPkcs11>,
    reload_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentityPkcs11 {
    module: Option<PathBuf>,
    token_label: Option<String>,
    key_label: Option<String>,
    pin_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentityCa {
    /// One URL or a list: read as a value so that a wrong type is an error
    /// naming the key.
    #[serde(alias = "urls")]
    url: toml::Value,
    spiffe_id: String,
    join_token_file: Option<PathBuf>,
    service_account_token_file: Option<PathBuf>,
    server_id: Option<String>,
    key_type: Option<String>,
    bundle_refresh: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentityFiles {
    cert: PathBuf,
    key: Option<PathBuf>,
}

/// The limit keys shared by `[inbound]` and `[outbound]` (serde's `flatten`
/// cannot be combined with `deny_unknown_fields`, so they are copied out).
struct RawLimits {
    handshake_timeout: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    tcp_idle_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    max_concurrent_streams: Option<u32>,
    body_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    listen: String,
    app: String,
    default_policy: Option<String>,
    app_protocol: Option<String>,
    path_normalization: Option<String>,
    app_connect_timeout: Option<String>,
    app_pool_idle_timeout: Option<String>,
    max_app_connections: Option<usize>,
    max_app_connections_per_peer: Option<usize>,
    max_connections_per_peer: Option<usize>,
    headers_with_underscores: Option<String>,
    policy_file: Option<PathBuf>,
    routes: Option<Vec<RawRoute>>,
    risk_rules: Option<Vec<RawRiskRule>>,
    deny: Option<Vec<RawDeny>>,
    tcp: Option<Vec<RawTcp>>,
    http_ports: Option<Vec<i64>>,
    max_tunnels: Option<usize>,
    max_tunnels_per_peer: Option<usize>,
    stepup: Option<RawInboundStepUp>,
    handshake_timeout: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    tcp_idle_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    max_concurrent_streams: Option<u32>,
    body_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path_prefix: String,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
    /// A mode name or a bool: read as a value so that a bad one is an
    /// error naming its key rather than serde's untagged-enum message.
    step_up: Option<toml::Value>,
    risk: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRiskRule {
    name: Option<String>,
    new_peer: Option<String>,
    rate_above: Option<String>,
    header: Option<String>,
    above: Option<toml::Value>,
    equals: Option<String>,
    one_of: Option<Vec<String>>,
    present: Option<bool>,
    after_failure: Option<String>,
    hours: Option<String>,
    failures_above: Option<String>,
    action: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeny {
    spiffe_id: Option<String>,
    serial: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    port: i64,
    #[serde(default)]
    allow: Vec<String>,
}

/// The policy keys, inline in `[inbound]` or at the top of
/// `[inbound] policy_file`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    routes: Option<Vec<RawRoute>>,
    risk_rules: Option<Vec<RawRiskRule>>,
    deny: Option<Vec<RawDeny>>,
    tcp: Option<Vec<RawTcp>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInboundStepUp {
    nonce_ttl: Option<String>,
    max_clock_skew: Option<String>,
    max_body: Option<u64>,
    max_outstanding: Option<usize>,
    max_outstanding_per_peer: Option<usize>,
    max_buffered: Option<u64>,
    channel_binding: Option<bool>,
    audit_log: Option<toml::Value>,
    max_tracked_identities: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    listen: String,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    connect_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    path_normalization: Option<String>,
    stepup: Option<RawOutboundStepUp>,
    handshake_timeout: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    tcp_idle_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_connections: Option<usize>,
    max_concurrent_streams: Option<u32>,
    body_timeout: Option<String>,
    detect_timeout: Option<String>,
    opaque_ports: Option<Vec<i64>>,
    unmeshed: Option<String>,
    upstreams_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    host: Option<String>,
    cidr: Option<String>,
    port: Option<i64>,
    address: Option<String>,
    identity: String,
    balance: Option<String>,
}

/// `[outbound] upstreams_file`: `[[upstreams]]` at its top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamsFile {
    upstreams: Option<Vec<RawUpstream>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutboundStepUp {
    max_body: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<usize>,
    log_format: Option<String>,
    shutdown_grace: Option<String>,
    drain_delay: Option<String>,
    memory_limit: Option<RawSize>,
}

/// A size: a byte count, or a string with a unit (`"96Mi"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

// ---- validated configuration ---------------------------------------------

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the workload identity comes from.
    pub identity: IdentityConfig,
    /// The inbound (server-side) listener, when configured.
    pub inbound: Option<InboundConfig>,
    /// The outbound (client-side) listener, when configured.
    pub outbound: Option<OutboundConfig>,
    /// The admin listener, when configured.
    pub admin: Option<AdminConfig>,
    /// Process-wide settings.
    pub runtime: RuntimeConfig,
}

/// `[identity]`.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// PEM roots of the trust domain. With `[identity.files]` it is watched
    /// and reloaded; with `[identity.ca]` it is only the bootstrap trust
    /// for the CA server, and the CA's bundle replaces it.
    pub trust_bundle: PathBuf,
    /// Where the certificate and key come from.
    pub source: IdentitySource,
    /// `[identity] reload_interval`: how often the files are re-read even
    /// without a change notification (file systems without inotify).
    pub reload_interval: Duration,
    /// `[identity.pkcs11]`: the workload key is in a PKCS#11 token (with
    /// `[identity.files]`, instead of `identity.files.key`; with
    /// `[identity.ca]`, instead of a key in memory).
    pub pkcs11: Option<Pkcs11Config>,
}

/// `[identity.pkcs11]`: where the workload key lives when a token holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// `module`: path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// `token_label`: the token's label.
    pub token_label: String,
    /// `key_label`: the `CKA_LABEL` of the key pair.
    pub key_label: String,
    /// `pin_file`: the file holding the user PIN (its path only; the PIN is
    /// read when the token is opened and never kept in the configuration).
    pub pin_file: PathBuf,
}

impl Pkcs11Config {
    /// The token to open.
    pub fn token_spec(&self) -> keyproof_identity::pkcs11::TokenSpec {
        keyproof_identity::pkcs11::TokenSpec {
            module: self.module.clone(),
            token_label: self.token_label.clone(),
            pin_file: self.pin_file.clone(),
        }
    }

    /// The RFC 7512 URI of the key (as [`keyproof_identity::pkcs11::Pkcs11Key::uri`]
    /// names it), for `check-config` and `/identity`.
    pub fn uri(&self) -> String {
        keyproof_identity::pkcs11::key_uri(&self.token_label, &self.key_label)
    }

    /// Where the key lives, in words.
    fn describe(&self) -> String {
        format!(
            "{} (module {}, PIN from {})",
            self.uri(),
            self.module.display(),
            self.pin_file.display()
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "module": self.module.display().to_string(),
            "token_label": self.token_label,
            "key_label": self.key_label,
            "pin_file": self.pin_file.display().to_string(),
        })
    }
}

impl IdentityConfig {
    /// Where the identity comes from, for `/identity`: the files, or the CA
    /// and which bootstrap credential file is presented to it (its path,
    /// never its content).
    pub fn source_json(&self) -> serde_json::Value {
        let mut json = match &self.source {
            IdentitySource::Files(f) => {
                let mut j = serde_json::json!({
                    "kind": "files",
                    "cert": f.cert.display().to_string(),
                    "trust_bundle": self.trust_bundle.display().to_string(),
                });
                if let Some(key) = &f.key {
                    j["key"] = key.display().to_string().into();
                }
                j
            }
            IdentitySource::Ca(c) => serde_json::json!({
                "kind": "ca",
                // `url` as before (the first); `urls` the whole list.
                "url": c.urls.first(),
                "urls": c.urls,
                "server_id": c.server_id.to_string(),
                "credential": c.credential_key(),
                "credential_file": c.credential.path().display().to_string(),
            }),
        };
        if let Some(p) = &self.pkcs11 {
            json["pkcs11"] = p.json();
        }
        json
    }

    /// Where the workload key lives: `file`, `memory` or `pkcs11` (the
    /// `location` of `/identity` and `keyproof_identity_key_location`).
    pub fn key_location(&self) -> &'static str {
        match (&self.pkcs11, &self.source) {
            (Some(_), _) => "pkcs11",
            (None, IdentitySource::Files(_)) => "file",
            (None, IdentitySource::Ca(_)) => "memory",
        }
    }
}

/// `[identity.files]` or `[identity.ca]` (exactly one).
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// Certificate and key from files, hot-reloaded.
    Files(FilesSourceConfig),
    /// Certificate from `keyproof-ca serve`, key in memory.
    Ca(CaSourceConfig),
}

/// `[identity.files]`.
#[derive(Debug, Clone)]
pub struct FilesSourceConfig {
    /// Leaf then intermediates, PEM.
    pub cert: PathBuf,
    /// The workload private key, PEM; None when `[identity.pkcs11]` holds
    /// it.
    pub key: Option<PathBuf>,
}

/// `[identity.ca]`.
#[derive(Debug, Clone)]
pub struct CaSourceConfig {
    /// `https://host:port` of `keyproof-ca serve`: one, or several replicas
    /// tried in order with failover (a name resolving to several addresses,
    /// a Kubernetes headless Service, counts as several).
    pub urls: Vec<String>,
    /// The identity to obtain.
    pub spiffe_id: keyproof_identity::SpiffeId,
    /// What proves the workload's claim to the CA when it holds no
    /// certificate (`join_token_file` or `service_account_token_file`),
    /// read from its file at every bootstrap.
    pub credential: Credential,
    /// The CA server's SPIFFE ID (default `spiffe://<td>/keyproof-ca`).
    pub server_id: IdPattern,
    /// Key algorithm generated for each certificate.
    pub key_type: keyproof_identity::keys::KeyType,
    /// How often the bundle is fetched between renewals.
    pub bundle_refresh: Duration,
}

impl CaSourceConfig {
    /// The URLs for humans: the one URL, or the list with how it is used.
    pub fn describe_urls(&self) -> String {
        match self.urls.as_slice() {
            [one] => one.clone(),
            several => format!(
                "{} (tried in order with failover, from the last that answered)",
                several.join(", ")
            ),
        }
    }

    /// The `[identity.ca]` key the credential was configured with, for
    /// `check-config` and `/identity` (which name the file, never its
    /// content).
    pub fn credential_key(&self) -> &'static str {
        match self.credential {
            Credential::JoinToken(_) => "join_token_file",
            Credential::ServiceAccountToken(_) => "service_account_token_file",
        }
    }
}

/// Per-listener connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for a TLS handshake (inbound) before the socket is closed.
    pub handshake_timeout: Duration,
    /// Time allowed for a client to send a complete request head. For
    /// HTTP/1 this clock also runs while a keep-alive connection waits for
    /// its next request, so it bounds idle HTTP/1 connections too.
    pub header_read_timeout: Duration,
    /// A connection with no I/O for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// A TCP tunnel, plain-text passthrough or switched (WebSocket)
    /// connection with no byte either way for this long is closed. Longer
    /// than `idle_timeout`: such connections (a database pool's, a
    /// `LISTEN` session, a pub/sub consumer) are quiet for minutes
    /// legitimately, and kernel keepalives carry no byte. Envoy's TCP proxy
    /// has the same default.
    pub tcp_idle_timeout: Duration,
    /// Largest request head accepted.
    pub max_header_bytes: usize,
    /// Connections served at once, counted from the end of their TLS
    /// handshake; further clients wait (after their handshake, then in the
    /// backlog).
    pub max_connections: usize,
    /// Inbound: TLS handshakes in progress at once. Beyond it the oldest
    /// pending handshake is closed to make room, so a flood of handshakes
    /// that never finish cannot keep a prompt caller out.
    pub max_handshakes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// A request body that makes no progress for this long ends its
    /// request (408 when no response has started) and its connection.
    pub body_timeout: Duration,
}

/// What the inbound does when no route matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// Any verified peer of the local trust domain is allowed.
    AllowTrustDomain,
    /// Refused with 403.
    Deny,
}

impl DefaultPolicy {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllowTrustDomain => "allow-trust-domain",
            DefaultPolicy::Deny => "deny",
        }
    }
}

/// Which HTTP version the inbound speaks to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// gRPC (HTTP/2 with `content-type: application/grpc*`) goes out as h2c,
    /// everything else as HTTP/1.1.
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 with prior knowledge.
    H2,
}

/// One `[[inbound.routes]]` entry.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Matches this path and anything below it (segment-aware).
    pub path_prefix: String,
    /// Empty: all methods.
    pub methods: Vec<http::Method>,
    /// Callers allowed on this route.
    pub allow: Vec<IdPattern>,
    /// When the route demands a per-request step-up proof.
    pub step_up: StepUpMode,
    /// `risk`: names of `[[inbound.risk_rules]]` evaluated on this route
    /// (in order); empty unless `step_up = "risk"`.
    pub risk: Vec<String>,
}

/// `step_up` of a route: `true`/`false` are `always`/`never`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepUpMode {
    /// No step-up; an app asking for one gets a 502.
    #[default]
    Never,
    /// Every request proves possession.
    Always,
    /// The route's risk rules (and the app) decide per request.
    Risk,
}

impl StepUpMode {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StepUpMode::Never => "never",
            StepUpMode::Always => "always",
            StepUpMode::Risk => "risk",
        }
    }

    /// Whether requests on the route may be stepped up at all.
    pub fn any(self) -> bool {
        self != StepUpMode::Never
    }
}

/// What a firing risk rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RiskAction {
    /// The request must carry a fresh step-up proof.
    #[default]
    Challenge,
    /// The request is refused with 403 (for the rule's window, if it has one).
    Deny,
}

/// The test a `header` rule applies to the request's values of the field.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderTest {
    /// A value is a number greater than this (a value that is not a number
    /// counts as above: the safe direction).
    Above(f64),
    /// A value equals this exactly.
    Equals(String),
    /// A value equals one of these exactly.
    OneOf(Vec<String>),
    /// The field is present.
    Present,
}

/// The single condition of one `[[inbound.risk_rules]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum RiskCondition {
    /// `new_peer`: the identity has not been served on this route within
    /// the window.
    NewPeer(Duration),
    /// `rate_above = "N/window"`: more than `count` requests of the identity
    /// on the route within `window`.
    RateAbove {
        /// N.
        count: u32,
        /// The window.
        window: Duration,
    },
    /// `header` with `above`, `equals`, `one_of` or `present`.
    Header {
        /// The field (lowercase).
        name: http::HeaderName,
        /// The test.
        test: HeaderTest,
    },
    /// `after_failure`: any refusal of the identity within the window.
    AfterFailure(Duration),
    /// `hours = "HH:MM-HH:MM"` (UTC, may wrap midnight); minutes since
    /// midnight, start inclusive, end exclusive.
    Hours {
        /// Start minute of the day.
        start: u16,
        /// End minute of the day.
        end: u16,
    },
    /// `failures_above = "N/window"`: more than `count` refusals of the
    /// identity within `window`.
    FailuresAbove {
        /// N.
        count: u32,
        /// The window.
        window: Duration,
    },
}

/// One `[[inbound.risk_rules]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct RiskRuleConfig {
    /// Referenced by routes' `risk` lists.
    pub name: String,
    /// Exactly one condition.
    pub condition: RiskCondition,
    /// `challenge` (default) or `deny`.
    pub action: RiskAction,
}

/// One `[[inbound.deny]]` entry: `spiffe_id` (a pattern) or `serial`.
#[derive(Debug, Clone, PartialEq)]
pub enum DenyEntry {
    /// Callers whose SPIFFE ID matches.
    Id(IdPattern),
    /// The certificate with this serial number: lowercase hex, no colons,
    /// no leading zeros.
    Serial(String),
}

/// The inbound policy: inline in `[inbound]`, or `[inbound] policy_file`
/// (re-read on change).
#[derive(Debug, Clone, Default)]
pub struct PolicyConfig {
    /// Routes, first match wins.
    pub routes: Vec<RouteConfig>,
    /// Risk rules by name.
    pub risk_rules: Vec<RiskRuleConfig>,
    /// Refused callers.
    pub deny: Vec<DenyEntry>,
    /// Local ports open to opaque TCP tunnels (HTTP/2 CONNECT), and who
    /// may open them; a port without an entry is never tunnelled to.
    pub tcp: Vec<TcpRuleConfig>,
}

/// One `[[inbound.tcp]]` entry (`[[tcp]]` in a policy file).
#[derive(Debug, Clone, PartialEq)]
pub struct TcpRuleConfig {
    /// The local port (`127.0.0.1:<port>`) a tunnel may reach.
    pub port: u16,
    /// Callers allowed to open a tunnel to it (never empty).
    pub allow: Vec<IdPattern>,
}

impl PolicyConfig {
    /// Names of risk rules that no route lists (they do nothing; most
    /// likely a route forgot one).
    pub fn unused_risk_rules(&self) -> Vec<&str> {
        self.risk_rules
            .iter()
            .filter(|r| !self.routes.iter().any(|route| route.risk.contains(&r.name)))
            .map(|r| r.name.as_str())
            .collect()
    }

    /// What a `risk` route's rules do, in words, for `check-config`:
    /// `challenge when a (...) or b (...); deny when c (...)`.
    pub fn explain_risk(&self, route: &RouteConfig) -> String {
        let words = |action: RiskAction| {
            route
                .risk
                .iter()
                .filter_map(|n| self.risk_rules.iter().find(|r| &r.name == n))
                .filter(|r| r.action == action)
                .map(|r| format!("{} ({})", r.name, r.describe()))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let mut parts = Vec::with_capacity(3);
        let challenge = words(RiskAction::Challenge);
        if !challenge.is_empty() {
            parts.push(format!("challenge when {challenge}"));
        }
        let deny = words(RiskAction::Deny);
        if !deny.is_empty() {
            parts.push(format!("deny when {deny}"));
        }
        parts.push("challenge when the app answers x-keyproof-step-up: required".to_owned());
        parts.join("; ")
    }
}

impl RiskRuleConfig {
    /// The condition in words (`more than 30 requests within any 1m ...`).
    pub fn describe(&self) -> String {
        match self.condition {
            // A deny never follows from a handshake: anyone holding a copy
            // of a (public) certificate could lock its owner out.
            RiskCondition::AfterFailure(w) if self.action == RiskAction::Deny => format!(
                "a refused step-up or 403 of the caller within {} (bad handshakes do not count for a deny)",
                format_duration(w)
            ),
            _ => self.condition.describe(),
        }
    }
}

impl RiskCondition {
    /// The condition in words, for `check-config`.
    pub fn describe(&self) -> String {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        match self {
            RiskCondition::NewPeer(w) => {
                format!("not served on this route within {}", format_duration(*w))
            }
            RiskCondition::RateAbove { count, window } => format!(
                "more than {count} requests within any {} by the caller on this route",
                format_duration(*window)
            ),
            RiskCondition::Header { name, test } => match test {
                HeaderTest::Above(n) => format!("header {name} above {n} or not a number"),
                HeaderTest::Equals(v) => format!("header {name} is {v:?}"),
                HeaderTest::OneOf(vs) => format!(
                    "header {name} is one of {}",
                    vs.iter()
                        .map(|v| format!("{v:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                HeaderTest::Present => format!("header {name} present"),
            },
            RiskCondition::AfterFailure(w) => format!(
                "a refused step-up, 403 or bad handshake of the caller within {}",
                format_duration(*w)
            ),
            RiskCondition::Hours { start, end } => {
                format!("between {} and {} UTC", hm(*start), hm(*end))
            }
            RiskCondition::FailuresAbove { count, window } => {
                let w = format_duration(*window);
                format!("more than {count} refusals of the caller within {w}, for {w}")
            }
        }
    }
}

impl DenyEntry {
    /// The entry as configured and as counted
    /// (`keyproof_deny_list_refused_total{entry}`): the pattern, or
    /// `serial:<hex>`.
    pub fn label(&self) -> String {
        match self {
            DenyEntry::Id(p) => p.to_string(),
            DenyEntry::Serial(s) => format!("serial:{s}"),
        }
    }
}

/// Where step-up audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    /// `audit_log = true`: standard output.
    Stdout,
    /// `audit_log = "/path"`: appended to this file (0600 when created).
    File(PathBuf),
}

/// `[inbound.stepup]`, read now so configs validate; consumed by the
/// step-up verifier.
#[derive(Debug, Clone)]
pub struct InboundStepUpConfig {
    /// Lifetime of an issued nonce.
    pub nonce_ttl: Duration,
    /// Allowed skew of a signature's `created`.
    pub max_clock_skew: Duration,
    /// Largest body read to check `Content-Digest`.
    pub max_body: u64,
    /// Nonces outstanding at once, all peers.
    pub max_outstanding: usize,
    /// Nonces outstanding at once for one peer key.
    pub max_outstanding_per_peer: usize,
    /// Bytes of signed request bodies held at once while their digest and
    /// signature are checked, all callers (one caller may hold a quarter).
    pub max_buffered: u64,
    /// Whether signatures must cover the TLS exporter.
    pub channel_binding: bool,
    /// Step-up audit records (JSON lines), if any.
    pub audit_log: Option<AuditSink>,
    /// Caller identities whose risk state is kept; beyond it the least
    /// recently seen is forgotten (and counts as new again).
    pub max_tracked_identities: usize,
}

impl Default for InboundStepUpConfig {
    fn default() -> Self {
        InboundStepUpConfig {
            nonce_ttl: Duration::from_secs(30),
            max_clock_skew: Duration::from_secs(60),
            max_body: 1 << 20,
            max_outstanding: 100_000,
            max_outstanding_per_peer: 256,
            max_buffered: 64 << 20,
            channel_binding: true,
            audit_log: None,
            max_tracked_identities: 10_000,
        }
    }
}

/// `[inbound]`.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// Where mutual TLS is terminated.
    pub listen: SocketAddr,
    /// The local app, `host:port`.
    pub app: String,
    /// Decision when no route matches.
    pub default_policy: DefaultPolicy,
    /// HTTP version towards the app.
    pub app_protocol: AppProtocol,
    /// How request paths are normalized before the policy decides.
    pub path_normalization: PathMode,
    /// Bound on connecting to the app (then 503).
    pub app_connect_timeout: Duration,
    /// Idle pooled app connections are closed after this. Short by default:
    /// apps close idle keep-alive connections too (Node.js after 5 s), and
    /// reusing one the app is closing fails the request.
    pub app_pool_idle_timeout: Duration,
    /// Routes, risk rules and deny list, as read at startup (from
    /// `policy_file` when set).
    pub policy: PolicyConfig,
    /// `[inbound] policy_file`: re-read on change.
    pub policy_file: Option<PathBuf>,
    /// Step-up verifier settings.
    pub stepup: InboundStepUpConfig,
    /// Connections to the app open at once (HTTP/1.1), and h2c streams to
    /// the app open at once over all h2c connections (gRPC; a connection
    /// the app's stream limit fills gets another beside it, so there are
    /// at most as many connections); requests beyond wait up to
    /// `app_connect_timeout` for one, then get 503.
    pub max_app_connections: usize,
    /// At most this many of them held by one caller SPIFFE ID at once, its
    /// HTTP/1.1 app connections and h2c streams together (its requests
    /// beyond wait, as for a connection): a caller sending bodies, reading
    /// answers slowly or keeping gRPC streams open cannot hold every
    /// connection or stream and starve the others. Default three quarters
    /// of `max_app_connections` (all of them below 4): a quarter is always
    /// left to other callers, and a service with one main caller still
    /// gives it most of the pool.
    pub max_app_connections_per_peer: usize,
    /// Connections one caller SPIFFE ID holds at once, of
    /// `limits.max_connections` (default three quarters, as for
    /// `max_app_connections_per_peer`): beyond, its next connection is
    /// closed after its handshake.
    pub max_connections_per_peer: usize,
    /// What happens to header names with `_` (sidecar-owned names in
    /// disguise are always removed).
    pub headers_with_underscores: crate::http::owned::Underscores,
    /// Connection limits.
    pub limits: Limits,
    /// `[inbound] http_ports`: the local ports a redirected connection's
    /// HTTP may be forwarded to (`127.0.0.1:<port>`); default the port of
    /// `app`. Never one of `own_ports`, never a `tcp` rule's port.
    pub http_ports: Vec<u16>,
    /// The listen ports of this proxy's own listeners (inbound, outbound,
    /// admin), filled in by [`Config::parse`]: nothing is ever forwarded or
    /// tunnelled to them.
    pub own_ports: Vec<u16>,
    /// Tunnels open at once, pod-wide (beyond: 503).
    pub max_tunnels: usize,
    /// Tunnels open at once per verified SPIFFE ID (beyond: 503).
    pub max_tunnels_per_peer: usize,
}

/// A concrete upstream: one peer sidecar to dial and the identity it must
/// prove. Built from a rule (for a rule with placeholders or without
/// `address`, per destination when a connection needs it).
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// What the upstream is for, in logs: the rule's host pattern (`*`,
    /// an exact name), or the dialled address for one made on demand.
    pub host: String,
    /// The peer sidecar's inbound, `host:port`.
    pub address: String,
    /// Who the peer must prove to be.
    pub identity: IdPattern,
}

/// The host condition of an upstream rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host.
    Any,
    /// Exactly this name or IP literal (lowercase, IPv6 without brackets).
    Exact(String),
    /// Labels matched from the right end of the host, each a literal or a
    /// placeholder capturing one DNS label; `any_prefix` (a leading `*.`)
    /// requires one or more further labels before them.
    Labels {
        /// Whether the pattern starts with `*.`.
        any_prefix: bool,
        /// The labels after it, left to right.
        labels: Vec<HostLabel>,
    },
}

/// One label of a [`HostPattern::Labels`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostLabel {
    /// This label (lowercase).
    Literal(String),
    /// `{name}`: any one DNS label, captured as `name`.
    Capture(String),
}

impl HostPattern {
    /// The placeholders the pattern captures.
    pub fn captures(&self) -> impl Iterator<Item = &str> {
        let labels = match self {
            HostPattern::Labels { labels, .. } => labels.as_slice(),
            _ => &[],
        };
        labels.iter().filter_map(|l| match l {
            HostLabel::Capture(n) => Some(n.as_str()),
            HostLabel::Literal(_) => None,
        })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Labels { any_prefix, labels } => {
                if *any_prefix {
                    f.write_str("*")?;
                }
                for (i, l) in labels.iter().enumerate() {
                    if i > 0 || *any_prefix {
                        f.write_str(".")?;
                    }
                    match l {
                        HostLabel::Literal(s) => f.write_str(s)?,
                        HostLabel::Capture(n) => write!(f, "{{{n}}}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

/// One piece of an [`IdentityTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    /// Text as written.
    Literal(String),
    /// `{name}`: the label the host pattern captured as `name`.
    Placeholder(String),
}

/// An upstream rule's `identity`: a SPIFFE ID pattern that may use the
/// host pattern's placeholders.
#[derive(Debug, Clone)]
pub struct IdentityTemplate {
    /// As written.
    pub text: String,
    /// Its pieces.
    pub parts: Vec<TemplatePart>,
    /// The pattern when the template has no placeholder; else the pattern
    /// with every placeholder filled with `x` (for the trust-domain check).
    pub fixed: IdPattern,
}

impl IdentityTemplate {
    /// Whether the template uses placeholders.
    pub fn has_placeholders(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, TemplatePart::Placeholder(_)))
    }
}

/// What the outbound does with a redirected connection no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmeshed {
    /// Connect to the original destination directly, in plain TCP.
    Passthrough,
    /// Close the connection.
    Deny,
}

/// One `[[outbound.upstreams]]` (or `upstreams_file` `[[upstreams]]`)
/// entry: which requests and redirected connections it takes, where they
/// go and who must answer.
#[derive(Debug, Clone)]
pub struct UpstreamRule {
    /// Request host condition.
    pub host: Option<HostPattern>,
    /// Original destination IP condition.
    pub cidr: Option<ipnet::IpNet>,
    /// Original destination port condition.
    pub port: Option<u16>,
    /// Where to dial (default: the original destination).
    pub address: Option<String>,
    /// Who the peer must prove to be.
    pub identity: IdentityTemplate,
    /// Whether app connections share mesh connections.
    pub balance: Balance,
}

/// How a rule's traffic is spread over mesh connections (`balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Each app connection (and each TCP tunnel) gets a mesh connection of
    /// its own, dialled to the original destination, so that a Service
    /// address is balanced by kube-proxy per app connection, as it is
    /// without the mesh (`"connection"`; the default of a rule that dials
    /// the original destination). One shared connection would take every
    /// app connection of the pod to the one backend it was dialled to.
    Connection,
    /// Every app connection to the destination shares one mesh connection
    /// (`"shared"`; the default of a rule with an `address`): fewer
    /// handshakes, and tunnels and requests multiplexed on one TLS
    /// connection. For destinations that are pods, not Service addresses.
    Shared,
}

impl UpstreamRule {
    /// The rule's exact host when it is looked up by hash: an exact host
    /// and no destination condition.
    pub fn exact_host(&self) -> Option<&str> {
        match (&self.host, self.cidr, self.port) {
            (Some(HostPattern::Exact(h)), None, None) => Some(h),
            _ => None,
        }
    }

    /// The rule in words, for `check-config`.
    pub fn describe(&self) -> String {
        let mut when = Vec::new();
        match &self.host {
            Some(HostPattern::Any) => when.push("any host".to_owned()),
            Some(h) => when.push(format!("host {h}")),
            None => {}
        }
        if let Some(c) = self.cidr {
            when.push(format!("destination in {c}"));
        }
        if let Some(p) = self.port {
            when.push(format!("destination port {p}"));
        }
        let to = match &self.address {
            Some(a) => a.clone(),
            None => "the original destination".to_owned(),
        };
        let mut s = format!(
            "{} -> {to} expecting {}",
            when.join(" and "),
            self.identity.text
        );
        if self.balance == Balance::Connection {
            s.push_str(", a mesh connection per app connection");
        }
        if self.host.is_none() {
            s.push_str(" (opaque TCP and HTTP)");
        } else if self.cidr.is_none() && self.port.is_none() && self.address.is_none() {
            s.push_str(" (redirected connections only: no address for explicit requests)");
        }
        s
    }
}

/// `[outbound]`.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Plaintext listener for the local app (loopback).
    pub listen: SocketAddr,
    /// The upstream rules, in file order (from `upstreams_file` when set).
    pub upstreams: Vec<UpstreamRule>,
    /// `upstreams_file`: re-read on change.
    pub upstreams_file: Option<PathBuf>,
    /// No client bytes within this on a redirected connection: TCP.
    pub detect_timeout: Duration,
    /// Redirected connections to these ports are TCP, never sniffed.
    pub opaque_ports: Vec<u16>,
    /// Redirected destinations no rule matches.
    pub unmeshed: Unmeshed,
    /// TCP connect bound (then 504).
    pub connect_timeout: Duration,
    /// Idle pooled mesh connections are closed after this; kept below the
    /// peer inbound's `header_read_timeout` (which closes idle HTTP/1
    /// keep-alive connections) so the pool never picks one being closed.
    pub pool_idle_timeout: Duration,
    /// Largest body buffered for a step-up replay.
    pub stepup_max_body: u64,
    /// How request paths are normalized before they are sent (and signed).
    pub path_normalization: PathMode,
    /// Connection limits for the app-facing listener; `handshake_timeout`
    /// bounds the mesh-side TLS handshake.
    pub limits: Limits,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Plaintext admin listener.
    pub listen: SocketAddr,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[runtime]`.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Tokio worker threads; 1 means a current-thread runtime.
    pub worker_threads: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long the sidecar goes on accepting after SIGTERM, `/ready`
    /// already 503, before it drains: time for the callers' endpoints to
    /// drop it (a preStop sleep of its own).
    pub drain_delay: Duration,
    /// The memory the sidecar sheds connections above
    /// (`memory.rs`).
    pub memory_limit: MemoryLimit,
}

/// `[runtime] memory_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// Half the container's cgroup limit; none without one.
    Auto,
    /// No limit: nothing is shed.
    Off,
    /// This many bytes.
    Bytes(u64),
}

/// The smallest `memory_limit`: below it the sidecar's own working set
/// (identity, policy, nonce table) would leave nothing for connections.
const MIN_MEMORY_LIMIT: u64 = 16 << 20;

/// `"auto"`, `"off"`, a byte count, or a number with a unit: `k`/`M`/`G`
/// (powers of 1000) or `Ki`/`Mi`/`Gi` (powers of 1024), as Kubernetes
/// writes memory limits.
fn memory_limit(v: Option<&RawSize>) -> Result<MemoryLimit, ConfigError> {
    const KEY: &str = "runtime.memory_limit";
    let bytes = match v {
        None => return Ok(MemoryLimit::Auto),
        Some(RawSize::Bytes(n)) => *n,
        Some(RawSize::Text(t)) if t == "auto" => return Ok(MemoryLimit::Auto),
        Some(RawSize::Text(t)) if t == "off" => return Ok(MemoryLimit::Off),
        Some(RawSize::Text(t)) => {
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (digits, unit) = t.split_at(split);
            let unit_bytes: u64 = match unit {
                "" => 1,
                "k" | "K" => 1000,
                "M" => 1000 * 1000,
                "G" => 1000 * 1000 * 1000,
                "Ki" => 1 << 10,
                "Mi" => 1 << 20,
                "Gi" => 1 << 30,
                _ => {
                    return Err(invalid(
                        KEY,
                        format!("{t:?} is not \"auto\", \"off\" or a size such as \"96Mi\""),
                    ))
                }
            };
            digits
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(unit_bytes))
                .ok_or_else(|| {
                    invalid(
                        KEY,
                        format!("{t:?} is not \"auto\", \"off\" or a size such as \"96Mi\""),
                    )
                })?
        }
    };
    if bytes < MIN_MEMORY_LIMIT {
        return Err(invalid(
            KEY,
            format!("{bytes} bytes is below the least the sidecar runs in (16Mi)"),
        ));
    }
    Ok(MemoryLimit::Bytes(bytes))
}

fn duration(key: &str, v: Option<&String>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => keyproof_identity::duration::parse(s).map_err(|e| invalid(key, e)),
    }
}

/// A timeout that 0 would turn into "fail at once" (every connect not
/// instant would time out): refused at 0.
fn nonzero_duration(
    key: &str,
    v: Option<&String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = duration(key, v, default)?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

fn socket_addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse::<SocketAddr>().map_err(|_| {
        invalid(
            key,
            format!("invalid listen address {s:?}: expected IP:PORT, e.g. 127.0.0.1:15001"),
        )
    })
}

/// `host:port` where host is an IP, a bracketed IPv6 address or a DNS name.
fn host_port(key: &str, s: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| {
        invalid(
            key,
            format!("invalid address {s:?}: {why}; expected HOST:PORT"),
        )
    };
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_owned());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("missing port"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("port is not a number in 1..65535"))?;
    let dns_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !dns_ok {
        return Err(bad("host is neither an IP address nor a DNS name"));
    }
    Ok(s.to_owned())
}

fn limits(
    prefix: &str,
    raw: &RawLimits,
    default_header_read_timeout: Duration,
) -> Result<Limits, ConfigError> {
    let max_header_bytes = raw.max_header_bytes.unwrap_or(64 * 1024);
    if !(8192..=16 << 20).contains(&max_header_bytes) {
        return Err(invalid(
            format!("{prefix}.max_header_bytes"),
            "must be between 8192 and 16777216",
        ));
    }
    let max_connections = raw.max_connections.unwrap_or(10_000);
    if max_connections == 0 || max_connections > (1 << 24) {
        return Err(invalid(
            format!("{prefix}.max_connections"),
            "must be between 1 and 16777216",
        ));
    }
    let nonzero = |key: &str, v: Option<&String>, d: Duration| -> Result<Duration, ConfigError> {
        let k = format!("{prefix}.{key}");
        let v = duration(&k, v, d)?;
        if v.is_zero() {
            return Err(invalid(k, "must be greater than zero"));
        }
        Ok(v)
    };
    let max_handshakes = raw.max_handshakes.unwrap_or(256);
    if max_handshakes == 0 || max_handshakes > (1 << 20) {
        return Err(invalid(
            format!("{prefix}.max_handshakes"),
            "must be between 1 and 1048576",
        ));
    }
    let max_concurrent_streams = raw.max_concurrent_streams.unwrap_or(100);
    if max_concurrent_streams == 0 || max_concurrent_streams > 10_000 {
        return Err(invalid(
            format!("{prefix}.max_concurrent_streams"),
            "must be between 1 and 10000",
        ));
    }
    Ok(Limits {
        body_timeout: nonzero(
            "body_timeout",
            raw.body_timeout.as_ref(),
            Duration::from_secs(30),
        )?,
        max_handshakes,
        max_concurrent_streams,
        handshake_timeout: nonzero(
            "handshake_timeout",
            raw.handshake_timeout.as_ref(),
            Duration::from_secs(10),
        )?,
        header_read_timeout: nonzero(
            "header_read_timeout",
            raw.header_read_timeout.as_ref(),
            default_header_read_timeout,
        )?,
        idle_timeout: nonzero(
            "idle_timeout",
            raw.idle_timeout.as_ref(),
            Duration::from_secs(300),
        )?,
        tcp_idle_timeout: nonzero(
            "tcp_idle_timeout",
            raw.tcp_idle_timeout.as_ref(),
            Duration::from_secs(3600),
        )?,
        max_header_bytes,
        max_connections,
    })
}

fn path_mode(key: &str, v: Option<&str>) -> Result<PathMode, ConfigError> {
    match v {
        None => Ok(PathMode::default()),
        Some(name) => PathMode::from_name(name).ok_or_else(|| {
            invalid(
                key,
                format!("unknown mode {name:?}; use \"strict\" or \"keep-slashes\""),
            )
        }),
    }
}

/// A route prefix must be in the form requests are matched in (strict
/// normalization, which is also the merged form `keep-slashes` matches):
/// `/admin/../x`, `//a` or `/%61` would never match what they seem to say.
fn path_prefix(key: &str, prefix: &str) -> Result<(), ConfigError> {
    match crate::http::path::normalize(prefix, PathMode::Strict) {
        Ok(std::borrow::Cow::Borrowed(_)) => Ok(()),
        Ok(std::borrow::Cow::Owned(normal)) => Err(invalid(
            key,
            format!("{prefix:?} is not a normalized path; write {normal:?}"),
        )),
        Err(e) => Err(invalid(key, format!("{prefix:?}: {e}"))),
    }
}

/// Upper bound of `[inbound.stepup] max_tracked_identities`: the risk table
/// is kept in memory, a few hundred bytes per identity.
const MAX_TRACKED_IDENTITIES: usize = 10_000_000;

/// Upper bound of N in `rate_above = "N/window"`.
const MAX_RATE: u32 = 1_000_000;

/// Upper bound of N in `failures_above = "N/window"`: the last N+1 refusal
/// times are kept per identity, so N bounds that memory.
pub const MAX_FAILURES_ABOVE: u32 = 100;

/// Upper bound of every risk rule window (`new_peer`, `after_failure`, the
/// windows of `rate_above` and `failures_above`): a year and a day covers
/// any policy, and keeps the millisecond arithmetic of the risk state
/// (window times a count) far from overflowing.
pub const MAX_RISK_WINDOW: Duration = Duration::from_secs(366 * 86_400);

const AUDIT_LOG_KEY: &str = "inbound.stepup.audit_log";

/// `[inbound.stepup] audit_log`: `true`, `"-"` or `"stdout"` (standard
/// output), `false` (off) or an absolute path.
fn audit_log(v: Option<&toml::Value>) -> Result<Option<AuditSink>, ConfigError> {
    const KEY: &str = AUDIT_LOG_KEY;
    match v {
        None | Some(toml::Value::Boolean(false)) => Ok(None),
        Some(toml::Value::Boolean(true)) => Ok(Some(AuditSink::Stdout)),
        Some(toml::Value::String(p)) if p == "-" || p == "stdout" => Ok(Some(AuditSink::Stdout)),
        Some(toml::Value::String(p)) if p.is_empty() => Err(invalid(KEY, "must name a file")),
        // A relative path would depend on the directory the sidecar happens
        // to be started in: the trail would go missing, not fail.
        Some(toml::Value::String(p)) if !Path::new(p).is_absolute() => Err(invalid(
            KEY,
            format!("{p:?} must be an absolute path (or \"-\" for standard output)"),
        )),
        Some(toml::Value::String(p)) => Ok(Some(AuditSink::File(PathBuf::from(p)))),
        Some(other) => Err(invalid(
            KEY,
            format!(
                "expected true (standard output), false or a file path, not {}",
                other.type_str()
            ),
        )),
    }
}

/// Whether an audit log file can be appended to where it is configured,
/// without creating it: not a directory, in a directory that exists (so
/// `check-config` catches what would otherwise fail only at startup).
pub fn check_audit_path(p: &Path) -> Result<(), ConfigError> {
    if p.is_dir() {
        return Err(invalid(
            AUDIT_LOG_KEY,
            format!("{} is a directory, not a file", p.display()),
        ));
    }
    match p.parent() {
        Some(dir) if dir.is_dir() => Ok(()),
        Some(dir) => Err(invalid(
            AUDIT_LOG_KEY,
            format!("directory {} does not exist", dir.display()),
        )),
        None => Err(invalid(
            AUDIT_LOG_KEY,
            format!("{} names no file", p.display()),
        )),
    }
}

/// A route's `step_up`: a mode name, or `true`/`false` for
/// `always`/`never`.
fn step_up_mode(key: &str, v: Option<&toml::Value>) -> Result<StepUpMode, ConfigError> {
    match v {
        None | Some(toml::Value::Boolean(false)) => Ok(StepUpMode::Never),
        Some(toml::Value::Boolean(true)) => Ok(StepUpMode::Always),
        Some(toml::Value::String(s)) => match s.as_str() {
            "never" => Ok(StepUpMode::Never),
            "always" => Ok(StepUpMode::Always),
            "risk" => Ok(StepUpMode::Risk),
            other => Err(invalid(
                key,
                format!(
                    "unknown mode {other:?}; use \"always\", \"never\", \"risk\", true or false"
                ),
            )),
        },
        Some(other) => Err(invalid(
            key,
            format!(
                "expected \"always\", \"never\", \"risk\", true or false, not {}",
                other.type_str()
            ),
        )),
    }
}

/// Reads and validates a policy file (`[inbound] policy_file`): the keys
/// `[[routes]]`, `[[risk_rules]]`, `[[deny]]` and `[[tcp]]` at its top level. Errors
/// name the file and the key (`/etc/keyproof/policy.toml: routes[0].allow[1]`).
pub fn load_policy_file(path: &Path) -> Result<PolicyConfig, ConfigError> {
    let text = crate::files::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_policy(path, &text)
}

/// A policy file's content, as [`load_policy_file`] reads it: for the
/// reloader, which parses the very bytes it compared with the last ones.
/// `path` only names the file in errors.
pub fn parse_policy(path: &Path, text: &str) -> Result<PolicyConfig, ConfigError> {
    // An empty file is what a truncate-then-write editor leaves between its
    // two steps; taken as a policy it would lift every route and deny entry.
    if text.trim().is_empty() {
        return Err(ConfigError::Parse(format!(
            "{}: the policy file is empty (an empty policy is written `routes = []`)",
            path.display()
        )));
    }
    let raw: RawPolicy =
        toml::from_str(text).map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?;
    // Nor is a file without `routes` (comments alone, or a deny list
    // alone) taken for a policy with no routes: a partly written or
    // mis-generated file must not lift every route. An empty policy says
    // so.
    if raw.routes.is_none() {
        return Err(ConfigError::Parse(format!(
            "{}: the policy file has no `routes` key (an empty policy is written `routes = []`)",
            path.display()
        )));
    }
    policy(&format!("{}: ", path.display()), raw)
}

/// Validates the policy keys; `prefix` starts every key named in an error
/// (`inbound.` inline, the file path and `: ` in a policy file). The one
/// validation for both places, so that a policy means the same wherever it
/// is written.
fn policy(prefix: &str, raw: RawPolicy) -> Result<PolicyConfig, ConfigError> {
    let risk_rules = risk_rules(prefix, raw.risk_rules.unwrap_or_default())?;
    let routes = routes(prefix, raw.routes.unwrap_or_default(), &risk_rules)?;
    let deny = deny_list(prefix, raw.deny.unwrap_or_default())?;
    let tcp = tcp_rules(prefix, raw.tcp.unwrap_or_default())?;
    let cfg = PolicyConfig {
        routes,
        risk_rules,
        deny,
        tcp,
    };
    for name in cfg.unused_risk_rules() {
        tracing::warn!(
            rule = name,
            "{prefix}risk_rules: rule {name:?} is used by no route"
        );
    }
    Ok(cfg)
}

fn routes(
    prefix: &str,
    raw: Vec<RawRoute>,
    rules: &[RiskRuleConfig],
) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut routes = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("{prefix}routes[{i}]");
        path_prefix(&format!("{key}.path_prefix"), &r.path_prefix)?;
        let mut methods = Vec::with_capacity(r.methods.len());
        for (j, m) in r.methods.iter().enumerate() {
            let upper = m.to_ascii_uppercase();
            let method = http::Method::from_bytes(upper.as_bytes())
                .ok()
                .filter(|_| !upper.is_empty() && upper.bytes().all(|b| b.is_ascii_alphabetic()))
                .ok_or_else(|| {
                    invalid(
                        format!("{key}.methods[{j}]"),
                        format!("invalid HTTP method {m:?}"),
                    )
                })?;
            methods.push(method);
        }
        let mut allow = Vec::with_capacity(r.allow.len());
        for (j, a) in r.allow.iter().enumerate() {
            allow.push(IdPattern::parse(a).map_err(|e| {
                invalid(
                    format!("{key}.allow[{j}]"),
                    format!("invalid SPIFFE ID {a:?}: {e}"),
                )
            })?);
        }
        let step_up = step_up_mode(&format!("{key}.step_up"), r.step_up.as_ref())?;
        let risk = route_risk(&key, step_up, r.risk, rules)?;
        routes.push(RouteConfig {
            path_prefix: r.path_prefix,
            methods,
            allow,
            step_up,
            risk,
        });
    }
    Ok(routes)
}

/// A route's `risk` list: only on `risk` routes, never empty there, names
/// defined in `risk_rules`, each once.
fn route_risk(
    key: &str,
    mode: StepUpMode,
    names: Option<Vec<String>>,
    rules: &[RiskRuleConfig],
) -> Result<Vec<String>, ConfigError> {
    let risk_key = format!("{key}.risk");
    match (mode, names) {
        (StepUpMode::Risk, None) => Err(invalid(
            risk_key,
            "missing: step_up = \"risk\" needs the rules that decide, e.g. risk = [\"new-caller\"]",
        )),
        (StepUpMode::Risk, Some(names)) if names.is_empty() => Err(invalid(
            risk_key,
            "is empty: step_up = \"risk\" needs at least one rule",
        )),
        (StepUpMode::Risk, Some(names)) => {
            for (j, n) in names.iter().enumerate() {
                let k = format!("{risk_key}[{j}]");
                if !rules.iter().any(|r| &r.name == n) {
                    let defined = rules
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(invalid(
                        k,
                        if defined.is_empty() {
                            format!("unknown risk rule {n:?}: no risk_rules are defined")
                        } else {
                            format!("unknown risk rule {n:?}; defined: {defined}")
                        },
                    ));
                }
                if names[..j].contains(n) {
                    return Err(invalid(k, format!("rule {n:?} is listed twice")));
                }
            }
            Ok(names)
        }
        (other, Some(_)) => Err(invalid(
            risk_key,
            format!(
                "only with step_up = \"risk\" (this route's step_up is {:?})",
                other.as_str()
            ),
        )),
        (_, None) => Ok(Vec::new()),
    }
}

fn risk_rules(prefix: &str, raw: Vec<RawRiskRule>) -> Result<Vec<RiskRuleConfig>, ConfigError> {
    let mut rules: Vec<RiskRuleConfig> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("{prefix}risk_rules[{i}]");
        let rule = risk_rule(&key, r)?;
        if let Some(j) = rules.iter().position(|o| o.name == rule.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!(
                    "duplicate rule name {:?} (also {prefix}risk_rules[{j}])",
                    rule.name
                ),
            ));
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// A rule name: referenced by routes, a metric label and the
/// `x-keyproof-step-up-reason` value, so it must not be one of the other
/// reasons.
fn rule_name(key: &str, name: Option<String>) -> Result<String, ConfigError> {
    let k = format!("{key}.name");
    let name = name.ok_or_else(|| invalid(&k, "missing: every rule has a name"))?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(invalid(
            k,
            format!("invalid name {name:?}: 1 to 64 of A-Z a-z 0-9 _ . -"),
        ));
    }
    if name == "always" || name == "app" {
        return Err(invalid(
            k,
            format!("{name:?} is reserved: it is the step-up reason of always routes and of app requests"),
        ));
    }
    Ok(name)
}

fn risk_rule(key: &str, r: RawRiskRule) -> Result<RiskRuleConfig, ConfigError> {
    let name = rule_name(key, r.name)?;
    let action = match r.action.as_deref() {
        None | Some("challenge") => RiskAction::Challenge,
        Some("deny") => RiskAction::Deny,
        Some(other) => {
            return Err(invalid(
                format!("{key}.action"),
                format!("unknown action {other:?}; use \"challenge\" or \"deny\""),
            ))
        }
    };
    // The header tests belong to `header`; alone they are not a condition.
    let tests = [
        ("above", r.above.is_some()),
        ("equals", r.equals.is_some()),
        ("one_of", r.one_of.is_some()),
        ("present", r.present.is_some()),
    ];
    let given: Vec<&str> = tests.iter().filter(|t| t.1).map(|t| t.0).collect();
    if r.header.is_none() {
        if let Some(t) = given.first() {
            return Err(invalid(
                format!("{key}.{t}"),
                "only with header = \"FIELD\" (the field it tests)",
            ));
        }
    }
    let conditions = [
        ("new_peer", r.new_peer.is_some()),
        ("rate_above", r.rate_above.is_some()),
        ("header", r.header.is_some()),
        ("after_failure", r.after_failure.is_some()),
        ("hours", r.hours.is_some()),
        ("failures_above", r.failures_above.is_some()),
    ];
    let set: Vec<&str> = conditions.iter().filter(|c| c.1).map(|c| c.0).collect();
    match set.as_slice() {
        [] => {
            return Err(invalid(
                key,
                "needs exactly one condition: new_peer, rate_above, header, after_failure, hours or failures_above",
            ))
        }
        [_] => {}
        [first, second, ..] => {
            return Err(invalid(
                format!("{key}.{second}"),
                format!("cannot be combined with {first}: a rule has exactly one condition (write two rules)"),
            ))
        }
    }
    let window = |k: &str, v: &str| -> Result<Duration, ConfigError> {
        let k = format!("{key}.{k}");
        let d = keyproof_identity::duration::parse(v).map_err(|e| invalid(&k, e))?;
        if d.is_zero() {
            return Err(invalid(k, "must be greater than zero"));
        }
        if d > MAX_RISK_WINDOW {
            return Err(invalid(k, "must be at most 366d"));
        }
        Ok(d)
    };
    let condition = if let Some(v) = &r.new_peer {
        if action == RiskAction::Deny {
            // A caller becomes known only by being served on the route.
            return Err(invalid(
                format!("{key}.action"),
                "new_peer with action = \"deny\" would refuse every caller for ever: a caller stops being new only once served",
            ));
        }
        RiskCondition::NewPeer(window("new_peer", v)?)
    } else if let Some(v) = &r.rate_above {
        let (count, window) = rate(&format!("{key}.rate_above"), v, 1, MAX_RATE)?;
        RiskCondition::RateAbove { count, window }
    } else if let Some(h) = &r.header {
        header_condition(
            key,
            h,
            &given,
            r.above.as_ref(),
            r.equals,
            r.one_of,
            r.present,
        )?
    } else if let Some(v) = &r.after_failure {
        RiskCondition::AfterFailure(window("after_failure", v)?)
    } else if let Some(v) = &r.hours {
        let (start, end) = parse_hours(v).map_err(|e| invalid(format!("{key}.hours"), e))?;
        RiskCondition::Hours { start, end }
    } else if let Some(v) = &r.failures_above {
        let (count, window) = rate(&format!("{key}.failures_above"), v, 0, MAX_FAILURES_ABOVE)?;
        RiskCondition::FailuresAbove { count, window }
    } else {
        // `set` has exactly one entry, one of the branches above.
        return Err(invalid(key, "needs exactly one condition"));
    };
    Ok(RiskRuleConfig {
        name,
        condition,
        action,
    })
}

/// A value a `header = "host"` rule compares with must be a host (an
/// authority: its port and a final dot are ignored, as for the request's):
/// an IPv6 literal in brackets, for one.
/// A value an `equals` or `one_of` test compares with: plain ASCII, as
/// `risk::trim_loose` reads the request's (whatever it strips at the ends
/// could never match), and for `Host` a host.
fn match_value(name: &http::HeaderName, key: &str, v: &str) -> Result<(), ConfigError> {
    let b = v.as_bytes();
    let edge = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_graphic() && *c != b'"');
    if !(edge(b.first()) && edge(b.last()) && b.iter().all(|c| c.is_ascii_graphic() || *c == b' '))
    {
        return Err(invalid(
            key.to_owned(),
            format!("{v:?} must be printable ASCII, without spaces or quotes at either end"),
        ));
    }
    host_value(name, key, v)
}

fn host_value(name: &http::HeaderName, key: &str, v: &str) -> Result<(), ConfigError> {
    if name != http::header::HOST {
        return Ok(());
    }
    match v.parse::<http::uri::Authority>() {
        Ok(a) if !v.contains('@') && crate::http::owned::plain_host(a.host()).is_some() => Ok(()),
        _ => Err(invalid(
            key.to_owned(),
            format!("{v:?} is not a host (an IPv6 address goes in brackets: \"[::1]\")"),
        )),
    }
}

fn header_condition(
    key: &str,
    field: &str,
    given: &[&str],
    above: Option<&toml::Value>,
    equals: Option<String>,
    one_of: Option<Vec<String>>,
    present: Option<bool>,
) -> Result<RiskCondition, ConfigError> {
    let name = http::HeaderName::from_bytes(field.as_bytes()).map_err(|_| {
        invalid(
            format!("{key}.header"),
            format!("invalid header field name {field:?}"),
        )
    })?;
    if let Some(why) = sidecar_field(name.as_str().as_bytes()) {
        return Err(invalid(
            format!("{key}.header"),
            format!("{field:?} {why}: the rule would never see what the caller sent"),
        ));
    }
    if crate::http::owned::same_name(name.as_str().as_bytes(), "content-length") {
        // A chunked HTTP/1.1 body, or an HTTP/2 one, has no length field:
        // a caller would slip under such a rule by leaving it out.
        return Err(invalid(
            format!("{key}.header"),
            format!(
                "{field:?} is the body's framing, which a caller may leave out (chunked, HTTP/2): \
                 the rule could be walked around"
            ),
        ));
    }
    match given {
        [] => {
            return Err(invalid(
                format!("{key}.header"),
                "needs exactly one test: above, equals, one_of or present",
            ))
        }
        [_] => {}
        [first, second, ..] => {
            return Err(invalid(
                format!("{key}.{second}"),
                format!("cannot be combined with {first}: a header rule has exactly one test"),
            ))
        }
    }
    let test = if let Some(v) = above {
        let n = match v {
            // Beyond 2^53 an integer rounds, possibly up: a value between
            // the two would slip under the threshold.
            toml::Value::Integer(i) if i.unsigned_abs() <= 1 << 53 => *i as f64,
            toml::Value::Integer(_) => {
                return Err(invalid(
                    format!("{key}.above"),
                    "must be between -2^53 and 2^53",
                ))
            }
            toml::Value::Float(f) if f.is_finite() => *f,
            other => {
                return Err(invalid(
                    format!("{key}.above"),
                    format!("expected a number, not {}", other.type_str()),
                ))
            }
        };
        HeaderTest::Above(n)
    } else if let Some(v) = equals {
        match_value(&name, &format!("{key}.equals"), &v)?;
        HeaderTest::Equals(v)
    } else if let Some(v) = one_of {
        if v.is_empty() {
            return Err(invalid(format!("{key}.one_of"), "is empty"));
        }
        for (i, x) in v.iter().enumerate() {
            match_value(&name, &format!("{key}.one_of[{i}]"), x)?;
        }
        HeaderTest::OneOf(v)
    } else {
        if present != Some(true) {
            return Err(invalid(
                format!("{key}.present"),
                "only present = true is a test (the rule fires when the field is there)",
            ));
        }
        HeaderTest::Present
    };
    Ok(RiskCondition::Header { name, test })
}

/// Why a request field (in any spelling the listeners treat as one name)
/// is no request attribute a rule can test: the sidecar removes it before
/// anything else reads it, or sets it itself. `None` for the others.
fn sidecar_field(name: &[u8]) -> Option<&'static str> {
    use crate::http::owned::{is_owned, same_name, HOP_BY_HOP};
    if is_owned(name) || same_name(name, "accept-signature") {
        Some("is a field only the sidecar sets or consumes")
    } else if HOP_BY_HOP
        .iter()
        .chain(&["trailer"])
        .any(|h| same_name(name, h))
    {
        Some("is a hop-by-hop field the sidecar removes")
    } else {
        None
    }
}

/// `"N/window"` with `min <= N <= max` and a window above zero.
fn rate(key: &str, v: &str, min: u32, max: u32) -> Result<(u32, Duration), ConfigError> {
    let (n, w) = parse_rate(v).map_err(|e| invalid(key, e))?;
    if !(min..=max).contains(&n) {
        return Err(invalid(
            key,
            format!("{v:?}: the count must be between {min} and {max}"),
        ));
    }
    if w.is_zero() {
        return Err(invalid(
            key,
            format!("{v:?}: the window must be greater than zero"),
        ));
    }
    if w > MAX_RISK_WINDOW {
        return Err(invalid(
            key,
            format!("{v:?}: the window must be at most 366d"),
        ));
    }
    Ok((n, w))
}

/// Parses `"N/window"` (e.g. `"30/1m"`).
pub fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let (n, w) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected N/window, like \"30/1m\""))?;
    let n = n.trim();
    // Digits only: `parse` would also take a sign ("+5").
    let n: u32 = Some(n)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{s:?}: {n:?} is not a count"))?;
    let w = keyproof_identity::duration::parse(w.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((n, w))
}

/// Parses `"HH:MM-HH:MM"` (UTC) into minutes since midnight.
fn parse_hours(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?}: expected HH:MM-HH:MM (UTC), like \"22:00-06:00\"");
    let minute = |t: &str| -> Option<u16> {
        let (h, m) = t.trim().split_once(':')?;
        let two_digits = |t: &str| t.len() == 2 && t.bytes().all(|b| b.is_ascii_digit());
        if !two_digits(h) || !two_digits(m) {
            return None;
        }
        let h: u16 = h.parse().ok().filter(|h| *h < 24)?;
        let m: u16 = m.parse().ok().filter(|m| *m < 60)?;
        Some(h * 60 + m)
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (start, end) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
    if start == end {
        return Err(format!(
            "{s:?}: start and end are the same minute; the window would be empty or the whole day"
        ));
    }
    Ok((start, end))
}

fn deny_list(prefix: &str, raw: Vec<RawDeny>) -> Result<Vec<DenyEntry>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, d) in raw.into_iter().enumerate() {
        let key = format!("{prefix}deny[{i}]");
        let entry = match (d.spiffe_id, d.serial) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    format!("{key}.serial"),
                    "cannot be combined with spiffe_id: an entry has exactly one (write two entries)",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    key,
                    "needs spiffe_id (an ID or a prefix ending in /*) or serial (a certificate serial number)",
                ))
            }
            (Some(id), None) => DenyEntry::Id(IdPattern::parse(&id).map_err(|e| {
                invalid(
                    format!("{key}.spiffe_id"),
                    format!("invalid SPIFFE ID {id:?}: {e}"),
                )
            })?),
            (None, Some(serial)) => {
                DenyEntry::Serial(normalize_serial(&serial).ok_or_else(|| {
                    invalid(
                        format!("{key}.serial"),
                        format!("invalid serial {serial:?}: expected hex digits, colons optional, at most 20 bytes"),
                    )
                })?)
            }
        };
        out.push(entry);
    }
    Ok(out)
}

/// The `tcp` entries: a port each (1-65535, once across entries), with a
/// non-empty `allow` list of ID patterns as routes have.
fn tcp_rules(prefix: &str, raw: Vec<RawTcp>) -> Result<Vec<TcpRuleConfig>, ConfigError> {
    let mut out: Vec<TcpRuleConfig> = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let key = format!("{prefix}tcp[{i}]");
        let port = u16::try_from(t.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(format!("{key}.port"), "must be between 1 and 65535"))?;
        if let Some(j) = out.iter().position(|r| r.port == port) {
            return Err(invalid(
                format!("{key}.port"),
                format!("port {port} is already the port of {prefix}tcp[{j}]; one entry per port"),
            ));
        }
        if t.allow.is_empty() {
            return Err(invalid(
                format!("{key}.allow"),
                "must list at least one caller (an ID or a prefix ending in /*); without a rule no tunnel reaches the port",
            ));
        }
        let mut allow = Vec::with_capacity(t.allow.len());
        for (j, a) in t.allow.iter().enumerate() {
            allow.push(IdPattern::parse(a).map_err(|e| {
                invalid(
                    format!("{key}.allow[{j}]"),
                    format!("invalid SPIFFE ID {a:?}: {e}"),
                )
            })?);
        }
        out.push(TcpRuleConfig { port, allow });
    }
    Ok(out)
}

/// A certificate serial in the one form it is compared in: lowercase hex,
/// no colons, no leading zeros (`"0"` for zero). `None` when `s` is not
/// hex (colons aside) or longer than the 20 bytes RFC 5280 allows.
pub fn normalize_serial(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() || s.starts_with(':') || s.ends_with(':') || s.contains("::") {
        return None;
    }
    let digits: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = without_leading_zeros(&digits);
    if trimmed.len() > 40 {
        return None;
    }
    Some(trimmed.to_owned())
}

/// `hex` without leading zeros (`"0"` for zero; an empty string stays
/// empty): the zero rule of [`normalize_serial`], without allocating, for
/// comparing a serial as it is handed in with a normalized one.
pub(crate) fn without_leading_zeros(hex: &str) -> &str {
    match hex.trim_start_matches('0') {
        "" if !hex.is_empty() => "0",
        s => s,
    }
}

/// A duration as it is written in configuration (`24h`, `15m`, `1m30s`,
/// `7d`), for `check-config`.
pub fn format_duration(d: Duration) -> String {
    use std::fmt::Write;
    let mut secs = d.as_secs();
    let ms = d.subsec_millis();
    let mut s = String::new();
    // Days only from two on: "24h" reads better than "1d" in a window.
    if secs >= 2 * 86_400 && secs.is_multiple_of(86_400) {
        let _ = write!(s, "{}d", secs / 86_400);
        return s;
    }
    for (unit, len) in [("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= len {
            let _ = write!(s, "{}{unit}", secs / len);
            secs %= len;
        }
    }
    if ms > 0 || s.is_empty() {
        let _ = write!(s, "{ms}ms");
    }
    s
}

fn inbound(raw: RawInbound) -> Result<InboundConfig, ConfigError> {
    let listen = socket_addr("inbound.listen", &raw.listen)?;
    let app = host_port("inbound.app", &raw.app)?;
    if let Ok(addr) = app.parse::<std::net::SocketAddr>() {
        // IPv4 loopback has 127.0.0.6 to dial from (app_client::APP_SOURCE),
        // so that the app tells callers from its own local processes. On
        // these the app would see every caller as its own loopback address.
        let own = match addr.ip() {
            std::net::IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || v6.to_ipv4_mapped().is_some()
            }
            std::net::IpAddr::V4(v4) => v4.is_unspecified(),
        };
        if own {
            return Err(invalid(
                "inbound.app",
                "on [::1], [::], 0.0.0.0 or an IPv4-mapped address the app would see every caller as its own loopback address, and grant callers what it grants local processes; give the app's IPv4 loopback address (127.0.0.1:PORT), which the inbound dials from 127.0.0.6",
            ));
        }
    }
    let max_app_connections = raw.max_app_connections.unwrap_or(256);
    if max_app_connections == 0 || max_app_connections > (1 << 20) {
        return Err(invalid(
            "inbound.max_app_connections",
            "must be between 1 and 1048576",
        ));
    }
    let limits = limits(
        "inbound",
        &RawLimits {
            handshake_timeout: raw.handshake_timeout,
            header_read_timeout: raw.header_read_timeout,
            idle_timeout: raw.idle_timeout,
            tcp_idle_timeout: raw.tcp_idle_timeout,
            max_header_bytes: raw.max_header_bytes,
            max_connections: raw.max_connections,
            max_handshakes: raw.max_handshakes,
            max_concurrent_streams: raw.max_concurrent_streams,
            body_timeout: raw.body_timeout,
        },
        Duration::from_secs(30),
    )?;
    let max_connections_per_peer = raw
        .max_connections_per_peer
        .unwrap_or(limits.max_connections - limits.max_connections / 4);
    if max_connections_per_peer == 0 || max_connections_per_peer > limits.max_connections {
        return Err(invalid(
            "inbound.max_connections_per_peer",
            format!(
                "must be between 1 and max_connections ({})",
                limits.max_connections
            ),
        ));
    }
    let max_app_connections_per_peer = raw
        .max_app_connections_per_peer
        .unwrap_or(max_app_connections - max_app_connections / 4);
    if max_app_connections_per_peer == 0 || max_app_connections_per_peer > max_app_connections {
        return Err(invalid(
            "inbound.max_app_connections_per_peer",
            format!("must be between 1 and max_app_connections ({max_app_connections})"),
        ));
    }
    let default_policy = match raw.default_policy.as_deref() {
        None | Some("allow-trust-domain") => DefaultPolicy::AllowTrustDomain,
        Some("deny") => DefaultPolicy::Deny,
        Some(other) => {
            return Err(invalid(
                "inbound.default_policy",
                format!("unknown policy {other:?}; use \"allow-trust-domain\" or \"deny\""),
            ))
        }
    };
    let app_protocol = match raw.app_protocol.as_deref() {
        None | Some("auto") => AppProtocol::Auto,
        Some("http1") => AppProtocol::Http1,
        Some("h2") => AppProtocol::H2,
        Some(other) => {
            return Err(invalid(
                "inbound.app_protocol",
                format!("unknown protocol {other:?}; use \"auto\", \"http1\" or \"h2\""),
            ))
        }
    };
    let path_normalization = path_mode(
        "inbound.path_normalization",
        raw.path_normalization.as_deref(),
    )?;
    let headers_with_underscores = match raw.headers_with_underscores.as_deref() {
        None | Some("allow") => crate::http::owned::Underscores::Allow,
        Some("drop") => crate::http::owned::Underscores::Drop,
        Some("reject") => crate::http::owned::Underscores::Reject,
        Some(other) => {
            return Err(invalid(
                "inbound.headers_with_underscores",
                format!("unknown action {other:?}; use \"allow\", \"drop\" or \"reject\""),
            ))
        }
    };
    let (policy, policy_file) = match raw.policy_file {
        Some(file) => {
            // One source of truth: a policy half inline and half in the
            // file would change meaning with every reload of the file.
            for (present, key) in [
                (raw.routes.is_some(), "routes"),
                (raw.risk_rules.is_some(), "risk_rules"),
                (raw.deny.is_some(), "deny"),
                (raw.tcp.is_some(), "tcp"),
            ] {
                if present {
                    return Err(invalid(
                        format!("inbound.{key}"),
                        format!(
                            "cannot be combined with inbound.policy_file ({}); move it into that file",
                            file.display()
                        ),
                    ));
                }
            }
            if file.as_os_str().is_empty() {
                return Err(invalid("inbound.policy_file", "must name a file"));
            }
            let policy = load_policy_file(&file).map_err(|e| match e {
                // Which key named the file that could not be read: the
                // operator's main configuration is what they will look at.
                ConfigError::Read { .. } => invalid("inbound.policy_file", e),
                other => other,
            })?;
            (policy, Some(file))
        }
        None => (
            policy(
                "inbound.",
                RawPolicy {
                    routes: raw.routes,
                    risk_rules: raw.risk_rules,
                    deny: raw.deny,
                    tcp: raw.tcp,
                },
            )?,
            None,
        ),
    };
    let http_ports = match raw.http_ports {
        Some(list) => {
            let mut out: Vec<u16> = Vec::with_capacity(list.len());
            for (i, p) in list.into_iter().enumerate() {
                let port = u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
                    invalid(
                        format!("inbound.http_ports[{i}]"),
                        "must be between 1 and 65535",
                    )
                })?;
                if !out.contains(&port) {
                    out.push(port);
                }
            }
            out
        }
        None => app_port(&app).into_iter().collect(),
    };
    let policy_prefix = match &policy_file {
        Some(f) => format!("{}: ", f.display()),
        None => "inbound.".to_owned(),
    };
    check_tcp_ports(&policy_prefix, &policy, &http_ports, &app, &[])?;
    let max_tunnels = raw.max_tunnels.unwrap_or(4096);
    if max_tunnels == 0 || max_tunnels > (1 << 20) {
        return Err(invalid(
            "inbound.max_tunnels",
            "must be between 1 and 1048576",
        ));
    }
    let max_tunnels_per_peer = raw.max_tunnels_per_peer.unwrap_or(256.min(max_tunnels));
    if max_tunnels_per_peer == 0 || max_tunnels_per_peer > max_tunnels {
        return Err(invalid(
            "inbound.max_tunnels_per_peer",
            "must be between 1 and max_tunnels",
        ));
    }
    let mut stepup = InboundStepUpConfig::default();
    if let Some(s) = raw.stepup {
        stepup.nonce_ttl = duration(
            "inbound.stepup.nonce_ttl",
            s.nonce_ttl.as_ref(),
            stepup.nonce_ttl,
        )?;
        if stepup.nonce_ttl.is_zero() {
            return Err(invalid(
                "inbound.stepup.nonce_ttl",
                "must be greater than zero",
            ));
        }
        stepup.max_clock_skew = duration(
            "inbound.stepup.max_clock_skew",
            s.max_clock_skew.as_ref(),
            stepup.max_clock_skew,
        )?;
        stepup.max_body = s.max_body.unwrap_or(stepup.max_body);
        stepup.max_outstanding = s.max_outstanding.unwrap_or(stepup.max_outstanding);
        if stepup.max_outstanding == 0 {
            return Err(invalid(
                "inbound.stepup.max_outstanding",
                "must be at least 1",
            ));
        }
        stepup.max_outstanding_per_peer = s
            .max_outstanding_per_peer
            .unwrap_or(stepup.max_outstanding_per_peer);
        if stepup.max_outstanding_per_peer == 0
            || stepup.max_outstanding_per_peer > stepup.max_outstanding
        {
            return Err(invalid(
                "inbound.stepup.max_outstanding_per_peer",
                "must be between 1 and max_outstanding",
            ));
        }
        stepup.max_buffered = s.max_buffered.unwrap_or(stepup.max_buffered);
        if stepup.max_buffered < stepup.max_body {
            return Err(invalid(
                "inbound.stepup.max_buffered",
                "must be at least max_body (one body is held whole)",
            ));
        }
        stepup.channel_binding = s.channel_binding.unwrap_or(true);
        stepup.audit_log = audit_log(s.audit_log.as_ref())?;
        stepup.max_tracked_identities = s
            .max_tracked_identities
            .unwrap_or(stepup.max_tracked_identities);
        if !(1..=MAX_TRACKED_IDENTITIES).contains(&stepup.max_tracked_identities) {
            return Err(invalid(
                "inbound.stepup.max_tracked_identities",
                format!("must be between 1 and {MAX_TRACKED_IDENTITIES}"),
            ));
        }
    }
    Ok(InboundConfig {
        listen,
        app,
        default_policy,
        app_protocol,
        path_normalization,
        app_connect_timeout: nonzero_duration(
            "inbound.app_connect_timeout",
            raw.app_connect_timeout.as_ref(),
            Duration::from_secs(2),
        )?,
        app_pool_idle_timeout: nonzero_duration(
            "inbound.app_pool_idle_timeout",
            raw.app_pool_idle_timeout.as_ref(),
            Duration::from_secs(4),
        )?,
        max_app_connections,
        max_app_connections_per_peer,
        max_connections_per_peer,
        policy,
        policy_file,
        stepup,
        headers_with_underscores,
        limits,
        http_ports,
        own_ports: Vec::new(),
        max_tunnels,
        max_tunnels_per_peer,
    })
}

/// The port of `[inbound] app` (`host:port`, IPv6 hosts bracketed).
fn app_port(app: &str) -> Option<u16> {
    app.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// A policy's `tcp` ports against the ports that can never be tunnel
/// targets: `http_ports` (a port is either HTTP or TCP, so that plain HTTP
/// can never reach a port a `tcp` rule guards), the port of `[inbound]
/// app` (`app`: a tunnel there would carry raw HTTP to the app past the
/// routes, step-up and the sidecar's own fields, even when `http_ports`
/// leaves it out) and `own_ports` (the proxy's listeners). `prefix` starts
/// the key named in the error, as in [`policy`]. Also used on a policy file
/// reload, against the ports of the configuration in use.
pub fn check_tcp_ports(
    prefix: &str,
    policy: &PolicyConfig,
    http_ports: &[u16],
    app: &str,
    own_ports: &[u16],
) -> Result<(), ConfigError> {
    for (i, t) in policy.tcp.iter().enumerate() {
        if own_ports.contains(&t.port) {
            return Err(invalid(
                format!("{prefix}tcp[{i}].port"),
                format!(
                    "port {} is a listen port of this proxy (inbound, outbound or admin); it is never a tunnel target",
                    t.port
                ),
            ));
        }
        if http_ports.contains(&t.port) {
            return Err(invalid(
                format!("{prefix}tcp[{i}].port"),
                format!(
                    "port {} is also in inbound.http_ports; a port is either HTTP or TCP (tunnels only), so remove it from one of them",
                    t.port
                ),
            ));
        }
        if app_port(app) == Some(t.port) {
            return Err(invalid(
                format!("{prefix}tcp[{i}].port"),
                format!(
                    "port {} is the port of inbound.app, whose HTTP goes through the routes; it is never a tunnel target",
                    t.port
                ),
            ));
        }
    }
    Ok(())
}

fn identity(raw: RawIdentity) -> Result<IdentityConfig, ConfigError> {
    let source = match (raw.files, raw.ca) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "identity.ca",
                "[identity.files] and [identity.ca] are mutually exclusive; keep one",
            ))
        }
        (None, None) => {
            return Err(invalid(
                "identity.files",
                "missing: set identity.files.cert and identity.files.key, or [identity.ca]",
            ))
        }
        (Some(f), None) => {
            match (&f.key, &raw.pkcs11) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "identity.files.key",
                        "must be absent when [identity.pkcs11] holds the key; remove one",
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        "identity.files.key",
                        "missing: set identity.files.key, or hold the key in a token with [identity.pkcs11]",
                    ))
                }
                _ => {}
            }
            IdentitySource::Files(FilesSourceConfig {
                cert: f.cert,
                key: f.key,
            })
        }
        (None, Some(c)) => IdentitySource::Ca(ca_source(c)?),
    };
    let pkcs11 = raw.pkcs11.map(pkcs11_source).transpose()?;
    let reload_interval = duration(
        "identity.reload_interval",
        raw.reload_interval.as_ref(),
        Duration::from_secs(10),
    )?;
    if reload_interval < Duration::from_millis(100) {
        return Err(invalid(
            "identity.reload_interval",
            "must be at least 100ms",
        ));
    }
    Ok(IdentityConfig {
        trust_bundle: raw.trust_bundle,
        source,
        reload_interval,
        pkcs11,
    })
}

/// `[identity.pkcs11]`: every key required and non-empty (a missing one is
/// named, rather than serde's generic "missing field").
fn pkcs11_source(raw: RawIdentityPkcs11) -> Result<Pkcs11Config, ConfigError> {
    fn path(key: &'static str, v: Option<PathBuf>) -> Result<PathBuf, ConfigError> {
        match v {
            Some(p) if !p.as_os_str().is_empty() => Ok(p),
            Some(_) => Err(invalid(key, "must not be empty")),
            None => Err(invalid(key, "missing (required in [identity.pkcs11])")),
        }
    }
    fn label(key: &'static str, v: Option<String>) -> Result<String, ConfigError> {
        match v {
            Some(l) if l.is_empty() => Err(invalid(key, "must not be empty")),
            // The label goes into a PKCS#11 URI: refuse what would make it
            // ambiguous (';' separates attributes) or unprintable.
            Some(l) if l.chars().any(|c| c == ';' || c.is_control()) => Err(invalid(
                key,
                format!("{l:?} must not contain ';' or control characters"),
            )),
            Some(l) => Ok(l),
            None => Err(invalid(key, "missing (required in [identity.pkcs11])")),
        }
    }
    Ok(Pkcs11Config {
        module: path("identity.pkcs11.module", raw.module)?,
        token_label: label("identity.pkcs11.token_label", raw.token_label)?,
        key_label: label("identity.pkcs11.key_label", raw.key_label)?,
        pin_file: path("identity.pkcs11.pin_file", raw.pin_file)?,
    })
}

/// `identity.ca.url`: one URL or a non-empty list of distinct ones, each
/// `https://HOST:PORT`.
fn ca_urls(raw: &toml::Value) -> Result<Vec<String>, ConfigError> {
    const KEY: &str = "identity.ca.url";
    let listed: Vec<&toml::Value> = match raw {
        toml::Value::Array(a) if a.is_empty() => {
            return Err(invalid(KEY, "the list is empty; give at least one URL"))
        }
        toml::Value::Array(a) => a.iter().collect(),
        one => vec![one],
    };
    let mut urls: Vec<String> = Vec::with_capacity(listed.len());
    for v in listed {
        let Some(given) = v.as_str() else {
            return Err(invalid(
                KEY,
                format!("{v} is not a string; expected \"https://HOST:PORT\" or a list of them"),
            ));
        };
        let url = given.trim_end_matches('/').to_owned();
        let authority = url
            .strip_prefix("https://")
            .ok_or_else(|| invalid(KEY, format!("{given:?} must be https://HOST:PORT")))?;
        host_port(KEY, authority)?;
        if urls.contains(&url) {
            return Err(invalid(KEY, format!("{given:?} is listed twice")));
        }
        urls.push(url);
    }
    Ok(urls)
}

fn ca_source(raw: RawIdentityCa) -> Result<CaSourceConfig, ConfigError> {
    let urls = ca_urls(&raw.url)?;
    let spiffe_id = keyproof_identity::SpiffeId::parse(&raw.spiffe_id).map_err(|e| {
        invalid(
            "identity.ca.spiffe_id",
            format!("invalid SPIFFE ID {:?}: {e}", raw.spiffe_id),
        )
    })?;
    if !spiffe_id.is_workload() {
        // The CA signs only workload IDs; without this the sidecar would
        // start and then fail its bootstrap for ever.
        return Err(invalid(
            "identity.ca.spiffe_id",
            format!(
                "{spiffe_id} names the trust domain, not a workload; the CA issues only IDs with a path, e.g. spiffe://{}/ns/NAMESPACE/sa/ACCOUNT",
                spiffe_id.trust_domain_name()
            ),
        ));
    }
    let server_id = match &raw.server_id {
        Some(s) => IdPattern::parse(s).map_err(|e| {
            invalid(
                "identity.ca.server_id",
                format!("invalid SPIFFE ID {s:?}: {e}"),
            )
        })?,
        None => IdPattern::parse(&keyproof_identity::spiffe::ca_server_id(
            spiffe_id.trust_domain_name(),
        ))
        .map_err(|e| invalid("identity.ca.server_id", e))?,
    };
    let td = spiffe_id.trust_domain_name();
    if !keyproof_identity::spiffe::names_only_ca_servers(&server_id, td) {
        return Err(invalid(
            "identity.ca.server_id",
            format!(
                "{server_id} may match a workload's ID: whoever held one would be taken for the CA, sent this sidecar's bootstrap token and trusted for its roots; use spiffe://{td}/keyproof-ca or an ID or pattern below it, which the CA never issues to a workload"
            ),
        ));
    }
    let key_type = match raw.key_type.as_deref() {
        None => keyproof_identity::keys::KeyType::EcdsaP256,
        Some(k) => k.parse().map_err(|_| {
            invalid(
                "identity.ca.key_type",
                format!("unknown key type {k:?}; use \"ecdsa-p256\" or \"ed25519\""),
            )
        })?,
    };
    let bundle_refresh = duration(
        "identity.ca.bundle_refresh",
        raw.bundle_refresh.as_ref(),
        Duration::from_secs(300),
    )?;
    if bundle_refresh < Duration::from_secs(1) {
        return Err(invalid("identity.ca.bundle_refresh", "must be at least 1s"));
    }
    let credential = credential(raw.join_token_file, raw.service_account_token_file)?;
    Ok(CaSourceConfig {
        urls,
        spiffe_id,
        credential,
        server_id,
        key_type,
        bundle_refresh,
    })
}

/// Exactly one bootstrap credential: a join token for workloads outside
/// Kubernetes, or the projected ServiceAccount token a pod is given.
fn credential(
    join_token_file: Option<PathBuf>,
    service_account_token_file: Option<PathBuf>,
) -> Result<Credential, ConfigError> {
    const JOIN: &str = "identity.ca.join_token_file";
    const SA: &str = "identity.ca.service_account_token_file";
    let non_empty = |key: &str, p: PathBuf| {
        if p.as_os_str().is_empty() {
            Err(invalid(key, "must name a file"))
        } else {
            Ok(p)
        }
    };
    match (join_token_file, service_account_token_file) {
        (Some(_), Some(_)) => Err(invalid(
            SA,
            "cannot be combined with identity.ca.join_token_file; set exactly one \
             (service_account_token_file in Kubernetes, join_token_file elsewhere)",
        )),
        (None, None) => Err(invalid(
            "identity.ca",
            "missing a bootstrap credential: set service_account_token_file (a projected \
             Kubernetes ServiceAccount token) or join_token_file (a keyproof-ca join token)",
        )),
        (Some(p), None) => Ok(Credential::JoinToken(non_empty(JOIN, p)?)),
        (None, Some(p)) => Ok(Credential::ServiceAccountToken(non_empty(SA, p)?)),
    }
}

/// Parses a host condition: `*`, an exact name, or labels with `*.` in
/// front and `{placeholder}` labels.
fn host_pattern(key: &str, raw: &str) -> Result<HostPattern, ConfigError> {
    let host = raw.trim().to_ascii_lowercase();
    let bad = |why: &str| invalid(key, format!("invalid host {raw:?}: {why}"));
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err(bad("not a host name or pattern"));
    }
    if host == "*" {
        return Ok(HostPattern::Any);
    }
    if !host.contains(['*', '{', '}']) {
        return Ok(HostPattern::Exact(host));
    }
    let (any_prefix, rest) = match host.strip_prefix("*.") {
        Some(r) => (true, r),
        None => (false, host.as_str()),
    };
    let mut labels = Vec::new();
    for l in rest.split('.') {
        if let Some(name) = l.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(bad("a placeholder is {name}, name in [a-z0-9_]"));
            }
            if labels
                .iter()
                .any(|x| matches!(x, HostLabel::Capture(n) if n == name))
            {
                return Err(bad(&format!("placeholder {{{name}}} appears twice")));
            }
            labels.push(HostLabel::Capture(name.to_owned()));
        } else if l.is_empty() || l.contains(['*', '{', '}']) {
            return Err(bad(
                "\"*\" only as the first label, and a placeholder is a whole label",
            ));
        } else {
            labels.push(HostLabel::Literal(l.to_owned()));
        }
    }
    Ok(HostPattern::Labels { any_prefix, labels })
}

/// Parses an identity that may use `{placeholders}`; each must be one the
/// host pattern captures.
fn identity_template(
    key: &str,
    raw: &str,
    host: Option<&HostPattern>,
) -> Result<IdentityTemplate, ConfigError> {
    let mut parts = Vec::new();
    let mut rest = raw;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(TemplatePart::Literal(rest[..open].to_owned()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err(invalid(key, format!("unclosed placeholder in {raw:?}")));
        };
        let name = &rest[open + 1..open + close];
        let captured = host.is_some_and(|h| h.captures().any(|c| c == name));
        if !captured {
            return Err(invalid(
                key,
                format!(
                    "placeholder {{{name}}} in {raw:?} is not captured by the host pattern \
                     (a host like \"*.{{{name}}}.svc.cluster.local\" captures it)"
                ),
            ));
        }
        parts.push(TemplatePart::Placeholder(name.to_owned()));
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') {
        return Err(invalid(key, format!("unmatched \"}}\" in {raw:?}")));
    }
    if !rest.is_empty() {
        parts.push(TemplatePart::Literal(rest.to_owned()));
    }
    let sample: String = parts
        .iter()
        .map(|p| match p {
            TemplatePart::Literal(s) => s.as_str(),
            TemplatePart::Placeholder(_) => "x",
        })
        .collect();
    let fixed = IdPattern::parse(&sample)
        .map_err(|e| invalid(key, format!("invalid SPIFFE ID {raw:?}: {e}")))?;
    Ok(IdentityTemplate {
        text: raw.to_owned(),
        parts,
        fixed,
    })
}

/// Validates upstream rules; `prefix` starts every key named in an error
/// (`outbound.upstreams` inline, the file path and `: upstreams` in an
/// upstreams file).
fn upstream_rules(prefix: &str, raw: Vec<RawUpstream>) -> Result<Vec<UpstreamRule>, ConfigError> {
    let mut rules: Vec<UpstreamRule> = Vec::with_capacity(raw.len());
    for (i, u) in raw.into_iter().enumerate() {
        let key = format!("{prefix}[{i}]");
        let host = u
            .host
            .as_deref()
            .map(|h| host_pattern(&format!("{key}.host"), h))
            .transpose()?;
        let cidr = u
            .cidr
            .as_deref()
            .map(|c| {
                c.trim()
                    .parse::<ipnet::IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|e| {
                        invalid(
                            format!("{key}.cidr"),
                            format!("invalid CIDR {c:?}: {e}; expected e.g. \"10.0.0.0/8\""),
                        )
                    })
            })
            .transpose()?;
        let port = u
            .port
            .map(|p| {
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid(format!("{key}.port"), "must be in 1..65535"))
            })
            .transpose()?;
        if host.is_none() && cidr.is_none() && port.is_none() {
            return Err(invalid(
                key,
                "a rule needs at least one of host, cidr and port",
            ));
        }
        let address = u
            .address
            .as_deref()
            .map(|a| host_port(&format!("{key}.address"), a))
            .transpose()?;
        let identity = identity_template(&format!("{key}.identity"), &u.identity, host.as_ref())?;
        let balance = match u.balance.as_deref() {
            None if address.is_none() => Balance::Connection,
            None => Balance::Shared,
            Some("connection") => Balance::Connection,
            Some("shared") => Balance::Shared,
            Some(other) => {
                return Err(invalid(
                    format!("{key}.balance"),
                    format!("unknown value {other:?}; expected \"connection\" or \"shared\""),
                ))
            }
        };
        if rules
            .iter()
            .any(|o| o.host == host && o.cidr == cidr && o.port == port)
        {
            let (k, what) = match &host {
                Some(h) if cidr.is_none() && port.is_none() => {
                    ("host", format!("host {:?}", h.to_string()))
                }
                _ if port.is_some() => ("port", "rule (same host, cidr and port)".to_owned()),
                _ => ("cidr", "rule (same host, cidr and port)".to_owned()),
            };
            return Err(invalid(format!("{key}.{k}"), format!("duplicate {what}")));
        }
        rules.push(UpstreamRule {
            host,
            cidr,
            port,
            address,
            identity,
            balance,
        });
    }
    Ok(rules)
}

/// Reads and validates an upstreams file (`[outbound] upstreams_file`):
/// `[[upstreams]]` at its top level. Errors name the file and the key
/// (`/etc/keyproof/upstreams.toml: upstreams[2].cidr`).
pub fn parse_upstreams(path: &Path, text: &str) -> Result<Vec<UpstreamRule>, ConfigError> {
    if text.trim().is_empty() {
        // What a truncate-then-write editor leaves between its two steps.
        return Err(ConfigError::Parse(format!(
            "{}: the upstreams file is empty (no upstreams is written `upstreams = []`)",
            path.display()
        )));
    }
    let raw: RawUpstreamsFile =
        toml::from_str(text).map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?;
    // A file of comments alone is as likely a partial write as the empty
    // one: taken as no upstreams, it would send meshed traffic out in plain
    // text. No upstreams is said in so many words.
    let Some(upstreams) = raw.upstreams else {
        return Err(ConfigError::Parse(format!(
            "{}: the upstreams file has no `upstreams` key (no upstreams is written `upstreams = []`)",
            path.display()
        )));
    };
    upstream_rules(&format!("{}: upstreams", path.display()), upstreams)
}

fn outbound(raw: RawOutbound) -> Result<OutboundConfig, ConfigError> {
    let listen = socket_addr("outbound.listen", &raw.listen)?;
    // Whoever reaches the outbound is taken for the app and calls out as
    // this workload, so only the pod itself may: the app on loopback, and
    // iptables' REDIRECT, which delivers to loopback.
    if !listen.ip().is_loopback() {
        return Err(invalid(
            "outbound.listen",
            format!(
                "{listen} is not a loopback address: every host that reaches it could call out as this workload; listen on 127.0.0.1 (redirected connections arrive there)"
            ),
        ));
    }
    let upstreams = match &raw.upstreams_file {
        Some(file) => {
            if !raw.upstreams.is_empty() {
                return Err(invalid(
                    "outbound.upstreams",
                    format!(
                        "cannot be combined with outbound.upstreams_file ({}); move them into that file",
                        file.display()
                    ),
                ));
            }
            if file.as_os_str().is_empty() {
                return Err(invalid("outbound.upstreams_file", "must name a file"));
            }
            let text = crate::files::read_to_string(file).map_err(|e| {
                invalid(
                    "outbound.upstreams_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            parse_upstreams(file, &text)?
        }
        None => upstream_rules("outbound.upstreams", raw.upstreams)?,
    };
    let mut opaque_ports: Vec<u16> = Vec::new();
    for (i, p) in raw.opaque_ports.unwrap_or_default().into_iter().enumerate() {
        let p = u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(format!("outbound.opaque_ports[{i}]"), "must be in 1..65535"))?;
        if !opaque_ports.contains(&p) {
            opaque_ports.push(p);
        }
    }
    let unmeshed = match raw.unmeshed.as_deref() {
        None | Some("passthrough") => Unmeshed::Passthrough,
        Some("deny") => Unmeshed::Deny,
        Some(other) => {
            return Err(invalid(
                "outbound.unmeshed",
                format!("unknown value {other:?}; use \"passthrough\" or \"deny\""),
            ))
        }
    };
    let detect_timeout = duration(
        "outbound.detect_timeout",
        raw.detect_timeout.as_ref(),
        Duration::from_millis(300),
    )?;
    if detect_timeout.is_zero() || detect_timeout > Duration::from_secs(60) {
        return Err(invalid(
            "outbound.detect_timeout",
            "must be more than 0 and at most 60s",
        ));
    }
    Ok(OutboundConfig {
        listen,
        upstreams,
        upstreams_file: raw.upstreams_file,
        detect_timeout,
        opaque_ports,
        unmeshed,
        connect_timeout: nonzero_duration(
            "outbound.connect_timeout",
            raw.connect_timeout.as_ref(),
            Duration::from_secs(5),
        )?,
        pool_idle_timeout: nonzero_duration(
            "outbound.pool_idle_timeout",
            raw.pool_idle_timeout.as_ref(),
            Duration::from_secs(15),
        )?,
        stepup_max_body: raw.stepup.and_then(|s| s.max_body).unwrap_or(1 << 20),
        path_normalization: path_mode(
            "outbound.path_normalization",
            raw.path_normalization.as_deref(),
        )?,
        // The app's own pool decides when its idle connections go (Go:
        // 90 s); closing them first races its next request, so the loopback
        // listener waits longer than common client idle timeouts.
        limits: limits(
            "outbound",
            &RawLimits {
                handshake_timeout: raw.handshake_timeout,
                header_read_timeout: raw.header_read_timeout,
                idle_timeout: raw.idle_timeout,
                tcp_idle_timeout: raw.tcp_idle_timeout,
                max_header_bytes: raw.max_header_bytes,
                max_connections: raw.max_connections,
                // The outbound's listener is plaintext: no handshakes.
                max_handshakes: None,
                max_concurrent_streams: raw.max_concurrent_streams,
                body_timeout: raw.body_timeout,
            },
            Duration::from_secs(120),
        )?,
    })
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = crate::files::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg = Self::parse(&text)?;
        if let Some(AuditSink::File(p)) = cfg
            .inbound
            .as_ref()
            .and_then(|i| i.stepup.audit_log.as_ref())
        {
            check_audit_path(p)?;
        }
        Ok(cfg)
    }

    /// Validates configuration text. `[inbound] policy_file` is read and
    /// validated here (the policy is configuration); the other files it
    /// names are checked later, when the identity is loaded.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let identity = identity(raw.identity)?;
        let inbound = raw.inbound.map(inbound).transpose()?;
        let outbound = raw.outbound.map(outbound).transpose()?;
        if inbound.is_none() && outbound.is_none() {
            return Err(invalid(
                "inbound",
                "neither [inbound] nor [outbound] is configured; nothing to do",
            ));
        }
        let admin = raw
            .admin
            .map(|a| socket_addr("admin.listen", &a.listen).map(|listen| AdminConfig { listen }))
            .transpose()?;
        // Two listeners on one port fail at bind, after a rollout: said
        // here, by check-config. The unspecified address takes the port on
        // every address of its family (and `[::]` usually on IPv4 too).
        let listens = [
            ("inbound.listen", inbound.as_ref().map(|i| i.listen)),
            ("outbound.listen", outbound.as_ref().map(|o| o.listen)),
            ("admin.listen", admin.as_ref().map(|a| a.listen)),
        ];
        for (n, (key, a)) in listens.iter().enumerate() {
            for (other, b) in &listens[..n] {
                if let (Some(a), Some(b)) = (a, b) {
                    let overlap =
                        a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
                    if a.port() != 0 && a.port() == b.port() && overlap {
                        return Err(invalid(
                            *key,
                            format!(
                                "{a} is also {other} ({b}): each listener needs a port of its own"
                            ),
                        ));
                    }
                }
            }
        }
        let mut inbound = inbound;
        if let Some(i) = inbound.as_mut() {
            let mut own = vec![i.listen.port()];
            own.extend(outbound.as_ref().map(|o| o.listen.port()));
            own.extend(admin.as_ref().map(|a| a.listen.port()));
            // Port 0 (an ephemeral port, tests) is never an original port.
            own.retain(|p| *p != 0);
            own.dedup();
            if let Some(p) = i.http_ports.iter().find(|p| own.contains(p)) {
                return Err(invalid(
                    "inbound.http_ports",
                    format!("port {p} is a listen port of this proxy (inbound, outbound or admin); nothing is ever forwarded to it"),
                ));
            }
            let prefix = match &i.policy_file {
                Some(f) => format!("{}: ", f.display()),
                None => "inbound.".to_owned(),
            };
            check_tcp_ports(&prefix, &i.policy, &[], "", &own)?;
            i.own_ports = own;
        }
        let worker_threads = raw.runtime.worker_threads.unwrap_or(1);
        if worker_threads == 0 || worker_threads > 1024 {
            return Err(invalid(
                "runtime.worker_threads",
                "must be between 1 and 1024",
            ));
        }
        let log_format = match raw.runtime.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "runtime.log_format",
                    format!("unknown format {other:?}; use \"text\" or \"json\""),
                ))
            }
        };
        let runtime = RuntimeConfig {
            worker_threads,
            log_format,
            shutdown_grace: duration(
                "runtime.shutdown_grace",
                raw.runtime.shutdown_grace.as_ref(),
                Duration::from_secs(30),
            )?,
            drain_delay: duration(
                "runtime.drain_delay",
                raw.runtime.drain_delay.as_ref(),
                Duration::ZERO,
            )?,
            memory_limit: memory_limit(raw.runtime.memory_limit.as_ref())?,
        };
        Ok(Config {
            identity,
            inbound,
            outbound,
            admin,
            runtime,
        })
    }

    /// A short human explanation of what this configuration does, printed
    /// by `check-config`.
    pub fn explain(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        match &self.identity.source {
            IdentitySource::Files(f) => {
                let key = match (&f.key, &self.identity.pkcs11) {
                    (_, Some(p)) => format!(
                        "key in the PKCS#11 token: {} (never leaves the token)",
                        p.describe()
                    ),
                    (Some(k), None) => format!("key {}", k.display()),
                    (None, None) => "no key".into(),
                };
                let _ = writeln!(
                    s,
                    "identity: cert {} {} trust bundle {} (reloaded on change, re-read every {:?})",
                    f.cert.display(),
                    key,
                    self.identity.trust_bundle.display(),
                    self.identity.reload_interval
                );
            }
            IdentitySource::Ca(c) => {
                let key = match &self.identity.pkcs11 {
                    Some(p) => format!(
                        "key in the PKCS#11 token: {} ({} generated there if absent, reused for every renewal, never leaves the token)",
                        p.describe(),
                        c.key_type.as_str()
                    ),
                    None => format!("{} key in memory", c.key_type.as_str()),
                };
                let _ = writeln!(
                    s,
                    "identity: {} from the CA at {} (server {}), {}, bootstrap trust {}, bootstrap credential {} {} (re-read at every bootstrap)",
                    c.spiffe_id,
                    c.describe_urls(),
                    c.server_id,
                    key,
                    self.identity.trust_bundle.display(),
                    c.credential_key(),
                    c.credential.path().display()
                );
            }
        }
        if let Some(i) = &self.inbound {
            let _ = writeln!(
                s,
                "inbound: mutual TLS on {} -> app {} (default policy {})",
                i.listen,
                i.app,
                i.default_policy.as_str()
            );
            let http = i
                .http_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                s,
                "  http_ports [{http}]: a redirected connection's HTTP goes to 127.0.0.1:<port> for these ports only (403 for any other)"
            );
            let _ = writeln!(
                s,
                "  tunnels: at most {} open, {} per caller (503 beyond)",
                i.max_tunnels, i.max_tunnels_per_peer
            );
            if let Some(f) = &i.policy_file {
                let _ = writeln!(
                    s,
                    "  policy (routes, risk rules, deny list) from {} (re-read on change)",
                    f.display()
                );
            }
            for d in &i.policy.deny {
                // A thief holding the key can renew into a new serial.
                let lasts = match d {
                    DenyEntry::Serial(_) => " (until that certificate is renewed: revoke it at the CA too, keyproof-ca revoke --serial)",
                    DenyEntry::Id(_) => "",
                };
                let _ = writeln!(s, "  deny {}: 403 on every path{lasts}", d.label());
            }
            for t in &i.policy.tcp {
                let allow = t
                    .allow
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(
                    s,
                    "  tcp port {} (HTTP/2 CONNECT -> 127.0.0.1:{}): allow [{allow}]",
                    t.port, t.port
                );
            }
            for r in &i.policy.routes {
                let methods = if r.methods.is_empty() {
                    "any method".to_owned()
                } else {
                    r.methods
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let allow = r
                    .allow
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let step_up = match r.step_up {
                    StepUpMode::Never => String::new(),
                    StepUpMode::Always => ", step-up required".to_owned(),
                    StepUpMode::Risk => {
                        format!(", step-up by risk: {}", i.policy.explain_risk(r))
                    }
                };
                let _ = writeln!(
                    s,
                    "  route {} ({methods}): allow [{allow}]{step_up}",
                    r.path_prefix
                );
            }
            for name in i.policy.unused_risk_rules() {
                let _ = writeln!(s, "  risk rule {name} is used by no route");
            }
            if i.policy
                .routes
                .iter()
                .any(|r| r.step_up == StepUpMode::Risk)
            {
                let _ = writeln!(
                    s,
                    "  risk state for at most {} caller identities (least recently seen forgotten first; a forgotten caller is new again)",
                    i.stepup.max_tracked_identities
                );
            }
            match &i.stepup.audit_log {
                None => {}
                Some(AuditSink::Stdout) => {
                    let _ = writeln!(s, "  step-up audit records to standard output");
                }
                Some(AuditSink::File(p)) => {
                    let _ = writeln!(s, "  step-up audit records appended to {}", p.display());
                }
            }
        }
        if let Some(o) = &self.outbound {
            let _ = writeln!(s, "outbound: plaintext on {}", o.listen);
            if let Some(f) = &o.upstreams_file {
                let _ = writeln!(
                    s,
                    "  upstream rules from {} (re-read on change)",
                    f.display()
                );
            }
            for u in &o.upstreams {
                let _ = writeln!(s, "  {}", u.describe());
            }
            let _ = writeln!(
                s,
                "  redirected connections: protocol detected within {:?}{}; destinations no rule matches are {}",
                o.detect_timeout,
                if o.opaque_ports.is_empty() {
                    String::new()
                } else {
                    let ports: Vec<String> = o.opaque_ports.iter().map(u16::to_string).collect();
                    format!(", ports {} always opaque TCP", ports.join(", "))
                },
                match o.unmeshed {
                    Unmeshed::Passthrough => "passed through in plain TCP",
                    Unmeshed::Deny => "refused",
                }
            );
        }
        if let Some(a) = &self.admin {
            let _ = writeln!(s, "admin: http://{}/metrics", a.listen);
        }
        let _ = writeln!(
            s,
            "runtime: {} worker thread(s); {}",
            self.runtime.worker_threads,
            match self.runtime.memory_limit {
                MemoryLimit::Auto =>
                    "memory limit half the container's (none outside one)".to_owned(),
                MemoryLimit::Off => "no memory limit".to_owned(),
                MemoryLimit::Bytes(b) => format!("connections shed above {} MiB of heap", b >> 20),
            }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "[identity]\ntrust_bundle = \"ca.crt\"\n[identity.files]\ncert = \"c\"\nkey = \"k\"\n";

    #[test]
    fn path_settings() {
        let inbound = |extra: &str, prefix: &str| {
            Config::parse(&format!(
                "{BASE}[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"127.0.0.1:2\"\n{extra}[[inbound.routes]]\npath_prefix = \"{prefix}\"\n"
            ))
        };
        let c = inbound("", "/admin").unwrap();
        assert_eq!(c.inbound.unwrap().path_normalization, PathMode::Strict);
        let c = inbound("path_normalization = \"keep-slashes\"\n", "/api/").unwrap();
        assert_eq!(c.inbound.unwrap().path_normalization, PathMode::KeepSlashes);
        let e = inbound("path_normalization = \"off\"\n", "/a")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("inbound.path_normalization: unknown mode"),
            "{e}"
        );
        for (prefix, says) in [
            ("/admin/../x", "write \"/x\""),
            ("//a", "write \"/a\""),
            ("/%61dmin", "write \"/admin\""),
            ("/a%2fb", "encoded '/'"),
            ("/a;b", "';'"),
            ("admin", "start with '/'"),
        ] {
            let e = inbound("", prefix).unwrap_err().to_string();
            assert!(e.starts_with("inbound.routes[0].path_prefix: "), "{e}");
            assert!(e.contains(says), "{prefix}: {e}");
        }
        let out = Config::parse(&format!(
            "{BASE}[outbound]\nlisten = \"127.0.0.1:3\"\npath_normalization = \"strictest\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(out.starts_with("outbound.path_normalization: "), "{out}");
    }

    #[test]
    fn names_bad_keys() {
        let bad_allow = format!(
            "{BASE}[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"127.0.0.1:2\"\n[[inbound.routes]]\npath_prefix = \"/a\"\n[[inbound.routes]]\npath_prefix = \"/b\"\nallow = [\"http://x\"]\n"
        );
        let e = Config::parse(&bad_allow).unwrap_err().to_string();
        assert!(
            e.starts_with("inbound.routes[1].allow[0]: invalid SPIFFE ID"),
            "{e}"
        );
        let unknown = format!(
            "{BASE}[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"127.0.0.1:2\"\nbogus = 1\n"
        );
        let e = Config::parse(&unknown).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let addr = format!("{BASE}[outbound]\nlisten = \"nope\"\n");
        let e = Config::parse(&addr).unwrap_err().to_string();
        assert!(e.starts_with("outbound.listen:"), "{e}");
        // Round 12 auth F7: on these the app sees callers as itself.
        for own in [
            "[::1]:8080",
            "[::]:8080",
            "0.0.0.0:8080",
            "[::ffff:127.0.0.1]:8080",
        ] {
            let text = format!("{BASE}[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"{own}\"\n");
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(
                e.starts_with("inbound.app:") && e.contains("127.0.0.6"),
                "{e}"
            );
        }
        // Round 11 mesh F4: reachable from other hosts, the outbound would
        // call out as this workload for them.
        for open in ["0.0.0.0:15001", "[::]:15001", "10.1.2.3:15001"] {
            let addr = format!("{BASE}[outbound]\nlisten = \"{open}\"\n");
            let e = Config::parse(&addr).unwrap_err().to_string();
            assert!(
                e.starts_with("outbound.listen:") && e.contains("loopback"),
                "{e}"
            );
        }
        for local in ["127.0.0.1:15001", "127.0.0.2:15001", "[::1]:15001"] {
            let addr = format!("{BASE}[outbound]\nlisten = \"{local}\"\n");
            assert!(Config::parse(&addr).is_ok(), "{local}");
        }
        let to =
            format!("{BASE}[outbound]\nlisten = \"127.0.0.1:1\"\nhandshake_timeout = \"10\"\n");
        let e = Config::parse(&to).unwrap_err().to_string();
        assert!(e.starts_with("outbound.handshake_timeout:"), "{e}");
        let inbound = |extra: &str| {
            format!("{BASE}[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"127.0.0.1:2\"\n{extra}\n")
        };
        let e = Config::parse(&inbound("headers_with_underscores = \"strip\""))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("inbound.headers_with_underscores:"), "{e}");
        for (v, want) in [
            ("", crate::http::owned::Underscores::Allow),
            (
                "headers_with_underscores = \"drop\"",
                crate::http::owned::Underscores::Drop,
            ),
            (
                "headers_with_underscores = \"reject\"",
                crate::http::owned::Underscores::Reject,
            ),
        ] {
            let c = Config::parse(&inbound(v)).unwrap();
            assert_eq!(c.inbound.unwrap().headers_with_underscores, want, "{v}");
        }
    }

    #[test]
    fn identity_sources() {
        let ca = "[identity]\ntrust_bundle = \"ca.crt\"\nreload_interval = \"2s\"\n[identity.ca]\nurl = \"https://ca.svc:8443\"\nspiffe_id = \"spiffe://td/ns/a/sa/b\"\njoin_token_file = \"t\"\n[outbound]\nlisten = \"127.0.0.1:1\"\n";
        let cfg = Config::parse(ca).unwrap();
        assert_eq!(cfg.identity.reload_interval, Duration::from_secs(2));
        let IdentitySource::Ca(c) = &cfg.identity.source else {
            panic!("not ca")
        };
        assert_eq!(c.server_id.to_string(), "spiffe://td/keyproof-ca");
        let both = ca.replace(
            "[outbound]",
            "[identity.files]\ncert = \"c\"\nkey = \"k\"\n[outbound]",
        );
        let e = Config::parse(&both).unwrap_err().to_string();
        assert!(e.starts_with("identity.ca: "), "{e}");
        let bad_url = ca.replace("https://ca.svc:8443", "http://ca.svc");
        let e = Config::parse(&bad_url).unwrap_err().to_string();
        assert!(e.starts_with("identity.ca.url: "), "{e}");
        let bad_id = ca.replace("spiffe://td/ns/a/sa/b", "td/x");
        let e = Config::parse(&bad_id).unwrap_err().to_string();
        assert!(e.starts_with("identity.ca.spiffe_id: "), "{e}");
        let bad_kt = ca.replace("join_token_file", "key_type = \"rsa\"\njoin_token_file");
        let e = Config::parse(&bad_kt).unwrap_err().to_string();
        assert!(e.starts_with("identity.ca.key_type: "), "{e}");
    }

    #[test]
    fn identity_ca_url_takes_one_url_or_a_list() {
        let ca = |url: &str| {
            format!("[identity]\ntrust_bundle = \"ca.crt\"\n[identity.ca]\n{url}\nspiffe_id = \"spiffe://td/ns/a/sa/b\"\njoin_token_file = \"t\"\n[outbound]\nlisten = \"127.0.0.1:1\"\n")
        };
        let urls = |text: &str| match Config::parse(text).expect("config").identity.source {
            IdentitySource::Ca(c) => c.urls,
            IdentitySource::Files(_) => panic!("not ca"),
        };
        assert_eq!(
            urls(&ca("url = \"https://ca.svc:8443/\"")),
            ["https://ca.svc:8443"]
        );
        let two = ["https://ca-0.ca:8443", "https://10.0.0.7:8443"];
        for key in ["url", "urls"] {
            let text = ca(&format!(
                "{key} = [\"https://ca-0.ca:8443\", \"https://10.0.0.7:8443/\"]"
            ));
            assert_eq!(urls(&text), two, "{key}");
        }
        let cfg = Config::parse(&ca("url = [\"https://a:1\", \"https://b:2\"]")).expect("config");
        assert_eq!(
            cfg.identity.source_json()["urls"],
            serde_json::json!(["https://a:1", "https://b:2"])
        );
        assert!(
            cfg.explain()
                .contains("from the CA at https://a:1, https://b:2 (tried in order with failover"),
            "{}",
            cfg.explain()
        );
        for (bad, says) in [
            ("url = []", "empty"),
            ("url = 8443", "not a string"),
            ("url = [\"https://a:1\", 2]", "not a string"),
            (
                "url = [\"https://a:1\", \"http://b:2\"]",
                "https://HOST:PORT",
            ),
            ("url = [\"https://a:1\", \"https://b\"]", "HOST:PORT"),
            ("url = [\"https://a:1\", \"https://a:1/\"]", "listed twice"),
        ] {
            let (key, msg) = invalid_key(&ca(bad));
            assert_eq!(key, "identity.ca.url", "{bad}: {msg}");
            assert!(msg.contains(says), "{bad}: {msg}");
        }
        // Both spellings at once is one key given twice.
        let e = Config::parse(&ca("url = \"https://a:1\"\nurls = [\"https://b:2\"]")).unwrap_err();
        assert!(e.to_string().contains("url"), "{e}");
    }

    const PKCS11: &str = "[identity.pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"keyproof\"\nkey_label = \"workload\"\npin_file = \"/run/pin\"\n";

    #[test]
    fn pkcs11_holds_the_key_with_files_or_with_the_ca() {
        let files = format!(
            "[identity]\ntrust_bundle = \"ca.crt\"\n[identity.files]\ncert = \"c\"\n{PKCS11}{OUT}"
        );
        let cfg = Config::parse(&files).expect("files + pkcs11");
        let p = cfg.identity.pkcs11.as_ref().expect("pkcs11");
        assert_eq!(p.module, PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(
            (p.token_label.as_str(), p.key_label.as_str()),
            ("keyproof", "workload")
        );
        assert_eq!(p.pin_file, PathBuf::from("/run/pin"));
        assert_eq!(
            p.uri(),
            "pkcs11:token=keyproof;object=workload;type=private"
        );
        assert_eq!(cfg.identity.key_location(), "pkcs11");
        let IdentitySource::Files(f) = &cfg.identity.source else {
            panic!("not files")
        };
        assert_eq!(f.key, None);
        let e = cfg.explain();
        assert!(
            e.contains(
                "key in the PKCS#11 token: pkcs11:token=keyproof;object=workload;type=private"
            ),
            "{e}"
        );
        assert!(!e.contains("key in memory"), "{e}");
        let src = cfg.identity.source_json();
        assert_eq!(src["pkcs11"]["key_label"], "workload");
        assert!(src.get("key").is_none(), "{src}");

        let ca = format!(
            "[identity]\ntrust_bundle = \"ca.crt\"\n[identity.ca]\nurl = \"https://ca.svc:8443\"\nspiffe_id = \"spiffe://td/ns/a/sa/b\"\njoin_token_file = \"t\"\n{PKCS11}{OUT}"
        );
        let cfg = Config::parse(&ca).expect("ca + pkcs11");
        assert_eq!(cfg.identity.key_location(), "pkcs11");
        let e = cfg.explain();
        assert!(e.contains("generated there if absent"), "{e}");
        assert!(!e.contains("key in memory"), "{e}");

        // Without a token: where the key lives as before.
        let cfg = Config::parse(&format!("{BASE}{OUT}")).expect("files");
        assert_eq!(cfg.identity.key_location(), "file");
        assert!(cfg.identity.pkcs11.is_none());
        let cfg = Config::parse(&ca.replace(PKCS11, "")).expect("ca");
        assert_eq!(cfg.identity.key_location(), "memory");
    }

    #[test]
    fn pkcs11_errors_name_the_key() {
        let with = |files_key: bool, pkcs11: &str| {
            let key = if files_key { "key = \"k\"\n" } else { "" };
            let text = format!(
                "[identity]\ntrust_bundle = \"ca.crt\"\n[identity.files]\ncert = \"c\"\n{key}{pkcs11}{OUT}"
            );
            Config::parse(&text).map(|_| ()).map_err(|e| e.to_string())
        };
        let cases: [(bool, String, &str); 10] = [
            (true, PKCS11.to_owned(), "identity.files.key: "),
            (false, String::new(), "identity.files.key: "),
            (
                false,
                PKCS11.replace("module = \"/usr/lib/softhsm/libsofthsm2.so\"\n", ""),
                "identity.pkcs11.module: ",
            ),
            (
                false,
                PKCS11.replace("token_label = \"keyproof\"\n", ""),
                "identity.pkcs11.token_label: ",
            ),
            (
                false,
                PKCS11.replace("key_label = \"workload\"\n", ""),
                "identity.pkcs11.key_label: ",
            ),
            (
                false,
                PKCS11.replace("pin_file = \"/run/pin\"\n", ""),
                "identity.pkcs11.pin_file: ",
            ),
            (
                false,
                PKCS11.replace("\"keyproof\"", "\"\""),
                "identity.pkcs11.token_label: ",
            ),
            (
                false,
                PKCS11.replace("\"workload\"", "\"a;b\""),
                "identity.pkcs11.key_label: ",
            ),
            (
                false,
                PKCS11.replace("\"/run/pin\"", "\"\""),
                "identity.pkcs11.pin_file: ",
            ),
            (false, format!("{PKCS11}pin = \"1234\"\n"), "pin"),
        ];
        for (files_key, pkcs11, want) in cases {
            let e = with(files_key, &pkcs11).expect_err(&pkcs11);
            assert!(e.contains(want), "{pkcs11}: {e}");
        }
        // An unknown key is refused, not ignored (a PIN inline must not be
        // silently accepted and then unused).
        let e = with(false, &format!("{PKCS11}pin = \"1234\"\n")).unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        assert!(with(false, PKCS11).is_ok());
    }

    #[test]
    fn accepts_stepup_keys() {
        let c = format!(
            "{BASE}[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"localhost:2\"\n[[inbound.routes]]\npath_prefix = \"/admin\"\nmethods = [\"post\"]\nallow = [\"spiffe://td/ns/ops/*\"]\nstep_up = true\n[inbound.stepup]\nnonce_ttl = \"10s\"\nmax_clock_skew = \"30s\"\nmax_body = 1024\nmax_outstanding = 10\nmax_outstanding_per_peer = 2\nchannel_binding = false\n[outbound]\nlisten = \"127.0.0.1:3\"\n[outbound.stepup]\nmax_body = 5\n"
        );
        let cfg = Config::parse(&c).unwrap();
        let i = cfg.inbound.unwrap();
        assert_eq!(i.policy.routes[0].step_up, StepUpMode::Always);
        assert_eq!(i.policy.routes[0].methods, vec![http::Method::POST]);
        assert_eq!(i.stepup.nonce_ttl, Duration::from_secs(10));
        assert_eq!(cfg.outbound.unwrap().stepup_max_body, 5);
    }

    #[test]
    fn resource_limits_have_defaults_and_name_the_bad_key() {
        let base = format!("{BASE}[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"localhost:2\"\n");
        let cfg = Config::parse(&format!("{base}[outbound]\nlisten = \"127.0.0.1:3\"\n")).unwrap();
        let i = cfg.inbound.unwrap();
        assert_eq!(i.limits.max_handshakes, 256);
        assert_eq!(i.limits.max_concurrent_streams, 100);
        assert_eq!(i.limits.body_timeout, Duration::from_secs(30));
        assert_eq!(i.max_app_connections, 256);
        assert_eq!(i.max_app_connections_per_peer, 192);
        assert_eq!(i.max_connections_per_peer, 7500);
        assert_eq!(i.limits.tcp_idle_timeout, Duration::from_secs(3600));
        let o = cfg.outbound.unwrap();
        assert_eq!(o.limits.max_concurrent_streams, 100);
        assert_eq!(o.limits.body_timeout, Duration::from_secs(30));

        let set = Config::parse(&format!(
            "{base}max_handshakes = 8\nmax_concurrent_streams = 3\nbody_timeout = \"2s\"\nmax_app_connections = 4\n"
        ))
        .unwrap()
        .inbound
        .unwrap();
        assert_eq!(set.limits.max_handshakes, 8);
        assert_eq!(set.limits.max_concurrent_streams, 3);
        assert_eq!(set.limits.body_timeout, Duration::from_secs(2));
        assert_eq!(set.max_app_connections, 4);
        assert_eq!(set.max_app_connections_per_peer, 3);

        for (line, key) in [
            ("max_handshakes = 0", "inbound.max_handshakes"),
            (
                "max_concurrent_streams = 0",
                "inbound.max_concurrent_streams",
            ),
            ("body_timeout = \"0s\"", "inbound.body_timeout"),
            ("max_app_connections = 0", "inbound.max_app_connections"),
            (
                "max_app_connections_per_peer = 257",
                "inbound.max_app_connections_per_peer",
            ),
            (
                "max_app_connections_per_peer = 0",
                "inbound.max_app_connections_per_peer",
            ),
            (
                "max_connections_per_peer = 10001",
                "inbound.max_connections_per_peer",
            ),
            ("tcp_idle_timeout = \"0s\"", "inbound.tcp_idle_timeout"),
            (
                "app_connect_timeout = \"0s\"",
                "inbound.app_connect_timeout",
            ),
            (
                "app_pool_idle_timeout = \"0s\"",
                "inbound.app_pool_idle_timeout",
            ),
        ] {
            let e = Config::parse(&format!("{base}{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(key), "{line}: {e}");
        }
        // The outbound's listener is plaintext: it has no handshakes to bound.
        let e = Config::parse(&format!(
            "{BASE}[outbound]\nlisten = \"127.0.0.1:3\"\nmax_handshakes = 5\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_handshakes"), "{e}");
    }

    // ---- every validation error names its key --------------------------

    const IN: &str = "[inbound]\nlisten = \"127.0.0.1:1\"\napp = \"127.0.0.1:2\"\n";
    const OUT: &str = "[outbound]\nlisten = \"127.0.0.1:3\"\n";
    const OUT_15001: &str = "[outbound]\nlisten = \"127.0.0.1:15001\"\n";

    /// `[inbound]` with `extra` keys in it (and after it, tables).
    fn inb(extra: &str) -> String {
        format!("{BASE}{IN}{extra}")
    }

    /// `[outbound]` with `extra` keys in it (and after it, tables).
    fn outb(extra: &str) -> String {
        format!("{BASE}{OUT}{extra}")
    }

    /// File-based identity with `extra` keys in `[identity]`.
    fn files_identity(extra: &str) -> String {
        format!("[identity]\ntrust_bundle = \"ca.crt\"\n{extra}[identity.files]\ncert = \"c\"\nkey = \"k\"\n{OUT}")
    }

    /// `[identity.ca]` with `extra` keys in it.
    fn ca(extra: &str) -> String {
        format!("[identity]\ntrust_bundle = \"ca.crt\"\n[identity.ca]\nurl = \"https://ca.svc:8443\"\nspiffe_id = \"spiffe://td/ns/a/sa/b\"\njoin_token_file = \"t\"\n{extra}{OUT}")
    }

    fn route(extra: &str) -> String {
        inb(&format!(
            "[[inbound.routes]]\npath_prefix = \"/a\"\n{extra}"
        ))
    }

    fn upstream(host: &str, address: &str, identity: &str) -> String {
        format!("[[outbound.upstreams]]\nhost = \"{host}\"\naddress = \"{address}\"\nidentity = \"{identity}\"\n")
    }

    fn invalid_key(text: &str) -> (String, String) {
        match Config::parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(ConfigError::Invalid { key, msg }) => (key, msg),
            Err(other) => panic!("not a validation error ({other}):\n{text}"),
        }
    }

    #[test]
    fn every_validation_error_names_its_key() {
        let id = "spiffe://td/ns/a/sa/b";
        let mut cases: Vec<(String, String)> = [
            // [identity]
            (
                BASE.replace("[identity.files]\ncert = \"c\"\nkey = \"k\"\n", "") + OUT,
                "identity.files",
            ),
            (
                ca("").replace(
                    "[outbound]",
                    "[identity.files]\ncert = \"c\"\nkey = \"k\"\n[outbound]",
                ),
                "identity.ca",
            ),
            (
                files_identity("reload_interval = \"50ms\"\n"),
                "identity.reload_interval",
            ),
            (
                files_identity("reload_interval = \"soon\"\n"),
                "identity.reload_interval",
            ),
            // [identity.ca]
            (
                ca("").replace("https://ca.svc:8443", "http://ca.svc:8443"),
                "identity.ca.url",
            ),
            (
                ca("").replace("https://ca.svc:8443", "https://ca.svc"),
                "identity.ca.url",
            ),
            (
                ca("").replace("https://ca.svc:8443", "https://ca_svc:8443"),
                "identity.ca.url",
            ),
            (ca("").replace(id, "https://td/a"), "identity.ca.spiffe_id"),
            (ca("server_id = \"ca\"\n"), "identity.ca.server_id"),
            // Round 10 (keys) F10: a pattern a workload's ID may match.
            (
                ca("server_id = \"spiffe://td/ca/*\"\n"),
                "identity.ca.server_id",
            ),
            (
                ca("server_id = \"spiffe://td/*\"\n"),
                "identity.ca.server_id",
            ),
            (
                ca("server_id = \"spiffe://td/ca\"\n"),
                "identity.ca.server_id",
            ),
            (ca("key_type = \"rsa\"\n"), "identity.ca.key_type"),
            (
                ca("bundle_refresh = \"500ms\"\n"),
                "identity.ca.bundle_refresh",
            ),
            (
                ca("bundle_refresh = \"often\"\n"),
                "identity.ca.bundle_refresh",
            ),
            // nothing to do
            (BASE.to_owned(), "inbound"),
            // [inbound]
            (inb("").replace("127.0.0.1:1", "nope"), "inbound.listen"),
            (
                inb("").replace("127.0.0.1:1", "localhost:1"),
                "inbound.listen",
            ),
            (inb("").replace("127.0.0.1:2", "127.0.0.1"), "inbound.app"),
            (inb("").replace("127.0.0.1:2", "app:0"), "inbound.app"),
            (inb("").replace("127.0.0.1:2", "app:65536"), "inbound.app"),
            (inb("").replace("127.0.0.1:2", "app_1:80"), "inbound.app"),
            (inb("").replace("127.0.0.1:2", ":80"), "inbound.app"),
            (
                inb("").replace("127.0.0.1:2", "http://app:80"),
                "inbound.app",
            ),
            (
                inb("default_policy = \"allow\"\n"),
                "inbound.default_policy",
            ),
            (inb("app_protocol = \"h3\"\n"), "inbound.app_protocol"),
            (
                inb("path_normalization = \"none\"\n"),
                "inbound.path_normalization",
            ),
            (
                inb("headers_with_underscores = \"strip\"\n"),
                "inbound.headers_with_underscores",
            ),
            (
                inb("max_app_connections = 0\n"),
                "inbound.max_app_connections",
            ),
            (
                inb("max_app_connections = 1048577\n"),
                "inbound.max_app_connections",
            ),
            (
                inb("app_connect_timeout = \"2\"\n"),
                "inbound.app_connect_timeout",
            ),
            (
                inb("app_pool_idle_timeout = \"4 s\"\n"),
                "inbound.app_pool_idle_timeout",
            ),
            // [[inbound.routes]]
            (
                route("").replace("\"/a\"", "\"a\""),
                "inbound.routes[0].path_prefix",
            ),
            (
                route("[[inbound.routes]]\npath_prefix = \"/b/../c\"\n"),
                "inbound.routes[1].path_prefix",
            ),
            (
                route("methods = [\"GET\", \"GE T\"]\n"),
                "inbound.routes[0].methods[1]",
            ),
            (route("methods = [\"\"]\n"), "inbound.routes[0].methods[0]"),
            (
                route("allow = [\"spiffe://td/x\", \"spiffe://td/y\", \"td/z\"]\n"),
                "inbound.routes[0].allow[2]",
            ),
            // [inbound.stepup]
            (
                inb("[inbound.stepup]\nnonce_ttl = \"0s\"\n"),
                "inbound.stepup.nonce_ttl",
            ),
            (
                inb("[inbound.stepup]\nnonce_ttl = \"x\"\n"),
                "inbound.stepup.nonce_ttl",
            ),
            (
                inb("[inbound.stepup]\nmax_clock_skew = \"x\"\n"),
                "inbound.stepup.max_clock_skew",
            ),
            (
                inb("[inbound.stepup]\nmax_outstanding = 0\n"),
                "inbound.stepup.max_outstanding",
            ),
            (
                inb("[inbound.stepup]\nmax_outstanding_per_peer = 0\n"),
                "inbound.stepup.max_outstanding_per_peer",
            ),
            (
                inb("[inbound.stepup]\nmax_outstanding = 2\nmax_outstanding_per_peer = 3\n"),
                "inbound.stepup.max_outstanding_per_peer",
            ),
            // [outbound]
            (outb("").replace("127.0.0.1:3", "3"), "outbound.listen"),
            (
                outb("connect_timeout = \"5\"\n"),
                "outbound.connect_timeout",
            ),
            (
                outb("pool_idle_timeout = \"x\"\n"),
                "outbound.pool_idle_timeout",
            ),
            (
                outb("path_normalization = \"none\"\n"),
                "outbound.path_normalization",
            ),
            // [[outbound.upstreams]]
            (
                outb(&upstream(" ", "api:443", id)),
                "outbound.upstreams[0].host",
            ),
            (
                outb(&upstream("api/v1", "api:443", id)),
                "outbound.upstreams[0].host",
            ),
            (
                outb(&(upstream("api", "api:443", id) + &upstream("API", "api:443", id))),
                "outbound.upstreams[1].host",
            ),
            (
                outb(&upstream("api", "api", id)),
                "outbound.upstreams[0].address",
            ),
            (
                outb(&upstream("api", "api:443", "api")),
                "outbound.upstreams[0].identity",
            ),
            // [admin]
            (
                outb("[admin]\nlisten = \"localhost:9090\"\n"),
                "admin.listen",
            ),
            // [runtime]
            (
                outb("[runtime]\nworker_threads = 0\n"),
                "runtime.worker_threads",
            ),
            (
                outb("[runtime]\nworker_threads = 1025\n"),
                "runtime.worker_threads",
            ),
            (
                outb("[runtime]\nlog_format = \"xml\"\n"),
                "runtime.log_format",
            ),
            (
                outb("[runtime]\nshutdown_grace = \"x\"\n"),
                "runtime.shutdown_grace",
            ),
            (
                outb("[runtime]\nmemory_limit = \"96MB\"\n"),
                "runtime.memory_limit",
            ),
            (
                outb("[runtime]\nmemory_limit = \"15Mi\"\n"),
                "runtime.memory_limit",
            ),
            (
                outb("[runtime]\nmemory_limit = \"99999999999Gi\"\n"),
                "runtime.memory_limit",
            ),
            (
                outb("[runtime]\nmemory_limit = 1000\n"),
                "runtime.memory_limit",
            ),
        ]
        .into_iter()
        .map(|(text, key): (String, &str)| (text, key.to_owned()))
        .collect();

        // The limits, in both directions.
        for (dir, make) in [("inbound", inb as fn(&str) -> String), ("outbound", outb)] {
            for (line, key) in [
                ("max_header_bytes = 8191", "max_header_bytes"),
                ("max_header_bytes = 16777217", "max_header_bytes"),
                ("max_connections = 0", "max_connections"),
                ("max_connections = 16777217", "max_connections"),
                ("max_concurrent_streams = 0", "max_concurrent_streams"),
                ("max_concurrent_streams = 10001", "max_concurrent_streams"),
                ("handshake_timeout = \"0s\"", "handshake_timeout"),
                ("handshake_timeout = \"10\"", "handshake_timeout"),
                ("header_read_timeout = \"0ms\"", "header_read_timeout"),
                ("idle_timeout = \"0s\"", "idle_timeout"),
                ("idle_timeout = \"5 minutes\"", "idle_timeout"),
                ("body_timeout = \"0s\"", "body_timeout"),
            ] {
                cases.push((make(&format!("{line}\n")), format!("{dir}.{key}")));
            }
        }
        for (line, key) in [
            ("max_handshakes = 0", "inbound.max_handshakes"),
            ("max_handshakes = 1048577", "inbound.max_handshakes"),
        ] {
            cases.push((inb(&format!("{line}\n")), key.to_owned()));
        }
        for (text, want) in &cases {
            let (key, msg) = invalid_key(text);
            assert_eq!(&key, want, "{msg}\n{text}");
            assert!(!msg.is_empty());
            let shown = Config::parse(text).unwrap_err().to_string();
            assert!(shown.starts_with(&format!("{want}: ")), "{shown}");
        }
    }

    #[test]
    fn a_ca_spiffe_id_without_a_workload_path_is_refused() {
        let (key, msg) = invalid_key(&ca("").replace("spiffe://td/ns/a/sa/b", "spiffe://td"));
        assert_eq!(key, "identity.ca.spiffe_id", "{msg}");
    }

    #[test]
    fn the_limits_accept_their_bounds() {
        for make in [inb as fn(&str) -> String, outb] {
            for line in [
                "max_header_bytes = 8192",
                "max_header_bytes = 16777216",
                "max_connections = 1",
                "max_connections = 16777216",
                "max_concurrent_streams = 1",
                "max_concurrent_streams = 10000",
                "idle_timeout = \"1ms\"",
            ] {
                let text = make(&format!("{line}\n"));
                Config::parse(&text).unwrap_or_else(|e| panic!("{line}: {e}"));
            }
        }
        for text in [
            inb("max_handshakes = 1048576\nmax_app_connections = 1048576\n"),
            inb("[inbound.stepup]\nmax_outstanding = 3\nmax_outstanding_per_peer = 3\n"),
            inb("[inbound.stepup]\nmax_clock_skew = \"0s\"\n"),
            files_identity("reload_interval = \"100ms\"\n"),
            ca("bundle_refresh = \"1s\"\n"),
            outb("[runtime]\nworker_threads = 1024\n"),
        ] {
            Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        }
    }

    fn parse_error(text: &str) -> String {
        match Config::parse(text) {
            Err(ConfigError::Parse(msg)) => msg,
            Err(other) => panic!("not a parse error: {other}"),
            Ok(_) => panic!("accepted:\n{text}"),
        }
    }

    #[test]
    fn unknown_keys_are_refused_in_every_table() {
        let id = "spiffe://td/ns/a/sa/b";
        for (text, unknown) in [
            (format!("bogus_top = 1\n{BASE}{OUT}"), "bogus_top"),
            (files_identity("bogus_identity = 1\n"), "bogus_identity"),
            (format!("{BASE}bogus_files = 1\n{OUT}"), "bogus_files"),
            (ca("bogus_ca = 1\n"), "bogus_ca"),
            (inb("bogus_inbound = 1\n"), "bogus_inbound"),
            (route("bogus_route = 1\n"), "bogus_route"),
            (
                inb("[[inbound.risk_rules]]\nname = \"x\"\nbogus_rule = 1\n"),
                "bogus_rule",
            ),
            (
                inb("[[inbound.deny]]\nserial = \"1\"\nbogus_deny = 1\n"),
                "bogus_deny",
            ),
            (inb("[inbound.stepup]\nbogus_stepup = 1\n"), "bogus_stepup"),
            (outb("bogus_outbound = 1\n"), "bogus_outbound"),
            (
                outb(&(upstream("api", "api:443", id) + "bogus_upstream = 1\n")),
                "bogus_upstream",
            ),
            (
                outb("[outbound.stepup]\nbogus_out_stepup = 1\n"),
                "bogus_out_stepup",
            ),
            (
                outb("[admin]\nlisten = \"127.0.0.1:9\"\nbogus_admin = 1\n"),
                "bogus_admin",
            ),
            (outb("[runtime]\nbogus_runtime = 1\n"), "bogus_runtime"),
            (outb("[bogus_table]\nx = 1\n"), "bogus_table"),
            // Keys of the other direction are unknown here.
            (outb("max_app_connections = 4\n"), "max_app_connections"),
            (outb("[outbound.stepup]\nnonce_ttl = \"1s\"\n"), "nonce_ttl"),
            (inb("connect_timeout = \"1s\"\n"), "connect_timeout"),
        ] {
            let msg = parse_error(&text);
            assert!(msg.contains(unknown), "{unknown}: {msg}");
            assert!(msg.contains("unknown"), "{unknown}: {msg}");
        }
    }

    #[test]
    fn missing_and_mistyped_keys_are_parse_errors_that_name_them() {
        for (text, key) in [
            (
                format!("{BASE}[inbound]\nlisten = \"127.0.0.1:1\"\n"),
                "app",
            ),
            (
                format!("[identity]\n[identity.files]\ncert = \"c\"\nkey = \"k\"\n{OUT}"),
                "trust_bundle",
            ),
            (OUT.to_owned(), "identity"),
            (outb("max_connections = \"10\"\n"), "max_connections"),
            (route("allow = \"spiffe://td/x\"\n"), "allow"),
            (
                inb(&format!("{RULES}[[inbound.risk_rules]]\nnew_peer = 5\n")),
                "new_peer",
            ),
            (inb("max_header_bytes = -1\n"), "max_header_bytes"),
        ] {
            let msg = parse_error(&text);
            assert!(msg.contains(key), "{key}: {msg}");
        }
    }

    #[test]
    fn defaults() {
        let cfg = Config::parse(&format!("{BASE}{IN}{OUT}")).expect("config");
        assert_eq!(cfg.identity.trust_bundle, PathBuf::from("ca.crt"));
        assert_eq!(cfg.identity.reload_interval, Duration::from_secs(10));
        let IdentitySource::Files(f) = &cfg.identity.source else {
            panic!("not files")
        };
        assert_eq!(
            (f.cert.as_path(), f.key.as_deref()),
            (Path::new("c"), Some(Path::new("k")))
        );
        assert!(cfg.admin.is_none());
        assert_eq!(cfg.runtime.worker_threads, 1);
        assert_eq!(cfg.runtime.log_format, LogFormat::Text);
        assert_eq!(cfg.runtime.shutdown_grace, Duration::from_secs(30));
        assert_eq!(cfg.runtime.drain_delay, Duration::ZERO);

        let i = cfg.inbound.expect("inbound");
        assert_eq!(i.listen, "127.0.0.1:1".parse::<SocketAddr>().expect("addr"));
        assert_eq!(i.app, "127.0.0.1:2");
        assert_eq!(i.default_policy, DefaultPolicy::AllowTrustDomain);
        assert_eq!(i.app_protocol, AppProtocol::Auto);
        assert_eq!(i.path_normalization, PathMode::Strict);
        assert_eq!(i.app_connect_timeout, Duration::from_secs(2));
        assert_eq!(i.app_pool_idle_timeout, Duration::from_secs(4));
        assert_eq!(i.max_app_connections, 256);
        assert_eq!(
            i.headers_with_underscores,
            crate::http::owned::Underscores::Allow
        );
        assert!(i.policy.routes.is_empty());
        let d = InboundStepUpConfig::default();
        assert_eq!(i.stepup.nonce_ttl, Duration::from_secs(30));
        assert_eq!(i.stepup.max_clock_skew, Duration::from_secs(60));
        assert_eq!(i.stepup.max_body, 1 << 20);
        assert_eq!(i.stepup.max_outstanding, 100_000);
        assert_eq!(i.stepup.max_outstanding_per_peer, 256);
        assert!(i.stepup.channel_binding);
        assert_eq!(
            (d.nonce_ttl, d.max_outstanding_per_peer),
            (i.stepup.nonce_ttl, i.stepup.max_outstanding_per_peer)
        );
        let l = &i.limits;
        assert_eq!(l.handshake_timeout, Duration::from_secs(10));
        assert_eq!(l.header_read_timeout, Duration::from_secs(30));
        assert_eq!(l.idle_timeout, Duration::from_secs(300));
        assert_eq!(l.max_header_bytes, 64 * 1024);
        assert_eq!(l.max_connections, 10_000);
        assert_eq!(l.max_handshakes, 256);
        assert_eq!(l.max_concurrent_streams, 100);
        assert_eq!(l.body_timeout, Duration::from_secs(30));

        let o = cfg.outbound.expect("outbound");
        assert_eq!(o.listen, "127.0.0.1:3".parse::<SocketAddr>().expect("addr"));
        assert!(o.upstreams.is_empty());
        assert_eq!(o.connect_timeout, Duration::from_secs(5));
        assert_eq!(o.pool_idle_timeout, Duration::from_secs(15));
        assert_eq!(o.stepup_max_body, 1 << 20);
        assert_eq!(o.path_normalization, PathMode::Strict);
        let l = &o.limits;
        assert_eq!(l.handshake_timeout, Duration::from_secs(10));
        // Longer than the app's own idle pools on the loopback side.
        assert_eq!(l.header_read_timeout, Duration::from_secs(120));
        assert_eq!(l.idle_timeout, Duration::from_secs(300));
        assert_eq!(l.max_header_bytes, 64 * 1024);
        assert_eq!(l.max_connections, 10_000);
        assert_eq!(l.max_concurrent_streams, 100);
        assert_eq!(l.body_timeout, Duration::from_secs(30));

        // [inbound.stepup] present but empty: the same defaults.
        let empty_stepup = Config::parse(&inb("[inbound.stepup]\n")).expect("config");
        let s = empty_stepup.inbound.expect("inbound").stepup;
        assert_eq!(
            (
                s.nonce_ttl,
                s.max_clock_skew,
                s.max_body,
                s.max_outstanding,
                s.max_outstanding_per_peer,
                s.channel_binding
            ),
            (
                d.nonce_ttl,
                d.max_clock_skew,
                d.max_body,
                d.max_outstanding,
                d.max_outstanding_per_peer,
                d.channel_binding
            )
        );

        let cfg = Config::parse(&ca("")).expect("config");
        let IdentitySource::Ca(c) = cfg.identity.source else {
            panic!("not ca")
        };
        assert_eq!(c.urls, ["https://ca.svc:8443"]);
        assert_eq!(c.key_type, keyproof_identity::keys::KeyType::EcdsaP256);
        assert_eq!(c.bundle_refresh, Duration::from_secs(300));
        assert_eq!(c.server_id.to_string(), "spiffe://td/keyproof-ca");
        assert_eq!(c.credential, Credential::JoinToken(PathBuf::from("t")));
        assert_eq!(c.credential_key(), "join_token_file");
    }

    #[test]
    fn memory_limits_read_as_kubernetes_writes_them() {
        let limit = |v: &str| {
            Config::parse(&outb(&format!("[runtime]\nmemory_limit = {v}\n")))
                .expect("config")
                .runtime
                .memory_limit
        };
        assert_eq!(
            Config::parse(&outb(""))
                .expect("config")
                .runtime
                .memory_limit,
            MemoryLimit::Auto
        );
        assert_eq!(limit("\"auto\""), MemoryLimit::Auto);
        assert_eq!(limit("\"off\""), MemoryLimit::Off);
        assert_eq!(limit("\"96Mi\""), MemoryLimit::Bytes(96 << 20));
        assert_eq!(limit("\"1Gi\""), MemoryLimit::Bytes(1 << 30));
        assert_eq!(limit("\"100M\""), MemoryLimit::Bytes(100_000_000));
        assert_eq!(limit("\"20000k\""), MemoryLimit::Bytes(20_000_000));
        assert_eq!(limit("33554432"), MemoryLimit::Bytes(32 << 20));
    }

    #[test]
    fn values_are_normalized() {
        let cfg = Config::parse(
            &ca("key_type = \"ed25519\"\nserver_id = \"spiffe://td/keyproof-ca/*\"\n")
                .replace("https://ca.svc:8443", "https://ca.svc:8443/"),
        )
        .expect("config");
        let IdentitySource::Ca(c) = cfg.identity.source else {
            panic!("not ca")
        };
        assert_eq!(c.urls, ["https://ca.svc:8443"]);
        assert_eq!(c.key_type, keyproof_identity::keys::KeyType::Ed25519);
        assert_eq!(c.server_id.to_string(), "spiffe://td/keyproof-ca/*");

        let id = "spiffe://td/ns/a/sa/b";
        let cfg = Config::parse(&outb(
            &(upstream(" API.Demo ", "[::1]:443", id)
                + &upstream("*", "10.0.0.1:443", "spiffe://td/ns/a/*")),
        ))
        .expect("config");
        let o = cfg.outbound.expect("outbound");
        assert_eq!(o.upstreams[0].exact_host(), Some("api.demo"));
        assert_eq!(o.upstreams[0].address.as_deref(), Some("[::1]:443"));
        assert_eq!(o.upstreams[0].identity.fixed.to_string(), id);
        assert_eq!(o.upstreams[1].host, Some(HostPattern::Any));

        let cfg =
            Config::parse(&route("methods = [\"get\", \"Post\", \"PURGE\"]\n")).expect("config");
        let methods = &cfg.inbound.expect("inbound").policy.routes[0].methods;
        assert_eq!(
            methods,
            &[
                http::Method::GET,
                http::Method::POST,
                http::Method::from_bytes(b"PURGE").expect("method")
            ]
        );

        for (text, policy, proto) in [
            (
                inb("default_policy = \"deny\"\napp_protocol = \"http1\"\n"),
                DefaultPolicy::Deny,
                AppProtocol::Http1,
            ),
            (
                inb("default_policy = \"allow-trust-domain\"\napp_protocol = \"h2\"\n"),
                DefaultPolicy::AllowTrustDomain,
                AppProtocol::H2,
            ),
            (
                inb("app_protocol = \"auto\"\n"),
                DefaultPolicy::AllowTrustDomain,
                AppProtocol::Auto,
            ),
        ] {
            let i = Config::parse(&text)
                .expect("config")
                .inbound
                .expect("inbound");
            assert_eq!((i.default_policy, i.app_protocol), (policy, proto));
        }
        let rt = Config::parse(&outb(
            "[runtime]\nworker_threads = 4\nlog_format = \"json\"\n",
        ))
        .expect("config")
        .runtime;
        assert_eq!((rt.worker_threads, rt.log_format), (4, LogFormat::Json));
        let admin = Config::parse(&outb("[admin]\nlisten = \"[::1]:9090\"\n"))
            .expect("config")
            .admin;
        assert_eq!(
            admin.expect("admin").listen,
            "[::1]:9090".parse::<SocketAddr>().expect("addr")
        );
    }

    #[test]
    fn path_normalization_values_in_both_directions() {
        for (value, mode) in [
            ("strict", PathMode::Strict),
            ("keep-slashes", PathMode::KeepSlashes),
        ] {
            let line = format!("path_normalization = \"{value}\"\n");
            let cfg = Config::parse(&format!("{BASE}{IN}{line}{OUT}{line}")).expect("config");
            assert_eq!(
                cfg.inbound.expect("inbound").path_normalization,
                mode,
                "{value}"
            );
            assert_eq!(
                cfg.outbound.expect("outbound").path_normalization,
                mode,
                "{value}"
            );
        }
        // Names are exact: no other spelling, no case folding.
        for value in [
            "Strict",
            "keep_slashes",
            "keepslashes",
            "",
            "off",
            "merge-slashes",
        ] {
            let line = format!("path_normalization = \"{value}\"\n");
            let (key, msg) = invalid_key(&inb(&line));
            assert_eq!(key, "inbound.path_normalization", "{value}");
            assert!(msg.contains("\"strict\" or \"keep-slashes\""), "{msg}");
            let (key, _) = invalid_key(&outb(&line));
            assert_eq!(key, "outbound.path_normalization", "{value}");
        }
    }

    #[test]
    fn durations_take_units_and_combine_them() {
        for (value, want) in [
            ("250ms", Duration::from_millis(250)),
            ("45s", Duration::from_secs(45)),
            ("2m", Duration::from_secs(120)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("1d", Duration::from_secs(86_400)),
            ("1w", Duration::from_secs(7 * 86_400)),
            ("1s500ms", Duration::from_millis(1500)),
            (" 5s ", Duration::from_secs(5)),
        ] {
            let cfg = Config::parse(&outb(&format!("[runtime]\nshutdown_grace = \"{value}\"\n")))
                .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(cfg.runtime.shutdown_grace, want, "{value}");
        }
        // A zero grace is allowed (stop at once); zero timeouts are not.
        let cfg = Config::parse(&outb("[runtime]\nshutdown_grace = \"0s\"\n")).expect("config");
        assert_eq!(cfg.runtime.shutdown_grace, Duration::ZERO);
        for (value, says) in [
            ("30", "missing unit"),
            ("30 s", "unknown unit"),
            ("30sec", "unknown unit"),
            ("1.5s", "unknown unit"),
            ("", "empty"),
            ("s", "expected a number"),
            ("-1s", "expected a number"),
            ("99999999999999999999s", "too large"),
        ] {
            let (key, msg) =
                invalid_key(&outb(&format!("[runtime]\nshutdown_grace = \"{value}\"\n")));
            assert_eq!(key, "runtime.shutdown_grace", "{value}");
            assert!(msg.contains(says), "{value}: {msg}");
        }
        // A duration must be a string.
        let msg = parse_error(&outb("[runtime]\nshutdown_grace = 30\n"));
        assert!(msg.contains("shutdown_grace"), "{msg}");
        let cfg = Config::parse(&outb("[runtime]\ndrain_delay = \"5s\"\n")).expect("config");
        assert_eq!(cfg.runtime.drain_delay, Duration::from_secs(5));
        let (key, _) = invalid_key(&outb("[runtime]\ndrain_delay = \"5\"\n"));
        assert_eq!(key, "runtime.drain_delay");
    }

    #[test]
    fn load_names_a_missing_file_and_parses_an_existing_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("proxy.toml");
        match Config::load(&path) {
            Err(ConfigError::Read { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, outb("")).expect("write");
        let cfg = Config::load(&path).expect("load");
        assert!(cfg.inbound.is_none() && cfg.outbound.is_some());
    }

    #[test]
    fn explain_says_what_the_configuration_does() {
        let text =
            route("methods = [\"POST\"]\nallow = [\"spiffe://td/ns/ops/*\"]\nstep_up = true\n")
                + &outb(&upstream("api", "api:443", "spiffe://td/ns/a/sa/api")).replace(BASE, "")
                + "[admin]\nlisten = \"127.0.0.1:9090\"\n";
        let e = Config::parse(&text).expect("config").explain();
        for says in [
            "identity: cert c key k trust bundle ca.crt",
            "inbound: mutual TLS on 127.0.0.1:1 -> app 127.0.0.1:2 (default policy allow-trust-domain)",
            "  route /a (POST): allow [spiffe://td/ns/ops/*], step-up required",
            "outbound: plaintext on 127.0.0.1:3",
            "  host api -> api:443 expecting spiffe://td/ns/a/sa/api",
            "admin: http://127.0.0.1:9090/metrics",
            "runtime: 1 worker thread(s); memory limit half the container's",
        ] {
            assert!(e.contains(says), "{says:?} not in:\n{e}");
        }
        let e = Config::parse(&(text.clone() + "[runtime]\nmemory_limit = \"96Mi\"\n"))
            .expect("config")
            .explain();
        assert!(e.contains("connections shed above 96 MiB of heap"), "{e}");
        let e = Config::parse(&ca("")).expect("config").explain();
        assert!(
            e.contains("identity: spiffe://td/ns/a/sa/b from the CA at https://ca.svc:8443 (server spiffe://td/keyproof-ca), ecdsa-p256 key in memory"),
            "{e}"
        );
        assert!(e.contains("bootstrap credential join_token_file t "), "{e}");
        let e = Config::parse(&sa_ca("")).expect("config").explain();
        assert!(
            e.contains("bootstrap credential service_account_token_file /var/run/secrets/tokens/keyproof (re-read at every bootstrap)"),
            "{e}"
        );
    }

    /// `[identity.ca]` bootstrapping with a ServiceAccount token, `extra`
    /// keys in it.
    fn sa_ca(extra: &str) -> String {
        ca(extra).replace(
            "join_token_file = \"t\"",
            "service_account_token_file = \"/var/run/secrets/tokens/keyproof\"",
        )
    }

    #[test]
    fn a_service_account_token_file_is_the_bootstrap_credential() {
        let cfg = Config::parse(&sa_ca("")).expect("config");
        let source = cfg.identity.source_json();
        assert_eq!(source["kind"], "ca");
        assert_eq!(source["credential"], "service_account_token_file");
        assert_eq!(
            source["credential_file"],
            "/var/run/secrets/tokens/keyproof"
        );
        let files = Config::parse(&files_identity("")).expect("config");
        assert_eq!(files.identity.source_json()["kind"], "files");
        let IdentitySource::Ca(c) = cfg.identity.source else {
            panic!("not ca")
        };
        assert_eq!(
            c.credential,
            Credential::ServiceAccountToken(PathBuf::from("/var/run/secrets/tokens/keyproof"))
        );
        assert_eq!(c.credential_key(), "service_account_token_file");
        assert_eq!(c.credential.describe(), "service account token file");
    }

    #[test]
    fn exactly_one_bootstrap_credential_is_required() {
        let both = ca("service_account_token_file = \"/var/run/secrets/tokens/keyproof\"\n");
        let (key, msg) = invalid_key(&both);
        assert_eq!(key, "identity.ca.service_account_token_file");
        assert!(msg.contains("exactly one"), "{msg}");
        assert!(msg.contains("join_token_file"), "{msg}");

        let neither = ca("").replace("join_token_file = \"t\"\n", "");
        let (key, msg) = invalid_key(&neither);
        assert_eq!(key, "identity.ca");
        assert!(
            msg.contains("service_account_token_file") && msg.contains("join_token_file"),
            "{msg}"
        );

        for (text, want) in [
            (
                ca("").replace("join_token_file = \"t\"", "join_token_file = \"\""),
                "identity.ca.join_token_file",
            ),
            (
                sa_ca("").replace("\"/var/run/secrets/tokens/keyproof\"", "\"\""),
                "identity.ca.service_account_token_file",
            ),
        ] {
            let (key, msg) = invalid_key(&text);
            assert_eq!(key, want, "{text}");
            assert_eq!(msg, "must name a file");
        }
        // A typo is refused by name, not taken for a missing credential.
        let msg = parse_error(
            &sa_ca("").replace("service_account_token_file", "serviceaccount_token_file"),
        );
        assert!(msg.contains("serviceaccount_token_file"), "{msg}");
    }

    // ---- risk rules, deny list, policy file -----------------------------

    /// Two rules every risk test can name.
    const RULES: &str = "[[inbound.risk_rules]]\nname = \"new-caller\"\nnew_peer = \"24h\"\n[[inbound.risk_rules]]\nname = \"burst\"\nrate_above = \"30/1m\"\n";

    /// A risk route listing `risk` and the two rules, plus `extra`.
    fn risk_route(risk: &str, extra: &str) -> String {
        inb(&format!(
            "{RULES}{extra}[[inbound.routes]]\npath_prefix = \"/pay\"\nstep_up = \"risk\"\nrisk = {risk}\n"
        ))
    }

    /// `[inbound]` with one `[[inbound.risk_rules]]` made of `body` (and
    /// a name), used by no route.
    fn rule(body: &str) -> String {
        inb(&format!("[[inbound.risk_rules]]\nname = \"r\"\n{body}"))
    }

    fn one_rule(body: &str) -> RiskRuleConfig {
        let cfg = Config::parse(&rule(body)).unwrap_or_else(|e| panic!("{body}: {e}"));
        let mut rules = cfg.inbound.expect("inbound").policy.risk_rules;
        assert_eq!(rules.len(), 1);
        rules.remove(0)
    }

    #[test]
    fn step_up_is_a_mode_name_or_a_bool() {
        for (value, mode) in [
            ("true", StepUpMode::Always),
            ("false", StepUpMode::Never),
            ("\"always\"", StepUpMode::Always),
            ("\"never\"", StepUpMode::Never),
        ] {
            let cfg = Config::parse(&route(&format!("step_up = {value}\n"))).expect(value);
            assert_eq!(cfg.inbound.expect("inbound").policy.routes[0].step_up, mode);
        }
        let cfg = Config::parse(&risk_route("[\"burst\", \"new-caller\"]", "")).expect("config");
        let r = &cfg.inbound.expect("inbound").policy.routes[0];
        assert_eq!(r.step_up, StepUpMode::Risk);
        assert_eq!(r.risk, ["burst", "new-caller"]);
        // Unset: never.
        let cfg = Config::parse(&route("")).expect("config");
        assert_eq!(
            cfg.inbound.expect("inbound").policy.routes[0].step_up,
            StepUpMode::Never
        );
        for (value, says) in [
            ("\"yes\"", "unknown mode \"yes\""),
            ("\"Risk\"", "unknown mode \"Risk\""),
            ("1", "not integer"),
            ("[\"risk\"]", "not array"),
        ] {
            let (key, msg) = invalid_key(&route(&format!("step_up = {value}\n")));
            assert_eq!(key, "inbound.routes[0].step_up", "{value}");
            assert!(msg.contains(says), "{value}: {msg}");
        }
    }

    #[test]
    fn a_routes_risk_list_is_checked_against_the_rules() {
        let cases = [
            (risk_route("[]", ""), "inbound.routes[0].risk", "is empty"),
            (
                risk_route("[\"burst\"]", "").replace("risk = [\"burst\"]\n", ""),
                "inbound.routes[0].risk",
                "missing",
            ),
            (
                risk_route("[\"burst\", \"nope\"]", ""),
                "inbound.routes[0].risk[1]",
                "unknown risk rule \"nope\"; defined: new-caller, burst",
            ),
            (
                risk_route("[\"burst\", \"new-caller\", \"burst\"]", ""),
                "inbound.routes[0].risk[2]",
                "listed twice",
            ),
            (
                risk_route("[\"burst\"]", "").replace("\"risk\"\nrisk", "\"always\"\nrisk"),
                "inbound.routes[0].risk",
                "only with step_up = \"risk\" (this route's step_up is \"always\")",
            ),
            (
                route("risk = [\"x\"]\n"),
                "inbound.routes[0].risk",
                "only with step_up = \"risk\"",
            ),
            (
                route("step_up = \"risk\"\nrisk = [\"x\"]\n"),
                "inbound.routes[0].risk[0]",
                "no risk_rules are defined",
            ),
        ];
        for (text, want, says) in cases {
            let (key, msg) = invalid_key(&text);
            assert_eq!(key, want, "{msg}\n{text}");
            assert!(msg.contains(says), "{says:?} not in {msg:?}");
        }
        // The index is the route's own, after earlier valid routes.
        let text = risk_route("[\"burst\"]", "")
            + "[[inbound.routes]]\npath_prefix = \"/b\"\nstep_up = \"risk\"\nrisk = [\"new-caller\", \"x\"]\n";
        assert_eq!(invalid_key(&text).0, "inbound.routes[1].risk[1]");
    }

    #[test]
    fn each_condition_is_parsed() {
        let h = |name: &str| http::HeaderName::from_bytes(name.as_bytes()).expect("name");
        for (body, want) in [
            (
                "new_peer = \"24h\"",
                RiskCondition::NewPeer(Duration::from_secs(86_400)),
            ),
            (
                "rate_above = \"30/1m\"",
                RiskCondition::RateAbove {
                    count: 30,
                    window: Duration::from_secs(60),
                },
            ),
            (
                "new_peer = \"366d\"",
                RiskCondition::NewPeer(Duration::from_secs(366 * 86_400)),
            ),
            (
                "rate_above = \"1000000/366d\"",
                RiskCondition::RateAbove {
                    count: 1_000_000,
                    window: Duration::from_secs(366 * 86_400),
                },
            ),
            (
                "rate_above = \" 1 / 250ms \"",
                RiskCondition::RateAbove {
                    count: 1,
                    window: Duration::from_millis(250),
                },
            ),
            (
                "header = \"X-Amount\"\nabove = 10000",
                RiskCondition::Header {
                    name: h("x-amount"),
                    test: HeaderTest::Above(10_000.0),
                },
            ),
            (
                "header = \"x-amount\"\nabove = 99.5",
                RiskCondition::Header {
                    name: h("x-amount"),
                    test: HeaderTest::Above(99.5),
                },
            ),
            (
                "header = \"x-kind\"\nequals = \"wire\"",
                RiskCondition::Header {
                    name: h("x-kind"),
                    test: HeaderTest::Equals("wire".into()),
                },
            ),
            (
                "header = \"x-kind\"\none_of = [\"a\", \"b\"]",
                RiskCondition::Header {
                    name: h("x-kind"),
                    test: HeaderTest::OneOf(vec!["a".into(), "b".into()]),
                },
            ),
            (
                "header = \"x-debug\"\npresent = true",
                RiskCondition::Header {
                    name: h("x-debug"),
                    test: HeaderTest::Present,
                },
            ),
            (
                "after_failure = \"15m\"",
                RiskCondition::AfterFailure(Duration::from_secs(900)),
            ),
            (
                "hours = \"22:00-06:00\"",
                RiskCondition::Hours {
                    start: 22 * 60,
                    end: 6 * 60,
                },
            ),
            (
                "hours = \"00:00-23:59\"",
                RiskCondition::Hours {
                    start: 0,
                    end: 23 * 60 + 59,
                },
            ),
            (
                "failures_above = \"5/15m\"",
                RiskCondition::FailuresAbove {
                    count: 5,
                    window: Duration::from_secs(900),
                },
            ),
            (
                "failures_above = \"0/1h\"",
                RiskCondition::FailuresAbove {
                    count: 0,
                    window: Duration::from_secs(3600),
                },
            ),
        ] {
            let r = one_rule(&format!("{body}\n"));
            assert_eq!(r.condition, want, "{body}");
            assert_eq!(r.action, RiskAction::Challenge, "{body}");
            assert_eq!(r.name, "r");
        }
        let r = one_rule("failures_above = \"5/15m\"\naction = \"deny\"\n");
        assert_eq!(r.action, RiskAction::Deny);
        let r = one_rule("rate_above = \"5/1s\"\naction = \"challenge\"\n");
        assert_eq!(r.action, RiskAction::Challenge);
    }

    #[test]
    fn every_risk_rule_error_names_its_key() {
        let k = "inbound.risk_rules[0]";
        for (body, want, says) in [
            ("", k.to_owned(), "needs exactly one condition"),
            (
                "action = \"deny\"\n",
                k.to_owned(),
                "needs exactly one condition",
            ),
            (
                "new_peer = \"1h\"\nrate_above = \"3/1m\"\n",
                format!("{k}.rate_above"),
                "cannot be combined with new_peer",
            ),
            (
                "hours = \"22:00-06:00\"\nfailures_above = \"3/1m\"\nafter_failure = \"1m\"\n",
                format!("{k}.hours"),
                "cannot be combined with after_failure",
            ),
            (
                "new_peer = \"1h\"\nheader = \"x\"\npresent = true\n",
                format!("{k}.header"),
                "cannot be combined with new_peer",
            ),
            // Windows are bounded (a year and a day), and a sum of units
            // past the largest duration is an error, not a panic.
            (
                "new_peer = \"18446744073709551615s1000ms\"\n",
                format!("{k}.new_peer"),
                "too large",
            ),
            (
                "new_peer = \"367d\"\n",
                format!("{k}.new_peer"),
                "at most 366d",
            ),
            (
                "after_failure = \"53w\"\n",
                format!("{k}.after_failure"),
                "at most 366d",
            ),
            (
                "rate_above = \"1000000/18446744073709551615s\"\n",
                format!("{k}.rate_above"),
                "at most 366d",
            ),
            (
                "rate_above = \"5/18446744073709551615s1000ms\"\n",
                format!("{k}.rate_above"),
                "too large",
            ),
            (
                "failures_above = \"5/1y2d\"\n",
                format!("{k}.failures_above"),
                "at most 366d",
            ),
            // Header tests without a header.
            ("above = 5\n", format!("{k}.above"), "only with header"),
            (
                "new_peer = \"1h\"\nequals = \"x\"\n",
                format!("{k}.equals"),
                "only with header",
            ),
            (
                "one_of = [\"a\"]\n",
                format!("{k}.one_of"),
                "only with header",
            ),
            (
                "present = true\n",
                format!("{k}.present"),
                "only with header",
            ),
            // A header with no test, or two.
            (
                "header = \"x\"\n",
                format!("{k}.header"),
                "needs exactly one test",
            ),
            (
                "header = \"x\"\nabove = 1\nequals = \"2\"\n",
                format!("{k}.equals"),
                "cannot be combined with above",
            ),
            (
                "header = \"x\"\none_of = [\"a\"]\npresent = true\n",
                format!("{k}.present"),
                "cannot be combined with one_of",
            ),
            (
                "header = \"x y\"\npresent = true\n",
                format!("{k}.header"),
                "invalid header field name",
            ),
            (
                "header = \"\"\npresent = true\n",
                format!("{k}.header"),
                "invalid header field name",
            ),
            (
                "header = \"x\"\npresent = false\n",
                format!("{k}.present"),
                "only present = true",
            ),
            (
                "header = \"x\"\none_of = []\n",
                format!("{k}.one_of"),
                "is empty",
            ),
            (
                "header = \"host\"\none_of = [\"a.b\", \"::1\"]\n",
                format!("{k}.one_of[1]"),
                "is not a host",
            ),
            (
                "header = \"Host\"\nequals = \"a,b\"\n",
                format!("{k}.equals"),
                "is not a host",
            ),
            (
                "header = \"x-kind\"\none_of = [\"a\", \" b\"]\n",
                format!("{k}.one_of[1]"),
                "printable ASCII",
            ),
            (
                "header = \"x-kind\"\nequals = \"\\\"KP\\\"\"\n",
                format!("{k}.equals"),
                "printable ASCII",
            ),
            (
                "header = \"x-kind\"\nequals = \"M\\u00fcnchen\"\n",
                format!("{k}.equals"),
                "printable ASCII",
            ),
            (
                "header = \"x-kind\"\nequals = \"\"\n",
                format!("{k}.equals"),
                "printable ASCII",
            ),
            (
                "header = \"x\"\nabove = \"5\"\n",
                format!("{k}.above"),
                "expected a number, not string",
            ),
            (
                "header = \"x\"\nabove = nan\n",
                format!("{k}.above"),
                "expected a number",
            ),
            (
                "header = \"x\"\nabove = inf\n",
                format!("{k}.above"),
                "expected a number",
            ),
            // Windows and rates.
            (
                "new_peer = \"0s\"\n",
                format!("{k}.new_peer"),
                "greater than zero",
            ),
            (
                "new_peer = \"1 day\"\n",
                format!("{k}.new_peer"),
                "unknown unit",
            ),
            (
                "after_failure = \"0ms\"\n",
                format!("{k}.after_failure"),
                "greater than zero",
            ),
            (
                "after_failure = \"15\"\n",
                format!("{k}.after_failure"),
                "missing unit",
            ),
            (
                "rate_above = \"0/1m\"\n",
                format!("{k}.rate_above"),
                "between 1 and 1000000",
            ),
            (
                "rate_above = \"1000001/1m\"\n",
                format!("{k}.rate_above"),
                "between 1 and 1000000",
            ),
            (
                "rate_above = \"30/0s\"\n",
                format!("{k}.rate_above"),
                "greater than zero",
            ),
            (
                "rate_above = \"30\"\n",
                format!("{k}.rate_above"),
                "expected N/window",
            ),
            (
                "rate_above = \"x/1m\"\n",
                format!("{k}.rate_above"),
                "is not a count",
            ),
            (
                "rate_above = \"-1/1m\"\n",
                format!("{k}.rate_above"),
                "is not a count",
            ),
            (
                "rate_above = \"3/1 m\"\n",
                format!("{k}.rate_above"),
                "unknown unit",
            ),
            (
                "failures_above = \"101/1m\"\n",
                format!("{k}.failures_above"),
                "between 0 and 100",
            ),
            (
                "failures_above = \"5/0s\"\n",
                format!("{k}.failures_above"),
                "greater than zero",
            ),
            (
                "failures_above = \"5\"\n",
                format!("{k}.failures_above"),
                "expected N/window",
            ),
            // Hours.
            (
                "hours = \"22:00\"\n",
                format!("{k}.hours"),
                "expected HH:MM-HH:MM",
            ),
            (
                "hours = \"22:00-24:00\"\n",
                format!("{k}.hours"),
                "expected HH:MM-HH:MM",
            ),
            (
                "hours = \"22:60-06:00\"\n",
                format!("{k}.hours"),
                "expected HH:MM-HH:MM",
            ),
            (
                "hours = \"9:00-17:00\"\n",
                format!("{k}.hours"),
                "expected HH:MM-HH:MM",
            ),
            (
                "hours = \"22h-06h\"\n",
                format!("{k}.hours"),
                "expected HH:MM-HH:MM",
            ),
            (
                "hours = \"+1:00-03:00\"\n",
                format!("{k}.hours"),
                "expected HH:MM-HH:MM",
            ),
            (
                "hours = \"01:+5-03:00\"\n",
                format!("{k}.hours"),
                "expected HH:MM-HH:MM",
            ),
            (
                "rate_above = \"+5/10s\"\n",
                format!("{k}.rate_above"),
                "is not a count",
            ),
            (
                "failures_above = \"-0/10s\"\n",
                format!("{k}.failures_above"),
                "is not a count",
            ),
            (
                "hours = \"08:00-08:00\"\n",
                format!("{k}.hours"),
                "the same minute",
            ),
            // Action.
            (
                "new_peer = \"1h\"\naction = \"block\"\n",
                format!("{k}.action"),
                "unknown action \"block\"",
            ),
            (
                "new_peer = \"1h\"\naction = \"deny\"\n",
                format!("{k}.action"),
                "refuse every caller for ever",
            ),
        ] {
            let (key, msg) = invalid_key(&rule(body));
            assert_eq!(key, want, "{body}: {msg}");
            assert!(msg.contains(says), "{body}: {says:?} not in {msg:?}");
        }
    }

    #[test]
    fn rule_names_are_unique_tokens_other_than_the_built_in_reasons() {
        let k = "inbound.risk_rules[0].name";
        for (name_line, says) in [
            ("", "missing"),
            ("name = \"\"\n", "invalid name"),
            ("name = \"new caller\"\n", "invalid name"),
            ("name = \"a/b\"\n", "invalid name"),
            ("name = \"é\"\n", "invalid name"),
            (&format!("name = \"{}\"\n", "a".repeat(65)), "invalid name"),
            ("name = \"always\"\n", "reserved"),
            ("name = \"app\"\n", "reserved"),
        ] {
            let text = inb(&format!(
                "[[inbound.risk_rules]]\n{name_line}new_peer = \"1h\"\n"
            ));
            let (key, msg) = invalid_key(&text);
            assert_eq!(key, k, "{name_line}");
            assert!(msg.contains(says), "{name_line}: {msg}");
        }
        for ok in ["a", "A.b_c-9", &"x".repeat(64), "apps", "Always"] {
            let text = inb(&format!(
                "[[inbound.risk_rules]]\nname = \"{ok}\"\nnew_peer = \"1h\"\n"
            ));
            Config::parse(&text).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let (key, msg) = invalid_key(&inb(&format!(
            "{RULES}[[inbound.risk_rules]]\nname = \"burst\"\nhours = \"01:00-02:00\"\n"
        )));
        assert_eq!(key, "inbound.risk_rules[2].name");
        assert!(
            msg.contains("duplicate rule name \"burst\" (also inbound.risk_rules[1])"),
            "{msg}"
        );
    }

    #[test]
    fn deny_entries_are_one_id_pattern_or_one_serial() {
        let deny = |body: &str| inb(&format!("[[inbound.deny]]\n{body}"));
        let cfg = Config::parse(&(deny("spiffe_id = \"spiffe://td/ns/x/sa/stolen\"\n")
            + "[[inbound.deny]]\nspiffe_id = \"spiffe://td/ns/bad/*\"\n[[inbound.deny]]\nserial = \"00:0A:1b:FF\"\n"))
        .expect("config");
        let d = cfg.inbound.expect("inbound").policy.deny;
        assert_eq!(
            d,
            vec![
                DenyEntry::Id(IdPattern::parse("spiffe://td/ns/x/sa/stolen").expect("id")),
                DenyEntry::Id(IdPattern::parse("spiffe://td/ns/bad/*").expect("id")),
                DenyEntry::Serial("a1bff".into()),
            ]
        );
        assert_eq!(
            d.iter().map(DenyEntry::label).collect::<Vec<_>>(),
            [
                "spiffe://td/ns/x/sa/stolen",
                "spiffe://td/ns/bad/*",
                "serial:a1bff"
            ]
        );
        for (text, want, says) in [
            (deny(""), "inbound.deny[0]", "needs spiffe_id"),
            (
                deny("spiffe_id = \"spiffe://td/a\"\nserial = \"01\"\n"),
                "inbound.deny[0].serial",
                "cannot be combined with spiffe_id",
            ),
            (
                deny("spiffe_id = \"td/a\"\n"),
                "inbound.deny[0].spiffe_id",
                "invalid SPIFFE ID",
            ),
            (
                deny("serial = \"0x12\"\n"),
                "inbound.deny[0].serial",
                "invalid serial",
            ),
            (
                deny("serial = \"\"\n"),
                "inbound.deny[0].serial",
                "invalid serial",
            ),
            (
                deny("serial = \"12::34\"\n"),
                "inbound.deny[0].serial",
                "invalid serial",
            ),
            (
                deny("serial = \"1\"\n") + "[[inbound.deny]]\nserial = \"g1\"\n",
                "inbound.deny[1].serial",
                "invalid serial",
            ),
        ] {
            let (key, msg) = invalid_key(&text);
            assert_eq!(key, want, "{msg}");
            assert!(msg.contains(says), "{msg}");
        }
    }

    #[test]
    fn serials_are_normalized_to_lowercase_hex_without_leading_zeros() {
        for (given, want) in [
            ("0A:1B:2C", Some("a1b2c")),
            ("0a1b2c", Some("a1b2c")),
            ("A1B2C", Some("a1b2c")),
            (" 00:00:01 ", Some("1")),
            ("00", Some("0")),
            ("0", Some("0")),
            (&"ff".repeat(20), Some(&*"ff".repeat(20))),
            (&format!("00{}", "ff".repeat(20)), Some(&*"ff".repeat(20))),
            (&"ff".repeat(21), None),
            ("", None),
            (":", None),
            (":0a", None),
            ("0a:", None),
            ("0a::1b", None),
            ("0g", None),
            ("0a-1b", None),
            ("0a 1b", None),
        ] {
            assert_eq!(normalize_serial(given).as_deref(), want, "{given:?}");
        }
    }

    #[test]
    fn audit_log_and_max_tracked_identities() {
        let stepup = |line: &str| {
            Config::parse(&inb(&format!("[inbound.stepup]\n{line}\n")))
                .map(|c| c.inbound.expect("inbound").stepup)
        };
        let d = stepup("").expect("default");
        assert_eq!(d.audit_log, None);
        assert_eq!(d.max_tracked_identities, 10_000);
        assert_eq!(
            stepup("audit_log = true").expect("true").audit_log,
            Some(AuditSink::Stdout)
        );
        assert_eq!(stepup("audit_log = false").expect("false").audit_log, None);
        assert_eq!(
            stepup("audit_log = \"/var/log/keyproof/audit.jsonl\"")
                .expect("path")
                .audit_log,
            Some(AuditSink::File(PathBuf::from(
                "/var/log/keyproof/audit.jsonl"
            )))
        );
        assert_eq!(
            stepup("max_tracked_identities = 1")
                .expect("1")
                .max_tracked_identities,
            1
        );
        for (line, want, says) in [
            (
                "audit_log = \"\"",
                "inbound.stepup.audit_log",
                "must name a file",
            ),
            ("audit_log = 1", "inbound.stepup.audit_log", "not integer"),
            (
                "audit_log = [\"a\"]",
                "inbound.stepup.audit_log",
                "not array",
            ),
            (
                "max_tracked_identities = 0",
                "inbound.stepup.max_tracked_identities",
                "between 1 and 10000000",
            ),
            (
                "max_tracked_identities = 10000001",
                "inbound.stepup.max_tracked_identities",
                "between 1 and 10000000",
            ),
        ] {
            let (key, msg) = invalid_key(&inb(&format!("[inbound.stepup]\n{line}\n")));
            assert_eq!(key, want, "{line}");
            assert!(msg.contains(says), "{line}: {msg}");
        }
    }

    #[test]
    fn the_audit_log_is_standard_output_or_an_absolute_path() {
        let stepup = |line: &str| {
            Config::parse(&inb(&format!("[inbound.stepup]\n{line}\n")))
                .map(|c| c.inbound.expect("inbound").stepup.audit_log)
        };
        for line in ["audit_log = \"-\"", "audit_log = \"stdout\""] {
            assert_eq!(stepup(line).expect(line), Some(AuditSink::Stdout), "{line}");
        }
        for line in [
            "audit_log = \"audit.jsonl\"",
            "audit_log = \"./audit.jsonl\"",
            "audit_log = \"logs/a\"",
            "audit_log = \"Stdout\"",
        ] {
            match stepup(line) {
                Err(ConfigError::Invalid { key, msg }) => {
                    assert_eq!(key, "inbound.stepup.audit_log", "{line}");
                    assert!(msg.contains("absolute path"), "{line}: {msg}");
                }
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn loading_catches_an_audit_log_that_cannot_be_a_file_without_creating_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let load = |audit: &Path| {
            let cfg = dir.path().join("keyproof.toml");
            let text = inb(&format!(
                "[inbound.stepup]\naudit_log = {:?}\n",
                audit.display().to_string()
            ));
            std::fs::write(&cfg, text).expect("write");
            Config::load(&cfg)
        };
        let missing = dir.path().join("no-such-dir").join("audit.jsonl");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        for (bad, says) in [
            (missing.clone(), "does not exist"),
            (sub.clone(), "is a directory"),
            (dir.path().join("keyproof.toml").join("a"), "does not exist"),
        ] {
            match load(&bad) {
                Err(ConfigError::Invalid { key, msg }) => {
                    assert_eq!(key, "inbound.stepup.audit_log", "{}", bad.display());
                    assert!(msg.contains(says), "{}: {msg}", bad.display());
                }
                other => panic!("{}: {other:?}", bad.display()),
            }
        }
        assert!(!missing.parent().expect("parent").exists());
        let fresh = sub.join("audit.jsonl");
        load(&fresh).expect("a new file in an existing directory");
        assert!(!fresh.exists(), "checking creates nothing");
        std::fs::write(&fresh, "").expect("write");
        load(&fresh).expect("an existing file");
    }

    #[test]
    fn header_rules_may_not_test_fields_the_sidecar_removes_or_sets() {
        for field in [
            "connection",
            "Keep-Alive",
            "proxy-connection",
            "te",
            "transfer-encoding",
            "transfer_encoding",
            "upgrade",
            "trailer",
            "proxy-authorization",
            "x-forwarded-client-cert",
            "X_Forwarded_Client_Cert",
            "x-keyproof-step-up",
            "x-keyproof-anything",
            "signature",
            "signature-input",
            "stepup-binding",
            "accept-signature",
            "Accept_Signature",
        ] {
            let text = inb(&format!(
                "[[inbound.risk_rules]]\nname = \"r\"\nheader = {field:?}\npresent = true\n"
            ));
            let (key, msg) = invalid_key(&text);
            assert_eq!(key, "inbound.risk_rules[0].header", "{field}");
            assert!(msg.contains("the rule would never see"), "{field}: {msg}");
        }
        for field in ["host", "x-amount", "x_amount", "signatures"] {
            let text = inb(&format!(
                "[[inbound.risk_rules]]\nname = \"r\"\nheader = {field:?}\npresent = true\n"
            ));
            Config::parse(&text).unwrap_or_else(|e| panic!("{field}: {e}"));
        }
        // A chunked or HTTP/2 body has no length field: leaving it out
        // would walk around the rule.
        for field in ["content-length", "Content_Length"] {
            let text = inb(&format!(
                "[[inbound.risk_rules]]\nname = \"r\"\nheader = {field:?}\nabove = 1000\n"
            ));
            let (key, msg) = invalid_key(&text);
            assert_eq!(key, "inbound.risk_rules[0].header", "{field}");
            assert!(msg.contains("framing"), "{field}: {msg}");
        }
    }

    #[test]
    fn an_integer_threshold_must_be_exact_as_a_number() {
        let rule = |n: &str| {
            inb(&format!(
                "[[inbound.risk_rules]]\nname = \"r\"\nheader = \"x\"\nabove = {n}\n"
            ))
        };
        for ok in ["9007199254740992", "-9007199254740992", "0", "-5"] {
            Config::parse(&rule(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["9007199254740993", "-9223372036854775808"] {
            let (key, msg) = invalid_key(&rule(bad));
            assert_eq!(key, "inbound.risk_rules[0].above", "{bad}");
            assert!(msg.contains("2^53"), "{bad}: {msg}");
        }
    }

    const POLICY: &str = "[[risk_rules]]\nname = \"burst\"\nrate_above = \"3/1s\"\n[[routes]]\npath_prefix = \"/pay\"\nallow = [\"spiffe://td/ns/shop/*\"]\nstep_up = \"risk\"\nrisk = [\"burst\"]\n[[deny]]\nserial = \"0F\"\n";

    fn write_policy(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("policy.toml");
        std::fs::write(&p, text).expect("write policy");
        p
    }

    #[test]
    fn the_policy_file_holds_the_same_keys_at_its_top_level() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_policy(dir.path(), POLICY);
        let p = load_policy_file(&path).expect("policy");
        assert_eq!(p.routes.len(), 1);
        assert_eq!(p.routes[0].step_up, StepUpMode::Risk);
        assert_eq!(p.routes[0].risk, ["burst"]);
        assert_eq!(p.risk_rules[0].name, "burst");
        assert_eq!(p.deny, [DenyEntry::Serial("f".into())]);

        // Read at startup: the configuration holds its content.
        let text = inb(&format!("policy_file = {:?}\n", path.display().to_string()));
        let i = Config::parse(&text)
            .expect("config")
            .inbound
            .expect("inbound");
        assert_eq!(i.policy_file.as_deref(), Some(path.as_path()));
        assert_eq!(i.policy.routes[0].path_prefix, "/pay");
        assert_eq!(i.policy.deny.len(), 1);

        // An empty file is what a half-done write leaves: refused. An empty
        // policy (the default decides) is written as one.
        std::fs::write(&path, " \n").expect("write");
        let e = load_policy_file(&path).expect_err("empty file").to_string();
        assert!(e.contains("the policy file is empty"), "{e}");
        // As is one with no routes key: comments alone, or a deny list
        // alone (what a generator that failed after its header leaves).
        for partial in [
            "# keyproof policy\n",
            "[[deny]]\nspiffe_id = \"spiffe://prod.example.com/ns/x/sa/y\"\n",
        ] {
            std::fs::write(&path, partial).expect("write");
            let e = load_policy_file(&path).expect_err(partial).to_string();
            assert!(e.contains("has no `routes` key"), "{partial}: {e}");
        }
        std::fs::write(&path, "routes = []\n").expect("write");
        let p = load_policy_file(&path).expect("empty policy");
        assert!(p.routes.is_empty() && p.risk_rules.is_empty() && p.deny.is_empty());
    }

    #[test]
    fn policy_file_errors_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let shown = dir.path().join("policy.toml").display().to_string();
        for (text, want) in [
            (
                POLICY.replace("spiffe://td/ns/shop/*", "shop"),
                "routes[0].allow[0]",
            ),
            (
                POLICY.replace("[\"burst\"]", "[\"nope\"]"),
                "routes[0].risk[0]",
            ),
            (POLICY.replace("3/1s", "3"), "risk_rules[0].rate_above"),
            (POLICY.replace("0F", "zz"), "deny[0].serial"),
            (
                POLICY.replace("\"/pay\"", "\"pay\""),
                "routes[0].path_prefix",
            ),
        ] {
            let path = write_policy(dir.path(), &text);
            match load_policy_file(&path) {
                Err(ConfigError::Invalid { key, msg }) => {
                    assert_eq!(key, format!("{shown}: {want}"), "{msg}");
                }
                other => panic!("{want}: {other:?}"),
            }
            // The same through the main configuration.
            let main = inb(&format!("policy_file = {shown:?}\n"));
            let e = Config::parse(&main).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{shown}: {want}: ")), "{e}");
        }
        // Syntax errors and unknown keys name the file too.
        for (text, says) in [
            ("[[routes]\n", "policy.toml"),
            ("[[routes]]\npath_prefix = \"/a\"\nbogus = 1\n", "bogus"),
            ("[inbound]\n", "inbound"),
            (
                "[[routes]]\npath_prefix = \"/a\"\nstep_up = \"risk\"\nrisk = \"burst\"\n",
                "risk",
            ),
        ] {
            let path = write_policy(dir.path(), text);
            match load_policy_file(&path) {
                Err(ConfigError::Parse(msg)) => {
                    assert!(msg.starts_with(&format!("{shown}: ")), "{msg}");
                    assert!(msg.contains(says), "{says}: {msg}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let missing = dir.path().join("missing.toml");
        match load_policy_file(&missing) {
            Err(e @ ConfigError::Read { .. }) => {
                let ConfigError::Read { path, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(path, &missing);
                // The operating system's reason, not only the path.
                let shown = e.to_string();
                assert!(shown.contains(&missing.display().to_string()), "{shown}");
                assert!(shown.contains("No such file"), "{shown}");
            }
            other => panic!("{other:?}"),
        }
        let (key, msg) = invalid_key(&inb(&format!(
            "policy_file = {:?}\n",
            missing.display().to_string()
        )));
        assert_eq!(key, "inbound.policy_file");
        assert!(
            msg.contains(&format!("cannot read {}: ", missing.display()))
                && msg.contains("No such file"),
            "{msg}"
        );
    }

    #[test]
    fn an_inline_policy_key_beside_a_policy_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_policy(dir.path(), POLICY);
        let file = format!("policy_file = {:?}\n", path.display().to_string());
        for (extra, want) in [
            (
                "[[inbound.routes]]\npath_prefix = \"/a\"\n",
                "inbound.routes",
            ),
            ("routes = []\n", "inbound.routes"),
            (
                "[[inbound.risk_rules]]\nname = \"x\"\nnew_peer = \"1h\"\n",
                "inbound.risk_rules",
            ),
            ("[[inbound.deny]]\nserial = \"1\"\n", "inbound.deny"),
        ] {
            let (key, msg) = invalid_key(&inb(&format!("{file}{extra}")));
            assert_eq!(key, want, "{extra}");
            assert!(
                msg.contains("cannot be combined with inbound.policy_file"),
                "{msg}"
            );
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        let (key, msg) = invalid_key(&inb("policy_file = \"\"\n"));
        assert_eq!(
            (key.as_str(), msg.as_str()),
            ("inbound.policy_file", "must name a file")
        );
    }

    #[test]
    fn http_ports_default_to_the_app_port_and_are_validated() {
        let c = Config::parse(&inb("")).expect("valid");
        let i = c.inbound.as_ref().expect("inbound");
        assert_eq!(i.http_ports, vec![2]);
        assert_eq!((i.max_tunnels, i.max_tunnels_per_peer), (4096, 256));
        let explain = c.explain();
        assert!(explain.contains("http_ports [2]"), "{explain}");
        let c = Config::parse(&inb("http_ports = [8080, 9000, 8080]
"))
        .expect("valid");
        assert_eq!(c.inbound.expect("inbound").http_ports, vec![8080, 9000]);
        let c = Config::parse(&inb("http_ports = []
"))
        .expect("valid: tunnels only");
        assert!(c.inbound.expect("inbound").http_ports.is_empty());
        for (extra, want) in [
            (
                "http_ports = [0]
",
                "inbound.http_ports[0]",
            ),
            (
                "http_ports = [80, 65536]
",
                "inbound.http_ports[1]",
            ),
            (
                "http_ports = [-1]
",
                "inbound.http_ports[0]",
            ),
            (
                "max_tunnels = 0
",
                "inbound.max_tunnels",
            ),
            (
                "max_tunnels_per_peer = 0
",
                "inbound.max_tunnels_per_peer",
            ),
            (
                "max_tunnels = 10
max_tunnels_per_peer = 11
",
                "inbound.max_tunnels_per_peer",
            ),
        ] {
            assert_eq!(invalid_key(&inb(extra)).0, want, "{extra}");
        }
        let c = Config::parse(&inb("max_tunnels = 10
"))
        .expect("valid");
        let i = c.inbound.expect("inbound");
        assert_eq!((i.max_tunnels, i.max_tunnels_per_peer), (10, 10));
    }

    #[test]
    fn two_listeners_on_one_port_are_refused_naming_both() {
        let cfg = |inb: &str, out: &str, admin: &str| {
            format!(
                "{BASE}[inbound]\nlisten = \"{inb}\"\napp = \"127.0.0.1:8080\"\n[outbound]\nlisten = \"{out}\"\n[admin]\nlisten = \"{admin}\"\n"
            )
        };
        for (inb, out, admin, key) in [
            (
                "0.0.0.0:15443",
                "127.0.0.1:15001",
                "0.0.0.0:15443",
                "admin.listen",
            ),
            (
                "0.0.0.0:15443",
                "127.0.0.1:15443",
                "0.0.0.0:15090",
                "outbound.listen",
            ),
            (
                "127.0.0.1:15443",
                "127.0.0.1:15001",
                "127.0.0.1:15001",
                "admin.listen",
            ),
            (
                "[::]:15443",
                "127.0.0.1:15001",
                "[::1]:15443",
                "admin.listen",
            ),
        ] {
            let (k, msg) = invalid_key(&cfg(inb, out, admin));
            assert_eq!(k, key, "{inb} {out} {admin}: {msg}");
            assert!(msg.contains("a port of its own"), "{msg}");
        }
        // Other addresses, or ephemeral ports: no collision.
        for (inb, out, admin) in [
            ("10.0.0.1:15443", "127.0.0.1:15443", "127.0.0.2:15443"),
            ("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"),
        ] {
            Config::parse(&cfg(inb, out, admin)).expect("valid");
        }
    }

    #[test]
    fn the_proxys_own_ports_are_never_http_ports_nor_tunnel_targets() {
        let base = format!(
            "{BASE}[inbound]\nlisten = \"0.0.0.0:15443\"\napp = \"127.0.0.1:8080\"\n{{}}\n{OUT_15001}[admin]\nlisten = \"0.0.0.0:15090\"\n"
        );
        let cfg = |extra: &str| base.replace("{}", extra);
        let c = Config::parse(&cfg("")).expect("valid");
        let i = c.inbound.expect("inbound");
        assert_eq!(i.own_ports, vec![15443, 15001, 15090]);
        assert_eq!(i.http_ports, vec![8080]);
        for own in [15443, 15001, 15090] {
            let (key, msg) = invalid_key(&cfg(&format!(
                "[[inbound.tcp]]\nport = {own}\nallow = [\"spiffe://td/*\"]\n"
            )));
            assert_eq!(key, "inbound.tcp[0].port");
            assert!(msg.contains("listen port of this proxy"), "{msg}");
            let (key, _) = invalid_key(&cfg(&format!("http_ports = [8080, {own}]\n")));
            assert_eq!(key, "inbound.http_ports");
        }
        // In a policy file, the error names the file and its key.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_policy(
            dir.path(),
            "routes = []\n[[tcp]]\nport = 15001\nallow = [\"spiffe://td/*\"]\n",
        );
        let (key, _) = invalid_key(&cfg(&format!(
            "policy_file = {:?}\n",
            path.display().to_string()
        )));
        assert_eq!(key, format!("{}: tcp[0].port", path.display()));
    }

    #[test]
    fn a_port_is_either_http_or_tcp() {
        let rule =
            |port: u16| format!("[[inbound.tcp]]\nport = {port}\nallow = [\"spiffe://td/*\"]\n");
        // The default http_ports: the app's port (2).
        let (key, msg) = invalid_key(&inb(&rule(2)));
        assert_eq!(key, "inbound.tcp[0].port");
        assert!(msg.contains("also in inbound.http_ports"), "{msg}");
        let (key, _) = invalid_key(&inb(&format!("http_ports = [5432]\n{}", rule(5432))));
        assert_eq!(key, "inbound.tcp[0].port");
        // Not an HTTP port: fine; but never the app's port (round 10 N4).
        Config::parse(&inb(&format!("http_ports = [8080]\n{}", rule(3)))).expect("valid");
        let (key, msg) = invalid_key(&inb(&format!("http_ports = [8080]\n{}", rule(2))));
        assert_eq!(key, "inbound.tcp[0].port");
        assert!(msg.contains("port of inbound.app"), "{msg}");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_policy(
            dir.path(),
            "routes = []\n[[tcp]]\nport = 2\nallow = [\"spiffe://td/*\"]\n",
        );
        let (key, _) = invalid_key(&inb(&format!(
            "policy_file = {:?}\n",
            path.display().to_string()
        )));
        assert_eq!(key, format!("{}: tcp[0].port", path.display()));
    }

    #[test]
    fn tcp_rules_are_validated_inline_and_in_a_policy_file_naming_the_key() {
        let ok = "[[inbound.tcp]]\nport = 5432\nallow = [\"spiffe://td/ns/shop/*\"]\n[[inbound.tcp]]\nport = 6379\nallow = [\"spiffe://td/ns/a/sa/b\", \"spiffe://td/ns/c/*\"]\n";
        let cfg = Config::parse(&inb(ok)).expect("config");
        let i = cfg.inbound.as_ref().expect("inbound");
        assert_eq!(i.policy.tcp.len(), 2);
        assert_eq!(i.policy.tcp[0].port, 5432);
        assert_eq!(i.policy.tcp[1].allow.len(), 2);
        let shown = cfg.explain();
        assert!(
            shown.contains(
                "tcp port 5432 (HTTP/2 CONNECT -> 127.0.0.1:5432): allow [spiffe://td/ns/shop/*]"
            ),
            "{shown}"
        );
        let rule =
            |port: &str, allow: &str| format!("[[inbound.tcp]]\nport = {port}\nallow = {allow}\n");
        let good = rule("1", "[\"spiffe://td/ns/a/*\"]");
        for (extra, want) in [
            (rule("0", "[\"spiffe://td/ns/a/*\"]"), "inbound.tcp[0].port"),
            (
                rule("65536", "[\"spiffe://td/ns/a/*\"]"),
                "inbound.tcp[0].port",
            ),
            (
                rule("-1", "[\"spiffe://td/ns/a/*\"]"),
                "inbound.tcp[0].port",
            ),
            (rule("22", "[]"), "inbound.tcp[0].allow"),
            (
                format!("{good}{}", rule("2", "[\"spiffe://td/ns/a/*\", \"shop\"]")),
                "inbound.tcp[1].allow[1]",
            ),
            (format!("{good}{good}"), "inbound.tcp[1].port"),
        ] {
            let (key, msg) = invalid_key(&inb(&extra));
            assert_eq!(key, want, "{extra}: {msg}");
        }
        let (_, msg) = invalid_key(&inb(&format!("{good}{good}")));
        assert!(msg.contains("already the port of inbound.tcp[0]"), "{msg}");
        // A missing allow list is the same error as an empty one.
        let (key, _) = invalid_key(&inb("[[inbound.tcp]]\nport = 5\n"));
        assert_eq!(key, "inbound.tcp[0].allow");

        // In a policy file: top-level [[tcp]], errors naming the file.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_policy(
            dir.path(),
            "routes = []\n[[tcp]]\nport = 5432\nallow = [\"spiffe://td/ns/shop/*\"]\n",
        );
        let p = load_policy_file(&path).expect("policy");
        assert_eq!(p.tcp[0].port, 5432);
        let path = write_policy(
            dir.path(),
            "routes = []\n[[tcp]]\nport = 5432\nallow = [\"shop\"]\n",
        );
        match load_policy_file(&path) {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, format!("{}: tcp[0].allow[0]", path.display()));
            }
            other => panic!("{other:?}"),
        }
        // Never half inline, half in the file.
        let file = format!("policy_file = {:?}\n", path.display().to_string());
        let (key, msg) = invalid_key(&inb(&format!("{file}{good}")));
        assert_eq!(key, "inbound.tcp");
        assert!(
            msg.contains("cannot be combined with inbound.policy_file"),
            "{msg}"
        );
    }

    #[test]
    fn unused_rules_are_reported() {
        let cfg = Config::parse(&risk_route("[\"burst\"]", "")).expect("config");
        let i = cfg.inbound.as_ref().expect("inbound");
        assert_eq!(i.policy.unused_risk_rules(), ["new-caller"]);
        assert!(
            cfg.explain()
                .contains("  risk rule new-caller is used by no route\n"),
            "{}",
            cfg.explain()
        );
        let cfg = Config::parse(&risk_route("[\"burst\", \"new-caller\"]", "")).expect("config");
        assert!(cfg
            .inbound
            .as_ref()
            .expect("inbound")
            .policy
            .unused_risk_rules()
            .is_empty());
        assert!(!cfg.explain().contains("used by no route"));
    }

    #[test]
    fn explain_says_what_each_risk_route_does() {
        let extra = "[[inbound.risk_rules]]\nname = \"big\"\nheader = \"x-amount\"\nabove = 10000\n\
            [[inbound.risk_rules]]\nname = \"kind\"\nheader = \"x-kind\"\none_of = [\"wire\", \"cash\"]\n\
            [[inbound.risk_rules]]\nname = \"test\"\nheader = \"x-test\"\nequals = \"1\"\n\
            [[inbound.risk_rules]]\nname = \"debug\"\nheader = \"x-debug\"\npresent = true\n\
            [[inbound.risk_rules]]\nname = \"after-refusal\"\nafter_failure = \"15m\"\n\
            [[inbound.risk_rules]]\nname = \"night\"\nhours = \"22:00-06:30\"\n\
            [[inbound.risk_rules]]\nname = \"lockout\"\nfailures_above = \"5/15m\"\naction = \"deny\"\n\
            [[inbound.risk_rules]]\nname = \"flood\"\nrate_above = \"100/1s\"\naction = \"deny\"\n\
            [[inbound.deny]]\nspiffe_id = \"spiffe://td/ns/x/sa/stolen\"\n[[inbound.deny]]\nserial = \"0A:1B\"\n\
            [inbound.stepup]\naudit_log = true\nmax_tracked_identities = 500\n";
        let text = risk_route(
            "[\"new-caller\", \"burst\", \"lockout\", \"big\", \"kind\", \"test\", \"debug\", \"after-refusal\", \"night\", \"flood\"]",
            extra,
        );
        // [inbound.stepup] must come after the arrays of tables it splits.
        let text = text.replace(
            "[inbound.stepup]\naudit_log = true\nmax_tracked_identities = 500\n",
            "",
        ) + "[inbound.stepup]\naudit_log = true\nmax_tracked_identities = 500\n";
        let e = Config::parse(&text).expect("config").explain();
        let want_route = "  route /pay (any method): allow [], step-up by risk: \
            challenge when new-caller (not served on this route within 24h) \
            or burst (more than 30 requests within any 1m by the caller on this route) \
            or big (header x-amount above 10000 or not a number) \
            or kind (header x-kind is one of \"wire\", \"cash\") \
            or test (header x-test is \"1\") \
            or debug (header x-debug present) \
            or after-refusal (a refused step-up, 403 or bad handshake of the caller within 15m) \
            or night (between 22:00 and 06:30 UTC); \
            deny when lockout (more than 5 refusals of the caller within 15m, for 15m) \
            or flood (more than 100 requests within any 1s by the caller on this route); \
            challenge when the app answers x-keyproof-step-up: required\n";
        for says in [
            want_route,
            "  deny spiffe://td/ns/x/sa/stolen: 403 on every path\n",
            "  deny serial:a1b: 403 on every path (until that certificate is renewed: revoke it at the CA too, keyproof-ca revoke --serial)\n",
            "  risk state for at most 500 caller identities",
            "  step-up audit records to standard output\n",
        ] {
            assert!(e.contains(says), "{says:?} not in:\n{e}");
        }
        assert!(!e.contains("policy (routes"), "{e}");

        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_policy(dir.path(), POLICY);
        let e = Config::parse(&inb(&format!(
            "policy_file = {:?}\n[inbound.stepup]\naudit_log = \"/var/log/a.jsonl\"\n",
            path.display().to_string()
        )))
        .expect("config")
        .explain();
        for says in [
            format!("  policy (routes, risk rules, deny list) from {} (re-read on change)\n", path.display()),
            "  deny serial:f: 403 on every path (until that certificate is renewed: revoke it at the CA too, keyproof-ca revoke --serial)\n".to_owned(),
            "  route /pay (any method): allow [spiffe://td/ns/shop/*], step-up by risk: challenge when burst (more than 3 requests within any 1s by the caller on this route); challenge when the app answers x-keyproof-step-up: required\n".to_owned(),
            "  step-up audit records appended to /var/log/a.jsonl\n".to_owned(),
        ] {
            assert!(e.contains(&says), "{says:?} not in:\n{e}");
        }
        // No risk route: no word about risk state.
        let e = Config::parse(&route("step_up = true\n"))
            .expect("config")
            .explain();
        assert!(!e.contains("risk state"), "{e}");
    }

    #[test]
    fn durations_are_explained_as_they_are_written() {
        for (d, want) in [
            (Duration::from_secs(86_400), "24h"),
            (Duration::from_secs(2 * 86_400), "2d"),
            (Duration::from_secs(7 * 86_400), "7d"),
            (Duration::from_secs(900), "15m"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3661), "1h1m1s"),
            (Duration::from_millis(1500), "1s500ms"),
            (Duration::from_millis(250), "250ms"),
            (Duration::ZERO, "0ms"),
        ] {
            assert_eq!(format_duration(d), want);
            assert_eq!(keyproof_identity::duration::parse(want).expect(want), d);
        }
    }

    #[test]
    fn upstream_rule_errors_name_their_key() {
        let id = "identity = \"spiffe://td/ns/a/sa/b\"\n";
        let rule = |fields: &str| format!("[[outbound.upstreams]]\n{fields}{id}");
        let ok = rule("host = \"api\"\naddress = \"api:443\"\n");
        let cases = [
            (
                outb(&(ok.clone() + &rule("cidr = \"10.0.0.0/33\"\n"))),
                "outbound.upstreams[1].cidr",
            ),
            (
                outb(&rule("cidr = \"ten\"\n")),
                "outbound.upstreams[0].cidr",
            ),
            (outb(&rule("port = 0\n")), "outbound.upstreams[0].port"),
            (outb(&rule("port = 65536\n")), "outbound.upstreams[0].port"),
            (outb(&rule("address = \"a:1\"\n")), "outbound.upstreams[0]"),
            (
                outb(&rule("host = \"a.*.b\"\n")),
                "outbound.upstreams[0].host",
            ),
            (
                outb(&rule("host = \"{x}-y.b\"\n")),
                "outbound.upstreams[0].host",
            ),
            (
                outb(&rule("host = \"{x}.{x}.b\"\n")),
                "outbound.upstreams[0].host",
            ),
            (
                outb(&rule("host = \"{}.b\"\n")),
                "outbound.upstreams[0].host",
            ),
            (
                outb(&rule("host = \"a..b\"\n").replace("a..b", "*.a..b")),
                "outbound.upstreams[0].host",
            ),
            (outb(&(ok.clone() + &ok)), "outbound.upstreams[1].host"),
            (
                outb(&(rule("port = 5432\n") + &rule("port = 5432\n"))),
                "outbound.upstreams[1].port",
            ),
            (outb("unmeshed = \"drop\"\n"), "outbound.unmeshed"),
            (
                outb("opaque_ports = [5432, 0]\n"),
                "outbound.opaque_ports[1]",
            ),
            (outb("detect_timeout = \"0s\"\n"), "outbound.detect_timeout"),
            (
                outb("connect_timeout = \"0s\"\n"),
                "outbound.connect_timeout",
            ),
            (
                outb("pool_idle_timeout = \"0s\"\n"),
                "outbound.pool_idle_timeout",
            ),
            (
                outb("detect_timeout = \"soon\"\n"),
                "outbound.detect_timeout",
            ),
            (
                outb(&format!("upstreams_file = \"/nonexistent/u.toml\"\n{ok}")),
                "outbound.upstreams",
            ),
            (
                outb("upstreams_file = \"/nonexistent/u.toml\"\n"),
                "outbound.upstreams_file",
            ),
        ];
        for (text, key) in cases {
            let (got, msg) = invalid_key(&text);
            assert_eq!(got, key, "{msg}\n{text}");
        }
        // Placeholders in the identity must be captured by the host.
        for (host, identity) in [
            ("*.svc", "spiffe://td/ns/{ns}/sa/*"),
            ("{svc}.{ns}", "spiffe://td/ns/{other}/sa/*"),
            ("", "spiffe://td/ns/{ns}/sa/*"),
            ("{ns}.svc", "spiffe://td/ns/{ns/sa/*"),
            ("{ns}.svc", "spiffe://td/ns/ns}/sa/*"),
        ] {
            let h = if host.is_empty() {
                "port = 80\n".to_owned()
            } else {
                format!("host = \"{host}\"\n")
            };
            let text = outb(&format!(
                "[[outbound.upstreams]]\n{h}identity = \"{identity}\"\n"
            ));
            let (key, msg) = invalid_key(&text);
            assert_eq!(key, "outbound.upstreams[0].identity", "{msg}");
        }
    }

    #[test]
    fn upstream_rules_parse_and_are_explained() {
        let text = outb(
            "detect_timeout = \"250ms\"\nopaque_ports = [5432, 6379, 5432]\nunmeshed = \"deny\"\n\
             [[outbound.upstreams]]\nhost = \"*.{namespace}.svc.cluster.local\"\nidentity = \"spiffe://td/ns/{namespace}/sa/*\"\n\
             [[outbound.upstreams]]\ncidr = \"10.1.2.3/8\"\nport = 5432\naddress = \"10.9.9.9:15443\"\nidentity = \"spiffe://td/ns/db/sa/pg\"\n\
             [[outbound.upstreams]]\nhost = \"API.demo\"\naddress = \"api:443\"\nidentity = \"spiffe://td/ns/a/sa/api\"\n",
        );
        let cfg = Config::parse(&text).expect("config");
        let o = cfg.outbound.as_ref().expect("outbound");
        assert_eq!(o.detect_timeout, Duration::from_millis(250));
        assert_eq!(o.opaque_ports, [5432, 6379]);
        assert_eq!(o.unmeshed, Unmeshed::Deny);
        let r = &o.upstreams;
        assert_eq!(
            r[0].host.as_ref().unwrap().to_string(),
            "*.{namespace}.svc.cluster.local"
        );
        assert!(r[0].identity.has_placeholders());
        assert_eq!(r[1].cidr.unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(r[1].port, Some(5432));
        assert_eq!(r[2].exact_host(), Some("api.demo"));
        let e = cfg.explain();
        for want in [
            "host *.{namespace}.svc.cluster.local -> the original destination expecting spiffe://td/ns/{namespace}/sa/*",
            "destination in 10.0.0.0/8 and destination port 5432 -> 10.9.9.9:15443 expecting spiffe://td/ns/db/sa/pg (opaque TCP and HTTP)",
            "host api.demo -> api:443 expecting spiffe://td/ns/a/sa/api",
            "protocol detected within 250ms, ports 5432, 6379 always opaque TCP; destinations no rule matches are refused",
        ] {
            assert!(e.contains(want), "{want:?} not in:\n{e}");
        }
        // Defaults: every existing configuration keeps its meaning.
        let o = Config::parse(&outb("")).unwrap().outbound.unwrap();
        assert_eq!(o.unmeshed, Unmeshed::Passthrough);
        assert_eq!(o.detect_timeout, Duration::from_millis(300));
        assert!(o.opaque_ports.is_empty() && o.upstreams_file.is_none());
    }

    #[test]
    fn an_upstreams_file_holds_the_rules_and_names_itself_in_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("upstreams.toml");
        std::fs::write(
            &path,
            "[[upstreams]]\ncidr = \"10.0.0.0/8\"\nidentity = \"spiffe://td/ns/a/*\"\n",
        )
        .unwrap();
        let text = outb(&format!(
            "upstreams_file = {:?}\n",
            path.display().to_string()
        ));
        let o = Config::parse(&text).expect("config").outbound.unwrap();
        assert_eq!(o.upstreams.len(), 1);
        assert_eq!(o.upstreams_file.as_deref(), Some(path.as_path()));
        std::fs::write(
            &path,
            "[[upstreams]]\nport = 99999\nidentity = \"spiffe://td/ns/a/*\"\n",
        )
        .unwrap();
        let (key, _) = invalid_key(&text);
        assert_eq!(key, format!("{}: upstreams[0].port", path.display()));
        assert!(parse_upstreams(&path, " \n").is_err());
        // Comments alone are refused too: taken as no upstreams, a partial
        // write would pass meshed destinations through in plain text.
        let e = parse_upstreams(&path, "# generated\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no `upstreams` key"), "{e}");
        assert_eq!(parse_upstreams(&path, "upstreams = []\n").unwrap().len(), 0);
    }
}
