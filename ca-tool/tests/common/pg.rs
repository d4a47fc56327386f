//! A throwaway PostgreSQL cluster on loopback for the store's tests:
//! `initdb` into a temporary directory and `postgres` in the foreground,
//! both as the `postgres` user when the tests run as root (PostgreSQL
//! refuses to run as root), trust authentication, a free port. Tests share
//! one cluster while any of them holds it ([`Pg::shared`]); it is stopped
//! and removed when the last one lets go.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A running cluster.
pub struct Pg {
    child: Child,
    /// Removed on drop (after the server stopped).
    _dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
}

fn bin_dir() -> Option<PathBuf> {
    let preferred = PathBuf::from("/usr/lib/postgresql/15/bin");
    if preferred.join("postgres").exists() {
        return Some(preferred);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").exists())
        .collect();
    found.sort();
    found.pop()
}

fn user_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

static SHARED: Mutex<Weak<Pg>> = Mutex::new(Weak::new());
static DBS: AtomicUsize = AtomicUsize::new(0);

impl Pg {
    /// The cluster the running tests share, started if none runs. `None`
    /// (after a notice) when PostgreSQL is not installed and `CI` is not
    /// set; with `CI` set a missing PostgreSQL fails the test.
    pub fn shared() -> Option<Arc<Pg>> {
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pg) = slot.upgrade() {
            return Some(pg);
        }
        let pg = Arc::new(Pg::start()?);
        *slot = Arc::downgrade(&pg);
        Some(pg)
    }

    fn start() -> Option<Pg> {
        let Some(bin) = bin_dir() else {
            if std::env::var_os("CI").is_some() {
                panic!("PostgreSQL is not installed (apt-get install -y postgresql) and CI is set");
            }
            eprintln!(
                "NOTICE: PostgreSQL is not installed (/usr/lib/postgresql/*/bin/postgres); \
                 skipping the store test (apt-get install -y postgresql to run it)"
            );
            return None;
        };
        let ids = if is_root() {
            Some(user_ids("postgres").expect("the postgres user (from the postgresql package)"))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("keyproof-pg")
            .tempdir()
            .expect("tempdir");
        if let Some((uid, gid)) = ids {
            let ok = Command::new("chown")
                .arg(format!("{uid}:{gid}"))
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(ok.success(), "chown {}", dir.path().display());
        }
        let data = dir.path().join("data");
        let as_pg = |prog: &Path| {
            let mut c = Command::new(prog);
            if let Some((uid, gid)) = ids {
                c.uid(uid).gid(gid);
            }
            c.current_dir(dir.path());
            c
        };
        let out = as_pg(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).expect("log file");
        if let Some((uid, gid)) = ids {
            let _ = Command::new("chown")
                .arg(format!("{uid}:{gid}"))
                .arg(dir.path().join("postgres.log"))
                .status();
        }
        let child = as_pg(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("port={port}")])
            .args([
                "-c",
                &format!("unix_socket_directories={}", dir.path().display()),
            ])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=16MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let mut pg = Pg {
            child,
            _dir: dir,
            port,
            bin,
        };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = pg.child.try_wait() {
                panic!("postgres exited ({status}):\n{}", pg.log());
            }
            let ready = Command::new(pg.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "postgres never became ready:\n{}",
                pg.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(pg)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The URL of database `db`, with a password (trust authentication
    /// ignores it; the tests check it is never printed).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:pw-{db}-secret@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// A new empty database of its own for one test; its name.
    pub fn new_db(&self, prefix: &str) -> String {
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            DBS.fetch_add(1, Ordering::Relaxed)
        );
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// Runs `sql` in `db` with psql; its output, unaligned, tuples only.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let psql = if self.bin.join("psql").exists() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(psql)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-d",
                db,
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Fast shutdown (SIGINT), then wait; SIGKILL if it lingers.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
