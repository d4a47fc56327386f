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

/// Parallel `revoke`s on one CA directory each rewrite `revoked.json`
/// whole: without the directory lock the last writer dropped the others'
/// entries while every command reported success (adv33 F1).
#[test]
fn parallel_revokes_on_one_directory_all_stick() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run keyproof-ca");
        assert!(
            out.status.success(),
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(ca()
        .args(["init", "--trust-domain", "lock.keyproof.test", "--dir"])
        .arg(&dir));
    const N: usize = 8;
    let mut serials = Vec::new();
    for i in 0..N {
        let cert = tmp.path().join(format!("w{i}.crt"));
        run(ca()
            .args(["issue", "--spiffe-id"])
            .arg(format!("spiffe://lock.keyproof.test/w{i}"))
            .arg("--dir")
            .arg(&dir)
            .arg("--cert-out")
            .arg(&cert)
            .arg("--key-out")
            .arg(tmp.path().join(format!("w{i}.key"))));
    }
    let ledger = std::fs::read_to_string(dir.join("ledger.jsonl")).expect("ledger");
    for line in ledger.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("ledger line");
        serials.push(v["serial"].as_str().expect("serial").to_owned());
    }
    assert_eq!(serials.len(), N);
    for _round in 0..3 {
        let _ = std::fs::remove_file(dir.join("revoked.json"));
        let children: Vec<_> = serials
            .iter()
            .map(|s| {
                ca().args(["revoke", "--serial", s, "--dir"])
                    .arg(&dir)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("spawn revoke")
            })
            .collect();
        for mut c in children {
            assert!(c.wait().expect("wait").success());
        }
        let list: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("revoked.json")).expect("revoked.json"))
                .expect("revoked.json parses");
        let got = list["revoked"].as_array().expect("revoked array").len();
        assert_eq!(got, N, "revocations lost: {list}");
    }
}

/// `archive/` and `next/` (which holds the next root key) are 0700 however
/// loose the umask or an existing directory's mode (adv33 F11); `check`
/// fails on a revoked.json `serve` could not load (adv33 F10).
#[test]
fn rotation_subdirectories_are_private_and_check_reads_revoked_json() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run keyproof-ca");
        assert!(
            out.status.success(),
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(ca()
        .args(["init", "--trust-domain", "perm.keyproof.test", "--dir"])
        .arg(&dir));
    // As a umask of 000 would leave it.
    std::fs::create_dir(dir.join("archive")).expect("mkdir archive");
    std::fs::set_permissions(dir.join("archive"), std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    run(ca().args(["rotate", "intermediate", "--dir"]).arg(&dir));
    run(ca().args(["rotate", "root", "prepare", "--dir"]).arg(&dir));
    for sub in ["archive", "next"] {
        let mode = std::fs::metadata(dir.join(sub))
            .expect("subdirectory")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{sub}: mode {mode:o}");
    }
    let check = |dir: &std::path::Path| {
        ca().args(["check", "--dir"])
            .arg(dir)
            .output()
            .expect("run check")
    };
    let out = check(&dir);
    assert!(
        out.status.code() != Some(2),
        "check of a good CA: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::write(dir.join("revoked.json"), "{\"revoked\": [").expect("write");
    let out = check(&dir);
    assert_eq!(
        out.status.code(),
        Some(2),
        "check passed a corrupt revoked.json: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked.json"));
}

/// Parallel `rotate intermediate` runs on one directory used to install one
/// run's key beside another's certificate (the CA could no longer sign);
/// under the directory lock they run one after the other (adv33 F8).
#[test]
fn parallel_intermediate_rotations_leave_a_matching_pair() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ca");
    let out = ca()
        .args(["init", "--trust-domain", "rot.keyproof.test", "--dir"])
        .arg(&dir)
        .output()
        .expect("run keyproof-ca");
    assert!(out.status.success());
    for _round in 0..15 {
        let children: Vec<_> = (0..6)
            .map(|_| {
                ca().args(["rotate", "intermediate", "--dir"])
                    .arg(&dir)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("spawn rotate")
            })
            .collect();
        for mut c in children {
            assert!(c.wait().expect("wait").success());
        }
        let out = ca()
            .args(["check", "--dir"])
            .arg(&dir)
            .output()
            .expect("run check");
        assert_ne!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
