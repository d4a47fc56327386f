//! The process: load the identity and start its reloader or renewer, bind
//! the admin, inbound and outbound listeners (and watch the inbound's
//! `policy_file`), serve until a signal, drain. Also the checks that span
//! sections of the configuration, the runtime and logging setup.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keyproof_identity::Usage;

use crate::config::{self, Config, ConfigError, IdentitySource, MemoryLimit, PolicyConfig};
use crate::identity::key::TokenKey;
use crate::identity::reload;
use crate::identity::renew;
use crate::identity::store::{self, Identity, IdentityStore};
use crate::listener;
use crate::{admin, inbound, memory, metrics, outbound, watched};

/// Why the proxy could not start. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity files are missing or unusable.
    #[error(transparent)]
    Identity(#[from] store::IdentityError),
    /// A listener could not be bound.
    #[error("{key}: cannot listen on {addr}")]
    Bind {
        /// The configuration key.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A policy pattern names another trust domain.
    #[error("{key}: {msg}")]
    ForeignPattern {
        /// The configuration key.
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// The inbound could not be built.
    #[error(transparent)]
    Inbound(#[from] inbound::InboundError),
    /// The outbound could not be built.
    #[error(transparent)]
    Outbound(#[from] outbound::OutboundError),
    /// Metric registration failed (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The async runtime could not be created.
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    /// A thread of the sidecar's own could not be started.
    #[error("thread: {0}")]
    Thread(std::io::Error),
}

fn pattern_trust_domain(p: &keyproof_identity::IdPattern) -> String {
    match p {
        keyproof_identity::IdPattern::Exact(id) => id.trust_domain_name().to_owned(),
        keyproof_identity::IdPattern::Prefix(s) => s
            .strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_default()
            .to_owned(),
    }
}

/// Refuses patterns that can never match: peers are only accepted from our
/// own trust domain, so an `allow` or `identity` naming another one is a
/// configuration mistake, better caught at startup than as a 403 or 502.
pub fn check_trust_domains(cfg: &Config, identity: &Identity) -> Result<(), StartError> {
    check_trust_domain_name(cfg, identity.id.trust_domain_name())
}

/// [`check_trust_domains`] against a trust domain name (`[identity.ca]`
/// knows it from `spiffe_id` before any certificate is held).
pub fn check_trust_domain_name(cfg: &Config, ours: &str) -> Result<(), StartError> {
    if let Some(i) = &cfg.inbound {
        check_policy_trust_domain(&i.policy, &policy_key_prefix(i), ours)?;
    }
    if let Some(o) = &cfg.outbound {
        let prefix = match &o.upstreams_file {
            Some(f) => format!("{}: upstreams", f.display()),
            None => "outbound.upstreams".to_owned(),
        };
        check_rules_trust_domain(&o.upstreams, &prefix, ours)?;
    }
    Ok(())
}

/// Refuses upstream rules whose identity is of another trust domain;
/// `prefix` starts the key named (`outbound.upstreams`, or the file's path
/// and `: upstreams`).
fn check_rules_trust_domain(
    rules: &[config::UpstreamRule],
    prefix: &str,
    ours: &str,
) -> Result<(), StartError> {
    for (u, up) in rules.iter().enumerate() {
        let td = pattern_trust_domain(&up.identity.fixed);
        if td != ours {
            return Err(StartError::ForeignPattern {
                key: format!("{prefix}[{u}].identity"),
                msg: format!(
                    "{} is in trust domain {td}, but this workload's is {ours}; peers of other trust domains are never accepted",
                    up.identity.text
                ),
            });
        }
    }
    Ok(())
}

/// Why a changed upstreams file was not taken into use.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamsReloadError {
    /// The file is not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A rule expects a peer of another trust domain.
    #[error(transparent)]
    Check(#[from] StartError),
    /// The upstreams could not be built.
    #[error(transparent)]
    Build(#[from] outbound::OutboundError),
}

/// `text`, the content of upstreams file `path`: if its rules are valid
/// and expect peers of trust domain `ours` only, they are put in use.
/// Returns how many rules it has.
pub fn reload_upstreams(
    outbound: &outbound::Outbound,
    path: &Path,
    text: &str,
    ours: &str,
) -> Result<usize, UpstreamsReloadError> {
    let rules = config::parse_upstreams(path, text)?;
    check_rules_trust_domain(&rules, &format!("{}: upstreams", path.display()), ours)?;
    let n = rules.len();
    outbound.replace_rules(rules)?;
    Ok(n)
}

/// How the logs name `[outbound] upstreams_file`.
const UPSTREAMS_FILE: watched::Names = watched::Names {
    file: "upstreams file",
    taken: "upstream rules reloaded",
    kept: "the upstream rules in use keep serving",
    key: "upstreams_file",
};

/// Watches `[outbound] upstreams_file` ([`watched::watch`]): every change
/// of content is taken into use; a file that is refused is logged and
/// counted (`keyproof_upstream_reloads_total`), and the rules in use keep
/// serving. Each request routes by the rules in use when it comes.
pub async fn watch_upstreams(
    outbound: Arc<outbound::Outbound>,
    path: PathBuf,
    seen: Option<Vec<u8>>,
    ours: String,
    metrics: metrics::Metrics,
    interval: Duration,
) {
    let take = |text: &str| match reload_upstreams(&outbound, &path, text, &ours) {
        Ok(rules) => Ok(format!("{rules} rules")),
        Err(UpstreamsReloadError::Build(outbound::OutboundError::Metrics(e))) => {
            Err(watched::Refused::Retry(format!("step-up metrics: {e}")))
        }
        Err(e) => Err(watched::Refused::Content(e.to_string())),
    };
    let counted = |ok| metrics.upstream_reload(ok);
    watched::watch(path.clone(), seen, interval, UPSTREAMS_FILE, take, counted).await;
}

/// The upstreams file as read when the proxy starts, parsed; `None` when
/// it cannot be read or parsed now (the rules read with the configuration
/// serve, and the watcher takes the next valid content).
async fn upstreams_at_start(path: &Path) -> Option<(Vec<u8>, Vec<config::UpstreamRule>)> {
    let bytes = crate::files::read_async(path).await.ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    match config::parse_upstreams(path, text) {
        Ok(rules) => Some((bytes, rules)),
        Err(e) => {
            tracing::warn!(upstreams_file = %path.display(), error = %e, "upstreams file changed since the configuration was read and is refused; the rules read with the configuration serve");
            None
        }
    }
}

/// How the keys of the inbound policy are named in errors: `inbound.`
/// inline, or the policy file's path.
fn policy_key_prefix(i: &config::InboundConfig) -> String {
    match &i.policy_file {
        Some(p) => format!("{}: ", p.display()),
        None => "inbound.".to_owned(),
    }
}

/// [`check_trust_domains`] for a policy: every route's `allow` pattern and
/// every deny list SPIFFE ID pattern must be in trust domain `ours`. Keys in errors start with `prefix`.
fn check_policy_trust_domain(
    policy: &PolicyConfig,
    prefix: &str,
    ours: &str,
) -> Result<(), StartError> {
    for (r, route) in policy.routes.iter().enumerate() {
        for (a, p) in route.allow.iter().enumerate() {
            let td = pattern_trust_domain(p);
            if td != ours {
                return Err(StartError::ForeignPattern {
                    key: format!("{prefix}routes[{r}].allow[{a}]"),
                    msg: format!("{p} is in trust domain {td}, but this workload's is {ours}; peers of other trust domains are never accepted"),
                });
            }
        }
    }
    // A deny entry that can never match looks like a lockout in force
    // while it protects nothing.
    for (d, entry) in policy.deny.iter().enumerate() {
        let config::DenyEntry::Id(p) = entry else {
            continue;
        };
        let td = pattern_trust_domain(p);
        if td != ours {
            return Err(StartError::ForeignPattern {
                key: format!("{prefix}deny[{d}].spiffe_id"),
                msg: format!("{p} is in trust domain {td}, but this workload's is {ours}; peers of other trust domains are never accepted, so this entry denies no one"),
            });
        }
    }
    Ok(())
}

/// Why a changed policy file was refused (the policy in use keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum PolicyReloadError {
    /// The file is unreadable or invalid (the error names the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A route allows peers of another trust domain.
    #[error(transparent)]
    Check(#[from] StartError),
    /// Registering the new policy's metrics failed (a bug).
    #[error("policy metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// `text`, the content of policy file `path`: if it is a valid policy
/// whose routes allow only peers of trust domain `ours`, it is put in use.
/// Returns its generation.
pub fn reload_policy(
    inbound: &inbound::Inbound,
    path: &Path,
    text: &str,
    ours: &str,
) -> Result<u64, PolicyReloadError> {
    let policy = config::parse_policy(path, text)?;
    check_policy_trust_domain(&policy, &format!("{}: ", path.display()), ours)?;
    inbound.replace_policy(&policy).map_err(|e| match e {
        inbound::PolicyError::Ports(e) => PolicyReloadError::Config(e),
        inbound::PolicyError::Metrics(e) => PolicyReloadError::Metrics(e),
    })
}

/// How the logs name `[inbound] policy_file`.
const POLICY_FILE: watched::Names = watched::Names {
    file: "inbound policy file",
    taken: "inbound policy reloaded",
    kept: "the policy in use keeps serving",
    key: "policy_file",
};

/// Watches `[inbound] policy_file` ([`watched::watch`]) and takes every
/// change of its content into use; a file that is refused is logged with
/// the key at fault and counted (`keyproof_policy_reloads_total`), and the
/// policy in use keeps serving.
///
/// `seen` is the content the policy in use was read from (`None`: not
/// known, so the first readable content is a change).
pub async fn watch_policy(
    inbound: Arc<inbound::Inbound>,
    path: PathBuf,
    seen: Option<Vec<u8>>,
    ours: String,
    metrics: metrics::Metrics,
    interval: Duration,
) {
    let take = |text: &str| match reload_policy(&inbound, &path, text, &ours) {
        Ok(generation) => Ok(format!("generation {generation}")),
        Err(PolicyReloadError::Metrics(e)) => {
            Err(watched::Refused::Retry(format!("policy metrics: {e}")))
        }
        Err(e) => Err(watched::Refused::Content(e.to_string())),
    };
    let counted = |ok| metrics.policy_reload(ok);
    watched::watch(path.clone(), seen, interval, POLICY_FILE, take, counted).await;
}

/// The policy file as read when the proxy starts (before any wait for a
/// certificate, so an edit meanwhile is a change the watcher sees), parsed:
/// the inbound starts with this content, which the watcher then compares
/// with. `None` when it cannot be read or parsed now (the policy read with
/// the configuration serves, and the watcher takes the next valid content).
async fn policy_at_start(path: &Path) -> Option<(Vec<u8>, PolicyConfig)> {
    let bytes = match crate::files::read_async(path).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(policy_file = %path.display(), error = %e, "inbound policy file unreadable at start; the policy read with the configuration serves");
            return None;
        }
    };
    let parsed = std::str::from_utf8(&bytes)
        .map_err(|e| ConfigError::Parse(format!("{}: not UTF-8 text: {e}", path.display())))
        .and_then(|text| config::parse_policy(path, text));
    match parsed {
        Ok(policy) => Some((bytes, policy)),
        Err(e) => {
            tracing::warn!(policy_file = %path.display(), error = %e, "inbound policy file changed since the configuration was read and is refused; the policy read with the configuration serves");
            None
        }
    }
}

/// A started proxy: listeners bound, accepting.
pub struct Running {
    /// Bound inbound address.
    pub inbound_addr: Option<SocketAddr>,
    /// Bound outbound address.
    pub outbound_addr: Option<SocketAddr>,
    /// Bound admin address.
    pub admin_addr: Option<SocketAddr>,
    /// The identity store (hot reload swaps its content).
    pub identity: Arc<IdentityStore>,
    /// Admin state (readiness, metrics).
    pub admin: Arc<admin::AdminState>,
    stop_accepting: tokio::sync::watch::Sender<bool>,
    stop_admin: tokio::sync::watch::Sender<bool>,
    tracker: Arc<listener::Tracker>,
    grace: Duration,
    drain_delay: Duration,
    /// The reloader (`[identity.files]`) or renewer (`[identity.ca]`).
    identity_task: tokio::task::JoinHandle<()>,
    /// The probe of a PKCS#11 workload key (`[identity.pkcs11]`).
    key_probe_task: Option<tokio::task::AbortHandle>,
    /// The `[inbound] policy_file` watcher.
    policy_task: Option<tokio::task::AbortHandle>,
    /// The `[outbound] upstreams_file` watcher.
    upstreams_task: Option<tokio::task::AbortHandle>,
    /// Stops the memory budget's watch (`memory.rs`) when sent to or
    /// dropped.
    stop_memory: Option<std::sync::mpsc::Sender<()>>,
}

/// Loads the identity (`[identity.files]`: before any port is bound, so a
/// bad file fails fast) and starts its reloader or renewer, binds the admin
/// listener, then (`[identity.ca]`: once the first certificate is held)
/// binds the inbound and outbound and starts serving. Must run inside a
/// Tokio runtime.
///
/// `[identity.ca]` delays binding the data listeners rather than binding
/// them early and failing handshakes: until a certificate is held, callers
/// get "connection refused", which every client treats as "not up yet" and
/// retries safely, instead of TLS failures that look like a broken peer;
/// `/ready` answers 503 meanwhile, so Kubernetes routes nothing here.
pub async fn start(cfg: &Config) -> Result<Running, StartError> {
    let metrics = metrics::Metrics::new()?;
    let mut usages = Vec::new();
    if cfg.inbound.is_some() {
        usages.push(Usage::ServerAuth);
    }
    if cfg.outbound.is_some() {
        usages.push(Usage::ClientAuth);
    }
    metrics.key_location(cfg.identity.key_location());
    // The token is opened (and the key generated, for [identity.ca]) before
    // anything else, on a blocking thread: logging in to a token is a
    // blocking call, and may be slow.
    let token = match &cfg.identity.pkcs11 {
        Some(p) => {
            let p = p.clone();
            let generate = match &cfg.identity.source {
                IdentitySource::Ca(c) => Some(c.key_type),
                IdentitySource::Files(_) => None,
            };
            let t = tokio::task::spawn_blocking(move || TokenKey::open(&p, generate))
                .await
                .map_err(|e| store::IdentityError::Invalid {
                    key: "identity.pkcs11",
                    msg: format!("opening the token: {e}"),
                })??;
            t.observe(&metrics);
            Some(t)
        }
        None => None,
    };
    let (store, identity_task) = match &cfg.identity.source {
        IdentitySource::Files(files) => {
            let identity = Identity::load_with(&cfg.identity, token.clone(), &usages)?;
            check_trust_domains(cfg, &identity)?;
            identity.export(&metrics);
            tracing::info!(spiffe_id = %identity.id, serial = %identity.serial, not_after = identity.not_after, "identity loaded");
            let store = IdentityStore::new(identity);
            let task = reload::Reloader::new(
                reload::IdentityFiles {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                    bundle: cfg.identity.trust_bundle.clone(),
                },
                store.clone(),
                metrics.clone(),
                usages.clone(),
            )
            .with_token(token.clone())
            .spawn(cfg.identity.reload_interval);
            (store, task)
        }
        IdentitySource::Ca(ca) => {
            check_trust_domain_name(cfg, ca.spiffe_id.trust_domain_name())?;
            let store = IdentityStore::empty();
            let task = renew::start(
                &cfg.identity,
                ca,
                store.clone(),
                metrics.clone(),
                usages.clone(),
                token.clone(),
            )?;
            (store, task)
        }
    };
    // Stops the background task if start fails or is cancelled from here on.
    let cancel_identity = AbortOnDrop(Some(identity_task.abort_handle()));
    let key_probe_task = token.as_ref().map(|t| t.spawn_probe().abort_handle());
    let cancel_probe = AbortOnDrop(key_probe_task.clone());

    let bind = |key: &'static str, addr: SocketAddr| {
        listener::bind(addr).map_err(|source| StartError::Bind { key, addr, source })
    };
    let admin_l = cfg
        .admin
        .as_ref()
        .map(|c| bind("admin.listen", c.listen))
        .transpose()?;
    let (stop_admin, admin_rx) = tokio::sync::watch::channel(false);
    let admin_state = Arc::new(admin::AdminState {
        metrics: metrics.clone(),
        store: store.clone(),
        ready: false.into(),
        draining: false.into(),
        source: cfg.identity.source_json(),
    });
    let mut admin_addr = None;
    if let Some(l) = admin_l {
        admin_addr = l.local_addr().ok();
        tracing::info!(listen = %fmt_addr(admin_addr), "admin listening");
        tokio::spawn(admin::serve(l, admin_state.clone(), admin_rx));
    }
    // Should start fail or be cancelled from here on, dropping `stop_admin`
    // stops the admin listener.
    let policy_file = match cfg.inbound.as_ref().and_then(|c| c.policy_file.as_ref()) {
        Some(path) => policy_at_start(path).await,
        None => None,
    };
    if store.get().is_none() {
        tracing::info!("waiting for the first certificate before binding the inbound and outbound");
        store.wait_held().await;
    }

    // The policy file's content as read above, when it is valid for this
    // trust domain; else the policy read with the configuration.
    let ours = store.current().id.trust_domain_name().to_owned();
    let (policy_seen, fresh) = match policy_file {
        Some((bytes, policy)) => {
            let prefix = cfg
                .inbound
                .as_ref()
                .map(policy_key_prefix)
                .unwrap_or_default();
            match check_policy_trust_domain(&policy, &prefix, &ours) {
                Ok(()) => (Some(bytes), Some(policy)),
                Err(e) => {
                    tracing::warn!(error = %e, "inbound policy file changed since the configuration was read and is refused; the policy read with the configuration serves");
                    (None, None)
                }
            }
        }
        None => (None, None),
    };
    let limit = memory::resolve(cfg.runtime.memory_limit);
    let inbound = match cfg.inbound.as_ref() {
        Some(c) => {
            let mut c = c.clone();
            if let Some(policy) = fresh {
                c.policy = policy;
            }
            c.stepup.max_buffered = stepup_bodies_within(&c.stepup, limit);
            Some(inbound::Inbound::new(&c, store.clone(), &metrics)?)
        }
        None => None,
    };
    let mut upstreams_seen = None;
    let outbound = match cfg.outbound.as_ref() {
        Some(c) => {
            let mut c = c.clone();
            if let Some(path) = &c.upstreams_file {
                if let Some((bytes, rules)) = upstreams_at_start(path).await {
                    let prefix = format!("{}: upstreams", path.display());
                    match check_rules_trust_domain(&rules, &prefix, &ours) {
                        Ok(()) => {
                            c.upstreams = rules;
                            upstreams_seen = Some(bytes);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "upstreams file changed since the configuration was read and is refused; the rules read with the configuration serve");
                        }
                    }
                }
            }
            Some(outbound::Outbound::new(&c, store.clone(), &metrics)?)
        }
        None => None,
    };

    let in_l = cfg
        .inbound
        .as_ref()
        .map(|c| bind("inbound.listen", c.listen))
        .transpose()?;
    let out_l = cfg
        .outbound
        .as_ref()
        .map(|c| bind("outbound.listen", c.listen))
        .transpose()?;

    let (stop_accepting, stop_rx) = tokio::sync::watch::channel(false);
    let tracker = Arc::new(listener::Tracker::default());

    let mut running = Running {
        inbound_addr: None,
        outbound_addr: None,
        admin_addr,
        identity: store,
        admin: admin_state.clone(),
        stop_accepting,
        stop_admin,
        tracker: tracker.clone(),
        grace: cfg.runtime.shutdown_grace,
        drain_delay: cfg.runtime.drain_delay,
        identity_task,
        key_probe_task,
        policy_task: None,
        upstreams_task: None,
        stop_memory: None,
    };
    cancel_identity.disarm();
    cancel_probe.disarm();
    match (cfg.runtime.memory_limit, limit) {
        (_, Some(l)) => tracing::info!(
            limit_bytes = l,
            "memory limit: connections are shed above it (runtime.memory_limit)"
        ),
        (MemoryLimit::Auto, None) => tracing::info!(
            "no container memory limit found: no memory limit (runtime.memory_limit = \"auto\")"
        ),
        (_, None) => {}
    }
    memory::bound_receive_windows(limit);
    let (stop_memory, memory_rx) = std::sync::mpsc::channel();
    memory::spawn(
        limit,
        inbound
            .iter()
            .map(|ib| ib.callers() as Arc<dyn memory::Shed>)
            .chain(
                outbound
                    .iter()
                    .map(|ob| ob.conns() as Arc<dyn memory::Shed>),
            )
            .collect(),
        metrics.memory.clone(),
        memory_rx,
    )
    .map_err(StartError::Thread)?;
    running.stop_memory = Some(stop_memory);
    if let (Some(l), Some(ib), Some(c)) = (in_l, inbound, cfg.inbound.as_ref()) {
        running.inbound_addr = l.local_addr().ok();
        tracing::info!(listen = %fmt_addr(running.inbound_addr), app = %c.app, "inbound listening");
        if let Some(path) = &c.policy_file {
            let watcher = watch_policy(
                ib.clone(),
                path.clone(),
                policy_seen,
                ours.clone(),
                metrics.clone(),
                cfg.identity.reload_interval,
            );
            running.policy_task = Some(watched::spawn(watcher, path, POLICY_FILE));
        }
        let rx = stop_rx.clone();
        // Sockets: the authenticated connections plus the pending
        // handshakes (the inbound bounds each on its own).
        tokio::spawn(listener::accept_loop(
            l,
            c.limits.max_connections + c.limits.max_handshakes,
            tracker.clone(),
            stop_rx.clone(),
            move |tcp, remote, guards| ib.clone().connection(tcp, remote, guards, rx.clone()),
        ));
    }
    if let (Some(l), Some(ob), Some(c)) = (out_l, outbound, cfg.outbound.as_ref()) {
        running.outbound_addr = l.local_addr().ok();
        if !c.listen.ip().is_loopback() {
            // The outbound is plaintext and acts with this workload's
            // identity: anyone who can reach it can speak as us.
            tracing::warn!(listen = %c.listen, "outbound.listen is not a loopback address; any host that can reach it can use this workload's identity");
        }
        tracing::info!(listen = %fmt_addr(running.outbound_addr), upstreams = c.upstreams.len(), "outbound listening");
        if let Some(path) = &c.upstreams_file {
            let watcher = watch_upstreams(
                ob.clone(),
                path.clone(),
                upstreams_seen,
                ours.clone(),
                metrics.clone(),
                cfg.identity.reload_interval,
            );
            running.upstreams_task = Some(watched::spawn(watcher, path, UPSTREAMS_FILE));
        }
        let rx = stop_rx.clone();
        tokio::spawn(listener::accept_loop(
            l,
            c.limits.max_connections,
            tracker.clone(),
            stop_rx.clone(),
            move |tcp, remote, guards| ob.clone().connection(tcp, remote, guards, rx.clone()),
        ));
    }
    admin_state.ready.store(true, Ordering::Release);
    Ok(running)
}

/// Aborts a task when dropped, unless disarmed.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

impl Running {
    /// Drains: `/ready` turns 503; after `drain_delay` (everything still
    /// served) listeners close, connections finish their in-flight
    /// requests (up to the grace period), then the admin stops.
    pub async fn shutdown(self) {
        self.admin.draining.store(true, Ordering::Release);
        if !self.drain_delay.is_zero() {
            // Callers that have not yet seen the endpoint go keep arriving
            // for a while: served, not refused.
            tracing::info!(delay = ?self.drain_delay, "shutting down: /ready is 503, still serving until the delay is over");
            tokio::time::sleep(self.drain_delay).await;
        }
        let _ = self.stop_accepting.send(true);
        tracing::info!(grace = ?self.grace, "draining");
        if tokio::time::timeout(self.grace, self.tracker.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; closing remaining connections");
        }
        let _ = self.stop_admin.send(true);
        self.identity_task.abort();
        if let Some(t) = self.key_probe_task {
            t.abort();
        }
        if let Some(t) = self.policy_task {
            t.abort();
        }
        if let Some(t) = self.upstreams_task {
            t.abort();
        }
        drop(self.stop_memory);
    }
}

/// Signed step-up bodies held whole at once: `[inbound.stepup]
/// max_buffered`, but under a memory limit at most a quarter of it (and
/// never less than one `max_body`). The default 64 MiB is the whole of the
/// limit a 128Mi container gets: four callers' shares of it would have
/// taken the sidecar there at loopback speed, faster than shedding looks.
fn stepup_bodies_within(s: &config::InboundStepUpConfig, limit: Option<u64>) -> u64 {
    match limit {
        Some(l) if s.max_buffered > l / 4 => {
            let bounded = (l / 4).max(s.max_body);
            tracing::info!(
                max_buffered = s.max_buffered,
                bounded,
                "step-up bodies held at once bounded to a quarter of runtime.memory_limit"
            );
            bounded
        }
        _ => s.max_buffered,
    }
}

/// A bound address for a log line, `-` when there is none.
pub fn fmt_addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// On SIGHUP, every watched file (identity, policy, upstreams) is looked at
/// again at once. SIGHUP is what operators and supervisors send for
/// "reload", and its default action would end the sidecar on the spot,
/// without a drain. A file whose content is unchanged reloads nothing.
fn reload_on_hangup() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!(
                            "SIGHUP: looking at the identity, policy and upstream files again"
                        );
                        crate::identity::watch::look_again();
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; it would stop the sidecar without a drain")
            }
        }
    }
}

/// Builds the runtime `[runtime]` asks for (current-thread for one worker).
pub fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime, StartError> {
    let mut b = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(worker_threads);
        b
    };
    b.enable_all().build().map_err(StartError::Runtime)
}

/// Marks the process not dumpable (`keyproof_identity::private_memory`):
/// the workload key never lands in a core file or reaches a same-user
/// `ptrace`.
pub fn keep_memory_private() {
    if let Err(e) = keyproof_identity::private_memory::keep_private() {
        tracing::warn!(error = %e, "could not mark the process not dumpable: a core dump or a same-user ptrace would see the workload key");
    }
}

/// `keyproof-proxy run`: start, serve until SIGTERM/SIGINT, drain, return.
pub fn run(cfg: Config) -> Result<(), StartError> {
    keep_memory_private();
    let rt = runtime(cfg.runtime.worker_threads)?;
    rt.block_on(async {
        // One signal listener for the whole life: `[identity.ca]` may wait
        // for the CA in `start`, and a SIGTERM then must still stop us.
        let mut stop = std::pin::pin!(shutdown_signal());
        reload_on_hangup();
        let running = tokio::select! {
            r = start(&cfg) => r?,
            _ = &mut stop => {
                tracing::info!("stopped before the first certificate was obtained");
                return Ok(());
            }
        };
        stop.await;
        running.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Installs the tracing subscriber: `RUST_LOG` (default `info`), text or JSON.
pub fn init_logging(format: config::LogFormat) {
    init_logging_with_default(format, "info")
}

/// Like [`init_logging`] with another default level (quickstart keeps its
/// demo output readable with `warn`).
///
/// `RUST_LOG` takes a level and `target=level` directives, comma-separated
/// (`warn,keyproof_proxy::inbound=debug`). That is `Targets` syntax, not
/// `EnvFilter`'s: the span and regex filters of the latter bring a regex
/// engine into every sidecar's resident code for a feature a sidecar's
/// operators do not use. A value that does not parse is reported on stderr
/// and the default is used.
pub fn init_logging_with_default(format: config::LogFormat, default: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let parse = |s: &str| s.parse::<Targets>();
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => parse(&v).unwrap_or_else(|e| {
            eprintln!("keyproof-proxy: RUST_LOG={v:?} is not valid ({e}); using {default:?}");
            parse(default).unwrap_or_default()
        }),
        _ => parse(default).unwrap_or_default(),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        config::LogFormat::Text => tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .try_init(),
        config::LogFormat::Json => tracing_subscriber::registry()
            .with(fmt.json().with_filter(filter))
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{config, metric, workload, TD};

    const WEB_ONLY: &str =
        "[[routes]]\npath_prefix = \"/admin\"\nallow = [\"spiffe://unit.keyproof.test/ns/demo/sa/web\"]\n";
    const OPS_ONLY: &str =
        "[[routes]]\npath_prefix = \"/admin\"\nallow = [\"spiffe://unit.keyproof.test/ns/ops/*\"]\n";

    /// Waits (up to 10 s) until `series` reads `want`.
    async fn until(m: &metrics::Metrics, series: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while metric(m, series) != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {}, not {want}",
                metric(m, series)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An inbound whose policy is `policy.toml` in a new directory, first
    /// holding `text`, and its watcher (ticking every `tick`).
    fn watched(
        text: &str,
        tick: Duration,
    ) -> (
        tempfile::TempDir,
        metrics::Metrics,
        tokio::task::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, text).expect("write");
        let api = workload("/ns/demo/sa/api");
        let cfg = config("[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n");
        let mut cfg = cfg.inbound.expect("[inbound]");
        cfg.policy = config::load_policy_file(&file).expect("policy file");
        cfg.policy_file = Some(file.clone());
        let m = metrics::Metrics::new().expect("metrics");
        let ib = inbound::Inbound::new(&cfg, api.store(), &m).expect("inbound");
        let task = tokio::spawn(watch_policy(
            ib,
            file.clone(),
            std::fs::read(&file).ok(),
            TD.to_owned(),
            m.clone(),
            tick,
        ));
        (dir, m, task)
    }

    #[tokio::test]
    async fn a_changed_policy_file_is_taken_into_use_and_a_bad_one_refused() {
        let (dir, m, task) = watched(WEB_ONLY, Duration::from_millis(50));
        let file = dir.path().join("policy.toml");
        // Ticks with nothing changed reload nothing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            metric(&m, "keyproof_policy_reloads_total{result=\"ok\"}"),
            0.0
        );

        std::fs::write(&file, OPS_ONLY).expect("write");
        until(&m, "keyproof_policy_reloads_total{result=\"ok\"}", 1.0).await;
        assert_eq!(metric(&m, "keyproof_policy_generation"), 1.0);

        // Invalid, then a foreign trust domain: refused, counted, the
        // policy in use stays.
        std::fs::write(&file, "[[routes]]\npath_prefix = 3\n").expect("write");
        until(&m, "keyproof_policy_reloads_total{result=\"failed\"}", 1.0).await;
        std::fs::write(
            &file,
            "[[routes]]\npath_prefix = \"/a\"\nallow = [\"spiffe://elsewhere.test/ns/x/sa/y\"]\n",
        )
        .expect("write");
        until(&m, "keyproof_policy_reloads_total{result=\"failed\"}", 2.0).await;
        assert_eq!(metric(&m, "keyproof_policy_generation"), 1.0);

        // The file back to a valid one: in use again.
        std::fs::write(&file, WEB_ONLY).expect("write");
        until(&m, "keyproof_policy_reloads_total{result=\"ok\"}", 2.0).await;
        assert_eq!(metric(&m, "keyproof_policy_generation"), 2.0);
        task.abort();
    }

    #[tokio::test]
    async fn a_removed_policy_file_is_counted_once_and_the_policy_keeps_serving() {
        let (dir, m, task) = watched(WEB_ONLY, Duration::from_millis(20));
        let file = dir.path().join("policy.toml");
        std::fs::remove_file(&file).expect("remove");
        let failed = "keyproof_policy_reloads_total{result=\"failed\"}";
        until(&m, failed, 1.0).await;
        // Still gone many ticks later: reported once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(metric(&m, failed), 1.0);
        assert_eq!(metric(&m, "keyproof_policy_generation"), 0.0);
        // Back, changed: taken into use; gone again: reported again.
        std::fs::write(&file, OPS_ONLY).expect("write");
        until(&m, "keyproof_policy_reloads_total{result=\"ok\"}", 1.0).await;
        std::fs::remove_file(&file).expect("remove");
        until(&m, failed, 2.0).await;
        task.abort();
    }

    #[tokio::test]
    async fn a_policy_file_written_in_two_steps_is_taken_only_once_whole() {
        let deny = "[[deny]]\nspiffe_id = \"spiffe://unit.keyproof.test/ns/demo/sa/web\"\n";
        let (dir, m, task) = watched(&format!("{OPS_ONLY}{deny}"), Duration::from_millis(20));
        let file = dir.path().join("policy.toml");
        // Truncated, then a valid prefix, then whole again, each step shorter
        // than the settling time: no partial content is ever taken.
        for step in ["", OPS_ONLY] {
            std::fs::write(&file, step).expect("write");
            tokio::time::sleep(watched::SETTLE / 3).await;
        }
        std::fs::write(&file, format!("{OPS_ONLY}{deny}")).expect("write");
        tokio::time::sleep(watched::SETTLE * 4).await;
        assert_eq!(
            metric(&m, "keyproof_policy_reloads_total{result=\"ok\"}"),
            0.0
        );
        // An empty file that stays empty is refused, not taken as "no policy".
        std::fs::write(&file, "").expect("write");
        until(&m, "keyproof_policy_reloads_total{result=\"failed\"}", 1.0).await;
        assert_eq!(metric(&m, "keyproof_policy_generation"), 0.0);
        task.abort();
    }

    #[tokio::test]
    async fn an_edit_made_before_the_watcher_started_is_taken_into_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, WEB_ONLY).expect("write");
        let api = workload("/ns/demo/sa/api");
        let cfg = config("[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n");
        let mut cfg = cfg.inbound.expect("[inbound]");
        let at_start = std::fs::read(&file).expect("read");
        cfg.policy = config::load_policy_file(&file).expect("policy file");
        cfg.policy_file = Some(file.clone());
        let m = metrics::Metrics::new().expect("metrics");
        let ib = inbound::Inbound::new(&cfg, api.store(), &m).expect("inbound");
        // Edited while the proxy waited for its first certificate, say:
        // the watcher, seeded with the content at start, sees the change
        // at its first tick without another edit.
        std::fs::write(&file, OPS_ONLY).expect("write");
        let task = tokio::spawn(watch_policy(
            ib.clone(),
            file.clone(),
            Some(at_start),
            TD.to_owned(),
            m.clone(),
            Duration::from_millis(50),
        ));
        until(&m, "keyproof_policy_reloads_total{result=\"ok\"}", 1.0).await;
        // And only once: later ticks see the same content.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            metric(&m, "keyproof_policy_reloads_total{result=\"ok\"}"),
            1.0
        );
        // A file gone for a while changes no policy (and is reported, once);
        // back, unchanged, it reloads nothing either.
        std::fs::remove_file(&file).expect("remove");
        until(&m, "keyproof_policy_reloads_total{result=\"failed\"}", 1.0).await;
        std::fs::write(&file, OPS_ONLY).expect("write");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            metric(&m, "keyproof_policy_reloads_total{result=\"ok\"}"),
            1.0
        );
        assert_eq!(
            metric(&m, "keyproof_policy_reloads_total{result=\"failed\"}"),
            1.0
        );
        task.abort();
    }

    #[test]
    fn a_reloaded_policy_is_refused_for_a_foreign_pattern_naming_the_file_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("policy.toml");
        std::fs::write(
            &file,
            format!("{WEB_ONLY}[[routes]]\npath_prefix = \"/b\"\nallow = [\"spiffe://{TD}/x\", \"spiffe://other.test/y\"]\n"),
        )
        .expect("write");
        let policy = config::load_policy_file(&file).expect("parses");
        let prefix = format!("{}: ", file.display());
        let e = check_policy_trust_domain(&policy, &prefix, TD).unwrap_err();
        assert_eq!(
            e.to_string()
                .split(':')
                .take(2)
                .collect::<Vec<_>>()
                .join(":"),
            format!("{}: routes[1].allow[1]", file.display())
        );
    }

    #[test]
    fn step_up_bodies_held_at_once_fit_a_quarter_of_the_memory_limit() {
        const MI: u64 = 1 << 20;
        let s = config::InboundStepUpConfig::default();
        // No limit, or a limit four times the setting: as configured.
        assert_eq!(stepup_bodies_within(&s, None), 64 * MI);
        assert_eq!(stepup_bodies_within(&s, Some(256 * MI)), 64 * MI);
        // 128Mi's default limit: 16 MiB; never under one body.
        assert_eq!(stepup_bodies_within(&s, Some(64 * MI)), 16 * MI);
        assert_eq!(stepup_bodies_within(&s, Some(2 * MI)), MI);
    }

    #[test]
    fn a_deny_entry_of_another_trust_domain_is_refused_naming_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("policy.toml");
        std::fs::write(
            &file,
            format!("{WEB_ONLY}[[deny]]\nserial = \"0A\"\n[[deny]]\nspiffe_id = \"spiffe://{TD}/ns/x/sa/stolen\"\n[[deny]]\nspiffe_id = \"spiffe://other.test/ns/x/*\"\n"),
        )
        .expect("write");
        let policy = config::load_policy_file(&file).expect("parses");
        let prefix = format!("{}: ", file.display());
        let e = check_policy_trust_domain(&policy, &prefix, TD).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("{}: deny[2].spiffe_id", file.display())),
            "{text}"
        );
        assert!(text.contains("other.test"), "{text}");
        // Inline: the key is under `inbound.`, and startup refuses it.
        let cfg = Config::parse(
            "[identity]\ntrust_bundle = \"ca.crt\"\n[identity.files]\ncert = \"c\"\nkey = \"k\"\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:1\"\n[[inbound.deny]]\nspiffe_id = \"spiffe://other.test/ns/x/sa/y\"\n"
        )
        .expect("config");
        let e = check_trust_domain_name(&cfg, TD).unwrap_err().to_string();
        assert!(e.contains("inbound.deny[0].spiffe_id"), "{e}");
        // Our own trust domain's entries pass.
        let ours = config::load_policy_file(&{
            std::fs::write(
                &file,
                format!("{WEB_ONLY}[[deny]]\nspiffe_id = \"spiffe://{TD}/ns/x/*\"\n"),
            )
            .expect("write");
            file.clone()
        })
        .expect("parses");
        check_policy_trust_domain(&ours, &prefix, TD).expect("own trust domain");
    }

    #[tokio::test]
    async fn a_changed_upstreams_file_is_taken_into_use_and_a_bad_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("upstreams.toml");
        let one =
            format!("[[upstreams]]\ncidr = \"10.0.0.0/8\"\nidentity = \"spiffe://{TD}/ns/a/*\"\n");
        std::fs::write(&file, &one).unwrap();
        let cfg = config(&format!(
            "[outbound]\nlisten = \"127.0.0.1:0\"\nupstreams_file = {:?}\n",
            file.display().to_string()
        ));
        let m = metrics::Metrics::new().expect("metrics");
        let ob = outbound::Outbound::new(
            cfg.outbound.as_ref().unwrap(),
            workload("/ns/demo/sa/web").store(),
            &m,
        )
        .expect("outbound");
        let task = tokio::spawn(watch_upstreams(
            ob.clone(),
            file.clone(),
            Some(one.clone().into_bytes()),
            TD.to_owned(),
            m.clone(),
            Duration::from_millis(50),
        ));
        let rules = |ob: &outbound::Outbound| ob.rules().rules().rules().len();
        assert_eq!(rules(&ob), 1);
        let two =
            format!("{one}[[upstreams]]\nport = 5432\nidentity = \"spiffe://{TD}/ns/db/sa/pg\"\n");
        std::fs::write(&file, &two).unwrap();
        until(&m, "keyproof_upstream_reloads_total{result=\"ok\"}", 1.0).await;
        assert_eq!(rules(&ob), 2);
        // A foreign trust domain, then a syntax error: refused, the rules stay.
        std::fs::write(&file, two.replace(TD, "other.test")).unwrap();
        until(
            &m,
            "keyproof_upstream_reloads_total{result=\"failed\"}",
            1.0,
        )
        .await;
        std::fs::write(&file, "[[upstreams]]\nport = \"x\"\n").unwrap();
        until(
            &m,
            "keyproof_upstream_reloads_total{result=\"failed\"}",
            2.0,
        )
        .await;
        assert_eq!(rules(&ob), 2);
        assert_eq!(
            metric(&m, "keyproof_upstream_reloads_total{result=\"ok\"}"),
            1.0
        );
        task.abort();
    }
}
