//! What the inbound knows about one caller's connection, computed once after
//! the handshake and shared by every request on it.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;

use keyproof_identity::SpiffeId;

use crate::http::server::Activity;
use crate::identity::store::PeerIdentity;
use crate::inbound::app::AppClient;

/// Per-connection facts on the inbound.
#[derive(Debug)]
pub struct InboundConn {
    /// The verified caller.
    pub peer: PeerIdentity,
    /// The caller's socket address.
    pub remote: SocketAddr,
    /// The 32-byte TLS exporter (`EXPORTER-Channel-Binding`, empty context);
    /// derived only when some route may demand step-up (with a
    /// `policy_file`, any route may come to).
    pub exporter: Option<[u8; 32]>,
    /// The step-up verifier's view of the caller (key from the verified leaf,
    /// this connection's exporter); `None` when no route may demand step-up
    /// or the caller's key type cannot sign stepup-v1.
    pub stepup: Option<keyproof_stepup::Peer>,
    /// The `x-forwarded-client-cert` value for this caller.
    pub xfcc: HeaderValue,
    /// The caller's share of the app's connections, one for all its
    /// connections (`inbound.max_app_connections_per_peer`).
    pub app_share: Arc<tokio::sync::Semaphore>,
    /// The caller's address as `x-forwarded-for` adds it
    /// ([`crate::http::owned::add_forwarded_for`]).
    pub forwarded_for: HeaderValue,
    /// Where a redirected connection's requests go (`127.0.0.1:<original
    /// port>`); `None`: `[inbound] app`.
    pub app: Option<Arc<AppClient>>,
    /// A redirected connection whose original port takes no HTTP: every
    /// request on it but CONNECT is refused (403).
    pub refusal: Option<PortRefusal>,
    /// A redirected connection's original port: where it was delivered,
    /// after any Service's translation (`port` to `targetPort`), which is
    /// where its tunnels go too. `None`: a connection made to the inbound
    /// port itself.
    pub original_port: Option<u16>,
    /// The connection's activity word: a tunnel holds a stream of it for
    /// its whole life, so that the connection carrying it is not idle.
    pub activity: Activity,
    /// Cancelled to end the connection gracefully once what is in flight
    /// is answered (a caller the deny list names).
    pub drain: tokio_util::sync::CancellationToken,
}

impl InboundConn {
    /// The facts of a connection whose handshake verified `peer`. The
    /// channel binding and the step-up view are derived only when some
    /// route may demand step-up (`need_exporter`). `redirected`: for a
    /// connection iptables redirected, its original port and where that
    /// port's HTTP goes or why it goes nowhere. `None` when the XFCC value cannot
    /// be a header value, which valid SPIFFE IDs never cause.
    // Each argument is one independent fact of the accepted connection;
    // bundling them would only move the list into a struct literal.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        session: &rustls::ServerConnection,
        peer: PeerIdentity,
        remote: SocketAddr,
        own: &SpiffeId,
        need_exporter: bool,
        redirected: Option<(u16, Result<Arc<AppClient>, PortRefusal>)>,
        activity: Activity,
        app_share: Arc<tokio::sync::Semaphore>,
    ) -> Option<InboundConn> {
        let (app, refusal, original_port) = match redirected {
            None => (None, None, None),
            Some((port, Ok(app))) => (Some(app), None, Some(port)),
            Some((port, Err(why))) => (None, Some(why), Some(port)),
        };
        let exporter = if need_exporter {
            keyproof_identity::tls::channel_binding(session)
        } else {
            None
        };
        let xfcc = xfcc(own, &peer)?;
        let forwarded_for = HeaderValue::from_str(&remote.ip().to_canonical().to_string()).ok()?;
        tracing::debug!(peer = %remote, peer_id = %peer.id, "inbound connection");
        // The verifier's view of the caller, once per connection: the key
        // from the verified leaf and this connection's channel binding.
        let view = if need_exporter {
            match keyproof_stepup::Peer::from_cert_der(&peer.leaf, exporter) {
                // One share of the nonce table per caller identity, however
                // many keys (replicas, renewals) it holds.
                Ok(p) => Some(p.bounded_as(peer.id.as_str())),
                Err(e) => {
                    tracing::info!(peer = %remote, peer_id = %peer.id, error = %e, "caller's key cannot sign stepup-v1; step-up routes will refuse it");
                    None
                }
            }
        } else {
            None
        };
        Some(InboundConn {
            peer,
            remote,
            exporter,
            stepup: view,
            xfcc,
            forwarded_for,
            app_share,
            app,
            refusal,
            original_port,
            activity,
            drain: Default::default(),
        })
    }
}

/// Why a redirected connection's original port takes no HTTP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRefusal {
    /// A listen port of this proxy (inbound, outbound, admin): forwarding
    /// to it would let a caller act as this workload.
    Own(u16),
    /// Not in `[inbound] http_ports`: a loopback-only service, or a port
    /// reachable by tunnel only.
    NotHttp(u16),
}

impl PortRefusal {
    /// The original port.
    pub fn port(self) -> u16 {
        match self {
            PortRefusal::Own(p) | PortRefusal::NotHttp(p) => p,
        }
    }
}

impl std::fmt::Display for PortRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRefusal::Own(p) => write!(f, "port {p} is a port of this workload's sidecar"),
            PortRefusal::NotHttp(p) => write!(f, "port {p} is not an HTTP port of this workload"),
        }
    }
}

/// The `x-forwarded-client-cert` value Envoy's `SANITIZE_SET` mode sets: who
/// forwarded it (`By`, this workload), the caller's certificate digest
/// (`Hash`) and SPIFFE ID (`URI`).
fn xfcc(own: &SpiffeId, peer: &PeerIdentity) -> Option<HeaderValue> {
    let v = format!(
        "By={own};Hash={};URI={}",
        hex::encode(peer.cert_sha256),
        peer.id
    );
    HeaderValue::from_str(&v).ok()
}

#[cfg(test)]
impl InboundConn {
    /// What [`InboundConn::new`] derives from a handshake, given directly:
    /// the step-up view exists when an exporter is given.
    pub(crate) fn for_tests(
        peer: PeerIdentity,
        own: &SpiffeId,
        exporter: Option<[u8; 32]>,
    ) -> InboundConn {
        let stepup = exporter.and_then(|_| {
            keyproof_stepup::Peer::from_cert_der(&peer.leaf, exporter)
                .ok()
                .map(|p| p.bounded_as(peer.id.as_str()))
        });
        InboundConn {
            xfcc: xfcc(own, &peer).expect("valid SPIFFE IDs make a header value"),
            peer,
            remote: SocketAddr::from(([127, 0, 0, 1], 40000)),
            forwarded_for: HeaderValue::from_static("127.0.0.1"),
            app_share: Arc::new(tokio::sync::Semaphore::new(64)),
            exporter,
            stepup,
            app: None,
            refusal: None,
            original_port: None,
            activity: Activity::default(),
            drain: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{id, workload, TD};

    #[test]
    fn xfcc_is_by_own_id_hash_of_the_callers_leaf_and_uri() {
        let web = workload("/ns/demo/sa/web");
        let own = id("/ns/demo/sa/api");
        let v = xfcc(&own, &web.peer()).unwrap();
        // The digest is of the caller's whole leaf certificate (DER), in
        // lower-case hex, as Envoy writes it.
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, web.leaf());
        let want = format!(
            "By=spiffe://{TD}/ns/demo/sa/api;Hash={};URI=spiffe://{TD}/ns/demo/sa/web",
            hex::encode(digest.as_ref())
        );
        assert_eq!(v.to_str().unwrap(), want);
        let hash = want
            .split(';')
            .nth(1)
            .unwrap()
            .strip_prefix("Hash=")
            .unwrap();
        assert_eq!(hash.len(), 64);
        assert!(hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn xfcc_differs_per_caller_certificate_not_only_per_id() {
        // Two certificates for one ID: the Hash tells them apart.
        let a = workload("/ns/demo/sa/web");
        let b = workload("/ns/demo/sa/web");
        let own = id("/ns/demo/sa/api");
        let (va, vb) = (
            xfcc(&own, &a.peer()).unwrap(),
            xfcc(&own, &b.peer()).unwrap(),
        );
        assert_ne!(va, vb);
        let uri = |v: &HeaderValue| v.to_str().unwrap().rsplit(';').next().unwrap().to_owned();
        assert_eq!(uri(&va), uri(&vb));
    }
}
