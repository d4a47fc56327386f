//! Keeping a process's memory, which holds private keys, to itself.
//!
//! Both binaries hold private keys in memory (the workload key, the CA's
//! intermediate key, PINs). By default a crash writes a core dump holding
//! them wherever `core_pattern` says, and any process of the same user may
//! `ptrace` the process or read its `/proc/PID/mem`. Marking the process
//! not dumpable (`prctl(PR_SET_DUMPABLE, 0)`) ends both: no core file,
//! `/proc/PID/mem` and `ptrace` for root (`CAP_SYS_PTRACE`) only, as
//! OpenSSH's agent and GnuPG do for theirs.

use rustix::process::{dumpable_behavior, set_dumpable_behavior, DumpableBehavior};

/// Marks the process not dumpable. A failure is returned (and is worth a
/// warning, not a refusal to start: a seccomp profile may forbid `prctl`).
pub fn keep_private() -> std::io::Result<()> {
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Whether the process is marked not dumpable ([`keep_private`]).
pub fn is_private() -> bool {
    matches!(dumpable_behavior(), Ok(DumpableBehavior::NotDumpable))
}

#[cfg(test)]
mod tests {
    /// In a child process (the test binary run again for `child` alone), so
    /// that the test process keeps its own setting.
    #[test]
    fn the_process_is_not_dumpable_after() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "private_memory::tests::child"])
            .env("KEYPROOF_PRIVATE_MEMORY_CHILD", "1")
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn child() {
        if std::env::var_os("KEYPROOF_PRIVATE_MEMORY_CHILD").is_none() {
            return;
        }
        assert!(!super::is_private());
        super::keep_private().unwrap();
        assert!(super::is_private());
    }
}
