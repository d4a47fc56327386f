//! Renewal load against a running `keyproof-ca serve`: N concurrent workers,
//! each authenticated with its own SVID, renew as fast as they can for a
//! fixed time, over kept-alive connections or a new mutual-TLS connection per
//! renewal. Prints renewals per second and the error count.
//!
//! ```text
//! keyproof-ca init --dir /tmp/bca --trust-domain bench.local
//! keyproof-ca serve --dir /tmp/bca --listen 127.0.0.1:8443 --rate-limit 0 &
//! renew-load --dir /tmp/bca --addr 127.0.0.1:8443 --seconds 10 [--new-connection]
//! ```
//!
//! `--addr` may be repeated (several replicas of one CA, e.g. on
//! PostgreSQL): worker `i` renews at address `i mod N`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use clap::Parser;
use keyproof_ca::client::{certified_key, new_key, CaClient};
use keyproof_ca::csr::SubjectKey;
use keyproof_ca::issue::IssueRequest;
use keyproof_ca::Ca;
use keyproof_identity::verify::{SvidVerifier, TrustBundle};
use keyproof_identity::{IdPattern, SpiffeId};
use rustls::sign::CertifiedKey;

#[derive(Parser)]
#[command(
    name = "renew-load",
    about = "Renewals per second through keyproof-ca serve"
)]
struct Args {
    /// The CA directory the server uses (the tool issues its client SVIDs from it).
    #[arg(long)]
    dir: std::path::PathBuf,
    /// Server address; repeat it for several replicas (workers are spread
    /// over them round-robin).
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: Vec<String>,
    /// Concurrent workers.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How long to run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A new mutual-TLS connection for every renewal.
    #[arg(long)]
    new_connection: bool,
    /// Runtime worker threads for the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let ca = Ca::open(&args.dir)?;
    let bundle = TrustBundle::new(ca.bundle().to_vec())?;
    let verifier = Arc::new(ArcSwap::from_pointee(SvidVerifier::new(
        ca.trust_domain().clone(),
        bundle,
    )));
    let server_id = IdPattern::parse(&format!("{}/*", ca.trust_domain().id_string()))?;
    let clients = args
        .addr
        .iter()
        .map(|a| CaClient::new(&format!("https://{a}"), verifier.clone(), server_id.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for i in 0..args.concurrency {
        // Each worker has its own identity and one CSR, for a key made once
        // (all renewals certify it): the server's work (verify the CSR,
        // sign, log) is what is measured, not the client's key generation.
        let id = SpiffeId::parse(&format!(
            "{}/bench/worker-{i}",
            ca.trust_domain().id_string()
        ))?;
        let kp = ca.key_type().generate()?;
        let issued = ca.sign(
            &IssueRequest {
                spiffe_id: id.clone(),
                key: SubjectKey::from_key_pair(&kp, ca.key_type()),
                ttl: Duration::from_secs(3600),
                dns: Vec::new(),
            },
            "renew-load",
        )?;
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(kp.serialize_der())
            .map_err(anyhow::Error::msg)?;
        let identity = Arc::new(certified_key(
            vec![issued.leaf, issued.intermediate],
            &key_der,
        )?);
        let next = new_key(ca.key_type(), id.as_str())?;
        let csr = next.csr_pem;
        let next_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&next.key_der)
            .map_err(anyhow::Error::msg)?;
        let client = clients[i % clients.len()].clone();
        let (done, failed) = (done.clone(), failed.clone());
        let new_connection = args.new_connection;
        tasks.push(tokio::spawn(async move {
            let mut identity = identity;
            let mut session = None;
            while Instant::now() < deadline {
                if session.is_none() || new_connection {
                    match client.connect(Some(identity.clone())).await {
                        Ok(s) => session = Some(s),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("connect: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                }
                let Some(s) = session.as_mut() else { continue };
                match s.renew(&csr).await {
                    Ok(issued) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        // Like a real renewer, the next connection presents
                        // the certificate just issued: the server never sees
                        // the same leaf twice, so its signature cache can
                        // only save the (shared) intermediate's verification.
                        if new_connection {
                            let ck = CertifiedKey::new(issued.chain, next_key.clone());
                            match ck.keys_match() {
                                Ok(()) => identity = Arc::new(ck),
                                Err(e) => eprintln!("renewed certificate: {e}"),
                            }
                        }
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("renew: {e}");
                        session = None;
                    }
                }
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        t.await.context("worker")?;
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = done.load(Ordering::Relaxed);
    println!(
        "mode={} replicas={} concurrency={} seconds={secs:.1} renewals={ok} errors={} renewals_per_sec={:.0}",
        if args.new_connection {
            "new-connection"
        } else {
            "keep-alive"
        },
        args.addr.len(),
        args.concurrency,
        failed.load(Ordering::Relaxed),
        ok as f64 / secs
    );
    Ok(())
}
