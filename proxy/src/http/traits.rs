//! What the clients and servers in `http/` ask of the bodies they carry.
//! They are generic over these rather than naming `ProxyBody`, which is
//! built from their own body types (`body.rs`): that keeps the dependencies
//! pointing one way.

use bytes::Bytes;
use http_body::Body;

use crate::error::BoxError;

/// A request body a client sends (to the app or on a mesh stream): bytes,
/// movable into the task that pumps what is still to come.
pub trait SendBody:
    Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + Unpin + 'static
{
}

impl<B> SendBody for B where
    B: Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + Unpin + 'static
{
}

/// A response body the HTTP/1.1 server writes: bytes, and constructible from
/// bytes for the answers the server makes itself (400, 408, 431).
pub trait ResponseBody: Body<Data = Bytes, Error: std::fmt::Display> + From<Bytes> {}

impl<B: Body<Data = Bytes, Error: std::fmt::Display> + From<Bytes>> ResponseBody for B {}

/// A body for the tests of the clients and servers here: frames fed
/// through a channel, so that a test decides when each arrives, whether
/// the body fails, stalls or ends, and what size it claims.
#[cfg(test)]
pub(crate) mod test_body {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http::HeaderMap;
    use http_body::{Body, Frame, SizeHint};
    use tokio::sync::mpsc;

    use crate::error::BoxError;

    /// One step of a test body.
    pub(crate) type Step = Result<Frame<Bytes>, String>;

    /// The feeding end of a [`TestBody`]: dropping it ends the body.
    pub(crate) type Feed = mpsc::UnboundedSender<Step>;

    /// A body whose frames come from a channel.
    #[derive(Debug)]
    pub(crate) struct TestBody {
        rx: mpsc::UnboundedReceiver<Step>,
        /// Kept to make the body wait for ever after its frames.
        keep: Option<Feed>,
        hint: Option<u64>,
        /// Set when the body is dropped.
        pub(crate) dropped: Arc<AtomicBool>,
    }

    impl TestBody {
        /// A body fed through the returned sender; `hint`: the exact size
        /// it claims.
        pub(crate) fn channel(hint: Option<u64>) -> (Feed, TestBody) {
            let (tx, rx) = mpsc::unbounded_channel();
            let body = TestBody {
                rx,
                keep: None,
                hint,
                dropped: Arc::default(),
            };
            (tx, body)
        }

        /// A body of `steps` that then ends.
        pub(crate) fn steps(steps: Vec<Step>, hint: Option<u64>) -> TestBody {
            let (tx, body) = TestBody::channel(hint);
            for s in steps {
                tx.send(s).expect("receiver alive");
            }
            body
        }

        /// A body of `data` frames that then waits for ever.
        pub(crate) fn stalling(data: &[&'static str], hint: Option<u64>) -> TestBody {
            let (tx, mut body) = TestBody::channel(hint);
            for d in data {
                tx.send(Ok(Frame::data(Bytes::from_static(d.as_bytes()))))
                    .expect("receiver alive");
            }
            body.keep = Some(tx);
            body
        }
    }

    /// A data step.
    pub(crate) fn data(d: &'static str) -> Step {
        Ok(Frame::data(Bytes::from_static(d.as_bytes())))
    }

    /// A trailers step.
    pub(crate) fn trailers(fields: &[(&'static str, &'static str)]) -> Step {
        let mut t = HeaderMap::new();
        for (k, v) in fields {
            t.append(*k, http::HeaderValue::from_static(v));
        }
        Ok(Frame::trailers(t))
    }

    impl From<Bytes> for TestBody {
        fn from(b: Bytes) -> TestBody {
            let len = b.len() as u64;
            TestBody::steps(vec![Ok(Frame::data(b))], Some(len))
        }
    }

    impl Drop for TestBody {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::Relaxed);
        }
    }

    impl Body for TestBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.rx
                .poll_recv(cx)
                .map(|s| s.map(|r| r.map_err(BoxError::from)))
        }

        fn is_end_stream(&self) -> bool {
            self.keep.is_none() && self.rx.is_empty() && self.rx.is_closed()
        }

        fn size_hint(&self) -> SizeHint {
            self.hint
                .map_or_else(SizeHint::default, SizeHint::with_exact)
        }
    }
}
