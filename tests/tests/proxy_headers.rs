//! Header and trailer fields the sidecar owns, and the request shapes it
//! refuses, on both listeners, over HTTP/1.1 (raw bytes on the wire, so
//! that no client library normalises anything) and HTTP/2 (a hyper client
//! whose bodies end in trailers). The app records every field it sees, so
//! each assertion is about what actually reached it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use keyproof_tests::free_port;
use keyproof_tests::proxy_support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const TD: &str = "headers.test";
const MAX: usize = 65536;
const OUT_MAX: usize = 16384;

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every request the app saw: method, path, header fields, then
/// `trailer <name>: <value>` lines.
type Seen = Arc<Mutex<Vec<String>>>;

/// An app (HTTP/1.1 and h2c) that records each request whole and echoes
/// the record as its body. `/challenge` answers like an app that tries to
/// speak the sidecar's StepUp scheme; `/resp-trailers` ends its body with
/// trailers a caller must not get.
struct RecApp {
    addr: SocketAddr,
    seen: Seen,
    _rt: tokio::runtime::Runtime,
}

async fn record(req: Request<Incoming>, seen: Seen) -> Result<Response<AppBody>, hyper::Error> {
    let mut out = format!("{} {}\n", req.method(), req.uri().path());
    for (k, v) in req.headers() {
        out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let path = req.uri().path().to_owned();
    let collected = req.into_body().collect().await?;
    if let Some(t) = collected.trailers() {
        for (k, v) in t {
            out.push_str(&format!(
                "trailer {k}: {}\n",
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
    }
    out.push_str(&format!("body-bytes: {}\n", collected.to_bytes().len()));
    seen.lock().unwrap().push(out.clone());
    let mut resp = Response::new(AppBody::new(Bytes::from(out), None));
    if path.starts_with("/challenge") {
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        let h = resp.headers_mut();
        h.append(
            "www-authenticate",
            HeaderValue::from_static("Basic realm=\"app\""),
        );
        h.append(
            "www-authenticate",
            HeaderValue::from_static("StepUp error=\"stepup_required\""),
        );
        h.append(
            "accept-signature",
            HeaderValue::from_static("stepup=(\"@method\" \"@authority\" \"@path\" \"@query\" \"content-digest\" \"stepup-binding\");created;nonce=\"app-chosen-nonce\";alg=\"ecdsa-p256-sha256\";keyid=\"x\";tag=\"stepup-v1\""),
        );
        h.append(
            "x-keyproof-step-up-error",
            HeaderValue::from_static("forged"),
        );
        h.append(
            "x_forwarded_client_cert",
            HeaderValue::from_static("forged"),
        );
    }
    if path.starts_with("/resp-trailers") {
        let mut t = HeaderMap::new();
        t.insert("x-checksum", HeaderValue::from_static("abc"));
        t.insert(
            "x-forwarded-client-cert",
            HeaderValue::from_static("forged"),
        );
        t.insert("x-keyproof-step-up", HeaderValue::from_static("verified"));
        t.insert("content-length", HeaderValue::from_static("99"));
        t.insert("www-authenticate", HeaderValue::from_static("StepUp"));
        resp = Response::new(AppBody::new(Bytes::from_static(b"ok"), Some(t)));
    }
    Ok(resp)
}

impl RecApp {
    fn start() -> RecApp {
        let rt = rt();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let s = seen.clone();
        rt.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |r| record(r, s.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
                });
            }
        });
        RecApp {
            addr,
            seen,
            _rt: rt,
        }
    }

    fn all(&self) -> String {
        self.seen.lock().unwrap().join("\n")
    }
}

/// A body of one data frame and, optionally, a trailer section.
struct AppBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl AppBody {
    fn new(data: Bytes, trailers: Option<HeaderMap>) -> AppBody {
        AppBody {
            data: Some(data),
            trailers,
        }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

struct Mesh {
    pki: Pki,
    web: Cert,
    app: RecApp,
    inbound: ProxyProc,
    outbound: ProxyProc,
    in_addr: SocketAddr,
    out_addr: SocketAddr,
}

fn inbound_toml(
    pki: &Pki,
    server: &Cert,
    listen: SocketAddr,
    app: SocketAddr,
    extra: &str,
    admin: SocketAddr,
) -> String {
    let web = pki.id("/ns/default/sa/web");
    format!(
        "{}[inbound]\nlisten = \"{listen}\"\napp = \"{app}\"\n{extra}\n\
         [[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"{web}\"]\nstep_up = true\n\
         [admin]\nlisten = \"{admin}\"\n",
        identity_toml(&pki.bundle, server),
    )
}

fn mesh(extra_inbound: &str) -> Mesh {
    let pki = Pki::new(TD);
    let app = RecApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let (in_addr, in_admin, out_addr, out_admin) = (addr(), addr(), addr(), addr());
    let inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &inbound_toml(&pki, &server, in_addr, app.addr, extra_inbound, in_admin),
        in_admin,
    );
    let outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\nmax_header_bytes = {OUT_MAX}\n\
             [[outbound.upstreams]]\nhost = \"api.default.svc\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://{TD}/ns/default/sa/api\"\n\
             [admin]\nlisten = \"{out_admin}\"\n",
            identity_toml(&pki.bundle, &web)
        ),
        out_admin,
    );
    Mesh {
        pki,
        web,
        app,
        inbound,
        outbound,
        in_addr,
        out_addr,
    }
}

/// A mutual-TLS connection to an inbound offering `alpn`.
async fn tls(
    inbound: SocketAddr,
    pki: &Pki,
    cert: &Cert,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.crt)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for r in CertificateDer::pem_file_iter(&pki.bundle).unwrap() {
        roots.add(r.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// A response read off the wire: status, fields (lowercase names), body.
#[derive(Debug)]
struct Raw {
    status: u16,
    fields: Vec<(String, String)>,
    body: String,
}

impl Raw {
    fn get_all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|f| f.0 == name)
            .map(|f| f.1.as_str())
            .collect()
    }
}

/// Writes `req` and reads one response (status 0: none within 10 s). A
/// write that fails is read after all: a server that refuses a head it
/// has read enough of (431, say) answers and closes while the rest is
/// still being sent, and its answer is already here.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &[u8]) -> Raw {
    let none = || Raw {
        status: 0,
        fields: vec![],
        body: String::new(),
    };
    if s.write_all(req).await.is_ok() {
        let _ = s.flush().await;
    }
    tokio::time::timeout(Duration::from_secs(10), read_response(s))
        .await
        .unwrap_or_else(|_| none())
}

async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> Raw {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                return Raw {
                    status: 0,
                    fields: vec![],
                    body: String::from_utf8_lossy(&buf).into_owned(),
                }
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let fields: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut rest = buf[head_end..].to_vec();
    let get = |k: &str| fields.iter().find(|f| f.0 == k).map(|f| f.1.clone());
    let body = if let Some(n) = get("content-length").and_then(|n| n.parse::<usize>().ok()) {
        while rest.len() < n {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(k) => rest.extend_from_slice(&chunk[..k]),
            }
        }
        rest.truncate(n);
        rest
    } else if get("transfer-encoding").is_some() {
        let mut out = Vec::new();
        loop {
            // One chunk-size line, its data and CRLF.
            let Some(i) = rest.windows(2).position(|w| w == b"\r\n") else {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => rest.extend_from_slice(&chunk[..k]),
                }
                continue;
            };
            let n =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            while rest.len() < i + 2 + n + 2 {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => rest.extend_from_slice(&chunk[..k]),
                }
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + n]);
            rest.drain(..i + 2 + n + 2);
        }
        out
    } else if status == 204 || status == 304 {
        Vec::new()
    } else {
        let _ = s.read_to_end(&mut rest).await;
        rest
    };
    Raw {
        status,
        fields,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// One request on a fresh HTTP/1.1 mutual-TLS connection to the inbound.
async fn inbound_h1(m: &Mesh, req: &str) -> Raw {
    let mut s = tls(m.in_addr, &m.pki, &m.web, &[b"http/1.1"]).await;
    exchange(&mut s, req.as_bytes()).await
}

/// One request on a fresh plaintext connection to the outbound.
async fn outbound_h1(m: &Mesh, req: &str) -> Raw {
    let mut s = tokio::net::TcpStream::connect(m.out_addr).await.unwrap();
    exchange(&mut s, req.as_bytes()).await
}

/// An HTTP/2 request to the inbound over mutual TLS: (status, fields,
/// body, trailers).
async fn inbound_h2(
    m: &Mesh,
    req: Request<AppBody>,
) -> Result<(StatusCode, HeaderMap, String, Option<HeaderMap>), hyper::Error> {
    h2_at(m.in_addr, &m.pki, &m.web, req).await
}

async fn h2_at(
    at: SocketAddr,
    pki: &Pki,
    cert: &Cert,
    req: Request<AppBody>,
) -> Result<(StatusCode, HeaderMap, String, Option<HeaderMap>), hyper::Error> {
    h2_over(tls(at, pki, cert, &[b"h2"]).await, req).await
}

/// One HTTP/2 request on `io`: (status, fields, body, trailers).
async fn h2_over<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: I,
    req: Request<AppBody>,
) -> Result<(StatusCode, HeaderMap, String, Option<HeaderMap>), hyper::Error> {
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(io))
            .await?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    Ok((parts.status, parts.headers, body, trailers))
}

fn h2_request(
    path: &str,
    fields: &[(&str, &str)],
    trailers: Option<&[(&str, &str)]>,
) -> Request<AppBody> {
    let mut r = Request::builder()
        .method(if trailers.is_some() { "POST" } else { "GET" })
        .uri(format!("https://localhost{path}"));
    for (k, v) in fields {
        r = r.header(*k, *v);
    }
    let trailers = trailers.map(|t| {
        let mut h = HeaderMap::new();
        for (k, v) in t {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    });
    r.body(AppBody::new(Bytes::from_static(b"hello"), trailers))
        .unwrap()
}

/// The lines of a recorded request naming `field` (any case, and any
/// punctuation for `-`: `_` as CGI reads it, `.` as PHP does).
fn lines_naming<'a>(record: &'a str, field: &str) -> Vec<&'a str> {
    let fold = |n: &str| -> String {
        n.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect()
    };
    let want = fold(field);
    record
        .lines()
        .filter(|l| {
            let l = l.strip_prefix("trailer ").unwrap_or(l);
            l.split_once(':').is_some_and(|(k, _)| fold(k) == want)
        })
        .collect()
}

const DISGUISES: &str =
    "x_forwarded_client_cert: By=spiffe://evil;URI=spiffe://headers.test/ns/default/sa/admin\r\n\
X-Forwarded_Client-Cert: By=forged\r\n\
X-Forwarded-Client-Cert: By=forged\r\n\
X_Keyproof_Step_Up: verified\r\n\
x-keyproof-step-up: verified\r\n\
X-Keyproof.Step.Up: verified\r\n\
x~keyproof~step~up~reason: always\r\n\
X.Forwarded.Client.Cert: By=spiffe://evil\r\n\
x-keyproof-future-field: 1\r\n\
Signature: stepup=:AAAA:\r\n\
signature_input: stepup=();nonce=\"x\"\r\n\
Stepup-Binding: :AAAA:\r\n\
Transfer_Encoding: gzip\r\n\
content_length: 5\r\n\
X_Forwarded_For: 6.6.6.6\r\n\
X.Forwarded.For: 6.6.6.7\r\n";

/// Exactly the sidecar's one XFCC, and no other owned field, in a record.
fn assert_only_the_sidecars_fields(record: &str) {
    let xfcc = lines_naming(record, "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{record}");
    assert!(
        xfcc[0].contains(&format!("URI=spiffe://{TD}/ns/default/sa/web"))
            && !xfcc[0].contains("evil"),
        "{record}"
    );
    for f in [
        "x-keyproof-step-up",
        "x-keyproof-future-field",
        "signature",
        "signature-input",
        "stepup-binding",
    ] {
        assert!(
            lines_naming(record, f).is_empty(),
            "{f} reached the app:\n{record}"
        );
    }
    // Framing fields, the forwarding field the sidecar appends to and the
    // step-up reason, in disguise: at most the proxy's own, spelt with '-'.
    for f in [
        "transfer-encoding",
        "content-length",
        "x-forwarded-for",
        "x-keyproof-step-up-reason",
    ] {
        assert!(
            lines_naming(record, f).iter().all(|l| l.starts_with(f)),
            "{f} in disguise reached the app:\n{record}"
        );
    }
}

#[test]
fn owned_fields_in_any_disguise_never_reach_the_app() {
    let m = mesh("");
    rt().block_on(async {
        // HTTP/1.1 to the inbound, and without ALPN (protocol sniffed).
        let req =
            format!("GET /plain HTTP/1.1\r\nHost: localhost\r\n{DISGUISES}my_field: kept\r\n\r\n");
        let r = inbound_h1(&m, &req).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_only_the_sidecars_fields(&r.body);
        assert_eq!(
            lines_naming(&r.body, "my_field").len(),
            1,
            "allow is the default: {}",
            r.body
        );
        let mut s = tls(m.in_addr, &m.pki, &m.web, &[]).await;
        let r = exchange(&mut s, req.as_bytes()).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_only_the_sidecars_fields(&r.body);
        // HTTP/2 to the inbound.
        let fields: Vec<(&str, &str)> = DISGUISES
            .split("\r\n")
            .filter_map(|l| l.split_once(": "))
            .collect();
        let (status, _, body, _) = inbound_h2(&m, h2_request("/plain", &fields, None))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_only_the_sidecars_fields(&body);
        // Through the outbound and the mesh.
        let req = format!("GET /plain HTTP/1.1\r\nHost: api.default.svc\r\n{DISGUISES}\r\n");
        let r = outbound_h1(&m, &req).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_only_the_sidecars_fields(&r.body);
        // A method override is refused in every spelling an app reads as
        // one (PHP: `.` as `_`, so Symfony's `X-HTTP-Method-Override`).
        for name in ["X-HTTP-Method-Override", "X_HTTP_Method_Override", "X.HTTP.Method.Override"] {
            let req = format!("POST /plain HTTP/1.1\r\nHost: localhost\r\n{name}: DELETE\r\ncontent-length: 0\r\n\r\n");
            let r = inbound_h1(&m, &req).await;
            assert_eq!(r.status, 400, "{name}: {r:?}");
            assert!(r.body.contains("not accepted"), "{name}: {r:?}");
        }
    });
}

/// Round 11: what an app behind a proxy it trusts reads as the caller's
/// address or its own path, from the caller. Single-address fields are
/// replaced by the caller's address (`X-Real-IP`, which nginx's realip
/// reads by default) or removed; `SCRIPT_NAME` (gunicorn cuts it off the
/// path Flask routes by) and a `_method` query in PHP's spellings are
/// refused, as are an encoded `?` and a double encoding in the path.
#[test]
fn client_address_fields_and_path_overrides_are_the_sidecars_to_say() {
    let m = mesh("");
    rt().block_on(async {
        // Round 12: also what mTLS terminators and authenticating proxies
        // say of the caller's certificate, user and scheme.
        let forged = "X-Real-IP: 10.9.9.9\r\nx_real_ip: 10.9.9.8\r\nTrue-Client-IP: 10.9.9.7\r\nCF-Connecting-IP: 10.9.9.6\r\nX-Client-IP: 10.9.9.5\r\n\
            ssl-client-verify: SUCCESS\r\nssl-client-subject-dn: CN=ops\r\nX-SSL-Client-S-DN: CN=ops\r\n\
            X-Forwarded-User: ops\r\nX_Auth_Request_User: ops\r\nClient-Cert: :AAAA:\r\n\
            X-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\nFront-End-Https: on\r\n";
        let stated = [
            "true-client-ip",
            "cf-connecting-ip",
            "x-client-ip",
            "ssl-client-verify",
            "ssl-client-subject-dn",
            "x-ssl-client-s-dn",
            "x-forwarded-user",
            "x_auth_request_user",
            "client-cert",
            "x-forwarded-proto",
            "x-forwarded-port",
            "front-end-https",
        ];
        let req = format!("GET /plain HTTP/1.1\r\nHost: localhost\r\n{forged}\r\n");
        let r = inbound_h1(&m, &req).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(lines_naming(&r.body, "x-real-ip"), ["x-real-ip: 127.0.0.1"], "{}", r.body);
        for f in stated {
            assert!(lines_naming(&r.body, f).is_empty(), "{f}: {}", r.body);
        }
        // Through the mesh too (HTTP/2 from the caller's sidecar).
        let req = format!("GET /plain HTTP/1.1\r\nHost: api.default.svc\r\n{forged}\r\n");
        let r = outbound_h1(&m, &req).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(lines_naming(&r.body, "x-real-ip"), ["x-real-ip: 127.0.0.1"], "{}", r.body);
        for f in stated {
            assert!(lines_naming(&r.body, f).is_empty(), "{f}: {}", r.body);
        }
        for (what, req) in [
            ("SCRIPT_NAME", "GET /x/admin HTTP/1.1\r\nHost: localhost\r\nSCRIPT_NAME: /x\r\n\r\n"),
            ("Script-Name", "GET /x/admin HTTP/1.1\r\nHost: localhost\r\nScript-Name: /x\r\n\r\n"),
            ("PATH_INFO", "GET /x HTTP/1.1\r\nHost: localhost\r\nPATH_INFO: /admin\r\n\r\n"),
            ("X-Script-Name", "GET /x/admin HTTP/1.1\r\nHost: localhost\r\nX-Script-Name: /x\r\n\r\n"),
            ("+_method", "POST /plain?+_method=DELETE HTTP/1.1\r\nHost: localhost\r\ncontent-length: 0\r\n\r\n"),
            ("_method%00", "POST /plain?_method%00x=DELETE HTTP/1.1\r\nHost: localhost\r\ncontent-length: 0\r\n\r\n"),
            ("%3F", "GET /admin%3F/x HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            ("%2561", "GET /%2561dmin HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        ] {
            let r = inbound_h1(&m, req).await;
            assert_eq!(r.status, 400, "{what}: {r:?}");
        }
    });
    assert!(
        !m.app.all().contains("/x/admin") && !m.app.all().contains("DELETE"),
        "{}",
        m.app.all()
    );
}

#[test]
fn headers_with_underscores_drop_and_reject() {
    for (mode, dropped, rejected) in [("drop", 2.0, 0.0), ("reject", 0.0, 1.0)] {
        let m = mesh(&format!("headers_with_underscores = \"{mode}\""));
        rt().block_on(async {
            let req = "GET /plain HTTP/1.1\r\nHost: localhost\r\nmy_field: 1\r\nOther_Field: 2\r\nx_forwarded_client_cert: forged\r\nplain-field: 3\r\n\r\n";
            let r = inbound_h1(&m, req).await;
            if mode == "drop" {
                assert_eq!(r.status, 200, "{r:?}");
                assert!(lines_naming(&r.body, "my_field").is_empty(), "{}", r.body);
                assert!(lines_naming(&r.body, "other_field").is_empty(), "{}", r.body);
                assert_eq!(lines_naming(&r.body, "plain-field").len(), 1, "{}", r.body);
                assert_only_the_sidecars_fields(&r.body);
            } else {
                assert_eq!(r.status, 400, "{r:?}");
                assert!(r.body.contains("'_'"), "{}", r.body);
                // An owned name in disguise alone is removed, not refused.
                let r = inbound_h1(&m, "GET /plain HTTP/1.1\r\nHost: localhost\r\nx_forwarded_client_cert: forged\r\n\r\n").await;
                assert_eq!(r.status, 200, "{r:?}");
                assert_only_the_sidecars_fields(&r.body);
            }
            // Trailer sections follow the same rule.
            let req = "POST /plain HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nmy_trailer: 1\r\nx_forwarded_client_cert: forged\r\nok-trailer: 2\r\n\r\n";
            let r = inbound_h1(&m, req).await;
            if mode == "drop" {
                assert_eq!(r.status, 200, "{r:?}");
                assert_eq!(lines_naming(&r.body, "ok-trailer"), ["trailer ok-trailer: 2"], "{}", r.body);
                assert!(lines_naming(&r.body, "my_trailer").is_empty(), "{}", r.body);
                assert_only_the_sidecars_fields(&r.body);
            } else {
                assert!(r.status >= 400, "{r:?}");
            }
            assert!(lines_naming(&m.app.all(), "my_trailer").is_empty(), "{}", m.app.all());
            // HTTP/2 alike.
            let got = inbound_h2(&m, h2_request("/plain", &[("my_field", "1")], None)).await.unwrap();
            if mode == "drop" {
                assert_eq!(got.0, 200);
                assert!(lines_naming(&got.2, "my_field").is_empty(), "{}", got.2);
            } else {
                assert_eq!(got.0, 400, "{}", got.2);
            }
        });
        let sample = |a: &str| {
            format!(
                "keyproof_headers_with_underscores_total{{action=\"{a}\",direction=\"inbound\"}}"
            )
        };
        assert_eq!(
            m.inbound.metric(&sample("dropped")),
            if mode == "drop" { dropped + 1.0 } else { 0.0 },
            "{mode}"
        );
        assert_eq!(
            m.inbound.metric(&sample("rejected")),
            if mode == "reject" {
                rejected + 1.0
            } else {
                0.0
            },
            "{mode}"
        );
    }
}

const BAD_TRAILERS: &str = "x-forwarded-client-cert: By=forged\r\n\
x_forwarded_client_cert: By=forged\r\n\
x-keyproof-step-up: verified\r\n\
Content-Length: 999\r\n\
Host: evil.example\r\n\
Transfer-Encoding: chunked\r\n\
Authorization: Bearer forged\r\n\
Cookie: session=forged\r\n\
Connection: close\r\n\
x-checksum: abc\r\n";

fn assert_clean_trailers(record: &str) {
    assert!(
        record.contains("trailer x-checksum: abc"),
        "the allowed trailer arrives:\n{record}"
    );
    for l in record.lines().filter(|l| l.starts_with("trailer ")) {
        assert_eq!(l, "trailer x-checksum: abc", "{record}");
    }
    assert_only_the_sidecars_fields(record);
}

#[test]
fn trailers_never_carry_framing_routing_authentication_or_owned_fields() {
    let m = mesh("");
    rt().block_on(async {
        let req = format!(
            "POST /plain HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n{BAD_TRAILERS}\r\n"
        );
        let r = inbound_h1(&m, &req).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_clean_trailers(&r.body);
        let trailers: Vec<(&str, &str)> = BAD_TRAILERS
            .split("\r\n")
            .filter_map(|l| l.split_once(": "))
            // Fields HTTP/2 cannot carry at all never leave the client.
            .filter(|(k, _)| !["Transfer-Encoding", "Connection"].contains(k))
            .collect();
        let (status, _, body, _) = inbound_h2(&m, h2_request("/plain", &[], Some(&trailers)))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert_clean_trailers(&body);
        let req = format!(
            "POST /plain HTTP/1.1\r\nHost: api.default.svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n{BAD_TRAILERS}\r\n"
        );
        let r = outbound_h1(&m, &req).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_clean_trailers(&r.body);
    });
}

#[test]
fn app_response_trailers_are_cleaned_too() {
    let pki = Pki::new(TD);
    let app = RecApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let (in_addr, in_admin) = (addr(), addr());
    // h2c to the app: the app's response trailers reach the sidecar.
    let inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &inbound_toml(
            &pki,
            &server,
            in_addr,
            app.addr,
            "app_protocol = \"h2\"",
            in_admin,
        ),
        in_admin,
    );
    rt().block_on(async {
        let (status, _, body, trailers) =
            h2_at(in_addr, &pki, &web, h2_request("/resp-trailers", &[], None))
                .await
                .unwrap();
        assert_eq!(status, 200, "{body}\n{}", inbound.log_text());
        let t = trailers.expect("trailers");
        let names: Vec<&str> = t.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-checksum"], "{t:?}");
    });
}

#[test]
fn connection_may_not_name_fields_the_proxy_relies_on() {
    let m = mesh("");
    rt().block_on(async {
        for named in [
            "Host",
            "Content-Length",
            "transfer-encoding",
            "X-Forwarded-Client-Cert",
            "x_forwarded_client_cert",
            "x-keyproof-step-up",
            "Signature-Input",
        ] {
            let r = inbound_h1(&m, &format!("GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, {named}\r\n\r\n")).await;
            assert_eq!(r.status, 400, "inbound, Connection naming {named}: {r:?}");
            let r = outbound_h1(&m, &format!("GET /plain HTTP/1.1\r\nHost: api.default.svc\r\nConnection: keep-alive, {named}\r\n\r\n")).await;
            assert_eq!(r.status, 400, "outbound, Connection naming {named}: {r:?}");
        }
        // Other fields named there are hop-by-hop, removed, as before.
        let r = inbound_h1(&m, "GET /plain HTTP/1.1\r\nHost: localhost\r\nConnection: x-private\r\nx-private: 1\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(lines_naming(&r.body, "x-private").is_empty(), "{}", r.body);
        let r = outbound_h1(&m, "GET /plain HTTP/1.1\r\nHost: api.default.svc\r\nConnection: x-private\r\nx-private: 1\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(lines_naming(&r.body, "x-private").is_empty(), "{}", r.body);
    });
}

#[test]
fn host_transfer_coding_and_line_ending_shapes_are_refused_on_both_listeners() {
    let m = mesh("");
    let cases: [(&str, u16); 13] = [
        ("GET /plain HTTP/1.1\r\nHost: {h}\r\nHost: {h}\r\n\r\n", 400),
        // A chunked body malformed after good chunks: the client's fault
        // (400), not the app's or the mesh's (502).
        ("POST /plain HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n", 400),
        ("POST /plain HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabcdef\r\n0\r\n\r\n", 400),
        ("POST /plain HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nno colon\r\n\r\n", 400),
        // A bare LF in a chunk extension, where a parser takes any other
        // byte: refused at once, however the body goes on.
        ("POST /plain HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n5;x\nhello\r\n0\r\n\r\n", 400),
        ("POST /plain HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0;x\n", 400),
        ("GET /plain HTTP/1.1\r\nHost: {h}\r\nHost: other.example\r\n\r\n", 400),
        ("GET http://other.example/plain HTTP/1.1\r\nHost: {h}\r\n\r\n", 400),
        ("POST /plain HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
        ("POST /plain HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400),
        ("POST /plain HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 501),
        ("GET /plain HTTP/1.1\nHost: {h}\r\n\r\n", 400),
        ("GET /plain HTTP/1.1\r\nHost: {h}\r\nX-A: 1\nX-B: 2\r\n\r\n", 400),
    ];
    rt().block_on(async {
        for (shape, want) in cases {
            let r = inbound_h1(&m, &shape.replace("{h}", "localhost")).await;
            assert_eq!(r.status, want, "inbound {shape:?}: {r:?}");
            let r = outbound_h1(&m, &shape.replace("{h}", "api.default.svc").replace("other.example", "api.default.svc:1")).await;
            assert_eq!(r.status, want, "outbound {shape:?}: {r:?}");
        }
        assert!(
            !m.app.all().contains("/plain"),
            "no refused request reached the app:\n{}",
            m.app.all()
        );
        // The shapes that are fine still are.
        let r = inbound_h1(&m, "POST /plain HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body.contains("body-bytes: 5"), "{}", r.body);
        let r = inbound_h1(&m, "GET http://localhost/ok HTTP/1.1\r\nHost: LOCALHOST\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}");
        // A bare LF in a later head on a kept-alive connection, after a
        // chunked body that itself holds LFs, and pipelined in one write.
        let mut s = tls(m.in_addr, &m.pki, &m.web, &[b"http/1.1"]).await;
        s.write_all(b"POST /k1 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n\n\n\n\n\r\n0\r\n\r\nGET /k2 HTTP/1.1\r\nHost: localhost\r\nX-A: 1\nX-B: 2\r\n\r\n").await.unwrap();
        // Both answers, then the close that follows a refused head.
        let mut wire = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut wire)).await;
        let wire = String::from_utf8_lossy(&wire);
        let statuses: Vec<&str> = wire
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &wire[i + 9..i + 12])
            .collect();
        assert_eq!(statuses, ["200", "400"], "{wire}");
        assert!(wire.contains("body-bytes: 4"), "{wire}");
        assert!(!m.app.all().contains("/k2"), "{}", m.app.all());
        // HTTP/2: a Host that disagrees with :authority.
        let got = inbound_h2(&m, h2_request("/plain", &[("host", "other.example")], None))
            .await
            .unwrap();
        assert_eq!(got.0, 400, "{}", got.2);
        // An authority the app could read otherwise than the rules did, or
        // none at all: 400 on both listeners.
        for host in ["localhost/admin", "x@localhost", "evil.example, localhost", "localhost:http"] {
            let req = format!("GET /authority HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let r = inbound_h1(&m, &req).await;
            assert_eq!(r.status, 400, "inbound Host {host:?}: {r:?}");
            let req = req.replace("localhost", "api.default.svc");
            let r = outbound_h1(&m, &req).await;
            assert_eq!(r.status, 400, "outbound Host {host:?}: {r:?}");
        }
        let r = inbound_h1(&m, "GET /authority HTTP/1.1\r\nX-A: 1\r\n\r\n").await;
        assert_eq!(r.status, 400, "no Host: {r:?}");
        let mut req = h2_request("/authority", &[], None);
        *req.uri_mut() = "https://u:p@localhost/authority".parse().unwrap();
        let got = inbound_h2(&m, req).await.unwrap();
        assert_eq!(got.0, 400, "userinfo in :authority: {}", got.2);
        assert!(
            !m.app.all().contains("/authority"),
            "a refused authority reached the app:\n{}",
            m.app.all()
        );
    });
}

/// HTTP/2 on plain TCP (prior knowledge), as an app talks to the
/// outbound.
async fn h2c_at(
    at: SocketAddr,
    req: Request<AppBody>,
) -> Result<(StatusCode, HeaderMap, String, Option<HeaderMap>), hyper::Error> {
    h2_over(tokio::net::TcpStream::connect(at).await.unwrap(), req).await
}

/// HTTP/2 forms RFC 9113 section 8 calls malformed and h2 lets through: a
/// `:path` that is not absolute, a `:scheme` the sidecar does not serve,
/// a field value with whitespace at an end (an HTTP/1.1 app would read it
/// trimmed, the sidecar's rules untrimmed). 400 on both listeners, and
/// the app never sees them.
#[test]
fn malformed_http2_forms_are_refused_on_both_listeners() {
    let m = mesh("");
    rt().block_on(async {
        let shapes: [(&str, &[(&str, &str)]); 5] = [
            ("https://{h}?form=1", &[]),
            ("javascript://{h}/form", &[]),
            ("https://{h}/form", &[("x-amount", " 20000")]),
            ("https://{h}/form", &[("x-amount", "20000\t")]),
            ("https://{h}/form", &[("x-amount", "20000 ")]),
        ];
        for (uri, fields) in shapes {
            let mut req = h2_request("/form", fields, None);
            *req.uri_mut() = uri.replace("{h}", "localhost").parse().unwrap();
            let got = inbound_h2(&m, req).await.unwrap();
            assert_eq!(got.0, 400, "inbound {uri} {fields:?}: {}", got.2);
            let mut req = h2_request("/form", fields, None);
            *req.uri_mut() = uri.replace("{h}", "api.default.svc").parse().unwrap();
            let got = h2c_at(m.out_addr, req).await.unwrap();
            assert_eq!(got.0, 400, "outbound {uri} {fields:?}: {}", got.2);
        }
        assert!(
            !m.app.all().contains("/form"),
            "a malformed HTTP/2 request reached the app:\n{}",
            m.app.all()
        );
        // The well-formed ones are served.
        for uri in ["https://{h}/form?x=1", "http://{h}/form"] {
            let mut req = h2_request("/form", &[("x-amount", "2 0")], None);
            *req.uri_mut() = uri.replace("{h}", "localhost").parse().unwrap();
            let got = inbound_h2(&m, req).await.unwrap();
            assert_eq!(got.0, 200, "inbound {uri}: {}", got.2);
            let mut req = h2_request("/form", &[("x-amount", "2 0")], None);
            *req.uri_mut() = uri.replace("{h}", "api.default.svc").parse().unwrap();
            let got = h2c_at(m.out_addr, req).await.unwrap();
            assert_eq!(got.0, 200, "outbound {uri}: {}", got.2);
        }
    });
}

/// A head of `len` bytes exactly: `GET <path> HTTP/1.1`, Host, one filler
/// field sized to fit.
fn head_of(len: usize, host: &str) -> String {
    let start = format!("GET /big HTTP/1.1\r\nHost: {host}\r\nx-fill: ");
    let fill = len - start.len() - 4;
    format!("{start}{}\r\n\r\n", "a".repeat(fill))
}

#[test]
fn the_head_limit_is_max_header_bytes_exactly_on_both_listeners() {
    let m = mesh("");
    rt().block_on(async {
        for (len, want) in [
            (MAX - 1, 200),
            (MAX, 200),
            (MAX + 1, 431),
            (MAX + 40_000, 431),
            (2 * MAX, 431),
        ] {
            let req = head_of(len, "localhost");
            assert_eq!(req.len(), len);
            let r = inbound_h1(&m, &req).await;
            assert_eq!(r.status, want, "inbound head of {len} bytes");
            // The same in two writes, the second arriving once the proxy
            // has read (and buffered) the first: a read buffer bound is
            // not a head bound.
            let mut s = tls(m.in_addr, &m.pki, &m.web, &[b"http/1.1"]).await;
            let cut = MAX - 1000;
            s.write_all(&req.as_bytes()[..cut]).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let r = exchange(&mut s, &req.as_bytes()[cut..]).await;
            assert_eq!(r.status, want, "inbound head of {len} bytes in two writes");
            // The same without ALPN.
            let mut s = tls(m.in_addr, &m.pki, &m.web, &[]).await;
            let r = exchange(&mut s, req.as_bytes()).await;
            assert_eq!(r.status, want, "inbound (no ALPN) head of {len} bytes");
        }
        for (len, want) in [(OUT_MAX - 1, 200), (OUT_MAX, 200), (OUT_MAX + 1, 431)] {
            let req = head_of(len, "api.default.svc");
            let r = outbound_h1(&m, &req).await;
            assert_eq!(r.status, want, "outbound head of {len} bytes: {}", r.body);
        }
        // HTTP/2 counts the header list as RFC 7541 does: each field's
        // name and value plus 32, pseudo-fields included; the list must
        // stay below max_header_bytes.
        let pseudo = (":method".len() + 3 + 32)
            + (":scheme".len() + 5 + 32)
            + (":authority".len() + "localhost".len() + 32)
            + (":path".len() + "/big".len() + 32);
        for (size, want) in [(MAX - 1, 200), (MAX + 1, 431)] {
            let value = "a".repeat(size - pseudo - "x-fill".len() - 32);
            let req = h2_request("/big", &[("x-fill", &value)], None);
            let (status, _, body, _) = inbound_h2(&m, req).await.unwrap();
            assert_eq!(status, want, "h2 header list of {size}: {body}");
        }
    });
}

/// Python's `http.client` sending a body after a head the sidecar refuses
/// (too large: 431) gets the answer, on both listeners. The client writes
/// the whole request before it reads, and a write met with a reset raises
/// before it reads anything: the sidecar reads on briefly after refusing,
/// rather than close with the body arriving.
#[test]
fn a_client_still_sending_reads_the_refusal_of_its_head_on_both_listeners() {
    const CLIENT: &str = r#"
import http.client, ssl, sys, time
kind, port, host, fill = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if kind == "in":
    ctx = ssl.create_default_context(cafile=sys.argv[5])
    ctx.load_cert_chain(sys.argv[6], sys.argv[7])
    c = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
else:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
def body():
    # 200 KiB over about 150 ms, as over a real link.
    for _ in range(25):
        yield b"p" * 8192
        time.sleep(0.006)
try:
    c.request("POST", "/big", body=body(), headers={"Host": host, "x-fill": "a" * fill})
    r = c.getresponse()
    print(r.status)
except OSError as e:
    print("error", type(e).__name__, e)
"#;
    let m = mesh("");
    let (ca, crt, key) = (
        m.pki.bundle.display().to_string(),
        m.web.crt.display().to_string(),
        m.web.key.display().to_string(),
    );
    let run = |args: &[String]| {
        let out = std::process::Command::new("python3")
            .args(["-c", CLIENT])
            .args(args)
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
            + &String::from_utf8_lossy(&out.stderr)
    };
    for round in 0..3 {
        let inbound = run(&[
            "in".into(),
            m.in_addr.port().to_string(),
            "localhost".into(),
            (MAX + 1000).to_string(),
            ca.clone(),
            crt.clone(),
            key.clone(),
        ]);
        assert_eq!(inbound, "431", "inbound, round {round}");
        let outbound = run(&[
            "out".into(),
            m.out_addr.port().to_string(),
            "api.default.svc".into(),
            (OUT_MAX + 1000).to_string(),
        ]);
        assert_eq!(outbound, "431", "outbound, round {round}");
    }
    assert!(
        !m.app.all().contains("/big"),
        "a refused head reached the app:\n{}",
        m.app.all()
    );
}

#[test]
fn a_trailer_http2_cannot_carry_never_hangs_the_mesh() {
    let m = mesh("");
    rt().block_on(async {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..60 {
            let out = m.out_addr;
            tasks.push(tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
                let req = format!(
                    "POST /t{i} HTTP/1.1\r\nHost: api.default.svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\nConnection: close\r\nTE: gzip\r\nKeep-Alive: 5\r\nUpgrade: h2c\r\n\r\n"
                );
                exchange(&mut s, req.as_bytes()).await.status
            }));
        }
        for t in tasks {
            let status = t.await.unwrap();
            assert!(status == 200 || status == 400 || status == 502, "{status}");
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        // The upstream still serves everyone else.
        let r = outbound_h1(&m, "GET /after HTTP/1.1\r\nHost: api.default.svc\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}\n{}", m.outbound.log_text());
    });
}

#[test]
fn the_app_cannot_make_callers_sign_and_no_caller_signature_reaches_it() {
    let m = mesh("");
    rt().block_on(async {
        // An ordinary route whose app answers with a StepUp challenge.
        let r = outbound_h1(&m, "GET /challenge HTTP/1.1\r\nHost: api.default.svc\r\n\r\n").await;
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.get_all("www-authenticate"), ["Basic realm=\"app\""], "{r:?}");
        assert!(r.get_all("accept-signature").is_empty(), "{r:?}");
        assert!(r.get_all("x-keyproof-step-up-error").is_empty(), "{r:?}");
        assert!(r.get_all("x-forwarded-client-cert").is_empty(), "{r:?}");
        // Straight to the inbound, HTTP/1.1 and HTTP/2, alike.
        let r = inbound_h1(&m, "GET /challenge HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.get_all("www-authenticate"), ["Basic realm=\"app\""], "{r:?}");
        assert!(r.get_all("accept-signature").is_empty(), "{r:?}");
        let (status, h, _, _) = inbound_h2(&m, h2_request("/challenge", &[], None)).await.unwrap();
        assert_eq!(status, 401);
        assert!(!h.contains_key("accept-signature"), "{h:?}");
        assert_eq!(h.get_all("www-authenticate").iter().count(), 1, "{h:?}");
        // A real step-up route: the caller's sidecar signs, the app gets
        // the verified mark and none of the signature fields.
        let r = outbound_h1(&m, "GET /admin/x HTTP/1.1\r\nHost: api.default.svc\r\n\r\n").await;
        assert_eq!(r.status, 200, "{r:?}\n{}", m.inbound.log_text());
        assert_eq!(lines_naming(&r.body, "x-keyproof-step-up"), ["x-keyproof-step-up: verified"], "{}", r.body);
        // A caller app sending the fields itself, on both kinds of route.
        for path in ["/plain", "/admin/y", "/challenge"] {
            let r = outbound_h1(&m, &format!("POST {path} HTTP/1.1\r\nHost: api.default.svc\r\nContent-Length: 2\r\n{DISGUISES}\r\nhi")).await;
            assert!(r.status == 200 || r.status == 401, "{path}: {r:?}");
            let r = inbound_h1(&m, &format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n{DISGUISES}\r\nhi")).await;
            // The inbound's own challenge on the step-up route (the forged
            // signature does not verify); the app's one elsewhere.
            assert_eq!(r.status, if path == "/plain" { 200 } else { 401 }, "{path}: {r:?}");
        }
    });
    // The app saw the step-up route only once verified, and no request
    // ever carried a caller's signature fields.
    let all = m.app.all();
    for f in [
        "signature",
        "signature-input",
        "stepup-binding",
        "accept-signature",
    ] {
        assert!(
            lines_naming(&all, f).is_empty(),
            "{f} reached the app:\n{all}"
        );
    }
    for record in m.app.seen.lock().unwrap().iter() {
        assert_only_the_sidecars_fields_or_verified(record);
    }
    // The outbound signed only the inbound's own challenges: the /admin
    // ones, never /challenge.
    let signed = m
        .outbound
        .metric("keyproof_stepup_signatures_total{result=\"ok\"}");
    assert!(
        (1.0..=2.0).contains(&signed),
        "{signed}\n{}",
        m.outbound.metrics()
    );
    assert_eq!(
        m.app.all().matches("GET /challenge").count(),
        3,
        "each /challenge request reached the app once, none was resent signed:\n{all}"
    );
}

/// As [`assert_only_the_sidecars_fields`], allowing the verified mark the
/// inbound sets after a step-up.
fn assert_only_the_sidecars_fields_or_verified(record: &str) {
    let marks = lines_naming(record, "x-keyproof-step-up");
    assert!(
        marks.iter().all(|l| *l == "x-keyproof-step-up: verified"),
        "{record}"
    );
    assert!(
        marks.is_empty() || record.starts_with("GET /admin") || record.starts_with("POST /admin"),
        "{record}"
    );
    let without: String = record
        .lines()
        .filter(|l| !l.starts_with("x-keyproof-step-up:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_only_the_sidecars_fields(&without);
}
