//! Support for keyproof's end-to-end tests: locating the real binaries,
//! throwaway CA directories, free loopback ports, and running commands with
//! clear failure messages.
//!
//! The binaries are built by `cargo test --workspace` (every workspace
//! member's binaries are compiled before any test runs); `KEYPROOF_BIN_DIR`
//! overrides where they are looked up.

pub mod asking_app;
pub mod ca_server;
pub mod k8s;
pub mod kube_api;
pub mod load;
pub mod netns;
pub mod nginx;
pub mod postgres;
pub mod proxy_support;
pub mod softhsm;
pub mod stepup_caller;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Directory holding the built binaries (`target/debug` for `cargo test`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KEYPROOF_BIN_DIR") {
        return PathBuf::from(d);
    }
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Path of a workspace binary, e.g. `bin("keyproof-ca")`.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo test --workspace` (or `cargo build --workspace`) so the binaries are built",
        p.display()
    );
    p
}

/// A `Command` for a workspace binary.
pub fn cmd(name: &str) -> Command {
    Command::new(bin(name))
}

/// Runs a command and returns its output, panicking with both streams if it
/// could not be started.
pub fn run(c: &mut Command) -> Output {
    c.output()
        .unwrap_or_else(|e| panic!("could not run {c:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(c: &mut Command) -> String {
    let out = run(c);
    assert!(
        out.status.success(),
        "{c:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns stderr.
pub fn run_err(c: &mut Command) -> String {
    let out = run(c);
    assert!(
        !out.status.success(),
        "{c:?} unexpectedly succeeded\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A free TCP port on 127.0.0.1 (bound and released). The kernel may hand a
/// released port out again at once, so a test that asks for several ports
/// before binding any could get one twice; this never returns a port it has
/// returned before in this process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listening on {addr} after {timeout:?}");
}

/// True when an external tool is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A throwaway trust domain made with the real `keyproof-ca` binary.
pub struct TestCa {
    /// Keeps the temporary directory alive.
    pub tmp: tempfile::TempDir,
    /// The CA directory.
    pub dir: PathBuf,
    /// The trust domain name.
    pub trust_domain: String,
}

impl TestCa {
    /// `keyproof-ca init` into a fresh temp dir.
    pub fn new(trust_domain: &str) -> TestCa {
        Self::with_args(trust_domain, &[])
    }

    /// `keyproof-ca init` with extra arguments (e.g. `--key-type ed25519`).
    pub fn with_args(trust_domain: &str, extra: &[&str]) -> TestCa {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("ca");
        run_ok(
            cmd("keyproof-ca")
                .arg("init")
                .arg("--dir")
                .arg(&dir)
                .args(["--trust-domain", trust_domain])
                .args(extra),
        );
        TestCa {
            tmp,
            dir,
            trust_domain: trust_domain.to_owned(),
        }
    }

    /// `bundle.pem` of this CA.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    /// Issues an SVID for `path` (e.g. `/ns/default/sa/web`) with a
    /// CA-generated key; returns (cert chain path, key path).
    pub fn issue(&self, name: &str, path: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
        let cert = self.tmp.path().join(format!("{name}.crt"));
        let key = self.tmp.path().join(format!("{name}.key"));
        run_ok(
            cmd("keyproof-ca")
                .arg("issue")
                .arg("--dir")
                .arg(&self.dir)
                .args([
                    "--spiffe-id",
                    &format!("spiffe://{}{path}", self.trust_domain),
                ])
                .arg("--key-out")
                .arg(&key)
                .arg("--cert-out")
                .arg(&cert)
                .args(extra),
        );
        (cert, key)
    }

    /// A path inside the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// Lists a directory's entries (sorted), for "nothing was written" checks.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub mod prometheus;
