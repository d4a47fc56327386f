//! A stand-in for the Kubernetes API server's endpoints, for the tests of
//! the `keyproof-ca` commands that talk to it (`k8s-jwks`, `k8s-bundle`).
//!
//! tokio-rustls and hyper on loopback, with a certificate for DNS
//! `localhost` only (no IP SAN) from a test cluster CA that a test writes to
//! a file, as the kubelet writes `ca.crt`. It RECORDS every request it gets,
//! answers callers without the expected bearer token with a
//! Kubernetes-style 401 Status, and leaves every other answer to the test's
//! handler. It is no API server: the handler decides what each path means.
//!
//! Also here: what both commands' tests do around it, running the command
//! once or as a daemon and waiting for it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::run;

/// The bearer token the stand-in accepts unless a test changes it.
pub const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.stand-in-token.sig";

/// A test cluster CA: its certificate in PEM and an issuer for leaves.
pub struct ClusterCa {
    /// The CA certificate, as the kubelet's `ca.crt` holds it.
    pub pem: String,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

impl ClusterCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> ClusterCa {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("CA cert").pem();
        ClusterCa { pem, params, key }
    }

    /// Writes the CA certificate to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.pem).expect("write CA file");
        path.to_owned()
    }

    /// A serving certificate for DNS `localhost` only (no IP SAN).
    fn server_config(&self) -> rustls::ServerConfig {
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("server key");
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &issuer).expect("server cert");
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config")
    }
}

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    /// Query parameters, percent-decoded.
    pub query: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: String,
}

impl Recorded {
    /// The first query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).expect("UTF-8 query")
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// A Kubernetes `Status` object, as the API server sends with errors.
pub fn status(code: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": reason.to_lowercase(), "reason": reason, "code": code.as_u16(),
    });
    json(code, body)
}

/// `v` as an `application/json` answer.
pub fn json(code: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// What the test's handler is: the answer to a request that carried the
/// expected token.
type Handler = dyn Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync;

/// The stand-in (see the module comment); stopped when dropped.
pub struct ApiServer {
    port: u16,
    token: Arc<Mutex<String>>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    _rt: tokio::runtime::Runtime,
}

impl ApiServer {
    /// Serves with a certificate from `ca`, accepting bearer `token`;
    /// `handler` answers the requests that carry it.
    pub fn start(
        ca: &ClusterCa,
        token: &str,
        handler: impl Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> ApiServer {
        let token = Arc::new(Mutex::new(token.to_owned()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config()));
        let (token2, requests2) = (token.clone(), requests.clone());
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, token, requests, handler) = (
                    acceptor.clone(),
                    token2.clone(),
                    requests2.clone(),
                    handler.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (token, requests, handler) =
                                (token.clone(), requests.clone(), handler.clone());
                            async move {
                                let rec = record(req).await;
                                // The request is listed together with its
                                // effect: a test that sees it also sees what
                                // it changed.
                                let mut requests = requests.lock().unwrap();
                                let expected = format!("Bearer {}", token.lock().unwrap());
                                let resp = if rec.authorization.as_deref() != Some(&*expected) {
                                    status(StatusCode::UNAUTHORIZED, "Unauthorized")
                                } else {
                                    handler(&rec)
                                };
                                requests.push(rec);
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        ApiServer {
            port,
            token,
            requests,
            _rt: rt,
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://localhost:<port>`: the name its certificate holds.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// From now on, accepts bearer `token` only.
    pub fn set_token(&self, token: &str) {
        *self.token.lock().unwrap() = token.to_owned();
    }

    /// Every request so far, in order, any path and any token.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests it got so far.
    pub fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

async fn record(req: Request<hyper::body::Incoming>) -> Recorded {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes());
    let header = |h: http::header::HeaderName| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Recorded {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parse_query(parts.uri.query()),
        content_type: header(http::header::CONTENT_TYPE),
        authorization: header(http::header::AUTHORIZATION),
        body: String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
    }
}

/// Runs a command to its end; returns (exit code, stdout, stderr).
pub fn run_once(c: &mut Command) -> (i32, String, String) {
    let out = run(c);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A command running as it would in its pod, its log in a file; stopped
/// when dropped.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `c` with its stderr (the log) in `log`.
    pub fn spawn(c: &mut Command, log: PathBuf) -> Daemon {
        let child = c
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {c:?}: {e}"));
        Daemon { child, log }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `f` holds, up to `limit`; false if it never did.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}
