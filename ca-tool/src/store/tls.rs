//! The database URL as libpq reads it, and TLS to the database.
//!
//! `tokio-postgres` parses libpq URLs but knows only `disable`, `prefer`
//! and `require` for `sslmode` and refuses `sslrootcert`; verification is
//! the TLS connector's business. So the two parameters are taken out here
//! and turned into a rustls client configuration (aws-lc-rs) that does what
//! libpq does: `prefer`/`require` encrypt without verifying (unless
//! `require` is given `sslrootcert`, which libpq then treats as
//! `verify-ca`), `verify-ca` checks the chain against `sslrootcert`,
//! `verify-full` the chain and the host name. There are no built-in roots:
//! `verify-*` needs `sslrootcert`.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};

use super::{mask_password, StoreError};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A `--store` URL made ready for `tokio-postgres`.
pub struct DbUrl {
    /// What `tokio-postgres` is given.
    pub config: tokio_postgres::Config,
    /// The TLS connector (used unless `sslmode=disable`).
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// The URL with its password masked.
    pub masked: String,
}

fn bad(url: &str, msg: impl Into<String>) -> StoreError {
    StoreError::BadUrl {
        url: mask_password(url),
        msg: msg.into(),
    }
}

/// `%XX` decoding of a query value (`+` stays `+`, as libpq reads it).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `url`: `sslmode` and `sslrootcert` are handled here, the rest by
/// `tokio-postgres` (which refuses parameters it does not know).
pub fn parse(url: &str) -> Result<DbUrl, StoreError> {
    // The query as tokio-postgres finds it (after the first `@`, if any),
    // so that the parameters taken out here are the ones it would read.
    let query = super::url_parts(url).and_then(|p| p.query);
    let (base, query) = match query {
        Some(q) => (&url[..url.len() - q.len() - 1], q),
        None => (url, ""),
    };
    let mut mode = SslMode::Prefer;
    let mut rootcert: Option<PathBuf> = None;
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|p| !p.is_empty()) {
        let (raw, v) = kv.split_once('=').unwrap_or((kv, ""));
        // tokio-postgres decodes parameter names (`ssl%6dode` is
        // `sslmode`): so are they here, or such a spelling would reach it
        // unchecked.
        let k = super::percent_decode_lossy(raw);
        match k.as_str() {
            "sslmode" => {
                mode = match super::percent_decode_lossy(v).as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(bad(
                            url,
                            format!(
                                "sslmode={other}: use disable, prefer, require, verify-ca or \
                                 verify-full"
                            ),
                        ))
                    }
                }
            }
            "sslrootcert" => {
                let p = percent_decode(v)
                    .ok_or_else(|| bad(url, "sslrootcert: bad percent-encoding"))?;
                rootcert = Some(PathBuf::from(p));
            }
            "sslcert" | "sslkey" | "sslpassword" | "sslcrl" => {
                return Err(bad(
                    url,
                    format!("{k}: client certificates to the database are not supported"),
                ))
            }
            _ => rest.push(kv),
        }
    }
    let stripped = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config = tokio_postgres::Config::from_str(&stripped)
        .map_err(|e| bad(url, format!("not a PostgreSQL URL: {e}")))?;
    if config.get_hosts().is_empty() {
        return Err(bad(url, "names no host"));
    }
    config.ssl_mode(match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    let roots = match &rootcert {
        Some(path) => Some(read_roots(url, path)?),
        None => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(bad(
                url,
                "sslmode=verify-ca and verify-full need sslrootcert=FILE (the CA certificates \
                 that sign the database's certificate)",
            ))
        }
        (SslMode::VerifyFull, Some(r)) => webpki(url, r)?,
        (SslMode::VerifyCa | SslMode::Require, Some(r)) => Arc::new(ChainOnly(webpki(url, r)?)),
        _ => Arc::new(NoVerify(provider())),
    };
    let tls = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(url, format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(DbUrl {
        config,
        tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        masked: mask_password(url),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Largest `sslrootcert` read: a CA bundle, even a public one, is well
/// under this.
const MAX_ROOTS_BYTES: u64 = 4 * 1024 * 1024;

/// Reads a regular file of at most [`MAX_ROOTS_BYTES`]: a FIFO would block
/// the connect forever and a device (`/dev/zero`) fill the memory.
fn read_limited(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    crate::fsutil::read_regular(path, MAX_ROOTS_BYTES).map(|(_, data)| data)
}

fn read_roots(url: &str, path: &std::path::Path) -> Result<rustls::RootCertStore, StoreError> {
    let pem =
        read_limited(path).map_err(|e| bad(url, format!("sslrootcert {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| bad(url, format!("sslrootcert {}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| bad(url, format!("sslrootcert {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(bad(
            url,
            format!("sslrootcert {}: no PEM certificate in it", path.display()),
        ));
    }
    Ok(roots)
}

fn webpki(
    url: &str,
    roots: rustls::RootCertStore,
) -> Result<Arc<WebPkiServerVerifier>, StoreError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| bad(url, format!("sslrootcert: {e}")))
}

/// `sslmode=prefer`/`require` without `sslrootcert`: encrypted, not
/// authenticated (what libpq does). The handshake signature is still
/// checked against the certificate presented.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to `sslrootcert`; the name in
/// the certificate is not compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked after the chain: a name error means the
        // chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_parameters_are_taken_out() {
        let u = parse("postgres://ca:pw@db:5433/k?sslmode=require&application_name=x").unwrap();
        assert_eq!(
            u.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(u.config.get_application_name(), Some("x"));
        assert_eq!(
            u.masked,
            "postgres://ca:***@db:5433/k?sslmode=require&application_name=x"
        );
    }

    #[test]
    fn parameter_names_are_read_decoded_and_a_password_never_shown() {
        let u = parse("postgres://kp@db/k?pass%77ord=SECRET&ssl%6Dode=disable").unwrap();
        assert_eq!(
            u.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        assert_eq!(u.config.get_password(), Some(&b"SECRET"[..]));
        assert_eq!(
            u.masked,
            "postgres://kp@db/k?pass%77ord=***&ssl%6Dode=disable"
        );
        // An encoded sslmode is checked like a plain one.
        let e = parse("postgres://kp@db/k?pass%77ord=SECRET&ssl%6dode=verify%2Dfull")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("need sslrootcert"), "{e}");
        assert!(!e.contains("SECRET"), "{e}");
        // Errors from tokio-postgres's own parsing show the masked URL.
        let e = parse("postgres://kp@db/k?pass%77ord=SECRET&bogus=1")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("pass%77ord=***"), "{e}");
        assert!(!e.contains("SECRET"), "{e}");
    }

    #[test]
    fn verify_modes_need_a_root_file() {
        let e = parse("postgres://ca:pw@db/k?sslmode=verify-full")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sslrootcert") && !e.contains("pw@"), "{e}");
        let e = parse("postgres://ca:pw@db/k?sslmode=verify-ca&sslrootcert=%2Fnone")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sslrootcert /none"), "{e}");
        let e = parse("postgres://ca:pw@db/k?sslmode=bogus")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sslmode=bogus"), "{e}");
        let e = parse("postgres://ca:pw@db/k?frobnicate=1")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--store") && !e.contains(":pw"), "{e}");
    }

    #[test]
    fn sslrootcert_must_be_a_small_regular_file() {
        let e = read_limited(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        // Refused at once, never waited on.
        let e = read_limited(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; (MAX_ROOTS_BYTES + 1) as usize]).unwrap();
        let e = read_limited(&big).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
