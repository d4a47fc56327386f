//! `keyproof-proxy redirect`: the `iptables` rules that send a pod's TCP
//! through its sidecar (transparent mode), installed in and removed from the
//! current network namespace.
//!
//! The rules are data first: [`rules`] is a pure function from [`Options`]
//! to the rule specs, so what is installed can be read, tested and printed
//! (`--dry-run`) without touching the kernel. Applying them goes through
//! `iptables-restore --noflush` in one transaction, so a pod never sees half
//! a rule set.
//!
//! Everything lives in the `nat` table, in two chains of our own
//! ([`INBOUND_CHAIN`], [`OUTPUT_CHAIN`]) reached by one jump each from
//! `PREROUTING` and `OUTPUT`. Installing declares (and so empties) our
//! chains, refills them and adds a jump only where it is missing: running
//! it twice leaves one copy. Removing deletes our jumps and chains and
//! nothing else: the namespace is as it was before.
//!
//! IPv4 is intercepted. IPv6 TCP cannot be (the listeners bind IPv4
//! addresses), so it is refused instead, never let past the sidecar: in a
//! namespace with IPv6, the same two chains in ip6tables' `filter` table
//! reset every new TCP connection but loopback's, the proxy's own and the
//! excluded ports' (link-local addresses included, which every interface
//! with IPv6 has, and which reach a dual-stack app from the same segment).
//! See docs/transparent.md.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

/// Our chain for connections arriving at the pod (jumped to from
/// `PREROUTING`).
pub const INBOUND_CHAIN: &str = "KEYPROOF_INBOUND";
/// Our chain for connections the pod's processes make (jumped to from
/// `OUTPUT`).
pub const OUTPUT_CHAIN: &str = "KEYPROOF_OUTPUT";

/// An `iptables` family, and the table our chains live in there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4: the `nat` table, connections redirected to the listeners.
    V4,
    /// IPv6: the `filter` table, new connections reset (fail closed).
    V6,
}

impl Family {
    /// The table our chains are in.
    pub fn table(self) -> &'static str {
        match self {
            Family::V4 => "nat",
            Family::V6 => "filter",
        }
    }

    /// The jumps into our chains: (built-in chain, our chain).
    fn jumps(self) -> [(&'static str, &'static str); 2] {
        match self {
            Family::V4 => [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)],
            Family::V6 => [("INPUT", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)],
        }
    }

    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

/// How a new IPv6 TCP connection is refused: a reset, so that a client
/// with both families (happy eyeballs) moves to IPv4 at once.
const REFUSE6: [&str; 5] = ["--syn", "-j", "REJECT", "--reject-with", "tcp-reset"];

/// Loopback: never redirected, so the proxy's own local legs (inbound to
/// the app, an app calling the outbound listener explicitly) stay direct.
const LOOPBACK: &str = "127.0.0.0/8";

/// Why the rules could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// A port that is not a number from 1 to 65535 (digits, no leading zero).
    #[error("{flag}: invalid port {value:?}: expected a number from 1 to 65535, without a sign or leading zeros")]
    InvalidPort {
        /// The flag it was given to.
        flag: &'static str,
        /// The offending item.
        value: String,
    },
    /// An empty list where at least one item is needed.
    #[error("{flag}: empty list: {hint}")]
    EmptyList {
        /// The flag it was given to.
        flag: &'static str,
        /// What to give instead.
        hint: &'static str,
    },
    /// Not an IPv4 network or address.
    #[error(
        "--exclude-cidrs: invalid CIDR {value:?}: expected an IPv4 network such as 10.0.0.0/8 \
         or an address such as 10.1.2.3"
    )]
    InvalidCidr {
        /// The offending item.
        value: String,
    },
    /// A network written with host bits (`10.0.0.1/8`): the network or the
    /// address may have been meant, and the two exclude very different
    /// traffic.
    #[error(
        "--exclude-cidrs: {value:?} has host bits set: write the network ({net}) or the address \
         ({addr}/32)"
    )]
    HostBits {
        /// The offending item.
        value: String,
        /// The network it lies in.
        net: Ipv4Net,
        /// The address it names.
        addr: std::net::Ipv4Addr,
    },
    /// A uid no process can run as: `(uid_t)-1` means "no uid" to the
    /// kernel, so every dial of the sidecar would be redirected.
    #[error("--proxy-uid: {0} is not a uid a process can run as (4294967295 is (uid_t)-1)")]
    InvalidUid(u32),
    /// An IPv6 network: only IPv4 is intercepted (IPv6 TCP is refused), so
    /// excluding one would suggest an exception that does not exist.
    #[error(
        "--exclude-cidrs: {value:?} is IPv6; redirect intercepts IPv4 only (IPv6 TCP is \
         refused, see docs/transparent.md)"
    )]
    Ipv6Cidr {
        /// The offending item.
        value: String,
    },
    /// Two of the proxy's own ports are the same.
    #[error("{a} and {b} are both {port}: the proxy's listeners need distinct ports")]
    PortClash {
        /// One flag.
        a: &'static str,
        /// The other flag.
        b: &'static str,
        /// The shared port.
        port: u16,
    },
    /// The program is not installed (or not on `PATH`).
    #[error(
        "{program} not found: redirect needs iptables (nf_tables or legacy backend) on PATH in \
         the container that runs it"
    )]
    Missing {
        /// The program.
        program: &'static str,
    },
    /// The kernel refused: not root, or no `CAP_NET_ADMIN`.
    #[error(
        "{program}: not permitted to change the network namespace's rules: run as root with \
         CAP_NET_ADMIN and CAP_NET_RAW (an init container with capabilities add [NET_ADMIN, \
         NET_RAW]): {stderr}"
    )]
    NotPermitted {
        /// The program.
        program: &'static str,
        /// What it said.
        stderr: String,
    },
    /// The program ran and failed for another reason.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// Another `redirect` held this network namespace's lock for too long.
    #[error(
        "another keyproof-proxy redirect has been changing this network namespace's rules for \
         {0:?}; run one at a time"
    )]
    Busy(std::time::Duration),
    /// The program could not be started or talked to.
    #[error("{program}: {source}")]
    Io {
        /// The program.
        program: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Which destination ports of connections arriving at the pod go to the
/// inbound listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// Every TCP port (but the exclusions).
    All,
    /// These ports only (sorted, no duplicates).
    List(Vec<u16>),
}

/// What to install; the defaults are the deploy/ examples' ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The uid the sidecar runs as: its connections are never redirected
    /// (they would loop back into its own outbound listener).
    pub proxy_uid: u32,
    /// Ports intercepted inbound.
    pub inbound_ports: InboundPorts,
    /// Ports never intercepted inbound (e.g. a health port the kubelet
    /// probes in plaintext).
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination ports never intercepted outbound.
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination networks never intercepted outbound.
    pub exclude_cidrs: Vec<Ipv4Net>,
    /// The outbound listener's port (on 127.0.0.1).
    pub outbound_port: u16,
    /// The inbound listener's port.
    pub inbound_port: u16,
    /// The admin listener's port: probes and scrapes reach it directly.
    pub admin_port: u16,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            proxy_uid: 2102,
            inbound_ports: InboundPorts::All,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            outbound_port: 15001,
            inbound_port: 15443,
            admin_port: 15090,
        }
    }
}

/// One rule: appended (`-A`) to `chain` with the `iptables` arguments in
/// `spec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The chain it is appended to.
    pub chain: &'static str,
    /// The match and target arguments, e.g. `["-p", "tcp", "-j", "RETURN"]`.
    pub spec: Vec<String>,
}

impl Rule {
    fn new(chain: &'static str, spec: &[&str]) -> Rule {
        Rule {
            chain,
            spec: spec.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec.join(" "))
    }
}

/// Parses a port: a number from 1 to 65535 in its one spelling (digits,
/// no leading zero), as the inbound's CONNECT authorities must be.
pub fn parse_port(flag: &'static str, s: &str) -> Result<u16, RedirectError> {
    let t = s.trim();
    let canonical = !t.starts_with('0') && t.bytes().all(|b| b.is_ascii_digit());
    match t.parse::<u16>() {
        Ok(p) if p != 0 && canonical => Ok(p),
        _ => Err(RedirectError::InvalidPort {
            flag,
            value: t.to_owned(),
        }),
    }
}

/// Parses a comma-separated port list (empty: none), sorted, duplicates
/// dropped.
pub fn parse_ports(flag: &'static str, s: &str) -> Result<Vec<u16>, RedirectError> {
    let mut out = Vec::new();
    for item in s.split(',') {
        if item.trim().is_empty() && s.trim().is_empty() {
            continue;
        }
        out.push(parse_port(flag, item)?);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Parses `--inbound-ports`: `all`, or a non-empty port list.
pub fn parse_inbound_ports(s: &str) -> Result<InboundPorts, RedirectError> {
    const FLAG: &str = "--inbound-ports";
    if s.trim().eq_ignore_ascii_case("all") || s.trim() == "*" {
        return Ok(InboundPorts::All);
    }
    let ports = parse_ports(FLAG, s)?;
    if ports.is_empty() {
        return Err(RedirectError::EmptyList {
            flag: FLAG,
            hint: "give `all` or the ports the pod's containers listen on, e.g. 8080,5432",
        });
    }
    Ok(InboundPorts::List(ports))
}

/// Parses a comma-separated list of IPv4 networks or addresses (an address
/// is its /32), in their canonical form (host bits cleared).
pub fn parse_cidrs(s: &str) -> Result<Vec<Ipv4Net>, RedirectError> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim) {
        if item.is_empty() && s.trim().is_empty() {
            continue;
        }
        let net = if let Ok(net) = item.parse::<Ipv4Net>() {
            if net.trunc() != net {
                return Err(RedirectError::HostBits {
                    value: item.to_owned(),
                    net: net.trunc(),
                    addr: net.addr(),
                });
            }
            net
        } else if let Ok(addr) = item.parse::<std::net::Ipv4Addr>() {
            Ipv4Net::from(addr)
        } else if item.parse::<ipnet::Ipv6Net>().is_ok()
            || item.parse::<std::net::Ipv6Addr>().is_ok()
        {
            return Err(RedirectError::Ipv6Cidr {
                value: item.to_owned(),
            });
        } else {
            return Err(RedirectError::InvalidCidr {
                value: item.to_owned(),
            });
        };
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// The rules of our two chains, in order: for each chain the exclusions
/// (`RETURN`) first, then the `REDIRECT`s. A pure function of `opts`.
pub fn rules(opts: &Options) -> Result<Vec<Rule>, RedirectError> {
    for (a, pa, b, pb) in [
        (
            "--outbound-port",
            opts.outbound_port,
            "--inbound-port",
            opts.inbound_port,
        ),
        (
            "--outbound-port",
            opts.outbound_port,
            "--admin-port",
            opts.admin_port,
        ),
        (
            "--inbound-port",
            opts.inbound_port,
            "--admin-port",
            opts.admin_port,
        ),
    ] {
        if pa == pb {
            return Err(RedirectError::PortClash { a, b, port: pa });
        }
    }
    for (flag, p) in [
        ("--outbound-port", opts.outbound_port),
        ("--inbound-port", opts.inbound_port),
        ("--admin-port", opts.admin_port),
    ] {
        if p == 0 {
            return Err(RedirectError::InvalidPort {
                flag,
                value: "0".to_owned(),
            });
        }
    }
    if opts.proxy_uid == u32::MAX {
        return Err(RedirectError::InvalidUid(opts.proxy_uid));
    }
    let mut out = Vec::new();

    // Inbound. Connections from the pod to itself arrive on lo; they are
    // the proxy's own legs or the app talking to itself, never a peer.
    let inbound_port = opts.inbound_port.to_string();
    out.push(Rule::new(INBOUND_CHAIN, &["-i", "lo", "-j", "RETURN"]));
    // The listener's own port (explicit-mode peers), the admin port
    // (kubelet probes, scrapes: plaintext by design) and the exclusions.
    let mut keep = vec![opts.inbound_port, opts.admin_port];
    keep.extend(&opts.exclude_inbound_ports);
    dedup_in_order(&mut keep);
    out.extend(port_returns(INBOUND_CHAIN, &keep));
    match &opts.inbound_ports {
        InboundPorts::All => out.push(Rule::new(
            INBOUND_CHAIN,
            &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound_port],
        )),
        InboundPorts::List(ports) => {
            for p in ports.iter().filter(|p| !keep.contains(p)) {
                let p = p.to_string();
                out.push(Rule::new(
                    INBOUND_CHAIN,
                    &[
                        "-p",
                        "tcp",
                        "--dport",
                        &p,
                        "-j",
                        "REDIRECT",
                        "--to-ports",
                        &inbound_port,
                    ],
                ));
            }
        }
    }

    // Outbound. The proxy's own connections first: they must leave as they
    // are, or the outbound would dial itself forever.
    let uid = opts.proxy_uid.to_string();
    out.push(Rule::new(
        OUTPUT_CHAIN,
        &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
    ));
    out.push(Rule::new(OUTPUT_CHAIN, &["-o", "lo", "-j", "RETURN"]));
    out.push(Rule::new(OUTPUT_CHAIN, &["-d", LOOPBACK, "-j", "RETURN"]));
    for net in &opts.exclude_cidrs {
        let net = net.to_string();
        out.push(Rule::new(OUTPUT_CHAIN, &["-d", &net, "-j", "RETURN"]));
    }
    out.extend(port_returns(OUTPUT_CHAIN, &opts.exclude_outbound_ports));
    let outbound_port = opts.outbound_port.to_string();
    out.push(Rule::new(
        OUTPUT_CHAIN,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound_port],
    ));
    Ok(out)
}

/// The IPv6 rules of our two chains (ip6tables, `filter` table): what IPv4
/// redirects, IPv6 refuses. Loopback, the proxy's own connections and the
/// excluded ports pass as they do in IPv4 (excluded CIDRs are IPv4 only);
/// every other new TCP connection is reset. A pure function of `opts`,
/// after [`rules`] has validated them.
pub fn rules6(opts: &Options) -> Vec<Rule> {
    let refuse = |port: Option<&str>| -> Vec<String> {
        let mut spec = vec!["-p".to_owned(), "tcp".to_owned()];
        if let Some(p) = port {
            spec.extend(["--dport".to_owned(), p.to_owned()]);
        }
        spec.extend(REFUSE6.iter().map(|a| (*a).to_owned()));
        spec
    };
    let mut out = vec![Rule::new(INBOUND_CHAIN, &["-i", "lo", "-j", "RETURN"])];
    let mut keep = opts.exclude_inbound_ports.clone();
    dedup_in_order(&mut keep);
    out.extend(port_returns(INBOUND_CHAIN, &keep));
    match &opts.inbound_ports {
        InboundPorts::All => out.push(Rule {
            chain: INBOUND_CHAIN,
            spec: refuse(None),
        }),
        InboundPorts::List(ports) => {
            for p in ports.iter().filter(|p| !keep.contains(p)) {
                out.push(Rule {
                    chain: INBOUND_CHAIN,
                    spec: refuse(Some(&p.to_string())),
                });
            }
        }
    }
    let uid = opts.proxy_uid.to_string();
    out.push(Rule::new(
        OUTPUT_CHAIN,
        &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
    ));
    out.push(Rule::new(OUTPUT_CHAIN, &["-o", "lo", "-j", "RETURN"]));
    out.extend(port_returns(OUTPUT_CHAIN, &opts.exclude_outbound_ports));
    out.push(Rule {
        chain: OUTPUT_CHAIN,
        spec: refuse(None),
    });
    out
}

/// Whether `nets` together hold every IPv4 address (`0.0.0.0/0`, or
/// `0.0.0.0/1` and `128.0.0.0/1`, or any other split of the space).
fn covers_everything(nets: &[Ipv4Net]) -> bool {
    let mut ranges: Vec<(u64, u64)> = nets
        .iter()
        .map(|n| {
            (
                u64::from(u32::from(n.network())),
                u64::from(u32::from(n.broadcast())) + 1,
            )
        })
        .collect();
    ranges.sort_unstable();
    let mut reached = 0u64;
    for (start, end) in ranges {
        if start > reached {
            return false;
        }
        reached = reached.max(end);
    }
    reached > u64::from(u32::MAX)
}

/// Options that are valid but switch interception off where the operator
/// probably meant it on: `redirect` installs them and prints these.
pub fn warnings(opts: &Options) -> Vec<String> {
    let mut w = Vec::new();
    if opts.proxy_uid == 0 {
        w.push(
            "--proxy-uid 0: every process running as root in this namespace bypasses the outbound interception"
                .to_owned(),
        );
    }
    if covers_everything(&opts.exclude_cidrs) {
        let nets: Vec<String> = opts.exclude_cidrs.iter().map(|n| n.to_string()).collect();
        let net = nets.join(",");
        w.push(format!(
            "--exclude-cidrs {net} excludes every destination: no outbound connection is intercepted"
        ));
    }
    if let InboundPorts::List(ports) = &opts.inbound_ports {
        let exempt = |p: &u16| {
            *p == opts.inbound_port
                || *p == opts.admin_port
                || opts.exclude_inbound_ports.contains(p)
        };
        if ports.iter().all(exempt) {
            w.push(
                "--inbound-ports lists only exempt ports (the inbound, admin or excluded ones): no inbound connection is intercepted"
                    .to_owned(),
            );
        }
    }
    w
}

/// `RETURN` for TCP to each of `ports`, in `chain`: connections left alone.
fn port_returns<'a>(chain: &'static str, ports: &'a [u16]) -> impl Iterator<Item = Rule> + 'a {
    ports.iter().map(move |p| {
        let p = p.to_string();
        Rule::new(chain, &["-p", "tcp", "--dport", &p, "-j", "RETURN"])
    })
}

fn dedup_in_order(v: &mut Vec<u16>) {
    let mut seen = Vec::with_capacity(v.len());
    v.retain(|p| {
        let new = !seen.contains(p);
        seen.push(*p);
        new
    });
}

/// The jump from a built-in chain into ours, as `iptables -S` prints it.
fn jump_line(builtin: &str, ours: &str) -> String {
    format!("-A {builtin} -p tcp -j {ours}")
}

/// What of ours is in the `nat` table now, read from `iptables -t nat -S`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainState {
    /// Our chains that exist.
    pub chains: Vec<&'static str>,
    /// Every rule in a built-in chain that jumps to one of ours, as printed
    /// (`-A OUTPUT -p tcp -j KEYPROOF_OUTPUT`), duplicates included.
    pub jumps: Vec<String>,
}

impl ChainState {
    /// Parses `iptables -t nat -S` output.
    pub fn parse(listing: &str) -> ChainState {
        let mut st = ChainState::default();
        for line in listing.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("-N ") {
                for ours in [INBOUND_CHAIN, OUTPUT_CHAIN] {
                    if name.trim() == ours {
                        st.chains.push(ours);
                    }
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let chain = rest.split_whitespace().next().unwrap_or("");
                let ours = [INBOUND_CHAIN, OUTPUT_CHAIN].contains(&chain);
                let target = rest.split_whitespace().skip_while(|w| *w != "-j").nth(1);
                if !ours && target.is_some_and(|t| t == INBOUND_CHAIN || t == OUTPUT_CHAIN) {
                    st.jumps.push(line.to_owned());
                }
            }
        }
        st
    }

    /// True when nothing of ours is installed.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// The `iptables-restore --noflush` input (`ip6tables-restore` for
/// [`Family::V6`]) that brings the family's table from `state` to exactly
/// `rules` plus one jump per chain: our chains are declared (which empties
/// them), refilled, and the jumps fixed up (a missing one inserted first in
/// its built-in chain, any other jump into our chains deleted).
pub fn install_script(family: Family, rules: &[Rule], state: &ChainState) -> String {
    let mut s = format!("*{}\n", family.table());
    for ours in [INBOUND_CHAIN, OUTPUT_CHAIN] {
        let _ = writeln!(s, ":{ours} - [0:0]");
    }
    for r in rules {
        let _ = writeln!(s, "{r}");
    }
    // Every jump into our chains is deleted and ours inserted first again,
    // in the same transaction: a rule someone inserted above it since (a
    // RETURN, an ACCEPT) would otherwise take traffic past the sidecar, and
    // the table is never seen without the jump.
    for j in &state.jumps {
        if let Some(spec) = j.strip_prefix("-A ") {
            let _ = writeln!(s, "-D {spec}");
        }
    }
    for (builtin, ours) in family.jumps() {
        let _ = writeln!(s, "-I {builtin} 1 -p tcp -j {ours}");
    }
    s.push_str("COMMIT\n");
    s
}

/// The `iptables-restore --noflush` input that deletes everything of ours
/// in `state` (the family's table); `None` when there is nothing to delete.
pub fn remove_script(family: Family, state: &ChainState) -> Option<String> {
    if state.is_empty() {
        return None;
    }
    let mut s = format!("*{}\n", family.table());
    for j in &state.jumps {
        if let Some(spec) = j.strip_prefix("-A ") {
            let _ = writeln!(s, "-D {spec}");
        }
    }
    for ours in &state.chains {
        let _ = writeln!(s, "-F {ours}\n-X {ours}");
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// The state after a complete install: what `--remove --dry-run` shows.
pub fn installed_state(family: Family) -> ChainState {
    ChainState {
        chains: vec![INBOUND_CHAIN, OUTPUT_CHAIN],
        jumps: family
            .jumps()
            .iter()
            .map(|(b, o)| jump_line(b, o))
            .collect(),
    }
}

/// What [`install`] or [`remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Rules installed where none were.
    Installed,
    /// Rules were there already and were replaced by the requested set.
    Replaced,
    /// Our rules were deleted.
    Removed,
    /// `--remove` with nothing installed.
    NothingToRemove,
}

/// Installs `opts`' rules in the current network namespace, replacing any
/// earlier set of ours in one transaction per family: IPv4's, then, where
/// the kernel has IPv6, IPv6's (an IPv6 namespace whose rules cannot be
/// installed is an error: its TCP would bypass the sidecar). The second
/// outcome is IPv6's, `None` without IPv6.
pub fn install(opts: &Options) -> Result<(Outcome, Option<Outcome>), RedirectError> {
    let rules4 = rules(opts)?;
    let _lock = NamespaceLock::take()?;
    // Both families' tools are asked first: a missing ip6tables fails
    // before IPv4's rules change, not half way.
    let state4 = read_state(Family::V4)?;
    let state6 = if has_ipv6() {
        Some(read_state(Family::V6)?)
    } else {
        None
    };
    let v4 = install_family(Family::V4, &rules4, &state4)?;
    let v6 = match state6 {
        None => None,
        Some(state6) => match install_family(Family::V6, &rules6(opts), &state6) {
            Ok(o) => Some(o),
            Err(e) => {
                // Not left half installed: IPv4's rules of this run go
                // again where there were none before it.
                if v4 == Outcome::Installed {
                    let _ = remove_family(Family::V4);
                }
                return Err(e);
            }
        },
    };
    Ok((v4, v6))
}

fn install_family(
    family: Family,
    rules: &[Rule],
    state: &ChainState,
) -> Result<Outcome, RedirectError> {
    restore(family, &install_script(family, rules, state))?;
    Ok(if state.is_empty() {
        Outcome::Installed
    } else {
        Outcome::Replaced
    })
}

/// Removes our rules from the current network namespace, both families; a
/// no-op where none are installed. The second outcome is IPv6's, `None`
/// without IPv6.
pub fn remove() -> Result<(Outcome, Option<Outcome>), RedirectError> {
    let _lock = NamespaceLock::take()?;
    // As for `install`: both tools are there before anything changes.
    read_state(Family::V4)?;
    if has_ipv6() {
        read_state(Family::V6)?;
    }
    let v4 = remove_family(Family::V4)?;
    let v6 = if has_ipv6() {
        Some(remove_family(Family::V6)?)
    } else {
        None
    };
    Ok((v4, v6))
}

fn remove_family(family: Family) -> Result<Outcome, RedirectError> {
    let state = read_state(family)?;
    match remove_script(family, &state) {
        None => Ok(Outcome::NothingToRemove),
        Some(script) => {
            restore(family, &script)?;
            Ok(Outcome::Removed)
        }
    }
}

/// Serialises `redirect` runs in one network namespace. Each run reads the
/// installed rules, then writes a transaction per family based on them:
/// two at once would delete each other's jumps (and fail on the second
/// delete), or leave one run's IPv4 rules beside the other's IPv6 rules.
/// iptables' own lock (`-w`) covers one command, not that read and the two
/// writes.
///
/// The lock is an abstract Unix socket, whose names belong to the network
/// namespace: two runs in one pod's namespace (an init container and a
/// native sidecar, whose `/run` differ) meet, runs in other pods do not,
/// and the kernel releases it when the process ends, however it ends.
struct NamespaceLock(#[allow(dead_code)] std::os::unix::net::UnixListener);

impl NamespaceLock {
    const NAME: &'static [u8] = b"keyproof-proxy-redirect.lock";
    /// Longer than any run takes (a few iptables commands).
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

    fn take() -> Result<NamespaceLock, RedirectError> {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(Self::NAME).map_err(|e| {
            RedirectError::Io {
                program: "redirect lock",
                source: e,
            }
        })?;
        let start = std::time::Instant::now();
        loop {
            match std::os::unix::net::UnixListener::bind_addr(&addr) {
                Ok(l) => return Ok(NamespaceLock(l)),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    if start.elapsed() >= Self::PATIENCE {
                        return Err(RedirectError::Busy(Self::PATIENCE));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(RedirectError::Io {
                        program: "redirect lock",
                        source: e,
                    })
                }
            }
        }
    }
}

/// Whether the kernel gives this namespace IPv6 (every interface then has
/// a link-local address at least).
pub fn has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// The namespace's global-scope IPv6 addresses as `address%interface`,
/// read from `/proc/net/if_inet6` text: those a dual-stack cluster routes
/// pod traffic over, which `redirect` refuses rather than meshes (as it
/// refuses link-local traffic, which reaches pods on the same segment).
pub fn global_ipv6_addresses(if_inet6: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in if_inet6.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [hex, _index, _prefix, scope, _flags, dev] = f[..] else {
            continue;
        };
        if scope != "00" || hex.len() != 32 {
            continue;
        }
        let Ok(bits) = u128::from_str_radix(hex, 16) else {
            continue;
        };
        out.push(format!("{}%{dev}", std::net::Ipv6Addr::from(bits)));
    }
    out
}

/// [`global_ipv6_addresses`] of the current network namespace; empty where
/// the kernel has no IPv6.
pub fn current_global_ipv6_addresses() -> Vec<String> {
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|t| global_ipv6_addresses(&t))
        .unwrap_or_default()
}

fn read_state(family: Family) -> Result<ChainState, RedirectError> {
    let program = family.iptables();
    let out = Command::new(program)
        .args(["-w", "-t", family.table(), "-S"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(program, e))?;
    check(program, out.status, &out.stderr)?;
    Ok(ChainState::parse(&String::from_utf8_lossy(&out.stdout)))
}

fn restore(family: Family, script: &str) -> Result<(), RedirectError> {
    let program = family.restore();
    let mut child = Command::new(program)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(program, e))?;
    let io = |source| RedirectError::Io { program, source };
    if let Some(mut stdin) = child.stdin.take() {
        // A refusal can close stdin early; the exit status tells why.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(io)?;
    check(program, out.status, &out.stderr)
}

fn spawn_error(program: &'static str, e: std::io::Error) -> RedirectError {
    if e.kind() == std::io::ErrorKind::NotFound {
        RedirectError::Missing { program }
    } else {
        RedirectError::Io { program, source: e }
    }
}

fn check(
    program: &'static str,
    status: std::process::ExitStatus,
    stderr: &[u8],
) -> Result<(), RedirectError> {
    if status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(stderr).trim().to_owned();
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("permission denied")
        || lower.contains("operation not permitted")
        || lower.contains("must be root")
    {
        return Err(RedirectError::NotPermitted { program, stderr });
    }
    Err(RedirectError::Failed {
        program,
        status,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(rules: &[Rule]) -> Vec<String> {
        rules.iter().map(Rule::to_string).collect()
    }

    #[test]
    fn default_rules() {
        let r = rules(&Options::default()).unwrap();
        assert_eq!(
            lines(&r),
            [
                "-A KEYPROOF_INBOUND -i lo -j RETURN",
                "-A KEYPROOF_INBOUND -p tcp --dport 15443 -j RETURN",
                "-A KEYPROOF_INBOUND -p tcp --dport 15090 -j RETURN",
                "-A KEYPROOF_INBOUND -p tcp -j REDIRECT --to-ports 15443",
                "-A KEYPROOF_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "-A KEYPROOF_OUTPUT -o lo -j RETURN",
                "-A KEYPROOF_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A KEYPROOF_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
    }

    #[test]
    fn exclusions_uid_and_port_lists() {
        let opts = Options {
            proxy_uid: 1337,
            inbound_ports: parse_inbound_ports("8080, 5432,9000,15090,8080").unwrap(),
            exclude_inbound_ports: parse_ports("--exclude-inbound-ports", "9000").unwrap(),
            exclude_outbound_ports: parse_ports("--exclude-outbound-ports", "53,443").unwrap(),
            exclude_cidrs: parse_cidrs("10.96.0.0/12,169.254.169.254").unwrap(),
            outbound_port: 16001,
            inbound_port: 16443,
            admin_port: 16090,
        };
        assert_eq!(
            lines(&rules(&opts).unwrap()),
            [
                "-A KEYPROOF_INBOUND -i lo -j RETURN",
                "-A KEYPROOF_INBOUND -p tcp --dport 16443 -j RETURN",
                "-A KEYPROOF_INBOUND -p tcp --dport 16090 -j RETURN",
                "-A KEYPROOF_INBOUND -p tcp --dport 9000 -j RETURN",
                // Sorted, deduplicated, the excluded 9000 left out; 15090 is
                // not the admin port here, so it is intercepted.
                "-A KEYPROOF_INBOUND -p tcp --dport 5432 -j REDIRECT --to-ports 16443",
                "-A KEYPROOF_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 16443",
                "-A KEYPROOF_INBOUND -p tcp --dport 15090 -j REDIRECT --to-ports 16443",
                "-A KEYPROOF_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A KEYPROOF_OUTPUT -o lo -j RETURN",
                "-A KEYPROOF_OUTPUT -d 127.0.0.0/8 -j RETURN",
                // An address is its /32.
                "-A KEYPROOF_OUTPUT -d 10.96.0.0/12 -j RETURN",
                "-A KEYPROOF_OUTPUT -d 169.254.169.254/32 -j RETURN",
                "-A KEYPROOF_OUTPUT -p tcp --dport 53 -j RETURN",
                "-A KEYPROOF_OUTPUT -p tcp --dport 443 -j RETURN",
                "-A KEYPROOF_OUTPUT -p tcp -j REDIRECT --to-ports 16001",
            ]
        );
    }

    #[test]
    fn listed_proxy_ports_are_never_redirected_inbound() {
        let opts = Options {
            inbound_ports: InboundPorts::List(vec![15443, 15090]),
            ..Options::default()
        };
        let r = lines(&rules(&opts).unwrap());
        assert!(
            !r.iter().any(|l| l.contains("REDIRECT --to-ports 15443")),
            "{r:?}"
        );
    }

    #[test]
    fn bad_ports_are_refused_with_the_flag_and_value() {
        for bad in [
            "0", "65536", "http", "-1", "+80", "080", "00443", "80,,81", "80-90",
        ] {
            let e = parse_ports("--exclude-outbound-ports", bad).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with("--exclude-outbound-ports: invalid port")
                    && msg.contains("1 to 65535"),
                "{bad}: {msg}"
            );
        }
        assert_eq!(parse_ports("--x", "").unwrap(), Vec::<u16>::new());
        assert_eq!(parse_ports("--x", " 443 , 80 ").unwrap(), vec![80, 443]);
        let e = parse_inbound_ports("").unwrap_err().to_string();
        assert!(e.contains("--inbound-ports: empty list"), "{e}");
        assert_eq!(parse_inbound_ports("ALL").unwrap(), InboundPorts::All);
        let e = parse_inbound_ports("8080,x").unwrap_err().to_string();
        assert!(e.contains("invalid port \"x\""), "{e}");
    }

    #[test]
    fn bad_cidrs_are_refused_and_ipv6_is_named() {
        for bad in ["10.0.0.0/33", "10.0.0", "example.com", "10.0.0.0/8,", "/8"] {
            let e = parse_cidrs(bad).unwrap_err().to_string();
            assert!(e.contains("invalid CIDR"), "{bad}: {e}");
        }
        for v6 in ["fd00::/8", "::1"] {
            let e = parse_cidrs(v6).unwrap_err().to_string();
            assert!(
                e.contains("is IPv6") && e.contains("IPv4 only"),
                "{v6}: {e}"
            );
        }
        assert!(parse_cidrs("").unwrap().is_empty());
        // Host bits: the network or the address? Said, not guessed.
        let e = parse_cidrs("10.0.0.1/8").unwrap_err().to_string();
        assert!(
            e.contains("has host bits set")
                && e.contains("10.0.0.0/8")
                && e.contains("10.0.0.1/32"),
            "{e}"
        );
    }

    #[test]
    fn a_uid_no_process_has_is_refused() {
        let opts = Options {
            proxy_uid: u32::MAX,
            ..Options::default()
        };
        let e = rules(&opts).unwrap_err().to_string();
        assert!(e.starts_with("--proxy-uid: 4294967295"), "{e}");
    }

    #[test]
    fn clashing_listener_ports_are_refused() {
        let opts = Options {
            admin_port: 15443,
            ..Options::default()
        };
        let e = rules(&opts).unwrap_err().to_string();
        assert_eq!(
            e,
            "--inbound-port and --admin-port are both 15443: the proxy's listeners need distinct ports"
        );
        let opts = Options {
            outbound_port: 0,
            ..Options::default()
        };
        assert!(rules(&opts)
            .unwrap_err()
            .to_string()
            .contains("--outbound-port"));
    }

    #[test]
    fn global_ipv6_addresses_are_found() {
        let t = "fe80000000000000c08457fffe97f2e4 02 40 20 c0       e1\n\
                 00000000000000000000000000000001 01 80 10 80       lo\n\
                 fd000000000000000000000000000001 03 40 00 82       eth0\n\
                 garbage\n";
        assert_eq!(global_ipv6_addresses(t), ["fd00::1%eth0"]);
        assert!(global_ipv6_addresses("").is_empty());
    }

    #[test]
    fn state_is_read_from_iptables_s() {
        let listing = "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N KEYPROOF_INBOUND\n-N OTHER\n\
            -A PREROUTING -p tcp -j KEYPROOF_INBOUND\n-A OUTPUT -d 10.0.0.0/8 -j OTHER\n\
            -A OUTPUT -p tcp -j KEYPROOF_OUTPUT\n-A OUTPUT -p tcp -j KEYPROOF_OUTPUT\n\
            -A KEYPROOF_INBOUND -p tcp -j REDIRECT --to-ports 15443\n";
        let st = ChainState::parse(listing);
        assert_eq!(st.chains, [INBOUND_CHAIN]);
        assert_eq!(
            st.jumps,
            [
                "-A PREROUTING -p tcp -j KEYPROOF_INBOUND",
                "-A OUTPUT -p tcp -j KEYPROOF_OUTPUT",
                "-A OUTPUT -p tcp -j KEYPROOF_OUTPUT",
            ]
        );
        assert!(ChainState::parse("-P OUTPUT ACCEPT\n").is_empty());
    }

    #[test]
    fn install_adds_missing_jumps_and_drops_extra_ones() {
        let r = rules(&Options::default()).unwrap();
        let fresh = install_script(Family::V4, &r, &ChainState::default());
        assert!(fresh.starts_with("*nat\n:KEYPROOF_INBOUND - [0:0]\n:KEYPROOF_OUTPUT - [0:0]\n"));
        assert!(fresh.ends_with(
            "-I PREROUTING 1 -p tcp -j KEYPROOF_INBOUND\n-I OUTPUT 1 -p tcp -j KEYPROOF_OUTPUT\nCOMMIT\n"
        ));
        assert_eq!(fresh.matches("-A KEYPROOF_").count(), r.len());
        // Installed already: each jump moved back to first place in one
        // transaction (a rule inserted above it since would bypass it).
        let again = install_script(Family::V4, &r, &installed_state(Family::V4));
        assert_eq!(again.matches("-D ").count(), 2, "{again}");
        assert!(again.ends_with(
            "-D PREROUTING -p tcp -j KEYPROOF_INBOUND\n-D OUTPUT -p tcp -j KEYPROOF_OUTPUT\n\
             -I PREROUTING 1 -p tcp -j KEYPROOF_INBOUND\n-I OUTPUT 1 -p tcp -j KEYPROOF_OUTPUT\nCOMMIT\n"
        ), "{again}");
        // Two copies of one jump and a stray one: one copy left.
        let messy = ChainState {
            chains: vec![OUTPUT_CHAIN],
            jumps: vec![
                "-A OUTPUT -p tcp -j KEYPROOF_OUTPUT".into(),
                "-A OUTPUT -p tcp -j KEYPROOF_OUTPUT".into(),
                "-A OUTPUT -d 10.0.0.0/8 -j KEYPROOF_OUTPUT".into(),
            ],
        };
        let s = install_script(Family::V4, &r, &messy);
        assert!(s.contains("-D OUTPUT -p tcp -j KEYPROOF_OUTPUT\n"), "{s}");
        assert!(
            s.contains("-D OUTPUT -d 10.0.0.0/8 -j KEYPROOF_OUTPUT\n"),
            "{s}"
        );
        assert_eq!(s.matches("-D OUTPUT").count(), 3, "{s}");
        assert_eq!(
            s.matches("-I OUTPUT 1 -p tcp -j KEYPROOF_OUTPUT\n").count(),
            1,
            "{s}"
        );
        assert!(
            s.contains("-I PREROUTING 1 -p tcp -j KEYPROOF_INBOUND\n"),
            "{s}"
        );
    }

    #[test]
    fn options_that_switch_interception_off_are_warned_about() {
        assert!(warnings(&Options::default()).is_empty());
        let o = Options {
            proxy_uid: 0,
            exclude_cidrs: parse_cidrs("10.0.0.0/8,0.0.0.0/0").unwrap(),
            inbound_ports: parse_inbound_ports("15443,15090,9000").unwrap(),
            exclude_inbound_ports: vec![9000],
            ..Options::default()
        };
        let w = warnings(&o);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with("--proxy-uid 0"), "{w:?}");
        // The whole space split in parts is every destination too.
        for split in [
            "0.0.0.0/1,128.0.0.0/1",
            "128.0.0.0/1,0.0.0.0/2,64.0.0.0/2,10.0.0.0/8",
        ] {
            let o = Options {
                exclude_cidrs: parse_cidrs(split).unwrap(),
                ..Options::default()
            };
            assert!(
                warnings(&o)
                    .iter()
                    .any(|w| w.contains("excludes every destination")),
                "{split}"
            );
        }
        let o = Options {
            exclude_cidrs: parse_cidrs("0.0.0.0/1,128.0.0.0/2,192.0.0.0/3,224.0.0.0/4").unwrap(),
            ..Options::default()
        };
        assert!(warnings(&o).is_empty(), "240.0.0.0/4 is left");
        assert!(
            w[1].contains("0.0.0.0/0 excludes every destination"),
            "{w:?}"
        );
        assert!(
            w[2].contains("no inbound connection is intercepted"),
            "{w:?}"
        );
        let some = Options {
            inbound_ports: parse_inbound_ports("8080,15443").unwrap(),
            ..Options::default()
        };
        assert!(warnings(&some).is_empty());
    }

    #[test]
    fn ipv6_refuses_what_ipv4_redirects() {
        let r = rules6(&Options::default());
        assert_eq!(
            lines(&r),
            [
                "-A KEYPROOF_INBOUND -i lo -j RETURN",
                "-A KEYPROOF_INBOUND -p tcp --syn -j REJECT --reject-with tcp-reset",
                "-A KEYPROOF_OUTPUT -m owner --uid-owner 2102 -j RETURN",
                "-A KEYPROOF_OUTPUT -o lo -j RETURN",
                "-A KEYPROOF_OUTPUT -p tcp --syn -j REJECT --reject-with tcp-reset",
            ]
        );
        // The same exclusions (ports: CIDRs are IPv4's), the same listed
        // inbound ports.
        let opts = Options {
            proxy_uid: 1337,
            inbound_ports: parse_inbound_ports("8080,9000").unwrap(),
            exclude_inbound_ports: vec![9000],
            exclude_outbound_ports: vec![53],
            exclude_cidrs: parse_cidrs("10.0.0.0/8").unwrap(),
            ..Options::default()
        };
        assert_eq!(
            lines(&rules6(&opts)),
            [
                "-A KEYPROOF_INBOUND -i lo -j RETURN",
                "-A KEYPROOF_INBOUND -p tcp --dport 9000 -j RETURN",
                "-A KEYPROOF_INBOUND -p tcp --dport 8080 --syn -j REJECT --reject-with tcp-reset",
                "-A KEYPROOF_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A KEYPROOF_OUTPUT -o lo -j RETURN",
                "-A KEYPROOF_OUTPUT -p tcp --dport 53 -j RETURN",
                "-A KEYPROOF_OUTPUT -p tcp --syn -j REJECT --reject-with tcp-reset",
            ]
        );
        // In the filter table, jumped to from INPUT and OUTPUT.
        let s = install_script(Family::V6, &r, &ChainState::default());
        assert!(s.starts_with("*filter\n:KEYPROOF_INBOUND - [0:0]\n"), "{s}");
        assert!(
            s.ends_with(
                "-I INPUT 1 -p tcp -j KEYPROOF_INBOUND\n-I OUTPUT 1 -p tcp -j KEYPROOF_OUTPUT\nCOMMIT\n"
            ),
            "{s}"
        );
        assert!(remove_script(Family::V6, &installed_state(Family::V6))
            .unwrap()
            .starts_with("*filter\n-D INPUT -p tcp -j KEYPROOF_INBOUND\n"));
    }

    #[test]
    fn one_run_at_a_time_holds_the_namespace_lock() {
        let first = NamespaceLock::take().expect("free");
        let waiter = std::thread::spawn(|| {
            let t = std::time::Instant::now();
            NamespaceLock::take().map(|_| t.elapsed())
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(first);
        let waited = waiter.join().expect("thread").expect("taken once free");
        assert!(
            waited >= std::time::Duration::from_millis(150),
            "{waited:?}"
        );
    }

    #[test]
    fn remove_deletes_only_ours_and_nothing_when_absent() {
        assert_eq!(remove_script(Family::V4, &ChainState::default()), None);
        assert_eq!(
            remove_script(Family::V4, &installed_state(Family::V4)).unwrap(),
            "*nat\n-D PREROUTING -p tcp -j KEYPROOF_INBOUND\n-D OUTPUT -p tcp -j KEYPROOF_OUTPUT\n\
             -F KEYPROOF_INBOUND\n-X KEYPROOF_INBOUND\n-F KEYPROOF_OUTPUT\n-X KEYPROOF_OUTPUT\nCOMMIT\n"
        );
    }
}
