//! Rows in the store that keyproof-ca did not write (a tampered database, a
//! restore gone wrong) are reported as corrupt, naming the row, and never
//! crash a command: every replica reads the ledger and tokens when it
//! starts, so a panic there would keep the whole CA down.

#[path = "common/pg.rs"]
#[allow(dead_code)] // the helpers other test files use
mod pg;

use std::process::Command;

use pg::Pg;

const TD: &str = "rows.keyproof.test";

fn keyproof_ca(args: &[&str], url: &str, keys: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keyproof-ca"))
        .args(args)
        .args(["--store", url, "--dir"])
        .arg(keys)
        .env_remove("KEYPROOF_CA_STORE")
        .output()
        .expect("run keyproof-ca")
}

#[test]
fn unrepresentable_times_in_ledger_and_token_rows_are_corrupt_not_a_panic() {
    let Some(pg) = Pg::shared() else { return };
    let db = pg.new_db("rows");
    let url = pg.url(&db);
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    let out = keyproof_ca(&["init", "--trust-domain", TD], &url, &keys);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    pg.sql(
        &db,
        "INSERT INTO ledger (serial, spiffe_id, not_before, not_after, issuer_key_id, \
         root_sha256, sha256, issued_at, requester) VALUES ('ffinf', \
         'spiffe://rows.keyproof.test/inf', '-infinity', 'infinity', 'x', 'y', 'z', \
         'infinity', 'evil')",
    );
    for args in [
        &["ledger", "export"][..],
        &["check"][..],
        &[
            "token",
            "create",
            "--spiffe-id",
            "spiffe://rows.keyproof.test/a",
        ][..],
    ] {
        let out = keyproof_ca(args, &url, &keys);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.contains("ffinf") && err.contains("corrupt"),
            "{args:?}: {err}"
        );
    }

    // Repaired, the commands work again; then a token row goes bad.
    pg.sql(&db, "DELETE FROM ledger WHERE serial = 'ffinf'");
    let out = keyproof_ca(
        &[
            "token",
            "create",
            "--spiffe-id",
            "spiffe://rows.keyproof.test/a",
        ],
        &url,
        &keys,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.sql(&db, "UPDATE join_tokens SET expires_at = 'infinity'");
    let out = keyproof_ca(&["check"], &url, &keys);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        !err.contains("panicked") && err.contains("join token"),
        "{err}"
    );
}
