//! `keyproof-identity`: what a valid keyproof identity is, and how a TLS
//! handshake proves one.
//!
//! * [`spiffe`]: SPIFFE IDs, trust domains and the ID patterns policies match.
//! * [`svid`]: the X.509-SVID rules, one error per rule.
//! * [`verify`]: chain validation against a trust bundle plus those rules.
//! * [`tls`]: the rustls provider, key-exchange groups, server configuration
//!   and the certificate verifiers that run [`verify`] in the handshake.
//! * [`sigcache`]: the memo of certificate-signature verifications.
//! * [`keys`]: the key types an SVID may hold, PEM helpers and fingerprints.
//! * [`pkcs11`]: keys held in a PKCS#11 token, signing without being read.
//! * [`duration`]: human durations (`24h`, `90d`) for flags and configuration.
//! * [`filemode`]: the permission checks of the files that decide who a
//!   workload is and whom it trusts.
//!
//! The CA (`keyproof-ca`), the proxy and the step-up protocol all take these
//! definitions from here, so every binary agrees on what it issues, accepts
//! and signs with.

pub mod duration;
pub mod filemode;
pub mod keys;
pub mod pkcs11;
pub mod private_memory;
pub mod sigcache;
pub mod spiffe;
pub mod stdout;
pub mod svid;
pub mod tls;
pub mod verify;

pub use spiffe::{IdPattern, SpiffeId, SpiffeIdError, TrustDomain};
pub use verify::{SvidVerifier, TrustBundle, Usage, VerifiedSvid, VerifyError};
