//! The admin listener: `/metrics`, `/ready`, `/live` and `/identity`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::body::{text, ProxyBody};
use crate::identity::store::IdentityStore;
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
                if self.draining.load(Ordering::Acquire) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
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
                let (status, json) = match self.store.get() {
                    Some(id) => (StatusCode::OK, id.to_json()),
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({"error": "no certificate held yet"}),
                    ),
                };
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

/// Serves the admin endpoints until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut stop: watch::Receiver<bool>) {
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
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = state.respond(&req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
