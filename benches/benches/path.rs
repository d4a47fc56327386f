//! Path normalization cost per request (`keyproof_proxy::http::path`).
//!
//! `normal/*`: paths already in normal form, the common case: one byte scan,
//! no allocation. `abnormal/*`: paths that need rewriting (dot segments,
//! encodings, slashes) or are refused. `uri/normal`: the whole per-request
//! hook (`normalize_uri`) on an already-normal target with a query.
//!
//! `cargo bench -p keyproof-benches --bench path -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use keyproof_proxy::http::path::{normalize, normalize_uri, Mode};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("path");
    for (name, p) in [
        ("normal/short", "/admin"),
        ("normal/typical", "/api/v1/users/12345/orders"),
        (
            "normal/long_encoded",
            "/static/assets/%C3%A9t%C3%A9/2026/11/report-final_v2~draft.pdf",
        ),
    ] {
        g.bench_function(name, |b| b.iter(|| normalize(black_box(p), Mode::Strict)));
    }
    for (name, p) in [
        ("abnormal/dots", "/public/../admin/./x"),
        ("abnormal/encoded_dots", "/public/%2e%2e/admin"),
        ("abnormal/slashes", "//api//v1///users"),
        ("abnormal/lower_hex", "/static/%c3%a9t%c3%a9/x"),
        ("refused/encoded_slash", "/public/..%2fadmin"),
    ] {
        g.bench_function(name, |b| b.iter(|| normalize(black_box(p), Mode::Strict)));
    }
    let get = http::Method::GET;
    let uri: http::Uri = "/api/v1/users/12345/orders?page=2&sort=desc"
        .parse()
        .unwrap();
    g.bench_function("uri/normal", |b| {
        b.iter(|| normalize_uri(&get, black_box(&uri), Mode::Strict))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
