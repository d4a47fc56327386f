//! Signer and verifier against each other on requests the fuzzer shapes
//! (method, authority, path, query, content type, body): the challenge the
//! verifier issues goes through the outbound's parsing, the signer signs,
//! and the verifier checks.
//!
//! Invariants: a request signed as challenged verifies; the same signed
//! request a second time is a replay; and a signed request changed in any
//! signed part (method, authority, path, query, content type, body, or sent
//! on another connection, route or time) never verifies.
#![no_main]

use std::sync::OnceLock;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, StatusCode, Uri};
use keyproof_fuzz::stepup::{World, EXPORTER, NOW, ROUTE};
use keyproof_stepup::{is_stepup_challenge, Challenge, Outcome, Peer, PeerKey, RequestView};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(World::new)
}

struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Req {
    fn view(&self) -> RequestView<'_> {
        RequestView::new(&self.method, &self.uri, &self.headers)
    }
}

fn text<'a>(u: &mut Unstructured<'a>, max: usize) -> Result<String> {
    let len = u.int_in_range(0..=max)?;
    let raw = u.bytes(len.min(u.len()))?;
    Ok(raw.iter().map(|b| char::from(0x21 + b % 0x5e)).collect())
}

fn request(u: &mut Unstructured<'_>) -> Result<Option<Req>> {
    let method = match u.int_in_range(0..=4u8)? {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::PUT,
        3 => Method::DELETE,
        _ => match Method::from_bytes(text(u, 12)?.as_bytes()) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        },
    };
    let authority = text(u, 40)?;
    let path = format!("/{}", text(u, 60)?);
    let query = if u.arbitrary()? {
        Some(text(u, 40)?)
    } else {
        None
    };
    let pq = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let Ok(uri) = Uri::builder()
        .scheme("https")
        .authority(authority.as_str())
        .path_and_query(pq.as_str())
        .build()
    else {
        return Ok(None);
    };
    let mut headers = HeaderMap::new();
    if u.arbitrary()? {
        match HeaderValue::from_str(&text(u, 30)?) {
            Ok(v) => headers.insert(CONTENT_TYPE, v),
            Err(_) => return Ok(None),
        };
    }
    let body = u.bytes(u.len())?.to_vec();
    Ok(Some(Req {
        method,
        uri,
        headers,
        body,
    }))
}

/// Signs `req` for a fresh challenge; `None` when it has nothing to sign
/// with (no authority).
fn sign(w: &World, req: &Req) -> Option<HeaderMap> {
    let has_ct = req.headers.contains_key(CONTENT_TYPE);
    let issued = w
        .verifier
        .challenge(&w.peer, ROUTE, has_ct, None, NOW)
        .expect("nonce table has room");
    let mut resp = HeaderMap::new();
    issued.apply_challenge(&mut resp);
    assert!(is_stepup_challenge(StatusCode::UNAUTHORIZED, &resp));
    let ch = Challenge::from_headers(&resp)
        .expect("own challenge parses")
        .expect("own challenge is stepup");
    w.signer.check(&ch).expect("own challenge fits own key");
    let signed = w
        .signer
        .sign(&ch, &req.view(), &req.body, &EXPORTER, NOW)
        .ok()?;
    let mut headers = req.headers.clone();
    signed.apply(&mut headers);
    Some(headers)
}

fn tampered(w: &World, req: &Req, how: u8) -> Outcome {
    let mut t = Req {
        method: req.method.clone(),
        uri: req.uri.clone(),
        headers: req.headers.clone(),
        body: req.body.clone(),
    };
    let mut peer = &w.peer;
    let other_conn;
    let (mut route, mut now) = (ROUTE, NOW);
    let (a, path, query) = (
        req.uri.authority().map_or("", |a| a.as_str()),
        req.uri.path(),
        req.uri.query(),
    );
    let rebuild = |a: &str, path: &str, query: Option<&str>| {
        let q = query.map(|q| format!("?{q}")).unwrap_or_default();
        format!("https://{a}{path}{q}").parse::<Uri>()
    };
    match how % 9 {
        0 => t.body.push(b'!'),
        1 => {
            t.method = if t.method == Method::PUT {
                Method::POST
            } else {
                Method::PUT
            }
        }
        2 => match rebuild(&format!("t{a}"), path, query) {
            Ok(u) => t.uri = u,
            Err(_) => return Outcome::Malformed,
        },
        3 => match rebuild(a, &format!("{path}x"), query) {
            Ok(u) => t.uri = u,
            Err(_) => return Outcome::Malformed,
        },
        4 => {
            // No query and an empty one both sign `@query` as "?".
            let q = match query {
                None | Some("") => "t".to_owned(),
                Some(q) => format!("{q}&t"),
            };
            match rebuild(a, path, Some(&q)) {
                Ok(u) => t.uri = u,
                Err(_) => return Outcome::Malformed,
            }
        }
        5 => {
            if t.headers.remove(CONTENT_TYPE).is_none() {
                t.headers
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
        }
        6 => {
            other_conn = Peer::new(
                PeerKey::from_spki_der(&keyproof_fuzz::stepup::spki()).expect("fixed spki"),
                Some([8; 32]),
            );
            peer = &other_conn;
        }
        7 => route = "route-1",
        _ => now = NOW + 3600,
    }
    w.verifier.verify(peer, route, &t.view(), &t.body, now)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(how) = u.arbitrary::<u8>() else {
        return;
    };
    let Ok(Some(mut req)) = request(&mut u) else {
        return;
    };
    let w = world();
    if let Some(signed) = sign(w, &req) {
        let headers = std::mem::replace(&mut req.headers, signed);
        let view = req.view();
        assert_eq!(
            w.verifier.verify(&w.peer, ROUTE, &view, &req.body, NOW),
            Outcome::Ok,
            "a signed request did not verify"
        );
        assert_eq!(
            w.verifier.verify(&w.peer, ROUTE, &view, &req.body, NOW),
            Outcome::Replay
        );
        req.headers = headers;
        if let Some(signed) = sign(w, &req) {
            req.headers = signed;
            let got = tampered(w, &req, how);
            assert_ne!(
                got,
                Outcome::Ok,
                "a request changed after signing verified ({how})"
            );
        }
    }
    w.verifier.purge_expired(NOW + 7200);
});
