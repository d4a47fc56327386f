//! Request heads as the outbound's HTTP/1.1 server reads them from the app.
//!
//! Invariants: no panic; every strict prefix of a head that parses is
//! "need more" (the outcome never depends on how TCP splits the head);
//! framing is never until-close, a chunked request has no Content-Length
//! left and a sized one only agreeing values; and the head written back
//! to the wire parses to the same parts.
#![no_main]

use bytes::BytesMut;
use keyproof_fuzz::fields;
use keyproof_proxy::http::h1::{parse_request_head, Framing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, wire)) = data.split_first() else {
        return;
    };
    // A small limit now and then, to reach the too-large paths.
    let max = if ctl & 0x80 != 0 {
        64 + usize::from(ctl & 0x7f) * 8
    } else {
        64 * 1024
    };
    let mut buf = BytesMut::from(wire);
    let Ok(Some(head)) = parse_request_head(&mut buf, max) else {
        return;
    };
    let consumed = wire.len() - buf.len();
    for cut in [consumed - 1, usize::from(ctl) % consumed] {
        let mut part = BytesMut::from(&wire[..cut]);
        assert!(
            matches!(parse_request_head(&mut part, max), Ok(None)),
            "a prefix of {cut} bytes of a {consumed}-byte head is not 'need more'"
        );
    }
    assert_ne!(head.framing, Framing::UntilClose);
    let cl = head.parts.headers.get_all(http::header::CONTENT_LENGTH);
    match head.framing {
        Framing::Chunked => assert!(cl.iter().next().is_none(), "chunked with a length"),
        Framing::Length(n) => {
            for v in cl {
                for item in v.as_bytes().split(|b| *b == b',') {
                    let s = std::str::from_utf8(item.trim_ascii()).unwrap();
                    assert_eq!(s.parse::<u64>().ok(), Some(n), "disagreeing lengths");
                }
            }
        }
        _ => {}
    }
    assert!(!head
        .parts
        .headers
        .contains_key(http::header::TRANSFER_ENCODING));
    // RFC 9112 section 2.2: a bare CR is invalid.
    let raw = &wire[..consumed];
    assert!(
        !raw.iter()
            .enumerate()
            .any(|(i, b)| *b == b'\r' && raw.get(i + 1) != Some(&b'\n')),
        "bare CR accepted"
    );

    let again = keyproof_fuzz::write_request(&head);
    let mut again_buf = again.clone();
    let re = match parse_request_head(&mut again_buf, usize::MAX) {
        Ok(Some(re)) => re,
        other => panic!("written back {again:?}: {other:?}"),
    };
    assert!(again_buf.is_empty());
    assert_eq!(re.parts.method, head.parts.method);
    assert_eq!(re.parts.uri, head.parts.uri);
    assert_eq!(re.parts.version, head.parts.version);
    assert_eq!(fields(&re.parts.headers), fields(&head.parts.headers));
    assert_eq!(re.framing, head.framing);
    assert_eq!(re.keep_alive, head.keep_alive);
    assert_eq!(re.expect_continue, head.expect_continue);
});
