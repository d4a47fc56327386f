//! Modes of the files that say who a workload is and whom it trusts.
//!
//! Whoever can rewrite such a file decides for the process that reads it:
//! a private key or a token PIN makes them the workload, a trust bundle or
//! a JWKS lets them add a root or a token signer, a PKCS#11 module runs
//! their code inside the process. Such a file that group or others may
//! write is refused, when it is first read and every time it is read again.
//! A secret every user may read is worth a warning only: Kubernetes mounts
//! Secrets 0644 unless told otherwise, and within a container no other
//! user runs.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A file group or others may write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} is writable by others (mode {mode:o}): {consequence}; chmod go-w")]
pub struct WritableByOthers {
    /// The file.
    pub path: String,
    /// Its permission bits.
    pub mode: u32,
    /// What its writer could do, for the message.
    pub consequence: &'static str,
}

/// Refuses `path` when group or others may write it (a symbolic link is
/// followed, as a Secret volume's are). A file that is missing or cannot be
/// looked at passes: the read that follows says so, naming the file.
pub fn refuse_writable(path: &Path, consequence: &'static str) -> Result<(), WritableByOthers> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(WritableByOthers {
            path: path.display().to_string(),
            mode,
            consequence,
        });
    }
    Ok(())
}

/// The permission bits of `path` when every user may read it.
pub fn readable_by_all(path: &Path) -> Option<u32> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o004 != 0).then_some(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_or_other_write_is_refused_and_world_read_is_told() {
        let dir = tempfile::tempdir().expect("temp dir");
        let f = dir.path().join("f");
        std::fs::write(&f, "x").expect("write");
        for (mode, refused, readable) in [
            (0o600, false, false),
            (0o440, false, false),
            (0o644, false, true),
            (0o620, true, false),
            (0o602, true, false),
            (0o666, true, true),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let r = refuse_writable(&f, "whoever rewrites it wins");
            assert_eq!(r.is_err(), refused, "{mode:o}");
            if let Err(e) = r {
                assert_eq!(e.mode, mode);
                let msg = e.to_string();
                assert!(
                    msg.contains("writable by others") && msg.contains("whoever rewrites it wins"),
                    "{msg}"
                );
            }
            assert_eq!(readable_by_all(&f).is_some(), readable, "{mode:o}");
        }
        // Missing: the read reports it.
        assert!(refuse_writable(&dir.path().join("none"), "x").is_ok());
    }
}
