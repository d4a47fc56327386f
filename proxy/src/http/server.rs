//! Serving one accepted connection: HTTP/2 on `h2_server.rs`, HTTP/1.1 on
//! hyper behind the bare-LF guard, both with idle and shutdown handling;
//! `drive` gives the same handling to the sidecar's own HTTP/1.1 server.
//! Binding, accepting and tracking connections is `listener.rs`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::config::Limits;
use crate::error::BoxError;
use crate::http::frame_guard::PeerAddr;
use crate::http::h1_guard::StrictLines;
use crate::http::h2_server;
use crate::http::h2_stream::MeshBody;
use crate::http::io::{Lingering, Rewind, WriteStall};
use crate::http::map_in_place::map_in_place;
use crate::http::traits::SendBody;
use crate::memory::Holder;

/// Resolves once the shutdown flag is set (immediately if it already is).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it before returning.
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Added to a connection's activity word for each sign of progress that is
/// not a stream (the outbound's HTTP/1.1 server counts its reads and writes
/// this way). The low 32 bits count streams in flight.
pub const PROGRESS: u64 = 1 << 32;

/// A connection's activity word: streams started and in flight (see
/// [`StreamGuard`]), plus [`PROGRESS`] ticks. The idle watch reads it: the
/// connection is idle when the word has not changed for a whole period and
/// no stream is in flight. Bytes alone (HTTP/2 PING, SETTINGS,
/// WINDOW_UPDATE) are not activity: a peer that only sends those is idle.
pub type Activity = Arc<AtomicU64>;

/// Held by a request's service future: the request counts as in flight
/// until the response head is produced. One atomic add each way; no clock.
pub struct StreamGuard(Activity);

impl StreamGuard {
    /// Marks a stream started and in flight on `activity`.
    pub fn start(activity: &Activity) -> StreamGuard {
        activity.fetch_add(PROGRESS + 1, Ordering::Relaxed);
        StreamGuard(activity.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once a full `idle` period has passed with no new stream, no
/// stream in flight and no [`PROGRESS`] (so between one and two periods
/// after the last sign of life).
async fn idle_watch(activity: Activity, idle: Duration) {
    let mut seen = activity.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(idle).await;
        let now = activity.load(Ordering::Relaxed);
        if now == seen && now & 0xffff_ffff == 0 {
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
    /// exactly `max_header_bytes`.
    strict_h1: hyper::server::conn::http1::Builder,
    h2: h2_server::Settings,
    header_read_timeout: Duration,
    max_header_bytes: usize,
}

impl Builders {
    /// Builders enforcing `limits`; `extended_connect`: HTTP/2 callers
    /// may switch protocols (see [`h2_server::Settings`]).
    pub fn new(limits: &Limits, extended_connect: bool) -> Builders {
        let h2 = h2_server::Settings {
            max_header_list_size: u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
            max_concurrent_streams: limits.max_concurrent_streams,
            keep_alive_interval: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(20),
            send_stall: limits.body_timeout,
            extended_connect,
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
            h2,
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

/// Serves HTTP on one connection until the peer is done, the connection is
/// idle for `idle` (no stream in flight, none started: the service counts
/// its requests with [`StreamGuard`]), or shutdown starts. Idle and shutdown are both graceful:
/// an in-flight request still completes. Request heads are charged to
/// `holder` (`memory.rs`): HTTP/2's each until its handler answers,
/// HTTP/1.1's while one spans reads.
#[allow(clippy::too_many_arguments)]
pub async fn serve<I, S, R, F, B>(
    builders: &Builders,
    proto: Proto,
    io: I,
    holder: Arc<Holder>,
    activity: Activity,
    idle: Duration,
    svc: S,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + PeerAddr + Unpin + Send + 'static,
    S: Fn(http::Request<R>) -> F + Send + 'static,
    R: From<Incoming> + From<MeshBody> + Send + 'static,
    F: Future<Output = http::Response<B>> + Send + 'static,
    B: SendBody,
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
            let io = Rewind::new(pre, io);
            return Box::pin(serve_as(
                builders, h2, io, holder, activity, idle, svc, shutdown,
            ))
            .await;
        }
    };
    serve_as(builders, h2, io, holder, activity, idle, svc, shutdown).await
}

#[allow(clippy::too_many_arguments)]
async fn serve_as<I, S, R, F, B>(
    builders: &Builders,
    h2: bool,
    io: I,
    holder: Arc<Holder>,
    activity: Activity,
    idle: Duration,
    svc: S,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + PeerAddr + Unpin + Send + 'static,
    S: Fn(http::Request<R>) -> F + Send + 'static,
    R: From<Incoming> + From<MeshBody> + Send + 'static,
    F: Future<Output = http::Response<B>> + Send + 'static,
    B: SendBody,
{
    // Pinned here and lent to `drive`: passed by value, the connection's
    // state (most of what an idle connection costs) would be stored twice,
    // as `drive`'s argument and as its pinned local.
    if h2 {
        let conn = pin!(h2_server::Connection::new(&builders.h2, io, holder, svc));
        return drive(
            conn,
            |c| c.graceful_shutdown(),
            activity,
            idle,
            &mut shutdown,
        )
        .await;
    }
    // A caller that reads none of a response for `body_timeout` loses the
    // connection (HTTP/2 resets the one stream instead: `send_body`).
    let io = StrictLines::new(
        Lingering::new(WriteStall::new(io, builders.h2.send_stall)),
        builders.max_header_bytes,
    )
    .charged_to(holder);
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        map_in_place(svc(req.map(R::from)), Ok::<_, Infallible>)
    });
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
    activity: Activity,
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;
    use http_body_util::Empty;

    use super::*;
    use crate::http::body::RequestBody;

    fn limits() -> Limits {
        Limits {
            handshake_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_millis(200),
            tcp_idle_timeout: Duration::from_millis(200),
            max_header_bytes: 16384,
            max_connections: 4,
            max_handshakes: 4,
            max_concurrent_streams: 2,
            body_timeout: Duration::from_secs(1),
        }
    }

    /// An h2 server on one end of an in-memory pipe whose requests take
    /// `delay`; resolves when the connection ends.
    fn h2_server(
        io: tokio::io::DuplexStream,
        idle: Duration,
        delay: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let activity: Activity = Default::default();
        let streams = activity.clone();
        let svc = move |_req: http::Request<RequestBody>| {
            let g = StreamGuard::start(&streams);
            async move {
                tokio::time::sleep(delay).await;
                drop(g);
                http::Response::new(Empty::<Bytes>::new())
            }
        };
        tokio::spawn(async move {
            let b = Builders::new(&limits(), false);
            let (_tx, rx) = watch::channel(false);
            let _ = serve(&b, Proto::H2, io, Arc::default(), activity, idle, svc, rx).await;
        })
    }

    #[tokio::test]
    async fn an_h2_peer_sending_only_pings_is_closed_at_the_idle_timeout() {
        let (cli, srv) = tokio::io::duplex(64 * 1024);
        let idle = Duration::from_millis(200);
        let server = h2_server(srv, idle, Duration::ZERO);
        let (_send, mut conn) = h2::client::handshake(cli).await.expect("h2 handshake");
        let mut pings = conn.ping_pong().expect("ping_pong");
        let client = tokio::spawn(conn);
        let start = Instant::now();
        // A PING every 20 ms: bytes flow both ways all the time.
        let pinger = tokio::spawn(async move {
            loop {
                if pings.ping(h2::Ping::opaque()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("the server kept a connection with no stream open")
            .expect("server task");
        let took = start.elapsed();
        assert!(took >= idle, "closed before the idle timeout: {took:?}");
        assert!(took < idle * 3, "closed late: {took:?}");
        let _ = tokio::time::timeout(Duration::from_secs(1), client).await;
        pinger.abort();
    }

    #[tokio::test]
    async fn a_request_in_flight_keeps_the_connection_past_the_idle_timeout() {
        let (cli, srv) = tokio::io::duplex(64 * 1024);
        let idle = Duration::from_millis(100);
        let server = h2_server(srv, idle, Duration::from_millis(500));
        let (mut send, conn) = h2::client::handshake(cli).await.expect("h2 handshake");
        tokio::spawn(conn);
        let req = http::Request::get("http://x/").body(()).expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        let resp = tokio::time::timeout(Duration::from_secs(3), resp)
            .await
            .expect("response in time")
            .expect("response, not a reset");
        assert_eq!(resp.status(), http::StatusCode::OK);
        // Then idle: closed.
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("closed once idle")
            .expect("server task");
    }

    const WAIT: Duration = Duration::from_secs(2);

    /// Serves `io` as `proto` with a service whose requests take `delay`
    /// and answer "done"; the sender starts shutdown.
    fn serve_pipe<I: AsyncRead + AsyncWrite + PeerAddr + Unpin + Send + 'static>(
        proto: Proto,
        io: I,
        limits: Limits,
        delay: Duration,
    ) -> (
        watch::Sender<bool>,
        tokio::task::JoinHandle<Result<(), String>>,
    ) {
        let activity: Activity = Default::default();
        let streams = activity.clone();
        let svc = move |_req: http::Request<RequestBody>| {
            let g = StreamGuard::start(&streams);
            async move {
                tokio::time::sleep(delay).await;
                drop(g);
                http::Response::new(http_body_util::Full::new(Bytes::from_static(b"done")))
            }
        };
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let b = Builders::new(&limits, false);
            serve(
                &b,
                proto,
                io,
                Arc::default(),
                activity,
                limits.idle_timeout,
                svc,
                rx,
            )
            .await
            .map_err(|e| e.to_string())
        });
        (tx, task)
    }

    /// Everything the server sends until it closes.
    async fn read_to_close(io: &mut tokio::io::DuplexStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, io.read_to_end(&mut out))
            .await
            .expect("the server did not close")
            .expect("read");
        String::from_utf8(out).expect("ascii")
    }

    async fn h2_get(io: tokio::io::DuplexStream) -> Result<http::StatusCode, h2::Error> {
        let (send, conn) = h2::client::handshake(io).await?;
        tokio::spawn(conn);
        let mut send = send.ready().await?;
        let req = http::Request::get("http://x/").body(()).expect("request");
        let (resp, _) = send.send_request(req, true)?;
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("response in time")?;
        Ok(resp.status())
    }

    #[tokio::test]
    async fn serve_speaks_http1_h2_and_detects_either() {
        use tokio::io::AsyncWriteExt;
        for proto in [Proto::Http1, Proto::Detect] {
            let (mut cli, srv) = tokio::io::duplex(64 * 1024);
            let (_tx, task) = serve_pipe(proto, srv, limits(), Duration::ZERO);
            // Split mid-method: detection reads what it needs, and hyper
            // reads it again.
            cli.write_all(b"GE").await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            cli.write_all(b"T / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let got = read_to_close(&mut cli).await;
            assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{proto:?}: {got:?}");
            assert!(got.ends_with("done"), "{proto:?}: {got:?}");
            task.await.unwrap().unwrap();
        }
        for proto in [Proto::H2, Proto::Detect] {
            let (cli, srv) = tokio::io::duplex(64 * 1024);
            let (_tx, _task) = serve_pipe(proto, srv, limits(), Duration::ZERO);
            assert_eq!(h2_get(cli).await.unwrap(), 200, "{proto:?}");
        }
    }

    #[tokio::test]
    async fn detection_gives_up_on_a_silent_client_or_at_shutdown() {
        let quick = Limits {
            header_read_timeout: Duration::from_millis(100),
            ..limits()
        };
        let (_cli, srv) = tokio::io::duplex(1024);
        let start = Instant::now();
        let (_tx, task) = serve_pipe(Proto::Detect, srv, quick.clone(), Duration::ZERO);
        tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(start.elapsed() >= quick.header_read_timeout);
        let (_cli, srv) = tokio::io::duplex(1024);
        let (tx, task) = serve_pipe(Proto::Detect, srv, limits(), Duration::ZERO);
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_millis(500), task)
            .await
            .expect("shutdown did not end detection")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn an_idle_http1_connection_is_closed_at_the_idle_timeout() {
        use tokio::io::AsyncWriteExt;
        let (mut cli, srv) = tokio::io::duplex(64 * 1024);
        let start = Instant::now();
        let (_tx, task) = serve_pipe(Proto::Http1, srv, limits(), Duration::ZERO);
        cli.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let got = read_to_close(&mut cli).await;
        assert!(got.ends_with("done"), "{got:?}");
        tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let took = start.elapsed();
        let idle = limits().idle_timeout;
        assert!(took >= idle, "closed before the idle timeout: {took:?}");
        // Well before the 1 s header_read_timeout: the idle watch closed it.
        assert!(took < limits().header_read_timeout, "{took:?}");
    }

    #[tokio::test]
    async fn shutdown_lets_an_http1_request_in_flight_complete_then_closes() {
        use tokio::io::AsyncWriteExt;
        let (mut cli, srv) = tokio::io::duplex(64 * 1024);
        let (tx, task) = serve_pipe(Proto::Http1, srv, limits(), Duration::from_millis(150));
        cli.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        tx.send(true).unwrap();
        let got = read_to_close(&mut cli).await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
        assert!(got.ends_with("done"), "{got:?}");
        tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_lets_an_h2_stream_in_flight_complete_then_closes() {
        let (cli, srv) = tokio::io::duplex(64 * 1024);
        let (tx, task) = serve_pipe(Proto::H2, srv, limits(), Duration::from_millis(150));
        let (send, conn) = h2::client::handshake(cli).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let req = http::Request::get("http://x/").body(()).unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        tx.send(true).unwrap();
        let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().data().await.unwrap().unwrap();
        assert_eq!(body, "done");
        tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn http1_heads_over_max_header_bytes_or_with_bare_lf_are_refused() {
        use tokio::io::AsyncWriteExt;
        let small = Limits {
            max_header_bytes: 1024,
            ..limits()
        };
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nx: {}\r\n\r\n",
            "a".repeat(1100)
        );
        for (raw, status) in [
            (big.as_str(), "431"),
            ("GET / HTTP/1.1\r\nHost: a\n\r\n", "400"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                "200",
            ),
        ] {
            let (mut cli, srv) = tokio::io::duplex(64 * 1024);
            let (_tx, _task) = serve_pipe(Proto::Http1, srv, small.clone(), Duration::ZERO);
            cli.write_all(raw.as_bytes()).await.unwrap();
            let got = read_to_close(&mut cli).await;
            assert!(
                got.starts_with(&format!("HTTP/1.1 {status} ")),
                "{raw:?}: {got:?}"
            );
        }
    }

    /// A client still sending when its head is refused gets to finish
    /// sending (curl stops at its first failed write and never reads the
    /// answer): the server reads on briefly before it closes, rather than
    /// reset the client's writes. Real TCP: a pipe has no resets.
    #[tokio::test]
    async fn a_refused_http1_head_is_answered_while_the_client_is_still_sending() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let small = Limits {
            max_header_bytes: 1024,
            ..limits()
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        for (start, status) in [
            (&b"GET / HTTP/1.1\r\nHost: a\r\nx: "[..], "431"),
            (&b"GET / HTTP/1.1\r\nHost: a\n\r\n"[..], "400"),
        ] {
            let cli = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (srv, _) = l.accept().await.expect("accept");
            let (_tx, task) = serve_pipe(Proto::Http1, srv, small.clone(), Duration::ZERO);
            let (mut rd, mut wr) = cli.into_split();
            let writer = tokio::spawn(async move {
                wr.write_all(start).await?;
                let filler = vec![b'a'; 64 * 1024];
                for _ in 0..3 {
                    wr.write_all(&filler).await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok::<_, std::io::Error>(wr)
            });
            let mut got = Vec::new();
            let _ = tokio::time::timeout(WAIT, rd.read_to_end(&mut got)).await;
            let got = String::from_utf8_lossy(&got);
            assert!(got.starts_with(&format!("HTTP/1.1 {status} ")), "{got:?}");
            let wrote = writer.await.expect("writer");
            assert!(wrote.is_ok(), "{status}: a write failed: {:?}", wrote.err());
            let _ = task.await;
        }
    }

    /// A connection future that wakes itself on every poll, as a busy
    /// connection does, and ends once asked to.
    #[derive(Default)]
    struct Spinner {
        polls: u64,
        graceful: u32,
    }

    impl Future for Spinner {
        type Output = u64;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
            self.polls += 1;
            if self.graceful > 0 {
                return Poll::Ready(self.polls);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn drive_notices_shutdown_while_the_connection_wakes_itself_constantly() {
        let mut conn = Spinner::default();
        let (tx, mut rx) = watch::channel(false);
        // From another thread: nothing in this runtime has to run for the
        // shutdown to be signalled.
        let signaller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            tx.send(true).unwrap();
            tx
        });
        let polls = tokio::time::timeout(
            WAIT,
            drive(
                Pin::new(&mut conn),
                |c| c.get_mut().graceful += 1,
                Activity::default(),
                Duration::from_secs(60),
                &mut rx,
            ),
        )
        .await
        .expect("drive never called graceful on a busy connection");
        assert_eq!(conn.graceful, 1);
        assert!(polls > 1);
        drop(signaller.join());
    }

    #[tokio::test]
    async fn drive_notices_idleness_while_the_connection_wakes_itself_constantly() {
        let mut conn = Spinner::default();
        let (_tx, mut rx) = watch::channel(false);
        // Busy polling is not activity: only streams and progress are.
        tokio::time::timeout(
            WAIT,
            drive(
                Pin::new(&mut conn),
                |c| c.get_mut().graceful += 1,
                Activity::default(),
                Duration::from_millis(30),
                &mut rx,
            ),
        )
        .await
        .expect("drive never noticed idleness on a busy connection");
        assert_eq!(conn.graceful, 1);
    }

    /// A connection future that waits until asked to end.
    #[derive(Default)]
    struct Parked {
        graceful: bool,
    }

    impl Future for Parked {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
            if self.graceful {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[tokio::test]
    async fn a_stream_in_flight_or_progress_keeps_a_connection_from_idling() {
        let idle = Duration::from_millis(100);
        let activity = Activity::default();
        let guard = StreamGuard::start(&activity);
        let mut conn = Parked::default();
        let (_tx, mut rx) = watch::channel(false);
        let mut driven = pin!(drive(
            Pin::new(&mut conn),
            |c| c.get_mut().graceful = true,
            activity.clone(),
            idle,
            &mut rx,
        ));
        let early = tokio::time::timeout(idle * 3, driven.as_mut()).await;
        assert!(early.is_err(), "closed with a stream in flight");
        drop(guard);
        // Progress alone (reads and writes of the outbound's HTTP/1.1
        // server) keeps it too.
        let ticker = tokio::spawn({
            let activity = activity.clone();
            async move {
                for _ in 0..25 {
                    activity.fetch_add(PROGRESS, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        let early = tokio::time::timeout(Duration::from_millis(200), driven.as_mut()).await;
        assert!(early.is_err(), "closed while progress was made");
        ticker.await.unwrap();
        tokio::time::timeout(WAIT, driven)
            .await
            .expect("not closed once idle");
        assert_eq!(activity.load(Ordering::Relaxed) & 0xffff_ffff, 0);
    }

    #[tokio::test]
    async fn stopped_resolves_at_once_when_shutdown_has_started() {
        let (tx, mut rx) = watch::channel(true);
        tokio::time::timeout(Duration::from_millis(100), stopped(&mut rx))
            .await
            .expect("already stopped");
        tx.send(false).unwrap();
        let mut rx2 = tx.subscribe();
        let early = tokio::time::timeout(Duration::from_millis(20), stopped(&mut rx2)).await;
        assert!(early.is_err());
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_millis(100), stopped(&mut rx2))
            .await
            .expect("stopped once set");
    }
}
