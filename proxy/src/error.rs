//! Error helpers every part of the proxy shares. Each module defines its own
//! error enum (what went wrong there, with a `Display` that names it); this
//! module holds only what they have in common.

/// A boxed error from a body or a connection, as hyper and h2 hand them out.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The innermost error's message: what actually went wrong, for a 502 body
/// or a log line, without the layers of "connection error" around it.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Whether `e`, or an error it wraps, says a peer's message was malformed
/// (a chunked body HTTP/1.1 could not read, say), rather than that a
/// connection failed: the former is the sender's fault (400), the latter a
/// 502. hyper and rustls say so with these I/O error kinds.
pub fn is_malformed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<crate::http::h1::H1Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            ) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// "At most once every N seconds", lock-free: for a log line that would
/// otherwise repeat once per connection during an outage (or any other
/// reaction to one).
#[derive(Debug)]
pub struct LogEvery {
    secs: u64,
    last: std::sync::atomic::AtomicU64,
}

impl LogEvery {
    /// A throttle of `secs` seconds.
    pub const fn new(secs: u64) -> LogEvery {
        LogEvery {
            secs,
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether to log now (and if so, not again for `secs`).
    pub fn due(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Relaxed);
        now >= last.saturating_add(self.secs)
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_innermost_message_is_reported() {
        let e = Outer(std::io::Error::other("connection reset"));
        assert_eq!(root_cause(&e), "connection reset");
        assert_eq!(root_cause(&std::io::Error::other("alone")), "alone");
    }

    #[test]
    fn malformed_messages_are_told_from_failed_connections() {
        let bad = Outer(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "invalid chunk size line",
        ));
        assert!(is_malformed(&bad));
        assert!(is_malformed(&crate::http::h1::H1Error::Chunk));
        let reset = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(!is_malformed(&reset));
        assert!(!is_malformed(&std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof
        )));
    }
}
