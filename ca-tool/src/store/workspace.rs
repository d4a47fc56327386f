//! A private temporary directory laid out like a CA directory, for running
//! a command against PostgreSQL (see [`super`]).

use std::collections::BTreeMap;
use std::path::Path;

/// A checked-out copy of the state. Dropped without checkin, nothing is
/// written anywhere (and the advisory lock, if held, is released).
pub struct Workspace {
    pub(crate) dir: tempfile::TempDir,
    /// The generation checked out.
    pub(crate) generation: i64,
    /// Documents as checked out, by relative path.
    pub(crate) docs: BTreeMap<String, Vec<u8>>,
    /// Key files as checked out, by relative path.
    pub(crate) keys: BTreeMap<String, Vec<u8>>,
    /// Bytes of `ledger.jsonl` and `tokens.jsonl` at checkout: what follows
    /// was written by the command.
    pub(crate) ledger_len: u64,
    pub(crate) tokens_len: u64,
}

impl Workspace {
    /// The directory to run the command on.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The generation checked out.
    pub fn generation(&self) -> i64 {
        self.generation
    }
}
