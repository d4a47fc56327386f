//! Resources a caller can hold: idle HTTP/2 connections, pending TLS
//! handshakes, stalled request bodies and app connections. Each test runs
//! the real proxy with small limits and measures a legitimate caller
//! alongside the abuse: it must keep being served within a stated bound.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, Incoming};
use keyproof_tests::free_port;
use keyproof_tests::proxy_support::*;
use rustls_pki_types::ServerName;

async fn mtls(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("mTLS handshake")
}

/// An HTTP/2 connection over mutual TLS; the task drives it and ends when
/// the connection does.
async fn h2_conn<B>(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    ping_every: Option<Duration>,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<()>,
)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = mtls(addr, cfg).await;
    let mut b = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.timer(hyper_util::rt::TokioTimer::new());
    if let Some(every) = ping_every {
        b.keep_alive_interval(every)
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
    }
    let (send, conn) = b
        .handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A trust domain, the inbound's and a caller's SVIDs, and the echo app.
struct World {
    pki: Pki,
    server: Cert,
    web: Cert,
    /// The caller that is not the flood's: every limit leaves it room.
    legit: Cert,
    app: EchoApp,
}

impl World {
    fn new() -> World {
        let pki = Pki::new("resources.test");
        let server = pki.issue("server", "/ns/default/sa/api");
        let web = pki.issue("web", "/ns/default/sa/web");
        let legit = pki.issue("legit", "/ns/default/sa/legit");
        World {
            pki,
            server,
            web,
            legit,
            app: EchoApp::start(),
        }
    }

    /// An inbound in front of `app` with `extra` `[inbound]` keys.
    fn inbound(&self, name: &str, app: SocketAddr, extra: &str) -> (ProxyProc, SocketAddr) {
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let proxy = ProxyProc::start(
            self.pki.tmp.path(),
            name,
            &format!(
                "{}[inbound]\nlisten = \"127.0.0.1:{port}\"\napp = \"{app}\"\n{extra}\n[admin]\nlisten = \"{admin}\"\n",
                identity_toml(&self.pki.bundle, &self.server),
            ),
            admin,
        );
        (proxy, format!("127.0.0.1:{port}").parse().unwrap())
    }

    /// One legitimate request with curl (a new connection, HTTP/1.1):
    /// status and how long it took.
    fn legit(&self, inbound: SocketAddr, path: &str) -> (u16, Duration) {
        let (crt, key, ca) = (
            self.legit.crt.display().to_string(),
            self.legit.key.display().to_string(),
            self.pki.bundle.display().to_string(),
        );
        let resolve = format!("localhost:{}:127.0.0.1", inbound.port());
        let url = format!("https://localhost:{}{path}", inbound.port());
        let start = Instant::now();
        let (code, _, _) = curl(&[
            "--http1.1",
            "--cert",
            &crt,
            "--key",
            &key,
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            &url,
        ]);
        (code, start.elapsed())
    }
}

/// Idle: an HTTP/2 connection with no stream open is closed at
/// `idle_timeout`, even while the peer PINGs every 200 ms; `max_connections`
/// such connections therefore lock a legitimate caller out for at most
/// about two idle periods.
#[test]
fn idle_h2_connections_are_closed_even_while_pinging() {
    let w = World::new();
    let (proxy, addr) = w.inbound(
        "idle",
        w.app.addr,
        "idle_timeout = \"1s\"\nmax_connections = 2\n",
    );
    let rt = rt();
    let cfg = client_tls(&w.pki, &w.web, b"h2");
    let start = Instant::now();
    let (holders, sends): (Vec<_>, Vec<_>) = rt.block_on(async {
        let mut holders = Vec::new();
        let mut sends = Vec::new();
        for _ in 0..2 {
            let (send, task) =
                h2_conn::<Empty<Bytes>>(addr, cfg.clone(), Some(Duration::from_millis(200))).await;
            holders.push(task);
            sends.push(send);
        }
        (holders, sends)
    });
    // Both slots are held: a legitimate caller is served once they go.
    let (code, took) = w.legit(addr, "/legit");
    assert_eq!(code, 200, "{}", proxy.log_text());
    assert!(
        took < Duration::from_secs(4),
        "the legitimate caller waited {took:?} behind idle h2 connections"
    );
    rt.block_on(async {
        for h in holders {
            tokio::time::timeout(Duration::from_secs(4), h)
                .await
                .expect("an h2 connection with no stream, only PINGs, was kept past 2 idle periods")
                .expect("driver");
        }
    });
    let closed = start.elapsed();
    assert!(
        closed >= Duration::from_secs(1),
        "closed before idle_timeout: {closed:?}"
    );
    drop(sends);
}

/// One caller holds at most `max_connections_per_peer` (three quarters
/// of `max_connections` by default) of the connection places: one that
/// opens many more connections than places and keeps them (a request now
/// and then, within `idle_timeout`) leaves a quarter to the others, whose
/// requests are served at once. Its connections beyond its share are
/// closed after their handshake: waiting, they would hold the accept
/// loop's places (`max_connections` + `max_handshakes`) from everyone.
#[test]
fn one_caller_cannot_hold_every_connection_place() {
    let w = World::new();
    let (proxy, addr) = w.inbound(
        "places",
        w.app.addr,
        "idle_timeout = \"30s\"\nmax_connections = 4\nmax_handshakes = 2\n",
    );
    let rt = rt();
    let cfg = client_tls(&w.pki, &w.web, b"h2");
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..12 {
            // The first three take three places; the rest are beyond
            // their caller's share.
            // One handshake at a time (`max_handshakes` sheds the oldest
            // of more): an HTTP/2 handshake refused by a closed connection
            // panics its task, which is what those beyond the share see.
            held.push(tokio::spawn(h2_conn::<Empty<Bytes>>(
                addr,
                cfg.clone(),
                None,
            )));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        held
    });
    let (code, took) = w.legit(addr, "/other-caller");
    assert_eq!(code, 200, "{}", proxy.log_text());
    assert!(
        took < Duration::from_secs(2),
        "another caller waited {took:?} behind one caller's connections"
    );
    assert!(
        proxy
            .log_text()
            .contains("its caller holds max_connections_per_peer connections already"),
        "{}",
        proxy.log_text()
    );
    for h in held {
        h.abort();
    }
}

/// A caller the deny list names keeps no idle connection: its requests
/// get 403, and its connection ends within `header_read_timeout` even if
/// it never sends one (HTTP/2 without a preface would otherwise be held
/// until `idle_timeout`).
#[test]
fn a_deny_listed_caller_holds_no_idle_connection() {
    let w = World::new();
    let (proxy, addr) = w.inbound(
        "denied",
        w.app.addr,
        "idle_timeout = \"60s\"\nheader_read_timeout = \"1s\"\n\
         [[inbound.deny]]\nspiffe_id = \"spiffe://resources.test/ns/default/sa/web\"\n",
    );
    let rt = rt();
    let cfg = client_tls(&w.pki, &w.web, b"h2");
    rt.block_on(async {
        let (_send, task) = h2_conn::<Empty<Bytes>>(addr, cfg, None).await;
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a deny-listed caller's idle connection outlived header_read_timeout")
            .expect("driver");
    });
    assert_eq!(w.legit(addr, "/other").0, 200, "{}", proxy.log_text());
}

/// Handshakes: a flood of connections that never finish their TLS
/// handshake (about 200 new ones a second for 4 s, up to 500 held open)
/// takes neither the connection slots nor the memory: every legitimate
/// request during the flood completes within 2 s, the pending handshakes
/// shed are counted, and the inbound's RSS grows by less than 24 MB.
#[test]
fn a_handshake_flood_does_not_starve_authenticated_callers() {
    let w = World::new();
    let (proxy, addr) = w.inbound(
        "flood",
        w.app.addr,
        "handshake_timeout = \"10s\"\nmax_connections = 4\nmax_handshakes = 32\n",
    );
    assert_eq!(w.legit(addr, "/warm").0, 200);
    let rss_before = rss_kib(proxy.pid());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = VecDeque::new();
            let mut opened = 0usize;
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(6) {
                if let Ok(s) = TcpStream::connect(addr) {
                    held.push_back(s);
                    opened += 1;
                }
                if held.len() > 500 {
                    held.pop_front();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut served = 0;
    let mut peak_rss = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (code, took) = w.legit(addr, "/during-flood");
        assert_eq!(code, 200, "{}", proxy.log_text());
        assert!(
            took < Duration::from_secs(2),
            "a legitimate request took {took:?} during the handshake flood"
        );
        served += 1;
        peak_rss = peak_rss.max(rss_kib(proxy.pid()));
    }
    stop.store(true, Ordering::Relaxed);
    let opened = flood.join().expect("flood thread");
    assert!(served >= 3, "only {served} legitimate requests");
    assert!(opened > 300, "the flood opened only {opened} connections");
    let shed = proxy.metric("keyproof_tls_handshakes_shed_total{direction=\"inbound\"}");
    assert!(
        shed > 0.0,
        "no handshake was shed while {opened} were opened"
    );
    assert!(
        peak_rss < rss_before + 24 * 1024,
        "RSS grew from {rss_before} to {peak_rss} KiB"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A request body that sends `first` and then nothing, for ever.
struct Stalling(Option<Bytes>);

impl Body for Stalling {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

/// Writes `head` and part of a body on `s`, then waits: returns the
/// response text (up to EOF) and how long it took.
fn stall_h1<S: Read + Write>(s: &mut S, head: &str) -> (String, Duration) {
    let start = Instant::now();
    s.write_all(head.as_bytes()).expect("write head");
    s.write_all(b"0123456789").expect("write part of the body");
    s.flush().expect("flush");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("no answer after {:?}", start.elapsed())
            }
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

/// `body_timeout`: a request body that stops making progress ends its
/// request with 408 (HTTP/1.1: and its connection) within about one
/// timeout, on the inbound (HTTP/1.1 and HTTP/2) and the outbound's own
/// HTTP/1.1 server; a caller on another connection is served meanwhile
/// within 1 s.
#[test]
fn a_stalled_request_body_ends_with_408() {
    let w = World::new();
    let (inbound, in_addr) = w.inbound("stall-in", w.app.addr, "body_timeout = \"1s\"\n");
    let rt = rt();

    // Inbound, HTTP/1.1 over mutual TLS.
    let cfg = client_tls(&w.pki, &w.web, b"http/1.1");
    let legit = std::thread::scope(|sc| {
        let l = sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            w.legit(in_addr, "/meanwhile")
        });
        let (text, took) = rt.block_on(async {
            let tls = mtls(in_addr, cfg.clone()).await;
            let (io, conn) = tls.into_inner();
            let io = io.into_std().expect("std");
            io.set_nonblocking(false).expect("blocking");
            io.set_read_timeout(Some(Duration::from_secs(8)))
                .expect("timeout");
            let mut tls = rustls::StreamOwned::new(conn, io);
            tokio::task::block_in_place(|| {
                stall_h1(
                    &mut tls,
                    "POST /upload HTTP/1.1\r\nhost: api\r\ncontent-length: 100\r\n\r\n",
                )
            })
        });
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "{text}\n{}",
            inbound.log_text()
        );
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "408 after {took:?}"
        );
        l.join().expect("legit")
    });
    assert_eq!(legit.0, 200);
    assert!(legit.1 < Duration::from_secs(3), "legit took {:?}", legit.1);

    // Inbound, HTTP/2: the stream ends with 408.
    let h2cfg = client_tls(&w.pki, &w.web, b"h2");
    rt.block_on(async {
        let (mut send, _task) = h2_conn::<Stalling>(in_addr, h2cfg.clone(), None).await;
        let req = http::Request::post(format!("https://localhost:{}/upload", in_addr.port()))
            .header("content-length", "100")
            .body(Stalling(Some(Bytes::from_static(b"0123456789"))))
            .unwrap();
        let start = Instant::now();
        let resp = tokio::time::timeout(Duration::from_secs(6), send.send_request(req))
            .await
            .expect("an HTTP/2 request with a stalled body was never answered")
            .expect("response");
        assert_eq!(resp.status(), 408);
        let took = start.elapsed();
        assert!(took < Duration::from_secs(4), "408 after {took:?}");
    });

    // Outbound, its own HTTP/1.1 server: an inbound with a long body
    // timeout behind it, so that the 408 is the outbound's.
    let (_in2, in2_addr) = w.inbound("stall-in2", w.app.addr, "body_timeout = \"30s\"\n");
    let out_port = free_port();
    let out_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let outbound = ProxyProc::start(
        w.pki.tmp.path(),
        "stall-out",
        &format!(
            "{}[outbound]\nlisten = \"127.0.0.1:{out_port}\"\nbody_timeout = \"1s\"\n[[outbound.upstreams]]\nhost = \"api\"\naddress = \"{in2_addr}\"\nidentity = \"{}\"\n[admin]\nlisten = \"{out_admin}\"\n",
            identity_toml(&w.pki.bundle, &w.web),
            w.pki.id("/ns/default/sa/api"),
        ),
        out_admin,
    );
    let out_addr: SocketAddr = format!("127.0.0.1:{out_port}").parse().unwrap();
    let mut s = TcpStream::connect(out_addr).expect("connect outbound");
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let meanwhile = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        let mut c = TcpStream::connect(out_addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /meanwhile HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut t = String::new();
        let _ = c.read_to_string(&mut t);
        (t, start.elapsed())
    });
    let (text, took) = stall_h1(
        &mut s,
        "POST /upload HTTP/1.1\r\nhost: api\r\ncontent-length: 100\r\n\r\n",
    );
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "{text}\n{}",
        outbound.log_text()
    );
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "408 after {took:?}"
    );
    let (t, took) = meanwhile.join().unwrap();
    assert!(t.starts_with("HTTP/1.1 200"), "{t}");
    assert!(took < Duration::from_secs(3), "meanwhile took {took:?}");
}

/// An app that answers every request after 300 ms and records the most
/// connections and requests it had open at once.
struct CountingApp {
    addr: SocketAddr,
    max_conns: Arc<AtomicUsize>,
    max_reqs: Arc<AtomicUsize>,
    total_conns: Arc<AtomicUsize>,
    _rt: Arc<tokio::runtime::Runtime>,
}

impl CountingApp {
    fn start() -> CountingApp {
        let rt = Arc::new(rt());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (max_conns, max_reqs, total_conns) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (mc, mr, tc) = (max_conns.clone(), max_reqs.clone(), total_conns.clone());
        rt.spawn(async move {
            let conns = Arc::new(AtomicUsize::new(0));
            let reqs = Arc::new(AtomicUsize::new(0));
            while let Ok((tcp, _)) = listener.accept().await {
                tc.fetch_add(1, Ordering::SeqCst);
                let n = conns.fetch_add(1, Ordering::SeqCst) + 1;
                mc.fetch_max(n, Ordering::SeqCst);
                let (conns, reqs, mr) = (conns.clone(), reqs.clone(), mr.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                        let (reqs, mr) = (reqs.clone(), mr.clone());
                        async move {
                            let n = reqs.fetch_add(1, Ordering::SeqCst) + 1;
                            mr.fetch_max(n, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            reqs.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                    conns.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        CountingApp {
            addr,
            max_conns,
            max_reqs,
            total_conns,
            _rt: rt,
        }
    }
}

/// Fires `n` concurrent GETs on one HTTP/2 connection; returns the
/// statuses.
async fn burst(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>, n: usize) -> Vec<u16> {
    let (mut send, _task) = h2_conn::<Empty<Bytes>>(addr, cfg, None).await;
    // One request first: by its answer the server's SETTINGS (its stream
    // limit) have arrived, so the burst waits for stream capacity instead
    // of racing them and being refused (REFUSED_STREAM) beyond the limit.
    let first = send
        .send_request(
            http::Request::get("https://localhost/first")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .expect("first request");
    let _ = first.into_body().collect().await;
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = http::Request::get(format!("https://localhost/{i}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            match send.send_request(req).await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    let _ = r.into_body().collect().await;
                    s
                }
                Err(_) => 0,
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or(0));
    }
    out
}

/// App connections: one HTTP/2 connection firing 40 requests at once
/// opens at most `max_app_connections` (4) to the app, every request is
/// served (waiting for a pooled connection), and a request on another
/// connection meanwhile completes within 2 s. `max_concurrent_streams`
/// bounds what one connection has in flight: with 3, the app never sees
/// more than 3 requests at once from it.
#[test]
fn one_connection_cannot_open_unbounded_app_connections() {
    let w = World::new();
    let app = CountingApp::start();
    let (proxy, addr) = w.inbound(
        "appcap",
        app.addr,
        "max_concurrent_streams = 8\nmax_app_connections = 4\napp_connect_timeout = \"10s\"\n",
    );
    let flood_rt = rt();
    let cfg = client_tls(&w.pki, &w.web, b"h2");
    let flood = {
        let cfg = cfg.clone();
        std::thread::spawn(move || flood_rt.block_on(burst(addr, cfg, 40)))
    };
    std::thread::sleep(Duration::from_millis(400));
    let (code, took) = w.legit(addr, "/meanwhile");
    let statuses = flood.join().expect("burst");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{statuses:?}\n{}",
        proxy.log_text()
    );
    assert_eq!(code, 200);
    assert!(
        took < Duration::from_secs(2),
        "the other caller took {took:?}"
    );
    let max = app.max_conns.load(Ordering::SeqCst);
    assert!(max <= 4, "the app saw {max} connections at once");
    assert!(
        app.total_conns.load(Ordering::SeqCst) <= 8,
        "connections were not reused: {}",
        app.total_conns.load(Ordering::SeqCst)
    );

    let app2 = CountingApp::start();
    let (_proxy2, addr2) = w.inbound("streams", app2.addr, "max_concurrent_streams = 3\n");
    let statuses = rt().block_on(burst(addr2, cfg, 20));
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let max = app2.max_reqs.load(Ordering::SeqCst);
    assert!(
        max <= 3,
        "one connection had {max} requests in flight at once"
    );
}

/// HTTP/1.1 on the inbound: a request head trickled a field every 300 ms
/// is cut at `header_read_timeout` (1 s), and a keep-alive connection
/// with no next request is closed within about the same bound (well before
/// `idle_timeout`); a new caller is then served at once.
#[test]
fn trickled_heads_and_idle_keep_alive_are_bounded() {
    let w = World::new();
    let (proxy, addr) = w.inbound(
        "trickle",
        w.app.addr,
        "header_read_timeout = \"1s\"\nidle_timeout = \"30s\"\n",
    );
    let rt = rt();
    let cfg = client_tls(&w.pki, &w.web, b"http/1.1");
    let open_tls = |cfg: Arc<rustls::ClientConfig>| {
        rt.block_on(async {
            let tls = mtls(addr, cfg).await;
            let (io, conn) = tls.into_inner();
            let io = io.into_std().expect("std");
            io.set_nonblocking(false).expect("blocking");
            io.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            rustls::StreamOwned::new(conn, io)
        })
    };
    // Reads what is there; true once the server has closed.
    fn closed<S: Read>(s: &mut S, seen: &mut Vec<u8>) -> bool {
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                false
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                false
            }
            Err(_) => true,
        }
    }

    let mut t = open_tls(cfg.clone());
    let start = Instant::now();
    t.write_all(b"GET /trickle HTTP/1.1\r\nhost: api\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut i = 0;
    let cut = loop {
        if closed(&mut t, &mut seen) || t.write_all(format!("x-{i}: a\r\n").as_bytes()).is_err() {
            break start.elapsed();
        }
        i += 1;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a trickled head was kept for {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(cut < Duration::from_millis(2500), "cut after {cut:?}");
    let text = String::from_utf8_lossy(&seen);
    assert!(
        !text.contains(" 200 "),
        "a trickled head was served: {text}\n{}",
        proxy.log_text()
    );

    // Keep-alive: one request, then silence.
    let mut k = open_tls(cfg);
    k.write_all(b"GET /once HTTP/1.1\r\nhost: api\r\n\r\n")
        .unwrap();
    let start = Instant::now();
    let mut seen = Vec::new();
    while !closed(&mut k, &mut seen) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "an idle keep-alive connection was kept for {:?}",
            start.elapsed()
        );
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    let (code, took) = w.legit(addr, "/meanwhile");
    assert_eq!(code, 200);
    assert!(took < Duration::from_secs(3), "legit took {took:?}");
}

/// The inbound's stream limit (100) does not refuse a burst through the
/// mesh: 250 requests at once through an outbound whose HTTP/2 connection
/// to the inbound is new all succeed (they queue for stream capacity).
#[test]
fn a_burst_through_a_new_mesh_connection_is_not_refused() {
    let w = World::new();
    let (_inbound, in_addr) = w.inbound("burst-in", w.app.addr, "");
    let out_port = free_port();
    let out_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _outbound = ProxyProc::start(
        w.pki.tmp.path(),
        "burst-out",
        &format!(
            "{}[outbound]\nlisten = \"127.0.0.1:{out_port}\"\n[[outbound.upstreams]]\nhost = \"api\"\naddress = \"{in_addr}\"\nidentity = \"{}\"\n[admin]\nlisten = \"{out_admin}\"\n",
            identity_toml(&w.pki.bundle, &w.web),
            w.pki.id("/ns/default/sa/api"),
        ),
        out_admin,
    );
    let statuses = rt().block_on(async move {
        let mut tasks = Vec::new();
        for i in 0..250 {
            tasks.push(tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", out_port))
                    .await
                    .expect("connect");
                s.write_all(
                    format!("GET /b{i} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .expect("write");
                let mut t = String::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut t)).await;
                t.split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse::<u16>().ok())
                    .unwrap_or(0)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or(0));
        }
        out
    });
    let bad: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(bad.is_empty(), "{} of 250 failed: {bad:?}", bad.len());
}

/// Memory: one caller's connections, each holding an unfinished request
/// head just under `max_header_bytes`, cannot take the sidecar far past
/// `runtime.memory_limit` (the OOM kill of a pod's sidecar was a few
/// hundred such connections away). Past the caller's share of the head
/// budget, and above the limit, that caller's connections are closed and
/// counted; another caller is served throughout; resident memory comes
/// back down once the flood has gone.
#[test]
fn one_callers_unfinished_heads_are_shed_at_the_memory_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LIMIT_MIB: u64 = 40;
    const FLOOD: usize = 600;
    let w = World::new();
    let (proxy, addr) = w.inbound(
        "memory",
        w.app.addr,
        &format!("\n[runtime]\nmemory_limit = \"{LIMIT_MIB}Mi\"\n"),
    );
    assert_eq!(w.legit(addr, "/warm").0, 200, "{}", proxy.log_text());
    let limit = proxy.metric("keyproof_memory_limit_bytes");
    assert_eq!(limit, (LIMIT_MIB << 20) as f64, "{}", proxy.metrics());
    // What the process holds outside the heap (code, stacks) is not
    // the limit's: RSS is compared with it added.
    let start_kib = rss_kib(proxy.pid());
    let rt = rt();
    let cfg = client_tls(&w.pki, &w.web, b"http/1.1");
    let head = format!("GET / HTTP/1.1\r\nhost: x\r\nx-a: {}", "a".repeat(60_000));
    let pid = proxy.pid();
    let (held, peak_rss) = rt.block_on(async {
        let mut held = Vec::new();
        let mut peak_rss = 0;
        for i in 0..FLOOD {
            let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
                continue;
            };
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await;
            // A connection of a caller being shed is closed as soon as
            // its handshake names it.
            let Ok(mut tls) = tls else { continue };
            if tls.write_all(head.as_bytes()).await.is_ok() {
                held.push(tls);
            }
            if i % 50 == 0 {
                peak_rss = peak_rss.max(rss_kib(pid));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        (held, peak_rss.max(rss_kib(pid)))
    });
    // Another caller is served while the flood is held.
    for _ in 0..3 {
        let (code, took) = w.legit(addr, "/during-flood");
        assert_eq!(code, 200, "{}", proxy.log_text());
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
    let shed = proxy.metric("keyproof_memory_shed_connections_total");
    // How many of the flood's connections the sidecar closed: a read
    // ends at once on those, and waits on the others.
    let open = rt.block_on(async {
        let mut open = 0;
        for mut s in held {
            let mut b = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await {
                Err(_) => open += 1,
                Ok(Ok(0) | Err(_)) => {}
                Ok(Ok(_)) => open += 1,
            }
        }
        open
    });
    let refused = proxy.metric("keyproof_memory_refused_requests_total");
    eprintln!("RSS at start {start_kib} KiB, peak {peak_rss} KiB; shed {shed}, refused {refused}; flood connections still open {open}");
    // Heads past the caller's share of the budget are refused as they
    // grow; what the connections hold besides is shed above the limit.
    assert!(
        shed + refused > 0.0,
        "nothing shed or refused\n{}",
        proxy.log_text()
    );
    assert!(
        open < FLOOD / 2,
        "{open} of the flood's {FLOOD} connections stayed open"
    );
    // Without the limit: 152 MiB over a start of 20 MiB (debug build).
    assert!(
        peak_rss < start_kib + (LIMIT_MIB + 20) * 1024,
        "RSS went from {start_kib} KiB to {peak_rss} KiB with a {LIMIT_MIB} MiB limit"
    );
    assert!(
        shed == 0.0
            || proxy
                .log_text()
                .contains("memory above runtime.memory_limit: shedding connections"),
        "{}",
        proxy.log_text()
    );
    // The flood gone, freed pages go back to the system.
    let gone = Instant::now();
    let deadline = gone + Duration::from_secs(30);
    loop {
        let rss = rss_kib(pid);
        if rss < start_kib + LIMIT_MIB * 1024 / 4 {
            eprintln!("RSS {rss} KiB {:?} after the flood", gone.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RSS still {rss} KiB 30 s after the flood (peak {peak_rss} KiB)"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(w.legit(addr, "/after").0, 200);
}

/// Memory, HTTP/1.1 bursts: one caller opens its connections first, then
/// sends an unfinished head on every one at once, faster than a look at
/// the heap. An unfinished head is charged to its caller as it grows
/// (hyper's buffer and the line guard's copy); past the caller's share of
/// the budget the connection is closed, so the burst holds that share
/// and what each connection's transport buffers hold (about 30 KB).
/// Heads of 200 KB under a `max_header_bytes` of 256 KiB make the heads
/// what counts: a sidecar that charged only HTTP/2 heads went 64 MiB
/// above its start here.
#[test]
fn one_callers_burst_of_unfinished_heads_stays_within_the_memory_limit() {
    use tokio::io::AsyncWriteExt;
    const LIMIT_MIB: u64 = 40;
    const FLOOD: usize = 300;
    let w = World::new();
    let (proxy, addr) = w.inbound(
        "memory-h1-burst",
        w.app.addr,
        &format!("max_header_bytes = 262144\n[runtime]\nmemory_limit = \"{LIMIT_MIB}Mi\"\n"),
    );
    let pid = proxy.pid();
    let rt = rt();
    let cfg = client_tls(&w.pki, &w.web, b"http/1.1");
    let head = format!("GET / HTTP/1.1\r\nhost: x\r\nx-a: {}", "a".repeat(200_000));
    let (start_kib, peak_rss) = rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..FLOOD {
            if let Ok(tls) =
                tokio::time::timeout(Duration::from_secs(5), mtls(addr, cfg.clone())).await
            {
                conns.push(tls);
            }
        }
        assert!(conns.len() > FLOOD * 9 / 10, "{} connected", conns.len());
        let start_kib = rss_kib(pid);
        let writes: Vec<_> = conns
            .into_iter()
            .map(|mut tls| {
                let head = head.clone();
                tokio::spawn(async move {
                    let _ = tls.write_all(head.as_bytes()).await;
                    tls
                })
            })
            .collect();
        let sampler = tokio::task::spawn_blocking(move || {
            let mut peak = 0;
            for _ in 0..200 {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        let mut held = Vec::new();
        for w in writes {
            if let Ok(tls) = w.await {
                held.push(tls);
            }
        }
        let peak = sampler.await.expect("sampler");
        drop(held);
        (start_kib, peak)
    });
    let refused = proxy.metric("keyproof_memory_refused_requests_total");
    eprintln!(
        "RSS with the connections open {start_kib} KiB, peak {peak_rss} KiB; refused {refused}"
    );
    assert!(refused > 0.0, "{}", proxy.log_text());
    assert!(
        peak_rss < start_kib + LIMIT_MIB * 1024,
        "RSS went from {start_kib} KiB to {peak_rss} KiB with a {LIMIT_MIB} MiB limit"
    );
    assert_eq!(w.legit(addr, "/after").0, 200);
}

/// The highest resident memory of process `pid` over `samples` looks,
/// 100 ms apart.
async fn peak_rss_over(pid: u32, samples: u32) -> u64 {
    let mut peak = 0;
    for _ in 0..samples {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

/// An app that accepts connections and never reads from them.
fn stalled_app() -> SocketAddr {
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = stalled.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in stalled.incoming() {
            held.push(s);
        }
    });
    app
}

/// Waits (10 s at most) for the heap gauge (refreshed every second) to
/// read under `limit_mib`.
fn heap_back_under(proxy: &ProxyProc, limit_mib: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let heap = proxy.metric("keyproof_memory_heap_bytes");
        if heap > 0.0 && heap < (limit_mib << 20) as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "heap {heap}\n{}",
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A request body that never ends: 16 KiB chunks as fast as flow control
/// takes them.
struct Endless;

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[b'x'; 16384])))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

/// Memory, HTTP/2: one caller's connections, each with 100 uploads
/// filling their flow-control windows while the app reads nothing, cannot
/// take the sidecar far past `runtime.memory_limit`. The data arrives at
/// loopback speed, faster than any look at the heap: what bounds it is
/// that receive windows are granted out of the memory budget (a full
/// 16 MiB to the first connections, less to each next one). Without it,
/// 32 such connections took 250 MB.
#[test]
fn one_callers_http2_uploads_to_a_stalled_app_stay_within_the_memory_limit() {
    const LIMIT_MIB: u64 = 40;
    const CONNS: usize = 32;
    let w = World::new();
    let app = stalled_app();
    let (proxy, addr) = w.inbound(
        "memory-h2",
        app,
        &format!("\n[runtime]\nmemory_limit = \"{LIMIT_MIB}Mi\"\n"),
    );
    let start_kib = rss_kib(proxy.pid());
    let pid = proxy.pid();
    let rt = rt();
    let cfg = client_tls(&w.pki, &w.web, b"h2");
    let peak_rss = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..CONNS {
            let (send, conn) = h2_conn::<Endless>(addr, cfg.clone(), None).await;
            tasks.push(conn);
            for _ in 0..100 {
                let mut send = send.clone();
                tasks.push(tokio::spawn(async move {
                    if send.ready().await.is_err() {
                        return;
                    }
                    let req = hyper::Request::post("https://localhost/upload")
                        .body(Endless)
                        .expect("request");
                    let _ = send.send_request(req).await;
                }));
            }
        }
        let peak = peak_rss_over(pid, 30).await;
        for t in tasks {
            t.abort();
        }
        peak
    });
    eprintln!("RSS at start {start_kib} KiB, peak {peak_rss} KiB");
    // The limit, plus pages the allocator has not yet given back: freed
    // at this pace, they lag by about 30 MiB.
    assert!(
        peak_rss < start_kib + (LIMIT_MIB + 32) * 1024,
        "RSS went from {start_kib} KiB to {peak_rss} KiB with a {LIMIT_MIB} MiB limit"
    );
    // Alive, and back under its limit once the uploads are gone (the
    // gauge is refreshed every second).
    heap_back_under(&proxy, LIMIT_MIB);
}

/// A request body of trailers only.
struct TrailersOnly(Option<hyper::HeaderMap>);

impl Body for TrailersOnly {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// One caller's 64 HTTP/2 connections, opened first, then 100 requests on
/// each to an app that never answers, each request carrying 15 copies of
/// a 4,000-byte field in its head (`in_trailers` false) or in trailers
/// after an empty body. HPACK sends the copies as one-byte indices into
/// the connection's table: a few hundred kilobytes on the wire decode to
/// 390 MB of fields, all at once, faster than any look at the heap.
/// Asserts that the sidecar stays under its 40 MiB limit and refuses the
/// flood past the caller's share, counted.
fn held_requests_stay_within_the_memory_limit(name: &str, in_trailers: bool) {
    const LIMIT_MIB: u64 = 40;
    const CONNS: usize = 64;
    const STREAMS: usize = 100;
    let w = World::new();
    let app = stalled_app();
    let (proxy, addr) = w.inbound(
        name,
        app,
        &format!("\n[runtime]\nmemory_limit = \"{LIMIT_MIB}Mi\"\n"),
    );
    let pid = proxy.pid();
    let start_kib = rss_kib(pid);
    let rt = rt();
    let cfg = client_tls(&w.pki, &w.web, b"h2");
    let value = hyper::header::HeaderValue::from_str(&"v".repeat(4000)).expect("value");
    let (peak_rss, refused, sent) = rt.block_on(async {
        // Every connection open and idle first: the requests then arrive
        // together.
        let mut conns = Vec::new();
        for _ in 0..CONNS {
            conns.push(h2_conn::<TrailersOnly>(addr, cfg.clone(), None).await);
        }
        let refused = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (send, _) in &conns {
            for _ in 0..STREAMS {
                let mut send = send.clone();
                let value = value.clone();
                let refused = refused.clone();
                tasks.push(tokio::spawn(async move {
                    if send.ready().await.is_err() {
                        return;
                    }
                    let mut fields = hyper::HeaderMap::new();
                    for _ in 0..15 {
                        fields.append("x-a", value.clone());
                    }
                    let mut req = hyper::Request::post("https://localhost/held")
                        .body(TrailersOnly(None))
                        .expect("request");
                    if in_trailers {
                        *req.body_mut() = TrailersOnly(Some(fields));
                    } else {
                        *req.headers_mut() = fields;
                    }
                    if let Err(e) = send.send_request(req).await {
                        // hyper keeps h2's reason in its error's source.
                        if format!("{e:?}").contains("REFUSED_STREAM") {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        let peak = peak_rss_over(pid, 30).await;
        for t in tasks {
            t.abort();
        }
        for (_, conn) in conns {
            conn.abort();
        }
        (peak, refused.load(Ordering::Relaxed), CONNS * STREAMS)
    });
    eprintln!(
        "RSS at start {start_kib} KiB, peak {peak_rss} KiB; {refused} of {sent} requests refused"
    );
    // Under the limit, allocator slack and all.
    assert!(
        peak_rss < start_kib + LIMIT_MIB * 1024,
        "RSS went from {start_kib} KiB to {peak_rss} KiB with a {LIMIT_MIB} MiB limit"
    );
    // The flood was refused, and said so: a caller's share of the budget
    // (2.5 MiB) holds a few dozen such requests. (Run alone, 6,368 of
    // 6,400 are; beside the other tests on two cores, most are not yet
    // sent when the connections close, so only some.)
    assert!(refused > 0, "none of {sent} refused");
    assert!(
        proxy.metric("keyproof_memory_refused_requests_total") >= refused as f64,
        "{}",
        proxy.log_text()
    );
    // Alive, and back under its limit once the connections are gone.
    heap_back_under(&proxy, LIMIT_MIB);
}

/// Memory, HTTP/2 request heads (see
/// [`held_requests_stay_within_the_memory_limit`]): the heads of requests
/// the app has not answered are charged to their caller, with what each
/// request in flight holds besides, out of a quarter of the limit; past
/// the caller's share (a sixteenth), a request is refused with
/// `REFUSED_STREAM` before anything of it is processed. Session 35's
/// sidecar went 63 MiB above its start here, and 64 connections of a
/// tester's client sending all at once took it to 170 MB under a 64 MiB
/// limit.
#[test]
fn one_callers_hpack_amplified_request_heads_stay_within_the_memory_limit() {
    held_requests_stay_within_the_memory_limit("memory-hpack", false);
}

/// Memory, HTTP/2 trailers: the same fields in request trailers, which h2
/// decodes and holds until the body is read (a stalled app never reads
/// it). A request whose body is still open is charged a reserve for its
/// trailers with its head; without it the sidecar went 70 MiB above its
/// start, where the heads' charge alone had kept it to 24.
#[test]
fn one_callers_hpack_amplified_request_trailers_stay_within_the_memory_limit() {
    held_requests_stay_within_the_memory_limit("memory-trailers", true);
}

/// Memory, fairness: five identities filling the request-head budget
/// with requests the app never answers do not lock out another caller's
/// few requests. Past the budget a holder under an equal split of it is
/// still let in (within twice the budget); round 7 saw every other
/// caller refused.
#[test]
fn a_flood_of_identities_filling_the_head_budget_leaves_room_for_a_caller() {
    const LIMIT_MIB: u64 = 40;
    let w = World::new();
    let app = stalled_app();
    let (proxy, addr) = w.inbound(
        "memory-fair",
        app,
        &format!("\n[runtime]\nmemory_limit = \"{LIMIT_MIB}Mi\"\n"),
    );
    let flood: Vec<Cert> = (0..5)
        .map(|i| {
            w.pki
                .issue(&format!("flood{i}"), &format!("/ns/default/sa/flood{i}"))
        })
        .collect();
    let rt = rt();
    let value = hyper::header::HeaderValue::from_str(&"v".repeat(4000)).expect("value");
    let refused = |cert: &Cert, conns: usize, streams: usize, fields: usize| {
        let cfg = client_tls(&w.pki, cert, b"h2");
        let value = value.clone();
        rt.spawn(async move {
            let refused = Arc::new(AtomicUsize::new(0));
            let mut held = Vec::new();
            for _ in 0..conns {
                let (send, conn) = h2_conn::<Empty<Bytes>>(addr, cfg.clone(), None).await;
                held.push(conn);
                for _ in 0..streams {
                    let mut send = send.clone();
                    let value = value.clone();
                    let refused = refused.clone();
                    held.push(tokio::spawn(async move {
                        if send.ready().await.is_err() {
                            return;
                        }
                        let mut req = hyper::Request::get("https://localhost/held")
                            .body(Empty::<Bytes>::new())
                            .expect("request");
                        for _ in 0..fields {
                            req.headers_mut().append("x-a", value.clone());
                        }
                        if let Err(e) = send.send_request(req).await {
                            if format!("{e:?}").contains("REFUSED_STREAM") {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }));
                }
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            for t in held {
                t.abort();
            }
            refused.load(Ordering::Relaxed)
        })
    };
    // Spawned now, all five: they hold their requests while the caller
    // sends.
    let mut floods = Vec::new();
    for c in &flood {
        floods.push(refused(c, 2, 100, 15));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // The flood is refused past the budget...
    let during = proxy.metric("keyproof_memory_refused_requests_total");
    assert!(during > 0.0, "{}", proxy.log_text());
    // ...and a caller with 20 small requests is not.
    let legit = rt.block_on(refused(&w.legit, 1, 20, 0)).expect("legit");
    let flooded: usize = floods
        .into_iter()
        .map(|f| rt.block_on(f).expect("flood"))
        .sum();
    eprintln!("flood refused {flooded} of 1,000; the caller's 20 requests: {legit} refused");
    assert_eq!(legit, 0, "{}", proxy.log_text());
}

/// An outbound of `web` (with `extra` configuration) whose upstream
/// `api.default.svc` is the inbound at `in_addr`, and its listener.
fn outbound_to(w: &World, name: &str, in_addr: SocketAddr, extra: &str) -> (ProxyProc, SocketAddr) {
    let out_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let out_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let outbound = ProxyProc::start(
        w.pki.tmp.path(),
        name,
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\n\
             [[outbound.upstreams]]\nhost = \"api.default.svc\"\naddress = \"{in_addr}\"\n\
             identity = \"spiffe://resources.test/ns/default/sa/api\"\n\
             [admin]\nlisten = \"{out_admin}\"\n{extra}",
            identity_toml(&w.pki.bundle, &w.web),
        ),
        out_admin,
    );
    (outbound, out_addr)
}

/// Memory, both sides: requests the inbound refuses for memory (HTTP/2
/// `REFUSED_STREAM`: its app never saw them) are sent once more by the
/// caller's outbound after a pause, and if refused again its app gets a
/// 503 with `Retry-After` that says so, not a 502 that reads as a failure
/// the request may have caused.
#[test]
fn requests_refused_for_memory_are_retried_then_503_with_retry_after() {
    const REQUESTS: usize = 100;
    let w = World::new();
    let app = stalled_app();
    let (inbound, in_addr) = w.inbound(
        "refused-retried",
        app,
        "\n[runtime]\nmemory_limit = \"40Mi\"\n",
    );
    let (outbound, out_addr) = outbound_to(&w, "refused-out", in_addr, "");
    // Heads of about 40 KB: the caller's share of the inbound's head
    // budget (a quarter of a quarter of 40 MiB) holds some 60 of them
    // while the app holds them all.
    let head = format!(
        "GET /held HTTP/1.1\r\nhost: api.default.svc\r\n{}\r\n",
        (0..10)
            .map(|i| format!("x-a{i}: {}\r\n", "v".repeat(4000)))
            .collect::<String>()
    );
    let answers = rt().block_on(send_each(out_addr, vec![head; REQUESTS], Duration::ZERO));
    let answered: Vec<&String> = answers.iter().filter(|a| !a.is_empty()).collect();
    let unavailable = answered
        .iter()
        .filter(|a| {
            a.starts_with("HTTP/1.1 503")
                && a.to_ascii_lowercase().contains("retry-after: 1\r\n")
                && a.contains("refused the request without processing it")
        })
        .count();
    let retried = outbound.metric(
        "keyproof_requests_retried_total{direction=\"outbound\",reason=\"refused_stream\"}",
    );
    let refused = inbound.metric("keyproof_memory_refused_requests_total");
    eprintln!(
        "{} of {REQUESTS} answered, {unavailable} of them 503; outbound retried {retried}, inbound refused {refused}",
        answered.len()
    );
    assert!(unavailable > 0, "none refused\n{}", inbound.log_text());
    assert_eq!(
        unavailable,
        answered.len(),
        "every answer is a 503 for the refusal: {:?}",
        answered.iter().find(|a| !a.starts_with("HTTP/1.1 503"))
    );
    // Each 503 went twice; a retry the inbound took is held like the rest.
    assert!(retried >= unavailable as f64, "{}", outbound.log_text());
    assert!(refused >= 2.0 * unavailable as f64);
}

/// Sends each of `requests` (raw HTTP/1.1) on a connection of its own to
/// `addr`, `gap` apart, and reads what comes back within 4 s of the last
/// (held requests get nothing): the answers, in order.
async fn send_each(addr: SocketAddr, requests: Vec<String>, gap: Duration) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tasks = Vec::new();
    for raw in requests {
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(raw.as_bytes()).await.ok()?;
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let read = tokio::time::timeout(Duration::from_secs(4), async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            });
            let _ = read.await;
            Some(String::from_utf8_lossy(&got).into_owned())
        }));
        tokio::time::sleep(gap).await;
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.ok().flatten().unwrap_or_default());
    }
    answers
}

/// Memory, both sides: heads too large for one HTTP/2 frame (a HEADERS
/// frame and CONTINUATION) from a caller whose share of the head budget
/// is held by its requests in flight are refused one stream at a time
/// (`REFUSED_STREAM`: retried, then 503), not by closing the mesh
/// connection, which failed every request on it with 502, answered ones
/// included (round 8).
#[test]
fn large_heads_past_a_callers_share_refuse_their_stream_not_the_connection() {
    const LARGE: usize = 150;
    const SMALL: usize = 60;
    let w = World::new();
    let (inbound, in_addr) = w.inbound(
        "large-heads",
        w.app.addr,
        "\n[runtime]\nmemory_limit = \"40Mi\"\n",
    );
    let (_outbound, out_addr) = outbound_to(&w, "large-heads-out", in_addr, "");
    // About 40 KB of header values: 35 KB Huffman-coded, over the 32 KiB
    // frames the inbound takes. The app answers /slow after 2 s.
    let large = format!(
        "GET /slow HTTP/1.1\r\nhost: api.default.svc\r\nconnection: close\r\n{}\r\n",
        (0..10)
            .map(|i| format!("x-a{i}: {}\r\n", "v".repeat(4000)))
            .collect::<String>()
    );
    let small = "GET /small HTTP/1.1\r\nhost: api.default.svc\r\nconnection: close\r\n\r\n";
    let rt = rt();
    let (large, small) = rt.block_on(async {
        let large = tokio::spawn(send_each(
            out_addr,
            vec![large; LARGE],
            Duration::from_millis(2),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let small = send_each(
            out_addr,
            vec![small.to_owned(); SMALL],
            Duration::from_millis(5),
        )
        .await;
        (large.await.expect("large"), small)
    });
    let status = |a: &String| a.split(' ').nth(1).unwrap_or("none").to_owned();
    let count = |all: &[String]| {
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for a in all {
            *by.entry(status(a)).or_default() += 1;
        }
        by
    };
    let (by_large, by_small) = (count(&large), count(&small));
    let refused = inbound.metric("keyproof_memory_refused_requests_total");
    eprintln!("large heads: {by_large:?}; small: {by_small:?}; refused {refused}");
    assert!(refused > 0.0, "the budget was never full: {by_large:?}");
    for a in large.iter().chain(&small) {
        assert!(
            matches!(status(a).as_str(), "200" | "503"),
            "{}\n{}",
            a.lines().take(12).collect::<Vec<_>>().join("\n"),
            inbound.log_text()
        );
    }
    // The small requests share the caller's budget with the large ones: on
    // a loaded machine one may arrive while the share is full and get its
    // 503 too. The connection carrying them is never torn down, so nearly
    // all are served.
    let served = by_small.get("200").copied().unwrap_or(0);
    assert!(served >= SMALL - SMALL / 20, "{by_small:?}");
}

/// Memory, outbound: the app's uploads to an upstream that never answers.
/// The outbound keeps a copy of each streaming request body until the
/// response head comes (to answer a first step-up challenge by sending it
/// again), and each mesh stream buffers some of it beyond the upstream's
/// window: 300 such uploads of 1 MB held 117 MB (round 6's F7). The
/// copies are charged to the app and dropped past its share; send
/// buffers shrink under the limit.
#[test]
fn the_apps_uploads_to_a_hung_upstream_stay_within_the_memory_limit() {
    use tokio::io::AsyncWriteExt;
    const LIMIT_MIB: u64 = 40;
    const UPLOADS: usize = 200;
    let w = World::new();
    let app = stalled_app();
    let (_inbound, in_addr) = w.inbound("hung-upstream", app, "");
    let (outbound, out_addr) = outbound_to(
        &w,
        "uploads-out",
        in_addr,
        &format!("[runtime]\nmemory_limit = \"{LIMIT_MIB}Mi\"\n"),
    );
    let pid = outbound.pid();
    let start_kib = rss_kib(pid);
    let rt = rt();
    let peak_rss = rt.block_on(async {
        let body = Bytes::from(vec![b'x'; 1_000_000]);
        let mut tasks = Vec::new();
        for _ in 0..UPLOADS {
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = tokio::net::TcpStream::connect(out_addr).await else {
                    return;
                };
                let head = "POST /upload HTTP/1.1\r\nhost: api.default.svc\r\ncontent-length: 1000000\r\n\r\n";
                if s.write_all(head.as_bytes()).await.is_ok() {
                    let _ = s.write_all(&body).await;
                }
                // Held open: the upstream never answers.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }));
        }
        let peak = peak_rss_over(pid, 40).await;
        for t in tasks {
            t.abort();
        }
        peak
    });
    eprintln!("outbound RSS at start {start_kib} KiB, peak {peak_rss} KiB");
    assert!(
        peak_rss < start_kib + LIMIT_MIB * 1024,
        "RSS went from {start_kib} KiB to {peak_rss} KiB with a {LIMIT_MIB} MiB limit\n{}",
        outbound.log_text()
    );
}

/// Memory, outbound: the pod's own app (or whatever runs in the pod)
/// holding unfinished heads on the outbound is bounded like a caller: its
/// heads are charged to it as they grow, out of its share of the budget
/// (past it, the connection is closed), and its connections are shed
/// above `runtime.memory_limit`; an inbound caller with one connection
/// is neither (the app holds the most).
#[test]
fn the_apps_unfinished_heads_on_the_outbound_are_shed_not_a_caller() {
    const LIMIT_MIB: u64 = 40;
    const FLOOD: usize = 800;
    let w = World::new();
    let out_port = free_port();
    let (proxy, addr) = w.inbound(
        "memory-out",
        w.app.addr,
        &format!(
            "\n[outbound]\nlisten = \"127.0.0.1:{out_port}\"\n[runtime]\nmemory_limit = \"{LIMIT_MIB}Mi\"\n"
        ),
    );
    let start_kib = rss_kib(proxy.pid());
    // A caller with one keep-alive HTTP/2 connection, open before the flood.
    let rt = rt();
    let cfg = client_tls(&w.pki, &w.legit, b"h2");
    let (mut legit, _task) = rt.block_on(h2_conn::<Empty<Bytes>>(addr, cfg, None));
    let get = |send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>| {
        rt.block_on(async {
            let req = hyper::Request::get("https://localhost/legit")
                .body(Empty::new())
                .expect("request");
            match send.send_request(req).await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        })
    };
    assert_eq!(get(&mut legit), 200);
    let head = format!("GET / HTTP/1.1\r\nhost: x\r\nx-a: {}", "a".repeat(60_000));
    let mut held = Vec::new();
    let mut peak_rss = 0;
    for i in 0..FLOOD {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", out_port)) {
            if s.write_all(head.as_bytes()).is_ok() {
                held.push(s);
            }
        }
        if i % 50 == 0 {
            peak_rss = peak_rss.max(rss_kib(proxy.pid()));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let peak_rss = peak_rss.max(rss_kib(proxy.pid()));
    let shed = proxy.metric("keyproof_memory_shed_connections_total");
    let refused = proxy.metric("keyproof_memory_refused_requests_total");
    eprintln!("RSS at start {start_kib} KiB, peak {peak_rss} KiB; shed {shed}, refused {refused}");
    assert!(
        shed + refused > 0.0,
        "nothing shed or refused\n{}",
        proxy.log_text()
    );
    assert!(
        peak_rss < start_kib + (LIMIT_MIB + 20) * 1024,
        "RSS went from {start_kib} KiB to {peak_rss} KiB with a {LIMIT_MIB} MiB limit"
    );
    // The caller's connection was not the one shed.
    assert_eq!(get(&mut legit), 200, "{}", proxy.log_text());
    drop(held);
}
