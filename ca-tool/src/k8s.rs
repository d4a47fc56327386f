//! `keyproof-ca k8s-secret`: a `kubernetes.io/tls` Secret for a workload.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use keyproof_identity::keys;

/// Why the Secret could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("--{flag}: {msg}")]
    Input { flag: &'static str, msg: String },
}

fn dns1123(flag: &'static str, s: &str, max: usize) -> Result<(), SecretError> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(SecretError::Input {
            flag,
            msg: format!(
                "{s:?} is not a valid Kubernetes name (lowercase letters, digits, '-', '.')"
            ),
        })
    }
}

/// Renders the Secret as YAML after checking the inputs fit together: the
/// chain parses and its leaf is an X.509-SVID (not a CA), the key matches
/// the leaf, the bundle holds certificates.
pub fn secret_yaml(
    name: &str,
    namespace: Option<&str>,
    cert_pem: &[u8],
    key_pem: &[u8],
    bundle_pem: &[u8],
) -> Result<String, SecretError> {
    dns1123("name", name, 253)?;
    if let Some(ns) = namespace {
        dns1123("namespace", ns, 63)?;
    }
    let certs = keys::certs_from_pem(cert_pem).map_err(|e| SecretError::Input {
        flag: "cert",
        msg: e.to_string(),
    })?;
    // A workload's Secret holds a workload's certificate: never a CA's
    // (the intermediate and its key would let the workload issue any
    // identity), nor anything else that is no X.509-SVID leaf.
    if let Some(leaf) = certs.first() {
        keyproof_identity::svid::check_leaf_der(leaf).map_err(|e| SecretError::Input {
            flag: "cert",
            msg: format!("not a workload's certificate (an X.509-SVID leaf): {e}"),
        })?;
    }
    let key = keys::private_key_from_pem(key_pem).map_err(|e| SecretError::Input {
        flag: "key",
        msg: e.to_string(),
    })?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|_| {
        SecretError::Input {
            flag: "key",
            msg: "unsupported or malformed private key".into(),
        }
    })?;
    let ck = rustls::sign::CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|_| SecretError::Input {
        flag: "key",
        msg: "the key does not match the certificate".into(),
    })?;
    keys::certs_from_pem(bundle_pem).map_err(|e| SecretError::Input {
        flag: "bundle",
        msg: e.to_string(),
    })?;
    let mut y = String::from("apiVersion: v1\nkind: Secret\nmetadata:\n");
    y.push_str(&format!("  name: {name}\n"));
    if let Some(ns) = namespace {
        y.push_str(&format!("  namespace: {ns}\n"));
    }
    y.push_str("  labels:\n    app.kubernetes.io/managed-by: keyproof-ca\n");
    y.push_str("type: kubernetes.io/tls\ndata:\n");
    y.push_str(&format!("  tls.crt: {}\n", STANDARD.encode(cert_pem)));
    y.push_str(&format!("  tls.key: {}\n", STANDARD.encode(key_pem)));
    y.push_str(&format!("  ca.crt: {}\n", STANDARD.encode(bundle_pem)));
    Ok(y)
}
