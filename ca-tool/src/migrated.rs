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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;

/// A directory `migrate` moved into a store, refused.
#[derive(Debug, thiserror::Error)]
#[error("--dir {}: this CA directory was migrated to a store ({store}) on {at}; use --store URL (with --dir {} as the key directory); its tokens, ledger and revocations are no longer the CA's state", dir.display(), dir.display())]
pub struct MigratedDir {
    /// The directory.
    pub dir: PathBuf,
    /// When (RFC 3339), as the marker says.
    pub at: String,
    /// The store's URL, password masked, as the marker says.
    pub store: String,
}

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
pub fn mark(dir: &Path, store: &str) -> std::io::Result<()> {
    let path = dir.join(MARKER);
    let body = serde_json::to_vec_pretty(&Migrated {
        migrated_at: fsutil::now_rfc3339(),
        store: store.to_owned(),
    })
    .map_err(std::io::Error::other)?;
    fsutil::write_atomic(&path, &body, fsutil::PUBLIC)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Refuses a directory `migrate` moved into a store. A marker that cannot
/// be read or parsed still fences the directory: its presence is what
/// counts.
pub fn refuse(dir: &Path) -> Result<(), MigratedDir> {
    let path = dir.join(MARKER);
    // There, or not readable: fenced all the same.
    if let Err(e) = std::fs::symlink_metadata(&path) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(());
        }
    }
    let m = fsutil::read_input(&path, 64 * 1024)
        .ok()
        .and_then(|b| serde_json::from_slice::<Migrated>(&b).ok());
    Err(MigratedDir {
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
