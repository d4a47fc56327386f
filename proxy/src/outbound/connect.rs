//! `CONNECT host:port` on the explicit listener, for a meshed host.
//!
//! An app told to use the sidecar as its HTTP proxy (`HTTP_PROXY`) sends
//! plain `http://` requests in absolute form, but some clients ask for a
//! tunnel first whatever the scheme: WebSocket clients (Python's
//! `websockets`, Go's gorilla and `x/net/websocket`, Java's) send
//! `CONNECT api.demo:8080` for a `ws://` URL. Such a tunnel is answered 200
//! and what the app sends in it is served as the HTTP it is, request by
//! request, exactly as if it had been sent to the listener directly: route
//! policy, step-up, XFCC and WebSocket over RFC 8441 all apply, and
//! nothing passes to the peer unread. So the tunnel gives the app no way
//! around the sidecar, and no reach it did not have.
//!
//! Only a host an upstream rule takes is tunnelled; any other gets the 502
//! a plain request for it gets. What is not HTTP in a tunnel (TLS for an
//! `https://` URL) gets the HTTP/1 server's 400 and the connection closes:
//! a peer's app is reached in plain text over the mesh, never through TLS
//! of the app's own. A `CONNECT` inside a tunnel, on a redirected
//! connection or in HTTP/2 gets 405 as before.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use tokio::sync::watch;

use crate::http::body::{text, ProxyBody};
use crate::http::h1_server::{MaySwitch, ServerBody, SwitchTo, Upgraded};
use crate::outbound::{host_key, Miss, Outbound, Via};

impl Outbound {
    /// Answers an explicit `CONNECT`: 200 with the connection's handoff
    /// for a meshed host, else the refusal a plain request would get.
    pub(super) fn connect(
        self: &Arc<Self>,
        req: &Request<ServerBody>,
        remote: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) -> Response<ProxyBody> {
        if req.extensions().get::<MaySwitch>().is_none() {
            return text(
                StatusCode::BAD_REQUEST,
                "a CONNECT request has no content (RFC 9110 section 9.3.6)\n",
            );
        }
        // Authority-form: a host and a port (digits, not 0), nothing else
        // (no userinfo).
        let uri = req.uri();
        let port_ok = |a: &http::uri::Authority| {
            a.port()
                .is_some_and(|p| p.as_str().bytes().all(|b| b.is_ascii_digit()) && p.as_u16() != 0)
        };
        let authority = match uri.authority() {
            Some(a)
                if uri.scheme().is_none()
                    && port_ok(a)
                    && !a.host().is_empty()
                    && !a.as_str().contains('@') =>
            {
                a.clone()
            }
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "CONNECT takes host:port (authority-form)\n",
                )
            }
        };
        let host = host_key(&authority);
        if let Err(miss) = self.upstream_for(host, None) {
            let why = match miss {
                Miss::NoRule => format!(
                    "no upstream for host {host}: CONNECT tunnels only to meshed hosts, whose HTTP the sidecar serves inside the tunnel\n"
                ),
                other => other.explain(host),
            };
            tracing::info!(peer = %remote, %authority, "outbound CONNECT refused: {}", why.trim_end());
            return text(StatusCode::BAD_GATEWAY, why);
        }
        tracing::debug!(peer = %remote, %authority, "CONNECT to a meshed host: serving the tunnel's HTTP");
        let this = self.clone();
        let mut resp = Response::new(ProxyBody::empty());
        resp.extensions_mut().insert(SwitchTo::new(move |io| {
            this.serve_tunnel(io, remote, shutdown)
        }));
        resp
    }

    /// Serves the HTTP an app sends in its tunnel, as on a connection of
    /// its own.
    async fn serve_tunnel(
        self: Arc<Self>,
        io: Upgraded,
        remote: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) {
        let (read, early) = io.read.into_inner();
        let Ok(tcp) = read.reunite(io.write) else {
            return;
        };
        if !early.is_empty() {
            // The HTTP/1 server refuses a CONNECT whose head came with more
            // bytes (400): none are left here.
            tracing::debug!(peer = %remote, "CONNECT: bytes read ahead of the tunnel; closed");
            return;
        }
        // Boxed: this serves a connection, which may lead back here.
        Box::pin(self.serve_app(tcp, remote, Via::Tunnel, shutdown)).await;
    }
}
