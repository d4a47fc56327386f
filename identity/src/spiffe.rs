//! SPIFFE IDs and trust domains, per the SPIFFE ID specification.
//!
//! This is the one definition of a SPIFFE ID in keyproof: the CA uses it to
//! decide what it may issue and the proxy uses it to authorize peers.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the specification allows, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain name the specification allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {0} bytes long; the limit is 2048")]
    TooLong(usize),
    #[error("SPIFFE ID must start with the scheme \"spiffe://\"")]
    WrongScheme,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("trust domain is {0} bytes long; the limit is 255")]
    TrustDomainTooLong(usize),
    #[error("trust domain has a port; SPIFFE IDs have none")]
    Port,
    #[error("SPIFFE ID has userinfo (\"@\"); SPIFFE IDs have none")]
    UserInfo,
    #[error("SPIFFE ID has a query (\"?\"); SPIFFE IDs have none")]
    Query,
    #[error("SPIFFE ID has a fragment (\"#\"); SPIFFE IDs have none")]
    Fragment,
    #[error("SPIFFE ID uses percent-encoding, which is not allowed")]
    PercentEncoding,
    #[error(
        "trust domain has {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    BadTrustDomainChar(char),
    #[error("path has {0:?}; only letters, digits, '.', '-' and '_' are allowed in segments")]
    BadPathChar(char),
    #[error("path has an empty segment (\"//\")")]
    EmptySegment,
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("path ends with \"/\"")]
    TrailingSlash,
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            ':' => return Err(SpiffeIdError::Port),
            '@' => return Err(SpiffeIdError::UserInfo),
            '?' => return Err(SpiffeIdError::Query),
            '#' => return Err(SpiffeIdError::Fragment),
            '%' => return Err(SpiffeIdError::PercentEncoding),
            other => return Err(SpiffeIdError::BadTrustDomainChar(other)),
        }
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split element is empty and skipped.
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        if seg.is_empty() {
            return Err(if segments.peek().is_none() {
                SpiffeIdError::TrailingSlash
            } else {
                SpiffeIdError::EmptySegment
            });
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        for c in seg.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                '?' => return Err(SpiffeIdError::Query),
                '#' => return Err(SpiffeIdError::Fragment),
                '%' => return Err(SpiffeIdError::PercentEncoding),
                other => return Err(SpiffeIdError::BadPathChar(other)),
            }
        }
    }
    Ok(())
}

/// A validated trust domain name, such as `prod.example.com`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// The SPIFFE ID `keyproof-ca serve` presents unless configured otherwise,
/// and the one workloads expect of it: `spiffe://<trust domain>/keyproof-ca`.
pub fn ca_server_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/keyproof-ca")
}

/// Whether `id` is one the CA keeps for its own server: [`ca_server_id`]
/// of its trust domain and every ID below it. The CA never issues one to a
/// workload: a workload holding one would be taken for the CA by `renew`
/// and the sidecars, and be sent their CSRs and bootstrap credentials.
pub fn is_ca_server_id(id: &SpiffeId) -> bool {
    is_at_or_below(id.as_str(), &ca_server_id(id.trust_domain_name()))
}

/// Whether every ID `pattern` matches is one [`is_ca_server_id`] in trust
/// domain `td`: the only patterns a client may take the CA server by. Any
/// other would let a workload holding a matching ID pass for the CA, be
/// handed join tokens and ServiceAccount tokens, and say which roots to
/// trust.
pub fn names_only_ca_servers(pattern: &IdPattern, td: &str) -> bool {
    let own = ca_server_id(td);
    match pattern {
        IdPattern::Exact(id) => is_at_or_below(id.as_str(), &own),
        // Stored with its final `/`: below `own` when it starts with `own/`.
        IdPattern::Prefix(p) => p
            .strip_prefix(own.as_str())
            .is_some_and(|rest| rest.starts_with('/')),
    }
}

/// `id` is `base` or below it.
fn is_at_or_below(id: &str, base: &str) -> bool {
    id.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl TrustDomain {
    /// Parses a bare trust domain name (`prod.example.com`) or a trust domain
    /// written as a SPIFFE ID with no path (`spiffe://prod.example.com`).
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let td = s.strip_prefix(SCHEME).unwrap_or(s);
        check_trust_domain(td)?;
        Ok(TrustDomain(td.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A validated SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path starts (the end of the trust domain).
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let td_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (td, tail) = rest.split_at(td_end);
        check_trust_domain(td)?;
        match tail.as_bytes().first() {
            Some(b'?') => return Err(SpiffeIdError::Query),
            Some(b'#') => return Err(SpiffeIdError::Fragment),
            _ => {}
        }
        check_path(tail)?;
        Ok(SpiffeId {
            uri: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// Builds `spiffe://<td><path>`; `path` must start with `/`.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("{SCHEME}{}{path}", td.as_str()))
    }

    /// The trust domain name.
    pub fn trust_domain_name(&self) -> &str {
        &self.uri[SCHEME.len()..self.path_start]
    }

    /// The trust domain, as an owned value.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_owned())
    }

    /// The path, empty for a trust domain's own ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// True when this ID names a workload (has a non-empty path), as the
    /// X.509-SVID rules require of a leaf.
    pub fn is_workload(&self) -> bool {
        !self.path().is_empty()
    }

    /// True when this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A pattern over SPIFFE IDs as written in policy: an exact ID, or a prefix
/// ending in `/*` that matches IDs strictly below that path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdPattern {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID whose path continues below this one (the stored string ends in `/`).
    Prefix(String),
}

impl IdPattern {
    /// Parses `spiffe://td/path` or `spiffe://td/path/*`. A bare `spiffe://td/*`
    /// matches every workload of the trust domain.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        match s.strip_suffix("/*") {
            Some(base) => {
                // Validate the part before the wildcard as an ID of its own.
                let id = SpiffeId::parse(base)?;
                Ok(IdPattern::Prefix(format!("{}/", id.as_str())))
            }
            None => SpiffeId::parse(s).map(IdPattern::Exact),
        }
    }

    /// True when `id` matches.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdPattern::Exact(want) => want == id,
            IdPattern::Prefix(prefix) => id.as_str().starts_with(prefix.as_str()),
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdPattern::Exact(id) => write!(f, "{id}"),
            IdPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_ca_servers_own_ids_may_name_the_ca_server() {
        let p = |s: &str| IdPattern::parse(s).expect("pattern");
        for ok in [
            "spiffe://td/keyproof-ca",
            "spiffe://td/keyproof-ca/east",
            "spiffe://td/keyproof-ca/*",
            "spiffe://td/keyproof-ca/east/*",
        ] {
            assert!(names_only_ca_servers(&p(ok), "td"), "{ok}");
        }
        for bad in [
            "spiffe://td/*",
            "spiffe://td/ca/*",
            "spiffe://td/ca/prod",
            "spiffe://td/keyproof-cax",
            "spiffe://td/keyproof-ca-evil/*",
            "spiffe://other/keyproof-ca",
            "spiffe://other/keyproof-ca/*",
        ] {
            assert!(!names_only_ca_servers(&p(bad), "td"), "{bad}");
        }
        let id = |s: &str| SpiffeId::parse(s).expect("id");
        assert!(is_ca_server_id(&id("spiffe://td/keyproof-ca")));
        assert!(is_ca_server_id(&id("spiffe://td/keyproof-ca/x")));
        assert!(!is_ca_server_id(&id("spiffe://td/keyproof-cax")));
    }

    #[test]
    fn valid_ids() {
        for s in [
            "spiffe://example.org/ns/default/sa/web",
            "spiffe://example.org",
            "spiffe://a-b_c.9/x.y-z_W/A",
            "spiffe://example.org/..a/b..",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
        }
        let id = SpiffeId::parse("spiffe://example.org/ns/web").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/web");
        assert!(id.is_workload());
        assert!(!SpiffeId::parse("spiffe://example.org")
            .unwrap()
            .is_workload());
    }

    #[test]
    fn every_rule_has_a_negative_case() {
        use SpiffeIdError::*;
        let long = format!("spiffe://example.org/{}", "a".repeat(2048));
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        let cases: Vec<(&str, SpiffeIdError)> = vec![
            ("", Empty),
            (&long, TooLong(long.len())),
            ("https://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe:/example.org/a", WrongScheme),
            ("spiffe:///a", MissingTrustDomain),
            (&long_td, TrustDomainTooLong(256)),
            ("spiffe://example.org:8080/a", Port),
            ("spiffe://user@example.org/a", UserInfo),
            ("spiffe://example.org/a?x=1", Query),
            ("spiffe://example.org?x=1", Query),
            ("spiffe://example.org/a#frag", Fragment),
            ("spiffe://example.org#frag", Fragment),
            ("spiffe://example.org/a%20b", PercentEncoding),
            ("spiffe://exa%41mple.org/a", PercentEncoding),
            ("spiffe://Example.org/a", BadTrustDomainChar('E')),
            ("spiffe://exa mple.org/a", BadTrustDomainChar(' ')),
            ("spiffe://example.org/a b", BadPathChar(' ')),
            ("spiffe://example.org/a/ü", BadPathChar('ü')),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org//", EmptySegment),
            ("spiffe://example.org/a/./b", DotSegment),
            ("spiffe://example.org/a/..", DotSegment),
            ("spiffe://example.org/a/", TrailingSlash),
            ("spiffe://example.org/", TrailingSlash),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn trust_domains() {
        assert_eq!(
            TrustDomain::parse("prod.example.com").unwrap().as_str(),
            "prod.example.com"
        );
        assert_eq!(TrustDomain::parse("spiffe://td").unwrap().as_str(), "td");
        assert_eq!(
            TrustDomain::parse("Prod"),
            Err(SpiffeIdError::BadTrustDomainChar('P'))
        );
        assert_eq!(
            TrustDomain::parse(""),
            Err(SpiffeIdError::MissingTrustDomain)
        );
        assert_eq!(TrustDomain::parse("td:443"), Err(SpiffeIdError::Port));
        let id = SpiffeId::parse("spiffe://td/a").unwrap();
        assert!(id.is_member_of(&TrustDomain::parse("td").unwrap()));
        assert!(!id.is_member_of(&TrustDomain::parse("td2").unwrap()));
    }

    #[test]
    fn patterns() {
        let id = |s| SpiffeId::parse(s).unwrap();
        let p = IdPattern::parse("spiffe://td/ns/ops/*").unwrap();
        assert!(p.matches(&id("spiffe://td/ns/ops/sa/admin")));
        assert!(!p.matches(&id("spiffe://td/ns/ops")));
        assert!(!p.matches(&id("spiffe://td/ns/opsx/sa")));
        let all = IdPattern::parse("spiffe://td/*").unwrap();
        assert!(all.matches(&id("spiffe://td/x")));
        assert!(!all.matches(&id("spiffe://td2/x")));
        let exact = IdPattern::parse("spiffe://td/a").unwrap();
        assert!(exact.matches(&id("spiffe://td/a")));
        assert!(!exact.matches(&id("spiffe://td/a/b")));
        assert!(IdPattern::parse("spiffe://td/a*").is_err());
        assert_eq!(p.to_string(), "spiffe://td/ns/ops/*");
    }
}
