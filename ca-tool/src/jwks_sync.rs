//! `keyproof-ca k8s-jwks`: keeps a local copy of a Kubernetes cluster's
//! ServiceAccount token signing keys for `keyproof-ca serve --k8s-jwks`.
//!
//! The API server publishes the public keys it signs projected tokens with
//! at `/openid/v1/jwks` (the built-in ClusterRole
//! `system:service-account-issuer-discovery` grants reading it). This module
//! fetches that document over TLS, with the cluster CA file as the only root
//! and the API server's DNS name checked by webpki; checks that it is a JWKS
//! with at least one key; and replaces the output file atomically only when
//! its content changed, so that `serve` (which re-reads the file when it
//! changes) follows the cluster's key rotations.
//!
//! A failed fetch never touches the file: the CA keeps verifying with the
//! keys it has, which stay valid for every token signed before the cluster
//! rotated. The bearer token and the CA file are re-read for every fetch,
//! because the kubelet refreshes a projected token before it expires and the
//! cluster CA (the `kube-root-ca.crt` ConfigMap) can be rotated.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use jsonwebtoken::jwk::JwkSet;

use crate::fsutil::{self, PUBLIC};
use crate::kube::{self, ApiRequest, ApiServer, KubeError, Rounds};

pub use crate::kube::{
    retry_delay, CONNECT_TIMEOUT, DEFAULT_API_SERVER, DEFAULT_CA_FILE, DEFAULT_TOKEN_FILE,
    FIRST_RETRY, RESPONSE_TIMEOUT,
};

/// Where the API server publishes its token signing keys.
pub const JWKS_PATH: &str = "/openid/v1/jwks";
/// Largest JWKS accepted. A cluster publishes a handful of keys (a few KiB);
/// the limit keeps a misdirected answer from filling memory or the volume.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// What to fetch, how, and where to write it.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The JWKS file `serve --k8s-jwks` reads.
    pub out: PathBuf,
    /// `https://host[:port]` of the API server.
    pub api_server: String,
    /// Bearer token file, re-read for every fetch.
    pub token_file: PathBuf,
    /// PEM CA certificates: the only roots the API server's certificate may
    /// chain to.
    pub ca_file: PathBuf,
    /// Time between two fetches while all is well.
    pub interval: Duration,
}

/// The result of one successful sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The JWKS differed from the file (or there was none): written.
    Written {
        /// Keys in the JWKS.
        keys: usize,
    },
    /// The file already held this JWKS: left alone.
    Unchanged {
        /// Keys in the JWKS.
        keys: usize,
    },
}

impl Outcome {
    /// One line for the operator, naming the file.
    pub fn describe(&self, out: &Path) -> String {
        match self {
            Outcome::Written { keys } => {
                format!("wrote the cluster JWKS ({keys} keys) to {}", out.display())
            }
            Outcome::Unchanged { keys } => {
                format!("{} is up to date ({keys} keys)", out.display())
            }
        }
    }
}

/// Why a sync failed. The output file is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Reaching the API server failed (URL, token, CA file, TLS, HTTP,
    /// timeouts, an answer over [`MAX_JWKS_BYTES`]).
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("the API server answered {status} to GET {JWKS_PATH}{hint}: {body}")]
    Status {
        status: u16,
        hint: &'static str,
        body: String,
    },
    #[error("the answer to GET {JWKS_PATH} is not a JWKS: {0}")]
    NotJwks(String),
    #[error("the answer to GET {JWKS_PATH} is a JWKS without keys")]
    NoKeys,
    #[error("--out {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks that `body` is a JWKS with at least one key the CA can parse;
/// returns the number of keys.
pub fn validate(body: &[u8]) -> Result<usize, SyncError> {
    let set: JwkSet =
        serde_json::from_slice(body).map_err(|e| SyncError::NotJwks(e.to_string()))?;
    if set.keys.is_empty() {
        return Err(SyncError::NoKeys);
    }
    Ok(set.keys.len())
}

/// Fetches and validates the JWKS; returns it as served and its key count.
pub async fn fetch(opts: &SyncOptions) -> Result<(Bytes, usize), SyncError> {
    let api = ApiServer::load(&opts.api_server, &opts.token_file, &opts.ca_file)?;
    let req = ApiRequest {
        method: Method::GET,
        path: JWKS_PATH,
        content_type: None,
        accept: "application/jwk-set+json, application/json",
        body: Bytes::new(),
        max_answer: MAX_JWKS_BYTES,
    };
    let (status, body) = api.connect().await?.send(&req).await?;

    if status != StatusCode::OK {
        let hint = match status {
            StatusCode::UNAUTHORIZED => " (the API server did not accept the --token-file token)",
            StatusCode::FORBIDDEN => {
                " (the ServiceAccount needs the ClusterRole system:service-account-issuer-discovery)"
            }
            _ => "",
        };
        return Err(SyncError::Status {
            status: status.as_u16(),
            hint,
            body: kube::excerpt(&body),
        });
    }
    let keys = validate(&body)?;
    Ok((body, keys))
}

/// Writes `body` to `path` (temporary file, fsync, rename, mode 0644) unless
/// the file already holds exactly these bytes; returns whether it wrote.
/// Skipping identical content keeps `serve` from reloading for nothing.
pub fn write_if_changed(path: &Path, body: &[u8]) -> Result<bool, SyncError> {
    let write_err = |source| SyncError::Write {
        path: path.to_owned(),
        source,
    };
    // Compared only with a regular file no larger than `body` (a FIFO or a
    // device at the output path is replaced, never read).
    if fsutil::read_regular(path, body.len() as u64).is_ok_and(|(_, old)| old == body) {
        return Ok(false);
    }
    fsutil::write_atomic(path, body, PUBLIC).map_err(write_err)?;
    // The rename is durable only once the directory is synced.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(true)
}

/// One fetch and, if the JWKS changed, one write.
pub async fn sync_once(opts: &SyncOptions) -> Result<Outcome, SyncError> {
    let (body, keys) = fetch(opts).await?;
    Ok(if write_if_changed(&opts.out, &body)? {
        Outcome::Written { keys }
    } else {
        Outcome::Unchanged { keys }
    })
}

/// Syncs every `interval` until `shutdown` completes. Failures are logged
/// and retried with backoff; they never end the loop, because the file
/// already written stays valid and the next attempt may succeed.
pub async fn run(opts: &SyncOptions, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut rounds = Rounds::new(opts.interval);
    loop {
        let result = tokio::select! {
            _ = &mut shutdown => return,
            r = sync_once(opts) => r,
        };
        let delay = match result {
            Ok(outcome) => {
                let keys = match outcome {
                    Outcome::Written { keys } | Outcome::Unchanged { keys } => keys,
                };
                let msg = outcome.describe(&opts.out);
                let failures = rounds.failures();
                if matches!(outcome, Outcome::Written { .. }) || rounds.first() || failures > 0 {
                    tracing::info!(keys, path = %opts.out.display(), failures, "{msg}");
                } else {
                    tracing::debug!(keys, path = %opts.out.display(), "{msg}");
                }
                rounds.end(true)
            }
            Err(e) => {
                let delay = rounds.end(false);
                let failures = rounds.failures();
                tracing::warn!(
                    error = %e,
                    failures,
                    retry_in = ?delay,
                    path = %opts.out.display(),
                    "JWKS sync failed; the current file is kept"
                );
                delay
            }
        };
        if !Rounds::wait(delay, &mut shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_wants_keys() {
        assert!(matches!(validate(b"<html>"), Err(SyncError::NotJwks(_))));
        assert!(matches!(
            validate(br#"{"hello":1}"#),
            Err(SyncError::NotJwks(_))
        ));
        assert!(matches!(
            validate(br#"{"keys":[]}"#),
            Err(SyncError::NoKeys)
        ));
        let jwks = br#"{"keys":[{"use":"sig","kty":"EC","kid":"k1","crv":"P-256","alg":"ES256",
            "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        assert_eq!(validate(jwks).unwrap(), 1);
    }

    #[test]
    fn writes_only_changes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("jwks.json");
        assert!(write_if_changed(&p, b"{}").unwrap());
        assert!(!write_if_changed(&p, b"{}").unwrap());
        assert!(write_if_changed(&p, b"{ }").unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"{ }");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
