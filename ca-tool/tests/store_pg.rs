//! `keyproof-ca` with its state in PostgreSQL (`--store`): the real binary
//! against a real PostgreSQL cluster started by the tests (see
//! `common/pg.rs`), and the store library where the property is a race.

#[path = "common/pg.rs"]
mod pg;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use keyproof_ca::store::PgStore;
use keyproof_ca::token::TokenError;
use pg::Pg;

const TD: &str = "store.keyproof.test";

struct Out {
    ok: bool,
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs keyproof-ca with `args` (and `env`), the environment's own
/// `KEYPROOF_CA_STORE` removed.
fn run_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Out {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyproof-ca"));
    c.args(args).env_remove("KEYPROOF_CA_STORE");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run keyproof-ca");
    Out {
        ok: out.status.success(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Out {
    run_env(args, &[])
}

/// Runs and requires success; stdout. Every output is checked for the
/// database password.
fn ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let o = run(args);
    assert!(
        o.ok,
        "keyproof-ca {:?} failed ({}):\n{}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        o.code,
        o.stderr
    );
    no_password(&o);
    o.stdout
}

/// Runs and requires failure; stderr.
fn fails<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let o = run(args);
    assert!(
        !o.ok,
        "keyproof-ca {:?} succeeded:\n{}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        o.stdout
    );
    no_password(&o);
    o.stderr
}

fn no_password(o: &Out) {
    for text in [&o.stdout, &o.stderr] {
        assert!(
            !text.contains("-secret"),
            "the password was printed:\n{text}"
        );
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn sha256_hex(s: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        s.as_bytes(),
    ))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// A CA in a fresh database of `pg`: (database, URL, temp dir, key dir).
fn store_ca(pg: &Pg, prefix: &str) -> (String, String, tempfile::TempDir, std::path::PathBuf) {
    let db = pg.new_db(prefix);
    let url = pg.url(&db);
    let tmp = tempfile::tempdir().expect("tempdir");
    let keys = tmp.path().join("keys");
    ok(&[
        "init",
        "--trust-domain",
        TD,
        "--store",
        &url,
        "--dir",
        p(&keys),
    ]);
    (db, url, tmp, keys)
}

#[test]
fn the_whole_life_of_a_ca_in_the_store() {
    let Some(pg) = Pg::shared() else { return };
    let (db, url, tmp, keys) = store_ca(&pg, "life");
    let gen = || pg.sql(&db, "SELECT generation FROM ca_meta");

    // Keys in the key directory (0600), everything else in the database.
    for k in ["root.key", "intermediate.key"] {
        assert_eq!(mode(&keys.join(k)), 0o600, "{k}");
    }
    assert_eq!(mode(&keys), 0o700);
    assert!(!keys.join("ca.json").exists());
    let docs = pg.sql(
        &db,
        "SELECT string_agg(name, ',' ORDER BY name) FROM ca_documents",
    );
    for d in ["ca.json", "root.crt", "intermediate.crt", "bundle.pem"] {
        assert!(docs.contains(d), "{d} not in {docs}");
    }
    assert!(!docs.contains(".key"), "a key in the database: {docs}");
    assert_eq!(gen(), "1");

    // A second init into the same store is refused, naming the CA there.
    let other = tmp.path().join("other-keys");
    let err = fails(&[
        "init",
        "--trust-domain",
        "x.test",
        "--store",
        &url,
        "--dir",
        p(&other),
    ]);
    assert!(
        err.contains(&format!("already holds a CA (trust domain {TD})")),
        "{err}"
    );
    assert!(!other.exists());

    // A join token lands in the database, unused.
    let id = format!("spiffe://{TD}/ns/a/sa/b");
    let token = ok(&[
        "token",
        "create",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--spiffe-id",
        &id,
    ]);
    let token = token.trim();
    assert_eq!(
        pg.sql(
            &db,
            &format!(
                "SELECT spiffe_id || '|' || (used_at IS NULL) FROM join_tokens WHERE sha256 = '{}'",
                sha256_hex(token)
            )
        ),
        format!("{id}|true")
    );

    // Issue: the ledger row is in the database.
    let crt = tmp.path().join("w.crt");
    ok(&[
        "issue",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--spiffe-id",
        &id,
        "--key-out",
        p(&tmp.path().join("w.key")),
        "--cert-out",
        p(&crt),
    ]);
    assert!(crt.is_file());
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM ledger"), "1");
    // An output inside the key directory is refused.
    let err = fails(&[
        "issue",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--spiffe-id",
        &id,
        "--key-out",
        p(&keys.join("w.key")),
        "--cert-out",
        p(&tmp.path().join("w2.crt")),
    ]);
    assert!(err.contains("--key-out"), "{err}");

    // k8s-secret takes the store's bundle.
    let yaml = ok(&[
        "k8s-secret",
        "--name",
        "w",
        "--cert",
        p(&crt),
        "--key",
        p(&tmp.path().join("w.key")),
        "--store",
        &url,
    ]);
    assert!(yaml.contains("ca.crt"), "{yaml}");

    // check and bundle read the store.
    let o = run(&["check", "--store", &url, "--dir", p(&keys)]);
    assert_eq!(o.code, 0, "check: {}{}", o.stdout, o.stderr);
    let bundle = ok(&["bundle", "--store", &url, "--dir", p(&keys)]);
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);

    // rotate intermediate: a new key in the key directory, a new generation.
    let old_key = std::fs::read(keys.join("intermediate.key")).unwrap();
    ok(&["rotate", "intermediate", "--store", &url, "--dir", p(&keys)]);
    assert_ne!(
        std::fs::read(keys.join("intermediate.key")).unwrap(),
        old_key
    );
    assert_eq!(gen(), "2");

    // The root, in three steps.
    ok(&[
        "rotate",
        "root",
        "prepare",
        "--store",
        &url,
        "--dir",
        p(&keys),
    ]);
    assert_eq!(mode(&keys.join("next/root.key")), 0o600);
    assert!(keys.join("next/intermediate.key").is_file());
    assert!(
        pg.sql(
            &db,
            "SELECT count(*) FROM ca_documents WHERE name = 'next/root.crt'"
        ) == "1"
    );
    assert_eq!(gen(), "3");
    let bundle = ok(&["bundle", "--store", &url, "--dir", p(&keys)]);
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    ok(&[
        "rotate",
        "root",
        "activate",
        "--store",
        &url,
        "--dir",
        p(&keys),
    ]);
    assert!(!keys.join("next").exists());
    assert_eq!(gen(), "4");
    // The certificate issued under the old root is live: finish refuses
    // and changes nothing.
    let err = fails(&[
        "rotate",
        "root",
        "finish",
        "--store",
        &url,
        "--dir",
        p(&keys),
    ]);
    assert!(
        err.contains("refusing to finish: 1 unexpired certificate(s)"),
        "{err}"
    );
    assert_eq!(gen(), "4");
    ok(&[
        "rotate",
        "root",
        "finish",
        "--force",
        "--store",
        &url,
        "--dir",
        p(&keys),
    ]);
    assert_eq!(gen(), "5");
    let bundle = ok(&["bundle", "--store", &url, "--dir", p(&keys)]);
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
    // And issuance goes on from the new chain.
    ok(&[
        "issue",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--spiffe-id",
        &id,
        "--key-out",
        p(&tmp.path().join("w3.key")),
        "--cert-out",
        p(&tmp.path().join("w3.crt")),
    ]);
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM ledger"), "2");
    assert_eq!(
        pg.sql(&db, "SELECT count(DISTINCT root_sha256) FROM ledger"),
        "2",
        "the two certificates chain to the two roots"
    );
}

#[test]
fn migrate_moves_a_directory_and_the_ledger_exports_the_same() {
    let Some(pg) = Pg::shared() else { return };
    let db = pg.new_db("migrate");
    let url = pg.url(&db);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    ok(&["init", "--trust-domain", TD, "--dir", p(&dir)]);
    let id = format!("spiffe://{TD}/ns/a/sa/b");
    ok(&["token", "create", "--dir", p(&dir), "--spiffe-id", &id]);
    for i in 0..2 {
        ok(&[
            "issue",
            "--dir",
            p(&dir),
            "--spiffe-id",
            &id,
            "--key-out",
            p(&tmp.path().join(format!("{i}.key"))),
            "--cert-out",
            p(&tmp.path().join(format!("{i}.crt"))),
        ]);
    }
    let before = ok(&["ledger", "export", "--dir", p(&dir)]);
    let out = ok(&["migrate", "--dir", p(&dir), "--store", &url]);
    assert!(out.contains("2 ledger entries"), "{out}");
    assert!(out.contains("1 join tokens"), "{out}");
    assert!(
        out.contains("intermediate.key") && out.contains("root.key"),
        "{out}"
    );

    let file = std::fs::read_to_string(dir.join("ledger.jsonl")).unwrap();
    assert_eq!(ok(&["ledger", "export", "--store", &url]), file);
    assert_eq!(before, file);
    // The directory itself is fenced now (round 12 CA F3).
    let err = fails(&["ledger", "export", "--dir", p(&dir)]);
    assert!(err.contains("migrated to a store"), "{err}");
    // The URL from the environment, as in Kubernetes.
    let o = run_env(&["ledger", "export"], &[("KEYPROOF_CA_STORE", &url)]);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(o.stdout, file);

    // The directory is now the key directory of the store.
    ok(&[
        "issue",
        "--store",
        &url,
        "--dir",
        p(&dir),
        "--spiffe-id",
        &id,
        "--key-out",
        p(&tmp.path().join("s.key")),
        "--cert-out",
        p(&tmp.path().join("s.crt")),
    ]);
    assert_eq!(
        ok(&["ledger", "export", "--store", &url]).lines().count(),
        3
    );
    let o = run(&["check", "--store", &url, "--dir", p(&dir)]);
    assert_eq!(o.code, 0, "check: {}{}", o.stdout, o.stderr);

    // Once is enough: the directory is fenced (and the store holds a CA).
    let err = fails(&["migrate", "--dir", p(&dir), "--store", &url]);
    assert!(err.contains("migrated to a store"), "{err}");
}

#[test]
fn a_schema_too_old_or_too_new_is_refused_with_what_to_do() {
    let Some(pg) = Pg::shared() else { return };
    let db = pg.new_db("schema");
    let url = pg.url(&db);
    let tmp = tempfile::tempdir().unwrap();
    let keys = p(tmp.path());
    let err = fails(&["check", "--store", &url, "--dir", keys]);
    let needs = format!(
        "schema is at version 0, this keyproof-ca needs {}",
        keyproof_ca::store::schema::VERSION
    );
    assert!(err.contains(&needs), "{err}");
    ok(&["migrate", "--schema-only", "--store", &url]);
    // An empty store: commands say how to put a CA in it.
    let err = fails(&["check", "--store", &url, "--dir", keys]);
    assert!(err.contains("the store holds no CA"), "{err}");
    pg.sql(&db, "INSERT INTO keyproof_schema (version) VALUES (99)");
    let err = fails(&["check", "--store", &url, "--dir", keys]);
    assert!(
        err.contains("the database schema is at version 99, newer than this keyproof-ca knows"),
        "{err}"
    );
    let err = fails(&[
        "init",
        "--trust-domain",
        TD,
        "--store",
        &url,
        "--dir",
        p(&tmp.path().join("k")),
    ]);
    assert!(err.contains("newer than this keyproof-ca knows"), "{err}");
}

#[test]
fn bad_store_urls_name_the_flag_and_never_the_password() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = p(tmp.path());
    let cases: Vec<(String, &str)> = vec![
        (
            "mysql://u:hunter2@db/x".into(),
            "--store mysql://u:***@db/x",
        ),
        (
            "postgres://u:hunter2@127.0.0.1:1/x?sslmode=disable".into(),
            "is unreachable",
        ),
        (
            "postgres://u:hunter2@db/x?frobnicate=1".into(),
            "--store postgres://u:***@db/x",
        ),
        (
            "postgres://u:hunter2@db/x?sslmode=verify-full".into(),
            "need sslrootcert",
        ),
        (
            "postgres://u:hunter2@db/x?sslmode=verify-ca&sslrootcert=/nonexistent.pem".into(),
            "sslrootcert /nonexistent.pem",
        ),
    ];
    for (url, want) in cases {
        for o in [
            run(&["check", "--store", &url, "--dir", keys]),
            run_env(&["check", "--dir", keys], &[("KEYPROOF_CA_STORE", &url)]),
        ] {
            assert!(!o.ok, "{url}: succeeded");
            assert!(o.stderr.contains(want), "{url}: {}", o.stderr);
            assert!(o.stderr.contains("--store"), "{url}: {}", o.stderr);
            assert!(
                !o.stderr.contains("hunter2") && !o.stdout.contains("hunter2"),
                "{}",
                o.stderr
            );
        }
    }
    // --help shows no value taken from the environment.
    let o = run_env(
        &["check", "--help"],
        &[("KEYPROOF_CA_STORE", "postgres://u:hunter2@db/x")],
    );
    assert!(o.ok && o.stdout.contains("KEYPROOF_CA_STORE") && !o.stdout.contains("hunter2"));
}

#[test]
fn one_token_taken_by_fifty_at_once_is_taken_once() {
    let Some(pg) = Pg::shared() else { return };
    let (_db, url, _tmp, keys) = store_ca(&pg, "race");
    let id = format!("spiffe://{TD}/ns/a/sa/b");
    let token = ok(&[
        "token",
        "create",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--spiffe-id",
        &id,
    ]);
    let sha = sha256_hex(token.trim());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Arc::new(PgStore::connect(&url, false).await.expect("connect"));
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let (store, sha) = (store.clone(), sha.clone());
                tokio::spawn(async move { store.token_take(&sha, &format!("r{i}")).await })
            })
            .collect();
        let mut taken = Vec::new();
        let mut refused = Vec::new();
        for t in tasks {
            match t.await.unwrap().expect("database") {
                Ok(t) => taken.push(t),
                Err(e) => refused.push(e),
            }
        }
        assert_eq!(taken.len(), 1, "taken {} times", taken.len());
        assert!(
            refused.iter().all(|e| *e == TokenError::Reused),
            "{refused:?}"
        );
        let first = taken.pop().unwrap();
        assert_eq!(first.spiffe_id.as_str(), id);

        // Given back, it can be taken again; a stale give-back (of the
        // first take) never revives the second.
        store.token_give_back(&first).await.unwrap();
        let second = store
            .token_take(&sha, "again")
            .await
            .unwrap()
            .expect("taken again");
        store.token_give_back(&first).await.unwrap();
        assert_eq!(
            store.token_take(&sha, "third").await.unwrap().unwrap_err(),
            TokenError::Reused
        );
        assert_eq!(second.used_by, "again");
        assert_eq!(
            store
                .token_take(&sha256_hex("kpt_unknown"), "x")
                .await
                .unwrap()
                .unwrap_err(),
            TokenError::Invalid
        );
    });
}

#[test]
fn replicas_follow_a_rotation_and_the_ledger_refuses_a_serial_twice() {
    let Some(pg) = Pg::shared() else { return };
    let (db, url, tmp, keys) = store_ca(&pg, "watch");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = PgStore::connect(&url, true).await.expect("connect");
        let mut rx = store.watch();
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|g| *g == 1))
            .await
            .expect("the feed reads the generation")
            .unwrap();
        let mut ws = store.checkout(&keys, false).await.unwrap();
        assert_eq!(mode(ws.path()), 0o700, "the workspace holds key copies");
        let int_crt = ws.path().join("intermediate.crt");
        let before = std::fs::read(&int_crt).unwrap();
        assert!(
            !store.refresh(&keys, &mut ws).await.unwrap(),
            "nothing changed yet"
        );

        let (url2, keys2) = (url.clone(), keys.clone());
        tokio::task::spawn_blocking(move || {
            ok(&[
                "rotate",
                "intermediate",
                "--store",
                &url2,
                "--dir",
                p(&keys2),
            ])
        })
        .await
        .unwrap();
        // The guard only turns a hang into a failure.
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|g| *g == 2))
            .await
            .expect("the feed follows the rotation")
            .unwrap();
        assert!(store.refresh(&keys, &mut ws).await.unwrap());
        assert_eq!(ws.generation(), 2);
        let after = std::fs::read(&int_crt).unwrap();
        assert_ne!(before, after);
        assert_eq!(
            std::fs::read(ws.path().join("intermediate.key")).unwrap(),
            std::fs::read(keys.join("intermediate.key")).unwrap()
        );

        // ledger_append: a serial already there fails the whole batch.
        let id = format!("spiffe://{TD}/ns/a/sa/b");
        let (url2, keys2, out) = (url.clone(), keys.clone(), tmp.path().to_owned());
        tokio::task::spawn_blocking(move || {
            ok(&[
                "issue",
                "--store",
                &url2,
                "--dir",
                p(&keys2),
                "--spiffe-id",
                &id,
                "--key-out",
                p(&out.join("l.key")),
                "--cert-out",
                p(&out.join("l.crt")),
            ])
        })
        .await
        .unwrap();
        let mut buf = Vec::new();
        assert_eq!(store.ledger_export(&mut buf).await.unwrap(), 1);
        let existing: keyproof_ca::ledger::Entry =
            serde_json::from_slice(buf.split(|b| *b == b'\n').next().unwrap()).unwrap();
        let mut fresh = existing.clone();
        fresh.serial = "01abcdef".into();
        assert!(store
            .ledger_append(&[fresh.clone(), existing])
            .await
            .is_err());
        assert_eq!(pg.sql(&db, "SELECT count(*) FROM ledger"), "1");
        store.ledger_append(&[fresh]).await.unwrap();
        assert_eq!(pg.sql(&db, "SELECT count(*) FROM ledger"), "2");
        store.ping().await.unwrap();
    });
}

#[test]
fn tls_to_the_database_follows_sslmode() {
    let Some(pg) = Pg::shared() else { return };
    let db = pg.new_db("tls");
    let root = pg.tls_root();
    let other = tempfile::tempdir().unwrap();
    // A CA that did not sign the server's certificate.
    let wrong = other.path().join("wrong.pem");
    std::fs::write(
        &wrong,
        rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .unwrap()
            .cert
            .pem(),
    )
    .unwrap();
    // `tlsonly` is refused without TLS (pg_hba), so success means TLS.
    let url = |host: &str, q: &str| {
        format!(
            "postgres://tlsonly:pw-tls-secret@{host}:{}/{db}?{q}",
            pg.port
        )
    };
    let root = p(&root);
    let schema = |u: String| run(&["migrate", "--schema-only", "--store", &u]);
    let good = [
        url("127.0.0.1", "sslmode=require"),
        url("127.0.0.1", "sslmode=prefer"),
        url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={root}"),
        ),
        url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={root}"),
        ),
    ];
    for u in good {
        let o = schema(u.clone());
        assert!(o.ok, "{u}: {}", o.stderr);
        no_password(&o);
    }
    let bad = [
        (url("127.0.0.1", "sslmode=disable"), "unreachable"),
        // The certificate names localhost, not 127.0.0.1.
        (
            url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={root}"),
            ),
            "certificate not valid for name",
        ),
        (
            url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={}", p(&wrong)),
            ),
            "UnknownIssuer",
        ),
        // libpq: require with a root file verifies the chain.
        (
            url(
                "localhost",
                &format!("sslmode=require&sslrootcert={}", p(&wrong)),
            ),
            "UnknownIssuer",
        ),
    ];
    for (u, want) in bad {
        let o = schema(u.clone());
        assert!(!o.ok, "{u}: succeeded");
        assert!(
            o.stderr.contains(want) && o.stderr.contains("unreachable"),
            "{u}: {}",
            o.stderr
        );
        no_password(&o);
    }
}

#[test]
fn a_failed_checkin_writes_nothing_and_puts_the_keys_back() {
    let Some(pg) = Pg::shared() else { return };
    let (db, url, tmp, keys) = store_ca(&pg, "undo");
    let id = format!("spiffe://{TD}/ns/a/sa/b");
    ok(&[
        "issue",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--spiffe-id",
        &id,
        "--key-out",
        p(&tmp.path().join("w.key")),
        "--cert-out",
        p(&tmp.path().join("w.crt")),
    ]);
    let key_before = std::fs::read(keys.join("intermediate.key")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = PgStore::connect(&url, false).await.unwrap();
        // A command that changed a key and a document, and appended a
        // ledger line the database refuses (its serial is there already).
        let ws = store.checkout(&keys, false).await.unwrap();
        std::fs::write(ws.path().join("intermediate.key"), b"changed").unwrap();
        std::fs::write(ws.path().join("new.key"), b"new").unwrap();
        std::fs::write(ws.path().join("note.txt"), b"doc").unwrap();
        let ledger = ws.path().join("ledger.jsonl");
        let line = std::fs::read_to_string(&ledger).unwrap();
        std::fs::write(&ledger, format!("{line}{line}")).unwrap();
        let err = store.checkin(&keys, ws).await.unwrap_err().to_string();
        assert!(err.contains("ledger"), "{err}");
        assert_eq!(
            std::fs::read(keys.join("intermediate.key")).unwrap(),
            key_before
        );
        assert!(!keys.join("new.key").exists());
        assert_eq!(
            pg.sql(
                &db,
                "SELECT count(*) FROM ca_documents WHERE name = 'note.txt'"
            ),
            "0"
        );
        assert_eq!(pg.sql(&db, "SELECT generation FROM ca_meta"), "1");

        // Two writers without the lock: the second one conflicts, before
        // touching a key.
        let a = store.checkout(&keys, false).await.unwrap();
        let b = store.checkout(&keys, false).await.unwrap();
        std::fs::write(a.path().join("note.txt"), b"a").unwrap();
        std::fs::write(b.path().join("note.txt"), b"b").unwrap();
        std::fs::write(b.path().join("intermediate.key"), b"b").unwrap();
        store.checkin(&keys, a).await.unwrap();
        let err = store.checkin(&keys, b).await.unwrap_err().to_string();
        assert!(
            err.contains("changed while this command ran (generation 1, now 2)"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(keys.join("intermediate.key")).unwrap(),
            key_before
        );
        assert_eq!(
            pg.sql(
                &db,
                "SELECT convert_from(body, 'UTF8') FROM ca_documents WHERE name = 'note.txt'"
            ),
            "a"
        );
    });
}

#[test]
fn an_offline_root_stays_out_of_the_key_directory() {
    let Some(pg) = Pg::shared() else { return };
    let db = pg.new_db("offline");
    let url = pg.url(&db);
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    let err = fails(&[
        "init",
        "--trust-domain",
        TD,
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--root-key-out",
        p(&keys.join("root-offline.key")),
    ]);
    assert!(err.contains("inside the key directory"), "{err}");
    let root = tmp.path().join("root-offline.key");
    ok(&[
        "init",
        "--trust-domain",
        TD,
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--root-key-out",
        p(&root),
    ]);
    assert!(root.is_file() && !keys.join("root.key").exists());
    assert!(keys.join("intermediate.key").is_file());
    let err = fails(&["rotate", "intermediate", "--store", &url, "--dir", p(&keys)]);
    assert!(err.contains("--root-key"), "{err}");
    ok(&[
        "rotate",
        "intermediate",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--root-key",
        p(&root),
    ]);
    assert_eq!(pg.sql(&db, "SELECT generation FROM ca_meta"), "2");
    let new_root = tmp.path().join("root2.key");
    let err = fails(&[
        "rotate",
        "root",
        "prepare",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--root-key-out",
        p(&keys.join("next-root.key")),
    ]);
    assert!(err.contains("inside the key directory"), "{err}");
    ok(&[
        "rotate",
        "root",
        "prepare",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--root-key-out",
        p(&new_root),
    ]);
    assert!(new_root.is_file() && !keys.join("next/root.key").exists());
    assert!(keys.join("next/intermediate.key").is_file());
}

#[test]
fn a_database_down_is_unreachable_and_the_store_recovers_by_itself() {
    let Some(mut pg) = Pg::private() else { return };
    let (db, url, _tmp, keys) = store_ca(&pg, "down");
    let id = format!("spiffe://{TD}/ns/a/sa/b");
    let token = ok(&[
        "token",
        "create",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--spiffe-id",
        &id,
    ]);
    let sha = sha256_hex(token.trim());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(PgStore::connect(&url, true)).unwrap();
    let mut rx = rt.block_on(async { store.watch() });
    rt.block_on(store.ping()).unwrap();

    pg.stop();
    use keyproof_ca::store::StoreError;
    for e in [
        rt.block_on(store.ping()).unwrap_err(),
        rt.block_on(store.token_take(&sha, "r")).unwrap_err(),
        rt.block_on(store.generation()).unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::Unreachable { .. }), "{e:?}");
        assert!(!e.to_string().contains("-secret"), "{e}");
    }
    let err = fails(&["check", "--store", &url, "--dir", p(&keys)]);
    assert!(err.contains("is unreachable"), "{err}");

    // Back: the same store object works again, and so does the feed.
    pg.restart();
    rt.block_on(async {
        // Connections the server closed are not handed out again.
        store.ping().await.expect("ping after the restart");
        assert!(store.token_take(&sha, "r").await.unwrap().is_ok());
    });
    ok(&["rotate", "intermediate", "--store", &url, "--dir", p(&keys)]);
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|g| *g == 2))
            .await
            .expect("the feed follows after the restart")
            .unwrap();
    });
    assert_eq!(pg.sql(&db, "SELECT used_by FROM join_tokens"), "r");
}

#[test]
fn a_password_is_used_and_never_printed() {
    let Some(pg) = Pg::shared() else { return };
    let db = pg.new_db("password");
    let url = |pw: &str| {
        format!(
            "postgres://pwuser:{pw}@127.0.0.1:{}/{db}?sslmode=disable",
            pg.port
        )
    };
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    let wrong = url("wrong-secret");
    let o = run(&[
        "init",
        "--trust-domain",
        TD,
        "--store",
        &wrong,
        "--dir",
        p(&keys),
    ]);
    assert!(!o.ok);
    assert!(
        o.stderr.contains("is unreachable") && o.stderr.contains("password authentication failed"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("pwuser:***@"), "{}", o.stderr);
    no_password(&o);
    assert!(!keys.exists(), "nothing written");
    let right = url(pg::PWUSER_PASSWORD);
    let o = run(&[
        "init",
        "--trust-domain",
        TD,
        "--store",
        &right,
        "--dir",
        p(&keys),
    ]);
    assert!(o.ok, "{}", o.stderr);
    no_password(&o);
    let o = run(&["check", "--store", &right, "--dir", p(&keys)]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    no_password(&o);
}

#[test]
fn rotations_started_together_take_turns() {
    let Some(pg) = Pg::shared() else { return };
    let (db, url, _tmp, keys) = store_ca(&pg, "turns");
    // Issues run meanwhile: each sees a certificate and its key together,
    // never a new key beside the old certificate.
    let id = format!("spiffe://{TD}/ns/a/sa/b");
    let threads: Vec<_> = (0..9)
        .map(|i| {
            let (url, keys, id) = (url.clone(), keys.clone(), id.clone());
            let out = _tmp.path().to_owned();
            std::thread::spawn(move || {
                if i % 3 == 0 {
                    run(&["rotate", "intermediate", "--store", &url, "--dir", p(&keys)])
                } else {
                    run(&[
                        "issue",
                        "--store",
                        &url,
                        "--dir",
                        p(&keys),
                        "--spiffe-id",
                        &id,
                        "--key-out",
                        p(&out.join(format!("{i}.key"))),
                        "--cert-out",
                        p(&out.join(format!("{i}.crt"))),
                    ])
                }
            })
        })
        .collect();
    for t in threads {
        let o = t.join().unwrap();
        assert!(o.ok, "{}", o.stderr);
    }
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM ledger"), "6");
    // Each one saw the previous one's result: three new generations, and
    // the intermediate in the store is the one whose key is in --dir.
    assert_eq!(pg.sql(&db, "SELECT generation FROM ca_meta"), "4");
    let o = run(&["check", "--store", &url, "--dir", p(&keys)]);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(
        pg.sql(
            &db,
            "SELECT count(*) FROM ca_documents WHERE name LIKE 'archive/%intermediate.crt'"
        ),
        "3"
    );
}

#[test]
fn documents_named_like_keys_never_reach_a_key_file() {
    let Some(pg) = Pg::shared() else { return };
    let (db, url, _tmp, keys) = store_ca(&pg, "keydocs");
    let int_key = std::fs::read(keys.join("intermediate.key")).unwrap();
    pg.sql(
        &db,
        "INSERT INTO ca_documents (name, body) VALUES ('next/evil.key', 'evil'), \
         ('intermediate.key', 'evil'), ('archive/1-ROOT.KEY', 'evil')",
    );
    // One-shot commands run, and write no planted key anywhere.
    ok(&["check", "--store", &url, "--dir", p(&keys)]);
    ok(&["rotate", "intermediate", "--store", &url, "--dir", p(&keys)]);
    assert!(!keys.join("next/evil.key").exists());
    assert!(!keys.join("archive/1-ROOT.KEY").exists());
    let now_key = std::fs::read(keys.join("intermediate.key")).unwrap();
    assert_ne!(now_key, b"evil");
    assert_ne!(now_key, int_key, "the rotation made a new key");
    ok(&["check", "--store", &url, "--dir", p(&keys)]);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = PgStore::connect(&url, false).await.unwrap();
        let ws = store.checkout(&keys, true).await.unwrap();
        assert_eq!(
            std::fs::read(ws.path().join("intermediate.key")).unwrap(),
            now_key
        );
        assert!(!ws.path().join("next/evil.key").exists());
        assert!(ws.path().join("root.key").exists(), "one-shot: root key");
        drop(ws);

        // serve's workspace: no root keys, and a refresh of a generation
        // holding a planted key leaves its keys alone.
        let mut ws = store.checkout_serve(&keys).await.unwrap();
        assert!(!ws.path().join("root.key").exists());
        pg.sql(
            &db,
            "UPDATE ca_documents SET body = 'evil2' WHERE name = 'intermediate.key'; \
             INSERT INTO ca_documents (name, body) VALUES ('root.key', 'evil'); \
             UPDATE ca_meta SET generation = generation + 1",
        );
        store.refresh(&keys, &mut ws).await.unwrap();
        assert_eq!(
            std::fs::read(ws.path().join("intermediate.key")).unwrap(),
            now_key
        );
        assert!(!ws.path().join("root.key").exists());
        assert!(!ws.path().join("next/evil.key").exists());
    });
}

#[test]
fn a_key_directory_ahead_of_the_store_resolves_keys_by_content() {
    let Some(pg) = Pg::shared() else { return };
    let (_db, url, tmp, keys) = store_ca(&pg, "ahead");
    let old_key = std::fs::read(keys.join("intermediate.key")).unwrap();
    // A rotation killed between its key write and its commit: the old key
    // archived, a new one (here another CA's) in its place.
    std::fs::create_dir_all(keys.join("archive")).unwrap();
    std::fs::write(
        keys.join("archive/20261204T171500Z-intermediate.key"),
        &old_key,
    )
    .unwrap();
    let other = tmp.path().join("other");
    ok(&["init", "--trust-domain", TD, "--dir", p(&other)]);
    std::fs::copy(
        other.join("intermediate.key"),
        keys.join("intermediate.key"),
    )
    .unwrap();

    ok(&["check", "--store", &url, "--dir", p(&keys)]);
    let id = format!("spiffe://{TD}/ns/a/sa/b");
    ok(&[
        "issue",
        "--store",
        &url,
        "--dir",
        p(&keys),
        "--spiffe-id",
        &id,
        "--key-out",
        p(&tmp.path().join("w.key")),
        "--cert-out",
        p(&tmp.path().join("w.crt")),
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = PgStore::connect(&url, false).await.unwrap();
        let ws = store.checkout(&keys, false).await.unwrap();
        assert_eq!(
            std::fs::read(ws.path().join("intermediate.key")).unwrap(),
            old_key,
            "the workspace holds the stored certificate's key"
        );
    });
    // Running the rotation again completes it.
    ok(&["rotate", "intermediate", "--store", &url, "--dir", p(&keys)]);
    ok(&["check", "--store", &url, "--dir", p(&keys)]);
}

#[test]
fn serve_falls_back_to_the_previous_intermediate_until_its_successors_key_arrives() {
    let Some(pg) = Pg::shared() else { return };
    let (_db, url, tmp, keys) = store_ca(&pg, "fallback");
    // A replica's mounted Secret, a rotation behind.
    let mounted = tmp.path().join("mounted");
    std::fs::create_dir(&mounted).unwrap();
    std::fs::copy(
        keys.join("intermediate.key"),
        mounted.join("intermediate.key"),
    )
    .unwrap();
    std::fs::copy(keys.join("root.key"), mounted.join("root.key")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(PgStore::connect(&url, false)).unwrap();
    let before = rt.block_on(store.checkout(&keys, false)).unwrap();
    let old_crt = std::fs::read(before.path().join("intermediate.crt")).unwrap();
    drop(before);
    ok(&["rotate", "intermediate", "--store", &url, "--dir", p(&keys)]);
    // One-shot commands fail on the lagging key directory, as before.
    let o = run(&["check", "--store", &url, "--dir", p(&mounted)]);
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(!o.ok && all.contains("intermediate"), "{all}");
    rt.block_on(async {
        let mut ws = store.checkout_serve(&mounted).await.unwrap();
        assert!(ws.fallback(), "serve runs on the previous intermediate");
        assert_eq!(
            std::fs::read(ws.path().join("intermediate.crt")).unwrap(),
            old_crt
        );
        assert!(!ws.path().join("root.key").exists());
        // A one-shot command's workspace does not fall back.
        let one = store.checkout(&mounted, false).await.unwrap();
        assert!(!one.fallback());
        assert_ne!(
            std::fs::read(one.path().join("intermediate.crt")).unwrap(),
            old_crt
        );
        drop(one);
        // The key arrives: the stored intermediate is back.
        std::fs::copy(
            keys.join("intermediate.key"),
            mounted.join("intermediate.key"),
        )
        .unwrap();
        assert!(store.refresh(&mounted, &mut ws).await.unwrap());
        assert!(!ws.fallback());
        assert_ne!(
            std::fs::read(ws.path().join("intermediate.crt")).unwrap(),
            old_crt
        );
        assert_eq!(
            std::fs::read(ws.path().join("intermediate.key")).unwrap(),
            std::fs::read(keys.join("intermediate.key")).unwrap()
        );
    });
}
