//! What the outbound reads from a peer's responses before it signs:
//! `WWW-Authenticate` (is this a StepUp challenge?) and `Accept-Signature`
//! (the challenge), then the signer's own checks.
//!
//! Input: the first line is a `WWW-Authenticate` value, the rest an
//! `Accept-Signature` value (`\r` separates field lines).
//!
//! Invariants: no panic; a challenge the signer accepts names this
//! workload's key, algorithm and the stepup-v1 tag and component set, so
//! the signer never signs for a key or profile that is not its own.
#![no_main]

use std::sync::OnceLock;

use http::header::{HeaderValue, WWW_AUTHENTICATE};
use http::{HeaderMap, StatusCode};
use keyproof_fuzz::stepup::World;
use keyproof_stepup::{headers, is_stepup_challenge, Challenge};
use libfuzzer_sys::fuzz_target;

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(World::new)
}

fuzz_target!(|data: &[u8]| {
    let (www, accept) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let mut map = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(www) {
        map.append(WWW_AUTHENTICATE, v);
    }
    for line in accept.split(|b| *b == b'\r') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            map.append(headers::ACCEPT_SIGNATURE, v);
        }
    }
    let challenged = is_stepup_challenge(StatusCode::UNAUTHORIZED, &map);
    assert!(!is_stepup_challenge(StatusCode::OK, &map));
    if challenged {
        let v = map[WWW_AUTHENTICATE].as_bytes();
        assert!(v.len() >= 6 && v[..6].eq_ignore_ascii_case(b"stepup"));
    }
    if let Ok(s) = std::str::from_utf8(accept) {
        let _ = Challenge::parse(s);
    }
    let Ok(Some(ch)) = Challenge::from_headers(&map) else {
        return;
    };
    let w = world();
    if w.signer.check(&ch).is_ok() {
        assert_eq!(ch.tag, keyproof_stepup::TAG);
        assert_eq!(ch.keyid, w.signer.keyid());
        assert_eq!(ch.alg, w.signer.alg().name());
        let mut names: Vec<&str> = ch.components.iter().map(String::as_str).collect();
        names.sort_unstable();
        let mut with = [
            "@authority",
            "@method",
            "@path",
            "@query",
            "content-digest",
            "content-type",
            "stepup-binding",
        ]
        .to_vec();
        let without: Vec<&str> = with
            .iter()
            .copied()
            .filter(|n| *n != "content-type")
            .collect();
        with.sort_unstable();
        assert!(
            names == with || names == without,
            "signed for components {names:?}"
        );
    }
});
