//! A request body counted as it streams to the app, for requests on a
//! `risk` route that are forwarded without a proof: should the app answer
//! `x-keyproof-step-up: required`, the caller is challenged, and its
//! sidecar resends the body signed, which the verifier can only check up to
//! `[inbound.stepup] max_body`. A larger body then gets a clear 413 at once
//! instead of a challenge its answer would fail.
//!
//! Nothing of the body is kept (the caller's sidecar keeps the copy it
//! resends), only its length. When the app client lets go of the body
//! before its end (the app answered without reading it all), the rest is
//! handed back, so that it can be drained before the caller is answered:
//! a caller's sidecar must have sent its whole body to resend it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::error::BoxError;
use crate::http::body::ProxyBody;

/// What is known of a [`Counted`] body's length.
#[derive(Debug, Default)]
pub struct Tally {
    seen: AtomicU64,
    /// The body ended, failed, or was let go of.
    settled: AtomicBool,
    /// What was left when it was let go of before its end.
    rest: Mutex<Option<ProxyBody>>,
    wake: tokio::sync::Notify,
}

/// A body passed on as it comes, its data bytes counted.
#[derive(Debug)]
pub struct Counted {
    inner: Option<ProxyBody>,
    tally: Arc<Tally>,
    /// Fields removed from the trailer section (see [`Counted::without`]).
    unread: Option<Arc<[Box<str>]>>,
}

/// Wraps `body`; the tally says how much of it went through.
pub fn counted(body: ProxyBody) -> (Counted, Arc<Tally>) {
    let tally = Arc::new(Tally::default());
    if body.is_end_stream() {
        tally.settle();
    }
    (
        Counted {
            inner: Some(body),
            tally: tally.clone(),
            unread: None,
        },
        tally,
    )
}

impl Counted {
    /// The body with the fields `names` (lowercase, `-` for `_`) removed
    /// from its trailer section in any spelling: the fields risk rules read
    /// in the header section, which must not reach the app unevaluated.
    pub fn without(mut self, names: Arc<[Box<str>]>) -> Counted {
        self.unread = Some(names);
        self
    }
}

impl Tally {
    /// Data bytes passed so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    fn settle(&self) {
        self.settled.store(true, Ordering::Release);
        // One waiter at most; the permit is kept should it not wait yet.
        self.wake.notify_one();
    }

    /// The body's whole length once it is done, or at least more than
    /// `limit`: waits (up to `within`) for the body to end or be let go
    /// of, then reads and drops what was left of it, counting, up to
    /// `limit` + 1 bytes. A body still streaming after `within` is counted
    /// as far as it came.
    pub async fn total(&self, limit: u64, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        if self.seen() > limit {
            return self.seen();
        }
        if !self.settled.load(Ordering::Acquire) {
            let _ = tokio::time::timeout_at(deadline, self.wake.notified()).await;
        }
        let rest = self
            .rest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(mut body) = rest {
            let _ = tokio::time::timeout_at(deadline, async {
                while self.seen() <= limit {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            if let Some(d) = frame.data_ref() {
                                self.seen.fetch_add(d.len() as u64, Ordering::AcqRel);
                            }
                        }
                        _ => break,
                    }
                }
            })
            .await;
        }
        self.seen()
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let mut polled = Pin::new(&mut *inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(names)) = (&mut polled, &this.unread) {
            if let Some(t) = frame.trailers_mut() {
                crate::http::owned::remove_named(t, names);
            }
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.tally.seen.fetch_add(d.len() as u64, Ordering::AcqRel);
                }
                // The sender may not poll again after the last frame.
                if inner.is_end_stream() {
                    this.tally.settle();
                }
            }
            Poll::Ready(_) => this.tally.settle(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(ProxyBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), ProxyBody::size_hint)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.tally.settled.load(Ordering::Acquire) {
            return;
        }
        if let Some(rest) = self.inner.take() {
            *self
                .tally
                .rest
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(rest);
        }
        self.tally.settle();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;

    use super::*;
    use crate::testing::hyper_request;
    use http::HeaderMap;

    /// A chunked HTTP/1.1 body as hyper delivers it, one frame per chunk;
    /// unfinished (no last chunk) unless `end`. Keep the stream while the
    /// body matters.
    async fn streamed(chunks: &[&str], end: bool) -> (ProxyBody, DuplexStream) {
        let mut raw =
            String::from("POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n");
        for c in chunks {
            raw.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
        }
        if end {
            raw.push_str("0\r\n\r\n");
        }
        let (req, client) = hyper_request(raw.as_bytes()).await;
        (ProxyBody::Stream(req.into_body()), client)
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_is_counted_whole() {
        let (b, _client) = streamed(&["hello ", "world"], true).await;
        let (mut b, tally) = counted(b);
        let got = (&mut b).collect().await.expect("body").to_bytes();
        assert_eq!(&got[..], b"hello world");
        assert_eq!(tally.seen(), 11);
        let start = std::time::Instant::now();
        assert_eq!(tally.total(100, Duration::from_secs(5)).await, 11);
        assert!(start.elapsed() < Duration::from_secs(1), "settled: no wait");
    }

    #[tokio::test]
    async fn a_body_let_go_of_before_its_end_is_drained_and_counted() {
        let (b, _client) = streamed(&["01234", "56789"], true).await;
        let (mut b, tally) = counted(b);
        // The app client read one frame, then let go.
        let first = b.frame().await.expect("a frame").expect("data");
        assert_eq!(first.data_ref().map(Bytes::len), Some(5));
        drop(b);
        assert_eq!(tally.seen(), 5);
        assert_eq!(tally.total(100, Duration::from_secs(5)).await, 10);
        // Over the limit: reading stops once past it.
        let (b, _client) = streamed(&["0123", "4567", "89"], true).await;
        let (b, tally) = counted(b);
        drop(b);
        let total = tally.total(4, Duration::from_secs(5)).await;
        assert_eq!(total, 8, "read up to the first frame past the limit");
    }

    #[tokio::test]
    async fn fields_read_by_header_rules_are_removed_from_the_trailers() {
        let raw = "POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n\
            3\r\nabc\r\n0\r\nx-amount: 99999\r\nX_Amount: 99999\r\nx-kind: wire\r\n\
            grpc-status: 0\r\n\r\n";
        let (req, _client) = hyper_request(raw.as_bytes()).await;
        let (b, tally) = counted(ProxyBody::Stream(req.into_body()));
        let names: Arc<[Box<str>]> = Arc::from(vec!["x-amount".into(), "x-kind".into()]);
        let got = b.without(names).collect().await.expect("body");
        let trailers = got.trailers().cloned().expect("trailers");
        assert_eq!(&got.to_bytes()[..], b"abc");
        let names: Vec<_> = trailers.keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(names, ["grpc-status"]);
        assert_eq!(tally.seen(), 3);
        // Without names, the trailers go on as they came.
        let (req, _client) = hyper_request(raw.as_bytes()).await;
        let (b, _) = counted(ProxyBody::Stream(req.into_body()));
        let got = b.collect().await.expect("body");
        assert_eq!(got.trailers().map(HeaderMap::len), Some(4));
    }

    #[tokio::test]
    async fn an_empty_body_is_settled_from_the_start() {
        let (_b, tally) = counted(ProxyBody::empty());
        let start = std::time::Instant::now();
        assert_eq!(tally.total(10, Duration::from_secs(5)).await, 0);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_body_still_streaming_is_waited_for_no_longer_than_the_bound() {
        let (b, _client) = streamed(&["abc"], false).await;
        let (mut b, tally) = counted(b);
        let _ = b.frame().await;
        let start = std::time::Instant::now();
        // Held by its sender, unfinished: counted as far as it came.
        assert_eq!(tally.total(10, Duration::from_millis(200)).await, 3);
        assert!(start.elapsed() >= Duration::from_millis(200));
    }
}
