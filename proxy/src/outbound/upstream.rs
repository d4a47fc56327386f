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
use std::time::{Duration, SystemTime};

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
use crate::http::mesh_client::{unprocessed, MeshConn, MeshConnInfo, MeshSender, Unprocessed};
use crate::http::read_ahead::ReadAhead;
use crate::identity::store::{self, IdentityStore};
use crate::metrics::{DirectionMetrics, Metrics, Retry};
use crate::outbound::kept::StepUpPaths;
use crate::outbound::own_ports;

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
    /// The identity the connections present.
    store: Arc<IdentityStore>,
}

impl Dialer {
    async fn dial(&self) -> Result<MeshStream, ConnectError> {
        // Read before the handshake: a renewal during it makes this the
        // older generation's, which retires the connection early rather
        // than late.
        let identity_generation = self.store.identity_generation();
        let (tcp, own) = match tokio::time::timeout(
            self.connect_timeout,
            own_ports::connect_host(&self.address),
        )
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
            self.tls
                .connect(self.server_name.clone(), ReadAhead::new(tcp)),
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
        let not_after =
            store::PeerIdentity::from_certs(session.peer_certificates()).map(|p| p.not_after);
        let (Some(peer_id), Some(not_after)) = (peer_id, not_after) else {
            return Err(ConnectError::Handshake {
                addr: self.address.clone(),
                reason: "bad_identity",
                msg: "server certificate unreadable after verification".into(),
            });
        };
        let open = self.metrics.connections_open.clone();
        open.inc();
        let info = Arc::new(MeshConnInfo {
            peer_id,
            exporter,
            conn_id: CONN_IDS.fetch_add(1, Ordering::Relaxed),
            not_after,
            identity_generation,
        });
        Ok(MeshStream {
            tls,
            _own: own,
            h2,
            info,
            open,
        })
    }
}

/// Whether a new request may go on a connection of `info` made with the
/// identity of `store`: until its server's certificate expires (a new
/// handshake would fail then), and while we still present the certificate
/// it was made with and trust the roots it verified its server against.
/// After a renewal or reload of our certificate, new requests go on a
/// connection presenting the new one, while what is in flight here
/// finishes: the server attributes them to the certificate we hold now
/// (its XFCC, its deny list by serial), and nothing is left to fail when
/// the old certificate expires. After a change of roots the server is
/// verified again by a new handshake.
fn usable(info: &MeshConnInfo, store: &IdentityStore) -> bool {
    info.identity_generation == store.identity_generation() && SystemTime::now() < info.not_after
}

/// One mutual-TLS connection to an upstream sidecar.
pub struct MeshStream {
    tls: TlsStream<ReadAhead<TcpStream>>,
    /// Known as the outbound's own while it is open.
    _own: own_ports::OwnConn,
    h2: bool,
    info: Arc<MeshConnInfo>,
    open: prometheus::IntGauge,
}

impl Drop for MeshStream {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl crate::http::frame_guard::PeerAddr for MeshStream {
    fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.tls.get_ref().0.get_ref().peer_addr().ok()
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
/// Each connection it makes is noted in its pool generation's [`Earliest`].
#[derive(Clone)]
pub struct MeshConnector(Arc<Dialer>, Arc<Earliest>);

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<MeshStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let (d, earliest) = (self.0.clone(), self.1.clone());
        Box::pin(async move {
            let stream = d.dial().await?;
            earliest.note(&stream.info);
            Ok(TokioIo::new(stream))
        })
    }
}

/// The connection of a pool generation that retires first.
#[derive(Default)]
pub struct Earliest(std::sync::Mutex<Option<Arc<MeshConnInfo>>>);

impl Earliest {
    fn note(&self, info: &Arc<MeshConnInfo>) {
        let mut e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if e.as_ref().is_none_or(|o| info.not_after < o.not_after) {
            *e = Some(info.clone());
        }
    }

    /// Whether a connection of the generation takes no new request.
    fn retired(&self, store: &IdentityStore) -> bool {
        let e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        e.as_ref().is_some_and(|i| !usable(i, store))
    }
}

/// The HTTP/1.1 pool of an upstream that does not offer `h2`. hyper's pool
/// asks a connection only whether it is open before reusing it, so
/// connections are kept in generations: once one of the current
/// generation may take no new request ([`usable`]: its server's
/// certificate expired, ours was renewed, or the trust bundle's roots
/// changed), the next request gets a new pool. Requests in flight on the
/// old one finish, and its idle connections close with it.
pub struct H1Pool {
    dialer: Arc<Dialer>,
    idle_timeout: Duration,
    current: std::sync::Mutex<Arc<H1Generation>>,
}

struct H1Generation {
    client: Client<MeshConnector, ProxyBody>,
    earliest: Arc<Earliest>,
    /// The identity's generation when this pool generation began: every
    /// connection of it presented that certificate or a later one, and
    /// verified its server under those roots or later ones.
    identity_generation: u64,
}

impl H1Pool {
    fn new(dialer: Arc<Dialer>, idle_timeout: Duration) -> H1Pool {
        let first = H1Pool::generation(&dialer, idle_timeout);
        H1Pool {
            dialer,
            idle_timeout,
            current: std::sync::Mutex::new(first),
        }
    }

    fn generation(dialer: &Arc<Dialer>, idle_timeout: Duration) -> Arc<H1Generation> {
        let earliest = Arc::new(Earliest::default());
        Arc::new(H1Generation {
            identity_generation: dialer.store.identity_generation(),
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(idle_timeout)
                .set_host(false)
                .build(MeshConnector(dialer.clone(), earliest.clone())),
            earliest,
        })
    }

    /// The pool a new request goes to.
    pub fn client(&self) -> Client<MeshConnector, ProxyBody> {
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if g.identity_generation != self.dialer.store.identity_generation()
            || g.earliest.retired(&self.dialer.store)
        {
            tracing::debug!(upstream = %self.dialer.address, "our certificate or the trust bundle changed, or a server's certificate expired; new requests go to new connections");
            *g = H1Pool::generation(&self.dialer, self.idle_timeout);
        }
        g.client.clone()
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
    /// The outbound's metrics, where retries are counted.
    pub fn metrics(&self) -> &DirectionMetrics {
        &self.dialer.metrics
    }

    /// The live connection's sender, dialling a new connection if there is
    /// none. The dial (TCP, TLS and h2 handshakes) is boxed: inline, its
    /// state would sit in every request's future, which is moved into place
    /// per request.
    pub async fn sender(&self) -> Result<MeshConn, ForwardError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        Box::pin(self.redial(|_| true)).await
    }

    /// A connection with room for one more tunnel, and other than
    /// `not` (one that refused a stream): the live one if it qualifies,
    /// else a new one that becomes the live one. The one it replaces
    /// serves its streams until they end, then closes.
    pub async fn tunnel_sender(&self, not: Option<&MeshSender>) -> Result<MeshConn, ForwardError> {
        let usable =
            |c: &MeshConn| c.0.has_tunnel_room() && not.is_none_or(|n| !c.0.same_connection(n));
        if let Some(c) = self.current().filter(usable) {
            return Ok(c);
        }
        Box::pin(self.redial(usable)).await
    }

    /// The live connection's sender, if there is one. A connection whose
    /// server certificate has expired takes no new request: the next one
    /// dials anew (and a handshake with that certificate fails), while
    /// what is in flight on the old one finishes.
    pub fn current(&self) -> Option<MeshConn> {
        let c = self.current.load();
        let c = c
            .as_ref()
            .filter(|c| !c.0.is_closed() && usable(&c.1, &self.dialer.store))?;
        Some((c.0.clone(), c.1.clone()))
    }

    async fn redial(&self, usable: impl Fn(&MeshConn) -> bool) -> Result<MeshConn, ForwardError> {
        // One dial at a time; whoever waited re-checks first.
        let _g = self.dialing.lock().await;
        if let Some(c) = self.current().filter(|c| usable(c)) {
            return Ok(c);
        }
        let stream = self.dialer.dial().await.map_err(ForwardError::Connect)?;
        if !stream.h2 {
            // The probe connection is dropped; the HTTP/1.1 pool takes over.
            return Err(ForwardError::NotH2);
        }
        let info = stream.info.clone();
        let metrics = self.dialer.metrics.clone();
        let refused: crate::http::mesh_client::OnRefused =
            Box::new(move || metrics.handshake("refused_by_peer"));
        let send = MeshSender::handshake_reporting(stream, self.max_header_bytes, Some(refused))
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
    /// The upstream did not process the request: it refused the stream
    /// (`REFUSED_STREAM`, RFC 9113 section 8.7: short of memory or
    /// streams for now), or its GOAWAY left the stream out (section 6.8:
    /// it is closing). Safe to send again.
    Unprocessed(Unprocessed, String),
}

impl ForwardError {
    /// What a stream's h2 error means for its request: a stream the peer
    /// refused, or left out of its GOAWAY, has not reached its app; after
    /// any other failure it may have.
    pub fn from_h2(e: &h2::Error) -> ForwardError {
        match unprocessed(e) {
            Some(why) => ForwardError::Unprocessed(why, root_cause(e)),
            None => ForwardError::Upstream(root_cause(e)),
        }
    }
}

/// Waits before a request the upstream did not process goes again, and
/// counts the retry: after a refusal, a pause of 25-75 ms; a closing
/// connection's request goes at once, on a fresh one.
pub async fn before_retry(why: Unprocessed, metrics: &DirectionMetrics) {
    match why {
        Unprocessed::Refused => {
            pause_after_refusal().await;
            metrics.retried(Retry::RefusedStream);
        }
        Unprocessed::GoneAway => metrics.retried(Retry::ConnectionClosing),
    }
}

/// How long a request the upstream refused waits before it is sent again:
/// a peer that refuses streams for memory sheds and recovers within its
/// 50 ms look ([`crate::memory::PERIOD`]), and a spread keeps the requests
/// it refused together from all coming back at once.
async fn pause_after_refusal() {
    use std::hash::{BuildHasher, Hasher};
    // `RandomState` is seeded per instance from the OS: a jitter without a
    // random-number crate.
    let spread = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % 50;
    tokio::time::sleep(Duration::from_millis(25 + spread)).await;
}

/// One entry of the upstream table: where requests for its host go, and the
/// connections to it.
pub struct Upstream {
    /// Its configuration.
    pub cfg: UpstreamConfig,
    /// The HTTP/1.1 pool's key for it.
    pub pool_key: Authority,
    /// The HTTP/1.1 pool, for an upstream that does not offer `h2`.
    pub h1: H1Pool,
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
                store: store.clone(),
            }))
        };
        let h1 = H1Pool::new(mk(&[b"http/1.1"])?, cfg.pool_idle_timeout);
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
                link.metrics().retried(Retry::ConnectionClosing);
                let (send, info) = link.sender().await?;
                let r = send
                    .try_send(req)
                    .await
                    .map_err(|e| ForwardError::from_h2(&e.error))?;
                (r.map(ProxyBody::Mesh), info)
            }
            None => return Err(ForwardError::from_h2(&e.error)),
        },
    };
    resp.extensions_mut().insert(info);
    Ok(resp)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, oneshot};
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::identity::store::test_pki::Pki;
    use crate::testing::{config, metric, workload, workload_for, Workload};
    use keyproof_identity::keys::KeyType;

    const WAIT: Duration = Duration::from_secs(2);
    const API: &str = "spiffe://unit.keyproof.test/ns/demo/sa/api";

    /// `[outbound]` with `extra` keys and one upstream, `api.demo`, at
    /// `address` that must prove to be `identity`.
    fn outbound_cfg(address: &str, identity: &str, extra: &str) -> OutboundConfig {
        config(&format!(
            "[outbound]\nlisten = \"127.0.0.1:0\"\n{extra}\n\
             [[outbound.upstreams]]\nhost = \"api.demo\"\naddress = \"{address}\"\nidentity = \"{identity}\"\n"
        ))
        .outbound
        .expect("[outbound]")
    }

    /// The first upstream rule of `cfg` as a concrete upstream.
    fn first(cfg: &OutboundConfig) -> UpstreamConfig {
        let r = &cfg.upstreams[0];
        UpstreamConfig {
            host: r.host.as_ref().map(ToString::to_string).unwrap_or_default(),
            address: r.address.clone().expect("address"),
            identity: r.identity.fixed.clone(),
        }
    }

    /// The upstream of `cfg`, dialled as the `web` workload.
    fn upstream(cfg: &OutboundConfig, metrics: &Metrics) -> Upstream {
        let web = workload("/ns/demo/sa/web").store();
        Upstream::new(0, &first(cfg), cfg, &web, metrics).expect("upstream")
    }

    /// An upstream at `addr`, dialled as the `web` workload whose store is
    /// returned (to renew it, or change its roots).
    fn with_client(addr: SocketAddr) -> (Metrics, Arc<IdentityStore>, Upstream) {
        let m = Metrics::new().expect("metrics");
        let cfg = outbound_cfg(&addr.to_string(), API, "");
        let store = workload("/ns/demo/sa/web").store();
        let up = Upstream::new(0, &first(&cfg), &cfg, &store, &m).expect("upstream");
        (m, store, up)
    }

    fn handshakes(m: &Metrics, result: &str) -> f64 {
        metric(
            m,
            &format!("keyproof_tls_handshakes_total{{direction=\"outbound\",result=\"{result}\"}}"),
        )
    }

    fn open_connections(m: &Metrics) -> f64 {
        metric(m, "keyproof_connections_open{direction=\"outbound\"}")
    }

    /// Why dialling the upstream's h2 link failed (panics if it did not).
    async fn dial_error(up: &Upstream) -> ConnectError {
        match up.h2.sender().await {
            Ok(_) => panic!("the dial succeeded"),
            Err(ForwardError::Connect(e)) => e,
            Err(e) => panic!("{e:?}, not a connect error"),
        }
    }

    async fn sender(up: &Upstream) -> MeshConn {
        match up.h2.sender().await {
            Ok(c) => c,
            Err(e) => panic!("no sender: {e:?}"),
        }
    }

    /// Waits (bounded) until the link has noticed its connection closed.
    async fn until_closed(link: &MeshLink) {
        tokio::time::timeout(WAIT, async {
            while link.current().is_some() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the link never saw its connection close");
    }

    /// How the test server treats the HTTP/2 connection it accepts.
    #[derive(Clone, Copy)]
    pub(crate) enum Serve {
        /// Answers every request `200`.
        Answer,
        /// Sends GOAWAY (last stream 0) right after the handshake and closes.
        GoAwayAtOnce,
        /// Takes the connection's first request head, then sends GOAWAY
        /// with last stream 0: the request is left out, unprocessed.
        GoAwayAbove,
        /// Resets every request's stream.
        Reset,
        /// Opens every `CONNECT` tunnel and echoes it; answers other
        /// requests `200`.
        Connect,
        /// As `Connect`, with at most this many concurrent streams.
        ConnectMax(u32),
        /// Refuses every stream (`REFUSED_STREAM`).
        Refuse,
        /// Reads each request's body, refuses the connection's first `n`
        /// streams (`REFUSED_STREAM`) and answers the rest `200` with the
        /// body's length in `x-body-len` and its trailers in
        /// `x-trailers` (`name=value,...`).
        RefuseFirst(usize),
        /// Never answers.
        Silent,
    }

    /// One connection the test server completed a TLS handshake on. The
    /// connection stays open while this is held (dropping it closes it).
    pub(crate) struct Accepted {
        exporter: [u8; 32],
        alpn: Option<Vec<u8>>,
        pub(crate) requests: Arc<AtomicUsize>,
        /// Held only to be dropped.
        _close: oneshot::Sender<()>,
    }

    /// A mutual-TLS server on loopback presenting `server`'s identity,
    /// offering `alpn`; its `n`-th HTTP/2 connection is served as
    /// `modes[n]` (the last mode for the rest).
    pub(crate) async fn mesh_server(
        server: &Workload,
        alpn: &[&[u8]],
        modes: Vec<Serve>,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<Accepted>) {
        mesh_server_with(server.store(), alpn, modes).await
    }

    async fn mesh_server_with(
        store: Arc<IdentityStore>,
        alpn: &[&[u8]],
        modes: Vec<Serve>,
    ) -> (SocketAddr, mpsc::UnboundedReceiver<Accepted>) {
        let mut tls = store::server_config(&store).expect("server config");
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("address");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let mode = modes[n.min(modes.len() - 1)];
                n += 1;
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    // A refused client (the tests that expect one) ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let session = tls.get_ref().1;
                    let exporter = keyproof_identity::tls::channel_binding(session)
                        .expect("server-side exporter");
                    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
                    let h2 = alpn.as_deref() == Some(b"h2");
                    let (_close, mut closed) = oneshot::channel();
                    let requests = Arc::new(AtomicUsize::new(0));
                    let _ = tx.send(Accepted {
                        exporter,
                        alpn,
                        requests: requests.clone(),
                        _close,
                    });
                    if !h2 {
                        // HTTP/1.1: 200 to every request, counted, until the
                        // client closes or the test drops its `Accepted`.
                        let svc = hyper::service::service_fn(move |_req| {
                            requests.fetch_add(1, Ordering::SeqCst);
                            async {
                                Ok::<_, std::convert::Infallible>(Response::new(
                                    http_body_util::Empty::<bytes::Bytes>::new(),
                                ))
                            }
                        });
                        let serve = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc);
                        tokio::select! {
                            _ = closed => {}
                            _ = serve => {}
                        }
                        return;
                    }
                    if let Serve::GoAwayAbove = mode {
                        crate::testing::h2_going_away(tls, 1, 0, 0, requests).await;
                        return;
                    }
                    let mut server = h2::server::Builder::new();
                    if let Serve::ConnectMax(n) = mode {
                        server.max_concurrent_streams(n);
                    }
                    let Ok(mut conn) = server.handshake(tls).await else {
                        return;
                    };
                    if let Serve::GoAwayAtOnce = mode {
                        conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                        while let Some(Ok(_)) = conn.accept().await {
                            requests.fetch_add(1, Ordering::SeqCst);
                        }
                        return;
                    }
                    loop {
                        tokio::select! {
                            _ = &mut closed => return,
                            r = conn.accept() => {
                                let Some(Ok((req, mut respond))) = r else { return };
                                requests.fetch_add(1, Ordering::SeqCst);
                                match mode {
                                    Serve::Connect | Serve::ConnectMax(_)
                                        if req.method() == http::Method::CONNECT =>
                                    {
                                        tokio::spawn(echo(req, respond));
                                    }
                                    Serve::Reset => respond.send_reset(h2::Reason::INTERNAL_ERROR),
                                    Serve::Refuse => respond.send_reset(h2::Reason::REFUSED_STREAM),
                                    Serve::RefuseFirst(n) => {
                                        let refuse = requests.load(Ordering::SeqCst) <= n;
                                        tokio::spawn(refuse_or_count(req, respond, refuse));
                                    }
                                    Serve::Silent => {
                                        tokio::spawn(async move {
                                            let _held = (req, respond);
                                            std::future::pending::<()>().await;
                                        });
                                    }
                                    _ => {
                                        let _ = respond
                                            .send_response(Response::new(()), true);
                                    }
                                }
                            }
                        }
                    }
                });
            }
        });
        (addr, rx)
    }

    /// Reads the request's body, then refuses its stream or answers `200`
    /// with the body's length.
    async fn refuse_or_count(
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<bytes::Bytes>,
        refuse: bool,
    ) {
        let mut body = req.into_body();
        let mut len = 0;
        while let Some(Ok(d)) = body.data().await {
            len += d.len();
            let _ = body.flow_control().release_capacity(d.len());
        }
        let trailers = match body.trailers().await {
            Ok(Some(t)) => t
                .iter()
                .map(|(n, v)| format!("{n}={}", v.to_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(","),
            _ => String::new(),
        };
        if refuse {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            return;
        }
        let resp = Response::builder()
            .header("x-body-len", len)
            .header("x-trailers", trailers)
            .body(())
            .expect("a response");
        let _ = respond.send_response(resp, true);
    }

    /// Opens a `CONNECT` tunnel and echoes what it carries.
    async fn echo(
        req: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<bytes::Bytes>,
    ) {
        let Ok(mut send) = respond.send_response(Response::new(()), false) else {
            return;
        };
        let mut body = req.into_body();
        while let Some(Ok(mut d)) = body.data().await {
            let n = d.len();
            while !d.is_empty() {
                send.reserve_capacity(d.len());
                let Some(Ok(room)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await else {
                    return;
                };
                let chunk = d.split_to(room.min(d.len()));
                if send.send_data(chunk, false).is_err() {
                    return;
                }
            }
            let _ = body.flow_control().release_capacity(n);
        }
        let _ = send.send_data(bytes::Bytes::new(), true);
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Accepted>) -> Accepted {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("the server accepted no connection in time")
            .expect("server gone")
    }

    fn get() -> Request<ProxyBody> {
        Request::get("http://api.demo/x")
            .body(ProxyBody::empty())
            .expect("request")
    }

    #[test]
    fn an_address_that_is_not_an_authority_is_refused_naming_its_key() {
        let cfg = outbound_cfg("127.0.0.1:9", API, "");
        let mut u = first(&cfg);
        u.address = "api demo:443".into();
        let web = workload("/ns/demo/sa/web").store();
        let m = Metrics::new().expect("metrics");
        match Upstream::new(3, &u, &cfg, &web, &m) {
            Err(OutboundError::Address { key, msg }) => {
                assert_eq!(key, "outbound.upstreams[3].address");
                assert!(!msg.is_empty());
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("accepted {:?}", u.address),
        }
    }

    #[test]
    fn every_address_the_configuration_accepts_makes_an_upstream() {
        let m = Metrics::new().expect("metrics");
        for a in [
            "127.0.0.1:8443",
            "[::1]:8443",
            "api.demo:443",
            "a-b.svc.cluster.local:1",
            "localhost:65535",
            "[fe80::1%2]:80",
            "API.Demo:443",
        ] {
            let cfg = outbound_cfg(a, API, "");
            let up = upstream(&cfg, &m);
            assert_eq!(up.pool_key.as_str(), a);
        }
    }

    #[test]
    fn timeouts_are_504_and_every_other_connect_error_502() {
        let addr = "10.0.0.1:443".to_owned();
        let after = Duration::from_millis(100);
        let cases = [
            (
                ConnectError::ConnectTimeout {
                    addr: addr.clone(),
                    after,
                },
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                ConnectError::HandshakeTimeout {
                    addr: addr.clone(),
                    after,
                },
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                ConnectError::Connect {
                    addr: addr.clone(),
                    msg: "refused".into(),
                },
                StatusCode::BAD_GATEWAY,
            ),
            (
                ConnectError::IdentityMismatch("not api".into()),
                StatusCode::BAD_GATEWAY,
            ),
            (
                ConnectError::Handshake {
                    addr,
                    reason: "unknown_ca",
                    msg: "bad".into(),
                },
                StatusCode::BAD_GATEWAY,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.status(), status, "{e}");
        }
    }

    #[tokio::test]
    async fn dialling_a_closed_port_is_a_connect_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("address").to_string();
        drop(l);
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr, API, ""), &m);
        match dial_error(&up).await {
            ConnectError::Connect { addr: a, .. } => assert_eq!(a, addr),
            e => panic!("wrong error: {e}"),
        }
        // No TLS handshake was tried.
        assert_eq!(handshakes(&m, "timeout") + handshakes(&m, "protocol"), 0.0);
        assert_eq!(open_connections(&m), 0.0);
    }

    #[tokio::test]
    async fn a_listener_that_never_speaks_tls_is_a_handshake_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("address").to_string();
        tokio::spawn(async move {
            // Accepts and holds every connection, silent.
            let mut held = Vec::new();
            while let Ok((tcp, _)) = l.accept().await {
                held.push(tcp);
            }
        });
        let m = Metrics::new().expect("metrics");
        let up = upstream(
            &outbound_cfg(&addr, API, "handshake_timeout = \"150ms\""),
            &m,
        );
        let start = Instant::now();
        let e = dial_error(&up).await;
        let took = start.elapsed();
        match &e {
            ConnectError::HandshakeTimeout { addr: a, after } => {
                assert_eq!(a, &addr);
                assert_eq!(*after, Duration::from_millis(150));
            }
            e => panic!("wrong error: {e}"),
        }
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        // The bound is the configured one, not the default 10 s.
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert!(took < WAIT, "{took:?}");
        assert_eq!(handshakes(&m, "timeout"), 1.0);
    }

    #[tokio::test]
    async fn a_server_with_another_spiffe_id_is_an_identity_mismatch() {
        let db = workload("/ns/demo/sa/db");
        let (addr, mut accepted) = mesh_server(&db, &[b"h2"], vec![Serve::Answer]).await;
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr.to_string(), API, ""), &m);
        match dial_error(&up).await {
            ConnectError::IdentityMismatch(msg) => {
                assert!(msg.contains("/ns/demo/sa/db"), "{msg}");
            }
            e => panic!("wrong error: {e}"),
        }
        assert_eq!(handshakes(&m, "identity_mismatch"), 1.0);
        assert_eq!(handshakes(&m, "ok"), 0.0);
        assert_eq!(open_connections(&m), 0.0);
        // The server never saw a finished handshake.
        assert!(accepted.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_server_of_another_trust_domain_is_refused() {
        let other = Pki::shared("other.keyproof.test");
        let store = IdentityStore::new(other.identity("/ns/demo/sa/api"));
        let (addr, mut accepted) = mesh_server_with(store, &[b"h2"], vec![Serve::Answer]).await;
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr.to_string(), API, ""), &m);
        let e = dial_error(&up).await;
        match &e {
            ConnectError::Handshake { reason, .. } => assert_eq!(*reason, "unknown_ca", "{e}"),
            e => panic!("wrong error: {e}"),
        }
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(handshakes(&m, "unknown_ca"), 1.0);
        assert_eq!(handshakes(&m, "ok"), 0.0);
        assert!(accepted.try_recv().is_err());
    }

    #[tokio::test]
    async fn the_h2_sender_carries_the_servers_id_and_exporter_and_is_reused_while_open() {
        let api = workload("/ns/demo/sa/api");
        let (addr, mut accepted) =
            mesh_server(&api, &[b"h2", b"http/1.1"], vec![Serve::Answer]).await;
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr.to_string(), API, ""), &m);

        let (_, info) = sender(&up).await;
        let first = next(&mut accepted).await;
        assert_eq!(first.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(info.peer_id, api.id);
        assert_ne!(info.exporter, [0u8; 32]);
        assert_eq!(info.exporter, first.exporter);
        assert_eq!(handshakes(&m, "ok"), 1.0);
        assert_eq!(open_connections(&m), 1.0);

        let (_, again) = sender(&up).await;
        assert_eq!(again.conn_id, info.conn_id);
        assert_eq!(again.exporter, info.exporter);
        assert_eq!(handshakes(&m, "ok"), 1.0, "a second connection was dialled");

        // The server closes the connection: the next call dials anew.
        drop(first);
        until_closed(&up.h2).await;
        let (_, fresh) = sender(&up).await;
        let second = next(&mut accepted).await;
        assert_ne!(fresh.conn_id, info.conn_id);
        assert_eq!(fresh.exporter, second.exporter);
        assert_ne!(fresh.exporter, info.exporter);
        assert_eq!(fresh.peer_id, api.id);
        assert_eq!(handshakes(&m, "ok"), 2.0);
    }

    #[tokio::test]
    async fn no_request_goes_on_a_connection_past_its_servers_certificate() {
        let api = workload_for(
            "/ns/demo/sa/api",
            KeyType::EcdsaP256,
            Duration::from_secs(2),
        );
        let (addr, mut accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Answer]).await;
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr.to_string(), API, ""), &m);
        let (_, info) = sender(&up).await;
        let _open = next(&mut accepted).await;
        assert!(up.h2.current().is_some());
        // The server keeps the connection open past its certificate's
        // expiry; the link no longer offers it, and a new dial meets the
        // expired certificate.
        tokio::time::sleep(
            info.not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(
            up.h2.current().is_none(),
            "an expired server's connection is still offered"
        );
        match dial_error(&up).await {
            ConnectError::Handshake { reason, .. } => assert_eq!(reason, "expired"),
            e => panic!("{e}"),
        }
        assert_eq!(handshakes(&m, "expired"), 1.0);
    }

    #[tokio::test]
    async fn a_renewed_certificate_takes_new_requests_to_a_new_connection_at_once() {
        let api = workload("/ns/demo/sa/api");
        let (addr, mut accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Answer]).await;
        let (m, store, up) = with_client(addr);
        let (_, info) = sender(&up).await;
        let _first = next(&mut accepted).await;
        // A bundle refresh that changes neither our certificate nor the
        // roots: the connection stays.
        let held = store.current();
        let usages = [
            keyproof_identity::Usage::ServerAuth,
            keyproof_identity::Usage::ClientAuth,
        ];
        store.replace(
            held.with_bundle(held.verifier.bundle().roots().to_vec(), &usages)
                .expect("same bundle"),
        );
        let (_, same) = sender(&up).await;
        assert_eq!(same.conn_id, info.conn_id);
        // Renewed, far from the old certificate's end: new requests go on a
        // connection presenting the new certificate, so that the server
        // attributes them to it (XFCC, a deny list by serial).
        store.replace(workload("/ns/demo/sa/web").identity());
        assert!(up.h2.current().is_none(), "offered past a renewal");
        let (_, fresh) = sender(&up).await;
        assert_ne!(fresh.conn_id, info.conn_id);
        let _second = next(&mut accepted).await;
        assert_eq!(handshakes(&m, "ok"), 2.0);
        let (_, again) = sender(&up).await;
        assert_eq!(again.conn_id, fresh.conn_id, "the new connection is kept");
    }

    #[tokio::test]
    async fn a_change_of_trusted_roots_takes_new_requests_to_a_new_connection() {
        let api = workload("/ns/demo/sa/api");
        let (addr, mut accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Answer]).await;
        let (m, store, up) = with_client(addr);
        let (_, info) = sender(&up).await;
        let _first = next(&mut accepted).await;
        // Another set of roots: the server is verified again, on a new
        // connection, before a new request goes to it.
        let dir = tempfile::tempdir().expect("tempdir");
        let other = keyproof_ca::ca::Ca::init(
            &dir.path().join("ca"),
            &keyproof_ca::ca::InitOptions {
                trust_domain: keyproof_identity::TrustDomain::parse(crate::testing::TD)
                    .expect("trust domain"),
                key_type: KeyType::EcdsaP256,
                root_ttl: Duration::from_secs(2 * 86_400),
                intermediate_ttl: Duration::from_secs(86_400),
            },
        )
        .expect("another CA");
        let held = store.current();
        let mut roots = held.verifier.bundle().roots().to_vec();
        roots.extend(other.bundle().iter().cloned());
        let usages = [
            keyproof_identity::Usage::ServerAuth,
            keyproof_identity::Usage::ClientAuth,
        ];
        store.replace(held.with_bundle(roots, &usages).expect("wider bundle"));
        assert!(up.h2.current().is_none(), "offered past a change of roots");
        let (_, fresh) = sender(&up).await;
        assert_ne!(fresh.conn_id, info.conn_id);
        let _second = next(&mut accepted).await;
        assert_eq!(handshakes(&m, "ok"), 2.0);
    }

    #[tokio::test]
    async fn connection_ids_differ_across_upstreams() {
        let api = workload("/ns/demo/sa/api");
        let (addr, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Answer]).await;
        let m = Metrics::new().expect("metrics");
        let cfg = outbound_cfg(&addr.to_string(), API, "");
        let (a, b) = (upstream(&cfg, &m), upstream(&cfg, &m));
        let ((_, ia), (_, ib)) = (sender(&a).await, sender(&b).await);
        assert_ne!(ia.conn_id, ib.conn_id);
        assert_ne!(ia.exporter, ib.exporter);
        assert_eq!(open_connections(&m), 2.0);
    }

    #[tokio::test]
    async fn an_upstream_offering_only_http1_is_not_h2_and_its_probe_is_closed() {
        let api = workload("/ns/demo/sa/api");
        let (addr, mut accepted) = mesh_server(&api, &[b"http/1.1"], vec![Serve::Answer]).await;
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr.to_string(), API, ""), &m);
        match up.h2.sender().await {
            Err(ForwardError::NotH2) => {}
            Err(e) => panic!("wrong error: {e:?}"),
            Ok(_) => panic!("an h2 sender on an http/1.1 connection"),
        }
        let probe = next(&mut accepted).await;
        assert_eq!(probe.alpn.as_deref(), Some(&b"http/1.1"[..]));
        // The handshake itself succeeded; the probe connection is gone.
        assert_eq!(handshakes(&m, "ok"), 1.0);
        assert_eq!(open_connections(&m), 0.0);
        assert!(up.h2.current().is_none());
    }

    /// Sends `get()` through the upstream's HTTP/1.1 pool, as the outbound
    /// does.
    async fn h1_get(up: &Upstream) -> Result<StatusCode, String> {
        let req =
            crate::outbound::into_h1(get(), &up.pool_key).map_err(|r| r.status().to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), up.h1.client().request(req)).await {
            Ok(Ok(r)) => Ok(r.status()),
            Ok(Err(e)) => Err(root_cause(&e)),
            Err(_) => Err("timed out".into()),
        }
    }

    #[tokio::test]
    async fn no_request_goes_on_a_pooled_http1_connection_past_its_servers_certificate() {
        let api = workload_for(
            "/ns/demo/sa/api",
            KeyType::EcdsaP256,
            Duration::from_secs(2),
        );
        let (addr, mut accepted) = mesh_server(&api, &[b"http/1.1"], vec![Serve::Answer]).await;
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr.to_string(), API, ""), &m);
        assert_eq!(h1_get(&up).await, Ok(StatusCode::OK));
        assert_eq!(h1_get(&up).await, Ok(StatusCode::OK));
        let first = next(&mut accepted).await;
        assert_eq!(
            first.requests.load(Ordering::SeqCst),
            2,
            "one pooled connection"
        );
        tokio::time::sleep(Duration::from_millis(3100)).await;
        // The pooled connection is still open, but its server's certificate
        // has expired: the request dials anew and meets it.
        let e = h1_get(&up)
            .await
            .expect_err("a request past the server's certificate");
        assert!(e.contains("expired") || e.contains("Expired"), "{e}");
        assert_eq!(
            first.requests.load(Ordering::SeqCst),
            2,
            "sent on the expired connection"
        );
        assert_eq!(handshakes(&m, "expired"), 1.0);
    }

    #[tokio::test]
    async fn a_renewed_certificate_takes_http1_requests_to_a_new_connection_at_once() {
        let api = workload("/ns/demo/sa/api");
        let (addr, mut accepted) = mesh_server(&api, &[b"http/1.1"], vec![Serve::Answer]).await;
        let (m, store, up) = with_client(addr);
        assert_eq!(h1_get(&up).await, Ok(StatusCode::OK));
        let old = next(&mut accepted).await;
        assert_eq!(h1_get(&up).await, Ok(StatusCode::OK));
        assert_eq!(old.requests.load(Ordering::SeqCst), 2);
        // Renewed: the next request goes on a new connection presenting the
        // new certificate.
        store.replace(workload("/ns/demo/sa/web").identity());
        assert_eq!(h1_get(&up).await, Ok(StatusCode::OK));
        let new = next(&mut accepted).await;
        assert_eq!(old.requests.load(Ordering::SeqCst), 2);
        assert_eq!(new.requests.load(Ordering::SeqCst), 1);
        assert_eq!(h1_get(&up).await, Ok(StatusCode::OK));
        assert_eq!(
            new.requests.load(Ordering::SeqCst),
            2,
            "the new connection is kept"
        );
        assert_eq!(handshakes(&m, "ok"), 2.0);
    }

    #[tokio::test]
    async fn a_request_refused_unsent_by_a_closing_connection_is_retried_once_on_a_fresh_one() {
        let api = workload("/ns/demo/sa/api");
        let (addr, mut accepted) =
            mesh_server(&api, &[b"h2"], vec![Serve::GoAwayAtOnce, Serve::Answer]).await;
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr.to_string(), API, ""), &m);
        let (send, info) = sender(&up).await;
        let first = next(&mut accepted).await;
        // The GOAWAY has arrived and the connection is over before the
        // request is tried on it: the outcome does not depend on timing.
        until_closed(&up.h2).await;
        let resp = match send_h2(&up.h2, send, info.clone(), get()).await {
            Ok(r) => r,
            Err(e) => panic!("not retried: {e:?}"),
        };
        assert_eq!(resp.status(), StatusCode::OK);
        let second = next(&mut accepted).await;
        assert_eq!(first.requests.load(Ordering::SeqCst), 0);
        assert_eq!(second.requests.load(Ordering::SeqCst), 1);
        let used = resp
            .extensions()
            .get::<Arc<MeshConnInfo>>()
            .expect("the connection's info on the response");
        assert_ne!(used.conn_id, info.conn_id);
        assert_eq!(used.exporter, second.exporter);
    }

    #[tokio::test]
    async fn a_request_the_upstream_reset_after_it_was_sent_is_not_retried() {
        let api = workload("/ns/demo/sa/api");
        let (addr, mut accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Reset]).await;
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr.to_string(), API, ""), &m);
        let (send, info) = sender(&up).await;
        let first = next(&mut accepted).await;
        match send_h2(&up.h2, send, info, get()).await {
            Err(ForwardError::Upstream(msg)) => assert!(!msg.is_empty()),
            Err(e) => panic!("wrong error: {e:?}"),
            Ok(r) => panic!("answered {}", r.status()),
        }
        assert_eq!(first.requests.load(Ordering::SeqCst), 1);
        // Dials are counted as they finish, before any request goes out.
        assert_eq!(handshakes(&m, "ok"), 1.0, "retried on a new connection");
        assert!(accepted.try_recv().is_err(), "retried on a new connection");
    }

    #[tokio::test]
    async fn a_request_the_fresh_connection_refuses_too_is_not_retried_again() {
        let api = workload("/ns/demo/sa/api");
        let (addr, mut accepted) = mesh_server(&api, &[b"h2"], vec![Serve::GoAwayAtOnce]).await;
        let m = Metrics::new().expect("metrics");
        let up = upstream(&outbound_cfg(&addr.to_string(), API, ""), &m);
        let (send, info) = sender(&up).await;
        let first = next(&mut accepted).await;
        until_closed(&up.h2).await;
        // Unsent, or sent and left out of the GOAWAY: unprocessed either
        // way, and not sent a third time.
        match send_h2(&up.h2, send, info, get()).await {
            Err(ForwardError::Unprocessed(Unprocessed::GoneAway, msg)) => assert!(!msg.is_empty()),
            Err(e) => panic!("wrong error: {e:?}"),
            Ok(r) => panic!("answered {}", r.status()),
        }
        let second = next(&mut accepted).await;
        assert_eq!(first.requests.load(Ordering::SeqCst), 0);
        assert_eq!(second.requests.load(Ordering::SeqCst), 0);
        assert_eq!(
            handshakes(&m, "ok"),
            2.0,
            "one retry, on one fresh connection"
        );
    }
}
