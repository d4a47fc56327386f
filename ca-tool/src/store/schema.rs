//! Versioned schema migrations. Each entry is applied once, in order, in
//! its own transaction, and recorded in `keyproof_schema`; `serve` applies
//! missing ones (under an advisory lock) and every command refuses a
//! database whose version is newer than [`VERSION`].

/// The schema version this binary writes.
pub const VERSION: i32 = 1;

/// `(version, SQL)`, in order.
pub const MIGRATIONS: &[(i32, &str)] = &[];
