//! Connections `iptables` redirected to the outbound listener: the
//! original destination picks the candidate rules, the first bytes the
//! protocol; HTTP then goes the explicit request path to the rule's
//! upstream, opaque TCP through an HTTP/2 `CONNECT` tunnel on the same
//! mesh connection, and destinations outside the mesh are passed through
//! in plain TCP or refused (`[outbound] unmeshed`).
//!
//! Plain text leaves only for destinations outside the mesh: when a rule
//! with a `cidr` or `port` condition holds for the destination, HTTP whose
//! Host no rule takes gets 502 per request and opaque TCP that only host
//! rules cover is refused (counted `failed`); only a destination no such
//! rule names follows `[outbound] unmeshed`.
//!
//! An HTTP/1 connection passed through because no rule takes its first
//! request's Host is still read as it goes (`host_guard.rs`): a later
//! request that a rule takes, or that cannot be read, resets it rather than
//! leave in plain text.
//!
//! An HTTP/1 connection whose first head cannot be read (too large, too
//! many fields, malformed, or too slow) is refused and counted `failed`,
//! unless a host-less rule takes it: passed through, it would cross the
//! network in plain text although its Host may be meshed.
//!
//! Resets in a tunnel: an app that resets (or any local error) resets the
//! stream with `CONNECT_ERROR`, which the peer's inbound turns into a reset
//! of its app connection; a stream the peer resets resets the app's socket
//! (`SO_LINGER` 0), noticed even while the app is silent, also after the
//! app here has ended its side. A peer inbound of an earlier version
//! (hyper's upgraded stream, which has no bare reset) sends END_STREAM
//! before RST_STREAM `NO_ERROR` or `CANCEL` when its app resets: while the
//! app here still sends, the FIN for an END_STREAM waits up to 20 ms for
//! such a reset, so the app gets the reset alone. A tunnel or passthrough
//! with no byte either way for the listener's `tcp_idle_timeout` is closed
//! (the stream cancelled, the app's connection closed without a reset).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::Unmeshed;
use crate::http::h2_stream::idle_watch;
use crate::metrics::Direction;
use crate::outbound::detect::{self, Protocol};
use crate::outbound::host_guard::{HostGuard, Stopped};
use crate::outbound::own_ports;
use crate::outbound::rules::{Candidates, Captures, RuleSet};
use crate::outbound::table::{Route, Table};
use crate::outbound::{Outbound, Via};

/// The process's (effective) uid, for the loop's log line: the owner of
/// `/proc/self`.
fn current_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Destinations remembered for "logged once" (beyond it, logged again).
const MAX_LOGGED_DESTINATIONS: usize = 1024;

impl Outbound {
    /// Handles one redirected connection to `dst`.
    pub(super) async fn transparent(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        dst: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // The first request head must arrive within the header read
        // timeout of the accept, detection and peeking included.
        let head_by = tokio::time::Instant::now() + self.cfg.limits.header_read_timeout;
        if own_ports::is_own(remote, dst) {
            // Served, it would dial again and come back again, until the
            // process runs out of file descriptors.
            self.all_metrics.tcp.connection(Direction::Outbound, "loop");
            if !self.loop_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(peer = %remote, %dst, uid = %current_uid().map_or_else(|| "unknown".to_owned(), |u| u.to_string()), "a redirected connection is the sidecar's own: its uid is not the one `keyproof-proxy redirect --proxy-uid` exempts; refused (counted result=\"loop\", logged once)");
            } else {
                tracing::debug!(peer = %remote, %dst, "own connection redirected back: refused");
            }
            return reset(tcp);
        }
        let table = self.rules();
        let candidates = table.rules().candidates(dst);
        if candidates.is_empty() {
            // No rule covers the address, but HTTP sent to it (an egress
            // proxy's absolute-form request, a CONNECT) may name a meshed
            // host: read lazily, refused then (`may_pass`).
            let guard = if table.rules().has_host_names() {
                Guard::Late
            } else {
                Guard::None
            };
            drop(table);
            return self.unmeshed(tcp, dst, guard).await;
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
        let protocol = match protocol {
            // A beginning of HTTP/1 that never ended its request line: TCP
            // when the TCP way is a tunnel (encrypted), else HTTP/1, whose
            // server refuses it rather than pass it on in plain text.
            Protocol::PartialHttp1 if table.rules().for_tcp(&candidates).is_some() => Protocol::Tcp,
            Protocol::PartialHttp1 => Protocol::Http1,
            p => p,
        };
        match protocol {
            Protocol::Tcp | Protocol::Silent => match table.rules().for_tcp(&candidates) {
                Some(i) => self.tunnel(tcp, dst, &table, i).await,
                None if table.rules().claims_destination(&candidates) => {
                    // A meshed destination whose rules all need a Host:
                    // opaque TCP has none, and plain text is not an option.
                    self.all_metrics
                        .tcp
                        .connection(Direction::Outbound, "failed");
                    tracing::info!(peer = %remote, %dst, "opaque TCP to a meshed destination that only host rules cover: refused rather than passed through in plain text");
                    reset(tcp)
                }
                // Host rules may take what a silent client writes late.
                None if protocol == Protocol::Silent => self.unmeshed(tcp, dst, Guard::Late).await,
                None => self.unmeshed(tcp, dst, Guard::None).await,
            },
            // (PartialHttp1 is decided above.)
            Protocol::Http1 | Protocol::PartialHttp1 => {
                let peek = detect::peek_host(&tcp, head_by, self.cfg.limits.max_header_bytes);
                let head = tokio::select! {
                    h = peek => h,
                    _ = crate::http::server::stopped(&mut shutdown) => return,
                };
                let hosts: &[String] = match &head {
                    detect::Head::Complete(hosts) => hosts,
                    detect::Head::Unreadable => &[],
                };
                // Routed by its first host (the target's authority, else
                // Host), as the server that takes it reads it.
                let host = hosts.first().map(String::as_str);
                if table.rules().for_host(&candidates, host).is_none() {
                    if head == detect::Head::Unreadable {
                        // Its Host unknown, this HTTP may be bound for a
                        // meshed name: passed through, it would cross the
                        // network in plain text. A host-less rule would
                        // have taken it (its server answers the bad head).
                        self.all_metrics
                            .tcp
                            .connection(Direction::Outbound, "failed");
                        tracing::info!(peer = %remote, %dst, "HTTP request head unreadable (too large, too many fields, malformed or too slow): refused rather than passed through in plain text");
                        return reset(tcp);
                    }
                    if !table.rules().claims_destination(&candidates)
                        && unmeshed_hosts(table.rules(), &candidates, hosts)
                    {
                        // Nothing was consumed: a passthrough sends it all,
                        // and judges each later request by its own hosts.
                        drop(table);
                        return self.unmeshed(tcp, dst, Guard::Http1).await;
                    }
                    // A meshed destination (a cidr or port rule holds) and
                    // a Host no rule takes (a typo, a bare IP): served, so
                    // that the app gets the 502 "no upstream for host" of
                    // each request, never sent in plain text.
                }
                let route = Arc::new(Route::new(&table, candidates, dst));
                // Not held for the connection's life: a reload frees it.
                drop(table);
                // The server gives the first head what is left of its
                // time (a slow one was waited for already), not a whole
                // timeout more.
                self.serve_http(
                    tcp,
                    remote,
                    false,
                    Via::Redirected(route),
                    Some(head_by),
                    shutdown,
                )
                .await;
            }
            Protocol::H2 => {
                let route = Arc::new(Route::new(&table, candidates, dst));
                // Not held for the connection's life: a reload frees it.
                drop(table);
                self.serve_http(tcp, remote, true, Via::Redirected(route), None, shutdown)
                    .await;
            }
        }
    }

    /// Opaque TCP to `dst` through rule `i`'s upstream.
    async fn tunnel(&self, mut tcp: TcpStream, dst: SocketAddr, table: &Table, i: usize) {
        let tcp_metrics = &self.all_metrics.tcp;
        let up = match self.upstream_of_rule(table, i, &Captures::default(), dst, None) {
            Ok(up) => up,
            Err(_) => {
                tcp_metrics.connection(Direction::Outbound, "failed");
                tracing::warn!(%dst, "no upstream could be made for a TCP tunnel");
                return reset(tcp);
            }
        };
        let authority = dst.to_string();
        let mut tunnel = None;
        let mut refused_by = None;
        // Once more on another connection if the one in hand was closing
        // or refused the stream.
        for _ in 0..2 {
            let send = match up.h2.tunnel_sender(refused_by.as_ref()).await {
                Ok((send, _)) => send,
                Err(e) => {
                    tcp_metrics.connection(Direction::Outbound, "failed");
                    tracing::warn!(upstream = %up.cfg.address, %dst, error = ?e, "TCP tunnel: no mesh connection");
                    return reset(tcp);
                }
            };
            let this = send.clone();
            // The peer answers once its app accepted or refused (bounded by
            // its own app_connect_timeout): a peer that never does must not
            // hold the app for ever.
            let answer = tokio::time::timeout(self.cfg.connect_timeout, send.connect(&authority));
            match answer.await {
                Ok(Ok(t)) => {
                    tunnel = Some(t);
                    break;
                }
                Ok(Err(crate::http::mesh_client::TunnelError::Refused(status))) => {
                    // 503: the peer's tunnel limits, not its policy.
                    let result = if status == 503 { "limited" } else { "denied" };
                    tcp_metrics.connection(Direction::Outbound, result);
                    tracing::info!(upstream = %up.cfg.address, %dst, %status, "TCP tunnel refused by the peer");
                    return reset(tcp);
                }
                Ok(Err(e)) if e.is_unprocessed() => {
                    tracing::info!(upstream = %up.cfg.address, %dst, error = %e, "TCP tunnel: the mesh connection did not take the stream (the peer's stream limit, or its GOAWAY); trying another connection");
                    refused_by = Some(this);
                }
                Ok(Err(e)) if this.is_closed() => {
                    tracing::debug!(upstream = %up.cfg.address, %dst, error = %e, "TCP tunnel: mesh connection closing; trying a fresh one");
                }
                Ok(Err(e)) => {
                    tcp_metrics.connection(Direction::Outbound, "failed");
                    tracing::warn!(upstream = %up.cfg.address, %dst, error = %e, "TCP tunnel failed");
                    return reset(tcp);
                }
                Err(_) => {
                    tcp_metrics.connection(Direction::Outbound, "failed");
                    tracing::warn!(upstream = %up.cfg.address, %dst, timeout = ?self.cfg.connect_timeout, "TCP tunnel: the peer did not answer the CONNECT in time");
                    return reset(tcp);
                }
            }
        }
        let Some(tunnel) = tunnel else {
            tcp_metrics.connection(Direction::Outbound, "failed");
            tracing::warn!(upstream = %up.cfg.address, %dst, "TCP tunnel: no connection to the peer would take the stream");
            return reset(tcp);
        };
        tcp_metrics.connection(Direction::Outbound, "ok");
        let (rd, wr) = tcp.split();
        let end = tunnel.pump(rd, wr, self.cfg.limits.tcp_idle_timeout).await;
        tcp_metrics.bytes(Direction::Outbound, end.sent, end.received);
        if let Some(why) = end.error {
            // A reset on the mesh side reaches the app as a reset, not as a
            // clean end it could take for complete data.
            tracing::debug!(%dst, error = %why, "TCP tunnel reset");
            reset(tcp);
        } else if end.idle {
            tracing::debug!(%dst, "TCP tunnel idle: closed");
        }
    }

    /// Whether `dst` is a destination outside the mesh not seen lately:
    /// what goes there is logged once per destination, not per connection.
    pub(super) fn first_sight_of(&self, dst: SocketAddr) -> bool {
        let mut seen = self
            .unmeshed_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.len() >= MAX_LOGGED_DESTINATIONS {
            seen.clear();
        }
        seen.insert(dst)
    }

    /// A destination outside the mesh: spliced in plain TCP, or refused.
    /// `http1`: the connection is HTTP/1 whose first request no rule took;
    /// each later request must not be one a rule takes either
    /// ([`HostGuard`]), by the rules in use when it comes.
    async fn unmeshed(&self, mut tcp: TcpStream, dst: SocketAddr, guard: Guard) {
        let first = self.first_sight_of(dst);
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
                let connect = own_ports::connect(dst);
                let (mut server, _own) =
                    match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
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
                let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
                let app = Counted {
                    io: &mut tcp,
                    read: &up,
                };
                let mut peer = Counted {
                    io: &mut server,
                    read: &down,
                };
                let idle = self.cfg.limits.tcp_idle_timeout;
                let may_pass = |hosts: &[String]| {
                    let table = self.rules();
                    let rules = table.rules();
                    let c = rules.candidates(dst);
                    !rules.claims_destination(&c)
                        && unmeshed_hosts(rules, &c, hosts)
                        && !hosts.iter().any(|h| rules.names_meshed_host(h))
                };
                let max = self.cfg.limits.max_header_bytes;
                let outcome = match guard {
                    Guard::Http1 => {
                        let mut app = HostGuard::new(app, max, may_pass);
                        splice(&mut app, &mut peer, idle, &up, &down).await
                    }
                    Guard::Late => {
                        let mut app = HostGuard::late(app, max, may_pass);
                        splice(&mut app, &mut peer, idle, &up, &down).await
                    }
                    Guard::None => {
                        let mut app = app;
                        splice(&mut app, &mut peer, idle, &up, &down).await
                    }
                };
                tcp_metrics.bytes(Direction::Outbound, up.into_inner(), down.into_inner());
                match outcome {
                    Some(Ok(_)) => {}
                    Some(Err(e)) if Stopped::of(&e).is_some() => {
                        tracing::info!(%dst, error = %e, "passthrough stopped");
                        reset(tcp);
                        reset(server);
                    }
                    Some(Err(e)) => {
                        // One side failed or reset: the other must not
                        // take the end for a clean one.
                        tracing::debug!(%dst, error = %e, "passthrough ended with an error");
                        reset(tcp);
                        reset(server);
                    }
                    None => tracing::debug!(%dst, "passthrough idle: closed"),
                }
            }
        }
    }
}

/// How a passthrough reads the app's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// Opaque: no rule could take anything it sends.
    None,
    /// HTTP/1, each request judged by its hosts (`HostGuard::new`).
    Http1,
    /// The client was silent when the connection was decided: its first
    /// bytes are judged as HTTP/1 if they are (`HostGuard::late`).
    Late,
}

/// Whether no rule among `c` takes any of `hosts` (none: a request without
/// a host): a request naming them may go out in plain text.
fn unmeshed_hosts(rules: &RuleSet, c: &Candidates, hosts: &[String]) -> bool {
    if hosts.is_empty() {
        return rules.for_host(c, None).is_none();
    }
    hosts.iter().all(|h| rules.for_host(c, Some(h)).is_none())
}

/// Copies both ways between `app` and `peer` until both ended (`Some`), or
/// nothing crossed for `idle` (`None`); `up` and `down` count the bytes.
async fn splice<A>(
    app: &mut A,
    peer: &mut Counted<'_>,
    idle: Duration,
    up: &AtomicU64,
    down: &AtomicU64,
) -> Option<io::Result<(u64, u64)>>
where
    A: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        r = tokio::io::copy_bidirectional(app, peer) => Some(r),
        () = idle_watch(idle, up, down) => None,
    }
}

/// A stream that counts the bytes read from it.
struct Counted<'a> {
    io: &'a mut TcpStream,
    read: &'a AtomicU64,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = buf.filled().len() - before;
            this.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

/// Closes `tcp` with a reset, so that the app sees the failure as a
/// refused or broken connection rather than a clean end of data.
fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use crate::metrics::Metrics;
    use crate::outbound::upstream::tests::{mesh_server, Serve};
    use crate::outbound::Outbound;
    use crate::testing::{config, metric, workload};

    const WAIT: Duration = Duration::from_secs(5);
    const API: &str = "spiffe://unit.keyproof.test/ns/demo/sa/api";

    fn outbound(toml: &str) -> (Arc<Outbound>, Metrics) {
        let cfg = config(&format!(
            "[outbound]\nlisten = \"127.0.0.1:0\"\ndetect_timeout = \"100ms\"\n{toml}"
        ));
        let m = Metrics::new().unwrap();
        let o = Outbound::new(
            cfg.outbound.as_ref().unwrap(),
            workload("/ns/demo/sa/web").store(),
            &m,
        )
        .unwrap();
        (o, m)
    }

    fn tcp_result(m: &Metrics, result: &str) -> f64 {
        metric(
            m,
            &format!(
                "keyproof_tcp_connections_total{{direction=\"outbound\",result=\"{result}\"}}"
            ),
        )
    }

    /// A client connection whose server side the outbound handles as if
    /// redirected from `dst`.
    async fn redirected(o: &Arc<Outbound>, dst: std::net::SocketAddr) -> TcpStream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        let (s, remote) = s.unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let o = o.clone();
        tokio::spawn(async move {
            let _tx = _tx;
            o.transparent(s, remote, dst, rx).await;
        });
        c.unwrap()
    }

    /// A plain TCP echo server; counts its connections.
    async fn echo_server() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, n)
    }

    async fn exchange(c: &mut TcpStream, send: &[u8]) -> Vec<u8> {
        c.write_all(send).await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, c.read_to_end(&mut got))
            .await
            .expect("no end")
            .unwrap();
        got
    }

    #[tokio::test]
    async fn opaque_tcp_to_a_meshed_destination_is_tunnelled_with_connect() {
        let api = workload("/ns/demo/sa/api");
        let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Connect]).await;
        let (o, m) = outbound(&format!(
            "[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n"
        ));
        let mut c = redirected(&o, mesh).await;
        // Not HTTP: tunnelled at once, without waiting for detect_timeout.
        assert_eq!(
            exchange(&mut c, b"\x00\x00\x00\x08hello").await,
            b"\x00\x00\x00\x08hello"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(tcp_result(&m, "ok"), 1.0);
        let bytes = |way: &str| {
            metric(
                &m,
                &format!("keyproof_tcp_bytes_total{{direction=\"outbound\",way=\"{way}\"}}"),
            )
        };
        assert_eq!(
            (bytes("client_to_server"), bytes("server_to_client")),
            (9.0, 9.0)
        );
        // A server-first protocol (the client says nothing) is TCP too.
        let mut c = redirected(&o, mesh).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(exchange(&mut c, b"late").await, b"late");
        // The beginning of a request line that never ends (`AUTH secret`):
        // tunnelled after detect_timeout (encrypted), not held as HTTP for
        // the header timeout; one the client ends (`GET`, FIN) at once.
        let mut c = redirected(&o, mesh).await;
        c.write_all(b"AUTH secret").await.unwrap();
        let mut got = [0u8; 11];
        tokio::time::timeout(WAIT, c.read_exact(&mut got))
            .await
            .expect("tunnelled in time")
            .unwrap();
        assert_eq!(&got, b"AUTH secret");
        let mut c = redirected(&o, mesh).await;
        assert_eq!(exchange(&mut c, b"GET").await, b"GET");
    }

    #[tokio::test]
    async fn a_peer_with_another_identity_fails_the_tunnel() {
        let db = workload("/ns/demo/sa/db");
        let (mesh, _accepted) = mesh_server(&db, &[b"h2"], vec![Serve::Connect]).await;
        let (o, m) = outbound(&format!(
            "opaque_ports = [{}]\n[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n",
            mesh.port()
        ));
        let mut c = redirected(&o, mesh).await;
        let _ = c.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut got))
            .await
            .expect("not closed");
        assert!(got.is_empty());
        assert_eq!(tcp_result(&m, "failed"), 1.0);
        assert_eq!(tcp_result(&m, "ok"), 0.0);
    }

    #[tokio::test]
    async fn http_10_without_host_goes_where_the_connection_was_going() {
        let api = workload("/ns/demo/sa/api");
        let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Answer]).await;
        let (o, _m) = outbound(&format!(
            "[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n"
        ));
        let mut c = redirected(&o, mesh).await;
        let got = exchange(&mut c, b"GET /x HTTP/1.0\r\n\r\n").await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        // HTTP/1.1 must name one.
        let mut c = redirected(&o, mesh).await;
        let got = exchange(&mut c, b"GET /x HTTP/1.1\r\n\r\n").await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    }

    #[tokio::test]
    async fn each_app_connection_gets_its_own_mesh_connection_unless_shared() {
        // A Service address behind a cidr rule is balanced by kube-proxy
        // per connection: one shared mesh connection would take every app
        // connection of the pod to the backend it was first dialled to.
        let api = workload("/ns/demo/sa/api");
        for (balance, want) in [
            ("", 4),
            ("balance = \"connection\"\n", 4),
            ("balance = \"shared\"\n", 1),
        ] {
            let (mesh, mut accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Connect]).await;
            let (o, _m) = outbound(&format!(
                "[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n{balance}"
            ));
            let mut keep = Vec::new();
            // Two HTTP app connections, two requests each...
            for _ in 0..2 {
                let mut c = redirected(&o, mesh).await;
                for _ in 0..2 {
                    c.write_all(b"GET /x HTTP/1.1\r\nHost: web.demo.svc\r\n\r\n")
                        .await
                        .unwrap();
                    let head = response_head(&mut c).await;
                    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                }
                keep.push(c);
            }
            // ... and two TCP tunnels.
            for _ in 0..2 {
                let mut c = redirected(&o, mesh).await;
                c.write_all(b"\x00tcp").await.unwrap();
                let mut got = [0u8; 4];
                tokio::time::timeout(WAIT, c.read_exact(&mut got))
                    .await
                    .expect("tunnelled")
                    .unwrap();
                keep.push(c);
            }
            // The server notes a connection once its handshake is done, on
            // a task of its own: on a busy machine that can come late, so
            // wait for the count wanted, then a while for any extra one.
            let mut conns = Vec::new();
            while conns.len() < want {
                match tokio::time::timeout(WAIT, accepted.recv()).await {
                    Ok(Some(a)) => conns.push(a),
                    _ => break,
                }
            }
            while let Ok(Some(a)) =
                tokio::time::timeout(Duration::from_millis(300), accepted.recv()).await
            {
                conns.push(a);
            }
            assert_eq!(conns.len(), want, "{balance:?}");
        }
    }

    #[tokio::test]
    async fn http_on_a_redirected_connection_goes_to_the_original_destination_over_mtls() {
        let api = workload("/ns/demo/sa/api");
        let (mesh, accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Connect]).await;
        let (o, _m) = outbound(
            "[[outbound.upstreams]]\nhost = \"*.{ns}.svc\"\ncidr = \"127.0.0.0/8\"\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/api\"\n",
        );
        let mut c = redirected(&o, mesh).await;
        let got = exchange(
            &mut c,
            b"GET /x HTTP/1.1\r\nHost: web.demo.svc\r\nConnection: close\r\n\r\n",
        )
        .await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        drop(accepted);
        // The identity filled from another namespace is not the server's.
        let mut c = redirected(&o, mesh).await;
        let got = exchange(
            &mut c,
            b"GET /x HTTP/1.1\r\nHost: web.shop.svc\r\nConnection: close\r\n\r\n",
        )
        .await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    }

    /// One HTTP/1.1 response read from a keep-alive connection: its head
    /// (and a `Content-Length` body, read and dropped).
    async fn response_head(c: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = tokio::time::timeout(WAIT, c.read(&mut chunk))
                .await
                .expect("a response in time")
                .unwrap();
            assert!(n > 0, "closed before a response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = buf.len() - head_end;
        while body < length {
            let n = c.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            body += n;
        }
        head
    }

    #[tokio::test]
    async fn a_reload_applies_to_the_next_request_of_an_open_connection() {
        // Revoking or tightening a rule must reach long-lived app
        // connections too, not only new ones.
        let api = workload("/ns/demo/sa/api");
        let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Connect]).await;
        let rule = |id: &str| {
            format!("[[upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"spiffe://unit.keyproof.test/ns/demo/sa/{id}\"\n")
        };
        let (o, _m) = outbound(&rule("api").replace("[[upstreams]]", "[[outbound.upstreams]]"));
        let mut c = redirected(&o, mesh).await;
        let get = b"GET /x HTTP/1.1\r\nHost: web.demo.svc\r\n\r\n";
        c.write_all(get).await.unwrap();
        let head = response_head(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // The expected identity changes: the server's is no longer it.
        let path = std::path::Path::new("upstreams.toml");
        o.replace_rules(crate::config::parse_upstreams(path, &rule("other")).unwrap())
            .unwrap();
        c.write_all(get).await.unwrap();
        let head = response_head(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 502"), "{head}");
        // And back: the same connection is served again.
        o.replace_rules(crate::config::parse_upstreams(path, &rule("api")).unwrap())
            .unwrap();
        c.write_all(get).await.unwrap();
        let head = response_head(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }

    #[tokio::test]
    async fn the_sidecars_own_dial_redirected_back_is_refused_not_dialled_again() {
        // As with `redirect --proxy-uid` naming another uid than the
        // sidecar's: every connection to the listener, the sidecar's own
        // passthrough dial included, is handled as redirected to it.
        let (o, m) = outbound("unmeshed = \"passthrough\"\n");
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (_tx, rx) = tokio::sync::watch::channel(false);
        {
            let (o, accepted) = (o.clone(), accepted.clone());
            tokio::spawn(async move {
                while let Ok((s, remote)) = l.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(o.clone().transparent(s, remote, addr, rx.clone()));
                }
            });
        }
        let mut app = TcpStream::connect(addr).await.unwrap();
        app.write_all(b"hello").await.unwrap();
        let mut rest = Vec::new();
        // The app's connection ends (reset), it does not hang.
        let _ = tokio::time::timeout(WAIT, app.read_to_end(&mut rest))
            .await
            .expect("the looped connection never ended");
        assert_eq!(tcp_result(&m, "loop"), 1.0);
        assert_eq!(tcp_result(&m, "passthrough"), 1.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn unmeshed_destinations_are_passed_through_or_refused() {
        let (plain, conns) = echo_server().await;
        let rule = format!("[[outbound.upstreams]]\ncidr = \"10.0.0.0/8\"\nidentity = \"{API}\"\n");
        let (o, m) = outbound(&rule);
        let mut c = redirected(&o, plain).await;
        assert_eq!(exchange(&mut c, b"\x16\x03\x01hi").await, b"\x16\x03\x01hi");
        assert_eq!(tcp_result(&m, "passthrough"), 1.0);

        let (o, m) = outbound(&format!("unmeshed = \"deny\"\n{rule}"));
        let mut c = redirected(&o, plain).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut got))
            .await
            .expect("not closed");
        assert!(got.is_empty());
        assert_eq!(tcp_result(&m, "unmeshed_denied"), 1.0);
        assert_eq!(
            conns.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "denied, yet connected"
        );
    }

    #[tokio::test]
    async fn an_http_host_no_rule_takes_is_passed_through_whole_outside_the_mesh() {
        // Only a host rule: it says nothing about this destination.
        let (plain, _conns) = echo_server().await;
        let (o, m) = outbound(&format!(
            "[[outbound.upstreams]]\nhost = \"api.demo\"\nidentity = \"{API}\"\n"
        ));
        let mut c = redirected(&o, plain).await;
        let req = b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n";
        assert_eq!(exchange(&mut c, req).await, req);
        assert_eq!(tcp_result(&m, "passthrough"), 1.0);
    }

    #[tokio::test]
    async fn a_later_request_for_a_meshed_host_never_leaves_a_passed_through_connection() {
        // The first request's Host is outside the mesh, so the connection
        // is passed through; its next request names a meshed service and
        // must not follow in plain text, secret and all: the connection is
        // reset instead (a fresh one routes it to the mesh).
        let (plain, seen) = recording_server().await;
        let (o, m) = outbound(
            "[[outbound.upstreams]]\nhost = \"*.{ns}.svc\"\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/api\"\n",
        );
        let mut c = redirected(&o, plain).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
            .await
            .unwrap();
        let got = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        seen_at_last(&seen, "example.org").await;
        c.write_all(b"GET /x HTTP/1.1\r\nHost: api.db.svc\r\nAuthorization: Bearer s3cret\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let end = tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
            .await
            .expect("closed");
        assert!(end.is_err(), "reset, not a clean end: {end:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !got().contains("s3cret"),
            "the meshed request went out in plain text"
        );
        assert!(!got().contains("api.db.svc"));
        assert_eq!(tcp_result(&m, "passthrough"), 1.0);
    }

    #[tokio::test]
    async fn a_meshed_host_named_to_an_address_no_rule_covers_never_leaves_in_plain_text() {
        // Round 12 mesh F2: host rules limited by `cidr` (the example's
        // way) say nothing of an egress proxy's address; an absolute-form
        // request, a CONNECT or a later request naming a meshed service
        // sent there must not go out in plain text. Other hosts pass.
        // The example's rules (deploy/kubernetes/example-transparent).
        let rule = "[[outbound.upstreams]]\nhost = \"*.{ns}.svc.cluster.local\"\ncidr = \"10.96.0.0/12\"\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/*\"\n\
                    [[outbound.upstreams]]\nhost = \"*.{ns}\"\ncidr = \"10.96.0.0/12\"\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/*\"\n\
                    [[outbound.upstreams]]\ncidr = \"10.96.0.0/12\"\nidentity = \"spiffe://unit.keyproof.test/ns/*\"\n";
        // Any other name, even one `*.{ns}` would take inside the range,
        // passes (verification V6).
        for host in ["www.example.com", "api.db", "github.com:8080"] {
            let (plain, _conns) = echo_server().await;
            let (o, _m) = outbound(rule);
            let mut c = redirected(&o, plain).await;
            let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert_eq!(
                exchange(&mut c, req.as_bytes()).await,
                req.as_bytes(),
                "{host}"
            );
        }
        for (first, second) in [
            // An address in the mesh's range, named (verification V5).
            (&b"GET http://10.96.0.5/ HTTP/1.1\r\nHost: 10.96.0.5\r\nAuthorization: Bearer s3cret\r\n\r\n"[..], None),
            (b"GET / HTTP/1.1\r\nHost: 10.96.0.5:8080\r\nAuthorization: Bearer s3cret\r\n\r\n", None),
            (&b"GET http://api.db.svc.cluster.local/ HTTP/1.1\r\nHost: api.db.svc.cluster.local\r\nAuthorization: Bearer s3cret\r\n\r\n"[..], None),
            (b"CONNECT api.db.svc.cluster.local:8080 HTTP/1.1\r\nHost: api.db.svc.cluster.local:8080\r\nProxy-Authorization: s3cret\r\n\r\n", None),
            (
                b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n",
                Some(&b"GET /x HTTP/1.1\r\nHost: api.db.svc.cluster.local\r\nAuthorization: Bearer s3cret\r\n\r\n"[..]),
            ),
        ] {
            let (plain, seen) = recording_server().await;
            let (o, _m) = outbound(rule);
            let mut c = redirected(&o, plain).await;
            c.write_all(first).await.unwrap();
            if let Some(second) = second {
                seen_at_last(&seen, "example.org").await;
                c.write_all(second).await.unwrap();
            }
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
                .await
                .expect("closed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let got = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
            assert!(!got.contains("s3cret"), "{got}");
            assert!(!got.contains("api.db.svc") && !got.contains("10.96"), "{got}");
        }
    }

    #[tokio::test]
    async fn a_request_written_late_or_after_an_empty_line_never_leaves_in_plain_text() {
        // Only host rules; the destination is outside the mesh. An app that
        // connects and writes after detect_timeout (100 ms here), or starts
        // with an empty line, sending a meshed host's request: reset, never
        // passed through. Another host's request, written late, passes.
        let rule = "[[outbound.upstreams]]\nhost = \"*.{ns}.svc\"\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/api\"\n";
        let meshed: &[u8] =
            b"GET /x HTTP/1.1\r\nHost: api.db.svc\r\nAuthorization: Bearer s3cret\r\n\r\n";
        let crlf = [&b"\r\n"[..], meshed].concat();
        for (late, req) in [(true, meshed), (false, &crlf[..]), (true, &crlf[..])] {
            let (plain, seen) = recording_server().await;
            let (o, m) = outbound(rule);
            let mut c = redirected(&o, plain).await;
            if late {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            c.write_all(req).await.unwrap();
            // Reset, or served by the mesh way (a 502 here, no upstream).
            let mut rest = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_millis(500), c.read_to_end(&mut rest)).await;
            let got = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
            assert!(
                !got.contains("s3cret"),
                "late {late}: sent in plain text: {got}"
            );
            let _ = m;
        }
        let (plain, seen) = recording_server().await;
        let (o, _m) = outbound(rule);
        let mut c = redirected(&o, plain).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
            .await
            .unwrap();
        let got = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        tokio::time::timeout(WAIT, async {
            while !got().contains("example.org") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("a late request for a host outside the mesh passed through");
    }

    /// A plain HTTP/2 server (prior knowledge) that answers each request
    /// `200 plain <authority><path>` and counts its connections.
    async fn plain_h2_server() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(s).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let body = format!(
                            "plain {}{} xfcc={}",
                            req.uri().authority().map_or("", |a| a.as_str()),
                            req.uri().path(),
                            req.headers().contains_key("x-forwarded-client-cert"),
                        );
                        let resp = http::Response::new(());
                        let mut send = respond.send_response(resp, false).unwrap();
                        let _ = send.send_data(bytes::Bytes::from(body), true);
                    }
                });
            }
        });
        (addr, n)
    }

    /// A GET for `uri` on `send`: its status and body.
    async fn h2_get(send: &mut h2::client::SendRequest<bytes::Bytes>, uri: &str) -> (u16, String) {
        let req = http::Request::get(uri).body(()).unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        let resp = tokio::time::timeout(WAIT, resp)
            .await
            .expect("answered")
            .unwrap();
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while let Some(d) = body.data().await {
            text.extend_from_slice(&d.unwrap());
        }
        (status, String::from_utf8_lossy(&text).into_owned())
    }

    #[tokio::test]
    async fn h2_without_tls_passes_streams_outside_the_mesh_to_their_destination() {
        // HTTP/2 is served stream by stream, whatever its first authority:
        // a stream for a host no rule takes, to a destination no cidr or
        // port rule names, goes on in plain HTTP/2 to the connection's
        // original destination (one plain connection per app connection);
        // a stream for a meshed host on the same app connection still goes
        // to the mesh.
        let api = workload("/ns/demo/sa/api");
        let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Answer]).await;
        let (plain, conns) = plain_h2_server().await;
        let rule = format!(
            "[[outbound.upstreams]]\nhost = \"api.demo\"\naddress = \"{mesh}\"\nidentity = \"{API}\"\n"
        );
        let (o, m) = outbound(&rule);
        let c = redirected(&o, plain).await;
        let (mut send, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        for path in ["/a", "/b"] {
            let (status, body) = h2_get(&mut send, &format!("http://example.org{path}")).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body, format!("plain example.org{path} xfcc=false"));
        }
        let (status, body) = h2_get(&mut send, "http://api.demo/m").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            !body.starts_with("plain"),
            "a meshed host went out in plain text: {body}"
        );
        // A second app connection to the same destination gets one of its
        // own, as it would have without the sidecar: its streams never
        // wait on the first's at the destination's stream limit.
        let c = redirected(&o, plain).await;
        let (mut send2, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let (status, body) = h2_get(&mut send2, "http://example.org/c").await;
        assert_eq!(
            (status, body.as_str()),
            (200, "plain example.org/c xfcc=false")
        );
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(tcp_result(&m, "passthrough"), 2.0);
        // A burst of streams opening a third app connection waits for its
        // one dial, rather than each dialling.
        let c = redirected(&o, plain).await;
        let (send3, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let burst: Vec<_> = (0..20)
            .map(|i| {
                let mut send = send3.clone();
                tokio::spawn(
                    async move { h2_get(&mut send, &format!("http://example.org/{i}")).await },
                )
            })
            .collect();
        for b in burst {
            assert_eq!(b.await.unwrap().0, 200);
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);

        // With unmeshed = "deny": 502, and the destination sees nothing.
        let (plain, conns) = plain_h2_server().await;
        let (o, _m) = outbound(&format!("unmeshed = \"deny\"\n{rule}"));
        let c = redirected(&o, plain).await;
        let (mut send, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let (status, body) = h2_get(&mut send, "http://example.org/").await;
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("is outside the mesh"), "{body}");
        assert!(body.contains("unmeshed = \"deny\""), "{body}");
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 0);

        // A destination that does not speak HTTP/2: 502 saying so.
        let (plain, _seen) = echo_server().await;
        let (o, _m) = outbound(&rule);
        let c = redirected(&o, plain).await;
        let (mut send, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let (status, body) = h2_get(&mut send, "http://example.org/").await;
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("outside the mesh"), "{body}");
    }

    #[tokio::test]
    async fn a_meshed_destination_never_gets_plain_text_for_an_unmatched_host_or_tcp() {
        // The cidr rule puts the destination in the mesh, but takes only
        // api.demo: another Host gets a 502 from the outbound, and opaque
        // TCP (no Host at all) is refused; the server sees nothing.
        let (plain, seen) = recording_server().await;
        let (o, m) = outbound(&format!(
            "[[outbound.upstreams]]\nhost = \"api.demo\"\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n"
        ));
        let mut c = redirected(&o, plain).await;
        c.write_all(
            b"GET / HTTP/1.1\r\nHost: typo.example\r\nAuthorization: Bearer s3cret\r\n\r\n",
        )
        .await
        .unwrap();
        let mut got = vec![0u8; 512];
        let n = tokio::time::timeout(WAIT, c.read(&mut got))
            .await
            .expect("answered")
            .unwrap();
        let got = String::from_utf8_lossy(&got[..n]).into_owned();
        assert!(got.starts_with("HTTP/1.1 502"), "{got}");
        assert!(got.contains("no upstream for host"), "{got}");
        let mut t = redirected(&o, plain).await;
        let _ = t.write_all(b"\x16\x03\x01opaque").await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, t.read_to_end(&mut rest))
            .await
            .expect("closed");
        assert!(rest.is_empty());
        assert_eq!(tcp_result(&m, "passthrough"), 0.0);
        assert_eq!(tcp_result(&m, "failed"), 1.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "plain text reached the server"
        );
    }

    /// A plain TCP server that records everything it receives and answers
    /// nothing.
    /// Waits until the recording server has seen `what` (the first request
    /// passed through).
    async fn seen_at_last(seen: &std::sync::Mutex<Vec<u8>>, what: &str) {
        let got = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        tokio::time::timeout(WAIT, async {
            while !got().contains(what) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the first request passed through");
    }

    async fn recording_server() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        (addr, seen)
    }

    /// A request head with `fields` fields (Host last, after a secret).
    fn head_with(fields: usize, host: &str) -> Vec<u8> {
        let mut s = String::from("GET / HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n");
        for i in 2..fields {
            s += &format!("X-F{i}: v\r\n");
        }
        (s + &format!("Host: {host}\r\nConnection: close\r\n\r\n")).into_bytes()
    }

    #[tokio::test]
    async fn http_whose_host_cannot_be_read_is_never_sent_in_plain_text() {
        // The rule names hosts only: a head the peek cannot read must not
        // pass through, since its Host may well be meshed.
        let (plain, seen) = recording_server().await;
        let rule = "[[outbound.upstreams]]\nhost = \"*.{ns}.svc\"\nidentity = \"spiffe://unit.keyproof.test/ns/{ns}/sa/api\"\n";
        let (o, m) = outbound(&format!(
            "header_read_timeout = \"300ms\"\nmax_header_bytes = 8192\n{rule}"
        ));
        let refused = |req: Vec<u8>| {
            let o = o.clone();
            async move {
                let mut c = redirected(&o, plain).await;
                let _ = c.write_all(&req).await;
                let mut got = Vec::new();
                let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut got))
                    .await
                    .expect("not closed");
                assert!(got.is_empty());
            }
        };
        // More fields than the HTTP/1 server takes.
        refused(head_with(130, "web.demo.svc")).await;
        // Larger than max_header_bytes.
        let mut big = head_with(4, "web.demo.svc");
        big.splice(
            16..16,
            b"X-Big: "
                .iter()
                .chain(&[b'a'; 9000])
                .chain(b"\r\n")
                .copied(),
        );
        refused(big).await;
        // Malformed.
        refused(b"GET / HTTP/1.1\r\nAuthorization: Bearer s3cret\r\nBad Field\r\n\r\n".to_vec())
            .await;
        // Too slow: the head never ends.
        refused(b"GET / HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n".to_vec()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !String::from_utf8_lossy(&seen.lock().unwrap()).contains("s3cret"),
            "a request head went out in plain text"
        );
        assert_eq!(tcp_result(&m, "passthrough"), 0.0);
        assert_eq!(tcp_result(&m, "failed"), 4.0);

        // As many fields as the HTTP/1 server takes: meshed by its Host.
        let api = workload("/ns/demo/sa/api");
        let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Connect]).await;
        let mut c = redirected(&o, mesh).await;
        let got = exchange(&mut c, &head_with(120, "web.demo.svc")).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }

    #[tokio::test]
    async fn an_unreadable_head_goes_to_a_host_less_rule() {
        let api = workload("/ns/demo/sa/api");
        let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Connect]).await;
        let (o, m) = outbound(&format!(
            "[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n"
        ));
        let mut c = redirected(&o, mesh).await;
        let got = exchange(&mut c, &head_with(130, "web.demo.svc")).await;
        let text = String::from_utf8_lossy(&got);
        // The outbound's own HTTP/1 server refuses the head.
        assert!(text.starts_with("HTTP/1.1 4"), "{text}");
        assert_eq!(tcp_result(&m, "passthrough"), 0.0);
    }

    #[tokio::test]
    async fn a_slow_first_head_gets_one_header_read_timeout_in_all() {
        // Detection, the peek for its Host and the HTTP/1 server each wait
        // for the same head: together no longer than the timeout, which
        // runs from the accept (each on its own made it up to three).
        let api = workload("/ns/demo/sa/api");
        let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Connect]).await;
        let (o, _m) = outbound(&format!(
            "header_read_timeout = \"2s\"\n[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n"
        ));
        let start = std::time::Instant::now();
        let mut c = redirected(&o, mesh).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: web.demo.svc\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, c.read_to_end(&mut got))
            .await
            .expect("an answer in time")
            .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        let took = start.elapsed();
        // Twice the timeout (and more) before; the margin is for a loaded
        // machine.
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_millis(3500),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn an_idle_passthrough_is_closed_and_its_bytes_counted() {
        let (plain, _conns) = echo_server().await;
        let (o, m) = outbound(&format!(
            "idle_timeout = \"100ms\"\ntcp_idle_timeout = \"500ms\"\n[[outbound.upstreams]]\ncidr = \"10.0.0.0/8\"\nidentity = \"{API}\"\n"
        ));
        let mut c = redirected(&o, plain).await;
        c.write_all(b"\x16\x03\x01hi").await.unwrap();
        let mut echo = [0u8; 5];
        c.read_exact(&mut echo).await.unwrap();
        // Quiet for longer than the HTTP idle_timeout: still open.
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.write_all(b"\x16\x03\x01hi").await.unwrap();
        c.read_exact(&mut echo).await.unwrap();
        // Silent from here, both ways: closed after the TCP idle timeout.
        let start = std::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
            .await
            .expect("an idle passthrough stays open")
            .unwrap();
        assert!(rest.is_empty());
        assert!(start.elapsed() >= Duration::from_millis(450));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let bytes = |way: &str| {
            metric(
                &m,
                &format!("keyproof_tcp_bytes_total{{direction=\"outbound\",way=\"{way}\"}}"),
            )
        };
        assert_eq!(
            (bytes("client_to_server"), bytes("server_to_client")),
            (10.0, 10.0)
        );
    }

    #[tokio::test]
    async fn tunnels_beyond_the_peers_stream_limit_go_on_another_connection() {
        let api = workload("/ns/demo/sa/api");
        let (mesh, mut accepted) = mesh_server(&api, &[b"h2"], vec![Serve::ConnectMax(4)]).await;
        let (o, m) = outbound(&format!(
            "opaque_ports = [{}]\n[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n",
            mesh.port()
        ));
        // Long-lived tunnels, all open at once: more than one connection
        // takes.
        let mut open = Vec::new();
        for i in 0..7u8 {
            let mut c = redirected(&o, mesh).await;
            c.write_all(&[i]).await.unwrap();
            let mut b = [0u8; 1];
            tokio::time::timeout(WAIT, c.read_exact(&mut b))
                .await
                .expect("a tunnel beyond the stream limit never opened")
                .unwrap();
            assert_eq!(b, [i]);
            open.push(c);
        }
        assert_eq!(tcp_result(&m, "ok"), 7.0);
        let mut conns = Vec::new();
        while let Ok(a) = accepted.try_recv() {
            conns.push(a);
        }
        assert!(conns.len() >= 2, "{} connections", conns.len());
    }

    #[tokio::test]
    async fn a_stream_refused_or_left_out_of_a_goaway_is_retried_on_another_connection() {
        for first in [Serve::Refuse, Serve::GoAwayAbove] {
            let api = workload("/ns/demo/sa/api");
            let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![first, Serve::Connect]).await;
            let (o, m) = outbound(&format!(
                "opaque_ports = [{}]\n[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n",
                mesh.port()
            ));
            let mut c = redirected(&o, mesh).await;
            assert_eq!(exchange(&mut c, b"again").await, b"again");
            assert_eq!(tcp_result(&m, "ok"), 1.0);
        }
    }

    #[tokio::test]
    async fn a_connect_the_peer_never_answers_fails_in_time() {
        let api = workload("/ns/demo/sa/api");
        let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Silent]).await;
        let (o, m) = outbound(&format!(
            "connect_timeout = \"300ms\"\nopaque_ports = [{}]\n[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\nidentity = \"{API}\"\n",
            mesh.port()
        ));
        let mut c = redirected(&o, mesh).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut got))
            .await
            .expect("the app waits for ever");
        assert!(got.is_empty());
        assert_eq!(tcp_result(&m, "failed"), 1.0);
    }

    /// The real inbound of `api` (tunnels to `port` open to web), on
    /// loopback with the real accept loop; its address.
    async fn real_inbound(
        port: u16,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::watch::Sender<bool>,
        Metrics,
    ) {
        real_inbound_with(port, "").await
    }

    /// [`real_inbound`] with more `[inbound]` keys.
    async fn real_inbound_with(
        port: u16,
        extra: &str,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::watch::Sender<bool>,
        Metrics,
    ) {
        use crate::inbound::Inbound;
        use crate::listener::{self, Tracker};
        let cfg = config(&format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n{extra}[[inbound.tcp]]\nport = {port}\nallow = [\"spiffe://unit.keyproof.test/ns/demo/sa/web\"]\n"
        ));
        let m = Metrics::new().unwrap();
        let api = workload("/ns/demo/sa/api");
        let inbound = Inbound::new(cfg.inbound.as_ref().unwrap(), api.store(), &m).unwrap();
        let l = listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stop = rx.clone();
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
        (addr, tx, m)
    }

    /// An app server that hands its accepted connections out.
    async fn app_server() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    fn reset_now(tcp: TcpStream) {
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(tcp);
    }

    #[tokio::test]
    async fn an_app_reset_reaches_the_far_app_as_a_reset_through_the_real_inbound() {
        let (apps, app_addr) = app_server().await;
        let (inbound, _stop, _im) = real_inbound(app_addr.port()).await;
        let (o, m) = outbound(&format!(
            "opaque_ports = [{}]\n[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\naddress = \"{inbound}\"\nidentity = \"{API}\"\n",
            app_addr.port()
        ));
        let mut a = redirected(&o, app_addr).await;
        a.write_all(b"COPY part").await.unwrap();
        let (mut b, _) = tokio::time::timeout(WAIT, apps.accept())
            .await
            .unwrap()
            .unwrap();
        let mut got = [0u8; 9];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"COPY part");
        assert_eq!(tcp_result(&m, "ok"), 1.0);
        // A's app dies mid-upload: B's app must not take it for the end.
        reset_now(a);
        let mut rest = Vec::new();
        let end = tokio::time::timeout(WAIT, b.read_to_end(&mut rest))
            .await
            .expect("B's app never saw the end");
        let e = end.expect_err("B's app saw a clean end of an upload A's app abandoned");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }

    #[tokio::test]
    async fn the_peers_tunnel_limit_is_counted_limited_not_denied() {
        let (apps, app_addr) = app_server().await;
        let (inbound, _stop, im) = real_inbound_with(app_addr.port(), "max_tunnels = 1\n").await;
        let (o, m) = outbound(&format!(
            "opaque_ports = [{}]\n[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\naddress = \"{inbound}\"\nidentity = \"{API}\"\n",
            app_addr.port()
        ));
        let mut first = redirected(&o, app_addr).await;
        first.write_all(b"x").await.unwrap();
        let _held = tokio::time::timeout(WAIT, apps.accept())
            .await
            .unwrap()
            .unwrap();
        // Counted once the peer's 200 is back, just after its app accepted.
        for _ in 0..250 {
            if tcp_result(&m, "ok") == 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tcp_result(&m, "ok"), 1.0);
        let mut second = redirected(&o, app_addr).await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, second.read_to_end(&mut rest))
            .await
            .expect("the refused tunnel's app connection never ended");
        assert_eq!(tcp_result(&m, "limited"), 1.0);
        assert_eq!(tcp_result(&m, "denied"), 0.0);
        assert_eq!(
            metric(
                &im,
                "keyproof_tcp_connections_total{direction=\"inbound\",result=\"limited\"}"
            ),
            1.0
        );
    }

    #[tokio::test]
    async fn a_far_app_reset_closes_the_app_here_through_the_real_inbound() {
        let (apps, app_addr) = app_server().await;
        let (inbound, _stop, _im) = real_inbound(app_addr.port()).await;
        let (o, _m) = outbound(&format!(
            "opaque_ports = [{}]\n[[outbound.upstreams]]\ncidr = \"127.0.0.0/8\"\naddress = \"{inbound}\"\nidentity = \"{API}\"\n",
            app_addr.port()
        ));
        let mut a = redirected(&o, app_addr).await;
        a.write_all(b"hello").await.unwrap();
        let (mut b, _) = tokio::time::timeout(WAIT, apps.accept())
            .await
            .unwrap()
            .unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        b.write_all(b"rows").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        reset_now(b);
        // The app here keeps its side open and says nothing; the far app's
        // reset must reach it as a reset, never as a clean end of data
        // (the inbound sends END_STREAM just before its RST_STREAM: the
        // FIN waits for it, see `both_ways` in mesh_client.rs).
        let mut rows = Vec::new();
        let read = tokio::time::timeout(WAIT, a.read_to_end(&mut rows))
            .await
            .expect("the app here never saw the end");
        let e = read.expect_err("the app here read a clean end of a stream the far app reset");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }

    /// Runs `cmd` (a program and its arguments); its failure message.
    fn run(cmd: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .map_err(|e| format!("{}: {e}", cmd.join(" ")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}: {}",
                cmd.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A network namespace, deleted when dropped (a failed test too).
    struct Netns(String);

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = run(&["ip", "netns", "del", &self.0]);
        }
    }

    const NETNS_PORT: &str = "KEYPROOF_TEST_OUTBOUND_PORT";

    /// Real `iptables` redirection: in a namespace of its own (root only;
    /// skipped elsewhere unless `CI` is set), connections to
    /// 10.250.0.2:8080 and 10.250.0.3:8080 are redirected to an outbound
    /// listener, which must read their original destinations. The checks
    /// run in [`in_netns`], this test binary re-run inside the namespace.
    #[test]
    fn redirected_connections_are_routed_by_their_original_destination() {
        let ci = std::env::var_os("CI").is_some();
        let root = std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        if !root || run(&["ip", "netns", "list"]).is_err() {
            assert!(!ci, "CI: this test needs root and iproute2");
            eprintln!("skipped: needs root, iproute2 and iptables");
            return;
        }
        let name = format!("kp-ob-{}", std::process::id());
        run(&["ip", "netns", "add", &name]).expect("netns");
        let ns = Netns(name);
        let port = (20000 + std::process::id() % 20000).to_string();
        let exec = |cmd: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &ns.0];
            all.extend_from_slice(cmd);
            run(&all)
        };
        exec(&["ip", "link", "set", "lo", "up"]).unwrap();
        // A route for the destinations; the rule redirects them anyway.
        exec(&["ip", "addr", "add", "10.250.0.1/24", "dev", "lo"]).unwrap();
        exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.250.0.2,10.250.0.3",
            "--dport",
            "8080",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ])
        .unwrap();
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(exe)
            .args([
                "--exact",
                "outbound::transparent::tests::in_netns",
                "--ignored",
                "--nocapture",
            ])
            .env(NETNS_PORT, &port)
            .output()
            .expect("run in the namespace");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "in the namespace:\n{text}");
        assert!(
            text.contains("1 passed"),
            "the inner test did not run:\n{text}"
        );
    }

    /// The inside of the test above (ignored when run on its own).
    #[tokio::test]
    #[ignore = "run inside a network namespace by redirected_connections_are_routed_by_their_original_destination"]
    async fn in_netns() {
        let port: u16 = std::env::var(NETNS_PORT).expect("port").parse().unwrap();
        let api = workload("/ns/demo/sa/api");
        let (mesh, _accepted) = mesh_server(&api, &[b"h2"], vec![Serve::Connect]).await;
        let (o, m) = outbound(&format!(
            "unmeshed = \"deny\"\n[[outbound.upstreams]]\ncidr = \"10.250.0.2/32\"\nport = 8080\naddress = \"{mesh}\"\nidentity = \"{API}\"\n"
        ));
        let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let ob = o.clone();
        tokio::spawn(async move {
            while let Ok((tcp, remote)) = l.accept().await {
                let dst = crate::original_dst::redirected(&tcp);
                record.lock().unwrap().push(dst);
                match dst {
                    Some(dst) => {
                        tokio::spawn(ob.clone().transparent(tcp, remote, dst, rx.clone()));
                    }
                    None => drop(tcp),
                }
            }
        });
        // Opaque TCP through the CONNECT tunnel.
        let mut c = TcpStream::connect("10.250.0.2:8080").await.unwrap();
        assert_eq!(exchange(&mut c, b"\x00\x01tcp").await, b"\x00\x01tcp");
        // HTTP to the same destination, on the same mesh connection.
        let mut c = TcpStream::connect("10.250.0.2:8080").await.unwrap();
        let got = exchange(
            &mut c,
            b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        // No rule for 10.250.0.3: refused.
        let mut c = TcpStream::connect("10.250.0.3:8080").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
            .await
            .expect("not closed");
        assert!(rest.is_empty());
        // Made to the listener itself: not redirected.
        drop(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = seen.lock().unwrap().clone();
        let d = |s: &str| Some(s.parse().unwrap());
        assert_eq!(
            seen,
            [
                d("10.250.0.2:8080"),
                d("10.250.0.2:8080"),
                d("10.250.0.3:8080"),
                None
            ]
        );
        assert_eq!(tcp_result(&m, "ok"), 1.0);
        assert_eq!(tcp_result(&m, "unmeshed_denied"), 1.0);
        assert_eq!(tcp_result(&m, "passthrough"), 0.0);
    }
}
