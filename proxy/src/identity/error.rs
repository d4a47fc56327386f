//! Why the workload identity could not be loaded at startup, naming the
//! configuration key at fault: shared by the file loader
//! ([`crate::identity::store`]) and the token key ([`crate::identity::key`]).

use std::io;

/// Why the identity could not be loaded; names the configuration key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read.
    #[error("{key}: cannot read {path}")]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The path.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The material is unusable.
    #[error("{key}: {msg}")]
    Invalid {
        /// The configuration key naming the file.
        key: &'static str,
        /// What is wrong.
        msg: String,
    },
}
