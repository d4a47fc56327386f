//! `keyproof-ca k8s-bundle`: the real binary, publishing a real CA
//! directory's trust bundle, against a real HTTPS server.
//!
//! The server here is the STAND-IN for the Kubernetes API server that
//! RECORDS every request it gets (`keyproof_tests::kube_api`: a certificate
//! for DNS `localhost` from a test cluster CA written to a file, as the
//! kubelet writes `ca.crt`, and a Kubernetes-style 401 Status to callers
//! without the expected bearer token). It holds a few namespaces with labels
//! and answers `GET /api/v1/namespaces?labelSelector=...` (equality
//! selectors, in pages of two with `continue` tokens, as a real API server
//! may), and stores the ConfigMaps sent with
//! `PATCH /api/v1/namespaces/{ns}/configmaps/{name}`. It is no API server:
//! it does not merge server-side apply patches, it keeps the last body
//! sent, which is what the tests look at.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use keyproof_tests::kube_api::{
    json, run_once, status, wait_for, ApiServer, ClusterCa, Daemon, Recorded, TOKEN,
};
use keyproof_tests::{cmd, run, run_ok, TestCa};

const SELECTOR: &str = "keyproof.io/mesh=enabled";

/// What the stand-in holds, changeable while it runs.
#[derive(Default)]
struct State {
    /// Namespace -> (labels, terminating).
    namespaces: BTreeMap<String, (BTreeMap<String, String>, bool)>,
    /// (namespace, name) -> the last ConfigMap body applied.
    configmaps: BTreeMap<(String, String), serde_json::Value>,
    /// Namespaces whose ConfigMap writes are refused with this status.
    refuse: HashMap<String, StatusCode>,
}

/// The stand-in for the API server (see the module comment).
struct StandInApiServer {
    api: ApiServer,
    state: Arc<Mutex<State>>,
}

/// Equality-based selectors only (`k=v`, `k==v`, `k!=v`, `k`, `!k`),
/// comma-separated: what the tests use.
fn selects(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    selector.split(',').map(str::trim).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).map(String::as_str) != Some(v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels.get(k).map(String::as_str) == Some(v)
        } else if let Some(k) = term.strip_prefix('!') {
            !labels.contains_key(k)
        } else {
            labels.contains_key(term)
        }
    })
}

/// The stand-in's answer to one request with the expected token.
fn answer(state: &mut State, r: &Recorded) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
    match (&r.method, segments.as_slice()) {
        (&Method::GET, ["api", "v1", "namespaces"]) => {
            let selector = r.param("labelSelector").unwrap_or("");
            let matching: Vec<_> = state
                .namespaces
                .iter()
                .filter(|(_, (labels, _))| selects(selector, labels))
                .collect();
            // Pages of two, whatever `limit` asks: a server may return fewer.
            let start: usize = r.param("continue").map_or(0, |c| c.parse().unwrap());
            let page = &matching[start.min(matching.len())..(start + 2).min(matching.len())];
            let items: Vec<serde_json::Value> = page
                .iter()
                .map(|(name, (labels, terminating))| {
                    serde_json::json!({
                        "metadata": {"name": name, "labels": labels},
                        "status": {"phase": if *terminating { "Terminating" } else { "Active" }},
                    })
                })
                .collect();
            let cont = if start + 2 < matching.len() {
                (start + 2).to_string()
            } else {
                String::new()
            };
            json(
                StatusCode::OK,
                serde_json::json!({
                    "kind": "NamespaceList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1", "continue": cont},
                    "items": items,
                }),
            )
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            if !state.namespaces.contains_key(*ns) {
                return status(StatusCode::NOT_FOUND, "NotFound");
            }
            if let Some(code) = state.refuse.get(*ns) {
                return status(*code, "Forbidden");
            }
            if r.content_type.as_deref() != Some("application/apply-patch+yaml") {
                return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType");
            }
            let Ok(body) = serde_json::from_str::<serde_json::Value>(&r.body) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest");
            };
            let key = (ns.to_string(), name.to_string());
            let created = !state.configmaps.contains_key(&key);
            state.configmaps.insert(key, body.clone());
            json(
                if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                body,
            )
        }
        _ => status(StatusCode::NOT_FOUND, "NotFound"),
    }
}

impl StandInApiServer {
    fn start(ca: &ClusterCa) -> StandInApiServer {
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let api = ApiServer::start(ca, TOKEN, move |r| answer(&mut s.lock().unwrap(), r));
        StandInApiServer { api, state }
    }

    fn url(&self) -> String {
        self.api.url()
    }

    fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        self.state.lock().unwrap().namespaces.insert(
            name.to_owned(),
            (
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                false,
            ),
        );
    }

    fn configmap(&self, ns: &str, name: &str) -> Option<serde_json::Value> {
        self.state
            .lock()
            .unwrap()
            .configmaps
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The namespaces holding ConfigMap `name`.
    fn holders(&self, name: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .configmaps
            .keys()
            .filter(|(_, n)| n == name)
            .map(|(ns, _)| ns.clone())
            .collect()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.api.requests()
    }

    fn patches(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::PATCH)
            .collect()
    }

    fn refuse(&self, ns: &str, code: Option<StatusCode>) {
        let mut s = self.state.lock().unwrap();
        match code {
            Some(c) => s.refuse.insert(ns.to_owned(), c),
            None => s.refuse.remove(ns),
        };
    }
}

/// A CA directory, the files the sidecar's volumes would hold, and the
/// stand-in with a few namespaces: `web`, `payments` and `batch` labelled
/// for the mesh, `legacy` without the label, `off` with another value,
/// `gone` labelled but being deleted.
struct Fixture {
    ca: TestCa,
    ca_file: PathBuf,
    token_file: PathBuf,
    server: StandInApiServer,
    cluster_ca: ClusterCa,
}

const MESH: &[(&str, &str)] = &[("keyproof.io/mesh", "enabled")];

impl Fixture {
    fn new() -> Fixture {
        let ca = TestCa::new("prod.example.com");
        let cluster_ca = ClusterCa::new("stand-in cluster CA");
        let ca_file = cluster_ca.write(&ca.path("cluster-ca.crt"));
        let token_file = ca.path("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let server = StandInApiServer::start(&cluster_ca);
        for ns in ["web", "payments", "batch", "gone"] {
            server.namespace(ns, MESH);
        }
        server.namespace("legacy", &[("team", "legacy")]);
        server.namespace("off", &[("keyproof.io/mesh", "disabled")]);
        server
            .state
            .lock()
            .unwrap()
            .namespaces
            .get_mut("gone")
            .unwrap()
            .1 = true;
        Fixture {
            ca,
            ca_file,
            token_file,
            server,
            cluster_ca,
        }
    }

    fn command(&self) -> std::process::Command {
        let mut c = cmd("keyproof-ca");
        c.arg("k8s-bundle")
            .arg("--dir")
            .arg(&self.ca.dir)
            .args(["--api-server", &self.server.url()])
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--ca-file")
            .arg(&self.ca_file);
        c
    }

    /// `--once` with extra arguments; returns (exit code, stdout, stderr).
    fn once(&self, extra: &[&str]) -> (i32, String, String) {
        run_once(self.command().arg("--once").args(extra))
    }

    fn bundle(&self) -> String {
        std::fs::read_to_string(self.ca.bundle()).unwrap()
    }

    /// `ca.crt` of the keyproof-bundle ConfigMap in `ns`.
    fn published(&self, ns: &str) -> Option<String> {
        self.server
            .configmap(ns, "keyproof-bundle")
            .and_then(|c| c["data"]["ca.crt"].as_str().map(str::to_owned))
    }

    /// The publisher as it runs in the CA pod, every second.
    fn daemon(&self) -> Daemon {
        let log = self
            .ca
            .path(&format!("publish-{}.log", self.server.requests().len()));
        Daemon::spawn(self.command().args(["--interval", "1s"]), log)
    }
}

fn sha256_hex(s: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn once_applies_the_configmap_to_labelled_namespaces_only() {
    let fx = Fixture::new();
    let (code, stdout, stderr) = fx.once(&[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("as ConfigMap keyproof-bundle in 3 of 3 namespaces: batch, payments, web"),
        "{stdout}"
    );
    assert_eq!(
        fx.server.holders("keyproof-bundle"),
        ["batch", "payments", "web"],
        "not in legacy (no label), off (another value) or gone (terminating)"
    );
    let bundle = fx.bundle();

    // The namespace list: the selector, paged with `continue`.
    let reqs = fx.server.requests();
    let lists: Vec<&Recorded> = reqs.iter().filter(|r| r.method == Method::GET).collect();
    assert_eq!(lists.len(), 2, "two pages of two: {lists:#?}");
    for l in &lists {
        assert_eq!(l.path, "/api/v1/namespaces");
        assert_eq!(l.param("labelSelector"), Some(SELECTOR));
    }
    assert_eq!(lists[0].param("continue"), None);
    assert_eq!(lists[1].param("continue"), Some("2"));

    // Server-side apply, one per selected namespace, nothing else.
    let patches = fx.server.patches();
    assert_eq!(patches.len(), 3, "{patches:#?}");
    assert!(
        reqs.iter()
            .all(|r| r.method == Method::GET || r.method == Method::PATCH),
        "it never deletes, creates or replaces: {reqs:#?}"
    );
    for p in &patches {
        assert_eq!(
            p.authorization.as_deref(),
            Some(&*format!("Bearer {TOKEN}"))
        );
        assert_eq!(
            p.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(p.param("fieldManager"), Some("keyproof-ca"));
        assert_eq!(p.param("force"), Some("true"));
        let ns = p
            .path
            .strip_prefix("/api/v1/namespaces/")
            .and_then(|r| r.strip_suffix("/configmaps/keyproof-bundle"))
            .unwrap_or_else(|| panic!("unexpected path {}", p.path));
        let body: serde_json::Value = serde_json::from_str(&p.body).expect("a JSON body");
        assert_eq!(body["apiVersion"], "v1");
        assert_eq!(body["kind"], "ConfigMap");
        assert_eq!(body["metadata"]["name"], "keyproof-bundle");
        assert_eq!(body["metadata"]["namespace"], ns);
        assert_eq!(
            body["metadata"]["labels"],
            serde_json::json!({"app.kubernetes.io/managed-by": "keyproof-ca"})
        );
        assert_eq!(
            body["metadata"]["annotations"]["keyproof.io/bundle-sha256"],
            sha256_hex(&bundle)
        );
        assert_eq!(body["data"]["ca.crt"], bundle, "ca.crt is bundle.pem as is");
        assert_eq!(body["data"]["bundle.pem"], bundle);
        assert!(body.get("status").is_none() && body["metadata"].get("resourceVersion").is_none());
    }

    // Another selector and name.
    let (code, stdout, stderr) = fx.once(&[
        "--namespace-selector",
        "keyproof.io/mesh=disabled",
        "--configmap",
        "mesh-roots",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(fx.server.holders("mesh-roots"), ["off"]);

    // No namespace selected: nothing to do, and said so.
    let (code, stdout, _) = fx.once(&["--namespace-selector", "nothing=here"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("no namespace matches nothing=here"),
        "{stdout}"
    );

    // A name Kubernetes would refuse, before any request.
    let before = fx.server.requests().len();
    let (code, _, stderr) = fx.once(&["--configmap", "Keyproof_Bundle"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--configmap"), "{stderr}");
    assert_eq!(fx.server.requests().len(), before);
}

#[test]
fn the_running_publisher_follows_rotations_and_new_namespaces() {
    let fx = Fixture::new();
    let d = fx.daemon();
    let v1 = fx.bundle();
    assert!(
        wait_for(Duration::from_secs(15), || ["web", "payments", "batch"]
            .iter()
            .all(|ns| fx.published(ns).as_deref() == Some(&*v1))),
        "the first round did not publish:\n{}",
        d.log()
    );
    // Unchanged bundle: the namespaces are listed again, nothing re-applied.
    let patches = fx.server.patches().len();
    let lists = fx.server.requests().len() - patches;
    assert!(
        wait_for(Duration::from_secs(10), || fx.server.requests().len()
            - fx.server.patches().len()
            >= lists + 4),
        "the namespaces are not listed every interval:\n{}",
        d.log()
    );
    assert_eq!(fx.server.patches().len(), patches, "re-applied for nothing");

    // A namespace labelled later gets it within an interval.
    fx.server.namespace("late", MESH);
    assert!(
        wait_for(Duration::from_secs(10), || fx.published("late").as_deref()
            == Some(&*v1)),
        "a new namespace did not get the bundle:\n{}",
        d.log()
    );

    // A root rotation changes the bundle: republished everywhere.
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "prepare", "--dir"])
            .arg(&fx.ca.dir),
    );
    let v2 = fx.bundle();
    assert_ne!(v1, v2);
    assert_eq!(v2.matches("BEGIN CERTIFICATE").count(), 2, "old + new root");
    let changed = Instant::now();
    assert!(
        wait_for(Duration::from_secs(15), || [
            "web", "payments", "batch", "late"
        ]
        .iter()
        .all(|ns| fx.published(ns).as_deref() == Some(&*v2))),
        "the rotated bundle was not republished:\n{}",
        d.log()
    );
    // --interval 1s, plus a round and a process sharing two cores.
    assert!(
        changed.elapsed() < Duration::from_secs(6),
        "took {:?}",
        changed.elapsed()
    );
    assert_eq!(fx.server.holders("keyproof-bundle").len(), 4);
    let log = d.log();
    assert!(
        log.contains("the CA's trust bundle changed; publishing it") && log.contains("2 roots"),
        "{log}"
    );
    assert!(
        !log.contains("\u{1b}["),
        "no colour codes in a log file:\n{log}"
    );
    assert!(fx
        .server
        .requests()
        .iter()
        .all(|r| r.method == Method::GET || r.method == Method::PATCH));
}

#[test]
fn an_api_error_in_one_namespace_does_not_stop_the_others() {
    let fx = Fixture::new();
    fx.server.refuse("batch", Some(StatusCode::FORBIDDEN));
    let (code, stdout, stderr) = fx.once(&[]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("not published in 1 of 3 namespaces: batch:")
            && stderr.contains("answered 403")
            && stderr.contains("keyproof-ca-bundle-publisher"),
        "{stderr}"
    );
    // "batch" sorts first: the others were still done.
    assert_eq!(fx.server.holders("keyproof-bundle"), ["payments", "web"]);

    // The running publisher retries it, without re-applying the others,
    // until it works.
    let d = fx.daemon();
    let tries = |ns: &str| {
        fx.server
            .patches()
            .iter()
            .filter(|p| p.path.contains(&format!("/namespaces/{ns}/")))
            .count()
    };
    let (batch0, web0) = (tries("batch"), tries("web"));
    assert!(
        wait_for(Duration::from_secs(15), || tries("batch") >= batch0 + 3),
        "no retries:\n{}",
        d.log()
    );
    assert!(
        d.log()
            .contains("could not publish the trust bundle in this namespace; retrying"),
        "{}",
        d.log()
    );
    assert_eq!(tries("web"), web0 + 1, "applied once by the new process");
    fx.server.refuse("batch", None);
    let v1 = fx.bundle();
    assert!(
        wait_for(Duration::from_secs(15), || fx.published("batch").as_deref()
            == Some(&*v1)),
        "no recovery:\n{}",
        d.log()
    );
    assert!(
        d.log().contains("trust bundle publishing recovered"),
        "{}",
        d.log()
    );
}

#[test]
fn a_wrong_token_or_cluster_ca_fails_clearly() {
    let fx = Fixture::new();
    std::fs::write(&fx.token_file, "some-other-token").unwrap();
    let (code, stdout, stderr) = fx.once(&[]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("answered 401 to GET /api/v1/namespaces")
            && stderr.contains("did not accept the --token-file token"),
        "{stderr}"
    );
    assert!(fx.server.patches().is_empty());
    assert!(fx.server.holders("keyproof-bundle").is_empty());

    // A missing token file names the flag, and nothing is sent.
    std::fs::remove_file(&fx.token_file).unwrap();
    let before = fx.server.requests().len();
    let (code, _, stderr) = fx.once(&[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--token-file"), "{stderr}");
    assert_eq!(fx.server.requests().len(), before);

    // Another cluster's CA: the TLS error names --ca-file.
    std::fs::write(&fx.token_file, TOKEN).unwrap();
    std::fs::write(&fx.ca_file, ClusterCa::new("another cluster").pem).unwrap();
    let (code, _, stderr) = fx.once(&[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("invalid peer certificate") && stderr.contains("--ca-file"),
        "{stderr}"
    );

    // A CA directory without a bundle: nothing published, the file named.
    std::fs::write(&fx.ca_file, &fx.cluster_ca.pem).unwrap();
    let empty = fx.ca.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(cmd("keyproof-ca")
        .args(["k8s-bundle", "--once", "--dir"])
        .arg(&empty)
        .args(["--api-server", &fx.server.url()])
        .arg("--token-file")
        .arg(&fx.token_file)
        .arg("--ca-file")
        .arg(&fx.ca_file));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains(&*Path::new(&empty).join("bundle.pem").to_string_lossy())
            && stderr.contains("nothing published"),
        "{stderr}"
    );
    assert!(fx.server.holders("keyproof-bundle").is_empty());
}

/// HA replicas have no CA directory: with `--store` the publisher reads the
/// bundle from PostgreSQL, and follows a root rotation made there.
#[test]
fn with_a_store_the_bundle_comes_from_postgresql() {
    let Some(pg) = keyproof_tests::postgres::Postgres::start() else {
        return;
    };
    let fx = Fixture::new();
    let url = pg.url("publish");
    run_ok(
        cmd("keyproof-ca")
            .args(["migrate", "--store", &url, "--dir"])
            .arg(&fx.ca.dir),
    );
    let publish = |fx: &Fixture| {
        let mut c = cmd("keyproof-ca");
        c.args(["k8s-bundle", "--once", "--store", &url])
            .args(["--api-server", &fx.server.url()])
            .arg("--token-file")
            .arg(&fx.token_file)
            .arg("--ca-file")
            .arg(&fx.ca_file);
        let (code, stdout, stderr) = run_once(&mut c);
        assert_eq!(code, 0, "{stdout}{stderr}");
    };
    publish(&fx);
    assert_eq!(fx.published("web").as_deref(), Some(fx.bundle().as_str()));

    // A root rotation in the store (the directory no longer counts).
    run_ok(
        cmd("keyproof-ca")
            .args(["rotate", "root", "prepare", "--store", &url, "--dir"])
            .arg(&fx.ca.dir),
    );
    let in_store = run_ok(
        cmd("keyproof-ca")
            .args(["bundle", "--store", &url, "--dir"])
            .arg(&fx.ca.dir),
    );
    assert_ne!(in_store, fx.bundle(), "the directory's bundle.pem is stale");
    publish(&fx);
    let published = fx.published("web").expect("published");
    assert_eq!(published.matches("BEGIN CERTIFICATE").count(), 2);
    assert_eq!(
        published.trim(),
        in_store.trim(),
        "the store's bundle, not the directory's"
    );
}
