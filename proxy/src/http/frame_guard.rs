//! A budget for the HTTP/2 frames that make a connection work without
//! making it useful.
//!
//! The `h2` crate bounds most floods itself (PING and SETTINGS acks it owes,
//! resets, CONTINUATION, small DATA frames), but not WINDOW_UPDATE, PRIORITY
//! or frames of unknown types: it processes them, each a few hundred
//! nanoseconds of the worker thread under TLS, for as long as the peer cares
//! to send them, while the connection looks idle to everything else. One
//! peer sending millions a second takes the thread from every other caller.
//!
//! [`FrameGuard`] sits between the h2 connection and its transport (after
//! TLS) and follows the frame boundaries of both directions: a few
//! instructions per frame (a payload is skipped, never looked at) and no
//! allocation. A legitimate peer sends WINDOW_UPDATEs in proportion to the
//! DATA it receives from us and PRIORITY frames in proportion to the streams
//! it opens, so the allowance for such frames grows with what the
//! connection does ([`Budget`]), as Envoy's
//! `max_inbound_window_update_frames_per_data_frame_sent` and
//! `max_inbound_priority_frames_per_stream` do. Beyond it the connection is
//! closed: the server's owner sees [`FrameGuard::trip`] and sends GOAWAY
//! `ENHANCE_YOUR_CALM`; a client's read fails with [`ControlFlood`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 section 3.4), which precedes the
/// first frame from a client.
const PREFACE_LEN: u32 = 24;
const HEAD_LEN: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const WINDOW_UPDATE: u8 = 0x8;
/// Types above CONTINUATION are extensions the h2 crate ignores unbounded.
const CONTINUATION: u8 = 0x9;
/// The flag that ends a header block (RFC 9113 section 6.2).
const END_HEADERS: u8 = 0x4;

/// How much work-free traffic a connection may receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Allowed from the start: a client's opening WINDOW_UPDATE and
    /// PRIORITY tree, and then some.
    pub base: u64,
    /// More allowed per DATA or HEADERS frame sent to the peer: at most two
    /// WINDOW_UPDATEs (the stream's and the connection's) answer one DATA
    /// frame, however small.
    pub per_frame_sent: u64,
    /// More allowed per HEADERS frame received (a stream opened, or its
    /// trailers): room to reprioritize it.
    pub per_headers_received: u64,
}

impl Budget {
    /// Envoy's ratios (10 WINDOW_UPDATEs per DATA frame sent, 100 PRIORITY
    /// frames per stream) with a far larger base.
    pub const DEFAULT: Budget = Budget {
        base: 1024,
        per_frame_sent: 10,
        per_headers_received: 100,
    };
}

/// Which end of the connection the guard is on: a server reads the client
/// preface before the first frame, a client writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The proxy serves the connection (inbound callers, the outbound's
    /// local app).
    Server,
    /// The proxy is the client (the outbound's mesh connections).
    Client,
}

impl Side {
    /// The `side` label of `keyproof_http2_flood_closed_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// Connections closed for a control-frame flood since the process started,
/// by [`Side`]: process-wide, as the guard runs below every registry (the
/// metrics bring theirs up to it when rendered).
static CLOSED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Connections closed so far on `side` (see [`CLOSED`]).
pub fn closed(side: Side) -> u64 {
    CLOSED[side as usize].load(Ordering::Relaxed)
}

/// What a client-side guard's read fails with once the peer is over budget.
#[derive(Debug, thiserror::Error)]
#[error("HTTP/2 peer sent {idle} WINDOW_UPDATE, PRIORITY or unknown frames, more than the {allowed} its traffic allows")]
pub struct ControlFlood {
    /// Work-free frames received.
    pub idle: u64,
    /// What the budget allowed when they went over it.
    pub allowed: u64,
}

/// Follows frame boundaries through a byte stream that arrives in pieces of
/// any size.
#[derive(Debug)]
struct Scanner {
    /// Bytes still to pass before the next frame header: the preface, or
    /// the rest of a payload.
    skip: u32,
    /// A frame header split across reads or writes, `have` bytes of it.
    head: [u8; HEAD_LEN],
    have: u8,
}

impl Scanner {
    fn new(skip: u32) -> Scanner {
        Scanner {
            skip,
            head: [0; HEAD_LEN],
            have: 0,
        }
    }

    /// Calls `frame(type, flags, payload length)` for each frame header
    /// completed in `buf`.
    #[inline]
    fn scan(&mut self, mut buf: &[u8], mut frame: impl FnMut(u8, u8, u32)) {
        loop {
            if self.skip > 0 {
                let n = buf.len().min(self.skip as usize);
                buf = &buf[n..];
                // `n` is at most `skip`, a u32.
                self.skip -= n as u32;
                if self.skip > 0 {
                    return;
                }
            }
            if self.have == 0 && buf.len() >= HEAD_LEN {
                let (kind, flags, len) = parse(&buf[..HEAD_LEN]);
                buf = &buf[HEAD_LEN..];
                self.skip = len;
                frame(kind, flags, len);
                continue;
            }
            if buf.is_empty() {
                return;
            }
            let at = usize::from(self.have);
            let n = buf.len().min(HEAD_LEN - at);
            self.head[at..at + n].copy_from_slice(&buf[..n]);
            buf = &buf[n..];
            // `at + n` is at most HEAD_LEN.
            self.have = (at + n) as u8;
            if usize::from(self.have) < HEAD_LEN {
                return;
            }
            self.have = 0;
            let (kind, flags, len) = parse(&self.head);
            self.skip = len;
            frame(kind, flags, len);
        }
    }
}

/// A frame header's type, flags and payload length.
#[inline]
fn parse(h: &[u8]) -> (u8, u8, u32) {
    let len = u32::from(h[0]) << 16 | u32::from(h[1]) << 8 | u32::from(h[2]);
    (h[3], h[4], len)
}

/// The counts the budget is checked against.
#[derive(Debug)]
struct Tally {
    budget: Budget,
    /// WINDOW_UPDATE, PRIORITY and unknown frames received.
    idle: u64,
    /// What they may number now.
    allowed: u64,
}

/// A transport that can name its peer, for the line logged when it floods
/// (asked then only: a system call).
pub trait PeerAddr {
    /// The peer's address, if the transport has one.
    fn peer_addr(&self) -> Option<SocketAddr>;
}

impl PeerAddr for tokio::net::TcpStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        tokio::net::TcpStream::peer_addr(self).ok()
    }
}

impl<T: PeerAddr> PeerAddr for tokio_rustls::server::TlsStream<T> {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.get_ref().0.peer_addr()
    }
}

impl<T: PeerAddr> PeerAddr for tokio_rustls::client::TlsStream<T> {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.get_ref().0.peer_addr()
    }
}

impl<T: PeerAddr> PeerAddr for crate::http::read_ahead::ReadAhead<T> {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.get_ref().peer_addr()
    }
}

impl<T: PeerAddr> PeerAddr for crate::http::io::Rewind<T> {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.get_ref().peer_addr()
    }
}

impl PeerAddr for tokio::io::DuplexStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        None
    }
}

/// An HTTP/2 connection's transport, with the peer's work-free frames
/// counted against a [`Budget`] (see the module documentation).
pub struct FrameGuard<I> {
    inner: I,
    side: Side,
    read: Scanner,
    write: Scanner,
    tally: Tally,
    /// Set once the peer went over budget; shared with the connection's
    /// owner (see [`FrameGuard::trip`]).
    trip: Arc<Trip>,
    /// Names the peer in the log line (see [`PeerAddr`]).
    peer: fn(&I) -> Option<SocketAddr>,
    /// Payload bytes of a header block the peer has begun (HEADERS
    /// without END_HEADERS, then CONTINUATION) and not ended: h2 holds
    /// them until it ends, before any stream is accepted.
    block: u64,
    /// Charges an unfinished block of this many bytes (0: the block
    /// ended) to the memory budget; false when refused. A closure, as the
    /// budget's module reads this one's counts for the metrics.
    unfinished: Option<BlockCharge>,
}

/// See [`FrameGuard::charged_to`].
pub type BlockCharge = Box<dyn FnMut(u64) -> bool + Send>;

/// Whether a guard's peer went over budget, shared with the connection's
/// owner.
#[derive(Debug, Default)]
pub struct Trip {
    set: AtomicBool,
    idle: AtomicU64,
    allowed: AtomicU64,
}

impl Trip {
    /// Whether the peer went over budget.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Relaxed)
    }

    /// What to report once it has.
    pub fn error(&self) -> ControlFlood {
        ControlFlood {
            idle: self.idle.load(Ordering::Relaxed),
            allowed: self.allowed.load(Ordering::Relaxed),
        }
    }
}

impl<I> FrameGuard<I> {
    /// Guards `inner`, the transport of an HTTP/2 connection on `side`,
    /// from its first byte; its peer is named when it floods.
    pub fn with_peer(inner: I, side: Side, budget: Budget) -> FrameGuard<I>
    where
        I: PeerAddr,
    {
        FrameGuard {
            peer: <I as PeerAddr>::peer_addr,
            ..FrameGuard::new(inner, side, budget)
        }
    }

    /// Guards `inner`, the transport of an HTTP/2 connection on `side`,
    /// from its first byte.
    pub fn new(inner: I, side: Side, budget: Budget) -> FrameGuard<I> {
        let (read, write) = match side {
            Side::Server => (PREFACE_LEN, 0),
            Side::Client => (0, PREFACE_LEN),
        };
        FrameGuard {
            inner,
            side,
            read: Scanner::new(read),
            write: Scanner::new(write),
            tally: Tally {
                budget,
                idle: 0,
                allowed: budget.base,
            },
            trip: Arc::default(),
            peer: |_| None,
            block: 0,
            unfinished: None,
        }
    }

    /// Charges a header block the peer leaves unfinished with `charge`
    /// (the memory budget's, `http/h2_server.rs`) as it grows, and 0 once
    /// it ends (round 7: 2,000 connections each holding one took a sidecar
    /// past 128 MiB before the memory watch could look); refused, the read
    /// fails and the connection closes.
    pub fn charged_to(mut self, charge: BlockCharge) -> FrameGuard<I> {
        self.unfinished = Some(charge);
        self
    }

    /// Set once the peer went over budget. A server-side guard then reads
    /// nothing more (its reads stay pending, never waking the task): the
    /// owner is to check this whenever the connection is pending and close
    /// it with GOAWAY, which needs no reading.
    pub fn trip(&self) -> Arc<Trip> {
        self.trip.clone()
    }

    /// Counts the frames in `buf`, just read; true when that put the peer
    /// over budget (counted and logged here, once).
    fn received(&mut self, buf: &[u8]) -> bool {
        let tally = &mut self.tally;
        let block = &mut self.block;
        self.read.scan(buf, |kind, flags, len| match kind {
            WINDOW_UPDATE | PRIORITY => tally.idle += 1,
            HEADERS => {
                tally.allowed = tally
                    .allowed
                    .saturating_add(tally.budget.per_headers_received);
                *block = if flags & END_HEADERS == 0 {
                    u64::from(len)
                } else {
                    0
                };
            }
            CONTINUATION => {
                *block = if flags & END_HEADERS == 0 {
                    block.saturating_add(u64::from(len))
                } else {
                    0
                };
            }
            k if k > CONTINUATION => tally.idle += 1,
            _ => {}
        });
        if tally.idle <= tally.allowed {
            return false;
        }
        self.trip.idle.store(tally.idle, Ordering::Relaxed);
        self.trip.allowed.store(tally.allowed, Ordering::Relaxed);
        self.trip.set.store(true, Ordering::Relaxed);
        CLOSED[self.side as usize].fetch_add(1, Ordering::Relaxed);
        let peer = (self.peer)(&self.inner).map_or_else(|| "-".to_owned(), |p| p.to_string());
        tracing::warn!(
            side = self.side.as_str(),
            peer = %peer,
            frames = tally.idle,
            allowed = tally.allowed,
            "HTTP/2 connection closed: its peer sent WINDOW_UPDATE, PRIORITY or unknown frames beyond the budget its traffic allows (a control-frame flood)"
        );
        true
    }

    /// Counts the frames in `buf`, just written.
    fn sent(&mut self, buf: &[u8]) {
        let tally = &mut self.tally;
        self.write.scan(buf, |kind, _, _| {
            if kind == DATA || kind == HEADERS {
                tally.allowed = tally.allowed.saturating_add(tally.budget.per_frame_sent);
            }
        });
    }

    fn flood(&self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self.trip.error())
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FrameGuard<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.trip.is_set() {
            return match self.side {
                Side::Server => Poll::Pending,
                Side::Client => Poll::Ready(Err(self.flood())),
            };
        }
        let before = buf.filled().len();
        let me = &mut *self;
        std::task::ready!(Pin::new(&mut me.inner).poll_read(cx, buf))?;
        // What was read goes up even over budget: it is read already, and
        // the next read is the one refused.
        me.received(&buf.filled()[before..]);
        if let Some(charge) = &mut me.unfinished {
            if !charge(me.block) {
                charge(0);
                buf.set_filled(before);
                return Poll::Ready(Err(io::Error::other(
                    "unfinished HTTP/2 header block refused: its caller's share of the memory budget is spent",
                )));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FrameGuard<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let n = std::task::ready!(Pin::new(&mut me.inner).poll_write(cx, buf))?;
        me.sent(&buf[..n.min(buf.len())]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        let n = std::task::ready!(Pin::new(&mut me.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let k = left.min(b.len());
            me.sent(&b[..k]);
            left -= k;
        }
        Poll::Ready(Ok(n))
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, 0, 0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    fn window_update() -> Vec<u8> {
        frame(WINDOW_UPDATE, &1u32.to_be_bytes())
    }

    const SMALL: Budget = Budget {
        base: 10,
        per_frame_sent: 2,
        per_headers_received: 3,
    };

    /// Every frame of `bytes`, however the stream is cut into pieces.
    fn frames_in(bytes: &[u8], skip: u32, piece: usize) -> Vec<(u8, u32)> {
        let mut s = Scanner::new(skip);
        let mut got = Vec::new();
        for chunk in bytes.chunks(piece) {
            s.scan(chunk, |k, _, l| got.push((k, l)));
        }
        got
    }

    #[test]
    fn frame_headers_are_found_whatever_the_pieces_and_the_preface_is_skipped() {
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(0x4, &[]));
        stream.extend(frame(HEADERS, &[7; 30]));
        stream.extend(frame(DATA, &vec![0; 20_000]));
        stream.extend(window_update());
        stream.extend(frame(0x20, &[1, 2, 3]));
        let want = vec![
            (0x4, 0),
            (HEADERS, 30),
            (DATA, 20_000),
            (WINDOW_UPDATE, 4),
            (0x20, 3),
        ];
        for piece in [1, 2, 5, 8, 9, 10, 13, 24, 4096, stream.len()] {
            assert_eq!(
                frames_in(&stream, PREFACE_LEN, piece),
                want,
                "piece {piece}"
            );
        }
    }

    #[tokio::test]
    async fn an_unfinished_header_block_is_charged_until_it_ends_and_refused_past_it() {
        let with_flags = |kind: u8, flags: u8, payload: &[u8]| {
            let mut f = frame(kind, payload);
            f[4] = flags;
            f
        };
        let charged = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut peer, near) = tokio::io::duplex(1 << 20);
        let seen = charged.clone();
        // Refuses anything over 40,000 bytes.
        let mut g = FrameGuard::new(near, Side::Server, Budget::DEFAULT).charged_to(Box::new(
            move |bytes| {
                seen.lock().unwrap().push(bytes);
                bytes <= 40_000
            },
        ));
        let mut wire = PREFACE.to_vec();
        wire.extend(with_flags(HEADERS, 0, &[0; 16_000]));
        wire.extend(with_flags(CONTINUATION, 0, &[0; 16_000]));
        peer.write_all(&wire).await.unwrap();
        let mut buf = vec![0; wire.len()];
        g.read_exact(&mut buf).await.unwrap();
        // Charged as it grew...
        assert_eq!(charged.lock().unwrap().last(), Some(&32_000));
        // ...and given back when it ended.
        let end = with_flags(CONTINUATION, END_HEADERS, &[0; 100]);
        peer.write_all(&end).await.unwrap();
        g.read_exact(&mut buf[..end.len()]).await.unwrap();
        assert_eq!(charged.lock().unwrap().last(), Some(&0));
        // A block growing past what the budget allows fails the read.
        let mut big = with_flags(HEADERS, 0, &[0; 16_000]);
        for _ in 0..2 {
            big.extend(with_flags(CONTINUATION, 0, &[0; 16_000]));
        }
        peer.write_all(&big).await.unwrap();
        let mut sink = vec![0; big.len()];
        let r = g.read_exact(&mut sink).await;
        assert!(r.is_err(), "{r:?}");
    }

    #[tokio::test]
    async fn a_flood_of_window_updates_trips_the_server_side_budget_once() {
        let (mut peer, near) = tokio::io::duplex(1 << 16);
        let mut g = FrameGuard::new(near, Side::Server, SMALL);
        let tripped = g.trip();
        let before = closed(Side::Server);
        let mut flood = PREFACE.to_vec();
        for _ in 0..10 {
            flood.extend(window_update());
        }
        peer.write_all(&flood).await.unwrap();
        let mut buf = vec![0; flood.len()];
        g.read_exact(&mut buf).await.unwrap();
        assert!(!tripped.is_set(), "the base allows 10");
        // The 11th, its header split across two reads.
        let w = window_update();
        peer.write_all(&w[..4]).await.unwrap();
        g.read_exact(&mut buf[..4]).await.unwrap();
        assert!(!tripped.is_set());
        peer.write_all(&w[4..]).await.unwrap();
        g.read_exact(&mut buf[..w.len() - 4]).await.unwrap();
        assert!(tripped.is_set());
        assert!(closed(Side::Server) > before);
        // Nothing more is read: the owner closes the connection.
        peer.write_all(&window_update()).await.unwrap();
        let more = tokio::time::timeout(std::time::Duration::from_millis(50), g.read(&mut buf));
        assert!(
            more.await.is_err(),
            "a tripped server-side read stays pending"
        );
    }

    #[tokio::test]
    async fn the_allowance_grows_with_frames_sent_and_streams_opened() {
        let (mut peer, near) = tokio::io::duplex(1 << 20);
        let mut g = FrameGuard::new(near, Side::Server, SMALL);
        let tripped = g.trip();
        let mut buf = vec![0; 1 << 16];
        // Two DATA frames and a HEADERS sent, the second DATA frame written
        // in two pieces: 10 + 3 * 2 allowed.
        let mut out = frame(HEADERS, &[1; 10]);
        out.extend(frame(DATA, &[2; 1000]));
        out.extend(frame(DATA, &[3; 1000]));
        g.write_all(&out[..1025]).await.unwrap();
        g.write_all(&out[1025..]).await.unwrap();
        peer.read_exact(&mut buf[..out.len()]).await.unwrap();
        // One HEADERS received: 3 more.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, &[0; 5]));
        for _ in 0..19 {
            input.extend(frame(PRIORITY, &[0; 5]));
        }
        peer.write_all(&input).await.unwrap();
        g.read_exact(&mut buf[..input.len()]).await.unwrap();
        assert!(!tripped.is_set(), "19 of 19 allowed");
        peer.write_all(&frame(0x10, &[])).await.unwrap();
        g.read_exact(&mut buf[..HEAD_LEN]).await.unwrap();
        assert!(tripped.is_set(), "an unknown frame counts too");
    }

    #[tokio::test]
    async fn a_client_side_guard_fails_its_reads_once_over_budget() {
        let (mut peer, near) = tokio::io::duplex(1 << 16);
        let mut g = FrameGuard::new(near, Side::Client, SMALL);
        // The client writes the preface: not a frame.
        let mut out = PREFACE.to_vec();
        out.extend(frame(DATA, &[0; 3]));
        g.write_all(&out).await.unwrap();
        assert_eq!(g.tally.allowed, 12);
        let mut flood = Vec::new();
        for _ in 0..13 {
            flood.extend(window_update());
        }
        peer.write_all(&flood).await.unwrap();
        let mut buf = vec![0; flood.len()];
        g.read_exact(&mut buf).await.unwrap();
        let e = g.read(&mut buf).await.expect_err("over budget");
        assert!(e.get_ref().is_some_and(|e| e.is::<ControlFlood>()), "{e}");
    }

    #[tokio::test]
    async fn a_download_with_a_window_update_pair_per_data_frame_never_trips() {
        let (mut peer, near) = tokio::io::duplex(1 << 20);
        let mut g = FrameGuard::new(near, Side::Server, Budget::DEFAULT);
        let tripped = g.trip();
        let mut preface = PREFACE.to_vec();
        preface.extend(frame(HEADERS, &[0; 20]));
        peer.write_all(&preface).await.unwrap();
        let mut buf = vec![0; 1 << 16];
        g.read_exact(&mut buf[..preface.len()]).await.unwrap();
        // Tiny DATA frames, each answered by two WINDOW_UPDATEs (the
        // stream's and the connection's), the worst a real client does,
        // long past the base.
        let data = frame(DATA, &[9; 1]);
        let mut answer = window_update();
        answer.extend(window_update());
        for _ in 0..5000 {
            g.write_all(&data).await.unwrap();
            peer.read_exact(&mut buf[..data.len()]).await.unwrap();
            peer.write_all(&answer).await.unwrap();
            g.read_exact(&mut buf[..answer.len()]).await.unwrap();
        }
        assert!(!tripped.is_set());
    }
}
