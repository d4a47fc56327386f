//! A throwaway PostgreSQL 15 cluster on loopback for the tests of the CA on
//! PostgreSQL (`keyproof-ca ... --store postgres://...`).
//!
//! Debian's binaries (`/usr/lib/postgresql/15/bin`, package `postgresql`,
//! installed by `./test.sh`). PostgreSQL refuses to run as root, and CI runs
//! as root: `initdb` and `postgres` then run as the `postgres` user (uid and
//! gid from `id`, no supplementary groups) on a data directory in a temp dir
//! chowned to it. Trust authentication, `listen_addresses = '127.0.0.1'` on
//! a free port, the unix socket in the temp dir (never `/var/run/postgresql`),
//! `fsync = off`: a test cluster, not a durable one.
//!
//! The postmaster is our child. [`Postgres::stop`] shuts it down (fast
//! shutdown: connections are cut, as when the database goes away) and
//! [`Postgres::start_again`] brings it back on the same data directory and
//! port, for "the database is down for a while" tests. Dropping it shuts the
//! cluster down (immediate shutdown; the postmaster takes its backends with
//! it) and removes the temp dir. A cluster left by a test process that no
//! longer exists (killed before its drop ran) is shut down and removed by
//! the next [`Postgres::start`].
//!
//! Without PostgreSQL [`Postgres::start`] prints a NOTICE and returns `None`;
//! with `CI` set it panics instead, so a CI image without it fails rather
//! than passes silently.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{is_root, user_ids, PG_BIN};

/// Temp dir prefix: `kp-pg-<test pid>-`, so a sweep knows whose it is.
const PREFIX: &str = "kp-pg-";

/// A running (or stopped) loopback PostgreSQL cluster.
pub struct Postgres {
    tmp: Option<tempfile::TempDir>,
    data: PathBuf,
    port: u16,
    /// uid/gid the server runs as (`postgres` when we are root).
    ids: Option<(u32, u32)>,
    child: Option<Child>,
}

/// True when PostgreSQL can be started here; a NOTICE (or, with `CI` set,
/// a panic) says what is missing otherwise.
pub fn available() -> bool {
    let mut missing = Vec::new();
    for b in ["initdb", "postgres", "pg_isready"] {
        if !Path::new(PG_BIN).join(b).exists() {
            missing.push(format!("{PG_BIN}/{b}"));
        }
    }
    if !crate::have("psql") {
        missing.push("psql".to_owned());
    }
    if is_root()
        && Command::new("id")
            .arg("postgres")
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
    {
        missing.push("the postgres user".to_owned());
    }
    if missing.is_empty() {
        return true;
    }
    let ci = std::env::var("CI")
        .map(|v| !v.is_empty() && v != "0" && v != "false")
        .unwrap_or(false);
    if ci {
        panic!(
            "needed when CI is set: {} (apt-get install -y postgresql; ./test.sh installs it)",
            missing.join(", ")
        );
    }
    eprintln!(
        "NOTICE: skipping a PostgreSQL test, missing: {} (apt-get install -y postgresql)",
        missing.join(", ")
    );
    false
}

impl Postgres {
    /// initdb and start a cluster; `None` (with a notice) when PostgreSQL
    /// is not installed and `CI` is not set.
    pub fn start() -> Option<Postgres> {
        if !available() {
            return None;
        }
        sweep();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("tempdir for PostgreSQL");
        let ids = is_root().then(|| user_ids("postgres"));
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid))
                .expect("chown the PostgreSQL temp dir");
        }
        let data = tmp.path().join("data");
        let out = crate::run(
            as_server(ids, Command::new(format!("{PG_BIN}/initdb")))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
                .current_dir(tmp.path()),
        );
        assert!(
            out.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = crate::free_port();
        let conf = format!(
            "\n# keyproof tests\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 100\nshared_buffers = 16MB\n\
             log_min_messages = warning\n",
            tmp.path().display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut pg_conf = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        pg_conf.push_str(&conf);
        std::fs::write(&conf_path, pg_conf).expect("write postgresql.conf");
        let mut pg = Postgres {
            tmp: Some(tmp),
            data,
            port,
            ids,
            child: None,
        };
        pg.start_again();
        Some(pg)
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir: the unix socket's directory (`psql -h DIR`), and where
    /// the server log (`postgres.log`) is.
    pub fn dir(&self) -> &Path {
        self.tmp.as_ref().expect("temp dir").path()
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir().join("postgres.log")).unwrap_or_default()
    }

    /// True while the postmaster runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the postmaster on the data directory (again, after
    /// [`Postgres::stop`]) and waits until it accepts connections.
    pub fn start_again(&mut self) {
        assert!(!self.running(), "PostgreSQL is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("postgres.log"))
            .expect("postgres.log");
        let mut c = as_server(self.ids, Command::new(format!("{PG_BIN}/postgres")));
        c.arg("-D")
            .arg(&self.data)
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(c.spawn().expect("start postgres"));
        let start = Instant::now();
        loop {
            assert!(self.running(), "postgres exited:\n{}", self.log_text());
            let ready = Command::new(format!("{PG_BIN}/pg_isready"))
                .arg("-h")
                .arg(self.dir())
                .args(["-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "postgres never became ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the postmaster (fast shutdown: open connections are cut) and
    /// waits until it is gone; the data directory stays for
    /// [`Postgres::start_again`].
    pub fn stop(&mut self) {
        self.signal_and_wait("INT", Duration::from_secs(20));
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    fn signal_and_wait(&mut self, signal: &str, timeout: Duration) {
        let Some(c) = self.child.as_mut() else {
            return;
        };
        if !matches!(c.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &c.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `postgres://` URL of database `db` on 127.0.0.1 (user `postgres`,
    /// trust authentication, no TLS), creating the database if it does not
    /// exist yet.
    pub fn url(&self, db: &str) -> String {
        assert!(
            !db.is_empty() && db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "database name {db:?}: letters, digits and _ only"
        );
        let exists = self
            .psql(
                "postgres",
                &format!("SELECT 1 FROM pg_database WHERE datname = '{db}'"),
            )
            .expect("list databases");
        if exists.trim() != "1" {
            self.psql("postgres", &format!("CREATE DATABASE {db}"))
                .expect("CREATE DATABASE");
        }
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// `psql -X -tA -c SQL` on database `db` over the unix socket: trimmed
    /// stdout, or the error text.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = crate::run(
            Command::new("psql")
                .args(["-X", "-tA", "-v", "ON_ERROR_STOP=1", "-h"])
                .arg(self.dir())
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
                .args(["-c", sql])
                .env("PGCONNECT_TIMEOUT", "10"),
        );
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown: the postmaster takes its backends with it.
        self.signal_and_wait("QUIT", Duration::from_secs(10));
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        // A postmaster that outlived its Child handle (it forked, or the
        // handle was lost in a panic) is found through its pid file.
        if let Some(tmp) = self.tmp.take() {
            kill_by_dir(tmp.path());
            let _ = tmp.close();
        }
    }
}

/// A `Command` that runs as `ids` (uid, gid; no supplementary groups: std
/// clears them when root changes uid), or as we are.
fn as_server(ids: Option<(u32, u32)>, mut c: Command) -> Command {
    if let Some((uid, gid)) = ids {
        c.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    c
}

/// Shuts down processes whose postmaster.pid is under `dir` (immediate
/// shutdown, then SIGKILL).
fn kill_by_dir(dir: &Path) {
    let pidfile = dir.join("data").join("postmaster.pid");
    let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return;
    };
    // Only a postgres process whose data directory is this one.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if !cmdline.contains(&dir.join("data").display().to_string()) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-QUIT", &pid.to_string()])
        .status();
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Clusters of test processes that no longer exist: shut down and removed.
fn sweep() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        kill_by_dir(&e.path());
        let _ = std::fs::remove_dir_all(e.path());
    }
}
