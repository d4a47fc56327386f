//! The admin listener of `keyproof-ca serve` (`--admin-listen`): plain
//! HTTP/1.1 for the kubelet's probes and Prometheus' scrapes, with tight
//! limits so that it never competes with the API for long and cannot be
//! starved: idle or slow sockets are evicted when it is full (see
//! [`AdminSlots`]). What it answers (`/healthz`, `/ready`, `/metrics`) is
//! the server's business, passed in as a function.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// The admin listener serves probes and scrapes: a few small requests, so
/// its limits are tight and it never competes with the API for long. A
/// request head must arrive within this long of the connection opening or
/// of the previous answer, which also bounds how long a kept-alive
/// connection may sit idle (hyper runs this timer while it waits for the
/// next request).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// A kept-alive admin connection is closed (gracefully) after this long; a
/// scraper simply reconnects.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Open admin connections. At the limit a new connection evicts the oldest
/// one that is waiting for a request (see [`AdminSlots`]), so idle or slow
/// sockets cannot keep the kubelet's probes out.
const MAX_CONNECTIONS: usize = 64;
/// hyper's smallest read buffer; admin requests carry no body.
const MAX_BUF: usize = 8192;
/// One open admin connection, as [`AdminSlots`] sees it.
struct AdminConn {
    /// When it opened or last began a request ([`AdminSlots::now`]).
    last_active: AtomicU64,
    /// Whether a complete request head has arrived on it.
    requested: AtomicBool,
    /// Closes the connection.
    evict: Notify,
}

/// The admin listener's open connections. When all [`MAX_CONNECTIONS`]
/// are taken, a new one evicts the oldest connection that has not sent a
/// complete request yet, or failing that the one idle the longest: an
/// unauthenticated client holding sockets open (idle, or sending a request
/// head byte by byte) never locks out a probe, it only loses its own sockets.
struct AdminSlots {
    open: Mutex<HashMap<u64, Arc<AdminConn>>>,
    next: AtomicU64,
    epoch: Instant,
}

/// A connection's place in [`AdminSlots`], given up when dropped.
struct AdminSlot {
    slots: Arc<AdminSlots>,
    id: u64,
    conn: Arc<AdminConn>,
}

impl AdminSlots {
    fn new() -> Arc<AdminSlots> {
        Arc::new(AdminSlots {
            open: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Microseconds since the listener started: a cheap, ordered stamp.
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Takes a slot for a new connection, evicting another at the limit.
    fn admit(self: &Arc<Self>) -> AdminSlot {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= MAX_CONNECTIONS {
            let victim = open
                .iter()
                .min_by_key(|(id, c)| {
                    (
                        c.requested.load(Ordering::Relaxed),
                        c.last_active.load(Ordering::Relaxed),
                        // Ids grow with time: the older of a tie.
                        **id,
                    )
                })
                .map(|(id, _)| *id);
            if let Some(conn) = victim.and_then(|id| open.remove(&id)) {
                tracing::debug!(
                    requested = conn.requested.load(Ordering::Relaxed),
                    "admin connections at the limit; closing the oldest idle one"
                );
                conn.evict.notify_one();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(AdminConn {
            last_active: AtomicU64::new(self.now()),
            requested: AtomicBool::new(false),
            evict: Notify::new(),
        });
        open.insert(id, conn.clone());
        AdminSlot {
            slots: self.clone(),
            id,
            conn,
        }
    }
}

impl Drop for AdminSlot {
    fn drop(&mut self) {
        self.slots
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Serves `answer` on the admin listener for as long as the task runs.
pub async fn serve<F>(listener: TcpListener, answer: Arc<F>)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let slots = AdminSlots::new();
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = slots.admit();
        let answer = answer.clone();
        tokio::spawn(async move {
            let conn = slot.conn.clone();
            let slots = slot.slots.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                conn.requested.store(true, Ordering::Relaxed);
                conn.last_active.store(slots.now(), Ordering::Relaxed);
                let r = answer(&req);
                async move { Ok::<_, Infallible>(r) }
            });
            // The header timeout also runs while a kept-alive connection
            // waits for its next request, so it is the idle limit too.
            let http = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_BUF)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(http);
            tokio::select! {
                _ = http.as_mut() => {}
                // Dropping the connection closes the socket.
                _ = slot.conn.evict.notified() => {}
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    http.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_TIMEOUT, http).await;
                }
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_limit_the_oldest_connection_without_a_request_is_evicted() {
        let slots = AdminSlots::new();
        let mut held: Vec<AdminSlot> = (0..MAX_CONNECTIONS).map(|_| slots.admit()).collect();
        // The first one has served a request recently: it is kept.
        held[0].conn.requested.store(true, Ordering::Relaxed);
        held[0]
            .conn
            .last_active
            .store(slots.now(), Ordering::Relaxed);
        let newcomer = slots.admit();
        assert_eq!(slots.open.lock().unwrap().len(), MAX_CONNECTIONS);
        assert!(
            !slots.open.lock().unwrap().contains_key(&held[1].id),
            "the oldest idle one goes"
        );
        assert!(slots.open.lock().unwrap().contains_key(&held[0].id));
        assert!(slots.open.lock().unwrap().contains_key(&newcomer.id));
        // Once every other connection has made a request, the one idle the
        // longest goes.
        for s in &held[2..] {
            s.conn.requested.store(true, Ordering::Relaxed);
            s.conn
                .last_active
                .store(slots.now() + 10, Ordering::Relaxed);
        }
        newcomer.conn.requested.store(true, Ordering::Relaxed);
        newcomer
            .conn
            .last_active
            .store(slots.now() + 10, Ordering::Relaxed);
        let _third = slots.admit();
        assert!(!slots.open.lock().unwrap().contains_key(&held[0].id));
        // A closed connection frees its slot.
        let id = held.pop().unwrap().id;
        assert!(!slots.open.lock().unwrap().contains_key(&id));
    }
}
