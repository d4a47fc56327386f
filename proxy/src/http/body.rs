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
use crate::http::app_client::{AppBody, H2cBody};
use crate::http::h1_server::ServerBody;
use crate::http::h2_stream::MeshBody;
use crate::http::limited::Whole;
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
    /// A complete body with its trailer section (what is left to send).
    Whole(Whole),
    /// A streamed peer body of which the outbound keeps a bounded copy, so
    /// a step-up challenge can be answered by resending it.
    Tee(TeeBody<RequestBody>),
    /// A response body from the app's HTTP/1.1 pool, which returns its
    /// connection to the pool when it ends.
    App(AppBody),
    /// A response body from one of the app's h2c connections, which gives
    /// its stream back when it ends.
    H2c(H2cBody),
    /// A response body from an upstream sidecar's HTTP/2 mesh connection.
    Mesh(MeshBody),
    /// A request body from the outbound's own HTTP/1.1 server.
    H1(ServerBody),
    /// A caller's request body on the inbound when
    /// `headers_with_underscores` is `drop` or `reject`: its trailer
    /// section is held to the same rule as its header section.
    Checked(RequestBody, Underscores),
    /// A body that a [`FrameGate`] may end before any frame: a request
    /// stream whose caller a policy change no longer admits.
    Gated(Box<Gated>),
}

/// Asked before each frame of a [`Gated`] body.
pub trait FrameGate: Send + Sync {
    /// `Err`: the body ends with that error (its stream is reset).
    fn admit(&self) -> Result<(), BoxError>;
}

/// A body and the gate its frames pass.
pub struct Gated {
    body: ProxyBody,
    gate: std::sync::Arc<dyn FrameGate>,
}

impl std::fmt::Debug for Gated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gated").field("body", &self.body).finish()
    }
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }

    /// `self`, its frames passing `gate` first.
    pub fn gated(self, gate: std::sync::Arc<dyn FrameGate>) -> ProxyBody {
        ProxyBody::Gated(Box::new(Gated { body: self, gate }))
    }
}

impl From<Bytes> for ProxyBody {
    fn from(b: Bytes) -> Self {
        ProxyBody::Full(Some(b))
    }
}

impl From<Whole> for ProxyBody {
    /// Without trailers, as [`ProxyBody::Full`] (or empty).
    fn from(w: Whole) -> Self {
        match w.trailers {
            Some(_) => ProxyBody::Whole(w),
            None if w.data.is_empty() => ProxyBody::empty(),
            None => ProxyBody::Full(Some(w.data)),
        }
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
            RequestBody::H2(b) => ProxyBody::Mesh(b),
            RequestBody::Empty => ProxyBody::empty(),
        }
    }
}

/// A request body as a listener receives it: from hyper's HTTP/1.1 server,
/// from the outbound's own HTTP/1.1 server, or on an HTTP/2 stream.
#[derive(Debug)]
pub enum RequestBody {
    /// From hyper (HTTP/1.1).
    Hyper(Incoming),
    /// From `h1_server`.
    H1(ServerBody),
    /// From `h2_server`.
    H2(MeshBody),
    /// None: the request of a protocol switch, whose stream is kept aside
    /// for the tunnel it may become.
    Empty,
}

impl From<Incoming> for RequestBody {
    fn from(b: Incoming) -> Self {
        RequestBody::Hyper(b)
    }
}

impl From<MeshBody> for RequestBody {
    fn from(b: MeshBody) -> Self {
        RequestBody::H2(b)
    }
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
            RequestBody::H2(b) => boxed(Pin::new(b).poll_frame(cx)),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(b) => b.is_end_stream(),
            RequestBody::H1(b) => b.is_end_stream(),
            RequestBody::H2(b) => b.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(b) => b.size_hint(),
            RequestBody::H1(b) => b.size_hint(),
            RequestBody::H2(b) => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
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
            ProxyBody::Whole(w) => Poll::Ready(if !w.data.is_empty() {
                Some(Ok(Frame::data(std::mem::take(&mut w.data))))
            } else {
                w.trailers.take().map(|t| Ok(Frame::trailers(t)))
            }),
            ProxyBody::Tee(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::App(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::H2c(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Mesh(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::H1(b) => boxed(Pin::new(b).poll_frame(cx)),
            ProxyBody::Gated(g) => {
                if let Err(e) = g.gate.admit() {
                    return Poll::Ready(Some(Err(e)));
                }
                // Trailers are cleaned by the inner body's own pass.
                return Pin::new(&mut g.body).poll_frame(cx);
            }
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
            ProxyBody::Whole(w) => w.data.is_empty() && w.trailers.is_none(),
            ProxyBody::Tee(b) => b.is_end_stream(),
            ProxyBody::App(b) => b.is_end_stream(),
            ProxyBody::H2c(b) => b.is_end_stream(),
            ProxyBody::Mesh(b) => b.is_end_stream(),
            ProxyBody::H1(b) => b.is_end_stream(),
            ProxyBody::Checked(b, _) => b.is_end_stream(),
            ProxyBody::Gated(g) => g.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Stream(b) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
            // Not exact: a length announced in HTTP/1.1 leaves no place
            // for the trailers, which only chunked coding carries.
            ProxyBody::Whole(w) => {
                let mut hint = SizeHint::new();
                hint.set_lower(w.data.len() as u64);
                hint
            }
            ProxyBody::Tee(b) => b.size_hint(),
            ProxyBody::App(b) => b.size_hint(),
            ProxyBody::H2c(b) => b.size_hint(),
            ProxyBody::Mesh(b) => b.size_hint(),
            ProxyBody::H1(b) => b.size_hint(),
            ProxyBody::Checked(b, _) => b.size_hint(),
            ProxyBody::Gated(g) => g.body.size_hint(),
        }
    }
}

/// The body length a request declares (`Content-Length`), when it
/// declares a readable one: lets a body over a bound be refused before it
/// is read.
pub fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
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

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::http::h1::Framing;
    use crate::http::tee::tee;

    /// The request body hyper's HTTP/1.1 server makes of `wire` (a whole
    /// request), kept readable while the test holds it.
    async fn incoming(wire: &'static [u8]) -> Incoming {
        let (mut cli, srv) = tokio::io::duplex(64 * 1024);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let _ = tx.send(req.into_body());
                // Never answers: the body is read while the test holds it.
                std::future::pending::<Result<Response<ProxyBody>, std::convert::Infallible>>()
            });
            let io = hyper_util::rt::TokioIo::new(srv);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
        cli.write_all(wire).await.unwrap();
        // The client end stays open as long as the body may be read.
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            drop(cli);
        });
        rx.recv().await.expect("a request")
    }

    const CHUNKED: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\ngrpc-status: 0\r\ncontent-length: 5\r\nhost: evil\r\nx-forwarded-client-cert: forged\r\nx_forwarded_client_cert: forged\r\nauthorization: x\r\nmy_field: 1\r\n\r\n";

    /// The trailer names the body ends with, sorted, and its data.
    async fn collect(body: ProxyBody) -> Result<(Vec<u8>, Vec<String>), BoxError> {
        let c = body.collect().await?;
        let mut names: Vec<String> = c
            .trailers()
            .map(|t| t.keys().map(|k| k.as_str().to_owned()).collect())
            .unwrap_or_default();
        names.sort();
        Ok((c.to_bytes().to_vec(), names))
    }

    #[tokio::test]
    async fn every_streamed_body_loses_the_trailer_fields_that_may_not_follow_content() {
        let kept = ["grpc-status", "my_field"];
        let (data, names) = collect(ProxyBody::Stream(incoming(CHUNKED).await))
            .await
            .unwrap();
        assert_eq!(data, b"abc");
        assert_eq!(names, kept);
        let (body, _copy) = tee(RequestBody::Hyper(incoming(CHUNKED).await), 1024, None);
        let (_, names) = collect(ProxyBody::Tee(body)).await.unwrap();
        assert_eq!(names, kept);
        let wire = &CHUNKED[CHUNKED.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        let h1 = ServerBody::from_wire(Framing::Chunked, wire);
        let (data, names) = collect(ProxyBody::from(RequestBody::H1(h1))).await.unwrap();
        assert_eq!(data, b"abc");
        assert_eq!(names, kept);
    }

    #[tokio::test]
    async fn checked_bodies_hold_trailers_to_the_underscore_rule() {
        let body = ProxyBody::Checked(
            RequestBody::Hyper(incoming(CHUNKED).await),
            Underscores::Reject,
        );
        let e = collect(body).await.expect_err("refused");
        assert!(e.to_string().contains("my_field"), "{e}");
        let body = ProxyBody::Checked(
            RequestBody::Hyper(incoming(CHUNKED).await),
            Underscores::Drop,
        );
        let (data, names) = collect(body).await.unwrap();
        assert_eq!(data, b"abc");
        assert_eq!(names, ["grpc-status"]);
        // An owned name in disguise is removed, not refused.
        const DISGUISED: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nx_forwarded_client_cert: forged\r\nx-t: 1\r\n\r\n";
        let body = ProxyBody::Checked(
            RequestBody::Hyper(incoming(DISGUISED).await),
            Underscores::Reject,
        );
        assert_eq!(collect(body).await.unwrap().1, ["x-t"]);
    }

    #[tokio::test]
    async fn a_full_body_yields_its_bytes_once() {
        let mut body = ProxyBody::from(Bytes::from_static(b"hi"));
        assert_eq!(body.size_hint().exact(), Some(2));
        assert!(!body.is_end_stream());
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "hi");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
        let empty = ProxyBody::empty();
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
    }

    #[test]
    fn request_bodies_keep_their_kind_as_proxy_bodies() {
        let h1 = ServerBody::from_wire(Framing::Empty, b"");
        assert!(matches!(
            ProxyBody::from(RequestBody::H1(h1)),
            ProxyBody::H1(_)
        ));
    }

    #[test]
    fn responses_and_uris_made_here() {
        let r = text(StatusCode::FORBIDDEN, "no\n");
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.headers()[http::header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert_eq!(r.body().size_hint().exact(), Some(3));
        let uri = absolute_uri(
            "https".parse().unwrap(),
            "a.example:8443".parse().unwrap(),
            "/p?q".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(uri, "https://a.example:8443/p?q");
        let authority_form: http::Uri = "a.example:443".parse().unwrap();
        assert_eq!(path_of(&authority_form), "/");
        assert_eq!(path_of(&uri), "/p?q");
    }
}
