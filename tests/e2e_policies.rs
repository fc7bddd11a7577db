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
    access_logged(&stack, "route=spa reason=cors_preflight").await;
}

/// Waits until Envoy's access log holds `line` (Envoy writes the file about once a second).
async fn access_logged(stack: &Stack, line: &str) {
    common::wait_for_log(
        &format!("Envoy's access log line `{line}`"),
        std::time::Duration::from_secs(10),
        || stack.envoy.logs(),
        |logs| logs.contains(line),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_required_claims_over_the_http_endpoint() {
    let key = TestKey::rsa("rsa-1");
    let stack = Stack::start_http(&[&key], |issuer| config(issuer, true)).await;
    exercise(&stack, &key, "http").await;
}

// ---------------------------------------------------------------------------------------------
// One issuer entry for many tenants
// ---------------------------------------------------------------------------------------------

use std::collections::HashMap;

use common::realms::{Realms, tenants_config};

async fn admin_get(stack: &Stack, path: &str) -> (u16, String) {
    let r = http_client()
        .get(format!("{}{path}", stack.audgate.admin_url()))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Starts a stack whose audgate trusts the tenants of `realms`; returns it once ready.
async fn tenants_stack(realms: &Realms, http: bool) -> Stack {
    let placeholder = common::IssuerServer::start(&[&TestKey::ec("unused")]).await;
    let base = realms.base.clone();
    let stack = Stack::start_full(
        placeholder,
        |_| {
            tenants_config(
                &base,
                if http {
                    "http_endpoint: { path_prefix: /authz }\n"
                } else {
                    ""
                },
            )
        },
        common::AudgateOptions::default(),
        http,
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, body) = admin_get(&stack, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {body}\n{}",
            stack.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stack
}

async fn exercise_tenants(http: bool) {
    let mode = if http { "http" } else { "grpc" };
    let realms = Realms::start().await;
    let (shop_key, billing_key, team_key) = (TestKey::rsa("shop-1"), TestKey::ec("billing-1"), TestKey::ec("team-1"));
    let shop = realms.add("realms", "shop", &shop_key);
    let billing = realms.add("realms", "billing", &billing_key);
    let team_a = realms.add("orgs", "team-a", &team_key);
    // a realm the host serves but the config does not list
    let other = realms.add("realms", "other", &shop_key);
    let stack = tenants_stack(&realms, http).await;
    let token = |key: &TestKey, iss: &str| key.mint(merge(keycloak_claims(iss, "api"), json!({"sub": "alice-id"})));

    // a listed tenant: allowed with the tenant in $tenant, on the route restricted to it
    let reply = stack
        .get_with_token("/shop/x", &token(&shop_key, &shop), &[("x-auth-tenant", "forged")])
        .await;
    assert_upstream(
        &reply,
        &[("x-auth-tenant", Some("shop")), ("x-auth-client-id", Some("api"))],
        mode,
    );
    // another listed tenant: not on the restricted route, fine elsewhere
    let reply = stack
        .get_with_token("/shop/x", &token(&billing_key, &billing), &[])
        .await;
    assert_eq!(
        (reply.status, reply.error_code().as_deref()),
        (401, Some("unknown_issuer")),
        "{mode}\n{reply}"
    );
    assert!(
        reply.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("tenant `billing`"),
        "{reply}"
    );
    let reply = stack.get_with_token("/any", &token(&billing_key, &billing), &[]).await;
    assert_upstream(&reply, &[("x-auth-tenant", Some("billing"))], mode);
    // each tenant has its own keys: shop's key does not sign for billing
    let reply = stack.get_with_token("/any", &token(&shop_key, &billing), &[]).await;
    assert_eq!(reply.error_code().as_deref(), Some("unknown_kid"), "{mode}\n{reply}");
    // a realm that is not listed is an unknown issuer, and costs no fetch
    let before = realms.requests();
    let reply = stack.get_with_token("/any", &token(&shop_key, &other), &[]).await;
    assert_eq!(
        (reply.status, reply.error_code().as_deref()),
        (401, Some("unknown_issuer")),
        "{mode}\n{reply}"
    );
    // a pattern tenant: its keys load on first use
    let reply = stack.get_with_token("/any", &token(&team_key, &team_a), &[]).await;
    assert_upstream(
        &reply,
        &[("x-auth-tenant", Some("team-a"))],
        &format!("{mode}: first use of team-a"),
    );
    assert_eq!(
        realms.requests() - before,
        2,
        "{mode}: one discovery and one JWKS fetch for team-a"
    );
    // a tenant the pattern refuses is an unknown issuer without a fetch
    let reply = stack
        .get_with_token("/any", &token(&team_key, &format!("{}/orgs/Team_A", realms.base)), &[])
        .await;
    assert_eq!(reply.error_code().as_deref(), Some("unknown_issuer"), "{mode}\n{reply}");
    assert_eq!(realms.requests() - before, 2);

    // metrics: the issuer is the only label, its key count the sum over its loaded tenants
    let (_, text) = admin_get(&stack, "/metrics").await;
    let metrics = common::Metrics::parse(&text);
    assert_eq!(
        metrics.get("audgate_jwks_keys", &[("issuer", "realms")]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metrics.get("audgate_jwks_keys", &[("issuer", "teams")]),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("tenant="), "no tenant label: {text}");
    assert!(!text.contains("team-a") && !text.contains("billing"), "{text}");
    if !http {
        access_logged(&stack, "route=any reason=allowed").await;
        doctor_checks_listed_tenants(&realms).await;
    }
}

async fn doctor(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audgate.yaml");
    std::fs::write(&path, config).unwrap();
    let out = tokio::process::Command::new(common::audgate_binary())
        .arg("doctor")
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `audgate doctor` checks every listed tenant live, and says pattern tenants are not checked.
async fn doctor_checks_listed_tenants(realms: &Realms) {
    let config = tenants_config(&realms.base, "");
    let (ok, text) = doctor(&config).await;
    assert!(ok, "{text}");
    for expected in [
        "issuer realms (tenant shop)",
        "issuer realms (tenant billing)",
        "issuer teams ",
        "tenant_pattern",
    ] {
        assert!(text.contains(expected), "doctor output lacks {expected:?}:\n{text}");
    }
    let (ok, text) = doctor(&config.replace("tenants: [shop, billing]", "tenants: [shop, gone]")).await;
    assert!(!ok, "a listed tenant the host does not serve is unusable:\n{text}");
    assert!(text.contains("issuer realms (tenant gone)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_over_grpc() {
    exercise_tenants(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_over_the_http_endpoint() {
    exercise_tenants(true).await;
}

/// 300 tokens naming made-up tenants that match the pattern (anyone can mint a token with any
/// `iss`): audgate fetches at most `max_tenants` (3) times per `min_refresh_interval` (30 s)
/// from the host, answers the rest with keys_unavailable (Envoy: 503), keeps serving the
/// tenants it holds, and stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_tenants_stays_within_the_fetch_budget() {
    let realms = Realms::start().await;
    let (shop_key, team_key) = (TestKey::rsa("shop-1"), TestKey::ec("team-1"));
    let shop = realms.add("realms", "shop", &shop_key);
    realms.add("realms", "billing", &shop_key);
    let team_a = realms.add("orgs", "team-a", &team_key);
    let stack = tenants_stack(&realms, false).await;
    let token = |key: &TestKey, iss: &str| key.mint(keycloak_claims(iss, "api"));
    let reply = stack.get_with_token("/any", &token(&team_key, &team_a), &[]).await;
    assert_eq!(reply.status, 200, "{reply}");
    let before = realms.requests();
    let client = http_client();
    let url = format!("{}/any", stack.envoy.url());
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    let mut pending = Vec::new();
    for i in 0..300 {
        let auth = format!(
            "Bearer {}",
            token(&team_key, &format!("{}/orgs/team-fake{i}", realms.base))
        );
        let (client, url) = (client.clone(), url.clone());
        pending.push(tokio::spawn(async move {
            send(&client, "GET", &url, &[("authorization", &auth)]).await.status
        }));
        if pending.len() == 50 {
            for p in pending.drain(..) {
                *statuses.entry(p.await.unwrap()).or_default() += 1;
            }
        }
    }
    for p in pending {
        *statuses.entry(p.await.unwrap()).or_default() += 1;
    }
    assert_eq!(statuses.get(&503), Some(&300), "{statuses:?}");
    // team-a used one of the 3 fetches of this window; a made-up tenant costs one discovery
    // request (404) each
    let fetched = realms.requests() - before;
    assert!(
        (1..=2).contains(&fetched),
        "{fetched} requests to the issuer host during the flood"
    );
    // the held tenant and the listed ones still work, and readiness is unaffected
    let reply = stack.get_with_token("/any", &token(&team_key, &team_a), &[]).await;
    assert_eq!(reply.status, 200, "{reply}");
    let reply = stack.get_with_token("/any", &token(&shop_key, &shop), &[]).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(admin_get(&stack, "/readyz").await.0, 200);
}
