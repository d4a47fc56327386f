//! Responses the proxy makes itself (a 403 naming the rule, a 503 naming
//! why the app is unreachable, a 408 for a slow head), in whatever body type
//! the server in question sends.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// A plain-text response with `status` and `msg` as its body.
pub fn text<B: From<Bytes>>(status: StatusCode, msg: impl Into<Bytes>) -> Response<B> {
    let mut r = Response::new(B::from(msg.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use http_body::Body;
    use http_body_util::Full;

    use super::*;

    #[test]
    fn a_text_response_has_its_status_type_and_body() {
        let r: Response<Full<Bytes>> = text(StatusCode::REQUEST_TIMEOUT, "slow\n");
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert_eq!(r.body().size_hint().exact(), Some(5));
    }
}
