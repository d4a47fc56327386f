//! `keyproof-ca` end to end: the real binary, checked by independent
//! verifiers (openssl, rustls' stock WebPKI verifiers) and by bad input.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keyproof_tests::{bin, cmd, free_port, list_dir, run, run_err, run_ok, TestCa};
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
        // OpenSSL reads every key written (OpenSSL 3.0 refuses an Ed25519
        // key in PKCS#8 v2), and each is the certificate's.
        for k in [
            key.clone(),
            ca.dir.join("root.key"),
            ca.dir.join("intermediate.key"),
        ] {
            let out = Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&k)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl pkey {} ({key_type}): {}",
                k.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            if k == key {
                let cert_pub = Command::new("openssl")
                    .args(["x509", "-noout", "-pubkey", "-in"])
                    .arg(&cert)
                    .output()
                    .unwrap();
                assert_eq!(out.stdout, cert_pub.stdout, "{key_type}");
            }
        }

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
fn output_to_a_reader_that_went_away_ends_quietly() {
    // `keyproof-ca bundle | head -1`: the reader is gone before the write.
    let ca = TestCa::new(TD);
    let bin = cmd("keyproof-ca").get_program().to_owned();
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"(sleep 0.3; "$0" bundle --dir "$1"; echo "rc=$?" >&2) | true"#)
        .arg(&bin)
        .arg(&ca.dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("rc=0"), "{err}");
    // Any other failed write is said once and fails the command.
    let out = cmd("keyproof-ca")
        .args(["bundle", "--dir"])
        .arg(&ca.dir)
        .stdout(fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("writing to standard output"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_ca_key_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let ca = TestCa::new(TD);
    let key = ca.dir.join("intermediate.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = run_err(
        cmd("keyproof-ca")
            .args(["issue", "--dir"])
            .arg(&ca.dir)
            .args(["--spiffe-id", "spiffe://prod.example.com/ns/default/sa/web"])
            .arg("--cert-out")
            .arg(ca.path("w.crt"))
            .arg("--key-out")
            .arg(ca.path("w.key")),
    );
    assert!(
        err.contains("intermediate.key") && err.contains("mode 644"),
        "{err}"
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o440)).unwrap();
    ca.issue("web", "/ns/default/sa/web", &[]);
}

#[test]
fn issue_publishes_no_certificate_the_ledger_does_not_hold() {
    // A ledger that cannot be appended to (a full or read-only volume; a
    // directory in its place here): the command fails, and neither the
    // certificate nor its key is left behind for `revoke` not to know.
    let ca = TestCa::new(TD);
    let ledger = ca.dir.join("ledger.jsonl");
    fs::remove_file(&ledger).unwrap();
    fs::create_dir(&ledger).unwrap();
    let (cert, key) = (ca.path("w.crt"), ca.path("w.key"));
    let out = cmd("keyproof-ca")
        .args(["issue", "--dir"])
        .arg(&ca.dir)
        .args(["--spiffe-id", "spiffe://prod.example.com/ns/default/sa/web"])
        .arg("--cert-out")
        .arg(&cert)
        .arg("--key-out")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ledger.jsonl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!cert.exists() && !key.exists(), "outputs left behind");
    let stray: Vec<_> = fs::read_dir(cert.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".keyproof-tmp-")
        })
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// `keyproof-ca issue` of `csr` for the `web` workload, into `cert`.
fn issue_csr(ca: &TestCa, csr: &Path, cert: &Path) -> Command {
    let mut c = cmd("keyproof-ca");
    c.args(["issue", "--dir"])
        .arg(&ca.dir)
        .args([
            "--spiffe-id",
            "spiffe://prod.example.com/ns/default/sa/web",
            "--csr",
        ])
        .arg(csr)
        .arg("--cert-out")
        .arg(cert);
    c
}

/// A CSR (DER) for `spki` (DER) signed with `sig` under Ed25519, by hand:
/// no private key is needed for the keys it is used with.
fn ed25519_csr(spki: &[u8], sig: &[u8; 64]) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 0x80);
        let mut v = vec![tag, body.len() as u8];
        v.extend_from_slice(body);
        v
    }
    // version 0, an empty subject, the key, no attributes.
    let info = tlv(
        0x30,
        &[&[0x02, 0x01, 0x00, 0x30, 0x00][..], spki, &[0xa0, 0x00]].concat(),
    );
    let alg = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
    let bits = tlv(0x03, &[&[0u8][..], &sig[..]].concat());
    let body = [info, alg.to_vec(), bits].concat();
    let mut der = vec![0x30, 0x81, body.len() as u8];
    der.extend_from_slice(&body);
    der
}

#[test]
fn a_csr_whose_key_no_private_key_stands_behind_is_refused() {
    // The Ed25519 identity point verifies `R = identity, S = 0` for every
    // message: its certificate would let anyone who saw it pass handshakes.
    let ca = TestCa::with_args(TD, &["--key-type", "ed25519"]);
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let spki = [
        &[
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ][..],
        &identity[..],
    ]
    .concat();
    let mut sig = [0u8; 64];
    sig[0] = 1;
    let csr = ca.path("keyless.csr");
    fs::write(&csr, ed25519_csr(&spki, &sig)).unwrap();
    let out = issue_csr(&ca, &csr, &ca.path("keyless.crt"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "issued: {err}");
    assert!(err.contains("small order"), "{err}");
    assert!(!ca.path("keyless.crt").exists());
    assert_eq!(ledger_lines(&ca).len(), 0);
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
    run_ok(&mut issue_csr(&ca, &csr, &cert));
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

/// Replaces the CA's intermediate certificate by one for the same key,
/// signed by the same root, that expired an hour ago (no lifetime the CLI
/// accepts makes one expire within a test).
fn expire_intermediate(ca: &TestCa) {
    use keyproof_identity::keys;
    let key =
        |f: &str| keys::key_pair_from_pem(&fs::read_to_string(ca.dir.join(f)).unwrap()).unwrap();
    let root = keys::certs_from_pem(&fs::read(ca.dir.join("root.crt")).unwrap())
        .unwrap()
        .remove(0);
    let issuer = rcgen::Issuer::from_ca_cert_der(&root, key("root.key")).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "expired intermediate");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(2);
    p.not_after = now - time::Duration::hours(1);
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key("intermediate.key"), &issuer).unwrap();
    fs::write(ca.dir.join("intermediate.crt"), cert.pem()).unwrap();
}

#[test]
fn expired_intermediate_refuses_to_issue() {
    let ca = TestCa::new(TD);
    expire_intermediate(&ca);
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
    // The CA's own intermediate and key are no workload's (round 10, keys
    // F11): the workload would issue any identity with them.
    let err = run_err(
        cmd("keyproof-ca")
            .args(["k8s-secret", "--name", "web-svid", "--cert"])
            .arg(ca.dir.join("intermediate.crt"))
            .arg("--key")
            .arg(ca.dir.join("intermediate.key"))
            .arg("--bundle")
            .arg(ca.bundle()),
    );
    assert!(
        err.contains("--cert") && err.contains("not a workload's certificate"),
        "{err}"
    );
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
    let check = || keyproof_tests::run(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir));
    let code = || check().status.code();
    // Just issued: 2 minutes left of a 2-minute life counted from its
    // issuance (notBefore is backdated 5 minutes for clock skew, which a
    // renewer does not count): fine.
    ca.issue("short", "/ns/default/sa/web", &["--ttl", "2m"]);
    assert_eq!(
        code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check().stdout)
    );
    // As if it had been issued 5 minutes earlier and its workload had not
    // renewed it since: 2 minutes left of 7, inside the last third.
    let ledger = ca.dir.join("ledger.jsonl");
    let lines: Vec<String> = ledger_lines(&ca)
        .into_iter()
        .map(|mut e| {
            e["issued_at"] = e["not_before"].clone();
            e.to_string()
        })
        .collect();
    fs::write(&ledger, lines.join("\n") + "\n").unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("renewal is overdue"), "{text}");
    assert!(text.contains("stopped renewing"), "{text}");
    // A newer certificate for the same identity supersedes it.
    ca.issue("renewed", "/ns/default/sa/web", &["--ttl", "1h"]);
    assert_eq!(code(), Some(0));
}

#[test]
fn check_dir_never_warns_about_a_certificate_its_renewer_keeps_fresh() {
    // 15-second certificates renewed by `renew --daemon`: every renewal
    // lands before the last third, so a check at any moment across two
    // renewals is clean.
    let ca = TestCa::new(TD);
    let srv = serve(&ca, &["--ttl", "15s"]);
    let dir = workload_dir(&ca, "15s");
    let hook = ca.path("hook.log");
    let mut child = renew_cmd(&srv.url, &dir)
        .arg("--daemon")
        .arg("--exec")
        .arg(format!("echo renewed >> '{}'", hook.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let renewals = || {
        fs::read_to_string(&hook)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    let mut checks = 0;
    let mut failure = None;
    // The first renewal comes at once (the issued certificate's notBefore
    // is backdated); two more follow about 9.5 seconds apart.
    while renewals() < 3 && start.elapsed() < Duration::from_secs(28) {
        let out = keyproof_tests::run(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir));
        checks += 1;
        if out.status.code() != Some(0) {
            failure = Some(format!(
                "exit {:?} after {:?}:\n{}",
                out.status.code(),
                start.elapsed(),
                String::from_utf8_lossy(&out.stdout)
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let n = renewals();
    let _ = child.kill();
    let _ = child.wait();
    if let Some(f) = failure {
        panic!("check --dir warned about a certificate being renewed ({n} renewals): {f}");
    }
    assert!(n >= 3, "{n} renewal(s) in {:?}", start.elapsed());
    assert!(checks >= 20, "{checks}");
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
    // A failing rule is exit 2, with the full report on stdout.
    let out = keyproof_tests::run(cmd("keyproof-ca").arg("inspect").arg(&crt).arg("--json"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
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
    let out = keyproof_tests::run(cmd("keyproof-ca").arg("inspect").arg(&crt));
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FAIL  exactly one URI SAN"), "{text}");
    assert!(text.contains("pass  not a CA"), "{text}");
}

#[test]
fn inspect_exit_codes_and_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // No SPIFFE ID at all: a rule fails, exit 2.
    let crt = tmp.path().join("plain.crt");
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
                "/CN=plain",
                "-addext",
                "subjectAltName=DNS:plain.example",
            ])
            .arg("-keyout")
            .arg(tmp.path().join("plain.key"))
            .arg("-out")
            .arg(&crt),
    );
    let out = keyproof_tests::run(cmd("keyproof-ca").arg("inspect").arg(&crt));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));

    // A good SVID passes (0); against another CA's bundle its chain fails (2).
    let ca = TestCa::new(TD);
    let (cert, _) = ca.issue("web", "/ns/default/sa/web", &[]);
    let code = |c: &mut Command| keyproof_tests::run(c).status.code();
    assert_eq!(code(cmd("keyproof-ca").arg("inspect").arg(&cert)), Some(0));
    let other = TestCa::new(TD);
    assert_eq!(
        code(
            cmd("keyproof-ca")
                .arg("inspect")
                .arg(&cert)
                .arg("--bundle")
                .arg(other.bundle())
        ),
        Some(2)
    );

    // A missing file: the error names the file, and no flag that does not exist.
    let err = run_err(
        cmd("keyproof-ca")
            .arg("inspect")
            .arg(tmp.path().join("nope.crt")),
    );
    assert!(err.contains("nope.crt"), "{err}");
    assert!(!err.contains("--file"), "{err}");
    let err = run_err(
        cmd("keyproof-ca")
            .arg("inspect")
            .arg(&cert)
            .arg("--bundle")
            .arg(tmp.path().join("nope.pem")),
    );
    assert!(
        err.contains("--bundle") && err.contains("nope.pem"),
        "{err}"
    );
}

#[test]
fn check_dir_fails_for_an_identity_left_on_a_root_that_was_forced_out() {
    let ca = TestCa::new(TD);
    let (first, _) = ca.issue("first", "/ns/default/sa/first", &[]);
    let rot = |args: &[&str]| {
        run_ok(
            cmd("keyproof-ca")
                .arg("rotate")
                .args(args)
                .arg("--dir")
                .arg(&ca.dir),
        )
    };
    rot(&["root", "prepare"]);
    rot(&["root", "activate"]);
    ca.issue("second", "/ns/default/sa/second", &[]);
    rot(&["root", "finish", "--force"]);

    let out = keyproof_tests::run(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let fail: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fail.len(), 1, "{text}");
    assert!(
        fail[0].contains("spiffe://prod.example.com/ns/default/sa/first")
            && fail[0].contains("no longer chains"),
        "{text}"
    );
    // It names the root it was issued under: the one that left the bundle.
    let root = ledger_lines(&ca)[0]["root_sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(fail[0].contains(&root), "{text}");
    assert!(!text.contains("FAIL spiffe://prod.example.com/ns/default/sa/second"));
    // One line per certificate: the FAIL replaces its `ok`, and the issuing
    // root is reported once, as the bundle root it is.
    let subjects: Vec<&str> = text
        .lines()
        .map(|l| l[5..].split_once(": ").unwrap().0)
        .collect();
    let mut unique = subjects.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), subjects.len(), "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("/sa/first")),
        "{text}"
    );
    assert!(text.contains("bundle root 0 (root.crt)"), "{text}");

    // check --cert on the same certificate agrees.
    let out = keyproof_tests::run(
        cmd("keyproof-ca")
            .args(["check", "--cert"])
            .arg(&first)
            .arg("--bundle")
            .arg(ca.bundle()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("FAIL chain"), "{text}");

    // Renewing the identity under the new root clears it.
    ca.issue("first-again", "/ns/default/sa/first", &[]);
    run_ok(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir));

    // A ledger entry from before root_sha256 was recorded, whose issuing
    // intermediate the directory no longer holds: a warning, not a pass.
    let ca = TestCa::new(TD);
    ca.issue("old", "/ns/default/sa/old", &[]);
    let mut e = ledger_lines(&ca).remove(0);
    e.as_object_mut().unwrap().remove("root_sha256");
    e["issuer_key_id"] = Value::from("00");
    fs::write(ca.dir.join("ledger.jsonl"), format!("{e}\n")).unwrap();
    let out = keyproof_tests::run(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("cannot tell which root"), "{text}");
}

#[test]
fn warning_windows_follow_each_certificates_lifetime_unless_given() {
    let ca = TestCa::new(TD);
    let (cert, _) = ca.issue("web", "/ns/default/sa/web", &[]);
    let check = |args: &[&str], target: &[std::ffi::OsString]| {
        let out = keyproof_tests::run(cmd("keyproof-ca").arg("check").args(args).args(target));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let dir = ["--dir".into(), ca.dir.clone().into_os_string()];
    let file = [
        "--cert".into(),
        cert.clone().into_os_string(),
        "--bundle".into(),
        ca.bundle().into_os_string(),
    ];
    // A fresh 24 h SVID, a 1-year intermediate, a 10-year root: nothing warns.
    for target in [&dir[..], &file[..]] {
        let (code, text) = check(&[], target);
        assert_eq!(code, Some(0), "{text}");
        assert!(!text.contains("WARN"), "{text}");
    }
    // --warn-before applies to every certificate, the issued one included.
    for target in [&dir[..], &file[..]] {
        let (code, text) = check(&["--warn-before", "48h"], target);
        assert_eq!(code, Some(1), "{text}");
        let warned: Vec<&str> = text.lines().filter(|l| l.starts_with("WARN")).collect();
        assert_eq!(warned.len(), 1, "only the SVID expires within 48h: {text}");
        assert!(
            warned[0].contains("spiffe://") || warned[0].contains("certificate 0"),
            "{text}"
        );
    }
    let (code, text) = check(&["--warn-before", "1h"], &dir);
    assert_eq!(code, Some(0), "{text}");
    // The help says there is no fixed default.
    let help = run_ok(cmd("keyproof-ca").args(["check", "--help"]));
    assert!(help.contains("last third"), "{help}");
    assert!(!help.contains("720h"), "{help}");
}

#[test]
fn issue_never_overwrites_without_force_and_never_writes_into_the_ca() {
    let ca = TestCa::new(TD);
    let (cert, key) = ca.issue("web", "/ns/default/sa/web", &[]);
    let (cert_before, key_before) = (fs::read(&cert).unwrap(), fs::read(&key).unwrap());
    let id = "spiffe://prod.example.com/ns/default/sa/web";
    let other = ca.path("other.pem").display().to_string();

    // Existing --cert-out, existing --key-out: refused, nothing changes.
    issue_fails(
        &ca,
        &[
            "--spiffe-id",
            id,
            "--key-out",
            &other,
            "--cert-out",
            cert.to_str().unwrap(),
        ],
        &format!(
            "--cert-out {}: already exists; pass --force",
            cert.display()
        ),
    );
    issue_fails(
        &ca,
        &[
            "--spiffe-id",
            id,
            "--key-out",
            key.to_str().unwrap(),
            "--cert-out",
            &other,
        ],
        &format!("--key-out {}: already exists; pass --force", key.display()),
    );
    assert_eq!(fs::read(&cert).unwrap(), cert_before);
    assert_eq!(fs::read(&key).unwrap(), key_before);

    // --force replaces both and records the new certificate.
    let lines = ledger_lines(&ca).len();
    run_ok(
        cmd("keyproof-ca")
            .args(["issue", "--force", "--spiffe-id", id, "--dir"])
            .arg(&ca.dir)
            .arg("--key-out")
            .arg(&key)
            .arg("--cert-out")
            .arg(&cert),
    );
    assert_ne!(fs::read(&cert).unwrap(), cert_before);
    assert_ne!(fs::read(&key).unwrap(), key_before);
    assert_eq!(mode(&key), 0o600);
    assert!(openssl_verify(&ca, &cert).status.success());
    assert_eq!(ledger_lines(&ca).len(), lines + 1);

    // Inside the CA directory: refused even with --force, however it is
    // spelled (directly, through `..`, relative, through a symbolic link).
    let root_before = fs::read(ca.dir.join("root.crt")).unwrap();
    let ledger_before = fs::read(ca.dir.join("ledger.jsonl")).unwrap();
    std::os::unix::fs::symlink(&ca.dir, ca.path("ca-link")).unwrap();
    fs::create_dir(ca.path("out")).unwrap();
    let via_dotdot = ca.path("out/../ca/root.crt");
    let via_link = ca.path("ca-link").join("root.crt");
    for out in [
        ca.dir.join("root.crt"),
        via_dotdot,
        via_link,
        ca.dir.join("new.crt"),
    ] {
        let err = run_err(
            cmd("keyproof-ca")
                .args(["issue", "--force", "--spiffe-id", id, "--dir"])
                .arg(&ca.dir)
                .arg("--key-out")
                .arg(&other)
                .arg("--cert-out")
                .arg(&out),
        );
        assert!(
            err.contains("--cert-out") && err.contains("inside the CA directory"),
            "{err}"
        );
    }
    let err = run_err(
        cmd("keyproof-ca")
            .current_dir(&ca.dir)
            .args(["issue", "--force", "--spiffe-id", id, "--dir", "."])
            .args(["--key-out", "root.key", "--cert-out"])
            .arg(&other),
    );
    assert!(
        err.contains("--key-out root.key") && err.contains("inside the CA directory"),
        "{err}"
    );
    assert_eq!(fs::read(ca.dir.join("root.crt")).unwrap(), root_before);
    assert_eq!(
        fs::read(ca.dir.join("ledger.jsonl")).unwrap(),
        ledger_before
    );
    assert!(!Path::new(&other).exists());
    assert!(!ca.dir.join("new.crt").exists());
    // A directory that does not exist is named with the flag.
    let err = run_err(
        cmd("keyproof-ca")
            .args(["issue", "--spiffe-id", id, "--dir"])
            .arg(&ca.dir)
            .arg("--key-out")
            .arg(&other)
            .arg("--cert-out")
            .arg(ca.path("missing/web.crt")),
    );
    assert!(
        err.contains("--cert-out") && err.contains("missing/web.crt"),
        "{err}"
    );
}

#[test]
fn init_creates_its_directory_but_not_missing_parents() {
    let tmp = tempfile::tempdir().unwrap();
    let deep = tmp.path().join("no/such/ca");
    let err = run_err(
        cmd("keyproof-ca")
            .args(["init", "--trust-domain", TD, "--dir"])
            .arg(&deep),
    );
    assert!(
        err.contains("--dir") && err.contains("parent directory") && err.contains("does not exist"),
        "{err}"
    );
    assert!(list_dir(tmp.path()).is_empty());
    // A symbolic link to nowhere is refused, not followed.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &link).unwrap();
    let err = run_err(
        cmd("keyproof-ca")
            .args(["init", "--trust-domain", TD, "--dir"])
            .arg(&link),
    );
    assert!(
        err.contains("--dir") && err.contains("symbolic link"),
        "{err}"
    );
    assert_eq!(list_dir(tmp.path()), vec!["link".to_string()]);
}

#[test]
fn init_needs_a_missing_or_empty_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let init = |dir: &Path| {
        keyproof_tests::run(
            cmd("keyproof-ca")
                .args(["init", "--trust-domain", TD, "--dir"])
                .arg(dir),
        )
    };
    // A non-empty directory that is not a CA: refused, untouched.
    let full = tmp.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("notes.txt"), "mine").unwrap();
    let out = init(&full);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists and is not empty"), "{err}");
    assert_eq!(list_dir(&full), vec!["notes.txt".to_string()]);
    // A file: refused, untouched.
    let file = tmp.path().join("file");
    fs::write(&file, "x").unwrap();
    let out = init(&file);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a directory"), "{err}");
    assert_eq!(fs::read(&file).unwrap(), b"x");
    // An empty directory (say, a mounted volume): initialised in place.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    assert!(init(&empty).status.success());
    assert_eq!(mode(&empty), 0o700);
    assert!(empty.join("ca.json").exists());
    assert!(!list_dir(&empty).iter().any(|f| f.starts_with('.')));
    run_ok(cmd("keyproof-ca").args(["check", "--dir"]).arg(&empty));
    // The help says the same.
    let help = run_ok(cmd("keyproof-ca").args(["init", "--help"]));
    assert!(
        help.contains("must not exist, or be an empty directory"),
        "{help}"
    );
}

/// A running `keyproof-ca serve`, killed on drop.
struct Serve {
    child: std::process::Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(ca: &TestCa, extra: &[&str]) -> Serve {
    let port = free_port();
    let mut c = cmd("keyproof-ca");
    c.args(["serve", "--dir"])
        .arg(&ca.dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(extra);
    // Where serve has an admin listener, keep it off the shared default port.
    if run_ok(cmd("keyproof-ca").args(["serve", "--help"])).contains("--admin-listen") {
        c.arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", free_port()));
    }
    let child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keyproof-ca serve");
    keyproof_tests::wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(20));
    Serve {
        child,
        url: format!("https://127.0.0.1:{port}"),
    }
}

fn inspect_json(cert: &Path) -> Value {
    let out = keyproof_tests::run(cmd("keyproof-ca").arg("inspect").arg(cert).arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn renew_cmd(srv_url: &str, dir: &Path) -> Command {
    let mut c = cmd("keyproof-ca");
    c.arg("renew")
        .arg("--cert")
        .arg(dir.join("tls.crt"))
        .arg("--key")
        .arg(dir.join("tls.key"))
        .arg("--bundle")
        .arg(dir.join("ca.crt"))
        .args(["--ca-url", srv_url]);
    c
}

/// A workload directory holding tls.crt, tls.key and ca.crt, as an
/// `[identity.files]` workload or nginx reads them.
fn workload_dir(ca: &TestCa, ttl: &str) -> std::path::PathBuf {
    let dir = ca.path("workload");
    fs::create_dir(&dir).unwrap();
    run_ok(
        cmd("keyproof-ca")
            .args([
                "issue",
                "--spiffe-id",
                "spiffe://prod.example.com/ns/default/sa/web",
            ])
            .args(["--ttl", ttl, "--dir"])
            .arg(&ca.dir)
            .arg("--key-out")
            .arg(dir.join("tls.key"))
            .arg("--cert-out")
            .arg(dir.join("tls.crt")),
    );
    fs::copy(ca.bundle(), dir.join("ca.crt")).unwrap();
    dir
}

fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(p).unwrap().ino()
}

#[test]
fn renew_once_replaces_the_pair_with_a_new_key_and_serial() {
    let ca = TestCa::new(TD);
    let srv = serve(&ca, &[]);
    let dir = workload_dir(&ca, "1h");
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let (crt_before, key_before) = (fs::read(&crt).unwrap(), fs::read(&key).unwrap());
    let serial_before = inspect_json(&crt)["certificates"][0]["serial"].clone();

    // Not yet at two thirds of its life: nothing happens, exit 0.
    let out = run_ok(&mut renew_cmd(&srv.url, &dir));
    assert!(out.contains("not due"), "{out}");
    assert_eq!(fs::read(&crt).unwrap(), crt_before);
    assert_eq!(fs::read(&key).unwrap(), key_before);

    let inodes = (inode(&crt), inode(&key));
    let out = run_ok(renew_cmd(&srv.url, &dir).arg("--force"));
    assert!(
        out.contains("renewed spiffe://prod.example.com/ns/default/sa/web"),
        "{out}"
    );
    let v = inspect_json(&crt);
    let leaf = &v["certificates"][0];
    assert_ne!(leaf["serial"], serial_before);
    assert_eq!(
        leaf["spiffe_id"],
        "spiffe://prod.example.com/ns/default/sa/web"
    );
    assert_ne!(fs::read(&key).unwrap(), key_before, "a new key");
    assert_eq!(mode(&key), 0o600);
    // Replaced by rename (new files), nothing staged left behind.
    assert_ne!((inode(&crt), inode(&key)), inodes);
    assert_eq!(list_dir(&dir), ["ca.crt", "tls.crt", "tls.key"]);
    // The new pair belongs together and chains to the bundle.
    assert!(openssl_verify(&ca, &crt).status.success());
    run_ok(
        cmd("keyproof-ca")
            .args(["k8s-secret", "--name", "web", "--cert"])
            .arg(&crt)
            .arg("--key")
            .arg(&key)
            .arg("--bundle")
            .arg(dir.join("ca.crt")),
    );
    // The CA recorded it as a renewal.
    let last = ledger_lines(&ca).pop().unwrap();
    assert_eq!(last["serial"], leaf["serial"]);
    assert_eq!(
        last["requester"],
        "renew:spiffe://prod.example.com/ns/default/sa/web"
    );

    // The CA's bundle changed (root rotation prepared): the bundle file follows.
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "prepare", "--dir"])
            .arg(&ca.dir),
    );
    std::thread::sleep(Duration::from_millis(1500));
    run_ok(renew_cmd(&srv.url, &dir).arg("--force"));
    assert_eq!(
        fs::read(dir.join("ca.crt")).unwrap(),
        fs::read(ca.bundle()).unwrap()
    );
    assert_eq!(
        fs::read_to_string(dir.join("ca.crt"))
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
}

#[test]
fn renew_daemon_renews_at_two_thirds_of_life_and_runs_exec() {
    let ca = TestCa::new(TD);
    let srv = serve(&ca, &["--ttl", "6s"]);
    let dir = workload_dir(&ca, "6s");
    let hook = ca.path("hook.log");
    let mut child = renew_cmd(&srv.url, &dir)
        .arg("--daemon")
        .arg("--exec")
        .arg(format!("echo renewed >> '{}'", hook.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let renewals = || {
        fs::read_to_string(&hook)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while renewals() < 2 && start.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let n = renewals();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(n >= 2, "{n} renewal(s) in {:?}:\n{log}", start.elapsed());
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("renew --daemon did not stop on SIGTERM:\n{log}")
    });
    assert!(status.success(), "{status}:\n{log}");
    assert!(log.matches("renewed spiffe://").count() >= 2, "{log}");
    assert!(log.contains("stopping"), "{log}");
    let renews = ledger_lines(&ca)
        .iter()
        .filter(|e| e["requester"].as_str().unwrap_or("").starts_with("renew:"))
        .count();
    assert!(renews >= 2, "{renews}");
    // What is on disk is the newest pair, and valid.
    assert!(openssl_verify(&ca, &dir.join("tls.crt")).status.success());
    assert_eq!(mode(&dir.join("tls.key")), 0o600);
}

#[test]
fn renew_refuses_an_expired_certificate_with_a_clear_message() {
    let ca = TestCa::new(TD);
    let dir = workload_dir(&ca, "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let before = fs::read(dir.join("tls.crt")).unwrap();
    // Refused before the CA is contacted: none needs to be running.
    let url = format!("https://127.0.0.1:{}", free_port());
    for daemon in [false, true] {
        let mut c = renew_cmd(&url, &dir);
        if daemon {
            c.arg("--daemon");
        }
        let err = run_err(&mut c);
        assert!(
            err.contains("--cert")
                && err.contains("expired")
                && err.contains("cannot be renewed")
                && err.contains("keyproof-ca issue"),
            "{err}"
        );
    }
    assert_eq!(fs::read(dir.join("tls.crt")).unwrap(), before);
}

/// Runs a command that must end by itself: a `serve` that wrongly started
/// is killed after 30 s and fails the test.
fn run_bounded(c: &mut Command) -> std::process::Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not run {c:?}: {e}"));
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{c:?} did not exit:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Every file under `dir` with its contents, for "nothing was written".
fn tree(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_bad_flag_value_is_refused_naming_the_flag_with_exit_2() {
    let ca = TestCa::new(TD);
    let (crt, key) = ca.issue("web", "/ns/default/sa/web", &[]);
    let (_, other_key) = ca.issue("api", "/ns/default/sa/api", &[]);
    let p = |name: &str| ca.path(name).to_str().unwrap().to_owned();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let junk = p("junk.pem");
    fs::write(&junk, "not a certificate\n").unwrap();
    let missing = p("missing.pem");
    let dangling = p("dangling");
    std::os::unix::fs::symlink(ca.path("nowhere"), &dangling).unwrap();
    let (dir, bundle, crt, key, other_key) =
        (s(&ca.dir), s(&ca.bundle()), s(&crt), s(&key), s(&other_key));
    let inside = |f: &str| s(&ca.dir.join(f));
    let id = format!("spiffe://{TD}/ns/default/sa/x");
    let addr = || format!("127.0.0.1:{}", free_port());
    let before = tree(&ca.dir);

    // (subcommand, valid flags, the flag given a bad value, the bad value):
    // the bad value replaces the flag's valid one, or is added.
    type Row = (Vec<String>, Vec<(String, String)>, String, String);
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |sub: &[&str], base: &[(&str, &str)], bad: &[(&str, &str)]| {
        for (flag, value) in bad {
            rows.push((
                sub.iter().map(|x| x.to_string()).collect(),
                base.iter()
                    .map(|(f, v)| (f.to_string(), v.to_string()))
                    .collect(),
                flag.to_string(),
                value.to_string(),
            ));
        }
    };
    let ttls = |flag: &'static str| [(flag, "0s"), (flag, "99999y"), (flag, "soon")];

    let new_ca = p("new-ca");
    let init = [("--dir", new_ca.as_str()), ("--trust-domain", TD)];
    add(
        &["init"],
        &init,
        &[
            ("--dir", &dangling),
            ("--dir", &p("no/such/ca")),
            ("--dir", &dir),
            ("--dir", &junk),
            ("--trust-domain", "Bad_TD!"),
            ("--key-type", "rsa"),
            // Shorter than the default --intermediate-ttl.
            ("--root-ttl", "2d"),
        ],
    );
    add(&["init"], &init, &ttls("--root-ttl"));
    add(&["init"], &init, &ttls("--intermediate-ttl"));

    let (new_key, new_crt) = (p("new.key"), p("new.crt"));
    let issue = [
        ("--dir", dir.as_str()),
        ("--spiffe-id", id.as_str()),
        ("--key-out", new_key.as_str()),
        ("--cert-out", new_crt.as_str()),
    ];
    add(
        &["issue"],
        &issue,
        &[
            ("--dir", &missing),
            ("--spiffe-id", "spiffe://other.org/ns/default/sa/x"),
            ("--spiffe-id", "not-an-id"),
            ("--spiffe-id", &format!("spiffe://{TD}")),
            ("--key-out", &p("no/such/x.key")),
            ("--key-out", &inside("x.key")),
            ("--cert-out", &crt),
            ("--cert-out", &inside("x.crt")),
            ("--dns", "bad name"),
            ("--dns", "-x.example"),
        ],
    );
    add(&["issue"], &issue, &ttls("--ttl"));
    let issue_csr = [
        ("--dir", dir.as_str()),
        ("--spiffe-id", id.as_str()),
        ("--cert-out", new_crt.as_str()),
    ];
    add(
        &["issue"],
        &issue_csr,
        &[("--csr", &missing), ("--csr", &junk)],
    );

    add(
        &["inspect", &crt],
        &[],
        &[("--bundle", &missing), ("--bundle", &junk)],
    );
    add(
        &["check"],
        &[("--dir", &dir)],
        &[("--dir", &missing), ("--warn-before", "soon")],
    );
    add(
        &["check"],
        &[("--cert", &crt), ("--bundle", &bundle)],
        &[
            ("--cert", &missing),
            ("--cert", &junk),
            ("--bundle", &missing),
            ("--bundle", &junk),
        ],
    );
    add(
        &["bundle"],
        &[("--dir", &dir)],
        &[("--dir", &missing), ("--format", "der")],
    );
    add(
        &["k8s-secret"],
        &[
            ("--name", "web"),
            ("--cert", &crt),
            ("--key", &key),
            ("--bundle", &bundle),
        ],
        &[
            ("--name", "Bad_Name"),
            ("--namespace", "Bad_NS"),
            ("--cert", &missing),
            ("--cert", &junk),
            ("--key", &junk),
            ("--key", &other_key),
            ("--bundle", &missing),
            ("--bundle", &junk),
        ],
    );
    let rot = [("--dir", dir.as_str())];
    add(&["rotate", "intermediate"], &rot, &[("--dir", &missing)]);
    add(&["rotate", "intermediate"], &rot, &ttls("--ttl"));
    add(&["rotate", "root", "prepare"], &rot, &[("--dir", &missing)]);
    add(&["rotate", "root", "prepare"], &rot, &ttls("--root-ttl"));
    add(
        &["rotate", "root", "prepare"],
        &rot,
        &ttls("--intermediate-ttl"),
    );
    add(
        &["rotate", "root", "activate"],
        &rot,
        &[("--dir", &missing)],
    );
    add(&["rotate", "root", "finish"], &rot, &[("--dir", &missing)]);
    let token = [("--dir", dir.as_str()), ("--spiffe-id", id.as_str())];
    add(
        &["token", "create"],
        &token,
        &[
            ("--dir", &missing),
            ("--spiffe-id", "spiffe://other.org/ns/default/sa/x"),
            ("--spiffe-id", "not-an-id"),
        ],
    );
    add(&["token", "create"], &token, &ttls("--ttl"));

    let (listen, admin) = (addr(), addr());
    let serve = [
        ("--dir", dir.as_str()),
        ("--listen", listen.as_str()),
        ("--admin-listen", admin.as_str()),
    ];
    add(
        &["serve"],
        &serve,
        &[
            ("--dir", &missing),
            ("--spiffe-id", "spiffe://other.org/keyproof-ca"),
            ("--spiffe-id", "not-an-id"),
            ("--dns", "bad name"),
            ("--rate-limit", "lots"),
            ("--log-format", "xml"),
            ("--listen", "nowhere"),
            ("--admin-listen", "nowhere"),
        ],
    );
    add(&["serve"], &serve, &ttls("--ttl"));
    let k8s = [
        ("--dir", dir.as_str()),
        ("--listen", listen.as_str()),
        ("--admin-listen", admin.as_str()),
        ("--k8s-jwks", missing.as_str()),
        ("--k8s-issuer", "https://k8s.example"),
    ];
    add(
        &["serve"],
        &k8s,
        &[
            ("--k8s-jwks", &missing),
            ("--k8s-issuer", "http://k8s.example"),
            ("--k8s-audience", ""),
        ],
    );
    // A certificate that is not due: every input is still checked.
    let renew = [
        ("--cert", crt.as_str()),
        ("--key", key.as_str()),
        ("--bundle", bundle.as_str()),
        ("--ca-url", "https://127.0.0.1:1"),
    ];
    add(
        &["renew"],
        &renew,
        &[
            ("--cert", &missing),
            ("--cert", &junk),
            ("--key", &missing),
            ("--key", &junk),
            ("--key", &other_key),
            ("--bundle", &missing),
            ("--bundle", &junk),
            ("--ca-url", "http://127.0.0.1:1"),
            ("--ca-url", "127.0.0.1:1"),
            ("--server-id", "not an id"),
        ],
    );
    add(
        &["k8s-jwks"],
        &[("--out", &p("jwks.json")), ("--once", "")],
        &[("--interval", "0s")],
    );

    let mut failures = Vec::new();
    for (sub, base, flag, value) in &rows {
        // `--flag=value`, so that a bad value starting with '-' is still
        // the flag's value.
        let bad = format!("{flag}={value}");
        let mut args: Vec<String> = sub.clone();
        for (f, v) in base.iter().filter(|(f, _)| f != flag) {
            args.push(f.clone());
            if !v.is_empty() {
                args.push(v.clone());
            }
        }
        args.push(bad);
        let out = run_bounded(cmd("keyproof-ca").args(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(2) || !err.contains(flag.as_str()) {
            failures.push(format!(
                "{args:?}: exit {:?}, stderr: {err}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Refused means untouched: the CA, and nothing created beside it.
    assert!(tree(&ca.dir) == before, "the CA directory changed");
    for f in ["new-ca", "no", "nowhere", "new.key", "new.crt"] {
        assert!(!ca.path(f).exists(), "{f} was created");
    }
}

#[test]
fn lifetimes_at_their_bounds_are_accepted() {
    // Root 1d..100y, intermediate 1h..100y (not past the root), SVIDs and
    // tokens 1s..100y.
    let ca = TestCa::with_args(TD, &["--root-ttl", "100y", "--intermediate-ttl", "1h"]);
    ca.issue("short", "/ns/default/sa/short", &["--ttl", "1s"]);
    ca.issue("long", "/ns/default/sa/long", &["--ttl", "100y"]);
    let id = format!("spiffe://{TD}/ns/default/sa/t");
    for ttl in ["1s", "100y"] {
        run_ok(
            cmd("keyproof-ca")
                .args(["token", "create", "--spiffe-id", &id, "--ttl", ttl, "--dir"])
                .arg(&ca.dir),
        );
    }
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "intermediate", "--ttl", "100y", "--dir"])
            .arg(&ca.dir),
    );
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "prepare", "--root-ttl", "1d"])
            .args(["--intermediate-ttl", "1d", "--dir"])
            .arg(&ca.dir),
    );
    let small = TestCa::with_args(TD, &["--root-ttl", "1d", "--intermediate-ttl", "1d"]);
    run_ok(cmd("keyproof-ca").args(["check", "--dir"]).arg(&small.dir));
}

/// `--store` URLs in messages: the password is masked however its
/// parameter's name is spelt (tokio-postgres percent-decodes names, so
/// `pass%77ord` is the password), and in the user information.
#[test]
fn a_store_password_is_never_shown_however_its_parameter_is_spelt() {
    let ca = TestCa::new(TD);
    // Nothing listens there: every command fails with the URL in its error.
    let port = free_port();
    for url in [
        format!("postgres://kp@127.0.0.1:{port}/postgres?pass%77ord=SECRET"),
        format!("postgres://kp@127.0.0.1:{port}/postgres?%70assword=SECRET&sslmode=disable"),
        format!("postgres://kp@127.0.0.1:{port}/postgres?PASS%57ORD=SECRET&bogus=1"),
        format!("postgres://kp:SECRET@127.0.0.1:{port}/postgres?ssl%6dode=verify-full"),
        format!("postgres://kp:pa#SECRET@127.0.0.1:{port}/postgres"),
    ] {
        for args in [
            vec!["bundle", "--dir", ca.dir.to_str().unwrap()],
            vec!["migrate", "--schema-only"],
            vec![
                "serve",
                "--dir",
                ca.dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
        ] {
            let out = keyproof_tests::run(cmd("keyproof-ca").args(&args).args(["--store", &url]));
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{args:?} {url}: {all}");
            assert!(!all.contains("SECRET"), "{args:?} {url}: {all}");
            assert!(all.contains("***"), "{args:?} {url}: {all}");
        }
    }
}

/// Round 12 (CA F1, F2): a rotation step killed at any of its renames
/// (SIGKILL injected by strace at the Nth `rename*` call: the OOM killer or
/// a power cut there) leaves a CA directory that the next command finishes
/// or undoes: `check` passes, `issue` signs, the rotation goes on to its
/// end with one root in the bundle, and nothing is left behind (no journal,
/// no `next/`, no temporary file). Each step is killed at every rename it
/// makes, until a run makes them all.
#[test]
fn a_rotation_killed_at_any_rename_leaves_a_ca_that_serves_and_goes_on() {
    if Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is not installed (./test.sh installs it)");
    }
    let rot = |ca: &TestCa, args: &[&str]| {
        run_ok(
            cmd("keyproof-ca")
                .arg("rotate")
                .args(args)
                .arg("--dir")
                .arg(&ca.dir),
        );
    };
    let rotation = |ca: &TestCa| -> String {
        let v: Value =
            serde_json::from_str(&fs::read_to_string(ca.dir.join("ca.json")).unwrap()).unwrap();
        v["rotation"].as_str().unwrap().to_owned()
    };
    // (step, its arguments, the steps before it)
    type Step<'a> = (&'a str, &'a [&'a str], &'a [&'a [&'a str]]);
    let steps: [Step<'_>; 4] = [
        ("intermediate", &["intermediate"], &[]),
        ("prepare", &["root", "prepare"], &[]),
        ("activate", &["root", "activate"], &[&["root", "prepare"]]),
        (
            "finish",
            &["root", "finish", "--force"],
            &[&["root", "prepare"], &["root", "activate"]],
        ),
    ];
    for (name, args, before) in steps {
        let mut n = 1;
        loop {
            let ca = TestCa::new(TD);
            for b in before {
                rot(&ca, b);
            }
            let what = format!("{name} killed at rename {n}");
            let out = run(Command::new("strace")
                .args(["-f", "-qq", "-o", "/dev/null"])
                .args(["-e", "trace=rename,renameat,renameat2"])
                .arg(format!(
                    "--inject=rename,renameat,renameat2:signal=SIGKILL:when={n}"
                ))
                .arg(bin("keyproof-ca"))
                .arg("rotate")
                .args(args)
                .arg("--dir")
                .arg(&ca.dir));
            let finished = out.status.success();
            // Whatever the kill left, the next command takes it from there:
            // `serve` first (second verification VCA4: it starts, without
            // --spiffe-id as the manifests run it), then `check`.
            drop(serve(&ca, &[]));
            let check = run(cmd("keyproof-ca").args(["check", "--dir"]).arg(&ca.dir));
            let said = String::from_utf8_lossy(&check.stdout).into_owned();
            assert!(
                check.status.code().is_some_and(|c| c < 2),
                "{what}: check: {said}{}",
                String::from_utf8_lossy(&check.stderr)
            );
            ca.issue(&format!("after-{n}"), "/ns/default/sa/web", &[]);
            match rotation(&ca).as_str() {
                "prepared" => {
                    rot(&ca, &["root", "activate"]);
                    rot(&ca, &["root", "finish", "--force"]);
                }
                "activated" => rot(&ca, &["root", "finish", "--force"]),
                _ => {}
            }
            let roots = fs::read_to_string(ca.bundle())
                .unwrap()
                .matches("BEGIN CERTIFICATE")
                .count();
            assert_eq!(roots, 1, "{what}");
            let (leaf, _) = ca.issue(&format!("end-{n}"), "/ns/default/sa/web", &[]);
            assert!(openssl_verify(&ca, &leaf).status.success(), "{what}");
            let left: Vec<String> = fs::read_dir(&ca.dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|f| {
                    f.starts_with(".keyproof-tmp") || f == ".keyproof-journal" || f == "next"
                })
                .collect();
            assert!(left.is_empty(), "{what}: left behind: {left:?}");
            if finished {
                break;
            }
            n += 1;
            assert!(n < 40, "{name}: still killed at rename {n}");
        }
        assert!(n > 2, "{name}: only {n} renames: was the kill injected?");
    }
}

/// Runs `keyproof-ca args` under `timeout 20` (an old binary waits on a
/// FIFO forever), with `stdin` fed to it, and returns (exit code, stderr).
fn run_fed(args: &[&std::ffi::OsStr], stdin: Vec<u8>) -> (Option<i32>, String) {
    use std::io::Write;
    let mut child = Command::new("timeout")
        .arg("20")
        .arg(bin("keyproof-ca"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // The binary stops reading at its bound: a broken pipe here is expected.
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_input_files_are_bounded_regular_files() {
    let ca = TestCa::new(TD);
    let (cert, key) = ca.issue("web", "/ns/default/sa/web", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big.pem");
    fs::write(&big, vec![b'A'; 5 * 1024 * 1024]).unwrap();
    let fifo = tmp.path().join("fifo.pem");
    run_ok(Command::new("mkfifo").arg(&fifo));
    let out = tmp.path().join("out.pem");
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let dir = ca.dir.as_os_str();
    let bundle = ca.bundle();
    // (arguments with BAD where the input goes, the flag the error names)
    let cases: Vec<(Vec<&std::ffi::OsStr>, &str)> = vec![
        (
            vec![
                os("issue"),
                os("--dir"),
                dir,
                os("--spiffe-id"),
                os("spiffe://prod.example.com/x"),
                os("--cert-out"),
                out.as_os_str(),
                os("--csr"),
            ],
            "--csr",
        ),
        (vec![os("inspect")], ""),
        (
            vec![
                os("check"),
                os("--bundle"),
                bundle.as_os_str(),
                os("--cert"),
            ],
            "--cert",
        ),
        (
            vec![os("check"), os("--cert"), cert.as_os_str(), os("--bundle")],
            "--bundle",
        ),
        (
            vec![
                os("k8s-secret"),
                os("--name"),
                os("web"),
                os("--bundle"),
                bundle.as_os_str(),
                os("--key"),
                key.as_os_str(),
                os("--cert"),
            ],
            "--cert",
        ),
    ];
    for (args, flag) in cases {
        for (bad, stdin, want) in [
            (big.as_path(), Vec::new(), "larger than"),
            (fifo.as_path(), Vec::new(), "a FIFO"),
            (
                Path::new("/dev/stdin"),
                vec![b'A'; 5 * 1024 * 1024],
                "larger than",
            ),
        ] {
            let mut a = args.clone();
            a.push(bad.as_os_str());
            let (code, err) = run_fed(&a, stdin);
            assert_eq!(code, Some(2), "{a:?}: {err}");
            assert!(err.contains(want), "{a:?}: {err}");
            assert!(
                err.contains(flag) && err.contains(&*bad.to_string_lossy()),
                "{a:?}: the error names the flag and the path: {err}"
            );
        }
    }
    assert!(!out.exists());
}

/// A PIN the token refused is not offered again by the next process
/// either (a crash-looping `serve`, the daily `check`): pkcs11-spy counts
/// the `C_Login` calls that reach the token. A changed PIN file is tried,
/// and works.
#[test]
fn a_refused_pin_is_not_offered_again_by_the_next_process() {
    use keyproof_tests::softhsm::{self, SoftHsm};
    let Some(hsm) = SoftHsm::new("a_refused_pin_across_processes") else {
        return;
    };
    let spy = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";
    if !Path::new(spy).exists() {
        assert!(std::env::var_os("CI").is_none(), "{spy} missing (opensc)");
        eprintln!("SKIP: {spy} missing");
        return;
    }
    let token = hsm.init_token("kpca", "4321-ca");
    let pin = hsm.pin_file("ca.pin", &token.pin);
    let spy_log = hsm.path("spy.log");
    let ca_cmd = |args: &[&str]| {
        let mut c = hsm.command(bin("keyproof-ca"));
        c.env("PKCS11SPY", softhsm::MODULE)
            .env("PKCS11SPY_OUTPUT", &spy_log)
            .args(args);
        c
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    run_ok(
        ca_cmd(&[
            "init",
            "--trust-domain",
            TD,
            "--pkcs11-module",
            spy,
            "--pkcs11-token",
            "kpca",
        ])
        .arg("--dir")
        .arg(&dir)
        .arg("--pin-file")
        .arg(&pin),
    );
    // The PIN changed on the token; the PIN file lags.
    let stale = hsm.pin_file("stale.pin", "0000-old");
    fs::write(&spy_log, "").unwrap();
    let wrong = || {
        fs::read_to_string(&spy_log)
            .unwrap_or_default()
            .matches("CKR_PIN_INCORRECT")
            .count()
    };
    for i in 0..3 {
        let out = keyproof_tests::run(
            ca_cmd(&["check"])
                .arg("--dir")
                .arg(&dir)
                .arg("--pin-file")
                .arg(&stale),
        );
        assert_eq!(out.status.code(), Some(2), "start {i}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if i > 0 {
            assert!(
                stdout.contains("not offered again") || stderr.contains("not offered again"),
                "start {i}: {stdout}{stderr}"
            );
        }
    }
    // serve, too, refuses at start without offering it.
    let out = keyproof_tests::run(
        ca_cmd(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--dir")
        .arg(&dir)
        .arg("--pin-file")
        .arg(&stale),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(wrong(), 1, "the refused PIN was offered more than once");

    // A fixed file is tried, and works.
    fs::write(&stale, format!("{}\n", token.pin)).unwrap();
    let out = keyproof_tests::run(
        ca_cmd(&["check"])
            .arg("--dir")
            .arg(&dir)
            .arg("--pin-file")
            .arg(&stale),
    );
    assert_ne!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(wrong(), 1);
}
