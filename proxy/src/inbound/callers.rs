//! The open connections of verified callers, so that a deny-list change
//! reaches them.
//!
//! The deny list is the operator's lever during an incident: a stolen
//! identity must lose the mesh in seconds. Each request is decided on by
//! the policy in use when it arrives, and open tunnels are decided on again
//! (`tunnel.rs`), but a connection also carries what is already under way:
//! a response still streaming (server-sent events, a gRPC stream) outlives
//! the change that would refuse its request. So when the policy changes,
//! every connection of a caller the new deny list names is closed outright,
//! with whatever it carries.
//!
//! A caller already on the deny list when it connects is not cut at once:
//! its requests get the deny list's 403, as the contract says, and the first
//! such refusal drains the connection (`InboundConn::drain`: the 403 goes
//! out, then the connection ends), so that no denied caller holds a
//! connection place for longer than a request.
//!
//! A registration is one lock and one map entry per connection, taken once
//! its handshake has named the caller; it goes when the connection does.
//!
//! The same registry is what the memory budget sheds from (`memory.rs`):
//! [`Shed::shed`] closes the connections of the caller holding the most,
//! and until [`Shed::calm`] a new connection of a caller shed from is
//! closed as it registers.
//!
//! A trust bundle change reaches open connections too ([`distrusted`]):
//! dropping a root is what an operator does after a CA compromise, and a
//! caller whose chain no longer verifies must not keep what it holds.

use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keyproof_identity::{SpiffeId, Usage, VerifyError};
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::http::server::Activity;
use crate::identity::store::IdentityStore;
use crate::memory::{Holder, Shed};

/// Every open caller connection of a listener.
#[derive(Default)]
pub struct Callers {
    open: Mutex<Open>,
    /// Connections closed as they registered, since [`Shed::take_refused`].
    refused: AtomicU64,
}

#[derive(Default)]
struct Open {
    by_id: HashMap<u64, Caller>,
    next: u64,
    /// Callers shed from since the last [`Shed::calm`].
    shed_from: Vec<SpiffeId>,
    /// Each caller's share of the memory budget, across its connections
    /// (`memory::Holder`), and how many connections it has open.
    holders: HashMap<SpiffeId, (Arc<Holder>, usize)>,
}

struct Caller {
    peer: SpiffeId,
    serial: String,
    close: CancellationToken,
    /// The connection's activity word: requests in flight in its low bits.
    activity: Activity,
}

/// One connection's entry, removed on drop.
pub struct Registered {
    callers: Arc<Callers>,
    id: u64,
    close: CancellationToken,
    holder: Arc<Holder>,
}

impl Callers {
    /// Registers a connection of `peer`, whose certificate has `serial`
    /// and whose requests in flight `activity` counts. While memory is
    /// being shed from `peer`, the registration comes back closed.
    pub fn register(
        self: &Arc<Self>,
        peer: &SpiffeId,
        serial: &str,
        activity: Activity,
    ) -> Registered {
        let close = CancellationToken::new();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.shed_from.contains(peer) {
            close.cancel();
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        let id = open.next;
        open.next += 1;
        let (holder, conns) = open.holders.entry(peer.clone()).or_default();
        *conns += 1;
        let holder = holder.clone();
        open.by_id.insert(
            id,
            Caller {
                peer: peer.clone(),
                serial: serial.to_owned(),
                close: close.clone(),
                activity,
            },
        );
        Registered {
            callers: self.clone(),
            id,
            close,
            holder,
        }
    }

    /// Closes every connection of a caller `denied` names; returns how
    /// many.
    pub fn close(&self, denied: impl Fn(&SpiffeId, &str) -> bool) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for c in open.by_id.values() {
            if !c.close.is_cancelled() && denied(&c.peer, &c.serial) {
                c.close.cancel();
                n += 1;
            }
        }
        n
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolves, with why, once the trust bundle in use no longer accepts the
/// caller's `chain` (leaf first), which was verified under generation
/// `seen` of `store`'s roots (read before its handshake). Each change of the
/// roots verifies the chain again; renewals of our own certificate under
/// the same roots cost nothing.
pub async fn distrusted(
    store: &IdentityStore,
    mut seen: u64,
    chain: &[CertificateDer<'static>],
) -> VerifyError {
    let mut changes = store.trust_changes();
    loop {
        // Checked before the first wait: the roots may have changed while
        // the handshake ran.
        let now = *changes.borrow_and_update();
        if now != seen {
            if let Err(e) = store.verify_again(chain, Usage::ClientAuth) {
                return e;
            }
            seen = now;
        }
        if changes.changed().await.is_err() {
            // The store is gone: so is the listener.
            return std::future::pending().await;
        }
    }
}

/// What the memory budget sheds from (`memory.rs`).
impl Shed for Callers {
    fn open(&self) -> usize {
        self.len()
    }

    fn largest(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts: HashMap<&SpiffeId, usize> = HashMap::new();
        for c in open.by_id.values() {
            if !c.close.is_cancelled() {
                *counts.entry(&c.peer).or_default() += 1;
            }
        }
        counts.into_values().max().unwrap_or(0)
    }

    /// Closes `n` connections (fewer if fewer are open) to give their
    /// memory back; returns how many. Each is taken from the caller with
    /// the most connections still open, each weighed by the requests the
    /// caller has in flight ([`weight`]), so that the callers holding the
    /// most are brought down to the level of the next; of a caller's, those
    /// with no request in flight go first (an unfinished head, an idle
    /// keep-alive), then the newest. Callers shed from have their new
    /// connections closed until [`Shed::calm`].
    fn shed(&self, n: usize) -> usize {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_peer: HashMap<&SpiffeId, Vec<(bool, u64)>> = HashMap::new();
        for (&id, c) in &open.by_id {
            if !c.close.is_cancelled() {
                let busy = c.activity.load(Ordering::Relaxed) & IN_FLIGHT != 0;
                by_peer.entry(&c.peer).or_default().push((busy, id));
            }
        }
        // Each caller's connections (in flight or not, and id) and weight.
        type Group<'a> = (&'a SpiffeId, Vec<(bool, u64)>, u64);
        let mut groups: Vec<Group<'_>> = by_peer
            .into_iter()
            .map(|(peer, conns)| {
                let held = open.holders.get(peer).map_or(0, |(h, _)| h.held());
                let weight = weight(conns.len(), held);
                (peer, conns, weight)
            })
            .collect();
        for (_, conns, _) in &mut groups {
            // Popped from the end: busy last, oldest last.
            conns.sort_unstable_by_key(|&(busy, id)| (std::cmp::Reverse(busy), id));
        }
        let mut most: BinaryHeap<(u64, usize)> = groups
            .iter()
            .enumerate()
            .map(|(i, (_, conns, w))| (conns.len() as u64 * w, i))
            .collect();
        let mut chosen = Vec::with_capacity(n.min(open.by_id.len()));
        let mut from = Vec::new();
        while chosen.len() < n {
            let Some((_, i)) = most.pop() else { break };
            let (peer, conns, w) = &mut groups[i];
            if let Some((_, id)) = conns.pop() {
                chosen.push(id);
                if !from.contains(*peer) {
                    from.push((*peer).clone());
                }
            }
            if !conns.is_empty() {
                most.push((conns.len() as u64 * *w, i));
            }
        }
        drop(groups);
        for id in &chosen {
            if let Some(c) = open.by_id.get(id) {
                c.close.cancel();
            }
        }
        for peer in from {
            if !open.shed_from.contains(&peer) {
                open.shed_from.push(peer);
            }
        }
        chosen.len()
    }

    /// Memory is back under its limit: callers shed from may connect again.
    fn calm(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.shed_from.clear();
    }

    /// Connections closed as they registered since the last call, if any.
    fn take_refused(&self) -> Option<u64> {
        let n = self.refused.swap(0, Ordering::Relaxed);
        (n > 0).then_some(n)
    }
}

/// What one of a caller's connections counts for when choosing whom to
/// shed from, in thousandths of a connection: one, plus its share of the
/// caller's requests in flight (`memory::Holder`: heads, and what each
/// request holds besides) in units of an idle connection's heap. A caller
/// spreading a flood over many identities, one connection each, then
/// weighs more than a caller with a few idle pooled connections (round 6:
/// the pooled caller was shed first, by count).
fn weight(conns: usize, held: u64) -> u64 {
    const IDLE_CONNECTION: u64 = 50 * 1024;
    let per_conn = held / (conns.max(1) as u64);
    1000 + per_conn.saturating_mul(1000) / IDLE_CONNECTION
}

/// The bits of an activity word that count requests in flight
/// (`http::server::PROGRESS` counts above them).
const IN_FLIGHT: u64 = crate::http::server::PROGRESS - 1;

impl Registered {
    /// Resolves when the connection is to be closed.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    /// The caller's share of the memory budget, shared by all its
    /// connections.
    pub fn holder(&self) -> Arc<Holder> {
        self.holder.clone()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut open = self.callers.open.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = open.by_id.remove(&self.id) else {
            return;
        };
        if let Some((_, conns)) = open.holders.get_mut(&c.peer) {
            *conns -= 1;
            if *conns == 0 {
                open.holders.remove(&c.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deny_list_change_closes_only_the_connections_it_names() {
        let callers = Arc::new(Callers::default());
        let web: SpiffeId = "spiffe://t.test/ns/a/sa/web".parse().unwrap();
        let ops: SpiffeId = "spiffe://t.test/ns/a/sa/ops".parse().unwrap();
        let a = callers.register(&web, "0a", Activity::default());
        let b = callers.register(&web, "0b", Activity::default());
        let c = callers.register(&ops, "0a", Activity::default());
        // A deny entry by serial, for web's first certificate only.
        assert_eq!(callers.close(|p, s| p == &web && s == "0a"), 1);
        let closed = |r: &Registered| r.close.is_cancelled();
        assert!(closed(&a) && !closed(&b) && !closed(&c));
        tokio::time::timeout(std::time::Duration::from_secs(1), a.closed())
            .await
            .expect("woken");
        // Counted once; entries go with their connections.
        assert_eq!(callers.close(|p, _| p == &web), 1);
        drop((a, b, c));
        assert!(callers.is_empty());
    }

    #[test]
    fn shedding_takes_from_the_caller_with_the_most_idle_ones_first() {
        let callers = Arc::new(Callers::default());
        let flood: SpiffeId = "spiffe://t.test/ns/a/sa/flood".parse().unwrap();
        let web: SpiffeId = "spiffe://t.test/ns/a/sa/web".parse().unwrap();
        let ops: SpiffeId = "spiffe://t.test/ns/a/sa/ops".parse().unwrap();
        let busy = || Activity::new(AtomicU64::new(1));
        // flood: 6 connections, the first two with a request in flight.
        let f: Vec<Registered> = (0..6)
            .map(|i| {
                let a = if i < 2 { busy() } else { Activity::default() };
                callers.register(&flood, "01", a)
            })
            .collect();
        let w: Vec<Registered> = (0..3)
            .map(|_| callers.register(&web, "02", Activity::default()))
            .collect();
        let o = callers.register(&ops, "03", busy());
        let closed = |r: &Registered| r.close.is_cancelled();
        assert_eq!((callers.open(), callers.largest()), (10, 6));
        // Three: flood's three newest idle ones; web is not yet level.
        assert_eq!(callers.shed(3), 3);
        assert_eq!(
            f.iter().map(closed).collect::<Vec<_>>(),
            [false, false, false, true, true, true]
        );
        assert!(!w.iter().any(closed) && !closed(&o));
        // Two more: flood and web are level at 3 and 3; one from each
        // (flood's last idle one, web's newest), in either order.
        assert_eq!(callers.shed(2), 2);
        assert!(closed(&f[2]) && closed(&w[2]));
        assert!(!closed(&f[0]) && !closed(&f[1]) && !closed(&o));
        assert_eq!(callers.largest(), 2);
        // More than are open: all of them, the busy ones last.
        assert_eq!(callers.shed(100), 5);
        assert!(f.iter().chain(&w).all(closed) && closed(&o));
        // Until calm, a new connection of a caller shed from is closed as
        // it registers, and counted; after, it is not.
        let again = callers.register(&flood, "01", Activity::default());
        assert!(closed(&again));
        assert_eq!(callers.take_refused(), Some(1));
        assert_eq!(callers.take_refused(), None);
        callers.calm();
        let after = callers.register(&flood, "01", Activity::default());
        assert!(!closed(&after));
    }

    #[test]
    fn a_caller_with_requests_in_flight_is_shed_before_a_larger_idle_pool() {
        let callers = Arc::new(Callers::default());
        let pool: SpiffeId = "spiffe://t.test/ns/a/sa/pool".parse().unwrap();
        let closed = |r: &Registered| r.close.is_cancelled();
        // A legitimate caller's three idle pooled connections.
        let p: Vec<Registered> = (0..3)
            .map(|_| callers.register(&pool, "01", Activity::default()))
            .collect();
        // Eight identities of one flood, one connection each, each with
        // 100 requests in flight (about 4 KiB charged apiece).
        let f: Vec<Registered> = (0..8)
            .map(|i| {
                let id: SpiffeId = format!("spiffe://t.test/ns/a/sa/f{i}").parse().unwrap();
                let r = callers.register(&id, "02", Activity::new(AtomicU64::new(100)));
                r.holder().charge_for_test(100 * 4200);
                r
            })
            .collect();
        // By count the pool went first; weighed, the flood does.
        assert_eq!(callers.shed(8), 8);
        assert!(f.iter().all(closed), "the flood's connections stay open");
        assert!(!p.iter().any(closed), "the pool was shed");
        // Then the pool, once nothing heavier is left.
        assert_eq!(callers.shed(1), 1);
        assert!(p.iter().any(closed));
    }
}
