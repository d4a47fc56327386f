//! I/O wrappers for connections whose first bytes are looked at before a
//! server takes them: a rewound preface, the bare-LF guard.

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
