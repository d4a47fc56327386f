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
//! After a `CONNECT` or an HTTP/1.1 request to switch protocols (`Upgrade`
//! with the `Connection` option) the server may or may not switch, and the
//! guard does not read responses. The client waits for the answer, and its
//! next bytes tell: a TLS record (after `CONNECT`), a WebSocket frame or
//! the HTTP/2 preface (after `Upgrade`) mean the server switched, and the
//! bytes pass unread from there, to the destination the passed-through
//! first request went to; anything that may start an HTTP/1 request (a
//! token character, an empty line) means it declined, and the request is
//! judged as any other. No HTTP/1 server reads a request from bytes that
//! start otherwise.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::h1::{ChunkedDecoder, Decoded, Framing};
use crate::outbound::detect::{classify, head_facts, HeadParse, Protocol};

/// Where in the request stream the next byte is.
enum At {
    /// The client's first bytes on a connection it was silent on at first
    /// (a server-first protocol, or an HTTP client that writes late): HTTP
    /// (`classify`), judged from then on; anything else, opaque.
    Undecided,
    /// A request head (leading empty lines included).
    Head,
    /// This many body bytes to pass.
    Body(u64),
    /// A chunked body, its framing and trailers included.
    Chunked(ChunkedDecoder),
    /// After a request to switch protocols, which the server may have
    /// taken or declined: the client's next bytes tell (see `judge`).
    Switching,
    /// No longer HTTP: everything passes.
    Opaque,
}

/// What a client sends first after `Upgrade: h2c` was taken.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether an HTTP/1 request may start with `b` (a method's token
/// character, or the empty lines and whitespace servers skip).
fn may_start_http1(b: u8) -> bool {
    crate::http::owned::is_tchar(b) || b"\r\n \t".contains(&b)
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
/// the hosts each names) before any byte of them is read through.
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
    /// How much of a head in progress was searched for its end: a head
    /// that arrives a byte at a time is parsed once, not at every byte.
    searched: usize,
    /// The request being passed asked to switch protocols: once its body
    /// has passed, the client's next bytes tell whether the server did.
    switch_next: bool,
}

impl<I, F> HostGuard<I, F>
where
    F: FnMut(&[String]) -> bool,
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
            searched: 0,
            switch_next: false,
        }
    }

    /// Guards `inner` on a connection its client was silent on when it was
    /// decided: the first bytes, when they come, are judged as HTTP if they
    /// start an HTTP/1 request line (`detect::classify`, empty lines before
    /// it included), and pass as opaque TCP otherwise (a server-first
    /// protocol's reply, `EHLO`, a binary handshake). An app that connects
    /// and writes its request late never sends it to a meshed host in
    /// plain text. The HTTP/2 preface is stopped: its streams' hosts are
    /// not read here.
    pub fn late(inner: I, max_head: usize, may_pass: F) -> HostGuard<I, F> {
        HostGuard {
            at: At::Undecided,
            ..HostGuard::new(inner, max_head, may_pass)
        }
    }

    /// After a body: the next request, or the bytes after a switch.
    fn after_body(&mut self) -> At {
        if std::mem::take(&mut self.switch_next) {
            At::Switching
        } else {
            At::Head
        }
    }

    /// Moves what can be judged from `pending` to `ready`.
    fn judge(&mut self) -> Result<(), Stopped> {
        loop {
            if self.pending.is_empty() {
                return Ok(());
            }
            match &mut self.at {
                At::Head => match self.head() {
                    HeadParse::Partial => return Ok(()),
                    HeadParse::Bad => return Err(Stopped::Unreadable),
                    HeadParse::Whole(facts) => {
                        if !(self.may_pass)(&facts.hosts) {
                            let named = if facts.hosts.is_empty() {
                                "no host".to_owned()
                            } else {
                                facts.hosts.join(", ")
                            };
                            return Err(Stopped::Meshed(named));
                        }
                        self.release(facts.len);
                        self.searched = 0;
                        // A request to switch may carry a body: its bytes
                        // are the request's, whatever they look like, and
                        // only what follows them tells whether it switched.
                        self.switch_next = facts.switches;
                        self.at = match facts.framing {
                            Framing::Length(n) if n > 0 => At::Body(n),
                            Framing::Chunked => At::Chunked(ChunkedDecoder::new(self.max_head)),
                            _ => self.after_body(),
                        };
                    }
                },
                At::Body(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(self.pending.len());
                    *left -= n as u64;
                    if *left == 0 {
                        self.at = self.after_body();
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
                        self.at = self.after_body();
                    }
                    self.release(used);
                    if !done {
                        return Ok(());
                    }
                }
                At::Undecided => match classify(&self.pending) {
                    None if self.pending.len() > self.max_head => return Err(Stopped::Unreadable),
                    None => return Ok(()),
                    Some(Protocol::Http1) => self.at = At::Head,
                    // HTTP/2's streams, and HTTP behind a PROXY protocol
                    // header, are not read here.
                    Some(Protocol::H2 | Protocol::PartialHttp1) => return Err(Stopped::Unreadable),
                    Some(_) => self.at = At::Opaque,
                },
                At::Switching => {
                    let n = self.pending.len().min(H2_PREFACE.len());
                    if self.pending[..n] == H2_PREFACE[..n] {
                        if n < H2_PREFACE.len() {
                            return Ok(());
                        }
                        self.at = At::Opaque;
                    } else if may_start_http1(self.pending[0]) {
                        self.at = At::Head;
                    } else {
                        self.at = At::Opaque;
                    }
                }
                At::Opaque => {
                    let n = self.pending.len();
                    self.release(n);
                }
            }
        }
    }

    /// The head at the start of `pending`, parsed only once its end (an
    /// empty line) may be there.
    fn head(&mut self) -> HeadParse {
        let from = self.searched.saturating_sub(3);
        let ended = self.pending[from..]
            .windows(2)
            .any(|w| w == b"\n\n" || w == b"\n\r");
        self.searched = self.pending.len();
        if !ended {
            if self.pending.len() > self.max_head {
                return HeadParse::Bad;
            }
            return HeadParse::Partial;
        }
        head_facts(&self.pending, self.max_head)
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
    F: FnMut(&[String]) -> bool + Unpin,
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
        through_as(writes, false).await
    }

    /// As [`through`], for a guard made `late` or not.
    async fn through_as(writes: &[&[u8]], late: bool) -> (Vec<u8>, Option<String>) {
        let app = Writes(writes.iter().map(|w| w.to_vec()).collect());
        let may_pass = |hosts: &[String]| {
            !hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case("meshed.example"))
        };
        let mut g = if late {
            HostGuard::late(app, 1024, may_pass)
        } else {
            HostGuard::new(app, 1024, may_pass)
        };
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
    async fn a_late_first_write_is_judged_as_http_when_it_is_and_passes_otherwise() {
        // HTTP for a meshed host, also after empty lines, and split: stopped.
        let crlf = [&b"\r\n"[..], MESHED].concat();
        for writes in [
            vec![MESHED],
            vec![&crlf[..]],
            vec![&MESHED[..3], &MESHED[3..]],
        ] {
            let (out, stop) = through_as(&writes, true).await;
            assert!(out.is_empty(), "{out:?}");
            assert!(stop.unwrap().contains("meshed.example"));
        }
        // HTTP for another host passes, and later requests are judged.
        let (out, stop) = through_as(&[FIRST, MESHED], true).await;
        assert_eq!(out, FIRST);
        assert!(stop.is_some());
        // A server-first protocol's replies and binary handshakes pass,
        // and are never read as heads after.
        for first in [
            &b"EHLO client.example\r\n"[..],
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"+OK\r\n",
        ] {
            let stream = [first, MESHED].concat();
            let (out, stop) = through_as(&[&stream], true).await;
            assert_eq!((out, stop), (stream.clone(), None));
        }
        // HTTP/2's preface: its streams' hosts are not read here.
        let (out, stop) = through_as(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], true).await;
        assert!(out.is_empty() && stop.is_some());
    }

    #[tokio::test]
    async fn a_request_to_switch_passes_its_body_before_the_next_bytes_tell() {
        // The body looks like a TLS record; the server answered 200 and
        // did not switch, so the next request is judged.
        let up = b"POST /u HTTP/1.1\r\nHost: example.org\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\n\x16\x03\x01\x00\x01";
        let (out, stop) = through(&[&up[..], MESHED]).await;
        assert_eq!(out, up.to_vec());
        assert!(stop.unwrap().contains("meshed.example"));
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
            // Framing a server could read another way than the guard: the
            // smuggling shapes (CL.TE, TE twice, TE in HTTP/1.0, bare LF).
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 80\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nContent-Length: 50\r\n\r\n",
            // Hosts that hide one: two Host fields, one that does not parse.
            b"GET / HTTP/1.1\r\nHost: example.org\r\nHost: meshed.example\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: meshed.example:1:2\r\n\r\n",
            b"GET http://meshed.example/a<b HTTP/1.1\r\nHost: example.org\r\n\r\n",
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
    async fn after_a_switch_the_clients_next_bytes_say_whether_it_happened() {
        let up = b"GET /ws HTTP/1.1\r\nHost: example.org\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        // Taken: WebSocket frames pass unread, whatever they hold.
        let frames = b"\x81\x05hello GET / HTTP/1.1\r\nHost: meshed.example\r\n\r\n";
        let (out, stop) = through(&[up, frames]).await;
        assert_eq!(stop, None);
        assert_eq!(out, [&up[..], &frames[..]].concat());
        // Declined (the server answered 426 and reads on): the next request
        // is judged, also after empty lines, split or pipelined.
        let after_blank_lines: &[u8] = b"\r\n\r\nGET / HTTP/1.1\r\nHost: meshed.example\r\n\r\n";
        for next in [MESHED, after_blank_lines] {
            let (out, stop) = through(&[up, next]).await;
            assert_eq!(out, up);
            assert!(stop.is_some());
            let (out, stop) = through(&[&[&up[..], next].concat()]).await;
            assert_eq!(out, up);
            assert!(stop.is_some());
        }
        // A CONNECT taken: TLS passes; declined: the next request is judged.
        let connect = b"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n";
        let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        let (out, stop) = through(&[connect, hello]).await;
        assert_eq!((out, stop), ([&connect[..], &hello[..]].concat(), None));
        let (out, stop) = through(&[connect, MESHED]).await;
        assert_eq!(out, connect);
        assert!(stop.is_some());
        // h2c taken: the preface, then frames, pass, even a byte at a time.
        let h2c = b"GET / HTTP/1.1\r\nHost: example.org\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
        let after = [H2_PREFACE, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"].concat();
        let mut writes: Vec<&[u8]> = vec![h2c];
        writes.extend(after.chunks(1));
        let (out, stop) = through(&writes).await;
        assert_eq!(stop, None);
        assert_eq!(out, [&h2c[..], &after[..]].concat());
        // An Upgrade field without the Connection option asks for nothing:
        // the server reads on as HTTP, and so does the guard.
        let offer = b"GET / HTTP/1.1\r\nHost: example.org\r\nUpgrade: x\r\n\r\n";
        let (out, stop) = through(&[offer, MESHED]).await;
        assert_eq!(out, offer);
        assert!(stop.is_some());
        // A target and a Host that disagree: either may be what the server
        // routes by, so a meshed one in either stops it.
        let (out, stop) = through(&[
            FIRST,
            b"GET http://example.org/ HTTP/1.1\r\nHost: meshed.example\r\n\r\n",
        ])
        .await;
        assert_eq!(out, FIRST);
        assert!(stop.is_some());
    }
}
