//! What the outbound remembers about step-up: the paths of each upstream
//! that demanded it ([`StepUpPaths`]), and the nonces kept from verified
//! responses' `Accept-Signature`, per (mesh connection, request path), to
//! sign the next request to that path up front ([`KeptNonces`]: zero extra
//! round trips in steady state, design §5).
//!
//! Each key holds a small FIFO pool rather than one nonce: with `c`
//! concurrent requests to one path on one connection, every response brings
//! a nonce and every request takes one, so the pool settles at about `c`.
//! Keeping only the latest would strand the others on the inbound, counted
//! against its per-peer bound until they expire, and turn into 429s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use keyproof_stepup::Challenge;

/// Kept nonces older than this are dropped rather than used: the inbound's
/// default lifetime is 30 s, and using an expired one costs a challenge.
const KEEP_FOR: Duration = Duration::from_secs(25);
/// Bound per (connection, path): the inbound's default per-identity bound
/// (a pool beyond it could not be refilled anyway).
const MAX_PER_PATH: usize = 256;
/// Bound on all kept nonces.
const MAX_TOTAL: usize = 4096;
/// Longest path remembered, as a step-up path or the key of kept nonces.
/// The bounds above count entries; a path may be as long as a request
/// head (64 KiB), and paths chosen by whoever shapes the app's requests
/// would otherwise pin that much each (round 11: 330 MB for 5,000 paths of
/// 60 KB). A longer path works as any other, with a challenge each time.
const MAX_REMEMBERED_PATH: usize = 1024;

type Pool = VecDeque<(Challenge, Instant)>;

#[derive(Default)]
struct Inner {
    by_conn: HashMap<u64, HashMap<String, Pool>>,
    len: usize,
}

/// The kept nonces of one outbound.
#[derive(Default)]
pub struct KeptNonces(Mutex<Inner>);

impl std::fmt::Debug for KeptNonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptNonces")
            .field("len", &self.lock().len)
            .finish()
    }
}

impl KeptNonces {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation keeps `len` consistent before it can panic.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The oldest fresh nonce kept for `path` on connection `conn_id`
    /// (removed: each nonce is used once). Stale ones are dropped on the way.
    pub fn take(&self, conn_id: u64, path: &str) -> Option<Challenge> {
        let mut k = self.lock();
        let per_conn = k.by_conn.get_mut(&conn_id)?;
        let pool = per_conn.get_mut(path)?;
        let mut taken = 0;
        let mut found = None;
        while let Some((ch, at)) = pool.pop_front() {
            taken += 1;
            if at.elapsed() < KEEP_FOR {
                found = Some(ch);
                break;
            }
        }
        if pool.is_empty() {
            per_conn.remove(path);
            if per_conn.is_empty() {
                k.by_conn.remove(&conn_id);
            }
        }
        k.len -= taken;
        found
    }

    /// Keeps `ch` for `path` on connection `conn_id`, within the bounds (a
    /// nonce that does not fit is dropped; the request it would have signed
    /// is challenged instead).
    pub fn keep(&self, conn_id: u64, path: &str, ch: Challenge) {
        if path.len() > MAX_REMEMBERED_PATH {
            return;
        }
        let mut k = self.lock();
        if k.len >= MAX_TOTAL {
            // Drop stale entries (closed connections, unused paths).
            let mut len = 0;
            k.by_conn.retain(|_, paths| {
                paths.retain(|_, pool| {
                    pool.retain(|(_, at)| at.elapsed() < KEEP_FOR);
                    len += pool.len();
                    !pool.is_empty()
                });
                !paths.is_empty()
            });
            k.len = len;
            if k.len >= MAX_TOTAL {
                return;
            }
        }
        let k = &mut *k;
        let paths = k.by_conn.entry(conn_id).or_default();
        if !paths.contains_key(path) {
            paths.insert(path.to_owned(), Pool::new());
        }
        let Some(pool) = paths.get_mut(path) else {
            return;
        };
        if pool.len() >= MAX_PER_PATH {
            return;
        }
        pool.push_back((ch, Instant::now()));
        k.len += 1;
    }
}

/// Bound on paths remembered as needing step-up, per upstream.
const MAX_STEPUP_PATHS: usize = 1024;

/// Paths of one upstream that answered with a step-up challenge. Requests to
/// them are buffered (up to `max_body`) and sent on the h2 connection so they
/// can be signed up front; every other request streams untouched.
#[derive(Debug, Default)]
pub struct StepUpPaths {
    len: AtomicUsize,
    set: RwLock<HashSet<String>>,
}

impl StepUpPaths {
    /// True if `path` is known to need step-up. Lock-free while no path is
    /// known, which is the hot path of every non-step-up upstream.
    pub fn contains(&self, path: &str) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.set
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(path)
    }

    /// Remembers `path` (bounded, in paths and in each one's length: beyond
    /// the bounds, paths keep working through the replay path, only without
    /// the up-front signature).
    pub fn learn(&self, path: &str) {
        if path.len() > MAX_REMEMBERED_PATH {
            return;
        }
        let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
        if set.len() < MAX_STEPUP_PATHS && set.insert(path.to_owned()) {
            self.len.store(set.len(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(n: &str) -> Challenge {
        Challenge {
            components: vec![],
            nonce: n.into(),
            alg: "ed25519".into(),
            keyid: "k".into(),
            tag: "stepup-v1".into(),
        }
    }

    #[test]
    fn fifo_per_connection_and_path() {
        let k = KeptNonces::default();
        k.keep(1, "/a", ch("n1"));
        k.keep(1, "/a", ch("n2"));
        k.keep(2, "/a", ch("other-conn"));
        assert_eq!(k.take(1, "/b"), None);
        assert_eq!(k.take(1, "/a").map(|c| c.nonce), Some("n1".into()));
        assert_eq!(k.take(1, "/a").map(|c| c.nonce), Some("n2".into()));
        assert_eq!(k.take(1, "/a"), None);
        assert_eq!(k.take(2, "/a").map(|c| c.nonce), Some("other-conn".into()));
        assert_eq!(k.lock().len, 0);
        assert!(k.lock().by_conn.is_empty());
    }

    #[test]
    fn a_long_path_is_not_remembered() {
        let long = format!("/admin/{}", "x".repeat(MAX_REMEMBERED_PATH));
        let k = KeptNonces::default();
        k.keep(1, &long, ch("n"));
        assert_eq!(k.take(1, &long), None);
        assert_eq!(k.lock().len, 0);
        let p = StepUpPaths::default();
        p.learn(&long);
        assert!(!p.contains(&long));
        p.learn("/admin/x");
        assert!(p.contains("/admin/x"));
    }

    #[test]
    fn bounded_per_path() {
        let k = KeptNonces::default();
        for i in 0..MAX_PER_PATH + 5 {
            k.keep(1, "/a", ch(&i.to_string()));
        }
        assert_eq!(k.lock().len, MAX_PER_PATH);
    }

    #[test]
    fn a_full_path_pool_keeps_its_oldest_nonces() {
        let k = KeptNonces::default();
        for i in 0..MAX_PER_PATH + 5 {
            k.keep(1, "/a", ch(&i.to_string()));
        }
        // The ones beyond the bound were dropped, not the first ones.
        assert_eq!(k.take(1, "/a").map(|c| c.nonce), Some("0".into()));
        // Another path on the same connection has a pool of its own.
        k.keep(1, "/b", ch("b"));
        assert_eq!(k.take(1, "/b").map(|c| c.nonce), Some("b".into()));
    }

    /// Puts `n` entries kept at `at` straight into the table.
    fn keep_at(k: &KeptNonces, conn: u64, path: &str, n: usize, at: Instant) {
        let mut inner = k.lock();
        let pool = inner
            .by_conn
            .entry(conn)
            .or_default()
            .entry(path.to_owned())
            .or_default();
        for i in 0..n {
            pool.push_back((ch(&format!("{path}-{i}")), at));
        }
        inner.len += n;
    }

    fn stale() -> Instant {
        Instant::now()
            .checked_sub(KEEP_FOR + Duration::from_secs(1))
            .expect("the clock is past KEEP_FOR")
    }

    #[test]
    fn an_expired_nonce_is_dropped_not_used() {
        let k = KeptNonces::default();
        keep_at(&k, 1, "/a", 2, stale());
        k.keep(1, "/a", ch("fresh"));
        assert_eq!(k.lock().len, 3);
        assert_eq!(k.take(1, "/a").map(|c| c.nonce), Some("fresh".into()));
        assert_eq!(k.lock().len, 0);
        assert!(k.lock().by_conn.is_empty());
    }

    #[test]
    fn only_expired_nonces_means_none() {
        let k = KeptNonces::default();
        keep_at(&k, 1, "/a", 3, stale());
        assert_eq!(k.take(1, "/a"), None);
        assert_eq!(k.lock().len, 0);
        assert!(k.lock().by_conn.is_empty());
    }

    #[test]
    fn the_whole_table_is_bounded() {
        let k = KeptNonces::default();
        // Fresh entries over many connections, up to the bound.
        let conns = MAX_TOTAL / MAX_PER_PATH;
        for c in 0..conns as u64 {
            keep_at(&k, c, "/a", MAX_PER_PATH, Instant::now());
        }
        assert_eq!(k.lock().len, MAX_TOTAL);
        k.keep(10_000, "/a", ch("over"));
        assert_eq!(k.lock().len, MAX_TOTAL);
        assert_eq!(k.take(10_000, "/a"), None);
    }

    #[test]
    fn a_full_table_drops_its_expired_entries_to_make_room() {
        let k = KeptNonces::default();
        let conns = MAX_TOTAL / MAX_PER_PATH;
        for c in 0..conns as u64 {
            // Half the connections are long gone.
            let at = if c % 2 == 0 { stale() } else { Instant::now() };
            keep_at(&k, c, "/a", MAX_PER_PATH, at);
        }
        assert_eq!(k.lock().len, MAX_TOTAL);
        k.keep(10_000, "/a", ch("new"));
        assert_eq!(k.lock().len, MAX_TOTAL / 2 + 1);
        assert!(!k.lock().by_conn.contains_key(&0));
        assert_eq!(k.take(10_000, "/a").map(|c| c.nonce), Some("new".into()));
    }

    #[test]
    fn step_up_paths_are_learned_exactly() {
        let p = StepUpPaths::default();
        assert!(!p.contains("/admin"));
        p.learn("/admin");
        p.learn("/admin");
        assert!(p.contains("/admin"));
        // Paths, not prefixes: each path of a route is learned on its own.
        assert!(!p.contains("/admin/x"));
        assert!(!p.contains("/Admin"));
        assert_eq!(p.len.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn step_up_paths_are_bounded() {
        let p = StepUpPaths::default();
        for i in 0..MAX_STEPUP_PATHS + 10 {
            p.learn(&format!("/p/{i}"));
        }
        assert_eq!(p.len.load(Ordering::Relaxed), MAX_STEPUP_PATHS);
        assert!(p.contains("/p/0"));
        assert!(p.contains(&format!("/p/{}", MAX_STEPUP_PATHS - 1)));
        // Beyond the bound a path is not remembered (it still works, by
        // replaying after each challenge).
        assert!(!p.contains(&format!("/p/{MAX_STEPUP_PATHS}")));
    }
}
