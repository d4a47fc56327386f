//! What the clients and servers in `http/` ask of the bodies they carry.
//! They are generic over these rather than naming `ProxyBody`, which is
//! built from their own body types (`body.rs`): that keeps the dependencies
//! pointing one way.

use bytes::Bytes;
use http_body::Body;

use crate::error::BoxError;

/// A request body a client sends (to the app or on a mesh stream): bytes,
/// movable into the task that pumps what is still to come.
pub trait SendBody:
    Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + Unpin + 'static
{
}

impl<B> SendBody for B where
    B: Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + Unpin + 'static
{
}

/// A response body the HTTP/1.1 server writes: bytes, and constructible from
/// bytes for the answers the server makes itself (400, 408, 431).
pub trait ResponseBody: Body<Data = Bytes, Error: std::fmt::Display> + From<Bytes> {}

impl<B: Body<Data = Bytes, Error: std::fmt::Display> + From<Bytes>> ResponseBody for B {}
