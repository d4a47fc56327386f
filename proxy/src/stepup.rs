//! Where the `stepup-v1` proof (issue 4) plugs into the proxy: exactly one
//! hook per direction, built on the `keyproof-stepup` library.
//!
//! * Inbound ([`InboundStepUp`], `verifier.rs`): for every request whose
//!   matched route has `step_up = true`, after the route's `allow` list has
//!   admitted the caller (a caller that is not allowed gets 403, never a
//!   challenge), verify the signature or answer with a challenge; on success
//!   attach the next nonce to the app's response.
//! * Outbound ([`OutboundStepUp`], `signer.rs`): answer a `StepUp` challenge
//!   with the workload key on the upstream's h2 connection, and sign later
//!   requests to the same path up front with the nonce kept from the last
//!   response, so steady state is one round trip.
//!
//! Both directions' metrics live in `metrics.rs`; the bounded body copy that
//! lets the first request to a step-up path be replayed in `replay.rs`; the
//! outbound's kept nonces in `kept.rs`.

mod kept;
mod limited;
mod metrics;
mod replay;
mod signer;
mod verifier;

use std::net::SocketAddr;

use http::HeaderValue;
use keyproof_identity::SpiffeId;

use crate::identity::PeerIdentity;

pub use metrics::{SignResult, SignerMetrics, VerifierMetrics};
pub use replay::{tee, Replay, TeeBody, TeeHandle};
pub use signer::{signer_for, MeshConn, OutboundStepUp, StepUpPaths, Template};
pub use verifier::{InboundStepUp, Verified, VerifierStartError};

/// Per-connection facts on the inbound, computed once after the handshake.
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

/// Facts about one outbound mesh connection, attached to every response
/// received on it (`response.extensions().get::<Arc<MeshConnInfo>>()`;
/// behind an `Arc` so that tagging every response costs a reference count,
/// not a copy of the peer id).
#[derive(Debug)]
pub struct MeshConnInfo {
    /// The verified server's SPIFFE ID.
    pub peer_id: SpiffeId,
    /// The 32-byte TLS exporter of the connection.
    pub exporter: [u8; 32],
    /// A process-unique connection number (for per-connection nonce reuse).
    pub conn_id: u64,
}
