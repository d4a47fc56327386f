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
    let local = canonical(tcp.local_addr().ok()?);
    match original_dst(tcp) {
        Ok(dst) if canonical(dst) != local => Some(canonical(dst)),
        _ => None,
    }
}

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6) of `tcp`. An
/// IPv4 connection accepted on a dual-stack (`[::]`) listener has an
/// IPv4-mapped local address and an IPv4 connection-tracking record, so it
/// is asked at the IPv4 level (Linux answers `SOL_IP` options on such
/// sockets as for an IPv4 one).
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = match tcp.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(l) if l.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP socket address",
        )
    })
}

/// `addr` with an IPv4-mapped IPv6 address written as IPv4, so that the
/// two spellings of one destination compare equal.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
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

    #[tokio::test]
    async fn an_ipv4_connection_to_a_dual_stack_listener_is_not_redirected() {
        // Skipped where the machine has no IPv6 (binding [::] fails).
        let Ok(l) = tokio::net::TcpListener::bind("[::]:0").await else {
            return;
        };
        let port = l.local_addr().unwrap().port();
        let (c, s) = tokio::join!(TcpStream::connect(("127.0.0.1", port)), l.accept());
        let (Ok(_c), Ok((s, _))) = (c, s) else {
            return;
        };
        assert!(s.local_addr().unwrap().ip().to_canonical().is_ipv4());
        assert_eq!(redirected(&s), None);
    }
}
