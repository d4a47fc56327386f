//! The PostgreSQL store: a connection pool (`deadpool-postgres` over
//! `tokio-postgres`, TLS by `tokio-postgres-rustls` on aws-lc-rs), the
//! schema ([`super::schema`]), the documents' generation and its change
//! feed (`LISTEN keyproof_ca` with a 1 s poll behind it), join tokens and
//! the ledger.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use keyproof_identity::spiffe::SpiffeId;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Socket, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::workspace::{self, Kind};
use super::{schema, tls, StoreError, Workspace};
use crate::ca::{self, files};
use crate::ledger;
use crate::token::{self, TokenError};

/// The `NOTIFY` channel a checkin that changed documents signals on, with
/// the new generation as payload.
pub const CHANNEL: &str = "keyproof_ca";

/// The session advisory lock commands that change documents hold from
/// checkout to checkin (`migrate` takes it for its transaction).
pub const CA_LOCK: i64 = 0x6b70_6361_0000_0002; // "kpca" 2

/// Connections in the pool.
const POOL_SIZE: usize = 16;
/// Connecting (TCP, TLS, authentication) gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Any statement gives up after this (a lock wait included).
const STATEMENT_TIMEOUT: &str = "30s";
/// The change feed's poll of the generation.
const POLL: Duration = Duration::from_secs(1);

/// A connected PostgreSQL store.
pub struct PgStore {
    /// The URL with its password masked, for messages.
    url: String,
    pool: Pool,
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    feed: OnceLock<Feed>,
}

/// The change feed's channel and task.
struct Feed {
    tx: tokio::sync::watch::Sender<i64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(f) = self.feed.get() {
            f.task.abort();
        }
    }
}

/// A connection of its own, outside the pool, holding a session advisory
/// lock: dropping it closes the session, which releases the lock.
pub struct LockConn {
    client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LockConn {
    fn drop(&mut self) {
        self.task.abort();
    }
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
    /// Who took it (the `replica` given to [`PgStore::token_take`]).
    pub used_by: String,
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

/// The SQLSTATE classes and codes that mean "the database is not there for
/// us" rather than "this statement failed": connection exceptions,
/// authentication, shutdown, too many connections, no such database.
fn unreachable_code(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("28")
        || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "3D000")
}

impl PgStore {
    /// Connects (pool of up to 16 connections, 5 s connect timeout) and
    /// checks the schema version; with `migrate`, applies missing
    /// migrations under an advisory lock first.
    pub async fn connect(url: &str, migrate: bool) -> Result<PgStore, StoreError> {
        let parsed = tls::parse(url)?;
        let mut config = parsed.config;
        config.connect_timeout(CONNECT_TIMEOUT);
        // A database host that vanishes (no RST) is noticed in seconds,
        // not after the kernel's 15 minutes: unacknowledged data or
        // keepalives fail the connection, and the query with it.
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        config.tcp_user_timeout(Duration::from_secs(10));
        let options = match config.get_options() {
            Some(o) => format!("{o} -c statement_timeout={STATEMENT_TIMEOUT}"),
            None => format!("-c statement_timeout={STATEMENT_TIMEOUT}"),
        };
        config.options(&options);
        if config.get_application_name().is_none() {
            config.application_name("keyproof-ca");
        }
        let mgr = Manager::from_config(
            config.clone(),
            parsed.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
            .wait_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Db(format!("connection pool: {e}")))?;
        let store = PgStore {
            url: parsed.masked,
            pool,
            config,
            tls: parsed.tls,
            feed: OnceLock::new(),
        };
        if migrate {
            store.migrate().await?;
        } else {
            store.check_schema().await?;
        }
        Ok(store)
    }

    /// The URL, password masked.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn unreachable(&self, msg: impl Into<String>) -> StoreError {
        StoreError::Unreachable {
            url: self.url.clone(),
            msg: msg.into(),
        }
    }

    /// Sorts a driver error into "the database is unreachable" (retry
    /// later) and "this statement failed".
    fn err(&self, e: tokio_postgres::Error) -> StoreError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let mut msg = db.message().to_owned();
            if let Some(d) = db.detail() {
                msg.push_str(&format!(" ({d})"));
            }
            if unreachable_code(code) {
                return self.unreachable(msg);
            }
            if code == "57014" {
                msg.push_str(&format!(
                    " (statement_timeout {STATEMENT_TIMEOUT}: is another keyproof-ca command \
                     holding the CA lock?)"
                ));
            }
            return StoreError::Db(format!("{msg} [SQLSTATE {code}]"));
        }
        let text = error_text(&e);
        if text.starts_with("error deserializing") || text.starts_with("error serializing") {
            StoreError::Db(text)
        } else {
            self.unreachable(text)
        }
    }

    fn pool_err(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::Backend(e) => self.err(e),
            PoolError::Timeout(t) => self.unreachable(format!("timed out ({t:?})")),
            e => self.unreachable(e.to_string()),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| self.pool_err(e))
    }

    /// A connection outside the pool, its driver running as a task.
    async fn dedicated(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                Socket,
                <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream,
            >,
        ),
        StoreError,
    > {
        self.config
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.err(e))
    }

    async fn schema_version(&self, c: &Transaction<'_>) -> Result<i32, StoreError> {
        let row = c
            .query_one("SELECT to_regclass('keyproof_schema') IS NOT NULL", &[])
            .await
            .map_err(|e| self.err(e))?;
        if !row.get::<_, bool>(0) {
            return Ok(0);
        }
        let row = c
            .query_one("SELECT coalesce(max(version), 0) FROM keyproof_schema", &[])
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.get(0))
    }

    async fn check_schema(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        let found = self.schema_version(&tx).await?;
        drop(tx);
        if found > schema::VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                known: schema::VERSION,
            });
        }
        if found < schema::VERSION {
            return Err(StoreError::SchemaTooOld {
                found,
                known: schema::VERSION,
            });
        }
        Ok(())
    }

    /// Applies the missing migrations in one transaction under
    /// `pg_advisory_xact_lock`, so replicas starting together apply each
    /// once; refuses a schema newer than this binary's.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&schema::MIGRATION_LOCK],
        )
        .await
        .map_err(|e| self.err(e))?;
        // `CREATE TABLE IF NOT EXISTS` would log a NOTICE on every start.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await
            .map_err(|e| self.err(e))?;
        tx.batch_execute(schema::BOOTSTRAP)
            .await
            .map_err(|e| self.err(e))?;
        let found = self.schema_version(&tx).await?;
        if found > schema::VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                known: schema::VERSION,
            });
        }
        for (version, sql) in schema::MIGRATIONS.iter().filter(|(v, _)| *v > found) {
            tx.batch_execute(sql).await.map_err(|e| self.err(e))?;
            tx.execute(
                "INSERT INTO keyproof_schema (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// One round trip, for `/ready`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.simple_query("SELECT 1").await.map_err(|e| self.err(e))?;
        Ok(())
    }

    /// One document (`bundle.pem`, `ca.json`, ...) as it is now, if the
    /// store holds it: for readers that need nothing else (`k8s-bundle`).
    pub async fn document(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt("SELECT body FROM ca_documents WHERE name = $1", &[&name])
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The documents' generation (0: no CA yet).
    pub async fn generation(&self) -> Result<i64, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one("SELECT generation FROM ca_meta", &[])
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.get(0))
    }

    /// The generation as it changes: a task listens on [`CHANNEL`] and polls
    /// every second (so a lost notification or a reconnect costs at most a
    /// second). Starts the task on the first call (which must be inside a
    /// tokio runtime). The value is 0 until the first read succeeds.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<i64> {
        self.feed
            .get_or_init(|| {
                let (tx, _) = tokio::sync::watch::channel(0i64);
                let task = tokio::spawn(follow(
                    self.config.clone(),
                    self.tls.clone(),
                    tx.clone(),
                    self.url.clone(),
                ));
                Feed { tx, task }
            })
            .tx
            .subscribe()
    }

    /// A workspace with the current documents, the key files of `key_dir`
    /// (`*.key`, `next/*.key`), the live ledger (entries not yet expired)
    /// as `ledger.jsonl` and the unexpired join tokens as `tokens.jsonl`.
    /// `exclusive` holds the advisory lock until [`PgStore::checkin`] or
    /// drop.
    ///
    /// Keys are resolved by content (see [`workspace::resolve_keys`]): each
    /// certificate gets the key file of the key directory that is its key.
    pub async fn checkout(&self, key_dir: &Path, exclusive: bool) -> Result<Workspace, StoreError> {
        self.checkout_as(key_dir, exclusive, false, true).await
    }

    /// [`PgStore::checkout`] for a command that never signs with a root
    /// key (`issue`, `token create`): the workspace, a copy in the
    /// temporary directory, gets none.
    pub async fn checkout_without_roots(
        &self,
        key_dir: &Path,
        exclusive: bool,
    ) -> Result<Workspace, StoreError> {
        self.checkout_as(key_dir, exclusive, false, false).await
    }

    /// `serve`'s read-only workspace: as [`PgStore::checkout`] without the
    /// lock, and without the root keys (`serve` never signs with them).
    /// When the current intermediate's key is not in `key_dir` yet, it runs
    /// on the previous intermediate ([`Workspace::fallback`] says so, here
    /// and after each [`PgStore::refresh`]): the replica lags, and starts.
    pub async fn checkout_serve(&self, key_dir: &Path) -> Result<Workspace, StoreError> {
        self.checkout_as(key_dir, false, true, false).await
    }

    async fn checkout_as(
        &self,
        key_dir: &Path,
        exclusive: bool,
        read_only: bool,
        roots: bool,
    ) -> Result<Workspace, StoreError> {
        let lock = if exclusive {
            let (client, conn) = self.dedicated().await?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let lock = LockConn { client, task };
            lock.client
                .execute("SELECT pg_advisory_lock($1)", &[&CA_LOCK])
                .await
                .map_err(|e| self.err(e))?;
            Some(Box::new(lock))
        } else {
            None
        };
        let mut c = self.client().await?;
        // Without the lock, a shared hold of it for the reads: a rotation
        // running now writes its keys into `key_dir` before it commits its
        // documents, so documents and keys are only read together once it
        // is done (and none starts until they are read). Read committed:
        // each read sees what committed before it, not a snapshot taken
        // before the wait.
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
            .read_only(true)
            .start()
            .await
            .map_err(|e| self.err(e))?;
        if !exclusive {
            tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&CA_LOCK])
                .await
                .map_err(|e| self.err(e))?;
        }
        let (generation, docs) = self.read_docs(&tx).await?;
        let dir_keys = workspace::scan(key_dir, |k| k == Kind::Key)?;
        let (mut keys, fallback) = workspace::resolve_keys(&docs, &dir_keys, read_only);
        if !roots {
            // Never written to the workspace, so never seen as removed at
            // checkin either.
            keys.retain(|n, _| !workspace::is_root_key(n));
        }
        let token_rows = tx
            .query(
                // Expired tokens are of no use to any command.
                "SELECT id, sha256, spiffe_id, expires_at, created_at, used_at FROM join_tokens \
                 WHERE expires_at > now() ORDER BY created_at, id",
                &[],
            )
            .await
            .map_err(|e| self.err(e))?;
        let ledger_rows = tx
            .query(
                &format!("{LEDGER_SELECT} WHERE not_after > now() ORDER BY seq"),
                &[],
            )
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        drop(c);

        // 0700: it holds copies of the key files. Named for this process,
        // so that the next one can remove it if this one is killed.
        workspace::sweep_stale(&std::env::temp_dir());
        let dir = tempfile::Builder::new()
            .prefix(&workspace::prefix_for(std::process::id()))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .map_err(|source| StoreError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        for (name, body) in &docs {
            workspace::write(dir.path(), name, body)?;
        }
        for (name, body) in fallback.iter().chain(&keys) {
            workspace::write(dir.path(), name, body)?;
        }
        let mut tokens = String::new();
        let mut used = String::new();
        for r in &token_rows {
            let (id, sha256, spiffe_id, expires_at, created_at, used_at) = token_of(r)?;
            let line = |rec: &token::Record| serde_json::to_string(rec).unwrap_or_default();
            tokens.push_str(&line(&token::Record::Token {
                id: id.clone(),
                sha256,
                spiffe_id,
                expires_at: ca::rfc3339(expires_at),
                created_at: ca::rfc3339(created_at),
            }));
            tokens.push('\n');
            if let Some(at) = used_at {
                used.push_str(&line(&token::Record::Used {
                    id,
                    used_at: ca::rfc3339(at),
                }));
                used.push('\n');
            }
        }
        tokens.push_str(&used);
        let mut ledger_text = String::new();
        for r in &ledger_rows {
            ledger_text.push_str(&entry_line(&entry_of(r)?)?);
            ledger_text.push('\n');
        }
        let secret = |name: &str, text: &str| -> Result<(), StoreError> {
            let path = dir.path().join(name);
            crate::fsutil::write_atomic(&path, text.as_bytes(), crate::fsutil::SECRET).map_err(
                |source| StoreError::Io {
                    path: path.clone(),
                    source,
                },
            )
        };
        if !tokens.is_empty() {
            secret(files::TOKENS, &tokens)?;
        }
        if !ledger_text.is_empty() {
            secret(files::LEDGER, &ledger_text)?;
        }
        Ok(Workspace {
            dir,
            generation,
            docs,
            keys,
            dir_keys,
            fallback,
            serve: read_only,
            ledger_len: ledger_text.len() as u64,
            tokens_len: tokens.len() as u64,
            lock,
        })
    }

    async fn read_docs(
        &self,
        c: &Transaction<'_>,
    ) -> Result<(i64, BTreeMap<String, Vec<u8>>), StoreError> {
        let generation: i64 = c
            .query_one("SELECT generation FROM ca_meta", &[])
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        let mut docs = BTreeMap::new();
        for r in c
            .query("SELECT name, body FROM ca_documents", &[])
            .await
            .map_err(|e| self.err(e))?
        {
            let name: String = r.get(0);
            workspace::check_rel(&name)?;
            // Keys never live in the database: a row named like one is
            // corrupt (or planted) and must not reach a key file.
            if workspace::kind(&name) == Kind::Key {
                tracing::warn!(
                    document = %name,
                    "corrupt document in the store: a key name; ignored (keys never live in the \
                     database)"
                );
                continue;
            }
            docs.insert(name, r.get(1));
        }
        Ok((generation, docs))
    }

    /// Writes back what changed in `ws`: new or changed key files into
    /// `key_dir` (0600, atomically) first; then, in one transaction, the
    /// documents (upserted, removed), new `tokens.jsonl` lines (tokens
    /// created or used), new `ledger.jsonl` lines, and, if any document
    /// changed, generation + 1 and `NOTIFY`. Fails with
    /// [`StoreError::Conflict`] if the generation moved since checkout; key
    /// files written for a failed transaction are put back as they were.
    pub async fn checkin(&self, key_dir: &Path, mut ws: Workspace) -> Result<(), StoreError> {
        let now_docs = workspace::scan(ws.path(), |k| k == Kind::Document)?;
        let now_keys = workspace::scan(ws.path(), |k| k == Kind::Key)?;
        let upserts: Vec<(&String, &Vec<u8>)> = now_docs
            .iter()
            .filter(|(n, b)| ws.docs.get(*n) != Some(*b))
            .collect();
        let deletes: Vec<&String> = ws
            .docs
            .keys()
            .filter(|n| !now_docs.contains_key(*n))
            .collect();
        let key_writes: Vec<(&String, &Vec<u8>)> = now_keys
            .iter()
            .filter(|(n, b)| ws.keys.get(*n) != Some(*b))
            .collect();
        let key_removes: Vec<&String> = ws
            .keys
            .keys()
            .filter(|n| !now_keys.contains_key(*n))
            .collect();
        let new_tokens: Vec<token::Record> = new_lines(
            &ws.path().join(files::TOKENS),
            ws.tokens_len,
            "token record",
        )?;
        let new_entries: Vec<ledger::Entry> = new_lines(
            &ws.path().join(files::LEDGER),
            ws.ledger_len,
            "ledger entry",
        )?;
        let docs_changed = !upserts.is_empty() || !deletes.is_empty();
        if !docs_changed
            && key_writes.is_empty()
            && key_removes.is_empty()
            && new_tokens.is_empty()
            && new_entries.is_empty()
        {
            return Ok(());
        }
        if docs_changed {
            // Before touching a key: a conflict found now costs nothing.
            let found = self.generation().await?;
            if found != ws.generation {
                return Err(StoreError::Conflict {
                    expected: ws.generation,
                    found,
                });
            }
        }

        // New keys first: a document naming a key that is not there yet
        // would break every replica; a key nothing names yet is harmless.
        // Removals last, once the documents no longer name those keys: a
        // process killed in between leaves an unused key, never a missing
        // one.
        let mut undo: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        let keys_result = (|| {
            if !key_writes.is_empty() {
                workspace::create_dir_private(key_dir)?;
            }
            for (name, body) in &key_writes {
                undo.push(((*name).clone(), read_opt(&key_dir.join(name))?));
                workspace::write(key_dir, name, body)?;
            }
            Ok::<(), StoreError>(())
        })();
        let result = match keys_result {
            Ok(()) => {
                self.commit_changes(
                    ws.generation,
                    docs_changed,
                    &upserts,
                    &deletes,
                    &new_tokens,
                    &new_entries,
                )
                .await
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Put the key directory back as it was (newest change last
            // undone first).
            for (name, before) in undo.into_iter().rev() {
                let _ = match before {
                    Some(b) => workspace::write(key_dir, &name, &b),
                    None => workspace::remove(key_dir, &name),
                };
            }
        } else {
            for name in &key_removes {
                if let Err(e) = workspace::remove(key_dir, name) {
                    tracing::warn!(key = %name, error = %e, "committed, but an unused key file could not be removed from the key directory");
                }
            }
        }
        if let Some(lock) = ws.lock.take() {
            let _ = lock
                .client
                .simple_query("SELECT pg_advisory_unlock_all()")
                .await;
        }
        result
    }

    async fn commit_changes(
        &self,
        generation: i64,
        docs_changed: bool,
        upserts: &[(&String, &Vec<u8>)],
        deletes: &[&String],
        new_tokens: &[token::Record],
        new_entries: &[ledger::Entry],
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        if docs_changed {
            let found: i64 = tx
                .query_one("SELECT generation FROM ca_meta FOR UPDATE", &[])
                .await
                .map_err(|e| self.err(e))?
                .get(0);
            if found != generation {
                return Err(StoreError::Conflict {
                    expected: generation,
                    found,
                });
            }
            for (name, body) in upserts {
                tx.execute(
                    "INSERT INTO ca_documents (name, body) VALUES ($1, $2) \
                     ON CONFLICT (name) DO UPDATE SET body = excluded.body",
                    &[name, body],
                )
                .await
                .map_err(|e| self.err(e))?;
            }
            for name in deletes {
                tx.execute("DELETE FROM ca_documents WHERE name = $1", &[name])
                    .await
                    .map_err(|e| self.err(e))?;
            }
        }
        self.insert_tokens(&tx, new_tokens, "cli").await?;
        self.insert_ledger(&tx, new_entries).await?;
        if docs_changed {
            self.bump(&tx).await?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// generation + 1 and `NOTIFY` (sent when the transaction commits).
    async fn bump(&self, tx: &Transaction<'_>) -> Result<i64, StoreError> {
        let g: i64 = tx
            .query_one(
                "UPDATE ca_meta SET generation = generation + 1 RETURNING generation",
                &[],
            )
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &g.to_string()])
            .await
            .map_err(|e| self.err(e))?;
        Ok(g)
    }

    async fn insert_tokens(
        &self,
        tx: &Transaction<'_>,
        records: &[token::Record],
        used_by: &str,
    ) -> Result<(usize, usize), StoreError> {
        let (mut created, mut used) = (0, 0);
        for r in records {
            match r {
                token::Record::Token {
                    id,
                    sha256,
                    spiffe_id,
                    expires_at,
                    created_at,
                } => {
                    let exp = parse_time(expires_at, "token record")?;
                    let cre = parse_time(created_at, "token record")?;
                    tx.execute(
                        "INSERT INTO join_tokens (id, sha256, spiffe_id, expires_at, created_at) \
                         VALUES ($1, $2, $3, $4, $5)",
                        &[id, sha256, spiffe_id, &exp, &cre],
                    )
                    .await
                    .map_err(|e| self.err(e))?;
                    created += 1;
                }
                token::Record::Used { id, used_at } => {
                    let at = parse_time(used_at, "token record")?;
                    tx.execute(
                        "UPDATE join_tokens SET used_at = $2, used_by = $3 \
                         WHERE id = $1 AND used_at IS NULL",
                        &[id, &at, &used_by],
                    )
                    .await
                    .map_err(|e| self.err(e))?;
                    used += 1;
                }
            }
        }
        Ok((created, used))
    }

    async fn insert_ledger(
        &self,
        tx: &Transaction<'_>,
        entries: &[ledger::Entry],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut cols: [Vec<String>; 6] = Default::default();
        let mut times: [Vec<OffsetDateTime>; 3] = Default::default();
        let mut renewed_from: Vec<Option<String>> = Vec::with_capacity(entries.len());
        for e in entries {
            renewed_from.push(e.renewed_from.clone());
            cols[0].push(e.serial.clone());
            cols[1].push(e.spiffe_id.clone());
            cols[2].push(e.issuer_key_id.clone());
            cols[3].push(e.root_sha256.clone());
            cols[4].push(e.sha256.clone());
            cols[5].push(e.requester.clone());
            times[0].push(parse_time(&e.not_before, "ledger entry")?);
            times[1].push(parse_time(&e.not_after, "ledger entry")?);
            times[2].push(parse_time(&e.issued_at, "ledger entry")?);
        }
        let params: [&(dyn ToSql + Sync); 10] = [
            &cols[0],
            &cols[1],
            &times[0],
            &times[1],
            &cols[2],
            &cols[3],
            &cols[4],
            &times[2],
            &cols[5],
            &renewed_from,
        ];
        // One statement for the batch; UNNEST keeps row order, so seq
        // follows the order given.
        tx.execute(
            "INSERT INTO ledger (serial, spiffe_id, not_before, not_after, issuer_key_id, \
             root_sha256, sha256, issued_at, requester, renewed_from) \
             SELECT a, b, c, d, e, f, g, h, i, j FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], \
             $5::text[], $6::text[], $7::text[], $8::timestamptz[], $9::text[], $10::text[]) \
             WITH ORDINALITY AS t(a, b, c, d, e, f, g, h, i, j, n) ORDER BY n",
            &params,
        )
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Brings a read-only workspace (`serve`'s) up to date: documents of a
    /// newer generation and key files changed in `key_dir`, rewritten in
    /// place (each file atomically; `ca.json` last). Returns whether
    /// anything changed. Key files are compared on every call, so a key
    /// that reaches `key_dir` after its documents (a Secret volume updates
    /// late) is picked up by a later call.
    pub async fn refresh(&self, key_dir: &Path, ws: &mut Workspace) -> Result<bool, StoreError> {
        let mut changed = false;
        let generation = self.generation().await?;
        if generation != ws.generation {
            let mut c = self.client().await?;
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| self.err(e))?;
            let (generation, docs) = self.read_docs(&tx).await?;
            tx.commit().await.map_err(|e| self.err(e))?;
            let mut writes: Vec<(&String, &Vec<u8>)> = docs
                .iter()
                .filter(|(n, b)| ws.docs.get(*n) != Some(*b))
                .collect();
            // ca.json says which files the rest are: it goes last.
            writes.sort_by_key(|(n, _)| n.as_str() == files::STATE);
            for (name, body) in writes {
                workspace::write(ws.path(), name, body)?;
                changed = true;
            }
            for name in ws.docs.keys().filter(|n| !docs.contains_key(*n)) {
                workspace::remove(ws.path(), name)?;
                changed = true;
            }
            ws.docs = docs;
            ws.generation = generation;
        }
        let dir_keys = workspace::scan(key_dir, |k| k == Kind::Key)?;
        if changed || dir_keys != ws.dir_keys {
            // The documents or the key directory moved: resolve again (a
            // key that matches no certificate yet is picked up later).
            ws.dir_keys = dir_keys;
            let (keys, fallback) = workspace::resolve_keys(&ws.docs, &ws.dir_keys, ws.serve);
            // Documents in or out of the fallback: what it puts, or the
            // stored document back.
            let names: std::collections::BTreeSet<&String> =
                fallback.keys().chain(ws.fallback.keys()).collect();
            for name in names {
                match fallback.get(name).or_else(|| ws.docs.get(name)) {
                    Some(body) => workspace::write(ws.path(), name, body)?,
                    None => workspace::remove(ws.path(), name)?,
                }
            }
            if fallback != ws.fallback {
                changed = true;
            }
            ws.fallback = fallback;
            for (name, body) in keys.iter().filter(|(n, b)| ws.keys.get(*n) != Some(*b)) {
                workspace::write(ws.path(), name, body)?;
            }
            for name in ws.keys.keys().filter(|n| !keys.contains_key(*n)) {
                workspace::remove(ws.path(), name)?;
            }
            if keys != ws.keys {
                changed = true;
            }
            ws.keys = keys;
        }
        Ok(changed)
    }

    /// Takes a join token presented to `serve` (its SHA-256, hex) in one
    /// statement: marked used by `replica` only if it exists, is unused and
    /// unexpired. Otherwise says why (invalid, reused, expired).
    pub async fn token_take(
        &self,
        sha256: &str,
        replica: &str,
    ) -> Result<Result<TakenToken, TokenError>, StoreError> {
        let c = self.client().await?;
        // clock_timestamp(): distinct per statement, so a take is told from
        // a later take of the same token by the same replica.
        let row = c
            .query_opt(
                "UPDATE join_tokens SET used_at = clock_timestamp(), used_by = $2 \
                 WHERE sha256 = $1 AND used_at IS NULL AND expires_at > now() \
                 RETURNING id, spiffe_id, used_at",
                &[&sha256, &replica],
            )
            .await
            .map_err(|e| self.err(e))?;
        if let Some(r) = row {
            let Ok(spiffe_id) = SpiffeId::parse(r.get::<_, &str>(1)) else {
                // Not a usable token after all: leave it as it was.
                let t = TakenToken {
                    id: r.get(0),
                    spiffe_id: SpiffeId::parse("spiffe://invalid/x")
                        .map_err(|e| StoreError::Db(e.to_string()))?,
                    used_at: r.get(2),
                    used_by: replica.to_owned(),
                };
                self.token_give_back(&t).await?;
                return Ok(Err(TokenError::Invalid));
            };
            return Ok(Ok(TakenToken {
                id: r.get(0),
                spiffe_id,
                used_at: r.get(2),
                used_by: replica.to_owned(),
            }));
        }
        let why = c
            .query_opt(
                "SELECT used_at IS NOT NULL, expires_at, expires_at <= now() \
                 FROM join_tokens WHERE sha256 = $1",
                &[&sha256],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(Err(match why {
            None => TokenError::Invalid,
            Some(r) if r.get::<_, bool>(2) => TokenError::Expired(
                r.try_get::<_, OffsetDateTime>(1)
                    .map(ca::rfc3339)
                    .unwrap_or_else(|_| "an unrepresentable time".into()),
            ),
            // Used, or taken by another request and given back between the
            // two statements: either way not this caller's to take now.
            Some(_) => TokenError::Reused,
        }))
    }

    /// Makes a taken token usable again (no certificate was handed out).
    /// Only this very take is undone: a token someone took since stays
    /// taken.
    pub async fn token_give_back(&self, t: &TakenToken) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "UPDATE join_tokens SET used_at = NULL, used_by = NULL \
             WHERE id = $1 AND used_by = $2 AND used_at = $3",
            &[&t.id, &t.used_by, &t.used_at],
        )
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Appends ledger entries in one transaction (a serial already in the
    /// ledger is an error: nothing of the batch is written).
    pub async fn ledger_append(&self, entries: &[ledger::Entry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        self.insert_ledger(&tx, entries).await?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    /// Every ledger entry, in issuance order, as JSON lines (the directory's
    /// `ledger.jsonl` format) to `out`; returns how many.
    pub async fn ledger_export(
        &self,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(&format!("{LEDGER_SELECT} ORDER BY seq"), &[])
            .await
            .map_err(|e| self.err(e))?;
        let io = |source| StoreError::Io {
            path: "standard output".into(),
            source,
        };
        for r in &rows {
            writeln!(out, "{}", entry_line(&entry_of(r)?)?).map_err(io)?;
        }
        out.flush().map_err(io)?;
        Ok(rows.len() as u64)
    }

    /// `keyproof-ca migrate`: moves a CA directory's state into an empty
    /// store (documents, tokens with their use, the whole ledger) in one
    /// transaction. Key files stay in the directory.
    pub async fn import_dir(&self, dir: &Path) -> Result<ImportReport, StoreError> {
        let docs = workspace::scan(dir, |k| k == Kind::Document)?;
        if !docs.contains_key(files::STATE) {
            return Err(StoreError::Io {
                path: dir.join(files::STATE),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a keyproof CA directory",
                ),
            });
        }
        let key_files: Vec<String> = workspace::scan(dir, |k| k == Kind::Key)?
            .into_keys()
            .collect();
        let tokens: Vec<token::Record> = new_lines(&dir.join(files::TOKENS), 0, "token record")?;
        let entries = ledger::read_all(dir).map_err(|e| StoreError::Corrupt {
            what: "ledger entry",
            msg: e.to_string(),
        })?;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CA_LOCK])
            .await
            .map_err(|e| self.err(e))?;
        let (_, existing) = self.read_docs(&tx).await?;
        if let Some(body) = existing.get(files::STATE) {
            return Err(StoreError::AlreadyHoldsCa(trust_domain_of(body)));
        }
        if !existing.is_empty() {
            return Err(StoreError::AlreadyHoldsCa(
                "unknown: documents without ca.json".into(),
            ));
        }
        for (name, body) in &docs {
            tx.execute(
                "INSERT INTO ca_documents (name, body) VALUES ($1, $2)",
                &[name, body],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        let (created, used) = self.insert_tokens(&tx, &tokens, "migrate").await?;
        // Large ledgers go in slices: one statement's arrays stay small.
        for chunk in entries.chunks(5000) {
            self.insert_ledger(&tx, chunk).await?;
        }
        self.bump(&tx).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(ImportReport {
            documents: docs.len(),
            tokens: created,
            used_tokens: used,
            ledger_entries: entries.len(),
            key_files,
        })
    }
}

/// The text of an error and its sources (tokio-postgres puts the useful
/// part, e.g. "Connection refused", in the source).
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.ends_with(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}

const LEDGER_SELECT: &str = "SELECT serial, spiffe_id, not_before, not_after, issuer_key_id, \
                             root_sha256, sha256, issued_at, requester, renewed_from FROM ledger";

/// A `join_tokens` row (id, sha256, spiffe_id, expires_at, created_at,
/// used_at); a row that does not convert is an error, never a panic.
type TokenRow = (
    String,
    String,
    String,
    OffsetDateTime,
    OffsetDateTime,
    Option<OffsetDateTime>,
);

fn token_of(r: &tokio_postgres::Row) -> Result<TokenRow, StoreError> {
    let bad = |e: tokio_postgres::Error| StoreError::Corrupt {
        what: "join token",
        msg: format!(
            "token {}: {e}",
            r.try_get::<_, String>(0).unwrap_or_else(|_| "?".into())
        ),
    };
    Ok((
        r.try_get(0).map_err(bad)?,
        r.try_get(1).map_err(bad)?,
        r.try_get(2).map_err(bad)?,
        r.try_get(3).map_err(bad)?,
        r.try_get(4).map_err(bad)?,
        r.try_get(5).map_err(bad)?,
    ))
}

/// A ledger row as the directory's entry. A row that does not convert (a
/// timestamp out of range such as `infinity`, a NULL) is an error naming
/// its serial, never a panic: the ledger is read by every replica's start.
fn entry_of(r: &tokio_postgres::Row) -> Result<ledger::Entry, StoreError> {
    let serial: String = r.try_get(0).unwrap_or_else(|_| "?".into());
    let bad = |column: &str, e: tokio_postgres::Error| StoreError::Corrupt {
        what: "ledger entry",
        msg: format!("serial {serial}: {column}: {e}"),
    };
    let text = |i: usize, column: &str| -> Result<String, StoreError> {
        r.try_get::<_, String>(i).map_err(|e| bad(column, e))
    };
    let time = |i: usize, column: &str| -> Result<String, StoreError> {
        r.try_get::<_, OffsetDateTime>(i)
            .map(ca::rfc3339)
            .map_err(|e| bad(column, e))
    };
    Ok(ledger::Entry {
        serial: text(0, "serial")?,
        spiffe_id: text(1, "spiffe_id")?,
        not_before: time(2, "not_before")?,
        not_after: time(3, "not_after")?,
        issuer_key_id: text(4, "issuer_key_id")?,
        root_sha256: text(5, "root_sha256")?,
        sha256: text(6, "sha256")?,
        issued_at: time(7, "issued_at")?,
        requester: text(8, "requester")?,
        renewed_from: r
            .try_get::<_, Option<String>>(9)
            .map_err(|e| bad("renewed_from", e))?,
    })
}

fn entry_line(e: &ledger::Entry) -> Result<String, StoreError> {
    serde_json::to_string(e).map_err(|err| StoreError::Corrupt {
        what: "ledger entry",
        msg: err.to_string(),
    })
}

fn parse_time(s: &str, what: &'static str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| StoreError::Corrupt {
        what,
        msg: format!("{s:?}: {e}"),
    })
}

fn trust_domain_of(ca_json: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(ca_json)
        .ok()
        .and_then(|v| v.get("trust_domain")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The JSON lines of `path` after its first `from` bytes (what a command
/// appended to the workspace's copy). A torn last line is an error: the
/// command did not finish writing it.
fn new_lines<T: serde::de::DeserializeOwned>(
    path: &Path,
    from: u64,
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let Some(tail) = text.get(from as usize..) else {
        return Err(StoreError::Corrupt {
            what,
            msg: format!("{} was cut short while the command ran", path.display()),
        });
    };
    tail.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| StoreError::Corrupt {
                what,
                msg: e.to_string(),
            })
        })
        .collect()
}

/// The change feed: `LISTEN` on a connection of its own, the generation
/// read on every notification and every [`POLL`]; reconnects after any
/// error, a second later. Runs until the store is dropped (which aborts
/// it), whether or not anyone watches at the moment.
async fn follow(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    tx: tokio::sync::watch::Sender<i64>,
    url: String,
) {
    let set = |g: i64| {
        tx.send_if_modified(|v| {
            if *v != g {
                *v = g;
                true
            } else {
                false
            }
        });
    };
    loop {
        match config.connect(tls.clone()).await {
            Err(e) => tracing::debug!(store = %url, "change feed: connect: {}", error_text(&e)),
            Ok((client, mut conn)) => {
                let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel::<()>();
                // The connection is driven here so that its notifications
                // are seen (a plain `conn.await` drops them).
                let driver = tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(_))) => {
                                if ntx.send(()).is_err() {
                                    return;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return,
                        }
                    }
                });
                let listened = client.batch_execute(&format!("LISTEN {CHANNEL}")).await;
                if let Err(e) = listened {
                    tracing::debug!(store = %url, "change feed: LISTEN: {}", error_text(&e));
                } else {
                    let mut tick = tokio::time::interval(POLL);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            n = nrx.recv() => if n.is_none() { break },
                            _ = tick.tick() => {}
                        }
                        match client
                            .query_one("SELECT generation FROM ca_meta", &[])
                            .await
                        {
                            Ok(r) => set(r.get(0)),
                            Err(e) => {
                                tracing::debug!(store = %url, "change feed: {}", error_text(&e));
                                break;
                            }
                        }
                    }
                }
                driver.abort();
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `serve` runs these on a multi-threaded runtime: their futures must be
/// `Send` (checked at compile time).
#[allow(dead_code)]
fn futures_are_send(s: &PgStore, ws: Workspace, mut ws2: Workspace, p: &Path, t: &TakenToken) {
    fn send<T: Send>(_: T) {}
    send(PgStore::connect("", true));
    send(s.ping());
    send(s.generation());
    send(s.checkout(p, true));
    send(s.checkin(p, ws));
    send(s.refresh(p, &mut ws2));
    send(s.token_take("", ""));
    send(s.token_give_back(t));
    send(s.ledger_append(&[]));
    send(s.import_dir(p));
}
