//! What the inbound and outbound listeners share: binding, an accept loop
//! with backpressure, connection tracking for drain, and serving one HTTP
//! connection with idle and shutdown handling.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;

/// Binds a listener with a deep backlog (excess clients wait there when
/// `max_connections` is reached, rather than being refused).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

/// Resolves once the shutdown flag is set (immediately if it already is).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it before returning.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Counts live connection tasks so that shutdown can wait for them.
#[derive(Debug, Default)]
pub struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

/// Held by a connection task; its drop marks the connection finished.
#[derive(Debug)]
pub struct TrackGuard(Arc<Tracker>);

impl Tracker {
    /// Registers a connection.
    pub fn track(self: &Arc<Self>) -> TrackGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        TrackGuard(self.clone())
    }

    /// Resolves once no connection is live.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What a connection task holds for its whole life.
#[derive(Debug)]
pub struct ConnGuards {
    _permit: OwnedSemaphorePermit,
    _track: TrackGuard,
}

/// Accepts until shutdown. A permit is taken *before* `accept`, so at the
/// connection limit the proxy simply stops accepting and the kernel backlog
/// applies backpressure, instead of accepting and then dropping.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    tracker: Arc<Tracker>,
    mut shutdown: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr, ConnGuards) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(&mut shutdown) => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped(&mut shutdown) => return,
        };
        match accepted {
            Ok((tcp, remote)) => {
                // Small request/response exchanges must not wait for Nagle.
                let _ = tcp.set_nodelay(true);
                let guards = ConnGuards {
                    _permit: permit,
                    _track: tracker.track(),
                };
                tokio::spawn(handler(tcp, remote, guards));
            }
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counts I/O on a connection so a watchdog can tell it is idle without a
/// clock read per syscall.
pub struct ActivityIo<T> {
    inner: T,
    activity: Arc<AtomicU64>,
}

impl<T> ActivityIo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, activity: Arc<AtomicU64>) -> Self {
        ActivityIo { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() {
            self.activity.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.activity.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            self.activity.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Resolves after a full `idle` period with no I/O (so between one and two
/// periods after the last byte).
async fn idle_watch(activity: Arc<AtomicU64>, idle: Duration) {
    let mut seen = activity.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(idle).await;
        let now = activity.load(Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Which server builder a connection gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// ALPN said http/1.1.
    Http1,
    /// ALPN said h2.
    H2,
    /// Unknown: detect from the first bytes (h2 prior knowledge or HTTP/1).
    Detect,
}

/// The server builders, configured once from the listener's limits.
pub struct Builders {
    /// HTTP/1: hyper's own builder, which can bound the request head to
    /// exactly `max_header_bytes` (the auto builder only bounds its read
    /// buffer, which a single large read overshoots).
    strict_h1: hyper::server::conn::http1::Builder,
    h2: auto::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    max_header_bytes: usize,
}

impl Builders {
    /// Builders enforcing `limits`.
    pub fn new(limits: &Limits) -> Builders {
        let make = |which: Proto| {
            let mut b = auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .keep_alive(true);
            b.http2()
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
                .max_concurrent_streams(1000)
                .keep_alive_interval(Some(Duration::from_secs(60)))
                .keep_alive_timeout(Duration::from_secs(20));
            match which {
                Proto::Http1 => b.http1_only(),
                Proto::H2 => b.http2_only(),
                Proto::Detect => b,
            }
        };
        let mut strict_h1 = hyper::server::conn::http1::Builder::new();
        strict_h1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // Room for a whole head of the limit plus what follows it in
            // the same read; a head still incomplete beyond it is too large
            // anyway.
            .max_buf_size(limits.max_header_bytes.max(8192) + 16 * 1024)
            .max_header_size(limits.max_header_bytes)
            .max_headers(MAX_HEADERS)
            .keep_alive(true);
        Builders {
            strict_h1,
            h2: make(Proto::H2),
            header_read_timeout: limits.header_read_timeout,
            max_header_bytes: limits.max_header_bytes,
        }
    }
}

/// Most fields in an HTTP/1 request head, as the proxy's own parser allows.
const MAX_HEADERS: usize = 128;

/// The HTTP/2 client preface: a connection without ALPN that opens with it
/// speaks HTTP/2 (prior knowledge).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the first bytes of a connection that negotiated no protocol, as
/// far as needed to tell the HTTP/2 preface from an HTTP/1 request.
async fn sniff<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<(bool, Vec<u8>)> {
    let mut seen = [0u8; 24];
    let mut n = 0;
    while n < PREFACE.len() {
        let mut rb = ReadBuf::new(&mut seen[n..]);
        std::future::poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut rb)).await?;
        let got = rb.filled().len();
        if got == 0 {
            break;
        }
        n += got;
        if seen[..n] != PREFACE[..n] {
            return Ok((false, seen[..n].to_vec()));
        }
    }
    Ok((n == PREFACE.len(), seen[..n].to_vec()))
}

/// A connection whose first bytes were read already: they are read again
/// first.
struct Rewind<I> {
    pre: Vec<u8>,
    at: usize,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.pre.len() {
            let n = (self.pre.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.pre[at..at + n]);
            self.at += n;
            if self.at == self.pre.len() {
                self.pre = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves HTTP on one connection until the peer is done, the connection is
/// idle for `idle`, or shutdown starts. Idle and shutdown are both graceful:
/// an in-flight request still completes.
pub async fn serve<I, S, B>(
    builders: &Builders,
    proto: Proto,
    io: I,
    activity: Arc<AtomicU64>,
    idle: Duration,
    svc: S,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let h2 = match proto {
        Proto::H2 => true,
        Proto::Http1 => false,
        Proto::Detect => {
            // Rare: only a client that offered no ALPN. The same limits
            // apply whichever protocol it turns out to speak.
            let mut io = io;
            let first = tokio::select! {
                r = sniff(&mut io) => r?,
                _ = tokio::time::sleep(builders.header_read_timeout) => return Ok(()),
                _ = stopped(&mut shutdown) => return Ok(()),
            };
            let (h2, pre) = first;
            let io = Rewind {
                pre,
                at: 0,
                inner: io,
            };
            return Box::pin(serve_as(builders, h2, io, activity, idle, svc, shutdown)).await;
        }
    };
    serve_as(builders, h2, io, activity, idle, svc, shutdown).await
}

async fn serve_as<I, S, B>(
    builders: &Builders,
    h2: bool,
    io: I,
    activity: Arc<AtomicU64>,
    idle: Duration,
    svc: S,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Pinned here and lent to `drive`: passed by value, the connection's
    // state (most of what an idle connection costs) would be stored twice,
    // as `drive`'s argument and as its pinned local.
    if h2 {
        let conn = pin!(builders.h2.serve_connection(TokioIo::new(io), svc));
        return drive(
            conn,
            |c| c.graceful_shutdown(),
            activity,
            idle,
            &mut shutdown,
        )
        .await;
    }
    let io = crate::h1_guard::StrictLines::new(io, builders.max_header_bytes);
    let conn = pin!(builders.strict_h1.serve_connection(TokioIo::new(io), svc));
    drive(
        conn,
        |c| c.graceful_shutdown(),
        activity,
        idle,
        &mut shutdown,
    )
    .await
    .map_err(Into::into)
}

/// Runs a connection's future until it ends. When the connection has been
/// idle for `idle`, or shutdown starts, `graceful` asks it to finish (an
/// in-flight request still completes) and it is polled on until it does.
pub async fn drive<C: Future>(
    mut conn: Pin<&mut C>,
    mut graceful: impl FnMut(Pin<&mut C>),
    activity: Arc<AtomicU64>,
    idle: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> C::Output {
    let mut stop = pin!(stopped(shutdown));
    let mut idle_fut = pin!(idle_watch(activity, idle));
    // The shutdown and idle futures are polled only when they have woken
    // the task, not on every wake of a busy connection (polling them costs
    // a lock and a timer check, per request): they get a waker of their own
    // that marks them due before waking the task.
    let aux = Arc::new(AuxWake {
        due: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let aux_waker = Waker::from(aux.clone());
    let mut closing = false;
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if closing {
            return Poll::Pending;
        }
        aux.task.register(cx.waker());
        if !aux.due.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut acx = Context::from_waker(&aux_waker);
        if stop.as_mut().poll(&mut acx).is_ready() || idle_fut.as_mut().poll(&mut acx).is_ready() {
            graceful(conn.as_mut());
            closing = true;
        }
        // Round again: the connection is polled after `graceful`, and the
        // auxiliary futures until they are pending.
    })
    .await
}

/// The waker of `serve`'s shutdown and idle futures: marks them due, then
/// wakes the connection's task.
struct AuxWake {
    due: AtomicBool,
    task: AtomicWaker,
}

impl Wake for AuxWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        self.task.wake();
    }
}
