//! The admin listener: `/metrics`, `/ready`, `/live` and `/identity`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::body::{text, ProxyBody};
use crate::http::server::{Activity, StreamGuard};
use crate::identity::store::IdentityStore;
use crate::listener::HandshakeGate;
use crate::metrics::Metrics;

/// What the admin endpoints report on.
pub struct AdminState {
    /// The proxy's metrics.
    pub metrics: Metrics,
    /// The identity in use.
    pub store: Arc<IdentityStore>,
    /// Set once a certificate is held and every listener is bound.
    pub ready: AtomicBool,
    /// Set when shutdown starts.
    pub draining: AtomicBool,
    /// Where the identity comes from ([`crate::config::IdentityConfig::source_json`]),
    /// shown on `/identity` whether or not a certificate is held yet.
    pub source: serde_json::Value,
}

impl AdminState {
    fn respond(&self, req: &Request<Incoming>) -> Response<ProxyBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        match req.uri().path() {
            "/metrics" => {
                if let Some(id) = self.store.get() {
                    self.metrics.identity_installed(id.not_before, id.not_after);
                }
                let mut r =
                    Response::new(ProxyBody::Full(Some(Bytes::from(self.metrics.render()))));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                let expired = self.store.get().filter(|id| id.not_after <= now);
                if self.draining.load(Ordering::Acquire) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if let Some(why) = self.store.get().and_then(|id| id.key.unavailable()) {
                    // A token that went away: every handshake needing our
                    // signature fails until it is back (the probe notices).
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("identity key unavailable: {why}\n"),
                    )
                } else if let Some(id) = expired {
                    // Peers refuse an expired certificate: taking no traffic
                    // is honest until a new one is installed.
                    let body = format!(
                        "the certificate held (serial {}) expired at {}; waiting for a new one\n",
                        id.serial,
                        id.to_json()["not_after"].as_str().unwrap_or_default()
                    );
                    text(StatusCode::SERVICE_UNAVAILABLE, body)
                } else if self.ready.load(Ordering::Acquire) && self.store.get().is_some() {
                    text(StatusCode::OK, "ready\n")
                } else if self.store.get().is_none() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the first certificate\n",
                    )
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                }
            }
            "/identity" => {
                let (status, mut json) = match self.store.get() {
                    Some(id) => (StatusCode::OK, id.to_json()),
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({"error": "no certificate held yet"}),
                    ),
                };
                if !self.source.is_null() {
                    json["source"] = self.source.clone();
                }
                let body = serde_json::to_vec_pretty(&json).unwrap_or_default();
                let mut r = Response::new(ProxyBody::Full(Some(Bytes::from(body))));
                *r.status_mut() = status;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "try /metrics, /ready, /live or /identity\n",
            ),
        }
    }
}

/// Admin connections kept open at once. Beyond it the oldest is closed for
/// the new one (counted `keyproof_admin_connections_shed_total`): a flood of
/// connections only displaces itself, and a probe or a scrape, which
/// connects afresh and asks at once, is answered unless this many newer
/// connections arrive before its answer (a few milliseconds). The admin
/// port should still be reachable only from the kubelet and Prometheus
/// (a NetworkPolicy): an unauthenticated listener cannot tell a probe from
/// a flood.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a request head may take, from the connection's start or the
/// end of the previous response.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection without a request for this long is closed (Prometheus
/// scrapes every 15-60 s on a kept-alive connection).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The most a request head may take: a few short fields are all the admin
/// endpoints read.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves the admin endpoints until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut stop: watch::Receiver<bool>) {
    let gate = HandshakeGate::new(MAX_CONNECTIONS, state.metrics.admin_shed.clone());
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::http::server::stopped(&mut stop) => return,
        };
        let state = state.clone();
        let slot = gate.admit();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let activity = Activity::default();
            let streams = activity.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let _in_flight = StreamGuard::start(&streams);
                let r = state.respond(&req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = std::pin::pin!(hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(tcp), svc));
            let served = crate::http::server::drive(
                conn,
                |c| c.graceful_shutdown(),
                activity,
                IDLE_TIMEOUT,
                &mut stop,
            );
            tokio::select! {
                _ = served => {}
                _ = slot.evicted() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::identity::store::test_pki::Pki;
    use crate::metrics::sample;

    const TD: &str = "admin.keyproof.test";
    const API: &str = "/ns/demo/sa/api";

    struct Admin {
        addr: SocketAddr,
        state: Arc<AdminState>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(store: Arc<IdentityStore>) -> Admin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(AdminState {
            metrics: Metrics::new().expect("metrics"),
            store,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            source: serde_json::json!({"kind": "ca", "credential": "service_account_token_file"}),
        });
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, state.clone(), rx));
        Admin {
            addr,
            state,
            stop,
            task,
        }
    }

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw))
            .await
            .expect("no response")
            .expect("read");
        let raw = String::from_utf8(raw).expect("UTF-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        Reply {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        request(addr, "GET", path).await
    }

    #[tokio::test]
    async fn connections_are_bounded_oldest_first_and_a_silent_one_is_closed_in_time() {
        let admin = start(IdentityStore::empty()).await;
        // A silent connection, then as many more as the listener keeps: the
        // oldest is closed for the newest, and a probe still gets in.
        let mut first = tokio::net::TcpStream::connect(admin.addr).await.unwrap();
        let mut rest = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            rest.push(tokio::net::TcpStream::connect(admin.addr).await.unwrap());
        }
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf))
            .await
            .expect("the oldest is closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(request(admin.addr, "GET", "/live").await.status, 200);
        assert!(admin.state.metrics.admin_shed.get() >= 2);
        drop(rest);
        // A head that never completes: closed within HEADER_READ_TIMEOUT.
        let mut slow = tokio::net::TcpStream::connect(admin.addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: a")
            .await
            .unwrap();
        let start = std::time::Instant::now();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(HEADER_READ_TIMEOUT * 2, slow.read_to_end(&mut got))
            .await
            .expect("closed within the header read timeout");
        assert!(start.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_millis(500));
        let _ = admin.stop.send(true);
    }

    #[tokio::test]
    async fn ready_is_503_until_ready_and_again_while_draining() {
        let pki = Pki::shared(TD);
        let store = IdentityStore::empty();
        let admin = start(store.clone()).await;
        let r = get(admin.addr, "/ready").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (503, "waiting for the first certificate\n")
        );
        // Marked ready before a certificate is held: still not ready.
        admin.state.ready.store(true, Ordering::Release);
        assert_eq!(get(admin.addr, "/ready").await.status, 503);
        admin.state.ready.store(false, Ordering::Release);
        store.replace(pki.identity(API));
        let r = get(admin.addr, "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (503, "starting\n"));
        admin.state.ready.store(true, Ordering::Release);
        let r = get(admin.addr, "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
        admin.state.draining.store(true, Ordering::Release);
        let r = get(admin.addr, "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (503, "draining\n"));
        // Liveness is not readiness.
        let r = get(admin.addr, "/live").await;
        assert_eq!((r.status, r.body.as_str()), (200, "live\n"));
    }

    #[tokio::test]
    async fn ready_is_503_while_the_certificate_held_has_expired() {
        let pki = Pki::shared(TD);
        let mut lapsed = pki.identity(API);
        // As if the renewer had not replaced it in time.
        lapsed.not_after = 1_000_000_000;
        let store = IdentityStore::new(lapsed);
        let admin = start(store.clone()).await;
        admin.state.ready.store(true, Ordering::Release);
        let r = get(admin.addr, "/ready").await;
        assert_eq!(r.status, 503);
        assert!(
            r.body.contains("expired at 2001-09-09T01:46:40Z"),
            "{}",
            r.body
        );
        // The next install recovers it.
        store.replace(pki.identity(API));
        let r = get(admin.addr, "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    }

    #[tokio::test]
    async fn metrics_are_served_as_prometheus_text_with_the_certificate_gauges() {
        let pki = Pki::shared(TD);
        let id = pki.identity(API);
        let (not_before, not_after) = (id.not_before, id.not_after);
        let admin = start(IdentityStore::new(id)).await;
        admin.state.metrics.inbound.handshake("expired");
        let r = get(admin.addr, "/metrics").await;
        assert_eq!(r.status, 200);
        assert!(
            r.head
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{}",
            r.head
        );
        let value = |name: &str, labels: &[(&str, &str)]| sample(&r.body, name, labels);
        assert_eq!(
            value(
                "keyproof_tls_handshakes_total",
                &[("direction", "inbound"), ("result", "expired")]
            ),
            Some(1.0)
        );
        // The gauges follow the identity held at scrape time.
        assert_eq!(
            value("keyproof_identity_cert_expiry_timestamp_seconds", &[]),
            Some(not_after as f64)
        );
        assert_eq!(
            value("keyproof_identity_cert_issued_timestamp_seconds", &[]),
            Some(not_before as f64)
        );
    }

    #[tokio::test]
    async fn identity_shows_the_certificate_in_use_or_503_before_one() {
        let pki = Pki::shared(TD);
        let store = IdentityStore::empty();
        let admin = start(store.clone()).await;
        let r = get(admin.addr, "/identity").await;
        assert_eq!(r.status, 503);
        assert!(
            r.head.contains("content-type: application/json"),
            "{}",
            r.head
        );
        let json: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(json["error"], "no certificate held yet");
        // Which credential the sidecar waits on, even before a certificate.
        assert_eq!(json["source"], admin.state.source);

        store.replace(pki.identity(API));
        let held = store.current();
        let r = get(admin.addr, "/identity").await;
        assert_eq!(r.status, 200);
        assert!(
            r.head.contains("content-type: application/json"),
            "{}",
            r.head
        );
        let mut json: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(
            json["source"]["credential"], "service_account_token_file",
            "{json}"
        );
        json.as_object_mut().expect("object").remove("source");
        assert_eq!(json, held.to_json());
        assert_eq!(json["spiffe_id"], pki.id(API).as_str());
        assert_eq!(json["serial"], held.serial.as_str());
        assert_eq!(json["trust_domain"], TD);
        assert_eq!(json["not_after_unix"], held.not_after);
        assert_eq!(json["chain"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            json["trust_roots"][0]["sha256"],
            keyproof_identity::keys::fingerprint(&pki.roots()[0])
        );
        // Nothing of the key.
        assert!(
            !r.body.to_ascii_lowercase().contains("private"),
            "{}",
            r.body
        );
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_other_methods_405() {
        let pki = Pki::shared(TD);
        let admin = start(IdentityStore::new(pki.identity(API))).await;
        admin.state.ready.store(true, Ordering::Release);
        for path in ["/", "/metricsx", "/ready/", "/identity/x"] {
            let r = get(admin.addr, path).await;
            assert_eq!(r.status, 404, "{path}");
            assert_eq!(
                r.body, "try /metrics, /ready, /live or /identity\n",
                "{path}"
            );
        }
        for method in ["POST", "PUT", "DELETE"] {
            let r = request(admin.addr, method, "/ready").await;
            assert_eq!((r.status, r.body.as_str()), (405, "use GET\n"), "{method}");
        }
        // HEAD is answered like GET, without a body.
        let r = request(admin.addr, "HEAD", "/ready").await;
        assert_eq!((r.status, r.body.as_str()), (200, ""));
        // The query string is not part of the path.
        assert_eq!(get(admin.addr, "/ready?verbose=1").await.status, 200);
    }

    #[tokio::test]
    async fn the_stop_flag_ends_the_admin_listener() {
        let admin = start(IdentityStore::empty()).await;
        admin.stop.send(true).expect("listening");
        tokio::time::timeout(Duration::from_secs(2), admin.task)
            .await
            .expect("admin listener did not stop")
            .expect("task");
        assert!(tokio::net::TcpStream::connect(admin.addr).await.is_err());
    }
}
