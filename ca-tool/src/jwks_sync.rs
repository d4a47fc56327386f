//! `keyproof-ca k8s-jwks`: keeps a local copy of a Kubernetes cluster's
//! ServiceAccount token signing keys for `keyproof-ca serve --k8s-jwks`.
//!
//! The API server publishes the public keys it signs projected tokens with
//! at `/openid/v1/jwks` (the built-in ClusterRole
//! `system:service-account-issuer-discovery` grants reading it). This module
//! fetches that document over TLS, with the cluster CA file as the only root
//! and the API server's DNS name checked by webpki; checks that it is a JWKS
//! with at least one key; and replaces the output file atomically only when
//! its content changed, so that `serve` (which re-reads the file when it
//! changes) follows the cluster's key rotations.
//!
//! A failed fetch never touches the file: the CA keeps verifying with the
//! keys it has, which stay valid for every token signed before the cluster
//! rotated. The bearer token and the CA file are re-read for every fetch,
//! because the kubelet refreshes a projected token before it expires and the
//! cluster CA (the `kube-root-ca.crt` ConfigMap) can be rotated.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use rustls::pki_types::ServerName;

use crate::fsutil::{self, PUBLIC};

/// Where the API server publishes its token signing keys.
pub const JWKS_PATH: &str = "/openid/v1/jwks";
/// The API server as pods see it.
pub const DEFAULT_API_SERVER: &str = "https://kubernetes.default.svc";
/// The pod's ServiceAccount token (where the kubelet mounts it).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA that signs the API server's certificate.
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// Largest JWKS accepted. A cluster publishes a handful of keys (a few KiB);
/// the limit keeps a misdirected answer from filling memory or the volume.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Time allowed for the TCP connection and the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the request and the whole answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// First retry delay after a failure; it doubles per consecutive failure up
/// to the sync interval.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// What to fetch, how, and where to write it.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The JWKS file `serve --k8s-jwks` reads.
    pub out: PathBuf,
    /// `https://host[:port]` of the API server.
    pub api_server: String,
    /// Bearer token file, re-read for every fetch.
    pub token_file: PathBuf,
    /// PEM CA certificates: the only roots the API server's certificate may
    /// chain to.
    pub ca_file: PathBuf,
    /// Time between two fetches while all is well.
    pub interval: Duration,
}

/// The result of one successful sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The JWKS differed from the file (or there was none): written.
    Written {
        /// Keys in the JWKS.
        keys: usize,
    },
    /// The file already held this JWKS: left alone.
    Unchanged {
        /// Keys in the JWKS.
        keys: usize,
    },
}

impl Outcome {
    /// One line for the operator, naming the file.
    pub fn describe(&self, out: &Path) -> String {
        match self {
            Outcome::Written { keys } => {
                format!("wrote the cluster JWKS ({keys} keys) to {}", out.display())
            }
            Outcome::Unchanged { keys } => {
                format!("{} is up to date ({keys} keys)", out.display())
            }
        }
    }
}

/// Why a sync failed. The output file is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
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
    #[error("the API server answered {status} to GET {JWKS_PATH}{hint}: {body}")]
    Status {
        status: u16,
        hint: &'static str,
        body: String,
    },
    #[error("the answer to GET {JWKS_PATH} is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("the answer to GET {JWKS_PATH} is not a JWKS: {0}")]
    NotJwks(String),
    #[error("the answer to GET {JWKS_PATH} is a JWKS without keys")]
    NoKeys,
    #[error("--out {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The API server's address split into what TCP, TLS and HTTP need.
struct Target {
    /// `host:port` (IPv6 literals in brackets) for connect and `Host`.
    authority: String,
    /// The name the server's certificate must carry.
    server_name: ServerName<'static>,
}

impl Target {
    fn parse(url: &str) -> Result<Target, SyncError> {
        let bad = || SyncError::BadUrl(url.to_owned());
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
fn tls_config(ca_file: &Path) -> Result<rustls::ClientConfig, SyncError> {
    let ca_err = |msg: String| SyncError::CaFile {
        path: ca_file.to_owned(),
        msg,
    };
    let pem = std::fs::read(ca_file).map_err(|e| ca_err(e.to_string()))?;
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
fn bearer(token_file: &Path) -> Result<HeaderValue, SyncError> {
    let tok_err = |msg: String| SyncError::TokenFile {
        path: token_file.to_owned(),
        msg,
    };
    let raw = std::fs::read_to_string(token_file).map_err(|e| tok_err(e.to_string()))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(tok_err("the file is empty".into()));
    }
    let mut v = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| tok_err("the token holds characters a header cannot carry".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

/// Checks that `body` is a JWKS with at least one key the CA can parse;
/// returns the number of keys.
pub fn validate(body: &[u8]) -> Result<usize, SyncError> {
    let set: JwkSet =
        serde_json::from_slice(body).map_err(|e| SyncError::NotJwks(e.to_string()))?;
    if set.keys.is_empty() {
        return Err(SyncError::NoKeys);
    }
    Ok(set.keys.len())
}

/// A printable excerpt of an error answer, for the log.
fn excerpt(body: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    s.trim().to_owned()
}

/// Fetches and validates the JWKS; returns it as served and its key count.
pub async fn fetch(opts: &SyncOptions) -> Result<(Bytes, usize), SyncError> {
    let target = Target::parse(&opts.api_server)?;
    let tls = tls_config(&opts.ca_file)?;
    let auth = bearer(&opts.token_file)?;
    let addr = target.authority.clone();

    let connect = async {
        let tcp = tokio::net::TcpStream::connect(&target.authority)
            .await
            .map_err(|e| SyncError::Connect {
                addr: addr.clone(),
                msg: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(target.server_name.clone(), tcp)
            .await
            .map_err(|e| SyncError::Tls {
                addr: addr.clone(),
                ca_file: opts.ca_file.clone(),
                msg: e.to_string(),
            })
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| SyncError::Timeout {
            addr: addr.clone(),
            what: "TLS connection",
            after: CONNECT_TIMEOUT,
        })??;

    let http_err = |e: &dyn std::fmt::Display| SyncError::Http {
        addr: addr.clone(),
        msg: e.to_string(),
    };
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_err(&e))?;
        // The connection task ends when `sender` is dropped or the server
        // closes; it is never left behind past this exchange.
        let conn = tokio::spawn(conn);
        let req = Request::get(JWKS_PATH)
            .header(header::HOST, &target.authority)
            .header(header::AUTHORIZATION, auth)
            .header(header::ACCEPT, "application/jwk-set+json, application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| http_err(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| http_err(&e))?;
        let status = resp.status();
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            conn.abort();
            return Err(SyncError::TooLarge);
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    SyncError::TooLarge
                } else {
                    http_err(&e)
                }
            })?
            .to_bytes();
        drop(sender);
        conn.abort();
        Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(RESPONSE_TIMEOUT, exchange)
        .await
        .map_err(|_| SyncError::Timeout {
            addr: addr.clone(),
            what: "complete answer",
            after: RESPONSE_TIMEOUT,
        })??;

    if status != StatusCode::OK {
        let hint = match status {
            StatusCode::UNAUTHORIZED => " (the API server did not accept the --token-file token)",
            StatusCode::FORBIDDEN => {
                " (the ServiceAccount needs the ClusterRole system:service-account-issuer-discovery)"
            }
            _ => "",
        };
        return Err(SyncError::Status {
            status: status.as_u16(),
            hint,
            body: excerpt(&body),
        });
    }
    let keys = validate(&body)?;
    Ok((body, keys))
}

/// Writes `body` to `path` (temporary file, fsync, rename, mode 0644) unless
/// the file already holds exactly these bytes; returns whether it wrote.
/// Skipping identical content keeps `serve` from reloading for nothing.
pub fn write_if_changed(path: &Path, body: &[u8]) -> Result<bool, SyncError> {
    let write_err = |source| SyncError::Write {
        path: path.to_owned(),
        source,
    };
    if std::fs::read(path).is_ok_and(|old| old == body) {
        return Ok(false);
    }
    fsutil::write_atomic(path, body, PUBLIC).map_err(write_err)?;
    // The rename is durable only once the directory is synced.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(true)
}

/// One fetch and, if the JWKS changed, one write.
pub async fn sync_once(opts: &SyncOptions) -> Result<Outcome, SyncError> {
    let (body, keys) = fetch(opts).await?;
    Ok(if write_if_changed(&opts.out, &body)? {
        Outcome::Written { keys }
    } else {
        Outcome::Unchanged { keys }
    })
}

/// Delay before the next attempt after `failures` consecutive failures:
/// 1 s, 2 s, 4 s ... never more than `interval`, so a short API server
/// outage is bridged quickly and a lasting one is retried no more often
/// than the interval once it has lasted a while.
pub fn retry_delay(failures: u32, interval: Duration) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << shift).min(interval)
}

/// Syncs every `interval` until `shutdown` completes. Failures are logged
/// and retried with backoff; they never end the loop, because the file
/// already written stays valid and the next attempt may succeed.
pub async fn run(opts: &SyncOptions, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut failures: u32 = 0;
    let mut first = true;
    loop {
        let result = tokio::select! {
            _ = &mut shutdown => return,
            r = sync_once(opts) => r,
        };
        let delay = match result {
            Ok(outcome) => {
                let keys = match outcome {
                    Outcome::Written { keys } | Outcome::Unchanged { keys } => keys,
                };
                let msg = outcome.describe(&opts.out);
                if matches!(outcome, Outcome::Written { .. }) || first || failures > 0 {
                    tracing::info!(keys, path = %opts.out.display(), failures, "{msg}");
                } else {
                    tracing::debug!(keys, path = %opts.out.display(), "{msg}");
                }
                failures = 0;
                opts.interval
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(failures, opts.interval);
                tracing::warn!(
                    error = %e,
                    failures,
                    retry_in = ?delay,
                    path = %opts.out.display(),
                    "JWKS sync failed; the current file is kept"
                );
                delay
            }
        };
        first = false;
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(delay) => {}
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
    fn validate_wants_keys() {
        assert!(matches!(validate(b"<html>"), Err(SyncError::NotJwks(_))));
        assert!(matches!(
            validate(br#"{"hello":1}"#),
            Err(SyncError::NotJwks(_))
        ));
        assert!(matches!(
            validate(br#"{"keys":[]}"#),
            Err(SyncError::NoKeys)
        ));
        let jwks = br#"{"keys":[{"use":"sig","kty":"EC","kid":"k1","crv":"P-256","alg":"ES256",
            "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        assert_eq!(validate(jwks).unwrap(), 1);
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
    fn writes_only_changes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("jwks.json");
        assert!(write_if_changed(&p, b"{}").unwrap());
        assert!(!write_if_changed(&p, b"{}").unwrap());
        assert!(write_if_changed(&p, b"{ }").unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"{ }");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
