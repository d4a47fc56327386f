//! Where an intercepted connection was going before `iptables` redirected
//! it (`SO_ORIGINAL_DST`, the netfilter connection tracking's record).
//!
//! Both listeners accept connections two ways: sent to them on purpose
//! (explicit mode: the app's `HTTP_PROXY`, a peer outbound dialling the
//! inbound's port) and redirected to them by the rules `keyproof-proxy
//! redirect` installs (transparent mode). A connection that was not
//! redirected reports its own local address as the original destination,
//! or no record at all, so "redirected" means "original destination differs
//! from the address it was accepted on".

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The destination the client dialled, if the connection was redirected to
/// this listener; `None` for a connection made to the listener itself (or
/// where the kernel keeps no record, e.g. no connection tracking).
pub fn redirected(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    match original_dst(tcp) {
        Ok(dst) if dst != local => Some(dst),
        _ => None,
    }
}

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6) of `tcp`.
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP socket address",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_made_to_the_listener_itself_is_not_redirected() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (_c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (s, _) = s.unwrap();
        assert_eq!(redirected(&s), None);
    }
}
