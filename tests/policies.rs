//! Issue 14's policies through the core's public API: CORS preflight (`allow_cors_preflight`)
//! and claim conditions (`required_claims`), with the response, hint and explanation each
//! produces. No network: keys are generated here, `now` is fixed.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use audgate::authz::{self, CheckInput, Reason, Verdict};
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
            headers: &headers,
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
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            removed: resp.remove_headers.iter().map(|h| h.to_string()).collect(),
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
