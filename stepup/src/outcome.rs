//! The result of one verification: exactly the `result` label values of
//! `keyproof_stepup_verifications_total` in the design doc.

use std::fmt;

/// Outcome of verifying one request. Each failure names the first check of
/// the design's verification order (§4) that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// All ten checks passed; the nonce has been consumed.
    Ok,
    /// No step-up signature at all (neither `Signature-Input` nor `Signature`).
    Missing,
    /// A header is absent, oversized or does not parse, or the signature
    /// parameters / component list are not exactly stepup-v1.
    Malformed,
    /// `alg` is not the algorithm of the peer certificate's key.
    BadAlg,
    /// `keyid` is not the SHA-256 of this connection's peer SPKI.
    KeyidMismatch,
    /// The nonce is not one this process issued for this peer and route.
    BadNonce,
    /// The nonce has expired, or `created` is outside the clock skew.
    Expired,
    /// `Stepup-Binding` is not this connection's TLS exporter.
    BindingMismatch,
    /// `Content-Digest` does not match the body.
    DigestMismatch,
    /// The signature does not verify with the peer's public key.
    BadSignature,
    /// The nonce was genuine but already used (or never stored).
    Replay,
}

impl Outcome {
    /// Every outcome, in the design doc's order (for pre-registering metrics).
    pub const ALL: [Outcome; 11] = [
        Outcome::Ok,
        Outcome::Missing,
        Outcome::Malformed,
        Outcome::BadAlg,
        Outcome::KeyidMismatch,
        Outcome::BadNonce,
        Outcome::Expired,
        Outcome::BindingMismatch,
        Outcome::DigestMismatch,
        Outcome::BadSignature,
        Outcome::Replay,
    ];

    /// The metric label / `WWW-Authenticate` error value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Missing => "missing",
            Outcome::Malformed => "malformed",
            Outcome::BadAlg => "bad_alg",
            Outcome::KeyidMismatch => "keyid_mismatch",
            Outcome::BadNonce => "bad_nonce",
            Outcome::Expired => "expired",
            Outcome::BindingMismatch => "binding_mismatch",
            Outcome::DigestMismatch => "digest_mismatch",
            Outcome::BadSignature => "bad_signature",
            Outcome::Replay => "replay",
        }
    }

    /// True only for [`Outcome::Ok`].
    pub const fn is_ok(self) -> bool {
        matches!(self, Outcome::Ok)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_design_docs() {
        let names: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            names,
            [
                "ok",
                "missing",
                "malformed",
                "bad_alg",
                "keyid_mismatch",
                "bad_nonce",
                "expired",
                "binding_mismatch",
                "digest_mismatch",
                "bad_signature",
                "replay"
            ]
        );
    }
}
