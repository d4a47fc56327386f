//! The bytes of signed request bodies held at once while their
//! `Content-Digest` and signature are checked, and then on their way to
//! the app (`[inbound.stepup] max_buffered`).
//!
//! Every other body streams through; a step-up body is read whole first,
//! up to `max_body` each. Without a bound on them together, a caller
//! holding a valid nonce could open a stream per concurrent-stream place
//! and connection, each sending up to `max_body` slowly, and hold that many
//! megabytes. The budget is taken before the body is read (its declared
//! length, or `max_body` when it has none) and given back when the app has
//! answered (a stalled app holds the checked body whole); one caller may
//! hold at most a quarter of it, so that one
//! caller cannot take it all from the others. A request beyond it gets 503
//! at once, with `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The budget of one inbound.
#[derive(Debug)]
pub struct BodyBudget {
    total: u64,
    per_peer: u64,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: u64,
    by_peer: HashMap<Arc<str>, u64>,
}

/// Bytes taken from a [`BodyBudget`]; given back on drop.
#[derive(Debug)]
pub struct Taken {
    budget: Arc<BodyBudget>,
    peer: Arc<str>,
    bytes: u64,
}

impl BodyBudget {
    /// A budget of `total` bytes, a quarter of it (at least `max_body`)
    /// for any one caller.
    pub fn new(total: u64, max_body: u64) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            total,
            per_peer: (total / 4).max(max_body).min(total),
            held: Mutex::new(Held::default()),
        })
    }

    /// Takes `bytes` for `peer`, or `None` when that would go beyond the
    /// budget or the caller's share.
    pub fn take(self: &Arc<Self>, peer: &str, bytes: u64) -> Option<Taken> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mine = held.by_peer.get(peer).copied().unwrap_or(0);
        if held.total.saturating_add(bytes) > self.total
            || mine.saturating_add(bytes) > self.per_peer
        {
            return None;
        }
        held.total += bytes;
        let peer: Arc<str> = match held.by_peer.get_key_value(peer) {
            Some((k, _)) => k.clone(),
            None => Arc::from(peer),
        };
        *held.by_peer.entry(peer.clone()).or_insert(0) += bytes;
        Some(Taken {
            budget: self.clone(),
            peer,
            bytes,
        })
    }

    /// Bytes held now, all callers.
    pub fn held(&self) -> u64 {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Taken {
    /// Gives back what is held beyond `bytes`: a body taken at its bound
    /// and read whole holds only its length while the app answers.
    pub fn shrink_to(&mut self, bytes: u64) {
        let extra = self.bytes.saturating_sub(bytes);
        if extra == 0 {
            return;
        }
        let mut held = self.budget.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(extra);
        if let Some(mine) = held.by_peer.get_mut(&self.peer) {
            *mine = mine.saturating_sub(extra);
        }
        self.bytes -= extra;
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let mut held = self.budget.held.lock().unwrap_or_else(|p| p.into_inner());
        held.total = held.total.saturating_sub(self.bytes);
        if let Some(mine) = held.by_peer.get_mut(&self.peer) {
            *mine = mine.saturating_sub(self.bytes);
            if *mine == 0 {
                held.by_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_a_quarter_and_all_together_the_whole() {
        let b = BodyBudget::new(400, 10);
        let a: Vec<_> = (0..10)
            .map(|_| b.take("a", 10).expect("a's share"))
            .collect();
        assert!(b.take("a", 1).is_none(), "beyond a's quarter");
        let others: Vec<_> = ["b", "c", "d"]
            .iter()
            .flat_map(|p| (0..10).map(|_| b.take(p, 10).expect("a share")))
            .collect();
        assert_eq!(b.held(), 400);
        assert!(b.take("e", 1).is_none(), "beyond the whole");
        drop(a);
        assert_eq!(b.held(), 300);
        assert!(b.take("e", 10).is_some());
        drop(others);
        assert_eq!(b.held(), 0);
        // A share is never below one body.
        let small = BodyBudget::new(100, 60);
        assert!(small.take("a", 60).is_some());
    }

    #[test]
    fn a_body_read_whole_keeps_only_its_length() {
        let b = BodyBudget::new(400, 100);
        let mut t: Vec<_> = (0..4)
            .map(|_| b.take("a", 25).expect("a's share"))
            .collect();
        assert!(b.take("a", 1).is_none());
        t[0].shrink_to(5);
        t[1].shrink_to(0);
        t[2].shrink_to(30); // never grows
        assert_eq!(b.held(), 5 + 25 + 25);
        assert!(
            b.take("a", 45).is_some(),
            "the rest of a's share is free again"
        );
        drop(t);
        assert_eq!(b.held(), 0);
        assert!(b.take("a", 100).is_some(), "all of it given back");
    }
}
