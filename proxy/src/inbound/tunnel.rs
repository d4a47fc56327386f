//! Opaque TCP over the mesh, inbound end: an HTTP/2 CONNECT stream from a
//! peer's outbound, already authorized by its port (`[[inbound.tcp]]`),
//! becomes a connection to `127.0.0.1:<port>`, and bytes are pumped both
//! ways until both sides are done.
//!
//! What the caller sees: `200` once the app accepted the connection (the
//! stream then carries the bytes), `502` when the app refused it, `504`
//! when it did not answer within `app_connect_timeout`. Half-close is
//! carried: the caller's END_STREAM shuts down the app connection's write
//! side only, and the app's FIN ends the stream's send side only; each
//! direction keeps flowing until its own end. An error on either side (a
//! reset stream, a reset app connection) closes both: the app connection
//! is reset (`SO_LINGER` 0), and the stream is ended. A tunnel with no byte
//! either way for the listener's `idle_timeout` is closed the same way.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::http::body::{text, ProxyBody};
use crate::http::server::StreamGuard;
use crate::metrics::{Direction, TcpMetrics};

/// Bytes read from one side before they are written to the other, each
/// way: large enough for bulk transfers at full speed, small enough that a
/// tunnel's buffers stay a bounded cost.
const PUMP_BUFFER: usize = 64 * 1024;

/// What every tunnel of a listener shares.
#[derive(Clone)]
pub struct Tunnels {
    /// Bound on connecting to the local port.
    pub connect_timeout: Duration,
    /// A tunnel with no byte either way for this long is closed.
    pub idle: Duration,
    /// `keyproof_tcp_*`.
    pub metrics: TcpMetrics,
}

/// Who opened a tunnel, for the log.
pub struct Caller {
    /// The verified SPIFFE ID.
    pub id: String,
    /// Its socket address.
    pub remote: SocketAddr,
}

/// The port of a CONNECT request's authority (`host:port`); `None` when
/// it names no port (or port 0).
pub fn port_of(req: &Request<Incoming>) -> Option<u16> {
    req.uri()
        .authority()
        .and_then(|a| a.port_u16())
        .filter(|p| *p != 0)
}

impl Tunnels {
    /// Connects `127.0.0.1:<port>` for an authorized CONNECT `req` and
    /// answers it: 200 and the pump started (it holds `stream` for its
    /// whole life, so that the connection carrying it is not idle), or
    /// 502/504 and nothing started.
    pub async fn open(
        &self,
        req: Request<Incoming>,
        port: u16,
        caller: Caller,
        stream: StreamGuard,
    ) -> Response<ProxyBody> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let app = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                self.metrics.connection(Direction::Inbound, "failed");
                tracing::warn!(peer = %caller.remote, peer_id = %caller.id, port, error = %e, "tunnel refused: the app did not accept the connection");
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("tunnel: connecting {addr}: {e}\n"),
                );
            }
            Err(_) => {
                self.metrics.connection(Direction::Inbound, "failed");
                tracing::warn!(peer = %caller.remote, peer_id = %caller.id, port, "tunnel refused: the app did not accept the connection within {:?}", self.connect_timeout);
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "tunnel: connecting {addr}: no answer within {:?}\n",
                        self.connect_timeout
                    ),
                );
            }
        };
        let _ = app.set_nodelay(true);
        self.metrics.connection(Direction::Inbound, "ok");
        tracing::debug!(peer = %caller.remote, peer_id = %caller.id, port, "tunnel open");
        let this = self.clone();
        tokio::spawn(async move {
            let _stream = stream;
            // Resolves once hyper has sent the 200 below.
            match hyper::upgrade::on(req).await {
                Ok(up) => this.pump(TokioIo::new(up), app, &caller, port).await,
                Err(e) => {
                    tracing::debug!(peer = %caller.remote, peer_id = %caller.id, port, error = %e, "tunnel closed before it was set up");
                }
            }
        });
        Response::new(ProxyBody::empty())
    }

    /// Pumps bytes both ways until both directions ended, one side failed,
    /// or the tunnel stayed idle; then counts its bytes.
    async fn pump<C>(&self, client: C, mut app: TcpStream, caller: &Caller, port: u16)
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let tally = Tally::default();
        let mut client = Counting {
            io: client,
            tally: &tally,
        };
        let ended = tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut app, PUMP_BUFFER, PUMP_BUFFER) => r.map(|_| "done"),
            () = idle(&tally, self.idle) => Ok("idle"),
        };
        let (up, down) = tally.get();
        self.metrics.bytes(Direction::Inbound, up, down);
        match ended {
            Ok(how) => {
                if how == "idle" {
                    // Abandoned halfway: the app must not take it for an
                    // orderly end.
                    reset(&app);
                }
                tracing::debug!(peer = %caller.remote, peer_id = %caller.id, port, ended = how, client_to_server = up, server_to_client = down, "tunnel closed");
            }
            Err(e) => {
                reset(&app);
                tracing::debug!(peer = %caller.remote, peer_id = %caller.id, port, error = %e, client_to_server = up, server_to_client = down, "tunnel failed");
            }
        }
    }
}

/// Makes the app connection's close a reset (RST, not FIN).
fn reset(app: &TcpStream) {
    let _ = socket2::SockRef::from(app).set_linger(Some(Duration::ZERO));
}

/// Resolves once a whole `period` passed without a byte either way (so
/// between one and two periods after the last byte).
async fn idle(tally: &Tally, period: Duration) {
    let mut seen = tally.get();
    loop {
        tokio::time::sleep(period).await;
        let now = tally.get();
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Bytes a tunnel carried: from the caller to the app, and back.
#[derive(Default)]
struct Tally {
    up: AtomicU64,
    down: AtomicU64,
}

impl Tally {
    fn get(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// The caller's side of the tunnel, counting what is read from it (towards
/// the app) and written to it (from the app).
struct Counting<'a, T> {
    io: T,
    tally: &'a Tally,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.tally.up.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.tally.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
