//! The inbound verifier on whatever a caller sends: `Signature-Input`,
//! `Signature`, `Content-Digest`, `Stepup-Binding`, `Content-Type`, the
//! authority, target, method and body.
//!
//! Two input shapes, chosen by the first byte:
//! * even: raw. Lines separated by `\n`: signature-input, signature,
//!   content-digest, stepup-binding, content-type (empty: none), host,
//!   request target, method; the rest is the body. `\r` inside a line
//!   splits it into several field lines of that field.
//! * odd: signed. A genuine signed request (the fixed workload key, a nonce
//!   sealed with the verifier's key, so steps 1 to 9 pass), then edits from
//!   the rest of the input, three bytes each: which part (one of the four
//!   step-up fields, the path or the body), where, and the new byte (0
//!   deletes). This reaches the signature checks that random bytes never
//!   would.
//!
//! Invariants: no panic; no request verifies (`Ok`) unless its nonce was
//! issued by this verifier and is still outstanding, and none is here; an
//! unedited signed request passes every check but the single-use one
//! (`Replay`); the verdict is deterministic.
#![no_main]

use std::sync::OnceLock;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use keyproof_fuzz::stepup::{World, EXPORTER, NOW, ROUTE};
use keyproof_stepup::{headers, Challenge, Component, Outcome, RequestView};
use libfuzzer_sys::fuzz_target;

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(World::new)
}

fn add(map: &mut HeaderMap, name: HeaderName, line: &[u8]) {
    for v in line.split(|b| *b == b'\r').filter(|v| !v.is_empty()) {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            map.append(name.clone(), v);
        }
    }
}

/// A request: method, target, fields, body.
type Req = (Method, Uri, HeaderMap, Vec<u8>);

fn raw(data: &[u8]) -> Option<Req> {
    let mut parts = data.splitn(9, |b| *b == b'\n');
    let mut next = || parts.next().unwrap_or(b"");
    let mut map = HeaderMap::new();
    add(&mut map, headers::SIGNATURE_INPUT, next());
    add(&mut map, headers::SIGNATURE, next());
    add(&mut map, headers::CONTENT_DIGEST, next());
    add(&mut map, headers::STEPUP_BINDING, next());
    add(&mut map, http::header::CONTENT_TYPE, next());
    add(&mut map, http::header::HOST, next());
    let uri = Uri::try_from(next()).ok()?;
    let method = match next() {
        b"" => Method::POST,
        m => Method::from_bytes(m).ok()?,
    };
    Some((method, uri, map, next().to_vec()))
}

fn signed(with_content_type: bool, edits: &[u8]) -> Option<Req> {
    let w = world();
    let method = Method::POST;
    let mut path = b"/admin/x?y=1".to_vec();
    let mut body = b"{\"op\":1}".to_vec();
    let mut map = HeaderMap::new();
    if with_content_type {
        map.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let nonce = w.nonce_key.seal(
        &[3; 16],
        (NOW + 20) as u32,
        w.peer.key().spki_sha256(),
        ROUTE,
    );
    let names: Vec<String> = Component::required(with_content_type)
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let challenge = Challenge {
        components: names,
        nonce,
        alg: w.signer.alg().name().to_owned(),
        keyid: w.signer.keyid().to_owned(),
        tag: keyproof_stepup::TAG.to_owned(),
    };
    let uri = Uri::from_static("https://svc.local/admin/x?y=1");
    let view = RequestView::new(&method, &uri, &map);
    let sig = w
        .signer
        .sign(&challenge, &view, &body, &EXPORTER, NOW)
        .ok()?;
    sig.apply(&mut map);
    let names = [
        headers::SIGNATURE_INPUT,
        headers::SIGNATURE,
        headers::CONTENT_DIGEST,
        headers::STEPUP_BINDING,
    ];
    for e in edits.chunks_exact(3) {
        let edit = |v: &mut Vec<u8>| {
            if v.is_empty() {
                return;
            }
            let at = usize::from(e[1]) % v.len();
            match e[2] {
                0 => {
                    v.remove(at);
                }
                b => v[at] = b,
            }
        };
        match e[0] % 6 {
            4 => edit(&mut path),
            5 => edit(&mut body),
            i => {
                let name = &names[usize::from(i)];
                let mut v = map
                    .get(name)
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                edit(&mut v);
                map.insert(name.clone(), HeaderValue::from_bytes(&v).ok()?);
            }
        }
    }
    let mut target = b"https://svc.local".to_vec();
    target.extend_from_slice(&path);
    let uri = Uri::try_from(target).ok()?;
    Some((method, uri, map, body))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let req = if mode & 1 == 0 {
        raw(rest)
    } else {
        signed(mode & 2 != 0, rest)
    };
    let Some((method, uri, map, body)) = req else {
        return;
    };
    let w = world();
    let view = RequestView::new(&method, &uri, &map);
    let first = w.verifier.verify(&w.peer, ROUTE, &view, &body, NOW);
    assert_ne!(
        first,
        Outcome::Ok,
        "a request without an issued nonce verified"
    );
    if mode & 1 == 1 && rest.len() < 3 {
        assert_eq!(
            first,
            Outcome::Replay,
            "a genuine signed request failed early"
        );
    }
    let again = w.verifier.verify(&w.peer, ROUTE, &view, &body, NOW);
    assert_eq!(first, again);
});
