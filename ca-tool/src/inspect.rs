//! `keyproof-ca inspect`: what a certificate file holds, which SVID rules it
//! passes, and whether it chains to a bundle.

use keyproof_identity::keys::{self, KeyType};
use keyproof_identity::svid;
use keyproof_identity::verify::{self, TrustBundle};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::ca::rfc3339;

/// One certificate's report.
#[derive(Debug, Serialize)]
pub struct CertReport {
    pub index: usize,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub spiffe_id: Option<String>,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub is_ca: bool,
    pub key_type: String,
    pub not_before: String,
    pub not_after: String,
    pub remaining_secs: i64,
    pub percent_used: f64,
    pub sha256: String,
    /// Names of the violated rules (leaf rules for a leaf, signing rules for a CA).
    pub svid_errors: Vec<String>,
    /// Human descriptions of the same.
    pub svid_error_messages: Vec<String>,
    /// Every rule that applies (leaf or signing), passed or not.
    pub svid_rules: Vec<RuleResult>,
}

/// One SVID rule's verdict.
#[derive(Debug, Serialize)]
pub struct RuleResult {
    pub rule: &'static str,
    pub pass: bool,
    /// Why it failed (empty when it passed).
    pub failures: Vec<String>,
}

/// The whole report for a file.
#[derive(Debug, Serialize)]
pub struct Report {
    pub certificates: Vec<CertReport>,
    /// `Some("valid")` or the reason, when a bundle was given.
    pub chain: Option<String>,
}

impl Report {
    /// Whether every certificate passes every SVID rule that applies to it
    /// and, when a bundle was given, the chain is valid: `inspect` exits 2
    /// otherwise, so a script can rely on its status.
    pub fn passed(&self) -> bool {
        self.certificates.iter().all(|c| c.svid_errors.is_empty())
            && !matches!(self.chain.as_deref(), Some(c) if c != "valid")
    }
}

fn sans(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<String>) {
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    (uris, dns)
}

fn report_one(index: usize, der: &[u8], now: i64) -> Result<CertReport, String> {
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("certificate {index}: {e}"))?;
    let is_ca = c.is_ca();
    let violations = if is_ca {
        svid::signing_violations(&c)
    } else {
        svid::leaf_violations(&c)
    };
    let rules = if is_ca {
        svid::SIGNING_RULES
    } else {
        svid::LEAF_RULES
    };
    let svid_rules = rules
        .iter()
        .map(|rule| {
            let failures: Vec<String> = violations
                .iter()
                .filter(|v| v.rule() == *rule)
                .map(|v| v.to_string())
                .collect();
            RuleResult {
                rule,
                pass: failures.is_empty(),
                failures,
            }
        })
        .collect();
    let (uri_sans, dns_sans) = sans(&c);
    let nb = c.validity().not_before.timestamp();
    let na = c.validity().not_after.timestamp();
    let life = (na - nb).max(1) as f64;
    Ok(CertReport {
        index,
        subject: c.subject().to_string(),
        issuer: c.issuer().to_string(),
        serial: crate::ca::serial_hex(c.raw_serial()),
        spiffe_id: svid::spiffe_id_of(&c).ok().map(|i| i.to_string()),
        uri_sans,
        dns_sans,
        is_ca,
        key_type: KeyType::of_spki(c.public_key())
            .map(|k| k.to_string())
            .unwrap_or_else(|e| e.to_string()),
        not_before: rfc3339(c.validity().not_before.to_datetime()),
        not_after: rfc3339(c.validity().not_after.to_datetime()),
        remaining_secs: na - now,
        percent_used: (((now - nb) as f64 / life) * 100.0).clamp(0.0, 100.0),
        sha256: keys::fingerprint(der),
        svid_errors: violations.iter().map(|v| v.code().to_owned()).collect(),
        svid_error_messages: violations.iter().map(|v| v.to_string()).collect(),
        svid_rules,
    })
}

/// Inspects a PEM file of one or more certificates; `bundle` adds a chain check
/// of the first certificate using the rest as intermediates.
pub fn inspect(pem: &[u8], bundle: Option<&[u8]>) -> Result<Report, String> {
    let certs = keys::certs_from_pem(pem).map_err(|e| e.to_string())?;
    let now = crate::ca::now().unix_timestamp();
    let certificates = certs
        .iter()
        .enumerate()
        .map(|(i, d)| report_one(i, d, now))
        .collect::<Result<Vec<_>, _>>()?;
    let chain = bundle.map(|b| chain_status(&certs, b));
    Ok(Report {
        certificates,
        chain,
    })
}

fn chain_status(certs: &[CertificateDer<'static>], bundle: &[u8]) -> String {
    let tb = match TrustBundle::from_pem(bundle) {
        Ok(tb) => tb,
        Err(e) => return format!("bundle unusable: {e}"),
    };
    match verify::verify_path(
        &tb,
        &certs[0],
        &certs[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    ) {
        Ok(()) => "valid".into(),
        Err(e) => e.to_string(),
    }
}

/// Renders the report for a terminal.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    for c in &r.certificates {
        let role = if c.is_ca { "CA certificate" } else { "leaf" };
        out.push_str(&format!("certificate {} ({role})\n", c.index));
        out.push_str(&format!("  subject:     {}\n", c.subject));
        out.push_str(&format!("  issuer:      {}\n", c.issuer));
        out.push_str(&format!("  serial:      {}\n", c.serial));
        for u in &c.uri_sans {
            let mark = if Some(u) == c.spiffe_id.as_ref() {
                "  <- SPIFFE ID"
            } else {
                ""
            };
            out.push_str(&format!("  SAN URI:     {u}{mark}\n"));
        }
        for d in &c.dns_sans {
            out.push_str(&format!("  SAN DNS:     {d}\n"));
        }
        out.push_str(&format!("  key type:    {}\n", c.key_type));
        out.push_str(&format!("  not before:  {}\n", c.not_before));
        out.push_str(&format!("  not after:   {}\n", c.not_after));
        let remaining = if c.remaining_secs > 0 {
            keyproof_identity::duration::format(std::time::Duration::from_secs(
                c.remaining_secs as u64,
            ))
        } else {
            "EXPIRED".into()
        };
        out.push_str(&format!(
            "  remaining:   {remaining} ({:.0}% of lifetime used)\n",
            c.percent_used
        ));
        out.push_str(&format!("  sha256:      {}\n", c.sha256));
        let kind = if c.is_ca {
            "signing-certificate"
        } else {
            "X.509-SVID leaf"
        };
        out.push_str(&format!("  {kind} rules:\n"));
        for r in &c.svid_rules {
            if r.pass {
                out.push_str(&format!("    pass  {}\n", r.rule));
            } else {
                out.push_str(&format!(
                    "    FAIL  {}: {}\n",
                    r.rule,
                    r.failures.join("; ")
                ));
            }
        }
    }
    if let Some(ch) = &r.chain {
        out.push_str(&format!("chain against bundle: {ch}\n"));
    }
    out
}
