//! Crash-safe file writes with explicit permissions.
//!
//! Every file keyproof writes goes to a temporary file in the same directory
//! and is renamed into place, so a reader never sees half a certificate and a
//! failed command leaves nothing behind.

use std::fs;
use std::io::Write;
use std::path::Path;

/// Mode for private keys and other secrets.
pub const SECRET: u32 = 0o600;
/// Mode for public material (certificates, bundles).
pub const PUBLIC: u32 = 0o644;

/// Writes `data` to `path` atomically with `mode`, and syncs the directory
/// so the rename survives a crash.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    stage(path, data, mode)?.commit(path, true)
}

/// Appends one line to a file, creating it with `mode` if needed, and syncs.
///
/// A file that does not end with a newline holds a torn last line (a crash
/// or ENOSPC part-way through an earlier append): the new line then starts
/// with a newline of its own, so it is not glued onto the torn bytes into
/// one line no reader can parse.
pub fn append_line(path: &Path, line: &str, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let mut f = fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(mode)
        .open(path)?;
    let len = f.metadata()?.len();
    let mut buf = Vec::with_capacity(line.len() + 2);
    if len > 0 {
        let mut last = [0u8; 1];
        f.read_exact_at(&mut last, len - 1)?;
        if last[0] != b'\n' {
            buf.push(b'\n');
        }
    }
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    f.write_all(&buf)?;
    f.sync_data()
}

/// Data written and synced to a temporary file beside its destination, not
/// yet visible there: lets a caller prepare several files before publishing
/// any of them.
pub struct Staged(tempfile::NamedTempFile);

/// Writes `data` with `mode` to a temporary file in `path`'s directory.
pub fn stage(path: &Path, data: &[u8], mode: u32) -> std::io::Result<Staged> {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".keyproof-tmp-")
        .tempfile_in(dir)?;
    // Permissions before content: a secret is never readable by others, even briefly.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    Ok(Staged(tmp))
}

impl Staged {
    /// Publishes the file at `path` (which must be in the directory it was
    /// staged in) by an atomic rename. With `replace` false an existing
    /// file is never replaced: the rename fails with `AlreadyExists`, with
    /// no window between checking and creating. Dropping a `Staged` without
    /// committing removes the temporary file.
    pub fn commit(self, path: &Path, replace: bool) -> std::io::Result<()> {
        if replace {
            self.0.persist(path).map_err(|e| e.error)?;
        } else {
            self.0.persist_noclobber(path).map_err(|e| e.error)?;
        }
        sync_parent(path)
    }
}

/// Creates (or keeps) a directory, mode 0700 whatever the umask; an existing
/// one with a looser mode is tightened. For the CA directory's `next/`
/// (the next root key), `archive/` (old keys) and the journal.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

/// Syncs the directory holding `path`, so a rename into it survives a crash.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    fs::File::open(parent_dir(path))?.sync_all()
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Largest input file the CLI reads (a CSR, a certificate or its key, a
/// trust bundle, a JWKS, a token): real ones are a few KiB, and a bound far
/// above them keeps a mistyped path (`/dev/zero`) or a runaway pipe from
/// filling the memory of the host.
pub const MAX_INPUT: u64 = 4 * 1024 * 1024;

/// The path read from the process's standard input (`--root-key
/// /dev/stdin < key.pem`, `kubectl exec -i`): it may be a pipe, read up to
/// the same bound as a file.
pub const STDIN_PATH: &str = "/dev/stdin";

/// Why an input file was refused before (or while) reading it.
#[derive(Debug, thiserror::Error)]
pub enum InputRefused {
    /// A FIFO, a device, a socket or a directory: it could block forever or
    /// never end.
    #[error(
        "not a regular file ({0}): a FIFO or a device is refused rather than waited on \
         (pass a file, or the data on {STDIN_PATH})"
    )]
    NotRegular(&'static str),
    /// Over the bound.
    #[error("larger than {0} bytes: not an input this command reads")]
    TooLarge(u64),
}

/// Reads an input file named on the command line (or in a configuration):
/// a regular file (a symbolic link to one counts: a Secret volume's files
/// are links) of at most `max` bytes, or [`STDIN_PATH`] up to the same
/// bound. A refusal is an `InvalidInput` I/O error wrapping
/// [`InputRefused`], so callers name the flag and path as for any read
/// error, and `NotFound` stays `NotFound`.
pub fn read_input(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    if path == Path::new(STDIN_PATH) {
        let mut out = Vec::new();
        std::io::stdin()
            .lock()
            .take(max + 1)
            .read_to_end(&mut out)?;
        return bounded(out, max);
    }
    read_regular(path, max).map(|(_, data)| data)
}

/// Reads a regular file of at most `max` bytes, with the metadata of the
/// handle read (so that a replacement between the two is not missed). The
/// file is opened non-blocking: a FIFO is refused, not waited on for a
/// writer.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<(fs::Metadata, Vec<u8>)> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(refused(InputRefused::NotRegular(kind)));
    }
    if meta.len() > max {
        return Err(refused(InputRefused::TooLarge(max)));
    }
    let mut out = Vec::new();
    f.take(max + 1).read_to_end(&mut out)?;
    Ok((meta, bounded(out, max)?))
}

fn bounded(data: Vec<u8>, max: u64) -> std::io::Result<Vec<u8>> {
    if data.len() as u64 > max {
        return Err(refused(InputRefused::TooLarge(max)));
    }
    Ok(data)
}

fn refused(why: InputRefused) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, why)
}

/// Now, truncated to whole seconds: X.509 times have no fractions, and the
/// ledger should say exactly what the certificate says.
pub fn now() -> time::OffsetDateTime {
    let t = time::OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}

/// `t` as RFC 3339 (its Unix seconds should formatting ever fail).
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// [`rfc3339`] of [`now`]: the time of a record, for the modules below
/// `ca` (`migrated`, `pin_memory`).
pub fn now_rfc3339() -> String {
    rfc3339(now())
}

/// Parses one line of a JSON-lines file. A line that does not parse may
/// be a torn append with a later, whole line glued onto it (written by a
/// version that did not start a new line after a torn one): the whole
/// record at its end is recovered (`Ok((value, true))`); the torn bytes
/// before it are never parsed as a record of their own.
pub fn parse_json_line<T: serde::de::DeserializeOwned>(
    line: &str,
) -> Result<(T, bool), serde_json::Error> {
    let first = match serde_json::from_str(line) {
        Ok(v) => return Ok((v, false)),
        Err(e) => e,
    };
    for (i, _) in line.match_indices('{').skip_while(|(i, _)| *i == 0) {
        if let Ok(v) = serde_json::from_str(&line[i..]) {
            return Ok((v, true));
        }
    }
    Err(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_after_a_torn_line_starts_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        fs::write(&path, "{\"a\":1}\n{\"a\":").unwrap();
        append_line(&path, "{\"a\":2}", SECRET).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":\n{\"a\":2}\n"
        );
    }

    #[test]
    fn a_glued_line_yields_its_whole_record_only() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct R {
            a: u32,
        }
        assert_eq!(
            parse_json_line::<R>("{\"a\":7,\"b{\"a\":2}").unwrap(),
            (R { a: 2 }, true)
        );
        assert!(parse_json_line::<R>("{\"a\":7,\"b").is_err());
        assert_eq!(
            parse_json_line::<R>("{\"a\":1}").unwrap(),
            (R { a: 1 }, false)
        );
    }
    #[test]
    fn an_input_is_a_bounded_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.pem");
        fs::write(&ok, b"abc").unwrap();
        assert_eq!(read_input(&ok, 3).unwrap(), b"abc");
        let e = read_input(&ok, 2).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("larger than 2 bytes"), "{e}");

        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        // Refused at once, not waited on for a writer.
        let e = read_input(&fifo, MAX_INPUT).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = read_input(Path::new("/dev/zero"), MAX_INPUT).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        let e = read_input(dir.path(), MAX_INPUT).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = read_input(&dir.path().join("missing"), MAX_INPUT).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
