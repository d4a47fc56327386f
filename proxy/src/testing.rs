//! Helpers shared by the unit tests of `inbound/` and `outbound/`: a
//! throwaway trust domain, workloads issued from it, the configuration
//! around them, metric readings, and requests with hyper's own body
//! type (which has no public constructor).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use keyproof_ca::ca::InitOptions;
use keyproof_ca::csr::SubjectKey;
use keyproof_ca::issue::IssueRequest;
use keyproof_ca::Ca;
use keyproof_identity::keys::KeyType;
use keyproof_identity::{SpiffeId, TrustDomain, Usage};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::oneshot;

use crate::config::Config;
use crate::identity::store::{Identity, IdentityStore, PeerIdentity};
use crate::metrics::Metrics;

/// The test trust domain.
pub(crate) const TD: &str = "unit.keyproof.test";

/// One CA for the whole test binary. Its directory is removed right
/// after `init`: issuing (`Ca::sign`) works from memory and writes
/// nothing.
fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        Ca::init(
            &dir.path().join("ca"),
            &InitOptions {
                trust_domain: TrustDomain::parse(TD).expect("trust domain"),
                key_type: KeyType::EcdsaP256,
                root_ttl: Duration::from_secs(24 * 3600),
                intermediate_ttl: Duration::from_secs(12 * 3600),
            },
        )
        .expect("test CA")
    })
}

/// `spiffe://unit.keyproof.test<path>`.
pub(crate) fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}{path}")).expect("SPIFFE ID")
}

/// A workload's certificate chain and key, issued by the test CA.
pub(crate) struct Workload {
    pub(crate) id: SpiffeId,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) pkcs8: Vec<u8>,
}

/// A P-256 workload at `path` (e.g. `/ns/demo/sa/web`).
pub(crate) fn workload(path: &str) -> Workload {
    workload_with(path, KeyType::EcdsaP256)
}

/// A workload at `path` with a key of type `kt`.
pub(crate) fn workload_with(path: &str, kt: KeyType) -> Workload {
    workload_for(path, kt, Duration::from_secs(3600))
}

/// A workload at `path` with a key of type `kt`, whose certificate is
/// valid for `ttl` from now.
pub(crate) fn workload_for(path: &str, kt: KeyType, ttl: Duration) -> Workload {
    let kp = kt.generate().expect("key");
    let issued = ca()
        .sign(
            &IssueRequest {
                spiffe_id: id(path),
                key: SubjectKey::from_key_pair(&kp, kt),
                ttl,
                dns: vec![],
            },
            "keyproof-proxy unit tests",
        )
        .expect("issue");
    Workload {
        id: id(path),
        chain: vec![issued.leaf, issued.intermediate],
        pkcs8: kp.serialize_der(),
    }
}

impl Workload {
    pub(crate) fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The identity as the proxy loads it, with the key as `key`.
    pub(crate) fn identity_with_key(&self, key: PrivateKeyDer<'static>) -> Identity {
        Identity::from_parts(
            self.chain.clone(),
            key,
            ca().bundle().to_vec(),
            &[Usage::ServerAuth, Usage::ClientAuth],
            None,
        )
        .expect("identity")
    }

    pub(crate) fn identity(&self) -> Identity {
        self.identity_with_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            self.pkcs8.clone(),
        )))
    }

    pub(crate) fn store(&self) -> Arc<IdentityStore> {
        IdentityStore::new(self.identity())
    }

    /// This workload as a verified caller, as the inbound sees it.
    pub(crate) fn peer(&self) -> PeerIdentity {
        PeerIdentity::from_certs(Some(&self.chain)).expect("peer identity")
    }
}

/// A whole configuration: `rest` after an `[identity]` section whose
/// files are never read (identities come from [`Workload::store`]).
pub(crate) fn config(rest: &str) -> Config {
    Config::parse(&format!(
        "[identity]\ntrust_bundle = \"unused.crt\"\n[identity.files]\ncert = \"unused.crt\"\nkey = \"unused.key\"\n{rest}"
    ))
    .unwrap_or_else(|e| panic!("test configuration: {e}\n{rest}"))
}

/// The value of one series in the Prometheus text, e.g.
/// `keyproof_authz_denied_total{route="/admin"}`; 0 when absent.
pub(crate) fn metric(m: &Metrics, series: &str) -> f64 {
    let text = String::from_utf8(m.render()).expect("metrics are text");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("metric value"))
}

/// A request as hyper's HTTP/1.1 server reads it from `raw`, with the
/// client's end of the stream: the request's body is read from it, so
/// keep it while the body matters.
pub(crate) async fn hyper_request<B: From<Incoming>>(raw: &[u8]) -> (Request<B>, DuplexStream) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let (tx, rx) = oneshot::channel();
    let tx = Mutex::new(Some(tx));
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            if let Some(tx) = tx.lock().expect("lock").take() {
                let _ = tx.send(req);
            }
            // No response: the connection stays open for the body.
            std::future::pending::<Result<Response<http_body_util::Empty<Bytes>>, Infallible>>()
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), svc)
            .await;
    });
    client.write_all(raw).await.expect("write request");
    let req: Request<Incoming> = rx.await.expect("hyper parsed the request");
    (req.map(B::from), client)
}

/// An app on loopback that answers one request `200 ok` and hands over
/// the request head it read.
pub(crate) async fn one_request_app() -> (SocketAddr, oneshot::Receiver<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind app");
    let addr = l.local_addr().expect("app address");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = l.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.expect("read head");
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
        let _ = tcp
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        // Held until the proxy has read the response.
        let _ = tcp.read(&mut buf).await;
    });
    (addr, rx)
}

/// An HTTP/2 server written frame by frame, for what the h2 crate's server
/// cannot be made to do on cue: once `after` request heads have arrived
/// (each counted in `heads`), it sends GOAWAY with `last` as the last
/// stream id it processes and `reason` (an HTTP/2 error code), and ends its
/// side, reading on until the client closes (closing with data unread
/// would reset the connection before the client read the GOAWAY).
pub(crate) async fn h2_going_away<T>(
    mut io: T,
    after: usize,
    last: u32,
    reason: u32,
    heads: Arc<std::sync::atomic::AtomicUsize>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;
    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len())
            .expect("a small frame")
            .to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }
    let mut preface = [0u8; 24];
    if io.read_exact(&mut preface).await.is_err() {
        return;
    }
    if io.write_all(&frame(SETTINGS, 0, &[])).await.is_err() {
        return;
    }
    let mut head = [0u8; 9];
    while io.read_exact(&mut head).await.is_ok() {
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if io.read_exact(&mut payload).await.is_err() {
            return;
        }
        let reply = match (head[3], head[4] & ACK) {
            (SETTINGS, 0) => frame(SETTINGS, ACK, &[]),
            (PING, 0) => frame(PING, ACK, &payload),
            (HEADERS, _)
                if heads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == after =>
            {
                let mut goaway = last.to_be_bytes().to_vec();
                goaway.extend_from_slice(&reason.to_be_bytes());
                if io.write_all(&frame(GOAWAY, 0, &goaway)).await.is_err() {
                    return;
                }
                let _ = io.shutdown().await;
                let mut rest = [0u8; 4096];
                while matches!(io.read(&mut rest).await, Ok(n) if n > 0) {}
                return;
            }
            _ => continue,
        };
        if io.write_all(&reply).await.is_err() {
            return;
        }
    }
}
