//! `keyproof-ca k8s-bundle`: publishes the CA's trust bundle as a ConfigMap
//! in every workload namespace, as cert-manager's trust-manager does.
//!
//! A sidecar needs the trust bundle before it has an identity, to
//! authenticate the CA on first contact; it reads it from the ConfigMap
//! `keyproof-bundle` in its own namespace. This module keeps that ConfigMap
//! current in every namespace carrying a label (`keyproof.io/mesh=enabled`
//! by default): it re-reads the CA directory's `bundle.pem` every interval
//! and lists the matching namespaces, and writes the ConfigMap with
//! server-side apply (field manager `keyproof-ca`, `force=true`) wherever it
//! is new, the bundle changed, or the last attempt failed. So a namespace
//! labelled after the CA is up gets the bundle within one interval, and a
//! root rotation step (`rotate root prepare`, `finish`) reaches every
//! namespace without a human step.
//!
//! It never deletes anything: a namespace that loses its label keeps the
//! ConfigMap it had, because pods there may still start with it. A failure
//! in one namespace (RBAC, a terminating namespace, an admission webhook) is
//! logged and retried with backoff without holding up the others. Every
//! [`RESYNC`] the ConfigMap is applied again everywhere, which restores one
//! that was edited or deleted by hand.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use keyproof_identity::verify::TrustBundle;

use crate::kube::{self, ApiRequest, ApiServer, Connection, KubeError, Rounds};

/// The ConfigMap the example workloads mount.
pub const DEFAULT_CONFIGMAP: &str = "keyproof-bundle";
/// Namespaces that get the ConfigMap: a Kubernetes label selector.
pub const DEFAULT_NAMESPACE_SELECTOR: &str = "keyproof.io/mesh=enabled";
/// The field manager of the server-side apply: the owner of the fields it
/// writes, shown in the ConfigMap's `managedFields`.
pub const FIELD_MANAGER: &str = "keyproof-ca";
/// The data key holding the bundle (PEM), as trust-manager and
/// `kubernetes.io/tls` Secrets name it.
pub const BUNDLE_KEY: &str = "ca.crt";
/// The same PEM under the key the ConfigMap had when it was created by
/// hand (`--from-file=bundle.pem`): pods written against that keep getting
/// the current bundle instead of a copy frozen at the takeover.
pub const LEGACY_BUNDLE_KEY: &str = "bundle.pem";
/// The label every published ConfigMap carries.
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "keyproof-ca");
/// Annotation with the hex SHA-256 of the published bundle, to compare a
/// namespace's copy with the CA's (`sha256sum bundle.pem`) at a glance.
pub const SHA256_ANNOTATION: &str = "keyproof.io/bundle-sha256";
/// Largest `bundle.pem` published. A bundle holds one root, two during a
/// rotation (a few KiB); a ConfigMap may hold at most 1 MiB in all.
pub const MAX_BUNDLE_BYTES: usize = 256 * 1024;
/// Largest answer to one page of the namespace list.
pub const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;
/// Largest answer to an apply (the ConfigMap, echoed back with its
/// managedFields).
pub const MAX_APPLY_ANSWER_BYTES: usize = 2 * 1024 * 1024;
/// Namespaces asked for per page of the list.
pub const LIST_PAGE: usize = 500;
/// How often every namespace's ConfigMap is applied again even though the
/// bundle did not change, to restore copies edited or deleted by hand.
pub const RESYNC: Duration = Duration::from_secs(600);

/// What to publish, where, and how to reach the API server.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// The CA directory (`bundle.pem` is read from it, nothing written).
    pub dir: PathBuf,
    /// With `--store`: `bundle.pem` is read from PostgreSQL instead (HA
    /// replicas have no CA directory).
    pub store: Option<StoreSource>,
    /// The ConfigMap's name.
    pub configmap: String,
    /// Label selector for the namespaces, e.g. `keyproof.io/mesh=enabled`.
    pub namespace_selector: String,
    /// `https://host[:port]` of the API server.
    pub api_server: String,
    /// Bearer token file, re-read every cycle.
    pub token_file: PathBuf,
    /// PEM CA certificates for the API server, re-read every cycle.
    pub ca_file: PathBuf,
    /// Time between two cycles while all is well.
    pub interval: Duration,
}

/// The PostgreSQL store the bundle is read from (see [`crate::store`]).
#[derive(Clone)]
pub struct StoreSource(pub std::sync::Arc<crate::store::PgStore>);

impl std::fmt::Debug for StoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreSource({})", self.0.url())
    }
}

/// Why a cycle (or a namespace) failed. What is already published stays.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Reaching the API server failed.
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(
        "--configmap {0:?} is not a valid ConfigMap name (lowercase letters, digits, '-', '.')"
    )]
    BadName(String),
    #[error("--namespace-selector must not be empty: it would select every namespace")]
    EmptySelector,
    #[error("{path}: {msg}; nothing published")]
    Bundle { path: PathBuf, msg: String },
    #[error("the API server answered {status} to {request}{hint}: {body}")]
    Status {
        request: String,
        status: u16,
        hint: &'static str,
        body: String,
    },
    #[error("the answer to GET /api/v1/namespaces is not a namespace list: {0}")]
    NotNamespaceList(String),
    #[error(
        "ConfigMap {configmap} not published in {} of {total} namespaces: {}",
        .failed.len(),
        join_failures(.failed)
    )]
    Namespaces {
        configmap: String,
        total: usize,
        failed: Vec<(String, String)>,
    },
}

fn join_failures(failed: &[(String, String)]) -> String {
    let parts: Vec<String> = failed.iter().map(|(ns, e)| format!("{ns}: {e}")).collect();
    parts.join("; ")
}

/// The bundle as read from the CA directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// `bundle.pem`, as is.
    pub pem: String,
    /// Hex SHA-256 of `pem`.
    pub sha256: String,
    /// Root certificates in it.
    pub roots: usize,
}

/// Reads `dir/bundle.pem` and checks that it is a trust bundle: publishing
/// anything else would stop every new pod from authenticating the CA.
pub fn read_bundle(dir: &Path) -> Result<Bundle, PublishError> {
    let path = dir.join("bundle.pem");
    let err = |msg: String| PublishError::Bundle {
        path: path.clone(),
        msg,
    };
    let (_, bytes) = crate::fsutil::read_regular(&path, MAX_BUNDLE_BYTES as u64)
        .map_err(|e| err(e.to_string()))?;
    check_bundle(path, bytes)
}

/// Reads the store's `bundle.pem` document and checks it as [`read_bundle`]
/// does.
pub async fn read_store_bundle(store: &StoreSource) -> Result<Bundle, PublishError> {
    let path = PathBuf::from(format!("{} bundle.pem", store.0.url()));
    let err = |msg: String| PublishError::Bundle {
        path: path.clone(),
        msg,
    };
    let bytes = store
        .0
        .document("bundle.pem")
        .await
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("the store holds no CA".into()))?;
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(err(format!(
            "larger than {MAX_BUNDLE_BYTES} bytes: not a trust bundle"
        )));
    }
    check_bundle(path, bytes)
}

/// Checks that `bytes` (read from `path`) is a trust bundle.
fn check_bundle(path: PathBuf, bytes: Vec<u8>) -> Result<Bundle, PublishError> {
    let err = |msg: String| PublishError::Bundle {
        path: path.clone(),
        msg,
    };
    let bundle = TrustBundle::from_pem(&bytes).map_err(|e| err(e.to_string()))?;
    let pem = String::from_utf8(bytes).map_err(|_| err("not UTF-8".into()))?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pem.as_bytes());
    Ok(Bundle {
        sha256: hex::encode(digest.as_ref()),
        roots: bundle.roots().len(),
        pem,
    })
}

/// Checks a ConfigMap name (a DNS subdomain, as Kubernetes wants it).
pub fn check_name(name: &str) -> Result<(), PublishError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(PublishError::BadName(name.to_owned()))
    }
}

/// The server-side apply body: the whole intent for this field manager
/// (JSON, which the API server accepts as `application/apply-patch+yaml`).
pub fn apply_body(configmap: &str, namespace: &str, bundle: &Bundle) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap,
            "namespace": namespace,
            "labels": { MANAGED_BY_LABEL.0: MANAGED_BY_LABEL.1 },
            "annotations": { SHA256_ANNOTATION: bundle.sha256 },
        },
        "data": {
            BUNDLE_KEY: bundle.pem,
            LEGACY_BUNDLE_KEY: bundle.pem,
        },
    })
}

/// The apply request's path and query.
pub fn apply_path(configmap: &str, namespace: &str) -> String {
    format!(
        "/api/v1/namespaces/{}/configmaps/{}?fieldManager={FIELD_MANAGER}&force=true",
        kube::query_value(namespace),
        kube::query_value(configmap)
    )
}

/// What one cycle did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Hex SHA-256 of the bundle.
    pub sha256: String,
    /// Roots in the bundle.
    pub roots: usize,
    /// Namespaces the selector matched (terminating ones left out).
    pub namespaces: Vec<String>,
    /// Where the ConfigMap was applied in this cycle.
    pub applied: Vec<String>,
    /// Where applying failed, with why.
    pub failed: Vec<(String, String)>,
}

impl Report {
    /// One line for the operator.
    pub fn describe(&self, configmap: &str, selector: &str) -> String {
        let bundle = format!(
            "trust bundle sha256 {} ({} roots)",
            &self.sha256[..16.min(self.sha256.len())],
            self.roots
        );
        if self.namespaces.is_empty() {
            return format!("no namespace matches {selector}: {bundle} not published");
        }
        let mut s = if self.applied.is_empty() {
            format!(
                "ConfigMap {configmap} is up to date in {} namespaces ({bundle})",
                self.namespaces.len()
            )
        } else {
            format!(
                "published {bundle} as ConfigMap {configmap} in {} of {} namespaces: {}",
                self.applied.len(),
                self.namespaces.len(),
                self.applied.join(", ")
            )
        };
        if !self.failed.is_empty() {
            let names: Vec<&str> = self.failed.iter().map(|(n, _)| n.as_str()).collect();
            s.push_str(&format!("; failed in {}", names.join(", ")));
        }
        s
    }
}

/// Keeps the state between cycles: which namespace holds which bundle.
#[derive(Debug)]
pub struct Publisher {
    opts: PublishOptions,
    /// Namespace -> SHA-256 of the bundle last applied there successfully.
    published: HashMap<String, String>,
    /// When every namespace was last applied regardless of `published`.
    last_resync: Option<Instant>,
}

/// A connection that is reopened when the API server closed it (idle
/// timeouts, a too-large answer that was not read to the end).
struct Conn<'a> {
    api: &'a ApiServer,
    conn: Option<Connection>,
}

impl Conn<'_> {
    async fn send(&mut self, req: &ApiRequest<'_>) -> Result<(StatusCode, Bytes), KubeError> {
        let mut conn = match self.conn.take() {
            Some(c) if c.is_open() => c,
            _ => self.api.connect().await?,
        };
        let r = conn.send(req).await;
        self.conn = Some(conn);
        r
    }
}

fn status_error(
    request: String,
    status: StatusCode,
    hint: &'static str,
    body: &[u8],
) -> PublishError {
    PublishError::Status {
        request,
        status: status.as_u16(),
        hint,
        body: kube::excerpt(body),
    }
}

const TOKEN_HINT: &str = " (the API server did not accept the --token-file token)";

/// The names of the namespaces `selector` matches, leaving out those being
/// deleted (nothing can be created there). Follows `continue` tokens.
async fn list_namespaces(conn: &mut Conn<'_>, selector: &str) -> Result<Vec<String>, PublishError> {
    let mut names = Vec::new();
    let mut cont: Option<String> = None;
    loop {
        let mut path = format!(
            "/api/v1/namespaces?labelSelector={}&limit={LIST_PAGE}",
            kube::query_value(selector)
        );
        if let Some(c) = &cont {
            path.push_str(&format!("&continue={}", kube::query_value(c)));
        }
        let req = ApiRequest {
            method: Method::GET,
            path: &path,
            content_type: None,
            accept: "application/json",
            body: Bytes::new(),
            max_answer: MAX_LIST_BYTES,
        };
        let (status, body) = conn.send(&req).await?;
        if status != StatusCode::OK {
            let hint = match status {
                StatusCode::UNAUTHORIZED => TOKEN_HINT,
                StatusCode::FORBIDDEN => {
                    " (the ServiceAccount needs list on namespaces: the ClusterRole \
                     keyproof-ca-bundle-publisher)"
                }
                StatusCode::BAD_REQUEST => " (check --namespace-selector)",
                _ => "",
            };
            return Err(status_error(req.describe(), status, hint, &body));
        }
        let list: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| PublishError::NotNamespaceList(e.to_string()))?;
        let items = list["items"]
            .as_array()
            .ok_or_else(|| PublishError::NotNamespaceList("no items".into()))?;
        for item in items {
            let name = item["metadata"]["name"]
                .as_str()
                .ok_or_else(|| PublishError::NotNamespaceList("an item without a name".into()))?;
            if item["status"]["phase"] != "Terminating" {
                names.push(name.to_owned());
            }
        }
        match list["metadata"]["continue"].as_str() {
            Some(c) if !c.is_empty() => cont = Some(c.to_owned()),
            _ => break,
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Applies the ConfigMap in one namespace.
async fn apply(
    conn: &mut Conn<'_>,
    configmap: &str,
    namespace: &str,
    bundle: &Bundle,
) -> Result<(), PublishError> {
    let path = apply_path(configmap, namespace);
    let body = serde_json::to_vec(&apply_body(configmap, namespace, bundle))
        .expect("a JSON value serializes");
    let req = ApiRequest {
        method: Method::PATCH,
        path: &path,
        content_type: Some("application/apply-patch+yaml"),
        accept: "application/json",
        body: Bytes::from(body),
        max_answer: MAX_APPLY_ANSWER_BYTES,
    };
    let (status, answer) = conn.send(&req).await?;
    if status.is_success() {
        return Ok(());
    }
    let hint = match status {
        StatusCode::UNAUTHORIZED => TOKEN_HINT,
        StatusCode::FORBIDDEN => {
            " (RBAC: the ClusterRole keyproof-ca-bundle-publisher grants configmaps \
             get/create/patch; or the namespace is being deleted)"
        }
        StatusCode::NOT_FOUND => " (the namespace is gone)",
        StatusCode::CONFLICT => " (another field manager holds these fields)",
        _ => "",
    };
    Err(status_error(req.describe(), status, hint, &answer))
}

impl Publisher {
    /// A publisher that has published nothing yet. Checks the options that
    /// can be checked without the cluster.
    pub fn new(opts: PublishOptions) -> Result<Publisher, PublishError> {
        check_name(&opts.configmap)?;
        if opts.namespace_selector.trim().is_empty() {
            return Err(PublishError::EmptySelector);
        }
        Ok(Publisher {
            opts,
            published: HashMap::new(),
            last_resync: None,
        })
    }

    /// The options it runs with.
    pub fn options(&self) -> &PublishOptions {
        &self.opts
    }

    /// One cycle: read the bundle, list the namespaces, apply where needed.
    /// `Err` when nothing could be done (the bundle, the API server, the
    /// list); per-namespace failures are in the report.
    pub async fn cycle(&mut self) -> Result<Report, PublishError> {
        let bundle = match &self.opts.store {
            Some(store) => read_store_bundle(store).await?,
            None => read_bundle(&self.opts.dir)?,
        };
        let api = ApiServer::load(
            &self.opts.api_server,
            &self.opts.token_file,
            &self.opts.ca_file,
        )?;
        let mut conn = Conn {
            api: &api,
            conn: None,
        };
        let namespaces = list_namespaces(&mut conn, &self.opts.namespace_selector).await?;
        // Forget namespaces no longer selected: if one is labelled again
        // later, it is applied again at once.
        self.published.retain(|ns, _| namespaces.contains(ns));
        if self.last_resync.is_none_or(|t| t.elapsed() >= RESYNC) {
            self.published.clear();
            self.last_resync = Some(Instant::now());
        }
        let mut report = Report {
            sha256: bundle.sha256.clone(),
            roots: bundle.roots,
            ..Report::default()
        };
        for ns in &namespaces {
            if self.published.get(ns) == Some(&bundle.sha256) {
                continue;
            }
            match apply(&mut conn, &self.opts.configmap, ns, &bundle).await {
                Ok(()) => {
                    self.published.insert(ns.clone(), bundle.sha256.clone());
                    report.applied.push(ns.clone());
                }
                Err(e) => {
                    self.published.remove(ns);
                    report.failed.push((ns.clone(), e.to_string()));
                }
            }
        }
        report.namespaces = namespaces;
        Ok(report)
    }
}

/// One cycle for `--once`: `Err` unless every selected namespace holds the
/// current bundle.
pub async fn publish_once(opts: &PublishOptions) -> Result<Report, PublishError> {
    let mut p = Publisher::new(opts.clone())?;
    let report = p.cycle().await?;
    if report.failed.is_empty() {
        Ok(report)
    } else {
        Err(PublishError::Namespaces {
            configmap: opts.configmap.clone(),
            total: report.namespaces.len(),
            failed: report.failed,
        })
    }
}

/// Publishes every `interval` until `shutdown` completes. Failures are
/// logged and retried with backoff (1 s, 2 s, ... up to the interval); they
/// never end the loop, because what is published stays valid and the next
/// attempt may succeed.
pub async fn run(mut publisher: Publisher, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let interval = publisher.opts.interval;
    let configmap = publisher.opts.configmap.clone();
    let selector = publisher.opts.namespace_selector.clone();
    let mut rounds = Rounds::new(interval);
    let mut last_sha: Option<String> = None;
    loop {
        let result = tokio::select! {
            _ = &mut shutdown => return,
            r = publisher.cycle() => r,
        };
        let ok = match result {
            Ok(report) => {
                if last_sha.as_deref() != Some(&report.sha256) {
                    if last_sha.is_some() {
                        tracing::info!(
                            sha256 = %report.sha256,
                            roots = report.roots,
                            "the CA's trust bundle changed; publishing it"
                        );
                    }
                    last_sha = Some(report.sha256.clone());
                }
                for (ns, e) in &report.failed {
                    tracing::warn!(
                        namespace = %ns,
                        configmap = %configmap,
                        error = %e,
                        "could not publish the trust bundle in this namespace; retrying"
                    );
                }
                let msg = report.describe(&configmap, &selector);
                if !report.applied.is_empty() || rounds.first() {
                    tracing::info!(
                        sha256 = %report.sha256,
                        namespaces = report.namespaces.len(),
                        applied = report.applied.len(),
                        failed = report.failed.len(),
                        "{msg}"
                    );
                } else {
                    tracing::debug!("{msg}");
                }
                report.failed.is_empty()
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    configmap = %configmap,
                    "trust bundle publishing failed; what is published is kept"
                );
                false
            }
        };
        if ok && rounds.failures() > 0 {
            let failures = rounds.failures();
            tracing::info!(failures, "trust bundle publishing recovered");
        }
        let delay = rounds.end(ok);
        if !Rounds::wait(delay, &mut shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configmap_names() {
        for ok in ["keyproof-bundle", "a", "a.b-c", "x1"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "Keyproof", "-a", "a-", "a_b", "a/b", &"a".repeat(254)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_apply_body_is_the_whole_intent() {
        let b = Bundle {
            pem: "-----BEGIN CERTIFICATE-----\n...\n".into(),
            sha256: "ab".repeat(32),
            roots: 1,
        };
        let v = apply_body("keyproof-bundle", "web", &b);
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["kind"], "ConfigMap");
        assert_eq!(v["metadata"]["name"], "keyproof-bundle");
        assert_eq!(v["metadata"]["namespace"], "web");
        assert_eq!(
            v["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "keyproof-ca"
        );
        assert_eq!(v["data"]["ca.crt"], b.pem);
        assert_eq!(v["data"]["bundle.pem"], b.pem);
        assert_eq!(
            apply_path("keyproof-bundle", "web"),
            "/api/v1/namespaces/web/configmaps/keyproof-bundle?fieldManager=keyproof-ca&force=true"
        );
    }

    #[test]
    fn the_bundle_must_be_a_bundle() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_bundle(dir.path()),
            Err(PublishError::Bundle { .. })
        ));
        std::fs::write(dir.path().join("bundle.pem"), "hello\n").unwrap();
        let e = read_bundle(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("bundle.pem") && e.contains("nothing published"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_selector_is_refused() {
        let opts = PublishOptions {
            dir: "/nonexistent".into(),
            store: None,
            configmap: DEFAULT_CONFIGMAP.into(),
            namespace_selector: " ".into(),
            api_server: kube::DEFAULT_API_SERVER.into(),
            token_file: kube::DEFAULT_TOKEN_FILE.into(),
            ca_file: kube::DEFAULT_CA_FILE.into(),
            interval: Duration::from_secs(30),
        };
        assert!(matches!(
            Publisher::new(opts),
            Err(PublishError::EmptySelector)
        ));
    }
}
