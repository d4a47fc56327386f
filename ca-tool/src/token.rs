//! Join tokens: single-use, expiring, bound to one SPIFFE ID. Only the
//! token's SHA-256 is stored; the token itself is printed once.
//!
//! `tokens.jsonl` is append-only: a `token` line when one is created and a
//! `used` line when it is consumed, so a crash never resurrects a used token.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use keyproof_identity::keys;
use keyproof_identity::spiffe::SpiffeId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{self, files, io_err, Ca, CaError};
use crate::fsutil;

const PREFIX: &str = "kpt_";

/// One line of `tokens.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    /// A token was created.
    Token {
        id: String,
        sha256: String,
        spiffe_id: String,
        expires_at: String,
        created_at: String,
    },
    /// A token was consumed.
    Used { id: String, used_at: String },
}

impl Record {
    /// One line for the operator (never the token itself).
    pub fn summary(&self) -> String {
        match self {
            Record::Token {
                id,
                spiffe_id,
                expires_at,
                ..
            } => format!("token {id} for {spiffe_id}, expires {expires_at}, single use"),
            Record::Used { id, .. } => format!("token {id} used"),
        }
    }
}

/// Why a token was refused. `code()` is the JSON error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token is not valid")]
    Invalid,
    #[error("join token expired at {0}")]
    Expired(String),
    #[error("join token was already used")]
    Reused,
}

impl TokenError {
    /// Stable error code for API responses.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Invalid => "invalid_token",
            TokenError::Expired(_) => "token_expired",
            TokenError::Reused => "token_reused",
        }
    }
}

fn hash(token: &str) -> String {
    hex::encode(keys::sha256(token.as_bytes()))
}

/// The id a token is recorded (and logged) under: the first 16 hex digits of
/// its SHA-256. Not secret, and never enough to use the token.
pub fn id_of(token: &str) -> String {
    hash(token.trim())[..16].to_owned()
}

/// Creates a token for `spiffe_id`, records its hash, and returns the token.
pub fn create(ca: &Ca, spiffe_id: &SpiffeId, ttl: Duration) -> Result<(String, Record), CaError> {
    if !spiffe_id.is_member_of(ca.trust_domain()) {
        return Err(CaError::ForeignTrustDomain {
            id: spiffe_id.to_string(),
            trust_domain: ca.trust_domain().to_string(),
        });
    }
    if !spiffe_id.is_workload() {
        return Err(CaError::NotAWorkloadId(spiffe_id.to_string()));
    }
    crate::issue::check_not_reserved(spiffe_id)?;
    let mut secret = [0u8; 32];
    aws_lc_rs::rand::fill(&mut secret).expect("system random number generator failed");
    let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let sha = hash(&token);
    let now = ca::now();
    let record = Record::Token {
        id: id_of(&token),
        sha256: sha,
        spiffe_id: spiffe_id.to_string(),
        expires_at: ca::rfc3339(ca::Lifetime::JoinToken.end(now, ttl)?),
        created_at: ca::rfc3339(now),
    };
    append(ca.dir(), &record)?;
    Ok((token, record))
}

fn append(dir: &Path, r: &Record) -> Result<(), CaError> {
    // A `serve --dir` started before `migrate` spends no token here: the
    // store has it (see `crate::migrated`).
    crate::migrated::refuse(dir)?;
    let path = dir.join(files::TOKENS);
    let line = serde_json::to_string(r).map_err(|e| CaError::Corrupt {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    fsutil::append_line(&path, &line, 0o600).map_err(io_err(&path))
}

struct Entry {
    id: String,
    spiffe_id: String,
    expires_at: String,
}

/// The token table, loaded from `tokens.jsonl`.
#[derive(Default)]
pub struct TokenStore {
    by_hash: HashMap<String, Entry>,
    used: HashSet<String>,
    /// Tokens a request in flight holds (see [`TokenStore::reserve`]).
    reserved: HashSet<String>,
    /// Bytes of the file already read, so new lines are picked up cheaply.
    read_len: u64,
}

impl TokenStore {
    /// Reads any lines appended since the last call (tokens created by
    /// `keyproof-ca token create` while the server runs).
    pub fn refresh(&mut self, dir: &Path) -> Result<(), CaError> {
        let path = dir.join(files::TOKENS);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if (text.len() as u64) < self.read_len {
            // The file was replaced: read it again from the start, but keep
            // the requests in flight holding their tokens.
            let reserved = std::mem::take(&mut self.reserved);
            *self = TokenStore::default();
            self.reserved = reserved;
        }
        let start = self.read_len as usize;
        // Only whole lines: a line being appended right now is read next time.
        let Some(end) = text.rfind('\n').map(|i| i + 1) else {
            return Ok(());
        };
        if end <= start {
            return Ok(());
        }
        for line in text[start..end].lines().filter(|l| !l.trim().is_empty()) {
            // A torn line (a crash mid-append) is skipped, not fatal: it
            // made every join-token bootstrap fail. Its bytes never become
            // a token (a record parses whole or not at all); a whole
            // record glued after it is recovered.
            let record = match fsutil::parse_json_line::<Record>(line) {
                Ok((r, glued)) => {
                    if glued {
                        tracing::warn!(path = %path.display(), "tokens: skipped a torn line glued before a whole record");
                    }
                    r
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "tokens: skipped a torn or unreadable line");
                    continue;
                }
            };
            match record {
                Record::Token {
                    id,
                    sha256,
                    spiffe_id,
                    expires_at,
                    ..
                } => {
                    self.by_hash.insert(
                        sha256,
                        Entry {
                            id,
                            spiffe_id,
                            expires_at,
                        },
                    );
                }
                Record::Used { id, .. } => {
                    self.used.insert(id);
                }
            }
        }
        self.read_len = end as u64;
        Ok(())
    }

    /// Checks a presented token and, if good, reserves it for this caller
    /// and returns (token id, SPIFFE ID). A reserved token is refused to
    /// every other caller as [`TokenError::Reused`] until it is released
    /// ([`TokenStore::release`]: the request was not answered with a
    /// certificate, so the token stays usable) or spent
    /// ([`TokenStore::commit`]). Reservations live in memory only: a crash
    /// releases them.
    pub fn reserve(
        &mut self,
        dir: &Path,
        presented: &str,
        now: OffsetDateTime,
    ) -> Result<Result<(String, SpiffeId), TokenError>, CaError> {
        crate::migrated::refuse(dir)?;
        self.refresh(dir)?;
        let Some(entry) = self.by_hash.get(&hash(presented.trim())) else {
            return Ok(Err(TokenError::Invalid));
        };
        if self.used.contains(&entry.id) || self.reserved.contains(&entry.id) {
            return Ok(Err(TokenError::Reused));
        }
        let expires = OffsetDateTime::parse(
            &entry.expires_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| CaError::Corrupt {
            path: dir.join(files::TOKENS),
            msg: e.to_string(),
        })?;
        if now >= expires {
            return Ok(Err(TokenError::Expired(entry.expires_at.clone())));
        }
        let Ok(id) = SpiffeId::parse(&entry.spiffe_id) else {
            return Ok(Err(TokenError::Invalid));
        };
        let token_id = entry.id.clone();
        self.reserved.insert(token_id.clone());
        Ok(Ok((token_id, id)))
    }

    /// Marks a reserved token used, durably (the `used` line is on disk when
    /// this returns). On error the token stays reserved; the caller releases
    /// it.
    pub fn commit(
        &mut self,
        dir: &Path,
        token_id: &str,
        now: OffsetDateTime,
    ) -> Result<(), CaError> {
        // One serving process per directory is the supported set-up, but a
        // second one (a `serve` run by hand, a shared volume) must not
        // redeem the token too: its `used` line is read, and this one
        // written, under the directory's lock.
        let _lock = crate::dirlock::DirLock::acquire(dir, crate::dirlock::Mode::Exclusive)
            .map_err(
                |crate::dirlock::LockError::Io { path, source }| CaError::Io { path, source },
            )?;
        self.refresh(dir)?;
        if self.used.contains(token_id) {
            self.reserved.remove(token_id);
            return Err(CaError::TokenSpent(token_id.to_owned()));
        }
        append(
            dir,
            &Record::Used {
                id: token_id.to_owned(),
                used_at: ca::rfc3339(now),
            },
        )?;
        self.reserved.remove(token_id);
        self.used.insert(token_id.to_owned());
        Ok(())
    }

    /// Gives up a reservation without spending the token.
    pub fn release(&mut self, token_id: &str) {
        self.reserved.remove(token_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token for `id`, recorded in `dir` as `token create` would.
    fn record(dir: &Path, token: &str, id: &str, ttl: Duration) {
        let now = ca::now();
        append(
            dir,
            &Record::Token {
                id: id_of(token),
                sha256: hash(token),
                spiffe_id: id.into(),
                expires_at: ca::rfc3339(now + ttl),
                created_at: ca::rfc3339(now),
            },
        )
        .unwrap();
    }

    const WEB: &str = "spiffe://example.org/ns/default/sa/web";

    #[test]
    fn two_processes_on_one_directory_spend_a_token_once() {
        // Round 10 (keys) F12: two `serve` on one directory (unsupported,
        // but a hand-run one or a shared volume makes it) each reserved the
        // token in memory and both spent it.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        record(d, "kpt_one", WEB, Duration::from_secs(3600));
        let now = ca::now();
        let (mut a, mut b) = (TokenStore::default(), TokenStore::default());
        let (ta, _) = a.reserve(d, "kpt_one", now).unwrap().unwrap();
        let (tb, _) = b.reserve(d, "kpt_one", now).unwrap().unwrap();
        a.commit(d, &ta, now).unwrap();
        let e = b.commit(d, &tb, now).unwrap_err();
        assert!(matches!(e, CaError::TokenSpent(_)), "{e}");
        let used = std::fs::read_to_string(d.join(files::TOKENS))
            .unwrap()
            .matches("\"used\"")
            .count();
        assert_eq!(used, 1);
        assert_eq!(
            b.reserve(d, "kpt_one", now).unwrap(),
            Err(TokenError::Reused)
        );
    }

    #[test]
    fn a_reserved_token_is_refused_to_others_and_spent_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        record(d, "kpt_one", WEB, Duration::from_secs(3600));
        let now = ca::now();
        let mut store = TokenStore::default();
        let (tid, id) = store.reserve(d, "kpt_one", now).unwrap().unwrap();
        assert_eq!(id.as_str(), WEB);
        assert_eq!(tid, id_of("kpt_one"));
        // Held by a request in flight.
        assert_eq!(
            store.reserve(d, "kpt_one", now).unwrap(),
            Err(TokenError::Reused)
        );
        // That request failed: the token is usable again, and nothing was
        // written.
        store.release(&tid);
        assert!(!std::fs::read_to_string(d.join(files::TOKENS))
            .unwrap()
            .contains("\"used\""));
        let (tid, _) = store.reserve(d, "kpt_one", now).unwrap().unwrap();
        store.commit(d, &tid, now).unwrap();
        assert_eq!(
            store.reserve(d, "kpt_one", now).unwrap(),
            Err(TokenError::Reused)
        );
        // Spent for good: a restarted server reads it from the file.
        let mut fresh = TokenStore::default();
        assert_eq!(
            fresh.reserve(d, "kpt_one", now).unwrap(),
            Err(TokenError::Reused)
        );
        assert_eq!(
            fresh.reserve(d, "kpt_two", now).unwrap(),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn a_reservation_survives_the_file_being_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        record(d, "kpt_one", WEB, Duration::from_secs(3600));
        record(d, "kpt_two", WEB, Duration::from_secs(3600));
        let now = ca::now();
        let mut store = TokenStore::default();
        store.reserve(d, "kpt_two", now).unwrap().unwrap();
        // Rewritten shorter (say, restored from a backup): re-read from the
        // start, the reservation kept.
        std::fs::remove_file(d.join(files::TOKENS)).unwrap();
        record(d, "kpt_two", WEB, Duration::from_secs(3600));
        assert_eq!(
            store.reserve(d, "kpt_two", now).unwrap(),
            Err(TokenError::Reused)
        );
        assert_eq!(
            store.reserve(d, "kpt_one", now).unwrap(),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn an_expired_token_is_not_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        record(d, "kpt_one", WEB, Duration::from_secs(1));
        let later = ca::now() + Duration::from_secs(2);
        let mut store = TokenStore::default();
        assert!(matches!(
            store.reserve(d, "kpt_one", later).unwrap(),
            Err(TokenError::Expired(_))
        ));
    }

    /// A crash mid-append left a torn line; the next `token create` used to
    /// glue onto it and from then on every join-token bootstrap got 503
    /// (adv33 F7). The torn bytes never count as a token.
    #[test]
    fn a_torn_line_neither_breaks_the_store_nor_counts_as_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        record(d, "kpt_old", WEB, Duration::from_secs(3600));
        let path = d.join(files::TOKENS);
        let mut text = std::fs::read_to_string(&path).unwrap();
        // Half of a record for kpt_torn, no newline: what a crash leaves.
        let mut torn = String::new();
        {
            let tmp = tempfile::tempdir().unwrap();
            record(tmp.path(), "kpt_torn", WEB, Duration::from_secs(3600));
            torn.push_str(&std::fs::read_to_string(tmp.path().join(files::TOKENS)).unwrap());
        }
        text.push_str(&torn[..torn.len() / 2]);
        std::fs::write(&path, &text).unwrap();
        record(d, "kpt_new", WEB, Duration::from_secs(3600));
        let now = ca::now();
        let mut store = TokenStore::default();
        assert!(store.reserve(d, "kpt_old", now).unwrap().is_ok());
        assert!(store.reserve(d, "kpt_new", now).unwrap().is_ok());
        assert_eq!(
            store.reserve(d, "kpt_torn", now).unwrap(),
            Err(TokenError::Invalid)
        );
        // A file written glued by an older version: the whole record at
        // the end of the glued line is recovered.
        let glued = format!("{}{}", &torn[..torn.len() / 2], {
            let tmp = tempfile::tempdir().unwrap();
            record(tmp.path(), "kpt_glued", WEB, Duration::from_secs(3600));
            std::fs::read_to_string(tmp.path().join(files::TOKENS)).unwrap()
        });
        let dir2 = tempfile::tempdir().unwrap();
        std::fs::write(dir2.path().join(files::TOKENS), glued).unwrap();
        let mut store = TokenStore::default();
        assert!(store
            .reserve(dir2.path(), "kpt_glued", now)
            .unwrap()
            .is_ok());
        assert_eq!(
            store.reserve(dir2.path(), "kpt_torn", now).unwrap(),
            Err(TokenError::Invalid)
        );
    }
}
