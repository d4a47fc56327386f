//! The inbound side: terminate mutual TLS, authorize by route, set
//! `x-forwarded-client-cert`, and forward to the app over pooled plaintext
//! connections.
//!
//! Here: the listener (`Inbound::connection`: handshake, then HTTP) and the
//! per-request path (`admit`, `stepped_up`, `forward`). `conn.rs` holds what
//! is known of a caller's connection (its XFCC value, its channel binding),
//! `policy.rs` the route policy and deny list, `risk.rs` the risk rules and
//! the per-identity state they read, `challenge.rs` the step-up
//! verification, `counted.rs` the body count of requests an app may still
//! ask a proof of, `audit.rs` the audit records; `tunnel.rs` opaque TCP
//! (`CONNECT`), `upgrade.rs` a protocol switch such as WebSocket (extended
//! `CONNECT`, decided on as the `GET` it stands for); `callers.rs` the open
//! connections, which a deny-list change closes.
//!
//! Where a step-up is decided, per request:
//! * `admit`: the policy (swapped whole on a `policy_file` change) refuses
//!   a denied caller (403, a failure of that caller) or picks the route.
//!   A request on a route without step-up goes straight to the app; should
//!   the app ask for a proof (`x-keyproof-step-up: required`), the caller
//!   gets a 502, never the app's response.
//! * `stepped_up`, on an `always` route: the request must prove possession
//!   (reason `always`), and its response carries the next nonce.
//! * `stepped_up`, on a `risk` route: `RouteRisk::evaluate` refuses (a
//!   `deny` rule), demands a proof (a `challenge` rule; the reason is its
//!   name), or passes. A passing request with a presigned proof is verified
//!   (reason `app`); one without goes to the app unverified
//!   (`unverified`), its body counted, and if the app asks for a proof the
//!   caller is challenged (reason `app`) or, for a body over `max_body`,
//!   refused with 413.
//! * A verified request reaches the app with `x-keyproof-step-up: verified`
//!   and `x-keyproof-step-up-reason`; an app asking again gets the caller a
//!   502. A request the app answered on a `risk` route marks the caller as
//!   served there (`new_peer`).

pub mod app;
pub mod audit;
pub mod budget;
pub mod callers;
pub mod challenge;
pub mod conn;
pub mod counted;
pub mod in_flight;
pub mod policy;
pub mod risk;
pub mod tunnel;
pub mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::{header, HeaderMap, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::{InboundConfig, PolicyConfig, StepUpMode};
use crate::error::LogEvery;
use crate::http::body::{declared_length, text, ProxyBody, RequestBody, ResponseFuture};
use crate::http::h2_server::Unprocessed;
use crate::http::h2_stream::MeshBody;
use crate::http::limited::{self, STEPUP_DRAIN};
use crate::http::map_in_place::map_in_place;
use crate::http::owned::{self, strip_hop_by_hop, Underscores, XFCC};
use crate::http::path;
use crate::http::read_ahead::ReadAhead;
use crate::http::server::{self, Builders, Proto, StreamGuard};
use crate::identity::store::{self, IdentityStore, PeerIdentity};
use crate::inbound::app::{AppAsked, AppClient, AppClients};
use crate::inbound::audit::Audit;
use crate::inbound::challenge::{InboundStepUp, Reason, StepUpDeps};
use crate::inbound::conn::{InboundConn, PortRefusal};
use crate::inbound::counted::{counted, Counted};
use crate::inbound::policy::{Decision, Policy, Route, TcpDecision};
use crate::inbound::risk::{Failure, Fields, Now, RiskTable, Verdict};
use crate::inbound::tunnel::{Caller, Grant, TunnelLimits, TunnelPermit, Tunnels};
use crate::listener::{ConnGuards, HandshakeGate};
use crate::metrics::{DirectionMetrics, Metrics};

/// Throttles the log line for handshakes our own key could not sign.
static OWN_KEY_LOG: LogEvery = LogEvery::new(10);
/// Callers at their connection share opening more.
static OVER_SHARE_LOG: LogEvery = LogEvery::new(10);

fn ready(resp: Response<ProxyBody>) -> ResponseFuture<'static> {
    Box::pin(std::future::ready(resp))
}

/// Everything the inbound needs, shared by all its connections.
pub struct Inbound {
    store: Arc<IdentityStore>,
    acceptor: TlsAcceptor,
    /// The policy in use; a request keeps the route it matched even when a
    /// new policy replaces this one meanwhile.
    policy: ArcSwap<Policy>,
    /// The generation of `policy`, held while a new one is built so that
    /// two reloads never race.
    generation: Mutex<u64>,
    /// Per-identity risk state: outlives policy reloads.
    risk: Arc<RiskTable>,
    stepup: InboundStepUp,
    need_exporter: bool,
    /// `[inbound] app`: connections made to the inbound's own port.
    app: Arc<AppClient>,
    /// `127.0.0.1:<port>`: redirected connections, by original port.
    ports: AppClients,
    /// Each caller's shares of connections, by SPIFFE ID, while it has a
    /// connection (`share_of`).
    shares: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<PeerShare>>>,
    tunnels: Tunnels,
    /// Open caller connections, for a deny-list change to close.
    callers: Arc<callers::Callers>,
    metrics: DirectionMetrics,
    /// For the policies built on reload.
    all_metrics: Metrics,
    builders: Builders,
    /// Handshakes in progress (`max_handshakes`).
    gate: Arc<HandshakeGate>,
    /// Connections past their handshake (`max_connections`).
    established: Arc<tokio::sync::Semaphore>,
    /// `keyproof_authz_denied_total{route="own_port"}` and
    /// `{route="not_http_port"}`: HTTP on a redirected connection refused
    /// for its original port.
    port_denied: [prometheus::IntCounter; 2],
    cfg: InboundConfig,
}

/// A new policy that was not taken into use.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A `tcp` rule names a port that can never be a tunnel target here
    /// (one of `http_ports`, or a listen port of this proxy).
    #[error(transparent)]
    Ports(#[from] crate::config::ConfigError),
    /// Registering the policy's metrics failed (a bug).
    #[error("policy metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A failure to build the inbound.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// rustls refused the configuration.
    #[error("inbound TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// `inbound.app` is not a valid URI authority.
    #[error(transparent)]
    App(#[from] crate::inbound::app::BadAddress),
    /// Registering the policy's metrics failed (a bug).
    #[error("inbound policy metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The step-up verifier could not be built.
    #[error(transparent)]
    StepUp(#[from] crate::inbound::challenge::VerifierStartError),
    /// `[inbound.stepup] audit_log` names a file that cannot be opened.
    #[error(transparent)]
    Audit(#[from] crate::inbound::audit::AuditOpenError),
}

impl Inbound {
    /// Builds the inbound from its configuration.
    pub fn new(
        cfg: &InboundConfig,
        store: Arc<IdentityStore>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Arc<Inbound>, InboundError> {
        let tls = store::server_config(&store)?;
        let risk = RiskTable::new(cfg.stepup.max_tracked_identities, metrics)?;
        let policy = Policy::new(&cfg.policy, cfg.default_policy, &risk, 0, metrics)?;
        let audit = cfg
            .stepup
            .audit_log
            .as_ref()
            .map(|sink| Audit::open(sink, metrics))
            .transpose()?
            .map(Arc::new);
        let app = Arc::new(AppClient::new(&cfg.app, cfg)?);
        // A policy file may gain step-up routes later: every connection
        // then has its channel binding ready.
        let reloadable = cfg.policy_file.is_some();
        metrics.policy_generation.set(0);
        Ok(Arc::new(Inbound {
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            need_exporter: reloadable || policy.any_step_up(),
            policy: ArcSwap::from_pointee(policy),
            generation: Mutex::new(0),
            stepup: InboundStepUp::new(
                &cfg.stepup,
                StepUpDeps {
                    policy: &cfg.policy,
                    metrics,
                    body_timeout: cfg.limits.body_timeout,
                    risk: risk.clone(),
                    audit,
                    reloadable,
                },
            )?,
            risk,
            app,
            ports: AppClients::default(),
            shares: Default::default(),
            callers: Arc::default(),
            tunnels: Tunnels {
                connect_timeout: cfg.app_connect_timeout,
                idle: cfg.limits.tcp_idle_timeout,
                metrics: metrics.tcp.clone(),
                limits: TunnelLimits::new(cfg.max_tunnels, cfg.max_tunnels_per_peer),
            },
            port_denied: [
                metrics.authz_denied("own_port"),
                metrics.authz_denied("not_http_port"),
            ],
            metrics: metrics.inbound.clone(),
            all_metrics: metrics.clone(),
            builders: Builders::new(&cfg.limits, true),
            gate: HandshakeGate::new(
                cfg.limits.max_handshakes,
                metrics.inbound.handshakes_shed.clone(),
            ),
            established: Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_connections)),
            store,
            cfg: cfg.clone(),
        }))
    }

    /// Takes a new policy into use (a `policy_file` change): requests from
    /// now on are decided by it, requests in flight admitted without a
    /// proof at their next frame (`in_flight`), proven ones keep their
    /// route. The
    /// risk table's failures and lockouts carry over, and so does the
    /// per-route state of every unchanged route (see `RouteRisk`'s
    /// fingerprint). Returns the new policy's generation.
    pub fn replace_policy(&self, cfg: &PolicyConfig) -> Result<u64, PolicyError> {
        // The ports a tunnel may never reach do not change with the file.
        let prefix = match &self.cfg.policy_file {
            Some(f) => format!("{}: ", f.display()),
            None => String::new(),
        };
        crate::config::check_tcp_ports(
            &prefix,
            cfg,
            &self.cfg.http_ports,
            &self.cfg.app,
            &self.cfg.own_ports,
        )?;
        let mut generation = self
            .generation
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let next = *generation + 1;
        let policy = Policy::new(
            cfg,
            self.cfg.default_policy,
            &self.risk,
            next,
            &self.all_metrics,
        )?;
        self.stepup.policy_changed(cfg);
        let policy = Arc::new(policy);
        self.policy.store(policy.clone());
        *generation = next;
        // Tunnels and switched connections live on past the request that
        // opened them: those the new policy refuses (a caller just put on
        // the deny list, say) are cut now.
        let cut = self
            .tunnels
            .limits
            .revoke(|peer, serial, grant| policy.still_allows(grant, peer, serial));
        if cut > 0 {
            tracing::info!(
                tunnels = cut,
                "policy change: open tunnels it no longer allows are closed"
            );
        }
        // And what a deny-listed caller's connections still carry (a
        // streaming response) goes with them.
        let closed = self
            .callers
            .close(|peer, serial| policy.denies(peer, serial));
        if closed > 0 {
            self.all_metrics.policy_closed.inc_by(closed as u64);
            tracing::info!(
                connections = closed,
                "policy change: the connections of callers the deny list now names are closed"
            );
        }
        self.all_metrics
            .policy_generation
            .set(i64::try_from(next).unwrap_or(i64::MAX));
        Ok(next)
    }

    /// Handles one accepted TCP connection: handshake (bounded), then HTTP.
    pub async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        guards: ConnGuards,
        shutdown: watch::Receiver<bool>,
    ) {
        let _guards = guards;
        // Before any read: where iptables meant this connection to go.
        let redirected = crate::original_dst::redirected(&tcp);
        let open = self.metrics.connections_open.clone();
        open.inc();
        let _open = scopeguard(move || open.dec());
        // The handshake holds a place among the pending ones, not a
        // connection slot: see `HandshakeGate`.
        let slot = self.gate.admit();
        // Before the handshake, so that a bundle change during it is seen
        // as one after it (the caller is verified again).
        let trusted = self.store.trust_generation();
        let handshake = tokio::time::timeout(
            self.cfg.limits.handshake_timeout,
            self.acceptor.accept(ReadAhead::new(tcp)),
        );
        let tls = tokio::select! {
            r = handshake => r,
            _ = slot.evicted() => {
                tracing::debug!(peer = %remote, "inbound TLS handshake shed: max_handshakes in progress");
                return;
            }
        };
        drop(slot);
        let tls = match tls {
            Err(_) => {
                self.metrics.handshake("timeout");
                tracing::warn!(peer = %remote, reason = "timeout", "inbound TLS handshake refused: no handshake within {:?}", self.cfg.limits.handshake_timeout);
                return;
            }
            Ok(Err(e)) => {
                let f = store::classify(&e);
                self.metrics.handshake(f.reason);
                if f.reason != "key_unavailable" {
                    tracing::warn!(peer = %remote, reason = f.reason, peer_id = f.peer_id.as_deref(), error = %f.message, "inbound TLS handshake refused");
                } else if OWN_KEY_LOG.due() {
                    // One line per outage window, not one per handshake: the
                    // token is ours, `/ready` and the metrics say the rest.
                    tracing::warn!(reason = f.reason, error = %f.message, "inbound TLS handshakes refused: our key's token cannot sign (logged at most every 10 s)");
                }
                // A certificate of ours whose holder failed (no proof of
                // possession...) raises that identity's risk; one that did
                // not chain to the bundle names whoever its maker wished.
                if let Some(id) = f.verified_peer() {
                    self.risk
                        .record_failure(id, Failure::Handshake, Now::system());
                }
                return;
            }
            Ok(Ok(tls)) => tls,
        };
        let (_, session) = tls.get_ref();
        let chain: Arc<[rustls_pki_types::CertificateDer<'static>]> =
            session.peer_certificates().unwrap_or(&[]).into();
        let Some(peer) = PeerIdentity::from_certs(session.peer_certificates()) else {
            self.metrics.handshake("bad_identity");
            tracing::warn!(peer = %remote, reason = "bad_identity", "inbound peer certificate unreadable after verification");
            return;
        };
        self.metrics.handshake("ok");
        self.metrics
            .key_exchange(session.negotiated_key_exchange_group().map(|g| g.name()));
        // Only an authenticated connection takes one of `max_connections`;
        // at the limit it waits here for one. First one of its caller's
        // share of them, which it does not wait for: a waiting connection
        // still holds a place of the accept loop, and a caller at its share
        // opening more would take those from everyone else.
        let share = self.share_of(&peer.id);
        let app_share = share.app.clone();
        let mut stop = shutdown.clone();
        let Ok(_peer_slot) = share.connections.clone().try_acquire_owned() else {
            if OVER_SHARE_LOG.due() {
                tracing::warn!(peer = %remote, peer_id = %peer.id, "inbound connection closed: its caller holds max_connections_per_peer connections already (logged at most every 10 s)");
            }
            return;
        };
        let _slot = tokio::select! {
            p = self.established.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = server::stopped(&mut stop) => return,
        };
        let proto = match session.alpn_protocol() {
            Some(b"h2") => Proto::H2,
            Some(b"http/1.1") => Proto::Http1,
            _ => Proto::Detect,
        };
        let own = self.store.current();
        let activity: server::Activity = Arc::new(AtomicU64::new(0));
        let registered = self
            .callers
            .register(&peer.id, &peer.serial, activity.clone());
        let target = redirected.map(|dst| (dst.port(), self.redirected_to(dst.port())));
        let Some(conn) = InboundConn::new(
            session,
            peer,
            remote,
            &own.id,
            self.need_exporter,
            target,
            activity.clone(),
            app_share,
        ) else {
            return;
        };
        let drain = conn.drain.clone();
        // The handshake checked the caller's certificate once; the
        // connection may live on (HTTP/2, a tunnel) past its expiry, and
        // ends then, as a new handshake with it would fail.
        let expires_in = conn
            .peer
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        // A caller the deny list names has its requests refused (403,
        // counted) for as long as it takes to send one head, not for as
        // long as it cares to hold an idle connection.
        let denied_at_start = self.policy.load().denies(&conn.peer.id, &conn.peer.serial);
        let ends_in = if denied_at_start {
            expires_in.min(self.cfg.limits.header_read_timeout)
        } else {
            expires_in
        };
        let (store, peer_id) = (self.store.clone(), conn.peer.id.clone());
        let app = self.app_of(&conn).clone();
        let conn = Arc::new(conn);
        let ended = conn.clone();
        let this = self.clone();
        let streams = activity.clone();
        let svc = move |req: Request<RequestBody>| {
            let stream = StreamGuard::start(&streams);
            map_in_place(this.clone().request(req, conn.clone()), move |resp| {
                drop(stream);
                resp
            })
        };
        let idle = self.cfg.limits.idle_timeout;
        // The connection stops gracefully on shutdown, or when the app's
        // port refuses connections, or once a request
        // found its caller on the deny list (its 403 goes out first), or
        // the caller's certificate expired or is no longer under the trust
        // bundle's roots (then with a bounded grace); it is cut at once
        // when a policy change deny-lists its caller.
        let (stop_tx, stop) = watch::channel(false);
        let mut global = shutdown;
        let stopping = async move {
            let denied = tokio::select! {
                _ = server::stopped(&mut global) => false,
                () = app.gone.refused() => {
                    // What is in flight finishes; the caller's next
                    // requests go on a new connection (see `AppGone`).
                    tracing::info!(peer = %remote, app = app.addr(), "inbound connection ends gracefully: the app's port refuses connections");
                    false
                }
                () = drain.cancelled() => true,
                e = callers::distrusted(&store, trusted, &chain) => {
                    tracing::warn!(peer = %remote, peer_id = %peer_id, error = %e, "inbound connection cut: the trust bundle in use no longer accepts its caller's certificate");
                    true
                }
                () = tokio::time::sleep(ends_in) => {
                    if denied_at_start {
                        tracing::debug!(peer = %remote, "inbound connection ends: its caller is on the deny list");
                    } else {
                        tracing::info!(peer = %remote, "inbound connection ends: its caller's certificate expired");
                    }
                    true
                }
            };
            let _ = stop_tx.send(true);
            if denied {
                // A graceful end waits on the caller (HTTP/2 waits for a
                // PING's answer before its last GOAWAY): a denied caller,
                // or one no longer trusted, gets a bounded one, then the
                // connection is cut.
                tokio::time::sleep(DENIED_GRACE).await;
                return;
            }
            // The sender must outlive the connection: dropping it would
            // read as a stop too, which it already is.
            std::future::pending::<()>().await;
        };
        let served = server::serve(
            &self.builders,
            proto,
            tls,
            registered.holder(),
            activity,
            idle,
            svc,
            stop,
        );
        let result = tokio::select! {
            r = served => r,
            () = stopping => Ok(()),
            () = registered.closed() => {
                tracing::debug!(peer = %remote, "inbound connection closed: the deny list now names its caller, or the memory budget shed it");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %remote, error = %e, "inbound connection ended with an error");
        }
        self.stepup.connection_ended(ended);
    }

    /// Where the HTTP of a connection redirected from local `port` goes, or
    /// why it goes nowhere: never to one of the proxy's own listeners, and
    /// only to a port of `[inbound] http_ports` (a loopback-only service on
    /// any other port stays local; a `tcp` rule's port takes tunnels only).
    fn redirected_to(&self, port: u16) -> Result<Arc<AppClient>, PortRefusal> {
        if self.cfg.own_ports.contains(&port) {
            return Err(PortRefusal::Own(port));
        }
        if !self.cfg.http_ports.contains(&port) {
            return Err(PortRefusal::NotHttp(port));
        }
        Ok(self.port_app(port))
    }

    /// The app of a connection redirected to local `port`: `[inbound] app`
    /// itself when that is `127.0.0.1:<port>` (its pool is shared), else
    /// the port's own client.
    fn port_app(&self, port: u16) -> Arc<AppClient> {
        if let Some(a) = self.app.addr().strip_prefix("127.0.0.1:") {
            if a.parse::<u16>() == Ok(port) {
                return self.app.clone();
            }
        }
        self.ports.get(port, &self.cfg)
    }

    /// One request, start to response. Built without `async fn`s: the
    /// decisions are made before the future exists, and each layer's future
    /// holds only what it still needs (an `async fn` keeps its arguments for
    /// its whole life, so each layer would keep another copy of the
    /// request).
    fn request(
        self: Arc<Self>,
        req: Request<RequestBody>,
        conn: Arc<InboundConn>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let start = Instant::now();
        let head = req.method() == http::Method::HEAD;
        map_in_place(self.admit(req, conn), move |mut resp| {
            self.metrics
                .request(resp.status(), start.elapsed().as_secs_f64());
            if head {
                // The sidecar's own answers (challenges, refusals) are whole
                // bodies; on HEAD they must go without one (HTTP/2 calls a
                // DATA frame on a HEAD stream a protocol error). The app's
                // own response to HEAD has none already.
                if let ProxyBody::Full(b) = resp.body_mut() {
                    *b = None;
                }
            }
            resp
        })
    }

    /// Everything between a request's arrival and its forward: header
    /// rules, the canonical path, the route policy, the owned fields;
    /// then step-up ([`Inbound::stepped_up`]) or straight to the app.
    fn admit(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        conn: Arc<InboundConn>,
    ) -> Either<ResponseFuture<'static>, impl Future<Output = Response<ProxyBody>> + Send + 'static>
    {
        let mut req = req;
        let mut switching = None;
        if req.method() == http::Method::CONNECT {
            match upgrade::protocol_of(&req) {
                None => return Either::Left(self.tunnel(req, &conn)),
                Some(Ok(p)) => {
                    // RFC 8441: the GET that asked to switch, decided on
                    // as that GET. Its stream is kept aside for the tunnel
                    // it may become: a refusal must not wait for its end.
                    let (mut parts, body) = req.into_parts();
                    let RequestBody::H2(stream) = body else {
                        return Either::Left(ready(text(
                            StatusCode::BAD_REQUEST,
                            "bad request: extended CONNECT is HTTP/2's\n",
                        )));
                    };
                    if parts.headers.contains_key(header::CONTENT_LENGTH) {
                        // The stream would be held to that length, and the
                        // tunnel's first bytes would break it.
                        return Either::Left(ready(text(
                            StatusCode::BAD_REQUEST,
                            "bad request: a protocol switch has no content-length\n",
                        )));
                    }
                    parts.method = http::Method::GET;
                    req = Request::from_parts(parts, RequestBody::Empty);
                    switching = Some((p, stream));
                }
                Some(Err((status, why))) => {
                    tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, path = crate::http::shown_path(req.uri().path()), %status, "protocol switch refused: {}", why.trim_end());
                    return Either::Left(ready(text(status, why)));
                }
            }
        }
        if let Some(why) = conn.refusal {
            return Either::Left(self.port_refused(req, &conn, why));
        }
        let mode = self.cfg.headers_with_underscores;
        let found = match owned::check_request(req.headers(), req.uri(), mode).and_then(|f| {
            owned::check_authority(req.version(), req.uri(), req.headers())?;
            owned::check_h2_form(req.version(), req.method(), req.uri(), req.headers())?;
            Ok(f)
        }) {
            Ok(f) => f,
            Err(r) => {
                if r.underscore {
                    self.metrics.underscores(true, 1);
                }
                tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, method = %req.method(), reason = %r.reason, "request refused: header fields");
                return Either::Left(Box::pin(async move {
                    drain_refused(req.into_body()).await;
                    text(r.status, format!("bad request: {}\n", r.reason))
                }));
            }
        };
        if found.underscores > 0 {
            self.metrics
                .underscores(false, u64::from(found.underscores));
        }
        // Normalize first, then decide on, step up on and forward that one
        // path: an app resolving `/public/../admin` itself would otherwise
        // serve what the policy never saw.
        let path_mode = self.cfg.path_normalization;
        match path::normalize_uri(req.method(), req.uri(), path_mode) {
            Ok(None) => {}
            Ok(Some(uri)) => {
                let sent = std::mem::replace(req.uri_mut(), uri);
                req.extensions_mut().insert(challenge::SentTarget(sent));
            }
            Err(why) => {
                self.metrics.refused(why);
                tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, method = %req.method(), path = crate::http::shown_path(req.uri().path()), reason = why.reason(), "request refused: {why}");
                return Either::Left(Box::pin(async move {
                    drain_refused(req.into_body()).await;
                    text(
                        StatusCode::BAD_REQUEST,
                        format!("bad request path: {why}\n"),
                    )
                }));
            }
        }
        let matched = path::match_form(req.uri().path(), path_mode);
        // The guard of the policy in use is dropped once it has decided: the
        // route is kept by its own reference, the generation for the gate.
        let policy = self.policy.load();
        let generation = policy.generation;
        let decision = policy.decide(req.method(), &matched, &conn.peer.id, &conn.peer.serial);
        let route = match decision {
            Decision::Allow(r) => r.cloned(),
            Decision::Deny(msg) => {
                self.refused_by_policy(&conn);
                return Either::Left(policy_refused(req, &conn, msg));
            }
            Decision::Unrouted(msg) => return Either::Left(policy_refused(req, &conn, msg)),
        };
        drop(policy);
        // What a switch is allowed as, for a policy change to decide on.
        let switch_path = switching.as_ref().map(|_| matched.into_owned());
        let (mut parts, body) = req.into_parts();
        // Sidecar-owned fields from the network are never trusted: every
        // copy goes before the proxy sets its own. A step-up route's
        // verifier consumes (and removes) the step-up request fields.
        let step_up = route.as_ref().is_some_and(|r| r.step_up.any());
        owned::strip_request(&mut parts.headers, found, step_up);
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(XFCC.clone(), conn.xfcc.clone());
        owned::add_forwarded_for(&mut parts.headers, &conn.forwarded_for);
        owned::set_caller_statements(&mut parts.headers, found, &conn.forwarded_for);
        if let (Some((protocol, stream)), Some(path)) = (switching, switch_path) {
            return Either::Left(self.switch(parts, stream, &conn, route, protocol, path));
        }
        let body = match mode {
            Underscores::Allow => ProxyBody::from(body),
            mode => ProxyBody::Checked(body, mode),
        };
        if let Some(r) = route.as_ref().filter(|r| r.step_up.any()) {
            let (req, r, this) = (Request::from_parts(parts, body), r.clone(), self.clone());
            return Either::Left(Box::pin(
                async move { this.stepped_up(req, &conn, &r).await },
            ));
        }
        // Admitted without a proof: its frames, both ways, pass the gate
        // that decides on it again after a policy change.
        let gate = in_flight::RouteGate::new(
            self.clone(),
            conn.clone(),
            parts.method.clone(),
            parts.uri.clone(),
            route
                .as_ref()
                .and_then(|r| r.risk.as_ref().map(|k| k.fingerprint())),
            generation,
        );
        let req = Request::from_parts(parts, gate.guard(body));
        Either::Right(map_in_place(self.forward(req, &conn, false), move |resp| {
            resp.map(|b| gate.guard_response(b))
        }))
    }

    /// A CONNECT: over HTTP/2, an opaque TCP tunnel to the authority's
    /// port, if the deny list and that port's `tcp` rule allow the caller;
    /// over HTTP/1.1, 405 (tunnels travel as HTTP/2 streams only).
    #[cold]
    fn tunnel(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        conn: &InboundConn,
    ) -> ResponseFuture<'static> {
        if req.version() != http::Version::HTTP_2 {
            return ready(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is supported over HTTP/2 only\n",
            ));
        }
        let port = match tunnel::port_of(&req) {
            // On a redirected connection the tunnel goes where the
            // connection was delivered: the caller names the port it
            // dialled, which for a Service is the Service's `port`, not the
            // `targetPort` the node translated it to. Only a connection to
            // the inbound port itself names its target.
            Ok(p) => conn.original_port.unwrap_or(p),
            Err(e) => {
                // Counted, so that a scan shows in the metric.
                self.tunnels
                    .metrics
                    .connection(crate::metrics::Direction::Inbound, "denied");
                tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, authority = ?req.uri().authority().map(|a| a.as_str()), reason = %e, "tunnel refused: bad CONNECT authority");
                return ready(text(StatusCode::BAD_REQUEST, format!("{e}\n")));
            }
        };
        if self.cfg.own_ports.contains(&port) {
            self.tunnels
                .metrics
                .connection(crate::metrics::Direction::Inbound, "denied");
            tracing::warn!(peer = %conn.remote, peer_id = %conn.peer.id, port, "tunnel refused: the port is a listen port of this sidecar");
            return ready(text(
                StatusCode::FORBIDDEN,
                format!("port {port} is a port of this workload's sidecar; it is never a tunnel target\n"),
            ));
        }
        let policy = self.policy.load_full();
        let decision = policy.decide_tcp(port, &conn.peer.id, &conn.peer.serial);
        let refused = match decision {
            TcpDecision::Allow => None,
            TcpDecision::Deny(msg) => {
                self.refused_by_policy(conn);
                Some(msg)
            }
            TcpDecision::Unrouted(msg) => Some(msg),
        };
        if let Some(msg) = refused {
            self.tunnels
                .metrics
                .connection(crate::metrics::Direction::Inbound, "denied");
            tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, port, "tunnel refused by policy");
            return ready(text(StatusCode::FORBIDDEN, msg));
        }
        let permit = match self.hold(conn, Grant::Tcp(port), Some(&policy)) {
            Ok(p) => p,
            Err(resp) => return ready(*resp),
        };
        let caller = Caller {
            id: conn.peer.id.to_string(),
            remote: conn.remote,
        };
        let stream = StreamGuard::start(&conn.activity);
        let this = self.clone();
        Box::pin(async move { this.tunnels.open(req, port, caller, stream, permit).await })
    }

    /// A protocol switch the policy allowed (see `upgrade.rs`): on a
    /// step-up route, proven first (the extended `CONNECT` as sent, with no
    /// body: see [`Inbound::prove_switch`]); refused beyond the tunnel
    /// limits (503, counted `limited`); else sent to the app.
    #[cold]
    fn switch(
        self: &Arc<Self>,
        parts: http::request::Parts,
        stream: MeshBody,
        conn: &Arc<InboundConn>,
        route: Option<Arc<Route>>,
        protocol: &'static str,
        path: String,
    ) -> ResponseFuture<'static> {
        let this = self.clone();
        let conn = conn.clone();
        Box::pin(async move {
            let route = route.filter(|r| r.step_up.any());
            let (parts, proven) = match &route {
                Some(r) => match this.prove_switch(parts, &conn, r).await {
                    Ok(p) => p,
                    Err(resp) => return resp,
                },
                None => (parts, false),
            };
            // `admit` decided with the policy of its moment, which may
            // have been swapped since: decided again.
            let risk = route
                .as_ref()
                .and_then(|r| r.risk.as_ref().map(|k| k.fingerprint()));
            let grant = Grant::Switch { path, proven, risk };
            let permit = match this.hold(&conn, grant, None) {
                Ok(p) => p,
                Err(resp) => return *resp,
            };
            let sw = upgrade::Switch {
                app: this.app_of(&conn).addr().to_owned(),
                protocol,
                caller: Caller {
                    id: conn.peer.id.to_string(),
                    remote: conn.remote,
                },
                answer_timeout: this
                    .cfg
                    .app_connect_timeout
                    .max(this.cfg.limits.header_read_timeout),
                max_header_bytes: this.cfg.limits.max_header_bytes,
            };
            let held = tunnel::Held {
                stream: StreamGuard::start(&conn.activity),
                permit,
            };
            let mut resp = upgrade::switch(&this.tunnels, parts, stream, sw, held).await;
            if proven {
                // As for a proven request (`stepped_up`): no resend under
                // a spent nonce.
                resp.extensions_mut().remove::<Unprocessed>();
            }
            let asked = resp.extensions().get::<AppAsked>().is_some();
            match &route {
                Some(r) if asked && !proven => {
                    // A switch let through unproven on a `risk` route: the
                    // caller proves it, as a request's caller would.
                    this.stepup.app_asked(&conn, r, false)
                }
                _ if asked => {
                    tracing::warn!(peer = %conn.remote, peer_id = %conn.peer.id, proven, "the app asked for a step-up proof (x-keyproof-step-up: required) of a protocol switch where none can follow (a route without step-up, or a switch proven already); answered 502");
                    resp
                }
                Some(r) if resp.status().is_success() => {
                    if let Some(risk) = &r.risk {
                        risk.served(&conn.peer.id, Now::system());
                    }
                    resp
                }
                _ => resp,
            }
        })
    }

    /// A switch on a step-up route: its need for a proof decided as a
    /// request's ([`need`]), then the proof checked. What is signed is the
    /// request as it travels: `CONNECT` (RFC 9421 `@method`), its `:path`
    /// and `:authority`, and an empty body. `Ok`: the request to hand the
    /// app (its `x-keyproof-step-up` fields set when proven), and whether
    /// it was.
    async fn prove_switch(
        self: &Arc<Self>,
        mut parts: http::request::Parts,
        conn: &InboundConn,
        r: &Route,
    ) -> Result<(http::request::Parts, bool), Response<ProxyBody>> {
        parts.method = http::Method::CONNECT;
        let req = Request::from_parts(parts, ProxyBody::empty());
        let reason = match need(&req, conn, r) {
            Need::Proof(reason) => reason,
            Need::Denied(rule) => return Err(self.risk_denied(req, conn, r, rule).await),
            Need::Nothing => {
                let (mut parts, _) = req.into_parts();
                keyproof_stepup::strip_stepup_headers(&mut parts.headers);
                parts.method = http::Method::GET;
                return Ok((parts, false));
            }
        };
        let (req, _) = self.stepup.verify(req, conn, r, &reason).await?;
        let (mut parts, _) = req.into_parts();
        parts.method = http::Method::GET;
        Ok((parts, true))
    }

    /// After a 403 of the policy. A caller the deny list names has its
    /// connection ended once what is in flight is answered: it keeps no
    /// connection (and no `max_connections` place) for longer than a
    /// request. Any other caller's refusal is its own and raises its risk.
    /// A deny-list refusal does not: an identity on the list is refused
    /// whatever its risk, and a certificate on it by serial is by
    /// construction not its identity's current holder (a stolen key), whose
    /// refusals must not lock the renewed, legitimate workload out.
    #[cold]
    fn refused_by_policy(&self, conn: &InboundConn) {
        if self.policy.load().denies(&conn.peer.id, &conn.peer.serial) {
            conn.drain.cancel();
        } else {
            self.risk
                .record_failure(conn.peer.id.as_str(), Failure::Forbidden, Now::system());
        }
    }

    /// A place among the open tunnels for `grant`, or the refusal (503 at
    /// the limits, counted `limited`). A tunnel is decided on again when
    /// the policy changes (`replace_policy`), but only once it holds its
    /// place: one decided under a policy swapped out before then
    /// (`decided`, or `None` for "not known") is decided on again here,
    /// 403 if the policy now in use refuses it.
    fn hold(
        &self,
        conn: &InboundConn,
        grant: Grant,
        decided: Option<&Arc<Policy>>,
    ) -> Result<TunnelPermit, Box<Response<ProxyBody>>> {
        let (id, serial) = (&conn.peer.id, conn.peer.serial.as_str());
        let permit = match self.tunnels.limits.acquire(id, serial, grant.clone()) {
            Ok(p) => p,
            Err(limit) => {
                self.tunnels
                    .metrics
                    .connection(crate::metrics::Direction::Inbound, "limited");
                tracing::warn!(peer = %conn.remote, peer_id = %id, ?grant, "tunnel refused: {limit}");
                return Err(Box::new(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("tunnel refused: {limit}\n"),
                )));
            }
        };
        let now = self.policy.load();
        if decided.is_none_or(|d| !Arc::ptr_eq(d, &now)) && !now.still_allows(&grant, id, serial) {
            if matches!(grant, Grant::Tcp(_)) {
                // As the policy's refusal of a tunnel is (a switch's is a
                // request's).
                self.tunnels
                    .metrics
                    .connection(crate::metrics::Direction::Inbound, "denied");
            }
            tracing::info!(peer = %conn.remote, peer_id = %id, ?grant, "tunnel refused by the policy now in use");
            return Err(Box::new(text(
                StatusCode::FORBIDDEN,
                "forbidden: the policy in use refuses this caller here\n",
            )));
        }
        Ok(permit)
    }

    /// A request other than CONNECT on a redirected connection whose
    /// original port takes no HTTP: 403, counted, and never forwarded.
    #[cold]
    fn port_refused(
        &self,
        req: Request<RequestBody>,
        conn: &InboundConn,
        why: PortRefusal,
    ) -> ResponseFuture<'static> {
        let i = usize::from(matches!(why, PortRefusal::NotHttp(_)));
        self.port_denied[i].inc();
        tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, port = why.port(), method = %req.method(), "request refused: {why}");
        Box::pin(async move {
            drain_refused(req.into_body()).await;
            text(StatusCode::FORBIDDEN, format!("forbidden: {why}\n"))
        })
    }

    /// A request on a step-up route: its reason to prove possession decided
    /// (or not: see [`Inbound::unverified`]), verified (or challenged),
    /// forwarded, and its response given the next nonce when the reason
    /// asks for one.
    async fn stepped_up(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        conn: &InboundConn,
        r: &Route,
    ) -> Response<ProxyBody> {
        let reason = match need(&req, conn, r) {
            Need::Proof(reason) => reason,
            Need::Denied(rule) => return self.risk_denied(req, conn, r, rule).await,
            Need::Nothing if r.step_up == StepUpMode::Risk => {
                return self.unverified(req, conn, r).await
            }
            // `admit` sends only step-up routes here.
            Need::Nothing => return self.forward(req, conn, false).await,
        };
        let (req, verified) = match self.stepup.verify(req, conn, r, &reason).await {
            Ok(v) => v,
            Err(resp) => return resp,
        };
        let mut resp = self.forward(req, conn, true).await;
        // Its nonce is spent: the same proof sent again would read as a
        // replay, so the caller gets the app's absence as it is.
        resp.extensions_mut().remove::<Unprocessed>();
        if resp.extensions().get::<AppAsked>().is_some() {
            tracing::warn!(peer = %conn.remote, peer_id = %conn.peer.id, route = %r.path_prefix, reason = reason.as_str(), "the app asked for a step-up proof of a request that carried one (x-keyproof-step-up: verified); answered 502");
            return text(
                StatusCode::BAD_GATEWAY,
                "the app asked for a step-up proof of a request that was already verified\n",
            );
        }
        served(r, conn, &resp);
        // The next nonce saves a round trip where the next request will
        // need one: on `always` routes, and for an app that asked (it may
        // well ask again). A rule's challenge is an exception to pay for.
        if matches!(reason, Reason::Always | Reason::App) {
            self.stepup.on_response(&mut resp, conn, r, verified);
        }
        resp
    }

    /// A request on a `risk` route where no rule fired and no proof came:
    /// forwarded as it is, its body counted, and should the app ask for a
    /// proof, the caller challenged (413 for a body over `max_body`: its
    /// signed resend could not be checked).
    async fn unverified(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        conn: &InboundConn,
        r: &Route,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        // A `Stepup-Binding` without a signature is no proof, and the app
        // never sees step-up request fields.
        keyproof_stepup::strip_stepup_headers(&mut parts.headers);
        let declared = declared_length(&parts.headers);
        let has_content_type = parts.headers.contains_key(header::CONTENT_TYPE);
        let (body, tally) = counted(body);
        // Trailer fields the rules would have read in the header section
        // were never evaluated: they do not reach the app.
        let body = match r.risk.as_ref().and_then(|k| k.header_fields()) {
            Some(names) => body.without(names.clone()),
            None => body,
        };
        let resp = Self::forward_counted(
            Request::from_parts(parts, body),
            self.app_of(conn),
            &conn.app_share,
        )
        .await;
        if resp.extensions().get::<AppAsked>().is_none() {
            served(r, conn, &resp);
            return resp;
        }
        // The caller's sidecar resends the body it sent: it must have sent
        // all of it first, and the verifier must be able to read it.
        let max = self.stepup.max_body() as u64;
        // A declared length over the bound needs no wait for the rest of the
        // body (hyper closes an HTTP/1 connection whose body is left unread).
        if declared.is_some_and(|n| n > max) {
            return self.stepup.app_asked_too_large(conn, r);
        }
        let total = tally.total(max, STEPUP_DRAIN).await;
        if total > max {
            return self.stepup.app_asked_too_large(conn, r);
        }
        self.stepup.app_asked(conn, r, has_content_type)
    }

    /// A request refused by a `deny` risk rule (counted by the rule): 403,
    /// audited, and not a failure of the caller (a lockout lasts its
    /// window, however often the locked-out caller knocks).
    async fn risk_denied(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        conn: &InboundConn,
        r: &Route,
        rule: Arc<str>,
    ) -> Response<ProxyBody> {
        tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, route = %r.path_prefix, rule = %rule, "request refused by risk rule");
        self.stepup.audit(
            conn,
            &r.path_prefix,
            &Reason::Rule(rule.clone()),
            audit::DENIED,
            None,
        );
        drain_refused(req.into_body()).await;
        text(
            StatusCode::FORBIDDEN,
            format!(
                "forbidden: risk rule {rule} of route {} refuses {}\n",
                r.path_prefix, conn.peer.id
            ),
        )
    }

    /// asking for one is for the caller to decide on ([`AppAsked`]); else
    /// that is a 502.
    fn forward(
        &self,
        req: Request<ProxyBody>,
        conn: &InboundConn,
        may_step_up: bool,
    ) -> Either<ResponseFuture<'static>, impl Future<Output = Response<ProxyBody>> + Send + 'static>
    {
        let app = self.app_of(conn);
        let (mut parts, body) = req.into_parts();
        let (use_h2, h1_caller) = match app.to_app(&mut parts) {
            Ok(how) => how,
            Err(resp) => return Either::Left(ready(*resp)),
        };
        let app = app.clone();
        let req = Request::from_parts(parts, body);
        if use_h2 {
            let sent = app.h2.request(req, Some(&conn.app_share));
            return Either::Left(Box::pin(async move {
                let sent = sent.await;
                app.answer(sent.map(|r| r.map(ProxyBody::H2c)), h1_caller, may_step_up)
            }));
        }
        Either::Right(map_in_place(
            app.h1.request(req, Some(&conn.app_share)),
            move |sent| app.answer(sent.map(|r| r.map(ProxyBody::App)), h1_caller, may_step_up),
        ))
    }

    /// [`Inbound::forward`] for a request whose body is counted.
    async fn forward_counted(
        req: Request<Counted>,
        app: &AppClient,
        share: &Arc<tokio::sync::Semaphore>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let (use_h2, h1_caller) = match app.to_app(&mut parts) {
            Ok(how) => how,
            Err(resp) => return *resp,
        };
        let req = Request::from_parts(parts, body);
        if use_h2 {
            let sent = app.h2.request(req, Some(share)).await;
            return app.answer(sent.map(|r| r.map(ProxyBody::H2c)), h1_caller, true);
        }
        let sent = app.h1.request(req, Some(share)).await;
        app.answer(sent.map(|r| r.map(ProxyBody::App)), h1_caller, true)
    }

    /// The open connections of verified callers, which the memory budget
    /// sheds from (`memory.rs`).
    pub fn callers(&self) -> Arc<callers::Callers> {
        self.callers.clone()
    }

    /// `peer`'s shares, held by all its connections: one caller cannot
    /// hold more than its share however many connections it opens.
    /// Entries of callers with no connection left are swept as the map
    /// grows.
    fn share_of(&self, peer: &keyproof_identity::SpiffeId) -> Arc<PeerShare> {
        let mut map = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(peer.as_str()).and_then(std::sync::Weak::upgrade) {
            return s;
        }
        if map.len() >= 1024 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let share = Arc::new(PeerShare {
            app: Arc::new(tokio::sync::Semaphore::new(
                self.cfg.max_app_connections_per_peer,
            )),
            connections: Arc::new(tokio::sync::Semaphore::new(
                self.cfg.max_connections_per_peer,
            )),
        });
        map.insert(peer.as_str().to_owned(), Arc::downgrade(&share));
        share
    }

    /// The app a connection's requests go to: `[inbound] app`, or for a
    /// redirected connection `127.0.0.1:<original port>`.
    #[inline]
    fn app_of<'a>(&'a self, conn: &'a InboundConn) -> &'a Arc<AppClient> {
        conn.app.as_ref().unwrap_or(&self.app)
    }
}

/// What a request on route `r` must show before it goes on.
enum Need {
    /// A step-up proof, for this reason.
    Proof(Reason),
    /// Nothing (the route has no step-up, or no risk rule fired and no
    /// proof came).
    Nothing,
    /// Nothing will do: this `deny` risk rule fired.
    Denied(Arc<str>),
}

/// Decides [`Need`] for `req` on `r`: `always` routes need a proof, `risk`
/// routes when a rule fires (or the caller brings one anyway).
fn need<B>(req: &Request<B>, conn: &InboundConn, r: &Route) -> Need {
    match (r.step_up, &r.risk) {
        (StepUpMode::Risk, risk) => {
            let verdict = risk.as_ref().map_or(Verdict::Pass, |k| {
                k.evaluate(&conn.peer.id, Fields::of(req), Now::system())
            });
            match verdict {
                Verdict::Deny(rule) => Need::Denied(rule),
                Verdict::Challenge(rule) => Need::Proof(Reason::Rule(rule)),
                // A caller's sidecar signs up front with a nonce an earlier
                // answer gave it: such a proof is checked (a bad one is
                // refused and counted, as anywhere).
                Verdict::Pass if carries_proof(req.headers()) => Need::Proof(Reason::App),
                Verdict::Pass => Need::Nothing,
            }
        }
        (StepUpMode::Always, _) => Need::Proof(Reason::Always),
        (StepUpMode::Never, _) => Need::Nothing,
    }
}

/// Whether a request carries a step-up proof attempt (a `stepup`
/// signature, or its input: one without the other is a malformed attempt,
/// refused as such). A caller's own RFC 9421 signatures under other labels
/// are not one.
fn carries_proof(h: &HeaderMap) -> bool {
    (h.contains_key(keyproof_stepup::headers::SIGNATURE)
        || h.contains_key(keyproof_stepup::headers::SIGNATURE_INPUT))
        && keyproof_stepup::is_stepup_attempt(h)
}

/// Whether `resp` is the app's own answer rather than one the inbound made
/// because there was none (503, 502, 408): the proxy's own are whole
/// in-memory bodies, the app's stream from its connection.
fn from_app(resp: &Response<ProxyBody>) -> bool {
    matches!(
        resp.body(),
        ProxyBody::App(_) | ProxyBody::H2c(_) | ProxyBody::Stream(_)
    )
}

/// How long the connection of a caller the deny list names may take to
/// end gracefully after its first refusal: longer than a refused body's
/// drain (`limited::REFUSAL_DRAIN`), so that its 403 goes out first.
const DENIED_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads what is left of a small body before a refusal is answered
/// ([`limited::drain`] says why).
async fn drain_refused<B>(mut body: B)
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    let (limit, within) = limited::REFUSAL_DRAIN;
    limited::drain(&mut body, limit, within).await;
}

/// Marks the caller as served on a `risk` route (`new_peer`) once the app
/// itself answered.
fn served(r: &Route, conn: &InboundConn, resp: &Response<ProxyBody>) {
    if let (Some(risk), true) = (&r.risk, from_app(resp)) {
        risk.served(&conn.peer.id, Now::system());
    }
}

/// A request the policy refuses: 403 once its body is drained, logged.
fn policy_refused(
    req: Request<RequestBody>,
    conn: &InboundConn,
    msg: String,
) -> ResponseFuture<'static> {
    tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, method = %req.method(), path = crate::http::shown_path(req.uri().path()), "request refused by policy");
    Box::pin(async move {
        drain_refused(req.into_body()).await;
        text(StatusCode::FORBIDDEN, msg)
    })
}

/// What one caller SPIFFE ID may hold at once, across its connections.
struct PeerShare {
    /// App connections (`max_app_connections_per_peer`).
    app: Arc<tokio::sync::Semaphore>,
    /// Connections to this listener (`max_connections_per_peer`).
    connections: Arc<tokio::sync::Semaphore>,
}

/// Runs `f` on drop.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::{Request, StatusCode};
    use http_body_util::BodyExt;

    use super::Inbound;
    use crate::http::body::ProxyBody;
    use crate::inbound::conn::{InboundConn, PortRefusal};
    use crate::metrics::Metrics;
    use crate::testing::{config, hyper_request, one_request_app, workload, Workload};

    const API: &str = "/ns/demo/sa/api";
    const WEB: &str = "/ns/demo/sa/web";

    /// An inbound for `api` with `rest` after `listen` and `app`.
    fn inbound(api: &Workload, app: &str, rest: &str) -> (Arc<Inbound>, Metrics) {
        let cfg = config(&format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n{rest}"
        ));
        let metrics = Metrics::new().expect("metrics");
        let inbound = Inbound::new(
            cfg.inbound.as_ref().expect("[inbound]"),
            api.store(),
            &metrics,
        )
        .expect("inbound");
        (inbound, metrics)
    }

    fn conn(caller: &Workload, api: &Workload) -> Arc<InboundConn> {
        Arc::new(InboundConn::for_tests(caller.peer(), &api.id, None))
    }

    async fn body_text(resp: http::Response<ProxyBody>) -> String {
        let b = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    // Routes: `/admin` for ops only; everything else allowed in the trust
    // domain.
    const ADMIN_FOR_OPS: &str = "[[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"spiffe://unit.keyproof.test/ns/ops/*\"]\n";

    #[tokio::test]
    async fn the_policy_decides_on_the_normalized_path() {
        let (api, web) = (workload(API), workload(WEB));
        // Never dialled: every request here is refused before the app.
        let (inbound, metrics) = inbound(&api, "127.0.0.1:9", ADMIN_FOR_OPS);
        for target in [
            "/admin",
            "/admin?x=1",
            "/public/../admin/users",
            "/%61dmin/users",
            "/./admin",
            "//admin",
            "/admin//users",
        ] {
            let raw = format!("GET {target} HTTP/1.1\r\nhost: api\r\n\r\n");
            let (req, _client) = hyper_request(raw.as_bytes()).await;
            let resp = inbound.clone().request(req, conn(&web, &api)).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{target}");
            let body = body_text(resp).await;
            assert!(
                body.contains("route /admin does not allow"),
                "{target}: {body}"
            );
        }
        assert_eq!(
            crate::testing::metric(&metrics, "keyproof_authz_denied_total{route=\"/admin\"}"),
            7.0
        );
    }

    #[tokio::test]
    async fn the_sidecars_own_answer_to_head_has_no_body() {
        let (api, web) = (workload(API), workload(WEB));
        let (inbound, _m) = inbound(&api, "127.0.0.1:9", ADMIN_FOR_OPS);
        for (method, want) in [("HEAD", ""), ("GET", "route /admin does not allow")] {
            let raw = format!("{method} /admin HTTP/1.1\r\nhost: api\r\n\r\n");
            let (req, _client) = hyper_request(raw.as_bytes()).await;
            let resp = inbound.clone().request(req, conn(&web, &api)).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method}");
            let body = body_text(resp).await;
            assert!(
                body.contains(want) && (want.is_empty() == body.is_empty()),
                "{method}: {body:?}"
            );
        }
    }

    #[tokio::test]
    async fn with_keep_slashes_the_route_still_matches_the_merged_path() {
        let (api, web) = (workload(API), workload(WEB));
        let rest = format!("path_normalization = \"keep-slashes\"\n{ADMIN_FOR_OPS}");
        let (inbound, _m) = inbound(&api, "127.0.0.1:9", &rest);
        for target in ["//admin", "//admin//users", "/public/..//admin"] {
            let raw = format!("GET {target} HTTP/1.1\r\nhost: api\r\n\r\n");
            let (req, _client) = hyper_request(raw.as_bytes()).await;
            let resp = inbound.clone().request(req, conn(&web, &api)).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{target}");
        }
    }

    #[tokio::test]
    async fn the_app_gets_the_normalized_path_and_the_sidecars_xfcc_only() {
        let (api, web) = (workload(API), workload(WEB));
        let (app, head) = one_request_app().await;
        let (inbound, _m) = inbound(&api, &app.to_string(), ADMIN_FOR_OPS);
        let raw = b"GET /public/./a/../b?q=1 HTTP/1.1\r\nhost: api\r\nx-forwarded-client-cert: By=spiffe://evil;URI=spiffe://unit.keyproof.test/ns/ops/sa/root\r\n\r\n";
        let (req, _client) = hyper_request(raw).await;
        let c = conn(&web, &api);
        let resp = inbound.clone().request(req, c.clone()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp).await, "ok");
        let head = head.await.expect("the app saw the request");
        assert!(head.starts_with("GET /public/b?q=1 HTTP/1.1\r\n"), "{head}");
        let xfcc: Vec<&str> = head
            .lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("x-forwarded-client-cert")
                    .then(|| value.trim())
            })
            .collect();
        assert_eq!(xfcc, [c.xfcc.to_str().expect("ascii")], "{head}");
    }

    #[tokio::test]
    async fn a_refused_path_gets_400_before_the_policy() {
        let (api, web) = (workload(API), workload(WEB));
        let (inbound, metrics) = inbound(&api, "127.0.0.1:9", ADMIN_FOR_OPS);
        for target in ["/public/%2e%2e/%2e%2e/admin", "/admin%2fx", "/admin;x"] {
            let raw = format!("GET {target} HTTP/1.1\r\nhost: api\r\n\r\n");
            let (req, _client) = hyper_request(raw.as_bytes()).await;
            let resp = inbound.clone().request(req, conn(&web, &api)).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{target}");
        }
        assert_eq!(
            crate::testing::metric(&metrics, "keyproof_authz_denied_total{route=\"/admin\"}"),
            0.0
        );
    }

    #[tokio::test]
    async fn a_redirected_connection_goes_to_its_original_port_on_loopback() {
        let (api, web) = (workload(API), workload(WEB));
        let (app, head) = one_request_app().await;
        // `[inbound] app` is elsewhere: only the original port leads to
        // this app.
        let (inbound, _m) = inbound(&api, "127.0.0.1:9", ADMIN_FOR_OPS);
        let mut c = InboundConn::for_tests(web.peer(), &api.id, None);
        c.app = Some(inbound.port_app(app.port()));
        let c = Arc::new(c);
        let (req, _client) = hyper_request(b"GET /x HTTP/1.1\r\nhost: api:8080\r\n\r\n").await;
        let resp = inbound.clone().request(req, c.clone()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let head = head.await.expect("the app on the original port saw it");
        assert!(head.starts_with("GET /x HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains(c.xfcc.to_str().expect("ascii")),
            "no XFCC: {head}"
        );
        // The route policy applies as on the explicit path.
        let (req, _client) = hyper_request(b"GET /admin HTTP/1.1\r\nhost: api\r\n\r\n").await;
        let resp = inbound.clone().request(req, c).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }

    /// A listener that must never see a connection; whether one came
    /// within `wait`.
    async fn never_connected(wait: std::time::Duration) -> (u16, tokio::task::JoinHandle<bool>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("address").port();
        let h = tokio::spawn(async move { tokio::time::timeout(wait, l.accept()).await.is_ok() });
        (port, h)
    }

    /// A connection of `caller` as `Inbound::connection` makes it for one
    /// redirected from local `port`.
    fn redirected(
        inbound: &Inbound,
        caller: &Workload,
        api: &Workload,
        port: u16,
    ) -> Arc<InboundConn> {
        let mut c = InboundConn::for_tests(caller.peer(), &api.id, None);
        c.original_port = Some(port);
        match inbound.redirected_to(port) {
            Ok(app) => c.app = Some(app),
            Err(why) => c.refusal = Some(why),
        }
        Arc::new(c)
    }

    #[tokio::test]
    async fn redirected_http_reaches_only_the_http_ports() {
        let (api, web) = (workload(API), workload(WEB));
        let (app, head) = one_request_app().await;
        // A loopback-only service (pprof, an agent) on another port.
        let (private, seen) = never_connected(std::time::Duration::from_millis(500)).await;
        let (inbound, m) = inbound(
            &api,
            "127.0.0.1:9",
            &format!("http_ports = [{}]\n", app.port()),
        );
        let c = redirected(&inbound, &web, &api, private);
        for req in [
            &b"GET /debug/pprof HTTP/1.1\r\nhost: api\r\n\r\n"[..],
            &b"POST / HTTP/1.1\r\nhost: api\r\ncontent-length: 11\r\n\r\nflush_all\r\n"[..],
        ] {
            let (req, _client) = hyper_request(req).await;
            let resp = inbound.clone().request(req, c.clone()).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN);
            let body = body_text(resp).await;
            assert!(
                body.contains(&format!(
                    "port {private} is not an HTTP port of this workload"
                )),
                "{body}"
            );
        }
        assert_eq!(
            crate::testing::metric(&m, "keyproof_authz_denied_total{route=\"not_http_port\"}"),
            2.0
        );
        assert!(
            !seen.await.expect("listener task"),
            "the private port was connected"
        );
        // The HTTP port is served as before.
        let c = redirected(&inbound, &web, &api, app.port());
        let (req, _client) = hyper_request(b"GET /x HTTP/1.1\r\nhost: api\r\n\r\n").await;
        let resp = inbound.clone().request(req, c).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(head.await.expect("app").starts_with("GET /x "));
    }

    #[tokio::test]
    async fn by_default_the_app_port_alone_takes_redirected_http() {
        let api = workload(API);
        let (inbound, _m) = inbound(&api, "127.0.0.1:8080", "");
        assert!(Arc::ptr_eq(
            &inbound.redirected_to(8080).expect("the app port"),
            &inbound.app
        ));
        for port in [6060, 8200, 5432, 1] {
            assert_eq!(
                inbound.redirected_to(port).err(),
                Some(PortRefusal::NotHttp(port))
            );
        }
    }

    #[tokio::test]
    async fn a_tcp_rule_port_takes_no_plain_http_even_from_an_allowed_caller() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, seen) = never_connected(std::time::Duration::from_millis(500)).await;
        let (inbound, _m) = inbound(
            &api,
            "127.0.0.1:9",
            &format!(
                "[[inbound.tcp]]\nport = {port}\nallow = [\"spiffe://unit.keyproof.test{WEB}\"]\n"
            ),
        );
        let c = redirected(&inbound, &web, &api, port);
        let (req, _client) = hyper_request(
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 18\r\n\r\nset k 0 0 1\r\nx\r\n\r\n",
        )
        .await;
        let resp = inbound.clone().request(req, c).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert!(!seen.await.expect("listener task"), "the tcp port got HTTP");
    }

    #[tokio::test]
    async fn the_proxys_own_listeners_are_never_forwarded_to() {
        let (api, web) = (workload(API), workload(WEB));
        // Configured ports nothing listens on: the refusal comes first.
        let cfg = config(
            "[inbound]\nlisten = \"0.0.0.0:15443\"\napp = \"127.0.0.1:9\"\n\
             [outbound]\nlisten = \"127.0.0.1:15001\"\n[admin]\nlisten = \"127.0.0.1:15090\"\n",
        );
        let m = Metrics::new().expect("metrics");
        let inbound = Inbound::new(cfg.inbound.as_ref().expect("[inbound]"), api.store(), &m)
            .expect("inbound");
        for port in [15001, 15090, 15443] {
            assert_eq!(
                inbound.redirected_to(port).err(),
                Some(PortRefusal::Own(port))
            );
            let c = redirected(&inbound, &web, &api, port);
            let (req, _client) =
                hyper_request(b"GET /x HTTP/1.1\r\nhost: pay.internal\r\n\r\n").await;
            let resp = inbound.clone().request(req, c).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN);
            let body = body_text(resp).await;
            assert!(
                body.contains(&format!("port {port} is a port of this workload's sidecar")),
                "{body}"
            );
        }
        assert_eq!(
            crate::testing::metric(&m, "keyproof_authz_denied_total{route=\"own_port\"}"),
            3.0
        );
    }

    #[tokio::test]
    async fn per_port_app_clients_are_shared_and_bounded() {
        let api = workload(API);
        let (inbound, _m) = inbound(&api, "127.0.0.1:8080", "");
        // `[inbound] app`'s own port on loopback: its pool.
        assert!(Arc::ptr_eq(&inbound.port_app(8080), &inbound.app));
        let a = inbound.port_app(5000);
        assert!(Arc::ptr_eq(&a, &inbound.port_app(5000)));
        assert_eq!(a.addr(), "127.0.0.1:5000");
        drop(a);
        for port in 1..=(super::app::MAX_APP_PORTS as u16 + 10) {
            let _ = inbound.port_app(port);
        }
        assert!(inbound.ports.kept() <= super::app::MAX_APP_PORTS);
        // Held by connections at the bound: still served, not kept.
        let held: Vec<_> = (20000..20000 + super::app::MAX_APP_PORTS as u16)
            .map(|p| inbound.port_app(p))
            .collect();
        let extra = inbound.port_app(30000);
        assert_eq!(extra.addr(), "127.0.0.1:30000");
        assert_eq!(inbound.ports.kept(), super::app::MAX_APP_PORTS);
        drop(held);
    }

    // Sizes of the futures each request runs. Each is moved into place per
    // request (the inbound's into the task hyper spawns per HTTP/2 stream,
    // the outbound's into its HTTP/1.1 server's connection task), so bytes
    // here are copied on every request; the rare paths (refusals, step-up,
    // dialling, a full app pool) are boxed to keep them out. A rare path
    // left inline, or an `async fn` layer that keeps its arguments, makes
    // them grow, and these bounds fail. To see the sizes: the assertion
    // messages (or `cargo test -p keyproof-proxy --lib future_size --
    // --nocapture`), or the whole layout with `RUSTC_BOOTSTRAP=1 cargo rustc
    // --release -p keyproof-proxy --lib -- -Zprint-type-sizes`. The bounds
    // are the measured sizes rounded up to 64 bytes, plus some 10%.
    //
    // Measured: `Inbound::request` 680 bytes (it holds `H1Pool::request`'s),
    // `H1Pool::request` with a `ProxyBody` 640 bytes; the same in the test
    // profile and with the workspace crates at opt-level 3.
    const INBOUND_REQUEST_MAX: usize = 768;
    const APP_H1_REQUEST_MAX: usize = 704;

    #[tokio::test]
    async fn future_size_of_inbound_request_is_bounded() {
        let (api, web) = (workload(API), workload(WEB));
        let (inbound, _m) = inbound(&api, "127.0.0.1:9", "");
        let (req, _client) = hyper_request(b"GET /x HTTP/1.1\r\nhost: api\r\n\r\n").await;
        // Constructed, never polled: the app is never dialled.
        let fut = inbound.clone().request(req, conn(&web, &api));
        let size = std::mem::size_of_val(&fut);
        drop(fut);
        println!("Inbound::request future: {size} bytes");
        assert!(
            size <= INBOUND_REQUEST_MAX,
            "Inbound::request's future is {size} bytes, above its bound of {INBOUND_REQUEST_MAX}: is a rare path no longer boxed?"
        );
    }

    #[tokio::test]
    async fn future_size_of_the_app_pools_request_is_bounded() {
        let api = workload(API);
        let (inbound, _m) = inbound(&api, "127.0.0.1:9", "");
        let req = Request::get("/x")
            .body(ProxyBody::empty())
            .expect("request");
        let share = Arc::new(tokio::sync::Semaphore::new(4));
        let fut = inbound.app.h1.request(req, Some(&share));
        let size = std::mem::size_of_val(&fut);
        drop(fut);
        println!("H1Pool::request future (ProxyBody): {size} bytes");
        assert!(
            size <= APP_H1_REQUEST_MAX,
            "H1Pool::request's future is {size} bytes, above its bound of {APP_H1_REQUEST_MAX}: is a rare path no longer boxed?"
        );
    }

    /// Step-up through the whole request path: real requests as hyper
    /// reads them, a real app on loopback, the caller's proof made with its
    /// key as its sidecar would.
    mod step_up {
        use std::convert::Infallible;
        use std::net::SocketAddr;
        use std::sync::{Arc, Mutex};

        use bytes::Bytes;
        use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
        use http_body_util::{BodyExt, Full};
        use hyper::body::Incoming;
        use hyper_util::rt::TokioIo;
        use keyproof_stepup::{unix_now, Challenge, RequestView, Signer};

        use super::{body_text, inbound, API, WEB};
        use crate::config::{AuditSink, StepUpMode};
        use crate::http::body::ProxyBody;
        use crate::inbound::conn::InboundConn;
        use crate::inbound::Inbound;
        use crate::metrics::Metrics;
        use crate::testing::{config, hyper_request, metric, workload, Workload};

        const EXPORTER: [u8; 32] = [9; 32];

        /// What the app saw of one request.
        #[derive(Debug, Clone)]
        pub(super) struct Seen {
            pub(super) headers: HeaderMap,
            pub(super) body: Bytes,
        }

        impl Seen {
            fn verified(&self) -> Option<(&str, &str)> {
                let v = self.headers.get("x-keyproof-step-up")?.to_str().ok()?;
                let r = self
                    .headers
                    .get("x-keyproof-step-up-reason")
                    .map_or("", |r| r.to_str().unwrap_or("?"));
                Some((v, r))
            }
        }

        /// How the test app answers: status, extra fields, body.
        type Answer = fn(&Seen) -> (u16, &'static [(&'static str, &'static str)], &'static str);

        /// An HTTP/1.1 app on loopback answering every request with
        /// `answer`, recording what it saw (the whole body read first).
        pub(super) async fn app(answer: Answer) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind app");
            let addr = l.local_addr().expect("app address");
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = seen.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = l.accept().await {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let log = log.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.map(|b| b.to_bytes());
                                let seen = Seen {
                                    headers: parts.headers,
                                    body: body.unwrap_or_default(),
                                };
                                let (status, fields, text) = answer(&seen);
                                log.lock().expect("lock").push(seen);
                                let mut resp = Response::builder().status(status);
                                for (k, v) in fields {
                                    resp = resp.header(*k, *v);
                                }
                                Ok::<_, Infallible>(
                                    resp.body(Full::new(Bytes::from_static(text.as_bytes())))
                                        .expect("response"),
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            });
            (addr, seen)
        }

        /// Asks for the caller's proof unless the request carries one.
        fn asks_unless_verified(
            s: &Seen,
        ) -> (u16, &'static [(&'static str, &'static str)], &'static str) {
            match s.verified() {
                Some(("verified", _)) => (200, &[], "paid"),
                _ => (
                    402,
                    &[("x-keyproof-step-up", "required"), ("x-app", "secret")],
                    "app's own refusal",
                ),
            }
        }

        /// Always asks.
        fn always_asks(_: &Seen) -> (u16, &'static [(&'static str, &'static str)], &'static str) {
            (200, &[("x-keyproof-step-up", "required")], "app's body")
        }

        /// Never asks.
        fn never_asks(_: &Seen) -> (u16, &'static [(&'static str, &'static str)], &'static str) {
            (200, &[], "ok")
        }

        /// A routes section: `/pay` for web with `step_up` (`true` or
        /// `false`; a `risk` route is made from a `true` one by [`risk`]).
        fn pay_route(step_up: bool) -> String {
            format!(
                "[[inbound.routes]]\npath_prefix = \"/pay\"\nallow = [\"spiffe://unit.keyproof.test/ns/demo/sa/web\"]\nstep_up = {step_up}\n"
            )
        }

        /// The inbound with its routes as configured, the first made a
        /// `risk` route without rules when `risk`; audit into `audit`.
        fn inbound_with(
            api: &Workload,
            app: SocketAddr,
            rest: &str,
            risk: bool,
            audit: Option<&std::path::Path>,
        ) -> (Arc<Inbound>, Metrics) {
            if !risk && audit.is_none() {
                return inbound(api, &app.to_string(), rest);
            }
            let cfg = config(&format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n{rest}"
            ));
            let mut cfg = cfg.inbound.expect("[inbound]");
            if risk {
                cfg.policy.routes[0].step_up = StepUpMode::Risk;
            }
            cfg.stepup.audit_log = audit.map(|p| AuditSink::File(p.to_owned()));
            let metrics = Metrics::new().expect("metrics");
            let inbound = Inbound::new(&cfg, api.store(), &metrics).expect("inbound");
            (inbound, metrics)
        }

        pub(super) fn conn(caller: &Workload, api: &Workload) -> Arc<InboundConn> {
            Arc::new(InboundConn::for_tests(
                caller.peer(),
                &api.id,
                Some(EXPORTER),
            ))
        }

        /// A POST of `body` to `path` as HTTP/1.1 bytes, with `fields`.
        fn post(path: &str, fields: &HeaderMap, body: &[u8]) -> Vec<u8> {
            let mut raw = format!("POST {path} HTTP/1.1\r\ncontent-length: {}\r\n", body.len());
            for (k, v) in fields {
                raw.push_str(&format!("{k}: {}\r\n", v.to_str().expect("text")));
            }
            raw.push_str("\r\n");
            let mut raw = raw.into_bytes();
            raw.extend_from_slice(body);
            raw
        }

        fn plain_fields() -> HeaderMap {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("api"));
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h
        }

        /// The fields of a POST signed by `web` for `ch`, as its sidecar
        /// signs it.
        fn signed_fields(web: &Workload, ch: &Challenge, path: &str, body: &[u8]) -> HeaderMap {
            signed_with(web, ch, path, body, plain_fields())
        }

        /// [`signed_fields`] over `h` (with its own fields).
        fn signed_with(
            web: &Workload,
            ch: &Challenge,
            path: &str,
            body: &[u8],
            mut h: HeaderMap,
        ) -> HeaderMap {
            let uri: Uri = path.parse().expect("path");
            let view = RequestView::new(&Method::POST, &uri, &h);
            let signer = Signer::from_pkcs8_and_cert(&web.pkcs8, web.leaf()).expect("signer");
            let signed = signer
                .sign(ch, &view, body, &EXPORTER, unix_now())
                .expect("sign");
            signed.apply(&mut h);
            h
        }

        async fn send(
            inbound: &Arc<Inbound>,
            conn: &Arc<InboundConn>,
            raw: &[u8],
        ) -> Response<ProxyBody> {
            let (req, _client) = hyper_request(raw).await;
            inbound.clone().request(req, conn.clone()).await
        }

        fn challenge_of(resp: &Response<ProxyBody>) -> Challenge {
            Challenge::from_headers(resp.headers())
                .expect("readable")
                .expect("Accept-Signature")
        }

        fn challenges(m: &Metrics, reason: &str) -> f64 {
            metric(
                m,
                &format!("keyproof_stepup_challenges_total{{reason=\"{reason}\",route=\"/pay\"}}"),
            )
        }

        #[tokio::test]
        async fn an_app_asking_on_a_risk_route_gets_the_request_again_verified_with_reason_app() {
            let (api, web) = (workload(API), workload(WEB));
            let (addr, seen) = app(asks_unless_verified).await;
            let dir = tempfile::tempdir().expect("tempdir");
            let log = dir.path().join("audit.log");
            let (inbound, metrics) = inbound_with(&api, addr, &pay_route(true), true, Some(&log));
            let c = conn(&web, &api);
            let body = b"{\"amount\":12}";

            // Unverified: the app sees it, asks, and the caller is
            // challenged from the inbound's table instead of seeing the
            // app's answer.
            let resp = send(&inbound, &c, &post("/pay", &plain_fields(), body)).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(
                resp.headers()[header::WWW_AUTHENTICATE],
                "StepUp error=\"stepup_required\""
            );
            assert!(!resp.headers().contains_key("x-app"));
            assert!(!resp.headers().contains_key("x-keyproof-step-up"));
            let ch = challenge_of(&resp);
            assert!(body_text(resp).await.contains("(reason: app)"));
            assert_eq!(challenges(&metrics, "app"), 1.0);
            {
                let seen = seen.lock().expect("lock");
                assert_eq!(seen.len(), 1);
                assert_eq!(seen[0].verified(), None);
                assert_eq!(&seen[0].body[..], body);
            }

            // The signed resend reaches the app verified, reason `app`, and
            // its answer carries the next nonce.
            let resp = send(
                &inbound,
                &c,
                &post("/pay", &signed_fields(&web, &ch, "/pay", body), body),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::OK);
            let next = challenge_of(&resp);
            assert_ne!(next.nonce, ch.nonce);
            assert!(!resp.headers().contains_key(header::WWW_AUTHENTICATE));
            assert_eq!(body_text(resp).await, "paid");
            {
                let seen = seen.lock().expect("lock");
                assert_eq!(seen.len(), 2);
                assert_eq!(seen[1].verified(), Some(("verified", "app")));
                assert_eq!(&seen[1].body[..], body);
                for f in ["signature", "signature-input", "stepup-binding"] {
                    assert!(!seen[1].headers.contains_key(f), "{f} reached the app");
                }
            }

            // Steady state: signed up front with that nonce, no round trip.
            let resp = send(
                &inbound,
                &c,
                &post("/pay", &signed_fields(&web, &next, "/pay", body), body),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(resp.headers().contains_key("accept-signature"));
            assert_eq!(seen.lock().expect("lock").len(), 3);
            assert_eq!(challenges(&metrics, "app"), 1.0);
            assert_eq!(
                metric(
                    &metrics,
                    "keyproof_stepup_verifications_total{result=\"ok\"}"
                ),
                2.0
            );

            // A replay of a used proof is refused and counted, never passed.
            let resp = send(
                &inbound,
                &c,
                &post("/pay", &signed_fields(&web, &ch, "/pay", body), body),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(
                resp.headers()[header::WWW_AUTHENTICATE],
                "StepUp error=\"replay\""
            );
            assert_eq!(seen.lock().expect("lock").len(), 3);

            inbound.stepup.flush_audit();
            let audited: Vec<String> = std::fs::read_to_string(&log)
                .expect("audit log")
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
                    assert_eq!(v["route"], "/pay");
                    assert_eq!(v["peer"], web.id.as_str());
                    format!(
                        "{} {}",
                        v["reason"].as_str().unwrap(),
                        v["result"].as_str().unwrap()
                    )
                })
                .collect();
            assert_eq!(
                audited,
                ["app challenged", "app ok", "app ok", "app replay"]
            );
        }

        #[tokio::test]
        async fn a_risk_route_forwards_a_request_the_app_does_not_ask_about_unchanged() {
            let (api, web) = (workload(API), workload(WEB));
            let (addr, seen) = app(never_asks).await;
            let (inbound, metrics) = inbound_with(&api, addr, &pay_route(true), true, None);
            let c = conn(&web, &api);
            // Forged verdicts from the caller never reach the app.
            let mut fields = plain_fields();
            fields.insert("x-keyproof-step-up", HeaderValue::from_static("verified"));
            fields.insert(
                "x_keyproof_step_up_reason",
                HeaderValue::from_static("always"),
            );
            fields.insert("stepup-binding", HeaderValue::from_static(":AAAA:"));
            let resp = send(&inbound, &c, &post("/pay", &fields, b"{}")).await;
            assert_eq!(resp.status(), StatusCode::OK);
            // No nonce offered: nothing asked for one.
            assert!(!resp.headers().contains_key("accept-signature"));
            assert_eq!(body_text(resp).await, "ok");
            let seen = seen.lock().expect("lock");
            assert_eq!(seen[0].verified(), None);
            let names: Vec<&str> = seen[0].headers.keys().map(|k| k.as_str()).collect();
            assert!(
                names
                    .iter()
                    .all(|n| !n.contains("keyproof") && *n != "stepup-binding"),
                "{names:?}"
            );
            assert_eq!(challenges(&metrics, "app"), 0.0);
            assert_eq!(
                metric(
                    &metrics,
                    "keyproof_stepup_verifications_total{result=\"missing\"}"
                ),
                0.0
            );
        }

        #[tokio::test]
        async fn an_app_asking_about_a_body_over_max_body_gets_the_caller_a_413() {
            let (api, web) = (workload(API), workload(WEB));
            let (addr, seen) = app(asks_unless_verified).await;
            let rest = format!("[inbound.stepup]\nmax_body = 16\n{}", pay_route(true));
            let (inbound, metrics) = inbound_with(&api, addr, &rest, true, None);
            let c = conn(&web, &api);
            let big = b"{\"memo\":\"0123456789abcdef\"}";
            let resp = send(&inbound, &c, &post("/pay", &plain_fields(), big)).await;
            assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
            assert!(!resp.headers().contains_key(header::WWW_AUTHENTICATE));
            assert!(body_text(resp)
                .await
                .contains("larger than 16 bytes (inbound.stepup.max_body)"));
            assert_eq!(seen.lock().expect("lock").len(), 1, "the app saw it once");
            assert_eq!(challenges(&metrics, "app"), 0.0);
            // Chunked, no length declared: counted on its way.
            let mut raw =
                b"POST /pay HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for chunk in big.chunks(8) {
                raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                raw.extend_from_slice(chunk);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"0\r\n\r\n");
            let resp = send(&inbound, &c, &raw).await;
            assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
            // At the bound, the challenge.
            let resp = send(
                &inbound,
                &c,
                &post("/pay", &plain_fields(), b"{\"a\":\"0123456\"}"),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        }

        #[tokio::test]
        async fn an_app_asking_again_about_a_verified_request_gets_502() {
            let (api, web) = (workload(API), workload(WEB));
            let (addr, seen) = app(always_asks).await;
            let (inbound, metrics) = inbound_with(&api, addr, &pay_route(true), false, None);
            let c = conn(&web, &api);
            let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(challenges(&metrics, "always"), 1.0);
            assert!(seen.lock().expect("lock").is_empty(), "challenged first");
            let ch = challenge_of(&resp);
            let resp = send(
                &inbound,
                &c,
                &post("/pay", &signed_fields(&web, &ch, "/pay", b"{}"), b"{}"),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
            assert!(!resp.headers().contains_key("accept-signature"));
            assert!(!resp.headers().contains_key("x-keyproof-step-up"));
            let text = body_text(resp).await;
            assert!(text.contains("already verified"), "{text}");
            assert!(!text.contains("app's body"));
            assert_eq!(
                seen.lock().expect("lock")[0].verified(),
                Some(("verified", "always"))
            );
        }

        #[tokio::test]
        async fn an_always_route_keeps_its_next_nonce_and_the_reason_always() {
            let (api, web) = (workload(API), workload(WEB));
            let (addr, seen) = app(never_asks).await;
            let (inbound, _m) = inbound_with(&api, addr, &pay_route(true), false, None);
            let c = conn(&web, &api);
            let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
            let ch = challenge_of(&resp);
            let resp = send(
                &inbound,
                &c,
                &post("/pay", &signed_fields(&web, &ch, "/pay", b"{}"), b"{}"),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::OK);
            let next = challenge_of(&resp);
            let resp = send(
                &inbound,
                &c,
                &post("/pay", &signed_fields(&web, &next, "/pay", b"{}"), b"{}"),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::OK);
            let seen = seen.lock().expect("lock");
            assert_eq!(seen.len(), 2);
            assert!(seen
                .iter()
                .all(|s| s.verified() == Some(("verified", "always"))));
        }

        #[tokio::test]
        async fn an_app_asking_on_a_route_without_step_up_gets_502_never_its_response() {
            let (api, web) = (workload(API), workload(WEB));
            let (addr, seen) = app(always_asks).await;
            // `/pay` without step-up, and every other path by default.
            let (inbound, metrics) = inbound_with(&api, addr, &pay_route(false), false, None);
            let c = conn(&web, &api);
            for path in ["/pay", "/elsewhere"] {
                let resp = send(&inbound, &c, &post(path, &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{path}");
                assert!(!resp.headers().contains_key("x-keyproof-step-up"));
                assert!(!resp.headers().contains_key(header::WWW_AUTHENTICATE));
                let text = body_text(resp).await;
                assert!(text.contains("route without step-up"), "{path}: {text}");
            }
            assert_eq!(seen.lock().expect("lock").len(), 2);
            assert_eq!(
                metric(
                    &metrics,
                    "keyproof_stepup_verifications_total{result=\"missing\"}"
                ),
                0.0
            );
        }

        #[tokio::test]
        async fn a_new_policy_decides_the_next_request() {
            let (api, web) = (workload(API), workload(WEB));
            let (addr, seen) = app(never_asks).await;
            let (inbound, metrics) = inbound_with(&api, addr, "", false, None);
            let c = conn(&web, &api);
            let resp = send(&inbound, &c, &post("/admin", &plain_fields(), b"{}")).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let new = config(&format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{addr}\"\n{}",
                super::ADMIN_FOR_OPS
            ))
            .inbound
            .expect("[inbound]")
            .policy;
            assert_eq!(inbound.replace_policy(&new).expect("replace"), 1);
            let resp = send(&inbound, &c, &post("/admin", &plain_fields(), b"{}")).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN);
            assert_eq!(metric(&metrics, "keyproof_policy_generation"), 1.0);
            assert_eq!(seen.lock().expect("lock").len(), 1);
            // And a step-up route the startup policy did not have.
            let pay = config(&format!(
                "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{addr}\"\n{}",
                pay_route(true)
            ))
            .inbound
            .expect("[inbound]")
            .policy;
            assert_eq!(inbound.replace_policy(&pay).expect("replace"), 2);
            let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(challenges(&metrics, "always"), 1.0);
        }

        /// The risk rules and the deny list as the inbound applies them,
        /// configured as an operator writes them.
        mod risk_rules {
            use super::*;

            /// `/pay` for web and ops, `step_up = "risk"` with `rules`
            /// (names), the rules defined by `defs`; `extra` after.
            fn risk_config(rules: &[&str], defs: &str, extra: &str) -> String {
                let list: Vec<String> = rules.iter().map(|r| format!("\"{r}\"")).collect();
                format!(
                    "[[inbound.routes]]\npath_prefix = \"/pay\"\nallow = [\"spiffe://unit.keyproof.test/ns/demo/sa/web\", \"spiffe://unit.keyproof.test/ns/ops/*\"]\nstep_up = \"risk\"\nrisk = [{}]\n{extra}{defs}",
                    list.join(", ")
                )
            }

            const BIG: &str =
                "[[inbound.risk_rules]]\nname = \"big\"\nheader = \"x-amount\"\nabove = 100\n";
            const EVIL: &str = "[[inbound.risk_rules]]\nname = \"evil\"\nheader = \"x-evil\"\npresent = true\naction = \"deny\"\n";
            const AFTER: &str =
                "[[inbound.risk_rules]]\nname = \"after-refusal\"\nafter_failure = \"15m\"\n";
            const NEW: &str = "[[inbound.risk_rules]]\nname = \"new-caller\"\nnew_peer = \"24h\"\n";
            const LOCKOUT: &str = "[[inbound.risk_rules]]\nname = \"lockout\"\nfailures_above = \"2/15m\"\naction = \"deny\"\n";

            fn with_amount(amount: &'static str) -> HeaderMap {
                let mut h = plain_fields();
                h.insert("x-amount", HeaderValue::from_static(amount));
                h
            }

            /// A proof attempt that can only be refused (`malformed`: a
            /// signature input without a signature).
            fn malformed() -> HeaderMap {
                let mut h = plain_fields();
                h.insert(
                    "signature-input",
                    HeaderValue::from_static("stepup=(\"@method\");created=1"),
                );
                h
            }

            fn audited(inbound: &Inbound, log: &std::path::Path) -> Vec<String> {
                inbound.stepup.flush_audit();
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .lines()
                    .map(|l| {
                        let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
                        format!(
                            "{} {}",
                            v["reason"].as_str().unwrap(),
                            v["result"].as_str().unwrap()
                        )
                    })
                    .collect()
            }

            #[tokio::test]
            async fn a_firing_challenge_rule_is_the_reason_and_offers_no_next_nonce() {
                let (api, web) = (workload(API), workload(WEB));
                let (addr, seen) = app(never_asks).await;
                let (inbound, metrics) =
                    inbound_with(&api, addr, &risk_config(&["big"], BIG, ""), false, None);
                let c = conn(&web, &api);
                let resp = send(&inbound, &c, &post("/pay", &with_amount("5000"), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                assert_eq!(challenges(&metrics, "big"), 1.0);
                assert!(seen.lock().expect("lock").is_empty());
                let ch = challenge_of(&resp);
                let fields = signed_with(&web, &ch, "/pay", b"{}", with_amount("5000"));
                let resp = send(&inbound, &c, &post("/pay", &fields, b"{}")).await;
                assert_eq!(resp.status(), StatusCode::OK);
                assert!(!resp.headers().contains_key("accept-signature"));
                // Below the threshold: no proof asked.
                let resp = send(&inbound, &c, &post("/pay", &with_amount("5"), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::OK);
                let seen = seen.lock().expect("lock");
                assert_eq!(seen[0].verified(), Some(("verified", "big")));
                assert_eq!(seen[1].verified(), None);
            }

            #[tokio::test]
            async fn a_deny_rule_refuses_with_403_audited_and_counted_but_no_failure() {
                let (api, web) = (workload(API), workload(WEB));
                let (addr, seen) = app(never_asks).await;
                let dir = tempfile::tempdir().expect("tempdir");
                let log = dir.path().join("audit.log");
                let (inbound, metrics) = inbound_with(
                    &api,
                    addr,
                    &risk_config(&["evil", "after-refusal"], &format!("{EVIL}{AFTER}"), ""),
                    false,
                    Some(&log),
                );
                let c = conn(&web, &api);
                let mut evil = plain_fields();
                evil.insert("x-evil", HeaderValue::from_static("1"));
                let resp = send(&inbound, &c, &post("/pay", &evil, b"{}")).await;
                assert_eq!(resp.status(), StatusCode::FORBIDDEN);
                assert!(body_text(resp).await.contains("risk rule evil"));
                assert_eq!(
                    metric(
                        &metrics,
                        "keyproof_risk_denied_total{route=\"/pay\",rule=\"evil\"}"
                    ),
                    1.0
                );
                // Not a failure: `after-refusal` does not fire next.
                let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::OK);
                assert_eq!(seen.lock().expect("lock").len(), 1);
                assert_eq!(audited(&inbound, &log), ["evil denied"]);
            }

            #[tokio::test]
            async fn a_refused_proof_makes_the_callers_next_requests_challenged() {
                let (api, web) = (workload(API), workload(WEB));
                let (addr, _seen) = app(never_asks).await;
                let (inbound, metrics) = inbound_with(
                    &api,
                    addr,
                    &risk_config(&["after-refusal"], AFTER, ""),
                    false,
                    None,
                );
                let c = conn(&web, &api);
                let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::OK);
                let resp = send(&inbound, &c, &post("/pay", &malformed(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                assert_eq!(challenges(&metrics, "after-refusal"), 1.0);
                // Another caller is not concerned.
                let ops = workload("/ns/ops/sa/x");
                let resp = send(
                    &inbound,
                    &conn(&ops, &api),
                    &post("/pay", &plain_fields(), b"{}"),
                )
                .await;
                assert_eq!(resp.status(), StatusCode::OK);
            }

            #[tokio::test]
            async fn a_proof_a_well_behaved_callers_sidecar_can_make_is_refused_but_no_failure() {
                let (api, web) = (workload(API), workload(WEB));
                let (addr, _seen) = app(never_asks).await;
                let admin = "[[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"spiffe://unit.keyproof.test/ns/demo/sa/web\"]\nstep_up = true\n";
                let cfg = risk_config(&["after-refusal"], AFTER, admin);
                let (inbound, metrics) = inbound_with(&api, addr, &cfg, false, None);
                // The nonce a caller's sidecar kept from this inbound's
                // previous run (another nonce key): refused as bad_nonce.
                let (earlier, _m) = inbound_with(&api, addr, &cfg, false, None);
                let c = conn(&web, &api);
                let resp = send(&earlier, &c, &post("/admin", &plain_fields(), b"{}")).await;
                let kept = challenge_of(&resp);
                let fields = signed_fields(&web, &kept, "/admin", b"{}");
                let resp = send(&inbound, &c, &post("/admin", &fields, b"{}")).await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                assert_eq!(
                    metric(
                        &metrics,
                        "keyproof_stepup_verifications_total{result=\"bad_nonce\"}"
                    ),
                    1.0
                );
                // Not held against web: `after-refusal` stays quiet.
                let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::OK);
                // The control: a malformed proof is.
                let resp = send(&inbound, &c, &post("/admin", &malformed(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                assert_eq!(challenges(&metrics, "after-refusal"), 1.0);
            }

            #[tokio::test]
            async fn a_policy_403_is_a_failure_of_the_caller() {
                let (api, web) = (workload(API), workload(WEB));
                let (addr, _seen) = app(never_asks).await;
                let admin = "[[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"spiffe://unit.keyproof.test/ns/ops/*\"]\n";
                let (inbound, _m) = inbound_with(
                    &api,
                    addr,
                    &risk_config(&["after-refusal"], AFTER, admin),
                    false,
                    None,
                );
                let c = conn(&web, &api);
                let resp = send(&inbound, &c, &post("/admin", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::FORBIDDEN);
                let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
            }

            #[tokio::test]
            async fn a_new_caller_is_challenged_once_then_served_without() {
                let (api, web) = (workload(API), workload(WEB));
                let (addr, seen) = app(never_asks).await;
                let (inbound, metrics) = inbound_with(
                    &api,
                    addr,
                    &risk_config(
                        &["new-caller", "after-refusal"],
                        &format!("{NEW}{AFTER}"),
                        "",
                    ),
                    false,
                    None,
                );
                let c = conn(&web, &api);
                let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                assert_eq!(challenges(&metrics, "new-caller"), 1.0);
                // Its signed resend is still "new" (not served yet): the
                // reason stays the rule.
                let ch = challenge_of(&resp);
                let resp = send(
                    &inbound,
                    &c,
                    &post("/pay", &signed_fields(&web, &ch, "/pay", b"{}"), b"{}"),
                )
                .await;
                assert_eq!(resp.status(), StatusCode::OK);
                // Served now; and the first challenge (no proof at all) was
                // no failure, so `after-refusal` stays quiet.
                let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::OK);
                let seen = seen.lock().expect("lock");
                assert_eq!(seen[0].verified(), Some(("verified", "new-caller")));
                assert_eq!(seen[1].verified(), None);
            }

            #[tokio::test]
            async fn a_lockout_refuses_after_too_many_refused_proofs() {
                let (api, web) = (workload(API), workload(WEB));
                let (addr, seen) = app(never_asks).await;
                let (inbound, metrics) = inbound_with(
                    &api,
                    addr,
                    &risk_config(&["lockout"], LOCKOUT, ""),
                    false,
                    None,
                );
                let c = conn(&web, &api);
                for _ in 0..3 {
                    let resp = send(&inbound, &c, &post("/pay", &malformed(), b"{}")).await;
                    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
                }
                for _ in 0..2 {
                    let resp = send(&inbound, &c, &post("/pay", &plain_fields(), b"{}")).await;
                    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
                }
                assert!(seen.lock().expect("lock").is_empty());
                assert_eq!(
                    metric(
                        &metrics,
                        "keyproof_risk_denied_total{route=\"/pay\",rule=\"lockout\"}"
                    ),
                    2.0
                );
                assert_eq!(
                    metric(
                        &metrics,
                        "keyproof_stepup_verifications_total{result=\"malformed\"}"
                    ),
                    3.0
                );
            }

            #[tokio::test]
            async fn a_certificate_denied_by_serial_cannot_lock_its_identity_out() {
                // Round 11b F3: the thief of a key whose certificate the
                // deny list names by serial keeps being refused; those
                // refusals are not the renewed workload's.
                let (api, web) = (workload(API), workload(WEB));
                let (addr, _seen) = app(never_asks).await;
                let stolen = "0a0b0c";
                let (inbound, _metrics) = inbound_with(
                    &api,
                    addr,
                    &risk_config(
                        &["lockout"],
                        LOCKOUT,
                        &format!("[[inbound.deny]]\nserial = \"{stolen}\"\n"),
                    ),
                    false,
                    None,
                );
                let mut thief = InboundConn::for_tests(web.peer(), &api.id, None);
                thief.peer.serial = stolen.to_owned();
                let thief = Arc::new(thief);
                for _ in 0..5 {
                    let resp = send(&inbound, &thief, &post("/pay", &plain_fields(), b"{}")).await;
                    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
                }
                // The renewed certificate of the same identity.
                let renewed = conn(&web, &api);
                let resp = send(&inbound, &renewed, &post("/pay", &plain_fields(), b"{}")).await;
                assert_eq!(resp.status(), StatusCode::OK, "{}", body_text(resp).await);
            }

            #[tokio::test]
            async fn the_deny_list_refuses_by_certificate_serial_in_any_spelling_and_by_id() {
                let (api, web, ops) = (workload(API), workload(WEB), workload("/ns/ops/sa/x"));
                let (addr, seen) = app(never_asks).await;
                // The serial as an operator copies it from openssl: upper
                // case, colons, a leading zero byte.
                let serial = web.peer().serial;
                let padded = if serial.len() % 2 == 1 {
                    format!("0{serial}")
                } else {
                    serial.clone()
                };
                let spelled: Vec<String> = hex::decode(format!("00{padded}"))
                    .expect("hex")
                    .iter()
                    .map(|b| format!("{b:02X}"))
                    .collect();
                let deny = format!(
                    "[[inbound.deny]]\nserial = \"{}\"\n[[inbound.deny]]\nspiffe_id = \"spiffe://unit.keyproof.test/ns/stolen/*\"\n",
                    spelled.join(":")
                );
                let (inbound, metrics) = inbound_with(
                    &api,
                    addr,
                    &format!("{}{deny}", pay_route(false)),
                    false,
                    None,
                );
                for path in ["/pay", "/elsewhere"] {
                    let resp = send(
                        &inbound,
                        &conn(&web, &api),
                        &post(path, &plain_fields(), b"{}"),
                    )
                    .await;
                    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
                }
                assert_eq!(
                    metric(
                        &metrics,
                        &format!("keyproof_deny_list_refused_total{{entry=\"serial:{serial}\"}}")
                    ),
                    2.0
                );
                let stolen = workload("/ns/stolen/sa/x");
                let resp = send(
                    &inbound,
                    &conn(&stolen, &api),
                    &post("/elsewhere", &plain_fields(), b"{}"),
                )
                .await;
                assert_eq!(resp.status(), StatusCode::FORBIDDEN);
                // Anyone else: as the routes say.
                let resp = send(
                    &inbound,
                    &conn(&ops, &api),
                    &post("/elsewhere", &plain_fields(), b"{}"),
                )
                .await;
                assert_eq!(resp.status(), StatusCode::OK);
                assert_eq!(seen.lock().expect("lock").len(), 1);
            }
        }
    }
}
