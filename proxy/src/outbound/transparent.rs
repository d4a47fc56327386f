//! Connections `iptables` redirected to the outbound listener: the
//! original destination picks the candidate rules, the first bytes the
//! protocol; HTTP then goes the explicit request path to the rule's
//! upstream, opaque TCP through an HTTP/2 `CONNECT` tunnel on the same
//! mesh connection, and destinations outside the mesh are passed through
//! in plain TCP or refused (`[outbound] unmeshed`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::Unmeshed;
use crate::metrics::Direction;
use crate::outbound::detect::{self, Protocol};
use crate::outbound::rules::{Candidates, Captures};
use crate::outbound::{Outbound, Table};

/// Destinations remembered for "logged once" (beyond it, logged again).
const MAX_LOGGED_DESTINATIONS: usize = 1024;

/// What a redirected HTTP connection routes by: the rules as they were
/// when it was accepted, its candidates, its original destination.
pub struct Route {
    pub(super) table: Arc<Table>,
    pub(super) candidates: Candidates,
    pub(super) dst: SocketAddr,
}

impl Outbound {
    /// Handles one redirected connection to `dst`.
    pub(super) async fn transparent(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        dst: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let table = self.rules();
        let candidates = table.rules().candidates(dst);
        if candidates.is_empty() {
            return self.unmeshed(tcp, dst).await;
        }
        let protocol = if self.cfg.opaque_ports.contains(&dst.port()) {
            Protocol::Tcp
        } else {
            let sniff = detect::detect(
                &tcp,
                self.cfg.detect_timeout,
                self.cfg.limits.max_header_bytes,
            );
            tokio::select! {
                r = sniff => match r {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::debug!(peer = %remote, %dst, error = %e, "redirected connection failed before its protocol was known");
                        return;
                    }
                },
                _ = crate::http::server::stopped(&mut shutdown) => return,
            }
        };
        match protocol {
            Protocol::Tcp => match table.rules().for_tcp(&candidates) {
                Some(i) => self.tunnel(tcp, dst, &table, i).await,
                None => self.unmeshed(tcp, dst).await,
            },
            Protocol::Http1 => {
                let host = detect::peek_host(
                    &tcp,
                    self.cfg.limits.header_read_timeout,
                    self.cfg.limits.max_header_bytes,
                )
                .await;
                if table
                    .rules()
                    .for_host(&candidates, host.as_deref())
                    .is_none()
                {
                    // Nothing was consumed: a passthrough sends it all.
                    return self.unmeshed(tcp, dst).await;
                }
                let route = Arc::new(Route {
                    table,
                    candidates,
                    dst,
                });
                self.serve_http(tcp, remote, false, Some(route), shutdown)
                    .await;
            }
            Protocol::H2 => {
                let route = Arc::new(Route {
                    table,
                    candidates,
                    dst,
                });
                self.serve_http(tcp, remote, true, Some(route), shutdown)
                    .await;
            }
        }
    }

    /// Opaque TCP to `dst` through rule `i`'s upstream.
    async fn tunnel(&self, mut tcp: TcpStream, dst: SocketAddr, table: &Table, i: usize) {
        let tcp_metrics = &self.all_metrics.tcp;
        let up = match self.upstream_of_rule(table, i, &Captures::default(), dst) {
            Ok(up) => up,
            Err(_) => {
                tcp_metrics.connection(Direction::Outbound, "failed");
                tracing::warn!(%dst, "no upstream could be made for a TCP tunnel");
                return reset(tcp);
            }
        };
        let authority = dst.to_string();
        let mut tunnel = None;
        // Once more on a fresh connection if the one in hand was closing.
        for _ in 0..2 {
            let send = match up.h2.sender().await {
                Ok((send, _)) => send,
                Err(e) => {
                    tcp_metrics.connection(Direction::Outbound, "failed");
                    tracing::warn!(upstream = %up.cfg.address, %dst, error = ?e, "TCP tunnel: no mesh connection");
                    return reset(tcp);
                }
            };
            let closed = send.clone();
            match send.connect(&authority).await {
                Ok(t) => {
                    tunnel = Some(t);
                    break;
                }
                Err(crate::http::mesh_client::TunnelError::Refused(status)) => {
                    tcp_metrics.connection(Direction::Outbound, "denied");
                    tracing::info!(upstream = %up.cfg.address, %dst, %status, "TCP tunnel refused by the peer");
                    return reset(tcp);
                }
                Err(e) if closed.is_closed() => {
                    tracing::debug!(upstream = %up.cfg.address, %dst, error = %e, "TCP tunnel: mesh connection closing; trying a fresh one");
                }
                Err(e) => {
                    tcp_metrics.connection(Direction::Outbound, "failed");
                    tracing::warn!(upstream = %up.cfg.address, %dst, error = %e, "TCP tunnel failed");
                    return reset(tcp);
                }
            }
        }
        let Some(tunnel) = tunnel else {
            tcp_metrics.connection(Direction::Outbound, "failed");
            return reset(tcp);
        };
        tcp_metrics.connection(Direction::Outbound, "ok");
        let (rd, wr) = tcp.split();
        let end = tunnel.pump(rd, wr).await;
        tcp_metrics.bytes(Direction::Outbound, end.sent, end.received);
        if let Some(why) = end.error {
            tracing::debug!(%dst, error = %why, "TCP tunnel reset");
            reset(tcp);
        }
    }

    /// A destination outside the mesh: spliced in plain TCP, or refused.
    async fn unmeshed(&self, mut tcp: TcpStream, dst: SocketAddr) {
        let first = {
            let mut seen = self
                .unmeshed_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.len() >= MAX_LOGGED_DESTINATIONS {
                seen.clear();
            }
            seen.insert(dst)
        };
        let tcp_metrics = &self.all_metrics.tcp;
        match self.cfg.unmeshed {
            Unmeshed::Deny => {
                tcp_metrics.connection(Direction::Outbound, "unmeshed_denied");
                if first {
                    tracing::info!(%dst, "destination outside the mesh refused (outbound.unmeshed = \"deny\")");
                }
                reset(tcp);
            }
            Unmeshed::Passthrough => {
                if first {
                    tracing::info!(%dst, "destination outside the mesh: passed through in plain TCP");
                }
                let connect = TcpStream::connect(dst);
                let mut server = match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tcp_metrics.connection(Direction::Outbound, "failed");
                        tracing::debug!(%dst, error = %e, "passthrough connect failed");
                        return reset(tcp);
                    }
                    Err(_) => {
                        tcp_metrics.connection(Direction::Outbound, "failed");
                        tracing::debug!(%dst, "passthrough connect timed out");
                        return reset(tcp);
                    }
                };
                tcp_metrics.connection(Direction::Outbound, "passthrough");
                let _ = server.set_nodelay(true);
                let (up, down) = match tokio::io::copy_bidirectional(&mut tcp, &mut server).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!(%dst, error = %e, "passthrough ended with an error");
                        (0, 0)
                    }
                };
                tcp_metrics.bytes(Direction::Outbound, up, down);
            }
        }
    }
}

/// Closes `tcp` with a reset, so that the app sees the failure as a
/// refused or broken connection rather than a clean end of data.
fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}
