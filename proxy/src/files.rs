//! Reading the files an operator points the sidecar at: the configuration,
//! `policy_file`, `upstreams_file`, certificates, keys and trust bundles.
//!
//! Each is a regular file of bounded size. Anything else at such a path is
//! refused with an error naming what it is, rather than read: a FIFO would
//! block the reading thread until a writer came (and with it every later
//! reload and the process's exit), and a device such as `/dev/zero` would
//! be read until memory ran out. The file is opened non-blocking, so that
//! even a FIFO's `open` returns, and then judged by what the open
//! descriptor is, so that a path swapped between a check and the read
//! cannot slip through.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The largest file read (4 MiB): four times what a Kubernetes ConfigMap or
/// Secret can hold.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// Reads `path`, a regular file of at most [`MAX_FILE_BYTES`].
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({what})"),
        ));
    }
    bounded(file)
}

/// Reads `path` as [`read`] does, as UTF-8 text.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// [`read`] off the runtime's threads.
pub async fn read_async(path: &Path) -> io::Result<Vec<u8>> {
    let path: PathBuf = path.to_owned();
    tokio::task::spawn_blocking(move || read(&path))
        .await
        .map_err(io::Error::other)?
}

/// The rest of `file`, refused beyond [`MAX_FILE_BYTES`] whatever its
/// size said (a file may grow while it is read).
fn bounded(file: File) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok");
        std::fs::write(&ok, b"text").unwrap();
        assert_eq!(read(&ok).unwrap(), b"text");
        // Through a symlink, as Kubernetes mounts ConfigMaps: the target.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert_eq!(read_to_string(&link).unwrap(), "text");

        // A FIFO is refused at once (no writer ever comes), a device and a
        // directory too.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for (p, what) in [
            (fifo.as_path(), "FIFO"),
            (Path::new("/dev/zero"), "character device"),
            (dir.path(), "directory"),
        ] {
            let e = read(p).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{p:?}");
            assert!(e.to_string().contains(what), "{p:?}: {e}");
        }
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(read(&zero).is_err());

        // Too large: refused, whatever is in it.
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let e = read(&big).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        std::fs::write(&big, vec![b'x'; MAX_FILE_BYTES as usize]).unwrap();
        assert_eq!(read(&big).unwrap().len() as u64, MAX_FILE_BYTES);

        let bad = dir.path().join("bad");
        std::fs::write(&bad, [0xff, 0xfe]).unwrap();
        assert!(read_to_string(&bad).is_err());
    }
}
