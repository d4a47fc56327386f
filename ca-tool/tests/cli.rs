//! The `keyproof-ca` command line, run as a process.
//!
//! Besides what it checks, this file makes `cargo test --workspace` build the
//! `keyproof-ca` binary (cargo builds a package's binaries for its own
//! integration tests), which the end-to-end suites in `tests/` start.

use std::process::Command;

fn ca() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keyproof-ca"))
}

#[test]
fn help_lists_the_commands() {
    let out = ca().arg("--help").output().expect("run keyproof-ca");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "init",
        "issue",
        "inspect",
        "check",
        "bundle",
        "k8s-secret",
        "rotate",
        "serve",
        "token",
    ] {
        assert!(text.contains(cmd), "--help does not mention {cmd}:\n{text}");
    }
}

#[test]
fn an_unknown_command_fails_with_usage() {
    let out = ca()
        .arg("sign-everything")
        .output()
        .expect("run keyproof-ca");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Usage"), "no usage on stderr:\n{err}");
}

#[test]
fn init_into_a_fresh_directory_writes_the_root_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let out = ca()
        .args(["init", "--trust-domain", "cli.keyproof.test", "--dir"])
        .arg(&ca_dir)
        .output()
        .expect("run keyproof-ca");
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ca_dir.join("root.crt").is_file());
    assert!(ca_dir.join("bundle.pem").is_file());
}
