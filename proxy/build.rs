//! Release builds on x86_64 Linux lay out the functions a running sidecar
//! executes next to each other, in the order `layout/hot-functions.txt` gives
//! (made by `layout/profile.sh`; see `layout/README.md`). The kernel maps
//! executable pages in 64 KiB windows around each one touched, so scattered
//! hot code keeps most of the binary resident; clustered, it keeps about half
//! as much, and the request path runs from fewer pages.

use std::path::Path;
use std::process::Command;

fn main() {
    let list = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("layout/hot-functions.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    println!("cargo:rerun-if-env-changed=KEYPROOF_NO_LAYOUT");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    // `--symbol-ordering-file` is an lld option, and rustc links with lld by
    // default on x86_64-unknown-linux-gnu from 1.90 on. KEYPROOF_NO_LAYOUT=1
    // opts out (for a custom linker).
    let wanted = env("PROFILE") == "release"
        && env("TARGET") == "x86_64-unknown-linux-gnu"
        && env("KEYPROOF_NO_LAYOUT").is_empty()
        && rustc_minor().is_some_and(|m| m >= 90)
        && list.exists();
    if !wanted {
        return;
    }
    // Names lld does not find are skipped quietly: a list gone stale after a
    // dependency update costs locality, never a build.
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    // Packed relative relocations (DT_RELR) shrink the 400 KB table the
    // dynamic loader reads at every start to a few KB. Only when the glibc
    // linked against supports them (2.36+, as in the Debian 12 runtime
    // image): an older loader would ignore them and run unrelocated code.
    if glibc_has_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The minor version of the compiler building this crate.
fn rustc_minor() -> Option<u32> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.split_whitespace()
        .nth(1)?
        .split('.')
        .nth(1)?
        .parse()
        .ok()
}

/// Whether the system glibc defines `GLIBC_ABI_DT_RELR`.
fn glibc_has_relr() -> bool {
    ["/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6"]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .any(|bytes| bytes.windows(17).any(|w| w == b"GLIBC_ABI_DT_RELR"))
}
