//! The outbound's own connections (mesh dials and passthroughs), so that a
//! redirected connection that is one of them is recognised: the sidecar
//! dialling itself.
//!
//! `redirect` sends every process's outbound TCP to the outbound listener
//! except the proxy's uid (`--proxy-uid`). When the sidecar runs as another
//! uid, its own dials come back to it; a passthrough would dial again, and
//! again, until the process runs out of file descriptors. Such a
//! connection is refused at accept instead, at once, and counted.
//!
//! A connection is known by its two ends: the local address the kernel
//! gave it and the address it was dialled to, which is what the listener
//! sees as the redirected connection's peer and original destination. The
//! pair is registered as soon as the (non-blocking) `connect` call returns,
//! before the handshake is awaited and so before this process can accept
//! the connection it makes; no port is bound up front, so ports are shared
//! across destinations as for any other connection.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::TcpStream;

type Ends = (SocketAddr, SocketAddr);

/// Own connections open now, (local, remote), each with how many sockets
/// have it (one, unless a closed one's entry outlives it for a moment).
static OWN: Mutex<Option<HashMap<Ends, u32>>> = Mutex::new(None);

/// `connect` calls under way whose connection is not registered yet.
static DIALING: AtomicUsize = AtomicUsize::new(0);

fn with<R>(f: impl FnOnce(&mut HashMap<Ends, u32>) -> R) -> R {
    let mut g = OWN.lock().unwrap_or_else(PoisonError::into_inner);
    f(g.get_or_insert_with(HashMap::new))
}

/// An own connection, registered while this lives (keep it with the
/// stream).
#[derive(Debug)]
pub struct OwnConn(Ends);

impl Drop for OwnConn {
    fn drop(&mut self) {
        with(|m| {
            if let Some(n) = m.get_mut(&self.0) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.0);
                }
            }
        });
    }
}

/// Whether a redirected connection from `peer` to its original
/// destination `dst` is one of the outbound's own.
pub fn is_own(peer: SocketAddr, dst: SocketAddr) -> bool {
    let ends = (canonical(peer), canonical(dst));
    // A worker thread may accept the connection between another's
    // `connect` call and its registration, a few instructions apart.
    for _ in 0..1000 {
        if with(|m| m.contains_key(&ends)) {
            return true;
        }
        if DIALING.load(Ordering::Acquire) == 0 {
            return false;
        }
        std::thread::yield_now();
    }
    with(|m| m.contains_key(&ends))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Connects to `addr`, registered as the outbound's own for as long as the
/// returned [`OwnConn`] lives.
pub async fn connect(addr: SocketAddr) -> io::Result<(TcpStream, OwnConn)> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    DIALING.fetch_add(1, Ordering::AcqRel);
    let own = start(&sock, addr);
    DIALING.fetch_sub(1, Ordering::AcqRel);
    let own = own?;
    let tcp = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    tcp.writable().await?;
    if let Some(e) = tcp.take_error()? {
        return Err(e);
    }
    // Writable without an error, yet not connected: refused the
    // non-standard way some stacks report it.
    tcp.peer_addr()?;
    Ok((tcp, own))
}

/// The `connect` call, and the registration of the ends it gives.
fn start(sock: &Socket, addr: SocketAddr) -> io::Result<OwnConn> {
    match sock.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        // EINPROGRESS (`io::ErrorKind::InProgress` is not stable yet).
        Err(e) if e.raw_os_error() == Some(EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("a TCP socket without an IP address"))?;
    let ends = (canonical(local), canonical(addr));
    with(|m| *m.entry(ends).or_insert(0) += 1);
    Ok(OwnConn(ends))
}

/// Linux's "operation now in progress": a non-blocking connect under way.
const EINPROGRESS: i32 = 115;

/// [`connect`] to `host:port`, trying each address it resolves to in turn
/// (as [`TcpStream::connect`] does); the last error when none answers.
pub async fn connect_host(host_port: &str) -> io::Result<(TcpStream, OwnConn)> {
    let mut last = None;
    for addr in tokio::net::lookup_host(host_port).await? {
        match connect(addr).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host_port}: resolves to no address"),
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn an_own_connection_is_recognised_at_the_far_end_while_it_lives() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = l.local_addr().unwrap();
        let (own, accepted) = tokio::join!(connect(to), l.accept());
        let (tcp, guard) = own.unwrap();
        let (_far, peer) = accepted.unwrap();
        assert!(is_own(peer, to));
        // The same local port towards another destination is not it.
        assert!(!is_own(peer, "127.0.0.1:9".parse().unwrap()));
        // Anyone else's connection is not.
        let (other, accepted) = tokio::join!(TcpStream::connect(to), l.accept());
        let _other = other.unwrap();
        assert!(!is_own(accepted.unwrap().1, to));
        drop((tcp, guard));
        assert!(!is_own(peer, to));
    }

    #[tokio::test]
    async fn a_name_is_resolved_and_a_refusal_reported() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let name = format!("localhost:{port}");
        let (own, accepted) = tokio::join!(connect_host(&name), l.accept());
        let (_tcp, _guard) = own.unwrap();
        assert!(is_own(accepted.unwrap().1, l.local_addr().unwrap()));
        drop(l);
        let e = connect_host(&format!("127.0.0.1:{port}"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
