//! Risk rule evaluation per request on a `step_up = "risk"` route
//! (`keyproof_proxy::inbound::risk::RouteRisk::evaluate`), with every kind
//! of rule listed on the route.
//!
//! `tracked/10000`: 10,000 caller identities already tracked (served, a
//! tenth of them with a recent refusal), requests rotating through them:
//! the steady state of a busy route. `tracked/100000`: the same with ten
//! times as many. `churn/10000`: every request from an identity the full
//! table has not seen, so each one forgets another (admission and
//! eviction). `stateless`: only `header` and `hours` rules (no table).
//!
//! `cargo bench -p keyproof-benches --bench risk -- --warm-up-time 1 --measurement-time 3`

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use keyproof_identity::SpiffeId;
use keyproof_proxy::config::{
    HeaderTest, RiskAction, RiskCondition, RiskRuleConfig, RouteConfig, StepUpMode,
};
use keyproof_proxy::inbound::risk::{Failure, Now, RiskTable, RouteRisk};
use keyproof_proxy::metrics::Metrics;

/// 2026-01-01T12:00:00Z: outside the night window.
const T0: u64 = 1_767_268_800_000;

fn rules() -> Vec<RiskRuleConfig> {
    let rule = |name: &str, condition, action| RiskRuleConfig {
        name: name.into(),
        condition,
        action,
    };
    let h = |n: &str| HeaderName::from_bytes(n.as_bytes()).expect("name");
    let secs = Duration::from_secs;
    use RiskAction::{Challenge, Deny};
    vec![
        rule(
            "lockout",
            RiskCondition::FailuresAbove {
                count: 5,
                window: secs(900),
            },
            Deny,
        ),
        rule(
            "new-caller",
            RiskCondition::NewPeer(secs(86_400)),
            Challenge,
        ),
        rule(
            "burst",
            RiskCondition::RateAbove {
                count: 30,
                window: secs(60),
            },
            Challenge,
        ),
        rule(
            "big-transfer",
            RiskCondition::Header {
                name: h("x-amount"),
                test: HeaderTest::Above(10_000.0),
            },
            Challenge,
        ),
        rule(
            "wire",
            RiskCondition::Header {
                name: h("x-kind"),
                test: HeaderTest::OneOf(vec!["wire".into(), "crypto".into()]),
            },
            Challenge,
        ),
        rule(
            "test",
            RiskCondition::Header {
                name: h("x-test"),
                test: HeaderTest::Equals("1".into()),
            },
            Challenge,
        ),
        rule(
            "debug",
            RiskCondition::Header {
                name: h("x-debug"),
                test: HeaderTest::Present,
            },
            Challenge,
        ),
        rule(
            "after-refusal",
            RiskCondition::AfterFailure(secs(900)),
            Challenge,
        ),
        rule(
            "night",
            RiskCondition::Hours {
                start: 22 * 60,
                end: 6 * 60,
            },
            Challenge,
        ),
    ]
}

fn route(table: &Arc<RiskTable>, names: &[&str]) -> RouteRisk {
    let cfg = RouteConfig {
        path_prefix: "/payments".into(),
        methods: Vec::new(),
        allow: Vec::new(),
        step_up: StepUpMode::Risk,
        risk: names.iter().map(|n| n.to_string()).collect(),
    };
    let r = RouteRisk::new(table, &cfg, &rules());
    table.apply([&r]);
    r
}

fn ids(n: usize, tag: &str) -> Vec<SpiffeId> {
    (0..n)
        .map(|i| {
            SpiffeId::parse(&format!(
                "spiffe://prod.example.com/ns/shop-{tag}/sa/client-{i}"
            ))
            .expect("id")
        })
        .collect()
}

fn request() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("content-type", "application/json"),
        ("x-amount", "1250.00"),
        ("x-kind", "card"),
        ("x-request-id", "0b7e2c1e-5f0e-4d4e-9f5c-3d2b1a0f9e8d"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

const ALL: [&str; 9] = [
    "lockout",
    "new-caller",
    "burst",
    "big-transfer",
    "wire",
    "test",
    "debug",
    "after-refusal",
    "night",
];

/// A table of `n` tracked identities, each served on the route, a tenth
/// with a refusal a minute ago.
fn populated(n: usize) -> (Metrics, Arc<RiskTable>, RouteRisk, Vec<SpiffeId>) {
    let m = Metrics::new().expect("metrics");
    let table = RiskTable::new(n, &m).expect("table");
    let r = route(&table, &ALL);
    let ids = ids(n, "a");
    let headers = request();
    for (i, id) in ids.iter().enumerate() {
        let _ = r.evaluate(id, &headers, Now(T0 - 120_000));
        r.served(id, Now(T0 - 120_000));
        if i % 10 == 0 {
            table.record_failure(id.as_str(), Failure::StepUp, Now(T0 - 60_000));
        }
    }
    assert_eq!(table.tracked(), n);
    (m, table, r, ids)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("risk");
    let headers = request();
    for n in [10_000, 100_000] {
        let (_m, table, r, ids) = populated(n);
        let (i, t) = (Cell::new(0usize), Cell::new(T0));
        g.bench_function(format!("tracked/{n}"), |b| {
            b.iter(|| {
                let k = (i.get() + 1) % ids.len();
                i.set(k);
                // A millisecond per request: each caller well under its rate.
                t.set(t.get() + 1);
                black_box(r.evaluate(&ids[k], black_box(&headers), Now(t.get())))
            })
        });
        assert_eq!(table.tracked(), n, "nothing forgotten in the steady state");
    }
    {
        let (_m, table, r, _) = populated(10_000);
        let strangers = ids(50_000, "b");
        let (i, t) = (Cell::new(0usize), Cell::new(T0));
        g.bench_function("churn/10000", |b| {
            b.iter(|| {
                let k = (i.get() + 1) % strangers.len();
                i.set(k);
                t.set(t.get() + 1);
                black_box(r.evaluate(&strangers[k], black_box(&headers), Now(t.get())))
            })
        });
        assert_eq!(table.tracked(), 10_000);
    }
    {
        let m = Metrics::new().expect("metrics");
        let table = RiskTable::new(10_000, &m).expect("table");
        let r = route(&table, &["big-transfer", "wire", "test", "debug", "night"]);
        let id = &ids(1, "c")[0];
        g.bench_function("stateless", |b| {
            b.iter(|| black_box(r.evaluate(id, black_box(&headers), Now(T0))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
