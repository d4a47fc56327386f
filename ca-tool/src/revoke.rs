//! Revocation: certificates `keyproof-ca serve` no longer renews.
//!
//! The sidecars' deny lists refuse a stolen certificate by its serial, but
//! whoever holds it (and its key) could renew it once and present a new
//! serial. So the CA keeps a list of its own, `revoked.json` in the CA
//! directory (with `--store`, a document of the store like `ca.json`,
//! which every replica follows within about a second), and `POST
//! /v1/renew` refuses a certificate on it (403 `certificate_revoked`).
//!
//! A thief may have renewed before the revocation. Every renewal's ledger
//! entry names the serial it was renewed from (`renewed_from`), so
//! revoking a serial revokes, at that moment, every unexpired certificate
//! of its renewal lineage: up to the certificate it descends from (whoever
//! renewed into the revoked certificate held its parent's key, and may
//! still hold it), and everything renewed from that, directly or not. Revoking
//! a SPIFFE ID revokes every unexpired certificate of that ID; a new
//! bootstrap (a new join token, a ServiceAccount token) then starts a
//! lineage that is not revoked. A renewal that runs at the very moment
//! of the revocation may still be issued after the list was computed:
//! running the same `revoke` again adds whatever was renewed meanwhile.
//!
//! Entries leave the list once their certificate has expired (an expired
//! certificate renews nothing).

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use keyproof_identity::spiffe::SpiffeId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{self, files, io_err, CaError};
use crate::fsutil;
use crate::ledger;

/// `revoked.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocations {
    /// Every revoked certificate, unexpired when it was listed.
    pub revoked: Vec<Revoked>,
}

/// One revoked certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revoked {
    /// Hex serial, as in the ledger.
    pub serial: String,
    pub spiffe_id: String,
    /// RFC 3339: when the certificate expires (the entry can go then).
    pub not_after: String,
    /// RFC 3339.
    pub revoked_at: String,
    /// What the operator named: `serial:<hex>` or `spiffe_id:<id>`.
    pub by: String,
    /// The operator's `--reason`, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One certificate and its whole renewal lineage (up and down).
    Serial(String),
    /// Every certificate of one SPIFFE ID.
    SpiffeId(SpiffeId),
}

/// A serial as the ledger writes it: lowercase hex without leading zeros;
/// `:` separators (as `openssl x509 -serial` and browsers show them) and a
/// `0x` prefix are accepted.
pub fn normalize_serial(s: &str) -> Result<String, CaError> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let hexits: String = t.chars().filter(|c| *c != ':').collect();
    if hexits.is_empty() || !hexits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(CaError::Revocation(format!(
            "--serial {s:?}: not a hexadecimal serial number"
        )));
    }
    let trimmed = hexits.trim_start_matches('0').to_ascii_lowercase();
    Ok(if trimmed.is_empty() {
        "0".into()
    } else {
        // serial_hex keeps whole bytes.
        if trimmed.len() % 2 == 1 {
            format!("0{trimmed}")
        } else {
            trimmed
        }
    })
}

/// Reads `revoked.json` (none: nothing is revoked).
pub fn load(dir: &Path) -> Result<Revocations, CaError> {
    let path = dir.join(files::REVOKED);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Revocations::default()),
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_slice(&text).map_err(|e| CaError::Corrupt {
        path,
        msg: e.to_string(),
    })
}

fn save(dir: &Path, r: &Revocations) -> Result<(), CaError> {
    let path = dir.join(files::REVOKED);
    let mut body = serde_json::to_vec_pretty(r).map_err(|e| CaError::Corrupt {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    body.push(b'\n');
    fsutil::write_atomic(&path, &body, fsutil::PUBLIC).map_err(io_err(&path))
}

fn expired(not_after: &str, now: OffsetDateTime) -> bool {
    OffsetDateTime::parse(not_after, &time::format_description::well_known::Rfc3339)
        .is_ok_and(|t| t <= now)
}

/// Revokes `target` in the CA directory `dir` (a store's workspace works
/// the same): finds the unexpired certificates it names in the ledger
/// (for a serial, its whole renewal lineage: up to the certificate it
/// descends from, and every certificate renewed from that, however many
/// renewals down), adds them to `revoked.json`, and drops entries whose
/// certificate has expired. Returns the certificates newly revoked; none
/// when all were already. A serial the ledger holds no unexpired
/// certificate for, or an ID with none, is an error: nothing could renew
/// with it, and a typo should not pass for a revocation.
pub fn revoke(
    dir: &Path,
    target: &Target,
    reason: &str,
    now: OffsetDateTime,
) -> Result<Vec<Revoked>, CaError> {
    let all = ledger::read_all(dir)?;
    let live: Vec<&ledger::Entry> = all.iter().filter(|e| !expired(&e.not_after, now)).collect();
    // For a serial: the lineage is walked from its first certificate, over
    // the whole ledger (an expired ancestor links live relatives), and only
    // the live ones are listed.
    let mut lineage: Option<HashSet<&str>> = None;
    let (by, mut hit): (String, Vec<&ledger::Entry>) = match target {
        Target::Serial(s) => {
            let serial = normalize_serial(s)?;
            let Some(first) = live.iter().copied().find(|e| e.serial == serial) else {
                return Err(CaError::Revocation(format!(
                    "no unexpired certificate with serial {serial} in the ledger"
                )));
            };
            // Up first: whoever renewed into this certificate held its
            // parent's key, so a thief seen using a renewal may still hold
            // the certificate it was renewed from (and renew it again).
            let parent: std::collections::HashMap<&str, &str> = all
                .iter()
                .filter_map(|e| Some((e.serial.as_str(), e.renewed_from.as_deref()?)))
                .collect();
            let mut top = first.serial.as_str();
            let mut seen = HashSet::from([top]);
            while let Some(p) = parent.get(top) {
                if !seen.insert(p) {
                    break; // a cycle: only a corrupt ledger has one
                }
                top = p;
            }
            lineage = Some(HashSet::from([top]));
            let hit = live.iter().copied().filter(|e| e.serial == top).collect();
            (format!("serial:{serial}"), hit)
        }
        Target::SpiffeId(id) => {
            let of_id: Vec<&ledger::Entry> = live
                .iter()
                .copied()
                .filter(|e| e.spiffe_id == id.as_str())
                .collect();
            if of_id.is_empty() {
                return Err(CaError::Revocation(format!(
                    "no unexpired certificate for {id} in the ledger"
                )));
            }
            (format!("spiffe_id:{id}"), of_id)
        }
    };
    // The lineage below: the ledger is in issuance order, so one pass
    // finds children after their parents; loop to a fixed point anyway
    // (two files merged, a store's rows).
    let mut serials: HashSet<&str> =
        lineage.unwrap_or_else(|| hit.iter().map(|e| e.serial.as_str()).collect());
    let walk: Vec<&ledger::Entry> = if matches!(target, Target::Serial(_)) {
        all.iter().collect()
    } else {
        live.clone()
    };
    loop {
        let before = serials.len();
        for e in &walk {
            if e.renewed_from
                .as_deref()
                .is_some_and(|p| serials.contains(p))
                && serials.insert(e.serial.as_str())
                && !expired(&e.not_after, now)
            {
                hit.push(e);
            }
        }
        if serials.len() == before {
            break;
        }
    }
    let mut list = load(dir)?;
    list.revoked.retain(|r| !expired(&r.not_after, now));
    let known: HashSet<String> = list.revoked.iter().map(|r| r.serial.clone()).collect();
    let added: Vec<Revoked> = hit
        .iter()
        .filter(|e| !known.contains(&e.serial))
        .map(|e| Revoked {
            serial: e.serial.clone(),
            spiffe_id: e.spiffe_id.clone(),
            not_after: e.not_after.clone(),
            revoked_at: ca::rfc3339(now),
            by: by.clone(),
            reason: reason.to_owned(),
        })
        .collect();
    list.revoked.extend(added.iter().cloned());
    save(dir, &list)?;
    Ok(added)
}

/// The revoked serials, for lookups at renewal.
#[derive(Debug, Clone, Default)]
pub struct RevokedSet(HashSet<String>);

impl RevokedSet {
    /// From `revoked.json` in `dir`.
    pub fn load(dir: &Path) -> Result<RevokedSet, CaError> {
        Ok(RevokedSet(
            load(dir)?.revoked.into_iter().map(|r| r.serial).collect(),
        ))
    }

    /// Whether the certificate with this DER serial is revoked.
    pub fn contains_raw(&self, raw_serial: &[u8]) -> bool {
        self.0.contains(&ca::serial_hex(raw_serial))
    }

    /// Whether the certificate with this hex serial (as the ledger writes
    /// it) is revoked.
    pub fn contains(&self, serial_hex: &str) -> bool {
        self.0.contains(serial_hex)
    }

    /// How many serials are revoked.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(serial: &str, id: &str, from: Option<&str>, not_after: &str) -> ledger::Entry {
        ledger::Entry {
            serial: serial.into(),
            spiffe_id: id.into(),
            not_before: "2026-01-01T00:00:00Z".into(),
            not_after: not_after.into(),
            issuer_key_id: "k".into(),
            root_sha256: "r".into(),
            sha256: "s".into(),
            issued_at: "2026-01-01T00:00:00Z".into(),
            requester: "test".into(),
            renewed_from: from.map(str::to_owned),
        }
    }

    const WEB: &str = "spiffe://td.test/ns/default/sa/web";
    const API: &str = "spiffe://td.test/ns/default/sa/api";
    const LATER: &str = "2030-01-01T00:00:00Z";

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse(
            "2026-06-01T00:00:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    }

    #[test]
    fn serials_are_read_as_the_ledger_writes_them() {
        assert_eq!(normalize_serial("00AB:cd").unwrap(), "abcd");
        assert_eq!(normalize_serial("0x0abc").unwrap(), "0abc");
        assert_eq!(normalize_serial(" 3FB7 ").unwrap(), "3fb7");
        assert!(normalize_serial("xyz").is_err());
        assert!(normalize_serial("").is_err());
        assert_eq!(ca::serial_hex(&[0, 0x0a, 0xbc]), "0abc");
    }

    #[test]
    fn a_serial_takes_its_whole_lineage_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        ledger::append_all(
            dir,
            &[
                entry("aa", WEB, None, LATER),
                // The victim's renewal and the thief's, then the thief's again.
                entry("bb", WEB, Some("aa"), LATER),
                entry("cc", WEB, Some("aa"), LATER),
                entry("dd", WEB, Some("cc"), LATER),
                // Another lineage of the same ID, and another ID.
                entry("ee", WEB, None, LATER),
                entry("ff", API, Some("ee"), LATER),
                // Expired: nothing to revoke.
                entry("11", WEB, Some("dd"), "2026-02-01T00:00:00Z"),
            ],
        )
        .unwrap();
        let got = revoke(dir, &Target::Serial("AA".into()), "stolen", now()).unwrap();
        let serials: Vec<&str> = got.iter().map(|r| r.serial.as_str()).collect();
        assert_eq!(serials, ["aa", "bb", "cc", "dd"]);
        assert!(got
            .iter()
            .all(|r| r.by == "serial:aa" && r.reason == "stolen"));
        let set = RevokedSet::load(dir).unwrap();
        assert!(set.contains_raw(&[0xdd]) && !set.contains_raw(&[0xee]));
        // Again: nothing new.
        assert!(revoke(dir, &Target::Serial("aa".into()), "", now())
            .unwrap()
            .is_empty());
        // A renewal that raced the revocation is caught by running it again.
        ledger::append(dir, &entry("12", WEB, Some("dd"), LATER)).unwrap();
        let got = revoke(dir, &Target::Serial("aa".into()), "", now()).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].serial, "12");
        // Unknown or expired serials are refused.
        assert!(revoke(dir, &Target::Serial("99".into()), "", now()).is_err());
        assert!(revoke(dir, &Target::Serial("11".into()), "", now()).is_err());
    }

    /// The thief renewed the stolen A into C and is seen using C: revoking
    /// C must also take A (which the thief still holds and could renew
    /// again) and A's other renewals, across an expired link (adv33 F4).
    #[test]
    fn a_serial_takes_its_ancestors_and_their_lineage_too() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        ledger::append_all(
            dir,
            &[
                entry("0a", WEB, None, "2026-02-01T00:00:00Z"),
                entry("aa", WEB, Some("0a"), LATER),
                entry("bb", WEB, Some("aa"), LATER),
                entry("cc", WEB, Some("aa"), LATER),
                entry("dd", WEB, Some("cc"), LATER),
                entry("ee", WEB, None, LATER),
                entry("ff", API, Some("ee"), LATER),
            ],
        )
        .unwrap();
        let got = revoke(dir, &Target::Serial("cc".into()), "", now()).unwrap();
        let mut serials: Vec<&str> = got.iter().map(|r| r.serial.as_str()).collect();
        serials.sort();
        assert_eq!(serials, ["aa", "bb", "cc", "dd"]);
        assert!(got.iter().all(|r| r.by == "serial:cc"));
    }

    #[test]
    fn an_id_takes_every_live_certificate_of_it_and_expired_entries_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        ledger::append_all(
            dir,
            &[
                entry("aa", WEB, None, "2026-07-01T00:00:00Z"),
                entry("bb", WEB, Some("aa"), LATER),
                entry("cc", API, None, LATER),
            ],
        )
        .unwrap();
        let id = SpiffeId::parse(WEB).unwrap();
        let got = revoke(dir, &Target::SpiffeId(id.clone()), "", now()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(RevokedSet::load(dir).unwrap().len(), 2);
        // Once "aa" has expired it leaves the list at the next revocation.
        let later = now() + time::Duration::days(60);
        revoke(dir, &Target::Serial("cc".into()), "", later).unwrap();
        let list = load(dir).unwrap();
        let serials: Vec<&str> = list.revoked.iter().map(|r| r.serial.as_str()).collect();
        assert_eq!(serials, ["bb", "cc"]);
        let none = SpiffeId::parse("spiffe://td.test/ns/x/sa/none").unwrap();
        assert!(revoke(dir, &Target::SpiffeId(none), "", now()).is_err());
    }
}
