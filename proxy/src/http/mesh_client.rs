//! The outbound's HTTP/2 client on a mesh connection, on the `h2` crate
//! directly.
//!
//! hyper's HTTP/2 client hands every request through a channel to the
//! connection's task, spawns a task per request to wait for its response,
//! and answers through a oneshot: about a tenth of the outbound's CPU per
//! request. Here the request's own future opens the stream and awaits the
//! response; only a request whose body is still streaming gets a task, to
//! pump it under HTTP/2 flow control.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use keyproof_identity::SpiffeId;

use crate::http::frame_guard::{Budget, FrameGuard, PeerAddr, Side};
use crate::http::h2_stream::{
    pipe, pump_tunnel, MeshBody, TunnelEnd, MAX_FRAME_SIZE, STALLED_STREAMS,
};
use crate::http::traits::SendBody;

/// A stream's window is hyper's default, room for large bodies without
/// waiting on window updates; the connection's outlasts
/// [`STALLED_STREAMS`] streams whose apps stopped reading.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONN_WINDOW: u32 = STREAM_WINDOW * STALLED_STREAMS;
/// While requests flow, a PING this often; no PONG in `PING_TIMEOUT` and the
/// connection is closed (a peer gone without a FIN).
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The sending half of one HTTP/2 mesh connection; cheap to clone.
#[derive(Clone)]
pub struct MeshSender {
    send: h2::client::SendRequest<Bytes>,
    shared: Arc<Shared>,
}

struct Shared {
    closed: AtomicBool,
    /// Requests sent so far: the PING task compares it between ticks to
    /// tell whether the connection is in use (a count, not a clock read per
    /// request).
    sent: AtomicU64,
    /// Tunnels open on the connection: each holds a stream for its whole
    /// life.
    tunnels: AtomicUsize,
}

/// A request the connection refused before anything of it was sent (the
/// connection was closing), handed back for a retry elsewhere; or why the
/// exchange failed.
pub struct TrySendError<B> {
    /// The request, if it was never sent.
    pub unsent: Option<Request<B>>,
    /// What went wrong.
    pub error: h2::Error,
}

/// Why the peer did not process a stream: the request can be sent again
/// as it is, on another connection (RFC 9113 sections 8.7 and 6.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unprocessed {
    /// `REFUSED_STREAM`: the peer is short of memory or streams for now,
    /// so a retry waits a little (or its app is not listening: a keyproof
    /// inbound then also ends the connection, so the retry dials anew).
    Refused,
    /// The stream's id is above the last one the peer's GOAWAY said it
    /// processes: the connection is closing, and a fresh one can take
    /// the request at once.
    GoneAway,
}

/// Whether `e`, a stream's error, says the peer never processed the
/// stream. A GOAWAY the peer sent fails only the streams above its last
/// stream id this way: those it cut later, once processed, end with an
/// I/O error instead, and a GOAWAY of our own is not the peer's.
pub fn unprocessed(e: &h2::Error) -> Option<Unprocessed> {
    if !e.is_remote() {
        None
    } else if e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Some(Unprocessed::Refused)
    } else if e.is_go_away() {
        Some(Unprocessed::GoneAway)
    } else {
        None
    }
}

/// A stream cut by the peer's GOAWAY: nothing more goes on its connection,
/// even before the connection's task notices.
fn mark_if_going_away(e: &h2::Error, shared: &Shared) {
    if unprocessed(e) == Some(Unprocessed::GoneAway) {
        shared.closed.store(true, Ordering::Relaxed);
    }
}

/// Called when a connection ends on a TLS alert by which the peer refuses
/// our certificate. In TLS 1.3 the client finishes its handshake before the
/// server has checked the client's certificate: the server's verdict comes
/// as an alert on the first read, after the dial was counted a success.
pub type OnRefused = Box<dyn FnOnce() + Send>;

/// Whether `e`, a connection's end, is an alert by which the peer refused
/// our certificate (or our possession of its key).
pub fn refused_our_certificate(e: &h2::Error) -> bool {
    let Some(io) = e.get_io() else {
        return false;
    };
    // h2 keeps an I/O error's kind and message only (not the rustls error
    // to downcast to): rustls's message for an alert received is
    // "received fatal alert: <description>".
    let message = io.to_string();
    REFUSALS
        .iter()
        .any(|a| message.contains(&rustls::Error::AlertReceived(*a).to_string()))
}

/// The TLS alerts by which a peer refuses our certificate (or our proof of
/// possession of its key), rather than the connection.
const REFUSALS: [rustls::AlertDescription; 9] = {
    use rustls::AlertDescription as A;
    [
        A::BadCertificate,
        A::UnsupportedCertificate,
        A::CertificateRevoked,
        A::CertificateExpired,
        A::CertificateUnknown,
        A::UnknownCA,
        A::AccessDenied,
        A::DecryptError,
        A::CertificateRequired,
    ]
};

/// Whether `alert`, received from the peer, refuses our certificate.
pub fn refuses_our_certificate(alert: rustls::AlertDescription) -> bool {
    REFUSALS.contains(&alert)
}

impl MeshSender {
    /// Performs the HTTP/2 handshake on `io` and spawns the task that drives
    /// the connection (and keeps it alive with PINGs while it is used).
    pub async fn handshake<T>(io: T, max_header_bytes: u32) -> Result<MeshSender, h2::Error>
    where
        T: AsyncRead + AsyncWrite + PeerAddr + Unpin + Send + 'static,
    {
        Self::handshake_reporting(io, max_header_bytes, None).await
    }

    /// [`MeshSender::handshake`], calling `refused` if the connection ends
    /// because the peer refused our certificate.
    pub async fn handshake_reporting<T>(
        io: T,
        max_header_bytes: u32,
        refused: Option<OnRefused>,
    ) -> Result<MeshSender, h2::Error>
    where
        T: AsyncRead + AsyncWrite + PeerAddr + Unpin + Send + 'static,
    {
        // An upstream could flood the connection as a caller could the
        // inbound: its reads fail once over budget.
        let io = FrameGuard::with_peer(io, Side::Client, Budget::DEFAULT);
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_header_list_size(max_header_bytes)
            .max_frame_size(MAX_FRAME_SIZE)
            // h2's default, less under a memory limit: an upstream that
            // stops reading holds this much of each upload.
            .max_send_buffer_size(crate::memory::send_buffer())
            // Until the peer's SETTINGS arrive, assume the inbound's default
            // stream limit: a burst at connection setup then queues here
            // instead of being refused (REFUSED_STREAM) beyond the limit.
            .initial_max_send_streams(100)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let shared = Arc::new(Shared {
            closed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            tunnels: AtomicUsize::new(0),
        });
        let ping = conn.ping_pong();
        tokio::spawn(drive(conn, ping, shared.clone(), refused));
        Ok(MeshSender { send, shared })
    }

    /// Whether the connection has ended (new requests need a new one).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Whether one more tunnel fits: tunnels may take three quarters of the
    /// peer's concurrent streams, the rest stays for requests. Beyond it, a
    /// new `CONNECT` would wait in h2's queue until another tunnel ends,
    /// which may be never.
    pub fn has_tunnel_room(&self) -> bool {
        let max = self.send.current_max_send_streams();
        self.shared.tunnels.load(Ordering::Relaxed) < max - max / 4
    }

    /// Whether `self` and `other` send on the same connection.
    pub fn same_connection(&self, other: &MeshSender) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Sends `req` (HTTP/2 form: scheme and authority in the URI) and waits
    /// for the response head. Takes the sender by value: each request gets
    /// its clone from the connection holder once, and this is where it is
    /// used up.
    pub async fn try_send<B: SendBody>(
        self,
        req: Request<B>,
    ) -> Result<Response<MeshBody>, TrySendError<B>> {
        let MeshSender { send, shared } = self;
        let send = match send.ready().await {
            Ok(s) => s,
            Err(error) => {
                // GOAWAY or a broken connection: the driving task may not
                // have ended yet, but nothing more goes on this connection.
                shared.closed.store(true, Ordering::Relaxed);
                return Err(TrySendError {
                    unsent: Some(req),
                    error,
                });
            }
        };
        let head = MeshSender { send, shared }
            .send_now(req)
            .map_err(|error| TrySendError {
                unsent: None,
                error,
            })?;
        head.await.map_err(|error| TrySendError {
            unsent: None,
            error,
        })
    }

    /// Sends `req` at once when the connection can open a stream without
    /// waiting, which is the common case: the returned future then only
    /// awaits the response head, and is small, since it is moved into place
    /// per request. [`Start::Wait`] hands everything back for
    /// [`MeshSender::try_send`].
    pub fn start<B: SendBody>(mut self, req: Request<B>) -> Start<B> {
        // A fresh clone has no stream of its own pending, so readiness only
        // reflects the connection's state: no wake-up is needed from here.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.send.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => match self.send_now(req) {
                Ok(head) => Start::Sent(head),
                Err(error) => Start::Failed(TrySendError {
                    unsent: None,
                    error,
                }),
            },
            Poll::Ready(Err(error)) => {
                self.shared.closed.store(true, Ordering::Relaxed);
                Start::Failed(TrySendError {
                    unsent: Some(req),
                    error,
                })
            }
            Poll::Pending => Start::Wait(self, req),
        }
    }

    /// Opens the stream on a ready sender: the head goes out now, a body
    /// still to come is pumped by a task of its own. The request is used up
    /// either way.
    fn send_now<B: SendBody>(self, req: Request<B>) -> Result<ResponseHeadFuture, h2::Error> {
        let MeshSender { mut send, shared } = self;
        let (mut parts, body) = req.into_parts();
        if let Some(len) = body.size_hint().exact() {
            // As hyper does: a known length is announced, except a zero one
            // on methods without payload semantics.
            if (len != 0 || !matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE))
                && !parts.headers.contains_key(header::CONTENT_LENGTH)
            {
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        let eos = body.is_end_stream();
        let head = Request::from_parts(parts, ());
        shared.sent.fetch_add(1, Ordering::Relaxed);
        let (response, stream) = match send.send_request(head, eos) {
            Ok(r) => r,
            Err(error) => {
                // Not for a malformed request (a user error): a local app
                // must not be able to make the sidecar redial at will.
                if error.is_go_away() || error.is_io() {
                    shared.closed.store(true, Ordering::Relaxed);
                }
                return Err(error);
            }
        };
        if !eos {
            // Only a request with a body still to send costs a task.
            tokio::spawn(pipe(body, stream));
        }
        Ok(ResponseHeadFuture { response, shared })
    }
}

impl MeshSender {
    /// Opens an HTTP/2 `CONNECT` tunnel to `authority` (`ip:port`) on this
    /// connection and waits for the peer's answer: a 2xx opens the tunnel,
    /// anything else is [`TunnelError::Refused`].
    pub async fn connect(self, authority: &str) -> Result<Tunnel, TunnelError> {
        let MeshSender { send, shared } = self;
        let mut send = ready(send, &shared).await?;
        let uri = http::Uri::builder()
            .authority(authority)
            .build()
            .map_err(|_| TunnelError::Authority(authority.to_owned()))?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(uri)
            .body(())
            .map_err(|_| TunnelError::Authority(authority.to_owned()))?;
        let (resp, tunnel) = open(&mut send, &shared, req).await?;
        if !resp.status().is_success() {
            return Err(TunnelError::Refused(resp.status()));
        }
        Ok(tunnel)
    }
}

/// A sender that can open a stream now; a connection that cannot is done
/// with.
async fn ready(
    send: h2::client::SendRequest<Bytes>,
    shared: &Shared,
) -> Result<h2::client::SendRequest<Bytes>, TunnelError> {
    send.ready().await.map_err(|e| {
        shared.closed.store(true, Ordering::Relaxed);
        TunnelError::H2(e)
    })
}

/// Sends a `CONNECT` head and waits for the answer: its head, and the
/// stream as a tunnel (the answer's body is the tunnel's receiving half).
async fn open(
    send: &mut h2::client::SendRequest<Bytes>,
    shared: &Arc<Shared>,
    req: Request<()>,
) -> Result<(Response<()>, Tunnel), TunnelError> {
    shared.sent.fetch_add(1, Ordering::Relaxed);
    let slot = TunnelSlot::take(shared);
    let (response, stream) = send.send_request(req, false).map_err(|e| {
        if e.is_go_away() || e.is_io() {
            shared.closed.store(true, Ordering::Relaxed);
        }
        TunnelError::H2(e)
    })?;
    let (head, recv) = response
        .await
        .map_err(|e| {
            mark_if_going_away(&e, shared);
            TunnelError::H2(e)
        })?
        .into_parts();
    let tunnel = Tunnel {
        send: stream,
        recv,
        _slot: slot,
    };
    Ok((Response::from_parts(head, ()), tunnel))
}

/// The peer's SETTINGS, which say whether it takes extended `CONNECT`,
/// arrive one round trip after a connection is dialled: a request to
/// switch protocols on a fresh connection waits this long for them.
const SETTINGS_WAIT: Duration = Duration::from_millis(500);

/// What became of a request to switch protocols.
pub enum Switched {
    /// A 2xx: the stream carries the new protocol from here. The head's
    /// fields (say, `sec-websocket-accept`) are the app's answer.
    Open(http::response::Parts, Tunnel),
    /// Anything else: an HTTP answer, to be passed on as one.
    Answered(Response<MeshBody>),
}

impl MeshSender {
    /// Sends `req` as an extended `CONNECT` (RFC 8441) for `protocol`
    /// (`websocket`, say): `req`'s method becomes `CONNECT` and its path
    /// stays, so that the peer's policy decides on it as on any request.
    pub async fn switch_protocol(
        self,
        mut req: Request<()>,
        protocol: &str,
    ) -> Result<Switched, TunnelError> {
        let MeshSender { send, shared } = self;
        let mut send = ready(send, &shared).await?;
        let deadline = tokio::time::Instant::now() + SETTINGS_WAIT;
        while !send.is_extended_connect_protocol_enabled() {
            if tokio::time::Instant::now() >= deadline || shared.closed.load(Ordering::Relaxed) {
                return Err(TunnelError::NoExtendedConnect);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *req.method_mut() = Method::CONNECT;
        req.extensions_mut()
            .insert(h2::ext::Protocol::from(protocol));
        let (resp, tunnel) = open(&mut send, &shared, req).await?;
        let (parts, ()) = resp.into_parts();
        if !parts.status.is_success() {
            // The stream's sending half goes with the tunnel: a reset once
            // the answer has been read, as for any request given up on.
            let body = MeshBody::new(tunnel.recv, &parts.headers);
            return Ok(Switched::Answered(Response::from_parts(parts, body)));
        }
        Ok(Switched::Open(parts, tunnel))
    }
}

/// Why a `CONNECT` tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The authority is not `host:port`.
    #[error("invalid tunnel authority {0:?}")]
    Authority(String),
    /// The HTTP/2 exchange failed.
    #[error("HTTP/2: {0}")]
    H2(h2::Error),
    /// The peer answered with this status instead of opening the tunnel.
    #[error("the peer refused the tunnel with status {0}")]
    Refused(http::StatusCode),
    /// The peer does not take extended `CONNECT` (RFC 8441), so no
    /// protocol switch can be carried to it.
    #[error(
        "the peer does not accept extended CONNECT (RFC 8441 SETTINGS_ENABLE_CONNECT_PROTOCOL)"
    )]
    NoExtendedConnect,
}

impl TunnelError {
    /// Whether the peer did not process the stream (see [`unprocessed`]):
    /// always safe to retry on another connection.
    pub fn is_unprocessed(&self) -> bool {
        matches!(self, TunnelError::H2(e) if unprocessed(e).is_some())
    }
}

/// A tunnel's count on its connection, for as long as it lives.
struct TunnelSlot(Arc<Shared>);

impl TunnelSlot {
    fn take(shared: &Arc<Shared>) -> TunnelSlot {
        shared.tunnels.fetch_add(1, Ordering::Relaxed);
        TunnelSlot(shared.clone())
    }
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.0.tunnels.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open `CONNECT` stream, to be pumped to and from a TCP connection.
pub struct Tunnel {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    _slot: TunnelSlot,
}

impl Tunnel {
    /// Pumps bytes both ways until both have ended, or nothing crossed for
    /// `idle`: [`pump_tunnel`], holding the peer's END_STREAM for
    /// [`FIN_GRACE`] while the local side still sends.
    pub async fn pump<R, W>(self, rd: R, wr: W, idle: Duration) -> TunnelEnd
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Tunnel { send, recv, _slot } = self;
        pump_tunnel(send, recv, rd, wr, idle, FIN_GRACE, std::future::pending()).await
    }
}

/// How long the end of the peer's data waits for a reset that may follow
/// it before it reaches the local side as a FIN. An inbound that answers
/// an app's reset with END_STREAM then RST_STREAM (one on hyper's upgraded
/// stream, which has no bare reset) would otherwise show the app here a
/// clean end of a truncated stream before the reset. keyproof's own
/// inbound resets bare; the grace stays for peers that do not.
const FIN_GRACE: Duration = Duration::from_millis(20);

/// What [`MeshSender::start`] did.
pub enum Start<B> {
    /// The request is on its way: await its response head.
    Sent(ResponseHeadFuture),
    /// The connection cannot open a stream yet: wait with `try_send`.
    Wait(MeshSender, Request<B>),
    /// The connection refused the request (see [`TrySendError::unsent`]).
    Failed(TrySendError<B>),
}

/// The response head of a request sent on a mesh connection.
pub struct ResponseHeadFuture {
    response: h2::client::ResponseFuture,
    shared: Arc<Shared>,
}

impl Future for ResponseHeadFuture {
    type Output = Result<Response<MeshBody>, h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = ready!(Pin::new(&mut self.response).poll(cx)).inspect_err(|e| {
            mark_if_going_away(e, &self.shared);
        })?;
        let (parts, recv) = resp.into_parts();
        let body = MeshBody::new(recv, &parts.headers);
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}

/// Drives the connection until it ends; PINGs while it is in use.
async fn drive(
    mut conn: h2::client::Connection<impl AsyncRead + AsyncWrite + Unpin, Bytes>,
    ping: Option<h2::PingPong>,
    shared: Arc<Shared>,
    refused: Option<OnRefused>,
) {
    let mut tick = tokio::time::interval(PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut ping = ping;
    let mut sent_at_last_tick = 0;
    let result = loop {
        tokio::select! {
            r = &mut conn => break r,
            _ = tick.tick() => {
                let sent = shared.sent.load(Ordering::Relaxed);
                let used = sent != sent_at_last_tick;
                sent_at_last_tick = sent;
                let Some(p) = ping.as_mut().filter(|_| used) else { continue };
                // The PONG arrives only while the connection is driven.
                let pong = tokio::time::timeout(PING_TIMEOUT, p.ping(h2::Ping::opaque()));
                tokio::pin!(pong);
                let alive = tokio::select! {
                    r = &mut conn => Err(r),
                    r = &mut pong => Ok(matches!(r, Ok(Ok(_)))),
                };
                match alive {
                    Err(r) => break r,
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!("outbound h2 connection: no PONG within {PING_TIMEOUT:?}; closing");
                        break Ok(());
                    }
                }
            }
        }
    };
    shared.closed.store(true, Ordering::Relaxed);
    if let Err(e) = result {
        if refused_our_certificate(&e) {
            tracing::warn!(error = %e, "outbound mesh connection refused by the peer after the handshake: it does not accept our certificate");
            if let Some(count) = refused {
                count();
            }
        } else {
            tracing::debug!(error = %e, "outbound h2 connection closed");
        }
    }
}

/// Facts about one mesh connection, attached to every response received on
/// it (`response.extensions().get::<Arc<MeshConnInfo>>()`; behind an `Arc`
/// so that tagging every response costs a reference count, not a copy of
/// the peer id).
#[derive(Debug)]
pub struct MeshConnInfo {
    /// The verified server's SPIFFE ID.
    pub peer_id: SpiffeId,
    /// The 32-byte TLS exporter of the connection.
    pub exporter: [u8; 32],
    /// A process-unique connection number (for per-connection nonce reuse).
    pub conn_id: u64,
    /// When the server's certificate stops being valid: no new request
    /// goes on the connection after it, as a new handshake would fail.
    pub not_after: std::time::SystemTime,
    /// [`IdentityStore::identity_generation`](crate::identity::store::IdentityStore::identity_generation)
    /// read before the handshake: once our certificate or our roots
    /// change, new requests go on a new connection.
    pub identity_generation: u64,
}

/// A live mesh connection: its sender and what is known about it.
pub type MeshConn = (MeshSender, Arc<MeshConnInfo>);

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use h2::server::SendResponse;
    use h2::RecvStream;
    use http::HeaderMap;
    use http_body::Body;
    use http_body_util::{BodyExt, Empty, Full};
    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::http::traits::test_body::{data, trailers, TestBody};

    const WAIT: Duration = Duration::from_secs(2);
    /// An idle timeout no test reaches unless it means to.
    const IDLE: Duration = Duration::from_secs(60);

    /// How the test ends the server's side of the connection.
    enum Stop {
        GoAway,
        Drop,
    }

    /// What the server received on a stream.
    #[derive(Debug)]
    struct Got {
        headers: HeaderMap,
        body: Result<(Vec<u8>, Option<HeaderMap>), h2::Error>,
    }

    async fn read_all(body: &mut RecvStream) -> Result<(Vec<u8>, Option<HeaderMap>), h2::Error> {
        let mut out = Vec::new();
        while let Some(d) = body.data().await {
            let d = d?;
            let _ = body.flow_control().release_capacity(d.len());
            out.extend_from_slice(&d);
        }
        Ok((out, body.trailers().await?))
    }

    /// A mesh connection to an `h2` server on an in-memory pipe, whose
    /// streams `handler` answers.
    async fn connect<F, Fut>(handler: F) -> (MeshSender, oneshot::Sender<Stop>)
    where
        F: Fn(http::Request<RecvStream>, SendResponse<Bytes>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (cli, srv) = tokio::io::duplex(1 << 20);
        let (stop_tx, mut stop) = oneshot::channel();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(srv).await.expect("server handshake");
            loop {
                tokio::select! {
                    s = &mut stop => match s {
                        Ok(Stop::GoAway) => {
                            conn.graceful_shutdown();
                            while let Some(Ok(_)) = conn.accept().await {}
                            return;
                        }
                        Ok(Stop::Drop) | Err(_) => return,
                    },
                    r = conn.accept() => match r {
                        Some(Ok((req, respond))) => {
                            tokio::spawn(handler(req, respond));
                        }
                        _ => return,
                    },
                }
            }
        });
        let sender = MeshSender::handshake(cli, 16 * 1024)
            .await
            .expect("client handshake");
        (sender, stop_tx)
    }

    /// Reports what each stream carried on `got`, and answers "pong" with
    /// `content-length` and a trailer.
    fn recording(
        got: mpsc::UnboundedSender<Got>,
    ) -> impl Fn(
        http::Request<RecvStream>,
        SendResponse<Bytes>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>
           + Send
           + 'static {
        move |req, mut respond| {
            let got = got.clone();
            Box::pin(async move {
                let (parts, mut body) = req.into_parts();
                let body = read_all(&mut body).await;
                let failed = body.is_err();
                let _ = got.send(Got {
                    headers: parts.headers,
                    body,
                });
                if failed {
                    return;
                }
                let resp = http::Response::builder()
                    .header("content-length", "4")
                    .body(())
                    .unwrap();
                let mut stream = respond.send_response(resp, false).unwrap();
                stream
                    .send_data(Bytes::from_static(b"pong"), false)
                    .unwrap();
                let mut t = HeaderMap::new();
                t.insert("grpc-status", HeaderValue::from_static("0"));
                stream.send_trailers(t).unwrap();
            })
        }
    }

    fn request<B>(method: Method, body: B) -> Request<B> {
        Request::builder()
            .method(method)
            .uri("https://peer.example/path")
            .body(body)
            .unwrap()
    }

    async fn send<B: SendBody>(
        s: &MeshSender,
        req: Request<B>,
    ) -> Result<Response<MeshBody>, TrySendError<B>> {
        tokio::time::timeout(WAIT, s.clone().try_send(req))
            .await
            .expect("no response head")
    }

    #[tokio::test]
    async fn data_and_trailers_go_both_ways() {
        let (tx, mut got) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(recording(tx)).await;
        let body = TestBody::steps(
            vec![data("pi"), data("ng"), trailers(&[("x-req-trailer", "1")])],
            None,
        );
        let resp = send(&mesh, request(Method::POST, body)).await.ok().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body().size_hint().exact(), Some(4));
        let c = resp.into_body().collect().await.unwrap();
        assert_eq!(c.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(c.to_bytes(), "pong");
        let g = got.recv().await.unwrap();
        let (body, t) = g.body.unwrap();
        assert_eq!(body, b"ping");
        assert_eq!(t.unwrap()["x-req-trailer"], "1");
    }

    #[tokio::test]
    async fn the_response_body_counts_down_its_content_length() {
        let (tx, _got) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(recording(tx)).await;
        let resp = send(&mesh, request(Method::GET, Empty::<Bytes>::new()))
            .await
            .ok()
            .unwrap();
        let mut body = resp.into_body();
        assert_eq!(body.size_hint().exact(), Some(4));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "pong");
        assert_eq!(body.size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn a_known_body_size_is_announced_as_content_length() {
        let (tx, mut got) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(recording(tx)).await;
        let full = || Full::new(Bytes::from_static(b"hello"));
        send(&mesh, request(Method::POST, full()))
            .await
            .ok()
            .unwrap();
        send(&mesh, request(Method::GET, Empty::<Bytes>::new()))
            .await
            .ok()
            .unwrap();
        send(&mesh, request(Method::POST, Empty::<Bytes>::new()))
            .await
            .ok()
            .unwrap();
        let stream = TestBody::steps(vec![data("abc")], None);
        send(&mesh, request(Method::POST, stream))
            .await
            .ok()
            .unwrap();
        let mut own = request(Method::POST, full());
        own.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        send(&mesh, own).await.ok().unwrap();
        let mut lengths = Vec::new();
        for _ in 0..5 {
            let g = got.recv().await.unwrap();
            let all: Vec<_> = g
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .cloned()
                .collect();
            lengths.push(all);
        }
        let want: [&[&str]; 5] = [&["5"], &[], &["0"], &[], &["5"]];
        for (got, want) in lengths.iter().zip(want) {
            assert_eq!(got, want);
        }
    }

    #[tokio::test]
    async fn a_request_body_larger_than_the_peer_window_is_sent_whole() {
        let (tx, mut got) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(recording(tx)).await;
        let big = Bytes::from(vec![b'x'; 300_000]);
        let body = TestBody::steps(vec![Ok(http_body::Frame::data(big)), data("end")], None);
        send(&mesh, request(Method::POST, body)).await.ok().unwrap();
        let (body, _) = got.recv().await.unwrap().body.unwrap();
        assert_eq!(body.len(), 300_003);
        assert!(body.ends_with(b"xend"));
    }

    #[tokio::test]
    async fn a_request_body_that_fails_resets_the_stream() {
        let (tx, mut got) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(recording(tx)).await;
        let body = TestBody::steps(vec![data("part"), Err("broken".to_owned())], None);
        let e = send(&mesh, request(Method::POST, body))
            .await
            .expect_err("reset");
        assert!(e.unsent.is_none(), "the request was sent");
        let g = tokio::time::timeout(WAIT, got.recv())
            .await
            .unwrap()
            .unwrap();
        let e = g.body.expect_err("the server saw the reset");
        assert_eq!(e.reason(), Some(h2::Reason::INTERNAL_ERROR), "{e}");
        assert!(
            !mesh.is_closed(),
            "a stream reset is not the connection's end"
        );
    }

    #[tokio::test]
    async fn a_body_the_peer_reset_is_no_longer_read() {
        // The server answers and resets the stream without reading the
        // body, which would otherwise wait for ever. The reset goes once
        // the client has the head: queued with it, it would fail the
        // response too.
        let head_read = Arc::new(tokio::sync::Notify::new());
        let go = head_read.clone();
        let answer_and_reset =
            move |_req: http::Request<RecvStream>, mut respond: SendResponse<Bytes>| {
                let go = go.clone();
                async move {
                    let resp = http::Response::builder().status(413).body(()).unwrap();
                    let _ = respond.send_response(resp, true);
                    go.notified().await;
                    respond.send_reset(h2::Reason::NO_ERROR);
                }
            };
        let (mesh, _stop) = connect(answer_and_reset).await;
        let (feed, body) = TestBody::channel(None);
        feed.send(data("start")).unwrap();
        let dropped = body.dropped.clone();
        let resp = send(&mesh, request(Method::POST, body)).await.ok().unwrap();
        assert_eq!(resp.status(), 413);
        head_read.notify_one();
        let t = tokio::time::timeout(WAIT, async {
            while !dropped.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        t.await.expect("the body is still held after the reset");
        drop(feed);
    }

    #[tokio::test]
    async fn start_sends_at_once_on_a_ready_connection() {
        let (tx, mut got) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(recording(tx)).await;
        let req = request(Method::POST, Full::new(Bytes::from_static(b"now")));
        let Start::Sent(head) = mesh.clone().start(req) else {
            panic!("a fresh connection can open a stream");
        };
        let resp = tokio::time::timeout(WAIT, head).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(got.recv().await.unwrap().body.unwrap().0, b"now");
    }

    #[tokio::test]
    async fn a_malformed_request_fails_without_closing_the_connection() {
        let (tx, _got) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(recording(tx)).await;
        let mut req = request(Method::GET, Empty::<Bytes>::new());
        // Connection-specific: HTTP/2 refuses to carry it.
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        match mesh.clone().start(req) {
            Start::Failed(e) => assert!(e.unsent.is_none()),
            _ => panic!("sent a connection-specific field"),
        }
        assert!(!mesh.is_closed());
        let resp = send(&mesh, request(Method::GET, Empty::<Bytes>::new())).await;
        assert_eq!(resp.ok().unwrap().status(), 200);
    }

    #[tokio::test]
    async fn a_closed_connection_hands_the_request_back_unsent() {
        for stop in [Stop::Drop, Stop::GoAway] {
            let (tx, _got) = mpsc::unbounded_channel();
            let (mesh, stopper) = connect(recording(tx)).await;
            assert!(!mesh.is_closed());
            let _ = stopper.send(stop);
            tokio::time::timeout(WAIT, async {
                while !mesh.is_closed() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the connection's end was not noticed");
            let req = request(Method::POST, Full::new(Bytes::from_static(b"again")));
            match mesh.clone().start(req) {
                Start::Failed(e) => {
                    let unsent = e.unsent.expect("handed back for a retry");
                    assert_eq!(unsent.uri(), "https://peer.example/path");
                }
                Start::Sent(_) => panic!("sent on a closed connection"),
                Start::Wait(..) => panic!("waits on a closed connection"),
            }
            let req = request(Method::GET, Empty::<Bytes>::new());
            let e = send(&mesh, req).await.expect_err("closed");
            assert!(e.unsent.is_some());
        }
    }

    #[tokio::test]
    async fn only_streams_above_the_peers_goaway_are_unprocessed() {
        const NO_ERROR: u32 = 0x0;
        const PROTOCOL_ERROR: u32 = 0x1;
        // Two streams in flight (ids 1 and 3); the peer's GOAWAY says it
        // processes stream 1 and nothing above, then its side ends before
        // stream 1 is answered.
        for (reason, tunnel) in [(NO_ERROR, false), (PROTOCOL_ERROR, false), (NO_ERROR, true)] {
            let (cli, srv) = tokio::io::duplex(1 << 16);
            let heads = Arc::new(AtomicUsize::new(0));
            tokio::spawn(crate::testing::h2_going_away(srv, 2, 1, reason, heads));
            let mesh = MeshSender::handshake(cli, 16 * 1024)
                .await
                .expect("handshake");
            let first = send(&mesh, request(Method::GET, Empty::<Bytes>::new()));
            let (first, second) = if tunnel {
                let second = tokio::time::timeout(WAIT, mesh.clone().connect("10.0.0.1:5432"));
                let (first, second) = tokio::join!(first, second);
                let second = second.expect("no answer").map(drop).expect_err("gone away");
                assert!(second.is_unprocessed(), "{second:?}");
                (first, None)
            } else {
                let second = send(&mesh, request(Method::POST, Full::new(Bytes::from("b"))));
                let (first, second) = tokio::join!(first, second);
                (first, Some(second))
            };
            let processed = first.map(drop).expect_err("cut").error;
            assert_eq!(unprocessed(&processed), None, "{reason}: {processed:?}");
            if let Some(second) = second {
                let above = second.map(drop).expect_err("gone away");
                assert!(above.unsent.is_none(), "it was sent");
                assert_eq!(
                    unprocessed(&above.error),
                    Some(Unprocessed::GoneAway),
                    "{reason}: {:?}",
                    above.error
                );
            }
            assert!(
                mesh.is_closed(),
                "nothing more goes on a closing connection"
            );
        }
    }

    /// A `CONNECT` handler: answers `status`; on 200 echoes the stream
    /// under flow control (window given back only once echoed) and ends
    /// its side when the client ends its own.
    fn echo_tunnel(
        status: u16,
        authority: mpsc::UnboundedSender<String>,
    ) -> impl Fn(
        http::Request<RecvStream>,
        SendResponse<Bytes>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>
           + Send
           + 'static {
        move |req, mut respond| {
            let authority = authority.clone();
            Box::pin(async move {
                assert_eq!(req.method(), Method::CONNECT);
                assert!(req.uri().scheme().is_none() && req.uri().path_and_query().is_none());
                let _ = authority.send(req.uri().to_string());
                let resp = http::Response::builder().status(status).body(()).unwrap();
                let mut send = respond.send_response(resp, status != 200).unwrap();
                if status != 200 {
                    return;
                }
                let mut body = req.into_body();
                while let Some(d) = body.data().await {
                    let Ok(mut d) = d else { return };
                    let n = d.len();
                    while !d.is_empty() {
                        send.reserve_capacity(d.len());
                        let Some(Ok(room)) = poll_fn(|cx| send.poll_capacity(cx)).await else {
                            return;
                        };
                        let chunk = d.split_to(room.min(d.len()));
                        if send.send_data(chunk, false).is_err() {
                            return;
                        }
                    }
                    let _ = body.flow_control().release_capacity(n);
                }
                let _ = send.send_data(Bytes::new(), true);
            })
        }
    }

    #[tokio::test]
    async fn a_tunnel_carries_bytes_and_a_half_close_keeps_the_other_way() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tx, mut authority) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(echo_tunnel(200, tx)).await;
        let tunnel = tokio::time::timeout(WAIT, mesh.clone().connect("10.1.2.3:5432"))
            .await
            .unwrap()
            .expect("tunnel");
        assert_eq!(authority.recv().await.unwrap(), "10.1.2.3:5432");
        let (mut app, local) = tokio::io::duplex(4096);
        let (rd, wr) = tokio::io::split(local);
        let pump = tokio::spawn(tunnel.pump(rd, wr, IDLE));
        app.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // The app's FIN ends its way only: what the peer still sends arrives.
        app.write_all(b" world").await.unwrap();
        app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, app.read_to_end(&mut rest))
            .await
            .expect("the peer's END_STREAM never reached the app as a FIN")
            .unwrap();
        assert_eq!(rest, b" world");
        let end = tokio::time::timeout(WAIT, pump).await.unwrap().unwrap();
        assert_eq!((end.sent, end.received), (11, 11));
        assert!(end.error.is_none(), "{:?}", end.error);
        assert!(!mesh.is_closed());
    }

    #[tokio::test]
    async fn a_refused_tunnel_reports_the_status() {
        let (tx, _authority) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(echo_tunnel(403, tx)).await;
        match tokio::time::timeout(WAIT, mesh.clone().connect("10.1.2.3:5432"))
            .await
            .unwrap()
        {
            Err(TunnelError::Refused(s)) => assert_eq!(s, 403),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("tunnel opened"),
        }
        assert!(matches!(
            mesh.clone().connect("no port here/").await,
            Err(TunnelError::Authority(_))
        ));
    }

    #[tokio::test]
    async fn megabytes_cross_a_tunnel_both_ways_at_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const SIZE: usize = 8 * 1024 * 1024;
        let (tx, _authority) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(echo_tunnel(200, tx)).await;
        let tunnel = mesh.clone().connect("10.1.2.3:5432").await.expect("tunnel");
        let (app, local) = tokio::io::duplex(64 * 1024);
        let (rd, wr) = tokio::io::split(local);
        let pump = tokio::spawn(tunnel.pump(rd, wr, IDLE));
        let (mut app_rd, mut app_wr) = tokio::io::split(app);
        let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let writer = tokio::spawn(async move {
            app_wr.write_all(&data).await.unwrap();
            app_wr.shutdown().await.unwrap();
        });
        let mut got = Vec::with_capacity(SIZE);
        tokio::time::timeout(Duration::from_secs(30), app_rd.read_to_end(&mut got))
            .await
            .expect("the transfer stalled")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), SIZE);
        assert!(got == expect, "the bytes differ");
        let end = pump.await.unwrap();
        assert_eq!((end.sent, end.received), (SIZE as u64, SIZE as u64));
    }

    #[tokio::test]
    async fn an_app_that_stops_reading_stops_the_tunnel_reading_it() {
        // The app writes but never reads: the echo fills the windows, and
        // from then on the tunnel must stop reading the app instead of
        // buffering what it writes.
        use tokio::io::AsyncWriteExt;
        let (tx, _authority) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(echo_tunnel(200, tx)).await;
        let tunnel = mesh.clone().connect("10.1.2.3:5432").await.expect("tunnel");
        let (app, local) = tokio::io::duplex(64 * 1024);
        let (rd, wr) = tokio::io::split(local);
        let pump = tokio::spawn(tunnel.pump(rd, wr, IDLE));
        let (_app_rd, mut app_wr) = tokio::io::split(app);
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        while let Ok(r) =
            tokio::time::timeout(Duration::from_millis(500), app_wr.write_all(&chunk)).await
        {
            r.unwrap();
            written += chunk.len();
            assert!(
                written <= 64 * 1024 * 1024,
                "no backpressure after {written} bytes"
            );
        }
        // Windows (2 MiB the client's, 64 KiB the server's) and the pipes'
        // buffers: a few MiB at most, never the whole stream.
        assert!(written < 8 * 1024 * 1024, "{written} bytes taken in");
        assert!(written > 64 * 1024, "stalled at once: {written}");
        pump.abort();
    }

    #[tokio::test]
    async fn tunnels_whose_apps_stop_reading_do_not_stall_the_connection() {
        // Tunnels to "flood" get 16 MiB from the peer, which their apps
        // never read: each holds its stream's window of the connection's.
        // A tunnel to "echo" must still carry bytes.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const STALLED: usize = 4;
        let (tx, _authority) = mpsc::unbounded_channel();
        let echo = echo_tunnel(200, tx);
        let handler = move |req: http::Request<RecvStream>, mut respond: SendResponse<Bytes>| {
            if req.uri().host() != Some("flood") {
                return echo(req, respond);
            }
            Box::pin(async move {
                let resp = http::Response::builder().status(200).body(()).unwrap();
                let mut send = respond.send_response(resp, false).unwrap();
                let mut left = 16usize << 20;
                while left > 0 {
                    send.reserve_capacity(left.min(1 << 20));
                    let Some(Ok(room)) = poll_fn(|cx| send.poll_capacity(cx)).await else {
                        return;
                    };
                    let n = room.min(left);
                    if send.send_data(Bytes::from(vec![7u8; n]), false).is_err() {
                        return;
                    }
                    left -= n;
                }
                let _keep = req;
            }) as Pin<Box<dyn Future<Output = ()> + Send>>
        };
        let (mesh, _stop) = connect(handler).await;
        let mut stalled = Vec::new();
        for _ in 0..STALLED {
            let tunnel = mesh.clone().connect("flood:1").await.expect("tunnel");
            let (app, local) = tokio::io::duplex(4096);
            let (rd, wr) = tokio::io::split(local);
            stalled.push((tokio::spawn(tunnel.pump(rd, wr, IDLE)), app));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let tunnel = mesh.clone().connect("echo:1").await.expect("tunnel");
        let (mut app, local) = tokio::io::duplex(4096);
        let (rd, wr) = tokio::io::split(local);
        let _pump = tokio::spawn(tunnel.pump(rd, wr, IDLE));
        app.write_all(b"still flowing").await.unwrap();
        let mut got = [0u8; 13];
        tokio::time::timeout(WAIT, app.read_exact(&mut got))
            .await
            .expect("the echo in time: the stalled tunnels hold the connection window")
            .unwrap();
        assert_eq!(&got, b"still flowing");
        for (pump, _app) in stalled {
            pump.abort();
        }
    }

    #[tokio::test]
    async fn a_peer_reset_ends_the_tunnel_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let reset = |req: http::Request<RecvStream>, mut respond: SendResponse<Bytes>| async move {
            let resp = http::Response::builder().status(200).body(()).unwrap();
            let _send = respond.send_response(resp, false).unwrap();
            let mut body = req.into_body();
            let _ = body.data().await;
            respond.send_reset(h2::Reason::CONNECT_ERROR);
        };
        let (mesh, _stop) = connect(reset).await;
        let tunnel = mesh.clone().connect("10.1.2.3:5432").await.expect("tunnel");
        let (mut app, local) = tokio::io::duplex(4096);
        let (rd, wr) = tokio::io::split(local);
        let pump = tokio::spawn(tunnel.pump(rd, wr, IDLE));
        app.write_all(b"x").await.unwrap();
        let end = tokio::time::timeout(WAIT, pump)
            .await
            .expect("the reset was not seen")
            .unwrap();
        assert!(end.error.is_some());
        let mut rest = Vec::new();
        // The tunnel's end of the pipe is gone: the app sees the end.
        let _ = tokio::time::timeout(WAIT, app.read_to_end(&mut rest))
            .await
            .expect("still open");
        assert!(
            !mesh.is_closed(),
            "a stream reset is not the connection's end"
        );
    }
    /// A connected TCP pair: (the app's end, the tunnel's end).
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (c, s) = tokio::join!(
            tokio::net::TcpStream::connect(l.local_addr().unwrap()),
            l.accept()
        );
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test]
    async fn idle_tunnels_hold_none_of_the_connection_window() {
        // h2's default windows (64 KiB for the connection) on the server:
        // a silent tunnel that reserved window before reading its app
        // would leave the busy one none.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tx, _authority) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(echo_tunnel(200, tx)).await;
        let mut idle = Vec::new();
        for _ in 0..3 {
            let tunnel = mesh.clone().connect("10.1.2.3:5432").await.expect("tunnel");
            let (app, local) = tokio::io::duplex(4096);
            let (rd, wr) = tokio::io::split(local);
            idle.push((app, tokio::spawn(tunnel.pump(rd, wr, IDLE))));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let tunnel = mesh.clone().connect("10.1.2.3:5432").await.expect("tunnel");
        let (app, local) = tokio::io::duplex(64 * 1024);
        let (rd, wr) = tokio::io::split(local);
        let _pump = tokio::spawn(tunnel.pump(rd, wr, IDLE));
        let (mut app_rd, mut app_wr) = tokio::io::split(app);
        const SIZE: usize = 1024 * 1024;
        let writer = tokio::spawn(async move {
            app_wr.write_all(&vec![5u8; SIZE]).await.unwrap();
            app_wr.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), app_rd.read_to_end(&mut got))
            .await
            .expect("the busy tunnel stalled behind idle ones")
            .unwrap();
        assert_eq!(got.len(), SIZE);
        writer.await.unwrap();
        drop(idle);
    }

    /// A `CONNECT` handler that opens the tunnel and reports how the
    /// client's side of the stream ended: `None` cleanly, else the reset's
    /// reason.
    fn reset_seen(
        seen: mpsc::UnboundedSender<Option<h2::Reason>>,
    ) -> impl Fn(
        http::Request<RecvStream>,
        SendResponse<Bytes>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>
           + Send
           + 'static {
        move |req, mut respond| {
            let seen = seen.clone();
            Box::pin(async move {
                let resp = http::Response::builder().status(200).body(()).unwrap();
                let _send = respond.send_response(resp, false).unwrap();
                let mut body = req.into_body();
                let end = loop {
                    match body.data().await {
                        None => break None,
                        Some(Ok(d)) => {
                            let _ = body.flow_control().release_capacity(d.len());
                        }
                        Some(Err(e)) => break Some(e.reason().unwrap_or(h2::Reason::NO_ERROR)),
                    }
                };
                let _ = seen.send(end);
            })
        }
    }

    #[tokio::test]
    async fn an_app_reset_resets_the_stream_with_connect_error() {
        use tokio::io::AsyncWriteExt;
        let (tx, mut seen) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(reset_seen(tx)).await;
        let tunnel = mesh.clone().connect("10.1.2.3:5432").await.expect("tunnel");
        let (mut app, local) = tcp_pair().await;
        let (rd, wr) = local.into_split();
        let pump = tokio::spawn(tunnel.pump(rd, wr, IDLE));
        app.write_all(b"partial upload").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        socket2::SockRef::from(&app)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(app);
        let end = tokio::time::timeout(WAIT, pump).await.unwrap().unwrap();
        assert!(end.error.is_some(), "{end:?}");
        let reason = tokio::time::timeout(WAIT, seen.recv()).await.unwrap();
        assert_eq!(reason, Some(Some(h2::Reason::CONNECT_ERROR)));
    }

    #[tokio::test]
    async fn a_reset_after_the_peer_ended_is_noticed_while_the_app_is_silent() {
        // What the inbound sends when its app resets: END_STREAM, then
        // RST_STREAM. The app here keeps its side open and says nothing.
        use tokio::io::AsyncReadExt;
        for reason in [h2::Reason::CANCEL, h2::Reason::NO_ERROR] {
            let end_then_reset =
                move |_req: http::Request<RecvStream>, mut respond: SendResponse<Bytes>| async move {
                    let resp = http::Response::builder().status(200).body(()).unwrap();
                    let mut send = respond.send_response(resp, false).unwrap();
                    let _ = send.send_data(Bytes::from_static(b"rows"), true);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    send.send_reset(reason);
                    std::future::pending::<()>().await;
                };
            let (mesh, _stop) = connect(end_then_reset).await;
            let tunnel = mesh.clone().connect("10.1.2.3:5432").await.expect("tunnel");
            let (mut app, local) = tokio::io::duplex(4096);
            let (rd, wr) = tokio::io::split(local);
            let fin = Arc::new(AtomicBool::new(false));
            let wr = FinSeen {
                io: wr,
                fin: fin.clone(),
            };
            let pump = tokio::spawn(tunnel.pump(rd, wr, IDLE));
            let mut got = Vec::new();
            tokio::time::timeout(WAIT, app.read_to_end(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, b"rows");
            let end = tokio::time::timeout(WAIT, pump)
                .await
                .expect("the reset went unnoticed")
                .unwrap();
            assert!(end.error.is_some(), "{reason:?}: {end:?}");
            // The END_STREAM came 5 ms before the reset: within the
            // grace, so the app was never shown a clean end.
            assert!(
                !fin.load(Ordering::SeqCst),
                "{reason:?}: FIN before the reset"
            );
        }
    }

    /// A writer that records whether it was shut down (a FIN).
    struct FinSeen<W> {
        io: W,
        fin: Arc<AtomicBool>,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for FinSeen<W> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.fin.store(true, Ordering::SeqCst);
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_clean_end_from_the_peer_still_reaches_the_app_as_a_fin() {
        // No reset follows: the FIN comes after the grace, and the app
        // here can still send afterwards (half-close).
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let end_only = |_req: http::Request<RecvStream>, mut respond: SendResponse<Bytes>| async move {
            let resp = http::Response::builder().status(200).body(()).unwrap();
            let mut send = respond.send_response(resp, false).unwrap();
            let _ = send.send_data(Bytes::from_static(b"bye"), true);
            std::future::pending::<()>().await;
        };
        let (mesh, _stop) = connect(end_only).await;
        let tunnel = mesh.clone().connect("10.1.2.3:5432").await.expect("tunnel");
        let (mut app, local) = tokio::io::duplex(4096);
        let (rd, wr) = tokio::io::split(local);
        let fin = Arc::new(AtomicBool::new(false));
        let wr = FinSeen {
            io: wr,
            fin: fin.clone(),
        };
        let _pump = tokio::spawn(tunnel.pump(rd, wr, IDLE));
        let mut got = [0u8; 3];
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"bye");
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, app.read_to_end(&mut rest))
            .await
            .expect("no FIN after a clean end")
            .unwrap();
        assert!(rest.is_empty() && fin.load(Ordering::SeqCst));
        app.write_all(b"still here")
            .await
            .expect("half-close: this way stays open");
    }

    #[tokio::test]
    async fn an_idle_tunnel_is_cancelled() {
        let (tx, mut seen) = mpsc::unbounded_channel();
        let (mesh, _stop) = connect(reset_seen(tx)).await;
        let tunnel = mesh.clone().connect("10.1.2.3:5432").await.expect("tunnel");
        let (_app, local) = tokio::io::duplex(4096);
        let (rd, wr) = tokio::io::split(local);
        let idle = Duration::from_millis(100);
        let end = tokio::time::timeout(WAIT, tunnel.pump(rd, wr, idle))
            .await
            .expect("not closed when idle");
        assert!(end.idle && end.error.is_none(), "{end:?}");
        let reason = tokio::time::timeout(WAIT, seen.recv()).await.unwrap();
        assert_eq!(reason, Some(Some(h2::Reason::CANCEL)));
    }

    #[tokio::test]
    async fn an_upstream_flooding_window_updates_loses_the_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (cli, mut srv) = tokio::io::duplex(1 << 16);
        let flood = tokio::spawn(async move {
            // The server's SETTINGS, then WINDOW_UPDATE(0, 1) non-stop,
            // while whatever the client sends is drained.
            let (mut rd, mut wr) = tokio::io::split(&mut srv);
            let drain = async {
                let mut buf = vec![0; 1 << 16];
                while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
            };
            let send = async {
                wr.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
                let wu = [0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 1];
                let blob: Vec<u8> = wu.iter().copied().cycle().take(wu.len() * 100).collect();
                let mut sent = 0u64;
                loop {
                    wr.write_all(&blob).await?;
                    sent += 100;
                    if sent > 10_000_000 {
                        return Ok::<u64, std::io::Error>(sent);
                    }
                }
            };
            tokio::select! {
                () = drain => None,
                r = send => r.ok(),
            }
        });
        let sender = MeshSender::handshake(cli, 16 * 1024)
            .await
            .expect("client handshake");
        tokio::time::timeout(WAIT * 5, async {
            while !sender.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the connection closed");
        let sent = flood.await.expect("flood");
        assert!(sent.is_none(), "the flood went on: {sent:?}");
    }
}
