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
//!
//! `--group x25519mlkem768 --group x25519 --rounds 3` compares key-exchange
//! groups in one run: each round loads the target for `--seconds` with a
//! client offering only the first group, then only the second (so each
//! handshake negotiates it without a retry), alternating so that drift in
//! the machine's load falls on both; it also prints each group's
//! ClientHello size. Without `--group` the client offers rustls' defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use keyproof_identity::{keys, SvidVerifier, TrustBundle, Usage};
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
    /// Key-exchange group offered (x25519mlkem768, x25519, secp256r1),
    /// alone; repeat to compare groups round by round.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Rounds of `--seconds` per group, alternating groups.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

fn kx_group(name: &str) -> anyhow::Result<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::aws_lc_rs::kx_group;
    Ok(match name {
        "x25519mlkem768" => kx_group::X25519MLKEM768,
        "x25519" => kx_group::X25519,
        "secp256r1" => kx_group::SECP256R1,
        "secp384r1" => kx_group::SECP384R1,
        other => {
            anyhow::bail!("--group {other}: use x25519mlkem768, x25519, secp256r1 or secp384r1")
        }
    })
}

/// The size of the ClientHello record `tls` sends, captured on a loopback
/// listener that answers nothing.
async fn client_hello_size(
    tls: &tokio_rustls::TlsConnector,
    name: &ServerName<'static>,
) -> anyhow::Result<usize> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let at = l.local_addr()?;
    let (tls, name) = (tls.clone(), name.clone());
    let client = tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(at).await?;
        let _ = tls.connect(name, tcp).await;
        anyhow::Ok(())
    });
    let (mut s, _) = l.accept().await?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).await?;
    let len = u16::from_be_bytes([head[3], head[4]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    drop(s);
    let _ = client.await;
    Ok(5 + len)
}

/// Handshakes done, their latencies and the errors of one load period.
struct Period {
    ok: u64,
    errors: u64,
    seconds: f64,
    lat: Vec<Duration>,
    first_error: Option<String>,
}

/// `--concurrency` clients doing full handshakes for `seconds`.
async fn load(
    target: SocketAddr,
    concurrency: usize,
    seconds: u64,
    tls: &tokio_rustls::TlsConnector,
    name: &ServerName<'static>,
) -> Period {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (tls, name, ok, errors, stop, first_error) = (
            tls.clone(),
            name.clone(),
            ok.clone(),
            errors.clone(),
            stop.clone(),
            first_error.clone(),
        );
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
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap_or_default());
    }
    let first_error = first_error.lock().ok().and_then(|f| f.clone());
    Period {
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        seconds: start.elapsed().as_secs_f64(),
        lat,
        first_error,
    }
}

fn report(label: &str, a: &Args, mut p: Period) {
    p.lat.sort();
    let lat = &p.lat;
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "{label}target {} concurrency {} seconds {:.1}: {} handshakes, {:.0} handshakes/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
        a.target,
        a.concurrency,
        p.seconds,
        p.ok,
        p.ok as f64 / p.seconds,
        pct(0.50),
        pct(0.99),
        p.errors
    );
    if let Some(e) = p.first_error {
        eprintln!("first error: {e}");
    }
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

fn client_config(
    a: &Args,
    group: Option<&'static dyn rustls::crypto::SupportedKxGroup>,
) -> anyhow::Result<rustls::ClientConfig> {
    let chain = keys::certs_from_pem(&std::fs::read(&a.cert).context("--cert")?)?;
    let key = keys::private_key_from_pem(&std::fs::read(&a.key).context("--key")?)?;
    let bundle = TrustBundle::from_pem(&std::fs::read(&a.ca).context("--ca")?)?;
    let td = keyproof_identity::svid::check_leaf_der(&chain[0])?.trust_domain();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(g) = group {
        provider.kx_groups = vec![g];
    }
    let provider = Arc::new(provider);
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
    let name = ServerName::try_from(a.server_name.clone()).context("--server-name")?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = a.threads {
        rt.worker_threads(t);
    }
    let rt = rt.enable_all().build()?;
    if a.groups.is_empty() {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(&a, None)?));
        if let Some(n) = a.hold {
            return rt.block_on(hold(&a, tls, name, n));
        }
        let p = rt.block_on(load(a.target, a.concurrency, a.seconds, &tls, &name));
        report("", &a, p);
        return Ok(());
    }
    let mut runs = Vec::with_capacity(a.groups.len());
    for g in &a.groups {
        let tls =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(&a, Some(kx_group(g)?))?));
        let hello = rt.block_on(client_hello_size(&tls, &name))?;
        println!("group {g}: ClientHello {hello} bytes");
        runs.push((g.clone(), tls, Vec::new()));
    }
    for round in 1..=a.rounds.max(1) {
        for (g, tls, periods) in runs.iter_mut() {
            let p = rt.block_on(load(a.target, a.concurrency, a.seconds, tls, &name));
            println!(
                "round {round} group {g}: {:.0} handshakes/s, errors {}",
                p.ok as f64 / p.seconds,
                p.errors
            );
            periods.push(p);
        }
    }
    for (g, _, periods) in runs {
        let mut total = Period {
            ok: 0,
            errors: 0,
            seconds: 0.0,
            lat: Vec::new(),
            first_error: None,
        };
        for p in periods {
            total.ok += p.ok;
            total.errors += p.errors;
            total.seconds += p.seconds;
            total.lat.extend(p.lat);
            total.first_error = total.first_error.or(p.first_error);
        }
        report(&format!("group {g} (all rounds): "), &a, total);
    }
    Ok(())
}
