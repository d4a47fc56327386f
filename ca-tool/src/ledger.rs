//! `ledger.jsonl`: one JSON line per issued certificate, appended and synced
//! before the certificate is handed out. It is what `check` scans for
//! expiring certificates and what `rotate root finish` consults.
//! [`GroupWriter`] is how `serve` appends: with group commit, one fsync (or,
//! on PostgreSQL, one transaction: see [`Sink`]) for every issuance that
//! arrived while the previous one ran.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::Histogram;
use tokio::sync::{mpsc, oneshot};

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
    /// For a renewal: the hex serial of the certificate the caller
    /// presented, so that revoking a certificate also reaches what was
    /// renewed from it (see [`crate::revoke`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_from: Option<String>,
}

/// Appends one entry.
pub fn append(dir: &Path, entry: &Entry) -> Result<(), CaError> {
    append_all(dir, std::slice::from_ref(entry))
}

/// Appends entries with a single write and fsync (group commit).
pub fn append_all(dir: &Path, entries: &[Entry]) -> Result<(), CaError> {
    // A `serve --dir` started before `migrate` records nothing more here.
    crate::migrated::refuse(dir)?;
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

/// Reads every entry. A torn last line (a crash mid-append) is skipped
/// silently: it is what a crash leaves. A torn line elsewhere (an append
/// made after one by a version that glued onto it) is skipped with a
/// warning on standard error, recovering the whole entry glued onto it:
/// one torn append must not stop `revoke`, `check` and `ledger export`
/// for good, and the entry after it is a real issuance `revoke` needs.
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
        if i + 1 == lines.len() && !text.ends_with('\n') {
            if let Ok(e) = serde_json::from_str(line) {
                out.push(e);
            }
            continue;
        }
        match fsutil::parse_json_line(line) {
            Ok((e, false)) => out.push(e),
            Ok((e, true)) => {
                eprintln!(
                    "warning: {}: line {}: skipped a torn entry glued before a whole one",
                    path.display(),
                    i + 1
                );
                out.push(e)
            }
            Err(e) => eprintln!(
                "warning: {}: line {}: skipped a torn or unreadable entry: {e}",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(out)
}

/// How long an observation of the ledger's health (a commit's outcome or a
/// look at the file) stands before `/ready` looks at the file again.
const LEDGER_RECHECK: Duration = Duration::from_secs(1);

/// The latest word on the ledger's health: when it was observed (a commit
/// ended, or `/ready` looked at the file), and what was wrong if anything.
type LedgerStatus = Arc<Mutex<Option<(Instant, Option<String>)>>>;

/// Where [`GroupWriter`] appends.
#[derive(Clone)]
pub enum Sink {
    /// `ledger.jsonl` in this CA directory.
    Dir(PathBuf),
    /// The `ledger` table of the PostgreSQL store, one transaction per
    /// batch ([`crate::store::PgStore::ledger_append`]); `failed` counts
    /// the batches that could not be written (the server's
    /// `keyproof_ca_store_errors_total{op="ledger_append"}`).
    Postgres {
        db: Arc<crate::store::PgStore>,
        failed: prometheus::IntCounter,
    },
}

impl Sink {
    /// Appends `entries` in one write and fsync, or one transaction.
    async fn append(&self, entries: Vec<Entry>) -> Result<(), String> {
        match self {
            Sink::Dir(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || append_all(&dir, &entries))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            }
            Sink::Postgres { db, failed } => {
                let r = db.ledger_append(&entries).await.map_err(|e| e.to_string());
                if r.is_err() {
                    failed.inc();
                }
                r
            }
        }
    }
}

/// Appends to the ledger from the server's tasks with group commit: one
/// write and fsync covers every entry that arrived while the previous one
/// ran. It also answers whether the ledger is writable, for `/ready`.
#[derive(Clone)]
pub struct GroupWriter {
    tx: mpsc::Sender<(Entry, oneshot::Sender<Result<(), String>>)>,
    status: LedgerStatus,
}

impl GroupWriter {
    /// Starts the writer task (on the current tokio runtime).
    pub fn start(sink: Sink, commit_seconds: Histogram) -> GroupWriter {
        let (tx, mut rx) = mpsc::channel::<(Entry, oneshot::Sender<Result<(), String>>)>(4096);
        let status = LedgerStatus::default();
        let last = status.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Let the tasks already runnable go first: under load some of
                // them are about to log an issuance too, and joining this
                // batch saves them an fsync each. When idle this returns at
                // once, so it adds no latency.
                tokio::task::yield_now().await;
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                let entries: Vec<Entry> = batch.iter().map(|(e, _)| e.clone()).collect();
                let started = Instant::now();
                let result = sink.append(entries).await;
                commit_seconds.observe(started.elapsed().as_secs_f64());
                *last.lock().unwrap_or_else(|p| p.into_inner()) = Some((
                    Instant::now(),
                    result
                        .clone()
                        .err()
                        .map(|e| format!("the last ledger commit failed: {e}")),
                ));
                for (_, reply) in batch {
                    let _ = reply.send(result.clone());
                }
            }
        });
        GroupWriter { tx, status }
    }

    /// Appends `e`; returns once it is on disk (or failed to get there).
    pub async fn record(&self, e: Entry) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((e, tx))
            .await
            .map_err(|_| "ledger writer stopped".to_string())?;
        rx.await.map_err(|_| "ledger writer stopped".to_string())?
    }

    /// Whether the ledger can be appended to: the latest observation while
    /// it is under [`LEDGER_RECHECK`] old, otherwise a fresh look at the file
    /// (opened for append, never written) or, before the first issuance, at
    /// the directory. So a ledger that breaks right after a good commit, or
    /// recovers after a failed one, shows within a second or so, and
    /// frequent probes cost at most one look a second.
    pub fn writable(&self, dir: &Path) -> Result<(), String> {
        let mut last = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, problem)) = &*last {
            if at.elapsed() < LEDGER_RECHECK {
                return problem.clone().map_or(Ok(()), Err);
            }
        }
        let path = dir.join(files::LEDGER);
        let problem = match std::fs::OpenOptions::new().append(true).open(&path) {
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => tempfile::tempfile_in(dir)
                .err()
                .map(|e| format!("{} is not writable: {e}", dir.display())),
            Err(e) => Some(format!("{}: {e}", path.display())),
        };
        *last = Some((Instant::now(), problem.clone()));
        problem.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(serial: &str) -> Entry {
        Entry {
            serial: serial.into(),
            spiffe_id: "spiffe://example.org/w".into(),
            not_before: "2026-01-01T00:00:00Z".into(),
            not_after: "2036-01-01T00:00:00Z".into(),
            issuer_key_id: "ab".into(),
            root_sha256: String::new(),
            sha256: "cd".into(),
            issued_at: "2026-01-01T00:00:00Z".into(),
            requester: "cli".into(),
            renewed_from: None,
        }
    }

    /// A torn append followed by another append used to glue both into
    /// one bad line that was no longer last: every later read failed, so
    /// `revoke`, `check` and `ledger export` did (adv33 F6).
    #[test]
    fn an_append_after_a_torn_line_keeps_the_ledger_readable() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        append(d, &entry("01")).unwrap();
        let path = d.join(files::LEDGER);
        let mut text = fs::read_to_string(&path).unwrap();
        let whole = serde_json::to_string(&entry("02")).unwrap();
        text.push_str(&whole[..whole.len() / 2]);
        fs::write(&path, &text).unwrap();
        append(d, &entry("03")).unwrap();
        let serials: Vec<String> = read_all(d).unwrap().into_iter().map(|e| e.serial).collect();
        assert_eq!(serials, ["01", "03"]);
        // A ledger glued by an older version: the glued entry is kept.
        fs::write(
            &path,
            format!(
                "{text}{}\n{}\n",
                serde_json::to_string(&entry("04")).unwrap(),
                serde_json::to_string(&entry("05")).unwrap()
            ),
        )
        .unwrap();
        let serials: Vec<String> = read_all(d).unwrap().into_iter().map(|e| e.serial).collect();
        assert_eq!(serials, ["01", "04", "05"]);
    }
}
