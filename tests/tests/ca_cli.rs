//! `keyproof-ca` end to end: the real binary, checked by independent
//! verifiers (openssl, rustls' stock WebPKI verifiers) and by bad input.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keyproof_tests::{cmd, free_port, list_dir, run_err, run_ok, TestCa};
use serde_json::Value;

const TD: &str = "prod.example.com";

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn ledger_lines(ca: &TestCa) -> Vec<Value> {
    fs::read_to_string(ca.dir.join("ledger.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Splits a chain PEM into (leaf, rest) files for openssl.
fn split_chain(chain: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let text = fs::read_to_string(chain).unwrap();
    let end = "-----END CERTIFICATE-----\n";
    let cut = text.find(end).unwrap() + end.len();
    let leaf = chain.with_extension("leaf.pem");
    let rest = chain.with_extension("untrusted.pem");
    fs::write(&leaf, &text[..cut]).unwrap();
    fs::write(&rest, &text[cut..]).unwrap();
    (leaf, rest)
}

fn openssl_verify(ca: &TestCa, chain: &Path) -> std::process::Output {
    let (leaf, rest) = split_chain(chain);
    Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca.bundle())
        .arg("-untrusted")
        .arg(rest)
        .arg(leaf)
        .output()
        .unwrap()
}

#[test]
fn init_writes_a_private_ca_and_issue_passes_openssl_verify() {
    for key_type in ["ecdsa-p256", "ed25519"] {
        let ca = TestCa::with_args(TD, &["--key-type", key_type]);
        assert_eq!(mode(&ca.dir), 0o700);
        for f in ["root.key", "intermediate.key"] {
            assert_eq!(mode(&ca.dir.join(f)), 0o600, "{f}");
        }
        for f in [
            "root.crt",
            "intermediate.crt",
            "bundle.pem",
            "bundle.spiffe.json",
            "ledger.jsonl",
        ] {
            assert!(ca.dir.join(f).exists(), "{f} missing");
        }
        let (cert, key) = ca.issue("web", "/ns/default/sa/web", &["--dns", "web.default.svc"]);
        assert_eq!(mode(&key), 0o600);
        let out = openssl_verify(&ca, &cert);
        assert!(
            out.status.success(),
            "openssl verify ({key_type}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The certificate file holds leaf then intermediate.
        let pem = fs::read_to_string(&cert).unwrap();
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);

        // inspect --json says what was issued.
        let json: Value = serde_json::from_str(&run_ok(
            cmd("keyproof-ca")
                .arg("inspect")
                .arg(&cert)
                .arg("--bundle")
                .arg(ca.bundle())
                .arg("--json"),
        ))
        .unwrap();
        let leaf = &json["certificates"][0];
        assert_eq!(
            leaf["spiffe_id"],
            format!("spiffe://{TD}/ns/default/sa/web")
        );
        assert_eq!(leaf["key_type"], key_type);
        assert_eq!(leaf["svid_errors"], serde_json::json!([]));
        assert_eq!(json["chain"], "valid");
        for field in ["serial", "issuer", "not_before", "not_after"] {
            assert!(
                leaf[field].as_str().is_some_and(|s| !s.is_empty()),
                "{field}"
            );
        }

        // One ledger line with every field, matching the certificate.
        let lines = ledger_lines(&ca);
        assert_eq!(lines.len(), 1);
        let e = &lines[0];
        assert_eq!(e["serial"], leaf["serial"]);
        assert_eq!(e["spiffe_id"], leaf["spiffe_id"]);
        assert_eq!(e["not_after"], leaf["not_after"]);
        assert_eq!(e["sha256"], leaf["sha256"]);
        for field in ["not_before", "issuer_key_id", "issued_at"] {
            assert!(e[field].as_str().is_some_and(|s| !s.is_empty()), "{field}");
        }
        // 128-bit serial, 5-minute backdate, 24 h default lifetime.
        assert!(e["serial"].as_str().unwrap().len() >= 30);
        let t = |f: &str| {
            time::OffsetDateTime::parse(
                e[f].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        };
        assert_eq!((t("issued_at") - t("not_before")).whole_seconds(), 300);
        assert_eq!((t("not_after") - t("issued_at")).whole_seconds(), 86_400);
    }
}

#[test]
fn issue_from_csr_takes_the_key_not_the_identity() {
    let ca = TestCa::new(TD);
    let key = ca.path("csr.key");
    let csr = ca.path("req.csr");
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .args([
                "-subj",
                "/CN=attacker",
                "-addext",
                "subjectAltName=URI:spiffe://prod.example.com/ns/kube-system/sa/admin",
            ]),
    );
    let cert = ca.path("csr.crt");
    run_ok(
        cmd("keyproof-ca")
            .args(["issue", "--dir"])
            .arg(&ca.dir)
            .args([
                "--spiffe-id",
                "spiffe://prod.example.com/ns/default/sa/web",
                "--csr",
            ])
            .arg(&csr)
            .arg("--cert-out")
            .arg(&cert),
    );
    let json: Value = serde_json::from_str(&run_ok(
        cmd("keyproof-ca").arg("inspect").arg(&cert).arg("--json"),
    ))
    .unwrap();
    assert_eq!(
        json["certificates"][0]["spiffe_id"],
        "spiffe://prod.example.com/ns/default/sa/web"
    );
    assert_eq!(
        json["certificates"][0]["uri_sans"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // The certificate is for the CSR's key.
    let pubkey = |args: &[&str], f: &Path| run_ok(Command::new("openssl").args(args).arg(f));
    let (leaf, _) = split_chain(&cert);
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in"], &leaf),
        pubkey(&["pkey", "-pubout", "-in"], &key)
    );
    // DER CSRs work too.
    let der = ca.path("req.der");
    run_ok(
        Command::new("openssl")
            .args(["req", "-outform", "DER", "-in"])
            .arg(&csr)
            .arg("-out")
            .arg(&der),
    );
    run_ok(
        cmd("keyproof-ca")
            .args(["issue", "--dir"])
            .arg(&ca.dir)
            .args([
                "--spiffe-id",
                "spiffe://prod.example.com/ns/default/sa/web",
                "--csr",
            ])
            .arg(&der)
            .arg("--cert-out")
            .arg(ca.path("der.crt")),
    );
    assert_eq!(ledger_lines(&ca).len(), 2);
}

/// Runs a failing `issue` and checks the message and that nothing was written.
fn issue_fails(ca: &TestCa, args: &[&str], want: &str) {
    let before = list_dir(ca.tmp.path());
    let ledger_before = fs::read(ca.dir.join("ledger.jsonl")).unwrap();
    let err = run_err(
        cmd("keyproof-ca")
            .args(["issue", "--dir"])
            .arg(&ca.dir)
            .args(args),
    );
    assert!(err.contains(want), "expected {want:?} in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert_eq!(
        list_dir(ca.tmp.path()),
        before,
        "files appeared after {args:?}"
    );
    assert_eq!(
        fs::read(ca.dir.join("ledger.jsonl")).unwrap(),
        ledger_before
    );
}

#[test]
fn bad_issue_input_gets_a_clear_error_and_writes_nothing() {
    let ca = TestCa::new(TD);
    let k = ca.path("k.pem").display().to_string();
    let c = ca.path("c.pem").display().to_string();
    let run = |id: &str, want: &str| {
        issue_fails(
            &ca,
            &["--spiffe-id", id, "--key-out", &k, "--cert-out", &c],
            want,
        );
    };
    run(
        "spiffe://other.example.com/ns/a",
        "not in this CA's trust domain prod.example.com",
    );
    run("spiffe://prod.example.com", "has no path");
    run("spiffe://prod.example.com/a//b", "empty segment");
    run("spiffe://Prod.example.com/a", "trust domain has 'P'");
    run("https://prod.example.com/a", "scheme");
    run("spiffe://prod.example.com/a?x=1", "query");
    run("spiffe://prod.example.com/a/", "ends with \"/\"");

    // A CSR whose signature does not verify.
    let csr = ca.path("bad.csr");
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-outform",
                "DER",
            ])
            .arg("-keyout")
            .arg(ca.path("bad.key"))
            .arg("-out")
            .arg(&csr)
            .args(["-subj", "/CN=x"]),
    );
    let mut der = fs::read(&csr).unwrap();
    let n = der.len();
    der[n - 5] ^= 0x55; // inside the signature
    fs::write(&csr, &der).unwrap();
    let cert = ca.path("bad.crt");
    issue_fails(
        &ca,
        &[
            "--spiffe-id",
            "spiffe://prod.example.com/ns/a",
            "--csr",
            csr.to_str().unwrap(),
            "--cert-out",
            cert.to_str().unwrap(),
        ],
        "CSR signature does not verify",
    );
    // A CSR with a key type keyproof does not issue for.
    let rsa = ca.path("rsa.csr");
    run_ok(
        Command::new("openssl")
            .args(["req", "-new", "-newkey", "rsa:2048", "-nodes"])
            .arg("-keyout")
            .arg(ca.path("rsa.key"))
            .arg("-out")
            .arg(&rsa)
            .args(["-subj", "/CN=x"]),
    );
    issue_fails(
        &ca,
        &[
            "--spiffe-id",
            "spiffe://prod.example.com/ns/a",
            "--csr",
            rsa.to_str().unwrap(),
            "--cert-out",
            cert.to_str().unwrap(),
        ],
        "CSR key type not allowed",
    );
    // Garbage instead of a CSR.
    let junk = ca.path("junk.csr");
    fs::write(&junk, "hello").unwrap();
    issue_fails(
        &ca,
        &[
            "--spiffe-id",
            "spiffe://prod.example.com/ns/a",
            "--csr",
            junk.to_str().unwrap(),
            "--cert-out",
            cert.to_str().unwrap(),
        ],
        "not valid PEM or DER",
    );
}

#[test]
fn expired_intermediate_refuses_to_issue() {
    let ca = TestCa::with_args(TD, &["--intermediate-ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    let k = ca.path("k.pem");
    let c = ca.path("c.pem");
    issue_fails(
        &ca,
        &[
            "--spiffe-id",
            "spiffe://prod.example.com/ns/a",
            "--key-out",
            k.to_str().unwrap(),
            "--cert-out",
            c.to_str().unwrap(),
        ],
        "intermediate expired",
    );
    // check reports it as invalid (exit 2).
    let out = keyproof_tests::run(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn missing_unreadable_and_existing_ca_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let err = run_err(
        cmd("keyproof-ca")
            .args(["issue", "--dir"])
            .arg(&missing)
            .args(["--spiffe-id", "spiffe://td/a", "--key-out"])
            .arg(tmp.path().join("k"))
            .arg("--cert-out")
            .arg(tmp.path().join("c")),
    );
    assert!(err.contains("no such directory"), "{err}");
    // A directory that is not a CA.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = run_err(cmd("keyproof-ca").args(["bundle", "--dir"]).arg(&empty));
    assert!(err.contains("not a keyproof CA directory"), "{err}");
    // A corrupt state file.
    let ca = TestCa::new(TD);
    fs::write(ca.dir.join("ca.json"), "{").unwrap();
    let err = run_err(cmd("keyproof-ca").args(["bundle", "--dir"]).arg(&ca.dir));
    assert!(err.contains("ca.json"), "{err}");
    // A key nobody may read is reported with its path (root reads anything, so
    // remove it instead to exercise the same path).
    let ca = TestCa::new(TD);
    fs::remove_file(ca.dir.join("intermediate.key")).unwrap();
    let err = run_err(cmd("keyproof-ca").args(["bundle", "--dir"]).arg(&ca.dir));
    assert!(err.contains("intermediate.key"), "{err}");
    assert_eq!(list_dir(tmp.path()), vec!["empty".to_string()]);

    // init refuses an existing CA and changes nothing.
    let ca = TestCa::new(TD);
    let before: Vec<_> = list_dir(&ca.dir)
        .iter()
        .map(|f| fs::read(ca.dir.join(f)).unwrap())
        .collect();
    let err = run_err(
        cmd("keyproof-ca")
            .args(["init", "--dir"])
            .arg(&ca.dir)
            .args(["--trust-domain", "other.td"]),
    );
    assert!(err.contains("already exists"), "{err}");
    let after: Vec<_> = list_dir(&ca.dir)
        .iter()
        .map(|f| fs::read(ca.dir.join(f)).unwrap())
        .collect();
    assert_eq!(before, after);
    // A bad trust domain writes nothing.
    let err = run_err(
        cmd("keyproof-ca")
            .args(["init", "--dir"])
            .arg(tmp.path().join("x"))
            .args(["--trust-domain", "Bad_TD!"]),
    );
    assert!(err.contains("--trust-domain"), "{err}");
    assert!(!tmp.path().join("x").exists());
    assert_eq!(list_dir(tmp.path()), vec!["empty".to_string()]);
}

#[test]
fn check_exit_codes_bundle_formats_and_k8s_secret() {
    let ca = TestCa::new(TD);
    let (cert, key) = ca.issue("web", "/ns/default/sa/web", &[]);
    let code = |c: &mut Command| keyproof_tests::run(c).status.code();
    assert_eq!(
        code(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir)),
        Some(0)
    );
    assert_eq!(
        code(
            cmd("keyproof-ca")
                .args(["check", "--warn-before", "2y", "--dir"])
                .arg(&ca.dir)
        ),
        Some(1),
        "the intermediate expires within 2y: a warning"
    );
    let check_cert = |c: &Path, warn: &str| {
        code(
            cmd("keyproof-ca")
                .args(["check", "--warn-before", warn, "--cert"])
                .arg(c)
                .arg("--bundle")
                .arg(ca.bundle()),
        )
    };
    assert_eq!(check_cert(&cert, "1h"), Some(0));
    assert_eq!(check_cert(&cert, "48h"), Some(1));
    let (short, _) = ca.issue("short", "/ns/default/sa/short", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(check_cert(&short, "1h"), Some(2), "expired");
    let other = TestCa::new(TD);
    let (foreign, _) = other.issue("x", "/ns/x", &[]);
    assert_eq!(
        check_cert(&foreign, "1h"),
        Some(2),
        "another CA's certificate"
    );

    // bundle: PEM and SPIFFE JSON.
    let pem = run_ok(cmd("keyproof-ca").args(["bundle", "--dir"]).arg(&ca.dir));
    assert_eq!(pem, fs::read_to_string(ca.bundle()).unwrap());
    let json: Value = serde_json::from_str(&run_ok(
        cmd("keyproof-ca")
            .args(["bundle", "--format", "spiffe", "--dir"])
            .arg(&ca.dir),
    ))
    .unwrap();
    assert_eq!(json["spiffe_sequence"], 1);
    assert!(json["spiffe_refresh_hint"].as_u64().is_some());
    assert_eq!(json["keys"][0]["use"], "x509-svid");
    assert_eq!(json["keys"][0]["kty"], "EC");
    assert_eq!(json["keys"][0]["x5c"].as_array().unwrap().len(), 1);

    // k8s-secret.
    let yaml = run_ok(
        cmd("keyproof-ca")
            .args([
                "k8s-secret",
                "--name",
                "web-svid",
                "--namespace",
                "default",
                "--cert",
            ])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--bundle")
            .arg(ca.bundle()),
    );
    assert!(yaml.contains("kind: Secret"));
    assert!(yaml.contains("type: kubernetes.io/tls"));
    assert!(yaml.contains("  namespace: default"));
    for k in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(yaml.contains(&format!("  {k}: ")), "{k}");
    }
    use base64::Engine;
    let ca_line = yaml.lines().find(|l| l.starts_with("  ca.crt: ")).unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(ca_line.trim_start_matches("  ca.crt: "))
        .unwrap();
    assert_eq!(decoded, fs::read(ca.bundle()).unwrap());
    // Mismatched key: refused.
    let (_, other_key) = ca.issue("db", "/ns/default/sa/db", &[]);
    let err = run_err(
        cmd("keyproof-ca")
            .args(["k8s-secret", "--name", "web-svid", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&other_key)
            .arg("--bundle")
            .arg(ca.bundle()),
    );
    assert!(
        err.contains("--key") && err.contains("does not match"),
        "{err}"
    );
    let err = run_err(
        cmd("keyproof-ca")
            .args(["k8s-secret", "--name", "Bad_Name", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--bundle")
            .arg(ca.bundle()),
    );
    assert!(err.contains("--name"), "{err}");
}

#[test]
fn openssl_s_server_and_s_client_complete_mutual_tls13() {
    let ca = TestCa::new(TD);
    let (scert, skey) = ca.issue("server", "/ns/default/sa/server", &[]);
    let (ccert, ckey) = ca.issue("client", "/ns/default/sa/client", &[]);
    let port = free_port();
    let mut server = Command::new("openssl")
        .args([
            "s_server",
            "-tls1_3",
            "-Verify",
            "2",
            "-verify_return_error",
            "-naccept",
            "1",
            "-accept",
        ])
        .arg(port.to_string())
        .arg("-cert")
        .arg(&scert)
        .arg("-cert_chain")
        .arg(&scert)
        .arg("-key")
        .arg(&skey)
        .arg("-CAfile")
        .arg(ca.bundle())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // s_server prints ACCEPT when listening; a probe connection would use up
    // its single accept.
    let mut sout = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        use std::io::BufRead;
        assert!(
            sout.read_line(&mut line).unwrap() > 0,
            "s_server exited before listening"
        );
        if line.starts_with("ACCEPT") {
            break;
        }
    }
    let client = Command::new("openssl")
        .args([
            "s_client",
            "-tls1_3",
            "-verify_return_error",
            "-brief",
            "-connect",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&ccert)
        .arg("-cert_chain")
        .arg(&ccert)
        .arg("-key")
        .arg(&ckey)
        .arg("-CAfile")
        .arg(ca.bundle())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let cerr = String::from_utf8_lossy(&client.stderr);
    assert!(client.status.success(), "s_client: {cerr}");
    assert!(cerr.contains("Verification: OK"), "{cerr}");
    assert!(cerr.contains("TLSv1.3"), "{cerr}");
    let _ = server.kill();
    let out = server.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut sout, &mut rest).unwrap();
    let text = rest + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Client certificate"),
        "server saw no client certificate: {text}"
    );
    assert!(!text.contains("verify error"), "{text}");
}

fn rustls_mtls(ca: &TestCa) -> Result<String, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use rustls_pki_types::pem::PemObject;

    let (scert, skey) = ca.issue(
        "server",
        "/ns/default/sa/server",
        &["--dns", "server.default.svc"],
    );
    let (ccert, ckey) = ca.issue("client", "/ns/default/sa/client", &[]);
    let load = |c: &Path, k: &Path| {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(c)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        (chain, PrivateKeyDer::from_pem_file(k).unwrap())
    };
    let mut roots = RootCertStore::empty();
    for r in CertificateDer::pem_file_iter(ca.bundle()).unwrap() {
        roots.add(r.unwrap()).unwrap();
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let (schain, skey) = load(&scert, &skey);
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .unwrap(),
        )
        .with_single_cert(schain, skey)
        .unwrap();
    let (cchain, ckey) = load(&ccert, &ckey);
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(cchain, ckey)
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.len())
                .unwrap_or(0);
            tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.ok();
            Ok::<usize, String>(peer)
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector
            .connect(ServerName::try_from("server.default.svc").unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let version = tls.get_ref().1.protocol_version();
        let peer_certs = server.await.unwrap()?;
        assert_eq!(peer_certs, 2, "client presented leaf + intermediate");
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })
}

#[test]
fn tokio_rustls_mutual_tls13_with_two_issued_svids() {
    let ca = TestCa::new(TD);
    assert_eq!(rustls_mtls(&ca).unwrap(), "hello");
    let ed = TestCa::with_args(TD, &["--key-type", "ed25519"]);
    assert_eq!(rustls_mtls(&ed).unwrap(), "hello");
}

#[test]
fn root_rotation_moves_in_three_steps() {
    let ca = TestCa::new(TD);
    let (old_leaf, _) = ca.issue("old", "/ns/default/sa/web", &[]);
    let roots = |ca: &TestCa| {
        fs::read_to_string(ca.bundle())
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count()
    };
    let seq = |ca: &TestCa| -> u64 {
        let v: Value =
            serde_json::from_str(&fs::read_to_string(ca.dir.join("bundle.spiffe.json")).unwrap())
                .unwrap();
        v["spiffe_sequence"].as_u64().unwrap()
    };
    let root_of = |cert: &Path| -> String {
        let v: Value = serde_json::from_str(&run_ok(
            cmd("keyproof-ca").arg("inspect").arg(cert).arg("--json"),
        ))
        .unwrap();
        v["certificates"][1]["issuer"].as_str().unwrap().to_owned()
    };
    let rot = |args: &[&str]| {
        run_ok(
            cmd("keyproof-ca")
                .arg("rotate")
                .args(args)
                .arg("--dir")
                .arg(&ca.dir),
        )
    };

    // Intermediate rotation: bundle untouched, new issuer.
    let bundle_before = fs::read(ca.bundle()).unwrap();
    rot(&["intermediate"]);
    assert_eq!(fs::read(ca.bundle()).unwrap(), bundle_before);
    let (after_int, _) = ca.issue("after-int", "/ns/default/sa/web", &[]);
    assert_ne!(
        fs::read(&after_int).unwrap()[..],
        fs::read(&old_leaf).unwrap()[..]
    );
    assert!(openssl_verify(&ca, &after_int).status.success());
    assert!(
        openssl_verify(&ca, &old_leaf).status.success(),
        "old leaves still verify"
    );

    // Finish before prepare is refused.
    let err = run_err(
        cmd("keyproof-ca")
            .args(["rotate", "root", "finish", "--dir"])
            .arg(&ca.dir),
    );
    assert!(err.contains("cannot finish"), "{err}");

    rot(&["root", "prepare"]);
    assert_eq!((roots(&ca), seq(&ca)), (2, 2));
    let (prepared, _) = ca.issue("prepared", "/ns/default/sa/web", &[]);
    assert_eq!(
        root_of(&prepared),
        root_of(&after_int),
        "issuance stays on the old chain"
    );

    rot(&["root", "activate"]);
    let (activated, _) = ca.issue("activated", "/ns/default/sa/web", &[]);
    assert_ne!(
        root_of(&activated),
        root_of(&prepared),
        "issuance moved to the new chain"
    );
    assert!(openssl_verify(&ca, &activated).status.success());
    assert!(
        openssl_verify(&ca, &prepared).status.success(),
        "both roots trusted"
    );
    let status = run_ok(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir));
    assert!(status.contains("blocked by"), "{status}");

    // Finish refuses while old-root leaves are unexpired, and names them.
    let err = run_err(
        cmd("keyproof-ca")
            .args(["rotate", "root", "finish", "--dir"])
            .arg(&ca.dir),
    );
    assert!(
        err.contains("refusing to finish")
            && err.contains("spiffe://prod.example.com/ns/default/sa/web"),
        "{err}"
    );
    assert_eq!(roots(&ca), 2);
    rot(&["root", "finish", "--force"]);
    assert_eq!((roots(&ca), seq(&ca)), (1, 3));
    assert!(openssl_verify(&ca, &activated).status.success());
    assert!(
        !openssl_verify(&ca, &prepared).status.success(),
        "old-root leaf no longer trusted"
    );
    let status = run_ok(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir));
    assert!(status.contains("idle"), "{status}");
}

#[test]
fn check_dir_warns_when_a_renewal_is_overdue_until_superseded() {
    let ca = TestCa::new(TD);
    let code = || {
        keyproof_tests::run(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir))
            .status
            .code()
    };
    // 2 minutes left of a 7-minute life (5 minutes are backdating): inside
    // the last third, so renewal is overdue.
    ca.issue("short", "/ns/default/sa/web", &["--ttl", "2m"]);
    assert_eq!(code(), Some(1));
    // A newer certificate for the same identity supersedes it.
    ca.issue("renewed", "/ns/default/sa/web", &["--ttl", "1h"]);
    assert_eq!(code(), Some(0));
}

#[test]
fn inspect_reports_every_rule_of_a_bad_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let crt = tmp.path().join("bad.crt");
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=x",
            ])
            .arg("-keyout")
            .arg(tmp.path().join("bad.key"))
            .arg("-out")
            .arg(&crt)
            .args([
                "-addext",
                "subjectAltName=URI:spiffe://td/a,URI:spiffe://td/b",
            ])
            .args([
                "-addext",
                "keyUsage=keyCertSign",
                "-addext",
                "basicConstraints=CA:FALSE",
            ]),
    );
    let v: Value = serde_json::from_str(&run_ok(
        cmd("keyproof-ca").arg("inspect").arg(&crt).arg("--json"),
    ))
    .unwrap();
    let c = &v["certificates"][0];
    let errors: Vec<&str> = c["svid_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(
        errors,
        [
            "multiple_uri_sans",
            "key_usage_not_critical",
            "no_digital_signature",
            "leaf_key_cert_sign"
        ]
    );
    let rules = c["svid_rules"].as_array().unwrap();
    assert_eq!(rules.len(), 7);
    let passed: Vec<bool> = rules.iter().map(|r| r["pass"].as_bool().unwrap()).collect();
    assert_eq!(passed, [false, true, false, false, false, true, true]);
    assert_eq!(c["spiffe_id"], Value::Null);
    let text = run_ok(cmd("keyproof-ca").arg("inspect").arg(&crt));
    assert!(text.contains("FAIL  exactly one URI SAN"), "{text}");
    assert!(text.contains("pass  not a CA"), "{text}");
}
