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
    let mut secret = [0u8; 32];
    aws_lc_rs::rand::fill(&mut secret).expect("system random number generator failed");
    let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let sha = hash(&token);
    let now = ca::now();
    let record = Record::Token {
        id: id_of(&token),
        sha256: sha,
        spiffe_id: spiffe_id.to_string(),
        expires_at: ca::rfc3339(now + ttl),
        created_at: ca::rfc3339(now),
    };
    append(ca.dir(), &record)?;
    Ok((token, record))
}

fn append(dir: &Path, r: &Record) -> Result<(), CaError> {
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
            *self = TokenStore::default();
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
            match serde_json::from_str::<Record>(line) {
                Ok(Record::Token {
                    id,
                    sha256,
                    spiffe_id,
                    expires_at,
                    ..
                }) => {
                    self.by_hash.insert(
                        sha256,
                        Entry {
                            id,
                            spiffe_id,
                            expires_at,
                        },
                    );
                }
                Ok(Record::Used { id, .. }) => {
                    self.used.insert(id);
                }
                Err(e) => {
                    return Err(CaError::Corrupt {
                        path,
                        msg: e.to_string(),
                    })
                }
            }
        }
        self.read_len = end as u64;
        Ok(())
    }

    /// Checks a presented token and, if good, marks it used (durably, before
    /// returning) and returns (token id, SPIFFE ID).
    pub fn consume(
        &mut self,
        dir: &Path,
        presented: &str,
        now: OffsetDateTime,
    ) -> Result<Result<(String, SpiffeId), TokenError>, CaError> {
        self.refresh(dir)?;
        let Some(entry) = self.by_hash.get(&hash(presented.trim())) else {
            return Ok(Err(TokenError::Invalid));
        };
        if self.used.contains(&entry.id) {
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
        append(
            dir,
            &Record::Used {
                id: token_id.clone(),
                used_at: ca::rfc3339(now),
            },
        )?;
        self.used.insert(token_id.clone());
        Ok(Ok((token_id, id)))
    }
}
