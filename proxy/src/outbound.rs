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
use std::future::{ready, Future, Ready};
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::future::Either;
use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keyproof_identity::svid;
use keyproof_stepup::is_stepup_challenge;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::body::{absolute_uri, path_of, strip_hop_by_hop, text, ProxyBody, RequestBody};
use crate::config::{OutboundConfig, UpstreamConfig};
use crate::fut::map_in_place;
use crate::h1_server::{self, ServerLimits};
use crate::identity::{self, IdentityStore};
use crate::inbound::root_cause;
use crate::mesh::{MeshSender, Start};
use crate::metrics::DirectionMetrics;
use crate::owned::{self, Underscores};
use crate::server::{self, Builders, ConnGuards, Proto, StreamGuard};
use crate::stepup::{
    tee, MeshConn, MeshConnInfo, OutboundStepUp, Replay, StepUpPaths, TeeHandle, Template,
};

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

/// A boxed per-request future, for the rare paths.
type Pending<'a> = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send + 'a>>;

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
        self.metrics
            .key_exchange(session.negotiated_key_exchange_group().map(|g| g.name()));
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

/// Whether the client opens with the HTTP/2 connection preface (prior
/// knowledge, as gRPC clients do), peeked so that either server reads the
/// connection from its first byte.
async fn sniff_h2(tcp: &TcpStream) -> io::Result<bool> {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut seen = [0u8; 24];
    loop {
        let n = tcp.peek(&mut seen).await?;
        if n == 0 || seen[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // Only part of the preface so far (rare): look again shortly.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The host of an authority as upstreams are keyed: an IPv6 literal
/// without its brackets.
fn host_key(a: &Authority) -> &str {
    let h = a.host();
    h.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h)
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
        if let Some(c) = self.current() {
            return Ok(c);
        }
        Box::pin(self.redial()).await
    }

    /// The live connection's sender, if there is one.
    fn current(&self) -> Option<MeshConn> {
        let c = self.current.load();
        let c = c.as_ref().filter(|c| !c.0.is_closed())?;
        Some((c.0.clone(), c.1.clone()))
    }

    async fn redial(&self) -> Result<MeshConn, ForwardError> {
        // One dial at a time; whoever waited re-checks first.
        let _g = self.dialing.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
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
    h1_limits: ServerLimits,
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
            h1_limits: ServerLimits {
                header_read_timeout: cfg.limits.header_read_timeout,
                max_header_bytes: cfg.limits.max_header_bytes,
                body_timeout: cfg.limits.body_timeout,
            },
            cfg: cfg.clone(),
        }))
    }

    /// Handles one accepted plaintext connection from the app: HTTP/2 with
    /// prior knowledge (gRPC) goes to hyper's server, HTTP/1 to the
    /// sidecar's own (`h1_server.rs`).
    pub async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        guards: ConnGuards,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _guards = guards;
        let activity = Arc::new(AtomicU64::new(0));
        let idle = self.cfg.limits.idle_timeout;
        let h2 = tokio::select! {
            r = sniff_h2(&tcp) => r,
            _ = server::stopped(&mut shutdown) => return,
            _ = tokio::time::sleep(idle) => return,
        };
        let result = match h2 {
            Ok(true) => {
                let this = self.clone();
                let streams = activity.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let this = this.clone();
                    let stream = StreamGuard::start(&streams);
                    async move {
                        let resp = this.request(req.map(RequestBody::Hyper)).await;
                        drop(stream);
                        Ok::<_, Infallible>(resp)
                    }
                });
                server::serve(
                    &self.builders,
                    Proto::H2,
                    tcp,
                    activity,
                    idle,
                    svc,
                    shutdown,
                )
                .await
            }
            Ok(false) => {
                let closing = AtomicBool::new(false);
                let conn = pin!(h1_server::serve(
                    tcp,
                    self.h1_limits,
                    &closing,
                    activity.clone(),
                    |req| self.request(req.map(RequestBody::H1))
                ));
                server::drive(
                    conn,
                    |_| closing.store(true, Ordering::Relaxed),
                    activity,
                    idle,
                    &mut shutdown,
                )
                .await
                .map_err(Into::into)
            }
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            tracing::debug!(peer = %remote, error = %e, "outbound connection ended with an error");
        }
    }

    /// One request, start to response. Built like the inbound's: the
    /// decisions are made before the future exists, the common path's
    /// future holds only what it still needs, and the rare paths are boxed
    /// (an `async fn` per layer would keep another copy of the request in
    /// each layer, and the whole future is moved into place per request).
    fn request(
        &self,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + '_ {
        let start = Instant::now();
        map_in_place(self.forward(req), move |resp| {
            self.metrics
                .request(resp.status(), start.elapsed().as_secs_f64());
            resp
        })
    }

    fn upstream_for(&self, host: &str) -> Option<&Upstream> {
        let i = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&host.to_ascii_lowercase())
        } else {
            self.by_host.get(host)
        };
        i.or(self.fallback.as_ref()).map(|i| &self.upstreams[*i])
    }

    fn forward(
        &self,
        req: Request<RequestBody>,
    ) -> Either<Pending<'_>, impl Future<Output = Response<ProxyBody>> + Send + '_> {
        if req.method() == http::Method::CONNECT {
            return Either::Left(Box::pin(ready(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT tunnels are not supported: send plain http:// requests and the sidecar adds mutual TLS\n",
            ))));
        }
        let (mut parts, body) = req.into_parts();
        // The path goes out (and is signed for step-up) in the form the
        // peer's inbound decides on, so its normalization is the identity.
        match crate::path::normalize_uri(&parts.method, &parts.uri, self.cfg.path_normalization) {
            Ok(None) => {}
            Ok(Some(uri)) => parts.uri = uri,
            Err(why) => {
                self.metrics.refused(why);
                tracing::info!(method = %parts.method, path = parts.uri.path(), reason = why.reason(), "outbound request refused: {why}");
                let msg = format!("bad request path: {why}\n");
                return Either::Left(Box::pin(ready(text(StatusCode::BAD_REQUEST, msg))));
            }
        }
        // The same header rules as the inbound's, so that the app learns of
        // a malformed request here rather than from the peer; sidecar-owned
        // fields the app sends are removed (the peer's inbound would remove
        // them anyway, and the signer adds the step-up fields itself).
        let found = match owned::check_request(&parts.headers, &parts.uri, Underscores::Allow) {
            Ok(f) => f,
            Err(r) => {
                tracing::info!(method = %parts.method, reason = %r.reason, "outbound request refused: header fields");
                let resp = text(r.status, format!("bad request: {}\n", r.reason));
                return Either::Left(Box::pin(ready(resp)));
            }
        };
        owned::strip_request(&mut parts.headers, found, false);
        // Absolute-form and HTTP/2 carry the authority in the URI (a Host
        // that disagrees was refused above); origin-form in Host. The request goes on in HTTP/2 form, the app's authority
        // as `:authority`, which is what the inbound reads.
        let authority = match parts.uri.authority() {
            Some(a) => Some(a.clone()),
            None => parts
                .headers
                .get(header::HOST)
                .and_then(|h| Authority::try_from(h.as_bytes()).ok()),
        };
        let Some(authority) = authority.filter(|a| !a.host().is_empty()) else {
            return Either::Left(Box::pin(ready(text(
                StatusCode::BAD_REQUEST,
                "request has no valid host\n",
            ))));
        };
        let host = host_key(&authority);
        let Some(up) = self.upstream_for(host) else {
            let msg = format!("no upstream for host {host}\n");
            return Either::Left(Box::pin(ready(text(StatusCode::BAD_GATEWAY, msg))));
        };
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        let orig_h2 = parts.version == Version::HTTP_2;
        let path = path_of(&parts.uri);
        parts.uri = match absolute_uri(Scheme::HTTPS, authority, path) {
            Ok(u) => u,
            Err(resp) => return Either::Left(Box::pin(ready(*resp))),
        };
        parts.version = Version::HTTP_2;
        if up.stepup_paths.contains(parts.uri.path()) && !up.h1_only.load(Ordering::Relaxed) {
            // A path that demanded step-up before: buffered and sent on the
            // h2 connection, signed up front when a nonce is kept.
            let template = Template::new(parts.method, parts.uri, parts.version, parts.headers);
            return Either::Left(Box::pin(async move {
                let sent = self
                    .stepup
                    .send_known(|| up.h2.sender(), template, body)
                    .await;
                self.respond(up, sent)
            }));
        }
        // Every other request streams. Its head and a bounded copy of its
        // body (reference-counted chunks, no copying) are kept until the
        // response head arrives, so that a first step-up challenge can be
        // answered without the app noticing.
        let head = Template::new(
            parts.method.clone(),
            parts.uri.clone(),
            parts.version,
            parts.headers.clone(),
        );
        let (body, copy) = if body.is_end_stream() {
            (ProxyBody::from(body), None)
        } else {
            let (body, copy) = tee(body, self.stepup.max_body());
            (ProxyBody::Tee(body), Some(copy))
        };
        let req = Request::from_parts(parts, body);
        let conn = if orig_h2 || !up.h1_only.load(Ordering::Relaxed) {
            up.h2.current()
        } else {
            None
        };
        let Some((send, info)) = conn else {
            return Either::Left(self.send_slow(up, orig_h2, req, head, copy));
        };
        let req = match send.start(req) {
            Start::Sent(response) => {
                // The common path: the request is on its way, and this
                // future only awaits the response head.
                return Either::Right(async move {
                    let sent = match response.await {
                        Ok(mut resp) => {
                            resp.extensions_mut().insert(info);
                            Ok(resp)
                        }
                        Err(e) => Err(ForwardError::Upstream(root_cause(&e.error))),
                    };
                    self.after_send(up, sent, head, copy).await
                });
            }
            Start::Wait(send, req) => {
                return Either::Left(Box::pin(async move {
                    let sent = send_h2(up, send, info, req).await;
                    self.after_send(up, sent, head, copy).await
                }));
            }
            Start::Failed(e) => match e.unsent {
                // The connection was closing: a fresh one is dialled below.
                Some(req) => req,
                None => {
                    let sent = Err(ForwardError::Upstream(root_cause(&e.error)));
                    return Either::Left(Box::pin(ready(self.respond(up, sent))));
                }
            },
        };
        Either::Left(self.send_slow(up, orig_h2, req, head, copy))
    }

    /// No live h2 connection (the first request, or after a close), or an
    /// upstream without h2: dial, or use the HTTP/1.1 pool.
    fn send_slow<'a>(
        &'a self,
        up: &'a Upstream,
        orig_h2: bool,
        req: Request<ProxyBody>,
        head: Template,
        copy: Option<TeeHandle>,
    ) -> Pending<'a> {
        Box::pin(async move {
            let sent = self.send(up, orig_h2, req).await;
            self.after_send(up, sent, head, copy).await
        })
    }

    /// The response, unless it is a first step-up challenge, which is
    /// answered by replaying the request signed (boxed: it is rare).
    fn after_send<'a>(
        &'a self,
        up: &'a Upstream,
        sent: Result<Response<ProxyBody>, ForwardError>,
        head: Template,
        copy: Option<TeeHandle>,
    ) -> Either<Ready<Response<ProxyBody>>, Pending<'a>> {
        match sent {
            Ok(resp) if is_stepup_challenge(resp.status(), resp.headers()) => {
                if up.h1_only.load(Ordering::Relaxed) {
                    // No h2 connection: nowhere to send a request signed for
                    // a known channel binding.
                    let resp = self.stepup.pass_unanswerable(resp);
                    return Either::Left(ready(resp));
                }
                up.stepup_paths.learn(head.path());
                let replay = copy.map_or(Replay::Body(bytes::Bytes::new()), |c| c.replay());
                Either::Right(Box::pin(async move {
                    let sent = self
                        .stepup
                        .answer_replay(|| up.h2.sender(), resp, &head, replay)
                        .await;
                    self.respond(up, sent)
                }))
            }
            other => Either::Left(ready(self.respond(up, other))),
        }
    }

    /// Sends on the upstream's h2 connection (dialling it first), or on the
    /// HTTP/1.1 pool when the upstream does not offer h2 (HTTP/1.1 requests
    /// only).
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
        let req = match into_h1(req, &up.pool_key) {
            Ok(r) => r,
            Err(resp) => return Ok(*resp),
        };
        let sent = up.h1.request(req).await;
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

/// Turns the HTTP/2-form request into the form the HTTP/1.1 pool sends:
/// the app's authority in Host, the URI keyed to the upstream's pool.
fn into_h1(
    req: Request<ProxyBody>,
    pool_key: &Authority,
) -> Result<Request<ProxyBody>, Box<Response<ProxyBody>>> {
    let (mut parts, body) = req.into_parts();
    if let Some(v) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, v);
    }
    let path = path_of(&parts.uri);
    parts.uri = absolute_uri(Scheme::HTTPS, pool_key.clone(), path)?;
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
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
    let (mut resp, info) = match send.try_send(req).await {
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
    use super::host_key;

    #[test]
    fn host_header_forms() {
        let key = |s: &'static str| host_key(&s.parse().unwrap()).to_owned();
        assert_eq!(key("api.default.svc"), "api.default.svc");
        assert_eq!(key("api.default.svc:8080"), "api.default.svc");
        assert_eq!(key("[::1]:80"), "::1");
        assert_eq!(key("127.0.0.1:15001"), "127.0.0.1");
    }
}
