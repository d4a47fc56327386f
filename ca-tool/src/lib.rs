//! `keyproof-ca`: the certificate authority that creates a trust domain and
//! issues, renews and rotates its X.509-SVIDs, the renewal server, and the
//! client and renewer workloads use to talk to it.
//!
//! What an identity is (SPIFFE IDs, the X.509-SVID rules, the chain verifier,
//! key types) lives in `keyproof-identity`, which the proxy shares; this
//! crate holds only what the CA and its protocol add.

pub mod admin;
pub mod attest;
pub mod bundle;
pub mod bundle_publish;
pub mod ca;
pub mod cakey;
pub mod check;
pub mod client;
pub mod conns;
pub mod csr;
pub mod dirlock;
pub mod file_renewer;
pub mod fsutil;
pub mod inspect;
pub mod issue;
pub mod journal;
pub mod jwks_sync;
pub mod k8s;
pub mod kube;
pub mod ledger;
pub mod metrics;
pub mod migrated;
pub mod pin_memory;
pub mod renewer;
pub mod revoke;
pub mod rotate;
pub mod serve;
pub mod store;
pub mod token;

pub use ca::{Ca, CaError};
