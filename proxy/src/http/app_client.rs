//! The inbound's connections to the local app: a keep-alive pool of
//! plaintext HTTP/1.1 connections, and multiplexed h2c connections for
//! apps that need HTTP/2 (gRPC), as many as the app's stream limit needs
//! ([`H2cPool`]).
//!
//! The HTTP/1.1 side is the proxy's own client (wire format in [`crate::http::h1`])
//! rather than hyper's. hyper's runs each connection as a task fed through a
//! channel, with an 8 KiB write buffer, a read buffer that grows to 16 KiB
//! and about 19 KiB of channel blocks, all kept while the connection idles:
//! some 40 KiB per pooled connection, and a task hand-off each way per
//! request. Here the request's own future writes the request and reads the
//! response head; the response body reads straight off the socket and puts
//! the connection back on the stack the moment it ends. An idle connection
//! is only its socket. A request body still arriving when the head is
//! written streams while the response is awaited (an app may answer before
//! reading all of it); if the answer comes first, the rest of the body goes
//! on in a task of its own.
//!
//! The pool is a stack, most recently used first, so a quiet period lets the
//! connections at the bottom age out, and the busy ones stay warm.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::task::AtomicWaker;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::BoxError;
use crate::http::h1::{self, BodyError, BodyReader, Framing, H1Error};
use crate::http::h2_stream::MeshBody;
use crate::http::owned;
use crate::http::traits::SendBody;

/// Idle connections kept beyond this many are closed: enough for any burst
/// a sidecar sees, small enough that a flood cannot pin file descriptors.
const MAX_IDLE: usize = 512;

/// Request body bytes that may go out in the same write as the head.
const GATHER: usize = 16 * 1024;

/// Why a request to the app failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No connection could be made: the app is down or not listening yet.
    #[error("{0}")]
    Unavailable(String),
    /// The app's port refused the connection: nothing listens there (the
    /// app has exited, or has not started).
    #[error("{0}")]
    Refused(String),
    /// The app failed the request after a connection was made.
    #[error("{0}")]
    Failed(String),
    /// The caller's request body made no progress for this long.
    #[error("request body made no progress for {0:?}")]
    BodyTimeout(Duration),
    /// The caller's request body was malformed (its chunked framing, say):
    /// the caller's fault, answered 400, not the app's.
    #[error("malformed request body: {0}")]
    Malformed(String),
}

/// What bounds the HTTP/1.1 pool and the h2c connections beyond their
/// timeouts.
#[derive(Debug, Clone, Copy)]
pub struct AppBounds {
    /// Connections to the app open at once (HTTP/1.1), and h2c streams open
    /// at once over all h2c connections; a request beyond waits up to the
    /// connect timeout for one.
    pub max_connections: usize,
    /// A request body with no progress for this long ends the request (on
    /// h2c, only until the response head arrives).
    pub body_timeout: Duration,
    /// Of `max_connections`, what one caller may hold at once (the size of
    /// the share its requests pass, for the error that names it: see
    /// [`H1Pool::request`]).
    pub max_per_peer: usize,
}

/// A request's hold on the app's connections, released when its
/// connection is back in the pool or closed: the pool's slot, and its
/// caller's share.
#[derive(Debug)]
struct Slot {
    _pool: OwnedSemaphorePermit,
    _peer: Option<OwnedSemaphorePermit>,
}

/// A keep-alive pool of HTTP/1.1 connections to one address.
pub struct H1Pool {
    addr: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_head: usize,
    idle: Mutex<Vec<Idle>>,
    reaper: std::sync::Once,
    /// One permit per connection in use (idle ones are at most what was in
    /// use before, as a new one is dialled only when none is idle).
    slots: Arc<Semaphore>,
    bounds: AppBounds,
}

struct Idle {
    io: TcpStream,
    since: Instant,
}

/// An app request on one of its rare paths.
type Sending = Pin<Box<dyn Future<Output = Result<Response<AppBody>, AppError>> + Send + 'static>>;

/// How an exchange on one connection failed.
enum Exchange {
    /// Not a byte came back: the connection was closed or broken before the
    /// app answered. On a pooled connection this is the app having closed
    /// it while idle, and an idempotent request can go again.
    Unanswered(io::Error),
    Failed(String),
    /// The request body stalled.
    Stalled(Duration),
    /// The request body was malformed.
    Malformed(String),
}

impl Exchange {
    fn into_app_error(self) -> AppError {
        match self {
            Exchange::Stalled(d) => AppError::BodyTimeout(d),
            Exchange::Malformed(e) => AppError::Malformed(e),
            Exchange::Unanswered(e) => {
                AppError::Failed(format!("connection closed before a response: {e}"))
            }
            Exchange::Failed(e) => AppError::Failed(e),
        }
    }
}

/// The address the inbound's connections to an app on IPv4 loopback come
/// from: not 127.0.0.1, so that what an app grants 127.0.0.1 (PostgreSQL's
/// default `pg_hba.conf` trusts it without a password, Redis's protected
/// mode, nginx's `set_real_ip_from 127.0.0.1`) is not extended to every
/// caller the route policy admits: a caller is not a local process. Istio's
/// sidecar uses the same address for the same reason. Any address of
/// 127.0.0.0/8 is the loopback interface's, so it needs no setup.
pub const APP_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);

/// A failed dial to the app: refused (nothing listens), or otherwise
/// unavailable.
fn dial_error(e: io::Error) -> AppError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        AppError::Refused(e.to_string())
    } else {
        AppError::Unavailable(e.to_string())
    }
}

/// Connects to the app at `addr` (an address, or a name and port), from
/// [`APP_SOURCE`] when it is on IPv4 loopback. Each resolved address is
/// tried in turn.
pub async fn dial_app<A: tokio::net::ToSocketAddrs>(addr: A) -> io::Result<TcpStream> {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    let mut last = None;
    // Whatever the name (`0`, `ip6-localhost`, `::ffff:127.0.0.1`), the app
    // is never dialled where it would see the caller as itself: IPv4 forms
    // of loopback are dialled on 127.0.0.1 (from APP_SOURCE), IPv6
    // loopback and `::` not at all. IPv4 loopback first.
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut own = None;
    for to in tokio::net::lookup_host(addr).await? {
        let ip = match to.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                Some(v4) => IpAddr::V4(v4),
                None if v6.is_loopback() || v6.is_unspecified() => {
                    own = Some(to);
                    continue;
                }
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        addrs.push(SocketAddr::new(ip, to.port()));
    }
    addrs.sort_by_key(|a| !(a.is_ipv4() && a.ip().is_loopback()));
    if let (true, Some(own)) = (addrs.is_empty(), own) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the app's address resolves to {own} only, where the app would see every caller as its own loopback address: give its IPv4 loopback address (127.0.0.1:PORT)"),
        ));
    }
    for to in addrs {
        let tried = match to {
            std::net::SocketAddr::V4(v4) if v4.ip().is_loopback() => {
                let s = tokio::net::TcpSocket::new_v4()?;
                // A port whose last connection is in TIME_WAIT may be
                // taken again: the app connections of a busy pod would
                // otherwise run out of the source's ephemeral ports.
                s.set_reuseaddr(true)?;
                s.bind(std::net::SocketAddr::from((APP_SOURCE, 0)))?;
                s.connect(to).await
            }
            _ => TcpStream::connect(to).await,
        };
        match tried {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the app's address resolved to nothing",
        )
    }))
}

impl H1Pool {
    /// A pool dialling `addr`; idle connections close after `idle_timeout`,
    /// and response heads above `max_head` bytes are refused.
    pub fn new(
        addr: &str,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_head: usize,
        bounds: AppBounds,
    ) -> Arc<H1Pool> {
        Arc::new(H1Pool {
            addr: addr.to_owned(),
            connect_timeout,
            idle_timeout,
            max_head,
            idle: Mutex::new(Vec::new()),
            reaper: std::sync::Once::new(),
            slots: Arc::new(Semaphore::new(bounds.max_connections.max(1))),
            bounds,
        })
    }

    /// Waits (in order of arrival, up to the connect timeout) for a permit
    /// of the caller's `share` when it holds all of them.
    async fn wait_share(&self, share: Arc<Semaphore>) -> Result<OwnedSemaphorePermit, AppError> {
        match tokio::time::timeout(self.connect_timeout, share.acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(AppError::Unavailable(format!(
                "this caller's {} app connections (inbound.max_app_connections_per_peer) stayed in use for {:?}",
                self.bounds.max_per_peer, self.connect_timeout
            ))),
        }
    }

    /// Waits (in order of arrival, up to the connect timeout) for a
    /// connection slot when all are in use.
    async fn wait_slot(self: &Arc<Self>) -> Result<OwnedSemaphorePermit, AppError> {
        match tokio::time::timeout(self.connect_timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(AppError::Unavailable(format!(
                "all {} app connections (inbound.max_app_connections) stayed in use for {:?}",
                self.bounds.max_connections, self.connect_timeout
            ))),
        }
    }

    /// Sends `req` (origin-form, hop-by-hop fields removed) on an idle
    /// connection or a new one. An idempotent request whose pooled
    /// connection turns out closed before any answer goes again, once, on
    /// a new connection (RFC 9110 section 9.2.2).
    ///
    /// The head is encoded (and what of the body has arrived gathered)
    /// before the future exists; the future holds only what is left to
    /// send, which keeps it small (see `body::ResponseFuture`).
    ///
    /// `share`: the caller's share of the connections (`max_per_peer`
    /// permits, one per caller: the inbound's `app_share`); a request holds
    /// one of its permits as long as a connection, and waits for one as
    /// for a connection.
    pub fn request<B: SendBody>(
        self: &Arc<Self>,
        req: Request<B>,
        share: Option<&Arc<Semaphore>>,
    ) -> impl Future<Output = Result<Response<AppBody>, AppError>> + Send + 'static {
        let (mut parts, body) = req.into_parts();
        let mut sender = BodySender::new(body, &parts.method, self.bounds.body_timeout);
        let reuse = Reuse {
            // A request carrying a verified step-up proof is never sent
            // twice, idempotent or not: the app may have acted on it before
            // its connection closed, and a single-use proof reaches it once.
            resend: idempotent(&parts.method)
                && !parts.headers.contains_key(&owned::STEP_UP_VERIFIED),
            // A body on a method whose handlers seldom read one (a GET's)
            // may be left unread by the app, which would then parse it as
            // the connection's next request: one the caller wrote whole,
            // owned fields and all, that no route decided on. Such a
            // request has the connection to itself.
            keep: sender.framing == Framing::Empty || !body_often_unread(&parts.method),
        };
        if !reuse.keep {
            parts.headers.insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut out = BytesMut::new();
        h1::write_request_head(
            &parts.method,
            path,
            &parts.headers,
            sender.framing,
            &mut out,
        );
        // What of the body has arrived already goes out with the head: for
        // most requests, the whole of it, in one write.
        if let Err(e) = sender.gather(&mut out) {
            return Either::Left(Box::pin(std::future::ready(Err(e.into_app_error()))) as Sending);
        }
        let peer = match share.map(|s| s.clone().try_acquire_owned()) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                // The caller holds its whole share: wait for one of its own
                // requests to end (rare, boxed).
                let (pool, share) = (self.clone(), share.cloned());
                return Either::Left(Box::pin(async move {
                    let peer = match share {
                        Some(s) => Some(pool.wait_share(s).await?),
                        None => None,
                    };
                    let slot = pool.wait_slot().await?;
                    let slot = Slot {
                        _pool: slot,
                        _peer: peer,
                    };
                    pool.send(slot, out, sender, parts.method, reuse).await
                }));
            }
        };
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Every connection is in use: wait for one (rare, boxed).
                let pool = self.clone();
                return Either::Left(Box::pin(async move {
                    let slot = pool.wait_slot().await?;
                    let slot = Slot {
                        _pool: slot,
                        _peer: peer,
                    };
                    pool.send(slot, out, sender, parts.method, reuse).await
                }));
            }
        };
        let slot = Slot {
            _pool: slot,
            _peer: peer,
        };
        Either::Right(self.send(slot, out, sender, parts.method, reuse))
    }

    /// Sends the encoded request on an idle connection or a new one, with
    /// `slot` held until the connection is back in the pool or closed.
    fn send<B: SendBody>(
        self: &Arc<Self>,
        slot: Slot,
        out: BytesMut,
        sender: BodySender<B>,
        method: Method,
        reuse: Reuse,
    ) -> impl Future<Output = Result<Response<AppBody>, AppError>> + Send + 'static {
        let (idle, pool) = (self.checkout(), self.clone());
        // The rare paths (a body still arriving, dialling) are boxed: inline,
        // they would make every request's future larger.
        if !sender.done {
            return Either::Left(Box::pin(async move {
                let io = match idle {
                    Some(io) => io,
                    None => pool.dial().await?,
                };
                let sent = pool
                    .exchange_streaming(io, &out, sender, &method, reuse.keep)
                    .await;
                sent.map(|r| with_slot(r, slot))
                    .map_err(Exchange::into_app_error)
            }) as Sending);
        }
        // Only a request wholly in `out` can be sent again.
        let resendable = reuse.resend;
        // An async block, not an `async fn`: those copy their arguments
        // into the future twice.
        Either::Right(async move {
            let (mut io, mut pooled) = match idle {
                Some(io) => (io, true),
                None => (Box::pin(pool.dial()).await?, false),
            };
            loop {
                match pool.exchange(io, &out, &method, reuse.keep).await {
                    Ok(resp) => return Ok(with_slot(resp, slot)),
                    Err(Exchange::Unanswered(e)) if pooled && resendable => {
                        tracing::debug!(error = %e, "pooled app connection was closed; retrying");
                        pooled = false;
                        io = Box::pin(pool.dial()).await?;
                    }
                    Err(e) => return Err(e.into_app_error()),
                }
            }
        })
    }

    /// One request, wholly in `out`, and its response head on `io`.
    async fn exchange(
        self: &Arc<Self>,
        mut io: TcpStream,
        out: &[u8],
        method: &Method,
        keep: bool,
    ) -> Result<Response<AppBody>, Exchange> {
        // Reads start small (a typical response head and body fit) and grow
        // once a body turns out large. An idle connection holds no buffer.
        let mut buf = BytesMut::with_capacity(h1::SMALL_READ);
        io.write_all(out).await.map_err(Exchange::Unanswered)?;
        let head = read_head(&mut io, &mut buf, method, self.max_head).await?;
        Ok(self.response(head, AppIo::Whole(io), buf, keep))
    }

    /// One request whose head (and the start of its body) is in `out` and
    /// the rest still to come from `sender`, and its response head on `io`.
    async fn exchange_streaming<B: SendBody>(
        self: &Arc<Self>,
        mut io: TcpStream,
        out: &[u8],
        sender: BodySender<B>,
        method: &Method,
        keep: bool,
    ) -> Result<Response<AppBody>, Exchange> {
        let mut buf = BytesMut::with_capacity(h1::SMALL_READ);
        io.write_all(out).await.map_err(Exchange::Unanswered)?;
        // The rest of the body streams while the response is awaited: an
        // app may answer before it has read the whole request.
        let (mut rd, wr) = io.into_split();
        let mut pump = Box::pin(sender.pump(wr));
        let mut pumped = None;
        let head = loop {
            tokio::select! {
                biased;
                (wr, r) = &mut pump, if pumped.is_none() => match r {
                    Ok(()) => pumped = Some(Some(wr)),
                    Err(PumpError::Body(e)) => return Err(Exchange::Failed(e)),
                    Err(PumpError::Malformed(e)) => return Err(Exchange::Malformed(e)),
                    Err(PumpError::Stalled(d)) => return Err(Exchange::Stalled(d)),
                    // The app stopped reading: it may have answered (and
                    // closed), so read on.
                    Err(PumpError::Write(e)) => {
                        tracing::debug!(error = %e, "the app stopped reading the request body");
                        pumped = Some(None);
                    }
                },
                head = read_head(&mut rd, &mut buf, method, self.max_head) => break head?,
            }
        };
        let io = match pumped {
            Some(Some(wr)) => match rd.reunite(wr) {
                Ok(io) => AppIo::Whole(io),
                Err(e) => AppIo::Read(e.0),
            },
            Some(None) => AppIo::Read(rd),
            None => {
                // Answered early: the body goes on in its own task, and the
                // connection closes after both are done.
                tokio::spawn(pump);
                AppIo::Read(rd)
            }
        };
        Ok(self.response(head, io, buf, keep))
    }

    /// The response whose head came on `io`; its connection goes back to
    /// the pool after its body if the app allows and `keep`.
    fn response(
        self: &Arc<Self>,
        head: h1::ResponseHead,
        io: AppIo,
        buf: BytesMut,
        keep: bool,
    ) -> Response<AppBody> {
        let h1::ResponseHead {
            parts,
            framing,
            keep_alive,
        } = head;
        let mut body = AppBody {
            io: Some(io),
            buf,
            reader: BodyReader::new(framing, self.max_head),
            keep_alive: keep_alive && keep,
            pool: self.clone(),
            slot: None,
        };
        if body.reader.is_done() {
            body.finish();
        }
        Response::from_parts(parts, body)
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<TcpStream> {
        let mut probe = [0u8; 1];
        loop {
            // Popped under the lock, probed outside it: the probe may be a
            // syscall.
            let c = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if c.since.elapsed() >= self.idle_timeout {
                continue;
            }
            // An idle connection has nothing to read: if it has, the app
            // closed it (or sent garbage). Free unless the socket was
            // signalled readable since its last read.
            match c.io.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(c.io),
                _ => continue,
            }
        }
    }

    fn checkin(&self, io: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                io,
                since: Instant::now(),
            });
        }
    }

    async fn dial(self: &Arc<Self>) -> Result<TcpStream, AppError> {
        self.reaper.call_once(|| {
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        });
        let tcp = tokio::time::timeout(self.connect_timeout, dial_app(self.addr.as_str()))
            .await
            .map_err(|_| {
                AppError::Unavailable(format!(
                    "connect timed out after {:?}",
                    self.connect_timeout
                ))
            })?
            .map_err(dial_error)?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

/// What a request allows beyond being sent once on one connection.
#[derive(Debug, Clone, Copy)]
struct Reuse {
    /// It may be sent again on a new connection when a pooled one's close
    /// left it unanswered.
    resend: bool,
    /// Its connection may carry another request after it.
    keep: bool,
}

/// Methods whose handlers commonly ignore a request body (RFC 9110 gives
/// content no defined meaning on them): an app may answer without reading
/// it.
fn body_often_unread(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// RFC 9110 section 9.2.2.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Reads until a complete response head is in `buf`, and parses it.
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    method: &Method,
    max: usize,
) -> Result<h1::ResponseHead, Exchange> {
    let mut got_any = !buf.is_empty();
    loop {
        if let Some(head) = h1::parse_response_head(buf, method, max)
            .map_err(|e| Exchange::Failed(format!("bad response from the app: {e}")))?
        {
            return Ok(head);
        }
        buf.reserve(h1::SMALL_READ);
        let n = poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)).await;
        match n {
            Ok(0) if !got_any => {
                return Err(Exchange::Unanswered(io::ErrorKind::UnexpectedEof.into()))
            }
            Ok(0) => {
                return Err(Exchange::Failed(
                    "the app closed the connection in the middle of a response head".into(),
                ))
            }
            Ok(_) => got_any = true,
            Err(e) if !got_any => return Err(Exchange::Unanswered(e)),
            Err(e) => return Err(Exchange::Failed(e.to_string())),
        }
    }
}

/// Closes idle connections older than `idle_timeout`, oldest first, until
/// the pool is gone.
async fn reap(pool: Weak<H1Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 4).max(Duration::from_millis(250));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The stack is in order of return: the stale ones are at the bottom.
        let stale = idle
            .iter()
            .take_while(|c| c.since.elapsed() >= idle_timeout)
            .count();
        idle.drain(..stale);
    }
}

/// Why a request body could not be passed on.
enum PumpError {
    /// The caller's body failed or broke its declared length.
    Body(String),
    /// The caller's body was malformed.
    Malformed(String),
    /// The app's side of the connection failed.
    Write(io::Error),
    /// The caller's body made no progress for this long.
    Stalled(Duration),
}

impl PumpError {
    /// As the exchange fails when the body fails before a byte was sent.
    fn into_app_error(self) -> AppError {
        match self {
            PumpError::Malformed(e) => AppError::Malformed(e),
            PumpError::Body(e) => AppError::Failed(e),
            PumpError::Write(e) => AppError::Failed(e.to_string()),
            PumpError::Stalled(d) => AppError::BodyTimeout(d),
        }
    }
}

/// The request body on its way to the app, framed as its head declared.
struct BodySender<B> {
    body: B,
    framing: Framing,
    sent: u64,
    done: bool,
    /// `body_timeout`.
    stall: Duration,
}

impl<B: SendBody> BodySender<B> {
    /// `Content-Length` when the caller's body has a known size, chunked
    /// otherwise; no framing field for a bodyless GET and the like.
    fn new(body: B, method: &Method, stall: Duration) -> BodySender<B> {
        let framing = if body.is_end_stream() {
            match *method {
                Method::POST | Method::PUT | Method::PATCH => Framing::Length(0),
                _ => Framing::Empty,
            }
        } else {
            match body.size_hint().exact() {
                Some(n) => Framing::Length(n),
                None => Framing::Chunked,
            }
        };
        let done = body.is_end_stream();
        BodySender {
            body,
            framing,
            sent: 0,
            done,
            stall,
        }
    }

    /// Appends to `out` the frames that are ready without waiting.
    fn gather(&mut self, out: &mut BytesMut) -> Result<(), PumpError> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while !self.done && out.len() < GATHER {
            match Pin::new(&mut self.body).poll_frame(&mut cx) {
                Poll::Pending => break,
                Poll::Ready(frame) => {
                    if let Some(data) = self.encode(frame, out)? {
                        out.extend_from_slice(&data);
                        self.suffix(out);
                    }
                }
            }
            if !self.done && self.body.is_end_stream() {
                self.encode(None, out)?;
            }
        }
        Ok(())
    }

    /// Writes the rest of the body to `wr`, and gives `wr` back.
    async fn pump(mut self, mut wr: OwnedWriteHalf) -> (OwnedWriteHalf, Result<(), PumpError>) {
        // Framing before the data, the data itself (not copied), then
        // what follows it: the chunk's CRLF, the last chunk.
        let (mut head, mut tail) = (BytesMut::new(), BytesMut::new());
        while !self.done {
            // The clock is read only when the body has nothing ready.
            let frame =
                match poll_fn(|cx| Poll::Ready(Pin::new(&mut self.body).poll_frame(cx))).await {
                    Poll::Ready(f) => f,
                    Poll::Pending => {
                        let next = poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx));
                        match tokio::time::timeout(self.stall, next).await {
                            Ok(f) => f,
                            Err(_) => return (wr, Err(PumpError::Stalled(self.stall))),
                        }
                    }
                };
            let data = match self.encode(frame, &mut head) {
                Ok(d) => d.unwrap_or_default(),
                Err(e) => return (wr, Err(e)),
            };
            if !data.is_empty() {
                self.suffix(&mut tail);
            }
            if !self.done && self.body.is_end_stream() {
                if let Err(e) = self.encode(None, &mut tail) {
                    return (wr, Err(e));
                }
            }
            let mut chain = (&mut head).chain(data).chain(&mut tail);
            if let Err(e) = wr.write_all_buf(&mut chain).await {
                return (wr, Err(PumpError::Write(e)));
            }
            head.clear();
            tail.clear();
        }
        (wr, Ok(()))
    }

    /// Frames `frame` (`None`: the end of the body): the chunk or framing
    /// bytes go to `out`, and the data is returned for the caller to send
    /// after them (followed by [`Self::suffix`]).
    fn encode(
        &mut self,
        frame: Option<Result<Frame<Bytes>, B::Error>>,
        out: &mut BytesMut,
    ) -> Result<Option<Bytes>, PumpError> {
        let frame = match frame {
            None => {
                self.done = true;
                return match self.framing {
                    Framing::Chunked => {
                        h1::write_last_chunk(None, out);
                        Ok(None)
                    }
                    Framing::Length(n) if self.sent != n => Err(PumpError::Body(format!(
                        "request body ended after {} of {n} bytes",
                        self.sent
                    ))),
                    _ => Ok(None),
                };
            }
            Some(Err(e)) => {
                let e: BoxError = e.into();
                let why = format!("request body failed: {}", crate::error::root_cause(&*e));
                return Err(if crate::error::is_malformed(&*e) {
                    PumpError::Malformed(why)
                } else {
                    PumpError::Body(why)
                });
            }
            Some(Ok(f)) => f,
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => Ok(None),
            Ok(data) => {
                self.sent += data.len() as u64;
                match self.framing {
                    Framing::Chunked => h1::chunk_start(data.len(), out),
                    Framing::Length(n) if self.sent > n => {
                        return Err(PumpError::Body(format!(
                            "request body longer than its {n} bytes"
                        )))
                    }
                    _ => {}
                }
                Ok(Some(data))
            }
            Err(frame) => {
                // Trailers end the body; HTTP/1.1 carries them only in a
                // chunked one.
                self.done = true;
                match (self.framing, frame.trailers_ref()) {
                    (Framing::Chunked, t) => h1::write_last_chunk(t, out),
                    (Framing::Length(n), _) if self.sent != n => {
                        return Err(PumpError::Body(format!(
                            "request body ended after {} of {n} bytes",
                            self.sent
                        )))
                    }
                    _ => {}
                }
                Ok(None)
            }
        }
    }

    /// What follows a data frame's bytes.
    fn suffix(&self, out: &mut BytesMut) {
        if self.framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The app connection a response body reads from.
#[derive(Debug)]
enum AppIo {
    /// Whole: can go back to the pool.
    Whole(TcpStream),
    /// Its write half is elsewhere (or gone): closes after the response.
    Read(OwnedReadHalf),
}

impl AppIo {
    fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            AppIo::Whole(s) => tokio_util::io::poll_read_buf(Pin::new(s), cx, buf),
            AppIo::Read(r) => tokio_util::io::poll_read_buf(Pin::new(r), cx, buf),
        }
    }
}

/// Why a response body from the app broke off.
#[derive(Debug, thiserror::Error)]
pub enum AppBodyError {
    /// The body is malformed.
    #[error("bad response body from the app: {0}")]
    Framing(#[from] H1Error),
    /// The connection failed.
    #[error("app connection failed: {0}")]
    Io(#[from] io::Error),
    /// The connection closed before the declared end of the body.
    #[error("the app closed the connection before the end of the response body")]
    Incomplete,
}

impl From<BodyError> for AppBodyError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Framing(e) => AppBodyError::Framing(e),
            BodyError::Io(e) => AppBodyError::Io(e),
            BodyError::Incomplete => AppBodyError::Incomplete,
        }
    }
}

/// A response body from the app, read straight off its connection. When
/// it ends, the connection goes back to the pool; dropped before the end,
/// the connection closes with it.
#[derive(Debug)]
pub struct AppBody {
    io: Option<AppIo>,
    buf: BytesMut,
    reader: BodyReader,
    keep_alive: bool,
    pool: Arc<H1Pool>,
    /// The pool's connection slot and the caller's share, released when
    /// the connection is back or closed.
    slot: Option<Slot>,
}

/// Gives the response body the connection slot to release.
fn with_slot(mut resp: Response<AppBody>, slot: Slot) -> Response<AppBody> {
    let body = resp.body_mut();
    if body.io.is_some() {
        body.slot = Some(slot);
    }
    resp
}

impl AppBody {
    /// The body is complete: the connection is reused if the app allows it
    /// and sent nothing beyond the response.
    fn finish(&mut self) {
        match self.io.take() {
            Some(AppIo::Whole(io)) if self.keep_alive && self.buf.is_empty() => {
                self.pool.checkin(io)
            }
            _ => {}
        }
        self.buf = BytesMut::new();
        self.slot = None;
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = AppBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AppBodyError>>> {
        let this = self.get_mut();
        let io = &mut this.io;
        let polled = this
            .reader
            .poll_frame(&mut this.buf, cx, |cx, buf| match io {
                Some(io) => io.poll_read_buf(cx, buf),
                None => Poll::Ready(Ok(0)),
            });
        match polled {
            Poll::Ready(Some(Err(e))) => {
                this.io = None;
                this.slot = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(frame) => {
                if this.reader.is_done() && this.io.is_some() {
                    // The caller may not poll again after the last bytes:
                    // the connection goes back now.
                    this.finish();
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.reader.size_hint()
    }
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool").field("addr", &self.addr).finish()
    }
}

/// h2c flow-control windows: hyper's client defaults, which the app path
/// had before it was on the `h2` crate.
const H2C_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const H2C_CONN_WINDOW: u32 = 5 * 1024 * 1024;

/// One h2c connection to the app.
struct H2cLink {
    send: h2::client::SendRequest<Bytes>,
    /// Our streams open on it, against the app's
    /// SETTINGS_MAX_CONCURRENT_STREAMS: h2 would queue a stream beyond it
    /// without a bound, behind streams that may never end.
    open: AtomicUsize,
    /// Set when the connection ended (or refused a stream as closing): new
    /// streams need another.
    closed: AtomicBool,
    born: Instant,
    /// When `open` last fell to 0, in milliseconds since `born`.
    idle_at: AtomicU64,
}

impl H2cLink {
    /// Takes one of the app's concurrent streams on this connection, if one
    /// is free.
    fn reserve(self: &Arc<Self>) -> Option<Reserved> {
        if self.closed.load(Ordering::Relaxed) {
            return None;
        }
        let max = self.send.current_max_send_streams();
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Reserved(self.clone()))
    }

    /// Whether no stream has been open on it for `idle` (the clock is read
    /// only for a connection with none open).
    fn idle_for(&self, idle: Duration) -> bool {
        self.open.load(Ordering::Acquire) == 0
            && self.born.elapsed().as_millis() as u64
                >= self.idle_at.load(Ordering::Acquire) + idle.as_millis() as u64
    }
}

/// A stream of an [`H2cLink`], given back when dropped.
struct Reserved(Arc<H2cLink>);

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = self.0.born.elapsed().as_millis() as u64;
            self.0.idle_at.store(now, Ordering::Release);
        }
    }
}

/// A request's hold on the app's h2c streams, kept by its response body
/// until the body ends or is dropped: the connection's stream, the pool's
/// and the caller's share.
struct StreamHold {
    stream: Reserved,
    _pool: OwnedSemaphorePermit,
    _peer: Option<OwnedSemaphorePermit>,
    /// The request body's pump, if it still runs.
    watch: Option<Arc<Watch>>,
}

impl Drop for StreamHold {
    fn drop(&mut self) {
        // A request body still going would keep the stream open after its
        // hold is given back (the app's limit counts it, ours no longer
        // would): its pump resets the stream.
        if let Some(w) = &self.watch {
            w.state.store(DONE, Ordering::Release);
            w.pump.wake();
        }
    }
}

impl std::fmt::Debug for StreamHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamHold")
    }
}

/// The h2c connections to one app address (gRPC, `app_protocol = "h2"`),
/// on the `h2` crate directly: it sends the caller's `:authority` as it is
/// (a pooled hyper client would put the app's address there) and tells the
/// app's stream limit, so that a full connection gets another beside it
/// (as Envoy's HTTP/2 pool does) instead of queueing without a bound.
///
/// A request holds one permit of its caller's share (the same as the
/// HTTP/1.1 pool's, so `max_per_peer` bounds a caller's app connections and
/// h2c streams together) and one of the pool's `max_connections` streams,
/// from before its stream opens until its response body ends: one caller
/// with streams that never end cannot take every stream the app allows.
/// Each caller has connections of its own: neither a response it does not
/// read (which fills a connection's flow-control window) nor its streams
/// (which fill the app's per-connection limit) stall another caller's.
/// A caller's connection is dialled only when every one it has is full;
/// streams go to its oldest connection with room, so once a burst is over
/// the newer ones fall idle. A connection idle for `idle_timeout` is
/// closed, and before a dial so is every idle one beyond `max_connections`:
/// connections stay bounded by it, as each of the others holds a stream.
pub struct H2cPool {
    addr: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: u32,
    bounds: AppBounds,
    /// Each caller's connections, by [`caller_key`]: a connection carries
    /// one caller's streams only. A caller that stops reading its responses
    /// fills its connection's flow-control window, and one whose streams
    /// hold the app's per-connection stream limit fills that; on a shared
    /// connection either would stall every other caller's streams.
    links: Mutex<std::collections::HashMap<usize, Vec<Arc<H2cLink>>>>,
    /// One dial at a time: a burst finding every connection full makes one
    /// more, not one each.
    dialing: tokio::sync::Mutex<()>,
    streams: Arc<Semaphore>,
}

impl std::fmt::Debug for H2cPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2cPool").field("addr", &self.addr).finish()
    }
}

/// [`H2cPool::request`]'s body wrapper: fails the body once it has made no
/// progress for `body_timeout` while the response head is awaited, or once
/// the response is done with, either of which resets the stream
/// (`h2_stream::pipe`). After the head, a quiet body is left alone: a
/// bidirectional gRPC stream may be silent for long.
struct Watched<B> {
    body: B,
    stall: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was set.
    progressed: bool,
    watch: Arc<Watch>,
}

/// What the request and its body pump tell each other.
struct Watch {
    /// [`AWAITING_HEAD`], then [`HEAD_CAME`] or [`STALLED`] (whichever is
    /// set first wins), then [`DONE`].
    state: AtomicU8,
    /// Woken when the response is done with.
    pump: AtomicWaker,
}

const AWAITING_HEAD: u8 = 0;
const HEAD_CAME: u8 = 1;
const STALLED: u8 = 2;
/// The response ended or was dropped: the rest of the body goes nowhere.
const DONE: u8 = 3;

/// The response to a request whose body was still being sent was dropped.
#[derive(Debug, thiserror::Error)]
#[error("the response was dropped")]
struct ResponseDropped;

/// A request body stalled before the app's response head.
#[derive(Debug, thiserror::Error)]
#[error("request body made no progress for {0:?}")]
struct BodyStalled(Duration);

impl<B: SendBody> Body for Watched<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        this.watch.pump.register(cx.waker());
        let state = this.watch.state.load(Ordering::Acquire);
        if state == DONE {
            return Poll::Ready(Some(Err(ResponseDropped.into())));
        }
        if let Poll::Ready(f) = Pin::new(&mut this.body).poll_frame(cx) {
            this.progressed = true;
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        if state != AWAITING_HEAD {
            this.timer = None;
            return Poll::Pending;
        }
        // The clock is read only when the body has nothing ready.
        let deadline = tokio::time::Instant::now() + this.stall;
        let timer = match &mut this.timer {
            Some(t) => {
                if this.progressed {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        this.progressed = false;
        if timer.as_mut().poll(cx).is_ready()
            && this
                .watch
                .state
                .compare_exchange(AWAITING_HEAD, STALLED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Poll::Ready(Some(Err(BodyStalled(this.stall).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The key of a caller's connections: its share, one `Arc` per caller
/// SPIFFE ID for as long as any of its connections or streams holds it
/// (`inbound::PeerShare`), so the address names one caller meanwhile; 0
/// for requests without a share.
fn caller_key(share: Option<&Arc<Semaphore>>) -> usize {
    share.map_or(0, |s| Arc::as_ptr(s) as usize)
}

impl H2cPool {
    /// The connections to `addr`, dialled as requests need them; response
    /// heads above `max_header_bytes` are refused.
    pub fn new(
        addr: &str,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_header_bytes: usize,
        bounds: AppBounds,
    ) -> Arc<H2cPool> {
        Arc::new(H2cPool {
            addr: addr.to_owned(),
            connect_timeout,
            idle_timeout,
            max_header_bytes: u32::try_from(max_header_bytes).unwrap_or(u32::MAX),
            bounds,
            links: Mutex::new(std::collections::HashMap::new()),
            dialing: tokio::sync::Mutex::new(()),
            streams: Arc::new(Semaphore::new(bounds.max_connections.max(1))),
        })
    }

    /// Sends `req` (HTTP/2 form: scheme and authority in the URI) on a
    /// connection with a stream free, dialling one if none has, and waits
    /// for the response head. `share`: the caller's share, as for
    /// [`H1Pool::request`].
    pub fn request<B: SendBody>(
        self: &Arc<Self>,
        req: Request<B>,
        share: Option<&Arc<Semaphore>>,
    ) -> impl Future<Output = Result<Response<H2cBody>, AppError>> + Send + 'static {
        let pool = self.clone();
        let share = share.cloned();
        let key = caller_key(share.as_ref());
        async move {
            let peer = match share {
                None => None,
                Some(s) => Some(match s.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => pool.wait(s, true).await?,
                }),
            };
            let total = match pool.streams.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => pool.wait(pool.streams.clone(), false).await?,
            };
            pool.send(req, total, peer, key).await
        }
    }

    /// Waits (in order of arrival, up to the connect timeout) for a permit
    /// of `of`: the caller's share, or the pool's streams.
    async fn wait(
        &self,
        of: Arc<Semaphore>,
        share: bool,
    ) -> Result<OwnedSemaphorePermit, AppError> {
        match tokio::time::timeout(self.connect_timeout, of.acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ if share => Err(AppError::Unavailable(format!(
                "this caller's {} app connections and h2c streams (inbound.max_app_connections_per_peer) stayed in use for {:?}",
                self.bounds.max_per_peer, self.connect_timeout
            ))),
            _ => Err(AppError::Unavailable(format!(
                "all {} h2c streams to the app (inbound.max_app_connections) stayed in use for {:?}",
                self.bounds.max_connections, self.connect_timeout
            ))),
        }
    }

    async fn send<B: SendBody>(
        &self,
        req: Request<B>,
        pool: OwnedSemaphorePermit,
        peer: Option<OwnedSemaphorePermit>,
        key: usize,
    ) -> Result<Response<H2cBody>, AppError> {
        let (mut parts, body) = req.into_parts();
        if let Some(len) = body.size_hint().exact() {
            // As hyper does: a known length is announced, except a zero one
            // on methods without payload semantics.
            if (len != 0 || !matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE))
                && !parts.headers.contains_key(http::header::CONTENT_LENGTH)
            {
                parts
                    .headers
                    .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
            }
        }
        // A connection found closed before the stream opened is noticed
        // here, not by a failed request: once more, on another.
        let mut tries = 2;
        let (stream, mut send) = loop {
            let stream = self.stream(key).await?;
            let mut send = stream.0.send.clone();
            match poll_fn(|cx| send.poll_ready(cx)).await {
                Ok(()) => break (stream, send),
                Err(e) => {
                    stream.0.closed.store(true, Ordering::Relaxed);
                    tries -= 1;
                    if tries == 0 {
                        return Err(AppError::Failed(format!("app h2c connection: {e}")));
                    }
                }
            }
        };
        let eos = body.is_end_stream();
        let (response, tx) = match send.send_request(Request::from_parts(parts, ()), eos) {
            Ok(r) => r,
            Err(e) => {
                if e.is_go_away() || e.is_io() {
                    stream.0.closed.store(true, Ordering::Relaxed);
                }
                return Err(AppError::Failed(format!("app h2c request: {e}")));
            }
        };
        let watch = if eos {
            None
        } else {
            // Only a request with a body still to come costs a task.
            let watch = Arc::new(Watch {
                state: AtomicU8::new(AWAITING_HEAD),
                pump: AtomicWaker::new(),
            });
            let body = Watched {
                body,
                stall: self.bounds.body_timeout,
                timer: None,
                progressed: false,
                watch: watch.clone(),
            };
            tokio::spawn(crate::http::h2_stream::pipe(body, tx));
            Some(watch)
        };
        // Dropped before the head (the caller gave up), the request's
        // future resets the stream too.
        let hold = StreamHold {
            stream,
            _pool: pool,
            _peer: peer,
            watch,
        };
        let head = response.await;
        if let Some(w) = &hold.watch {
            if w.state
                .compare_exchange(
                    AWAITING_HEAD,
                    HEAD_CAME,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
            {
                return Err(AppError::BodyTimeout(self.bounds.body_timeout));
            }
        }
        let resp = head.map_err(|e| {
            if e.is_go_away() || e.is_io() {
                hold.stream.0.closed.store(true, Ordering::Relaxed);
            }
            AppError::Failed(format!("app h2c stream: {e}"))
        })?;
        let (parts, recv) = resp.into_parts();
        let body = MeshBody::new(recv, &parts.headers);
        let hold = if body.is_end_stream() {
            None
        } else {
            Some(hold)
        };
        Ok(Response::from_parts(parts, H2cBody { body, hold }))
    }

    /// A free stream on an open connection of caller `key`, or on a new one.
    async fn stream(&self, key: usize) -> Result<Reserved, AppError> {
        if let Some(s) = self.free_stream(key) {
            return Ok(s);
        }
        // Bounded: behind a dial to an app that does not answer, each
        // waiting request would otherwise add its own connect timeout.
        let _dialing = tokio::time::timeout(self.connect_timeout, self.dialing.lock())
            .await
            .map_err(|_| {
                AppError::Unavailable(format!(
                    "connect timed out after {:?}",
                    self.connect_timeout
                ))
            })?;
        if let Some(s) = self.free_stream(key) {
            return Ok(s);
        }
        self.sweep();
        let link = self.dial().await?;
        let s = link
            .reserve()
            .ok_or_else(|| AppError::Unavailable("the app allows no HTTP/2 streams".to_owned()))?;
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .push(link);
        Ok(s)
    }

    fn free_stream(&self, key: usize) -> Option<Reserved> {
        let mut all = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let links = all.get_mut(&key)?;
        // Dropped here, a connection closes once its last stream ends.
        links.retain(|l| !l.closed.load(Ordering::Relaxed) && !l.idle_for(self.idle_timeout));
        let free = links.iter().find_map(H2cLink::reserve);
        if links.is_empty() {
            all.remove(&key);
        }
        free
    }

    /// Before a dial: drops the connections of every caller that are closed
    /// or idle past `idle_timeout` (callers gone for good leave theirs),
    /// and, at `max_connections`, every idle one.
    fn sweep(&self) {
        let mut all = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let mut left = 0;
        for links in all.values_mut() {
            links.retain(|l| !l.closed.load(Ordering::Relaxed) && !l.idle_for(self.idle_timeout));
            left += links.len();
        }
        if left >= self.bounds.max_connections {
            for links in all.values_mut() {
                links.retain(|l| !l.idle_for(Duration::ZERO));
            }
        }
        all.retain(|_, links| !links.is_empty());
    }

    /// Connections open now (each caller's).
    #[cfg(test)]
    fn connections(&self) -> usize {
        let all = self.links.lock().unwrap_or_else(|p| p.into_inner());
        all.values().map(Vec::len).sum()
    }

    /// A new connection, once the app's SETTINGS (its stream limit) are in.
    async fn dial(&self) -> Result<Arc<H2cLink>, AppError> {
        let setup = async {
            let tcp = dial_app(self.addr.as_str()).await.map_err(dial_error)?;
            let _ = tcp.set_nodelay(true);
            let (send, mut conn) = h2::client::Builder::new()
                .initial_window_size(H2C_STREAM_WINDOW)
                .initial_connection_window_size(H2C_CONN_WINDOW)
                .max_header_list_size(self.max_header_bytes)
                // h2's default (400 KB), less under a memory limit: an
                // app that stops reading holds this much of each upload.
                .max_send_buffer_size(crate::memory::send_buffer())
                .enable_push(false)
                .handshake::<_, Bytes>(tcp)
                .await
                .map_err(|e| AppError::Unavailable(format!("HTTP/2 handshake: {e}")))?;
            // The app's SETTINGS come before its answer to a PING: once that
            // is in, `current_max_send_streams` is the app's own limit.
            let mut ping = conn.ping_pong().ok_or_else(|| {
                AppError::Unavailable("HTTP/2 connection without PING".to_owned())
            })?;
            let pong = ping.ping(h2::Ping::opaque());
            tokio::pin!(pong);
            tokio::select! {
                r = &mut conn => {
                    let why = r.err().map_or_else(|| "closed".to_owned(), |e| e.to_string());
                    return Err(AppError::Unavailable(format!("HTTP/2 connection ended at once: {why}")));
                }
                r = &mut pong => {
                    r.map_err(|e| AppError::Unavailable(format!("HTTP/2 PING: {e}")))?;
                }
            }
            Ok((send, conn))
        };
        let (send, conn) = tokio::time::timeout(self.connect_timeout, setup)
            .await
            .map_err(|_| {
                AppError::Unavailable(format!(
                    "connect timed out after {:?}",
                    self.connect_timeout
                ))
            })??;
        let link = Arc::new(H2cLink {
            send,
            open: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            born: Instant::now(),
            idle_at: AtomicU64::new(0),
        });
        // Weak: the connection ends once the pool and its streams are gone.
        let watch = Arc::downgrade(&link);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "app h2c connection closed");
            }
            if let Some(l) = watch.upgrade() {
                l.closed.store(true, Ordering::Relaxed);
            }
        });
        Ok(link)
    }
}

/// A response body from an h2c connection to the app: data, then trailers
/// (gRPC's status). Its stream, and its caller's share of them, are given
/// back when it ends or is dropped.
#[derive(Debug)]
pub struct H2cBody {
    body: MeshBody,
    hold: Option<StreamHold>,
}

impl Body for H2cBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.hold = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty, Full};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::http::traits::test_body::{data, trailers, Feed, TestBody};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

    const WAIT: Duration = Duration::from_secs(2);

    /// What the fake app does with a request, decided from its head.
    enum Reply {
        /// Reads the body, writes these bytes, and waits for the next request.
        Send(&'static str),
        /// Reads the body, writes these bytes, and closes.
        SendClose(&'static str),
        /// Reads the body and closes without a byte of answer.
        Close,
        /// Writes these bytes at once, without reading the body, then reads
        /// on until the client closes.
        Early(&'static str),
        /// Reads nothing more and never answers.
        Hold,
    }

    /// A request as the app received it.
    #[derive(Debug)]
    struct Seen {
        conn: usize,
        head: String,
        body: Vec<u8>,
    }

    struct App {
        addr: String,
        accepts: Arc<AtomicUsize>,
        seen: mpsc::UnboundedReceiver<Seen>,
        /// Per connection, when the client closed it.
        closed: mpsc::UnboundedReceiver<usize>,
    }

    fn find(buf: &[u8], what: &[u8]) -> Option<usize> {
        buf.windows(what.len()).position(|w| w == what)
    }

    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads a request head off `s`; `None` when the client closed.
    async fn read_head_raw(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(p) = find(buf, b"\r\n\r\n") {
                let head: Vec<u8> = buf.drain(..p + 4).collect();
                return Some(String::from_utf8(head).expect("ascii head"));
            }
            if !fill(s, buf).await {
                return None;
            }
        }
    }

    /// Reads the body the head announces, framing included as sent.
    async fn read_body_raw(s: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Vec<u8> {
        let lower = head.to_ascii_lowercase();
        let end = if let Some(l) = lower.split("content-length: ").nth(1) {
            let n: usize = l.split("\r\n").next().unwrap().parse().unwrap();
            while buf.len() < n && fill(s, buf).await {}
            n.min(buf.len())
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                // A complete chunked body ends with the last chunk and an
                // empty line (the bodies sent here hold no "0\r\n" inside).
                let last = find(buf, b"0\r\n").filter(|&p| p == 0 || buf[p - 1] == b'\n');
                if let Some(end) =
                    last.and_then(|p| find(&buf[p..], b"\r\n\r\n").map(|e| p + e + 4))
                {
                    break end;
                }
                if last.is_some_and(|p| &buf[p..] == b"0\r\n\r\n") {
                    break buf.len();
                }
                if !fill(s, buf).await {
                    break buf.len();
                }
            }
        } else {
            0
        };
        buf.drain(..end).collect()
    }

    async fn app(script: impl Fn(usize, usize, &str) -> Reply + Send + Sync + 'static) -> App {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepts = Arc::new(AtomicUsize::new(0));
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let (count, script) = (accepts.clone(), Arc::new(script));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let conn = count.fetch_add(1, Ordering::SeqCst);
                let (seen_tx, closed_tx, script) =
                    (seen_tx.clone(), closed_tx.clone(), script.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut n = 0;
                    while let Some(head) = read_head_raw(&mut s, &mut buf).await {
                        let reply = script(conn, n, &head);
                        n += 1;
                        if let Reply::Early(bytes) = reply {
                            let _ = s.write_all(bytes.as_bytes()).await;
                            let _ = seen_tx.send(Seen {
                                conn,
                                head,
                                body: Vec::new(),
                            });
                            while fill(&mut s, &mut buf).await {}
                            break;
                        }
                        if let Reply::Hold = reply {
                            let _ = seen_tx.send(Seen {
                                conn,
                                head,
                                body: Vec::new(),
                            });
                            while fill(&mut s, &mut buf).await {}
                            break;
                        }
                        let body = read_body_raw(&mut s, &mut buf, &head).await;
                        let _ = seen_tx.send(Seen { conn, head, body });
                        match reply {
                            Reply::Send(bytes) => {
                                let _ = s.write_all(bytes.as_bytes()).await;
                            }
                            Reply::SendClose(bytes) => {
                                let _ = s.write_all(bytes.as_bytes()).await;
                                return;
                            }
                            _ => return,
                        }
                    }
                    let _ = closed_tx.send(conn);
                });
            }
        });
        App {
            addr,
            accepts,
            seen,
            closed,
        }
    }

    fn always(bytes: &'static str) -> impl Fn(usize, usize, &str) -> Reply + Send + Sync {
        move |_, _, _| Reply::Send(bytes)
    }

    fn pool_with(addr: &str, idle: Duration, bounds: AppBounds) -> Arc<H1Pool> {
        H1Pool::new(addr, Duration::from_secs(1), idle, 1024, bounds)
    }

    fn pool(addr: &str) -> Arc<H1Pool> {
        pool_with(addr, Duration::from_secs(10), bounds())
    }

    fn bounds() -> AppBounds {
        AppBounds {
            max_connections: 8,
            max_per_peer: 8,
            body_timeout: Duration::from_secs(1),
        }
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        Request::get(path).body(Empty::new()).unwrap()
    }

    fn with_method(method: Method, path: &str) -> Request<Empty<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Empty::new())
            .unwrap()
    }

    async fn send<B: SendBody>(
        pool: &Arc<H1Pool>,
        req: Request<B>,
    ) -> Result<Response<AppBody>, AppError> {
        tokio::time::timeout(WAIT, pool.request(req, None))
            .await
            .expect("the request neither completed nor failed")
    }

    /// The body and trailers of a response.
    async fn read(resp: Response<AppBody>) -> (Vec<u8>, Option<http::HeaderMap>) {
        let c = tokio::time::timeout(WAIT, resp.into_body().collect())
            .await
            .expect("the body never ended")
            .expect("the body failed");
        let t = c.trailers().cloned();
        (c.to_bytes().to_vec(), t)
    }

    #[tokio::test]
    async fn a_content_length_response_is_read_and_its_connection_reused() {
        let app = app(always("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")).await;
        let pool = pool(&app.addr);
        for _ in 0..3 {
            let resp = send(&pool, get("/")).await.unwrap();
            assert_eq!(resp.body().size_hint().exact(), Some(5));
            assert_eq!(read(resp).await.0, b"hello");
        }
        assert_eq!(app.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_chunked_response_is_read_with_its_trailers() {
        let app = app(always(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;e=1\r\nde\r\n0\r\ngrpc-status: 0\r\n\r\n",
        ))
        .await;
        let pool = pool(&app.addr);
        for _ in 0..2 {
            let resp = send(&pool, get("/")).await.unwrap();
            assert!(!resp.headers().contains_key(http::header::TRANSFER_ENCODING));
            let (body, t) = read(resp).await;
            assert_eq!(body, b"abcde");
            assert_eq!(t.unwrap()["grpc-status"], "0");
        }
        assert_eq!(app.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_without_framing_is_read_until_the_close_and_not_reused() {
        let app = app(|_, _, _| Reply::SendClose("HTTP/1.1 200 OK\r\n\r\nuntil close")).await;
        let pool = pool(&app.addr);
        for _ in 0..2 {
            let resp = send(&pool, get("/")).await.unwrap();
            assert_eq!(read(resp).await.0, b"until close");
        }
        assert_eq!(app.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn head_204_and_304_responses_have_no_body_and_keep_the_connection() {
        let app = app(|_, n, _| {
            Reply::Send(match n {
                0 => "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                1 => "HTTP/1.1 204 No Content\r\n\r\n",
                2 => "HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
                _ => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            })
        })
        .await;
        let pool = pool(&app.addr);
        let resp = send(&pool, with_method(Method::HEAD, "/")).await.unwrap();
        // The length the GET would have had stays for the caller.
        assert_eq!(resp.headers()[http::header::CONTENT_LENGTH], "5");
        assert!(resp.body().is_end_stream());
        assert!(read(resp).await.0.is_empty());
        for status in [204, 304] {
            let resp = send(&pool, get("/")).await.unwrap();
            assert_eq!(resp.status(), status);
            assert!(read(resp).await.0.is_empty());
        }
        let resp = send(&pool, get("/")).await.unwrap();
        assert_eq!(read(resp).await.0, b"ok");
        assert_eq!(app.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let app = app(always(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        ))
        .await;
        let pool = pool(&app.addr);
        let resp = send(&pool, get("/")).await.unwrap();
        assert_eq!(resp.status(), 201);
        assert!(!resp.headers().contains_key("link"));
        assert_eq!(read(resp).await.0, b"ok");
    }

    /// Answers the first request on the first connection, then closes
    /// every connection at its next request without answering.
    fn answers_once(conn: usize, n: usize, _head: &str) -> Reply {
        if conn == 0 && n == 0 {
            Reply::Send("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        } else if conn == 0 {
            Reply::Close
        } else {
            Reply::Send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        }
    }

    #[tokio::test]
    async fn an_idempotent_request_on_a_pooled_connection_the_app_closed_goes_again_once() {
        let app = app(answers_once).await;
        let pool = pool(&app.addr);
        send(&pool, get("/")).await.unwrap();
        let resp = send(&pool, get("/"))
            .await
            .expect("retried on a new connection");
        assert_eq!(read(resp).await.0, b"fresh");
        assert_eq!(app.accepts.load(Ordering::SeqCst), 2);
    }

    /// Sends `req` on a pooled connection the app closes at it without an
    /// answer: it fails, and is not sent again on a new connection.
    async fn not_sent_again<B: SendBody>(req: Request<B>, why: &str) {
        let app = app(answers_once).await;
        let pool = pool(&app.addr);
        send(&pool, get("/")).await.unwrap();
        let e = send(&pool, req).await.expect_err(why);
        assert!(matches!(e, AppError::Failed(_)), "{e:?}");
        assert_eq!(app.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_post_on_a_pooled_connection_the_app_closed_is_not_sent_again() {
        let req = Request::post("/")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        not_sent_again(req, "a POST may have had effects").await;
    }

    #[tokio::test]
    async fn a_verified_step_up_request_is_not_sent_again() {
        // The app may have read and acted on it before it closed: a
        // single-use proof must reach it once, even on a GET.
        let mut req = get("/");
        req.headers_mut().insert(
            owned::STEP_UP_VERIFIED.clone(),
            http::HeaderValue::from_static("verified"),
        );
        not_sent_again(req, "a consumed proof is not sent twice").await;
    }

    #[tokio::test]
    async fn a_body_on_a_get_or_delete_has_its_connection_to_itself() {
        // An app that answers a GET without reading its body would parse
        // the body as the connection's next request: the caller's own,
        // that no route decided on. Such a request goes out with
        // `connection: close`, and its connection is never reused, even if
        // the app would keep it.
        let mut app = app(always("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).await;
        let pool = pool(&app.addr);
        for method in [Method::GET, Method::DELETE] {
            let req = Request::builder()
                .method(method.clone())
                .uri("/a")
                .body(Full::new(Bytes::from_static(
                    b"GET /admin HTTP/1.1\r\n\r\n",
                )))
                .unwrap();
            let resp = send(&pool, req).await.unwrap();
            read(resp).await;
            let s = app.seen.recv().await.unwrap();
            assert!(
                s.head.contains("\r\nconnection: close\r\n"),
                "{method}: {}",
                s.head
            );
        }
        assert_eq!(app.accepts.load(Ordering::SeqCst), 2, "one connection each");
        // Without a body, and a POST with one, keep the connection.
        send(&pool, get("/b")).await.map(read).unwrap().await;
        let post = Request::post("/c")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        send(&pool, post).await.map(read).unwrap().await;
        send(&pool, get("/d")).await.map(read).unwrap().await;
        assert_eq!(app.accepts.load(Ordering::SeqCst), 3);
        for _ in 0..3 {
            let s = app.seen.recv().await.unwrap();
            assert!(!s.head.contains("connection"), "{}", s.head);
        }
    }

    #[tokio::test]
    async fn a_retry_is_made_once_and_not_for_a_fresh_connection() {
        // Every connection after the first closes unanswered: the retry
        // fails as well, and is not retried again.
        let app = app(|conn, n, _| {
            if conn == 0 && n == 0 {
                Reply::Send("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            } else {
                Reply::Close
            }
        })
        .await;
        let pool = pool(&app.addr);
        send(&pool, get("/")).await.unwrap();
        let e = send(&pool, get("/")).await.expect_err("no answer");
        assert!(matches!(e, AppError::Failed(_)), "{e:?}");
        assert_eq!(app.accepts.load(Ordering::SeqCst), 2);
        // Nothing pooled now: a new connection that closes is final.
        let e = send(&pool, get("/")).await.expect_err("no answer");
        assert!(matches!(e, AppError::Failed(_)), "{e:?}");
        assert_eq!(app.accepts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_idle_connection_past_idle_timeout_is_not_reused_and_is_reaped() {
        let mut app = app(always("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).await;
        let pool = pool_with(&app.addr, Duration::from_millis(100), bounds());
        send(&pool, get("/")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        send(&pool, get("/")).await.unwrap();
        assert_eq!(app.accepts.load(Ordering::SeqCst), 2);
        // The first was dropped at checkout; the second is closed by the
        // reaper (every 250 ms at the least) once stale.
        let mut closed = Vec::new();
        for _ in 0..2 {
            let c = tokio::time::timeout(WAIT, app.closed.recv()).await;
            closed.push(c.expect("an idle connection stayed open"));
        }
        closed.sort();
        assert_eq!(closed, [Some(0), Some(1)]);
    }

    #[tokio::test]
    async fn a_request_body_stalled_past_body_timeout_fails_with_body_timeout() {
        let app = app(|_, _, _| Reply::Hold).await;
        let stall = Duration::from_millis(100);
        let pool = pool_with(
            &app.addr,
            Duration::from_secs(10),
            AppBounds {
                max_connections: 8,
                max_per_peer: 8,
                body_timeout: stall,
            },
        );
        let req = Request::post("/")
            .body(TestBody::stalling(&["abc"], None))
            .unwrap();
        let e = send(&pool, req).await.expect_err("stalled");
        assert!(matches!(e, AppError::BodyTimeout(d) if d == stall), "{e:?}");
    }

    #[tokio::test]
    async fn a_response_head_larger_than_max_head_is_refused() {
        let big: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nx: {}\r\nContent-Length: 0\r\n\r\n",
                "a".repeat(2000)
            )
            .into_boxed_str(),
        );
        let app = app(always(big)).await;
        let e = send(&pool(&app.addr), get("/"))
            .await
            .expect_err("too large");
        assert!(
            matches!(&e, AppError::Failed(m) if m.contains("larger than 1024")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn request_bodies_are_framed_by_their_known_size_or_chunked() {
        let mut app = app(always("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).await;
        let pool = pool(&app.addr);
        let mut seen = Vec::new();
        let sized = Request::put("/a?q")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        send(&pool, sized).await.unwrap();
        let streamed = Request::post("/b")
            .body(TestBody::steps(
                vec![data("ab"), data("cd"), trailers(&[("x-t", "1")])],
                None,
            ))
            .unwrap();
        send(&pool, streamed).await.unwrap();
        send(
            &pool,
            Request::post("/c").body(Empty::<Bytes>::new()).unwrap(),
        )
        .await
        .unwrap();
        send(&pool, get("/d")).await.unwrap();
        for _ in 0..4 {
            let s = app.seen.recv().await.unwrap();
            assert_eq!(s.conn, 0, "one connection for all");
            seen.push((s.head, String::from_utf8(s.body).unwrap()));
        }
        assert_eq!(seen[0].0, "PUT /a?q HTTP/1.1\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(seen[0].1, "hello");
        assert_eq!(
            seen[1].0,
            "POST /b HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(seen[1].1, "2\r\nab\r\n2\r\ncd\r\n0\r\nx-t: 1\r\n\r\n");
        assert_eq!(seen[2].0, "POST /c HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(seen[3].0, "GET /d HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn a_request_body_that_breaks_its_declared_size_fails() {
        let app = app(always("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).await;
        let pool = pool(&app.addr);
        for (steps, hint, why) in [
            (vec![data("abc")], 10, "ended after 3 of 10"),
            (vec![data("abc")], 2, "longer than its 2"),
        ] {
            let req = Request::post("/")
                .body(TestBody::steps(steps, Some(hint)))
                .unwrap();
            let e = send(&pool, req).await.expect_err(why);
            assert!(
                matches!(&e, AppError::Failed(m) if m.contains(why)),
                "{e:?}"
            );
        }
        let req = Request::post("/")
            .body(TestBody::steps(vec![data("a"), Err("broken".into())], None))
            .unwrap();
        let e = send(&pool, req).await.expect_err("the body failed");
        assert!(
            matches!(&e, AppError::Failed(m) if m.contains("broken")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn requests_beyond_max_connections_wait_for_a_slot_up_to_the_connect_timeout() {
        let app = app(always("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
        let pool = H1Pool::new(
            &app.addr,
            Duration::from_millis(150),
            Duration::from_secs(10),
            1024,
            AppBounds {
                max_connections: 1,
                max_per_peer: 1,
                body_timeout: Duration::from_secs(1),
            },
        );
        // The slot is held until the response body ends (the first
        // response's body is not read yet).
        let held = send(&pool, get("/")).await.unwrap();
        let e = send(&pool, get("/")).await.expect_err("no slot");
        assert!(matches!(e, AppError::Unavailable(_)), "{e:?}");
        // A waiting request gets the slot as soon as it is free.
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.request(get("/"), None).await.map(|r| r.status()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(read(held).await.0, b"ok");
        assert_eq!(waiting.await.unwrap().unwrap(), 200);
    }

    #[tokio::test]
    async fn one_caller_holds_at_most_its_share_and_others_are_served_past_it() {
        let app = app(always("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
        let pool = H1Pool::new(
            &app.addr,
            Duration::from_millis(150),
            Duration::from_secs(10),
            1024,
            AppBounds {
                max_connections: 4,
                max_per_peer: 2,
                body_timeout: Duration::from_secs(1),
            },
        );
        let (greedy, other) = (Arc::new(Semaphore::new(2)), Arc::new(Semaphore::new(2)));
        // The greedy caller's answers are not read: it holds 2 connections.
        let a = pool.request(get("/"), Some(&greedy)).await.unwrap();
        let b = pool.request(get("/"), Some(&greedy)).await.unwrap();
        let e = pool
            .request(get("/"), Some(&greedy))
            .await
            .expect_err("beyond its share");
        assert!(
            matches!(&e, AppError::Unavailable(m) if m.contains("max_app_connections_per_peer")),
            "{e:?}"
        );
        // Another caller is served at once, from the connections left.
        let r = pool.request(get("/"), Some(&other)).await.unwrap();
        assert_eq!(read(r).await.0, b"ok");
        // Its share back, the greedy caller is served again.
        assert_eq!(read(a).await.0, b"ok");
        let r = pool.request(get("/"), Some(&greedy)).await.unwrap();
        assert_eq!(read(r).await.0, b"ok");
        drop(b);
    }

    #[tokio::test]
    async fn nothing_listening_is_refused() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let e = send(&pool(&addr), get("/")).await.expect_err("refused");
        assert!(matches!(e, AppError::Refused(_)), "{e:?}");
    }

    #[tokio::test]
    async fn an_app_that_answers_before_the_body_ends_is_answered_through() {
        let app = app(|_, _, _| {
            Reply::Early("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        })
        .await;
        let pool = pool(&app.addr);
        let (feed, body) = TestBody::channel(None);
        feed.send(data("start")).unwrap();
        let resp = send(&pool, Request::post("/").body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(read(resp).await.0, b"big");
        drop(feed);
        // The connection still carried the rest of the body: not reused.
        let resp = send(&pool, get("/")).await.unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(app.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_response_body_cut_short_fails_with_incomplete() {
        let app =
            app(|_, _, _| Reply::SendClose("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
                .await;
        let pool = pool(&app.addr);
        let resp = send(&pool, get("/")).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "abc");
        let e = body.frame().await.unwrap().expect_err("cut short");
        assert!(matches!(e, AppBodyError::Incomplete), "{e:?}");
    }

    #[tokio::test]
    async fn connections_that_cannot_carry_another_response_are_not_reused() {
        for first in [
            // The app says so.
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            // HTTP/1.0 without keep-alive.
            "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            // Bytes beyond the response.
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
        ] {
            let app = app(move |conn, _, _| {
                Reply::Send(if conn == 0 {
                    first
                } else {
                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                })
            })
            .await;
            let pool = pool(&app.addr);
            for _ in 0..2 {
                let resp = send(&pool, get("/")).await.unwrap();
                assert_eq!(read(resp).await.0, b"ok", "{first:?}");
            }
            assert_eq!(app.accepts.load(Ordering::SeqCst), 2, "{first:?}");
        }
        // A body dropped before its end takes its connection with it.
        let app = app(always("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
        let pool = pool(&app.addr);
        drop(send(&pool, get("/")).await.unwrap());
        let resp = send(&pool, get("/")).await.unwrap();
        assert_eq!(read(resp).await.0, b"ok");
        assert_eq!(app.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_101_or_malformed_response_fails_the_request() {
        for bad in [
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            let app = app(always(bad)).await;
            let e = send(&pool(&app.addr), get("/")).await.expect_err(bad);
            assert!(matches!(e, AppError::Failed(_)), "{bad:?}: {e:?}");
        }
    }

    #[tokio::test]
    async fn h2c_passes_the_authority_and_redials_a_closed_connection() {
        use hyper::server::conn::http2 as server;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepts = Arc::new(AtomicUsize::new(0));
        let count = accepts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                // Each connection serves one request, then goes away.
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let authority = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        authority,
                    ))))
                });
                let conn = server::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(tcp), svc);
                tokio::spawn(async move {
                    let mut conn = std::pin::pin!(conn);
                    let _ = tokio::time::timeout(Duration::from_millis(50), conn.as_mut()).await;
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
        });
        let h2c = h2c_pool(&addr, 8, 8, Duration::from_secs(1));
        for _ in 0..2 {
            let req = Request::get("http://caller.example/x")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = tokio::time::timeout(WAIT, h2c.request(req, None))
                .await
                .unwrap()
                .unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "caller.example");
            // Past the server's 50 ms: the connection is closed.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
    }

    /// An h2c app allowing `max_streams` concurrent streams: `/collect`
    /// answers once the whole request body is in; anything else echoes the
    /// request body (data and trailers) as it arrives, after an immediate
    /// head. Counts its connections.
    async fn h2_app(max_streams: u32) -> (String, Arc<AtomicUsize>) {
        use hyper::server::conn::http2 as server;
        type Reply = http_body_util::Either<Full<Bytes>, Incoming>;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepts = Arc::new(AtomicUsize::new(0));
        let count = accepts.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let reply: Reply = if req.uri().path() == "/collect" {
                        let got = req.into_body().collect().await;
                        let got = got.map(|c| c.to_bytes()).unwrap_or_default();
                        http_body_util::Either::Left(Full::new(got))
                    } else {
                        http_body_util::Either::Right(req.into_body())
                    };
                    Ok::<_, std::convert::Infallible>(Response::new(reply))
                });
                let conn = server::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(max_streams)
                    .serve_connection(TokioIo::new(tcp), svc);
                tokio::spawn(conn);
            }
        });
        (addr, accepts)
    }

    fn h2c_pool(
        addr: &str,
        max_connections: usize,
        max_per_peer: usize,
        body_timeout: Duration,
    ) -> Arc<H2cPool> {
        H2cPool::new(
            addr,
            Duration::from_millis(150),
            Duration::from_millis(300),
            16 * 1024,
            AppBounds {
                max_connections,
                max_per_peer,
                body_timeout,
            },
        )
    }

    fn h2c_req<B>(path: &str, body: B) -> Request<B> {
        Request::post(format!("http://app.example{path}"))
            .body(body)
            .unwrap()
    }

    /// A request whose body never ends: its echoed response never ends
    /// either, and holds its stream until dropped.
    async fn h2c_hold(
        pool: &Arc<H2cPool>,
        share: Option<&Arc<Semaphore>>,
    ) -> (Feed, Response<H2cBody>) {
        let (feed, body) = TestBody::channel(None);
        let resp = tokio::time::timeout(WAIT, pool.request(h2c_req("/echo", body), share))
            .await
            .expect("a stream")
            .expect("an answer");
        (feed, resp)
    }

    async fn h2c_unary(
        pool: &Arc<H2cPool>,
        share: Option<&Arc<Semaphore>>,
    ) -> Result<Bytes, AppError> {
        let req = h2c_req("/echo", Full::new(Bytes::from_static(b"ping")));
        let resp = tokio::time::timeout(WAIT, pool.request(req, share))
            .await
            .expect("neither answered nor failed")?;
        Ok(resp.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn an_h2c_caller_holding_its_share_waits_while_another_caller_is_served() {
        let (addr, _) = h2_app(2).await;
        let pool = h2c_pool(&addr, 8, 1, Duration::from_secs(5));
        let (greedy, other) = (Arc::new(Semaphore::new(1)), Arc::new(Semaphore::new(1)));
        let (_feed, held) = h2c_hold(&pool, Some(&greedy)).await;
        let e = h2c_unary(&pool, Some(&greedy))
            .await
            .expect_err("beyond its share");
        assert!(
            matches!(&e, AppError::Unavailable(m) if m.contains("max_app_connections_per_peer")),
            "{e:?}"
        );
        assert_eq!(h2c_unary(&pool, Some(&other)).await.unwrap(), "ping");
        // A waiting request gets the share as soon as the stream ends.
        let waiting = tokio::spawn({
            let (pool, greedy) = (pool.clone(), greedy.clone());
            async move { h2c_unary(&pool, Some(&greedy)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert_eq!(waiting.await.unwrap().unwrap(), "ping");
    }

    #[tokio::test]
    async fn a_caller_that_reads_none_of_its_responses_stalls_no_other_caller() {
        let (addr, accepts) = h2_app(100).await;
        let pool = h2c_pool(&addr, 16, 8, Duration::from_secs(5));
        let (greedy, other) = (Arc::new(Semaphore::new(8)), Arc::new(Semaphore::new(8)));
        // Three echoes of 3 MiB, none read: their data takes the whole
        // connection window (5 MiB), 2 MiB a stream.
        let mut held = Vec::new();
        for _ in 0..3 {
            let (feed, resp) = h2c_hold(&pool, Some(&greedy)).await;
            for _ in 0..48 {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                feed.send(Ok(Frame::data(chunk))).expect("body alive");
            }
            held.push((feed, resp));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // On a connection of its own, the other caller is served at once.
        let served = tokio::time::timeout(WAIT, h2c_unary(&pool, Some(&other)))
            .await
            .expect("the other caller's response stalled behind the unread ones");
        assert_eq!(served.unwrap(), "ping");
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
        drop(held);
    }

    #[tokio::test]
    async fn a_full_h2c_connection_gets_another_beside_it_up_to_max_connections() {
        let (addr, accepts) = h2_app(2).await;
        let pool = h2c_pool(&addr, 3, 3, Duration::from_secs(5));
        let (_f1, r1) = h2c_hold(&pool, None).await;
        let (_f2, _r2) = h2c_hold(&pool, None).await;
        assert_eq!(accepts.load(Ordering::SeqCst), 1);
        // The app's 2 streams are in use: a second connection, at once.
        let (f3, r3) = h2c_hold(&pool, None).await;
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
        // 3 streams, max_connections: the next waits, then 503.
        let e = h2c_unary(&pool, None).await.expect_err("no stream left");
        assert!(
            matches!(&e, AppError::Unavailable(m) if m.contains("(inbound.max_app_connections)")),
            "{e:?}"
        );
        // A stream given back is taken again, on the connection it was on.
        drop(r1);
        assert_eq!(h2c_unary(&pool, None).await.unwrap(), "ping");
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
        // The burst over, the second connection is closed once idle for the
        // idle timeout (300 ms), while the first carries on.
        drop((f3, r3));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (_f4, _r4) = h2c_hold(&pool, None).await;
        assert_eq!(pool.connections(), 1);
        assert_eq!(accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_h2c_body_stalled_before_the_head_times_out_but_not_after() {
        let (addr, _) = h2_app(2).await;
        let stall = Duration::from_millis(100);
        let pool = h2c_pool(&addr, 8, 8, stall);
        let req = h2c_req("/collect", TestBody::stalling(&["abc"], None));
        let e = tokio::time::timeout(WAIT, pool.request(req, None))
            .await
            .expect("the stall is bounded")
            .expect_err("stalled");
        assert!(matches!(e, AppError::BodyTimeout(d) if d == stall), "{e:?}");
        // The stream was reset and given back.
        assert_eq!(pool.streams.available_permits(), 8);
        // Once the head is in, a quiet body is left alone (a gRPC
        // bidirectional stream), and trailers pass both ways.
        let (feed, resp) = h2c_hold(&pool, None).await;
        let mut body = resp.into_body();
        feed.send(data("a")).unwrap();
        let f = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "a");
        tokio::time::sleep(stall * 3).await;
        feed.send(data("b")).unwrap();
        feed.send(trailers(&[("grpc-status", "0")])).unwrap();
        let f = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "b");
        let f = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
        let t = f.unwrap().unwrap().into_trailers().unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert!(body.frame().await.is_none());
        assert_eq!(pool.streams.available_permits(), 8);
    }

    #[tokio::test]
    async fn the_app_is_dialled_from_127_0_0_6_when_on_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (dialled, accepted) = tokio::join!(dial_app(addr), l.accept());
        dialled.expect("dialled");
        let (_, from) = accepted.expect("accepted");
        assert_eq!(from.ip(), std::net::IpAddr::from(APP_SOURCE));
        // By name too, and many times over (ports of the source reused).
        for _ in 0..200 {
            let (d, a) = tokio::join!(dial_app(format!("localhost:{}", addr.port())), l.accept());
            drop(d.expect("dialled by name"));
            drop(a.expect("accepted"));
        }
        // Round 12 verification VA3: other spellings of loopback are
        // dialled on IPv4 from APP_SOURCE, IPv6 loopback not at all.
        for spelt in [
            format!("0:{}", addr.port()),
            format!("0.0.0.0:{}", addr.port()),
            format!("[::ffff:127.0.0.1]:{}", addr.port()),
        ] {
            let (d, a) = tokio::join!(dial_app(spelt.clone()), l.accept());
            drop(d.expect("dialled"));
            let (_, from) = a.expect("accepted");
            assert_eq!(from.ip(), std::net::IpAddr::from(APP_SOURCE), "{spelt}");
        }
        let e = dial_app(format!("[::1]:{}", addr.port()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }
}
