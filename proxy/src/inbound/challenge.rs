//! The inbound hook: one `keyproof_stepup::Verifier` per process, a
//! challenge or a verification for every request that must prove
//! possession (on an `always` route; on a `risk` route when a rule fired,
//! the caller presigned, or the app asked).
//!
//! The route id bound into each nonce is the route's `path_prefix`: the same
//! string is given to `challenge` and `begin`, so a nonce issued on one route
//! is `bad_nonce` on another.
//!
//! Every decision and verification here is counted, audited (when
//! `[inbound.stepup] audit_log` is on) and, when it refuses a proof, recorded
//! as a failure of the caller in the risk table.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use keyproof_stepup::{
    is_stepup_attempt, strip_stepup_headers, unix_now, IssueError, Outcome, Peer, RequestView,
    StepUpConfig, Verifier,
};

use crate::config::{InboundStepUpConfig, PolicyConfig, RiskAction, StepUpMode};
use crate::http::body::{declared_length, text, ProxyBody};
use crate::http::limited::{drain, read_limited, ReadError, STEPUP_DRAIN};
use crate::http::owned::{STEP_UP_REASON, STEP_UP_VERIFIED};
use crate::inbound::audit::{self, Audit, Record};
use crate::inbound::budget::BodyBudget;
use crate::inbound::conn::InboundConn;
use crate::inbound::policy::Route;
use crate::inbound::risk::{Failure, Now, RiskTable};
use crate::metrics::Metrics;
use crate::metrics::VerifierMetrics;

/// See the table-full branch of the challenge.
static TABLE_FULL_LOG: crate::error::LogEvery = crate::error::LogEvery::new(10);

/// How often expired nonces are dropped from the table. Expired nonces are
/// refused by their MAC'd expiry anyway; purging only returns their memory
/// and their slot under `max_outstanding`.
const PURGE_EVERY: Duration = Duration::from_secs(5);
/// How long a closed connection's unused nonces stay valid: see
/// [`InboundStepUp::connection_ended`].
const WITHDRAW_GRACE: Duration = Duration::from_secs(2);

/// Why the inbound step-up verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VerifierStartError {
    /// The system random generator failed while creating the nonce key.
    #[error("step-up: cannot create the nonce key (system random generator failed)")]
    Rng,
    /// Registering the step-up metrics failed (a bug).
    #[error("step-up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Why a request must prove possession: the value of
/// `x-keyproof-step-up-reason`, the `reason` label of
/// `keyproof_stepup_challenges_total` and of audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The route is `always`.
    Always,
    /// The app asked (`x-keyproof-step-up: required`), or the caller
    /// presigned a request on a `risk` route where no rule fired (its
    /// sidecar kept the nonce of an earlier such answer).
    App,
    /// This risk rule of the route fired.
    Rule(Arc<str>),
}

impl Reason {
    /// The label value.
    pub fn as_str(&self) -> &str {
        match self {
            Reason::Always => "always",
            Reason::App => "app",
            Reason::Rule(name) => name,
        }
    }

    fn header_value(&self) -> HeaderValue {
        match self {
            Reason::Always => HeaderValue::from_static("always"),
            Reason::App => HeaderValue::from_static("app"),
            // Rule names are tokens (`[A-Za-z0-9_.-]+`, checked at load).
            Reason::Rule(name) => {
                HeaderValue::from_str(name).unwrap_or_else(|_| HeaderValue::from_static("rule"))
            }
        }
    }
}

/// A verification that did not pass: its outcome and, once its nonce was
/// opened, the nonce's age in milliseconds (for the audit record).
#[derive(Debug, Clone, Copy)]
struct Refused {
    outcome: Outcome,
    nonce_age_ms: Option<u64>,
    /// The nonce's expiry passed between opening it and taking it.
    expired_meanwhile: bool,
}

/// Whether a refused proof counts against its caller (a failure in the
/// risk table: `after_failure`, `failures_above`). Only what a caller's
/// sidecar doing its job never produces does; refusals it does produce
/// would otherwise let an inbound restart or a slow client lock callers
/// out:
/// * `expired`: a kept nonce outlived its life before the next request, or
///   the clocks are apart;
/// * `bad_nonce`: the nonce was issued by an earlier run of this inbound
///   (the nonce key is per process), or for the caller's previous
///   certificate key (a renewal between the nonce and its use);
/// * `replay` of a nonce that expired while its body was read (the purge
///   dropped it): an expiry, not a reuse;
/// * `missing`: the normal first request.
///
/// Everything else counts: a replay, a bad signature, a body or channel
/// binding other than the signed one, another key's signature, a
/// malformed proof or one with the wrong algorithm.
fn held_against_caller(refused: &Refused) -> bool {
    match refused.outcome {
        Outcome::Ok | Outcome::Missing | Outcome::Expired | Outcome::BadNonce => false,
        Outcome::Replay => !refused.expired_meanwhile,
        Outcome::Malformed
        | Outcome::BadAlg
        | Outcome::KeyidMismatch
        | Outcome::BindingMismatch
        | Outcome::DigestMismatch
        | Outcome::BadSignature => true,
    }
}

/// The audit `result` of a request that should have been challenged when
/// no nonce could be issued.
fn not_issued(e: &IssueError) -> &'static str {
    match e {
        IssueError::GlobalFull { .. } => "table_full",
        IssueError::PeerFull { .. } => "peer_full",
        IssueError::Rng | IssueError::Encoding => "not_issued",
    }
}

/// The request target as the caller sent it, kept (in the request's
/// extensions) when normalization changed it: RFC 9421 signs `@path` as
/// sent (section 2.2.6: percent-encoding as sent, no dot-segment removal),
/// so a proof is verified over that, while the policy and the app see the
/// normalized target it maps to.
#[derive(Debug, Clone)]
pub struct SentTarget(pub http::Uri);

/// Proof that a request passed [`InboundStepUp::verify`]; needed by
/// [`InboundStepUp::on_response`], so a next nonce is only ever attached to
/// the response of a verified request.
#[derive(Debug)]
pub struct Verified {
    has_content_type: bool,
    /// The body's place in `max_buffered`, kept until the response: the
    /// checked body goes on to the app whole, and a stalled app holds it
    /// (round 7: 167 bodies of 1 MB, counted nowhere once checked).
    _body: super::budget::Taken,
}

/// The inbound step-up verifier hook.
pub struct InboundStepUp {
    verifier: Arc<Verifier>,
    metrics: VerifierMetrics,
    max_body: usize,
    /// `[inbound] body_timeout`, for the body read whole to check its digest.
    body_timeout: Duration,
    /// Refused proofs raise the caller's risk.
    risk: Arc<RiskTable>,
    audit: Option<Arc<Audit>>,
    /// Bodies held whole for their check (`max_buffered`).
    budget: Arc<BodyBudget>,
}

impl std::fmt::Debug for InboundStepUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundStepUp")
            .field("verifier", &self.verifier)
            .finish_non_exhaustive()
    }
}

/// What [`InboundStepUp::new`] needs besides `[inbound.stepup]`.
pub struct StepUpDeps<'a> {
    /// The policy at startup: its step-up routes' challenge counters start
    /// at 0.
    pub policy: &'a PolicyConfig,
    /// The proxy's metrics.
    pub metrics: &'a Metrics,
    /// `[inbound] body_timeout`.
    pub body_timeout: Duration,
    /// The process's risk table (refusals are recorded there).
    pub risk: Arc<RiskTable>,
    /// Where audit records go, if anywhere.
    pub audit: Option<Arc<Audit>>,
    /// Whether the policy may change while running (`policy_file`): step-up
    /// routes may appear later, so the purge task runs regardless.
    pub reloadable: bool,
}

/// The reasons each step-up route of `policy` can challenge for: `always`;
/// or `app` and the names of its `challenge` rules.
fn challenge_reasons(policy: &PolicyConfig) -> Vec<(&str, Vec<&str>)> {
    policy
        .routes
        .iter()
        .filter_map(|r| {
            let reasons = match r.step_up {
                StepUpMode::Never => return None,
                StepUpMode::Always => vec!["always"],
                StepUpMode::Risk => std::iter::once("app")
                    .chain(r.risk.iter().map(String::as_str).filter(|name| {
                        policy
                            .risk_rules
                            .iter()
                            .any(|k| k.name == *name && k.action == RiskAction::Challenge)
                    }))
                    .collect(),
            };
            Some((r.path_prefix.as_str(), reasons))
        })
        .collect()
}

impl InboundStepUp {
    /// The verifier for `[inbound.stepup]`, its metrics (challenge counters
    /// for every step-up route and reason) and, when a runtime is present,
    /// the task that purges expired nonces.
    pub fn new(
        config: &InboundStepUpConfig,
        deps: StepUpDeps<'_>,
    ) -> Result<InboundStepUp, VerifierStartError> {
        let max_body = usize::try_from(config.max_body).unwrap_or(usize::MAX);
        let verifier = Arc::new(
            Verifier::new(StepUpConfig {
                nonce_ttl: config.nonce_ttl,
                max_clock_skew: config.max_clock_skew,
                max_body,
                max_outstanding: config.max_outstanding,
                max_outstanding_per_peer: config.max_outstanding_per_peer,
                channel_binding: config.channel_binding,
            })
            .map_err(|_| VerifierStartError::Rng)?,
        );
        let reasons = challenge_reasons(deps.policy);
        let metrics = VerifierMetrics::register(
            deps.metrics,
            reasons.iter().map(|(r, why)| (*r, why.iter().copied())),
            config.max_outstanding,
        )?;
        if deps.reloadable || !reasons.is_empty() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(purge(
                    Arc::downgrade(&verifier),
                    metrics.outstanding.clone(),
                ));
            }
        }
        Ok(InboundStepUp {
            verifier,
            metrics,
            max_body,
            body_timeout: deps.body_timeout,
            risk: deps.risk,
            audit: deps.audit,
            budget: BodyBudget::new(config.max_buffered, config.max_body),
        })
    }

    /// Starts the challenge counters of a policy taken into use after
    /// startup (its new routes and rules) at 0.
    pub fn policy_changed(&self, policy: &PolicyConfig) {
        let reasons = challenge_reasons(policy);
        self.metrics
            .precreate(reasons.iter().map(|(r, why)| (*r, why.iter().copied())));
    }

    /// `[inbound.stepup] max_body`.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Takes back, after a short grace, the nonces issued on a connection
    /// that has ended and not used on it (see
    /// [`keyproof_stepup::Verifier::withdraw_issued`]). The grace lets a
    /// challenge answered just as the connection closed (a signer resends
    /// on its live connection) still be verified rather than read as a
    /// replay.
    pub fn connection_ended(&self, conn: Arc<InboundConn>) {
        if conn.stepup.as_ref().is_none_or(|p| p.unused_issued() == 0) {
            return;
        }
        let (verifier, outstanding) = (self.verifier.clone(), self.metrics.outstanding.clone());
        tokio::spawn(async move {
            tokio::time::sleep(WITHDRAW_GRACE).await;
            let Some(peer) = conn.stepup.as_ref() else {
                return;
            };
            let n = verifier.withdraw_issued(peer);
            if n > 0 {
                tracing::debug!(peer = %conn.remote, peer_id = %conn.peer.id, withdrawn = n, "step-up: nonces of a closed connection withdrawn");
                outstanding.set(i64::try_from(verifier.outstanding()).unwrap_or(i64::MAX));
            }
        });
    }

    /// Waits until every audit record made so far is written.
    pub fn flush_audit(&self) {
        if let Some(a) = &self.audit {
            a.flush();
        }
    }

    /// Writes an audit record of `conn`'s caller on `route`, if audit is on.
    pub fn audit(
        &self,
        conn: &InboundConn,
        route: &str,
        reason: &Reason,
        result: &str,
        nonce_age_ms: Option<u64>,
    ) {
        if let Some(a) = &self.audit {
            a.record(&Record {
                peer: conn.peer.id.as_str(),
                serial: &conn.peer.serial,
                route,
                reason: reason.as_str(),
                result,
                nonce_age_ms,
            });
        }
    }

    /// Checks one request that must prove possession, for `reason` (the
    /// route's `allow` has already admitted the caller, and caller-sent
    /// identity headers are gone).
    ///
    /// `Ok` is the request to forward: step-up headers stripped,
    /// `x-keyproof-step-up: verified` and `x-keyproof-step-up-reason` set,
    /// the body buffered as received. `Err` is the answer instead: 401 with
    /// a fresh challenge, 413, or 503/429 when no nonce can be issued.
    pub async fn verify(
        &self,
        req: Request<ProxyBody>,
        conn: &InboundConn,
        route: &Route,
        reason: &Reason,
    ) -> Result<(Request<ProxyBody>, Verified), Response<ProxyBody>> {
        let route_id = route.path_prefix.as_str();
        let Some(peer) = conn.stepup.as_ref() else {
            drain(&mut req.into_body(), self.max_body, STEPUP_DRAIN).await;
            return Err(self.unsupported_key(conn, route_id, reason));
        };
        let (mut parts, mut body) = req.into_parts();
        if !is_stepup_attempt(&parts.headers) {
            // Signatures of the caller's own (other labels) are no attempt
            // at a proof: the request has none, and is challenged as such
            // rather than refused as malformed and held against it.
            strip_stepup_headers(&mut parts.headers);
        }
        let now = unix_now();
        let view = match parts.extensions.get::<SentTarget>() {
            Some(sent) => RequestView::new(&parts.method, &sent.0, &parts.headers),
            None => RequestView::from_parts(&parts),
        };
        let has_content_type = view.has_content_type();
        // A body declared larger than can be checked gets 413 before any
        // challenge: the signed resend could only get 413 too.
        let declared = declared_length(&parts.headers);
        if declared.is_some_and(|n| n > self.max_body as u64) {
            drain(&mut body, self.max_body, STEPUP_DRAIN).await;
            return Err(self.too_large(conn, route_id, reason));
        }
        let pending = match self.verifier.begin(peer, route_id, &view, now) {
            Ok(p) => p,
            Err(outcome) => {
                // Read what the caller sends (bounded) before answering, so a
                // caller's sidecar has sent its whole body and can replay it.
                drain(&mut body, self.max_body, STEPUP_DRAIN).await;
                return Err(self.refuse(
                    peer,
                    conn,
                    route_id,
                    reason,
                    has_content_type,
                    Refused {
                        outcome,
                        nonce_age_ms: None,
                        expired_meanwhile: false,
                    },
                ));
            }
        };
        // Held until the app has answered (see `Verified`): its bound until
        // read, then its length. A request whose head ended its stream
        // holds nothing (held at `max_body`, a caller's concurrent
        // bodiless requests would be refused past a quarter of the budget).
        let need = if body.is_end_stream() {
            0
        } else {
            declared.unwrap_or(self.max_body as u64)
        };
        // A request that is not checked leaves no nonce behind to count
        // against its caller's bound until it expires.
        let withdraw = |pending: keyproof_stepup::Pending<'_>| {
            pending.withdraw();
            self.metrics
                .outstanding
                .set(i64::try_from(self.verifier.outstanding()).unwrap_or(i64::MAX));
        };
        let Some(mut held) = self.budget.take(conn.peer.id.as_str(), need) else {
            withdraw(pending);
            return Err(self.busy(conn, route_id, reason));
        };
        let mut body = match read_limited(&mut body, self.max_body, Some(self.body_timeout)).await {
            Ok(b) => b,
            Err(ReadError::Stalled(after)) => {
                withdraw(pending);
                tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, "step-up: request body stalled for {after:?}");
                let mut r = text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body made no progress for {after:?}\n"),
                );
                if parts.version != http::Version::HTTP_2 {
                    r.headers_mut()
                        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
                }
                return Err(r);
            }
            Err(ReadError::TooLarge) => {
                withdraw(pending);
                drain(&mut body, self.max_body, STEPUP_DRAIN).await;
                return Err(self.too_large(conn, route_id, reason));
            }
            Err(ReadError::Body(e)) => {
                withdraw(pending);
                tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, error = %e, "step-up: reading the request body failed");
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body failed: {e}\n"),
                ));
            }
        };
        held.shrink_to(body.len() as u64);
        // Known to the millisecond while the nonce is outstanding. A used
        // one (a replay) left only its expiry, to the second: its age is
        // left out rather than written up to a second wrong.
        let issued_ms = pending.nonce_issued_ms();
        let expires = pending.nonce_expires_at();
        let outcome = pending.finish(&body, unix_now());
        let age = issued_ms.map(|ms| Now::system().0.saturating_sub(ms));
        if !outcome.is_ok() {
            return Err(self.refuse(
                peer,
                conn,
                route_id,
                reason,
                has_content_type,
                Refused {
                    outcome,
                    nonce_age_ms: age,
                    // The body took longer than the nonce's life: the purge
                    // may have dropped it, which reads as a replay.
                    expired_meanwhile: expires < unix_now(),
                },
            ));
        }
        self.metrics.verification(Outcome::Ok);
        self.metrics
            .outstanding
            .set(i64::try_from(self.verifier.outstanding()).unwrap_or(i64::MAX));
        tracing::debug!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, reason = reason.as_str(), result = "ok", "step-up verified");
        self.audit(conn, route_id, reason, audit::OK, age);
        strip_stepup_headers(&mut parts.headers);
        // Any copy from the network was removed before this hook ran.
        parts.headers.insert(
            STEP_UP_VERIFIED.clone(),
            HeaderValue::from_static("verified"),
        );
        parts
            .headers
            .insert(STEP_UP_REASON.clone(), reason.header_value());
        // Its trailers go on, but not the fields the route's risk rules
        // read in the header section: they were never evaluated.
        let read = route.risk.as_ref().and_then(|k| k.header_fields());
        if let (Some(t), Some(names)) = (body.trailers.as_mut(), read) {
            crate::http::owned::remove_named(t, names);
        }
        let body = ProxyBody::from(body);
        Ok((
            Request::from_parts(parts, body),
            Verified {
                has_content_type,
                _body: held,
            },
        ))
    }

    /// The answer to a request forwarded without a proof whose app asked
    /// for one: a challenge from this verifier's own nonce table (never a
    /// nonce of the app's making), counted and audited as any request that
    /// came without the proof it needed.
    pub fn app_asked(
        &self,
        conn: &InboundConn,
        route: &Route,
        has_content_type: bool,
    ) -> Response<ProxyBody> {
        let route_id = route.path_prefix.as_str();
        let Some(peer) = conn.stepup.as_ref() else {
            return self.unsupported_key(conn, route_id, &Reason::App);
        };
        self.refuse(
            peer,
            conn,
            route_id,
            &Reason::App,
            has_content_type,
            Refused {
                outcome: Outcome::Missing,
                nonce_age_ms: None,
                expired_meanwhile: false,
            },
        )
    }

    /// The answer to a request forwarded without a proof whose app asked
    /// for one, when its body is larger than `max_body`: the signed resend
    /// could not be checked, so no challenge.
    pub fn app_asked_too_large(&self, conn: &InboundConn, route: &Route) -> Response<ProxyBody> {
        self.too_large(conn, route.path_prefix.as_str(), &Reason::App)
    }

    /// Attaches a fresh `Accept-Signature` (and `Cache-Control: no-store`) to
    /// the app's response to a verified request: the caller signs its next
    /// privileged request up front, so steady state costs no extra round trip.
    pub fn on_response(
        &self,
        resp: &mut Response<ProxyBody>,
        conn: &InboundConn,
        route: &Route,
        verified: Verified,
    ) {
        let Some(peer) = conn.stepup.as_ref() else {
            return;
        };
        let route_id = route.path_prefix.as_str();
        match self
            .verifier
            .challenge(peer, route_id, verified.has_content_type, None, unix_now())
        {
            Ok(ch) => ch.into_next(resp.headers_mut()),
            Err(e) => {
                // The response itself succeeded; the next request will simply
                // be challenged (and refused with 503/429 if still full).
                if matches!(
                    e,
                    IssueError::GlobalFull { .. } | IssueError::PeerFull { .. }
                ) {
                    self.metrics.table_full.inc();
                }
                tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, error = %e, "step-up: no next nonce attached");
            }
        }
        self.metrics
            .outstanding
            .set(i64::try_from(self.verifier.outstanding()).unwrap_or(i64::MAX));
    }

    /// The peer's certificate key is neither P-256 nor Ed25519: it can never
    /// produce a stepup-v1 signature, so a challenge would be a lie. Refuses
    /// with the reason.
    fn unsupported_key(
        &self,
        conn: &InboundConn,
        route_id: &str,
        reason: &Reason,
    ) -> Response<ProxyBody> {
        tracing::warn!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, reason = reason.as_str(), result = "unsupported_key", "step-up refused: the caller's key type cannot sign stepup-v1");
        self.audit(conn, route_id, reason, "unsupported_key", None);
        no_store(text(
            StatusCode::FORBIDDEN,
            format!("step-up required by route {route_id}, but the caller's certificate key is neither P-256 nor Ed25519\n"),
        ))
    }

    /// Counts, audits and logs a failed verification (a refused proof may
    /// also raise the caller's risk: [`held_against_caller`]) and answers
    /// with a challenge naming the reason (or 503/429 when no nonce can be
    /// issued).
    fn refuse(
        &self,
        peer: &Peer,
        conn: &InboundConn,
        route_id: &str,
        reason: &Reason,
        has_content_type: bool,
        refused: Refused,
    ) -> Response<ProxyBody> {
        let outcome = refused.outcome;
        self.metrics.verification(outcome);
        if outcome != Outcome::Missing {
            tracing::warn!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, reason = reason.as_str(), result = outcome.as_str(), "step-up verification refused");
            self.audit(
                conn,
                route_id,
                reason,
                outcome.as_str(),
                refused.nonce_age_ms,
            );
            if held_against_caller(&refused) {
                self.risk
                    .record_failure(conn.peer.id.as_str(), Failure::StepUp, Now::system());
            }
        }
        let issued =
            self.verifier
                .challenge(peer, route_id, has_content_type, Some(outcome), unix_now());
        let resp = match issued {
            Ok(ch) => {
                self.metrics.challenge(route_id, reason.as_str());
                if outcome == Outcome::Missing {
                    // The normal first request of a caller: challenged, not
                    // an attack.
                    tracing::info!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, reason = reason.as_str(), result = outcome.as_str(), "step-up required: challenging");
                    self.audit(conn, route_id, reason, audit::CHALLENGED, None);
                }
                let mut resp = text(
                    StatusCode::UNAUTHORIZED,
                    format!(
                        "step-up required by route {route_id} ({}): sign this request per stepup-v1 with the nonce in Accept-Signature (reason: {})\n",
                        outcome.as_str(),
                        reason.as_str()
                    ),
                );
                ch.apply_challenge(resp.headers_mut());
                resp
            }
            Err(e) => {
                // Full tables refuse every request of a flood: the metric
                // counts each, the log says it at most every 10 s.
                let full = matches!(
                    e,
                    IssueError::GlobalFull { .. } | IssueError::PeerFull { .. }
                );
                if full {
                    self.metrics.table_full.inc();
                }
                if !full || TABLE_FULL_LOG.due() {
                    tracing::warn!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, result = outcome.as_str(), error = %e, "step-up challenge not issued{}", if full { " (a full nonce table: logged at most every 10 s, counted in keyproof_stepup_nonce_table_full_total)" } else { "" });
                }
                if outcome == Outcome::Missing {
                    // What the caller got: no challenge.
                    self.audit(conn, route_id, reason, not_issued(&e), None);
                }
                let mut resp = no_store(text(e.http_status(), format!("{e}\n")));
                if let Some(secs) = e.retry_after_secs() {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                resp
            }
        };
        self.metrics
            .outstanding
            .set(i64::try_from(self.verifier.outstanding()).unwrap_or(i64::MAX));
        resp
    }

    /// The answer when the bodies held for their check have used the
    /// budget: 503, to be tried again shortly (the nonce stays unused).
    fn busy(&self, conn: &InboundConn, route_id: &str, reason: &Reason) -> Response<ProxyBody> {
        self.metrics.budget_full.inc();
        tracing::warn!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, reason = reason.as_str(), held = self.budget.held(), "step-up: signed bodies held for their check are at inbound.stepup.max_buffered (or this caller's quarter of it); answered 503");
        let mut resp = no_store(text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many signed request bodies are being checked (inbound.stepup.max_buffered) on step-up route {route_id}; retry shortly\n"),
        ));
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        resp
    }

    fn too_large(
        &self,
        conn: &InboundConn,
        route_id: &str,
        reason: &Reason,
    ) -> Response<ProxyBody> {
        tracing::warn!(peer = %conn.remote, peer_id = %conn.peer.id, route = route_id, reason = reason.as_str(), result = "body_too_large", max_body = self.max_body, "step-up refused: body larger than inbound.stepup.max_body");
        self.audit(conn, route_id, reason, "body_too_large", None);
        // Not a verification outcome: the signature was never checked (a
        // nonce whose head was checked already is withdrawn, unspent).
        no_store(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body larger than {} bytes (inbound.stepup.max_body) on step-up route {route_id}: Content-Digest cannot be checked\n",
                self.max_body
            ),
        ))
    }
}

fn no_store(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Drops expired nonces every [`PURGE_EVERY`] and refreshes the gauge; ends
/// when the verifier is gone.
async fn purge(verifier: Weak<Verifier>, gauge: prometheus::IntGauge) {
    let mut tick = tokio::time::interval(PURGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(v) = verifier.upgrade() else { return };
        v.purge_expired(unix_now());
        gauge.set(i64::try_from(v.outstanding()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderMap, Method};
    use http_body_util::BodyExt;
    use keyproof_stepup::headers::{ACCEPT_SIGNATURE, SIGNATURE, SIGNATURE_INPUT, STEPUP_BINDING};
    use keyproof_stepup::{is_stepup_challenge, Challenge, SignedHeaders, Signer};

    use super::*;
    use crate::config::{RiskCondition, RiskRuleConfig, RouteConfig};
    use crate::inbound::policy::{Decision, Policy};
    use crate::testing::{config, hyper_request, metric, workload, Workload};

    /// The channel binding of the test connection.
    const EXPORTER: [u8; 32] = [7; 32];
    const ROUTE: &str = "/admin/rotate";

    struct Setup {
        stepup: InboundStepUp,
        policy: Policy,
        conn: InboundConn,
        web: Workload,
        metrics: Metrics,
        /// The audit log, when on.
        audit: Option<(tempfile::TempDir, std::path::PathBuf)>,
    }

    /// The inbound of `api` with step-up routes `/admin/rotate` and
    /// `/admin/keys` for `web`, and web's connection to it.
    fn setup(max_body: u64) -> Setup {
        setup_with(max_body, false)
    }

    /// [`setup`], with the audit log in a file when `audit`.
    fn setup_with(max_body: u64, audit: bool) -> Setup {
        let (api, web) = (workload("/ns/demo/sa/api"), workload("/ns/demo/sa/web"));
        let cfg = config(&format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n\
             [inbound.stepup]\nmax_body = {max_body}\n\
             [[inbound.routes]]\npath_prefix = \"/admin/rotate\"\nallow = [\"spiffe://unit.keyproof.test/ns/demo/sa/web\"]\nstep_up = true\n\
             [[inbound.routes]]\npath_prefix = \"/admin/keys\"\nallow = [\"spiffe://unit.keyproof.test/ns/demo/sa/web\"]\nstep_up = true\n"
        ));
        let cfg = cfg.inbound.expect("[inbound]");
        let metrics = Metrics::new().unwrap();
        let table = crate::inbound::risk::RiskTable::new(100, &metrics).unwrap();
        let audit = audit.then(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            (dir, path)
        });
        let stepup = InboundStepUp::new(
            &cfg.stepup,
            StepUpDeps {
                policy: &cfg.policy,
                metrics: &metrics,
                body_timeout: cfg.limits.body_timeout,
                risk: table.clone(),
                audit: audit.as_ref().map(|(_, path)| {
                    Arc::new(
                        Audit::open(&crate::config::AuditSink::File(path.clone()), &metrics)
                            .unwrap(),
                    )
                }),
                reloadable: false,
            },
        )
        .unwrap();
        let policy = Policy::new(&cfg.policy, cfg.default_policy, &table, 0, &metrics).unwrap();
        let conn = InboundConn::for_tests(web.peer(), &api.id, Some(EXPORTER));
        Setup {
            stepup,
            policy,
            conn,
            web,
            metrics,
            audit,
        }
    }

    impl Setup {
        fn route(&self, path: &str) -> Arc<Route> {
            match self.policy.decide(&Method::POST, path, &self.web.id, "") {
                Decision::Allow(Some(r)) => r.clone(),
                other => panic!("{other:?}"),
            }
        }

        async fn verify(
            &self,
            req: Request<ProxyBody>,
        ) -> Result<(Request<ProxyBody>, Verified), Response<ProxyBody>> {
            self.verify_for(req, &Reason::Always).await
        }

        async fn verify_for(
            &self,
            req: Request<ProxyBody>,
            reason: &Reason,
        ) -> Result<(Request<ProxyBody>, Verified), Response<ProxyBody>> {
            let route = self.route(req.uri().path());
            self.stepup.verify(req, &self.conn, &route, reason).await
        }

        /// The audit records so far.
        fn audited(&self) -> Vec<serde_json::Value> {
            let (_, path) = self.audit.as_ref().expect("audit on");
            self.stepup.flush_audit();
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }

        /// A challenge, as the first (unsigned) request to `path` gets it.
        async fn challenge(&self, path: &str) -> Challenge {
            let resp = self
                .verify(request(path, b"", HeaderMap::new()))
                .await
                .unwrap_err();
            Challenge::from_headers(resp.headers()).unwrap().unwrap()
        }

        fn signer(&self) -> Signer {
            Signer::from_pkcs8_and_cert(&self.web.pkcs8, self.web.leaf()).unwrap()
        }

        /// The four step-up fields for a request to `path` with `body` and
        /// `headers`, signed as the outbound signs (over the request as it
        /// travels, step-up fields removed first), bound to `exporter`.
        fn sign_for(
            &self,
            ch: &Challenge,
            path: &str,
            body: &[u8],
            headers: HeaderMap,
            exporter: &[u8; 32],
        ) -> SignedHeaders {
            let (mut parts, _) = request(path, b"", headers).into_parts();
            strip_stepup_headers(&mut parts.headers);
            let view = RequestView::new(&parts.method, &parts.uri, &parts.headers);
            self.signer()
                .sign(ch, &view, body, exporter, unix_now())
                .unwrap()
        }

        fn signed(&self, ch: &Challenge, path: &str, body: &'static [u8]) -> Request<ProxyBody> {
            let signed = self.sign_for(ch, path, body, HeaderMap::new(), &EXPORTER);
            let mut headers = HeaderMap::new();
            signed.apply(&mut headers);
            request(path, body, headers)
        }

        fn verifications(&self, result: &str) -> f64 {
            metric(
                &self.metrics,
                &format!("keyproof_stepup_verifications_total{{result=\"{result}\"}}"),
            )
        }
    }

    /// A POST as an HTTP/2 caller's sidecar sends it: the authority in the
    /// URI, a JSON body.
    fn request(path: &str, body: &'static [u8], headers: HeaderMap) -> Request<ProxyBody> {
        let mut req = Request::post(format!("https://api.demo{path}"))
            .version(http::Version::HTTP_2)
            .header(header::CONTENT_TYPE, "application/json")
            .body(if body.is_empty() {
                ProxyBody::empty()
            } else {
                ProxyBody::from(Bytes::from_static(body))
            })
            .unwrap();
        req.headers_mut().extend(headers);
        req
    }

    async fn body_text(resp: Response<ProxyBody>) -> String {
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    fn www_authenticate(resp: &Response<ProxyBody>) -> &str {
        resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap()
    }

    #[test]
    fn only_refusals_a_well_behaved_caller_never_causes_are_held_against_it() {
        let held = |outcome: Outcome, expired_meanwhile: bool| {
            held_against_caller(&Refused {
                outcome,
                nonce_age_ms: None,
                expired_meanwhile,
            })
        };
        let benign: Vec<&str> = Outcome::ALL
            .into_iter()
            .filter(|o| !held(*o, false))
            .map(Outcome::as_str)
            .collect();
        assert_eq!(benign, ["ok", "missing", "bad_nonce", "expired"]);
        assert!(held(Outcome::Replay, false));
        // A nonce purged while its body was read is an expiry.
        assert!(!held(Outcome::Replay, true));
    }

    #[tokio::test]
    async fn a_request_without_proof_gets_a_challenge() {
        let s = setup(1024);
        let resp = s
            .verify(request(ROUTE, b"{}", HeaderMap::new()))
            .await
            .unwrap_err();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(is_stepup_challenge(resp.status(), resp.headers()));
        assert_eq!(www_authenticate(&resp), "StepUp error=\"stepup_required\"");
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
        let ch = Challenge::from_headers(resp.headers()).unwrap().unwrap();
        assert_eq!(ch.tag, "stepup-v1");
        assert_eq!(ch.keyid, s.signer().keyid());
        assert_eq!(ch.alg, s.signer().alg().name());
        // The request had a Content-Type, so it is among the components.
        assert!(
            ch.components.iter().any(|c| c == "content-type"),
            "{:?}",
            ch.components
        );
        assert!(body_text(resp)
            .await
            .contains("step-up required by route /admin/rotate (missing)"));
        assert_eq!(s.verifications("missing"), 1.0);
        assert_eq!(
            metric(
                &s.metrics,
                "keyproof_stepup_challenges_total{reason=\"always\",route=\"/admin/rotate\"}"
            ),
            1.0
        );
        assert_eq!(
            metric(&s.metrics, "keyproof_stepup_nonces_outstanding"),
            1.0
        );
    }

    #[tokio::test]
    async fn a_signed_body_beyond_the_held_budget_gets_503_and_its_nonce_is_withdrawn() {
        let s = setup(1024);
        let web = s.web.id.to_string();
        // This caller's share (a quarter of 64 MiB) is taken by bodies in
        // their check.
        let share = s.stepup.budget.take(&web, 16 << 20).expect("the share");
        let ch = s.challenge(ROUTE).await;
        let outstanding = || metric(&s.metrics, "keyproof_stepup_nonces_outstanding");
        assert_eq!(outstanding(), 1.0);
        let resp = s.verify(s.signed(&ch, ROUTE, b"{}")).await.unwrap_err();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            metric(&s.metrics, "keyproof_stepup_body_budget_full_total"),
            1.0
        );
        // Its nonce no longer counts against the caller's bound (a
        // caller's sidecar passes the 503 on and drops the nonce: kept, it
        // would hold a place until it expired).
        assert_eq!(outstanding(), 0.0);
        // Another caller is not held up by it; once the bodies are done, a
        // fresh proof goes through, and a bodiless request holds nothing.
        assert!(s
            .stepup
            .budget
            .take("spiffe://unit.keyproof.test/ns/x/sa/y", 1 << 20)
            .is_some());
        let ch = s.challenge(ROUTE).await;
        let (req, verified) = s.verify(s.signed(&ch, ROUTE, b"")).await.unwrap();
        assert_eq!(req.headers()[&STEP_UP_VERIFIED], "verified");
        drop(share);
        assert_eq!(
            s.stepup.budget.held(),
            0,
            "a bodiless request holds nothing"
        );
        let ch = s.challenge(ROUTE).await;
        let (req, checked) = s.verify(s.signed(&ch, ROUTE, b"{}")).await.unwrap();
        assert_eq!(req.headers()[&STEP_UP_VERIFIED], "verified");
        assert_eq!(s.stepup.budget.held(), 2, "a checked body holds its length");
        drop((verified, checked));
        assert_eq!(s.stepup.budget.held(), 0, "given back with the answer");
    }

    #[tokio::test]
    async fn a_body_not_read_whole_withdraws_its_nonce() {
        let s = setup(8);
        let ch = s.challenge(ROUTE).await;
        // No length declared, larger than max_body when read: 413 after
        // the head's check.
        let resp = s
            .verify(s.signed(&ch, ROUTE, b"{\"rotate\":true}"))
            .await
            .unwrap_err();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            metric(&s.metrics, "keyproof_stepup_nonces_outstanding"),
            0.0
        );
    }

    #[tokio::test]
    async fn a_signed_request_is_admitted_and_its_response_gets_the_next_nonce() {
        let s = setup(1024);
        let ch = s.challenge(ROUTE).await;
        let (req, verified) = s
            .verify(s.signed(&ch, ROUTE, b"{\"rotate\":1}"))
            .await
            .unwrap();
        assert_eq!(s.verifications("ok"), 1.0);
        // What the app gets: the body as sent, the verdict and its reason,
        // no proof fields.
        assert_eq!(req.headers()[&STEP_UP_VERIFIED], "verified");
        assert_eq!(req.headers()[&STEP_UP_REASON], "always");
        for h in [SIGNATURE, SIGNATURE_INPUT, STEPUP_BINDING, ACCEPT_SIGNATURE] {
            assert!(!req.headers().contains_key(&h), "{h} reached the app");
        }
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"rotate\":1}");

        let mut resp = text(StatusCode::OK, "rotated\n");
        s.stepup
            .on_response(&mut resp, &s.conn, &s.route(ROUTE), verified);
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
        let next = Challenge::from_headers(resp.headers()).unwrap().unwrap();
        assert_ne!(next.nonce, ch.nonce);
        // The next nonce signs the next request up front: no challenge.
        let (req, _) = s.verify(s.signed(&next, ROUTE, b"{}")).await.unwrap();
        assert_eq!(req.headers()[&STEP_UP_VERIFIED], "verified");
        assert_eq!(s.verifications("ok"), 2.0);
    }

    #[tokio::test]
    async fn a_replayed_nonce_is_refused_and_counted() {
        let s = setup(1024);
        let ch = s.challenge(ROUTE).await;
        let signed = s.sign_for(&ch, ROUTE, b"{}", HeaderMap::new(), &EXPORTER);
        let again = || {
            let mut headers = HeaderMap::new();
            signed.apply(&mut headers);
            request(ROUTE, b"{}", headers)
        };
        assert!(s.verify(again()).await.is_ok());
        let resp = s.verify(again()).await.unwrap_err();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(www_authenticate(&resp), "StepUp error=\"replay\"");
        // With a fresh nonce to try again.
        let fresh = Challenge::from_headers(resp.headers()).unwrap().unwrap();
        assert_ne!(fresh.nonce, ch.nonce);
        assert_eq!(s.verifications("replay"), 1.0);
        assert_eq!(s.verifications("ok"), 1.0);
    }

    #[tokio::test]
    async fn a_nonce_is_bound_to_its_route() {
        let s = setup(1024);
        let ch = s.challenge("/admin/keys").await;
        let resp = s.verify(s.signed(&ch, ROUTE, b"{}")).await.unwrap_err();
        assert_eq!(www_authenticate(&resp), "StepUp error=\"bad_nonce\"");
        assert_eq!(s.verifications("bad_nonce"), 1.0);
    }

    #[tokio::test]
    async fn a_signature_bound_to_another_connection_is_refused() {
        let s = setup(1024);
        let ch = s.challenge(ROUTE).await;
        let signed = s.sign_for(&ch, ROUTE, b"{}", HeaderMap::new(), &[8; 32]);
        let mut headers = HeaderMap::new();
        signed.apply(&mut headers);
        let resp = s.verify(request(ROUTE, b"{}", headers)).await.unwrap_err();
        assert_eq!(www_authenticate(&resp), "StepUp error=\"binding_mismatch\"");
        assert_eq!(s.verifications("binding_mismatch"), 1.0);
    }

    #[tokio::test]
    async fn a_body_other_than_the_signed_one_is_refused() {
        let s = setup(1024);
        let ch = s.challenge(ROUTE).await;
        let signed = s.sign_for(&ch, ROUTE, b"{\"a\":1}", HeaderMap::new(), &EXPORTER);
        let mut headers = HeaderMap::new();
        signed.apply(&mut headers);
        let resp = s
            .verify(request(ROUTE, b"{\"a\":2}", headers))
            .await
            .unwrap_err();
        assert_eq!(www_authenticate(&resp), "StepUp error=\"digest_mismatch\"");
    }

    #[tokio::test]
    async fn a_callers_own_signature_under_another_label_is_no_proof_and_not_held_against_it() {
        let s = setup(1024);
        let mut headers = HeaderMap::new();
        headers.insert(
            "signature-input",
            HeaderValue::from_static("app=(\"@method\");created=1"),
        );
        headers.insert("signature", HeaderValue::from_static("app=:AAAA:"));
        let resp = s.verify(request(ROUTE, b"{}", headers)).await.unwrap_err();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().get("accept-signature").is_some());
        assert_eq!(www_authenticate(&resp), "StepUp error=\"stepup_required\"");
    }

    #[tokio::test]
    async fn an_unsigned_request_declaring_a_body_over_max_body_gets_413_not_a_challenge() {
        let s = setup(16);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(17));
        let resp = s
            .verify(request(ROUTE, b"0123456789abcdefg", headers))
            .await
            .unwrap_err();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(resp.headers().get("accept-signature").is_none());
        assert_eq!(s.stepup.verifier.outstanding(), 0, "a nonce was issued");
    }

    #[tokio::test]
    async fn a_declared_body_over_max_body_gets_413_and_leaves_the_nonce_unused() {
        let s = setup(16);
        let ch = s.challenge(ROUTE).await;
        let big: &'static [u8] = b"{\"x\":\"0123456789abcdef\"}";
        assert!(big.len() > 16);
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from(big.len()));
        let signed = s.sign_for(&ch, ROUTE, big, declared.clone(), &EXPORTER);
        let mut headers = declared;
        signed.apply(&mut headers);
        let resp = s.verify(request(ROUTE, big, headers)).await.unwrap_err();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
        assert!(body_text(resp)
            .await
            .contains("larger than 16 bytes (inbound.stepup.max_body)"));
        // Not a verification: the same nonce still signs a small request.
        for r in Outcome::ALL {
            assert_eq!(
                s.verifications(r.as_str()),
                f64::from(r == Outcome::Missing),
                "{r}"
            );
        }
        assert!(s.verify(s.signed(&ch, ROUTE, b"{}")).await.is_ok());
    }

    #[tokio::test]
    async fn a_body_at_max_body_is_admitted() {
        let s = setup(16);
        let ch = s.challenge(ROUTE).await;
        let exact: &'static [u8] = b"{\"x\":\"01234567\"}";
        assert_eq!(exact.len(), 16);
        assert!(s.verify(s.signed(&ch, ROUTE, exact)).await.is_ok());
    }

    #[tokio::test]
    async fn a_streamed_body_over_max_body_gets_413() {
        let s = setup(16);
        let ch = s.challenge(ROUTE).await;
        // HTTP/1.1, chunked: no length known until the body is read.
        let body = b"{\"x\":\"0123456789abcdef\"}";
        let mut head = HeaderMap::new();
        head.insert(header::HOST, HeaderValue::from_static("api.demo"));
        let (mut parts, _) = Request::post(ROUTE)
            .header(header::CONTENT_TYPE, "application/json")
            .body(())
            .unwrap()
            .into_parts();
        parts.headers.extend(head);
        let view = RequestView::from_parts(&parts);
        let signed = s
            .signer()
            .sign(&ch, &view, body, &EXPORTER, unix_now())
            .unwrap();
        signed.apply(&mut parts.headers);
        let mut raw = format!("POST {ROUTE} HTTP/1.1\r\ntransfer-encoding: chunked\r\n");
        for (name, value) in &parts.headers {
            raw.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        }
        raw.push_str("\r\n");
        for chunk in body.chunks(8) {
            raw.push_str(&format!(
                "{:x}\r\n{}\r\n",
                chunk.len(),
                std::str::from_utf8(chunk).unwrap()
            ));
        }
        raw.push_str("0\r\n\r\n");
        let (req, _client) = hyper_request(raw.as_bytes()).await;
        let resp = s.verify(req.map(ProxyBody::Stream)).await.unwrap_err();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(s.verifications("ok"), 0.0);
    }

    #[tokio::test]
    async fn the_reason_reaches_the_app_and_labels_the_challenge() {
        let s = setup(1024);
        let burst = Reason::Rule(Arc::from("burst"));
        let resp = s
            .verify_for(request(ROUTE, b"{}", HeaderMap::new()), &burst)
            .await
            .unwrap_err();
        assert!(body_text(resp).await.contains("(reason: burst)"));
        let ch = s.challenge(ROUTE).await;
        let (req, _) = s
            .verify_for(s.signed(&ch, ROUTE, b"{}"), &burst)
            .await
            .unwrap();
        assert_eq!(req.headers()[&STEP_UP_VERIFIED], "verified");
        assert_eq!(req.headers()[&STEP_UP_REASON], "burst");
        let challenges = |reason: &str| {
            metric(
                &s.metrics,
                &format!(
                    "keyproof_stepup_challenges_total{{reason=\"{reason}\",route=\"/admin/rotate\"}}"
                ),
            )
        };
        assert_eq!((challenges("burst"), challenges("always")), (1.0, 1.0));
    }

    #[tokio::test]
    async fn each_decision_and_verification_is_audited_without_secrets() {
        let s = setup_with(1024, true);
        let ch = s.challenge(ROUTE).await;
        let signed = s.sign_for(&ch, ROUTE, b"{}", HeaderMap::new(), &EXPORTER);
        let again = || {
            let mut headers = HeaderMap::new();
            signed.apply(&mut headers);
            request(ROUTE, b"{}", headers)
        };
        assert!(s.verify_for(again(), &Reason::App).await.is_ok());
        assert!(s.verify_for(again(), &Reason::App).await.is_err());
        let got = s.audited();
        let results: Vec<(&str, &str)> = got
            .iter()
            .map(|l| (l["reason"].as_str().unwrap(), l["result"].as_str().unwrap()))
            .collect();
        assert_eq!(
            results,
            [("always", "challenged"), ("app", "ok"), ("app", "replay")]
        );
        for l in &got {
            assert_eq!(l["peer"], s.web.id.as_str());
            assert_eq!(l["serial"], s.web.peer().serial.as_str());
            assert_eq!(l["route"], ROUTE);
        }
        // The nonce's age, for a verification of an outstanding nonce,
        // answered at once; a replay's nonce is gone, and with it the time
        // of issue to the millisecond: no age rather than a wrong one.
        assert!(got[0].get("nonce_age_ms").is_none());
        let age = got[1]["nonce_age_ms"].as_u64().expect("nonce_age_ms");
        assert!(age < 5_000, "{age}");
        assert!(got[2].get("nonce_age_ms").is_none(), "{:?}", got[2]);
        // Never the nonce or the signature.
        let (_, path) = s.audit.as_ref().unwrap();
        let raw = std::fs::read_to_string(path).unwrap();
        assert!(!raw.contains(&ch.nonce), "{raw}");
        let mut h = HeaderMap::new();
        signed.apply(&mut h);
        let sig = h[SIGNATURE].to_str().unwrap();
        let sig = sig.trim_start_matches("stepup=:").trim_end_matches(':');
        assert!(!raw.contains(sig), "{raw}");
    }

    #[tokio::test]
    async fn an_app_that_asked_gets_its_caller_challenged_from_our_table() {
        let s = setup_with(16, true);
        let route = s.route(ROUTE);
        let resp = s.stepup.app_asked(&s.conn, &route, true);
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(www_authenticate(&resp), "StepUp error=\"stepup_required\"");
        let ch = Challenge::from_headers(resp.headers()).unwrap().unwrap();
        assert!(
            ch.components.iter().any(|c| c == "content-type"),
            "{:?}",
            ch.components
        );
        // A nonce of this verifier, for this route: it signs the resend.
        let (req, _) = s
            .verify_for(s.signed(&ch, ROUTE, b"{}"), &Reason::App)
            .await
            .unwrap();
        assert_eq!(req.headers()[&STEP_UP_REASON], "app");
        assert_eq!(
            metric(
                &s.metrics,
                "keyproof_stepup_challenges_total{reason=\"app\",route=\"/admin/rotate\"}"
            ),
            1.0
        );
        assert_eq!(s.verifications("missing"), 1.0);
        let resp = s.stepup.app_asked_too_large(&s.conn, &route);
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!resp.headers().contains_key(header::WWW_AUTHENTICATE));
        let results: Vec<String> = s
            .audited()
            .iter()
            .map(|l| format!("{} {}", l["reason"], l["result"]))
            .collect();
        assert_eq!(
            results,
            [
                "\"app\" \"challenged\"",
                "\"app\" \"ok\"",
                "\"app\" \"body_too_large\""
            ]
        );
    }

    #[test]
    fn challenge_counters_start_for_each_route_and_reason_it_can_challenge_for() {
        let rule = |name: &str, action| RiskRuleConfig {
            name: name.into(),
            condition: RiskCondition::NewPeer(Duration::from_secs(60)),
            action,
        };
        let route = |prefix: &str, step_up, risk: &[&str]| RouteConfig {
            path_prefix: prefix.into(),
            methods: vec![],
            allow: vec![],
            step_up,
            risk: risk.iter().map(|r| r.to_string()).collect(),
        };
        let policy = PolicyConfig {
            routes: vec![
                route("/plain", StepUpMode::Never, &[]),
                route("/admin", StepUpMode::Always, &[]),
                route("/pay", StepUpMode::Risk, &["new-caller", "lockout"]),
            ],
            risk_rules: vec![
                rule("new-caller", RiskAction::Challenge),
                rule("lockout", RiskAction::Deny),
            ],
            deny: vec![],
            tcp: vec![],
        };
        assert_eq!(
            challenge_reasons(&policy),
            [
                ("/admin", vec!["always"]),
                ("/pay", vec!["app", "new-caller"])
            ]
        );
    }
}
