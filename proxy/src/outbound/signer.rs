//! The outbound hook: answers stepup-v1 challenges with the workload key so
//! that applications change nothing.
//!
//! Signing needs the TLS exporter of the connection the request will travel
//! on *before* it is sent, so every signed request goes through the
//! upstream's single multiplexed h2 connection, whose [`MeshConnInfo`] is
//! known when a sender is taken (the pooled HTTP/1.1 client picks its
//! connection only inside `request`). A challenge received on a pooled
//! HTTP/1.1 connection is answered on the h2 connection: the nonce is bound
//! to the peer key and route, the binding to the connection that carries the
//! signed request, so that is sound.
//!
//! Steady state is one round trip: the nonce of a verified response's
//! `Accept-Signature` is kept per (connection, request path) and the next
//! request to that path on that connection is signed up front. The outbound
//! does not know the inbound's route ids; a path that shares a route with
//! another but has no kept nonce of its own costs one challenge.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use http::header::{HeaderValue, HOST};
use http::uri::Authority;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use keyproof_stepup::headers::ACCEPT_SIGNATURE;
use keyproof_stepup::{
    is_stepup_challenge, strip_stepup_headers, unix_now, Challenge, RequestView, SignError, Signer,
};

use crate::http::body::{text, ProxyBody, RequestBody};
use crate::http::limited::{drain, read_limited, ReadError, Whole, STEPUP_DRAIN};
use crate::http::mesh_client::MeshConnInfo;
use crate::http::tee::Resend;
use crate::identity::store::{Identity, IdentityStore};
use crate::metrics::{Metrics, Retry, SignResult, SignerMetrics};
use crate::outbound::kept::KeptNonces;
use crate::outbound::upstream::{before_retry, ForwardError, MeshLink};

use crate::http::owned::STEP_UP_ERROR;

/// Signers of earlier identities kept for connections made before a reload.
const MAX_PREVIOUS_KEYS: usize = 3;

/// The request line and headers of a request to (re)send on the h2 connection.
#[derive(Debug, Clone)]
pub struct Template {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Template {
    /// From the outbound's rewritten request head (`https://<pool key>` URI
    /// and the app's Host for HTTP/1.1, the app's `:authority` for HTTP/2).
    /// The h2 form carries the app's host as `:authority`, which is what the
    /// inbound reads as `@authority`.
    pub fn new(method: Method, uri: Uri, version: Version, mut headers: HeaderMap) -> Template {
        let mut uri = uri;
        if version != Version::HTTP_2 {
            let host = headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<Authority>().ok());
            if let Some(a) = host {
                let mut p = uri.clone().into_parts();
                p.authority = Some(a);
                if let Ok(u) = Uri::from_parts(p) {
                    uri = u;
                }
            }
            headers.remove(HOST);
        }
        Template {
            method,
            uri,
            headers,
        }
    }

    /// The request path (the key of kept nonces and learned paths).
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The request again, as first made, with `body`.
    pub fn request(&self, body: &Whole) -> Request<ProxyBody> {
        self.request_with(self.headers.clone(), body)
    }

    fn request_with(&self, headers: HeaderMap, body: &Whole) -> Request<ProxyBody> {
        let mut req = Request::new(ProxyBody::from(body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = headers;
        req
    }
}

struct SignerSlot {
    identity: Arc<Identity>,
    signer: Result<Arc<Signer>, String>,
}

/// A request sent on a mesh connection: the response, the connection, and
/// whether the request went signed.
type Sent = (Response<ProxyBody>, Arc<MeshConnInfo>, bool);

/// The outbound step-up signer hook.
pub struct OutboundStepUp {
    max_body: usize,
    store: Arc<IdentityStore>,
    signer: ArcSwapOption<SignerSlot>,
    /// Signers of the identities held before the current one, newest first:
    /// a mesh connection made before a reload is authenticated with the old
    /// certificate, so the inbound asks that key (by `keyid`) to sign.
    previous: std::sync::Mutex<Vec<Arc<Signer>>>,
    kept: KeptNonces,
    metrics: SignerMetrics,
}

impl std::fmt::Debug for OutboundStepUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundStepUp")
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

/// Builds a signer from the identity's key and leaf. A key in memory is
/// loaded as PKCS#8 or SEC1 (converted to PKCS#8; P-256 only); a token key
/// signs in its token. Either must match the leaf.
pub fn signer_for(identity: &Identity) -> Result<Arc<Signer>, String> {
    use crate::identity::key::WorkloadKey;
    use rustls_pki_types::PrivateKeyDer;
    let leaf = identity
        .certified
        .cert
        .first()
        .ok_or("the identity has no certificate")?;
    let key_der = match &identity.key {
        WorkloadKey::InProcess { der, .. } => der,
        WorkloadKey::Pkcs11(token) => {
            let external: Arc<dyn keyproof_identity::keys::ExternalKey> =
                Arc::new(token.key().clone());
            return Signer::from_external_and_cert(external, leaf)
                .map(Arc::new)
                .map_err(|e| format!("the token key cannot sign stepup-v1: {e}"));
        }
    };
    let pkcs8: Vec<u8> = match key_der {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Sec1(k) => {
            use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
            let kp = EcdsaKeyPair::from_private_key_der(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                k.secret_sec1_der(),
            )
            .map_err(|_| "the SEC1 workload key is not a P-256 key".to_owned())?;
            kp.to_pkcs8v1()
                .map_err(|_| "the SEC1 workload key cannot be converted".to_owned())?
                .as_ref()
                .to_vec()
        }
        _ => {
            return Err(
                "the workload key is neither PKCS#8 nor SEC1 (RSA cannot sign stepup-v1)".into(),
            )
        }
    };
    Signer::from_pkcs8_and_cert(&pkcs8, leaf)
        .map(Arc::new)
        .map_err(|e| format!("the workload key cannot sign stepup-v1: {e}"))
}

impl OutboundStepUp {
    /// The signer hook for `[outbound.stepup]`; signs with the identity
    /// current in `store` (a hot-reloaded identity is picked up at the next
    /// signature).
    pub fn new(
        max_body: u64,
        store: Arc<IdentityStore>,
        metrics: &Metrics,
    ) -> Result<OutboundStepUp, prometheus::Error> {
        Ok(OutboundStepUp {
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
            store,
            signer: ArcSwapOption::empty(),
            previous: std::sync::Mutex::new(Vec::new()),
            kept: KeptNonces::default(),
            metrics: SignerMetrics::register(metrics)?,
        })
    }

    /// `[outbound.stepup] max_body`.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// The signer of the identity held now, rebuilt when it changes (the
    /// one it replaces is kept in `previous`).
    fn current_signer(&self) -> Result<Arc<Signer>, String> {
        let current = self
            .store
            .get()
            .ok_or_else(|| "no workload identity held yet".to_owned())?;
        let old = self.signer.load_full();
        if let Some(slot) = &old {
            if Arc::ptr_eq(&slot.identity, &current) {
                return slot.signer.clone();
            }
        }
        let signer = signer_for(&current);
        if let Err(e) = &signer {
            tracing::warn!(error = %e, "step-up: no signer for the current identity");
        }
        if let Some(Ok(old)) = old.as_ref().map(|s| &s.signer) {
            let mut prev = self.previous.lock().unwrap_or_else(|e| e.into_inner());
            if !prev.iter().any(|p| p.keyid() == old.keyid()) {
                prev.insert(0, old.clone());
                prev.truncate(MAX_PREVIOUS_KEYS);
            }
        }
        self.signer.store(Some(Arc::new(SignerSlot {
            identity: current,
            signer: signer.clone(),
        })));
        signer
    }

    /// The signer whose key the challenge names: the current identity's, or
    /// a recent one's for a connection made before a reload. Otherwise the
    /// current one, which then refuses the challenge (`keyid_mismatch`).
    fn signer_for_challenge(&self, ch: &Challenge) -> Result<Arc<Signer>, String> {
        let current = self.current_signer();
        if matches!(&current, Ok(s) if s.keyid() == ch.keyid) {
            return current;
        }
        let prev = self.previous.lock().unwrap_or_else(|e| e.into_inner());
        match prev.iter().find(|p| p.keyid() == ch.keyid) {
            Some(p) => Ok(p.clone()),
            None => current,
        }
    }

    /// Signs `headers` for `template` and `body` on the connection `info`.
    fn sign(
        &self,
        ch: &Challenge,
        template: &Template,
        headers: &mut HeaderMap,
        body: &[u8],
        info: &MeshConnInfo,
    ) -> Result<(), SignResult> {
        let signer = self
            .signer_for_challenge(ch)
            .map_err(|_| SignResult::NoKey)?;
        strip_stepup_headers(headers);
        let view = RequestView::new(&template.method, &template.uri, headers);
        let signed = signer
            .sign(ch, &view, body, &info.exporter, unix_now())
            .map_err(|e| match e {
                SignError::Refused(r) => SignResult::from_refusal(r),
                _ => SignResult::Error,
            });
        let signed = match signed {
            Ok(s) => s,
            Err(r) => {
                self.metrics.count(r);
                return Err(r);
            }
        };
        signed.apply_into(headers);
        self.metrics.count(SignResult::Ok);
        Ok(())
    }

    /// Whether `ch` names another key of ours than the one that
    /// authenticated `info`'s connection: the connection is of the identity
    /// held now (connections of an earlier one are not reused for new
    /// requests) and the challenge asks a key we held before it. (A key that
    /// was never ours is refused by `sign`, as `keyid_mismatch`.)
    fn stale_for(&self, ch: &Challenge, info: &MeshConnInfo) -> bool {
        info.identity_generation == self.store.identity_generation()
            && self.current_signer().is_ok_and(|s| s.keyid() != ch.keyid)
            && self
                .previous
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|p| p.keyid() == ch.keyid)
    }

    /// Sends a request to a path known to need step-up: buffers the body (up
    /// to `max_body`), signs up front when a nonce is kept for this
    /// connection and path, and answers a challenge once.
    pub async fn send_known(
        &self,
        link: &MeshLink,
        template: Template,
        mut body: RequestBody,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        let body = match read_limited(&mut body, self.max_body, None).await {
            Ok(b) => b,
            Err(ReadError::TooLarge) => {
                drain(&mut body, self.max_body, STEPUP_DRAIN).await;
                self.metrics.count(SignResult::BodyTooLarge);
                return Ok(self.too_large());
            }
            Err(ReadError::Body(e)) => {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body failed: {e}\n"),
                ))
            }
            // No stall bound is passed here: the app's body has its own
            // (`h1_server`).
            Err(ReadError::Stalled(d)) => {
                return Ok(text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body made no progress for {d:?}\n"),
                ))
            }
        };
        let (resp, info, _) = match self.send_signed(link, &template, &body, None).await? {
            Ok(sent) => sent,
            // Unreachable without a challenge to answer; kept total.
            Err(r) => return Ok(text(StatusCode::BAD_GATEWAY, format!("{}\n", describe(r)))),
        };
        if !is_stepup_challenge(resp.status(), resp.headers()) {
            return Ok(self.finish(resp, info.conn_id, template.path()));
        }
        self.answer(link, resp, &template, body).await
    }

    /// Answers a challenge received for a request sent on any connection:
    /// signs with the h2 connection's exporter and resends there, once.
    /// `resend` is the body as first sent.
    pub async fn answer_resend(
        &self,
        link: &MeshLink,
        challenge: Response<ProxyBody>,
        template: &Template,
        resend: Resend,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        match resend {
            Resend::Body(body) => self.answer(link, challenge, template, body).await,
            Resend::TooLarge => {
                self.metrics.count(SignResult::BodyTooLarge);
                Ok(self.too_large())
            }
            Resend::Incomplete => {
                self.metrics.count(SignResult::Error);
                Ok(pass(
                    challenge,
                    "body_not_replayable (the upstream answered before the whole body was sent; not signed)",
                ))
            }
        }
    }

    /// The challenge a protocol switch was answered with, to sign for;
    /// `Err`: why it cannot be answered, for [`pass`].
    pub fn switch_challenge(
        &self,
        answer: &Response<ProxyBody>,
    ) -> Result<Challenge, &'static str> {
        match Challenge::from_headers(answer.headers()) {
            Ok(Some(c)) => Ok(c),
            _ => {
                self.metrics.count(SignResult::BadChallenge);
                Err(describe(SignResult::BadChallenge))
            }
        }
    }

    /// Signs a protocol switch for `ch` on the connection `info`: the
    /// extended `CONNECT` as the peer's inbound receives it (`@method`
    /// `CONNECT`, the request's `:authority` and `:path`), with no body.
    /// `Err`: why it was not signed, for [`pass`].
    pub fn sign_switch(
        &self,
        ch: &Challenge,
        parts: &mut http::request::Parts,
        info: &MeshConnInfo,
    ) -> Result<(), &'static str> {
        let template = Template {
            method: Method::CONNECT,
            uri: parts.uri.clone(),
            headers: HeaderMap::new(),
        };
        self.sign(ch, &template, &mut parts.headers, b"", info)
            .map_err(|r| {
                tracing::warn!(
                    path = parts.uri.path(),
                    result = r.as_str(),
                    "step-up challenge to a protocol switch not answered"
                );
                describe(r)
            })
    }

    /// The answer to a signed switch that is a challenge again: passed on,
    /// counted as a refusal of the signed request.
    pub fn switch_rejected(&self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        self.metrics.count(SignResult::Rejected);
        tracing::warn!("step-up: the upstream refused our signed protocol switch");
        pass(resp, describe(SignResult::Rejected))
    }

    /// Passes a challenge that cannot be answered because the upstream has
    /// no h2 connection (signing needs to know the connection beforehand).
    pub fn pass_unanswerable(&self, challenge: Response<ProxyBody>) -> Response<ProxyBody> {
        self.metrics.count(SignResult::Error);
        pass(
            challenge,
            "no_h2 (the upstream does not offer h2, on which step-up requests are signed; not signed)",
        )
    }

    async fn answer(
        &self,
        link: &MeshLink,
        challenge: Response<ProxyBody>,
        template: &Template,
        body: Whole,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        let ch = match Challenge::from_headers(challenge.headers()) {
            Ok(Some(c)) => c,
            _ => {
                self.metrics.count(SignResult::BadChallenge);
                return Ok(pass(challenge, describe(SignResult::BadChallenge)));
            }
        };
        let mut ch = ch;
        let mut challenge = challenge;
        // A challenge answered once more: one met on a connection our
        // previous certificate authenticated, whose nonce the connection in
        // hand (our current certificate's) cannot use (`send_signed`).
        let mut again = true;
        let (resp, info) = loop {
            let (resp, info, signed) =
                match self.send_signed(link, template, &body, Some(&ch)).await? {
                    Ok(sent) => sent,
                    Err(r) => {
                        tracing::warn!(
                            path = crate::http::shown_path(template.path()),
                            result = r.as_str(),
                            "step-up challenge not answered"
                        );
                        return Ok(pass(challenge, describe(r)));
                    }
                };
            if !signed && again && is_stepup_challenge(resp.status(), resp.headers()) {
                if let Ok(Some(fresh)) = Challenge::from_headers(resp.headers()) {
                    again = false;
                    ch = fresh;
                    challenge = resp;
                    continue;
                }
            }
            break (resp, info);
        };
        drop(challenge);
        if is_stepup_challenge(resp.status(), resp.headers()) {
            self.metrics.count(SignResult::Rejected);
            let why = resp
                .headers()
                .get(http::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            tracing::warn!(upstream_id = %info.peer_id, path = crate::http::shown_path(template.path()), challenge = %why, "step-up: the upstream refused our signed request");
            return Ok(pass(resp, describe(SignResult::Rejected)));
        }
        Ok(self.finish(resp, info.conn_id, template.path()))
    }

    /// Sends on the h2 connection, signed for `challenge`, or (when `None`)
    /// for a nonce kept for this connection and path, if any. The signature
    /// binds the connection, so it is made after the connection is known; a
    /// request the connection refused before sending (it was closing) is
    /// signed again for a fresh connection, once, and one the upstream did
    /// not process (it refused the stream, or its GOAWAY left it out) is
    /// signed and sent again, once, after a pause if it was refused.
    /// `Ok(Err(_))`: the challenge could not be answered. With the
    /// response comes whether the request went signed: a challenge for a key
    /// other than the one of the connection in hand (met on a connection our
    /// previous certificate authenticated, before a renewal) is not
    /// answered there, where the inbound would refuse it as
    /// `keyid_mismatch` and hold it against us; the request goes unsigned,
    /// and is challenged afresh for the connection's own key.
    async fn send_signed(
        &self,
        link: &MeshLink,
        template: &Template,
        body: &Whole,
        challenge: Option<&Challenge>,
    ) -> Result<Result<Sent, SignResult>, ForwardError> {
        let mut kept: Option<Challenge> = None;
        let mut retried = false;
        let mut refused = false;
        loop {
            let (send, info) = link.sender().await?;
            let mut headers = template.headers.clone();
            let mut signed = true;
            match challenge {
                Some(ch) if self.stale_for(ch, &info) => signed = false,
                Some(ch) => {
                    if let Err(r) = self.sign(ch, template, &mut headers, body, &info) {
                        return Ok(Err(r));
                    }
                }
                None => {
                    if kept.is_none() {
                        kept = self.kept.take(info.conn_id, template.path());
                    }
                    if let Some(ch) = &kept {
                        // A failure (e.g. the identity was reloaded since)
                        // only means the request goes unsigned and is
                        // challenged.
                        let _ = self.sign(ch, template, &mut headers, body, &info);
                    }
                }
            }
            match send.try_send(template.request_with(headers, body)).await {
                Ok(resp) => return Ok(Ok((resp.map(ProxyBody::Mesh), info, signed))),
                Err(e) => match (e.unsent, ForwardError::from_h2(&e.error)) {
                    (Some(_), _) if !retried => {
                        retried = true;
                        link.metrics().retried(Retry::ConnectionClosing);
                    }
                    // Not processed, the nonce was not spent either: signed
                    // again (for whichever connection is live then).
                    (None, ForwardError::Unprocessed(why, _)) if !refused => {
                        refused = true;
                        before_retry(why, link.metrics()).await;
                    }
                    (_, e) => return Err(e),
                },
            }
        }
    }

    /// Keeps the next nonce of a verified response (not shown to the app).
    fn finish(
        &self,
        mut resp: Response<ProxyBody>,
        conn_id: u64,
        path: &str,
    ) -> Response<ProxyBody> {
        if resp.headers().contains_key(ACCEPT_SIGNATURE) {
            if let Ok(Some(ch)) = Challenge::from_headers(resp.headers()) {
                self.kept.keep(conn_id, path, ch);
            }
            resp.headers_mut().remove(ACCEPT_SIGNATURE);
        }
        resp
    }

    fn too_large(&self) -> Response<ProxyBody> {
        let mut resp = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body larger than {} bytes (outbound.stepup.max_body): the upstream demands a step-up signature over the body, which cannot be replayed\n",
                self.max_body
            ),
        );
        resp.headers_mut().insert(
            STEP_UP_ERROR.clone(),
            HeaderValue::from_static("body_too_large"),
        );
        resp
    }
}

fn describe(r: SignResult) -> &'static str {
    match r {
        SignResult::Ok => "ok",
        SignResult::KeyidMismatch => "keyid_mismatch (the challenge names another key; not signed)",
        SignResult::AlgMismatch => "alg_mismatch (the challenge's alg does not fit this workload's key; not signed)",
        SignResult::WrongTag => "wrong_tag (the challenge is not stepup-v1; not signed)",
        SignResult::UnexpectedComponents => "unexpected_components (the challenge asks for components stepup-v1 does not sign; not signed)",
        SignResult::BadChallenge => {
            "bad_challenge (Accept-Signature has no readable stepup member; not signed)"
        }
        SignResult::BodyTooLarge => "body_too_large",
        SignResult::NoKey => "no_key (this workload's key cannot sign stepup-v1)",
        SignResult::Rejected => "rejected (the upstream refused the signed request; see WWW-Authenticate)",
        SignResult::Error => "error (signing failed)",
    }
}

/// Passes a challenge the sidecar did not (or could not) answer to the app,
/// saying why.
pub fn pass(mut resp: Response<ProxyBody>, why: &'static str) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(STEP_UP_ERROR.clone(), HeaderValue::from_static(why));
    resp
}

#[cfg(test)]
mod tests {
    use http::header::CONTENT_TYPE;
    use http_body::Body as _;
    use http_body_util::BodyExt;
    use keyproof_identity::keys::KeyType;
    use keyproof_stepup::{PeerKey, StepUpConfig, Verifier};
    use rustls_pki_types::{PrivateKeyDer, PrivateSec1KeyDer};

    use super::*;
    use crate::testing::{metric, workload, workload_with, Workload};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    http::HeaderName::from_static(n),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn an_http1_template_takes_its_authority_from_host() {
        let t = Template::new(
            Method::POST,
            "https://10.0.0.1:15443/admin/rotate?x=1".parse().unwrap(),
            Version::HTTP_11,
            headers(&[("host", "API.demo:8080"), ("content-type", "text/plain")]),
        );
        assert_eq!(t.uri.to_string(), "https://API.demo:8080/admin/rotate?x=1");
        assert_eq!(t.path(), "/admin/rotate");
        assert!(!t.headers.contains_key(HOST));
        assert_eq!(t.headers[CONTENT_TYPE], "text/plain");
    }

    #[test]
    fn an_http1_template_with_an_unreadable_host_keeps_its_uri() {
        let t = Template::new(
            Method::GET,
            "https://10.0.0.1:15443/a".parse().unwrap(),
            Version::HTTP_11,
            headers(&[("host", "not a host")]),
        );
        assert_eq!(t.uri.to_string(), "https://10.0.0.1:15443/a");
        assert!(!t.headers.contains_key(HOST));
    }

    #[test]
    fn an_http2_template_is_taken_as_it_is() {
        // The outbound's own form: the app's authority already in the URI.
        let t = Template::new(
            Method::PUT,
            "https://api.demo/a/b?c".parse().unwrap(),
            Version::HTTP_2,
            headers(&[("content-type", "application/json")]),
        );
        assert_eq!(t.uri.to_string(), "https://api.demo/a/b?c");
        assert_eq!(t.path(), "/a/b");
        assert_eq!(t.headers.len(), 1);
    }

    #[tokio::test]
    async fn a_template_makes_http2_requests_with_the_given_fields_and_body() {
        let t = Template::new(
            Method::POST,
            "https://api.demo/admin".parse().unwrap(),
            Version::HTTP_2,
            headers(&[("content-type", "application/json")]),
        );
        let req = t.request_with(
            headers(&[("x-a", "1")]),
            &Whole::data(bytes::Bytes::from_static(b"{}")),
        );
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "https://api.demo/admin");
        assert_eq!(req.version(), Version::HTTP_2);
        // The fields given, not the template's: the signed copy is sent.
        assert_eq!(req.headers().len(), 1);
        assert_eq!(req.headers()["x-a"], "1");
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{}");
        let empty = t.request_with(HeaderMap::new(), &Whole::default());
        assert!(empty.body().is_end_stream());
    }

    fn hook(w: &Workload) -> (OutboundStepUp, Metrics) {
        let metrics = Metrics::new().unwrap();
        let hook = OutboundStepUp::new(1024, w.store(), &metrics).unwrap();
        (hook, metrics)
    }

    fn info(exporter: [u8; 32]) -> MeshConnInfo {
        MeshConnInfo {
            peer_id: workload("/ns/demo/sa/api").id,
            exporter,
            conn_id: 1,
            not_after: std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
            identity_generation: 0,
        }
    }

    /// An inbound verifier's challenge for `w`'s key on the connection
    /// with `exporter`.
    fn challenge(
        v: &Verifier,
        w: &Workload,
        exporter: [u8; 32],
    ) -> (Challenge, keyproof_stepup::Peer) {
        let peer = keyproof_stepup::Peer::from_cert_der(w.leaf(), Some(exporter)).unwrap();
        let ch = v
            .challenge(&peer, "/admin", true, None, unix_now())
            .unwrap();
        let ch = Challenge::parse(ch.accept_signature.to_str().unwrap())
            .unwrap()
            .unwrap();
        (ch, peer)
    }

    #[test]
    fn what_the_outbound_signs_over_a_template_verifies_at_the_inbound() {
        let web = workload("/ns/demo/sa/web");
        let (hook, metrics) = hook(&web);
        let v = Verifier::new(StepUpConfig::default()).unwrap();
        let exporter = [3; 32];
        let (ch, peer) = challenge(&v, &web, exporter);
        let t = Template::new(
            Method::POST,
            "https://api.demo/admin/rotate?now=1".parse().unwrap(),
            Version::HTTP_2,
            headers(&[("content-type", "application/json")]),
        );
        let mut signed = t.headers.clone();
        hook.sign(&ch, &t, &mut signed, b"{}", &info(exporter))
            .unwrap();
        // The request as the inbound receives it over HTTP/2.
        let req = t.request_with(signed, &Whole::data(bytes::Bytes::from_static(b"{}")));
        let view = RequestView::new(req.method(), req.uri(), req.headers());
        let pending = v.begin(&peer, "/admin", &view, unix_now()).unwrap();
        assert_eq!(
            pending.finish(b"{}", unix_now()),
            keyproof_stepup::Outcome::Ok
        );
        assert_eq!(
            metric(&metrics, "keyproof_stepup_signatures_total{result=\"ok\"}"),
            1.0
        );
    }

    #[test]
    fn a_challenge_for_another_key_is_not_signed() {
        let (web, other) = (workload("/ns/demo/sa/web"), workload("/ns/demo/sa/web"));
        let (hook, metrics) = hook(&web);
        let v = Verifier::new(StepUpConfig::default()).unwrap();
        let (ch, _) = challenge(&v, &other, [3; 32]);
        let t = Template::new(
            Method::GET,
            "https://api.demo/admin".parse().unwrap(),
            Version::HTTP_2,
            HeaderMap::new(),
        );
        let mut h = HeaderMap::new();
        let r = hook.sign(&ch, &t, &mut h, b"", &info([3; 32]));
        assert_eq!(r, Err(SignResult::KeyidMismatch));
        assert!(h.is_empty());
        assert_eq!(
            metric(
                &metrics,
                "keyproof_stepup_signatures_total{result=\"keyid_mismatch\"}"
            ),
            1.0
        );
    }

    #[test]
    fn after_a_reload_the_new_key_signs_and_the_old_one_still_answers_for_old_connections() {
        let (first, second) = (workload("/ns/demo/sa/web"), workload("/ns/demo/sa/web"));
        let (hook, _m) = hook(&first);
        let v = Verifier::new(StepUpConfig::default()).unwrap();
        let (old_ch, _) = challenge(&v, &first, [3; 32]);
        let old_keyid = hook.current_signer().unwrap().keyid().to_owned();
        assert_eq!(old_keyid, old_ch.keyid);
        hook.store.replace(second.identity());
        let (new_ch, _) = challenge(&v, &second, [3; 32]);
        assert_eq!(hook.current_signer().unwrap().keyid(), new_ch.keyid);
        assert_ne!(new_ch.keyid, old_keyid);
        assert_eq!(
            hook.signer_for_challenge(&old_ch).unwrap().keyid(),
            old_keyid
        );
        assert_eq!(
            hook.signer_for_challenge(&new_ch).unwrap().keyid(),
            new_ch.keyid
        );
    }

    #[test]
    fn signers_are_built_from_pkcs8_and_sec1_keys_with_the_leafs_keyid() {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let p256 = workload("/ns/demo/sa/web");
        let ed = workload_with("/ns/demo/sa/ed", KeyType::Ed25519);
        let keyid = |w: &Workload| PeerKey::from_cert_der(w.leaf()).unwrap().keyid().to_owned();
        let s = signer_for(&p256.identity()).unwrap();
        assert_eq!(s.keyid(), keyid(&p256));
        let s = signer_for(&ed.identity()).unwrap();
        assert_eq!(s.keyid(), keyid(&ed));
        assert_eq!(s.alg().name(), "ed25519");
        // The same P-256 key as SEC1 (`BEGIN EC PRIVATE KEY`).
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &p256.pkcs8).unwrap();
        let sec1 = kp.private_key().as_der().unwrap();
        let identity = p256.identity_with_key(PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(
            sec1.as_ref().to_vec(),
        )));
        let s = signer_for(&identity).unwrap();
        assert_eq!(s.keyid(), keyid(&p256));
    }
}
