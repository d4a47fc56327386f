//! Reading a request body with a bound: buffering one whose digest must be
//! checked or signed, and draining one that is being refused so the client
//! has sent it before the answer (answering mid-upload makes HTTP/1 clients
//! fail with a broken pipe instead of showing the refusal).

use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;

/// Upper bound on the time spent draining a body that will be refused: long
/// enough for `max_body` on a slow link, short enough that a trickling
/// caller cannot hold a task for long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a body could not be buffered.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// More than the limit.
    TooLarge,
    /// The peer's stream failed.
    Body(String),
}

/// Reads a whole body, refusing more than `limit` bytes. Request trailers
/// are dropped (HTTP/1 clients never send them; gRPC sends none on requests).
pub(crate) async fn read_limited<B>(body: &mut B, limit: usize) -> Result<Bytes, ReadError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut first: Option<Bytes> = None;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Body(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
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
    Ok(match first {
        Some(f) => f,
        None => Bytes::from(buf),
    })
}

/// Reads and drops up to `limit` more bytes of a body that is being
/// refused, within [`DRAIN_TIMEOUT`]. A larger body is cut off: the
/// connection then closes, which bounds what a caller can make us read.
pub(crate) async fn drain<B>(body: &mut B, limit: usize)
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.is_end_stream() {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
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
