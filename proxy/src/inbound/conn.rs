//! What the inbound knows about one caller's connection, computed once after
//! the handshake and shared by every request on it.

use std::net::SocketAddr;

use http::HeaderValue;

use keyproof_identity::SpiffeId;

use crate::identity::store::PeerIdentity;

/// Per-connection facts on the inbound.
#[derive(Debug)]
pub struct InboundConn {
    /// The verified caller.
    pub peer: PeerIdentity,
    /// The caller's socket address.
    pub remote: SocketAddr,
    /// The 32-byte TLS exporter (`EXPORTER-Channel-Binding`, empty context);
    /// derived only when some route demands step-up.
    pub exporter: Option<[u8; 32]>,
    /// The step-up verifier's view of the caller (key from the verified leaf,
    /// this connection's exporter); `None` when no route demands step-up or
    /// the caller's key type cannot sign stepup-v1.
    pub stepup: Option<keyproof_stepup::Peer>,
    /// The `x-forwarded-client-cert` value for this caller.
    pub xfcc: HeaderValue,
}

impl InboundConn {
    /// The facts of a connection whose handshake verified `peer`. The
    /// channel binding and the step-up view are derived only when some
    /// route demands step-up (`stepup`). `None` when the XFCC value cannot
    /// be a header value, which valid SPIFFE IDs never cause.
    pub fn new(
        session: &rustls::ServerConnection,
        peer: PeerIdentity,
        remote: SocketAddr,
        own: &SpiffeId,
        stepup: bool,
    ) -> Option<InboundConn> {
        let exporter = if stepup {
            let mut out = [0u8; 32];
            let ok = session
                .export_keying_material(&mut out, keyproof_stepup::EXPORTER_LABEL, Some(b""))
                .is_ok();
            ok.then_some(out)
        } else {
            None
        };
        let xfcc = xfcc(own, &peer)?;
        tracing::debug!(peer = %remote, peer_id = %peer.id, "inbound connection");
        // The verifier's view of the caller, once per connection: the key
        // from the verified leaf and this connection's channel binding.
        let view = if stepup {
            match keyproof_stepup::Peer::from_cert_der(&peer.leaf, exporter) {
                Ok(p) => Some(p),
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
        })
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
