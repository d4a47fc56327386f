//! The CA on PostgreSQL, highly available (issue 19 §2): several
//! `keyproof-ca serve` replicas on one database, run as the real binaries
//! over real TLS on loopback, with a PostgreSQL 15 cluster the test starts
//! (`keyproof_tests::postgres`).

use keyproof_tests::postgres::Postgres;

/// The test cluster itself: a database, a stop that cuts connections, a
/// start again on the same data, and nothing left behind.
#[test]
fn test_cluster_stops_and_starts_on_its_data() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let url = pg.url("kp_cluster");
    assert!(url.starts_with("postgres://postgres@127.0.0.1:"), "{url}");
    pg.psql(
        "kp_cluster",
        "CREATE TABLE t (v int); INSERT INTO t VALUES (7)",
    )
    .unwrap();
    pg.stop();
    assert!(pg.psql("kp_cluster", "SELECT v FROM t").is_err());
    pg.start_again();
    assert_eq!(pg.psql("kp_cluster", "SELECT v FROM t").unwrap(), "7");
    // url() of an existing database does not create it again.
    assert_eq!(pg.url("kp_cluster"), url);
    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(!dir.exists(), "{} left behind", dir.display());
}
