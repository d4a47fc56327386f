//! Step-up audit records (`[inbound.stepup] audit_log`): one JSON line per
//! step-up decision (a challenge, a risk rule's refusal) and per
//! verification, so that a security team can answer "who proved what,
//! when" from the records alone.
//!
//! A record names the caller (SPIFFE ID and certificate serial), the route,
//! the reason (`always`, `app` or the risk rule) and the result; for a
//! verification that got as far as opening its nonce, how long the caller
//! took to answer it. Never a signature, a nonce or a key: the log must not
//! become something worth stealing.
//!
//! Each line goes out in one write under a lock, so that concurrent records
//! never interleave; a file is opened for appending only and created
//! readable by its owner alone.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::config::AuditSink;

/// `result` of a decision to challenge (a request without a proof that must
/// carry one).
pub const CHALLENGED: &str = "challenged";
/// `result` of a refusal by a risk rule with action `deny`.
pub const DENIED: &str = "denied";
/// `result` of a verified request.
pub const OK: &str = "ok";

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("inbound.stepup.audit_log: cannot open {path} for appending")]
pub struct AuditOpenError {
    /// The file.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// One record, before its time is stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The caller's SPIFFE ID.
    pub peer: &'a str,
    /// The caller's certificate serial (lowercase hex, no leading zeros).
    pub serial: &'a str,
    /// The route's `path_prefix`.
    pub route: &'a str,
    /// `always`, `app`, or the risk rule's name.
    pub reason: &'a str,
    /// [`CHALLENGED`], [`DENIED`], [`OK`] or the verification outcome that
    /// refused the request (`replay`, `bad_signature`, ...).
    pub result: &'a str,
    /// For a verification whose nonce was opened: milliseconds from the
    /// nonce's issue (second precision) to the verification.
    pub nonce_age_ms: Option<u64>,
}

/// The line as written: the record's fields after the time.
#[derive(Serialize)]
struct Line<'a> {
    time: &'a str,
    peer: &'a str,
    serial: &'a str,
    route: &'a str,
    reason: &'a str,
    result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce_age_ms: Option<u64>,
}

enum Sink {
    Stdout,
    File {
        path: PathBuf,
        file: Mutex<std::fs::File>,
    },
}

/// Where the records go.
pub struct Audit {
    sink: Sink,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sink {
            Sink::Stdout => f.write_str("Audit(stdout)"),
            Sink::File { path, .. } => write!(f, "Audit({})", path.display()),
        }
    }
}

impl Audit {
    /// Opens the sink: standard output, or the file for appending (created
    /// with mode 0600; an existing file keeps its mode and content).
    pub fn open(sink: &AuditSink) -> Result<Audit, AuditOpenError> {
        let sink = match sink {
            AuditSink::Stdout => Sink::Stdout,
            AuditSink::File(path) => Sink::File {
                file: Mutex::new(open_append(path).map_err(|source| AuditOpenError {
                    path: path.clone(),
                    source,
                })?),
                path: path.clone(),
            },
        };
        Ok(Audit { sink })
    }

    /// Writes one record, stamped now. A failed write is logged and the
    /// request goes on: the audit trail is not a reason to refuse service.
    pub fn record(&self, r: &Record<'_>) {
        let time = now_rfc3339();
        let line = Line {
            time: &time,
            peer: r.peer,
            serial: r.serial,
            route: r.route,
            reason: r.reason,
            result: r.result,
            nonce_age_ms: r.nonce_age_ms,
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "step-up audit record not encoded");
                return;
            }
        };
        bytes.push(b'\n');
        let written = match &self.sink {
            // Stdout is line-buffered: a whole line written at once goes
            // out in one write, and its lock keeps lines whole.
            Sink::Stdout => std::io::stdout().lock().write_all(&bytes),
            Sink::File { file, .. } => file
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .write_all(&bytes),
        };
        if let Err(e) = written {
            tracing::warn!(sink = ?self, error = %e, "step-up audit record not written");
        }
    }
}

#[cfg(unix)]
fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
}

/// Now in RFC 3339, UTC, to the millisecond.
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_millisecond(now.millisecond()).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// Milliseconds since the Unix epoch (for nonce ages).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("read audit log")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    const RECORD: Record<'static> = Record {
        peer: "spiffe://td/ns/shop/sa/web",
        serial: "8f0a",
        route: "/payments",
        reason: "burst",
        result: CHALLENGED,
        nonce_age_ms: None,
    };

    #[test]
    fn each_record_is_one_json_line_with_its_fields_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let audit = Audit::open(&AuditSink::File(path.clone())).expect("open");
        audit.record(&RECORD);
        audit.record(&Record {
            reason: "app",
            result: OK,
            nonce_age_ms: Some(1234),
            ..RECORD
        });
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.ends_with('\n'));
        let first = text.lines().next().expect("a line");
        assert!(
            first.starts_with("{\"time\":\"")
                && first.contains(
                    "\",\"peer\":\"spiffe://td/ns/shop/sa/web\",\"serial\":\"8f0a\",\"route\":\"/payments\",\"reason\":\"burst\",\"result\":\"challenged\"}"
                ),
            "{first}"
        );
        let got = lines(&path);
        assert_eq!(got[0].get("nonce_age_ms"), None, "only for verifications");
        assert_eq!(got[1]["reason"], "app");
        assert_eq!(got[1]["result"], "ok");
        assert_eq!(got[1]["nonce_age_ms"], 1234);
        for l in &got {
            let t = l["time"].as_str().expect("time");
            let parsed =
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .expect("RFC 3339");
            assert!(t.ends_with('Z'), "UTC: {t}");
            let age = time::OffsetDateTime::now_utc() - parsed;
            assert!(age.whole_seconds().abs() < 60, "{t}");
        }
    }

    #[test]
    fn the_file_is_created_owner_only_and_appended_to() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        Audit::open(&AuditSink::File(path.clone()))
            .expect("open")
            .record(&RECORD);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A restart appends: what was recorded stays.
        Audit::open(&AuditSink::File(path.clone()))
            .expect("open again")
            .record(&RECORD);
        assert_eq!(lines(&path).len(), 2);
    }

    #[test]
    fn records_written_at_once_never_interleave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let audit = std::sync::Arc::new(Audit::open(&AuditSink::File(path.clone())).expect("open"));
        let long = "x".repeat(3000);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (audit, long) = (audit.clone(), long.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        audit.record(&Record {
                            peer: &long,
                            ..RECORD
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer");
        }
        let got = lines(&path);
        assert_eq!(got.len(), 200);
        assert!(got.iter().all(|l| l["peer"] == long.as_str()));
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_the_key_and_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("no-such-dir").join("audit.log");
        let e = Audit::open(&AuditSink::File(path.clone())).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("inbound.stepup.audit_log: "), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}
