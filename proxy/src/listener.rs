//! What the inbound and outbound listeners share below HTTP: binding, an
//! accept loop with backpressure, connection tracking for drain, the
//! bound on TLS handshakes in progress, and the outbound's app connections
//! for the memory budget.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use tokio_util::sync::CancellationToken;

use crate::http::server::{stopped, Activity, PROGRESS};
use crate::memory::{Holder, Shed};

/// Binds a listener with a deep backlog (excess clients wait there when
/// `max_connections` is reached, rather than being refused).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

/// Counts live connection tasks so that shutdown can wait for them.
#[derive(Debug, Default)]
pub struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

/// Held by a connection task; its drop marks the connection finished.
#[derive(Debug)]
pub struct TrackGuard(Arc<Tracker>);

impl Tracker {
    /// Registers a connection.
    pub fn track(self: &Arc<Self>) -> TrackGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        TrackGuard(self.clone())
    }

    /// Resolves once no connection is live.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What a connection task holds for its whole life.
#[derive(Debug)]
pub struct ConnGuards {
    _permit: OwnedSemaphorePermit,
    _track: TrackGuard,
}

/// Accepts until shutdown. A permit is taken *before* `accept`, so at the
/// connection limit the proxy simply stops accepting and the kernel backlog
/// applies backpressure, instead of accepting and then dropping.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    tracker: Arc<Tracker>,
    mut shutdown: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr, ConnGuards) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopped(&mut shutdown) => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped(&mut shutdown) => return,
        };
        match accepted {
            Ok((tcp, remote)) => {
                // Small request/response exchanges must not wait for Nagle.
                let _ = tcp.set_nodelay(true);
                let guards = ConnGuards {
                    _permit: permit,
                    _track: tracker.track(),
                };
                tokio::spawn(handler(tcp, remote, guards));
            }
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Bounds the TLS handshakes in progress on a listener (and the admin
/// listener's connections: `admin.rs`). At the bound, the
/// oldest pending handshake is closed to make room for the new one (and
/// counted): a flood of connections that never finish their handshake then
/// only displaces itself, and a caller whose handshake takes `d` is served
/// unless `max` newer connections arrive within `d`. Waiting in the accept
/// queue instead would put a prompt caller behind every stalled one, for up
/// to `handshake_timeout` each.
pub struct HandshakeGate {
    max: usize,
    pending: Mutex<PendingHandshakes>,
    shed: prometheus::IntCounter,
}

/// The pending handshakes, oldest first, each with the signal that evicts
/// it; ids are handed out under the lock, so the queue stays sorted.
#[derive(Default)]
struct PendingHandshakes {
    next: u64,
    queue: VecDeque<(u64, Arc<Notify>)>,
}

/// A place among the pending handshakes; dropped when the handshake ends.
pub struct HandshakeSlot {
    gate: Arc<HandshakeGate>,
    id: u64,
    evict: Arc<Notify>,
}

impl HandshakeGate {
    /// A gate for `max` pending handshakes, counting evictions in `shed`.
    pub fn new(max: usize, shed: prometheus::IntCounter) -> Arc<HandshakeGate> {
        Arc::new(HandshakeGate {
            max: max.max(1),
            pending: Mutex::new(PendingHandshakes::default()),
            shed,
        })
    }

    /// Registers a new handshake, evicting the oldest one at the bound.
    pub fn admit(self: &Arc<Self>) -> HandshakeSlot {
        let evict = Arc::new(Notify::new());
        let mut g = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let id = g.next;
        g.next += 1;
        if g.queue.len() >= self.max {
            if let Some((_, oldest)) = g.queue.pop_front() {
                // notify_one keeps a permit, so a handshake that is not
                // waiting on it right now still sees it.
                oldest.notify_one();
                self.shed.inc();
            }
        }
        g.queue.push_back((id, evict.clone()));
        drop(g);
        HandshakeSlot {
            gate: self.clone(),
            id,
            evict,
        }
    }

    /// Handshakes pending now.
    pub fn pending(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue
            .len()
    }
}

impl HandshakeSlot {
    /// Resolves when a newer handshake took this one's place.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut g = self.gate.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(i) = g.queue.binary_search_by_key(&self.id, |e| e.0) {
            g.queue.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// What the handler hands back to the test: the connection and its
    /// guards, so the test decides when the connection ends.
    type Accepted = (TcpStream, ConnGuards);

    struct Loop {
        addr: SocketAddr,
        tracker: Arc<Tracker>,
        stop: watch::Sender<bool>,
        accepted: mpsc::UnboundedReceiver<Accepted>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start_loop(max_connections: usize) -> Loop {
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let tracker = Arc::new(Tracker::default());
        let (stop, stop_rx) = watch::channel(false);
        let (tx, accepted) = mpsc::unbounded_channel::<Accepted>();
        let task = tokio::spawn(accept_loop(
            listener,
            max_connections,
            tracker.clone(),
            stop_rx,
            move |tcp, _remote, guards| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((tcp, guards));
                }
            },
        ));
        Loop {
            addr,
            tracker,
            stop,
            accepted,
            task,
        }
    }

    const SOON: Duration = Duration::from_secs(2);
    const A_WHILE: Duration = Duration::from_millis(150);

    async fn next(l: &mut Loop) -> Accepted {
        tokio::time::timeout(SOON, l.accepted.recv())
            .await
            .expect("no connection handed to the handler")
            .expect("loop ended")
    }

    async fn none_within(l: &mut Loop, d: Duration) {
        if let Ok(got) = tokio::time::timeout(d, l.accepted.recv()).await {
            panic!("handler called: {:?}", got.map(|(t, _)| t.peer_addr()));
        }
    }

    #[tokio::test]
    async fn at_max_connections_the_loop_stops_accepting_until_one_ends() {
        let mut l = start_loop(2);
        let _c1 = TcpStream::connect(l.addr).await.expect("connect 1");
        let first = next(&mut l).await;
        // Requests and responses are small: no waiting for Nagle.
        assert!(first.0.nodelay().expect("nodelay"));
        let _c2 = TcpStream::connect(l.addr).await.expect("connect 2");
        let second = next(&mut l).await;
        // The third client's connect succeeds (the kernel backlog holds
        // it) but the proxy does not take it.
        let _c3 = TcpStream::connect(l.addr).await.expect("connect 3");
        none_within(&mut l, A_WHILE).await;
        drop(first);
        let third = next(&mut l).await;
        none_within(&mut l, Duration::from_millis(50)).await;
        drop((second, third));
        let _c4 = TcpStream::connect(l.addr).await.expect("connect 4");
        next(&mut l).await;
        l.task.abort();
    }

    #[tokio::test]
    async fn the_tracker_counts_connections_until_their_guards_drop() {
        let mut l = start_loop(10);
        let _c1 = TcpStream::connect(l.addr).await.expect("connect");
        let _c2 = TcpStream::connect(l.addr).await.expect("connect");
        let a = next(&mut l).await;
        let b = next(&mut l).await;
        let tracker = l.tracker.clone();
        let idle = tokio::spawn(async move { tracker.wait_idle().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!idle.is_finished(), "idle with two connections live");
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!idle.is_finished(), "idle with one connection live");
        drop(b);
        tokio::time::timeout(SOON, idle)
            .await
            .expect("not idle after the last guard dropped")
            .expect("task");
        l.task.abort();
    }

    #[tokio::test]
    async fn wait_idle_returns_at_once_without_connections_and_waits_for_guards() {
        let tracker = Arc::new(Tracker::default());
        tokio::time::timeout(Duration::from_millis(50), tracker.wait_idle())
            .await
            .expect("no connection: idle");
        let guards: Vec<TrackGuard> = (0..3).map(|_| tracker.track()).collect();
        let waiter = tokio::spawn({
            let tracker = tracker.clone();
            async move { tracker.wait_idle().await }
        });
        for g in guards {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!waiter.is_finished());
            drop(g);
        }
        tokio::time::timeout(SOON, waiter)
            .await
            .expect("idle")
            .expect("task");
        // Reusable: another round of connections, another wait.
        let g = tracker.track();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), tracker.wait_idle())
                .await
                .is_err()
        );
        drop(g);
        tracker.wait_idle().await;
    }

    #[tokio::test]
    async fn the_stop_flag_ends_the_loop_while_it_waits_to_accept() {
        let l = start_loop(4);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!l.task.is_finished());
        l.stop.send(true).expect("loop listening");
        tokio::time::timeout(SOON, l.task)
            .await
            .expect("loop did not stop")
            .expect("task");
        // The listener is closed with it.
        assert!(TcpStream::connect(l.addr).await.is_err());
    }

    #[tokio::test]
    async fn the_stop_flag_ends_the_loop_at_the_connection_limit_and_connections_live_on() {
        let mut l = start_loop(1);
        let _c1 = TcpStream::connect(l.addr).await.expect("connect");
        let held = next(&mut l).await;
        l.stop.send(true).expect("loop listening");
        tokio::time::timeout(SOON, &mut l.task)
            .await
            .expect("loop did not stop")
            .expect("task");
        // Drain waits for the connections still open.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), l.tracker.wait_idle())
                .await
                .is_err()
        );
        drop(held);
        tokio::time::timeout(SOON, l.tracker.wait_idle())
            .await
            .expect("idle");
    }

    #[tokio::test]
    async fn the_handshake_gate_sheds_the_oldest_pending_handshake() {
        let shed = prometheus::IntCounter::new("shed", "shed").expect("counter");
        let gate = HandshakeGate::new(2, shed.clone());
        let a = gate.admit();
        let b = gate.admit();
        assert_eq!(gate.pending(), 2);
        let c = gate.admit();
        assert_eq!(gate.pending(), 2);
        assert_eq!(shed.get(), 1);
        tokio::time::timeout(Duration::from_millis(100), a.evicted())
            .await
            .expect("the oldest is told to go");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), b.evicted())
                .await
                .is_err(),
            "a newer handshake was shed"
        );
        // A finished handshake leaves room: nobody else is shed.
        drop(b);
        let _d = gate.admit();
        assert_eq!(shed.get(), 1);
        drop(a);
        assert_eq!(gate.pending(), 2);
        drop(c);
        assert_eq!(gate.pending(), 1);
    }
}

/// The outbound's open app connections, for the memory budget to shed
/// (`memory.rs`): they are all one holder's, the pod's own app, whose
/// unfinished heads or uploads to a slow upstream fill the sidecar as a
/// caller's would. Those with no request in flight go first, then the
/// newest.
pub struct AppConns {
    open: Mutex<AppOpen>,
    /// The app's share of the memory budget (`memory::Holder`).
    holder: Arc<Holder>,
}

impl Default for AppConns {
    fn default() -> AppConns {
        AppConns {
            open: Mutex::default(),
            holder: Arc::new(Holder::app()),
        }
    }
}

#[derive(Default)]
struct AppOpen {
    by_id: std::collections::HashMap<u64, (Activity, CancellationToken)>,
    next: u64,
}

/// One app connection's entry, removed on drop.
pub struct AppConn {
    conns: Arc<AppConns>,
    id: u64,
    close: CancellationToken,
}

impl AppConns {
    /// The app's share of the memory budget (`memory.rs`).
    pub fn holder(&self) -> Arc<Holder> {
        self.holder.clone()
    }

    /// Registers a connection whose requests in flight `activity` counts.
    pub fn register(self: &Arc<Self>, activity: Activity) -> AppConn {
        let close = CancellationToken::new();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let id = open.next;
        open.next += 1;
        open.by_id.insert(id, (activity, close.clone()));
        AppConn {
            conns: self.clone(),
            id,
            close,
        }
    }
}

impl AppConn {
    /// Resolves when the connection is to be closed.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    /// The app's share of the memory budget, shared by all its
    /// connections.
    pub fn holder(&self) -> Arc<Holder> {
        self.conns.holder.clone()
    }
}

impl Drop for AppConn {
    fn drop(&mut self) {
        let mut open = self.conns.open.lock().unwrap_or_else(|p| p.into_inner());
        open.by_id.remove(&self.id);
    }
}

impl Shed for AppConns {
    fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .len()
    }

    fn largest(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.by_id
            .values()
            .filter(|(_, close)| !close.is_cancelled())
            .count()
    }

    fn shed(&self, n: usize) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut live: Vec<(bool, u64, &CancellationToken)> = open
            .by_id
            .iter()
            .filter(|(_, (_, close))| !close.is_cancelled())
            .map(|(&id, (activity, close))| {
                let busy = activity.load(Ordering::Relaxed) & (PROGRESS - 1) != 0;
                (busy, id, close)
            })
            .collect();
        // Idle first, then the newest.
        live.sort_unstable_by_key(|&(busy, id, _)| (busy, std::cmp::Reverse(id)));
        live.iter().take(n).for_each(|(_, _, close)| close.cancel());
        live.len().min(n)
    }

    fn calm(&self) {}

    fn take_refused(&self) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod app_conns_tests {
    use super::*;

    #[test]
    fn the_apps_idle_connections_are_shed_first_then_the_newest() {
        let conns = Arc::new(AppConns::default());
        let busy = || Activity::new(std::sync::atomic::AtomicU64::new(1));
        let c: Vec<AppConn> = [busy(), Activity::default(), busy(), Activity::default()]
            .into_iter()
            .map(|a| conns.register(a))
            .collect();
        let closed = |c: &AppConn| c.close.is_cancelled();
        assert_eq!((conns.open(), conns.largest()), (4, 4));
        assert_eq!(conns.shed(3), 3);
        assert_eq!(
            c.iter().map(closed).collect::<Vec<_>>(),
            [false, true, true, true]
        );
        assert_eq!(conns.largest(), 1);
        assert_eq!(conns.shed(5), 1);
        drop(c);
        assert_eq!(conns.open(), 0);
    }
}
