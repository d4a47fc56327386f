//! `keyproof-proxy` command line: `run`, `check-config`, `quickstart`,
//! `redirect`.

use std::path::PathBuf;

// Standard output that a closed pipe ends quietly, under the usual names.
use keyproof_identity::{out_print as print, out_println as println};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyproof_proxy::config::{Config, IdentitySource, LogFormat};
use keyproof_proxy::redirect::{self, Family, InboundPorts, Outcome};

/// jemalloc: its statistics give the memory budget the heap in one read,
/// and its background threads give freed pages back to the system
/// (`keyproof_proxy::memory`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "keyproof-proxy",
    version,
    about = "keyproof's mutual-TLS sidecar proxy"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar.
    Run {
        /// TOML configuration file.
        #[arg(long, env = "KEYPROOF_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration (and the files it names), explain it, exit.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// A throwaway trust domain, a demo app and two sidecars, in-process.
    Quickstart {
        /// Exit after the demo instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Install (or remove) the iptables rules that send this network
    /// namespace's TCP through the sidecar (transparent mode; IPv4 only).
    Redirect(RedirectArgs),
}

#[derive(clap::Args)]
struct RedirectArgs {
    /// The sidecar's uid: its own connections are never redirected.
    #[arg(long, value_name = "UID", default_value_t = 2102)]
    proxy_uid: u32,
    /// Inbound ports to intercept: `all`, or a comma-separated list.
    #[arg(long, value_name = "all|PORTS", default_value = "all", value_parser = inbound_ports)]
    inbound_ports: InboundPorts,
    /// Inbound ports never intercepted (comma-separated).
    #[arg(long, value_name = "PORTS", default_value = "", value_parser = exclude_inbound_ports)]
    exclude_inbound_ports: Ports,
    /// Outbound destination ports never intercepted (comma-separated).
    #[arg(long, value_name = "PORTS", default_value = "", value_parser = exclude_outbound_ports)]
    exclude_outbound_ports: Ports,
    /// Outbound destination IPv4 networks never intercepted
    /// (comma-separated CIDRs or addresses).
    #[arg(long, value_name = "CIDRS", default_value = "", value_parser = exclude_cidrs)]
    exclude_cidrs: Cidrs,
    /// The outbound listener's port (127.0.0.1).
    #[arg(long, value_name = "PORT", default_value_t = 15001, value_parser = port)]
    outbound_port: u16,
    /// The inbound listener's port.
    #[arg(long, value_name = "PORT", default_value_t = 15443, value_parser = port)]
    inbound_port: u16,
    /// The admin listener's port (probes and scrapes reach it directly).
    #[arg(long, value_name = "PORT", default_value_t = 15090, value_parser = port)]
    admin_port: u16,
    /// Print the iptables-restore input instead of applying it.
    #[arg(long)]
    dry_run: bool,
    /// Delete the rules this command installs (a no-op when there are none).
    #[arg(long)]
    remove: bool,
}

// Newtypes: clap treats a bare `Vec<_>` field as a repeated argument, and
// these are one comma-separated value each.
#[derive(Clone)]
struct Ports(Vec<u16>);
#[derive(Clone)]
struct Cidrs(Vec<ipnet::Ipv4Net>);

fn inbound_ports(s: &str) -> Result<InboundPorts, String> {
    redirect::parse_inbound_ports(s).map_err(|e| e.to_string())
}
fn exclude_inbound_ports(s: &str) -> Result<Ports, String> {
    redirect::parse_ports("--exclude-inbound-ports", s)
        .map(Ports)
        .map_err(|e| e.to_string())
}
fn exclude_outbound_ports(s: &str) -> Result<Ports, String> {
    redirect::parse_ports("--exclude-outbound-ports", s)
        .map(Ports)
        .map_err(|e| e.to_string())
}
fn exclude_cidrs(s: &str) -> Result<Cidrs, String> {
    redirect::parse_cidrs(s)
        .map(Cidrs)
        .map_err(|e| e.to_string())
}
fn port(s: &str) -> Result<u16, String> {
    redirect::parse_port("port", s).map_err(|_| "expected a number from 1 to 65535".to_owned())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) if keyproof_identity::stdout::failed() => ExitCode::FAILURE,
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyproof-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run { config } => {
            let cfg = Config::load(&config)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            keyproof_proxy::init_logging(cfg.runtime.log_format);
            keyproof_proxy::run(cfg)?;
            Ok(())
        }
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)
                .with_context(|| format!("invalid configuration {}", config.display()))?;
            let mut usages = Vec::new();
            if cfg.inbound.is_some() {
                usages.push(keyproof_identity::Usage::ServerAuth);
            }
            if cfg.outbound.is_some() {
                usages.push(keyproof_identity::Usage::ClientAuth);
            }
            let invalid = || format!("invalid configuration {}", config.display());
            match &cfg.identity.source {
                IdentitySource::Files(_) => {
                    let id =
                        keyproof_proxy::identity::store::Identity::load(&cfg.identity, &usages)
                            .with_context(invalid)?;
                    keyproof_proxy::check_trust_domains(&cfg, &id).with_context(invalid)?;
                    print!("{}", cfg.explain());
                    println!("identity {} (serial {}), valid", id.id, id.serial);
                }
                IdentitySource::Ca(ca) => {
                    // The certificate exists only at run time; check what
                    // can be checked now: the bootstrap bundle and patterns.
                    keyproof_proxy::identity::renew::bootstrap_trust(&cfg.identity, ca)
                        .with_context(invalid)?;
                    if let Some(p) = &cfg.identity.pkcs11 {
                        keyproof_proxy::identity::key::TokenKey::check(p).with_context(invalid)?;
                    }
                    keyproof_proxy::check_trust_domain_name(&cfg, ca.spiffe_id.trust_domain_name())
                        .with_context(invalid)?;
                    print!("{}", cfg.explain());
                    println!(
                        "identity {} will be obtained from {} at startup",
                        ca.spiffe_id,
                        ca.describe_urls()
                    );
                }
            }
            println!("configuration OK");
            Ok(())
        }
        Cmd::Quickstart { once } => {
            keyproof_proxy::init_logging_with_default(LogFormat::Text, "warn");
            let rt = keyproof_proxy::runtime(1)?;
            rt.block_on(keyproof_proxy::quickstart::run(once))?;
            Ok(())
        }
        Cmd::Redirect(args) => redirect_cmd(args),
    }
}

fn redirect_cmd(a: RedirectArgs) -> anyhow::Result<()> {
    let opts = redirect::Options {
        proxy_uid: a.proxy_uid,
        inbound_ports: a.inbound_ports,
        exclude_inbound_ports: a.exclude_inbound_ports.0,
        exclude_outbound_ports: a.exclude_outbound_ports.0,
        exclude_cidrs: a.exclude_cidrs.0,
        outbound_port: a.outbound_port,
        inbound_port: a.inbound_port,
        admin_port: a.admin_port,
    };
    // Validated even for --remove, so a typo is never silently ignored.
    let rules = redirect::rules(&opts)?;
    if a.dry_run {
        // Both families' input, each headed by the program it is for.
        for (family, rules) in [(Family::V4, rules), (Family::V6, redirect::rules6(&opts))] {
            let script = if a.remove {
                redirect::remove_script(family, &redirect::installed_state(family))
                    .unwrap_or_default()
            } else {
                redirect::install_script(family, &rules, &Default::default())
            };
            let program = match family {
                Family::V4 => "iptables-restore",
                Family::V6 => "ip6tables-restore (where the kernel has IPv6)",
            };
            print!("# {program} --noflush\n{script}");
        }
        return Ok(());
    }
    let (v4, v6) = if a.remove {
        redirect::remove()?
    } else {
        redirect::install(&opts)?
    };
    let what = |o: Outcome| match o {
        Outcome::Installed => "installed",
        Outcome::Replaced => "replaced the rules already installed",
        Outcome::Removed => "removed",
        Outcome::NothingToRemove => "nothing to remove: none of our chains is",
    };
    println!(
        "redirect: {} ({}, {} in the nat table, IPv4)",
        what(v4),
        redirect::INBOUND_CHAIN,
        redirect::OUTPUT_CHAIN
    );
    match v6 {
        Some(o) => println!(
            "redirect: {} (the same chains in ip6tables' filter table: IPv6 TCP is refused, not intercepted)",
            what(o)
        ),
        None => println!("redirect: no IPv6 in this namespace: nothing to refuse"),
    }
    if !a.remove {
        for w in redirect::warnings(&opts) {
            eprintln!("redirect: warning: {w}");
        }
        let v6 = redirect::current_global_ipv6_addresses();
        if !v6.is_empty() {
            eprintln!(
                "redirect: warning: this namespace has global IPv6 addresses ({}): TCP over them \
                 is refused, not meshed; mesh traffic must use IPv4",
                v6.join(", ")
            );
        }
    }
    Ok(())
}
