//! The local ports of the outbound's own connections (mesh dials and
//! passthroughs), so that a redirected connection coming from one of them
//! is recognised: the sidecar dialling itself.
//!
//! `redirect` sends every process's outbound TCP to the outbound listener
//! except the proxy's uid (`--proxy-uid`). When the sidecar runs as another
//! uid, its own dials come back to it; a passthrough would dial again, and
//! again, until the process runs out of file descriptors. Such a
//! connection is refused at accept instead, at once, and counted.
//!
//! Each own connection binds its local port before it connects, so the
//! port is known (and reserved: `bind` to port 0 picks one no other socket
//! holds) before the redirected connection can be accepted.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use tokio::net::{TcpSocket, TcpStream};

/// Local ports of own connections that are open now.
static OWN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn with<R>(f: impl FnOnce(&mut HashSet<u16>) -> R) -> R {
    let mut g = OWN.lock().unwrap_or_else(PoisonError::into_inner);
    f(g.get_or_insert_with(HashSet::new))
}

/// An own connection's local port, registered while this lives.
#[derive(Debug)]
pub struct OwnPort(u16);

impl Drop for OwnPort {
    fn drop(&mut self) {
        with(|s| s.remove(&self.0));
    }
}

/// Whether a connection from `peer` (as the outbound listener accepted
/// it) is one of the outbound's own.
pub fn is_own(peer: SocketAddr) -> bool {
    with(|s| s.contains(&peer.port()))
}

/// Connects to `addr` from a local port registered as the outbound's own
/// for as long as the returned [`OwnPort`] lives (keep it with the
/// stream).
pub async fn connect(addr: SocketAddr) -> io::Result<(TcpStream, OwnPort)> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let any: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    sock.bind(any)?;
    let port = OwnPort(sock.local_addr()?.port());
    with(|s| s.insert(port.0));
    let tcp = sock.connect(addr).await?;
    Ok((tcp, port))
}

/// [`connect`] to `host:port`, trying each address it resolves to in turn
/// (as [`TcpStream::connect`] does); the last error when none answers.
pub async fn connect_host(host_port: &str) -> io::Result<(TcpStream, OwnPort)> {
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
        let (own, accepted) = tokio::join!(connect(l.local_addr().unwrap()), l.accept());
        let (tcp, port) = own.unwrap();
        let (_far, peer) = accepted.unwrap();
        assert!(is_own(peer));
        // Anyone else's connection is not.
        let (other, accepted) =
            tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        let _other = other.unwrap();
        assert!(!is_own(accepted.unwrap().1));
        drop((tcp, port));
        assert!(!is_own(peer));
    }

    #[tokio::test]
    async fn a_name_is_resolved_and_a_refusal_reported() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let name = format!("localhost:{port}");
        let (own, accepted) = tokio::join!(connect_host(&name), l.accept());
        let (_tcp, _port) = own.unwrap();
        assert!(is_own(accepted.unwrap().1));
        drop(l);
        let e = connect_host(&format!("127.0.0.1:{port}"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
