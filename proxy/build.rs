//! Release builds on x86_64 Linux lay out the functions a running sidecar
//! executes next to each other, in the order `layout/hot-functions.txt` gives
//! (made by `layout/profile.sh`; see `layout/README.md`). The kernel maps
//! executable pages in 64 KiB windows around each one touched, so scattered
//! hot code keeps most of the binary resident; clustered, it keeps about half
//! as much, and the request path runs from fewer pages.

use std::path::Path;

fn main() {
    let list = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("layout/hot-functions.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    println!("cargo:rerun-if-env-changed=KEYPROOF_NO_LAYOUT");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    // `--symbol-ordering-file` is an lld option; rustc links with lld by
    // default on x86_64 Linux only. KEYPROOF_NO_LAYOUT=1 opts out (for a
    // custom linker).
    let wanted = env("PROFILE") == "release"
        && env("CARGO_CFG_TARGET_OS") == "linux"
        && env("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && env("KEYPROOF_NO_LAYOUT").is_empty()
        && list.exists();
    if wanted {
        // Names lld does not find are skipped quietly: a list gone stale
        // after a dependency update costs locality, never a build.
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
