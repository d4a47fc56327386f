//! `keyproof-ca serve` as the end-to-end tests run it: the real binary on
//! free loopback ports, with its plain-HTTP admin listener, its log in a
//! file; and what the tests do with it: scrape `/metrics`, reach the API
//! with keyproof's CA client, and post CSRs to `/v1/bootstrap` with curl.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use keyproof_ca::client::{CaClient, ClientError};
use keyproof_identity::verify::{SvidVerifier, TrustBundle};
use keyproof_identity::{IdPattern, TrustDomain};

use crate::{cmd, free_port, wait_for_port, TestCa};

/// A running `keyproof-ca serve`, killed when dropped.
pub struct CaServer {
    child: Child,
    /// The API port (mutual TLS) on 127.0.0.1.
    pub port: u16,
    /// The plain-HTTP admin listener's port on 127.0.0.1.
    pub admin: u16,
    /// Where the server's stderr (its log) goes.
    pub log: PathBuf,
}

impl CaServer {
    /// `keyproof-ca serve` for `ca` (server certificate also for DNS
    /// `localhost`) on free ports, with `extra` arguments; returns once both
    /// listeners accept connections.
    pub fn start(ca: &TestCa, extra: &[&str]) -> CaServer {
        Self::start_on(ca, free_port(), extra)
    }

    /// [`CaServer::start`] with the API on `port`.
    pub fn start_on(ca: &TestCa, port: u16, extra: &[&str]) -> CaServer {
        Self::start_env(ca, port, extra, &[])
    }

    /// [`CaServer::start_on`] with extra environment variables for the
    /// child (e.g. `SOFTHSM2_CONF` for a CA whose keys are in a token).
    pub fn start_env(
        ca: &TestCa,
        port: u16,
        extra: &[&str],
        env: &[(&str, &std::path::Path)],
    ) -> CaServer {
        let admin = free_port();
        let log = ca.path(&format!("serve-{port}.log"));
        let child = cmd("keyproof-ca")
            .args(["serve", "--dns", "localhost", "--dir"])
            .arg(&ca.dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin}"))
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start keyproof-ca serve");
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(20));
        wait_for_port(([127, 0, 0, 1], admin).into(), Duration::from_secs(20));
        CaServer {
            child,
            port,
            admin,
            log,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin listener with curl: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{}{path}", self.admin))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (status.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// `/metrics` of the admin listener, which must answer 200.
    pub fn scrape(&self) -> String {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `series` (name and labels exactly as exported,
/// e.g. `keyproof_ca_refusals_total{code="invalid_token"}`) in a scrape.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// keyproof's CA client for the server of `ca` on `port`, trusting the
/// CA's bundle and expecting the server's default identity.
pub fn client(ca: &TestCa, port: u16) -> CaClient {
    let bundle = TrustBundle::from_pem(&fs::read(ca.bundle()).unwrap()).unwrap();
    let verifier = SvidVerifier::new(TrustDomain::parse(&ca.trust_domain).unwrap(), bundle);
    CaClient::new(
        &format!("https://127.0.0.1:{port}"),
        Arc::new(ArcSwap::from_pointee(verifier)),
        IdPattern::parse(&format!("spiffe://{}/keyproof-ca", ca.trust_domain)).unwrap(),
    )
    .unwrap()
}

/// A runtime for the client's calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The API's error code of a client call, or `ok`.
pub fn code(r: Result<impl Sized, ClientError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.code().map(str::to_owned).unwrap_or_else(|| e.to_string()),
    }
}

/// Posts `csr_pem` to `/v1/bootstrap{query}` with curl; `args` add headers
/// (the token) or pick the protocol. Returns (status, error code or `ok`,
/// response headers and body followed by curl's stderr).
pub fn curl_bootstrap(
    ca: &TestCa,
    port: u16,
    csr_pem: &str,
    args: &[&str],
    query: &str,
) -> (u16, String, String) {
    let csr = ca.path(&format!("curl-{}.csr", free_port()));
    fs::write(&csr, csr_pem).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "-i", "--cacert"])
        .arg(ca.bundle())
        .args(["-w", "\n%{http_code}"])
        .args(["-H", "Content-Type: application/pkcs10", "--data-binary"])
        .arg(format!("@{}", csr.display()))
        .args(args)
        .arg(format!("https://localhost:{port}/v1/bootstrap{query}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (response, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let code = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "ok".into());
    let status = status.trim().parse().unwrap_or(0);
    (
        status,
        code,
        format!("{response}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// A TLS connection to the API of the server of `ca` on `port` (verified
/// against the CA's bundle, as `localhost`), offering ALPN `alpn`, with the
/// client certificate (chain and key PEM files) if given.
pub async fn tls_connect(
    ca: &TestCa,
    port: u16,
    alpn: &[u8],
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca.bundle()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The HTTP/2 client preface and an empty SETTINGS frame: what a client
/// that then sends nothing more writes.
pub const H2_PREFACE: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Reads an HTTP/2 connection until the server closes it or `within`
/// passes: (closed, a GOAWAY frame arrived before the close).
pub async fn h2_until_closed<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    within: Duration,
) -> (bool, bool) {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut goaway = false;
    loop {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return (false, goaway),
            Ok(Ok(n)) => n,
            // A reset after the GOAWAY is a close too.
            Ok(Err(_)) => 0,
        };
        if n == 0 {
            return (true, goaway);
        }
        buf.extend_from_slice(&chunk[..n]);
        // Whole frames: 3 bytes of length, the type, flags, stream id.
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            goaway |= buf[3] == 0x7;
            buf.drain(..9 + len);
        }
    }
}
