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
}

/// How the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Readers of documents that also append (no rewrite).
    Shared,
    /// Read-modify-write of documents.
    Exclusive,
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
        use std::os::unix::fs::OpenOptionsExt;
        if !dir.is_dir() {
            return Ok(None);
        }
        let path = dir.join(LOCK_FILE);
        let err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::fsutil::SECRET)
            .open(&path)
            .map_err(err)?;
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
    fn a_missing_directory_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("nope");
        assert!(DirLock::acquire(&gone, Mode::Exclusive).unwrap().is_none());
        assert!(!gone.exists());
    }
}
