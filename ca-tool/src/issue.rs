//! Issuing X.509-SVIDs.

use std::time::Duration;

use keyproof_identity::keys;
use keyproof_identity::spiffe::SpiffeId;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::ca::{self, Ca, CaError, BACKDATE};
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

fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
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

impl Ca {
    /// Checks the request against the CA's rules and signs a leaf. Nothing is
    /// written; call [`Ca::record`] before handing the certificate out.
    pub fn sign(&self, req: &IssueRequest, requester: &str) -> Result<Issued, CaError> {
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
        if req.ttl < Duration::from_secs(1) {
            return Err(CaError::BadTtl("must be at least 1s".into()));
        }
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
        let not_after = (now + req.ttl).min(self.intermediate_not_after);

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
        let leaf = p.signed_by(&req.key, &self.issuer)?.der().clone();
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
    }
}
