//! The inbound's connections to the local app: a keep-alive pool of
//! plaintext HTTP/1.1 connections, and one multiplexed h2c connection for
//! apps that need HTTP/2 (gRPC).
//!
//! The HTTP/1.1 pool is a stack of idle connections rather than hyper-util's
//! general-purpose client: every request goes to the same address, so there
//! is no key to hash, and a connection goes back on the stack the moment its
//! response body ends, from the body itself, instead of from a task spawned
//! per request to watch it. Most recently used first, so a quiet period lets
//! the connections at the bottom age out, and the busy ones stay warm.

use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::ProxyBody;

/// Idle connections kept beyond this many are closed: enough for any burst
/// a sidecar sees, small enough that a flood cannot pin file descriptors.
const MAX_IDLE: usize = 512;

/// Why a request to the app failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No connection could be made: the app is down or not listening yet.
    #[error("{0}")]
    Unavailable(String),
    /// The app failed the request after a connection was made.
    #[error("{0}")]
    Failed(String),
}

/// A keep-alive pool of HTTP/1.1 connections to one address.
pub struct H1Pool {
    addr: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    reaper: std::sync::Once,
}

struct Idle {
    send: http1::SendRequest<ProxyBody>,
    since: Instant,
}

impl H1Pool {
    /// A pool dialling `addr`; idle connections close after `idle_timeout`.
    pub fn new(addr: &str, connect_timeout: Duration, idle_timeout: Duration) -> Arc<H1Pool> {
        Arc::new(H1Pool {
            addr: addr.to_owned(),
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            reaper: std::sync::Once::new(),
        })
    }

    /// Sends `req` (origin-form) on an idle connection or a new one. A
    /// request that an idle connection could not even start (the app closed
    /// it meanwhile) is retried once on a new connection.
    pub async fn request(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
    ) -> Result<Response<AppBody>, AppError> {
        let (mut send, pooled) = match self.checkout() {
            Some(s) => (s, true),
            None => (Box::pin(self.dial()).await?, false),
        };
        let resp = match send.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(req) if pooled => {
                    send = Box::pin(self.dial()).await?;
                    send.send_request(req)
                        .await
                        .map_err(|e| AppError::Failed(crate::inbound::root_cause(&e)))?
                }
                _ => return Err(AppError::Failed(crate::inbound::root_cause(e.error()))),
            },
        };
        let (parts, inner) = resp.into_parts();
        let mut body = AppBody {
            inner,
            conn: Some((self.clone(), send)),
        };
        if body.inner.is_end_stream() {
            // No body (HEAD, 204, 304, Content-Length: 0): reusable now.
            body.release();
        }
        Ok(Response::from_parts(parts, body))
    }

    /// The most recently used idle connection that can take a request now.
    fn checkout(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            // Not ready yet not closed means it is still busy with the last
            // exchange (the app answered before the request body was all
            // sent): dropping it closes it once that is done.
            if c.send.is_ready() && c.since.elapsed() < self.idle_timeout {
                return Some(c.send);
            }
        }
        None
    }

    fn checkin(&self, send: http1::SendRequest<ProxyBody>) {
        if send.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                send,
                since: Instant::now(),
            });
        }
    }

    async fn dial(self: &Arc<Self>) -> Result<http1::SendRequest<ProxyBody>, AppError> {
        self.reaper.call_once(|| {
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        });
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| {
                AppError::Unavailable(format!(
                    "connect timed out after {:?}",
                    self.connect_timeout
                ))
            })?
            .map_err(|e| AppError::Unavailable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| AppError::Unavailable(crate::inbound::root_cause(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "app connection closed");
            }
        });
        Ok(send)
    }
}

/// Closes idle connections older than `idle_timeout`, oldest first, until
/// the pool is gone.
async fn reap(pool: Weak<H1Pool>, idle_timeout: Duration) {
    let period = (idle_timeout / 4).max(Duration::from_millis(250));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        // The stack is in order of return: the stale ones are at the bottom.
        let stale = idle
            .iter()
            .take_while(|c| c.since.elapsed() >= idle_timeout || c.send.is_closed())
            .count();
        idle.drain(..stale);
    }
}

/// A response body from the app. When it ends, its connection goes back to
/// the pool; dropped before the end, the connection closes with it.
#[derive(Debug)]
pub struct AppBody {
    inner: Incoming,
    conn: Option<(Arc<H1Pool>, http1::SendRequest<ProxyBody>)>,
}

impl AppBody {
    fn release(&mut self) {
        if let Some((pool, send)) = self.conn.take() {
            pool.checkin(send);
        }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.release(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(),
            Some(Err(_)) => this.conn = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool").field("addr", &self.addr).finish()
    }
}

/// One multiplexed h2c connection to the app, re-dialled when it closes.
/// Hand-rolled rather than a pooled client so that the caller's
/// `:authority` reaches the app unchanged (a pool would put the app's
/// address there).
pub struct H2Conn {
    addr: String,
    connect_timeout: Duration,
    current: ArcSwapOption<http2::SendRequest<ProxyBody>>,
    dialing: tokio::sync::Mutex<()>,
}

impl H2Conn {
    /// A connection to `addr`, dialled on first use.
    pub fn new(addr: &str, connect_timeout: Duration) -> H2Conn {
        H2Conn {
            addr: addr.to_owned(),
            connect_timeout,
            current: ArcSwapOption::empty(),
            dialing: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends `req` (HTTP/2 form) on the connection, dialling it if needed.
    pub async fn request(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, AppError> {
        let mut send = self.sender().await.map_err(AppError::Unavailable)?;
        send.send_request(req)
            .await
            .map_err(|e| AppError::Failed(crate::inbound::root_cause(&e)))
    }

    async fn sender(&self) -> Result<http2::SendRequest<ProxyBody>, String> {
        if let Some(s) = self.current.load().as_ref() {
            if !s.is_closed() {
                return Ok((**s).clone());
            }
        }
        let _g = self.dialing.lock().await;
        if let Some(s) = self.current.load().as_ref() {
            if !s.is_closed() {
                return Ok((**s).clone());
            }
        }
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| format!("connect timed out after {:?}", self.connect_timeout))?
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.current.store(Some(Arc::new(send.clone())));
        Ok(send)
    }
}
