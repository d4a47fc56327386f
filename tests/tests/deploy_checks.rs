//! Checks of `deploy/`: Kubernetes manifests (kubernetes-validate --strict,
//! kustomize builds, checkov), yamllint, Prometheus rules (promtool check
//! and unit tests), the Grafana dashboard, and the real-Prometheus test
//! helper (`keyproof_tests::prometheus`).
//!
//! The external tools are installed by `./test.sh`. When `CI` is set a missing
//! tool fails the test; locally the test prints a notice and passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keyproof_tests::prometheus::{Prometheus, PrometheusOptions};
use keyproof_tests::{have, run};

/// Kubernetes version the manifests are validated against: native sidecars
/// (init containers with restartPolicy: Always) exist from 1.29 (beta, on by
/// default); 1.30 is the oldest we support.
const K8S_VERSION: &str = "1.30.0";

/// Custom resources kubernetes-validate has no schema for.
const CRD_KINDS: &[&str] = &["PodMonitor"];

/// Every metric name the rules and the dashboard may use: the proxy's
/// contract (transport, step-up and rotation metrics) plus the two gauges
/// deploy/ asks for.
const KNOWN_METRICS: &[&str] = &[
    "keyproof_tls_handshakes_total",
    "keyproof_tls_key_exchange_total",
    "keyproof_tls_handshakes_shed_total",
    "keyproof_http_requests_refused_total",
    "keyproof_headers_with_underscores_total",
    "keyproof_connections_open",
    "keyproof_requests_total",
    "keyproof_request_duration_seconds",
    "keyproof_authz_denied_total",
    "keyproof_identity_cert_expiry_timestamp_seconds",
    "keyproof_identity_reloads_total",
    "keyproof_identity_renewals_total",
    "keyproof_stepup_challenges_total",
    "keyproof_stepup_verifications_total",
    "keyproof_stepup_nonces_outstanding",
    "keyproof_stepup_nonce_table_full_total",
    "keyproof_stepup_signatures_total",
    // Asked for by deploy/ itself (the capacity ratio and the renewal-age
    // alert); the proxy must keep exporting them (deploy/README.md).
    "keyproof_stepup_nonce_capacity",
    "keyproof_identity_cert_issued_timestamp_seconds",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "0" && v != "false")
        .unwrap_or(false)
}

/// True when `tool` is installed. Missing: a failure in CI, a notice locally.
fn require(tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    if in_ci() {
        panic!("{tool} is required when CI is set; ./test.sh installs it");
    }
    eprintln!("NOTICE: {tool} is not installed; skipping this check (./test.sh installs it)");
    false
}

/// Runs a command in the repository root; returns (success, stdout, stderr).
fn exec(c: &mut Command) -> (bool, String, String) {
    let out = run(c.current_dir(root()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn files_under(dir: &Path, ext: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| ext.contains(&x))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Kubernetes manifests: every YAML file under deploy/kubernetes except the
/// kustomization files (not Kubernetes objects).
fn manifests() -> Vec<PathBuf> {
    let all = files_under(&deploy().join("kubernetes"), &["yaml", "yml"]);
    let m: Vec<PathBuf> = all
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()) != Some("kustomization.yaml"))
        .collect();
    assert!(
        m.len() >= 10,
        "expected the CA and example manifests, found {m:?}"
    );
    m
}

fn kustomization_dirs() -> Vec<PathBuf> {
    files_under(&deploy().join("kubernetes"), &["yaml"])
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()) == Some("kustomization.yaml"))
        .map(|p| p.parent().expect("parent").to_path_buf())
        .collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// kubernetes-validate --strict on a set of files; every object must pass,
/// and only the known custom resources may lack a schema.
fn kubernetes_validate(files: &[PathBuf]) {
    let (ok, stdout, stderr) = exec(
        Command::new("kubernetes-validate")
            .args(["--strict", "-k", K8S_VERSION])
            .args(files),
    );
    let all = format!("{stdout}{stderr}");
    assert!(ok, "kubernetes-validate --strict failed:\n{all}");
    for line in all.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with("INFO") && l.contains(" passed for resource ") {
            continue;
        }
        let crd = CRD_KINDS
            .iter()
            .any(|k| l.contains(&format!("Couldn't find schema for kind {k} ")));
        assert!(crd, "unexpected kubernetes-validate output: {l}\n{all}");
    }
    let passed = all.matches(" passed for resource ").count();
    assert!(passed > 0, "kubernetes-validate validated nothing:\n{all}");
}

#[test]
fn kubernetes_manifests_validate_strict() {
    if !require("kubernetes-validate") {
        return;
    }
    kubernetes_validate(&manifests());
}

#[test]
fn kustomizations_build_and_validate() {
    if !require("kubectl") || !require("kubernetes-validate") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dirs = kustomization_dirs();
    assert!(
        dirs.len() >= 3,
        "expected base, example and example-join-token: {dirs:?}"
    );
    let mut rendered = Vec::new();
    for d in &dirs {
        let (ok, out, err) = exec(Command::new("kubectl").arg("kustomize").arg(d));
        assert!(ok, "kubectl kustomize {} failed:\n{err}", d.display());
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        let f = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&f, &out).unwrap();
        rendered.push(f);

        // The rendered objects, not only the source files, keep their shape.
        if name.starts_with("example") {
            assert!(
                out.contains("initContainers:") && out.contains("restartPolicy: Always"),
                "{name}: keyproof-proxy must be a native sidecar:\n{out}"
            );
            assert!(
                out.contains("name: web-keyproof-"),
                "{name}: the proxy ConfigMap should carry a content hash:\n{out}"
            );
            assert!(
                out.contains("kind: PodMonitor"),
                "{name}: PodMonitor missing"
            );
            assert!(
                out.contains("prometheus.io/scrape: \"true\""),
                "{name}: scrape annotation missing"
            );
        }
        if name == "example" {
            assert!(
                out.contains("[identity.files]") && out.contains("secretName: web-svid"),
                "{out}"
            );
        }
        if name == "example-join-token" {
            assert!(
                out.contains("[identity.ca]") && !out.contains("[identity.files]"),
                "{out}"
            );
            assert!(
                out.contains("secretName: web-join-token") && !out.contains("web-svid"),
                "{out}"
            );
        }
        if name == "base" {
            for kind in [
                "Namespace",
                "ServiceAccount",
                "PersistentVolumeClaim",
                "Deployment",
                "Service",
                "CronJob",
            ] {
                assert!(
                    out.contains(&format!("kind: {kind}\n")),
                    "base lacks a {kind}"
                );
            }
            assert!(
                out.contains("type: Recreate") && out.contains("replicas: 1"),
                "{out}"
            );
            assert!(
                !out.contains("kind: Role") && !out.contains("kind: ClusterRole"),
                "the CA needs no RBAC"
            );
        }
    }
    kubernetes_validate(&rendered);
}

#[test]
fn every_container_is_hardened_and_pinned() {
    // checkov covers most of this; these are the project's own rules, and
    // cheap enough to check without any tool.
    for m in manifests() {
        let y = read(&m);
        let containers =
            y.matches("\n          image: ").count() + y.matches("\n              image: ").count();
        if containers == 0 {
            continue;
        }
        for needle in [
            "runAsNonRoot: true",
            "readOnlyRootFilesystem: true",
            "allowPrivilegeEscalation: false",
            "drop: [\"ALL\"]",
            "type: RuntimeDefault",
        ] {
            assert!(
                y.matches(needle).count() >= containers,
                "{}: {needle} missing on some of its {containers} containers",
                m.display()
            );
        }
        assert_eq!(
            y.matches("imagePullPolicy: Always").count(),
            containers,
            "{}: every container needs imagePullPolicy: Always",
            m.display()
        );
        assert!(
            y.contains("automountServiceAccountToken: false"),
            "{}",
            m.display()
        );
        for line in y.lines().filter(|l| l.trim_start().starts_with("image: ")) {
            let image = line.trim_start().trim_start_matches("image: ");
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                !tag.is_empty() && tag != "latest" && !tag.contains('/'),
                "{}: image {image} must be pinned by tag",
                m.display()
            );
        }
    }
    // The PodMonitor scrapes the port the sidecar declares.
    let ex = deploy().join("kubernetes/example");
    let pm = read(&ex.join("podmonitor.yaml"));
    let dep = read(&ex.join("deployment.yaml"));
    assert!(pm.contains("- port: admin"), "{pm}");
    assert!(
        dep.contains("- name: admin\n              containerPort: 15090"),
        "{dep}"
    );
    assert!(dep.contains("prometheus.io/port: \"15090\""), "{dep}");
    for toml in ["example/proxy.toml", "example-join-token/proxy.toml"] {
        let t = read(&deploy().join("kubernetes").join(toml));
        assert!(
            t.contains("[admin]\nlisten = \"0.0.0.0:15090\""),
            "{toml}: probes need the admin port on the pod IP"
        );
    }
}

#[test]
fn checkov_has_no_failed_checks() {
    if !require("checkov") {
        return;
    }
    let (_, out, err) = exec(
        Command::new("checkov")
            .args([
                "--framework",
                "kubernetes",
                "--skip-download",
                "--quiet",
                "-o",
                "json",
                "-d",
            ])
            .arg(deploy().join("kubernetes")),
    );
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("checkov output is not JSON ({e}):\n{out}\n{err}"));
    // One framework gives an object; several give a list.
    let reports: Vec<&serde_json::Value> = match &v {
        serde_json::Value::Array(a) => a.iter().collect(),
        o => vec![o],
    };
    let mut passed = 0;
    for r in reports {
        let s = &r["summary"];
        passed += s["passed"].as_u64().unwrap_or(0);
        let failed: Vec<String> = r["results"]["failed_checks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| format!("{} {} ({})", c["check_id"], c["resource"], c["file_path"]))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            s["failed"].as_u64(),
            Some(0),
            "checkov failed checks:\n{}",
            failed.join("\n")
        );
        assert_eq!(
            s["parsing_errors"].as_u64(),
            Some(0),
            "checkov parsing errors: {s}"
        );
        for c in r["results"]["skipped_checks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let reason = c["check_result"]["suppress_comment"].as_str().unwrap_or("");
            assert!(
                reason.split_whitespace().count() >= 5,
                "{} skipped on {} without a written reason",
                c["check_id"],
                c["resource"]
            );
        }
    }
    assert!(
        passed > 100,
        "checkov ran suspiciously few checks ({passed}):\n{out}"
    );
}

#[test]
fn yamllint_is_clean() {
    if !require("yamllint") {
        return;
    }
    let (ok, out, err) = exec(
        Command::new("yamllint")
            .arg("--strict")
            .arg("-c")
            .arg(deploy().join(".yamllint"))
            .arg(deploy()),
    );
    assert!(ok, "yamllint:\n{out}{err}");
}

fn rules() -> PathBuf {
    deploy().join("prometheus/keyproof-rules.yaml")
}

fn rule_tests() -> PathBuf {
    deploy().join("prometheus/keyproof-rules.test.yaml")
}

#[test]
fn promtool_check_rules() {
    if !require("promtool") {
        return;
    }
    let (ok, out, err) = exec(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(rules()),
    );
    assert!(ok, "promtool check rules:\n{out}{err}");
}

#[test]
fn promtool_test_rules() {
    if !require("promtool") {
        return;
    }
    let (ok, out, err) = exec(
        Command::new("promtool")
            .arg("test")
            .arg("rules")
            .arg(rule_tests()),
    );
    assert!(ok, "promtool test rules:\n{out}{err}");
}

/// Every alert has a firing and a not-firing case in the unit tests, and a
/// summary and a runbook annotation.
#[test]
fn every_alert_is_unit_tested_and_documented() {
    let rules_text = read(&rules());
    let alerts: Vec<String> = rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|s| s.trim().to_owned())
        .collect();
    for required in [
        "KeyproofStepUpReplay",
        "KeyproofHandshakeFailures",
        "KeyproofHandshakePossessionFailed",
        "KeyproofHandshakesShed",
        "KeyproofCertExpiringSoon",
        "KeyproofCertNotRenewed",
        "KeyproofIdentityRenewalErrors",
        "KeyproofStepUpNonceTableFilling",
        "KeyproofStepUpNonceTableFull",
    ] {
        assert!(
            alerts.iter().any(|a| a == required),
            "alert {required} missing"
        );
    }
    assert!(
        rules_text.contains(r#"keyproof_stepup_verifications_total{result="replay"}[5m]) > 0"#),
        "the replay alert must fire on any increase"
    );
    assert!(
        rules_text.contains(
            r#"increase(keyproof_tls_handshakes_total{result="possession_failed"}[5m]) > 0"#
        ),
        "a certificate presented without its key must alert on the first one"
    );
    // Alert blocks: text from one "- alert:" to the next.
    let blocks: Vec<&str> = rules_text.split("- alert: ").skip(1).collect();
    assert_eq!(blocks.len(), alerts.len());
    for (name, block) in alerts.iter().zip(&blocks) {
        assert!(block.contains("summary:"), "{name}: no summary annotation");
        assert!(block.contains("runbook:"), "{name}: no runbook annotation");
        assert!(block.contains("severity:"), "{name}: no severity label");
    }
    let readme = read(&deploy().join("README.md")).to_lowercase();
    for a in &alerts {
        assert!(
            readme.contains(&format!("#### {}", a.to_lowercase())),
            "deploy/README.md has no runbook section for {a}"
        );
    }

    // alertname: X, then its exp_alerts: "[]" (not firing) or a list (firing).
    let tests_text = read(&rule_tests());
    let mut cases: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let mut current: Option<String> = None;
    for line in tests_text.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("alertname: ") {
            current = Some(a.trim().to_owned());
        } else if let Some(rest) = t.strip_prefix("exp_alerts:") {
            let a = current.take().expect("exp_alerts without alertname");
            let e = cases.entry(a).or_default();
            if rest.trim() == "[]" {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
    }
    for a in &alerts {
        let (quiet, firing) = cases.get(a).copied().unwrap_or_default();
        assert!(
            quiet >= 1 && firing >= 1,
            "{a}: needs firing and not-firing unit tests (has {firing} and {quiet})"
        );
    }
}

/// keyproof_* names in a text, with histogram suffixes folded.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("keyproof_") {
        let before_ok = i == 0
            || !rest.as_bytes()[i - 1].is_ascii_alphanumeric() && rest.as_bytes()[i - 1] != b'_';
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        if before_ok {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
                .unwrap_or(name);
            out.insert(base.to_owned());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn rules_and_dashboard_use_contract_metric_names() {
    let rules_text = read(&rules());
    let exprs: String = rules_text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let dash = read(&deploy().join("grafana/keyproof-dashboard.json"));
    for (what, names) in [
        ("rules", metric_names(&exprs)),
        ("dashboard", metric_names(&dash)),
    ] {
        for n in &names {
            assert!(
                KNOWN_METRICS.contains(&n.as_str()),
                "{what} use {n}, which the proxy does not export"
            );
        }
        assert!(names.len() >= 7, "{what}: only {names:?}");
    }
}

#[test]
fn grafana_dashboard_is_valid() {
    let path = deploy().join("grafana/keyproof-dashboard.json");
    let v: serde_json::Value = serde_json::from_str(&read(&path)).expect("dashboard is valid JSON");
    assert!(v["uid"].is_string() && v["title"].is_string());
    let vars = v["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|x| x["type"] == "datasource"
            && x["query"] == "prometheus"
            && x["name"] == "datasource"),
        "a datasource variable is required"
    );
    let mut exprs = Vec::new();
    for p in v["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {} ignores the datasource variable",
            p["title"]
        );
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
            exprs.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    let all = exprs.join("\n");
    for needle in [
        "keyproof_requests_total",
        "histogram_quantile",
        "keyproof_request_duration_seconds_bucket",
        "keyproof_tls_handshakes_total",
        "possession_failed",
        "keyproof_tls_key_exchange_total",
        "keyproof_stepup_verifications_total",
        "keyproof_stepup_nonces_outstanding",
        "keyproof_identity_cert_expiry_timestamp_seconds",
    ] {
        assert!(all.contains(needle), "the dashboard shows no {needle}");
    }

    // Every query parses: promtool checks them as recording rules, with
    // Grafana's variables replaced by values.
    if !require("promtool") {
        return;
    }
    let mut y = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$namespace", ".*")
            .replace("$pod", ".*");
        y.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("dashboard-queries.yaml");
    std::fs::write(&f, y).unwrap();
    let (ok, out, err) = exec(Command::new("promtool").arg("check").arg("rules").arg(&f));
    assert!(ok, "a dashboard query does not parse:\n{out}{err}");
}

#[test]
fn grafana_dashboard_passes_python_json_tool() {
    if !require("python3") {
        return;
    }
    let (ok, _, err) = exec(
        Command::new("python3")
            .args(["-m", "json.tool"])
            .arg(deploy().join("grafana/keyproof-dashboard.json")),
    );
    assert!(ok, "python3 -m json.tool: {err}");
}

#[test]
fn containerfile_is_multistage_and_nonroot() {
    let c = read(&deploy().join("Containerfile"));
    assert!(
        c.contains("FROM docker.io/library/rust:1-bookworm AS build"),
        "{c}"
    );
    assert!(c.contains("cargo build-proxy && cargo build-ca"), "{c}");
    assert!(
        c.contains("FROM gcr.io/distroless/static-debian12:nonroot"),
        "{c}"
    );
    assert!(c.contains("USER 65532:65532"), "{c}");
    assert!(read(&deploy().join("README.md")).contains("not built in CI"));
}

/// The example's proxy config is accepted by the real `keyproof-proxy
/// check-config` (unknown keys are startup errors), with the Secret's files
/// replaced by a throwaway trust domain's.
#[test]
fn example_proxy_config_passes_check_config() {
    let dir = keyproof_tests::bin_dir();
    let built = ["keyproof-proxy", "keyproof-ca"]
        .iter()
        .all(|b| dir.join(b).exists());
    if !built {
        if in_ci() {
            panic!("keyproof-proxy and keyproof-ca must be built (cargo test --workspace)");
        }
        eprintln!("NOTICE: binaries not built in {}; skipping", dir.display());
        return;
    }
    let ca = keyproof_tests::TestCa::new("prod.example.com");
    let (cert, key) = ca.issue("web", "/ns/keyproof-example/sa/web", &[]);
    let mount = ca.path("mount");
    std::fs::create_dir_all(&mount).unwrap();
    std::fs::copy(&cert, mount.join("tls.crt")).unwrap();
    std::fs::copy(&key, mount.join("tls.key")).unwrap();
    std::fs::copy(ca.bundle(), mount.join("ca.crt")).unwrap();
    let toml = read(&deploy().join("kubernetes/example/proxy.toml"))
        .replace("/var/run/keyproof/", &format!("{}/", mount.display()));
    let cfg = ca.path("proxy.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = run(keyproof_tests::cmd("keyproof-proxy")
        .arg("check-config")
        .arg("--config")
        .arg(&cfg));
    assert!(
        out.status.success(),
        "keyproof-proxy check-config rejects deploy/kubernetes/example/proxy.toml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn readme_shows_the_cronjob_that_is_deployed() {
    let cron = read(&deploy().join("kubernetes/base/ca-check-cronjob.yaml"));
    let readme = read(&deploy().join("README.md"));
    assert!(
        readme.contains(cron.trim()),
        "deploy/README.md must show base/ca-check-cronjob.yaml verbatim (update the copy)"
    );
    for step in [
        "keyproof-ca init",
        "k8s-secret",
        "token create",
        "kubectl apply -k",
        "rotate root prepare",
        "rotate root activate",
        "rotate root finish",
        "rotate intermediate",
        "/ready",
        "/metrics",
    ] {
        assert!(
            readme.contains(step),
            "deploy/README.md does not mention {step}"
        );
    }
}

/// The helper the end-to-end tests use: a real Prometheus scraping itself,
/// with keyproof's alert rules loaded.
#[test]
fn prometheus_helper_scrapes_itself() {
    if !require("prometheus") {
        return;
    }
    let prom = Prometheus::start(
        PrometheusOptions::new()
            .job("self", ["self"])
            .rule_file(rules()),
    )
    .expect("start prometheus");
    let up = prom
        .wait_for_query(r#"up{job="self"}"#, |v| v == 1.0, Duration::from_secs(20))
        .expect("Prometheus scrapes its own /metrics");
    assert_eq!(up, 1.0);
    // The rule file loaded into a real server: every group is evaluated.
    let groups = prom
        .wait_for_query(
            r#"count(prometheus_rule_group_rules{rule_group=~".*keyproof-.*"})"#,
            |v| v >= 4.0,
            Duration::from_secs(20),
        )
        .expect("keyproof rule groups loaded");
    assert!(groups >= 4.0);
    // Nothing keyproof is scraped here, so nothing fires.
    assert!(!prom.alert_firing("KeyproofStepUpReplay").unwrap());
    assert!(prom
        .firing_alerts("KeyproofCertExpiringSoon")
        .unwrap()
        .is_empty());
    // Scalars and empty results come back as such.
    assert_eq!(prom.query_value("vector(2) * 21").unwrap(), Some(42.0));
    assert_eq!(prom.query_value(r#"up{job="nope"}"#).unwrap(), None);
}
