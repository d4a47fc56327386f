//! A protocol switch (WebSocket) over the mesh, inbound end.
//!
//! A caller's sidecar carries an app's HTTP/1.1 `Upgrade` as an extended
//! `CONNECT` (RFC 8441): `:method CONNECT`, `:protocol websocket`, and the
//! request's own `:path` and fields. `Inbound::admit` reads it as the `GET`
//! it stands for, so the header rules, the canonical path, the route
//! policy, the deny list and XFCC apply as to any request. Then, here, the
//! app gets the HTTP/1.1 request it expects (`Connection: upgrade`,
//! `Upgrade: <protocol>`) on a connection of its own:
//!
//! * a `101` answer makes the stream a tunnel (200 and the app's fields,
//!   `sec-websocket-accept` among them), pumped as a `CONNECT` tunnel is
//!   (`tunnel.rs`: half-close, resets, idle timeout, backpressure), and
//!   held against `max_tunnels` and `max_tunnels_per_peer`;
//! * a 2xx is no switch (an app that ignored `Upgrade`): 502;
//! * any other answer is passed on as an HTTP response (its body bounded
//!   by [`MAX_REFUSAL_BODY`]), and the app connection is closed.
//!
//! `answer_timeout` bounds the app's whole answer. Switched connections are
//! counted with the tunnels (`keyproof_tcp_connections_total`: `ok`, or
//! `failed` when the app could not be reached or did not switch; their
//! bytes in `keyproof_tcp_bytes_total`).
//!
//! Only WebSocket is carried ([`CARRIED`]; another `:protocol` gets 501).
//! On a step-up route the switch is proven before the app is asked
//! (`Inbound::prove_switch`): the caller's sidecar signs the extended
//! `CONNECT` as it travels, with an empty body. An app that asks for a
//! proof of a switch (`x-keyproof-step-up: required` on its answer) gets
//! one, as for a request, where none came yet.

use std::future::poll_fn;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::body::{text, ProxyBody};
use crate::http::h1::{self, BodyReader, Framing};
use crate::http::h2_stream::MeshBody;
use crate::http::owned;
use crate::inbound::app::AppAsked;
use crate::inbound::tunnel::{self, Caller, Held, Tunnels};
use crate::metrics::Direction;

/// The largest body of an app's answer other than `101` that is passed on;
/// a larger one becomes a 502 (such answers are short refusals).
pub const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// The one protocol a switch carries. The switched connection's bytes
/// reach the app unread: a protocol the app speaks HTTP in (`h2c`) or
/// wraps other traffic in (`TLS/1.2`) would carry requests that no route,
/// deny list or XFCC of this sidecar ever decided on. WebSocket hands them
/// to the app's handler for the path the policy allowed.
pub const CARRIED: &str = "websocket";

/// The app asked for a step-up proof of the switch (`x-keyproof-step-up`
/// on its answer, which is never passed on): a 502 marked [`AppAsked`],
/// which the inbound turns into a challenge where a proof can follow.
fn app_asked() -> Response<ProxyBody> {
    let mut resp = text(
        StatusCode::BAD_GATEWAY,
        "the app asked for a step-up proof of a protocol switch\n",
    );
    resp.extensions_mut().insert(AppAsked);
    resp
}

/// Whether an extended `CONNECT` asks to switch (`:protocol`), and then
/// to [`CARRIED`] (`Ok`) or to what this sidecar refuses (`Err`: the
/// status and why).
pub fn protocol_of<B>(
    req: &http::Request<B>,
) -> Option<Result<&'static str, (StatusCode, String)>> {
    let p = req.extensions().get::<h2::ext::Protocol>()?;
    let s = p.as_str();
    if s.eq_ignore_ascii_case(CARRIED) {
        return Some(Ok(CARRIED));
    }
    let token = !s.is_empty()
        && s.bytes()
            .all(|b| crate::http::owned::is_tchar(b) || b == b'/');
    Some(Err(if token {
        (
            StatusCode::NOT_IMPLEMENTED,
            format!("a switch to {s} is not carried: only {CARRIED} is\n"),
        )
    } else {
        (
            StatusCode::BAD_REQUEST,
            "bad request: :protocol is not a token\n".to_owned(),
        )
    }))
}

/// What a switch needs besides the request.
pub struct Switch {
    /// The app's address (`127.0.0.1:<port>` or `[inbound] app`).
    pub app: String,
    /// The protocol asked for.
    pub protocol: &'static str,
    /// Who asked.
    pub caller: Caller,
    /// How long the app may take to answer the request.
    pub answer_timeout: Duration,
    /// The largest answer head taken from the app.
    pub max_header_bytes: usize,
}

/// Sends the request (origin-form, the caller's `:authority` as `Host`)
/// to the app with `Upgrade`, and answers the stream: 200 and the tunnel
/// on the app's `101`, its HTTP answer otherwise, 502/504 when it has
/// none.
pub async fn switch(
    tunnels: &Tunnels,
    parts: http::request::Parts,
    body: MeshBody,
    sw: Switch,
    held: Held,
) -> Response<ProxyBody> {
    // One budget for the app's whole answer, head and (declined) body.
    let deadline = tokio::time::Instant::now() + sw.answer_timeout;
    let mut app = match tunnels.connect_app(sw.app.as_str(), &sw.caller).await {
        Ok(tcp) => tcp,
        Err(resp) => {
            tunnels.metrics.connection(Direction::Inbound, "failed");
            return *resp;
        }
    };
    let mut headers = parts.headers;
    if !headers.contains_key(header::HOST) {
        if let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, v);
        }
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(sw.protocol));
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = BytesMut::new();
    h1::write_request_head(&Method::GET, path, &headers, Framing::Empty, &mut out);
    let answer = tokio::time::timeout_at(deadline, async {
        app.write_all(&out).await?;
        read_answer(&mut app, sw.max_header_bytes).await
    })
    .await;
    let (head, buf) = match answer {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            tunnels.metrics.connection(Direction::Inbound, "failed");
            tracing::warn!(peer = %sw.caller.remote, peer_id = %sw.caller.id, app = %sw.app, protocol = %sw.protocol, error = %e, "protocol switch failed: no answer from the app");
            return text(
                StatusCode::BAD_GATEWAY,
                format!("{} switch: the app at {}: {e}\n", sw.protocol, sw.app),
            );
        }
        Err(_) => {
            tunnels.metrics.connection(Direction::Inbound, "failed");
            tracing::warn!(peer = %sw.caller.remote, peer_id = %sw.caller.id, app = %sw.app, protocol = %sw.protocol, "protocol switch failed: the app did not answer within {:?}", sw.answer_timeout);
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "{} switch: the app at {} did not answer within {:?}\n",
                    sw.protocol, sw.app, sw.answer_timeout
                ),
            );
        }
    };
    let status = head.parts.status;
    if status.is_success() {
        // RFC 9110 section 7.8 lets a server ignore `Upgrade`; a 2xx to
        // the CONNECT would then say the tunnel is open when it is not.
        tunnels.metrics.connection(Direction::Inbound, "failed");
        tracing::info!(peer = %sw.caller.remote, peer_id = %sw.caller.id, app = %sw.app, protocol = %sw.protocol, %status, "protocol switch failed: the app answered without switching");
        return text(
            StatusCode::BAD_GATEWAY,
            format!(
                "{} switch: the app at {} answered {status} without switching protocols\n",
                sw.protocol, sw.app
            ),
        );
    }
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // The app declined (a 400, 403, 426...): its answer, as it gave it.
        return declined(app, head, buf, &sw, deadline).await;
    }
    let mut headers = head.parts.headers;
    if owned::strip_response(&mut headers) {
        return app_asked();
    }
    if held.permit.is_revoked() {
        // The policy changed while the app answered: nothing crosses.
        tunnel::reset(&app);
        return tunnels.revoked_before_open(&sw.caller);
    }
    tunnels.metrics.connection(Direction::Inbound, "ok");
    tracing::debug!(peer = %sw.caller.remote, peer_id = %sw.caller.id, app = %sw.app, protocol = %sw.protocol, "protocol switched");
    let mut resp = Response::new(ProxyBody::empty());
    *resp.headers_mut() = headers;
    let port = sw
        .app
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0);
    resp.extensions_mut().insert(tunnels.handoff(
        body.into_recv(),
        app,
        buf.to_vec(),
        sw.caller,
        port,
        held,
    ));
    resp
}

/// Why the app's answer could not be read.
#[derive(Debug, thiserror::Error)]
enum AnswerError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad answer: {0}")]
    Bad(#[from] h1::H1Error),
    #[error("closed before answering")]
    Closed,
}

/// Reads the app's answer head; what follows it is left in the buffer.
async fn read_answer(
    app: &mut TcpStream,
    max: usize,
) -> Result<(h1::ResponseHead, BytesMut), AnswerError> {
    let mut buf = BytesMut::with_capacity(h1::SMALL_READ);
    loop {
        if let Some(head) = h1::parse_upgrade_response_head(&mut buf, max)? {
            return Ok((head, buf));
        }
        buf.reserve(h1::SMALL_READ);
        let n =
            poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *app), cx, &mut buf)).await?;
        if n == 0 {
            return Err(AnswerError::Closed);
        }
    }
}

/// The app's answer other than `101`, with its body read whole (bounded).
async fn declined(
    mut app: TcpStream,
    head: h1::ResponseHead,
    mut buf: BytesMut,
    sw: &Switch,
    deadline: tokio::time::Instant,
) -> Response<ProxyBody> {
    let status = head.parts.status;
    tracing::info!(peer = %sw.caller.remote, peer_id = %sw.caller.id, app = %sw.app, protocol = %sw.protocol, %status, "protocol switch declined by the app");
    let mut reader = BodyReader::new(head.framing, sw.max_header_bytes);
    let mut body = BytesMut::new();
    let read = tokio::time::timeout_at(deadline, async {
        loop {
            let frame = poll_fn(|cx| {
                reader.poll_frame(&mut buf, cx, |cx, b| {
                    b.reserve(h1::SMALL_READ);
                    tokio_util::io::poll_read_buf(Pin::new(&mut app), cx, b)
                })
            })
            .await;
            match frame {
                None => return true,
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        body.extend_from_slice(&d);
                        if body.len() > MAX_REFUSAL_BODY {
                            return false;
                        }
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    })
    .await;
    if read != Ok(true) {
        return text(
            StatusCode::BAD_GATEWAY,
            format!(
                "{} switch declined by the app with status {status}; its answer could not be read whole\n",
                sw.protocol
            ),
        );
    }
    let mut parts = head.parts;
    if owned::strip_response(&mut parts.headers) {
        return app_asked();
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, ProxyBody::from(Bytes::from(body)))
}
