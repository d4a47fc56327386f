//! The outbound's HTTP/1.1 server: the app's plaintext connections to its
//! sidecar.
//!
//! hyper's server dispatcher was the largest single cost of the outbound
//! after the mesh's HTTP/2 (its `write_head`, `parse`, reading and flushing
//! were 4.4%, 4.1%, 3.0% and 2.8% of the outbound's instructions, in
//! `benches/instructions.sh out`). Here one task per connection reads a
//! request head, runs the handler's future inline, and writes the response,
//! with a body that is already there in the same write as the head.
//!
//! A request body reads straight off the socket: the read half moves into
//! the body, so that the body can stream to the mesh while the response is
//! awaited, and comes back when the body has been read to its end. A body
//! left unread (the handler answered without it) closes the connection
//! after the response, as its end on the wire is then unknown; the
//! response says `connection: close` when that is known before its head
//! goes out, and the client's remaining bytes are drained briefly first.
//! One dropped only after the head went out (it did not say close) is read
//! to its end and discarded, within a lingering close's bounds, and the
//! connection goes on.
//!
//! Limits: a request head must arrive within `header_read_timeout` of its
//! first byte (408 otherwise) and fit `max_header_bytes` (431); a client
//! silent between requests is closed by the caller's idle timeout.
//! Pipelined requests are answered in order. `Expect: 100-continue` is
//! answered at once, as Envoy does: the sidecar always reads the body.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::http::h1::{self, BodyError, BodyReader, Connection, Framing, H1Error, RequestHead};
use crate::http::io::{Rewind, LINGER, LINGER_BYTES};
use crate::http::owned;
use crate::http::response::{http_date, text};
use crate::http::server::PROGRESS;
use crate::http::traits::ResponseBody;
use crate::memory::{Growing, Holder};

/// Body bytes up to this size are copied next to the head (or the previous
/// chunk) so that they go out in one write; larger ones are written as they
/// are.
const GATHER: usize = 16 * 1024;

/// What the server enforces on each connection.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// From the first byte of a request head to its end.
    pub header_read_timeout: Duration,
    /// When set, the connection's first request head is due by then
    /// instead (its bytes were waited for already, e.g. peeked at by a
    /// redirected connection's detection); later heads get
    /// `header_read_timeout`.
    pub first_head_by: Option<tokio::time::Instant>,
    /// Largest request head (and chunked trailer section).
    pub max_header_bytes: usize,
    /// A request body with nothing to read for this long fails; the
    /// request is answered 408 if it can still be, and the connection
    /// closes.
    pub body_timeout: Duration,
}

/// The read half and its buffer, handed between the connection and the
/// request body.
struct ReadSide {
    io: OwnedReadHalf,
    buf: BytesMut,
    /// The body was read to its end: the next request starts at `buf`.
    finished: bool,
    /// The body stalled for `body_timeout`: answer 408 if still possible,
    /// and close without lingering.
    stalled: bool,
    /// The body's framing was malformed: answer 400 if still possible
    /// (what the handler made of the broken body is not the cause), and
    /// close.
    malformed: Option<H1Error>,
    /// Where the body's reading stopped, when it was dropped unread: the
    /// rest can be read and discarded ([`drain_rest`]).
    reader: BodyReader,
}

/// A request body read straight off the client's connection.
#[derive(Debug)]
pub struct ServerBody {
    io: Option<OwnedReadHalf>,
    buf: BytesMut,
    reader: BodyReader,
    home: Option<oneshot::Sender<ReadSide>>,
    /// The connection's activity count; `None` for a body with nothing to
    /// read (most requests), which saves a reference count per request.
    activity: Option<Arc<AtomicU64>>,
    /// `body_timeout`, and its deadline, armed only once a read finds
    /// nothing (a body that arrives with its head never reads the clock).
    stall: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the deadline was set.
    progressed: bool,
}

impl std::fmt::Debug for ReadSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadSide")
            .field("finished", &self.finished)
            .finish()
    }
}

impl ServerBody {
    /// A body that is already complete.
    fn empty() -> ServerBody {
        ServerBody {
            io: None,
            buf: BytesMut::new(),
            reader: BodyReader::new(Framing::Empty, 0),
            home: None,
            activity: None,
            stall: Duration::MAX,
            deadline: None,
            progressed: false,
        }
    }

    /// Hands the read half back to the connection.
    fn go_home(&mut self, finished: bool) {
        self.send_home(finished, false, None);
    }

    fn send_home(&mut self, finished: bool, stalled: bool, malformed: Option<H1Error>) {
        if let (Some(home), Some(io)) = (self.home.take(), self.io.take()) {
            let buf = std::mem::take(&mut self.buf);
            let reader = std::mem::replace(&mut self.reader, BodyReader::new(Framing::Empty, 0));
            let _ = home.send(ReadSide {
                io,
                buf,
                finished,
                stalled,
                malformed,
                reader,
            });
        }
    }

    /// Nothing to read: runs the stall clock, restarted after progress.
    /// `Ready` once the body has stalled for `stall`.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.io.is_none() {
            return Poll::Pending;
        }
        let deadline = match self.deadline.as_mut() {
            Some(d) if !self.progressed => d,
            Some(d) => {
                d.as_mut().reset(tokio::time::Instant::now() + self.stall);
                d
            }
            None => self
                .deadline
                .insert(Box::pin(tokio::time::sleep(self.stall))),
        };
        self.progressed = false;
        deadline.as_mut().poll(cx)
    }
}

impl Drop for ServerBody {
    fn drop(&mut self) {
        // Unread: the connection drains a little and closes.
        self.go_home(false);
    }
}

impl Body for ServerBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let (io, activity) = (&mut this.io, &this.activity);
        let polled = this
            .reader
            .poll_frame(&mut this.buf, cx, |cx, buf| match io {
                Some(io) => {
                    let r = tokio_util::io::poll_read_buf(Pin::new(io), cx, buf);
                    if let (true, Some(a)) = (r.is_ready(), activity) {
                        a.fetch_add(PROGRESS, Ordering::Relaxed);
                    }
                    r
                }
                None => Poll::Ready(Ok(0)),
            });
        match &polled {
            Poll::Ready(Some(Err(e))) => {
                // The connection's framing is lost: it closes, with a 400
                // when the client sent a malformed body.
                let malformed = match e {
                    BodyError::Framing(e) => Some(e.clone()),
                    _ => None,
                };
                if malformed.is_some() {
                    this.send_home(false, false, malformed);
                }
                this.io = None;
                this.home = None;
            }
            Poll::Ready(_) if this.reader.is_done() => this.go_home(true),
            Poll::Ready(_) => this.progressed = true,
            Poll::Pending => {
                if this.poll_stall(cx).is_ready() {
                    this.send_home(false, true, None);
                    this.deadline = None;
                    return Poll::Ready(Some(Err(BodyError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("request body made no progress for {:?}", this.stall),
                    )))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.reader.size_hint()
    }
}

/// The client's connection after the server answered `101 Switching
/// Protocols`: what it sent after its request head, then the socket.
pub struct Upgraded {
    /// Bytes from the client, in the new protocol.
    pub read: Rewind<OwnedReadHalf>,
    /// Bytes to the client.
    pub write: OwnedWriteHalf,
}

/// In the extensions of a request that asks to switch protocols (an
/// HTTP/1.1 `GET` without a body, with `upgrade` among its `Connection`
/// options and an `Upgrade` field) or for a tunnel (a `CONNECT` without a
/// body): only such a request may be answered `101` (a `CONNECT`, 2xx),
/// and only with a [`SwitchTo`].
#[derive(Clone, Copy, Debug)]
pub struct MaySwitch;

/// What runs the connection once its `101` head is written.
type Switched = Box<dyn FnOnce(Upgraded) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Put on a `101` answer (or a `CONNECT`'s 2xx): once the head is
/// written, the connection goes to the closure, whose future the
/// connection's task then runs to its end (so that the connection still
/// counts against the listener's limits while it lasts). A `101`, or a
/// `CONNECT`'s 2xx, without it becomes a 502.
#[derive(Clone)]
pub struct SwitchTo(Arc<std::sync::Mutex<Option<Switched>>>);

impl SwitchTo {
    /// A handoff to `f`.
    pub fn new<F, Fut>(f: F) -> SwitchTo
    where
        F: FnOnce(Upgraded) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let f: Switched = Box::new(move |io| Box::pin(f(io)));
        SwitchTo(Arc::new(std::sync::Mutex::new(Some(f))))
    }

    fn take(&self) -> Option<Switched> {
        self.0.lock().ok().and_then(|mut f| f.take())
    }
}

impl std::fmt::Debug for SwitchTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwitchTo")
    }
}

/// Whether a request head asks to switch protocols or for a tunnel, and
/// could (no body: the new protocol's bytes would follow one whose end the
/// server must find first).
fn may_switch(parts: &http::request::Parts, framing: Framing) -> bool {
    if framing != Framing::Empty {
        return false;
    }
    if parts.method == Method::CONNECT {
        // HTTP/1.0 clients send it too (RFC 9112 §3.2.3: authority-form).
        return true;
    }
    parts.headers.contains_key(http::header::UPGRADE)
        && parts.method == Method::GET
        && parts.version == Version::HTTP_11
        && owned::list_elements(&parts.headers, http::header::CONNECTION)
            .any(|t| t.eq_ignore_ascii_case(b"upgrade"))
}

/// How a response switches the connection over, if it does: a `101`, or
/// a 2xx to a `CONNECT` (RFC 9110 §9.3.6: the tunnel starts after its
/// head, which has no framing fields).
fn switch_of(method: &Method, status: StatusCode) -> Option<Connection> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        Some(Connection::Upgrade)
    } else if *method == Method::CONNECT && status.is_success() {
        Some(Connection::Default)
    } else {
        None
    }
}

/// Why reading a request head stopped.
enum HeadEnd {
    /// The client closed between requests, or the connection is closing.
    Done,
    /// The head did not arrive in time.
    Timeout,
    /// The head is malformed or too large.
    Bad(H1Error),
    /// The connection failed (or closed in the middle of a head).
    Io(io::Error),
}

/// Serves requests on `tcp` until the client closes, a response says
/// `connection: close`, or `closing` is set (checked between requests: the
/// caller sets it for idle and shutdown, then polls again).
pub async fn serve<H, F, B>(
    tcp: TcpStream,
    mut limits: ServerLimits,
    closing: &AtomicBool,
    activity: Arc<AtomicU64>,
    holder: Arc<Holder>,
    mut handler: H,
) -> io::Result<()>
where
    H: FnMut(Request<ServerBody>) -> F,
    F: Future<Output = Response<B>>,
    B: ResponseBody,
{
    let (rd, mut wr) = tcp.into_split();
    let mut rd = Some(rd);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut unfinished = Growing::new(holder);
    loop {
        let Some(io) = rd.as_mut() else {
            return Ok(());
        };
        let head = match read_head(io, &mut buf, limits, closing, &activity, &mut unfinished).await
        {
            Ok(head) => {
                limits.first_head_by = None;
                head
            }
            Err(HeadEnd::Done) => return Ok(()),
            Err(HeadEnd::Io(e)) => return Err(e),
            Err(HeadEnd::Timeout) => {
                let resp: Response<B> = text(
                    StatusCode::REQUEST_TIMEOUT,
                    "request head not received in time\n",
                );
                return refuse(&mut wr, &mut out, resp, &activity).await;
            }
            Err(HeadEnd::Bad(e)) => {
                let resp: Response<B> = text(e.status(), format!("bad request: {e}\n"));
                refuse(&mut wr, &mut out, resp, &activity).await?;
                // The client may still be sending (the rest of a head too
                // large, a body): read on, or its next write is reset and
                // it may never read the answer. Not after a timeout: that
                // client is the slow one.
                linger(io).await;
                return Ok(());
            }
        };
        let RequestHead {
            mut parts,
            framing,
            keep_alive,
            expect_continue,
        } = head;
        let may = may_switch(&parts, framing);
        if may {
            parts.extensions.insert(MaySwitch);
        }
        let (method, version) = (parts.method.clone(), parts.version);
        if expect_continue {
            wr.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let (body, mut home) = if framing == Framing::Empty {
            (ServerBody::empty(), None)
        } else {
            let (tx, rx) = oneshot::channel();
            let body = ServerBody {
                io: rd.take(),
                buf: std::mem::take(&mut buf),
                reader: BodyReader::new(framing, limits.max_header_bytes),
                home: Some(tx),
                activity: Some(activity.clone()),
                stall: limits.body_timeout,
                deadline: None,
                progressed: false,
            };
            (body, Some(rx))
        };
        let mut resp = handler(Request::from_parts(parts, body)).await;
        // A CONNECT that did not switch was refused; what follows it on the wire
        // would be tunnel bytes, not a request.
        let mut close = !keep_alive || method == Method::CONNECT;
        // A body that is back already (read whole, or dropped unread) is
        // settled before the head goes out, so that a connection that will
        // close says so.
        let mut unread = None;
        if let Some(rx) = home.as_mut() {
            match rx.try_recv() {
                Ok(side) if side.stalled => {
                    // What the handler made of the broken body (a 502, say)
                    // is not the cause: the client stalled.
                    resp = stalled(limits.body_timeout);
                    (home, close) = (None, true);
                    drop(side);
                }
                Ok(ReadSide {
                    malformed: Some(e), ..
                }) => {
                    // Nor when the client's body was malformed.
                    resp = text(e.status(), format!("bad request body: {e}\n"));
                    (home, close) = (None, true);
                }
                Ok(side) if side.finished => {
                    (rd, buf, home) = (Some(side.io), side.buf, None);
                }
                Ok(side) => (unread, home, close) = (Some(side.io), None, true),
                Err(oneshot::error::TryRecvError::Empty) => {}
                // The body failed: its framing, so the connection's, is lost.
                Err(oneshot::error::TryRecvError::Closed) => (home, close) = (None, true),
            }
        }
        if switch_of(&method, resp.status()).is_some() && closing.load(Ordering::Relaxed) {
            // Draining: no new connection-long tunnel starts now.
            resp = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the sidecar is shutting down; switch protocols on a new connection\n",
            );
        }
        if method == Method::CONNECT && resp.status().is_success() && !buf.is_empty() {
            // Tunnel bytes already read with the head: the tunnel's server
            // reads its socket from the first byte, so they would be lost.
            // Refused, whatever the TCP segments were, rather than a 200
            // and a silent close.
            resp = text(
                StatusCode::BAD_REQUEST,
                "bytes were sent after CONNECT before its 200: wait for the tunnel to open\n",
            );
        }
        if let Some(connection) = switch_of(&method, resp.status()) {
            let to = resp
                .extensions_mut()
                .remove::<SwitchTo>()
                .and_then(|s| s.take());
            // The request had no body: the read half is here.
            match (to.filter(|_| may), rd.take()) {
                (Some(to), Some(read)) => {
                    let (mut rparts, _) = resp.into_parts();
                    // A tunnel's 2xx has no framing (RFC 9110 §9.3.6).
                    rparts.headers.remove(http::header::CONTENT_LENGTH);
                    h1::write_response_head(
                        &rparts,
                        Framing::Empty,
                        connection,
                        http_date,
                        &mut out,
                    );
                    flush(&mut wr, &mut out, &activity).await?;
                    let read = Rewind::new(buf.to_vec(), read);
                    to(Upgraded { read, write: wr }).await;
                    return Ok(());
                }
                (_, read) => {
                    rd = read;
                    resp = text(
                        StatusCode::BAD_GATEWAY,
                        "a switch of protocols (101, or a CONNECT's 2xx) answered to a request that could not switch\n",
                    );
                }
            }
        }
        let (rparts, rbody) = resp.into_parts();
        let framing = h1::response_framing_for(
            &method,
            version,
            rparts.status,
            &rparts.headers,
            rbody.size_hint().exact(),
        );
        close |= framing == Framing::UntilClose || closing.load(Ordering::Relaxed);
        let connection = if close {
            Connection::Close
        } else if version == Version::HTTP_10 {
            Connection::KeepAlive
        } else {
            Connection::Default
        };
        h1::write_response_head(&rparts, framing, connection, http_date, &mut out);
        if !write_body(&mut wr, &mut out, rbody, framing, &activity).await? {
            // The response broke off: closing is how the client learns.
            return Ok(());
        }
        if let Some(home) = home {
            match wait_home(home, closing).await {
                Some(side) if side.stalled || side.malformed.is_some() => return Ok(()),
                Some(side) if side.finished => (rd, buf) = (Some(side.io), side.buf),
                // The head went out without `connection: close` (the body
                // was still being read): a client sends its next request
                // on this connection, so the rest of the body is read and
                // discarded, within bounds, rather than the connection
                // closed under that request (round 9 F6).
                Some(side) => match drain_rest(side).await {
                    Ok((io, b)) if !closing.load(Ordering::Relaxed) => (rd, buf) = (Some(io), b),
                    Ok((io, _)) | Err(io) => (unread, close) = (Some(io), true),
                },
                None => return Ok(()),
            }
        }
        if close {
            let _ = wr.shutdown().await;
            if let Some(mut io) = unread {
                linger(&mut io).await;
            }
            return Ok(());
        }
    }
}

/// Reads and discards the rest of a request body its handler dropped
/// unread, up to [`LINGER_BYTES`] within [`LINGER`] (the bounds of a
/// closing connection's linger): the read half and what follows the body,
/// or the read half alone when the body did not end within them (the
/// connection then closes).
async fn drain_rest(side: ReadSide) -> Result<(OwnedReadHalf, BytesMut), OwnedReadHalf> {
    let ReadSide {
        mut io,
        mut buf,
        mut reader,
        ..
    } = side;
    let mut seen = 0;
    let drained = tokio::time::timeout(LINGER, async {
        loop {
            let frame = poll_fn(|cx| {
                reader.poll_frame(&mut buf, cx, |cx, buf| {
                    tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, buf)
                })
            })
            .await;
            match frame {
                None => return reader.is_done(),
                Some(Ok(f)) => {
                    seen += f.data_ref().map_or(0, Bytes::len);
                    if seen > LINGER_BYTES {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    })
    .await;
    match drained {
        Ok(true) => Ok((io, buf)),
        _ => Err(io),
    }
}

/// The answer to a request whose body stalled.
fn stalled<B: ResponseBody>(after: Duration) -> Response<B> {
    text(
        StatusCode::REQUEST_TIMEOUT,
        format!("request body made no progress for {after:?}\n"),
    )
}

/// The read half back from a request body, unless the connection closes
/// first (the body may still be streaming to the mesh when the response is
/// complete).
async fn wait_home(home: oneshot::Receiver<ReadSide>, closing: &AtomicBool) -> Option<ReadSide> {
    let mut home = pin!(home);
    poll_fn(|cx| {
        if let Poll::Ready(r) = home.as_mut().poll(cx) {
            return Poll::Ready(r.ok());
        }
        if closing.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Reads until a whole request head is in `buf`. No timer runs while the
/// connection waits for a first byte (the idle timeout covers that), nor
/// when a head arrives whole: only a partial head arms one, and is charged
/// to the memory budget (`unfinished`) until it ends.
async fn read_head(
    io: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    limits: ServerLimits,
    closing: &AtomicBool,
    activity: &AtomicU64,
    unfinished: &mut Growing,
) -> Result<RequestHead, HeadEnd> {
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        if !buf.is_empty() {
            match h1::parse_request_head(buf, limits.max_header_bytes) {
                Ok(Some(head)) => {
                    unfinished.done();
                    return Ok(head);
                }
                Ok(None) => {}
                Err(e) => return Err(HeadEnd::Bad(e)),
            }
            if !unfinished.hold(buf.len() as u64) {
                return Err(HeadEnd::Io(io::Error::other(
                    "unfinished request head refused: the app's share of the memory budget is spent",
                )));
            }
            if deadline.is_none() && !buf.is_empty() {
                deadline = Some(Box::pin(match limits.first_head_by {
                    Some(by) => tokio::time::sleep_until(by),
                    None => tokio::time::sleep(limits.header_read_timeout),
                }));
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(h1::SMALL_READ);
        }
        let n = poll_fn(|cx| {
            if buf.is_empty() && closing.load(Ordering::Relaxed) {
                return Poll::Ready(Err(HeadEnd::Done));
            }
            if let Some(d) = deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(HeadEnd::Timeout));
                }
            }
            tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf).map_err(HeadEnd::Io)
        })
        .await?;
        activity.fetch_add(PROGRESS, Ordering::Relaxed);
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadEnd::Done
            } else {
                HeadEnd::Io(io::ErrorKind::UnexpectedEof.into())
            });
        }
    }
}

/// Writes the head in `out` and the body after it. `Ok(false)`: the body
/// failed or did not match its declared length, and the connection must
/// close without completing the message.
async fn write_body<B: ResponseBody>(
    wr: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    body: B,
    framing: Framing,
    activity: &AtomicU64,
) -> io::Result<bool> {
    let mut body = pin!(body);
    let chunked = framing == Framing::Chunked;
    let mut left = match framing {
        Framing::Length(n) => Some(n),
        _ => None,
    };
    if framing == Framing::Empty || body.is_end_stream() {
        if chunked {
            h1::write_last_chunk(None, out);
        }
        flush(wr, out, activity).await?;
        return Ok(left.unwrap_or(0) == 0);
    }
    loop {
        // Whatever the body has ready joins the bytes waiting to be
        // written; only when it has nothing ready is the buffer written
        // and the body awaited.
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                flush(wr, out, activity).await?;
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        let frame = match frame {
            None => {
                if chunked {
                    h1::write_last_chunk(None, out);
                }
                flush(wr, out, activity).await?;
                return Ok(left.unwrap_or(0) == 0);
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body broke off");
                flush(wr, out, activity).await?;
                return Ok(false);
            }
            Some(Ok(f)) => f,
        };
        match frame.into_data() {
            Ok(data) => {
                if let Some(l) = left.as_mut() {
                    if data.len() as u64 > *l {
                        flush(wr, out, activity).await?;
                        return Ok(false);
                    }
                    *l -= data.len() as u64;
                }
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    h1::chunk_start(data.len(), out);
                }
                if data.len() <= GATHER {
                    out.put_slice(&data);
                } else {
                    flush(wr, out, activity).await?;
                    wr.write_all(&data).await?;
                    activity.fetch_add(PROGRESS, Ordering::Relaxed);
                }
                if chunked {
                    out.put_slice(b"\r\n");
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    if chunked {
                        h1::write_last_chunk(Some(&trailers), out);
                    }
                    flush(wr, out, activity).await?;
                    return Ok(left.unwrap_or(0) == 0);
                }
            }
        }
        if body.is_end_stream() {
            if chunked {
                h1::write_last_chunk(None, out);
            }
            flush(wr, out, activity).await?;
            return Ok(left.unwrap_or(0) == 0);
        }
        if out.len() >= GATHER {
            flush(wr, out, activity).await?;
        }
    }
}

async fn flush(
    wr: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    activity: &AtomicU64,
) -> io::Result<()> {
    if !out.is_empty() {
        wr.write_all(out).await?;
        activity.fetch_add(PROGRESS, Ordering::Relaxed);
        out.clear();
    }
    Ok(())
}

/// Answers a request that could not be read, and closes.
async fn refuse<B: ResponseBody>(
    wr: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    resp: Response<B>,
    activity: &AtomicU64,
) -> io::Result<()> {
    let (parts, body) = resp.into_parts();
    let framing = Framing::Length(body.size_hint().exact().unwrap_or(0));
    h1::write_response_head(&parts, framing, Connection::Close, http_date, out);
    write_body(wr, out, body, framing, activity).await?;
    let _ = wr.shutdown().await;
    Ok(())
}

/// Reads and discards what the client is still sending, briefly, before
/// the connection closes: closing a socket with unread bytes makes the
/// kernel send a reset, which can destroy the response before the client
/// reads it.
async fn linger(io: &mut OwnedReadHalf) {
    let mut scratch = BytesMut::with_capacity(16 * 1024);
    let mut seen = 0;
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            scratch.clear();
            match poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut scratch))
                .await
            {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    seen += n;
                    if seen > LINGER_BYTES {
                        return;
                    }
                }
            }
        }
    })
    .await;
}

/// A body already wholly in `wire`, framed as `framing`, for the tests of
/// the modules that carry a `ServerBody` (its connection is gone: a body
/// that wants more than `wire` fails as cut short).
#[cfg(test)]
impl ServerBody {
    pub(crate) fn from_wire(framing: Framing, wire: &[u8]) -> ServerBody {
        let mut body = ServerBody::empty();
        body.buf = BytesMut::from(wire);
        body.reader = BodyReader::new(framing, 1024);
        body
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use http::HeaderValue;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncRead, AsyncReadExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::http::traits::test_body::{data, TestBody};

    /// Longest any single wait in these tests may take before it fails.
    const WAIT: Duration = Duration::from_secs(2);

    fn limits() -> ServerLimits {
        ServerLimits {
            header_read_timeout: Duration::from_millis(100),
            first_head_by: None,
            max_header_bytes: 1024,
            body_timeout: Duration::from_millis(100),
        }
    }

    struct Server {
        addr: SocketAddr,
        activity: Arc<AtomicU64>,
    }

    /// Serves every connection to the returned address with `handler`.
    async fn server<H, F, B>(limits: ServerLimits, closing: Arc<AtomicBool>, handler: H) -> Server
    where
        H: FnMut(Request<ServerBody>) -> F + Clone + Send + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: ResponseBody + Send + 'static,
        B::Error: Send,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let activity = Arc::new(AtomicU64::new(0));
        let a = activity.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (closing, a, h) = (closing.clone(), a.clone(), handler.clone());
                tokio::spawn(
                    async move { serve(tcp, limits, &closing, a, Arc::default(), h).await },
                );
            }
        });
        Server { addr, activity }
    }

    /// The request's body as the response's, its path and trailers in
    /// `x-path` and `x-trailers`; 502 when the body failed.
    async fn echo(req: Request<ServerBody>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        match body.collect().await {
            Ok(c) => {
                let trailers = c.trailers().map_or(String::new(), |t| {
                    t.iter()
                        .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                        .collect::<Vec<_>>()
                        .join(";")
                });
                let mut r = Response::new(Full::new(c.to_bytes()));
                let h = r.headers_mut();
                h.insert(
                    "x-path",
                    HeaderValue::from_str(&parts.uri.to_string()).unwrap(),
                );
                h.insert("x-trailers", HeaderValue::from_str(&trailers).unwrap());
                r
            }
            Err(e) => text(StatusCode::BAD_GATEWAY, format!("body failed: {e}\n")),
        }
    }

    /// Answers "ok" without reading the request body.
    async fn ignore_body(_req: Request<ServerBody>) -> Response<Full<Bytes>> {
        Response::new(Full::new(Bytes::from_static(b"ok")))
    }

    fn open() -> Arc<AtomicBool> {
        Arc::default()
    }

    #[derive(Debug)]
    struct Resp {
        status: u16,
        head: String,
        body: Vec<u8>,
        trailers: String,
        /// The body ended as its framing says (not cut by a close).
        complete: bool,
    }

    impl Resp {
        fn field(&self, name: &str) -> Option<&str> {
            self.head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then_some(v.trim())
            })
        }
    }

    fn find(buf: &[u8], what: &[u8]) -> Option<usize> {
        buf.windows(what.len()).position(|w| w == what)
    }

    /// Reads more of the connection into `buf`; 0 at its end (or reset).
    async fn read_more<R: AsyncRead + Unpin>(s: &mut R, buf: &mut Vec<u8>) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("the server neither answered nor closed")
        {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// Reads one response; `None` when the connection closed before one.
    /// `bodyless`: it answers a HEAD.
    async fn response<R: AsyncRead + Unpin>(
        s: &mut R,
        buf: &mut Vec<u8>,
        bodyless: bool,
    ) -> Option<Resp> {
        let end = loop {
            if let Some(p) = find(buf, b"\r\n\r\n") {
                break p + 4;
            }
            if read_more(s, buf).await == 0 {
                assert!(buf.is_empty(), "closed inside a head: {buf:?}");
                return None;
            }
        };
        let head = String::from_utf8(buf.drain(..end).collect()).expect("ascii head");
        let status = head[9..12].parse().expect("status");
        let mut r = Resp {
            status,
            head,
            body: Vec::new(),
            trailers: String::new(),
            complete: true,
        };
        if bodyless || status < 200 || status == 204 || status == 304 {
            return Some(r);
        }
        if r.field("transfer-encoding") == Some("chunked") {
            loop {
                let line = loop {
                    if let Some(p) = find(buf, b"\r\n") {
                        break p;
                    }
                    if read_more(s, buf).await == 0 {
                        r.complete = false;
                        return Some(r);
                    }
                };
                let size = std::str::from_utf8(&buf[..line]).expect("chunk line");
                let size = usize::from_str_radix(size, 16).expect("hex chunk size");
                buf.drain(..line + 2);
                if size == 0 {
                    let end = loop {
                        if buf.starts_with(b"\r\n") {
                            break 2;
                        }
                        if let Some(p) = find(buf, b"\r\n\r\n") {
                            break p + 4;
                        }
                        if read_more(s, buf).await == 0 {
                            r.complete = false;
                            return Some(r);
                        }
                    };
                    let t: Vec<u8> = buf.drain(..end).collect();
                    r.trailers = String::from_utf8(t).expect("ascii").trim().to_owned();
                    return Some(r);
                }
                while buf.len() < size + 2 {
                    if read_more(s, buf).await == 0 {
                        r.body.append(buf);
                        r.complete = false;
                        return Some(r);
                    }
                }
                r.body.extend(buf.drain(..size));
                assert_eq!(buf.drain(..2).as_slice(), b"\r\n");
            }
        } else if let Some(n) = r.field("content-length") {
            let n: usize = n.parse().expect("content-length");
            while buf.len() < n {
                if read_more(s, buf).await == 0 {
                    r.body.append(buf);
                    r.complete = false;
                    return Some(r);
                }
            }
            r.body = buf.drain(..n).collect();
        } else {
            while read_more(s, buf).await > 0 {}
            r.body.append(buf);
        }
        Some(r)
    }

    async fn assert_closed<R: AsyncRead + Unpin>(s: &mut R, buf: &mut Vec<u8>) {
        assert!(buf.is_empty(), "bytes after the last response: {buf:?}");
        assert_eq!(read_more(s, buf).await, 0, "open: {buf:?}");
    }

    /// Sends `raw` on a new connection and reads one response.
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> (TcpStream, Vec<u8>, Resp) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(raw).await.expect("write");
        let mut buf = Vec::new();
        let r = response(&mut s, &mut buf, false).await.expect("a response");
        (s, buf, r)
    }

    /// Answers a request that may switch with 101 (a `CONNECT` with 200)
    /// and echoes the switched connection's bytes in upper case; any other
    /// request with 101 (200) too
    /// (which the server must not pass on), and a 101 without a handoff
    /// for `/bare`.
    async fn switcher(req: Request<ServerBody>) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::new()));
        if req.method() == Method::CONNECT {
            // A tunnel's answer is a 2xx; a length must not go out.
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        } else {
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert(http::header::UPGRADE, HeaderValue::from_static("shout"));
        }
        if req.extensions().get::<MaySwitch>().is_none() {
            // Not asked: a handoff is there, but must not be used.
            r.extensions_mut().insert(SwitchTo::new(|_| async {}));
            return r;
        }
        if req.uri().path() == "/bare" {
            return r;
        }
        r.extensions_mut()
            .insert(SwitchTo::new(|mut io| async move {
                let mut buf = [0u8; 64];
                loop {
                    match io.read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let up = buf[..n].to_ascii_uppercase();
                            if io.write.write_all(&up).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }));
        r
    }

    #[tokio::test]
    async fn a_101_hands_the_connection_over_with_what_followed_the_head() {
        let srv = server(limits(), open(), switcher).await;
        // The client's first bytes of the new protocol come in the same
        // write as the head: they are the switched connection's.
        let raw = b"GET /s HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: shout\r\n\r\nearly";
        let (mut s, mut buf, r) = exchange(srv.addr, raw).await;
        assert_eq!(r.status, 101, "{r:?}");
        assert_eq!(r.field("connection"), Some("upgrade"));
        assert_eq!(r.field("upgrade"), Some("shout"));
        while buf.len() < 5 {
            assert!(read_more(&mut s, &mut buf).await > 0);
        }
        assert_eq!(&buf[..], b"EARLY");
        s.write_all(b"later").await.unwrap();
        buf.clear();
        while buf.len() < 5 {
            assert!(read_more(&mut s, &mut buf).await > 0);
        }
        assert_eq!(&buf[..], b"LATER");
    }

    #[tokio::test]
    async fn only_a_bodiless_http11_get_asking_to_switch_may_be_answered_101() {
        let srv = server(limits(), open(), switcher).await;
        for raw in [
            // No Connection option, a body, another method, HTTP/1.0.
            &b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: shout\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: shout\r\nContent-Length: 2\r\n\r\nhi",
            b"OPTIONS / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: shout\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: shout\r\n\r\n",
            // Asked, but the handler's 101 hands the connection to nobody.
            b"GET /bare HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: shout\r\n\r\n",
        ] {
            let (_s, _buf, r) = exchange(srv.addr, raw).await;
            assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(raw));
            assert!(
                String::from_utf8_lossy(&r.body).contains("could not switch"),
                "{r:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_connects_2xx_hands_the_connection_over_without_framing_fields() {
        let srv = server(limits(), open(), switcher).await;
        // HTTP/1.1 and HTTP/1.0; the tunnel's bytes once the 200 is in.
        for head in [
            &b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"[..],
            b"CONNECT a:443 HTTP/1.0\r\n\r\n",
        ] {
            // Read by hand: a 2xx without framing fields is, to a client
            // that did not send CONNECT, a body up to the close.
            let mut s = TcpStream::connect(srv.addr).await.unwrap();
            s.write_all(head).await.unwrap();
            let mut buf = Vec::new();
            while find(&buf, b"\r\n\r\n").is_none() {
                assert!(read_more(&mut s, &mut buf).await > 0);
            }
            s.write_all(b"early").await.unwrap();
            while find(&buf, b"EARLY").is_none() {
                assert!(read_more(&mut s, &mut buf).await > 0);
            }
            let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
            let (head, rest) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
            for field in ["content-length", "transfer-encoding", "connection"] {
                assert!(!head.contains(field), "{field}: {head}");
            }
            assert_eq!(rest, "early");
        }
        // Tunnel bytes read with the head would be lost to the tunnel's
        // server: 400, however the segments fell.
        let (_s, _buf, r) = exchange(
            srv.addr,
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nearly",
        )
        .await;
        assert_eq!(r.status, 400);
        // With content, a CONNECT cannot switch (where would the tunnel
        // start?): the handler's 200 becomes a 502.
        let (_s, _buf, r) = exchange(
            srv.addr,
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 2\r\n\r\nhi",
        )
        .await;
        assert_eq!(r.status, 502);
    }

    #[tokio::test]
    async fn a_request_head_slower_than_header_read_timeout_gets_408_and_close() {
        let srv = server(limits(), open(), echo).await;
        let start = Instant::now();
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET / HTTP/1.1\r\nHost: a\r\n").await;
        assert_eq!(r.status, 408);
        assert!(start.elapsed() >= limits().header_read_timeout);
        assert_eq!(r.field("connection"), Some("close"));
        assert_closed(&mut s, &mut buf).await;
    }

    #[tokio::test]
    async fn first_head_by_bounds_the_first_head_only() {
        // The first head is due by the instant given (its bytes were waited
        // for elsewhere already); a later head gets the whole timeout.
        let mut l = limits();
        l.header_read_timeout = Duration::from_millis(400);
        let first_by = tokio::time::Instant::now() + Duration::from_millis(100);
        l.first_head_by = Some(first_by);
        let srv = server(l, open(), echo).await;
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET / HTTP/1.1\r\nHost: a\r\n").await;
        assert_eq!(r.status, 408);
        assert!(tokio::time::Instant::now() >= first_by);
        assert_closed(&mut s, &mut buf).await;
        // Served in time, the next head has the full timeout: a piece 200
        // ms after the first is still in time.
        let first_by = tokio::time::Instant::now() + Duration::from_millis(100);
        l.first_head_by = Some(first_by);
        let srv = server(l, open(), echo).await;
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(r.status, 200);
        tokio::time::sleep_until(first_by).await;
        s.write_all(b"GET /2 HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(b"Host: a\r\n\r\n").await.unwrap();
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!((r.status, r.field("x-path")), (200, Some("/2")));
    }

    #[tokio::test]
    async fn the_head_timer_runs_from_the_first_byte_of_a_head_not_between_requests() {
        let srv = server(limits(), open(), echo).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let mut buf = Vec::new();
        // Silence before the first byte, and between requests, is the
        // caller's idle timeout to judge.
        for path in ["/1", "/2"] {
            tokio::time::sleep(limits().header_read_timeout * 2).await;
            let req = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let r = response(&mut s, &mut buf, false).await.unwrap();
            assert_eq!((r.status, r.field("x-path")), (200, Some(path)));
        }
        // A head trickling in, each piece well within the timeout, is
        // still timed as a whole.
        let start = Instant::now();
        let (mut rd, mut wr) = TcpStream::connect(srv.addr).await.unwrap().into_split();
        let mut buf = Vec::new();
        // Read while the pieces go out: writes after the server closed
        // could reset the connection before the response is read.
        tokio::spawn(async move {
            for piece in [
                "GET / HTTP/1.1\r\n",
                "a: 1\r\n",
                "b: 2\r\n",
                "c: 3\r\n",
                "d: 4\r\n",
            ] {
                if wr.write_all(piece.as_bytes()).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        });
        let r = response(&mut rd, &mut buf, false).await.unwrap();
        assert_eq!(r.status, 408);
        assert!(start.elapsed() >= limits().header_read_timeout);
    }

    #[tokio::test]
    async fn a_head_larger_than_max_header_bytes_gets_431_and_close() {
        let srv = server(limits(), open(), echo).await;
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(2000));
        let (mut s, mut buf, r) = exchange(srv.addr, big.as_bytes()).await;
        assert_eq!(r.status, 431);
        assert_eq!(r.field("connection"), Some("close"));
        assert_closed(&mut s, &mut buf).await;
        // Within the byte limit but over the field count.
        let many: String = (0..130).map(|i| format!("f{i}: v\r\n")).collect();
        let wide = ServerLimits {
            max_header_bytes: 8192,
            ..limits()
        };
        let srv = server(wide, open(), echo).await;
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let (_s, _buf, r) = exchange(srv.addr, req.as_bytes()).await;
        assert_eq!(r.status, 431);
        // A head just within the limit passes.
        let fits = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(990));
        assert!(fits.len() <= 1024);
        let srv = server(limits(), open(), echo).await;
        let (_s, _buf, r) = exchange(srv.addr, fits.as_bytes()).await;
        assert_eq!(r.status, 200);
    }

    /// A client still sending when its head is refused (a head far over
    /// the limit, a malformed one followed by its body) gets to finish
    /// sending and reads the answer: the server reads on briefly before it
    /// closes, as it does after an unread body, rather than reset the
    /// client's writes.
    #[tokio::test]
    async fn a_refused_head_is_answered_while_the_client_is_still_sending() {
        let srv = server(limits(), open(), echo).await;
        for (start, status) in [
            (&b"GET / HTTP/1.1\r\nx: "[..], 431),
            (&b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..], 400),
        ] {
            for _ in 0..5 {
                let s = TcpStream::connect(srv.addr).await.expect("connect");
                let (mut rd, mut wr) = s.into_split();
                let start = start.to_vec();
                let writer = tokio::spawn(async move {
                    wr.write_all(&start).await?;
                    let filler = vec![b'a'; 64 * 1024];
                    for _ in 0..3 {
                        wr.write_all(&filler).await?;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok::<_, io::Error>(wr)
                });
                let mut buf = Vec::new();
                let r = response(&mut rd, &mut buf, false).await;
                assert_eq!(r.map(|r| r.status), Some(status));
                // A client such as curl stops at its first failed write
                // and never reads the answer.
                let wrote = writer.await.expect("writer");
                assert!(wrote.is_ok(), "a write failed: {:?}", wrote.err());
            }
        }
    }

    #[tokio::test]
    async fn malformed_heads_are_refused_with_their_status_and_close() {
        let srv = server(limits(), open(), echo).await;
        for (raw, status) in [
            (&b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..], 400),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 400),
            (b"G(T / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/9.9\r\n\r\n", 400),
            (b"\rGET / HTTP/1.1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"GET / HTTP/1.1\r\nExpect: later\r\n\r\n", 417),
        ] {
            let (mut s, mut buf, r) = exchange(srv.addr, raw).await;
            let what = String::from_utf8_lossy(raw);
            assert_eq!(r.status, status, "{what:?}");
            assert_eq!(r.field("connection"), Some("close"), "{what:?}");
            assert!(r.field("date").is_some(), "{what:?}");
            assert_closed(&mut s, &mut buf).await;
        }
    }

    #[tokio::test]
    async fn content_length_and_chunked_bodies_reach_the_handler_exactly() {
        let srv = server(limits(), open(), echo).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        let mut buf = Vec::new();
        // Large enough to take many reads.
        let big: String = (0..100_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let req = format!("POST /cl HTTP/1.1\r\nContent-Length: {}\r\n\r\n", big.len());
        s.write_all(req.as_bytes()).await.unwrap();
        s.write_all(big.as_bytes()).await.unwrap();
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!((r.status, r.field("x-path")), (200, Some("/cl")));
        assert!(r.body == big.as_bytes(), "content-length body differs");
        // Chunked, with an extension and trailers, in pieces that split
        // lines and data.
        let wire = b"POST /ch HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-t: 1\r\nx-u: 2\r\n\r\n";
        for piece in wire.chunks(7) {
            s.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!((r.status, r.field("x-path")), (200, Some("/ch")));
        assert_eq!(r.body, b"hello world");
        assert_eq!(r.field("x-trailers"), Some("x-t=1;x-u=2"));
        // The connection carries on after both.
        s.write_all(b"GET /after HTTP/1.1\r\n\r\n").await.unwrap();
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!((r.field("x-path"), r.body.len()), (Some("/after"), 0));
        assert!(srv.activity.load(Ordering::Relaxed) >= PROGRESS);
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let slow_first = |req: Request<ServerBody>| async move {
            if req.uri() == "/1" {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            echo(req).await
        };
        let srv = server(limits(), open(), slow_first).await;
        let (mut s, mut buf, first) = exchange(
            srv.addr,
            b"GET /1 HTTP/1.1\r\n\r\nPOST /2 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\nGET /4 HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        let mut got = vec![(
            first.field("x-path").unwrap().to_owned(),
            first.body.clone(),
        )];
        while let Some(r) = response(&mut s, &mut buf, false).await {
            got.push((r.field("x-path").unwrap().to_owned(), r.body));
        }
        let want: Vec<(String, Vec<u8>)> = [("/1", ""), ("/2", "abc"), ("/3", "z"), ("/4", "")]
            .iter()
            .map(|(p, b)| (p.to_string(), b.as_bytes().to_vec()))
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn expect_100_continue_is_answered_before_the_body_is_sent() {
        let srv = server(limits(), open(), echo).await;
        let (mut s, mut buf, r) = exchange(
            srv.addr,
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 100);
        s.write_all(b"hello").await.unwrap();
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"hello"[..]));
        // No body to wait for: no 100 either.
        s.write_all(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!(r.status, 200);
    }

    #[tokio::test]
    async fn a_body_stalled_past_body_timeout_gets_408_and_close() {
        let srv = server(limits(), open(), echo).await;
        let start = Instant::now();
        let (mut s, mut buf, r) = exchange(
            srv.addr,
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
        )
        .await;
        // Not the handler's 502: the client stalled.
        assert_eq!(r.status, 408);
        assert!(start.elapsed() >= limits().body_timeout);
        assert_eq!(r.field("connection"), Some("close"));
        assert_closed(&mut s, &mut buf).await;
    }

    #[tokio::test]
    async fn a_slow_body_that_keeps_progressing_is_not_stalled() {
        let patient = ServerLimits {
            body_timeout: Duration::from_millis(150),
            ..limits()
        };
        let srv = server(patient, open(), echo).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\n")
            .await
            .unwrap();
        // 240 ms in all, more than body_timeout, but never 150 ms without
        // a byte.
        for b in b"hello!" {
            tokio::time::sleep(Duration::from_millis(40)).await;
            s.write_all(&[*b]).await.unwrap();
        }
        let mut buf = Vec::new();
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"hello!"[..]));
    }

    #[tokio::test]
    async fn a_body_left_unread_makes_the_response_say_connection_close() {
        let srv = server(limits(), open(), ignore_body).await;
        let (mut s, mut buf, r) = exchange(
            srv.addr,
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\n\r\n",
        )
        .await;
        assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]));
        assert_eq!(r.field("connection"), Some("close"));
        assert_closed(&mut s, &mut buf).await;
        // A request without a body keeps the connection.
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(r.field("connection"), None);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(response(&mut s, &mut buf, false).await.unwrap().status, 200);
    }

    #[tokio::test]
    async fn a_body_read_after_the_response_gives_the_connection_back() {
        // The handler answers at once and reads the body later, as the
        // outbound does while a body streams to the mesh.
        let later = |req: Request<ServerBody>| async move {
            tokio::spawn(async move {
                let _ = req.into_body().collect().await;
            });
            Response::new(Full::new(Bytes::from_static(b"early")))
        };
        let srv = server(limits(), open(), later).await;
        let (mut s, mut buf, r) =
            exchange(srv.addr, b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc").await;
        assert_eq!((r.status, &r.body[..]), (200, &b"early"[..]));
        assert_eq!(r.field("connection"), None);
        s.write_all(b"defGET /2 HTTP/1.1\r\n\r\n").await.unwrap();
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"early"[..]));
    }

    #[tokio::test]
    async fn a_body_dropped_unread_after_the_response_is_drained_and_the_connection_kept() {
        // Round 9 F6: the outbound's answer went out while the body was
        // still on its way to the mesh, whose stream then ended without it
        // (an early 503): the connection closed under the client's next
        // request, though the head had not said it would.
        let later = |req: Request<ServerBody>| async move {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(req);
            });
            Response::new(Full::new(Bytes::from_static(b"early")))
        };
        let srv = server(limits(), open(), later).await;
        let (mut s, mut buf, r) =
            exchange(srv.addr, b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc").await;
        assert_eq!((r.status, r.field("connection")), (200, None));
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"defGET /2 HTTP/1.1\r\n\r\n").await.unwrap();
        let r = response(&mut s, &mut buf, false)
            .await
            .expect("served on the same connection");
        assert_eq!((r.status, &r.body[..]), (200, &b"early"[..]));
        // A rest larger than a lingering close reads: the connection closes.
        let big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 4 << 20);
        let (mut s, mut buf, r) = exchange(srv.addr, big.as_bytes()).await;
        assert_eq!(r.status, 200);
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..(4 << 20) / chunk.len() {
            if s.write_all(&chunk).await.is_err() {
                break;
            }
        }
        assert_closed(&mut s, &mut buf).await;
    }

    #[tokio::test]
    async fn a_malformed_chunked_body_gets_400_and_close_wherever_it_breaks() {
        let srv = server(limits(), open(), echo).await;
        for wire in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET / HTTP/1.1\r\n\r\n"[..],
            // Good chunks first: the break is mid-body.
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabcdef\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n-1\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
        ] {
            let (mut s, mut buf, r) = exchange(srv.addr, wire).await;
            // Not the handler's answer to the failed body (502): the
            // client sent it malformed.
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(wire));
            assert!(String::from_utf8_lossy(&r.body).contains("malformed"), "{r:?}");
            assert_eq!(r.field("connection"), Some("close"));
            assert_closed(&mut s, &mut buf).await;
        }
    }

    #[tokio::test]
    async fn http_10_closes_unless_keep_alive_and_http_11_closes_on_request() {
        let srv = server(limits(), open(), echo).await;
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET / HTTP/1.0\r\n\r\n").await;
        assert_eq!((r.status, r.field("connection")), (200, Some("close")));
        assert_closed(&mut s, &mut buf).await;

        let (mut s, mut buf, r) = exchange(
            srv.addr,
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        )
        .await;
        assert_eq!(r.field("connection"), Some("keep-alive"));
        s.write_all(b"GET /again HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!(r.field("x-path"), Some("/again"));

        let (mut s, mut buf, r) =
            exchange(srv.addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert_eq!(r.field("connection"), Some("close"));
        assert_closed(&mut s, &mut buf).await;
    }

    /// A response whose body has no known length: chunked for HTTP/1.1,
    /// until the close for HTTP/1.0.
    async fn streamed(_req: Request<ServerBody>) -> Response<TestBody> {
        Response::new(TestBody::steps(
            vec![
                data("str"),
                data("eam"),
                crate::http::traits::test_body::trailers(&[("grpc-status", "0")]),
            ],
            None,
        ))
    }

    #[tokio::test]
    async fn a_response_of_unknown_length_is_chunked_or_closes_for_http_10() {
        let srv = server(limits(), open(), streamed).await;
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(r.field("transfer-encoding"), Some("chunked"));
        assert_eq!((&r.body[..], r.complete), (&b"stream"[..], true));
        assert_eq!(r.trailers, "grpc-status: 0");
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(response(&mut s, &mut buf, false).await.is_some());

        let (mut s, mut buf, r) = exchange(
            srv.addr,
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        )
        .await;
        assert_eq!(r.field("transfer-encoding"), None);
        assert_eq!(r.field("content-length"), None);
        assert_eq!(r.field("connection"), Some("close"));
        assert_eq!(r.body, b"stream", "read until the close");
        assert_closed(&mut s, &mut buf).await;
    }

    #[tokio::test]
    async fn head_204_and_304_responses_carry_no_body() {
        let by_path = |req: Request<ServerBody>| async move {
            let status = match req.uri().path() {
                "/204" => StatusCode::NO_CONTENT,
                "/304" => StatusCode::NOT_MODIFIED,
                _ => StatusCode::OK,
            };
            let mut r = Response::new(Full::new(Bytes::from_static(b"hello")));
            *r.status_mut() = status;
            r
        };
        let srv = server(limits(), open(), by_path).await;
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"HEAD / HTTP/1.1\r\n\r\nGET /204 HTTP/1.1\r\n\r\nGET /304 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let r = response(&mut s, &mut buf, true).await.unwrap();
        assert_eq!(r.status, 200);
        for status in [204, 304] {
            let r = response(&mut s, &mut buf, true).await.unwrap();
            assert_eq!(r.status, status);
            assert_eq!(r.field("content-length"), None);
        }
        // Had any of them carried "hello", it would be read as this head.
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"hello"[..]));
    }

    #[tokio::test]
    async fn a_response_body_shorter_than_its_content_length_closes_without_completing() {
        let short = |_req: Request<ServerBody>| async move {
            let mut r = Response::new(TestBody::steps(vec![data("abc")], None));
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("10"));
            r
        };
        let srv = server(limits(), open(), short).await;
        let (mut s, mut buf, r) =
            exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n").await;
        assert_eq!(r.field("content-length"), Some("10"));
        assert_eq!((&r.body[..], r.complete), (&b"abc"[..], false));
        assert_closed(&mut s, &mut buf).await;
    }

    #[tokio::test]
    async fn a_response_body_longer_than_its_content_length_is_cut_before_the_excess() {
        let long = |_req: Request<ServerBody>| async move {
            let mut r = Response::new(TestBody::steps(vec![data("hello")], None));
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("2"));
            r
        };
        let srv = server(limits(), open(), long).await;
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(r.field("content-length"), Some("2"));
        assert_eq!((r.body.len(), r.complete), (0, false));
        assert_closed(&mut s, &mut buf).await;
    }

    #[tokio::test]
    async fn a_response_body_that_fails_ends_without_a_last_chunk() {
        let failing = |_req: Request<ServerBody>| async move {
            Response::new(TestBody::steps(
                vec![data("part"), Err("broken".to_owned())],
                None,
            ))
        };
        let srv = server(limits(), open(), failing).await;
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(r.field("transfer-encoding"), Some("chunked"));
        assert_eq!((&r.body[..], r.complete), (&b"part"[..], false));
        assert_closed(&mut s, &mut buf).await;
    }

    #[tokio::test]
    async fn connect_and_closing_end_the_connection_after_the_response() {
        let closing = open();
        let flag = closing.clone();
        let handler = move |req: Request<ServerBody>| {
            let flag = flag.clone();
            async move {
                if req.uri().path() == "/drain" {
                    flag.store(true, Ordering::Relaxed);
                }
                let mut r = Response::new(Full::new(Bytes::new()));
                if req.method() == Method::CONNECT {
                    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                }
                r
            }
        };
        let srv = server(limits(), closing, handler).await;
        let (mut s, mut buf, r) =
            exchange(srv.addr, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").await;
        assert_eq!((r.status, r.field("connection")), (405, Some("close")));
        assert_closed(&mut s, &mut buf).await;
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET /drain HTTP/1.1\r\n\r\n").await;
        assert_eq!((r.status, r.field("connection")), (200, Some("close")));
        assert_closed(&mut s, &mut buf).await;
    }

    #[tokio::test]
    async fn a_date_is_added_only_when_the_response_has_none() {
        let dated = |req: Request<ServerBody>| async move {
            let mut r = Response::new(Full::new(Bytes::new()));
            if req.uri().path() == "/own" {
                r.headers_mut()
                    .insert(http::header::DATE, HeaderValue::from_static("D"));
            }
            r
        };
        let srv = server(limits(), open(), dated).await;
        let (mut s, mut buf, r) = exchange(srv.addr, b"GET / HTTP/1.1\r\n\r\n").await;
        let date = r.field("date").expect("a date");
        assert!(httpdate::parse_http_date(date).is_ok(), "{date:?}");
        s.write_all(b"GET /own HTTP/1.1\r\n\r\n").await.unwrap();
        let r = response(&mut s, &mut buf, false).await.unwrap();
        assert_eq!(r.head.matches("date:").count(), 1);
        assert_eq!(r.field("date"), Some("D"));
    }
}
