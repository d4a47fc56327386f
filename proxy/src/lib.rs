//! `keyproof-proxy`: a mutual-TLS sidecar. Inbound it terminates TLS 1.3
//! with client certificates verified as X.509-SVIDs and authorizes callers by
//! route; outbound it originates mutual TLS for the local app, checking the
//! server's SPIFFE ID.
//!
//! # A request's way through the modules
//!
//! ```text
//!  caller's sidecar ──mTLS──▶ inbound/mod.rs   Inbound::connection: TLS handshake, the caller's SVID
//!                             inbound/conn.rs  InboundConn: caller id, channel binding, XFCC value
//!                             http/server.rs   serve: HTTP/1.1 or h2 on the connection, idle and drain
//!                             inbound/mod.rs   Inbound::route: normalize the path, check header fields
//!                             http/path.rs        normalize_uri
//!                             http/owned.rs       check_request, strip_request
//!                             inbound/policy.rs   Policy::decide: first matching route, its allow list
//!                             inbound/challenge.rs InboundStepUp::check: verify the signature, or challenge
//!                             http/app_client.rs  H1Pool::request / H2cConn::request ──▶ local app
//!
//!  local app ──plaintext──▶ outbound/mod.rs    Outbound::connection (h1 via http/h1_server.rs, or h2)
//!                             outbound/mod.rs    Outbound::forward: normalize, check fields, pick upstream
//!                             outbound/upstream.rs MeshLink: the upstream's one h2 connection (dial, mTLS)
//!                             outbound/signer.rs OutboundStepUp: sign up front, or answer a challenge
//!                             http/mesh_client.rs MeshSender: the HTTP/2 stream ──mTLS──▶ peer's inbound
//! ```
//!
//! Around the data path: `identity/` holds the workload's certificate and key
//! ([`identity::store`]) and keeps them current from files
//! ([`identity::reload`], [`identity::watch`]) or from the CA
//! ([`identity::renew`]); `listener.rs` binds, accepts and tracks
//! connections for drain; `admin.rs` serves `/ready`, `/metrics` and
//! `/identity`; `metrics.rs` defines every metric and its labels;
//! `config.rs` parses and validates the TOML; `run.rs` starts and stops the
//! process.
//!
//! Dependencies point one way: `http/` knows nothing of `inbound/`,
//! `outbound/` or `identity/`; `inbound/` and `outbound/` never import each
//! other; `metrics.rs`, `config.rs` and `error.rs` import no other part of
//! the proxy but `http/`'s leaf modules. `tests/layout.rs` checks that no
//! two modules import each other, directly or through others.

pub mod admin;
pub mod config;
pub mod error;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod quickstart;
pub mod run;

pub use config::Config;
pub use run::{
    check_trust_domain_name, check_trust_domains, init_logging, init_logging_with_default, run,
    runtime, shutdown_signal, start, Running, StartError,
};
