//! The upstream rules in use with the upstreams made for them up front,
//! and what a redirected connection routes its requests by.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use keyproof_identity::IdPattern;

use crate::config::{OutboundConfig, UpstreamConfig, UpstreamRule};
use crate::http::mesh_client::MeshSender;
use crate::identity::store::IdentityStore;
use crate::metrics::Metrics;
use crate::outbound::own_ports::OwnConn;
use crate::outbound::rules::{Candidates, RuleSet};
use crate::outbound::upstream::{OutboundError, Upstream};

/// An app connection's plain HTTP/2 connection to its destination, made
/// at its first stream outside the mesh. One per app connection, as the
/// app would have had without the sidecar: one app's streams never wait on
/// another's at the destination's stream limit, and the connection ends
/// with the app's. The lock is held across a dial, so that the streams of
/// a burst wait for the one dial rather than each make one.
pub type PlainSlot = Arc<tokio::sync::Mutex<Option<Plain>>>;

/// A plain HTTP/2 connection to a destination outside the mesh.
pub struct Plain {
    /// Its sending half.
    pub(super) send: MeshSender,
    /// Registers the dial as the sidecar's own while it lives, so that a
    /// redirect that catches it is refused, not served again.
    pub(super) _own: OwnConn,
}

/// What a redirected HTTP connection routes by: its original destination,
/// and the rules whose destination conditions hold for it, found again
/// when a request comes after a reload (each request routes by the table
/// in use then).
pub struct Route {
    /// The original destination.
    pub dst: SocketAddr,
    cached: ArcSwap<Cached>,
    /// This app connection's own mesh connection (a rule with `balance =
    /// "connection"`): the upstream, by its dial address and identity.
    own: std::sync::Mutex<Option<Own>>,
    /// Its plain HTTP/2 connection for streams outside the mesh, made
    /// (slot and all) only by a connection that has such a stream.
    plain: std::sync::OnceLock<PlainSlot>,
}

/// An upstream of one app connection alone, and what it was made for.
struct Own {
    address: String,
    identity: IdPattern,
    up: Arc<Upstream>,
}

/// A table's candidates for a route's destination.
pub struct Cached {
    /// Weak: a connection open across reloads keeps no old table (nor its
    /// upstreams' connections) alive.
    table: Weak<Table>,
    /// The rules of `table` whose destination conditions hold.
    pub candidates: Candidates,
}

impl Route {
    /// The route of a connection to `dst`, whose `candidates` were found
    /// in `table`.
    pub fn new(table: &Arc<Table>, candidates: Candidates, dst: SocketAddr) -> Route {
        Route {
            dst,
            cached: ArcSwap::from_pointee(Cached {
                table: Arc::downgrade(table),
                candidates,
            }),
            own: std::sync::Mutex::new(None),
            plain: std::sync::OnceLock::new(),
        }
    }

    /// The app connection's plain HTTP/2 connection, for its streams
    /// outside the mesh (`passthrough.rs`).
    pub(super) fn plain_slot(&self) -> PlainSlot {
        self.plain.get_or_init(PlainSlot::default).clone()
    }

    /// This connection's own upstream for `address` and `identity`, made
    /// by `make` the first time (and again when a reload changed them):
    /// every request of the app connection rides one mesh connection, and
    /// no other app connection's do.
    pub fn own_upstream<E>(
        &self,
        address: &str,
        identity: &IdPattern,
        make: impl FnOnce() -> Result<Arc<Upstream>, E>,
    ) -> Result<Arc<Upstream>, E> {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = own.as_ref() {
            if o.address == address && o.identity == *identity {
                return Ok(o.up.clone());
            }
        }
        let up = make()?;
        *own = Some(Own {
            address: address.to_owned(),
            identity: identity.clone(),
            up: up.clone(),
        });
        Ok(up)
    }

    /// The candidates of `table` for this route's destination: those
    /// found last, or found now when `table` is another one.
    pub fn candidates(&self, table: &Arc<Table>) -> Arc<Cached> {
        let c = self.cached.load_full();
        // The weak reference keeps the old table's allocation: a new table
        // never shares its address while it is held.
        if std::ptr::eq(c.table.as_ptr(), Arc::as_ptr(table)) {
            return c;
        }
        let fresh = Arc::new(Cached {
            table: Arc::downgrade(table),
            candidates: table.rules().candidates(self.dst),
        });
        self.cached.store(fresh.clone());
        fresh
    }
}

/// The upstream rules in use and the upstreams built with them: one per
/// rule that names its address and a fixed identity (the explicit table of
/// before rules had patterns).
pub struct Table {
    rules: RuleSet,
    fixed: Vec<Option<Arc<Upstream>>>,
}

impl Table {
    /// Builds the upstreams of the rules that name a fixed address and
    /// identity; those of `old` with the same address and identity are
    /// kept, with their connections.
    pub fn build(
        rules: Vec<UpstreamRule>,
        cfg: &OutboundConfig,
        store: &Arc<IdentityStore>,
        metrics: &Metrics,
        old: Option<&Table>,
    ) -> Result<Table, OutboundError> {
        let mut fixed = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let Some(address) = r
                .address
                .as_ref()
                .filter(|_| !r.identity.has_placeholders())
            else {
                fixed.push(None);
                continue;
            };
            let kept = old.and_then(|t| {
                t.fixed
                    .iter()
                    .flatten()
                    .find(|u| &u.cfg.address == address && u.cfg.identity == r.identity.fixed)
            });
            let up = match kept {
                Some(u) => u.clone(),
                None => {
                    let u = UpstreamConfig {
                        host: r
                            .host
                            .as_ref()
                            .map_or_else(|| address.clone(), ToString::to_string),
                        address: address.clone(),
                        identity: r.identity.fixed.clone(),
                    };
                    Arc::new(Upstream::new(i, &u, cfg, store, metrics)?)
                }
            };
            fixed.push(Some(up));
        }
        Ok(Table {
            rules: RuleSet::new(rules),
            fixed,
        })
    }

    /// The rules.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// The upstream built for rule `i`, when it names a fixed address and
    /// identity.
    pub fn fixed(&self, i: usize) -> Option<&Arc<Upstream>> {
        self.fixed.get(i).and_then(Option::as_ref)
    }
}
