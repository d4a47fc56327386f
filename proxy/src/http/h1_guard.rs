//! Line endings on the inbound's HTTP/1.1 connections, which hyper parses.
//!
//! hyper (through httparse) accepts a bare LF as a line terminator, as RFC
//! 9112 section 2.2 allows a recipient to. The sidecar refuses it on both
//! listeners, so that no head is read one way here and another way by a
//! strict peer. This wrapper follows the message boundaries of the bytes
//! hyper reads (heads, `Content-Length` and chunked bodies, trailer
//! sections):
//!
//! - Where a head holds a bare LF, the LF becomes a NUL byte: no HTTP/1
//!   parser accepts NUL in a head, so hyper answers 400 and closes, as for
//!   any malformed head. The read ends there with an empty line after the
//!   NUL: hyper re-parses a partial head only once it sees one end, and the
//!   bytes after a refused head are never read anyway.
//! - Where a chunk line or trailer section holds a bare LF, or a body is
//!   framed in a way the guard cannot follow, the read fails
//!   (`InvalidData`): the body fails, the request is answered 400
//!   (`error::is_malformed`), and the connection is not read again. Bytes
//!   are never rewritten inside a body, where hyper may take any byte (a
//!   chunk extension), and hyper never reads past what the guard followed.
//!
//! Cost per request: one pass over the head's bytes (copied into a reused
//! buffer only when a head spans reads) and one framing parse of it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::http::h1::{request_body_framing, Framing};
use crate::memory::{Growing, Holder};

/// Where in the message stream the next byte is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// A request head (leading empty lines included).
    Head,
    /// This many body bytes to pass.
    Body(u64),
    /// A chunk-size line.
    ChunkLine,
    /// Chunk data, then its CRLF.
    ChunkData(u64),
    /// The trailer section after the last chunk.
    Trailers,
    /// A head the guard cannot follow (hyper will refuse it and close):
    /// bytes pass unchecked from here on.
    Lost,
    /// A body the guard cannot follow, or with a bare LF in its framing:
    /// every read fails from here on.
    Failed(&'static str),
}

/// What a read holds, as the guard followed it.
#[derive(Debug, PartialEq, Eq)]
enum Followed {
    /// Nothing wrong (or nothing the guard follows any more).
    Fine,
    /// A head to refuse: the byte at this index is poisoned.
    Poisoned(usize),
    /// A body to fail, and why: the read passes on only the bytes before
    /// the index (those the guard followed), the next one fails.
    Failed(usize, &'static str),
}

/// An HTTP/1.1 server connection whose heads may not hold a bare LF.
pub struct StrictLines<I> {
    inner: I,
    at: At,
    /// The current head (or line) so far, when it spans reads.
    line: Vec<u8>,
    /// The previous byte seen in a checked section.
    prev: u8,
    /// Heads longer than this are hyper's to refuse (431).
    max: usize,
    /// What a head spanning reads is charged to (`memory.rs`).
    unfinished: Option<Growing>,
}

impl<I> StrictLines<I> {
    /// Wraps a server connection whose heads hyper refuses above `max`.
    pub fn new(inner: I, max: usize) -> StrictLines<I> {
        StrictLines {
            inner,
            at: At::Head,
            line: Vec::new(),
            prev: 0,
            max,
            unfinished: None,
        }
    }

    /// Charges a head that spans reads to `holder` while it is unfinished:
    /// hyper's read buffer and this guard's copy of it, twice its length.
    /// Refused, the read fails and the connection closes.
    pub fn charged_to(mut self, holder: Arc<Holder>) -> StrictLines<I> {
        self.unfinished = Some(Growing::new(holder));
        self
    }

    /// Follows `bytes` (just read), poisoning bare LFs in heads and
    /// failing bodies whose framing holds one.
    fn follow(&mut self, bytes: &mut [u8]) -> Followed {
        let mut i = 0;
        while i < bytes.len() {
            match self.at {
                At::Lost => return Followed::Fine,
                At::Failed(why) => return Followed::Failed(0, why),
                At::Body(n) => {
                    let take = usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += take;
                    let left = n - take as u64;
                    self.at = if left == 0 { At::Head } else { At::Body(left) };
                }
                At::ChunkData(n) => {
                    // `n` counts the data and its CRLF.
                    let take = usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += take;
                    let left = n - take as u64;
                    self.at = if left == 0 {
                        At::ChunkLine
                    } else {
                        At::ChunkData(left)
                    };
                }
                At::Head | At::ChunkLine | At::Trailers => {
                    // Whole segments up to the next LF, not byte by byte.
                    let rest = &bytes[i..];
                    let Some(p) = rest.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(rest);
                        self.prev = rest[rest.len() - 1];
                        if self.line.len() > self.max.saturating_add(2) {
                            return self.too_long(bytes.len());
                        }
                        return Followed::Fine;
                    };
                    let before = if p == 0 { self.prev } else { rest[p - 1] };
                    if before != b'\r' {
                        if self.at != At::Head {
                            return self.fail(i, "bare LF in a chunk line or trailer section");
                        }
                        bytes[i + p] = 0;
                        // hyper refuses the head; nothing after it matters.
                        self.at = At::Lost;
                        return Followed::Poisoned(i + p);
                    }
                    self.line.extend_from_slice(&rest[..=p]);
                    self.prev = b'\n';
                    i += p + 1;
                    if self.line.len() > self.max.saturating_add(2) {
                        return self.too_long(i);
                    }
                    let line_len = self.line.len();
                    if self.line_end() {
                        // The head's last LF, as for a bare one: hyper
                        // refuses the head.
                        bytes[i - 1] = 0;
                        return Followed::Poisoned(i - 1);
                    }
                    if let At::Failed(why) = self.at {
                        // The line just ended (a size the guard cannot
                        // read): nothing of it goes on.
                        return Followed::Failed(i.saturating_sub(line_len), why);
                    }
                }
            }
        }
        Followed::Fine
    }

    /// A head beyond `max` is hyper's to refuse (431, and close); a chunk
    /// line or trailer section beyond it fails the body.
    /// `i`: where the read's checked bytes end.
    fn too_long(&mut self, i: usize) -> Followed {
        if self.at == At::Head {
            self.at = At::Lost;
            return Followed::Fine;
        }
        self.fail(
            i,
            "chunk line or trailer section larger than the head limit",
        )
    }

    /// Fails the body at the line or section that holds index `i` of this
    /// read: what came before it goes on (hyper reads the head and the
    /// body up to there), and the read after it fails.
    fn fail(&mut self, i: usize, why: &'static str) -> Followed {
        let start = i.saturating_sub(self.line.len());
        self.at = At::Failed(why);
        Followed::Failed(start, why)
    }

    /// A line (CRLF) ended in a checked section; true when it ended a head
    /// the server must refuse.
    fn line_end(&mut self) -> bool {
        let mut refuse = false;
        match self.at {
            At::Head => {
                if self.line == b"\r\n" {
                    // An empty line before the request line.
                    self.line.clear();
                } else if self.line.ends_with(b"\r\n\r\n") {
                    self.at = match request_body_framing(&self.line) {
                        Some(Framing::Empty) => At::Head,
                        Some(Framing::Length(n)) => At::Body(n),
                        Some(Framing::Chunked) => At::ChunkLine,
                        // Both a length and a coding: refused.
                        Some(Framing::UntilClose) => {
                            refuse = true;
                            At::Lost
                        }
                        None => At::Lost,
                    };
                    self.line.clear();
                }
            }
            At::ChunkLine => {
                let digits = self
                    .line
                    .iter()
                    .take_while(|b| b.is_ascii_hexdigit())
                    .count();
                let size = std::str::from_utf8(&self.line[..digits])
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok());
                self.at = match size {
                    Some(0) => At::Trailers,
                    Some(n) => At::ChunkData(n.saturating_add(2)),
                    None => At::Failed("malformed chunk size"),
                };
                self.line.clear();
            }
            // The section ends at an empty line.
            At::Trailers if self.line == b"\r\n" || self.line.ends_with(b"\r\n\r\n") => {
                self.at = At::Head;
                self.line.clear();
            }
            _ => {}
        }
        if self.line.capacity() > 4096 && self.line.is_empty() {
            // A large head once does not keep its buffer.
            self.line = Vec::new();
        }
        refuse
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for StrictLines<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let At::Failed(why) = self.at {
            return Poll::Ready(Err(malformed(why)));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && self.at != At::Lost {
            let this = &mut *self;
            match this.follow(&mut buf.filled_mut()[before..]) {
                Followed::Fine => {}
                Followed::Poisoned(at) => {
                    // The read ends at the NUL, followed by an empty line,
                    // so that hyper parses (and refuses) now rather than
                    // waiting for the end of a head that may never come.
                    buf.set_filled(before + at + 1);
                    if buf.remaining() >= 4 {
                        buf.put_slice(b"\r\n\r\n");
                    }
                }
                Followed::Failed(0, why) => {
                    buf.set_filled(before);
                    return Poll::Ready(Err(malformed(why)));
                }
                Followed::Failed(at, _) => {
                    // hyper gets what the guard followed (the head, the
                    // body so far), so that it has a request to answer;
                    // the next read fails. Nothing from the bad line on
                    // reaches it.
                    buf.set_filled(before + at);
                }
            }
            if let Some(u) = &mut this.unfinished {
                if this.line.is_empty() {
                    u.done();
                } else if !u.hold(2 * this.line.len() as u64) {
                    u.done();
                    this.line = Vec::new();
                    this.at = At::Failed(BUDGET_SPENT);
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::other(BUDGET_SPENT)));
                }
            }
        }
        r
    }
}

/// Why a connection's unfinished head was refused.
const BUDGET_SPENT: &str =
    "unfinished request head refused: its caller's share of the memory budget is spent";

/// The read error of a body the guard refused: `InvalidData`, which
/// [`crate::error::is_malformed`] reads as the caller's fault (400).
fn malformed(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

crate::http::io::delegate_write!(StrictLines);

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in pieces of `step`; returns what hyper would read,
    /// and whether the guard failed the read.
    fn follow_all(wire: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut g = StrictLines::new((), 1024);
        let mut out = wire.to_vec();
        let mut failed = false;
        for piece in out.chunks_mut(step) {
            if let Followed::Failed(at, _) = g.follow(piece) {
                // What hyper would not see.
                piece[at..].fill(b'-');
                failed = true;
            }
        }
        if failed && step == wire.len() {
            // Read whole, the bad line never reaches hyper (in parts,
            // what came before its LF did, and hyper waits for the rest).
            let seen = String::from_utf8_lossy(&out);
            assert!(!seen.contains("zz") && !seen.contains(";x"), "{seen}");
        }
        (out, failed)
    }

    fn run(wire: &[u8], step: usize) -> Vec<u8> {
        follow_all(wire, step).0
    }

    #[test]
    fn bare_lfs_in_heads_are_poisoned_in_chunk_lines_and_trailers_fail_in_data_pass() {
        let ok: &[u8] = b"\r\nPOST /a HTTP/1.1\r\nContent-Length: 4\r\n\r\na\nb\nGET /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n\n\n\n\r\n0\r\nx: y\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
        for step in [1, 2, 5, 7, ok.len()] {
            assert_eq!(run(ok, step), ok, "step {step}");
        }
        for bad in [
            &b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET / HTTP/1.1\r\nA: b\nC: d\r\n\r\n",
            // Both framings at once (a smuggling shape): refused too.
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
        ] {
            for step in [1, 3, bad.len()] {
                assert!(
                    run(bad, step).contains(&0),
                    "{:?} step {step}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
    }

    #[test]
    fn a_chunk_line_or_trailer_section_with_a_bare_lf_fails_unrewritten() {
        let head = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in [
            "1\nx\r\n0\r\n\r\n",
            "0\r\nx: y\n\r\n",
            // In a chunk extension, where hyper takes any byte but CR and LF
            // (a NUL there would pass).
            "5;x\nabc\r\n0\r\n\r\n",
            "5\r\nhello\r\n0;x\n",
            "0;x\nb\r\n\r\n",
            // A size the guard cannot read.
            "zz\r\n",
        ] {
            let wire = format!("{head}{body}");
            for step in [1, 3, wire.len()] {
                let (seen, failed) = follow_all(wire.as_bytes(), step);
                assert!(failed, "{body:?} step {step}");
                assert!(!seen.contains(&0), "{body:?} step {step}: rewritten");
            }
        }
        // And every read after it fails too: nothing on the connection is
        // read unguarded.
        let mut g = StrictLines::new((), 1024);
        let mut wire = format!("{head}0;x\n").into_bytes();
        assert!(matches!(g.follow(&mut wire), Followed::Failed(..)));
        let mut next = b"\r\nGET / HTTP/1.1\nHost: a\r\n\r\n".to_vec();
        assert!(matches!(g.follow(&mut next), Followed::Failed(0, _)));
    }

    #[test]
    fn a_head_beyond_the_limit_or_with_unknown_framing_is_left_to_hyper() {
        // Longer than max + CRLF without ending: hyper answers 431, and
        // nothing after it is looked at.
        let mut g = StrictLines::new((), 16);
        let mut long = b"GET / HTTP/1.1\r\nx: aaaaaaaaaaaaaaaa".to_vec();
        g.follow(&mut long);
        assert_eq!(g.at, At::Lost);
        let mut rest = b"\nA: b\n\r\n".to_vec();
        g.follow(&mut rest);
        assert!(!rest.contains(&0));
        // A framing the server refuses (a coding other than chunked).
        let mut g = StrictLines::new((), 1024);
        let mut head = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec();
        g.follow(&mut head);
        assert_eq!(g.at, At::Lost);
        // Where the head ends, the body is counted, then the next head.
        let mut g = StrictLines::new((), 1024);
        let mut head = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n".to_vec();
        g.follow(&mut head);
        assert_eq!(g.at, At::Body(3));
        g.follow(&mut b"a\nb".to_vec());
        assert_eq!(g.at, At::Head);
    }

    mod with_hyper {
        use std::convert::Infallible;
        use std::time::Duration;

        use bytes::Bytes;
        use http_body_util::{BodyExt, Full};
        use hyper::body::Incoming;
        use hyper_util::rt::TokioIo;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        use super::super::StrictLines;

        /// What the service made of the request body: its bytes and
        /// trailers, or that it failed.
        async fn body_report(
            req: http::Request<Incoming>,
        ) -> Result<http::Response<Full<Bytes>>, Infallible> {
            let report = match req.into_body().collect().await {
                Ok(c) => {
                    let t = c.trailers().map_or(0, |t| t.len());
                    let body = String::from_utf8_lossy(&c.to_bytes()).into_owned();
                    format!("body={body:?} trailers={t}")
                }
                Err(_) => "body failed".to_owned(),
            };
            Ok(http::Response::new(Full::new(Bytes::from(report))))
        }

        /// Sends `pieces` to hyper behind the guard, one read each, and
        /// returns all it answered until it closed.
        async fn exchange(pieces: &[&[u8]]) -> String {
            let (mut cli, srv) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(body_report);
                let io = TokioIo::new(StrictLines::new(srv, 1024));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
            for p in pieces {
                // A refused head is answered and closed at once: what was
                // still to send may find the pipe gone.
                if cli.write_all(p).await.is_err() {
                    break;
                }
                // Lets the server read this piece on its own.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let mut out = Vec::new();
            let r = tokio::time::timeout(Duration::from_millis(500), cli.read_to_end(&mut out));
            let closed = r.await.is_ok();
            let out = String::from_utf8(out).unwrap();
            assert!(closed, "hyper neither answered nor closed: {out:?}");
            out
        }

        #[tokio::test]
        async fn a_bare_lf_in_a_head_gets_400_and_crlf_passes_however_the_head_is_split() {
            let good: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
            let bad: &[u8] = b"GET / HTTP/1.1\r\nHost: a\nConnection: close\r\n\r\n";
            for step in [1, 3, 8, good.len()] {
                let pieces: Vec<&[u8]> = good.chunks(step).collect();
                let got = exchange(&pieces).await;
                assert!(got.starts_with("HTTP/1.1 200 "), "step {step}: {got:?}");
                let pieces: Vec<&[u8]> = bad.chunks(step).collect();
                let got = exchange(&pieces).await;
                assert!(got.starts_with("HTTP/1.1 400 "), "step {step}: {got:?}");
            }
            // A CRLF split between reads is still a CRLF.
            let got = exchange(&[
                b"GET / HTTP/1.1\r",
                b"\nHost: a\r\nConnection: close\r\n\r\n",
            ])
            .await;
            assert!(got.starts_with("HTTP/1.1 200 "), "{got:?}");
        }

        /// hyper re-parses a head that arrived in parts only once its
        /// buffer holds an end of head (`\r\n\r\n`, `\n\n` or `\n\r\n`,
        /// hyper's `is_complete_fast`), so a NUL alone, from a bare LF that
        /// ends a head in a read of its own, would end nothing: the guard
        /// ends the read with an empty line after it.
        #[tokio::test]
        async fn a_bare_lf_ending_a_head_in_a_read_of_its_own_gets_400() {
            let got = exchange(&[b"GET / HTTP/1.1\r\nHost: a\r\n", b"\n"]).await;
            assert!(got.starts_with("HTTP/1.1 400 "), "{got:?}");
        }

        #[tokio::test]
        async fn a_bare_lf_in_a_chunk_line_or_trailer_section_fails_the_body() {
            let head = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            // LFs inside chunk data are data.
            let good = format!("{head}3\r\na\nb\r\n0\r\nx-t: 1\r\n\r\n");
            let got = exchange(&[good.as_bytes()]).await;
            assert!(got.ends_with("body=\"a\\nb\" trailers=1"), "{got:?}");
            // The trailing CRLF lets a lenient reader see a complete
            // section (and then an empty line) where the guard sees none.
            for body in [
                "3\na\nb\r\n0\r\n\r\n",
                "3\r\na\nb\r\n0\r\nx-t: 1\n\r\n\r\n",
                "3\r\na\nb\r\n0\r\nx-t: 1\nx-u: 2\r\n\r\n",
            ] {
                let bad = format!("{head}{body}");
                let got = exchange(&[bad.as_bytes()]).await;
                assert!(got.ends_with("body failed"), "{body:?}: {got:?}");
            }
        }
    }
}
