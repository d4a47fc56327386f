//! `keyproof-ca`: SPIFFE identities, the X.509-SVID rules, and the CA that
//! creates a trust domain and issues, renews and rotates its certificates.
//!
//! The proxy depends on this crate for [`spiffe`], [`svid`] and [`verify`], so
//! both binaries share one definition of what a valid identity is.

pub mod bundle;
pub mod ca;
pub mod check;
pub mod client;
pub mod csr;
pub mod duration;
pub mod fsutil;
pub mod inspect;
pub mod issue;
pub mod k8s;
pub mod keys;
pub mod ledger;
pub mod renewer;
pub mod rotate;
pub mod serve;
pub mod sigcache;
pub mod spiffe;
pub mod svid;
pub mod tls;
pub mod token;
pub mod verify;

pub use ca::{Ca, CaError};
pub use spiffe::{IdPattern, SpiffeId, SpiffeIdError, TrustDomain};
pub use verify::{SvidVerifier, TrustBundle, Usage, VerifiedSvid, VerifyError};
