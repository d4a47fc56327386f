//! The upstream table's entries: where the outbound sends a request for a
//! host, and the mutual-TLS connections it keeps to each upstream sidecar
//! (one shared HTTP/2 connection, or an HTTP/1.1 pool for an upstream
//! without `h2`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::uri::Authority;
use http::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keyproof_identity::svid;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{OutboundConfig, UpstreamConfig};
use crate::error::root_cause;
use crate::http::body::ProxyBody;
use crate::http::mesh_client::{MeshConn, MeshConnInfo, MeshSender};
use crate::identity::store::{self, IdentityStore};
use crate::metrics::{DirectionMetrics, Metrics};
use crate::outbound::kept::StepUpPaths;

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

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
    /// The status a forward that failed this way is answered with.
    pub fn status(&self) -> StatusCode {
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
                let f = store::classify(&e);
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
        let Some(exporter) = keyproof_identity::tls::channel_binding(session) else {
            // Signed requests bind to it: a binding of zeros would be one
            // every connection shares.
            return Err(ConnectError::Handshake {
                addr: self.address.clone(),
                reason: "protocol",
                msg: "the connection gives no TLS exporter (channel binding)".into(),
            });
        };
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

/// The pool's connector: every URI it is asked for maps to this upstream.
#[derive(Clone)]
pub struct MeshConnector(Arc<Dialer>);

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

/// An upstream's one multiplexed HTTP/2 connection, re-dialled when it
/// closes. Every request to an upstream that offers `h2` shares it, and a
/// signed request must travel on it (its channel binding is known before
/// the request is sent).
pub struct MeshLink {
    dialer: Arc<Dialer>,
    current: ArcSwapOption<MeshConn>,
    dialing: tokio::sync::Mutex<()>,
    max_header_bytes: u32,
}

impl MeshLink {
    /// The live connection's sender, dialling a new connection if there is
    /// none. The dial (TCP, TLS and h2 handshakes) is boxed: inline, its
    /// state would sit in every request's future, which is moved into place
    /// per request.
    pub async fn sender(&self) -> Result<MeshConn, ForwardError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        Box::pin(self.redial()).await
    }

    /// The live connection's sender, if there is one.
    pub fn current(&self) -> Option<MeshConn> {
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

/// One entry of the upstream table: where requests for its host go, and the
/// connections to it.
pub struct Upstream {
    /// Its configuration.
    pub cfg: UpstreamConfig,
    /// The HTTP/1.1 pool's key for it.
    pub pool_key: Authority,
    /// The HTTP/1.1 pool, for an upstream that does not offer `h2`.
    pub h1: Client<MeshConnector, ProxyBody>,
    /// The shared HTTP/2 connection.
    pub h2: MeshLink,
    /// Set once the upstream turned out not to offer `h2`.
    pub h1_only: AtomicBool,
    /// Paths of this upstream that demanded step-up: buffered, signed.
    pub stepup_paths: StepUpPaths,
}

impl Upstream {
    /// The `i`-th entry of `[[outbound.upstreams]]`.
    pub fn new(
        i: usize,
        u: &UpstreamConfig,
        cfg: &OutboundConfig,
        store: &Arc<IdentityStore>,
        metrics: &Metrics,
    ) -> Result<Upstream, OutboundError> {
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
                tls: TlsConnector::from(Arc::new(store::client_config(
                    store,
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
        Ok(Upstream {
            cfg: u.clone(),
            pool_key,
            h1,
            h1_only: AtomicBool::new(false),
            h2: MeshLink {
                dialer: mk(&[b"h2", b"http/1.1"])?,
                current: ArcSwapOption::empty(),
                dialing: tokio::sync::Mutex::new(()),
                max_header_bytes: u32::try_from(cfg.limits.max_header_bytes).unwrap_or(u32::MAX),
            },
            stepup_paths: StepUpPaths::default(),
        })
    }
}

/// Sends on the shared h2 connection. A request the connection could not
/// even start (it was closing: GOAWAY after an idle close) comes back
/// unsent and is retried once on a fresh connection.
pub async fn send_h2(
    link: &MeshLink,
    send: MeshSender,
    info: Arc<MeshConnInfo>,
    req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, ForwardError> {
    let (mut resp, info) = match send.try_send(req).await {
        Ok(r) => (r.map(ProxyBody::Mesh), info),
        Err(e) => match e.unsent {
            Some(req) => {
                let (send, info) = link.sender().await?;
                let r = send
                    .try_send(req)
                    .await
                    .map_err(|e| ForwardError::Upstream(root_cause(&e.error)))?;
                (r.map(ProxyBody::Mesh), info)
            }
            None => return Err(ForwardError::Upstream(root_cause(&e.error))),
        },
    };
    resp.extensions_mut().insert(info);
    Ok(resp)
}
