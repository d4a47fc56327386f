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
//! Records are encoded on the request's task and handed over a bounded
//! channel to one writer thread, which writes each line whole and flushes
//! it: a slow disk or a blocked stdout never stalls a tokio worker. When
//! the writer falls [`QUEUE`] lines behind, new records are dropped and
//! counted (`keyproof_audit_records_total{result="dropped"}`), as are
//! failed writes (`failed`): the audit trail is not a reason to refuse
//! service, but its gaps are visible. A file is opened for appending only
//! and created readable by its owner alone, and reopened when rotation
//! renames or removes it (each record looks whether its path still names
//! the open file), so that no record goes to a file nobody will read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use prometheus::IntCounter;
use serde::Serialize;

use crate::config::AuditSink;
use crate::metrics::Metrics;

/// `result` of a decision to challenge (a request without a proof that must
/// carry one, answered with a challenge).
pub const CHALLENGED: &str = "challenged";
/// `result` of a refusal by a risk rule with action `deny`.
pub const DENIED: &str = "denied";
/// `result` of a verified request.
pub const OK: &str = "ok";

/// Lines the writer may fall behind by before records are dropped.
pub const QUEUE: usize = 4096;

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("inbound.stepup.audit_log: cannot open {path} for appending")]
pub struct AuditOpenError {
    /// The file (`-` for standard output).
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
    /// [`CHALLENGED`], [`DENIED`], [`OK`], the verification outcome that
    /// refused the request (`replay`, `bad_signature`, ...), or why no
    /// challenge could be issued (`table_full`, ...).
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

/// What the writer thread is handed.
enum Job {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(SyncSender<()>),
}

/// `keyproof_audit_records_total`'s children the writer counts.
#[derive(Clone)]
struct Counts {
    written: IntCounter,
    failed: IntCounter,
}

/// Where the records go: the queue to the writer thread, which ends when
/// this is dropped (after writing what was queued).
pub struct Audit {
    queue: SyncSender<Job>,
    sink: String,
    dropped: IntCounter,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Audit({})", self.sink)
    }
}

impl Audit {
    /// Opens the sink (standard output, or the file for appending: created
    /// with mode 0600; an existing file keeps its mode and content) and
    /// starts its writer thread.
    pub fn open(sink: &AuditSink, metrics: &Metrics) -> Result<Audit, AuditOpenError> {
        let (out, name): (Box<dyn Write + Send>, String) = match sink {
            AuditSink::Stdout => (Box::new(std::io::stdout()), "stdout".to_owned()),
            AuditSink::File(path) => (
                Box::new(AuditFile::open(path).map_err(|source| AuditOpenError {
                    path: path.clone(),
                    source,
                })?),
                path.display().to_string(),
            ),
        };
        Audit::start(out, name, metrics, QUEUE).map_err(|(name, source)| AuditOpenError {
            path: PathBuf::from(name),
            source,
        })
    }

    /// The writer thread on `out`, with room for `queue` lines.
    fn start(
        out: Box<dyn Write + Send>,
        name: String,
        metrics: &Metrics,
        queue: usize,
    ) -> Result<Audit, (String, std::io::Error)> {
        let [written, dropped, failed] = metrics.audit_records.clone();
        let counts = Counts { written, failed };
        let (tx, jobs) = mpsc::sync_channel(queue);
        let thread_sink = name.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("keyproof-audit".into())
            .spawn(move || write_lines(jobs, out, &thread_sink, &counts))
        {
            return Err((name, e));
        }
        Ok(Audit {
            queue: tx,
            sink: name,
            dropped,
        })
    }

    /// Queues one record, stamped now, for the writer. Never blocks: with
    /// the writer [`QUEUE`] lines behind, the record is dropped and counted.
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
        match self.queue.try_send(Job::Line(bytes)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
                tracing::debug!(sink = %self.sink, "step-up audit record dropped: the writer is behind");
            }
            Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
                tracing::warn!(sink = %self.sink, "step-up audit record dropped: the writer is gone");
            }
        }
    }

    /// Waits (blocking) until every record queued before this call is
    /// written: for shutdown and tests.
    pub fn flush(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.queue.send(Job::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// The writer thread: each line in one write, flushed, so a reader (or a
/// crash) never sees half a record.
fn write_lines(jobs: Receiver<Job>, mut out: Box<dyn Write + Send>, sink: &str, counts: &Counts) {
    for job in jobs {
        match job {
            Job::Line(bytes) => match out.write_all(&bytes).and_then(|()| out.flush()) {
                Ok(()) => counts.written.inc(),
                Err(e) => {
                    counts.failed.inc();
                    tracing::warn!(sink, error = %e, "step-up audit record not written");
                }
            },
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// The audit file, reopened (created anew) when its path no longer names
/// the file open: log rotation renamed or removed it. Looked at before each
/// record, never within one, so a record is never split across two files.
struct AuditFile {
    path: PathBuf,
    file: std::fs::File,
    /// Device and inode of `file`.
    id: (u64, u64),
    /// The next write starts a record.
    at_record: bool,
}

impl AuditFile {
    fn open(path: &Path) -> std::io::Result<AuditFile> {
        let file = open_append(path)?;
        Ok(AuditFile {
            path: path.to_owned(),
            id: file_id(&file.metadata()?),
            file,
            at_record: true,
        })
    }

    /// Reopens the path if it names another file now, or none.
    fn follow(&mut self) -> std::io::Result<()> {
        match std::fs::metadata(&self.path) {
            Ok(m) if file_id(&m) == self.id => Ok(()),
            _ => {
                let file = open_append(&self.path)?;
                self.id = file_id(&file.metadata()?);
                self.file = file;
                tracing::info!(file = %self.path.display(), "step-up audit log renamed or removed (rotated?): reopened");
                Ok(())
            }
        }
    }
}

impl Write for AuditFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.at_record {
            self.follow()?;
            self.at_record = false;
        }
        let written = self.file.write(buf);
        if written.is_err() {
            // The record failed (and is counted so): the next one starts
            // afresh, rotation looked at.
            self.at_record = true;
        }
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // `write_lines` flushes after each record.
        self.at_record = true;
        self.file.flush()
    }
}

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

/// Opens `path` for appending, created 0600. Never through a symbolic
/// link: whoever can write the log's directory could otherwise point the
/// records (reopened at each rotation) into any file the proxy may write.
#[cfg(unix)]
fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(not(unix))]
fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
}

/// Now in RFC 3339, UTC, to the millisecond, always three digits of it
/// (`...T12:00:00.200Z`): lines of one width sort by time as text.
fn now_rfc3339() -> String {
    rfc3339_millis(time::OffsetDateTime::now_utc())
}

fn rfc3339_millis(t: time::OffsetDateTime) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_always_have_three_digits_of_milliseconds() {
        let t = time::macros::datetime!(2026-12-04 21:41:42.2 UTC);
        assert_eq!(rfc3339_millis(t), "2026-12-04T21:41:42.200Z");
        let t = time::macros::datetime!(2026-12-04 21:41:42 UTC);
        assert_eq!(rfc3339_millis(t), "2026-12-04T21:41:42.000Z");
        let t = time::macros::datetime!(2026-12-04 21:41:42.123_999 +01:00);
        assert_eq!(rfc3339_millis(t), "2026-12-04T20:41:42.123Z");
    }
    use crate::testing::metric;

    fn metrics() -> Metrics {
        Metrics::new().expect("metrics")
    }

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
        let audit = Audit::open(&AuditSink::File(path.clone()), &metrics()).expect("open");
        audit.record(&RECORD);
        audit.record(&Record {
            reason: "app",
            result: OK,
            nonce_age_ms: Some(1234),
            ..RECORD
        });
        audit.flush();
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
        let first = Audit::open(&AuditSink::File(path.clone()), &metrics()).expect("open");
        first.record(&RECORD);
        first.flush();
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A restart appends: what was recorded stays.
        let again = Audit::open(&AuditSink::File(path.clone()), &metrics()).expect("open again");
        again.record(&RECORD);
        again.flush();
        assert_eq!(lines(&path).len(), 2);
    }

    #[test]
    #[cfg(unix)]
    fn a_rotated_file_is_reopened_and_no_record_is_lost() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let m = metrics();
        let audit = Audit::open(&AuditSink::File(path.clone()), &m).expect("open");
        audit.record(&RECORD);
        audit.flush();
        // Renamed away (logrotate's default): the next record starts a new
        // file at the path; the old one keeps what it had.
        let rotated = dir.path().join("audit.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        audit.record(&RECORD);
        audit.record(&RECORD);
        audit.flush();
        assert_eq!(lines(&rotated).len(), 1);
        assert_eq!(lines(&path).len(), 2);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Removed: the same, rather than writing into a deleted file.
        std::fs::remove_file(&path).expect("remove");
        audit.record(&RECORD);
        audit.flush();
        assert_eq!(lines(&path).len(), 1);
        let written =
            crate::testing::metric(&m, "keyproof_audit_records_total{result=\"written\"}");
        assert_eq!(written, 4.0);
        // A symbolic link put at the path is never followed: the record is
        // not written (and counted so) rather than sent into its target.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"").expect("victim");
        std::fs::remove_file(&path).expect("remove");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        audit.record(&RECORD);
        audit.flush();
        assert_eq!(std::fs::read(&victim).expect("victim"), b"");
        let failed = crate::testing::metric(&m, "keyproof_audit_records_total{result=\"failed\"}");
        assert_eq!(failed, 1.0);
    }

    #[test]
    fn records_written_at_once_never_interleave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let audit = std::sync::Arc::new(
            Audit::open(&AuditSink::File(path.clone()), &metrics()).expect("open"),
        );
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
        audit.flush();
        let got = lines(&path);
        assert_eq!(got.len(), 200);
        assert!(got.iter().all(|l| l["peer"] == long.as_str()));
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_the_key_and_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("no-such-dir").join("audit.log");
        let e = Audit::open(&AuditSink::File(path.clone()), &metrics()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("inbound.stepup.audit_log: "), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    /// A writer that waits for `gate` before its first write, then writes
    /// into `into` (or fails, when `into` is `None`).
    struct Slow {
        gate: Option<std::sync::mpsc::Receiver<()>>,
        into: Option<std::sync::Arc<std::sync::Mutex<Vec<u8>>>>,
    }

    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            match &self.into {
                Some(v) => {
                    v.lock().expect("lock").extend_from_slice(buf);
                    Ok(buf.len())
                }
                None => Err(std::io::Error::other("disk full")),
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_never_blocks_the_caller_and_drops_are_counted() {
        let m = metrics();
        let (open, gate) = std::sync::mpsc::channel();
        let into = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = Slow {
            gate: Some(gate),
            into: Some(into.clone()),
        };
        let audit = Audit::start(Box::new(out), "slow".into(), &m, 4).expect("start");
        let start = std::time::Instant::now();
        for i in 0..20u64 {
            audit.record(&Record {
                nonce_age_ms: Some(i),
                ..RECORD
            });
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        open.send(()).expect("open the gate");
        audit.flush();
        let text = String::from_utf8(into.lock().expect("lock").clone()).expect("utf-8");
        let ages: Vec<u64> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
                v["nonce_age_ms"].as_u64().expect("age")
            })
            .collect();
        // The first went to the (stalled) writer, four waited in the
        // queue, the rest were dropped; what was written kept its order.
        assert!((4..=6).contains(&ages.len()), "{ages:?}");
        assert!(ages.windows(2).all(|w| w[0] < w[1]), "{ages:?}");
        let count = |r: &str| {
            metric(
                &m,
                &format!("keyproof_audit_records_total{{result=\"{r}\"}}"),
            )
        };
        assert_eq!(count("written"), ages.len() as f64);
        assert_eq!(count("dropped"), (20 - ages.len()) as f64);
        assert_eq!(count("failed"), 0.0);
    }

    #[test]
    fn a_failed_write_is_counted_and_the_next_is_tried() {
        let m = metrics();
        let out = Slow {
            gate: None,
            into: None,
        };
        let audit = Audit::start(Box::new(out), "broken".into(), &m, QUEUE).expect("start");
        audit.record(&RECORD);
        audit.record(&RECORD);
        audit.flush();
        assert_eq!(
            metric(&m, "keyproof_audit_records_total{result=\"failed\"}"),
            2.0
        );
        assert_eq!(
            metric(&m, "keyproof_audit_records_total{result=\"written\"}"),
            0.0
        );
    }
}
