//! Where the `stepup-v1` proof (issue 4) plugs in: exactly one hook per
//! direction.
//!
//! * Inbound: [`InboundStepUp::verify`] is called for every request whose
//!   matched route has `step_up = true`, after the route's `allow` list has
//!   admitted the caller (a caller that is not allowed gets 403, never a
//!   challenge) and after caller-sent identity headers were removed. It
//!   receives the request and the connection's [`InboundConn`] (verified peer
//!   id, leaf and SPKI SHA-256, TLS exporter) and returns either the request
//!   to forward or the response to send instead (a challenge, 401, 413...).
//!   [`InboundStepUp::on_response`] then sees the app's response, to attach
//!   the next `Accept-Signature`.
//! * Outbound: [`OutboundStepUp::send`] wraps the sending of every request
//!   to an upstream. The response's extensions carry the mesh connection's
//!   [`MeshConnInfo`] (exporter, server id) so a challenge can be answered.
//!
//! Until the verifier lands, a step-up route fails closed: 503 with the
//! reason, never forwarded.

use std::future::Future;
use std::net::SocketAddr;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use keyproof_ca::SpiffeId;

use crate::body::{text, ProxyBody};
use crate::config::InboundStepUpConfig;
use crate::identity::PeerIdentity;
use crate::policy::Route;

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

/// The inbound step-up verifier hook.
#[derive(Debug)]
pub struct InboundStepUp {
    /// Settings from `[inbound.stepup]`.
    pub config: InboundStepUpConfig,
}

impl InboundStepUp {
    /// The verifier for `[inbound.stepup]`.
    pub fn new(config: InboundStepUpConfig) -> InboundStepUp {
        InboundStepUp { config }
    }

    /// Checks one request on a step-up route. `Ok` forwards the (possibly
    /// rewritten) request; `Err` answers with the given response instead.
    pub async fn verify(
        &self,
        req: Request<ProxyBody>,
        conn: &InboundConn,
        route: &Route,
    ) -> Result<Request<ProxyBody>, Response<ProxyBody>> {
        crate::body::discard(req.into_body()).await;
        tracing::warn!(
            peer = %conn.remote,
            peer_id = %conn.peer.id,
            route = %route.path_prefix,
            result = "unavailable",
            "step-up required but no verifier is built in; refusing"
        );
        let mut resp = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "step-up required by route {} but this proxy has no step-up verifier; refusing (fail closed)\n",
                route.path_prefix
            ),
        );
        resp.headers_mut().insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        Err(resp)
    }

    /// Sees the app's response to a request that passed [`Self::verify`].
    pub fn on_response(
        &self,
        _resp: &mut Response<ProxyBody>,
        _conn: &InboundConn,
        _route: &Route,
    ) {
    }
}

/// The outbound step-up signer hook.
#[derive(Debug)]
pub struct OutboundStepUp {
    /// `[outbound.stepup] max_body`: largest body buffered for a replay.
    pub max_body: u64,
}

impl OutboundStepUp {
    /// Sends `req` with `send`; the place where a challenge is answered by
    /// signing and resending. For now a `StepUp` challenge is passed to the
    /// app with a header saying why it was not answered.
    pub async fn send<F, Fut, E>(
        &self,
        req: Request<ProxyBody>,
        send: F,
    ) -> Result<Response<Incoming>, E>
    where
        F: FnOnce(Request<ProxyBody>) -> Fut,
        Fut: Future<Output = Result<Response<Incoming>, E>>,
    {
        let mut resp = send(req).await?;
        if resp.status() == StatusCode::UNAUTHORIZED
            && resp
                .headers()
                .get(http::header::WWW_AUTHENTICATE)
                .is_some_and(|v| v.as_bytes().starts_with(b"StepUp"))
        {
            resp.headers_mut().insert(
                "x-keyproof-step-up-error",
                HeaderValue::from_static("outbound step-up signer not available in this build"),
            );
        }
        Ok(resp)
    }
}
