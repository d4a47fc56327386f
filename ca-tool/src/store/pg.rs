//! The PostgreSQL store: a connection pool (`deadpool-postgres` over
//! `tokio-postgres`, TLS by `tokio-postgres-rustls` on aws-lc-rs), the
//! schema ([`super::schema`]), the documents' generation and its change
//! feed (`LISTEN keyproof_ca` with a 1 s poll behind it), join tokens and
//! the ledger.

use std::path::Path;

use keyproof_identity::spiffe::SpiffeId;
use time::OffsetDateTime;

use super::{StoreError, Workspace};
use crate::ledger;
use crate::token::{self, TokenError};

/// The `NOTIFY` channel a checkin that changed documents signals on, with
/// the new generation as payload.
pub const CHANNEL: &str = "keyproof_ca";

/// A connected PostgreSQL store.
pub struct PgStore {
    /// The URL with its password masked, for messages.
    url: String,
}

/// A join token taken by [`PgStore::token_take`]: already marked used in
/// the database (so no other replica can take it); given back with
/// [`PgStore::token_give_back`] if no certificate was handed out.
#[derive(Debug, Clone)]
pub struct TakenToken {
    /// The token's id (first 16 hex digits of its SHA-256).
    pub id: String,
    /// The SPIFFE ID the token is bound to.
    pub spiffe_id: SpiffeId,
    /// When this replica marked it used (identifies the take, so a give-back
    /// never revives a token someone else took since).
    pub used_at: OffsetDateTime,
}

/// What `migrate` moved.
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    pub documents: usize,
    pub tokens: usize,
    pub used_tokens: usize,
    pub ledger_entries: usize,
    /// Key files left in the directory (they never go to the database).
    pub key_files: Vec<String>,
}

impl PgStore {
    /// Connects (pool of up to 16 connections, 5 s connect timeout) and
    /// checks the schema version; with `migrate`, applies missing
    /// migrations under an advisory lock first.
    pub async fn connect(url: &str, migrate: bool) -> Result<PgStore, StoreError> {
        let _ = (url, migrate);
        todo!("store: connect")
    }

    /// The URL, password masked.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One round trip, for `/ready`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        todo!("store: ping")
    }

    /// The documents' generation (0: no CA yet).
    pub async fn generation(&self) -> Result<i64, StoreError> {
        todo!("store: generation")
    }

    /// The generation as it changes: a task listens on [`CHANNEL`] and polls
    /// every second (so a lost notification or a reconnect costs at most a
    /// second). Starts the task on the first call.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<i64> {
        todo!("store: watch")
    }

    /// A workspace with the current documents, the key files of `key_dir`
    /// (`*.key`, `next/*.key`) and the live ledger (entries not yet
    /// expired) as `ledger.jsonl`. `exclusive` holds the advisory lock until
    /// [`PgStore::checkin`] or drop.
    pub async fn checkout(&self, key_dir: &Path, exclusive: bool) -> Result<Workspace, StoreError> {
        let _ = (key_dir, exclusive);
        todo!("store: checkout")
    }

    /// Writes back what changed in `ws`: new or changed key files into
    /// `key_dir` (0600, atomically) first; then, in one transaction, the
    /// documents (upserted, removed), new `tokens.jsonl` lines (tokens
    /// created or used), new `ledger.jsonl` lines, and, if any document
    /// changed, generation + 1 and `NOTIFY`. Fails with
    /// [`StoreError::Conflict`] if the generation moved since checkout; key
    /// files written for a failed transaction are put back as they were.
    pub async fn checkin(&self, key_dir: &Path, ws: Workspace) -> Result<(), StoreError> {
        let _ = (key_dir, ws);
        todo!("store: checkin")
    }

    /// Brings a read-only workspace (`serve`'s) up to date: documents of a
    /// newer generation and key files changed in `key_dir`, rewritten in
    /// place (each file atomically). Returns whether anything changed.
    pub async fn refresh(&self, key_dir: &Path, ws: &mut Workspace) -> Result<bool, StoreError> {
        let _ = (key_dir, ws);
        todo!("store: refresh")
    }

    /// Takes a join token presented to `serve` (its SHA-256, hex) in one
    /// statement: marked used by `replica` only if it exists, is unused and
    /// unexpired. Otherwise says why (invalid, reused, expired).
    pub async fn token_take(
        &self,
        sha256: &str,
        replica: &str,
    ) -> Result<Result<TakenToken, TokenError>, StoreError> {
        let _ = (sha256, replica);
        todo!("store: token_take")
    }

    /// Makes a taken token usable again (no certificate was handed out).
    pub async fn token_give_back(&self, t: &TakenToken) -> Result<(), StoreError> {
        let _ = t;
        todo!("store: token_give_back")
    }

    /// Appends ledger entries in one transaction (a serial already in the
    /// ledger is an error: nothing of the batch is written).
    pub async fn ledger_append(&self, entries: &[ledger::Entry]) -> Result<(), StoreError> {
        let _ = entries;
        todo!("store: ledger_append")
    }

    /// Every ledger entry, in issuance order, as JSON lines (the directory's
    /// `ledger.jsonl` format) to `out`; returns how many.
    pub async fn ledger_export(
        &self,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, StoreError> {
        let _ = out;
        todo!("store: ledger_export")
    }

    /// `keyproof-ca migrate`: moves a CA directory's state into an empty
    /// store (documents, tokens with their use, the whole ledger) in one
    /// transaction. Key files stay in the directory.
    pub async fn import_dir(&self, dir: &Path) -> Result<ImportReport, StoreError> {
        let _ = dir;
        todo!("store: import_dir")
    }
}

// Silence unused-import warnings until the implementation lands.
#[allow(dead_code)]
fn _uses(_: token::Record) {}
