//! A minimal client for the Kubernetes API server, shared by the
//! `keyproof-ca` commands that run in the CA pod (`k8s-jwks`,
//! `k8s-bundle`).
//!
//! It speaks HTTP/1.1 over TLS with the cluster CA file as the only root and
//! the API server's DNS name checked by webpki, authenticates with the pod's
//! ServiceAccount token, and bounds every exchange in time and size. The
//! token and the CA file are re-read for every [`ApiServer::load`], because
//! the kubelet refreshes a projected token before it expires and the cluster
//! CA (the `kube-root-ca.crt` ConfigMap) can be rotated.
//!
//! No Kubernetes client library: the commands need a handful of requests,
//! and this keeps the CA's dependencies (and what runs next to its keys)
//! small.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// The API server as pods see it.
pub const DEFAULT_API_SERVER: &str = "https://kubernetes.default.svc";
/// The pod's ServiceAccount token (where the kubelet mounts it).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA that signs the API server's certificate.
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// Time allowed for the TCP connection and the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for one request and its whole answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// First retry delay after a failure; it doubles per consecutive failure up
/// to the command's interval.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Why talking to the API server failed (before any answer could be judged).
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("invalid --api-server {0:?}: expected https://host[:port]")]
    BadUrl(String),
    #[error("--ca-file {path}: {msg}")]
    CaFile { path: PathBuf, msg: String },
    #[error("--token-file {path}: {msg}")]
    TokenFile { path: PathBuf, msg: String },
    #[error("cannot connect to the API server at {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error(
        "TLS with the API server at {addr} failed: {msg} (its certificate must chain to \
         --ca-file {ca_file} and name the --api-server host)"
    )]
    Tls {
        addr: String,
        ca_file: PathBuf,
        msg: String,
    },
    #[error("no {what} from the API server at {addr} within {after:?}")]
    Timeout {
        addr: String,
        what: &'static str,
        after: Duration,
    },
    #[error("HTTP exchange with the API server at {addr} failed: {msg}")]
    Http { addr: String, msg: String },
    #[error("the answer to {request} is larger than {limit} bytes")]
    TooLarge { request: String, limit: usize },
}

/// The API server's address split into what TCP, TLS and HTTP need.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port` (IPv6 literals in brackets) for connect and `Host`.
    authority: String,
    /// The name the server's certificate must carry.
    server_name: ServerName<'static>,
}

impl Target {
    fn parse(url: &str) -> Result<Target, KubeError> {
        let bad = || KubeError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(bad());
        }
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        let (host, port, bracketed) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(bad)?;
                let port = match after {
                    "" => 443,
                    p => port(p.strip_prefix(':').ok_or_else(bad)?)?,
                };
                (host, port, true)
            }
            None => match rest.rsplit_once(':') {
                Some((host, p)) => (host, port(p)?, false),
                None => (rest, 443, false),
            },
        };
        if host.is_empty() {
            return Err(bad());
        }
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| bad())?;
        let authority = if bracketed {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Target {
            authority,
            server_name,
        })
    }
}

/// A TLS client trusting only the certificates in `ca_file`; rustls'
/// webpki verifier checks the chain and the server name.
fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, KubeError> {
    let ca_err = |msg: String| KubeError::CaFile {
        path: ca_file.to_owned(),
        msg,
    };
    let pem = crate::fsutil::read_input(ca_file, crate::fsutil::MAX_INPUT)
        .map_err(|e| ca_err(e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_err(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(ca_err("no PEM certificate in the file".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(ca_err("no usable CA certificate in the file".into()));
    }
    // The stock provider and protocol versions (TLS 1.2 and 1.3), not the
    // mesh's TLS 1.3-only profile: this talks to the cluster's API server,
    // whatever its configuration.
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ca_err(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The bearer token, as a header value marked sensitive (kept out of debug
/// output).
fn bearer(token_file: &Path) -> Result<HeaderValue, KubeError> {
    let tok_err = |msg: String| KubeError::TokenFile {
        path: token_file.to_owned(),
        msg,
    };
    let raw = crate::fsutil::read_input(token_file, crate::fsutil::MAX_INPUT)
        .map_err(|e| tok_err(e.to_string()))?;
    let raw = String::from_utf8(raw).map_err(|_| tok_err("not UTF-8".into()))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(tok_err("the file is empty".into()));
    }
    let mut v = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| tok_err("the token holds characters a header cannot carry".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// A printable excerpt of an error answer, for the log.
pub fn excerpt(body: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    s.trim().to_owned()
}

/// Percent-encodes a query parameter value (everything but RFC 3986's
/// unreserved characters), e.g. a label selector such as `a.b/c=d,e!=f`.
pub fn query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Delay before the next attempt after `failures` consecutive failures:
/// 1 s, 2 s, 4 s ... never more than `interval`, so a short API server
/// outage is bridged quickly and a lasting one is retried no more often
/// than the interval once it has lasted a while.
pub fn retry_delay(failures: u32, interval: Duration) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << shift).min(interval)
}

/// The schedule of a daemon that works in rounds (a sync, a publisher):
/// the next round `interval` after one that worked, sooner after one that
/// failed ([`retry_delay`]). It also remembers what the rounds' log lines
/// depend on: whether this is the first round, and how many failed in a
/// row before it.
#[derive(Debug)]
pub struct Rounds {
    interval: Duration,
    failures: u32,
    first: bool,
}

impl Rounds {
    /// Before the first round.
    pub fn new(interval: Duration) -> Self {
        Rounds {
            interval,
            failures: 0,
            first: true,
        }
    }

    /// True during the first round.
    pub fn first(&self) -> bool {
        self.first
    }

    /// Rounds that failed in a row: before this one until [`Rounds::end`],
    /// then including it.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Ends a round that worked (`ok`) or failed; the delay before the next.
    pub fn end(&mut self, ok: bool) -> Duration {
        self.first = false;
        if ok {
            self.failures = 0;
            self.interval
        } else {
            self.failures = self.failures.saturating_add(1);
            retry_delay(self.failures, self.interval)
        }
    }

    /// Waits `delay`; false if `shutdown` completed first.
    pub async fn wait(
        delay: Duration,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> bool {
        tokio::select! {
            _ = shutdown => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Where the API server is and how to authenticate to it, as read from the
/// files at one moment.
#[derive(Debug, Clone)]
pub struct ApiServer {
    target: Target,
    tls: Arc<rustls::ClientConfig>,
    auth: HeaderValue,
    ca_file: PathBuf,
}

/// One request to the API server.
#[derive(Debug, Clone)]
pub struct ApiRequest<'a> {
    /// GET, PATCH, ...
    pub method: Method,
    /// Path and query, e.g. `/api/v1/namespaces?labelSelector=...`.
    pub path: &'a str,
    /// `Content-Type` of `body` (none for a request without a body).
    pub content_type: Option<&'a str>,
    /// `Accept`.
    pub accept: &'a str,
    /// The request body (empty for GET).
    pub body: Bytes,
    /// The largest answer accepted; more is [`KubeError::TooLarge`].
    pub max_answer: usize,
}

impl ApiRequest<'_> {
    /// `METHOD path` without the query, for messages.
    pub fn describe(&self) -> String {
        let path = self.path.split_once('?').map_or(self.path, |(p, _)| p);
        format!("{} {path}", self.method)
    }
}

impl ApiServer {
    /// Reads the token and the CA file and checks the URL; nothing is
    /// connected yet.
    pub fn load(api_server: &str, token_file: &Path, ca_file: &Path) -> Result<Self, KubeError> {
        let target = Target::parse(api_server)?;
        let tls = Arc::new(tls_config(ca_file)?);
        let auth = bearer(token_file)?;
        Ok(ApiServer {
            target,
            tls,
            auth,
            ca_file: ca_file.to_owned(),
        })
    }

    /// `host:port` of the API server.
    pub fn authority(&self) -> &str {
        &self.target.authority
    }

    /// Opens a TLS connection, within [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<Connection, KubeError> {
        let addr = self.target.authority.clone();
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(&self.target.authority)
                .await
                .map_err(|e| KubeError::Connect {
                    addr: addr.clone(),
                    msg: e.to_string(),
                })?;
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(self.target.server_name.clone(), tcp)
                .await
                .map_err(|e| KubeError::Tls {
                    addr: addr.clone(),
                    ca_file: self.ca_file.clone(),
                    msg: e.to_string(),
                })
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| KubeError::Timeout {
                addr: addr.clone(),
                what: "TLS connection",
                after: CONNECT_TIMEOUT,
            })??;
        let handshake = hyper::client::conn::http1::handshake(TokioIo::new(stream));
        let (sender, conn) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| KubeError::Timeout {
                addr: addr.clone(),
                what: "HTTP connection",
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|e| KubeError::Http {
                addr: addr.clone(),
                msg: e.to_string(),
            })?;
        // The connection task ends when the server closes or the
        // `Connection` is dropped (which aborts it); it never outlives it.
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection {
            sender,
            task,
            authority: self.target.authority.clone(),
            auth: self.auth.clone(),
        })
    }
}

/// An open HTTP/1.1 connection to the API server; requests on it run one
/// after the other (keep-alive), so a publisher touching many namespaces
/// does not pay a TLS handshake for each.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
    authority: String,
    auth: HeaderValue,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    /// False once the server has closed the connection (or it broke): open
    /// a new one for the next request.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed() && !self.task.is_finished()
    }

    /// Sends `req` and reads the whole answer, within [`RESPONSE_TIMEOUT`]
    /// and `req.max_answer` bytes. Any status is returned: judging it is
    /// the caller's business.
    pub async fn send(&mut self, req: &ApiRequest<'_>) -> Result<(StatusCode, Bytes), KubeError> {
        let addr = self.authority.clone();
        let http_err = |e: &dyn std::fmt::Display| KubeError::Http {
            addr: addr.clone(),
            msg: e.to_string(),
        };
        let too_large = || KubeError::TooLarge {
            request: req.describe(),
            limit: req.max_answer,
        };
        let exchange = async {
            self.sender.ready().await.map_err(|e| http_err(&e))?;
            let mut builder = Request::builder()
                .method(req.method.clone())
                .uri(req.path)
                .header(header::HOST, &self.authority)
                .header(header::AUTHORIZATION, self.auth.clone())
                .header(header::ACCEPT, req.accept);
            if let Some(ct) = req.content_type {
                builder = builder.header(header::CONTENT_TYPE, ct);
            }
            let request = builder
                .body(Full::new(req.body.clone()))
                .map_err(|e| http_err(&e))?;
            let resp = self
                .sender
                .send_request(request)
                .await
                .map_err(|e| http_err(&e))?;
            let status = resp.status();
            let declared = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > req.max_answer as u64) {
                // The rest of the answer is never read: the connection
                // cannot carry another request.
                self.task.abort();
                return Err(too_large());
            }
            let body = Limited::new(resp.into_body(), req.max_answer)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        self.task.abort();
                        too_large()
                    } else {
                        http_err(&e)
                    }
                })?
                .to_bytes();
            Ok((status, body))
        };
        let result = tokio::time::timeout(RESPONSE_TIMEOUT, exchange).await;
        match result {
            Ok(r) => r,
            Err(_) => {
                // A half-read answer leaves the connection unusable.
                self.task.abort();
                Err(KubeError::Timeout {
                    addr: self.authority.clone(),
                    what: "complete answer",
                    after: RESPONSE_TIMEOUT,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_urls() {
        let t = Target::parse("https://kubernetes.default.svc").unwrap();
        assert_eq!(t.authority, "kubernetes.default.svc:443");
        let t = Target::parse("https://localhost:6443/").unwrap();
        assert_eq!(t.authority, "localhost:6443");
        let t = Target::parse("https://[::1]:6443").unwrap();
        assert_eq!(t.authority, "[::1]:6443");
        let t = Target::parse("https://10.96.0.1").unwrap();
        assert_eq!(t.authority, "10.96.0.1:443");
        for bad in [
            "http://kubernetes.default.svc",
            "https://",
            "https://host:0",
            "https://host:x",
            "https://host/path",
            "https://user@host",
            "https://[::1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retries_back_off_up_to_the_interval() {
        let i = Duration::from_secs(60);
        assert_eq!(retry_delay(1, i), Duration::from_secs(1));
        assert_eq!(retry_delay(3, i), Duration::from_secs(4));
        assert_eq!(retry_delay(7, i), i);
        assert_eq!(retry_delay(u32::MAX, i), i);
        assert_eq!(
            retry_delay(1, Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query_value("keyproof.io/mesh=enabled"),
            "keyproof.io%2Fmesh%3Denabled"
        );
        assert_eq!(
            query_value("a in (x, y),!b"),
            "a%20in%20%28x%2C%20y%29%2C%21b"
        );
        assert_eq!(query_value("A-z_0.9~"), "A-z_0.9~");
    }
}
