//! The workload identity: loading and checking the certificate, key and trust
//! bundle; the rustls configurations built around them; and the certificate
//! verifiers that apply the shared X.509-SVID rules to every peer.
//!
//! The current identity lives in an [`ArcSwapOption`] inside
//! [`IdentityStore`] (empty only before an `[identity.ca]` bootstrap). rustls
//! reaches it only through [`CertResolver`] (our certificate) and the two
//! verifiers (the bundle), each of which loads the current value per
//! handshake, so a reload or renewal is one [`IdentityStore::replace`]: new
//! handshakes see the new material, established connections are untouched,
//! and no rustls configuration has to be rebuilt. Both sources build the
//! identity with [`Identity::from_parts`], so file and CA material pass the
//! same checks.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use keyproof_identity::tls::{PeerPolicy, Refusal, SvidClientVerifier, SvidServerVerifier};
use keyproof_identity::{
    keys, svid, IdPattern, SpiffeId, SvidVerifier, TrustBundle, Usage, VerifyError,
};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, OtherError, SignatureScheme};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::config::{IdentityConfig, IdentitySource};

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

/// Why certificate material (from files or from the CA) is unusable.
/// [`MaterialError::reason`] is the `result` label of
/// `keyproof_identity_reloads_total`.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// A file could not be read (missing during an update, permissions).
    #[error("cannot read {0}")]
    Unreadable(String),
    /// The trust bundle does not parse or has no usable root.
    #[error("trust bundle: {0}")]
    Bundle(String),
    /// The certificate chain does not parse, or the leaf is not an SVID.
    #[error("{0}")]
    Cert(String),
    /// The private key does not parse or is of an unsupported type.
    #[error("{0}")]
    Key(String),
    /// The key is not the one the leaf certifies.
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// The leaf names another trust domain.
    #[error("SPIFFE ID {got} is not in trust domain {expected}")]
    ForeignTrustDomain {
        /// Ours.
        expected: String,
        /// The new leaf's ID.
        got: String,
    },
    /// The leaf names another workload of our trust domain.
    #[error("SPIFFE ID {got} differs from {expected}; an identity change needs a restart")]
    IdChanged {
        /// Ours.
        expected: String,
        /// The new leaf's ID.
        got: String,
    },
    /// The chain does not verify against the (new) bundle.
    #[error("does not verify against the trust bundle: {0}")]
    Verify(VerifyError),
}

impl MaterialError {
    /// The `result` label.
    pub fn reason(&self) -> &'static str {
        match self {
            MaterialError::Unreadable(_) => "unreadable",
            MaterialError::Bundle(_) | MaterialError::Cert(_) | MaterialError::Key(_) => "invalid",
            MaterialError::KeyMismatch => "key_mismatch",
            MaterialError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            MaterialError::IdChanged { .. } => "id_changed",
            MaterialError::Verify(v) => match v {
                VerifyError::Expired => "expired",
                VerifyError::NotYetValid => "not_yet_valid",
                VerifyError::ForeignTrustDomain { .. } => "foreign_trust_domain",
                VerifyError::Svid(_) => "invalid",
                _ => "unknown_ca",
            },
        }
    }

    /// The `[identity.files]` key the problem is about, for startup errors.
    fn files_key(&self) -> &'static str {
        match self {
            MaterialError::Bundle(_) => "identity.trust_bundle",
            MaterialError::Key(_) | MaterialError::KeyMismatch => "identity.files.key",
            _ => "identity.files.cert",
        }
    }
}

/// Parses PEM material into the chain, the key and the bundle roots.
pub fn parse_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    bundle_pem: &[u8],
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        Vec<CertificateDer<'static>>,
    ),
    MaterialError,
> {
    let roots =
        keys::certs_from_pem(bundle_pem).map_err(|e| MaterialError::Bundle(e.to_string()))?;
    let chain = keys::certs_from_pem(cert_pem)
        .map_err(|e| MaterialError::Cert(format!("certificate: {e}")))?;
    let key = keys::private_key_from_pem(key_pem)
        .map_err(|e| MaterialError::Key(format!("private key: {e}")))?;
    Ok((chain, key, roots))
}

/// A digest of exactly this chain, key and bundle: equal digests mean
/// nothing changed. Hashed in place, so no extra copy of the key is made.
pub fn material_digest(
    chain: &[CertificateDer<'_>],
    key: &PrivateKeyDer<'_>,
    roots: &[CertificateDer<'_>],
) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut part = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_be_bytes());
        ctx.update(b);
    };
    part(b"chain");
    chain.iter().for_each(|c| part(c));
    part(b"key");
    part(key.secret_der());
    part(b"roots");
    roots.iter().for_each(|r| part(r));
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A certificate of the presented chain, as shown on `/identity`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChainCertInfo {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// SHA-256 of the DER, hex.
    pub sha256: String,
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
    /// Leaf notBefore, seconds since the epoch.
    pub not_before: i64,
    /// The bundle's roots, for `/identity`.
    pub roots: Vec<RootInfo>,
    /// The presented chain, for `/identity`.
    pub chain: Vec<ChainCertInfo>,
    /// [`material_digest`] of this identity, to tell a real change.
    pub material: [u8; 32],
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
    /// Loads the files named by `[identity.files]` and checks that they form
    /// a usable identity: the key matches the leaf, and the leaf is a valid
    /// X.509-SVID chaining to the bundle for the directions in `usages`.
    /// Errors name the configuration key.
    pub fn load(cfg: &IdentityConfig, usages: &[Usage]) -> Result<Identity, IdentityError> {
        const BUNDLE: &str = "identity.trust_bundle";
        const CERT: &str = "identity.files.cert";
        const KEY: &str = "identity.files.key";
        let IdentitySource::Files(files) = &cfg.source else {
            return Err(invalid(
                "identity.files",
                "not configured: the identity comes from [identity.ca]",
            ));
        };
        let bundle_pem = read(BUNDLE, &cfg.trust_bundle)?;
        let cert_pem = read(CERT, &files.cert)?;
        let key_pem = read(KEY, &files.key)?;
        let (chain, key, roots) =
            parse_pem(&cert_pem, &key_pem, &bundle_pem).map_err(|e| invalid(e.files_key(), e))?;
        Identity::from_parts(chain, key, roots, usages, None).map_err(|e| match e {
            MaterialError::Verify(v) => {
                invalid(CERT, format!("does not verify against {BUNDLE}: {v}"))
            }
            other => invalid(other.files_key(), other),
        })
    }

    /// Builds an identity from a chain (leaf first), its private key and the
    /// trust bundle's roots, as read from files or issued by the CA. Checks,
    /// in this order: the bundle parses; the leaf is an X.509-SVID; its ID is
    /// in `expected`'s trust domain and is `expected` itself (when given);
    /// the key matches the leaf; the chain verifies against these roots for
    /// every usage (which also rejects expired and not-yet-valid leaves).
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key_der: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
        usages: &[Usage],
        expected: Option<&SpiffeId>,
    ) -> Result<Identity, MaterialError> {
        let material = material_digest(&chain, &key_der, &roots);
        let bundle = TrustBundle::new(roots).map_err(|e| MaterialError::Bundle(e.to_string()))?;
        let mut root_info = Vec::with_capacity(bundle.roots().len());
        for r in bundle.roots() {
            let (_, parsed) = x509_parser::parse_x509_certificate(r)
                .map_err(|e| MaterialError::Bundle(format!("root does not parse: {e}")))?;
            root_info.push(RootInfo {
                subject: parsed.subject().to_string(),
                sha256: keys::fingerprint(r),
                not_after: rfc3339(parsed.validity().not_after.timestamp()),
            });
        }
        let leaf = chain
            .first()
            .cloned()
            .ok_or_else(|| MaterialError::Cert("no certificate in the chain".into()))?;
        let id = svid::check_leaf_der(&leaf)
            .map_err(|e| MaterialError::Cert(format!("not a valid X.509-SVID: {e}")))?;
        if let Some(want) = expected {
            if id.trust_domain_name() != want.trust_domain_name() {
                return Err(MaterialError::ForeignTrustDomain {
                    expected: want.trust_domain_name().to_owned(),
                    got: id.to_string(),
                });
            }
            if id != *want {
                return Err(MaterialError::IdChanged {
                    expected: want.to_string(),
                    got: id.to_string(),
                });
            }
        }
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der)
            .map_err(|e| MaterialError::Key(format!("unsupported private key: {e}")))?;
        let mut chain_info = Vec::with_capacity(chain.len());
        for c in &chain {
            let (_, parsed) = x509_parser::parse_x509_certificate(c)
                .map_err(|e| MaterialError::Cert(format!("certificate does not parse: {e}")))?;
            chain_info.push(ChainCertInfo {
                subject: parsed.subject().to_string(),
                issuer: parsed.issuer().to_string(),
                sha256: keys::fingerprint(c),
            });
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf)
            .map_err(|e| MaterialError::Cert(format!("certificate does not parse: {e}")))?;
        let serial = hex::encode(parsed.raw_serial());
        let not_before = parsed.validity().not_before.timestamp();
        let mut not_after = parsed.validity().not_after.timestamp();
        let certified = CertifiedKey::new(chain, signing);
        // Before the chain: "certificate replaced before its key" is the
        // common half-written state, and deserves its own label.
        certified
            .keys_match()
            .map_err(|_| MaterialError::KeyMismatch)?;
        let verifier = SvidVerifier::new(id.trust_domain(), bundle);
        let now = UnixTime::now();
        for usage in usages {
            let v = verifier
                .verify(&leaf, &certified.cert[1..], now, *usage)
                .map_err(MaterialError::Verify)?;
            not_after = v.not_after;
        }
        Ok(Identity {
            key_der,
            id,
            certified: Arc::new(certified),
            verifier,
            serial,
            not_after,
            not_before,
            roots: root_info,
            chain: chain_info,
            material,
        })
    }

    /// The same certificate and key with another bundle (a refresh from the
    /// CA). The leaf must still verify against it: a bundle that does not
    /// trust our own certificate would have peers refuse us too.
    pub fn with_bundle(
        &self,
        roots: Vec<CertificateDer<'static>>,
        usages: &[Usage],
    ) -> Result<Identity, MaterialError> {
        Identity::from_parts(
            self.certified.cert.clone(),
            self.key_der.clone_key(),
            roots,
            usages,
            Some(&self.id),
        )
    }

    /// `/identity` as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "spiffe_id": self.id.as_str(),
            "serial": self.serial,
            "not_after": rfc3339(self.not_after),
            "not_after_unix": self.not_after,
            "not_before": rfc3339(self.not_before),
            "not_before_unix": self.not_before,
            "trust_domain": self.verifier.trust_domain().as_str(),
            "trust_roots": self.roots,
            "chain": self.chain,
        })
    }
}

/// Holds the current identity; swapped atomically on reload and renewal.
/// Empty only while an `[identity.ca]` proxy waits for its first
/// certificate, before any data listener is bound.
#[derive(Debug)]
pub struct IdentityStore {
    current: ArcSwapOption<Identity>,
    held: tokio::sync::watch::Sender<bool>,
}

impl IdentityStore {
    /// A store holding `identity`.
    pub fn new(identity: Identity) -> Arc<IdentityStore> {
        Arc::new(IdentityStore {
            current: ArcSwapOption::from_pointee(identity),
            held: tokio::sync::watch::Sender::new(true),
        })
    }

    /// A store without an identity yet (`[identity.ca]` before bootstrap).
    pub fn empty() -> Arc<IdentityStore> {
        Arc::new(IdentityStore {
            current: ArcSwapOption::empty(),
            held: tokio::sync::watch::Sender::new(false),
        })
    }

    /// The identity in use, if one is held yet.
    pub fn get(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    /// The identity in use, on the data path.
    ///
    /// # Panics
    /// If no identity is held yet. The inbound and outbound are bound only
    /// after the first identity is installed, and one is never removed, so
    /// the data path cannot observe an empty store.
    pub fn current(&self) -> Arc<Identity> {
        self.get()
            .expect("data listeners are bound only once an identity is held")
    }

    /// Replaces the identity for every later handshake (hot reload,
    /// renewal); established connections keep the one they negotiated.
    pub fn replace(&self, identity: Identity) {
        self.current.store(Some(Arc::new(identity)));
        self.held.send_replace(true);
    }

    /// Puts a new identity in use (a reload, a renewal): exports its
    /// expiry, logs what is in use now and why (`why` says where it came
    /// from), and replaces the current one.
    pub fn install(&self, identity: Identity, metrics: &crate::metrics::Metrics, why: &str) {
        metrics.identity_installed(identity.not_before, identity.not_after);
        tracing::info!(
            spiffe_id = %identity.id,
            serial = %identity.serial,
            not_after = identity.not_after,
            trust_roots = identity.roots.len(),
            "{why}; new identity in use for new handshakes"
        );
        self.replace(identity);
    }

    /// Resolves once an identity is held.
    pub async fn wait_held(&self) {
        let mut rx = self.held.subscribe();
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|h| *h).await;
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

/// Presents the current identity's certificate, on both sides.
#[derive(Debug)]
pub struct CertResolver {
    store: Arc<IdentityStore>,
}

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No identity yet: rustls aborts the handshake.
        self.store
            .current
            .load()
            .as_ref()
            .map(|i| i.certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store
            .current
            .load()
            .as_ref()
            .map(|i| i.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// How keyproof's rustls adapters ([`SvidClientVerifier`],
/// [`SvidServerVerifier`]) see the proxy: every handshake uses the identity
/// held now (so a reload applies to the next handshake), and a refusal
/// carries a [`PeerRejected`] for the handshake metrics and log.
#[derive(Debug, Clone)]
pub struct StorePolicy(Arc<IdentityStore>);

impl PeerPolicy for StorePolicy {
    fn with_verifier<R>(&self, f: impl FnOnce(&SvidVerifier) -> R) -> Option<R> {
        self.0.current.load().as_ref().map(|id| f(&id.verifier))
    }

    fn refuse(&self, why: Refusal, end_entity: &CertificateDer<'_>) -> rustls::Error {
        match why {
            Refusal::NoIdentity => reject("protocol", "no identity held yet".into(), end_entity),
            Refusal::Invalid(e) => verify_error(e, end_entity),
            Refusal::Mismatch(m) => reject("identity_mismatch", m.to_string(), end_entity),
            // The certificate passed every check, so whoever holds it has
            // a certificate of ours without its key (a copied certificate,
            // or a broken client): named, as a security event.
            Refusal::Possession(e) => reject(
                "possession_failed",
                format!("certificate presented without proof of its key (CertificateVerify: {e})"),
                end_entity,
            ),
        }
    }
}

/// The inbound server configuration ([`keyproof_identity::tls::server_config`]),
/// presenting the current identity and requiring a client certificate.
pub fn server_config(store: &Arc<IdentityStore>) -> Result<rustls::ServerConfig, rustls::Error> {
    // Client certificates are required: the inbound serves only verified callers.
    keyproof_identity::tls::server_config(
        SvidClientVerifier::new(StorePolicy(store.clone()), true),
        Arc::new(CertResolver {
            store: store.clone(),
        }),
    )
}

/// An outbound client configuration for one upstream, offering `alpn`.
pub fn client_config(
    store: &Arc<IdentityStore>,
    expected: IdPattern,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let verifier = SvidServerVerifier::new(StorePolicy(store.clone()), expected);
    let mut cfg = rustls::ClientConfig::builder_with_provider(keyproof_identity::tls::provider())
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
