//! A configuration file taken into use whenever its content changes:
//! `[inbound] policy_file` and `[outbound] upstreams_file`.
//!
//! The file is watched as the identity files are (directory events and a
//! periodic re-read). Only a change of content is offered to its owner,
//! once it has stopped changing: a tick or an unrelated event in the
//! directory must not reload, as a reload starts per-route state of changed
//! routes afresh, and a half-written file must not be taken for a shorter
//! one. A file the owner refuses is logged and counted, and what is in use
//! keeps serving.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::AbortHandle;

use crate::identity::watch::FileWatch;

/// How the logs name a watched file, and what stays in use when it is
/// refused.
#[derive(Debug, Clone, Copy)]
pub struct Names {
    /// The file, e.g. "inbound policy file".
    pub file: &'static str,
    /// The message when new content is in use, e.g. "inbound policy reloaded".
    pub taken: &'static str,
    /// What a refusal leaves serving, e.g. "the policy in use keeps serving".
    pub kept: &'static str,
    /// The configuration key, e.g. "policy_file".
    pub key: &'static str,
}

/// Why new content was not taken into use.
#[derive(Debug)]
pub enum Refused {
    /// The content is at fault (the message names the key): refused once,
    /// and not offered again until it changes.
    Content(String),
    /// Not the content's fault (a bug, such as a metrics registration that
    /// failed): the same content is offered again at the next look.
    Retry(String),
}

/// Watches `path` until the task is dropped. Each new settled content
/// (differing from `seen`, the content in use; `None`: not known, so the
/// first readable content is new) is passed to `take` as text, which puts
/// it in use and says what it took, or refuses it. `counted` counts every
/// outcome: each taken or refused content, and each disappearance of the
/// file (once, until it is readable again).
pub async fn watch<T, C>(
    path: PathBuf,
    mut seen: Option<Vec<u8>>,
    interval: Duration,
    names: Names,
    mut take: T,
    counted: C,
) where
    T: FnMut(&str) -> Result<String, Refused>,
    C: Fn(bool),
{
    let mut watch = FileWatch::start(&[path.as_path()], interval);
    let mut unreadable = 0;
    loop {
        let now = match changed_content(&mut watch, &path, seen.as_deref(), &mut unreadable).await {
            Look::Content(now) => now,
            Look::Gone(e) => {
                // Once per disappearance: the operator removed or broke
                // the file, and nothing else would say so.
                counted(false);
                tracing::error!(file = %path.display(), key = names.key, error = %e, "{} unreadable (removed?); {}", names.file, names.kept);
                continue;
            }
        };
        let result = match std::str::from_utf8(&now) {
            Ok(text) => take(text),
            Err(e) => Err(Refused::Content(format!(
                "{}: not UTF-8 text: {e}",
                path.display()
            ))),
        };
        match result {
            Ok(what) => {
                seen = Some(now);
                counted(true);
                tracing::info!(file = %path.display(), key = names.key, "{} ({what})", names.taken);
            }
            Err(Refused::Retry(e)) => {
                counted(false);
                tracing::error!(file = %path.display(), key = names.key, error = %e, "{} not taken into use; {}; tried again at the next change or tick", names.file, names.kept);
            }
            Err(Refused::Content(e)) => {
                seen = Some(now);
                counted(false);
                tracing::error!(file = %path.display(), key = names.key, error = %e, "{} refused; {}", names.file, names.kept);
            }
        }
    }
}

/// Spawns `watcher` (a [`watch`] of `path`). A watcher that panicked would
/// leave the file's changes unseen without a word: that is logged loudly
/// (an abort at shutdown is not). The handle aborts the watcher.
pub fn spawn<F>(watcher: F, path: &Path, names: Names) -> AbortHandle
where
    F: Future<Output = ()> + Send + 'static,
{
    let task = tokio::spawn(watcher);
    let abort = task.abort_handle();
    let path = path.to_owned();
    tokio::spawn(async move {
        if let Err(e) = task.await {
            if e.is_panic() {
                tracing::error!(file = %path.display(), key = names.key, error = %e, "the {} watcher failed; {} changes are no longer taken into use", names.file, names.key);
            }
        }
    });
    abort
}

/// The next content of the watched file `path` that differs from `seen`
/// and has stopped changing. A file written in place (not renamed into
/// place) may be seen half written, and a valid prefix of a policy or a
/// rule list is a valid one with fewer entries: only content that stays
/// the same is returned ([`settled`]). A read that fails (mid-replacement,
/// or gone) decides nothing: the next event or tick looks again; a file
/// still unreadable at the next look is reported as [`Look::Gone`], once
/// until it is readable again (`failed` counts the looks that failed in a
/// row, across calls).
async fn changed_content(
    watch: &mut FileWatch,
    path: &Path,
    seen: Option<&[u8]>,
    failed: &mut u32,
) -> Look {
    loop {
        watch.changed().await;
        let now = match crate::files::read_async(path).await {
            Ok(b) => b,
            Err(e) => {
                // The first failure may be a replacement in progress.
                *failed = failed.saturating_add(1);
                tracing::debug!(file = %path.display(), error = %e, "watched file not readable now");
                if *failed == 2 {
                    return Look::Gone(e);
                }
                continue;
            }
        };
        *failed = 0;
        if seen == Some(now.as_slice()) {
            continue;
        }
        let Some(now) = settled(path, now).await else {
            continue;
        };
        if seen != Some(now.as_slice()) {
            return Look::Content(now);
        }
    }
}

/// What a look at a watched file found.
enum Look {
    /// New content, settled.
    Content(Vec<u8>),
    /// The file could not be read twice in a row.
    Gone(std::io::Error),
}

/// How long a changed file must stay the same before it is read, and how
/// many times it is looked at before the change is left to the next event
/// or tick.
pub const SETTLE: Duration = Duration::from_millis(250);
const SETTLE_TRIES: usize = 20;

/// `first` once a re-read after [`SETTLE`] gives the same bytes; `None` if
/// the file keeps changing (or cannot be read).
async fn settled(path: &Path, first: Vec<u8>) -> Option<Vec<u8>> {
    let mut last = first;
    for _ in 0..SETTLE_TRIES {
        tokio::time::sleep(SETTLE).await;
        let again = crate::files::read_async(path).await.ok()?;
        if again == last {
            return Some(last);
        }
        last = again;
    }
    tracing::warn!(file = %path.display(), "file still changing after {:?}; looked at again at the next change", SETTLE * SETTLE_TRIES as u32);
    None
}
