//! A real Prometheus (the Debian package) scrapes a real sidecar pair with a
//! 1 s interval and evaluates keyproof's alert rules. After a replayed
//! step-up request and a refused handshake, its HTTP API must return the
//! matching counter values, and the replay alert must be firing; the trust
//! bundle gauges reach it too, and the root-expiry rule sees the test root.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use keyproof_stepup::{Challenge, RequestView, Signer};
use keyproof_tests::prometheus::{Prometheus, PrometheusOptions};
use keyproof_tests::proxy_support::{
    curl, identity_toml, mtls_http1, Cert, EchoApp, Pki, ProxyProc,
};
use keyproof_tests::{free_port, have};
use rustls::pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Sends one request on an HTTP/1.1 connection and returns status, headers
/// and body.
async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap) {
    let resp = sender.send_request(req).await.expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let _ = resp.into_body().collect().await;
    (status, headers)
}

fn post(
    path: &str,
    authority: &str,
    headers: &http::HeaderMap,
    body: &'static [u8],
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.body(Full::new(Bytes::from_static(body)))
        .expect("request")
}

/// Takes a challenge, signs, is accepted, then replays the same signed
/// request on the same connection (a kept-alive mTLS connection from the
/// shared test support, so the exporter is the one the inbound sees). Returns the replay's status and its
/// `WWW-Authenticate`.
async fn signed_then_replayed(inbound: SocketAddr, pki: &Pki, cert: &Cert) -> (StatusCode, String) {
    let (mut sender, exporter) = mtls_http1(inbound, pki, cert).await;

    let authority = "payments.default.svc";
    let path = "/admin/rotate?x=1";
    let body: &'static [u8] = b"{\"rotate\":true}";
    let (status, challenge_headers) = send(
        &mut sender,
        post(path, authority, &http::HeaderMap::new(), body),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a step-up route challenges first"
    );
    let challenge = Challenge::from_headers(&challenge_headers)
        .expect("challenge parses")
        .expect("a StepUp challenge");
    let key_der = match PrivateKeyDer::from_pem_file(&cert.key).expect("key") {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => panic!("the CA writes PKCS#8 keys"),
    };
    let signer = Signer::from_pkcs8_and_cert(&key_der, &cert.leaf).expect("signer");
    let unsigned = post(path, authority, &http::HeaderMap::new(), body);
    let (parts, _) = unsigned.into_parts();
    let view = RequestView::from_parts(&parts);
    let signed = signer
        .sign(
            &challenge,
            &view,
            body,
            &exporter,
            keyproof_stepup::unix_now(),
        )
        .expect("sign");
    let mut headers = http::HeaderMap::new();
    signed.apply(&mut headers);
    let (status, _) = send(&mut sender, post(path, authority, &headers, body)).await;
    assert_eq!(status, StatusCode::OK, "the signed request is accepted");
    // The captured request, byte for byte, again.
    let (status, replay_headers) = send(&mut sender, post(path, authority, &headers, body)).await;
    let www = replay_headers
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, www)
}

#[test]
fn prometheus_sees_the_replay_and_the_refused_handshake_and_fires_the_alert() {
    if !have("prometheus") && std::env::var_os("CI").is_none() {
        eprintln!("skipping: no prometheus binary (apt-get install prometheus)");
        return;
    }
    let pki = Pki::new("prod.example.com");
    let server = pki.issue("server", "/ns/default/sa/payments");
    let ops = pki.issue("ops", "/ns/ops/sa/admin");
    let app = EchoApp::start();
    let inbound: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = format!(
        "{}\n[inbound]\nlisten = \"{inbound}\"\napp = \"{}\"\n[[inbound.routes]]\npath_prefix = \"/admin\"\nallow = [\"spiffe://prod.example.com/ns/ops/*\"]\nstep_up = true\n[admin]\nlisten = \"{admin}\"\n",
        identity_toml(&pki.bundle, &server),
        app.addr
    );
    let proxy = ProxyProc::start(pki.tmp.path(), "in", &config, admin);

    let prom = Prometheus::start(
        PrometheusOptions::new()
            .job("keyproof", [admin.to_string()])
            .rule_file(repo().join("deploy/prometheus/keyproof-rules.yaml")),
    )
    .expect("start prometheus");

    // A handshake without a client certificate is refused and counted.
    let (status, _, code) = curl(&[
        "--cacert",
        pki.bundle.to_str().expect("utf8"),
        "-k",
        &format!("https://{inbound}/"),
    ]);
    assert!(
        status == 0 && code != 0,
        "no client certificate, no HTTP answer (curl exit {code})"
    );

    // A signed request accepted once, refused as a replay the second time.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let (status, www) = rt.block_on(signed_then_replayed(inbound, &pki, &ops));
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the replay is refused");
    assert!(www.contains("error=\"replay\""), "{www}");
    assert_eq!(
        proxy.metric("keyproof_stepup_verifications_total{result=\"replay\"}"),
        1.0
    );

    let replays = prom
        .wait_for_query(
            "keyproof_stepup_verifications_total{result=\"replay\"}",
            |v| v >= 1.0,
            Duration::from_secs(30),
        )
        .expect("Prometheus scraped the replay counter");
    assert_eq!(replays, 1.0);
    let oks = prom
        .wait_for_query(
            "keyproof_stepup_verifications_total{result=\"ok\"}",
            |v| v >= 1.0,
            Duration::from_secs(30),
        )
        .expect("the accepted request");
    assert_eq!(oks, 1.0);
    let refused = prom
        .wait_for_query(
            "keyproof_tls_handshakes_total{direction=\"inbound\",result=\"no_client_cert\"}",
            |v| v >= 1.0,
            Duration::from_secs(30),
        )
        .expect("the refused handshake");
    assert_eq!(refused, 1.0);
    let firing = prom
        .wait_for_query(
            "ALERTS{alertname=\"KeyproofStepUpReplay\",alertstate=\"firing\"}",
            |v| v == 1.0,
            Duration::from_secs(30),
        )
        .expect("the replay alert fires");
    assert_eq!(firing, 1.0);
    assert!(prom
        .alert_firing("KeyproofStepUpReplay")
        .expect("alerts API"));

    // The trust bundle as Prometheus sees it (labelled with its trust
    // domain, so that several trust domains can share a Prometheus): one
    // root, the build, and no
    // sequence (an [identity.files] sidecar has no CA to state one). The
    // test root lives a day, which the root-expiry rule already sees.
    let roots = prom
        .wait_for_query(
            "keyproof_trust_bundle_roots{trust_domain=\"prod.example.com\"}",
            |v| v >= 1.0,
            Duration::from_secs(30),
        )
        .expect("the trust bundle's roots");
    assert_eq!(roots, 1.0);
    let build = prom
        .wait_for_query(
            "keyproof_build_info{binary=\"keyproof-proxy\"}",
            |v| v >= 1.0,
            Duration::from_secs(30),
        )
        .expect("build_info");
    assert_eq!(build, 1.0);
    assert_eq!(
        prom.query_value("keyproof_trust_bundle_sequence")
            .expect("query"),
        None
    );
    let pending = prom
        .wait_for_query(
            "ALERTS{alertname=\"KeyproofTrustRootExpiringSoon\",alertstate=\"pending\"}",
            |v| v == 1.0,
            Duration::from_secs(30),
        )
        .expect("a root expiring within 30 days is seen");
    assert_eq!(pending, 1.0);
    assert!(!prom
        .alert_firing("KeyproofTrustBundleDiverged")
        .expect("alerts API"));
    drop(proxy);
}
