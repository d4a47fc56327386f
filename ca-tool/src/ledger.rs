//! `ledger.jsonl`: one JSON line per issued certificate, appended and synced
//! before the certificate is handed out. It is what `check` scans for
//! expiring certificates and what `rotate root finish` consults.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ca::{files, io_err, CaError};
use crate::fsutil;

/// One issuance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// Hex serial number.
    pub serial: String,
    pub spiffe_id: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// Hex subject key identifier of the issuing intermediate.
    pub issuer_key_id: String,
    /// Hex SHA-256 of the root the certificate chains to.
    #[serde(default)]
    pub root_sha256: String,
    /// Hex SHA-256 of the certificate DER.
    pub sha256: String,
    /// RFC 3339 time of issuance.
    pub issued_at: String,
    /// Who asked: `cli`, `renew:<spiffe id>`, `bootstrap:<token id>`,
    /// `bootstrap:sa:system:serviceaccount:<ns>:<sa>/<pod name>`.
    #[serde(default)]
    pub requester: String,
}

/// Appends one entry.
pub fn append(dir: &Path, entry: &Entry) -> Result<(), CaError> {
    append_all(dir, std::slice::from_ref(entry))
}

/// Appends entries with a single write and fsync (group commit).
pub fn append_all(dir: &Path, entries: &[Entry]) -> Result<(), CaError> {
    let path = dir.join(files::LEDGER);
    let mut lines = String::new();
    for e in entries {
        let line = serde_json::to_string(e).map_err(|err| CaError::Corrupt {
            path: path.clone(),
            msg: err.to_string(),
        })?;
        if !lines.is_empty() {
            lines.push('\n');
        }
        lines.push_str(&line);
    }
    fsutil::append_line(&path, &lines, 0o600).map_err(io_err(&path))
}

/// Reads every entry; a torn last line (a crash mid-append) is skipped, any
/// other bad line is an error naming its number.
pub fn read_all(dir: &Path) -> Result<Vec<Entry>, CaError> {
    let path = dir.join(files::LEDGER);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(e) => out.push(e),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
            Err(e) => {
                return Err(CaError::Corrupt {
                    path: path.clone(),
                    msg: format!("line {}: {e}", i + 1),
                })
            }
        }
    }
    Ok(out)
}
