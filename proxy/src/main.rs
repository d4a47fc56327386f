//! `keyproof-proxy` command line: `run`, `check-config`, `quickstart`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyproof_proxy::config::{Config, IdentitySource, LogFormat};

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
}

fn main() -> ExitCode {
    match real_main() {
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
                    keyproof_proxy::check_trust_domain_name(&cfg, ca.spiffe_id.trust_domain_name())
                        .with_context(invalid)?;
                    print!("{}", cfg.explain());
                    println!(
                        "identity {} will be obtained from {} at startup",
                        ca.spiffe_id, ca.url
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
    }
}
