//! The sidecar's HTTP/2 server, on the `h2` crate directly.
//!
//! hyper's HTTP/2 server hands a `CONNECT` stream to its handler as an
//! "upgraded" byte stream: a task of its own per tunnel, a channel between
//! it and the handler, and a copy of every chunk through a buffer, both
//! ways. Its upgraded stream also has no way to reset: an app's reset
//! reached the caller as END_STREAM. Here a tunnel gets the stream's two
//! halves themselves ([`Handoff`]): bytes go from the TLS connection's
//! frames to the app's socket and back with no task or copy in between,
//! and a reset is a reset.
//!
//! Everything else is what hyper's server does: one task per stream runs
//! the handler (dropped when the caller resets the stream first), sends the
//! response head, and pumps the body under the caller's flow control;
//! connection-specific fields are stripped from responses (HTTP/2 forbids
//! them) and a `Date` is added where there is none; PINGs keep a quiet
//! connection honest. Graceful shutdown sends GOAWAY and lets the streams
//! in flight finish.

use std::future::{poll_fn, Future};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use crate::error::BoxError;
use crate::http::frame_guard::{Budget, FrameGuard, PeerAddr, Side, Trip};
use crate::http::h2_stream::{self, MeshBody, MAX_FRAME_SIZE};
use crate::http::owned;
use crate::http::response::http_date;
use crate::http::traits::SendBody;
use crate::memory::{self, Grant, HeadGrant, Holder};

/// Flow-control windows a caller may fill before it waits: a stream's is
/// hyper's server default; the connection's outlasts
/// [`h2_stream::STALLED_STREAMS`] streams whose apps stopped reading.
/// These are the most; under a memory limit a connection gets what the
/// process's receive pool grants (`memory.rs`), down to
/// [`MIN_CONN_WINDOW`], its streams' windows scaled alike down to the
/// protocol's default.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = STREAM_WINDOW * h2_stream::STALLED_STREAMS;
const MIN_CONN_WINDOW: u32 = 256 * 1024;
const MIN_STREAM_WINDOW: u32 = 65_535;
/// Streams the server itself may reset for a caller's errors before it
/// closes the connection (hyper's default; bounds a caller that provokes
/// resets on purpose).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// What a connection allows and how it is kept alive.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`: a larger request head is refused.
    pub max_header_list_size: u32,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub max_concurrent_streams: u32,
    /// A PING this often; no PONG within `keep_alive_timeout` and the
    /// connection is closed (a caller gone without a FIN).
    pub keep_alive_interval: Duration,
    /// See `keep_alive_interval`.
    pub keep_alive_timeout: Duration,
    /// A response whose caller reads none of it (its flow-control window
    /// shut) for this long is reset (`body_timeout`): it would hold the app
    /// connection that feeds it.
    pub send_stall: Duration,
    /// `SETTINGS_ENABLE_CONNECT_PROTOCOL` (RFC 8441): callers may switch
    /// protocols (WebSocket) with an extended `CONNECT`. Only a listener
    /// that carries such switches may say so: a client told it may would
    /// not fall back to HTTP/1.1's `Upgrade`.
    pub extended_connect: bool,
}

/// Put on a 2xx response to a `CONNECT` request: once the response head is
/// sent, the stream's sending half goes to the closure, which owns the
/// tunnel from then on (its receiving half is the request's body). A
/// response without it, or a stream reset before the head is sent, drops
/// the closure unrun.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct Handoff(Arc<Mutex<Option<Box<dyn FnOnce(h2::SendStream<Bytes>) + Send>>>>);

impl Handoff {
    /// A handoff to `f`.
    pub fn new(f: impl FnOnce(h2::SendStream<Bytes>) + Send + 'static) -> Handoff {
        Handoff(Arc::new(Mutex::new(Some(Box::new(f)))))
    }

    fn take(&self) -> Option<Box<dyn FnOnce(h2::SendStream<Bytes>) + Send>> {
        self.0.lock().ok().and_then(|mut f| f.take())
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handoff")
    }
}

/// Marks an answer the caller is not to see: the stream is reset with
/// `REFUSED_STREAM` instead, which tells an HTTP/2 caller that nothing of
/// the request was processed (RFC 9113 section 8.7), so it may send it
/// again, on another connection. The answer itself goes to an HTTP/1
/// caller, who has no such signal.
#[derive(Debug, Clone, Copy)]
pub struct Unprocessed;

/// How long a gracefully shut down connection with no stream left waits for
/// the caller's answer to h2's PING (a round trip) before it closes anyway
/// (or `keep_alive_timeout`, if shorter).
const SHUTDOWN_PING_GRACE: Duration = Duration::from_secs(5);

/// One HTTP/2 connection being served: a future that ends when the
/// connection does. `svc` answers each request; its body type `R` is made
/// from the stream's [`MeshBody`].
pub struct Connection<I, S, R> {
    state: State<I>,
    svc: S,
    body: PhantomData<fn(R)>,
    /// Shutdown was asked for before the handshake finished.
    close_pending: bool,
    /// [`Settings::send_stall`].
    send_stall: Duration,
    keep_alive: KeepAlive,
    /// After a graceful shutdown: when a connection with no stream left is
    /// closed even if the caller never answers the PING that h2 waits for
    /// before its final GOAWAY.
    close_by: Option<Pin<Box<Sleep>>>,
    /// Set by the transport's [`FrameGuard`] when the caller floods it.
    flood: Arc<Trip>,
    /// Once GOAWAY `ENHANCE_YOUR_CALM` is sent for a flood: when the
    /// connection ends whether or not it could be flushed (a flooding
    /// caller need not read it).
    flood_close_by: Option<Pin<Box<Sleep>>>,
    /// The receive window's share of the memory budget, given back when
    /// the connection ends.
    _window: Grant,
    /// Whom the requests' heads are charged to (`memory.rs`): the caller's
    /// identity, across its connections.
    holder: Arc<Holder>,
    /// [`TRAILERS_SHARE`] of `max_header_list_size`.
    trailers_reserve: u64,
}

/// How long a connection closed for a flood may take to flush its GOAWAY.
const FLOOD_CLOSE_GRACE: Duration = Duration::from_secs(1);

enum State<I> {
    Handshaking(h2::server::Handshake<FrameGuard<I>, Bytes>),
    Serving(h2::server::Connection<FrameGuard<I>, Bytes>),
}

/// PINGs on a timer: while no PING is out (`waiting` false) the timer says
/// when the next is due; while one is, it bounds the wait for its PONG.
struct KeepAlive {
    interval: Duration,
    timeout: Duration,
    ping: Option<h2::PingPong>,
    waiting: bool,
    timer: Pin<Box<Sleep>>,
}

impl<I: AsyncRead + AsyncWrite + Unpin, S, R> Connection<I, S, R> {
    /// Starts the handshake on `io`; its receive window and its requests'
    /// heads are charged to `holder` (a caller identity; the app).
    pub fn new(settings: &Settings, io: I, holder: Arc<Holder>, svc: S) -> Connection<I, S, R>
    where
        I: PeerAddr,
    {
        // A header block the caller leaves unfinished is charged to it
        // (0: the block ended).
        let mut block = memory::Growing::header_block(holder.clone());
        let charge = move |bytes| {
            if bytes == 0 {
                block.done();
                true
            } else {
                block.hold(bytes)
            }
        };
        let io =
            FrameGuard::with_peer(io, Side::Server, Budget::DEFAULT).charged_to(Box::new(charge));
        let flood = io.trip();
        let mut builder = h2::server::Builder::new();
        if settings.extended_connect {
            // RFC 8441: a protocol switch (WebSocket) arrives as a
            // `CONNECT` with `:protocol`, and is answered as a tunnel.
            builder.enable_connect_protocol();
        }
        let window = Grant::take(u64::from(MIN_CONN_WINDOW), u64::from(CONN_WINDOW), &holder);
        let conn_window = u32::try_from(window.bytes()).unwrap_or(CONN_WINDOW);
        let stream_window =
            (conn_window / h2_stream::STALLED_STREAMS).clamp(MIN_STREAM_WINDOW, STREAM_WINDOW);
        let handshake = builder
            .initial_window_size(stream_window)
            .initial_connection_window_size(conn_window)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(settings.max_header_list_size)
            .max_concurrent_streams(settings.max_concurrent_streams)
            .max_send_buffer_size(memory::send_buffer())
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .handshake(io);
        Connection {
            state: State::Handshaking(handshake),
            svc,
            body: PhantomData,
            close_pending: false,
            send_stall: settings.send_stall,
            close_by: None,
            flood,
            flood_close_by: None,
            _window: window,
            holder,
            trailers_reserve: u64::from(settings.max_header_list_size / TRAILERS_SHARE)
                .min(MAX_TRAILERS_RESERVE),
            keep_alive: KeepAlive {
                interval: settings.keep_alive_interval,
                timeout: settings.keep_alive_timeout,
                ping: None,
                waiting: false,
                timer: Box::pin(tokio::time::sleep(settings.keep_alive_interval)),
            },
        }
    }

    /// Sends GOAWAY: no new stream is taken, the ones in flight finish,
    /// then the future ends. Before the handshake is done (a caller that
    /// never sent its preface) the future ends at once: there is nothing
    /// to finish, and such a caller must not hold the connection.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let me = self.get_mut();
        match &mut me.state {
            State::Handshaking(_) => me.close_pending = true,
            State::Serving(conn) => {
                conn.graceful_shutdown();
                // h2 sends its last GOAWAY once the caller answers a PING:
                // one that never does would keep an idle connection (and
                // its `max_connections` place) until the keep-alive gave
                // up on it, a minute and more later.
                if me.close_by.is_none() {
                    let grace = me.keep_alive.timeout.min(SHUTDOWN_PING_GRACE);
                    me.close_by = Some(Box::pin(tokio::time::sleep(grace)));
                }
            }
        }
    }
}

impl<I, S, R> Unpin for Connection<I, S, R> {}

impl<I, S, R, F, B> Future for Connection<I, S, R>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<R>) -> F,
    R: From<MeshBody>,
    F: Future<Output = Response<B>> + Send + 'static,
    B: SendBody,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.get_mut();
        loop {
            let conn = match &mut me.state {
                State::Handshaking(_) if me.close_pending => return Poll::Ready(Ok(())),
                State::Handshaking(_) if me.flood.is_set() => {
                    return Poll::Ready(Err(me.flood.error().into()))
                }
                State::Handshaking(hs) => {
                    let mut conn = ready!(Pin::new(hs).poll(cx))?;
                    me.keep_alive.ping = conn.ping_pong();
                    me.state = State::Serving(conn);
                    continue;
                }
                State::Serving(conn) => conn,
            };
            if me.keep_alive.poll(cx) {
                tracing::debug!("HTTP/2 connection: no PONG in time; closing");
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
            }
            if let Some(by) = &mut me.close_by {
                // Streams still in flight finish first (their ends wake
                // this task); then it closes.
                if by.as_mut().poll(cx).is_ready() && !conn.has_streams() {
                    me.close_by = None;
                    tracing::debug!(
                        "HTTP/2 connection: shut down, no stream left, no PING answer; closing"
                    );
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                }
            }
            let accepted = match conn.poll_accept(cx) {
                Poll::Ready(a) => a,
                Poll::Pending => {
                    // The guard reads nothing more once tripped; h2 then
                    // needs only to write its GOAWAY.
                    if !me.flood.is_set() {
                        return Poll::Pending;
                    }
                    match &mut me.flood_close_by {
                        None => {
                            conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                            me.flood_close_by =
                                Some(Box::pin(tokio::time::sleep(FLOOD_CLOSE_GRACE)));
                            continue;
                        }
                        Some(by) => {
                            ready!(by.as_mut().poll(cx));
                            return Poll::Ready(Err(me.flood.error().into()));
                        }
                    }
                }
            };
            match accepted {
                Some(Ok((req, mut respond))) => {
                    let charge = || {
                        let open_body = !req.body().is_end_stream();
                        head_bytes(&req) + STREAM_COST + u64::from(open_body) * me.trailers_reserve
                    };
                    let Some(head) = me.holder.take_sized(charge) else {
                        // Dropped here, decoded head and all, before any
                        // of it is processed: the caller may retry.
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    };
                    let kind = Kind::of(req.method());
                    let (parts, recv) = req.into_parts();
                    let body = MeshBody::new(recv, &parts.headers);
                    let fut = (me.svc)(Request::from_parts(parts, R::from(body)));
                    tokio::spawn(respond_with(fut, head, respond, kind, me.send_stall));
                }
                Some(Err(e)) if me.flood.is_set() => {
                    tracing::debug!(error = %e, "HTTP/2 connection closed for a flood");
                    return Poll::Ready(Err(me.flood.error().into()));
                }
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                None if me.flood.is_set() => return Poll::Ready(Err(me.flood.error().into())),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl KeepAlive {
    /// Sends a PING when one is due; true when the last one got no PONG
    /// in time.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(ping) = &mut self.ping else {
            return false;
        };
        loop {
            if self.waiting {
                match ping.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.waiting = false;
                        let next = tokio::time::Instant::now() + self.interval;
                        self.timer.as_mut().reset(next);
                        continue;
                    }
                    // The connection is closing; its own poll says so.
                    Poll::Ready(Err(_)) => return false,
                    Poll::Pending => {}
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.waiting {
                return true;
            }
            if ping.send_ping(h2::Ping::opaque()).is_err() {
                return false;
            }
            self.waiting = true;
            let deadline = tokio::time::Instant::now() + self.timeout;
            self.timer.as_mut().reset(deadline);
        }
    }
}

/// What of a request's method shapes its response.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A 2xx opens a tunnel.
    Connect,
    /// The response has no content, whatever its length says.
    Head,
    Other,
}

impl Kind {
    fn of(m: &Method) -> Kind {
        if m == Method::CONNECT {
            Kind::Connect
        } else if m == Method::HEAD {
            Kind::Head
        } else {
            Kind::Other
        }
    }
}

/// What a request in flight holds besides its head, charged with it: the
/// stream's state in h2, the handler's task and future (about 5.7 KB each
/// in a debug build, with 6,400 requests held by a stalled app).
const STREAM_COST: u64 = 4096;

/// A request whose body is still open may yet send trailers, up to
/// `max_header_list_size` of them, decoded and held until its body is
/// read (a stalled app never reads it): a quarter of that is charged
/// with its head, at most [`MAX_TRAILERS_RESERVE`]. A full reserve would
/// leave a caller a few dozen uploads in flight; a quarter bounds what
/// trailers can hold to four times what is charged, and requests do not
/// send trailers in practice.
const TRAILERS_SHARE: u32 = 4;
const MAX_TRAILERS_RESERVE: u64 = 64 * 1024;

/// A request head's size as HPACK counts it (RFC 7541 section 4.1): each
/// field's name and value and 32 bytes, the pseudo-fields included.
fn head_bytes<T>(req: &Request<T>) -> u64 {
    const FIELD: usize = 32;
    let uri = req.uri();
    let pseudo = req.method().as_str().len()
        + uri.scheme_str().map_or(0, str::len)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
        + 4 * FIELD;
    let fields: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + FIELD)
        .sum();
    (pseudo + fields) as u64
}

/// One stream: the handler's future (dropped if the caller resets the
/// stream first), then the response head, then the body or the tunnel.
/// The request's `head` is charged until the handler has answered.
async fn respond_with<F, B>(
    fut: F,
    head: HeadGrant,
    mut respond: h2::server::SendResponse<Bytes>,
    kind: Kind,
    send_stall: Duration,
) where
    F: Future<Output = Response<B>>,
    B: SendBody,
{
    let mut fut = std::pin::pin!(fut);
    let answer = poll_fn(|cx| {
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        // Not answered yet: a reset from the caller cancels the request.
        match respond.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    drop(head);
    let Some(resp) = answer else { return };
    if resp.extensions().get::<Unprocessed>().is_some() {
        respond.send_reset(h2::Reason::REFUSED_STREAM);
        return;
    }
    let (mut parts, mut body) = resp.into_parts();
    owned::strip_hop_by_hop(&mut parts.headers);
    // TE means nothing in a response, and h2 refuses any but a literal
    // `trailers`.
    parts.headers.remove(header::TE);
    if !parts.headers.contains_key(header::DATE) {
        if let Ok(v) = HeaderValue::from_bytes(&http_date()) {
            parts.headers.insert(header::DATE, v);
        }
    }
    if kind == Kind::Connect && parts.status.is_success() {
        // RFC 9113 section 8.5: the stream now carries the tunnel's bytes;
        // a content-length would contradict them.
        parts.headers.remove(header::CONTENT_LENGTH);
        let Some(f) = parts.extensions.remove::<Handoff>().and_then(|h| h.take()) else {
            // A 2xx with no tunnel behind it: its body would pass for
            // tunnel bytes.
            tracing::debug!("a 2xx answer to CONNECT without a tunnel; resetting the stream");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            return;
        };
        let head = Response::from_parts(parts, ());
        match respond.send_response(head, false) {
            Ok(send) => f(send),
            Err(e) => {
                tracing::debug!(error = %e, "tunnel response refused by HTTP/2");
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
            }
        }
        return;
    }
    // A response to HEAD ends with its head (RFC 9113 section 8.1: DATA on
    // it is a protocol error), its length saying what a GET would get.
    let eos = kind == Kind::Head || body.is_end_stream();
    if !body.is_end_stream() {
        if let Some(len) = body.size_hint().exact() {
            parts
                .headers
                .entry(header::CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(len));
        }
    }
    let head = Response::from_parts(parts, ());
    let mut stream = match respond.send_response(head, eos) {
        Ok(s) => s,
        Err(e) => {
            // A field HTTP/2 cannot carry: the caller must not wait for
            // ever.
            tracing::debug!(error = %e, "response head refused by HTTP/2");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            return;
        }
    };
    if !eos {
        if let Err(why) = h2_stream::send_body(&mut body, &mut stream, Some(send_stall)).await {
            tracing::debug!(reason = why, "response body not sent; resetting the stream");
            stream.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The server against the `h2` crate's client on an in-memory pipe.

    use std::sync::atomic::{AtomicBool, Ordering};

    use http::StatusCode;
    use http_body_util::{Empty, Full};
    use tokio::sync::oneshot;

    use super::*;
    use crate::http::traits::test_body::{trailers, TestBody};

    const WAIT: Duration = Duration::from_secs(3);

    fn settings() -> Settings {
        Settings {
            max_header_list_size: 16 * 1024,
            max_concurrent_streams: 4,
            keep_alive_interval: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(20),
            send_stall: Duration::from_secs(30),
            extended_connect: false,
        }
    }

    #[tokio::test]
    async fn only_a_server_that_carries_switches_offers_extended_connect() {
        for offered in [false, true] {
            let s = Settings {
                extended_connect: offered,
                ..settings()
            };
            let (send, _server) = pair(s, |_req: Request<MeshBody>| async {
                Response::new(Empty::<Bytes>::new())
            })
            .await;
            // The server's SETTINGS arrive with the first exchange.
            let mut send = send.ready().await.expect("ready");
            let (resp, _) = send
                .send_request(Request::get("http://x/").body(()).unwrap(), true)
                .expect("send");
            tokio::time::timeout(WAIT, resp)
                .await
                .expect("in time")
                .expect("answer");
            assert_eq!(send.is_extended_connect_protocol_enabled(), offered);
        }
    }

    /// Serves `svc` on one end of a pipe (the connection's future is
    /// returned as a task) and hands back a client on the other.
    async fn pair<S, F, B>(
        settings: Settings,
        svc: S,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), String>>,
    )
    where
        S: FnMut(Request<MeshBody>) -> F + Send + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: SendBody,
    {
        let (cli, srv) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            Connection::new(&settings, srv, Arc::default(), svc)
                .await
                .map_err(|e| e.to_string())
        });
        let (send, conn) = h2::client::handshake(cli).await.expect("client handshake");
        tokio::spawn(conn);
        (send, server)
    }

    async fn read_all(body: &mut h2::RecvStream) -> (Vec<u8>, Option<http::HeaderMap>) {
        let mut out = Vec::new();
        while let Some(d) = body.data().await {
            let d = d.expect("data");
            let _ = body.flow_control().release_capacity(d.len());
            out.extend_from_slice(&d);
        }
        (out, body.trailers().await.expect("trailers"))
    }

    #[tokio::test]
    async fn a_request_body_arrives_whole_and_a_streamed_response_with_trailers_goes_back() {
        // Larger than both windows: flow control must turn over both ways.
        let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expect = big.clone();
        let (mut send, _server) = pair(settings(), move |req: Request<MeshBody>| async move {
            use http_body_util::BodyExt;
            let got = req.into_body().collect().await.expect("body").to_bytes();
            let (feed, body) = TestBody::channel(None);
            tokio::spawn(async move {
                for chunk in got.chunks(100 * 1024) {
                    let _ = feed.send(Ok(http_body::Frame::data(Bytes::copy_from_slice(chunk))));
                }
                let _ = feed.send(trailers(&[("x-sum", "ok")]));
            });
            Response::new(body)
        })
        .await;
        let req = Request::post("http://x/up").body(()).expect("request");
        let (resp, mut stream) = send.send_request(req, false).expect("send");
        let up = tokio::spawn(async move {
            let mut rest = Bytes::from(big);
            while !rest.is_empty() {
                stream.reserve_capacity(rest.len());
                let n = poll_fn(|cx| stream.poll_capacity(cx))
                    .await
                    .expect("capacity")
                    .expect("capacity");
                stream
                    .send_data(rest.split_to(n.min(rest.len())), false)
                    .expect("data");
            }
            stream.send_data(Bytes::new(), true).expect("end");
        });
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        let (got, t) = tokio::time::timeout(WAIT * 3, read_all(&mut resp.into_body()))
            .await
            .expect("whole body in time");
        up.await.expect("upload");
        assert!(got == expect, "body differs ({} bytes back)", got.len());
        assert_eq!(t.expect("trailers")["x-sum"], "ok");
    }

    #[tokio::test]
    async fn connection_specific_fields_are_stripped_and_a_date_is_added() {
        let (mut send, _server) = pair(settings(), |_req: Request<MeshBody>| async {
            let mut r = Response::new(Full::new(Bytes::from_static(b"hi")));
            let h = r.headers_mut();
            h.insert(
                header::CONNECTION,
                HeaderValue::from_static("keep-alive, x-hop"),
            );
            h.insert("x-hop", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert("x-kept", HeaderValue::from_static("yes"));
            r
        })
        .await;
        let req = Request::get("http://x/").body(()).expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("in time")
            .expect("a response, not a reset");
        let h = resp.headers();
        for gone in [
            "connection",
            "x-hop",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} sent: {h:?}");
        }
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h[header::CONTENT_LENGTH], "2");
        let date = h[header::DATE].to_str().expect("date");
        assert!(httpdate::parse_http_date(date).is_ok(), "{date:?}");
        assert_eq!(read_all(&mut resp.into_body()).await.0, b"hi");
    }

    /// Sets its flag when dropped.
    struct DropFlag(Arc<AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_reset_from_the_caller_drops_the_handler_before_it_answers() {
        let dropped = Arc::new(AtomicBool::new(false));
        let (started_tx, started) = oneshot::channel();
        let started_tx = Mutex::new(Some(started_tx));
        let flag = dropped.clone();
        let (mut send, _server) = pair(settings(), move |_req: Request<MeshBody>| {
            let guard = DropFlag(flag.clone());
            if let Some(tx) = started_tx.lock().expect("lock").take() {
                let _ = tx.send(());
            }
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Response::new(Empty::<Bytes>::new())
            }
        })
        .await;
        let req = Request::get("http://x/slow").body(()).expect("request");
        let (_resp, mut stream) = send.send_request(req, true).expect("send");
        tokio::time::timeout(WAIT, started)
            .await
            .expect("handler ran")
            .expect("started");
        stream.send_reset(h2::Reason::CANCEL);
        let deadline = tokio::time::Instant::now() + WAIT;
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the handler outlived the reset"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A CONNECT answered by `status`, handing the stream to a closure
    /// that echoes the tunnel's bytes back when `handoff`.
    async fn connect(
        status: StatusCode,
        handoff: bool,
    ) -> (
        h2::client::ResponseFuture,
        h2::SendStream<Bytes>,
        Arc<AtomicBool>,
    ) {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let (mut send, _server) = pair(settings(), move |req: Request<MeshBody>| {
            let flag = flag.clone();
            async move {
                let recv = req.into_body().into_recv();
                let mut resp = Response::new(Full::new(Bytes::from_static(b"no")));
                *resp.status_mut() = status;
                if handoff {
                    resp.extensions_mut().insert(Handoff::new(move |mut send| {
                        flag.store(true, Ordering::SeqCst);
                        tokio::spawn(async move {
                            let mut recv = recv;
                            while let Some(Ok(d)) = recv.data().await {
                                let _ = recv.flow_control().release_capacity(d.len());
                                send.reserve_capacity(d.len());
                                let _ = send.send_data(d, false);
                            }
                            let _ = send.send_data(Bytes::new(), true);
                        });
                    }));
                }
                resp
            }
        })
        .await;
        let uri = http::Uri::builder()
            .authority("10.0.0.1:5432")
            .build()
            .expect("uri");
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(uri)
            .body(())
            .expect("request");
        let (resp, stream) = send.send_request(req, false).expect("send");
        (resp, stream, ran)
    }

    #[tokio::test]
    async fn a_connect_answered_2xx_hands_the_stream_to_its_tunnel() {
        let (resp, mut up, ran) = connect(StatusCode::OK, true).await;
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        // No length on a tunnel's 200, and the body it was built with is
        // not sent: the stream carries the tunnel.
        assert!(!resp.headers().contains_key(header::CONTENT_LENGTH));
        assert!(ran.load(Ordering::SeqCst));
        up.reserve_capacity(5);
        up.send_data(Bytes::from_static(b"hello"), true)
            .expect("send");
        let (echo, _) = tokio::time::timeout(WAIT, read_all(&mut resp.into_body()))
            .await
            .expect("echo in time");
        assert_eq!(echo, b"hello");
    }

    #[tokio::test]
    async fn a_connect_refused_sends_its_answer_and_never_runs_the_handoff() {
        let (resp, _up, ran) = connect(StatusCode::FORBIDDEN, true).await;
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(read_all(&mut resp.into_body()).await.0, b"no");
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_graceful_shutdown_lets_the_stream_in_flight_finish() {
        let (release_tx, release) = oneshot::channel::<()>();
        let release = Mutex::new(Some(release));
        let (cli, srv) = tokio::io::duplex(1 << 20);
        let svc = move |_req: Request<MeshBody>| {
            let wait = release.lock().expect("lock").take();
            async move {
                if let Some(w) = wait {
                    let _ = w.await;
                }
                Response::new(Full::new(Bytes::from_static(b"done")))
            }
        };
        let (stop_tx, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut conn = std::pin::pin!(Connection::new(&settings(), srv, Arc::default(), svc));
            let mut stop = stop;
            let mut stopped = false;
            poll_fn(|cx| {
                if !stopped && Pin::new(&mut stop).poll(cx).is_ready() {
                    stopped = true;
                    conn.as_mut().graceful_shutdown();
                }
                conn.as_mut().poll(cx)
            })
            .await
            .map_err(|e| e.to_string())
        });
        let (mut send, conn) = h2::client::handshake(cli).await.expect("client handshake");
        tokio::spawn(conn);
        let req = Request::get("http://x/").body(()).expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(()).expect("stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // After GOAWAY no new stream is taken.
        let late = Request::get("http://x/late").body(()).expect("request");
        let refused = match send.send_request(late, true) {
            Err(_) => true,
            Ok((r, _)) => tokio::time::timeout(WAIT, r)
                .await
                .expect("in time")
                .is_err(),
        };
        assert!(refused, "a stream opened after GOAWAY was served");
        release_tx.send(()).expect("release");
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(read_all(&mut resp.into_body()).await.0, b"done");
        tokio::time::timeout(WAIT, server)
            .await
            .expect("the connection ended after its last stream")
            .expect("server task")
            .expect("clean end");
    }

    #[tokio::test]
    async fn a_caller_that_stops_answering_pings_is_closed() {
        let mut s = settings();
        s.keep_alive_interval = Duration::from_millis(100);
        s.keep_alive_timeout = Duration::from_millis(100);
        let (cli, srv) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            Connection::new(&s, srv, Arc::default(), |_req: Request<MeshBody>| async {
                Response::new(Empty::<Bytes>::new())
            })
            .await
        });
        let (_send, conn) = h2::client::handshake(cli).await.expect("client handshake");
        // The client's connection is never polled again: PINGs go
        // unanswered, as from a peer that vanished without a FIN.
        let _conn = conn;
        tokio::time::timeout(WAIT, server)
            .await
            .expect("closed once its PING went unanswered")
            .expect("server task")
            .ok();
    }

    #[tokio::test]
    async fn a_shut_down_connection_whose_caller_never_answers_the_ping_closes_anyway() {
        let mut s = settings();
        s.keep_alive_interval = Duration::from_secs(60);
        s.keep_alive_timeout = Duration::from_millis(100);
        let (cli, srv) = tokio::io::duplex(1 << 20);
        let (go, shut) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut conn = Box::pin(Connection::new(
                &s,
                srv,
                Arc::default(),
                |_req: Request<MeshBody>| async { Response::new(Empty::<Bytes>::new()) },
            ));
            tokio::select! {
                r = conn.as_mut() => return r,
                _ = shut => {}
            }
            conn.as_mut().graceful_shutdown();
            conn.await
        });
        // Handshaken, then never polled: the shutdown's PING goes
        // unanswered (the keep-alive PING would come only in a minute).
        let (_send, conn) = h2::client::handshake(cli).await.expect("client handshake");
        let _conn = conn;
        tokio::time::sleep(Duration::from_millis(100)).await;
        go.send(()).expect("shutdown");
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("closed soon after its graceful shutdown")
            .expect("server task")
            .ok();
    }

    #[tokio::test]
    async fn a_response_its_caller_reads_none_of_is_reset_and_its_body_dropped() {
        let mut s = settings();
        s.send_stall = Duration::from_millis(200);
        let (dropped_tx, dropped_rx) = oneshot::channel();
        let dropped_tx = std::sync::Mutex::new(Some(dropped_tx));
        let (mut send, _server) = pair(s, move |_req: Request<MeshBody>| {
            let (feed, body) = TestBody::channel(None);
            let dropped = body.dropped.clone();
            let tx = dropped_tx.lock().unwrap().take();
            async move {
                // Far more than the caller's window, as fast as it goes;
                // then tell the test when the body (the app's connection,
                // in the proxy) was let go.
                tokio::spawn(async move {
                    for _ in 0..64 {
                        if feed
                            .send(Ok(http_body::Frame::data(Bytes::from(vec![
                                7u8;
                                16 * 1024
                            ]))))
                            .is_err()
                        {
                            break;
                        }
                    }
                    while !dropped.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if let Some(tx) = tx {
                        let _ = tx.send(());
                    }
                });
                Response::new(body)
            }
        })
        .await;
        let req = Request::get("http://x/big").body(()).expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("in time")
            .expect("head");
        // Never read: the window stays shut.
        let _held = resp.into_body();
        tokio::time::timeout(WAIT, dropped_rx)
            .await
            .expect("the body was dropped once the caller read nothing for send_stall")
            .expect("signal");
    }

    #[tokio::test]
    async fn small_body_frames_ready_together_go_out_as_few_data_frames() {
        let (mut send, _server) = pair(settings(), |_req: Request<MeshBody>| async {
            // 4,000 one-byte frames, all ready before the body is read (a
            // gRPC app streaming tiny messages), then trailers.
            let (feed, body) = TestBody::channel(None);
            for _ in 0..4000 {
                let _ = feed.send(Ok(http_body::Frame::data(Bytes::from_static(b"x"))));
            }
            let _ = feed.send(trailers(&[("grpc-status", "0")]));
            Response::new(body)
        })
        .await;
        let req = Request::get("http://x/tiny").body(()).expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("in time")
            .expect("head");
        let mut body = resp.into_body();
        let (mut frames, mut bytes) = (0, 0);
        while let Some(d) = body.data().await {
            let d = d.expect("data");
            let _ = body.flow_control().release_capacity(d.len());
            frames += 1;
            bytes += d.len();
        }
        assert_eq!(bytes, 4000);
        // Not one: tokio's cooperative budget ends a run of ready polls
        // every 128 or so, which is merging enough.
        assert!(frames < 100, "{frames} DATA frames for 4,000 ready bytes");
        let t = body.trailers().await.expect("trailers").expect("some");
        assert_eq!(t["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_caller_answering_pings_stays_connected() {
        let mut s = settings();
        s.keep_alive_interval = Duration::from_millis(50);
        s.keep_alive_timeout = Duration::from_millis(200);
        let (mut send, server) = pair(s, |_req: Request<MeshBody>| async {
            Response::new(Full::new(Bytes::from_static(b"ok")))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!server.is_finished(), "closed although PINGs were answered");
        let req = Request::get("http://x/").body(()).expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_head_response_ends_with_its_head_and_te_is_never_sent() {
        let (mut send, _server) = pair(settings(), |_req: Request<MeshBody>| async {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not for HEAD")));
            r.headers_mut()
                .insert(header::TE, HeaderValue::from_static("Trailers"));
            r
        })
        .await;
        for method in [Method::HEAD, Method::GET] {
            let req = Request::builder()
                .method(method.clone())
                .uri("http://x/")
                .body(())
                .expect("request");
            let (resp, _) = send.send_request(req, true).expect("send");
            let resp = tokio::time::timeout(WAIT, resp)
                .await
                .expect("in time")
                .expect("a response, not a reset");
            assert!(!resp.headers().contains_key(header::TE), "{method}");
            assert_eq!(resp.headers()[header::CONTENT_LENGTH], "12", "{method}");
            let mut body = resp.into_body();
            if method == Method::HEAD {
                assert!(body.is_end_stream(), "DATA expected after a HEAD response");
            } else {
                assert_eq!(read_all(&mut body).await.0, b"not for HEAD");
            }
        }
    }

    #[tokio::test]
    async fn a_2xx_answer_to_connect_without_a_tunnel_resets_the_stream() {
        let (resp, _up, ran) = connect(StatusCode::OK, false).await;
        let got = tokio::time::timeout(WAIT, resp).await.expect("in time");
        let e = got.expect_err("a reset, not a 200 whose body passes for tunnel bytes");
        assert_eq!(e.reason(), Some(h2::Reason::INTERNAL_ERROR), "{e}");
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn shutdown_before_the_preface_ends_the_connection_at_once() {
        // The caller completed nothing but its transport: no preface.
        let (_cli, srv) = tokio::io::duplex(1 << 16);
        let mut conn = Box::pin(Connection::new(
            &settings(),
            srv,
            Arc::default(),
            |_req: Request<MeshBody>| async { Response::new(Empty::<Bytes>::new()) },
        ));
        let pending = poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx).is_pending())).await;
        assert!(pending, "the handshake cannot be done yet");
        conn.as_mut().graceful_shutdown();
        tokio::time::timeout(WAIT, conn)
            .await
            .expect("the connection ended")
            .expect("a clean end");
    }

    /// Frames of `kind` in what a raw client read, with their payloads.
    fn frames_of(mut got: &[u8], kind: u8) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while got.len() >= 9 {
            let len = usize::from(got[0]) << 16 | usize::from(got[1]) << 8 | usize::from(got[2]);
            if got.len() < 9 + len {
                break;
            }
            if got[3] == kind {
                out.push(got[9..9 + len].to_vec());
            }
            got = &got[9 + len..];
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_window_update_flood_is_closed_with_enhance_your_calm_while_a_download_completes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        const BIG: usize = 16 << 20;
        let body = Bytes::from(vec![7u8; BIG]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let body = body.clone();
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    let svc = move |_req: Request<MeshBody>| {
                        let body = body.clone();
                        async move { Response::new(Full::new(body)) }
                    };
                    let r = Connection::new(&settings(), tcp, Arc::default(), svc).await;
                    let _ = ended_tx.send(r.map_err(|e| e.to_string()));
                });
            }
        });

        // A download on its own connection, by the h2 crate's client with
        // its default (small) windows: many WINDOW_UPDATEs, all earned.
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
        tokio::spawn(conn);
        let download = tokio::spawn(async move {
            let mut send = send.ready().await.expect("ready");
            let req = Request::get("http://x/big").body(()).expect("request");
            let (resp, _) = send.send_request(req, true).expect("send");
            let mut body = resp.await.expect("response").into_body();
            let mut n = 0;
            while let Some(d) = body.data().await {
                let d = d.expect("data");
                let _ = body.flow_control().release_capacity(d.len());
                n += d.len();
            }
            n
        });

        // The flood: WINDOW_UPDATE(stream 0, 1), non-stop.
        let mut raw = tokio::net::TcpStream::connect(addr).await.expect("connect");
        raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .expect("preface");
        let (mut rd, mut wr) = raw.into_split();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let _ = rd.read_to_end(&mut got).await;
            got
        });
        let wu = [0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let blob: Vec<u8> = wu.iter().copied().cycle().take(wu.len() * 1000).collect();
        let flood = tokio::spawn(async move {
            let mut sent = 0u64;
            while wr.write_all(&blob).await.is_ok() {
                sent += 1000;
            }
            sent
        });
        let got = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the flooding connection closed in time")
            .expect("reader");
        let sent = tokio::time::timeout(Duration::from_secs(10), flood)
            .await
            .expect("the flood stopped")
            .expect("flood");
        let goaway = frames_of(&got, 0x7);
        assert_eq!(goaway.len(), 1, "one GOAWAY");
        assert_eq!(goaway[0][4..8], [0, 0, 0, 11], "ENHANCE_YOUR_CALM");
        assert!(sent < 1_000_000, "closed after {sent} frames");
        let end = tokio::time::timeout(WAIT, ended.recv())
            .await
            .expect("the connection's future ended")
            .expect("an end");
        let e = end.expect_err("a flood is an error");
        assert!(e.contains("WINDOW_UPDATE"), "{e}");

        let n = tokio::time::timeout(Duration::from_secs(120), download)
            .await
            .expect("the download completed in time")
            .expect("download");
        assert_eq!(n, BIG);
    }
}
