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

/// What `--store` names. Its `Debug` masks the password, like every
/// message does.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// No `--store`: the state is the directory `--dir`.
    Dir,
    /// `postgres://` or `postgresql://` (a libpq URL; `sslmode=require` or
    /// `verify-full`, `sslrootcert=FILE` for TLS to the database).
    Postgres(String),
}

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Dir => f.write_str("Dir"),
            StoreSpec::Postgres(url) => f
                .debug_tuple("Postgres")
                .field(&mask_password(url))
                .finish(),
        }
    }
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
/// one in the user information (`user:password@`) and the value of every
/// query parameter whose name, percent-decoded and in any case, ends in
/// `password` (`password`, `pass%77ord`, `sslpassword`: tokio-postgres
/// decodes parameter names before it looks them up). The URL is split
/// where tokio-postgres splits it ([`url_parts`]), so what it takes for a
/// password is what is masked; where the two readings could differ, more
/// is masked, never less.
pub fn mask_password(url: &str) -> String {
    let Some(parts) = url_parts(url) else {
        // Not `scheme://...`: nothing can be told apart, so nothing of it
        // is shown.
        return "***".into();
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(parts.scheme);
    out.push_str("://");
    if let Some(creds) = parts.creds {
        let user = creds.split_once(':').map_or(creds, |(u, _)| u);
        if user.contains(['?', '/']) {
            // A user name does not hold a path or a query: the `@` was
            // meant for something else, and what precedes it may be
            // anything (tokio-postgres reads a password from it after a
            // `:`); show none of it.
            out.push_str("***");
        } else if user.len() < creds.len() {
            out.push_str(user);
            out.push_str(":***");
        } else {
            out.push_str(creds);
        }
        out.push('@');
    }
    out.push_str(parts.location);
    if let Some(query) = parts.query {
        out.push('?');
        let masked: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_password_key(k) => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push_str(&masked.join("&"));
    }
    out
}

/// Whether a query parameter's name (as written, percent-encoded or not)
/// names a secret: decoded, in any case, it ends in `password`.
fn is_password_key(raw: &str) -> bool {
    let decoded = percent_decode_lossy(raw).to_ascii_lowercase();
    // A name that does not decode (a stray `%`) is masked too: better a
    // masked harmless value than a shown password.
    decoded.ends_with("password") || raw.contains('%') && decoded.contains("pass")
}

/// `%XX` decoding; a malformed escape is kept as written, and bytes that
/// are not UTF-8 are replaced.
pub(crate) fn percent_decode_lossy(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A database URL split as tokio-postgres's URL parser splits it (see
/// [`url_parts`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct UrlParts<'a> {
    /// `postgres`, `postgresql` (or whatever was given).
    pub scheme: &'a str,
    /// Up to the first `@`, if there is one (anywhere): the user
    /// information, `user[:password]`.
    pub creds: Option<&'a str>,
    /// Hosts, ports and the database name: up to the first `?` after the
    /// user information.
    pub location: &'a str,
    /// After that `?`: `name=value` pairs split on `&`.
    pub query: Option<&'a str>,
}

/// Splits `scheme://[creds@]location[?query]` the way tokio-postgres reads
/// a URL: the user information ends at the *first* `@` of the whole rest,
/// even one in what looks like the query, and the query starts at the
/// first `?` after it. Should a raw `@` follow in the location (a password
/// that should have been percent-encoded), the user information is taken
/// to reach the last `@` before the query, so that the password is masked
/// whole. `None` when there is no `scheme://`.
pub(crate) fn url_parts(url: &str) -> Option<UrlParts<'_>> {
    let (scheme, rest) = url.split_once("://")?;
    let (creds, after) = match rest.find('@') {
        Some(first) => {
            let q = rest.find('?').unwrap_or(rest.len());
            let end = if first < q {
                rest[..q].rfind('@').unwrap_or(first)
            } else {
                first
            };
            (Some(&rest[..end]), &rest[end + 1..])
        }
        None => (None, rest),
    };
    let (location, query) = match after.split_once('?') {
        Some((l, q)) => (l, Some(q)),
        None => (after, None),
    };
    Some(UrlParts {
        scheme,
        creds,
        location,
        query,
    })
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
        self.checkout_keys(exclusive, true).await
    }

    /// [`Store::checkout`]; without `roots`, a workspace gets no root key
    /// (for commands that never sign with one: it would only be one more
    /// copy outside the key directory).
    pub async fn checkout_keys(
        &self,
        exclusive: bool,
        roots: bool,
    ) -> Result<Checkout, StoreError> {
        match self {
            Store::Dir(d) => Ok(Checkout::Dir(d.clone())),
            Store::Postgres { db, key_dir } if roots => {
                Ok(Checkout::Workspace(db.checkout(key_dir, exclusive).await?))
            }
            Store::Postgres { db, key_dir } => Ok(Checkout::Workspace(
                db.checkout_without_roots(key_dir, exclusive).await?,
            )),
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
    fn passwords_are_masked_however_their_parameter_name_is_spelt() {
        for (url, shown) in [
            // tokio-postgres decodes names: each of these is `password`.
            (
                "postgres://kp@db:5432/postgres?pass%77ord=SECRET",
                "postgres://kp@db:5432/postgres?pass%77ord=***",
            ),
            (
                "postgres://kp@db/k?%70%61%73%73%77%6f%72%64=SECRET&sslmode=require",
                "postgres://kp@db/k?%70%61%73%73%77%6f%72%64=***&sslmode=require",
            ),
            (
                "postgres://db/k?PassWord=SECRET",
                "postgres://db/k?PassWord=***",
            ),
            (
                "postgres://db/k?sslpassword=SECRET",
                "postgres://db/k?sslpassword=***",
            ),
            // A stray escape in a name that looks like it.
            (
                "postgres://db/k?pass%zzword=SECRET",
                "postgres://db/k?pass%zzword=***",
            ),
            // `#` is nothing special to tokio-postgres: it is in the password.
            ("postgres://u:pa#SECRET@db/k", "postgres://u:***@db/k"),
            // The first `@` ends the user information, even in the query:
            // tokio-postgres then reads `password` after the second `?`.
            (
                "postgres://h/d?x=1@h2/d2?password=SECRET",
                "postgres://***@h2/d2?password=***",
            ),
            ("postgres://h:5432/d?x=SECRET@h2/d", "postgres://h:***@h2/d"),
            // Percent-encoded user information.
            (
                "postgres://u%3Ax:SECRET%40@db/k",
                "postgres://u%3Ax:***@db/k",
            ),
            ("no scheme SECRET", "***"),
        ] {
            let masked = mask_password(url);
            assert_eq!(masked, shown, "{url}");
            assert!(!masked.contains("SECRET"), "{url}");
        }
        // What tokio-postgres takes for the password is what is masked.
        for url in [
            "postgres://kp@db:5432/postgres?pass%77ord=SECRET",
            "postgres://u:pa#SECRET@db/k",
            "postgres://h/d?x=1@h2/d2?password=SECRET",
            "postgres://h:5432/d?x=SECRET@h2/d",
        ] {
            let config: tokio_postgres::Config = url.parse().unwrap();
            let pw = String::from_utf8(config.get_password().unwrap().to_vec()).unwrap();
            assert!(pw.contains("SECRET"), "{url}: {pw}");
            assert!(!mask_password(url).contains(&pw), "{url}");
        }
    }

    #[test]
    fn only_postgres_urls_are_stores() {
        assert_eq!(StoreSpec::parse(None).unwrap(), StoreSpec::Dir);
        assert!(matches!(
            StoreSpec::parse(Some("postgresql://x/y")).unwrap(),
            StoreSpec::Postgres(_)
        ));
        let spec = StoreSpec::parse(Some("postgres://u@h/d?pass%77ord=SECRET")).unwrap();
        assert!(!format!("{spec:?}").contains("SECRET"), "{spec:?}");
        let e = StoreSpec::parse(Some("mysql://u:pw@h/d"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mysql://u:***@h/d") && !e.contains("pw"), "{e}");
    }
}
