//! The open connections of verified callers, so that a deny-list change
//! reaches them.
//!
//! The deny list is the operator's lever during an incident: a stolen
//! identity must lose the mesh in seconds. Each request is decided on by
//! the policy in use when it arrives, and open tunnels are decided on again
//! (`tunnel.rs`), but a connection also carries what is already under way:
//! a response still streaming (server-sent events, a gRPC stream) outlives
//! the change that would refuse its request. So when the policy changes,
//! every connection of a caller the new deny list names is closed outright,
//! with whatever it carries.
//!
//! A caller already on the deny list when it connects is not cut at once:
//! its requests get the deny list's 403, as the contract says, and the first
//! such refusal drains the connection (`InboundConn::drain`: the 403 goes
//! out, then the connection ends), so that no denied caller holds a
//! connection place for longer than a request.
//!
//! A registration is one lock and one map entry per connection, taken once
//! its handshake has named the caller; it goes when the connection does.
//!
//! A trust bundle change reaches open connections too ([`distrusted`]):
//! dropping a root is what an operator does after a CA compromise, and a
//! caller whose chain no longer verifies must not keep what it holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keyproof_identity::{SpiffeId, Usage, VerifyError};
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::identity::store::IdentityStore;

/// Every open caller connection of a listener.
#[derive(Default)]
pub struct Callers {
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    by_id: HashMap<u64, Caller>,
    next: u64,
}

struct Caller {
    peer: SpiffeId,
    serial: String,
    close: CancellationToken,
}

/// One connection's entry, removed on drop.
pub struct Registered {
    callers: Arc<Callers>,
    id: u64,
    close: CancellationToken,
}

impl Callers {
    /// Registers a connection of `peer`, whose certificate has `serial`.
    pub fn register(self: &Arc<Self>, peer: &SpiffeId, serial: &str) -> Registered {
        let close = CancellationToken::new();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let id = open.next;
        open.next += 1;
        open.by_id.insert(
            id,
            Caller {
                peer: peer.clone(),
                serial: serial.to_owned(),
                close: close.clone(),
            },
        );
        Registered {
            callers: self.clone(),
            id,
            close,
        }
    }

    /// Closes every connection of a caller `denied` names; returns how
    /// many.
    pub fn close(&self, denied: impl Fn(&SpiffeId, &str) -> bool) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for c in open.by_id.values() {
            if !c.close.is_cancelled() && denied(&c.peer, &c.serial) {
                c.close.cancel();
                n += 1;
            }
        }
        n
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolves, with why, once the trust bundle in use no longer accepts the
/// caller's `chain` (leaf first), which was verified under generation
/// `seen` of `store`'s roots (read before its handshake). Each change of the
/// roots verifies the chain again; renewals of our own certificate under
/// the same roots cost nothing.
pub async fn distrusted(
    store: &IdentityStore,
    mut seen: u64,
    chain: &[CertificateDer<'static>],
) -> VerifyError {
    let mut changes = store.trust_changes();
    loop {
        // Checked before the first wait: the roots may have changed while
        // the handshake ran.
        let now = *changes.borrow_and_update();
        if now != seen {
            if let Err(e) = store.verify_again(chain, Usage::ClientAuth) {
                return e;
            }
            seen = now;
        }
        if changes.changed().await.is_err() {
            // The store is gone: so is the listener.
            return std::future::pending().await;
        }
    }
}

impl Registered {
    /// Resolves when the connection is to be closed.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut open = self.callers.open.lock().unwrap_or_else(|p| p.into_inner());
        open.by_id.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deny_list_change_closes_only_the_connections_it_names() {
        let callers = Arc::new(Callers::default());
        let web: SpiffeId = "spiffe://t.test/ns/a/sa/web".parse().unwrap();
        let ops: SpiffeId = "spiffe://t.test/ns/a/sa/ops".parse().unwrap();
        let a = callers.register(&web, "0a");
        let b = callers.register(&web, "0b");
        let c = callers.register(&ops, "0a");
        // A deny entry by serial, for web's first certificate only.
        assert_eq!(callers.close(|p, s| p == &web && s == "0a"), 1);
        let closed = |r: &Registered| r.close.is_cancelled();
        assert!(closed(&a) && !closed(&b) && !closed(&c));
        tokio::time::timeout(std::time::Duration::from_secs(1), a.closed())
            .await
            .expect("woken");
        // Counted once; entries go with their connections.
        assert_eq!(callers.close(|p, _| p == &web), 1);
        drop((a, b, c));
        assert!(callers.is_empty());
    }
}
