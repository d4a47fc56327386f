//! `keyproof-ca serve`: the renewal API over mutual TLS, and a plain-HTTP
//! admin listener for probes and Prometheus.
//!
//! The API (`--listen`, TLS 1.3; `Server::handle` dispatches, one method
//! per endpoint):
//!
//! - `POST /v1/renew`: the caller's current SVID (verified in the handshake,
//!   and again against the bundle in force at the request) names the
//!   identity; the body is a CSR; the answer is a new SVID for that
//!   identity only. A revoked certificate ([`crate::revoke`]) is refused,
//!   and the ledger entry names the serial renewed from.
//! - `POST /v1/bootstrap`: `Authorization: Bearer <credential>` and a CSR.
//!   The credential is either a join token (`kpt_...`: single-use, expiring,
//!   bound to one identity, and spent only by an answer that carries the
//!   certificate) or, with `--k8s-jwks`/`--k8s-issuer`, a projected
//!   Kubernetes ServiceAccount token (a JWT, verified offline against the
//!   cluster's JWKS by [`crate::attest`]; reusable within its lifetime, so a
//!   restarted pod bootstraps again) for `spiffe://<td>/ns/<ns>/sa/<sa>`.
//!   The ledger names the requester `bootstrap:<token id>` or
//!   `bootstrap:sa:system:serviceaccount:<ns>:<sa>/<pod name>`.
//! - `GET /v1/bundle`: the trust bundle, SPIFFE JSON when `Accept` asks for
//!   JSON, PEM otherwise.
//!
//! Every error is JSON `{"error": code, "message": ...}` with a stable code
//! ([`crate::metrics::API_CODES`] and the `sa_token_*` codes), counted in
//! `keyproof_ca_refusals_total{code}` and logged (warn; error for 5xx) with
//! the code, the peer's address and what is known of the caller: the client
//! certificate's `spiffe_id`, the join token's `token_id`, the
//! ServiceAccount `sub` (or the `claimed_sub` of a JWT that did not
//! verify). Credentials themselves are never logged. A request head over
//! 64 KiB never reaches [`Server::handle`]: hyper answers it (431 on
//! HTTP/1.1, counted as `request_header_too_large`; a refused stream on
//! HTTP/2).
//!
//! Every API connection is bounded (see [`crate::conns`] and
//! `docs/ca-serve.md`): the TLS handshake ([`HANDSHAKE_TIMEOUT`]), an
//! HTTP/1.1 request head ([`HEADER_TIMEOUT`]), a request body
//! ([`BODY_TIMEOUT`], then 408 `request_timeout`), and idleness of either
//! protocol ([`IDLE_TIMEOUT`] with no request in flight: HTTP/2 gets a
//! GOAWAY); one client address holds at most `--max-connections-per-ip`
//! connections and all of them together [`MAX_CONNECTIONS`], a new one
//! closing an idle one to make room. Memory too: an HTTP/2 connection
//! carries at most [`MAX_STREAMS`] streams with small flow-control windows,
//! and the request bodies being read share [`BODY_BUDGET`], of which one
//! client address holds at most [`BODY_SHARE`] (beyond either, 503
//! `server_busy` at once).
//!
//! The admin listener (`--admin-listen`, plain HTTP/1.1, small limits, idle
//! sockets evicted when it is full: see [`crate::admin`]):
//! `GET /healthz` (200 while the process runs), `GET /ready` (503 when the CA
//! directory cannot be loaded, the ledger is not writable, the store's
//! database does not answer, or the intermediate's key is in a PKCS#11
//! token that does not sign right now),
//! `GET /metrics` (the Prometheus text format; the list is in
//! [`crate::metrics`]).
//!
//! The server signs with the intermediate key only, from wherever `ca.json`
//! says it is (see [`crate::cakey`]); it never opens the root key. A token
//! key that fails makes issuance answer 503 `signing_key_unavailable`
//! (counted like any refusal) and `/ready` 503 until the key signs again:
//! a probe every [`KEY_PROBE_INTERVAL`] (every second while it fails, and
//! at each `/ready` then) notices loss and recovery without a restart.
//!
//! The server picks up rotations by watching the CA directory (a cheap
//! metadata check at most once a second), reissues its own certificate from
//! the current chain, and appends to the ledger with group commit: one fsync
//! covers every issuance that arrived while the previous one ran.
//!
//! With `--store postgres://...` (see [`crate::store`]) several replicas
//! share one CA, and `--dir` is the key directory:
//!
//! - At start the schema is migrated (under an advisory lock) and a
//!   read-only workspace is checked out: the documents, the key files of
//!   `--dir`. The server runs on it as on a CA directory. A task follows
//!   the documents' generation (`LISTEN keyproof_ca`, and a poll every
//!   second that also notices key files changed in `--dir`, e.g. a
//!   Kubernetes Secret update), rewrites what changed into the workspace
//!   and reloads at once: a rotation committed to the store is served by
//!   every replica within about a second.
//! - A join token is taken by one atomic `UPDATE` (exactly one replica
//!   gets it; the others answer `token_reused`) that records this replica
//!   as `used_by`: `<hostname>:<pid>`, which in Kubernetes is the pod's
//!   name, so there is no `--replica` flag. A request that ends before its
//!   certificate was submitted to the ledger gives the token back; after
//!   that, only if the ledger writer answers that the append failed. A
//!   client that goes away, or a commit not answered in time, leaves the
//!   token used: the ledger row may still commit, and a ledger row without
//!   a delivered certificate is harmless where two certificates for one
//!   token are not (the same holds for a CA directory's tokens, whose
//!   `used` line is then written).
//! - The group writer appends each batch of ledger entries in one
//!   transaction before any of its certificates is handed out.
//! - The database unreachable: issuance (and a token's take) answers 503
//!   `store_unavailable`, counted like any refusal, and nothing is handed
//!   out. A request waits at most [`STORE_OP_TIMEOUT`] on each store
//!   operation (a database that does not answer at all, e.g. stopped, is
//!   not bounded by `statement_timeout`); a certificate whose ledger commit
//!   timed out is withheld even if the commit lands later. The failed
//!   operation is counted in
//!   `keyproof_ca_store_errors_total{op}`; from then until a ping (one a
//!   second, in the background, so probes never wait on the database)
//!   gets an answer, requests that need the database are refused at once,
//!   without trying it, so that clients fail over to another replica
//!   without waiting for a connect timeout. `/ready` answers 503 with the
//!   reason meanwhile; `GET /v1/bundle` is still served from memory. The
//!   pool reconnects by itself: no restart when the database is back.
//! - A replica that cannot follow the store (each refresh fails, e.g. a
//!   document row that cannot be used, or times out after
//!   [`STORE_REFRESH_TIMEOUT`]) keeps serving its previous state and stays
//!   ready while that chain is valid (the database may answer pings, and
//!   the replica still issues from a valid chain); it counts
//!   `keyproof_ca_store_errors_total{op="refresh"}` and shows
//!   `keyproof_ca_store_state_current` 0 until a refresh, and the reload
//!   it brings, succeed.
//! - A replica whose loaded chain is no longer in the store's bundle (a
//!   root rotation finished while its key directory lacked the current
//!   intermediate key) is not ready and answers issuance with 503
//!   `ca_unavailable`, the join token left unspent: what it would sign
//!   chains to nothing the workloads trust any more.
//! - A replica needs the database to start (the documents are there): it
//!   exits with the error otherwise, and its supervisor restarts it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
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

use crate::attest::{self, AttestError, SaAttestor, SaConfig};
use crate::ca::{files, Ca, CaError};
use crate::cakey::KeyAccess;
use crate::conns::{ConnTable, Slot};
use crate::csr::{self, SubjectKey};
use crate::issue::{IssueRequest, Issued};
use crate::ledger;
use crate::metrics::{CaGauges, CaMetrics, IssuanceKind};
use crate::revoke::RevokedSet;
use crate::store::pg::TakenToken;
use crate::store::{PgStore, Store, StoreError, StoreSpec, Workspace};
use crate::token::{self, TokenError, TokenStore};

/// Largest accepted request body (a CSR is well under 2 KiB).
const MAX_BODY: usize = 64 * 1024;
/// Request-body bytes all connections together may hold at once (read,
/// or reserved by a request whose body is arriving). Connection counts
/// alone do not bound memory: every stream of every connection could
/// otherwise hold [`MAX_BODY`] for [`BODY_TIMEOUT`], gigabytes with no
/// credential at all. A request beyond it gets 503 `server_busy` at once.
const BODY_BUDGET: usize = 4 * 1024 * 1024;
/// The part of [`BODY_BUDGET`] one client address may hold: eight bodies
/// of [`MAX_BODY`] (a CSR is well under 2 KiB: hundreds of renewals at
/// once). Without it, one address within its connection bound could hold
/// the whole budget with slow uploads and no credential, and every other
/// client would get `server_busy` for as long as it kept at it.
const BODY_SHARE: usize = BODY_BUDGET / 8;
/// Concurrent HTTP/2 streams per connection: a renewal client makes one
/// or two calls per connection; every stream may hold a request head and
/// body.
const MAX_STREAMS: u32 = 4;
/// HTTP/2 flow-control windows: what a peer may send before the server
/// has read it, so what hyper buffers unread per stream and connection
/// (the connection's cannot start below the protocol's 65,535 bytes).
const STREAM_WINDOW: u32 = 16 * 1024;
const CONN_WINDOW: u32 = 65_535;
/// Largest request head (HTTP/1 read buffer, HTTP/2 header list). Well
/// above [`attest::MAX_TOKEN_LEN`], so that an oversized credential reaches
/// the API and is refused there with a code, counted and logged, instead of
/// by the HTTP layer. A head arriving is held whole by every connection
/// that sends one, with no credential needed: [`MAX_CONNECTIONS`] bounds
/// them (about 90 KiB a connection at worst with its buffers).
const MAX_HEADERS: usize = 64 * 1024;
/// How long a client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an HTTP/1.1 request head may take to arrive, counted from the
/// handshake or the previous answer (so also how long a kept-alive
/// HTTP/1.1 connection may sit idle: hyper runs this timer while it waits).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection of either protocol may have no request in
/// flight, from its handshake or its last request's answer, before it is
/// closed (HTTP/2: GOAWAY, then the close). A client makes one call per
/// connection, rarely a few: none waits this long between two.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body (a CSR, at most [`MAX_BODY`]) may take to
/// arrive once its head has: a body sent a byte at a time would otherwise
/// keep its connection busy, and so out of reach of eviction, forever.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection asked to close (idle, or shutting down) may take
/// to finish what it has in flight, and to flush its answers to a client
/// that does not read them, before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// The most API connections open at once (see [`crate::conns`]): each may
/// hold an unfinished head of up to [`MAX_HEADERS`], so this bounds that
/// memory (about 140 MiB at worst, within the shipped manifest's 256 Mi).
/// Renewals take one short call per connection: a thousand at once is far
/// beyond what a cluster's renewers make.
const MAX_CONNECTIONS: usize = 1024;
/// The default of `--max-connections-per-ip`.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;
/// How often the intermediate's token key is probed while it works (every
/// second while it does not).
const KEY_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// What every join token starts with (see [`crate::token`]).
const JOIN_TOKEN_PREFIX: &str = "kpt_";
/// How often the workspace is brought up to date from the store even
/// without a notification, and the database pinged for `/ready`.
const STORE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may take before the database counts as unreachable.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request waits on one store operation (a token's take or
/// give-back, its ledger commit) before it answers 503
/// `store_unavailable`: `statement_timeout` is enforced by the server, so
/// it does nothing for a database that does not answer at all.
const STORE_OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the store follower waits on one refresh (it only reads from the
/// database before it writes files, so giving up is safe).
const STORE_REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The plain-HTTP admin listener (`/healthz`, `/ready`, `/metrics`).
    pub admin_listen: SocketAddr,
    /// Kubernetes ServiceAccount attestation for bootstrap; `None`: join
    /// tokens only, and a JWT is refused with `sa_token_not_accepted`.
    pub service_accounts: Option<SaConfig>,
    /// `--pin-file`: the PIN file for the intermediate's token key,
    /// instead of the one `ca.json` records.
    pub pin_file: Option<PathBuf>,
    /// Where the state lives: [`StoreSpec::Dir`] is `dir`; with PostgreSQL
    /// `dir` is the key directory (see [`crate::store`]).
    pub store: crate::store::StoreSpec,
    /// The most API connections one client address may hold open (0: no
    /// bound but the total); see [`crate::conns`].
    pub max_connections_per_ip: usize,
}

impl ServeOptions {
    /// How the server reaches its key: the intermediate's only.
    fn key_access(&self) -> KeyAccess {
        KeyAccess {
            pin_file: self.pin_file.clone(),
            ..KeyAccess::default()
        }
    }
}

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Ca(#[from] CaError),
    #[error("--listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--admin-listen {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{0}")]
    Attest(#[from] AttestError),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// An API error answer: HTTP status, stable code, message.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    /// The stable `error` code (also the `code` label of
    /// `keyproof_ca_refusals_total`).
    code: &'static str,
    message: String,
    /// The `Allow` header of a 405.
    allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn response(&self) -> Response<Full<Bytes>> {
        let body = json!({"error": self.code, "message": self.message}).to_string();
        let mut r = json_response(self.status, body);
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        }
        if let Some(allow) = self.allow {
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        }
        r
    }
}

/// Why [`Server::record`] did not record a certificate.
enum Recorded {
    /// The ledger writer said the append failed: nothing was written.
    Failed(ApiError),
    /// No answer in time: the entry may still be committed.
    Unknown(ApiError),
}

/// A store operation a request needed failed: nothing was handed out.
/// The answer names no database (host, port, user): any client, even one
/// refused later, would learn them. The reason is in the log and on
/// `/ready` (the admin port).
fn store_unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::debug!(error = %e, "refused: store unavailable");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the CA's database cannot be used right now, so no certificate is issued; \
         try another replica, or again shortly",
    )
}

fn ca_error(e: CaError) -> ApiError {
    match e {
        e @ CaError::SigningKey { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "signing_key_unavailable",
            e.to_string(),
        ),
        CaError::Csr(c) => ApiError::new(StatusCode::BAD_REQUEST, c.code(), c.to_string()),
        e @ (CaError::ForeignTrustDomain { .. }
        | CaError::NotAWorkloadId(_)
        | CaError::ReservedId(_)
        | CaError::SpiffeId(_)) => {
            ApiError::new(StatusCode::FORBIDDEN, "id_not_allowed", e.to_string())
        }
        e => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ca_unavailable",
            e.to_string(),
        ),
    }
}

/// One API request as far as it has shown who is calling: what its refusal
/// is logged with, and which issuance kind its outcome counts as.
struct Call {
    peer: SocketAddr,
    /// The client certificate's SPIFFE ID (verified in the handshake).
    spiffe_id: Option<String>,
    /// The join token's id (never the token).
    token_id: Option<String>,
    /// The verified ServiceAccount token's `sub`.
    sub: Option<String>,
    /// The `sub` a ServiceAccount token that did not verify claims.
    claimed_sub: Option<String>,
    /// Set by the issuing endpoints.
    kind: Option<IssuanceKind>,
}

impl Call {
    fn new(conn: &Conn) -> Call {
        Call {
            peer: conn.addr,
            spiffe_id: conn.svid.as_ref().map(|s| s.spiffe_id.to_string()),
            token_id: None,
            sub: None,
            claimed_sub: None,
            kind: None,
        }
    }

    fn log_refusal(&self, e: &ApiError) {
        macro_rules! log_at {
            ($level:ident, $msg:literal) => {
                tracing::$level!(
                    code = e.code,
                    status = e.status.as_u16(),
                    peer = %self.peer,
                    spiffe_id = self.spiffe_id.as_deref(),
                    token_id = self.token_id.as_deref(),
                    sub = self.sub.as_deref(),
                    claimed_sub = self.claimed_sub.as_deref(),
                    kind = self.kind.map(IssuanceKind::as_str),
                    detail = %e.message,
                    $msg
                )
            };
        }
        if e.status.is_server_error() {
            log_at!(error, "request failed");
        } else {
            log_at!(warn, "request refused");
        }
    }
}

/// A TLS connection's peer: its address and the SVID it presented.
#[derive(Clone)]
struct Conn {
    addr: SocketAddr,
    svid: Option<VerifiedSvid>,
    /// The certificate chain it presented (leaf first), verified by the
    /// handshake against the bundle of that moment: a renewal verifies it
    /// again against the bundle of its own moment.
    chain: Arc<[rustls::pki_types::CertificateDer<'static>]>,
}

/// Why `ca` (the state loaded before) does not chain to the bundle now in
/// `dir` (the store's, in the workspace), or `None` when its root is in
/// it. A bundle that cannot be read is not held against the loaded chain:
/// the reload error says what is wrong.
fn off_bundle(dir: &Path, ca: &Ca) -> Option<String> {
    let path = dir.join(files::BUNDLE_PEM);
    let (_, pem) = crate::fsutil::read_regular(&path, crate::fsutil::MAX_INPUT).ok()?;
    let roots = keyproof_identity::keys::certs_from_pem(&pem).ok()?;
    if roots.iter().any(|r| r.as_ref() == ca.root().as_ref()) {
        return None;
    }
    Some(format!(
        "the chain this replica loaded (root SHA-256 {}) is no longer in the store's bundle: a \
         root rotation finished before its key directory received the current intermediate key; \
         update the key directory (--dir) of this replica",
        keyproof_identity::keys::fingerprint(ca.root())
    ))
}

/// The state reloaded when the CA directory changes.
struct Loaded {
    ca: Ca,
    stamp: Vec<Option<SystemTime>>,
}

/// `revoked.json` as loaded, with what identified the file then. Kept apart
/// from [`Loaded`]: revocation does not depend on the signing chain, so a
/// CA state that fails to load (a key not yet on this replica, a broken
/// rotation) must not freeze the revocations made since.
struct Revocations {
    set: RevokedSet,
    stamp: Option<(SystemTime, u64, u64)>,
}

/// Renewal links this server knows (child serial to parent serial, hex as
/// the ledger writes them), so that a renewal whose presented certificate
/// descends from a revoked one is refused: a renewal that raced `revoke`
/// (issued after it read the ledger) is not on the list itself, but its
/// ancestor is. Seeded from `ledger.jsonl` at start (directory mode) and
/// extended by every renewal this server issues; links of expired
/// certificates are dropped now and then.
#[derive(Default)]
struct Lineage {
    /// child → (parent, the child's notAfter in Unix seconds).
    parents: HashMap<String, (String, i64)>,
    inserts: u64,
}

impl Lineage {
    /// Most links walked up from one certificate: a ledger never holds a
    /// cycle, but a bound costs nothing.
    const MAX_DEPTH: usize = 10_000;

    fn insert(&mut self, child: String, parent: String, not_after: &str) {
        let Ok(t) =
            time::OffsetDateTime::parse(not_after, &time::format_description::well_known::Rfc3339)
        else {
            return;
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if t.unix_timestamp() <= now {
            return;
        }
        self.parents.insert(child, (parent, t.unix_timestamp()));
        self.inserts += 1;
        if self.inserts >= 4096 {
            self.inserts = 0;
            self.parents.retain(|_, (_, na)| *na > now);
        }
    }

    /// The nearest revoked ancestor of `serial`, if any.
    fn revoked_ancestor(&self, serial: &str, revoked: &RevokedSet) -> Option<String> {
        let mut at = serial;
        for _ in 0..Self::MAX_DEPTH {
            let (parent, _) = self.parents.get(at)?;
            if revoked.contains(parent) {
                return Some(parent.clone());
            }
            at = parent;
        }
        None
    }
}

/// What identifies this version of `revoked.json` (it is replaced by a
/// rename, so the inode changes even within one mtime tick).
fn revoked_stamp(dir: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir.join(files::REVOKED)).ok()?;
    Some((m.modified().ok()?, m.ino(), m.len()))
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

/// Fixed one-minute windows per identity and client address, and per
/// identity from all addresses.
struct RateLimiter {
    per_minute: u32,
    windows: Mutex<HashMap<RateKey, (Instant, u32)>>,
}

/// An identity, and the client address (`None`: every address).
type RateKey = (String, Option<IpAddr>);

/// How many times `--rate-limit` one identity may be issued per minute
/// from all addresses together.
const IDENTITY_CEILING: u32 = 8;

impl RateLimiter {
    /// Whether `id` may be issued once more to a client at `ip`: at most
    /// `per_minute` times per minute to one address, so that one replica
    /// of a workload (crash-looping, buggy, or in other hands) cannot use
    /// up what the identity's other replicas need to renew; and
    /// [`IDENTITY_CEILING`] times that to all addresses together.
    fn allow(&self, id: &str, ip: IpAddr) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if w.len() > 100_000 {
            w.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
        }
        let mut count = |key: RateKey, limit: u32| {
            let slot = w.entry(key).or_insert((now, 0));
            if now.duration_since(slot.0) >= Duration::from_secs(60) {
                *slot = (now, 0);
            }
            slot.1 += 1;
            slot.1 <= limit
        };
        count((id.to_owned(), Some(ip)), self.per_minute)
            && count(
                (id.to_owned(), None),
                self.per_minute.saturating_mul(IDENTITY_CEILING),
            )
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

/// The request-body bytes all connections may hold at once
/// ([`BODY_BUDGET`]), and each client address ([`BODY_SHARE`]): each
/// request reserves what its body may take before reading any of it, and
/// gives it back with its answer.
struct BodyBudget {
    all: Arc<tokio::sync::Semaphore>,
    by_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    share: usize,
}

/// A request's reservation, given back when dropped.
#[derive(Debug)]
struct BodyPermit {
    _all: tokio::sync::OwnedSemaphorePermit,
    by_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
    bytes: usize,
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = by_ip.get_mut(&self.ip) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                by_ip.remove(&self.ip);
            }
        }
    }
}

impl BodyBudget {
    fn new(bytes: usize, share: usize) -> BodyBudget {
        BodyBudget {
            all: Arc::new(tokio::sync::Semaphore::new(bytes)),
            by_ip: Arc::default(),
            share,
        }
    }

    /// Reserves room for `body` from `ip`: its announced length
    /// (Content-Length, or nothing for a request that ended with its head),
    /// else [`MAX_BODY`]. Returns the limit to read it with (a body longer
    /// than it announced is cut off there) and the reservation.
    fn reserve(&self, body: &Incoming, ip: IpAddr) -> Result<(usize, BodyPermit), ApiError> {
        use hyper::body::Body as _;
        let want = if body.is_end_stream() {
            0
        } else {
            match body.size_hint().exact() {
                Some(n) if n > MAX_BODY as u64 => {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "bad_request",
                        format!("request body: {n} bytes, over the {MAX_BODY} accepted"),
                    ))
                }
                Some(n) => n as usize,
                None => MAX_BODY,
            }
        };
        self.take(want, ip).map(|p| (want, p))
    }

    fn take(&self, bytes: usize, ip: IpAddr) -> Result<BodyPermit, ApiError> {
        let busy = || {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                "too many request bodies in flight; try again shortly",
            )
        };
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        let held = by_ip.get(&ip).copied().unwrap_or(0);
        if held + bytes > self.share {
            return Err(busy());
        }
        // `bytes` is at most MAX_BODY: it fits in u32.
        let n = u32::try_from(bytes).unwrap_or(u32::MAX);
        let all = self
            .all
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| busy())?;
        *by_ip.entry(ip).or_insert(0) += bytes;
        Ok(BodyPermit {
            _all: all,
            by_ip: self.by_ip.clone(),
            ip,
            bytes,
        })
    }
}

struct Server {
    opts: ServeOptions,
    /// The CA directory served: `opts.dir`, or with a store the workspace
    /// checked out of it (kept up to date by [`follow_store`]).
    dir: PathBuf,
    /// The PostgreSQL store, with `--store`.
    store: Option<Arc<StoreLink>>,
    /// Set while [`follow_store`] rewrites the workspace, so that a request
    /// does not reload it half-written (the task reloads when it is done).
    refreshing: AtomicBool,
    /// Held while the CA is reloaded, so that two reloads (a request's and
    /// the store follower's) never store their results out of order.
    reloading: Mutex<()>,
    loaded: ArcSwap<Loaded>,
    revoked: ArcSwap<Revocations>,
    lineage: Mutex<Lineage>,
    /// Why the changed CA directory cannot be loaded (the previous state
    /// stays in use meanwhile); `None` when the loaded state is current.
    reload_error: Mutex<Option<String>>,
    /// With a store: why the loaded chain no longer chains to the store's
    /// bundle (a root rotation finished while this replica's key directory
    /// lacked the new intermediate key). The replica is then not ready and
    /// issues nothing: no peer holding the current bundle would accept
    /// what it signs, and a join token spent on it would be lost.
    off_bundle: Mutex<Option<String>>,
    verifier: SharedVerifier,
    own: Arc<OwnCert>,
    own_renew_at: Mutex<Instant>,
    /// `not_after` of the server's own certificate, seconds since the epoch.
    own_expiry: AtomicI64,
    tokens: Mutex<TokenStore>,
    attestor: Option<SaAttestor>,
    ledger: ledger::GroupWriter,
    limiter: RateLimiter,
    /// [`BODY_BUDGET`], shared by every request.
    bodies: BodyBudget,
    last_check: Mutex<Instant>,
    metrics: Arc<CaMetrics>,
    /// What `/ready` last answered (`None` before the first probe), so that
    /// only a change is logged, not every probe.
    was_ready: Mutex<Option<bool>>,
}

/// The PostgreSQL store as the server uses it: the connection pool, the
/// name this replica marks the tokens it takes with, and the latest word
/// on the database's health (what `/ready` and `keyproof_ca_store_up`
/// say).
struct StoreLink {
    db: Arc<PgStore>,
    /// `used_by` of the join tokens this replica takes: `<hostname>:<pid>`.
    replica: String,
    /// What was wrong at the last operation or ping, if anything.
    problem: Mutex<Option<String>>,
    metrics: Arc<CaMetrics>,
}

impl StoreLink {
    /// An operation or a ping succeeded: the database answers.
    fn answered(&self) {
        let mut p = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        if p.take().is_some() {
            tracing::info!(store = self.db.url(), "the CA's database answers again");
        }
        self.metrics.set_store_up(true);
    }

    /// `op` failed: counted; when the database itself is the problem (not
    /// the key directory or a row), the store is down until something
    /// succeeds again.
    fn failed(&self, op: &'static str, e: &StoreError) {
        self.metrics.store_error(op);
        if matches!(e, StoreError::Unreachable { .. } | StoreError::Db(_)) {
            self.down(e.to_string());
        } else {
            tracing::warn!(op, error = %e, "store operation failed");
        }
    }

    /// `op` got no answer within [`STORE_OP_TIMEOUT`]: counted, the store is
    /// down until a ping answers, and the request is refused.
    fn timed_out(&self, op: &'static str) -> ApiError {
        self.metrics.store_error(op);
        let why = format!("no answer to {op} within {}s", STORE_OP_TIMEOUT.as_secs());
        self.down(why.clone());
        store_unavailable(why)
    }

    /// The database failed (the message is already counted where it arose).
    fn down(&self, why: String) {
        let mut p = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            tracing::error!(store = self.db.url(), error = %why, "the CA's database is unreachable; issuance is refused until it answers");
        }
        *p = Some(why);
        self.metrics.set_store_up(false);
    }

    /// For `/ready`: the latest word, at most [`STORE_INTERVAL`] old plus a
    /// ping's timeout (the pinger in [`run`] refreshes it).
    fn status(&self) -> Result<(), String> {
        match &*self.problem.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            // `why` names the database (its URL, password masked).
            Some(why) => Err(format!("the CA's store cannot be used: {why}")),
        }
    }

    /// Refuses a request that needs the database at once while it is known
    /// not to answer (until the next ping, at most [`STORE_INTERVAL`] away,
    /// finds it back): nothing is signed in vain, and the client fails
    /// over to another replica now instead of after a connect timeout.
    fn usable(&self) -> Result<(), ApiError> {
        match &*self.problem.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(why) => Err(store_unavailable(why)),
        }
    }

    /// Makes a taken join token usable again, in the background (the
    /// request that took it is over), retrying for a few minutes while
    /// the database is down.
    fn give_back(self: &Arc<Self>, t: TakenToken) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(token_id = %t.id, "no runtime to give the join token back; it stays used");
            return;
        };
        let link = self.clone();
        rt.spawn(async move {
            let mut wait = Duration::from_secs(1);
            for attempt in 0..10 {
                match tokio::time::timeout(STORE_OP_TIMEOUT, link.db.token_give_back(&t)).await {
                    Ok(Ok(())) => {
                        tracing::debug!(token_id = %t.id, "join token given back");
                        return;
                    }
                    Ok(Err(e)) => {
                        link.failed("token_give_back", &e);
                        if attempt == 0 {
                            tracing::warn!(token_id = %t.id, error = %e, "could not give the join token back yet; retrying");
                        }
                    }
                    Err(_) => {
                        let _ = link.timed_out("token_give_back");
                        if attempt == 0 {
                            tracing::warn!(token_id = %t.id, "no answer giving the join token back yet; retrying");
                        }
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            tracing::error!(token_id = %t.id, "could not give the join token back; it stays used (create a new one)");
        });
    }
}

/// The name this replica marks the join tokens it takes with (`used_by`):
/// `<hostname>:<pid>` (in Kubernetes the hostname is the pod's name).
fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into());
    format!("{host}:{}", std::process::id())
}

/// The SHA-256 (hex) a join token is stored under: as [`crate::token`]
/// hashes it, of the trimmed token.
fn token_sha256(token: &str) -> String {
    hex::encode(keyproof_identity::keys::sha256(token.trim().as_bytes()))
}

/// A join token a request in flight holds. Dropped without
/// [`HeldToken::spend`] (a refusal, an error, or the client going away
/// mid-request) before its certificate was submitted to the ledger
/// ([`HeldToken::submitted`]), it is released and stays usable. Once
/// submitted, only [`HeldToken::release`] after the ledger writer said the
/// append failed gives it back: dropped (the client went away) or timed
/// out, the ledger row may still commit, so the token stays used (a ledger
/// row without a delivered certificate is harmless; two certificates for
/// one token are not).
enum HeldToken<'a> {
    /// Reserved in the directory's [`TokenStore`] ([`TokenStore::reserve`]);
    /// spending writes its `used` line.
    File {
        tokens: &'a Mutex<TokenStore>,
        /// Where its `used` line goes.
        dir: &'a Path,
        id: String,
        spent: bool,
        submitted: bool,
    },
    /// Taken in PostgreSQL ([`PgStore::token_take`]): already marked used
    /// there, so spending is nothing more; released, it is given back.
    Store {
        link: Arc<StoreLink>,
        taken: Option<TakenToken>,
        submitted: bool,
    },
}

impl HeldToken<'_> {
    /// Its certificate is about to be submitted to the ledger: from now on
    /// a drop leaves the token used.
    fn submitted(&mut self) {
        match self {
            HeldToken::File { submitted, .. } | HeldToken::Store { submitted, .. } => {
                *submitted = true
            }
        }
    }

    /// Marks the token used, durably.
    fn spend(mut self, dir: &Path) -> Result<(), CaError> {
        match &mut self {
            HeldToken::File {
                tokens, id, spent, ..
            } => {
                let r = tokens.lock().unwrap_or_else(|p| p.into_inner()).commit(
                    dir,
                    id,
                    crate::ca::now(),
                );
                *spent = r.is_ok();
                r
            }
            HeldToken::Store { taken, .. } => {
                *taken = None;
                Ok(())
            }
        }
    }
}

impl HeldToken<'_> {
    /// The outcome of the ledger append is unknown: the token is kept used
    /// (for the directory: its `used` line is written).
    fn keep_used_on_drop(&mut self) {
        match self {
            HeldToken::File {
                tokens,
                dir,
                id,
                spent,
                ..
            } => {
                if *spent {
                    return;
                }
                let r = tokens.lock().unwrap_or_else(|p| p.into_inner()).commit(
                    dir,
                    id,
                    crate::ca::now(),
                );
                *spent = r.is_ok();
                match r {
                    Ok(()) => {
                        tracing::warn!(token_id = %id, "the request ended before its ledger commit was known; the join token is spent")
                    }
                    Err(e) => {
                        tracing::error!(token_id = %id, error = %e, "a certificate for this join token may be in the ledger, but the token could not be marked used")
                    }
                }
            }
            HeldToken::Store { taken, .. } => {
                if let Some(t) = taken.take() {
                    tracing::warn!(token_id = %t.id, "the request ended before its ledger commit was known; the join token stays used");
                }
            }
        }
    }
}

impl HeldToken<'_> {
    /// Releases the token now (a refusal is about to be answered): a token
    /// taken in the store is given back before this returns, or, if the
    /// database does not answer, in the background. Only for a token
    /// whose certificate was not submitted to the ledger, or whose ledger
    /// append the writer said failed.
    async fn release(mut self) {
        match &mut self {
            HeldToken::Store { link, taken, .. } => {
                if let Some(t) = taken.take() {
                    match tokio::time::timeout(STORE_OP_TIMEOUT, link.db.token_give_back(&t)).await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            link.failed("token_give_back", &e);
                            link.give_back(t);
                        }
                        Err(_) => {
                            let _ = link.timed_out("token_give_back");
                            link.give_back(t);
                        }
                    }
                }
            }
            // The reservation is released by drop.
            HeldToken::File { submitted, .. } => *submitted = false,
        }
    }
}

impl Drop for HeldToken<'_> {
    fn drop(&mut self) {
        match self {
            HeldToken::File {
                submitted: true, ..
            }
            | HeldToken::Store {
                submitted: true, ..
            } => self.keep_used_on_drop(),
            HeldToken::File {
                tokens,
                id,
                spent: false,
                ..
            } => tokens.lock().unwrap_or_else(|p| p.into_inner()).release(id),
            HeldToken::File { spent: true, .. } => {}
            HeldToken::Store { link, taken, .. } => {
                if let Some(t) = taken.take() {
                    link.give_back(t);
                }
            }
        }
    }
}

/// A new certificate for the server itself, when to renew it, and its
/// `not_after` (seconds since the epoch).
fn own_cert(ca: &Ca, opts: &ServeOptions) -> Result<(CertifiedKey, Duration, i64), CaError> {
    let id = match &opts.server_id {
        Some(id) => id.clone(),
        None => SpiffeId::parse(&keyproof_identity::spiffe::ca_server_id(
            ca.trust_domain().as_str(),
        ))?,
    };
    let key = ca.key_type().generate()?;
    let ttl = Duration::from_secs(24 * 3600);
    let issued = ca.sign_server(
        &IssueRequest {
            spiffe_id: id,
            key: SubjectKey::from_key_pair(&key, ca.key_type()),
            ttl,
            dns: opts.dns.clone(),
        },
        "serve:self",
    )?;
    let not_after = crate::ca::not_after_of(&issued.leaf)?.unix_timestamp();
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| CaError::Rotation(e.to_string()))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| CaError::Rotation(e.to_string()))?;
    Ok((
        CertifiedKey::new(vec![issued.leaf, issued.intermediate], signing),
        ttl * 2 / 3,
        not_after,
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
    /// At most once a second: [`Server::reload`] if the CA's files changed
    /// or the server's certificate is due.
    fn refresh(&self) {
        if self.refreshing.load(Ordering::Acquire) {
            // The store follower is rewriting the workspace and reloads
            // when it is done.
            return;
        }
        {
            let mut last = self.last_check.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < Duration::from_secs(1) {
                return;
            }
            *last = Instant::now();
        }
        self.reload(false);
    }

    /// [`Server::reload`] if the CA's files changed, now (unless the store
    /// follower is rewriting the workspace: it reloads when done).
    fn refresh_now(&self) {
        if self.refreshing.load(Ordering::Acquire) {
            return;
        }
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.reload(false);
    }

    /// Reloads `revoked.json` when it changed (or, with `force`, anyway),
    /// whether or not the rest of the CA loads. One that cannot be read
    /// keeps the previous list, loudly (`check` reports it too).
    fn reload_revoked(&self, force: bool) {
        let current = revoked_stamp(&self.dir);
        if !force && current == self.revoked.load().stamp {
            return;
        }
        match RevokedSet::load(&self.dir) {
            Ok(set) => {
                tracing::info!(revoked = set.len(), "revocation list loaded");
                self.revoked.store(Arc::new(Revocations {
                    set,
                    stamp: current,
                }));
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "revoked.json changed but could not be loaded; keeping the previous revocations"
                );
                // Said once per version of the file, not on every request.
                let set = self.revoked.load().set.clone();
                self.revoked.store(Arc::new(Revocations {
                    set,
                    stamp: current,
                }));
            }
        }
    }

    /// Reloads the CA when its files changed (or, with `force`, anyway: the
    /// store follower rewrote the workspace, keys included), and reissues
    /// the server's own certificate when the chain changed or it is due.
    fn reload(&self, force: bool) {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let dir = &self.dir;
        self.reload_revoked(force);
        let current = stamp(dir);
        let changed = force || current != self.loaded.load().stamp;
        if changed {
            match Ca::open_with(dir, &self.opts.key_access())
                .and_then(|ca| Ok((verifier_for(&ca)?, ca)))
            {
                Ok((v, ca)) => {
                    watch_key(&ca, &self.metrics);
                    tracing::info!(
                        sequence = ca.state().spiffe_sequence,
                        "CA directory changed; reloaded"
                    );
                    self.verifier.store(Arc::new(v));
                    self.loaded.store(Arc::new(Loaded { ca, stamp: current }));
                    *self.reload_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    *self.off_bundle.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    self.metrics.set_store_state_current(true);
                }
                // Mid-rotation files may be briefly inconsistent: keep the
                // previous state and try again on the next request.
                Err(e) => {
                    tracing::warn!(error = %e, "CA directory changed but could not be loaded; keeping the previous state");
                    *self.reload_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(e.to_string());
                    self.metrics.set_store_state_current(false);
                    if self.store.is_some() {
                        let off = off_bundle(dir, &self.loaded.load().ca);
                        if let Some(why) = &off {
                            tracing::error!(reason = %why, "not issuing until the key directory catches up");
                        }
                        *self.off_bundle.lock().unwrap_or_else(|p| p.into_inner()) = off;
                    }
                    return;
                }
            }
        }
        let due = Instant::now() >= *self.own_renew_at.lock().unwrap_or_else(|p| p.into_inner());
        if changed || due {
            match own_cert(&self.loaded.load().ca, &self.opts) {
                Ok((ck, renew_in, not_after)) => {
                    self.own.0.store(Arc::new(ck));
                    self.own_expiry.store(not_after, Ordering::Relaxed);
                    *self.own_renew_at.lock().unwrap_or_else(|p| p.into_inner()) =
                        Instant::now() + renew_in;
                }
                Err(e) => tracing::error!(error = %e, "could not reissue the server certificate"),
            }
            self.update_gauges();
        }
    }

    /// Sets the CA and JWKS gauges from the loaded state.
    fn update_gauges(&self) {
        let loaded = self.loaded.load();
        let ca = &loaded.ca;
        let expiry = |der: &[u8]| {
            crate::ca::not_after_of(der)
                .map(|t| t.unix_timestamp())
                .unwrap_or(0)
        };
        let issued = |der: &[u8]| {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, c)| c.validity().not_before.timestamp())
                .unwrap_or(0)
        };
        self.metrics.set_ca(&CaGauges {
            root_expiry: expiry(ca.root()),
            intermediate_expiry: expiry(ca.intermediate()),
            server_expiry: self.own_expiry.load(Ordering::Relaxed),
            root_issued: issued(ca.root()),
            intermediate_issued: issued(ca.intermediate()),
            trust_domain: ca.trust_domain().as_str().to_owned(),
            bundle_roots: ca
                .bundle()
                .iter()
                .map(|r| (keyproof_identity::keys::fingerprint(r), expiry(r)))
                .collect(),
            sequence: ca.state().spiffe_sequence,
            stage: Some(ca.state().rotation),
        });
        if let Some(a) = &self.attestor {
            self.metrics.set_jwks(a.status());
        }
    }

    /// Signs and records: the certificate may be handed out once this
    /// returns it.
    async fn issue(
        &self,
        id: SpiffeId,
        key: SubjectKey,
        requester: String,
        renewed_from: Option<String>,
        ip: IpAddr,
    ) -> Result<Issued, ApiError> {
        let mut issued = self.sign(id, key, requester, ip)?;
        // The ledger links a renewal to what it renewed, so that a
        // revocation reaches it (see `crate::revoke`).
        issued.entry.renewed_from = renewed_from;
        match self.record(&issued).await {
            Ok(()) => Ok(issued),
            Err(Recorded::Failed(e) | Recorded::Unknown(e)) => Err(e),
        }
    }

    /// Signs a certificate, which must not be handed out before
    /// [`Server::record`] says it is in the ledger.
    fn sign(
        &self,
        id: SpiffeId,
        key: SubjectKey,
        requester: String,
        ip: IpAddr,
    ) -> Result<Issued, ApiError> {
        // The server's own ID, also a configured `--spiffe-id` outside
        // `/keyproof-ca` (`Ca::sign` refuses that one and those below it),
        // before the rate limit, which a refusal should not use up.
        if self.opts.server_id.as_ref() == Some(&id) || crate::issue::reserved_for_the_ca(&id) {
            return Err(ca_error(CaError::ReservedId(id.to_string())));
        }
        if !self.limiter.allow(id.as_str(), ip) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many issuances for {id}; limit {} per minute from one address, {} from all",
                    self.limiter.per_minute,
                    self.limiter.per_minute.saturating_mul(IDENTITY_CEILING)
                ),
            ));
        }
        if let Some(link) = &self.store {
            link.usable()?;
        }
        if let Some(why) = self.off_bundle() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ca_unavailable",
                why,
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
        Ok(issued)
    }

    /// Appends `issued` to the ledger; with a store, waits at most
    /// [`STORE_OP_TIMEOUT`] for the commit.
    async fn record(&self, issued: &Issued) -> Result<(), Recorded> {
        let commit = self.ledger.record(issued.entry.clone());
        let r = match &self.store {
            Some(link) => match tokio::time::timeout(STORE_OP_TIMEOUT, commit).await {
                Ok(r) => r,
                // The batch may still commit: the certificate is withheld
                // all the same.
                Err(_) => return Err(Recorded::Unknown(link.timed_out("ledger_append"))),
            },
            None => commit.await,
        };
        r.map_err(|e| {
            Recorded::Failed(match &self.store {
                // The writer counted the failed batch.
                Some(link) => {
                    link.down(format!("the ledger could not be written: {e}"));
                    store_unavailable(format!("the ledger could not be written: {e}"))
                }
                None => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ledger_unavailable", e),
            })
        })
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

    /// One API request: read the body, dispatch to the endpoint, then count
    /// and log the outcome.
    async fn handle(self: Arc<Self>, req: Request<Incoming>, conn: Conn) -> Response<Full<Bytes>> {
        self.refresh();
        let mut call = Call::new(&conn);
        let (parts, body) = req.into_parts();
        let result = match self.bodies.reserve(&body, conn.addr.ip()) {
            Err(e) => Err(e),
            Ok((limit, permit)) => {
                let r = self
                    .read_and_dispatch(&parts, body, limit, &conn, &mut call)
                    .await;
                // The body is held until the answer is ready.
                drop(permit);
                r
            }
        };
        match result {
            Ok(r) => {
                if let Some(kind) = call.kind {
                    self.metrics.issuance(kind, r.status());
                }
                r
            }
            Err(e) => {
                self.metrics.refusal(e.code);
                if let Some(kind) = call.kind {
                    self.metrics.issuance(kind, e.status);
                }
                call.log_refusal(&e);
                e.response()
            }
        }
    }

    /// Reads a body of at most `limit` bytes (what was reserved for it),
    /// then dispatches the request.
    async fn read_and_dispatch(
        &self,
        parts: &http::request::Parts,
        body: Incoming,
        limit: usize,
        conn: &Conn,
        call: &mut Call,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        // Read the (bounded) body before answering anything: an answer sent
        // while the client is still sending resets the HTTP/2 stream.
        match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await {
            Ok(Ok(body)) => self.dispatch(parts, &body.to_bytes(), conn, call).await,
            Ok(Err(e)) => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                format!("request body: {e}"),
            )),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {}s",
                    BODY_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    async fn dispatch(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        conn: &Conn,
        call: &mut Call,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let path = parts.uri.path();
        match (&parts.method, path) {
            (&Method::GET, "/v1/bundle") => Ok(self.bundle(parts)),
            (&Method::POST, "/v1/renew") => self.renew(parts, body, conn, call).await,
            (&Method::POST, "/v1/bootstrap") => self.bootstrap(parts, body, call).await,
            (_, "/v1/bundle" | "/v1/renew" | "/v1/bootstrap") => Err(ApiError {
                allow: Some(if path == "/v1/bundle" { "GET" } else { "POST" }),
                ..ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{} is not allowed on {path}", parts.method),
                )
            }),
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint {path}"),
            )),
        }
    }

    /// `GET /v1/bundle`.
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

    /// `POST /v1/renew`.
    async fn renew(
        &self,
        req: &http::request::Parts,
        body: &[u8],
        conn: &Conn,
        call: &mut Call,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        call.kind = Some(IssuanceKind::Renew);
        let Some(peer) = &conn.svid else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_certificate_required",
                "renewal needs the caller's current SVID as its TLS client certificate",
            ));
        };
        if crate::ca::now().unix_timestamp() > peer.not_after {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_certificate_expired",
                "the SVID this connection was opened with has expired; bootstrap again",
            ));
        }
        self.still_trusted(conn, peer)?;
        let serial = presented_serial(conn).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_certificate_required",
                "the client certificate cannot be read",
            )
        })?;
        // `still_trusted` brought the loaded state up to date.
        let serial_hex = crate::ca::serial_hex(&serial);
        let ancestor = self
            .lineage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .revoked_ancestor(&serial_hex, &self.revoked.load().set);
        if let Some(ancestor) = ancestor {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "certificate_revoked",
                format!(
                    "the certificate with serial {serial_hex} was renewed from the revoked \
                     certificate {ancestor}; it renews no more (bootstrap again with a new \
                     credential)"
                ),
            ));
        }
        if self.revoked.load().set.contains_raw(&serial) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "certificate_revoked",
                format!(
                    "the certificate with serial {} is revoked; it renews no more \
                     (bootstrap again with a new credential)",
                    crate::ca::serial_hex(&serial)
                ),
            ));
        }
        let id = peer.spiffe_id.clone();
        check_requested_id(req, &id)?;
        let key = parse_csr(body)?;
        let issued = self
            .issue(
                id.clone(),
                key,
                format!("renew:{id}"),
                Some(serial_hex.clone()),
                call.peer.ip(),
            )
            .await?;
        self.lineage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                issued.entry.serial.clone(),
                serial_hex,
                &issued.entry.not_after,
            );
        tracing::info!(spiffe_id = %id, serial = %issued.entry.serial, "renewed");
        Ok(self.issued_response(&issued))
    }

    /// Verifies the connection's client chain again, against the trust
    /// bundle in force now: the handshake may have been verified against
    /// an older one (a connection opened before `rotate root finish`, or
    /// the first one after it, before the directory was looked at again),
    /// and a certificate that chains only to a root that left the bundle
    /// must not be renewed into one from the new root.
    fn still_trusted(&self, conn: &Conn, peer: &VerifiedSvid) -> Result<(), ApiError> {
        // Whatever changed in the CA directory up to now, without the
        // once-a-second throttle (a few `stat`s).
        self.refresh_now();
        let untrusted = |why: String| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "client_certificate_untrusted",
                format!(
                    "the SVID this connection was opened with no longer chains to the CA's \
                     trust bundle ({why}); bootstrap again"
                ),
            )
        };
        let Some((leaf, intermediates)) = conn.chain.split_first() else {
            return Err(untrusted("no certificate".into()));
        };
        let verified = self
            .verifier
            .load()
            .verify(
                leaf,
                intermediates,
                rustls::pki_types::UnixTime::now(),
                keyproof_identity::verify::Usage::ClientAuth,
            )
            .map_err(|e| untrusted(e.to_string()))?;
        if verified.spiffe_id != peer.spiffe_id {
            return Err(untrusted("another identity".into()));
        }
        Ok(())
    }

    /// `POST /v1/bootstrap`: routes the bearer credential by its shape.
    async fn bootstrap(
        &self,
        req: &http::request::Parts,
        body: &[u8],
        call: &mut Call,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let credential = bearer(req);
        let is_join_token = credential.is_some_and(|c| c.starts_with(JOIN_TOKEN_PREFIX));
        let is_jwt = !is_join_token && credential.is_some_and(attest::looks_like_jwt);
        call.kind = Some(if is_jwt {
            IssuanceKind::BootstrapSa
        } else {
            IssuanceKind::BootstrapToken
        });
        let credential = credential.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "bootstrap needs `Authorization: Bearer <join token or ServiceAccount token>`",
            )
        })?;
        if is_join_token {
            self.bootstrap_join_token(req, credential, body, call).await
        } else if is_jwt {
            // Who the token claims to be, for the log of any refusal below
            // (unverified; replaced by the verified `sub` once it is).
            call.claimed_sub = claimed_sub(credential);
            self.bootstrap_service_account(req, credential, body, call)
                .await
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                TokenError::Invalid.code(),
                "the bearer credential is neither a join token nor a ServiceAccount token",
            ))
        }
    }

    /// Bootstrap with a single-use join token. The token is reserved first
    /// (so concurrent uses get one certificate between them) and spent only
    /// once the certificate is signed and in the ledger: a refusal or a
    /// failure on the way (the query, the CSR, the rate limit, signing, the
    /// ledger) leaves it usable.
    ///
    /// A crash after the ledger commit and before the token's `used` line is
    /// written leaves a certificate in the ledger that was never delivered
    /// and the token usable once more; the other order would spend a token on
    /// a certificate that was never delivered, which the client cannot
    /// recover from.
    ///
    /// With a store, taking the token is the atomic `UPDATE` that marks it
    /// used ([`PgStore::token_take`]), the reservation and the spending in
    /// one; a request that ends without the certificate gives it back
    /// ([`PgStore::token_give_back`], retried in the background while the
    /// database is down). A replica that dies between the two leaves the
    /// token used without a certificate: create a new one.
    async fn bootstrap_join_token(
        &self,
        req: &http::request::Parts,
        token: &str,
        body: &[u8],
        call: &mut Call,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let refused = |e: TokenError, call: &mut Call| {
            // A reused or expired token is one the CA issued: name it. An
            // unknown one names nothing.
            if e != TokenError::Invalid {
                call.token_id = Some(token::id_of(token));
            }
            ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string())
        };
        let (held, token_id, id) = match &self.store {
            None => {
                let reserved = {
                    let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
                    tokens.reserve(&self.dir, token, crate::ca::now())
                }
                .map_err(ca_error)?;
                let (token_id, id) = reserved.map_err(|e| refused(e, call))?;
                let held = HeldToken::File {
                    tokens: &self.tokens,
                    dir: &self.dir,
                    id: token_id.clone(),
                    spent: false,
                    submitted: false,
                };
                (held, token_id, id)
            }
            Some(link) => {
                link.usable()?;
                // One UPDATE across every replica: of two requests with the
                // same token, only one gets it.
                // A take that times out may still commit later: the token
                // is then used without a certificate (create a new one).
                let taken = match tokio::time::timeout(
                    STORE_OP_TIMEOUT,
                    link.db.token_take(&token_sha256(token), &link.replica),
                )
                .await
                {
                    Ok(Ok(t)) => {
                        link.answered();
                        t
                    }
                    Ok(Err(e)) => {
                        link.failed("token_take", &e);
                        return Err(store_unavailable(e));
                    }
                    Err(_) => return Err(link.timed_out("token_take")),
                };
                let t = taken.map_err(|e| refused(e, call))?;
                let (token_id, id) = (t.id.clone(), t.spiffe_id.clone());
                let held = HeldToken::Store {
                    link: link.clone(),
                    taken: Some(t),
                    submitted: false,
                };
                (held, token_id, id)
            }
        };
        call.token_id = Some(token_id.clone());
        let issued = async {
            if let Some(w) = requested_id(req)? {
                if w != id {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "id_mismatch",
                        format!("the token is for {id}, not {w}"),
                    ));
                }
            }
            let key = parse_csr(body)?;
            self.sign(
                id.clone(),
                key,
                format!("bootstrap:{token_id}"),
                call.peer.ip(),
            )
        }
        .await;
        let issued = match issued {
            Ok(i) => i,
            Err(e) => {
                // Usable again before the refusal is answered, so that
                // the client may retry at once.
                held.release().await;
                return Err(e);
            }
        };
        // From here the ledger may hold a certificate for this token: if
        // this request is dropped (the client went away) the token stays
        // used, so that a retry cannot get a second certificate.
        let mut held = held;
        held.submitted();
        match self.record(&issued).await {
            Ok(()) => {}
            // Nothing was written: the token may be used again.
            Err(Recorded::Failed(e)) => {
                held.release().await;
                return Err(e);
            }
            // It may yet be written: the token stays used.
            Err(Recorded::Unknown(e)) => {
                drop(held);
                return Err(e);
            }
        }
        held.spend(&self.dir).map_err(|e| match e {
            // Another process on this directory spent it first: as if
            // this one had seen that at the start.
            CaError::TokenSpent(_) => refused(TokenError::Reused, call),
            e => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ca_unavailable",
                format!(
                    "the join token could not be marked used, so the certificate is withheld: {e}"
                ),
            ),
        })?;
        tracing::info!(spiffe_id = %id, token = %token_id, serial = %issued.entry.serial, "bootstrapped");
        Ok(self.issued_response(&issued))
    }

    /// Bootstrap with a Kubernetes ServiceAccount token. The token stays
    /// usable until it expires: a restarted pod presents it again.
    async fn bootstrap_service_account(
        &self,
        req: &http::request::Parts,
        token: &str,
        body: &[u8],
        call: &mut Call,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let Some(attestor) = &self.attestor else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "sa_token_not_accepted",
                "this CA does not accept ServiceAccount tokens (it runs without --k8s-jwks)",
            ));
        };
        let wanted = requested_id(req)?;
        let key = parse_csr(body)?;
        let claims = attestor
            .verify(token, crate::ca::now().unix_timestamp())
            .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string()))?;
        let sub = format!(
            "system:serviceaccount:{}:{}",
            claims.namespace, claims.service_account
        );
        call.claimed_sub = None;
        call.sub = Some(sub.clone());
        let id = claims
            .spiffe_id(self.loaded.load().ca.trust_domain())
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "sa_token_malformed",
                    format!("no SPIFFE ID for {sub}: {e}"),
                )
            })?;
        if let Some(w) = wanted {
            if w != id {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "id_mismatch",
                    format!("the ServiceAccount token is for {id}, not {w}"),
                ));
            }
        }
        let issued = self
            .issue(
                id.clone(),
                key,
                format!("bootstrap:sa:{sub}/{}", claims.pod_name),
                None,
                call.peer.ip(),
            )
            .await?;
        tracing::info!(spiffe_id = %id, sub = %sub, pod = %claims.pod_name, serial = %issued.entry.serial, "bootstrapped with a ServiceAccount token");
        Ok(self.issued_response(&issued))
    }

    /// One admin request.
    fn admin(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        match req.uri().path() {
            "/healthz" => text_response(StatusCode::OK, "ok\n".into()),
            "/ready" => {
                let ready = self.readiness();
                self.note_readiness(&ready);
                self.metrics.set_ready(ready.is_ok());
                match ready {
                    Ok(()) => text_response(StatusCode::OK, "ready\n".into()),
                    // What is wrong, not the details (file paths, token
                    // URIs, database errors): the port answers anyone who
                    // reaches it. The log has them.
                    Err(why) => text_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {} (the log says why)\n", why.what),
                    ),
                }
            }
            "/metrics" => {
                // The same answer /ready gives, so that an alert sees a CA
                // that runs but cannot issue.
                let ready = self.readiness();
                self.note_readiness(&ready);
                self.metrics.set_ready(ready.is_ok());
                self.update_gauges();
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.render())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            _ => text_response(
                StatusCode::NOT_FOUND,
                "try /healthz, /ready or /metrics\n".into(),
            ),
        }
    }

    /// Logs a change of readiness (not every probe: a kubelet probes every
    /// few seconds).
    fn note_readiness(&self, ready: &Result<(), NotReady>) {
        let mut was = self.was_ready.lock().unwrap_or_else(|p| p.into_inner());
        match (ready, *was) {
            (Err(_), Some(false)) | (Ok(()), None | Some(true)) => {}
            (Err(why), None | Some(true)) => {
                tracing::warn!(reason = %why.what, detail = %why.detail, "not ready");
            }
            (Ok(()), Some(false)) => tracing::info!("ready again"),
        }
        *was = Some(ready.is_ok());
    }

    /// Ready when the current CA directory is loaded, its key signs and
    /// the ledger can be appended to (with a store: the database answers).
    fn readiness(&self) -> Result<(), NotReady> {
        self.refresh();
        if let Some(e) = self
            .reload_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            // With a store, every replica waits for the same thing (a
            // rotated key reaching the key directory from a Secret): were
            // they all unready meanwhile, the Service would have no
            // endpoint, although each still issues from its previous,
            // valid chain. So a replica with a valid previous state stays
            // ready, and says it lags in `keyproof_ca_store_state_current`
            // and its log.
            let previous_valid = self.loaded.load().ca.intermediate_not_after > crate::ca::now();
            if self.store.is_none() || !previous_valid {
                return Err(NotReady::new("the CA directory cannot be loaded", e));
            }
        }
        if let Some(why) = self.off_bundle() {
            return Err(NotReady::new(
                "the loaded chain is not in the store's bundle",
                &why,
            ));
        }
        self.key_ready()
            .map_err(|e| NotReady::new("the intermediate key does not sign", e))?;
        match &self.store {
            Some(link) => link
                .status()
                .map_err(|e| NotReady::new("the store's database does not answer", e)),
            None => self
                .ledger
                .writable(&self.dir)
                .map_err(|e| NotReady::new("the ledger cannot be appended to", e)),
        }
    }

    /// Why the loaded chain does not chain to the store's bundle, if so
    /// (see [`Server::off_bundle`]).
    fn off_bundle(&self) -> Option<String> {
        self.off_bundle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the intermediate's key signs: always for a key in memory;
    /// for a token key, while its last operation succeeded, and after a
    /// failure once a probe (which reopens the token when due) succeeds.
    fn key_ready(&self) -> Result<(), String> {
        let loaded = self.loaded.load();
        let Some(key) = loaded.ca.intermediate_key() else {
            return Err("the CA has no signing key loaded".into());
        };
        if key.is_available() {
            return Ok(());
        }
        let uri = key.pkcs11().map(|k| k.uri()).unwrap_or_default();
        key.probe()
            .map_err(|e| format!("the intermediate key ({uri}) is unavailable: {e}"))
    }

    /// Probes the intermediate's token key, logging a change.
    fn probe_key(&self) -> bool {
        let loaded = self.loaded.load();
        let Some(key) = loaded.ca.intermediate_key() else {
            return true;
        };
        if key.pkcs11().is_none() {
            return true;
        }
        let was = key.is_available();
        match key.probe() {
            Ok(()) => {
                if !was {
                    tracing::info!("the intermediate's token key signs again");
                }
                true
            }
            Err(e) => {
                if was {
                    tracing::error!(error = %e, "the intermediate's token key stopped signing");
                }
                false
            }
        }
    }
}

/// Why the server is not ready: `what` for `/ready`, `detail` for the log.
#[derive(Debug)]
struct NotReady {
    what: &'static str,
    detail: String,
}

impl NotReady {
    fn new(what: &'static str, detail: impl std::fmt::Display) -> NotReady {
        NotReady {
            what,
            detail: detail.to_string(),
        }
    }
}

/// The `sub` an unverified JWT claims, for logs only: printable ASCII of a
/// sane length, or nothing.
fn claimed_sub(jwt: &str) -> Option<String> {
    let payload = URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1)?).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    let sub = v.get("sub")?.as_str()?;
    (!sub.is_empty() && sub.len() <= 256 && sub.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| sub.to_owned())
}

/// The DER serial of the connection's client certificate.
fn presented_serial(conn: &Conn) -> Option<Vec<u8>> {
    let (_, leaf) = x509_parser::parse_x509_certificate(conn.chain.first()?).ok()?;
    Some(leaf.tbs_certificate.raw_serial().to_vec())
}

/// Identity and expiry of a client certificate the handshake verified (the
/// verifier already applied every SVID rule; only the ID is read here).
/// `not_after` is the leaf's own: a renewal is refused past it.
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

fn text_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The credential of `Authorization: Bearer <credential>`. The scheme is
/// case-insensitive (RFC 9110 section 11.1) and may be followed by any run
/// of spaces and tabs; the credential is trimmed. `None` without the header,
/// with another scheme, or with no credential.
fn bearer(req: &http::request::Parts) -> Option<&str> {
    const WS: [char; 2] = [' ', '\t'];
    let value = req.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credential) = value.trim_matches(WS).split_once(WS)?;
    let credential = credential.trim_matches(WS);
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

/// Decodes one name or value of a form-encoded query (`+` is a space,
/// `%XX` a byte), as Go's `url.Values` and Python's `urlencode` write it.
fn form_decode(s: &str) -> Result<String, ApiError> {
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "the query has a malformed percent escape",
                    ))
                }
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request("the query is not UTF-8"))
}

/// The `?spiffe_id=` the caller asks for, if any (form-encoded, see
/// [`form_decode`]). It may be given once; any other parameter is refused,
/// so that a misspelt or duplicated one never goes unnoticed and a caller
/// never gets another identity than the one it meant to ask for.
fn requested_id(req: &http::request::Parts) -> Result<Option<SpiffeId>, ApiError> {
    let Some(q) = req.uri.query() else {
        return Ok(None);
    };
    let mut wanted = None;
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = form_decode(name)?;
        if name != "spiffe_id" {
            let shown: String = name.chars().take(64).collect();
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {shown:?}; the only one is spiffe_id"
            )));
        }
        if wanted.is_some() {
            return Err(ApiError::bad_request("spiffe_id is given more than once"));
        }
        let id = SpiffeId::parse(&form_decode(value)?)
            .map_err(|e| ApiError::bad_request(format!("spiffe_id: {e}")))?;
        wanted = Some(id);
    }
    Ok(wanted)
}

fn check_requested_id(req: &http::request::Parts, id: &SpiffeId) -> Result<(), ApiError> {
    match requested_id(req)? {
        Some(w) if &w != id => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "id_mismatch",
            format!("a renewal is only for the caller's own identity {id}, not {w}"),
        )),
        _ => Ok(()),
    }
}

fn parse_csr(body: &[u8]) -> Result<SubjectKey, ApiError> {
    let der = csr::decode(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    csr::verify(&der).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))
}

/// Runs the server until `shutdown` resolves.
pub async fn run(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    // main.rs checks --ttl too; a library caller gets the same refusal at
    // startup rather than a 503 on every issuance.
    crate::ca::Lifetime::Svid
        .check(opts.ttl)
        .map_err(CaError::from)?;
    // With a store, the server runs on a workspace checked out of it (the
    // documents, and the keys from --dir); `follow_store` keeps it current.
    let (dir, db, workspace) = match &opts.store {
        StoreSpec::Dir => (opts.dir.clone(), None, None),
        spec @ StoreSpec::Postgres(_) => {
            let Store::Postgres { db, .. } = Store::open(spec, &opts.dir, true).await? else {
                unreachable!("a postgres:// spec opens PostgreSQL");
            };
            // Read-only, no root key, and, while the current
            // intermediate's key has not reached --dir, the previous
            // intermediate (see `PgStore::checkout_serve`).
            let ws = db.checkout_serve(&opts.dir).await?;
            tracing::info!(
                store = db.url(),
                schema_version = crate::store::schema::VERSION,
                generation = ws.generation(),
                key_dir = %opts.dir.display(),
                "CA store connected, schema up to date"
            );
            (ws.path().to_owned(), Some(db), Some(ws))
        }
    };
    let ca = Ca::open_with(&dir, &opts.key_access())?;
    let attestor = opts
        .service_accounts
        .clone()
        .map(SaAttestor::new)
        .transpose()?;
    let metrics = Arc::new(CaMetrics::with(attestor.is_some(), db.is_some()));
    let store = db.map(|db| {
        metrics.set_store_up(true);
        Arc::new(StoreLink {
            db,
            replica: replica_name(),
            problem: Mutex::new(None),
            metrics: metrics.clone(),
        })
    });
    if let Some(ws) = &workspace {
        metrics.set_store_generation(ws.generation());
    }
    // Before the first signature, so that it is counted too.
    watch_key(&ca, &metrics);
    let verifier: SharedVerifier = Arc::new(ArcSwap::from_pointee(verifier_for(&ca)?));
    let (ck, renew_in, own_not_after) = own_cert(&ca, &opts)?;
    let own = Arc::new(OwnCert(ArcSwap::from_pointee(ck)));
    // Without resumption (see `server_config`) every renewal comes with
    // fresh proof of key possession.
    let tls = keyproof_identity::tls::server_config(
        SvidClientVerifier::new(Shared(verifier.clone()), false),
        own.clone(),
    )
    .map_err(|e| ServeError::Tls(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let bind_err = |source| ServeError::Bind {
        addr: opts.listen,
        source,
    };
    let listener = TcpListener::bind(opts.listen).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let admin_err = |source| ServeError::AdminBind {
        addr: opts.admin_listen,
        source,
    };
    let admin = TcpListener::bind(opts.admin_listen)
        .await
        .map_err(admin_err)?;
    let admin_local = admin.local_addr().map_err(admin_err)?;
    tracing::info!(
        listen = %local,
        admin_listen = %admin_local,
        trust_domain = %ca.trust_domain(),
        service_account_issuer = attestor.as_ref().map(|a| a.config().issuer.as_str()),
        "keyproof-ca serving"
    );
    let mut tokens = TokenStore::default();
    if store.is_none() {
        tokens.refresh(&dir)?;
    }
    if let Some(k) = ca.intermediate_key().and_then(|k| k.pkcs11()) {
        tracing::info!(key = %k.uri(), "the intermediate key is in a PKCS#11 token");
    }
    let sink = match &store {
        None => ledger::Sink::Dir(dir.clone()),
        Some(link) => ledger::Sink::Postgres {
            db: link.db.clone(),
            failed: metrics.store_error_counter("ledger_append"),
        },
    };
    let server = Arc::new(Server {
        loaded: ArcSwap::from_pointee(Loaded {
            stamp: stamp(&dir),
            ca,
        }),
        revoked: ArcSwap::from_pointee(Revocations {
            stamp: revoked_stamp(&dir),
            set: RevokedSet::load(&dir)?,
        }),
        lineage: Mutex::new(seed_lineage(&dir)),
        dir,
        store: store.clone(),
        refreshing: AtomicBool::new(false),
        reloading: Mutex::new(()),
        reload_error: Mutex::new(None),
        off_bundle: Mutex::new(None),
        verifier,
        own,
        own_renew_at: Mutex::new(Instant::now() + renew_in),
        own_expiry: AtomicI64::new(own_not_after),
        tokens: Mutex::new(tokens),
        attestor,
        ledger: ledger::GroupWriter::start(sink, metrics.ledger_commit()),
        limiter: RateLimiter {
            per_minute: opts.per_identity_per_minute,
            windows: Mutex::new(HashMap::new()),
        },
        bodies: BodyBudget::new(BODY_BUDGET, BODY_SHARE),
        last_check: Mutex::new(Instant::now()),
        metrics,
        was_ready: Mutex::new(None),
        opts,
    });
    server.update_gauges();
    let admin_task = tokio::spawn({
        let server = server.clone();
        crate::admin::serve(
            admin,
            Arc::new(move |req: &Request<Incoming>| server.admin(req)),
        )
    });
    // PKCS#11 calls block: probes run on the blocking pool.
    let probe_task = tokio::spawn({
        let server = server.clone();
        async move {
            let mut wait = KEY_PROBE_INTERVAL;
            loop {
                tokio::time::sleep(wait).await;
                let s = server.clone();
                let ok = tokio::task::spawn_blocking(move || s.probe_key())
                    .await
                    .unwrap_or(false);
                wait = if ok {
                    KEY_PROBE_INTERVAL
                } else {
                    Duration::from_secs(1)
                };
            }
        }
    });
    if ws_falls_back(&workspace) {
        server.metrics.set_store_state_current(false);
    }
    let store_tasks = match (&store, workspace) {
        (Some(link), Some(ws)) => vec![
            tokio::spawn(follow_store(
                server.clone(),
                link.clone(),
                server.opts.dir.clone(),
                ws,
            )),
            tokio::spawn(ping_store(link.clone())),
        ],
        _ => Vec::new(),
    };
    let table = ConnTable::new(
        MAX_CONNECTIONS,
        server.opts.max_connections_per_ip,
        IDLE_TIMEOUT,
        server.metrics.clone(),
    );
    tokio::pin!(shutdown);
    loop {
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
        // A slot, possibly evicting an idle connection (see `crate::conns`);
        // without one the socket is closed at once, so that an address
        // holding busy connections gets no further one.
        let slot = match table.admit(addr.ip()) {
            Ok(s) => s,
            Err(refused) => {
                tracing::debug!(peer = %addr, reason = refused.reason(), "API connection refused");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            let state = slot.conn.clone();
            // Dropping the connection's future closes the socket.
            let reason = tokio::select! {
                r = serve_conn(server.clone(), acceptor, tcp, addr, slot) => r,
                _ = state.evicted() => "evicted",
            };
            // An eviction is counted by the table.
            if reason != "evicted" {
                server.metrics.connection_closed(reason);
            }
        });
    }
    admin_task.abort();
    probe_task.abort();
    for t in store_tasks {
        t.abort();
    }
    Ok(())
}

/// Serves one API connection: the TLS handshake, then HTTP until the client
/// is done or the connection has had nothing in flight for
/// [`IDLE_TIMEOUT`]. Returns why it ended (a `reason` of
/// `keyproof_ca_connections_closed_total`).
async fn serve_conn(
    server: Arc<Server>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    slot: Arc<Slot>,
) -> &'static str {
    // The handshake verifies the client against the loaded bundle: bring
    // it up to date first (at most once a second; a renewal checks again,
    // see `Server::renew`).
    server.refresh();
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
            return "handshake_failed";
        }
        Err(_) => {
            tracing::info!(peer = %addr, "TLS handshake timed out");
            return "handshake_timeout";
        }
    };
    // The handshake verified the chain (resumption is off, so every
    // connection is a full handshake); keep the identity and expiry
    // to refuse renewals once the SVID lapses on a long-lived
    // connection.
    let session = tls.get_ref().1;
    let conn = Conn {
        addr,
        svid: session.peer_certificates().and_then(peer_svid),
        chain: session
            .peer_certificates()
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
            .unwrap_or_default(),
    };
    if conn.svid.is_some() {
        slot.conn.set_authenticated();
    }
    tracing::debug!(
        peer = %addr,
        spiffe_id = conn.svid.as_ref().map(|p| p.spiffe_id.as_str()),
        group = session
            .negotiated_key_exchange_group()
            .map(|g| keyproof_identity::tls::group_label(g.name())),
        "TLS handshake"
    );
    let svc = {
        let server = server.clone();
        let conn = conn.clone();
        let slot = slot.clone();
        hyper::service::service_fn(move |req| {
            // In flight from the head until the answer is produced: the
            // connection is neither idle nor evictable meanwhile.
            let in_flight = slot.request();
            let server = server.clone();
            let conn = conn.clone();
            async move {
                let r = server.handle(req, conn).await;
                drop(in_flight);
                Ok::<_, Infallible>(r)
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_header_list_size(MAX_HEADERS as u32);
    let http = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(http);
    let (result, reason) = tokio::select! {
        r = http.as_mut() => (r, "ended"),
        _ = slot.idle() => {
            // HTTP/2: GOAWAY, then the close once nothing is in flight;
            // HTTP/1.1: the close after the answer in progress, if any.
            // Bounded, for a client that never reads what it is sent.
            http.as_mut().graceful_shutdown();
            tracing::debug!(peer = %addr, "API connection idle; closing it");
            match tokio::time::timeout(CLOSE_GRACE, http.as_mut()).await {
                Ok(r) => (r, "idle"),
                Err(_) => (Ok(()), "idle"),
            }
        }
    };
    if let Err(e) = result {
        let too_large = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large);
        if too_large {
            // hyper answered 431 itself (the request never reached
            // `handle`); count and log it like any refusal.
            let refused = ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_too_large",
                format!("the request head is over {MAX_HEADERS} bytes"),
            );
            server.metrics.refusal(refused.code);
            Call::new(&conn).log_refusal(&refused);
        } else {
            tracing::debug!(peer = %addr, error = %e, "connection ended");
        }
    }
    reason
}

/// Keeps the workspace `ws` (the directory `server` serves) up to date with
/// the store: at every generation change `PgStore::watch` reports, and at
/// least every [`STORE_INTERVAL`] (key files in `key_dir` may change
/// without one: a Kubernetes Secret update). Whatever changed is reloaded
/// at once, not at the next request, so that a rotation committed to the
/// store is served within about a second.
/// Whether the served workspace holds the previous intermediate because
/// the current one's key has not reached the key directory yet.
fn ws_falls_back(ws: &Option<Workspace>) -> bool {
    ws.as_ref().is_some_and(Workspace::fallback)
}

async fn follow_store(
    server: Arc<Server>,
    link: Arc<StoreLink>,
    key_dir: PathBuf,
    mut ws: Workspace,
) {
    let mut changes = link.db.watch();
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    // The watcher is gone: poll.
                    tokio::time::sleep(STORE_INTERVAL).await;
                }
            }
            _ = tokio::time::sleep(STORE_INTERVAL) => {}
        }
        server.refreshing.store(true, Ordering::Release);
        // A database that does not answer must not wedge the follower:
        // `refresh` only reads from it before it writes files, so giving up
        // leaves the workspace as it was.
        let r =
            match tokio::time::timeout(STORE_REFRESH_TIMEOUT, link.db.refresh(&key_dir, &mut ws))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(StoreError::Unreachable {
                    url: link.db.url().to_owned(),
                    msg: format!(
                        "no answer to a refresh within {}s",
                        STORE_REFRESH_TIMEOUT.as_secs()
                    ),
                }),
            };
        server.refreshing.store(false, Ordering::Release);
        match r {
            Ok(changed) => {
                link.answered();
                server.metrics.set_store_generation(ws.generation());
                if last_error.take().is_some() {
                    tracing::info!("the workspace is up to date with the store again");
                }
                if changed {
                    tracing::info!(
                        generation = ws.generation(),
                        "the CA store changed; reloading"
                    );
                    // Opening the CA reads files (and may open a token).
                    let s = server.clone();
                    let _ = tokio::task::spawn_blocking(move || s.reload(true)).await;
                    if ws.fallback() {
                        // Serving the previous intermediate on purpose.
                        server.metrics.set_store_state_current(false);
                    }
                } else if !ws.fallback()
                    && server
                        .reload_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_none()
                {
                    // Up to date, and what it holds is loaded (a failed
                    // reload keeps the gauge at 0 until one succeeds).
                    server.metrics.set_store_state_current(true);
                }
            }
            Err(e) => {
                // The replica keeps serving what it has, which may be
                // behind the store: show it.
                server.metrics.set_store_state_current(false);
                link.failed("refresh", &e);
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!(error = %msg, "could not bring the workspace up to date with the store; serving the previous state");
                }
                last_error = Some(msg);
            }
        }
    }
}

/// Pings the database every [`STORE_INTERVAL`] for `/ready` and
/// `keyproof_ca_store_up`, so that a probe never waits on the database and
/// the database sees at most one ping a second from a replica.
async fn ping_store(link: Arc<StoreLink>) {
    loop {
        tokio::time::sleep(STORE_INTERVAL).await;
        match tokio::time::timeout(STORE_PING_TIMEOUT, link.db.ping()).await {
            Ok(Ok(())) => link.answered(),
            Ok(Err(e)) => link.failed("ping", &e),
            Err(_) => {
                link.metrics.store_error("ping");
                link.down(format!(
                    "no answer to a ping within {}s",
                    STORE_PING_TIMEOUT.as_secs()
                ));
            }
        }
    }
}

/// Counts every operation of the intermediate's token key in
/// `keyproof_ca_key_operations_total`.
fn watch_key(ca: &Ca, metrics: &CaMetrics) {
    if let Some(k) = ca.intermediate_key().and_then(|k| k.pkcs11()) {
        let counter = metrics.key_operations();
        k.on_operation(Arc::new(move |r| {
            counter.with_label_values(&[r.as_str()]).inc();
        }));
    }
}

/// [`Lineage`] from the renewals in `ledger.jsonl` (none with a store: its
/// ledger is a table; the replica learns the renewals it issues). A ledger
/// that cannot be read starts it empty: revocation by serial still holds.
fn seed_lineage(dir: &Path) -> Lineage {
    let mut l = Lineage::default();
    match ledger::read_all(dir) {
        Ok(entries) => {
            for e in entries {
                if let Some(p) = e.renewed_from {
                    l.insert(e.serial, p, &e.not_after);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "the ledger's renewal links could not be read"),
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewal that raced `revoke` is not on the list, its ancestor is:
    /// the walk up finds it; expired links are not kept.
    #[test]
    fn a_certificate_descending_from_a_revoked_one_is_found() {
        let later = "2099-01-01T00:00:00Z";
        let mut l = Lineage::default();
        l.insert("bb".into(), "aa".into(), later);
        l.insert("cc".into(), "bb".into(), later);
        l.insert("ee".into(), "dd".into(), later);
        l.insert("old".into(), "aa".into(), "2001-01-01T00:00:00Z");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(files::REVOKED),
            r#"{"revoked":[{"serial":"aa","spiffe_id":"x","not_after":"2099-01-01T00:00:00Z","revoked_at":"2026-01-01T00:00:00Z","by":"serial:aa"}]}"#,
        )
        .unwrap();
        let revoked = RevokedSet::load(dir.path()).unwrap();
        assert_eq!(l.revoked_ancestor("cc", &revoked).as_deref(), Some("aa"));
        assert_eq!(l.revoked_ancestor("bb", &revoked).as_deref(), Some("aa"));
        assert_eq!(l.revoked_ancestor("ee", &revoked), None);
        assert_eq!(l.revoked_ancestor("aa", &revoked), None);
        assert!(!l.parents.contains_key("old"));
    }

    /// The body budget is shared: once it is spent, a request is refused
    /// with 503 `server_busy` at once, until an answer gives bytes back;
    /// and one address holds at most its share of it (round 10, keys F8:
    /// slow uploads from one address held it all).
    #[test]
    fn the_body_budget_refuses_beyond_its_bytes_and_an_address_beyond_its_share() {
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let budget = BodyBudget::new(BODY_BUDGET, BODY_SHARE);
        let per_ip = BODY_SHARE / MAX_BODY;
        let mut held = Vec::new();
        for n in 0..(BODY_BUDGET / BODY_SHARE) as u8 {
            for _ in 0..per_ip {
                held.push(budget.take(MAX_BODY, ip(n)).unwrap());
            }
            // This address has its share; the others still get theirs.
            let refused = budget.take(1, ip(n)).unwrap_err();
            assert_eq!(refused.code, "server_busy");
        }
        let refused = budget.take(1, ip(200)).unwrap_err();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.code, "server_busy");
        assert!(crate::metrics::API_CODES.contains(&refused.code));
        drop(held);
        assert!(budget.by_ip.lock().unwrap().is_empty());
        assert!(budget.take(MAX_BODY, ip(0)).is_ok());
    }

    fn parts(uri: &str, auth: Option<&str>) -> http::request::Parts {
        let mut b = Request::builder().method(Method::POST).uri(uri);
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_credential_trimmed() {
        for (header, want) in [
            ("Bearer a.b.c", Some("a.b.c")),
            ("bearer a.b.c", Some("a.b.c")),
            ("BEARER kpt_x", Some("kpt_x")),
            ("Bearer\ta.b.c", Some("a.b.c")),
            ("Bearer \t  a.b.c \t", Some("a.b.c")),
            (" Bearer a.b.c", Some("a.b.c")),
            ("Bearer", None),
            ("Bearer   ", None),
            ("Bearera.b.c", None),
            ("Basic a.b.c", None),
            ("Token a.b.c", None),
        ] {
            assert_eq!(
                bearer(&parts("/v1/bootstrap", Some(header))),
                want,
                "{header:?}"
            );
        }
        assert_eq!(bearer(&parts("/v1/bootstrap", None)), None);
    }

    fn wanted(query: &str) -> Result<Option<String>, &'static str> {
        requested_id(&parts(&format!("/v1/bootstrap{query}"), None))
            .map(|id| id.map(|i| i.to_string()))
            .map_err(|e| e.code)
    }

    #[test]
    fn the_requested_id_is_form_decoded_given_once_and_alone() {
        let web = "spiffe://example.org/ns/default/sa/web";
        assert_eq!(wanted(""), Ok(None));
        assert_eq!(wanted("?"), Ok(None));
        assert_eq!(wanted(&format!("?spiffe_id={web}")), Ok(Some(web.into())));
        // As Go's url.Values and Python's urlencode send it.
        assert_eq!(
            wanted("?spiffe_id=spiffe%3A%2F%2Fexample.org%2Fns%2Fdefault%2Fsa%2Fweb"),
            Ok(Some(web.into()))
        );
        assert_eq!(
            wanted("?spiffe%5Fid=spiffe%3a%2f%2fexample.org%2Fx"),
            Ok(Some("spiffe://example.org/x".into()))
        );
        for bad in [
            // Repeated, in either order.
            format!("?spiffe_id={web}&spiffe_id=spiffe://example.org/other"),
            format!("?spiffe_id=spiffe://example.org/other&spiffe_id={web}"),
            format!("?spiffe_id={web}&spiffe_id={web}"),
            // Unknown or misspelt parameters.
            format!("?x=1;spiffe_id={web}"),
            format!("?spiffe-id={web}"),
            format!("?spiffe_id={web}&x=1"),
            // Malformed.
            "?spiffe_id".into(),
            "?spiffe_id=".into(),
            "?spiffe_id=spiffe%3".into(),
            "?spiffe_id=spiffe%zz".into(),
            "?spiffe_id=spiffe%+1".into(),
            "?spiffe_id=%FF".into(),
            "?spiffe_id=spiffe://example.org/a+b".into(),
        ] {
            assert_eq!(wanted(&bad), Err("bad_request"), "{bad}");
        }
    }
}
