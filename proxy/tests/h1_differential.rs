//! Differential test of keyproof's request-head parser against `httparse`
//! used as a plain RFC 9112 parser: the same generated heads go to both,
//! and every disagreement must be one listed in [`RULES`], with the rule
//! that makes keyproof stricter or lets it take a field out. Anything else
//! fails the test.
//!
//! keyproof builds on httparse, so what it adds is what is tested here: the
//! framing rules, the `http` crate's stricter URI and field types, the
//! fields it takes out, and the leading empty lines it skips itself.
//!
//! Heads are generated structurally (methods, targets, versions, field
//! names and values with tricky bytes, CRLF or bare LF, whitespace before
//! the colon, obs-fold) and as random bytes.

use bytes::BytesMut;
use keyproof_proxy::http::h1::{parse_request_head, Framing, H1Error, RequestHead};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const MAX: usize = 64 * 1024;

/// httparse's reading of a complete head, which the rules look at.
struct Plain<'a> {
    method: &'a str,
    target: &'a str,
    version: u8,
    fields: Vec<(&'a str, &'a [u8])>,
    /// The head's bytes, for rules about line endings.
    raw: &'a [u8],
}

impl Plain<'_> {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    fn has(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }

    /// The transfer codings, in order, lower-cased and trimmed.
    fn codings(&self) -> Vec<String> {
        self.values("transfer-encoding")
            .flat_map(|v| v.split(|b| *b == b','))
            .map(|c| String::from_utf8_lossy(c.trim_ascii()).to_ascii_lowercase())
            .collect()
    }
}

/// What keyproof may do differently from httparse for a head a rule
/// applies to.
#[derive(Clone, Copy)]
enum Allowed {
    /// Refuse it, with an error this function accepts.
    Refuses(fn(&H1Error) -> bool),
    /// Accept it without the field lines this function picks (name
    /// lower-cased, value as httparse read it); every other line is kept.
    Drops(fn(&str, &[u8]) -> bool),
}

/// One listed disagreement: keyproof is stricter by design here, or takes
/// out a field it handles itself.
struct Rule {
    name: &'static str,
    /// The rule keyproof follows (RFC section, or the type that refuses).
    why: &'static str,
    applies: fn(&Plain<'_>) -> bool,
    allowed: Allowed,
}

fn lengths_disagree(p: &Plain<'_>) -> bool {
    let mut seen = None;
    for item in p
        .values("content-length")
        .flat_map(|v| v.split(|b| *b == b','))
    {
        let item = item.trim_ascii();
        let n = match std::str::from_utf8(item)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        {
            Some(s) => match s.parse::<u64>() {
                Ok(n) => n,
                Err(_) => return true,
            },
            None => return true,
        };
        if seen.is_some_and(|s| s != n) {
            return true;
        }
        seen = Some(n);
    }
    false
}

/// A refusal of the request's transfer coding: one keyproof does not
/// decode (501), or one beside a length (400, checked first).
fn is_te(e: &H1Error) -> bool {
    matches!(e, H1Error::TransferEncoding | H1Error::BothFramings)
}

/// A `Transfer-Encoding` value naming no coding but `chunked`: its list
/// elements are all `chunked` or empty.
fn only_chunked_or_empty(v: &[u8]) -> bool {
    v.split(|b| *b == b',').all(|c| {
        let c = c.trim_ascii();
        c.is_empty() || c.eq_ignore_ascii_case(b"chunked")
    })
}

/// The listed disagreements. To add one, name it, cite the rule, say which
/// heads it covers (in httparse's reading) and what keyproof does instead.
const RULES: &[Rule] = &[
    Rule {
        name: "transfer-encoding with content-length",
        why: "RFC 9112 section 6.1: a request with both is refused, as \
              either framing could be the one another party reads",
        applies: |p| p.has("transfer-encoding") && p.has("content-length"),
        allowed: Allowed::Refuses(|e| matches!(e, H1Error::BothFramings | H1Error::ChunkedTwice)),
    },
    Rule {
        name: "transfer-encoding not ending in chunked",
        why: "RFC 9112 section 6.3 item 4: the request body length cannot \
              be determined; keyproof answers 501",
        applies: |p| {
            p.has("transfer-encoding") && p.codings().last().map(String::as_str) != Some("chunked")
        },
        allowed: Allowed::Refuses(is_te),
    },
    Rule {
        name: "transfer-encoding in HTTP/1.0",
        why: "RFC 9112 section 6.1: an HTTP/1.0 message with a transfer \
              coding is faulty",
        applies: |p| p.version == 0 && p.has("transfer-encoding"),
        allowed: Allowed::Refuses(is_te),
    },
    Rule {
        name: "content-length not one decimal number",
        why: "RFC 9110 section 8.6 and RFC 9112 section 6.3 item 5: \
              different or invalid lengths are unrecoverable",
        applies: lengths_disagree,
        allowed: Allowed::Refuses(|e| matches!(e, H1Error::ContentLength)),
    },
    Rule {
        name: "expectation other than 100-continue",
        why: "RFC 9110 section 10.1.1: 417 for an expectation not met",
        applies: |p| {
            p.values("expect")
                .next()
                .is_some_and(|v| !v.eq_ignore_ascii_case(b"100-continue"))
        },
        allowed: Allowed::Refuses(|e| matches!(e, H1Error::Expectation)),
    },
    Rule {
        name: "target the http crate refuses",
        why: "http::Uri is stricter than httparse's request-target bytes \
              (RFC 3986 characters only: `<`, `>` and a backquote are \
              refused)",
        applies: |p| http::Uri::try_from(p.target).is_err(),
        allowed: Allowed::Refuses(|e| matches!(e, H1Error::Target)),
    },
    Rule {
        name: "method the http crate refuses",
        why: "http::Method takes RFC 9110 tokens only",
        applies: |p| http::Method::from_bytes(p.method.as_bytes()).is_err(),
        allowed: Allowed::Refuses(|e| matches!(e, H1Error::Method)),
    },
    Rule {
        name: "bare LF line ending",
        why: "RFC 9112 section 2.2: a recipient may refuse a bare LF; \
              keyproof's h1 module takes CRLF only",
        applies: |p| {
            p.raw
                .iter()
                .enumerate()
                .any(|(i, b)| *b == b'\n' && (i == 0 || p.raw[i - 1] != b'\r'))
        },
        allowed: Allowed::Refuses(|e| matches!(e, H1Error::BareLf | H1Error::Head(_))),
    },
    Rule {
        name: "duplicate Host",
        why: "RFC 9112 section 3.2: 400 for more than one Host field",
        applies: |p| p.values("host").count() > 1,
        allowed: Allowed::Refuses(|_| true),
    },
    Rule {
        name: "Host disagreeing with an absolute-form target",
        why: "RFC 9112 section 3.2.2: the target's authority wins; a \
              different Host is refused so no reader picks the other",
        applies: |p| {
            http::Uri::try_from(p.target)
                .ok()
                .and_then(|u| u.authority().map(|a| a.as_str().to_ascii_lowercase()))
                .is_some_and(|a| {
                    p.values("host")
                        .any(|h| !h.trim_ascii().eq_ignore_ascii_case(a.as_bytes()))
                })
        },
        allowed: Allowed::Refuses(|_| true),
    },
    Rule {
        name: "chunked applied more than once",
        why: "RFC 9112 section 7: a sender must not apply chunked more than once",
        applies: |p| p.codings().iter().filter(|c| *c == "chunked").count() > 1,
        allowed: Allowed::Refuses(|e| {
            matches!(e, H1Error::ChunkedTwice | H1Error::TransferEncoding)
        }),
    },
    Rule {
        name: "a coding before chunked",
        why: "RFC 9112 section 6.1: keyproof decodes only chunked; a coding \
              before it is refused (501), never silently dropped",
        applies: |p| {
            let c = p.codings();
            c.last().map(String::as_str) == Some("chunked") && c.len() > 1
        },
        allowed: Allowed::Refuses(is_te),
    },
    Rule {
        name: "expect taken out",
        why: "RFC 9110 section 10.1.1: the expectation is the proxy's to \
              meet (it sends 100 Continue itself), so it is not forwarded",
        applies: |p| p.has("expect"),
        allowed: Allowed::Drops(|n, _| n == "expect"),
    },
    Rule {
        // Safe: a request keyproof accepts with Transfer-Encoding is framed
        // chunked (checked in `compare`), and then every Transfer-Encoding
        // line holds only `chunked` and empty list elements (any other
        // coding is refused above). RFC 9110 section 5.6.1 makes a
        // recipient ignore empty elements, so `TE: ` then `TE: chunked` is
        // `, chunked`, which is chunked, as hyper reads it too. keyproof
        // decodes the chunks and frames the body itself, so removing all
        // those lines drops no coding and no framing the app needs.
        name: "transfer-encoding taken out once chunked is decoded",
        why: "RFC 9112 section 6.1 and RFC 9110 section 5.6.1: the proxy \
              decodes chunked and frames the body itself; lines holding \
              only chunked and empty list elements name nothing else",
        applies: |p| p.has("transfer-encoding"),
        allowed: Allowed::Drops(|n, v| n == "transfer-encoding" && only_chunked_or_empty(v)),
    },
];

/// What one parser made of the input.
#[derive(Debug)]
enum Verdict<T> {
    Complete(T),
    NeedMore,
    Refused(String),
}

fn plain(buf: &[u8]) -> Verdict<(Plain<'_>, usize)> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Verdict::Complete((
            Plain {
                method: req.method.unwrap_or(""),
                target: req.path.unwrap_or(""),
                version: req.version.unwrap_or(1),
                fields: req.headers.iter().map(|h| (h.name, h.value)).collect(),
                raw: &buf[..len],
            },
            len,
        )),
        Ok(httparse::Status::Partial) => Verdict::NeedMore,
        Err(e) => Verdict::Refused(e.to_string()),
    }
}

fn keyproof(buf: &[u8]) -> Verdict<(RequestHead, usize)> {
    let mut b = BytesMut::from(buf);
    match parse_request_head(&mut b, MAX) {
        Ok(Some(head)) => Verdict::Complete((head, buf.len() - b.len())),
        Ok(None) => Verdict::NeedMore,
        Err(e) => Verdict::Refused(format!("{e:?}")),
    }
}

/// The fields keyproof is expected to keep, grouped by lower-case name
/// (a field map groups them), in order within a name: all httparse read
/// but those a listed rule that applies lets keyproof drop.
fn expected_fields(p: &Plain<'_>) -> Vec<(String, Vec<u8>)> {
    let drops: Vec<fn(&str, &[u8]) -> bool> = RULES
        .iter()
        .filter(|r| (r.applies)(p))
        .filter_map(|r| match r.allowed {
            Allowed::Drops(d) => Some(d),
            Allowed::Refuses(_) => None,
        })
        .collect();
    let mut out: Vec<(String, Vec<u8>)> = p
        .fields
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_vec()))
        .filter(|(n, v)| !drops.iter().any(|d| d(n, v)))
        .collect();
    // An agreeing list of lengths (`5, 5`, or two fields of 5) goes on as
    // its one value (RFC 9110 section 8.6).
    let lengths: Vec<u64> = out
        .iter()
        .filter(|(n, _)| n == "content-length")
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .filter_map(|item| std::str::from_utf8(item.trim_ascii()).ok()?.parse().ok())
        .collect();
    if lengths.len() > 1 {
        out.retain(|(n, _)| n != "content-length");
        out.push(("content-length".into(), lengths[0].to_string().into_bytes()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn kept_fields(head: &RequestHead) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = head
        .parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Compares both parsers on `input`; `Err` describes an unlisted
/// disagreement.
fn compare(input: &[u8]) -> Result<(), String> {
    let show = || format!("{:?}", String::from_utf8_lossy(input));
    match (plain(input), keyproof(input)) {
        (Verdict::NeedMore, Verdict::NeedMore) | (Verdict::Refused(_), Verdict::Refused(_)) => {
            Ok(())
        }
        (Verdict::Complete((p, len)), Verdict::Complete((head, k_len))) => {
            if len != k_len {
                return Err(format!("{}: head ends at {len} vs {k_len}", show()));
            }
            let method_ok = head.parts.method.as_str() == p.method;
            let target_ok = http::Uri::try_from(p.target).ok().as_ref() == Some(&head.parts.uri);
            let version_ok = (head.parts.version == http::Version::HTTP_10) == (p.version == 0);
            if !(method_ok && target_ok && version_ok) {
                return Err(format!(
                    "{}: request line read differently: {:?}",
                    show(),
                    head.parts
                ));
            }
            // The rules above let keyproof drop framing fields, so the
            // framing it reads is checked against httparse's fields here:
            // a Transfer-Encoding it accepts is chunked, and without one a
            // body is the Content-Length (the rules refuse any other).
            let framing = if p.has("transfer-encoding") {
                Framing::Chunked
            } else {
                match p.values("content-length").next() {
                    None => Framing::Empty,
                    Some(v) => {
                        let first = v.split(|b| *b == b',').next().unwrap_or_default();
                        match std::str::from_utf8(first.trim_ascii()).map(str::parse) {
                            Ok(Ok(0)) => Framing::Empty,
                            Ok(Ok(n)) => Framing::Length(n),
                            _ => return Err(format!("{}: bad length accepted", show())),
                        }
                    }
                }
            };
            if head.framing != framing {
                return Err(format!(
                    "{}: framing {:?}, httparse's fields say {framing:?}",
                    show(),
                    head.framing
                ));
            }
            let kept = kept_fields(&head);
            if kept == expected_fields(&p) {
                return Ok(());
            }
            Err(format!("{}: fields differ: keyproof kept {kept:?}", show()))
        }
        (Verdict::Complete((p, _)), Verdict::Refused(_)) => {
            let mut b = BytesMut::from(input);
            let Err(e) = parse_request_head(&mut b, MAX) else {
                unreachable!("refused above")
            };
            let listed = RULES
                .iter()
                .any(|r| matches!(r.allowed, Allowed::Refuses(ok) if ok(&e)) && (r.applies)(&p));
            if listed {
                Ok(())
            } else {
                Err(format!(
                    "{}: keyproof refuses ({e:?}), no listed rule says why",
                    show()
                ))
            }
        }
        (a, b) => Err(format!(
            "{}: httparse {:?}, keyproof {:?}",
            show(),
            verdict_kind(&a),
            verdict_kind(&b)
        )),
    }
}

fn verdict_kind<T>(v: &Verdict<T>) -> String {
    match v {
        Verdict::Complete(_) => "complete".into(),
        Verdict::NeedMore => "need more".into(),
        Verdict::Refused(e) => format!("refused: {e}"),
    }
}

// --- generators -----------------------------------------------------------

fn method() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE",
            "M-SEARCH", "get", "PROPFIND",
        ])
        .prop_map(|m| m.as_bytes().to_vec()),
        2 => prop::sample::select(vec![
            "G(T", "GE\"T", "", "G\x00T", "GET\t", "G\u{e9}T", "{}", "a%b", "!#$%&'*+-.^_`|~",
        ])
        .prop_map(|m| m.as_bytes().to_vec()),
    ]
}

fn target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "/", "/a?b", "*", "http://x/admin", "https://app.local:8443/a?b=c", "x:443",
            "/%2e%2e/admin", "//admin", "/a/../b", "/?", "http://[::1]:80/", "http://x",
            "/a#frag", "/%zz", "http://u@x/", "/a;b=c", "/~user", "/a|b",
        ])
        .prop_map(|t| t.as_bytes().to_vec()),
        3 => prop::collection::vec(
            prop::sample::select(b"/a?.%2e#[]:@!$&'()*+,;=-_~\"<>\\^`{|} \t\x7f\x80\xff\x00".to_vec()),
            0..12
        ),
    ]
}

fn version() -> impl Strategy<Value = &'static [u8]> {
    prop_oneof![
        8 => Just(&b"HTTP/1.1"[..]),
        3 => Just(&b"HTTP/1.0"[..]),
        1 => prop::sample::select(vec![
            &b"HTTP/1.2"[..], b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/11", b"HTTP/1",
        ]),
    ]
}

fn field_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect", "X-A",
            "content-length", "TRANSFER-ENCODING", "host", "x_forwarded_client_cert",
            "Keep-Alive", "TE", "Upgrade",
        ])
        .prop_map(|n| n.as_bytes().to_vec()),
        2 => prop::sample::select(vec![
            "Host ", "", "X\tA", "X A", "\u{dc}", "X\"", "X(", "x{", "X\x00",
        ])
        .prop_map(|n| n.as_bytes().to_vec()),
    ]
}

fn field_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "x", "", "0", "5", "5, 5", "5,5", "1, 2", "+1", "-1", " 5 ", "05",
            "99999999999999999999999", "chunked", "Chunked", "gzip, chunked", "chunked, gzip",
            "chunked, chunked", "chunked,", "identity", "close", "keep-alive", "close, x-a",
            "100-continue", "100-Continue", "later", "app", "app:8080", "x:443",
        ])
        .prop_map(|v| v.as_bytes().to_vec()),
        3 => prop::collection::vec(
            prop::sample::select(b"ab 5,\t\x00\x01\x7f\x80\xe9\xff\r\n\x0b\x0c;=\"".to_vec()),
            0..8
        ),
    ]
}

fn eol() -> impl Strategy<Value = &'static [u8]> {
    prop_oneof![12 => Just(&b"\r\n"[..]), 1 => Just(&b"\n"[..]), 1 => Just(&b"\r"[..])]
}

fn separator() -> impl Strategy<Value = &'static [u8]> {
    prop_oneof![
        8 => Just(&b": "[..]),
        2 => Just(&b":"[..]),
        1 => prop::sample::select(vec![&b" : "[..], b":\t", b"\t:", b": \t "]),
    ]
}

/// One field line, sometimes continued by obs-fold.
fn field_line() -> impl Strategy<Value = Vec<u8>> {
    (
        field_name(),
        separator(),
        field_value(),
        eol(),
        prop::option::weighted(0.05, field_value()),
    )
        .prop_map(|(n, sep, v, end, fold)| {
            let mut line = n;
            line.extend_from_slice(sep);
            line.extend_from_slice(&v);
            if let Some(f) = fold {
                line.extend_from_slice(b"\r\n ");
                line.extend_from_slice(&f);
            }
            line.extend_from_slice(end);
            line
        })
}

fn structured_head() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![&b""[..], b"", b"", b"\r\n", b"\n", b"\r", b"\r\n\r\n"]),
        method(),
        prop::sample::select(vec![&b" "[..], b" ", b" ", b"  ", b"\t"]),
        target(),
        version(),
        eol(),
        prop::collection::vec(field_line(), 0..6),
        eol(),
        prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 0..8)),
    )
        .prop_map(|(lead, m, sp, t, v, end, fields, last, tail)| {
            let mut h = lead.to_vec();
            h.extend_from_slice(&m);
            h.extend_from_slice(sp);
            h.extend_from_slice(&t);
            h.push(b' ');
            h.extend_from_slice(v);
            h.extend_from_slice(end);
            for f in fields {
                h.extend_from_slice(&f);
            }
            h.extend_from_slice(last);
            h.extend(tail.unwrap_or_default());
            h
        })
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // CI runs in a fresh clone; a failure prints its input instead.
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn structured_heads_agree_with_httparse_or_a_listed_rule() {
    runner(20_000)
        .run(&structured_head(), |h| {
            compare(&h).map_err(TestCaseError::fail)?;
            Ok(())
        })
        .unwrap();
}

#[test]
fn random_bytes_agree_with_httparse_or_a_listed_rule() {
    let bytes = prop::collection::vec(any::<u8>(), 0..256);
    let prefixed = (
        prop::sample::select(vec![
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /x HTTP/1.0\r\nHost: a\r\n",
        ]),
        prop::collection::vec(any::<u8>(), 0..128),
    )
        .prop_map(|(p, mut tail)| {
            let mut h = p.to_vec();
            h.append(&mut tail);
            h.extend_from_slice(b"\r\n\r\n");
            h
        });
    runner(20_000)
        .run(&prop_oneof![bytes, prefixed], |h| {
            compare(&h).map_err(TestCaseError::fail)?;
            Ok(())
        })
        .unwrap();
}

/// Inputs the random runs once found, kept so that they run every time
/// (the runs keep no failure file).
#[test]
fn cases_found_before_agree() {
    let found: &[&[u8]] = &[
        // An empty Transfer-Encoding line before a chunked one: keyproof
        // reads chunked and drops both lines (an empty list element names
        // no coding); the test expected the empty line kept.
        b"GET / HTTP/1.1\r\nTRANSFER-ENCODING: \r\nTRANSFER-ENCODING: chunked\r\n\r\n",
        // The same with empty elements inside one line, or a line of
        // commas only.
        b"POST / HTTP/1.1\r\nTransfer-Encoding: , chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: ,\r\nTransfer-Encoding: chunked\r\n\r\n",
        // In the other order the last element is empty: refused (501),
        // as hyper refuses it on the inbound.
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n",
    ];
    for raw in found {
        assert_eq!(compare(raw), Ok(()), "{:?}", String::from_utf8_lossy(raw));
    }
    let mut b = BytesMut::from(found[0]);
    let head = parse_request_head(&mut b, MAX).unwrap().unwrap();
    assert_eq!(head.framing, Framing::Chunked);
    assert!(head.parts.headers.is_empty());
    let mut b = BytesMut::from(found[3]);
    assert!(matches!(
        parse_request_head(&mut b, MAX),
        Err(H1Error::TransferEncoding)
    ));
}

/// The table itself: every listed rule is about a head httparse accepts,
/// and its example is one keyproof treats as the rule says (or as httparse
/// does, for the header-hardening entries not yet in).
#[test]
fn listed_rules_match_their_examples() {
    let examples: &[(&str, &[u8])] = &[
        (
            "transfer-encoding with content-length",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "transfer-encoding not ending in chunked",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        ),
        (
            "transfer-encoding in HTTP/1.0",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        (
            "content-length not one decimal number",
            b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
        ),
        (
            "expectation other than 100-continue",
            b"GET / HTTP/1.1\r\nExpect: later\r\n\r\n",
        ),
        (
            "target the http crate refuses",
            b"GET /a<b> HTTP/1.1\r\n\r\n",
        ),
        (
            "expect taken out",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        ),
        (
            "transfer-encoding taken out once chunked is decoded",
            b"GET / HTTP/1.1\r\nTRANSFER-ENCODING: \r\nTRANSFER-ENCODING: chunked\r\n\r\n",
        ),
    ];
    for (name, raw) in examples {
        let rule = RULES.iter().find(|r| r.name == *name).expect(name);
        let Verdict::Complete((p, _)) = plain(raw) else {
            panic!("{name}: httparse does not accept its example");
        };
        assert!((rule.applies)(&p), "{name}: does not apply to its example");
        let mut b = BytesMut::from(*raw);
        match (rule.allowed, parse_request_head(&mut b, MAX)) {
            (Allowed::Refuses(ok), Err(e)) => assert!(ok(&e), "{name}: refused with {e:?}"),
            (Allowed::Drops(drops), Ok(Some(head))) => {
                assert!(
                    p.fields
                        .iter()
                        .any(|(n, v)| drops(&n.to_ascii_lowercase(), v)),
                    "{name}: drops nothing of its example"
                );
                assert_eq!(kept_fields(&head), expected_fields(&p), "{name}");
            }
            (_, other) => panic!("{name}: keyproof gives {other:?}"),
        }
        assert_eq!(compare(raw), Ok(()), "{name}");
    }
    for r in RULES {
        assert!(!r.why.is_empty() && !r.name.is_empty());
    }
}
