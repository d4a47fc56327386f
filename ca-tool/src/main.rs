//! `keyproof-ca`: create a trust domain, issue X.509-SVIDs, inspect and check
//! certificates, rotate the CA, and serve renewals.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use keyproof_ca::ca::InitOptions;
use keyproof_ca::csr::{self, SubjectKey};
use keyproof_ca::fsutil::{self, PUBLIC, SECRET};
use keyproof_ca::issue::IssueRequest;
use keyproof_ca::{check, inspect, k8s, rotate, Ca};
use keyproof_identity::keys::KeyType;
use keyproof_identity::{duration, SpiffeId, TrustDomain};

fn human_duration(s: &str) -> Result<Duration, String> {
    duration::parse(s)
}

#[derive(Parser)]
#[command(
    name = "keyproof-ca",
    version,
    about = "keyproof's certificate authority: SPIFFE X.509-SVIDs for a trust domain"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a trust domain: a root, an intermediate and the trust bundle.
    Init(InitArgs),
    /// Issue an X.509-SVID from a CSR or with a newly generated key.
    Issue(IssueArgs),
    /// Show what a certificate file holds and which SVID rules it passes.
    Inspect(InspectArgs),
    /// Exit 0 if all is well, 1 if something expires within the window, 2 if
    /// something is invalid or expired.
    Check(CheckArgs),
    /// Print the trust bundle.
    Bundle(BundleArgs),
    /// Print a kubernetes.io/tls Secret (with ca.crt) for a workload.
    #[command(name = "k8s-secret")]
    K8sSecret(K8sSecretArgs),
    /// Rotate the intermediate, or move to a new root in three steps.
    #[command(subcommand)]
    Rotate(RotateCommand),
    /// Serve renewals, bootstrap and the bundle over mutual TLS.
    Serve(ServeArgs),
    /// Join tokens for bootstrapping workloads.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// CA directory.
    #[arg(long)]
    dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: std::net::SocketAddr,
    /// The server's own SPIFFE ID [default: spiffe://<trust domain>/keyproof-ca].
    #[arg(long)]
    spiffe_id: Option<String>,
    /// DNS SAN for the server certificate (repeatable), e.g. the Service name.
    #[arg(long)]
    dns: Vec<String>,
    /// Lifetime of the SVIDs it issues.
    #[arg(long, default_value = "24h", value_parser = human_duration)]
    ttl: Duration,
    /// Issuances allowed per identity per minute (0: unlimited).
    #[arg(long, default_value_t = 30)]
    rate_limit: u32,
    /// Log format: text (colour only when stderr is a terminal) or JSON lines.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Plain-HTTP admin listener: GET /healthz, /ready and /metrics (Prometheus).
    #[arg(long, default_value = "0.0.0.0:9090")]
    admin_listen: std::net::SocketAddr,
    /// Accept Kubernetes ServiceAccount tokens for bootstrap, verified against
    /// this JWKS (the cluster's /openid/v1/jwks; re-read when it changes).
    #[arg(long, value_name = "FILE", requires = "k8s_issuer")]
    k8s_jwks: Option<PathBuf>,
    /// The `iss` of the cluster's ServiceAccount tokens (the API server's
    /// --service-account-issuer).
    #[arg(long, value_name = "URL", requires = "k8s_jwks")]
    k8s_issuer: Option<String>,
    /// The audience ServiceAccount tokens must name [default: keyproof-ca].
    #[arg(long, value_name = "AUD", requires = "k8s_jwks")]
    k8s_audience: Option<String>,
}

/// Clock skew allowed on ServiceAccount tokens' `exp`, `nbf` and `iat`.
const SA_TOKEN_LEEWAY: Duration = Duration::from_secs(60);

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a single-use join token bound to one SPIFFE ID; prints it once.
    Create {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        spiffe_id: String,
        /// How long the token may be used.
        #[arg(long, default_value = "1h", value_parser = human_duration)]
        ttl: Duration,
    },
}

#[derive(Args)]
struct InitArgs {
    /// CA directory to create (must not exist, or be empty).
    #[arg(long)]
    dir: PathBuf,
    /// Trust domain name, e.g. prod.example.com.
    #[arg(long)]
    trust_domain: String,
    /// Key algorithm for the CA and for keys it generates.
    #[arg(long, default_value = "ecdsa-p256", value_parser = ["ecdsa-p256", "ed25519"])]
    key_type: String,
    /// Root lifetime.
    #[arg(long, default_value = "10y", value_parser = human_duration)]
    root_ttl: Duration,
    /// Intermediate lifetime (never past the root's).
    #[arg(long, default_value = "1y", value_parser = human_duration)]
    intermediate_ttl: Duration,
}

#[derive(Args)]
struct IssueArgs {
    /// CA directory.
    #[arg(long)]
    dir: PathBuf,
    /// The workload's SPIFFE ID; must be in the CA's trust domain.
    #[arg(long)]
    spiffe_id: String,
    /// Certificate signing request (PEM or DER); its key is certified, its
    /// requested names are ignored.
    #[arg(long, conflicts_with = "key_out", required_unless_present = "key_out")]
    csr: Option<PathBuf>,
    /// Generate a key of the CA's key type and write it here (mode 0600).
    #[arg(long)]
    key_out: Option<PathBuf>,
    /// Where to write the leaf followed by the intermediate (PEM).
    #[arg(long)]
    cert_out: PathBuf,
    /// Lifetime, capped at the intermediate's expiry.
    #[arg(long, default_value = "24h", value_parser = human_duration)]
    ttl: Duration,
    /// Extra DNS SAN (repeatable).
    #[arg(long)]
    dns: Vec<String>,
}

#[derive(Args)]
struct InspectArgs {
    /// PEM file with one or more certificates (leaf first).
    file: PathBuf,
    /// Check the chain against this PEM bundle.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CheckArgs {
    /// Check a CA directory: roots, intermediate, the ledger, rotation stage.
    #[arg(long, conflicts_with_all = ["cert", "bundle"], required_unless_present = "cert")]
    dir: Option<PathBuf>,
    /// Check one certificate chain (PEM, leaf first)...
    #[arg(long, requires = "bundle")]
    cert: Option<PathBuf>,
    /// ...against this PEM bundle.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Warn (exit 1) when something expires within this window.
    #[arg(long, default_value = "720h", value_parser = human_duration)]
    warn_before: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Args)]
struct BundleArgs {
    /// CA directory.
    #[arg(long)]
    dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "pem")]
    format: BundleFormat,
}

#[derive(Args)]
struct K8sSecretArgs {
    /// Secret name.
    #[arg(long)]
    name: String,
    /// Namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Certificate chain PEM (leaf first).
    #[arg(long)]
    cert: PathBuf,
    /// Private key PEM.
    #[arg(long)]
    key: PathBuf,
    /// Trust bundle PEM (becomes ca.crt).
    #[arg(long)]
    bundle: PathBuf,
}

#[derive(Subcommand)]
enum RotateCommand {
    /// Replace the intermediate under the current root; the bundle does not change.
    Intermediate {
        #[arg(long)]
        dir: PathBuf,
        /// Lifetime of the new intermediate.
        #[arg(long, default_value = "1y", value_parser = human_duration)]
        ttl: Duration,
    },
    /// Move to a new root: prepare, activate, finish.
    #[command(subcommand)]
    Root(RootStep),
}

#[derive(Subcommand)]
enum RootStep {
    /// Create the new root and intermediate; the bundle becomes old + new.
    Prepare {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "10y", value_parser = human_duration)]
        root_ttl: Duration,
        #[arg(long, default_value = "1y", value_parser = human_duration)]
        intermediate_ttl: Duration,
    },
    /// Issue from the new chain.
    Activate {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Remove the old root from the bundle.
    Finish {
        #[arg(long)]
        dir: PathBuf,
        /// Finish even though unexpired certificates still chain to the old root.
        #[arg(long)]
        force: bool,
    },
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("--{flag} {}", path.display()))
}

fn init(a: InitArgs) -> Result<()> {
    let trust_domain = TrustDomain::parse(&a.trust_domain).context("--trust-domain")?;
    let key_type: KeyType = a.key_type.parse().map_err(anyhow::Error::msg)?;
    let ca = Ca::init(
        &a.dir,
        &InitOptions {
            trust_domain,
            key_type,
            root_ttl: a.root_ttl,
            intermediate_ttl: a.intermediate_ttl,
        },
    )?;
    println!(
        "created trust domain {} in {} ({}); root sha256 {}",
        ca.trust_domain(),
        a.dir.display(),
        key_type,
        keyproof_identity::keys::fingerprint(ca.root())
    );
    Ok(())
}

fn issue(a: IssueArgs) -> Result<()> {
    let spiffe_id = SpiffeId::parse(&a.spiffe_id).context("--spiffe-id")?;
    if a.key_out.as_deref() == Some(a.cert_out.as_path()) {
        bail!("--key-out and --cert-out must be different files");
    }
    let ca = Ca::open(&a.dir)?;
    let (key, key_pem) = match (&a.csr, &a.key_out) {
        (Some(path), _) => {
            let der = csr::decode(&read(path, "csr")?)
                .with_context(|| format!("--csr {}", path.display()))?;
            let key = csr::verify(&der).with_context(|| format!("--csr {}", path.display()))?;
            (key, None)
        }
        (None, Some(_)) => {
            let kp = ca.key_type().generate()?;
            let pem = kp.serialize_pem();
            (SubjectKey::from_key_pair(&kp, ca.key_type()), Some(pem))
        }
        (None, None) => bail!("one of --csr or --key-out is required"),
    };
    let req = IssueRequest {
        spiffe_id,
        key,
        ttl: a.ttl,
        dns: a.dns,
    };
    // Sign first (all checks), then write the outputs, then record: a
    // failure at any step leaves the ledger without a certificate nobody has.
    let issued = ca.sign(&req, "cli")?;
    if let (Some(path), Some(pem)) = (&a.key_out, &key_pem) {
        fsutil::write_atomic(path, pem.as_bytes(), SECRET)
            .with_context(|| format!("--key-out {}", path.display()))?;
    }
    fsutil::write_atomic(&a.cert_out, issued.chain_pem().as_bytes(), PUBLIC)
        .with_context(|| format!("--cert-out {}", a.cert_out.display()))?;
    ca.record(&issued)?;
    println!(
        "issued {} serial {} valid until {}",
        issued.entry.spiffe_id, issued.entry.serial, issued.entry.not_after
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if a.log_format == "json" {
        builder.json().with_ansi(false).init();
    } else {
        // Colour codes are for people at a terminal, not for log files.
        use std::io::IsTerminal;
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
    let service_accounts = match (a.k8s_jwks, a.k8s_issuer) {
        (Some(jwks), Some(issuer)) => Some(keyproof_ca::attest::SaConfig {
            jwks,
            issuer,
            audience: a.k8s_audience.unwrap_or_else(|| "keyproof-ca".to_owned()),
            leeway: SA_TOKEN_LEEWAY,
        }),
        // clap makes the two flags require each other.
        _ => None,
    };
    let opts = keyproof_ca::serve::ServeOptions {
        dir: a.dir,
        listen: a.listen,
        server_id: a
            .spiffe_id
            .as_deref()
            .map(SpiffeId::parse)
            .transpose()
            .context("--spiffe-id")?,
        dns: a.dns,
        ttl: a.ttl,
        per_identity_per_minute: a.rate_limit,
        admin_listen: a.admin_listen,
        service_accounts,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    // The server runs as a task on the worker threads rather than on this
    // one: otherwise every accepted connection wakes a second thread that
    // competes with the workers for the same cores.
    rt.block_on(async {
        tokio::spawn(keyproof_ca::serve::run(opts, shutdown_signal()))
            .await
            .context("server task")
    })??;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init(a) => init(a)?,
        Command::Issue(a) => issue(a)?,
        Command::Inspect(a) => {
            let pem = read(&a.file, "file")?;
            let bundle = a.bundle.as_ref().map(|b| read(b, "bundle")).transpose()?;
            let report = inspect::inspect(&pem, bundle.as_deref())
                .map_err(anyhow::Error::msg)
                .with_context(|| a.file.display().to_string())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", inspect::render_text(&report));
            }
        }
        Command::Check(a) => {
            let report = match (&a.dir, &a.cert, &a.bundle) {
                (Some(dir), _, _) => check::check_dir(dir, a.warn_before)?,
                (None, Some(cert), Some(bundle)) => check::check_cert(
                    &read(cert, "cert")?,
                    &read(bundle, "bundle")?,
                    a.warn_before,
                ),
                _ => bail!("use --dir, or --cert with --bundle"),
            };
            print!("{}", report.render());
            return Ok(ExitCode::from(report.exit_code() as u8));
        }
        Command::Bundle(a) => {
            let ca = Ca::open(&a.dir)?;
            match a.format {
                BundleFormat::Pem => print!("{}", ca.bundle_pem()),
                BundleFormat::Spiffe => print!("{}", ca.bundle_spiffe_json()),
            }
        }
        Command::K8sSecret(a) => {
            let yaml = k8s::secret_yaml(
                &a.name,
                a.namespace.as_deref(),
                &read(&a.cert, "cert")?,
                &read(&a.key, "key")?,
                &read(&a.bundle, "bundle")?,
            )?;
            print!("{yaml}");
        }
        Command::Serve(a) => serve(a)?,
        Command::Token(TokenCommand::Create {
            dir,
            spiffe_id,
            ttl,
        }) => {
            let id = SpiffeId::parse(&spiffe_id).context("--spiffe-id")?;
            let ca = Ca::open(&dir)?;
            let (token, record) = keyproof_ca::token::create(&ca, &id, ttl)?;
            eprintln!("{}", record.summary());
            println!("{token}");
        }
        Command::Rotate(RotateCommand::Intermediate { dir, ttl }) => {
            println!("{}", rotate::intermediate(&dir, ttl)?)
        }
        Command::Rotate(RotateCommand::Root(step)) => {
            let msg = match step {
                RootStep::Prepare {
                    dir,
                    root_ttl,
                    intermediate_ttl,
                } => rotate::prepare(&dir, root_ttl, intermediate_ttl)?,
                RootStep::Activate { dir } => rotate::activate(&dir)?,
                RootStep::Finish { dir, force } => rotate::finish(&dir, force)?,
            };
            println!("{msg}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("keyproof-ca: error: {msg}");
            ExitCode::from(2)
        }
    }
}
