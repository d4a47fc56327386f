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
}
