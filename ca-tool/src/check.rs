//! `keyproof-ca check`: a health verdict for cron and CI.
//!
//! Exit codes are the contract: 0 all good, 1 something expires within the
//! warning window (a warning must fail a pipeline), 2 something is invalid or
//! expired.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use keyproof_identity::verify::{SvidVerifier, TrustBundle, Usage};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

use crate::ca::{self, files, Ca, CaError};
use crate::ledger;

/// Severity of one finding; ordered so the worst decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok = 0,
    Warn = 1,
    Bad = 2,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub subject: String,
    pub message: String,
}

/// The report; [`Report::exit_code`] is the process exit status.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, level: Level, subject: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding {
            level,
            subject: subject.into(),
            message: message.into(),
        });
    }

    /// 0, 1 or 2.
    pub fn exit_code(&self) -> i32 {
        self.findings
            .iter()
            .map(|f| f.level as i32)
            .max()
            .unwrap_or(0)
    }

    /// One line per finding.
    pub fn render(&self) -> String {
        self.findings
            .iter()
            .map(|f| {
                let tag = match f.level {
                    Level::Ok => "ok  ",
                    Level::Warn => "WARN",
                    Level::Bad => "FAIL",
                };
                format!("{tag} {}: {}\n", f.subject, f.message)
            })
            .collect()
    }
}

fn expiry_finding(
    r: &mut Report,
    what: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    window: Duration,
    now: OffsetDateTime,
) {
    let remaining = not_after - now;
    if remaining <= time::Duration::ZERO {
        r.push(
            Level::Bad,
            what,
            format!("expired at {}", ca::rfc3339(not_after)),
        );
    } else if now < not_before {
        r.push(
            Level::Bad,
            what,
            format!("not valid until {}", ca::rfc3339(not_before)),
        );
    } else if remaining.unsigned_abs() <= window {
        r.push(
            Level::Warn,
            what,
            format!(
                "expires at {} (in {})",
                ca::rfc3339(not_after),
                keyproof_identity::duration::format(remaining.unsigned_abs())
            ),
        );
    } else {
        r.push(
            Level::Ok,
            what,
            format!("valid until {}", ca::rfc3339(not_after)),
        );
    }
}

fn validity(der: &[u8]) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    Ok((
        c.validity().not_before.to_datetime(),
        c.validity().not_after.to_datetime(),
    ))
}

/// Checks a CA directory: root, intermediate, every trusted root, the
/// newest unexpired certificate of each identity in the ledger, and the
/// rotation stage.
///
/// A leaf is expected to be renewed at two thirds of its life, so for leaves
/// the window is the smaller of `warn_before` and the last third of the
/// leaf's lifetime: a 24 h SVID warns when renewal is overdue, not every day.
pub fn check_dir(dir: &Path, warn_before: Duration) -> Result<Report, CaError> {
    let ca = Ca::open(dir)?;
    let now = ca::now();
    let mut r = Report::default();
    for (i, root) in ca.bundle().iter().enumerate() {
        match validity(root) {
            Ok((nb, na)) => expiry_finding(
                &mut r,
                &format!("bundle root {i}"),
                nb,
                na,
                warn_before,
                now,
            ),
            Err(e) => r.push(Level::Bad, format!("bundle root {i}"), e),
        }
    }
    match validity(ca.root()) {
        Ok((nb, na)) => expiry_finding(&mut r, files::ROOT_CRT, nb, na, warn_before, now),
        Err(e) => r.push(Level::Bad, files::ROOT_CRT, e),
    }
    if !ca.bundle().iter().any(|b| b == ca.root()) {
        r.push(
            Level::Bad,
            files::ROOT_CRT,
            "the issuing root is not in bundle.pem: nothing it issues would be trusted",
        );
    }
    let (nb, na) = (ca.intermediate_not_before, ca.intermediate_not_after);
    expiry_finding(&mut r, files::INT_CRT, nb, na, warn_before, now);

    // Newest unexpired entry per identity; older ones are superseded.
    let entries = ledger::read_all(dir)?;
    let mut newest: HashMap<&str, (&ledger::Entry, OffsetDateTime, OffsetDateTime)> =
        HashMap::new();
    for e in &entries {
        let parse =
            |s: &str| OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339);
        let (Ok(nb), Ok(na)) = (parse(&e.not_before), parse(&e.not_after)) else {
            r.push(
                Level::Bad,
                format!("ledger serial {}", e.serial),
                "unparsable validity",
            );
            continue;
        };
        if na <= now {
            continue;
        }
        let slot = newest.entry(e.spiffe_id.as_str()).or_insert((e, nb, na));
        if na > slot.2 {
            *slot = (e, nb, na);
        }
    }
    let mut ids: Vec<_> = newest.into_iter().collect();
    ids.sort_by(|a, b| a.0.cmp(b.0));
    for (id, (e, nb, na)) in ids {
        let third = (na - nb).unsigned_abs() / 3;
        expiry_finding(
            &mut r,
            &format!("{id} (serial {})", e.serial),
            nb,
            na,
            warn_before.min(third),
            now,
        );
    }
    r.push(Level::Ok, "rotation", crate::rotate::stage_report(&ca)?);
    Ok(r)
}

/// Checks one certificate file against a bundle: chain, SVID rules, expiry.
pub fn check_cert(cert_pem: &[u8], bundle_pem: &[u8], warn_before: Duration) -> Report {
    let mut r = Report::default();
    let certs: Vec<CertificateDer<'static>> =
        match keyproof_identity::keys::certs_from_pem(cert_pem) {
            Ok(c) => c,
            Err(e) => {
                r.push(Level::Bad, "certificate", e.to_string());
                return r;
            }
        };
    let bundle = match TrustBundle::from_pem(bundle_pem) {
        Ok(b) => b,
        Err(e) => {
            r.push(Level::Bad, "bundle", e.to_string());
            return r;
        }
    };
    // The trust domain is whatever the leaf claims; the chain check decides.
    let td = match keyproof_identity::svid::check_leaf_der(&certs[0]) {
        Ok(id) => id.trust_domain(),
        Err(e) => {
            r.push(
                Level::Bad,
                "certificate",
                format!("not a valid X.509-SVID: {e}"),
            );
            return r;
        }
    };
    let verifier = SvidVerifier::new(td, bundle);
    match verifier.verify(&certs[0], &certs[1..], UnixTime::now(), Usage::ClientAuth) {
        Ok(v) => r.push(
            Level::Ok,
            "chain",
            format!("{} chains to the bundle", v.spiffe_id),
        ),
        Err(keyproof_identity::verify::VerifyError::Expired) => {}
        Err(e) => r.push(Level::Bad, "chain", e.to_string()),
    }
    let now = ca::now();
    for (i, c) in certs.iter().enumerate() {
        match validity(c) {
            Ok((nb, na)) => expiry_finding(
                &mut r,
                &format!("certificate {i}"),
                nb,
                na,
                warn_before,
                now,
            ),
            Err(e) => r.push(Level::Bad, format!("certificate {i}"), e),
        }
    }
    r
}
