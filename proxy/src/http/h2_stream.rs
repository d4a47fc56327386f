//! One HTTP/2 stream's traffic, the same whichever end opened it: a body
//! sent under the peer's flow control, a body received with its window
//! given back as it is passed on, and a `CONNECT` tunnel pumped to and
//! from a TCP connection. The outbound's mesh client (`mesh_client.rs`)
//! and the sidecar's HTTP/2 server (`h2_server.rs`) both use these.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::traits::SendBody;

/// The largest HTTP/2 DATA frame this proxy takes (`SETTINGS_MAX_FRAME_SIZE`,
/// its servers and its mesh client alike). HTTP/2's default, 16 KiB, makes
/// a bulk transfer through a tunnel one frame, one TLS write and one
/// `writev` per 16 KiB at the sender; at 32 KiB a frame is two TLS records
/// written at once. TLS records stay 16 KiB: the frame size changes only
/// how much goes down to TLS at a time. (64 KiB halved the writes again,
/// but the receiver's frame buffers then came and went in fresh pages:
/// page faults cost more than the writes saved.)
pub const MAX_FRAME_SIZE: u32 = 32 * 1024;

/// A connection's receive window is this many of its streams' windows.
///
/// Received data holds window, the stream's and the connection's, until
/// whoever reads the stream takes it: a tunnel or body whose app stops
/// reading ends up holding its stream's whole window of the connection's.
/// With the two windows equal, one such stream stopped every other stream
/// on the connection, every tunnel and request between the two pods. With
/// this ratio it takes this many stalled streams at once; the cost is that
/// the peer may have that much more buffered here while apps do not read.
pub const STALLED_STREAMS: u32 = 16;

/// What a pumped tunnel carried, and how it ended.
#[derive(Debug)]
pub struct TunnelEnd {
    /// Bytes read from the local side and sent on the stream.
    pub sent: u64,
    /// Bytes received on the stream and written to the local side.
    pub received: u64,
    /// `None` when both ways ended cleanly (FIN / END_STREAM) or the tunnel
    /// sat idle (see `idle`); else why the stream was reset, and the local
    /// side must be reset too.
    pub error: Option<String>,
    /// Nothing crossed the tunnel for the idle timeout: the stream was
    /// cancelled (`CANCEL`); whether the local side is reset or closed is
    /// the caller's choice.
    pub idle: bool,
    /// The caller's `stop` ended it: the stream was reset
    /// (`CONNECT_ERROR`), and the local side must be reset too.
    pub stopped: bool,
}

/// Largest chunk read from the local side at once: one DATA frame (the
/// peer takes frames up to [`MAX_FRAME_SIZE`]) whose 9-byte head and
/// payload fill exactly two 16 KiB TLS records; a round 32 KiB would spill
/// 9 bytes into a record of their own.
const TUNNEL_CHUNK: usize = 2 * 16 * 1024 - 9;

/// Body frames smaller than this, ready together, are sent as one.
const MERGE: usize = 16 * 1024;

use crate::http::io::MIN_PROGRESS;

/// How long a response has waited for its reader's window since the
/// reader last took [`MIN_PROGRESS`] bytes.
#[derive(Default)]
struct SlowReader {
    waited: Duration,
    taken: usize,
}

impl SlowReader {
    fn took(&mut self, n: usize) {
        self.taken += n;
        if self.taken >= MIN_PROGRESS {
            *self = SlowReader::default();
        }
    }
}

/// Pumps a `CONNECT` stream (`send`, `recv`) to and from a local
/// connection (`rd`, `wr`) until both ways have ended, or nothing crossed
/// for `idle` (closed then between `idle` and twice it).
///
/// Backpressure: the local side is read a chunk at a time, and send
/// window is asked for only for the bytes read, so an idle tunnel holds
/// none of the connection's window; the window for received data is
/// given back only once that data is written locally. Neither way
/// buffers more than a chunk or a window.
///
/// Ends: a FIN on one side ends that way only (END_STREAM, or
/// `shutdown()` of `wr`). An error on the local side (a reset app)
/// resets the stream with `CONNECT_ERROR` (RFC 9113 §8.5), which the
/// peer carries on as a reset of its own TCP side. A reset from the
/// peer, whatever its reason, is noticed even while the local side is
/// silent, and ends the pump with an error, for the caller to reset the
/// local side. Once both ways ended cleanly, nothing is watched.
///
/// `fin_grace`: how long the peer's END_STREAM waits, while the local side
/// still sends, for a reset that may follow it (see [`both_ways`]); zero
/// passes it on at once. `stop`: when it resolves, the tunnel is cut
/// (a reset both ways), whatever it is doing.
pub async fn pump_tunnel<R, W>(
    mut send: h2::SendStream<Bytes>,
    mut recv: h2::RecvStream,
    mut rd: R,
    mut wr: W,
    idle: Duration,
    fin_grace: Duration,
    stop: impl Future<Output = ()>,
) -> TunnelEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let both = both_ways(
        &mut rd, &mut wr, &mut send, &mut recv, &sent, &received, fin_grace,
    );
    let mut stopped = false;
    let result = tokio::select! {
        // A stop is looked at first: once it has come, not a byte more
        // crosses.
        biased;
        () = stop => {
            stopped = true;
            Err(Some("stopped".to_owned()))
        }
        r = both => r.map_err(Some),
        () = idle_watch(idle, &sent, &received) => Err(None),
    };
    let (error, idle) = match result {
        Ok(()) => (None, false),
        Err(Some(why)) => {
            send.send_reset(h2::Reason::CONNECT_ERROR);
            (Some(why), false)
        }
        Err(None) => {
            // Our own abandonment, not a failure of either side.
            send.send_reset(h2::Reason::CANCEL);
            (None, true)
        }
    };
    TunnelEnd {
        sent: sent.into_inner(),
        received: received.into_inner(),
        error,
        idle,
        stopped,
    }
}

/// Both ways of a tunnel, until both ended (or one failed).
///
/// The peer's END_STREAM becomes a FIN for the local side, but, with a
/// `fin_grace`, not at once while the local side is still sending: a peer
/// whose app reset may send END_STREAM and RST_STREAM right after it (an
/// inbound on hyper's upgraded stream, which has no bare reset). Passed on
/// at once, the END_STREAM would show the app here a clean end of a
/// truncated stream before the reset; held for the grace, the reset
/// arrives first and the app gets only the reset (the two frames leave the
/// peer together). A peer that ends first and cleanly delays its FIN by
/// that much, once per tunnel.
async fn both_ways<R, W>(
    rd: &mut R,
    wr: &mut W,
    send: &mut h2::SendStream<Bytes>,
    recv: &mut h2::RecvStream,
    sent: &AtomicU64,
    received: &AtomicU64,
    fin_grace: Duration,
) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut up = std::pin::pin!(tunnel_up(rd, send, sent));
    let mut up_done = false;
    {
        let mut down = std::pin::pin!(tunnel_down(recv, &mut *wr, received));
        loop {
            tokio::select! {
                r = &mut up, if !up_done => {
                    r?;
                    up_done = true;
                }
                r = &mut down => {
                    r?;
                    break;
                }
            }
        }
    }
    if !up_done && !fin_grace.is_zero() {
        if let Ok(r) = tokio::time::timeout(fin_grace, &mut up).await {
            r?;
            up_done = true;
        }
    }
    // END_STREAM: the peer is done sending; the local side gets a FIN.
    wr.shutdown()
        .await
        .map_err(|e| format!("closing the local side: {e}"))?;
    if !up_done {
        up.await?;
    }
    Ok(())
}

/// Returns once neither count moved for `idle` (checked every `idle`).
pub async fn idle_watch(idle: Duration, sent: &AtomicU64, received: &AtomicU64) {
    let mut last = None;
    loop {
        tokio::time::sleep(idle).await;
        let now = sent.load(Ordering::Relaxed) + received.load(Ordering::Relaxed);
        if last == Some(now) {
            return;
        }
        last = Some(now);
    }
}

/// How `tunnel_up` ends on a reset from the peer: with an error whatever
/// the reason, `NO_ERROR` included. The local side still sending, the
/// peer will take none of it: over TCP, a close with data still arriving
/// is answered with a reset too.
fn peer_reset(r: Result<h2::Reason, h2::Error>) -> Result<(), String> {
    match r {
        Ok(reason) => Err(format!("the peer reset the tunnel ({reason})")),
        Err(e) => Err(e.to_string()),
    }
}

/// Local side to stream, under the peer's flow control.
async fn tunnel_up<R: AsyncRead + Unpin>(
    rd: &mut R,
    send: &mut h2::SendStream<Bytes>,
    sent: &AtomicU64,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::new();
    loop {
        buf.reserve(TUNNEL_CHUNK);
        // Read first, watching for a reset meanwhile: window is reserved
        // only for bytes in hand, so a silent app pins none of the
        // connection window other streams need.
        let mut limited = (&mut *rd).take(TUNNEL_CHUNK as u64);
        let read = limited.read_buf(&mut buf);
        let n = tokio::select! {
            r = read => r.map_err(|e| format!("reading the local side: {e}"))?,
            r = poll_fn(|cx| send.poll_reset(cx)) => return peer_reset(r),
        };
        if n == 0 {
            // FIN: this way is over; the other keeps flowing.
            send.reserve_capacity(0);
            return send
                .send_data(Bytes::new(), true)
                .map_err(|e| format!("end of stream refused: {e}"));
        }
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            // h2 wakes `poll_capacity` only when capacity grows: window
            // already assigned is used as it is.
            let room = match send.capacity() {
                0 => {
                    let wait = poll_fn(|cx| {
                        if let Poll::Ready(r) = send.poll_reset(cx) {
                            return Poll::Ready(Err(r));
                        }
                        send.poll_capacity(cx).map(Ok)
                    });
                    match wait.await {
                        Err(r) => return peer_reset(r),
                        Ok(Some(Ok(n))) => n,
                        Ok(Some(Err(e))) => return Err(e.to_string()),
                        Ok(None) => return Err("the tunnel stream closed".to_owned()),
                    }
                }
                n => n,
            };
            if room == 0 {
                continue;
            }
            let chunk = data.split_to(room.min(data.len()));
            let len = chunk.len() as u64;
            send.send_data(chunk, false)
                .map_err(|e| format!("data refused: {e}"))?;
            sent.fetch_add(len, Ordering::Relaxed);
        }
        // Nothing is buffered beyond what was sent: give back any window
        // assigned on top.
        send.reserve_capacity(0);
    }
}

/// Stream to local side, until the peer's END_STREAM (the FIN is
/// [`both_ways`]'s); window given back once written.
async fn tunnel_down<W: AsyncWrite + Unpin>(
    recv: &mut h2::RecvStream,
    wr: &mut W,
    received: &AtomicU64,
) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    while let Some(data) = recv.data().await {
        let data = data.map_err(|e| format!("the tunnel stream failed: {e}"))?;
        let n = data.len();
        wr.write_all(&data)
            .await
            .map_err(|e| format!("writing the local side: {e}"))?;
        received.fetch_add(n as u64, Ordering::Relaxed);
        let _ = recv.flow_control().release_capacity(n);
    }
    Ok(())
}

/// Streams a request body onto its HTTP/2 stream as the peer's flow-control
/// window allows. Every failure resets the stream: a body that fails, or a
/// frame HTTP/2 refuses to carry (`send_*` returns an error and sends
/// nothing), would otherwise leave the stream open for ever, the peer
/// waiting for the rest of the request and the app for its response, and
/// the stream counting against the connection's concurrency. The reset
/// fails the response future, so the app is answered (502) at once.
pub async fn pipe<B: SendBody>(mut body: B, mut stream: h2::SendStream<Bytes>) {
    // No bound on the peer's reading: its app may take its time with an
    // upload (backpressure), and the caller's own sidecar is at this end.
    if let Err(why) = send_body(&mut body, &mut stream, None).await {
        tracing::debug!(reason = why, "request body not sent; resetting the stream");
        stream.send_reset(h2::Reason::INTERNAL_ERROR);
    }
}

/// Sends `body` on `stream` as the peer's flow-control window allows, up to
/// its END_STREAM (data, then trailers if any); returns early, `Ok`, when
/// the peer resets or closes the stream. `Err` says why the stream must be
/// reset: the body failed, or HTTP/2 refused a frame of it.
pub async fn send_body<B: SendBody>(
    body: &mut B,
    stream: &mut h2::SendStream<Bytes>,
    stall: Option<Duration>,
) -> Result<(), &'static str> {
    // A frame polled while merging small ones, to handle next.
    let mut next: Option<Option<Result<Frame<Bytes>, B::Error>>> = None;
    let mut slow = SlowReader::default();
    loop {
        let frame = match next.take() {
            Some(f) => Some(f),
            None => {
                poll_fn(|cx| {
                    // The peer may reset the stream (it answered already,
                    // or gave up): stop reading the body then.
                    if stream.poll_reset(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    Pin::new(&mut *body).poll_frame(cx).map(Some)
                })
                .await
            }
        };
        let frame = match frame {
            None => return Ok(()),
            Some(None) => {
                return stream
                    .send_data(Bytes::new(), true)
                    .map_err(|_| "end of stream refused");
            }
            Some(Some(Err(_))) => return Err("the request body failed"),
            Some(Some(Ok(f))) => f,
        };
        let mut data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                return match frame.into_trailers() {
                    Ok(trailers) => stream
                        .send_trailers(trailers)
                        .map_err(|_| "trailers refused by HTTP/2"),
                    Err(_) => stream
                        .send_data(Bytes::new(), true)
                        .map_err(|_| "end of stream refused"),
                };
            }
        };
        if data.len() < MERGE && !body.is_end_stream() {
            // Small frames the body has ready go out as one DATA frame: a
            // peer counts each frame's overhead, and h2 closes the whole
            // connection (`too_many_data_frames`) when more small frames
            // arrive than its reader has taken, which a stream of tiny
            // gRPC messages to a slow reader would cause.
            let mut merged: Option<bytes::BytesMut> = None;
            loop {
                let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await;
                match polled {
                    Poll::Ready(Some(Ok(f))) if f.is_data() => {
                        let more = f.into_data().unwrap_or_default();
                        let m = merged.get_or_insert_with(|| {
                            let mut m = bytes::BytesMut::with_capacity(MERGE);
                            m.extend_from_slice(&data);
                            m
                        });
                        m.extend_from_slice(&more);
                        if m.len() >= MERGE || body.is_end_stream() {
                            break;
                        }
                    }
                    Poll::Ready(other) => {
                        next = Some(other);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if let Some(m) = merged {
                data = m.freeze();
            }
        }
        // The end, found while merging, goes with the data.
        let ended = matches!(next, Some(None));
        if ended {
            next = None;
        }
        let last = ended || (next.is_none() && body.is_end_stream());
        if data.is_empty() {
            if last {
                return stream
                    .send_data(data, true)
                    .map_err(|_| "end of stream refused");
            }
            continue;
        }
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            // The clock is read only once the peer's window is shut.
            let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
            let mut began = None;
            let granted = poll_fn(|cx| {
                if let Poll::Ready(g) = stream.poll_capacity(cx) {
                    return Poll::Ready(Ok(g));
                }
                let Some(limit) = stall else {
                    return Poll::Pending;
                };
                began.get_or_insert_with(tokio::time::Instant::now);
                let left = limit.saturating_sub(slow.waited);
                let s = stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(left)));
                s.as_mut().poll(cx).map(|()| Err(()))
            })
            .await;
            if let Some(began) = began {
                slow.waited += began.elapsed();
            }
            let granted = match granted {
                Ok(Some(Ok(n))) => n,
                // Closed or reset by the peer: nothing more to send.
                Ok(None) => return Ok(()),
                Ok(Some(Err(_))) => return Err("flow control failed"),
                Err(()) => {
                    return Err("the caller took too little of the response for body_timeout")
                }
            };
            slow.took(granted);
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            stream
                .send_data(chunk, last && data.is_empty())
                .map_err(|_| "data refused")?;
        }
        if last {
            return Ok(());
        }
    }
}

/// A response body received on a mesh stream: data as it arrives (its
/// flow-control window given back as it is passed on), then trailers.
#[derive(Debug)]
pub struct MeshBody {
    recv: h2::RecvStream,
    data_done: bool,
    /// The bytes left by `content-length`, when it was sent.
    remaining: Option<u64>,
}

impl MeshBody {
    /// The body arriving on `recv`, whose head is `headers` (a
    /// `content-length` there gives the body's size hint).
    pub fn new(recv: h2::RecvStream, headers: &http::HeaderMap) -> MeshBody {
        let remaining = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        MeshBody {
            recv,
            data_done: false,
            remaining,
        }
    }

    /// The stream itself, for a tunnel that reads it as bytes.
    pub fn into_recv(self) -> h2::RecvStream {
        self.recv
    }
}

impl Body for MeshBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut this.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
