//! A protocol switch (WebSocket) over the mesh, outbound end.
//!
//! An app's HTTP/1.1 request to switch protocols (`GET`, `Connection:
//! upgrade`, `Upgrade: websocket`) goes to the peer as an extended
//! `CONNECT` (RFC 8441) on the mesh connection: `:protocol` names the
//! protocol, the path and the end-to-end fields (`sec-websocket-key`,
//! `sec-websocket-version`...) are the request's own, so the peer's
//! inbound decides on it as on the `GET` it stands for and hands its app
//! the same `Upgrade` request (`inbound/upgrade.rs`). The peer's 2xx
//! becomes the app's `101` with the far app's fields, and the connection is
//! then a tunnel, pumped as an opaque TCP tunnel is (half-close, resets,
//! idle timeout, backpressure). Any other answer is passed on as it is.
//!
//! What is carried: WebSocket, offered alone, on a `GET` without a body, to
//! a peer that speaks HTTP/2 and takes extended `CONNECT` (keyproof's
//! inbound does). Anything else gets 501 and what to do instead, before
//! anything is sent.
//!
//! On a peer's step-up route the switch is challenged like a request: the
//! extended `CONNECT` is signed as it travels (`CONNECT`, its `:authority`
//! and `:path`, an empty body) for the challenge's nonce and the connection
//! it goes on, and sent again, once (`signer.rs`, `sign_switch`).

use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use keyproof_stepup::{is_stepup_challenge, Challenge};

use crate::http::body::{text, ProxyBody};
use crate::http::h1_server::{MaySwitch, SwitchTo};
use crate::http::mesh_client::{Switched, TunnelError};
use crate::http::owned;
use crate::metrics::Direction;
use crate::outbound::signer;
use crate::outbound::upstream::{ForwardError, Upstream};
use crate::outbound::Outbound;

/// Whether `req` is a switch the mesh can carry to `protocol`, or why not.
pub fn carried<B>(req: &Request<B>, protocol: &str) -> Result<(), &'static str> {
    if protocol.contains(',') {
        return Err("more than one protocol is offered, and the mesh carries one");
    }
    if !protocol.eq_ignore_ascii_case("websocket") {
        // The peer's inbound carries WebSocket only (`inbound/upgrade.rs`
        // says why).
        return Err("only websocket is carried");
    }
    // Only the HTTP/1.1 server's requests that may switch say so: a GET
    // without a body.
    match req.extensions().get::<MaySwitch>() {
        Some(MaySwitch) => Ok(()),
        None => Err("only a GET without a body can switch protocols"),
    }
}

impl Outbound {
    /// Sends the switch to `up` and answers the app: `101` and the tunnel,
    /// pumped by the app connection's task once the head is written, or
    /// the peer's answer, or a 502/504 saying why there is none.
    pub(super) async fn switch(
        &self,
        up: Arc<Upstream>,
        parts: http::request::Parts,
        protocol: String,
    ) -> Response<ProxyBody> {
        let tcp = &self.all_metrics.tcp;
        let not_carried = |why: &str| {
            tracing::info!(upstream = %up.cfg.address, %protocol, "protocol switch not carried: {why}");
            text(
                StatusCode::NOT_IMPLEMENTED,
                format!(
                    "HTTP/1.1 Upgrade to {protocol} is not carried: upstream {} {why}\n",
                    up.cfg.address
                ),
            )
        };
        if up.h1_only.load(std::sync::atomic::Ordering::Relaxed) {
            return not_carried("does not offer HTTP/2");
        }
        let mut parts = parts;
        // A body-less GET may still say `content-length: 0`: on the CONNECT
        // it would hold the stream to no data at all.
        parts.headers.remove(header::CONTENT_LENGTH);
        // The peer answers once its app has (bounded at the peer); this
        // bounds a peer that never does.
        let wait = self.cfg.connect_timeout + 2 * self.cfg.limits.header_read_timeout;
        // A switch that found no answer: counted, logged and said.
        let failed = |status: StatusCode, why: String| {
            tcp.connection(Direction::Outbound, "failed");
            tracing::warn!(upstream = %up.cfg.address, "protocol switch failed: {why}");
            text(status, format!("upstream {}: {why}\n", up.cfg.address))
        };
        // A step-up route's challenge, once answered: what to sign for, and
        // the challenge itself, passed on should signing fail.
        let mut challenge: Option<(Challenge, Response<ProxyBody>)> = None;
        let (head, tunnel) = loop {
            let mut refused_by = None;
            let mut answer = None;
            // Once more on another connection if the one in hand was
            // closing or refused the stream, as for a TCP tunnel.
            for _ in 0..2 {
                let (sender, info) = match up.h2.tunnel_sender(refused_by.as_ref()).await {
                    Ok(conn) => conn,
                    Err(ForwardError::NotH2) => {
                        // As a request would: the upstream gets its HTTP/1.1
                        // pool, and no more dials for h2.
                        up.h1_only.store(true, std::sync::atomic::Ordering::Relaxed);
                        return not_carried("does not offer HTTP/2");
                    }
                    Err(e) => {
                        tcp.connection(Direction::Outbound, "failed");
                        return self.respond(&up, Err(e));
                    }
                };
                let mut parts = parts.clone();
                // Signed for the connection it goes on (the binding).
                let signed = match &challenge {
                    Some((ch, _)) => self.stepup.sign_switch(ch, &mut parts, &info),
                    None => Ok(()),
                };
                if let Err(why) = signed {
                    if let Some((_, unanswered)) = challenge.take() {
                        return signer::pass(unanswered, why);
                    }
                }
                let this = sender.clone();
                let req = Request::from_parts(parts, ());
                match tokio::time::timeout(wait, sender.switch_protocol(req, &protocol)).await {
                    Ok(Err(e)) if e.is_unprocessed() => refused_by = Some(this),
                    Ok(Err(TunnelError::H2(_))) if this.is_closed() => {}
                    a => {
                        answer = Some(a);
                        break;
                    }
                }
            }
            match answer {
                Some(Ok(Ok(Switched::Open(head, tunnel)))) => break (head, tunnel),
                Some(Ok(Ok(Switched::Answered(resp))))
                    if is_stepup_challenge(resp.status(), resp.headers()) =>
                {
                    // A step-up route: signed and sent again, once.
                    if challenge.is_some() {
                        return self.stepup.switch_rejected(resp.map(ProxyBody::Mesh));
                    }
                    let resp = resp.map(ProxyBody::Mesh);
                    match self.stepup.switch_challenge(&resp) {
                        Ok(c) => challenge = Some((c, resp)),
                        Err(why) => return signer::pass(resp, why),
                    }
                }
                Some(Ok(Ok(Switched::Answered(mut resp)))) => {
                    // As the 101's: no sidecar-owned field passes.
                    let _ = owned::strip_response(resp.headers_mut());
                    return resp.map(ProxyBody::Mesh);
                }
                Some(Ok(Err(TunnelError::NoExtendedConnect))) => {
                    return not_carried("does not take extended CONNECT (RFC 8441)");
                }
                Some(Ok(Err(e))) => {
                    return failed(
                        StatusCode::BAD_GATEWAY,
                        format!("{protocol} switch failed: {e}"),
                    );
                }
                Some(Err(_)) => {
                    return failed(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("no answer to the {protocol} switch within {wait:?}"),
                    );
                }
                None => {
                    return failed(
                        StatusCode::BAD_GATEWAY,
                        format!("no connection would take the {protocol} switch"),
                    );
                }
            }
        };
        let Ok(upgrade) = HeaderValue::from_str(&protocol) else {
            return text(StatusCode::BAD_REQUEST, "bad Upgrade field\n");
        };
        tcp.connection(Direction::Outbound, "ok");
        let idle = self.cfg.limits.tcp_idle_timeout;
        let tcp = tcp.clone();
        // Dropped unrun (the app's connection ended before the 101 went
        // out): the tunnel goes with it, which resets the stream.
        let to = SwitchTo::new(move |mut io| async move {
            let end = tunnel.pump(&mut io.read, &mut io.write, idle).await;
            tcp.bytes(Direction::Outbound, end.sent, end.received);
            if let Some(why) = end.error {
                // A reset on the mesh side reaches the app as a reset, not
                // as a clean end it could take for complete data: the
                // halves go back together first, since dropping a write
                // half alone sends a FIN.
                tracing::debug!(error = %why, "switched connection reset");
                let (read, _) = io.read.into_inner();
                if let Ok(tcp) = read.reunite(io.write) {
                    let _ =
                        socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
                }
            }
        });
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *resp.headers_mut() = head.headers;
        // As the peer's inbound left them: no sidecar-owned field passes.
        let _ = owned::strip_response(resp.headers_mut());
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        resp.headers_mut().insert(header::UPGRADE, upgrade);
        resp.extensions_mut().insert(to);
        resp
    }
}
