//! The fence `migrate` puts on a CA directory it moved into a store.
//!
//! After `migrate --dir DIR --store URL` the store holds the CA's state:
//! its join tokens, ledger and revocations. A directory left a working file
//! CA would honour the same single-use join tokens a second time and take
//! revocations the store never sees. So `migrate` writes [`MARKER`] into
//! `DIR` (atomically, after the store committed), and every directory-mode
//! reader and writer of the CA state refuses a marked directory. The key
//! files stay where they are: store-mode commands read them from `DIR` as
//! their key directory, and never look at the marker.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ca::{io_err, CaError};
use crate::fsutil;

/// The marker file, in the CA directory.
pub const MARKER: &str = "migrated.json";

/// What the marker records (for the refusal's message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Migrated {
    /// RFC 3339 time of the migration.
    pub migrated_at: String,
    /// The store's URL, password masked.
    pub store: String,
}

/// Marks `dir` as migrated to `store` (a masked URL) now.
pub fn mark(dir: &Path, store: &str) -> Result<(), CaError> {
    let path = dir.join(MARKER);
    let body = serde_json::to_vec_pretty(&Migrated {
        migrated_at: crate::ca::rfc3339(crate::ca::now()),
        store: store.to_owned(),
    })
    .map_err(|e| CaError::Corrupt {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    fsutil::write_atomic(&path, &body, fsutil::PUBLIC).map_err(io_err(&path))
}

/// Refuses a directory `migrate` moved into a store. A marker that cannot
/// be read or parsed still fences the directory: its presence is what
/// counts.
pub fn refuse(dir: &Path) -> Result<(), CaError> {
    let path = dir.join(MARKER);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(&path)(e)),
        Ok(_) => {}
    }
    let m = fsutil::read_input(&path, 64 * 1024)
        .ok()
        .and_then(|b| serde_json::from_slice::<Migrated>(&b).ok());
    Err(CaError::Migrated {
        dir: dir.to_owned(),
        at: m
            .as_ref()
            .map_or_else(|| "an unknown date".into(), |m| m.migrated_at.clone()),
        store: m.map_or_else(|| "a store".into(), |m| m.store),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_directory_is_refused_and_says_where_the_ca_went() {
        let d = tempfile::tempdir().unwrap();
        refuse(d.path()).unwrap();
        mark(d.path(), "postgres://kp:***@db/kp").unwrap();
        let e = refuse(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("was migrated to a store")
                && e.contains("postgres://kp:***@db/kp")
                && e.contains("--store"),
            "{e}"
        );
        std::fs::write(d.path().join(MARKER), b"garbage").unwrap();
        assert!(refuse(d.path()).is_err(), "a torn marker still fences");
    }
}
