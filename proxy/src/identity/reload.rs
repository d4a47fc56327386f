//! Hot reload of `[identity.files]`: the certificate, key and trust bundle
//! are re-read when their directories change (and on a periodic tick), and
//! swapped in only once they validate as a whole.
//!
//! What is applied must be a complete, consistent identity: the key matches
//! the leaf, the chain verifies against the *new* bundle, the leaf is a valid,
//! unexpired X.509-SVID with the same SPIFFE ID as the one in use. Writers
//! that do not use the Kubernetes `..data` swap update the three files one at
//! a time, so a failed validation is first retried for a short while
//! ([`SETTLE_FOR`]) before it counts as a rejection; the identity in use keeps
//! serving in every case. The same rejected contents are counted once, not on
//! every tick.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keyproof_identity::{keys, Usage};
use tokio::time::Instant;

use crate::identity::store::{self as identity, Identity, IdentityStore, MaterialError};
use crate::identity::watch::FileWatch;
use crate::metrics::Metrics;

/// How long inconsistent material is retried before it counts as rejected:
/// long enough for a writer to finish updating the other files.
pub const SETTLE_FOR: Duration = Duration::from_secs(2);
/// Pause between retries of inconsistent material.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// The three files of a file-based identity.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    /// Leaf then intermediates, PEM.
    pub cert: PathBuf,
    /// The workload key, PEM.
    pub key: PathBuf,
    /// The trust bundle, PEM.
    pub bundle: PathBuf,
}

/// One read of the three files.
struct Snapshot {
    cert: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
}

impl Snapshot {
    async fn read(files: &IdentityFiles) -> Result<Snapshot, MaterialError> {
        let read = |p: &Path| {
            let p = p.to_path_buf();
            async move {
                tokio::fs::read(&p)
                    .await
                    .map_err(|e| MaterialError::Unreadable(format!("{}: {e}", p.display())))
            }
        };
        Ok(Snapshot {
            cert: read(&files.cert).await?,
            key: read(&files.key).await?,
            bundle: read(&files.bundle).await?,
        })
    }

    /// Identifies these exact bytes, to recognise material already refused.
    /// Hashed in place, so no extra copy of the key is made.
    fn digest(&self) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for part in [&self.cert, &self.key, &self.bundle] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// What one look at the files found.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Same material as in use (or as already refused): nothing to do.
    Unchanged,
    /// New material validated and is now in use.
    Applied,
    /// New material was refused with this `result` label.
    Rejected(&'static str),
}

/// Watches `[identity.files]` and swaps valid new material into the store.
pub struct Reloader {
    files: IdentityFiles,
    store: Arc<IdentityStore>,
    metrics: Metrics,
    usages: Vec<Usage>,
    /// The last contents refused, so a bad Secret is counted once.
    rejected: Option<[u8; 32]>,
}

impl Reloader {
    /// A reloader for `files`, validating for `usages` (the directions the
    /// proxy serves), swapping into `store`.
    pub fn new(
        files: IdentityFiles,
        store: Arc<IdentityStore>,
        metrics: Metrics,
        usages: Vec<Usage>,
    ) -> Reloader {
        Reloader {
            files,
            store,
            metrics,
            usages,
            rejected: None,
        }
    }

    /// Starts watching: checks after every change notice and every
    /// `interval`, until the returned task is aborted.
    pub fn spawn(mut self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let paths = [
                self.files.cert.clone(),
                self.files.key.clone(),
                self.files.bundle.clone(),
            ];
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            let mut watch = FileWatch::start(&refs, interval);
            loop {
                watch.changed().await;
                self.check().await;
            }
        })
    }

    /// Looks at the files once: applies valid new material, retries
    /// inconsistent material for up to [`SETTLE_FOR`], counts the outcome.
    pub async fn check(&mut self) -> Outcome {
        let deadline = Instant::now() + SETTLE_FOR;
        loop {
            let (digest, result) = match Snapshot::read(&self.files).await {
                Ok(snap) => (snap.digest(), self.validate(&snap)),
                // The same error on the same file is the same rejection.
                Err(e) => (keys::sha256(e.to_string().as_bytes()), Err(e)),
            };
            let next = match result {
                Ok(None) => {
                    self.rejected = None;
                    return Outcome::Unchanged;
                }
                Ok(Some(next)) => next,
                Err(e) => {
                    if self.rejected == Some(digest) {
                        return Outcome::Unchanged;
                    }
                    if Instant::now() < deadline {
                        tokio::time::sleep(RETRY_EVERY).await;
                        continue;
                    }
                    let reason = e.reason();
                    self.metrics.reload(reason);
                    // The error names the problem, never key bytes.
                    tracing::warn!(
                        result = reason,
                        error = %e,
                        cert = %self.files.cert.display(),
                        "new identity files refused; the current identity keeps serving"
                    );
                    // Looked at again on every change and tick, but the
                    // same bad contents (or error) are counted once.
                    self.rejected = Some(digest);
                    return Outcome::Rejected(reason);
                }
            };
            self.rejected = None;
            self.metrics.reload("ok");
            self.store
                .install(next, &self.metrics, "identity files changed");
            return Outcome::Applied;
        }
    }

    /// `Ok(None)` when the material is what is in use already (compared
    /// before validation, so an unchanged certificate that has just expired
    /// is not reported as a refused reload).
    fn validate(&self, snap: &Snapshot) -> Result<Option<Identity>, MaterialError> {
        let current = self.store.get();
        let (chain, key, roots) = identity::parse_pem(&snap.cert, &snap.key, &snap.bundle)?;
        if current
            .as_ref()
            .is_some_and(|c| c.material == identity::material_digest(&chain, &key, &roots))
        {
            return Ok(None);
        }
        let expected = current.as_ref().map(|c| &c.id);
        Identity::from_parts(chain, key, roots, &self.usages, expected).map(Some)
    }
}
