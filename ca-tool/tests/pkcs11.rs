//! `keyproof-ca` with its keys in a PKCS#11 token: real SoftHSM2 tokens,
//! the real binary. Each test makes its own SoftHSM2 configuration and
//! token directory and hands `SOFTHSM2_CONF` to the processes it starts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 configuration of its own, in a temporary directory.
struct Hsm {
    tmp: tempfile::TempDir,
    conf: PathBuf,
}

impl Hsm {
    fn new() -> Hsm {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} missing: install softhsm2 (test.sh does)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let tokens = tmp.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = tmp.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        Hsm { tmp, conf }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A new token with user PIN `pin`; returns the PIN file.
    fn token(&self, label: &str, pin: &str) -> PathBuf {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", "1234", "--pin", pin])
            .output()
            .expect("softhsm2-util");
        assert!(out.status.success(), "{out:?}");
        let pin_file = self.path(&format!("{label}.pin"));
        std::fs::write(&pin_file, format!("{pin}\n")).unwrap();
        pin_file
    }

    fn delete_token(&self, label: &str) {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--delete-token", "--token", label])
            .output()
            .expect("softhsm2-util");
        assert!(out.status.success(), "{out:?}");
    }

    /// Runs keyproof-ca with this configuration.
    fn ca(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_keyproof-ca"))
            .env("SOFTHSM2_CONF", &self.conf)
            .current_dir(self.tmp.path())
            .args(args)
            .output()
            .expect("run keyproof-ca")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ca(args);
        assert!(
            out.status.success(),
            "keyproof-ca {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command that must fail with exit 2; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.ca(args);
        assert_eq!(out.status.code(), Some(2), "keyproof-ca {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// Every `*.key` file under `dir`, however deep.
fn key_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(key_files(&p));
        } else if p.extension().is_some_and(|x| x == "key") {
            found.push(p);
        }
    }
    found
}

fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("ca.json")).unwrap()).unwrap()
}

fn label(state: &serde_json::Value, key: &str) -> String {
    state["keys"][key]["pkcs11"]["label"]
        .as_str()
        .unwrap_or_else(|| panic!("no token label for {key}: {state}"))
        .to_owned()
}

#[test]
fn a_ca_in_a_token_issues_and_rotates_without_a_key_file() {
    let hsm = Hsm::new();
    let pin = hsm.token("ca", "5678");
    let pin = pin.to_str().unwrap();
    let dir = hsm.path("ca");
    let d = dir.to_str().unwrap();
    let out = hsm.ok(&[
        "init",
        "--dir",
        d,
        "--trust-domain",
        "hsm.test",
        "--pkcs11-module",
        MODULE,
        "--pkcs11-token",
        "ca",
        "--pin-file",
        pin,
    ]);
    assert!(
        out.contains("root key: pkcs11:token=ca;object=keyproof-root-"),
        "{out}"
    );
    assert!(key_files(&dir).is_empty());
    let s = state(&dir);
    let (root, int) = (label(&s, "root"), label(&s, "intermediate"));
    assert!(root.starts_with("keyproof-root-"), "{root}");
    // The certificate carries the label's kid.
    let kid = root.trim_start_matches("keyproof-root-");
    let inspect = hsm.ok(&["inspect", dir.join("root.crt").to_str().unwrap()]);
    assert!(inspect.contains(kid), "{inspect}");

    hsm.ok(&[
        "issue",
        "--dir",
        d,
        "--spiffe-id",
        "spiffe://hsm.test/web",
        "--key-out",
        hsm.path("web.key").to_str().unwrap(),
        "--cert-out",
        hsm.path("web.crt").to_str().unwrap(),
    ]);
    let check = hsm.ok(&["check", "--dir", d]);
    assert!(
        check.contains(&format!(
            "ok   intermediate key: pkcs11:token=ca;object={int}"
        )),
        "{check}"
    );
    assert!(check.contains(": signs"), "{check}");

    hsm.ok(&["rotate", "intermediate", "--dir", d]);
    let int2 = label(&state(&dir), "intermediate");
    assert_ne!(int2, int);
    assert!(key_files(&dir).is_empty());

    hsm.ok(&["rotate", "root", "prepare", "--dir", d]);
    let s = state(&dir);
    assert_eq!(s["rotation"], "prepared");
    let (next_root, next_int) = (label(&s, "next_root"), label(&s, "next_intermediate"));
    assert_ne!(next_root, root);
    hsm.ok(&["rotate", "root", "activate", "--dir", d]);
    hsm.ok(&["rotate", "root", "finish", "--dir", d, "--force"]);
    let s = state(&dir);
    assert_eq!(label(&s, "root"), next_root);
    assert_eq!(label(&s, "intermediate"), next_int);
    assert!(s["keys"].get("next_root").is_none(), "{s}");
    assert!(key_files(&dir).is_empty());
    // The retired keys are left in the token and named in the archive.
    let notes: Vec<String> = std::fs::read_dir(dir.join("archive"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pkcs11.json"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    for retired in [&root, &int, &int2] {
        assert!(
            notes.iter().any(|n| n.contains(retired.as_str())),
            "{retired}: {notes:?}"
        );
    }
    hsm.ok(&[
        "issue",
        "--dir",
        d,
        "--spiffe-id",
        "spiffe://hsm.test/web",
        "--key-out",
        hsm.path("web2.key").to_str().unwrap(),
        "--cert-out",
        hsm.path("web2.crt").to_str().unwrap(),
    ]);
    let check = hsm.ok(&["check", "--dir", d]);
    assert!(check.contains(&next_int), "{check}");
}

#[test]
fn the_pin_file_can_be_given_again_and_a_wrong_pin_is_named() {
    let hsm = Hsm::new();
    let pin = hsm.token("ca", "5678");
    let dir = hsm.path("ca");
    let d = dir.to_str().unwrap();
    hsm.ok(&[
        "init",
        "--dir",
        d,
        "--trust-domain",
        "hsm.test",
        "--pkcs11-module",
        MODULE,
        "--pkcs11-token",
        "ca",
        "--pin-file",
        pin.to_str().unwrap(),
    ]);
    let wrong = hsm.path("wrong.pin");
    std::fs::write(&wrong, "0000\n").unwrap();
    let issue = |n: &str, extra: &[&str]| {
        let mut args = vec![
            "issue".to_owned(),
            "--dir".into(),
            d.into(),
            "--spiffe-id".into(),
            "spiffe://hsm.test/web".into(),
            "--key-out".into(),
            hsm.path(&format!("{n}.key")).to_str().unwrap().into(),
            "--cert-out".into(),
            hsm.path(&format!("{n}.crt")).to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let run = |args: Vec<String>| hsm.ca(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = run(issue("a", &["--pin-file", wrong.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("login refused"), "{err}");
    assert!(!err.contains("0000") && !err.contains("5678"), "{err}");
    // The recorded PIN file moved: the error names it; --pin-file finds it.
    let moved = hsm.path("moved.pin");
    std::fs::rename(&pin, &moved).unwrap();
    let out = run(issue("b", &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(pin.to_str().unwrap()), "{err}");
    let out = run(issue("c", &["--pin-file", moved.to_str().unwrap()]));
    assert!(out.status.success(), "{out:?}");
    let check = hsm.ca(&["check", "--dir", d]);
    assert_eq!(check.status.code(), Some(2), "{check:?}");
    let check = hsm.ok(&["check", "--dir", d, "--pin-file", moved.to_str().unwrap()]);
    assert!(check.contains("signs"), "{check}");
}

#[test]
fn a_root_in_its_own_token_is_needed_only_to_rotate() {
    let hsm = Hsm::new();
    let pin = hsm.token("ca", "5678");
    let root_pin = hsm.token("root", "8765");
    let dir = hsm.path("ca");
    let d = dir.to_str().unwrap();
    hsm.ok(&[
        "init",
        "--dir",
        d,
        "--trust-domain",
        "hsm.test",
        "--pkcs11-module",
        MODULE,
        "--pkcs11-token",
        "ca",
        "--pin-file",
        pin.to_str().unwrap(),
        "--root-pkcs11-token",
        "root",
        "--root-pin-file",
        root_pin.to_str().unwrap(),
    ]);
    let s = state(&dir);
    assert_eq!(s["keys"]["root"]["pkcs11"]["token_label"], "root");
    assert_eq!(s["keys"]["intermediate"]["pkcs11"]["token_label"], "ca");
    hsm.ok(&["rotate", "intermediate", "--dir", d]);
    // The root token leaves (kept in a safe): issuing and checking go on.
    hsm.delete_token("root");
    hsm.ok(&[
        "issue",
        "--dir",
        d,
        "--spiffe-id",
        "spiffe://hsm.test/web",
        "--key-out",
        hsm.path("web.key").to_str().unwrap(),
        "--cert-out",
        hsm.path("web.crt").to_str().unwrap(),
    ]);
    let check = hsm.ok(&["check", "--dir", d]);
    assert!(check.contains("not present here"), "{check}");
    let err = hsm.fails(&["rotate", "intermediate", "--dir", d]);
    assert!(
        err.contains("root key") && err.contains("\"root\""),
        "{err}"
    );
}

#[test]
fn the_token_flags_go_together() {
    let hsm = Hsm::new();
    let d = hsm.path("ca");
    let out = hsm.ca(&[
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--trust-domain",
        "hsm.test",
        "--pkcs11-module",
        MODULE,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pkcs11-token") && err.contains("--pin-file"),
        "{err}"
    );
    let out = hsm.ca(&[
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--trust-domain",
        "hsm.test",
        "--root-pkcs11-token",
        "root",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!d.exists());
}

/// `GET path` on the admin listener: (status, body).
fn admin_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// Kills the server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_is_unready_while_its_token_is_gone_and_recovers_without_a_restart() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let hsm = Hsm::new();
    let pin = hsm.token("ca", "5678");
    let dir = hsm.path("ca");
    let d = dir.to_str().unwrap();
    hsm.ok(&[
        "init",
        "--dir",
        d,
        "--trust-domain",
        "hsm.test",
        "--pkcs11-module",
        MODULE,
        "--pkcs11-token",
        "ca",
        "--pin-file",
        pin.to_str().unwrap(),
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyproof-ca"))
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env("RUST_LOG", "info")
        .args(["serve", "--dir", d, "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--log-format", "json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut lines = std::io::BufReader::new(stderr).lines();
    let admin = loop {
        let line = lines.next().expect("serve exited before serving").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(a) = v["fields"]["admin_listen"].as_str() {
            break a.to_owned();
        }
    };
    // Keep reading the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    assert_eq!(admin_get(&admin, "/ready").0, 200);
    let wait_for = |want: u16| {
        let start = Instant::now();
        loop {
            let (status, body) = admin_get(&admin, "/ready");
            if status == want {
                return body;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "/ready stayed {status}: {body}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    // The token goes away: the periodic probe notices.
    let tokens = hsm.path("tokens");
    let away = hsm.path("tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    std::fs::create_dir(&tokens).unwrap();
    let body = wait_for(503);
    assert!(body.contains("intermediate key"), "{body}");
    let (_, metrics) = admin_get(&admin, "/metrics");
    assert!(metrics.contains("keyproof_ca_ready 0"), "{metrics}");
    assert!(
        !metrics.contains("keyproof_ca_key_operations_total{result=\"failed\"} 0"),
        "{metrics}"
    );
    // Back: ready again, same process.
    std::fs::remove_dir(&tokens).unwrap();
    std::fs::rename(&away, &tokens).unwrap();
    wait_for(200);
    drop(server);
}
