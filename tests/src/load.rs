//! Steady request load through an outbound sidecar, for "nothing failed
//! while the configuration changed" tests: a few kept-alive HTTP/1.1
//! connections, each sending one request after another until stopped, every
//! status recorded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

/// A running load; [`Load::stop`] ends it and returns what happened.
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    statuses: Arc<Mutex<Vec<u16>>>,
    rt: Option<tokio::runtime::Runtime>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn one_connection(
    outbound: SocketAddr,
    uri: http::Uri,
    authority: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    statuses: Arc<Mutex<Vec<u16>>>,
) {
    let record = |s: u16| {
        statuses.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        done.fetch_add(1, Ordering::SeqCst);
    };
    while !stop.load(Ordering::SeqCst) {
        let Ok(tcp) = tokio::net::TcpStream::connect(outbound).await else {
            record(0);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok((mut send, conn)) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await
        else {
            record(0);
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::SeqCst) {
            let req = http::Request::get(uri.clone())
                .header(http::header::HOST, &authority)
                .body(Empty::<Bytes>::new())
                .expect("request");
            let sent = tokio::time::timeout(Duration::from_secs(15), send.send_request(req)).await;
            match sent {
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await;
                    record(if body.is_ok() { status } else { 0 });
                }
                _ => {
                    // A connection the sidecar closed, or no answer: a
                    // failed request; start a new connection.
                    record(0);
                    break;
                }
            }
        }
    }
}

impl Load {
    /// Starts `connections` loops of `GET http://{authority}{path}` through
    /// the outbound sidecar at `outbound`.
    pub fn start(outbound: SocketAddr, authority: &str, path: &str, connections: usize) -> Load {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let uri: http::Uri = format!("http://{authority}{path}").parse().expect("uri");
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..connections)
            .map(|_| {
                rt.spawn(one_connection(
                    outbound,
                    uri.clone(),
                    authority.to_owned(),
                    stop.clone(),
                    done.clone(),
                    statuses.clone(),
                ))
            })
            .collect();
        Load {
            stop,
            done,
            statuses,
            rt: Some(rt),
            tasks,
        }
    }

    /// Requests answered (or failed) so far.
    pub fn done(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits (up to `timeout`) until at least `n` more requests than now
    /// have completed; returns whether they did.
    pub fn wait_more(&self, n: usize, timeout: Duration) -> bool {
        let target = self.done() + n;
        let start = Instant::now();
        while self.done() < target {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Stops the load (letting requests in flight finish) and returns every
    /// status, 0 for a request that got no response.
    pub fn stop(mut self) -> Vec<u16> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = self.rt.take() {
            for t in self.tasks.drain(..) {
                let _ =
                    rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), t).await });
            }
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        let s = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        s.clone()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_millis(100));
        }
    }
}
