//! HTTP/1.1 on the wire (RFC 9112), for the proxy's plaintext connections
//! with its own app:
//!
//! * client side (the inbound's connections to the app): request heads and
//!   chunked request bodies out, response heads and response body framing
//!   (Content-Length, chunked, or until close) in;
//! * server side (the outbound's listener, `h1_server.rs`): request heads
//!   and request body framing in, response heads out.
//!
//! Only what a proxy in front of a local app needs: no upgrades, and 1xx
//! interim responses are read past. The parsing is strict where laxness lets
//! two parties disagree about where a message ends (request smuggling):
//! conflicting `Content-Length` values, a request with both
//! `Transfer-Encoding` and `Content-Length`, chunk sizes that are not hex,
//! and line endings other than CRLF are errors.

use std::io;
use std::mem::MaybeUninit;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Frame, SizeHint};
use smallvec::SmallVec;

use crate::http::owned::is_hop_by_hop;

/// Most header fields in a response head or trailer section.
const MAX_HEADERS: usize = 128;

/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1024;

/// Why a message could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum H1Error {
    /// The head is not HTTP/1.x.
    #[error("malformed message head: {0}")]
    Head(httparse::Error),
    /// A header field's name or value is not valid.
    #[error("malformed header field")]
    Field,
    /// The head (or trailer section) is larger than allowed.
    #[error("message head larger than {0} bytes")]
    TooLarge(usize),
    /// The head (or trailer section) has more fields than allowed.
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyFields,
    /// `Content-Length` is not one decimal number.
    #[error("invalid content-length")]
    ContentLength,
    /// The chunked body is malformed.
    #[error("malformed chunked body")]
    Chunk,
    /// The app answered `101 Switching Protocols`, which was not asked for.
    #[error("unexpected 101 switching protocols")]
    Upgrade,
    /// A request's `Transfer-Encoding` does not end in chunked, or comes
    /// with a `Content-Length` (RFC 9112 section 6.1: either can make two
    /// parties disagree about where the body ends).
    #[error("unsupported transfer-encoding")]
    TransferEncoding,
    /// An `Expect` other than `100-continue` (RFC 9110 section 10.1.1).
    #[error("unsupported expectation")]
    Expectation,
    /// The request target is not a valid URI.
    #[error("malformed request target")]
    Target,
    /// The method is not a valid token.
    #[error("malformed method")]
    Method,
    /// A line of the head (or trailer section) ends in LF without CR
    /// (RFC 9112 section 2.2 lets a recipient accept it; a proxy that did
    /// would read a head differently from a strict peer).
    #[error("bare LF in the message head")]
    BareLf,
    /// `Transfer-Encoding` names `chunked` more than once.
    #[error("chunked applied more than once")]
    ChunkedTwice,
    /// A request with both `Transfer-Encoding` and `Content-Length`: two
    /// framings, the shape of request smuggling (400, on both listeners).
    #[error("both Transfer-Encoding and Content-Length")]
    BothFramings,
}

impl H1Error {
    /// The status a server answers a request it could not read with.
    pub fn status(&self) -> StatusCode {
        match self {
            H1Error::TooLarge(_) | H1Error::TooManyFields => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            H1Error::TransferEncoding => StatusCode::NOT_IMPLEMENTED,
            H1Error::Expectation => StatusCode::EXPECTATION_FAILED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// How a message body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the connection closes (responses only).
    UntilClose,
}

/// Writes a request head in origin-form: request line, the fields of
/// `headers` except the framing ones, then the framing field `framing` asks
/// for. The caller has removed hop-by-hop fields.
pub fn write_request_head(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    framing: Framing,
    dst: &mut BytesMut,
) {
    dst.reserve(64 + path.len() + headers.len() * 32);
    dst.put_slice(method.as_str().as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(path.as_bytes());
    dst.put_slice(b" HTTP/1.1\r\n");
    // HTTP/2 may carry the cookie in several fields; HTTP/1.1 in one, the
    // crumbs joined by "; " (RFC 9113 section 8.2.3): many frameworks read
    // only the first `Cookie` line. A map's values of one name are adjacent.
    let mut cookie_open = false;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        let cookie = name == header::COOKIE;
        if cookie && cookie_open {
            dst.truncate(dst.len() - 2);
            dst.put_slice(b"; ");
        } else {
            dst.put_slice(name.as_str().as_bytes());
            dst.put_slice(b": ");
        }
        cookie_open = cookie;
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
    }
    match framing {
        Framing::Empty | Framing::UntilClose => {}
        Framing::Length(n) => {
            dst.put_slice(b"content-length: ");
            dst.put_slice(itoa::Buffer::new().format(n).as_bytes());
            dst.put_slice(b"\r\n");
        }
        Framing::Chunked => dst.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    dst.put_slice(b"\r\n");
}

/// The line that starts a chunk of `len` bytes.
pub fn chunk_start(len: usize, dst: &mut BytesMut) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let (mut i, mut n) = (digits.len(), len);
    loop {
        i -= 1;
        digits[i] = HEX[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    dst.put_slice(&digits[i..]);
    dst.put_slice(b"\r\n");
}

/// The last chunk and the trailer section.
pub fn write_last_chunk(trailers: Option<&HeaderMap>, dst: &mut BytesMut) {
    dst.put_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        dst.put_slice(name.as_str().as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
    }
    dst.put_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version and the end-to-end header fields: the hop-by-hop
    /// ones (RFC 9110 section 7.6.1, and any the Connection field names)
    /// are read for framing and left out. Content-Length stays.
    pub parts: http::response::Parts,
    /// How the body that follows is delimited.
    pub framing: Framing,
    /// Whether the connection can carry another request afterwards.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf`, reading past 1xx
/// interim responses, and removes it from `buf`. `Ok(None)`: more bytes are
/// needed. `method` is the request's (a HEAD response has no body).
pub fn parse_response_head(
    buf: &mut BytesMut,
    method: &Method,
    max: usize,
) -> Result<Option<ResponseHead>, H1Error> {
    response_head(buf, method, max, false)
}

/// [`parse_response_head`] for the answer to a request that asked to
/// switch protocols (`Connection: upgrade`): a `101` is a head too, with
/// no body (`Framing::Empty`) and no keep-alive, and what follows it in
/// `buf` is the new protocol's.
pub fn parse_upgrade_response_head(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<ResponseHead>, H1Error> {
    response_head(buf, &Method::GET, max, true)
}

fn response_head(
    buf: &mut BytesMut,
    method: &Method,
    max: usize,
    switching: bool,
) -> Result<Option<ResponseHead>, H1Error> {
    loop {
        // Left uninitialised: zeroing 128 fields (4 KiB) per response would
        // cost more than parsing a typical head.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut fields,
        );
        let Some(len) = head_len(parsed, buf.len(), max)? else {
            return Ok(None);
        };
        if has_bare_lf(&buf[..len]) {
            return Err(H1Error::BareLf);
        }
        let code = resp.code.unwrap_or(0);
        // RFC 9110 section 15: status codes are 100 to 599; `999` would
        // reach the caller as a status its client may not know how to read.
        let status = StatusCode::from_u16(code)
            .ok()
            .filter(|s| s.as_u16() <= 599)
            .ok_or(H1Error::Head(httparse::Error::Status))?;
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        // A switch no one asked for, or in HTTP/1.0 (which has none).
        if switched && (!switching || version == Version::HTTP_10) {
            return Err(H1Error::Upgrade);
        }
        if status.is_informational() && !switched {
            buf.advance(len);
            continue;
        }
        let hop = FramingFields::scan(resp.headers)?;
        let at = locate(buf, resp.headers);
        // The field values become slices of the head, not copies; the
        // hop-by-hop ones are left out.
        let mut headers = field_map(&buf.split_to(len).freeze(), &at, is_hop_by_hop)?;
        for name in &hop.named {
            headers.remove(name.as_str());
        }
        // After a 101 there is no body to frame: the connection is the new
        // protocol's from the end of the head.
        let (framing, keep_alive) = if switched {
            (Framing::Empty, false)
        } else {
            response_framing(method, status, version, &hop, &mut headers)?
        };
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some(ResponseHead {
            parts,
            framing,
            keep_alive,
        }));
    }
}

/// The length of a parsed head, `None` while it is incomplete, or why it
/// is refused (`buffered`: the bytes looked at so far).
fn head_len(
    parsed: httparse::Result<usize>,
    buffered: usize,
    max: usize,
) -> Result<Option<usize>, H1Error> {
    match parsed {
        Ok(httparse::Status::Complete(len)) if len > max => Err(H1Error::TooLarge(max)),
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered > max => Err(H1Error::TooLarge(max)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(H1Error::TooManyFields),
        Err(e) => Err(H1Error::Head(e)),
    }
}

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    /// Method, target, version and the header fields as sent (hop-by-hop
    /// ones included: the proxy strips them where it forwards).
    pub parts: http::request::Parts,
    /// How the body that follows is delimited: never `UntilClose`.
    pub framing: Framing,
    /// Whether the client keeps the connection open after the response.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent (and is removed from the fields).
    pub expect_continue: bool,
}

/// Parses the request head at the start of `buf` and removes it from `buf`.
/// `Ok(None)`: more bytes are needed. Empty lines before the request line
/// are skipped (RFC 9112 section 2.2).
pub fn parse_request_head(buf: &mut BytesMut, max: usize) -> Result<Option<RequestHead>, H1Error> {
    // Empty lines only: a CR not followed by LF is a bare CR, which RFC
    // 9112 section 2.2 makes invalid (httparse refuses it; skipping it here
    // accepted "\rGET ...").
    let mut blank = 0;
    loop {
        match buf[blank..] {
            [b'\r', b'\n', ..] => blank += 2,
            [b'\n', ..] => blank += 1,
            _ => break,
        }
    }
    buf.advance(blank);
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut fields,
    );
    let Some(len) = head_len(parsed, buf.len(), max)? else {
        return Ok(None);
    };
    if has_bare_lf(&buf[..len]) {
        return Err(H1Error::BareLf);
    }
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let method =
        Method::from_bytes(req.method.unwrap_or("").as_bytes()).map_err(|_| H1Error::Method)?;
    let hop = FramingFields::scan(req.headers)?;
    let base = buf.as_ptr() as usize;
    let path = req.path.unwrap_or("");
    let target = (path.as_ptr() as usize - base, path.len());
    let at = locate(buf, req.headers);
    let expect = req
        .headers
        .iter()
        .position(|f| f.name.eq_ignore_ascii_case("expect"));
    let expect_continue = match expect.map(|i| req.headers[i].value) {
        None => false,
        Some(v) if v.eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => return Err(H1Error::Expectation),
    };
    let section = buf.split_to(len).freeze();
    let uri = http::Uri::from_maybe_shared(section.slice(target.0..target.0 + target.1))
        .map_err(|_| H1Error::Target)?;
    let mut headers = field_map(&section, &at, |name| {
        expect.is_some() && name.eq_ignore_ascii_case(b"expect")
    })?;
    let framing = if hop.transfer_encoding {
        // Only `chunked`, once, is forwarded faithfully: the proxy decodes
        // and re-frames it. A coding before it would be decoded partly and
        // its name dropped, so the app would read a compressed body as
        // plain: refused (501), as by the inbound.
        if hop.chunked_count > 1 {
            return Err(H1Error::ChunkedTwice);
        }
        if hop.content_length.is_some() {
            return Err(H1Error::BothFramings);
        }
        if !hop.chunked || hop.other_coding || version == Version::HTTP_10 {
            return Err(H1Error::TransferEncoding);
        }
        Framing::Chunked
    } else {
        match hop.content_length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };
    if framing == Framing::Chunked {
        // The body's framing is the proxy's business from here on.
        headers.remove(header::TRANSFER_ENCODING);
    }
    if let (true, Some(n)) = (hop.content_length_repeated, hop.content_length) {
        // `5, 5` (or two fields of 5): one value goes on (RFC 9110 section
        // 8.6), which HTTP/2 and the app read as the sender meant.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let keep_alive = !hop.close && (version == Version::HTTP_11 || hop.keep_alive);
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead {
        parts,
        framing,
        keep_alive,
        expect_continue: expect_continue && framing != Framing::Empty,
    }))
}

/// How the body after a complete request head `head` is framed, as far as
/// a reader that only follows message boundaries needs to know (see
/// `h1_guard`); `None` when the head is not one the server will accept.
/// A head with both `Transfer-Encoding` and `Content-Length` is
/// [`Framing::UntilClose`]: no request is framed so, and the guard makes
/// the server refuse it (RFC 9112 section 6.1 lets a server take such a
/// request; the sidecar does not, on either listener).
pub(crate) fn request_body_framing(head: &[u8]) -> Option<Framing> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, head, &mut fields)
        .ok()?;
    if !parsed.is_complete() {
        return None;
    }
    let hop = FramingFields::scan(req.headers).ok()?;
    if hop.transfer_encoding && hop.content_length.is_some() {
        return Some(Framing::UntilClose);
    }
    if hop.transfer_encoding {
        return hop.chunked.then_some(Framing::Chunked);
    }
    Some(match hop.content_length {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// How a response goes on the wire to a client, given the request it
/// answers and what is known of the body.
pub fn response_framing_for(
    method: &Method,
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    exact_len: Option<u64>,
) -> Framing {
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Framing::Empty;
    }
    if let Some(n) = exact_len {
        return Framing::Length(n);
    }
    if let Some(n) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| parse_decimal(v.as_bytes()))
    {
        return Framing::Length(n);
    }
    if version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        Framing::UntilClose
    }
}

/// Writes a response head: status line, the end-to-end fields of `headers`
/// (hop-by-hop and framing fields are skipped), the framing field, the
/// connection field, and a `date` field when the response has none
/// (`date` is called only then: most responses carry the app's own).
pub fn write_response_head<D: AsRef<[u8]>>(
    parts: &http::response::Parts,
    framing: Framing,
    connection: Connection,
    date: impl FnOnce() -> D,
    dst: &mut BytesMut,
) {
    dst.reserve(128 + parts.headers.len() * 40);
    dst.put_slice(b"HTTP/1.1 ");
    dst.put_slice(parts.status.as_str().as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or("Unknown")
            .as_bytes(),
    );
    dst.put_slice(b"\r\n");
    let mut has_date = false;
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH
            || (is_hop_by_hop(name.as_str().as_bytes()) && !(switching && name == header::UPGRADE))
        {
            continue;
        }
        has_date |= name == header::DATE;
        dst.put_slice(name.as_str().as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
    }
    if !has_date {
        dst.put_slice(b"date: ");
        dst.put_slice(date().as_ref());
        dst.put_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            dst.put_slice(b"content-length: ");
            dst.put_slice(itoa::Buffer::new().format(n).as_bytes());
            dst.put_slice(b"\r\n");
        }
        Framing::Chunked => dst.put_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose => {
            // A HEAD or 304 response keeps the length the GET would have had.
            if let Some(v) = parts.headers.get(header::CONTENT_LENGTH) {
                if parts.status != StatusCode::NO_CONTENT && !parts.status.is_informational() {
                    dst.put_slice(b"content-length: ");
                    dst.put_slice(v.as_bytes());
                    dst.put_slice(b"\r\n");
                }
            }
        }
    }
    match connection {
        Connection::Default => {}
        Connection::Close => dst.put_slice(b"connection: close\r\n"),
        Connection::KeepAlive => dst.put_slice(b"connection: keep-alive\r\n"),
        Connection::Upgrade => dst.put_slice(b"connection: upgrade\r\n"),
    }
    dst.put_slice(b"\r\n");
}

/// The `Connection` field a response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// None: the version's default applies.
    Default,
    /// The connection closes after this response.
    Close,
    /// An HTTP/1.0 client's keep-alive is honoured.
    KeepAlive,
    /// A `101`: the connection switches to the protocol its `Upgrade`
    /// field names (the one hop-by-hop field such a head keeps).
    Upgrade,
}

/// What a head's framing and connection fields say, read off the
/// parsed fields directly (no map lookups per request).
#[derive(Debug, Default)]
struct FramingFields {
    close: bool,
    keep_alive: bool,
    /// Transfer-Encoding is present; its last coding is chunked.
    transfer_encoding: bool,
    chunked: bool,
    /// How often `chunked` is named, and whether another coding is.
    chunked_count: u32,
    other_coding: bool,
    /// The one Content-Length value, when present.
    content_length: Option<u64>,
    /// It came as a list or in several fields (the same value each time).
    content_length_repeated: bool,
    /// Further fields the Connection field names (rare).
    named: Vec<String>,
}

impl FramingFields {
    fn scan(fields: &[httparse::Header<'_>]) -> Result<FramingFields, H1Error> {
        let mut h = FramingFields::default();
        for f in fields {
            let name = f.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                for item in f.value.split(|b| *b == b',') {
                    let n = parse_decimal(item.trim_ascii()).ok_or(H1Error::ContentLength)?;
                    if h.content_length.is_some_and(|l| l != n) {
                        return Err(H1Error::ContentLength);
                    }
                    h.content_length_repeated |= h.content_length.is_some();
                    h.content_length = Some(n);
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                h.transfer_encoding = true;
                h.chunked = f
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                for c in f.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if c.eq_ignore_ascii_case(b"chunked") {
                        h.chunked_count += 1;
                    } else if !c.is_empty() {
                        h.other_coding = true;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in f.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        h.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        h.keep_alive = true;
                    } else if !token.is_empty() {
                        h.named
                            .push(String::from_utf8_lossy(token).to_ascii_lowercase());
                    }
                }
            }
        }
        Ok(h)
    }
}

/// RFC 9112 section 6.3: how the body of this response is delimited, and
/// whether the connection stays usable after it.
fn response_framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    hop: &FramingFields,
    headers: &mut HeaderMap,
) -> Result<(Framing, bool), H1Error> {
    // RFC 9112 section 6.1: an HTTP/1.0 message with a transfer coding has
    // faulty framing; read it, then close (a bodyless one too).
    let faulty = hop.transfer_encoding && version == Version::HTTP_10;
    let keep_alive = !hop.close && !faulty && (version == Version::HTTP_11 || hop.keep_alive);
    if status == StatusCode::NO_CONTENT {
        // RFC 9110 section 8.6: a 204 has none; HTTP/2 callers would
        // refuse it (RFC 9113 section 8.1.1).
        headers.remove(header::CONTENT_LENGTH);
    } else if let Some(n) = hop.content_length {
        // `5, 5` or two `Content-Length: 5` fields, which the reader takes
        // as one length (RFC 9112 section 6.3): sent on as the one value,
        // or an HTTP/2 caller would refuse the response.
        let mut all = headers.get_all(header::CONTENT_LENGTH).iter();
        let first = all.next();
        if all.next().is_some() || first.is_some_and(|v| v.as_bytes().contains(&b',')) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    if method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, keep_alive));
    }
    if hop.transfer_encoding {
        if hop.other_coding || hop.chunked_count > 1 {
            // Decoding the chunks and dropping the other coding's name would
            // hand the caller a compressed body as plain: refused (502).
            return Err(H1Error::TransferEncoding);
        }
        let mut keep_alive = keep_alive;
        if hop.content_length.is_some() {
            // Both: Transfer-Encoding wins, and the connection is not
            // trusted with another message.
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        return Ok(if hop.chunked {
            (Framing::Chunked, keep_alive)
        } else {
            (Framing::UntilClose, false)
        });
    }
    Ok(match hop.content_length {
        Some(0) => (Framing::Empty, keep_alive),
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::UntilClose, false),
    })
}

/// Whether a line of `head` ends in a bare LF. A head has a few dozen
/// LFs in a few hundred bytes: jumping from one to the next (memchr) costs
/// a fraction of a byte-by-byte scan, on every request and response head.
fn has_bare_lf(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|i| i == 0 || head[i - 1] != b'\r')
}

/// A non-empty string of ASCII digits, without overflow.
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Where a parsed field's name and value are in the buffer parsed, so that
/// the buffer can be frozen and sliced once the parser lets go of it.
#[derive(Debug, Clone, Copy)]
struct FieldAt {
    name: (usize, usize),
    value: (usize, usize),
}

/// Where `fields` (parsed from `buf`) are. Inline for a typical head, on
/// the heap beyond.
fn locate(buf: &[u8], fields: &[httparse::Header<'_>]) -> SmallVec<[FieldAt; 32]> {
    let base = buf.as_ptr() as usize;
    fields
        .iter()
        .map(|f| {
            let name = f.name.as_ptr() as usize - base;
            let value = f.value.as_ptr() as usize - base;
            FieldAt {
                name: (name, name + f.name.len()),
                value: (value, value + f.value.len()),
            }
        })
        .collect()
}

/// The fields at `at` in `section` but those `skip` names, values sharing
/// its memory.
fn field_map(
    section: &Bytes,
    at: &[FieldAt],
    skip: impl Fn(&[u8]) -> bool,
) -> Result<HeaderMap, H1Error> {
    let mut map = HeaderMap::with_capacity(at.len());
    for a in at {
        let raw = &section[a.name.0..a.name.1];
        if skip(raw) {
            continue;
        }
        let name = HeaderName::from_bytes(raw).map_err(|_| H1Error::Field)?;
        let value = HeaderValue::from_maybe_shared(section.slice(a.value.0..a.value.1))
            .map_err(|_| H1Error::Field)?;
        map.append(name, value);
    }
    Ok(map)
}

/// What the chunked decoder found in the buffer.
#[derive(Debug)]
pub enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The trailer section (the body is complete).
    Trailers(HeaderMap),
    /// The body is complete, without trailers.
    Done,
    /// More bytes are needed.
    NeedMore,
}

/// Incremental decoder of a chunked body.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: Chunk,
    max_trailers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF that ends a chunk's data.
    DataEnd,
    /// After the last chunk: expecting the trailer section.
    Trailers,
    Done,
}

impl ChunkedDecoder {
    /// A decoder at the start of a body; trailer sections above
    /// `max_trailers` bytes are refused.
    pub fn new(max_trailers: usize) -> ChunkedDecoder {
        ChunkedDecoder {
            state: Chunk::Size,
            max_trailers,
        }
    }

    /// Whether the whole body has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Decodes the next piece of the body from the start of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match self.state {
                Chunk::Size => {
                    // The limit holds however the line arrives: only its
                    // first MAX_CHUNK_LINE bytes and CRLF are looked at, and
                    // a line that long may still end (its CR can be the
                    // last byte read).
                    let window = &buf[..buf.len().min(MAX_CHUNK_LINE + 2)];
                    // The line ends at its first LF, which must follow a
                    // CR: a bare one fails the body now, not once a CRLF
                    // comes (it may never).
                    let Some(lf) = window.iter().position(|b| *b == b'\n') else {
                        if buf.len() > MAX_CHUNK_LINE + 1 {
                            return Err(H1Error::Chunk);
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    if lf == 0 || window[lf - 1] != b'\r' {
                        return Err(H1Error::BareLf);
                    }
                    let end = lf - 1;
                    let size = parse_chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Chunk);
                    }
                    buf.advance(2);
                    self.state = Chunk::Size;
                }
                Chunk::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, at) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, _))) if len > self.max_trailers => {
                            return Err(H1Error::TooLarge(self.max_trailers))
                        }
                        // httparse takes a bare LF as a line end; CRLF only,
                        // as for every line here (RFC 9112 section 2.2 lets
                        // a recipient refuse a bare LF), so that no two
                        // readers disagree on where the section ends.
                        Ok(httparse::Status::Complete((len, _))) if has_bare_lf(&buf[..len]) => {
                            return Err(H1Error::BareLf)
                        }
                        Ok(httparse::Status::Complete((len, f))) => (len, locate(buf, f)),
                        Ok(httparse::Status::Partial) if buf.len() > self.max_trailers => {
                            return Err(H1Error::TooLarge(self.max_trailers))
                        }
                        // Refused as soon as it is read, whether or not the
                        // section ever ends.
                        Ok(httparse::Status::Partial) if has_bare_lf(buf) => {
                            return Err(H1Error::BareLf)
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                        Err(_) => return Err(H1Error::Chunk),
                    };
                    self.state = Chunk::Done;
                    if at.is_empty() {
                        buf.advance(len);
                        return Ok(Decoded::Done);
                    }
                    let section = buf.split_to(len).freeze();
                    return Ok(Decoded::Trailers(field_map(&section, &at, |_| false)?));
                }
                Chunk::Done => return Ok(Decoded::Done),
            }
        }
    }
}

/// Reads one framed body off a connection, a frame at a time, from a
/// buffer the owner refills. Shared by the app client's response bodies and
/// the outbound server's request bodies; the owner decides what happens to
/// the connection when the body ends ([`BodyReader::is_done`]) or fails.
#[derive(Debug)]
pub struct BodyReader {
    state: ReadState,
    /// Body bytes read so far, to size the reads.
    read: u64,
}

/// The end of a chunked body, found while merging its last chunks.
#[derive(Debug)]
enum Held {
    Trailers(HeaderMap),
    Done,
    Failed(H1Error),
}

/// Chunks already read and smaller than this together go out as one frame
/// of up to about this size: an HTTP/2 peer counts each DATA frame's
/// overhead, and h2 closes a whole connection (`too_many_data_frames`)
/// that sends it more small frames than it has read, so a body of many tiny
/// chunks must not become as many frames on a shared mesh connection.
const COALESCE: usize = 16 * 1024;

#[derive(Debug)]
enum ReadState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    /// The end of a chunked body, found while merging its last chunks into
    /// the frame given before: given next (boxed, as it is rare and every
    /// body carries the state; a plain end is [`ReadState::Ended`]).
    Ending(Box<Held>),
    /// As `Ending` with the body's plain end (the common one).
    Ended,
    Done,
}

/// Why a body broke off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is malformed.
    #[error("{0}")]
    Framing(#[from] H1Error),
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The connection closed before the declared end of the body.
    #[error("the connection closed before the end of the body")]
    Incomplete,
}

/// Read sizes: small for heads and small bodies, larger once a body is not.
pub const SMALL_READ: usize = 4 * 1024;
const LARGE_READ: usize = 32 * 1024;

impl BodyReader {
    /// A reader for a body framed as `framing`; chunked trailer sections
    /// above `max_trailers` bytes are refused.
    pub fn new(framing: Framing, max_trailers: usize) -> BodyReader {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => ReadState::Done,
            Framing::Length(n) => ReadState::Length(n),
            Framing::Chunked => ReadState::Chunked(ChunkedDecoder::new(max_trailers)),
            Framing::UntilClose => ReadState::UntilClose,
        };
        BodyReader { state, read: 0 }
    }

    /// Whether the body has ended (or failed).
    pub fn is_done(&self) -> bool {
        // `Ended`: its last data is given, and it was read whole.
        matches!(self.state, ReadState::Done | ReadState::Ended)
    }

    /// The body's remaining length, when known.
    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            ReadState::Length(n) => SizeHint::with_exact(n),
            ReadState::Done | ReadState::Ended => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// The next frame: from `buf` while it holds body bytes, else after
    /// `read` has added some (`Ok(0)`: the connection closed).
    pub fn poll_frame(
        &mut self,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
        mut read: impl FnMut(&mut Context<'_>, &mut BytesMut) -> Poll<io::Result<usize>>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            match &mut self.state {
                ReadState::Done => return Poll::Ready(None),
                ReadState::Ended => {
                    self.state = ReadState::Done;
                    return Poll::Ready(None);
                }
                ReadState::Ending(_) => {
                    let ReadState::Ending(end) =
                        std::mem::replace(&mut self.state, ReadState::Done)
                    else {
                        unreachable!("matched just above")
                    };
                    return match *end {
                        Held::Trailers(t) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                        Held::Done => Poll::Ready(None),
                        Held::Failed(e) => self.fail(e.into()),
                    };
                }
                ReadState::Length(left) => {
                    if !buf.is_empty() {
                        let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                        *left -= n as u64;
                        if *left == 0 {
                            self.state = ReadState::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(buf.split_to(n).freeze()))));
                    }
                }
                ReadState::Chunked(dec) => match dec.decode(buf) {
                    Ok(Decoded::Data(d)) if d.len() >= COALESCE => {
                        return Poll::Ready(Some(Ok(Frame::data(d))))
                    }
                    Ok(Decoded::Data(d)) => {
                        let (data, end) = coalesce(dec, buf, d);
                        match end {
                            Some(Held::Done) => self.state = ReadState::Ended,
                            Some(end) => self.state = ReadState::Ending(Box::new(end)),
                            None => {}
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Decoded::Trailers(t)) => {
                        self.state = ReadState::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Decoded::Done) => {
                        self.state = ReadState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(e) => return self.fail(e.into()),
                },
                ReadState::UntilClose => {
                    if !buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                    }
                }
            }
            let size = if self.read > LARGE_READ as u64 {
                LARGE_READ
            } else {
                SMALL_READ
            };
            if buf.capacity() - buf.len() < size / 4 {
                buf.reserve(size);
            }
            match ready!(read(cx, buf)) {
                Ok(0) if matches!(self.state, ReadState::UntilClose) => {
                    self.state = ReadState::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail(BodyError::Incomplete),
                Ok(n) => self.read += n as u64,
                Err(e) => return self.fail(e.into()),
            }
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state = ReadState::Done;
        Poll::Ready(Some(Err(e)))
    }
}

/// `first` and the chunks after it already in `buf`, as one piece of up to
/// about [`COALESCE`] bytes, and the end of the body if it came first.
fn coalesce(dec: &mut ChunkedDecoder, buf: &mut BytesMut, first: Bytes) -> (Bytes, Option<Held>) {
    // Most bodies are one chunk: no copy unless a second one is there.
    let mut merged: Option<BytesMut> = None;
    loop {
        if merged.as_ref().map_or(first.len(), BytesMut::len) >= COALESCE {
            break;
        }
        let held = match dec.decode(buf) {
            Ok(Decoded::Data(more)) => {
                merged
                    .get_or_insert_with(|| {
                        let mut m = BytesMut::with_capacity(COALESCE.max(first.len() + more.len()));
                        m.extend_from_slice(&first);
                        m
                    })
                    .extend_from_slice(&more);
                continue;
            }
            Ok(Decoded::NeedMore) => None,
            Ok(Decoded::Trailers(t)) => Some(Held::Trailers(t)),
            Ok(Decoded::Done) => Some(Held::Done),
            Err(e) => Some(Held::Failed(e)),
        };
        return (merged.map_or(first, BytesMut::freeze), held);
    }
    (merged.map_or(first, BytesMut::freeze), None)
}

/// `1*HEXDIG [ BWS ";" chunk-ext ]`, at most 16 hex digits.
fn parse_chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(H1Error::Chunk);
    }
    let rest = &line[digits..];
    let rest_trimmed = rest
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .map_or(&rest[rest.len()..], |i| &rest[i..]);
    if !(rest_trimmed.is_empty() || rest_trimmed[0] == b';')
        || rest.iter().any(|b| *b == b'\r' || *b == b'\n')
    {
        return Err(H1Error::Chunk);
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| H1Error::Chunk)?;
    u64::from_str_radix(hex, 16).map_err(|_| H1Error::Chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, method: Method) -> Result<Option<ResponseHead>, H1Error> {
        parse_response_head(&mut BytesMut::from(raw), &method, 64 * 1024)
    }

    #[test]
    fn request_head_is_origin_form_with_one_framing_field() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        let mut out = BytesMut::new();
        write_request_head(&Method::POST, "/a?b", &h, Framing::Length(5), &mut out);
        assert_eq!(
            &out[..],
            b"POST /a?b HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\n\r\n"
        );
        out.clear();
        write_request_head(&Method::PUT, "/", &h, Framing::Chunked, &mut out);
        assert_eq!(
            &out[..],
            b"PUT / HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn a_status_beyond_599_is_no_response() {
        assert!(head("HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n", Method::GET).is_err());
        assert!(
            head("HTTP/1.1 599 Odd\r\nContent-Length: 0\r\n\r\n", Method::GET)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn cookie_fields_are_joined_into_one_line() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        let mut out = BytesMut::new();
        write_request_head(&Method::GET, "/", &h, Framing::Empty, &mut out);
        let text = String::from_utf8_lossy(&out);
        assert_eq!(text.matches("cookie:").count(), 1, "{text}");
        assert!(text.contains("\r\ncookie: a=1; b=2; c=3\r\n"), "{text}");
        assert!(text.contains("\r\naccept: */*\r\n"), "{text}");
    }

    #[test]
    fn a_repeated_content_length_goes_on_as_one_and_a_204_has_none() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        ] {
            let r = head(raw, Method::GET).unwrap().unwrap();
            assert_eq!(r.framing, Framing::Length(2));
            let cl: Vec<_> = r
                .parts
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .collect();
            assert_eq!(cl, ["2"], "{raw:?}");
        }
        let r = head(
            "HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.framing, Framing::Empty);
        assert!(!r.parts.headers.contains_key(header::CONTENT_LENGTH));
        // A HEAD's and a 304's length describe the representation: kept.
        let r = head(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 8\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.parts.headers[header::CONTENT_LENGTH], "8");
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let r = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Length(5), true));
        let r = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(r.framing, Framing::Empty);
        let r = head("HTTP/1.1 204 No Content\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(r.framing, Framing::Empty);
        let r = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Chunked, false));
        assert!(!r.parts.headers.contains_key(header::CONTENT_LENGTH));
        // A coding the proxy would drop the name of, or chunked twice, is
        // a bad response, not a body to pass on mislabelled.
        for bad in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(head(bad, Method::GET).is_err(), "{bad:?}");
        }
        let r = head("HTTP/1.1 200 OK\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::UntilClose, false));
        let r = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert!(!r.keep_alive);
        let r = head(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(r.keep_alive);
        let r = head(
            "HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 2\r\nContent-Length: 1, 1\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Length(1), false));
        // Only end-to-end fields are left.
        let mut names: Vec<_> = r.parts.headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-length", "x-kept"]);
    }

    /// RFC 9112 section 6.1, found while writing the `response_head` fuzz
    /// target's invariants (which now check it).
    #[test]
    fn an_http_10_response_with_a_transfer_coding_closes_the_connection() {
        for raw in [
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",
        ] {
            let r = head(raw, Method::GET).unwrap().unwrap();
            assert_eq!((r.framing, r.keep_alive), (Framing::Chunked, false), "{raw:?}");
        }
        // Bodyless answers too (the fuzzer found a HEAD's kept alive).
        let raw = "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: gzip\r\n\r\n";
        let r = head(raw, Method::HEAD).unwrap().unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Empty, false));
    }

    #[test]
    fn conflicting_or_bad_lengths_are_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert!(
                matches!(head(bad, Method::GET), Err(H1Error::ContentLength)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\nX",
        );
        let r = parse_response_head(&mut buf, &Method::POST, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(r.parts.status, StatusCode::CREATED);
        assert_eq!(&buf[..], b"X");
        assert!(head("HTTP/1.1 200 OK\r\nContent-Len", Method::GET)
            .unwrap()
            .is_none());
        assert!(matches!(
            head("HTTP/1.1 101 Switching Protocols\r\n\r\n", Method::GET),
            Err(H1Error::Upgrade)
        ));
        let big = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert!(matches!(
            parse_response_head(&mut BytesMut::from(big.as_str()), &Method::GET, 1024),
            Err(H1Error::TooLarge(1024))
        ));
        // Many small fields: the count is what is too large, and said so.
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "X: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        let e = parse_response_head(&mut BytesMut::from(many.as_str()), &Method::GET, 65536)
            .unwrap_err();
        assert!(matches!(e, H1Error::TooManyFields), "{e:?}");
        assert_eq!(e.to_string(), "more than 128 header fields");
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    /// Feeds `wire` to a decoder `step` bytes at a time.
    fn decode_all(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut dec = ChunkedDecoder::new(1024);
        let mut buf = BytesMut::new();
        let (mut body, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match dec.decode(&mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::Done => return Ok((body, trailers)),
                Decoded::NeedMore if fed == wire.len() => return Err(H1Error::Chunk),
                Decoded::NeedMore => {
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire = b"3;ext=1\r\nchu\r\nA \r\nnked-bytes\r\n0\r\ngrpc-status: 0\r\nx: y\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, trailers) = decode_all(wire, step).unwrap();
            assert_eq!(body, b"chunked-bytes", "step {step}");
            let t = trailers.unwrap();
            assert_eq!(t["grpc-status"], "0");
            assert_eq!(t["x"], "y");
        }
        let (body, trailers) = decode_all(b"0\r\n\r\n", 1).unwrap();
        assert!(body.is_empty() && trailers.is_none());
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"g\r\nx\r\n0\r\n\r\n"[..],
            b"\r\n",
            b"3\r\nabcX\r\n0\r\n\r\n",
            b"3 x\r\nabc\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"-1\r\n",
            b"3\nabc\n0\n\n",
        ] {
            assert!(
                decode_all(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            decode_all(b"0\r\nx: y\n\r\n", 1),
            Err(H1Error::BareLf)
        ));
        // A bare LF in a chunk line (its extension included) or an
        // unfinished trailer section fails at once, not when (if ever) a
        // CRLF comes.
        for bad in [&b"5;x\nhello"[..], b"5\r\nhello\r\n0;x\n", b"0\r\nx: y\n"] {
            let mut dec = ChunkedDecoder::new(1024);
            let mut buf = BytesMut::from(bad);
            let got = loop {
                match dec.decode(&mut buf) {
                    Ok(Decoded::Data(_)) => continue,
                    other => break other,
                }
            };
            assert!(
                matches!(got, Err(H1Error::BareLf)),
                "{:?}: {got:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            "HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0\n\n",
            "HTTP/1.1 200 OK\r\nX: a\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(
                matches!(head(bad, Method::GET), Err(H1Error::BareLf)),
                "{bad:?}"
            );
        }
        let long = format!("1;{}\r\n", "e".repeat(2000));
        assert!(decode_all(long.as_bytes(), 64).is_err());
    }

    /// Found by the `chunked` fuzz target: the limits were checked only on
    /// what a single read happened to hold, so a chunk-size line or trailer
    /// section over the limit passed when it arrived in one read and was
    /// refused when it trickled in.
    #[test]
    fn chunk_limits_hold_whatever_the_read_boundaries() {
        let line = |ext: usize| format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(ext));
        // "1;" plus the extension: MAX_CHUNK_LINE bytes exactly, then one more.
        let (fits, over) = (line(MAX_CHUNK_LINE - 2), line(MAX_CHUNK_LINE - 1));
        let trailer = |value: usize| format!("0\r\nx: {}\r\n\r\n", "v".repeat(value));
        // The section is "x: " + value + CRLF + CRLF: 1024 bytes, then 1025.
        let (t_fits, t_over) = (trailer(1024 - 7), trailer(1024 - 6));
        for step in [1, 2, 5, 64, 4096] {
            assert_eq!(decode_all(fits.as_bytes(), step).unwrap().0, b"x", "{step}");
            assert!(decode_all(over.as_bytes(), step).is_err(), "{step}");
            assert!(decode_all(t_fits.as_bytes(), step).unwrap().1.is_some());
            assert!(decode_all(t_over.as_bytes(), step).is_err(), "{step}");
        }
    }

    /// Found by the `chunked` fuzz target: httparse ends a trailer line at
    /// a bare LF, against this module's CRLF-only rule.
    #[test]
    fn trailers_with_bare_lf_are_refused() {
        for bad in [
            &b"0\r\nx: y\n\n"[..],
            b"0\r\nx: y\r\n\n",
            b"0\r\nx: y\nz: w\r\n\r\n",
            b"0\r\n\n",
        ] {
            for step in [1, bad.len()] {
                assert!(
                    decode_all(bad, step).is_err(),
                    "{:?}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
    }

    #[test]
    fn chunk_lines_are_written_in_hex() {
        let mut out = BytesMut::new();
        chunk_start(255, &mut out);
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        write_last_chunk(Some(&t), &mut out);
        assert_eq!(&out[..], b"ff\r\n0\r\ngrpc-status: 0\r\n\r\n");
    }

    fn request(raw: &str) -> Result<Option<RequestHead>, H1Error> {
        parse_request_head(&mut BytesMut::from(raw), 1024)
    }

    #[test]
    fn an_agreeing_list_of_lengths_goes_on_as_one_value() {
        for raw in [
            "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        ] {
            let r = request(raw).unwrap().unwrap();
            assert_eq!(r.framing, Framing::Length(5));
            let all: Vec<_> = r
                .parts
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .collect();
            assert_eq!(all, ["5"], "{raw:?}");
        }
    }

    #[test]
    fn request_framing_and_smuggling_shapes() {
        let r = request("\r\nPOST /a?b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Length(5), true));
        assert_eq!(r.parts.uri, "/a?b");
        let r = request("PUT http://x/ HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert_eq!(r.parts.uri.host(), Some("x"));
        assert!(!r.parts.headers.contains_key(header::TRANSFER_ENCODING));
        let r = request("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Empty, false));
        let r = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.keep_alive);
        let r = request("POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(r.expect_continue && !r.parts.headers.contains_key(header::EXPECT));
        assert!(request("GET / HTTP/1.1\r\nHost: x").unwrap().is_none());
        for (bad, status) in [
            (
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                501,
            ),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            ("GET / HTTP/1.1\nHost: x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: x\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: x\r\nX: a\nY: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: x\r\n\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nExpect: later\r\n\r\n", 417),
            ("G(T / HTTP/1.1\r\n\r\n", 400),
        ] {
            let e = request(bad).map(|_| ()).expect_err(bad);
            assert_eq!(e.status().as_u16(), status, "{bad:?}: {e}");
        }
        // Found by the h1_differential test: a bare CR before the request
        // line was skipped as if it were an empty line.
        for bad in ["\rGET / HTTP/1.1\r\n\r\n", "\r\n\rGET / HTTP/1.1\r\n\r\n"] {
            assert_eq!(request(bad).unwrap_err().status().as_u16(), 400, "{bad:?}");
        }
        // Found by the h1_differential test: an empty Transfer-Encoding
        // line is an empty list element (RFC 9110 section 5.6.1), so with
        // a chunked line after it the body is chunked, and no line is kept
        // (the proxy frames the body itself). With the empty line last,
        // the last coding is not chunked: 501, as hyper refuses it.
        let r =
            request("POST / HTTP/1.1\r\nTransfer-Encoding: \r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert!(!r.parts.headers.contains_key(header::TRANSFER_ENCODING));
        let bad = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n";
        assert_eq!(request(bad).unwrap_err().status().as_u16(), 501);
        // A CRLF split between reads still waits for the LF.
        assert!(request("\r\n\r").unwrap().is_none());
        let big = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(2000));
        assert_eq!(request(&big).unwrap_err().status().as_u16(), 431);
    }

    #[test]
    fn response_heads_carry_one_framing_field() {
        let resp = |status: u16, fields: &[(&'static str, &'static str)]| {
            let mut r = http::Response::new(());
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            for (k, v) in fields {
                r.headers_mut().append(*k, HeaderValue::from_static(v));
            }
            r.into_parts().0
        };
        let frame = |m: Method, v: Version, p: &http::response::Parts, len: Option<u64>| {
            response_framing_for(&m, v, p.status, &p.headers, len)
        };
        let p = resp(
            200,
            &[("content-length", "7"), ("connection", "x"), ("date", "D")],
        );
        assert_eq!(
            frame(Method::GET, Version::HTTP_11, &p, None),
            Framing::Length(7)
        );
        assert_eq!(
            frame(Method::GET, Version::HTTP_11, &p, Some(3)),
            Framing::Length(3)
        );
        assert_eq!(
            frame(Method::HEAD, Version::HTTP_11, &p, None),
            Framing::Empty
        );
        let mut out = BytesMut::new();
        write_response_head(&p, Framing::Length(7), Connection::Close, || b"N", &mut out);
        assert_eq!(
            &out[..],
            b"HTTP/1.1 200 OK\r\ndate: D\r\ncontent-length: 7\r\nconnection: close\r\n\r\n"
        );
        out.clear();
        write_response_head(&p, Framing::Empty, Connection::Default, || b"N", &mut out);
        assert_eq!(
            &out[..],
            b"HTTP/1.1 200 OK\r\ndate: D\r\ncontent-length: 7\r\n\r\n",
            "a HEAD response keeps the GET's length"
        );
        let p = resp(404, &[]);
        assert_eq!(
            frame(Method::GET, Version::HTTP_11, &p, None),
            Framing::Chunked
        );
        assert_eq!(
            frame(Method::GET, Version::HTTP_10, &p, None),
            Framing::UntilClose
        );
        out.clear();
        write_response_head(
            &p,
            Framing::Chunked,
            Connection::KeepAlive,
            || b"N",
            &mut out,
        );
        assert_eq!(
            &out[..],
            b"HTTP/1.1 404 Not Found\r\ndate: N\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\n\r\n"
        );
        assert_eq!(
            frame(Method::GET, Version::HTTP_11, &resp(304, &[]), None),
            Framing::Empty
        );
    }

    #[test]
    fn a_101_is_a_head_only_where_a_switch_was_asked_for() {
        let wire = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n\x81\x02hi";
        let mut buf = BytesMut::from(&wire[..]);
        let head = parse_upgrade_response_head(&mut buf, 1024)
            .unwrap()
            .expect("whole");
        assert_eq!(head.parts.status, 101);
        assert_eq!(head.framing, Framing::Empty);
        assert!(!head.keep_alive);
        assert_eq!(head.parts.headers["sec-websocket-accept"], "x");
        // Hop-by-hop fields are left out, as from any head.
        assert!(!head.parts.headers.contains_key("upgrade"));
        // What follows is the new protocol's, untouched.
        assert_eq!(&buf[..], b"\x81\x02hi");
        // Elsewhere a 101 is refused, and other 1xx are skipped here too.
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(
            parse_response_head(&mut buf, &Method::GET, 1024),
            Err(H1Error::Upgrade)
        ));
        let mut buf = BytesMut::from(&b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n"[..]);
        let head = parse_upgrade_response_head(&mut buf, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(head.parts.status, 426);
        // Written, a 101 keeps its Upgrade field and says so in Connection.
        let mut out = BytesMut::new();
        let mut r = http::Response::new(());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        r.headers_mut()
            .insert(header::DATE, HeaderValue::from_static("D"));
        let p = r.into_parts().0;
        write_response_head(&p, Framing::Empty, Connection::Upgrade, || b"N", &mut out);
        assert_eq!(
            &out[..],
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\ndate: D\r\nconnection: upgrade\r\n\r\n"
        );
    }

    /// What a reader made of a body fed in `pieces` (one read each; then
    /// the connection closes): its data frames, its trailers, and how it
    /// ended, with what is left in the buffer for the next message.
    #[derive(Debug, Default)]
    struct Read {
        frames: Vec<Vec<u8>>,
        trailers: Option<HeaderMap>,
        error: Option<String>,
        left: Vec<u8>,
    }

    fn read_body(framing: Framing, start: &[u8], pieces: &[&[u8]]) -> Read {
        let mut reader = BodyReader::new(framing, 1024);
        let mut buf = BytesMut::from(start);
        let mut pieces = pieces.iter();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Read::default();
        loop {
            let polled = reader.poll_frame(&mut buf, &mut cx, |_, buf| {
                Poll::Ready(Ok(pieces.next().map_or(0, |p| {
                    buf.extend_from_slice(p);
                    p.len()
                })))
            });
            match polled {
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => out.frames.push(d.to_vec()),
                    Err(f) => out.trailers = f.into_trailers().ok(),
                },
                Poll::Ready(Some(Err(e))) => {
                    out.error = Some(e.to_string());
                    assert!(reader.is_done(), "a failed body is over");
                    break;
                }
                Poll::Ready(None) => break,
                Poll::Pending => unreachable!("reads are always ready here"),
            }
        }
        out.left = buf.to_vec();
        out
    }

    #[test]
    fn a_length_body_ends_at_its_length_whatever_the_reads() {
        let r = read_body(Framing::Length(5), b"he", &[b"l", b"loGET / HTTP/1.1"]);
        assert_eq!(r.frames, [&b"he"[..], b"l", b"lo"]);
        assert_eq!(r.left, b"GET / HTTP/1.1", "the next message is left alone");
        assert!(r.error.is_none());
        let r = read_body(Framing::Length(5), b"", &[b"abc"]);
        assert_eq!(
            r.error.as_deref(),
            Some("the connection closed before the end of the body")
        );
        for empty in [Framing::Empty, Framing::Length(0)] {
            let reader = BodyReader::new(empty, 1024);
            assert!(reader.is_done());
            assert_eq!(reader.size_hint().exact(), Some(0));
            assert!(read_body(empty, b"next", &[]).frames.is_empty());
        }
    }

    #[test]
    fn a_length_body_counts_down_its_size_hint() {
        let mut reader = BodyReader::new(Framing::Length(5), 1024);
        assert_eq!(reader.size_hint().exact(), Some(5));
        let mut buf = BytesMut::from(&b"ab"[..]);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = reader.poll_frame(&mut buf, &mut cx, |_, _| Poll::Pending);
        assert_eq!(reader.size_hint().exact(), Some(3));
        // Nothing to read: pending, not an end.
        let polled = reader.poll_frame(&mut buf, &mut cx, |_, _| Poll::Pending);
        assert!(polled.is_pending());
        assert!(BodyReader::new(Framing::Chunked, 1024)
            .size_hint()
            .exact()
            .is_none());
    }

    #[test]
    fn a_chunked_body_ends_at_its_last_chunk_and_fails_when_cut() {
        let r = read_body(
            Framing::Chunked,
            b"2\r\nab",
            &[b"\r\n1\r\nc\r\n0\r\nx-t: 1\r\n", b"\r\nNEXT"],
        );
        assert_eq!(r.frames.concat(), b"abc");
        assert_eq!(r.trailers.unwrap()["x-t"], "1");
        assert_eq!(r.left, b"NEXT");
        let r = read_body(Framing::Chunked, b"", &[b"0\r\n\r\n"]);
        assert!(r.frames.is_empty() && r.trailers.is_none() && r.error.is_none());
        let r = read_body(Framing::Chunked, b"5\r\nab", &[]);
        assert!(r.error.is_some());
        let r = read_body(Framing::Chunked, b"zz\r\n", &[]);
        assert_eq!(r.error.as_deref(), Some("malformed chunked body"));
    }

    #[test]
    fn small_chunks_already_read_go_out_as_one_frame_and_the_end_after_it() {
        // 40,000 one-byte chunks in a few reads: a few frames, not 40,000
        // (each would be an HTTP/2 DATA frame on the mesh).
        let body: Vec<u8> = b"1\r\nx\r\n".repeat(40_000);
        let mut pieces: Vec<&[u8]> = body.chunks(64 * 1024).collect();
        pieces.push(b"0\r\nx-t: 1\r\n\r\nNEXT");
        let r = read_body(Framing::Chunked, b"", &pieces);
        assert_eq!(r.frames.concat().len(), 40_000);
        assert!(r.frames.len() < 40, "{} frames", r.frames.len());
        assert!(r.frames.iter().all(|f| f.len() <= COALESCE + 1));
        assert_eq!(r.trailers.unwrap()["x-t"], "1");
        assert_eq!(r.left, b"NEXT");
        // The end found while merging comes after the data, as it was sent:
        // without trailers, and broken.
        let r = read_body(Framing::Chunked, b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n", &[]);
        assert_eq!(
            (r.frames, r.trailers.is_none()),
            (vec![b"ab".to_vec()], true)
        );
        let r = read_body(Framing::Chunked, b"1\r\na\r\n1\r\nb\r\nzz\r\n", &[]);
        assert_eq!(r.frames, [b"ab".to_vec()]);
        assert_eq!(r.error.as_deref(), Some("malformed chunked body"));
        // A large chunk goes as it is.
        let big = format!("4000\r\n{}\r\n0\r\n\r\n", "y".repeat(0x4000));
        let r = read_body(Framing::Chunked, big.as_bytes(), &[]);
        assert_eq!(r.frames.len(), 1);
    }

    #[test]
    fn an_until_close_body_ends_at_the_close() {
        let r = read_body(Framing::UntilClose, b"ab", &[b"cd", b"ef"]);
        assert_eq!(r.frames.concat(), b"abcdef");
        assert!(r.error.is_none());
    }

    #[test]
    fn a_read_error_fails_the_body() {
        let mut reader = BodyReader::new(Framing::Length(5), 1024);
        let mut buf = BytesMut::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let polled = reader.poll_frame(&mut buf, &mut cx, |_, _| {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        });
        assert!(matches!(polled, Poll::Ready(Some(Err(BodyError::Io(_))))));
        assert!(reader.is_done());
    }

    #[test]
    fn the_guard_follows_the_framing_the_server_reads() {
        let framing = |h: &str| request_body_framing(h.as_bytes());
        assert_eq!(framing("GET / HTTP/1.1\r\n\r\n"), Some(Framing::Empty));
        assert_eq!(
            framing("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Some(Framing::Empty)
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nContent-Length: 7\r\n\r\n"),
            Some(Framing::Length(7))
        );
        assert_eq!(
            framing("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(Framing::Chunked)
        );
        for refused in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\n",
        ] {
            assert_eq!(framing(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn a_response_with_content_length_zero_has_no_body_and_keeps_the_connection() {
        let r = head("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Empty, true));
        let r = head(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.framing, r.keep_alive), (Framing::Empty, true));
    }
}
