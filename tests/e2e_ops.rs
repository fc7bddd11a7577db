//! End-to-end tests of running audgate in production: the HTTP authorization endpoint (through a
//! real Envoy in `http_service` mode, and as nginx `auth_request` / Traefik ForwardAuth would call
//! it), the admin port (`/healthz`, `/readyz`, `/metrics` scraped by a real Prometheus), gRPC
//! health, hot reload (file change, ConfigMap symlink swap, SIGHUP, invalid files), graceful
//! shutdown on SIGTERM, and the decision logs.
//!
//! Needs Envoy 1.40 (`common::envoy_binary()`) and, for the metrics test, Prometheus and
//! promtool (Debian package `prometheus`); without them the tests fail with the install command.
//!
//! Every test starts its own processes on free loopback ports and is independent of the others.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Audgate, AudgateOptions, CheckCall, CheckKind, CheckReply, ConfigLayout, GrpcAuthz, HEALTH_SERVICES, IssuerServer,
    Metrics, Prometheus, Reply, Stack, TestKey, assert_deny, assert_upstream, bearer, free_port, keycloak_claims,
    merge, now, random_hex, str_claim,
};
use serde_json::{Value, json};

/// How long a changed config file may take to be applied (SPEC: "picked up within 5 s"), plus
/// a second of slack for a debug build and the polling itself.
const RELOAD_DEADLINE: Duration = Duration::from_secs(6);
/// How long a SIGHUP may take to be applied ("immediately").
const SIGHUP_DEADLINE: Duration = Duration::from_millis(1500);
/// SIGTERM to process exit (SPEC / brief: within ~10 s).
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// The host tests put on requests that match no host-specific route.
const HOST: &str = "shop.example.test";

// ---------------------------------------------------------------------------------------------
// Configs
// ---------------------------------------------------------------------------------------------

/// The config of the HTTP-endpoint, metrics and log tests (`listen` is added by the harness).
///
/// `http_endpoint.path_prefix: /authz` (Envoy's `http_service` prefix). Tokens come from
/// `Authorization` or the `session` cookie. Routes, in match order:
/// - `health` (`/health`): anonymous;
/// - `strict` (`/strict`): `my-app` in `aud` only;
/// - `dry` (`/dry`): `dry_run`, client `nobody` (a Keycloak token would be denied);
/// - `api-host` (host `api.example.test`, `/v1`): `my-app` in `azp`;
/// - `writes` (`/orders`, POST/PUT/DELETE only): `writer-app` in `aud`/`azp`;
/// - `keycloak` (`/app`): `my-app` in `aud`/`azp`.
///
/// `default: deny`.
fn ops_config(issuer: &str) -> String {
    format!(
        r#"
http_endpoint:
  path_prefix: /authz

issuers:
  test:
    issuer: {issuer}
    discovery: true
    refresh_interval: 5m
    min_refresh_interval: 1s
    leeway: 30s

token:
  sources: [authorization, {{cookie: session}}]

claim_headers:
  x-auth-subject: sub
  x-auth-issuer: iss
  x-auth-client-id: $client_id
  x-auth-roles: realm_access.roles
  x-auth-email: email

routes:
  - name: health
    match: {{ path_prefix: /health }}
    allow_anonymous: true
  - name: strict
    match: {{ path_prefix: /strict }}
    client_ids: [my-app]
  - name: dry
    match: {{ path_prefix: /dry }}
    client_ids: [nobody]
    client_id_claims: [aud, azp]
    mode: dry_run
  - name: api-host
    match: {{ hosts: [api.example.test], path_prefix: /v1 }}
    client_ids: [my-app]
    client_id_claims: [azp]
  - name: writes
    match: {{ path_prefix: /orders, methods: [POST, PUT, DELETE] }}
    client_ids: [writer-app]
    client_id_claims: [aud, azp]
  - name: keycloak
    match: {{ path_prefix: /app }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]

# every decision gets a line: the log tests read allows too
logging:
  decisions: all

default: deny
"#
    )
}

/// The config of the reload tests: route `app` (`/app`, client `my-app`) never changes; route
/// `switch` (`/switch`) accepts `switch_client`, which the tests flip between `other-app`
/// (a `my-app` token is denied) and `my-app` (allowed). `extra_routes` is appended to the
/// route list (YAML list items indented by two spaces).
fn reload_config(issuer: &str, switch_client: &str, extra_routes: &str) -> String {
    format!(
        r#"
http_endpoint:
  path_prefix: /authz

issuers:
  test:
    issuer: {issuer}
    discovery: true
    refresh_interval: 5m
    min_refresh_interval: 1s

routes:
  - name: app
    match: {{ path_prefix: /app }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]
  - name: switch
    match: {{ path_prefix: /switch }}
    client_ids: [{switch_client}]
    client_id_claims: [aud, azp]
{extra_routes}
default: deny
"#
    )
}

/// Config files that must not load, each with a change that would flip `/switch` to allow if
/// any part of it were applied.
fn invalid_configs(issuer: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "YAML syntax error",
            format!(
                "{}\n  - name: broken\n    match: {{ path_prefix: [unclosed\n",
                reload_config(issuer, "my-app", "")
            ),
        ),
        (
            "a route with neither client_ids nor allow_anonymous",
            reload_config(
                issuer,
                "my-app",
                "  - name: incomplete\n    match: { path_prefix: /incomplete }\n",
            ),
        ),
        (
            "an issuer allowing alg none",
            reload_config(issuer, "my-app", "").replace(
                "    min_refresh_interval: 1s\n",
                "    min_refresh_interval: 1s\n    algorithms: [none]\n",
            ),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------------------------

/// `x-envoy-auth-headers-to-remove` of an HTTP-endpoint reply, lower-cased and trimmed.
fn headers_to_remove(reply: &Reply) -> Vec<String> {
    reply
        .header("x-envoy-auth-headers-to-remove")
        .unwrap_or_default()
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .collect()
}

/// An allow straight from audgate's HTTP endpoint: exactly 200, these claim headers in the
/// response, and every configured claim header it does not set named in
/// `x-envoy-auth-headers-to-remove` (and none that it sets).
fn assert_http_allow(reply: &Reply, expected: &[(&str, Option<&str>)], context: &str) {
    assert_eq!(reply.status, 200, "{context}: an allow is exactly 200\nreply:\n{reply}");
    let remove = headers_to_remove(reply);
    for (name, want) in expected {
        assert_eq!(
            reply.header(name),
            *want,
            "{context}: response header {name}\nreply:\n{reply}"
        );
        match want {
            Some(_) => assert!(
                !remove.iter().any(|h| h == name),
                "{context}: {name} is set and must not be in x-envoy-auth-headers-to-remove\nreply:\n{reply}"
            ),
            None => assert!(
                remove.iter().any(|h| h == name),
                "{context}: {name} is not set, so x-envoy-auth-headers-to-remove must name it\nreply:\n{reply}"
            ),
        }
    }
}

/// A gRPC allow.
fn assert_grpc_allow(reply: &CheckReply, context: &str) {
    assert!(reply.is_allow(), "{context}: expected an allow\n{reply}");
}

/// A gRPC deny with this HTTP status and reason.
fn assert_grpc_deny(reply: &CheckReply, status: u16, reason: &str, context: &str) {
    assert!(
        reply.kind == CheckKind::Denied && reply.grpc_code != 0 && reply.status == status,
        "{context}: expected a {status} deny ({reason})\n{reply}"
    );
    assert_eq!(reply.error_code().as_deref(), Some(reason), "{context}\n{reply}");
}

/// The `hash` label of the single `audgate_config_info` series whose value is 1.
fn config_hash(metrics: &Metrics) -> String {
    let loaded: Vec<_> = metrics
        .series("audgate_config_info")
        .into_iter()
        .filter(|s| s.value == 1.0)
        .collect();
    assert_eq!(
        loaded.len(),
        1,
        "exactly one audgate_config_info series must be 1 (the loaded config)\n{}",
        metrics.describe("audgate_config_info")
    );
    let hash = loaded[0].labels.get("hash").cloned().unwrap_or_default();
    assert!(
        !hash.is_empty(),
        "audgate_config_info needs a non-empty hash label\n{}",
        metrics.describe("audgate_config_info")
    );
    hash
}

/// Polls (every 100 ms, up to `timeout`) until `probe` returns `Some`; panics with `what` and
/// the last observation otherwise.
async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => {
                if Instant::now() > deadline {
                    panic!("{what}: not reached within {timeout:?}; last observation: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks `path` over gRPC with `token` until it is allowed (`want_allow`) or denied; panics
/// with audgate's logs after `timeout`. Returns how long it took.
async fn wait_decision(
    audgate: &Audgate,
    grpc: &GrpcAuthz,
    path: &str,
    token: &str,
    want_allow: bool,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        let last = grpc.check(&CheckCall::get(HOST, path).bearer(token)).await;
        let done = match &last {
            Ok(reply) => reply.is_allow() == want_allow && (want_allow || reply.kind == CheckKind::Denied),
            Err(_) => false,
        };
        if done {
            return started.elapsed();
        }
        if Instant::now() > deadline {
            let last = last.map_or_else(|e| format!("gRPC error {e:?}"), |r| r.to_string());
            panic!(
                "{path} was not {} within {timeout:?} of the config change\nlast reply: {last}\n{}",
                if want_allow { "allowed" } else { "denied" },
                audgate.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// The parts of the harness these tests add, checked without audgate: the `http_service` Envoy
/// template validates, the Prometheus template passes `promtool check config`, the metrics
/// parser reads the text format, and the issuer's failure and delay switches work.
#[tokio::test(flavor = "multi_thread")]
async fn ops_harness_self_test() {
    // Envoy http_service template.
    let template = std::fs::read_to_string(common::envoy_http_template_path()).expect("read the http template");
    for placeholder in [
        "{{LISTEN_PORT}}",
        "{{ADMIN_PORT}}",
        "{{AUDGATE_HTTP_PORT}}",
        "{{UPSTREAM_PORT}}",
    ] {
        assert!(template.contains(placeholder), "http template lacks {placeholder}");
    }
    let ports = common::EnvoyPorts {
        listen: free_port(),
        admin: free_port(),
        audgate_grpc: 0,
        upstream: free_port(),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("envoy-http.yaml");
    std::fs::write(&path, common::render_envoy_http_config(&ports, free_port())).expect("write the Envoy config");
    let output = common::validate_envoy_config(&path);
    assert!(output.contains("OK"), "unexpected validate output:\n{output}");

    // Prometheus template.
    let path = dir.path().join("prometheus.yml");
    std::fs::write(
        &path,
        common::render_prometheus_config("127.0.0.1:9", Duration::from_secs(1)),
    )
    .expect("write the Prometheus config");
    let output = std::process::Command::new(common::promtool_binary())
        .arg("check")
        .arg("config")
        .arg(&path)
        .output()
        .expect("run promtool check config");
    assert!(
        output.status.success(),
        "promtool check config failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // Metrics parser.
    let metrics = Metrics::parse(
        "# HELP a_total Things.\n# TYPE a_total counter\n\
         a_total{route=\"-\",decision=\"deny\",reason=\"no_route\"} 3\n\
         a_total{route=\"x,y\",decision=\"allow\",reason=\"q\\\"uote\"} 2.5\n\
         b_seconds_bucket{route=\"r\",le=\"+Inf\"} 7\nb_seconds_sum{route=\"r\"} 1e-3\nc 1 1700000000000\n",
    );
    assert_eq!(metrics.sum("a_total", &[]), 5.5);
    assert_eq!(metrics.get("a_total", &[("route", "-")]), Some(3.0));
    assert_eq!(
        metrics.get("a_total", &[("route", "x,y"), ("reason", "q\"uote")]),
        Some(2.5)
    );
    assert_eq!(metrics.get("a_total", &[("route", "nope")]), None);
    assert_eq!(metrics.get("b_seconds_bucket", &[("le", "+Inf")]), Some(7.0));
    assert_eq!(metrics.get("b_seconds_sum", &[]), Some(0.001));
    assert_eq!(metrics.get("c", &[]), Some(1.0));
    assert_eq!(metrics.types.get("a_total").map(String::as_str), Some("counter"));

    // Issuer switches: a failing JWKS endpoint, then a slow one.
    let key = TestKey::ec("harness-ops");
    let issuer = IssuerServer::start(&[&key]).await;
    let client = common::http_client();
    issuer.set_jwks_failure(Some(503));
    let reply = common::get(&client, &issuer.jwks_uri(), "", &[]).await;
    assert_eq!(reply.status, 503, "{reply}");
    issuer.set_jwks_failure(None);
    issuer.set_jwks_delay(Duration::from_millis(300));
    let started = Instant::now();
    let reply = common::get(&client, &issuer.jwks_uri(), "", &[]).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(reply.json()["keys"][0]["kid"], "harness-ops");
    assert_eq!(issuer.jwks_fetches(), 2);
}

// ---------------------------------------------------------------------------------------------
// 1. Envoy http_service mode
// ---------------------------------------------------------------------------------------------

/// Through a real Envoy with ext_authz in `http_service` mode (path prefix `/authz`): allows
/// put the claims on the upstream request, spoofed claim headers are overwritten or removed,
/// denies reach the client with status, challenge and JSON body, and route matching sees the
/// original method, host and path.
#[tokio::test(flavor = "multi_thread")]
async fn envoy_http_service_mode() {
    let rsa = TestKey::rsa("http-rsa");
    let stack = Stack::start_http(&[&rsa], ops_config).await;
    let iss = stack.issuer.issuer_url();
    let claims = keycloak_claims(&iss, "my-app");
    let sub = str_claim(&claims, "sub").to_owned();
    let token = rsa.mint(claims.clone());
    let reply = stack.wait_ready("/app/ready", &token).await;
    assert_eq!(reply.status, 200, "valid token on /app\n{reply}\n{}", stack.logs());

    // Allow: claim headers upstream; the upstream sees the original path (no /authz).
    let request_id = format!("ops-http-{}", random_hex(6));
    let reply = stack
        .get_with_token("/app/orders?page=2", &token, &[("x-request-id", &request_id)])
        .await;
    assert_upstream(
        &reply,
        &[
            ("x-auth-subject", Some(sub.as_str())),
            ("x-auth-issuer", Some(iss.as_str())),
            ("x-auth-client-id", Some("my-app")),
            (
                "x-auth-roles",
                Some("offline_access,uma_authorization,default-roles-test"),
            ),
            ("x-auth-email", None),
        ],
        "Keycloak token on /app through http_service",
    );
    assert_eq!(reply.json()["path"], "/app/orders?page=2", "upstream path\n{reply}");
    // x-request-id reached audgate (allowed_headers) and is in its decision log.
    let (audgate, rid) = (&stack.audgate, request_id.as_str());
    poll_until(
        Duration::from_secs(3),
        "the x-request-id in audgate's decision log",
        || async move {
            let logs = audgate.logs();
            if logs.contains(rid) {
                Ok(())
            } else {
                Err("not logged yet".to_owned())
            }
        },
    )
    .await;

    // Spoofed claim headers: set ones overwritten, the unset configured one removed.
    let reply = stack
        .get_with_token(
            "/app/orders",
            &token,
            &[
                ("x-auth-subject", "admin"),
                ("X-Auth-Client-Id", "trusted-backend"),
                ("x-auth-issuer", "https://evil.example"),
                ("x-auth-roles", "admin,superuser"),
                ("x-auth-email", "boss@example.com"),
                ("x-unrelated", "kept"),
            ],
        )
        .await;
    assert_upstream(
        &reply,
        &[
            ("x-auth-subject", Some(sub.as_str())),
            ("x-auth-issuer", Some(iss.as_str())),
            ("x-auth-client-id", Some("my-app")),
            (
                "x-auth-roles",
                Some("offline_access,uma_authorization,default-roles-test"),
            ),
            ("x-auth-email", None),
            ("x-unrelated", Some("kept")),
        ],
        "spoofed claim headers with a valid token (http_service)",
    );

    // The token in the `session` cookie (Envoy forwards the cookie: allowed_headers).
    let cookie = format!("theme=dark; session={token}");
    let reply = stack.get("/app/cookie", &[("cookie", &cookie)]).await;
    assert_upstream(
        &reply,
        &[("x-auth-subject", Some(sub.as_str()))],
        "token in the session cookie",
    );

    // Anonymous route: no token, spoofed claim headers still stripped.
    let reply = stack
        .get(
            "/health/live",
            &[("x-auth-subject", "admin"), ("x-auth-client-id", "trusted-backend")],
        )
        .await;
    assert_upstream(
        &reply,
        &[("x-auth-subject", None), ("x-auth-client-id", None)],
        "anonymous route with spoofed claim headers",
    );

    // Host-specific route: Envoy sends the original Host (port ignored by matching).
    let reply = stack
        .get_with_token("/v1/items", &token, &[("host", "api.example.test:8443")])
        .await;
    assert_upstream(&reply, &[("x-auth-client-id", Some("my-app"))], "host api.example.test");
    let reply = stack
        .get_with_token("/v1/items", &token, &[("host", "other.example.test")])
        .await;
    assert_deny(
        &reply,
        403,
        "no_route",
        Some(&token),
        "/v1 on another host matches no route",
    );

    // Method: Envoy sends the original method; `writes` only matches POST/PUT/DELETE.
    let writer_claims = keycloak_claims(&iss, "writer-app");
    let writer = rsa.mint(writer_claims.clone());
    let client = common::http_client();
    let auth = bearer(&writer);
    for method in ["POST", "DELETE"] {
        let reply = common::send(
            &client,
            method,
            &format!("{}/orders/7", stack.envoy.url()),
            &[("authorization", &auth)],
        )
        .await;
        assert_upstream(
            &reply,
            &[("x-auth-client-id", Some("writer-app"))],
            &format!("{method} /orders/7 with a writer-app token"),
        );
        assert_eq!(reply.json()["method"], method, "{reply}");
    }
    let reply = stack.get_with_token("/orders/7", &writer, &[]).await;
    assert_deny(
        &reply,
        403,
        "no_route",
        Some(&writer),
        "GET /orders/7 (writes is POST/PUT/DELETE only)",
    );

    // 401 without a token: bare challenge, JSON body, content-type passed on by Envoy.
    let reply = stack.get("/app/orders", &[("x-auth-subject", "admin")]).await;
    assert_deny(&reply, 401, "missing_token", None, "no token on /app");
    assert!(
        reply.header("x-auth-subject").is_none(),
        "a deny must not leak claim headers to the client\n{reply}"
    );

    // 401 for an expired token.
    let expired = rsa.mint(merge(
        keycloak_claims(&iss, "my-app"),
        json!({"exp": now() - 600, "iat": now() - 900}),
    ));
    let reply = stack.get_with_token("/app/orders", &expired, &[]).await;
    assert_deny(&reply, 401, "expired", Some(expired.as_str()), "expired token");

    // 403 audience_mismatch: a Keycloak token (aud=account) on a route checking only aud.
    let reply = stack.get_with_token("/strict/orders", &token, &[]).await;
    assert_deny(&reply, 403, "audience_mismatch", Some(&token), "aud=account on /strict");

    // No check at all on Envoy's /public route.
    let reply = stack.get("/public/logo.png", &[]).await;
    assert_eq!(reply.status, 200, "/public bypasses ext_authz\n{reply}");
}

// ---------------------------------------------------------------------------------------------
// 2. nginx auth_request and Traefik ForwardAuth conventions
// ---------------------------------------------------------------------------------------------

/// audgate's HTTP endpoint called directly the way nginx `auth_request` (X-Original-URI /
/// X-Original-Method, GET to an auth location) and Traefik ForwardAuth (X-Forwarded-Method /
/// -Uri / -Host / -Proto, GET to a fixed address) call it, and the way Envoy does (the request
/// itself minus the path prefix): the route follows the forwarded request; allow is 200 with
/// the claim headers; deny is 401/403.
#[tokio::test(flavor = "multi_thread")]
async fn http_endpoint_nginx_traefik_and_envoy_conventions() {
    let key = TestKey::ec("fwd-ec");
    let issuer = IssuerServer::start(&[&key]).await;
    let iss = issuer.issuer_url();
    // one audgate per `http_endpoint.proxy`: each reads only its own proxy's headers
    let with_proxy =
        |proxy: &str| ops_config(&iss).replace("http_endpoint:\n", &format!("http_endpoint:\n  proxy: {proxy}\n"));
    let nginx = Audgate::start(&with_proxy("nginx")).await;
    let traefik_audgate = Audgate::start(&with_proxy("traefik")).await;
    let audgate = Audgate::start(&with_proxy("envoy")).await;
    for a in [&nginx, &traefik_audgate, &audgate] {
        a.wait_ready().await;
    }
    let client = common::http_client();
    let nginx_base = nginx.http_url();
    let traefik_base = traefik_audgate.http_url();
    let base = audgate.http_url();

    let claims = keycloak_claims(&iss, "my-app");
    let sub = str_claim(&claims, "sub").to_owned();
    let token = key.mint(claims);
    let auth = bearer(&token);
    let writer = key.mint(keycloak_claims(&iss, "writer-app"));
    let writer_auth = bearer(&writer);
    let traefik_host = format!("127.0.0.1:{}", traefik_audgate.ports.http);

    // --- nginx: GET /auth with the original request in X-Original-*; Host is the original
    // host (`proxy_set_header Host $host`).
    let reply = common::send(
        &client,
        "GET",
        &format!("{nginx_base}/auth"),
        &[
            ("host", "api.example.test"),
            ("x-original-uri", "/v1/items?page=2"),
            ("x-original-method", "GET"),
            ("authorization", &auth),
        ],
    )
    .await;
    assert_http_allow(
        &reply,
        &[
            ("x-auth-subject", Some(sub.as_str())),
            ("x-auth-issuer", Some(iss.as_str())),
            ("x-auth-client-id", Some("my-app")),
            ("x-auth-email", None),
        ],
        "nginx: X-Original-URI /v1/items on host api.example.test (route api-host)",
    );

    // The same original URI on another host: no route.
    let reply = common::send(
        &client,
        "GET",
        &format!("{nginx_base}/auth"),
        &[
            ("host", "other.example.test"),
            ("x-original-uri", "/v1/items"),
            ("x-original-method", "GET"),
            ("authorization", &auth),
        ],
    )
    .await;
    assert_deny(&reply, 403, "no_route", Some(&token), "nginx: /v1 on another host");

    // X-Original-Method selects the method-specific route although nginx sends GET.
    let reply = common::send(
        &client,
        "GET",
        &format!("{nginx_base}/auth"),
        &[
            ("host", HOST),
            ("x-original-uri", "/orders/7"),
            ("x-original-method", "DELETE"),
            ("authorization", &writer_auth),
        ],
    )
    .await;
    assert_http_allow(
        &reply,
        &[("x-auth-client-id", Some("writer-app"))],
        "nginx: DELETE /orders/7 (route writes)",
    );
    let reply = common::send(
        &client,
        "GET",
        &format!("{nginx_base}/auth"),
        &[
            ("host", HOST),
            ("x-original-uri", "/orders/7"),
            ("x-original-method", "DELETE"),
            ("authorization", &auth),
        ],
    )
    .await;
    assert_deny(
        &reply,
        403,
        "audience_mismatch",
        Some(&token),
        "nginx: DELETE /orders/7 with a my-app token",
    );

    // 401 without a token; 403 for aud=account on /strict.
    let reply = common::send(
        &client,
        "GET",
        &format!("{nginx_base}/auth"),
        &[
            ("host", HOST),
            ("x-original-uri", "/app/x"),
            ("x-original-method", "POST"),
        ],
    )
    .await;
    assert_deny(&reply, 401, "missing_token", None, "nginx: no token");
    let reply = common::send(
        &client,
        "GET",
        &format!("{nginx_base}/auth"),
        &[
            ("host", HOST),
            ("x-original-uri", "/strict/x"),
            ("x-original-method", "GET"),
            ("authorization", &auth),
        ],
    )
    .await;
    assert_deny(
        &reply,
        403,
        "audience_mismatch",
        Some(&token),
        "nginx: aud=account on /strict",
    );

    // Anonymous: 200, and every configured claim header is to be removed.
    let reply = common::send(
        &client,
        "GET",
        &format!("{nginx_base}/auth"),
        &[
            ("host", HOST),
            ("x-original-uri", "/health/live"),
            ("x-original-method", "GET"),
        ],
    )
    .await;
    assert_http_allow(
        &reply,
        &[
            ("x-auth-subject", None),
            ("x-auth-issuer", None),
            ("x-auth-client-id", None),
            ("x-auth-roles", None),
            ("x-auth-email", None),
        ],
        "nginx: anonymous route",
    );

    // --- Traefik: GET to the fixed address; the original request in X-Forwarded-*; Host is
    // audgate's own.
    let traefik = |method: &'static str, fwd_host: &'static str, uri: &'static str, auth: Option<&str>| {
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), traefik_host.clone()),
            ("x-forwarded-method".into(), method.into()),
            ("x-forwarded-proto".into(), "https".into()),
            ("x-forwarded-host".into(), fwd_host.into()),
            ("x-forwarded-uri".into(), uri.into()),
            ("x-forwarded-for".into(), "203.0.113.7".into()),
        ];
        if let Some(auth) = auth {
            headers.push(("authorization".into(), auth.to_owned()));
        }
        headers
    };
    let send_traefik = |headers: Vec<(String, String)>| {
        let client = client.clone();
        let url = format!("{traefik_base}/");
        async move {
            let borrowed: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            common::send(&client, "GET", &url, &borrowed).await
        }
    };

    let reply = send_traefik(traefik("GET", "api.example.test", "/v1/items?page=1", Some(&auth))).await;
    assert_http_allow(
        &reply,
        &[
            ("x-auth-subject", Some(sub.as_str())),
            ("x-auth-client-id", Some("my-app")),
        ],
        "Traefik: GET api.example.test/v1/items (route api-host)",
    );
    let reply = send_traefik(traefik("GET", "api.example.test:443", "/v1/items", Some(&auth))).await;
    assert_http_allow(
        &reply,
        &[("x-auth-client-id", Some("my-app"))],
        "Traefik: X-Forwarded-Host with a port",
    );
    let reply = send_traefik(traefik("GET", "other.example.test", "/v1/items", Some(&auth))).await;
    assert_deny(&reply, 403, "no_route", Some(&token), "Traefik: /v1 on another host");

    let reply = send_traefik(traefik("POST", HOST, "/orders/1", Some(&writer_auth))).await;
    assert_http_allow(
        &reply,
        &[("x-auth-client-id", Some("writer-app"))],
        "Traefik: POST /orders/1 (route writes)",
    );
    let reply = send_traefik(traefik("GET", HOST, "/orders/1", Some(&writer_auth))).await;
    assert_deny(
        &reply,
        403,
        "no_route",
        Some(&writer),
        "Traefik: GET /orders/1 (writes is not GET)",
    );
    let reply = send_traefik(traefik("GET", HOST, "/app/x", None)).await;
    assert_deny(&reply, 401, "missing_token", None, "Traefik: no token");

    // With proxy: traefik, nginx's headers are ignored (a client could send them).
    let mut headers = traefik("GET", "api.example.test", "/v1/items", Some(&auth));
    headers.push(("x-original-uri".into(), "/strict/x".into()));
    headers.push(("x-original-method".into(), "GET".into()));
    let reply = send_traefik(headers).await;
    assert_http_allow(
        &reply,
        &[("x-auth-client-id", Some("my-app"))],
        "X-Forwarded-* (route api-host) are read, X-Original-* (route strict) ignored",
    );

    // --- Envoy style: the request as sent, minus the configured prefix /authz.
    for method in ["POST", "PUT"] {
        let reply = common::send(
            &client,
            method,
            &format!("{base}/authz/orders/9"),
            &[("host", HOST), ("authorization", &writer_auth), ("content-length", "0")],
        )
        .await;
        assert_http_allow(
            &reply,
            &[("x-auth-client-id", Some("writer-app"))],
            &format!("Envoy style: {method} /authz/orders/9"),
        );
    }
    let reply = common::send(
        &client,
        "GET",
        &format!("{base}/authz/v1/items?x=1"),
        &[("host", "api.example.test"), ("authorization", &auth)],
    )
    .await;
    assert_http_allow(
        &reply,
        &[("x-auth-subject", Some(sub.as_str()))],
        "Envoy style: GET /authz/v1/items",
    );
    let reply = common::send(
        &client,
        "GET",
        &format!("{base}/authz/strict/x"),
        &[("host", HOST), ("authorization", &auth)],
    )
    .await;
    assert_deny(
        &reply,
        403,
        "audience_mismatch",
        Some(&token),
        "Envoy style: /authz/strict",
    );
    let cookie = format!("session={token}");
    let reply = common::send(
        &client,
        "GET",
        &format!("{base}/authz/app/x"),
        &[("host", HOST), ("cookie", &cookie)],
    )
    .await;
    assert_http_allow(
        &reply,
        &[("x-auth-subject", Some(sub.as_str()))],
        "Envoy style: token in the cookie",
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Metrics through a real Prometheus
// ---------------------------------------------------------------------------------------------

/// A real Prometheus scrapes `/metrics` every second during an end-to-end run through Envoy;
/// `audgate_checks_total` read back through its query API matches the decisions made, the other
/// metrics are there, and `promtool check metrics` accepts the exposition.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_scraped_by_prometheus_match_the_decisions() {
    // Fail early (never skip) when Prometheus is not installed.
    common::prometheus_binary();
    common::promtool_binary();

    let rsa = TestKey::rsa("metrics-rsa");
    let ec = TestKey::ec("metrics-ec");
    let stack = Stack::start(&[&rsa, &ec], ops_config).await;
    let audgate = &stack.audgate;
    // Ready through /readyz, so that no check is made before the counted ones.
    audgate.wait_ready().await;
    let prometheus = Prometheus::start(&format!("127.0.0.1:{}", audgate.ports.admin), Duration::from_secs(1)).await;
    prometheus.wait_target_up(Duration::from_secs(20)).await;

    let healthz = audgate.admin_get("/healthz").await.expect("GET /healthz");
    assert_eq!(healthz.status, 200, "{healthz}");
    assert_eq!(healthz.body.trim(), "ok", "{healthz}");

    // The decisions, through Envoy (gRPC).
    let iss = stack.issuer.issuer_url();
    let token = rsa.mint(keycloak_claims(&iss, "my-app"));
    let ec_token = ec.mint(keycloak_claims(&iss, "my-app"));
    let mut tokens = vec![token.clone(), ec_token.clone()];
    for (path, tok) in [("/app/a", &token), ("/app/b", &ec_token), ("/app/c", &token)] {
        let reply = stack.get_with_token(path, tok, &[]).await;
        assert_eq!(reply.status, 200, "{path}\n{reply}");
    }
    for path in ["/app/a", "/app/b"] {
        let reply = stack.get(path, &[]).await;
        assert_deny(&reply, 401, "missing_token", None, path);
    }
    for path in ["/strict/a", "/strict/b"] {
        let reply = stack.get_with_token(path, &token, &[]).await;
        assert_deny(&reply, 403, "audience_mismatch", Some(&token), path);
    }
    let reply = stack.get_with_token("/nowhere", &token, &[]).await;
    assert_deny(&reply, 403, "no_route", Some(&token), "/nowhere");
    let reply = stack.get("/health/live", &[]).await;
    assert_eq!(reply.status, 200, "/health\n{reply}");
    let reply = stack.get_with_token("/dry/run", &token, &[]).await;
    assert_eq!(reply.status, 200, "dry_run route\n{reply}");
    let expired = rsa.mint(merge(
        keycloak_claims(&iss, "my-app"),
        json!({"exp": now() - 600, "iat": now() - 900}),
    ));
    tokens.push(expired.clone());
    let reply = stack.get_with_token("/app/old", &expired, &[]).await;
    assert_deny(&reply, 401, "expired", Some(expired.as_str()), "expired");

    let expected: BTreeMap<(String, String, String), f64> = [
        (("keycloak", "allow", "allowed"), 3.0),
        (("keycloak", "deny", "missing_token"), 2.0),
        (("keycloak", "deny", "expired"), 1.0),
        (("strict", "deny", "audience_mismatch"), 2.0),
        (("-", "deny", "no_route"), 1.0),
        (("health", "allow", "anonymous"), 1.0),
        (("dry", "dry_run_deny", "audience_mismatch"), 1.0),
    ]
    .into_iter()
    .map(|((r, d, why), n)| ((r.to_owned(), d.to_owned(), why.to_owned()), n))
    .collect();
    let total: f64 = expected.values().sum();
    let key_of = |labels: &BTreeMap<String, String>| {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_else(|| format!("(no {k} label)"));
        (get("route"), get("decision"), get("reason"))
    };

    // audgate's own exposition.
    let (expected, key_of, prometheus) = (&expected, &key_of, &prometheus);
    let metrics = poll_until(
        Duration::from_secs(5),
        "audgate_checks_total on /metrics",
        || async move {
            let metrics = audgate.metrics().await;
            let seen: BTreeMap<_, _> = metrics
                .series("audgate_checks_total")
                .into_iter()
                .filter(|s| s.value != 0.0)
                .map(|s| (key_of(&s.labels), s.value))
                .collect();
            if &seen == expected {
                Ok(metrics)
            } else {
                Err(format!("{seen:?}\nexpected {expected:?}"))
            }
        },
    )
    .await;

    // Through Prometheus's query API (scraped every second).
    poll_until(
        Duration::from_secs(20),
        "audgate_checks_total through Prometheus",
        || async move {
            let vector = prometheus.query_vector("audgate_checks_total").await;
            let seen: BTreeMap<_, _> = vector
                .iter()
                .filter(|(_, v)| *v != 0.0)
                .map(|(labels, v)| (key_of(labels), *v))
                .collect();
            if &seen == expected {
                Ok(())
            } else {
                Err(format!("{seen:?}\nexpected {expected:?}"))
            }
        },
    )
    .await;
    let counted = prometheus
        .query_vector("sum(audgate_check_duration_seconds_count)")
        .await;
    assert_eq!(
        counted.first().map(|(_, v)| *v),
        Some(total),
        "every check is in the duration histogram (through Prometheus)"
    );
    let keycloak = prometheus
        .query_vector(r#"sum(audgate_check_duration_seconds_count{route="keycloak"})"#)
        .await;
    assert_eq!(
        keycloak.first().map(|(_, v)| *v),
        Some(6.0),
        "route keycloak in the histogram"
    );
    let keys = prometheus.query_vector(r#"audgate_jwks_keys{issuer="test"}"#).await;
    assert_eq!(keys.first().map(|(_, v)| *v), Some(2.0), "two keys for issuer test");

    // The rest of the exposition.
    let text = &metrics.text;
    for (name, kind) in [
        ("audgate_checks_total", "counter"),
        ("audgate_check_duration_seconds", "histogram"),
        ("audgate_jwks_refresh_total", "counter"),
        ("audgate_jwks_keys", "gauge"),
        ("audgate_config_info", "gauge"),
    ] {
        let declared = metrics
            .types
            .get(name)
            .or_else(|| metrics.types.get(name.trim_end_matches("_total")));
        assert_eq!(declared.map(String::as_str), Some(kind), "# TYPE of {name}\n{text}");
    }
    assert!(
        metrics.get(
            "audgate_check_duration_seconds_bucket",
            &[("route", "keycloak"), ("le", "+Inf")]
        ) == Some(6.0),
        "histogram buckets per route\n{}",
        metrics.describe("audgate_check_duration_seconds_bucket")
    );
    assert!(
        metrics.sum("audgate_jwks_refresh_total", &[("issuer", "test"), ("result", "ok")]) >= 1.0,
        "{}",
        metrics.describe("audgate_jwks_refresh_total")
    );
    assert_eq!(metrics.get("audgate_jwks_keys", &[("issuer", "test")]), Some(2.0));
    config_hash(&metrics);
    // Bounded labels: no path, host or token becomes a label value.
    for leak in ["/app/a", "/strict", "/nowhere", "/health/live"] {
        assert!(!text.contains(leak), "{leak:?} appears in /metrics\n{text}");
    }
    for token in &tokens {
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(!text.contains(signature), "a token signature appears in /metrics");
    }

    // Content type and promtool's linter.
    let reply = audgate.admin_get("/metrics").await.expect("GET /metrics");
    let content_type = reply.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "/metrics content-type must be text/plain; version=0.0.4, got {content_type:?}"
    );
    let (ok, output) = common::promtool_check_metrics(&reply.body);
    assert!(
        ok,
        "promtool check metrics rejected the exposition: {output}\n{}",
        reply.body
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Hot reload
// ---------------------------------------------------------------------------------------------

/// What a background load loop saw.
#[derive(Default)]
struct LoadReport {
    ok: usize,
    failures: Vec<String>,
}

/// Starts background loops of valid checks on the unchanged route `/app` — two over gRPC (each
/// its own connection) and one over the HTTP endpoint — until `stop` is set.
async fn start_load(
    audgate: &Audgate,
    token: &str,
    stop: &Arc<AtomicBool>,
) -> (Arc<Mutex<LoadReport>>, Vec<tokio::task::JoinHandle<()>>) {
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let mut tasks = Vec::new();
    for worker in 0..2 {
        let grpc = audgate.grpc().await;
        let (token, stop, report) = (token.to_owned(), Arc::clone(stop), Arc::clone(&report));
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let call = CheckCall::get(HOST, &format!("/app/load-{worker}-{n}")).bearer(&token);
                let outcome = grpc.check(&call).await;
                let mut report = report.lock().unwrap_or_else(|e| e.into_inner());
                match outcome {
                    Ok(reply) if reply.is_allow() => report.ok += 1,
                    Ok(reply) => report.failures.push(format!("gRPC worker {worker} #{n}: {reply}")),
                    Err(e) => report.failures.push(format!("gRPC worker {worker} #{n}: error {e:?}")),
                }
            }
        }));
    }
    {
        let client = common::http_client();
        let url = format!("{}/authz/app/load-http", audgate.http_url());
        let (auth, stop, report) = (bearer(token), Arc::clone(stop), Arc::clone(&report));
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let outcome = common::try_send(&client, "GET", &url, &[("host", HOST), ("authorization", &auth)]).await;
                let mut report = report.lock().unwrap_or_else(|e| e.into_inner());
                match outcome {
                    Ok(reply) if reply.status == 200 => report.ok += 1,
                    Ok(reply) => report.failures.push(format!("HTTP #{n}: {reply}")),
                    Err(e) => report.failures.push(format!("HTTP #{n}: {e}")),
                }
            }
        }));
    }
    // Wait until the load is flowing.
    let flowing = Arc::clone(&report);
    poll_until(Duration::from_secs(10), "background checks flowing", || {
        let flowing = Arc::clone(&flowing);
        async move {
            let report = flowing.lock().unwrap_or_else(|e| e.into_inner());
            if !report.failures.is_empty() {
                panic!(
                    "background checks failed before any config change:\n{}",
                    report.failures.join("\n")
                );
            }
            if report.ok >= 10 {
                Ok(())
            } else {
                Err(format!("{} ok so far", report.ok))
            }
        }
    })
    .await;
    (report, tasks)
}

/// Stops the load loops and asserts none of their checks failed.
async fn finish_load(
    audgate: &Audgate,
    stop: &AtomicBool,
    report: &Mutex<LoadReport>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    context: &str,
) {
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("load task panicked: {e}"));
    }
    let report = report.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        report.failures.is_empty(),
        "{context}: {} of {} background checks on an unchanged route failed:\n{}\n{}",
        report.failures.len(),
        report.failures.len() + report.ok,
        report.failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n"),
        audgate.logs()
    );
    assert!(report.ok >= 20, "{context}: only {} background checks ran", report.ok);
}

/// A changed config file (replaced by rename) takes effect within 5 s while checks are flowing,
/// and not one of those checks fails or errors; the reload is counted and the config hash
/// changes.
#[tokio::test(flavor = "multi_thread")]
async fn reload_applies_a_changed_file_without_failing_checks() {
    let key = TestKey::rsa("reload-1");
    let issuer = IssuerServer::start(&[&key]).await;
    let iss = issuer.issuer_url();
    let audgate = Audgate::start(&reload_config(&iss, "other-app", "")).await;
    audgate.wait_ready().await;
    let token = key.mint(keycloak_claims(&iss, "my-app"));
    let grpc = audgate.grpc().await;

    let reply = grpc
        .check(&CheckCall::get(HOST, "/app/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_allow(&reply, "/app before the change");
    let reply = grpc
        .check(&CheckCall::get(HOST, "/switch/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_deny(
        &reply,
        403,
        "audience_mismatch",
        "/switch before the change (client other-app)",
    );
    let reply = grpc
        .check(&CheckCall::get(HOST, "/added/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_deny(&reply, 403, "no_route", "/added before the change");
    let before = audgate.metrics().await;
    let hash_before = config_hash(&before);
    let ok_before = before.sum("audgate_config_reloads_total", &[("result", "ok")]);

    let stop = Arc::new(AtomicBool::new(false));
    let (report, tasks) = start_load(&audgate, &token, &stop).await;

    let added =
        "  - name: added\n    match: { path_prefix: /added }\n    client_ids: [my-app]\n    client_id_claims: [azp]\n";
    audgate.replace_config(&reload_config(&iss, "my-app", added));
    let took = wait_decision(&audgate, &grpc, "/switch/x", &token, true, RELOAD_DEADLINE).await;
    eprintln!("the changed config was applied after {took:?}");
    // Keep the load running a little past the switch-over, then check it.
    let reply = grpc
        .check(&CheckCall::get(HOST, "/added/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_allow(&reply, "/added (a route the reload added)");
    tokio::time::sleep(Duration::from_millis(300)).await;
    finish_load(&audgate, &stop, &report, tasks, "file replaced by rename").await;

    let after = audgate.metrics().await;
    assert!(
        after.sum("audgate_config_reloads_total", &[("result", "ok")]) > ok_before,
        "audgate_config_reloads_total{{result=\"ok\"}} must count the reload\n{}",
        after.describe("audgate_config_reloads_total")
    );
    assert_ne!(
        config_hash(&after),
        hash_before,
        "audgate_config_info's hash must change"
    );
    assert_eq!(
        after.sum("audgate_config_reloads_total", &[("result", "error")]),
        0.0,
        "a valid file replaced by rename must not count reload errors\n{}",
        after.describe("audgate_config_reloads_total")
    );
    // The keys were not lost on the way: the issuer was not asked again for keys it had.
    let reply = grpc
        .check(&CheckCall::get(HOST, "/app/after").bearer(&token))
        .await
        .expect("check");
    assert_grpc_allow(&reply, "/app after the change");
    assert!(
        audgate.readyz().await.is_ok_and(|r| r.status == 200),
        "still ready after a reload"
    );
}

/// A config file that does not validate (written in place, as an editor does) changes nothing:
/// the old config keeps deciding, the failure is counted, the hash stays; a good file after it
/// is applied.
#[tokio::test(flavor = "multi_thread")]
async fn reload_of_an_invalid_file_keeps_the_old_config() {
    let key = TestKey::ec("invalid-1");
    let issuer = IssuerServer::start(&[&key]).await;
    let iss = issuer.issuer_url();
    let mut audgate = Audgate::start(&reload_config(&iss, "other-app", "")).await;
    audgate.wait_ready().await;
    let token = key.mint(keycloak_claims(&iss, "my-app"));
    let grpc = audgate.grpc().await;
    let hash = config_hash(&audgate.metrics().await);

    let stop = Arc::new(AtomicBool::new(false));
    let (report, tasks) = start_load(&audgate, &token, &stop).await;
    let mut errors = audgate
        .metrics()
        .await
        .sum("audgate_config_reloads_total", &[("result", "error")]);
    for (label, body) in invalid_configs(&iss) {
        audgate.write_config_in_place(&body);
        errors = audgate
            .wait_metric(
                "audgate_config_reloads_total",
                &[("result", "error")],
                RELOAD_DEADLINE,
                |v| v > errors,
            )
            .await;
        assert!(
            audgate.exited().is_none(),
            "{label}: audgate exited\n{}",
            audgate.logs()
        );
        let reply = grpc
            .check(&CheckCall::get(HOST, "/switch/x").bearer(&token))
            .await
            .expect("check");
        assert_grpc_deny(
            &reply,
            403,
            "audience_mismatch",
            &format!("{label}: /switch keeps the old rule"),
        );
        let reply = grpc
            .check(&CheckCall::get(HOST, "/app/x").bearer(&token))
            .await
            .expect("check");
        assert_grpc_allow(&reply, &format!("{label}: /app"));
        let metrics = audgate.metrics().await;
        assert_eq!(
            config_hash(&metrics),
            hash,
            "{label}: audgate_config_info must keep the old hash"
        );
        let ready = audgate.readyz().await.expect("GET /readyz");
        assert_eq!(
            ready.status, 200,
            "{label}: an invalid file must not make audgate unready\n{ready}"
        );
    }
    finish_load(&audgate, &stop, &report, tasks, "invalid files").await;

    // A valid file after the invalid ones is applied.
    audgate.replace_config(&reload_config(&iss, "my-app", ""));
    wait_decision(&audgate, &grpc, "/switch/x", &token, true, RELOAD_DEADLINE).await;
    assert_ne!(config_hash(&audgate.metrics().await), hash, "the valid file's hash");
}

/// A Kubernetes ConfigMap volume: the config path is `audgate.yaml -> ..data/audgate.yaml` and
/// an update swaps the `..data` symlink to a new timestamped directory (the old one is deleted).
/// Each swap is picked up; an invalid one is counted and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn reload_follows_a_configmap_symlink_swap() {
    let key = TestKey::rsa("configmap-1");
    let issuer = IssuerServer::start(&[&key]).await;
    let iss = issuer.issuer_url();
    let audgate = Audgate::start_with(
        &reload_config(&iss, "other-app", ""),
        AudgateOptions::new().layout(ConfigLayout::ConfigMap),
    )
    .await;
    audgate.wait_ready().await;
    assert!(
        std::fs::symlink_metadata(&audgate.config_path).is_ok_and(|m| m.file_type().is_symlink()),
        "the ConfigMap layout's config path is a symlink"
    );
    let token = key.mint(keycloak_claims(&iss, "my-app"));
    let grpc = audgate.grpc().await;
    let reply = grpc
        .check(&CheckCall::get(HOST, "/switch/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_deny(&reply, 403, "audience_mismatch", "/switch before the swap");
    let hash = config_hash(&audgate.metrics().await);

    let stop = Arc::new(AtomicBool::new(false));
    let (report, tasks) = start_load(&audgate, &token, &stop).await;

    // First swap: allowed.
    audgate.replace_config(&reload_config(&iss, "my-app", ""));
    wait_decision(&audgate, &grpc, "/switch/x", &token, true, RELOAD_DEADLINE).await;
    let metrics = audgate.metrics().await;
    let swapped_hash = config_hash(&metrics);
    assert_ne!(swapped_hash, hash, "the hash after the first swap");
    assert!(
        metrics.sum("audgate_config_reloads_total", &[("result", "ok")]) >= 1.0,
        "{}",
        metrics.describe("audgate_config_reloads_total")
    );

    // An invalid swap: counted, nothing changes.
    let errors = metrics.sum("audgate_config_reloads_total", &[("result", "error")]);
    let (label, invalid) = invalid_configs(&iss).remove(1);
    audgate.replace_config(&invalid.replace("[my-app]", "[other-app]"));
    audgate
        .wait_metric(
            "audgate_config_reloads_total",
            &[("result", "error")],
            RELOAD_DEADLINE,
            |v| v > errors,
        )
        .await;
    let reply = grpc
        .check(&CheckCall::get(HOST, "/switch/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_allow(&reply, &format!("/switch after an invalid swap ({label})"));
    assert_eq!(
        config_hash(&audgate.metrics().await),
        swapped_hash,
        "hash after an invalid swap"
    );

    // A second good swap, back to denying.
    audgate.replace_config(&reload_config(&iss, "other-app", ""));
    wait_decision(&audgate, &grpc, "/switch/x", &token, false, RELOAD_DEADLINE).await;
    let reply = grpc
        .check(&CheckCall::get(HOST, "/switch/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_deny(&reply, 403, "audience_mismatch", "/switch after the second swap");
    finish_load(&audgate, &stop, &report, tasks, "ConfigMap swaps").await;
}

/// SIGHUP reloads at once: it never kills audgate (the default action of SIGHUP would), and it
/// applies a change that a watcher of the config's directory cannot see (the config is a
/// symlink into another directory, where the file is replaced). An invalid file read on SIGHUP
/// changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_immediately() {
    let key = TestKey::ec("sighup-1");
    let issuer = IssuerServer::start(&[&key]).await;
    let iss = issuer.issuer_url();
    let mut audgate = Audgate::start_with(
        &reload_config(&iss, "other-app", ""),
        AudgateOptions::new().layout(ConfigLayout::ExternalSymlink),
    )
    .await;
    audgate.wait_ready().await;
    let token = key.mint(keycloak_claims(&iss, "my-app"));
    let grpc = audgate.grpc().await;

    // SIGHUP with nothing changed: audgate stays up and keeps deciding as before.
    audgate.signal("HUP");
    let watch_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < watch_until {
        assert!(
            audgate.exited().is_none(),
            "audgate exited on SIGHUP (no handler?)\n{}",
            audgate.logs()
        );
        let reply = grpc
            .check(&CheckCall::get(HOST, "/app/x").bearer(&token))
            .await
            .expect("check after SIGHUP");
        assert_grpc_allow(&reply, "/app after a SIGHUP without changes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = grpc
        .check(&CheckCall::get(HOST, "/switch/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_deny(
        &reply,
        403,
        "audience_mismatch",
        "/switch after a SIGHUP without changes",
    );
    let hash = config_hash(&audgate.metrics().await);

    // A change in the symlink's target directory, then SIGHUP.
    audgate.replace_config(&reload_config(&iss, "my-app", ""));
    audgate.signal("HUP");
    let took = wait_decision(&audgate, &grpc, "/switch/x", &token, true, SIGHUP_DEADLINE).await;
    eprintln!("SIGHUP applied the change after {took:?}");
    let metrics = audgate.metrics().await;
    let new_hash = config_hash(&metrics);
    assert_ne!(new_hash, hash, "the hash after SIGHUP");
    assert!(metrics.sum("audgate_config_reloads_total", &[("result", "ok")]) >= 1.0);

    // An invalid file, then SIGHUP: counted at once, nothing changes.
    let errors = metrics.sum("audgate_config_reloads_total", &[("result", "error")]);
    let (label, invalid) = invalid_configs(&iss).remove(0);
    audgate.replace_config_text(&audgate.config_text(&invalid));
    audgate.signal("HUP");
    audgate
        .wait_metric(
            "audgate_config_reloads_total",
            &[("result", "error")],
            SIGHUP_DEADLINE,
            |v| v > errors,
        )
        .await;
    assert!(audgate.exited().is_none(), "audgate exited\n{}", audgate.logs());
    let reply = grpc
        .check(&CheckCall::get(HOST, "/switch/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_allow(&reply, &format!("/switch after SIGHUP with an invalid file ({label})"));
    assert_eq!(
        config_hash(&audgate.metrics().await),
        new_hash,
        "hash after an invalid SIGHUP reload"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Graceful shutdown
// ---------------------------------------------------------------------------------------------

/// One check of the burst.
struct BurstResult {
    index: usize,
    finished: Instant,
    outcome: Result<CheckReply, tonic::Status>,
}

/// SIGTERM while checks are in flight: readiness goes to 503 and gRPC health stops reporting
/// SERVING, checks already inside audgate (held there by a slow JWKS refetch) complete with the
/// right answer, every answered check of a concurrent burst is correct, and audgate exits 0
/// within 10 s.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_checks_and_exits_zero() {
    let old_key = TestKey::rsa("drain-old");
    let new_key = TestKey::ec("drain-new");
    let issuer = IssuerServer::start(&[&old_key]).await;
    let iss = issuer.issuer_url();
    let mut audgate = Audgate::start(&reload_config(&iss, "other-app", "")).await;
    audgate.wait_ready().await;
    let ready_at = Instant::now();

    let claims = keycloak_claims(&iss, "my-app");
    let sub = str_claim(&claims, "sub").to_owned();
    let token = old_key.mint(claims);
    let new_claims = keycloak_claims(&iss, "my-app");
    let new_sub = str_claim(&new_claims, "sub").to_owned();
    let new_token = new_key.mint(new_claims);

    // Every connection is opened before the signal.
    let health = audgate.grpc().await;
    let health_ref = &health;
    for service in HEALTH_SERVICES {
        // gRPC health follows readiness (a moment later at most).
        poll_until(
            Duration::from_secs(2),
            "gRPC health SERVING before shutdown",
            || async move {
                match health_ref.health(service).await {
                    Ok(status) if status == "SERVING" => Ok(()),
                    other => Err(format!("{service:?}: {other:?}")),
                }
            },
        )
        .await;
    }
    let slow_grpc = audgate.grpc().await;
    let mut burst_conns = Vec::new();
    for _ in 0..4 {
        burst_conns.push(audgate.grpc().await);
    }
    let http = common::http_client();
    let http_url = audgate.http_url();
    let auth = bearer(&token);
    let warm = common::send(
        &http,
        "GET",
        &format!("{http_url}/authz/app/warm"),
        &[("host", HOST), ("authorization", &auth)],
    )
    .await;
    assert_eq!(warm.status, 200, "warm-up over HTTP\n{warm}");

    // Checks that stay inside audgate: a token with a kid audgate has not seen makes it refetch
    // the JWKS, which the issuer now answers only after 3 s. The first fetch happened before
    // readiness; wait out min_refresh_interval (1 s) so the refetch is allowed.
    tokio::time::sleep_until(tokio::time::Instant::from_std(ready_at + Duration::from_millis(1500))).await;
    issuer.set_keys(&[&old_key, &new_key]);
    issuer.set_jwks_delay(Duration::from_secs(3));
    let fetches = issuer.jwks_fetches();
    let mut slow = Vec::new();
    for i in 0..3 {
        let grpc = slow_grpc.clone();
        let call = CheckCall::get(HOST, &format!("/app/slow-grpc-{i}")).bearer(&new_token);
        slow.push(tokio::spawn(async move {
            let outcome = grpc.check(&call).await;
            let finished = Instant::now();
            (
                format!("gRPC slow #{i}"),
                finished,
                outcome
                    .map(|r| {
                        (
                            r.is_allow(),
                            r.header("x-auth-subject").map(str::to_owned),
                            r.to_string(),
                        )
                    })
                    .map_err(|e| format!("{e:?}")),
            )
        }));
    }
    for i in 0..3 {
        let client = http.clone();
        let url = format!("{http_url}/authz/app/slow-http-{i}");
        let auth = bearer(&new_token);
        slow.push(tokio::spawn(async move {
            let outcome = common::try_send(&client, "GET", &url, &[("host", HOST), ("authorization", &auth)]).await;
            let finished = Instant::now();
            (
                format!("HTTP slow #{i}"),
                finished,
                outcome.map(|r| {
                    (
                        r.status == 200,
                        r.header("x-auth-subject").map(str::to_owned),
                        r.to_string(),
                    )
                }),
            )
        }));
    }
    let issuer_ref = &issuer;
    poll_until(
        Duration::from_secs(5),
        "the slow checks' JWKS refetch reaching the issuer",
        || async move {
            let issuer = issuer_ref;
            if issuer.jwks_fetches() > fetches {
                Ok(())
            } else {
                Err("no refetch yet".to_owned())
            }
        },
    )
    .await;
    // The six slow checks were sent together; give the stragglers a moment to reach audgate and
    // join the refetch that is under way (it lasts 3 s).
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The burst: 200 checks over 4 connections, SIGTERM once 60 have started.
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for conn in burst_conns {
        let next = Arc::clone(&next);
        let token = token.clone();
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::SeqCst);
                if index >= 200 {
                    break;
                }
                let call = CheckCall::get(HOST, &format!("/app/burst-{index}"))
                    .bearer(&token)
                    .request_id(&format!("burst-{index}"));
                let outcome = conn.check(&call).await;
                results.push(BurstResult {
                    index,
                    finished: Instant::now(),
                    outcome,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            results
        }));
    }
    let next_ref = &next;
    poll_until(Duration::from_secs(10), "60 burst checks started", || async move {
        let next = next_ref;
        let started = next.load(Ordering::SeqCst);
        if started >= 60 {
            Ok(())
        } else {
            Err(format!("{started} started"))
        }
    })
    .await;
    // Taken before the signal: audgate may react before `kill` returns.
    let term_at = Instant::now();
    audgate.signal("TERM");

    // Readiness: /readyz stops answering 200 (503, or the admin port closes).
    let audgate_ref = &audgate;
    let readiness = poll_until(
        Duration::from_millis(1500),
        "/readyz not 200 after SIGTERM",
        || async move {
            let audgate = audgate_ref;
            match audgate.readyz().await {
                Ok(reply) if reply.status == 200 => Err(format!("still 200: {}", reply.body)),
                Ok(reply) => {
                    assert_eq!(reply.status, 503, "/readyz while shutting down\n{reply}");
                    let body = reply.try_json().unwrap_or(Value::Null);
                    assert_eq!(body["ready"], json!(false), "/readyz body while shutting down\n{reply}");
                    Ok(format!("503 {}", reply.body))
                }
                Err(e) => Ok(format!("admin port closed ({e})")),
            }
        },
    )
    .await;
    eprintln!("readiness after SIGTERM: {readiness}");
    // gRPC health on the connection opened before: NOT_SERVING, or the connection is going away.
    let health_seen = poll_until(
        Duration::from_millis(1500),
        "gRPC health not SERVING after SIGTERM",
        || async move {
            let health = health_ref;
            match health.health("").await {
                Ok(status) if status == "SERVING" => Err("still SERVING".to_owned()),
                Ok(status) => {
                    assert_eq!(status, "NOT_SERVING", "gRPC health while shutting down");
                    Ok(status)
                }
                Err(e) => Ok(format!("gRPC error {:?}: {}", e.code(), e.message())),
            }
        },
    )
    .await;
    eprintln!("gRPC health after SIGTERM: {health_seen}");

    // The slow checks were inside audgate when SIGTERM came: each must complete, correctly.
    for task in slow {
        let (label, finished, outcome) = task.await.expect("slow check task");
        match outcome {
            Ok((true, subject, _)) => {
                assert_eq!(subject.as_deref(), Some(new_sub.as_str()), "{label}: claim header");
                assert!(
                    finished > term_at,
                    "{label} finished before SIGTERM: the test did not hold it in flight (timing)"
                );
            }
            Ok((false, _, reply)) => panic!(
                "{label}: in flight at SIGTERM and answered wrongly: {reply}\n{}",
                audgate.logs()
            ),
            Err(e) => panic!("{label}: in flight at SIGTERM and failed: {e}\n{}", audgate.logs()),
        }
    }

    // The burst: every answer is a correct allow; failures only after the signal (new streams
    // or connections refused while shutting down).
    let mut answered = 0;
    let mut refused = Vec::new();
    for worker in workers {
        for result in worker.await.expect("burst worker") {
            match result.outcome {
                Ok(reply) => {
                    assert!(
                        reply.is_allow() && reply.header("x-auth-subject") == Some(sub.as_str()),
                        "burst check #{} got a wrong answer: {reply}",
                        result.index
                    );
                    answered += 1;
                }
                Err(status) => {
                    assert!(
                        result.finished >= term_at,
                        "burst check #{} failed before SIGTERM: {status:?}\n{}",
                        result.index,
                        audgate.logs()
                    );
                    refused.push(format!("#{} {:?} {}", result.index, status.code(), status.message()));
                }
            }
        }
    }
    assert!(answered >= 60 - 4, "only {answered} burst checks were answered");
    eprintln!("burst: {answered} answered, {} refused after SIGTERM", refused.len());

    let remaining = SHUTDOWN_DEADLINE.saturating_sub(term_at.elapsed());
    let status = audgate.wait_exit(remaining).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "audgate still running {SHUTDOWN_DEADLINE:?} after SIGTERM\n{}",
            audgate.logs()
        )
    });
    assert!(
        status.success(),
        "audgate must exit 0 after SIGTERM, got {status}\n{}",
        audgate.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Readiness and gRPC health before keys load
// ---------------------------------------------------------------------------------------------

/// While one issuer's JWKS endpoint fails, gRPC health says NOT_SERVING and `/readyz` answers
/// 503 naming that issuer (and not the one whose keys loaded); `/healthz` is 200 throughout and
/// the loaded issuer's tokens are served. Once the endpoint works, audgate loads the keys on its
/// own: SERVING, `/readyz` 200, and the late issuer's tokens are allowed.
#[tokio::test(flavor = "multi_thread")]
async fn health_and_readiness_wait_for_every_issuers_keys() {
    let alpha_key = TestKey::rsa("alpha-1");
    let beta_key = TestKey::ec("beta-1");
    let alpha = IssuerServer::start_at("/realms/alpha", &[&alpha_key]).await;
    let beta = IssuerServer::start_at("/realms/beta", &[&beta_key]).await;
    beta.set_jwks_failure(Some(503));
    let (alpha_url, beta_url) = (alpha.issuer_url(), beta.issuer_url());
    let config = format!(
        r#"
http_endpoint:
  path_prefix: /authz

issuers:
  alpha-ok:
    issuer: {alpha_url}
    discovery: true
  beta-late:
    issuer: {beta_url}
    jwks_uri: {beta_url}/protocol/openid-connect/certs
    refresh_interval: 1s
    min_refresh_interval: 1s

routes:
  - name: app
    match: {{ path_prefix: /app }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]

default: deny
"#
    );
    let audgate = Audgate::start(&config).await;
    let audgate = &audgate;
    let beta_ref = &beta;
    let alpha_token = alpha_key.mint(keycloak_claims(&alpha_url, "my-app"));
    let beta_claims = keycloak_claims(&beta_url, "my-app");
    let beta_token = beta_key.mint(beta_claims.clone());

    // Not ready: only beta-late is missing once alpha has loaded.
    let missing = poll_until(
        Duration::from_secs(15),
        "/readyz 503 naming only beta-late",
        || async move {
            let reply = audgate.readyz().await?;
            if reply.status == 200 {
                panic!(
                    "/readyz is 200 although beta-late's keys never loaded\n{reply}\n{}",
                    audgate.logs()
                );
            }
            let body = reply.try_json().ok_or_else(|| format!("not JSON: {reply}"))?;
            let missing: Vec<String> = body["missing"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default();
            let names_beta = missing.iter().any(|m| m.contains("beta-late"));
            let names_alpha = missing.iter().any(|m| m.contains("alpha-ok"));
            if reply.status == 503 && body["ready"] == json!(false) && names_beta && !names_alpha && missing.len() == 1
            {
                Ok(missing)
            } else {
                Err(reply.to_string())
            }
        },
    )
    .await;
    eprintln!("/readyz missing: {missing:?}");
    let grpc = audgate.grpc().await;
    let grpc = &grpc;
    for service in HEALTH_SERVICES {
        let status = grpc.health(service).await;
        assert_eq!(
            status.as_deref().ok(),
            Some("NOT_SERVING"),
            "gRPC health {service:?} before beta-late's keys loaded: {status:?}"
        );
    }
    let healthz = audgate.admin_get("/healthz").await.expect("GET /healthz");
    assert_eq!(
        (healthz.status, healthz.body.trim()),
        (200, "ok"),
        "/healthz is liveness only\n{healthz}"
    );

    // Checks are served meanwhile: alpha allowed, beta an error (503 keys_unavailable).
    let reply = grpc
        .check(&CheckCall::get(HOST, "/app/x").bearer(&alpha_token))
        .await
        .expect("check");
    assert_grpc_allow(&reply, "alpha token while beta is not loaded");
    let reply = grpc
        .check(&CheckCall::get(HOST, "/app/x").bearer(&beta_token))
        .await
        .expect("check");
    assert!(
        reply.kind == CheckKind::Error && reply.grpc_code != 0,
        "beta token before its keys loaded must be an error_response\n{reply}"
    );
    if let Some(code) = reply.error_code() {
        assert_eq!(code, "keys_unavailable", "{reply}");
    }
    let client = common::http_client();
    let reply = common::send(
        &client,
        "GET",
        &format!("{}/authz/app/x", audgate.http_url()),
        &[("host", HOST), ("authorization", &bearer(&beta_token))],
    )
    .await;
    assert_eq!(reply.status, 503, "HTTP endpoint: keys never loaded is a 503\n{reply}");

    // audgate keeps retrying on its own; still unready meanwhile.
    let fetched = beta.jwks_fetches();
    poll_until(
        Duration::from_secs(5),
        "audgate retrying beta-late's JWKS",
        || async move {
            let beta = beta_ref;
            if beta.jwks_fetches() >= fetched + 2 {
                Ok(())
            } else {
                Err(format!("{} fetches", beta.jwks_fetches()))
            }
        },
    )
    .await;
    let reply = audgate.readyz().await.expect("GET /readyz");
    assert_eq!(reply.status, 503, "still unready while beta-late fails\n{reply}");
    assert_eq!(grpc.health("").await.ok().as_deref(), Some("NOT_SERVING"));

    // The issuer comes back.
    beta.set_jwks_failure(None);
    let ready = poll_until(
        Duration::from_secs(10),
        "/readyz 200 after beta-late's keys load",
        || async move {
            let reply = audgate.readyz().await?;
            if reply.status == 200 {
                Ok(reply)
            } else {
                Err(reply.to_string())
            }
        },
    )
    .await;
    assert_eq!(ready.try_json(), Some(json!({"ready": true})), "{ready}");
    for service in HEALTH_SERVICES {
        poll_until(Duration::from_secs(2), "gRPC health SERVING", || async move {
            match grpc.health(service).await {
                Ok(status) if status == "SERVING" => Ok(()),
                other => Err(format!("{service:?}: {other:?}")),
            }
        })
        .await;
    }
    let reply = grpc
        .check(&CheckCall::get(HOST, "/app/x").bearer(&beta_token))
        .await
        .expect("check");
    assert_grpc_allow(&reply, "beta token after its keys loaded");
    assert_eq!(
        reply.header("x-auth-subject"),
        Some(str_claim(&beta_claims, "sub")),
        "{reply}"
    );

    let metrics = audgate.metrics().await;
    let describe = metrics.describe("audgate_jwks_refresh_total");
    assert!(
        metrics.sum(
            "audgate_jwks_refresh_total",
            &[("issuer", "beta-late"), ("result", "error")]
        ) >= 1.0,
        "{describe}"
    );
    assert!(
        metrics.sum(
            "audgate_jwks_refresh_total",
            &[("issuer", "beta-late"), ("result", "ok")]
        ) >= 1.0,
        "{describe}"
    );
    assert!(
        metrics.sum(
            "audgate_jwks_refresh_total",
            &[("issuer", "alpha-ok"), ("result", "ok")]
        ) >= 1.0,
        "{describe}"
    );
    assert_eq!(
        metrics.get("audgate_jwks_keys", &[("issuer", "beta-late")]),
        Some(1.0),
        "{}",
        metrics.describe("audgate_jwks_keys")
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Decision logs
// ---------------------------------------------------------------------------------------------

/// With `--log-format json`, stderr is one JSON object per line, and each decision is one line
/// with route, decision, reason, issuer, subject, client_id, request_id and latency_us at top
/// level; no token (nor its signature or payload) appears anywhere in the log.
#[tokio::test(flavor = "multi_thread")]
async fn json_decision_logs_carry_the_fields_and_never_a_token() {
    let key = TestKey::rsa("log-1");
    let impostor = TestKey::rsa("log-1"); // same kid, different key: bad signature
    let issuer = IssuerServer::start(&[&key]).await;
    let iss = issuer.issuer_url();
    let audgate = Audgate::start_with(&ops_config(&iss), AudgateOptions::new().json_logs()).await;
    audgate.wait_ready().await;
    let grpc = audgate.grpc().await;
    let client = common::http_client();

    let claims = keycloak_claims(&iss, "my-app");
    let sub = str_claim(&claims, "sub").to_owned();
    let token = key.mint(claims.clone());
    let expired = key.mint(merge(
        keycloak_claims(&iss, "my-app"),
        json!({"exp": now() - 600, "iat": now() - 900}),
    ));
    let forged = impostor.mint(claims.clone());
    let malformed = format!("not-a-jwt-{}", random_hex(16));
    let cookie_claims = keycloak_claims(&iss, "my-app");
    let cookie_sub = str_claim(&cookie_claims, "sub").to_owned();
    let cookie_token = key.mint(cookie_claims);
    let run = random_hex(4);
    let rid = |name: &str| format!("log-{run}-{name}");

    // (request id, expected route (None: not checked), decision, reason, issuer, subject, client id)
    type Expect = (
        String,
        Option<&'static str>,
        &'static str,
        &'static str,
        Option<&'static str>,
        Option<String>,
        Option<&'static str>,
    );
    let mut expectations: Vec<Expect> = Vec::new();
    let grpc_cases: Vec<(&str, &str, Option<&str>, Expect)> = vec![
        (
            "allow",
            "/app/orders",
            Some(token.as_str()),
            (
                rid("allow"),
                Some("keycloak"),
                "allow",
                "allowed",
                Some("test"),
                Some(sub.clone()),
                Some("my-app"),
            ),
        ),
        (
            "expired",
            "/app/orders",
            Some(expired.as_str()),
            (rid("expired"), Some("keycloak"), "deny", "expired", None, None, None),
        ),
        (
            "forged",
            "/app/orders",
            Some(forged.as_str()),
            (
                rid("forged"),
                Some("keycloak"),
                "deny",
                "bad_signature",
                None,
                None,
                None,
            ),
        ),
        (
            "aud",
            "/strict/orders",
            Some(token.as_str()),
            (
                rid("aud"),
                Some("strict"),
                "deny",
                "audience_mismatch",
                Some("test"),
                Some(sub.clone()),
                None,
            ),
        ),
        (
            "missing",
            "/app/orders",
            None,
            (
                rid("missing"),
                Some("keycloak"),
                "deny",
                "missing_token",
                None,
                None,
                None,
            ),
        ),
        (
            "malformed",
            "/app/orders",
            Some(malformed.as_str()),
            (
                rid("malformed"),
                Some("keycloak"),
                "deny",
                "malformed_token",
                None,
                None,
                None,
            ),
        ),
        (
            "noroute",
            "/nowhere",
            Some(token.as_str()),
            (rid("noroute"), None, "deny", "no_route", None, None, None),
        ),
        (
            "dry",
            "/dry/run",
            Some(token.as_str()),
            (
                rid("dry"),
                Some("dry"),
                "dry_run_deny",
                "audience_mismatch",
                Some("test"),
                Some(sub.clone()),
                None,
            ),
        ),
    ];
    for (name, path, tok, expect) in grpc_cases {
        let mut call = CheckCall::get(HOST, path).request_id(&expect.0);
        if let Some(tok) = tok {
            call = call.bearer(tok);
        }
        let reply = grpc.check(&call).await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(
            reply.is_allow(),
            matches!(expect.2, "allow" | "dry_run_deny"),
            "{name}: {reply}"
        );
        expectations.push(expect);
    }
    // Over the HTTP endpoint, with the token in the cookie.
    let cookie = format!("session={cookie_token}");
    let http_rid = rid("http");
    let reply = common::send(
        &client,
        "GET",
        &format!("{}/authz/app/cookie", audgate.http_url()),
        &[("host", HOST), ("cookie", &cookie), ("x-request-id", &http_rid)],
    )
    .await;
    assert_eq!(reply.status, 200, "HTTP endpoint with a cookie token\n{reply}");
    expectations.push((
        http_rid,
        Some("keycloak"),
        "allow",
        "allowed",
        Some("test"),
        Some(cookie_sub),
        Some("my-app"),
    ));

    // Wait for every decision line.
    let (audgate_ref, expectations_ref) = (&audgate, &expectations);
    let stderr = poll_until(
        Duration::from_secs(5),
        "a decision log line for every request",
        || async move {
            let (audgate, expectations) = (audgate_ref, expectations_ref);
            let stderr = audgate.stderr();
            let missing: Vec<&String> = expectations
                .iter()
                .map(|e| &e.0)
                .filter(|id| !stderr.contains(id.as_str()))
                .collect();
            if missing.is_empty() {
                Ok(stderr)
            } else {
                Err(format!("no line yet for {missing:?}"))
            }
        },
    )
    .await;

    // One JSON object per line.
    let mut lines = Vec::new();
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) => lines.push(object),
            _ => panic!(
                "with --log-format json every stderr line must be a JSON object; this one is not:\n{line}\n\nwhole log:\n{stderr}"
            ),
        }
    }
    for (id, route, decision, reason, issuer, subject, client_id) in &expectations {
        let matching: Vec<_> = lines
            .iter()
            .filter(|l| l.get("request_id").and_then(Value::as_str) == Some(id.as_str()) && l.contains_key("decision"))
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "exactly one decision line for request {id}; got {matching:?}\n{stderr}"
        );
        let line = matching[0];
        let text = Value::Object(line.clone()).to_string();
        for field in [
            "route",
            "decision",
            "reason",
            "issuer",
            "subject",
            "client_id",
            "request_id",
        ] {
            assert!(
                line.get(field).is_some_and(Value::is_string),
                "{id}: field {field} missing or not a string (at top level): {text}"
            );
        }
        assert!(
            line.get("latency_us").is_some_and(Value::is_u64),
            "{id}: latency_us must be a number: {text}"
        );
        assert_eq!(
            line.get("level").and_then(Value::as_str),
            Some("INFO"),
            "{id}: decisions log at info: {text}"
        );
        let field = |name: &str| line.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
        assert_eq!(field("decision"), *decision, "{id}: {text}");
        assert_eq!(field("reason"), *reason, "{id}: {text}");
        if let Some(route) = route {
            assert_eq!(field("route"), *route, "{id}: {text}");
        }
        if let Some(issuer) = issuer {
            assert_eq!(field("issuer"), *issuer, "{id}: {text}");
        }
        if let Some(subject) = subject {
            assert_eq!(&field("subject"), subject, "{id}: {text}");
        }
        if let Some(client_id) = client_id {
            assert_eq!(field("client_id"), *client_id, "{id}: {text}");
        }
    }

    // No token, signature or payload anywhere in the log.
    for (name, secret) in [
        ("valid token", &token),
        ("expired token", &expired),
        ("forged token", &forged),
        ("cookie token", &cookie_token),
        ("malformed token", &malformed),
    ] {
        assert!(
            !stderr.contains(secret.as_str()),
            "the {name} appears in the log:\n{stderr}"
        );
        let parts: Vec<&str> = secret.split('.').collect();
        if parts.len() == 3 {
            for (part, what) in [(parts[1], "payload"), (parts[2], "signature")] {
                assert!(
                    part.len() < 16 || !stderr.contains(part),
                    "the {name}'s {what} appears in the log:\n{stderr}"
                );
            }
        }
    }
}
