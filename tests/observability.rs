//! deploy/observability/: the Grafana dashboard and the alerts, checked for real.
//!
//! - `promtool check rules` on the rules file, and `promtool test rules` on its unit tests, which
//!   must have, for every alert, a case where it fires and one where it stays quiet;
//! - the PrometheusRule is the rules file (scripts/render-observability.sh writes it);
//! - every metric the dashboard and the alerts name is one of SPEC.md's;
//! - a real Prometheus scrapes a real audgate under traffic (allows, denials, dry-run denials,
//!   errors from an issuer whose keys never load, cache hits, a rejected and an accepted config
//!   reload): every dashboard query returns data, and every alert expression evaluates.
//!
//! Prometheus and promtool come from scripts/install-prometheus.sh (Debian's package).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::deploy::{check_links, read, relative_files, run};
use common::{
    Audgate, CheckCall, IssuerServer, Prometheus, TestKey, keycloak_claims, merge, repo_root, yaml_documents_str,
};
use serde_json::{Value, json};

const DIR: &str = "deploy/observability";
const RULES: &str = "deploy/observability/audgate-rules.yaml";
const RULE_TESTS: &str = "deploy/observability/audgate-rules.test.yaml";
const PROMETHEUS_RULE: &str = "deploy/observability/audgate-prometheusrule.yaml";
const DASHBOARD: &str = "deploy/observability/audgate-dashboard.json";

/// Every file of deploy/observability and what checks it.
const FILES: &[(&str, &str)] = &[
    (
        "audgate-rules.yaml",
        "promtool check rules; unit tests; evaluated by a real Prometheus",
    ),
    (
        "audgate-rules.test.yaml",
        "promtool test rules; one firing and one quiet case per alert",
    ),
    (
        "audgate-prometheusrule.yaml",
        "PrometheusRule structure; spec equals the rules file",
    ),
    (
        "audgate-dashboard.json",
        "every query returns data from a real Prometheus scraping audgate",
    ),
];

/// SPEC.md's "Metrics" table (a histogram also exposes _bucket, _count and _sum).
const SPEC_METRICS: [&str; 8] = [
    "audgate_checks_total",
    "audgate_check_duration_seconds",
    "audgate_jwks_refresh_total",
    "audgate_jwks_keys",
    "audgate_token_cache_hits_total",
    "audgate_token_cache_misses_total",
    "audgate_config_reloads_total",
    "audgate_config_info",
];

/// `promtool ARGS` from the repository root: (success, stdout and stderr).
fn promtool(args: &[&str]) -> (bool, String) {
    let out = run(&common::promtool_binary(), args);
    (out.ok, format!("{}{}", out.stdout, out.stderr))
}

fn rules() -> Vec<Value> {
    let doc = &yaml_documents_str(&read(RULES), RULES)[0];
    doc["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn alert_names() -> BTreeSet<String> {
    rules()
        .iter()
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect()
}

/// The `audgate_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("audgate_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

fn is_spec_metric(name: &str) -> bool {
    SPEC_METRICS.contains(&name)
        || ["_bucket", "_count", "_sum"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| base == "audgate_check_duration_seconds")
        })
}

/// The dashboard's queries: (panel title, expr).
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let mut panels: Vec<Value> = dashboard["panels"].as_array().expect("panels").clone();
    let mut queries = Vec::new();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a Prometheus target has an expr");
            queries.push((panel["title"].as_str().unwrap_or_default().to_owned(), expr.to_owned()));
        }
    }
    queries.reverse();
    queries
}

/// A dashboard query as Grafana sends it: the variables filled in (all instances; the
/// test's Prometheus scrapes every second, so 10 s windows hold several samples).
fn grafana_expr(expr: &str) -> String {
    let filled = expr
        .replace("$__rate_interval", "10s")
        .replace("$instance", ".*")
        .replace("$job", "audgate");
    assert!(!filled.contains('$'), "a variable the test does not fill: {expr}");
    filled
}

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    let (ok, text) = promtool(&["check", "rules", RULES]);
    assert!(ok, "promtool check rules {RULES}:\n{text}");
    let (ok, text) = promtool(&["test", "rules", RULE_TESTS]);
    assert!(ok, "promtool test rules {RULE_TESTS}:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");

    // Every alert has a case that fires and one that stays quiet.
    let tests = &yaml_documents_str(&read(RULE_TESTS), RULE_TESTS)[0];
    assert_eq!(tests["rule_files"], json!(["audgate-rules.yaml"]), "{RULE_TESTS}");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for group in tests["tests"].as_array().expect("tests") {
        for case in group["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fires.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let alerts = alert_names();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for alert in &alerts {
        assert!(fires.contains(alert), "{RULE_TESTS}: no case where {alert} fires");
        assert!(quiet.contains(alert), "{RULE_TESTS}: no case where {alert} stays quiet");
    }
    let unknown: Vec<&String> = fires.union(&quiet).filter(|a| !alerts.contains(*a)).collect();
    assert!(
        unknown.is_empty(),
        "{RULE_TESTS} tests alerts that do not exist: {unknown:?}"
    );
}

/// The issue's alerts exist, each with a severity, a summary, a description and a runbook
/// anchor in docs/observability.md.
#[test]
fn alerts_cover_the_issue_and_link_their_runbook() {
    let alerts = alert_names();
    for wanted in [
        "AudgateDenyRateJump",
        "AudgateJWKSRefreshFailing",
        "AudgateIssuerWithoutKeys",
        "AudgateConfigReloadFailed",
        "AudgateCheckLatencyHigh",
        "AudgateDown",
        "AudgateNotReady",
    ] {
        assert!(alerts.contains(wanted), "no alert {wanted}");
    }
    let docs = read("docs/observability.md");
    for rule in rules() {
        let name = rule["alert"].as_str().expect("only alerting rules");
        assert!(
            ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap_or_default()),
            "{name}: severity"
        );
        for key in ["summary", "description", "runbook"] {
            assert!(rule["annotations"][key].is_string(), "{name}: annotation {key}");
        }
        let anchor = format!("docs/observability.md#{}", name.to_lowercase());
        assert_eq!(rule["annotations"]["runbook"], anchor.as_str(), "{name}: runbook");
        assert!(
            docs.contains(&format!("### {name}")),
            "docs/observability.md has no runbook section `### {name}`"
        );
        for metric in metric_names(rule["expr"].as_str().expect("expr")) {
            assert!(
                is_spec_metric(&metric),
                "{name}: {metric} is not in SPEC.md's Metrics table"
            );
        }
    }
}

#[test]
fn prometheusrule_is_the_rules_file() {
    let docs = yaml_documents_str(&read(PROMETHEUS_RULE), PROMETHEUS_RULE);
    assert_eq!(docs.len(), 1, "{PROMETHEUS_RULE}");
    let rule = &docs[0];
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert!(rule["metadata"]["name"].is_string());
    let keys: Vec<&String> = rule["spec"].as_object().expect("spec").keys().collect();
    assert_eq!(keys, vec!["groups"], "{PROMETHEUS_RULE}: spec");
    let source = &yaml_documents_str(&read(RULES), RULES)[0];
    assert!(
        &rule["spec"] == source,
        "{PROMETHEUS_RULE} is not {RULES}: run scripts/render-observability.sh"
    );
}

#[test]
fn dashboard_is_grafana_json_over_spec_metrics() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("JSON");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, BTreeSet::from(["datasource", "instance", "job"]));
    let queries = dashboard_queries();
    let mut used = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(ids.insert(panel["id"].as_u64().expect("id")), "duplicate panel id");
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        }
    }
    for (title, expr) in &queries {
        for metric in metric_names(expr) {
            assert!(
                is_spec_metric(&metric),
                "{title}: {metric} is not in SPEC.md's Metrics table"
            );
            used.insert(metric);
        }
    }
    // Every SPEC metric is on the dashboard.
    for metric in SPEC_METRICS {
        assert!(
            used.iter()
                .any(|u| u == metric || u.strip_prefix(metric).is_some_and(|s| s.starts_with('_'))),
            "the dashboard never shows {metric}"
        );
    }
    // The panels the issue asks for.
    let titles: Vec<&str> = queries.iter().map(|(t, _)| t.as_str()).collect();
    for wanted in [
        "Decisions by route and reason",
        "Deny rate",
        "Check latency quantiles",
        "JWKS refresh errors",
        "JWKS keys by issuer",
        "Token cache hit ratio",
        "Config reloads",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted:?}: {titles:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus, a real audgate, traffic
// ---------------------------------------------------------------------------------------------

const ORIGIN_DEAD: &str = "http://127.0.0.1:9/realms/gone";

fn traffic_config(issuer: &IssuerServer, marker: &str) -> String {
    format!(
        r#"# {marker}
issuers:
  keycloak:
    issuer: {iss}
    jwks_uri: {jwks}
    refresh_interval: 2s
    min_refresh_interval: 1s
  gone:                      # never reachable: its checks are errors, its refreshes fail
    issuer: {ORIGIN_DEAD}
    jwks_uri: {ORIGIN_DEAD}/protocol/openid-connect/certs
    refresh_interval: 1s
    min_refresh_interval: 1s
routes:
  - name: orders
    match: {{ path_prefix: /api/orders }}
    issuers: [keycloak]
    client_ids: [orders-api]
  - name: preview
    match: {{ path_prefix: /preview }}
    issuers: [keycloak]
    client_ids: [preview-api]
    mode: dry_run
  - name: legacy
    match: {{ path_prefix: /legacy }}
    issuers: [gone]
    client_ids: [legacy-api]
default: deny
"#,
        iss = issuer.issuer_url(),
        jwks = issuer.jwks_uri(),
    )
}

/// Checks through gRPC until `stop`: allows (one token, so cache hits), denials
/// (audience_mismatch, missing_token, no_route), dry-run denials and keys_unavailable errors.
async fn send_traffic(grpc: common::GrpcAuthz, tokens: [String; 3], stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let [good, other_audience, gone] = tokens;
    const HOST: &str = "shop.example.com";
    while !stop.load(Ordering::Relaxed) {
        let calls = [
            CheckCall::get(HOST, "/api/orders/1").bearer(&good),
            CheckCall::get(HOST, "/api/orders/2").bearer(&good),
            CheckCall::get(HOST, "/api/orders/3").bearer(&good),
            CheckCall::get(HOST, "/api/orders/4").bearer(&other_audience),
            CheckCall::get(HOST, "/api/orders/5"),
            CheckCall::get(HOST, "/preview/x").bearer(&good),
            CheckCall::get(HOST, "/legacy/y").bearer(&gone),
            CheckCall::get(HOST, "/nowhere").bearer(&good),
        ];
        for call in &calls {
            grpc.check(call).await.expect("a check over gRPC");
            sent.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    common::prometheus_binary();
    let key = TestKey::rsa("dashboard-rsa");
    let issuer = IssuerServer::start_at("/realms/shop", &[&key]).await;
    let audgate = Audgate::start(&traffic_config(&issuer, "first")).await;
    audgate
        .wait_metric(
            "audgate_jwks_keys",
            &[("issuer", "keycloak")],
            Duration::from_secs(20),
            |v| v >= 1.0,
        )
        .await;
    let prometheus = Prometheus::start(&format!("127.0.0.1:{}", audgate.ports.admin), Duration::from_secs(1)).await;
    prometheus.wait_target_up(Duration::from_secs(20)).await;

    let iss = issuer.issuer_url();
    let good = key.mint(merge(
        keycloak_claims(&iss, "web-shop"),
        json!({"aud": ["orders-api", "account"]}),
    ));
    let other_audience = key.mint(keycloak_claims(&iss, "web-shop"));
    let gone = key.mint(keycloak_claims(ORIGIN_DEAD, "web-shop"));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = tokio::spawn(send_traffic(
        audgate.grpc().await,
        [good, other_audience, gone],
        stop.clone(),
        sent.clone(),
    ));

    // A rejected config, then an accepted one: both reload results move.
    audgate.replace_config("routes: [ this is not a config\n");
    audgate
        .wait_metric(
            "audgate_config_reloads_total",
            &[("result", "error")],
            Duration::from_secs(20),
            |v| v >= 1.0,
        )
        .await;
    audgate.replace_config(&traffic_config(&issuer, "second"));
    audgate
        .wait_metric(
            "audgate_config_reloads_total",
            &[("result", "ok")],
            Duration::from_secs(20),
            |v| v >= 1.0,
        )
        .await;

    // Every query returns data (a finite value) once a few scrapes hold the traffic.
    let queries = dashboard_queries();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut pending: Vec<&(String, String)> = queries.iter().collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for query in pending {
            let results = prometheus.query_vector(&grafana_expr(&query.1)).await;
            if !results.iter().any(|(_, v)| v.is_finite()) {
                still.push(query);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let mut report = String::new();
            for (title, expr) in &pending {
                let got = prometheus.query(&grafana_expr(expr)).await;
                report.push_str(&format!("- {title}: {expr}\n  got {got:?}\n"));
            }
            panic!(
                "dashboard queries without data after {} checks:\n{report}\naudgate /metrics:\n{}",
                sent.load(Ordering::Relaxed),
                audgate.admin_get("/metrics").await.map(|r| r.body).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The data is the traffic's: the route/decision/reason series it made are on the panel.
    let (_, by_reason) = queries
        .iter()
        .find(|(title, _)| title == "Decisions by route and reason")
        .expect("the panel");
    let series: BTreeSet<(String, String, String)> = prometheus
        .query_vector(&grafana_expr(by_reason))
        .await
        .into_iter()
        .map(|(labels, _)| {
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            (get("route"), get("decision"), get("reason"))
        })
        .collect();
    for (route, decision, reason) in [
        ("orders", "allow", "allowed"),
        ("orders", "deny", "audience_mismatch"),
        ("orders", "deny", "missing_token"),
        ("preview", "dry_run_deny", "audience_mismatch"),
        ("legacy", "error", "keys_unavailable"),
        ("-", "deny", "no_route"),
    ] {
        assert!(
            series.contains(&(route.to_owned(), decision.to_owned(), reason.to_owned())),
            "no series {route}/{decision}/{reason} on the panel: {series:?}"
        );
    }
    let (_, ratio) = queries
        .iter()
        .find(|(title, _)| title == "Token cache hit ratio")
        .expect("the panel");
    let hit_ratio = prometheus.query_vector(&grafana_expr(ratio)).await;
    assert!(
        hit_ratio.iter().any(|(_, v)| *v > 0.5 && *v <= 1.0),
        "one token reused: mostly hits, got {hit_ratio:?}"
    );

    // Every alert expression evaluates on this data (the query API fails on an error).
    for rule in rules() {
        let expr = rule["expr"].as_str().expect("expr");
        prometheus.query(expr).await;
    }

    stop.store(true, Ordering::Relaxed);
    traffic.await.expect("the traffic task");
}

// ---------------------------------------------------------------------------------------------
// Inventory
// ---------------------------------------------------------------------------------------------

#[test]
fn every_observability_file_is_checked() {
    let root = repo_root().join(DIR);
    let found = relative_files(&root, &root);
    let listed: BTreeSet<String> = FILES.iter().map(|(f, _)| (*f).to_owned()).collect();
    assert_eq!(found, listed, "FILES must list exactly the files of {DIR}");
}

/// docs/observability.md and docs/helm.md link only to files that exist, and name every file
/// of deploy/observability.
#[test]
fn docs_links_resolve() {
    for file in ["docs/observability.md", "docs/helm.md"] {
        let links = check_links(file, &read(file));
        assert!(links >= 5, "{file}: {links} links");
    }
    let docs = read("docs/observability.md");
    for (name, _) in FILES {
        assert!(docs.contains(name), "docs/observability.md does not name {name}");
    }
}
