//! A request body streamed to the upstream while a bounded copy is kept, so
//! that a step-up challenge to a request on a path not yet known to need
//! step-up can be answered by resending the body.
//!
//! The copy is a list of `Bytes` handles (reference counts, no memcpy) and
//! stops at `[outbound.stepup] max_body`; beyond that the copy is dropped and
//! a challenge gets a clear 413 instead of a silent failure.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use crate::http::limited::Whole;
use crate::memory::{Growing, Holder};

#[derive(Debug, Default)]
struct TeeState {
    chunks: Vec<Bytes>,
    /// The trailer section that ended the body, if any: a resend without
    /// it would be another request (a checksum in a trailer, say).
    trailers: Option<http::HeaderMap>,
    len: usize,
    overflow: bool,
    complete: bool,
    /// What the copy is charged to (`memory.rs`): the chunks it keeps
    /// would otherwise be freed once sent, and an upstream that never
    /// answers keeps them all (300 uploads held 117 MB, round 6's F7).
    charge: Option<Growing>,
}

fn lock(m: &Mutex<TeeState>) -> MutexGuard<'_, TeeState> {
    // Every mutation is a single push or flag store: a poisoned lock cannot
    // hold a half-written state.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The streaming half: forwards the request body frame by frame, keeping a
/// copy.
#[derive(Debug)]
pub struct TeeBody<B> {
    inner: B,
    state: Arc<Mutex<TeeState>>,
    limit: usize,
}

/// The keeping half: what can be resent once the response is known.
#[derive(Debug)]
pub struct TeeHandle(Arc<Mutex<TeeState>>);

/// The body available for a resend.
#[derive(Debug)]
pub enum Resend {
    /// The whole body, as sent, with its trailers.
    Body(Whole),
    /// The body was larger than the bound (or than the memory budget
    /// would keep).
    TooLarge,
    /// The upstream answered before the whole body was sent.
    Incomplete,
}

/// Wraps `body` (which must not be at its end already; an empty body needs
/// no copy) with a copy bounded by `limit`, and charged to `holder` as it
/// grows: refused, the copy is dropped, as one over `limit` is.
pub fn tee<B>(body: B, limit: usize, holder: Option<Arc<Holder>>) -> (TeeBody<B>, TeeHandle) {
    let state = Arc::new(Mutex::new(TeeState {
        charge: holder.map(Growing::optional),
        ..TeeState::default()
    }));
    (
        TeeBody {
            inner: body,
            state: state.clone(),
            limit,
        },
        TeeHandle(state),
    )
}

impl TeeHandle {
    /// The body for a resend.
    pub fn resend(&self) -> Resend {
        let mut s = lock(&self.0);
        if s.overflow {
            return Resend::TooLarge;
        }
        if !s.complete {
            return Resend::Incomplete;
        }
        let chunks = std::mem::take(&mut s.chunks);
        let data = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.into_iter().next().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(s.len);
                for c in &chunks {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        };
        Resend::Body(Whole {
            data,
            trailers: s.trailers.take(),
        })
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for TeeBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let mut s = lock(&this.state);
                if let Some(d) = frame.data_ref() {
                    if !s.overflow {
                        let len = s.len + d.len();
                        let refused = s.charge.as_mut().is_some_and(|c| !c.hold(len as u64));
                        if len > this.limit || refused {
                            s.overflow = true;
                            s.chunks = Vec::new();
                            if let Some(c) = s.charge.as_mut() {
                                c.done();
                            }
                        } else {
                            s.len += d.len();
                            s.chunks.push(d.clone());
                        }
                    }
                }
                // The sender may never poll again once the body says it has
                // ended, so completion is noted with the last frame (a
                // trailer section always is).
                if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    s.complete = true;
                }
                if this.inner.is_end_stream() {
                    s.complete = true;
                }
            }
            Poll::Ready(None) => lock(&this.state).complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::http::traits::test_body::{data, trailers, TestBody};

    /// Streams the whole of `body`, returning what passed.
    async fn stream<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> Vec<u8>
    where
        B::Error: std::fmt::Debug,
    {
        let mut out = Vec::new();
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.unwrap().into_data() {
                out.extend_from_slice(&d);
            }
        }
        out
    }

    fn resent(h: &TeeHandle) -> Option<Whole> {
        match h.resend() {
            Resend::Body(b) => Some(b),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_kept_whole() {
        let (mut body, copy) = tee(TestBody::steps(vec![data("ab"), data("cd")], None), 4, None);
        assert_eq!(stream(&mut body).await, b"abcd");
        assert_eq!(resent(&copy).as_deref(), Some(&b"abcd"[..]));
        // Trailers are kept too: a resend without them would be another
        // request.
        let steps = vec![data("ab"), trailers(&[("x-t", "1")])];
        let (mut body, copy) = tee(TestBody::steps(steps, None), 4, None);
        stream(&mut body).await;
        let kept = resent(&copy).unwrap();
        assert_eq!(&kept.data[..], b"ab");
        let t = kept.trailers.expect("the trailers kept");
        assert_eq!(t.get("x-t").unwrap(), "1");
    }

    #[tokio::test]
    async fn a_single_frame_is_kept_without_a_copy() {
        let frame = Bytes::from_static(b"whole");
        let (mut body, copy) = tee(TestBody::from(frame.clone()), 16, None);
        stream(&mut body).await;
        let kept = resent(&copy).unwrap();
        assert_eq!(kept.as_ptr(), frame.as_ptr());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_streamed_but_not_kept() {
        let (mut body, copy) = tee(
            TestBody::steps(vec![data("abc"), data("de")], None),
            4,
            None,
        );
        assert_eq!(
            stream(&mut body).await,
            b"abcde",
            "all of it still goes out"
        );
        assert!(matches!(copy.resend(), Resend::TooLarge));
    }

    #[tokio::test]
    async fn a_body_not_yet_streamed_to_its_end_is_incomplete() {
        let (mut body, copy) = tee(
            TestBody::steps(vec![data("ab"), data("cd")], None),
            64,
            None,
        );
        let _ = body.frame().await;
        assert!(matches!(copy.resend(), Resend::Incomplete));
        let (mut body, copy) = tee(
            TestBody::steps(vec![data("ab"), Err("x".into())], None),
            64,
            None,
        );
        let _ = body.frame().await;
        assert!(body.frame().await.unwrap().is_err());
        assert!(matches!(copy.resend(), Resend::Incomplete));
    }

    #[tokio::test]
    async fn the_end_is_noted_with_the_last_frame_without_polling_again() {
        // A sender stops polling once the body says it has ended.
        let (mut body, copy) = tee(
            TestBody::steps(vec![data("ab"), data("cd")], None),
            64,
            None,
        );
        let _ = body.frame().await;
        let _ = body.frame().await;
        assert!(body.is_end_stream());
        assert_eq!(resent(&copy).as_deref(), Some(&b"abcd"[..]));
    }
}
