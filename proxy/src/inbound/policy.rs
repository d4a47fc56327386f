//! Inbound route policy: the first route whose path prefix and methods match
//! decides; its `allow` list must contain the caller.

use std::sync::Arc;

use keyproof_identity::{IdPattern, SpiffeId};
use prometheus::IntCounter;

use crate::config::{DefaultPolicy, RouteConfig};
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
    /// Whether each request needs a step-up proof.
    pub step_up: bool,
    denied: IntCounter,
}

/// The outcome for one request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// Forward; the matched route, if any.
    Allow(Option<&'a Arc<Route>>),
    /// Refuse with 403; the body says which rule.
    Deny(String),
}

/// The compiled policy.
#[derive(Debug)]
pub struct Policy {
    /// Shared, so that a request's future can own its route.
    routes: Vec<Arc<Route>>,
    default: DefaultPolicy,
    default_denied: IntCounter,
}

/// Segment-aware prefix match: `/admin` matches `/admin`, `/admin/x` and
/// `/admin?q`, never `/administrator` (a plain string prefix would let a
/// route's rule leak onto unrelated paths).
fn path_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

impl Policy {
    /// Compiles the configured routes.
    pub fn new(routes: &[RouteConfig], default: DefaultPolicy, metrics: &Metrics) -> Policy {
        Policy {
            routes: routes
                .iter()
                .map(|r| {
                    Arc::new(Route {
                        path_prefix: r.path_prefix.clone(),
                        methods: r.methods.clone(),
                        allow: r.allow.clone(),
                        step_up: r.step_up,
                        denied: metrics.authz_denied(&r.path_prefix),
                    })
                })
                .collect(),
            default,
            default_denied: metrics.authz_denied("default"),
        }
    }

    /// True when any route demands step-up (the exporter is then derived for
    /// every connection).
    pub fn any_step_up(&self) -> bool {
        self.routes.iter().any(|r| r.step_up)
    }

    /// Decides one request and counts a refusal.
    pub fn decide(&self, method: &http::Method, path: &str, peer: &SpiffeId) -> Decision<'_> {
        let hit = self.routes.iter().find(|r| {
            path_matches(&r.path_prefix, path)
                && (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
        });
        match hit {
            Some(r) if r.allow.iter().any(|p| p.matches(peer)) => Decision::Allow(Some(r)),
            Some(r) => {
                r.denied.inc();
                Decision::Deny(format!(
                    "forbidden: route {} does not allow {peer} to {method}\n",
                    r.path_prefix
                ))
            }
            None => match self.default {
                DefaultPolicy::AllowTrustDomain => Decision::Allow(None),
                DefaultPolicy::Deny => {
                    self.default_denied.inc();
                    Decision::Deny(format!(
                        "forbidden: no route matches {method} {path} and default_policy is deny\n"
                    ))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_segment_aware() {
        assert!(path_matches("/admin", "/admin"));
        assert!(path_matches("/admin", "/admin/users"));
        assert!(!path_matches("/admin", "/administrator"));
        assert!(path_matches("/", "/anything"));
        assert!(path_matches("/api/", "/api/x"));
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
                step_up: false,
            },
            RouteConfig {
                path_prefix: "/admin".into(),
                methods: vec![],
                allow: vec![web],
                step_up: false,
            },
        ];
        let p = Policy::new(&routes, DefaultPolicy::Deny, &m);
        let web_id = SpiffeId::parse("spiffe://td/ns/default/sa/web").unwrap();
        let ops_id = SpiffeId::parse("spiffe://td/ns/ops/sa/x").unwrap();
        assert!(matches!(
            p.decide(&http::Method::POST, "/admin/x", &web_id),
            Decision::Deny(_)
        ));
        assert!(matches!(
            p.decide(&http::Method::POST, "/admin/x", &ops_id),
            Decision::Allow(Some(_))
        ));
        assert!(matches!(
            p.decide(&http::Method::GET, "/admin", &web_id),
            Decision::Allow(Some(_))
        ));
        assert!(matches!(
            p.decide(&http::Method::GET, "/other", &web_id),
            Decision::Deny(_)
        ));
    }
}
