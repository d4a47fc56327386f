//! Header fields the sidecar owns, and what a peer may not do with fields.
//!
//! One place for every list the listeners apply, so that the inbound, the
//! outbound, HTTP/1 and HTTP/2, header sections and trailer sections cannot
//! drift apart:
//!
//! * [`OWNED`] and the `x-keyproof-` prefix: fields only the sidecar sets.
//!   A copy from the network is removed, also when its name equals an owned
//!   name once `_`, `.` or other punctuation is read as `-` (CGI, WSGI and
//!   many frameworks map `X-Forwarded-Client-Cert` and
//!   `X_Forwarded_Client_Cert` to the same variable, PHP maps
//!   `X.Forwarded.Client.Cert` there too, and the forged one may arrive
//!   first).
//! * [`HOP_BY_HOP`]: fields describing one connection (RFC 9110 section
//!   7.6.1), never forwarded.
//! * [`NOT_IN_TRAILERS`]: fields whose meaning is needed before the content
//!   (RFC 9110 section 6.5.1: framing, routing, authentication, request
//!   modifiers, response controls, content format), removed from trailer
//!   sections in every direction.
//!
//! Everything here runs per request, so each check is a single pass over
//! the field names that allocates nothing unless a field must go.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};

/// Fields only the sidecar sets. The step-up request fields are here too:
/// on a step-up route the inbound's verifier consumes them, and nowhere
/// else may a caller's signature reach the app.
pub const OWNED: [&str; 6] = [
    "x-forwarded-client-cert",
    "signature",
    "signature-input",
    "stepup-binding",
    // Set by the inbound on verified requests; listed although the prefix
    // below covers them, so that the list reads as the contract it is.
    "x-keyproof-step-up",
    "x-keyproof-step-up-reason",
];

/// Every field under this prefix belongs to the sidecar (present and future).
pub const OWNED_PREFIX: &str = "x-keyproof-";

/// The step-up request fields (`../shared/design/step-up.md`), exactly as
/// the verifier reads them.
pub const STEPUP_REQUEST: [&str; 3] = [OWNED[1], OWNED[2], OWNED[3]];

/// `x-forwarded-client-cert`: the verified caller, as the inbound states it
/// to the app.
pub static XFCC: HeaderName = HeaderName::from_static(OWNED[0]);

/// `x-keyproof-step-up: verified`: set by the inbound on a request whose
/// step-up proof verified. From the app, on a response, the same field
/// says `required`: the app asks for the caller's proof of this request.
pub static STEP_UP_VERIFIED: HeaderName = HeaderName::from_static(OWNED[4]);

/// `x-keyproof-step-up-reason`: why a verified request had to prove
/// possession (`always`, `app` or the name of the risk rule that fired).
pub static STEP_UP_REASON: HeaderName = HeaderName::from_static(OWNED[5]);

/// The value of [`STEP_UP_VERIFIED`] by which an app asks for a step-up.
pub const STEP_UP_REQUIRED: &str = "required";

/// `x-keyproof-step-up-error`: why the outbound passed a challenge on to the
/// app unanswered.
pub static STEP_UP_ERROR: HeaderName = HeaderName::from_static("x-keyproof-step-up-error");

/// Hop-by-hop fields (RFC 9110 section 7.6.1) plus the legacy ones clients
/// still send; the one list both HTTP/1.1 codecs and the forwarders use.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Fields removed from every trailer section (RFC 9110 section 6.5.1), on
/// top of the hop-by-hop and sidecar-owned ones.
pub const NOT_IN_TRAILERS: [&str; 36] = [
    // Framing and content format.
    "content-length",
    "content-encoding",
    "content-type",
    "content-range",
    "trailer",
    // Routing.
    "host",
    "location",
    "retry-after",
    "via",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    // Authentication and state.
    "authorization",
    "www-authenticate",
    "authentication-info",
    "proxy-authentication-info",
    "cookie",
    "set-cookie",
    "accept-signature",
    // Request modifiers and controls.
    "expect",
    "max-forwards",
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
    "cache-control",
    "pragma",
    // Response controls.
    "age",
    "expires",
    "date",
    "vary",
    "warning",
    "content-location",
];

/// What the inbound does with header names containing `_` that are not an
/// owned name in disguise (those are always removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Underscores {
    /// Forwarded as sent.
    #[default]
    Allow,
    /// Removed (and counted).
    Drop,
    /// The request is refused with 400 (and counted).
    Reject,
}

impl Underscores {
    /// The configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            Underscores::Allow => "allow",
            Underscores::Drop => "drop",
            Underscores::Reject => "reject",
        }
    }
}

/// Why a request is refused before it is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRefusal {
    /// 400, or 501 for a transfer coding the sidecar does not forward.
    pub status: StatusCode,
    /// For the log and the response body.
    pub reason: String,
    /// Refused by `headers_with_underscores = "reject"` (counted).
    pub underscore: bool,
}

impl HeaderRefusal {
    fn bad(reason: impl Into<String>) -> HeaderRefusal {
        HeaderRefusal {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
            underscore: false,
        }
    }
}

/// What [`check_request`] found that [`strip_request`] must act on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct Findings {
    /// Some field is sidecar-owned (or one in disguise).
    pub owned: bool,
    /// Other fields with `_` in their name (to drop, per the mode).
    pub underscores: u32,
    /// A field that states the client's address or other facts about the
    /// caller ([`CLIENT_ADDRESS`], [`CALLER_STATEMENTS`]), in any spelling:
    /// the inbound removes them ([`set_caller_statements`]).
    pub caller_statement: bool,
}

impl Findings {
    /// Whether [`strip_request`] has nothing to remove.
    pub fn is_clean(&self) -> bool {
        !self.owned && self.underscores == 0
    }
}

/// Whether `name` equals `canonical` (lowercase letters and digits, `-`
/// between words) as an app may read it: ASCII case ignored, and any
/// punctuation a field name may hold (`_`, `.`, `~`, `!`...) read as `-`.
/// CGI, WSGI and PHP read `X-Foo` as `HTTP_X_FOO`, and so `X_Foo` too;
/// PHP also turns `.` into `_` (`X.Foo` is `HTTP_X_FOO` to a PHP app behind
/// Caddy or PHP's own server); older CGI gateways turned every other byte
/// into `_`. A name that differs from an owned one only there is that
/// name to some app.
pub(crate) fn same_name(name: &[u8], canonical: &str) -> bool {
    let c = canonical.as_bytes();
    name.len() == c.len()
        && name.iter().zip(c).all(|(a, b)| {
            if *b == b'-' {
                !a.is_ascii_alphanumeric()
            } else {
                a.to_ascii_lowercase() == *b
            }
        })
}

/// Whether `name` holds punctuation other than `-`: the names that may be
/// another field's name in disguise ([`same_name`]).
fn may_be_disguised(name: &[u8]) -> bool {
    name.iter()
        .any(|b| !b.is_ascii_alphanumeric() && *b != b'-')
}

/// RFC 9110 `tchar`: what tokens (methods, field names, auth-schemes,
/// protocol names) are made of.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `name` is a sidecar-owned field, in any spelling [`same_name`]
/// reads as one.
pub fn is_owned(name: &[u8]) -> bool {
    let p = OWNED_PREFIX.len();
    (name.len() >= p && same_name(&name[..p], OWNED_PREFIX))
        || OWNED.iter().any(|o| same_name(name, o))
}

/// Whether `name`, spelt otherwise, is a field whose value the proxy
/// decides (framing, hop-by-hop) or appends to (`X-Forwarded-For`,
/// [`add_forwarded_for`]) in a spelling [`same_name`] reads as it: an app
/// that maps both spellings to one variable (CGI, WSGI, PHP:
/// `HTTP_X_FORWARDED_FOR`) would read the caller's instead, or the
/// caller's after the sidecar's.
fn controlled_in_disguise(name: &[u8]) -> bool {
    may_be_disguised(name)
        && (HOP_BY_HOP.iter().any(|h| same_name(name, h))
            || same_name(name, "content-length")
            || same_name(name, "x-forwarded-for"))
}

/// Single-address fields that name a request's client, which apps behind
/// a proxy they trust take as the caller's address: nginx's realip module
/// reads `X-Real-IP` unless told otherwise, other stacks the CDN spellings
/// (Go chi's `RealIP`, Rails, Laravel's trusted proxies). The inbound is
/// the proxy in front of the app, so a caller's copy would be believed:
/// every copy goes ([`CALLER_STATEMENTS`]), and `X-Real-IP` is set to the
/// caller's address, as nginx's own `proxy_set_header X-Real-IP
/// $remote_addr` does.
pub const CLIENT_ADDRESS: [&str; 31] = [
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    // PHP's common `get_client_ip()` reads these first, Rails' `remote_ip`
    // `Client-IP` too.
    "client-ip",
    "x-forwarded",
    "forwarded-for",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-proxyuser-ip",
    "x-original-forwarded-for",
    "x-envoy-external-address",
    "x-azure-clientip",
    "x-appengine-user-ip",
    "akamai-client-ip",
    "wl-proxy-client-ip",
    "proxy-client-ip",
    "x-forwarded-client-ip",
    "cf-connecting-ipv6",
    "fly-client-ip",
    "x-azure-socketip",
    "x-real-client-ip",
    "x-client-real-ip",
    "x-true-ip",
    "do-connecting-ip",
    "ali-cdn-real-ip",
    "cdn-src-ip",
    "x-original-for",
];

/// Fields by which the front proxies an app may have been moved from tell
/// it who the caller is or how it connected: its verified client
/// certificate (RFC 9440, nginx-ingress, HAProxy, Traefik, AWS, Azure,
/// GCP), the user an authenticating proxy let in (oauth2-proxy, Kubernetes'
/// authenticating proxy, Grafana, Kong, IAP, Cloudflare Access, Azure
/// EasyAuth), and the scheme and port the caller used (Express's
/// `req.secure`, Werkzeug's `ProxyFix`, Django's `SECURE_PROXY_SSL_HEADER`,
/// Rails, Laravel). An app that trusts the sidecar as its proxy would take
/// a caller's copy as the sidecar's word. The sidecar states the caller in
/// `x-forwarded-client-cert` and `X-Real-IP`; every caller's copy of these
/// goes, in any spelling [`same_name`] reads as one, and the scheme is left
/// to the app's own connection (plain HTTP from the sidecar).
pub const CALLER_STATEMENTS: [&str; 37] = [
    // The client certificate (Linkerd's proxy states its identity).
    "l5d-client-id",
    "client-cert",
    "client-cert-chain",
    "x-client-verify",
    "x-client-dn",
    // The user an authenticating proxy let in.
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "x-forwarded-groups",
    "x-forwarded-access-token",
    "x-remote-user",
    "x-remote-group",
    "x-anonymous-consumer",
    "x-endpoint-api-userinfo",
    "x-apigateway-api-userinfo",
    "x-userinfo",
    "x-auth-user",
    "x-spiffe-id",
    "x-client-verified",
    "x-client-subject",
    "x-client-issuer",
    "x-client-s-dn",
    "x-client-i-dn",
    // The scheme and port the caller used.
    "x-forwarded-proto",
    "x-forwarded-protocol",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-https",
    "x-https",
    "https",
    "forwarded-proto",
    "x-original-proto",
    "front-end-https",
    "x-url-scheme",
    "x-scheme",
];

/// [`CALLER_STATEMENTS`] more: families of fields, by prefix.
pub const CALLER_STATEMENT_PREFIXES: [&str; 31] = [
    // `X-Client-Cert` and Google's load balancer's `X-Client-Cert-Spiffe`,
    // `-Present`, `-Chain-Verified`...
    "x-client-cert",
    "ms-aspnetcore-clientcert",
    "wl-proxy-",
    // Authelia's and others' `Remote-User`, `-Groups`, `-Email`, `-Name`.
    "remote-",
    "x-authentik-",
    "tailscale-",
    "cloudfront-",
    "cf-visitor",
    "cf-client-cert-",
    "x-arr-",
    "x-authenticated-",
    "x-credential-",
    "oidc-",
    "x-pomerium-",
    "x-vouch-",
    "x-wl-proxy-",
    "x-forwarded-client-cert-",
    "x-jwt-",
    "x-vercel-",
    "ssl-client-",
    "x-ssl-",
    "x-forwarded-tls-",
    "x-amzn-mtls-",
    "x-amzn-oidc-",
    "x-ms-client-principal",
    "x-goog-authenticated-user-",
    "x-auth-request-",
    "x-remote-extra-",
    "x-webauth-",
    "x-consumer-",
    "cf-access-",
];

/// `x-real-ip`: set by the inbound to the caller's address.
static X_REAL_IP: HeaderName = HeaderName::from_static(CLIENT_ADDRESS[0]);

/// Whether `name` states something about the caller that only the sidecar
/// may state to the app: [`CLIENT_ADDRESS`], [`CALLER_STATEMENTS`] and
/// their prefixes, in any spelling [`same_name`] reads as one.
fn is_caller_statement(name: &[u8]) -> bool {
    let starts = |p: &str| name.len() >= p.len() && same_name(&name[..p.len()], p);
    CLIENT_ADDRESS.iter().any(|c| same_name(name, c))
        || CALLER_STATEMENTS.iter().any(|c| same_name(name, c))
        || CALLER_STATEMENT_PREFIXES.iter().any(|p| starts(p))
}

/// The inbound's part of [`CLIENT_ADDRESS`] and [`CALLER_STATEMENTS`]:
/// removes every copy a caller sent (when [`check_request`] found one) and
/// sets `X-Real-IP` to the caller's address `ip`. The outbound leaves an
/// app's own fields alone: the peer's inbound replaces them, and a
/// destination outside the mesh gets what the app sent.
pub fn set_caller_statements(h: &mut HeaderMap, found: Findings, ip: &HeaderValue) {
    if found.caller_statement {
        while let Some(name) = h
            .keys()
            .find(|k| is_caller_statement(k.as_str().as_bytes()))
        {
            let name = name.clone();
            h.remove(&name);
        }
    }
    h.insert(X_REAL_IP.clone(), ip.clone());
}

/// Whether `name` is one of the step-up request fields, spelt exactly.
fn is_stepup_request(name: &str) -> bool {
    STEPUP_REQUEST.contains(&name)
}

/// Whether `name` is a hop-by-hop field.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Whether `name` may not appear in a trailer section.
pub fn not_in_trailers(name: &[u8]) -> bool {
    is_owned(name)
        || is_caller_statement(name)
        || HOP_BY_HOP.iter().any(|h| same_name(name, h))
        || NOT_IN_TRAILERS.iter().any(|h| same_name(name, h))
        // Refused in a header section (`check_request`); an app that merges
        // trailers into its headers (Apache's `MergeTrailers`) would read
        // them after the route was decided.
        || METHOD_OVERRIDES.iter().any(|h| same_name(name, h))
        || URL_OVERRIDES.iter().any(|h| same_name(name, h))
}

/// Removes from a trailer section every field [`not_in_trailers`] names.
/// Allocation-free when there is nothing to remove.
pub fn filter_trailers(t: &mut HeaderMap) {
    while let Some(name) = t.keys().find(|k| not_in_trailers(k.as_str().as_bytes())) {
        let name = name.clone();
        t.remove(&name);
    }
}

/// Removes from a trailer section every field named, in any spelling, by
/// one of `names` (lowercase, `-` for `_`): on a route whose risk rules read
/// request fields, such a field arriving after the content was never
/// evaluated, and the app must not read it as if it had been.
/// Allocation-free when there is nothing to remove.
pub fn remove_named(t: &mut HeaderMap, names: &[Box<str>]) {
    let named = |k: &HeaderName| names.iter().any(|n| same_name(k.as_str().as_bytes(), n));
    while let Some(name) = t.keys().find(|k| named(k)) {
        let name = name.clone();
        t.remove(&name);
    }
}

/// A trailer section under `headers_with_underscores`: names with `_` are
/// removed (`drop`) or fail the body (`reject`: the request, already on
/// its way, breaks off and the caller gets an error).
pub fn underscores_in_trailers(t: &mut HeaderMap, mode: Underscores) -> Result<(), TrailerRefused> {
    // Owned names in disguise are removed by `filter_trailers`, whatever
    // the mode, as in header sections.
    let doomed =
        |k: &HeaderName| k.as_str().contains('_') && !not_in_trailers(k.as_str().as_bytes());
    while let Some(name) = t.keys().find(|k| doomed(k)) {
        if mode == Underscores::Reject {
            return Err(TrailerRefused(name.as_str().to_owned()));
        }
        let name = name.clone();
        t.remove(&name);
    }
    Ok(())
}

/// A trailer field refused by `headers_with_underscores = "reject"`.
#[derive(Debug, thiserror::Error)]
#[error("trailer field name {0:?} contains '_' (inbound.headers_with_underscores = \"reject\")")]
pub struct TrailerRefused(String);

/// The first letters of every name [`check_request`] acts on as written
/// (names in disguise are found by their punctuation): built from the lists
/// themselves, so that a name added to one is never skipped by the filter.
const REQUEST_FIRST_LETTERS: [bool; 256] = first_letters(&[
    &OWNED,
    &[OWNED_PREFIX],
    &CLIENT_ADDRESS,
    &CALLER_STATEMENTS,
    &CALLER_STATEMENT_PREFIXES,
    &METHOD_OVERRIDES,
    &URL_OVERRIDES,
    &HOP_BY_HOP,
    &["host", "connection", "transfer-encoding", "content-length"],
]);

/// A table of the first bytes of the names in `lists`.
const fn first_letters(lists: &[&[&str]]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < lists.len() {
        let mut j = 0;
        while j < lists[i].len() {
            table[lists[i][j].as_bytes()[0] as usize] = true;
            j += 1;
        }
        i += 1;
    }
    table
}

/// The elements of the comma-separated list fields `name` of `h`, trimmed,
/// empty ones left out (RFC 9110 section 5.6.1).
pub fn list_elements(h: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &[u8]> {
    h.get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A host as routing rules and risk rules match it: without the brackets
/// of an IPv6 literal or a final dot. `None` for a host that is no DNS name
/// or address (`a,b`, `a..`, `a!b`): servers read such hosts each in a way
/// of its own, so no rule can be said to take or not take one.
pub fn plain_host(host: &str) -> Option<&str> {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok().then_some(v6);
    }
    let h = host.strip_suffix('.').unwrap_or(host);
    let ok = !h.is_empty()
        && !h.starts_with('.')
        && !h.ends_with('.')
        && !h.contains("..")
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    ok.then_some(h)
}

/// Fields by which frameworks' method-override middleware runs another
/// method than the request's (Werkzeug, Express, Laravel, ASP.NET...): a
/// route restricted to some methods would be walked past by a POST that
/// asks for DELETE. Refused in any spelling [`same_name`] reads as one of
/// them (a CGI, WSGI or PHP app reads `X_HTTP_Method_Override` and
/// `X.HTTP.Method.Override` as the same). A `_method` parameter in the query
/// (Symfony and Laravel read it there too) is refused as well
/// ([`overrides_method`]); a `_method` form field, the form's own way, is
/// in the body, which the sidecar does not read.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Fields by which some apps route by another path than the request's
/// (Symfony and Zend before CVE-2018-14773, IIS URL Rewrite behind a
/// proxy; gunicorn takes `SCRIPT_NAME` and `PATH_INFO` from a proxy it
/// trusts and cuts the first off the path Flask and Django route by, as
/// the common `X-Script-Name` middleware does): the route decided on would
/// not be the handler that runs. Refused in any spelling [`same_name`]
/// reads as one of them.
const URL_OVERRIDES: [&str; 5] = [
    "x-original-url",
    "x-rewrite-url",
    "script-name",
    "path-info",
    "x-script-name",
];

/// Checks a request's header section before anything is forwarded:
/// `Host` (at most one, agreeing with an absolute-form or HTTP/2
/// authority), `Connection` (may not name framing, routing or owned
/// fields), `Transfer-Encoding` (only one `chunked`, no other coding) and,
/// in `reject` mode, names with `_`. Says what [`strip_request`] has to
/// remove; one pass over the names when all is well.
pub fn check_request(
    h: &HeaderMap,
    uri: &Uri,
    mode: Underscores,
) -> Result<Findings, HeaderRefusal> {
    let mut f = Findings::default();
    let (mut hosts, mut connection, mut te, mut length) = (0u32, false, false, false);
    for name in h.keys() {
        let n = name.as_str().as_bytes();
        // Cheap filters first: the names acted on start with one of the
        // letters of `REQUEST_FIRST_LETTERS` or hold punctuation other than
        // `-`.
        match n.first() {
            Some(&b) if REQUEST_FIRST_LETTERS[usize::from(b)] => {}
            _ if !may_be_disguised(n) => continue,
            _ => {}
        }
        if is_owned(n) || controlled_in_disguise(n) {
            f.owned = true;
        } else if is_caller_statement(n) {
            f.caller_statement = true;
        } else if METHOD_OVERRIDES.iter().any(|o| same_name(n, o)) {
            return Err(HeaderRefusal::bad(format!(
                "{:?} is not accepted: routes are decided by the request's method, which an override would change behind them; send the method itself",
                name.as_str()
            )));
        } else if URL_OVERRIDES.iter().any(|o| same_name(n, o)) {
            return Err(HeaderRefusal::bad(format!(
                "{:?} is not accepted: routes are decided by the request's path, which an override would change behind them; send the path itself",
                name.as_str()
            )));
        } else if n.contains(&b'_') {
            if mode == Underscores::Reject {
                return Err(HeaderRefusal {
                    underscore: true,
                    ..HeaderRefusal::bad(format!(
                        "header name {:?} contains '_' (inbound.headers_with_underscores = \"reject\")",
                        name.as_str()
                    ))
                });
            }
            if mode == Underscores::Drop {
                f.underscores += 1;
            }
        } else if *name == header::HOST {
            hosts += 1;
        } else if *name == header::CONNECTION {
            connection = true;
        } else if *name == header::TRANSFER_ENCODING {
            te = true;
        } else if *name == header::CONTENT_LENGTH {
            length = true;
        }
    }
    if let Some(q) = uri.query() {
        if overrides_method(q) {
            return Err(HeaderRefusal::bad(
                "a _method parameter in the query is not accepted: routes are decided by the request's method, which an override would change behind them; send the method itself",
            ));
        }
    }
    if hosts > 0 {
        let mut all = h.get_all(header::HOST).iter();
        let first = all.next();
        if hosts > 1 || all.next().is_some() {
            return Err(HeaderRefusal::bad("more than one Host field"));
        }
        if let (Some(a), Some(v)) = (uri.authority(), first) {
            if !a.as_str().as_bytes().eq_ignore_ascii_case(v.as_bytes()) {
                return Err(HeaderRefusal::bad(format!(
                    "Host {:?} disagrees with the request target's authority {:?}",
                    String::from_utf8_lossy(v.as_bytes()),
                    a.as_str()
                )));
            }
        }
    }
    if connection {
        for token in h
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
        {
            if token.starts_with(b":")
                || token.eq_ignore_ascii_case(b"host")
                || token.eq_ignore_ascii_case(b"content-length")
                || token.eq_ignore_ascii_case(b"transfer-encoding")
                || is_owned(token)
            {
                return Err(HeaderRefusal::bad(format!(
                    "Connection may not name {:?}",
                    String::from_utf8_lossy(token)
                )));
            }
        }
    }
    if te {
        check_transfer_encoding(h.get_all(header::TRANSFER_ENCODING).iter(), length)?;
    }
    Ok(f)
}

/// Whether `query` has a `_method` parameter as a framework reads its
/// name: percent-decoded, `+` as a space, any case, and as PHP's query
/// parser (which Symfony and Laravel read) names it: leading spaces
/// dropped, the name ended by a NUL or a `[` (`_method[]` is an array
/// named `_method`), a space or `.` in it read as `_` (`.method`,
/// `+_method`, `_method%00x` are `_method` to them). A name that is
/// `method` after leading spaces is refused too (PHP before 8 read the
/// space as `_`).
fn overrides_method(query: &str) -> bool {
    query.split(['&', ';']).any(|pair| {
        let key = pair.split('=').next().unwrap_or(pair).as_bytes();
        key.len() >= b"method".len() && names_method_override(key)
    })
}

/// See [`overrides_method`]; `key` as it is in the query.
fn names_method_override(key: &[u8]) -> bool {
    const NAME: &[u8] = b"_method";
    let mut name = [0u8; 8];
    let (mut n, mut leading_spaces) = (0, 0usize);
    for b in percent_decoded(key) {
        if n == 0 && b == b' ' {
            leading_spaces += 1;
            continue;
        }
        let b = match b {
            0 => break,
            b'[' if n > 0 => break,
            b' ' | b'.' | b'[' => b'_',
            b => b,
        };
        if n == name.len() {
            return false;
        }
        name[n] = b;
        n += 1;
    }
    let name = &name[..n];
    name.eq_ignore_ascii_case(NAME) || (leading_spaces > 0 && name.eq_ignore_ascii_case(&NAME[1..]))
}

/// `raw` with `%XX` decoded and `+` read as a space, as a form decoder
/// reads a query's names; a `%` not followed by two hex digits stays.
fn percent_decoded(raw: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let b = *raw.get(at)?;
        at += 1;
        Some(match b {
            b'%' => {
                let hex = |i: usize| raw.get(i).copied().and_then(crate::http::path::hex_val);
                match (hex(at), hex(at + 1)) {
                    (Some(h), Some(l)) => {
                        at += 2;
                        h << 4 | l
                    }
                    _ => b'%',
                }
            }
            b'+' => b' ',
            b => b,
        })
    })
}

/// The request's authority (its target's, else `Host`), as the app will
/// read it: present, except in HTTP/1.0 (RFC 9112 section 3.2; RFC 9113
/// section 8.3.1: `http` and `https` have one), without userinfo (RFC 9113
/// section 8.3.1, RFC 9110 section 4.2.4), and a host every server reads
/// the same way (a DNS name or an address, an optional port). Anything
/// else is refused with 400 on both listeners, rather than handed to an
/// app that may read `b.svc/admin` or `evil.example, b.svc` otherwise than
/// the sidecar's rules did. Called after [`check_request`], which refuses
/// two Host fields and one that disagrees with the target.
pub fn check_authority(
    version: http::Version,
    uri: &Uri,
    h: &HeaderMap,
) -> Result<(), HeaderRefusal> {
    let value = match uri.authority() {
        Some(a) => a.as_str().as_bytes(),
        None => match h.get(header::HOST) {
            Some(v) => v.as_bytes(),
            None if version == http::Version::HTTP_10 || version == http::Version::HTTP_09 => {
                return Ok(())
            }
            None => {
                return Err(HeaderRefusal::bad(
                    "the request has no Host (nor :authority)",
                ))
            }
        },
    };
    if plain_authority(value) {
        return Ok(());
    }
    let shown = String::from_utf8_lossy(value);
    Err(HeaderRefusal::bad(if value.contains(&b'@') {
        format!("the authority {shown:?} carries userinfo")
    } else {
        format!("the authority {shown:?} is no host name or address with an optional port")
    }))
}

/// Adds the caller's address (`ip`, as text) to the request's
/// `x-forwarded-for`, and to its `Forwarded` if it has one (RFC 7239), as
/// the last hop: the app reaches the caller through the sidecar, from a
/// loopback address, and an app that trusts loopback proxies (Express's
/// `trust proxy 'loopback'`, Rails' trusted proxies) takes the last
/// address it does not trust as the client's. Without it, a caller's own
/// `X-Forwarded-For: 127.0.0.1` would be believed. The fields' earlier
/// values are kept, joined into one field (Go's `Header.Get` reads only the
/// first of several).
pub fn add_forwarded_for(h: &mut HeaderMap, ip: &HeaderValue) {
    use http::header::{Entry, FORWARDED};
    static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    match h.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(v) => {
            v.insert(ip.clone());
        }
        Entry::Occupied(mut o) => {
            let joined = join_with(o.iter(), ip.as_bytes());
            if let Some(v) = joined {
                o.insert(v);
            }
        }
    }
    if let Entry::Occupied(mut o) = h.entry(FORWARDED) {
        // `for=` takes an IPv6 address quoted and in brackets.
        let node = if ip.as_bytes().contains(&b':') {
            format!("for=\"[{}]\"", String::from_utf8_lossy(ip.as_bytes()))
        } else {
            format!("for={}", String::from_utf8_lossy(ip.as_bytes()))
        };
        // A caller's value left inside an open quoted-string would swallow
        // the node appended after it (`for=6.6.6.6;x="`): a parser that
        // honours quotes would read the caller's claim as the last hop.
        // Such a field is malformed (RFC 7239 section 4); it is replaced.
        let joined = if o.iter().all(|v| quotes_closed(v.as_bytes())) {
            join_with(o.iter(), node.as_bytes())
        } else {
            HeaderValue::from_str(&node).ok()
        };
        if let Some(v) = joined {
            o.insert(v);
        }
    }
}

/// Whether every quoted-string of a field value ends.
fn quotes_closed(v: &[u8]) -> bool {
    let mut q = Quotes::default();
    for &b in v {
        q.outside(b);
    }
    q.closed()
}

/// Follows a field value's quoted-strings byte by byte (RFC 9110 section
/// 5.6.4: `\` escapes the next byte inside one).
#[derive(Default)]
struct Quotes {
    quoted: bool,
    escaped: bool,
}

impl Quotes {
    /// Takes the next byte: whether it stands outside every quoted-string
    /// (a quote mark itself does not).
    fn outside(&mut self, b: u8) -> bool {
        if self.escaped {
            self.escaped = false;
        } else if self.quoted && b == b'\\' {
            self.escaped = true;
        } else if b == b'"' {
            self.quoted = !self.quoted;
        } else {
            return !self.quoted;
        }
        false
    }

    /// Whether the bytes taken left no quoted-string open.
    fn closed(&self) -> bool {
        !self.quoted && !self.escaped
    }
}

/// `values` joined by `, `, then `last`: one field value.
fn join_with<'a>(
    values: impl Iterator<Item = &'a HeaderValue>,
    last: &[u8],
) -> Option<HeaderValue> {
    let mut joined = Vec::new();
    for v in values {
        joined.extend_from_slice(v.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(last);
    HeaderValue::from_bytes(&joined).ok()
}

/// The most fields a request may carry: HTTP/1.1's parser takes 128.
const MAX_FIELDS: usize = 128;

/// What RFC 9113 section 8 makes a malformed HTTP/2 request, where h2
/// lets it through: a `:scheme` other than `http` and `https` (the
/// sidecar serves no other), a `:path` that is not absolute (`?x`, which
/// h2 and the `http` crate read as `/?x`; `*` only for `OPTIONS`), and a
/// field value with whitespace at either end (section 8.2.1: an HTTP/1.1
/// app would read it trimmed, and the sidecar's header rules untrimmed).
/// Refused with 400 on both listeners; more fields than an HTTP/1.1 head
/// may carry (128) with 431, and an `Expect` other than `100-continue`
/// with 417, as the HTTP/1.1 listeners do. HTTP/1.1 has none of these
/// forms: its parser trims values and reads the target as sent.
pub fn check_h2_form(
    version: http::Version,
    method: &http::Method,
    uri: &Uri,
    h: &HeaderMap,
) -> Result<(), HeaderRefusal> {
    if version != http::Version::HTTP_2 {
        return Ok(());
    }
    if method != http::Method::CONNECT {
        // h2 keeps `:scheme` only beside `:authority`; without it (a
        // `host` field instead) the scheme was checked for syntax alone.
        if let Some(other) = uri.scheme_str().filter(|s| !matches!(*s, "http" | "https")) {
            return Err(HeaderRefusal::bad(format!(
                ":scheme {other:?} is not http or https"
            )));
        }
        let path = uri.path_and_query().map_or("", |p| p.as_str());
        if !(path.starts_with('/') || (path == "*" && method == http::Method::OPTIONS)) {
            return Err(HeaderRefusal::bad(format!(
                ":path {path:?} is not an absolute path"
            )));
        }
    }
    if h.len() > MAX_FIELDS {
        // As many as an HTTP/1.1 head may carry: the app behind reads
        // HTTP/1.1, and its parser may stop earlier.
        return Err(HeaderRefusal {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ..HeaderRefusal::bad(format!(
                "{} header fields, more than the {MAX_FIELDS} an HTTP/1.1 head may carry",
                h.len()
            ))
        });
    }
    // As the HTTP/1.1 listeners answer it (RFC 9110 section 10.1.1): the
    // app must not be left to decide on an expectation the sidecar cannot
    // meet.
    for v in h.get_all(header::EXPECT) {
        if !v.as_bytes().eq_ignore_ascii_case(b"100-continue") {
            return Err(HeaderRefusal {
                status: StatusCode::EXPECTATION_FAILED,
                ..HeaderRefusal::bad(format!(
                    "Expect {:?} cannot be met (only 100-continue)",
                    String::from_utf8_lossy(v.as_bytes())
                ))
            });
        }
    }
    for (name, value) in h {
        let v = value.as_bytes();
        let edge = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
        if edge(v.first()) || edge(v.last()) {
            return Err(HeaderRefusal::bad(format!(
                "the value of {:?} starts or ends with whitespace",
                name.as_str()
            )));
        }
    }
    Ok(())
}

/// `host[:port]`: a host as [`plain_host`] takes it (an IPv6 literal in
/// brackets), then nothing or a port that is a number. Read in one pass
/// over the bytes: it runs per request on both listeners.
fn plain_authority(s: &[u8]) -> bool {
    if s.first() == Some(&b'[') {
        let Some(i) = s.iter().position(|b| *b == b']') else {
            return false;
        };
        let (host, port) = s.split_at(i + 1);
        return std::str::from_utf8(host).is_ok_and(|h| plain_host(h).is_some()) && port_ok(port);
    }
    let (host, port) = s
        .iter()
        .rposition(|b| *b == b':')
        .map_or((s, &b""[..]), |i| s.split_at(i));
    // As `plain_host`: one final dot allowed, no other empty label, and
    // letters, digits, `-`, `_` and `.` only.
    let host = host.strip_suffix(b".").unwrap_or(host);
    let mut prev = b'.';
    for &b in host {
        let ok = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && prev != b'.');
        if !ok {
            return false;
        }
        prev = b;
    }
    prev != b'.' && port_ok(port)
}

/// Nothing, or `:` and a port number (digits only).
fn port_ok(port: &[u8]) -> bool {
    match port.strip_prefix(b":") {
        None => port.is_empty(),
        Some(p) => {
            !p.is_empty()
                && p.len() <= 5
                && p.iter().all(u8::is_ascii_digit)
                && p.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')) <= 65535
        }
    }
}

/// `Transfer-Encoding` as a proxy can forward it faithfully: exactly one
/// `chunked` (which the proxy decodes and re-frames), and nothing else.
/// A coding before `chunked` is refused with 501 rather than decoded
/// partly and dropped: the app would read a compressed body as plain.
fn check_transfer_encoding<'a>(
    values: impl Iterator<Item = &'a HeaderValue>,
    with_length: bool,
) -> Result<(), HeaderRefusal> {
    let mut chunked = 0;
    for coding in values
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
    {
        if coding.eq_ignore_ascii_case(b"chunked") {
            chunked += 1;
        } else {
            return Err(HeaderRefusal {
                status: StatusCode::NOT_IMPLEMENTED,
                reason: format!(
                    "transfer coding {:?} is not supported (only chunked)",
                    String::from_utf8_lossy(coding)
                ),
                underscore: false,
            });
        }
    }
    if chunked != 1 {
        return Err(HeaderRefusal::bad(
            "Transfer-Encoding must name chunked exactly once",
        ));
    }
    if with_length {
        return Err(HeaderRefusal::bad(
            "both Transfer-Encoding and Content-Length",
        ));
    }
    Ok(())
}

/// Removes what [`check_request`] found: every owned field (but the exact
/// step-up request fields when `keep_stepup`: the verifier consumes those)
/// and, in `drop` mode, the other names with `_`.
pub fn strip_request(h: &mut HeaderMap, found: Findings, keep_stepup: bool) {
    if !found.owned && found.underscores == 0 {
        return;
    }
    let drop_underscores = found.underscores > 0;
    let doomed = |k: &HeaderName| {
        let n = k.as_str();
        if is_owned(n.as_bytes()) {
            !(keep_stepup && is_stepup_request(n))
        } else if controlled_in_disguise(n.as_bytes()) {
            true
        } else {
            drop_underscores && n.contains('_') && !is_caller_statement(n.as_bytes())
        }
    };
    while let Some(name) = h.keys().find(|k| doomed(k)) {
        let name = name.clone();
        h.remove(&name);
    }
}

/// Removes from an app's response what only the sidecar may say: its own
/// fields, `Accept-Signature`, and every `StepUp` challenge in
/// `WWW-Authenticate` (other challenges are kept). A caller's sidecar signs
/// StepUp challenges; one made by the app would make callers sign nonces of
/// the app's choosing. One pass over the names when there is nothing to do.
///
/// Returns whether the app asked for the caller's step-up proof: any
/// `x-keyproof-step-up` field (any spelling [`same_name`] reads as it), whatever its value,
/// counts, since only `required` has a meaning there and a response must
/// never pass on when the app may have meant it. The field is removed like
/// every owned one, and the inbound decides what the request becomes (the
/// app's response is never passed on then).
#[must_use = "an app asking for a step-up must not have its response passed on"]
pub fn strip_response(h: &mut HeaderMap) -> bool {
    let mut challenges = false;
    let mut other = false;
    let mut asked = false;
    for name in h.keys() {
        let n = name.as_str().as_bytes();
        // Cheap filter first: the names acted on start with one of these
        // letters (see `responses_lose_every_owned_field_whatever_its_first_letter`)
        // or hold punctuation other than `-`.
        match n.first() {
            Some(b'x' | b'a' | b'w' | b's') => {}
            _ if !may_be_disguised(n) => continue,
            _ => {}
        }
        if *name == header::WWW_AUTHENTICATE {
            challenges = true;
        } else if same_name(n, "accept-signature") || response_owned(n) {
            other = true;
            // Fail closed: the field in any spelling the listeners treat
            // as the same name, whatever its value (a list, quoted, odd
            // case, empty), is the app asking. Reading it more strictly
            // than the app's framework wrote it would pass its response on.
            if same_name(n, OWNED[4]) {
                asked = true;
            }
        }
    }
    if other {
        while let Some(name) = h.keys().find(|k| {
            same_name(k.as_str().as_bytes(), "accept-signature")
                || response_owned(k.as_str().as_bytes())
        }) {
            let name = name.clone();
            h.remove(&name);
        }
    }
    if challenges
        && h.get_all(header::WWW_AUTHENTICATE)
            .iter()
            .any(|v| has_stepup_challenge(v.as_bytes()))
    {
        let kept: Vec<HeaderValue> = h
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(without_stepup)
            .collect();
        h.remove(header::WWW_AUTHENTICATE);
        for v in kept {
            h.append(header::WWW_AUTHENTICATE, v);
        }
    }
    asked
}

/// Owned fields that an app's response may not carry. `Signature` and
/// `Signature-Input` are not among them: an app may sign its responses
/// (RFC 9421), which is no concern of the step-up scheme.
fn response_owned(n: &[u8]) -> bool {
    let p = OWNED_PREFIX.len();
    (n.len() >= p && same_name(&n[..p], OWNED_PREFIX))
        || same_name(n, "x-forwarded-client-cert")
        || same_name(n, "stepup-binding")
}

/// The elements of a `WWW-Authenticate` value: split at commas outside
/// quoted strings.
fn elements(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = v;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut q = Quotes::default();
        let mut end = rest.len();
        for (i, &b) in rest.iter().enumerate() {
            if q.outside(b) && b == b',' {
                end = i;
                break;
            }
        }
        let el = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or(&[]);
        Some(el.trim_ascii())
    })
}

/// The auth-scheme an element starts, or `None` when the element is an
/// auth-param continuing the previous challenge (`name=value`).
fn scheme_of(el: &[u8]) -> Option<&[u8]> {
    let len = el.iter().take_while(|b| is_tchar(**b)).count();
    if len == 0 {
        return None;
    }
    match el[len..].trim_ascii_start().first() {
        Some(b'=') => None,
        _ => Some(&el[..len]),
    }
}

fn has_stepup_challenge(v: &[u8]) -> bool {
    elements(v).any(|el| scheme_of(el).is_some_and(|s| s.eq_ignore_ascii_case(b"stepup")))
}

/// The value with its StepUp challenges (and their parameters) removed;
/// `None` when nothing is left.
fn without_stepup(v: &HeaderValue) -> Option<HeaderValue> {
    if !has_stepup_challenge(v.as_bytes()) {
        return Some(v.clone());
    }
    let mut out = Vec::with_capacity(v.len());
    let mut skipping = false;
    for el in elements(v.as_bytes()) {
        if el.is_empty() {
            continue;
        }
        if let Some(s) = scheme_of(el) {
            skipping = s.eq_ignore_ascii_case(b"stepup");
        }
        if skipping {
            continue;
        }
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(el);
    }
    if out.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&out).ok()
}

/// Removes the hop-by-hop fields ([`HOP_BY_HOP`]) and the
/// ones `Connection` names; HTTP/2 forbids them outright. `te: trailers`
/// is the one exception kept (gRPC needs it). The caller has refused a
/// `Connection` that names a field the proxy relies on
/// ([`check_request`]).
pub fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    // Most requests carry none: one pass over the few fields present is
    // cheaper than a hashed lookup for each name.
    let hop = |k: &http::HeaderName| is_hop_by_hop(k.as_str().as_bytes());
    if !h.keys().any(hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        // Headers named in Connection are hop-by-hop too.
        let named: Vec<String> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|list| list.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty() && n != "te")
            .collect();
        for name in named {
            h.remove(name.as_str());
        }
    }
    let trailers_only = h
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in HOP_BY_HOP {
        if name == "te" && trailers_only {
            continue;
        }
        h.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut n: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        n.sort();
        n
    }

    #[test]
    fn owned_names_are_recognised_in_any_disguise() {
        for n in [
            "x-forwarded-client-cert",
            "x_forwarded_client_cert",
            "X_Forwarded-Client_Cert",
            "x-keyproof-step-up",
            "X_Keyproof_Step_Up",
            "x-keyproof-anything-later",
            "x_keyproof_",
            "signature",
            "Signature_Input",
            "stepup_binding",
        ] {
            assert!(is_owned(n.as_bytes()), "{n}");
        }
        for n in [
            "x-forwarded-client-certs",
            "x-keyproof",
            "x-forwarded-for",
            "signatures",
            "content-digest",
        ] {
            assert!(!is_owned(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn every_punctuation_a_field_name_may_hold_reads_as_a_dash() {
        // Round 10 F1: PHP reads `X-Keyproof.Step.Up` as
        // `HTTP_X_KEYPROOF_STEP_UP`, and `X.HTTP.Method.Override` as the
        // override, as it reads the `_` spellings.
        let uri: Uri = "/admin".parse().unwrap();
        for p in "!#$%&'*+.^_`|~".chars() {
            let spell = |canonical: &str| canonical.replace('-', &p.to_string());
            let name = |n: &str| http::HeaderName::from_bytes(spell(n).as_bytes()).unwrap();
            for o in OWNED {
                assert!(is_owned(spell(o).as_bytes()), "{}", spell(o));
            }
            assert!(is_owned(spell("x-keyproof-later").as_bytes()));
            // Removed from requests, owned and controlled alike.
            let mut h = HeaderMap::new();
            for n in [
                OWNED[0],
                OWNED[4],
                OWNED[5],
                "x-forwarded-for",
                "keep-alive",
            ] {
                h.insert(name(n), http::HeaderValue::from_static("forged"));
            }
            h.insert("x-amount", http::HeaderValue::from_static("1"));
            let found = check_request(&h, &uri, Underscores::Allow).unwrap();
            strip_request(&mut h, found, false);
            assert_eq!(names(&h), ["x-amount"], "{p}");
            // Refused as a method override.
            for o in METHOD_OVERRIDES {
                let mut h = HeaderMap::new();
                h.insert(name(o), http::HeaderValue::from_static("DELETE"));
                let e = check_request(&h, &uri, Underscores::Allow).unwrap_err();
                assert!(
                    e.reason.contains("not accepted"),
                    "{}: {}",
                    spell(o),
                    e.reason
                );
            }
            // The app's own ask for a step-up, in the response.
            let mut h = HeaderMap::new();
            h.insert(name(OWNED[4]), http::HeaderValue::from_static("required"));
            assert!(strip_response(&mut h), "{p}");
            assert!(h.is_empty());
        }
        for o in URL_OVERRIDES {
            let mut h = HeaderMap::new();
            h.insert(
                http::HeaderName::from_bytes(o.replace('-', ".").as_bytes()).unwrap(),
                http::HeaderValue::from_static("/admin"),
            );
            let e = check_request(&h, &uri, Underscores::Allow).unwrap_err();
            assert!(e.reason.contains("path itself"), "{o}: {}", e.reason);
        }
        // Letters and digits are not punctuation, and `-` is the name.
        for n in [
            "x-keyproofs-step",
            "xakeyproof-step",
            "x-forwarded-client-cer1",
        ] {
            assert!(!is_owned(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn method_override_fields_are_refused_in_any_spelling() {
        let uri: Uri = "/admin".parse().unwrap();
        for n in [
            "x-http-method-override",
            "X-HTTP-Method-Override",
            "x_http_method_override",
            "x-http-method",
            "x-method-override",
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_static("DELETE"),
            );
            let e = check_request(&h, &uri, Underscores::Allow).unwrap_err();
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST, "{n}");
            assert!(e.reason.contains("not accepted"), "{n}: {}", e.reason);
        }
        let mut h = HeaderMap::new();
        h.insert(
            "x-http-method-overrides",
            http::HeaderValue::from_static("x"),
        );
        assert!(check_request(&h, &uri, Underscores::Allow).is_ok());
    }

    #[test]
    fn a_method_override_in_the_query_is_refused_as_frameworks_read_its_name() {
        for q in [
            "_method=DELETE",
            "a=1&_method=PUT",
            "a=1;_method=PUT",
            "_METHOD=DELETE",
            "%5Fmethod=DELETE",
            "%5fMethod=DELETE",
            "_%6Dethod=DELETE",
            ".method=DELETE",
            "+method=DELETE",
            "%20method=DELETE",
            "[method=DELETE",
            "_method",
            "x=&_method=",
            // PHP's names: leading spaces dropped, a NUL or `[` ends them.
            "+_method=DELETE",
            "%20%20_method=DELETE",
            "++.method=DELETE",
            "_method%00x=DELETE",
            "_method%00=DELETE",
            "_method[]=DELETE",
            "_method[x]=DELETE",
            "+++++++++++++++++++++++++++++++++++++++++_method=PUT",
        ] {
            let uri: Uri = format!("/admin/users/5?{q}").parse().unwrap();
            let e = check_request(&HeaderMap::new(), &uri, Underscores::Allow).unwrap_err();
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST, "{q}");
            assert!(e.reason.contains("_method"), "{q}: {}", e.reason);
        }
        for q in [
            "method=DELETE",
            "x_method=DELETE",
            "_methods=DELETE",
            "a=_method",
            "q=%5Fmethod",
            "_metho%",
            "__method=1",
            "x%00_method=1",
            "_method_=1",
            "",
        ] {
            let uri: Uri = format!("/admin/users/5?{q}").parse().unwrap();
            assert!(
                check_request(&HeaderMap::new(), &uri, Underscores::Allow).is_ok(),
                "{q}"
            );
        }
    }

    #[test]
    fn requests_lose_owned_fields_and_keep_the_rest() {
        let uri: Uri = "/a".parse().unwrap();
        let mut h = map(&[
            ("host", "a"),
            ("x_forwarded_client_cert", "By=forged"),
            ("x-forwarded-client-cert", "By=forged"),
            ("x-keyproof-step-up", "verified"),
            ("x_keyproof_step_up", "verified"),
            ("signature", "stepup=:AA==:"),
            ("signature_input", "x"),
            ("my_field", "1"),
            ("accept", "*/*"),
            ("transfer_encoding", "gzip"),
            ("Content_Length", "5"),
            ("proxy_authorization", "x"),
            // The sidecar appends the caller's address to X-Forwarded-For:
            // a CGI app would read this one, after it, as the last hop.
            ("X_Forwarded_For", "6.6.6.6"),
            ("x_forwarded-for", "6.6.6.6"),
        ]);
        let f = check_request(&h, &uri, Underscores::Allow).unwrap();
        assert!(f.owned);
        let mut keep = h.clone();
        strip_request(&mut h, f, false);
        assert_eq!(names(&h), ["accept", "host", "my_field"]);
        // On a step-up route the verifier gets the exact step-up fields.
        strip_request(&mut keep, f, true);
        assert_eq!(names(&keep), ["accept", "host", "my_field", "signature"]);
        let mut h = map(&[("my_field", "1"), ("a", "b")]);
        let f = check_request(&h, &uri, Underscores::Drop).unwrap();
        strip_request(&mut h, f, false);
        assert_eq!(names(&h), ["a"]);
        let h = map(&[("my_field", "1")]);
        assert_eq!(
            check_request(&h, &uri, Underscores::Reject)
                .unwrap_err()
                .status,
            400
        );
        // In reject mode an owned name in disguise is still just removed.
        let h = map(&[("x_forwarded_client_cert", "1"), ("transfer_encoding", "x")]);
        assert!(check_request(&h, &uri, Underscores::Reject).unwrap().owned);
        let h = map(&[("host", "a"), ("accept", "*/*")]);
        assert!(check_request(&h, &uri, Underscores::Reject)
            .unwrap()
            .is_clean());
    }

    #[test]
    fn the_callers_address_is_the_last_forwarded_hop() {
        let ip = HeaderValue::from_static("10.0.0.7");
        let mut h = HeaderMap::new();
        add_forwarded_for(&mut h, &ip);
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["10.0.0.7"]
        );
        assert!(h.get("forwarded").is_none());
        // A caller's own claims stay first, in one field.
        let mut h = map(&[
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-for", "1.2.3.4, 5.6.7.8"),
            ("forwarded", "for=127.0.0.1"),
        ]);
        add_forwarded_for(&mut h, &ip);
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["127.0.0.1, 1.2.3.4, 5.6.7.8, 10.0.0.7"]
        );
        assert_eq!(
            h.get_all("forwarded").iter().collect::<Vec<_>>(),
            ["for=127.0.0.1, for=10.0.0.7"]
        );
        let mut h = map(&[("forwarded", "for=x")]);
        add_forwarded_for(&mut h, &HeaderValue::from_static("fd00::7"));
        assert_eq!(h.get("forwarded").unwrap(), "for=x, for=\"[fd00::7]\"");
        // A caller's open quote would swallow the appended hop: such a
        // field is replaced, whatever line holds the quote.
        for claims in [
            &[("forwarded", "for=6.6.6.6;x=\"")][..],
            &[
                ("forwarded", "for=1.1.1.1"),
                ("forwarded", "for=\"6.6.6.6\\\""),
            ],
            &[("forwarded", "for=6.6.6.6;x=\"a\\")],
        ] {
            let mut h = map(claims);
            add_forwarded_for(&mut h, &ip);
            assert_eq!(
                h.get_all("forwarded").iter().collect::<Vec<_>>(),
                ["for=10.0.0.7"],
                "{claims:?}"
            );
        }
        let mut h = map(&[("forwarded", "for=\"[::1]\";by=\"a\\\"b\"")]);
        add_forwarded_for(&mut h, &ip);
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=\"[::1]\";by=\"a\\\"b\", for=10.0.0.7"
        );
    }

    #[test]
    fn http2_forms_h2_lets_through_are_refused_and_http1_is_left_alone() {
        use http::{Method, Version};
        let ok = |v: Version, m: Method, uri: &str, fields: &[(&str, &str)]| {
            check_h2_form(v, &m, &uri.parse().unwrap(), &map(fields)).is_ok()
        };
        let h2 = Version::HTTP_2;
        // As many fields as an HTTP/1.1 head may carry, not one more (431).
        let names: Vec<String> = (0..129).map(|i| format!("x-f{i}")).collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        assert!(ok(h2, Method::GET, "https://a/x", &many[..128]));
        let uri = "https://a/x".parse().unwrap();
        let r = check_h2_form(h2, &Method::GET, &uri, &map(&many)).unwrap_err();
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert!(ok(h2, Method::GET, "https://a/x?y", &[("x", "a b")]));
        assert!(ok(h2, Method::GET, "http://a/", &[]));
        // No `:authority`: h2 kept no scheme.
        assert!(ok(h2, Method::GET, "/x", &[("host", "a")]));
        assert!(ok(h2, Method::OPTIONS, "*", &[]));
        assert!(!ok(h2, Method::GET, "*", &[]));
        assert!(ok(h2, Method::CONNECT, "a:443", &[]));
        // An expectation the sidecar cannot meet: 417, as over HTTP/1.1.
        assert!(ok(
            h2,
            Method::POST,
            "https://a/x",
            &[("expect", "100-Continue")]
        ));
        let foo = map(&[("expect", "foo")]);
        let r = check_h2_form(h2, &Method::POST, &uri, &foo).unwrap_err();
        assert_eq!(r.status, StatusCode::EXPECTATION_FAILED);
        assert!(ok(
            Version::HTTP_11,
            Method::POST,
            "/x",
            &[("expect", "foo")]
        ));
        assert!(!ok(h2, Method::GET, "https://a?y", &[]));
        assert!(!ok(h2, Method::GET, "javascript://a/x", &[]));
        assert!(!ok(h2, Method::GET, "ftp://a/x", &[]));
        for v in [" 1", "1 ", "\t1", "1\t"] {
            assert!(
                !ok(h2, Method::GET, "https://a/x", &[("x-amount", v)]),
                "{v:?}"
            );
            assert!(
                ok(Version::HTTP_11, Method::GET, "/x", &[("x-amount", v)]),
                "{v:?}"
            );
        }
        assert!(ok(Version::HTTP_11, Method::GET, "http://a?y", &[]));
    }

    #[test]
    fn an_authority_is_there_without_userinfo_and_one_host() {
        use http::Version;
        let origin: Uri = "/x".parse().unwrap();
        let ok = |v: Version, uri: &Uri, host: Option<&str>| {
            let h = host.map_or_else(HeaderMap::new, |host| map(&[("host", host)]));
            check_authority(v, uri, &h).is_ok()
        };
        for host in [
            "b.svc",
            "B.SVC:8080",
            "10.0.0.1:80",
            "[::1]:443",
            "a_b.svc.",
            "b.svc.:80",
            "localhost",
        ] {
            assert!(ok(Version::HTTP_11, &origin, Some(host)), "{host}");
        }
        for host in [
            "b.svc/admin",
            "b.svc@evil.example",
            "u:p@b.svc",
            "evil.example, b.svc",
            "a,b",
            "b.svc:http",
            "b.svc:+80",
            "b.svc:99999",
            "b.svc:",
            ":80",
            ".b.svc",
            "b..svc",
            "b.svc..",
            "[::1",
            "[::1]x",
            "",
            "a..b",
        ] {
            assert!(!ok(Version::HTTP_11, &origin, Some(host)), "{host:?}");
        }
        // No Host: only HTTP/1.0 may.
        assert!(!ok(Version::HTTP_11, &origin, None));
        assert!(!ok(Version::HTTP_2, &origin, None));
        assert!(ok(Version::HTTP_10, &origin, None));
        // HTTP/2's :authority, userinfo included.
        let with_user: Uri = "https://u:p@b.svc/x".parse().unwrap();
        assert!(!ok(Version::HTTP_2, &with_user, None));
        let plain: Uri = "https://b.svc/x".parse().unwrap();
        assert!(ok(Version::HTTP_2, &plain, None));
    }

    #[test]
    fn host_connection_and_transfer_encoding_shapes_are_refused() {
        let origin: Uri = "/a".parse().unwrap();
        let absolute: Uri = "http://app.example/a".parse().unwrap();
        let status = |h: &[(&str, &str)], uri: &Uri| {
            check_request(&map(h), uri, Underscores::Allow)
                .map_or_else(|e| e.status.as_u16(), |_| 0)
        };
        assert_eq!(status(&[("host", "a"), ("host", "a")], &origin), 400);
        assert_eq!(status(&[("host", "other")], &absolute), 400);
        assert_eq!(status(&[("host", "APP.example")], &absolute), 0);
        assert_eq!(status(&[("host", "a")], &origin), 0);
        for named in [
            "host",
            "Content-Length",
            "transfer-encoding",
            "x-forwarded-client-cert",
            "x_forwarded_client_cert",
            "X-Keyproof-Step-Up",
            "signature-input",
            ":authority",
        ] {
            let v = format!("keep-alive, {named}");
            assert_eq!(status(&[("connection", &v)], &origin), 400, "{named}");
        }
        assert_eq!(
            status(&[("connection", "keep-alive, x-private, te")], &origin),
            0
        );
        assert_eq!(status(&[("transfer-encoding", "chunked")], &origin), 0);
        assert_eq!(
            status(&[("transfer-encoding", "chunked, chunked")], &origin),
            400
        );
        assert_eq!(
            status(
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked")
                ],
                &origin
            ),
            400
        );
        assert_eq!(
            status(&[("transfer-encoding", "gzip, chunked")], &origin),
            501
        );
        assert_eq!(status(&[("transfer-encoding", "gzip")], &origin), 501);
        assert_eq!(
            status(
                &[("transfer-encoding", "chunked"), ("content-length", "3")],
                &origin
            ),
            400
        );
    }

    #[test]
    fn trailers_keep_only_what_may_follow_the_content() {
        let mut t = map(&[
            ("grpc-status", "0"),
            ("x-forwarded-client-cert", "forged"),
            ("x_forwarded_client_cert", "forged"),
            ("x-keyproof-step-up", "verified"),
            ("content-length", "5"),
            ("host", "evil"),
            ("transfer-encoding", "chunked"),
            ("authorization", "Bearer x"),
            ("te", "trailers"),
            ("connection", "close"),
            ("content_type", "text/evil"),
            ("server-timing", "db;dur=5"),
        ]);
        filter_trailers(&mut t);
        assert_eq!(names(&t), ["grpc-status", "server-timing"]);
    }

    #[test]
    fn app_responses_lose_stepup_challenges_and_owned_fields() {
        let mut h = map(&[
            (
                "www-authenticate",
                "Basic realm=\"a, b\", StepUp error=\"stepup_required\", Bearer",
            ),
            ("www-authenticate", "stepup"),
            ("www-authenticate", "Negotiate abc=="),
            ("accept-signature", "stepup=(\"@method\");nonce=\"n\""),
            ("accept_signature", "x"),
            ("x-keyproof-step-up-error", "forged"),
            ("signature", "app=:AA==:"),
            ("content-type", "text/plain"),
        ]);
        assert!(!strip_response(&mut h));
        let v: Vec<_> = h
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(v, ["Basic realm=\"a, b\", Bearer", "Negotiate abc=="]);
        assert_eq!(names(&h), ["content-type", "signature", "www-authenticate"]);
        let mut h = map(&[("www-authenticate", "StepUp error=\"x\", foo=\"b\"")]);
        assert!(!strip_response(&mut h));
        assert!(h.is_empty());
    }

    #[test]
    fn an_app_asking_for_a_step_up_is_noticed_and_its_field_removed() {
        for asking in [
            &[("x-keyproof-step-up", "required")][..],
            &[("x-keyproof-step-up", " Required ")],
            &[
                ("x-keyproof-step-up", "verified"),
                ("x-keyproof-step-up", "required"),
            ],
            &[
                ("x-keyproof-step-up", "required"),
                ("x-keyproof-step-up-reason", "app"),
            ],
        ] {
            let mut h = map(asking);
            h.append("content-type", HeaderValue::from_static("text/plain"));
            assert!(strip_response(&mut h), "{asking:?}");
            assert_eq!(names(&h), ["content-type"], "{asking:?}");
        }
        // Another field, whatever its value, is no request: removed all
        // the same (only the sidecar says anything under the prefix).
        for not_asking in [
            &[("X-Keyproof-Step-Up-Reason", "required")][..],
            &[("x-keyproof-step-up-error", "required")],
            &[("X-Keyproof-Step-Upx", "required")],
            &[("accept", "required")],
        ] {
            let mut h = map(not_asking);
            assert!(!strip_response(&mut h), "{not_asking:?}");
            assert!(
                h.keys().all(|k| !k.as_str().contains("keyproof")),
                "{not_asking:?}"
            );
        }
    }

    #[test]
    fn the_step_up_reason_is_owned_in_every_spelling_and_removed_from_requests() {
        let uri: Uri = "/a".parse().unwrap();
        for forged in [
            "x-keyproof-step-up-reason",
            "X-Keyproof-Step-Up-Reason",
            "x_keyproof_step_up_reason",
            "X_KEYPROOF-STEP_UP-REASON",
        ] {
            assert!(is_owned(forged.as_bytes()), "{forged}");
            let mut h = map(&[("host", "a"), (forged, "app")]);
            let f = check_request(&h, &uri, Underscores::Reject).unwrap();
            assert!(f.owned, "{forged}");
            // On a step-up route too: only the step-up request fields stay.
            strip_request(&mut h, f, true);
            assert_eq!(names(&h), ["host"], "{forged}");
        }
        assert_eq!(STEP_UP_REASON.as_str(), "x-keyproof-step-up-reason");
    }
}
#[cfg(test)]
mod strip_tests {
    #[test]
    fn the_step_up_fields_are_the_ones_the_step_up_library_reads() {
        use keyproof_stepup::headers;
        assert_eq!(
            super::STEPUP_REQUEST,
            [
                headers::SIGNATURE.as_str(),
                headers::SIGNATURE_INPUT.as_str(),
                headers::STEPUP_BINDING.as_str()
            ]
        );
        assert!(super::is_owned(super::STEP_UP_ERROR.as_str().as_bytes()));
    }

    use super::*;

    fn map(fields: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in fields {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_are_stripped() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive, X-Private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("x-kept", "2"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "x-kept"]);
        // `te: trailers` is the one TE value that goes on (gRPC needs it).
        let mut h = map(&[("host", "a"), ("te", "trailers")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        let mut h = map(&[("host", "a"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn trailer_names_with_underscores_follow_the_mode() {
        let section = || {
            map(&[
                ("grpc-status", "0"),
                ("my_field", "1"),
                ("x_forwarded_client_cert", "forged"),
            ])
        };
        // (`allow` never gets here: its bodies are not checked.)
        let mut t = section();
        underscores_in_trailers(&mut t, Underscores::Drop).unwrap();
        // The owned name in disguise is left for `filter_trailers`.
        let mut names: Vec<_> = t.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["grpc-status", "x_forwarded_client_cert"]);
        let mut t = section();
        let e = underscores_in_trailers(&mut t, Underscores::Reject).unwrap_err();
        assert!(e.to_string().contains("\"my_field\""), "{e}");
        let mut t = map(&[("x_forwarded_client_cert", "forged")]);
        underscores_in_trailers(&mut t, Underscores::Reject).expect("removed, not refused");
        filter_trailers(&mut t);
        assert!(t.is_empty());
    }

    #[test]
    fn hop_by_hop_and_framing_names_are_kept_out_of_trailers_in_any_spelling() {
        for n in [
            "Transfer-Encoding",
            "transfer_encoding",
            "Content_Length",
            "TE",
            "proxy_authorization",
            "keep-alive",
            "Set-Cookie",
            "trailer",
        ] {
            assert!(not_in_trailers(n.as_bytes()), "{n}");
        }
        for n in ["grpc-status", "grpc-message", "server-timing", "x-custom"] {
            assert!(!not_in_trailers(n.as_bytes()), "{n}");
        }
        assert!(is_hop_by_hop(b"Connection") && is_hop_by_hop(b"UPGRADE"));
        // Hop-by-hop matching is exact: the disguised spelling is an
        // ordinary field to a peer that does not map `_`.
        assert!(!is_hop_by_hop(b"transfer_encoding"));
    }

    #[test]
    fn the_underscore_mode_names_its_configuration_value_and_refusals_say_so() {
        assert_eq!(Underscores::default(), Underscores::Allow);
        for (m, name) in [
            (Underscores::Allow, "allow"),
            (Underscores::Drop, "drop"),
            (Underscores::Reject, "reject"),
        ] {
            assert_eq!(m.as_str(), name);
        }
        let uri: Uri = "/".parse().unwrap();
        let e = check_request(&map(&[("my_field", "1")]), &uri, Underscores::Reject).unwrap_err();
        assert!(e.underscore);
        let e = check_request(
            &map(&[("host", "a"), ("host", "b")]),
            &uri,
            Underscores::Reject,
        )
        .unwrap_err();
        assert!(!e.underscore);
        let f = check_request(
            &map(&[("my_field", "1"), ("b_c", "2")]),
            &uri,
            Underscores::Drop,
        )
        .unwrap();
        assert_eq!(
            f,
            Findings {
                owned: false,
                underscores: 2,
                caller_statement: false,
            }
        );
        assert!(!f.is_clean());
        // In `allow` mode such names are nothing to act on.
        let f = check_request(&map(&[("my_field", "1")]), &uri, Underscores::Allow).unwrap();
        assert!(f.is_clean());
    }

    #[test]
    fn a_callers_client_address_fields_are_replaced_by_its_own_address() {
        // Round 11 F4: nginx behind a proxy it trusts reads X-Real-IP by
        // default; other stacks the CDN spellings.
        let uri: Uri = "/x".parse().unwrap();
        let ip = HeaderValue::from_static("10.1.2.3");
        for mode in [Underscores::Allow, Underscores::Drop] {
            let mut h = map(&[
                ("x-real-ip", "10.9.9.9"),
                ("X_Real_IP", "10.9.9.8"),
                ("x.real.ip", "10.9.9.7"),
                ("true-client-ip", "10.9.9.6"),
                ("x-client-ip", "10.9.9.5"),
                ("cf-connecting-ip", "10.9.9.4"),
                ("fastly_client_ip", "10.9.9.3"),
                ("x-cluster-client-ip", "10.9.9.2"),
                ("x-amount", "1"),
            ]);
            let f = check_request(&h, &uri, mode).unwrap();
            assert!(f.caller_statement && !f.owned, "{f:?}");
            strip_request(&mut h, f, false);
            set_caller_statements(&mut h, f, &ip);
            let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            names.sort();
            assert_eq!(names, ["x-amount", "x-real-ip"], "{mode:?}");
            assert_eq!(h["x-real-ip"], "10.1.2.3");
        }
        // Without any, X-Real-IP is still set.
        let mut h = map(&[("x-amount", "1")]);
        let f = check_request(&h, &uri, Underscores::Allow).unwrap();
        set_caller_statements(&mut h, f, &ip);
        assert_eq!(h["x-real-ip"], "10.1.2.3");
        // Never in trailers.
        assert!(not_in_trailers(b"x-real-ip") && not_in_trailers(b"True_Client_IP"));
    }

    #[test]
    fn what_a_front_proxy_says_of_the_caller_is_the_sidecars_to_say() {
        // Round 12 F1/F2: the fields by which mTLS terminators and
        // authenticating proxies name the caller's certificate, user and
        // scheme, in any spelling; fields that only share a word stay.
        let uri: Uri = "/x".parse().unwrap();
        let ip = HeaderValue::from_static("10.1.2.3");
        let forged = [
            "ssl-client-verify",
            "SSL_Client_Subject_DN",
            "ssl-client-cert",
            "x-ssl-client-verify",
            "X-SSL-Client-S-DN",
            "x.ssl.cert",
            "x-client-cert",
            "client-cert",
            "Client-Cert-Chain",
            "x-forwarded-tls-client-cert",
            "x-forwarded-tls-client-cert-info",
            "x-amzn-mtls-clientcert",
            "x-amzn-mtls-clientcert-leaf",
            "x-amzn-oidc-identity",
            "x-arr-clientcert",
            "x-forwarded-user",
            "x_forwarded_email",
            "x-auth-request-user",
            "X-Auth-Request-Groups",
            "x-remote-user",
            "x-remote-group",
            "x-remote-extra-scopes",
            "remote-user",
            "Remote_User",
            "x-webauth-user",
            "x-consumer-username",
            "x-authenticated-userid",
            "x-goog-authenticated-user-email",
            "x-ms-client-principal-name",
            "cf-access-authenticated-user-email",
            "x-forwarded-proto",
            "X_Forwarded_Proto",
            "x-forwarded-ssl",
            "front-end-https",
            "x-url-scheme",
            "x-forwarded-scheme",
            "x-forwarded-port",
            "x-scheme",
            "l5d-client-id",
            "X-Forwarded-Prefix",
            // Round 12 verification V2.
            "x-client-cert-spiffe",
            "x-client-cert-present",
            "ms-aspnetcore-clientcert",
            "wl-proxy-client-cert",
            "wl-proxy-ssl",
            "remote-groups",
            "remote-email",
            "x-authentik-username",
            "tailscale-user-login",
            "cf-connecting-ipv6",
            "fly-client-ip",
            "x-azure-socketip",
            "cloudfront-forwarded-proto",
            "cf-visitor",
            // Second verification VA2.
            "cf-client-cert-sha256",
            "x-pomerium-claim-email",
            "x-authenticated-groups",
            "cdn-src-ip",
            "oidc-claim-email",
            "x-userinfo",
            "x-credential-username",
            "x-vouch-user",
            "x-auth-user",
            "x-jwt-payload",
            "x-client-verified",
            "x-client-s-dn",
            "x-arr-clientcert-verified",
            "x-forwarded-client-cert-info",
            "x-spiffe-id",
            "x-true-ip",
            "do-connecting-ip",
            "x-vercel-forwarded-for",
            "x-forwarded-https",
            "forwarded-proto",
        ];
        let kept = [
            "x-amount",
            "x-client-id",
            "x-client-version",
            "x-user-agent",
            "x-forwarded-host",
            "x-forwarded-for",
            "sslclient",
            "remotely",
        ];
        let mut fields: Vec<(&str, &str)> = forged.iter().map(|n| (*n, "ops")).collect();
        fields.extend(kept.iter().map(|n| (*n, "1")));
        for mode in [Underscores::Allow, Underscores::Drop] {
            let mut h = map(&fields);
            let f = check_request(&h, &uri, mode).unwrap();
            assert!(f.caller_statement && !f.owned, "{f:?}");
            strip_request(&mut h, f, false);
            set_caller_statements(&mut h, f, &ip);
            let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            names.sort();
            let mut want: Vec<_> = kept.iter().copied().chain(["x-real-ip"]).collect();
            want.sort();
            assert_eq!(names, want, "{mode:?}");
        }
        for n in forged {
            assert!(not_in_trailers(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn every_caller_statement_is_found_by_the_request_check() {
        // The request check skips names by their first letter: every
        // listed name (and a prefix's family) must get past that filter.
        let uri: Uri = "/x".parse().unwrap();
        let names = CLIENT_ADDRESS
            .iter()
            .chain(&CALLER_STATEMENTS)
            .map(|n| n.to_string())
            .chain(CALLER_STATEMENT_PREFIXES.iter().map(|p| format!("{p}x")));
        for n in names {
            for spelt in [n.clone(), n.replace('-', "_").to_uppercase()] {
                let mut h = http::HeaderMap::new();
                h.insert(
                    HeaderName::from_bytes(spelt.as_bytes()).unwrap(),
                    HeaderValue::from_static("1"),
                );
                let f = check_request(&h, &uri, Underscores::Allow).unwrap();
                assert!(f.caller_statement, "{spelt}");
            }
        }
    }

    #[test]
    fn responses_lose_every_owned_field_whatever_its_first_letter() {
        // Round 12 su F1: `stepup-binding` starts with a letter the cheap
        // filter did not let through.
        for n in [
            "stepup-binding",
            "Stepup-Binding",
            "x-keyproof-step-up",
            "x-forwarded-client-cert",
            "accept-signature",
        ] {
            let mut h = http::HeaderMap::new();
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("x"),
            );
            h.insert("content-type", HeaderValue::from_static("text/plain"));
            let _ = strip_response(&mut h);
            assert_eq!(h.len(), 1, "{n}: {h:?}");
        }
    }

    #[test]
    fn overrides_never_pass_in_trailers() {
        // Round 12 su F3: refused in the header section, so removed from
        // trailers, which some stacks merge into the headers.
        for n in METHOD_OVERRIDES.iter().chain(&URL_OVERRIDES) {
            assert!(not_in_trailers(n.as_bytes()), "{n}");
            assert!(not_in_trailers(n.replace('-', "_").as_bytes()), "{n}");
        }
    }

    #[test]
    fn a_path_override_field_is_refused_in_every_spelling() {
        // Round 11 F2: gunicorn takes SCRIPT_NAME from a proxy it trusts
        // and cuts it off the path Flask and Django route by.
        let uri: Uri = "/x/admin".parse().unwrap();
        for n in [
            "script_name",
            "SCRIPT-NAME",
            "script.name",
            "path_info",
            "x-script-name",
            "X_Script_Name",
        ] {
            let h = map(&[(n, "/x")]);
            let e = check_request(&h, &uri, Underscores::Allow).unwrap_err();
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST, "{n}");
        }
        assert!(check_request(&map(&[("scriptname", "/x")]), &uri, Underscores::Allow).is_ok());
    }

    #[test]
    fn te_trailers_survives_a_connection_field_that_names_te() {
        let mut h = map(&[
            ("connection", "te, X-A"),
            ("te", "trailers"),
            ("x-a", "1"),
            ("host", "a"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "te"]);
    }
}

#[cfg(test)]
mod asking_tests {
    use super::*;

    fn response(fields: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h
    }

    #[test]
    fn the_step_up_field_in_any_spelling_and_with_any_value_is_the_app_asking() {
        let values: [&[u8]; 10] = [
            b"required",
            b"required, required",
            b"\"required\"",
            b"required\xff",
            b"REQUIRED",
            b"",
            b"verified",
            b"required-not",
            b"no",
            b"required\t",
        ];
        for name in [
            "x-keyproof-step-up",
            "X-Keyproof-Step-Up",
            "x_keyproof_step_up",
            "X_KEYPROOF-STEP_UP",
        ] {
            for v in values {
                let mut h = response(&[(name, v)]);
                assert!(strip_response(&mut h), "{name}: {v:?}");
                assert_eq!(h.len(), 1, "{name}: {v:?}");
                assert!(h.contains_key(header::CONTENT_TYPE));
            }
        }
        // Two fields (two spellings, or the same name twice).
        for two in [
            &[
                ("x-keyproof-step-up", &b"verified"[..]),
                ("x-keyproof-step-up", b"ok"),
            ][..],
            &[("x_keyproof_step_up", b"x"), ("x-keyproof-step-up", b"")],
        ] {
            let mut h = response(two);
            assert!(strip_response(&mut h), "{two:?}");
            assert_eq!(h.len(), 1, "{two:?}");
        }
        // No step-up field: nothing asked, nothing removed.
        let mut h = response(&[("x-keyproof-step-up-reason", b"required")]);
        assert!(!strip_response(&mut h));
        assert_eq!(h.len(), 1);
    }
}
