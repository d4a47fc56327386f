//! The request-path normalizer, in both modes, on arbitrary bytes.
//!
//! Invariants: no panic; an accepted path is ASCII, starts with `/`, has no
//! dot segment, no encoded `/` or `\`, no `;`, no raw `\`, no encoded
//! unreserved character and no lower-case hex (so no reader can resolve it
//! to another path than the one the policy matched); strict mode leaves no
//! `//`; and normalizing an accepted result again changes nothing (the
//! normalizer is idempotent, so the peer inbound sees what the outbound
//! signed).
#![no_main]

use keyproof_proxy::http::path::{match_form, normalize, normalize_bytes, Mode};
use libfuzzer_sys::fuzz_target;

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn check(input: &[u8], out: &str, mode: Mode) {
    let b = out.as_bytes();
    let show = || format!("{:?} -> {out:?} ({mode:?})", String::from_utf8_lossy(input));
    assert!(out.is_ascii(), "non-ASCII result: {}", show());
    assert!(b.first() == Some(&b'/'), "not absolute: {}", show());
    assert!(
        !out.contains('\\') && !out.contains(';'),
        "separator: {}",
        show()
    );
    for seg in out.split('/') {
        assert!(seg != "." && seg != "..", "dot segment left: {}", show());
    }
    if mode == Mode::Strict {
        assert!(!out.contains("//"), "'//' left in strict mode: {}", show());
    }
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (h, l) = (b.get(i + 1).copied(), b.get(i + 2).copied());
            let (Some(h), Some(l)) = (h, l) else {
                panic!("truncated escape: {}", show());
            };
            assert!(
                !h.is_ascii_lowercase() && !l.is_ascii_lowercase(),
                "lower-case hex: {}",
                show()
            );
            let v = hex(h).zip(hex(l)).map(|(h, l)| h << 4 | l);
            let Some(v) = v else {
                panic!("invalid escape kept: {}", show());
            };
            assert!(!is_unreserved(v), "unreserved left encoded: {}", show());
            assert!(
                v != b'/' && v != b'\\' && v >= 0x20 && v != 0x7f,
                "encoded separator or control: {}",
                show()
            );
            i += 3;
        } else {
            i += 1;
        }
    }
    match normalize(out, mode) {
        Ok(again) => assert_eq!(again, out, "not idempotent: {}", show()),
        Err(e) => panic!("result refused on a second pass ({e}): {}", show()),
    }
    // What route matching sees is itself a normal strict path.
    let matched = match_form(out, mode);
    assert!(!matched.contains("//"), "match form keeps '//': {}", show());
}

fuzz_target!(|data: &[u8]| {
    for mode in [Mode::Strict, Mode::KeepSlashes] {
        if let Ok(out) = normalize_bytes(data, mode) {
            check(data, &out, mode);
        }
    }
});
