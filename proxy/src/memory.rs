//! The sidecar's memory budget: what keeps one caller from getting the pod
//! OOM-killed.
//!
//! Every limit on a connection bounds what that connection can make the
//! sidecar hold: a request head it never finishes (up to
//! `max_header_bytes`, buffered on its way through TLS and the parser),
//! HTTP/2 streams whose bodies fill their flow-control windows while the
//! app is slow, tunnels. But `max_connections_per_peer` times any of them
//! is far beyond a sidecar's container limit (128Mi in the shipped
//! manifests): a few hundred connections of one caller with one
//! certificate of the trust domain were enough, and the kubelet's OOM kill
//! takes the whole pod's service down for every caller.
//!
//! Three mechanisms, against `[runtime] memory_limit` (by default half the
//! container's cgroup limit: the other half is for memory outside the heap,
//! the code, and pages the allocator has not yet given back):
//!
//! - **Shedding.** A thread looks at resident memory every [`PERIOD`];
//!   above the limit it reads the heap (bytes the allocator has handed out
//!   and not had back: what closing connections can return), and if that
//!   is above the limit too, closes connections, as Envoy's overload
//!   manager resets the streams that hold the most: inbound callers'
//!   connections and the outbound's app connections, from the holder with
//!   the most first (a caller identity; the app counts as one), so that a
//!   flood sheds itself and a caller with a few is touched last; a
//!   holder's connections with no request in flight before those with
//!   one, then the newest; enough to bring the heap under nine tenths of
//!   the limit. Until it is back under the limit, a new connection of a
//!   caller shed from is closed as soon as its handshake names it
//!   (`inbound/callers.rs`). How many to close is estimated from what each
//!   connection holds on average (the heap above what it was with no
//!   connection open), so that a small excess does not close them all.
//!   The heap does not say whose it is: the choice is by connection
//!   count, each connection weighed by its caller's requests in flight
//!   ([`Holder::held`]), which finds a flood; memory a connection holds
//!   otherwise (windows, responses its caller does not read) counts only
//!   as the connection. A heap that was above the limit with
//!   no connection open (a limit set too low) sheds nothing, and says so.
//! - **Receive windows out of the budget** ([`Grant`]). Shedding answers
//!   growth slower than a look; an HTTP/2 caller fills its windows at once.
//!   One caller's connections together get at most a quarter of them.
//! - **Request heads out of the budget** ([`Holder`]): HPACK makes a large
//!   head cheap to send, and a burst of them arrives at once too. (Signed
//!   step-up bodies, read whole, are bounded to a quarter of the limit as
//!   well: `run.rs`.)
//!
//! Both budgets shrink to the room left once resident memory is past half
//! the limit (`resize_budgets`): a burst on connections that already
//! hold most of the limit must not add its full size on top.
//!
//! The allocator is jemalloc (`main.rs`, tuned in `.cargo/config.toml`):
//! its statistics give the heap in one read, and its background thread
//! gives freed pages back to the system within a tenth of a second, so
//! that resident memory follows the heap down after a peak (glibc's malloc
//! kept them: 233 MB resident 3 s after 1,000 connections had closed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::MemoryMetrics;

/// What the watch sheds from: the inbound's open caller connections
/// (`inbound/callers.rs`) and the outbound's app connections
/// (`listener::AppConns`).
pub trait Shed: Send + Sync {
    /// Connections open now.
    fn open(&self) -> usize;
    /// Connections (not yet closed) of the holder with the most.
    fn largest(&self) -> usize;
    /// Closes `n` connections, the caller holding the most first; returns
    /// how many. Callers shed from have new connections closed until
    /// [`Shed::calm`].
    fn shed(&self, n: usize) -> usize;
    /// Memory is back under its limit: callers shed from may connect
    /// again.
    fn calm(&self);
    /// Connections closed as they opened since the last call, if any.
    fn take_refused(&self) -> Option<u64>;
}

/// How often resident memory is looked at: at 125 MB/s (the round-5
/// tester's estimate for HTTP/2 uploads) a period lets about 6 MB more in;
/// faster bursts are what the receive-window pool ([`Grant`]) is for. A
/// look reads `/proc/self/statm`, a few microseconds.
pub const PERIOD: Duration = Duration::from_millis(50);

/// Shedding stops once the heap is under this many tenths of the limit, so
/// that a heap hovering at the limit does not shed on every look.
const CALM_TENTHS: u64 = 9;

/// Bytes the allocator has handed out and not had back: jemalloc's
/// `stats.allocated`. The statistics are refreshed first, which merges
/// every arena's (about 50,000 instructions): the watch does it only when
/// it decides something, and once a second for the gauge. `None` when
/// jemalloc is not the allocator (the library's own unit tests).
pub fn heap_bytes() -> Option<u64> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let bytes = tikv_jemalloc_ctl::stats::allocated::read().ok()?;
    u64::try_from(bytes).ok().filter(|&b| b > 0)
}

/// Resident memory, what the kernel charges to the container: `statm`'s
/// second field, in pages.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(page_size()))
}

/// The kernel's page size (4 KiB on x86-64, 4, 16 or 64 KiB on arm64),
/// from the auxiliary vector the kernel gave the process (`AT_PAGESZ`).
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        const AT_PAGESZ: u64 = 6;
        let auxv = std::fs::read("/proc/self/auxv").unwrap_or_default();
        auxv.chunks_exact(16)
            .map(|pair| {
                let (k, v) = pair.split_at(8);
                let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
                (word(k), word(v))
            })
            .find(|&(k, _)| k == AT_PAGESZ)
            .map_or(4096, |(_, v)| v)
    })
}

/// The memory limit of the container this process runs in, from its
/// cgroup (v2 `memory.max`, else v1 `memory.limit_in_bytes`); `None` when
/// there is none.
pub fn container_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = Vec::new();
    // v2: "0::/path"; in a container with its own cgroup namespace the
    // path is "/" and the files are at the mount's top.
    if let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) {
        candidates.push(format!(
            "/sys/fs/cgroup{}/memory.max",
            path.trim_end_matches('/')
        ));
    }
    candidates.push("/sys/fs/cgroup/memory.max".to_owned());
    // v1: "N:memory:/path", mounted per controller.
    if let Some(path) = own
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p))
    {
        candidates.push(format!(
            "/sys/fs/cgroup/memory{}/memory.limit_in_bytes",
            path.trim_end_matches('/')
        ));
    }
    candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".to_owned());
    candidates
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| parse_cgroup_limit(&s))
}

/// A cgroup limit file's content: "max" (v2) or a byte count, where v1
/// says "no limit" with a number near `i64::MAX`.
fn parse_cgroup_limit(s: &str) -> Option<u64> {
    let n: u64 = s.trim().parse().ok()?;
    (n < 1 << 60).then_some(n)
}

/// The limit the sidecar holds its heap under: `[runtime] memory_limit`,
/// or with `auto`, half the container's (none without one).
pub fn resolve(setting: crate::config::MemoryLimit) -> Option<u64> {
    use crate::config::MemoryLimit;
    match setting {
        MemoryLimit::Off => None,
        MemoryLimit::Bytes(n) => Some(n),
        MemoryLimit::Auto => container_limit().map(|c| c / 2),
    }
}

/// How many connections to close when the heap is `heap` bytes with `open`
/// connections open, it was `idle` with none, and the limit is `limit`:
/// enough, at what each holds on average, to bring the heap under
/// nine tenths of the limit; at least one; none when under the limit or
/// when the connections hold nothing above the idle heap.
pub fn to_shed(heap: u64, idle: u64, limit: u64, open: usize) -> usize {
    if heap <= limit || open == 0 {
        return 0;
    }
    let held = heap.saturating_sub(idle);
    let per_conn = held / open as u64;
    if per_conn == 0 {
        return 0;
    }
    let excess = heap - calm(limit);
    let n = excess.div_ceil(per_conn);
    usize::try_from(n).unwrap_or(usize::MAX).clamp(1, open)
}

fn calm(limit: u64) -> u64 {
    limit / 10 * CALM_TENTHS
}

/// Starts watching the heap, on a thread of its own: a runtime busy with
/// the very connections that fill memory (one worker thread by default)
/// would put the look itself behind them. Sets the memory gauges, and
/// above `limit` sheds `holders`' connections (see the module's
/// documentation); ends when `stop` is dropped or sent to.
pub fn spawn(
    limit: Option<u64>,
    holders: Vec<Arc<dyn Shed>>,
    metrics: MemoryMetrics,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    if let Some(l) = limit {
        metrics.limit(l);
    }
    std::thread::Builder::new()
        .name("keyproof-memory".into())
        .spawn(move || {
            let mut watch = Watch::new(limit, holders, metrics);
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(PERIOD) {
                watch.look();
            }
        })
}

/// The watch's state between two looks.
struct Watch {
    limit: Option<u64>,
    holders: Vec<Arc<dyn Shed>>,
    metrics: MemoryMetrics,
    looks: u64,
    /// The heap when no connection was last open.
    idle: u64,
    shedding: bool,
    told_nothing_to_shed: bool,
}

/// The heap gauge is refreshed every this many looks (a second) when
/// nothing is decided.
const GAUGE_EVERY: u64 = 20;

impl Watch {
    fn new(limit: Option<u64>, holders: Vec<Arc<dyn Shed>>, metrics: MemoryMetrics) -> Watch {
        Watch {
            limit,
            holders,
            metrics,
            looks: 0,
            idle: heap_bytes().unwrap_or(0),
            shedding: false,
            told_nothing_to_shed: false,
        }
    }

    fn look(&mut self) {
        self.looks += 1;
        let refused = take_refused_heads();
        if refused > 0 {
            self.metrics.refused.inc_by(refused);
        }
        let resident = resident_bytes().unwrap_or(0);
        self.metrics.set_resident(resident);
        // Only resident memory can get the pod killed: the heap, which
        // says how much shedding can give back, is read when resident
        // memory is over the limit (the heap may be, too, with pages
        // allocated and never touched: nothing to shed then).
        let over = self.limit.is_some_and(|l| resident > l);
        // Under half the limit, the budgets are at their largest anyway.
        let filling = self.limit.is_some_and(|l| resident > l / 2);
        if let (Some(l), false) = (self.limit, filling) {
            resize_budgets(l, 0);
        }
        if !over && !filling && !self.shedding && !self.looks.is_multiple_of(GAUGE_EVERY) {
            return;
        }
        let heap = heap_bytes().unwrap_or(resident);
        if let (Some(l), true) = (self.limit, filling) {
            resize_budgets(l, heap.saturating_sub(HEADS.taken.load(Ordering::Relaxed)));
        }
        self.metrics.set_heap(heap);
        let open: usize = self.holders.iter().map(|h| h.open()).sum();
        // Right after a shed, connections are closed but what their tasks
        // held is not all freed yet: taken then, the baseline would read
        // as memory no connection holds, and hide the next flood from
        // `to_shed` (round 6: 78 MB under a 64 MiB limit). So it rises
        // only while memory is calm; it may always go down.
        let calm_now = !self.shedding && self.limit.is_none_or(|l| heap < calm(l));
        if open == 0 && (calm_now || heap < self.idle) {
            self.idle = heap;
        }
        let Some(limit) = self.limit else { return };
        for h in &self.holders {
            if let Some(n) = h.take_refused() {
                self.metrics.shed.inc_by(n);
            }
        }
        if over && heap > limit {
            let n = to_shed(heap, self.idle, limit, open);
            if n == 0 {
                if !self.told_nothing_to_shed {
                    self.told_nothing_to_shed = true;
                    tracing::warn!(heap, limit, idle_heap = self.idle, connections = open, "memory above runtime.memory_limit, but the connections hold nothing above the heap without them: nothing to shed");
                }
                return;
            }
            let closed = self.shed(n);
            self.metrics.shed.inc_by(closed as u64);
            if !self.shedding {
                self.shedding = true;
                tracing::warn!(heap, resident, limit, connections = open, closed, "memory above runtime.memory_limit: shedding connections, from the holder of the most");
            }
        } else if self.shedding {
            // Under the limit: callers shed from may connect again. (The
            // nine tenths are how far each shedding goes, not how long a
            // caller stays refused: a heap that stays between the two,
            // held by something else, must not lock anyone out.)
            self.shedding = false;
            self.told_nothing_to_shed = false;
            for h in &self.holders {
                h.calm();
            }
            tracing::info!(
                heap,
                resident,
                limit,
                "memory back under runtime.memory_limit: no longer shedding"
            );
        }
    }

    /// Closes `n` connections across the holders, from whichever has the
    /// holder with the most, down to the next one's level at a time.
    fn shed(&self, n: usize) -> usize {
        let mut closed = 0;
        while closed < n {
            let mut by_size: Vec<(usize, &Arc<dyn Shed>)> =
                self.holders.iter().map(|h| (h.largest(), h)).collect();
            by_size.sort_unstable_by_key(|&(size, _)| std::cmp::Reverse(size));
            let Some(&(top, first)) = by_size.first() else {
                break;
            };
            if top == 0 {
                break;
            }
            let next = by_size.get(1).map_or(0, |&(size, _)| size);
            let batch = (n - closed).min((top - next).max(1));
            let done = first.shed(batch);
            if done == 0 {
                break;
            }
            closed += done;
        }
        closed
    }
}

/// Receive buffering granted to connections from the process's budget.
///
/// Shedding answers growth that takes longer than a [`PERIOD`]; an HTTP/2
/// caller fills its connection's whole receive window at once, at
/// loopback speed, when the app does not read (32 connections with 16 MiB
/// windows took the heap past 110 MB before the first look). So receive
/// windows are granted out of a pool of half the memory limit (less when
/// the connections already hold much of it: [`resize_budgets`]): each new
/// connection gets a quarter of what is left, between a floor and its
/// maximum, and gives it back when it closes. The first connections (a
/// pod's few peer pods) get full windows; a flood of them gets the floor,
/// which the handshakes' pace and shedding bound together. Without a
/// limit every connection gets its maximum.
#[derive(Debug)]
struct Pool {
    /// Bytes in the pool; `u64::MAX` for no limit.
    size: AtomicU64,
    /// Bytes granted and not given back.
    taken: AtomicU64,
}

static POOL: Pool = Pool::new();

/// Sizes the receive pool and the request-head budget for a memory limit
/// (`None`: no limit). Both are the process's, as the limit is: sidecars
/// run in one process (the quickstart's) share them.
pub fn bound_receive_windows(limit: Option<u64>) {
    POOL.bound(limit.map(|l| l / 2));
    HEADS.bound(limit.map(|l| l / 4));
}

/// Sizes the receive pool and the head budget to the room the rest of the
/// heap (`held`: what the connections hold besides request heads) leaves
/// under `limit`. Both take bursts that arrive faster than a look: taken at
/// their full size on top of a heap already near the limit (2,000 idle
/// connections of 25-30 KiB each before any request), they took the heap to
/// one and a half times the limit before shedding answered (round 7's N4).
/// So the head budget (of which holders may take twice in all) is at most
/// half the room, and the pool at most the room, between floors that keep
/// callers served and their sizes at an idle heap (a quarter of the limit,
/// half of it).
fn resize_budgets(limit: u64, held: u64) {
    let (heads, pool) = budgets_for(limit, held);
    HEADS.bound(Some(heads));
    POOL.bound(Some(pool));
}

/// The head budget and the receive pool for [`resize_budgets`].
fn budgets_for(limit: u64, held: u64) -> (u64, u64) {
    let room = limit.saturating_sub(held);
    (
        (room / 2).clamp(limit / 16, limit / 4),
        room.clamp(limit / 8, limit / 2),
    )
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            size: AtomicU64::new(u64::MAX),
            taken: AtomicU64::new(0),
        }
    }

    fn bound(&self, size: Option<u64>) {
        self.size.store(size.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn take(&'static self, floor: u64, max: u64, holder: &Arc<Holder>) -> Grant {
        let size = self.size.load(Ordering::Relaxed);
        // A holder's connections together get at most a quarter of the
        // pool: past it, the floor (round 6's F6: 20 idle connections of
        // one caller left every later caller the floor).
        let mine = holder.windows.load(Ordering::Relaxed);
        let share_left = (size / HOLDER_SHARE).saturating_sub(mine);
        let mut taken = self.taken.load(Ordering::Relaxed);
        loop {
            let left = size.saturating_sub(taken);
            let bytes = (left / 4).min(share_left).clamp(floor, max);
            let reserved = bytes.min(left);
            match self.taken.compare_exchange_weak(
                taken,
                taken + reserved,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    holder.windows.fetch_add(reserved, Ordering::Relaxed);
                    return Grant {
                        bytes,
                        reserved,
                        pool: self,
                        holder: holder.clone(),
                    };
                }
                Err(now) => taken = now,
            }
        }
    }
}

/// How much of a body an HTTP/2 stream may hold beyond what its peer's
/// flow-control window lets out: h2's default, 400 KB, without a
/// limit; under one, a thousandth of it (64 KiB under the 64 MiB that
/// `auto` gives in 128Mi), at least 64 KiB. Every stream whose reader has
/// stopped holds this much: a caller's unread responses on the inbound
/// (`max_app_connections` of them), the app's uploads to an upstream
/// that does not answer on the outbound (300 of them held 117 MB, round
/// 6's F7). The peer's window, not this buffer, paces a stream that is
/// read: the mesh's windows are 1 MiB.
pub fn send_buffer() -> usize {
    send_buffer_of(POOL.size.load(Ordering::Relaxed), H2_SEND_BUFFER)
}

/// h2's own default send buffer per stream (hyper's too).
const H2_SEND_BUFFER: usize = 400 * 1024;

/// [`send_buffer`] with a receive pool of `pool` bytes (half the limit).
fn send_buffer_of(pool: u64, max: usize) -> usize {
    const FLOOR: u64 = 64 * 1024;
    if pool == u64::MAX {
        return max;
    }
    let share = (pool / 512).max(FLOOR);
    usize::try_from(share).unwrap_or(max).min(max)
}

/// Receive buffering granted to one connection: [`Grant::bytes`], of
/// which the part the pool still had is given back on drop.
#[derive(Debug)]
pub struct Grant {
    bytes: u64,
    reserved: u64,
    pool: &'static Pool,
    holder: Arc<Holder>,
}

impl Grant {
    /// Takes a quarter of what the process's pool has left, but at least
    /// `floor` and at most `max` bytes, and within `holder`'s share (a
    /// quarter of the pool for all its connections).
    pub fn take(floor: u64, max: u64, holder: &Arc<Holder>) -> Grant {
        POOL.take(floor, max, holder)
    }

    /// The bytes granted.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.pool.taken.fetch_sub(self.reserved, Ordering::Relaxed);
        self.holder
            .windows
            .fetch_sub(self.reserved, Ordering::Relaxed);
    }
}

/// Request heads in flight, out of the budget.
///
/// HPACK lets a caller send a header it sent before as a one-byte index
/// into the connection's dynamic table: a 60 KB request head can cost 30
/// bytes on the wire, and 64 connections each with 100 such requests
/// arriving in one burst took the heap past 170 MB before the first look
/// (round 6's F5). A head is decoded before the server sees it; what the
/// server can bound is how many decoded heads it keeps: each HTTP/2
/// request's head (RFC 7541 section 4.1's size: names, values, 32 bytes
/// each), with what a request in flight holds besides and a reserve for
/// the trailers a request with an open body may still send
/// (`http/h2_server.rs`), is charged here until its handler has
/// answered, out of a budget of a quarter of the limit (less when memory
/// fills: [`resize_budgets`]), of which one
/// holder (a caller identity, the app) may hold a quarter. A request over
/// either is refused with `REFUSED_STREAM`, which tells the caller that
/// nothing of it was processed and that it may retry: a flood refuses
/// itself, and another caller's requests still fit. What one connection
/// decodes in one read before its streams are accepted stays outside
/// (`max_concurrent_streams` times `max_header_list_size`), a connection
/// at a time per worker thread.
#[derive(Debug)]
struct HeadBudget {
    /// Bytes in the budget; `u64::MAX` for no limit.
    size: AtomicU64,
    /// Bytes charged and not given back.
    taken: AtomicU64,
    /// Holders with something charged.
    active: AtomicU64,
    /// Requests refused since the watch last counted them.
    refused: AtomicU64,
}

static HEADS: HeadBudget = HeadBudget::new();

/// The share of the head budget one holder may hold, in parts.
const HOLDER_SHARE: u64 = 4;

impl HeadBudget {
    const fn new() -> HeadBudget {
        HeadBudget {
            size: AtomicU64::new(u64::MAX),
            taken: AtomicU64::new(0),
            active: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn bound(&self, size: Option<u64>) {
        self.size.store(size.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Charges `bytes` to `holder`, or `None`. A holder may take up to its
    /// share (a quarter) while the budget has room; once it is full, up to
    /// an equal split of the budget among the holders with something
    /// charged (max-min fairness, never past its share), within twice the
    /// budget in all: a flood of a few identities filling the budget does
    /// not lock out a caller with a few requests (round 7: five did). The
    /// app ([`Holder::app`]) is refused only past its share: callers
    /// cannot take the pod's own outbound calls from it. A holder holding
    /// nothing may take one head whatever its size, so that a
    /// `max_header_bytes` above the share is not refused outright.
    fn take(
        &'static self,
        holder: &Arc<Holder>,
        bytes: u64,
        count: bool,
        past_share: bool,
    ) -> Option<HeadGrant> {
        let size = self.size.load(Ordering::Relaxed);
        if size == u64::MAX {
            return Some(HeadGrant(None));
        }
        let share = size / HOLDER_SHARE;
        let before = holder.held.fetch_add(bytes, Ordering::Relaxed);
        if before == 0 {
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        let all = self.taken.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let mine = before + bytes;
        let fair = size / self.active.load(Ordering::Relaxed).max(1);
        // The app is held to its share whatever it holds (it is not held to
        // the room: callers cannot take its outbound calls from it).
        let within_share = (past_share && !holder.app) || before == 0 || mine <= share;
        let room = all <= size || (all <= 2 * size && mine <= fair);
        let granted = within_share && (holder.app || room);
        if !granted {
            self.give_back(holder, bytes);
            if count {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        Some(HeadGrant(Some((bytes, holder.clone(), self))))
    }

    fn give_back(&self, holder: &Holder, bytes: u64) {
        if holder.held.fetch_sub(bytes, Ordering::Relaxed) == bytes {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
        self.taken.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// One holder's share of the budget: its request heads in flight, and the
/// receive windows its connections were granted ([`Grant`]); a caller
/// identity's across its connections (`inbound/callers.rs`), or the app's
/// (`listener::AppConns`).
#[derive(Debug, Default)]
pub struct Holder {
    held: AtomicU64,
    windows: AtomicU64,
    /// The pod's own app: not in the callers' competition for the head
    /// budget.
    app: bool,
}

impl Holder {
    /// The outbound's holder: the pod's own app.
    pub fn app() -> Holder {
        Holder {
            app: true,
            ..Holder::default()
        }
    }

    /// Charges a request head of `bytes` to this holder, or refuses it
    /// (see [`HeadBudget`]); the grant gives it back when dropped.
    pub fn take(self: &Arc<Self>, bytes: u64) -> Option<HeadGrant> {
        HEADS.take(self, bytes, true, false)
    }

    /// As [`Holder::take`], with the size worked out only under a limit
    /// (it is a walk over the head's fields, on every request).
    pub fn take_sized(self: &Arc<Self>, bytes: impl FnOnce() -> u64) -> Option<HeadGrant> {
        if HEADS.size.load(Ordering::Relaxed) == u64::MAX {
            return Some(HeadGrant(None));
        }
        self.take(bytes())
    }

    /// Bytes this holder has charged now (none without a limit).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Charges `bytes` with no budget to refuse them: what the shedding
    /// order sees of a caller with requests in flight, in unit tests.
    #[cfg(test)]
    pub fn charge_for_test(&self, bytes: u64) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A request head charged to its holder until dropped.
#[derive(Debug)]
pub struct HeadGrant(Option<(u64, Arc<Holder>, &'static HeadBudget)>);

impl Drop for HeadGrant {
    fn drop(&mut self) {
        if let Some((bytes, holder, budget)) = &self.0 {
            budget.give_back(holder, *bytes);
        }
    }
}

/// Bytes a holder keeps as they grow, charged in steps (and given back at
/// [`Growing::done`] or on drop): an HTTP/1.1 request head that spans
/// reads (a caller can open its connections first, then send a 60 KB
/// unfinished head on each at once, faster than a look at the heap: 2,000
/// such heads took a sidecar to 96 MB, and `max_connections_per_peer` is
/// 7,500; a head that arrives whole in one read is never charged), or the
/// copy of a request body the outbound keeps for a step-up resend.
#[derive(Debug)]
pub struct Growing {
    holder: Arc<Holder>,
    grants: Vec<HeadGrant>,
    charged: u64,
    /// Refusals are requests refused, and counted as such.
    refuses_requests: bool,
    /// Charged against the budget's room only, not the holder's share.
    past_share: bool,
}

/// The steps what grows is charged in.
const GROWING_STEP: u64 = 16 * 1024;

impl Growing {
    /// Nothing charged yet, to `holder`; a refusal refuses a request
    /// (`keyproof_memory_refused_requests_total`).
    pub fn new(holder: Arc<Holder>) -> Growing {
        Growing {
            holder,
            grants: Vec::new(),
            charged: 0,
            refuses_requests: true,
            past_share: false,
        }
    }

    /// As [`Growing::new`], for an HTTP/2 header block still arriving:
    /// refused, its whole connection closes (the block cannot be skipped:
    /// the HPACK state it changes is the connection's), with every request
    /// on it, processed or not (round 8: a caller with many 40 KB heads in
    /// flight lost its answered requests with them). So only a full budget
    /// refuses it (and past it, the equal split among holders); the
    /// holder's share is kept by its head, which is charged once it ends
    /// and refused alone (`REFUSED_STREAM`).
    pub fn header_block(holder: Arc<Holder>) -> Growing {
        Growing {
            past_share: true,
            ..Growing::new(holder)
        }
    }

    /// As [`Growing::new`], for what the sidecar may drop and go on
    /// without (a body's copy): a refusal is not counted.
    pub fn optional(holder: Arc<Holder>) -> Growing {
        Growing {
            refuses_requests: false,
            ..Growing::new(holder)
        }
    }

    /// Charges what is held now, `bytes`; false when the budget refuses it
    /// (an unfinished head's connection is to be closed: nothing of the
    /// head was processed; a body's copy is dropped).
    pub fn hold(&mut self, bytes: u64) -> bool {
        if HEADS.size.load(Ordering::Relaxed) == u64::MAX {
            return true;
        }
        while self.charged < bytes {
            let taken = HEADS.take(
                &self.holder,
                GROWING_STEP,
                self.refuses_requests,
                self.past_share,
            );
            let Some(g) = taken else {
                return false;
            };
            self.grants.push(g);
            self.charged += GROWING_STEP;
        }
        true
    }

    /// What was held is no longer (a head ended, a copy was dropped): its
    /// charge goes back.
    pub fn done(&mut self) {
        if self.charged > 0 {
            self.grants.clear();
            self.charged = 0;
        }
    }
}

/// Requests refused for the head budget since the last call.
fn take_refused_heads() -> u64 {
    HEADS.refused.swap(0, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    #[test]
    fn sheds_what_brings_the_heap_under_nine_tenths() {
        // 500 connections holding 100 MiB above an idle 4 MiB: 0.2 MiB
        // each; the limit 96 MiB, calm at 86.4 MiB.
        let n = to_shed(104 * MI, 4 * MI, 96 * MI, 500);
        // (104 - 86.4) MiB / 0.2 MiB = 88, give or take integer rounding.
        assert!((88..=89).contains(&n), "{n}");
        // Under the limit: nothing; at any excess: at least one; never
        // more than are open.
        assert_eq!(to_shed(96 * MI, 4 * MI, 96 * MI, 500), 0);
        assert_eq!(to_shed(96 * MI + 1, 0, 96 * MI, 2), 1);
        assert_eq!(to_shed(1_000 * MI, 0, 96 * MI, 3), 3);
    }

    #[test]
    fn nothing_is_shed_for_memory_the_connections_do_not_hold() {
        // The heap was above the limit before any connection opened.
        assert_eq!(to_shed(200 * MI, 210 * MI, 96 * MI, 10), 0);
        assert_eq!(to_shed(200 * MI, 4 * MI, 96 * MI, 0), 0);
    }

    #[test]
    fn cgroup_limits_read_as_v1_and_v2_write_them() {
        assert_eq!(parse_cgroup_limit("134217728\n"), Some(128 * MI));
        assert_eq!(parse_cgroup_limit("max\n"), None);
        // cgroup v1's "unlimited".
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_limit(""), None);
    }

    #[test]
    fn auto_is_half_the_container_and_off_is_none() {
        use crate::config::MemoryLimit;
        assert_eq!(resolve(MemoryLimit::Off), None);
        assert_eq!(resolve(MemoryLimit::Bytes(64 * MI)), Some(64 * MI));
        assert_eq!(resolve(MemoryLimit::Auto), container_limit().map(|c| c / 2));
    }

    #[test]
    fn resident_memory_reads_this_process() {
        assert!([4096, 16384, 65536].contains(&page_size()));
        let before = resident_bytes().expect("statm");
        // 64 MiB touched is resident.
        let v = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = resident_bytes().expect("statm");
        assert!(after >= before + (60 << 20), "{before} -> {after}");
        drop(v);
    }

    #[test]
    fn receive_windows_come_out_of_the_pool_and_go_back() {
        // A pool of its own: the process's serves the other tests' servers.
        static POOL: Pool = Pool::new();
        POOL.bound(Some(64 * MI));
        let floor = 256 << 10;
        let max = 16 * MI;
        // A pool of 64 MiB: 16 MiB (the maximum), then a quarter of 48.
        let a = POOL.take(floor, max, &Arc::default());
        let b = POOL.take(floor, max, &Arc::default());
        assert_eq!((a.bytes(), b.bytes()), (16 * MI, 12 * MI));
        // A flood gets less and less, then the floor, which the pool no
        // longer backs.
        let flood: Vec<Grant> = (0..40)
            .map(|_| POOL.take(floor, max, &Arc::default()))
            .collect();
        assert!(flood.iter().all(|g| g.bytes() >= floor));
        assert_eq!(flood.last().map(Grant::bytes), Some(floor));
        let granted: u64 = flood.iter().map(|g| g.reserved).sum::<u64>() + a.reserved + b.reserved;
        assert!(granted <= 64 * MI, "{granted}");
        // Given back, the pool grants full windows again.
        drop((a, b, flood));
        assert_eq!(POOL.taken.load(Ordering::Relaxed), 0);
        assert_eq!(POOL.take(floor, max, &Arc::default()).bytes(), max);
        POOL.bound(None);
        assert_eq!(POOL.take(floor, max, &Arc::default()).bytes(), max);
    }

    #[test]
    fn one_holder_takes_at_most_a_quarter_of_the_window_pool() {
        static POOL: Pool = Pool::new();
        POOL.bound(Some(64 * MI));
        let (floor, max) = (256 << 10, 16 * MI);
        // 20 connections of one caller: 16 MiB of the 64 MiB pool in all,
        // then the floor.
        let att = Arc::new(Holder::default());
        let idle: Vec<Grant> = (0..20).map(|_| POOL.take(floor, max, &att)).collect();
        let reserved: u64 = idle.iter().map(|g| g.reserved).sum();
        assert!(reserved <= 16 * MI + 19 * floor, "{reserved}");
        assert_eq!(idle.last().map(Grant::bytes), Some(floor));
        // Another caller still gets a quarter of what is left (round 6:
        // the floor).
        let good = POOL.take(floor, max, &Arc::default());
        assert!(good.bytes() > 10 * MI, "{}", good.bytes());
        drop(idle);
        assert_eq!(att.windows.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn budgets_shrink_to_the_room_the_connections_leave() {
        let limit = 64 * MI;
        // An idle heap (the sidecar's own 20 MiB): the full sizes.
        assert_eq!(budgets_for(limit, 20 * MI), (16 * MI, 32 * MI));
        // Connections holding 40 MiB: 24 left, heads at most 12 (24 when
        // twice taken), the pool 24.
        assert_eq!(budgets_for(limit, 40 * MI), (12 * MI, 24 * MI));
        // At or past the limit: the floors, a sixteenth and an eighth.
        for held in [60 * MI, limit, 2 * limit] {
            assert_eq!(budgets_for(limit, held), (4 * MI, 8 * MI));
        }
    }

    #[test]
    fn send_buffers_shrink_under_a_limit() {
        let max = 400 * 1024;
        assert_eq!(send_buffer_of(u64::MAX, max), max);
        // 64 MiB (a pool of 32): 64 KiB; 256 MiB: 256 KiB; never under
        // 64 KiB nor over the maximum.
        assert_eq!(send_buffer_of(32 * MI, max), 64 << 10);
        assert_eq!(send_buffer_of(128 * MI, max), 256 << 10);
        assert_eq!(send_buffer_of(8 * MI, max), 64 << 10);
        assert_eq!(send_buffer_of(4096 * MI, max), max);
    }

    #[test]
    fn request_heads_are_shared_fairly_within_twice_the_budget() {
        // A budget of its own: the process's serves the other tests.
        static HEADS: HeadBudget = HeadBudget::new();
        let take = |h: &Arc<Holder>, n: u64| HEADS.take(h, n, true, false);
        let fill = |h: &Arc<Holder>, n: u64| -> Vec<HeadGrant> {
            std::iter::from_fn(|| take(h, n)).take(100_000).collect()
        };
        let taken = || HEADS.taken.load(Ordering::Relaxed);
        // No limit: nothing is counted.
        let flood = Arc::new(Holder::default());
        assert!(take(&flood, 100 * MI).is_some());
        assert_eq!(taken(), 0);
        // 16 MiB, of which a holder may hold 4.
        HEADS.bound(Some(16 * MI));
        let head = 60 << 10;
        let held = fill(&flood, head);
        assert_eq!(held.len() as u64, 4 * MI / head);
        assert_eq!(HEADS.refused.swap(0, Ordering::Relaxed), 1);
        // Four identities of a flood fill the budget...
        let others: Vec<Arc<Holder>> = (0..3).map(|_| Arc::default()).collect();
        let more: Vec<Vec<HeadGrant>> = others.iter().map(|o| fill(o, head)).collect();
        assert!(taken() > 15 * MI, "{}", taken());
        // ...and a caller with a few requests still gets in: an equal
        // split of the budget among five.
        let legit = Arc::new(Holder::default());
        let few = fill(&legit, 4096);
        assert_eq!(few.len() as u64, 16 * MI / 5 / 4096);
        // Ever more identities: never beyond twice the budget.
        let many: Vec<Arc<Holder>> = (0..16).map(|_| Arc::default()).collect();
        let most: Vec<Vec<HeadGrant>> = many.iter().map(|o| fill(o, head)).collect();
        assert!(taken() <= 32 * MI, "{}", taken());
        assert!(most.iter().any(|g| !g.is_empty()));
        // The app is held to its own share (a quarter), whatever the
        // callers hold.
        let app = Arc::new(Holder::app());
        let own = fill(&app, 4096);
        assert_eq!(own.len() as u64, 4 * MI / 4096);
        // A holder holding nothing gets one head larger than its share.
        drop((more, most, own, few));
        let big = Arc::new(Holder::default());
        let one = take(&big, 10 * MI);
        assert!(one.is_some());
        // Given back, all of it.
        drop((held, one));
        assert_eq!(taken(), 0);
        assert_eq!(HEADS.active.load(Ordering::Relaxed), 0);
        assert_eq!(flood.held(), 0);
        assert!(take(&flood, head).is_some());
    }

    #[test]
    fn header_blocks_still_arriving_are_refused_only_by_a_full_budget() {
        static HEADS: HeadBudget = HeadBudget::new();
        HEADS.bound(Some(16 * MI));
        let step = 16 << 10;
        let caller = Arc::new(Holder::default());
        // Its share (4 MiB) is held by its requests in flight...
        let heads: Vec<HeadGrant> =
            std::iter::from_fn(|| HEADS.take(&caller, step, true, false)).collect();
        assert_eq!(heads.len() as u64, 4 * MI / step);
        // ...and a block still arriving on one of its connections goes on
        // (to be refused alone once it ends), up to the budget's room, and
        // then an equal split past it.
        let blocks: Vec<HeadGrant> =
            std::iter::from_fn(|| HEADS.take(&caller, step, true, true)).collect();
        assert_eq!(HEADS.taken.load(Ordering::Relaxed), 16 * MI);
        drop((heads, blocks));
        assert_eq!(caller.held(), 0);
        // The app's blocks stay within its share: it is never held to the
        // room, so nothing else would bound them.
        let app = Arc::new(Holder::app());
        let blocks: Vec<HeadGrant> =
            std::iter::from_fn(|| HEADS.take(&app, step, true, true)).collect();
        assert_eq!(HEADS.taken.load(Ordering::Relaxed), 4 * MI);
        drop(blocks);
    }
}
