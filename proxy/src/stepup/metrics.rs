//! The step-up metrics, registered once per proxy and resolved to label
//! children up front so that counting is one atomic add.
//!
//! Inbound: `keyproof_stepup_challenges_total{route}`,
//! `keyproof_stepup_verifications_total{result}` (every design-doc result,
//! pre-initialised to 0 so that `increase()` works from the first refusal),
//! `keyproof_stepup_nonces_outstanding`, `keyproof_stepup_nonce_table_full_total`
//! and `keyproof_stepup_nonce_capacity` (the alert rules divide by it).
//! Outbound: `keyproof_stepup_signatures_total{result}`.

use std::collections::HashMap;

use keyproof_stepup::Outcome;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use crate::metrics::Metrics;

/// Inbound (verifier) metrics.
#[derive(Clone)]
pub struct VerifierMetrics {
    challenges: HashMap<String, IntCounter>,
    challenges_vec: IntCounterVec,
    verifications: [IntCounter; Outcome::ALL.len()],
    /// `keyproof_stepup_nonces_outstanding`.
    pub outstanding: IntGauge,
    /// `keyproof_stepup_nonce_table_full_total`.
    pub table_full: IntCounter,
}

impl VerifierMetrics {
    /// Registers the inbound step-up metrics; `routes` are the step-up
    /// routes' ids (path prefixes), whose challenge counters start at 0.
    pub fn register<'a>(
        metrics: &Metrics,
        routes: impl IntoIterator<Item = &'a str>,
        capacity: usize,
    ) -> Result<VerifierMetrics, prometheus::Error> {
        let challenges_vec = IntCounterVec::new(
            Opts::new(
                "keyproof_stepup_challenges_total",
                "Step-up challenges (401 with a fresh nonce) issued, by route path_prefix.",
            ),
            &["route"],
        )?;
        let verifications_vec = IntCounterVec::new(
            Opts::new(
                "keyproof_stepup_verifications_total",
                "Step-up verifications on privileged routes, by result (stepup-v1 verification order).",
            ),
            &["result"],
        )?;
        let outstanding = IntGauge::new(
            "keyproof_stepup_nonces_outstanding",
            "Step-up nonces issued and not yet used (expired ones until purged).",
        )?;
        let table_full = IntCounter::new(
            "keyproof_stepup_nonce_table_full_total",
            "Nonces not issued because the table was full (globally: 503, per peer: 429).",
        )?;
        let capacity_gauge = IntGauge::new(
            "keyproof_stepup_nonce_capacity",
            "Bound on outstanding step-up nonces ([inbound.stepup] max_outstanding).",
        )?;
        capacity_gauge.set(i64::try_from(capacity).unwrap_or(i64::MAX));
        metrics.register(Box::new(challenges_vec.clone()))?;
        metrics.register(Box::new(verifications_vec.clone()))?;
        metrics.register(Box::new(outstanding.clone()))?;
        metrics.register(Box::new(table_full.clone()))?;
        metrics.register(Box::new(capacity_gauge))?;
        let challenges = routes
            .into_iter()
            .map(|r| (r.to_owned(), challenges_vec.with_label_values(&[r])))
            .collect();
        Ok(VerifierMetrics {
            challenges,
            challenges_vec,
            verifications: Outcome::ALL.map(|o| verifications_vec.with_label_values(&[o.as_str()])),
            outstanding,
            table_full,
        })
    }

    /// Counts one verification outcome.
    pub fn verification(&self, outcome: Outcome) {
        // `ALL` lists every variant, so the position always exists.
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.verifications[i].inc();
        }
    }

    /// Counts one challenge on `route`.
    pub fn challenge(&self, route: &str) {
        match self.challenges.get(route) {
            Some(c) => c.inc(),
            // Only configured routes reach here; resolving late is a fallback.
            None => self.challenges_vec.with_label_values(&[route]).inc(),
        }
    }
}

/// Every `result` of `keyproof_stepup_signatures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignResult {
    /// A request was signed (up front with a kept nonce, or for a challenge).
    Ok,
    /// The challenge named another key; not signed.
    KeyidMismatch,
    /// The challenge's `alg` does not fit our key; not signed.
    AlgMismatch,
    /// The challenge's tag is not `stepup-v1`; not signed.
    WrongTag,
    /// The challenge asks for components stepup-v1 does not sign; not signed.
    UnexpectedComponents,
    /// `Accept-Signature` missing or unreadable.
    BadChallenge,
    /// The body to replay is larger than `[outbound.stepup] max_body`.
    BodyTooLarge,
    /// The workload key cannot sign (unsupported type or format).
    NoKey,
    /// The upstream refused a request we signed.
    Rejected,
    /// Signing failed otherwise (no authority, encoding, crypto).
    Error,
}

impl SignResult {
    /// Every result, for pre-initialisation.
    pub const ALL: [SignResult; 10] = [
        SignResult::Ok,
        SignResult::KeyidMismatch,
        SignResult::AlgMismatch,
        SignResult::WrongTag,
        SignResult::UnexpectedComponents,
        SignResult::BadChallenge,
        SignResult::BodyTooLarge,
        SignResult::NoKey,
        SignResult::Rejected,
        SignResult::Error,
    ];

    /// The label value (also the `x-keyproof-step-up-error` reason).
    pub const fn as_str(self) -> &'static str {
        match self {
            SignResult::Ok => "ok",
            SignResult::KeyidMismatch => "keyid_mismatch",
            SignResult::AlgMismatch => "alg_mismatch",
            SignResult::WrongTag => "wrong_tag",
            SignResult::UnexpectedComponents => "unexpected_components",
            SignResult::BadChallenge => "bad_challenge",
            SignResult::BodyTooLarge => "body_too_large",
            SignResult::NoKey => "no_key",
            SignResult::Rejected => "rejected",
            SignResult::Error => "error",
        }
    }

    /// From the library's refusal.
    pub fn from_refusal(r: keyproof_stepup::SignRefusal) -> SignResult {
        use keyproof_stepup::SignRefusal as R;
        match r {
            R::KeyidMismatch => SignResult::KeyidMismatch,
            R::AlgMismatch => SignResult::AlgMismatch,
            R::WrongTag => SignResult::WrongTag,
            R::UnexpectedComponents => SignResult::UnexpectedComponents,
        }
    }
}

/// Outbound (signer) metrics.
#[derive(Clone)]
pub struct SignerMetrics {
    results: [IntCounter; SignResult::ALL.len()],
}

impl SignerMetrics {
    /// Registers `keyproof_stepup_signatures_total`.
    pub fn register(metrics: &Metrics) -> Result<SignerMetrics, prometheus::Error> {
        let vec = IntCounterVec::new(
            Opts::new(
                "keyproof_stepup_signatures_total",
                "Outbound step-up signatures, by result (ok, or why a challenge was not answered).",
            ),
            &["result"],
        )?;
        metrics.register(Box::new(vec.clone()))?;
        Ok(SignerMetrics {
            results: SignResult::ALL.map(|r| vec.with_label_values(&[r.as_str()])),
        })
    }

    /// Counts one result.
    pub fn count(&self, r: SignResult) {
        if let Some(i) = SignResult::ALL.iter().position(|x| *x == r) {
            self.results[i].inc();
        }
    }
}
