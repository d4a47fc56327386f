//! Changes of several files in a CA directory that a crash never leaves
//! half made.
//!
//! A rotation rewrites keys, certificates, the bundle and `ca.json`
//! together; each file is replaced atomically, but a process killed between
//! two of them (SIGKILL, the OOM killer, a power cut) would leave a new key
//! beside an old certificate, or a bundle holding a root `ca.json` knows
//! nothing of: a directory `serve` and `issue` refuse, which only a root key
//! (offline, perhaps) could repair. So such a change is written ahead:
//!
//! 1. every new file is written and synced under `.keyproof-journal/`;
//! 2. the plan (which staged file goes where, what is removed) is written
//!    there last, by an atomic rename: the commit point;
//! 3. the plan is carried out, each step idempotent, and the journal removed.
//!
//! [`recover`], run under the directory's exclusive lock before any command
//! reads the directory, finishes a committed change (killed in step 3) and
//! removes an uncommitted one (killed in step 1 or 2): the directory is
//! either as before the change or as after it.
//!
//! The journal's name starts with a dot: a store's workspace scan skips such
//! names, so it is never copied into a store.

use std::fs;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ca::{io_err, CaError};
use crate::fsutil;

/// The journal directory's name inside the CA directory.
pub const JOURNAL: &str = ".keyproof-journal";
/// The plan's name inside the journal: present once the change is committed.
const PLAN: &str = "plan.json";
/// The prefix of [`fsutil::stage`]'s temporary files: a process killed while
/// writing one leaves it behind.
const TEMP_PREFIX: &str = ".keyproof-tmp-";

/// One step of a plan; paths are relative to the CA directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Step {
    /// The staged file `from` (in the journal) goes to `to`, replacing it.
    Put { to: PathBuf, from: String },
    /// `path` is removed, if it is there.
    Remove { path: PathBuf },
    /// The directory `path` is removed, if it is there: it must hold
    /// nothing but temporary files left by killed writes.
    RemoveDir { path: PathBuf },
}

#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    steps: Vec<Step>,
}

/// A change being put together; nothing is written until [`Change::commit`].
#[derive(Debug)]
pub struct Change {
    dir: PathBuf,
    steps: Vec<Step>,
    staged: Vec<(Vec<u8>, u32)>,
}

impl Change {
    /// A change of the CA directory `dir`.
    pub fn new(dir: &Path) -> Change {
        Change {
            dir: dir.to_owned(),
            steps: Vec::new(),
            staged: Vec::new(),
        }
    }

    /// `data` becomes the file `rel` (relative to the directory), with
    /// `mode`. Files go into place in the order they were put: put
    /// `ca.json` last.
    pub fn put(&mut self, rel: impl Into<PathBuf>, data: impl Into<Vec<u8>>, mode: u32) {
        let from = self.staged.len().to_string();
        self.staged.push((data.into(), mode));
        self.steps.push(Step::Put {
            to: rel.into(),
            from,
        });
    }

    /// The file `rel` is removed.
    pub fn remove(&mut self, rel: impl Into<PathBuf>) {
        self.steps.push(Step::Remove { path: rel.into() });
    }

    /// The directory `rel` is removed (temporary files left in it by
    /// killed writes go with it; anything else fails the change).
    pub fn remove_dir(&mut self, rel: impl Into<PathBuf>) {
        self.steps.push(Step::RemoveDir { path: rel.into() });
    }

    /// Writes the change ahead, commits it and carries it out. A failure
    /// before the commit changes nothing; one after it is finished by the
    /// next [`recover`].
    pub fn commit(self) -> Result<(), CaError> {
        for step in &self.steps {
            check_relative(step.path())?;
        }
        // A change left by a killed run comes first.
        recover(&self.dir)?;
        let journal = self.dir.join(JOURNAL);
        fsutil::private_dir(&journal).map_err(io_err(&journal))?;
        let written = || -> Result<(), CaError> {
            for (i, (data, mode)) in self.staged.iter().enumerate() {
                let path = journal.join(i.to_string());
                fsutil::write_atomic(&path, data, *mode).map_err(io_err(&path))?;
            }
            let plan = Plan {
                steps: self.steps.clone(),
            };
            let text = serde_json::to_vec_pretty(&plan).map_err(|e| CaError::Corrupt {
                path: journal.join(PLAN),
                msg: e.to_string(),
            })?;
            let path = journal.join(PLAN);
            fsutil::write_atomic(&path, &text, fsutil::PUBLIC).map_err(io_err(&path))
        };
        if let Err(e) = written() {
            let _ = fs::remove_dir_all(&journal);
            return Err(e);
        }
        carry_out(&self.dir, &self.steps)
    }
}

impl Step {
    fn path(&self) -> &Path {
        match self {
            Step::Put { to, .. } => to,
            Step::Remove { path } | Step::RemoveDir { path } => path,
        }
    }
}

/// A plan names places inside the CA directory only.
fn check_relative(p: &Path) -> Result<(), CaError> {
    let inside = p.components().all(|c| matches!(c, Component::Normal(_)))
        && p.components().next().is_some()
        && !p.starts_with(JOURNAL);
    if inside {
        Ok(())
    } else {
        Err(CaError::Corrupt {
            path: p.to_owned(),
            msg: "a journal step outside the CA directory".into(),
        })
    }
}

/// What [`recover`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovered {
    /// No change was left.
    Nothing,
    /// A committed change was finished.
    Finished,
    /// An uncommitted change was removed: the directory is as before it.
    Undone,
}

/// Finishes or undoes a change a killed process left in `dir`; the caller
/// holds the directory's exclusive lock (or is the only one using it).
pub fn recover(dir: &Path) -> Result<Recovered, CaError> {
    let journal = dir.join(JOURNAL);
    if !journal.is_dir() {
        return Ok(Recovered::Nothing);
    }
    let plan_path = journal.join(PLAN);
    match fs::read(&plan_path) {
        Ok(text) => {
            let plan: Plan = serde_json::from_slice(&text).map_err(|e| CaError::Corrupt {
                path: plan_path.clone(),
                msg: format!("an unreadable journal plan ({e}); the change it describes is neither finished nor undone"),
            })?;
            for step in &plan.steps {
                check_relative(step.path())?;
            }
            carry_out(dir, &plan.steps)?;
            Ok(Recovered::Finished)
        }
        // Not committed: the directory is as it was before the change.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::remove_dir_all(&journal).map_err(io_err(&journal))?;
            fsutil::sync_parent(&journal).map_err(io_err(&journal))?;
            Ok(Recovered::Undone)
        }
        Err(e) => Err(io_err(&plan_path)(e)),
    }
}

/// Carries out `steps` (each one done at most once, whatever was done
/// before a crash) and removes the journal.
fn carry_out(dir: &Path, steps: &[Step]) -> Result<(), CaError> {
    apply(dir, steps)?;
    let journal = dir.join(JOURNAL);
    let plan = journal.join(PLAN);
    fs::remove_file(&plan).map_err(io_err(&plan))?;
    fs::remove_dir_all(&journal).map_err(io_err(&journal))?;
    fsutil::sync_parent(&journal).map_err(io_err(&journal))
}

/// The steps themselves, each skipped when already done.
fn apply(dir: &Path, steps: &[Step]) -> Result<(), CaError> {
    let journal = dir.join(JOURNAL);
    for step in steps {
        match step {
            Step::Put { to, from } => {
                let src = journal.join(from);
                let dst = dir.join(to);
                if !src.exists() {
                    continue; // moved before the crash
                }
                if let Some(parent) = dst.parent() {
                    if !parent.is_dir() {
                        fsutil::private_dir(parent).map_err(io_err(parent))?;
                    }
                }
                fs::rename(&src, &dst).map_err(io_err(&dst))?;
                fsutil::sync_parent(&dst).map_err(io_err(&dst))?;
            }
            Step::Remove { path } => {
                let p = dir.join(path);
                match fs::remove_file(&p) {
                    Ok(()) => fsutil::sync_parent(&p).map_err(io_err(&p))?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&p)(e)),
                }
            }
            Step::RemoveDir { path } => remove_dir(&dir.join(path))?,
        }
    }
    Ok(())
}

/// Removes `path`, a directory emptied by the plan but for temporary files
/// of writes killed part way.
fn remove_dir(path: &Path) -> Result<(), CaError> {
    let entries = match fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(path))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(TEMP_PREFIX) {
            let p = entry.path();
            fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    fs::remove_dir(path).map_err(io_err(path))?;
    fsutil::sync_parent(path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(dir: &Path) -> Change {
        let mut c = Change::new(dir);
        c.put("next/a", "new a", fsutil::SECRET);
        c.put("b", "new b", fsutil::PUBLIC);
        c.remove("old");
        c.remove_dir("gone");
        c
    }

    fn setup() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("b"), "old b").unwrap();
        fs::write(d.path().join("old"), "x").unwrap();
        fs::create_dir(d.path().join("gone")).unwrap();
        fs::write(d.path().join("gone/.keyproof-tmp-abc"), "torn").unwrap();
        d
    }

    fn after(d: &Path) {
        assert_eq!(fs::read_to_string(d.join("next/a")).unwrap(), "new a");
        assert_eq!(fs::read_to_string(d.join("b")).unwrap(), "new b");
        assert!(!d.join("old").exists() && !d.join("gone").exists());
        assert!(!d.join(JOURNAL).exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(d.join("next/a")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(d.join("next")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_change_is_carried_out_whole() {
        let d = setup();
        change(d.path()).commit().unwrap();
        after(d.path());
        assert_eq!(recover(d.path()).unwrap(), Recovered::Nothing);
    }

    #[test]
    fn a_committed_change_killed_at_any_step_is_finished() {
        // Every point between two steps of the plan: the plan and the
        // staged files written, some steps done.
        for done in 0..=4 {
            let d = setup();
            let c = change(d.path());
            let journal = d.path().join(JOURNAL);
            fs::create_dir(&journal).unwrap();
            for (i, (data, mode)) in c.staged.iter().enumerate() {
                fsutil::write_atomic(&journal.join(i.to_string()), data, *mode).unwrap();
            }
            let plan = Plan {
                steps: c.steps.clone(),
            };
            fs::write(journal.join(PLAN), serde_json::to_vec(&plan).unwrap()).unwrap();
            // The first `done` steps made, as by a run killed then.
            apply(d.path(), &c.steps[..done]).unwrap();
            assert_eq!(recover(d.path()).unwrap(), Recovered::Finished, "{done}");
            after(d.path());
        }
    }

    #[test]
    fn an_uncommitted_change_is_undone() {
        let d = setup();
        let journal = d.path().join(JOURNAL);
        fs::create_dir(&journal).unwrap();
        fs::write(journal.join("0"), "new a").unwrap();
        assert_eq!(recover(d.path()).unwrap(), Recovered::Undone);
        assert!(!journal.exists());
        assert_eq!(fs::read_to_string(d.path().join("b")).unwrap(), "old b");
        assert!(d.path().join("old").exists() && !d.path().join("next").exists());
    }

    #[test]
    fn a_plan_may_not_leave_the_directory() {
        let d = setup();
        for bad in ["../x", "/etc/x", ".keyproof-journal/0", ""] {
            let mut c = Change::new(d.path());
            c.put(bad, "x", fsutil::PUBLIC);
            assert!(c.commit().is_err(), "{bad}");
        }
        assert!(!d.path().join(JOURNAL).exists());
    }
}
