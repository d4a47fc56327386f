//! Response heads as the inbound's client reads them from the app.
//!
//! Invariants: no panic; every strict prefix of a head that parses is
//! "need more"; bodyless answers (HEAD, 204, 304) are empty; no hop-by-hop
//! field survives; a chunked response keeps no Content-Length; and the head
//! written back parses to the same status, fields, framing and persistence.
#![no_main]

use bytes::BytesMut;
use keyproof_fuzz::{bodyless, fields, method_for, HOP_BY_HOP};
use keyproof_proxy::http::h1::{parse_response_head, Framing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, wire)) = data.split_first() else {
        return;
    };
    let method = method_for(ctl);
    let max = if ctl & 0x80 != 0 {
        64 + usize::from(ctl & 0x7c) * 8
    } else {
        64 * 1024
    };
    let mut buf = BytesMut::from(wire);
    let Ok(Some(head)) = parse_response_head(&mut buf, &method, max) else {
        return;
    };
    let consumed = wire.len() - buf.len();
    for cut in [consumed - 1, usize::from(ctl) % consumed] {
        let mut part = BytesMut::from(&wire[..cut]);
        assert!(
            matches!(parse_response_head(&mut part, &method, max), Ok(None)),
            "a prefix of {cut} bytes of a {consumed}-byte head is not 'need more'"
        );
    }
    let status = head.parts.status;
    assert!(!status.is_informational());
    if bodyless(&method, status) {
        assert_eq!(head.framing, Framing::Empty);
    }
    for h in HOP_BY_HOP {
        assert!(!head.parts.headers.contains_key(h), "{h} kept");
    }
    if head.framing == Framing::Chunked {
        assert!(!head
            .parts
            .headers
            .contains_key(http::header::CONTENT_LENGTH));
    }
    if head.framing == Framing::UntilClose {
        assert!(!head.keep_alive);
    }
    let raw = &wire[..consumed];
    // RFC 9112 section 6.1: an HTTP/1.0 message with a transfer coding has
    // faulty framing, and the connection closes after it.
    // The field name whole, up to its colon: `Transfer-Encodingg` is
    // another field.
    let te = raw
        .windows(19)
        .any(|w| w.eq_ignore_ascii_case(b"\ntransfer-encoding:"));
    if te && head.parts.version == http::Version::HTTP_10 {
        assert!(
            !head.keep_alive,
            "HTTP/1.0 with a transfer coding kept alive"
        );
    }
    // RFC 9112 section 2.2: a bare CR is invalid.
    assert!(
        !raw.iter()
            .enumerate()
            .any(|(i, b)| *b == b'\r' && raw.get(i + 1) != Some(&b'\n')),
        "bare CR accepted"
    );

    // Writing back may add two fields (framing, connection): past the
    // parser's field count limit that is a different head.
    if head.parts.headers.len() + 2 > keyproof_fuzz::MAX_TRAILER_FIELDS {
        return;
    }
    let again = keyproof_fuzz::write_response(&head);
    let mut again_buf = again.clone();
    let re = match parse_response_head(&mut again_buf, &method, usize::MAX) {
        Ok(Some(re)) => re,
        other => panic!("written back {again:?}: {other:?}"),
    };
    assert!(again_buf.is_empty());
    assert_eq!(re.parts.status, status);
    assert_eq!(re.parts.version, head.parts.version);
    assert_eq!(fields(&re.parts.headers), fields(&head.parts.headers));
    assert_eq!(re.framing, head.framing);
    assert_eq!(re.keep_alive, head.keep_alive);
});
