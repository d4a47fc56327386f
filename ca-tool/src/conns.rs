//! The API listener's connections (`keyproof-ca serve --listen`): how many
//! may be open, from one client address and in all, who gives way when the
//! table is full, and when an open connection counts as idle.
//!
//! Bootstrap needs no client certificate, so every pod (and anything else
//! that reaches the Service) may open connections. Without bounds, one
//! client holding idle sockets would lock every workload out of renewal.
//! So:
//!
//! - One client address holds at most `per_ip` connections: a further one
//!   from it evicts that address's own oldest connection that has nothing
//!   in flight, or is refused when every one of them is busy. An address
//!   only ever competes with itself.
//! - At [`ConnTable::max`] in all, a new connection evicts the connection
//!   that is most plausibly abandoned: one with nothing in flight, first
//!   those that never made a request (still handshaking, or silent since),
//!   then those without a client certificate, the oldest activity first.
//!   A connection with a request in flight is never evicted.
//! - Every connection is closed once it has had nothing in flight for
//!   [`ConnTable::idle`] (see [`ConnState::idle`]); `serve` drives that.
//!
//! Every close and refusal is counted in
//! `keyproof_ca_connections_closed_total{reason}` and the open connections
//! in `keyproof_ca_connections_open` (see [`crate::metrics`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::CaMetrics;

/// One open connection as the table sees it.
pub struct ConnState {
    ip: IpAddr,
    /// Requests in flight (from the request's head to its answer's head).
    streams: AtomicU32,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// When it opened, or a request last started or ended
    /// ([`ConnTable::now`]).
    last_active: AtomicU64,
    /// The peer presented a client certificate the handshake verified.
    authenticated: AtomicBool,
    /// Set when the table evicted it.
    evicted: AtomicBool,
    /// Wakes the connection's task when it is evicted.
    evict: Notify,
}

impl ConnState {
    /// The handshake verified a client certificate.
    pub fn set_authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }

    /// Resolves once the table evicted this connection.
    pub async fn evicted(&self) {
        // `notify_one` stores a permit, so an eviction before the first
        // poll is not missed; the flag covers a spurious wake.
        while !self.evicted.load(Ordering::Acquire) {
            self.evict.notified().await;
        }
    }
}

/// Marks a request in flight on a connection until dropped (hold it in the
/// request's service future, until its answer is produced).
pub struct InFlight {
    table: Arc<ConnTable>,
    conn: Arc<ConnState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn
            .last_active
            .store(self.table.now(), Ordering::Relaxed);
        self.conn.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address holds `per_ip` connections, each with a request in
    /// flight.
    PerIp,
    /// The table is full of connections with requests in flight.
    Full,
}

impl Refused {
    /// The `reason` label of `keyproof_ca_connections_closed_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::PerIp => "refused_per_ip",
            Refused::Full => "refused_full",
        }
    }
}

struct Open {
    conns: HashMap<u64, Arc<ConnState>>,
    per_ip: HashMap<IpAddr, usize>,
}

/// The API listener's open connections (see the module doc).
pub struct ConnTable {
    max: usize,
    per_ip: usize,
    idle: Duration,
    open: Mutex<Open>,
    next: AtomicU64,
    epoch: Instant,
    metrics: Arc<CaMetrics>,
}

/// A connection's place in the table, given up when dropped.
pub struct Slot {
    table: Arc<ConnTable>,
    id: u64,
    /// What the table knows of the connection.
    pub conn: Arc<ConnState>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.remove(self.id, &self.conn);
    }
}

impl Slot {
    /// Marks a request in flight until the guard is dropped.
    pub fn request(&self) -> InFlight {
        self.conn.requests.fetch_add(1, Ordering::Relaxed);
        self.conn.streams.fetch_add(1, Ordering::AcqRel);
        self.conn
            .last_active
            .store(self.table.now(), Ordering::Relaxed);
        InFlight {
            table: self.table.clone(),
            conn: self.conn.clone(),
        }
    }

    /// Resolves once the connection has had no request in flight for the
    /// table's idle timeout (measured from the last request's start or end,
    /// or from the connection's opening).
    pub async fn idle(&self) {
        loop {
            let last = self.conn.last_active.load(Ordering::Relaxed);
            let since = Duration::from_micros(self.table.now().saturating_sub(last));
            if self.conn.streams.load(Ordering::Acquire) == 0 && since >= self.table.idle {
                return;
            }
            // A request in flight ends with a new `last_active`: look again
            // a whole period after whatever is latest.
            tokio::time::sleep(
                self.table
                    .idle
                    .saturating_sub(since)
                    .max(self.table.idle / 4),
            )
            .await;
        }
    }
}

impl ConnTable {
    /// A table of at most `max` connections, `per_ip` from one address
    /// (0: no per-address bound), closing a connection after `idle` with
    /// nothing in flight.
    pub fn new(max: usize, per_ip: usize, idle: Duration, metrics: Arc<CaMetrics>) -> Arc<Self> {
        Arc::new(ConnTable {
            max: max.max(1),
            per_ip,
            idle,
            open: Mutex::new(Open {
                conns: HashMap::new(),
                per_ip: HashMap::new(),
            }),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        })
    }

    /// The most connections open at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How long a connection may have nothing in flight.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Microseconds since the table was made: a cheap, ordered stamp.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Takes a slot for a new connection from `ip`, evicting another
    /// connection when `ip` or the table is at its bound (see the module
    /// doc); refused when there is nothing that may be evicted.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = open.per_ip.get(&ip).copied().unwrap_or(0);
        if self.per_ip > 0 && from_ip >= self.per_ip {
            match self.victim(&open, Some(ip)) {
                Some(id) => self.evict(&mut open, id),
                None => {
                    self.metrics.connection_closed(Refused::PerIp.reason());
                    return Err(Refused::PerIp);
                }
            }
        }
        if open.conns.len() >= self.max {
            match self.victim(&open, None) {
                Some(id) => self.evict(&mut open, id),
                None => {
                    self.metrics.connection_closed(Refused::Full.reason());
                    return Err(Refused::Full);
                }
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnState {
            ip,
            streams: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            last_active: AtomicU64::new(self.now()),
            authenticated: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        open.conns.insert(id, conn.clone());
        *open.per_ip.entry(ip).or_insert(0) += 1;
        self.metrics.set_connections_open(open.conns.len());
        Ok(Slot {
            table: self.clone(),
            id,
            conn,
        })
    }

    /// The connection to evict (of `ip` only, if given): nothing in
    /// flight; never used before used, unauthenticated before
    /// authenticated, then the longest inactive (ids grow with time: the
    /// older of a tie).
    fn victim(&self, open: &Open, ip: Option<IpAddr>) -> Option<u64> {
        open.conns
            .iter()
            .filter(|(_, c)| match ip {
                Some(ip) => c.ip == ip,
                None => true,
            })
            .filter(|(_, c)| c.streams.load(Ordering::Acquire) == 0)
            .min_by_key(|(id, c)| {
                (
                    c.requests.load(Ordering::Relaxed) > 0,
                    c.authenticated.load(Ordering::Relaxed),
                    c.last_active.load(Ordering::Relaxed),
                    **id,
                )
            })
            .map(|(id, _)| *id)
    }

    fn evict(&self, open: &mut Open, id: u64) {
        if let Some(conn) = open.conns.remove(&id) {
            Self::forget_ip(open, conn.ip);
            conn.evicted.store(true, Ordering::Release);
            conn.evict.notify_one();
            self.metrics.connection_closed("evicted");
            tracing::debug!(
                peer_ip = %conn.ip,
                requests = conn.requests.load(Ordering::Relaxed),
                authenticated = conn.authenticated.load(Ordering::Relaxed),
                "API connections at a limit; closing an idle one"
            );
        }
    }

    fn forget_ip(open: &mut Open, ip: IpAddr) {
        if let Some(n) = open.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&ip);
            }
        }
    }

    /// A closed connection's slot (already gone if it was evicted).
    fn remove(&self, id: u64, conn: &Arc<ConnState>) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.conns.get(&id).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            open.conns.remove(&id);
            Self::forget_ip(&mut open, conn.ip);
        }
        self.metrics.set_connections_open(open.conns.len());
    }

    /// Open connections now.
    pub fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .conns
            .len()
    }

    /// True when no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn table(max: usize, per_ip: usize) -> Arc<ConnTable> {
        ConnTable::new(
            max,
            per_ip,
            Duration::from_millis(200),
            Arc::new(CaMetrics::new(false)),
        )
    }

    #[test]
    fn one_address_only_ever_evicts_its_own_connections() {
        let t = table(100, 3);
        let other = t.admit(ip(2)).unwrap();
        let mine: Vec<Slot> = (0..3).map(|_| t.admit(ip(1)).unwrap()).collect();
        // The first of the address's connections has a request in flight.
        let busy = mine[0].request();
        let fourth = t.admit(ip(1)).unwrap();
        assert!(
            mine[1].conn.evicted.load(Ordering::Relaxed),
            "its oldest idle one goes"
        );
        assert!(!mine[0].conn.evicted.load(Ordering::Relaxed));
        assert!(!other.conn.evicted.load(Ordering::Relaxed));
        assert_eq!(t.len(), 4);
        // Every one of its connections busy: the next is refused.
        let _b2 = mine[2].request();
        let _b3 = fourth.request();
        assert_eq!(t.admit(ip(1)).err(), Some(Refused::PerIp));
        assert!(t.admit(ip(3)).is_ok());
        drop(busy);
        assert!(t.admit(ip(1)).is_ok(), "an idle one may be evicted again");
        let text = String::from_utf8(t.metrics.render()).unwrap();
        assert!(
            text.contains("keyproof_ca_connections_closed_total{reason=\"refused_per_ip\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keyproof_ca_connections_closed_total{reason=\"evicted\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn a_full_table_evicts_the_unused_and_unauthenticated_first_and_never_a_busy_one() {
        let t = table(4, 0);
        let used_auth = t.admit(ip(1)).unwrap();
        used_auth.conn.set_authenticated();
        drop(used_auth.request());
        let used = t.admit(ip(2)).unwrap();
        drop(used.request());
        let silent_auth = t.admit(ip(3)).unwrap();
        silent_auth.conn.set_authenticated();
        let silent = t.admit(ip(4)).unwrap();
        let evicted = |s: &Slot| s.conn.evicted.load(Ordering::Relaxed);
        // Newcomers that at once authenticate and make a request.
        let newcomer = || {
            let s = t.admit(ip(5)).unwrap();
            s.conn.set_authenticated();
            drop(s.request());
            s
        };
        let _n1 = newcomer();
        assert!(evicted(&silent), "never used, no certificate: first");
        let _n2 = newcomer();
        assert!(evicted(&silent_auth), "then never used");
        let _n3 = newcomer();
        assert!(evicted(&used), "then no certificate");
        assert!(!evicted(&used_auth));
        assert_eq!(t.len(), 4);
        // All busy: refused, nothing evicted.
        let busy: Vec<InFlight> = [&used_auth, &_n1, &_n2, &_n3]
            .iter()
            .map(|s| s.request())
            .collect();
        assert_eq!(t.admit(ip(6)).err(), Some(Refused::Full));
        assert_eq!(t.len(), 4);
        drop(busy);
        // A closed connection frees its slot.
        drop(_n3);
        assert_eq!(t.len(), 3);
        // An evicted connection's slot is not freed twice.
        drop(silent);
        assert_eq!(t.len(), 3);
    }

    #[tokio::test]
    async fn idle_counts_from_the_last_request_and_never_while_one_is_in_flight() {
        let t = table(4, 0);
        let s = t.admit(ip(1)).unwrap();
        let start = Instant::now();
        s.idle().await;
        assert!(start.elapsed() >= Duration::from_millis(200));
        let guard = s.request();
        let in_flight = tokio::time::timeout(Duration::from_millis(500), s.idle()).await;
        assert!(in_flight.is_err(), "idle while a request is in flight");
        drop(guard);
        let ended = Instant::now();
        s.idle().await;
        assert!(ended.elapsed() >= Duration::from_millis(200));
        assert!(ended.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn an_evicted_connection_is_woken() {
        let t = table(1, 0);
        let s = t.admit(ip(1)).unwrap();
        let _n = t.admit(ip(2)).unwrap();
        tokio::time::timeout(Duration::from_secs(1), s.conn.evicted())
            .await
            .expect("woken");
    }
}
