//! Issue 14's policies end to end: a real Envoy 1.40 in front of the echo upstream asking the
//! real `audgate serve` binary, once over gRPC ext_authz and once over the HTTP authorization
//! endpoint (`http_service`). A browser's CORS preflight passes a route with
//! `allow_cors_preflight` and reaches the upstream without claims, while the actual request is
//! still checked; `required_claims` allows a token that meets every condition and answers 403
//! `claim_mismatch` (RFC 6750 `insufficient_scope`) to one that does not.

mod common;

use common::{Reply, Stack, TestKey, assert_upstream, http_client, keycloak_claims, merge, send};
use serde_json::{Value, json};

fn config(issuer: &str, http: bool) -> String {
    let endpoint = if http {
        "http_endpoint: { path_prefix: /authz }\n"
    } else {
        ""
    };
    format!(
        r#"
issuers:
  test:
    issuer: {issuer}
    discovery: true
claim_headers:
  x-auth-subject: sub
  x-auth-client-id: $client_id
routes:
  - name: spa
    match: {{ path_prefix: /spa }}
    client_ids: [spa-api]
    client_id_claims: [aud, azp]
    allow_cors_preflight: true
    required_claims:
      email_verified: true
      groups: [admins, ops]
      tenant_id: "acme-*"
      realm_access.roles: [auditor]
  - name: plain
    match: {{ path_prefix: /plain }}
    client_ids: [spa-api]
    client_id_claims: [aud, azp]
default: deny
{endpoint}"#
    )
}

fn good_claims(issuer: &str) -> Value {
    merge(
        keycloak_claims(issuer, "spa-api"),
        json!({
            "sub": "alice-id",
            "email_verified": true,
            "groups": ["ops"],
            "tenant_id": "acme-eu",
            "realm_access": {"roles": ["default-roles-test", "auditor"]}
        }),
    )
}

const ORIGIN: (&str, &str) = ("origin", "https://app.example.com");
const ACRM: (&str, &str) = ("access-control-request-method", "POST");
const ACRH: (&str, &str) = ("access-control-request-headers", "authorization");

async fn request(stack: &Stack, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(&http_client(), method, &format!("{}{path}", stack.envoy.url()), headers).await
}

async fn exercise(stack: &Stack, key: &TestKey, mode: &str) {
    let issuer = stack.issuer.issuer_url();
    let good = key.mint(good_claims(&issuer));
    let reply = stack.wait_ready("/spa/ready", &good).await;
    assert_eq!(
        reply.status,
        200,
        "{mode}: a token meeting every condition\n{reply}\n{}",
        stack.logs()
    );
    assert_upstream(
        &reply,
        &[
            ("x-auth-subject", Some("alice-id")),
            ("x-auth-client-id", Some("spa-api")),
        ],
        mode,
    );

    // the browser's preflight: no token, reaches the upstream, client-sent claim headers gone
    let reply = request(
        stack,
        "OPTIONS",
        "/spa/orders",
        &[ORIGIN, ACRM, ACRH, ("x-auth-subject", "forged")],
    )
    .await;
    assert_upstream(
        &reply,
        &[("x-auth-subject", None), ("x-auth-client-id", None)],
        &format!("{mode}: preflight"),
    );
    assert_eq!(
        reply.json()["method"],
        "OPTIONS",
        "{mode}: the upstream saw the preflight\n{reply}"
    );

    // a bare OPTIONS, a preflight-looking GET, and a preflight on a route without the opt-in
    // are checked as usual
    for (method, path, headers) in [
        ("OPTIONS", "/spa/orders", &[][..]),
        ("OPTIONS", "/spa/orders", &[ORIGIN][..]),
        ("GET", "/spa/orders", &[ORIGIN, ACRM][..]),
        ("OPTIONS", "/plain/orders", &[ORIGIN, ACRM][..]),
    ] {
        let reply = request(stack, method, path, headers).await;
        assert_eq!(reply.status, 401, "{mode}: {method} {path} {headers:?}\n{reply}");
        assert_eq!(reply.error_code().as_deref(), Some("missing_token"), "{mode}\n{reply}");
    }

    // the actual request after the preflight is checked: one failed condition is a 403
    for (patch, claim) in [
        (json!({"email_verified": false}), "email_verified"),
        (json!({"groups": ["dev"]}), "groups"),
        (json!({"tenant_id": "corp-eu"}), "tenant_id"),
        (json!({"realm_access": {"roles": ["user"]}}), "realm_access.roles"),
    ] {
        let token = key.mint(merge(good_claims(&issuer), patch.clone()));
        let reply = stack.get_with_token("/spa/orders", &token, &[ORIGIN]).await;
        assert_eq!(reply.status, 403, "{mode}: {patch}\n{reply}");
        let body = reply.json();
        assert_eq!(body["error"], "claim_mismatch", "{mode}: {patch}\n{reply}");
        let description = body["error_description"].as_str().unwrap_or_default();
        assert!(
            description.starts_with(&format!("route spa needs claim {claim} ")),
            "{mode}: {description}"
        );
        assert!(!reply.body.contains(&token));
        let challenge = reply.header("www-authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with(r#"Bearer realm="audgate", error="insufficient_scope", error_description=""#),
            "{mode}: {challenge}"
        );
    }

    // every decision above is counted under its reason
    let metrics = common::Metrics::parse(
        &http_client()
            .get(format!("{}/metrics", stack.audgate.admin_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let count = |reason: &str, decision: &str| {
        metrics.sum(
            "audgate_checks_total",
            &[("route", "spa"), ("reason", reason), ("decision", decision)],
        )
    };
    assert_eq!(count("cors_preflight", "allow"), 1.0, "{mode}");
    assert_eq!(count("claim_mismatch", "deny"), 4.0, "{mode}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_required_claims_over_grpc() {
    let key = TestKey::rsa("rsa-1");
    let stack = Stack::start(&[&key], |issuer| config(issuer, false)).await;
    exercise(&stack, &key, "grpc").await;
    // the access log carries the decision from the dynamic metadata
    let logs = stack.envoy.logs();
    assert!(logs.contains("route=spa reason=cors_preflight"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_required_claims_over_the_http_endpoint() {
    let key = TestKey::rsa("rsa-1");
    let stack = Stack::start_http(&[&key], |issuer| config(issuer, true)).await;
    exercise(&stack, &key, "http").await;
}
