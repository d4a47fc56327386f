//! A PIN the token refused, remembered across processes.
//!
//! `keyproof-identity` never offers a refused PIN again within one process
//! (until the PIN file's content changes). A CA process that cannot log in
//! exits, though, and is started again: a crash-looping `serve`, the daily
//! `check` CronJob, an operator's `issue`. Each start would offer the same
//! refused PIN once more, and a token with a retry counter (smart cards,
//! YubiKey PIV, TPM dictionary-attack protection) locks after a few. So a
//! refusal is also written down: a hidden marker file in the CA directory
//! (with `--store`, the key directory), 0600, named after the PIN file's
//! path and holding a salted, slow hash of the refused content (never the
//! PIN). Before logging in with a PIN file whose content matches a marker,
//! the CA refuses without offering it; a changed file is tried, and a
//! successful login removes the marker.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use keyproof_identity::pkcs11::Pkcs11Error;
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// Where this process keeps its markers: set once by the command line
/// (the CA directory, or the key directory with `--store`).
static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Keeps refusal markers in `dir` from now on (the first call wins).
pub fn remember_in(dir: &Path) {
    let _ = DIR.set(std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()));
}

/// The directory set by [`remember_in`], if any.
pub fn dir() -> Option<&'static Path> {
    DIR.get().map(PathBuf::as_path)
}

/// Prefix of the marker files; hidden, so that no scan of the directory
/// (the store's key-directory scan, `migrate`) takes them for CA state.
pub const MARKER_PREFIX: &str = ".keyproof-pin-refused-";

/// PBKDF2 rounds: a PIN is short, so the hash of a refused one is made
/// slow to search.
const ROUNDS: u32 = 200_000;

/// The longest PIN file hashed (the token code reads no more either).
const MAX_PIN_FILE: u64 = 1024;

/// A marker's content.
#[derive(Debug, Serialize, Deserialize)]
struct Refusal {
    /// The PIN file, for the operator.
    pin_file: String,
    /// When the token refused it.
    refused_at: String,
    /// Hex random salt.
    salt: String,
    /// Hex PBKDF2-HMAC-SHA256 of the PIN as offered, with `salt`.
    digest: String,
}

/// Runs `login` (an open or a generation that logs in with `pin_file` on
/// `token`) unless the PIN file's content is one the token refused before,
/// as remembered in `dir`; remembers a new refusal, forgets one on success.
/// Without a directory, or when the PIN file cannot be read (the login
/// reports that itself), `login` simply runs.
pub fn guard<T>(
    dir: Option<&Path>,
    pin_file: &Path,
    token: &str,
    login: impl FnOnce() -> Result<T, Pkcs11Error>,
) -> Result<T, Pkcs11Error> {
    let (Some(dir), Some(pin)) = (dir, offered(pin_file)) else {
        return login();
    };
    let marker = marker_path(dir, pin_file);
    if let Some(r) = read_marker(&marker) {
        if matches(&r, &pin) {
            return Err(Pkcs11Error::Login {
                token: token.to_owned(),
                msg: format!(
                    "the token refused the PIN in {} at {}, and that file has not changed since: \
                     it is not offered again (a token locks after a few wrong PINs); put the \
                     current PIN in the file (remembered in {})",
                    pin_file.display(),
                    r.refused_at,
                    marker.display()
                ),
            });
        }
    }
    let result = login();
    match &result {
        Ok(_) => {
            let _ = std::fs::remove_file(&marker);
        }
        Err(Pkcs11Error::Login { .. }) => {
            if let Err(e) = write_marker(&marker, pin_file, &pin) {
                tracing::warn!(
                    marker = %marker.display(),
                    error = %e,
                    "cannot remember that the token refused the PIN: the next start offers it again"
                );
            }
        }
        Err(_) => {}
    }
    result
}

/// The PIN as the token code offers it: the file's content without its
/// trailing line ends. Only a bounded regular file is read (never a FIFO,
/// nor standard input: that would take what the login needs).
fn offered(pin_file: &Path) -> Option<Vec<u8>> {
    let (_, mut raw) = fsutil::read_regular(pin_file, MAX_PIN_FILE).ok()?;
    while raw.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
        raw.pop();
    }
    (!raw.is_empty()).then_some(raw)
}

/// The marker of `pin_file`, named by the file it resolves to (links and
/// `..` followed), so that one file named two ways is one marker.
fn marker_path(dir: &Path, pin_file: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(pin_file)
        .or_else(|_| std::path::absolute(pin_file))
        .unwrap_or_else(|_| pin_file.to_owned());
    let id = hex::encode(keyproof_identity::keys::sha256(
        abs.as_os_str().as_encoded_bytes(),
    ));
    dir.join(format!("{MARKER_PREFIX}{}", &id[..16]))
}

fn read_marker(path: &Path) -> Option<Refusal> {
    let (_, body) = fsutil::read_regular(path, 4096).ok()?;
    serde_json::from_slice(&body).ok()
}

fn digest(salt: &[u8], pin: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    aws_lc_rs::pbkdf2::derive(
        aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(ROUNDS).unwrap_or(NonZeroU32::MIN),
        salt,
        pin,
        &mut out,
    );
    out
}

fn matches(r: &Refusal, pin: &[u8]) -> bool {
    let (Ok(salt), Ok(want)) = (hex::decode(&r.salt), hex::decode(&r.digest)) else {
        return false;
    };
    aws_lc_rs::constant_time::verify_slices_are_equal(&digest(&salt, pin), &want).is_ok()
}

fn write_marker(path: &Path, pin_file: &Path, pin: &[u8]) -> Result<(), String> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| "no randomness".to_owned())?;
    let r = Refusal {
        pin_file: pin_file.display().to_string(),
        refused_at: fsutil::now_rfc3339(),
        salt: hex::encode(salt),
        digest: hex::encode(digest(&salt, pin)),
    };
    let body = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
    fsutil::write_atomic(path, &body, fsutil::SECRET).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn refused() -> Result<(), Pkcs11Error> {
        Err(Pkcs11Error::Login {
            token: "t".into(),
            msg: "CKR_PIN_INCORRECT".into(),
        })
    }

    #[test]
    fn a_refused_pin_is_not_offered_again_by_a_later_process_until_the_file_changes() {
        let d = tempfile::tempdir().unwrap();
        let pin = d.path().join("pin");
        std::fs::write(&pin, "1234\n").unwrap();
        let calls = Cell::new(0);
        let login = |ok: bool| {
            calls.set(calls.get() + 1);
            if ok {
                Ok(())
            } else {
                refused()
            }
        };
        // Refused once: remembered, 0600, without the PIN in it.
        assert!(guard(Some(d.path()), &pin, "t", || login(false)).is_err());
        let marker = marker_path(d.path(), &pin);
        let body = std::fs::read_to_string(&marker).unwrap();
        assert!(!body.contains("1234"), "{body}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&marker).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The same content (CRLF or not) is not offered again.
        std::fs::write(&pin, "1234\r\n").unwrap();
        let e = guard(Some(d.path()), &pin, "t", || login(true)).unwrap_err();
        assert!(e.to_string().contains("not offered again"), "{e}");
        assert_eq!(calls.get(), 1);
        // A changed file is tried; success forgets the refusal.
        std::fs::write(&pin, "5678\n").unwrap();
        guard(Some(d.path()), &pin, "t", || login(true)).unwrap();
        assert_eq!(calls.get(), 2);
        assert!(!marker.exists());
        // Without a directory nothing is remembered.
        std::fs::write(&pin, "1234\n").unwrap();
        let _ = guard(None, &pin, "t", || login(false));
        assert_eq!(calls.get(), 3);
    }
}
