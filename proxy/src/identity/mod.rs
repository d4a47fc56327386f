//! The workload's own identity: its certificate chain, key and trust bundle,
//! and how they are kept current.
//!
//! * `store.rs`: the identity in use, checked as a whole before it is
//!   installed, and the rustls configurations and verifiers that read it per
//!   handshake (so that a swap needs no rebuild).
//! * `reload.rs` with `watch.rs`: `[identity.files]`, re-read when the files
//!   change (Kubernetes Secret volumes included).
//! * `error.rs`: why the identity could not be loaded, naming the key.
//! * `key.rs`: the workload key, in a file, in memory or in a PKCS#11
//!   token, and the probe that notices a token going away and coming back.
//! * `renew.rs`: `[identity.ca]`, bootstrapped and renewed from
//!   `keyproof-ca serve`.

pub mod error;
pub mod key;
pub mod reload;
pub mod renew;
pub mod store;
pub mod watch;
