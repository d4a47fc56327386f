//! Nonces: `base64url(id[16] || expires_be32 || mac[16])` (48 characters) with
//! `mac = HMAC-SHA256(process_secret, id || expires || peer_spki_sha256 || route_id)[..16]`,
//! and the table of issued, not yet used nonces.
//!
//! The MAC lets a forged, expired or foreign nonce be refused by arithmetic
//! alone, before any table look-up; the table is what makes a nonce single-use.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use aws_lc_rs::hmac;
use aws_lc_rs::rand::SecureRandom;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use subtle::ConstantTimeEq;

/// Length of the random nonce id.
pub const ID_LEN: usize = 16;
/// Length of the truncated MAC.
pub const MAC_LEN: usize = 16;
/// Length of the raw nonce (id, expiry, MAC).
pub const RAW_LEN: usize = ID_LEN + 4 + MAC_LEN;
/// Length of the encoded nonce: 36 bytes in base64url, no padding needed.
pub const ENCODED_LEN: usize = 48;

/// The random id identifying a nonce in the table.
pub type NonceId = [u8; ID_LEN];

/// A nonce whose MAC checked out for the given peer and route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedNonce {
    /// Table key.
    pub id: NonceId,
    /// Expiry, seconds since the Unix epoch.
    pub expires: u32,
}

/// The per-process nonce MAC key. Random at start, never persisted: a restart
/// invalidates every outstanding nonce, which fails safe (callers are simply
/// challenged again).
pub struct NonceKey {
    key: hmac::Key,
}

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("NonceKey(..)")
    }
}

impl NonceKey {
    /// A fresh random process secret.
    pub fn generate(rng: &dyn SecureRandom) -> Result<NonceKey, aws_lc_rs::error::Unspecified> {
        let mut secret = [0u8; 32];
        rng.fill(&mut secret)?;
        Ok(NonceKey::from_secret(&secret))
    }

    /// From explicit key material (tests only need this; production uses
    /// [`NonceKey::generate`]).
    pub fn from_secret(secret: &[u8]) -> NonceKey {
        NonceKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn mac(
        &self,
        id: &NonceId,
        expires: u32,
        peer_spki_sha256: &[u8; 32],
        route_id: &str,
    ) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(id);
        ctx.update(&expires.to_be_bytes());
        ctx.update(peer_spki_sha256);
        // route_id is last, so its variable length cannot make two different
        // (peer, route) pairs collide.
        ctx.update(route_id.as_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        out
    }

    /// Encodes a nonce for `id` expiring at `expires`, bound to the peer and route.
    pub fn seal(
        &self,
        id: &NonceId,
        expires: u32,
        peer_spki_sha256: &[u8; 32],
        route_id: &str,
    ) -> String {
        let mut out = String::with_capacity(ENCODED_LEN);
        self.seal_into(id, expires, peer_spki_sha256, route_id, &mut out);
        out
    }

    /// [`NonceKey::seal`], appending the nonce to `out`.
    pub fn seal_into(
        &self,
        id: &NonceId,
        expires: u32,
        peer_spki_sha256: &[u8; 32],
        route_id: &str,
        out: &mut String,
    ) {
        let mut raw = [0u8; RAW_LEN];
        raw[..ID_LEN].copy_from_slice(id);
        raw[ID_LEN..ID_LEN + 4].copy_from_slice(&expires.to_be_bytes());
        raw[ID_LEN + 4..].copy_from_slice(&self.mac(id, expires, peer_spki_sha256, route_id));
        URL_SAFE_NO_PAD.encode_string(raw, out);
    }

    /// Decodes `nonce` and checks its MAC for this peer and route (constant
    /// time). `None` means forged, foreign (other peer/route/process) or
    /// not a nonce at all. Expiry is the caller's check.
    pub fn open(
        &self,
        nonce: &str,
        peer_spki_sha256: &[u8; 32],
        route_id: &str,
    ) -> Option<OpenedNonce> {
        if nonce.len() != ENCODED_LEN {
            return None;
        }
        let mut raw = [0u8; RAW_LEN];
        let n = URL_SAFE_NO_PAD.decode_slice(nonce, &mut raw).ok()?;
        if n != RAW_LEN {
            return None;
        }
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&raw[..ID_LEN]);
        let mut exp = [0u8; 4];
        exp.copy_from_slice(&raw[ID_LEN..ID_LEN + 4]);
        let expires = u32::from_be_bytes(exp);
        let expected = self.mac(&id, expires, peer_spki_sha256, route_id);
        if bool::from(expected.ct_eq(&raw[ID_LEN + 4..])) {
            Some(OpenedNonce { id, expires })
        } else {
            None
        }
    }
}

/// Why no nonce could be issued. The table never evicts a live nonce to make
/// room: eviction is how replay caches get beaten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// The process-wide bound is reached: answer 503 with `Retry-After`.
    #[error("step-up nonce table is full; retry after {retry_after_secs} s")]
    GlobalFull {
        /// Suggested `Retry-After`, seconds (a nonce lifetime: by then every
        /// outstanding nonce has expired).
        retry_after_secs: u32,
    },
    /// This peer has too many unused nonces: answer 429.
    #[error("too many outstanding step-up nonces for this peer; retry after {retry_after_secs} s")]
    PeerFull {
        /// Suggested `Retry-After`, seconds.
        retry_after_secs: u32,
    },
    /// The system random generator failed (fail closed).
    #[error("random generator failure")]
    Rng,
    /// A header value could not be encoded (not expected to happen).
    #[error("challenge header encoding failed")]
    Encoding,
}

impl IssueError {
    /// The HTTP status the verifier should answer with: 503 when the table
    /// is full globally, 429 when this peer is at its bound, 500 otherwise.
    pub fn http_status(&self) -> http::StatusCode {
        match self {
            IssueError::GlobalFull { .. } => http::StatusCode::SERVICE_UNAVAILABLE,
            IssueError::PeerFull { .. } => http::StatusCode::TOO_MANY_REQUESTS,
            IssueError::Rng | IssueError::Encoding => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Value for `Retry-After`, when one applies.
    pub fn retry_after_secs(&self) -> Option<u32> {
        match self {
            IssueError::GlobalFull { retry_after_secs }
            | IssueError::PeerFull { retry_after_secs } => Some(*retry_after_secs),
            IssueError::Rng | IssueError::Encoding => None,
        }
    }
}

/// Hasher for nonce ids: the ids are 128 bits from the system CSPRNG and only
/// this process inserts them (look-ups happen after the MAC check), so their
/// first 8 bytes already are a uniform hash; SipHash would only cost time.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
    fn write_usize(&mut self, _: usize) {
        // The slice length prefix of `[u8; 16]` is constant: ignore it.
    }
}

/// One outstanding nonce: 12 bytes of value beside its 16-byte key, no heap.
#[derive(Clone, Copy)]
struct Entry {
    expires: u32,
    peer: u32,
    /// Milliseconds from issue to `expires` (the expiry has whole
    /// seconds): when it was issued, for the audit's nonce age.
    lead_ms: u32,
}

type Shard = HashMap<NonceId, Entry, BuildHasherDefault<IdHasher>>;

struct PeerSlot {
    spki_sha256: [u8; 32],
    count: u32,
}

/// Per-peer counters. A peer with no outstanding nonce has no slot, so the
/// number of slots is bounded by the global bound.
#[derive(Default)]
struct Peers {
    index: HashMap<[u8; 32], u32>,
    slots: Vec<PeerSlot>,
    free: Vec<u32>,
}

impl Peers {
    fn release(&mut self, idx: u32, n: u32) {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        slot.count = slot.count.saturating_sub(n);
        if slot.count == 0 {
            let key = slot.spki_sha256;
            self.index.remove(&key);
            self.free.push(idx);
        }
    }
}

const SHARDS: usize = 32;

/// Issued, not yet used nonces, bounded globally and per peer.
///
/// Memory per outstanding nonce is a 24-byte hash-map slot plus control byte
/// (about 50 bytes with hashbrown's load factor); see
/// `examples/nonce_memory.rs` for the measurement at 1,000,000 entries.
pub struct NonceTable {
    shards: Box<[Mutex<Shard>]>,
    peers: Mutex<Peers>,
    outstanding: AtomicUsize,
    max_outstanding: usize,
    max_per_peer: usize,
    retry_after_secs: u32,
    /// Last time (Unix seconds) a full sweep ran; sweeps on a full table are
    /// rate-limited to one per second so a full table cannot be turned into a
    /// CPU amplifier.
    last_sweep: AtomicU64,
}

impl std::fmt::Debug for NonceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceTable")
            .field("outstanding", &self.len())
            .field("max_outstanding", &self.max_outstanding)
            .field("max_per_peer", &self.max_per_peer)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a table lock cannot leave an entry half-written
    // (every mutation is a single map operation), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NonceTable {
    /// A table bounded to `max_outstanding` nonces overall and `max_per_peer`
    /// per peer; `retry_after_secs` is what a refusal suggests.
    pub fn new(max_outstanding: usize, max_per_peer: usize, retry_after_secs: u32) -> NonceTable {
        NonceTable {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            peers: Mutex::new(Peers::default()),
            outstanding: AtomicUsize::new(0),
            max_outstanding,
            max_per_peer,
            retry_after_secs,
            last_sweep: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: &NonceId) -> &Mutex<Shard> {
        // The last byte is independent of the 8 bytes the in-shard hash uses.
        &self.shards[id[ID_LEN - 1] as usize % SHARDS]
    }

    /// Number of issued, unused nonces (including expired ones not yet purged).
    pub fn len(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// True when no nonce is outstanding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reserves a slot for `peer`, counting it globally and per peer.
    fn reserve(&self, peer: &[u8; 32]) -> Result<u32, IssueError> {
        let mut peers = lock(&self.peers);
        if self.outstanding.load(Ordering::Relaxed) >= self.max_outstanding {
            return Err(IssueError::GlobalFull {
                retry_after_secs: self.retry_after_secs,
            });
        }
        let idx = match peers.index.get(peer) {
            Some(&idx) => idx,
            None => {
                let idx = match peers.free.pop() {
                    Some(idx) => {
                        peers.slots[idx as usize] = PeerSlot {
                            spki_sha256: *peer,
                            count: 0,
                        };
                        idx
                    }
                    None => {
                        let idx = u32::try_from(peers.slots.len()).map_err(|_| {
                            IssueError::GlobalFull {
                                retry_after_secs: self.retry_after_secs,
                            }
                        })?;
                        peers.slots.push(PeerSlot {
                            spki_sha256: *peer,
                            count: 0,
                        });
                        idx
                    }
                };
                peers.index.insert(*peer, idx);
                idx
            }
        };
        let slot = &mut peers.slots[idx as usize];
        if slot.count as usize >= self.max_per_peer {
            if slot.count == 0 {
                // max_per_peer == 0: do not keep an empty slot around.
                peers.release(idx, 0);
            }
            return Err(IssueError::PeerFull {
                retry_after_secs: self.retry_after_secs,
            });
        }
        slot.count += 1;
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Ok(idx)
    }

    /// Issues a new random id for `peer`, expiring at `expires` (Unix
    /// seconds), and stores it with its time of issue, `issued_ms` (Unix
    /// milliseconds). When a bound is reached, expired entries are purged
    /// (at most once a second, by `now`, Unix seconds) and the issue
    /// retried once; live nonces are never evicted.
    pub fn issue(
        &self,
        rng: &dyn SecureRandom,
        peer: &[u8; 32],
        expires: u32,
        now: u64,
        issued_ms: u64,
    ) -> Result<NonceId, IssueError> {
        let lead_ms = u32::try_from((u64::from(expires) * 1000).saturating_sub(issued_ms))
            .unwrap_or(u32::MAX);
        let idx = match self.reserve(peer) {
            Ok(idx) => idx,
            Err(e @ (IssueError::Rng | IssueError::Encoding)) => return Err(e),
            Err(full) => {
                let last = self.last_sweep.load(Ordering::Relaxed);
                if now > last
                    && self
                        .last_sweep
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    self.purge_expired(now);
                    self.reserve(peer)?
                } else {
                    return Err(full);
                }
            }
        };
        loop {
            let mut id = [0u8; ID_LEN];
            if rng.fill(&mut id).is_err() {
                lock(&self.peers).release(idx, 1);
                self.outstanding.fetch_sub(1, Ordering::Relaxed);
                return Err(IssueError::Rng);
            }
            let mut shard = lock(self.shard(&id));
            // A 128-bit collision is practically impossible, but never
            // overwrite (that would silently drop a live nonce).
            if let std::collections::hash_map::Entry::Vacant(v) = shard.entry(id) {
                v.insert(Entry {
                    expires,
                    peer: idx,
                    lead_ms,
                });
                return Ok(id);
            }
        }
    }

    /// When `id` was issued (Unix milliseconds), while it is outstanding.
    pub fn issued_ms(&self, id: &NonceId) -> Option<u64> {
        let e = *lock(self.shard(id)).get(id)?;
        Some((u64::from(e.expires) * 1000).saturating_sub(u64::from(e.lead_ms)))
    }

    /// Atomically removes `id`. True if it was outstanding (the caller may
    /// accept the request); false means replay. Exactly one of any number of
    /// concurrent callers for the same id gets true.
    pub fn take(&self, id: &NonceId) -> bool {
        let removed = lock(self.shard(id)).remove(id);
        match removed {
            Some(entry) => {
                // Shard lock is released before the peers lock: `reserve`
                // holds peers then shard is never taken under it, so no cycle.
                lock(&self.peers).release(entry.peer, 1);
                self.outstanding.fetch_sub(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Removes every nonce that expired before `now`; returns how many.
    /// The proxy may call this periodically; issuing also calls it when full.
    pub fn purge_expired(&self, now: u64) -> usize {
        let mut total = 0;
        let mut per_peer: HashMap<u32, u32> = HashMap::new();
        for shard in self.shards.iter() {
            {
                let mut shard = lock(shard);
                shard.retain(|_, e| {
                    if u64::from(e.expires) < now {
                        *per_peer.entry(e.peer).or_insert(0) += 1;
                        false
                    } else {
                        true
                    }
                });
            }
            if !per_peer.is_empty() {
                let mut peers = lock(&self.peers);
                for (idx, n) in per_peer.drain() {
                    peers.release(idx, n);
                    self.outstanding.fetch_sub(n as usize, Ordering::Relaxed);
                    total += n as usize;
                }
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;

    const PEER_A: [u8; 32] = [1; 32];
    const PEER_B: [u8; 32] = [2; 32];

    #[test]
    fn nonce_round_trip_and_binding() {
        let k = NonceKey::from_secret(b"test secret");
        let id = [7u8; 16];
        let n = k.seal(&id, 1000, &PEER_A, "/admin");
        assert_eq!(n.len(), ENCODED_LEN);
        assert_eq!(
            k.open(&n, &PEER_A, "/admin"),
            Some(OpenedNonce { id, expires: 1000 })
        );
        assert_eq!(k.open(&n, &PEER_B, "/admin"), None);
        assert_eq!(k.open(&n, &PEER_A, "/admin2"), None);
        assert_eq!(
            NonceKey::from_secret(b"other").open(&n, &PEER_A, "/admin"),
            None
        );
        // Tampered expiry.
        let mut raw = URL_SAFE_NO_PAD.decode(&n).unwrap();
        raw[16] ^= 1;
        assert_eq!(
            k.open(&URL_SAFE_NO_PAD.encode(raw), &PEER_A, "/admin"),
            None
        );
        assert_eq!(k.open("short", &PEER_A, "/admin"), None);
        assert_eq!(k.open(&"!".repeat(48), &PEER_A, "/admin"), None);
    }

    #[test]
    fn bounds_fail_closed_and_release() {
        let rng = SystemRandom::new();
        let t = NonceTable::new(3, 2, 30);
        let a1 = t.issue(&rng, &PEER_A, 100, 10, 10000).unwrap();
        let _a2 = t.issue(&rng, &PEER_A, 100, 10, 10000).unwrap();
        assert!(matches!(
            t.issue(&rng, &PEER_A, 100, 10, 10000),
            Err(IssueError::PeerFull { .. })
        ));
        let _b1 = t.issue(&rng, &PEER_B, 100, 10, 10000).unwrap();
        assert!(matches!(
            t.issue(&rng, &PEER_B, 100, 10, 10000),
            Err(IssueError::GlobalFull { .. })
        ));
        assert_eq!(t.len(), 3);
        assert!(t.take(&a1));
        assert!(!t.take(&a1));
        assert_eq!(t.len(), 2);
        t.issue(&rng, &PEER_A, 100, 10, 10000).unwrap();
        // Nothing expired yet (expires 100, now 50): still full, nothing evicted.
        assert!(t.issue(&rng, &PEER_B, 100, 50, 50000).is_err());
        assert_eq!(t.len(), 3);
        // After expiry the full table purges and issues again.
        t.issue(&rng, &PEER_B, 300, 200, 200000).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(lock(&t.peers).index.len(), 1);
    }

    #[test]
    fn the_time_of_issue_is_kept_to_the_millisecond_while_outstanding() {
        let rng = SystemRandom::new();
        let t = NonceTable::new(10, 10, 30);
        // Issued at 70.940 s, expiring at 100 s: the expiry alone says 70.
        let id = t.issue(&rng, &PEER_A, 100, 70, 70_940).unwrap();
        assert_eq!(t.issued_ms(&id), Some(70_940));
        assert!(t.take(&id));
        assert_eq!(t.issued_ms(&id), None);
        // A time after the expiry (a clock step) reads as issued at it.
        let id = t.issue(&rng, &PEER_A, 100, 70, 100_500).unwrap();
        assert_eq!(t.issued_ms(&id), Some(100_000));
    }
}
