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

use keyproof_identity::{filemode, keys, Usage};
use tokio::time::Instant;

use crate::identity::key::{TokenKey, WorkloadKey};
use crate::identity::store::{self, Identity, IdentityStore, MaterialError};
use crate::identity::watch::FileWatch;
use crate::metrics::Metrics;

/// How long inconsistent material is retried before it counts as rejected:
/// long enough for a writer to finish updating the other files.
pub const SETTLE_FOR: Duration = Duration::from_secs(2);
/// Pause between retries of inconsistent material.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How long valid new material must stay the same before it is used: a
/// file written in place (not renamed into place) can be read half
/// written, and a prefix of a bundle is a valid bundle with fewer roots.
const STABLE_FOR: Duration = Duration::from_millis(250);
/// The same, for a bundle that drops a root in use: live connections under
/// that root are cut and its callers refused, and finishing a rotation is
/// never urgent.
const STABLE_FOR_DROP: Duration = SETTLE_FOR;

/// The three files of a file-based identity.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    /// Leaf then intermediates, PEM.
    pub cert: PathBuf,
    /// The workload key, PEM; None when it is in a PKCS#11 token (the
    /// certificate must then keep certifying the token key).
    pub key: Option<PathBuf>,
    /// The trust bundle, PEM.
    pub bundle: PathBuf,
}

/// One read of the files.
struct Snapshot {
    cert: Vec<u8>,
    key: Option<Vec<u8>>,
    bundle: Vec<u8>,
}

impl Snapshot {
    async fn read(files: &IdentityFiles) -> Result<Snapshot, MaterialError> {
        let read = |p: &Path| {
            let p = p.to_path_buf();
            async move {
                crate::files::read_async(&p)
                    .await
                    .map_err(|e| MaterialError::Unreadable(format!("{}: {e}", p.display())))
            }
        };
        // As at startup: a file others may rewrite is no identity.
        filemode::refuse_writable(&files.bundle, store::BUNDLE_WRITERS)
            .map_err(|e| MaterialError::Bundle(e.to_string()))?;
        if let Some(k) = &files.key {
            filemode::refuse_writable(k, store::KEY_WRITERS)
                .map_err(|e| MaterialError::Key(e.to_string()))?;
        }
        Ok(Snapshot {
            cert: read(&files.cert).await?,
            key: match &files.key {
                Some(k) => Some(read(k).await?),
                None => None,
            },
            bundle: read(&files.bundle).await?,
        })
    }

    /// Identifies these exact bytes, to recognise material already refused.
    /// Hashed in place, so no extra copy of the key is made.
    fn digest(&self) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let empty = Vec::new();
        for part in [
            &self.cert,
            self.key.as_ref().unwrap_or(&empty),
            &self.bundle,
        ] {
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
pub enum ReloadOutcome {
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
    /// The token key, when `[identity.pkcs11]` holds the key (the files
    /// then hold only the certificate and the bundle).
    token: Option<Arc<TokenKey>>,
    /// The last contents refused, so a bad Secret is counted once.
    rejected: Option<[u8; 32]>,
    /// [`SETTLE_FOR`]; a field so that tests can wait less.
    settle_for: Duration,
    /// [`STABLE_FOR`] and [`STABLE_FOR_DROP`]; fields so that tests can
    /// wait less.
    stable_for: (Duration, Duration),
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
            token: None,
            rejected: None,
            settle_for: SETTLE_FOR,
            stable_for: (STABLE_FOR, STABLE_FOR_DROP),
        }
    }

    /// The key is `token`, not a file: every certificate read must certify
    /// it.
    pub fn with_token(mut self, token: Option<Arc<TokenKey>>) -> Reloader {
        self.token = token;
        self
    }

    /// Starts watching: checks after every change notice and every
    /// `interval`, until the returned task is aborted.
    pub fn spawn(mut self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let paths: Vec<PathBuf> = [
                Some(self.files.cert.clone()),
                self.files.key.clone(),
                Some(self.files.bundle.clone()),
            ]
            .into_iter()
            .flatten()
            .collect();
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
    pub async fn check(&mut self) -> ReloadOutcome {
        let deadline = Instant::now() + self.settle_for;
        loop {
            let (digest, result) = match Snapshot::read(&self.files).await {
                Ok(snap) => (snap.digest(), self.validate(&snap)),
                // The same error on the same file is the same rejection.
                Err(e) => (keys::sha256(e.to_string().as_bytes()), Err(e)),
            };
            let next = match result {
                Ok(None) => {
                    self.rejected = None;
                    return ReloadOutcome::Unchanged;
                }
                Ok(Some(next)) => {
                    // Taken only once it has stayed the same (a writer may
                    // be half way through it).
                    let wait = if drops_a_root(self.store.get().as_deref(), &next) {
                        self.stable_for.1
                    } else {
                        self.stable_for.0
                    };
                    tokio::time::sleep(wait).await;
                    match Snapshot::read(&self.files).await {
                        Ok(again) if again.digest() == digest => next,
                        // Changed meanwhile: the new content is looked at.
                        _ => continue,
                    }
                }
                Err(e) => {
                    if self.rejected == Some(digest) {
                        return ReloadOutcome::Unchanged;
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
                    return ReloadOutcome::Rejected(reason);
                }
            };
            self.rejected = None;
            self.metrics.reload("ok");
            self.store
                .install(next, &self.metrics, "identity files changed");
            return ReloadOutcome::Applied;
        }
    }

    /// `Ok(None)` when the material is what is in use already (compared
    /// before validation, so an unchanged certificate that has just expired
    /// is not reported as a refused reload).
    fn validate(&self, snap: &Snapshot) -> Result<Option<Identity>, MaterialError> {
        let current = self.store.get();
        let (chain, key, roots) = match (&self.token, &snap.key) {
            (Some(token), _) => {
                let (chain, roots) = store::parse_cert_and_bundle(&snap.cert, &snap.bundle)?;
                (chain, WorkloadKey::Pkcs11(token.clone()), roots)
            }
            (None, Some(key_pem)) => {
                let (chain, key, roots) = store::parse_pem(&snap.cert, key_pem, &snap.bundle)?;
                (chain, WorkloadKey::file(key), roots)
            }
            (None, None) => {
                return Err(MaterialError::Key(
                    "no key file and no token key configured".into(),
                ))
            }
        };
        if current
            .as_ref()
            .is_some_and(|c| c.material == store::material_digest(&chain, &key, &roots))
        {
            return Ok(None);
        }
        let expected = current.as_ref().map(|c| &c.id);
        Identity::from_parts(chain, key, roots, &self.usages, expected).map(Some)
    }
}

/// Whether `next`'s bundle leaves out a root `current`'s has.
fn drops_a_root(current: Option<&Identity>, next: &Identity) -> bool {
    current.is_some_and(|c| {
        c.roots
            .iter()
            .any(|r| !next.roots.iter().any(|n| n.sha256 == r.sha256))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::store::test_pki::{Leaf, Pki, Svid, BOTH};
    use crate::metrics::{sample, RELOAD_RESULTS};

    const TD: &str = "reload.keyproof.test";
    const API: &str = "/ns/demo/sa/api";
    const WEB: &str = "/ns/demo/sa/web";

    /// Short enough for a test, long enough for a retry or two.
    const SETTLE: Duration = Duration::from_millis(150);
    /// How long a bundle dropping a root must stay the same, in the tests.
    const DROP_STABLE: Duration = Duration::from_millis(400);

    struct Setup {
        pki: &'static Pki,
        _dir: tempfile::TempDir,
        files: IdentityFiles,
        store: Arc<IdentityStore>,
        metrics: Metrics,
        reloader: Reloader,
    }

    impl Setup {
        /// Files holding an identity for API, and a store holding the same.
        fn new(settle_for: Duration) -> Setup {
            let pki = Pki::shared(TD);
            let dir = tempfile::tempdir().expect("temp dir");
            let files = IdentityFiles {
                cert: dir.path().join("tls.crt"),
                key: Some(dir.path().join("tls.key")),
                bundle: dir.path().join("ca.crt"),
            };
            let svid = pki.issue(API);
            write(&files, &svid, &pki.bundle_pem());
            let id = Identity::from_parts(svid.chain, svid.key, pki.roots(), BOTH, None)
                .expect("identity");
            let store = IdentityStore::new(id);
            let metrics = Metrics::new().expect("metrics");
            let mut reloader =
                Reloader::new(files.clone(), store.clone(), metrics.clone(), BOTH.to_vec());
            reloader.settle_for = settle_for;
            reloader.stable_for = (Duration::from_millis(20), DROP_STABLE);
            Setup {
                pki,
                _dir: dir,
                files,
                store,
                metrics,
                reloader,
            }
        }

        fn reloads(&self, result: &str) -> f64 {
            let text = String::from_utf8(self.metrics.render()).expect("UTF-8");
            sample(
                &text,
                "keyproof_identity_reloads_total",
                &[("result", result)],
            )
            .expect("every reload result is exported")
        }

        fn counted(&self) -> Vec<(&'static str, f64)> {
            RELOAD_RESULTS
                .iter()
                .map(|r| (*r, self.reloads(r)))
                .filter(|(_, n)| *n != 0.0)
                .collect()
        }
    }

    fn write(files: &IdentityFiles, svid: &Svid, bundle: &str) {
        std::fs::write(&files.cert, svid.chain_pem()).expect("write cert");
        std::fs::write(files.key.as_ref().expect("key file"), svid.key_pem()).expect("write key");
        std::fs::write(&files.bundle, bundle).expect("write bundle");
    }

    #[tokio::test]
    async fn unchanged_files_are_neither_applied_nor_counted() {
        let mut s = Setup::new(SETTLE);
        let serial = s.store.current().serial.clone();
        assert_eq!(s.reloader.check().await, ReloadOutcome::Unchanged);
        assert_eq!(s.store.current().serial, serial);
        assert_eq!(s.counted(), []);
    }

    #[tokio::test]
    async fn a_valid_new_certificate_and_key_are_swapped_in() {
        let mut s = Setup::new(SETTLE);
        let old = s.store.current();
        let next = s.pki.issue(API);
        write(&s.files, &next, &s.pki.bundle_pem());
        assert_eq!(s.reloader.check().await, ReloadOutcome::Applied);
        let now = s.store.current();
        assert_eq!(now.certified.cert, next.chain);
        assert_ne!(now.serial, old.serial);
        assert_eq!(now.id, old.id);
        assert_eq!(s.counted(), [("ok", 1.0)]);
        assert_eq!(s.metrics.cert_expiry.get(), now.not_after as f64);
        // Looking again finds nothing new.
        assert_eq!(s.reloader.check().await, ReloadOutcome::Unchanged);
        assert_eq!(s.counted(), [("ok", 1.0)]);
    }

    #[tokio::test]
    async fn a_key_or_bundle_others_may_write_is_refused_as_at_startup() {
        // Round 10 (keys) F2: the mode was checked at startup only.
        use std::os::unix::fs::PermissionsExt;
        let chmod = |p: &std::path::Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        let key = |s: &Setup| s.files.key.clone().expect("key file");
        let mut s = Setup::new(SETTLE);
        let old = s.store.current();
        let next = s.pki.issue(API);
        write(&s.files, &next, &s.pki.bundle_pem());
        chmod(&key(&s), 0o666);
        assert_eq!(s.reloader.check().await, ReloadOutcome::Rejected("invalid"));
        assert_eq!(s.store.current().serial, old.serial);
        assert_eq!(s.counted(), [("invalid", 1.0)]);
        chmod(&key(&s), 0o600);
        chmod(&s.files.bundle, 0o646);
        assert_eq!(s.reloader.check().await, ReloadOutcome::Rejected("invalid"));
        assert_eq!(s.store.current().serial, old.serial);
        assert_eq!(s.counted(), [("invalid", 2.0)]);
        chmod(&s.files.bundle, 0o644);
        assert_eq!(s.reloader.check().await, ReloadOutcome::Applied);
        assert_ne!(s.store.current().serial, old.serial);
    }

    #[tokio::test]
    async fn a_bundle_written_in_place_is_not_taken_half_written() {
        let mut s = Setup::new(SETTLE);
        let other = Pki::shared("second-root.keyproof.test");
        let svid = s.pki.issue(API);
        let both = format!("{}{}", s.pki.bundle_pem(), other.bundle_pem());
        write(&s.files, &svid, &both);
        assert_eq!(s.reloader.check().await, ReloadOutcome::Applied);
        assert_eq!(s.store.current().roots.len(), 2);
        // Round 9 F4: the first root written, the second a moment later. The
        // prefix is a valid bundle that drops a root (cutting the callers
        // under it), so it must stay the same a while before it is used.
        std::fs::write(&s.files.bundle, s.pki.bundle_pem()).expect("write prefix");
        let mut reloader = s.reloader;
        let check = tokio::spawn(async move {
            let outcome = reloader.check().await;
            (reloader, outcome)
        });
        tokio::time::sleep(DROP_STABLE / 4).await;
        std::fs::write(&s.files.bundle, &both).expect("write the rest");
        let (reloader, outcome) = check.await.expect("task");
        s.reloader = reloader;
        assert_eq!(outcome, ReloadOutcome::Unchanged);
        assert_eq!(s.store.current().roots.len(), 2, "the prefix was used");
        // A root really dropped is, once the file has stayed so.
        std::fs::write(&s.files.bundle, s.pki.bundle_pem()).expect("drop a root");
        assert_eq!(s.reloader.check().await, ReloadOutcome::Applied);
        assert_eq!(s.store.current().roots.len(), 1);
        assert_eq!(s.counted(), [("ok", 2.0)]);
    }

    #[tokio::test]
    async fn a_half_written_update_is_applied_once_the_key_catches_up() {
        // The real settle time: the check must return as soon as the files
        // are consistent, not after SETTLE_FOR.
        let mut s = Setup::new(SETTLE_FOR);
        let next = s.pki.issue(API);
        std::fs::write(&s.files.cert, next.chain_pem()).expect("write cert");
        let mut reloader = s.reloader;
        let check = tokio::spawn(async move {
            let outcome = reloader.check().await;
            (reloader, outcome)
        });
        tokio::time::sleep(RETRY_EVERY * 3).await;
        assert!(!check.is_finished(), "gave up on the half-written update");
        std::fs::write(s.files.key.as_ref().expect("key file"), next.key_pem()).expect("write key");
        let (reloader, outcome) = tokio::time::timeout(SETTLE_FOR, check)
            .await
            .expect("not applied within SETTLE_FOR")
            .expect("task");
        s.reloader = reloader;
        assert_eq!(outcome, ReloadOutcome::Applied);
        assert_eq!(s.store.current().certified.cert, next.chain);
        // The intermediate state was never counted as a refusal.
        assert_eq!(s.counted(), [("ok", 1.0)]);
    }

    #[tokio::test]
    async fn each_bad_update_is_rejected_with_its_label_once_and_the_old_identity_keeps_serving() {
        type Break = fn(&Setup);
        let cases: [(&str, Break); 8] = [
            ("key_mismatch", |s| {
                let other = s.pki.issue(API);
                std::fs::write(s.files.key.as_ref().expect("key file"), other.key_pem())
                    .expect("write");
            }),
            ("expired", |s| {
                let leaf = Leaf {
                    not_before: -7200,
                    not_after: -3600,
                    ..Leaf::default()
                };
                write(&s.files, &s.pki.craft(API, leaf), &s.pki.bundle_pem());
            }),
            ("not_yet_valid", |s| {
                let leaf = Leaf {
                    not_before: 3600,
                    not_after: 7200,
                    ..Leaf::default()
                };
                write(&s.files, &s.pki.craft(API, leaf), &s.pki.bundle_pem());
            }),
            ("unknown_ca", |s| {
                write(&s.files, &Pki::new(TD).issue(API), &s.pki.bundle_pem());
            }),
            ("foreign_trust_domain", |s| {
                let other = Pki::shared("other.keyproof.test");
                write(&s.files, &other.issue(API), &other.bundle_pem());
            }),
            ("id_changed", |s| {
                write(&s.files, &s.pki.issue(WEB), &s.pki.bundle_pem());
            }),
            ("invalid", |s| {
                std::fs::write(&s.files.cert, "not a certificate").expect("write");
            }),
            ("unreadable", |s| {
                std::fs::remove_file(s.files.key.as_ref().expect("key file")).expect("remove");
            }),
        ];
        let mut runs = tokio::task::JoinSet::new();
        for (label, break_files) in cases {
            runs.spawn(async move {
                let mut s = Setup::new(SETTLE);
                let serving = s.store.current();
                break_files(&s);
                assert_eq!(s.reloader.check().await, ReloadOutcome::Rejected(label));
                assert_eq!(s.counted(), [(label, 1.0)], "{label}");
                assert!(Arc::ptr_eq(&s.store.current(), &serving), "{label}");
                // The same contents again (a tick, an unrelated event): not
                // counted twice, and no settle wait either.
                assert_eq!(
                    s.reloader.check().await,
                    ReloadOutcome::Unchanged,
                    "{label}"
                );
                assert_eq!(s.counted(), [(label, 1.0)], "{label}");
                assert!(Arc::ptr_eq(&s.store.current(), &serving), "{label}");
            });
        }
        // A failed case's panic is resumed here.
        runs.join_all().await;
    }

    #[tokio::test]
    async fn a_changed_spiffe_id_is_refused_as_id_changed() {
        let mut s = Setup::new(SETTLE);
        write(&s.files, &s.pki.issue(WEB), &s.pki.bundle_pem());
        assert_eq!(
            s.reloader.check().await,
            ReloadOutcome::Rejected("id_changed")
        );
        assert_eq!(s.store.current().id, s.pki.id(API));
    }

    #[tokio::test]
    async fn new_bad_contents_count_again_and_a_fix_is_applied() {
        let mut s = Setup::new(SETTLE);
        let mismatch = |s: &Setup| {
            std::fs::write(
                s.files.key.as_ref().expect("key file"),
                s.pki.issue(API).key_pem(),
            )
            .expect("write");
        };
        mismatch(&s);
        assert_eq!(
            s.reloader.check().await,
            ReloadOutcome::Rejected("key_mismatch")
        );
        // Other wrong contents are another rejection.
        mismatch(&s);
        assert_eq!(
            s.reloader.check().await,
            ReloadOutcome::Rejected("key_mismatch")
        );
        assert_eq!(s.counted(), [("key_mismatch", 2.0)]);
        let fixed = s.pki.issue(API);
        write(&s.files, &fixed, &s.pki.bundle_pem());
        assert_eq!(s.reloader.check().await, ReloadOutcome::Applied);
        assert_eq!(s.store.current().certified.cert, fixed.chain);
        assert_eq!(s.counted(), [("ok", 1.0), ("key_mismatch", 2.0)]);
    }

    #[tokio::test]
    async fn the_watch_loop_applies_files_written_later() {
        let s = Setup::new(SETTLE);
        let store = s.store.clone();
        let old = store.current();
        let task = s.reloader.spawn(Duration::from_millis(100));
        let next = s.pki.issue(API);
        write(&s.files, &next, &s.pki.bundle_pem());
        let applied = tokio::time::timeout(Duration::from_secs(5), async {
            while Arc::ptr_eq(&store.current(), &old) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        task.abort();
        applied.expect("the new identity was never applied");
        assert_eq!(store.current().certified.cert, next.chain);
    }
}
