//! A client for `keyproof-ca serve`: bootstrap with a join token or a
//! ServiceAccount token, renew with the current SVID, fetch the bundle. The server is authenticated as an
//! X.509-SVID of the trust domain; its DNS name is not used.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use keyproof_identity::keys;
use keyproof_identity::pkcs11::Pkcs11Key;
use keyproof_identity::spiffe::IdPattern;
use keyproof_identity::tls::{Shared, SharedVerifier, SvidServerVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;

/// Time allowed for an answer (and to connect to a lone endpoint).
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: usize = 256 * 1024;

/// What can go wrong talking to the CA.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid CA url {0:?}: expected https://host:port")]
    BadUrl(String),
    #[error("cannot reach the CA at {addr}: {msg}")]
    Unreachable { addr: String, msg: String },
    /// The CA refused the client certificate presented, with a TLS alert
    /// (it does not chain to a root the CA trusts any more, typically after
    /// `rotate root finish --force`). Renewing with that certificate can
    /// never succeed.
    #[error(
        "the CA at {addr} rejected our client certificate in the TLS handshake (alert {alert}): \
         it no longer trusts the root the certificate chains to"
    )]
    ClientCertRejected { addr: String, alert: String },
    #[error("the CA refused: {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the CA: {0}")]
    Protocol(String),
    /// Every endpoint of every configured URL was tried and none answered.
    #[error("no CA endpoint answered; tried {}", list_attempts(.0))]
    AllFailed(Vec<Attempt>),
}

impl ClientError {
    /// The API error code when the CA answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether another endpoint (replica) may do better: this one could
    /// not be reached (connection, TLS, timeout) or answered a server
    /// error (5xx: `store_unavailable`, `signing_key_unavailable`). A
    /// refusal (4xx) or a rejection of the client certificate is the CA's
    /// answer, the same from every replica.
    pub fn fails_over(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } | ClientError::AllFailed(_) => true,
            ClientError::Refused { status, .. } => *status >= 500,
            ClientError::BadUrl(_)
            | ClientError::ClientCertRejected { .. }
            | ClientError::Protocol(_) => false,
        }
    }
}

/// The TLS alert in `e` (or its sources) by which a server refused the
/// client certificate presented. Alerts about anything else (and errors
/// that are no alert) give None.
fn client_cert_alert(e: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    use rustls::AlertDescription as A;
    if let Some(rustls::Error::AlertReceived(a)) = e.downcast_ref::<rustls::Error>() {
        return matches!(
            a,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::CertificateRequired
        )
        .then_some(*a);
    }
    // io::Error's own source() skips the error it wraps; look at it too.
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if let Some(a) = client_cert_alert(inner) {
            return Some(a);
        }
    }
    e.source().and_then(client_cert_alert)
}

/// Classifies a connection failure: a rejection of the client certificate
/// (only when one was `presented`) or the CA being unreachable.
fn connection_error(
    addr: &str,
    presented: bool,
    e: &(dyn std::error::Error + 'static),
    msg: String,
) -> ClientError {
    match client_cert_alert(e).filter(|_| presented) {
        Some(alert) => ClientError::ClientCertRejected {
            addr: addr.to_owned(),
            alert: format!("{alert:?}"),
        },
        None => ClientError::Unreachable {
            addr: addr.to_owned(),
            msg,
        },
    }
}

/// A newly issued SVID with the bundle current at issuance.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub spiffe_id: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub bundle: Vec<CertificateDer<'static>>,
    pub spiffe_sequence: u64,
    /// The CA endpoint that issued it.
    pub endpoint: Option<Endpoint>,
}

/// The trust bundle as `/v1/bundle` serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleDocument {
    /// The roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// The SPIFFE `spiffe_sequence` (None when the CA answered PEM only).
    pub spiffe_sequence: Option<u64>,
}

impl BundleDocument {
    /// Reads an answer of `/v1/bundle`: the SPIFFE JSON document asked for,
    /// or PEM from a server that ignores `Accept` (no sequence then).
    pub fn parse(body: &[u8]) -> Result<BundleDocument, ClientError> {
        let bad = |e: String| ClientError::Protocol(format!("bundle: {e}"));
        let text = std::str::from_utf8(body).map_err(|e| bad(e.to_string()))?;
        if !text.trim_start().starts_with('{') {
            let roots = keys::certs_from_pem(body).map_err(|e| bad(e.to_string()))?;
            return Ok(BundleDocument {
                roots,
                spiffe_sequence: None,
            });
        }
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let roots = crate::bundle::roots_from_spiffe_json(text).map_err(bad)?;
        if roots.is_empty() {
            return Err(bad("no x509-svid root in the document".into()));
        }
        Ok(BundleDocument {
            roots,
            spiffe_sequence: v["spiffe_sequence"].as_u64(),
        })
    }
}

/// Presents one certificate as the TLS client identity.
#[derive(Debug)]
struct Presents(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// One configured CA URL, parsed.
#[derive(Debug, Clone)]
struct Target {
    /// As configured, without a trailing slash: `https://host:port`.
    url: String,
    /// `host:port`: what is resolved, and the `Host` header.
    authority: String,
    /// The host alone, for SNI.
    host: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, ClientError> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| ClientError::BadUrl(url.into()))?;
        let authority = rest.trim_end_matches('/').to_owned();
        if authority.is_empty() || authority.contains('/') {
            return Err(ClientError::BadUrl(url.into()));
        }
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h.trim_matches(['[', ']']).to_owned(),
            _ => return Err(ClientError::BadUrl(url.into())),
        };
        if ServerName::try_from(host.clone()).is_err() {
            return Err(ClientError::BadUrl(url.into()));
        }
        Ok(Target {
            url: format!("https://{authority}"),
            authority,
            host,
        })
    }
}

/// One address of one configured CA URL: where an attempt goes. A URL
/// whose host resolves to several addresses (a Kubernetes headless
/// Service) is as many endpoints, resolved again at every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as configured (`https://host:port`).
    pub url: String,
    /// The address its host resolved to.
    pub addr: SocketAddr,
    /// `host:port` of the URL (the `Host` header).
    authority: String,
    /// The URL's host (SNI).
    host: String,
}

impl Endpoint {
    fn new(target: &Target, addr: SocketAddr) -> Endpoint {
        Endpoint {
            url: target.url.clone(),
            addr,
            authority: target.authority.clone(),
            host: target.host.clone(),
        }
    }

    /// Whether the URL names the address itself (no name to resolve).
    fn literal(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().ok() == Some(self.addr.ip())
    }

    /// How errors name it: `host:port`, with the address a name resolved
    /// to in parentheses.
    fn label(&self) -> String {
        if self.literal() {
            self.authority.clone()
        } else {
            format!("{} ({})", self.authority, self.addr)
        }
    }
}

impl std::fmt::Display for Endpoint {
    /// The URL, with the address a name resolved to in parentheses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.literal() {
            f.write_str(&self.url)
        } else {
            write!(f, "{} ({})", self.url, self.addr)
        }
    }
}

/// One endpoint's failure in a call that went on to the next.
#[derive(Debug)]
pub struct Attempt {
    /// The endpoint (or, when its name did not resolve, the URL).
    pub endpoint: String,
    /// What went wrong there.
    pub error: ClientError,
}

fn list_attempts(tried: &[Attempt]) -> String {
    tried
        .iter()
        .map(|a| format!("{}: {}", a.endpoint, a.error))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Told about every endpoint a call tries, for metrics and logs.
pub trait EndpointObserver: Send + Sync {
    /// `from` failed with `error` (unreachable, or a 5xx) and the call goes
    /// on to the next endpoint. `op` is `bootstrap`, `renew`, `bundle` or
    /// `connect`.
    fn failed_over(&self, op: &'static str, from: &str, error: &ClientError);
    /// `by` answered `op` (a certificate, a bundle, or a refusal).
    fn answered(&self, _op: &'static str, _by: &Endpoint) {}
}

/// Time allowed to connect to one endpoint (TCP, TLS and HTTP handshakes)
/// when there are others to fail over to: short, so that a blackholed
/// replica costs a fraction of a short-lived certificate's renewal margin.
pub const FAILOVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The endpoints in the order to try them: as listed (and as resolved),
/// starting from the one that last answered (or, when its address is gone,
/// the first address of its URL), then wrapping around.
pub fn order(mut endpoints: Vec<Endpoint>, last_good: Option<&Endpoint>) -> Vec<Endpoint> {
    let start = last_good
        .and_then(|g| {
            endpoints
                .iter()
                .position(|e| e == g)
                .or_else(|| endpoints.iter().position(|e| e.url == g.url))
        })
        .unwrap_or(0);
    endpoints.rotate_left(start);
    endpoints
}

/// Talks to a CA made of one or several servers (`keyproof-ca serve`
/// replicas): every call tries the endpoints in [`order`], going on to the
/// next when one cannot be reached (connection, TLS, timeout) or answers a
/// server error (5xx: `store_unavailable`, `signing_key_unavailable`); a
/// refusal (4xx) or a rejection of the client certificate is the CA's
/// answer and is returned as is. Clones share which endpoint answered last.
#[derive(Clone)]
pub struct CaClient {
    targets: Arc<[Target]>,
    verifier: SharedVerifier,
    server_id: IdPattern,
    last_good: Arc<std::sync::Mutex<Option<Endpoint>>>,
    observer: Option<Arc<dyn EndpointObserver>>,
    connect_timeout: Duration,
    answer_timeout: Duration,
}

impl CaClient {
    /// `url` is `https://host:port`; `verifier` holds the trust bundle used to
    /// authenticate the server, whose SPIFFE ID must match `server_id`.
    pub fn new(
        url: &str,
        verifier: SharedVerifier,
        server_id: IdPattern,
    ) -> Result<Self, ClientError> {
        Self::with_urls(&[url], verifier, server_id)
    }

    /// A client for several CA URLs (each `https://host:port`), tried in
    /// order with failover. At least one is needed.
    pub fn with_urls<S: AsRef<str>>(
        urls: &[S],
        verifier: SharedVerifier,
        server_id: IdPattern,
    ) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::BadUrl(String::new()));
        }
        let targets = urls
            .iter()
            .map(|u| Target::parse(u.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CaClient {
            targets: targets.into(),
            verifier,
            server_id,
            last_good: Arc::default(),
            observer: None,
            connect_timeout: FAILOVER_CONNECT_TIMEOUT,
            answer_timeout: TIMEOUT,
        })
    }

    /// Reports failovers and answers to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn EndpointObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The time allowed to connect to one endpoint when there are others
    /// ([`FAILOVER_CONNECT_TIMEOUT`] by default; a lone endpoint gets
    /// the full request timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The time allowed for an answer once connected (10 s by default).
    /// The renewer shortens it for a short-lived certificate, so that a
    /// replica that accepts connections but does not answer cannot use up
    /// the certificate's remaining life before the next endpoint is tried.
    pub fn with_answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout;
        self
    }

    /// The URLs configured, in order.
    pub fn urls(&self) -> Vec<String> {
        self.targets.iter().map(|t| t.url.clone()).collect()
    }

    /// The endpoint that answered last (None before any answer).
    pub fn last_endpoint(&self) -> Option<Endpoint> {
        self.last_good
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn tls_config(&self, identity: Option<Arc<CertifiedKey>>) -> rustls::ClientConfig {
        let builder =
            rustls::ClientConfig::builder_with_provider(keyproof_identity::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 is supported by the aws-lc-rs provider")
                .dangerous()
                .with_custom_certificate_verifier(SvidServerVerifier::new(
                    Shared(self.verifier.clone()),
                    self.server_id.clone(),
                ));
        let mut cfg = match identity {
            Some(ck) => builder.with_client_cert_resolver(Arc::new(Presents(ck))),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg
    }

    /// Every endpoint of every URL, resolved now, in the order to try
    /// them; and the URLs that did not resolve, as failed attempts.
    async fn endpoints(&self) -> (Vec<Endpoint>, Vec<Attempt>) {
        let mut found: Vec<Endpoint> = Vec::new();
        let mut failed = Vec::new();
        for t in self.targets.iter() {
            let unresolved = |msg: String| Attempt {
                endpoint: t.url.clone(),
                error: ClientError::Unreachable {
                    addr: t.authority.clone(),
                    msg,
                },
            };
            let lookup = tokio::net::lookup_host(t.authority.as_str());
            match tokio::time::timeout(TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => {
                    let before = found.len();
                    for addr in addrs {
                        let ep = Endpoint::new(t, addr);
                        if !found.contains(&ep) {
                            found.push(ep);
                        }
                    }
                    if found.len() == before {
                        failed.push(unresolved(format!("{} resolves to no address", t.host)));
                    }
                }
                Ok(Err(e)) => failed.push(unresolved(format!("cannot resolve {}: {e}", t.host))),
                Err(_) => failed.push(unresolved(format!(
                    "resolving {} took longer than {TIMEOUT:?}",
                    t.host
                ))),
            }
        }
        let last = self.last_endpoint();
        (order(found, last.as_ref()), failed)
    }

    /// Runs `attempt` on each endpoint in order until one answers (see
    /// [`CaClient`]); returns its answer and which endpoint gave it.
    async fn each<T, F, Fut>(&self, op: &'static str, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut(Endpoint, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let (endpoints, mut tried) = self.endpoints().await;
        let connect_timeout = if endpoints.len() + tried.len() > 1 {
            self.connect_timeout
        } else {
            TIMEOUT
        };
        if !endpoints.is_empty() {
            if let Some(o) = &self.observer {
                for a in &tried {
                    o.failed_over(op, &a.endpoint, &a.error);
                }
            }
        }
        let n = endpoints.len();
        for (i, ep) in endpoints.into_iter().enumerate() {
            match attempt(ep.clone(), connect_timeout).await {
                Err(e) if e.fails_over() => {
                    if i + 1 < n {
                        if let Some(o) = &self.observer {
                            o.failed_over(op, &ep.to_string(), &e);
                        }
                    }
                    tried.push(Attempt {
                        endpoint: ep.to_string(),
                        error: e,
                    });
                }
                answer => {
                    *self.last_good.lock().unwrap_or_else(|p| p.into_inner()) = Some(ep.clone());
                    if let Some(o) = &self.observer {
                        o.answered(op, &ep);
                    }
                    return answer;
                }
            }
        }
        Err(match tried.len() {
            1 => tried.remove(0).error,
            _ => ClientError::AllFailed(tried),
        })
    }

    /// Opens a mutual-TLS connection (HTTP/1.1, kept alive) to `ep`,
    /// presenting `identity` if given.
    async fn connect_to(
        &self,
        ep: Endpoint,
        identity: Option<Arc<CertifiedKey>>,
        timeout: Duration,
    ) -> Result<Session, ClientError> {
        let label = ep.label();
        let unreachable = |msg: String| ClientError::Unreachable {
            addr: label.clone(),
            msg,
        };
        let presented = identity.is_some();
        let fut = async {
            let tcp = tokio::net::TcpStream::connect(ep.addr)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(ep.host.clone())
                .map_err(|_| ClientError::BadUrl(ep.url.clone()))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(self.tls_config(identity)))
                .connect(name, tcp)
                .await
                .map_err(|e| connection_error(&label, presented, &e, format!("TLS: {e}")))?;
            let group = tls
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name());
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(conn);
            Ok(Session {
                sender,
                answer_timeout: self.answer_timeout,
                label: label.clone(),
                endpoint: ep.clone(),
                group,
                presented,
            })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
    }

    /// Opens a mutual-TLS connection (HTTP/1.1, kept alive) presenting
    /// `identity` if given, to the first endpoint that accepts it.
    pub async fn connect(
        &self,
        identity: Option<Arc<CertifiedKey>>,
    ) -> Result<Session, ClientError> {
        self.each("connect", |ep, t| self.connect_to(ep, identity.clone(), t))
            .await
    }

    /// One request on a fresh connection to each endpoint in turn, until
    /// one answers; `read` turns the answer into the result (an error
    /// that [`ClientError::fails_over`] moves on to the next endpoint).
    async fn call<T>(
        &self,
        op: &'static str,
        identity: Option<Arc<CertifiedKey>>,
        req: Call<'_>,
        read: impl Fn(StatusCode, &[u8], &Endpoint) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        self.each(op, |ep, t| {
            let (identity, method, body) = (identity.clone(), req.method.clone(), req.body.clone());
            let read = &read;
            async move {
                let mut session = self.connect_to(ep, identity, t).await?;
                let (status, answer) = session.send(method, req.path, req.headers, body).await?;
                read(status, &answer, &session.endpoint)
            }
        })
        .await
    }

    fn issued(status: StatusCode, body: &[u8], by: &Endpoint) -> Result<IssuedSvid, ClientError> {
        let v: serde_json::Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            // A proxy or load balancer in front of a replica answers its
            // own errors: a server error still fails over.
            Err(_) if status.is_server_error() => return Err(server_error(status)),
            Err(e) => {
                return Err(ClientError::Protocol(format!("{status}: not JSON: {e}")));
            }
        };
        if !status.is_success() {
            return Err(ClientError::Refused {
                status: status.as_u16(),
                code: v["error"].as_str().unwrap_or("unknown").to_owned(),
                message: v["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        let pem = |k: &str| {
            keys::certs_from_pem(v[k].as_str().unwrap_or_default().as_bytes())
                .map_err(|e| ClientError::Protocol(format!("{k}: {e}")))
        };
        Ok(IssuedSvid {
            spiffe_id: v["spiffe_id"].as_str().unwrap_or_default().to_owned(),
            chain: pem("chain_pem")?,
            bundle: pem("bundle_pem")?,
            spiffe_sequence: v["spiffe_sequence"].as_u64().unwrap_or(0),
            endpoint: Some(by.clone()),
        })
    }

    /// Exchanges a join token and a CSR for a first SVID.
    pub async fn bootstrap(&self, token: &str, csr_pem: &str) -> Result<IssuedSvid, ClientError> {
        self.bootstrap_for(token, csr_pem, None).await
    }

    /// Exchanges a credential (a join token or a ServiceAccount token) and a
    /// CSR for an SVID; with `spiffe_id`, the CA refuses (`id_mismatch`) a
    /// credential for any other identity.
    ///
    /// Failing over with a join token is safe: a replica spends the token
    /// only once it hands out the certificate, so one that failed (or was
    /// not reached) left it usable for the next.
    pub async fn bootstrap_for(
        &self,
        token: &str,
        csr_pem: &str,
        spiffe_id: Option<&str>,
    ) -> Result<IssuedSvid, ClientError> {
        // A SPIFFE ID is made of characters a query may hold as they are
        // (RFC 3986 allows `:` and `/` there); the CA reads it unescaped.
        let path = match spiffe_id {
            Some(id) => format!("/v1/bootstrap?spiffe_id={id}"),
            None => "/v1/bootstrap".to_owned(),
        };
        self.call(
            "bootstrap",
            None,
            Call {
                method: Method::POST,
                path: &path,
                headers: &[
                    (header::AUTHORIZATION, format!("Bearer {}", token.trim())),
                    (header::CONTENT_TYPE, "application/pkcs10".into()),
                ],
                body: Bytes::from(csr_pem.to_owned()),
            },
            Self::issued,
        )
        .await
    }

    /// Renews: authenticates with `current` and gets an SVID for a new key.
    pub async fn renew(
        &self,
        current: Arc<CertifiedKey>,
        csr_pem: &str,
    ) -> Result<IssuedSvid, ClientError> {
        self.call(
            "renew",
            Some(current),
            Call {
                method: Method::POST,
                path: "/v1/renew",
                headers: &[(header::CONTENT_TYPE, "application/pkcs10".into())],
                body: Bytes::from(csr_pem.to_owned()),
            },
            Self::issued,
        )
        .await
    }

    /// The current trust bundle (PEM roots).
    pub async fn bundle(&self) -> Result<Vec<CertificateDer<'static>>, ClientError> {
        self.call(
            "bundle",
            None,
            Call {
                method: Method::GET,
                path: "/v1/bundle",
                headers: &[],
                body: Bytes::new(),
            },
            |status, body, _| {
                bundle_status(status)?;
                keys::certs_from_pem(body)
                    .map_err(|e| ClientError::Protocol(format!("bundle: {e}")))
            },
        )
        .await
    }

    /// The current trust bundle with its `spiffe_sequence`, asked for as
    /// SPIFFE JSON (read as PEM if the server answers that instead).
    pub async fn bundle_document(&self) -> Result<BundleDocument, ClientError> {
        self.call(
            "bundle",
            None,
            Call {
                method: Method::GET,
                path: "/v1/bundle",
                headers: &[(header::ACCEPT, "application/json".into())],
                body: Bytes::new(),
            },
            |status, body, _| {
                bundle_status(status)?;
                BundleDocument::parse(body)
            },
        )
        .await
    }
}

/// One API request, sent to each endpoint in turn.
struct Call<'a> {
    method: Method,
    path: &'a str,
    headers: &'a [(header::HeaderName, String)],
    body: Bytes,
}

/// A server error whose body is not the CA's JSON (a proxy in front).
fn server_error(status: StatusCode) -> ClientError {
    ClientError::Refused {
        status: status.as_u16(),
        code: "server_error".into(),
        message: status.canonical_reason().unwrap_or_default().to_owned(),
    }
}

/// A bundle answer's status: a server error fails over, anything else
/// but success is the CA's answer.
fn bundle_status(status: StatusCode) -> Result<(), ClientError> {
    if status.is_server_error() {
        return Err(server_error(status));
    }
    if !status.is_success() {
        return Err(ClientError::Protocol(format!("bundle: {status}")));
    }
    Ok(())
}

/// A kept-alive connection to the CA.
pub struct Session {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    answer_timeout: Duration,
    /// How errors name the endpoint.
    label: String,
    endpoint: Endpoint,
    group: Option<rustls::NamedGroup>,
    /// A client certificate was presented: in TLS 1.3 the server's
    /// rejection of it arrives after the client's handshake is done, as an
    /// alert on the first read.
    presented: bool,
}

impl Session {
    /// The key-exchange group the handshake negotiated (X25519MLKEM768 with
    /// a keyproof server).
    pub fn key_exchange_group(&self) -> Option<rustls::NamedGroup> {
        self.group
    }

    /// The endpoint this connection goes to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let broken = |msg: String| ClientError::Unreachable {
            addr: self.label.clone(),
            msg,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.endpoint.authority);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let fut = async {
            let resp =
                self.sender.send_request(req).await.map_err(|e| {
                    connection_error(&self.label, self.presented, &e, e.to_string())
                })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        let limit = self.answer_timeout;
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| broken(format!("no answer within {limit:?}")))?
    }

    /// Renews on this connection (its client certificate names the identity).
    pub async fn renew(&mut self, csr_pem: &str) -> Result<IssuedSvid, ClientError> {
        let (status, body) = self
            .send(
                Method::POST,
                "/v1/renew",
                &[(header::CONTENT_TYPE, "application/pkcs10".into())],
                Bytes::from(csr_pem.to_owned()),
            )
            .await?;
        CaClient::issued(status, &body, &self.endpoint)
    }
}

/// A fresh key pair and its CSR, for bootstrap and renewal.
pub struct NewKey {
    /// PEM CSR to send.
    pub csr_pem: String,
    /// The private key, for building the certified key once issued.
    pub key_der: PrivateKeyDer<'static>,
}

/// Generates a key of `key_type` in memory and a CSR for it.
pub fn new_key(key_type: keys::KeyType, spiffe_id: &str) -> Result<NewKey, ClientError> {
    let kp = key_type
        .generate()
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let csr_pem =
        crate::csr::build_pem(&kp, spiffe_id).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let key_der = PrivateKeyDer::try_from(kp.serialize_der())
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    Ok(NewKey { csr_pem, key_der })
}

/// The workload key a certificate is requested for and then used with:
/// generated in process memory for one issuance, or held in a PKCS#11 token
/// and reused for every issuance (the token never hands it out, so a new
/// one per renewal would only fill the token).
#[derive(Debug)]
pub enum IssuedKey {
    /// A key generated in memory ([`new_key`]); never written anywhere.
    Memory(PrivateKeyDer<'static>),
    /// A key in a PKCS#11 token; every signature is made by the token.
    Pkcs11(Pkcs11Key),
}

impl IssuedKey {
    /// A copy of the handle (the in-memory key's bytes are copied; the
    /// token key is shared).
    pub fn clone_key(&self) -> IssuedKey {
        match self {
            IssuedKey::Memory(k) => IssuedKey::Memory(k.clone_key()),
            IssuedKey::Pkcs11(k) => IssuedKey::Pkcs11(k.clone()),
        }
    }
}

/// A private key rustls can sign TLS handshakes with, wherever it lives.
pub trait TlsKey {
    /// The key as rustls signs with it.
    fn tls_signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, ClientError>;
    /// The DER SubjectPublicKeyInfo, when known without asking rustls
    /// (keys outside the process: rustls cannot always tell it).
    fn spki_der(&self) -> Option<&[u8]> {
        None
    }
}

impl TlsKey for PrivateKeyDer<'_> {
    fn tls_signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, ClientError> {
        rustls::crypto::aws_lc_rs::sign::any_supported_type(self)
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

impl TlsKey for Pkcs11Key {
    fn tls_signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, ClientError> {
        Ok(self.rustls_signing_key())
    }
    fn spki_der(&self) -> Option<&[u8]> {
        Some(keys::ExternalKey::spki_der(self))
    }
}

impl TlsKey for IssuedKey {
    fn tls_signing_key(&self) -> Result<Arc<dyn rustls::sign::SigningKey>, ClientError> {
        match self {
            IssuedKey::Memory(k) => k.tls_signing_key(),
            IssuedKey::Pkcs11(k) => k.tls_signing_key(),
        }
    }
    fn spki_der(&self) -> Option<&[u8]> {
        match self {
            IssuedKey::Memory(k) => k.spki_der(),
            IssuedKey::Pkcs11(k) => TlsKey::spki_der(k),
        }
    }
}

/// The DER SubjectPublicKeyInfo of a certificate (None when it does not
/// parse).
pub fn cert_spki(cert: &[u8]) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.tbs_certificate.subject_pki.raw.to_vec())
}

/// Builds a rustls certified key from an issued chain and its private key
/// (in memory or in a token).
pub fn certified_key<K: TlsKey + ?Sized>(
    chain: Vec<CertificateDer<'static>>,
    key: &K,
) -> Result<CertifiedKey, ClientError> {
    let signing = key.tls_signing_key()?;
    let ck = CertifiedKey::new(chain, signing);
    match key.spki_der() {
        // A key outside the process is compared by its public key, which
        // does not depend on what its rustls adapter can report.
        Some(spki) => {
            let leaf = ck
                .cert
                .first()
                .ok_or_else(|| ClientError::Protocol("empty chain".into()))?;
            if cert_spki(leaf).as_deref() != Some(spki) {
                return Err(ClientError::Protocol(
                    "issued certificate does not match the key: public keys differ".into(),
                ));
            }
        }
        None => ck.keys_match().map_err(|e| {
            ClientError::Protocol(format!("issued certificate does not match the key: {e}"))
        })?,
    }
    Ok(ck)
}

/// A CSR for the token key `key`, signed in the token. Blocking (one
/// PKCS#11 signature): call it from a blocking thread.
pub fn token_csr(key: &Pkcs11Key, spiffe_id: &str) -> Result<String, ClientError> {
    crate::csr::build_pem(key, spiffe_id).map_err(|e| match e {
        rcgen::Error::RemoteKeyError => ClientError::Protocol(format!(
            "the CSR could not be signed by {}: the token refused or is unavailable",
            key.uri()
        )),
        other => ClientError::Protocol(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> CertificateDer<'static> {
        let kp = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.self_signed(&kp).expect("self-signed").der().clone()
    }

    #[test]
    fn a_bundle_document_is_read_from_spiffe_json_with_its_sequence() {
        let roots = vec![root("a"), root("b")];
        let json = crate::bundle::spiffe_json(
            crate::bundle::Meta {
                sequence: 7,
                refresh_hint_secs: 300,
            },
            &roots,
        );
        let doc = BundleDocument::parse(json.as_bytes()).expect("document");
        assert_eq!(doc.roots, roots);
        assert_eq!(doc.spiffe_sequence, Some(7));
    }

    #[test]
    fn a_pem_bundle_has_no_sequence() {
        let roots = vec![root("a")];
        let pem: String = roots.iter().map(|c| keys::cert_pem(c)).collect();
        let doc = BundleDocument::parse(pem.as_bytes()).expect("document");
        assert_eq!(doc.roots, roots);
        assert_eq!(doc.spiffe_sequence, None);
    }

    #[test]
    fn a_bundle_document_without_roots_or_not_json_is_a_protocol_error() {
        for body in [
            &b"{\"keys\": [], \"spiffe_sequence\": 3}"[..],
            b"{not json",
            b"\xff\xfe",
        ] {
            let e = BundleDocument::parse(body).unwrap_err();
            assert!(matches!(e, ClientError::Protocol(_)), "{e}");
        }
    }

    #[test]
    fn a_certificate_alert_from_the_server_is_a_client_cert_rejection() {
        use rustls::AlertDescription as A;
        let wrapped = |a: A| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(a),
            )
        };
        for a in [A::UnknownCA, A::BadCertificate, A::CertificateUnknown] {
            let e = connection_error("ca:8443", true, &wrapped(a), "x".into());
            assert!(
                matches!(e, ClientError::ClientCertRejected { .. }),
                "{a:?}: {e}"
            );
            assert!(e.to_string().contains(&format!("{a:?}")), "{e}");
            // Without a certificate presented, it cannot be about ours.
            let e = connection_error("ca:8443", false, &wrapped(a), "x".into());
            assert!(matches!(e, ClientError::Unreachable { .. }), "{a:?}: {e}");
        }
        for other in [
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(A::HandshakeFailure),
            ),
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"),
        ] {
            let e = connection_error("ca:8443", true, &other, "x".into());
            assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
        }
    }

    #[test]
    fn only_a_refusal_has_a_code() {
        let refused = ClientError::Refused {
            status: 401,
            code: "client_certificate_expired".into(),
            message: String::new(),
        };
        assert_eq!(refused.code(), Some("client_certificate_expired"));
        assert_eq!(ClientError::Protocol("x".into()).code(), None);
    }

    fn ep(url: &str, addr: &str) -> Endpoint {
        Endpoint::new(
            &Target::parse(url).expect("url"),
            addr.parse().expect("addr"),
        )
    }

    #[test]
    fn endpoints_are_tried_from_the_last_that_answered_then_around() {
        let a = ep("https://127.0.0.1:1", "127.0.0.1:1");
        let b1 = ep("https://ca.svc:8443", "10.0.0.1:8443");
        let b2 = ep("https://ca.svc:8443", "10.0.0.2:8443");
        let c = ep("https://127.0.0.3:3", "127.0.0.3:3");
        let all = vec![a.clone(), b1.clone(), b2.clone(), c.clone()];
        // No answer yet: as listed.
        assert_eq!(order(all.clone(), None), all);
        assert_eq!(order(all.clone(), Some(&a)), all);
        // Sticks to the one that answered last, and wraps around.
        assert_eq!(
            order(all.clone(), Some(&b2)),
            vec![b2.clone(), c.clone(), a.clone(), b1.clone()]
        );
        assert_eq!(
            order(all.clone(), Some(&c)),
            vec![c.clone(), a.clone(), b1.clone(), b2.clone()]
        );
        // Its address gone (a replaced pod): the first address of its URL.
        let gone = ep("https://ca.svc:8443", "10.0.0.9:8443");
        assert_eq!(
            order(all.clone(), Some(&gone)),
            vec![b1.clone(), b2.clone(), c.clone(), a.clone()]
        );
        // Its URL gone from the list: from the top.
        let other = ep("https://127.0.0.9:9", "127.0.0.9:9");
        assert_eq!(order(all.clone(), Some(&other)), all);
        assert_eq!(order(Vec::new(), Some(&a)), Vec::<Endpoint>::new());
    }

    #[test]
    fn an_endpoint_names_the_address_its_name_resolved_to() {
        assert_eq!(
            ep("https://127.0.0.1:1/", "127.0.0.1:1").to_string(),
            "https://127.0.0.1:1"
        );
        assert_eq!(
            ep("https://ca.svc:8443", "10.0.0.1:8443").to_string(),
            "https://ca.svc:8443 (10.0.0.1:8443)"
        );
        assert_eq!(
            ep("https://ca.svc:8443", "10.0.0.1:8443").label(),
            "ca.svc:8443 (10.0.0.1:8443)"
        );
    }

    #[test]
    fn only_unreachable_endpoints_and_server_errors_fail_over() {
        let refused = |status: u16, code: &str| ClientError::Refused {
            status,
            code: code.into(),
            message: String::new(),
        };
        for e in [
            ClientError::Unreachable {
                addr: "ca:8443".into(),
                msg: "refused".into(),
            },
            refused(503, "store_unavailable"),
            refused(503, "signing_key_unavailable"),
            refused(502, "server_error"),
        ] {
            assert!(e.fails_over(), "{e}");
        }
        for e in [
            refused(401, "token_reused"),
            refused(403, "id_mismatch"),
            refused(429, "rate_limited"),
            ClientError::ClientCertRejected {
                addr: "ca:8443".into(),
                alert: "UnknownCA".into(),
            },
            ClientError::Protocol("x".into()),
        ] {
            assert!(!e.fails_over(), "{e}");
        }
    }

    #[test]
    fn a_list_of_urls_is_checked_whole() {
        let v = || {
            Arc::new(arc_swap::ArcSwap::from_pointee(
                keyproof_identity::verify::SvidVerifier::new(
                    keyproof_identity::spiffe::TrustDomain::parse("td").expect("td"),
                    keyproof_identity::verify::TrustBundle::new(vec![root("r")]).expect("bundle"),
                ),
            ))
        };
        let id = || IdPattern::parse("spiffe://td/keyproof-ca").expect("pattern");
        let c = CaClient::with_urls(&["https://a:1/", "https://b:2"], v(), id()).expect("client");
        assert_eq!(c.urls(), ["https://a:1", "https://b:2"]);
        assert!(c.last_endpoint().is_none());
        for bad in [&["https://a:1", "http://b:2"][..], &[]] {
            let e = CaClient::with_urls(bad, v(), id()).map(|_| ()).unwrap_err();
            assert!(matches!(e, ClientError::BadUrl(_)), "{e}");
        }
    }

    #[tokio::test]
    async fn with_every_endpoint_down_the_error_names_each() {
        let closed = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let urls = [
            format!("https://127.0.0.1:{}", closed()),
            format!("https://127.0.0.1:{}", closed()),
        ];
        let c = CaClient::with_urls(
            &urls,
            Arc::new(arc_swap::ArcSwap::from_pointee(
                keyproof_identity::verify::SvidVerifier::new(
                    keyproof_identity::spiffe::TrustDomain::parse("td").expect("td"),
                    keyproof_identity::verify::TrustBundle::new(vec![root("r")]).expect("bundle"),
                ),
            )),
            IdPattern::parse("spiffe://td/keyproof-ca").expect("pattern"),
        )
        .expect("client");
        let e = c.bundle().await.unwrap_err();
        assert!(
            matches!(e, ClientError::AllFailed(ref t) if t.len() == 2),
            "{e}"
        );
        for u in &urls {
            assert!(e.to_string().contains(u.as_str()), "{e}");
        }
        assert!(e.fails_over());
        assert!(c.last_endpoint().is_none());
    }
}
