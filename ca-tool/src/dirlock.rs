//! The advisory lock that serialises commands changing a CA directory.
//!
//! `revoked.json`, `ca.json` and the key/certificate pairs are documents
//! rewritten whole (read, modify, write back). Two commands doing that at
//! once on one directory would each write back their own view: the second
//! `revoke` drops the first one's entries, two `rotate intermediate` can
//! leave one run's key beside the other's certificate. With `--store` the
//! store's lock prevents that; in directory mode every such command holds
//! an exclusive `flock(2)` on a lock file inside the CA directory for its
//! whole read-modify-write, and commands that only append (`issue`, `token
//! create`) hold it shared, so they never read a pair half installed.
//!
//! The lock file starts with a dot: the store's workspace scan skips such
//! names, so it is never copied into a store.

use std::fs::File;

use rustix::fs::FlockOperation;
use std::path::{Path, PathBuf};

/// The lock file's name inside the CA directory.
pub const LOCK_FILE: &str = ".keyproof-ca.lock";

/// Taking the directory lock failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: cannot lock the CA directory: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another `serve` serves the directory.
    #[error("{path}: another keyproof-ca serve is serving this CA directory; one process only may (it alone redeems join tokens and writes the ledger); for more replicas use --store")]
    Serving { path: PathBuf },
}

/// How the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Readers of documents that also append (no rewrite).
    Shared,
    /// Read-modify-write of documents.
    Exclusive,
}

/// Opens (creating it, 0600) the lock file at `path`; its content is never
/// read or written.
fn open(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(crate::fsutil::SECRET)
        .open(path)
}

/// A held lock; dropping it (closing the file) releases it.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks the CA directory `dir`, waiting for whoever holds it (after
    /// saying so on standard error: a command that seems stuck should say
    /// why). `None` when `dir` does not exist: the command then fails on
    /// its own with the message it always gave, and a lock file must not
    /// create the directory.
    pub fn acquire(dir: &Path, mode: Mode) -> Result<Option<DirLock>, LockError> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let path = dir.join(LOCK_FILE);
        let err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = open(&path).map_err(err)?;
        let (op, try_op) = match mode {
            Mode::Shared => (
                FlockOperation::LockShared,
                FlockOperation::NonBlockingLockShared,
            ),
            Mode::Exclusive => (
                FlockOperation::LockExclusive,
                FlockOperation::NonBlockingLockExclusive,
            ),
        };
        if flock(&file, try_op).is_err() {
            eprintln!(
                "waiting for another keyproof-ca command holding {}",
                path.display()
            );
            loop {
                match flock(&file, op) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(err(e)),
                }
            }
        }
        Ok(Some(DirLock { _file: file }))
    }

    /// The lock `serve` holds for as long as it serves the CA directory
    /// `dir`, or that another `serve` holds it: the single-use join tokens
    /// and the ledger are one process's to write (two would redeem one
    /// token twice). It is a lock on the directory itself, not on the
    /// commands' lock file (they run while `serve` does), and creates
    /// nothing. `None` when `dir` does not exist (as [`DirLock::acquire`]).
    pub fn serving(dir: &Path) -> Result<Option<DirLock>, LockError> {
        if !dir.is_dir() {
            return Ok(None);
        }
        let path = dir.to_path_buf();
        let file = File::open(dir).map_err(|source| LockError::Io {
            path: path.clone(),
            source,
        })?;
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(Some(DirLock { _file: file })),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(LockError::Serving { path })
                }
                Err(source) => return Err(LockError::Io { path, source }),
            }
        }
    }
}

fn flock(f: &File, op: FlockOperation) -> std::io::Result<()> {
    rustix::fs::flock(f, op).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exclusive_lock_excludes_another_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let held = DirLock::acquire(dir.path(), Mode::Exclusive).unwrap();
        assert!(held.is_some());
        // A second open file description: what another process would hold.
        let other = File::options()
            .read(true)
            .open(dir.path().join(LOCK_FILE))
            .unwrap();
        assert!(flock(&other, FlockOperation::NonBlockingLockShared).is_err());
        drop(held);
        assert!(flock(&other, FlockOperation::NonBlockingLockShared).is_ok());
    }

    #[test]
    fn a_second_serve_on_a_directory_is_refused_until_the_first_exits() {
        // Round 10 (keys) F12: two would redeem one join token twice.
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::serving(dir.path()).unwrap();
        assert!(first.is_some());
        let e = DirLock::serving(dir.path()).unwrap_err();
        assert!(matches!(e, LockError::Serving { .. }), "{e}");
        assert!(e.to_string().contains("another keyproof-ca serve"), "{e}");
        // The commands' own lock is another file: they still run.
        assert!(DirLock::acquire(dir.path(), Mode::Exclusive)
            .unwrap()
            .is_some());
        drop(first);
        assert!(DirLock::serving(dir.path()).unwrap().is_some());
    }

    #[test]
    fn a_missing_directory_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nope");
        assert!(DirLock::acquire(&gone, Mode::Exclusive).unwrap().is_none());
        assert!(!gone.exists());
    }
}
