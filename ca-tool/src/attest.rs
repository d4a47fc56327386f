//! Kubernetes ServiceAccount attestation: a projected ServiceAccount token
//! (a JWT the API server signs) as the caller's proof for bootstrap.
//!
//! SKELETON: the API below is the contract `serve` codes against; the
//! verification itself is being written.

use std::path::PathBuf;
use std::time::Duration;

use keyproof_identity::spiffe::{SpiffeId, TrustDomain};

/// What `serve --k8s-jwks/--k8s-issuer/--k8s-audience` configure.
#[derive(Debug, Clone)]
pub struct SaConfig {
    /// The cluster's JWKS (`/openid/v1/jwks`), re-read when it changes.
    pub jwks: PathBuf,
    /// The expected `iss` (the API server's `--service-account-issuer`).
    pub issuer: String,
    /// The expected `aud` entry (default `keyproof-ca`).
    pub audience: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

/// Startup failure (the JWKS cannot be read or holds no usable key).
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("--k8s-jwks {path}: {msg}")]
    Jwks { path: PathBuf, msg: String },
    #[error("--k8s-issuer: {0}")]
    Issuer(String),
}

/// Why a token was refused. [`SaTokenError::code`] is the stable API code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaTokenError {
    #[error("service account token expired")]
    Expired,
    #[error("service account token is for another audience")]
    Audience,
    #[error("service account token is from another issuer")]
    Issuer,
    #[error("service account token signature does not verify against the cluster's keys")]
    Signature,
    #[error("service account token is malformed: {0}")]
    Malformed(String),
}

impl SaTokenError {
    /// Stable error code for API responses, logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            SaTokenError::Expired => "sa_token_expired",
            SaTokenError::Audience => "sa_token_audience",
            SaTokenError::Issuer => "sa_token_issuer",
            SaTokenError::Signature => "sa_token_signature",
            SaTokenError::Malformed(_) => "sa_token_malformed",
        }
    }

    /// Every code, for metrics that start at zero.
    pub const CODES: [&'static str; 5] = [
        "sa_token_expired",
        "sa_token_audience",
        "sa_token_issuer",
        "sa_token_signature",
        "sa_token_malformed",
    ];
}

/// The verified `kubernetes.io` claims of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaClaims {
    pub namespace: String,
    pub service_account: String,
    pub service_account_uid: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
}

impl SaClaims {
    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, td: &TrustDomain) -> Result<SpiffeId, String> {
        SpiffeId::parse(&format!(
            "spiffe://{}/ns/{}/sa/{}",
            td.as_str(),
            self.namespace,
            self.service_account
        ))
        .map_err(|e| e.to_string())
    }
}

/// The JWKS state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JwksStatus {
    /// Usable keys in the JWKS in use.
    pub keys: usize,
    /// Successful re-reads since start (the first read not counted).
    pub reloads_ok: u64,
    /// Re-reads that failed (the previous keys stay in use).
    pub reloads_failed: u64,
}

/// Verifies ServiceAccount tokens against the cluster's JWKS.
#[derive(Debug)]
pub struct SaAttestor {
    cfg: SaConfig,
}

impl SaAttestor {
    /// Reads the JWKS; fails when it is unreadable or holds no usable key.
    pub fn new(cfg: SaConfig) -> Result<SaAttestor, AttestError> {
        Ok(SaAttestor { cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &SaConfig {
        &self.cfg
    }

    /// Verifies `token` at `now` (seconds since the epoch). Re-reads the
    /// JWKS first when its file changed (checked at most once a second, and
    /// at once for a `kid` it does not know).
    pub fn verify(&self, token: &str, now: i64) -> Result<SaClaims, SaTokenError> {
        let _ = (token, now);
        Err(SaTokenError::Malformed("not implemented yet".into()))
    }

    /// The JWKS state.
    pub fn status(&self) -> JwksStatus {
        JwksStatus::default()
    }
}

/// Whether a bearer credential is shaped like a JWT (three base64url parts)
/// rather than a join token (`kpt_...`).
pub fn looks_like_jwt(bearer: &str) -> bool {
    let mut parts = bearer.split('.');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    };
    ok(parts.next()) && ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}
