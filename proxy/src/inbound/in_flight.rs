//! Requests in flight when the policy changes.
//!
//! A request is decided on once, when it arrives. Most are answered long
//! before any change, but a gRPC stream, a long upload or download lives
//! on, and each message it carries is new work for the app. So a request
//! admitted without a step-up proof passes its frames, both ways, through
//! a [`RouteGate`]: while the policy is the one that admitted it, a frame
//! costs one comparison; after a change the request is decided on again,
//! as tunnels and switched connections are (`Policy::still_admits`), and
//! one the new policy refuses (its caller dropped from the route's
//! `allow`, the route now demanding step-up) ends at its next frame.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use http::{Method, Uri};

use crate::error::BoxError;
use crate::http::body::{FrameGate, ProxyBody};
use crate::http::path;
use crate::inbound::conn::InboundConn;
use crate::inbound::Inbound;

/// What a request was admitted as, and by which policy.
pub struct RouteGate {
    inbound: Arc<Inbound>,
    conn: Arc<InboundConn>,
    method: Method,
    uri: Uri,
    risk: Option<u64>,
    /// The generation last found to admit the request.
    admitted: AtomicU64,
    refused: AtomicBool,
}

impl RouteGate {
    /// A gate for a request admitted, without a step-up proof, by the
    /// policy of `generation` (`risk`: the fingerprint of the `risk` route
    /// that decided on it).
    pub fn new(
        inbound: Arc<Inbound>,
        conn: Arc<InboundConn>,
        method: Method,
        uri: Uri,
        risk: Option<u64>,
        generation: u64,
    ) -> Arc<RouteGate> {
        Arc::new(RouteGate {
            inbound,
            conn,
            method,
            uri,
            risk,
            admitted: AtomicU64::new(generation),
            refused: AtomicBool::new(false),
        })
    }

    /// `body`, gated, unless it has ended already (nothing to stop).
    pub fn guard(self: &Arc<Self>, body: ProxyBody) -> ProxyBody {
        use http_body::Body as _;
        if body.is_end_stream() {
            return body;
        }
        body.gated(self.clone())
    }

    /// A response's `body`, gated unless it is short: a body of a known
    /// length under this is sent before any policy change can matter.
    pub fn guard_response(self: &Arc<Self>, body: ProxyBody) -> ProxyBody {
        use http_body::Body as _;
        const SHORT: u64 = 64 * 1024;
        if body.size_hint().exact().is_some_and(|n| n <= SHORT) {
            return body;
        }
        self.guard(body)
    }
}

impl FrameGate for RouteGate {
    fn admit(&self) -> Result<(), BoxError> {
        if self.refused.load(Ordering::Relaxed) {
            return Err("refused after a policy change".into());
        }
        let policy = self.inbound.policy.load();
        if policy.generation == self.admitted.load(Ordering::Relaxed) {
            return Ok(());
        }
        let matched = path::match_form(self.uri.path(), self.inbound.cfg.path_normalization);
        let peer = &self.conn.peer;
        if policy.still_admits(
            &self.method,
            &matched,
            false,
            self.risk,
            &peer.id,
            &peer.serial,
        ) {
            self.admitted.store(policy.generation, Ordering::Relaxed);
            return Ok(());
        }
        self.refused.store(true, Ordering::Relaxed);
        tracing::info!(peer = %self.conn.remote, peer_id = %peer.id, method = %self.method, path = crate::http::shown_path(self.uri.path()), "policy change: a request in flight that the new policy refuses is ended");
        Err("refused after a policy change".into())
    }
}
