//! Which upstream rule takes a request or a redirected connection: pure
//! matching over the parsed rules, no I/O.
//!
//! Exact-host rules without a destination condition are found by hash;
//! every other rule is tried in file order, first match wins. A
//! placeholder captures exactly one DNS label (`[a-z0-9-]`, lowercased),
//! so whatever a client writes in its Host can never add `/`, `*` or
//! another path segment to the identity it fills.

use std::collections::HashMap;
use std::net::SocketAddr;

use keyproof_identity::IdPattern;

use crate::config::{HostLabel, HostPattern, IdentityTemplate, TemplatePart, UpstreamRule};

/// The labels a host pattern captured, by placeholder name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Captures(Vec<(String, String)>);

impl Captures {
    /// The label captured as `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether `label` is one DNS label a placeholder may capture: non-empty,
/// at most 63 bytes of `[a-z0-9-]` (already lowercased).
fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `host`'s last label is a number (`10.88.12034`, `0x0a.0x58.0x2f.0x02`,
/// octal `012`): an address in a form `inet_aton` reads, never a DNS name
/// (no top-level domain is numeric, RFC 3696 section 2).
fn numeric_last_label(host: &str) -> bool {
    let last = host
        .strip_suffix('.')
        .unwrap_or(host)
        .rsplit('.')
        .next()
        .unwrap_or("");
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    !last.is_empty() && (last.bytes().all(|b| b.is_ascii_digit()) || hex)
}

/// An IPv4 address in a form `inet_aton` and URL parsers read besides the
/// dotted quad (WHATWG URL, section 3.5): one to four parts, each decimal,
/// hex (`0x`) or octal (a leading `0`), the last filling the bytes left
/// (`10.88.15617`, `0x0a.0x58.0x3d.0x01`, `173555969`, `10.88.61.01`).
fn loose_ipv4(host: &str) -> Option<std::net::IpAddr> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(4);
    for p in &parts {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X"))
        {
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        let n = if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, radix).ok()?
        };
        nums.push(n);
    }
    let (last, first) = nums.split_last()?;
    if first.iter().any(|&n| n > 255) || *last >= 1u64 << (8 * (5 - nums.len())) {
        return None;
    }
    let mut v: u64 = *last;
    for (i, &n) in first.iter().enumerate() {
        v |= n << (8 * (3 - i));
    }
    u32::try_from(v)
        .ok()
        .map(|v| std::net::IpAddr::V4(std::net::Ipv4Addr::from(v)))
}

/// Matches `host` (any case; an IPv6 literal without brackets) against
/// `pattern`; the captures on a match.
pub fn match_host(pattern: &HostPattern, host: &str) -> Option<Captures> {
    match pattern {
        HostPattern::Any => Some(Captures::default()),
        HostPattern::Exact(h) => h.eq_ignore_ascii_case(host).then(Captures::default),
        HostPattern::Labels { any_prefix, labels } => {
            // An address is no DNS name: `10.1.2.3` has four "labels", and
            // `*.{namespace}` would take `3` for a namespace (round 12 mesh
            // F3). Addresses are for `cidr` rules and exact hosts.
            if host.parse::<std::net::IpAddr>().is_ok() || numeric_last_label(host) {
                return None;
            }
            let host = host.to_ascii_lowercase();
            let host = host.strip_suffix('.').unwrap_or(&host);
            let got: Vec<&str> = host.split('.').collect();
            let extra = got.len().checked_sub(labels.len())?;
            if (*any_prefix && extra == 0) || (!*any_prefix && extra != 0) {
                return None;
            }
            if *any_prefix && !got[..extra].iter().all(|l| !l.is_empty()) {
                return None;
            }
            let mut caps = Captures::default();
            for (want, got) in labels.iter().zip(&got[extra..]) {
                match want {
                    HostLabel::Literal(l) => {
                        if l != got {
                            return None;
                        }
                    }
                    HostLabel::Capture(name) => {
                        if !is_dns_label(got) {
                            return None;
                        }
                        caps.0.push((name.clone(), (*got).to_owned()));
                    }
                }
            }
            Some(caps)
        }
    }
}

/// Why an identity could not be filled in.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// A placeholder the host pattern did not capture (the configuration
    /// refuses such templates, so this is a bug).
    #[error("placeholder {{{0}}} was not captured")]
    Missing(String),
    /// The filled-in text is not a SPIFFE ID pattern.
    #[error("identity {text:?} is not a SPIFFE ID pattern: {msg}")]
    Invalid {
        /// The filled-in text.
        text: String,
        /// Why.
        msg: String,
    },
}

/// The identity `template` names for `caps`.
pub fn fill(template: &IdentityTemplate, caps: &Captures) -> Result<IdPattern, FillError> {
    if !template.has_placeholders() {
        return Ok(template.fixed.clone());
    }
    let mut text = String::with_capacity(template.text.len());
    for p in &template.parts {
        match p {
            TemplatePart::Literal(s) => text.push_str(s),
            TemplatePart::Placeholder(n) => {
                let v = caps.get(n).ok_or_else(|| FillError::Missing(n.clone()))?;
                // Labels are `[a-z0-9-]`: checked again here, as this is
                // what keeps a client's Host out of the pattern's syntax.
                if !is_dns_label(v) {
                    return Err(FillError::Missing(n.clone()));
                }
                text.push_str(v);
            }
        }
    }
    IdPattern::parse(&text).map_err(|e| FillError::Invalid {
        msg: e.to_string(),
        text,
    })
}

/// Whether the destination conditions of `rule` hold for `dst`.
pub fn dest_holds(rule: &UpstreamRule, dst: SocketAddr) -> bool {
    rule.port.is_none_or(|p| p == dst.port())
        && rule.cidr.is_none_or(|c| {
            let ip = match dst.ip() {
                std::net::IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
                v4 => v4,
            };
            c.contains(&ip)
        })
}

/// The upstream rules, ready to match.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<UpstreamRule>,
    exact: HashMap<String, usize>,
}

/// The rules a redirected connection may use: those whose destination
/// conditions hold for its original destination (indices, file order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates(Vec<usize>);

impl Candidates {
    /// No rule can take the destination: it is outside the mesh.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl RuleSet {
    /// Indexes `rules` (validated by the configuration).
    pub fn new(rules: Vec<UpstreamRule>) -> RuleSet {
        let mut exact = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            if let Some(h) = r.exact_host() {
                exact.entry(h.to_owned()).or_insert(i);
            }
        }
        RuleSet { rules, exact }
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[UpstreamRule] {
        &self.rules
    }

    /// The rule at `i`.
    pub fn get(&self, i: usize) -> &UpstreamRule {
        &self.rules[i]
    }

    fn exact(&self, host: &str) -> Option<usize> {
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.exact.get(&host.to_ascii_lowercase()).copied()
        } else {
            self.exact.get(host).copied()
        }
    }

    /// The rule an explicit (not redirected) request for `host` uses: an
    /// exact host first, then host patterns in file order. Rules with a
    /// destination condition never match, as there is no destination.
    pub fn explicit(&self, host: &str) -> Option<(usize, Captures)> {
        if let Some(i) = self.exact(host) {
            return Some((i, Captures::default()));
        }
        self.rules.iter().enumerate().find_map(|(i, r)| {
            if r.cidr.is_some() || r.port.is_some() || r.exact_host().is_some() {
                return None;
            }
            let caps = match_host(r.host.as_ref()?, host)?;
            Some((i, caps))
        })
    }

    /// The rules whose destination conditions hold for `dst` (a rule with
    /// only a host condition holds for every destination).
    pub fn candidates(&self, dst: SocketAddr) -> Candidates {
        Candidates(
            self.rules
                .iter()
                .enumerate()
                .filter(|(_, r)| dest_holds(r, dst))
                .map(|(i, _)| i)
                .collect(),
        )
    }

    /// Whether a rule names the destination itself (a `cidr` or `port`
    /// condition holds for it): then it is in the mesh, and traffic to it no
    /// rule takes is refused, never passed through in plain text. A rule
    /// with only a host condition says nothing about destinations.
    pub fn claims_destination(&self, c: &Candidates) -> bool {
        c.0.iter()
            .any(|&i| self.rules[i].cidr.is_some() || self.rules[i].port.is_some())
    }

    /// The rule opaque TCP to the destination uses: the first candidate
    /// without a host condition (TCP has no host to match).
    pub fn for_tcp(&self, c: &Candidates) -> Option<usize> {
        c.0.iter().copied().find(|&i| self.rules[i].host.is_none())
    }

    /// The rule an HTTP request with `host` on a redirected connection
    /// uses, among the connection's candidates: an exact host first, then
    /// in file order (a candidate without host condition takes any host).
    /// Whether `host` is in the mesh whatever the destination, so that a
    /// request naming it must not leave in plain text to an address no rule
    /// covers (an egress proxy, say): a name some rule's host pattern takes
    /// by a literal part of it (`*.{namespace}.svc.cluster.local`, an exact
    /// host), or an address inside some rule's `cidr`. A pattern of
    /// wildcards and placeholders alone (`*.{namespace}`) names no host by
    /// itself: its rule's `cidr` or `port` says where it holds, and outside
    /// them `www.example.com` is any other name.
    pub fn names_meshed_host(&self, host: &str) -> bool {
        let h = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Some(ip) = h.parse::<std::net::IpAddr>().ok().or_else(|| loose_ipv4(h)) {
            let ip = match ip {
                std::net::IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
                v4 => v4,
            };
            return self
                .rules
                .iter()
                .any(|r| r.cidr.is_some_and(|c| c.contains(&ip)));
        }
        self.rules.iter().any(|r| match &r.host {
            Some(p @ HostPattern::Exact(_)) => match_host(p, host).is_some(),
            Some(p @ HostPattern::Labels { labels, .. })
                if labels.iter().any(|l| matches!(l, HostLabel::Literal(_))) =>
            {
                match_host(p, host).is_some()
            }
            _ => false,
        })
    }

    /// Whether [`RuleSet::names_meshed_host`] can say yes for some host.
    pub fn has_host_names(&self) -> bool {
        self.rules.iter().any(|r| {
            r.cidr.is_some()
                || matches!(&r.host, Some(HostPattern::Exact(_)))
                || matches!(&r.host, Some(HostPattern::Labels { labels, .. })
                    if labels.iter().any(|l| matches!(l, HostLabel::Literal(_))))
        })
    }

    pub fn for_host(&self, c: &Candidates, host: Option<&str>) -> Option<(usize, Captures)> {
        if let Some(host) = host {
            let exact = c.0.iter().copied().find(|&i| {
                matches!(&self.rules[i].host, Some(HostPattern::Exact(h)) if h.eq_ignore_ascii_case(host))
            });
            if let Some(i) = exact {
                return Some((i, Captures::default()));
            }
        }
        c.0.iter()
            .copied()
            .find_map(|i| match (&self.rules[i].host, host) {
                (None, _) => Some((i, Captures::default())),
                (Some(HostPattern::Exact(_)), _) | (Some(_), None) => None,
                (Some(p), Some(h)) => match_host(p, h).map(|caps| (i, caps)),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::testing::config;

    fn rules(entries: &str) -> RuleSet {
        let cfg: Config = config(&format!("[outbound]\nlisten = \"127.0.0.1:0\"\n{entries}"));
        RuleSet::new(cfg.outbound.expect("outbound").upstreams)
    }

    fn rule(fields: &str) -> String {
        format!("[[outbound.upstreams]]\n{fields}\n")
    }

    const ID: &str = "identity = \"spiffe://unit.keyproof.test/ns/demo/sa/api\"";

    fn pat(p: &str) -> HostPattern {
        let set = rules(&rule(&format!("host = \"{p}\"\n{ID}")));
        set.get(0).host.clone().expect("host")
    }

    #[test]
    fn host_patterns_match_whole_labels_from_the_right() {
        let p = pat("*.{namespace}.svc.cluster.local");
        let caps = match_host(&p, "api.shop.svc.cluster.local").expect("match");
        assert_eq!(caps.get("namespace"), Some("shop"));
        let caps = match_host(&p, "API.Shop.SVC.cluster.local").expect("any case");
        assert_eq!(caps.get("namespace"), Some("shop"));
        assert!(match_host(&p, "a.b.shop.svc.cluster.local").is_some());
        for no in [
            "shop.svc.cluster.local",
            "api.shop.svc.cluster.local.evil",
            "api.shop.svc.cluster",
            ".shop.svc.cluster.local",
            "api..svc.cluster.local",
            "",
        ] {
            assert_eq!(match_host(&p, no), None, "{no:?}");
        }
        let suffix = pat("*.example.com");
        assert!(match_host(&suffix, "a.example.com").is_some());
        assert!(match_host(&suffix, "a.b.example.com").is_some());
        assert!(match_host(&suffix, "example.com").is_none());
        assert!(match_host(&suffix, "aexample.com").is_none());
        let anchored = pat("{svc}.demo");
        assert!(match_host(&anchored, "api.demo").is_some());
        assert!(match_host(&anchored, "x.api.demo").is_none());
        assert!(match_host(&pat("*"), "anything").is_some());
        assert!(match_host(&pat("Api.Demo"), "API.demo").is_some());
        // Round 12 mesh F3: an address is no DNS name, whatever its dots.
        for addr in ["10.1.2.3", "10.0.0.7", "::1", "fd00::7"] {
            assert_eq!(match_host(&pat("*.{namespace}"), addr), None, "{addr}");
            assert_eq!(match_host(&pat("*.{a}.{b}.{c}"), addr), None, "{addr}");
        }
        assert!(match_host(&pat("*"), "10.1.2.3").is_some());
        // Nor is an address in inet_aton's other forms (verification V7).
        for addr in ["10.88.12034", "0x0a.0x58.0x2f.0x02", "a.012"] {
            assert_eq!(match_host(&pat("*.{namespace}"), addr), None, "{addr}");
        }
    }

    #[test]
    fn a_meshed_host_is_named_by_a_literal_part_of_a_pattern_or_a_cidr() {
        let set = rules(&format!(
            "{}{}{}",
            rule("host = \"*.{ns}.svc.cluster.local\"\ncidr = \"10.96.0.0/12\"\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/*\""),
            rule("host = \"*.{ns}\"\ncidr = \"10.96.0.0/12\"\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/*\""),
            rule(&format!("host = \"db.internal\"\nport = 5432\n{ID}")),
        ));
        assert!(set.has_host_names());
        for yes in [
            "api.db.svc.cluster.local",
            "db.internal",
            "10.96.0.5",
            "::ffff:10.96.0.5",
            // Second verification VM1: inet_aton's other forms.
            "0x0a.0x60.0x00.0x05",
            "10.96.5",
            "10.6291461",
            "174063621",
            "10.96.0.05",
        ] {
            assert!(set.names_meshed_host(yes), "{yes}");
        }
        for no in [
            "www.example.com",
            "api.db",
            "10.0.0.1",
            "example.internal",
            "1.2.3.4.5",
            "0x1g",
        ] {
            assert!(!set.names_meshed_host(no), "{no}");
        }
        let broad = rules(&rule(
            "host = \"*.{ns}\"\nport = 80\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/*\"",
        ));
        assert!(!broad.has_host_names() && !broad.names_meshed_host("api.db"));
    }

    #[test]
    fn a_capture_is_one_dns_label_so_a_host_cannot_inject_into_the_identity() {
        let p = pat("{ns}.svc");
        for evil in [
            "a/b.svc",
            "*.svc",
            "a*.svc",
            "a_b.svc",
            "a%2f.svc",
            "a:b.svc",
            "{x}.svc",
            "\u{e9}.svc",
        ] {
            assert_eq!(match_host(&p, evil), None, "{evil:?}");
        }
        let long = format!("{}.svc", "a".repeat(64));
        assert_eq!(match_host(&p, &long), None);
        let set = rules(&rule(
            "host = \"{ns}.svc\"\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/*\"",
        ));
        let caps = match_host(set.get(0).host.as_ref().unwrap(), "Shop-2.svc").unwrap();
        let id = fill(&set.get(0).identity, &caps).expect("filled");
        assert_eq!(id.to_string(), "spiffe://unit.keyproof.test/ns/shop-2/sa/*");
        // A capture that somehow holds more than a label is refused.
        let bad = Captures(vec![("ns".into(), "a/b".into())]);
        assert!(fill(&set.get(0).identity, &bad).is_err());
        assert!(fill(&set.get(0).identity, &Captures::default()).is_err());
    }

    #[test]
    fn explicit_requests_use_exact_hosts_first_then_patterns_in_order() {
        let set = rules(
            &[
                rule(&format!(
                    "host = \"*.demo\"\naddress = \"127.0.0.1:1\"\n{ID}"
                )),
                rule(&format!(
                    "host = \"api.demo\"\naddress = \"127.0.0.1:2\"\n{ID}"
                )),
                rule(&format!("host = \"*\"\naddress = \"127.0.0.1:3\"\n{ID}")),
                rule(&format!("host = \"db.other\"\nport = 5432\n{ID}")),
                rule(&format!("cidr = \"10.0.0.0/8\"\n{ID}")),
            ]
            .concat(),
        );
        assert_eq!(set.explicit("API.demo").map(|m| m.0), Some(1));
        assert_eq!(set.explicit("web.demo").map(|m| m.0), Some(0));
        assert_eq!(set.explicit("other").map(|m| m.0), Some(2));
        // A rule with a destination condition never takes an explicit request.
        assert_eq!(set.explicit("db.other").map(|m| m.0), Some(2));
        let no_star = rules(&rule(&format!("host = \"db\"\nport = 5432\n{ID}")));
        assert_eq!(no_star.explicit("db"), None);
    }

    #[test]
    fn redirected_destinations_pick_candidates_by_cidr_and_port() {
        let set = rules(
            &[
                rule(&format!("cidr = \"10.1.0.0/16\"\nport = 5432\n{ID}")),
                rule(&format!(
                    "host = \"*.{{ns}}.svc\"\ncidr = \"10.0.0.0/8\"\n{ID}"
                )),
                rule(&format!("cidr = \"10.0.0.0/8\"\n{ID}")),
                rule(&format!("host = \"api.demo\"\n{ID}")),
            ]
            .concat(),
        );
        let d = |s: &str| s.parse::<SocketAddr>().unwrap();
        let c = set.candidates(d("10.1.2.3:5432"));
        assert_eq!(c, Candidates(vec![0, 1, 2, 3]));
        assert_eq!(set.for_tcp(&c), Some(0));
        let c = set.candidates(d("10.2.0.1:80"));
        assert_eq!(c, Candidates(vec![1, 2, 3]));
        assert_eq!(set.for_tcp(&c), Some(2));
        // HTTP: exact host first, then file order; no host condition takes any.
        assert_eq!(set.for_host(&c, Some("api.demo")).map(|m| m.0), Some(3));
        let (i, caps) = set.for_host(&c, Some("web.shop.svc")).unwrap();
        assert_eq!((i, caps.get("ns")), (1, Some("shop")));
        assert_eq!(set.for_host(&c, Some("example.com")).map(|m| m.0), Some(2));
        assert_eq!(set.for_host(&c, None).map(|m| m.0), Some(2));
        // Outside every CIDR: only the host-only rule is a candidate.
        let c = set.candidates(d("192.168.1.1:80"));
        assert_eq!(c, Candidates(vec![3]));
        assert_eq!(set.for_tcp(&c), None);
        assert_eq!(set.for_host(&c, Some("example.com")), None);
        assert_eq!(set.for_host(&c, Some("API.DEMO")).map(|m| m.0), Some(3));
        // IPv4-mapped IPv6 destinations match IPv4 CIDRs.
        assert!(!set.candidates(d("[::ffff:10.0.0.1]:5432")).is_empty());
        let none = rules(&rule(&format!("cidr = \"10.0.0.0/8\"\n{ID}")));
        assert!(none.candidates(d("11.0.0.1:80")).is_empty());
    }

    #[test]
    fn a_port_rule_holds_only_for_its_port() {
        let set = rules(&rule(&format!("port = 6379\n{ID}")));
        let d = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(set.for_tcp(&set.candidates(d("1.2.3.4:6379"))), Some(0));
        assert!(set.candidates(d("1.2.3.4:6380")).is_empty());
    }
}
