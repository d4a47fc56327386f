//! Where the CA's state lives: the directory given by `--dir` (the embedded
//! default) or PostgreSQL (`--store postgres://...`), which several `serve`
//! replicas share.
//!
//! The directory layout *is* the state format. With PostgreSQL every file
//! of the layout but the keys is a row of `ca_documents` (`ca.json`,
//! `root.crt`, `intermediate.crt`, `bundle.*`, `next/*`,
//! `previous-root.crt`, `archive/*`), versioned together by one generation
//! number; join tokens and the issuance ledger are tables of their own
//! (`join_tokens`, `ledger`) so that consuming a token is one atomic
//! statement and the ledger is queried, not re-read. Private keys never go
//! into the database: file keys stay in `--dir` (in Kubernetes a Secret
//! every replica mounts), token keys in their PKCS#11 token.
//!
//! A command that works on the state (`rotate`, `issue`, `token create`,
//! `check`, `init`) runs unchanged on a [`Workspace`]: a private temporary
//! directory holding the documents, the key files from `--dir`, and the
//! live part of the ledger. [`Store::checkin`] then writes what the command
//! changed back: new or changed keys into `--dir` first, then the documents,
//! new tokens and new ledger lines in one transaction that bumps the
//! generation and notifies every replica (`LISTEN keyproof_ca`).
//! Commands that change documents hold a PostgreSQL advisory lock from
//! checkout to checkin, so two rotations never interleave.

pub mod pg;
pub mod schema;
pub mod tls;
pub mod workspace;

use std::path::{Path, PathBuf};

pub use pg::PgStore;
pub use workspace::Workspace;

/// Why the store could not be used. Messages never carry the database
/// password (URLs are shown with it masked).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `--store` is not a URL keyproof-ca knows.
    #[error("--store {url}: {msg}")]
    BadUrl { url: String, msg: String },
    /// The database cannot be reached (connect, TLS, authentication,
    /// timeout); retried by `serve`, fatal for one-shot commands.
    #[error("the database at {url} is unreachable: {msg}")]
    Unreachable { url: String, msg: String },
    /// The schema is newer than this binary knows.
    #[error("the database schema is at version {found}, newer than this keyproof-ca knows ({known}); upgrade keyproof-ca")]
    SchemaTooNew { found: i32, known: i32 },
    /// The schema is older and this command does not migrate it.
    #[error("the database schema is at version {found}, this keyproof-ca needs {known}; run `keyproof-ca serve` (which applies migrations) or `keyproof-ca migrate --schema-only`")]
    SchemaTooOld { found: i32, known: i32 },
    /// The store holds no CA yet.
    #[error("the store holds no CA: create one with `keyproof-ca init --store URL --dir KEYDIR` or move a directory in with `keyproof-ca migrate --dir DIR --store URL`")]
    NoCa,
    /// `init` or `migrate` into a store that already holds a CA.
    #[error("the store already holds a CA (trust domain {0}); refusing to overwrite it")]
    AlreadyHoldsCa(String),
    /// The documents changed between checkout and checkin (another writer
    /// without the lock).
    #[error("the CA state changed while this command ran (generation {expected}, now {found}); nothing was written, run the command again")]
    Conflict { expected: i64, found: i64 },
    /// A statement failed.
    #[error("database: {0}")]
    Db(String),
    /// The workspace or the key directory.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A row that does not parse (a ledger entry, a token record).
    #[error("corrupt {what} in the store: {msg}")]
    Corrupt { what: &'static str, msg: String },
}

/// What `--store` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// No `--store`: the state is the directory `--dir`.
    Dir,
    /// `postgres://` or `postgresql://` (a libpq URL; `sslmode=require` or
    /// `verify-full`, `sslrootcert=FILE` for TLS to the database).
    Postgres(String),
}

impl StoreSpec {
    /// Parses `--store`; `None` is the directory.
    pub fn parse(url: Option<&str>) -> Result<StoreSpec, StoreError> {
        let Some(url) = url else {
            return Ok(StoreSpec::Dir);
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreSpec::Postgres(url.to_owned()))
        } else {
            Err(StoreError::BadUrl {
                url: mask_password(url),
                msg: "only postgres:// (or postgresql://) URLs are supported; leave --store out \
                      to keep the state in --dir"
                    .into(),
            })
        }
    }
}

/// `url` with any password replaced by `***`, for messages and logs: the
/// one in the user information (`user:password@`) and a `password`
/// query parameter (libpq takes both).
pub fn mask_password(url: &str) -> String {
    let masked = mask_userinfo(url);
    let Some((head, query)) = masked.split_once('?') else {
        return masked;
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect();
    format!("{head}?{}", query.join("&"))
}

/// Errs on the side of masking: everything between the first `:` after the
/// scheme and the last `@` before the query goes, even if the password
/// holds a raw `/` or `@` (which a URL should have percent-encoded).
fn mask_userinfo(url: &str) -> String {
    // scheme://user:password@host...
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (head, tail) = match rest.find(['?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match head.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// An opened store.
#[derive(Clone)]
pub enum Store {
    /// The directory: commands work on it in place.
    Dir(PathBuf),
    /// PostgreSQL, with `--dir` as the key directory.
    Postgres {
        db: std::sync::Arc<PgStore>,
        key_dir: PathBuf,
    },
}

impl Store {
    /// Opens what `spec` names. `dir` is the CA directory ([`StoreSpec::Dir`])
    /// or the key directory (PostgreSQL). With PostgreSQL the schema must be
    /// current unless `migrate` is set, in which case it is brought up to
    /// date (under an advisory lock, so replicas starting together agree).
    pub async fn open(spec: &StoreSpec, dir: &Path, migrate: bool) -> Result<Store, StoreError> {
        match spec {
            StoreSpec::Dir => Ok(Store::Dir(dir.to_owned())),
            StoreSpec::Postgres(url) => Ok(Store::Postgres {
                db: std::sync::Arc::new(PgStore::connect(url, migrate).await?),
                key_dir: dir.to_owned(),
            }),
        }
    }

    /// A directory to run a command on: the CA directory itself, or a
    /// [`Workspace`] checked out of PostgreSQL. `exclusive` takes the
    /// advisory lock (commands that change documents: `rotate`, `init`).
    pub async fn checkout(&self, exclusive: bool) -> Result<Checkout, StoreError> {
        match self {
            Store::Dir(d) => Ok(Checkout::Dir(d.clone())),
            Store::Postgres { db, key_dir } => {
                Ok(Checkout::Workspace(db.checkout(key_dir, exclusive).await?))
            }
        }
    }

    /// Writes back what the command changed (nothing for the directory).
    pub async fn checkin(&self, co: Checkout) -> Result<(), StoreError> {
        match (self, co) {
            (Store::Postgres { db, key_dir }, Checkout::Workspace(ws)) => {
                db.checkin(key_dir, ws).await
            }
            _ => Ok(()),
        }
    }
}

/// Where a command runs: see [`Store::checkout`].
pub enum Checkout {
    Dir(PathBuf),
    Workspace(Workspace),
}

impl Checkout {
    /// The directory the command works on.
    pub fn path(&self) -> &Path {
        match self {
            Checkout::Dir(d) => d,
            Checkout::Workspace(ws) => ws.path(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_password("postgres://ca:s3cret@db:5432/keyproof?sslmode=require"),
            "postgres://ca:***@db:5432/keyproof?sslmode=require"
        );
        assert_eq!(
            mask_password("postgres://ca@db/keyproof"),
            "postgres://ca@db/keyproof"
        );
        assert_eq!(mask_password("postgres://db/k"), "postgres://db/k");
        assert_eq!(
            mask_password("postgres://ca@db/k?sslmode=require&password=LEAK&x=1"),
            "postgres://ca@db/k?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            mask_password("postgres:///k?user=ca&PASSWORD=LEAK&host=/run"),
            "postgres:///k?user=ca&PASSWORD=***&host=/run"
        );
        // Characters a password should have encoded still do not leak it.
        assert_eq!(
            mask_password("postgres://ca:pa/ss@w@db/k?x=1"),
            "postgres://ca:***@db/k?x=1"
        );
    }

    #[test]
    fn only_postgres_urls_are_stores() {
        assert_eq!(StoreSpec::parse(None).unwrap(), StoreSpec::Dir);
        assert!(matches!(
            StoreSpec::parse(Some("postgresql://x/y")).unwrap(),
            StoreSpec::Postgres(_)
        ));
        let e = StoreSpec::parse(Some("mysql://u:pw@h/d"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mysql://u:***@h/d") && !e.contains("pw"), "{e}");
    }
}
