//! `keyproof-ca serve`: the renewal API over mutual TLS.
//!
//! - `POST /v1/renew`: the caller's current SVID (verified in the handshake)
//!   names the identity; the body is a CSR; the answer is a new SVID for that
//!   identity only.
//! - `POST /v1/bootstrap`: `Authorization: Bearer <join token>` and a CSR; the
//!   token is single-use, expiring and bound to one identity.
//! - `GET /v1/bundle`: the trust bundle, SPIFFE JSON when `Accept` asks for
//!   JSON, PEM otherwise.
//!
//! The server picks up rotations by watching the CA directory (a cheap
//! metadata check at most once a second), reissues its own certificate from
//! the current chain, and appends to the ledger with group commit: one fsync
//! covers every issuance that arrived while the previous one ran.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keyproof_identity::spiffe::SpiffeId;
use keyproof_identity::tls::{Shared, SharedVerifier, SvidClientVerifier};
use keyproof_identity::verify::{SvidVerifier, TrustBundle, VerifiedSvid};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::ca::{files, Ca, CaError};
use crate::csr::{self, SubjectKey};
use crate::issue::{IssueRequest, Issued};
use crate::ledger;
use crate::token::{TokenError, TokenStore};

/// Largest accepted request body (a CSR is well under 2 KiB).
const MAX_BODY: usize = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 4096;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    /// The server's own SPIFFE ID (default `spiffe://<td>/keyproof-ca`).
    pub server_id: Option<SpiffeId>,
    /// DNS SANs for the server's certificate (e.g. the Service name).
    pub dns: Vec<String>,
    /// Lifetime of issued SVIDs.
    pub ttl: Duration,
    /// Issuances allowed per identity per minute (0 = unlimited).
    pub per_identity_per_minute: u32,
}

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Ca(#[from] CaError),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// An API error: status, stable code, message.
struct ApiError(StatusCode, &'static str, String);

impl ApiError {
    fn response(self) -> Response<Full<Bytes>> {
        let body = json!({"error": self.1, "message": self.2}).to_string();
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = self.0;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        if self.0 == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        }
        r
    }
}

fn ca_error(e: CaError) -> ApiError {
    match e {
        CaError::Csr(c) => ApiError(StatusCode::BAD_REQUEST, c.code(), c.to_string()),
        e @ (CaError::ForeignTrustDomain { .. }
        | CaError::NotAWorkloadId(_)
        | CaError::SpiffeId(_)) => ApiError(StatusCode::FORBIDDEN, "id_not_allowed", e.to_string()),
        e => {
            tracing::error!(error = %e, "issuance failed");
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "ca_unavailable",
                e.to_string(),
            )
        }
    }
}

/// The state reloaded when the CA directory changes.
struct Loaded {
    ca: Ca,
    stamp: Vec<Option<SystemTime>>,
}

fn stamp(dir: &Path) -> Vec<Option<SystemTime>> {
    [
        files::STATE,
        files::INT_CRT,
        files::BUNDLE_PEM,
        files::ROOT_CRT,
    ]
    .iter()
    .map(|f| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    })
    .collect()
}

/// Ledger writes with group commit.
#[derive(Clone)]
struct LedgerWriter {
    tx: mpsc::Sender<(ledger::Entry, oneshot::Sender<Result<(), String>>)>,
}

impl LedgerWriter {
    fn start(dir: PathBuf) -> LedgerWriter {
        let (tx, mut rx) =
            mpsc::channel::<(ledger::Entry, oneshot::Sender<Result<(), String>>)>(4096);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Let the tasks already runnable go first: under load some of
                // them are about to log an issuance too, and joining this
                // batch saves them an fsync each. When idle this returns at
                // once, so it adds no latency.
                tokio::task::yield_now().await;
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                let entries: Vec<ledger::Entry> = batch.iter().map(|(e, _)| e.clone()).collect();
                let dir = dir.clone();
                let result =
                    tokio::task::spawn_blocking(move || ledger::append_all(&dir, &entries))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                for (_, reply) in batch {
                    let _ = reply.send(result.clone());
                }
            }
        });
        LedgerWriter { tx }
    }

    async fn record(&self, e: ledger::Entry) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((e, tx))
            .await
            .map_err(|_| "ledger writer stopped".to_string())?;
        rx.await.map_err(|_| "ledger writer stopped".to_string())?
    }
}

/// Fixed one-minute windows per identity.
struct RateLimiter {
    per_minute: u32,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl RateLimiter {
    fn allow(&self, id: &str) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if w.len() > 100_000 {
            w.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let slot = w.entry(id.to_owned()).or_insert((now, 0));
        if now.duration_since(slot.0) >= Duration::from_secs(60) {
            *slot = (now, 0);
        }
        slot.1 += 1;
        slot.1 <= self.per_minute
    }
}

/// Serves the server's own certificate, swapped on reissue.
#[derive(Debug)]
struct OwnCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for OwnCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

struct Server {
    opts: ServeOptions,
    loaded: ArcSwap<Loaded>,
    verifier: SharedVerifier,
    own: Arc<OwnCert>,
    own_renew_at: Mutex<Instant>,
    tokens: Mutex<TokenStore>,
    ledger: LedgerWriter,
    limiter: RateLimiter,
    last_check: Mutex<Instant>,
}

fn own_cert(ca: &Ca, opts: &ServeOptions) -> Result<(CertifiedKey, Duration), CaError> {
    let id = match &opts.server_id {
        Some(id) => id.clone(),
        None => SpiffeId::parse(&keyproof_identity::spiffe::ca_server_id(
            ca.trust_domain().as_str(),
        ))?,
    };
    let key = ca.key_type().generate()?;
    let ttl = Duration::from_secs(24 * 3600);
    let issued = ca.sign(
        &IssueRequest {
            spiffe_id: id,
            key: SubjectKey::from_key_pair(&key, ca.key_type()),
            ttl,
            dns: opts.dns.clone(),
        },
        "serve:self",
    )?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| CaError::Rotation(e.to_string()))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| CaError::Rotation(e.to_string()))?;
    Ok((
        CertifiedKey::new(vec![issued.leaf, issued.intermediate], signing),
        ttl * 2 / 3,
    ))
}

fn verifier_for(ca: &Ca) -> Result<SvidVerifier, CaError> {
    let bundle = TrustBundle::new(ca.bundle().to_vec()).map_err(|e| CaError::Corrupt {
        path: ca.dir().join(files::BUNDLE_PEM),
        msg: e.to_string(),
    })?;
    Ok(SvidVerifier::new(ca.trust_domain().clone(), bundle))
}

impl Server {
    /// Reloads the CA when its files changed, and reissues the server's own
    /// certificate when the chain changed or it is due.
    fn refresh(&self) {
        {
            let mut last = self.last_check.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < Duration::from_secs(1) {
                return;
            }
            *last = Instant::now();
        }
        let dir = &self.opts.dir;
        let current = stamp(dir);
        let changed = current != self.loaded.load().stamp;
        if changed {
            match Ca::open(dir).and_then(|ca| Ok((verifier_for(&ca)?, ca))) {
                Ok((v, ca)) => {
                    tracing::info!(
                        sequence = ca.state().spiffe_sequence,
                        "CA directory changed; reloaded"
                    );
                    self.verifier.store(Arc::new(v));
                    self.loaded.store(Arc::new(Loaded { ca, stamp: current }));
                }
                // Mid-rotation files may be briefly inconsistent: keep the
                // previous state and try again on the next request.
                Err(e) => {
                    tracing::warn!(error = %e, "CA directory changed but could not be loaded; keeping the previous state");
                    return;
                }
            }
        }
        let due = Instant::now() >= *self.own_renew_at.lock().unwrap_or_else(|p| p.into_inner());
        if changed || due {
            match own_cert(&self.loaded.load().ca, &self.opts) {
                Ok((ck, renew_in)) => {
                    self.own.0.store(Arc::new(ck));
                    *self.own_renew_at.lock().unwrap_or_else(|p| p.into_inner()) =
                        Instant::now() + renew_in;
                }
                Err(e) => tracing::error!(error = %e, "could not reissue the server certificate"),
            }
        }
    }

    async fn issue(
        &self,
        id: SpiffeId,
        key: SubjectKey,
        requester: String,
    ) -> Result<Issued, ApiError> {
        if !self.limiter.allow(id.as_str()) {
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many issuances for {id}; limit {} per minute",
                    self.limiter.per_minute
                ),
            ));
        }
        let loaded = self.loaded.load();
        let issued = loaded
            .ca
            .sign(
                &IssueRequest {
                    spiffe_id: id,
                    key,
                    ttl: self.opts.ttl,
                    dns: Vec::new(),
                },
                &requester,
            )
            .map_err(ca_error)?;
        self.ledger
            .record(issued.entry.clone())
            .await
            .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, "ledger_unavailable", e))?;
        Ok(issued)
    }

    fn issued_response(&self, issued: &Issued) -> Response<Full<Bytes>> {
        let loaded = self.loaded.load();
        let body = json!({
            "spiffe_id": issued.entry.spiffe_id,
            "serial": issued.entry.serial,
            "not_before": issued.entry.not_before,
            "not_after": issued.entry.not_after,
            "chain_pem": issued.chain_pem(),
            "bundle_pem": loaded.ca.bundle_pem(),
            "spiffe_sequence": loaded.ca.state().spiffe_sequence,
        });
        json_response(StatusCode::OK, body.to_string())
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Option<VerifiedSvid>,
    ) -> Response<Full<Bytes>> {
        self.refresh();
        let (parts, body) = req.into_parts();
        // Read the (bounded) body before answering anything: an answer sent
        // while the client is still sending resets the HTTP/2 stream.
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "bad_request",
                    format!("request body: {e}"),
                )
                .response()
            }
        };
        let path = parts.uri.path();
        let result = match (&parts.method, path) {
            (&Method::GET, "/v1/bundle") => Ok(self.bundle(&parts)),
            (&Method::POST, "/v1/renew") => self.renew(&parts, &body, peer).await,
            (&Method::POST, "/v1/bootstrap") => self.bootstrap(&parts, &body).await,
            (_, "/v1/bundle" | "/v1/renew" | "/v1/bootstrap") => Err(ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {path}", parts.method),
            )),
            _ => Err(ApiError(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint {path}"),
            )),
        };
        result.unwrap_or_else(ApiError::response)
    }

    fn bundle(&self, req: &http::request::Parts) -> Response<Full<Bytes>> {
        let wants_json = req
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("json"));
        let loaded = self.loaded.load();
        if wants_json {
            json_response(StatusCode::OK, loaded.ca.bundle_spiffe_json())
        } else {
            let mut r = Response::new(Full::new(Bytes::from(loaded.ca.bundle_pem())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/x-pem-file"),
            );
            r
        }
    }

    async fn renew(
        &self,
        req: &http::request::Parts,
        body: &[u8],
        peer: Option<VerifiedSvid>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let Some(peer) = peer else {
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "client_certificate_required",
                "renewal needs the caller's current SVID as its TLS client certificate".into(),
            ));
        };
        if crate::ca::now().unix_timestamp() > peer.not_after {
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "client_certificate_expired",
                "the SVID this connection was opened with has expired; bootstrap again".into(),
            ));
        }
        let id = peer.spiffe_id;
        check_requested_id(req, &id)?;
        let key = parse_csr(body)?;
        let issued = self.issue(id.clone(), key, format!("renew:{id}")).await?;
        tracing::info!(spiffe_id = %id, serial = %issued.entry.serial, "renewed");
        Ok(self.issued_response(&issued))
    }

    async fn bootstrap(
        &self,
        req: &http::request::Parts,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let token = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError(
                    StatusCode::UNAUTHORIZED,
                    "missing_token",
                    "bootstrap needs `Authorization: Bearer <join token>`".into(),
                )
            })?;
        let wanted = requested_id(req)?;
        // Check the CSR before spending the token: a bad CSR must not burn it.
        let key = parse_csr(body)?;
        let consumed = {
            let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            tokens.consume(&self.opts.dir, &token, crate::ca::now())
        }
        .map_err(ca_error)?;
        let (token_id, id) = consumed.map_err(|e: TokenError| {
            tracing::warn!(error = %e, "bootstrap refused");
            ApiError(StatusCode::UNAUTHORIZED, e.code(), e.to_string())
        })?;
        if let Some(w) = wanted {
            if w != id {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    "id_mismatch",
                    format!("the token is for {id}, not {w}"),
                ));
            }
        }
        let issued = self
            .issue(id.clone(), key, format!("bootstrap:{token_id}"))
            .await?;
        tracing::info!(spiffe_id = %id, token = %token_id, "bootstrapped");
        Ok(self.issued_response(&issued))
    }
}

/// Identity and expiry of a client certificate the handshake verified (the
/// verifier already applied every SVID rule; only the ID is read here).
fn peer_svid(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Option<VerifiedSvid> {
    let (_, leaf) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    Some(VerifiedSvid {
        spiffe_id: keyproof_identity::svid::spiffe_id_of(&leaf).ok()?,
        spki_sha256: keyproof_identity::keys::sha256(leaf.public_key().raw),
        not_after: leaf.validity().not_after.timestamp(),
    })
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// An optional `?spiffe_id=` the caller asks for.
fn requested_id(req: &http::request::Parts) -> Result<Option<SpiffeId>, ApiError> {
    let Some(q) = req.uri.query() else {
        return Ok(None);
    };
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix("spiffe_id=") {
            return SpiffeId::parse(v).map(Some).map_err(|e| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("spiffe_id: {e}"),
                )
            });
        }
    }
    Ok(None)
}

fn check_requested_id(req: &http::request::Parts, id: &SpiffeId) -> Result<(), ApiError> {
    match requested_id(req)? {
        Some(w) if &w != id => Err(ApiError(
            StatusCode::FORBIDDEN,
            "id_mismatch",
            format!("a renewal is only for the caller's own identity {id}, not {w}"),
        )),
        _ => Ok(()),
    }
}

fn parse_csr(body: &[u8]) -> Result<SubjectKey, ApiError> {
    let der = csr::decode(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    csr::verify(&der).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.code(), e.to_string()))
}

/// Runs the server until `shutdown` resolves.
pub async fn run(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let ca = Ca::open(&opts.dir)?;
    let verifier: SharedVerifier = Arc::new(ArcSwap::from_pointee(verifier_for(&ca)?));
    let (ck, renew_in) = own_cert(&ca, &opts)?;
    let own = Arc::new(OwnCert(ArcSwap::from_pointee(ck)));
    // Without resumption (see `server_config`) every renewal comes with
    // fresh proof of key possession.
    let tls = keyproof_identity::tls::server_config(
        SvidClientVerifier::new(Shared(verifier.clone()), false),
        own.clone(),
    )
    .map_err(|e| ServeError::Tls(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: opts.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: opts.listen,
        source,
    })?;
    tracing::info!(listen = %local, trust_domain = %ca.trust_domain(), "keyproof-ca serving");
    let mut tokens = TokenStore::default();
    tokens.refresh(&opts.dir)?;
    let server = Arc::new(Server {
        loaded: ArcSwap::from_pointee(Loaded {
            stamp: stamp(&opts.dir),
            ca,
        }),
        verifier,
        own,
        own_renew_at: Mutex::new(Instant::now() + renew_in),
        tokens: Mutex::new(tokens),
        ledger: LedgerWriter::start(opts.dir.clone()),
        limiter: RateLimiter {
            per_minute: opts.per_identity_per_minute,
            windows: Mutex::new(HashMap::new()),
        },
        last_check: Mutex::new(Instant::now()),
        opts,
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        // Backpressure: stop accepting while every connection slot is busy.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(peer = %addr, "TLS handshake timed out");
                    return;
                }
            };
            // The handshake verified the chain (resumption is off, so every
            // connection is a full handshake); keep the identity and expiry
            // to refuse renewals once the SVID lapses on a long-lived
            // connection.
            let session = tls.get_ref().1;
            let peer = session.peer_certificates().and_then(peer_svid);
            tracing::debug!(
                peer = %addr,
                spiffe_id = peer.as_ref().map(|p| p.spiffe_id.as_str()),
                group = session
                    .negotiated_key_exchange_group()
                    .map(|g| keyproof_identity::tls::group_label(g.name())),
                "TLS handshake"
            );
            let svc = hyper::service::service_fn(move |req| {
                let server = server.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(server.handle(req, peer).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_BODY);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(64);
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(peer = %addr, error = %e, "connection ended");
            }
        });
    }
    Ok(())
}
