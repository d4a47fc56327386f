//! The inbound verifier: challenges and verification in the design's order
//! (§4), cheap checks first.
//!
//! Two phases so the proxy need not buffer a body it will refuse anyway:
//! [`Verifier::begin`] runs steps 1-7 on the headers; [`Pending::finish`] runs
//! steps 8-10 once the body is read (up to [`StepUpConfig::max_body`]).

use std::collections::VecDeque;
use std::sync::Mutex;

use http::header::{HeaderValue, CACHE_CONTROL};
use http::HeaderMap;
use sfv::BareItemFromInput;
use subtle::ConstantTimeEq;

use aws_lc_rs::rand::SystemRandom;

use crate::alg::{Alg, KeyError, PeerKey};
use crate::base::{self, Component, RequestView};
use crate::config::StepUpConfig;
use crate::digest;
use crate::headers::{
    ACCEPT_SIGNATURE, CONTENT_DIGEST, SIGNATURE, SIGNATURE_INPUT, STEPUP_BINDING,
};
use crate::nonce::{IssueError, NonceId, NonceKey, NonceTable, ENCODED_LEN};
use crate::outcome::Outcome;
use crate::sf;
use crate::{BINDING_LEN, LABEL, TAG};

/// Largest accepted `Signature-Input` (all field lines). A genuine one is
/// about 300 bytes.
pub const MAX_SIGNATURE_INPUT_LEN: usize = 1024;
/// Largest accepted `Signature` (a genuine one is about 100 bytes).
pub const MAX_SIGNATURE_LEN: usize = 512;
/// Largest accepted `Content-Digest` (room for a few algorithms).
pub const MAX_CONTENT_DIGEST_LEN: usize = 1024;
/// Largest accepted `Stepup-Binding` (a genuine one is 46 bytes).
pub const MAX_BINDING_LEN: usize = 128;
/// Room for a genuine signature base (about 450 bytes) without regrowing.
const BASE_CAPACITY: usize = 640;

/// What the verifier knows about one TLS connection, built once per
/// connection: the peer's key (from its verified leaf certificate) and the
/// connection's channel binding.
#[derive(Debug)]
pub struct Peer {
    key: PeerKey,
    exporter: Option<[u8; BINDING_LEN]>,
    /// What follows the nonce in every `Accept-Signature` for this peer:
    /// `";alg="...";keyid="...";tag="stepup-v1"`, serialised once.
    accept_suffix: String,
    /// Whose share of the nonce table this peer's nonces count against:
    /// its identity ([`Peer::bounded_as`]), else its key.
    bound: [u8; 32],
    /// Nonces issued on this connection and not yet used here, oldest
    /// first (at most the per-peer bound): what
    /// [`Verifier::withdraw_issued`] takes back once the connection is gone.
    issued: Mutex<VecDeque<NonceId>>,
}

impl Peer {
    /// From the key and the 32-byte TLS exporter (`EXPORTER-Channel-Binding`,
    /// empty context). `None` when the connection has no exporter (e.g. TLS
    /// 1.2): every binding check then fails if `channel_binding` is on.
    pub fn new(key: PeerKey, exporter: Option<[u8; BINDING_LEN]>) -> Peer {
        // The alg name, the keyid (base64url) and the tag are all plain
        // sf-string characters: nothing to escape.
        let accept_suffix = format!(
            "\";alg=\"{}\";keyid=\"{}\";tag=\"{TAG}\"",
            key.alg().name(),
            key.keyid()
        );
        Peer {
            bound: *key.spki_sha256(),
            key,
            exporter,
            accept_suffix,
            issued: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts this peer's outstanding nonces against `identity`'s share
    /// (`max_outstanding_per_peer`) rather than its key's: every key of one
    /// identity (its replicas, its renewals) then shares one bound, as the
    /// wire format's "per peer identity" asks. A nonce stays bound to the
    /// key it was issued for.
    pub fn bounded_as(mut self, identity: &str) -> Peer {
        self.bound = digest::sha256(identity.as_bytes());
        self
    }

    /// From the peer's verified leaf certificate (DER) and the exporter.
    pub fn from_cert_der(
        cert_der: &[u8],
        exporter: Option<[u8; BINDING_LEN]>,
    ) -> Result<Peer, KeyError> {
        Ok(Peer::new(PeerKey::from_cert_der(cert_der)?, exporter))
    }

    /// The peer's key.
    pub fn key(&self) -> &PeerKey {
        &self.key
    }

    /// How many nonces issued on this connection are not known to be used
    /// (some may have been used on another connection, or expired).
    pub fn unused_issued(&self) -> usize {
        self.issued().len()
    }

    fn issued(&self) -> std::sync::MutexGuard<'_, VecDeque<NonceId>> {
        // Every mutation is one deque operation: nothing half-done to see.
        self.issued.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes `id` as issued on this connection, keeping at most `cap`.
    fn note_issued(&self, id: NonceId, cap: usize) {
        let mut issued = self.issued();
        if issued.len() >= cap {
            // Forgotten here, it still expires in the table.
            issued.pop_front();
        }
        issued.push_back(id);
    }

    /// `id` was used (or withdrawn): nothing to take back for it. Nonces
    /// are mostly used in the order they were issued, so it is found near
    /// the front.
    fn note_used(&self, id: &NonceId) {
        let mut issued = self.issued();
        if let Some(i) = issued.iter().position(|n| n == id) {
            issued.remove(i);
        }
    }
}

/// Header values of a challenge. For a 401 use all three
/// ([`ChallengeHeaders::apply_challenge`]); on a successful response only
/// `Accept-Signature` and `Cache-Control` ([`ChallengeHeaders::apply_next`]).
#[derive(Debug, Clone)]
pub struct ChallengeHeaders {
    /// `StepUp error="stepup_required"` or `StepUp error="<result>"`.
    pub www_authenticate: HeaderValue,
    /// `stepup=(...);created;nonce="...";alg="...";keyid="...";tag="stepup-v1"`.
    pub accept_signature: HeaderValue,
    /// `no-store`: a nonce must never be served from a cache.
    pub cache_control: HeaderValue,
}

impl ChallengeHeaders {
    /// Sets `WWW-Authenticate`, `Accept-Signature` and `Cache-Control`.
    pub fn apply_challenge(&self, headers: &mut HeaderMap) {
        headers.insert(
            http::header::WWW_AUTHENTICATE,
            self.www_authenticate.clone(),
        );
        self.apply_next(headers);
    }

    /// Sets `Accept-Signature` and `Cache-Control` (a successful response's
    /// nonce for the next request, RFC 9421 §5.1).
    pub fn apply_next(&self, headers: &mut HeaderMap) {
        headers.insert(ACCEPT_SIGNATURE, self.accept_signature.clone());
        headers.insert(CACHE_CONTROL, self.cache_control.clone());
    }

    /// [`ChallengeHeaders::apply_next`], moving the values in: a clone of a
    /// freshly built value costs an allocation.
    pub fn into_next(self, headers: &mut HeaderMap) {
        headers.insert(ACCEPT_SIGNATURE, self.accept_signature);
        headers.insert(CACHE_CONTROL, self.cache_control);
    }
}

/// Removes `Signature`, `Signature-Input`, `Stepup-Binding` and
/// `Accept-Signature` before a request is forwarded to the application.
pub fn strip_stepup_headers(headers: &mut HeaderMap) {
    headers.remove(SIGNATURE);
    headers.remove(SIGNATURE_INPUT);
    headers.remove(STEPUP_BINDING);
    headers.remove(ACCEPT_SIGNATURE);
}

/// Whether the request's `Signature-Input` or `Signature` is a step-up
/// proof attempt: a field naming the `stepup` label, or one that does not
/// parse (refused as malformed). A signature of the caller's own under
/// other labels only (RFC 9421 signatures an app checks itself) is not.
pub fn is_stepup_attempt(headers: &HeaderMap) -> bool {
    // The common case, a signer's single `stepup` member, without parsing.
    let mut inputs = headers.get_all(&SIGNATURE_INPUT).iter();
    if let (Some(v), None) = (inputs.next(), inputs.next()) {
        if v.as_bytes().starts_with(b"stepup=") {
            return true;
        }
    }
    [&SIGNATURE_INPUT, &SIGNATURE].into_iter().any(|name| {
        let Some(v) = sf::field_value(headers, name) else {
            return false;
        };
        let Ok(v) = std::str::from_utf8(&v) else {
            return true;
        };
        match sfv::Parser::new(v).parse::<sfv::Dictionary>() {
            Ok(d) => d.keys().any(|k| k.as_str() == LABEL),
            Err(_) => true,
        }
    })
}

/// The inbound verifier. One per process (or per listener); share it behind
/// an `Arc`. It holds the random nonce MAC key and the nonce table, so a new
/// `Verifier` (a restart) refuses every nonce of the old one.
pub struct Verifier {
    cfg: StepUpConfig,
    nonce_key: NonceKey,
    table: NonceTable,
    rng: SystemRandom,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("cfg", &self.cfg)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// Steps 1-7 passed; holds what steps 8-10 need.
#[must_use = "finish the verification with the body"]
#[derive(Debug)]
pub struct Pending<'v> {
    verifier: &'v Verifier,
    peer: &'v Peer,
    base: Vec<u8>,
    signature: Vec<u8>,
    digest: [u8; 32],
    nonce_id: NonceId,
    nonce_expires: u32,
}

/// The signature parameters stepup-v1 reads, checked at step 2.
struct Params<'a> {
    created: i64,
    expires: Option<i64>,
    nonce: &'a str,
    alg: &'a str,
    keyid: &'a str,
}

fn parse_params<'a>(params: &'a [(&'a sfv::KeyRef, BareItemFromInput<'a>)]) -> Option<Params<'a>> {
    let mut created = None;
    let mut expires = None;
    let mut nonce = None;
    let mut alg = None;
    let mut keyid = None;
    let mut tag = None;
    for (key, value) in params {
        match (key.as_str(), value) {
            ("created", BareItemFromInput::Integer(i)) => created = Some(i64::from(*i)),
            ("expires", BareItemFromInput::Integer(i)) => expires = Some(i64::from(*i)),
            ("nonce", BareItemFromInput::String(s)) => nonce = Some(s.as_str()),
            ("alg", BareItemFromInput::String(s)) => alg = Some(s.as_str()),
            ("keyid", BareItemFromInput::String(s)) => keyid = Some(s.as_str()),
            ("tag", BareItemFromInput::String(s)) => tag = Some(s.as_str()),
            // Unknown parameters or known ones of the wrong type: the
            // profile is closed, anything else is malformed.
            _ => return None,
        }
    }
    if tag? != TAG {
        return None;
    }
    Some(Params {
        created: created?,
        expires,
        nonce: nonce?,
        alg: alg?,
        keyid: keyid?,
    })
}

impl Verifier {
    /// A verifier with a fresh random nonce key and an empty table.
    pub fn new(cfg: StepUpConfig) -> Result<Verifier, aws_lc_rs::error::Unspecified> {
        let rng = SystemRandom::new();
        let nonce_key = NonceKey::generate(&rng)?;
        Ok(Verifier::with_nonce_key(cfg, nonce_key))
    }

    /// A verifier with an explicit nonce key (tests, benches).
    pub fn with_nonce_key(cfg: StepUpConfig, nonce_key: NonceKey) -> Verifier {
        let retry = u32::try_from(cfg.nonce_ttl.as_secs())
            .unwrap_or(u32::MAX)
            .max(1);
        let table = NonceTable::new(cfg.max_outstanding, cfg.max_outstanding_per_peer, retry);
        Verifier {
            cfg,
            nonce_key,
            table,
            rng: SystemRandom::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &StepUpConfig {
        &self.cfg
    }

    /// Issued, unused nonces (the `keyproof_stepup_nonces_outstanding` gauge).
    pub fn outstanding(&self) -> usize {
        self.table.len()
    }

    /// Drops expired nonces; call periodically (e.g. every few seconds).
    pub fn purge_expired(&self, now: u64) -> usize {
        self.table.purge_expired(now)
    }

    /// Issues and stores a nonce for this peer and route.
    pub fn issue_nonce(&self, peer: &Peer, route_id: &str, now: u64) -> Result<String, IssueError> {
        let (id, expires) = self.issue(peer, now)?;
        let mut nonce = String::with_capacity(ENCODED_LEN);
        self.nonce_key
            .seal_into(&id, expires, peer.key.spki_sha256(), route_id, &mut nonce);
        Ok(nonce)
    }

    /// Stores a new nonce id for `peer`; returns it with its expiry.
    fn issue(&self, peer: &Peer, now: u64) -> Result<(NonceId, u32), IssueError> {
        let expires =
            u32::try_from(now.saturating_add(self.cfg.nonce_ttl.as_secs())).unwrap_or(u32::MAX);
        // The expiry has whole seconds; the audit's nonce age wants the
        // time of issue itself (never a freshness check).
        let issued_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let id = self
            .table
            .issue(&self.rng, &peer.bound, expires, now, issued_ms)?;
        peer.note_issued(id, self.cfg.max_outstanding_per_peer);
        Ok((id, expires))
    }

    /// Takes back the nonces issued on `peer`'s connection and not used
    /// there, once that connection is gone: each is bound to the caller's
    /// key and route and could still be used on another connection of the
    /// caller's, but a signer keeps them per connection (design §5), so
    /// left alone they would count against the caller's bound until they
    /// expire (a caller renewing its certificate replaces its connections
    /// and strands a nonce per request it had in flight). Returns how many
    /// were still outstanding.
    pub fn withdraw_issued(&self, peer: &Peer) -> usize {
        let issued = std::mem::take(&mut *peer.issued());
        issued.iter().filter(|id| self.table.take(id)).count()
    }

    /// A challenge for the next request of this peer on this route: a fresh
    /// nonce in `Accept-Signature`. `error` is the outcome that caused it
    /// (`None` or `Some(Missing)` give `error="stepup_required"`).
    /// `has_content_type` says whether the request being answered has a
    /// Content-Type (then `content-type` joins the component list).
    ///
    /// Fails closed when the table is full: [`IssueError::GlobalFull`] means
    /// 503 + `Retry-After`, [`IssueError::PeerFull`] means 429.
    pub fn challenge(
        &self,
        peer: &Peer,
        route_id: &str,
        has_content_type: bool,
        error: Option<Outcome>,
        now: u64,
    ) -> Result<ChallengeHeaders, IssueError> {
        let (id, expires) = self.issue(peer, now)?;
        // `Accept-Signature` written straight into its header value: the
        // fixed start for this component set, the nonce (base64url, nothing
        // to escape), the peer's serialised parameters.
        let start = accept_signature_start(has_content_type);
        let mut accept =
            String::with_capacity(start.len() + ENCODED_LEN + peer.accept_suffix.len());
        accept.push_str(start);
        self.nonce_key
            .seal_into(&id, expires, peer.key.spki_sha256(), route_id, &mut accept);
        accept.push_str(&peer.accept_suffix);
        let mut accept_signature =
            HeaderValue::try_from(accept).map_err(|_| IssueError::Encoding)?;
        // Single-use: never worth a place in an HPACK table (RFC 7541 §7.1.3).
        accept_signature.set_sensitive(true);
        Ok(ChallengeHeaders {
            www_authenticate: HeaderValue::from_static(www_authenticate(error)),
            accept_signature,
            cache_control: HeaderValue::from_static("no-store"),
        })
    }

    /// Steps 1-7 of the verification order, from headers alone. `Err` is the
    /// failing outcome; `Ok` must be finished with the body.
    ///
    /// `peer` is this connection's peer, `route_id` the matched route (the
    /// same string given to [`Verifier::challenge`]), `now` Unix seconds.
    pub fn begin<'v>(
        &'v self,
        peer: &'v Peer,
        route_id: &str,
        req: &RequestView<'_>,
        now: u64,
    ) -> Result<Pending<'v>, Outcome> {
        let h = req.headers;
        // Step 1: presence, size, structured-field syntax.
        let input = sf::combined(h, &SIGNATURE_INPUT, MAX_SIGNATURE_INPUT_LEN);
        let signature = sf::combined(h, &SIGNATURE, MAX_SIGNATURE_LEN);
        let (input, signature) = match (input, signature) {
            (Ok(None), Ok(None)) => return Err(Outcome::Missing),
            (Ok(Some(i)), Ok(Some(s))) => (i, s),
            // One without the other, oversized or not text.
            _ => return Err(Outcome::Malformed),
        };
        // Content-Digest and Stepup-Binding are mandatory once a signature is
        // attempted; their absence is a malformed attempt, not `missing`
        // (which counts requests that made no attempt at all).
        let Ok(Some(content_digest)) = sf::combined(h, &CONTENT_DIGEST, MAX_CONTENT_DIGEST_LEN)
        else {
            return Err(Outcome::Malformed);
        };
        let Ok(Some(binding)) = sf::combined(h, &STEPUP_BINDING, MAX_BINDING_LEN) else {
            return Err(Outcome::Malformed);
        };
        // Exactly one member, labelled `stepup`, in each signature field
        // (two members, or the same label twice, are malformed), parsed in
        // one pass each, as are the digest and the binding.
        let member = sf::parse_signature_input(&input).ok_or(Outcome::Malformed)?;
        let sig = sf::parse_signature(&signature).ok_or(Outcome::Malformed)?;
        let expected_digest =
            sf::parse_content_digest(&content_digest).ok_or(Outcome::Malformed)?;
        let binding = sf::parse_binding(&binding).ok_or(Outcome::Malformed)?;

        // Step 2: tag, parameters, exactly the required components.
        let params = parse_params(&member.params).ok_or(Outcome::Malformed)?;
        if !base::is_required_set(
            member.components.iter().map(|c| c.as_str()),
            req.has_content_type(),
        ) {
            return Err(Outcome::Malformed);
        }
        if binding.len() != BINDING_LEN {
            return Err(Outcome::Malformed);
        }
        // Every component must be resolvable (e.g. an authority must exist).
        // The base is written in one buffer: component lines in the order
        // signed, then the received member re-serialised.
        let mut base = Vec::with_capacity(BASE_CAPACITY);
        for name in &member.components {
            let component = Component::from_name(name.as_str()).ok_or(Outcome::Malformed)?;
            base::push_line_start(&mut base, component);
            if !req.push_component_value(component, &mut base) {
                return Err(Outcome::Malformed);
            }
            base.push(b'\n');
        }
        base.extend_from_slice(base::SIGNATURE_PARAMS_LINE);
        member
            .write_serialized(&mut base)
            .ok_or(Outcome::Malformed)?;

        // Step 3: the algorithm is the peer key's, never the request's choice.
        if Alg::from_name(params.alg) != Some(peer.key.alg()) {
            return Err(Outcome::BadAlg);
        }
        // Step 4.
        if params.keyid != peer.key.keyid() {
            return Err(Outcome::KeyidMismatch);
        }
        // Step 5: MAC over id, expiry, peer SPKI hash and route.
        let nonce = self
            .nonce_key
            .open(params.nonce, peer.key.spki_sha256(), route_id)
            .ok_or(Outcome::BadNonce)?;
        // Step 6: freshness.
        let now_i = i64::try_from(now).unwrap_or(i64::MAX);
        let skew = i64::try_from(self.cfg.max_clock_skew.as_secs()).unwrap_or(i64::MAX);
        if u64::from(nonce.expires) < now
            || params.created.abs_diff(now_i) > skew.unsigned_abs()
            || params.expires.is_some_and(|e| e < now_i)
        {
            return Err(Outcome::Expired);
        }
        // Step 7: channel binding, constant time.
        if self.cfg.channel_binding {
            let matches = peer
                .exporter
                .as_ref()
                .is_some_and(|e| bool::from(e.as_slice().ct_eq(&binding)));
            if !matches {
                return Err(Outcome::BindingMismatch);
            }
        }
        Ok(Pending {
            verifier: self,
            peer,
            base,
            signature: sig,
            digest: expected_digest,
            nonce_id: nonce.id,
            nonce_expires: nonce.expires,
        })
    }

    /// All ten steps at once, for a body already buffered.
    pub fn verify(
        &self,
        peer: &Peer,
        route_id: &str,
        req: &RequestView<'_>,
        body: &[u8],
        now: u64,
    ) -> Outcome {
        match self.begin(peer, route_id, req, now) {
            Ok(pending) => pending.finish(body, now),
            Err(outcome) => outcome,
        }
    }
}

impl Pending<'_> {
    /// The body limit to read up to before calling [`Pending::finish`]
    /// (larger: answer 413 without finishing; the nonce stays unused).
    pub fn max_body(&self) -> usize {
        self.verifier.cfg.max_body
    }

    /// The signature base that will be verified (diagnostics, interop tests).
    pub fn signature_base(&self) -> &[u8] {
        &self.base
    }

    /// When the nonce was issued, Unix milliseconds from the system clock,
    /// while it is still outstanding (not yet used, not purged). For audit
    /// records.
    pub fn nonce_issued_ms(&self) -> Option<u64> {
        self.verifier.table.issued_ms(&self.nonce_id)
    }

    /// When the nonce expires, Unix seconds: a nonce that expired while
    /// its body was read may be purged before [`Pending::finish`] takes
    /// it, which then reads as a replay; this tells the two apart.
    pub fn nonce_expires_at(&self) -> u64 {
        u64::from(self.nonce_expires)
    }

    /// Withdraws the nonce unchecked, for a request that will not be
    /// finished (its body could not be held or read whole): the nonce
    /// can no longer be used, and stops holding a place under the table's
    /// bounds at once rather than at its expiry. Only the peer it was
    /// issued to can get here (its MAC and the channel binding held).
    pub fn withdraw(self) {
        self.verifier.table.take(&self.nonce_id);
        self.peer.note_used(&self.nonce_id);
    }

    /// Steps 8-10 with the buffered body, at `now` (Unix seconds): the
    /// nonce must still be alive when the body has arrived.
    pub fn finish(self, body: &[u8], now: u64) -> Outcome {
        let d = digest::sha256(body);
        self.finish_with_body_sha256(&d, now)
    }

    /// Steps 8-10 with the SHA-256 of the body, for a proxy that hashes the
    /// body while streaming it.
    pub fn finish_with_body_sha256(self, body_sha256: &[u8; 32], now: u64) -> Outcome {
        // Step 8.
        if !bool::from(self.digest.ct_eq(body_sha256)) {
            return Outcome::DigestMismatch;
        }
        // Step 9.
        if !self.peer.key.verify(&self.base, &self.signature) {
            return Outcome::BadSignature;
        }
        // Step 10: single use. Exactly one concurrent caller wins.
        if !self.verifier.table.take(&self.nonce_id) {
            return Outcome::Replay;
        }
        self.peer.note_used(&self.nonce_id);
        // The nonce was alive when the head arrived; a body that finished
        // after its expiry must not pass because the purge had not run yet
        // (taken first, so that it is used up either way).
        if u64::from(self.nonce_expires) < now {
            return Outcome::Expired;
        }
        Outcome::Ok
    }
}

/// The start of `Accept-Signature` up to the nonce's value: the stepup
/// member with the component list and `created` as a bare parameter
/// (RFC 9421 §5.1: "add one"). The rest is the nonce and the peer's
/// `Peer::accept_suffix`.
const fn accept_signature_start(has_content_type: bool) -> &'static str {
    if has_content_type {
        r#"stepup=("@method" "@authority" "@path" "@query" "content-type" "content-digest" "stepup-binding");created;nonce=""#
    } else {
        r#"stepup=("@method" "@authority" "@path" "@query" "content-digest" "stepup-binding");created;nonce=""#
    }
}

/// `WWW-Authenticate` of a challenge caused by `error` (`None`, `Missing`
/// and `Ok` give `stepup_required`).
const fn www_authenticate(error: Option<Outcome>) -> &'static str {
    match error {
        None | Some(Outcome::Missing) | Some(Outcome::Ok) => r#"StepUp error="stepup_required""#,
        Some(Outcome::Malformed) => r#"StepUp error="malformed""#,
        Some(Outcome::BadAlg) => r#"StepUp error="bad_alg""#,
        Some(Outcome::KeyidMismatch) => r#"StepUp error="keyid_mismatch""#,
        Some(Outcome::BadNonce) => r#"StepUp error="bad_nonce""#,
        Some(Outcome::Expired) => r#"StepUp error="expired""#,
        Some(Outcome::BindingMismatch) => r#"StepUp error="binding_mismatch""#,
        Some(Outcome::DigestMismatch) => r#"StepUp error="digest_mismatch""#,
        Some(Outcome::BadSignature) => r#"StepUp error="bad_signature""#,
        Some(Outcome::Replay) => r#"StepUp error="replay""#,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stepup_member_or_an_unreadable_field_is_a_stepup_attempt() {
        let h = |fields: &[(&http::HeaderName, &str)]| {
            let mut m = HeaderMap::new();
            for (n, v) in fields {
                m.append((*n).clone(), HeaderValue::from_str(v).unwrap());
            }
            is_stepup_attempt(&m)
        };
        assert!(!h(&[]));
        assert!(h(&[(&SIGNATURE_INPUT, "stepup=(\"@method\");created=1")]));
        assert!(h(&[(&SIGNATURE_INPUT, "app=(\"@method\"), stepup=()")]));
        assert!(h(&[(&SIGNATURE, "stepup=:AAAA:")]));
        assert!(h(&[
            (&SIGNATURE_INPUT, "app=(\"@method\""),
            (&SIGNATURE, "app=:AAAA:")
        ]));
        assert!(!h(&[
            (&SIGNATURE_INPUT, "app=(\"@method\");created=1"),
            (&SIGNATURE, "app=:AAAA:")
        ]));
        assert!(!h(&[
            (&SIGNATURE_INPUT, "sig1=()"),
            (&SIGNATURE_INPUT, "sig2=()")
        ]));
    }

    /// `Accept-Signature` serialised by `sfv`, the way it was built before
    /// it was written by hand.
    fn accept_by_sfv(nonce: &str, alg: Alg, keyid: &str, has_content_type: bool) -> String {
        let mut ser = sfv::DictSerializer::new();
        {
            let mut inner = ser.inner_list(sfv::key_ref(LABEL));
            for c in Component::required(has_content_type) {
                let _ = inner.bare_item(sfv::string_ref(c.name()));
            }
            let _ = inner
                .finish()
                .parameter(sfv::key_ref("created"), true)
                .parameter(
                    sfv::key_ref("nonce"),
                    sfv::StringRef::from_str(nonce).unwrap(),
                )
                .parameter(sfv::key_ref("alg"), sfv::string_ref(alg.name()))
                .parameter(
                    sfv::key_ref("keyid"),
                    sfv::StringRef::from_str(keyid).unwrap(),
                )
                .parameter(sfv::key_ref("tag"), sfv::string_ref(TAG));
        }
        ser.finish().unwrap()
    }

    #[test]
    fn accept_signature_is_what_sfv_serialises() {
        for key_type in keyproof_identity::keys::KeyType::ALL {
            let kp = rcgen::KeyPair::generate_for(key_type.signature_algorithm()).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["t.test".into()])
                .unwrap()
                .self_signed(&kp)
                .unwrap();
            let peer = Peer::from_cert_der(cert.der(), None).unwrap();
            let v = Verifier::new(StepUpConfig::default()).unwrap();
            for has_content_type in [true, false] {
                let ch = v
                    .challenge(&peer, "/r", has_content_type, None, 1000)
                    .unwrap();
                let got = ch.accept_signature.to_str().unwrap();
                let parsed = crate::Challenge::parse(got).unwrap().unwrap();
                assert_eq!(
                    got,
                    accept_by_sfv(
                        &parsed.nonce,
                        peer.key().alg(),
                        peer.key().keyid(),
                        has_content_type
                    )
                );
                assert!(ch.accept_signature.is_sensitive());
            }
        }
    }

    #[test]
    fn www_authenticate_names_the_outcome() {
        assert_eq!(www_authenticate(None), "StepUp error=\"stepup_required\"");
        for o in Outcome::ALL {
            let want = match o {
                Outcome::Ok | Outcome::Missing => "stepup_required".to_owned(),
                o => o.as_str().to_owned(),
            };
            assert_eq!(
                www_authenticate(Some(o)),
                format!("StepUp error=\"{want}\"")
            );
        }
    }
}
