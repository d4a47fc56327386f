//! The request-path normalizer both listeners run before any decision.
//!
//! Route policy, step-up and the app must all see one and the same path:
//! if the sidecar matched `/public/../admin` as written while the app
//! resolved it to `/admin`, the policy would be walked around. So the path
//! is put in a single canonical form first, refused when no safe canonical
//! form exists, and that form is what the policy matches and what is
//! forwarded.
//!
//! The canonical form (every [`Mode`]):
//! - percent-encoded unreserved characters (RFC 3986 section 2.3: ALPHA,
//!   DIGIT, `-`, `.`, `_`, `~`) are decoded, and the hex of every other
//!   percent-encoding is upper-cased (`%2e` is `.`, `%c3` is `%C3`). This
//!   happens before dot-segment removal, so `/a/%2e%2e/b` is `/b`. A `%25`
//!   stays `%25`: nothing is decoded twice (and one followed by two hex
//!   digits, a double encoding, is refused);
//! - dot segments are removed as RFC 3986 section 5.2.4 says;
//! - with [`Mode::Strict`], runs of `/` are merged into one.
//!
//! Refused, because apps disagree on what they mean (see [`PathError`]): an
//! encoded `/` or `\`, an encoded `?` or `#`, a double encoding (`%2561`),
//! a raw `\`, encoded control bytes, invalid
//! percent-encoding, dot segments climbing above the root, `;` (path
//! parameters: Java servlet containers read `/..;/` as `/../`), raw bytes
//! outside RFC 3986 `pchar`, and a path not starting with `/`.
//!
//! Non-ASCII bytes must arrive percent-encoded and stay encoded: an overlong
//! UTF-8 dot such as `%C0%AE` is not unreserved, so it is never decoded and
//! can never become `.` or `/` here.

use std::borrow::Cow;

/// How far the normalizer goes; `[inbound] path_normalization` and
/// `[outbound] path_normalization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Decode unreserved characters, upper-case the rest, remove dot
    /// segments, merge repeated slashes (`"strict"`, the default).
    #[default]
    Strict,
    /// As `Strict`, but repeated slashes are kept as sent
    /// (`"keep-slashes"`), for apps where `//` means something. Route
    /// matching still sees the merged form, so `//admin` is under `/admin`.
    KeepSlashes,
}

impl Mode {
    /// Parses the configuration value.
    pub fn from_name(name: &str) -> Option<Mode> {
        match name {
            "strict" => Some(Mode::Strict),
            "keep-slashes" => Some(Mode::KeepSlashes),
            _ => None,
        }
    }
}

/// Why a path has no safe canonical form. Each is a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%2F` or `%5C`: decoded by some apps into a separator, kept by others.
    #[error("the path contains an encoded '/' or '\\'")]
    EncodedSlash,
    /// A raw `\`, which some apps and platforms treat as `/`.
    #[error("the path contains a backslash")]
    Backslash,
    /// `%00`-`%1F` or `%7F`.
    #[error("the path contains an encoded control character")]
    EncodedControl,
    /// `%` not followed by two hex digits.
    #[error("the path contains invalid percent-encoding")]
    BadPercentEncoding,
    /// A `..` segment with nothing left to remove (`/..`, `/a/../../b`).
    #[error("the path climbs above the root")]
    AboveRoot,
    /// Not starting with `/` (or `*` other than for `OPTIONS`).
    #[error("the path does not start with '/'")]
    NotAbsolute,
    /// `;` or `%3B`: path parameters, which servlet containers strip (and
    /// read `..;` as `..`), so the app's path would not be the one matched.
    #[error("the path contains ';' (path parameters are not accepted)")]
    Semicolon,
    /// A byte RFC 3986 does not allow raw in a path (space, `"`, `<`, `{`,
    /// `|`, `^`, non-ASCII...); it must be percent-encoded.
    #[error("the path contains a character that must be percent-encoded")]
    InvalidCharacter,
    /// `%3F` or `%23`: a hop that decodes the path before passing it on
    /// (nginx's `proxy_pass http://backend$uri`, a `rewrite`) ends the path
    /// there, and the rest becomes a query or a fragment.
    #[error("the path contains an encoded '?' or '#'")]
    EncodedDelimiter,
    /// `%25` followed by two hex digits: decoded once it is another
    /// percent-encoding (`%2561` is `%61`), which a hop that decodes the
    /// path passes on for the app to decode again.
    #[error("the path contains an encoded '%' followed by two hex digits (double encoding)")]
    DoubleEncoded,
}

/// Every `reason` label of `keyproof_http_requests_refused_total`, in the
/// order of [`PathError::index`].
pub const REFUSAL_REASONS: [&str; 10] = [
    "encoded_slash",
    "backslash",
    "encoded_control",
    "bad_percent_encoding",
    "above_root",
    "not_absolute",
    "semicolon",
    "invalid_character",
    "encoded_delimiter",
    "double_encoded",
];

impl PathError {
    /// The metric label and log reason.
    pub fn reason(self) -> &'static str {
        REFUSAL_REASONS[self.index()]
    }

    /// Position in [`REFUSAL_REASONS`].
    pub fn index(self) -> usize {
        match self {
            PathError::EncodedSlash => 0,
            PathError::Backslash => 1,
            PathError::EncodedControl => 2,
            PathError::BadPercentEncoding => 3,
            PathError::AboveRoot => 4,
            PathError::NotAbsolute => 5,
            PathError::Semicolon => 6,
            PathError::InvalidCharacter => 7,
            PathError::EncodedDelimiter => 8,
            PathError::DoubleEncoded => 9,
        }
    }
}

/// RFC 3986 `unreserved`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// What a raw byte of the path is allowed to be: `pchar` minus `;` and
/// `%` (handled apart), plus `/`.
fn check_raw(b: u8) -> Result<(), PathError> {
    match b {
        _ if is_unreserved(b) => Ok(()),
        b'/' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':'
        | b'@' => Ok(()),
        b';' => Err(PathError::Semicolon),
        b'\\' => Err(PathError::Backslash),
        _ => Err(PathError::InvalidCharacter),
    }
}

/// Bytes that are normal wherever they stand (everything `check_raw`
/// accepts but `/`), looked up in one load on the fast path.
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
            );
        i += 1;
    }
    t
};

/// The value of one hex digit, either case.
pub(crate) fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// The byte `%XY` at `path[i]` stands for, refused when it may not appear
/// encoded at all.
fn decode_at(path: &[u8], i: usize) -> Result<u8, PathError> {
    let hi = path.get(i + 1).copied().and_then(hex_val);
    let lo = path.get(i + 2).copied().and_then(hex_val);
    let (Some(hi), Some(lo)) = (hi, lo) else {
        return Err(PathError::BadPercentEncoding);
    };
    match hi << 4 | lo {
        b'/' | b'\\' => Err(PathError::EncodedSlash),
        v if v < 0x20 || v == 0x7F => Err(PathError::EncodedControl),
        b';' => Err(PathError::Semicolon),
        b'?' | b'#' => Err(PathError::EncodedDelimiter),
        b'%' if hex_digits_follow(path, i + 3) => Err(PathError::DoubleEncoded),
        v => Ok(v),
    }
}

/// Whether the two bytes from `path[j]` on are hex digits once decoded:
/// `%25%32%46` becomes `%252F` when the digits (unreserved) are decoded.
fn hex_digits_follow(path: &[u8], j: usize) -> bool {
    let next = |j: usize| -> Option<(u8, usize)> {
        match *path.get(j)? {
            b'%' => {
                let hi = hex_val(*path.get(j + 1)?)?;
                let lo = hex_val(*path.get(j + 2)?)?;
                Some((hi << 4 | lo, j + 3))
            }
            b => Some((b, j + 1)),
        }
    };
    let Some((a, j)) = next(j) else { return false };
    let Some((b, _)) = next(j) else { return false };
    hex_val(a).is_some() && hex_val(b).is_some()
}

/// Whether the segment starting at `path[i]` (just after a `/`) is `.` or
/// `..`.
fn dot_segment_at(path: &[u8], i: usize) -> bool {
    let seg_end = |j: usize| !matches!(path.get(j), Some(&b) if b != b'/');
    match path.get(i) {
        Some(b'.') => seg_end(i + 1) || (path.get(i + 1) == Some(&b'.') && seg_end(i + 2)),
        _ => false,
    }
}

/// Normalizes a request path (without its query). `Ok(Cow::Borrowed)` is the
/// common case, an already-normal path: one scan, no allocation.
pub fn normalize(path: &str, mode: Mode) -> Result<Cow<'_, str>, PathError> {
    match rewrite(path.as_bytes(), mode)? {
        None => Ok(Cow::Borrowed(path)),
        Some(s) => Ok(Cow::Owned(s)),
    }
}

/// [`normalize`] on raw bytes (a request target as received, or fuzz
/// input). Only ASCII is ever accepted, so the result is text.
pub fn normalize_bytes(path: &[u8], mode: Mode) -> Result<Cow<'_, str>, PathError> {
    match rewrite(path, mode)? {
        // The scan accepted only ASCII bytes.
        None => std::str::from_utf8(path)
            .map(Cow::Borrowed)
            .map_err(|_| PathError::InvalidCharacter),
        Some(s) => Ok(Cow::Owned(s)),
    }
}

/// `None`: already normal. One pass that either proves that or finds the
/// first spot needing a rewrite, after which the slow path takes over.
fn rewrite(path: &[u8], mode: Mode) -> Result<Option<String>, PathError> {
    if path.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if PLAIN[usize::from(b)] {
            i += 1;
            continue;
        }
        if b == b'%' {
            let v = decode_at(path, i)?;
            let upper = |b: u8| !b.is_ascii_lowercase();
            if is_unreserved(v) || !upper(path[i + 1]) || !upper(path[i + 2]) {
                return slow(path, mode).map(Some);
            }
            i += 3;
            continue;
        }
        check_raw(b)?;
        // A leading `//` in either mode: the target would read as a
        // network-path reference (`//host/path`, RFC 3986 section 4.2) to
        // an app that resolves it as a URL, which WHATWG's parser and
        // Python's `urlsplit` do.
        if b == b'/'
            && (((mode == Mode::Strict || i == 0) && path.get(i + 1) == Some(&b'/'))
                || dot_segment_at(path, i + 1))
        {
            return slow(path, mode).map(Some);
        }
        i += 1;
    }
    Ok(None)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn slow(path: &[u8], mode: Mode) -> Result<String, PathError> {
    // Pass 1: percent-decoding. Decoded bytes are unreserved, so no new
    // `/`, `%` or `;` can appear, only dots and names.
    let mut dec = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            let v = decode_at(path, i)?;
            if is_unreserved(v) {
                dec.push(v);
            } else {
                dec.extend_from_slice(&[b'%', HEX[usize::from(v >> 4)], HEX[usize::from(v & 15)]]);
            }
            i += 3;
        } else {
            check_raw(b)?;
            dec.push(b);
            i += 1;
        }
    }
    // Pass 2: dot segments (RFC 3986 section 5.2.4) and slashes. `dec`
    // starts with `/`; each piece after a `/` is one segment.
    let mut stack: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    let mut segs = dec[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = segs.next() {
        let last = segs.peek().is_none();
        match seg {
            b"." => trailing = true,
            b".." => {
                stack.pop().ok_or(PathError::AboveRoot)?;
                trailing = true;
            }
            b"" if last => trailing = true,
            // Merged in strict mode; kept otherwise, except where none
            // is kept yet: the path never starts with `//`.
            b"" if mode == Mode::Strict || stack.is_empty() => {}
            s => {
                stack.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(dec.len());
    for s in &stack {
        out.push('/');
        // Every byte passed `check_raw` or is a `%XX` triple: ASCII.
        out.extend(s.iter().map(|&b| char::from(b)));
    }
    if trailing || stack.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// The path as route matching sees it: with [`Mode::KeepSlashes`] a path
/// that kept `//` is matched in its merged form, so that `//admin` is under
/// a `/admin` route whatever the app makes of the double slash.
pub fn match_form(normal: &str, mode: Mode) -> Cow<'_, str> {
    if mode == Mode::Strict || !normal.contains("//") {
        return Cow::Borrowed(normal);
    }
    let mut out = String::with_capacity(normal.len());
    for c in normal.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The request target with its path normalized: `Ok(None)` when it already
/// was (the common case, no allocation), else the URI to use from here on,
/// scheme, authority and query untouched. `*` is accepted for `OPTIONS`
/// only; an empty path (absolute-form without one) becomes `/`.
pub fn normalize_uri(
    method: &http::Method,
    uri: &http::Uri,
    mode: Mode,
) -> Result<Option<http::Uri>, PathError> {
    if uri.path() == "*" {
        return if method == http::Method::OPTIONS {
            Ok(None)
        } else {
            Err(PathError::NotAbsolute)
        };
    }
    // `Uri::path` reads an empty path as `/`, but what is forwarded is the
    // target as written: `http://x?q` must go on as `/?q`, never as `?q`.
    let raw = uri
        .path_and_query()
        .map_or("", |pq| pq.as_str().split('?').next().unwrap_or(""));
    let normal = match raw {
        "" => Cow::Borrowed("/"),
        p => match normalize(p, mode)? {
            Cow::Borrowed(_) => return Ok(None),
            owned => owned,
        },
    };
    let pq = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal.into_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        http::uri::PathAndQuery::from_maybe_shared(bytes::Bytes::from(pq))
            .map_err(|_| PathError::InvalidCharacter)?,
    );
    http::Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| PathError::InvalidCharacter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, Mode::Strict).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/admin",
            "/admin/",
            "/a/b/c.txt",
            "/a%20b",
            "/%C3%A9t%C3%A9",
            "/a/...",
            "/a/.b/..c",
            "/a:b@c!$&'()*+,=",
            "/~user/x-y_z",
        ] {
            assert!(
                matches!(normalize(p, Mode::Strict), Ok(Cow::Borrowed(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn table() {
        let ok = [
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("/public/%2e./admin", "/admin"),
            ("/./admin", "/admin"),
            ("/admin/.", "/admin/"),
            ("/admin/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/b/../", "/a/"),
            ("//admin", "/admin"),
            ("/public//../admin", "/admin"),
            ("/public/./../admin", "/admin"),
            ("/a///b//", "/a/b/"),
            ("/%61dmin", "/admin"),
            ("/%41%5a%30%2D%2e%5F%7E", "/AZ0-._~"),
            ("/%25", "/%25"),
            ("/100%25-done", "/100%25-done"),
            ("/%25g1", "/%25g1"),
            ("/a%3a%40%c3%a9", "/a%3A%40%C3%A9"),
            ("/%C0%AE%C0%AE/admin", "/%C0%AE%C0%AE/admin"),
            ("/%c0%ae", "/%C0%AE"),
            ("/%e0%80%ae", "/%E0%80%AE"),
            ("/a/%2e", "/a/"),
            ("/a/%2e/", "/a/"),
            ("/.../x", "/.../x"),
            ("/./", "/"),
            ("/.", "/"),
            ("//", "/"),
            ("/ADMIN", "/ADMIN"),
        ];
        for (input, want) in ok {
            assert_eq!(n(input).as_deref(), Ok(want), "{input}");
        }
        let bad = [
            ("/public/..%2fadmin", PathError::EncodedSlash),
            ("/admin%3F/users", PathError::EncodedDelimiter),
            ("/admin%3f", PathError::EncodedDelimiter),
            ("/admin%23/users", PathError::EncodedDelimiter),
            ("/adm%2569n/users", PathError::DoubleEncoded),
            ("/%2561dmin", PathError::DoubleEncoded),
            ("/a%252F", PathError::DoubleEncoded),
            ("/a%25%32%46", PathError::DoubleEncoded),
            ("/admin%2f", PathError::EncodedSlash),
            ("/admin%2F", PathError::EncodedSlash),
            ("/a%5cb", PathError::EncodedSlash),
            ("/a%5Cb", PathError::EncodedSlash),
            ("\\admin", PathError::NotAbsolute),
            ("/a\\b", PathError::Backslash),
            ("/admin%00", PathError::EncodedControl),
            ("/a%0d%0aX:y", PathError::EncodedControl),
            ("/a%1f", PathError::EncodedControl),
            ("/a%7f", PathError::EncodedControl),
            ("/a%zz", PathError::BadPercentEncoding),
            ("/a%4", PathError::BadPercentEncoding),
            ("/a%", PathError::BadPercentEncoding),
            ("/a%%41", PathError::BadPercentEncoding),
            ("/a%+1", PathError::BadPercentEncoding),
            ("/..", PathError::AboveRoot),
            ("/../admin", PathError::AboveRoot),
            ("/a/../../b", PathError::AboveRoot),
            ("/%2e%2e/admin", PathError::AboveRoot),
            ("//..", PathError::AboveRoot),
            ("admin", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("/admin;x=y", PathError::Semicolon),
            ("/public/..;/admin", PathError::Semicolon),
            ("/public/.;/admin", PathError::Semicolon),
            ("/a%3bb", PathError::Semicolon),
            ("/a%3Bb", PathError::Semicolon),
            ("/a b", PathError::InvalidCharacter),
            ("/a\"b", PathError::InvalidCharacter),
            ("/a{b}", PathError::InvalidCharacter),
            ("/a|b", PathError::InvalidCharacter),
            ("/a^b", PathError::InvalidCharacter),
            ("/a[b]", PathError::InvalidCharacter),
            ("/a<b>", PathError::InvalidCharacter),
            ("/a`b", PathError::InvalidCharacter),
            ("/é", PathError::InvalidCharacter),
            ("/a\u{0}", PathError::InvalidCharacter),
            ("/a?b", PathError::InvalidCharacter),
            ("/a#b", PathError::InvalidCharacter),
        ];
        for (input, want) in bad {
            assert_eq!(n(input), Err(want), "{input}");
        }
    }

    #[test]
    fn keep_slashes() {
        let k = |p| normalize(p, Mode::KeepSlashes).map(Cow::into_owned);
        assert!(matches!(
            normalize("/a//b/", Mode::KeepSlashes),
            Ok(Cow::Borrowed(_))
        ));
        // Never a leading `//`: an app resolving the target as a URL would
        // read `//x/admin` as host `x`, path `/admin`.
        assert_eq!(k("//a//b/").as_deref(), Ok("/a//b/"));
        assert_eq!(k("///x/admin").as_deref(), Ok("/x/admin"));
        assert_eq!(k("/a/..//x/admin").as_deref(), Ok("/x/admin"));
        assert_eq!(k("/.//x/admin").as_deref(), Ok("/x/admin"));
        assert_eq!(k("//a/./b//../c").as_deref(), Ok("/a/b/c"));
        assert_eq!(k("/a//..").as_deref(), Ok("/a/"));
        assert_eq!(k("/%61//").as_deref(), Ok("/a//"));
        assert_eq!(k("/.."), Err(PathError::AboveRoot));
        assert_eq!(match_form("//admin//x", Mode::KeepSlashes), "/admin/x");
        assert_eq!(match_form("//admin", Mode::Strict), "//admin");
    }

    #[test]
    fn uris() {
        let get = http::Method::GET;
        let u = |s: &str| s.parse::<http::Uri>().unwrap();
        let out = normalize_uri(
            &get,
            &u("http://x/public/../admin?a=/../b%2f"),
            Mode::Strict,
        )
        .unwrap()
        .unwrap();
        assert_eq!(out.to_string(), "http://x/admin?a=/../b%2f");
        assert_eq!(
            normalize_uri(&get, &u("/a/./b?q"), Mode::Strict)
                .unwrap()
                .unwrap()
                .to_string(),
            "/a/b?q"
        );
        assert!(normalize_uri(&get, &u("/a/b?q/../x"), Mode::Strict)
            .unwrap()
            .is_none());
        assert_eq!(
            normalize_uri(&get, &u("*"), Mode::Strict),
            Err(PathError::NotAbsolute)
        );
        assert!(normalize_uri(&http::Method::OPTIONS, &u("*"), Mode::Strict)
            .unwrap()
            .is_none());
        // Absolute-form without a path: the app gets `/`, query kept.
        let out = normalize_uri(&get, &u("http://x?q=1"), Mode::Strict)
            .unwrap()
            .unwrap();
        assert_eq!(out.path_and_query().map(|p| p.as_str()), Some("/?q=1"));
    }

    #[test]
    fn reasons_are_distinct() {
        let mut r = REFUSAL_REASONS.to_vec();
        r.sort_unstable();
        r.dedup();
        assert_eq!(r.len(), REFUSAL_REASONS.len());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// Paths built from the pieces that matter: separators, dots in
        /// every spelling, encodings of every class, names.
        fn piece() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("/".to_owned()),
                Just(".".to_owned()),
                Just("..".to_owned()),
                Just("%2e".to_owned()),
                Just("%2E".to_owned()),
                Just("%2f".to_owned()),
                Just("%25".to_owned()),
                Just(";".to_owned()),
                Just("\\".to_owned()),
                Just("%".to_owned()),
                "[a-zA-Z0-9_~-]{1,4}",
                (0u8..=255).prop_map(|b| format!("%{b:02x}")),
                (0u8..=255).prop_map(|b| format!("%{b:02X}")),
                (0x20u8..0x7f).prop_map(|b| char::from(b).to_string()),
            ]
        }

        fn path() -> impl Strategy<Value = String> {
            prop::collection::vec(piece(), 0..24).prop_map(|v| format!("/{}", v.concat()))
        }

        fn is_normal_strict(s: &str) -> bool {
            !s.contains("//")
                && !s.contains("/./")
                && !s.contains("/../")
                && !s.ends_with("/.")
                && !s.ends_with("/..")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn fixed_point_and_clean(p in path()) {
                for mode in [Mode::Strict, Mode::KeepSlashes] {
                    let Ok(once) = normalize(&p, mode) else { continue };
                    let twice = normalize(&once, mode);
                    prop_assert!(matches!(twice, Ok(Cow::Borrowed(_))), "{p:?} -> {once:?} -> {twice:?}");
                    prop_assert!(once.starts_with('/'));
                    let s = once.to_ascii_uppercase();
                    prop_assert!(!s.contains("%2F") && !s.contains("%5C") && !s.contains("%3B"));
                    prop_assert!(!once.contains(';') && !once.contains('\\'));
                    prop_assert!(!once.contains("/./") && !once.contains("/../"));
                    // Upper-case hex after every `%`, and never an
                    // encoded unreserved character.
                    let b = once.as_bytes();
                    for (i, _) in once.match_indices('%') {
                        let hex = &b[i + 1..i + 3];
                        prop_assert!(hex.iter().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)), "{once}");
                        let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
                        prop_assert!(!is_unreserved(v), "{once}");
                    }
                    if mode == Mode::Strict {
                        prop_assert!(is_normal_strict(&once), "{p:?} -> {once:?}");
                    } else {
                        prop_assert!(is_normal_strict(&match_form(&once, mode)));
                    }
                }
            }

            #[test]
            fn bytes_and_str_agree(p in path()) {
                prop_assert_eq!(normalize(&p, Mode::Strict), normalize_bytes(p.as_bytes(), Mode::Strict));
            }

            #[test]
            fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..64)) {
                let mut v = vec![b'/'];
                v.extend(b);
                if let Ok(out) = normalize_bytes(&v, Mode::Strict) {
                    prop_assert!(matches!(normalize(&out, Mode::Strict), Ok(Cow::Borrowed(_))));
                }
            }
        }
    }
}
