//! A minimal mutual-TLS (TLS 1.3) HTTP/1.1 server that guards every request
//! with keyproof's stepup-v1 [`Verifier`], to drive `interop/sign_client.py`
//! live: same connection, real `EXPORTER-Channel-Binding` from rustls.
//!
//! It writes a throw-away CA, server and client certificates (PEM) into DIR,
//! listens on 127.0.0.1 (ephemeral port), runs
//! `python3 stepup/interop/sign_client.py --connect ...` against itself, and
//! exits with the client's status.
//!
//! `cargo run -q -p keyproof-stepup --example tls_server -- [p256|ed25519] [DIR]`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, ExitCode};
use std::sync::Arc;

use keyproof_stepup::{Outcome, Peer, RequestView, StepUpConfig, Verifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};

const ROUTE: &str = "/admin";

fn respond(
    stream: &mut impl Write,
    status: &str,
    headers: &[(String, String)],
    body: &str,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

fn serve(listener: TcpListener, config: Arc<ServerConfig>, verifier: Arc<Verifier>) {
    let Ok((tcp, _)) = listener.accept() else {
        return;
    };
    let Ok(conn) = ServerConnection::new(config) else {
        return;
    };
    let mut tls = StreamOwned::new(conn, tcp);
    if tls.conn.complete_io(&mut tls.sock).is_err() {
        return;
    }
    let Some(leaf) = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
    else {
        return;
    };
    // Derived once per connection, as the proxy does.
    let exporter = tls
        .conn
        .export_keying_material([0u8; 32], keyproof_stepup::EXPORTER_LABEL, None)
        .ok();
    let Ok(peer) = Peer::from_cert_der(&leaf, exporter) else {
        return;
    };
    let mut reader = BufReader::new(tls);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut it = line.split_whitespace();
        let (Some(method), Some(target)) = (it.next(), it.next()) else {
            return;
        };
        let mut builder = http::Request::builder().method(method).uri(target);
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
                builder = builder.header(k.trim(), v.trim());
            }
        }
        let mut body = vec![0u8; len.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let Ok(req) = builder.body(()) else { return };
        let (parts, ()) = req.into_parts();
        let view = RequestView::from_parts(&parts);
        let now = keyproof_stepup::unix_now();
        let outcome = verifier.verify(&peer, ROUTE, &view, &body, now);
        eprintln!("[server] {method} {target} -> {outcome}");
        let Ok(ch) = verifier.challenge(&peer, ROUTE, view.has_content_type(), Some(outcome), now)
        else {
            let _ = respond(
                reader.get_mut(),
                "503 Service Unavailable",
                &[],
                "nonce table full\n",
            );
            return;
        };
        let mut headers = vec![
            (
                "accept-signature".to_string(),
                ch.accept_signature.to_str().unwrap_or("").to_string(),
            ),
            ("cache-control".to_string(), "no-store".to_string()),
        ];
        let res = if outcome == Outcome::Ok {
            respond(reader.get_mut(), "200 OK", &headers, "step-up verified\n")
        } else {
            headers.push((
                "www-authenticate".to_string(),
                ch.www_authenticate.to_str().unwrap_or("").to_string(),
            ));
            respond(
                reader.get_mut(),
                "401 Unauthorized",
                &headers,
                &format!("{outcome}\n"),
            )
        };
        if res.is_err() {
            return;
        }
    }
}

/// PEM for Python's `cryptography`, which rejects rcgen's PKCS#8 v2 Ed25519
/// documents: those are rewritten as v1 (RFC 8410 §7) from the seed.
fn pkcs8_v1_pem(kp: &rcgen::KeyPair) -> String {
    let der = kp.serialize_der();
    let Some(at) = der.windows(4).position(|w| w == [0x04, 0x22, 0x04, 0x20]) else {
        return kp.serialize_pem();
    };
    if !kp.is_compatible(&rcgen::PKCS_ED25519) {
        return kp.serialize_pem();
    }
    let mut v1 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    v1.extend_from_slice(&der[at + 4..at + 36]);
    use base64::Engine;
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(v1)
    )
}

fn dn(cn: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    dn
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let alg = match args.first().map(String::as_str) {
        Some("ed25519") => &rcgen::PKCS_ED25519,
        _ => &rcgen::PKCS_ECDSA_P256_SHA256,
    };
    let dir = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("stepup-tls-{}", std::process::id())));
    std::fs::create_dir_all(&dir).expect("dir");

    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL takes a leaf whose issuer equals its subject
    // for self-signed (rcgen's default DN is the same for every certificate).
    ca_params.distinguished_name = dn("stepup interop CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let server_key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("server key");
    let mut server_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    server_params.distinguished_name = dn("localhost");
    let server_cert = server_params
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let client_key = rcgen::KeyPair::generate_for(alg).expect("client key");
    let mut client_params =
        rcgen::CertificateParams::new(vec!["client.test".to_string()]).expect("params");
    client_params.distinguished_name = dn("client.test");
    let client_cert = client_params
        .signed_by(&client_key, &ca)
        .expect("client cert");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    std::fs::write(dir.join("client.pem"), client_cert.pem()).expect("write");
    std::fs::write(dir.join("client-key.pem"), pkcs8_v1_pem(&client_key)).expect("write");

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("client verifier");
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let verifier = Arc::new(Verifier::new(StepUpConfig::default()).expect("verifier"));
    let server = std::thread::spawn(move || serve(listener, Arc::new(config), verifier));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/sign_client.py");
    let status = Command::new("python3")
        .arg(script)
        .args(["--connect", &addr.to_string(), "--server-name", "localhost"])
        .arg("--cert")
        .arg(dir.join("client.pem"))
        .arg("--key")
        .arg(dir.join("client-key.pem"))
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(["--method", "POST", "--path", "/admin/rotate?x=1"])
        .args([
            "--content-type",
            "application/json",
            "--body",
            r#"{"rotate":true}"#,
        ])
        .status()
        .expect("run python3");
    drop(server);
    if args.get(1).is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
