//! Issue 14's policies through the core's public API: CORS preflight (`allow_cors_preflight`)
//! and claim conditions (`required_claims`), with the response, hint and explanation each
//! produces. No network: keys are generated here, `now` is fixed.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use audgate::authz::{self, CheckInput, Headers, Reason, Verdict};
use audgate::config::{self, Loaded};
use audgate::explain::{self, Request, Signatures};
use audgate::jwks::KeySet;
use common::{TestKey, jwks, keycloak_claims, merge};
use serde_json::{Value, json};

const KC: &str = "https://sso.example.com/realms/shop";
const NOW: i64 = 1_800_000_000;

const CONFIG: &str = r#"
issuers:
  kc:
    issuer: https://sso.example.com/realms/shop
    jwks_file: /dev/null
claim_headers:
  x-auth-subject: sub
  x-auth-client-id: $client_id
routes:
  - name: spa-api
    match: { path_prefix: /api, methods: [GET, POST] }
    client_ids: [api]
    client_id_claims: [aud, azp]
    allow_cors_preflight: true
    required_claims:
      email_verified: true
      groups: [admins, ops]
      tenant_id: "acme-*"
      realm_access.roles: [admin, auditor]
      "https://example.com/level": 3
  - name: no-preflight
    match: { path_prefix: /plain }
    client_ids: [api]
    client_id_claims: [aud, azp]
  - name: dry
    match: { path_prefix: /dry }
    client_ids: [api]
    client_id_claims: [aud, azp]
    mode: dry_run
    required_claims: { groups: [admins] }
"#;

struct Core {
    loaded: Loaded,
    keys: Arc<KeySet>,
    key: TestKey,
}

struct Outcome {
    verdict: Verdict,
    reason: Reason,
    route: String,
    description: String,
    status: u16,
    upstream: HashMap<String, String>,
    removed: Vec<String>,
    client: HashMap<String, String>,
    body: Value,
    hints: Vec<String>,
}

fn core() -> Core {
    let key = TestKey::rsa("k1");
    let loaded = config::parse(CONFIG).unwrap_or_else(|e| panic!("config does not load: {e:?}"));
    let keys = Arc::new(KeySet::parse(jwks(&[&key]).to_string().as_bytes()).unwrap());
    Core { loaded, keys, key }
}

/// A token that meets every condition of spa-api, patched.
fn claims(patch: Value) -> Value {
    let base = merge(
        keycloak_claims(KC, "api"),
        json!({
            "iat": NOW - 10, "exp": NOW + 300, "sub": "alice-id",
            "email_verified": true,
            "groups": ["dev", "ops"],
            "tenant_id": "acme-eu",
            "realm_access": {"roles": ["user", "auditor"]},
            "https://example.com/level": 3
        }),
    );
    merge(base, patch)
}

impl Core {
    fn decide(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Outcome {
        let headers: HashMap<String, String> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let input = CheckInput {
            method,
            host: "api.example.com",
            path,
            headers: Headers::Map(&headers),
            route_hint: None,
        };
        let policy = &self.loaded.config.policy;
        let d = authz::evaluate(policy, &input, |_| Some(self.keys.clone()), NOW);
        let resp = authz::respond(policy, &d);
        let token = authz::token::extract(&policy.token, &input).ok();
        let hints = authz::hint::hints(policy, &d, token.as_deref(), Some(&self.keys));
        Outcome {
            verdict: d.verdict,
            reason: d.reason,
            route: d.route_name().to_owned(),
            description: d.description.clone(),
            status: resp.status,
            upstream: resp
                .upstream_headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            // the configured names; their `_` spellings are always removed too (tests/authz.rs)
            removed: resp
                .remove_headers
                .iter()
                .filter(|h| !policy.claim_header_spellings.iter().any(|s| s == *h))
                .map(|h| h.to_string())
                .collect(),
            client: resp
                .client_headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            body: serde_json::from_str(&resp.body).unwrap_or(Value::Null),
            hints,
        }
    }

    fn bearer(&self, patch: Value) -> String {
        format!("Bearer {}", self.key.mint(claims(patch)))
    }
}

const ORIGIN: (&str, &str) = ("origin", "https://app.example.com");
const ACRM_POST: (&str, &str) = ("access-control-request-method", "POST");

#[test]
fn a_real_preflight_passes_without_a_token_and_with_no_claim_headers() {
    let c = core();
    let out = c.decide("OPTIONS", "/api/orders", &[ORIGIN, ACRM_POST]);
    assert_eq!(
        (out.verdict, out.reason, out.status),
        (Verdict::Allow, Reason::CorsPreflight, 200)
    );
    assert_eq!(out.route, "spa-api");
    assert!(out.upstream.is_empty());
    assert_eq!(
        out.removed,
        ["x-auth-subject", "x-auth-client-id"],
        "claim headers stripped"
    );
    assert!(out.hints.is_empty());
    // a token on a preflight changes nothing: no claim reaches the upstream
    let auth = c.bearer(json!({}));
    let out = c.decide("OPTIONS", "/api/orders", &[ORIGIN, ACRM_POST, ("authorization", &auth)]);
    assert_eq!(out.reason, Reason::CorsPreflight);
    assert!(out.upstream.is_empty());
}

#[test]
fn only_a_real_preflight_on_an_opted_in_route_passes() {
    let c = core();
    // a bare OPTIONS, or one missing either header, is checked as usual: the route's methods
    // do not list OPTIONS, so nothing matches
    for headers in [
        &[][..],
        &[ORIGIN][..],
        &[ACRM_POST][..],
        &[ORIGIN, ("access-control-request-method", " ")][..],
    ] {
        let out = c.decide("OPTIONS", "/api/orders", headers);
        assert_eq!((out.reason, out.status), (Reason::NoRoute, 403), "{headers:?}");
    }
    // any other method with the CORS headers is an ordinary request
    let out = c.decide("POST", "/api/orders", &[ORIGIN, ACRM_POST]);
    assert_eq!((out.reason, out.status), (Reason::MissingToken, 401));
    // a route without allow_cors_preflight checks the token on a preflight
    let out = c.decide("OPTIONS", "/plain/x", &[ORIGIN, ACRM_POST]);
    assert_eq!((out.route.as_str(), out.reason), ("no-preflight", Reason::MissingToken));
    // the announced method must be one the route serves
    let out = c.decide(
        "OPTIONS",
        "/api/orders",
        &[ORIGIN, ("access-control-request-method", "DELETE")],
    );
    assert_eq!(out.reason, Reason::NoRoute);
}

#[test]
fn required_claims_allow_when_every_condition_holds() {
    let c = core();
    let auth = c.bearer(json!({}));
    let out = c.decide("GET", "/api/orders", &[("authorization", &auth)]);
    assert_eq!(
        (out.verdict, out.reason),
        (Verdict::Allow, Reason::Allowed),
        "{}",
        out.description
    );
    assert_eq!(out.upstream["x-auth-subject"], "alice-id");
}

#[test]
fn each_failed_condition_is_a_403_claim_mismatch_naming_claim_requirement_and_value() {
    let c = core();
    let cases = [
        (
            json!({"email_verified": false}),
            "route spa-api needs claim email_verified equal to true; the token has false",
        ),
        (
            json!({"email_verified": "true"}),
            "route spa-api needs claim email_verified equal to true; the token has \"true\"",
        ),
        (
            json!({"groups": ["dev"]}),
            "route spa-api needs claim groups one of [\"admins\", \"ops\"]; the token has [\"dev\"]",
        ),
        (
            json!({"groups": null}),
            "route spa-api needs claim groups one of [\"admins\", \"ops\"]; the token has (absent)",
        ),
        (
            json!({"tenant_id": "corp-eu"}),
            "route spa-api needs claim tenant_id matching \"acme-*\"; the token has \"corp-eu\"",
        ),
        (
            json!({"realm_access": {"roles": ["user"]}}),
            "route spa-api needs claim realm_access.roles one of [\"admin\", \"auditor\"]; the token has [\"user\"]",
        ),
        (
            json!({"https://example.com/level": 2}),
            "route spa-api needs claim https://example.com/level equal to 3; the token has 2",
        ),
    ];
    for (patch, description) in cases {
        let auth = c.bearer(patch.clone());
        let out = c.decide("GET", "/api/orders", &[("authorization", &auth)]);
        assert_eq!(
            (out.verdict, out.reason, out.status),
            (Verdict::Deny, Reason::ClaimMismatch, 403),
            "{patch}"
        );
        assert_eq!(out.description, description);
        assert_eq!(out.body["error"], "claim_mismatch");
        assert_eq!(out.body["error_description"], description);
        let challenge = &out.client["www-authenticate"];
        assert!(
            challenge.starts_with(r#"Bearer realm="audgate", error="insufficient_scope", error_description=""#),
            "{challenge}"
        );
        assert!(!challenge.contains(auth.trim_start_matches("Bearer ")));
        assert!(!out.hints.is_empty(), "a hint for {patch}");
    }
}

#[test]
fn a_claim_mismatch_hint_says_where_the_claim_comes_from() {
    let c = core();
    let auth = c.bearer(json!({"groups": null}));
    let out = c.decide("GET", "/api/orders", &[("authorization", &auth)]);
    assert!(
        out.hints[0].contains("no claim `groups`") && out.hints[0].contains("protocol mapper"),
        "{:?}",
        out.hints
    );
    let auth = c.bearer(json!({"groups": ["dev"]}));
    let out = c.decide("GET", "/api/orders", &[("authorization", &auth)]);
    assert!(
        out.hints[0].contains("claim `groups` must be one of"),
        "{:?}",
        out.hints
    );
}

#[test]
fn a_dry_run_route_records_claim_mismatch_and_allows_with_headers() {
    let c = core();
    let auth = c.bearer(json!({}));
    let out = c.decide("GET", "/dry/x", &[("authorization", &auth)]);
    assert_eq!(
        (out.verdict, out.reason, out.status),
        (Verdict::DryRunDeny, Reason::ClaimMismatch, 200)
    );
    assert_eq!(out.upstream["x-auth-subject"], "alice-id");
}

#[test]
fn explain_lists_each_condition_and_marks_the_failed_one() {
    let c = core();
    let token = c.key.mint(claims(json!({"tenant_id": "corp"})));
    let request = Request {
        method: "GET".into(),
        host: "api.example.com".into(),
        path: "/api/orders".into(),
        route: None,
        token: Some(token),
    };
    let keys = c.keys.clone();
    let e = explain::explain(
        &c.loaded.config.policy,
        &request,
        |_| Some(keys.clone()),
        Signatures::Verify,
        NOW,
    );
    assert_eq!(e.reason, "claim_mismatch");
    assert_eq!(e.exit_code(), 3);
    assert_eq!(e.required_claims.len(), 5);
    assert_eq!(
        e.required_claims[0],
        "email_verified equal to true; the token has true -> holds"
    );
    assert_eq!(
        e.required_claims[2],
        "tenant_id matching \"acme-*\"; the token has \"corp\" -> does NOT hold <- denied here"
    );
    assert!(e.required_claims[4].starts_with("https://example.com/level equal to 3; the token has 3 -> holds"));
    assert_eq!(e.claims["tenant_id"], json!("corp"));
    let text = explain::render_text(&e);
    assert!(text.contains("claims if:  email_verified equal to true"), "{text}");
    assert!(!e.hints.is_empty());
}

fn errors(yaml: &str) -> Vec<(u64, u64, String)> {
    match config::parse(yaml) {
        Ok(_) => panic!("the config loaded:\n{yaml}"),
        Err(e) => e.into_iter().map(|d| (d.line, d.column, d.message)).collect(),
    }
}

#[test]
fn bad_required_claims_are_config_errors_at_their_value() {
    let e = errors(
        r#"issuers:
  kc: { issuer: https://sso.example.com/realms/shop, jwks_file: /dev/null }
routes:
  - name: r
    client_ids: [api]
    required_claims:
      email_verified: ~
      groups: []
      tenant_id: "a*b"
      realm_access..roles: [x]
"#,
    );
    let at: Vec<(u64, u64)> = e.iter().map(|(l, c, _)| (*l, *c)).collect();
    assert_eq!(at, [(7, 23), (8, 15), (9, 18), (10, 28)], "{e:?}");
    assert!(e[0].2.contains("email_verified: null"), "{e:?}");
    assert!(e[3].2.contains("`realm_access..roles` is not a claim path"), "{e:?}");
}

#[test]
fn templated_issuers_are_validated_with_positions() {
    let e = errors(
        r#"issuers:
  a:
    issuer: https://sso.example.com/realms/x{tenant}
    tenants: [shop]
    discovery: true
  b:
    issuer: https://sso.example.com/orgs/{tenant}
    tenant_pattern: "[a-z]+"
    discovery: true
  c:
    issuer: https://sso.example.com/teams/{tenant}
    discovery: true
  d:
    issuer: https://sso.example.com/plain
    tenants: [x]
    jwks_file: /dev/null
  e:
    issuer: https://sso.example.com/e/{tenant}
    tenant_pattern: "^[a-z+$"
    max_tenants: 0
    discovery: true
routes:
  - name: r
    issuers: [d]
    client_ids: [api]
    tenants: [shop]
"#,
    );
    let has = |line: u64, text: &str| {
        assert!(
            e.iter().any(|(l, _, m)| *l == line && m.contains(text)),
            "no error at line {line} with {text:?}: {e:?}"
        )
    };
    has(3, "must be one whole path segment");
    has(11, "exactly one of `tenants` (a list) or `tenant_pattern`");
    has(14, "`tenants` needs `{tenant}` in `issuer`");
    has(19, "does not compile");
    has(20, "max_tenants must be 1 to 10000");
    has(26, "`tenants` needs an issuer with `{tenant}`");
}

#[test]
fn a_templated_issuer_resolves_accepted_tenants_only() {
    let loaded = config::parse(
        r#"issuers:
  realms:
    issuer: https://sso.example.com/realms/{tenant}
    issuer_aliases: ["http://keycloak:8080/realms/{tenant}"]
    tenants: [shop, billing]
    discovery: true
  plain:
    issuer: https://sso.example.com/realms/admin
    jwks_file: /dev/null
claim_headers:
  x-auth-tenant: $tenant
routes:
  - name: shop
    issuers: [realms]
    tenants: [shop]
    client_ids: [api]
"#,
    )
    .unwrap();
    let p = &loaded.config.policy;
    assert_eq!(
        p.resolve_iss("https://sso.example.com/realms/shop"),
        Some((0, Some("shop")))
    );
    assert_eq!(
        p.resolve_iss("http://keycloak:8080/realms/billing"),
        Some((0, Some("billing")))
    );
    assert_eq!(
        p.resolve_iss("https://sso.example.com/realms/admin"),
        Some((1, None)),
        "an exact issuer first"
    );
    assert_eq!(p.resolve_iss("https://sso.example.com/realms/other"), None);
    assert_eq!(
        p.resolve_iss("https://sso.example.com/realms/{tenant}"),
        None,
        "the template is no iss"
    );
    assert_eq!(p.routes.routes()[0].tenants, ["shop"]);
}

#[test]
fn tenant_tokens_are_checked_with_the_tenants_own_keys_and_route_tenants() {
    let loaded = config::parse(
        r#"issuers:
  realms:
    issuer: https://sso.example.com/realms/{tenant}
    tenants: [shop, billing]
    discovery: true
claim_headers:
  x-auth-tenant: $tenant
routes:
  - name: shop
    match: { path_prefix: /shop }
    tenants: [shop]
    client_ids: [api]
    client_id_claims: [aud, azp]
  - name: any
    client_ids: [api]
    client_id_claims: [aud, azp]
"#,
    )
    .unwrap();
    let (shop_key, billing_key) = (TestKey::rsa("s"), TestKey::rsa("b"));
    let set = |k: &TestKey| Arc::new(KeySet::parse(jwks(&[k]).to_string().as_bytes()).unwrap());
    let (shop_keys, billing_keys) = (set(&shop_key), set(&billing_key));
    let policy = &loaded.config.policy;
    let decide = |path: &str, token: &str| {
        let headers = HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
        let input = CheckInput {
            method: "GET",
            host: "h",
            path,
            headers: Headers::Map(&headers),
            route_hint: None,
        };
        let keys = |_, tenant: Option<&str>| match tenant {
            Some("shop") => Some(shop_keys.clone()),
            Some("billing") => Some(billing_keys.clone()),
            _ => None,
        };
        let d = authz::evaluate_tenants(policy, &input, keys, &authz::NoMemo, NOW);
        let r = authz::respond(policy, &d);
        (
            d.reason,
            d.tenant.clone(),
            r.metadata.tenant.to_string(),
            r.upstream_headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        )
    };
    let mint = |k: &TestKey, realm: &str| {
        let iss = format!("https://sso.example.com/realms/{realm}");
        k.mint(merge(
            keycloak_claims(&iss, "api"),
            json!({"iat": NOW - 10, "exp": NOW + 300}),
        ))
    };
    let (reason, tenant, meta, headers) = decide("/shop/x", &mint(&shop_key, "shop"));
    assert_eq!(
        (reason, tenant.as_deref(), meta.as_str()),
        (Reason::Allowed, Some("shop"), "shop")
    );
    assert_eq!(headers, [("x-auth-tenant".to_owned(), "shop".to_owned())]);
    let (reason, ..) = decide("/shop/x", &mint(&billing_key, "billing"));
    assert_eq!(reason, Reason::UnknownIssuer, "the route accepts tenant shop only");
    let (reason, ..) = decide("/any", &mint(&billing_key, "billing"));
    assert_eq!(reason, Reason::Allowed);
    let (reason, ..) = decide("/any", &mint(&shop_key, "billing"));
    assert_eq!(reason, Reason::UnknownKid, "shop's key does not sign for billing");
    let (reason, ..) = decide("/any", &mint(&shop_key, "other"));
    assert_eq!(reason, Reason::UnknownIssuer);
}

#[test]
fn check_config_summary_and_explain_show_the_new_policies() {
    let loaded = config::parse(
        r#"issuers:
  realms:
    issuer: https://sso.example.com/realms/{tenant}
    tenants: [shop, billing]
    jwks_file: /dev/null
  teams:
    issuer: https://sso.example.com/orgs/{tenant}
    tenant_pattern: "^team-[a-z]+$"
    max_tenants: 7
    jwks_file: /dev/null
routes:
  - name: shop
    issuers: [realms]
    tenants: [shop]
    client_ids: [api]
    client_id_claims: [aud, azp]
    allow_cors_preflight: true
    required_claims: { email_verified: true, groups: [a, b] }
"#,
    )
    .unwrap();
    let text = audgate::summary::render(std::path::Path::new("audgate.yaml"), &loaded);
    for expected in [
        "tenants shop, billing",
        "tenants matching ^team-[a-z]+$ (keys on first use, at most 7 at once)",
        "claims email_verified equal to true and groups one of [\"a\", \"b\"]",
        "; tenants shop",
        "CORS preflights pass without a token",
    ] {
        assert!(text.contains(expected), "summary lacks {expected:?}:\n{text}");
    }
    let key = TestKey::rsa("s");
    let keys = Arc::new(KeySet::parse(jwks(&[&key]).to_string().as_bytes()).unwrap());
    let token = key.mint(merge(
        keycloak_claims("https://sso.example.com/realms/shop", "api"),
        json!({"iat": NOW - 10, "exp": NOW + 300, "email_verified": true, "groups": ["b"]}),
    ));
    let request = Request {
        method: "GET".into(),
        host: "h".into(),
        path: "/".into(),
        route: None,
        token: Some(token),
    };
    let e = explain::explain(
        &loaded.config.policy,
        &request,
        |_| Some(keys.clone()),
        Signatures::Verify,
        NOW,
    );
    assert_eq!(e.reason, "allowed", "{e:?}");
    let text = explain::render_text(&e);
    assert!(
        text.contains("issuer:     realms, tenant shop (https://sso.example.com/realms/shop)"),
        "{text}"
    );
    assert!(
        text.contains("groups one of [\"a\", \"b\"]; the token has [\"b\"] -> holds"),
        "{text}"
    );
}

/// Readiness: a listed tenant whose keys never loaded keeps the instance unready, named with its
/// issuer; pattern tenants never do.
#[tokio::test]
async fn listed_tenants_count_for_readiness_and_pattern_tenants_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::rsa("s");
    std::fs::write(dir.path().join("shop.json"), jwks(&[&key]).to_string()).unwrap();
    let yaml = format!(
        r#"issuers:
  realms:
    issuer: https://sso.example.com/realms/{{tenant}}
    tenants: [shop, gone]
    jwks_file: {dir}/{{tenant}}.json
  teams:
    issuer: https://sso.example.com/orgs/{{tenant}}
    tenant_pattern: "^[a-z]+$"
    jwks_file: {dir}/{{tenant}}.json
routes:
  - name: r
    client_ids: [api]
"#,
        dir = dir.path().display()
    );
    let loaded = config::parse(&yaml).unwrap();
    let (store, fresh) = audgate::jwks::KeyStore::build(&loaded.config, None).unwrap();
    assert_eq!(fresh.len(), 2, "one cache a listed tenant, none for the pattern");
    for keys in &fresh {
        keys.refresh().await;
    }
    assert_eq!(store.missing(), ["realms (tenant gone)"]);
    assert!(store.current_for(0, Some("shop")).is_some());
    assert!(store.current_for(0, Some("gone")).is_none());
    assert!(store.current_for(0, None).is_none(), "the template itself has no keys");
    // a pattern tenant loads on first use (and is then held)
    assert!(store.current_for(1, Some("shop")).is_none());
    assert!(store.refetch(1, Some("shop"), 0).await);
    assert!(store.current_for(1, Some("shop")).is_some());
    assert_eq!(store.tenants(1).unwrap().held(), 1);
    assert_eq!(store.missing(), ["realms (tenant gone)"]);
}
