//! "Pods" as Linux network namespaces, for the transparent-mesh tests: three
//! namespaces A, B and C attached to one bridge in a fourth ("node")
//! namespace, so they reach each other on 10.77.0.0/24 the way pods on one
//! node do, each with `lo` up and its own iptables tables. Needs root.
//!
//! Namespace names carry the test process's pid and a per-process counter
//! (`kp-<pid>-<n>-a`), so parallel tests and parallel test binaries never
//! share one. Everything is removed on drop, panics included: every process
//! still inside a namespace is killed (a postmaster's backends and anything
//! else that forked, not only our children), then the namespace is deleted.
//! Namespaces left by a test process that no longer exists (killed before
//! its drop ran) are swept by the next [`Pods::create`].
//!
//! Also here: running commands in a pod (as root or as an unprivileged uid),
//! nginx and PostgreSQL listening on a pod's address, and tcpdump on a pod's
//! interface.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The pods' subnet.
pub const SUBNET: &str = "10.77.0.0/24";
/// The uid and gid apps and clients run as in the tests (`nobody`): never
/// the proxy's, so `redirect` intercepts them.
pub const APP_UID: u32 = 65534;
/// The interface name inside every pod.
pub const POD_IF: &str = "eth0";
/// The PostgreSQL binaries (Debian's postgresql-15).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

const PREFIX: &str = "kp-";
const BRIDGE: &str = "br0";

/// True when the test runs as root, which namespaces need.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Whether a namespace test can run here: root, `ip` and the tools named.
/// Missing anything: `false` with a notice, or a panic when `CI` is set (CI
/// runs as root with `./test.sh`'s packages, so a skip there would hide a
/// failure).
pub fn can_run(tools: &[&str]) -> bool {
    let ci = std::env::var_os("CI").is_some();
    let mut missing: Vec<String> = Vec::new();
    if !is_root() {
        missing.push("root (network namespaces and iptables)".into());
    }
    for t in ["ip", "iptables"].iter().chain(tools) {
        if !crate::have(t) {
            missing.push((*t).to_owned());
        }
    }
    if missing.is_empty() {
        return true;
    }
    if ci {
        panic!(
            "needed when CI is set: {}; ./test.sh installs the tools and CI runs as root",
            missing.join(", ")
        );
    }
    eprintln!(
        "NOTICE: skipping a network-namespace test, missing: {}",
        missing.join(", ")
    );
    false
}

/// Runs `ip ARGS` and panics with its output if it fails.
fn ip(args: &[&str]) {
    crate::run_ok(Command::new("ip").args(args));
}

/// One pod: a network namespace with one interface on the bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The namespace name (for `ip netns exec`).
    pub ns: String,
    /// The pod's address on [`SUBNET`].
    pub ip: Ipv4Addr,
    /// Its interface inside the namespace ([`POD_IF`]).
    pub iface: &'static str,
}

impl Pod {
    /// `ip netns exec NS PROGRAM`: as root, inside the pod.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// `PROGRAM` inside the pod as uid/gid [`APP_UID`], no supplementary
    /// groups: an app the proxy's redirect rules apply to.
    pub fn cmd_app(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.cmd_as(APP_UID, APP_UID, program)
    }

    /// `PROGRAM` inside the pod as `uid`/`gid`, no supplementary groups.
    /// HOME is `/tmp` so clients (psql) find no root-only dotfiles.
    pub fn cmd_as(&self, uid: u32, gid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = self.cmd("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(program)
            .env("HOME", "/tmp")
            .current_dir("/");
        c
    }

    /// Runs a shell command line in the pod as root; must succeed; stdout.
    pub fn sh(&self, script: &str) -> String {
        crate::run_ok(self.cmd("sh").args(["-c", script]))
    }

    /// `iptables-save -t nat` without the comment and counter noise that
    /// differ between two dumps of the same rules: for before/after checks.
    pub fn nat_rules(&self) -> String {
        let out = crate::run_ok(self.cmd("iptables-save").args(["-t", "nat"]));
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                // `:CHAIN POLICY [packets:bytes]`: counters change with traffic.
                match l.strip_prefix(':').and_then(|r| r.rsplit_once(' ')) {
                    Some((head, _)) => format!(":{head}"),
                    None => l.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// True when a TCP SYN from this pod to `ip` (port 9, where nothing
    /// listens) is answered by a reset within a few tries: the address is
    /// reachable. (No ping: iputils-ping is not installed everywhere.)
    pub fn reaches(&self, ip: Ipv4Addr) -> bool {
        let probe = format!("exec 3<>/dev/tcp/{ip}/9");
        (0..20).any(|_| {
            let out = crate::run(self.cmd("timeout").args(["1", "bash", "-c", &probe]));
            let err = String::from_utf8_lossy(&out.stderr);
            let ok = out.status.success() || err.contains("refused");
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        })
    }

    /// `addr:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// Starts `cmd` (made with [`Pod::cmd`] or [`Pod::cmd_as`]) as a
    /// process killed on drop, stdout and stderr into `log`.
    pub fn spawn(&self, mut cmd: Command, log: &Path) -> PodProc {
        let f = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        PodProc {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Waits until something in the pod accepts TCP on `addr` (probed from
    /// inside the pod with bash's /dev/tcp, as root).
    pub fn wait_port(&self, addr: SocketAddr, timeout: Duration) -> bool {
        let start = Instant::now();
        let probe = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
        while start.elapsed() < timeout {
            let ok = self
                .cmd("timeout")
                .args(["2", "bash", "-c", &probe])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Opens a TCP connection to `addr` from inside this pod as the app uid
    /// with bash, sends `data`, and returns what came back before the peer
    /// closed or 3 s passed, and whether the connection was made.
    pub fn raw_tcp(&self, addr: SocketAddr, data: &str) -> (bool, String) {
        let script = format!(
            "exec 3<>/dev/tcp/{}/{} || exit 7; printf '%s' \"$1\" >&3; timeout 3 cat <&3",
            addr.ip(),
            addr.port()
        );
        let out = crate::run(self.cmd_app("bash").args(["-c", &script, "raw", data]));
        (
            out.status.code() != Some(7),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

/// A process inside a pod, killed (SIGKILL) and reaped on drop.
pub struct PodProc {
    child: Child,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl PodProc {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while it runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (e.g. `INT`) and waits up to `timeout` for the exit;
    /// false when it did not exit.
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for PodProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three pods on one bridge, torn down on drop.
pub struct Pods {
    /// The "node" namespace holding the bridge (no addresses, no rules).
    pub node: String,
    /// Pod A: the client side (curl, psql).
    pub a: Pod,
    /// Pod B: the server side (nginx, PostgreSQL).
    pub b: Pod,
    /// Pod C: a third pod that, in the tests, has no sidecar.
    pub c: Pod,
    /// Scratch space for configs, logs and captures.
    pub tmp: tempfile::TempDir,
}

/// The pid in a name made by this module (`kp-<pid>-...`).
fn owner_pid(ns: &str) -> Option<u32> {
    ns.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Names of all network namespaces (`ip netns list` prints `name (id: N)`).
pub fn list_namespaces() -> Vec<String> {
    let out = crate::run(Command::new("ip").args(["netns", "list"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The pids of the processes inside `ns`.
pub fn namespace_pids(ns: &str) -> Vec<u32> {
    let out = crate::run(Command::new("ip").args(["netns", "pids", ns]));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills everything in `ns` (a few passes: a dying postmaster may still
/// fork), then deletes it. Best effort: it runs in drop.
fn remove_namespace(ns: &str) {
    for _ in 0..20 {
        let pids = namespace_pids(ns);
        if pids.is_empty() {
            break;
        }
        for p in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Removes namespaces made by this module in test processes that are gone.
fn sweep_stale() {
    for ns in list_namespaces() {
        if let Some(pid) = owner_pid(&ns) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("removing stale namespace {ns} (process {pid} is gone)");
                remove_namespace(&ns);
            }
        }
    }
}

impl Pods {
    /// Creates the node namespace with a bridge and pods A (10.77.0.1),
    /// B (10.77.0.2) and C (10.77.0.3), each with a veth on the bridge and
    /// `lo` up; checks A reaches B and C.
    pub fn create() -> Pods {
        static N: AtomicU32 = AtomicU32::new(0);
        sweep_stale();
        let base = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let node = format!("{base}-node");
        let tmp = tempfile::Builder::new()
            .prefix("kp-pods")
            .tempdir()
            .expect("tempdir");
        // Apps in the pods run as other uids (postgres, nobody) and need to
        // reach their own subdirectories.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        // Built field by field so a failure half way still tears down what
        // exists: Drop deletes every name that starts with `base`.
        let mut pods = Pods {
            node: node.clone(),
            a: pod(&base, "a", 1),
            b: pod(&base, "b", 2),
            c: pod(&base, "c", 3),
            tmp,
        };
        ip(&["netns", "add", &node]);
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        ip(&["-n", &node, "link", "add", BRIDGE, "type", "bridge"]);
        ip(&["-n", &node, "link", "set", BRIDGE, "up"]);
        for p in [&mut pods.a, &mut pods.b, &mut pods.c] {
            ip(&["netns", "add", &p.ns]);
            ip(&["-n", &p.ns, "link", "set", "lo", "up"]);
            let host_if = format!("v{}", p.ns.rsplit('-').next().unwrap_or("x"));
            ip(&[
                "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", POD_IF,
                "netns", &p.ns,
            ]);
            ip(&["-n", &node, "link", "set", &host_if, "master", BRIDGE]);
            ip(&["-n", &node, "link", "set", &host_if, "up"]);
            ip(&[
                "-n",
                &p.ns,
                "addr",
                "add",
                &format!("{}/24", p.ip),
                "dev",
                POD_IF,
            ]);
            ip(&["-n", &p.ns, "link", "set", POD_IF, "up"]);
        }
        for to in [&pods.b, &pods.c] {
            assert!(
                pods.a.reaches(to.ip),
                "pod A cannot reach {} ({})",
                to.ns,
                to.ip
            );
        }
        pods
    }

    /// The namespace names, node first.
    pub fn names(&self) -> [&str; 4] {
        [&self.node, &self.a.ns, &self.b.ns, &self.c.ns]
    }

    /// A path in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

fn pod(base: &str, name: &str, host: u8) -> Pod {
    Pod {
        ns: format!("{base}-{name}"),
        ip: Ipv4Addr::new(10, 77, 0, host),
        iface: POD_IF,
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        for ns in self.names() {
            remove_namespace(ns);
        }
    }
}

/// nginx inside a pod on 0.0.0.0:PORT (every address of the pod, as an app
/// in a pod listens), answering every request with
/// `xfcc=<x-forwarded-client-cert>\nstepup=<x-keyproof-step-up>\n`.
/// Access-log lines: `$remote_addr $status $request_uri`.
pub struct PodNginx {
    proc: PodProc,
    dir: PathBuf,
    /// The port.
    pub port: u16,
}

impl PodNginx {
    /// Starts it in `pod` (as root, one process, like [`crate::nginx`]).
    pub fn start(pods: &Pods, pod: &Pod, port: u16) -> PodNginx {
        PodNginx::start_as(pods, pod, port, false)
    }

    /// As [`PodNginx::start`], speaking HTTP/2 without TLS (prior
    /// knowledge, as a gRPC server does) and nothing else.
    pub fn start_h2c(pods: &Pods, pod: &Pod, port: u16) -> PodNginx {
        PodNginx::start_as(pods, pod, port, true)
    }

    fn start_as(pods: &Pods, pod: &Pod, port: u16, h2c: bool) -> PodNginx {
        let dir = pods.path(&format!("nginx-{}-{port}", pod.ns));
        let http2 = if h2c { " http2" } else { "" };
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  log_format peers '$remote_addr $status $request_uri';\n  access_log {d}/access.log peers;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  default_type text/plain;\n\
               keepalive_requests 100000000;\n\
               server {{\n    listen 0.0.0.0:{port}{http2} backlog=4096;\n    server_name _;\n\
                 location / {{ return 200 \"xfcc=$http_x_forwarded_client_cert\\nxff=$http_x_forwarded_for\\nstepup=$http_x_keyproof_step_up\\n\"; }}\n  }}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut c = pod.cmd("nginx");
        c.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path);
        let mut proc = pod.spawn(c, &dir.join("stdout.log"));
        let start = Instant::now();
        while !pod.wait_port(pod.addr(port), Duration::from_millis(200)) {
            let err = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            assert!(proc.running(), "nginx in {} exited:\n{err}", pod.ns);
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nginx in {} never listened on {port}:\n{err}",
                pod.ns
            );
        }
        PodNginx { proc, dir, port }
    }

    /// The access log so far, one `remote_addr status request_uri` a line.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// nginx's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// PostgreSQL inside a pod: `initdb` into the scratch directory as the
/// `postgres` user, trust authentication for loopback and [`SUBNET`],
/// `listen_addresses = '*'`, the unix socket in its own directory; the
/// postmaster runs in the foreground as our child.
pub struct PodPostgres {
    proc: PodProc,
    /// The port.
    pub port: u16,
    dir: PathBuf,
}

/// uid and gid of a local user, from `id`.
pub fn user_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        crate::run_ok(Command::new("id").args([flag, user]))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("id {flag} {user}: {e}"))
    };
    (id("-u"), id("-g"))
}

impl PodPostgres {
    /// initdb and start on `port`; waits until it accepts queries.
    pub fn start(pods: &Pods, pod: &Pod, port: u16) -> PodPostgres {
        let (uid, gid) = user_ids("postgres");
        let dir = pods.path(&format!("pg-{}", pod.ns));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).expect("pg dir");
        crate::run_ok(Command::new("chown").arg(format!("{uid}:{gid}")).arg(&dir));
        crate::run_ok(
            pod.cmd_as(uid, gid, format!("{PG_BIN}/initdb"))
                .args(["-D"])
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
                .current_dir(&dir),
        );
        let conf = format!(
            "listen_addresses = '*'\nport = {port}\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nmax_connections = 100\nshared_buffers = 16MB\n",
            dir.display()
        );
        let mut pg_conf =
            std::fs::read_to_string(data.join("postgresql.conf")).expect("postgresql.conf");
        pg_conf.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), pg_conf).expect("write postgresql.conf");
        // initdb's -A trust covers local and 127.0.0.1; the pods' subnet
        // too (a direct connection arrives from the caller's pod address).
        let mut hba = std::fs::read_to_string(data.join("pg_hba.conf")).expect("pg_hba.conf");
        // Meshed callers come from the sidecar's app source, 127.0.0.6,
        // which the loopback line does not cover: an operator lists it, as
        // here, with whatever authentication it wants for them.
        hba.push_str(&format!(
            "host all all {SUBNET} trust\nhost all all 127.0.0.6/32 trust\n"
        ));
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let mut c = pod.cmd_as(uid, gid, format!("{PG_BIN}/postgres"));
        c.arg("-D").arg(&data).current_dir(&dir);
        let mut proc = pod.spawn(c, &dir.join("postgres.log"));
        let start = Instant::now();
        loop {
            assert!(
                proc.running(),
                "postgres in {} exited:\n{}",
                pod.ns,
                proc.log_text()
            );
            let ready = pod
                .cmd_as(uid, gid, format!("{PG_BIN}/pg_isready"))
                .arg("-h")
                .arg(&dir)
                .args(["-p", &port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "postgres in {} never became ready:\n{}",
                pod.ns,
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PodPostgres { proc, port, dir }
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// The directory holding the unix socket (for local `psql -h DIR`).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PodPostgres {
    fn drop(&mut self) {
        // Immediate shutdown: the postmaster takes its backends with it (a
        // SIGKILL would leave them; the namespace sweep would still get them).
        self.proc.signal_and_wait("QUIT", Duration::from_secs(5));
    }
}

/// `psql` from `pod` as the app uid: `-tA -c SQL` against `addr`, user
/// `postgres`, 10 s connect timeout. Returns the output (trimmed stdout on
/// success) or the error text.
pub fn psql(pod: &Pod, addr: SocketAddr, sql: &str) -> Result<String, String> {
    let out = crate::run(
        pod.cmd_app("psql")
            .args(["-X", "-tA", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(addr.ip().to_string())
            .args(["-p", &addr.port().to_string(), "-U", "postgres", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGSSLMODE", "disable"),
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

/// Removes the proxy variables curl and other clients obey: the clients
/// in the pods are unmodified apps (an explicit `-x` still works).
pub fn without_proxy_env(c: &mut Command) -> &mut Command {
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        c.env_remove(v);
    }
    c
}

/// curl from `pod` as the app uid (an unmodified client: no proxy settings):
/// (HTTP status, body, curl exit code); status 0 when no response arrived.
pub fn curl(pod: &Pod, args: &[&str]) -> (u16, String, i32) {
    let out = crate::run(
        without_proxy_env(&mut pod.cmd_app("curl"))
            .args(["-sS", "--max-time", "10"])
            .args(["-o", "-", "-w", "\n%{http_code}"])
            .args(args),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        body.to_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// tcpdump on a pod's interface writing a pcap (`-U`: each packet flushed
/// as it is captured).
pub struct Capture {
    proc: PodProc,
    /// The pcap file.
    pub file: PathBuf,
}

impl Capture {
    /// Starts capturing TCP on `pod`'s interface; returns once tcpdump says
    /// it is listening.
    pub fn start(pods: &Pods, pod: &Pod, name: &str) -> Capture {
        let file = pods.path(&format!("{name}.pcap"));
        let mut c = pod.cmd("tcpdump");
        // -Z root: Debian's tcpdump otherwise drops to its own user, which
        // cannot write into the root-owned scratch directory.
        // --immediate-mode: with the default TPACKET_V3 buffering, packets
        // of a short exchange may sit in a block that is never handed over
        // before SIGINT (seen: "4 received by filter, 0 captured").
        c.args(["-i", pod.iface, "-n", "-U", "--immediate-mode", "-s", "0"])
            .args(["-Z", "root", "-w"])
            .arg(&file)
            .arg("tcp");
        let mut proc = pod.spawn(c, &pods.path(&format!("{name}.tcpdump.log")));
        let start = Instant::now();
        while !proc.log_text().contains("listening on") {
            assert!(proc.running(), "tcpdump exited:\n{}", proc.log_text());
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "tcpdump never started:\n{}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Capture { proc, file }
    }

    /// Stops the capture (SIGINT, so the file is complete) and returns the
    /// packets as `tcpdump -r FILE -A -n` prints them: headers and payloads
    /// as text.
    pub fn stop(mut self) -> String {
        // Let the last packets of the exchange that just ended arrive.
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            self.proc.signal_and_wait("INT", Duration::from_secs(5)),
            "tcpdump did not stop"
        );
        let out = crate::run(
            Command::new("tcpdump")
                .args(["-r"])
                .arg(&self.file)
                .args(["-A", "-n"]),
        );
        assert!(
            out.status.success(),
            "tcpdump -r failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A `keyproof-proxy run` inside a pod (as root), its admin API reached
/// from inside the pod with curl.
pub struct Sidecar {
    proc: PodProc,
    pod: Pod,
    admin_port: u16,
}

impl Sidecar {
    /// Writes `config` to the scratch directory and starts the proxy in
    /// `pod`; waits (up to 20 s) for `/ready` on `admin_port`.
    pub fn start(pods: &Pods, pod: &Pod, name: &str, config: &str, admin_port: u16) -> Sidecar {
        let cfg = pods.path(&format!("{name}.toml"));
        std::fs::write(&cfg, config).expect("write sidecar config");
        let mut c = pod.cmd(crate::bin("keyproof-proxy"));
        c.arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info");
        let proc = pod.spawn(c, &pods.path(&format!("{name}.log")));
        let mut s = Sidecar {
            proc,
            pod: pod.clone(),
            admin_port,
        };
        let start = Instant::now();
        loop {
            assert!(s.proc.running(), "sidecar {name} exited:\n{}", s.log_text());
            if s.admin("/ready").0 == 200 {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "sidecar {name} never became ready:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET `path` on the admin listener from inside the pod as root (root
    /// and loopback are never redirected): (status, body).
    pub fn admin(&self, path: &str) -> (u16, String) {
        let out = crate::run(
            self.pod
                .cmd("curl")
                .args(["-sS", "--noproxy", "*", "--max-time", "5", "-o", "-"])
                .args(["-w", "\n%{http_code}"])
                .arg(format!("http://127.0.0.1:{}{path}", self.admin_port)),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// The sum of the samples of metric `name` whose labels include every
    /// pair of `labels`; 0 when there is none.
    pub fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        crate::proxy_support::sum_samples(&self.admin("/metrics").1, name, labels)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// The proxy's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// The packets that went through the nat REDIRECT rules to `port` in
/// `pod` (the sum of their counters in `iptables-save -c -t nat`): since
/// nat sees only the first packet of a connection, the number of
/// connections redirected there.
pub fn redirected_connections(pod: &Pod, port: u16) -> u64 {
    let out = crate::run_ok(pod.cmd("iptables-save").args(["-c", "-t", "nat"]));
    let target = format!("-j REDIRECT --to-ports {port}");
    out.lines()
        .filter(|l| l.trim_end().ends_with(&target))
        .filter_map(|l| {
            let counters = l.strip_prefix('[')?.split(']').next()?;
            counters.split(':').next()?.parse::<u64>().ok()
        })
        .sum()
}
