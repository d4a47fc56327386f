//! Issuing X.509-SVIDs, and where `issue` may write them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyproof_identity::keys;
use keyproof_identity::spiffe::SpiffeId;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::ca::{self, Ca, CaError, Lifetime, BACKDATE};
use crate::csr::SubjectKey;
use crate::ledger;

/// What to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The identity; must be a workload ID in the CA's trust domain.
    pub spiffe_id: SpiffeId,
    /// The key to certify (from a verified CSR or a key the CA generated).
    pub key: SubjectKey,
    /// Requested lifetime; capped at the intermediate's expiry.
    pub ttl: Duration,
    /// Extra DNS SANs.
    pub dns: Vec<String>,
}

/// An issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf.
    pub leaf: CertificateDer<'static>,
    /// The intermediate that signed it.
    pub intermediate: CertificateDer<'static>,
    /// The ledger line recorded for it.
    pub entry: ledger::Entry,
}

impl Issued {
    /// Leaf then intermediate, PEM: what a workload presents.
    pub fn chain_pem(&self) -> String {
        keys::cert_pem(&self.leaf) + &keys::cert_pem(&self.intermediate)
    }
}

/// Checks a DNS name for a certificate's SAN: for `--dns` at argument
/// parsing, so the error names the flag before anything is done.
pub fn check_dns_name(name: &str) -> Result<String, String> {
    if valid_dns_name(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "invalid DNS name {name:?}: expected labels of letters, digits and '-' separated by \
             dots, the last not all digits (a leading \"*.\" allowed), e.g. web.default.svc"
        ))
    }
}

fn valid_dns_name(name: &str) -> bool {
    // The last label is a top-level name, never all digits (RFC 3696
    // section 2): `1.2.3.4` is an address, not a dNSName. A wildcard needs
    // a name below it: a bare `*` would match every host.
    let last = name.rsplit('.').next().unwrap_or(name);
    !name.is_empty()
        && name != "*"
        && !last.bytes().all(|b| b.is_ascii_digit())
        && name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            (!label.is_empty() && label.len() <= 63)
                && (label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    || (i == 0 && label == "*"))
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `id` is one the CA keeps for its own server:
/// `spiffe://<td>/keyproof-ca` (what `serve` presents and every client
/// expects of it by default) and every ID below it. A workload holding one
/// would be taken for the CA by `renew` and the sidecars, and be sent their
/// CSRs and bootstrap credentials.
pub fn reserved_for_the_ca(id: &SpiffeId) -> bool {
    keyproof_identity::spiffe::is_ca_server_id(id)
}

/// Refuses an ID the CA keeps for itself ([`reserved_for_the_ca`]).
pub fn check_not_reserved(id: &SpiffeId) -> Result<(), CaError> {
    if reserved_for_the_ca(id) {
        return Err(CaError::ReservedId(id.to_string()));
    }
    Ok(())
}

impl Ca {
    /// Checks the request against the CA's rules and signs a leaf. Nothing is
    /// written; call [`Ca::record`] before handing the certificate out. An ID
    /// the CA keeps for itself is refused ([`reserved_for_the_ca`]).
    pub fn sign(&self, req: &IssueRequest, requester: &str) -> Result<Issued, CaError> {
        check_not_reserved(&req.spiffe_id)?;
        self.sign_any(req, requester)
    }

    /// [`Ca::sign`] for the CA server's own certificate: the one caller
    /// allowed an ID the CA keeps for itself.
    pub fn sign_server(&self, req: &IssueRequest, requester: &str) -> Result<Issued, CaError> {
        self.sign_any(req, requester)
    }

    fn sign_any(&self, req: &IssueRequest, requester: &str) -> Result<Issued, CaError> {
        let id = &req.spiffe_id;
        if !id.is_member_of(self.trust_domain()) {
            return Err(CaError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain().to_string(),
            });
        }
        if !id.is_workload() {
            return Err(CaError::NotAWorkloadId(id.to_string()));
        }
        Lifetime::Svid.check(req.ttl)?;
        for d in &req.dns {
            if !valid_dns_name(d) {
                return Err(CaError::BadDnsName(d.clone()));
            }
        }
        let now = ca::now();
        if now >= self.intermediate_not_after {
            return Err(CaError::IntermediateExpired(ca::rfc3339(
                self.intermediate_not_after,
            )));
        }
        if now < self.intermediate_not_before {
            return Err(CaError::IntermediateNotYetValid(ca::rfc3339(
                self.intermediate_not_before,
            )));
        }
        let not_before = (now - BACKDATE).max(self.intermediate_not_before);
        let not_after = Lifetime::Svid
            .end(now, req.ttl)?
            .min(self.intermediate_not_after);

        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "keyproof");
        p.distinguished_name = dn;
        let serial = ca::random_serial();
        p.serial_number = Some(serial.clone());
        p.not_before = not_before;
        p.not_after = not_after;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.subject_alt_names
            .push(SanType::URI(id.as_str().try_into()?));
        for d in &req.dns {
            p.subject_alt_names
                .push(SanType::DnsName(d.as_str().try_into()?));
        }
        let issuer = self.issuer()?;
        let leaf = p
            .signed_by(&req.key, issuer)
            .map_err(|e| ca::signing_error(e, "intermediate key", issuer.key()))?
            .der()
            .clone();
        let entry = ledger::Entry {
            serial: ca::serial_hex(&serial.to_bytes()),
            spiffe_id: id.to_string(),
            not_before: ca::rfc3339(not_before),
            not_after: ca::rfc3339(not_after),
            issuer_key_id: self.issuer_key_id.clone(),
            root_sha256: self.root_sha256.clone(),
            sha256: keys::fingerprint(&leaf),
            issued_at: ca::rfc3339(now),
            requester: requester.to_owned(),
            renewed_from: None,
        };
        Ok(Issued {
            leaf,
            intermediate: self.intermediate().clone(),
            entry,
        })
    }

    /// Appends the issuance to the ledger.
    pub fn record(&self, issued: &Issued) -> Result<(), CaError> {
        ledger::append(self.dir(), &issued.entry)
    }

    /// Signs and records.
    pub fn issue(&self, req: &IssueRequest, requester: &str) -> Result<Issued, CaError> {
        let issued = self.sign(req, requester)?;
        self.record(&issued)?;
        Ok(issued)
    }

    /// The intermediate's validity end.
    pub fn intermediate_not_after(&self) -> OffsetDateTime {
        self.intermediate_not_after
    }
}

/// Why `issue` refuses an output file.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The file exists and `--force` was not given.
    #[error("--{flag} {}: already exists; pass --force to replace it", path.display())]
    Exists { flag: &'static str, path: PathBuf },
    /// The file is inside the CA directory (it could replace the CA's own
    /// root, keys or ledger).
    #[error(
        "--{flag} {}: is inside the CA directory {}; keyproof-ca never writes issued files there, not even with --force",
        path.display(),
        ca_dir.display()
    )]
    InsideCa {
        flag: &'static str,
        path: PathBuf,
        ca_dir: PathBuf,
    },
    /// `--key-out` and `--cert-out` name the same file.
    #[error("--key-out and --cert-out must be different files")]
    Same,
    /// The path cannot be resolved (no such directory, not a file name...).
    #[error("--{flag} {}: {source}", path.display())]
    Io {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where an output file will be: its directory with every symbolic link and
/// `..` resolved, joined with its file name.
fn resolve_location(path: &Path) -> std::io::Result<PathBuf> {
    let name = match path.file_name() {
        Some(n) if !path.as_os_str().as_encoded_bytes().ends_with(b"/") => n,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a file name",
            ))
        }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(std::fs::canonicalize(parent)?.join(name))
}

/// Checks that `issue` may write `path` (given as `--flag`) for the CA in
/// `ca_dir`, and returns the resolved location to write to.
///
/// Refused always: anything inside the CA directory, wherever the path
/// leads through relative components or symbolic links (in its directory
/// or as the file itself). Refused without `force`: an existing file (the
/// write itself also refuses to replace one, see
/// [`crate::fsutil::Staged::commit`], so nothing appearing in between is
/// clobbered either).
pub fn check_output(
    ca_dir: &Path,
    flag: &'static str,
    path: &Path,
    force: bool,
) -> Result<PathBuf, OutputError> {
    let io = |source| OutputError::Io {
        flag,
        path: path.to_owned(),
        source,
    };
    let ca_dir = std::fs::canonicalize(ca_dir).map_err(io)?;
    let location = resolve_location(path).map_err(io)?;
    let inside = |p: &Path| p.starts_with(&ca_dir);
    let exists = std::fs::symlink_metadata(&location).is_ok();
    // An existing symbolic link is checked where it points as well.
    let target = std::fs::canonicalize(&location).ok();
    if inside(&location) || target.as_deref().is_some_and(inside) {
        return Err(OutputError::InsideCa {
            flag,
            path: path.to_owned(),
            ca_dir,
        });
    }
    if exists && !force {
        return Err(OutputError::Exists {
            flag,
            path: path.to_owned(),
        });
    }
    Ok(location)
}

#[cfg(test)]
mod tests {
    use super::valid_dns_name;

    #[test]
    fn dns_names() {
        assert!(valid_dns_name("payments.default.svc"));
        assert!(valid_dns_name("*.example.com"));
        assert!(!valid_dns_name("a..b"));
        assert!(!valid_dns_name("-a.b"));
        assert!(!valid_dns_name("a.*.b"));
        assert!(!valid_dns_name("a b"));
        assert!(!valid_dns_name("*"));
        assert!(!valid_dns_name("1.2.3.4"));
        assert!(!valid_dns_name("host.123"));
        assert!(valid_dns_name("*.svc"));
        assert!(valid_dns_name("123.example"));
        assert!(valid_dns_name("localhost"));
    }

    #[test]
    fn the_cas_own_id_and_those_below_it_are_reserved() {
        use keyproof_identity::spiffe::SpiffeId;
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        for reserved in [
            "spiffe://td.test/keyproof-ca",
            "spiffe://td.test/keyproof-ca/replica-1",
            "spiffe://other.test/keyproof-ca",
        ] {
            assert!(super::reserved_for_the_ca(&id(reserved)), "{reserved}");
            assert!(super::check_not_reserved(&id(reserved)).is_err());
        }
        for free in [
            "spiffe://td.test/keyproof-cafe",
            "spiffe://td.test/ns/keyproof-ca",
            "spiffe://td.test/ns/default/sa/web",
        ] {
            assert!(!super::reserved_for_the_ca(&id(free)), "{free}");
        }
    }
}

#[cfg(test)]
mod output_tests {
    use super::{check_output, OutputError};

    #[test]
    fn outputs_inside_the_ca_directory_are_refused_however_named() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        std::fs::create_dir(&ca).unwrap();
        std::fs::write(ca.join("root.crt"), "root").unwrap();
        std::fs::create_dir(tmp.path().join("out")).unwrap();
        std::os::unix::fs::symlink(&ca, tmp.path().join("link-dir")).unwrap();
        std::os::unix::fs::symlink(ca.join("root.crt"), tmp.path().join("out/link.crt")).unwrap();
        for p in [
            ca.join("root.crt"),
            ca.join("new.crt"),
            tmp.path().join("out/../ca/root.crt"),
            tmp.path().join("link-dir/root.crt"),
            tmp.path().join("out/link.crt"),
        ] {
            for force in [false, true] {
                assert!(
                    matches!(
                        check_output(&ca, "cert-out", &p, force),
                        Err(OutputError::InsideCa { .. })
                    ),
                    "{} force={force}",
                    p.display()
                );
            }
        }
        let fresh = tmp.path().join("out/web.crt");
        assert_eq!(
            check_output(&ca, "cert-out", &fresh, false).unwrap(),
            std::fs::canonicalize(tmp.path())
                .unwrap()
                .join("out/web.crt")
        );
        std::fs::write(&fresh, "x").unwrap();
        let err = check_output(&ca, "cert-out", &fresh, false).unwrap_err();
        assert!(matches!(err, OutputError::Exists { .. }));
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(check_output(&ca, "cert-out", &fresh, true).is_ok());
        assert!(matches!(
            check_output(&ca, "cert-out", &tmp.path().join("nope/web.crt"), false),
            Err(OutputError::Io { .. })
        ));
    }
}
