//! Issuing an X.509-SVID from a CSR with ECDSA P-256: parse the PEM, verify
//! the CSR's self-signature, check the request, sign, and PEM-encode the
//! chain. The ledger append (an fsync) is left out: it measures the disk,
//! not the CA.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keyproof_ca::ca::InitOptions;
use keyproof_ca::issue::IssueRequest;
use keyproof_ca::{csr, Ca};
use keyproof_identity::keys::KeyType;
use keyproof_identity::{SpiffeId, TrustDomain};

fn issue_from_csr(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(
        &tmp.path().join("ca"),
        &InitOptions {
            trust_domain: TrustDomain::parse("bench.local").expect("td"),
            key_type: KeyType::EcdsaP256,
            root_ttl: Duration::from_secs(3600 * 24 * 365),
            intermediate_ttl: Duration::from_secs(3600 * 24 * 30),
        },
    )
    .expect("init");
    let key = KeyType::EcdsaP256.generate().expect("key");
    let id = "spiffe://bench.local/ns/default/sa/web";
    let pem = csr::build_pem(&key, id).expect("csr");
    let spiffe_id = SpiffeId::parse(id).expect("id");

    let mut g = c.benchmark_group("issue");
    g.throughput(Throughput::Elements(1));
    g.bench_function("from_csr_ecdsa_p256", |b| {
        b.iter(|| {
            let der = csr::decode(pem.as_bytes()).expect("decode");
            let key = csr::verify(&der).expect("verify");
            let req = IssueRequest {
                spiffe_id: spiffe_id.clone(),
                key,
                ttl: Duration::from_secs(3600),
                dns: Vec::new(),
            };
            let issued = ca.sign(&req, "bench").expect("sign");
            std::hint::black_box(issued.chain_pem())
        })
    });
    g.finish();
}

criterion_group!(benches, issue_from_csr);
criterion_main!(benches);
