//! I/O wrappers for connections whose first bytes are looked at before a
//! server takes them: a rewound preface, the bare-LF guard.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Implements `AsyncWrite` for a read-side wrapper `$ty<I>` with a field
/// `inner: I` by passing every write through: the wrappers here (a rewound
/// preface, the bare-LF guard) only look at what is read.
macro_rules! delegate_write {
    ($ty:ident) => {
        impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<I> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use delegate_write;

/// A connection whose first bytes were read already: they are read again
/// first.
pub struct Rewind<I> {
    pre: Vec<u8>,
    at: usize,
    inner: I,
}

impl<I> Rewind<I> {
    /// `inner`, with `pre` (read from it already) to be read first.
    pub fn new(pre: Vec<u8>, inner: I) -> Rewind<I> {
        Rewind { pre, at: 0, inner }
    }

    /// The connection, and whatever of `pre` was not read.
    pub fn into_inner(self) -> (I, Vec<u8>) {
        let Rewind { mut pre, at, inner } = self;
        pre.drain(..at);
        (inner, pre)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.pre.len() {
            let n = (self.pre.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.pre[at..at + n]);
            self.at += n;
            if self.at == self.pre.len() {
                self.pre = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

delegate_write!(Rewind);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn the_rewound_bytes_are_read_first_whatever_the_read_size() {
        let (mut far, near) = tokio::io::duplex(1024);
        far.write_all(b"def").await.unwrap();
        let mut io = Rewind::new(b"abc".to_vec(), near);
        let mut two = [0u8; 2];
        let mut got = Vec::new();
        while got.len() < 6 {
            let n = io.read(&mut two).await.unwrap();
            got.extend_from_slice(&two[..n]);
        }
        assert_eq!(got, b"abcdef");
        // Writes go straight through.
        io.write_all(b"out").await.unwrap();
        let mut back = [0u8; 3];
        far.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"out");
    }
}

/// A connection whose writes may wait at most `limit` for the peer to take
/// bytes: a write still blocked then fails (`TimedOut`), which ends the
/// connection and lets go of what fed it. For HTTP/1.1 callers of the
/// inbound, whose responses have no flow-control window to watch: one
/// that reads none of a response for `body_timeout` would otherwise hold
/// the app connection behind it for ever. The clock is read only once a
/// write has had to wait.
pub struct WriteStall<I> {
    inner: I,
    limit: std::time::Duration,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteStall<I> {
    /// Wraps `inner`; writes may wait `limit`.
    pub fn new(inner: I, limit: std::time::Duration) -> WriteStall<I> {
        WriteStall {
            inner,
            limit,
            waiting: None,
        }
    }

    /// `polled`, or the stall error once writes have waited `limit`.
    fn bound<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let limit = self.limit;
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match waiting.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteStall<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteStall<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bound(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.bound(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod write_stall_tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_write_the_peer_never_takes_fails_after_the_limit_and_progress_restarts_it() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut w = WriteStall::new(near, Duration::from_millis(200));
        // The peer takes a little now and then: slow, but never stalled
        // for the limit.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 16];
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                got += far.read(&mut buf).await.unwrap();
            }
            // Then nothing more, and the writer must give up.
            (got, far)
        });
        let start = std::time::Instant::now();
        let mut written = 0;
        let err = loop {
            match w.write(&[7u8; 32]).await {
                Ok(n) => written += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let (got, _far) = reader.await.unwrap();
        assert!(got > 0 && written >= got, "{got} read, {written} written");
        // It waited past the slow reader's pauses, and gave up once it stopped.
        assert!(start.elapsed() >= Duration::from_millis(600), "{:?}", start.elapsed());
    }
}
