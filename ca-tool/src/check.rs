//! `keyproof-ca check`: a health verdict for cron and CI.
//!
//! Exit codes are the contract: 0 all good, 1 something expires within the
//! warning window (a warning must fail a pipeline), 2 something is invalid or
//! expired.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyproof_identity::keys;
use keyproof_identity::verify::{SvidVerifier, TrustBundle, Usage};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

use crate::ca::{self, files, first_cert, Ca, CaError, RotationStage};
use crate::cakey::{CaKeyError, KeyAccess, KeyLocation};
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

    /// Collapses the findings about one subject into one, at the worst
    /// level: a FAIL replaces the `ok` of the same certificate instead of
    /// contradicting it on the next line. Messages at that level are kept
    /// (joined with "; "), milder ones dropped; subjects keep the order in
    /// which they first appeared.
    fn collapse(&mut self) {
        let mut out: Vec<Finding> = Vec::new();
        for f in self.findings.drain(..) {
            match out.iter_mut().find(|o| o.subject == f.subject) {
                None => out.push(f),
                Some(o) if f.level > o.level => *o = f,
                Some(o) if f.level == o.level && f.message != o.message => {
                    o.message = format!("{}; {}", o.message, f.message);
                }
                Some(_) => {}
            }
        }
        self.findings = out;
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

/// The warning window for one certificate: `warn_before` when the operator
/// gave one, otherwise the last third of the certificate's own lifetime.
///
/// A fixed default cannot suit both a 10-year root and a 24-hour SVID: the
/// SVID would warn from the moment it is issued. A certificate is expected to
/// be renewed at two thirds of its life, so its last third is when a missing
/// renewal deserves attention.
pub fn window(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    warn_before: Option<Duration>,
) -> Duration {
    warn_before.unwrap_or_else(|| (not_after - not_before).unsigned_abs() / 3)
}

/// What a warning adds for a certificate a renewer keeps fresh (a ledger
/// entry measured from its issuance): renewers renew before the last third,
/// so reaching it means renewal is overdue.
const RENEWAL_OVERDUE: &str = "renewal is overdue: renewers renew before the last third of a \
     certificate's life, so the workload stopped renewing (CA unreachable, credential refused) \
     or was deleted";

fn expiry_finding(
    r: &mut Report,
    what: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    warn_before: Option<Duration>,
    now: OffsetDateTime,
) {
    expiry_finding_from(
        r,
        what,
        not_before,
        not_before,
        not_after,
        warn_before,
        now,
        None,
    )
}

/// [`expiry_finding`] with the default window measured from `window_from`
/// (the issuance, for a ledger entry: notBefore is backdated for clock
/// skew, while renewers count from receipt), and `overdue` appended to a
/// warning.
#[allow(clippy::too_many_arguments)]
fn expiry_finding_from(
    r: &mut Report,
    what: &str,
    not_before: OffsetDateTime,
    window_from: OffsetDateTime,
    not_after: OffsetDateTime,
    warn_before: Option<Duration>,
    now: OffsetDateTime,
    overdue: Option<&str>,
) {
    let remaining = not_after - now;
    let window = window(window_from, not_after, warn_before);
    // A renewed certificate warns only once strictly inside its last third:
    // the ledger's times are whole seconds, and a renewer keeping to its
    // schedule may renew in the very second the last third starts.
    let inside = if overdue.is_some() {
        remaining.unsigned_abs() < window
    } else {
        remaining.unsigned_abs() <= window
    };
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
    } else if inside {
        let mut msg = format!(
            "expires at {} (in {})",
            ca::rfc3339(not_after),
            keyproof_identity::duration::format(remaining.unsigned_abs())
        );
        if let Some(overdue) = overdue {
            msg = format!("{msg}; {overdue}");
        }
        r.push(Level::Warn, what, msg);
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

/// A CA certificate the directory still holds (current, prepared or
/// archived), found by its subject key identifier.
struct KnownCa {
    der: CertificateDer<'static>,
    path: PathBuf,
}

fn subject_key_id(der: &[u8]) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let ski = c
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                Some(hex::encode(k.0))
            }
            _ => None,
        });
    ski
}

/// Every intermediate certificate the CA directory holds, by subject key id:
/// `intermediate.crt`, `next/intermediate.crt` and the copies `rotate`
/// archives. Unreadable files are skipped: this only adds knowledge.
fn known_intermediates(dir: &Path) -> HashMap<String, KnownCa> {
    let mut paths = vec![
        dir.join(files::INT_CRT),
        dir.join(files::NEXT).join(files::INT_CRT),
    ];
    if let Ok(rd) = std::fs::read_dir(dir.join(files::ARCHIVE)) {
        paths.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(files::INT_CRT))
        }));
    }
    let mut out = HashMap::new();
    for path in paths {
        let Ok(der) = first_cert(&path) else { continue };
        if let Some(ski) = subject_key_id(&der) {
            out.entry(ski).or_insert(KnownCa { der, path });
        }
    }
    out
}

/// Whether `cert` carries a valid signature by `issuer`'s key (the two key
/// types keyproof issues with).
fn signed_by(cert: &[u8], issuer: &[u8]) -> bool {
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ED25519};
    use x509_parser::oid_registry::{OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ED25519};
    let (Ok((_, c)), Ok((_, i))) = (
        x509_parser::parse_x509_certificate(cert),
        x509_parser::parse_x509_certificate(issuer),
    ) else {
        return false;
    };
    let alg = &c.signature_algorithm.algorithm;
    let key = i.public_key().subject_public_key.data.as_ref();
    let verify = if *alg == OID_SIG_ECDSA_WITH_SHA256 {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
            .verify(c.tbs_certificate.as_ref(), c.signature_value.data.as_ref())
    } else if *alg == OID_SIG_ED25519 {
        UnparsedPublicKey::new(&ED25519, key)
            .verify(c.tbs_certificate.as_ref(), c.signature_value.data.as_ref())
    } else {
        return false;
    };
    verify.is_ok()
}

/// Whether an identity's newest certificate still chains to the current
/// bundle, from what the ledger recorded (the certificate itself is with
/// the workload). Pushes a finding only when something is wrong or unknown.
fn chain_finding(
    r: &mut Report,
    subject: &str,
    e: &ledger::Entry,
    bundle: &[CertificateDer<'static>],
    intermediates: &HashMap<String, KnownCa>,
    now: OffsetDateTime,
) {
    let roots: Vec<String> = bundle.iter().map(|b| keys::fingerprint(b)).collect();
    if !e.root_sha256.is_empty() && !roots.contains(&e.root_sha256) {
        r.push(
            Level::Bad,
            subject,
            format!(
                "issued under root {}, which is no longer in {}: the certificate no longer \
                 chains to the trust bundle and every peer will refuse it (was `rotate root \
                 finish --force` run before it was renewed?); renew or re-issue it now",
                e.root_sha256,
                files::BUNDLE_PEM
            ),
        );
        return;
    }
    // The issuing intermediate, when the directory still holds it: it must
    // be signed by a root of the bundle (and, when the ledger names the
    // root, by that root) and must still be valid.
    let int = (!e.issuer_key_id.is_empty())
        .then(|| intermediates.get(&e.issuer_key_id))
        .flatten();
    let Some(int) = int else {
        if e.root_sha256.is_empty() {
            r.push(
                Level::Warn,
                subject,
                "cannot tell which root it chains to: its ledger entry has no root_sha256 \
                 (written by an older keyproof-ca) and its issuing intermediate is not in the \
                 CA directory; check the workload's certificate with `check --cert`",
            );
        }
        return;
    };
    let under = bundle
        .iter()
        .zip(&roots)
        .find(|(root, _)| signed_by(&int.der, root))
        .map(|(_, fp)| fp.clone());
    match under {
        None => r.push(
            Level::Bad,
            subject,
            format!(
                "its issuing intermediate {} ({}) is not signed by any root in {}: the \
                 certificate no longer chains to the trust bundle; renew or re-issue it now",
                keys::fingerprint(&int.der),
                int.path.display(),
                files::BUNDLE_PEM
            ),
        ),
        Some(fp) if !e.root_sha256.is_empty() && fp != e.root_sha256 => r.push(
            Level::Bad,
            subject,
            format!(
                "the ledger says root {} but its issuing intermediate {} is signed by root {fp}",
                e.root_sha256,
                int.path.display()
            ),
        ),
        Some(_) => match validity(&int.der) {
            Ok((_, na)) if na <= now => r.push(
                Level::Bad,
                subject,
                format!(
                    "its issuing intermediate {} expired at {}",
                    int.path.display(),
                    ca::rfc3339(na)
                ),
            ),
            _ => {}
        },
    }
}

/// Checks a CA directory: root, intermediate, every trusted root, the
/// newest unexpired certificate of each identity in the ledger (its expiry,
/// and whether it still chains to the current bundle), and the rotation
/// stage.
///
/// Each certificate warns within `warn_before` of its expiry, or by default
/// in the last third of its own lifetime (see [`window`]); for a ledger
/// entry that lifetime is counted from its issuance (`issued_at`), not from
/// the backdated notBefore, so that a certificate whose renewer keeps to
/// its schedule is never warned about.
///
/// It also says where each key lives and whether it signs (a probe
/// signature): the intermediate's key must, or the CA cannot issue (FAIL);
/// a root key in the directory or a token must too, except a root whose
/// token is not present here, or an offline file, which are reported as
/// offline without being tried.
pub fn check_dir(
    dir: &Path,
    warn_before: Option<Duration>,
    access: &KeyAccess,
) -> Result<Report, CaError> {
    // Opened without keys: a key that fails is a finding, not the end of
    // the report.
    let ca = Ca::open_public(dir)?;
    let now = ca::now();
    let mut r = Report::default();
    // The issuing root is (normally) one of the bundle's roots: one line
    // for it, naming both, rather than the same expiry twice.
    for (i, root) in ca.bundle().iter().enumerate() {
        let subject = if root == ca.root() {
            format!("bundle root {i} ({})", files::ROOT_CRT)
        } else {
            format!("bundle root {i}")
        };
        match validity(root) {
            Ok((nb, na)) => expiry_finding(&mut r, &subject, nb, na, warn_before, now),
            Err(e) => r.push(Level::Bad, subject, e),
        }
    }
    if !ca.bundle().iter().any(|b| b == ca.root()) {
        match validity(ca.root()) {
            Ok((nb, na)) => expiry_finding(&mut r, files::ROOT_CRT, nb, na, warn_before, now),
            Err(e) => r.push(Level::Bad, files::ROOT_CRT, e),
        }
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
        // Ledger order breaks ties: of two certificates expiring in the same
        // second, the later line is the newer one.
        if na >= slot.2 {
            *slot = (e, nb, na);
        }
    }
    let mut ids: Vec<_> = newest.into_iter().collect();
    ids.sort_by(|a, b| a.0.cmp(b.0));
    let intermediates = known_intermediates(dir);
    for (id, (e, nb, na)) in ids {
        let subject = format!("{id} (serial {})", e.serial);
        // The window of a renewed certificate runs from its issuance, as
        // the renewer's schedule does; an entry without a usable time of
        // issuance falls back to notBefore.
        let issued =
            OffsetDateTime::parse(&e.issued_at, &time::format_description::well_known::Rfc3339)
                .ok()
                .filter(|t| *t >= nb && *t < na)
                .unwrap_or(nb);
        expiry_finding_from(
            &mut r,
            &subject,
            nb,
            issued,
            na,
            warn_before,
            now,
            warn_before.is_none().then_some(RENEWAL_OVERDUE),
        );
        chain_finding(&mut r, &subject, e, ca.bundle(), &intermediates, now);
    }
    key_findings(&mut r, &ca, access);
    // `serve` refuses to start on a revoked.json it cannot read (and a
    // running one keeps its old revocations): the health check must say so.
    if let Err(e) = crate::revoke::load(dir) {
        r.push(Level::Bad, files::REVOKED, e.to_string());
    }
    r.push(Level::Ok, "rotation", crate::rotate::stage_report(&ca)?);
    r.collapse();
    Ok(r)
}

/// One finding per CA key: where it lives, and that it signs.
fn key_findings(r: &mut Report, ca: &Ca, access: &KeyAccess) {
    let keys = &ca.state().keys;
    let dir = ca.dir();
    let mut one = |subject: &str,
                   kdir: &Path,
                   stem: &str,
                   what: &'static str,
                   loc: &KeyLocation,
                   pin: Option<&Path>,
                   may_be_offline: bool| {
        let place = loc.describe(stem);
        match loc {
            KeyLocation::Offline(_) => {
                r.push(Level::Ok, subject, format!("{place}; not checked here"));
                return;
            }
            KeyLocation::File if may_be_offline && !kdir.join(format!("{stem}.key")).exists() => {
                r.push(
                    Level::Ok,
                    subject,
                    format!(
                        "not in the CA directory (no {stem}.key): offline; `rotate \
                         intermediate` needs --root-key FILE"
                    ),
                );
                return;
            }
            _ => {}
        }
        match ca::open_key(kdir, stem, what, loc, pin) {
            Ok(key) => match key.probe() {
                Ok(()) => r.push(Level::Ok, subject, format!("{place}: signs")),
                Err(e) => r.push(Level::Bad, subject, format!("{place}: does not sign: {e}")),
            },
            // A root in a token that is not plugged in here is an offline
            // root, as intended.
            Err(CaError::KeyStore(CaKeyError::Pkcs11 { source, .. }))
                if may_be_offline && matches!(source.reason(), "no_token" | "module") =>
            {
                r.push(
                    Level::Ok,
                    subject,
                    format!(
                        "{place}: the token is not present here (an offline root); not checked"
                    ),
                );
            }
            Err(e) => r.push(Level::Bad, subject, e.to_string()),
        }
    };
    one(
        "intermediate key",
        dir,
        "intermediate",
        "intermediate key",
        &keys.intermediate,
        access.intermediate_pin(),
        false,
    );
    let root_pin = |loc: &KeyLocation| match loc {
        KeyLocation::Pkcs11(t) => access.root_pin(t, &keys.intermediate),
        _ => None,
    };
    one(
        "root key",
        dir,
        "root",
        "root key",
        &keys.root,
        root_pin(&keys.root),
        true,
    );
    if ca.state().rotation == RotationStage::Prepared {
        let next = dir.join(files::NEXT);
        one(
            "prepared intermediate key",
            &next,
            "intermediate",
            "prepared intermediate key",
            &keys.next_intermediate,
            access.intermediate_pin(),
            false,
        );
        one(
            "prepared root key",
            &next,
            "root",
            "prepared root key",
            &keys.next_root,
            root_pin(&keys.next_root),
            true,
        );
    }
}

/// Checks one certificate file against a bundle: chain, SVID rules, expiry.
///
/// Each certificate of the chain warns within `warn_before` of its expiry,
/// or by default in the last third of its own lifetime (see [`window`]).
pub fn check_cert(cert_pem: &[u8], bundle_pem: &[u8], warn_before: Option<Duration>) -> Report {
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
    r.collapse();
    r
}
