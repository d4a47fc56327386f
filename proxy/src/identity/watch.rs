//! Noticing that identity files changed.
//!
//! Kubernetes updates a Secret volume by writing a new timestamped directory
//! and atomically renaming the `..data` symlink to point at it; the visible
//! files are symlinks through `..data`. Watching the files themselves would
//! miss that (the inode watched never changes), so the *directories* that
//! hold them are watched, and any event there means "look again". Events are
//! coalesced, and a periodic tick covers file systems where inotify is not
//! delivered (some network and overlay mounts). The consumer decides whether
//! anything really changed by comparing contents.
//!
//! Only events that can change what is read count. inotify also reports every
//! `open` of a file in the directory; counting those made the reloader's own
//! reads (and those of anything else sharing the directory, such as an app
//! reading its certificate) trigger the next re-read, ten times a second,
//! forever.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;

/// How long to wait for a burst of events (a Secret update is several) to end.
const SETTLE: Duration = Duration::from_millis(100);

/// Bumped by [`look_again`]: every [`FileWatch`] of the process looks again.
static LOOK_AGAIN: std::sync::LazyLock<watch::Sender<u64>> =
    std::sync::LazyLock::new(|| watch::channel(0).0);

/// Makes every [`FileWatch`] of the process report a possible change now,
/// as on SIGHUP: an operator's "reload" for a file system whose events do
/// not arrive, without waiting for the next tick.
pub fn look_again() {
    LOOK_AGAIN.send_modify(|g| *g = g.wrapping_add(1));
}

/// A running watch; dropping it stops the notifications.
pub struct FileWatch {
    _watcher: Option<notify::RecommendedWatcher>,
    rx: watch::Receiver<u64>,
    _ticker: tokio::task::JoinHandle<()>,
}

impl FileWatch {
    /// Watches the directories holding `files`, and ticks every `interval`
    /// regardless. Watch failures are logged, not fatal: the periodic
    /// re-read still works.
    pub fn start(files: &[&Path], interval: Duration) -> FileWatch {
        let (tx, rx) = watch::channel(0u64);
        let (raw_tx, mut raw_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .map(|f| match f.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok_and(|e| may_change_contents(&e.kind)) {
                let _ = raw_tx.send(());
            }
        })
        .and_then(|mut w| {
            for d in &dirs {
                w.watch(d, RecursiveMode::NonRecursive)?;
            }
            Ok(w)
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch identity files; relying on the periodic re-read");
                None
            }
        };
        let mut again = LOOK_AGAIN.subscribe();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut generation = 0u64;
            loop {
                tokio::select! {
                    got = raw_rx.recv() => {
                        if got.is_none() {
                            // The watcher is gone; keep ticking.
                            tick.tick().await;
                        } else {
                            tokio::time::sleep(SETTLE).await;
                            while raw_rx.try_recv().is_ok() {}
                        }
                    }
                    _ = tick.tick() => {}
                    // The sender is a static: never closed.
                    _ = again.changed() => {}
                }
                generation += 1;
                if tx.send(generation).is_err() {
                    return;
                }
            }
        });
        FileWatch {
            _watcher: watcher,
            rx,
            _ticker: ticker,
        }
    }

    /// Waits until something may have changed.
    pub async fn changed(&mut self) {
        // The sender lives as long as the ticker task, which lives as long
        // as `self`; an error would mean it ended, so just stop waiting.
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Whether an event of this kind can change what a read of the files
/// returns: creations, writes, renames, removals (and events the backend
/// could not classify), but not opens, reads and closes.
fn may_change_contents(kind: &notify::EventKind) -> bool {
    !matches!(kind, notify::EventKind::Access(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading the watched files (as the reloader itself does) is not a
    /// change; writing one is.
    #[tokio::test]
    async fn reads_are_not_changes_but_writes_are() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("tls.crt");
        std::fs::write(&file, b"one").expect("write");
        let mut watch = FileWatch::start(&[file.as_path()], Duration::from_secs(3600));
        for _ in 0..5 {
            assert_eq!(std::fs::read(&file).expect("read"), b"one");
        }
        let noticed = tokio::time::timeout(Duration::from_millis(600), watch.changed()).await;
        assert!(noticed.is_err(), "reading the files was taken for a change");

        std::fs::write(&file, b"two").expect("write");
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("a write to a watched file was not noticed");
    }

    /// What the kubelet does to a Secret volume: the visible files are
    /// symlinks through `..data`, and an update writes a new timestamped
    /// directory and renames a fresh `..data` symlink over the old one. The
    /// inode of `tls.crt` never changes, only the directory does.
    #[tokio::test]
    async fn a_kubernetes_data_symlink_swap_is_a_change() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let v1 = root.join("..2024_01_01_00_00_00.000000001");
        std::fs::create_dir(&v1).expect("mkdir");
        std::fs::write(v1.join("tls.crt"), b"one").expect("write");
        symlink(v1.file_name().expect("name"), root.join("..data")).expect("..data");
        symlink("..data/tls.crt", root.join("tls.crt")).expect("tls.crt");
        let file = root.join("tls.crt");
        assert_eq!(std::fs::read(&file).expect("read"), b"one");
        let mut watch = FileWatch::start(&[file.as_path()], Duration::from_secs(3600));

        let v2 = root.join("..2024_01_01_00_01_00.000000002");
        std::fs::create_dir(&v2).expect("mkdir");
        std::fs::write(v2.join("tls.crt"), b"two").expect("write");
        symlink(v2.file_name().expect("name"), root.join("..data_tmp")).expect("..data_tmp");
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
        std::fs::remove_dir_all(&v1).expect("old version");

        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("the ..data swap was not noticed");
        assert_eq!(std::fs::read(&file).expect("read"), b"two");
    }

    /// Where no event is delivered, the periodic tick still says "look".
    #[tokio::test]
    async fn the_interval_ticks_without_any_event() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("tls.crt");
        std::fs::write(&file, b"one").expect("write");
        let mut watch = FileWatch::start(&[file.as_path()], Duration::from_millis(100));
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(2), watch.changed())
                .await
                .expect("no tick");
        }
    }

    /// A watch on a directory that does not exist fails, and is not fatal:
    /// the periodic re-read goes on.
    #[tokio::test]
    async fn an_unwatchable_directory_still_ticks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("missing").join("tls.crt");
        let mut watch = FileWatch::start(&[file.as_path()], Duration::from_millis(100));
        assert!(watch._watcher.is_none());
        tokio::time::timeout(Duration::from_secs(2), watch.changed())
            .await
            .expect("no tick");
    }
}
