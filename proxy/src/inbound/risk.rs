//! Risk rules: per request on a `step_up = "risk"` route, whether the caller
//! must answer a fresh challenge, or is refused.
//!
//! The state behind the rules is one table of caller identities
//! ([`RiskTable`]), bounded: when it is full the least recently seen
//! identity with no live refusal and no lockout is forgotten (never one
//! with either: that would wave it past `after_failure`, or lift its
//! lock). Forgetting is safe in one direction only, and that is the
//! direction it goes: a forgotten caller is new again (`new_peer` fires),
//! and its `rate_above` rules fire until a window has passed since callers
//! were last forgotten (its requests were lost with it); a caller that
//! cannot be tracked at all (no place could be freed) is treated as new,
//! fast and recently refused. What is not known raises a challenge, never
//! a denial: assumed rates and refusals fire `challenge` rules only.
//!
//! The table is split into shards (each a `Mutex`) so that requests of
//! different callers rarely wait for each other; the bound is global and
//! exact, the choice of whom to forget is made within the newcomer's shard,
//! among at most [`SCAN`] of its least recently seen (so admitting a caller
//! costs the same however large the table).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, HeaderValue};
use keyproof_identity::SpiffeId;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use crate::config::{HeaderTest, RiskAction, RiskCondition, RiskRuleConfig, RouteConfig};
use crate::metrics::Metrics;

/// Wall-clock time of a request, in milliseconds since the Unix epoch
/// (rates need better than seconds; `hours` needs the time of day).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Now(pub u64);

impl Now {
    /// The system clock.
    pub fn system() -> Now {
        Now(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0))
    }
}

/// Why a caller's refusal is recorded (all feed `after_failure`;
/// bad handshakes do not feed `failures_above`: a certificate is public, and
/// anyone holding a copy could lock its owner out).
///
/// Only refusals that a well-behaved caller's sidecar does not produce are
/// recorded: an expired nonce, or one the inbound can no longer open after a
/// restart rotated its key, is the mesh's doing, not the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A step-up verification refused (bad signature, replay, ...).
    StepUp,
    /// A 403 from the route policy or the deny list.
    Forbidden,
    /// A TLS handshake that presented this identity, with a chain that
    /// verified, and failed. It only ever marks an identity the table
    /// already tracks: anyone can put any identity in a certificate.
    Handshake,
}

/// A shard holds about this many identities (fewer shards for a small
/// table, so that a small bound is an exact least-recently-seen order).
const SHARD_TARGET: usize = 512;
/// At most this many shards (10,000,000 identities, the configured
/// maximum, make about 10,000 per shard).
const MAX_SHARDS: usize = 1024;
/// At most this many of a shard's least recently seen identities are looked
/// at to find one to forget (those passed over, locked out or with live
/// refusals, move to the front, so the next search sees others).
const SCAN: usize = 64;
/// End of a list in [`Shard`].
const NIL: u32 = u32::MAX;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent at every step a panic could interrupt.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A `failures_above` rule as the table applies it when a refusal is
/// recorded (the lock starts at the refusal that crosses the threshold).
#[derive(Debug)]
struct FailRule {
    name: Arc<str>,
    count: u32,
    window: u64,
}

/// What the table applies of the current policy (swapped whole on a
/// reload, read without a lock).
#[derive(Debug, Default)]
struct Applied {
    /// The `failures_above` rules listed by the policy's risk routes.
    fail_rules: Box<[FailRule]>,
    /// Refusal times kept per identity: the largest N+1 of them.
    ring_cap: usize,
    /// The longest window of any listed rule that looks at refusals: older
    /// ones are no longer live. 0: no rule does, refusals are not recorded.
    horizon: u64,
    /// Fingerprints of the policy's risk routes; per-route state of any
    /// other route is dropped when an identity's state next grows.
    routes: Box<[u64]>,
}

/// Sub-windows a `rate_above` window is counted in.
const SUBS: u64 = 8;

/// Requests of one caller on one route for one `rate_above` rule, counted
/// in [`SUBS`] + 1 sub-windows of a [`SUBS`]th of the window each: the
/// current one and the [`SUBS`] before it always cover the whole window
/// ending now, so a request within it is never left out (a sliding window
/// estimated from two fixed ones, weighting the earlier one by how much of
/// it is still covered, let a burst at the end of one fixed window and
/// another early in the next pass at nearly twice the rate). A request up
/// to one sub-window older than the window may still count (sub-windows
/// are rounded up to a millisecond): the error is only ever a challenge.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    /// The sub-window being counted (time / sub-window length).
    slot: u64,
    /// Requests per sub-window, `slot` at `slot % (SUBS + 1)`.
    counts: [u32; SUBS as usize + 1],
}

impl Window {
    /// Counts one request at `now` and says whether it makes more than `n`
    /// within the `window` ending at `now`.
    fn count(&mut self, now: u64, n: u64, window: u64) -> bool {
        let sub = window.div_ceil(SUBS).max(1);
        let slot = now / sub;
        // A time before the current sub-window (threads interleaving)
        // counts in it.
        if slot > self.slot {
            if slot - self.slot > SUBS {
                self.counts = Default::default();
            } else {
                for s in self.slot + 1..=slot {
                    self.counts[(s % (SUBS + 1)) as usize] = 0;
                }
            }
            self.slot = slot;
        }
        let seen: u64 = self.counts.iter().map(|c| u64::from(*c)).sum();
        // Every attempt counts, a refused one too: a caller that keeps
        // going faster than the rate keeps being challenged.
        let i = (self.slot % (SUBS + 1)) as usize;
        self.counts[i] = self.counts[i].saturating_add(1);
        seen + 1 > n
    }

    /// `self`, a window of `was` ms, as a window of `now_window` ms at
    /// `now` (a reload changed the rule's window): what it still counts
    /// moves into the current sub-window, as if just made. Counting
    /// requests as later than they were only ever fires sooner.
    fn carried(&self, was: u64, now_window: u64, now: u64) -> Window {
        if was == now_window {
            return *self;
        }
        let old_sub = was.div_ceil(SUBS).max(1);
        let live = (now / old_sub).saturating_sub(self.slot) <= SUBS;
        let seen: u64 = self.counts.iter().map(|c| u64::from(*c)).sum();
        let mut w = Window {
            slot: now / now_window.div_ceil(SUBS).max(1),
            ..Window::default()
        };
        if live {
            w.counts[(w.slot % (SUBS + 1)) as usize] = u32::try_from(seen).unwrap_or(u32::MAX);
        }
        w
    }
}

/// One route's state for one identity.
#[derive(Debug)]
struct RouteState {
    /// The route's fingerprint ([`RouteRisk::fingerprint`]).
    route: u64,
    /// Where the route is ([`RouteRisk::place`]): a reload that changes
    /// the route carries the state over from the one it replaces.
    place: u64,
    /// When the caller was last served here (`new_peer`).
    served: Option<u64>,
    /// One per `rate_above` rule of the route, in listed order.
    rates: Box<[Window]>,
    /// The rule of each window: its name's hash and its window in ms.
    rate_rules: Arc<[(u64, u64)]>,
}

/// What the table keeps of one caller identity.
#[derive(Debug)]
struct Ident {
    key: Arc<str>,
    /// When admitted after another caller was forgotten: the latest such
    /// time then. This caller may be one forgotten then, whose requests
    /// were lost with it: its `rate_above` rules fire until a window has
    /// passed since.
    forgotten_before: Option<u64>,
    /// The latest refusal of any kind (`after_failure`).
    last_failure: Option<u64>,
    /// The latest refusal that is not a handshake (`after_failure` with
    /// action deny: a copy of a certificate must not lock its owner out).
    last_refusal: Option<u64>,
    /// Times of the latest refusals that count for `failures_above`
    /// (not handshakes), oldest first; at most the longest N+1.
    failures: VecDeque<u64>,
    /// Lockouts: rule name and the end of its lock.
    locks: Vec<(Arc<str>, u64)>,
    routes: Vec<RouteState>,
}

impl Ident {
    fn new(key: Arc<str>, forgotten_before: Option<u64>) -> Ident {
        Ident {
            key,
            forgotten_before,
            last_failure: None,
            last_refusal: None,
            failures: VecDeque::new(),
            locks: Vec::new(),
            routes: Vec::new(),
        }
    }

    fn locked(&self, now: u64) -> bool {
        self.locks.iter().any(|(_, until)| *until > now)
    }

    fn locked_by(&self, rule: &str, now: u64) -> bool {
        self.locks
            .iter()
            .any(|(name, until)| &**name == rule && *until > now)
    }

    fn lock(&mut self, rule: &Arc<str>, until: u64) {
        match self.locks.iter_mut().find(|(name, _)| name == rule) {
            Some(l) => l.1 = until,
            None => self.locks.push((rule.clone(), until)),
        }
    }

    /// Whether a refusal of the caller itself (a step-up refused, a 403:
    /// it held its key) is recent enough that a rule still sees it; such
    /// a caller is never forgotten. A failed handshake does not count:
    /// anyone can present any identity's certificate, and would otherwise
    /// keep identities in the table at will, until it is full and every
    /// other caller goes untracked.
    fn failing(&self, now: u64, horizon: u64) -> bool {
        self.last_refusal
            .is_some_and(|f| now < f.saturating_add(horizon))
    }

    /// Refusals (not handshakes) within the `window` ending at `now`.
    fn failures_within(&self, now: u64, window: u64) -> usize {
        // Times are pushed in arrival order; threads may interleave a
        // little, so count every entry rather than stop at the first old
        // one.
        self.failures
            .iter()
            .filter(|f| now.saturating_sub(**f) < window)
            .count()
    }

    /// The index of `rr`'s state, created when missing (and then the
    /// states of routes the current policy no longer has dropped). A route
    /// a reload changed takes over the state of the one it replaced at
    /// its place: when the caller was last served, and the requests each
    /// `rate_above` rule of the same name counted.
    fn route_state(&mut self, rr: &RouteRisk, applied: &ArcSwap<Applied>, now: u64) -> usize {
        if let Some(i) = self.routes.iter().position(|r| r.route == rr.fingerprint) {
            return i;
        }
        let live = applied.load();
        let before = self
            .routes
            .iter()
            .position(|r| r.place == rr.place && !live.routes.contains(&r.route))
            .map(|i| self.routes.swap_remove(i));
        self.routes.retain(|r| live.routes.contains(&r.route));
        let rates = rr
            .rate_rules
            .iter()
            .map(|(name, window)| {
                before
                    .as_ref()
                    .and_then(|b| {
                        let k = b.rate_rules.iter().position(|(n, _)| n == name)?;
                        Some(b.rates[k].carried(b.rate_rules[k].1, *window, now))
                    })
                    .unwrap_or_default()
            })
            .collect();
        self.routes.push(RouteState {
            route: rr.fingerprint,
            place: rr.place,
            served: before.and_then(|b| b.served),
            rates,
            rate_rules: rr.rate_rules.clone(),
        });
        self.routes.len() - 1
    }

    /// Records a refusal at `now` and locks the identity out under every
    /// `failures_above` rule it now crosses.
    fn refused(&mut self, kind: Failure, now: u64, applied: &Applied) {
        self.last_failure = Some(self.last_failure.map_or(now, |f| f.max(now)));
        if kind == Failure::Handshake {
            return;
        }
        self.last_refusal = Some(self.last_refusal.map_or(now, |f| f.max(now)));
        self.failures.push_back(now);
        while self.failures.len() > applied.ring_cap
            || self
                .failures
                .front()
                .is_some_and(|f| f.saturating_add(applied.horizon) <= now)
        {
            self.failures.pop_front();
        }
        self.locks.retain(|(_, until)| *until > now);
        for r in applied.fail_rules.iter() {
            if !self.locked_by(&r.name, now)
                && self.failures_within(now, r.window) > r.count as usize
            {
                self.lock(&r.name, now.saturating_add(r.window));
            }
        }
    }
}

#[derive(Debug)]
struct Node {
    /// Towards the most recently seen.
    prev: u32,
    /// Towards the least recently seen.
    next: u32,
    id: Ident,
}

/// Part of the table: identities by name, and their order of last use.
#[derive(Debug)]
struct Shard {
    index: HashMap<Arc<str>, u32>,
    nodes: Vec<Node>,
    /// Most recently seen.
    head: u32,
    /// Least recently seen.
    tail: u32,
}

impl Shard {
    fn new() -> Shard {
        Shard {
            index: HashMap::new(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.nodes[o as usize].prev = i,
        }
        self.head = i;
    }

    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// Whom to forget, among at most [`SCAN`] of the least recently seen:
    /// the first with no live refusal and no lock. Never one with either:
    /// forgetting a lock would lift it, and forgetting refusals would wave
    /// the caller past `after_failure` and give it `failures_above` tries
    /// afresh. Failed handshakes alone do not keep a caller ([`Ident::failing`]):
    /// forgetting them lifts an `after_failure` challenge early, the price
    /// of a table strangers cannot fill. The others looked at move to the front, so that a tail of
    /// locked or failing callers does not make every search fail; when
    /// none qualifies, the newcomer goes untracked (and is challenged).
    fn victim(&mut self, now: u64, horizon: u64) -> Option<u32> {
        let mut i = self.tail;
        for _ in 0..SCAN {
            if i == NIL {
                break;
            }
            let n = &self.nodes[i as usize];
            let prev = n.prev;
            if !n.id.locked(now) && !n.id.failing(now, horizon) {
                return Some(i);
            }
            self.touch(i);
            i = prev;
        }
        None
    }
}

/// The table's metrics (registered once: the table outlives reloads).
#[derive(Debug)]
struct TableMetrics {
    tracked: IntGauge,
    evictions: IntCounter,
    untracked: IntCounter,
    risk_denied: IntCounterVec,
    deny_list: IntCounterVec,
}

/// The per-identity risk state of the whole process. It outlives policy
/// reloads: failures and lockouts survive them, and so does the per-route
/// state (when each caller was last served, request rates): a route the
/// new policy has unchanged keeps its own, a changed one (the same path
/// prefix and methods) takes over the one it replaces, each `rate_above`
/// window by rule name.
pub struct RiskTable {
    max_identities: usize,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Identities held, all shards (never above `max_identities`).
    len: AtomicUsize,
    /// When a caller was last forgotten (ms; 0: never).
    last_forgotten: AtomicU64,
    /// What the latest policy asks of the table.
    applied: ArcSwap<Applied>,
    metrics: TableMetrics,
}

impl std::fmt::Debug for RiskTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RiskTable")
            .field("max_identities", &self.max_identities)
            .field("shards", &self.shards.len())
            .field("tracked", &self.tracked())
            .finish_non_exhaustive()
    }
}

impl RiskTable {
    /// A table of at most `max_identities` callers; registers its metrics
    /// (`keyproof_risk_tracked_identities`, `keyproof_risk_evictions_total`,
    /// `keyproof_risk_untracked_total`, `keyproof_risk_denied_total` and
    /// `keyproof_deny_list_refused_total`), so one table per registry.
    pub fn new(
        max_identities: usize,
        metrics: &Metrics,
    ) -> Result<Arc<RiskTable>, prometheus::Error> {
        let max_identities = max_identities.max(1);
        let tracked = IntGauge::new(
            "keyproof_risk_tracked_identities",
            "Caller identities whose risk state is kept ([inbound.stepup] max_tracked_identities bounds it).",
        )?;
        let evictions = IntCounter::new(
            "keyproof_risk_evictions_total",
            "Caller identities forgotten to make room for another (a forgotten caller is new again).",
        )?;
        let untracked = IntCounter::new(
            "keyproof_risk_untracked_total",
            "Risk evaluations and records of a caller that could not be tracked (no place could be freed); it counts as new.",
        )?;
        let risk_denied = IntCounterVec::new(
            Opts::new(
                "keyproof_risk_denied_total",
                "Requests refused (403) by a risk rule with action deny, by route path_prefix and rule.",
            ),
            &["route", "rule"],
        )?;
        let deny_list = IntCounterVec::new(
            Opts::new(
                "keyproof_deny_list_refused_total",
                "Requests refused (403) by the inbound deny list, by entry (SPIFFE ID pattern or serial:<hex>).",
            ),
            &["entry"],
        )?;
        metrics.register(Box::new(tracked.clone()))?;
        metrics.register(Box::new(evictions.clone()))?;
        metrics.register(Box::new(untracked.clone()))?;
        metrics.register(Box::new(risk_denied.clone()))?;
        metrics.register(Box::new(deny_list.clone()))?;
        let shards = (max_identities / SHARD_TARGET).clamp(1, MAX_SHARDS);
        Ok(Arc::new(RiskTable {
            max_identities,
            shards: (0..shards).map(|_| Mutex::new(Shard::new())).collect(),
            hasher: RandomState::new(),
            len: AtomicUsize::new(0),
            last_forgotten: AtomicU64::new(0),
            applied: ArcSwap::from_pointee(Applied::default()),
            metrics: TableMetrics {
                tracked,
                evictions,
                untracked,
                risk_denied,
                deny_list,
            },
        }))
    }

    /// Records a refusal of `peer`. A [`Failure::Handshake`] only marks an
    /// identity already tracked: it never admits one (nor makes another
    /// forgotten for it).
    pub fn record_failure(&self, peer: &str, kind: Failure, now: Now) {
        let applied = self.applied.load();
        if applied.horizon == 0 {
            // No rule looks at refusals.
            return;
        }
        let now = now.0;
        if kind == Failure::Handshake {
            let mut shard = lock(self.shard(peer));
            if let Some(&i) = shard.index.get(peer) {
                shard.nodes[i as usize].id.refused(kind, now, &applied);
            }
            return;
        }
        self.with_ident(peer, now, |id| {
            if let Some(id) = id {
                id.refused(kind, now, &applied);
            }
        });
    }

    /// Identities currently tracked.
    pub fn tracked(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The child of `keyproof_deny_list_refused_total` for one deny list
    /// entry (its label: the pattern or `serial:<hex>`). The counter lives
    /// here because, like the table, it outlives policy reloads.
    pub fn deny_list_refused(&self, entry: &str) -> IntCounter {
        self.metrics.deny_list.with_label_values(&[entry])
    }

    /// Makes the table serve the policy whose risk routes are `routes`
    /// (called once the policy is built): refusals are recorded for the
    /// rules those routes list (and no longer for rules none lists), and
    /// per-route state of routes not among them is dropped as identities
    /// are next touched. Lockouts already set stay until they end.
    pub fn apply<'a>(&self, routes: impl IntoIterator<Item = &'a RouteRisk>) {
        let mut fail_rules: Vec<FailRule> = Vec::new();
        let mut fingerprints = Vec::new();
        let (mut horizon, mut ring_cap) = (0u64, 0usize);
        for route in routes {
            fingerprints.push(route.fingerprint);
            for r in route.rules.iter() {
                match r.test {
                    Test::AfterFailure(w) | Test::AfterRefusal(w) => {
                        horizon = horizon.max(w.max(1))
                    }
                    Test::FailuresAbove { count, window } => {
                        horizon = horizon.max(window.max(1));
                        ring_cap = ring_cap.max(
                            usize::try_from(count)
                                .unwrap_or(usize::MAX)
                                .saturating_add(1),
                        );
                        if !fail_rules.iter().any(|f| f.name == r.name) {
                            fail_rules.push(FailRule {
                                name: r.name.clone(),
                                count,
                                window,
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
        self.applied.store(Arc::new(Applied {
            fail_rules: fail_rules.into_boxed_slice(),
            ring_cap,
            horizon,
            routes: fingerprints.into_boxed_slice(),
        }));
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        let i = if self.shards.len() == 1 {
            0
        } else {
            // The remainder is below the shard count, which fits.
            (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
        };
        &self.shards[i]
    }

    /// Runs `f` on `key`'s state, admitting it (and forgetting another if
    /// the table is full) when it is not tracked; `None` when it cannot be.
    fn with_ident<R>(&self, key: &str, now: u64, f: impl FnOnce(Option<&mut Ident>) -> R) -> R {
        let mut shard = lock(self.shard(key));
        let i = match shard.index.get(key) {
            Some(&i) => {
                shard.touch(i);
                Some(i)
            }
            None => self.admit(&mut shard, key, now),
        };
        match i {
            Some(i) => f(Some(&mut shard.nodes[i as usize].id)),
            None => {
                self.metrics.untracked.inc();
                f(None)
            }
        }
    }

    fn admit(&self, shard: &mut Shard, key: &str, now: u64) -> Option<u32> {
        // Whether this may be a caller forgotten earlier: any was.
        let forgotten_before = match self.last_forgotten.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        };
        let room = self
            .len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_identities).then_some(n + 1)
            })
            .is_ok();
        let i = if room {
            let Some(i) = u32::try_from(shard.nodes.len()).ok().filter(|i| *i != NIL) else {
                self.len.fetch_sub(1, Ordering::Relaxed);
                return None;
            };
            shard.nodes.push(Node {
                prev: NIL,
                next: NIL,
                id: Ident::new(Arc::from(key), forgotten_before),
            });
            self.metrics.tracked.inc();
            i
        } else {
            let i = shard.victim(now, self.applied.load().horizon)?;
            shard.unlink(i);
            // The newcomer may itself be one forgotten a moment ago.
            self.last_forgotten.fetch_max(now.max(1), Ordering::Relaxed);
            let old = std::mem::replace(
                &mut shard.nodes[i as usize].id,
                Ident::new(Arc::from(key), Some(now.max(1))),
            );
            shard.index.remove(&old.key);
            self.metrics.evictions.inc();
            i
        };
        let key = shard.nodes[i as usize].id.key.clone();
        shard.index.insert(key, i);
        shard.push_front(i);
        Some(i)
    }
}

/// The outcome of a route's risk rules for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No rule fired.
    Pass,
    /// A `challenge` rule fired (its name; the first listed wins).
    Challenge(Arc<str>),
    /// A `deny` rule fired (its name): 403.
    Deny(Arc<str>),
}

/// What header rules read of one request: its fields, and its authority
/// (HTTP/2's `:authority`, or an HTTP/1.1 absolute-form target), which the
/// listeners keep out of the fields and the app still receives as `Host`.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// The request's header fields.
    pub headers: &'a HeaderMap,
    /// The request's authority, when its URI has one.
    pub authority: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// The fields and the authority of `req`.
    pub fn of<B>(req: &'a http::Request<B>) -> Fields<'a> {
        Fields {
            headers: req.headers(),
            authority: req.uri().authority().map(|a| a.as_str()),
        }
    }
}

impl<'a> From<&'a HeaderMap> for Fields<'a> {
    fn from(headers: &'a HeaderMap) -> Fields<'a> {
        Fields {
            headers,
            authority: None,
        }
    }
}

/// A rule compiled for evaluation: times in milliseconds.
#[derive(Debug)]
enum Test {
    NewPeer(u64),
    /// A sliding window of `window` ms: more than `n` requests fire.
    Rate {
        slot: usize,
        n: u64,
        window: u64,
    },
    Header(HeaderRule),
    AfterFailure(u64),
    /// `after_failure` of a `deny` rule: handshakes do not count.
    AfterRefusal(u64),
    Hours {
        start: u16,
        end: u16,
    },
    FailuresAbove {
        count: u32,
        window: u64,
    },
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    action: RiskAction,
    test: Test,
    /// `keyproof_risk_denied_total{route, rule}`, for `deny` rules.
    denied: Option<IntCounter>,
}

/// One route's compiled risk rules (`risk = [...]`).
pub struct RouteRisk {
    table: Arc<RiskTable>,
    /// Identifies the route's configuration (path prefix, methods, mode
    /// and the rules it lists), so that per-route state carries over a
    /// reload that leaves the route as it was.
    fingerprint: u64,
    /// Identifies where the route is (path prefix and methods): a changed
    /// route takes over the per-route state of the one it replaces there.
    place: u64,
    rules: Box<[Rule]>,
    /// Each `rate_above` rule's name (hashed) and window in ms, in slot
    /// order (each has a slot in the route state).
    rate_rules: Arc<[(u64, u64)]>,
    /// Whether any rule needs the caller's state (else the table is not
    /// touched at all).
    stateful: bool,
    /// Whether `new_peer` is listed (else `served` records nothing).
    needs_served: bool,
    /// The fields header rules read (lowercase, `-` for `_`); `None`
    /// when no rule reads one.
    header_fields: Option<Arc<[Box<str>]>>,
}

impl std::fmt::Debug for RouteRisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteRisk")
            .field("fingerprint", &self.fingerprint)
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Whether `now` falls in `[start, end)` minutes of the UTC day (wrapping
/// midnight when `start > end`).
fn in_hours(now: u64, start: u16, end: u16) -> bool {
    // Below 1440, so it fits.
    let minute = ((now / 60_000) % 1440) as u16;
    if start < end {
        (start..end).contains(&minute)
    } else {
        minute >= start || minute < end
    }
}

/// A `header` rule as requests are matched against it. The field is read
/// in every spelling the listeners treat as one name (any case, `_`, `.`
/// or other punctuation for `-`: many app frameworks map them to one
/// variable, see `owned::same_name`), and a field value is
/// read as the list RFC 9110 makes of it (`US, KP` in one field is two
/// values): whichever way the app reads it, the rule sees it too.
#[derive(Debug)]
struct HeaderRule {
    /// Lowercase, `-` for any punctuation.
    name: Box<str>,
    /// The configured name, for the one lookup when no other spelling
    /// exists.
    exact: HeaderName,
    /// Whether the name has a `-` (so other spellings exist).
    spellings: bool,
    /// Whether the field is `Host`: the request's authority is its value
    /// too.
    host: bool,
    test: HeaderMatch,
}

#[derive(Debug)]
enum HeaderMatch {
    Present,
    Above(Limit),
    /// ASCII case-insensitive.
    Equals(Box<str>),
    /// ASCII case-insensitive.
    OneOf(Box<[Box<str>]>),
}

impl HeaderRule {
    fn new(name: &HeaderName, test: &HeaderTest) -> HeaderRule {
        // Punctuation as `-`: the rule reads the field in every spelling an
        // app may read as it (`owned::same_name`).
        let canonical: String = name
            .as_str()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let host = canonical == "host";
        // A host is compared as a host: the configured one as well.
        let want = |v: &str| -> Box<str> {
            if host {
                String::from_utf8_lossy(host_part(v.as_bytes())).into()
            } else {
                v.into()
            }
        };
        HeaderRule {
            spellings: canonical.contains('-'),
            host,
            name: canonical.into_boxed_str(),
            exact: name.clone(),
            test: match test {
                HeaderTest::Present => HeaderMatch::Present,
                HeaderTest::Above(n) => HeaderMatch::Above(Limit::of(*n)),
                HeaderTest::Equals(v) => HeaderMatch::Equals(want(v)),
                HeaderTest::OneOf(vs) => HeaderMatch::OneOf(vs.iter().map(|v| want(v)).collect()),
            },
        }
    }

    /// Whether a request field named `name` is this rule's field.
    fn reads(&self, name: &[u8]) -> bool {
        crate::http::owned::same_name(name, &self.name)
    }

    /// The values of the rule's field in `f`, in every spelling (and, for
    /// `Host`, the authority: a caller may send either, or both).
    fn values<'h>(&'h self, f: Fields<'h>) -> impl Iterator<Item = &'h [u8]> + 'h {
        // Without a `-` the one spelling is the exact (lowercase) name:
        // a hashed lookup rather than a pass over every field.
        let h = f.headers;
        let (exact, any) = if self.spellings {
            (None, Some(h.iter()))
        } else {
            (Some(h.get_all(&self.exact).iter()), None)
        };
        let authority = f.authority.filter(|_| self.host).map(str::as_bytes);
        // An app that trusts the sidecar as its proxy (as it must, to read
        // `X-Forwarded-For` right) takes its host from these: Express's
        // `req.hostname`, Django's `USE_X_FORWARDED_HOST`, Symfony's
        // trusted proxies, Werkzeug's `ProxyFix`. A caller writes them, so
        // a host rule reads them as hosts too.
        let forwarded = self.host.then(|| {
            h.iter()
                .filter(|(k, _)| {
                    crate::http::owned::same_name(k.as_str().as_bytes(), "x-forwarded-host")
                })
                .map(|(_, v)| v.as_bytes())
                .chain(
                    h.get_all(http::header::FORWARDED)
                        .iter()
                        .flat_map(|v| forwarded_hosts(v.as_bytes())),
                )
        });
        exact
            .into_iter()
            .flatten()
            .chain(
                any.into_iter()
                    .flatten()
                    .filter(|(k, _)| self.reads(k.as_str().as_bytes()))
                    .map(|(_, v)| v),
            )
            .map(HeaderValue::as_bytes)
            .chain(authority)
            .chain(forwarded.into_iter().flatten())
    }
}

/// `s` as an app may read it for a comparison: without what any of them
/// strips at either end. HTTP's whitespace, and also the bytes beyond ASCII
/// (a no-break space or NEL, in Latin-1 as WSGI and Node decode fields, or
/// in UTF-8), controls and double quotes: Python's `strip()` and
/// JavaScript's `trim()` remove Unicode whitespace, and a quoted string
/// reads as its contents to a structured-field parser. Rules only ever add
/// a challenge or a refusal, so reading `KP\xa0` or `"KP"` as `KP` errs on
/// the safe side; configured values are plain ASCII (the configuration
/// checks), so nothing trimmed here could be part of one.
fn trim_loose(s: &[u8]) -> &[u8] {
    let kept = |b: &u8| b.is_ascii_graphic() && *b != b'"';
    let start = s.iter().position(kept);
    let end = s.iter().rposition(kept);
    match (start, end) {
        (Some(a), Some(b)) => &s[a..=b],
        _ => &[],
    }
}

/// `s` without leading and trailing optional whitespace (space, tab).
fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = s.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(a), Some(b)) => &s[a..=b],
        _ => &[],
    }
}

/// The `host=` parameters of a `Forwarded` value (RFC 7239), as the laxest
/// parsers find them: Spring's `ForwardedHeaderUtils`, Reactor Netty and
/// Vert.x search each element for `host="?([^;,"]+)` anywhere, so
/// `xhost=a`, `for="host=a"` and an unterminated `host="a` are host `a` to
/// them. Every `host=` in the value counts (a rule only ever adds a
/// challenge or a refusal), case ignored.
fn forwarded_hosts(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    const KEY: &[u8] = b"host=";
    let mut at = 0;
    std::iter::from_fn(move || {
        while at + KEY.len() <= v.len() {
            let here = at;
            at += 1;
            if !v[here..here + KEY.len()].eq_ignore_ascii_case(KEY) {
                continue;
            }
            let rest = &v[here + KEY.len()..];
            let rest = rest.strip_prefix(b"\"").unwrap_or(rest);
            let end = rest
                .iter()
                .position(|b| matches!(b, b';' | b',' | b'"'))
                .unwrap_or(rest.len());
            return Some(&rest[..end]);
        }
        None
    })
}

/// The host of a `Host` value or an authority, as virtual hosts are told
/// apart: without userinfo, port or a final dot (`admin.internal.:443` is
/// `admin.internal`); an IPv6 literal keeps its brackets.
fn host_part(v: &[u8]) -> &[u8] {
    let v = trim_loose(v);
    // What a URL parser ends the authority at: an app that builds its URL
    // from a forwarded host (`new URL(path, "http://" + host)`) reads
    // `admin.example/x` as admin.example.
    let v = &v[..v
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#' | b'\\'))
        .unwrap_or(v.len())];
    let v = v
        .iter()
        .rposition(|b| *b == b'@')
        .map_or(v, |at| &v[at + 1..]);
    let host = if v.first() == Some(&b'[') {
        v.iter()
            .position(|b| *b == b']')
            .map_or(v, |end| &v[..=end])
    } else {
        // Whatever follows the first colon is the port, valid or not:
        // `admin.internal:x` is admin.internal to nginx and most frameworks.
        v.iter()
            .position(|b| *b == b':')
            .map_or(v, |colon| trim_loose(&v[..colon]))
    };
    host.strip_suffix(b".").unwrap_or(host)
}

/// Whether `v` (one field value) or one of its list elements equals `want`,
/// ignoring ASCII case; for the `Host` field (`host`), as hosts.
fn value_matches(v: &[u8], want: &str, host: bool) -> bool {
    if !host {
        return value_is(v, want);
    }
    let want = want.as_bytes();
    host_part(v).eq_ignore_ascii_case(want)
        || v.split(|b| *b == b',')
            .any(|el| host_part(el).eq_ignore_ascii_case(want))
}

/// Whether `v` (one field value) or one of its list elements equals `want`,
/// ignoring ASCII case. A `want` that is itself a list (`a, b`) is
/// compared element by element, however either spaces its commas.
fn value_is(v: &[u8], want: &str) -> bool {
    let want = want.as_bytes();
    if want.contains(&b',') {
        let mut got = v.split(|b| *b == b',').map(trim_loose);
        let mut wanted = want.split(|b| *b == b',').map(trim_ows);
        return loop {
            match (got.next(), wanted.next()) {
                (None, None) => break true,
                (Some(g), Some(w)) if g.eq_ignore_ascii_case(w) => {}
                _ => break false,
            }
        };
    }
    // An element with parameters (`application/xml; charset=utf-8`) is
    // also read as its part before them, as apps dispatch on a media type
    // (RFC 9110 section 5.6.6), unless `want` names parameters itself.
    let bare = |el: &[u8]| -> bool {
        let el = trim_loose(el);
        el.eq_ignore_ascii_case(want)
            || (!want.contains(&b';')
                && el
                    .split(|b| *b == b';')
                    .next()
                    .is_some_and(|t| trim_loose(t).eq_ignore_ascii_case(want)))
    };
    bare(v) || v.split(|b| *b == b',').any(bare)
}

/// A decimal number as text, normalized: `int` without leading zeros,
/// `frac` without trailing zeros, zero never negative. Compared exactly:
/// through `f64`, `10000.0000000000001` would round to 10000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Num<'a> {
    negative: bool,
    int: &'a [u8],
    frac: &'a [u8],
}

impl<'a> Num<'a> {
    /// `[+-]digits[.digits]` after trimming OWS; `None` for anything else
    /// (exponents, `inf`, `NaN`, thousands separators, lists...).
    fn parse(s: &'a [u8]) -> Option<Num<'a>> {
        let s = trim_ows(s);
        let (negative, s) = match s.first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let (int, frac) = match s.iter().position(|b| *b == b'.') {
            Some(dot) => (&s[..dot], &s[dot + 1..]),
            None => (s, &b""[..]),
        };
        let digits = |d: &[u8]| !d.is_empty() && d.iter().all(u8::is_ascii_digit);
        if !digits(int) || (s.len() > int.len() && !digits(frac)) {
            return None;
        }
        let int = &int[int.iter().position(|b| *b != b'0').unwrap_or(int.len())..];
        let frac = &frac[..frac.iter().rposition(|b| *b != b'0').map_or(0, |i| i + 1)];
        Some(Num {
            negative: negative && !(int.is_empty() && frac.is_empty()),
            int,
            frac,
        })
    }

    fn above(self, limit: Num<'_>) -> bool {
        use std::cmp::Ordering;
        let magnitude = self
            .int
            .len()
            .cmp(&limit.int.len())
            .then_with(|| self.int.cmp(limit.int))
            .then_with(|| self.frac.cmp(limit.frac));
        match (self.negative, limit.negative) {
            (false, true) => true,
            (true, false) => false,
            (false, false) => magnitude == Ordering::Greater,
            (true, true) => magnitude == Ordering::Less,
        }
    }
}

/// An `above` threshold: the configured number as its shortest decimal
/// text (what the operator wrote, for any number written with at most 17
/// significant digits).
#[derive(Debug)]
struct Limit {
    negative: bool,
    int: Box<[u8]>,
    frac: Box<[u8]>,
}

impl Limit {
    fn of(n: f64) -> Limit {
        // `Display` of a finite f64 is `-?digits(.digits)?`, never an
        // exponent; the configuration refuses non-finite numbers.
        let text = n.to_string();
        let (negative, digits) = match text.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, text.as_str()),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let int = int.trim_start_matches('0');
        let frac = frac.trim_end_matches('0');
        Limit {
            negative: negative && !(int.is_empty() && frac.is_empty()),
            int: int.as_bytes().into(),
            frac: frac.as_bytes().into(),
        }
    }

    fn num(&self) -> Num<'_> {
        Num {
            negative: self.negative,
            int: &self.int,
            frac: &self.frac,
        }
    }
}

/// Whether any of the request's values of the rule's field passes its test.
fn header_fires(fields: Fields<'_>, rule: &HeaderRule) -> bool {
    let mut values = rule.values(fields);
    match &rule.test {
        HeaderMatch::Present => values.next().is_some(),
        // A value that is not one number counts as above: whoever sends
        // "10,000", "1e9" or "5, 50000" must not slip under the threshold,
        // however the app reads it.
        HeaderMatch::Above(limit) => {
            values.any(|v| Num::parse(v).is_none_or(|n| n.above(limit.num())))
        }
        // A value with a byte outside ASCII counts as equal: apps compare
        // with case folds of their own (Go's `EqualFold` takes the Kelvin
        // sign for `k` and the long s for `s`; a Latin-1 `ß` is `SS` to
        // Java's, Python's and JavaScript's upper case), which no table
        // here could follow. Such a caller is challenged, never let under.
        HeaderMatch::Equals(want) => {
            values.any(|v| !v.is_ascii() || value_matches(v, want, rule.host))
        }
        HeaderMatch::OneOf(list) => values
            .any(|v| !v.is_ascii() || list.iter().any(|want| value_matches(v, want, rule.host))),
    }
}

impl RouteRisk {
    /// Identifies the route's path prefix, methods, mode and the rules it
    /// lists, as they are configured: equal across a reload that left them
    /// as they were.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Compiles `route`'s risk rules (its `risk` list, every name of which
    /// is in `rules`: the configuration checked that). The table applies
    /// them to refusals once [`RiskTable::apply`] is given the route.
    pub fn new(table: &Arc<RiskTable>, route: &RouteConfig, rules: &[RiskRuleConfig]) -> RouteRisk {
        let listed: Vec<&RiskRuleConfig> = route
            .risk
            .iter()
            .filter_map(|n| rules.iter().find(|r| &r.name == n))
            .collect();
        // The methods as the set of requests they match: their order or
        // repetition in the file says nothing about where the route is, and
        // HEAD beside GET adds nothing (GET covers it, `policy::covers`).
        let mut methods: Vec<&str> = route.methods.iter().map(|m| m.as_str()).collect();
        methods.sort_unstable();
        methods.dedup();
        if methods.contains(&"GET") {
            methods.retain(|m| *m != "HEAD");
        }
        // What the route does, not what it is called in the file or which
        // callers it allows: those change nothing the state is about.
        let mut what = format!(
            "{:?}\0{:?}\0{:?}",
            route.path_prefix, methods, route.step_up
        );
        for r in &listed {
            what.push('\0');
            what.push_str(&format!("{r:?}"));
        }
        let fingerprint = table.hasher.hash_one(&what);
        let place = table
            .hasher
            .hash_one(format!("{:?}\0{:?}", route.path_prefix, methods));
        let mut compiled = Vec::with_capacity(listed.len());
        let mut rate_rules = Vec::new();
        for r in listed {
            let test = match &r.condition {
                RiskCondition::NewPeer(w) => Test::NewPeer(millis(*w)),
                RiskCondition::RateAbove { count, window } => {
                    let window = millis(*window).max(1);
                    rate_rules.push((table.hasher.hash_one(&r.name), window));
                    Test::Rate {
                        slot: rate_rules.len() - 1,
                        n: u64::from((*count).max(1)),
                        window,
                    }
                }
                RiskCondition::Header { name, test } => Test::Header(HeaderRule::new(name, test)),
                RiskCondition::AfterFailure(w) if r.action == RiskAction::Deny => {
                    Test::AfterRefusal(millis(*w))
                }
                RiskCondition::AfterFailure(w) => Test::AfterFailure(millis(*w)),
                RiskCondition::Hours { start, end } => Test::Hours {
                    start: *start,
                    end: *end,
                },
                RiskCondition::FailuresAbove { count, window } => Test::FailuresAbove {
                    count: *count,
                    window: millis(*window),
                },
            };
            let denied = (r.action == RiskAction::Deny).then(|| {
                table
                    .metrics
                    .risk_denied
                    .with_label_values(&[route.path_prefix.as_str(), r.name.as_str()])
            });
            compiled.push(Rule {
                name: Arc::from(r.name.as_str()),
                action: r.action,
                test,
                denied,
            });
        }
        let stateful = compiled
            .iter()
            .any(|r| !matches!(r.test, Test::Header(_) | Test::Hours { .. }));
        let needs_served = compiled.iter().any(|r| matches!(r.test, Test::NewPeer(_)));
        let header_fields: Arc<[Box<str>]> = compiled
            .iter()
            .filter_map(|r| match &r.test {
                Test::Header(h) => Some(h.name.clone()),
                _ => None,
            })
            .collect();
        RouteRisk {
            table: table.clone(),
            fingerprint,
            place,
            rules: compiled.into_boxed_slice(),
            rate_rules: rate_rules.into(),
            stateful,
            needs_served,
            header_fields: (!header_fields.is_empty()).then_some(header_fields),
        }
    }

    /// Evaluates the rules for one request of `peer` (counting it towards
    /// `rate_above`). `deny` rules are checked first; a deny is counted
    /// (`keyproof_risk_denied_total{route, rule}`).
    pub fn evaluate<'a>(
        &self,
        peer: &SpiffeId,
        fields: impl Into<Fields<'a>>,
        now: Now,
    ) -> Verdict {
        let (fields, now) = (fields.into(), now.0);
        // The first firing rule of each action, in listed order. Every rule
        // is evaluated: each request counts towards every rate.
        let mut deny = None;
        let mut challenge = None;
        let mut note = |i: usize, action: RiskAction| {
            match action {
                RiskAction::Deny => deny.get_or_insert(i),
                RiskAction::Challenge => challenge.get_or_insert(i),
            };
        };
        let stateless = |t: &Test| match t {
            Test::Header(h) => Some(header_fires(fields, h)),
            Test::Hours { start, end } => Some(in_hours(now, *start, *end)),
            _ => None,
        };
        if self.stateful {
            self.table.with_ident(peer.as_str(), now, |id| match id {
                Some(id) => {
                    let ri = id.route_state(self, &self.table.applied, now);
                    for (i, r) in self.rules.iter().enumerate() {
                        if self
                            .fires(id, ri, r, now)
                            .or_else(|| stateless(&r.test))
                            .unwrap_or(false)
                        {
                            note(i, r.action);
                        } else if let Test::Rate { window, .. } = r.test {
                            // Requests it may have made before it was
                            // forgotten are not known: the rule fires, as a
                            // challenge whatever its action. Not a denial:
                            // every caller admitted after any eviction is
                            // such a one (the table does not keep whom it
                            // forgot), and a deny rule on the rate would
                            // refuse newcomers. Not a pass either: a caller
                            // a deny rule was refusing would get a fresh
                            // allowance, unproven, once pushed out.
                            if id
                                .forgotten_before
                                .is_some_and(|f| now < f.saturating_add(window))
                            {
                                note(i, RiskAction::Challenge);
                            }
                        }
                    }
                }
                None => {
                    // Untracked (the table is full of callers it may not
                    // forget): a caller with no history counts as new, and
                    // is challenged. Each rule that reads history fires as
                    // a challenge, never a denial: a `deny` rule on the
                    // rate or on refusals would otherwise lock out every
                    // newcomer while the table is full. A `new_peer` rule,
                    // if listed, is the reason: that is what it is.
                    for (i, r) in self.rules.iter().enumerate() {
                        if matches!(r.test, Test::NewPeer(_)) {
                            note(i, RiskAction::Challenge);
                        }
                    }
                    for (i, r) in self.rules.iter().enumerate() {
                        match r.test {
                            Test::NewPeer(_)
                            | Test::Rate { .. }
                            | Test::AfterFailure(_)
                            | Test::AfterRefusal(_)
                            | Test::FailuresAbove { .. } => note(i, RiskAction::Challenge),
                            _ => {
                                if stateless(&r.test).unwrap_or(false) {
                                    note(i, r.action);
                                }
                            }
                        }
                    }
                }
            });
        } else {
            for (i, r) in self.rules.iter().enumerate() {
                if stateless(&r.test).unwrap_or(false) {
                    note(i, r.action);
                }
            }
        }
        if let Some(i) = deny {
            let r = &self.rules[i];
            if let Some(c) = &r.denied {
                c.inc();
            }
            return Verdict::Deny(r.name.clone());
        }
        match challenge {
            Some(i) => Verdict::Challenge(self.rules[i].name.clone()),
            None => Verdict::Pass,
        }
    }

    /// A stateful rule's outcome for a tracked caller (`None` for the
    /// stateless ones), updating its state.
    fn fires(&self, id: &mut Ident, ri: usize, rule: &Rule, now: u64) -> Option<bool> {
        let name = &rule.name;
        Some(match rule.test {
            Test::NewPeer(w) => id.routes[ri]
                .served
                .is_none_or(|s| now.saturating_sub(s) >= w),
            Test::Rate { slot, n, window } => id.routes[ri].rates[slot].count(now, n, window),
            Test::AfterFailure(w) => id.last_failure.is_some_and(|f| now.saturating_sub(f) < w),
            Test::AfterRefusal(w) => id.last_refusal.is_some_and(|f| now.saturating_sub(f) < w),
            Test::FailuresAbove { count, window } => {
                if id.locked_by(name, now) {
                    true
                } else if !id.failures.is_empty()
                    && id.failures_within(now, window) > count as usize
                {
                    // Refusals recorded while no policy had this rule (or
                    // while an earlier lock held): locked from now.
                    id.lock(name, now.saturating_add(window));
                    true
                } else {
                    false
                }
            }
            Test::Header(_) | Test::Hours { .. } => return None,
        })
    }

    /// Records that `peer` was served on this route (`new_peer`).
    pub fn served(&self, peer: &SpiffeId, now: Now) {
        if !self.needs_served {
            return;
        }
        self.table.with_ident(peer.as_str(), now.0, |id| {
            if let Some(id) = id {
                let ri = id.route_state(self, &self.table.applied, now.0);
                id.routes[ri].served = Some(now.0);
            }
        });
    }

    /// Whether a rule of this route reads a request field named `name`
    /// (in any spelling it matches): such a field may not arrive later,
    /// in a trailer section, unevaluated.
    pub fn reads_header(&self, name: &[u8]) -> bool {
        self.header_fields.as_deref().is_some_and(|fields| {
            fields
                .iter()
                .any(|f| crate::http::owned::same_name(name, f))
        })
    }

    /// The fields this route's header rules read (lowercase, `-` for
    /// `_`; see [`crate::http::owned::remove_named`]), `None` when no rule
    /// reads one.
    pub fn header_fields(&self) -> Option<&Arc<[Box<str>]>> {
        self.header_fields.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::metric;
    use http::HeaderValue;

    const SEC: u64 = 1000;
    const MIN: u64 = 60 * SEC;
    const HOUR: u64 = 60 * MIN;
    /// 2026-01-01T00:00:00Z: a day boundary, so `hours` read plainly.
    const T0: u64 = 1_767_225_600_000;

    fn at(ms: u64) -> Now {
        Now(T0 + ms)
    }

    fn rule(name: &str, condition: RiskCondition, action: RiskAction) -> RiskRuleConfig {
        RiskRuleConfig {
            name: name.into(),
            condition,
            action,
        }
    }

    fn challenge(name: &str, condition: RiskCondition) -> RiskRuleConfig {
        rule(name, condition, RiskAction::Challenge)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// The rules every test can name.
    fn rules() -> Vec<RiskRuleConfig> {
        let h = |n: &str| HeaderName::from_bytes(n.as_bytes()).expect("name");
        vec![
            challenge("new", RiskCondition::NewPeer(secs(24 * 3600))),
            challenge(
                "burst",
                RiskCondition::RateAbove {
                    count: 3,
                    window: secs(1),
                },
            ),
            challenge(
                "big",
                RiskCondition::Header {
                    name: h("x-amount"),
                    test: HeaderTest::Above(10_000.0),
                },
            ),
            challenge(
                "kind",
                RiskCondition::Header {
                    name: h("x-kind"),
                    test: HeaderTest::OneOf(vec!["wire".into(), "cash".into()]),
                },
            ),
            challenge(
                "test",
                RiskCondition::Header {
                    name: h("x-test"),
                    test: HeaderTest::Equals("yes".into()),
                },
            ),
            challenge(
                "debug",
                RiskCondition::Header {
                    name: h("x-debug"),
                    test: HeaderTest::Present,
                },
            ),
            challenge("after", RiskCondition::AfterFailure(secs(15 * 60))),
            challenge(
                "night",
                RiskCondition::Hours {
                    start: 22 * 60,
                    end: 6 * 60,
                },
            ),
            challenge(
                "office",
                RiskCondition::Hours {
                    start: 9 * 60,
                    end: 17 * 60,
                },
            ),
            rule(
                "lockout",
                RiskCondition::FailuresAbove {
                    count: 5,
                    window: secs(15 * 60),
                },
                RiskAction::Deny,
            ),
            rule(
                "flood",
                RiskCondition::RateAbove {
                    count: 10,
                    window: secs(1),
                },
                RiskAction::Deny,
            ),
        ]
    }

    struct Fx {
        m: Metrics,
        table: Arc<RiskTable>,
        rules: Vec<RiskRuleConfig>,
        /// Every route built so far: the policy the table applies.
        built: std::cell::RefCell<Vec<Arc<RouteRisk>>>,
    }

    fn fx(max: usize) -> Fx {
        let m = Metrics::new().expect("metrics");
        let table = RiskTable::new(max, &m).expect("table");
        Fx {
            m,
            table,
            rules: rules(),
            built: Default::default(),
        }
    }

    fn route_config(index: usize, names: &[&str]) -> RouteConfig {
        RouteConfig {
            path_prefix: format!("/r{index}"),
            methods: Vec::new(),
            allow: Vec::new(),
            step_up: crate::config::StepUpMode::Risk,
            risk: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    impl Fx {
        /// Route `/r{index}` with the rules `names`, added to the policy
        /// the table applies.
        fn route(&self, index: usize, names: &[&str]) -> Arc<RouteRisk> {
            let r = Arc::new(RouteRisk::new(
                &self.table,
                &route_config(index, names),
                &self.rules,
            ));
            let mut built = self.built.borrow_mut();
            built.push(r.clone());
            self.table.apply(built.iter().map(|r| &**r));
            r
        }

        /// A reload: the policy becomes exactly these routes.
        fn reload(&self, routes: &[(usize, &[&str])]) -> Vec<Arc<RouteRisk>> {
            self.built.borrow_mut().clear();
            routes
                .iter()
                .map(|(i, names)| self.route(*i, names))
                .collect()
        }

        /// How many route states the table holds for `p`.
        fn route_states(&self, p: &SpiffeId) -> usize {
            let shard = lock(self.table.shard(p.as_str()));
            let i = shard.index[p.as_str()];
            shard.nodes[i as usize].id.routes.len()
        }

        fn metric(&self, series: &str) -> f64 {
            metric(&self.m, series)
        }
    }

    fn peer(n: usize) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://td/ns/a/sa/{n}")).expect("id")
    }

    fn none() -> HeaderMap {
        HeaderMap::new()
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_bytes(v.as_bytes()).expect("value"),
            );
        }
        h
    }

    fn ch(name: &str) -> Verdict {
        Verdict::Challenge(Arc::from(name))
    }

    fn deny(name: &str) -> Verdict {
        Verdict::Deny(Arc::from(name))
    }

    #[test]
    fn a_new_caller_is_challenged_until_served_within_the_window() {
        let f = fx(100);
        let r = f.route(0, &["new"]);
        let p = peer(1);
        assert_eq!(r.evaluate(&p, &none(), at(0)), ch("new"));
        // Challenged again until served: a signed resend is still new.
        assert_eq!(r.evaluate(&p, &none(), at(10)), ch("new"));
        r.served(&p, at(20));
        assert_eq!(r.evaluate(&p, &none(), at(30)), Verdict::Pass);
        assert_eq!(
            r.evaluate(&p, &none(), at(20 + 24 * HOUR - 1)),
            Verdict::Pass
        );
        // Served again just now: the window restarts.
        r.served(&p, at(20 + 24 * HOUR - 1));
        assert_eq!(r.evaluate(&p, &none(), at(48 * HOUR - 1)), Verdict::Pass);
        // A day without being served: new again.
        assert_eq!(r.evaluate(&p, &none(), at(20 + 48 * HOUR)), ch("new"));
        // Other callers are their own.
        assert_eq!(r.evaluate(&peer(2), &none(), at(40)), ch("new"));
    }

    #[test]
    fn served_counts_on_its_route_only() {
        let f = fx(100);
        let a = f.route(0, &["new"]);
        let b = f.route(1, &["new"]);
        let p = peer(1);
        a.served(&p, at(0));
        assert_eq!(a.evaluate(&p, &none(), at(1)), Verdict::Pass);
        assert_eq!(b.evaluate(&p, &none(), at(1)), ch("new"));
        // One identity, however many routes.
        assert_eq!(f.table.tracked(), 1);
    }

    #[test]
    fn a_reload_keeps_the_state_of_unchanged_and_changed_routes() {
        let f = fx(100);
        let a = f.route(0, &["new", "burst"]);
        let b = f.route(1, &["new"]);
        let p = peer(1);
        a.served(&p, at(0));
        b.served(&p, at(0));
        for t in [1, 2] {
            assert_eq!(a.evaluate(&p, &none(), at(t)), Verdict::Pass);
        }
        // A reload (say, a deny entry added during an incident): /r0 as it
        // was, /r1 with one more rule.
        let new = f.reload(&[(0, &["new", "burst"]), (1, &["new", "debug"])]);
        let (a1, b1) = (&new[0], &new[1]);
        // Unchanged: still served, and the rate goes on where it was.
        assert_eq!(a1.evaluate(&p, &none(), at(3)), Verdict::Pass);
        assert_eq!(a1.evaluate(&p, &none(), at(4)), ch("burst"));
        // Changed at the same place: what /r1 knew carries over (served).
        assert_eq!(b1.evaluate(&p, &none(), at(5)), Verdict::Pass);
        b1.served(&p, at(5));
        assert_eq!(b1.evaluate(&p, &none(), at(6)), Verdict::Pass);
        // A request still running on the old policy's /r1 finds its state
        // gone (taken over by the new /r1's: new, the safe side) and does
        // not touch the new one's; the old /r0 is the new /r0.
        assert_eq!(b.evaluate(&p, &none(), at(7)), ch("new"));
        assert_eq!(b1.evaluate(&p, &none(), at(7)), Verdict::Pass);
        assert_eq!(a.evaluate(&p, &none(), at(8)), ch("burst"));
        assert_eq!(f.route_states(&p), 3);
        // A reload without /r0: its state, and the old /r1's, go when the
        // caller's state next grows.
        let new = f.reload(&[(1, &["new", "debug"]), (2, &["new"])]);
        assert_eq!(new[0].evaluate(&p, &none(), at(9)), Verdict::Pass);
        assert_eq!(new[1].evaluate(&p, &none(), at(9)), ch("new"));
        assert_eq!(f.route_states(&p), 2);
        // The old /r0, still running somewhere, finds its state gone.
        assert_eq!(a.evaluate(&p, &none(), at(10)), ch("new"));
        assert_eq!(f.table.tracked(), 1);
    }

    #[test]
    fn a_reload_that_changes_a_rate_keeps_what_it_counted() {
        // Changing a rule must not hand every caller a fresh allowance.
        let mut f = fx(100);
        let burst = f
            .rules
            .iter()
            .position(|r| r.name == "burst")
            .expect("burst");
        let r = f.route(0, &["new", "burst"]);
        let p = peer(1);
        r.served(&p, at(0));
        for t in 0..3 {
            assert_eq!(r.evaluate(&p, &none(), at(t)), Verdict::Pass);
        }
        // The count only (3 to 4 in 1 s): one more passes, then it fires.
        f.rules[burst].condition = RiskCondition::RateAbove {
            count: 4,
            window: secs(1),
        };
        let r = f.reload(&[(0, &["new", "burst"])]).remove(0);
        assert_eq!(r.evaluate(&p, &none(), at(3)), Verdict::Pass);
        assert_eq!(r.evaluate(&p, &none(), at(4)), ch("burst"));
        // The window (1 s to 2 s): what it counted moves along, as if just
        // made, and holds for the new window.
        f.rules[burst].condition = RiskCondition::RateAbove {
            count: 4,
            window: secs(2),
        };
        let r = f.reload(&[(0, &["new", "burst"])]).remove(0);
        assert_eq!(r.evaluate(&p, &none(), at(900)), ch("burst"));
        assert_eq!(r.evaluate(&p, &none(), at(900 + 2 * SEC - 1)), ch("burst"));
        assert_eq!(r.evaluate(&p, &none(), at(900 + 5 * SEC)), Verdict::Pass);
        // Another rule's name is another count: nothing carries to it.
        f.rules[burst].name = "other".into();
        let r = f.reload(&[(0, &["new", "other"])]).remove(0);
        for t in 0..4 {
            assert_eq!(r.evaluate(&p, &none(), at(6 * SEC + t)), Verdict::Pass);
        }
    }

    #[test]
    fn a_reload_that_lists_the_same_methods_otherwise_keeps_what_it_counted() {
        use http::Method;
        let f = fx(100);
        let with = |methods: &[Method]| {
            let mut c = route_config(0, &["new", "burst"]);
            c.methods = methods.to_vec();
            let r = Arc::new(RouteRisk::new(&f.table, &c, &f.rules));
            f.table.apply([&*r]);
            r
        };
        let r = with(&[Method::GET, Method::POST]);
        let p = peer(1);
        r.served(&p, at(0));
        for t in 0..3 {
            assert_eq!(r.evaluate(&p, &none(), at(t)), Verdict::Pass);
        }
        // The same set, in another order and with a repeat: the same
        // place, so the 4th request in the second still fires.
        let r = with(&[Method::POST, Method::GET, Method::GET]);
        assert_eq!(r.evaluate(&p, &none(), at(3)), ch("burst"));
        // HEAD beside GET matches no request more (GET covers HEAD).
        let r = with(&[Method::HEAD, Method::POST, Method::GET]);
        assert_eq!(r.evaluate(&p, &none(), at(3)), ch("burst"));
        // Another set is another place.
        let r = with(&[Method::POST]);
        assert_eq!(r.evaluate(&p, &none(), at(4)), ch("new"));
    }

    /// Passes of `r` for `p` at each of `times`.
    fn passes(r: &RouteRisk, p: &SpiffeId, times: impl IntoIterator<Item = u64>) -> Vec<u64> {
        times
            .into_iter()
            .filter(|t| r.evaluate(p, &none(), at(*t)) == Verdict::Pass)
            .collect()
    }

    /// The most of `times` (sorted) within any `window`-long span.
    fn most_within(times: &[u64], window: u64) -> usize {
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| **t < times[i] + window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn a_burst_of_n_passes_and_the_next_fires() {
        let f = fx(100);
        let r = f.route(0, &["burst"]); // more than 3 within 1s
        let p = peer(1);
        for i in 0..3 {
            assert_eq!(r.evaluate(&p, &none(), at(i)), Verdict::Pass, "{i}");
        }
        assert_eq!(r.evaluate(&p, &none(), at(3)), ch("burst"));
        assert_eq!(r.evaluate(&p, &none(), at(999)), ch("burst"));
        // Rates are per caller.
        assert_eq!(r.evaluate(&peer(2), &none(), at(3)), Verdict::Pass);
        // In the middle of a window too.
        let r = f.route(1, &["burst"]);
        for _ in 0..3 {
            assert_eq!(r.evaluate(&p, &none(), at(600)), Verdict::Pass);
        }
        assert_eq!(r.evaluate(&p, &none(), at(600)), ch("burst"));
        // A fixed window would start afresh at 1000: the sliding one still
        // holds the burst.
        assert_eq!(r.evaluate(&p, &none(), at(1000)), ch("burst"));
    }

    #[test]
    fn a_burst_does_not_buy_a_steady_rate_on_top() {
        // The flaw of a token bucket: a burst of N, then one request every
        // window/N kept passing (59 in 58 s for 30/1m). Here the burst
        // fills the window, and no window-long span ever sees more than N.
        let f = fx(100);
        let r = f.route(0, &["burst"]);
        let p = peer(1);
        let times: Vec<u64> = [0, 0, 0]
            .into_iter()
            .chain((1..40).map(|k| k * 250))
            .collect();
        let passed = passes(&r, &p, times);
        assert_eq!(&passed[..3], [0, 0, 0]);
        assert!(most_within(&passed, SEC) <= 3, "{passed:?}");
        // The same at the 30/1m of the contract, the burst mid-window.
        let mut f = fx(100);
        f.rules.push(challenge(
            "thirty",
            RiskCondition::RateAbove {
                count: 30,
                window: secs(60),
            },
        ));
        let r = f.route(0, &["thirty"]);
        let times: Vec<u64> = vec![30 * SEC; 30]
            .into_iter()
            .chain((16..60).map(|k| k * 2 * SEC))
            .collect();
        let passed = passes(&r, &p, times);
        assert_eq!(passed.iter().filter(|t| **t == 30 * SEC).count(), 30);
        assert!(most_within(&passed, MIN) <= 30, "{passed:?}");
    }

    #[test]
    fn a_steady_rate_above_n_keeps_firing_and_one_below_passes() {
        let f = fx(100);
        let p = peer(1);
        // 4 a second against 3 a second: after the first few, every request
        // fires, for as long as it goes on (a challenged one counts too).
        let r = f.route(0, &["burst"]);
        let times: Vec<u64> = (0..400).map(|k| k * 250).collect();
        let passed = passes(&r, &p, times);
        assert!(passed.len() <= 3, "{passed:?}");
        assert!(passed.iter().all(|t| *t < SEC), "{passed:?}");
        // Just under: 2 a second passes for ever.
        let r = f.route(1, &["burst"]);
        let times: Vec<u64> = (0..400).map(|k| k * 500).collect();
        assert_eq!(passes(&r, &p, times).len(), 400);
        // Random gaps averaging 2.5 a second: never more than 3 within a
        // second.
        let r = f.route(2, &["burst"]);
        let mut t = 0;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let times: Vec<u64> = (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                t += x % 800;
                t
            })
            .collect();
        let end = *times.last().expect("times");
        let passed = passes(&r, &p, times);
        assert!(passed.len() > 1000, "{}", passed.len());
        // No second, wherever it starts, sees more than 3.
        assert!(most_within(&passed, SEC) <= 3, "{passed:?}");
        assert!(passed.len() as u64 <= 3 * (end / SEC + 1));
    }

    #[test]
    fn hammering_keeps_the_rate_firing_and_a_pause_clears_it() {
        let f = fx(100);
        let r = f.route(0, &["burst"]);
        let p = peer(1);
        for i in 0..100 {
            let v = r.evaluate(&p, &none(), at(i * 10));
            assert_eq!(v == Verdict::Pass, i < 3, "{i}");
        }
        // The next window still sees most of the hammering...
        assert_eq!(r.evaluate(&p, &none(), at(1500)), ch("burst"));
        // ...and once a full window has passed without a request, the full
        // burst is there again.
        for i in 0..3 {
            assert_eq!(r.evaluate(&p, &none(), at(3 * SEC + i)), Verdict::Pass);
        }
        assert_eq!(r.evaluate(&p, &none(), at(3 * SEC + 3)), ch("burst"));
    }

    #[test]
    fn rate_counts_cannot_overflow() {
        // The largest window and count the configuration allows, and
        // counts at their ceiling.
        let window = millis(crate::config::MAX_RISK_WINDOW);
        let sub = window.div_ceil(SUBS);
        let full = Window {
            slot: T0 / sub,
            counts: [u32::MAX; SUBS as usize + 1],
        };
        let mut w = full;
        assert!(w.count(T0, 1_000_000, window));
        assert!(w.count(T0, u64::from(u32::MAX), window));
        assert_eq!(w.counts[(w.slot % (SUBS + 1)) as usize], u32::MAX);
        // A time before the sub-window it counts (threads interleaving).
        let mut w = Window {
            slot: 10,
            ..Window::default()
        };
        assert!(!w.count(5 * sub, 1, window));
        assert!(w.count(5 * sub, 1, window));
        assert_eq!(w.slot, 10);
        // Past the whole window: all forgotten.
        let mut w = full;
        assert!(!w.count(T0 + window + sub, 1, window));
    }

    #[test]
    fn bursts_on_either_side_of_a_clock_boundary_still_fire() {
        // 5/10s: five at 9.75 s, then at 18.15 s, 8.4 s later, within one
        // window: the sixth fires, whatever the clock's 10 s marks.
        let mut f = fx(100);
        f.rules.push(challenge(
            "five",
            RiskCondition::RateAbove {
                count: 5,
                window: secs(10),
            },
        ));
        let p = peer(1);
        for start in [9_750, 9_999, 10_000, 3_300, 0] {
            let r = f.route(start as usize, &["five"]);
            for i in 0..5 {
                assert_eq!(r.evaluate(&p, &none(), at(start + i)), Verdict::Pass);
            }
            for later in [8_400, 9_999] {
                assert_eq!(
                    r.evaluate(&p, &none(), at(start + later)),
                    ch("five"),
                    "{start} + {later}"
                );
            }
        }
    }

    #[test]
    fn a_host_rule_reads_the_authority_of_an_http2_request() {
        // HTTP/2 carries the host as :authority, which is not a field;
        // the app still receives it as Host.
        let mut f = fx(100);
        f.rules.push(challenge(
            "internal",
            RiskCondition::Header {
                name: HeaderName::from_static("host"),
                test: HeaderTest::Equals("api.default.svc".into()),
            },
        ));
        let r = f.route(0, &["internal"]);
        let p = peer(1);
        let no_fields = none();
        let by_authority = |a: &'static str| Fields {
            headers: &no_fields,
            authority: Some(a),
        };
        assert_eq!(
            r.evaluate(&p, by_authority("api.default.svc"), at(0)),
            ch("internal")
        );
        assert_eq!(
            r.evaluate(&p, by_authority("API.default.svc"), at(0)),
            ch("internal")
        );
        assert_eq!(
            r.evaluate(&p, by_authority("web.default.svc"), at(0)),
            Verdict::Pass
        );
        // HTTP/1.1's Host field, and both at once (either may be what the
        // app reads).
        let host = headers(&[("host", "api.default.svc")]);
        assert_eq!(r.evaluate(&p, &host, at(0)), ch("internal"));
        let both = Fields {
            headers: &headers(&[("host", "web.default.svc")]),
            authority: Some("api.default.svc"),
        };
        assert_eq!(r.evaluate(&p, both, at(0)), ch("internal"));
        // The authority is no value of any other field.
        let mut g = fx(100);
        g.rules.push(challenge(
            "tagged",
            RiskCondition::Header {
                name: HeaderName::from_static("x-host"),
                test: HeaderTest::Present,
            },
        ));
        let tagged = g.route(0, &["tagged"]);
        assert_eq!(tagged.evaluate(&p, by_authority("a"), at(0)), Verdict::Pass);
    }

    #[test]
    fn a_host_rule_reads_the_hosts_an_app_behind_a_trusted_proxy_takes() {
        // Express, Django, Symfony and Werkzeug behind a proxy they trust
        // take the host from X-Forwarded-Host (or Forwarded's host=), which
        // the caller wrote.
        let mut f = fx(100);
        f.rules.push(challenge(
            "admin",
            RiskCondition::Header {
                name: HeaderName::from_static("host"),
                test: HeaderTest::Equals("admin.internal".into()),
            },
        ));
        let r = f.route(0, &["admin"]);
        let p = peer(1);
        for fields in [
            vec![("host", "web"), ("x-forwarded-host", "admin.internal")],
            vec![("host", "web"), ("x-forwarded-host", "admin.internal:8443")],
            vec![("host", "web"), ("x-forwarded-host", "web, admin.internal")],
            vec![("host", "web"), ("x_forwarded_host", "ADMIN.internal")],
            vec![
                ("host", "web"),
                ("forwarded", "for=1.2.3.4;host=admin.internal"),
            ],
            vec![
                ("host", "web"),
                ("forwarded", "for=x, Host=\"admin.internal\";proto=https"),
            ],
            // Round 11b F4: what Spring, Reactor Netty and Vert.x find, and
            // what a URL parser cuts a forwarded host at.
            vec![
                ("host", "web"),
                ("forwarded", "for=10.0.0.1;xhost=admin.internal"),
            ],
            vec![
                ("host", "web"),
                ("forwarded", "for=\"host=admin.internal\""),
            ],
            vec![("host", "web"), ("forwarded", "host=\"admin.internal")],
            vec![("host", "web"), ("forwarded", "host=admin.internal\"")],
            vec![("host", "web"), ("x-forwarded-host", "admin.internal/x")],
            vec![("host", "web"), ("x-forwarded-host", "admin.internal?x")],
            vec![("host", "web"), ("x-forwarded-host", "admin.internal#x")],
            vec![("host", "web"), ("x-forwarded-host", "admin.internal\\x")],
            vec![
                ("host", "web"),
                ("x-forwarded-host", "admin.internal/x@evil"),
            ],
        ] {
            assert_eq!(
                r.evaluate(&p, &headers(&fields), at(0)),
                ch("admin"),
                "{fields:?}"
            );
        }
        for fields in [
            vec![("host", "web"), ("x-forwarded-host", "web")],
            vec![
                ("host", "web"),
                ("forwarded", "for=admin.internal;by=admin.internal"),
            ],
            vec![("host", "web"), ("x-forwarded-server", "admin.internal")],
        ] {
            assert_eq!(
                r.evaluate(&p, &headers(&fields), at(0)),
                Verdict::Pass,
                "{fields:?}"
            );
        }
    }

    #[test]
    fn a_host_rule_sees_the_host_whatever_port_or_final_dot_it_comes_with() {
        // Virtual hosts are told apart without the port or a final dot:
        // `admin.internal.:443` reaches the app's admin.internal.
        let mut f = fx(100);
        f.rules.push(challenge(
            "admin",
            RiskCondition::Header {
                name: HeaderName::from_static("host"),
                test: HeaderTest::OneOf(vec!["admin.internal".into(), "[::1]".into()]),
            },
        ));
        let r = f.route(0, &["admin"]);
        let p = peer(1);
        let no_fields = none();
        for a in [
            "admin.internal",
            "ADMIN.internal",
            "admin.internal.",
            "admin.internal:31443",
            "admin.internal:80",
            "admin.internal.:443",
            "admin.internal:",
            "user@admin.internal:8080",
            "[::1]:443",
        ] {
            let by_authority = Fields {
                headers: &no_fields,
                authority: Some(a),
            };
            assert_eq!(r.evaluate(&p, by_authority, at(0)), ch("admin"), "{a}");
            let host = headers(&[("host", a)]);
            assert_eq!(r.evaluate(&p, &host, at(0)), ch("admin"), "Host: {a}");
        }
        for a in [
            "admin.internal:x",
            "admin.internal.:abc",
            "admin.internal:80:80",
            "admin.internal :443",
        ] {
            let host = headers(&[("host", a)]);
            assert_eq!(r.evaluate(&p, &host, at(0)), ch("admin"), "Host: {a}");
        }
        for a in ["admin.internal.evil", "xadmin.internal", "admin", "[::2]"] {
            let host = headers(&[("host", a)]);
            assert_eq!(r.evaluate(&p, &host, at(0)), Verdict::Pass, "{a}");
        }
        // Configured with a port or a final dot, the rule means the host.
        let mut g = fx(100);
        g.rules.push(challenge(
            "dotted",
            RiskCondition::Header {
                name: HeaderName::from_static("host"),
                test: HeaderTest::Equals("Admin.Internal.:443".into()),
            },
        ));
        let dotted = g.route(0, &["dotted"]);
        let host = headers(&[("host", "admin.internal")]);
        assert_eq!(dotted.evaluate(&p, &host, at(0)), ch("dotted"));
    }

    #[test]
    fn header_tests() {
        let f = fx(100);
        let p = peer(1);
        let big = f.route(0, &["big"]);
        for (value, fires) in [
            ("10000", false),
            ("9999.99", false),
            ("-5", false),
            (" 12 ", false),
            ("10000.01", true),
            ("1e9", true),
            ("inf", true),
            ("NaN", true),
            ("10,000", true),
            ("", true),
            ("0x10", true),
            ("lots", true),
        ] {
            let v = big.evaluate(&p, &headers(&[("x-amount", value)]), at(0));
            assert_eq!(v == ch("big"), fires, "{value:?}");
        }
        let bin = big.evaluate(
            &p,
            &{
                let mut h = HeaderMap::new();
                h.insert(
                    "x-amount",
                    HeaderValue::from_bytes(b"\xff1").expect("value"),
                );
                h
            },
            at(0),
        );
        assert_eq!(bin, ch("big"));
        // Absent: nothing to compare.
        assert_eq!(big.evaluate(&p, &none(), at(0)), Verdict::Pass);
        // Any of several values firing fires.
        let two = headers(&[("x-amount", "5"), ("x-amount", "50000")]);
        assert_eq!(big.evaluate(&p, &two, at(0)), ch("big"));
        let two = headers(&[("x-amount", "5"), ("x-amount", "6")]);
        assert_eq!(big.evaluate(&p, &two, at(0)), Verdict::Pass);

        let kind = f.route(1, &["kind"]);
        for (values, fires) in [
            (&["wire"][..], true),
            (&["cash"][..], true),
            (&["card"][..], false),
            (&["Wire"][..], true),
            (&["wire, card"][..], true),
            (&["card", "wire"][..], true),
        ] {
            let h: Vec<(&str, &str)> = values.iter().map(|v| ("x-kind", *v)).collect();
            assert_eq!(
                kind.evaluate(&p, &headers(&h), at(0)) == ch("kind"),
                fires,
                "{values:?}"
            );
        }
        let test = f.route(2, &["test"]);
        assert_eq!(
            test.evaluate(&p, &headers(&[("x-test", "yes")]), at(0)),
            ch("test")
        );
        assert_eq!(
            test.evaluate(&p, &headers(&[("x-test", "no")]), at(0)),
            Verdict::Pass
        );
        let debug = f.route(3, &["debug"]);
        assert_eq!(
            debug.evaluate(&p, &headers(&[("x-debug", "")]), at(0)),
            ch("debug")
        );
        assert_eq!(
            debug.evaluate(&p, &headers(&[("x-other", "1")]), at(0)),
            Verdict::Pass
        );
        // Header-only routes keep no state.
        assert_eq!(f.table.tracked(), 0);
    }

    /// A route with one extra rule (named `extra`), and `big`, `kind`,
    /// `test` and `debug` of the fixture.
    fn with_rule(condition: RiskCondition, action: RiskAction) -> (Fx, Arc<RouteRisk>) {
        let mut f = fx(100);
        f.rules.push(rule("extra", condition, action));
        let r = f.route(0, &["extra", "big", "kind", "test", "debug"]);
        (f, r)
    }

    #[test]
    fn header_rules_read_the_field_in_every_spelling() {
        let f = fx(100);
        let p = peer(1);
        let r = f.route(0, &["big", "test", "debug"]);
        // PHP reads `X.Amount` as `HTTP_X_AMOUNT` too (round 10 F1).
        for name in [
            "x-amount", "X-Amount", "x_amount", "X_AMOUNT", "X.Amount", "x~amount",
        ] {
            let h = headers(&[(name, "20000")]);
            assert_eq!(r.evaluate(&p, &h, at(0)), ch("big"), "{name}");
        }
        // An innocent copy in one spelling does not hide the other.
        let h = headers(&[("x-amount", "5"), ("x_amount", "20000")]);
        assert_eq!(r.evaluate(&p, &h, at(0)), ch("big"));
        let h = headers(&[("x-amount", "5"), ("x.amount", "20000")]);
        assert_eq!(r.evaluate(&p, &h, at(0)), ch("big"));
        for name in ["x_test", "X-TEST"] {
            let h = headers(&[(name, "yes")]);
            assert_eq!(r.evaluate(&p, &h, at(0)), ch("test"), "{name}");
        }
        let h = headers(&[("x_debug", "")]);
        assert_eq!(r.evaluate(&p, &h, at(0)), ch("debug"));
        // Other names stay other names.
        for name in ["x-amounts", "xamount", "x-amount-x"] {
            let h = headers(&[(name, "20000")]);
            assert_eq!(r.evaluate(&p, &h, at(0)), Verdict::Pass, "{name}");
        }
        // A rule configured with `_` reads the `-` spelling too.
        let h = |n: &str| HeaderName::from_bytes(n.as_bytes()).expect("name");
        let (_f, r) = with_rule(
            RiskCondition::Header {
                name: h("x_region"),
                test: HeaderTest::Equals("kp".into()),
            },
            RiskAction::Challenge,
        );
        for name in ["x-region", "x_region", "X-Region", "x.region"] {
            let hs = headers(&[(name, "KP")]);
            assert_eq!(r.evaluate(&p, &hs, at(0)), ch("extra"), "{name}");
        }
        // And a name without `-` is found by its one spelling.
        let (_f, r) = with_rule(
            RiskCondition::Header {
                name: h("amount"),
                test: HeaderTest::Present,
            },
            RiskAction::Challenge,
        );
        let hs = headers(&[("Amount", "1")]);
        assert_eq!(r.evaluate(&p, &hs, at(0)), ch("extra"));
        assert_eq!(r.evaluate(&p, &none(), at(0)), Verdict::Pass);
        assert!(r.reads_header(b"AMOUNT") && !r.reads_header(b"amounts"));
        assert!(r.reads_header(b"X_Amount") && r.reads_header(b"x-kind"));
        assert!(r.reads_header(b"X.Amount"));
        assert!(!r.reads_header(b"x-other"));
    }

    #[test]
    fn equals_and_one_of_err_on_the_safe_side_for_folds_and_parameters() {
        // Round 12 su F2: Go's EqualFold takes U+212A for `k`, Latin-1
        // `ß` upper-cases to `SS`; su F4: apps dispatch on a media type
        // without its parameters.
        let p = peer(1);
        let h = |n: &str| HeaderName::from_bytes(n.as_bytes()).expect("name");
        let (_f, r) = with_rule(
            RiskCondition::Header {
                name: h("x-country"),
                test: HeaderTest::OneOf(vec!["KP".into(), "SS".into()]),
            },
            RiskAction::Challenge,
        );
        let mut hs = HeaderMap::new();
        hs.insert(
            "x-country",
            HeaderValue::from_bytes(b"\xe2\x84\xaaP").unwrap(),
        );
        assert_eq!(r.evaluate(&p, &hs, at(0)), ch("extra"));
        hs.insert("x-country", HeaderValue::from_bytes(b"\xdf").unwrap());
        assert_eq!(r.evaluate(&p, &hs, at(0)), ch("extra"));
        hs.insert("x-country", HeaderValue::from_static("FR"));
        assert_eq!(r.evaluate(&p, &hs, at(0)), Verdict::Pass);
        let (_f, r) = with_rule(
            RiskCondition::Header {
                name: h("content-type"),
                test: HeaderTest::Equals("application/xml".into()),
            },
            RiskAction::Challenge,
        );
        for v in [
            "application/xml",
            "application/xml; charset=utf-8",
            "Application/XML;x=1",
            "text/plain, application/xml ; q=1",
        ] {
            let hs = headers(&[("content-type", v)]);
            assert_eq!(r.evaluate(&p, &hs, at(0)), ch("extra"), "{v}");
        }
        for v in ["application/xml+x", "text/xml; a=application/xml"] {
            let hs = headers(&[("content-type", v)]);
            assert_eq!(r.evaluate(&p, &hs, at(0)), Verdict::Pass, "{v}");
        }
    }

    #[test]
    fn header_values_are_read_as_lists_without_whitespace_or_case() {
        let f = fx(100);
        let p = peer(1);
        let r = f.route(0, &["kind", "test"]);
        for (name, value, fires) in [
            ("x-kind", "card, wire", Some("kind")),
            ("x-kind", "card,CASH", Some("kind")),
            ("x-kind", "card,\twire\t", Some("kind")),
            ("x-kind", " WIRE ", Some("kind")),
            ("x-kind", "card, cheque", None),
            ("x-kind", "wired", None),
            ("x-test", "no, yes", Some("test")),
            ("x-test", "YES", Some("test")),
            ("x-test", "\tYes ", Some("test")),
            ("x-test", "yess, no", None),
        ] {
            let v = r.evaluate(&p, &headers(&[(name, value)]), at(0));
            assert_eq!(v, fires.map_or(Verdict::Pass, ch), "{name}: {value:?}");
        }
        // A configured value with a comma still matches the whole field.
        let h = |n: &str| HeaderName::from_bytes(n.as_bytes()).expect("name");
        let (_f, r) = with_rule(
            RiskCondition::Header {
                name: h("x-pair"),
                test: HeaderTest::OneOf(vec!["a, b".into()]),
            },
            RiskAction::Challenge,
        );
        for value in [" A, B ", "a,b", "a ,\tB"] {
            let v = r.evaluate(&p, &headers(&[("x-pair", value)]), at(0));
            assert_eq!(v, ch("extra"), "{value:?}");
        }
        let v = r.evaluate(&p, &headers(&[("x-pair", "a, b, c")]), at(0));
        assert_eq!(v, Verdict::Pass);
    }

    #[test]
    fn values_are_read_as_an_app_strips_them() {
        // What Python's strip() and JavaScript's trim() remove at the ends
        // (a no-break space or NEL in Latin-1 or UTF-8, an ideographic
        // space), and quotes: all read as the value within.
        let f = fx(100);
        let p = peer(1);
        let r = f.route(0, &["kind"]);
        let h = |v: &[u8]| {
            let mut m = http::HeaderMap::new();
            m.insert(
                HeaderName::from_static("x-kind"),
                http::HeaderValue::from_bytes(v).expect("value"),
            );
            m
        };
        for value in [
            &b"wire\xa0"[..],
            b"\xa0wire",
            b"wire\x85",
            b"wire\xc2\xa0",
            b"\xe3\x80\x80wire",
            b"\"wire\"",
            b"card, \"WIRE\"\xa0",
        ] {
            let v = r.evaluate(&p, &h(value), at(0));
            assert_eq!(v, ch("kind"), "{:?}", String::from_utf8_lossy(value));
        }
        // Other bytes outside ASCII count as equal too (round 12 su F2:
        // apps fold them in ways of their own); ASCII values differing
        // stay different.
        for value in [&b"wire\xa0x"[..], b"wi\xa0re"] {
            let v = r.evaluate(&p, &h(value), at(0));
            assert_eq!(v, ch("kind"), "{:?}", String::from_utf8_lossy(value));
        }
        for value in [&b"wired"[..], b"wi re"] {
            let v = r.evaluate(&p, &h(value), at(0));
            assert_eq!(v, Verdict::Pass, "{:?}", String::from_utf8_lossy(value));
        }
    }

    #[test]
    fn above_compares_decimals_exactly_and_anything_else_is_above() {
        let f = fx(100);
        let p = peer(1);
        let big = f.route(0, &["big"]); // above 10000
        for (value, fires) in [
            ("10000.0000000000001", true),
            ("10000.0000000000000", false),
            ("00010000", false),
            ("+10000", false),
            ("10001", true),
            ("\t9999\t", false),
            ("99999999999999999999999999", true),
            ("-99999999999999999999999999", false),
            ("-0", false),
            ("-inf", true),
            ("inf", true),
            ("+inf", true),
            ("NaN", true),
            ("-NaN", true),
            ("1e3", true),
            (".5", true),
            ("5.", true),
            ("--5", true),
            ("5, 6", true),
            ("20,000", true),
            ("1 000", true),
        ] {
            let v = big.evaluate(&p, &headers(&[("x-amount", value)]), at(0));
            assert_eq!(v == ch("big"), fires, "{value:?}");
        }
        let h = |n: &str| HeaderName::from_bytes(n.as_bytes()).expect("name");
        // Negative and fractional thresholds.
        for (limit, value, fires) in [
            (-5.0, "-4.9", true),
            (-5.0, "-5", false),
            (-5.0, "-5.0001", false),
            (-5.0, "0", true),
            (-5.0, "-0", true),
            (0.1, "0.1000000000000000001", true),
            (0.1, "0.1", false),
            (0.1, "0.09", false),
            (0.0, "-0.0", false),
            (0.0, "0.000000001", true),
            (1e21, "1000000000000000000000", false),
            (1e21, "1000000000000000000000.5", true),
        ] {
            let (_f, r) = with_rule(
                RiskCondition::Header {
                    name: h("x-score"),
                    test: HeaderTest::Above(limit),
                },
                RiskAction::Challenge,
            );
            let v = r.evaluate(&p, &headers(&[("x-score", value)]), at(0));
            assert_eq!(v == ch("extra"), fires, "{value:?} above {limit}");
        }
    }

    #[test]
    fn hours_are_utc_start_inclusive_end_exclusive_and_may_wrap() {
        let f = fx(100);
        let p = peer(1);
        let night = f.route(0, &["night"]); // 22:00-06:00
        let office = f.route(1, &["office"]); // 09:00-17:00
        for (h, m, in_night, in_office) in [
            (0, 0, true, false),
            (5, 59, true, false),
            (6, 0, false, false),
            (8, 59, false, false),
            (9, 0, false, true),
            (12, 30, false, true),
            (16, 59, false, true),
            (17, 0, false, false),
            (21, 59, false, false),
            (22, 0, true, false),
            (23, 59, true, false),
        ] {
            // On several days, to be sure only the time of day counts.
            for day in [0, 1, 400] {
                let t = at(day * 24 * HOUR + h * HOUR + m * MIN + 30 * SEC);
                assert_eq!(
                    night.evaluate(&p, &none(), t) == ch("night"),
                    in_night,
                    "{h}:{m}"
                );
                assert_eq!(
                    office.evaluate(&p, &none(), t) == ch("office"),
                    in_office,
                    "{h}:{m}"
                );
            }
        }
        assert!(in_hours(0, 22 * 60, 6 * 60), "the epoch is midnight UTC");
        assert_eq!(f.table.tracked(), 0);
    }

    #[test]
    fn after_failure_sees_every_kind_of_refusal_within_its_window() {
        for kind in [Failure::StepUp, Failure::Forbidden, Failure::Handshake] {
            let f = fx(100);
            let r = f.route(0, &["after"]); // 15m
            let p = peer(1);
            assert_eq!(r.evaluate(&p, &none(), at(0)), Verdict::Pass);
            f.table.record_failure(p.as_str(), kind, at(MIN));
            assert_eq!(r.evaluate(&p, &none(), at(MIN)), ch("after"), "{kind:?}");
            assert_eq!(
                r.evaluate(&p, &none(), at(16 * MIN - 1)),
                ch("after"),
                "{kind:?}"
            );
            assert_eq!(
                r.evaluate(&p, &none(), at(16 * MIN)),
                Verdict::Pass,
                "{kind:?}"
            );
            // Someone else's refusal is not this caller's.
            r.evaluate(&peer(2), &none(), at(17 * MIN));
            f.table.record_failure(peer(2).as_str(), kind, at(17 * MIN));
            assert_eq!(r.evaluate(&p, &none(), at(17 * MIN)), Verdict::Pass);
            assert_eq!(r.evaluate(&peer(2), &none(), at(17 * MIN)), ch("after"));
        }
    }

    #[test]
    fn handshake_failures_never_drive_a_deny() {
        // after_failure with action deny: only refusals of a key holder.
        let (f, r) = with_rule(RiskCondition::AfterFailure(secs(15 * 60)), RiskAction::Deny);
        let p = peer(1);
        for i in 0..20 {
            f.table
                .record_failure(p.as_str(), Failure::Handshake, at(i * SEC));
        }
        assert_eq!(r.evaluate(&p, &none(), at(MIN)), Verdict::Pass);
        f.table.record_failure(p.as_str(), Failure::StepUp, at(MIN));
        assert_eq!(r.evaluate(&p, &none(), at(MIN)), deny("extra"));
        assert_eq!(r.evaluate(&p, &none(), at(16 * MIN)), Verdict::Pass);
        // A handshake failure after it does not extend the window.
        f.table
            .record_failure(p.as_str(), Failure::Handshake, at(15 * MIN));
        assert_eq!(r.evaluate(&p, &none(), at(16 * MIN)), Verdict::Pass);
        // The same rule as a challenge still sees handshakes.
        let (f, r) = with_rule(
            RiskCondition::AfterFailure(secs(15 * 60)),
            RiskAction::Challenge,
        );
        // (A handshake failure only marks a caller already tracked.)
        r.evaluate(&p, &none(), at(0));
        assert_eq!(r.evaluate(&p, &none(), at(MIN)), Verdict::Pass);
        f.table
            .record_failure(p.as_str(), Failure::Handshake, at(MIN));
        assert_eq!(r.evaluate(&p, &none(), at(2 * MIN)), ch("extra"));
        // failures_above with action deny: any number of handshakes.
        let f = fx(100);
        let r = f.route(0, &["lockout"]);
        for i in 0..100 {
            f.table
                .record_failure(p.as_str(), Failure::Handshake, at(i));
        }
        assert_eq!(r.evaluate(&p, &none(), at(MIN)), Verdict::Pass);
    }

    #[test]
    fn failures_above_locks_out_for_the_window_from_the_crossing() {
        let f = fx(100);
        let r = f.route(0, &["lockout"]); // more than 5 within 15m: deny
        let p = peer(1);
        let series = "keyproof_risk_denied_total{route=\"/r0\",rule=\"lockout\"}";
        assert_eq!(f.metric(series), 0.0, "exported from the start");
        for i in 0..5 {
            f.table
                .record_failure(p.as_str(), Failure::StepUp, at(i * MIN));
        }
        assert_eq!(r.evaluate(&p, &none(), at(5 * MIN)), Verdict::Pass);
        // Handshakes never count: a certificate is public.
        for i in 0..10 {
            f.table
                .record_failure(p.as_str(), Failure::Handshake, at(5 * MIN + i));
        }
        assert_eq!(r.evaluate(&p, &none(), at(6 * MIN)), Verdict::Pass);
        // The sixth refusal within 15 minutes of the first: locked.
        f.table
            .record_failure(p.as_str(), Failure::Forbidden, at(14 * MIN));
        assert_eq!(r.evaluate(&p, &none(), at(14 * MIN)), deny("lockout"));
        assert_eq!(f.metric(series), 1.0);
        // For 15 minutes from that refusal, though the early ones age out.
        assert_eq!(r.evaluate(&p, &none(), at(29 * MIN - 1)), deny("lockout"));
        assert_eq!(r.evaluate(&p, &none(), at(29 * MIN)), Verdict::Pass);
        assert_eq!(f.metric(series), 2.0);
        // Another caller is untouched.
        assert_eq!(r.evaluate(&peer(2), &none(), at(15 * MIN)), Verdict::Pass);
    }

    #[test]
    fn failures_above_counts_a_sliding_window_exactly() {
        let f = fx(100);
        let r = f.route(0, &["lockout"]);
        let p = peer(1);
        // Five at 0, then one each exactly a window later: never more
        // than five within any 15 minutes.
        for i in 0..5 {
            f.table.record_failure(p.as_str(), Failure::StepUp, at(i));
        }
        for i in 0..5 {
            f.table
                .record_failure(p.as_str(), Failure::StepUp, at(15 * MIN + i));
            assert_eq!(
                r.evaluate(&p, &none(), at(15 * MIN + i)),
                Verdict::Pass,
                "{i}"
            );
        }
        // One more within the window of the last five: six.
        f.table
            .record_failure(p.as_str(), Failure::StepUp, at(15 * MIN + 5));
        assert_eq!(r.evaluate(&p, &none(), at(15 * MIN + 5)), deny("lockout"));
    }

    #[test]
    fn a_lockout_survives_a_policy_reload_and_a_new_rule_sees_recorded_refusals() {
        let mut f = fx(100);
        let r0 = f.route(0, &["lockout"]);
        let p = peer(1);
        for i in 0..6 {
            f.table.record_failure(p.as_str(), Failure::StepUp, at(i));
        }
        assert_eq!(r0.evaluate(&p, &none(), at(10)), deny("lockout"));
        // A reload: the same rule on another route still locks.
        let r1 = f.reload(&[(3, &["lockout"])]).remove(0);
        assert_eq!(r1.evaluate(&p, &none(), at(20)), deny("lockout"));
        // A rule that did not exist when the refusals came: it counts them
        // and locks from the moment it sees them.
        f.rules.push(rule(
            "strict",
            RiskCondition::FailuresAbove {
                count: 2,
                window: secs(60 * 60),
            },
            RiskAction::Deny,
        ));
        let r2 = f.reload(&[(0, &["strict"])]).remove(0);
        assert_eq!(r2.evaluate(&p, &none(), at(10 * MIN)), deny("strict"));
        assert_eq!(r2.evaluate(&p, &none(), at(70 * MIN - 1)), deny("strict"));
        assert_eq!(r2.evaluate(&p, &none(), at(70 * MIN)), Verdict::Pass);
        // The lockout rule is gone from the policy, its lock still holds
        // (for its window) should a route list it again.
        let r3 = f.reload(&[(5, &["lockout"])]).remove(0);
        assert_eq!(r3.evaluate(&p, &none(), at(15 * MIN)), deny("lockout"));
    }

    #[test]
    fn deny_rules_come_first_and_the_first_listed_challenge_is_the_reason() {
        let f = fx(100);
        let p = peer(1);
        let r = f.route(0, &["debug", "new", "big", "lockout"]);
        let h = headers(&[("x-debug", "1"), ("x-amount", "1e6")]);
        assert_eq!(r.evaluate(&p, &h, at(0)), ch("debug"));
        let r = f.route(1, &["new", "debug", "big", "lockout"]);
        assert_eq!(r.evaluate(&p, &h, at(0)), ch("new"));
        for i in 0..6 {
            f.table.record_failure(p.as_str(), Failure::StepUp, at(i));
        }
        // Listed last, it still decides.
        assert_eq!(r.evaluate(&p, &h, at(10)), deny("lockout"));
        // Of two deny rules, the first listed firing one.
        let r = f.route(2, &["flood", "lockout"]);
        assert_eq!(r.evaluate(&p, &none(), at(20)), deny("lockout"));
        for _ in 0..10 {
            r.evaluate(&peer(2), &none(), at(30));
        }
        assert_eq!(r.evaluate(&peer(2), &none(), at(30)), deny("flood"));
        assert_eq!(
            f.metric("keyproof_risk_denied_total{route=\"/r2\",rule=\"flood\"}"),
            1.0
        );
        // Every request counted towards the rates, a denied one too.
        assert_eq!(r.evaluate(&peer(2), &none(), at(30)), deny("flood"));
    }

    #[test]
    fn a_forgotten_caller_is_new_again() {
        let f = fx(2);
        let r = f.route(0, &["new"]);
        for n in [1, 2] {
            r.evaluate(&peer(n), &none(), at(0));
            r.served(&peer(n), at(0));
        }
        assert_eq!(f.table.tracked(), 2);
        // 1 is seen again: 2 is now the least recently seen.
        assert_eq!(r.evaluate(&peer(1), &none(), at(1)), Verdict::Pass);
        assert_eq!(r.evaluate(&peer(3), &none(), at(2)), ch("new"));
        assert_eq!(f.table.tracked(), 2);
        assert_eq!(f.metric("keyproof_risk_evictions_total"), 1.0);
        assert_eq!(f.metric("keyproof_risk_tracked_identities"), 2.0);
        assert_eq!(r.evaluate(&peer(1), &none(), at(3)), Verdict::Pass);
        // 2 was forgotten: challenged as new, though served within the day.
        assert_eq!(r.evaluate(&peer(2), &none(), at(4)), ch("new"));
        assert_eq!(f.metric("keyproof_risk_untracked_total"), 0.0);
    }

    #[test]
    fn a_forgotten_caller_gets_no_fresh_allowance() {
        let f = fx(2);
        let r = f.route(0, &["burst"]); // more than 3 within 1 s
        let p = peer(1);
        for t in 0..3 {
            assert_eq!(r.evaluate(&p, &none(), at(t)), Verdict::Pass);
        }
        assert_eq!(r.evaluate(&p, &none(), at(3)), ch("burst"));
        // Two others come: 1 is forgotten, and what it made with it.
        r.evaluate(&peer(2), &none(), at(4));
        r.evaluate(&peer(3), &none(), at(5));
        assert_eq!(f.metric("keyproof_risk_evictions_total"), 1.0);
        // Back within the window: over the rate, as what it lost may have
        // made it.
        assert_eq!(r.evaluate(&p, &none(), at(6)), ch("burst"));
        assert_eq!(r.evaluate(&p, &none(), at(7)), ch("burst"));
        // A window after the last caller was forgotten, it is itself again.
        assert_eq!(r.evaluate(&p, &none(), at(1100)), Verdict::Pass);
        // A deny rule on the rate: a caller it refused, forgotten, is
        // challenged (not given a fresh allowance unproven), and so is a
        // newcomer after an eviction (the table cannot tell it from a
        // forgotten caller), which is not refused.
        let flood = f.route(1, &["flood"]);
        let q = peer(20);
        let mut t = 1200;
        while flood.evaluate(&q, &none(), at(t)) != deny("flood") {
            t += 1;
        }
        r.evaluate(&peer(21), &none(), at(t + 1));
        r.evaluate(&peer(22), &none(), at(t + 2));
        assert_eq!(flood.evaluate(&q, &none(), at(t + 3)), ch("flood"));
        assert_eq!(flood.evaluate(&peer(23), &none(), at(t + 4)), ch("flood"));
    }

    #[test]
    fn eviction_pressure_never_lifts_a_lockout() {
        let f = fx(3);
        let r = f.route(0, &["lockout", "new", "after", "burst"]);
        let locked = peer(0);
        for i in 0..6 {
            f.table
                .record_failure(locked.as_str(), Failure::StepUp, at(i));
        }
        assert_eq!(r.evaluate(&locked, &none(), at(10)), deny("lockout"));
        // Hundreds of other callers pass through, oldest first in line.
        for n in 1..300 {
            r.evaluate(&peer(n), &none(), at(20 + n as u64));
            assert!(f.table.tracked() <= 3);
        }
        assert_eq!(r.evaluate(&locked, &none(), at(MIN)), deny("lockout"));
        // Every place locked: a newcomer cannot be tracked; it counts as
        // new, and every rule that reads history challenges it (none
        // refuses it: it is not locked out).
        for n in [1000, 1001] {
            for i in 0..6 {
                f.table
                    .record_failure(peer(n).as_str(), Failure::StepUp, at(MIN + i));
            }
        }
        assert_eq!(
            r.evaluate(&peer(1000), &none(), at(2 * MIN)),
            deny("lockout")
        );
        assert_eq!(
            r.evaluate(&peer(1001), &none(), at(2 * MIN)),
            deny("lockout")
        );
        let before = f.metric("keyproof_risk_untracked_total");
        let only_new = f.route(1, &["new", "lockout"]);
        let only_rate = f.route(2, &["burst", "lockout"]);
        let only_after = f.route(3, &["after", "lockout"]);
        let stranger = peer(5000);
        only_new.served(&stranger, at(2 * MIN));
        assert_eq!(
            only_new.evaluate(&stranger, &none(), at(2 * MIN)),
            ch("new")
        );
        assert_eq!(
            only_rate.evaluate(&stranger, &none(), at(2 * MIN)),
            ch("burst")
        );
        assert_eq!(
            only_after.evaluate(&stranger, &none(), at(2 * MIN)),
            ch("after")
        );
        assert_eq!(f.metric("keyproof_risk_untracked_total"), before + 4.0);
        assert_eq!(f.table.tracked(), 3);
        // Untracked, a deny rule on what is not known challenges it, and
        // never refuses it.
        let only_flood = f.route(4, &["flood", "lockout"]);
        assert_eq!(
            only_flood.evaluate(&stranger, &none(), at(2 * MIN)),
            ch("flood")
        );
        // Once the locks end, places free up again.
        assert_eq!(r.evaluate(&locked, &none(), at(20 * MIN)), ch("new"));
        assert_eq!(
            only_new.evaluate(&stranger, &none(), at(20 * MIN)),
            ch("new")
        );
        only_new.served(&stranger, at(20 * MIN));
        assert_eq!(
            only_new.evaluate(&stranger, &none(), at(20 * MIN)),
            Verdict::Pass
        );
    }

    #[test]
    fn failed_handshakes_never_keep_callers_in_the_table() {
        // Anyone can present any identity's certificate: handshakes failed
        // with the certificates of callers the table holds must not make
        // them callers it may not forget, or a full table of them would
        // leave every other caller untracked, out of reach of deny rules.
        let f = fx(2);
        let r = f.route(0, &["after", "new", "flood"]);
        for n in [1, 2] {
            r.evaluate(&peer(n), &none(), at(n as u64));
            r.served(&peer(n), at(n as u64));
        }
        for n in [1, 2] {
            f.table
                .record_failure(peer(n).as_str(), Failure::Handshake, at(3));
        }
        // Each still has its failure on record...
        assert_eq!(r.evaluate(&peer(2), &none(), at(4)), ch("after"));
        // ...but a caller that holds its key takes a place, and deny rules
        // then count it.
        let real = peer(3);
        for t in 5..20 {
            r.evaluate(&real, &none(), at(t));
        }
        assert_eq!(f.metric("keyproof_risk_untracked_total"), 0.0);
        assert_eq!(f.metric("keyproof_risk_evictions_total"), 1.0);
        assert_eq!(r.evaluate(&real, &none(), at(20)), deny("flood"));
    }

    #[test]
    fn callers_with_live_refusals_are_never_forgotten() {
        let f = fx(2);
        let r = f.route(0, &["after", "new"]);
        let (failing, quiet) = (peer(1), peer(2));
        r.evaluate(&failing, &none(), at(0));
        f.table
            .record_failure(failing.as_str(), Failure::StepUp, at(0));
        r.evaluate(&quiet, &none(), at(1));
        r.served(&quiet, at(1));
        // The failing caller is the least recently seen, but the quiet one
        // goes.
        r.evaluate(&peer(3), &none(), at(2));
        assert_eq!(r.evaluate(&failing, &none(), at(3)), ch("after"));
        assert_eq!(r.evaluate(&quiet, &none(), at(4)), ch("new"));
        // With only failing callers left, none goes: the newcomer is not
        // tracked (it counts as new, and is challenged as such), and both
        // keep their refusals.
        let f = fx(2);
        let r = f.route(0, &["after", "new"]);
        for n in [1, 2] {
            f.table
                .record_failure(peer(n).as_str(), Failure::StepUp, at(n as u64));
        }
        let untracked = f.metric("keyproof_risk_untracked_total");
        assert_eq!(r.evaluate(&peer(3), &none(), at(5)), ch("new"));
        assert_eq!(f.metric("keyproof_risk_untracked_total"), untracked + 1.0);
        assert_eq!(f.table.tracked(), 2);
        for n in [1, 2] {
            r.served(&peer(n), at(6));
            assert_eq!(r.evaluate(&peer(n), &none(), at(7)), ch("after"));
        }
        // ...and once refusals are older than every window, they are quiet.
        let f = fx(2);
        let r = f.route(0, &["after", "new"]);
        f.table
            .record_failure(peer(1).as_str(), Failure::StepUp, at(0));
        r.evaluate(&peer(2), &none(), at(16 * MIN));
        r.evaluate(&peer(3), &none(), at(16 * MIN + 1));
        // 1 (least recently seen, refusal no longer live) went, not 2.
        r.served(&peer(2), at(16 * MIN + 2));
        assert_eq!(
            r.evaluate(&peer(2), &none(), at(16 * MIN + 3)),
            Verdict::Pass
        );
    }

    #[test]
    fn the_bound_is_exact_across_shards_and_threads() {
        let f = fx(5000);
        assert!(f.table.shards.len() > 1);
        let r = f.route(0, &["new"]);
        for n in 0..20_000 {
            r.evaluate(&peer(n), &none(), at(n as u64));
        }
        assert_eq!(f.table.tracked(), 5000);
        assert_eq!(f.metric("keyproof_risk_evictions_total"), 15_000.0);
        assert_eq!(f.metric("keyproof_risk_tracked_identities"), 5000.0);

        let f = fx(1000);
        let r = f.route(0, &["new", "burst"]);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for n in 0..3000 {
                        let p = peer(t * 100_000 + n % 1500);
                        r.evaluate(&p, &none(), at(n as u64));
                        r.served(&p, at(n as u64));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(f.table.tracked(), 1000);
        let held: usize = f.table.shards.iter().map(|s| lock(s).index.len()).sum();
        assert_eq!(held, 1000);
    }

    #[test]
    fn refusals_are_not_kept_when_no_rule_looks_at_them() {
        let f = fx(100);
        let _r = f.route(0, &["new", "burst"]);
        f.table
            .record_failure("spiffe://td/x", Failure::StepUp, at(0));
        assert_eq!(f.table.tracked(), 0);
        let _r = f.route(1, &["after"]);
        f.table
            .record_failure("spiffe://td/x", Failure::StepUp, at(0));
        assert_eq!(f.table.tracked(), 1);
        // A reload that drops the last rule looking at refusals: they are
        // no longer kept (the table follows the policy both ways).
        let _r = f.reload(&[(0, &["new", "burst"])]);
        f.table
            .record_failure("spiffe://td/y", Failure::StepUp, at(0));
        assert_eq!(f.table.tracked(), 1);
        // Compiling a route alone changes nothing the table records: only
        // a built policy does.
        let _unapplied = RouteRisk::new(&f.table, &route_config(9, &["after"]), &f.rules);
        f.table
            .record_failure("spiffe://td/y", Failure::StepUp, at(0));
        assert_eq!(f.table.tracked(), 1);
    }

    #[test]
    fn a_handshake_failure_never_admits_an_identity() {
        let f = fx(2);
        let r = f.route(0, &["after", "new"]);
        // Anyone can write any identity into a certificate: an unknown one
        // is not admitted, and nobody is forgotten for it.
        f.table
            .record_failure(peer(1).as_str(), Failure::Handshake, at(0));
        assert_eq!(f.table.tracked(), 0);
        assert_eq!(r.evaluate(&peer(1), &none(), at(1)), ch("new"));
        r.served(&peer(1), at(1));
        assert_eq!(r.evaluate(&peer(1), &none(), at(2)), Verdict::Pass);
        r.evaluate(&peer(2), &none(), at(2));
        assert_eq!(f.table.tracked(), 2);
        for n in 100..400 {
            f.table
                .record_failure(peer(n).as_str(), Failure::Handshake, at(3));
        }
        assert_eq!(f.table.tracked(), 2);
        assert_eq!(f.metric("keyproof_risk_evictions_total"), 0.0);
        assert_eq!(f.metric("keyproof_risk_untracked_total"), 0.0);
        // A tracked identity's failed handshake does count.
        f.table
            .record_failure(peer(1).as_str(), Failure::Handshake, at(4));
        assert_eq!(r.evaluate(&peer(1), &none(), at(5)), ch("after"));
        // The other kinds still admit (a refusal after a verified
        // handshake is the caller's own).
        f.table
            .record_failure(peer(3).as_str(), Failure::StepUp, at(6));
        assert_eq!(f.metric("keyproof_risk_evictions_total"), 1.0);
    }

    #[test]
    fn finding_whom_to_forget_looks_at_a_bounded_number_of_callers() {
        let f = fx(300);
        assert_eq!(f.table.shards.len(), 1);
        let r = f.route(0, &["lockout", "new"]);
        // The 100 least recently seen are locked out.
        for n in 0..100 {
            for i in 0..6 {
                f.table
                    .record_failure(peer(n).as_str(), Failure::StepUp, at(i));
            }
        }
        for n in 100..300 {
            r.evaluate(&peer(n), &none(), at(10));
        }
        assert_eq!(f.table.tracked(), 300);
        // A newcomer: the first SCAN looked at are all locked, so it is not
        // tracked (it counts as new, the safe side) though quiet callers
        // are further on.
        assert_eq!(r.evaluate(&peer(1000), &none(), at(20)), ch("new"));
        assert_eq!(f.metric("keyproof_risk_untracked_total"), 1.0);
        assert_eq!(f.metric("keyproof_risk_evictions_total"), 0.0);
        // Those looked at moved to the front: the next search reaches past
        // the remaining 36 locked ones to a quiet caller.
        assert_eq!(r.evaluate(&peer(1001), &none(), at(21)), ch("new"));
        assert_eq!(f.metric("keyproof_risk_untracked_total"), 1.0);
        assert_eq!(f.metric("keyproof_risk_evictions_total"), 1.0);
        r.served(&peer(1001), at(21));
        assert_eq!(r.evaluate(&peer(1001), &none(), at(22)), Verdict::Pass);
        // No lockout was lifted.
        for n in 0..100 {
            assert_eq!(r.evaluate(&peer(n), &none(), at(30)), deny("lockout"));
        }
        assert_eq!(f.table.tracked(), 300);
    }

    #[test]
    fn a_second_table_on_one_registry_is_refused() {
        let m = Metrics::new().expect("metrics");
        RiskTable::new(1, &m).expect("first");
        assert!(RiskTable::new(1, &m).is_err());
    }
}
