//! `keyproof-proxy redirect` against the real kernel: each test works in
//! network namespaces of its own (`ip netns add kp-redir-<pid>-<n>`, deleted
//! when the test ends, also on panic), installs the rules with the real
//! binary and checks what `iptables-save` shows and where real TCP
//! connections land.
//!
//! Needs root, `ip`, `iptables`, `setpriv`, `bash`, `timeout` and `python3`
//! (the listeners). Without them the test prints a notice and passes;
//! when `CI` is set it fails instead.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use keyproof_tests::{bin, have, run, run_err, run_ok};

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "0" && v != "false")
        .unwrap_or(false)
}

/// True when this test can run: root and every tool present. Otherwise a
/// failure in CI, a notice locally.
fn can_run() -> bool {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut missing: Vec<&str> = Vec::new();
    if uid != "0" {
        missing.push("root");
    }
    for tool in [
        "ip",
        "iptables",
        "iptables-save",
        "iptables-restore",
        "setpriv",
        "bash",
        "timeout",
        "python3",
    ] {
        if !have(tool) {
            missing.push(tool);
        }
    }
    if missing.is_empty() {
        return true;
    }
    if in_ci() {
        panic!("redirect tests need {missing:?} when CI is set; ./test.sh installs the tools and CI runs as root");
    }
    eprintln!("NOTICE: redirect tests skipped: missing {missing:?} (they need root and ./test.sh's tools)");
    false
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let name = format!(
            "kp-redir-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command run inside the namespace.
    fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(argv);
        c
    }

    fn exec_ok(&self, argv: &[&str]) -> String {
        run_ok(&mut self.cmd(argv))
    }

    /// `keyproof-proxy redirect ARGS` inside the namespace.
    fn redirect(&self, args: &[&str]) -> Command {
        let mut c = self.cmd(&[proxy().to_str().expect("utf-8 path"), "redirect"]);
        c.args(args);
        c
    }

    /// `iptables-save -t nat` without the comment lines (they carry the
    /// time) and with packet counters zeroed.
    fn nat(&self) -> String {
        normalize(&self.exec_ok(&["iptables-save", "-t", "nat"]))
    }

    /// The same for ip6tables' `filter` table, where IPv6 is refused.
    fn filter6(&self) -> String {
        normalize(&self.exec_ok(&["ip6tables-save", "-t", "filter"]))
    }

    /// Connects as `uid` to `addr` and returns the first line the other
    /// end sends (empty when the connection fails or stays silent).
    fn connect_as(&self, uid: u32, ip: &str, port: u16) -> String {
        let uid = uid.to_string();
        let script = format!("exec 3<>/dev/tcp/{ip}/{port} && head -n1 <&3");
        let out = run(&mut self.cmd(&[
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
            "timeout",
            "5",
            "bash",
            "-c",
            &script,
        ]));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// TCP listeners in the namespace, each answering every connection
    /// with `TAG <original destination>` and closing it.
    fn listeners(&self, specs: &[(&str, u16, &str)]) -> Listeners {
        let mut argv = vec!["python3", "-u", "-c", LISTENER];
        let specs: Vec<String> = specs
            .iter()
            .map(|(ip, port, tag)| format!("{ip}:{port}={tag}"))
            .collect();
        argv.extend(specs.iter().map(String::as_str));
        let mut child = self
            .cmd(&argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the python3 listeners");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listeners' first line");
        let l = Listeners(child);
        assert_eq!(line.trim(), "ready", "listeners did not start");
        l
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside would keep nothing alive (the name is
        // only a bind mount), so deleting is enough.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The listener processes, killed on drop.
struct Listeners(Child);

impl Drop for Listeners {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One thread per `IP:PORT=TAG` argument; the original destination is
/// SO_ORIGINAL_DST (80), where conntrack says the client was going, or the
/// local address where conntrack keeps no record.
const LISTENER: &str = r#"
import socket, struct, sys, threading
def serve(s, tag):
    while True:
        c, _ = s.accept()
        try:
            raw = c.getsockopt(socket.SOL_IP, 80, 16)
            port, ip = struct.unpack("!2xH4s8x", raw)
            dst = "%s:%d" % (socket.inet_ntoa(ip), port)
        except OSError:
            # No conntrack in this namespace (no nat rules): not redirected.
            dst = "%s:%d" % c.getsockname()
        c.sendall(("%s %s\n" % (tag, dst)).encode())
        c.close()
socks = []
for spec in sys.argv[1:]:
    addr, tag = spec.split("=")
    ip, port = addr.rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, int(port)))
    s.listen(16)
    socks.append((s, tag))
for s, tag in socks:
    threading.Thread(target=serve, args=(s, tag), daemon=True).start()
print("ready")
threading.Event().wait()
"#;

fn proxy() -> PathBuf {
    bin("keyproof-proxy")
}

fn normalize(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const PROXY_UID: u32 = 2102;
const APP_UID: u32 = 65534;

#[test]
fn installing_twice_leaves_one_copy_and_remove_restores_the_table() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    // Someone else's rules, which must survive both install and remove.
    ns.exec_ok(&["iptables", "-t", "nat", "-N", "OTHER"]);
    ns.exec_ok(&["iptables", "-t", "nat", "-A", "OTHER", "-j", "RETURN"]);
    ns.exec_ok(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.0/24",
        "-j",
        "OTHER",
    ]);
    ns.exec_ok(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "udp",
        "-j",
        "RETURN",
    ]);
    ns.exec_ok(&["ip6tables", "-A", "INPUT", "-p", "udp", "-j", "ACCEPT"]);
    let before = ns.nat();
    let before6 = ns.filter6();

    // --dry-run prints the rules and changes nothing.
    let dry = run_ok(&mut ns.redirect(&["--dry-run", "--exclude-outbound-ports", "53"]));
    assert!(
        dry.contains("-A KEYPROOF_OUTPUT -p tcp --dport 53 -j RETURN\n")
            && dry.contains("-A KEYPROOF_OUTPUT -p tcp -j REDIRECT --to-ports 15001\n"),
        "{dry}"
    );
    assert!(
        dry.contains("# ip6tables-restore")
            && dry.contains("-A KEYPROOF_OUTPUT -p tcp --syn -j REJECT --reject-with tcp-reset\n"),
        "{dry}"
    );
    assert_eq!(ns.nat(), before, "--dry-run changed the table");
    assert_eq!(ns.filter6(), before6, "--dry-run changed the IPv6 table");

    let first = run_ok(&mut ns.redirect(&[]));
    assert!(first.contains("installed"), "{first}");
    let once = ns.nat();
    let second = run_ok(&mut ns.redirect(&[]));
    assert!(second.contains("replaced"), "{second}");
    let twice = ns.nat();
    assert_eq!(once, twice, "a second install changed the table");
    // IPv6: refused, one copy of each jump, first in its chain.
    let six = ns.filter6();
    for line in [
        "-A INPUT -p tcp -j KEYPROOF_INBOUND",
        "-A OUTPUT -p tcp -j KEYPROOF_OUTPUT",
        "-A KEYPROOF_INBOUND -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j REJECT --reject-with tcp-reset",
    ] {
        let n = six.lines().filter(|l| *l == line).count();
        assert_eq!(n, 1, "{line} appears {n} times:\n{six}");
    }
    assert_eq!(
        six.lines().find(|l| l.starts_with("-A INPUT")),
        Some("-A INPUT -p tcp -j KEYPROOF_INBOUND"),
        "{six}"
    );
    for line in [
        ":KEYPROOF_INBOUND - [0:0]",
        ":KEYPROOF_OUTPUT - [0:0]",
        "-A PREROUTING -p tcp -j KEYPROOF_INBOUND",
        "-A OUTPUT -p tcp -j KEYPROOF_OUTPUT",
        "-A KEYPROOF_INBOUND -p tcp -j REDIRECT --to-ports 15443",
        "-A KEYPROOF_OUTPUT -m owner --uid-owner 2102 -j RETURN",
        "-A KEYPROOF_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        let n = twice.lines().filter(|l| *l == line).count();
        assert_eq!(n, 1, "{line} appears {n} times:\n{twice}");
    }
    // Our jumps come first: no earlier rule of someone else's can skip them.
    let first_output = twice.lines().find(|l| l.starts_with("-A OUTPUT")).unwrap();
    assert_eq!(first_output, "-A OUTPUT -p tcp -j KEYPROOF_OUTPUT");
    assert!(
        twice.contains("-A OUTPUT -d 192.0.2.0/24 -j OTHER"),
        "{twice}"
    );

    // Other options replace the set: still one copy, the new ports.
    run_ok(&mut ns.redirect(&["--inbound-ports", "8080,5432", "--outbound-port", "16001"]));
    let changed = ns.nat();
    assert_eq!(
        changed.matches("-j KEYPROOF_INBOUND").count(),
        1,
        "{changed}"
    );
    assert!(
        changed.contains("--dport 5432 -j REDIRECT --to-ports 15443")
            && changed.contains("-A KEYPROOF_OUTPUT -p tcp -j REDIRECT --to-ports 16001")
            && !changed.contains("--to-ports 15001"),
        "{changed}"
    );

    let removed = run_ok(&mut ns.redirect(&["--remove"]));
    assert!(removed.contains("removed"), "{removed}");
    assert_eq!(ns.nat(), before, "--remove did not restore the table");
    assert_eq!(
        ns.filter6(),
        before6,
        "--remove did not restore the IPv6 table"
    );
    let again = run_ok(&mut ns.redirect(&["--remove"]));
    assert!(again.contains("nothing to remove"), "{again}");
    assert_eq!(ns.nat(), before);
}

/// Runs at once in one namespace (an init container restarted beside a
/// run still going, an operator's re-run) take turns: each succeeds, and
/// both address families end with the options of one run, never IPv4's of
/// one and IPv6's of another.
#[test]
fn runs_at_once_take_turns_and_leave_one_consistent_set() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    for round in 0..3 {
        let ports: Vec<String> = (0..6)
            .map(|i| (1000 + round * 10 + i).to_string())
            .collect();
        let runs: Vec<_> = ports
            .iter()
            .map(|p| {
                ns.redirect(&["--exclude-outbound-ports", p])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn redirect")
            })
            .collect();
        for r in runs {
            let out = r.wait_with_output().expect("redirect ran");
            assert!(
                out.status.success(),
                "a run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (four, six) = (ns.nat(), ns.filter6());
        let excluded = |rules: &str| -> Vec<String> {
            ports
                .iter()
                .filter(|p| rules.contains(&format!("--dport {p} -j RETURN")))
                .cloned()
                .collect()
        };
        let (e4, e6) = (excluded(&four), excluded(&six));
        assert_eq!(e4.len(), 1, "IPv4 excludes {e4:?}:\n{four}");
        assert_eq!(e4, e6, "IPv4 and IPv6 from different runs:\n{four}\n{six}");
        assert_eq!(four.matches("-j KEYPROOF_OUTPUT").count(), 1, "{four}");
    }
    run_ok(&mut ns.redirect(&["--remove"]));
}

#[test]
fn app_connections_are_redirected_and_the_proxys_are_not() {
    if !can_run() {
        return;
    }
    // The pod, and a peer on the other end of a veth pair.
    let pod = Netns::new();
    let peer = Netns::new();
    pod.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
    ]);
    for (ns, ip) in [(&pod, "10.250.0.1/24"), (&peer, "10.250.0.2/24")] {
        ns.exec_ok(&["ip", "addr", "add", ip, "dev", "eth0"]);
        ns.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    }
    let _pod_listeners = pod.listeners(&[
        ("127.0.0.1", 15001, "OUTBOUND"),
        ("0.0.0.0", 15443, "INBOUND"),
        ("0.0.0.0", 15090, "ADMIN"),
        ("0.0.0.0", 8080, "APP"),
    ]);
    let _peer_listeners = peer.listeners(&[("0.0.0.0", 80, "PEER")]);

    // IPv6 is refused, not intercepted: said when the pod has a global
    // address a dual-stack cluster would route over.
    pod.exec_ok(&[
        "ip",
        "addr",
        "add",
        "fd00:250::1/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let out = run(&mut pod.redirect(&["--proxy-uid", "4242"]));
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && warning.contains("is refused, not meshed")
            && warning.contains("fd00:250::1%eth0"),
        "{warning}"
    );
    pod.exec_ok(&["ip", "addr", "del", "fd00:250::1/64", "dev", "eth0"]);
    run_ok(&mut pod.redirect(&["--remove"]));

    // Without rules everything goes where it was sent.
    assert_eq!(
        pod.connect_as(APP_UID, "10.250.0.2", 80),
        "PEER 10.250.0.2:80"
    );

    run_ok(&mut pod.redirect(&["--proxy-uid", &PROXY_UID.to_string()]));

    // The app's connection lands on the outbound listener, which can read
    // where it was going.
    assert_eq!(
        pod.connect_as(APP_UID, "10.250.0.2", 80),
        "OUTBOUND 10.250.0.2:80"
    );
    // The proxy's own connection leaves as it is: no loop.
    assert_eq!(
        pod.connect_as(PROXY_UID, "10.250.0.2", 80),
        "PEER 10.250.0.2:80"
    );
    // Loopback and the pod's own address are left alone.
    assert_eq!(
        pod.connect_as(APP_UID, "127.0.0.1", 8080),
        "APP 127.0.0.1:8080"
    );
    assert_eq!(
        pod.connect_as(APP_UID, "10.250.0.1", 8080),
        "APP 10.250.0.1:8080"
    );

    // Inbound: a peer's connection to the app's port lands on the inbound
    // listener, with the original port; the admin and inbound ports are
    // reached directly.
    assert_eq!(
        peer.connect_as(APP_UID, "10.250.0.1", 8080),
        "INBOUND 10.250.0.1:8080"
    );
    assert_eq!(
        peer.connect_as(APP_UID, "10.250.0.1", 15090),
        "ADMIN 10.250.0.1:15090"
    );
    assert_eq!(
        peer.connect_as(APP_UID, "10.250.0.1", 15443),
        "INBOUND 10.250.0.1:15443"
    );

    // Exclusions: the peer's network outbound, port 8080 inbound.
    run_ok(&mut pod.redirect(&[
        "--exclude-cidrs",
        "10.250.0.0/30",
        "--exclude-inbound-ports",
        "8080",
    ]));
    assert_eq!(
        pod.connect_as(APP_UID, "10.250.0.2", 80),
        "PEER 10.250.0.2:80"
    );
    assert_eq!(
        peer.connect_as(APP_UID, "10.250.0.1", 8080),
        "APP 10.250.0.1:8080"
    );
    // Excluded outbound port.
    run_ok(&mut pod.redirect(&["--exclude-outbound-ports", "80"]));
    assert_eq!(
        pod.connect_as(APP_UID, "10.250.0.2", 80),
        "PEER 10.250.0.2:80"
    );
    // An inbound port list: only the listed port is intercepted.
    run_ok(&mut pod.redirect(&["--inbound-ports", "9999"]));
    assert_eq!(
        peer.connect_as(APP_UID, "10.250.0.1", 8080),
        "APP 10.250.0.1:8080"
    );
    assert_eq!(
        pod.connect_as(APP_UID, "10.250.0.2", 80),
        "OUTBOUND 10.250.0.2:80"
    );

    run_ok(&mut pod.redirect(&["--remove"]));
    assert_eq!(
        pod.connect_as(APP_UID, "10.250.0.2", 80),
        "PEER 10.250.0.2:80"
    );
    assert_eq!(
        peer.connect_as(APP_UID, "10.250.0.1", 8080),
        "APP 10.250.0.1:8080"
    );
}

#[test]
fn bad_flags_and_missing_rights_give_clear_errors() {
    // Flag errors need no privilege and touch nothing.
    for (args, want) in [
        (
            &["--exclude-cidrs", "10.0.0.0/33"][..],
            "invalid CIDR \"10.0.0.0/33\"",
        ),
        (&["--exclude-cidrs", "fd00::/8"], "is IPv6"),
        (&["--exclude-cidrs", "10.0.0.1/8"], "has host bits set"),
        (
            &["--proxy-uid", "4294967295"],
            "not a uid a process can run as",
        ),
        (
            &["--exclude-outbound-ports", "53,http"],
            "--exclude-outbound-ports: invalid port \"http\": expected a number from 1 to 65535",
        ),
        (&["--inbound-ports", "70000"], "invalid port \"70000\""),
        (&["--inbound-ports", ""], "--inbound-ports: empty list"),
        (
            &["--admin-port", "15443"],
            "--inbound-port and --admin-port are both 15443",
        ),
        (&["--proxy-uid", "root"], "--proxy-uid"),
    ] {
        let mut c = Command::new(proxy());
        c.arg("redirect").args(args).arg("--dry-run");
        let err = run_err(&mut c);
        assert!(err.contains(want), "{args:?}: {err}");
    }

    if !can_run() {
        return;
    }
    let ns = Netns::new();
    let before = ns.nat();
    // Without CAP_NET_ADMIN: refused, and says what it needs.
    let uid = APP_UID.to_string();
    let p = proxy();
    let err = run_err(&mut ns.cmd(&[
        "setpriv",
        "--reuid",
        &uid,
        "--regid",
        &uid,
        "--clear-groups",
        p.to_str().unwrap(),
        "redirect",
    ]));
    assert!(
        err.contains("not permitted") && err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
    // Root without CAP_NET_ADMIN (what an init container without the
    // capability gets): refused the same way.
    let err = run_err(&mut ns.cmd(&[
        "setpriv",
        "--bounding-set",
        "-all,+net_raw",
        "--inh-caps",
        "-all",
        p.to_str().unwrap(),
        "redirect",
    ]));
    assert!(
        err.contains("not permitted") && err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
    // CAP_NET_ADMIN alone suffices with the nf_tables backend (the legacy
    // one also needs CAP_NET_RAW).
    if run_ok(&mut ns.cmd(&["iptables", "-V"])).contains("nf_tables") {
        let out = run_ok(&mut ns.cmd(&[
            "setpriv",
            "--bounding-set",
            "-all,+net_admin",
            "--inh-caps",
            "-all",
            p.to_str().unwrap(),
            "redirect",
        ]));
        assert!(out.contains("installed"), "{out}");
        run_ok(&mut ns.redirect(&["--remove"]));
    }
    // Without iptables: named.
    let err = run_err(&mut ns.cmd(&["env", "PATH=/nonexistent", p.to_str().unwrap(), "redirect"]));
    assert!(err.contains("iptables not found"), "{err}");
    assert_eq!(ns.nat(), before);
}
