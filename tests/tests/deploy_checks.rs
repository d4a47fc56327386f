//! Checks of `deploy/`: Kubernetes manifests (kubernetes-validate --strict,
//! kustomize builds, checkov, and their shape: the CA attests ServiceAccount
//! tokens, the example workload needs no join token), yamllint, Prometheus
//! rules (promtool check and unit tests), the Grafana dashboard, and the
//! real-Prometheus test helper (`keyproof_tests::prometheus`).
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
/// contract (transport, step-up, TCP tunnel, rotation and trust-bundle
/// metrics), the CA's (`keyproof-ca serve --admin-listen`), plus the two
/// gauges deploy/ asks for.
const KNOWN_METRICS: &[&str] = &[
    "keyproof_tls_handshakes_total",
    "keyproof_tls_key_exchange_total",
    "keyproof_tls_handshakes_shed_total",
    "keyproof_http_requests_refused_total",
    "keyproof_headers_with_underscores_total",
    "keyproof_connections_open",
    "keyproof_requests_total",
    "keyproof_requests_retried_total",
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
    "keyproof_risk_denied_total",
    "keyproof_deny_list_refused_total",
    "keyproof_policy_reloads_total",
    "keyproof_risk_tracked_identities",
    "keyproof_risk_evictions_total",
    "keyproof_risk_untracked_total",
    "keyproof_tcp_connections_total",
    "keyproof_tcp_bytes_total",
    "keyproof_trust_bundle_roots",
    "keyproof_trust_bundle_root_expiry_timestamp_seconds",
    "keyproof_trust_bundle_sequence",
    "keyproof_build_info",
    "keyproof_memory_heap_bytes",
    "keyproof_memory_resident_bytes",
    "keyproof_memory_limit_bytes",
    "keyproof_memory_shed_connections_total",
    "keyproof_memory_refused_requests_total",
    // keyproof-ca serve's /metrics.
    "keyproof_ca_issuances_total",
    "keyproof_ca_refusals_total",
    "keyproof_ca_ledger_commit_seconds",
    "keyproof_ca_certificate_expiry_timestamp_seconds",
    "keyproof_ca_certificate_issued_timestamp_seconds",
    "keyproof_ca_ready",
    "keyproof_ca_bundle_root_expiry_timestamp_seconds",
    "keyproof_ca_bundle_sequence",
    "keyproof_ca_rotation_stage",
    "keyproof_ca_jwks_keys",
    "keyproof_ca_jwks_reloads_total",
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
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "base",
        "example",
        "example-join-token",
        "example-files",
        "example-transparent",
        "monitoring",
        "ca-ha",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "no kustomization {want}: {dirs:?}"
        );
    }
    let mut rendered = Vec::new();
    for d in &dirs {
        let (ok, out, err) = exec(Command::new("kubectl").arg("kustomize").arg(d));
        assert!(ok, "kubectl kustomize {} failed:\n{err}", d.display());
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        let f = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&f, &out).unwrap();
        rendered.push(f.clone());

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
            // PodMonitors live in ../monitoring: the example applies on a
            // cluster without the Prometheus Operator's CRDs.
            assert!(
                !out.contains("kind: PodMonitor"),
                "{name}: a PodMonitor needs the Operator's CRD; keep it in monitoring/"
            );
            assert!(
                out.contains("prometheus.io/scrape: \"true\""),
                "{name}: scrape annotation missing"
            );
            assert!(
                !out.contains("\nkind: Secret\n"),
                "{name}: Secrets are made by the operator, never committed"
            );
        }
        match name.as_str() {
            // Zero-touch: ServiceAccount attestation, three replicas, no
            // join token and no Secret anywhere.
            "example" => {
                assert!(
                    out.contains("[identity.ca]")
                        && out.contains("service_account_token_file = ")
                        && !out.contains("join_token_file")
                        && !out.contains("[identity.files]"),
                    "{out}"
                );
                assert!(
                    !out.contains("join-token") && !out.contains("secretName:"),
                    "the example needs no Secret:\n{out}"
                );
                assert!(out.contains("\n  replicas: 3\n"), "{out}");
                assert!(
                    out.contains("audience: keyproof-ca") && out.contains("name: keyproof-bundle"),
                    "{out}"
                );
                // The CA publishes the bundle into labelled namespaces.
                assert!(out.contains("keyproof.io/mesh: enabled"), "{out}");
            }
            "example-join-token" => {
                assert!(
                    out.contains("[identity.ca]")
                        && out.contains("join_token_file = ")
                        && !out.contains("service_account_token_file")
                        && !out.contains("[identity.files]"),
                    "{out}"
                );
                assert!(
                    out.contains("secretName: web-join-token")
                        && !out.contains("web-svid")
                        && !out.contains("serviceAccountToken:"),
                    "{out}"
                );
                assert!(
                    out.contains("\n  replicas: 1\n") && out.contains("type: Recreate"),
                    "a single-use join token allows one replica:\n{out}"
                );
            }
            "example-files" => {
                assert!(
                    out.contains("[identity.files]") && !out.contains("[identity.ca]"),
                    "{out}"
                );
                assert!(
                    out.contains("secretName: web-svid")
                        && !out.contains("web-join-token")
                        && !out.contains("serviceAccountToken:")
                        && !out.contains("keyproof-bundle"),
                    "{out}"
                );
            }
            "base" => {
                for kind in [
                    "Namespace",
                    "ServiceAccount",
                    "ClusterRoleBinding",
                    "ConfigMap",
                    "PersistentVolumeClaim",
                    "Deployment",
                    "Service",
                    "NetworkPolicy",
                    "CronJob",
                    "ClusterRole",
                ] {
                    assert!(
                        out.contains(&format!("\nkind: {kind}\n")),
                        "base lacks a {kind}"
                    );
                }
                assert!(
                    out.contains("type: Recreate") && out.contains("replicas: 1"),
                    "{out}"
                );
                // Without the Operator's CRDs `kubectl apply -k` must work.
                assert!(
                    !out.contains("kind: PodMonitor"),
                    "base: keep the PodMonitor in monitoring/"
                );
                // A binding to a built-in role, and the bundle publisher's
                // one ClusterRole; no namespaced roles.
                for kind in ["Role", "RoleBinding"] {
                    assert!(
                        !out.contains(&format!("\nkind: {kind}\n")),
                        "the CA needs no {kind}"
                    );
                }
                assert_eq!(out.matches("\nkind: ClusterRole\n").count(), 1, "{out}");
                assert_eq!(
                    out.matches("\nkind: ClusterRoleBinding\n").count(),
                    2,
                    "{out}"
                );
                assert!(
                    out.contains("name: system:service-account-issuer-discovery"),
                    "{out}"
                );
                // The issuer ConfigMap is generated (hashed) and referenced.
                assert!(
                    out.contains("name: keyproof-ca-k8s-")
                        && out.contains("$(KEYPROOF_K8S_ISSUER)"),
                    "{out}"
                );
            }
            "example-transparent" => transparent_shape(&f, &out),
            "ca-ha" => ca_ha_shape(&out, true),
            // Optional: the Prometheus Operator's PodMonitors, and nothing else.
            "monitoring" => {
                assert_eq!(out.matches("\nkind: PodMonitor\n").count(), 2, "{out}");
                assert_eq!(out.matches("\nkind: ").count(), 2, "{out}");
                assert!(
                    out.contains("namespace: keyproof-system")
                        && out.contains("namespace: keyproof-example"),
                    "{out}"
                );
            }
            other => panic!("unexpected kustomization {other}: add its checks here"),
        }
    }
    kubernetes_validate(&rendered);
}

/// The HA variant of the CA (rendered): three replicas on PostgreSQL, a
/// budget that keeps two, spread over nodes, the database URL from a
/// Secret, the keys from a read-only Secret volume, no PVC. `rendered`:
/// kustomize's output (which holds the generated issuer ConfigMap).
fn ca_ha_shape(out: &str, rendered: bool) {
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "NetworkPolicy",
        "CronJob",
    ] {
        if kind == "ConfigMap" && !rendered {
            continue;
        }
        assert!(
            out.contains(&format!("\nkind: {kind}\n")),
            "ca-ha lacks a {kind}"
        );
    }
    assert!(
        !out.contains("kind: PersistentVolumeClaim") && !out.contains("persistentVolumeClaim:"),
        "ca-ha keeps its state in PostgreSQL, not on a volume:\n{out}"
    );
    assert!(
        !out.contains("\nkind: Secret\n"),
        "Secrets are made by the operator, never committed"
    );
    assert!(
        out.contains("\n  replicas: 3\n") && out.contains("type: RollingUpdate"),
        "{out}"
    );
    assert!(out.contains("minAvailable: 2"), "{out}");
    // The ConfigMaps follow the bundle in the database: every replica runs
    // bundle-publish with the store's URL from the Secret, and may publish.
    assert!(
        out.contains("name: bundle-publish")
            && out.contains("- k8s-bundle")
            && out.contains("name: keyproof-ca-bundle-publisher"),
        "ca-ha publishes the bundle ConfigMaps:\n{out}"
    );
    assert!(
        out.contains("podAntiAffinity:")
            && out.contains("topologySpreadConstraints:")
            && out.contains("topologyKey: kubernetes.io/hostname"),
        "{out}"
    );
    // The URL from a Secret through the environment, never on the command
    // line (it carries the password).
    assert!(
        out.contains("name: KEYPROOF_CA_STORE")
            && out.contains("name: keyproof-ca-store")
            && !out.contains("postgres://")
            && !out.contains("- --store"),
        "{out}"
    );
    // Keys: a read-only Secret volume; the workspace: an emptyDir on /tmp.
    // (kustomize sorts keys: mountPath, name, readOnly.)
    let key_mounts: Vec<&str> = out
        .match_indices("mountPath: /var/run/keyproof-ca/keys\n")
        .map(|(i, _)| out[i..].lines().take(3).collect::<Vec<_>>().join("\n"))
        .map(|m| {
            if m.contains("readOnly: true") {
                "ro"
            } else {
                "rw"
            }
        })
        .collect();
    assert!(
        (out.contains("secretName: keyproof-ca-keys") || out.contains("name: keyproof-ca-keys"))
            && !key_mounts.is_empty()
            && key_mounts.iter().all(|m| *m == "ro"),
        "the key Secret must be mounted read-only everywhere ({key_mounts:?}):\n{out}"
    );
    assert!(
        out.contains("mountPath: /tmp") && out.contains("emptyDir:"),
        "{out}"
    );
    assert!(out.contains("path: /ready"), "{out}");
}

#[test]
fn ca_ha_variant_has_its_shape_in_the_sources() {
    // The same shape without kubectl: the source files are what kustomize
    // renders, less the namespace and labels it adds.
    let dir = deploy().join("kubernetes/ca-ha");
    let mut all = String::new();
    for f in files_under(&dir, &["yaml"]) {
        if f.file_name().and_then(|n| n.to_str()) == Some("kustomization.yaml") {
            continue;
        }
        all.push_str("\n---\n");
        // Comments may show a URL's shape; the objects must not hold one.
        for l in read(&f)
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
        {
            all.push_str(l);
            all.push('\n');
        }
    }
    ca_ha_shape(&all, false);
    let k = read(&dir.join("kustomization.yaml"));
    for f in files_under(&dir, &["yaml"]) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name != "kustomization.yaml" {
            assert!(
                k.contains(&format!("- {name}")),
                "kustomization.yaml omits {name}"
            );
        }
    }
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
    let pm = read(&deploy().join("kubernetes/monitoring/web-podmonitor.yaml"));
    let dep = read(&ex.join("deployment.yaml"));
    assert!(pm.contains("- port: admin"), "{pm}");
    assert!(
        dep.contains("- name: admin\n              containerPort: 15090"),
        "{dep}"
    );
    assert!(dep.contains("prometheus.io/port: \"15090\""), "{dep}");
    for toml in [
        "example/proxy.toml",
        "example-join-token/proxy.toml",
        "example-files/proxy.toml",
    ] {
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
    let passed = checkov_clean(&deploy().join("kubernetes"));
    assert!(
        passed > 100,
        "checkov ran suspiciously few checks ({passed})"
    );
}

/// checkov on the rendered example-transparent overlay: its init container
/// exists only in the kustomization's patches, which checkov's kubernetes
/// framework does not apply.
#[test]
fn checkov_has_no_failed_checks_on_the_transparent_example() {
    if !require("checkov") || !require("kubectl") {
        return;
    }
    // Not a dot-directory (tempfile's default): checkov skips those.
    let tmp = tempfile::Builder::new()
        .prefix("kp-checkov-")
        .tempdir()
        .expect("tempdir");
    let (ok, out, err) = exec(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(deploy().join("kubernetes/example-transparent")),
    );
    assert!(ok, "kubectl kustomize example-transparent failed:\n{err}");
    std::fs::write(tmp.path().join("example-transparent.yaml"), out).unwrap();
    let passed = checkov_clean(tmp.path());
    assert!(
        passed > 50,
        "checkov ran suspiciously few checks ({passed})"
    );
}

/// Runs checkov on `dir`; asserts no failed check, no parsing error and a
/// written reason for every skipped check; returns the passed count.
fn checkov_clean(dir: &Path) -> u64 {
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
            .arg(dir),
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
    passed
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
        "KeyproofDenyListRefusals",
        "KeyproofRiskDenials",
        "KeyproofPolicyReloadFailed",
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
                "{what} use {n}, which neither the proxy nor the CA exports"
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
        "sum by (route, reason) (rate(keyproof_stepup_challenges_total",
        "keyproof_risk_denied_total",
        "keyproof_deny_list_refused_total",
        "keyproof_policy_reloads_total",
        "keyproof_identity_cert_expiry_timestamp_seconds",
        "keyproof_memory_heap_bytes",
        "keyproof_memory_shed_connections_total",
        "keyproof_memory_refused_requests_total",
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

/// Runs the real `keyproof-proxy check-config` (unknown keys are startup
/// errors) on `deploy/kubernetes/<variant>/proxy.toml`, with the pod's mounts
/// replaced by a directory holding a throwaway trust domain's files: the
/// Secret web-svid's (`svid/`), the keyproof-bundle ConfigMap's (`bundle/`),
/// and the token volumes (`secrets/token/`, `secrets/join-token/`).
fn check_config(variant: &str) {
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
    let secrets = ca.path("secrets");
    for d in [
        mount.join("svid"),
        mount.join("bundle"),
        secrets.join("token"),
        secrets.join("join-token"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::copy(&cert, mount.join("svid/tls.crt")).unwrap();
    std::fs::copy(&key, mount.join("svid/tls.key")).unwrap();
    std::fs::copy(ca.bundle(), mount.join("svid/ca.crt")).unwrap();
    std::fs::copy(ca.bundle(), mount.join("bundle/bundle.pem")).unwrap();
    let issuer = keyproof_tests::k8s::ClusterIssuer::new(
        keyproof_tests::k8s::ISSUER,
        jsonwebtoken::Algorithm::RS256,
    );
    let sa = keyproof_tests::k8s::SaToken::new("keyproof-example", "web");
    std::fs::write(secrets.join("token/token"), issuer.token(&sa)).unwrap();
    std::fs::write(secrets.join("join-token/token"), "kpt_example").unwrap();
    let toml = read(&deploy().join("kubernetes").join(variant).join("proxy.toml"))
        .replace(
            "/var/run/secrets/keyproof/",
            &format!("{}/", secrets.display()),
        )
        .replace("/var/run/keyproof/", &format!("{}/", mount.display()));
    assert!(
        !toml.contains("/var/run/"),
        "{variant}/proxy.toml reads a path the pod does not mount:\n{toml}"
    );
    let cfg = ca.path("proxy.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = run(keyproof_tests::cmd("keyproof-proxy")
        .arg("check-config")
        .arg("--config")
        .arg(&cfg));
    assert!(
        out.status.success(),
        "keyproof-proxy check-config rejects deploy/kubernetes/{variant}/proxy.toml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The zero-touch example: `[identity.ca] service_account_token_file`.
/// NOTE: this needs the proxy's `service_account_token_file` key (the
/// proxy's ServiceAccount-attestation change); until that is in the tree
/// `check-config` rejects the key and this test fails.
#[test]
fn example_proxy_config_passes_check_config() {
    check_config("example");
}

#[test]
fn example_join_token_proxy_config_passes_check_config() {
    check_config("example-join-token");
}

/// The transparent example: `[[inbound.tcp]]` and the outbound's rules by
/// host pattern and CIDR. Checked to pass against the inbound and outbound
/// changes merged together; ignored only until they are in this tree.
#[test]
fn example_transparent_proxy_config_passes_check_config() {
    check_config("example-transparent");
}

#[test]
fn example_files_proxy_config_passes_check_config() {
    check_config("example-files");
}

/// The YAML documents in `path` as JSON, parsed by PyYAML (the parser
/// yamllint and checkov use, so it is there wherever they are). None, after
/// a notice, where no Python has it; a failure when `CI` is set.
fn yaml_docs(path: &Path) -> Option<Vec<serde_json::Value>> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
        json.dump(docs, sys.stdout)";
    for python in ["python3", "/opt/keyproof-ci/bin/python"] {
        let Ok(out) = Command::new(python).args(["-c", SCRIPT]).arg(path).output() else {
            continue;
        };
        if out.status.success() {
            return Some(serde_json::from_slice(&out.stdout).expect("PyYAML output is JSON"));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("No module named"),
            "{} does not parse as YAML:\n{err}",
            path.display()
        );
    }
    if in_ci() {
        panic!("python3 with PyYAML is required when CI is set (yamllint brings it)");
    }
    eprintln!("NOTICE: no python3 with PyYAML; skipping the manifest shape checks");
    None
}

/// The one document of `kind` (named `name`, if given) in `docs`.
fn object<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    let found: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}");
    found[0]
}

/// Every container of a pod spec, init containers first.
fn containers(pod: &serde_json::Value) -> Vec<&serde_json::Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect()
}

fn container<'a>(pod: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    containers(pod)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn volume<'a>(pod: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// Where `c` mounts volume `name`, if it does.
fn mount_path<'a>(c: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == name)
        .and_then(|m| m["mountPath"].as_str())
}

fn args(c: &serde_json::Value) -> Vec<&str> {
    c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect()
}

/// The value after `flag` in an argument list.
fn flag<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1).copied())
}

/// The transparent example (rendered): the redirect init container runs
/// first, as root with NET_ADMIN and NET_RAW only; the sidecar runs as the
/// uid the rules exempt; the app has no HTTP_PROXY; the namespace admits
/// the capabilities; the Service and NetworkPolicy carry the app's port.
fn transparent_shape(rendered: &Path, out: &str) {
    let Some(docs) = yaml_docs(rendered) else {
        return;
    };
    let dep = object(&docs, "Deployment", "web");
    let pod = &dep["spec"]["template"]["spec"];
    let init: Vec<&str> = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, ["keyproof-redirect", "keyproof-proxy"], "{out}");
    let redirect = container(pod, "keyproof-redirect");
    let sc = &redirect["securityContext"];
    assert_eq!(sc["runAsUser"], 0, "iptables needs root");
    assert_eq!(
        sc["capabilities"],
        serde_json::json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
    );
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(
        redirect.get("restartPolicy").is_none(),
        "a plain init container: runs once"
    );
    assert_eq!(redirect["imagePullPolicy"], "Always");
    let image = redirect["image"].as_str().unwrap();
    assert!(
        image.starts_with("ghcr.io/keyproof/keyproof-redirect:") && !image.ends_with(":latest"),
        "the Containerfile's redirect target, pinned: {image}"
    );
    let a = args(redirect);
    assert_eq!(a.first(), Some(&"redirect"));
    let uid = a
        .iter()
        .find_map(|x| x.strip_prefix("--proxy-uid="))
        .expect("--proxy-uid");
    let sidecar = container(pod, "keyproof-proxy");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["securityContext"]["runAsUser"].to_string(), uid);
    assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
    let pod_uid = pod["securityContext"]["runAsUser"].to_string();
    assert_ne!(pod_uid, uid, "the app must not share the exempt uid");
    for c in containers(pod) {
        let sc = &c["securityContext"];
        if c["name"] != "keyproof-redirect" {
            assert!(
                sc["capabilities"].get("add").is_none() && sc["runAsUser"] != 0,
                "only the redirect init container is privileged: {c}"
            );
        }
    }
    let app = container(pod, "app");
    assert!(
        !app.to_string().contains("HTTP_PROXY"),
        "the app is unmodified: {app}"
    );
    let ns = object(&docs, "Namespace", "keyproof-example");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "restricted and baseline refuse NET_ADMIN"
    );
    let svc = object(&docs, "Service", "web");
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 8080),
        "{svc}"
    );
    let np = object(&docs, "NetworkPolicy", "web");
    assert!(
        np["spec"]["ingress"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 8080),
        "{np}"
    );
    for needle in [
        "[[inbound.tcp]]",
        "[[outbound.upstreams]]",
        "host = \"*.{namespace}.svc.cluster.local\"",
        "identity = \"spiffe://prod.example.com/ns/{namespace}/sa/*\"",
        "listen = \"127.0.0.1:15001\"",
        "listen = \"0.0.0.0:15443\"",
    ] {
        assert!(out.contains(needle), "example-transparent lacks {needle}");
    }
}

/// The example workload gets its identity with no human step: three
/// replicas, a projected ServiceAccount token for keyproof-ca that the proxy
/// config reads, the trust bundle from a ConfigMap, no join token.
#[test]
fn example_workload_is_attested_by_its_service_account() {
    let ex = deploy().join("kubernetes/example");
    let Some(docs) = yaml_docs(&ex.join("deployment.yaml")) else {
        return;
    };
    let dep = object(&docs, "Deployment", "web");
    assert_eq!(
        dep["spec"]["replicas"], 3,
        "the example runs three replicas"
    );
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], "web");

    // The projected token: audience keyproof-ca, short-lived.
    let token = volume(pod, "sa-token");
    let sources = token["projected"]["sources"].as_array().expect("projected");
    assert_eq!(sources.len(), 1, "{token}");
    let sat = &sources[0]["serviceAccountToken"];
    assert_eq!(sat["audience"], "keyproof-ca", "{token}");
    let exp = sat["expirationSeconds"]
        .as_u64()
        .expect("expirationSeconds");
    assert!(
        (600..=3600).contains(&exp),
        "token lifetime {exp}s: at least the API server's minimum, at most an hour"
    );
    let sidecar = container(pod, "keyproof-proxy");
    assert_eq!(sidecar["restartPolicy"], "Always");
    let token_path = format!(
        "{}/{}",
        mount_path(sidecar, "sa-token").expect("the sidecar mounts the token"),
        sat["path"].as_str().expect("path")
    );
    assert_eq!(token_path, "/var/run/secrets/keyproof/token/token");
    assert_eq!(
        mount_path(container(pod, "app"), "sa-token"),
        None,
        "only the sidecar holds the token"
    );

    // The bundle from the ConfigMap the CA's bundle-publish sidecar keeps
    // current in namespaces labelled keyproof.io/mesh=enabled (key ca.crt).
    let bundle = volume(pod, "trust-bundle");
    assert_eq!(bundle["configMap"]["name"], "keyproof-bundle");
    assert_eq!(
        bundle["configMap"]["items"],
        serde_json::json!([{"key": "ca.crt", "path": "bundle.pem"}])
    );
    let bundle_path = format!(
        "{}/bundle.pem",
        mount_path(sidecar, "trust-bundle").expect("the sidecar mounts the bundle")
    );
    let ns = yaml_docs(&ex.join("namespace.yaml")).unwrap();
    assert_eq!(
        object(&ns, "Namespace", "keyproof-example")["metadata"]["labels"]["keyproof.io/mesh"],
        "enabled",
        "without the label the CA does not publish the bundle there"
    );

    // No Secret, no join token.
    for v in pod["volumes"].as_array().unwrap() {
        assert!(
            v.get("secret").is_none(),
            "the example mounts a Secret: {v}"
        );
    }
    for f in ["deployment.yaml", "kustomization.yaml"] {
        let text = read(&ex.join(f));
        let code = text.lines().filter(|l| !l.trim_start().starts_with('#'));
        for line in code {
            assert!(
                !line.contains("join"),
                "example/{f} uses a join token: {line}"
            );
        }
    }

    // proxy.toml reads exactly what the pod mounts.
    let toml = read(&ex.join("proxy.toml"));
    assert!(
        toml.contains(&format!("service_account_token_file = \"{token_path}\"")),
        "{toml}"
    );
    assert!(
        toml.contains(&format!("trust_bundle = \"{bundle_path}\"")),
        "{toml}"
    );
    assert!(!toml.contains("join_token_file"), "{toml}");
    assert!(
        toml.contains("spiffe_id = \"spiffe://prod.example.com/ns/keyproof-example/sa/web\""),
        "the id must be the ServiceAccount's: {toml}"
    );

    // The sidecar may reach the CA.
    let np = read(&ex.join("networkpolicy.yaml"));
    assert!(
        np.contains("app.kubernetes.io/name: keyproof-ca\n      ports:\n        - port: 8443"),
        "{np}"
    );
}

/// The CA verifies ServiceAccount tokens against a JWKS its own sidecar
/// keeps current, is probed and scraped on its admin port, and holds only
/// the one RBAC binding that reading /openid/v1/jwks needs.
#[test]
fn ca_attests_service_accounts_and_exposes_its_admin_port() {
    let base = deploy().join("kubernetes/base");
    let Some(docs) = yaml_docs(&base.join("ca-deployment.yaml")) else {
        return;
    };
    let dep = object(&docs, "Deployment", "keyproof-ca");
    let tmpl = &dep["spec"]["template"];
    let pod = &tmpl["spec"];
    let ca = container(pod, "ca");
    let a = args(ca);
    assert_eq!(a.first(), Some(&"serve"));
    let jwks = flag(&a, "--k8s-jwks").expect("serve --k8s-jwks");
    assert_eq!(flag(&a, "--k8s-issuer"), Some("$(KEYPROOF_K8S_ISSUER)"));
    assert_eq!(flag(&a, "--k8s-audience"), Some("keyproof-ca"));
    assert_eq!(flag(&a, "--admin-listen"), Some("0.0.0.0:9090"));
    let issuer_env = ca["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "KEYPROOF_K8S_ISSUER")
        .expect("the issuer comes from the environment");
    assert_eq!(
        issuer_env["valueFrom"]["configMapKeyRef"]["name"],
        "keyproof-ca-k8s"
    );
    assert_eq!(issuer_env["valueFrom"]["configMapKeyRef"]["key"], "issuer");
    let kust = read(&base.join("kustomization.yaml"));
    assert!(
        kust.contains("- name: keyproof-ca-k8s") && kust.contains("- k8s-issuer.env"),
        "{kust}"
    );
    assert!(read(&base.join("k8s-issuer.env")).contains("\nissuer=https://"));

    // The JWKS: an emptyDir the CA reads and k8s-jwks writes, once before
    // the CA starts (jwks-init) and for the pod's life (native sidecar).
    let dir = mount_path(ca, "jwks").expect("the CA mounts the JWKS volume");
    assert_eq!(jwks, format!("{dir}/jwks.json"));
    assert!(volume(pod, "jwks").get("emptyDir").is_some());
    for (name, native) in [("jwks-init", false), ("jwks-sync", true)] {
        let c = container(pod, name);
        let a = args(c);
        assert_eq!(a.first(), Some(&"k8s-jwks"), "{name}");
        assert_eq!(flag(&a, "--out"), Some(jwks), "{name}");
        assert_eq!(a.contains(&"--once"), !native, "{name}");
        assert_eq!(c["restartPolicy"] == "Always", native, "{name}");
        assert_eq!(mount_path(c, "jwks"), Some(dir), "{name}");
        // The API token, where k8s-jwks looks for it by default.
        assert_eq!(
            mount_path(c, "kube-api-access"),
            Some("/var/run/secrets/kubernetes.io/serviceaccount"),
            "{name}"
        );
    }
    // Only the JWKS and bundle containers hold an API token, and only
    // projected.
    assert_eq!(pod["automountServiceAccountToken"], false);
    for c in containers(pod) {
        let name = c["name"].as_str().unwrap();
        if !name.starts_with("jwks-") && name != "bundle-publish" {
            assert_eq!(mount_path(c, "kube-api-access"), None, "{name}");
        }
    }
    let api = &volume(pod, "kube-api-access")["projected"]["sources"];
    assert!(
        api[0]["serviceAccountToken"]["audience"].is_null(),
        "the API server's own audience"
    );
    assert!(api[0]["serviceAccountToken"]["expirationSeconds"].as_u64() <= Some(3600));
    assert_eq!(api[1]["configMap"]["name"], "kube-root-ca.crt");

    // Probes and metrics on the admin port.
    let ports = ca["ports"].as_array().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p["name"] == "admin" && p["containerPort"] == 9090),
        "{ports:?}"
    );
    assert_eq!(ca["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(ca["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(ca["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(ca["readinessProbe"]["httpGet"]["port"], "admin");
    let ann = &tmpl["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "9090");
    let pm = yaml_docs(&deploy().join("kubernetes/monitoring/ca-podmonitor.yaml")).unwrap();
    let pm = object(&pm, "PodMonitor", "keyproof-ca");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "admin");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");

    // RBAC: the built-in discovery role, bound to the CA's account.
    let rbac = yaml_docs(&base.join("ca-rbac.yaml")).unwrap();
    let crb = object(
        &rbac,
        "ClusterRoleBinding",
        "keyproof-ca-service-account-issuer-discovery",
    );
    assert_eq!(crb["roleRef"]["kind"], "ClusterRole");
    assert_eq!(
        crb["roleRef"]["name"],
        "system:service-account-issuer-discovery"
    );
    assert_eq!(
        crb["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "keyproof-ca", "namespace": "keyproof-system"}])
    );
    assert_eq!(pod["serviceAccountName"], "keyproof-ca");

    // Network: sidecars reach 8443 from anywhere, Prometheus reaches 9090
    // from the monitoring namespace, the JWKS sync reaches DNS and the API
    // server.
    let np = yaml_docs(&base.join("ca-networkpolicy.yaml")).unwrap();
    let np = &object(&np, "NetworkPolicy", "keyproof-ca")["spec"];
    let ingress = np["ingress"].as_array().unwrap();
    let admits = |port: u64, from: serde_json::Value| {
        ingress
            .iter()
            .any(|r| r["ports"][0]["port"] == port && r["from"][0] == from)
    };
    assert!(
        admits(8443, serde_json::json!({"namespaceSelector": {}})),
        "{np}"
    );
    assert!(
        admits(
            9090,
            serde_json::json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}})
        ),
        "{np}"
    );
    let egress_ports: Vec<u64> = np["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_array().unwrap())
        .filter_map(|p| p["port"].as_u64())
        .collect();
    for p in [53, 443, 6443] {
        assert!(egress_ports.contains(&p), "no egress to port {p}: {np}");
    }
}

/// The CA pod publishes the trust bundle into every labelled namespace: a
/// native sidecar running `keyproof-ca k8s-bundle` on the CA directory
/// (read-only), with a ClusterRole that can list namespaces and write only
/// that ConfigMap, and the ConfigMap name and label the example uses.
#[test]
fn ca_publishes_the_trust_bundle_to_labelled_namespaces() {
    let base = deploy().join("kubernetes/base");
    let Some(docs) = yaml_docs(&base.join("ca-deployment.yaml")) else {
        return;
    };
    let dep = object(&docs, "Deployment", "keyproof-ca");
    let pod = &dep["spec"]["template"]["spec"];
    let ca = container(pod, "ca");
    let ca_dir = flag(&args(ca), "--dir").expect("serve --dir");
    let state = mount_path(ca, "state").expect("the CA mounts its state");

    let p = container(pod, "bundle-publish");
    assert_eq!(p["restartPolicy"], "Always", "a native sidecar");
    let a = args(p);
    assert_eq!(a.first(), Some(&"k8s-bundle"));
    assert_eq!(flag(&a, "--dir"), Some(ca_dir), "the CA's own directory");
    assert!(!a.contains(&"--once"));
    let configmap = flag(&a, "--configmap").unwrap_or("keyproof-bundle");
    let selector = flag(&a, "--namespace-selector").unwrap_or("keyproof.io/mesh=enabled");
    assert_eq!(configmap, "keyproof-bundle");
    assert_eq!(selector, "keyproof.io/mesh=enabled");
    let m = p["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "state")
        .expect("bundle-publish mounts the CA directory");
    assert_eq!(m["mountPath"], state);
    assert_eq!(m["readOnly"], true, "it writes nothing to the CA directory");
    assert_eq!(
        mount_path(p, "kube-api-access"),
        Some("/var/run/secrets/kubernetes.io/serviceaccount")
    );
    // It starts after the seed: the CA directory is there by then.
    let init: Vec<&str> = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let at = |n: &str| init.iter().position(|c| *c == n).unwrap();
    assert!(at("seed") < at("bundle-publish"), "{init:?}");

    // RBAC: namespaces read, ConfigMaps created anywhere but changed only
    // under the published name; no delete, no Secrets.
    let rbac = yaml_docs(&base.join("ca-rbac.yaml")).unwrap();
    let role = object(&rbac, "ClusterRole", "keyproof-ca-bundle-publisher");
    let rules = role["rules"].as_array().unwrap();
    let mut verbs: Vec<String> = Vec::new();
    for r in rules {
        assert_eq!(r["apiGroups"], serde_json::json!([""]), "{r}");
        let res = r["resources"][0].as_str().unwrap();
        assert_eq!(r["resources"].as_array().unwrap().len(), 1, "{r}");
        for v in r["verbs"].as_array().unwrap() {
            let v = v.as_str().unwrap();
            assert!(
                !v.contains('*') && v != "delete" && v != "deletecollection",
                "{r}"
            );
            verbs.push(format!("{res}/{v}"));
        }
        if res == "configmaps" && r["verbs"].as_array().unwrap().iter().any(|v| v == "patch") {
            assert_eq!(r["resourceNames"], serde_json::json!([configmap]), "{r}");
        }
    }
    verbs.sort();
    assert_eq!(
        verbs,
        [
            "configmaps/create",
            "configmaps/get",
            "configmaps/patch",
            "configmaps/update",
            "namespaces/get",
            "namespaces/list",
            "namespaces/watch",
        ]
    );
    let crb = object(&rbac, "ClusterRoleBinding", "keyproof-ca-bundle-publisher");
    assert_eq!(crb["roleRef"]["kind"], "ClusterRole");
    assert_eq!(crb["roleRef"]["name"], "keyproof-ca-bundle-publisher");
    assert_eq!(
        crb["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "keyproof-ca", "namespace": "keyproof-system"}])
    );

    // The example mounts that ConfigMap and its namespace carries the label.
    let ex = deploy().join("kubernetes/example");
    let wd = yaml_docs(&ex.join("deployment.yaml")).unwrap();
    let web = &object(&wd, "Deployment", "web")["spec"]["template"]["spec"];
    assert_eq!(volume(web, "trust-bundle")["configMap"]["name"], configmap);
    let (key, value) = selector.split_once('=').unwrap();
    let ns = yaml_docs(&ex.join("namespace.yaml")).unwrap();
    assert_eq!(
        object(&ns, "Namespace", "keyproof-example")["metadata"]["labels"][key],
        value
    );
}

/// The alerts for the identity plane (CA and trust bundle). They live in
/// deploy/prometheus/keyproof-rules.yaml, which the proxy/observability
/// change writes: until it is in the tree this test fails.
#[test]
fn identity_plane_alerts_exist_and_have_runbooks() {
    let rules_text = read(&rules());
    let readme = read(&deploy().join("README.md"));
    for alert in IDENTITY_PLANE_ALERTS {
        assert!(
            readme.contains(&format!("#### {alert}\n")),
            "deploy/README.md has no runbook for {alert}"
        );
        assert!(
            rules_text.contains(&format!("- alert: {alert}\n")),
            "deploy/prometheus/keyproof-rules.yaml has no alert {alert}"
        );
    }
    // Bundle sequences of different CAs are not comparable, and a CA with
    // no scrape target at all is down too (promtool tests cover both).
    for needle in [
        "< on (trust_domain) group_left",
        "max by (trust_domain) (keyproof_trust_bundle_sequence or keyproof_ca_bundle_sequence)",
        "absent(up{job=~\".*keyproof-ca.*\"}",
        "keyproof_ca_ready == 0",
    ] {
        assert!(
            rules_text.contains(needle),
            "deploy/prometheus/keyproof-rules.yaml lacks {needle}"
        );
    }
    assert!(
        !rules_text.contains("720h"),
        "keyproof-ca check has no 720h window any more"
    );
}

/// Alerts on the CA and on trust-bundle convergence, documented in
/// deploy/README.md and the README's Operations section.
const IDENTITY_PLANE_ALERTS: &[&str] = &[
    "KeyproofTrustBundleDiverged",
    "KeyproofTrustRootExpiringSoon",
    "KeyproofCaDown",
    "KeyproofCaServiceAccountRefusals",
    "KeyproofCaCertificateExpiringSoon",
    "KeyproofCaLedgerSlow",
];

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
        "/.well-known/openid-configuration",
        "k8s-issuer.env",
        "create configmap keyproof-bundle",
        "k8s-bundle",
        "keyproof.io/mesh",
        "keyproof-ca-bundle-publisher",
        "deploy/kubernetes/monitoring",
        "deploy/kubernetes/example-join-token",
        "deploy/kubernetes/example-files",
        "system:service-account-issuer-discovery",
        "TokenReview",
        "keyproof_trust_bundle_sequence",
        "keyproof_ca_rotation_stage",
        "keyproof_ca_bundle_sequence",
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

/// The README's Kubernetes section deploys a workload with no join token
/// and no human step after the CA is up, and names what to watch.
#[test]
fn root_readme_runs_the_zero_touch_path() {
    let readme = read(&root().join("README.md"));
    let start = readme
        .find("## Run it on Kubernetes\n")
        .expect("README has a Kubernetes section");
    let end = readme[start..]
        .find("\n## Development")
        .map_or(readme.len(), |e| start + e);
    let section = &readme[start..end];
    // The steps, in order.
    let mut at = 0;
    for step in [
        "keyproof-ca init",
        "create secret generic keyproof-ca-seed",
        "/.well-known/openid-configuration",
        "kubectl apply -k deploy/kubernetes/base",
        "keyproof.io/mesh=enabled",
        "kubectl apply -k deploy/kubernetes/example-transparent\n",
        "rollout status deploy/web",
    ] {
        let i = section[at..]
            .find(step)
            .unwrap_or_else(|| panic!("README step missing or out of order: {step}"));
        at += i + step.len();
    }
    // Between applying the example and it being ready: nothing to do.
    let deploy_step = section
        .find("kubectl apply -k deploy/kubernetes/example-transparent\n")
        .unwrap();
    let base_step = section
        .find("kubectl apply -k deploy/kubernetes/base")
        .unwrap();
    assert!(
        !section[base_step..deploy_step].contains("token create"),
        "the zero-touch path creates no join token"
    );
    // The CA publishes the bundle: no ConfigMap made by hand on the way.
    assert!(
        !section[base_step..deploy_step].contains("create configmap"),
        "the zero-touch path creates no ConfigMap by hand"
    );
    for needle in [
        "example-join-token",
        "k8s-bundle",
        "deploy/kubernetes/monitoring",
        "TokenReview",
        "keyproof_trust_bundle_sequence",
        "keyproof_ca_rotation_stage",
        "keyproof_ca_bundle_sequence",
    ] {
        assert!(section.contains(needle), "README's section lacks {needle}");
    }
    for alert in IDENTITY_PLANE_ALERTS {
        assert!(section.contains(alert), "README's Operations lacks {alert}");
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
