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

    /// The connection.
    pub fn get_ref(&self) -> &I {
        &self.inner
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

/// A reader must take this much per stall limit of waiting on it
/// (`body_timeout`): one that takes a byte at a time would otherwise hold
/// what feeds it (an app connection) for ever. That is a floor of about
/// 550 bytes a second with the default 30 s, and only while the sidecar has
/// bytes waiting for the reader.
pub const MIN_PROGRESS: usize = 16 * 1024;

/// A connection whose writes may wait at most `limit` for the peer to take
/// [`MIN_PROGRESS`] bytes: a write blocked beyond it fails (`TimedOut`),
/// which ends the connection and lets go of what fed it. For HTTP/1.1
/// callers of the inbound, whose responses have no flow-control window to
/// watch. Only time spent blocked counts, and the clock is read only once
/// a write has had to wait.
pub struct WriteStall<I> {
    inner: I,
    limit: std::time::Duration,
    /// Blocked time since the peer last took `MIN_PROGRESS` bytes.
    waited: std::time::Duration,
    taken: usize,
    /// The write blocked now: since when, and the deadline.
    blocked: Option<(tokio::time::Instant, Pin<Box<tokio::time::Sleep>>)>,
}

impl<I> WriteStall<I> {
    /// Wraps `inner`; writes may wait `limit`.
    pub fn new(inner: I, limit: std::time::Duration) -> WriteStall<I> {
        WriteStall {
            inner,
            limit,
            waited: std::time::Duration::ZERO,
            taken: 0,
            blocked: None,
        }
    }

    /// `polled` (what it took counted), or the stall error once writes
    /// have waited `limit` without the peer taking `MIN_PROGRESS`.
    fn bound(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(r) = polled {
            if let Some((since, _)) = self.blocked.take() {
                self.waited += since.elapsed();
            }
            if let Ok(n) = &r {
                self.taken += n;
                if self.taken >= MIN_PROGRESS {
                    (self.waited, self.taken) = (std::time::Duration::ZERO, 0);
                }
            }
            return Poll::Ready(r);
        }
        let left = self.limit.saturating_sub(self.waited);
        let (_, deadline) = self.blocked.get_or_insert_with(|| {
            (
                tokio::time::Instant::now(),
                Box::pin(tokio::time::sleep(left)),
            )
        });
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the peer took less than {MIN_PROGRESS} bytes in {:?} of waiting",
                    self.limit
                ),
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
        let polled = Pin::new(&mut self.inner).poll_flush(cx).map_ok(|()| 0);
        self.bound(cx, polled).map_ok(|_| ())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long a closing HTTP/1.1 connection reads on for what the client is
/// still sending, and how much it reads at most (nginx's lingering close).
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(500);
/// See [`LINGER`].
pub const LINGER_BYTES: usize = 256 * 1024;

/// An HTTP/1.1 connection that, once its write side is shut, reads and
/// discards what the client is still sending, for [`LINGER`] or
/// [`LINGER_BYTES`], before the shutdown completes. A server that refuses a
/// head (431, 400) closes while the client may still be writing the rest of
/// it or a body; closing a socket with unread bytes makes the kernel reset
/// the connection, and a client whose write fails with that reset (curl,
/// most libraries) never reads the answer. hyper shuts the connection down
/// this way after such an answer, and at every other close, where the read
/// ends at once on the client's own close.
pub struct Lingering<I> {
    inner: I,
    state: Linger,
}

enum Linger {
    Open,
    Draining {
        until: Pin<Box<tokio::time::Sleep>>,
        seen: usize,
    },
    Done,
}

impl<I> Lingering<I> {
    /// Wraps `inner`.
    pub fn new(inner: I) -> Lingering<I> {
        Lingering {
            inner,
            state: Linger::Open,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Lingering<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Lingering<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                Linger::Open => {
                    std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                    this.state = Linger::Draining {
                        until: Box::pin(tokio::time::sleep(LINGER)),
                        seen: 0,
                    };
                }
                Linger::Draining { until, seen } => {
                    if until.as_mut().poll(cx).is_ready() {
                        this.state = Linger::Done;
                        continue;
                    }
                    let mut scratch = [0u8; 8192];
                    let mut rb = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                            *seen += rb.filled().len();
                            if *seen > LINGER_BYTES {
                                this.state = Linger::Done;
                            }
                        }
                        // The client's close, or a failed read: done.
                        Poll::Ready(_) => this.state = Linger::Done,
                    }
                }
                Linger::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod write_stall_tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Writes 32-byte pieces to a peer that reads `per_read` bytes every
    /// 50 ms `reads` times, then stops (keeping its end open): how long
    /// until a write failed, how much was written, and the error.
    async fn against(per_read: usize, reads: usize) -> (Duration, usize, io::Error) {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut w = WriteStall::new(near, Duration::from_millis(300));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut buf = vec![0u8; per_read];
            for _ in 0..reads {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = far.read_exact(&mut buf).await;
            }
            let _ = stopped.await;
            drop(far);
        });
        let start = std::time::Instant::now();
        let mut written = 0;
        let err = loop {
            match w.write(&[7u8; 1024]).await {
                Ok(n) => written += n,
                Err(e) => break e,
            }
        };
        let _ = stop.send(());
        (start.elapsed(), written, err)
    }

    #[tokio::test]
    async fn a_reader_taking_too_little_is_cut_and_one_taking_enough_is_served() {
        // 16 KiB every 50 ms: served as long as it reads (2 s), cut only
        // once it stops.
        let (took, written, e) = against(MIN_PROGRESS, 40).await;
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(took >= Duration::from_millis(2000), "{took:?}");
        assert!(written >= 40 * MIN_PROGRESS, "{written}");
        // A trickle (64 bytes every 50 ms, for as long): cut once its
        // waits add up to the limit, long before it stops.
        let (took, _, e) = against(64, 40).await;
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }
}
