//! Verifier settings (`[inbound.stepup]`), with the design document's defaults.

use std::time::Duration;

/// Settings of a [`crate::Verifier`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUpConfig {
    /// Lifetime of an issued nonce (default 30 s).
    pub nonce_ttl: Duration,
    /// Accepted distance between `created` and the verifier's clock (default 60 s).
    pub max_clock_skew: Duration,
    /// Largest body buffered to check `Content-Digest` (default 1 MiB). The
    /// proxy enforces it while reading (413 beyond); the verifier only reports it.
    pub max_body: usize,
    /// Bound on issued-and-unused nonces in the whole process (default 100000).
    pub max_outstanding: usize,
    /// Bound on issued-and-unused nonces per peer: its key, or its identity
    /// ([`crate::Peer::bounded_as`]) (default 256).
    pub max_outstanding_per_peer: usize,
    /// Compare `Stepup-Binding` with the connection's TLS exporter (default true).
    /// When false the header is still required and signed (the wire format does
    /// not change) but its value is not compared.
    pub channel_binding: bool,
}

impl Default for StepUpConfig {
    fn default() -> Self {
        StepUpConfig {
            nonce_ttl: Duration::from_secs(30),
            max_clock_skew: Duration::from_secs(60),
            max_body: 1024 * 1024,
            max_outstanding: 100_000,
            max_outstanding_per_peer: 256,
            channel_binding: true,
        }
    }
}
