//! The workload identity: loading and checking the certificate, key and trust
//! bundle; the rustls configurations built around them; and the certificate
//! verifiers that apply the shared X.509-SVID rules to every peer.
//!
//! The current identity lives in an [`ArcSwapOption`] inside
//! [`IdentityStore`] (empty only before an `[identity.ca]` bootstrap). rustls
//! reaches it only through [`CertResolver`] (our certificate) and the two
//! verifiers (the bundle), each of which loads the current value per
//! handshake, so a reload or renewal is one [`IdentityStore::install`]: new
//! handshakes see the new material, established connections are untouched,
//! and no rustls configuration has to be rebuilt. Both sources build the
//! identity with [`Identity::from_parts`], so file and CA material pass the
//! same checks.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use x509_parser::certificate::X509Certificate;

use arc_swap::ArcSwapOption;
use keyproof_identity::filemode;
use keyproof_identity::tls::{PeerPolicy, Refusal, SvidClientVerifier, SvidServerVerifier};
use keyproof_identity::{
    keys, svid, IdPattern, SpiffeId, SvidVerifier, TrustBundle, Usage, VerifyError,
};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, OtherError, SignatureScheme};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::config::{IdentityConfig, IdentitySource};
use crate::http::mesh_client;
use crate::identity::key::{TokenKey, WorkloadKey};

pub use crate::identity::error::IdentityError;

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    crate::files::read(path).map_err(|source| IdentityError::Read {
        key,
        path: path.display().to_string(),
        source,
    })
}

/// A private key file others may write is refused (whoever can replace
/// it can become this workload); one others may read is used, with a
/// warning. Kubernetes mounts a Secret 0644 unless told otherwise
/// (`defaultMode: 0440`, as deploy/ does), and within the sidecar's own
/// container no other user runs.
fn check_key_mode(path: &Path) -> Result<(), IdentityError> {
    filemode::refuse_writable(path, KEY_WRITERS).map_err(|e| invalid("identity.files.key", e))?;
    if let Some(mode) = filemode::readable_by_all(path) {
        tracing::warn!(file = %path.display(), mode = format!("{mode:o}"), "the private key is readable by every user of this machine; chmod 600 (a Kubernetes Secret: defaultMode 0440)");
    }
    Ok(())
}

/// What whoever may rewrite a key file can do (refused at startup and at
/// every reload).
pub const KEY_WRITERS: &str = "whoever can replace the key can become this workload";

/// What whoever may rewrite a trust bundle can do.
pub const BUNDLE_WRITERS: &str =
    "whoever can rewrite the trust bundle can add a root and be any workload to this one";

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

/// Parses PEM material into the chain and the bundle roots (the key is in
/// a token).
pub fn parse_cert_and_bundle(
    cert_pem: &[u8],
    bundle_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>), MaterialError> {
    let roots =
        keys::certs_from_pem(bundle_pem).map_err(|e| MaterialError::Bundle(e.to_string()))?;
    let chain = keys::certs_from_pem(cert_pem)
        .map_err(|e| MaterialError::Cert(format!("certificate: {e}")))?;
    Ok((chain, roots))
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
/// nothing changed. Hashed in place, so no extra copy of the key is made;
/// a token key is digested by its public key and URI.
pub fn material_digest(
    chain: &[CertificateDer<'_>],
    key: &WorkloadKey,
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
    key.digest_parts(&mut part);
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
    /// notAfter, seconds since the epoch, for the metrics.
    #[serde(skip)]
    pub not_after_unix: i64,
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
    /// When the presented chain stops being valid, seconds since the epoch:
    /// the earliest notAfter of the leaf and the intermediates of its path
    /// to the bundle (what `keyproof_identity_cert_expiry_timestamp_seconds`
    /// and `/ready` report, and renewal is timed by).
    pub not_after: i64,
    /// Leaf notBefore, seconds since the epoch.
    pub not_before: i64,
    /// The bundle's roots, for `/identity`.
    pub roots: Vec<RootInfo>,
    /// The presented chain, for `/identity`.
    pub chain: Vec<ChainCertInfo>,
    /// The bundle's `spiffe_sequence` as the CA stated it (None for
    /// `[identity.files]`, whose bundle file carries none).
    pub bundle_sequence: Option<u64>,
    /// The CA endpoint (replica) that issued the certificate, with
    /// `[identity.ca]` (None for `[identity.files]`).
    pub ca_endpoint: Option<keyproof_ca::client::Endpoint>,
    /// [`material_digest`] of this identity, to tell a real change.
    pub material: [u8; 32],
    /// The workload key (in a file, in memory or in a PKCS#11 token), for
    /// the step-up signer and `/identity`; swapped with the rest of the
    /// identity on reload. Never logged: `Debug` for `Identity` omits it.
    pub key: WorkloadKey,
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
    ///
    /// With `[identity.pkcs11]` the key is opened in its token (blocking:
    /// the token is logged in to) and must be the one the leaf certifies;
    /// [`Identity::key`] then holds it, for the reloader and the probe.
    pub fn load(cfg: &IdentityConfig, usages: &[Usage]) -> Result<Identity, IdentityError> {
        let token = match &cfg.pkcs11 {
            Some(p) => Some(TokenKey::open(p, None)?),
            None => None,
        };
        Identity::load_with(cfg, token, usages)
    }

    /// [`Identity::load`] with the token key already open (None: the key
    /// is `identity.files.key`).
    pub fn load_with(
        cfg: &IdentityConfig,
        token: Option<Arc<TokenKey>>,
        usages: &[Usage],
    ) -> Result<Identity, IdentityError> {
        const BUNDLE: &str = "identity.trust_bundle";
        const CERT: &str = "identity.files.cert";
        const KEY: &str = "identity.files.key";
        const LABEL: &str = "identity.pkcs11.key_label";
        let IdentitySource::Files(files) = &cfg.source else {
            return Err(invalid(
                "identity.files",
                "not configured: the identity comes from [identity.ca]",
            ));
        };
        filemode::refuse_writable(&cfg.trust_bundle, BUNDLE_WRITERS)
            .map_err(|e| invalid(BUNDLE, e))?;
        let bundle_pem = read(BUNDLE, &cfg.trust_bundle)?;
        let cert_pem = read(CERT, &files.cert)?;
        let (chain, key, roots) = match (token, &files.key) {
            (Some(token), _) => {
                let (chain, roots) = parse_cert_and_bundle(&cert_pem, &bundle_pem)
                    .map_err(|e| invalid(e.files_key(), e))?;
                (chain, WorkloadKey::Pkcs11(token), roots)
            }
            (None, Some(key_path)) => {
                check_key_mode(key_path)?;
                let key_pem = read(KEY, key_path)?;
                let (chain, key, roots) = parse_pem(&cert_pem, &key_pem, &bundle_pem)
                    .map_err(|e| invalid(e.files_key(), e))?;
                (chain, WorkloadKey::file(key), roots)
            }
            (None, None) => return Err(invalid(KEY, "missing")),
        };
        let in_token = key.token().is_some();
        Identity::from_parts(chain, key, roots, usages, None).map_err(|e| match e {
            MaterialError::Verify(v) => {
                invalid(CERT, format!("does not verify against {BUNDLE}: {v}"))
            }
            MaterialError::KeyMismatch if in_token => invalid(
                LABEL,
                format!("the key in the token is not the one {CERT} certifies"),
            ),
            MaterialError::Key(msg) if in_token => invalid(LABEL, msg),
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
        key: impl Into<WorkloadKey>,
        roots: Vec<CertificateDer<'static>>,
        usages: &[Usage],
        expected: Option<&SpiffeId>,
    ) -> Result<Identity, MaterialError> {
        let key: WorkloadKey = key.into();
        let material = material_digest(&chain, &key, &roots);
        let bundle = TrustBundle::new(roots).map_err(|e| MaterialError::Bundle(e.to_string()))?;
        let mut root_info = Vec::with_capacity(bundle.roots().len());
        for r in bundle.roots() {
            let (_, parsed) = x509_parser::parse_x509_certificate(r)
                .map_err(|e| MaterialError::Bundle(format!("root does not parse: {e}")))?;
            let not_after = parsed.validity().not_after.timestamp();
            root_info.push(RootInfo {
                subject: parsed.subject().to_string(),
                sha256: keys::fingerprint(r),
                not_after: rfc3339(not_after),
                not_after_unix: not_after,
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
        let signing = key
            .rustls_signing_key()
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
        match key.spki_der() {
            // A token key is compared by the public key read from the
            // token, whatever its rustls adapter can report.
            Some(spki) => {
                if parsed.tbs_certificate.subject_pki.raw != spki {
                    return Err(MaterialError::KeyMismatch);
                }
            }
            None => certified
                .keys_match()
                .map_err(|_| MaterialError::KeyMismatch)?,
        }
        let verifier = SvidVerifier::new(id.trust_domain(), bundle);
        let now = UnixTime::now();
        for usage in usages {
            let v = verifier
                .verify(&leaf, &certified.cert[1..], now, *usage)
                .map_err(MaterialError::Verify)?;
            not_after = v.not_after;
        }
        Ok(Identity {
            key,
            id,
            certified: Arc::new(certified),
            verifier,
            serial,
            not_after,
            not_before,
            roots: root_info,
            chain: chain_info,
            material,
            bundle_sequence: None,
            ca_endpoint: None,
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
        let mut next = Identity::from_parts(
            self.certified.cert.clone(),
            self.key.clone_key(),
            roots,
            usages,
            Some(&self.id),
        )?;
        // The same certificate, from the same endpoint.
        next.ca_endpoint = self.ca_endpoint.clone();
        Ok(next)
    }

    /// The same identity, its certificate issued by the CA endpoint
    /// `endpoint`.
    pub fn with_ca_endpoint(mut self, endpoint: Option<keyproof_ca::client::Endpoint>) -> Identity {
        self.ca_endpoint = endpoint;
        self
    }

    /// The same identity, its bundle stated by the CA as `spiffe_sequence`.
    pub fn with_sequence(mut self, sequence: Option<u64>) -> Identity {
        self.bundle_sequence = sequence;
        self
    }

    /// Exports what is in use now: the certificate's validity and the trust
    /// bundle's roots and sequence.
    pub fn export(&self, metrics: &crate::metrics::Metrics) {
        metrics.identity_installed(self.not_before, self.not_after);
        let roots: Vec<crate::metrics::BundleRoot> = self
            .roots
            .iter()
            .map(|r| crate::metrics::BundleRoot {
                fingerprint: r.sha256.clone(),
                not_after: r.not_after_unix,
            })
            .collect();
        metrics.trust_bundle_installed(
            self.verifier.trust_domain().as_str(),
            &roots,
            self.bundle_sequence,
        );
    }

    /// `/identity` as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "spiffe_id": self.id.as_str(),
            "serial": self.serial,
            "not_after": rfc3339(self.not_after),
            "not_after_unix": self.not_after,
            "not_before": rfc3339(self.not_before),
            "not_before_unix": self.not_before,
            "trust_domain": self.verifier.trust_domain().as_str(),
            "trust_roots": self.roots,
            "chain": self.chain,
            "key": self.key.to_json(),
        });
        if let Some(seq) = self.bundle_sequence {
            json["trust_bundle_sequence"] = seq.into();
        }
        if let Some(ep) = &self.ca_endpoint {
            json["ca_endpoint"] = serde_json::json!({
                "url": ep.url,
                "address": ep.addr.to_string(),
            });
        }
        json
    }
}

/// Holds the current identity; swapped atomically on reload and renewal.
/// Empty only while an `[identity.ca]` proxy waits for its first
/// certificate, before any data listener is bound.
#[derive(Debug)]
pub struct IdentityStore {
    current: ArcSwapOption<Identity>,
    held: tokio::sync::watch::Sender<bool>,
    /// The trust bundle's generation: one more each time an identity with
    /// other roots is put in use. Read per request by the outbound (an
    /// atomic, not the watch's lock); the watch wakes the inbound's
    /// connections, which verify their callers again.
    trust_generation: std::sync::atomic::AtomicU64,
    trust_changed: tokio::sync::watch::Sender<u64>,
    /// One more each time the certificate chain we present or the trust
    /// bundle's roots change: what an outbound connection was made with.
    identity_generation: std::sync::atomic::AtomicU64,
}

impl IdentityStore {
    /// A store holding `identity`.
    pub fn new(identity: Identity) -> Arc<IdentityStore> {
        Arc::new(IdentityStore {
            current: ArcSwapOption::from_pointee(identity),
            held: tokio::sync::watch::Sender::new(true),
            trust_generation: Default::default(),
            trust_changed: tokio::sync::watch::Sender::new(0),
            identity_generation: Default::default(),
        })
    }

    /// A store without an identity yet (`[identity.ca]` before bootstrap).
    pub fn empty() -> Arc<IdentityStore> {
        Arc::new(IdentityStore {
            current: ArcSwapOption::empty(),
            held: tokio::sync::watch::Sender::new(false),
            trust_generation: Default::default(),
            trust_changed: tokio::sync::watch::Sender::new(0),
            identity_generation: Default::default(),
        })
    }

    /// The trust bundle's generation (see [`IdentityStore::trust_changes`]).
    /// Read it before a handshake: a connection whose generation is no
    /// longer the current one was verified against other roots.
    #[inline]
    pub fn trust_generation(&self) -> u64 {
        self.trust_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The generation of what a handshake of ours presents and trusts: one
    /// more on every renewal or reload of our certificate and every change
    /// of the trust bundle's roots (not on a bundle refresh that changes
    /// neither). Read it before a handshake: a connection whose generation
    /// is no longer the current one presented a certificate we no longer
    /// hold, or verified its peer against other roots.
    #[inline]
    pub fn identity_generation(&self) -> u64 {
        self.identity_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Wakes on every change of the trust bundle's roots, with the new
    /// generation. Renewals of our own certificate under the same roots do
    /// not wake it.
    pub fn trust_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.trust_changed.subscribe()
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

    /// Replaces the identity for every later handshake; established
    /// connections keep the one they negotiated. Reloads and renewals go
    /// through [`IdentityStore::install`], which also exports and logs it.
    pub fn replace(&self, identity: Identity) {
        let (roots_changed, chain_changed) = match self.current.load().as_ref() {
            Some(old) => (
                old.verifier.bundle().roots() != identity.verifier.bundle().roots(),
                old.certified.cert != identity.certified.cert,
            ),
            None => (false, false),
        };
        self.current.store(Some(Arc::new(identity)));
        if roots_changed || chain_changed {
            self.identity_generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        if roots_changed {
            // After the store: whoever sees the new generation finds the
            // new roots in use.
            let g = self
                .trust_generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                + 1;
            self.trust_changed.send_replace(g);
        }
        self.held.send_replace(true);
    }

    /// Verifies a peer's chain (leaf first) again, as a handshake under
    /// the trust bundle in use now would.
    pub fn verify_again(
        &self,
        chain: &[CertificateDer<'static>],
        usage: Usage,
    ) -> Result<(), VerifyError> {
        let Some(leaf) = chain.first() else {
            return Err(VerifyError::NoCertificate);
        };
        let id = self.get().ok_or(VerifyError::EmptyBundle)?;
        id.verifier
            .verify(leaf, &chain[1..], UnixTime::now(), usage)
            .map(|_| ())
    }

    /// Puts a new identity in use (a reload, a renewal): exports its
    /// expiry, logs what is in use now and why (`why` says where it came
    /// from), and replaces the current one.
    pub fn install(&self, identity: Identity, metrics: &crate::metrics::Metrics, why: &str) {
        identity.export(metrics);
        tracing::info!(
            spiffe_id = %identity.id,
            serial = %identity.serial,
            not_after = identity.not_after,
            trust_roots = identity.roots.len(),
            trust_bundle_sequence = identity.bundle_sequence,
            "{why}; new identity in use for new handshakes"
        );
        self.replace(identity);
    }

    /// Puts the same certificate with a refreshed trust bundle in use:
    /// exports the bundle, logs it, and replaces the current identity.
    pub fn install_bundle(&self, identity: Identity, metrics: &crate::metrics::Metrics) {
        identity.export(metrics);
        tracing::info!(
            trust_roots = identity.roots.len(),
            trust_bundle_sequence = identity.bundle_sequence,
            "trust bundle refreshed from the CA"
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
    /// Whether the certificate chained to the trust bundle before it was
    /// refused: only then does `peer_id` name who is at the other end
    /// (anyone can make a certificate claiming any ID).
    pub chain_verified: bool,
}

impl fmt::Display for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PeerRejected {}

fn reject(
    reason: &'static str,
    message: String,
    leaf: &CertificateDer<'_>,
    chain_verified: bool,
) -> rustls::Error {
    let peer_id = x509_parser::parse_x509_certificate(leaf)
        .ok()
        .and_then(|(_, c)| svid::spiffe_id_of(&c).ok())
        .map(|id| id.to_string());
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        PeerRejected {
            reason,
            message,
            peer_id,
            chain_verified,
        },
    ))))
}

fn verify_error(e: VerifyError, leaf: &CertificateDer<'_>) -> rustls::Error {
    // The SVID rules and the trust domain are checked after the path
    // validated; every other refusal (an expired or not-yet-valid leaf
    // included: webpki checks the dates before any signature) may come from
    // a certificate nobody of ours signed.
    let chained = matches!(
        e,
        VerifyError::Svid(_)
            | VerifyError::ForeignTrustDomain { .. }
            | VerifyError::WrongPurpose(_)
    );
    reject(e.reason(), e.to_string(), leaf, chained)
}

/// A failed TLS handshake, classified for metrics and logs.
#[derive(Debug, Clone)]
pub struct HandshakeFailure {
    /// The `result` label.
    pub reason: &'static str,
    /// Human explanation.
    pub message: String,
    /// The SPIFFE ID the peer's certificate claims, when it claims one (for
    /// logs: see [`HandshakeFailure::verified_peer`]).
    pub peer_id: Option<String>,
    /// Whether the certificate chained to the trust bundle.
    pub chain_verified: bool,
}

impl HandshakeFailure {
    /// The peer's SPIFFE ID when its certificate chained to the trust
    /// bundle (e.g. one presented without proof of its key): only such a
    /// refusal may be held against that identity.
    pub fn verified_peer(&self) -> Option<&str> {
        self.peer_id.as_deref().filter(|_| self.chain_verified)
    }
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
                    chain_verified: p.chain_verified,
                },
                None => HandshakeFailure {
                    reason: "protocol",
                    message: inner.to_string(),
                    peer_id: None,
                    chain_verified: false,
                },
            }
        }
        Some(rustls::Error::NoCertificatesPresented) => HandshakeFailure {
            reason: "no_client_cert",
            message: "peer sent no client certificate".into(),
            peer_id: None,
            chain_verified: false,
        },
        Some(rustls::Error::InvalidCertificate(e)) => HandshakeFailure {
            reason: "unknown_ca",
            message: format!("invalid certificate: {e:?}"),
            peer_id: None,
            chain_verified: false,
        },
        Some(rustls::Error::Other(OtherError(inner)))
            if inner
                .downcast_ref::<keyproof_identity::pkcs11::OwnKeyFailed>()
                .is_some() =>
        {
            HandshakeFailure {
                reason: "key_unavailable",
                message: inner.to_string(),
                peer_id: None,
                chain_verified: false,
            }
        }
        Some(rustls::Error::AlertReceived(a)) if mesh_client::refuses_our_certificate(*a) => HandshakeFailure {
            reason: "refused_by_peer",
            message: format!(
                "the peer refused our certificate or our proof of its key ({a:?}): is ours expired, or under a root the peer does not trust?"
            ),
            peer_id: None,
            chain_verified: false,
        },
        Some(other) => HandshakeFailure {
            reason: "protocol",
            message: other.to_string(),
            peer_id: None,
            chain_verified: false,
        },
        None => HandshakeFailure {
            reason: "protocol",
            message: err.to_string(),
            peer_id: None,
            chain_verified: false,
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
            Refusal::NoIdentity => {
                reject("protocol", "no identity held yet".into(), end_entity, false)
            }
            Refusal::Invalid(e) => verify_error(e, end_entity),
            Refusal::Mismatch(m) => reject("identity_mismatch", m.to_string(), end_entity, true),
            // The certificate passed every check, so whoever holds it has
            // a certificate of ours without its key (a copied certificate,
            // or a broken client): named, as a security event.
            Refusal::Possession(e) => reject(
                "possession_failed",
                format!("certificate presented without proof of its key (CertificateVerify: {e})"),
                end_entity,
                true,
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
    /// The leaf's serial number in lowercase hex without leading zeros, the
    /// form `[[inbound.deny]] serial` entries are kept in (and audit
    /// records name).
    pub serial: String,
    /// When the caller's chain stops being valid (the leaf, or an
    /// intermediate of its path that expires first): a connection that
    /// outlives it ends then, as a new handshake with it would fail.
    pub not_after: std::time::SystemTime,
}

impl PeerIdentity {
    /// Extracts the verified peer from a finished handshake's certificates.
    /// `None` only if the verifier's accepted chain no longer parses, which
    /// would be a bug; the caller refuses the connection then.
    pub fn from_certs(certs: Option<&[CertificateDer<'static>]>) -> Option<PeerIdentity> {
        let certs = certs?;
        let leaf = certs.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
        let id = svid::spiffe_id_of(&parsed).ok()?;
        Some(PeerIdentity {
            id,
            cert_sha256: keys::sha256(leaf),
            spki_sha256: keys::sha256(parsed.public_key().raw),
            serial: serial_hex(parsed.raw_serial()),
            not_after: std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(
                    u64::try_from(path_not_after(&parsed, &certs[1..])).unwrap_or(0),
                ),
            leaf: leaf.clone(),
        })
    }
}

/// The earliest notAfter of `leaf` and of the presented certificates that
/// issued it, issuer by issuer (by name: the handshake already verified a
/// path, and webpki takes its intermediates from these). A presented
/// certificate off that path (a stale extra, which webpki ignores) does not
/// count.
fn path_not_after(leaf: &X509Certificate<'_>, presented: &[CertificateDer<'static>]) -> i64 {
    let mut not_after = leaf.validity().not_after.timestamp();
    let parsed: Vec<X509Certificate<'_>> = presented
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok().map(|(_, p)| p))
        .collect();
    let mut used = vec![false; parsed.len()];
    let mut issuer = leaf.issuer();
    // Each step takes a certificate not taken before: the walk ends.
    while let Some(i) = (0..parsed.len()).find(|&i| !used[i] && parsed[i].subject() == issuer) {
        used[i] = true;
        not_after = not_after.min(parsed[i].validity().not_after.timestamp());
        if parsed[i].subject() == parsed[i].issuer() {
            break;
        }
        issuer = parsed[i].issuer();
    }
    not_after
}

/// A certificate serial (big-endian bytes, as DER holds them: a leading
/// zero byte keeps a high bit from reading as a sign) in lowercase hex
/// without leading zeros, so that every spelling of one number compares
/// equal.
/// The one spelling is `config::normalize_serial`'s; a serial longer than
/// X.509 allows (20 bytes), which no deny entry can name, keeps its plain
/// hex.
pub fn serial_hex(raw: &[u8]) -> String {
    // An empty serial (not valid DER) reads as zero, as an empty number.
    let hex = if raw.is_empty() {
        "0".to_owned()
    } else {
        hex::encode(raw)
    };
    crate::config::normalize_serial(&hex).unwrap_or(hex)
}

/// A throwaway trust domain for the identity tests. `keyproof_ca` issues the
/// ordinary SVIDs; [`test_pki::Pki::craft`] hand-encodes the leaves the CA
/// refuses to issue (expired, not yet valid, a CA, other key usages, other
/// key types), signed by the same intermediate, so each rule can be broken
/// one at a time.
#[cfg(test)]
pub(crate) mod test_pki {
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::Duration;

    use aws_lc_rs::signature::{
        EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING,
        ECDSA_P384_SHA384_ASN1_SIGNING,
    };
    use keyproof_ca::ca::InitOptions;
    use keyproof_ca::csr::SubjectKey;
    use keyproof_ca::issue::IssueRequest;
    use keyproof_ca::Ca;
    use keyproof_identity::keys::{self, KeyType};
    use keyproof_identity::{SpiffeId, TrustDomain, Usage};
    use rustls::sign::CertifiedKey;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::Identity;

    /// Both directions, as a proxy with an inbound and an outbound asks.
    pub(crate) const BOTH: &[Usage] = &[Usage::ServerAuth, Usage::ClientAuth];

    /// serverAuth, as DER OID content.
    pub(crate) const SERVER_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 1];
    /// clientAuth, as DER OID content.
    pub(crate) const CLIENT_AUTH: &[u8] = &[0x2b, 6, 1, 5, 5, 7, 3, 2];

    /// A certificate chain (leaf first) and its key.
    pub(crate) struct Svid {
        pub(crate) chain: Vec<CertificateDer<'static>>,
        pub(crate) key: PrivateKeyDer<'static>,
    }

    impl Svid {
        pub(crate) fn chain_pem(&self) -> String {
            self.chain.iter().map(|c| keys::cert_pem(c)).collect()
        }

        pub(crate) fn key_pem(&self) -> String {
            pem_block("PRIVATE KEY", self.key.secret_der())
        }

        /// For a TLS peer presenting this chain, whatever its validity.
        pub(crate) fn certified(&self) -> Arc<CertifiedKey> {
            let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&self.key)
                .expect("signing key");
            Arc::new(CertifiedKey::new(self.chain.clone(), signer))
        }
    }

    fn pem_block(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out + &format!("-----END {label}-----\n")
    }

    /// What a crafted leaf looks like; [`Leaf::default`] is a valid SVID.
    pub(crate) struct Leaf {
        /// notBefore, seconds from now.
        pub(crate) not_before: i64,
        /// notAfter, seconds from now.
        pub(crate) not_after: i64,
        /// basicConstraints cA.
        pub(crate) ca: bool,
        /// keyUsage as a DER BIT STRING's (unused bits, first byte).
        pub(crate) key_usage: (u8, u8),
        /// extendedKeyUsage purposes; `None` leaves the extension out.
        pub(crate) eku: Option<&'static [&'static [u8]]>,
        /// A P-384 key (which no SVID may hold) instead of P-256.
        pub(crate) p384: bool,
    }

    /// keyUsage digitalSignature.
    pub(crate) const DIGITAL_SIGNATURE: (u8, u8) = (7, 0x80);
    /// keyUsage keyEncipherment only.
    pub(crate) const KEY_ENCIPHERMENT: (u8, u8) = (5, 0x20);

    impl Default for Leaf {
        fn default() -> Leaf {
            Leaf {
                not_before: -3600,
                not_after: 3600,
                ca: false,
                key_usage: DIGITAL_SIGNATURE,
                eku: Some(&[SERVER_AUTH, CLIENT_AUTH]),
                p384: false,
            }
        }
    }

    fn der(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = body.len();
        if n < 0x80 {
            out.push(n as u8);
        } else if n < 0x100 {
            out.extend([0x81, n as u8]);
        } else {
            out.extend([0x82, (n >> 8) as u8, n as u8]);
        }
        out.extend_from_slice(body);
        out
    }

    fn seq(parts: &[&[u8]]) -> Vec<u8> {
        der(0x30, &parts.concat())
    }

    fn oid(content: &[u8]) -> Vec<u8> {
        der(0x06, content)
    }

    fn utc_time(offset: i64) -> Vec<u8> {
        let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(offset);
        let s = format!(
            "{:02}{:02}{:02}{:02}{:02}{:02}Z",
            t.year() % 100,
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        );
        der(0x17, s.as_bytes())
    }

    fn extension(id: &[u8], critical: bool, value: &[u8]) -> Vec<u8> {
        let crit: &[u8] = if critical { &[0x01, 0x01, 0xff] } else { &[] };
        seq(&[&oid(id), crit, &der(0x04, value)])
    }

    const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 4, 3, 2];
    const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 2, 1];
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 3, 1, 7];
    const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

    /// A trust domain: root, intermediate, and what they issue.
    pub(crate) struct Pki {
        pub(crate) ca: Ca,
        pub(crate) td: String,
        int_key: EcdsaKeyPair,
        int_subject: Vec<u8>,
    }

    impl Pki {
        /// One trust domain per name for the whole test run, for tests that
        /// need *a* trust domain rather than a new one (creating one costs
        /// tens of milliseconds).
        pub(crate) fn shared(td: &str) -> &'static Pki {
            static ALL: Mutex<Vec<&'static Pki>> = Mutex::new(Vec::new());
            let mut all = ALL.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(p) = all.iter().find(|p| p.td == td) {
                return p;
            }
            let p: &'static Pki = Box::leak(Box::new(Pki::new(td)));
            all.push(p);
            p
        }

        /// A new trust domain (its own root) named `td`.
        pub(crate) fn new(td: &str) -> Pki {
            let dir = tempfile::tempdir().expect("temp dir");
            let ca = Ca::init(
                &dir.path().join("ca"),
                &InitOptions {
                    trust_domain: TrustDomain::parse(td).expect("trust domain"),
                    key_type: KeyType::EcdsaP256,
                    root_ttl: Duration::from_secs(7 * 24 * 3600),
                    intermediate_ttl: Duration::from_secs(2 * 24 * 3600),
                },
            )
            .expect("CA");
            let pem = std::fs::read(ca.dir().join(keyproof_ca::ca::files::INT_KEY))
                .expect("intermediate key");
            let int_der = keys::private_key_from_pem(&pem).expect("intermediate key PEM");
            let int_key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, int_der.secret_der())
                    .expect("intermediate key is P-256 PKCS#8");
            let (_, parsed) =
                x509_parser::parse_x509_certificate(ca.intermediate()).expect("intermediate");
            let int_subject = parsed.subject().as_raw().to_vec();
            // `Ca::sign` works from memory: the directory can go now.
            drop(dir);
            Pki {
                ca,
                td: td.to_owned(),
                int_key,
                int_subject,
            }
        }

        pub(crate) fn id(&self, path: &str) -> SpiffeId {
            SpiffeId::parse(&format!("spiffe://{}{path}", self.td)).expect("SPIFFE ID")
        }

        pub(crate) fn roots(&self) -> Vec<CertificateDer<'static>> {
            self.ca.bundle().to_vec()
        }

        pub(crate) fn bundle_pem(&self) -> String {
            self.ca.bundle_pem()
        }

        /// An SVID for `path` as the CA issues it.
        pub(crate) fn issue(&self, path: &str) -> Svid {
            let kp = KeyType::EcdsaP256.generate().expect("key");
            let issued = self
                .ca
                .sign(
                    &IssueRequest {
                        spiffe_id: self.id(path),
                        key: SubjectKey::from_key_pair(&kp, KeyType::EcdsaP256),
                        ttl: Duration::from_secs(3600),
                        dns: Vec::new(),
                    },
                    "keyproof-proxy unit tests",
                )
                .expect("issue");
            Svid {
                chain: vec![issued.leaf, issued.intermediate],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kp.serialize_der())),
            }
        }

        /// A chain for `path` certifying the key of `csr_pem` (a key the
        /// test does not hold: one in a PKCS#11 token).
        pub(crate) fn issue_for_csr(
            &self,
            path: &str,
            csr_pem: &str,
        ) -> Vec<CertificateDer<'static>> {
            let der = keyproof_ca::csr::decode(csr_pem.as_bytes()).expect("CSR");
            let key = keyproof_ca::csr::verify(&der).expect("CSR verifies");
            let issued = self
                .ca
                .sign(
                    &IssueRequest {
                        spiffe_id: self.id(path),
                        key,
                        ttl: Duration::from_secs(3600),
                        dns: Vec::new(),
                    },
                    "keyproof-proxy unit tests",
                )
                .expect("issue");
            vec![issued.leaf, issued.intermediate]
        }

        /// The identity for `path`, valid in both directions.
        pub(crate) fn identity(&self, path: &str) -> Identity {
            let s = self.issue(path);
            Identity::from_parts(s.chain, s.key, self.roots(), BOTH, None).expect("identity")
        }

        /// A leaf for `path` shaped by `leaf`, signed by the intermediate.
        pub(crate) fn craft(&self, path: &str, leaf: Leaf) -> Svid {
            let (alg, curve): (&'static EcdsaSigningAlgorithm, &[u8]) = if leaf.p384 {
                (&ECDSA_P384_SHA384_ASN1_SIGNING, P384)
            } else {
                (&ECDSA_P256_SHA256_ASN1_SIGNING, P256)
            };
            let subject_key = EcdsaKeyPair::generate(alg).expect("key");
            let pkcs8 = subject_key.to_pkcs8v1().expect("PKCS#8");
            let mut point = vec![0u8];
            point.extend_from_slice(subject_key.public_key().as_ref());
            let spki = seq(&[
                &seq(&[&oid(EC_PUBLIC_KEY), &oid(curve)]),
                &der(0x03, &point),
            ]);
            let mut serial = [0u8; 16];
            aws_lc_rs::rand::fill(&mut serial[1..]).expect("random");
            serial[0] = 0x01;
            let sig_alg = seq(&[&oid(ECDSA_SHA256)]);
            let subject = seq(&[&der(
                0x31,
                &seq(&[&oid(&[0x55, 4, 10]), &der(0x0c, b"keyproof")]),
            )]);
            let basic = if leaf.ca {
                seq(&[&[0x01, 0x01, 0xff]])
            } else {
                seq(&[])
            };
            let uri = self.id(path).to_string();
            let mut exts = vec![
                extension(&[0x55, 29, 19], true, &basic),
                extension(
                    &[0x55, 29, 15],
                    true,
                    &der(0x03, &[leaf.key_usage.0, leaf.key_usage.1]),
                ),
                extension(&[0x55, 29, 17], true, &seq(&[&der(0x86, uri.as_bytes())])),
            ];
            if let Some(purposes) = leaf.eku {
                let oids: Vec<Vec<u8>> = purposes.iter().map(|p| oid(p)).collect();
                let refs: Vec<&[u8]> = oids.iter().map(Vec::as_slice).collect();
                exts.push(extension(&[0x55, 29, 37], false, &seq(&refs)));
            }
            let ext_refs: Vec<&[u8]> = exts.iter().map(Vec::as_slice).collect();
            let tbs = seq(&[
                &[0xa0, 0x03, 0x02, 0x01, 0x02],
                &der(0x02, &serial),
                &sig_alg,
                &self.int_subject,
                &seq(&[&utc_time(leaf.not_before), &utc_time(leaf.not_after)]),
                &subject,
                &spki,
                &der(0xa3, &seq(&ext_refs)),
            ]);
            let sig = self
                .int_key
                .sign(&aws_lc_rs::rand::SystemRandom::new(), &tbs)
                .expect("sign");
            let mut bits = vec![0u8];
            bits.extend_from_slice(sig.as_ref());
            let cert = seq(&[&tbs, &sig_alg, &der(0x03, &bits)]);
            Svid {
                chain: vec![CertificateDer::from(cert), self.ca.intermediate().clone()],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use keyproof_identity::svid::SvidError;
    use rustls::client::ResolvesClientCert;
    use rustls_pki_types::ServerName;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::test_pki::{
        Leaf, Pki, Svid, BOTH, CLIENT_AUTH, DIGITAL_SIGNATURE, KEY_ENCIPHERMENT, SERVER_AUTH,
    };
    use super::*;
    use crate::config::FilesSourceConfig;
    use crate::metrics::{HANDSHAKE_RESULTS, RELOAD_RESULTS};

    const TD: &str = "store.keyproof.test";
    const API: &str = "/ns/demo/sa/api";
    const WEB: &str = "/ns/demo/sa/web";

    fn refused(r: Result<Identity, MaterialError>) -> MaterialError {
        match r {
            Ok(i) => panic!("accepted {i:?}"),
            Err(e) => e,
        }
    }

    fn from_svid(
        s: Svid,
        roots: Vec<CertificateDer<'static>>,
        usages: &[Usage],
    ) -> Result<Identity, MaterialError> {
        Identity::from_parts(s.chain, s.key, roots, usages, None)
    }

    /// The intermediate's notAfter, as the proxy reads times.
    fn intermediate_not_after(pki: &Pki) -> i64 {
        let (_, int) = x509_parser::parse_x509_certificate(pki.ca.intermediate()).expect("int");
        int.validity().not_after.timestamp()
    }

    #[test]
    fn an_identity_and_a_peer_expire_with_the_first_certificate_of_their_path() {
        let pki = Pki::shared(TD);
        let int_end = intermediate_not_after(pki);
        // A leaf outliving its intermediate (keyproof-ca never issues one;
        // another issuer of `[identity.files]` may).
        let long = pki.craft(
            WEB,
            Leaf {
                not_after: 30 * 24 * 3600,
                ..Leaf::default()
            },
        );
        // A stale extra certificate off the path, which webpki ignores.
        let stale = pki.craft(
            API,
            Leaf {
                not_before: -200,
                not_after: -100,
                ..Leaf::default()
            },
        );
        let mut presented = long.chain.clone();
        presented.insert(1, stale.chain[0].clone());
        let peer = PeerIdentity::from_certs(Some(&presented)).expect("peer");
        assert_eq!(
            peer.not_after,
            std::time::UNIX_EPOCH + Duration::from_secs(int_end as u64)
        );
        let own = from_svid(long, pki.roots(), BOTH).expect("identity");
        assert_eq!(own.not_after, int_end, "the intermediate ends first");
        // The usual case: the leaf ends first.
        let short = pki.craft(WEB, Leaf::default());
        let (_, leaf) = x509_parser::parse_x509_certificate(&short.chain[0]).expect("leaf");
        let leaf_end = leaf.validity().not_after.timestamp();
        assert!(leaf_end < int_end);
        let peer = PeerIdentity::from_certs(Some(&short.chain)).expect("peer");
        assert_eq!(
            peer.not_after,
            std::time::UNIX_EPOCH + Duration::from_secs(leaf_end as u64)
        );
        assert_eq!(
            from_svid(short, pki.roots(), BOTH)
                .expect("identity")
                .not_after,
            leaf_end
        );
    }

    #[test]
    fn a_valid_chain_key_and_bundle_make_an_identity() {
        let pki = Pki::shared(TD);
        let s = pki.issue(API);
        let leaf = s.chain[0].clone();
        let digest = material_digest(
            &s.chain,
            &WorkloadKey::from(s.key.clone_key()),
            &pki.roots(),
        );
        let id = from_svid(s, pki.roots(), BOTH).expect("valid identity");
        assert_eq!(id.id, pki.id(API));
        assert_eq!(id.material, digest);
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).expect("leaf");
        assert_eq!(id.serial, hex::encode(parsed.raw_serial()));
        assert_eq!(id.not_after, parsed.validity().not_after.timestamp());
        assert_eq!(id.not_before, parsed.validity().not_before.timestamp());
        assert_eq!(id.chain.len(), 2);
        assert_eq!(id.chain[0].sha256, keys::fingerprint(&leaf));
        assert_eq!(id.roots.len(), 1);
        assert_eq!(id.roots[0].sha256, keys::fingerprint(&pki.roots()[0]));
        assert_eq!(id.verifier.trust_domain().as_str(), TD);

        let json = id.to_json();
        assert_eq!(json["spiffe_id"], pki.id(API).as_str());
        assert_eq!(json["serial"], id.serial.as_str());
        assert_eq!(json["trust_domain"], TD);
        assert_eq!(json["not_after_unix"], id.not_after);
        assert_eq!(json["chain"].as_array().map(Vec::len), Some(2));
        assert_eq!(json["trust_roots"].as_array().map(Vec::len), Some(1));

        // Each direction on its own is accepted too.
        for usage in [Usage::ServerAuth, Usage::ClientAuth] {
            from_svid(pki.issue(API), pki.roots(), &[usage]).expect("one usage");
        }
        // With the expected ID given, the same ID passes.
        let s = pki.issue(API);
        Identity::from_parts(s.chain, s.key, pki.roots(), BOTH, Some(&pki.id(API)))
            .expect("same ID");
    }

    #[test]
    fn identity_debug_never_shows_the_key() {
        let pki = Pki::shared(TD);
        let s = pki.issue(API);
        let key_hex = hex::encode(s.key.secret_der());
        let id = from_svid(s, pki.roots(), BOTH).expect("identity");
        let shown = format!("{id:?}");
        assert!(shown.contains(pki.id(API).as_str()), "{shown}");
        assert!(!shown.contains("key_der"), "{shown}");
        assert!(!shown.contains(&key_hex[..16]), "{shown}");
    }

    #[test]
    fn a_key_that_does_not_match_the_leaf_is_key_mismatch() {
        let pki = Pki::shared(TD);
        let a = pki.issue(API);
        let b = pki.issue(API);
        let e = refused(Identity::from_parts(
            a.chain,
            b.key,
            pki.roots(),
            BOTH,
            None,
        ));
        assert!(matches!(e, MaterialError::KeyMismatch), "{e:?}");
        assert_eq!(e.reason(), "key_mismatch");
    }

    #[test]
    fn an_expired_leaf_is_refused_as_expired() {
        let pki = Pki::shared(TD);
        let leaf = Leaf {
            not_before: -7200,
            not_after: -3600,
            ..Leaf::default()
        };
        let e = refused(from_svid(pki.craft(API, leaf), pki.roots(), BOTH));
        assert!(
            matches!(e, MaterialError::Verify(VerifyError::Expired)),
            "{e:?}"
        );
        assert_eq!(e.reason(), "expired");
    }

    #[test]
    fn a_leaf_not_yet_valid_is_refused_as_not_yet_valid() {
        let pki = Pki::shared(TD);
        let leaf = Leaf {
            not_before: 3600,
            not_after: 7200,
            ..Leaf::default()
        };
        let e = refused(from_svid(pki.craft(API, leaf), pki.roots(), BOTH));
        assert!(
            matches!(e, MaterialError::Verify(VerifyError::NotYetValid)),
            "{e:?}"
        );
        assert_eq!(e.reason(), "not_yet_valid");
    }

    #[test]
    fn the_crafted_default_leaf_is_valid() {
        // The refusals above and below differ from this leaf in one field.
        let pki = Pki::shared(TD);
        let id = from_svid(pki.craft(API, Leaf::default()), pki.roots(), BOTH)
            .expect("crafted valid leaf");
        assert_eq!(id.id, pki.id(API));
    }

    #[test]
    fn a_chain_to_another_root_is_unknown_ca() {
        let ours = Pki::shared(TD);
        let theirs = Pki::new(TD);
        let e = refused(from_svid(theirs.issue(API), ours.roots(), BOTH));
        assert!(
            matches!(e, MaterialError::Verify(VerifyError::UnknownIssuer)),
            "{e:?}"
        );
        assert_eq!(e.reason(), "unknown_ca");
    }

    #[test]
    fn a_leaf_of_another_trust_domain_than_expected_is_foreign_trust_domain() {
        let ours = Pki::shared(TD);
        let other = Pki::shared("other.keyproof.test");
        let s = other.issue(API);
        let e = refused(Identity::from_parts(
            s.chain,
            s.key,
            other.roots(),
            BOTH,
            Some(&ours.id(API)),
        ));
        match &e {
            MaterialError::ForeignTrustDomain { expected, got } => {
                assert_eq!(expected, TD);
                assert_eq!(got, other.id(API).as_str());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.reason(), "foreign_trust_domain");
    }

    #[test]
    fn another_workload_of_the_trust_domain_is_id_changed() {
        let pki = Pki::shared(TD);
        let s = pki.issue(WEB);
        let e = refused(Identity::from_parts(
            s.chain,
            s.key,
            pki.roots(),
            BOTH,
            Some(&pki.id(API)),
        ));
        match &e {
            MaterialError::IdChanged { expected, got } => {
                assert_eq!(expected, pki.id(API).as_str());
                assert_eq!(got, pki.id(WEB).as_str());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.reason(), "id_changed");
    }

    #[test]
    fn a_ca_certificate_as_leaf_is_refused_as_invalid() {
        let pki = Pki::shared(TD);
        let leaf = Leaf {
            ca: true,
            ..Leaf::default()
        };
        let e = refused(from_svid(pki.craft(API, leaf), pki.roots(), BOTH));
        match &e {
            MaterialError::Cert(msg) => {
                assert!(msg.contains(&SvidError::LeafIsCa.to_string()), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.reason(), "invalid");
    }

    #[test]
    fn a_leaf_without_both_tls_purposes_is_refused_whatever_usage_is_asked() {
        // The X.509-SVID rules want serverAuth and clientAuth together (when
        // the extension is there), so a server-only leaf is refused even
        // where only the server usage is asked for.
        let pki = Pki::shared(TD);
        let cases: [(&'static [&'static [u8]], SvidError); 2] = [
            (&[SERVER_AUTH], SvidError::EkuNoClientAuth),
            (&[CLIENT_AUTH], SvidError::EkuNoServerAuth),
        ];
        for (eku, missing) in cases {
            for usages in [&[Usage::ServerAuth][..], &[Usage::ClientAuth][..], BOTH] {
                let leaf = Leaf {
                    eku: Some(eku),
                    ..Leaf::default()
                };
                let e = refused(from_svid(pki.craft(API, leaf), pki.roots(), usages));
                match &e {
                    MaterialError::Cert(msg) => {
                        assert!(msg.contains(&missing.to_string()), "{usages:?}: {msg}")
                    }
                    other => panic!("{usages:?}: {other:?}"),
                }
                assert_eq!(e.reason(), "invalid");
            }
        }
    }

    #[test]
    fn a_leaf_without_extended_key_usage_serves_both_usages() {
        let pki = Pki::shared(TD);
        let leaf = Leaf {
            eku: None,
            ..Leaf::default()
        };
        from_svid(pki.craft(API, leaf), pki.roots(), BOTH).expect("no EKU means any purpose");
    }

    #[test]
    fn a_leaf_whose_key_usage_lacks_digital_signature_is_refused() {
        let pki = Pki::shared(TD);
        let leaf = Leaf {
            key_usage: KEY_ENCIPHERMENT,
            ..Leaf::default()
        };
        assert_ne!(KEY_ENCIPHERMENT, DIGITAL_SIGNATURE);
        let e = refused(from_svid(pki.craft(API, leaf), pki.roots(), BOTH));
        match &e {
            MaterialError::Cert(msg) => {
                assert!(
                    msg.contains(&SvidError::NoDigitalSignature.to_string()),
                    "{msg}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_leaf_with_a_p384_key_is_refused() {
        let pki = Pki::shared(TD);
        let leaf = Leaf {
            p384: true,
            ..Leaf::default()
        };
        let e = refused(from_svid(pki.craft(API, leaf), pki.roots(), BOTH));
        assert!(
            matches!(&e, MaterialError::Cert(m) if m.contains("leaf key")),
            "{e:?}"
        );
        assert_eq!(e.reason(), "invalid");
    }

    #[test]
    fn an_empty_chain_or_bundle_is_invalid() {
        let pki = Pki::shared(TD);
        let s = pki.issue(API);
        let e = refused(Identity::from_parts(
            s.chain.clone(),
            s.key.clone_key(),
            Vec::new(),
            BOTH,
            None,
        ));
        assert!(matches!(e, MaterialError::Bundle(_)), "{e:?}");
        assert_eq!(e.reason(), "invalid");
        let e = refused(Identity::from_parts(
            Vec::new(),
            s.key,
            pki.roots(),
            BOTH,
            None,
        ));
        assert!(matches!(e, MaterialError::Cert(_)), "{e:?}");
        assert_eq!(e.reason(), "invalid");
    }

    #[test]
    fn parse_pem_says_which_part_is_unreadable() {
        let pki = Pki::shared(TD);
        let s = pki.issue(API);
        let (cert, key, bundle) = (s.chain_pem(), s.key_pem(), pki.bundle_pem());
        let (chain, k, roots) =
            parse_pem(cert.as_bytes(), key.as_bytes(), bundle.as_bytes()).expect("PEM");
        assert_eq!(chain, s.chain);
        assert_eq!(k.secret_der(), s.key.secret_der());
        assert_eq!(roots, pki.roots());
        let e = parse_pem(cert.as_bytes(), key.as_bytes(), b"junk").unwrap_err();
        assert!(matches!(e, MaterialError::Bundle(_)), "{e:?}");
        let e = parse_pem(b"junk", key.as_bytes(), bundle.as_bytes()).unwrap_err();
        assert!(matches!(e, MaterialError::Cert(_)), "{e:?}");
        let e = parse_pem(cert.as_bytes(), b"junk", bundle.as_bytes()).unwrap_err();
        assert!(matches!(e, MaterialError::Key(_)), "{e:?}");
    }

    #[test]
    fn every_material_error_reason_is_a_reload_result() {
        let all = [
            MaterialError::Unreadable("x".into()),
            MaterialError::Bundle("x".into()),
            MaterialError::Cert("x".into()),
            MaterialError::Key("x".into()),
            MaterialError::KeyMismatch,
            MaterialError::ForeignTrustDomain {
                expected: "a".into(),
                got: "b".into(),
            },
            MaterialError::IdChanged {
                expected: "a".into(),
                got: "b".into(),
            },
            MaterialError::Verify(VerifyError::Expired),
            MaterialError::Verify(VerifyError::NotYetValid),
            MaterialError::Verify(VerifyError::UnknownIssuer),
            MaterialError::Verify(VerifyError::ForeignTrustDomain {
                expected: "a".into(),
                got: "b".into(),
            }),
            MaterialError::Verify(VerifyError::Svid(SvidError::NoUriSan)),
            MaterialError::Verify(VerifyError::BadChain("x".into())),
            MaterialError::Verify(VerifyError::BadKeyUsage("x")),
        ];
        let reasons: BTreeSet<&str> = all.iter().map(MaterialError::reason).collect();
        for r in &reasons {
            assert!(RELOAD_RESULTS.contains(r), "{r} is not a reload result");
        }
        // Every refusal label of the metric is reachable.
        let refusals: BTreeSet<&str> = RELOAD_RESULTS.into_iter().filter(|r| *r != "ok").collect();
        assert_eq!(reasons, refusals);
    }

    fn files_config(dir: &Path, source: Option<IdentitySource>) -> IdentityConfig {
        IdentityConfig {
            trust_bundle: dir.join("bundle.pem"),
            source: source.unwrap_or_else(|| {
                IdentitySource::Files(FilesSourceConfig {
                    cert: dir.join("tls.crt"),
                    key: Some(dir.join("tls.key")),
                })
            }),
            reload_interval: Duration::from_secs(10),
            pkcs11: None,
        }
    }

    fn write_files(dir: &Path, cert: &str, key: &str, bundle: &str) {
        std::fs::write(dir.join("tls.crt"), cert).expect("write cert");
        std::fs::write(dir.join("tls.key"), key).expect("write key");
        std::fs::write(dir.join("bundle.pem"), bundle).expect("write bundle");
    }

    #[test]
    fn load_reads_valid_files() {
        let pki = Pki::shared(TD);
        let dir = tempfile::tempdir().expect("temp dir");
        let s = pki.issue(API);
        write_files(dir.path(), &s.chain_pem(), &s.key_pem(), &pki.bundle_pem());
        let id = Identity::load(&files_config(dir.path(), None), BOTH).expect("load");
        assert_eq!(id.id, pki.id(API));
        assert_eq!(id.certified.cert, s.chain);
    }

    #[test]
    fn load_names_the_configuration_key_of_each_problem() {
        let pki = Pki::shared(TD);
        let s = pki.issue(API);
        let other = pki.issue(API);
        let expired = pki.craft(
            API,
            Leaf {
                not_before: -7200,
                not_after: -3600,
                ..Leaf::default()
            },
        );
        let (cert, key, bundle) = (s.chain_pem(), s.key_pem(), pki.bundle_pem());
        let other_key = other.key_pem();
        let (expired_cert, expired_key) = (expired.chain_pem(), expired.key_pem());
        // (files written, or None for "this one is missing"), key named, text in the message
        let cases: [(&str, [Option<&str>; 3], &str, &str); 8] = [
            (
                "missing cert",
                [None, Some(&key), Some(&bundle)],
                "identity.files.cert",
                "cannot read",
            ),
            (
                "missing key",
                [Some(&cert), None, Some(&bundle)],
                "identity.files.key",
                "cannot read",
            ),
            (
                "missing bundle",
                [Some(&cert), Some(&key), None],
                "identity.trust_bundle",
                "cannot read",
            ),
            (
                "junk cert",
                [Some("junk"), Some(&key), Some(&bundle)],
                "identity.files.cert",
                "certificate",
            ),
            (
                "junk key",
                [Some(&cert), Some("junk"), Some(&bundle)],
                "identity.files.key",
                "private key",
            ),
            (
                "junk bundle",
                [Some(&cert), Some(&key), Some("junk")],
                "identity.trust_bundle",
                "trust bundle",
            ),
            (
                "key of another certificate",
                [Some(&cert), Some(&other_key), Some(&bundle)],
                "identity.files.key",
                "does not match",
            ),
            (
                "expired",
                [Some(&expired_cert), Some(&expired_key), Some(&bundle)],
                "identity.files.cert",
                "does not verify against identity.trust_bundle: certificate has expired",
            ),
        ];
        for (what, [c, k, b], want_key, says) in cases {
            let dir = tempfile::tempdir().expect("temp dir");
            for (name, content) in [("tls.crt", c), ("tls.key", k), ("bundle.pem", b)] {
                if let Some(text) = content {
                    std::fs::write(dir.path().join(name), text).expect("write");
                }
            }
            let e = Identity::load(&files_config(dir.path(), None), BOTH).unwrap_err();
            let key = match &e {
                IdentityError::Read { key, .. } | IdentityError::Invalid { key, .. } => *key,
            };
            assert_eq!(key, want_key, "{what}: {e}");
            assert!(e.to_string().starts_with(want_key), "{what}: {e}");
            assert!(e.to_string().contains(says), "{what}: {e}");
        }
    }

    #[test]
    fn a_key_file_others_may_write_is_refused_and_one_they_may_read_is_used() {
        use std::os::unix::fs::PermissionsExt;
        let pki = Pki::shared(TD);
        let w = pki.issue(API);
        let dir = tempfile::tempdir().expect("temp dir");
        write_files(dir.path(), &w.chain_pem(), &w.key_pem(), &pki.bundle_pem());
        let key = dir.path().join("tls.key");
        for (mode, ok) in [
            (0o600, true),
            (0o440, true),
            (0o644, true),
            (0o620, false),
            (0o602, false),
            (0o666, false),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            match Identity::load(&files_config(dir.path(), None), BOTH) {
                Ok(_) => assert!(ok, "{mode:o} accepted"),
                Err(e) => {
                    assert!(!ok, "{mode:o}: {e}");
                    assert!(e.to_string().starts_with("identity.files.key"), "{e}");
                    assert!(e.to_string().contains("writable by others"), "{e}");
                }
            }
        }
    }

    #[test]
    fn load_refuses_a_configuration_without_identity_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = crate::Config::parse(
            "[identity]\ntrust_bundle = \"b\"\n[identity.ca]\nurl = \"https://ca:1\"\nspiffe_id = \"spiffe://td/a\"\njoin_token_file = \"t\"\n[outbound]\nlisten = \"127.0.0.1:1\"\n",
        )
        .expect("config");
        let cfg = files_config(dir.path(), Some(cfg.identity.source));
        match Identity::load(&cfg, BOTH).unwrap_err() {
            IdentityError::Invalid { key, .. } => assert_eq!(key, "identity.files"),
            other => panic!("{other:?}"),
        }
    }

    fn resolver(store: &Arc<IdentityStore>) -> Option<Arc<CertifiedKey>> {
        ResolvesClientCert::resolve(
            &CertResolver {
                store: store.clone(),
            },
            &[],
            &[],
        )
    }

    #[test]
    fn installing_exports_the_trust_bundle_and_drops_roots_that_left() {
        let pki = Pki::shared(TD);
        let next = Pki::new(TD);
        let metrics = crate::metrics::Metrics::new().expect("metrics");
        let text = || String::from_utf8(metrics.render()).expect("UTF-8");
        let value =
            |name: &str, labels: &[(&str, &str)]| crate::metrics::sample(&text(), name, labels);
        let expiry = |root: &CertificateDer<'_>| {
            value(
                "keyproof_trust_bundle_root_expiry_timestamp_seconds",
                &[
                    ("trust_domain", TD),
                    ("fingerprint", &keys::fingerprint(root)),
                ],
            )
        };
        let not_after = |root: &CertificateDer<'_>| {
            let (_, c) = x509_parser::parse_x509_certificate(root).expect("root");
            c.validity().not_after.timestamp() as f64
        };
        let (old_root, new_root) = (pki.roots()[0].clone(), next.roots()[0].clone());

        // From files: the roots, and no sequence.
        let store = IdentityStore::empty();
        store.install(pki.identity(API), &metrics, "test");
        assert_eq!(
            value("keyproof_trust_bundle_roots", &[("trust_domain", TD)]),
            Some(1.0)
        );
        assert_eq!(expiry(&old_root), Some(not_after(&old_root)));
        assert_eq!(
            value("keyproof_trust_bundle_sequence", &[("trust_domain", TD)]),
            None
        );
        assert!(store
            .current()
            .to_json()
            .get("trust_bundle_sequence")
            .is_none());

        // From the CA, mid-rotation: both roots and the CA's sequence.
        let s = pki.issue(API);
        let both = [pki.roots(), next.roots()].concat();
        let id = Identity::from_parts(s.chain, s.key, both, BOTH, None)
            .expect("identity")
            .with_sequence(Some(2));
        store.install(id, &metrics, "test");
        assert_eq!(
            value("keyproof_trust_bundle_roots", &[("trust_domain", TD)]),
            Some(2.0)
        );
        assert_eq!(expiry(&new_root), Some(not_after(&new_root)));
        assert_eq!(
            value("keyproof_trust_bundle_sequence", &[("trust_domain", TD)]),
            Some(2.0)
        );
        assert_eq!(store.current().to_json()["trust_bundle_sequence"], 2);

        // A refreshed bundle with the new root only (the leaf is reissued
        // under it first): the old root's series goes.
        let s = next.issue(API);
        let id = Identity::from_parts(s.chain, s.key, next.roots(), BOTH, None)
            .expect("identity")
            .with_sequence(Some(3));
        store.install_bundle(id, &metrics);
        assert_eq!(
            value("keyproof_trust_bundle_roots", &[("trust_domain", TD)]),
            Some(1.0)
        );
        assert_eq!(expiry(&old_root), None);
        assert_eq!(expiry(&new_root), Some(not_after(&new_root)));
        assert_eq!(
            value("keyproof_trust_bundle_sequence", &[("trust_domain", TD)]),
            Some(3.0)
        );
        assert!(Arc::ptr_eq(
            &store.current().certified,
            &store.get().expect("held").certified
        ));
    }

    #[test]
    fn replace_swaps_the_certificate_and_the_verifier_in_use() {
        let pki = Pki::shared(TD);
        let other = Pki::new(TD);
        let store = IdentityStore::new(pki.identity(API));
        let first = store.current();
        assert!(Arc::ptr_eq(
            &resolver(&store).expect("a certificate"),
            &first.certified
        ));
        let policy = StorePolicy(store.clone());
        let roots = |p: &StorePolicy| p.with_verifier(|v| v.bundle().roots().to_vec());
        assert_eq!(roots(&policy), Some(pki.roots()));

        // The next identity trusts both roots.
        let s = pki.issue(API);
        let both_roots = [pki.roots(), other.roots()].concat();
        let next = Identity::from_parts(s.chain, s.key, both_roots.clone(), BOTH, None)
            .expect("next identity");
        let next_cert = next.certified.clone();
        store.replace(next);
        assert!(Arc::ptr_eq(
            &resolver(&store).expect("a certificate"),
            &next_cert
        ));
        assert!(!Arc::ptr_eq(&next_cert, &first.certified));
        assert_eq!(roots(&policy), Some(both_roots));
        // Whoever held the old identity still has it, intact.
        assert_eq!(first.roots.len(), 1);
    }

    #[test]
    fn an_empty_store_presents_nothing_and_refuses_peers_as_protocol() {
        let pki = Pki::shared(TD);
        let store = IdentityStore::empty();
        assert!(store.get().is_none());
        assert!(resolver(&store).is_none());
        let policy = StorePolicy(store.clone());
        assert!(policy.with_verifier(|_| ()).is_none());
        let leaf = pki.issue(WEB).chain.remove(0);
        let f = classify(&io::Error::new(
            io::ErrorKind::InvalidData,
            policy.refuse(Refusal::NoIdentity, &leaf),
        ));
        assert_eq!(f.reason, "protocol");
        assert_eq!(f.peer_id.as_deref(), Some(pki.id(WEB).as_str()));
    }

    #[tokio::test]
    async fn wait_held_resolves_once_an_identity_is_installed() {
        let pki = Pki::shared(TD);
        let store = IdentityStore::empty();
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait_held().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "resolved with nothing held");
        let metrics = crate::metrics::Metrics::new().expect("metrics");
        let id = pki.identity(API);
        let not_after = id.not_after;
        store.install(id, &metrics, "test");
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("wait_held did not resolve")
            .expect("task");
        assert_eq!(store.current().id, pki.id(API));
        assert_eq!(metrics.cert_expiry.get(), not_after as f64);
        // A store created with an identity is held from the start.
        tokio::time::timeout(
            Duration::from_millis(100),
            IdentityStore::new(pki.identity(API)).wait_held(),
        )
        .await
        .expect("held from the start");
    }

    #[test]
    fn peer_identity_from_certs_names_the_leaf() {
        let pki = Pki::shared(TD);
        let s = pki.issue(WEB);
        let p = PeerIdentity::from_certs(Some(&s.chain)).expect("peer");
        assert_eq!(p.id, pki.id(WEB));
        assert_eq!(p.leaf, s.chain[0]);
        assert_eq!(p.cert_sha256, keys::sha256(&s.chain[0]));
        let (_, parsed) = x509_parser::parse_x509_certificate(&s.chain[0]).expect("leaf");
        assert_eq!(p.spki_sha256, keys::sha256(parsed.public_key().raw));
        assert_ne!(p.spki_sha256, p.cert_sha256);
        // The serial as the deny list keeps it: the same number as the
        // identity's own (which is the raw DER hex), without leading zeros.
        assert!(!p.serial.starts_with('0') && !p.serial.is_empty());
        assert_eq!(
            p.serial,
            hex::encode(parsed.raw_serial()).trim_start_matches('0')
        );
    }

    #[test]
    fn serials_are_lowercase_hex_without_leading_zeros() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x0a]), "8f0a");
        assert_eq!(serial_hex(&[0x0a, 0x1b]), "a1b");
        assert_eq!(serial_hex(&[0x7f]), "7f");
        assert_eq!(serial_hex(&[0x00]), "0");
        assert_eq!(serial_hex(&[]), "0");
    }

    #[test]
    fn peer_identity_from_certs_is_none_without_a_usable_leaf() {
        let pki = Pki::shared(TD);
        assert!(PeerIdentity::from_certs(None).is_none());
        assert!(PeerIdentity::from_certs(Some(&[])).is_none());
        let junk = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])];
        assert!(PeerIdentity::from_certs(Some(&junk)).is_none());
        // No verification happens here (the verifier has decided by then):
        // a root's trust-domain ID is named like any other.
        let root = pki.roots();
        let got = PeerIdentity::from_certs(Some(&root)).map(|p| p.id.to_string());
        assert_eq!(got.as_deref(), Some(format!("spiffe://{TD}").as_str()));
    }

    fn io_err(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn classify_maps_each_refusal_to_its_handshake_label() {
        let pki = Pki::shared(TD);
        let store = IdentityStore::new(pki.identity(API));
        let policy = StorePolicy(store);
        let leaf = pki.issue(WEB).chain.remove(0);
        let refusal = |why: Refusal| io_err(policy.refuse(why, &leaf));
        let cases: Vec<(io::Error, &str)> = vec![
            (refusal(Refusal::NoIdentity), "protocol"),
            (
                refusal(Refusal::Invalid(VerifyError::NoCertificate)),
                "no_client_cert",
            ),
            (
                refusal(Refusal::Invalid(VerifyError::UnknownIssuer)),
                "unknown_ca",
            ),
            (refusal(Refusal::Invalid(VerifyError::Expired)), "expired"),
            (
                refusal(Refusal::Invalid(VerifyError::NotYetValid)),
                "not_yet_valid",
            ),
            (
                refusal(Refusal::Invalid(VerifyError::Svid(SvidError::NoUriSan))),
                "bad_identity",
            ),
            (
                refusal(Refusal::Invalid(VerifyError::ForeignTrustDomain {
                    expected: "a".into(),
                    got: "b".into(),
                })),
                "bad_identity",
            ),
            (
                refusal(Refusal::Mismatch(
                    keyproof_identity::tls::IdentityMismatch {
                        expected: "a".into(),
                        got: "b".into(),
                    },
                )),
                "identity_mismatch",
            ),
            (
                refusal(Refusal::Possession(rustls::Error::InvalidCertificate(
                    CertificateError::BadSignature,
                ))),
                "possession_failed",
            ),
            (
                refusal(Refusal::Invalid(VerifyError::BadKeyUsage("x"))),
                "bad_key_usage",
            ),
            (
                refusal(Refusal::Invalid(VerifyError::Svid(SvidError::LeafIsCa))),
                "bad_key_usage",
            ),
            (
                refusal(Refusal::Invalid(VerifyError::BadChain(
                    "PathLenConstraintViolated".into(),
                ))),
                "bad_chain",
            ),
            (
                refusal(Refusal::Invalid(VerifyError::Svid(
                    SvidError::UnsupportedKey("x".into()),
                ))),
                "unsupported_key",
            ),
            (
                io_err(rustls::Error::NoCertificatesPresented),
                "no_client_cert",
            ),
            (
                io_err(rustls::Error::InvalidCertificate(
                    CertificateError::BadEncoding,
                )),
                "unknown_ca",
            ),
            (
                io_err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(io::Error::other("not ours"))),
                ))),
                "protocol",
            ),
            // The peer refused ours (an inbound whose own certificate
            // expired hears this from every caller).
            (
                io_err(rustls::Error::AlertReceived(
                    rustls::AlertDescription::CertificateExpired,
                )),
                "refused_by_peer",
            ),
            (
                io_err(rustls::Error::AlertReceived(
                    rustls::AlertDescription::HandshakeFailure,
                )),
                "protocol",
            ),
            (
                io::Error::new(io::ErrorKind::UnexpectedEof, "eof"),
                "protocol",
            ),
            // Our own token key could not sign: ours, not the peer's.
            (
                io_err(rustls::Error::Other(OtherError(Arc::new(
                    keyproof_identity::pkcs11::OwnKeyFailed(
                        keyproof_identity::pkcs11::Pkcs11Error::Unavailable {
                            token: "t".into(),
                            last: "removed".into(),
                        },
                    ),
                )))),
                "key_unavailable",
            ),
        ];
        let mut seen = BTreeSet::new();
        for (err, want) in &cases {
            let f = classify(err);
            assert_eq!(f.reason, *want, "{err}");
            assert!(HANDSHAKE_RESULTS.contains(&f.reason), "{}", f.reason);
            seen.insert(f.reason);
        }
        // Everything but success and the accept loop's own timeout comes
        // from classify.
        let expected: BTreeSet<&str> = HANDSHAKE_RESULTS
            .into_iter()
            .filter(|r| !matches!(*r, "ok" | "timeout"))
            .collect();
        assert_eq!(seen, expected);
        // Our own refusals carry the caller's ID and the verifier's words.
        let f = classify(&cases[3].0);
        assert_eq!(f.peer_id.as_deref(), Some(pki.id(WEB).as_str()));
        assert_eq!(f.message, VerifyError::Expired.to_string());
    }

    // ---- real handshakes over an in-memory stream --------------------------

    #[derive(Debug)]
    struct Present(Arc<CertifiedKey>);

    impl ResolvesClientCert for Present {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }

        fn has_certs(&self) -> bool {
            true
        }
    }

    struct Outcome {
        /// The server's view: the caller, or why the handshake failed.
        server: io::Result<Option<PeerIdentity>>,
        /// The client's view: the server's leaf, or why it failed.
        client: io::Result<CertificateDer<'static>>,
    }

    async fn handshake(server: rustls::ServerConfig, client: rustls::ClientConfig) -> Outcome {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let connector = TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from("localhost").expect("name");
        let serve = async {
            let tls = acceptor.accept(s).await?;
            Ok(PeerIdentity::from_certs(
                tls.get_ref().1.peer_certificates(),
            ))
        };
        let call = async {
            let tls = connector.connect(name, c).await?;
            let leaf = tls.get_ref().1.peer_certificates().map(|c| c[0].clone());
            leaf.ok_or_else(|| io::Error::other("no server certificate"))
        };
        let (server, client) =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(serve, call) })
                .await
                .expect("handshake hung");
        Outcome { server, client }
    }

    fn any_in(td: &str) -> IdPattern {
        IdPattern::parse(&format!("spiffe://{td}/*")).expect("pattern")
    }

    /// A client presenting `svid` whatever it is, trusting `trust`'s bundle.
    fn client_presenting(trust: &Arc<IdentityStore>, svid: &Svid) -> rustls::ClientConfig {
        let mut cfg = client_config(trust, any_in(TD), &[b"h2"]).expect("client config");
        cfg.client_auth_cert_resolver = Arc::new(Present(svid.certified()));
        cfg
    }

    #[tokio::test]
    async fn a_replaced_identity_is_presented_in_the_next_handshake() {
        let pki = Pki::shared(TD);
        let server = IdentityStore::new(pki.identity(API));
        let client = IdentityStore::new(pki.identity(WEB));
        let cfg = server_config(&server).expect("server config");
        let ccfg = client_config(&client, any_in(TD), &[b"h2"]).expect("client config");
        let first = handshake(cfg.clone(), ccfg.clone()).await;
        let caller = first.server.expect("server side").expect("caller");
        assert_eq!(caller.id, pki.id(WEB));
        assert_eq!(
            first.client.expect("client side"),
            server.current().certified.cert[0]
        );

        let next = pki.identity(API);
        let next_leaf = next.certified.cert[0].clone();
        server.replace(next);
        // Same rustls configurations: the swap needs no rebuild.
        let second = handshake(cfg, ccfg).await;
        assert_eq!(second.client.expect("client side"), next_leaf);
        assert!(second.server.is_ok());
    }

    #[tokio::test]
    async fn the_verifiers_use_the_bundle_of_the_replaced_identity() {
        let pki = Pki::shared(TD);
        let newer = Pki::new(TD);
        let server = IdentityStore::new(pki.identity(API));
        // The caller's certificate comes from a second root of the trust
        // domain, which the server does not trust yet.
        let s = newer.issue(WEB);
        let both_roots = [pki.roots(), newer.roots()].concat();
        let client = IdentityStore::new(
            Identity::from_parts(s.chain, s.key, both_roots.clone(), BOTH, None).expect("client"),
        );
        let cfg = server_config(&server).expect("server config");
        let ccfg = client_config(&client, any_in(TD), &[b"h2"]).expect("client config");
        let before = handshake(cfg.clone(), ccfg.clone()).await;
        let e = before
            .server
            .expect_err("caller of an untrusted root accepted");
        let f = classify(&e);
        assert_eq!(f.reason, "unknown_ca", "{}", f.message);
        assert_eq!(f.peer_id.as_deref(), Some(newer.id(WEB).as_str()));

        let s = pki.issue(API);
        server
            .replace(Identity::from_parts(s.chain, s.key, both_roots, BOTH, None).expect("server"));
        let after = handshake(cfg, ccfg).await;
        let caller = after.server.expect("server side").expect("caller");
        assert_eq!(caller.id, newer.id(WEB));
    }

    #[tokio::test]
    async fn handshake_failures_are_classified_by_what_the_peer_got_wrong() {
        let pki = Pki::shared(TD);
        let other_td = Pki::shared("other.keyproof.test");
        let s = pki.issue(API);
        let server = IdentityStore::new(
            Identity::from_parts(
                s.chain,
                s.key,
                [pki.roots(), other_td.roots()].concat(),
                BOTH,
                None,
            )
            .expect("server"),
        );
        let trust = IdentityStore::new(pki.identity(WEB));
        let cfg = server_config(&server).expect("server config");
        let valid = pki.issue(WEB);
        let impostor = Svid {
            chain: valid.chain.clone(),
            key: pki.issue(WEB).key,
        };
        // Whether the refusal may be held against the ID the certificate
        // claims: only once the certificate chained to the bundle.
        let cases: Vec<(&str, Svid, &str, bool)> = vec![
            (
                "expired",
                pki.craft(
                    WEB,
                    Leaf {
                        not_before: -7200,
                        not_after: -3600,
                        ..Leaf::default()
                    },
                ),
                "expired",
                false,
            ),
            (
                "not yet valid",
                pki.craft(
                    WEB,
                    Leaf {
                        not_before: 3600,
                        not_after: 7200,
                        ..Leaf::default()
                    },
                ),
                "not_yet_valid",
                false,
            ),
            (
                "server-only EKU",
                pki.craft(
                    WEB,
                    Leaf {
                        eku: Some(&[SERVER_AUTH]),
                        ..Leaf::default()
                    },
                ),
                "bad_key_usage",
                // Ours, for the other purpose: it names who holds it.
                true,
            ),
            (
                "server-only EKU from an unknown root",
                Pki::new(TD).craft(
                    WEB,
                    Leaf {
                        eku: Some(&[SERVER_AUTH]),
                        ..Leaf::default()
                    },
                ),
                "bad_key_usage",
                // Anyone's making: no refusal is held against the ID.
                false,
            ),
            (
                "CA as leaf",
                pki.craft(
                    WEB,
                    Leaf {
                        ca: true,
                        ..Leaf::default()
                    },
                ),
                "bad_key_usage",
                false,
            ),
            (
                "P-384 key",
                pki.craft(
                    WEB,
                    Leaf {
                        p384: true,
                        ..Leaf::default()
                    },
                ),
                "unsupported_key",
                true,
            ),
            (
                "another trust domain",
                other_td.issue(WEB),
                "bad_identity",
                true,
            ),
            ("unknown root", Pki::new(TD).issue(WEB), "unknown_ca", false),
            (
                "certificate without its key",
                impostor,
                "possession_failed",
                true,
            ),
        ];
        for (what, svid, want, chained) in cases {
            let out = handshake(cfg.clone(), client_presenting(&trust, &svid)).await;
            let e = match out.server {
                Ok(_) => panic!("{what}: accepted"),
                Err(e) => e,
            };
            let f = classify(&e);
            assert_eq!(f.reason, want, "{what}: {}", f.message);
            assert!(f.peer_id.is_some(), "{what}: the claimed ID is logged");
            assert_eq!(f.chain_verified, chained, "{what}");
            assert_eq!(f.verified_peer().is_some(), chained, "{what}");
        }

        // The control: the same client with a valid certificate gets in.
        let out = handshake(cfg.clone(), client_presenting(&trust, &valid)).await;
        assert!(out.server.is_ok(), "{:?}", out.server.err());

        // No client certificate at all.
        let no_cert =
            rustls::ClientConfig::builder_with_provider(keyproof_identity::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .dangerous()
                .with_custom_certificate_verifier(SvidServerVerifier::new(
                    StorePolicy(trust.clone()),
                    any_in(TD),
                ))
                .with_no_client_auth();
        let out = handshake(cfg.clone(), no_cert).await;
        assert_eq!(classify(&out.server.unwrap_err()).reason, "no_client_cert");

        // The client expects another workload: its own side fails.
        let wrong = client_config(
            &trust,
            IdPattern::parse(&format!("spiffe://{TD}/ns/x/sa/y")).expect("id"),
            &[b"h2"],
        )
        .expect("client config");
        let out = handshake(cfg.clone(), wrong).await;
        let f = classify(&out.client.unwrap_err());
        assert_eq!(f.reason, "identity_mismatch", "{}", f.message);
        assert_eq!(f.peer_id.as_deref(), Some(pki.id(API).as_str()));

        // Not TLS at all.
        let (mut c, s) = tokio::io::duplex(4096);
        tokio::io::AsyncWriteExt::write_all(&mut c, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let e = TlsAcceptor::from(Arc::new(cfg))
            .accept(s)
            .await
            .map(|_| ())
            .unwrap_err();
        assert_eq!(classify(&e).reason, "protocol");
    }
}
