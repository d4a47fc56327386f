//! Handshakes accept only the keys keyproof issues and count every refusal
//! under its true reason, in both directions; and sidecars agree on the
//! post-quantum X25519MLKEM768 key exchange while classic clients keep X25519.
//!
//! Callers are real clients (curl, openssl s_client) where one can present
//! the certificate; a certificate presented without its key needs a client
//! that signs CertificateVerify with another key, which no ordinary client
//! will do (openssl and rustls check the pair), so that client is rustls with
//! a resolver that pairs them on purpose: the copied-certificate attack.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keyproof_tests::proxy_support::*;
use keyproof_tests::{free_port, have};
use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const TD: &str = "hs.test";
const NEW_RESULTS: [&str; 5] = [
    "possession_failed",
    "bad_key_usage",
    "unsupported_key",
    "bad_chain",
    "refused_by_peer",
];

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

struct Inbound {
    pki: Pki,
    _app: EchoApp,
    proxy: ProxyProc,
    addr: SocketAddr,
    web: Cert,
}

fn inbound() -> Inbound {
    let pki = Pki::new(TD);
    let app = EchoApp::start();
    let server = pki.issue("server", "/ns/default/sa/api");
    let web = pki.issue("web", "/ns/default/sa/web");
    let (listen, admin) = (addr(), addr());
    let cfg = format!(
        "{}[inbound]\nlisten = \"{listen}\"\napp = \"{}\"\nhandshake_timeout = \"2s\"\n[admin]\nlisten = \"{admin}\"\n",
        identity_toml(&pki.bundle, &server),
        app.addr
    );
    let proxy = ProxyProc::start(pki.tmp.path(), "inbound", &cfg, admin);
    Inbound {
        pki,
        _app: app,
        proxy,
        addr: listen,
        web,
    }
}

fn sample(direction: &str, result: &str) -> String {
    format!("keyproof_tls_handshakes_total{{direction=\"{direction}\",result=\"{result}\"}}")
}

fn kx_sample(direction: &str, group: &str) -> String {
    format!("keyproof_tls_key_exchange_total{{direction=\"{direction}\",group=\"{group}\"}}")
}

impl Inbound {
    fn curl_as(&self, cert: &Cert) -> (u16, String, i32) {
        let resolve = format!("localhost:{}:127.0.0.1", self.addr.port());
        let url = format!("https://localhost:{}/hello", self.addr.port());
        curl(&[
            "--cert",
            &cert.crt.display().to_string(),
            "--key",
            &cert.key.display().to_string(),
            "--cacert",
            &self.pki.bundle.display().to_string(),
            "--resolve",
            &resolve,
            &url,
        ])
    }

    fn count(&self, result: &str) -> f64 {
        self.proxy.metric(&sample("inbound", result))
    }

    /// Waits for `result` to move from `before` and checks that it moved by
    /// exactly one.
    fn expect_one_more(&self, result: &str, before: f64, what: &str) {
        let after = self
            .proxy
            .wait_metric(&sample("inbound", result), before + 1.0);
        assert_eq!(
            after,
            before + 1.0,
            "{what}: {result} went from {before} to {after}\n{}",
            self.proxy.metrics()
        );
    }
}

/// The last log line of a refusal naming `id` under `reason`.
fn refusal_line(log: &str, direction: &str, id: &str, reason: &str) -> Option<String> {
    let marker = match direction {
        "inbound" => "inbound TLS handshake refused",
        _ => "outbound TLS handshake failed",
    };
    let id = format!("peer_id=\"{id}\"");
    let reason = format!("reason=\"{reason}\"");
    log.lines()
        .rev()
        .find(|l| l.contains(marker) && l.contains(&id) && l.contains(&reason))
        .map(str::to_owned)
}

#[test]
fn every_result_and_group_is_exported_from_the_start() {
    let s = inbound();
    let text = s.proxy.metrics();
    for direction in ["inbound", "outbound"] {
        for r in NEW_RESULTS {
            let line = format!("{} 0", sample(direction, r));
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        for g in ["x25519mlkem768", "x25519", "secp256r1", "secp384r1"] {
            let line = format!("{} 0", kx_sample(direction, g));
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}

#[test]
fn inbound_refuses_other_key_types_and_misused_certificates_under_their_reason() {
    let s = inbound();
    let id = |name: &str| s.pki.id(&format!("/ns/default/sa/{name}"));
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let p256 = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cases: Vec<(&str, Cert, &str)> = vec![
        (
            "rsa",
            s.pki
                .craft_with("rsa", &[&id("rsa")], rsa_key_pair(), |_| {}),
            "unsupported_key",
        ),
        (
            "p384",
            s.pki.craft_with("p384", &[&id("p384")], p384, |_| {}),
            "unsupported_key",
        ),
        (
            "serveronly",
            s.pki
                .craft_with("serveronly", &[&id("serveronly")], p256(), |p| {
                    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                }),
            "bad_key_usage",
        ),
        (
            "caleaf",
            s.pki.craft_with("caleaf", &[&id("caleaf")], p256(), |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ];
            }),
            "bad_key_usage",
        ),
        (
            "certsign",
            s.pki
                .craft_with("certsign", &[&id("certsign")], p256(), |p| {
                    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
                }),
            "bad_key_usage",
        ),
        (
            "noeku-codesign",
            s.pki
                .craft_with("noeku-codesign", &[&id("noeku-codesign")], p256(), |p| {
                    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
                }),
            "bad_key_usage",
        ),
        (
            // Under the bundle's root, but no valid path: its own label,
            // not `unknown_ca`, which operators watch during root rotation.
            "critext",
            s.pki.craft_with("critext", &[&id("critext")], p256(), |p| {
                let mut ext = rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 55555, 1],
                    vec![0x05, 0x00],
                );
                ext.set_criticality(true);
                p.custom_extensions.push(ext);
            }),
            "bad_chain",
        ),
    ];
    for (name, cert, reason) in &cases {
        let before = s.count(reason);
        let (code, body, rc) = s.curl_as(cert);
        assert_eq!(code, 0, "{name}: served: {body}");
        assert_ne!(rc, 0, "{name}");
        s.expect_one_more(reason, before, name);
        let log = s.proxy.log_text();
        refusal_line(&log, "inbound", &id(name), reason)
            .unwrap_or_else(|| panic!("{name}: no {reason} refusal naming {}:\n{log}", id(name)));
    }

    // The intermediate itself, with its own key, as a client certificate.
    let ca_dir = s.pki.path("ca");
    let int = Cert {
        crt: ca_dir.join("intermediate.crt"),
        key: ca_dir.join("intermediate.key"),
        leaf: Vec::new(),
    };
    let before = s.count("bad_key_usage");
    let (code, _, _) = s.curl_as(&int);
    assert_eq!(code, 0);
    s.expect_one_more("bad_key_usage", before, "intermediate as leaf");

    // The keys keyproof issues are served: P-256 and Ed25519.
    let ed = s
        .pki
        .craft_with("ed", &[&id("ed")], ed25519_key_pair(), |_| {});
    for (name, cert) in [("p256", &s.web), ("ed25519", &ed)] {
        let (code, body, _) = s.curl_as(cert);
        assert_eq!(code, 200, "{name}: {body}\n{}", s.proxy.log_text());
    }
    assert_eq!(s.count("ok"), 2.0, "{}", s.proxy.metrics());
    for r in ["unknown_ca", "bad_identity", "protocol", "no_client_cert"] {
        assert_eq!(s.count(r), 0.0, "{r}\n{}", s.proxy.metrics());
    }
    assert!(!s.proxy.log_text().contains("PRIVATE KEY"));
}

/// Presents one certificate chain with whatever signing key it was given.
#[derive(Debug)]
struct Presents(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

fn chain_of(cert: &Cert) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(&cert.crt)
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
}

fn signing_key(key: &KeyPair) -> Arc<dyn rustls::sign::SigningKey> {
    let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).unwrap()
}

fn key_of(cert: &Cert) -> Arc<dyn rustls::sign::SigningKey> {
    let der = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).unwrap()
}

/// One HTTP/1.1 request over mutual TLS presenting `chain` and signing
/// CertificateVerify with `key`; the status line, or the error.
fn request_presenting(
    at: SocketAddr,
    pki: &Pki,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn rustls::sign::SigningKey>,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for r in CertificateDer::pem_file_iter(&pki.bundle).unwrap() {
        roots.add(r.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_cert_resolver(Arc::new(Presents(Arc::new(CertifiedKey::new(chain, key)))));
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut tcp = std::net::TcpStream::connect(at).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) if !out.is_empty() => Ok(String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()),
        Ok(_) => Err("closed without an answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// What a client presents, what it signs with, and the ID it claims.
type Attempt<'a> = (
    &'a str,
    Vec<CertificateDer<'static>>,
    Arc<dyn rustls::sign::SigningKey>,
    &'a str,
);

#[test]
fn a_certificate_presented_without_its_key_is_possession_failed() {
    let s = inbound();
    let web_id = s.pki.id("/ns/default/sa/web");
    // Control: the same client with the certificate's own key is served,
    // so the refusals below are about the key alone.
    let ok = request_presenting(s.addr, &s.pki, chain_of(&s.web), key_of(&s.web));
    assert_eq!(
        ok.as_deref(),
        Ok("HTTP/1.1 200 OK"),
        "{}",
        s.proxy.log_text()
    );

    let ed_id = s.pki.id("/ns/default/sa/ed");
    let ed = s
        .pki
        .craft_with("ed", &[&ed_id], ed25519_key_pair(), |_| {});
    let other_p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let attempts: Vec<Attempt<'_>> = vec![
        // A copied certificate, signed for with the attacker's own P-256 key.
        (
            "p256 cert, other p256 key",
            chain_of(&s.web),
            signing_key(&other_p256),
            &web_id,
        ),
        // An Ed25519 certificate, "proven" with an ECDSA signature.
        (
            "ed25519 cert, p256 key",
            chain_of(&ed),
            signing_key(&other_p256),
            &ed_id,
        ),
        // A scheme no SVID key has (RSA-PSS), which keyproof never accepts.
        (
            "p256 cert, rsa key",
            chain_of(&s.web),
            signing_key(&rsa_key_pair()),
            &web_id,
        ),
    ];
    for (what, chain, key, id) in attempts {
        let before = s.count("possession_failed");
        let got = request_presenting(s.addr, &s.pki, chain, key);
        assert!(got.is_err(), "{what}: served: {got:?}");
        s.expect_one_more("possession_failed", before, what);
        let log = s.proxy.log_text();
        let line = refusal_line(&log, "inbound", id, "possession_failed")
            .unwrap_or_else(|| panic!("{what}: no possession_failed line naming {id}:\n{log}"));
        assert!(line.contains("CertificateVerify"), "{line}");
    }
    assert_eq!(s.count("ok"), 1.0, "{}", s.proxy.metrics());
    assert_eq!(s.count("unknown_ca"), 0.0, "{}", s.proxy.metrics());
}

/// A TLS 1.3 server on loopback presenting `chain` and signing with `key`,
/// whatever they are; it never gets past the handshake with a keyproof
/// client.
struct FakeUpstream {
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

#[derive(Debug)]
struct ServerPresents(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for ServerPresents {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn fake_upstream(
    chain: Vec<CertificateDer<'static>>,
    key: Arc<dyn rustls::sign::SigningKey>,
) -> FakeUpstream {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(ServerPresents(Arc::new(CertifiedKey::new(
        chain, key,
    )))));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await;
                }
            });
        }
    });
    FakeUpstream { addr, _rt: rt }
}

#[test]
fn outbound_refuses_servers_by_the_same_rules_and_reasons() {
    let pki = Pki::new(TD);
    let client = pki.issue("client", "/ns/default/sa/web");
    let api = pki.issue("api", "/ns/default/sa/api");
    let api_id = pki.id("/ns/default/sa/api");
    let p256 = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let rsa = rsa_key_pair();
    let rsa_signer = signing_key(&rsa);
    let rsa_cert = pki.craft_with("api-rsa", &[&api_id], rsa, |_| {});
    let client_only_key = p256();
    let client_only_signer = signing_key(&client_only_key);
    let client_only = pki.craft_with("api-clientonly", &[&api_id], client_only_key, |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    let upstreams = [
        (
            "stolen",
            fake_upstream(chain_of(&api), signing_key(&p256())),
            "possession_failed",
        ),
        (
            "rsa",
            fake_upstream(chain_of(&rsa_cert), rsa_signer),
            "unsupported_key",
        ),
        (
            "clientonly",
            fake_upstream(chain_of(&client_only), client_only_signer),
            "bad_key_usage",
        ),
    ];
    let (out_addr, out_admin) = (addr(), addr());
    let mut cfg = format!(
        "{}[outbound]\nlisten = \"{out_addr}\"\nconnect_timeout = \"1s\"\nhandshake_timeout = \"2s\"\n",
        identity_toml(&pki.bundle, &client)
    );
    for (host, up, _) in &upstreams {
        cfg.push_str(&format!(
            "[[outbound.upstreams]]\nhost = \"{host}.default.svc\"\naddress = \"{}\"\nidentity = \"{api_id}\"\n",
            up.addr
        ));
    }
    cfg.push_str(&format!("[admin]\nlisten = \"{out_admin}\"\n"));
    let out = ProxyProc::start(pki.tmp.path(), "out", &cfg, out_admin);
    for (host, _, reason) in &upstreams {
        let before = out.metric(&sample("outbound", reason));
        let (code, body, _) = curl(&[
            "-x",
            &format!("http://{out_addr}"),
            &format!("http://{host}.default.svc/x"),
        ]);
        assert_eq!(code, 502, "{host}: {body}");
        assert!(body.contains(reason), "{host}: {body}");
        let after = out.wait_metric(&sample("outbound", reason), before + 1.0);
        assert!(after >= before + 1.0, "{host}: {}", out.metrics());
        let log = out.log_text();
        let line = refusal_line(&log, "outbound", &api_id, reason)
            .unwrap_or_else(|| panic!("{host}: no {reason} line naming {api_id}:\n{log}"));
        assert!(line.contains(&up_addr(&upstreams, host)), "{line}");
    }
    assert_eq!(out.metric(&sample("outbound", "ok")), 0.0);
    assert_eq!(out.metric(&sample("outbound", "unknown_ca")), 0.0);
}

fn up_addr(ups: &[(&str, FakeUpstream, &str)], host: &str) -> String {
    ups.iter()
        .find(|u| u.0 == host)
        .map(|u| u.1.addr.to_string())
        .unwrap_or_default()
}

/// An outbound (files of `pki`, trusting `bundle`, as `client`) for the
/// inbound of `s`, and its answer to one request: (the outbound, status,
/// body).
fn get_through_outbound(
    s: &Inbound,
    pki: &Pki,
    bundle: &std::path::Path,
    client: &Cert,
) -> (ProxyProc, u16, String) {
    let api = s.pki.id("/ns/default/sa/api");
    let (out, out_addr) = outbound_to(pki, bundle, client, s.addr, &api);
    let (code, body, _) = curl(&[
        "-x",
        &format!("http://{out_addr}"),
        "http://api.default.svc/x",
    ]);
    (out, code, body)
}

#[test]
fn a_caller_the_peer_refuses_after_its_handshake_counts_refused_by_peer() {
    // Round 9 F5: the outbound's certificate is under a root the inbound
    // does not trust. In TLS 1.3 the client's handshake ends before the
    // server has checked its certificate, so the outbound counted `ok`
    // while every request failed on the server's alert.
    let s = inbound();
    let other = Pki::new(TD);
    let client = other.issue("client", "/ns/default/sa/web");
    let both = other.path("both.pem");
    let mut pem = std::fs::read(&s.pki.bundle).unwrap();
    pem.extend(std::fs::read(&other.bundle).unwrap());
    std::fs::write(&both, pem).unwrap();
    let (out, code, body) = get_through_outbound(&s, &other, &both, &client);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("alert"), "{body}");
    let refused = out.wait_metric(&sample("outbound", "refused_by_peer"), 1.0);
    assert_eq!(refused, 1.0, "{}", out.metrics());
    assert!(
        out.log_text().contains("does not accept our certificate"),
        "{}",
        out.log_text()
    );
    s.expect_one_more("unknown_ca", 0.0, "the inbound's side");
}

#[test]
fn an_inbound_whose_certificate_its_caller_refuses_counts_refused_by_peer() {
    // The caller trusts another root only, as callers do of an inbound
    // whose own certificate expired or whose root they no longer trust:
    // its alert is the inbound's own problem, not a caller's `protocol`
    // error.
    let s = inbound();
    let other = Pki::new(TD);
    let client = other.issue("client", "/ns/default/sa/web");
    let (out, code, body) = get_through_outbound(&s, &other, &other.bundle, &client);
    assert_eq!(code, 502, "{body}");
    assert_eq!(out.metric(&sample("outbound", "unknown_ca")), 1.0);
    s.expect_one_more("refused_by_peer", 0.0, "the inbound's side");
    assert_eq!(s.proxy.metric(&sample("inbound", "protocol")), 0.0);
    let log = s.proxy.log_text();
    assert!(log.contains("the peer refused our certificate"), "{log}");
}

#[test]
fn sidecars_agree_on_x25519mlkem768_and_classic_clients_get_x25519() {
    let s = inbound();
    let (out_addr, out_admin) = (addr(), addr());
    let client = s.pki.issue("client", "/ns/default/sa/client");
    let hello_catcher = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = format!(
        "{}[outbound]\nlisten = \"{out_addr}\"\nconnect_timeout = \"1s\"\nhandshake_timeout = \"2s\"\n\
         [[outbound.upstreams]]\nhost = \"api.default.svc\"\naddress = \"{}\"\nidentity = \"{}\"\n\
         [[outbound.upstreams]]\nhost = \"catch.default.svc\"\naddress = \"{}\"\nidentity = \"{}\"\n\
         [admin]\nlisten = \"{out_admin}\"\n",
        identity_toml(&s.pki.bundle, &client),
        s.addr,
        s.pki.id("/ns/default/sa/api"),
        hello_catcher.local_addr().unwrap(),
        s.pki.id("/ns/default/sa/api"),
    );
    let out = ProxyProc::start(s.pki.tmp.path(), "out", &cfg, out_admin);

    // What the outbound offers: X25519MLKEM768 first, with its key share,
    // and an X25519 share beside it for servers without ML-KEM.
    let catch = std::thread::spawn(move || capture_client_hello(&hello_catcher));
    let _ = curl(&[
        "-x",
        &format!("http://{out_addr}"),
        "http://catch.default.svc/x",
    ]);
    let hello = catch.join().unwrap();
    assert_eq!(
        hello.groups.first(),
        Some(&GROUP_X25519MLKEM768),
        "{hello:?}"
    );
    assert!(hello.groups.contains(&GROUP_X25519), "{hello:?}");
    assert_eq!(
        hello.shares,
        vec![(GROUP_X25519MLKEM768, 1216), (GROUP_X25519, 32)],
        "{hello:?}"
    );

    // Sidecar to sidecar: the hybrid, counted on both sides.
    let (code, body, _) = curl(&[
        "-x",
        &format!("http://{out_addr}"),
        "http://api.default.svc/pq",
    ]);
    assert_eq!(code, 200, "{body}\n{}", out.log_text());
    let pq = out.wait_metric(&kx_sample("outbound", "x25519mlkem768"), 1.0);
    assert_eq!(pq, 1.0, "{}", out.metrics());
    assert_eq!(out.metric(&kx_sample("outbound", "x25519")), 0.0);
    let pq_in = s
        .proxy
        .wait_metric(&kx_sample("inbound", "x25519mlkem768"), 1.0);
    assert_eq!(pq_in, 1.0, "{}", s.proxy.metrics());

    // A client without ML-KEM (OpenSSL before 3.5; forced here so that a
    // newer OpenSSL tests the same thing): X25519, no retry.
    if have("openssl") {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &s.addr.to_string()])
            .args([
                "-tls1_3",
                "-groups",
                "X25519:P-256",
                "-servername",
                "localhost",
                // Read on after stdin ends, until the server closes
                // (the request asks for it): no race with a slow handshake.
                "-ign_eof",
            ])
            .arg("-CAfile")
            .arg(&s.pki.bundle)
            .arg("-cert")
            .arg(&s.web.crt)
            .arg("-cert_chain")
            .arg(&s.web.crt)
            .arg("-key")
            .arg(&s.web.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(
                b"GET /classic HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            );
        }
        let out_s = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out_s.stdout);
        assert!(
            stdout.contains("HTTP/1.1 200"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out_s.stderr)
        );
        assert!(
            stdout.contains("Server Temp Key: X25519")
                || stdout.contains("Negotiated TLS1.3 group: X25519\n"),
            "{stdout}"
        );
        let classic = s.proxy.wait_metric(&kx_sample("inbound", "x25519"), 1.0);
        assert_eq!(classic, 1.0, "{}", s.proxy.metrics());
        assert_eq!(
            s.proxy.metric(&kx_sample("inbound", "x25519mlkem768")),
            1.0,
            "{}",
            s.proxy.metrics()
        );
    }
}

/// A caller's TLS 1.3 configuration with `cert` and the roots of `bundle`.
fn caller_tls(cert: &Cert, bundle: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for r in CertificateDer::pem_file_iter(bundle).unwrap() {
        roots.add(r.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        chain_of(cert),
        PrivateKeyDer::from_pem_file(&cert.key).unwrap(),
    )
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// A kept HTTP/2 connection to `addr`, presenting `cert`.
async fn kept_connection(
    cert: &Cert,
    bundle: &std::path::Path,
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(caller_tls(cert, bundle))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("mTLS handshake");
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// The status of one GET on `send`, or why there is none.
async fn get_on(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) -> Result<u16, String> {
    let req = http::Request::get("https://localhost/x")
        .body(http_body_util::Empty::new())
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await {
        Ok(Ok(r)) => Ok(r.status().as_u16()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in 5 s".into()),
    }
}

/// Dropping a root from the trust bundle is what an operator does after a
/// CA compromise. The connections that root's certificates opened end, in
/// both directions, and are not waited out: an inbound closes those of its
/// callers (gracefully, then for good), an outbound sends no new request on
/// those to its upstreams; connections under the roots still trusted go on.
#[test]
fn a_root_dropped_from_the_bundle_ends_the_connections_it_had_verified() {
    let (old, new) = (Pki::new(TD), Pki::new(TD));
    let both_pem = format!("{}{}", old.ca.bundle_pem(), new.ca.bundle_pem());
    let both = new.path("both.pem");
    std::fs::write(&both, &both_pem).unwrap();
    let app = EchoApp::start();
    let identity = |bundle: &std::path::Path, cert: &Cert| {
        format!(
            "[identity]\ntrust_bundle = {:?}\nreload_interval = \"1s\"\n[identity.files]\ncert = {:?}\nkey = {:?}\n",
            bundle.display().to_string(),
            cert.crt.display().to_string(),
            cert.key.display().to_string()
        )
    };
    // The inbound: its own certificate of the new root, both roots trusted.
    let in_bundle = new.path("in-bundle.pem");
    std::fs::write(&in_bundle, &both_pem).unwrap();
    let (in_addr, in_admin) = (addr(), addr());
    let inbound = ProxyProc::start(
        new.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{}\"\n[admin]\nlisten = \"{in_admin}\"\n",
            identity(&in_bundle, &new.issue("server", "/ns/default/sa/api")),
            app.addr
        ),
        in_admin,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let old_web = old.issue("old-web", "/ns/default/sa/web");
    let new_web = new.issue("new-web", "/ns/default/sa/web");
    let (mut by_old, mut by_new) = rt.block_on(async {
        (
            kept_connection(&old_web, &both, in_addr).await,
            kept_connection(&new_web, &both, in_addr).await,
        )
    });
    assert_eq!(rt.block_on(get_on(&mut by_old)), Ok(200));
    assert_eq!(rt.block_on(get_on(&mut by_new)), Ok(200));
    write_renamed(&in_bundle, &new.ca.bundle_pem());
    let cut = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while tokio::time::Instant::now() < deadline {
            if by_old.is_closed() || get_on(&mut by_old).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    });
    assert!(
        cut,
        "a caller of the dropped root is still served:\n{}",
        inbound.log_text()
    );
    assert_eq!(
        rt.block_on(get_on(&mut by_new)),
        Ok(200),
        "the caller of the root still trusted lost its connection"
    );
    assert!(
        inbound
            .log_text()
            .contains("no longer accepts its caller's certificate"),
        "{}",
        inbound.log_text()
    );

    // The outbound: an upstream presenting a certificate of the old root,
    // reached over a kept mesh connection, is not used once that root goes.
    let (up_addr, up_admin) = (addr(), addr());
    let _upstream = ProxyProc::start(
        old.tmp.path(),
        "up",
        &format!(
            "{}[inbound]\nlisten = \"{up_addr}\"\napp = \"{}\"\n[admin]\nlisten = \"{up_admin}\"\n",
            identity(&both, &old.issue("api-old", "/ns/default/sa/api")),
            app.addr
        ),
        up_admin,
    );
    let out_bundle = new.path("out-bundle.pem");
    std::fs::write(&out_bundle, &both_pem).unwrap();
    let (out_addr, out_admin) = (addr(), addr());
    let outbound = ProxyProc::start(
        new.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\n\
             [[outbound.upstreams]]\nhost = \"api.default.svc\"\naddress = \"{up_addr}\"\nidentity = \"{}\"\n\
             [admin]\nlisten = \"{out_admin}\"\n",
            identity(&out_bundle, &new.issue("web", "/ns/default/sa/web")),
            new.id("/ns/default/sa/api")
        ),
        out_admin,
    );
    let through = || {
        curl(&[
            "-x",
            &format!("http://{out_addr}"),
            "http://api.default.svc/x",
        ])
    };
    for _ in 0..3 {
        assert_eq!(through().0, 200);
    }
    assert_eq!(
        outbound.metric(&sample("outbound", "ok")),
        1.0,
        "one kept connection"
    );
    write_renamed(&out_bundle, &new.ca.bundle_pem());
    let refused = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(200));
        let (code, body, _) = through();
        code == 502 && body.contains("unknown_ca")
    });
    assert!(
        refused,
        "the outbound kept using an upstream of the dropped root:\n{}",
        outbound.log_text()
    );
    assert!(outbound.metric(&sample("outbound", "unknown_ca")) >= 1.0);
}
