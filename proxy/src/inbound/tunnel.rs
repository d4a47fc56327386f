//! Opaque TCP over the mesh, inbound end: an HTTP/2 CONNECT stream from a
//! peer's outbound, already authorized by its port (`[[inbound.tcp]]`),
//! becomes a connection to `127.0.0.1:<port>`, and bytes are pumped both
//! ways until both sides are done.
//!
//! The authority must be `host:port` with a canonical port (1 to 5 ASCII
//! digits, no sign, no leading zero, 1-65535) and no userinfo; anything
//! else gets 400 (RFC 9113 section 8.5). The host part is not used: the
//! tunnel always goes to this pod's loopback, and the authorization is by
//! port.
//!
//! What the caller sees: `200` once the app accepted the connection (the
//! stream then carries the bytes), a `REFUSED_STREAM` reset when nothing
//! listens on the port (nothing was processed: the caller may try another
//! endpoint), `502` when connecting failed otherwise, `504` when the app
//! did not answer within `app_connect_timeout`, `503` when
//! `[inbound] max_tunnels` tunnels are open already, or
//! `max_tunnels_per_peer` of the caller's own (counted `limited`; the app
//! is never connected).
//!
//! What is carried, and what is not:
//! * Half-close is carried: the caller's END_STREAM shuts down the app
//!   connection's write side only, and the app's FIN ends the stream's send
//!   side only (END_STREAM); each direction keeps flowing until its own
//!   end.
//! * Caller to app: a RST_STREAM of any reason (CONNECT_ERROR, which a
//!   caller whose own TCP peer reset sends per RFC 9113 section 8.5,
//!   CANCEL, NO_ERROR...), a reset or close of the mesh connection, or a
//!   GOAWAY ending the stream reach the app as a TCP reset (`SO_LINGER` 0).
//! * App to caller: a reset of the app connection, or any error reading or
//!   writing it, resets the stream with CONNECT_ERROR, which keyproof's
//!   outbound carries on as a TCP reset of its own app.
//! * Idle: a tunnel with no byte either way for the listener's
//!   `tcp_idle_timeout` is closed, the app connection with a reset, the stream
//!   with RST_STREAM CANCEL.
//! * Revoked: a tunnel is allowed once, but lives on; each open one is
//!   registered with what allowed it ([`Grant`]: the port, or a switch's
//!   path) and decided on again when the policy changes
//!   (`Inbound::replace_policy`). One the new policy refuses is reset both
//!   ways (the stream with CONNECT_ERROR), counted `revoked`.
//!
//! The stream's frames are written to the app's socket, and the app's
//! reads sent as frames, by one task per tunnel with no copy in between
//! (`http/h2_stream.rs`, which the outbound's end uses as well).
//!
//! Each tunnel is one HTTP/2 stream for its whole life (the listener's
//! `max_concurrent_streams` bounds them per connection, `max_tunnels` and
//! `max_tunnels_per_peer` across connections) and counts as a request in
//! flight, so the connection is never idle while it lasts; on shutdown the
//! connection sends GOAWAY and its tunnels go on until they end or the
//! grace period does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use keyproof_identity::SpiffeId;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::http::app_client;
use crate::http::body::{text, ProxyBody, RequestBody};
use crate::http::h2_server::{Handoff, Unprocessed};
use crate::http::h2_stream::pump_tunnel;
use crate::http::io::Rewind;
use crate::http::server::StreamGuard;
use crate::metrics::{Direction, TcpMetrics};

/// What every tunnel of a listener shares.
#[derive(Clone)]
pub struct Tunnels {
    /// Bound on connecting to the local port.
    pub connect_timeout: Duration,
    /// A tunnel with no byte either way for this long is closed.
    pub idle: Duration,
    /// `keyproof_tcp_*`.
    pub metrics: TcpMetrics,
    /// Tunnels open, pod-wide and per caller.
    pub limits: Arc<TunnelLimits>,
}

/// The bound on open tunnels: `max_tunnels` in all, `max_tunnels_per_peer`
/// per verified SPIFFE ID, so that one caller can neither exhaust the
/// pod's file descriptors and memory nor starve the other callers.
pub struct TunnelLimits {
    max: usize,
    per_peer: usize,
    open: Mutex<OpenTunnels>,
}

#[derive(Default)]
struct OpenTunnels {
    total: usize,
    /// Only callers with a tunnel open: an entry goes with its last one.
    by_peer: HashMap<String, usize>,
    /// Every open tunnel, for a policy change to decide on again.
    open: HashMap<u64, Open>,
    next: u64,
}

/// An open tunnel as the policy allowed it.
struct Open {
    peer: SpiffeId,
    serial: String,
    grant: Grant,
    stop: CancellationToken,
}

/// What a tunnel was allowed as: decided on again when the policy changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Opaque TCP to this local port (`[[inbound.tcp]]`).
    Tcp(u16),
    /// A protocol switch on this path (its form routes match), a `GET` for
    /// the routes; `proven` by a step-up proof.
    Switch {
        /// The path, as routes match it.
        path: String,
        /// A step-up proof came with it: it may ride a route that demands
        /// one (`always`).
        proven: bool,
        /// Unproven on a `risk` route: the fingerprint of the route and
        /// rules that let it through. Only those rules decided on it; under
        /// others, the switch is decided again by being made again.
        risk: Option<u64>,
    },
}

/// Which limit refused a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// `max_tunnels`.
    Total(usize),
    /// `max_tunnels_per_peer`.
    PerPeer(usize),
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limited::Total(n) => write!(f, "{n} tunnels are open on this workload (max_tunnels)"),
            Limited::PerPeer(n) => write!(
                f,
                "{n} tunnels of this caller are open on this workload (max_tunnels_per_peer)"
            ),
        }
    }
}

/// One open tunnel's place in [`TunnelLimits`], given back on drop.
pub struct TunnelPermit {
    limits: Arc<TunnelLimits>,
    peer: String,
    id: u64,
    stop: CancellationToken,
}

impl TunnelPermit {
    /// Resolves when a policy change no longer allows the tunnel.
    pub fn revoked(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Whether a policy change no longer allows the tunnel: checked once
    /// more before its 200, after the waits of setting it up.
    pub fn is_revoked(&self) -> bool {
        self.stop.is_cancelled()
    }
}

impl TunnelLimits {
    /// At most `max` tunnels, `per_peer` of them per caller.
    pub fn new(max: usize, per_peer: usize) -> Arc<TunnelLimits> {
        Arc::new(TunnelLimits {
            max,
            per_peer,
            open: Mutex::new(OpenTunnels::default()),
        })
    }

    /// A place for one more tunnel of `peer` (whose certificate has
    /// `serial`), allowed as `grant`; or which limit it is at.
    pub fn acquire(
        self: &Arc<Self>,
        peer: &SpiffeId,
        serial: &str,
        grant: Grant,
    ) -> Result<TunnelPermit, Limited> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.max {
            return Err(Limited::Total(self.max));
        }
        let mine = open.by_peer.get(peer.as_str()).copied().unwrap_or(0);
        if mine >= self.per_peer {
            return Err(Limited::PerPeer(self.per_peer));
        }
        open.total += 1;
        *open.by_peer.entry(peer.to_string()).or_insert(0) += 1;
        let id = open.next;
        open.next += 1;
        let stop = CancellationToken::new();
        open.open.insert(
            id,
            Open {
                peer: peer.clone(),
                serial: serial.to_owned(),
                grant,
                stop: stop.clone(),
            },
        );
        Ok(TunnelPermit {
            limits: self.clone(),
            peer: peer.to_string(),
            id,
            stop,
        })
    }

    /// Tunnels open now (all callers).
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    /// Stops every open tunnel that `allowed` (the policy now in use) no
    /// longer allows; returns how many.
    pub fn revoke(&self, allowed: impl Fn(&SpiffeId, &str, &Grant) -> bool) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for t in open.open.values() {
            if !t.stop.is_cancelled() && !allowed(&t.peer, &t.serial, &t.grant) {
                t.stop.cancel();
                n += 1;
            }
        }
        n
    }
}

impl Drop for TunnelPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        open.open.remove(&self.id);
        if let Some(n) = open.by_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_peer.remove(&self.peer);
            }
        }
    }
}

/// What a tunnel holds for its whole life: its stream's count on the
/// connection (which is then never idle) and its place in the limits.
pub struct Held {
    /// The stream in flight.
    pub stream: StreamGuard,
    /// The place in `max_tunnels` and `max_tunnels_per_peer`.
    pub permit: TunnelPermit,
}

/// Who opened a tunnel, for the log.
pub struct Caller {
    /// The verified SPIFFE ID.
    pub id: String,
    /// Its socket address.
    pub remote: SocketAddr,
}

/// Why a CONNECT's authority was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadAuthority {
    /// No authority, or no `:port` in it.
    #[error("CONNECT needs an authority of the form host:port")]
    NoPort,
    /// `user@host:port`: RFC 9113 section 8.5 allows host and port only.
    #[error("a CONNECT authority carries no userinfo (host:port only)")]
    UserInfo,
    /// Not 1 to 5 ASCII digits without a leading zero, or out of 1-65535.
    #[error("the CONNECT port must be 1-65535 in decimal digits, without sign or leading zero")]
    BadPort,
}

/// The port of a CONNECT request's authority (`host:port`), strictly:
/// a canonical decimal port and no userinfo, so that one port has one
/// spelling (the same as the rules and the `redirect` flags accept).
pub fn port_of<B>(req: &Request<B>) -> Result<u16, BadAuthority> {
    parse_port(req.uri().authority().map(|a| a.as_str()))
}

fn parse_port(authority: Option<&str>) -> Result<u16, BadAuthority> {
    let a = authority.ok_or(BadAuthority::NoPort)?;
    if a.contains('@') {
        return Err(BadAuthority::UserInfo);
    }
    let (_, port) = a.rsplit_once(':').ok_or(BadAuthority::NoPort)?;
    if port.is_empty() {
        return Err(BadAuthority::NoPort);
    }
    if port.len() > 5 || port.starts_with('0') || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BadAuthority::BadPort);
    }
    port.parse::<u16>().map_err(|_| BadAuthority::BadPort)
}

impl Tunnels {
    /// Connects `127.0.0.1:<port>` for an authorized CONNECT `req` and
    /// answers it: 200 and the pump started (it holds `stream` for its
    /// whole life, so that the connection carrying it is not idle), or
    /// 502/504 and nothing started.
    pub async fn open(
        &self,
        req: Request<RequestBody>,
        port: u16,
        caller: Caller,
        stream: StreamGuard,
        permit: TunnelPermit,
    ) -> Response<ProxyBody> {
        let RequestBody::H2(body) = req.into_body() else {
            // `Inbound::tunnel` answers CONNECT over HTTP/1.1 with 405.
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is supported over HTTP/2 only\n",
            );
        };
        let recv = body.into_recv();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let app = match self.connect_app(addr, &caller).await {
            Ok(tcp) => tcp,
            Err(resp) => {
                self.metrics.connection(Direction::Inbound, "failed");
                return *resp;
            }
        };
        if permit.is_revoked() {
            // The policy changed while the app was dialled.
            reset(&app);
            return self.revoked_before_open(&caller);
        }
        self.metrics.connection(Direction::Inbound, "ok");
        tracing::debug!(peer = %caller.remote, peer_id = %caller.id, port, "tunnel open");
        let mut resp = Response::new(ProxyBody::empty());
        let held = Held { stream, permit };
        resp.extensions_mut()
            .insert(self.handoff(recv, app, Vec::new(), caller, port, held));
        resp
    }

    /// What takes over the stream (`recv`: its receiving half, the
    /// request's body) once its 2xx is sent: the pump, on a task of its
    /// own. Dropped unrun if the stream or its connection ends first: what
    /// it held goes back, and the app's connection is reset, as for any
    /// tunnel the caller abandons.
    pub fn handoff(
        &self,
        recv: h2::RecvStream,
        app: TcpStream,
        pre: Vec<u8>,
        caller: Caller,
        port: u16,
        held: Held,
    ) -> Handoff {
        let this = self.clone();
        let unstarted = Unstarted {
            app: Some(app),
            caller,
            port,
        };
        Handoff::new(move |send| {
            tokio::spawn(async move {
                let mut unstarted = unstarted;
                if let Some(app) = unstarted.app.take() {
                    let streams = (send, recv);
                    this.pump(streams, app, pre, &unstarted.caller, port, &held)
                        .await;
                }
            });
        })
    }

    /// The answer to a tunnel whose place a policy change revoked before
    /// its 200 went out (its app connection, if any, reset by the caller).
    pub fn revoked_before_open(&self, caller: &Caller) -> Response<ProxyBody> {
        self.metrics.connection(Direction::Inbound, "revoked");
        tracing::info!(peer = %caller.remote, peer_id = %caller.id, "tunnel refused: the policy changed while it was set up, and no longer allows it");
        text(
            StatusCode::FORBIDDEN,
            "forbidden: the policy in use refuses this caller here\n",
        )
    }

    /// Connects the app at `addr` within `connect_timeout`, or answers why
    /// not (502 refused, 504 no answer), logged; a refused connection's
    /// answer is marked [`Unprocessed`].
    pub async fn connect_app<A>(
        &self,
        addr: A,
        caller: &Caller,
    ) -> Result<TcpStream, Box<Response<ProxyBody>>>
    where
        A: tokio::net::ToSocketAddrs + std::fmt::Display + Copy,
    {
        match tokio::time::timeout(self.connect_timeout, app_client::dial_app(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %caller.remote, peer_id = %caller.id, app = %addr, error = %e, "the app did not accept the connection");
                let mut resp = text(
                    StatusCode::BAD_GATEWAY,
                    format!("tunnel: connecting {addr}: {e}\n"),
                );
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    // Nothing listens there (the app has exited, or not
                    // started): the caller may try another endpoint.
                    resp.extensions_mut().insert(Unprocessed);
                }
                Err(Box::new(resp))
            }
            Err(_) => {
                tracing::warn!(peer = %caller.remote, peer_id = %caller.id, app = %addr, "the app did not accept the connection within {:?}", self.connect_timeout);
                Err(Box::new(text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "tunnel: connecting {addr}: no answer within {:?}\n",
                        self.connect_timeout
                    ),
                )))
            }
        }
    }

    /// Pumps bytes both ways until both directions ended, one side failed,
    /// or the tunnel stayed idle; then counts its bytes. `pre`: bytes the
    /// app sent already (after an upgrade's `101`), passed on first.
    async fn pump(
        &self,
        (send, recv): (h2::SendStream<Bytes>, h2::RecvStream),
        mut app: TcpStream,
        pre: Vec<u8>,
        caller: &Caller,
        port: u16,
        held: &Held,
    ) {
        let (rd, wr) = app.split();
        let rd = Rewind::new(pre, rd);
        // No grace for the caller's END_STREAM: a keyproof outbound resets
        // bare, without an END_STREAM before it.
        let stop = held.permit.revoked();
        let end = pump_tunnel(send, recv, rd, wr, self.idle, Duration::ZERO, stop).await;
        let (up, down) = (end.received, end.sent);
        self.metrics.bytes(Direction::Inbound, up, down);
        if end.error.is_some() || end.idle {
            // Failed or abandoned halfway: the app must not take it for an
            // orderly end.
            reset(&app);
        }
        if end.stopped {
            self.metrics.connection(Direction::Inbound, "revoked");
            tracing::info!(peer = %caller.remote, peer_id = %caller.id, port, client_to_server = up, server_to_client = down, "tunnel closed: the policy no longer allows it");
        } else if let Some(e) = end.error {
            tracing::debug!(peer = %caller.remote, peer_id = %caller.id, port, error = %e, client_to_server = up, server_to_client = down, "tunnel failed");
        } else if end.idle {
            tracing::debug!(peer = %caller.remote, peer_id = %caller.id, port, idle = ?self.idle, client_to_server = up, server_to_client = down, "tunnel closed: idle");
        } else {
            tracing::debug!(peer = %caller.remote, peer_id = %caller.id, port, client_to_server = up, server_to_client = down, "tunnel closed");
        }
    }
}

/// The app connection of a tunnel whose 200 is not sent yet: reset if it
/// never is.
struct Unstarted {
    app: Option<TcpStream>,
    caller: Caller,
    port: u16,
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some(app) = self.app.take() {
            reset(&app);
            tracing::debug!(peer = %self.caller.remote, peer_id = %self.caller.id, port = self.port, "tunnel closed before it was set up");
        }
    }
}

/// Makes the app connection's close a reset (RST, not FIN).
pub fn reset(app: &TcpStream) {
    let _ = socket2::SockRef::from(app).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    //! The real inbound over real mutual TLS, an h2 client opening tunnels.

    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Method, Request, Response, StatusCode};
    use keyproof_identity::{IdPattern, SpiffeId};
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{oneshot, watch};
    use tokio_rustls::TlsConnector;

    use super::{Grant, TunnelLimits, TunnelPermit};
    use crate::identity::store;
    use crate::inbound::Inbound;
    use crate::listener::{self, Tracker};
    use crate::metrics::Metrics;
    use crate::testing::{config, metric, workload, Workload, TD};

    const API: &str = "/ns/demo/sa/api";
    const WEB: &str = "/ns/demo/sa/web";

    /// The inbound of `api` configured with `rest`, listening on loopback
    /// with the real accept loop; its address, its metrics and the
    /// shutdown flag (kept alive by the caller).
    async fn serve(
        api: &Workload,
        rest: &str,
    ) -> (std::net::SocketAddr, Metrics, watch::Sender<bool>) {
        let (addr, m, stop, _) = serve_inbound(api, rest).await;
        (addr, m, stop)
    }

    /// [`serve`], with the inbound itself.
    async fn serve_inbound(
        api: &Workload,
        rest: &str,
    ) -> (
        std::net::SocketAddr,
        Metrics,
        watch::Sender<bool>,
        Arc<Inbound>,
    ) {
        let cfg = config(&format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n{rest}"
        ));
        let metrics = Metrics::new().expect("metrics");
        let inbound = Inbound::new(
            cfg.inbound.as_ref().expect("[inbound]"),
            api.store(),
            &metrics,
        )
        .expect("inbound");
        let l = listener::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = l.local_addr().expect("address");
        let (tx, rx) = watch::channel(false);
        let stop = rx.clone();
        let kept = inbound.clone();
        tokio::spawn(listener::accept_loop(
            l,
            64,
            Arc::new(Tracker::default()),
            rx,
            move |tcp, remote, guards| {
                inbound
                    .clone()
                    .connection(tcp, remote, guards, stop.clone())
            },
        ));
        (addr, metrics, tx, kept)
    }

    /// An HTTP/2 connection to the inbound over mutual TLS, as `caller`.
    async fn client(
        caller: &Workload,
        addr: std::net::SocketAddr,
    ) -> h2::client::SendRequest<Bytes> {
        client_with(caller, addr, h2::client::Builder::new()).await
    }

    /// [`client`] with the HTTP/2 settings of `builder`.
    async fn client_with(
        caller: &Workload,
        addr: std::net::SocketAddr,
        builder: h2::client::Builder,
    ) -> h2::client::SendRequest<Bytes> {
        let store = caller.store();
        let any = IdPattern::parse(&format!("spiffe://{TD}/*")).expect("pattern");
        let cfg = store::client_config(&store, any, &[b"h2"]).expect("client config");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("api.test").expect("name"), tcp)
            .await
            .expect("mutual TLS handshake");
        let (send, conn) = builder
            .handshake::<_, Bytes>(tls)
            .await
            .expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        send
    }

    /// The answer to a CONNECT to `127.0.0.1:<port>`: its status, and the
    /// stream both ways (a 200) or the body text (anything else).
    async fn connect(
        send: &mut h2::client::SendRequest<Bytes>,
        port: u16,
    ) -> (
        StatusCode,
        Result<(h2::SendStream<Bytes>, h2::RecvStream), String>,
    ) {
        let (resp, stream) = send_connect(send, port).await;
        let resp = resp.expect("answer, not a reset");
        let status = resp.status();
        let mut body = resp.into_body();
        if status == StatusCode::OK {
            return (status, Ok((stream, body)));
        }
        let text = read_all(&mut body).await;
        (status, Err(String::from_utf8_lossy(&text).into_owned()))
    }

    /// Sends a CONNECT to `127.0.0.1:<port>`: its answer (or reset), and
    /// the stream's sending half.
    async fn send_connect(
        send: &h2::client::SendRequest<Bytes>,
        port: u16,
    ) -> (
        Result<Response<h2::RecvStream>, h2::Error>,
        h2::SendStream<Bytes>,
    ) {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("127.0.0.1:{port}"))
            .body(())
            .expect("request");
        let mut ready = send.clone().ready().await.expect("ready");
        let (resp, stream) = ready.send_request(req, false).expect("send CONNECT");
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("answer in time");
        (resp, stream)
    }

    /// Everything until END_STREAM.
    async fn read_all(body: &mut h2::RecvStream) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data, not a reset");
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        out
    }

    /// An app on loopback that echoes what it reads and, once the caller has
    /// ended its side, writes `bye` and closes.
    async fn echo_app() -> (u16, oneshot::Receiver<u64>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let port = l.local_addr().expect("app address").port();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut tcp, _) = l.accept().await.expect("accept");
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = tcp.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                total += n as u64;
                tcp.write_all(&buf[..n]).await.expect("echo");
            }
            tcp.write_all(b"bye").await.expect("bye");
            tcp.shutdown().await.expect("shutdown");
            let _ = tx.send(total);
        });
        (port, rx)
    }

    /// A port nothing listens on.
    async fn closed_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("address").port()
    }

    fn tcp_rule(port: u16, allow: &str) -> String {
        format!("[[inbound.tcp]]\nport = {port}\nallow = [\"spiffe://{TD}{allow}\"]\n")
    }

    fn tcp(m: &Metrics, result: &str) -> f64 {
        metric(
            m,
            &format!("keyproof_tcp_connections_total{{direction=\"inbound\",result=\"{result}\"}}"),
        )
    }

    /// The bytes counted once the tunnel ended (counted when its pump
    /// returns, which may be just after the client saw the end).
    async fn bytes(m: &Metrics, want: (f64, f64)) -> (f64, f64) {
        let get = || {
            (
                metric(
                    m,
                    "keyproof_tcp_bytes_total{direction=\"inbound\",way=\"client_to_server\"}",
                ),
                metric(
                    m,
                    "keyproof_tcp_bytes_total{direction=\"inbound\",way=\"server_to_client\"}",
                ),
            )
        };
        for _ in 0..100 {
            if get() == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        get()
    }

    #[tokio::test]
    async fn a_policy_change_stops_only_the_tunnels_it_no_longer_allows() {
        let limits = TunnelLimits::new(10, 10);
        let web: SpiffeId = "spiffe://t.test/ns/a/sa/web".parse().unwrap();
        let ops: SpiffeId = "spiffe://t.test/ns/a/sa/ops".parse().unwrap();
        let a = limits.acquire(&web, "0a", Grant::Tcp(5432)).unwrap();
        let b = limits
            .acquire(
                &web,
                "0a",
                Grant::Switch {
                    path: "/chat".into(),
                    proven: false,
                    risk: None,
                },
            )
            .unwrap();
        let c = limits.acquire(&ops, "0b", Grant::Tcp(5432)).unwrap();
        // The new policy refuses web's switches and nothing else.
        let cut = limits.revoke(|peer, _, g| !(peer == &web && matches!(g, Grant::Switch { .. })));
        assert_eq!(cut, 1);
        async fn soon(p: &TunnelPermit) -> bool {
            tokio::time::timeout(Duration::from_millis(50), p.revoked())
                .await
                .is_ok()
        }
        assert!(soon(&b).await);
        assert!(!soon(&a).await && !soon(&c).await);
        // Counted once; a permit given back leaves nothing to decide on.
        assert_eq!(limits.revoke(|_, _, _| false), 2);
        drop((a, b, c));
        assert_eq!(limits.open(), 0);
        assert_eq!(limits.revoke(|_, _, _| false), 0);
    }

    #[tokio::test]
    async fn an_allowed_tunnel_carries_bytes_both_ways_and_a_half_close() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, app_read) = echo_app().await;
        let (addr, m, _stop) = serve(&api, &tcp_rule(port, "/ns/demo/*")).await;
        let mut h2 = client(&web, addr).await;
        let (status, stream) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::OK);
        let (mut tx, mut rx) = stream.expect("a tunnel");
        tx.send_data(Bytes::from_static(b"hello"), false)
            .expect("send");
        let first = rx.data().await.expect("echo").expect("data");
        let _ = rx.flow_control().release_capacity(first.len());
        assert_eq!(&first[..], b"hello");
        // Our side ends; the app's keeps going: it sees EOF, then answers.
        tx.send_data(Bytes::from_static(b" world"), true)
            .expect("send and end");
        let rest = tokio::time::timeout(Duration::from_secs(5), read_all(&mut rx))
            .await
            .expect("the app's end in time");
        assert_eq!(&rest[..], b" worldbye");
        assert_eq!(app_read.await.expect("the app saw EOF"), 11);
        assert_eq!(tcp(&m, "ok"), 1.0);
        assert_eq!(tcp(&m, "denied") + tcp(&m, "failed"), 0.0);
        assert_eq!(bytes(&m, (11.0, 14.0)).await, (11.0, 14.0));
    }

    #[tokio::test]
    async fn a_multi_megabyte_transfer_goes_through_whole() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, app_read) = echo_app().await;
        let (addr, m, _stop) = serve(&api, &tcp_rule(port, WEB)).await;
        let mut h2 = client(&web, addr).await;
        let (status, stream) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::OK);
        let (mut tx, mut rx) = stream.expect("a tunnel");
        const SIZE: usize = 8 << 20;
        let data: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        let data = Bytes::from(data);
        // h2 queues what it cannot send yet and sends it as the windows
        // open: the reading below is what lets the echo go on.
        for chunk in data.chunks(1 << 20) {
            tx.send_data(data.slice_ref(chunk), false).expect("send");
        }
        tx.send_data(Bytes::new(), true).expect("end");
        let got = tokio::time::timeout(Duration::from_secs(30), read_all(&mut rx))
            .await
            .expect("the transfer in time");
        assert_eq!(got.len(), SIZE + 3);
        assert!(
            got[..SIZE] == data[..],
            "the echo differs from what was sent"
        );
        assert_eq!(&got[SIZE..], b"bye");
        assert_eq!(app_read.await.expect("the app saw EOF"), SIZE as u64);
        let n = SIZE as f64;
        assert_eq!(bytes(&m, (n, n + 3.0)).await, (n, n + 3.0));
        assert_eq!(tcp(&m, "ok"), 1.0);
    }

    /// A listener that must never see a connection; resolves to whether
    /// one came within `wait`.
    async fn never_connected(wait: Duration) -> (u16, tokio::task::JoinHandle<bool>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let port = l.local_addr().expect("address").port();
        let h = tokio::spawn(async move { tokio::time::timeout(wait, l.accept()).await.is_ok() });
        (port, h)
    }

    #[tokio::test]
    async fn a_port_without_a_rule_is_refused_and_never_connected() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, seen) = never_connected(Duration::from_millis(500)).await;
        let other = closed_port().await;
        let (addr, m, _stop) = serve(&api, &tcp_rule(other, WEB)).await;
        let mut h2 = client(&web, addr).await;
        let (status, body) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let body = body.expect_err("a refusal");
        assert!(
            body.contains(&format!("no tcp rule for port {port}")),
            "{body}"
        );
        assert_eq!(tcp(&m, "denied"), 1.0);
        assert_eq!(tcp(&m, "ok"), 0.0);
        assert!(
            !seen.await.expect("listener task"),
            "the port was connected"
        );
    }

    #[tokio::test]
    async fn a_caller_the_rule_does_not_allow_is_refused() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, seen) = never_connected(Duration::from_millis(500)).await;
        let (addr, m, _stop) = serve(&api, &tcp_rule(port, "/ns/ops/*")).await;
        let mut h2 = client(&web, addr).await;
        let (status, body) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let body = body.expect_err("a refusal");
        assert!(
            body.contains(&format!(
                "tcp rule for port {port} does not allow spiffe://{TD}{WEB}"
            )),
            "{body}"
        );
        assert_eq!(tcp(&m, "denied"), 1.0);
        assert!(
            !seen.await.expect("listener task"),
            "the port was connected"
        );
    }

    #[tokio::test]
    async fn the_deny_list_refuses_a_tunnel_the_rule_allows() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, seen) = never_connected(Duration::from_millis(500)).await;
        let rest = format!(
            "{}[[inbound.deny]]\nspiffe_id = \"spiffe://{TD}{WEB}\"\n",
            tcp_rule(port, WEB)
        );
        let (addr, m, _stop) = serve(&api, &rest).await;
        let mut h2 = client(&web, addr).await;
        let (status, body) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.expect_err("a refusal").contains("deny list"));
        assert_eq!(tcp(&m, "denied"), 1.0);
        assert!(
            !seen.await.expect("listener task"),
            "the port was connected"
        );
    }

    #[tokio::test]
    async fn an_app_port_refusing_the_connection_refuses_the_stream_counted_failed() {
        // Nothing reached the app: the caller may open the tunnel again on
        // another connection, to another endpoint.
        let (api, web) = (workload(API), workload(WEB));
        let port = closed_port().await;
        let (addr, m, _stop) = serve(&api, &tcp_rule(port, WEB)).await;
        let h2 = client(&web, addr).await;
        for n in 1..=2 {
            let e = send_connect(&h2, port).await.0.expect_err("a reset");
            assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e}");
            assert_eq!(tcp(&m, "failed"), f64::from(n));
            assert_eq!(tcp(&m, "ok") + tcp(&m, "denied"), 0.0);
            // The connection is still good for the next stream.
        }
    }

    #[tokio::test]
    async fn an_idle_tunnel_is_closed_after_the_tcp_idle_timeout() {
        let (api, web) = (workload(API), workload(WEB));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let port = l.local_addr().expect("address").port();
        let app = tokio::spawn(async move {
            let (mut tcp, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 16];
            tcp.read(&mut buf).await
        });
        // The HTTP idle_timeout, shorter, does not end a tunnel.
        let rest = format!(
            "idle_timeout = \"100ms\"\ntcp_idle_timeout = \"600ms\"\n{}",
            tcp_rule(port, WEB)
        );
        let (addr, m, _stop) = serve(&api, &rest).await;
        let mut h2 = client(&web, addr).await;
        let (status, stream) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::OK);
        let (_tx, mut rx) = stream.expect("a tunnel");
        let start = std::time::Instant::now();
        // The end: a reset (CANCEL), never an END_STREAM.
        let end = tokio::time::timeout(Duration::from_secs(3), rx.data())
            .await
            .expect("the idle tunnel was closed");
        let Some(Err(e)) = end else {
            panic!("the idle tunnel ended without a reset: {end:?}");
        };
        assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}");
        assert!(start.elapsed() >= Duration::from_millis(600));
        let read = tokio::time::timeout(Duration::from_secs(3), app)
            .await
            .expect("the app's connection was closed")
            .expect("app task");
        // Abandoned halfway: the app sees a reset, not an orderly end.
        let err = read.expect_err("the app read an orderly end");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        assert_eq!(tcp(&m, "ok"), 1.0);
    }

    #[tokio::test]
    async fn a_reloaded_policy_opens_and_closes_ports() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, app_read) = echo_app().await;
        let (addr, m, _stop, inbound) = serve_inbound(&api, "").await;
        let mut h2 = client(&web, addr).await;
        let (status, _) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let file =
            format!("routes = []\n[[tcp]]\nport = {port}\nallow = [\"spiffe://{TD}{WEB}\"]\n");
        let policy =
            crate::config::parse_policy(std::path::Path::new("p.toml"), &file).expect("policy");
        inbound.replace_policy(&policy).expect("replace");
        // The same connection: the policy in use decides each stream.
        let (status, stream) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::OK);
        let (mut tx, mut rx) = stream.expect("a tunnel");
        tx.send_data(Bytes::from_static(b"x"), true).expect("send");
        assert_eq!(read_all(&mut rx).await, b"xbye");
        assert_eq!(app_read.await.expect("app"), 1);
        let empty = crate::config::parse_policy(std::path::Path::new("p.toml"), "routes = []\n")
            .expect("policy");
        inbound.replace_policy(&empty).expect("replace");
        let (status, _) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!((tcp(&m, "denied"), tcp(&m, "ok")), (2.0, 1.0));
    }

    /// [`client`] taking DATA frames up to the proxy's own bound, as
    /// keyproof's outbound does.
    async fn large_frame_client(
        caller: &Workload,
        addr: std::net::SocketAddr,
    ) -> h2::client::SendRequest<Bytes> {
        let mut builder = h2::client::Builder::new();
        builder.max_frame_size(crate::http::h2_stream::MAX_FRAME_SIZE);
        client_with(caller, addr, builder).await
    }

    /// The `i`th byte of a test stream: a pattern that shows a lost,
    /// repeated or reordered chunk.
    fn pattern(i: usize) -> u8 {
        (i % 251) as u8
    }

    #[tokio::test]
    async fn megabytes_cross_in_large_frames_to_a_slow_reader_and_both_ends_half_close() {
        const DOWN: usize = 6 * 1024 * 1024;
        const UP: usize = 3 * 1024 * 1024 + 5;
        let (api, web) = (workload(API), workload(WEB));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let port = l.local_addr().expect("app address").port();
        // The app sends DOWN bytes and its FIN first, then reads the
        // caller's bytes to their end: each way ends on its own.
        let app = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let (mut rd, mut wr) = tcp.into_split();
            let writer = tokio::spawn(async move {
                let all: Vec<u8> = (0..DOWN).map(pattern).collect();
                for c in all.chunks(1 << 20) {
                    wr.write_all(c).await.expect("app write");
                }
                wr.shutdown().await.expect("app FIN");
            });
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.expect("app read");
            writer.await.expect("writer");
            got
        });
        let (addr, m, _stop) = serve(&api, &tcp_rule(port, WEB)).await;
        let mut h2 = large_frame_client(&web, addr).await;
        let (status, stream) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::OK);
        let (mut tx, mut rx) = stream.expect("a tunnel");
        // A slow reader: nothing read for a while, so the app's side is
        // held back by flow control, not buffered without bound.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut down = Vec::with_capacity(DOWN);
        let mut largest = 0;
        while let Some(chunk) = rx.data().await {
            let chunk = chunk.expect("data, not a reset");
            largest = largest.max(chunk.len());
            let _ = rx.flow_control().release_capacity(chunk.len());
            down.extend_from_slice(&chunk);
            if down.len() < DOWN / 2 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        assert_eq!(
            down.len(),
            DOWN,
            "the app's FIN ended the stream early or late"
        );
        assert!(
            down.iter().enumerate().all(|(i, b)| *b == pattern(i)),
            "bytes changed on the way"
        );
        assert!(
            largest > 16 * 1024 && largest <= crate::http::h2_stream::MAX_FRAME_SIZE as usize,
            "frames of {largest} bytes"
        );
        // The app's way has ended; the caller's still flows, in frames the
        // inbound takes up to its bound.
        let up: Vec<u8> = (0..UP).map(pattern).collect();
        let mut left = Bytes::from(up);
        while !left.is_empty() {
            tx.reserve_capacity(left.len().min(2 * 16 * 1024 - 9));
            let room = std::future::poll_fn(|cx| tx.poll_capacity(cx))
                .await
                .expect("capacity")
                .expect("stream open");
            let chunk = left.split_to(room.min(left.len()));
            tx.send_data(chunk, false).expect("send");
        }
        tx.send_data(Bytes::new(), true).expect("END_STREAM");
        let got = tokio::time::timeout(Duration::from_secs(10), app)
            .await
            .expect("the app saw the caller's end")
            .expect("app task");
        assert_eq!(got.len(), UP);
        assert!(
            got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
            "bytes changed on the way"
        );
        assert_eq!(
            bytes(&m, (UP as f64, DOWN as f64)).await,
            (UP as f64, DOWN as f64)
        );
    }

    #[tokio::test]
    async fn a_tunnel_keeps_flowing_while_the_listener_drains() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, app_read) = echo_app().await;
        let (addr, _m, stop) = serve(&api, &tcp_rule(port, WEB)).await;
        let mut h2 = client(&web, addr).await;
        let (status, stream) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::OK);
        let (mut tx, mut rx) = stream.expect("a tunnel");
        // SIGTERM: the connection is asked to finish (GOAWAY); the tunnel
        // in flight keeps its stream until it ends or the process does.
        stop.send(true).expect("stop");
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.send_data(Bytes::from_static(b"after"), true)
            .expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), read_all(&mut rx))
            .await
            .expect("in time");
        assert_eq!(got, b"afterbye");
        assert_eq!(app_read.await.expect("app"), 5);
    }

    #[tokio::test]
    async fn a_reset_stream_resets_the_app_connection() {
        // CONNECT_ERROR is what a caller's sidecar sends when its own TCP
        // peer reset (RFC 9113 section 8.5); any other reason abandons the
        // tunnel just the same.
        for reason in [
            h2::Reason::CONNECT_ERROR,
            h2::Reason::CANCEL,
            h2::Reason::NO_ERROR,
        ] {
            let (api, web) = (workload(API), workload(WEB));
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
            let port = l.local_addr().expect("address").port();
            let app = tokio::spawn(async move {
                let (mut tcp, _) = l.accept().await.expect("accept");
                let mut buf = [0u8; 16];
                let n = tcp.read(&mut buf).await.expect("first bytes");
                assert_eq!(&buf[..n], b"x");
                tcp.read(&mut buf).await.map(|n| n.to_string())
            });
            let (addr, m, _stop) = serve(&api, &tcp_rule(port, WEB)).await;
            let mut h2 = client(&web, addr).await;
            let (status, stream) = connect(&mut h2, port).await;
            assert_eq!(status, StatusCode::OK);
            let (mut tx, _rx) = stream.expect("a tunnel");
            tx.send_data(Bytes::from_static(b"x"), false).expect("send");
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send_reset(reason);
            let seen = tokio::time::timeout(Duration::from_secs(3), app)
                .await
                .expect("the app's connection ended")
                .expect("app task");
            let e = seen.expect_err("a reset, not an orderly end");
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{reason:?}: {e}"
            );
            assert_eq!(tcp(&m, "ok"), 1.0);
            assert_eq!(bytes(&m, (1.0, 0.0)).await, (1.0, 0.0));
        }
    }

    #[tokio::test]
    async fn a_reset_app_connection_resets_the_stream() {
        let (api, web) = (workload(API), workload(WEB));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let port = l.local_addr().expect("address").port();
        tokio::spawn(async move {
            let (mut tcp, _) = l.accept().await.expect("accept");
            tcp.write_all(b"hi").await.expect("write");
            let mut buf = [0u8; 1];
            let _ = tcp.read(&mut buf).await;
            // Closed with a reset.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        });
        let (addr, _m, _stop) = serve(&api, &tcp_rule(port, WEB)).await;
        let mut h2 = client(&web, addr).await;
        let (status, stream) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::OK);
        let (mut tx, mut rx) = stream.expect("a tunnel");
        let hi = rx.data().await.expect("data").expect("data");
        assert_eq!(&hi[..], b"hi");
        tx.send_data(Bytes::from_static(b"!"), false).expect("send");
        let reason = tokio::time::timeout(
            Duration::from_secs(3),
            std::future::poll_fn(|cx| tx.poll_reset(cx)),
        )
        .await
        .expect("the stream was reset");
        // RFC 9113 section 8.5: a bare CONNECT_ERROR, with no END_STREAM
        // before it that would pass for a complete response.
        assert_eq!(reason.expect("a reset"), h2::Reason::CONNECT_ERROR);
        let end = rx.data().await;
        assert!(
            matches!(end, Some(Err(_))),
            "the stream ended cleanly: {end:?}"
        );
    }

    /// [`connect`] with the `:authority` given as is.
    async fn connect_to(
        send: &mut h2::client::SendRequest<Bytes>,
        authority: &str,
    ) -> (StatusCode, String) {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .expect("request");
        let mut ready = send.clone().ready().await.expect("ready");
        let (resp, _stream) = ready.send_request(req, false).expect("send CONNECT");
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("answer in time")
            .expect("answer, not a reset");
        let status = resp.status();
        let text = read_all(&mut resp.into_body()).await;
        (status, String::from_utf8_lossy(&text).into_owned())
    }

    #[test]
    fn connect_ports_are_parsed_strictly() {
        use super::{parse_port, BadAuthority};
        for (a, want) in [
            ("x:5432", Ok(5432)),
            ("127.0.0.1:1", Ok(1)),
            ("[::1]:65535", Ok(65535)),
            ("x:+5432", Err(BadAuthority::BadPort)),
            ("x:-1", Err(BadAuthority::BadPort)),
            ("x:05432", Err(BadAuthority::BadPort)),
            ("x:00000000000000025432", Err(BadAuthority::BadPort)),
            ("x:0", Err(BadAuthority::BadPort)),
            ("x:65536", Err(BadAuthority::BadPort)),
            ("x:99999", Err(BadAuthority::BadPort)),
            ("x:123456", Err(BadAuthority::BadPort)),
            ("x:0x6338", Err(BadAuthority::BadPort)),
            ("x:5432 ", Err(BadAuthority::BadPort)),
            ("x:\u{0665}", Err(BadAuthority::BadPort)),
            ("u@x:5432", Err(BadAuthority::UserInfo)),
            ("user:pw@x:5432", Err(BadAuthority::UserInfo)),
            ("x", Err(BadAuthority::NoPort)),
            ("x:", Err(BadAuthority::NoPort)),
            ("[::1]", Err(BadAuthority::BadPort)),
        ] {
            assert_eq!(parse_port(Some(a)), want, "{a:?}");
        }
        assert_eq!(parse_port(None), Err(BadAuthority::NoPort));
    }

    #[tokio::test]
    async fn non_canonical_connect_authorities_get_400_and_never_connect() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, seen) = never_connected(Duration::from_secs(1)).await;
        let (addr, m, _stop) = serve(&api, &tcp_rule(port, WEB)).await;
        let mut h2 = client(&web, addr).await;
        let forms = [
            format!("x:+{port}"),
            format!("x:0{port}"),
            format!("x:00000000000000{port}"),
            format!("u@x:{port}"),
            format!("user:pw@x:{port}"),
            "x:0".to_owned(),
            "x:65536".to_owned(),
        ];
        for a in &forms {
            let (status, body) = connect_to(&mut h2, a).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{a}: {body}");
        }
        assert_eq!(tcp(&m, "denied"), forms.len() as f64);
        assert_eq!(tcp(&m, "ok"), 0.0);
        assert!(
            !seen.await.expect("listener task"),
            "the port was connected"
        );
    }

    #[tokio::test]
    async fn a_connect_to_a_port_of_the_sidecar_is_refused() {
        let (api, web) = (workload(API), workload(WEB));
        let (port, seen) = never_connected(Duration::from_millis(500)).await;
        let rest = format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n");
        let (addr, m, _stop) = serve(&api, &rest).await;
        let mut h2 = client(&web, addr).await;
        let (status, body) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body
            .expect_err("a refusal")
            .contains(&format!("port {port} is a port of this workload's sidecar")),);
        assert_eq!(tcp(&m, "denied"), 1.0);
        assert!(
            !seen.await.expect("listener task"),
            "the sidecar's port was connected"
        );
    }

    #[tokio::test]
    async fn a_reload_naming_an_http_port_or_an_own_port_is_refused() {
        let (api, web) = (workload(API), workload(WEB));
        let (admin, _) = never_connected(Duration::from_millis(10)).await;
        let rest = format!("http_ports = [8080]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
        let (addr, _m, _stop, inbound) = serve_inbound(&api, &rest).await;
        for port in [8080, admin] {
            let file =
                format!("routes = []\n[[tcp]]\nport = {port}\nallow = [\"spiffe://{TD}{WEB}\"]\n");
            let policy = crate::config::parse_policy(std::path::Path::new("p.toml"), &file)
                .expect("valid on its own");
            let e = inbound.replace_policy(&policy).expect_err("refused");
            assert!(e.to_string().contains("tcp[0].port"), "{e}");
        }
        // Still the startup policy: no tunnel anywhere.
        let mut h2 = client(&web, addr).await;
        let (status, _) = connect(&mut h2, 8080).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    /// An app on loopback that takes any number of connections, echoes
    /// each until EOF then closes it; the number accepted so far.
    async fn counting_echo_app() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let port = l.local_addr().expect("app address").port();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = tcp.shutdown().await;
                });
            }
        });
        (port, n)
    }

    /// An app that accepts and never reads, with a small receive buffer:
    /// a tunnel to it stalls as soon as the buffers between fill.
    async fn stalled_app() -> (u16, oneshot::Sender<()>) {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        sock.bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let port = sock.local_addr().expect("address").port();
        let l = sock.listen(8).expect("listen");
        let (done, held) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let _ = held.await;
            drop(tcp);
        });
        (port, done)
    }

    #[tokio::test]
    async fn tunnels_whose_apps_stop_reading_do_not_stall_the_connection() {
        // Each stalled tunnel holds its stream's window of received data
        // until its app reads; the connection's window must outlast many
        // of them, or one slow app stops every tunnel and request on the
        // mesh connection between the two pods.
        const STALLED: usize = 4;
        let (api, web) = (workload(API), workload(WEB));
        let (port, app_read) = echo_app().await;
        let mut stalled = Vec::new();
        let mut rules = tcp_rule(port, WEB);
        for _ in 0..STALLED {
            let (p, hold) = stalled_app().await;
            rules.push_str(&tcp_rule(p, WEB));
            stalled.push((p, hold));
        }
        let (addr, _m, _stop) = serve(&api, &rules).await;
        let mut h2 = client_with(
            &web,
            addr,
            h2::client::Builder::new()
                .initial_window_size(8 << 20)
                .initial_connection_window_size(64 << 20)
                .clone(),
        )
        .await;
        let mut held = Vec::new();
        for (p, hold) in stalled {
            let (status, stream) = connect(&mut h2, p).await;
            assert_eq!(status, StatusCode::OK);
            let (mut tx, rx) = stream.expect("a tunnel");
            // More than the stream's window and every buffer after it.
            tx.reserve_capacity(16 << 20);
            tx.send_data(Bytes::from(vec![7u8; 16 << 20]), false)
                .expect("queue");
            held.push((tx, rx, hold));
        }
        // Let the stalled streams take all the window they can.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, stream) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::OK);
        let (mut tx, mut rx) = stream.expect("a tunnel");
        tx.send_data(Bytes::from_static(b"still flowing"), true)
            .expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), read_all(&mut rx))
            .await
            .expect("the other tunnel's echo in time: the stalled ones hold the connection window");
        assert_eq!(&got[..], b"still flowingbye");
        assert_eq!(app_read.await.expect("the app saw EOF"), 13);
        drop(held);
    }

    #[tokio::test]
    async fn max_tunnels_bounds_the_open_tunnels_of_the_pod() {
        let (api, web, ops) = (workload(API), workload(WEB), workload("/ns/ops/sa/x"));
        let (port, accepted) = counting_echo_app().await;
        let rest = format!(
            "max_tunnels = 2\nmax_tunnels_per_peer = 2\n{}",
            tcp_rule(port, "/ns/*")
        );
        let (addr, m, _stop) = serve(&api, &rest).await;
        let mut h2 = client(&web, addr).await;
        let (s1, t1) = connect(&mut h2, port).await;
        let (s2, _t2) = connect(&mut h2, port).await;
        assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
        // Any caller, any connection: the bound is the pod's.
        let mut other = client(&ops, addr).await;
        let (status, body) = connect(&mut other, port).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.expect_err("a refusal").contains("max_tunnels"));
        assert_eq!(tcp(&m, "limited"), 1.0);
        assert_eq!(tcp(&m, "ok"), 2.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        // One ends: its place is free again.
        let (mut tx, mut rx) = t1.expect("a tunnel");
        tx.send_data(Bytes::from_static(b"x"), true).expect("end");
        assert_eq!(read_all(&mut rx).await, b"x");
        let mut freed = false;
        for _ in 0..100 {
            let (status, _) = connect(&mut other, port).await;
            if status == StatusCode::OK {
                freed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(freed, "the ended tunnel's place was never given back");
    }

    #[tokio::test]
    async fn max_tunnels_per_peer_bounds_one_caller_only() {
        let (api, web, ops) = (workload(API), workload(WEB), workload("/ns/ops/sa/x"));
        let (port, accepted) = counting_echo_app().await;
        let rest = format!(
            "max_tunnels = 10\nmax_tunnels_per_peer = 1\n{}",
            tcp_rule(port, "/ns/*")
        );
        let (addr, m, _stop) = serve(&api, &rest).await;
        let mut h2 = client(&web, addr).await;
        let (status, _t1) = connect(&mut h2, port).await;
        assert_eq!(status, StatusCode::OK);
        // A second connection of the same identity counts as the same caller.
        let mut again = client(&web, addr).await;
        let (status, body) = connect(&mut again, port).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body
            .expect_err("a refusal")
            .contains("max_tunnels_per_peer"));
        assert_eq!(tcp(&m, "limited"), 1.0);
        let mut other = client(&ops, addr).await;
        let (status, _t2) = connect(&mut other, port).await;
        assert_eq!(status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connect_over_http1_gets_405() {
        let (api, web) = (workload(API), workload(WEB));
        let (inbound, _m) = {
            let cfg = config("[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n");
            let metrics = Metrics::new().expect("metrics");
            let i = Inbound::new(
                cfg.inbound.as_ref().expect("[inbound]"),
                api.store(),
                &metrics,
            )
            .expect("inbound");
            (i, metrics)
        };
        let (req, _client) = crate::testing::hyper_request(
            b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nhost: 127.0.0.1:22\r\n\r\n",
        )
        .await;
        let conn = Arc::new(crate::inbound::conn::InboundConn::for_tests(
            web.peer(),
            &api.id,
            None,
        ));
        let resp = inbound.request(req, conn).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn a_tunnel_never_set_up_resets_its_app_connection() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = l.local_addr().expect("address");
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (mut app, _) = theirs.expect("accept");
        let unstarted = super::Unstarted {
            app: Some(ours.expect("connect")),
            caller: super::Caller {
                id: WEB.to_owned(),
                remote: addr,
            },
            port: addr.port(),
        };
        // What happens to the handoff when the stream ends before its 200.
        drop(unstarted);
        let mut buf = [0u8; 8];
        let e = app
            .read(&mut buf)
            .await
            .expect_err("a reset, not an orderly end");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
}
