//! `keyproof-proxy`: a mutual-TLS sidecar. Inbound it terminates TLS 1.3
//! with client certificates verified as X.509-SVIDs and authorizes callers by
//! route; outbound it originates mutual TLS for the local app, checking the
//! server's SPIFFE ID.
//!
//! # A request's way through the modules
//!
//! ```text
//! caller's sidecar ══ mutual TLS ══▶
//!   inbound/mod.rs       Inbound::connection   TLS handshake; the caller's SVID checked
//!   inbound/conn.rs      InboundConn::new      caller id, channel binding, XFCC value
//!   http/server.rs       serve                 HTTP/1.1 or h2 on the connection; idle, drain
//!   inbound/mod.rs       Inbound::admit        per request, in this order:
//!     http/owned.rs        check_request         header rules (400/431)
//!     http/path.rs         normalize_uri         one canonical path, or 400
//!     inbound/policy.rs    Policy::decide        the deny list (SPIFFE ID or certificate serial),
//!                                                then the first matching route: is the caller
//!                                                allowed? (a 403 is a failure of the caller)
//!     http/owned.rs        strip_request,        sidecar-owned and hop-by-hop fields removed,
//!                          strip_hop_by_hop      XFCC set to the verified caller
//!   inbound/mod.rs       Inbound::stepped_up   on step-up routes only; the step-up decision:
//!     inbound/risk.rs      RouteRisk::evaluate   `risk` routes: a deny rule refuses (403), a
//!                                                challenge rule demands a proof (its name is
//!                                                the reason), or the request passes
//!     inbound/challenge.rs InboundStepUp::verify `always` routes, a rule that fired, or a
//!                                                presigned request: proof checked and its nonce
//!                                                consumed (keyproof_stepup::Pending::finish), or
//!                                                a challenge with a fresh nonce; audited
//!                                                (inbound/audit.rs)
//!   inbound/mod.rs       Inbound::unverified   `risk` route, nothing fired, no proof: to the app
//!                                                with its body counted (inbound/counted.rs); if
//!                                                the app answers `x-keyproof-step-up: required`,
//!                                                the caller is challenged (or 413)
//!   inbound/in_flight.rs RouteGate             requests admitted without a proof: their
//!                                                frames, both ways, decided on again after a
//!                                                policy change
//!   inbound/mod.rs       Inbound::forward      to the app (verified requests with
//!                                                `x-keyproof-step-up: verified` and the reason);
//!                                                an app asking where no proof can follow: 502;
//!                                                InboundStepUp::on_response puts the next nonce
//!                                                on the answer (`always`, or the app asked)
//!   http/app_client.rs   H1Pool::request       ──▶ the local app (H2cPool for gRPC apps)
//!
//! local app ── plaintext ──▶
//!   outbound/mod.rs      Outbound::connection  h2 prior knowledge, or http/h1_server.rs
//!   outbound/mod.rs      Outbound::forward     path, header rules, the upstream for the host
//!   outbound/upstream.rs MeshLink::sender      the upstream's one h2 connection (dial, mTLS)
//!   outbound/signer.rs   OutboundStepUp        sign up front with a kept nonce, or answer
//!                                              a challenge and resend
//!   http/mesh_client.rs  MeshSender::start     the HTTP/2 stream ══▶ the peer's inbound
//! ```
//!
//! Besides requests, the mesh carries two kinds of tunnel, each an HTTP/2
//! `CONNECT` stream: opaque TCP (`outbound/transparent.rs` ->
//! `inbound/tunnel.rs`, authorized by port) and a protocol switch such as
//! WebSocket (`outbound/upgrade.rs` -> `inbound/upgrade.rs`, an extended
//! `CONNECT` that `Inbound::admit` decides on as the `GET` it stands for).
//! An app's own `CONNECT` to the outbound (a WebSocket client behind
//! `HTTP_PROXY`) is no tunnel to the peer: `outbound/connect.rs` serves the
//! HTTP inside it as if sent to the listener.
//!
//! Around the data path: `identity/` holds the workload's certificate and key
//! ([`identity::store`]) and keeps them current from files
//! ([`identity::reload`], [`identity::watch`]) or from the CA
//! ([`identity::renew`]); `listener.rs` binds, accepts and tracks
//! connections for drain; `admin.rs` serves `/ready`, `/metrics` and
//! `/identity`; `metrics.rs` defines every metric and its labels;
//! `config.rs` parses and validates the TOML (`files.rs` reads it and every
//! other file an operator names: regular files of bounded size only);
//! `run.rs` starts and stops the
//! process and watches `[inbound] policy_file` and `[outbound]
//! upstreams_file` with `watched.rs` (`watch_policy`: a valid change
//! replaces the inbound's policy whole, `Inbound::replace_policy`; the risk
//! table in `inbound/risk.rs` outlives it).
//!
//! Dependencies point one way: `http/` knows nothing of `inbound/`,
//! `outbound/` or `identity/`; `inbound/` and `outbound/` never import each
//! other; `metrics.rs`, `config.rs` and `error.rs` import no other part of
//! the proxy but `http/`'s leaf modules. `tests/layout.rs` checks that no
//! two modules import each other, directly or through others, and that
//! these layers hold.

pub mod admin;
pub mod config;
pub mod error;
pub mod files;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod original_dst;
pub mod outbound;
pub mod quickstart;
pub mod redirect;
pub mod run;
#[cfg(test)]
pub(crate) mod testing;
pub mod watched;

pub use config::Config;
pub use run::{
    check_trust_domain_name, check_trust_domains, init_logging, init_logging_with_default, run,
    runtime, shutdown_signal, start, Running, StartError,
};
