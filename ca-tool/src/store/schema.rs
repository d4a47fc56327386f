//! Versioned schema migrations. Each entry is applied once, in order, and
//! recorded in `keyproof_schema`; `serve`, `init` and `migrate` apply the
//! missing ones, all in one transaction under `pg_advisory_xact_lock`
//! (replicas starting together apply each once, and a failed migration
//! leaves the schema as it was). Every command refuses a database whose
//! version is newer than [`VERSION`]; commands that do not migrate also
//! refuse an older one.

/// The schema version this binary writes.
pub const VERSION: i32 = 2;

/// The advisory lock (`pg_advisory_xact_lock`) migrations run under, so
/// replicas starting together apply each migration once.
pub const MIGRATION_LOCK: i64 = 0x6b70_6361_0000_0001; // "kpca" 1

/// The table recording applied versions; created before any migration.
pub const BOOTSTRAP: &str = "CREATE TABLE IF NOT EXISTS keyproof_schema (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Version 1: documents, their generation, join tokens, the ledger.
const V1: &str = "
CREATE TABLE ca_meta (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    generation bigint NOT NULL
);
INSERT INTO ca_meta (id, generation) VALUES (true, 0);

CREATE TABLE ca_documents (
    name text PRIMARY KEY,
    body bytea NOT NULL
);

CREATE TABLE join_tokens (
    id text PRIMARY KEY,
    sha256 text NOT NULL UNIQUE,
    spiffe_id text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL,
    used_at timestamptz,
    used_by text
);

CREATE TABLE ledger (
    seq bigserial PRIMARY KEY,
    serial text NOT NULL UNIQUE,
    spiffe_id text NOT NULL,
    not_before timestamptz NOT NULL,
    not_after timestamptz NOT NULL,
    issuer_key_id text NOT NULL,
    root_sha256 text NOT NULL,
    sha256 text NOT NULL,
    issued_at timestamptz NOT NULL,
    requester text NOT NULL
);
CREATE INDEX ledger_root_not_after ON ledger (root_sha256, not_after);
";

/// Version 2: a renewal's ledger row names the serial it was renewed
/// from, so that a revocation reaches the certificates renewed from a
/// revoked one (see [`crate::revoke`]).
const V2: &str = "
ALTER TABLE ledger ADD COLUMN renewed_from text;
";

/// `(version, SQL)`, in order.
pub const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_up_to_version() {
        for (i, (v, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*v, i as i32 + 1);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.0), Some(VERSION));
    }
}
