//! Shared pieces of keyproof's fuzz targets: an independent reference
//! decoder for chunked bodies, head re-serialisers for the round-trip
//! invariants, read-split schedules, and a fixed step-up identity.
//!
//! Everything here is deliberately simple and written from RFC 9112 and the
//! stepup-v1 design rather than from keyproof's code: a target compares
//! keyproof against it, so sharing code would hide the bugs it looks for.

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, Method, StatusCode, Version};
use keyproof_proxy::http::h1::{Framing, RequestHead, ResponseHead};

/// The longest chunk-size line (extensions included, CRLF excluded) keyproof
/// accepts; the reference decoder enforces the same limit.
pub const MAX_CHUNK_LINE: usize = 1024;
/// Most fields in a head or trailer section (keyproof's `MAX_HEADERS`).
pub const MAX_TRAILER_FIELDS: usize = 128;

/// Read sizes drawn from `seed`: a small xorshift so that one control byte
/// of fuzz input gives a whole, reproducible split schedule.
pub struct Splits {
    state: u32,
    max: usize,
}

impl Splits {
    /// A schedule of reads of 1..=`max` bytes.
    pub fn new(seed: u32, max: usize) -> Splits {
        Splits {
            state: seed | 1,
            max: max.max(1),
        }
    }

    /// The next read size.
    pub fn next_len(&mut self) -> usize {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        1 + (x as usize % self.max)
    }
}

/// A decoded chunked body: the data and the trailer fields (lower-case
/// names, values as sent minus surrounding whitespace), and how many bytes
/// of the input the body took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    pub data: Vec<u8>,
    pub trailers: Vec<(Vec<u8>, Vec<u8>)>,
    pub consumed: usize,
}

/// Why the reference refused a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefError {
    /// The input ends before the body does.
    Incomplete,
    /// The body breaks RFC 9112 section 7.1 (or a limit).
    Invalid,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 field-vchar / obs-text, SP and HTAB: what a field value may hold.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Reference decoder of a chunked body (RFC 9112 section 7.1) at the start
/// of `wire`, with the same documented limits as keyproof: chunk-size lines
/// up to [`MAX_CHUNK_LINE`] bytes, at most 16 hex digits, optional
/// whitespace then `;` extensions (content not interpreted, as a proxy that
/// drops them may), CRLF everywhere, and a trailer section of at most
/// `max_trailers` bytes and [`MAX_TRAILER_FIELDS`] fields.
pub fn reference_chunked(wire: &[u8], max_trailers: usize) -> Result<Body, RefError> {
    let mut pos = 0;
    let mut data = Vec::new();
    loop {
        let rest = &wire[pos..];
        let Some(end) = find_crlf(rest) else {
            // The line may still end well only while it is within the limit
            // (its CR may be the last byte seen).
            return Err(if rest.len() > MAX_CHUNK_LINE + 1 {
                RefError::Invalid
            } else {
                RefError::Incomplete
            });
        };
        let line = &rest[..end];
        if line.len() > MAX_CHUNK_LINE || line.contains(&b'\n') || line.contains(&b'\r') {
            return Err(RefError::Invalid);
        }
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return Err(RefError::Invalid);
        }
        let after = &line[digits..];
        let ext = after
            .iter()
            .position(|b| *b != b' ' && *b != b'\t')
            .map(|i| &after[i..]);
        if ext.is_some_and(|e| e[0] != b';') {
            return Err(RefError::Invalid);
        }
        let mut size: u64 = 0;
        for d in &line[..digits] {
            let v = (*d as char).to_digit(16).unwrap_or(0) as u64;
            size = (size << 4) | v;
        }
        pos += end + 2;
        if size == 0 {
            break;
        }
        let have = (wire.len() - pos) as u64;
        if have < size {
            return Err(RefError::Incomplete);
        }
        let size = size as usize;
        data.extend_from_slice(&wire[pos..pos + size]);
        pos += size;
        match wire.get(pos..pos + 2) {
            Some(b"\r\n") => pos += 2,
            Some(_) => return Err(RefError::Invalid),
            None if wire.len() > pos && wire[pos] != b'\r' => return Err(RefError::Invalid),
            None => return Err(RefError::Incomplete),
        }
    }
    // Trailer section: field lines, then an empty line.
    let start = pos;
    let mut trailers = Vec::new();
    loop {
        let rest = &wire[pos..];
        let Some(end) = find_crlf(rest) else {
            let seen = wire.len() - start;
            return Err(if seen > max_trailers {
                RefError::Invalid
            } else {
                RefError::Incomplete
            });
        };
        if pos + end + 2 - start > max_trailers {
            return Err(RefError::Invalid);
        }
        let line = &rest[..end];
        pos += end + 2;
        if line.is_empty() {
            break;
        }
        if line.contains(&b'\n') || line.contains(&b'\r') {
            return Err(RefError::Invalid);
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or(RefError::Invalid)?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(RefError::Invalid);
        }
        let mut value = &line[colon + 1..];
        while let [b' ' | b'\t', rest @ ..] = value {
            value = rest;
        }
        while let [rest @ .., b' ' | b'\t'] = value {
            value = rest;
        }
        if !value.iter().all(|b| is_field_byte(*b)) {
            return Err(RefError::Invalid);
        }
        trailers.push((name.to_ascii_lowercase(), value.to_vec()));
        if trailers.len() > MAX_TRAILER_FIELDS {
            return Err(RefError::Invalid);
        }
    }
    Ok(Body {
        data,
        trailers,
        consumed: pos,
    })
}

/// The fields of a map as (name, value) pairs, in the map's order.
pub fn fields(map: &HeaderMap) -> Vec<(Vec<u8>, Vec<u8>)> {
    map.iter()
        .map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

fn put_fields(map: &HeaderMap, dst: &mut BytesMut) {
    for (name, value) in map {
        dst.put_slice(name.as_str().as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
    }
}

fn version_str(v: Version) -> &'static [u8] {
    if v == Version::HTTP_10 {
        b"HTTP/1.0"
    } else {
        b"HTTP/1.1"
    }
}

/// A parsed request head written back to the wire: what keyproof took out
/// of the fields (the chunked coding, `Expect: 100-continue`) is put back.
pub fn write_request(head: &RequestHead) -> BytesMut {
    let p = &head.parts;
    let mut dst = BytesMut::new();
    dst.put_slice(p.method.as_str().as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(p.uri.to_string().as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(version_str(p.version));
    dst.put_slice(b"\r\n");
    put_fields(&p.headers, &mut dst);
    if head.framing == Framing::Chunked {
        dst.put_slice(b"transfer-encoding: chunked\r\n");
    }
    if head.expect_continue {
        dst.put_slice(b"expect: 100-continue\r\n");
    }
    dst.put_slice(b"\r\n");
    dst
}

/// A parsed response head written back to the wire, with the hop-by-hop
/// fields that give it the same framing and persistence.
pub fn write_response(head: &ResponseHead) -> BytesMut {
    let p = &head.parts;
    let mut dst = BytesMut::new();
    dst.put_slice(version_str(p.version));
    dst.put_u8(b' ');
    dst.put_slice(p.status.as_str().as_bytes());
    dst.put_slice(b" R\r\n");
    put_fields(&p.headers, &mut dst);
    if head.framing == Framing::Chunked {
        dst.put_slice(b"transfer-encoding: chunked\r\n");
    }
    match (head.keep_alive, p.version == Version::HTTP_10) {
        (false, false) => dst.put_slice(b"connection: close\r\n"),
        (true, true) => dst.put_slice(b"connection: keep-alive\r\n"),
        _ => {}
    }
    dst.put_slice(b"\r\n");
    dst
}

/// The request methods a response is read for (HEAD changes the framing).
pub fn method_for(b: u8) -> Method {
    match b % 4 {
        0 => Method::GET,
        1 => Method::HEAD,
        2 => Method::POST,
        _ => Method::CONNECT,
    }
}

/// Statuses whose responses never have a body.
pub fn bodyless(method: &Method, status: StatusCode) -> bool {
    method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
}

/// Fields that describe a connection, never forwarded.
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// A fixed step-up world: one Ed25519 workload key (signer and the peer
/// the verifier sees), a fixed nonce key, exporter, route and clock, so
/// that corpus files made by `gen_corpus` stay valid across runs.
pub mod stepup {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    use keyproof_stepup::{NonceKey, Peer, PeerKey, Signer, StepUpConfig, Verifier};

    /// The clock every target runs at (Unix seconds).
    pub const NOW: u64 = 1_800_000_000;
    /// The route the nonces are bound to.
    pub const ROUTE: &str = "route-0";
    /// The connection's channel binding.
    pub const EXPORTER: [u8; 32] = [7; 32];
    const SEED: [u8; 32] = [42; 32];
    const NONCE_SECRET: [u8; 32] = [9; 32];

    /// The workload's key as PKCS#8 v1.
    pub fn pkcs8() -> Vec<u8> {
        let mut der = hex_bytes("302e020100300506032b657004220420");
        der.extend_from_slice(&SEED);
        der
    }

    /// The workload's SubjectPublicKeyInfo.
    pub fn spki() -> Vec<u8> {
        let kp = Ed25519KeyPair::from_seed_unchecked(&SEED).expect("fixed seed");
        let mut der = hex_bytes("302a300506032b6570032100");
        der.extend_from_slice(kp.public_key().as_ref());
        der
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Signer, verifier and the peer as the verifier sees it.
    pub struct World {
        pub signer: Signer,
        pub verifier: Verifier,
        pub peer: Peer,
        pub nonce_key: NonceKey,
    }

    impl World {
        /// Builds the fixed world.
        pub fn new() -> World {
            let signer = Signer::from_pkcs8(&pkcs8()).expect("fixed key");
            let key = PeerKey::from_spki_der(&spki()).expect("fixed spki");
            let cfg = StepUpConfig::default();
            World {
                signer,
                verifier: Verifier::with_nonce_key(cfg, NonceKey::from_secret(&NONCE_SECRET)),
                peer: Peer::new(key, Some(EXPORTER)),
                nonce_key: NonceKey::from_secret(&NONCE_SECRET),
            }
        }
    }

    impl Default for World {
        fn default() -> World {
            World::new()
        }
    }
}
