//! Inbound route policy: the deny list first, on every path; then the first
//! route whose path prefix and methods match decides: its `allow` list must
//! contain the caller. Opaque TCP tunnels (HTTP/2 CONNECT) are decided the
//! same way, by port: the deny list, then the port's `tcp` rule.

use std::sync::Arc;

use keyproof_identity::{IdPattern, SpiffeId};
use prometheus::IntCounter;

use crate::config::{without_leading_zeros, DefaultPolicy, DenyEntry, PolicyConfig, StepUpMode};
use crate::inbound::risk::{RiskTable, RouteRisk};
use crate::inbound::tunnel::Grant;
use crate::metrics::Metrics;

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    /// Matches this path and everything below it.
    pub path_prefix: String,
    /// Empty: every method.
    pub methods: Vec<http::Method>,
    /// Allowed callers.
    pub allow: Vec<IdPattern>,
    /// When requests need a step-up proof.
    pub step_up: StepUpMode,
    /// The compiled risk rules of a `risk` route.
    pub risk: Option<RouteRisk>,
    denied: IntCounter,
    /// A `risk` route as an `always` one: what applies when a path meets
    /// two different `risk` routes, as written and as apps read it (see
    /// [`Policy::decide`]).
    always: Option<Arc<Route>>,
    /// Other paths by which web servers run the script the route names
    /// ([`script_aliases`]).
    aliases: Vec<ScriptAlias>,
}

/// A path by which a server runs a script other than the script's own.
#[derive(Debug, PartialEq, Eq)]
enum ScriptAlias {
    /// This path and everything below it (`/admin` for `/admin.php`).
    Prefix(String),
    /// This directory and everything below it (`/panel` for
    /// `/panel/index.php`: PHP's own server runs a directory's index for
    /// any path below it that names no file, as front controllers are
    /// set up to).
    Directory(String),
}

impl ScriptAlias {
    /// Whether `path` (normalized, no query) is this alias as apps read
    /// paths (case ignored, a `.suffix`: [`path_matches`]).
    fn meets(&self, path: &str) -> bool {
        match self {
            ScriptAlias::Prefix(p) => path_matches(p, path, true),
            ScriptAlias::Directory(d) if d == "/" => true,
            ScriptAlias::Directory(d) => path_matches(d, path, true),
        }
    }
}

/// Extensions of server-side scripts, which the "hide the extension"
/// rewrites and content negotiation serve without it.
const SCRIPT_EXTENSIONS: [&str; 20] = [
    "php", "php3", "php4", "php5", "php7", "php8", "phtml", "cgi", "pl", "py", "rb", "asp", "aspx",
    "ashx", "asmx", "jsp", "jspx", "cfm", "shtml", "lua",
];

/// The other paths by which web servers run the script a route's prefix
/// names (its last segment has an extension: [`may_name_script`]): without
/// the extension, which the "hide .php" rewrites (nginx `try_files $uri
/// $uri.php`, Apache `RewriteRule ^([^.]+)$ $1.php`) and Apache's
/// `MultiViews` (also for `/admin/x`, as PATH_INFO) serve from it; and for
/// a directory index (`index.*`, IIS's `default.*`), its directory and
/// everything below it: every server runs it for the directory (nginx
/// `index`, Apache `DirectoryIndex`), PHP's own server for any path below
/// it that names no file, and front controllers are set up so. A
/// route written for the script must also hold for those: they are the
/// same handler.
fn script_aliases(prefix: &str) -> Vec<ScriptAlias> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    let Some((dir, last)) = trimmed.rsplit_once('/') else {
        return Vec::new();
    };
    if !may_name_script(last, None) {
        return Vec::new();
    }
    let Some((name, ext)) = last.rsplit_once('.') else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // Only scripts lose their extension that way: a route for a data file
    // (`/report.json`) does not take `/report/...`, another handler's.
    if SCRIPT_EXTENSIONS
        .iter()
        .any(|e| ext.eq_ignore_ascii_case(e))
    {
        out.push(ScriptAlias::Prefix(format!("{dir}/{name}")));
    }
    if name.eq_ignore_ascii_case("index") || name.eq_ignore_ascii_case("default") {
        out.push(ScriptAlias::Directory(if dir.is_empty() {
            "/".to_owned()
        } else {
            dir.to_owned()
        }));
    }
    out
}

/// The outcome for one request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// Forward; the matched route, if any.
    Allow(Option<&'a Arc<Route>>),
    /// Refuse with 403; the body says which rule. The caller's own
    /// refusal: the deny list or a route's `allow` list names it.
    Deny(String),
    /// Refuse with 403: no route matches and `default_policy` is `deny`.
    /// Not held against the caller (its risk rules): well-behaved callers
    /// ask for paths no route names (`/favicon.ico`, a health check).
    Unrouted(String),
}

/// The outcome for one tunnel (HTTP/2 CONNECT).
#[derive(Debug, PartialEq, Eq)]
pub enum TcpDecision {
    /// Connect the local port.
    Allow,
    /// Refuse with 403; the body says why. The caller's own refusal: the
    /// deny list or the port's rule names it.
    Deny(String),
    /// Refuse with 403: no rule for the port. Not held against the caller:
    /// an unmodified app in transparent mode dials ports of peers that
    /// take no tunnels.
    Unrouted(String),
}

/// One compiled `[[inbound.deny]]` entry.
#[derive(Debug)]
struct Denied {
    entry: DenyEntry,
    /// The pattern, or `serial:<hex>`: the body and the metric label.
    label: String,
    /// `keyproof_deny_list_refused_total{entry}`.
    refused: IntCounter,
}

/// The compiled policy.
#[derive(Debug)]
pub struct Policy {
    /// Shared, so that a request's future can own its route.
    routes: Vec<Arc<Route>>,
    default: DefaultPolicy,
    default_denied: IntCounter,
    deny: Vec<Denied>,
    /// `[[inbound.tcp]]`: port and who may tunnel to it; few entries, so a
    /// scan beats a map.
    tcp: Vec<(u16, Vec<IdPattern>)>,
    /// Some route prefix has an upper-case letter: every path is matched
    /// both ways (see `decide`), not only those with one.
    mixed_case: bool,
    /// Some route names a script ([`script_aliases`]).
    scripted: bool,
    /// Which load this is: what a request admitted under it compares with
    /// the policy in force, to be decided on again only after a change.
    pub generation: u64,
}

/// Segment-aware prefix match: `/admin` matches `/admin` and `/admin/x`,
/// never `/administrator` (a plain string prefix would let a route's rule
/// leak onto unrelated paths). A prefix written with a final `/`
/// (`/secret/`) matches the path without it too (`/secret`), which most
/// frameworks serve with the same handler. `as_apps_read`: the path as
/// many apps read it when they pick a handler: case ignored (see
/// [`fold_len`]), as Express and ASP.NET Core match by default, and a
/// `.suffix` on the segment that ends the prefix (`/admin.json`,
/// `/admin.`), which Spring MVC's suffix patterns (the default before 5.3)
/// and Rails' `(.:format)` serve from the `/admin` handler. `path` is the
/// normalized path without its query.
fn path_matches(prefix: &str, path: &str, as_apps_read: bool) -> bool {
    let (prefix, path) = (prefix.as_bytes(), path.as_bytes());
    let base = match prefix.strip_suffix(b"/") {
        Some(b) if !b.is_empty() => b,
        _ => prefix,
    };
    let len = if as_apps_read {
        fold_len(base, path)
    } else {
        path.starts_with(base).then_some(base.len())
    };
    let Some(len) = len else {
        return false;
    };
    let rest = &path[len..];
    base.ends_with(b"/")
        || rest.is_empty()
        || rest[0] == b'/'
        || (as_apps_read && rest[0] == b'.' && !rest.contains(&b'/'))
}

/// Whether an app could read `path` as one that meets a route the path as
/// written does not ([`read_as`], [`path_matches`] as apps read paths): it
/// has a letter whose case or encoding could differ, a `.` (a suffix, a
/// script), or a `cgi-bin` segment (scripts without an extension).
fn may_read_otherwise(path: &str) -> bool {
    path.bytes()
        .any(|b| b.is_ascii_uppercase() || b == b'%' || b == b'.')
        || (path.contains('-')
            && path
                .as_bytes()
                .windows(b"/cgi-bin/".len())
                .any(|w| w.eq_ignore_ascii_case(b"/cgi-bin/")))
}

/// Whether a path segment may name a script that a web server runs with
/// the rest of the path as its PATH_INFO (CGI, RFC 3875 section 4.1.5):
/// `/index.php/admin/x` runs `index.php`, and a front controller (Symfony,
/// Laravel, most PHP frameworks; CGI, mod_wsgi and ASP.NET handlers alike)
/// routes by `/admin/x`. Servers run scripts of whatever extension they are
/// told to (lighttpd's `cgi.assign`, Apache's `AddHandler`: `.sh`, `.lua`,
/// `.wsgi`, `.cfm`...), so any name with an extension counts (letters,
/// digits, `-` and `_`, at least one letter: `v1.2` is a version, not a
/// script), and so does any name right after a `cgi-bin` segment, where
/// Apache's `ScriptAlias` and lighttpd run scripts without one. Reading a
/// path more ways only adds routes it must pass.
fn may_name_script(segment: &str, after: Option<&str>) -> bool {
    if after.is_some_and(|a| a.eq_ignore_ascii_case("cgi-bin")) && !segment.is_empty() {
        return true;
    }
    segment.rsplit_once('.').is_some_and(|(name, ext)| {
        !name.is_empty()
            && ext
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && ext.bytes().any(|b| b.is_ascii_alphabetic())
    })
}

/// The paths an app may pick a handler by, for the normalized `path`:
/// the path itself; without one final `/` (Rails and others strip it, and
/// `/admin.json/` is then `/admin.json`); and for each segment that names
/// a script and is followed by more ([`may_name_script`]), the script's path
/// (`/admin.php`) and its PATH_INFO (`/admin/x`), each also without a
/// final `/`. Slices of `path`.
fn read_as(path: &str) -> Vec<&str> {
    fn push<'p>(out: &mut Vec<&'p str>, p: &'p str) {
        for q in [Some(p), p.strip_suffix('/').filter(|q| !q.is_empty())]
            .into_iter()
            .flatten()
        {
            if !out.contains(&q) {
                out.push(q);
            }
        }
    }
    let mut out = Vec::with_capacity(2);
    push(&mut out, path);
    let mut start = 1;
    let mut previous = None;
    while let Some(end) = path
        .get(start..)
        .and_then(|r| r.find('/'))
        .map(|i| start + i)
    {
        let segment = &path[start..end];
        if may_name_script(segment, previous) {
            push(&mut out, &path[..end]);
            push(&mut out, &path[end..]);
        }
        previous = Some(segment);
        start = end + 1;
    }
    out
}

/// The four non-ASCII letters that case-insensitive comparisons in common
/// app stacks equate with an ASCII one (Java's `equalsIgnoreCase`,
/// JavaScript's `/iu`, .NET's `OrdinalIgnoreCase`): dotless ı and dotted
/// İ with `i`, long ſ with `s`, the Kelvin sign with `k`. A path carries
/// them percent-encoded (raw non-ASCII is refused before this), in either
/// hex case.
const FOLDS_TO_ASCII: [(&[u8], u8); 4] = [
    (b"%C4%B1", b'i'),
    (b"%C4%B0", b'i'),
    (b"%C5%BF", b's'),
    (b"%E2%84%AA", b'k'),
];

/// How many bytes of `path` the route prefix `base` covers when case is
/// ignored as apps ignore it (ASCII letters either case, and
/// [`FOLDS_TO_ASCII`]; a letter beyond ASCII in the route, percent-encoded
/// UTF-8, either case too, by Unicode's case mapping, as ASP.NET Core's
/// `OrdinalIgnoreCase`, Fastify's `caseSensitive: false` and Java's
/// `equalsIgnoreCase` compare), or `None` if `path` does not start with it
/// so.
fn fold_len(base: &[u8], path: &[u8]) -> Option<usize> {
    let (mut i, mut at) = (0, 0);
    while i < base.len() {
        let b = base[i];
        if b == b'%' {
            if let Some((want, n)) = encoded_char(&base[i..]).filter(|(c, _)| !c.is_ascii()) {
                let (got, m) = encoded_char(&path[at..])?;
                if !same_letter(want, got) {
                    return None;
                }
                i += n;
                at += m;
                continue;
            }
        }
        i += 1;
        let c = *path.get(at)?;
        if c.eq_ignore_ascii_case(&b) {
            at += 1;
            continue;
        }
        let rest = &path[at..];
        let (enc, _) = FOLDS_TO_ASCII.iter().find(|(enc, ascii)| {
            *ascii == b.to_ascii_lowercase()
                && rest
                    .get(..enc.len())
                    .is_some_and(|r| r.eq_ignore_ascii_case(enc))
        })?;
        at += enc.len();
    }
    Some(at)
}

/// The character a percent-encoded UTF-8 sequence at the start of `b`
/// stands for, and the sequence's length; `None` if `b` starts otherwise.
fn encoded_char(b: &[u8]) -> Option<(char, usize)> {
    let byte = |k: usize| -> Option<u8> {
        let e = b.get(k * 3..k * 3 + 3)?;
        if e[0] != b'%' {
            return None;
        }
        let hex = std::str::from_utf8(&e[1..]).ok()?;
        u8::from_str_radix(hex, 16).ok()
    };
    let first = byte(0)?;
    let len = match first {
        0x00..=0x7f => 1,
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return None,
    };
    let mut buf = [0u8; 4];
    buf[0] = first;
    for (k, slot) in buf.iter_mut().enumerate().take(len).skip(1) {
        *slot = byte(k)?;
    }
    let c = std::str::from_utf8(&buf[..len]).ok()?.chars().next()?;
    Some((c, len * 3))
}

/// Whether two letters are the same but for case, as Unicode maps case.
fn same_letter(a: char, b: char) -> bool {
    a == b || a.to_lowercase().eq(b.to_lowercase()) || a.to_uppercase().eq(b.to_uppercase())
}

impl Policy {
    /// Compiles a policy, and makes `table` apply its risk routes (per-route
    /// state of a route the reload leaves unchanged carries over; that of a
    /// changed or removed route starts again). `generation` numbers the
    /// loads (the `keyproof_policy_generation` gauge, and what requests in
    /// flight compare with).
    pub fn new(
        cfg: &PolicyConfig,
        default: DefaultPolicy,
        table: &Arc<RiskTable>,
        generation: u64,
        metrics: &Metrics,
    ) -> Result<Policy, prometheus::Error> {
        let mut routes = Vec::with_capacity(cfg.routes.len());
        for r in &cfg.routes {
            let risk = match r.step_up {
                StepUpMode::Risk => Some(RouteRisk::new(table, r, &cfg.risk_rules)),
                _ => None,
            };
            let route = |step_up, risk, always| Route {
                path_prefix: r.path_prefix.clone(),
                methods: r.methods.clone(),
                allow: r.allow.clone(),
                step_up,
                risk,
                denied: metrics.authz_denied(&r.path_prefix),
                always,
                aliases: script_aliases(&r.path_prefix),
            };
            let always = risk
                .is_some()
                .then(|| Arc::new(route(StepUpMode::Always, None, None)));
            routes.push(Arc::new(route(r.step_up, risk, always)));
        }
        let deny = cfg
            .deny
            .iter()
            .map(|entry| {
                let label = entry.label();
                Denied {
                    refused: table.deny_list_refused(&label),
                    entry: entry.clone(),
                    label,
                }
            })
            .collect();
        // Only now that nothing can fail: a policy that is not built must
        // not change what the table records.
        table.apply(routes.iter().filter_map(|r| r.risk.as_ref()));
        Ok(Policy {
            default,
            default_denied: metrics.authz_denied("default"),
            deny,
            tcp: cfg.tcp.iter().map(|t| (t.port, t.allow.clone())).collect(),
            mixed_case: cfg
                .routes
                .iter()
                .any(|r| r.path_prefix.bytes().any(|b| b.is_ascii_uppercase())),
            scripted: routes.iter().any(|r| !r.aliases.is_empty()),
            routes,
            generation,
        })
    }

    /// True when any route may demand step-up (the exporter is then derived
    /// for every connection).
    pub fn any_step_up(&self) -> bool {
        self.routes.iter().any(|r| r.step_up.any())
    }

    /// Decides one request and counts a refusal. `serial` is the caller's
    /// certificate serial (hex, for the deny list; leading zeros and case
    /// do not matter). The deny list is checked first, whatever the path.
    pub fn decide<'p>(
        &'p self,
        method: &http::Method,
        path: &str,
        peer: &SpiffeId,
        serial: &str,
    ) -> Decision<'p> {
        if let Some(msg) = self.deny_listed(peer, serial) {
            return Decision::Deny(msg);
        }
        let find = |path: &str, as_apps_read| {
            self.routes.iter().find(|r| {
                path_matches(&r.path_prefix, path, as_apps_read)
                    && (r.methods.is_empty() || r.methods.iter().any(|m| covers(m, method)))
            })
        };
        let written = find(path, false);
        // An app that ignores case (Express, ASP.NET Core by default) serves
        // `/ADMIN` from its `/admin` handler, one with suffix patterns
        // (Spring MVC, Rails) `/admin.json`, a PHP front controller
        // `/index.php/admin` (see `read_as`); another app serves each from
        // the handler of the route matched as written. A path that meets
        // other routes as apps read it must pass all of them, and the
        // strictest step-up applies. A reading that meets no route adds
        // nothing. Looked for only when that can make a difference.
        let mut folded: Option<&Arc<Route>> = None;
        let mut also =
            |f: &'p Arc<Route>| also_meets(written, &mut folded, f, (method, path, peer));
        if self.mixed_case || may_read_otherwise(path) {
            for alt in read_as(path) {
                if let Some(f) = find(alt, true) {
                    if let Err(msg) = also(f) {
                        return Decision::Deny(msg);
                    }
                }
            }
        }
        // A route that names a script holds for the paths servers run it by
        // without its name (`/admin` for `/admin.php`, `/panel/` for
        // `/panel/index.php`).
        if self.scripted {
            for r in &self.routes {
                if r.aliases.iter().any(|a| a.meets(path))
                    && (r.methods.is_empty() || r.methods.iter().any(|m| covers(m, method)))
                {
                    if let Err(msg) = also(r) {
                        return Decision::Deny(msg);
                    }
                }
            }
        }
        match written {
            Some(w) if w.allow.iter().any(|p| p.matches(peer)) => {
                Decision::Allow(Some(folded.map_or(w, |f| stricter(w, f))))
            }
            Some(w) => {
                w.denied.inc();
                Decision::Deny(format!(
                    "forbidden: route {} does not allow {peer} to {method}\n",
                    w.path_prefix
                ))
            }
            None => match self.default {
                DefaultPolicy::AllowTrustDomain => Decision::Allow(folded),
                DefaultPolicy::Deny => {
                    self.default_denied.inc();
                    Decision::Unrouted(format!(
                        "forbidden: no route matches {method} {path} and default_policy is deny\n"
                    ))
                }
            },
        }
    }
}

/// A route `f` that a request meets as apps read its path, beside the one
/// it meets as written (`written`) and those met so far (`folded`, the
/// strictest): the caller must be allowed by it (else the refusal's body),
/// and its step-up joins `folded`.
fn also_meets<'p>(
    written: Option<&'p Arc<Route>>,
    folded: &mut Option<&'p Arc<Route>>,
    f: &'p Arc<Route>,
    (method, path, peer): (&http::Method, &str, &SpiffeId),
) -> Result<(), String> {
    if written.is_some_and(|w| Arc::ptr_eq(w, f)) || folded.is_some_and(|g| Arc::ptr_eq(g, f)) {
        return Ok(());
    }
    if !f.allow.iter().any(|p| p.matches(peer)) {
        f.denied.inc();
        return Err(format!(
            "forbidden: route {} (which {path} meets as many apps match paths: case ignored, a .suffix after its last segment, a script's path info, a script without its extension or by its directory) does not allow {peer} to {method}\n",
            f.path_prefix
        ));
    }
    *folded = Some(folded.map_or(f, |g| stricter(g, f)));
    Ok(())
}

/// Of two routes one path meets (as written, and as apps read it), the
/// one whose step-up is stricter: `always` over `risk` over `never`. Two
/// different `risk` routes each have rules the other lacks, and which
/// handler serves the path depends on the app: such a request is
/// challenged always (only a path whose case differs from the routes', or
/// with a `.suffix`, meets two).
fn stricter<'a>(written: &'a Arc<Route>, folded: &'a Arc<Route>) -> &'a Arc<Route> {
    let rank = |m: StepUpMode| match m {
        StepUpMode::Never => 0,
        StepUpMode::Risk => 1,
        StepUpMode::Always => 2,
    };
    match rank(folded.step_up).cmp(&rank(written.step_up)) {
        std::cmp::Ordering::Greater => folded,
        std::cmp::Ordering::Less => written,
        std::cmp::Ordering::Equal => folded.always.as_ref().unwrap_or(written),
    }
}

/// Whether a route listing `listed` covers a request with `method` as the
/// app will read it: apps commonly read methods without regard to case
/// (`post` is POST to them, though HTTP's methods are case-sensitive) and
/// serve HEAD with GET's handler. Matched any narrower, such a request
/// would walk past the route, its allow list and its step-up, to the same
/// handler.
fn covers(listed: &http::Method, method: &http::Method) -> bool {
    let m = method.as_str();
    m.eq_ignore_ascii_case(listed.as_str())
        || (listed == http::Method::GET && m.eq_ignore_ascii_case("HEAD"))
}

impl Policy {
    /// Whether the deny list names the caller (not counted: no request
    /// was refused).
    pub fn denies(&self, peer: &SpiffeId, serial: &str) -> bool {
        let serial = without_leading_zeros(serial);
        self.deny.iter().any(|d| match &d.entry {
            DenyEntry::Id(p) => p.matches(peer),
            DenyEntry::Serial(s) => !serial.is_empty() && s.eq_ignore_ascii_case(serial),
        })
    }

    /// The deny list's refusal of the caller, counted, if an entry lists it.
    #[inline]
    fn deny_listed(&self, peer: &SpiffeId, serial: &str) -> Option<String> {
        if self.deny.is_empty() {
            return None;
        }
        // Deny list serials are normalized (`config::normalize_serial`);
        // the caller's is compared in that form without allocating. An
        // empty serial stays empty and matches none.
        let serial = without_leading_zeros(serial);
        let d = self.deny.iter().find(|d| match &d.entry {
            DenyEntry::Id(p) => p.matches(peer),
            DenyEntry::Serial(s) => !serial.is_empty() && s.eq_ignore_ascii_case(serial),
        })?;
        d.refused.inc();
        Some(format!(
            "forbidden: {peer} is refused by the deny list entry {}\n",
            d.label
        ))
    }

    /// Whether an open tunnel or switched connection, allowed as `grant`,
    /// is still allowed: the deny list, the port's `tcp` rule, or the
    /// path's route. An unproven switch does not ride a route that demands
    /// a proof of every request (`always`). On a step-up route (`risk`, or
    /// `always` for a proven one) a switch stays only if that very route
    /// and its rules let it through (they decided on it once, as they
    /// decide each request once); a route that became `risk` or `always`,
    /// or whose rules changed, never decided on it, and the switch is
    /// decided again by being made again (a `deny` or challenge rule of the
    /// new policy may fire for it: the handshake's fields, which header
    /// rules read, are not kept).
    pub fn still_allows(&self, grant: &Grant, peer: &SpiffeId, serial: &str) -> bool {
        match grant {
            Grant::Tcp(port) => self.decide_tcp(*port, peer, serial) == TcpDecision::Allow,
            Grant::Switch { path, proven, risk } => {
                self.still_admits(&http::Method::GET, path, *proven, *risk, peer, serial)
            }
        }
    }

    /// Whether a request admitted earlier (`method`, the matched `path`;
    /// `proven`: it carried a verified step-up proof; `risk`: the
    /// fingerprint of the `risk` route that decided on it) would be
    /// admitted by this policy as it was: see [`Policy::still_allows`].
    pub fn still_admits(
        &self,
        method: &http::Method,
        path: &str,
        proven: bool,
        risk: Option<u64>,
        peer: &SpiffeId,
        serial: &str,
    ) -> bool {
        match self.decide(method, path, peer, serial) {
            Decision::Allow(None) => true,
            Decision::Allow(Some(r)) => {
                let same = || r.risk.as_ref().map(RouteRisk::fingerprint) == risk;
                match r.step_up {
                    StepUpMode::Always => proven && same(),
                    StepUpMode::Risk => same(),
                    StepUpMode::Never => true,
                }
            }
            Decision::Deny(_) | Decision::Unrouted(_) => false,
        }
    }

    /// Decides a tunnel to local `port`: the deny list first, then the
    /// port's `tcp` rule, which must exist and allow the caller (there is
    /// no default for tunnels).
    pub fn decide_tcp(&self, port: u16, peer: &SpiffeId, serial: &str) -> TcpDecision {
        if let Some(msg) = self.deny_listed(peer, serial) {
            return TcpDecision::Deny(msg);
        }
        match self.tcp.iter().find(|(p, _)| *p == port) {
            None => TcpDecision::Unrouted(format!(
                "forbidden: no tcp rule for port {port}: tunnels to it are refused\n"
            )),
            Some((_, allow)) if allow.iter().any(|p| p.matches(peer)) => TcpDecision::Allow,
            Some(_) => TcpDecision::Deny(format!(
                "forbidden: the tcp rule for port {port} does not allow {peer}\n"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;

    fn pol(routes: &[RouteConfig], default: DefaultPolicy, m: &Metrics) -> Policy {
        let cfg = PolicyConfig {
            routes: routes.to_vec(),
            ..PolicyConfig::default()
        };
        // The table registers its metrics once per registry; these tests
        // compile several policies against one registry.
        let table = RiskTable::new(100, &Metrics::new().unwrap()).unwrap();
        Policy::new(&cfg, default, &table, 0, m).unwrap()
    }

    #[test]
    fn prefix_is_segment_aware() {
        assert!(path_matches("/admin", "/admin", false));
        assert!(path_matches("/admin", "/admin/users", false));
        assert!(!path_matches("/admin", "/administrator", false));
        assert!(path_matches("/", "/anything", false));
        assert!(path_matches("/api/", "/api/x", false));
    }

    #[test]
    fn first_match_wins() {
        let m = Metrics::new().unwrap();
        let ops = IdPattern::parse("spiffe://td/ns/ops/*").unwrap();
        let web = IdPattern::parse("spiffe://td/ns/default/sa/web").unwrap();
        let routes = vec![
            RouteConfig {
                path_prefix: "/admin".into(),
                methods: vec![http::Method::POST],
                allow: vec![ops],
                step_up: StepUpMode::Never,
                risk: vec![],
            },
            RouteConfig {
                path_prefix: "/admin".into(),
                methods: vec![],
                allow: vec![web],
                step_up: StepUpMode::Never,
                risk: vec![],
            },
        ];
        let p = pol(&routes, DefaultPolicy::Deny, &m);
        let web_id = SpiffeId::parse("spiffe://td/ns/default/sa/web").unwrap();
        let ops_id = SpiffeId::parse("spiffe://td/ns/ops/sa/x").unwrap();
        assert!(matches!(
            p.decide(&http::Method::POST, "/admin/x", &web_id, ""),
            Decision::Deny(_)
        ));
        assert!(matches!(
            p.decide(&http::Method::POST, "/admin/x", &ops_id, ""),
            Decision::Allow(Some(_))
        ));
        assert!(matches!(
            p.decide(&http::Method::GET, "/admin", &web_id, ""),
            Decision::Allow(Some(_))
        ));
        assert!(matches!(
            p.decide(&http::Method::GET, "/other", &web_id, ""),
            Decision::Unrouted(_)
        ));
    }

    fn route(prefix: &str, methods: &[http::Method], allow: &[&str]) -> RouteConfig {
        RouteConfig {
            path_prefix: prefix.into(),
            methods: methods.to_vec(),
            allow: allow.iter().map(|a| IdPattern::parse(a).unwrap()).collect(),
            step_up: StepUpMode::Never,
            risk: vec![],
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    /// The matched route's prefix, `Some("")` for an allow by default, or
    /// `None` for a denial.
    fn outcome(p: &Policy, method: http::Method, path: &str, peer: &str) -> Option<String> {
        match p.decide(&method, path, &id(peer), "") {
            Decision::Allow(Some(r)) => Some(r.path_prefix.clone()),
            Decision::Allow(None) => Some(String::new()),
            Decision::Deny(_) | Decision::Unrouted(_) => None,
        }
    }

    const WEB: &str = "spiffe://td/ns/default/sa/web";
    const OPS: &str = "spiffe://td/ns/ops/sa/x";

    #[test]
    fn the_first_matching_route_decides_even_when_a_later_one_is_more_specific() {
        let m = Metrics::new().unwrap();
        let routes = [
            route("/api", &[], &[WEB]),
            route("/api/admin", &[], &["spiffe://td/ns/ops/*"]),
        ];
        let p = pol(&routes, DefaultPolicy::Deny, &m);
        // Not the longest prefix: the first in the file.
        assert_eq!(outcome(&p, http::Method::GET, "/api/admin", OPS), None);
        assert_eq!(
            outcome(&p, http::Method::GET, "/api/admin/x", WEB).as_deref(),
            Some("/api")
        );
    }

    #[test]
    fn an_open_switch_stays_on_a_step_up_route_only_while_the_rules_that_decided_on_it_are_in_force(
    ) {
        let m = Metrics::new().unwrap();
        let with = |mode| {
            let mut r = route("/ws", &[], &[WEB]);
            r.step_up = mode;
            pol(&[r], DefaultPolicy::Deny, &m)
        };
        let web = id(WEB);
        let switch = |proven, risk| Grant::Switch {
            path: "/ws/chat".into(),
            proven,
            risk,
        };
        for mode in [StepUpMode::Never, StepUpMode::Always, StepUpMode::Risk] {
            let p = with(mode);
            // Made under the route as it is now (its fingerprint, when it
            // decides by risk).
            let here = p.routes[0].risk.as_ref().map(RouteRisk::fingerprint);
            let unproven = match mode {
                StepUpMode::Never => true,
                // A route that demands a proof of everything: unproven
                // switches go, proven ones stay.
                StepUpMode::Always => false,
                // Its rules decided once, when the switch was made.
                StepUpMode::Risk => true,
            };
            assert_eq!(
                p.still_allows(&switch(false, here), &web, "01"),
                unproven,
                "{mode:?}"
            );
            assert!(p.still_allows(&switch(true, here), &web, "01"), "{mode:?}");
            // Another caller: never.
            assert!(
                !p.still_allows(&switch(true, here), &id(OPS), "02"),
                "{mode:?}"
            );
        }
        // Made under no rules, or other ones: a step-up route never decided
        // on it, and it goes, proven or not (made again, the switch meets
        // the new rules, whose deny rules may refuse it); on a route that
        // demands nothing it stays.
        for mode in [StepUpMode::Always, StepUpMode::Risk, StepUpMode::Never] {
            let p = with(mode);
            let here = p.routes[0].risk.as_ref().map(RouteRisk::fingerprint);
            let other = match here {
                Some(f) => [None, Some(f ^ 1)],
                None => [Some(1), Some(2)],
            };
            for before in other {
                for proven in [false, true] {
                    assert_eq!(
                        p.still_allows(&switch(proven, before), &web, "01"),
                        mode == StepUpMode::Never,
                        "{mode:?} {before:?} proven {proven}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_prefix_matches_on_segment_boundaries_only() {
        let m = Metrics::new().unwrap();
        let routes = [route("/admin", &[], &["spiffe://td/ns/ops/*"])];
        let p = pol(&routes, DefaultPolicy::AllowTrustDomain, &m);
        for path in ["/admin", "/admin/", "/admin/users", "/admin/users/1"] {
            assert_eq!(outcome(&p, http::Method::GET, path, WEB), None, "{path}");
            assert_eq!(
                outcome(&p, http::Method::GET, path, OPS).as_deref(),
                Some("/admin"),
                "{path}"
            );
        }
        // Other names that merely start with the prefix are not under it
        // (`/admin.json` is, as apps read it: see the suffix test below).
        for path in ["/administrator", "/admin-panel", "/admin_x", "/"] {
            assert_eq!(
                outcome(&p, http::Method::GET, path, WEB).as_deref(),
                Some(""),
                "{path}"
            );
        }
    }

    #[test]
    fn a_prefix_ending_in_a_slash_covers_the_path_without_it() {
        // `/secret/` is `/secret` to Express, whose non-strict routing
        // serves both from one handler.
        assert!(path_matches("/api/", "/api/", false));
        assert!(path_matches("/api/", "/api/v1", false));
        assert!(path_matches("/api/", "/api", false));
        assert!(!path_matches("/api/", "/apiv1", false));
        assert!(!path_matches("/api/", "/ap", false));
        assert!(path_matches("/", "/", false));
    }

    #[test]
    fn a_route_the_path_meets_when_case_is_ignored_must_allow_the_caller_too() {
        let m = Metrics::new().unwrap();
        let admin = route("/admin", &[], &[OPS]);
        let mut pay = route("/Pay/", &[], &[WEB, OPS]);
        pay.step_up = StepUpMode::Always;
        let p = pol(&[admin, pay], DefaultPolicy::AllowTrustDomain, &m);
        let web = id(WEB);
        for path in ["/ADMIN", "/Admin/users", "/aDmIn"] {
            assert!(
                matches!(
                    p.decide(&http::Method::GET, path, &web, "01"),
                    Decision::Deny(_)
                ),
                "{path}"
            );
            assert!(matches!(
                p.decide(&http::Method::GET, path, &id(OPS), "02"),
                Decision::Allow(Some(r)) if r.path_prefix == "/admin" && !r.step_up.any()
            ));
        }
        assert!(matches!(
            p.decide(&http::Method::GET, "/administrator", &web, "01"),
            Decision::Allow(None)
        ));
        // A step-up route met only when case is ignored: its step-up applies.
        for path in ["/pay", "/PAY/x", "/Pay"] {
            match p.decide(&http::Method::GET, path, &web, "01") {
                Decision::Allow(Some(r)) => assert_eq!(r.path_prefix, "/Pay/", "{path}"),
                _ => panic!("{path}: not the step-up route"),
            }
        }
    }

    #[test]
    fn of_two_routes_a_path_meets_by_case_the_stricter_step_up_applies_and_both_allow_lists() {
        let m = Metrics::new().unwrap();
        let with = |prefix: &str, allow: &[&str], mode| RouteConfig {
            step_up: mode,
            ..route(prefix, &[], allow)
        };
        let routes = [
            with("/secret", &[WEB, OPS], StepUpMode::Always),
            with("/pay", &[WEB, OPS], StepUpMode::Risk),
            with("/ops", &[OPS], StepUpMode::Never),
            with("/", &[WEB, OPS], StepUpMode::Risk),
        ];
        let p = pol(&routes, DefaultPolicy::AllowTrustDomain, &m);
        let web = id(WEB);
        let mode = |path: &str, peer: &SpiffeId| match p.decide(&http::Method::GET, path, peer, "")
        {
            Decision::Allow(Some(r)) => Some(r.step_up),
            Decision::Allow(None) => Some(StepUpMode::Never),
            Decision::Deny(_) | Decision::Unrouted(_) => None,
        };
        // As written, the catch-all `risk` route; when case is ignored, an
        // `always` one: always.
        for path in ["/SECRET", "/Secret/x", "/sEcReT"] {
            assert_eq!(mode(path, &web), Some(StepUpMode::Always), "{path}");
        }
        assert_eq!(mode("/secret", &web), Some(StepUpMode::Always));
        // Two `risk` routes with rules of their own: always.
        assert_eq!(mode("/PAY", &web), Some(StepUpMode::Always));
        assert_eq!(mode("/pay", &web), Some(StepUpMode::Risk));
        assert_eq!(mode("/other", &web), Some(StepUpMode::Risk));
        // The route met when case is ignored must allow the caller.
        assert_eq!(mode("/OPS", &web), None);
        assert_eq!(mode("/OPS", &id(OPS)), Some(StepUpMode::Risk));
        // And so must the one matched as written, whichever applies.
        let routes = [
            with("/admin", &[WEB], StepUpMode::Always),
            with("/", &[OPS], StepUpMode::Never),
        ];
        let p = pol(&routes, DefaultPolicy::AllowTrustDomain, &m);
        assert!(matches!(
            p.decide(&http::Method::GET, "/ADMIN", &web, ""),
            Decision::Deny(msg) if msg.contains("route / does not allow")
        ));
        // Met only when case is ignored, under default deny: the default
        // refuses (a case-sensitive app serves no route there).
        let routes = [with("/admin", &[WEB], StepUpMode::Always)];
        let p = pol(&routes, DefaultPolicy::Deny, &m);
        assert!(matches!(
            p.decide(&http::Method::GET, "/ADMIN", &web, ""),
            Decision::Unrouted(_)
        ));
        assert!(matches!(
            p.decide(&http::Method::GET, "/admin", &web, ""),
            Decision::Allow(Some(_))
        ));
    }

    #[test]
    fn non_ascii_letters_apps_equate_with_ascii_ones_meet_the_route() {
        for path in [
            "/adm%C4%B1n",
            "/adm%c4%b1n/x",
            "/ADM%C4%B0N",
            "/%C5%BFecret",
            "/%e2%84%aaey",
        ] {
            let route = if path.contains("ecret") {
                "/secret"
            } else if path.contains("ey") {
                "/key"
            } else {
                "/admin"
            };
            assert!(path_matches(route, path, true), "{path}");
            assert!(!path_matches(route, path, false), "{path}");
        }
        for path in ["/adm%C4%B2n", "/adm%C4", "/admi%C4%B1", "/adm%C4%B1nx"] {
            assert!(!path_matches("/admin", path, true), "{path}");
        }
        let m = Metrics::new().unwrap();
        let mut admin = route("/admin", &[], &[WEB]);
        admin.step_up = StepUpMode::Always;
        let p = pol(&[admin], DefaultPolicy::AllowTrustDomain, &m);
        assert!(matches!(
            p.decide(&http::Method::GET, "/adm%C4%B1n", &id(WEB), ""),
            Decision::Allow(Some(r)) if r.step_up == StepUpMode::Always
        ));
        assert!(matches!(
            p.decide(&http::Method::GET, "/adm%C4%B1n", &id(OPS), ""),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn a_letter_beyond_ascii_in_a_route_meets_its_other_case() {
        // Round 12 auth F6: Fastify (caseSensitive: false), ASP.NET Core
        // and Java fold é and É alike.
        let m = Metrics::new().unwrap();
        let mut cafe = route("/caf%C3%A9/admin", &[], &[OPS]);
        cafe.step_up = StepUpMode::Always;
        let p = pol(
            &[cafe, route("/", &[], &[WEB, OPS])],
            DefaultPolicy::Deny,
            &m,
        );
        for path in [
            "/caf%C3%A9/admin",
            "/caf%C3%89/admin",
            "/CAF%c3%89/ADMIN/x",
            "/%C3%9Cber",
        ] {
            let want_admin = !path.contains("%C3%9C");
            let got = p.decide(&http::Method::GET, path, &id(WEB), "");
            assert_eq!(
                matches!(got, Decision::Deny(_)),
                want_admin,
                "{path}: {got:?}"
            );
        }
        // Another letter is another path.
        assert!(matches!(
            p.decide(&http::Method::GET, "/caf%C3%A8/admin", &id(WEB), ""),
            Decision::Allow(Some(r)) if r.path_prefix == "/"
        ));
        assert_eq!(encoded_char(b"%C3%A9x"), Some(('\u{e9}', 6)));
        assert_eq!(encoded_char(b"%C3"), None);
        assert_eq!(encoded_char(b"%FFx"), None);
        assert!(same_letter('\u{e9}', '\u{c9}') && !same_letter('\u{e9}', '\u{e8}'));
    }

    #[test]
    fn a_suffix_on_a_routes_last_segment_meets_the_route() {
        // Spring MVC's suffix patterns and Rails' `(.:format)` serve
        // `/admin.json` and `/admin.` from the `/admin` handler.
        for path in ["/admin.json", "/admin.", "/ADMIN.json", "/admin..x"] {
            assert!(path_matches("/admin", path, true), "{path}");
            assert!(path_matches("/admin/", path, true), "{path}");
        }
        assert!(!path_matches("/admin", "/admin.json", false));
        // A suffix is of the last segment only; other names stay apart.
        for path in ["/admin.json/x", "/administrator.json", "/admi.json"] {
            assert!(!path_matches("/admin", path, true), "{path}");
        }
        let m = Metrics::new().unwrap();
        let mut admin = route("/admin", &[], &[OPS]);
        admin.step_up = StepUpMode::Always;
        let routes = [admin, route("/", &[], &[WEB, OPS])];
        let p = pol(&routes, DefaultPolicy::AllowTrustDomain, &m);
        for path in ["/admin.json", "/admin.", "/Admin.xml"] {
            assert!(
                matches!(
                    p.decide(&http::Method::GET, path, &id(WEB), ""),
                    Decision::Deny(msg) if msg.contains("route /admin ")
                ),
                "{path}"
            );
            assert!(
                matches!(
                    p.decide(&http::Method::GET, path, &id(OPS), ""),
                    Decision::Allow(Some(r)) if r.step_up == StepUpMode::Always
                ),
                "{path}"
            );
        }
        // Dots elsewhere change nothing (a segment with an extension
        // followed by more is read as a script and its path info: see
        // the next test).
        for path in ["/static/app.js", "/v1.2/admin", "/a.b/x"] {
            assert!(
                matches!(
                    p.decide(&http::Method::GET, path, &id(WEB), ""),
                    Decision::Allow(Some(r)) if r.path_prefix == "/"
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn a_scripts_path_info_and_a_suffix_before_a_final_slash_meet_their_routes() {
        // Round 10 F3: a PHP front controller routes `/index.php/admin/x`
        // by `/admin/x`; F3b: `/admin.php/x` runs admin.php, and Rails
        // strips the `/` of `/admin.json/`.
        let m = Metrics::new().unwrap();
        let mut admin = route("/admin", &[], &[OPS]);
        admin.step_up = StepUpMode::Always;
        for default in [DefaultPolicy::AllowTrustDomain, DefaultPolicy::Deny] {
            let catch_all = route("/", &[], &[WEB, OPS]);
            let routes = [admin.clone(), catch_all];
            let p = pol(&routes, default, &m);
            for path in [
                "/index.php/admin/x",
                "/index.php/admin",
                "/app/index.PHP/admin/",
                "/admin.php/x",
                "/admin.php/",
                "/admin.json/",
                "/cgi-bin/run.cgi/admin",
                "/svc.asmx/x/index.php/admin",
                // Round 11 F6: a server runs scripts of any extension it
                // is told to (lighttpd's cgi.assign, Apache's AddHandler).
                "/app.sh/admin/users",
                "/app.wsgi/admin",
                "/x/run.lua/admin/",
                "/notes.txt/admin",
                // Round 11 verification: scripts without an extension
                // under cgi-bin, and extensions with `-`.
                "/cgi-bin/app/admin/users",
                "/CGI-BIN/app/admin",
                "/x/app.v2-x/admin",
            ] {
                assert!(
                    matches!(
                        p.decide(&http::Method::GET, path, &id(WEB), ""),
                        Decision::Deny(msg) if msg.contains("route /admin ") && msg.contains("path info")
                    ),
                    "{path}"
                );
                assert!(
                    matches!(
                        p.decide(&http::Method::GET, path, &id(OPS), ""),
                        Decision::Allow(Some(r)) if r.step_up == StepUpMode::Always
                    ),
                    "{path}"
                );
            }
            // What no app reads as /admin stays with the catch-all.
            for path in [
                "/static/app.js",
                "/index.php",
                "/index.php/",
                "/index.php/users",
                "/php/admin",
                "/.php/admin",
                "/x./admin",
                "/api/v1.2/admin",
                "/cgi-bin/admin",
                "/cgi/app/admin",
                "/administrator.php/x",
            ] {
                assert!(
                    matches!(
                        p.decide(&http::Method::GET, path, &id(WEB), ""),
                        Decision::Allow(Some(r)) if r.path_prefix == "/"
                    ),
                    "{path}"
                );
            }
        }
        // Under the default policy with no route for the path as written,
        // its path info still meets /admin.
        let p = pol(&[admin], DefaultPolicy::AllowTrustDomain, &m);
        assert!(matches!(
            p.decide(&http::Method::GET, "/index.php/admin/x", &id(OPS), ""),
            Decision::Allow(Some(r)) if r.step_up == StepUpMode::Always
        ));
        assert!(matches!(
            p.decide(&http::Method::GET, "/index.php/admin/x", &id(WEB), ""),
            Decision::Deny(_)
        ));
        assert_eq!(read_as("/a/b"), ["/a/b"]);
        assert_eq!(
            read_as("/x/i.php/a/"),
            ["/x/i.php/a/", "/x/i.php/a", "/x/i.php", "/a/", "/a"]
        );
    }

    #[test]
    fn a_route_for_a_script_holds_for_its_name_without_extension_and_its_directory() {
        // Round 12 auth F4/F5: nginx `try_files $uri $uri.php`, Apache
        // MultiViews and `RewriteRule ^([^.]+)$ $1.php` run /admin.php for
        // /admin (and /admin/x); every server runs a directory's index
        // script for the directory.
        let m = Metrics::new().unwrap();
        for default in [DefaultPolicy::AllowTrustDomain, DefaultPolicy::Deny] {
            let mut script = route("/admin.php", &[], &[OPS]);
            script.step_up = StepUpMode::Always;
            let mut index = route("/panel/index.php", &[], &[OPS]);
            index.step_up = StepUpMode::Always;
            let mut front = route("/index.php", &[http::Method::POST], &[OPS]);
            front.step_up = StepUpMode::Always;
            let catch_all = route("/", &[], &[WEB, OPS]);
            let p = pol(&[script, index, front, catch_all], default, &m);
            for (method, path) in [
                (http::Method::GET, "/admin"),
                (http::Method::GET, "/ADMIN"),
                (http::Method::GET, "/admin/"),
                (http::Method::GET, "/admin/users"),
                (http::Method::GET, "/admin.json"),
                (http::Method::GET, "/panel/"),
                (http::Method::GET, "/panel"),
                (http::Method::GET, "/Panel/"),
                (http::Method::GET, "/panel/index"),
                // Verification V1: `php -S` runs panel/index.php for any
                // path below /panel that names no file.
                (http::Method::GET, "/panel/users/delete"),
                (http::Method::POST, "/"),
                (http::Method::POST, "/any/path"),
            ] {
                assert!(
                    matches!(
                        p.decide(&method, path, &id(WEB), ""),
                        Decision::Deny(msg) if msg.contains("without its extension")
                    ),
                    "{method} {path}"
                );
                assert!(
                    matches!(
                        p.decide(&method, path, &id(OPS), ""),
                        Decision::Allow(Some(r)) if r.step_up == StepUpMode::Always
                    ),
                    "{method} {path}"
                );
            }
            // Other paths, and other methods than the route's, stay with
            // the catch-all.
            for (method, path) in [
                (http::Method::GET, "/administrator"),
                (http::Method::GET, "/panels/"),
                (http::Method::GET, "/"),
                (http::Method::GET, "/x/admin"),
            ] {
                assert!(
                    matches!(
                        p.decide(&method, path, &id(WEB), ""),
                        Decision::Allow(Some(r)) if r.path_prefix == "/"
                    ),
                    "{method} {path}"
                );
            }
        }
        assert_eq!(script_aliases("/v1.2"), []);
        assert_eq!(script_aliases("/api/"), []);
        // A data file's route takes no other handler's paths.
        assert_eq!(script_aliases("/report.json"), []);
        assert_eq!(
            script_aliases("/panel/index.html"),
            [ScriptAlias::Directory("/panel".into())]
        );
        assert_eq!(
            script_aliases("/a/Default.aspx"),
            [
                ScriptAlias::Prefix("/a/Default".into()),
                ScriptAlias::Directory("/a".into())
            ]
        );
    }

    #[test]
    fn the_query_is_not_part_of_the_matched_path() {
        // `decide` is given the path without its query (the inbound passes
        // `uri.path()`): a path that still carried one would not match.
        assert!(!path_matches("/admin", "/admin?q=1", false));
    }

    #[test]
    fn a_method_in_another_case_or_head_for_get_does_not_walk_past_its_route() {
        // Frameworks read `post` as POST and answer HEAD with the GET
        // handler: the route that covers those handlers must decide.
        let m = Metrics::new().unwrap();
        let routes = [
            route("/admin", &[http::Method::POST], &["spiffe://td/ns/ops/*"]),
            route("/report", &[http::Method::GET], &["spiffe://td/ns/ops/*"]),
        ];
        let allow = pol(&routes, DefaultPolicy::AllowTrustDomain, &m);
        let method = |s: &str| http::Method::from_bytes(s.as_bytes()).unwrap();
        for (meth, path) in [
            ("post", "/admin"),
            ("pOST", "/admin"),
            ("get", "/report"),
            ("HEAD", "/report"),
            ("head", "/report"),
        ] {
            match allow.decide(&method(meth), path, &id(WEB), "") {
                Decision::Deny(msg) => assert!(msg.contains("does not allow"), "{meth}: {msg}"),
                other => panic!("{meth} {path}: {other:?}"),
            }
            assert_eq!(
                outcome(&allow, method(meth), path, OPS).as_deref(),
                Some(path),
                "{meth}"
            );
        }
        // HEAD is not POST, nor GET another method.
        assert_eq!(
            outcome(&allow, http::Method::HEAD, "/admin", WEB).as_deref(),
            Some("")
        );
        assert_eq!(
            outcome(&allow, http::Method::OPTIONS, "/report", WEB).as_deref(),
            Some("")
        );
    }

    #[test]
    fn a_route_with_methods_matches_only_those() {
        let m = Metrics::new().unwrap();
        let routes = [route(
            "/admin",
            &[http::Method::POST, http::Method::DELETE],
            &["spiffe://td/ns/ops/*"],
        )];
        let deny = pol(&routes, DefaultPolicy::Deny, &m);
        assert_eq!(outcome(&deny, http::Method::POST, "/admin", WEB), None);
        assert_eq!(outcome(&deny, http::Method::DELETE, "/admin/x", WEB), None);
        assert_eq!(
            outcome(&deny, http::Method::POST, "/admin", OPS).as_deref(),
            Some("/admin")
        );
        // A GET is not this route's: the default decides, even for ops.
        assert_eq!(outcome(&deny, http::Method::GET, "/admin", OPS), None);
        match deny.decide(&http::Method::GET, "/admin", &id(OPS), "") {
            Decision::Unrouted(msg) => {
                assert!(msg.contains("no route matches GET /admin"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        let allow = pol(&routes, DefaultPolicy::AllowTrustDomain, &m);
        assert_eq!(
            outcome(&allow, http::Method::GET, "/admin", WEB).as_deref(),
            Some("")
        );
        assert_eq!(outcome(&allow, http::Method::POST, "/admin", WEB), None);
    }

    #[test]
    fn the_default_policy_decides_unmatched_paths() {
        let m = Metrics::new().unwrap();
        let routes = [route("/admin", &[], &[WEB])];
        let deny = pol(&routes, DefaultPolicy::Deny, &m);
        match deny.decide(&http::Method::GET, "/other", &id(WEB), "") {
            Decision::Unrouted(msg) => assert_eq!(
                msg,
                "forbidden: no route matches GET /other and default_policy is deny\n"
            ),
            other => panic!("{other:?}"),
        }
        let allow = pol(&routes, DefaultPolicy::AllowTrustDomain, &m);
        assert!(matches!(
            allow.decide(&http::Method::GET, "/other", &id(OPS), ""),
            Decision::Allow(None)
        ));
        // No routes at all: the default alone.
        let none = pol(&[], DefaultPolicy::Deny, &m);
        assert_eq!(outcome(&none, http::Method::GET, "/", WEB), None);
        assert!(!none.any_step_up());
    }

    #[test]
    fn allow_patterns_are_exact_ids_or_path_prefixes() {
        let m = Metrics::new().unwrap();
        let routes = [
            route("/exact", &[], &[WEB]),
            route("/ops", &[], &["spiffe://td/ns/ops/*"]),
            route("/td", &[], &["spiffe://td/*"]),
        ];
        let p = pol(&routes, DefaultPolicy::Deny, &m);
        let allowed = |path: &str, peer: &str| outcome(&p, http::Method::GET, path, peer).is_some();
        assert!(allowed("/exact", WEB));
        for peer in [
            "spiffe://td/ns/default/sa/web2",
            "spiffe://td/ns/default/sa/web/x",
            "spiffe://td/ns/default/sa",
            "spiffe://other/ns/default/sa/web",
        ] {
            assert!(!allowed("/exact", peer), "{peer}");
        }
        assert!(allowed("/ops", "spiffe://td/ns/ops/sa/x"));
        assert!(allowed("/ops", "spiffe://td/ns/ops/a/b/c"));
        for peer in [
            "spiffe://td/ns/ops",
            "spiffe://td/ns/opsx/sa/x",
            "spiffe://other/ns/ops/sa/x",
        ] {
            assert!(!allowed("/ops", peer), "{peer}");
        }
        assert!(allowed("/td", WEB));
        assert!(!allowed("/td", "spiffe://other/ns/default/sa/web"));
        assert!(!allowed("/td", "spiffe://tdx/ns/default/sa/web"));
    }

    #[test]
    fn a_route_with_an_empty_allow_list_refuses_everyone() {
        let m = Metrics::new().unwrap();
        let p = pol(
            &[route("/closed", &[], &[])],
            DefaultPolicy::AllowTrustDomain,
            &m,
        );
        assert_eq!(outcome(&p, http::Method::GET, "/closed/x", WEB), None);
    }

    #[test]
    fn refusals_are_counted_by_route_and_default() {
        use crate::testing::metric;
        let m = Metrics::new().unwrap();
        let routes = [route("/a", &[], &[WEB]), route("/b", &[], &[WEB])];
        let p = pol(&routes, DefaultPolicy::Deny, &m);
        let series = |r: &str| format!("keyproof_authz_denied_total{{route=\"{r}\"}}");
        for _ in 0..2 {
            let _ = p.decide(&http::Method::GET, "/a/x", &id(OPS), "");
        }
        let _ = p.decide(&http::Method::GET, "/b", &id(OPS), "");
        let _ = p.decide(&http::Method::GET, "/c", &id(OPS), "");
        let _ = p.decide(&http::Method::GET, "/a", &id(WEB), "");
        assert_eq!(metric(&m, &series("/a")), 2.0);
        assert_eq!(metric(&m, &series("/b")), 1.0);
        assert_eq!(metric(&m, &series("default")), 1.0);
        // Allowed requests count nowhere.
        let _ = p.decide(&http::Method::GET, "/b/y", &id(WEB), "");
        assert_eq!(metric(&m, &series("/b")), 1.0);
    }

    #[test]
    fn the_denial_names_the_route_the_caller_and_the_method() {
        let m = Metrics::new().unwrap();
        let p = pol(&[route("/a", &[], &[WEB])], DefaultPolicy::Deny, &m);
        match p.decide(&http::Method::PUT, "/a/x", &id(OPS), "") {
            Decision::Deny(msg) => assert_eq!(
                msg,
                format!("forbidden: route /a does not allow {OPS} to PUT\n")
            ),
            other => panic!("{other:?}"),
        }
    }

    fn deny_pol(
        routes: &[RouteConfig],
        deny: &[DenyEntry],
        default: DefaultPolicy,
        m: &Metrics,
    ) -> Policy {
        let cfg = PolicyConfig {
            routes: routes.to_vec(),
            deny: deny.to_vec(),
            ..PolicyConfig::default()
        };
        let table = RiskTable::new(100, m).unwrap();
        Policy::new(&cfg, default, &table, 0, m).unwrap()
    }

    #[test]
    fn the_deny_list_refuses_before_any_route_on_every_path() {
        use crate::testing::metric;
        let m = Metrics::new().unwrap();
        let stolen = "spiffe://td/ns/x/sa/stolen";
        let deny = [
            DenyEntry::Id(IdPattern::parse(stolen).unwrap()),
            DenyEntry::Id(IdPattern::parse("spiffe://td/ns/bad/*").unwrap()),
            DenyEntry::Serial("a1b".into()),
        ];
        let routes = [route("/open", &[], &["spiffe://td/*"])];
        let p = deny_pol(&routes, &deny, DefaultPolicy::AllowTrustDomain, &m);
        let refused = |peer: &str, serial: &str, path: &str| match p.decide(
            &http::Method::GET,
            path,
            &id(peer),
            serial,
        ) {
            Decision::Deny(body) | Decision::Unrouted(body) => Some(body),
            Decision::Allow(_) => None,
        };
        // A route that allows the whole trust domain, and the default.
        for path in ["/open", "/open/x", "/elsewhere", "/"] {
            assert_eq!(
                refused(stolen, "1", path).as_deref(),
                Some(&*format!(
                    "forbidden: {stolen} is refused by the deny list entry {stolen}\n"
                )),
                "{path}"
            );
            assert_eq!(
                refused("spiffe://td/ns/bad/sa/a", "1", path).as_deref(),
                Some("forbidden: spiffe://td/ns/bad/sa/a is refused by the deny list entry spiffe://td/ns/bad/*\n"),
            );
            assert!(refused(WEB, "1", path).is_none(), "{path}");
        }
        // A serial: any peer presenting that certificate, whatever the
        // case or leading zeros it is handed in with.
        for serial in ["a1b", "A1B", "0a1b", "000A1b"] {
            let body = refused(WEB, serial, "/open").expect(serial);
            assert!(body.ends_with("deny list entry serial:a1b\n"), "{body}");
        }
        for serial in ["", "a1", "a1b0", "1a1b", "0"] {
            assert!(refused(WEB, serial, "/open").is_none(), "{serial:?}");
        }
        // Not a prefix match: the pattern's own ID is not below it.
        assert!(refused("spiffe://td/ns/bad", "1", "/open").is_none());
        assert!(refused("spiffe://td/ns/x/sa/stolen2", "1", "/open").is_none());
        let series = |e: &str| format!("keyproof_deny_list_refused_total{{entry=\"{e}\"}}");
        assert_eq!(metric(&m, &series(stolen)), 4.0);
        assert_eq!(metric(&m, &series("spiffe://td/ns/bad/*")), 4.0);
        assert_eq!(metric(&m, &series("serial:a1b")), 4.0);
        // Deny-list refusals are not route or default refusals.
        assert_eq!(
            metric(&m, "keyproof_authz_denied_total{route=\"/open\"}"),
            0.0
        );
        assert_eq!(
            metric(&m, "keyproof_authz_denied_total{route=\"default\"}"),
            0.0
        );
    }

    #[test]
    fn risk_routes_carry_their_rules_and_share_the_table_across_reloads() {
        use crate::config::{RiskAction, RiskCondition, RiskRuleConfig};
        use crate::inbound::risk::{Failure, Now, Verdict};
        let m = Metrics::new().unwrap();
        let table = RiskTable::new(100, &m).unwrap();
        let mut pay = route("/pay", &[], &[WEB]);
        pay.step_up = StepUpMode::Risk;
        pay.risk = vec!["lockout".into(), "new".into()];
        let cfg = PolicyConfig {
            routes: vec![route("/plain", &[], &[WEB]), pay],
            risk_rules: vec![
                RiskRuleConfig {
                    name: "new".into(),
                    condition: RiskCondition::NewPeer(std::time::Duration::from_secs(60)),
                    action: RiskAction::Challenge,
                },
                RiskRuleConfig {
                    name: "lockout".into(),
                    condition: RiskCondition::FailuresAbove {
                        count: 0,
                        window: std::time::Duration::from_secs(60),
                    },
                    action: RiskAction::Deny,
                },
            ],
            deny: vec![],
            tcp: vec![],
        };
        let p0 = Policy::new(&cfg, DefaultPolicy::Deny, &table, 0, &m).unwrap();
        assert!(p0.any_step_up());
        let web = id(WEB);
        let risk = |p: &Policy| match p.decide(&http::Method::GET, "/pay/x", &web, "1") {
            Decision::Allow(Some(r)) => {
                assert_eq!(r.step_up, StepUpMode::Risk);
                r.risk.as_ref().expect("compiled rules").evaluate(
                    &web,
                    &http::HeaderMap::new(),
                    Now(1000),
                )
            }
            other => panic!("{other:?}"),
        };
        match p0.decide(&http::Method::GET, "/plain", &web, "1") {
            Decision::Allow(Some(r)) => assert!(r.risk.is_none()),
            other => panic!("{other:?}"),
        }
        assert_eq!(risk(&p0), Verdict::Challenge("new".into()));
        table.record_failure(WEB, Failure::StepUp, Now(1000));
        assert_eq!(risk(&p0), Verdict::Deny("lockout".into()));
        // A reload keeps the lockout.
        let p1 = Policy::new(&cfg, DefaultPolicy::Deny, &table, 1, &m).unwrap();
        assert_eq!(risk(&p1), Verdict::Deny("lockout".into()));
        assert_eq!(
            crate::testing::metric(
                &m,
                "keyproof_risk_denied_total{route=\"/pay\",rule=\"lockout\"}"
            ),
            2.0
        );
    }

    #[test]
    fn a_reload_that_only_adds_a_deny_entry_keeps_every_callers_risk_state() {
        use crate::config::{RiskAction, RiskCondition, RiskRuleConfig};
        use crate::inbound::risk::{Now, Verdict};
        use std::time::Duration;
        let m = Metrics::new().unwrap();
        let table = RiskTable::new(100, &m).unwrap();
        let mut pay = route("/pay", &[], &[WEB, OPS]);
        pay.step_up = StepUpMode::Risk;
        pay.risk = vec!["new".into(), "burst".into()];
        let rules = vec![
            RiskRuleConfig {
                name: "new".into(),
                condition: RiskCondition::NewPeer(Duration::from_secs(3600)),
                action: RiskAction::Challenge,
            },
            RiskRuleConfig {
                name: "burst".into(),
                condition: RiskCondition::RateAbove {
                    count: 3,
                    window: Duration::from_secs(60),
                },
                action: RiskAction::Challenge,
            },
        ];
        let mut cfg = PolicyConfig {
            routes: vec![pay],
            risk_rules: rules.clone(),
            deny: vec![],
            tcp: vec![],
        };
        let web = id(WEB);
        let eval = |p: &Policy, t: u64| match p.decide(&http::Method::POST, "/pay", &web, "1") {
            Decision::Allow(Some(r)) => {
                r.risk
                    .as_ref()
                    .expect("rules")
                    .evaluate(&web, &http::HeaderMap::new(), Now(t))
            }
            other => panic!("{other:?}"),
        };
        let p0 = Policy::new(&cfg, DefaultPolicy::Deny, &table, 0, &m).unwrap();
        assert_eq!(eval(&p0, 1000), Verdict::Challenge("new".into()));
        match p0.decide(&http::Method::POST, "/pay", &web, "1") {
            Decision::Allow(Some(r)) => r.risk.as_ref().expect("rules").served(&web, Now(1000)),
            other => panic!("{other:?}"),
        }
        assert_eq!(eval(&p0, 1001), Verdict::Pass);
        // During an incident: a stolen identity is denied, nothing else
        // changes.
        cfg.deny = vec![DenyEntry::Id(IdPattern::parse(OPS).unwrap())];
        let p1 = Policy::new(&cfg, DefaultPolicy::Deny, &table, 1, &m).unwrap();
        assert!(matches!(
            p1.decide(&http::Method::POST, "/pay", &id(OPS), "1"),
            Decision::Deny(_)
        ));
        // Still served (not new), and the third request of the minute is
        // the third...
        assert_eq!(eval(&p1, 1002), Verdict::Pass);
        // ...and widening the route's allow list changes nothing either:
        // the fourth fires.
        cfg.routes[0]
            .allow
            .push(IdPattern::parse("spiffe://td/ns/new/*").unwrap());
        let p1 = Policy::new(&cfg, DefaultPolicy::Deny, &table, 1, &m).unwrap();
        assert_eq!(eval(&p1, 1003), Verdict::Challenge("burst".into()));
        // Changing the route's rules (a stricter rate) keeps what the
        // route knew of the caller: not new, and its requests still count.
        cfg.risk_rules[1].condition = RiskCondition::RateAbove {
            count: 2,
            window: Duration::from_secs(60),
        };
        let p2 = Policy::new(&cfg, DefaultPolicy::Deny, &table, 2, &m).unwrap();
        assert_eq!(eval(&p2, 1004), Verdict::Challenge("burst".into()));
        // So does moving it (another path prefix is another route).
        cfg.risk_rules = rules;
        cfg.routes[0].path_prefix = "/pay/v2".into();
        let p3 = Policy::new(&cfg, DefaultPolicy::Deny, &table, 3, &m).unwrap();
        match p3.decide(&http::Method::POST, "/pay/v2", &web, "1") {
            Decision::Allow(Some(r)) => assert_eq!(
                r.risk
                    .as_ref()
                    .expect("rules")
                    .evaluate(&web, &http::HeaderMap::new(), Now(1005)),
                Verdict::Challenge("new".into())
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(table.tracked(), 1);
    }

    #[test]
    fn a_serial_entry_for_zero_matches_only_zero() {
        let m = Metrics::new().unwrap();
        let p = deny_pol(
            &[],
            &[DenyEntry::Serial("0".into())],
            DefaultPolicy::AllowTrustDomain,
            &m,
        );
        for (serial, denied) in [("0", true), ("00", true), ("", false), ("10", false)] {
            let d = p.decide(&http::Method::GET, "/", &id(WEB), serial);
            assert_eq!(matches!(d, Decision::Deny(_)), denied, "{serial:?}");
        }
    }

    #[test]
    fn any_step_up_is_true_when_one_route_demands_it() {
        let m = Metrics::new().unwrap();
        let mut routes = vec![route("/a", &[], &[WEB]), route("/b", &[], &[WEB])];
        assert!(!pol(&routes, DefaultPolicy::Deny, &m).any_step_up());
        routes[1].step_up = StepUpMode::Always;
        let p = pol(&routes, DefaultPolicy::Deny, &m);
        assert!(p.any_step_up());
        match p.decide(&http::Method::GET, "/b", &id(WEB), "") {
            Decision::Allow(Some(r)) => assert_eq!(r.step_up, StepUpMode::Always),
            other => panic!("{other:?}"),
        }
    }
}
