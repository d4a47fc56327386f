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

/// The label of the TLS exporter that gives a connection's channel binding
/// (RFC 9266, `tls-exporter`), with an empty context and 32 bytes.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";

/// The 32-byte channel binding of a TLS 1.3 connection whose handshake is
/// done ([`CHANNEL_BINDING_LABEL`]); `None` when the connection cannot
/// export keying material, which a caller must treat as a failure, never as
/// a binding of zeros.
pub fn channel_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, CHANNEL_BINDING_LABEL, Some(b""))
        .ok()?;
    Some(out)
}

/// The current verifier, swappable while connections use the old one.
pub type SharedVerifier = Arc<ArcSwap<SvidVerifier>>;

/// What a peer's CertificateVerify may be checked with: exactly the
/// signature schemes of the keys an X.509-SVID may hold (ECDSA P-256 with
/// SHA-256, Ed25519; see [`crate::svid::LEAF_RULES`]). Any other scheme is a
/// failed proof of possession.
///
/// The schemes *offered* (CertificateRequest, ClientHello
/// `signature_algorithms`) stay rustls' full list on purpose: a peer whose
/// key keyproof refuses (RSA, P-384) then still presents its certificate,
/// and the chain verifier refuses it as `unsupported_key`, naming the peer.
/// Offering only these two would make such a peer (openssl, curl, rustls)
/// withhold its certificate instead, and the refusal would read
/// `no_client_cert`: the same outcome, with the true reason lost. The key
/// type is checked on the certificate before any CertificateVerify is
/// looked at, so the wider offer accepts nothing more.
static SVID_SIGNATURE_ALGORITHMS: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[
        webpki::aws_lc_rs::ECDSA_P256_SHA256,
        webpki::aws_lc_rs::ED25519,
    ],
    mapping: &[
        (
            SignatureScheme::ECDSA_NISTP256_SHA256,
            &[webpki::aws_lc_rs::ECDSA_P256_SHA256],
        ),
        (SignatureScheme::ED25519, &[webpki::aws_lc_rs::ED25519]),
    ],
};

/// The schemes offered to peers (see [`SVID_SIGNATURE_ALGORITHMS`] for why
/// this is wider than what is accepted).
fn offered_schemes() -> Vec<SignatureScheme> {
    static OFFERED: std::sync::LazyLock<Vec<SignatureScheme>> = std::sync::LazyLock::new(|| {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    });
    OFFERED.clone()
}

/// Checks a peer's TLS 1.3 CertificateVerify against the schemes of
/// [`SVID_SIGNATURE_ALGORITHMS`]; any failure is the peer not proving that
/// it holds the key of the certificate it presented.
fn verify_possession<P: PeerPolicy>(
    policy: &P,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    verify_tls13_signature(message, cert, dss, &SVID_SIGNATURE_ALGORITHMS)
        .map_err(|e| policy.refuse(Refusal::Possession(e), cert))
}

/// The key-exchange groups of every keyproof endpoint, most preferred
/// first: the hybrid X25519MLKEM768 (post-quantum ML-KEM-768 with X25519),
/// then the classic groups for peers without ML-KEM (OpenSSL before 3.5,
/// older Go and Envoy).
///
/// A rustls client sends a key share for the first group only, plus, when
/// that group is a hybrid, its classic component: keyproof clients send
/// X25519MLKEM768 and X25519 shares, so servers without ML-KEM pick X25519
/// without a HelloRetryRequest. A rustls server picks the first group of
/// the *client's* list that it supports, so keyproof servers agree on
/// X25519MLKEM768 with every client that prefers it, and never force it on
/// a client that ranks it lower (that would cost a HelloRetryRequest round
/// trip). The price is a larger handshake (the client's ML-KEM-768 share is
/// 1,216 bytes, the server's 1,120: a ClientHello of about 1.4 KB instead of
/// 0.25 KB, still one segment at a 1,460-byte MSS) and some CPU:
/// `benches/README.md` has figures (`benches/kx-compare.sh`).
pub fn kx_groups() -> Vec<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::aws_lc_rs::kx_group;
    vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
        kx_group::SECP384R1,
    ]
}

/// The label a negotiated key-exchange group is exported under
/// (`keyproof_tls_key_exchange_total{group}` in the proxy).
pub fn group_label(group: rustls::NamedGroup) -> &'static str {
    match group {
        rustls::NamedGroup::X25519MLKEM768 => "x25519mlkem768",
        rustls::NamedGroup::X25519 => "x25519",
        rustls::NamedGroup::secp256r1 => "secp256r1",
        rustls::NamedGroup::secp384r1 => "secp384r1",
        _ => "other",
    }
}

/// Every label [`group_label`] returns, in [`kx_groups`] order.
pub const GROUP_LABELS: [&str; 5] = [
    "x25519mlkem768",
    "x25519",
    "secp256r1",
    "secp384r1",
    "other",
];

/// The crypto provider of every keyproof TLS endpoint (proxy inbound and
/// outbound, CA server and client): aws-lc-rs, preferring
/// TLS_AES_128_GCM_SHA256 and the key-exchange groups of [`kx_groups`]
/// (X25519MLKEM768 first).
///
/// rustls' default order puts TLS_AES_256_GCM_SHA384 first. Its SHA-384 runs
/// the whole TLS 1.3 key schedule and transcript hash, and x86 has no
/// instruction for it (SHA-NI covers SHA-256): it was 6% of the CA server's
/// CPU per new connection. AES-128-GCM is the suite TLS 1.3 makes mandatory
/// (RFC 8446 §9.1) and the first choice of BoringSSL (Envoy, Istio) and Go.
/// The other suites stay enabled for peers that only offer them; servers set
/// `ignore_client_order` so their order decides.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.suite() != TLS13_AES_128_GCM_SHA256.suite());
    provider.cipher_suites.insert(0, TLS13_AES_128_GCM_SHA256);
    provider.kx_groups = kx_groups();
    Arc::new(provider)
}

/// The server side of every keyproof endpoint (proxy inbound, CA server):
/// TLS 1.3 only, [`provider`] with the server's suite order, ALPN `h2` and
/// `http/1.1`, and no session resumption. A resumed session would skip
/// `client_verifier`, and with it the proof of key possession, expiry and
/// trust-bundle changes.
pub fn server_config(
    client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    certs: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
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

/// Why an adapter refused a peer.
#[derive(Debug)]
pub enum Refusal {
    /// No identity, and so no trust bundle, is held yet.
    NoIdentity,
    /// The chain, the SVID rules or the trust domain.
    Invalid(VerifyError),
    /// A valid SVID whose ID is not the one expected.
    Mismatch(IdentityMismatch),
    /// The peer's CertificateVerify does not verify with the key of the
    /// certificate it presented (or uses a scheme no SVID key has): it
    /// showed a certificate without proving it holds the key.
    Possession(rustls::Error),
}

/// Where the adapters get the verifier in force for each handshake, and how
/// they turn a refusal into the rustls error that ends it (so a caller can
/// carry whatever it counts and logs).
pub trait PeerPolicy: Send + Sync + fmt::Debug {
    /// Runs `f` with the current verifier; `None` when none is held.
    fn with_verifier<R>(&self, f: impl FnOnce(&SvidVerifier) -> R) -> Option<R>;
    /// The error for a refused peer.
    fn refuse(&self, why: Refusal, end_entity: &CertificateDer<'_>) -> rustls::Error;
}

/// The plain policy: one swappable verifier; refusals map to the closest
/// rustls error, with the typed cause reachable through it.
#[derive(Debug, Clone)]
pub struct Shared(pub SharedVerifier);

impl PeerPolicy for Shared {
    fn with_verifier<R>(&self, f: impl FnOnce(&SvidVerifier) -> R) -> Option<R> {
        Some(f(&self.0.load()))
    }

    fn refuse(&self, why: Refusal, _end_entity: &CertificateDer<'_>) -> rustls::Error {
        match why {
            Refusal::NoIdentity => rustls::Error::General("no trust bundle held".into()),
            Refusal::Invalid(e) => to_rustls(e),
            Refusal::Mismatch(m) => {
                rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(m))))
            }
            Refusal::Possession(e) => e,
        }
    }
}

fn verify_with<P: PeerPolicy>(
    policy: &P,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<crate::verify::VerifiedSvid, rustls::Error> {
    match policy.with_verifier(|v| v.verify(end_entity, intermediates, now, usage)) {
        None => Err(policy.refuse(Refusal::NoIdentity, end_entity)),
        Some(Err(e)) => Err(policy.refuse(Refusal::Invalid(e), end_entity)),
        Some(Ok(v)) => Ok(v),
    }
}

/// Verifies client certificates as X.509-SVIDs of the trust domain.
pub struct SvidClientVerifier<P> {
    policy: P,
    mandatory: bool,
}

impl<P: PeerPolicy> SvidClientVerifier<P> {
    /// `mandatory = false` lets clients without a certificate in (the CA's
    /// bootstrap endpoint authenticates them with a token instead).
    pub fn new(policy: P, mandatory: bool) -> Arc<Self> {
        Arc::new(SvidClientVerifier { policy, mandatory })
    }
}

impl<P: PeerPolicy> fmt::Debug for SvidClientVerifier<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidClientVerifier")
            .field("policy", &self.policy)
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

impl<P: PeerPolicy> ClientCertVerifier for SvidClientVerifier<P> {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would reveal the bundle and help nobody: a workload has one
        // certificate.
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
        verify_with(
            &self.policy,
            end_entity,
            intermediates,
            now,
            Usage::ClientAuth,
        )
        .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Every keyproof config is TLS 1.3 only; should one ever allow 1.2,
        // the proof is held to the same schemes.
        verify_tls12_signature(message, cert, dss, &SVID_SIGNATURE_ALGORITHMS)
            .map_err(|e| self.policy.refuse(Refusal::Possession(e), cert))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_possession(&self.policy, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        offered_schemes()
    }
}

/// Verifies a server's X.509-SVID and that its SPIFFE ID matches a pattern.
/// The TLS server name is not used: SPIFFE identifies servers by URI SAN.
pub struct SvidServerVerifier<P> {
    policy: P,
    expected: IdPattern,
}

impl<P: PeerPolicy> SvidServerVerifier<P> {
    /// A verifier expecting a server whose ID matches `expected`.
    pub fn new(policy: P, expected: IdPattern) -> Arc<Self> {
        Arc::new(SvidServerVerifier { policy, expected })
    }
}

impl<P: PeerPolicy> fmt::Debug for SvidServerVerifier<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidServerVerifier")
            .field("policy", &self.policy)
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

impl<P: PeerPolicy> ServerCertVerifier for SvidServerVerifier<P> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let v = verify_with(
            &self.policy,
            end_entity,
            intermediates,
            now,
            Usage::ServerAuth,
        )?;
        if !self.expected.matches(&v.spiffe_id) {
            let m = IdentityMismatch {
                expected: self.expected.to_string(),
                got: v.spiffe_id.to_string(),
            };
            return Err(self.policy.refuse(Refusal::Mismatch(m), end_entity));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Every keyproof config is TLS 1.3 only; should one ever allow 1.2,
        // the proof is held to the same schemes.
        verify_tls12_signature(message, cert, dss, &SVID_SIGNATURE_ALGORITHMS)
            .map_err(|e| self.policy.refuse(Refusal::Possession(e), cert))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_possession(&self.policy, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        offered_schemes()
    }
}
