//! An app behind an inbound sidecar that records every request it receives
//! and can ask the sidecar for the caller's step-up proof of one request by
//! answering `x-keyproof-step-up: required`.
//!
//! What it does is chosen by the request path, so one app serves every case
//! of a test:
//!
//! - a path with a segment starting `ask-again` is always answered
//!   `required`, even when the request arrived verified;
//! - a path with a segment starting `ask` is answered `required` unless the
//!   request arrived with `x-keyproof-step-up: verified`;
//! - a path with a segment starting `leak` is answered 200 with an
//!   `x-keyproof-step-up` field of the app's own, which must never reach the
//!   caller;
//! - a path with a segment starting `odd` is answered 200 with
//!   `x_keyproof_step_up: "Required"` (another spelling, another value: the
//!   sidecar must read it as asking) unless the request arrived verified;
//! - anything else is answered 200.
//!
//! A `required` answer has status 409 and body [`ASKED`], so a test can see
//! that the sidecar discarded it. A 200 echoes what was received, in the
//! format of [`crate::proxy_support::EchoApp`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// The body of the app's `required` answer: never seen by a caller.
pub const ASKED: &str = "ASKED-FOR-STEP-UP";

/// The field with which the app asks for, and learns of, a step-up proof.
pub const STEP_UP: &str = "x-keyproof-step-up";

/// Why the sidecar verified a request (`always`, `app` or a rule name).
pub const STEP_UP_REASON: &str = "x-keyproof-step-up-reason";

/// One request as the app received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The method.
    pub method: String,
    /// The path (without the query).
    pub path: String,
    /// Every header field line, names lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    /// Bytes of body received.
    pub body_len: usize,
    /// Whether the app answered `x-keyproof-step-up: required`.
    pub asked: bool,
    /// The request's trailer fields, names lowercase.
    pub trailers: Vec<(String, String)>,
}

impl Seen {
    /// Every value of one field (name lowercase).
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Whether the request arrived with `x-keyproof-step-up: verified`.
    pub fn verified(&self) -> bool {
        self.values(STEP_UP) == ["verified"]
    }

    /// The single `x-keyproof-step-up-reason`, if there was one.
    pub fn reason(&self) -> Option<&str> {
        match self.values(STEP_UP_REASON).as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// The running app.
pub struct AskingApp {
    /// Where it listens (plain HTTP/1.1 and h2c).
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _rt: Arc<tokio::runtime::Runtime>,
}

fn segment_starts(path: &str, prefix: &str) -> bool {
    path.split('/').any(|s| s.starts_with(prefix))
}

async fn answer(
    seen: Arc<Mutex<Vec<Seen>>>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let (body, trailers) = match body.collect().await {
        Ok(b) => {
            let trailers: Vec<(String, String)> = b
                .trailers()
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_owned(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            (b.to_bytes(), trailers)
        }
        Err(_) => (Bytes::new(), Vec::new()),
    };
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let path = parts.uri.path().to_owned();
    let verified = headers.iter().any(|(k, v)| k == STEP_UP && v == "verified");
    let asked = segment_starts(&path, "ask-again") || (segment_starts(&path, "ask") && !verified);
    let mut echo = format!("{} {} {:?}\n", parts.method, path, parts.version);
    for (k, v) in &headers {
        echo.push_str(&format!("{k}: {v}\n"));
    }
    echo.push_str(&format!("body-bytes: {}\n", body.len()));
    let n = {
        let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
        s.push(Seen {
            method: parts.method.to_string(),
            path: path.clone(),
            headers,
            body_len: body.len(),
            asked,
            trailers,
        });
        s.len()
    };
    let mut resp = http::Response::builder();
    if asked {
        resp = resp
            .status(http::StatusCode::CONFLICT)
            .header(STEP_UP, "required");
        return Ok(resp
            .body(Full::new(Bytes::from_static(ASKED.as_bytes())))
            .unwrap_or_default());
    }
    if segment_starts(&path, "leak") {
        resp = resp.header(STEP_UP, "verified");
    }
    if segment_starts(&path, "odd") && !verified {
        resp = resp.header("x_keyproof_step_up", "\"Required\"");
    }
    Ok(resp
        .body(Full::new(Bytes::from(format!("request #{n}\n{echo}"))))
        .unwrap_or_default())
}

impl AskingApp {
    /// Starts the app on a free loopback port, on its own runtime thread.
    pub fn start() -> AskingApp {
        let rt = Arc::new(
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
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(seen.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        AskingApp {
            addr,
            seen,
            _rt: rt,
        }
    }

    /// Every request received so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The requests received so far whose path starts with `prefix`.
    pub fn seen_under(&self, prefix: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.starts_with(prefix))
            .collect()
    }

    /// Forgets what was received (between the phases of a test).
    pub fn clear(&self) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
