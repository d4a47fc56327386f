//! A throwaway PostgreSQL cluster on loopback for the store's tests:
//! `initdb` into a temporary directory and `postgres` in the foreground,
//! both as the `postgres` user when the tests run as root (PostgreSQL
//! refuses to run as root), trust authentication, a free port, TLS with a
//! certificate for `localhost` from a CA of its own ([`Pg::tls_root`]);
//! the role `tlsonly` may connect only over TLS, the role `pwuser` only
//! with its password ([`PWUSER_PASSWORD`]). Tests share
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
    child: Option<Child>,
    /// Removed on drop (after the server stopped).
    _dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    /// The postmaster's arguments, for [`Pg::restart`].
    args: Vec<String>,
    /// uid/gid the server runs as (None: as ourselves).
    ids: Option<(u32, u32)>,
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

/// The password of the role `pwuser`, which authenticates with
/// scram-sha-256 (every other role is trusted).
pub const PWUSER_PASSWORD: &str = "right-secret";

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
        // TLS: a CA of our own, a server certificate for localhost only.
        let (cert_pem, key_pem, ca_pem) = tls_material();
        let chown = |path: &Path| {
            if let Some((uid, gid)) = ids {
                let _ = Command::new("chown")
                    .arg(format!("{uid}:{gid}"))
                    .arg(path)
                    .status();
            }
        };
        std::fs::write(dir.path().join("server.crt"), cert_pem).expect("server.crt");
        let key_path = dir.path().join("server.key");
        std::fs::write(&key_path, key_pem).expect("server.key");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod server.key");
        }
        chown(&dir.path().join("server.crt"));
        chown(&key_path);
        std::fs::write(dir.path().join("root.pem"), ca_pem).expect("root.pem");
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        std::fs::write(
            &hba,
            format!(
                "hostnossl all tlsonly 0.0.0.0/0 reject\nhostnossl all tlsonly ::/0 reject\n\
                 host all pwuser 0.0.0.0/0 scram-sha-256\n{rules}"
            ),
        )
        .expect("write pg_hba.conf");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).expect("log file");
        if let Some((uid, gid)) = ids {
            let _ = Command::new("chown")
                .arg(format!("{uid}:{gid}"))
                .arg(dir.path().join("postgres.log"))
                .status();
        }
        let d = dir.path();
        let args: Vec<String> = [
            "-D".to_owned(),
            data.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            format!("port={port}"),
            "-c".into(),
            format!("unix_socket_directories={}", d.display()),
            "-c".into(),
            "fsync=off".into(),
            "-c".into(),
            "synchronous_commit=off".into(),
            "-c".into(),
            "max_connections=200".into(),
            "-c".into(),
            "shared_buffers=16MB".into(),
            "-c".into(),
            "ssl=on".into(),
            "-c".into(),
            format!("ssl_cert_file={}", d.join("server.crt").display()),
            "-c".into(),
            format!("ssl_key_file={}", d.join("server.key").display()),
        ]
        .into();
        drop(log);
        let mut pg = Pg {
            child: None,
            _dir: dir,
            port,
            bin,
            args,
            ids,
        };
        pg.restart();
        pg.sql("postgres", "CREATE ROLE tlsonly LOGIN SUPERUSER");
        pg.sql(
            "postgres",
            &format!("CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD '{PWUSER_PASSWORD}'"),
        );
        Some(pg)
    }

    /// A cluster of this test's own (not shared), to stop and restart.
    pub fn private() -> Option<Pg> {
        Pg::start()
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "postgres is running");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self._dir.path().join("postgres.log"))
            .expect("log file");
        let mut c = Command::new(self.bin.join("postgres"));
        if let Some((uid, gid)) = self.ids {
            c.uid(uid).gid(gid);
        }
        let child = c
            .args(&self.args)
            .current_dir(self._dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("postgres exited ({status}):\n{}", self.log());
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "postgres never became ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (fast shutdown: clients are disconnected).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The CA certificate (PEM) that signs the server's certificate, for
    /// `sslrootcert`.
    pub fn tls_root(&self) -> PathBuf {
        self._dir.path().join("root.pem")
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
        self.stop();
    }
}

/// (server certificate, its key, the CA certificate), PEM: the server's
/// certificate names `localhost` only, so `verify-full` to 127.0.0.1 fails.
fn tls_material() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "keyproof test database CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().expect("key");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf_cert = leaf
        .signed_by(&leaf_key, &issuer)
        .expect("server certificate");
    (leaf_cert.pem(), leaf_key.serialize_pem(), ca_cert.pem())
}
