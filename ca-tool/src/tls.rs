//! rustls adapters around [`SvidVerifier`]: a client-certificate verifier for
//! servers and a server-certificate verifier for clients, both reading the
//! current verifier from a source that may change (rotation, reload).

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::spiffe::IdPattern;
use crate::verify::{SvidVerifier, Usage, VerifyError};

/// The current verifier, swappable while connections use the old one.
pub type SharedVerifier = Arc<ArcSwap<SvidVerifier>>;

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// Converts a verification failure into the rustls error that carries it,
/// keeping the typed [`VerifyError`] reachable for metrics and logs.
pub fn to_rustls(e: VerifyError) -> rustls::Error {
    let cert = match e {
        VerifyError::Expired => CertificateError::Expired,
        VerifyError::NotYetValid => CertificateError::NotValidYet,
        VerifyError::UnknownIssuer => CertificateError::UnknownIssuer,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert)
}

/// Verifies client certificates as X.509-SVIDs of the trust domain.
pub struct SvidClientVerifier {
    verifier: SharedVerifier,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl SvidClientVerifier {
    /// `mandatory = false` lets clients without a certificate in (the CA's
    /// bootstrap endpoint authenticates them with a token instead).
    pub fn new(verifier: SharedVerifier, mandatory: bool) -> Arc<Self> {
        Arc::new(SvidClientVerifier {
            verifier,
            mandatory,
            algs: algorithms(),
        })
    }
}

impl fmt::Debug for SvidClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidClientVerifier")
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier
            .load()
            .verify(end_entity, intermediates, now, Usage::ClientAuth)
            .map(|_| ClientCertVerified::assertion())
            .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies a server's X.509-SVID and that its SPIFFE ID matches a pattern.
/// The TLS server name is not used: SPIFFE identifies servers by URI SAN.
pub struct SvidServerVerifier {
    verifier: SharedVerifier,
    expected: IdPattern,
    algs: WebPkiSupportedAlgorithms,
}

impl SvidServerVerifier {
    /// A verifier expecting a server whose ID matches `expected`.
    pub fn new(verifier: SharedVerifier, expected: IdPattern) -> Arc<Self> {
        Arc::new(SvidServerVerifier {
            verifier,
            expected,
            algs: algorithms(),
        })
    }
}

impl fmt::Debug for SvidServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidServerVerifier")
            .field("expected", &self.expected.to_string())
            .finish()
    }
}

/// The server presented a valid SVID with an unexpected identity.
#[derive(Debug, thiserror::Error)]
#[error("peer identity mismatch: expected {expected}, got {got}")]
pub struct IdentityMismatch {
    pub expected: String,
    pub got: String,
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
        let v = self
            .verifier
            .load()
            .verify(end_entity, intermediates, now, Usage::ServerAuth)
            .map_err(to_rustls)?;
        if !self.expected.matches(&v.spiffe_id) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(IdentityMismatch {
                    expected: self.expected.to_string(),
                    got: v.spiffe_id.to_string(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
