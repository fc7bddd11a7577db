//! Every file under deploy/, the Dockerfile and the docs' configs, checked with real tools:
//!
//! - Kubernetes: `kubectl kustomize` builds deploy/kubernetes/base and the Istio overlay
//!   offline; `kubernetes-validate --strict` checks every built object against the Kubernetes
//!   schemas (1.30, the oldest release the manifests support, and 1.37); the objects are
//!   cross-checked (selectors, ports, probes, the config mount, the security context);
//!   deploy/istio/audgate.yaml must equal the rendered overlay.
//! - CRDs the schemas do not cover (ServiceMonitor, AuthorizationPolicy, IstioOperator, Helm
//!   values for istiod) get a structural check of their own: apiVersion, kind, required and
//!   known fields, and that they point at each other and at the Service.
//! - audgate configs (deploy/ and every YAML block of docs/keycloak.md and README's Deploy
//!   section) pass `audgate check-config` without warnings, unless marked; test cases in the
//!   docs pass `audgate test`.
//! - deploy/envoy/*.yaml run for real (Envoy 1.40) against audgate with the base config; their
//!   active health checks must succeed.
//! - Dockerfile: hadolint, plus its structure (stages, non-root user, no remote ADD, the
//!   binary only) and that the binary needs no library the runtime base lacks.
//!
//! The tools come from scripts/install-validators.sh (scripts/test.sh runs it); a missing tool
//! fails the test with that command.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::deploy::{
    VALIDATORS_HINT, check_config, check_links, check_probes, check_restricted_pod, check_service_monitor_fields,
    check_services, config_mount, container_args, container_ports, kubectl, labels_match, read, relative_files, run,
    tool, venv_bin,
};
use common::{
    Audgate, EchoServer, Envoy, EnvoyPorts, IssuerServer, Reply, TestKey, find_object, free_port, keycloak_claims,
    localize_deploy_config, merge, repo_root, yaml_documents, yaml_documents_str,
};
use serde_json::{Value, json};

/// Kinds the Kubernetes schemas do not cover; each has its own structural check here.
const CRD_KINDS: [&str; 1] = ["ServiceMonitor"];

const BASE_DIR: &str = "deploy/kubernetes/base";
const ISTIO_OVERLAY_DIR: &str = "deploy/kubernetes/overlays/istio";
const ISTIO_MANIFEST: &str = "deploy/istio/audgate.yaml";
const ISTIO_OPERATOR: &str = "deploy/istio/extension-provider.istiooperator.yaml";
const ISTIO_HELM_VALUES: &str = "deploy/istio/extension-provider.helm-values.yaml";
const POLICY_GATEWAY: &str = "deploy/istio/authorizationpolicy-ingressgateway.yaml";
const POLICY_WORKLOAD: &str = "deploy/istio/authorizationpolicy-orders.yaml";

/// Every file under deploy/ and what checks it. A new file fails
/// `every_deploy_file_is_checked` until it is listed here with its check.
const DEPLOY_FILES: &[(&str, &str)] = &[
    (
        "deploy/envoy/envoy.yaml",
        "envoy --mode validate (e2e_envoy.rs); run against audgate with the base config, health checks",
    ),
    (
        "deploy/envoy/envoy-tls.yaml",
        "envoy --mode validate and run against audgate over mTLS, health checks (tls.rs)",
    ),
    (
        "deploy/envoy/envoy-http-service.yaml",
        "envoy --mode validate (e2e_envoy.rs); run against audgate's HTTP endpoint with the base config",
    ),
    (
        "deploy/envoy/envoy-module.yaml",
        "envoy --mode validate with libaudgate_envoy.so loaded (e2e_module.rs)",
    ),
    (
        "deploy/envoy/Dockerfile.module",
        "hadolint (dockerfile_module_passes_hadolint)",
    ),
    ("deploy/kubernetes/base/kustomization.yaml", "kubectl kustomize"),
    (
        "deploy/kubernetes/base/audgate.yaml",
        "audgate check-config; runs behind deploy/envoy",
    ),
    (
        "deploy/kubernetes/base/namespace.yaml",
        "kustomize + kubernetes-validate",
    ),
    (
        "deploy/kubernetes/base/serviceaccount.yaml",
        "kustomize + kubernetes-validate",
    ),
    (
        "deploy/kubernetes/base/deployment.yaml",
        "kustomize + kubernetes-validate + cross-checks",
    ),
    (
        "deploy/kubernetes/base/service.yaml",
        "kustomize + kubernetes-validate + cross-checks",
    ),
    (
        "deploy/kubernetes/base/poddisruptionbudget.yaml",
        "kustomize + kubernetes-validate + cross-checks",
    ),
    (
        "deploy/kubernetes/base/horizontalpodautoscaler.yaml",
        "kustomize + kubernetes-validate + cross-checks",
    ),
    (
        "deploy/kubernetes/base/networkpolicy.yaml",
        "kustomize + kubernetes-validate + cross-checks",
    ),
    (
        "deploy/kubernetes/base/servicemonitor.yaml",
        "kustomize + ServiceMonitor structure + cross-checks",
    ),
    (
        "deploy/kubernetes/overlays/istio/kustomization.yaml",
        "kubectl kustomize",
    ),
    (
        "deploy/kubernetes/overlays/istio/audgate.yaml",
        "audgate check-config; e2e_istio.rs runs it (through deploy/istio/audgate.yaml)",
    ),
    (
        "deploy/kubernetes/overlays/istio/deployment-istio.yaml",
        "kustomize + kubernetes-validate",
    ),
    (
        "deploy/kubernetes/overlays/istio/networkpolicy-istio.yaml",
        "kustomize + kubernetes-validate",
    ),
    (
        "deploy/istio/audgate.yaml",
        "kubernetes-validate; equals the rendered overlay; its ConfigMap's config runs in e2e_istio.rs",
    ),
    (
        "deploy/istio/extension-provider.istiooperator.yaml",
        "IstioOperator structure; e2e_istio.rs builds the ext_authz filter from it",
    ),
    (
        "deploy/istio/extension-provider.helm-values.yaml",
        "Helm values structure; same provider as the IstioOperator",
    ),
    (
        "deploy/istio/authorizationpolicy-ingressgateway.yaml",
        "AuthorizationPolicy structure; e2e_istio.rs turns it into the gateway's RBAC rules",
    ),
    (
        "deploy/istio/authorizationpolicy-orders.yaml",
        "AuthorizationPolicy structure; e2e_istio.rs turns it into the sidecar's RBAC rules",
    ),
];

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

fn hadolint() -> PathBuf {
    tool(
        "AUDGATE_TEST_HADOLINT",
        "hadolint",
        &[venv_bin("hadolint")],
        false,
        VALIDATORS_HINT,
    )
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests
// ---------------------------------------------------------------------------------------------

/// `kubectl kustomize DIR` (offline: everything is local).
fn kustomize(dir: &str) -> String {
    let out = run(&kubectl(), &["kustomize", dir]);
    assert!(
        out.ok,
        "kubectl kustomize {dir} failed ({}):\n{}{}",
        out.status, out.stdout, out.stderr
    );
    out.stdout
}

/// [`common::deploy::validate_manifests`] with the CRDs the kustomize and Istio files use.
fn validate_manifests(text: &str, what: &str) {
    common::deploy::validate_manifests(text, what, &CRD_KINDS);
}

#[test]
fn kustomize_builds_validate_against_the_kubernetes_schemas() {
    for dir in [BASE_DIR, ISTIO_OVERLAY_DIR] {
        let built = kustomize(dir);
        validate_manifests(&built, dir);
    }
    validate_manifests(&read(ISTIO_MANIFEST), ISTIO_MANIFEST);
}

#[test]
fn istio_manifest_is_the_rendered_overlay() {
    let built = yaml_documents_str(&kustomize(ISTIO_OVERLAY_DIR), ISTIO_OVERLAY_DIR);
    let committed = yaml_documents(&repo_root().join(ISTIO_MANIFEST));
    assert!(
        built == committed,
        "{ISTIO_MANIFEST} differs from `kubectl kustomize {ISTIO_OVERLAY_DIR}`: run scripts/render-istio-manifest.sh"
    );
}

/// Every *.yaml next to a kustomization is used by it (so nothing there escapes the build).
#[test]
fn kustomizations_use_every_file_in_their_directory() {
    for dir in [BASE_DIR, ISTIO_OVERLAY_DIR] {
        let kustomization = read(&format!("{dir}/kustomization.yaml"));
        let used: BTreeSet<String> = yaml_documents_str(&kustomization, dir)
            .iter()
            .flat_map(|k| {
                let mut names = Vec::new();
                for r in k["resources"].as_array().into_iter().flatten() {
                    names.push(r.as_str().unwrap_or_default().to_owned());
                }
                for p in k["patches"].as_array().into_iter().flatten() {
                    if let Some(path) = p["path"].as_str() {
                        names.push(path.to_owned());
                    }
                }
                for g in k["configMapGenerator"].as_array().into_iter().flatten() {
                    for f in g["files"].as_array().into_iter().flatten() {
                        names.push(f.as_str().unwrap_or_default().to_owned());
                    }
                }
                names
            })
            .collect();
        for entry in std::fs::read_dir(repo_root().join(dir)).expect("the kustomization directory exists") {
            let name = entry
                .expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name == "kustomization.yaml" {
                continue;
            }
            assert!(
                used.contains(&name),
                "{dir}/{name} is not used by {dir}/kustomization.yaml"
            );
        }
    }
}

fn listen_port(config: &Value, key: &str) -> u64 {
    let addr = config["listen"][key]
        .as_str()
        .unwrap_or_else(|| panic!("the config sets no listen.{key}"));
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("listen.{key} = {addr} has no port"))
}

/// The objects of one build hang together, and the pod is locked down as the docs say.
fn check_manifest_set(objects: &[Value], what: &str) {
    let deployment = find_object(objects, "Deployment", "audgate");
    let pod = &deployment["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    let spec = &deployment["spec"];
    assert!(spec.get("replicas").is_none(), "{what}: replicas belong to the HPA");
    assert!(
        labels_match(&spec["selector"]["matchLabels"], pod_labels),
        "{what}: selector"
    );
    assert_eq!(spec["strategy"]["type"], "RollingUpdate", "{what}");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0, "{what}");

    // Security: the restricted Pod Security Standard.
    let pod_spec = &pod["spec"];
    let containers = pod_spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{what}: one container");
    let container = &containers[0];
    check_restricted_pod(objects, pod_spec, container, what);
    for (kind, resource) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
        assert!(
            container["resources"][kind][resource].is_string(),
            "{what}: resources.{kind}.{resource} missing"
        );
    }

    // Ports, probes.
    let ports = container_ports(container);
    check_probes(container, what);
    assert!(
        container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().is_some(),
        "{what}: preStop sleep"
    );

    // The config: --config PATH is the ConfigMap mounted as a directory (no subPath, so
    // updates reach the file), and its listeners are the container ports.
    let args = container_args(container);
    let ((_, config_file), mount, volume) = config_mount(pod_spec, container, &args, what);
    assert!(
        mount.get("subPath").is_none(),
        "{what}: a subPath mount never sees ConfigMap updates"
    );
    let configmap_name = volume["configMap"]["name"].as_str().expect("a ConfigMap volume");
    let configmap = find_object(objects, "ConfigMap", configmap_name);
    let config_text = configmap["data"][config_file]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: ConfigMap {configmap_name} has no key {config_file}"));
    let config = &yaml_documents_str(config_text, "the ConfigMap's audgate config")[0];
    for (name, key) in [("grpc", "grpc"), ("http", "http"), ("admin", "admin")] {
        assert_eq!(
            ports.get(name).copied(),
            Some(listen_port(config, key)),
            "{what}: containerPort {name} vs the config's listen.{key}"
        );
    }

    // Services: select the pods, target named container ports; `grpc` is 9191.
    let services = check_services(objects, pod_labels, &ports, what);
    assert!(!services.is_empty(), "{what}: no Service");
    let main = find_object(objects, "Service", "audgate");
    let grpc = main["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("a Service port named grpc (Istio's protocol selection)");
    assert_eq!(grpc["port"], 9191, "{what}");
    assert_eq!(grpc["appProtocol"], "grpc", "{what}");

    // PDB, HPA, NetworkPolicy.
    let pdb = find_object(objects, "PodDisruptionBudget", "audgate");
    assert!(
        labels_match(&pdb["spec"]["selector"]["matchLabels"], pod_labels),
        "{what}: PDB selector"
    );
    let hpa = find_object(objects, "HorizontalPodAutoscaler", "audgate");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment", "{what}");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"],
        "{what}"
    );
    let min_replicas = hpa["spec"]["minReplicas"].as_u64().expect("minReplicas");
    assert!(
        pdb["spec"]["minAvailable"].as_u64().is_some_and(|m| m < min_replicas),
        "{what}: the PDB must leave room for evictions at minReplicas"
    );
    let policy = find_object(objects, "NetworkPolicy", "audgate");
    assert!(
        labels_match(&policy["spec"]["podSelector"]["matchLabels"], pod_labels),
        "{what}: NetworkPolicy selector"
    );
    for rule in policy["spec"]["ingress"].as_array().expect("ingress rules") {
        for port in rule["ports"].as_array().expect("ports") {
            if let Some(name) = port["port"].as_str() {
                assert!(
                    ports.contains_key(name),
                    "{what}: NetworkPolicy port {name} is no container port"
                );
            }
        }
    }
    let allowed: BTreeSet<String> = policy["spec"]["ingress"]
        .as_array()
        .expect("ingress rules")
        .iter()
        .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["port"].as_str().map(str::to_owned))
        .collect();
    for name in ["grpc", "http", "admin"] {
        assert!(
            allowed.contains(name),
            "{what}: the NetworkPolicy never admits port {name}"
        );
    }

    // ServiceMonitor (base only): one Service carries the port it scrapes.
    for monitor in objects.iter().filter(|o| o["kind"] == "ServiceMonitor") {
        check_service_monitor(monitor, what);
        let selector = &monitor["spec"]["selector"]["matchLabels"];
        for endpoint in monitor["spec"]["endpoints"].as_array().expect("endpoints") {
            let port = endpoint["port"].as_str().expect("a named port");
            let scraped: Vec<&&Value> = services
                .iter()
                .filter(|s| labels_match(selector, &s["metadata"]["labels"]))
                .filter(|s| {
                    s["spec"]["ports"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["name"] == port))
                })
                .collect();
            assert_eq!(
                scraped.len(),
                1,
                "{what}: the ServiceMonitor port {port} must select exactly one Service"
            );
        }
    }

    // Everything in one namespace (except the Namespace itself).
    for object in objects.iter().filter(|o| o["kind"] != "Namespace") {
        assert_eq!(object["metadata"]["namespace"], "audgate", "{what}: {}", object["kind"]);
    }
}

fn check_service_monitor(monitor: &Value, what: &str) {
    let endpoints = check_service_monitor_fields(monitor, what);
    assert!(monitor["metadata"]["name"].is_string(), "{what}: ServiceMonitor name");
    assert!(
        monitor["spec"]["selector"]["matchLabels"].is_object(),
        "{what}: spec.selector.matchLabels"
    );
    assert!(!endpoints.is_empty(), "{what}: no endpoints");
    for endpoint in endpoints {
        assert!(
            endpoint["port"].is_string(),
            "{what}: endpoints[].port (a Service port name)"
        );
    }
}

#[test]
fn base_manifests_hang_together() {
    let objects = yaml_documents_str(&kustomize(BASE_DIR), BASE_DIR);
    check_manifest_set(&objects, BASE_DIR);
    let namespace = find_object(&objects, "Namespace", "audgate");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    find_object(&objects, "ServiceMonitor", "audgate");
    find_object(&objects, "Service", "audgate-headless");
}

#[test]
fn istio_overlay_adds_the_sidecar_and_keeps_the_rest() {
    let objects = yaml_documents_str(&kustomize(ISTIO_OVERLAY_DIR), ISTIO_OVERLAY_DIR);
    check_manifest_set(&objects, ISTIO_OVERLAY_DIR);
    let pod = &find_object(&objects, "Deployment", "audgate")["spec"]["template"]["metadata"];
    assert_eq!(pod["labels"]["sidecar.istio.io/inject"], "true");
    let annotations = &pod["annotations"];
    assert!(
        annotations["proxy.istio.io/config"]
            .as_str()
            .is_some_and(|c| c.contains("holdApplicationUntilProxyStarts: true")),
        "{annotations}"
    );
    assert_eq!(annotations["prometheus.io/port"], "9901");
    assert!(
        objects.iter().all(|o| o["kind"] != "ServiceMonitor"),
        "the Istio overlay scrapes through Istio's metrics merging, not a ServiceMonitor"
    );
    assert!(objects.iter().all(|o| o["metadata"]["name"] != "audgate-headless"));
    // The overlay's config is the Istio one.
    let configmap = find_object(&objects, "ConfigMap", "audgate-config");
    assert_eq!(
        configmap["data"]["audgate.yaml"].as_str(),
        Some(read("deploy/kubernetes/overlays/istio/audgate.yaml").as_str())
    );
}

// ---------------------------------------------------------------------------------------------
// Istio CRDs and Helm values
// ---------------------------------------------------------------------------------------------

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_duration(text: &str) -> bool {
    let number = text.strip_suffix("ms").or_else(|| text.strip_suffix('s'));
    number.is_some_and(|n| n.parse::<f64>().is_ok_and(|v| v > 0.0))
}

/// meshConfig.extensionProviders[]: name, exactly one provider type, known fields.
fn check_extension_providers(providers: &Value, file: &str) -> Value {
    let list = providers
        .as_array()
        .unwrap_or_else(|| panic!("{file}: extensionProviders is not a list"));
    assert_eq!(list.len(), 1, "{file}: one provider, audgate's");
    let entry = list[0].as_object().expect("a provider");
    let name = entry["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{file}: provider without a name"));
    assert!(
        is_dns_label(name),
        "{file}: provider name {name:?} is not a DNS-1123 label"
    );
    let kinds: Vec<&String> = entry.keys().filter(|k| *k != "name").collect();
    assert_eq!(kinds, vec!["envoyExtAuthzGrpc"], "{file}: one gRPC ext_authz provider");
    let grpc = entry["envoyExtAuthzGrpc"].as_object().expect("envoyExtAuthzGrpc");
    for key in grpc.keys() {
        assert!(
            [
                "service",
                "port",
                "timeout",
                "failOpen",
                "statusOnError",
                "includeRequestBodyInCheck",
                "clearRouteCache"
            ]
            .contains(&key.as_str()),
            "{file}: unknown envoyExtAuthzGrpc field {key}"
        );
    }
    assert!(grpc["service"].is_string(), "{file}: service");
    assert!(
        grpc["port"].as_u64().is_some_and(|p| (1..=65535).contains(&p)),
        "{file}: port"
    );
    let timeout = grpc["timeout"].as_str().unwrap_or_default();
    assert!(
        is_duration(timeout),
        "{file}: timeout {timeout:?} (Istio's default is 600s: set one)"
    );
    assert_eq!(grpc["failOpen"], false, "{file}: audgate's provider fails closed");
    let status = grpc["statusOnError"]
        .as_str()
        .unwrap_or_else(|| panic!("{file}: statusOnError must be a string (Istio parses it)"));
    assert!(
        status.parse::<u16>().is_ok_and(|s| (400..600).contains(&s)),
        "{file}: statusOnError {status:?}"
    );
    list[0].clone()
}

fn check_authorization_policy(policy: &Value, file: &str, provider: &str) {
    assert_eq!(policy["apiVersion"], "security.istio.io/v1", "{file}");
    assert_eq!(policy["kind"], "AuthorizationPolicy", "{file}");
    assert!(policy["metadata"]["name"].is_string(), "{file}: metadata.name");
    assert!(
        policy["metadata"]["namespace"].is_string(),
        "{file}: metadata.namespace (it decides which workloads the selector can reach)"
    );
    let spec = policy["spec"].as_object().expect("spec");
    for key in spec.keys() {
        assert!(
            ["selector", "targetRef", "targetRefs", "action", "provider", "rules"].contains(&key.as_str()),
            "{file}: unknown AuthorizationPolicy field spec.{key}"
        );
    }
    assert_eq!(spec["action"], "CUSTOM", "{file}");
    assert_eq!(
        spec["provider"]["name"], provider,
        "{file}: provider.name names the extension provider"
    );
    assert!(
        spec["selector"]["matchLabels"]
            .as_object()
            .is_some_and(|m| !m.is_empty()),
        "{file}: a selector (without one the policy applies to every workload of the namespace)"
    );
    let rules = spec["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("{file}: CUSTOM needs rules: they choose what audgate is asked"));
    assert!(!rules.is_empty(), "{file}: no rules");
    for rule in rules {
        for key in rule.as_object().expect("a rule").keys() {
            assert!(
                ["from", "to", "when"].contains(&key.as_str()),
                "{file}: unknown rule field {key}"
            );
        }
        for to in rule["to"].as_array().into_iter().flatten() {
            let operation = to["operation"].as_object().expect("to[].operation");
            for (key, values) in operation {
                assert!(
                    [
                        "hosts",
                        "notHosts",
                        "ports",
                        "notPorts",
                        "methods",
                        "notMethods",
                        "paths",
                        "notPaths"
                    ]
                    .contains(&key.as_str()),
                    "{file}: unknown operation field {key}"
                );
                let values = values
                    .as_array()
                    .unwrap_or_else(|| panic!("{file}: {key} is not a list"));
                assert!(values.iter().all(Value::is_string), "{file}: {key} holds strings");
                if key.ends_with("aths") {
                    for path in values.iter().filter_map(Value::as_str) {
                        assert!(path.starts_with(['/', '*']), "{file}: path {path:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn istio_files_are_well_formed_and_point_at_each_other() {
    // IstioOperator.
    let operator_docs = yaml_documents(&repo_root().join(ISTIO_OPERATOR));
    assert_eq!(operator_docs.len(), 1, "{ISTIO_OPERATOR}");
    let operator = &operator_docs[0];
    assert_eq!(operator["apiVersion"], "install.istio.io/v1alpha1", "{ISTIO_OPERATOR}");
    assert_eq!(operator["kind"], "IstioOperator", "{ISTIO_OPERATOR}");
    assert_eq!(operator["metadata"]["namespace"], "istio-system", "{ISTIO_OPERATOR}");
    let spec_keys: Vec<&String> = operator["spec"].as_object().expect("spec").keys().collect();
    assert_eq!(spec_keys, vec!["meshConfig"], "{ISTIO_OPERATOR}: only meshConfig");
    let provider = check_extension_providers(&operator["spec"]["meshConfig"]["extensionProviders"], ISTIO_OPERATOR);

    // Helm values for the istiod chart: the same entry under meshConfig.
    let values_docs = yaml_documents(&repo_root().join(ISTIO_HELM_VALUES));
    assert_eq!(values_docs.len(), 1, "{ISTIO_HELM_VALUES}");
    let values = &values_docs[0];
    let top: Vec<&String> = values.as_object().expect("a mapping").keys().collect();
    assert_eq!(top, vec!["meshConfig"], "{ISTIO_HELM_VALUES}: istiod chart values");
    let helm_provider = check_extension_providers(&values["meshConfig"]["extensionProviders"], ISTIO_HELM_VALUES);
    assert_eq!(
        helm_provider, provider,
        "the Helm values and the IstioOperator must register the same provider"
    );

    // The provider reaches the Service of deploy/istio/audgate.yaml on its grpc port.
    let manifest = yaml_documents(&repo_root().join(ISTIO_MANIFEST));
    let service = find_object(&manifest, "Service", "audgate");
    let host = format!(
        "{}.{}.svc.cluster.local",
        service["metadata"]["name"].as_str().expect("name"),
        service["metadata"]["namespace"].as_str().expect("namespace")
    );
    let grpc = &provider["envoyExtAuthzGrpc"];
    assert_eq!(
        grpc["service"], host,
        "{ISTIO_OPERATOR}: service must be the audgate Service's host"
    );
    let grpc_port = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("a grpc port");
    assert_eq!(
        grpc["port"], grpc_port["port"],
        "{ISTIO_OPERATOR}: port must be the Service's grpc port"
    );

    // The AuthorizationPolicies use it; one at the gateway, one at a workload.
    let name = provider["name"].as_str().expect("name");
    let gateway = yaml_documents(&repo_root().join(POLICY_GATEWAY));
    assert_eq!(gateway.len(), 1);
    check_authorization_policy(&gateway[0], POLICY_GATEWAY, name);
    assert_eq!(gateway[0]["metadata"]["namespace"], "istio-system", "{POLICY_GATEWAY}");
    assert_eq!(gateway[0]["spec"]["selector"]["matchLabels"]["istio"], "ingressgateway");
    let workload = yaml_documents(&repo_root().join(POLICY_WORKLOAD));
    assert_eq!(workload.len(), 1);
    check_authorization_policy(&workload[0], POLICY_WORKLOAD, name);
    assert!(workload[0]["spec"]["selector"]["matchLabels"]["app"].is_string());

    // The hosts the gateway policy selects have routes in the Istio config.
    let config = read("deploy/kubernetes/overlays/istio/audgate.yaml");
    for rule in gateway[0]["spec"]["rules"].as_array().expect("rules") {
        for to in rule["to"].as_array().into_iter().flatten() {
            for host in to["operation"]["hosts"].as_array().into_iter().flatten() {
                let host = host.as_str().expect("a host");
                assert!(
                    config.contains(host),
                    "no audgate route names host {host} the gateway sends"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// audgate configs
// ---------------------------------------------------------------------------------------------

#[test]
fn deploy_configs_pass_check_config() {
    for path in [
        "deploy/kubernetes/base/audgate.yaml",
        "deploy/kubernetes/overlays/istio/audgate.yaml",
    ] {
        check_config(&repo_root().join(path), path, false);
    }
    // And the copy in the rendered manifest, as the pod will read it.
    let manifest = yaml_documents(&repo_root().join(ISTIO_MANIFEST));
    let text = find_object(&manifest, "ConfigMap", "audgate-config")["data"]["audgate.yaml"]
        .as_str()
        .expect("data.audgate.yaml")
        .to_owned();
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("audgate.yaml");
    std::fs::write(&path, text).expect("write the config");
    check_config(&path, &format!("{ISTIO_MANIFEST} (ConfigMap audgate-config)"), false);
}

/// The Envoy files and the base config agree: every context extension names a route, the
/// http_service path prefix is the config's, the ports are the config's listeners.
#[test]
fn envoy_files_agree_with_the_base_config() {
    let config = &yaml_documents(&repo_root().join("deploy/kubernetes/base/audgate.yaml"))[0];
    let routes: BTreeSet<&str> = config["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    let grpc = yaml_documents(&repo_root().join("deploy/envoy/envoy.yaml"));
    let text = serde_json::to_string(&grpc).expect("JSON");
    let mut named = 0;
    for piece in text.split("\"audgate.route\":\"").skip(1) {
        let route = piece.split('"').next().unwrap_or_default();
        assert!(
            routes.contains(route),
            "deploy/envoy/envoy.yaml names route {route}, the base config has {routes:?}"
        );
        named += 1;
    }
    assert!(named > 0, "deploy/envoy/envoy.yaml shows no context extension");
    assert!(text.contains(&format!("\"port_value\":{}", listen_port(config, "grpc"))));

    let http = yaml_documents(&repo_root().join("deploy/envoy/envoy-http-service.yaml"));
    let text = serde_json::to_string(&http).expect("JSON");
    let prefix = config["http_endpoint"]["path_prefix"]
        .as_str()
        .expect("http_endpoint.path_prefix");
    assert!(
        text.contains(&format!("\"path_prefix\":\"{prefix}\"")),
        "http_service path_prefix"
    );
    assert!(text.contains(&format!("\"port_value\":{}", listen_port(config, "http"))));
    assert!(text.contains(&format!("\"port_value\":{}", listen_port(config, "admin"))));
}

// ---------------------------------------------------------------------------------------------
// deploy/envoy, for real
// ---------------------------------------------------------------------------------------------

const BASE_ISSUER_ORIGIN: &str = "https://sso.example.com";

/// `text` with each `(from, to)` replaced, every `from` present exactly once.
fn replace_once(text: &str, file: &str, replacements: &[(&str, String)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in replacements {
        assert_eq!(
            out.matches(from).count(),
            1,
            "{file}: expected `{from}` exactly once (the test adapts the file by it)"
        );
        out = out.replace(from, to);
    }
    out
}

struct EnvoyRun {
    envoy: Envoy,
    audgate: Audgate,
    _echo: EchoServer,
    issuer: IssuerServer,
    client: reqwest::Client,
}

impl EnvoyRun {
    /// audgate with deploy/kubernetes/base/audgate.yaml (issuer swapped for a local one), and
    /// Envoy with `file` adapted by `adapt` to the loopback ports.
    async fn start(key: &TestKey, file: &str, adapt: impl FnOnce(&str, &Audgate, &EnvoyPorts) -> String) -> Self {
        let issuer = IssuerServer::start_at("/realms/shop", &[key]).await;
        let origin = format!("http://{}", issuer.addr());
        let config = localize_deploy_config(
            &read("deploy/kubernetes/base/audgate.yaml"),
            BASE_ISSUER_ORIGIN,
            &origin,
        );
        let echo = EchoServer::start().await;
        let audgate = Audgate::start(&config).await;
        audgate.wait_ready().await;
        let ports = EnvoyPorts {
            listen: free_port(),
            admin: free_port(),
            audgate_grpc: audgate.ports.grpc,
            upstream: echo.port(),
        };
        let rendered = adapt(&read(file), &audgate, &ports);
        let envoy = Envoy::start_rendered(ports, &rendered).await;
        Self {
            envoy,
            audgate,
            _echo: echo,
            issuer,
            client: common::http_client(),
        }
    }

    async fn get(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Reply {
        let auth = token.map(common::bearer);
        let mut all: Vec<(&str, &str)> = Vec::new();
        if let Some(auth) = &auth {
            all.push(("authorization", auth.as_str()));
        }
        all.extend_from_slice(headers);
        common::send(&self.client, "GET", &format!("{}{path}", self.envoy.url()), &all).await
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.audgate.logs(), self.envoy.logs())
    }
}

fn orders_token(key: &TestKey, iss: &str) -> String {
    key.mint(merge(
        keycloak_claims(iss, "web-shop"),
        json!({ "aud": ["orders-api", "account"], "scope": "openid orders:read" }),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_envoy_front_proxy_runs_with_the_base_config() {
    let key = TestKey::rsa("base-2026");
    let file = "deploy/envoy/envoy.yaml";
    let run = EnvoyRun::start(&key, file, |text, audgate, ports| {
        replace_once(
            text,
            file,
            &[
                (
                    "socket_address: { address: 0.0.0.0, port_value: 10000 }",
                    format!("socket_address: {{ address: 127.0.0.1, port_value: {} }}", ports.listen),
                ),
                (
                    "socket_address: { address: 127.0.0.1, port_value: 9902 }",
                    format!("socket_address: {{ address: 127.0.0.1, port_value: {} }}", ports.admin),
                ),
                (
                    "socket_address: { address: audgate, port_value: 9191 }",
                    format!(
                        "socket_address: {{ address: 127.0.0.1, port_value: {} }}",
                        audgate.ports.grpc
                    ),
                ),
                (
                    "socket_address: { address: app, port_value: 8080 }",
                    format!(
                        "socket_address: {{ address: 127.0.0.1, port_value: {} }}",
                        ports.upstream
                    ),
                ),
            ],
        )
    })
    .await;
    run.envoy
        .wait_health_check_success("audgate", Duration::from_secs(15), || run.logs())
        .await;
    let iss = run.issuer.issuer_url();

    let token = orders_token(&key, &iss);
    let reply = run
        .get("/api/orders/1", Some(&token), &[("x-auth-subject", "forged")])
        .await;
    assert_eq!(reply.status, 200, "{reply}\n{}", run.logs());
    assert_eq!(reply.upstream("x-auth-client-id").as_deref(), Some("orders-api"));
    assert_ne!(reply.upstream("x-auth-subject").as_deref(), Some("forged"));

    let reply = run.get("/api/orders/1", None, &[]).await;
    assert_eq!(reply.status, 401, "{reply}");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer realm=\"audgate\""));

    let admin = key.mint(merge(
        keycloak_claims(&iss, "admin-console"),
        json!({ "realm_access": { "roles": ["admin"] } }),
    ));
    let reply = run.get("/admin/users", Some(&admin), &[]).await;
    assert_eq!(reply.status, 200, "{reply}");

    let reply = run.get("/elsewhere", Some(&token), &[]).await;
    assert_eq!(reply.status, 403, "{reply}");
    assert_eq!(reply.error_code().as_deref(), Some("no_route"));

    // /healthz skips the check: audgate counts nothing for it.
    let before = run.audgate.metrics().await.sum("audgate_checks_total", &[]);
    let reply = run.get("/healthz", None, &[]).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(run.audgate.metrics().await.sum("audgate_checks_total", &[]), before);

    // The access log carries audgate's decision from the dynamic metadata.
    common::wait_for_log(
        "no decision in the access log",
        Duration::from_secs(5),
        || run.envoy.logs(),
        |logs| logs.contains("audgate_route=orders reason=allowed"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_envoy_http_service_runs_with_the_base_config() {
    let key = TestKey::rsa("base-2026");
    let file = "deploy/envoy/envoy-http-service.yaml";
    let run = EnvoyRun::start(&key, file, |text, audgate, ports| {
        replace_once(
            text,
            file,
            &[
                (
                    "socket_address: { address: 0.0.0.0, port_value: 10000 }",
                    format!("socket_address: {{ address: 127.0.0.1, port_value: {} }}", ports.listen),
                ),
                (
                    "socket_address: { address: 127.0.0.1, port_value: 9902 }",
                    format!("socket_address: {{ address: 127.0.0.1, port_value: {} }}", ports.admin),
                ),
                (
                    "socket_address: { address: audgate, port_value: 9192 }",
                    format!(
                        "socket_address: {{ address: 127.0.0.1, port_value: {} }}",
                        audgate.ports.http
                    ),
                ),
                ("port_value: 9901", format!("port_value: {}", audgate.ports.admin)),
                (
                    "socket_address: { address: app, port_value: 8080 }",
                    format!(
                        "socket_address: {{ address: 127.0.0.1, port_value: {} }}",
                        ports.upstream
                    ),
                ),
            ],
        )
    })
    .await;
    run.envoy
        .wait_health_check_success("audgate_http", Duration::from_secs(15), || run.logs())
        .await;
    let iss = run.issuer.issuer_url();

    // Allowed: the claim headers reach the app, a forged one audgate does not set is removed.
    let token = key.mint(merge(
        keycloak_claims(&iss, "web-shop"),
        json!({ "aud": "orders-api", "scope": "orders:read", "realm_access": null }),
    ));
    let reply = run
        .get(
            "/api/orders/1",
            Some(&token),
            &[("x-auth-subject", "forged"), ("x-auth-roles", "admin")],
        )
        .await;
    assert_eq!(reply.status, 200, "{reply}\n{}", run.logs());
    assert_eq!(reply.upstream("x-auth-client-id").as_deref(), Some("orders-api"));
    assert_ne!(reply.upstream("x-auth-subject").as_deref(), Some("forged"));
    assert_eq!(
        reply.upstream("x-auth-roles"),
        None,
        "a forged claim header reached the app"
    );

    let reply = run.get("/api/orders/1", None, &[]).await;
    assert_eq!(reply.status, 401, "{reply}");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer realm=\"audgate\""));
    assert_eq!(reply.error_code().as_deref(), Some("missing_token"));
}

// ---------------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------------

/// The Envoy-with-the-module image (docs/envoy-filter.md).
#[test]
fn dockerfile_module_passes_hadolint() {
    let out = run(&hadolint(), &["deploy/envoy/Dockerfile.module"]);
    assert!(
        out.ok,
        "hadolint deploy/envoy/Dockerfile.module ({}):\n{}{}",
        out.status, out.stdout, out.stderr
    );
    let text = read("deploy/envoy/Dockerfile.module");
    for needed in [
        "cargo build --release --locked -p audgate-envoy",
        "ENVOY_DYNAMIC_MODULES_SEARCH_PATH",
        "COPY crates ./crates",
    ] {
        assert!(text.contains(needed), "deploy/envoy/Dockerfile.module lacks {needed}");
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let out = run(&hadolint(), &["Dockerfile"]);
    assert!(
        out.ok,
        "hadolint Dockerfile ({}):\n{}{}",
        out.status, out.stdout, out.stderr
    );
}

/// Dockerfile instructions with continuation lines joined and comments dropped.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (instruction, args) = current.split_once(' ').unwrap_or((current.as_str(), ""));
        out.push((instruction.to_ascii_uppercase(), args.trim().to_owned()));
        current.clear();
    }
    out
}

fn version_tuple(text: &str) -> Vec<u32> {
    text.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_ships_the_binary_only() {
    let instructions = dockerfile_instructions();
    let froms: Vec<(usize, &String)> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, (_, a))| (n, a))
        .collect();
    assert_eq!(froms.len(), 2, "a builder stage and a runtime stage: {froms:?}");
    let builder = froms[0].1;
    assert!(
        builder.contains("rust:") && builder.to_ascii_lowercase().ends_with(" as build"),
        "first stage: the Rust toolchain, named build: {builder}"
    );
    let runtime_image = froms[1].1;
    assert!(!runtime_image.contains(" AS "), "{runtime_image}");
    assert!(
        runtime_image.starts_with("gcr.io/distroless/") && runtime_image.ends_with(":nonroot"),
        "runtime: distroless, nonroot: {runtime_image}"
    );
    for (instruction, args) in &instructions {
        if instruction == "FROM" {
            assert!(!args.contains(":latest"), "pin image tags: {args}");
        }
        if instruction == "ADD" {
            assert!(!args.contains("://"), "no ADD of URLs: {args}");
        }
    }

    // The toolchain is at least Cargo.toml's rust-version.
    let rust_version = instructions
        .iter()
        .find_map(|(i, a)| (i == "ARG").then(|| a.strip_prefix("RUST_VERSION=")).flatten())
        .expect("ARG RUST_VERSION=...");
    let cargo = read("Cargo.toml");
    let required = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("Cargo.toml rust-version");
    assert!(
        version_tuple(rust_version) >= version_tuple(&required),
        "Dockerfile RUST_VERSION {rust_version} < Cargo.toml rust-version {required}"
    );

    // Builder: a locked release build of the binary, from files that exist and that
    // .dockerignore lets into the context.
    let build_stage = &instructions[froms[0].0..froms[1].0];
    let run_build = build_stage
        .iter()
        .find(|(i, a)| i == "RUN" && a.contains("cargo build"))
        .expect("RUN cargo build");
    for flag in ["--release", "--locked", "--bin audgate"] {
        assert!(run_build.1.contains(flag), "cargo build {flag}: {}", run_build.1);
    }
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    for must in ["target", ".git", ".venv"] {
        assert!(ignored.iter().any(|i| i == must), ".dockerignore must exclude {must}");
    }
    for (_, args) in build_stage.iter().filter(|(i, _)| i == "COPY") {
        let parts: Vec<&str> = args.split_whitespace().collect();
        for source in &parts[..parts.len() - 1] {
            assert!(repo_root().join(source).exists(), "COPY {source}: no such file");
            assert!(
                !ignored
                    .iter()
                    .any(|i| i == source || (i.starts_with("*.") && source.ends_with(&i[1..]))),
                ".dockerignore excludes {source}, which the build copies"
            );
        }
    }
    for needed in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "proto"] {
        assert!(
            build_stage
                .iter()
                .any(|(i, a)| i == "COPY" && a.split_whitespace().any(|s| s.trim_end_matches('/') == needed)),
            "the build stage does not copy {needed}"
        );
    }

    // Runtime: the binary only, a numeric non-root user, exec-form entrypoint, the ports.
    let runtime = &instructions[froms[1].0 + 1..];
    let copies: Vec<&String> = runtime.iter().filter(|(i, _)| i == "COPY").map(|(_, a)| a).collect();
    assert_eq!(copies.len(), 1, "the runtime stage copies one thing: {copies:?}");
    assert!(
        copies[0].starts_with("--from=build ") && copies[0].ends_with("/usr/local/bin/audgate"),
        "{}",
        copies[0]
    );
    assert!(
        runtime.iter().all(|(i, _)| i != "RUN"),
        "nothing runs in the runtime stage"
    );
    let user = runtime
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.as_str())
        .expect("USER");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER must be a numeric non-root uid (runAsNonRoot checks it): {user}"
    );
    let deployment = read("deploy/kubernetes/base/deployment.yaml");
    assert!(
        deployment.contains(&format!("runAsUser: {uid}")),
        "the Deployment runs as the image's user {uid}"
    );
    let entrypoint = runtime
        .iter()
        .find(|(i, _)| i == "ENTRYPOINT")
        .map(|(_, a)| a)
        .expect("ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(entrypoint, vec!["/usr/local/bin/audgate"]);
    let exposed: BTreeSet<&str> = runtime
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace())
        .collect();
    assert_eq!(exposed, BTreeSet::from(["9191", "9192", "9901"]));
}

/// The binary links only what distroless/cc ships (glibc, libgcc, libm): a dependency that
/// pulls in OpenSSL or another shared library would break the image at start.
#[test]
fn binary_needs_only_what_the_runtime_image_has() {
    let binary = common::audgate_binary();
    let out = run(Path::new("ldd"), &[&binary.display().to_string()]);
    assert!(out.ok, "ldd {} failed: {}{}", binary.display(), out.stdout, out.stderr);
    let allowed = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
    ];
    for line in out.stdout.lines() {
        let lib = line.split_whitespace().next().unwrap_or_default();
        let name = lib.rsplit('/').next().unwrap_or(lib);
        assert!(
            allowed.contains(&name),
            "audgate links {name}, which gcr.io/distroless/cc lacks:\n{}",
            out.stdout
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Docs
// ---------------------------------------------------------------------------------------------

/// A fenced block of a Markdown file, with the `<!-- check: ... -->` comment right before it.
struct Block {
    lang: String,
    text: String,
    line: usize,
    marker: Option<String>,
}

fn fenced_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut last_comment: Option<String> = None;
    let mut open: Option<Block> = None;
    for (n, line) in markdown.lines().enumerate() {
        if let Some(block) = open.as_mut() {
            if line.trim_start().starts_with("```") {
                blocks.push(open.take().expect("an open block"));
            } else {
                block.text.push_str(line);
                block.text.push('\n');
            }
            continue;
        }
        let trimmed = line.trim();
        if let Some(lang) = trimmed.strip_prefix("```") {
            open = Some(Block {
                lang: lang.trim().to_owned(),
                text: String::new(),
                line: n + 2,
                marker: last_comment.take(),
            });
        } else if let Some(marker) = trimmed.strip_prefix("<!-- check:").and_then(|m| m.strip_suffix("-->")) {
            last_comment = Some(marker.trim().to_owned());
        } else if !trimmed.is_empty() {
            last_comment = None;
        }
    }
    assert!(open.is_none(), "an unclosed code fence");
    blocks
}

/// What a fragment is completed with: an issuer when it has none, a route when it has none.
const FRAGMENT_ISSUERS: &str =
    "issuers:\n  keycloak:\n    issuer: https://sso.example.com/realms/shop\n    discovery: true\n";
const FRAGMENT_ROUTES: &str =
    "routes:\n  - name: orders\n    match: { path_prefix: /api/orders }\n    client_ids: [orders-api]\n";

/// Checks every YAML (and JSON) block of a Markdown file. YAML blocks are audgate configs
/// unless marked: `<!-- check: fragment -->` (completed with an issuer and a route as needed),
/// `<!-- check: warns -->` (check-config must warn), `<!-- check: cases ... -->` (an
/// `audgate test` cases file for the last whole config before it), `<!-- check: none ... -->`
/// (not audgate's). Returns how many configs and case files were checked.
fn check_markdown(file: &str, markdown: &str) -> (usize, usize) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut last_config: Option<PathBuf> = None;
    let (mut configs, mut cases) = (0, 0);
    for (index, block) in fenced_blocks(markdown).into_iter().enumerate() {
        let origin = format!("{file}:{} (block {})", block.line, index + 1);
        if block.lang == "json" {
            serde_json::from_str::<Value>(&block.text).unwrap_or_else(|e| panic!("{origin}: not JSON: {e}"));
            continue;
        }
        if block.lang != "yaml" {
            continue;
        }
        let marker = block.marker.clone().unwrap_or_else(|| "config".to_owned());
        let words: Vec<&str> = marker.split_whitespace().collect();
        match words.first().copied() {
            Some("none") => continue,
            Some("cases") => {
                let config = last_config
                    .as_ref()
                    .unwrap_or_else(|| panic!("{origin}: test cases without a config before them"));
                let path = dir.path().join(format!("cases-{index}.yaml"));
                std::fs::write(&path, &block.text).expect("write the cases");
                let out = run(
                    &common::audgate_binary(),
                    &[
                        "test",
                        "--config",
                        &config.display().to_string(),
                        &path.display().to_string(),
                    ],
                );
                assert!(
                    out.ok,
                    "{origin}: audgate test failed ({}):\n{}{}",
                    out.status, out.stdout, out.stderr
                );
                assert!(out.stdout.contains(" passed, 0 failed"), "{origin}:\n{}", out.stdout);
                cases += 1;
            }
            Some("config" | "fragment" | "warns") => {
                let fragment = words.contains(&"fragment");
                let mut text = block.text.clone();
                if fragment {
                    let doc = yaml_documents_str(&text, &origin);
                    let keys = doc.first().and_then(Value::as_object).cloned().unwrap_or_default();
                    if !keys.contains_key("issuers") {
                        text = format!("{FRAGMENT_ISSUERS}{text}");
                    }
                    if !keys.contains_key("routes") {
                        text = format!("{text}{FRAGMENT_ROUTES}");
                    }
                }
                let path = dir.path().join(format!("config-{index}.yaml"));
                std::fs::write(&path, &text).expect("write the config");
                check_config(&path, &origin, words.contains(&"warns"));
                if !fragment {
                    last_config = Some(path);
                }
                configs += 1;
            }
            _ => panic!("{origin}: unknown marker `<!-- check: {marker} -->`"),
        }
    }
    (configs, cases)
}

#[test]
fn keycloak_doc_snippets_pass_check_config() {
    let file = "docs/keycloak.md";
    let markdown = read(file);
    let (configs, cases) = check_markdown(file, &markdown);
    assert!(
        configs >= 8,
        "{file}: only {configs} configs checked; the markers may be wrong"
    );
    assert!(cases >= 1, "{file}: the test cases were not run");
    check_links(file, &markdown);
    for topic in [
        "kcadm.sh",
        "/admin/realms/",
        "oidc-audience-mapper",
        "client_id_claims: [aud, azp]",
        "/auth/realms/",
        "issuer_aliases",
        "use: enc",
        "required_roles",
        "service-account",
        "audgate explain",
        "audgate doctor",
    ] {
        assert!(markdown.contains(topic), "{file} no longer covers {topic}");
    }
}

#[test]
fn readme_deploy_section_links_and_configs_hold() {
    let readme = read("README.md");
    let start = readme
        .find("\n## Deploy\n")
        .expect("README.md has a `## Deploy` section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    let section = &rest[..end];
    let links = check_links("README.md", section);
    assert!(links >= 5, "the Deploy section links {links} files");
    for path in [
        "deploy/kubernetes/base",
        "deploy/kubernetes/overlays/istio",
        "deploy/istio/audgate.yaml",
        "deploy/istio/extension-provider.istiooperator.yaml",
        "deploy/envoy/envoy.yaml",
        "docs/keycloak.md",
        "Dockerfile",
    ] {
        assert!(
            section.contains(path),
            "README's Deploy section does not mention {path}"
        );
    }
    check_markdown("README.md (Deploy)", section);
    // The image it names is the Dockerfile's.
    let rust_version = dockerfile_instructions()
        .iter()
        .find_map(|(i, a)| {
            (i == "ARG")
                .then(|| a.strip_prefix("RUST_VERSION=").map(str::to_owned))
                .flatten()
        })
        .expect("ARG RUST_VERSION=...");
    assert!(
        section.contains(&format!("rust:{rust_version}-bookworm")),
        "README's Deploy section names another Rust image than the Dockerfile ({rust_version})"
    );
}

// ---------------------------------------------------------------------------------------------
// Inventory
// ---------------------------------------------------------------------------------------------

/// Directories under deploy/ whose files another test file checks and inventories itself.
const CHECKED_ELSEWHERE: [(&str, &str); 2] = [
    ("deploy/helm/", "tests/helm.rs"),
    ("deploy/observability/", "tests/observability.rs"),
];

#[test]
fn every_deploy_file_is_checked() {
    let root = repo_root();
    let found: BTreeSet<String> = relative_files(&root, &root.join("deploy"))
        .into_iter()
        .filter(|p| !CHECKED_ELSEWHERE.iter().any(|(dir, _)| p.starts_with(dir)))
        .collect();
    let listed: BTreeSet<String> = DEPLOY_FILES.iter().map(|(f, _)| (*f).to_owned()).collect();
    let unchecked: Vec<&String> = found.difference(&listed).collect();
    assert!(
        unchecked.is_empty(),
        "files under deploy/ that no test checks (add a check and list them in DEPLOY_FILES): {unchecked:?}"
    );
    let missing: Vec<&String> = listed.difference(&found).collect();
    assert!(
        missing.is_empty(),
        "DEPLOY_FILES lists files that do not exist: {missing:?}"
    );
}
