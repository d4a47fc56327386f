//! SoftHSM2 for the end-to-end tests: a software PKCS#11 token per test, so
//! that sidecars and the CA can be run on keys they cannot read.
//!
//! Every [`SoftHsm`] has its own configuration and token directory in a
//! temp dir; children see it through `SOFTHSM2_CONF` ([`SoftHsm::env`],
//! passed with `Command::env`), never through the test process's own
//! environment (tests run in parallel threads). Tokens are made with
//! `softhsm2-util` and keys with `pkcs11-tool` (OpenSC), the tools an
//! operator would use, not with keyproof's own PKCS#11 code.
//!
//! SoftHSM2 keeps each token in one directory under `directories.tokendir`;
//! [`SoftHsm::remove_token`] renames that directory away (operations on
//! the token fail, as when a device is pulled) and [`RemovedToken::put_back`]
//! renames it back.
//!
//! When SoftHSM2 or OpenSC is not installed, [`SoftHsm::new`] prints a SKIP
//! line and returns `None`; with `CI` set it panics instead, so that a CI
//! image without them fails rather than passes silently.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The SoftHSM2 PKCS#11 module as Debian installs it.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The Security Officer PIN of every test token (only token set-up uses it).
const SO_PIN: &str = "5o-pin-1234";

/// A number unique in this process, for scratch file names.
fn unique() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One SoftHSM2 installation: a configuration file and a token directory.
pub struct SoftHsm {
    tmp: tempfile::TempDir,
    conf: PathBuf,
    tokendir: PathBuf,
}

/// A token made by [`SoftHsm::init_token`].
#[derive(Clone, Debug)]
pub struct Token {
    /// `CKA_LABEL` of the token.
    pub label: String,
    /// The user PIN.
    pub pin: String,
}

/// A key pair generated in a token by [`SoftHsm::keygen`]: what the test
/// knows of it is its labels and its public key.
#[derive(Clone, Debug)]
pub struct TokenKey {
    /// The token.
    pub token: Token,
    /// `CKA_LABEL` of the private and public key objects.
    pub label: String,
    /// The public key, DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
}

/// A token whose directory was renamed away; it comes back with
/// [`RemovedToken::put_back`] or when this is dropped.
pub struct RemovedToken {
    dir: PathBuf,
    away: PathBuf,
    back: bool,
}

impl RemovedToken {
    /// Renames the token's directory back: the token is present again.
    pub fn put_back(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        if !self.back {
            fs::rename(&self.away, &self.dir).expect("put the token directory back");
            self.back = true;
        }
    }
}

impl Drop for RemovedToken {
    fn drop(&mut self) {
        if !self.back {
            let _ = fs::rename(&self.away, &self.dir);
        }
    }
}

/// Whether SoftHSM2 and OpenSC are here; `Err` names what is missing.
fn installed() -> Result<(), String> {
    let mut missing = Vec::new();
    if !Path::new(MODULE).exists() {
        missing.push(format!("{MODULE} (softhsm2)"));
    }
    for tool in ["softhsm2-util", "pkcs11-tool", "openssl"] {
        if !crate::have(tool) {
            missing.push(tool.to_owned());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(", "))
    }
}

fn run_checked(c: &mut Command, what: &str) -> Output {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("could not run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl SoftHsm {
    /// A fresh SoftHSM2 with no token, or `None` (after printing a SKIP
    /// line for `test`) when SoftHSM2/OpenSC are not installed. Panics in
    /// that case when `CI` is set.
    pub fn new(test: &str) -> Option<SoftHsm> {
        if let Err(missing) = installed() {
            if std::env::var_os("CI").is_some() {
                panic!("{test}: SoftHSM2/OpenSC missing ({missing}); ./test.sh installs softhsm2 and opensc");
            }
            eprintln!("SKIP {test}: SoftHSM2/OpenSC missing ({missing})");
            return None;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let tokendir = tmp.path().join("tokens");
        fs::create_dir(&tokendir).expect("token dir");
        let conf = tmp.path().join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokendir.display()
            ),
        )
        .expect("write softhsm2.conf");
        Some(SoftHsm {
            tmp,
            conf,
            tokendir,
        })
    }

    /// `("SOFTHSM2_CONF", path)`, for `Command::env` on every child that
    /// loads the module.
    pub fn env(&self) -> (&'static str, PathBuf) {
        ("SOFTHSM2_CONF", self.conf.clone())
    }

    /// The module path, as configuration files name it.
    pub fn module(&self) -> &'static str {
        MODULE
    }

    /// A path in this SoftHSM's temp dir (for PIN files and the like).
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// A command with `SOFTHSM2_CONF` set.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        let (k, v) = self.env();
        c.env(k, v);
        c
    }

    /// `softhsm2-util --init-token --free --label LABEL`, with user PIN `pin`.
    pub fn init_token(&self, label: &str, pin: &str) -> Token {
        run_checked(
            self.command("softhsm2-util").args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                SO_PIN,
                "--pin",
                pin,
            ]),
            "softhsm2-util --init-token",
        );
        Token {
            label: label.to_owned(),
            pin: pin.to_owned(),
        }
    }

    fn pkcs11_tool(&self, token: &Token) -> Command {
        let mut c = self.command("pkcs11-tool");
        c.args([
            "--module",
            MODULE,
            "--token-label",
            &token.label,
            "--login",
            "--pin",
            &token.pin,
        ]);
        c
    }

    /// `pkcs11-tool --keypairgen --key-type KIND --label LABEL` in `token`
    /// (`KIND` e.g. `EC:prime256v1`); returns the key with its public key.
    pub fn keygen(&self, token: &Token, label: &str, kind: &str) -> TokenKey {
        run_checked(
            self.pkcs11_tool(token)
                .args(["--keypairgen", "--key-type", kind, "--label", label]),
            "pkcs11-tool --keypairgen",
        );
        let spki = self
            .public_key(token, label)
            .expect("the public key just generated");
        TokenKey {
            token: token.clone(),
            label: label.to_owned(),
            spki,
        }
    }

    /// The public key (DER SPKI, whatever form `pkcs11-tool` writes it in)
    /// labelled `label` in `token`, or `None`
    /// when the token holds no such public key.
    pub fn public_key(&self, token: &Token, label: &str) -> Option<Vec<u8>> {
        let out = self.path(&format!("pub-{}.der", unique()));
        let st = self
            .pkcs11_tool(token)
            .args(["--read-object", "--type", "pubkey", "--label", label, "-o"])
            .arg(&out)
            .output()
            .expect("run pkcs11-tool --read-object");
        let bytes = fs::read(&out).ok();
        let _ = fs::remove_file(&out);
        if !st.status.success() {
            return None;
        }
        // OpenSC writes EC keys as DER but EdDSA keys as PEM.
        bytes.map(|b| match std::str::from_utf8(&b) {
            Ok(text) if text.starts_with("-----BEGIN") => {
                use base64::Engine;
                let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("PEM public key")
            }
            _ => b,
        })
    }

    /// The objects in `token` as (class, label) pairs, e.g.
    /// `("Private Key", "workload")`.
    pub fn objects(&self, token: &Token) -> Vec<(String, String)> {
        let out = run_checked(
            self.pkcs11_tool(token).arg("--list-objects"),
            "pkcs11-tool --list-objects",
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut v = Vec::new();
        let mut class = None;
        for line in text.lines() {
            if let Some((c, _)) = line.split_once(" Object;") {
                class = Some(c.trim().to_owned());
            } else if let (Some(c), Some(l)) = (&class, line.trim().strip_prefix("label:")) {
                v.push((c.clone(), l.trim().to_owned()));
                class = None;
            }
        }
        v
    }

    /// Labels of the private keys in `token`.
    pub fn private_keys(&self, token: &Token) -> Vec<String> {
        self.objects(token)
            .into_iter()
            .filter(|(c, _)| c == "Private Key")
            .map(|(_, l)| l)
            .collect()
    }

    /// Writes `pin` (with a newline, as `echo` would) to a 0600 file.
    pub fn pin_file(&self, name: &str, pin: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, format!("{pin}\n")).expect("write PIN file");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod PIN file");
        p
    }

    /// The directory SoftHSM2 keeps the token labelled `label` in (its
    /// `token.object` holds the label, space-padded to 32 bytes).
    pub fn token_dir(&self, label: &str) -> PathBuf {
        let mut padded = label.as_bytes().to_vec();
        padded.resize(32, b' ');
        for e in fs::read_dir(&self.tokendir)
            .expect("read token dir")
            .flatten()
        {
            let obj = e.path().join("token.object");
            if let Ok(bytes) = fs::read(&obj) {
                if bytes.windows(padded.len()).any(|w| w == padded.as_slice()) {
                    return e.path();
                }
            }
        }
        panic!(
            "no token labelled {label:?} under {}",
            self.tokendir.display()
        );
    }

    /// Takes the token labelled `label` away (renames its directory out of
    /// the token directory): operations on it fail until it is put back.
    pub fn remove_token(&self, label: &str) -> RemovedToken {
        let dir = self.token_dir(label);
        let away = self.tmp.path().join(format!(
            "removed-{}",
            dir.file_name().unwrap().to_string_lossy()
        ));
        fs::rename(&dir, &away).expect("rename the token directory away");
        RemovedToken {
            dir,
            away,
            back: false,
        }
    }

    /// An ECDSA P-256 signature (DER) over SHA-256 of `msg` by the key, made
    /// by `pkcs11-tool` (SoftHSM2 has `CKM_ECDSA` only: the digest is made
    /// here).
    pub fn sign_der(&self, key: &TokenKey, msg: &[u8]) -> Vec<u8> {
        let n = unique();
        let (input, output) = (
            self.path(&format!("tbs-{n}")),
            self.path(&format!("sig-{n}")),
        );
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
        fs::write(&input, digest.as_ref()).expect("write digest");
        run_checked(
            self.pkcs11_tool(&key.token)
                .args([
                    "--sign",
                    "--mechanism",
                    "ECDSA",
                    "--signature-format",
                    "openssl",
                    "--label",
                    &key.label,
                    "--input-file",
                ])
                .arg(&input)
                .arg("--output-file")
                .arg(&output),
            "pkcs11-tool --sign",
        );
        let sig = fs::read(&output).expect("read signature");
        let _ = fs::remove_file(&input);
        let _ = fs::remove_file(&output);
        sig
    }

    /// A PEM CSR for `spiffe_id` signed in the token by `key` (P-256), for
    /// `keyproof-ca issue --csr` or the CA library.
    pub fn csr_pem(&self, key: &TokenKey, spiffe_id: &str) -> String {
        let signer = TokenSigner {
            hsm: self,
            key,
            point: key.ec_point().to_vec(),
        };
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names.push(rcgen::SanType::URI(
            spiffe_id.try_into().expect("SPIFFE ID as a URI"),
        ));
        params
            .serialize_request(&signer)
            .expect("CSR signed in the token")
            .pem()
            .expect("CSR PEM")
    }
}

impl TokenKey {
    /// The uncompressed EC point of a P-256 key (the last 65 bytes of its
    /// SPKI).
    pub fn ec_point(&self) -> &[u8] {
        assert!(
            self.spki.len() >= 65 && self.spki[self.spki.len() - 65] == 0x04,
            "not an uncompressed P-256 public key"
        );
        &self.spki[self.spki.len() - 65..]
    }

    /// The public key as PEM.
    pub fn spki_pem(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.spki);
        let mut s = String::from("-----BEGIN PUBLIC KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(chunk).expect("base64"));
            s.push('\n');
        }
        s.push_str("-----END PUBLIC KEY-----\n");
        s
    }
}

/// rcgen's view of a token key: signatures through `pkcs11-tool`.
struct TokenSigner<'a> {
    hsm: &'a SoftHsm,
    key: &'a TokenKey,
    point: Vec<u8>,
}

impl rcgen::PublicKeyData for TokenSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for TokenSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.hsm.sign_der(self.key, msg))
    }
}

/// Every file under `dir` (recursively) whose name ends in `.key`.
pub fn key_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "key") {
                found.push(p);
            }
        }
    }
    found.sort();
    found
}

/// A certificate for a key held in a token: the chain on disk, no key file.
#[derive(Clone, Debug)]
pub struct TokenCert {
    /// PEM chain (leaf, intermediate).
    pub crt: PathBuf,
    /// The leaf DER.
    pub leaf: Vec<u8>,
}

/// Issues an SVID for `path` (DNS SAN `localhost`, an hour) from the test
/// PKI to the token key: a CSR signed in the token, verified and certified
/// by the CA library as `keyproof-ca issue --csr` would.
pub fn certify(
    hsm: &SoftHsm,
    pki: &crate::proxy_support::Pki,
    name: &str,
    path: &str,
    key: &TokenKey,
) -> TokenCert {
    use keyproof_ca::issue::IssueRequest;
    let id = pki.id(path);
    let pem = hsm.csr_pem(key, &id);
    let der = keyproof_ca::csr::decode(pem.as_bytes()).expect("CSR decodes");
    let subject = keyproof_ca::csr::verify(&der).expect("the token's CSR verifies");
    let issued = pki
        .ca
        .issue(
            &IssueRequest {
                spiffe_id: keyproof_identity::SpiffeId::parse(&id).expect("id"),
                key: subject,
                ttl: std::time::Duration::from_secs(3600),
                dns: vec!["localhost".into()],
            },
            "pkcs11 tests",
        )
        .expect("issue to the token key");
    let crt = pki.path(&format!("{name}.crt"));
    fs::write(&crt, issued.chain_pem()).expect("write crt");
    TokenCert {
        crt,
        leaf: issued.leaf.to_vec(),
    }
}
