//! Full mutual-TLS handshakes per second against any sidecar's inbound.
//!
//! Many concurrent rustls clients, each looping: TCP connect, a new full
//! TLS 1.3 handshake (no resumption) presenting the client certificate, then
//! close_notify and a read to EOF. The read matters: in TLS 1.3 the client
//! finishes before the server has checked its certificate, so waiting for
//! the server's close proves the server verified the client too (a refused
//! certificate shows up as an alert, counted as an error).
//!
//! ```text
//! cargo run --release -p keyproof-benches --bin handshake_load -- \
//!     --target 127.0.0.1:15443 --cert client.crt --key client.key --ca ca.crt \
//!     --concurrency 64 --seconds 10
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use keyproof_ca::{keys, SvidVerifier, TrustBundle, Usage};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(about = "full mutual-TLS handshakes per second against an inbound sidecar")]
struct Args {
    /// The inbound to load (IP:PORT).
    #[arg(long)]
    target: SocketAddr,
    /// Client certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Client private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Trust bundle used to verify the server (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Test length.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// SNI sent (server certificates are checked as SVIDs, not by name).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Client runtime threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Instead of the handshake loop: open this many connections
    /// (`--concurrency` handshakes at a time), keep them all open and silent
    /// for `--seconds`, and print `holding N connections` once they are up
    /// (for measuring the inbound's memory per idle connection).
    #[arg(long)]
    hold: Option<usize>,
}

/// Verifies the server as an X.509-SVID of the bundle's trust domain, the
/// same check every peer is held to; names are ignored so that one client
/// works against every sidecar.
#[derive(Debug)]
struct SvidServer {
    verifier: SvidVerifier,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SvidServer {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        inter: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier
            .verify(ee, inter, now, Usage::ServerAuth)
            .map(|_| ServerCertVerified::assertion())
            .map_err(|e| rustls::Error::General(e.to_string()))
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn client_config(a: &Args) -> anyhow::Result<rustls::ClientConfig> {
    let chain = keys::certs_from_pem(&std::fs::read(&a.cert).context("--cert")?)?;
    let key = keys::private_key_from_pem(&std::fs::read(&a.key).context("--key")?)?;
    let bundle = TrustBundle::from_pem(&std::fs::read(&a.ca).context("--ca")?)?;
    let td = keyproof_ca::svid::check_leaf_der(&chain[0])?.trust_domain();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(SvidServer {
        verifier: SvidVerifier::new(td, bundle),
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

async fn one(
    target: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    name: &ServerName<'static>,
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    tcp.set_nodelay(true)?;
    let mut s = tls.connect(name.clone(), tcp).await?;
    s.shutdown().await?;
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // Some servers (nginx) answer our close_notify by closing
            // without their own; the handshake was accepted all the same (a
            // refused certificate arrives as an alert, which is an error of
            // another kind).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Opens `n` mutual-TLS connections and holds them, idle, for `--seconds`.
async fn hold(
    a: &Args,
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    n: usize,
) -> anyhow::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..n {
        let slot = slots.clone().acquire_owned().await?;
        let (tls, name, target) = (tls.clone(), name.clone(), a.target);
        opening.spawn(async move {
            let tcp = tokio::net::TcpStream::connect(target).await?;
            let s = tls.connect(name, tcp).await?;
            drop(slot);
            anyhow::Ok(s)
        });
    }
    let (mut held, mut first_error) = (Vec::with_capacity(n), None);
    while let Some(r) = opening.join_next().await {
        match r? {
            Ok(s) => held.push(s),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    println!(
        "holding {} connections ({} failed)",
        held.len(),
        n - held.len()
    );
    if let Some(e) = first_error {
        eprintln!("first error: {e:#}");
    }
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    drop(held);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(&a)?));
    let name = ServerName::try_from(a.server_name.clone()).context("--server-name")?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = a.threads {
        rt.worker_threads(t);
    }
    let rt = rt.enable_all().build()?;
    if let Some(n) = a.hold {
        return rt.block_on(hold(&a, tls, name, n));
    }
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let lat = rt.block_on(async {
        let mut tasks = Vec::with_capacity(a.concurrency);
        for _ in 0..a.concurrency {
            let (tls, name, ok, errors, stop, first_error) = (
                tls.clone(),
                name.clone(),
                ok.clone(),
                errors.clone(),
                stop.clone(),
                first_error.clone(),
            );
            let target = a.target;
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match one(target, &tls, &name).await {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            lat.push(t.elapsed());
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut f) = first_error.lock() {
                                f.get_or_insert_with(|| format!("{e:#}"));
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                lat
            }));
        }
        tokio::time::sleep(Duration::from_secs(a.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = lat;
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let n = ok.load(Ordering::Relaxed);
    println!(
        "target {} concurrency {} seconds {:.1}: {} handshakes, {:.0} handshakes/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
        a.target,
        a.concurrency,
        elapsed,
        n,
        n as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        errors.load(Ordering::Relaxed)
    );
    if let Ok(Some(e)) = first_error.lock().map(|f| f.clone()) {
        eprintln!("first error: {e}");
    }
    Ok(())
}
