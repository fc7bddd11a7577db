//! The Helm chart deploy/helm/audgate, checked with the real tools:
//!
//! - `helm lint --strict` with the default values and with ci/full-values.yaml (every optional
//!   part on: TLS and mTLS, ServiceMonitor, PrometheusRule, dashboards, a pinned digest...);
//! - `helm template` for both, every object through `kubernetes-validate --strict` (Kubernetes
//!   1.30 and 1.37, as tests/deploy.rs does for the Kustomize builds); the Prometheus Operator
//!   objects, which those schemas do not cover, get a structural check, and the PrometheusRule's
//!   rules go through `promtool check rules`;
//! - the default render mirrors deploy/kubernetes/base (same config, ports, probes, security
//!   context, resources, HPA, PDB, NetworkPolicy) and the objects hang together (selectors,
//!   ports, the config mount without subPath, the TLS files where `listen.tls` points);
//! - the audgate config the chart renders passes `audgate check-config` without warnings;
//! - values that cannot work (the future Envoy module image, TLS without a Secret, a `listen`
//!   of one's own) fail the render with a message that says what to do;
//! - the chart's copies of the rules and the dashboard are deploy/observability's.
//!
//! Helm comes from scripts/install-helm.sh (built from the Go module proxy, pinned; scripts/test.sh
//! runs it), kubernetes-validate and kubectl from scripts/install-validators.sh, promtool from
//! scripts/install-prometheus.sh. A missing tool fails the test with the command that installs it.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::deploy::{
    Output, check_probes, check_restricted_pod, check_service_monitor_fields, check_services, config_mount,
    container_args, container_ports, kubectl, labels_match, read, relative_files, tool,
};
use common::{find_object, repo_root, yaml_documents_str};
use serde_json::{Value, json};

const CHART: &str = "deploy/helm/audgate";
const FULL_VALUES: &str = "deploy/helm/audgate/ci/full-values.yaml";
const RELEASE: &str = "audgate";
const NAMESPACE: &str = "audgate";

/// Kinds the Kubernetes schemas do not cover; each has its own structural check here.
const CRD_KINDS: [&str; 2] = ["ServiceMonitor", "PrometheusRule"];

/// Every file of the chart and what checks it. A new file fails `every_chart_file_is_checked`
/// until it is listed here.
const CHART_FILES: &[(&str, &str)] = &[
    ("Chart.yaml", "helm lint --strict"),
    (
        "values.yaml",
        "helm lint + template + kubernetes-validate; mirrors deploy/kubernetes/base",
    ),
    (".helmignore", "helm lint (keeps ci/ out of the package)"),
    (
        "ci/full-values.yaml",
        "helm lint + template + kubernetes-validate + CRD structure",
    ),
    ("templates/_helpers.tpl", "every render"),
    ("templates/NOTES.txt", "helm lint renders it, default and full values"),
    (
        "templates/configmap.yaml",
        "audgate check-config on the rendered config",
    ),
    ("templates/serviceaccount.yaml", "kubernetes-validate + cross-checks"),
    (
        "templates/deployment.yaml",
        "kubernetes-validate + cross-checks + mirrors the base",
    ),
    (
        "templates/service.yaml",
        "kubernetes-validate + cross-checks + mirrors the base",
    ),
    ("templates/hpa.yaml", "kubernetes-validate + mirrors the base"),
    ("templates/pdb.yaml", "kubernetes-validate + mirrors the base"),
    ("templates/networkpolicy.yaml", "kubernetes-validate + mirrors the base"),
    (
        "templates/servicemonitor.yaml",
        "ServiceMonitor structure + selects the admin port",
    ),
    (
        "templates/prometheusrule.yaml",
        "PrometheusRule structure; promtool check rules; equals the rules file",
    ),
    (
        "templates/dashboards-configmap.yaml",
        "kubernetes-validate; holds the dashboard JSON",
    ),
    (
        "files/audgate-rules.yaml",
        "equals deploy/observability/audgate-rules.yaml",
    ),
    (
        "files/audgate-dashboard.json",
        "equals deploy/observability/audgate-dashboard.json",
    ),
];

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

const HELM_HINT: &str = "scripts/install-helm.sh (builds the pinned Helm from the Go module proxy into .tools/bin; \
     scripts/test.sh runs it)";

fn helm() -> PathBuf {
    tool(
        "AUDGATE_TEST_HELM",
        "helm",
        &[repo_root().join(".tools/bin/helm")],
        false,
        HELM_HINT,
    )
}

/// Runs `program ARGS` from the repository root without the user's Helm repositories,
/// plugins or caches.
fn run(program: &Path, args: &[&str]) -> Output {
    let tmp = std::env::temp_dir();
    common::deploy::run_env(
        program,
        args,
        &[
            ("HELM_CACHE_HOME", tmp.join("audgate-helm-cache")),
            ("HELM_CONFIG_HOME", tmp.join("audgate-helm-config")),
            ("HELM_DATA_HOME", tmp.join("audgate-helm-data")),
        ],
    )
}

/// `helm template audgate CHART --namespace audgate --kube-version 1.30.0 EXTRA...`.
fn helm_template_result(extra: &[&str]) -> Output {
    let mut args = vec![
        "template",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--kube-version",
        "1.30.0",
    ];
    args.extend_from_slice(extra);
    run(&helm(), &args)
}

fn helm_template(extra: &[&str]) -> String {
    let out = helm_template_result(extra);
    assert!(
        out.ok,
        "helm template {extra:?} failed ({}):\n{}{}",
        out.status, out.stdout, out.stderr
    );
    out.stdout
}

fn render(extra: &[&str], what: &str) -> (String, Vec<Value>) {
    let text = helm_template(extra);
    let objects = yaml_documents_str(&text, what);
    (text, objects)
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// [`common::deploy::validate_manifests`] with the CRDs the chart renders.
fn validate_manifests(text: &str, what: &str) {
    common::deploy::validate_manifests(text, what, &CRD_KINDS);
}

/// The rendered audgate config (the chart's ConfigMap), parsed, with its text.
fn rendered_config(objects: &[Value]) -> (String, Value) {
    let text = find_object(objects, "ConfigMap", "audgate-config")["data"]["audgate.yaml"]
        .as_str()
        .expect("data.audgate.yaml")
        .to_owned();
    let config = yaml_documents_str(&text, "the rendered audgate config").remove(0);
    (text, config)
}

fn container(objects: &[Value]) -> &Value {
    let deployment = find_object(objects, "Deployment", "audgate");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The objects of one render hang together, the pod is locked down, and the config file and
/// the TLS files are mounted where `--config` and `listen.tls` point.
fn check_render(objects: &[Value], what: &str) {
    let deployment = find_object(objects, "Deployment", "audgate");
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    assert!(
        labels_match(&deployment["spec"]["selector"]["matchLabels"], pod_labels),
        "{what}: selector"
    );
    for object in objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/name"], "audgate",
            "{what}: {kind} labels"
        );
        assert_eq!(
            object["metadata"]["labels"]["helm.sh/chart"], "audgate-0.1.0",
            "{what}: {kind} labels"
        );
        if kind == "ConfigMap" && object["metadata"]["name"] == "audgate-dashboards" {
            continue; // goes to Grafana's namespace
        }
        assert_eq!(object["metadata"]["namespace"], NAMESPACE, "{what}: {kind} namespace");
    }

    let pod_spec = &pod["spec"];
    let c = container(objects);
    let account = check_restricted_pod(objects, pod_spec, c, what);
    assert_eq!(account["automountServiceAccountToken"], false, "{what}");
    assert_eq!(c["securityContext"]["runAsNonRoot"], true, "{what}");
    check_probes(c, what);

    // The config: --config PATH is in a volume mounted as a directory (no subPath).
    let args = container_args(c);
    assert_eq!(args.first(), Some(&"serve"), "{what}: args");
    let ((config_dir, config_file), _, volume) = config_mount(pod_spec, c, &args, what);
    let mounts = c["volumeMounts"].as_array().expect("volume mounts");
    assert!(
        mounts.iter().all(|m| m.get("subPath").is_none()),
        "{what}: a subPath mount never sees updates"
    );
    // Projected: path in the volume -> (kind, object name, key).
    let mut files = std::collections::BTreeMap::new();
    for source in volume["projected"]["sources"].as_array().expect("a projected volume") {
        for (kind, body) in source.as_object().expect("a source") {
            let name = body["name"].as_str().expect("a name").to_owned();
            for item in body["items"].as_array().expect("items") {
                files.insert(
                    item["path"].as_str().expect("path").to_owned(),
                    (
                        kind.clone(),
                        name.clone(),
                        item["key"].as_str().expect("key").to_owned(),
                    ),
                );
            }
        }
    }
    let (kind, configmap, key) = files
        .get(config_file)
        .unwrap_or_else(|| panic!("{what}: the volume has no {config_file}: {files:?}"));
    assert_eq!(kind, "configMap", "{what}");
    let config_text = find_object(objects, "ConfigMap", configmap)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: ConfigMap {configmap} has no key {key}"));
    let config = &yaml_documents_str(config_text, "the rendered config")[0];

    // Listeners = container ports = Service target ports.
    let ports = container_ports(c);
    for name in ["grpc", "http", "admin"] {
        let port = ports.get(name).copied();
        let listen = config["listen"][name].as_str().unwrap_or_default();
        assert_eq!(
            Some(
                listen
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u64>().ok())
                    .unwrap_or(0)
            ),
            port,
            "{what}: containerPort {name} vs listen.{name} = {listen:?}"
        );
    }
    check_services(objects, pod_labels, &ports, what);

    // TLS: every file listen.tls names is in the volume, from a Secret's key of that name.
    if let Some(tls) = config["listen"]["tls"].as_object() {
        for (field, value) in tls.iter().filter(|(k, _)| k.ends_with("_file")) {
            let path = value.as_str().expect("a path");
            let inside = path
                .strip_prefix(&format!("{config_dir}/"))
                .unwrap_or_else(|| panic!("{what}: listen.tls.{field} {path} is outside the mounted {config_dir}"));
            let (kind, _, key) = files
                .get(inside)
                .unwrap_or_else(|| panic!("{what}: listen.tls.{field} {path} is not in the volume: {files:?}"));
            assert_eq!(kind, "secret", "{what}: {field}");
            assert_eq!(Some(key.as_str()), inside.rsplit('/').next(), "{what}: {field}");
        }
        assert!(
            tls.contains_key("cert_file") && tls.contains_key("key_file"),
            "{what}: {tls:?}"
        );
    }

    if let Some(pdb) = objects.iter().find(|o| o["kind"] == "PodDisruptionBudget") {
        assert!(
            labels_match(&pdb["spec"]["selector"]["matchLabels"], pod_labels),
            "{what}: PDB selector"
        );
        if let Some(hpa) = objects.iter().find(|o| o["kind"] == "HorizontalPodAutoscaler") {
            assert!(
                pdb["spec"]["minAvailable"].as_u64() < hpa["spec"]["minReplicas"].as_u64(),
                "{what}: the PDB must leave room for evictions at minReplicas"
            );
            assert_eq!(
                hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"],
                "{what}"
            );
            assert!(
                deployment["spec"].get("replicas").is_none(),
                "{what}: replicas belong to the HPA"
            );
        }
    }
    if let Some(policy) = objects.iter().find(|o| o["kind"] == "NetworkPolicy") {
        assert!(
            labels_match(&policy["spec"]["podSelector"]["matchLabels"], pod_labels),
            "{what}"
        );
        let admitted: BTreeSet<&str> = policy["spec"]["ingress"]
            .as_array()
            .expect("ingress")
            .iter()
            .flat_map(|r| r["ports"].as_array().into_iter().flatten())
            .filter_map(|p| p["port"].as_str())
            .collect();
        assert_eq!(
            admitted,
            BTreeSet::from(["admin", "grpc", "http"]),
            "{what}: NetworkPolicy ports"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus Operator objects
// ---------------------------------------------------------------------------------------------

fn check_service_monitor(objects: &[Value], what: &str) {
    let monitor = find_object(objects, "ServiceMonitor", "audgate");
    let endpoints = check_service_monitor_fields(monitor, what);
    let spec = &monitor["spec"];
    for key in spec["selector"].as_object().expect("selector").keys() {
        assert!(
            ["matchLabels", "matchExpressions"].contains(&key.as_str()),
            "{what}: selector.{key}"
        );
    }
    assert_eq!(endpoints.len(), 1, "{what}");
    let endpoint = &endpoints[0];
    // The job label the alerts select (job="audgate") comes from the Service's label.
    let job_label = spec["jobLabel"].as_str().expect("jobLabel");
    // Exactly one Service matches the selector and has the scraped port (each pod once).
    let port = endpoint["port"].as_str().expect("a port name");
    let selector = &spec["selector"];
    let scraped: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Service")
        .filter(|s| labels_match(&selector["matchLabels"], &s["metadata"]["labels"]))
        .filter(|s| {
            selector["matchExpressions"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|e| match e["operator"].as_str() {
                    Some("DoesNotExist") => s["metadata"]["labels"]
                        .get(e["key"].as_str().unwrap_or_default())
                        .is_none(),
                    other => panic!("{what}: selector operator {other:?} not checked here"),
                })
        })
        .collect();
    assert_eq!(
        scraped.len(),
        1,
        "{what}: the ServiceMonitor must select exactly one Service"
    );
    let service = scraped[0];
    assert_eq!(service["metadata"]["labels"][job_label], "audgate", "{what}: job label");
    let service_port = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("{what}: the Service has no port {port}"));
    assert_eq!(service_port["targetPort"], "admin", "{what}: scrapes the admin port");
}

fn check_prometheus_rule(objects: &[Value], what: &str) {
    let rule = find_object(objects, "PrometheusRule", "audgate");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1", "{what}");
    let keys: Vec<&String> = rule["spec"].as_object().expect("spec").keys().collect();
    assert_eq!(keys, vec!["groups"], "{what}: PrometheusRule spec");
    let source = &yaml_documents_str(&read("deploy/observability/audgate-rules.yaml"), "the rules file")[0];
    assert_eq!(
        &rule["spec"], source,
        "{what}: the chart's PrometheusRule is not deploy/observability/audgate-rules.yaml"
    );
    // promtool reads the spec as a rules file.
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("rules.json");
    std::fs::write(&file, serde_json::to_string_pretty(&rule["spec"]).expect("JSON")).expect("write");
    let out = run(
        &common::promtool_binary(),
        &["check", "rules", &file.display().to_string()],
    );
    assert!(
        out.ok,
        "{what}: promtool check rules on the PrometheusRule's spec:\n{}{}",
        out.stdout, out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn helm_lint_passes_with_default_and_full_values() {
    for extra in [vec![], vec!["--values", FULL_VALUES]] {
        let mut args = vec!["lint", "--strict", CHART, "--namespace", NAMESPACE];
        args.extend(extra.iter().copied());
        let out = run(&helm(), &args);
        assert!(
            out.ok,
            "helm {args:?} failed ({}):\n{}{}",
            out.status, out.stdout, out.stderr
        );
        assert!(
            out.stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn default_render_validates_and_mirrors_the_kustomize_base() {
    let (text, objects) = render(&[], "helm template (default values)");
    validate_manifests(&text, "helm template (default values)");
    check_render(&objects, "default values");
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount"
        ]),
        "default values: the Prometheus Operator and Grafana objects are opt-in"
    );

    // What deploy/kubernetes/base builds, for comparison.
    let out = run(&kubectl(), &["kustomize", "deploy/kubernetes/base"]);
    assert!(
        out.ok,
        "kubectl kustomize deploy/kubernetes/base: {}{}",
        out.stdout, out.stderr
    );
    let base = yaml_documents_str(&out.stdout, "deploy/kubernetes/base");

    // Same config.
    let (_, config) = rendered_config(&objects);
    let base_config = &yaml_documents_str(&read("deploy/kubernetes/base/audgate.yaml"), "base config")[0];
    assert_eq!(
        &config, base_config,
        "the chart's default config is not deploy/kubernetes/base/audgate.yaml"
    );

    // Same pod, but for the image and the volume (a projected one, for the TLS files).
    let chart_pod = &find_object(&objects, "Deployment", "audgate")["spec"];
    let base_pod = &find_object(&base, "Deployment", "audgate")["spec"];
    for key in ["strategy", "revisionHistoryLimit"] {
        assert_eq!(chart_pod[key], base_pod[key], "Deployment spec.{key}");
    }
    for key in [
        "securityContext",
        "terminationGracePeriodSeconds",
        "automountServiceAccountToken",
    ] {
        assert_eq!(
            chart_pod["template"]["spec"][key], base_pod["template"]["spec"][key],
            "pod {key}"
        );
    }
    let c = container(&objects);
    let b = container(&base);
    for key in [
        "args",
        "env",
        "ports",
        "readinessProbe",
        "livenessProbe",
        "lifecycle",
        "resources",
        "securityContext",
        "volumeMounts",
        "imagePullPolicy",
    ] {
        assert_eq!(c[key], b[key], "container {key}: chart vs deploy/kubernetes/base");
    }
    assert_eq!(
        c["image"], "ghcr.io/example/audgate:0.1.0",
        "image: repository and appVersion"
    );

    // Same Services, HPA, PDB and NetworkPolicy rules.
    for name in ["audgate", "audgate-headless"] {
        let chart = &find_object(&objects, "Service", name)["spec"];
        let base = &find_object(&base, "Service", name)["spec"];
        assert_eq!(chart["ports"], base["ports"], "Service {name} ports");
        assert_eq!(chart.get("clusterIP"), base.get("clusterIP"), "Service {name}");
    }
    assert_eq!(
        find_object(&objects, "HorizontalPodAutoscaler", "audgate")["spec"],
        find_object(&base, "HorizontalPodAutoscaler", "audgate")["spec"],
        "HPA"
    );
    let pdb = &find_object(&objects, "PodDisruptionBudget", "audgate")["spec"];
    let base_pdb = &find_object(&base, "PodDisruptionBudget", "audgate")["spec"];
    for key in ["minAvailable", "unhealthyPodEvictionPolicy"] {
        assert_eq!(pdb[key], base_pdb[key], "PDB {key}");
    }
    let policy = &find_object(&objects, "NetworkPolicy", "audgate")["spec"];
    let base_policy = &find_object(&base, "NetworkPolicy", "audgate")["spec"];
    for key in ["policyTypes", "ingress", "egress"] {
        assert_eq!(policy[key], base_policy[key], "NetworkPolicy {key}");
    }
}

#[test]
fn full_values_render_validates_with_tls_monitoring_and_dashboards() {
    let (text, objects) = render(&["--values", FULL_VALUES], "helm template (full values)");
    validate_manifests(&text, "helm template (full values)");
    check_render(&objects, "full values");
    check_service_monitor(&objects, "full values");
    check_prometheus_rule(&objects, "full values");

    // Dashboards: the JSON of deploy/observability, for Grafana's sidecar, in its namespace.
    let dashboards = find_object(&objects, "ConfigMap", "audgate-dashboards");
    assert_eq!(dashboards["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboards["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(dashboards["metadata"]["annotations"]["grafana_folder"], "audgate");
    let json_text = dashboards["data"]["audgate-dashboard.json"]
        .as_str()
        .expect("the dashboard");
    let rendered: Value = serde_json::from_str(json_text).expect("the dashboard is JSON");
    let source: Value = serde_json::from_str(&read("deploy/observability/audgate-dashboard.json")).expect("JSON");
    assert_eq!(
        rendered, source,
        "the dashboards ConfigMap holds deploy/observability/audgate-dashboard.json"
    );

    // TLS and mTLS: the config names the files, the volume holds them from the two Secrets.
    let (_, config) = rendered_config(&objects);
    assert_eq!(
        config["listen"]["tls"],
        json!({
            "cert_file": "/etc/audgate/tls/tls.crt",
            "key_file": "/etc/audgate/tls/tls.key",
            "client_ca_file": "/etc/audgate/tls/ca.crt",
            "client_sans": ["spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"],
        }),
        "listen.tls (SPEC.md's paths)"
    );
    let pod = &find_object(&objects, "Deployment", "audgate")["spec"]["template"]["spec"];
    let secrets: Vec<&str> = pod["volumes"][0]["projected"]["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .filter_map(|s| s["secret"]["name"].as_str())
        .collect();
    assert_eq!(secrets, vec!["audgate-tls", "mesh-client-ca"]);

    // The values reached the objects.
    let c = container(&objects);
    assert_eq!(
        c["image"],
        "registry.example.com/platform/audgate@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    assert_eq!(pod["serviceAccountName"], "audgate-sa");
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(
        find_object(&objects, "HorizontalPodAutoscaler", "audgate")["spec"]["minReplicas"],
        3
    );
    assert_eq!(
        find_object(&objects, "PodDisruptionBudget", "audgate")["spec"]["minAvailable"],
        2
    );
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!(
        spread["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        RELEASE
    );
    for object in &objects {
        assert_eq!(
            object["metadata"]["labels"]["team"], "platform",
            "commonLabels on {}",
            object["kind"]
        );
    }
}

#[test]
fn replicas_without_autoscaling_and_an_existing_configmap() {
    let (text, objects) = render(
        &[
            "--set",
            "autoscaling.enabled=false",
            "--set",
            "replicaCount=4",
            "--set",
            "config.existingConfigMap=my-audgate-config",
            "--set",
            "podDisruptionBudget.minAvailable=null",
            "--set",
            "podDisruptionBudget.maxUnavailable=1",
        ],
        "helm template (no HPA, existing ConfigMap)",
    );
    validate_manifests(&text, "helm template (no HPA, existing ConfigMap)");
    assert!(objects.iter().all(|o| o["kind"] != "HorizontalPodAutoscaler"));
    assert!(
        objects.iter().all(|o| o["kind"] != "ConfigMap"),
        "an existing ConfigMap is not rendered"
    );
    let deployment = find_object(&objects, "Deployment", "audgate");
    assert_eq!(deployment["spec"]["replicas"], 4);
    let sources = &deployment["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"];
    assert_eq!(sources[0]["configMap"]["name"], "my-audgate-config");
    let pdb = &find_object(&objects, "PodDisruptionBudget", "audgate")["spec"];
    assert_eq!(pdb["maxUnavailable"], 1);
    assert!(pdb.get("minAvailable").is_none());
}

/// TLS with the client CA from the same Secret (cert-manager's `ca.crt`): one Secret source
/// with the three files, where `listen.tls` names them.
#[test]
fn tls_and_client_ca_from_one_secret() {
    let (text, objects) = render(
        &[
            "--set",
            "tls.enabled=true",
            "--set",
            "tls.secretName=audgate-tls",
            "--set",
            "tls.clientCA.enabled=true",
        ],
        "helm template (TLS, one Secret)",
    );
    validate_manifests(&text, "helm template (TLS, one Secret)");
    check_render(&objects, "TLS, one Secret");
    let (_, config) = rendered_config(&objects);
    assert_eq!(config["listen"]["tls"]["client_ca_file"], "/etc/audgate/tls/ca.crt");
    assert!(config["listen"]["tls"].get("client_sans").is_none());
    let deployment = find_object(&objects, "Deployment", "audgate");
    let sources = deployment["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
        .as_array()
        .expect("sources");
    let secrets: Vec<&Value> = sources.iter().filter(|s| s.get("secret").is_some()).collect();
    assert_eq!(secrets.len(), 1, "{sources:?}");
    let paths: Vec<&str> = secrets[0]["secret"]["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["path"].as_str())
        .collect();
    assert_eq!(paths, vec!["tls/tls.crt", "tls/tls.key", "tls/ca.crt"]);
}

/// Runs `audgate check-config` on a rendered config: passes, and prints no warnings.
fn check_config(text: &str, what: &str) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("audgate.yaml");
    std::fs::write(&path, text).expect("write the config");
    common::deploy::check_config(&path, what, false);
}

#[test]
fn rendered_configs_pass_check_config() {
    let (_, objects) = render(&[], "default values");
    let (text, _) = rendered_config(&objects);
    check_config(&text, "the default values' config");

    let (_, objects) = render(&["--values", FULL_VALUES], "full values");
    let (_, mut config) = rendered_config(&objects);
    // listen.tls (SPEC.md) is checked against the mounts by check_render; the files it names
    // exist only in the pod, so the rest of the config is what check-config reads here.
    config["listen"]
        .as_object_mut()
        .expect("listen")
        .remove("tls")
        .expect("the full values turn TLS on");
    let text = serde_json::to_string_pretty(&config).expect("JSON");
    check_config(&text, "the full values' config (without listen.tls)");
}

#[test]
fn values_that_cannot_work_fail_the_render_clearly() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let own_listen = dir.path().join("values.yaml").display().to_string();
    std::fs::write(
        &own_listen,
        "config:\n  inline: |\n    listen:\n      grpc: 0.0.0.0:1\n    routes: []\n",
    )
    .expect("write values");
    for (args, expected) in [
        (
            vec!["--set", "envoyModule.enabled=true"],
            "in-process Envoy module image is not published yet",
        ),
        (vec!["--set", "tls.enabled=true"], "tls.enabled needs tls.secretName"),
        (
            vec!["--values", &own_listen],
            "config.inline sets `listen`, which the chart writes",
        ),
        (
            vec!["--set", "config.inline.issuers=x"],
            "config.inline is the audgate.yaml text",
        ),
    ] {
        let out = helm_template_result(&args);
        assert!(!out.ok, "helm template {args:?} should fail:\n{}", out.stdout);
        assert!(
            out.stderr.contains(expected),
            "helm template {args:?}: expected {expected:?} in:\n{}",
            out.stderr
        );
    }
}

#[test]
fn chart_files_are_the_observability_files() {
    for (chart, source) in [
        ("files/audgate-rules.yaml", "deploy/observability/audgate-rules.yaml"),
        (
            "files/audgate-dashboard.json",
            "deploy/observability/audgate-dashboard.json",
        ),
    ] {
        assert!(
            read(&format!("{CHART}/{chart}")) == read(source),
            "{CHART}/{chart} differs from {source}: run scripts/render-observability.sh"
        );
    }
}

#[test]
fn every_chart_file_is_checked() {
    let root = repo_root().join(CHART);
    let found = relative_files(&root, &root);
    let listed: BTreeSet<String> = CHART_FILES.iter().map(|(f, _)| (*f).to_owned()).collect();
    assert_eq!(found, listed, "CHART_FILES must list exactly the chart's files");
}
