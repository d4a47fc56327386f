//! A stand-in for a Kubernetes API server's ServiceAccount token issuer:
//! signing keys, the JWKS it publishes at `/openid/v1/jwks`, and projected
//! tokens with the exact claim layout the API server writes into a pod's
//! projected volume.
//!
//! Key ids are what the API server uses: the base64url SHA-256 of the public
//! key's SubjectPublicKeyInfo DER. Tokens carry `aud` as an array (also for
//! one audience), `nbf` equal to `iat`, a fresh random `jti`, and the pod and
//! node the token is bound to; `kubernetes.io.warnafter` is absent, as the
//! API server writes it only into the year-long tokens it extends for its
//! own audience (the kubelet's `kube-api-access` volume), never into a
//! token for another audience such as `keyproof-ca`.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// The issuer tests use unless they test issuer checks.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audience keyproof-ca expects by default.
pub const AUDIENCE: &str = "keyproof-ca";

/// One signing key of the issuer.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    jwk: Jwk,
}

impl SigningKey {
    /// A new key: `Algorithm::RS256` (RSA 2048), `Algorithm::ES256` (P-256)
    /// or `Algorithm::ES384` (P-384).
    pub fn generate(alg: Algorithm) -> SigningKey {
        let (kp, encoding) = match alg {
            Algorithm::RS256 => {
                let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
                let enc = EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes())
                    .expect("RSA encoding key");
                (kp, enc)
            }
            Algorithm::ES256 => {
                let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .expect("P-256 key");
                let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes())
                    .expect("EC encoding key");
                (kp, enc)
            }
            Algorithm::ES384 => {
                let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
                    .expect("P-384 key");
                let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes())
                    .expect("EC encoding key");
                (kp, enc)
            }
            other => panic!("keyproof-ca accepts RS256, ES256 or ES384, not {other:?}"),
        };
        let kid = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &rcgen::PublicKeyData::subject_public_key_info(&kp),
        ));
        let mut jwk = Jwk::from_encoding_key(&encoding, alg).expect("JWK");
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        jwk.common.key_algorithm = Some(match alg {
            Algorithm::RS256 => KeyAlgorithm::RS256,
            Algorithm::ES384 => KeyAlgorithm::ES384,
            _ => KeyAlgorithm::ES256,
        });
        SigningKey {
            kid,
            alg,
            encoding,
            jwk,
        }
    }

    /// Signs `claims` with the header the API server writes (`alg`, `kid`,
    /// no `typ`).
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(self.alg);
        header.typ = None;
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign token")
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }
}

/// A cluster's token issuer: its `iss` and the keys its JWKS publishes. The
/// newest key signs.
pub struct ClusterIssuer {
    pub issuer: String,
    pub keys: Vec<SigningKey>,
}

impl ClusterIssuer {
    /// An issuer at `issuer` with one key of `alg`.
    pub fn new(issuer: &str, alg: Algorithm) -> ClusterIssuer {
        ClusterIssuer {
            issuer: issuer.to_owned(),
            keys: vec![SigningKey::generate(alg)],
        }
    }

    /// Adds a key that signs from now on (the old ones stay published).
    pub fn rotate(&mut self, alg: Algorithm) -> &SigningKey {
        self.keys.push(SigningKey::generate(alg));
        self.keys.last().expect("just pushed")
    }

    /// Stops publishing every key but the newest.
    pub fn retire_old_keys(&mut self) {
        let newest = self.keys.pop().expect("an issuer has a key");
        self.keys = vec![newest];
    }

    /// The signing key.
    pub fn current(&self) -> &SigningKey {
        self.keys.last().expect("an issuer has a key")
    }

    /// The JWKS document, as `/openid/v1/jwks` serves it.
    pub fn jwks_json(&self) -> String {
        let set = JwkSet {
            keys: self.keys.iter().map(|k| k.jwk.clone()).collect(),
        };
        serde_json::to_string(&set).expect("JWKS")
    }

    /// Writes the JWKS to `path` atomically (rename), as a sync job would.
    pub fn write_jwks(&self, path: &Path) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.jwks_json()).expect("write JWKS");
        std::fs::rename(&tmp, path).expect("rename JWKS");
    }

    /// A projected token for `ns`/`sa`, signed with the current key.
    pub fn token(&self, t: &SaToken) -> String {
        self.current().sign(&t.claims(&self.issuer))
    }
}

/// The variable parts of a projected ServiceAccount token.
#[derive(Clone, Debug)]
pub struct SaToken {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub audience: Vec<String>,
    /// Seconds since the epoch; default now.
    pub issued_at: i64,
    /// Lifetime in seconds; default 3600 (a projected token volume's
    /// `expirationSeconds` when the manifest names none).
    pub lifetime: i64,
}

impl SaToken {
    /// A token for the ServiceAccount `sa` in `ns`, audience `keyproof-ca`,
    /// issued now for an hour, bound to a pod of a Deployment named `sa`.
    pub fn new(ns: &str, sa: &str) -> SaToken {
        SaToken {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            pod: format!("{sa}-7c9d8f6b5-x2k4q"),
            audience: vec![AUDIENCE.to_owned()],
            issued_at: now(),
            lifetime: 3600,
        }
    }

    /// The claims, laid out as the API server lays them out. Each call has
    /// a new `jti`, as each token the API server mints does; the uids are
    /// stable for a given namespace, ServiceAccount and pod name.
    pub fn claims(&self, issuer: &str) -> serde_json::Value {
        let exp = self.issued_at + self.lifetime;
        json!({
            "aud": self.audience,
            "exp": exp,
            "iat": self.issued_at,
            "iss": issuer,
            "jti": random_uuid(),
            "kubernetes.io": {
                "namespace": self.namespace,
                "node": {
                    "name": "node-a",
                    "uid": uuid_like("node/node-a"),
                },
                "pod": {
                    "name": self.pod,
                    "uid": uuid_like(&format!("pod/{}/{}", self.namespace, self.pod)),
                },
                "serviceaccount": {
                    "name": self.service_account,
                    "uid": uuid_like(&format!("serviceaccount/{}/{}", self.namespace, self.service_account)),
                },
            },
            "nbf": self.issued_at,
            "sub": format!("system:serviceaccount:{}:{}", self.namespace, self.service_account),
        })
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A stable version-4-shaped UUID (as Kubernetes uids are) derived from
/// `seed`.
fn uuid_like(seed: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    uuid_v4(b)
}

/// A random version-4 UUID, as the API server makes for each token's `jti`.
fn random_uuid() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("random bytes");
    uuid_v4(b)
}

fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keyproof_ca::attest::{SaAttestor, SaConfig, SaTokenError};

    use super::*;

    fn payload(token: &str) -> serde_json::Value {
        let p = token.split('.').nth(1).expect("payload");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).expect("base64")).expect("json")
    }

    /// The tokens this issuer mints are what keyproof-ca accepts, and its
    /// key rotation is what the CA follows.
    #[test]
    fn minted_tokens_verify_with_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jwks = dir.path().join("jwks.json");
        let mut cluster = ClusterIssuer::new(ISSUER, Algorithm::ES256);
        cluster.write_jwks(&jwks);
        let att = SaAttestor::new(SaConfig {
            jwks: jwks.clone(),
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            leeway: Duration::from_secs(60),
            max_lifetime: None,
        })
        .expect("attestor");

        let t = SaToken::new("shop", "checkout");
        let (a, b) = (cluster.token(&t), cluster.token(&t));
        assert_ne!(payload(&a)["jti"], payload(&b)["jti"], "jti per token");
        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(a.split('.').next().expect("header"))
                .expect("base64"),
        )
        .expect("json");
        assert_eq!(
            header,
            json!({"alg": "ES256", "kid": cluster.current().kid})
        );
        let claims = att.verify(&a, now()).expect("verifies");
        assert_eq!(claims.subject(), "system:serviceaccount:shop:checkout");
        assert_eq!(claims.pod_name, t.pod);
        assert_eq!(claims.expires_at, t.issued_at + t.lifetime);

        let old = cluster.token(&t);
        cluster.rotate(Algorithm::RS256);
        cluster.write_jwks(&jwks);
        assert!(att.verify(&cluster.token(&t), now()).is_ok(), "new key");
        assert!(att.verify(&old, now()).is_ok(), "old key still published");
        assert_eq!(att.status().keys, 2);

        let mut expired = t.clone();
        expired.issued_at -= 2 * 3600;
        assert_eq!(
            att.verify(&cluster.token(&expired), now()),
            Err(SaTokenError::Expired)
        );
        let mut other = t.clone();
        other.audience = vec![ISSUER.into()];
        assert_eq!(
            att.verify(&cluster.token(&other), now()),
            Err(SaTokenError::Audience)
        );
    }
}
