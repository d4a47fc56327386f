//! Reading a request body with a bound: buffering one whose digest must be
//! checked or signed, and draining one that is being refused so the client
//! has sent it before the answer. Answering mid-upload makes HTTP/2 reset
//! the stream and HTTP/1 clients fail with a broken pipe, which many report
//! as a transport error instead of showing the refusal.

use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

/// How long a step-up refusal drains a body of up to `max_body`: long
/// enough for that on a slow link, short enough that a trickling caller
/// cannot hold a task for long.
pub const STEPUP_DRAIN: Duration = Duration::from_secs(5);

/// What a refusal made before any body was wanted (403, a bad path) drains:
/// a small body, briefly, so that it costs nothing to abuse.
pub const REFUSAL_DRAIN: (usize, Duration) = (64 * 1024, Duration::from_millis(500));

/// Why a body could not be buffered.
#[derive(Debug)]
pub enum ReadError {
    /// More than the limit.
    TooLarge,
    /// The peer's stream failed.
    Body(String),
    /// Nothing came for this long (`body_timeout`).
    Stalled(Duration),
}

/// A body read whole: its content, and the trailer section that ended it
/// (rare on requests: HTTP/1.1 chunked trailers, HTTP/2 trailing
/// HEADERS), kept so that the body goes on, or again, as it came.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Whole {
    /// The content.
    pub data: Bytes,
    /// The trailer section, if the body had one.
    pub trailers: Option<http::HeaderMap>,
}

impl Whole {
    /// A body of `data` and no trailers.
    pub fn data(data: Bytes) -> Whole {
        Whole {
            data,
            trailers: None,
        }
    }
}

impl std::ops::Deref for Whole {
    type Target = [u8];

    /// The content (what a signature's `Content-Digest` covers).
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

/// Reads a whole body, refusing more than `limit` bytes of content, and
/// giving up when nothing comes for `stall` (when given). Its trailers are
/// kept.
pub async fn read_limited<B>(
    body: &mut B,
    limit: usize,
    stall: Option<Duration>,
) -> Result<Whole, ReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut buf: Vec<u8> = Vec::new();
    let mut trailers = None;
    loop {
        let frame = match stall {
            None => body.frame().await,
            // The clock is read only when the body has nothing ready.
            Some(d) => {
                let ready = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(std::pin::Pin::new(&mut *body).poll_frame(cx))
                })
                .await;
                match ready {
                    std::task::Poll::Ready(f) => f,
                    std::task::Poll::Pending => tokio::time::timeout(d, body.frame())
                        .await
                        .map_err(|_| ReadError::Stalled(d))?,
                }
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| ReadError::Body(e.to_string()))?;
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
                continue;
            }
        };
        let have = first.as_ref().map_or(0, Bytes::len) + buf.len();
        if have + data.len() > limit {
            return Err(ReadError::TooLarge);
        }
        // A single-frame body (the common case) is kept without a copy.
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            Some(f) => {
                buf.reserve(f.len() + data.len());
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
    }
    let data = match first {
        Some(f) => f,
        None => Bytes::from(buf),
    };
    Ok(Whole { data, trailers })
}

/// Reads and drops up to `limit` more bytes of a body that is being
/// refused, for at most `within`. A larger or slower body is cut off: the
/// connection then closes, which bounds what a caller can make us read.
pub async fn drain<B>(body: &mut B, limit: usize, within: Duration)
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.is_end_stream() {
        return;
    }
    let _ = tokio::time::timeout(within, async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                seen = seen.saturating_add(d.len());
                if seen > limit {
                    break;
                }
            }
        }
    })
    .await;
}

#[cfg(test)]
mod stall_tests {
    use super::*;
    use crate::http::traits::test_body::TestBody;

    #[tokio::test]
    async fn a_body_that_stops_coming_is_given_up_after_the_stall_bound() {
        let mut body = TestBody::stalling(&["0123456789"], None);
        let stall = Duration::from_millis(100);
        let start = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            read_limited(&mut body, 1024, Some(stall)),
        )
        .await
        .expect("read_limited waited on a stalled body past its bound");
        assert!(matches!(r, Err(ReadError::Stalled(d)) if d == stall));
        assert!(start.elapsed() >= stall);
    }

    #[tokio::test]
    async fn a_whole_body_is_read_without_the_stall_bound_mattering() {
        let mut body = http_body_util::Full::new(Bytes::from_static(b"abc"));
        let r = read_limited(&mut body, 1024, Some(Duration::from_millis(1))).await;
        assert_eq!(r.ok().as_deref(), Some(&b"abc"[..]));
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::http::traits::test_body::{data, trailers, TestBody};

    /// How many frames `body` still has ready.
    fn frames_left(body: &mut TestBody) -> usize {
        let mut cx = Context::from_waker(Waker::noop());
        let mut n = 0;
        while let Poll::Ready(Some(_)) = std::pin::Pin::new(&mut *body).poll_frame(&mut cx) {
            n += 1;
        }
        n
    }

    #[tokio::test]
    async fn a_body_announced_larger_than_the_limit_is_refused_unread() {
        let mut body = TestBody::steps(vec![data("0123456789")], Some(10));
        let r = read_limited(&mut body, 5, None).await;
        assert!(matches!(r, Err(ReadError::TooLarge)));
        assert_eq!(frames_left(&mut body), 1, "nothing was read");
    }

    #[tokio::test]
    async fn a_body_larger_than_the_limit_is_refused_once_its_data_says_so() {
        let mut body = TestBody::steps(vec![data("abc"), data("def")], None);
        let r = read_limited(&mut body, 5, None).await;
        assert!(matches!(r, Err(ReadError::TooLarge)));
        let mut body = TestBody::steps(vec![data("abc"), data("de")], None);
        let r = read_limited(&mut body, 5, None).await;
        assert_eq!(
            r.ok().as_deref(),
            Some(&b"abcde"[..]),
            "the limit itself fits"
        );
    }

    #[tokio::test]
    async fn frames_are_joined_and_trailers_kept() {
        let steps = vec![
            data("ab"),
            data("cd"),
            data("ef"),
            trailers(&[("x-t", "1")]),
        ];
        let mut body = TestBody::steps(steps, None);
        let r = read_limited(&mut body, 64, None).await.ok().unwrap();
        assert_eq!(&r[..], b"abcdef");
        assert_eq!(r.trailers.unwrap().get("x-t").unwrap(), "1");
        // As a body again: the content, then the trailers.
        let whole = Whole {
            data: Bytes::from_static(b"ab"),
            trailers: Some(http::HeaderMap::from_iter([(
                http::HeaderName::from_static("x-t"),
                http::HeaderValue::from_static("1"),
            )])),
        };
        let mut again = crate::http::body::ProxyBody::from(whole.clone());
        assert_eq!(again.size_hint().exact(), None, "chunked in HTTP/1.1");
        assert_eq!(read_limited(&mut again, 64, None).await.ok(), Some(whole));
        assert!(again.is_end_stream());
        // One frame: the same bytes, not a copy.
        let frame = Bytes::from_static(b"one");
        let mut body = TestBody::from(frame.clone());
        let r = read_limited(&mut body, 64, None).await.ok().unwrap();
        assert_eq!(r.as_ptr(), frame.as_ptr());
    }

    #[tokio::test]
    async fn a_body_that_fails_is_a_body_error() {
        let mut body = TestBody::steps(vec![data("ab"), Err("broken".into())], None);
        let r = read_limited(&mut body, 64, None).await;
        assert!(
            matches!(&r, Err(ReadError::Body(m)) if m.contains("broken")),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn drain_stops_past_its_limit() {
        let steps = (0..10).map(|_| data("abcd")).collect();
        let mut body = TestBody::steps(steps, None);
        drain(&mut body, 10, Duration::from_secs(1)).await;
        // 12 bytes seen is past 10: three frames read, seven left.
        assert_eq!(frames_left(&mut body), 7);
        let steps = (0..2).map(|_| data("abcd")).collect();
        let mut body = TestBody::steps(steps, None);
        drain(&mut body, 10, Duration::from_secs(1)).await;
        assert!(
            body.is_end_stream(),
            "a body within the limit is read to its end"
        );
    }

    #[tokio::test]
    async fn drain_stops_at_its_time_bound() {
        let mut body = TestBody::stalling(&["ab"], None);
        let within = Duration::from_millis(50);
        let start = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(1), drain(&mut body, 1 << 20, within))
            .await
            .expect("drain waited past its bound");
        assert!(start.elapsed() >= within);
    }
}
