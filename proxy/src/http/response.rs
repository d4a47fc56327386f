//! Responses the proxy makes itself (a 403 naming the rule, a 503 naming
//! why the app is unreachable, a 408 for a slow head), in whatever body type
//! the server in question sends.

use std::time::SystemTime;

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

/// The `Date` value for responses that carry none (RFC 9110 section
/// 6.6.1), formatted once a second per thread.
pub fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHED: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let (at, date) = c.get();
        if at == secs && date[0] != 0 {
            return date;
        }
        let mut date = [0u8; 29];
        let s = httpdate::fmt_http_date(now);
        let n = s.len().min(29);
        date[..n].copy_from_slice(&s.as_bytes()[..n]);
        c.set((secs, date));
        date
    })
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
