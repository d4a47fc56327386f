//! Trust bundles: PEM, and the SPIFFE trust bundle format (a JWK set with one
//! `x509-svid` key per root, `spiffe_sequence` and `spiffe_refresh_hint`).

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use keyproof_identity::keys::{self, KeyType};
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};

use crate::fsutil::{self, PUBLIC};

/// The bundle as PEM, in a CA directory and in what `serve` hands out.
pub const PEM_FILE: &str = "bundle.pem";
/// The bundle in the SPIFFE trust bundle format.
pub const SPIFFE_FILE: &str = "bundle.spiffe.json";

/// What the bundle document says besides its roots.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// `spiffe_sequence`: increases each time the bundle changes.
    pub sequence: u64,
    /// `spiffe_refresh_hint`, in seconds.
    pub refresh_hint_secs: u64,
}

/// A bundle file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct WriteError {
    /// The file.
    pub path: PathBuf,
    /// The OS error.
    pub source: std::io::Error,
}

/// The JWK of one root certificate, with the certificate in `x5c`.
fn jwk(root: &CertificateDer<'_>) -> Value {
    let mut key = json!({
        "use": "x509-svid",
        "x5c": [STANDARD.encode(root.as_ref())],
    });
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(root) {
        let spki = cert.public_key();
        let raw = spki.subject_public_key.data.as_ref();
        match KeyType::of_spki(spki) {
            Ok(KeyType::EcdsaP256) if raw.len() == 65 => {
                key["kty"] = json!("EC");
                key["crv"] = json!("P-256");
                key["x"] = json!(URL_SAFE_NO_PAD.encode(&raw[1..33]));
                key["y"] = json!(URL_SAFE_NO_PAD.encode(&raw[33..65]));
            }
            Ok(KeyType::Ed25519) => {
                key["kty"] = json!("OKP");
                key["crv"] = json!("Ed25519");
                key["x"] = json!(URL_SAFE_NO_PAD.encode(raw));
            }
            _ => {}
        }
        key["kid"] = json!(URL_SAFE_NO_PAD.encode(keys::sha256(spki.raw)));
    }
    key
}

/// The SPIFFE trust bundle document.
pub fn spiffe_json(meta: Meta, roots: &[CertificateDer<'_>]) -> String {
    let doc = json!({
        "keys": roots.iter().map(jwk).collect::<Vec<_>>(),
        "spiffe_sequence": meta.sequence,
        "spiffe_refresh_hint": meta.refresh_hint_secs,
    });
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}

/// Writes [`PEM_FILE`] and [`SPIFFE_FILE`] into `dir`.
pub fn write(dir: &Path, meta: Meta, roots: &[CertificateDer<'_>]) -> Result<(), WriteError> {
    for (name, data) in documents(meta, roots) {
        let path = dir.join(name);
        fsutil::write_atomic(&path, &data, PUBLIC).map_err(|source| WriteError { path, source })?;
    }
    Ok(())
}

/// The bundle's files for `roots`: [`PEM_FILE`] and [`SPIFFE_FILE`], by
/// name, as [`write`] writes them.
pub fn documents(meta: Meta, roots: &[CertificateDer<'_>]) -> [(&'static str, Vec<u8>); 2] {
    let pem: String = roots.iter().map(|c| keys::cert_pem(c)).collect();
    [
        (PEM_FILE, pem.into_bytes()),
        (SPIFFE_FILE, spiffe_json(meta, roots).into_bytes()),
    ]
}

/// Reads the roots out of a SPIFFE trust bundle document.
pub fn roots_from_spiffe_json(doc: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let v: Value = serde_json::from_str(doc).map_err(|e| format!("not JSON: {e}"))?;
    let keys = v["keys"].as_array().ok_or("no \"keys\" array")?;
    let mut out = Vec::new();
    for k in keys.iter().filter(|k| k["use"] == "x509-svid") {
        for c in k["x5c"].as_array().into_iter().flatten() {
            let der = STANDARD
                .decode(c.as_str().unwrap_or_default())
                .map_err(|e| format!("bad x5c: {e}"))?;
            out.push(CertificateDer::from(der));
        }
    }
    Ok(out)
}
