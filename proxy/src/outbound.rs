//! The outbound side: plaintext HTTP from the local app (origin-form,
//! absolute-form for `HTTP_PROXY`, and HTTP/2 prior knowledge for gRPC),
//! routed by host to an upstream sidecar over mutual TLS.
//!
//! When the upstream offers `h2` (keyproof's inbound does), every request,
//! HTTP/1.1 included, shares one multiplexed HTTP/2 connection per upstream:
//! many requests then travel in one TLS record and one syscall, which costs
//! markedly less CPU per request than a pool of HTTP/1.1 connections. An
//! upstream that only offers `http/1.1` gets a keep-alive pool instead (and
//! gRPC to it is refused, as gRPC needs HTTP/2).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keyproof_ca::svid;
use keyproof_stepup::is_stepup_challenge;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::body::{absolute_uri, strip_hop_by_hop, text, ProxyBody};
use crate::config::{OutboundConfig, UpstreamConfig};
use crate::identity::{self, IdentityStore};
use crate::inbound::root_cause;
use crate::mesh::MeshSender;
use crate::metrics::DirectionMetrics;
use crate::server::{self, ActivityIo, Builders, ConnGuards, Proto};
use crate::stepup::{tee, MeshConn, MeshConnInfo, OutboundStepUp, Replay, StepUpPaths, Template};

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// Why a mesh connection could not be made; mapped to 502/504 with the
/// reason in the body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("connect to {addr} failed: {msg}")]
    Connect {
        /// The upstream address.
        addr: String,
        /// The OS error.
        msg: String,
    },
    /// TCP connect took too long.
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout {
        /// The upstream address.
        addr: String,
        /// The bound.
        after: Duration,
    },
    /// The TLS handshake took too long.
    #[error("TLS handshake with {addr} timed out after {after:?}")]
    HandshakeTimeout {
        /// The upstream address.
        addr: String,
        /// The bound.
        after: Duration,
    },
    /// The server's identity is not the one configured.
    #[error("{0}")]
    IdentityMismatch(String),
    /// The handshake failed otherwise.
    #[error("TLS handshake with {addr} failed ({reason}): {msg}")]
    Handshake {
        /// The upstream address.
        addr: String,
        /// The metric label.
        reason: &'static str,
        /// Details.
        msg: String,
    },
}

impl ConnectError {
    fn status(&self) -> StatusCode {
        match self {
            ConnectError::ConnectTimeout { .. } | ConnectError::HandshakeTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

struct Dialer {
    address: String,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    metrics: DirectionMetrics,
}

impl Dialer {
    async fn dial(&self) -> Result<MeshStream, ConnectError> {
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.address))
                .await
            {
                Err(_) => {
                    return Err(ConnectError::ConnectTimeout {
                        addr: self.address.clone(),
                        after: self.connect_timeout,
                    })
                }
                Ok(Err(e)) => {
                    return Err(ConnectError::Connect {
                        addr: self.address.clone(),
                        msg: e.to_string(),
                    })
                }
                Ok(Ok(t)) => t,
            };
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(
            self.handshake_timeout,
            self.tls.connect(self.server_name.clone(), tcp),
        )
        .await
        {
            Err(_) => {
                self.metrics.handshake("timeout");
                tracing::warn!(upstream = %self.address, reason = "timeout", "outbound TLS handshake failed");
                return Err(ConnectError::HandshakeTimeout {
                    addr: self.address.clone(),
                    after: self.handshake_timeout,
                });
            }
            Ok(Err(e)) => {
                let f = identity::classify(&e);
                self.metrics.handshake(f.reason);
                tracing::warn!(upstream = %self.address, reason = f.reason, peer_id = f.peer_id.as_deref(), error = %f.message, "outbound TLS handshake failed");
                return Err(if f.reason == "identity_mismatch" {
                    ConnectError::IdentityMismatch(f.message)
                } else {
                    ConnectError::Handshake {
                        addr: self.address.clone(),
                        reason: f.reason,
                        msg: f.message,
                    }
                });
            }
            Ok(Ok(t)) => t,
        };
        self.metrics.handshake("ok");
        let (_, session) = tls.get_ref();
        let h2 = session.alpn_protocol() == Some(b"h2");
        let mut exporter = [0u8; 32];
        let _ =
            session.export_keying_material(&mut exporter, b"EXPORTER-Channel-Binding", Some(b""));
        let peer_id = session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| svid::check_leaf_der(leaf).ok());
        let Some(peer_id) = peer_id else {
            return Err(ConnectError::Handshake {
                addr: self.address.clone(),
                reason: "bad_identity",
                msg: "server certificate unreadable after verification".into(),
            });
        };
        let open = self.metrics.connections_open.clone();
        open.inc();
        Ok(MeshStream {
            tls,
            h2,
            info: Arc::new(MeshConnInfo {
                peer_id,
                exporter,
                conn_id: CONN_IDS.fetch_add(1, Ordering::Relaxed),
            }),
            open,
        })
    }
}

/// One mutual-TLS connection to an upstream sidecar.
pub struct MeshStream {
    tls: TlsStream<TcpStream>,
    h2: bool,
    info: Arc<MeshConnInfo>,
    open: prometheus::IntGauge,
}

impl Drop for MeshStream {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        let c = Connected::new().extra(self.info.clone());
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

/// The host part of a Host header value: `name`, `name:port`, `[v6]:port`.
fn host_of(v: &str) -> &str {
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    v.rsplit_once(':').map_or(v, |(h, _)| h)
}

/// The pool's connector: every URI it is asked for maps to this upstream.
#[derive(Clone)]
struct MeshConnector(Arc<Dialer>);

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<MeshStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let d = self.0.clone();
        Box::pin(async move { d.dial().await.map(TokioIo::new) })
    }
}

/// One multiplexed HTTP/2 connection, re-dialled when it closes.
struct H2Conn {
    dialer: Arc<Dialer>,
    current: ArcSwapOption<MeshConn>,
    dialing: tokio::sync::Mutex<()>,
    max_header_bytes: u32,
}

impl H2Conn {
    /// The live connection's sender, dialling a new connection if there is
    /// none. The dial (TCP, TLS and h2 handshakes) is boxed: inline, its
    /// state would sit in every request's future, which is moved into place
    /// per request.
    async fn sender(&self) -> Result<MeshConn, ForwardError> {
        if let Some(c) = self.current.load().as_ref() {
            if !c.0.is_closed() {
                return Ok((c.0.clone(), c.1.clone()));
            }
        }
        Box::pin(self.redial()).await
    }

    async fn redial(&self) -> Result<MeshConn, ForwardError> {
        // One dial at a time; whoever waited re-checks first.
        let _g = self.dialing.lock().await;
        if let Some(c) = self.current.load().as_ref() {
            if !c.0.is_closed() {
                return Ok((c.0.clone(), c.1.clone()));
            }
        }
        let stream = self.dialer.dial().await.map_err(ForwardError::Connect)?;
        if !stream.h2 {
            // The probe connection is dropped; the HTTP/1.1 pool takes over.
            return Err(ForwardError::NotH2);
        }
        let info = stream.info.clone();
        let send = MeshSender::handshake(stream, self.max_header_bytes)
            .await
            .map_err(|e| ForwardError::Upstream(e.to_string()))?;
        self.current
            .store(Some(Arc::new((send.clone(), info.clone()))));
        Ok((send, info))
    }
}

/// A failed forward.
#[derive(Debug)]
pub enum ForwardError {
    /// Could not get a mesh connection.
    Connect(ConnectError),
    /// The upstream negotiated `http/1.1`, not `h2`.
    NotH2,
    /// The upstream failed after connecting.
    Upstream(String),
}

struct Upstream {
    cfg: UpstreamConfig,
    pool_key: Authority,
    h1: Client<MeshConnector, ProxyBody>,
    h2: H2Conn,
    /// Set once the upstream turned out not to offer `h2`.
    h1_only: AtomicBool,
    /// Paths of this upstream that demanded step-up: buffered, signed.
    stepup_paths: StepUpPaths,
}

/// A failure to build the outbound.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// rustls refused the configuration.
    #[error("outbound TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Registering the step-up metrics failed (a bug).
    #[error("step-up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// An address is not a valid authority.
    #[error("{key}: {msg}")]
    Address {
        /// The configuration key.
        key: String,
        /// What is wrong.
        msg: String,
    },
}

/// Everything the outbound needs.
pub struct Outbound {
    upstreams: Vec<Upstream>,
    by_host: HashMap<String, usize>,
    fallback: Option<usize>,
    stepup: OutboundStepUp,
    metrics: DirectionMetrics,
    builders: Builders,
    cfg: OutboundConfig,
}

impl Outbound {
    /// Builds the outbound from its configuration.
    pub fn new(
        cfg: &OutboundConfig,
        store: Arc<IdentityStore>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Arc<Outbound>, OutboundError> {
        let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
        let mut by_host = HashMap::new();
        let mut fallback = None;
        for (i, u) in cfg.upstreams.iter().enumerate() {
            let host = u
                .address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                .unwrap_or(&u.address);
            // Certificates are checked by SPIFFE ID, not by name; the name
            // only feeds SNI, so an IP or odd host falls back to a fixed one.
            let server_name = ServerName::try_from(host.to_owned())
                .unwrap_or_else(|_| ServerName::try_from("keyproof.invalid").expect("static name"));
            let mk = |alpn: &[&[u8]]| -> Result<Arc<Dialer>, rustls::Error> {
                Ok(Arc::new(Dialer {
                    address: u.address.clone(),
                    tls: TlsConnector::from(Arc::new(identity::client_config(
                        &store,
                        u.identity.clone(),
                        alpn,
                    )?)),
                    server_name: server_name.clone(),
                    connect_timeout: cfg.connect_timeout,
                    handshake_timeout: cfg.limits.handshake_timeout,
                    metrics: metrics.outbound.clone(),
                }))
            };
            let h1 = Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(cfg.pool_idle_timeout)
                .set_host(false)
                .build(MeshConnector(mk(&[b"http/1.1"])?));
            let pool_key: Authority = u.address.parse().map_err(|e| OutboundError::Address {
                key: format!("outbound.upstreams[{i}].address"),
                msg: format!("{e}"),
            })?;
            upstreams.push(Upstream {
                cfg: u.clone(),
                pool_key,
                h1,
                h1_only: AtomicBool::new(false),
                h2: H2Conn {
                    dialer: mk(&[b"h2", b"http/1.1"])?,
                    current: ArcSwapOption::empty(),
                    dialing: tokio::sync::Mutex::new(()),
                    max_header_bytes: u32::try_from(cfg.limits.max_header_bytes)
                        .unwrap_or(u32::MAX),
                },
                stepup_paths: StepUpPaths::default(),
            });
            if u.host == "*" {
                fallback = Some(i);
            } else {
                by_host.insert(u.host.clone(), i);
            }
        }
        Ok(Arc::new(Outbound {
            upstreams,
            by_host,
            fallback,
            stepup: OutboundStepUp::new(cfg.stepup_max_body, store.clone(), metrics)?,
            metrics: metrics.outbound.clone(),
            builders: Builders::new(&cfg.limits),
            cfg: cfg.clone(),
        }))
    }

    /// Handles one accepted plaintext connection from the app.
    pub async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        guards: ConnGuards,
        shutdown: watch::Receiver<bool>,
    ) {
        let _guards = guards;
        let activity = Arc::new(AtomicU64::new(0));
        let io = ActivityIo::new(tcp, activity.clone());
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.request(req).await) }
        });
        let idle = self.cfg.limits.idle_timeout;
        if let Err(e) = server::serve(
            &self.builders,
            Proto::Detect,
            io,
            activity,
            idle,
            svc,
            shutdown,
        )
        .await
        {
            tracing::debug!(peer = %remote, error = %e, "outbound connection ended with an error");
        }
    }

    async fn request(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let start = Instant::now();
        let resp = self.forward(req).await;
        self.metrics
            .request(resp.status(), start.elapsed().as_secs_f64());
        resp
    }

    fn upstream_for(&self, host: &str) -> Option<&Upstream> {
        let i = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&host.to_ascii_lowercase())
        } else {
            self.by_host.get(host)
        };
        i.or(self.fallback.as_ref()).map(|i| &self.upstreams[*i])
    }

    async fn forward(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        if req.method() == http::Method::CONNECT {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT tunnels are not supported: send plain http:// requests and the sidecar adds mutual TLS\n",
            );
        }
        let (mut parts, body) = req.into_parts();
        // Absolute-form and HTTP/2 carry the authority in the URI; origin-form
        // in Host. Borrowed, not parsed into a new value: this runs per request.
        let host = match parts.uri.authority() {
            Some(a) => Some(a.host()),
            None => parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(host_of),
        };
        let Some(host) = host.filter(|h| !h.is_empty()) else {
            return text(StatusCode::BAD_REQUEST, "request has no host\n");
        };
        let Some(up) = self.upstream_for(host) else {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("no upstream for host {host}\n"),
            );
        };
        strip_hop_by_hop(&mut parts.headers);
        let orig_h2 = parts.version == Version::HTTP_2;
        // The request is put in HTTP/1.1 form (origin-form URI keyed to the
        // upstream's pool, the app's authority in Host); `into_h2` turns it
        // into HTTP/2 form when the mesh connection is h2.
        let authority = parts.uri.authority().cloned();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = match absolute_uri(Scheme::HTTPS, up.pool_key.clone(), path) {
            Ok(u) => u,
            Err(resp) => return *resp,
        };
        parts.version = Version::HTTP_11;
        // Absolute-form and HTTP/2: the target's authority replaces any Host
        // sent (RFC 9112 section 3.2.2).
        if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            parts.headers.insert(header::HOST, v);
        }
        if up.stepup_paths.contains(parts.uri.path()) && !up.h1_only.load(Ordering::Relaxed) {
            // A path that demanded step-up before: buffered and sent on the
            // h2 connection, signed up front when a nonce is kept.
            let template = Template::new(parts.method, parts.uri, parts.version, parts.headers);
            // Boxed, like the other rare paths below: an inline future would
            // make every request's future (moved into place per request) as
            // large as the largest path.
            let sent = Box::pin(self.stepup.send_known(|| up.h2.sender(), template, body)).await;
            return self.respond(up, sent);
        }
        // Every other request streams. Its head and a bounded copy of its
        // body (reference-counted chunks, no copying) are kept until the
        // response head arrives, so that a first step-up challenge can be
        // answered without the app noticing.
        let head = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.version,
            parts.headers.clone(),
        );
        let (body, copy) = if body.is_end_stream() {
            (ProxyBody::Stream(body), None)
        } else {
            let (body, copy) = tee(body, self.stepup.max_body());
            (ProxyBody::Tee(body), Some(copy))
        };
        let req = Request::from_parts(parts, body);
        let sent = match self.send(up, orig_h2, req).await {
            Ok(resp) if is_stepup_challenge(resp.status(), resp.headers()) => {
                if up.h1_only.load(Ordering::Relaxed) {
                    // No h2 connection: nowhere to send a request signed for
                    // a known channel binding.
                    Ok(self.stepup.pass_unanswerable(resp))
                } else {
                    let head = Template::new(head.0, head.1, head.2, head.3);
                    up.stepup_paths.learn(head.path());
                    let replay = copy.map_or(Replay::Body(bytes::Bytes::new()), |c| c.replay());
                    Box::pin(
                        self.stepup
                            .answer_replay(|| up.h2.sender(), resp, &head, replay),
                    )
                    .await
                }
            }
            other => other,
        };
        self.respond(up, sent)
    }

    /// Sends on the upstream's h2 connection, or on the HTTP/1.1 pool when
    /// the upstream does not offer h2 (HTTP/1.1 requests only).
    async fn send(
        &self,
        up: &Upstream,
        orig_h2: bool,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        if orig_h2 || !up.h1_only.load(Ordering::Relaxed) {
            match up.h2.sender().await {
                Ok((send, info)) => return send_h2(up, send, info, req).await,
                Err(ForwardError::NotH2) if !orig_h2 => {
                    tracing::info!(upstream = %up.cfg.address, "upstream does not offer h2; using an HTTP/1.1 pool");
                    up.h1_only.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        let sent = Box::pin(up.h1.request(req)).await;
        sent.map(|r| r.map(ProxyBody::Stream)).map_err(|e| {
            let mut cur: &(dyn std::error::Error + 'static) = &e;
            loop {
                if let Some(c) = cur.downcast_ref::<ConnectError>() {
                    return ForwardError::Connect(c.clone());
                }
                match cur.source() {
                    Some(n) => cur = n,
                    None => break,
                }
            }
            ForwardError::Upstream(root_cause(&e))
        })
    }

    /// The app's response, or why the forward failed.
    fn respond(
        &self,
        up: &Upstream,
        sent: Result<Response<ProxyBody>, ForwardError>,
    ) -> Response<ProxyBody> {
        match sent {
            Ok(resp) => resp,
            Err(ForwardError::Connect(e)) => text(e.status(), format!("{e}\n")),
            Err(ForwardError::NotH2) => text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "upstream {} does not offer HTTP/2, which this request (gRPC or HTTP/2) needs\n",
                    up.cfg.address
                ),
            ),
            Err(ForwardError::Upstream(msg)) => {
                tracing::warn!(upstream = %up.cfg.address, error = %msg, "upstream request failed");
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("upstream {} failed: {msg}\n", up.cfg.address),
                )
            }
        }
    }
}

/// Turns an HTTP/1.1-form request into HTTP/2 form: the Host header becomes
/// `:authority`.
fn into_h2(req: Request<ProxyBody>) -> Request<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    if let Some(host) = parts.headers.remove(header::HOST) {
        if let Ok(a) = Authority::try_from(host.as_bytes()) {
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.authority = Some(a);
            if let Ok(u) = Uri::from_parts(uri) {
                parts.uri = u;
            }
        }
    }
    parts.version = Version::HTTP_2;
    Request::from_parts(parts, body)
}

/// Sends on the shared h2 connection. A request the connection could not
/// even start (it was closing: GOAWAY after an idle close) comes back
/// unsent and is retried once on a fresh connection.
async fn send_h2(
    up: &Upstream,
    send: MeshSender,
    info: Arc<MeshConnInfo>,
    req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, ForwardError> {
    let (mut resp, info) = match send.try_send(into_h2(req)).await {
        Ok(r) => (r, info),
        Err(e) => match e.unsent {
            Some(req) => {
                let (send, info) = up.h2.sender().await?;
                let r = send
                    .try_send(req)
                    .await
                    .map_err(|e| ForwardError::Upstream(root_cause(&e.error)))?;
                (r, info)
            }
            None => return Err(ForwardError::Upstream(root_cause(&e.error))),
        },
    };
    resp.extensions_mut().insert(info);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_header_forms() {
        assert_eq!(host_of("api.default.svc"), "api.default.svc");
        assert_eq!(host_of("api.default.svc:8080"), "api.default.svc");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("127.0.0.1:15001"), "127.0.0.1");
    }
}
