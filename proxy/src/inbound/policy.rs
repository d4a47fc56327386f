//! Inbound route policy: the first route whose path prefix and methods match
//! decides; its `allow` list must contain the caller.

use std::sync::Arc;

use keyproof_identity::{IdPattern, SpiffeId};
use prometheus::IntCounter;

use crate::config::{DefaultPolicy, PolicyConfig, StepUpMode};
use crate::inbound::risk::{RiskTable, RouteRisk};
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

/// Segment-aware prefix match: `/admin` matches `/admin` and `/admin/x`,
/// never `/administrator` (a plain string prefix would let a route's rule
/// leak onto unrelated paths). `path` is the normalized path without its
/// query.
fn path_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

impl Policy {
    /// Compiles a policy; `generation` changes with every load (risk state
    /// per route starts again with a new one).
    pub fn new(
        cfg: &PolicyConfig,
        default: DefaultPolicy,
        table: &Arc<RiskTable>,
        generation: u64,
        metrics: &Metrics,
    ) -> Result<Policy, prometheus::Error> {
        let mut routes = Vec::with_capacity(cfg.routes.len());
        for (i, r) in cfg.routes.iter().enumerate() {
            let risk = match r.step_up {
                StepUpMode::Risk => Some(RouteRisk::new(
                    table,
                    generation,
                    i,
                    &r.path_prefix,
                    &r.risk,
                    &cfg.risk_rules,
                    metrics,
                )?),
                _ => None,
            };
            routes.push(Arc::new(Route {
                path_prefix: r.path_prefix.clone(),
                methods: r.methods.clone(),
                allow: r.allow.clone(),
                step_up: r.step_up,
                risk,
                denied: metrics.authz_denied(&r.path_prefix),
            }));
        }
        Ok(Policy {
            routes,
            default,
            default_denied: metrics.authz_denied("default"),
        })
    }

    /// True when any route may demand step-up (the exporter is then derived
    /// for every connection).
    pub fn any_step_up(&self) -> bool {
        self.routes.iter().any(|r| r.step_up.any())
    }

    /// Decides one request and counts a refusal. `serial` is the caller's
    /// certificate serial (lowercase hex, no leading zeros), for the deny
    /// list.
    pub fn decide(
        &self,
        method: &http::Method,
        path: &str,
        peer: &SpiffeId,
        serial: &str,
    ) -> Decision<'_> {
        let _ = serial;
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
    use crate::config::RouteConfig;

    fn pol(routes: &[RouteConfig], default: DefaultPolicy, m: &Metrics) -> Policy {
        let cfg = PolicyConfig {
            routes: routes.to_vec(),
            ..PolicyConfig::default()
        };
        let table = RiskTable::new(100, m).unwrap();
        Policy::new(&cfg, default, &table, 0, m).unwrap()
    }

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
            Decision::Deny(_)
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
            Decision::Deny(_) => None,
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
        // Other names that merely start with the prefix are not under it.
        for path in [
            "/administrator",
            "/admin-panel",
            "/admin.json",
            "/Admin",
            "/",
        ] {
            assert_eq!(
                outcome(&p, http::Method::GET, path, WEB).as_deref(),
                Some(""),
                "{path}"
            );
        }
    }

    #[test]
    fn a_prefix_ending_in_a_slash_does_not_cover_the_path_without_it() {
        assert!(path_matches("/api/", "/api/"));
        assert!(path_matches("/api/", "/api/v1"));
        assert!(!path_matches("/api/", "/api"));
        assert!(!path_matches("/api/", "/apiv1"));
        assert!(path_matches("/", "/"));
    }

    #[test]
    fn the_query_is_not_part_of_the_matched_path() {
        // `decide` is given the path without its query (the inbound passes
        // `uri.path()`): a path that still carried one would not match.
        assert!(!path_matches("/admin", "/admin?q=1"));
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
            Decision::Deny(msg) => assert!(msg.contains("no route matches GET /admin"), "{msg}"),
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
            Decision::Deny(msg) => assert_eq!(
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
