//! The one body type the proxy hands to hyper: either a streamed peer body,
//! passed through frame by frame (data and trailers, never buffered), or a
//! small in-memory body for responses the proxy makes itself. An enum rather
//! than a boxed trait object keeps the per-request path free of allocation.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::mesh::BoxError;

/// A streamed or in-memory body.
#[derive(Debug)]
pub enum ProxyBody {
    /// A body received from a peer, forwarded as it arrives.
    Stream(Incoming),
    /// A complete body (or none, once taken).
    Full(Option<Bytes>),
    /// A streamed peer body of which the outbound keeps a bounded copy, so
    /// a step-up challenge can be answered by replaying it.
    Tee(crate::stepup::TeeBody),
    /// A response body from the app's HTTP/1.1 pool, which returns its
    /// connection to the pool when it ends.
    App(crate::app::AppBody),
    /// A response body from an upstream sidecar's HTTP/2 mesh connection.
    Mesh(crate::mesh::MeshBody),
    /// A request body from the outbound's own HTTP/1.1 server.
    H1(crate::h1_server::ServerBody),
    /// A caller's request body on the inbound when
    /// `headers_with_underscores` is `drop` or `reject`: its trailer
    /// section is held to the same rule as its header section.
    Checked(Incoming, crate::owned::Underscores),
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl From<Incoming> for ProxyBody {
    fn from(b: Incoming) -> Self {
        ProxyBody::Stream(b)
    }
}

impl From<RequestBody> for ProxyBody {
    fn from(b: RequestBody) -> Self {
        match b {
            RequestBody::Hyper(b) => ProxyBody::Stream(b),
            RequestBody::H1(b) => ProxyBody::H1(b),
        }
    }
}

/// A request body as the outbound receives it: from hyper's HTTP/2 server
/// (gRPC, prior knowledge) or from its own HTTP/1.1 server.
#[derive(Debug)]
pub enum RequestBody {
    /// From hyper.
    Hyper(Incoming),
    /// From `h1_server`.
    H1(crate::h1_server::ServerBody),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Hyper(b) => boxed(Pin::new(b).poll_frame(cx)),
            RequestBody::H1(b) => boxed(Pin::new(b).poll_frame(cx)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(b) => b.is_end_stream(),
            RequestBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(b) => b.size_hint(),
            RequestBody::H1(b) => b.size_hint(),
        }
    }
}

fn boxed<E: Into<BoxError>>(
    p: Poll<Option<Result<Frame<Bytes>, E>>>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    p.map(|f| f.map(|r| r.map_err(Into::into)))
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match self.get_mut() {
            ProxyBody::Stream(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Tee(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::App(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Mesh(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::H1(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Checked(b, mode) => {
                let mode = *mode;
                boxed(Pin::new(b).poll_frame(cx)).map(|f| {
                    f.map(|r| {
                        r.and_then(|mut frame| {
                            if let Some(t) = frame.trailers_mut() {
                                crate::owned::underscores_in_trailers(t, mode)?;
                            }
                            Ok(frame)
                        })
                    })
                })
            }
        };
        // Every body the proxy forwards, in either direction and over
        // either protocol, passes here: the one place trailer sections are
        // cleaned of fields that may not follow the content.
        polled.map(|f| {
            f.map(|r| {
                r.map(|mut frame| {
                    if let Some(t) = frame.trailers_mut() {
                        crate::owned::filter_trailers(t);
                    }
                    frame
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Stream(b) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Tee(b) => b.is_end_stream(),
            ProxyBody::App(b) => b.is_end_stream(),
            ProxyBody::Mesh(b) => b.is_end_stream(),
            ProxyBody::H1(b) => b.is_end_stream(),
            ProxyBody::Checked(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Stream(b) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
            ProxyBody::Tee(b) => b.size_hint(),
            ProxyBody::App(b) => b.size_hint(),
            ProxyBody::Mesh(b) => b.size_hint(),
            ProxyBody::H1(b) => b.size_hint(),
            ProxyBody::Checked(b, _) => b.size_hint(),
        }
    }
}

/// A plain-text response made by the proxy itself, e.g. a 403 naming the
/// rule or a 503 naming why the app is unreachable.
pub fn text(status: StatusCode, msg: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Full(Some(msg.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `scheme://authority/path`, or a 400 response saying why that is not a
/// usable request target (boxed: it is the rare case).
pub fn absolute_uri(
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    path: http::uri::PathAndQuery,
) -> Result<http::Uri, Box<Response<ProxyBody>>> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(scheme);
    uri.authority = Some(authority);
    uri.path_and_query = Some(path);
    http::Uri::from_parts(uri).map_err(|e| {
        Box::new(text(
            StatusCode::BAD_REQUEST,
            format!("bad request target: {e}\n"),
        ))
    })
}

/// The path and query of `uri`, `/` when it has none (authority-form).
pub fn path_of(uri: &http::Uri) -> http::uri::PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// Removes the hop-by-hop fields ([`crate::owned::HOP_BY_HOP`]) and the
/// ones `Connection` names; HTTP/2 forbids them outright. `te: trailers`
/// is the one exception kept (gRPC needs it). The caller has refused a
/// `Connection` that names a field the proxy relies on
/// ([`crate::owned::check_request`]).
pub fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    // Most requests carry none: one pass over the few fields present is
    // cheaper than a hashed lookup for each name.
    let hop = |k: &http::HeaderName| crate::owned::is_hop_by_hop(k.as_str().as_bytes());
    if !h.keys().any(hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        // Headers named in Connection are hop-by-hop too.
        let named: Vec<String> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|list| list.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty() && n != "te")
            .collect();
        for name in named {
            h.remove(name.as_str());
        }
    }
    let trailers_only = h
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in crate::owned::HOP_BY_HOP {
        if name == "te" && trailers_only {
            continue;
        }
        h.remove(name);
    }
}

/// Reads and discards a small request body before the proxy answers a
/// request itself (403, fail-closed step-up). Answering while the client is
/// still sending makes HTTP/2 reset the stream and HTTP/1 close the
/// connection, which some clients report as a transport error instead of
/// showing the refusal. Bounded in size and time so it costs nothing to
/// abuse.
pub async fn discard<B>(body: B)
where
    B: Body + Unpin,
{
    use http_body_util::BodyExt;
    const LIMIT: u64 = 64 * 1024;
    let mut body = body;
    if body.is_end_stream() {
        return;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                seen += d.remaining() as u64;
                if seen > LIMIT {
                    break;
                }
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(fields: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in fields {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_are_stripped() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive, X-Private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("x-kept", "2"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "x-kept"]);
        // `te: trailers` is the one TE value that goes on (gRPC needs it).
        let mut h = map(&[("host", "a"), ("te", "trailers")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        let mut h = map(&[("host", "a"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }
}
