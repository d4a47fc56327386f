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
//! ask a proof of, `audit.rs` the audit records.
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

pub mod audit;
pub mod challenge;
pub mod conn;
pub mod counted;
pub mod policy;
pub mod risk;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use http::uri::{Authority, Scheme};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::{AppProtocol, InboundConfig, PolicyConfig, StepUpMode};
use crate::http::app_client::{self, AppError};
use crate::http::body::{absolute_uri, path_of, text, ProxyBody, ResponseFuture};
use crate::http::limited::{self, STEPUP_DRAIN};
use crate::http::map_in_place::map_in_place;
use crate::http::owned::{self, strip_hop_by_hop, Underscores, XFCC};
use crate::http::path;
use crate::http::server::{self, Builders, Proto, StreamGuard};
use crate::identity::store::{self, IdentityStore, PeerIdentity};
use crate::inbound::audit::Audit;
use crate::inbound::challenge::{InboundStepUp, Reason, StepUpDeps};
use crate::inbound::conn::InboundConn;
use crate::inbound::counted::{counted, Counted};
use crate::inbound::policy::{Decision, Policy, Route};
use crate::inbound::risk::{Failure, Now, RiskTable, Verdict};
use crate::listener::{ConnGuards, HandshakeGate};
use crate::metrics::{DirectionMetrics, Metrics};

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
    app: AppClient,
    metrics: DirectionMetrics,
    /// For the policies built on reload.
    all_metrics: Metrics,
    builders: Builders,
    /// Handshakes in progress (`max_handshakes`).
    gate: Arc<HandshakeGate>,
    /// Connections past their handshake (`max_connections`).
    established: Arc<tokio::sync::Semaphore>,
    cfg: InboundConfig,
}

struct AppClient {
    h1: Arc<app_client::H1Pool>,
    h2: app_client::H2cConn<ProxyBody>,
    /// For requests whose body is counted on its way ([`counted`]); dialled
    /// only if such a request goes to an HTTP/2 app.
    h2_counted: app_client::H2cConn<Counted>,
    authority: Authority,
    protocol: AppProtocol,
}

/// A failure to build the inbound.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// rustls refused the configuration.
    #[error("inbound TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// `inbound.app` is not a valid URI authority.
    #[error("inbound.app: {0}")]
    App(String),
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

/// Marks the 502 that [`Inbound::answer`] makes of an app's response asking
/// for a step-up on a route that may have one: the step-up path decides
/// what the caller gets instead.
#[derive(Debug, Clone, Copy)]
struct AppAsked;

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
            .map(Audit::open)
            .transpose()?
            .map(Arc::new);
        let h1 = app_client::H1Pool::new(
            &cfg.app,
            cfg.app_connect_timeout,
            cfg.app_pool_idle_timeout,
            cfg.limits.max_header_bytes,
            app_client::H1Bounds {
                max_connections: cfg.max_app_connections,
                body_timeout: cfg.limits.body_timeout,
            },
        );
        let h2 = app_client::H2cConn::new(&cfg.app, cfg.app_connect_timeout);
        let h2_counted = app_client::H2cConn::new(&cfg.app, cfg.app_connect_timeout);
        let authority: Authority = cfg
            .app
            .parse()
            .map_err(|e| InboundError::App(format!("{e}")))?;
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
            app: AppClient {
                h1,
                h2,
                h2_counted,
                authority,
                protocol: cfg.app_protocol,
            },
            metrics: metrics.inbound.clone(),
            all_metrics: metrics.clone(),
            builders: Builders::new(&cfg.limits),
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
    /// now on are decided by it, requests in flight keep their route. The
    /// risk table's failures and lockouts carry over; per-route state starts
    /// again. Returns the new policy's generation.
    pub fn replace_policy(&self, cfg: &PolicyConfig) -> Result<u64, prometheus::Error> {
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
        self.policy.store(Arc::new(policy));
        *generation = next;
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
        let open = self.metrics.connections_open.clone();
        open.inc();
        let _open = scopeguard(move || open.dec());
        // The handshake holds a place among the pending ones, not a
        // connection slot: see `HandshakeGate`.
        let slot = self.gate.admit();
        let handshake =
            tokio::time::timeout(self.cfg.limits.handshake_timeout, self.acceptor.accept(tcp));
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
                tracing::warn!(peer = %remote, reason = f.reason, peer_id = f.peer_id.as_deref(), error = %f.message, "inbound TLS handshake refused");
                // A certificate naming an identity that failed (expired,
                // no proof of possession...) raises that identity's risk.
                if let Some(id) = f.peer_id.as_deref() {
                    self.risk
                        .record_failure(id, Failure::Handshake, Now::system());
                }
                return;
            }
            Ok(Ok(tls)) => tls,
        };
        let (_, session) = tls.get_ref();
        let Some(peer) = PeerIdentity::from_certs(session.peer_certificates()) else {
            self.metrics.handshake("bad_identity");
            tracing::warn!(peer = %remote, reason = "bad_identity", "inbound peer certificate unreadable after verification");
            return;
        };
        self.metrics.handshake("ok");
        self.metrics
            .key_exchange(session.negotiated_key_exchange_group().map(|g| g.name()));
        // Only an authenticated connection takes one of `max_connections`;
        // at the limit it waits here for one.
        let mut stop = shutdown.clone();
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
        let Some(conn) = InboundConn::new(session, peer, remote, &own.id, self.need_exporter)
        else {
            return;
        };
        let conn = Arc::new(conn);
        let this = self.clone();
        let activity: server::Activity = Arc::new(AtomicU64::new(0));
        let streams = activity.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let stream = StreamGuard::start(&streams);
            map_in_place(this.clone().request(req, conn.clone()), move |resp| {
                drop(stream);
                Ok::<_, Infallible>(resp)
            })
        });
        let idle = self.cfg.limits.idle_timeout;
        if let Err(e) =
            server::serve(&self.builders, proto, tls, activity, idle, svc, shutdown).await
        {
            tracing::debug!(peer = %remote, error = %e, "inbound connection ended with an error");
        }
    }

    /// One request, start to response. Built without `async fn`s: the
    /// decisions are made before the future exists, and each layer's future
    /// holds only what it still needs (an `async fn` keeps its arguments for
    /// its whole life, so each layer would keep another copy of the
    /// request).
    fn request(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<InboundConn>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let start = Instant::now();
        map_in_place(self.admit(req, conn), move |resp| {
            self.metrics
                .request(resp.status(), start.elapsed().as_secs_f64());
            resp
        })
    }

    /// Everything between a request's arrival and its forward: header
    /// rules, the canonical path, the route policy, the owned fields;
    /// then step-up ([`Inbound::stepped_up`]) or straight to the app.
    fn admit(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<InboundConn>,
    ) -> Either<ResponseFuture<'static>, impl Future<Output = Response<ProxyBody>> + Send + 'static>
    {
        if req.method() == http::Method::CONNECT {
            return Either::Left(ready(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported\n",
            )));
        }
        let mode = self.cfg.headers_with_underscores;
        let found = match owned::check_request(req.headers(), req.uri(), mode) {
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
        let mut req = req;
        let path_mode = self.cfg.path_normalization;
        match path::normalize_uri(req.method(), req.uri(), path_mode) {
            Ok(None) => {}
            Ok(Some(uri)) => *req.uri_mut() = uri,
            Err(why) => {
                self.metrics.refused(why);
                tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, method = %req.method(), path = req.uri().path(), reason = why.reason(), "request refused: {why}");
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
        // The guard of the policy in use lives for this statement only: the
        // route is kept by its own reference.
        let route = match self.policy.load().decide(
            req.method(),
            &matched,
            &conn.peer.id,
            &conn.peer.serial,
        ) {
            Decision::Allow(r) => r.cloned(),
            Decision::Deny(msg) => {
                tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, method = %req.method(), path = req.uri().path(), "request refused by policy");
                self.risk
                    .record_failure(conn.peer.id.as_str(), Failure::Forbidden, Now::system());
                return Either::Left(Box::pin(async move {
                    drain_refused(req.into_body()).await;
                    text(StatusCode::FORBIDDEN, msg)
                }));
            }
        };
        let (mut parts, body) = req.into_parts();
        // Sidecar-owned fields from the network are never trusted: every
        // copy goes before the proxy sets its own. A step-up route's
        // verifier consumes (and removes) the step-up request fields.
        let step_up = route.as_ref().is_some_and(|r| r.step_up.any());
        owned::strip_request(&mut parts.headers, found, step_up);
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(XFCC.clone(), conn.xfcc.clone());
        let body = match mode {
            Underscores::Allow => ProxyBody::Stream(body),
            mode => ProxyBody::Checked(body, mode),
        };
        let req = Request::from_parts(parts, body);
        if let Some(r) = route.filter(|r| r.step_up.any()) {
            let this = self.clone();
            return Either::Left(Box::pin(
                async move { this.stepped_up(req, &conn, &r).await },
            ));
        }
        Either::Right(self.forward(req, false))
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
        let reason = match (r.step_up, &r.risk) {
            (StepUpMode::Risk, risk) => {
                let verdict = risk.as_ref().map_or(Verdict::Pass, |k| {
                    k.evaluate(&conn.peer.id, req.headers(), Now::system())
                });
                match verdict {
                    Verdict::Deny(rule) => return self.risk_denied(req, conn, r, rule).await,
                    Verdict::Challenge(rule) => Reason::Rule(rule),
                    // A caller's sidecar signs up front with a nonce an
                    // earlier answer gave it: such a proof is checked (a bad
                    // one is refused and counted, as anywhere).
                    Verdict::Pass if carries_proof(req.headers()) => Reason::App,
                    Verdict::Pass => return self.unverified(req, conn, r).await,
                }
            }
            _ => Reason::Always,
        };
        let (req, verified) = match self.stepup.verify(req, conn, r, &reason).await {
            Ok(v) => v,
            Err(resp) => return resp,
        };
        let mut resp = self.forward(req, true).await;
        if resp.extensions().get::<AppAsked>().is_some() {
            tracing::warn!(peer = %conn.remote, peer_id = %conn.peer.id, route = %r.path_prefix, reason = reason.as_str(), "the app asked for a step-up proof of a request that carried one (x-keyproof-step-up: verified); answered 502");
            return text(
                StatusCode::BAD_GATEWAY,
                "the app asked for a step-up proof of a request that was already verified\n",
            );
        }
        if let (Some(risk), true) = (&r.risk, from_app(&resp)) {
            risk.served(&conn.peer.id, Now::system());
        }
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
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let has_content_type = parts.headers.contains_key(header::CONTENT_TYPE);
        let (body, tally) = counted(body);
        let resp = self.forward_counted(Request::from_parts(parts, body)).await;
        if resp.extensions().get::<AppAsked>().is_none() {
            if let (Some(risk), true) = (&r.risk, from_app(&resp)) {
                risk.served(&conn.peer.id, Now::system());
            }
            return resp;
        }
        // The caller's sidecar resends the body it sent: it must have sent
        // all of it first, and the verifier must be able to read it.
        let max = self.stepup.max_body() as u64;
        let total = tally.total(max, STEPUP_DRAIN).await;
        if declared.is_some_and(|n| n > max) || total > max {
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
        let (limit, within) = limited::REFUSAL_DRAIN;
        limited::drain(&mut req.into_body(), limit, within).await;
        text(
            StatusCode::FORBIDDEN,
            format!(
                "forbidden: risk rule {rule} of route {} refuses {}\n",
                r.path_prefix, conn.peer.id
            ),
        )
    }

    /// The app's form of a request: origin-form for HTTP/1.1 (with a Host),
    /// absolute for HTTP/2. Says whether it goes over HTTP/2 and whether
    /// the caller speaks HTTP/1.
    #[inline]
    fn to_app(
        &self,
        parts: &mut http::request::Parts,
    ) -> Result<(bool, bool), Box<Response<ProxyBody>>> {
        let use_h2 = match self.app.protocol {
            // gRPC needs HTTP/2 end to end (trailers, streams); anything else
            // reaches the app as HTTP/1.1, which every app speaks, so a
            // browser or curl negotiating h2 works against HTTP/1-only apps.
            AppProtocol::Auto => {
                parts.version == Version::HTTP_2
                    && parts
                        .headers
                        .get(header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
            }
            AppProtocol::Http1 => false,
            AppProtocol::H2 => true,
        };
        if !use_h2 && !parts.headers.contains_key(header::HOST) {
            // An HTTP/2 caller's :authority becomes the app's Host.
            if let Some(a) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        let path = path_of(&parts.uri);
        // HTTP/2 has no Connection field: a stalled body ends its stream.
        let h1_caller = parts.version != Version::HTTP_2;
        if use_h2 {
            // HTTP/2 keeps the caller's :authority.
            let authority = match parts.uri.authority() {
                Some(a) => a.clone(),
                None => self.app.authority.clone(),
            };
            parts.uri = absolute_uri(Scheme::HTTP, authority, path)?;
            parts.version = Version::HTTP_2;
        } else {
            // HTTP/1.1 goes out in origin-form; Host carries the name.
            parts.uri = Uri::from(path);
            parts.version = Version::HTTP_11;
        }
        Ok((use_h2, h1_caller))
    }

    /// To the app. `may_step_up`: the route may have a step-up, so an app
    /// asking for one is for the caller to decide on ([`AppAsked`]); else
    /// that is a 502.
    fn forward(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        may_step_up: bool,
    ) -> Either<ResponseFuture<'static>, impl Future<Output = Response<ProxyBody>> + Send + 'static>
    {
        let (mut parts, body) = req.into_parts();
        let (use_h2, h1_caller) = match self.to_app(&mut parts) {
            Ok(how) => how,
            Err(resp) => return Either::Left(ready(*resp)),
        };
        let this = self.clone();
        let req = Request::from_parts(parts, body);
        if use_h2 {
            return Either::Left(Box::pin(async move {
                let sent = this.app.h2.request(req).await;
                this.answer(
                    sent.map(|r| r.map(ProxyBody::Stream)),
                    h1_caller,
                    may_step_up,
                )
            }));
        }
        Either::Right(map_in_place(self.app.h1.request(req), move |sent| {
            this.answer(sent.map(|r| r.map(ProxyBody::App)), h1_caller, may_step_up)
        }))
    }

    /// [`Inbound::forward`] for a request whose body is counted.
    async fn forward_counted(self: &Arc<Self>, req: Request<Counted>) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let (use_h2, h1_caller) = match self.to_app(&mut parts) {
            Ok(how) => how,
            Err(resp) => return *resp,
        };
        let req = Request::from_parts(parts, body);
        if use_h2 {
            let sent = self.app.h2_counted.request(req).await;
            return self.answer(sent.map(|r| r.map(ProxyBody::Stream)), h1_caller, true);
        }
        let sent = self.app.h1.request(req).await;
        self.answer(sent.map(|r| r.map(ProxyBody::App)), h1_caller, true)
    }

    /// The app's response, or a 503/502 saying why there is none (408 for
    /// a request body that stalled, closing an HTTP/1 caller's connection:
    /// the rest of that body is still on the wire).
    fn answer(
        &self,
        sent: Result<Response<ProxyBody>, AppError>,
        h1_caller: bool,
        may_step_up: bool,
    ) -> Response<ProxyBody> {
        match sent {
            Ok(mut resp) => {
                // Only the sidecar speaks the StepUp scheme and sets its own
                // fields; the inbound's own challenges are added after this.
                if owned::strip_response(resp.headers_mut()) {
                    return self.app_asked(may_step_up);
                }
                resp
            }
            Err(AppError::Unavailable(cause)) => {
                tracing::warn!(app = %self.cfg.app, error = %cause, "app unavailable");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("app unavailable: {}: {cause}\n", self.cfg.app),
                )
            }
            Err(AppError::BodyTimeout(after)) => {
                tracing::info!(app = %self.cfg.app, "request body stalled for {after:?}; closing");
                let mut r = text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body made no progress for {after:?}\n"),
                );
                if h1_caller {
                    r.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                r
            }
            Err(AppError::Failed(cause)) => {
                tracing::warn!(app = %self.cfg.app, error = %cause, "app request failed");
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("app request failed: {}: {cause}\n", self.cfg.app),
                )
            }
        }
    }

    /// The app answered `x-keyproof-step-up: required`; its response is
    /// dropped, never passed on.
    #[cold]
    fn app_asked(&self, may_step_up: bool) -> Response<ProxyBody> {
        if !may_step_up {
            tracing::warn!(app = %self.cfg.app, "the app asked for a step-up proof (x-keyproof-step-up: required) of a request on a route without step-up; answered 502");
            return text(
                StatusCode::BAD_GATEWAY,
                "the app asked for a step-up proof of a request on a route without step-up\n",
            );
        }
        let mut resp = text(
            StatusCode::BAD_GATEWAY,
            "the app asked for a step-up proof\n",
        );
        resp.extensions_mut().insert(AppAsked);
        resp
    }
}

/// Whether a request carries a step-up proof attempt (a signature, or its
/// input: one without the other is a malformed attempt, refused as such).
fn carries_proof(h: &HeaderMap) -> bool {
    h.contains_key(keyproof_stepup::headers::SIGNATURE)
        || h.contains_key(keyproof_stepup::headers::SIGNATURE_INPUT)
}

/// Whether `resp` is the app's own answer rather than one the inbound made
/// because there was none (503, 502, 408): the proxy's own are whole
/// in-memory bodies, the app's stream from its connection.
fn from_app(resp: &Response<ProxyBody>) -> bool {
    matches!(resp.body(), ProxyBody::App(_) | ProxyBody::Stream(_))
}

/// Reads what is left of a small body before a refusal is answered
/// ([`limited::drain`] says why).
async fn drain_refused(mut body: Incoming) {
    let (limit, within) = limited::REFUSAL_DRAIN;
    limited::drain(&mut body, limit, within).await;
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
    use crate::inbound::conn::InboundConn;
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
        let fut = inbound.app.h1.request(req);
        let size = std::mem::size_of_val(&fut);
        drop(fut);
        println!("H1Pool::request future (ProxyBody): {size} bytes");
        assert!(
            size <= APP_H1_REQUEST_MAX,
            "H1Pool::request's future is {size} bytes, above its bound of {APP_H1_REQUEST_MAX}: is a rare path no longer boxed?"
        );
    }
}
