//! `keyproof-proxy quickstart`: a throwaway trust domain, a demo app and two
//! sidecars in one process, exercised with an allowed request, a denied one,
//! a step-up route answered by the outbound's signer, a step-up triggered by
//! a risk rule, one the app asks for, and a replayed signed request that the
//! inbound refuses.

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
use keyproof_ca::Ca;
use keyproof_identity::keys::KeyType;
use keyproof_identity::{SpiffeId, TrustDomain};

use crate::config::Config;
use crate::run::{fmt_addr, shutdown_signal, start, Running, StartError};

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
    Start(#[from] StartError),
    /// The demo app could not bind.
    #[error("demo app: {0}")]
    App(std::io::Error),
    /// A demo request failed outright.
    #[error("demo request: {0}")]
    Request(String),
    /// A demo request was answered, but not as the demo expects.
    #[error("demo request {what}: expected {expected}, got {got:?}")]
    Misanswered {
        /// Which request.
        what: &'static str,
        /// What the answer should have said.
        expected: &'static str,
        /// The answer.
        got: String,
    },
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
    // A throwaway key is still a key: 0600, as every key keyproof writes.
    keyproof_ca::fsutil::write_atomic(
        &key,
        kp.serialize_pem().as_bytes(),
        keyproof_ca::fsutil::SECRET,
    )
    .map_err(|source| QuickstartError::Io {
        path: key.clone(),
        source,
    })?;
    Ok((crt, key))
}

/// Why the inbound verified a request: `always`, `app` or a risk rule.
const STEP_UP_REASON: &str = "x-keyproof-step-up-reason";

async fn demo_app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let caller = req
        .headers()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("URI=")))
        .unwrap_or("unknown")
        .to_owned();
    // The inbound sidecar sets these fields only after a step-up proof
    // verified (copies sent by a caller are removed first).
    let verified = req
        .headers()
        .contains_key(&crate::http::owned::STEP_UP_VERIFIED);
    let step_up = match req
        .headers()
        .get(STEP_UP_REASON)
        .and_then(|v| v.to_str().ok())
    {
        Some(reason) if verified => format!(", step-up verified (reason {reason})"),
        _ if verified => ", step-up verified".to_owned(),
        _ => String::new(),
    };
    // Approving a payment is a business event the app wants proven: it asks
    // its sidecar, which challenges the caller and sends the request again,
    // verified. The answer to the unverified request is discarded.
    if req.uri().path().ends_with("/approve") && !verified {
        let mut asked = Response::new(Full::new(Bytes::from_static(b"proof needed\n")));
        asked.headers_mut().insert(
            crate::http::owned::STEP_UP_VERIFIED.clone(),
            http::HeaderValue::from_static("required"),
        );
        return Ok(asked);
    }
    Ok(Response::new(Full::new(Bytes::from(format!(
        "hello from the demo app: {} {} called by {caller}{step_up}\n",
        req.method(),
        req.uri().path()
    )))))
}

/// Runs the demo; with `once`, returns after it, otherwise waits for Ctrl-C.
pub async fn run(once: bool) -> Result<(), QuickstartError> {
    crate::run::keep_memory_private();
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
         [[inbound.risk_rules]]\nname = \"big-transfer\"\nheader = \"x-amount\"\nabove = 10000\n\
         [[inbound.routes]]\npath_prefix = \"/admin/rotate\"\nmethods = [\"POST\"]\nallow = [\"spiffe://{TD}/ns/demo/sa/web\"]\nstep_up = true\n\
         [[inbound.routes]]\npath_prefix = \"/payments\"\nmethods = [\"POST\"]\nallow = [\"spiffe://{TD}/ns/demo/sa/web\"]\nstep_up = \"risk\"\nrisk = [\"big-transfer\"]\n\
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
    let send_with = |method: http::Method, path: &'static str, amount: Option<&'static str>| {
        let client = client.clone();
        async move {
            let body = if method == http::Method::POST {
                Bytes::from_static(DEMO_BODY)
            } else {
                Bytes::new()
            };
            let mut req = Request::builder()
                .method(method)
                .uri(format!("http://{out_addr}{path}"))
                .header(http::header::HOST, "api.demo")
                .header(http::header::CONTENT_TYPE, "application/json");
            if let Some(a) = amount {
                req = req.header("x-amount", a);
            }
            let req = req
                .body(Full::new(body))
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
    let send = |method: http::Method, path: &'static str| send_with(method, path, None);
    let (s, b) = send(http::Method::GET, "/hello").await?;
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
    let (s, b) = send(http::Method::GET, "/admin/reset").await?;
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
    let (s, b) = send(http::Method::POST, "/admin/rotate").await?;
    println!(
        "3. web -> api POST /admin/rotate (step-up): {s} {}",
        b.trim()
    );
    if s != StatusCode::OK {
        return Err(QuickstartError::Unexpected {
            what: "POST /admin/rotate",
            expected: 200,
            got: s.as_u16(),
        });
    }
    let (s, b) = send_with(http::Method::POST, "/payments/transfer", Some("50")).await?;
    println!(
        "4. web -> api POST /payments/transfer, x-amount 50 (no risk rule fires):\n   {s} {}",
        b.trim()
    );
    expect_step_up("POST /payments/transfer (x-amount 50)", s, &b, None)?;
    let (s, b) = send_with(http::Method::POST, "/payments/transfer", Some("25000")).await?;
    println!(
        "5. web -> api POST /payments/transfer, x-amount 25000 (risk rule big-transfer fires):\n   {s} {}",
        b.trim()
    );
    expect_step_up(
        "POST /payments/transfer (x-amount 25000)",
        s,
        &b,
        Some("step-up verified (reason big-transfer)"),
    )?;
    let (s, b) = send(http::Method::POST, "/payments/approve").await?;
    println!(
        "6. web -> api POST /payments/approve (the app asks for proof of the approval):\n   {s} {}",
        b.trim()
    );
    expect_step_up(
        "POST /payments/approve",
        s,
        &b,
        Some("step-up verified (reason app)"),
    )?;
    let (first, signed, replayed, why) = captured_replay(&web, in_addr).await?;
    println!(
        "7. a caller's own signed request, captured and replayed on its connection:\n   \
         unsigned {first}, signed {signed}, replayed {replayed} ({why})"
    );
    if replayed != StatusCode::UNAUTHORIZED || !why.contains("replay") {
        return Err(QuickstartError::Unexpected {
            what: "replayed POST /admin/rotate",
            expected: 401,
            got: replayed.as_u16(),
        });
    }
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
        shutdown_signal().await;
    }
    web.shutdown().await;
    api.shutdown().await;
    Ok(())
}

const DEMO_BODY: &[u8] = b"{\"rotate\":true}";

/// Checks that a demo request got 200 and reached the app verified with
/// `verified` in its answer (e.g. `step-up verified (reason app)`), or
/// unverified when `verified` is `None`.
fn expect_step_up(
    what: &'static str,
    status: StatusCode,
    body: &str,
    verified: Option<&'static str>,
) -> Result<(), QuickstartError> {
    if status != StatusCode::OK {
        return Err(QuickstartError::Unexpected {
            what,
            expected: 200,
            got: status.as_u16(),
        });
    }
    let (ok, expected) = match verified {
        Some(phrase) => (body.contains(phrase), phrase),
        None => (!body.contains("step-up"), "no step-up"),
    };
    if ok {
        Ok(())
    } else {
        Err(QuickstartError::Misanswered {
            what,
            expected,
            got: body.trim().to_owned(),
        })
    }
}

fn request_error(e: impl std::fmt::Display) -> QuickstartError {
    QuickstartError::Request(e.to_string())
}

/// Plays an attacker who captured a signed request: as web, straight over
/// mutual TLS, take the challenge, sign, send (200), then send the very same
/// bytes again on the same connection (401 `replay`). Returns the three
/// statuses and the replay's `WWW-Authenticate`.
async fn captured_replay(
    web: &Running,
    in_addr: std::net::SocketAddr,
) -> Result<(StatusCode, StatusCode, StatusCode, String), QuickstartError> {
    let api = keyproof_identity::IdPattern::parse(&format!("spiffe://{TD}/ns/demo/sa/api"))
        .map_err(request_error)?;
    let tls = crate::identity::store::client_config(&web.identity, api, &[b"http/1.1"])
        .map_err(request_error)?;
    let tcp = tokio::net::TcpStream::connect(in_addr)
        .await
        .map_err(request_error)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(request_error)?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(request_error)?;
    let exporter = keyproof_identity::tls::channel_binding(tls.get_ref().1)
        .ok_or_else(|| request_error("the connection gives no TLS exporter"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(request_error)?;
    tokio::spawn(conn);
    let signer =
        crate::outbound::signer::signer_for(&web.identity.current()).map_err(request_error)?;
    let build = |headers: &http::HeaderMap| {
        let mut b = Request::post("/admin/rotate")
            .header(http::header::HOST, "api.demo")
            .header(http::header::CONTENT_TYPE, "application/json");
        for (k, v) in headers {
            b = b.header(k, v);
        }
        b.body(Full::new(Bytes::from_static(DEMO_BODY)))
            .map_err(request_error)
    };
    let mut send = |req: Request<Full<Bytes>>| {
        let fut = sender.send_request(req);
        async move {
            let resp = fut.await.map_err(request_error)?;
            let (parts, body) = resp.into_parts();
            let _ = body.collect().await;
            Ok::<_, QuickstartError>(parts)
        }
    };
    let challenge = send(build(&http::HeaderMap::new())?).await?;
    let ch = keyproof_stepup::Challenge::from_headers(&challenge.headers)
        .map_err(request_error)?
        .ok_or_else(|| QuickstartError::Request("no step-up challenge".into()))?;
    let (unsigned, _) = build(&http::HeaderMap::new())?.into_parts();
    let view = keyproof_stepup::RequestView::from_parts(&unsigned);
    let signed = signer
        .sign(
            &ch,
            &view,
            DEMO_BODY,
            &exporter,
            keyproof_stepup::unix_now(),
        )
        .map_err(request_error)?;
    let mut headers = http::HeaderMap::new();
    signed.apply(&mut headers);
    let accepted = send(build(&headers)?).await?;
    let replayed = send(build(&headers)?).await?;
    let why = replayed
        .headers
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok((challenge.status, accepted.status, replayed.status, why))
}
