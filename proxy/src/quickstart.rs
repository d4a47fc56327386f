//! `keyproof-proxy quickstart`: a throwaway trust domain, a demo app and two
//! sidecars in one process, exercised with an allowed and a denied request.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyproof_ca::ca::InitOptions;
use keyproof_ca::csr::SubjectKey;
use keyproof_ca::issue::IssueRequest;
use keyproof_ca::keys::KeyType;
use keyproof_ca::{Ca, SpiffeId, TrustDomain};

use crate::{start, Config};

/// A quickstart failure.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    /// Making the throwaway CA or certificates failed.
    #[error("creating the demo trust domain: {0}")]
    Ca(String),
    /// File I/O in the temp dir failed.
    #[error("writing {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The generated configuration was refused (a bug).
    #[error("demo configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// A sidecar failed to start.
    #[error("starting a sidecar: {0}")]
    Start(#[from] crate::StartError),
    /// The demo app could not bind.
    #[error("demo app: {0}")]
    App(std::io::Error),
    /// A demo request failed outright.
    #[error("demo request: {0}")]
    Request(String),
    /// A demo request got an unexpected status.
    #[error("demo request {what}: expected {expected}, got {got}")]
    Unexpected {
        /// Which request.
        what: &'static str,
        /// Expected status.
        expected: u16,
        /// Actual status.
        got: u16,
    },
}

const TD: &str = "quickstart.keyproof.test";

fn write(path: &Path, data: &[u8]) -> Result<(), QuickstartError> {
    std::fs::write(path, data).map_err(|source| QuickstartError::Io {
        path: path.to_owned(),
        source,
    })
}

fn issue(
    ca: &Ca,
    dir: &Path,
    name: &str,
    path: &str,
    dns: &[&str],
) -> Result<(PathBuf, PathBuf), QuickstartError> {
    let kt = KeyType::EcdsaP256;
    let kp = kt
        .generate()
        .map_err(|e| QuickstartError::Ca(e.to_string()))?;
    let id = SpiffeId::parse(&format!("spiffe://{TD}{path}"))
        .map_err(|e| QuickstartError::Ca(e.to_string()))?;
    let issued = ca
        .issue(
            &IssueRequest {
                spiffe_id: id,
                key: SubjectKey::from_key_pair(&kp, kt),
                ttl: Duration::from_secs(24 * 3600),
                dns: dns.iter().map(|s| s.to_string()).collect(),
            },
            "keyproof-proxy quickstart",
        )
        .map_err(|e| QuickstartError::Ca(e.to_string()))?;
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    write(&crt, issued.chain_pem().as_bytes())?;
    write(&key, kp.serialize_pem().as_bytes())?;
    Ok((crt, key))
}

async fn demo_app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let caller = req
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("URI=")))
        .unwrap_or("unknown")
        .to_owned();
    Ok(Response::new(Full::new(Bytes::from(format!(
        "hello from the demo app: {} {} called by {caller}\n",
        req.method(),
        req.uri().path()
    )))))
}

/// Runs the demo; with `once`, returns after it, otherwise waits for Ctrl-C.
pub async fn run(once: bool) -> Result<(), QuickstartError> {
    let tmp = std::env::temp_dir().join(format!("keyproof-quickstart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|source| QuickstartError::Io {
        path: tmp.clone(),
        source,
    })?;
    let result = demo(&tmp, once).await;
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

async fn demo(tmp: &Path, once: bool) -> Result<(), QuickstartError> {
    let td = TrustDomain::parse(TD).map_err(|e| QuickstartError::Ca(e.to_string()))?;
    let ca = Ca::init(
        &tmp.join("ca"),
        &InitOptions {
            trust_domain: td,
            key_type: KeyType::EcdsaP256,
            root_ttl: Duration::from_secs(7 * 24 * 3600),
            intermediate_ttl: Duration::from_secs(2 * 24 * 3600),
        },
    )
    .map_err(|e| QuickstartError::Ca(e.to_string()))?;
    let bundle = tmp.join("bundle.pem");
    write(&bundle, ca.bundle_pem().as_bytes())?;
    let (web_crt, web_key) = issue(&ca, tmp, "web", "/ns/demo/sa/web", &[])?;
    let (api_crt, api_key) = issue(&ca, tmp, "api", "/ns/demo/sa/api", &["localhost"])?;
    println!("trust domain spiffe://{TD} created in {}", tmp.display());

    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(QuickstartError::App)?;
    let app_addr = app.local_addr().map_err(QuickstartError::App)?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = app.accept().await {
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(demo_app)),
            );
        }
    });

    let api_cfg = format!(
        "[identity]\ntrust_bundle = {bundle:?}\n[identity.files]\ncert = {api_crt:?}\nkey = {api_key:?}\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app_addr}\"\n\
         [[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"spiffe://{TD}/ns/ops/*\"]\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    write(&tmp.join("api-sidecar.toml"), api_cfg.as_bytes())?;
    let api = start(&Config::parse(&api_cfg)?).await?;
    let in_addr = api
        .inbound_addr
        .ok_or_else(|| QuickstartError::Request("inbound not bound".into()))?;
    let web_cfg = format!(
        "[identity]\ntrust_bundle = {bundle:?}\n[identity.files]\ncert = {web_crt:?}\nkey = {web_key:?}\n\
         [outbound]\nlisten = \"127.0.0.1:0\"\n\
         [[outbound.upstreams]]\nhost = \"api.demo\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://{TD}/ns/demo/sa/api\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    write(&tmp.join("web-sidecar.toml"), web_cfg.as_bytes())?;
    let web = start(&Config::parse(&web_cfg)?).await?;
    let out_addr = web
        .outbound_addr
        .ok_or_else(|| QuickstartError::Request("outbound not bound".into()))?;

    println!("demo app     http://{app_addr}");
    println!(
        "api sidecar  inbound https://{in_addr} (mutual TLS), admin http://{}",
        fmt_addr(api.admin_addr)
    );
    println!(
        "web sidecar  outbound http://{out_addr}, admin http://{}",
        fmt_addr(web.admin_addr)
    );
    println!();

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = |path: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::get(format!("http://{out_addr}{path}"))
                .header(http::header::HOST, "api.demo")
                .body(Full::new(Bytes::new()))
                .map_err(|e| QuickstartError::Request(e.to_string()))?;
            let resp = client
                .request(req)
                .await
                .map_err(|e| QuickstartError::Request(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            Ok::<_, QuickstartError>((status, body))
        }
    };
    let (s, b) = send("/hello").await?;
    println!(
        "1. web -> api GET /hello (allowed):        {s} {}",
        b.trim()
    );
    if s != StatusCode::OK {
        return Err(QuickstartError::Unexpected {
            what: "GET /hello",
            expected: 200,
            got: s.as_u16(),
        });
    }
    let (s, b) = send("/admin/reset").await?;
    println!(
        "2. web -> api GET /admin/reset (denied):   {s} {}",
        b.trim()
    );
    if s != StatusCode::FORBIDDEN {
        return Err(QuickstartError::Unexpected {
            what: "GET /admin/reset",
            expected: 403,
            got: s.as_u16(),
        });
    }
    println!(
        "3. privileged step-up request:             not shown yet (step-up verifier not built in)"
    );
    println!();
    println!("metrics:  curl http://{}/metrics", fmt_addr(api.admin_addr));
    println!(
        "identity: curl http://{}/identity",
        fmt_addr(api.admin_addr)
    );
    println!("try by hand:");
    println!("  curl -x http://{out_addr} http://api.demo/hello");
    println!(
        "  curl --cert {} --key {} --cacert {} --resolve localhost:{}:127.0.0.1 https://localhost:{}/hello",
        web_crt.display(),
        web_key.display(),
        bundle.display(),
        in_addr.port(),
        in_addr.port()
    );
    if !once {
        println!("\nrunning until Ctrl-C");
        crate::shutdown_signal().await;
    }
    web.shutdown().await;
    api.shutdown().await;
    Ok(())
}

fn fmt_addr(a: Option<std::net::SocketAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
}
