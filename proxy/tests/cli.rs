//! The `keyproof-proxy` command line, run as a process.
//!
//! Besides what it checks, this file makes `cargo test --workspace` build the
//! `keyproof-proxy` binary (cargo builds a package's binaries for its own
//! integration tests), which the end-to-end suites in `tests/` start.

use std::process::Command;

fn proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keyproof-proxy"))
}

#[test]
fn help_lists_the_commands() {
    let out = proxy().arg("--help").output().expect("run keyproof-proxy");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check-config", "quickstart"] {
        assert!(text.contains(cmd), "--help does not mention {cmd}:\n{text}");
    }
}

#[test]
fn check_config_names_an_unknown_key_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[identity]\ntrust_bundle = \"/nonexistent\"\nbogus_key = 1\n",
    )
    .expect("write");
    let out = proxy()
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run keyproof-proxy");
    assert!(!out.status.success(), "an unknown key must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bogus_key"),
        "the error must name the key: {err}"
    );
}
