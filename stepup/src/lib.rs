//! `stepup-v1`: the signed-nonce proof of possession for privileged routes.
//!
//! A profile of HTTP Message Signatures (RFC 9421) with a server-issued,
//! single-use nonce and a TLS channel binding (RFC 9266 `tls-exporter`). The
//! wire format is fixed in `shared/design/step-up.md`; this crate implements it
//! so that the proxy never has to know RFC 9421:
//!
//! * inbound, a [`Verifier`] issues challenges ([`Verifier::challenge`]) and
//!   checks signed requests in the design's order, cheap checks first: steps
//!   1-7 from the headers alone ([`Verifier::begin`]), steps 8-10 once the body
//!   is buffered ([`Pending::finish`]). Every verification ends in one
//!   [`Outcome`], whose [`Outcome::as_str`] is the metric label.
//! * outbound, a [`Signer`] answers a [`Challenge`] with the four headers of a
//!   signed request ([`Signer::sign`]).
//!
//! Functions that depend on time take `now` (seconds since the Unix epoch)
//! explicitly so tests control the clock; [`unix_now`] gives the real one.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alg;
pub mod base;
pub mod config;
pub mod digest;
pub mod nonce;
pub mod outcome;
pub mod sign;
pub mod verify;

mod der;
mod sf;

pub use alg::{keyid_for_spki, Alg, KeyError, PeerKey};
pub use base::{Component, RequestView};
pub use config::StepUpConfig;
pub use nonce::{IssueError, NonceKey, NonceTable};
pub use outcome::Outcome;
pub use sign::{
    is_stepup_challenge, Challenge, ChallengeError, SignError, SignRefusal, SignedHeaders, Signer,
};
pub use verify::{
    is_stepup_attempt, strip_stepup_headers, ChallengeHeaders, Peer, Pending, Verifier,
};

/// The `tag` parameter every stepup-v1 signature carries.
pub const TAG: &str = "stepup-v1";
/// The signature label (dictionary key in `Signature-Input`, `Signature` and
/// `Accept-Signature`).
pub const LABEL: &str = "stepup";
/// The TLS exporter label of the channel binding (RFC 9266), empty context,
/// 32 bytes: defined with the TLS configurations in `keyproof-identity`
/// (`tls::channel_binding` derives it), named here as part of the wire
/// format. The proxy derives it once per connection.
pub const EXPORTER_LABEL: &[u8] = keyproof_identity::tls::CHANNEL_BINDING_LABEL;
/// Length of the channel binding value in bytes.
pub const BINDING_LEN: usize = 32;

/// Header names used by stepup-v1, lower-case as `http` wants them.
pub mod headers {
    use http::header::HeaderName;

    /// `Signature-Input` (RFC 9421 §4.1).
    pub const SIGNATURE_INPUT: HeaderName = HeaderName::from_static("signature-input");
    /// `Signature` (RFC 9421 §4.2).
    pub const SIGNATURE: HeaderName = HeaderName::from_static("signature");
    /// `Accept-Signature` (RFC 9421 §5.1).
    pub const ACCEPT_SIGNATURE: HeaderName = HeaderName::from_static("accept-signature");
    /// `Content-Digest` (RFC 9530).
    pub const CONTENT_DIGEST: HeaderName = HeaderName::from_static("content-digest");
    /// `Stepup-Binding`: the connection's TLS exporter as a byte sequence.
    pub const STEPUP_BINDING: HeaderName = HeaderName::from_static("stepup-binding");
}

/// Seconds since the Unix epoch from the system clock (0 if the clock is
/// before 1970, which then fails every freshness check rather than panicking).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    /// The proxy holds these across `.await` points and shares them between
    /// tasks: they must stay `Send`/`Sync`.
    #[test]
    fn api_types_are_thread_safe() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<crate::Verifier>();
        send_sync::<crate::Peer>();
        send_sync::<crate::Signer>();
        send_sync::<crate::Challenge>();
        send::<crate::Pending<'static>>();
        send::<crate::SignedHeaders>();
        send::<crate::ChallengeHeaders>();
    }
}
