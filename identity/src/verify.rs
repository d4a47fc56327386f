//! Chain validation against a trust bundle, plus the X.509-SVID rules and the
//! trust-domain match: the verifier the proxy uses for every peer.

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

/// The extended-key-usage requirement passed to [`verify_path`].
pub use webpki::KeyUsage as EkuUsage;

use crate::keys;
use crate::sigcache;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::{self, SvidError};

/// Why a peer's chain was refused. [`VerifyError::reason`] gives the metric
/// label the proxy counts it under.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no certificate presented")]
    NoCertificate,
    #[error("certificate is not signed by a trusted root")]
    UnknownIssuer,
    #[error("certificate has expired")]
    Expired,
    #[error("certificate is not valid yet")]
    NotYetValid,
    #[error("certificate chain is invalid: {0}")]
    BadChain(String),
    /// Path validation refused what the certificate is used for: a CA
    /// certificate presented as the end entity, or an extended key usage
    /// without the one this side of the handshake needs.
    #[error("certificate may not be used this way: {0}")]
    BadKeyUsage(&'static str),
    /// The chain is valid, to a root of the bundle, for the other side's
    /// purpose only: a certificate of this trust domain's issuing, made
    /// for a server (or a client), presented as the other.
    #[error("certificate may not be used this way: {0}")]
    WrongPurpose(&'static str),
    #[error("not a valid X.509-SVID: {0}")]
    Svid(#[from] SvidError),
    #[error("SPIFFE ID {got} is not in trust domain {expected}")]
    ForeignTrustDomain { expected: String, got: String },
    #[error("trust bundle has no usable root")]
    EmptyBundle,
    #[error("trust bundle root is unusable: {0}")]
    BadRoot(String),
}

impl VerifyError {
    /// The `result` label for `keyproof_tls_handshakes_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::NoCertificate => "no_client_cert",
            VerifyError::UnknownIssuer | VerifyError::EmptyBundle | VerifyError::BadRoot(_) => {
                "unknown_ca"
            }
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            // Under a root of the bundle, but not a valid path: a path
            // length, an unknown critical extension, a name constraint.
            // Not `unknown_ca`, which operators watch during root rotation.
            VerifyError::BadChain(_) => "bad_chain",
            VerifyError::BadKeyUsage(_) | VerifyError::WrongPurpose(_) => "bad_key_usage",
            VerifyError::Svid(SvidError::UnsupportedKey(_)) => "unsupported_key",
            VerifyError::Svid(e) if e.is_key_usage() => "bad_key_usage",
            VerifyError::Svid(_) | VerifyError::ForeignTrustDomain { .. } => "bad_identity",
        }
    }
}

fn map_webpki(e: webpki::Error) -> VerifyError {
    match e {
        // A name-matching issuer whose key did not sign this certificate is,
        // to the operator, the same thing: not signed by a trusted root.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            VerifyError::UnknownIssuer
        }
        webpki::Error::CertExpired { .. } => VerifyError::Expired,
        webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid,
        webpki::Error::CaUsedAsEndEntity => {
            VerifyError::BadKeyUsage("a CA certificate (cA=true) presented as the end entity")
        }
        webpki::Error::EndEntityUsedAsCa => VerifyError::BadKeyUsage(
            "an end-entity certificate (cA=false) used to issue another certificate",
        ),
        #[allow(deprecated)]
        webpki::Error::RequiredEkuNotFound
        | webpki::Error::RequiredEkuNotFoundContext(_)
        | webpki::Error::EmptyEkuExtension => VerifyError::BadKeyUsage(
            "extended key usage lacks the purpose of this side (clientAuth for callers, serverAuth for servers)",
        ),
        other => VerifyError::BadChain(format!("{other:?}")),
    }
}

/// Which extended key usage the end-entity certificate must allow (when it
/// has an EKU extension at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The peer is a TLS client (inbound handshakes).
    ClientAuth,
    /// The peer is a TLS server (outbound handshakes).
    ServerAuth,
}

/// The outcome of validating a path: the end-entity's SPKI hash and expiry.
#[derive(Debug, Clone)]
pub struct VerifiedSvid {
    /// The peer's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// SHA-256 of the end-entity SubjectPublicKeyInfo DER.
    pub spki_sha256: [u8; 32],
    /// When the validated chain stops being valid: the earliest notAfter of
    /// the end-entity certificate and the intermediates of its path,
    /// seconds since the epoch. An intermediate that expires before the
    /// leaf fails every later handshake as surely as the leaf would.
    pub not_after: i64,
}

/// Trust anchors owned for the life of the verifier.
#[derive(Debug)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    /// (notBefore, notAfter) of each root, seconds since the epoch. webpki
    /// treats anchors as bare keys and ignores their validity; an expired
    /// root must not be trusted, so keyproof checks it itself.
    validity: Vec<(i64, i64)>,
}

impl TrustBundle {
    /// Builds anchors from DER root certificates.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, VerifyError> {
        if roots.is_empty() {
            return Err(VerifyError::EmptyBundle);
        }
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| VerifyError::BadRoot(format!("{e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let validity = roots
            .iter()
            .map(|r| {
                x509_parser::parse_x509_certificate(r)
                    .map(|(_, c)| {
                        (
                            c.validity().not_before.timestamp(),
                            c.validity().not_after.timestamp(),
                        )
                    })
                    .map_err(|e| VerifyError::BadRoot(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustBundle {
            roots,
            anchors,
            validity,
        })
    }

    /// Checks that the anchor a path ended at is within its validity period.
    fn check_anchor(&self, anchor: &TrustAnchor<'_>, now: UnixTime) -> Result<(), VerifyError> {
        let now = now.as_secs() as i64;
        let idx = self.anchors.iter().position(|a| {
            a.subject_public_key_info == anchor.subject_public_key_info
                && a.subject == anchor.subject
        });
        match idx.map(|i| self.validity[i]) {
            Some((nb, _)) if now < nb => Err(VerifyError::NotYetValid),
            Some((_, na)) if now > na => Err(VerifyError::Expired),
            _ => Ok(()),
        }
    }

    /// Parses a PEM bundle.
    pub fn from_pem(pem: &[u8]) -> Result<Self, VerifyError> {
        let roots = keys::certs_from_pem(pem).map_err(|e| VerifyError::BadRoot(e.to_string()))?;
        Self::new(roots)
    }

    /// The root certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The trust anchors.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

/// Path validation only (RFC 5280 via rustls-webpki), with a caller-chosen
/// EKU. Returns nothing but success; the SVID layer adds identity.
pub fn verify_path(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    eku: KeyUsage,
) -> Result<(), VerifyError> {
    let ee = EndEntityCert::try_from(end_entity).map_err(map_webpki)?;
    let path = ee
        .verify_for_usage(
            sigcache::chain_algorithms(),
            bundle.anchors(),
            intermediates,
            now,
            eku,
            None,
            None,
        )
        .map_err(map_webpki)?;
    bundle.check_anchor(path.anchor(), now)
}

/// Verifies X.509-SVIDs of one trust domain against its bundle.
#[derive(Debug)]
pub struct SvidVerifier {
    trust_domain: TrustDomain,
    bundle: TrustBundle,
}

impl SvidVerifier {
    /// A verifier accepting SVIDs of `trust_domain` that chain to `bundle`.
    pub fn new(trust_domain: TrustDomain, bundle: TrustBundle) -> Self {
        SvidVerifier {
            trust_domain,
            bundle,
        }
    }

    /// The trust domain accepted.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The bundle in use.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Validates the chain, then the SVID rules on the leaf and on every
    /// intermediate, then the trust domain.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<VerifiedSvid, VerifyError> {
        let ee = EndEntityCert::try_from(end_entity).map_err(map_webpki)?;
        let (eku, other) = match usage {
            Usage::ClientAuth => (KeyUsage::client_auth(), KeyUsage::server_auth()),
            Usage::ServerAuth => (KeyUsage::server_auth(), KeyUsage::client_auth()),
        };
        let verify = |eku| {
            ee.verify_for_usage(
                sigcache::chain_algorithms(),
                self.bundle.anchors(),
                intermediates,
                now,
                eku,
                None,
                None,
            )
        };
        let path = match verify(eku) {
            Ok(p) => p,
            Err(e) => {
                let e = map_webpki(e);
                // webpki refuses the purpose before it checks a signature:
                // whether the chain is ours is found out with the other
                // purpose (only such a refusal may name who holds it).
                if let VerifyError::BadKeyUsage(why) = e {
                    if verify(other)
                        .is_ok_and(|p| self.bundle.check_anchor(p.anchor(), now).is_ok())
                    {
                        return Err(VerifyError::WrongPurpose(why));
                    }
                }
                return Err(e);
            }
        };
        self.bundle.check_anchor(path.anchor(), now)?;
        let mut not_after = i64::MAX;
        for ca in path.intermediate_certificates() {
            let der = ca.der();
            let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
                .map_err(|e| VerifyError::BadChain(format!("intermediate: {e}")))?;
            svid::check_signing(&parsed)?;
            not_after = not_after.min(parsed.validity().not_after.timestamp());
        }
        let (_, leaf) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|e| SvidError::Parse(e.to_string()))?;
        let spiffe_id = svid::check_leaf(&leaf)?;
        if !spiffe_id.is_member_of(&self.trust_domain) {
            return Err(VerifyError::ForeignTrustDomain {
                expected: self.trust_domain.to_string(),
                got: spiffe_id.to_string(),
            });
        }
        Ok(VerifiedSvid {
            spiffe_id,
            spki_sha256: keys::sha256(leaf.public_key().raw),
            not_after: not_after.min(leaf.validity().not_after.timestamp()),
        })
    }
}
