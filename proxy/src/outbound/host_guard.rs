//! The app's side of an HTTP/1 connection passed through in plain TCP.
//!
//! A redirected HTTP/1 connection to a destination no `cidr` or `port`
//! rule names is passed through when no rule takes its first request's
//! Host. Its later requests must be routed by their own Host as well: one
//! naming a meshed host (or a destination a reload put in the mesh) must
//! never leave in plain text, whatever came before it on the connection.
//! This reader follows the request stream's message boundaries (heads,
//! `Content-Length` and chunked bodies, trailer sections) and holds each
//! head back until it is whole and judged: a head that may not pass, or
//! that cannot be read, fails the read instead, and the connection is
//! reset. A partial head at the app's end of stream is never sent.
//!
//! After a `CONNECT` or a request offering an `Upgrade`, the connection may
//! stop being HTTP (a WebSocket, say): its bytes then pass unread, to the
//! same destination the passed-through first request went to.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::h1::{request_body_framing, ChunkedDecoder, Decoded, Framing};
use crate::outbound::detect::{head_facts, HeadParse};

/// Where in the request stream the next byte is.
enum At {
    /// A request head (leading empty lines included).
    Head,
    /// This many body bytes to pass.
    Body(u64),
    /// A chunked body, its framing and trailers included.
    Chunked(ChunkedDecoder),
    /// No longer HTTP: everything passes.
    Opaque,
}

/// Why a passed-through connection was stopped.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// A request whose host a rule takes: it belongs on the mesh.
    #[error("a later request on a connection passed through in plain text names a meshed host ({0}); the connection is reset rather than the request sent in plain text")]
    Meshed(String),
    /// A head or chunked body the guard cannot follow.
    #[error("a request on a passed-through connection cannot be read (malformed, too large or too many fields); the connection is reset rather than it sent in plain text")]
    Unreadable,
}

impl Stopped {
    /// Whether `e` is one of the guard's stops (and which).
    pub fn of(e: &io::Error) -> Option<&Stopped> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Stopped>())
    }
}

/// An app connection whose request heads are judged by `may_pass` (given
/// each head's host) before any byte of them is read through.
pub struct HostGuard<I, F> {
    inner: I,
    may_pass: F,
    at: At,
    /// Read from the app, not yet judged.
    pending: BytesMut,
    /// Judged, not yet handed out.
    ready: BytesMut,
    /// Heads (and trailer sections) larger than this are unreadable.
    max_head: usize,
    /// Why the bytes after `ready` may not pass: the read fails once
    /// `ready` is handed out.
    stopped: Option<Stopped>,
}

impl<I, F> HostGuard<I, F>
where
    F: FnMut(Option<&str>) -> bool,
{
    /// Guards `inner`, whose heads may be up to `max_head` bytes.
    pub fn new(inner: I, max_head: usize, may_pass: F) -> HostGuard<I, F> {
        HostGuard {
            inner,
            may_pass,
            at: At::Head,
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            max_head,
            stopped: None,
        }
    }

    /// Moves what can be judged from `pending` to `ready`.
    fn judge(&mut self) -> Result<(), Stopped> {
        loop {
            if self.pending.is_empty() {
                return Ok(());
            }
            match &mut self.at {
                At::Head => match head_facts(&self.pending) {
                    HeadParse::Partial if self.pending.len() > self.max_head => {
                        return Err(Stopped::Unreadable)
                    }
                    HeadParse::Partial => return Ok(()),
                    HeadParse::Bad => return Err(Stopped::Unreadable),
                    HeadParse::Whole(facts) => {
                        if facts.len > self.max_head {
                            return Err(Stopped::Unreadable);
                        }
                        if !(self.may_pass)(facts.host.as_deref()) {
                            return Err(Stopped::Meshed(
                                facts.host.unwrap_or_else(|| "no host".to_owned()),
                            ));
                        }
                        let framing = request_body_framing(&self.pending[..facts.len])
                            .ok_or(Stopped::Unreadable)?;
                        self.release(facts.len);
                        self.at = if facts.switches {
                            At::Opaque
                        } else {
                            match framing {
                                Framing::Length(n) => At::Body(n),
                                Framing::Chunked => At::Chunked(ChunkedDecoder::new(self.max_head)),
                                Framing::Empty | Framing::UntilClose => At::Head,
                            }
                        };
                    }
                },
                At::Body(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(self.pending.len());
                    *left -= n as u64;
                    if *left == 0 {
                        self.at = At::Head;
                    }
                    self.release(n);
                }
                At::Chunked(decoder) => {
                    // The decoder consumes what it reads; the raw bytes it
                    // consumed are what passes.
                    let mut scratch = self.pending.clone();
                    let before = scratch.len();
                    let mut done = false;
                    loop {
                        match decoder.decode(&mut scratch) {
                            Ok(Decoded::NeedMore) => break,
                            Ok(Decoded::Data(_)) => {}
                            Ok(Decoded::Trailers(_) | Decoded::Done) => {
                                done = true;
                                break;
                            }
                            Err(_) => return Err(Stopped::Unreadable),
                        }
                    }
                    let used = before - scratch.len();
                    if done {
                        self.at = At::Head;
                    }
                    self.release(used);
                    if !done {
                        return Ok(());
                    }
                }
                At::Opaque => {
                    let n = self.pending.len();
                    self.release(n);
                }
            }
        }
    }

    /// Hands out the first `n` pending bytes.
    fn release(&mut self, n: usize) {
        if self.ready.is_empty() {
            self.ready = self.pending.split_to(n);
        } else {
            self.ready.extend_from_slice(&self.pending[..n]);
            self.pending.advance(n);
        }
    }
}

impl<I, F> AsyncRead for HostGuard<I, F>
where
    I: AsyncRead + Unpin,
    F: FnMut(Option<&str>) -> bool + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(stop) = this.stopped.take() {
                this.pending.clear();
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::PermissionDenied, stop)));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The app's end of stream: a partial head stays here.
                return Poll::Ready(Ok(()));
            }
            this.pending.extend_from_slice(read.filled());
            if let Err(stop) = this.judge() {
                this.stopped = Some(stop);
            }
        }
    }
}

impl<I: AsyncWrite + Unpin, F: Unpin> AsyncWrite for HostGuard<I, F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    /// An app that sends `writes`, one per read, then ends its stream.
    struct Writes(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Writes {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if let Some(mut w) = this.0.pop_front() {
                let n = w.len().min(buf.remaining());
                buf.put_slice(&w[..n]);
                if n < w.len() {
                    this.0.push_front(w.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// What the guard hands out of `writes` (each read apart), with a rule
    /// taking `meshed.example`, and how the read ended.
    async fn through(writes: &[&[u8]]) -> (Vec<u8>, Option<String>) {
        let app = Writes(writes.iter().map(|w| w.to_vec()).collect());
        let mut g = HostGuard::new(app, 1024, |h: Option<&str>| {
            !h.is_some_and(|h| h.eq_ignore_ascii_case("meshed.example"))
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match g.read(&mut buf).await {
                Ok(0) => return (out, None),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return (out, Some(Stopped::of(&e).expect("a stop").to_string())),
            }
        }
    }

    const FIRST: &[u8] = b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n";
    const MESHED: &[u8] =
        b"GET /x HTTP/1.1\r\nHost: meshed.example\r\nAuthorization: Bearer s3cret\r\n\r\n";

    #[tokio::test]
    async fn a_later_request_for_a_meshed_host_is_stopped_before_any_byte_of_it() {
        // Apart, pipelined in one write, and split inside the head.
        let together = [FIRST, MESHED].concat();
        for writes in [
            vec![FIRST, MESHED],
            vec![&together[..]],
            vec![FIRST, &MESHED[..20], &MESHED[20..]],
        ] {
            let (out, stop) = through(&writes).await;
            assert_eq!(out, FIRST);
            assert!(stop.unwrap().contains("meshed.example"));
        }
        // By absolute-form target too, and whatever the case of the host.
        let (out, stop) = through(&[
            FIRST,
            b"GET http://MESHED.example/ HTTP/1.1\r\nHost: x\r\n\r\n",
        ])
        .await;
        assert_eq!(out, FIRST);
        assert!(stop.unwrap().contains("MESHED.example"));
    }

    #[tokio::test]
    async fn bodies_pass_whole_and_are_never_read_as_heads() {
        // A Content-Length body and a chunked one (extensions, trailers)
        // that hold what looks like a meshed head, then a plain request.
        let cl = b"POST /a HTTP/1.1\r\nHost: example.org\r\nContent-Length: 74\r\n\r\nGET /x HTTP/1.1\r\nHost: meshed.example\r\nAuthorization: Bearer s3cret\r\n\r\n";
        let chunked =
            b"POST /b HTTP/1.1\r\nHost: example.org\r\nTransfer-Encoding: chunked\r\n\r\n\
            26;ext=1\r\nGET / HTTP/1.1\r\nHost: meshed.example\r\n\r\n0\r\nX-T: 1\r\n\r\n";
        let stream = [&cl[..], &chunked[..], FIRST].concat();
        let (out, stop) = through(&[&stream]).await;
        assert_eq!(stop, None);
        assert_eq!(out, stream);
        // Byte by byte, the same.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let (out, stop) = through(&bytes).await;
        assert_eq!(stop, None);
        assert_eq!(out, stream);
        // And a meshed request after them is still stopped.
        let (out, stop) = through(&[&stream, MESHED]).await;
        assert_eq!(out, stream);
        assert!(stop.is_some());
    }

    #[tokio::test]
    async fn unreadable_heads_and_partial_ones_never_pass() {
        // Malformed, larger than the limit, framing the server would not
        // agree on: nothing of the head passes.
        let bad: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nBad Field\r\n\r\n",
            &[
                b"GET / HTTP/1.1\r\nX: ".as_slice(),
                &[b'a'; 2000],
                b"\r\n\r\n",
            ]
            .concat(),
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ];
        for b in bad {
            let (out, stop) = through(&[FIRST, b]).await;
            assert_eq!(out, FIRST);
            assert!(stop.unwrap().contains("cannot be read"));
        }
        // A chunked body gone wrong: its head has passed, nothing after it.
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, stop) = through(&[head, b"zz\r\n", MESHED]).await;
        assert_eq!(out, head);
        assert!(stop.unwrap().contains("cannot be read"));
        // A head cut short by the app's end of stream stays here.
        let (out, stop) = through(&[FIRST, &MESHED[..30]]).await;
        assert_eq!((out.as_slice(), stop), (FIRST, None));
        let (out, stop) = through(&[FIRST, b"GET / HTTP/1.1\r\nHost: example.org\r\n"]).await;
        assert_eq!((out.as_slice(), stop), (FIRST, None));
    }

    #[tokio::test]
    async fn after_an_upgrade_the_bytes_pass_unread() {
        let up = b"GET /ws HTTP/1.1\r\nHost: example.org\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        let frames = b"\x81\x05hello GET / HTTP/1.1\r\nHost: meshed.example\r\n\r\n";
        let (out, stop) = through(&[up, frames]).await;
        assert_eq!(stop, None);
        assert_eq!(out, [&up[..], &frames[..]].concat());
    }
}
