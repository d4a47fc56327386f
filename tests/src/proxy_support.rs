//! Helpers for the `keyproof-proxy` end-to-end tests: a throwaway trust
//! domain made with the `keyproof-ca` library (plus hand-crafted bad
//! certificates), an echo app, and the real proxy binary as a child process.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keyproof_ca::ca::InitOptions;
use keyproof_ca::csr::SubjectKey;
use keyproof_ca::issue::IssueRequest;
use keyproof_ca::Ca;
use keyproof_identity::keys::{self, KeyType};
use keyproof_identity::{SpiffeId, TrustDomain};

/// A throwaway trust domain in a temp dir.
pub struct Pki {
    /// Keeps the directory alive.
    pub tmp: tempfile::TempDir,
    /// The CA.
    pub ca: Ca,
    /// Trust domain name.
    pub td: String,
    /// `bundle.pem` written for the proxy.
    pub bundle: PathBuf,
}

/// A certificate chain and key on disk.
#[derive(Clone, Debug)]
pub struct Cert {
    /// PEM chain (leaf, intermediate).
    pub crt: PathBuf,
    /// PEM PKCS#8 key.
    pub key: PathBuf,
    /// The leaf DER.
    pub leaf: Vec<u8>,
}

impl Pki {
    /// A new CA for `td`.
    pub fn new(td: &str) -> Pki {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = Ca::init(
            &tmp.path().join("ca"),
            &InitOptions {
                trust_domain: TrustDomain::parse(td).expect("trust domain"),
                key_type: KeyType::EcdsaP256,
                root_ttl: Duration::from_secs(86_400),
                intermediate_ttl: Duration::from_secs(86_400),
            },
        )
        .expect("ca init");
        let bundle = tmp.path().join("bundle.pem");
        std::fs::write(&bundle, ca.bundle_pem()).expect("write bundle");
        Pki {
            tmp,
            ca,
            td: td.to_owned(),
            bundle,
        }
    }

    /// A path in the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// The full SPIFFE ID for a path.
    pub fn id(&self, path: &str) -> String {
        format!("spiffe://{}{path}", self.td)
    }

    /// Issues a normal SVID (with DNS SAN `localhost`, so curl can check the
    /// server name) through the CA library.
    pub fn issue(&self, name: &str, path: &str) -> Cert {
        let kt = KeyType::EcdsaP256;
        let kp = kt.generate().expect("keygen");
        let issued = self
            .ca
            .issue(
                &IssueRequest {
                    spiffe_id: SpiffeId::parse(&self.id(path)).expect("id"),
                    key: SubjectKey::from_key_pair(&kp, kt),
                    ttl: Duration::from_secs(3600),
                    dns: vec!["localhost".into()],
                },
                "proxy tests",
            )
            .expect("issue");
        let crt = self.path(&format!("{name}.crt"));
        let key = self.path(&format!("{name}.key"));
        std::fs::write(&crt, issued.chain_pem()).expect("write crt");
        std::fs::write(&key, kp.serialize_pem()).expect("write key");
        Cert {
            crt,
            key,
            leaf: issued.leaf.to_vec(),
        }
    }

    /// A leaf signed by this CA's intermediate with arbitrary URI SANs and
    /// validity (offsets from now, in seconds): for certificates the CA
    /// itself would refuse to issue.
    pub fn craft(&self, name: &str, uris: &[&str], not_before: i64, not_after: i64) -> Cert {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        self.craft_with(name, uris, kp, |p| {
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now + time::Duration::seconds(not_before);
            p.not_after = now + time::Duration::seconds(not_after);
        })
    }

    /// A leaf for `key`, signed by this CA's intermediate, valid for an
    /// hour, with the URI SANs given plus DNS `localhost`; `edit` changes
    /// anything else (key usages, basic constraints) to break one rule.
    pub fn craft_with(
        &self,
        name: &str,
        uris: &[&str],
        key: rcgen::KeyPair,
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> Cert {
        let dir = self.tmp.path().join("ca");
        let int_pem = std::fs::read(dir.join("intermediate.crt")).expect("intermediate.crt");
        let int_der = keys::certs_from_pem(&int_pem).expect("int pem").remove(0);
        let int_key = rcgen::KeyPair::from_pem(
            &std::fs::read_to_string(dir.join("intermediate.key")).expect("intermediate.key"),
        )
        .expect("int key");
        let issuer = rcgen::Issuer::from_ca_cert_der(&int_der, int_key).expect("issuer");
        let mut p = rcgen::CertificateParams::default();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::seconds(60);
        p.not_after = now + time::Duration::seconds(3600);
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        for u in uris {
            p.subject_alt_names
                .push(rcgen::SanType::URI((*u).try_into().expect("uri")));
        }
        p.subject_alt_names.push(rcgen::SanType::DnsName(
            "localhost".try_into().expect("dns"),
        ));
        edit(&mut p);
        let leaf = p.signed_by(&key, &issuer).expect("sign");
        let crt = self.path(&format!("{name}.crt"));
        let key_path = self.path(&format!("{name}.key"));
        std::fs::write(&crt, keys::cert_pem(leaf.der()) + &keys::cert_pem(&int_der))
            .expect("write crt");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        Cert {
            crt,
            key: key_path,
            leaf: leaf.der().to_vec(),
        }
    }
}

/// A fresh RSA-2048 key pair for rcgen (which cannot generate RSA keys
/// itself), signing with PKCS#1 v1.5 SHA-256.
pub fn rsa_key_pair() -> rcgen::KeyPair {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
    let der: Pkcs8V1Der<'_> = kp.as_der().expect("pkcs8");
    let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_ref().to_vec());
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256).expect("rsa kp")
}

/// Hex SHA-256 of a DER blob.
pub fn sha256_hex(der: &[u8]) -> String {
    keys::fingerprint(der)
}

/// A tiny HTTP/1.1 + h2c app echoing what it received: the first line is
/// `METHOD PATH VERSION`, then `:authority: A` for HTTP/2, then one `name: value` line per header, then
/// `body-bytes: N`. `/slow` answers after two seconds; `/bytes/N` answers
/// with N bytes of `x` instead.
pub struct EchoApp {
    /// Where it listens.
    pub addr: SocketAddr,
    _rt: std::sync::Arc<tokio::runtime::Runtime>,
}

async fn echo(
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let mut out = format!(
        "{} {} {:?}\n",
        req.method(),
        req.uri().path(),
        req.version()
    );
    if let Some(a) = req.uri().authority() {
        out.push_str(&format!(":authority: {a}\n"));
    }
    for (k, v) in req.headers() {
        out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    if let Some(n) = req.uri().path().strip_prefix("/bytes/") {
        // A large response, for flow control through the sidecars.
        let n: usize = n.parse().unwrap_or(0);
        return Ok(http::Response::new(Full::new(Bytes::from(vec![b'x'; n]))));
    }
    let slow = req.uri().path() == "/slow";
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    out.push_str(&format!("body-bytes: {}\n", body.len()));
    if slow {
        tokio::time::sleep(Duration::from_secs(2)).await;
        out.push_str("slow done\n");
    }
    Ok(http::Response::new(Full::new(Bytes::from(out))))
}

impl EchoApp {
    /// Starts the app on a free loopback port, on its own runtime thread.
    pub fn start() -> EchoApp {
        let rt = std::sync::Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime"),
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind app");
        let addr = listener.local_addr().expect("addr");
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tcp),
                        hyper::service::service_fn(echo),
                    )
                    .await;
                });
            }
        });
        EchoApp { addr, _rt: rt }
    }
}

/// A running `keyproof-proxy run` child process.
pub struct ProxyProc {
    child: Child,
    /// Admin address.
    pub admin: SocketAddr,
    /// The log file (stderr and stdout).
    pub log: PathBuf,
}

/// The status code (0 when there is none) and the body of a raw HTTP/1
/// response read until the peer closed.
fn status_and_body(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A minimal HTTP/1.0 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(status_and_body(&buf))
}

impl ProxyProc {
    /// Writes `config` into `dir` and starts the proxy; waits for `/ready`.
    pub fn start(dir: &Path, name: &str, config: &str, admin: SocketAddr) -> ProxyProc {
        Self::start_env(dir, name, config, admin, &[])
    }

    /// [`ProxyProc::start`] with extra environment variables for the child
    /// (e.g. `SOFTHSM2_CONF` for a PKCS#11 module).
    pub fn start_env(
        dir: &Path,
        name: &str,
        config: &str,
        admin: SocketAddr,
        env: &[(&str, &Path)],
    ) -> ProxyProc {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, config).expect("write config");
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let child = Command::new(crate::bin("keyproof-proxy"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn keyproof-proxy");
        let mut p = ProxyProc { child, admin, log };
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!(
                    "keyproof-proxy {name} exited early with {st}:\n{}",
                    p.log_text()
                );
            }
            if matches!(http_get(admin, "/ready"), Ok((200, _))) {
                return p;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!(
                    "keyproof-proxy {name} never became ready:\n{}",
                    p.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").expect("GET /metrics").1
    }

    /// The value of one sample, e.g.
    /// `keyproof_tls_handshakes_total{direction="inbound",result="ok"}`;
    /// 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The sum of the samples of metric `name` whose labels include every
    /// pair of `labels` (in any order); 0 when there is none. Unlike
    /// [`ProxyProc::metric`] this does not depend on how the exposition
    /// orders labels.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_samples(&self.metrics(), name, labels)
    }

    /// Waits (up to 10 s) for [`ProxyProc::sample`] to reach at least
    /// `min`; returns it.
    pub fn wait_sample(&self, name: &str, labels: &[(&str, &str)], min: f64) -> f64 {
        let start = Instant::now();
        loop {
            let v = self.sample(name, labels);
            if v >= min || start.elapsed() > Duration::from_secs(10) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to 5 s) for a sample to reach at least `min`; returns it.
    pub fn wait_metric(&self, sample: &str, min: f64) -> f64 {
        let start = Instant::now();
        loop {
            let v = self.metric(sample);
            if v >= min || start.elapsed() > Duration::from_secs(5) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for exit (up to `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The label pairs of one exposition line's sample (`name{a="x",b="y"} v`),
/// and its value; `None` for another metric or a comment.
fn parse_sample<'l>(line: &'l str, name: &str) -> Option<(Vec<(&'l str, String)>, f64)> {
    let rest = line.strip_prefix(name)?;
    let (labels, value) = match rest.strip_prefix('{') {
        Some(r) => {
            let end = r.rfind('}')?;
            (&r[..end], r[end + 1..].trim())
        }
        None if rest.starts_with(' ') => ("", rest.trim()),
        None => return None,
    };
    let mut pairs = Vec::new();
    let mut r = labels;
    while !r.is_empty() {
        let (k, v) = r.split_once("=\"")?;
        let mut val = String::new();
        let mut chars = v.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => val.push(c),
            }
        }
        pairs.push((k.trim_start_matches(','), val));
        r = v[end? + 1..].trim_start_matches(',');
    }
    Some((pairs, value.parse().ok()?))
}

/// The sum of the samples of `name` in an exposition whose labels include
/// every pair of `labels`.
pub fn sum_samples(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter_map(|l| parse_sample(l, name))
        .filter(|(pairs, _)| {
            labels
                .iter()
                .all(|(k, v)| pairs.iter().any(|(pk, pv)| pk == k && pv == v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// The serial number of a certificate (DER), as lowercase hex without
/// leading zeros: the form `[[inbound.deny]] serial` is compared in.
pub fn serial_hex(der: &[u8]) -> String {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    // OPTIONAL, serialNumber INTEGER, ... } ... }
    fn header(b: &[u8]) -> (u8, usize, usize) {
        let tag = b[0];
        let (len, hl) = if b[1] < 0x80 {
            (b[1] as usize, 2)
        } else {
            let n = (b[1] & 0x7f) as usize;
            let len = b[2..2 + n]
                .iter()
                .fold(0usize, |a, x| (a << 8) | *x as usize);
            (len, 2 + n)
        };
        (tag, hl, len)
    }
    let (_, hl, _) = header(der);
    let tbs = &der[hl..];
    let (_, hl, _) = header(tbs);
    let mut rest = &tbs[hl..];
    let (tag, hl, len) = header(rest);
    if tag == 0xa0 {
        rest = &rest[hl + len..];
    }
    let (tag, hl, len) = header(rest);
    assert_eq!(tag, 0x02, "serialNumber is an INTEGER");
    let hex: String = rest[hl..hl + len]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// curl straight to an inbound sidecar over mutual TLS as `cert` (the
/// server name `localhost` resolved to the listener), with `args` before
/// the URL of `path`: (status, body, curl exit code), status 0 when no
/// HTTP response arrived.
pub fn curl_mtls(
    inbound: SocketAddr,
    pki: &Pki,
    cert: &Cert,
    path: &str,
    args: &[&str],
) -> (u16, String, i32) {
    let resolve = format!("localhost:{}:127.0.0.1", inbound.port());
    let url = format!("https://localhost:{}{path}", inbound.port());
    let (crt, key, ca) = (
        cert.crt.display().to_string(),
        cert.key.display().to_string(),
        pki.bundle.display().to_string(),
    );
    let mut all = vec![
        "--resolve",
        &resolve,
        "--cert",
        &crt,
        "--key",
        &key,
        "--cacert",
        &ca,
    ];
    all.extend_from_slice(args);
    all.push(&url);
    curl(&all)
}

/// The `[identity]` section for a certificate.
pub fn identity_toml(bundle: &Path, cert: &Cert) -> String {
    format!(
        "[identity]\ntrust_bundle = {:?}\n[identity.files]\ncert = {:?}\nkey = {:?}\n",
        bundle.display().to_string(),
        cert.crt.display().to_string(),
        cert.key.display().to_string()
    )
}

/// Runs curl with `args`, returning (HTTP status, body, curl exit code).
/// Status is 0 when no HTTP response arrived.
pub fn curl(args: &[&str]) -> (u16, String, i32) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "15", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        body.to_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// A kept-alive HTTP/1.1 connection to an inbound sidecar over mutual TLS
/// 1.3, presenting `cert` and trusting the PKI's bundle (test leaves carry
/// `localhost`), plus the connection's 32-byte `EXPORTER-Channel-Binding`
/// value: what a step-up caller needs to sign for this connection.
pub async fn mtls_http1(
    inbound: SocketAddr,
    pki: &Pki,
    cert: &Cert,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    [u8; 32],
) {
    let tls = mtls_stream(inbound, pki, cert, b"http/1.1").await;
    let mut exporter = [0u8; 32];
    tls.get_ref()
        .1
        .export_keying_material(&mut exporter, b"EXPORTER-Channel-Binding", None)
        .expect("exporter");
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("http1");
    tokio::spawn(conn);
    (send, exporter)
}

/// A mutual-TLS 1.3 connection to an inbound sidecar offering `alpn`,
/// presenting `cert`: the raw stream, for requests no polite client would
/// send (targets with dot segments or encodings, as written).
pub async fn mtls_stream(
    inbound: SocketAddr,
    pki: &Pki,
    cert: &Cert,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::ServerName;

    let cfg = client_tls(pki, cert, alpn);
    let tcp = tokio::net::TcpStream::connect(inbound)
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("mTLS handshake")
}

/// A caller's TLS 1.3 configuration: `cert` as its client certificate, the
/// PKI's bundle as roots, one ALPN protocol.
pub fn client_tls(pki: &Pki, cert: &Cert, alpn: &[u8]) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.crt)
        .expect("chain")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(&cert.key).expect("key");
    let mut roots = rustls::RootCertStore::empty();
    for r in CertificateDer::pem_file_iter(&pki.bundle).expect("bundle") {
        roots.add(r.expect("root")).expect("add root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client cert");
    cfg.alpn_protocols = vec![alpn.to_vec()];
    std::sync::Arc::new(cfg)
}

/// Sends `head` (a complete HTTP/1.1 request head, sent byte for byte) on
/// `io` and reads the response until the peer closes (ask for
/// `Connection: close`): (status, body); status 0 when none arrived.
pub async fn raw_http1<S>(mut io: S, head: &[u8]) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if io.write_all(head).await.is_err() {
        return (0, String::new());
    }
    let _ = io.flush().await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut buf)).await;
    status_and_body(&buf)
}

/// A fresh Ed25519 key pair for rcgen, serialized as PKCS#8 v1 (rcgen's
/// own v2 encoding is refused by OpenSSL 3.0, and so by curl).
pub fn ed25519_key_pair() -> rcgen::KeyPair {
    let kp = aws_lc_rs::signature::Ed25519KeyPair::generate().expect("ed25519");
    let der = kp.to_pkcs8v1().expect("pkcs8");
    let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_ref().to_vec());
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519).expect("ed kp")
}

/// What a TLS ClientHello offers for key exchange, read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloKx {
    /// `supported_groups`, in the client's order of preference.
    pub groups: Vec<u16>,
    /// `key_share` entries: (group, key share length).
    pub shares: Vec<(u16, usize)>,
    /// Size of the whole ClientHello record, header included.
    pub record_len: usize,
}

/// X25519MLKEM768's TLS code point.
pub const GROUP_X25519MLKEM768: u16 = 0x11ec;
/// X25519's TLS code point.
pub const GROUP_X25519: u16 = 0x001d;

/// Accepts one connection on `listener`, reads the first TLS record (the
/// ClientHello) and parses its key-exchange offer; the connection is then
/// dropped, so the client fails.
pub fn capture_client_hello(listener: &std::net::TcpListener) -> HelloKx {
    let (mut s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut head = [0u8; 5];
    s.read_exact(&mut head).expect("record header");
    assert_eq!(head[0], 22, "not a handshake record");
    let len = u16::from_be_bytes([head[3], head[4]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("record body");
    let mut kx = parse_client_hello(&body);
    kx.record_len = 5 + len;
    kx
}

fn parse_client_hello(b: &[u8]) -> HelloKx {
    fn u16_at(b: &[u8], i: usize) -> usize {
        u16::from_be_bytes([b[i], b[i + 1]]) as usize
    }
    assert_eq!(b[0], 1, "not a ClientHello");
    // type(1) length(3) version(2) random(32)
    let mut i = 4 + 2 + 32;
    i += 1 + b[i] as usize; // session id
    i += 2 + u16_at(b, i); // cipher suites
    i += 1 + b[i] as usize; // compression methods
    let end = i + 2 + u16_at(b, i);
    i += 2;
    let mut out = HelloKx {
        groups: Vec::new(),
        shares: Vec::new(),
        record_len: 0,
    };
    while i + 4 <= end {
        let (typ, len) = (u16_at(b, i), u16_at(b, i + 2));
        let ext = &b[i + 4..i + 4 + len];
        match typ {
            0x000a => {
                out.groups = ext[2..2 + u16_at(ext, 0)]
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
            }
            0x0033 => {
                let mut j = 2;
                while j + 4 <= 2 + u16_at(ext, 0) {
                    let (g, l) = (u16_at(ext, j) as u16, u16_at(ext, j + 2));
                    out.shares.push((g, l));
                    j += 4 + l;
                }
            }
            _ => {}
        }
        i += 4 + len;
    }
    out
}

/// The Python that `test.sh` installs the interop packages into
/// (`KEYPROOF_PYTHON`, else `python3`), if it can import `modules` (a
/// comma-separated list); `None` (the test skips, saying so) unless
/// `KEYPROOF_INTEROP` is set, which makes their absence a failure.
pub fn interop_python(modules: &str) -> Option<String> {
    let py = std::env::var("KEYPROOF_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    if std::env::var_os("KEYPROOF_INTEROP").is_some() {
        panic!("KEYPROOF_INTEROP is set but {py} cannot import {modules}");
    }
    eprintln!("skipping: {py} cannot import {modules} (set KEYPROOF_PYTHON)");
    None
}

/// Writes a file the way an operator's tooling should when a process
/// watches it: whole, then renamed over the old one, so the watcher never
/// reads half of it.
pub fn write_renamed(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// An outbound sidecar with the files of `pki` (trusting `bundle`,
/// presenting `cert`) that routes `api.default.svc` to `upstream`, expecting
/// `identity` there: the process and its listen address.
pub fn outbound_to(
    pki: &Pki,
    bundle: &Path,
    cert: &Cert,
    upstream: SocketAddr,
    identity: &str,
) -> (ProxyProc, SocketAddr) {
    let free = || -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], crate::free_port())) };
    let (listen, admin) = (free(), free());
    let proc = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{listen}\"\n\
             [[outbound.upstreams]]\nhost = \"api.default.svc\"\naddress = \"{upstream}\"\nidentity = \"{identity}\"\n\
             [admin]\nlisten = \"{admin}\"\n",
            identity_toml(bundle, cert),
        ),
        admin,
    );
    (proc, listen)
}

/// A TCP balancer, as a Service's virtual IP is to its callers: each new
/// connection goes to the next backend in turn, its bytes copied both ways
/// (each direction's end passed on as a half-close). Stops accepting when
/// dropped.
pub struct RoundRobin {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl RoundRobin {
    /// Starts balancing over `backends`, the first connection going to the
    /// first.
    pub fn start(backends: Vec<SocketAddr>) -> RoundRobin {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind balancer");
        let addr = listener.local_addr().expect("addr");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for (i, caller) in listener.incoming().enumerate() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(caller) = caller else { continue };
                let to = backends[i % backends.len()];
                std::thread::spawn(move || {
                    let Ok(backend) = std::net::TcpStream::connect(to) else {
                        return;
                    };
                    let copy = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    };
                    let (Ok(c2), Ok(b2)) = (caller.try_clone(), backend.try_clone()) else {
                        return;
                    };
                    let up = std::thread::spawn(move || copy(c2, b2));
                    copy(backend, caller);
                    let _ = up.join();
                });
            }
        });
        RoundRobin { addr, stop }
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}
