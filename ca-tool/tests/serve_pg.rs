//! `keyproof-ca serve` on the PostgreSQL store, as processes: two replicas
//! of the real binary on one PostgreSQL cluster that each test starts (as
//! the `postgres` user when run as root, as CI does) in a temporary
//! directory, over real TLS on loopback.
//!
//! What `serve` itself adds to the store: a rotation committed by the CLI
//! reaching every replica, one join token presented to two replicas at once
//! giving one certificate, and the database going away (issuance refused
//! with `store_unavailable` and counted, `/ready` 503, the bundle still
//! served) and coming back (issuance again, no restart). The end-to-end
//! scenarios of issue 19 are in `tests/tests/ca_ha.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use keyproof_ca::client::{self, CaClient, ClientError};
use keyproof_identity::keys::{self, KeyType};
use keyproof_identity::spiffe::{IdPattern, TrustDomain};
use keyproof_identity::verify::{SvidVerifier, TrustBundle};

const TD: &str = "pg.keyproof.test";
/// How long anything a test waits for may take before the test fails (a
/// guard against hanging, not a measure: the figures are in benches/).
const PATIENCE: Duration = Duration::from_secs(60);

fn ca() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keyproof-ca"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A PostgreSQL cluster of its own: `initdb` into a temporary directory,
/// trust authentication, loopback only, the socket in that directory;
/// run by `pg_ctl` so that a test can stop and start it (the shared
/// cluster of `common/pg.rs` cannot go down under one test). Stopped
/// (immediately) and removed on drop.
struct Pg {
    tmp: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// uid and gid of `postgres` when we run as root (the postmaster
    /// refuses to run as root).
    owner: Option<(u32, u32)>,
}

impl Pg {
    /// `None` (after a notice) when PostgreSQL is not installed and `CI` is
    /// not set, as in `store_pg.rs`; with `CI` set that fails the test.
    fn start() -> Option<Pg> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max();
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is not installed (apt-get install -y postgresql) and CI is set"
            );
            eprintln!(
                "NOTICE: PostgreSQL is not installed; skipping (apt-get install -y postgresql)"
            );
            return None;
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = |flag: &str, user: &str| -> u32 {
            ok(Command::new("id").args([flag, user]))
                .trim()
                .parse()
                .expect("id")
        };
        let owner = (ok(Command::new("id").arg("-u")).trim() == "0")
            .then(|| (id("-u", "postgres"), id("-g", "postgres")));
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid)).expect("chown");
        }
        let pg = Pg {
            tmp,
            bin,
            port: free_port(),
            owner,
        };
        ok(pg.cmd("initdb").arg("-D").arg(pg.data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]));
        let conf = pg.data().join("postgresql.conf");
        let mut c = std::fs::read_to_string(&conf).expect("postgresql.conf");
        c.push_str(&format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nmax_connections = 100\n",
            pg.port,
            pg.tmp.path().display()
        ));
        std::fs::write(&conf, c).expect("write postgresql.conf");
        pg.up();
        Some(pg)
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid);
        }
        c.current_dir(self.tmp.path());
        c
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Starts the postmaster and waits until it accepts connections.
    fn up(&self) {
        ok(self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.tmp.path().join("postgres.log"))
            .args(["-w", "start"]));
    }

    /// `pg_ctl stop -m fast`: every connection is closed.
    fn down(&self) {
        ok(self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"]));
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A CA in a store, a key directory, and a workload's SVID and bundle in
/// files, for `keyproof-ca renew`.
struct Setup {
    pg: Pg,
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Option<Setup> {
        let pg = Pg::start()?;
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = Setup { pg, tmp };
        ok(s.state_cmd("init").args(["--trust-domain", TD]));
        ok(s.state_cmd("issue")
            .args(["--spiffe-id", &format!("spiffe://{TD}/w")])
            .arg("--key-out")
            .arg(s.path("w.key"))
            .arg("--cert-out")
            .arg(s.path("w.crt")));
        let bundle = ok(&mut s.state_cmd("bundle"));
        std::fs::write(s.path("bundle.pem"), bundle).expect("bundle");
        Some(s)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn keys(&self) -> PathBuf {
        self.path("keys")
    }

    /// `keyproof-ca <words> --store URL --dir KEYDIR`.
    fn state_cmd(&self, words: &str) -> Command {
        let mut c = ca();
        c.args(words.split(' '))
            .args(["--store", &self.pg.url()])
            .arg("--dir")
            .arg(self.keys());
        c
    }

    /// A replica with the setup's key directory.
    fn replica(&self, name: &str) -> Replica {
        Replica::start(self, name, &self.keys())
    }

    /// Renews the workload's SVID from `r`; on success, the intermediate
    /// the answer chains through (DER).
    fn renew(&self, r: &Replica) -> Result<Vec<u8>, String> {
        let out = ca()
            .arg("renew")
            .arg("--cert")
            .arg(self.path("w.crt"))
            .arg("--key")
            .arg(self.path("w.key"))
            .arg("--bundle")
            .arg(self.path("bundle.pem"))
            .args(["--ca-url", &format!("https://{}", r.api), "--force"])
            .output()
            .expect("run renew");
        if !out.status.success() {
            return Err(text(&out));
        }
        let chain = keys::certs_from_pem(&std::fs::read(self.path("w.crt")).expect("chain"))
            .expect("chain PEM");
        assert_eq!(chain.len(), 2, "leaf and intermediate");
        Ok(chain[1].to_vec())
    }

    /// A client of `r`'s API that authenticates it with the bundle.
    fn client(&self, r: &Replica) -> CaClient {
        let roots = keys::certs_from_pem(&std::fs::read(self.path("bundle.pem")).expect("bundle"))
            .expect("bundle PEM");
        let verifier = SvidVerifier::new(
            TrustDomain::parse(TD).expect("td"),
            TrustBundle::new(roots).expect("bundle"),
        );
        CaClient::new(
            &format!("https://{}", r.api),
            Arc::new(ArcSwap::from_pointee(verifier)),
            IdPattern::parse(&format!("spiffe://{TD}/keyproof-ca")).expect("server id"),
        )
        .expect("client")
    }
}

/// One `keyproof-ca serve --store` process.
struct Replica {
    child: Child,
    api: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Replica {
    fn start(s: &Setup, name: &str, key_dir: &Path) -> Replica {
        let log = s.path(&format!("{name}.log"));
        let child = ca()
            .arg("serve")
            .args(["--store", &s.pg.url()])
            .arg("--dir")
            .arg(key_dir)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--rate-limit", "0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn serve");
        let mut r = Replica {
            child,
            api: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        // The bound addresses are in the "keyproof-ca serving" line.
        let start = Instant::now();
        loop {
            let log = r.log_text();
            if let Some(line) = log.lines().find(|l| l.contains("keyproof-ca serving")) {
                let field = |name: &str| -> SocketAddr {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(&format!("{name}=")))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("no {name}= in {line}"))
                };
                r.api = field("listen");
                r.admin = field("admin_listen");
                return r;
            }
            assert!(
                r.child.try_wait().expect("wait").is_none(),
                "serve {name} exited:\n{log}"
            );
            assert!(
                start.elapsed() < PATIENCE,
                "serve {name} never listened:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` on the admin listener: (status, body).
    fn admin_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.admin).expect("admin connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("admin answer");
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {answer:?}"));
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_owned())
    }

    /// The value of the sample `name` (with its labels) in `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
    }

    /// Waits until `/ready` answers `status`; returns the body.
    fn wait_ready(&self, status: u16) -> String {
        let start = Instant::now();
        loop {
            let (s, body) = self.admin_get("/ready");
            if s == status {
                return body;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "/ready still {s} ({body}), not {status}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Renews from `r` until the intermediate differs from `old`; returns it
/// and how long that took.
fn wait_for_new_intermediate(s: &Setup, r: &Replica, old: &[u8]) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    loop {
        match s.renew(r) {
            Ok(int) if int != old => return (int, start.elapsed()),
            Ok(_) => {}
            Err(e) => panic!("renewal failed:\n{e}\n{}", r.log_text()),
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{} still serves the old intermediate:\n{}",
            r.api,
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_rotation_committed_to_the_store_reaches_both_replicas() {
    let Some(s) = Setup::new() else { return };
    let a = s.replica("a");
    let b = s.replica("b");
    let old = s.renew(&a).expect("renew from a");
    assert_eq!(s.renew(&b).expect("renew from b"), old);
    let generation = a.metric("keyproof_ca_store_generation");
    assert_eq!(b.metric("keyproof_ca_store_generation"), generation);

    ok(&mut s.state_cmd("rotate intermediate"));
    let rotated = Instant::now();
    let (new_a, took_a) = wait_for_new_intermediate(&s, &a, &old);
    let (new_b, _) = wait_for_new_intermediate(&s, &b, &old);
    let took_b = rotated.elapsed();
    eprintln!("the new intermediate was served by a after {took_a:?}, by both after {took_b:?}");
    assert_eq!(
        new_a, new_b,
        "both replicas serve the same new intermediate"
    );
    // Neither replica was restarted, and both say they follow the new
    // generation.
    for r in [&a, &b] {
        assert!(r.metric("keyproof_ca_store_generation") > generation);
        assert!(r.log_text().contains("the CA store changed; reloading"));
    }
}

#[test]
fn one_join_token_sent_to_both_replicas_at_once_gives_one_certificate() {
    let Some(s) = Setup::new() else { return };
    let a = s.replica("a");
    let b = s.replica("b");
    let (ca_a, ca_b) = (s.client(&a), s.client(&b));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let id = format!("spiffe://{TD}/joined");
    let mut token_ids = Vec::new();
    for round in 0..10 {
        let out = ok(s.state_cmd("token create").args(["--spiffe-id", &id]));
        let token = out
            .split_whitespace()
            .find(|w| w.starts_with("kpt_"))
            .unwrap_or_else(|| panic!("no token in {out}"))
            .to_owned();
        token_ids.push(keyproof_ca::token::id_of(&token));
        let (ka, kb) = (
            client::new_key(KeyType::EcdsaP256, &id).unwrap(),
            client::new_key(KeyType::EcdsaP256, &id).unwrap(),
        );
        let (ra, rb) = rt.block_on(async {
            tokio::join!(
                ca_a.bootstrap(&token, &ka.csr_pem),
                ca_b.bootstrap(&token, &kb.csr_pem)
            )
        });
        let results = [ra, rb];
        let issued = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(issued, 1, "round {round}: {results:?}");
        let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(
            matches!(refused, ClientError::Refused { status: 401, code, .. } if code == "token_reused"),
            "round {round}: {refused:?}"
        );
    }
    // A request refused after the token was taken gives it back before
    // the refusal is answered: the client may use it at once, on either
    // replica, and only once.
    let out = ok(s.state_cmd("token create").args(["--spiffe-id", &id]));
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("kpt_"))
        .unwrap()
        .to_owned();
    token_ids.push(keyproof_ca::token::id_of(&token));
    let k = client::new_key(KeyType::EcdsaP256, &id).unwrap();
    let other = format!("spiffe://{TD}/someone-else");
    rt.block_on(async {
        let e = ca_a
            .bootstrap_for(&token, &k.csr_pem, Some(&other))
            .await
            .expect_err("another identity");
        assert_eq!(e.code(), Some("id_mismatch"), "{e:?}");
        ca_b.bootstrap(&token, &k.csr_pem)
            .await
            .expect("the token was given back");
        let e = ca_a.bootstrap(&token, &k.csr_pem).await.expect_err("spent");
        assert_eq!(e.code(), Some("token_reused"), "{e:?}");
    });
    // The ledger holds each bootstrap once.
    let ledger = ok(&mut s.state_cmd("ledger export"));
    for t in &token_ids {
        let entries = ledger
            .lines()
            .filter(|l| l.contains(&format!("\"bootstrap:{t}\"")))
            .count();
        assert_eq!(entries, 1, "token {t}:\n{ledger}");
    }
    let used: f64 = [&a, &b]
        .iter()
        .map(|r| r.metric("keyproof_ca_issuances_total{kind=\"bootstrap_token\",result=\"ok\"}"))
        .sum();
    assert_eq!(used, 11.0);
}

#[test]
fn without_the_database_issuance_is_refused_and_counted_and_it_recovers_without_restart() {
    let Some(s) = Setup::new() else { return };
    let mut a = s.replica("a");
    let mut b = s.replica("b");
    for r in [&a, &b] {
        s.renew(r).expect("renew while the database is up");
        r.wait_ready(200);
        assert_eq!(r.metric("keyproof_ca_store_up"), 1.0);
    }

    s.pg.down();
    for r in [&a, &b] {
        let why = r.wait_ready(503);
        assert!(why.contains("database"), "{why}");
        let err = s.renew(r).expect_err("no certificate without the database");
        assert!(err.contains("503 store_unavailable"), "{err}");
        assert_eq!(
            r.metric("keyproof_ca_refusals_total{code=\"store_unavailable\"}"),
            1.0
        );
        assert_eq!(
            r.metric("keyproof_ca_issuances_total{kind=\"renew\",result=\"error\"}"),
            1.0
        );
        // Whichever noticed first: the pinger, the follower, or the
        // renewal's ledger commit (later requests are refused without
        // trying the database).
        let failed: f64 = ["ping", "refresh", "ledger_append"]
            .iter()
            .map(|op| r.metric(&format!("keyproof_ca_store_errors_total{{op=\"{op}\"}}")))
            .sum();
        assert!(failed >= 1.0, "no failed store operation counted");
        assert_eq!(r.metric("keyproof_ca_store_up"), 0.0);
        assert_eq!(r.metric("keyproof_ca_ready"), 0.0);
        // What needs no write is still served, from memory.
        let bundle = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(s.client(r).bundle())
            .expect("the bundle without the database");
        assert!(!bundle.is_empty());
    }
    // A join token cannot be taken either (nothing was handed out).
    let k = client::new_key(KeyType::EcdsaP256, &format!("spiffe://{TD}/x")).unwrap();
    let err = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(s.client(&a).bootstrap("kpt_not-a-token-at-all", &k.csr_pem))
        .expect_err("no bootstrap without the database");
    assert_eq!(err.code(), Some("store_unavailable"), "{err:?}");

    s.pg.up();
    for r in [&a, &b] {
        r.wait_ready(200);
        let start = Instant::now();
        while let Err(e) = s.renew(r) {
            assert!(
                start.elapsed() < PATIENCE,
                "no renewal after the database came back:\n{e}\n{}",
                r.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(r.metric("keyproof_ca_store_up"), 1.0);
    }
    assert!(a.running() && b.running(), "no replica was restarted");
}

/// Keys reach the replicas' key directory on their own schedule (a
/// Kubernetes Secret volume updates within a minute or so): until the new
/// intermediate's key is there the replicas keep serving the previous
/// state, stay ready and say they lag in a metric; once it is, they pick it up without a
/// notification and without a restart.
#[test]
fn a_key_reaching_the_key_directory_after_the_rotation_is_picked_up() {
    let Some(s) = Setup::new() else { return };
    // The replicas' own copy of the keys, as a mounted Secret would be.
    let mounted = s.path("mounted");
    std::fs::create_dir(&mounted).unwrap();
    for k in ["intermediate.key", "root.key"] {
        std::fs::copy(s.keys().join(k), mounted.join(k)).unwrap();
    }
    let mut a = Replica::start(&s, "a", &mounted);
    let old = s.renew(&a).expect("renew");

    ok(&mut s.state_cmd("rotate intermediate"));
    // Lagging, not unready: every replica waits for the same Secret, and
    // the Service must keep an endpoint meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.metric("keyproof_ca_store_state_current") != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never noticed the state it cannot load yet"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        a.admin_get("/ready").0,
        200,
        "a lagging replica stays ready"
    );
    assert_eq!(
        s.renew(&a).expect("renew from the previous state"),
        old,
        "the previous intermediate serves until its successor's key is there"
    );

    // The Secret update: the new key arrives (atomically, as the kubelet
    // swaps the volume's files).
    let tmp = mounted.join(".intermediate.key.new");
    std::fs::copy(s.keys().join("intermediate.key"), &tmp).unwrap();
    std::fs::rename(&tmp, mounted.join("intermediate.key")).unwrap();
    let (new, _) = wait_for_new_intermediate(&s, &a, &old);
    assert_ne!(new, old);
    a.wait_ready(200);
    assert_eq!(a.metric("keyproof_ca_store_state_current"), 1.0);
    assert!(a.running());
}

/// Waits until `r`'s log contains `what`.
fn wait_log(r: &Replica, what: &str) {
    let start = Instant::now();
    while !r.log_text().contains(what) {
        assert!(
            start.elapsed() < PATIENCE,
            "no {what:?} in the log:\n{}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_bootstrap_whose_client_gives_up_during_the_ledger_commit_keeps_the_token_used() {
    let Some(s) = Setup::new() else { return };
    let a = s.replica("a");
    let b = s.replica("b");
    let (ca_a, ca_b) = (s.client(&a), s.client(&b));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let id = format!("spiffe://{TD}/joined");
    let out = ok(s.state_cmd("token create").args(["--spiffe-id", &id]));
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("kpt_"))
        .unwrap_or_else(|| panic!("no token in {out}"))
        .to_owned();
    let token_id = keyproof_ca::token::id_of(&token);
    let k = client::new_key(KeyType::EcdsaP256, &id).unwrap();
    rt.block_on(async {
        // Another session holds the ledger: every append queues behind it.
        let (locker, conn) = tokio_postgres::connect(&s.pg.url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        locker
            .batch_execute("BEGIN; LOCK TABLE ledger IN EXCLUSIVE MODE")
            .await
            .expect("lock the ledger");
        // The client gives up while its ledger row is queued.
        let gave_up =
            tokio::time::timeout(Duration::from_secs(2), ca_a.bootstrap(&token, &k.csr_pem)).await;
        assert!(
            gave_up.is_err(),
            "answered under a locked ledger: {gave_up:?}"
        );
        // Whether the server saw the client go or its own deadline passed,
        // the token stays used.
        wait_log(&a, "the join token stays used");
        // A renewal on the same replica is refused with the store's code
        // instead of hanging (the replica marked the store down, or its
        // ledger commit times out).
        let e = s.renew(&a).expect_err("no renewal under a locked ledger");
        assert!(e.contains("store_unavailable"), "{e}");
        // The queued row commits now.
        locker.batch_execute("COMMIT").await.expect("unlock");
        let e = ca_b
            .bootstrap(&token, &k.csr_pem)
            .await
            .expect_err("the token was spent by the first bootstrap");
        assert_eq!(e.code(), Some("token_reused"), "{e:?}");
    });
    let ledger = ok(&mut s.state_cmd("ledger export"));
    let rows = ledger
        .lines()
        .filter(|l| l.contains(&format!("\"bootstrap:{token_id}\"")))
        .count();
    assert!(rows <= 1, "token {token_id}:\n{ledger}");
    // The replica recovers once the database answers again.
    a.wait_ready(200);
    let start = Instant::now();
    while let Err(e) = s.renew(&a) {
        assert!(start.elapsed() < PATIENCE, "no renewal after the lock: {e}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `r`'s metric `name` is `want`.
fn wait_metric(r: &Replica, name: &str, want: f64) {
    let start = Instant::now();
    loop {
        let v = r.metric(name);
        if v == want {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{name} still {v}, not {want}:\n{}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_replica_that_cannot_follow_the_store_says_so_and_stays_ready() {
    let Some(s) = Setup::new() else { return };
    let a = s.replica("a");
    a.wait_ready(200);
    wait_metric(&a, "keyproof_ca_store_state_current", 1.0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sql = |q: &'static str| {
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&s.pg.url(), tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            c.batch_execute(q).await.expect(q);
        })
    };
    // A document row no replica can write into its workspace.
    sql(
        "BEGIN; INSERT INTO ca_documents (name, body) VALUES ('../escape', 'x'); \
         UPDATE ca_meta SET generation = generation + 1; COMMIT",
    );
    wait_metric(&a, "keyproof_ca_store_state_current", 0.0);
    assert!(a.metric("keyproof_ca_store_errors_total{op=\"refresh\"}") >= 1.0);
    // It still issues from its valid chain, so it stays ready.
    a.wait_ready(200);
    s.renew(&a).expect("renew from the previous state");
    // Repaired: current again.
    sql("BEGIN; DELETE FROM ca_documents WHERE name = '../escape'; \
         UPDATE ca_meta SET generation = generation + 1; COMMIT");
    wait_metric(&a, "keyproof_ca_store_state_current", 1.0);
    a.wait_ready(200);
}

#[test]
fn a_replica_restarting_after_a_rotation_killed_before_its_commit_serves_the_stored_chain() {
    let Some(s) = Setup::new() else { return };
    let stored = keys::certs_from_pem(&std::fs::read(s.path("w.crt")).expect("chain"))
        .expect("chain PEM")[1]
        .to_vec();
    // What `rotate intermediate --store` leaves when killed while its
    // transaction stalls: the old key archived, a new one in its place, the
    // store's documents unchanged.
    let keys_dir = s.keys();
    std::fs::create_dir_all(keys_dir.join("archive")).unwrap();
    std::fs::copy(
        keys_dir.join("intermediate.key"),
        keys_dir.join("archive/20261204T171500Z-intermediate.key"),
    )
    .unwrap();
    let other = s.path("other");
    ok(ca()
        .args(["init", "--trust-domain", TD, "--dir"])
        .arg(&other));
    std::fs::copy(
        other.join("intermediate.key"),
        keys_dir.join("intermediate.key"),
    )
    .unwrap();

    ok(&mut s.state_cmd("check"));
    let mut a = s.replica("a");
    assert_eq!(
        s.renew(&a).expect("renew"),
        stored,
        "the replica issues from the chain the store holds"
    );
    assert!(a.running());
}

#[test]
fn a_replica_starting_before_the_new_key_reaches_it_serves_the_previous_chain() {
    let Some(s) = Setup::new() else { return };
    // The replicas' own copy of the keys, as a mounted Secret would be.
    let mounted = s.path("mounted");
    std::fs::create_dir(&mounted).unwrap();
    for k in ["intermediate.key", "root.key"] {
        std::fs::copy(s.keys().join(k), mounted.join(k)).unwrap();
    }
    let old = keys::certs_from_pem(&std::fs::read(s.path("w.crt")).expect("chain"))
        .expect("chain PEM")[1]
        .to_vec();
    ok(&mut s.state_cmd("rotate intermediate"));
    // A replica (re)starting now: the store has the new intermediate, the
    // Secret not yet its key.
    let mut b = Replica::start(&s, "b", &mounted);
    assert_eq!(
        s.renew(&b).expect("renew from the previous chain"),
        old,
        "the previous intermediate serves until its successor's key is there"
    );
    assert!(b.running());
    assert_eq!(b.metric("keyproof_ca_store_state_current"), 0.0, "it lags");
    // One-shot commands do not fall back.
    let out = ca()
        .arg("check")
        .args(["--store", &s.pg.url()])
        .arg("--dir")
        .arg(&mounted)
        .output()
        .expect("run check");
    assert!(!out.status.success(), "check passed on a lagging key dir");

    // The Secret update reaches the replica: it moves to the new chain.
    let tmp = mounted.join(".intermediate.key.new");
    std::fs::copy(s.keys().join("intermediate.key"), &tmp).unwrap();
    std::fs::rename(&tmp, mounted.join("intermediate.key")).unwrap();
    let (new, _) = wait_for_new_intermediate(&s, &b, &old);
    assert_ne!(new, old);
    assert!(b.running());
    assert_eq!(b.metric("keyproof_ca_store_state_current"), 1.0);
}

#[test]
fn a_revocation_committed_to_the_store_reaches_both_replicas_with_the_lineage() {
    let Some(s) = Setup::new() else { return };
    let a = s.replica("a");
    let b = s.replica("b");
    // The stolen certificate; then a renewal of it (as a thief would).
    std::fs::copy(s.path("w.crt"), s.path("stolen.crt")).expect("copy");
    std::fs::copy(s.path("w.key"), s.path("stolen.key")).expect("copy");
    s.renew(&a).expect("renew from a");
    let serial = |f: &str| {
        let chain = keys::certs_from_pem(&std::fs::read(s.path(f)).expect("chain")).expect("pem");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("x509");
        keyproof_ca::ca::serial_hex(leaf.tbs_certificate.raw_serial())
    };
    let (stolen, renewed) = (serial("stolen.crt"), serial("w.crt"));
    // The store's ledger links the renewal to its parent.
    let export = ok(ca().args(["ledger", "export", "--store", &s.pg.url()]));
    assert!(
        export.contains(&format!("\"serial\":\"{renewed}\""))
            && export.contains(&format!("\"renewed_from\":\"{stolen}\"")),
        "{export}"
    );

    let out = ok(s
        .state_cmd("revoke")
        .args(["--serial", &stolen, "--reason", "stolen"]));
    assert!(out.contains(&stolen) && out.contains(&renewed), "{out}");
    // Both replicas refuse both, within about a second.
    let start = Instant::now();
    for r in [&a, &b] {
        loop {
            match s.renew(r) {
                Err(e) if e.contains("certificate_revoked") => break,
                other => {
                    assert!(start.elapsed() < PATIENCE, "{other:?}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    std::fs::copy(s.path("stolen.crt"), s.path("w.crt")).expect("copy");
    std::fs::copy(s.path("stolen.key"), s.path("w.key")).expect("copy");
    let err = s.renew(&b).expect_err("the stolen certificate renews");
    assert!(err.contains("certificate_revoked"), "{err}");
}
