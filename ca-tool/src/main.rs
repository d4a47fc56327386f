//! `keyproof-ca`: create a trust domain, issue X.509-SVIDs, inspect and check
//! certificates, rotate the CA, and serve renewals.

use std::path::{Path, PathBuf};

// Standard output that a closed pipe ends quietly, under the usual names.
use keyproof_identity::{out_print as print, out_println as println};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use keyproof_ca::ca::{check_ca_lifetimes, InitKeys, InitOptions, Lifetime, LifetimeError};
use keyproof_ca::cakey::{KeyAccess, KeyHome};
use keyproof_ca::csr::{self, SubjectKey};
use keyproof_ca::fsutil::{self, PUBLIC, SECRET};
use keyproof_ca::issue::IssueRequest;
use keyproof_ca::store::{Checkout, PgStore, Store, StoreError, StoreSpec};
use keyproof_ca::{
    bundle_publish, check, file_renewer, inspect, issue, jwks_sync, k8s, ledger, rotate, Ca,
    CaError,
};
use keyproof_identity::keys::{self, KeyType};
use keyproof_identity::pkcs11::TokenSpec;
use keyproof_identity::verify::TrustBundle;
use keyproof_identity::{duration, SpiffeId, TrustDomain};

fn human_duration(s: &str) -> Result<Duration, String> {
    duration::parse(s)
}

/// A TTL flag's value: a human duration within the bounds of what it is the
/// lifetime of ([`Lifetime`], the library's own rule), refused at argument
/// parsing so the error names the flag and nothing has been written yet.
fn lifetime(kind: Lifetime, s: &str) -> Result<Duration, String> {
    kind.check(duration::parse(s)?).map_err(|e| e.to_string())
}

fn svid_ttl(s: &str) -> Result<Duration, String> {
    lifetime(Lifetime::Svid, s)
}

fn token_ttl(s: &str) -> Result<Duration, String> {
    lifetime(Lifetime::JoinToken, s)
}

fn intermediate_ttl(s: &str) -> Result<Duration, String> {
    lifetime(Lifetime::Intermediate, s)
}

fn root_ttl(s: &str) -> Result<Duration, String> {
    lifetime(Lifetime::Root, s)
}

/// A `--dns` value, checked at argument parsing.
fn dns_name(s: &str) -> Result<String, String> {
    issue::check_dns_name(s)
}

/// Refuses `--intermediate-ttl` longer than `--root-ttl` (each is already
/// within its own bounds), before anything is written.
fn check_ca_ttls(root: Duration, intermediate: Duration) -> Result<()> {
    match check_ca_lifetimes(root, intermediate) {
        Err(LifetimeError::IntermediateOutlivesRoot { .. }) => bail!(
            "--intermediate-ttl {} is longer than --root-ttl {}: an intermediate cannot outlive \
             its root",
            duration::format(intermediate),
            duration::format(root)
        ),
        r => Ok(r?),
    }
}

/// Parses `--spiffe-id` and checks it is a workload ID of `ca`'s trust
/// domain, so the refusal names the flag.
fn workload_id(ca: &Ca, value: &str) -> Result<SpiffeId> {
    let id = SpiffeId::parse(value).context("--spiffe-id")?;
    if !id.is_member_of(ca.trust_domain()) {
        bail!(
            "--spiffe-id {id}: not in this CA's trust domain {}",
            ca.trust_domain()
        );
    }
    if !id.is_workload() {
        bail!("--spiffe-id {id}: has no path; a workload ID needs one (e.g. /ns/default/sa/web)");
    }
    Ok(id)
}

/// Reads a PEM trust bundle named by `--bundle`; the error names the flag
/// when it cannot be read or holds no usable root.
fn read_bundle(path: &Path) -> Result<Vec<u8>> {
    let pem = read(path, "bundle")?;
    TrustBundle::from_pem(&pem).with_context(|| format!("--bundle {}", path.display()))?;
    Ok(pem)
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
    /// Create a trust domain: a root, an intermediate and the trust bundle,
    /// in a directory that does not exist yet or is empty.
    Init(InitArgs),
    /// Issue an X.509-SVID from a CSR or with a newly generated key.
    Issue(IssueArgs),
    /// Make a certificate signing request with a key held in a PKCS#11
    /// token (generating the key there with --generate), for `issue --csr`:
    /// the key never leaves the token.
    Csr(CsrArgs),
    /// Show what a certificate file holds and which SVID rules it passes;
    /// exit 2 if a rule (or the chain, with --bundle) fails.
    Inspect(InspectArgs),
    /// Exit 0 if all is well, 1 if something expires within the warning
    /// window, 2 if something is invalid, expired or no longer chains to the
    /// bundle.
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
    /// Renew a certificate and key held in files from `keyproof-ca serve`,
    /// once or as a daemon (for nginx, databases, [identity.files]).
    Renew(RenewArgs),
    /// Join tokens for bootstrapping workloads.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Keep the Kubernetes cluster's ServiceAccount token keys (its JWKS,
    /// /openid/v1/jwks) in a file for `serve --k8s-jwks`.
    #[command(name = "k8s-jwks")]
    K8sJwks(K8sJwksArgs),
    /// Publish the CA's trust bundle as a ConfigMap (key ca.crt) in every
    /// namespace carrying a label, and keep it current.
    #[command(name = "k8s-bundle")]
    K8sBundle(K8sBundleArgs),
    /// Move a CA directory's state (documents, join tokens, the ledger)
    /// into an empty PostgreSQL store; the key files stay in the directory.
    Migrate(MigrateArgs),
    /// The issuance ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Revoke certificates: `serve` no longer renews them. A serial also
    /// revokes its whole renewal lineage (its ancestors too); a SPIFFE ID, every
    /// unexpired certificate of that ID (a new bootstrap starts afresh).
    Revoke(RevokeArgs),
}

#[derive(Args)]
struct RevokeArgs {
    /// CA directory; with --store, the key directory.
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Hex serial of the certificate (as in the ledger, `openssl x509
    /// -serial`, or the sidecars' deny list; `:` separators allowed).
    #[arg(
        long,
        required_unless_present = "spiffe_id",
        conflicts_with = "spiffe_id"
    )]
    serial: Option<String>,
    /// Every unexpired certificate of this SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Why, recorded with the revocation.
    #[arg(long, default_value = "")]
    reason: String,
}

/// `--store`, for every command that reads or writes CA state.
#[derive(Args, Clone)]
struct StoreArgs {
    /// Keep the CA's state in PostgreSQL instead of in --dir:
    /// postgres://USER:PASSWORD@HOST[:PORT]/DB[?sslmode=verify-full&sslrootcert=FILE]
    /// (libpq URL; sslmode disable, prefer, require, verify-ca or verify-full).
    /// --dir then is the KEY DIRECTORY: private keys never go into the
    /// database.
    #[arg(
        long,
        value_name = "URL",
        env = "KEYPROOF_CA_STORE",
        hide_env_values = true
    )]
    store: Option<String>,
}

impl StoreArgs {
    fn spec(&self) -> Result<StoreSpec> {
        Ok(StoreSpec::parse(self.store.as_deref())?)
    }
}

#[derive(Args)]
struct MigrateArgs {
    /// The CA directory to move (only read; it keeps the key files, which
    /// every `serve --store` replica then needs as its --dir).
    #[arg(long, required_unless_present = "schema_only")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// Only bring the database schema up to date (what `serve` does at
    /// start), moving nothing.
    #[arg(long)]
    schema_only: bool,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Print every ledger entry as JSON lines (the format of ledger.jsonl),
    /// in issuance order.
    Export {
        /// CA directory (without --store).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
struct K8sBundleArgs {
    /// CA directory (only bundle.pem is read; nothing is written). Not
    /// needed with --store.
    #[arg(long, required_unless_present = "store")]
    dir: Option<PathBuf>,
    /// Read the bundle from the CA's PostgreSQL store instead (HA
    /// replicas have no CA directory); see `serve --store`.
    #[arg(
        long,
        value_name = "URL",
        env = "KEYPROOF_CA_STORE",
        hide_env_values = true
    )]
    store: Option<String>,
    /// Name of the ConfigMap in each namespace.
    #[arg(long, default_value = bundle_publish::DEFAULT_CONFIGMAP)]
    configmap: String,
    /// Kubernetes label selector for the namespaces that get the ConfigMap.
    #[arg(long, default_value = bundle_publish::DEFAULT_NAMESPACE_SELECTOR)]
    namespace_selector: String,
    /// Time between two rounds: bundle.pem re-read, namespaces listed, the
    /// ConfigMap applied where it is new or the bundle changed (failures are
    /// retried sooner, from 1s up).
    #[arg(long, default_value = "30s", value_parser = human_duration)]
    interval: Duration,
    #[command(flatten)]
    api: ApiServerArgs,
    /// Publish once and exit: 0 when every selected namespace holds the
    /// current bundle, 2 on any error (nothing is ever deleted).
    #[arg(long)]
    once: bool,
}

#[derive(Args)]
struct K8sJwksArgs {
    /// The JWKS file to keep current (replaced atomically, mode 0644, only
    /// when the cluster's keys change).
    #[arg(long)]
    out: PathBuf,
    /// Time between two fetches (failures are retried sooner, from 1s up).
    #[arg(long, default_value = "60s", value_parser = human_duration)]
    interval: Duration,
    #[command(flatten)]
    api: ApiServerArgs,
    /// Fetch once and exit: 0 when the file is current, 2 on any error
    /// (the file is then left as it was).
    #[arg(long)]
    once: bool,
}

/// How to reach the Kubernetes API server, and how to log: the same flags
/// for every command that talks to it.
#[derive(Args)]
struct ApiServerArgs {
    /// The API server, https://host[:port]; its certificate must name host.
    #[arg(long, default_value = jwks_sync::DEFAULT_API_SERVER)]
    api_server: String,
    /// Bearer token for the API server, re-read for every round of requests.
    #[arg(long, default_value = jwks_sync::DEFAULT_TOKEN_FILE)]
    token_file: PathBuf,
    /// PEM CA certificates for the API server: the only roots trusted.
    #[arg(long, default_value = jwks_sync::DEFAULT_CA_FILE)]
    ca_file: PathBuf,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Args)]
struct ServeArgs {
    /// CA directory; with --store, the key directory (every replica needs
    /// the same key files, e.g. a Secret mounted here).
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: std::net::SocketAddr,
    /// The server's own SPIFFE ID [default: spiffe://<trust domain>/keyproof-ca].
    #[arg(long)]
    spiffe_id: Option<String>,
    /// DNS SAN for the server certificate (repeatable), e.g. the Service name.
    #[arg(long, value_parser = dns_name)]
    dns: Vec<String>,
    /// Lifetime of the SVIDs it issues (1s to 100y).
    #[arg(long, default_value = "24h", value_parser = svid_ttl)]
    ttl: Duration,
    /// Issuances allowed per identity per minute to one client address,
    /// eight times that to all addresses together (0: unlimited).
    #[arg(long, default_value_t = 30)]
    rate_limit: u32,
    /// API connections one client address may hold open (0: no bound but
    /// the total of 4096). At the bound a new connection from that address
    /// closes its oldest idle one, or is refused if all are busy.
    #[arg(long, default_value_t = keyproof_ca::serve::DEFAULT_MAX_CONNECTIONS_PER_IP)]
    max_connections_per_ip: usize,
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
    /// The longest lifetime (exp - iat) a ServiceAccount token may have;
    /// 0s: no bound. Such a token bootstraps for as long as it lives.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = human_duration)]
    k8s_max_token_lifetime: Duration,
    #[command(flatten)]
    pin: PinArgs,
}

/// Clock skew allowed on ServiceAccount tokens' `exp`, `nbf` and `iat`.
const SA_TOKEN_LEEWAY: Duration = Duration::from_secs(60);

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a single-use join token bound to one SPIFFE ID; prints it once.
    Create {
        /// CA directory; with --store, the key directory.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        spiffe_id: String,
        /// How long the token may be used (1s to 100y).
        #[arg(long, default_value = "1h", value_parser = token_ttl)]
        ttl: Duration,
    },
}

#[derive(Args)]
struct InitArgs {
    /// CA directory to create: it must not exist, or be an empty directory
    /// (an existing CA, any other file or a non-empty directory is refused).
    /// With --store, the key directory the key files go to (created 0700
    /// if missing; it must not hold a CA's keys already).
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Trust domain name, e.g. prod.example.com.
    #[arg(long)]
    trust_domain: String,
    /// Key algorithm for the CA and for keys it generates.
    #[arg(long, default_value = "ecdsa-p256", value_parser = ["ecdsa-p256", "ed25519"])]
    key_type: String,
    /// Root lifetime (1d to 100y).
    #[arg(long, default_value = "10y", value_parser = root_ttl)]
    root_ttl: Duration,
    /// Intermediate lifetime (1h to 100y, and no longer than --root-ttl).
    #[arg(long, default_value = "1y", value_parser = intermediate_ttl)]
    intermediate_ttl: Duration,
    /// Generate the CA keys in a PKCS#11 token instead of files: the
    /// module (.so). With --pkcs11-token and --pin-file; no *.key file is
    /// written.
    #[arg(long, value_name = "MODULE", requires_all = ["pkcs11_token", "pin_file"])]
    pkcs11_module: Option<PathBuf>,
    /// Label of the token the keys are generated in (labels
    /// keyproof-root-<kid>, keyproof-intermediate-<kid>).
    #[arg(long, value_name = "LABEL", requires_all = ["pkcs11_module", "pin_file"])]
    pkcs11_token: Option<String>,
    /// File holding the token's user PIN (recorded in ca.json; later
    /// commands take --pin-file to use another path).
    #[arg(long, value_name = "FILE", requires_all = ["pkcs11_module", "pkcs11_token"])]
    pin_file: Option<PathBuf>,
    /// Keep the root key in this other token (same module) instead: an
    /// offline root, needed only by `rotate`.
    #[arg(
        long,
        value_name = "LABEL",
        requires = "pkcs11_module",
        conflicts_with = "root_key_out"
    )]
    root_pkcs11_token: Option<String>,
    /// PIN file for --root-pkcs11-token [default: --pin-file].
    #[arg(long, value_name = "FILE", requires = "root_pkcs11_token")]
    root_pin_file: Option<PathBuf>,
    /// Write the root key to this file (mode 0600, outside --dir, never
    /// replacing a file; `-`: standard output) instead of --dir/root.key: an
    /// offline root, needed only by `rotate` (`rotate intermediate
    /// --root-key FILE`).
    #[arg(long, value_name = "FILE")]
    root_key_out: Option<PathBuf>,
}

/// `--pin-file` for commands that sign with a token key.
#[derive(Args)]
struct PinArgs {
    /// PIN file for the CA's PKCS#11 token, instead of the one ca.json
    /// records.
    #[arg(long, value_name = "FILE")]
    pin_file: Option<PathBuf>,
}

impl PinArgs {
    fn access(&self) -> KeyAccess {
        KeyAccess {
            pin_file: self.pin_file.clone(),
            ..KeyAccess::default()
        }
    }
}

#[derive(Args)]
struct IssueArgs {
    /// CA directory; with --store, the key directory.
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// The workload's SPIFFE ID; must be in the CA's trust domain.
    #[arg(long)]
    spiffe_id: String,
    /// Certificate signing request (PEM or DER); its key is certified, its
    /// requested names are ignored.
    #[arg(long, conflicts_with = "key_out", required_unless_present = "key_out")]
    csr: Option<PathBuf>,
    /// Generate a key of the CA's key type and write it here (mode 0600).
    /// Never inside the CA directory.
    #[arg(long)]
    key_out: Option<PathBuf>,
    /// Where to write the leaf followed by the intermediate (PEM). Never
    /// inside the CA directory.
    #[arg(long)]
    cert_out: PathBuf,
    /// Replace --cert-out and --key-out if they exist (refused otherwise).
    #[arg(long)]
    force: bool,
    /// Lifetime (1s to 100y), capped at the intermediate's expiry.
    #[arg(long, default_value = "24h", value_parser = svid_ttl)]
    ttl: Duration,
    /// Extra DNS SAN (repeatable).
    #[arg(long, value_parser = dns_name)]
    dns: Vec<String>,
    #[command(flatten)]
    pin: PinArgs,
}

#[derive(Args)]
struct CsrArgs {
    /// The SPIFFE ID the request names (the CA certifies the ID it is told
    /// with `issue --spiffe-id`; this one is informational).
    #[arg(long)]
    spiffe_id: String,
    /// Path of the PKCS#11 module (.so).
    #[arg(long, value_name = "MODULE")]
    pkcs11_module: PathBuf,
    /// Label of the token holding the key.
    #[arg(long, value_name = "LABEL")]
    pkcs11_token: String,
    /// File holding the token's user PIN.
    #[arg(long, value_name = "FILE")]
    pin_file: PathBuf,
    /// CKA_LABEL of the key pair (`[identity.pkcs11] key_label`).
    #[arg(long, value_name = "LABEL")]
    key_label: String,
    /// Generate the key pair in the token when no key has this label
    /// (sensitive, not extractable).
    #[arg(long)]
    generate: bool,
    /// Key type for --generate.
    #[arg(long, default_value = "ecdsa-p256", requires = "generate")]
    key_type: KeyType,
    /// Where to write the PEM request (`-`: standard output).
    #[arg(long, default_value = "-")]
    out: PathBuf,
}

#[derive(Args)]
struct InspectArgs {
    /// PEM file with one or more certificates (leaf first).
    #[arg(value_name = "FILE")]
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
    /// Check a CA directory: roots, intermediate, the ledger, rotation stage
    /// (with --store: the CA in the store, --dir being the key directory).
    #[arg(long, conflicts_with_all = ["cert", "bundle"], required_unless_present = "cert")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// Check one certificate chain (PEM, leaf first)...
    #[arg(long, requires = "bundle")]
    cert: Option<PathBuf>,
    /// ...against this PEM bundle.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Warn (exit 1) when a certificate expires within this window; applies
    /// to every certificate checked (roots, intermediate, issued
    /// certificates, --cert chain) [default: the last third of each
    /// certificate's own lifetime, when it is due for renewal].
    #[arg(long, value_parser = human_duration)]
    warn_before: Option<Duration>,
    /// PIN file for the CA's PKCS#11 token (with --dir), instead of the one
    /// ca.json records.
    #[arg(long, value_name = "FILE", requires = "dir")]
    pin_file: Option<PathBuf>,
    /// PIN file for a root key in its own token (with --dir).
    #[arg(long, value_name = "FILE", requires = "dir")]
    root_pin_file: Option<PathBuf>,
}

#[derive(Args)]
struct RenewArgs {
    /// Certificate chain PEM (leaf first), replaced by the renewed chain.
    #[arg(long)]
    cert: PathBuf,
    /// Its private key PEM, replaced by a new key (mode 0600).
    #[arg(long)]
    key: PathBuf,
    /// The CA server, https://host:port; repeat for several replicas, tried
    /// in order with failover (a name resolving to several addresses counts
    /// as several).
    #[arg(long, required = true)]
    ca_url: Vec<String>,
    /// Trust bundle PEM authenticating the CA server; rewritten when the
    /// CA's bundle changes.
    #[arg(long)]
    bundle: PathBuf,
    /// The CA server's SPIFFE ID [default: spiffe://<trust domain>/keyproof-ca].
    #[arg(long)]
    server_id: Option<String>,
    /// Keep running: renew at two thirds of each certificate's life, retry
    /// failures with backoff, stop on SIGTERM.
    #[arg(long)]
    daemon: bool,
    /// Shell command run (sh -c) after each renewal or bundle update, e.g.
    /// "nginx -s reload".
    #[arg(long)]
    exec: Option<String>,
    /// Renew now even if the certificate is not yet at two thirds of its life.
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Args)]
struct BundleArgs {
    /// CA directory; with --store, the key directory.
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
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
    /// Trust bundle PEM (becomes ca.crt) [default with --store: the
    /// store's bundle].
    #[arg(long, required_unless_present = "store")]
    bundle: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Subcommand)]
enum RotateCommand {
    /// Replace the intermediate under the current root; the bundle does not change.
    Intermediate {
        /// CA directory; with --store, the key directory.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        /// Lifetime of the new intermediate (1h to 100y), capped at the
        /// root's expiry.
        #[arg(long, default_value = "1y", value_parser = intermediate_ttl)]
        ttl: Duration,
        #[command(flatten)]
        keys: RootKeyArgs,
        /// The offline root key file (for a CA made with --root-key-out).
        #[arg(long, value_name = "FILE", conflicts_with = "root_pin_file")]
        root_key: Option<PathBuf>,
    },
    /// Move to a new root: prepare, activate, finish.
    #[command(subcommand)]
    Root(RootStep),
}

#[derive(Subcommand)]
enum RootStep {
    /// Create the new root and intermediate; the bundle becomes old + new.
    Prepare {
        /// CA directory; with --store, the key directory.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        /// Lifetime of the new root (1d to 100y).
        #[arg(long, default_value = "10y", value_parser = root_ttl)]
        root_ttl: Duration,
        /// Lifetime of the new intermediate (1h to 100y, and no longer than
        /// --root-ttl).
        #[arg(long, default_value = "1y", value_parser = intermediate_ttl)]
        intermediate_ttl: Duration,
        #[command(flatten)]
        keys: RootKeyArgs,
        /// Write the new root key to this file (0600, outside --dir; `-`:
        /// standard output, the messages then go to stderr): needed
        /// when the current root is offline, refused when it is in a token
        /// (the new one is made in the same token). For a root in --dir,
        /// it moves the new root offline.
        #[arg(long, value_name = "FILE", conflicts_with = "root_pin_file")]
        root_key_out: Option<PathBuf>,
    },
    /// Issue from the new chain.
    Activate {
        /// CA directory; with --store, the key directory.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Remove the old root from the bundle.
    Finish {
        /// CA directory; with --store, the key directory.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        /// Finish even though unexpired certificates still chain to the old root.
        #[arg(long)]
        force: bool,
    },
}

/// PIN files for the tokens of a command that may use the root key.
#[derive(Args)]
struct RootKeyArgs {
    /// PIN file for the CA's PKCS#11 token (the root's too when it shares
    /// the token), instead of the one ca.json records.
    #[arg(long, value_name = "FILE")]
    pin_file: Option<PathBuf>,
    /// PIN file for a root key in its own token, instead of the one
    /// ca.json records.
    #[arg(long, value_name = "FILE")]
    root_pin_file: Option<PathBuf>,
}

impl RootKeyArgs {
    fn access(&self, root_key: Option<PathBuf>) -> KeyAccess {
        KeyAccess {
            pin_file: self.pin_file.clone(),
            root_pin_file: self.root_pin_file.clone(),
            root_key,
        }
    }
}

/// Reads a file named by `--flag` (a bounded regular file or `/dev/stdin`,
/// see [`fsutil::read_input`]); the error names the flag and the path.
fn read(path: &Path, flag: &str) -> Result<Vec<u8>> {
    fsutil::read_input(path, fsutil::MAX_INPUT)
        .with_context(|| format!("--{flag} {}", path.display()))
}

/// What a command does with the CA state (see [`with_state`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Reads only: nothing is written back.
    Read,
    /// Appends tokens or ledger entries.
    Append,
    /// Changes documents: holds the store's lock from checkout to checkin.
    Exclusive,
    /// `init`: exclusive, into a store that holds no CA, schema migrated.
    Init,
    /// `serve`'s look at the CA before it starts: read, schema migrated.
    Serve,
}

/// A store error as the command line shows it: naming `--store` (the URL
/// inside is shown with its password masked).
fn store_err(e: StoreError) -> anyhow::Error {
    match e {
        StoreError::BadUrl { .. } => e.into(),
        e => anyhow::Error::from(e).context("--store"),
    }
}

/// A single-threaded runtime for a one-shot command's database work.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Runs `f` on the CA directory: `dir` itself without `--store`; with it,
/// a workspace checked out of PostgreSQL (`dir` being the key directory)
/// and checked back in when `f` succeeds (a failure writes nothing).
fn with_state<T>(
    store: &StoreArgs,
    dir: &Path,
    access: Access,
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    // A PIN the token refuses is remembered here (pin_memory.rs): the CA
    // directory, or the key directory with --store.
    keyproof_ca::pin_memory::remember_in(dir);
    let spec = store.spec()?;
    if spec == StoreSpec::Dir {
        // Directory mode has no store lock: a lock file in the CA directory
        // serialises read-modify-write of its documents (dirlock.rs), held
        // until `f` is done. `init` needs none (it refuses a non-empty
        // directory, and its files appear by rename, ca.json last).
        use keyproof_ca::dirlock::{DirLock, Mode};
        // A directory `migrate` moved into a store is not a CA any more.
        if !matches!(access, Access::Init) && dir.join(keyproof_ca::ca::files::STATE).exists() {
            keyproof_ca::migrated::refuse(dir)?;
        }
        if !matches!(access, Access::Init) {
            recover_dir(dir)?;
        }
        let mode = match access {
            Access::Exclusive => Some(Mode::Exclusive),
            Access::Append => Some(Mode::Shared),
            Access::Read | Access::Init | Access::Serve => None,
        };
        let _lock = match mode {
            Some(m) => DirLock::acquire(dir, m)?,
            None => None,
        };
        return f(dir);
    }
    let rt = runtime()?;
    let migrate = matches!(access, Access::Init | Access::Serve);
    let exclusive = matches!(access, Access::Init | Access::Exclusive);
    let opened = rt
        .block_on(Store::open(&spec, dir, migrate))
        .map_err(store_err)?;
    // Appending (`issue`, `token create`) and serve's look never sign with
    // a root key: their workspace gets none.
    let roots = !matches!(access, Access::Append | Access::Serve);
    let co = rt
        .block_on(opened.checkout_keys(exclusive, roots))
        .map_err(store_err)?;
    if let Checkout::Workspace(ws) = &co {
        match (access, ws.trust_domain()) {
            (Access::Init, Some(td)) => return Err(store_err(StoreError::AlreadyHoldsCa(td))),
            (Access::Init, None) => {}
            (_, None) => return Err(store_err(StoreError::NoCa)),
            _ => {}
        }
    }
    let ws = co.path().to_owned();
    let out = f(&ws).map_err(|e| in_store(e, &ws))?;
    if matches!(access, Access::Append | Access::Exclusive | Access::Init) {
        rt.block_on(opened.checkin(co)).map_err(store_err)?;
    }
    Ok(out)
}

/// Finishes or undoes a change a killed command left half made in the CA
/// directory `dir` (journal.rs), under the exclusive lock, before a command
/// reads it: nothing reads a half-rotated directory.
fn recover_dir(dir: &Path) -> Result<()> {
    use keyproof_ca::dirlock::{DirLock, Mode};
    use keyproof_ca::journal::{self, Recovered};
    if !dir.join(journal::JOURNAL).is_dir() {
        return Ok(());
    }
    let _lock = DirLock::acquire(dir, Mode::Exclusive)?;
    match journal::recover(dir)? {
        Recovered::Finished => eprintln!(
            "keyproof-ca: {}: finished a change an interrupted command had committed",
            dir.display()
        ),
        Recovered::Undone => eprintln!(
            "keyproof-ca: {}: removed a change an interrupted command had not committed; the directory is as before it",
            dir.display()
        ),
        Recovered::Nothing => {}
    }
    Ok(())
}

/// An error of the directory code run on a workspace: the workspace's
/// temporary path means nothing to the operator, so it reads `[store]`.
fn in_store(e: anyhow::Error, ws: &Path) -> anyhow::Error {
    let ws = ws.display().to_string();
    let mut msg = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if msg.ends_with(&cause) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&cause);
    }
    anyhow::Error::msg(msg.replace(&ws, "[store]"))
}

/// With `--store`, `--dir` is the key directory every replica holds: an
/// offline root key written into it would not be offline.
fn offline_key_outside(store: &StoreArgs, dir: &Path, out: Option<&Path>) -> Result<()> {
    let Some(out) = out else { return Ok(()) };
    if store.spec()? == StoreSpec::Dir || keyproof_ca::ca::is_stdout(out) {
        return Ok(());
    }
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| abs(p));
    let parent = abs(out).parent().map(canon).unwrap_or_else(|| abs(out));
    if abs(out).starts_with(abs(dir)) || parent.starts_with(canon(dir)) {
        bail!(
            "--root-key-out {}: is inside the key directory --dir {}; an offline root key must \
             live elsewhere (another machine, removable media)",
            out.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Where a command's CA lives, for messages.
fn describe_state(store: &StoreArgs, dir: &Path) -> Result<String> {
    Ok(match store.spec()? {
        StoreSpec::Dir => dir.display().to_string(),
        StoreSpec::Postgres(url) => format!(
            "{} (keys in {})",
            keyproof_ca::store::mask_password(&url),
            dir.display()
        ),
    })
}

fn init(a: InitArgs) -> Result<()> {
    let trust_domain = TrustDomain::parse(&a.trust_domain).context("--trust-domain")?;
    let key_type: KeyType = a.key_type.parse().map_err(anyhow::Error::msg)?;
    check_ca_ttls(a.root_ttl, a.intermediate_ttl)?;
    // clap makes the three token flags go together.
    let token = match (&a.pkcs11_module, &a.pkcs11_token, &a.pin_file) {
        (Some(module), Some(token), Some(pin)) => Some(TokenSpec {
            module: module.clone(),
            token_label: token.clone(),
            pin_file: pin.clone(),
        }),
        _ => None,
    };
    let intermediate = token.clone().map_or(KeyHome::Dir, KeyHome::Token);
    let root = match (&a.root_pkcs11_token, &a.root_key_out, &token) {
        (Some(label), _, Some(t)) => KeyHome::Token(TokenSpec {
            module: t.module.clone(),
            token_label: label.clone(),
            pin_file: a
                .root_pin_file
                .clone()
                .unwrap_or_else(|| t.pin_file.clone()),
        }),
        (_, Some(path), _) => KeyHome::Offline(path.clone()),
        _ => intermediate.clone(),
    };
    let is_store = a.store.spec()? != StoreSpec::Dir;
    offline_key_outside(&a.store, &a.dir, a.root_key_out.as_deref())?;
    if is_store {
        // The key directory receives the keys at checkin: refuse one that
        // holds a CA's keys before anything is generated.
        if a.dir.exists() && !a.dir.is_dir() {
            bail!("--dir {}: not a directory", a.dir.display());
        }
        for f in ["root.key", "intermediate.key", "next"] {
            if a.dir.join(f).exists() {
                bail!(
                    "--dir {}: already holds a CA's keys ({f}); refusing to overwrite them \
                     (with --store, --dir is the key directory)",
                    a.dir.display()
                );
            }
        }
    }
    let where_ = describe_state(&a.store, &a.dir)?;
    let dir = a.dir.clone();
    let opts = InitOptions {
        trust_domain,
        key_type,
        root_ttl: a.root_ttl,
        intermediate_ttl: a.intermediate_ttl,
    };
    let keys = InitKeys { intermediate, root };
    let msg = with_state(&a.store, &a.dir, Access::Init, |ca_dir| {
        let ca = Ca::init_with(ca_dir, &opts, &keys).map_err(|e| match e {
            // Whatever the file system refused is about --dir or beside it.
            CaError::Io { .. } if !is_store => {
                anyhow::Error::from(e).context(format!("--dir {}", dir.display()))
            }
            e => e.into(),
        })?;
        let locs = &ca.state().keys;
        Ok(format!(
            "created trust domain {} in {} ({}); root sha256 {}\nroot key: {}\nintermediate key: {}",
            ca.trust_domain(),
            where_,
            key_type,
            keyproof_identity::keys::fingerprint(ca.root()),
            locs.root.describe("root"),
            locs.intermediate.describe("intermediate"),
        ))
    })?;
    // Standard output carries the root key with `--root-key-out -`.
    if a.root_key_out
        .as_deref()
        .is_some_and(keyproof_ca::ca::is_stdout)
    {
        eprintln!("{msg}");
    } else {
        println!("{msg}");
    }
    Ok(())
}

fn make_csr(a: CsrArgs) -> Result<()> {
    use keyproof_identity::pkcs11::Pkcs11Key;
    SpiffeId::parse(&a.spiffe_id).context("--spiffe-id")?;
    let spec = TokenSpec {
        module: a.pkcs11_module,
        token_label: a.pkcs11_token,
        pin_file: a.pin_file,
    };
    let (key, generated) = if a.generate {
        Pkcs11Key::open_or_generate(&spec, &a.key_label, a.key_type)?
    } else {
        (Pkcs11Key::open(&spec, &a.key_label)?, false)
    };
    let pem = keyproof_ca::client::token_csr(&key, &a.spiffe_id)?;
    if a.out.as_os_str() == "-" {
        print!("{pem}");
    } else {
        fsutil::write_atomic(&a.out, pem.as_bytes(), PUBLIC)
            .with_context(|| format!("--out {}", a.out.display()))?;
    }
    eprintln!(
        "{} key {} ({}); request for {} written to {}",
        if generated { "generated" } else { "used" },
        key.uri(),
        key.key_type(),
        a.spiffe_id,
        a.out.display()
    );
    Ok(())
}

fn issue(a: IssueArgs) -> Result<()> {
    SpiffeId::parse(&a.spiffe_id).context("--spiffe-id")?;
    let store = a.store.clone();
    let key_dir = a.dir.clone();
    let outputs: Vec<PathBuf> = [Some(a.cert_out.clone()), a.key_out.clone()]
        .into_iter()
        .flatten()
        .collect();
    let mut written = false;
    let result = with_state(&store, &key_dir, Access::Append, |dir| {
        let msg = issue_in(dir, a)?;
        written = true;
        Ok(msg)
    });
    match result {
        Ok(msg) => {
            println!("{msg}");
            Ok(())
        }
        Err(e) => {
            // With --store the ledger entry is committed after the files
            // are written: if that failed, no certificate may be out there
            // that the ledger does not know.
            if written {
                for p in &outputs {
                    let _ = std::fs::remove_file(p);
                }
            }
            Err(e)
        }
    }
}

/// `issue` on the CA directory `dir` (`a.dir` itself, or a workspace with
/// `a.dir` as the key directory).
fn issue_in(dir: &Path, a: IssueArgs) -> Result<String> {
    let ca = Ca::open_with(dir, &a.pin.access())?;
    let spiffe_id = workload_id(&ca, &a.spiffe_id)?;
    // Every output is checked before anything is signed, written or
    // recorded: a refusal changes nothing. Outputs never go into the CA
    // directory, nor into the key directory of a store.
    let check_output = |flag: &'static str, p: &Path| -> Result<PathBuf> {
        if dir != a.dir && a.dir.exists() {
            issue::check_output(&a.dir, flag, p, a.force)?;
        }
        Ok(issue::check_output(dir, flag, p, a.force)?)
    };
    let cert_out = check_output("cert-out", &a.cert_out)?;
    let key_out = a
        .key_out
        .as_deref()
        .map(|p| check_output("key-out", p))
        .transpose()?;
    if key_out.as_ref() == Some(&cert_out) {
        return Err(issue::OutputError::Same.into());
    }
    let (key, key_pem) = match (&a.csr, &key_out) {
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
    // Sign first (all checks), stage the outputs, record, then publish
    // them: a certificate is never out there without its ledger line (which
    // `revoke` and `serve` go by), even if the process dies between the two
    // or the ledger cannot be written. A failure to publish leaves a line
    // for a certificate nobody has, which only delays `rotate root finish`
    // until it would have expired.
    let issued = ca.sign(&req, "cli")?;
    let flag_err = |flag: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::Error::from(issue::OutputError::Exists { flag, path })
            } else {
                anyhow::Error::from(issue::OutputError::Io { flag, path, source })
            }
        }
    };
    // Both files are staged before either is published, and without --force
    // each is created only if still absent.
    let key_staged = match (&key_out, &key_pem, a.key_out.as_deref()) {
        (Some(path), Some(pem), Some(given)) => Some((
            fsutil::stage(path, pem.as_bytes(), SECRET).map_err(flag_err("key-out", given))?,
            path,
            given,
        )),
        _ => None,
    };
    let cert_staged = fsutil::stage(&cert_out, issued.chain_pem().as_bytes(), PUBLIC)
        .map_err(flag_err("cert-out", &a.cert_out))?;
    ca.record(&issued)?;
    let replace = a.force;
    let mut key_written = None;
    if let Some((staged, path, given)) = key_staged {
        staged
            .commit(path, replace)
            .map_err(flag_err("key-out", given))?;
        key_written = Some(path);
    }
    if let Err(e) = cert_staged.commit(&cert_out, replace) {
        // The key was created for a certificate that will not exist.
        if let (Some(path), false) = (key_written, replace) {
            let _ = std::fs::remove_file(path);
        }
        return Err(flag_err("cert-out", &a.cert_out)(e));
    }
    Ok(format!(
        "issued {} serial {} valid until {}",
        issued.entry.spiffe_id, issued.entry.serial, issued.entry.not_after
    ))
}

fn inspect(a: InspectArgs) -> Result<ExitCode> {
    // FILE is positional: errors name the file, not a flag.
    let pem = fsutil::read_input(&a.file, fsutil::MAX_INPUT)
        .with_context(|| a.file.display().to_string())?;
    let bundle = a.bundle.as_deref().map(read_bundle).transpose()?;
    let report = inspect::inspect(&pem, bundle.as_deref())
        .map_err(anyhow::Error::msg)
        .with_context(|| a.file.display().to_string())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", inspect::render_text(&report));
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn renew(a: RenewArgs) -> Result<ExitCode> {
    let opts = file_renewer::Options {
        cert: a.cert,
        key: a.key,
        ca_url: a.ca_url,
        bundle: a.bundle,
        server_id: a.server_id,
        exec: a.exec,
        force: a.force,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    if a.daemon {
        rt.block_on(file_renewer::daemon(&opts, shutdown_signal()))?;
    } else {
        let outcome = rt.block_on(file_renewer::once(&opts))?;
        println!("{outcome}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr, `text` or `json`, filtered by `RUST_LOG` (default info).
/// Colour codes are for a person at a terminal, never for log files.
fn init_logging(format: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(format != "json" && std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(a: ServeArgs) -> Result<()> {
    init_logging(&a.log_format);
    let service_accounts = match (a.k8s_jwks, a.k8s_issuer) {
        (Some(jwks), Some(issuer)) => Some(keyproof_ca::attest::SaConfig {
            jwks,
            issuer,
            audience: a.k8s_audience.unwrap_or_else(|| "keyproof-ca".to_owned()),
            leeway: SA_TOKEN_LEEWAY,
            max_lifetime: Some(a.k8s_max_token_lifetime).filter(|d| !d.is_zero()),
        }),
        // clap makes the two flags require each other.
        _ => None,
    };
    // The CA and the server's own identity are checked here, so that the
    // errors name their flags.
    let server_id = {
        let id = a
            .spiffe_id
            .as_deref()
            .map(SpiffeId::parse)
            .transpose()
            .context("--spiffe-id")?;
        match id {
            None => None,
            // With --store the CA is read from the store (whose schema is
            // brought up to date, as the server does).
            Some(id) => {
                let id = with_state(&a.store, &a.dir, Access::Serve, |dir| {
                    workload_id(&Ca::open_public(dir)?, id.as_str())
                })?;
                // Clients take the CA only by an ID at or below the default
                // (`[identity.ca] server_id`, `renew --server-id`); any
                // other would start a server nobody can renew from, under
                // an ID a workload may hold.
                if !keyproof_identity::spiffe::is_ca_server_id(&id) {
                    let own = keyproof_identity::spiffe::ca_server_id(id.trust_domain_name());
                    bail!(
                        "--spiffe-id {id}: not the CA's own ID; use {own} or an ID below it (e.g. {own}/replica-1): \
                         clients take the CA by no other"
                    );
                }
                Some(id)
            }
        }
    };
    let store = a.store.spec()?;
    // Whether or not `--spiffe-id` looked at the directory above: a change
    // a killed `rotate` left is finished or undone before serving.
    if store == StoreSpec::Dir {
        recover_dir(&a.dir)?;
    }
    // A PIN the token refuses is remembered in the CA (or key) directory,
    // so that a restarted server does not offer it again (pin_memory.rs).
    keyproof_ca::pin_memory::remember_in(&a.dir);
    let opts = keyproof_ca::serve::ServeOptions {
        dir: a.dir,
        listen: a.listen,
        server_id,
        dns: a.dns,
        ttl: a.ttl,
        per_identity_per_minute: a.rate_limit,
        admin_listen: a.admin_listen,
        service_accounts,
        pin_file: a.pin.pin_file,
        store,
        max_connections_per_ip: a.max_connections_per_ip,
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

fn k8s_jwks(a: K8sJwksArgs) -> Result<()> {
    if a.interval < Duration::from_secs(1) {
        bail!("--interval must be at least 1s");
    }
    init_logging(&a.api.log_format);
    let opts = jwks_sync::SyncOptions {
        out: a.out,
        api_server: a.api.api_server,
        token_file: a.api.token_file,
        ca_file: a.api.ca_file,
        interval: a.interval,
    };
    // One small request a minute: a single thread is plenty.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    if a.once {
        let outcome = rt.block_on(jwks_sync::sync_once(&opts))?;
        println!("{}", outcome.describe(&opts.out));
    } else {
        rt.block_on(jwks_sync::run(&opts, shutdown_signal()));
    }
    Ok(())
}

fn k8s_bundle(a: K8sBundleArgs) -> Result<()> {
    if a.interval < Duration::from_secs(1) {
        bail!("--interval must be at least 1s");
    }
    init_logging(&a.api.log_format);
    // A few requests per round: a single thread is plenty.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let store = match StoreSpec::parse(a.store.as_deref())? {
        StoreSpec::Dir => None,
        StoreSpec::Postgres(url) => Some(bundle_publish::StoreSource(std::sync::Arc::new(
            rt.block_on(keyproof_ca::store::PgStore::connect(&url, false))
                .context("--store")?,
        ))),
    };
    let opts = bundle_publish::PublishOptions {
        dir: a.dir.unwrap_or_default(),
        store,
        configmap: a.configmap,
        namespace_selector: a.namespace_selector,
        api_server: a.api.api_server,
        token_file: a.api.token_file,
        ca_file: a.api.ca_file,
        interval: a.interval,
    };
    let publisher = bundle_publish::Publisher::new(opts.clone())?;
    if a.once {
        let report = rt.block_on(bundle_publish::publish_once(&opts))?;
        println!(
            "{}",
            report.describe(&opts.configmap, &opts.namespace_selector)
        );
    } else {
        rt.block_on(bundle_publish::run(publisher, shutdown_signal()));
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. SIGHUP, which supervisors send for
/// "reload", is logged and otherwise ignored: its default action would stop
/// the daemon on the spot, without finishing the requests in flight.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    let mut hup = signal(SignalKind::hangup()).ok();
    loop {
        let hangup = async {
            match &mut hup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => return,
            _ = tokio::signal::ctrl_c() => return,
            Some(()) = hangup => {
                tracing::info!("SIGHUP ignored: keyproof-ca stops on SIGTERM or SIGINT");
            }
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init(a) => init(a)?,
        Command::Issue(a) => issue(a)?,
        Command::Inspect(a) => return inspect(a),
        Command::Check(a) => {
            let report = match (&a.dir, &a.cert, &a.bundle) {
                (Some(dir), _, _) => with_state(&a.store, dir, Access::Read, |dir| {
                    Ok(check::check_dir(
                        dir,
                        a.warn_before,
                        &KeyAccess {
                            pin_file: a.pin_file.clone(),
                            root_pin_file: a.root_pin_file.clone(),
                            root_key: None,
                        },
                    )?)
                })?,
                (None, Some(cert), Some(bundle)) => {
                    // Input that is not a certificate chain or a bundle at
                    // all is a usage error naming its flag; what a chain
                    // or bundle says is the report's.
                    let pem = read(cert, "cert")?;
                    keys::certs_from_pem(&pem)
                        .with_context(|| format!("--cert {}", cert.display()))?;
                    check::check_cert(&pem, &read_bundle(bundle)?, a.warn_before)
                }
                _ => bail!("use --dir, or --cert with --bundle"),
            };
            print!("{}", report.render());
            return Ok(ExitCode::from(report.exit_code() as u8));
        }
        Command::Bundle(a) => {
            // Opens the CA as `issue` does (a missing or unreadable
            // intermediate key is an error here too), though only the
            // public bundle is printed.
            let out = with_state(&a.store, &a.dir, Access::Read, |dir| {
                let ca = Ca::open(dir)?;
                Ok(match a.format {
                    BundleFormat::Pem => ca.bundle_pem(),
                    BundleFormat::Spiffe => ca.bundle_spiffe_json(),
                })
            })?;
            print!("{out}");
        }
        Command::K8sSecret(a) => {
            let bundle = match &a.bundle {
                Some(b) => read(b, "bundle")?,
                None => {
                    // The store's bundle; no key is needed for it.
                    let no_keys = tempfile::tempdir().context("temporary directory")?;
                    with_state(&a.store, no_keys.path(), Access::Read, |dir| {
                        let path = dir.join(keyproof_ca::ca::files::BUNDLE_PEM);
                        std::fs::read(&path).with_context(|| path.display().to_string())
                    })?
                }
            };
            let yaml = k8s::secret_yaml(
                &a.name,
                a.namespace.as_deref(),
                &read(&a.cert, "cert")?,
                &read(&a.key, "key")?,
                &bundle,
            )?;
            print!("{yaml}");
        }
        Command::Serve(a) => serve(a)?,
        Command::K8sJwks(a) => k8s_jwks(a)?,
        Command::K8sBundle(a) => k8s_bundle(a)?,
        Command::Renew(a) => return renew(a),
        Command::Csr(a) => make_csr(a)?,
        Command::Migrate(a) => migrate(a)?,
        Command::Ledger(LedgerCommand::Export { dir, store }) => ledger_export(dir, store)?,
        Command::Revoke(a) => revoke(a)?,
        Command::Token(TokenCommand::Create {
            dir,
            store,
            spiffe_id,
            ttl,
        }) => {
            SpiffeId::parse(&spiffe_id).context("--spiffe-id")?;
            // The token is printed only once it is recorded (in the store:
            // committed), so a printed token always works.
            let (token, record) = with_state(&store, &dir, Access::Append, |dir| {
                let ca = Ca::open_public(dir)?;
                let id = workload_id(&ca, &spiffe_id)?;
                Ok(keyproof_ca::token::create(&ca, &id, ttl)?)
            })?;
            eprintln!("{}", record.summary());
            println!("{token}");
        }
        Command::Rotate(RotateCommand::Intermediate {
            dir,
            store,
            ttl,
            keys,
            root_key,
        }) => {
            let msg = with_state(&store, &dir, Access::Exclusive, |dir| {
                Ok(rotate::intermediate(dir, ttl, &keys.access(root_key))?)
            })?;
            println!("{msg}");
        }
        Command::Rotate(RotateCommand::Root(step)) => {
            let msg = match step {
                RootStep::Prepare {
                    dir,
                    store,
                    root_ttl,
                    intermediate_ttl,
                    keys,
                    root_key_out,
                } => {
                    check_ca_ttls(root_ttl, intermediate_ttl)?;
                    offline_key_outside(&store, &dir, root_key_out.as_deref())?;
                    let msg = with_state(&store, &dir, Access::Exclusive, |dir| {
                        Ok(rotate::prepare(
                            dir,
                            root_ttl,
                            intermediate_ttl,
                            &keys.access(None),
                            root_key_out.as_deref(),
                        )?)
                    })?;
                    // Standard output carries the new root key.
                    if root_key_out
                        .as_deref()
                        .is_some_and(keyproof_ca::ca::is_stdout)
                    {
                        eprintln!("{msg}");
                        return Ok(ExitCode::SUCCESS);
                    }
                    msg
                }
                RootStep::Activate { dir, store, pin } => {
                    with_state(&store, &dir, Access::Exclusive, |dir| {
                        Ok(rotate::activate(dir, &pin.access())?)
                    })?
                }
                RootStep::Finish { dir, store, force } => {
                    with_state(&store, &dir, Access::Exclusive, |dir| {
                        Ok(rotate::finish(dir, force)?)
                    })?
                }
            };
            println!("{msg}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyproof-ca revoke`.
fn revoke(a: RevokeArgs) -> Result<()> {
    use keyproof_ca::revoke::Target;
    let target = match (&a.serial, &a.spiffe_id) {
        (Some(s), _) => Target::Serial(s.clone()),
        (None, Some(id)) => Target::SpiffeId(SpiffeId::parse(id).context("--spiffe-id")?),
        (None, None) => bail!("--serial or --spiffe-id is required"),
    };
    // Exclusive: `revoked.json` is a document, rewritten whole.
    let added = with_state(&a.store, &a.dir, Access::Exclusive, |dir| {
        Ca::open_public(dir)?;
        Ok(keyproof_ca::revoke::revoke(
            dir,
            &target,
            &a.reason,
            time::OffsetDateTime::now_utc(),
        )?)
    })?;
    if added.is_empty() {
        println!("already revoked; nothing new");
    }
    for r in &added {
        println!(
            "revoked {} serial {} (valid until {})",
            r.spiffe_id, r.serial, r.not_after
        );
    }
    Ok(())
}

/// `keyproof-ca migrate`.
fn migrate(a: MigrateArgs) -> Result<()> {
    let StoreSpec::Postgres(url) = a.store.spec()? else {
        bail!("--store URL is required (or KEYPROOF_CA_STORE): the PostgreSQL database to move the CA into");
    };
    let masked = keyproof_ca::store::mask_password(&url);
    let rt = runtime()?;
    if a.schema_only {
        rt.block_on(PgStore::connect(&url, true))
            .map_err(store_err)?;
        println!(
            "the schema of {masked} is at version {}",
            keyproof_ca::store::schema::VERSION
        );
        return Ok(());
    }
    // clap requires --dir without --schema-only.
    let Some(dir) = a.dir else {
        bail!("--dir is required");
    };
    // A readable CA, or an error naming --dir, before the database is touched.
    Ca::open_public(&dir)?;
    let report = rt
        .block_on(async {
            let db = PgStore::connect(&url, true).await?;
            db.import_dir(&dir).await
        })
        .map_err(store_err)?;
    // The store now holds the CA: fence the directory so that no
    // directory-mode command (an old `serve --dir` included) honours its
    // join tokens again or takes a revocation the store never sees.
    keyproof_ca::migrated::mark(&dir, &masked).with_context(|| {
        format!(
            "the CA was moved into {masked}, but {} could not be marked as migrated; stop \
             every `serve --dir {}` and do not use the directory without --store",
            dir.display(),
            dir.display()
        )
    })?;
    println!(
        "moved {} documents, {} join tokens ({} used) and {} ledger entries from {} into {masked}",
        report.documents,
        report.tokens,
        report.used_tokens,
        report.ledger_entries,
        dir.display()
    );
    if report.key_files.is_empty() {
        println!(
            "no key file in {}: the keys are where ca.json says (a PKCS#11 token); run commands \
             with --store and an empty --dir",
            dir.display()
        );
    } else {
        println!(
            "key files staying in {} (never in the database; every replica needs them in its \
             --dir, e.g. as a Secret): {}",
            dir.display(),
            report.key_files.join(", ")
        );
    }
    println!(
        "from now on use --store with --dir {} (the key directory); the directory's other \
         files are no longer the CA's state, and directory-mode commands refuse it ({} marks it)",
        dir.display(),
        keyproof_ca::migrated::MARKER
    );
    Ok(())
}

/// `keyproof-ca ledger export`.
fn ledger_export(dir: Option<PathBuf>, store: StoreArgs) -> Result<()> {
    match (store.spec()?, dir) {
        (StoreSpec::Postgres(url), _) => {
            let rt = runtime()?;
            rt.block_on(async {
                let db = PgStore::connect(&url, false).await?;
                let mut out = std::io::stdout();
                db.ledger_export(&mut out).await
            })
            .map_err(store_err)?;
        }
        (StoreSpec::Dir, Some(dir)) => {
            Ca::open_public(&dir)?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for e in ledger::read_all(&dir)? {
                writeln!(out, "{}", serde_json::to_string(&e)?)?;
            }
            out.flush()?;
        }
        (StoreSpec::Dir, None) => bail!("use --dir DIR, or --store URL"),
    }
    Ok(())
}

fn main() -> ExitCode {
    // The CA's keys and PINs are in memory: no core file, no same-user
    // ptrace (keyproof_identity::private_memory).
    if let Err(e) = keyproof_identity::private_memory::keep_private() {
        eprintln!("keyproof-ca: warning: could not mark the process not dumpable: {e}");
    }
    match run(Cli::parse()) {
        Ok(_) if keyproof_identity::stdout::failed() => ExitCode::FAILURE,
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, outermost first. Errors
            // that already end with their cause's text (`path: os error`)
            // would otherwise say it twice.
            let mut msg = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if msg.ends_with(&cause) {
                    continue;
                }
                if !msg.is_empty() {
                    msg.push_str(": ");
                }
                msg.push_str(&cause);
            }
            eprintln!("keyproof-ca: error: {msg}");
            ExitCode::from(2)
        }
    }
}
