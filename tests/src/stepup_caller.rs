//! A caller straight over mutual TLS to an inbound sidecar that signs
//! step-up proofs itself: what an attacker holding a captured request (or a
//! client without a sidecar) does, so tests can replay, cross-use and tamper
//! with signed requests the outbound sidecar would never send.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use keyproof_stepup::{unix_now, Challenge, RequestView, Signer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use crate::proxy_support::{mtls_http1, Cert, Pki};

/// The body of every request unless a test gives its own.
pub const BODY: &[u8] = b"{\"a\":1}";

/// A kept-alive HTTP/1.1 connection of one identity, and its signing key.
pub struct Caller {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// The connection's `EXPORTER-Channel-Binding`.
    pub exporter: [u8; 32],
    signer: Arc<Signer>,
    authority: String,
}

/// A response's status and fields (the body is drained).
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The fields.
    pub headers: HeaderMap,
}

impl Answer {
    /// `WWW-Authenticate`, or "".
    pub fn www(&self) -> String {
        self.headers
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    /// The `stepup` challenge it carries; panics when there is none.
    pub fn challenge(&self) -> Challenge {
        Challenge::from_headers(&self.headers)
            .expect("Accept-Signature parses")
            .expect("a stepup challenge")
    }
}

/// A `stepup-v1` signer for a test certificate (PKCS#8 key).
pub fn signer_for(cert: &Cert) -> Arc<Signer> {
    let key = match PrivateKeyDer::from_pem_file(&cert.key).expect("key") {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => panic!("test keys are PKCS#8"),
    };
    Arc::new(Signer::from_pkcs8_and_cert(&key, &cert.leaf).expect("signer"))
}

impl Caller {
    /// Connects to `inbound` as `cert`; requests name `authority`.
    pub async fn connect(inbound: SocketAddr, pki: &Pki, cert: &Cert, authority: &str) -> Caller {
        let (send, exporter) = mtls_http1(inbound, pki, cert).await;
        Caller {
            send,
            exporter,
            signer: signer_for(cert),
            authority: authority.to_owned(),
        }
    }

    fn request(&self, path: &str, headers: &HeaderMap, body: Bytes) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            b = b.header(k, v);
        }
        b.body(Full::new(body)).expect("request")
    }

    /// POSTs [`BODY`] to `path` with `headers` added.
    pub async fn send(&mut self, path: &str, headers: &HeaderMap) -> Answer {
        self.send_body(path, headers, Bytes::from_static(BODY))
            .await
    }

    /// POSTs `body` to `path` with `headers` added.
    pub async fn send_body(&mut self, path: &str, headers: &HeaderMap, body: Bytes) -> Answer {
        let req = self.request(path, headers, body);
        let resp = self.send.send_request(req).await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let _ = resp.into_body().collect().await;
        Answer { status, headers }
    }

    /// The four step-up fields for a POST of [`BODY`] to `path`, signed for
    /// `ch` on this connection.
    pub fn sign(&self, ch: &Challenge, path: &str) -> HeaderMap {
        self.sign_body(ch, path, BODY)
    }

    /// The four step-up fields for a POST of `body` to `path`.
    pub fn sign_body(&self, ch: &Challenge, path: &str, body: &[u8]) -> HeaderMap {
        let (parts, _) = self
            .request(path, &HeaderMap::new(), Bytes::new())
            .into_parts();
        let view = RequestView::from_parts(&parts);
        let signed = self
            .signer
            .sign(ch, &view, body, &self.exporter, unix_now())
            .expect("sign");
        let mut h = HeaderMap::new();
        signed.apply(&mut h);
        h
    }

    /// Takes a challenge on `path` (a step-up route), answers it (200) and
    /// returns the signed fields, now spent: what an attacker who captured
    /// the request holds.
    pub async fn spent_proof(&mut self, path: &str) -> HeaderMap {
        let first = self.send(path, &HeaderMap::new()).await;
        assert_eq!(
            first.status,
            StatusCode::UNAUTHORIZED,
            "{path} is not a step-up route"
        );
        let signed = self.sign(&first.challenge(), path);
        let ok = self.send(path, &signed).await;
        assert_eq!(ok.status, StatusCode::OK, "the genuine signed request");
        signed
    }
}
