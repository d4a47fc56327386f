//! The workload identity: loading and checking the certificate, key and trust
//! bundle; the rustls configurations built around them; and the certificate
//! verifiers that apply the shared X.509-SVID rules to every peer.
//!
//! The current identity lives in an [`ArcSwap`] inside [`IdentityStore`].
//! rustls reaches it only through [`CertResolver`] (our certificate) and the
//! two verifiers (the bundle), each of which loads the current value per
//! handshake, so a reload (issue 5) is one `store()` call: new handshakes see
//! the new material, established connections are untouched, and no rustls
//! configuration has to be rebuilt.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use keyproof_ca::{keys, svid, IdPattern, SpiffeId, SvidVerifier, TrustBundle, Usage, VerifyError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::config::IdentityConfig;

/// Why the identity could not be loaded; names the configuration key.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read.
    #[error("{key}: cannot read {path}")]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The path.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The material is unusable.
    #[error("{key}: {msg}")]
    Invalid {
        /// The configuration key naming the file.
        key: &'static str,
        /// What is wrong.
        msg: String,
    },
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        key,
        path: path.display().to_string(),
        source,
    })
}

fn invalid(key: &'static str, msg: impl fmt::Display) -> IdentityError {
    IdentityError::Invalid {
        key,
        msg: msg.to_string(),
    }
}

/// A trust root as shown on `/identity`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RootInfo {
    /// Subject DN.
    pub subject: String,
    /// SHA-256 of the root's DER, hex.
    pub sha256: String,
    /// notAfter, RFC 3339.
    pub not_after: String,
}

/// One loaded, verified identity.
pub struct Identity {
    /// Our SPIFFE ID.
    pub id: SpiffeId,
    /// Certificate chain and signing key, as rustls wants them.
    pub certified: Arc<CertifiedKey>,
    /// Verifies peers against our trust bundle and trust domain.
    pub verifier: SvidVerifier,
    /// Leaf serial, hex.
    pub serial: String,
    /// Leaf notAfter, seconds since the epoch.
    pub not_after: i64,
    /// The bundle's roots, for `/identity`.
    pub roots: Vec<RootInfo>,
    /// The workload key as loaded (PKCS#8, SEC1 or PKCS#1 DER), for the
    /// step-up signer; swapped with the rest of the identity on reload.
    /// Never logged: `Debug` for `Identity` omits it.
    pub key_der: rustls_pki_types::PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    // Hand-written so that the signing key can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id.as_str())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn rfc3339(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ts.to_string())
}

impl Identity {
    /// Loads the files named by `[identity]` and checks that they form a
    /// usable identity: the key matches the leaf, and the leaf is a valid
    /// X.509-SVID chaining to the bundle for the directions in `usages`.
    pub fn load(cfg: &IdentityConfig, usages: &[Usage]) -> Result<Identity, IdentityError> {
        const BUNDLE: &str = "identity.trust_bundle";
        const CERT: &str = "identity.files.cert";
        const KEY: &str = "identity.files.key";
        let bundle_pem = read(BUNDLE, &cfg.trust_bundle)?;
        let bundle = TrustBundle::from_pem(&bundle_pem).map_err(|e| invalid(BUNDLE, e))?;
        let mut roots = Vec::with_capacity(bundle.roots().len());
        for r in bundle.roots() {
            let (_, parsed) = x509_parser::parse_x509_certificate(r)
                .map_err(|e| invalid(BUNDLE, format!("root does not parse: {e}")))?;
            roots.push(RootInfo {
                subject: parsed.subject().to_string(),
                sha256: keys::fingerprint(r),
                not_after: rfc3339(parsed.validity().not_after.timestamp()),
            });
        }
        let chain = keys::certs_from_pem(&read(CERT, &cfg.cert)?).map_err(|e| invalid(CERT, e))?;
        let key_der =
            keys::private_key_from_pem(&read(KEY, &cfg.key)?).map_err(|e| invalid(KEY, e))?;
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der)
            .map_err(|e| invalid(KEY, format!("unsupported private key: {e}")))?;
        let leaf = chain[0].clone();
        let id = svid::check_leaf_der(&leaf)
            .map_err(|e| invalid(CERT, format!("not a valid X.509-SVID: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf)
            .map_err(|e| invalid(CERT, format!("certificate does not parse: {e}")))?;
        let serial = hex::encode(parsed.raw_serial());
        let verifier = SvidVerifier::new(id.trust_domain(), bundle);
        let now = UnixTime::now();
        let mut not_after = parsed.validity().not_after.timestamp();
        for usage in usages {
            let v = verifier
                .verify(&leaf, &chain[1..], now, *usage)
                .map_err(|e| invalid(CERT, format!("does not verify against {BUNDLE}: {e}")))?;
            not_after = v.not_after;
        }
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| invalid(KEY, format!("private key does not match {CERT}: {e}")))?;
        Ok(Identity {
            key_der,
            id,
            certified: Arc::new(certified),
            verifier,
            serial,
            not_after,
            roots,
        })
    }

    /// `/identity` as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "spiffe_id": self.id.as_str(),
            "serial": self.serial,
            "not_after": rfc3339(self.not_after),
            "not_after_unix": self.not_after,
            "trust_domain": self.verifier.trust_domain().as_str(),
            "trust_roots": self.roots,
        })
    }
}

/// Holds the current identity; swapped atomically on reload.
#[derive(Debug)]
pub struct IdentityStore {
    current: ArcSwap<Identity>,
}

impl IdentityStore {
    /// A store holding `identity`.
    pub fn new(identity: Identity) -> Arc<IdentityStore> {
        Arc::new(IdentityStore {
            current: ArcSwap::from_pointee(identity),
        })
    }

    /// The identity in use now.
    pub fn current(&self) -> Arc<Identity> {
        self.current.load_full()
    }

    /// Replaces the identity for every later handshake (hot reload).
    pub fn replace(&self, identity: Identity) {
        self.current.store(Arc::new(identity));
    }
}

/// Why a peer's certificate was refused, carried through rustls's error so
/// the accept loop can count and log it.
#[derive(Debug, Clone)]
pub struct PeerRejected {
    /// The `result` label.
    pub reason: &'static str,
    /// Human explanation.
    pub message: String,
    /// The peer's SPIFFE ID, when its certificate named one.
    pub peer_id: Option<String>,
}

impl fmt::Display for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PeerRejected {}

fn reject(reason: &'static str, message: String, leaf: &CertificateDer<'_>) -> rustls::Error {
    let peer_id = x509_parser::parse_x509_certificate(leaf)
        .ok()
        .and_then(|(_, c)| svid::spiffe_id_of(&c).ok())
        .map(|id| id.to_string());
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        PeerRejected {
            reason,
            message,
            peer_id,
        },
    ))))
}

fn verify_error(e: VerifyError, leaf: &CertificateDer<'_>) -> rustls::Error {
    reject(e.reason(), e.to_string(), leaf)
}

/// A failed TLS handshake, classified for metrics and logs.
#[derive(Debug, Clone)]
pub struct HandshakeFailure {
    /// The `result` label.
    pub reason: &'static str,
    /// Human explanation.
    pub message: String,
    /// The peer's SPIFFE ID when known.
    pub peer_id: Option<String>,
}

/// Classifies the error of a failed handshake.
pub fn classify(err: &io::Error) -> HandshakeFailure {
    let tls = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) => {
            match inner.downcast_ref::<PeerRejected>() {
                Some(p) => HandshakeFailure {
                    reason: p.reason,
                    message: p.message.clone(),
                    peer_id: p.peer_id.clone(),
                },
                None => HandshakeFailure {
                    reason: "protocol",
                    message: inner.to_string(),
                    peer_id: None,
                },
            }
        }
        Some(rustls::Error::NoCertificatesPresented) => HandshakeFailure {
            reason: "no_client_cert",
            message: "peer sent no client certificate".into(),
            peer_id: None,
        },
        Some(rustls::Error::InvalidCertificate(e)) => HandshakeFailure {
            reason: "unknown_ca",
            message: format!("invalid certificate: {e:?}"),
            peer_id: None,
        },
        Some(other) => HandshakeFailure {
            reason: "protocol",
            message: other.to_string(),
            peer_id: None,
        },
        None => HandshakeFailure {
            reason: "protocol",
            message: err.to_string(),
            peer_id: None,
        },
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Presents the current identity's certificate, on both sides.
#[derive(Debug)]
pub struct CertResolver {
    store: Arc<IdentityStore>,
}

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.store.current.load().certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.store.current.load().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Inbound: requires a client certificate that is a valid X.509-SVID of our
/// trust domain, chaining to the current bundle.
#[derive(Debug)]
pub struct SvidClientVerifier {
    store: Arc<IdentityStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would leak the bundle and are useless: a workload has one cert.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = self.store.current.load();
        id.verifier
            .verify(end_entity, intermediates, now, Usage::ClientAuth)
            .map_err(|e| verify_error(e, end_entity))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Outbound: the server must present a valid X.509-SVID of our trust domain
/// whose ID matches the upstream's `identity`. DNS names play no part.
#[derive(Debug)]
pub struct SvidServerVerifier {
    store: Arc<IdentityStore>,
    expected: IdPattern,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.store.current.load();
        let v = id
            .verifier
            .verify(end_entity, intermediates, now, Usage::ServerAuth)
            .map_err(|e| verify_error(e, end_entity))?;
        if !self.expected.matches(&v.spiffe_id) {
            return Err(reject(
                "identity_mismatch",
                format!(
                    "peer identity mismatch: expected {}, got {}",
                    self.expected, v.spiffe_id
                ),
                end_entity,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The inbound server configuration: TLS 1.3 only, client certificate
/// required, ALPN h2 and http/1.1, no session resumption (a resumed session
/// would skip the verifier, and with it expiry and bundle changes).
pub fn server_config(store: &Arc<IdentityStore>) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(SvidClientVerifier {
        store: store.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CertResolver {
            store: store.clone(),
        }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// An outbound client configuration for one upstream, offering `alpn`.
pub fn client_config(
    store: &Arc<IdentityStore>,
    expected: IdPattern,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(SvidServerVerifier {
        store: store.clone(),
        expected,
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CertResolver {
            store: store.clone(),
        }));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// What the inbound knows about a verified caller, computed once per
/// connection right after the handshake.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The caller's SPIFFE ID.
    pub id: SpiffeId,
    /// SHA-256 of the caller's leaf certificate DER.
    pub cert_sha256: [u8; 32],
    /// SHA-256 of the caller's SubjectPublicKeyInfo DER (the step-up key id).
    pub spki_sha256: [u8; 32],
    /// The caller's leaf certificate, for the step-up verifier's public key.
    pub leaf: CertificateDer<'static>,
}

impl PeerIdentity {
    /// Extracts the verified peer from a finished handshake's certificates.
    /// `None` only if the verifier's accepted chain no longer parses, which
    /// would be a bug; the caller refuses the connection then.
    pub fn from_certs(certs: Option<&[CertificateDer<'static>]>) -> Option<PeerIdentity> {
        let leaf = certs?.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
        let id = svid::spiffe_id_of(&parsed).ok()?;
        Some(PeerIdentity {
            id,
            cert_sha256: keys::sha256(leaf),
            spki_sha256: keys::sha256(parsed.public_key().raw),
            leaf: leaf.clone(),
        })
    }
}
