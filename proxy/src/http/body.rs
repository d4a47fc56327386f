//! The one body type the proxy hands to hyper: either a streamed peer body,
//! passed through frame by frame (data and trailers, never buffered), or a
//! small in-memory body for responses the proxy makes itself. An enum rather
//! than a boxed trait object keeps the per-request path free of allocation.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::error::BoxError;
use crate::http::app_client::AppBody;
use crate::http::h1_server::ServerBody;
use crate::http::mesh_client::MeshBody;
use crate::http::owned::{self, Underscores};
use crate::http::response;
use crate::http::tee::TeeBody;

/// A response still to come, boxed: for the rare paths of a listener
/// (refusals, step-up, dialling), so that the common path's future, moved
/// into place per request, is only as large as that path needs.
pub type ResponseFuture<'a> = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send + 'a>>;

/// A streamed or in-memory body.
#[derive(Debug)]
pub enum ProxyBody {
    /// A body received from a peer, forwarded as it arrives.
    Stream(Incoming),
    /// A complete body (or none, once taken).
    Full(Option<Bytes>),
    /// A streamed peer body of which the outbound keeps a bounded copy, so
    /// a step-up challenge can be answered by replaying it.
    Tee(TeeBody<RequestBody>),
    /// A response body from the app's HTTP/1.1 pool, which returns its
    /// connection to the pool when it ends.
    App(AppBody),
    /// A response body from an upstream sidecar's HTTP/2 mesh connection.
    Mesh(MeshBody),
    /// A request body from the outbound's own HTTP/1.1 server.
    H1(ServerBody),
    /// A caller's request body on the inbound when
    /// `headers_with_underscores` is `drop` or `reject`: its trailer
    /// section is held to the same rule as its header section.
    Checked(Incoming, Underscores),
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        ProxyBody::Full(Some(b))
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
    H1(ServerBody),
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
                                owned::underscores_in_trailers(t, mode)?;
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
                        owned::filter_trailers(t);
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
    response::text(status, msg)
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
