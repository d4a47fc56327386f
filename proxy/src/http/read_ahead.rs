//! A mesh connection's socket, read in large chunks on behalf of TLS.
//!
//! rustls asks its transport for at most 4 KiB at a time (its deframer
//! grows by that much per read), so a 16 KiB record takes four `read`
//! system calls, and a bulk transfer through a tunnel pays a system call
//! per 4 KiB where OpenSSL pays one per record. [`ReadAhead`] sits between
//! the socket and tokio-rustls: once a read fills the caller's request
//! (more is likely waiting), it reads up to [`CHUNK`] at once and serves
//! the following small reads from that. Writes pass straight through.
//!
//! The buffer is taken only once a read shows data arriving faster than it
//! is asked for, and given back whenever the socket runs dry: a connection
//! at rest holds none. A burst (a caller's unfinished request head, on
//! each of its connections at once) would otherwise keep 64 KiB per
//! connection: 2,000 of them were 25-30 MB of round 7's N4 peak. A stream
//! that pauses takes it again from the allocator's recently freed memory
//! (jemalloc keeps freed pages for 100 ms, `.cargo/config.toml`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::http::io::delegate_write;

/// Bytes read from the socket at once while data streams in.
pub const CHUNK: usize = 64 * 1024;

/// A transport whose reads are coalesced (see the module documentation).
pub struct ReadAhead<I> {
    inner: I,
    /// Read ahead but not yet handed out: `buf[at..end]`. Empty (no
    /// allocation) while reads go straight to the caller.
    buf: Vec<u8>,
    at: usize,
    end: usize,
}

impl<I> ReadAhead<I> {
    /// Wraps `inner`; reads go straight through until data streams in.
    pub fn new(inner: I) -> ReadAhead<I> {
        ReadAhead {
            inner,
            buf: Vec::new(),
            at: 0,
            end: 0,
        }
    }

    /// The wrapped transport.
    pub fn get_ref(&self) -> &I {
        &self.inner
    }

    /// Hands out what was read ahead, as much as `out` takes.
    fn give(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.end - self.at);
        out.put_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        if self.at == self.end {
            self.at = 0;
            self.end = 0;
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ReadAhead<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.end {
            this.give(out);
            return Poll::Ready(Ok(()));
        }
        let wanted = out.remaining();
        if this.buf.is_empty() || wanted >= CHUNK {
            // Direct: no copy. A read that fills the request suggests more
            // is waiting: the next ones are read ahead.
            let before = out.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, out);
            if let Poll::Ready(Ok(())) = r {
                if wanted > 0 && out.filled().len() - before == wanted && wanted < CHUNK {
                    this.buf = vec![0; CHUNK];
                }
            }
            return r;
        }
        let mut rb = ReadBuf::new(&mut this.buf);
        match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                this.at = 0;
                this.end = n;
                if n > 0 {
                    this.give(out);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // Dry: given back (see the module's documentation).
                this.buf = Vec::new();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

delegate_write!(ReadAhead);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Reads `out.len()` bytes 4 KiB at a time, as rustls asks.
    async fn read_small<I: AsyncRead + Unpin>(r: &mut ReadAhead<I>, total: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < total {
            let n = r.read(&mut small).await.expect("read");
            assert!(n > 0, "early EOF after {}", got.len());
            got.extend_from_slice(&small[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_stream_arrives_whole_and_in_order_and_eof_passes_through() {
        let (mut w, r) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let send = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&send).await.expect("write");
            w.shutdown().await.expect("shutdown");
        });
        let mut r = ReadAhead::new(r);
        let got = read_small(&mut r, data.len()).await;
        assert_eq!(got, data);
        let mut rest = [0u8; 16];
        assert_eq!(r.read(&mut rest).await.expect("eof"), 0);
        writer.await.expect("writer");
    }

    #[tokio::test]
    async fn streaming_reads_ahead_and_small_exchanges_keep_no_buffer() {
        let (mut w, r) = tokio::io::duplex(256 * 1024);
        let mut r = ReadAhead::new(r);
        // A small message: read straight through, nothing kept.
        w.write_all(b"ping").await.expect("write");
        let mut small = [0u8; 4096];
        assert_eq!(r.read(&mut small).await.expect("read"), 4);
        assert!(r.buf.is_empty());
        // A stream: the first read fills the request, the rest comes from
        // one read ahead.
        w.write_all(&vec![7u8; 100_000]).await.expect("write");
        assert_eq!(r.read(&mut small).await.expect("read"), 4096);
        assert_eq!(r.buf.len(), CHUNK);
        assert_eq!(r.read(&mut small).await.expect("read"), 4096);
        assert_eq!(r.end - r.at, CHUNK - 4096, "one read of CHUNK ahead");
        // Drained, then dry: given back.
        let left = 100_000 - 2 * 4096;
        let got = read_small(&mut r, left).await;
        assert_eq!(got.len(), left);
        let wait = std::time::Duration::from_millis(50);
        let pending = tokio::time::timeout(wait, r.read(&mut small)).await;
        assert!(pending.is_err(), "nothing more was sent");
        assert!(r.buf.is_empty(), "a dry socket kept its buffer");
        // A small message, then dry: back to direct reads, no buffer.
        w.write_all(b"pong").await.expect("write");
        assert_eq!(r.read(&mut small).await.expect("read"), 4);
        let pending = tokio::time::timeout(wait, r.read(&mut small)).await;
        assert!(pending.is_err(), "nothing more was sent");
        assert!(r.buf.is_empty(), "small exchanges keep a buffer");
    }

    #[tokio::test]
    async fn one_burst_then_dry_keeps_no_buffer() {
        let (mut w, r) = tokio::io::duplex(256 * 1024);
        let mut r = ReadAhead::new(r);
        // 60 KB at once (an unfinished request head), then nothing.
        w.write_all(&vec![7u8; 60_000]).await.expect("write");
        let got = read_small(&mut r, 60_000).await;
        assert_eq!(got.len(), 60_000);
        let mut small = [0u8; 4096];
        let wait = std::time::Duration::from_millis(50);
        let pending = tokio::time::timeout(wait, r.read(&mut small)).await;
        assert!(pending.is_err(), "nothing more was sent");
        assert!(r.buf.is_empty(), "a burst kept its buffer");
    }
}
