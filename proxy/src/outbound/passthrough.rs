//! HTTP/2 streams for hosts outside the mesh, on intercepted connections
//! that carry mesh requests too.
//!
//! An intercepted HTTP/2 connection without TLS (prior knowledge: gRPC) is
//! served stream by stream, since each stream names its own host. A stream
//! whose host no upstream rule takes, on a connection to a destination no
//! `cidr` or `port` rule names, is outside the mesh, exactly as a whole
//! HTTP/1 connection whose request no rule takes is. With `[outbound]
//! unmeshed = "passthrough"` such a stream goes on as it came: over a plain
//! HTTP/2 connection to the connection's original destination, one per app
//! connection ([`PlainSlot`]), as Envoy's passthrough cluster does. With
//! `"deny"` it gets 502. A stream for a meshed host on the same app
//! connection still goes to the mesh: only the streams outside it are sent
//! in plain text, each to where the app sent it.

use std::net::SocketAddr;

use http::uri::{Authority, Scheme};
use http::{header, Request, Response, StatusCode, Version};

use crate::config::Unmeshed;
use crate::error::root_cause;
use crate::http::body::{absolute_uri, path_of, text, ProxyBody, RequestBody};
use crate::http::mesh_client::MeshSender;
use crate::http::owned::strip_hop_by_hop;
use crate::metrics::Direction;
use crate::outbound::own_ports::{self, OwnConn};
use crate::outbound::table::{Plain, PlainSlot};
use crate::outbound::Outbound;

/// Why a stream could not be passed to its destination.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("{0} did not speak HTTP/2: {1}")]
    Handshake(SocketAddr, String),
    #[error("{0} failed the request: {1}")]
    Request(SocketAddr, String),
}

impl Outbound {
    /// Sends an HTTP/2 request for `authority`, which no rule takes, to the
    /// original destination `dst` of its connection in plain HTTP/2, on the
    /// app connection's `slot`, or refuses it (`unmeshed = "deny"`).
    pub(super) async fn pass_unmeshed_h2(
        &self,
        dst: SocketAddr,
        slot: PlainSlot,
        authority: Authority,
        mut parts: http::request::Parts,
        body: RequestBody,
    ) -> Response<ProxyBody> {
        let first = self.first_sight_of(dst);
        if self.cfg.unmeshed == Unmeshed::Deny {
            if first {
                tracing::info!(%dst, host = %authority, "HTTP/2 stream for a host outside the mesh refused (outbound.unmeshed = \"deny\")");
            }
            return text(
                StatusCode::BAD_GATEWAY,
                format!("no upstream for host {authority}: {dst} is outside the mesh, and [outbound] unmeshed = \"deny\"\n"),
            );
        }
        if first {
            tracing::info!(%dst, host = %authority, "HTTP/2 stream for a host outside the mesh: passed to its destination in plain HTTP/2");
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        let path = path_of(&parts.uri);
        parts.uri = match absolute_uri(Scheme::HTTP, authority, path) {
            Ok(u) => u,
            Err(resp) => return *resp,
        };
        parts.version = Version::HTTP_2;
        let req = Request::from_parts(parts, body);
        match self.send_plain_h2(dst, &slot, req).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(%dst, error = %e, "HTTP/2 passthrough failed");
                let status = match e {
                    PassError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::BAD_GATEWAY,
                };
                text(status, format!("destination outside the mesh: {e}\n"))
            }
        }
    }

    async fn send_plain_h2(
        &self,
        dst: SocketAddr,
        slot: &PlainSlot,
        req: Request<RequestBody>,
    ) -> Result<Response<ProxyBody>, PassError> {
        let mut req = req;
        let mut failed: Option<MeshSender> = None;
        // Once more on a fresh connection when the one in hand was closing
        // before anything of the request went out.
        for _ in 0..2 {
            let send = {
                let mut plain = slot.lock().await;
                let usable = plain.as_ref().filter(|p| {
                    !p.send.is_closed()
                        && !failed.as_ref().is_some_and(|f| f.same_connection(&p.send))
                });
                match usable {
                    Some(p) => p.send.clone(),
                    None => {
                        let (send, own) = self.dial_plain_h2(dst).await?;
                        *plain = Some(Plain {
                            send: send.clone(),
                            _own: own,
                        });
                        send
                    }
                }
            };
            match send.clone().try_send(req).await {
                Ok(resp) => return Ok(resp.map(ProxyBody::Mesh)),
                Err(e) => match e.unsent {
                    Some(unsent) if failed.is_none() => {
                        req = unsent;
                        failed = Some(send);
                    }
                    _ => return Err(PassError::Request(dst, root_cause(&e.error))),
                },
            }
        }
        unreachable!("the second round returns or fails")
    }

    async fn dial_plain_h2(&self, dst: SocketAddr) -> Result<(MeshSender, OwnConn), PassError> {
        let tcp = &self.all_metrics.tcp;
        let dial = async {
            let (io, own) = own_ports::connect(dst)
                .await
                .map_err(|e| PassError::Connect(dst, e))?;
            let _ = io.set_nodelay(true);
            let max = u32::try_from(self.cfg.limits.max_header_bytes).unwrap_or(u32::MAX);
            let send = MeshSender::handshake(io, max)
                .await
                .map_err(|e| PassError::Handshake(dst, root_cause(&e)))?;
            Ok((send, own))
        };
        let dialled = tokio::time::timeout(self.cfg.connect_timeout, dial)
            .await
            .unwrap_or(Err(PassError::Timeout(dst)));
        tcp.connection(
            Direction::Outbound,
            if dialled.is_ok() {
                "passthrough"
            } else {
                "failed"
            },
        );
        dialled
    }
}
