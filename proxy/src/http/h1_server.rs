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
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::http::h1::{self, BodyError, BodyReader, Connection, Framing, H1Error, RequestHead};
use crate::http::response::text;
use crate::http::server::PROGRESS;
use crate::http::traits::ResponseBody;

/// Body bytes up to this size are copied next to the head (or the previous
/// chunk) so that they go out in one write; larger ones are written as they
/// are.
const GATHER: usize = 16 * 1024;

/// How long a connection that is closed with a request body left unread is
/// drained first, so that the client reads the response rather than a reset.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 256 * 1024;

/// What the server enforces on each connection.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// From the first byte of a request head to its end.
    pub header_read_timeout: Duration,
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
        self.send_home(finished, false);
    }

    fn send_home(&mut self, finished: bool, stalled: bool) {
        if let (Some(home), Some(io)) = (self.home.take(), self.io.take()) {
            let buf = std::mem::take(&mut self.buf);
            let _ = home.send(ReadSide {
                io,
                buf,
                finished,
                stalled,
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
            Poll::Ready(Some(Err(_))) => {
                // The connection's framing is lost: it closes.
                this.io = None;
                this.home = None;
            }
            Poll::Ready(_) if this.reader.is_done() => this.go_home(true),
            Poll::Ready(_) => this.progressed = true,
            Poll::Pending => {
                if this.poll_stall(cx).is_ready() {
                    this.send_home(false, true);
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
    limits: ServerLimits,
    closing: &AtomicBool,
    activity: Arc<AtomicU64>,
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
    loop {
        let Some(io) = rd.as_mut() else {
            return Ok(());
        };
        let head = match read_head(io, &mut buf, limits, closing, &activity).await {
            Ok(head) => head,
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
                return refuse(&mut wr, &mut out, resp, &activity).await;
            }
        };
        let RequestHead {
            parts,
            framing,
            keep_alive,
            expect_continue,
        } = head;
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
        // A CONNECT is refused by the handler; what follows it on the wire
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
                Ok(side) if side.finished => {
                    (rd, buf, home) = (Some(side.io), side.buf, None);
                }
                Ok(side) => (unread, home, close) = (Some(side.io), None, true),
                Err(oneshot::error::TryRecvError::Empty) => {}
                // The body failed: its framing, so the connection's, is lost.
                Err(oneshot::error::TryRecvError::Closed) => (home, close) = (None, true),
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
                Some(side) if side.stalled => return Ok(()),
                Some(side) if side.finished => (rd, buf) = (Some(side.io), side.buf),
                Some(side) => (unread, close) = (Some(side.io), true),
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
/// when a head arrives whole: only a partial head arms one.
async fn read_head(
    io: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    limits: ServerLimits,
    closing: &AtomicBool,
    activity: &AtomicU64,
) -> Result<RequestHead, HeadEnd> {
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        if !buf.is_empty() {
            match h1::parse_request_head(buf, limits.max_header_bytes) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(HeadEnd::Bad(e)),
            }
            if deadline.is_none() && !buf.is_empty() {
                deadline = Some(Box::pin(tokio::time::sleep(limits.header_read_timeout)));
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

/// The `Date` value for responses that carry none (RFC 9110 section
/// 6.6.1), formatted once a second per thread.
fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHED: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let (at, date) = c.get();
        if at == secs && date[0] != 0 {
            return date;
        }
        let mut date = [0u8; 29];
        let s = httpdate::fmt_http_date(now);
        let n = s.len().min(29);
        date[..n].copy_from_slice(&s.as_bytes()[..n]);
        c.set((secs, date));
        date
    })
}
