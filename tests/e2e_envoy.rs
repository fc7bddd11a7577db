//! End-to-end tests: a real Envoy 1.40 in front of the echo upstream, deciding with audgate, which
//! loads keys from an in-process OIDC issuer. Every case runs in both modes (`both_modes!`):
//! Envoy asking the real `audgate serve` binary over gRPC ext_authz
//! (tests/envoy/ext_authz_grpc.yaml), and Envoy running audgate in process as a dynamic module
//! (libaudgate_envoy.so, tests/envoy/dynamic_module.yaml). Every token is minted at test time
//! with keys generated at test time.
//!
//! Envoy is found by `common::envoy_binary()` ($AUDGATE_TEST_ENVOY, `envoy` on PATH, or
//! `.venv/bin/envoy`); without it these tests fail with the install command.
//!
//! Each test function starts its own stack (about a second) and covers one theme with several
//! requests.

mod common;

use std::time::Duration;

use common::{
    IssuerServer, Mode, ModeStack, Reply, TestKey, assert_deny, assert_upstream, decode_payload, free_port, hs256_jws,
    keycloak_claims, merge, now, random_hex, str_claim, unsigned_jws,
};
use serde_json::{Value, json};

/// Each end-to-end case runs in both modes, from this one list: `CASE::ext_authz` (Envoy asks
/// `audgate serve` over gRPC ext_authz, tests/envoy/ext_authz_grpc.yaml) and `CASE::module`
/// (Envoy runs audgate in process as a dynamic module, tests/envoy/dynamic_module.yaml).
macro_rules! both_modes {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread")]
            async fn ext_authz() {
                super::$case(super::Mode::ExtAuthz).await;
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn module() {
                super::$case(super::Mode::Module).await;
            }
        }
    };
}

/// The audgate config shared by most tests (`listen` is added by the harness).
///
/// Routes, in match order:
/// - `ctx-orders`: only reachable by name (Envoy's `/ctx` context extension); its host never
///   appears in a request. Client `ctx-client`.
/// - `ctx-by-path`: what `/ctx...` would match by path. Client `path-client`.
/// - `health`: anonymous.
/// - `strict`: `client_ids: [my-app]` with the default `client_id_claims: [aud]`.
/// - `keycloak`: `client_ids: [my-app]`, `client_id_claims: [aud, azp]`.
/// - `scoped`: like `keycloak`, plus `required_scopes: [orders:write]`.
/// - `admin`: like `keycloak`, plus `required_roles: [admin, "my-app:user"]`.
/// - `api-host`: host `api.example.test`, path `/v1`, client `my-app` in `azp`.
///
/// `default: deny`.
fn standard_config(issuer: &str) -> String {
    format!(
        r#"
issuers:
  test:
    issuer: {issuer}
    discovery: true
    refresh_interval: 5m
    min_refresh_interval: 30s
    leeway: 30s

claim_headers:
  x-auth-subject: sub
  x-auth-issuer: iss
  x-auth-client-id: $client_id
  x-auth-roles: realm_access.roles
  x-auth-email: email

routes:
  - name: ctx-orders
    match: {{ hosts: [ctx-only.invalid], path_prefix: / }}
    client_ids: [ctx-client]
    client_id_claims: [aud, azp]
  - name: ctx-by-path
    match: {{ path_prefix: /ctx }}
    client_ids: [path-client]
    client_id_claims: [aud, azp]
  - name: health
    match: {{ path_prefix: /health }}
    allow_anonymous: true
  - name: strict
    match: {{ path_prefix: /strict }}
    client_ids: [my-app]
  - name: keycloak
    match: {{ path_prefix: /app }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]
  - name: scoped
    match: {{ path_prefix: /scoped }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]
    required_scopes: ["orders:write"]
  - name: admin
    match: {{ path_prefix: /admin }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]
    required_roles: [admin, "my-app:user"]
  - name: api-host
    match: {{ hosts: [api.example.test], path_prefix: /v1 }}
    client_ids: [my-app]
    client_id_claims: [azp]

default: deny
"#
    )
}

/// Starts the standard stack with one RSA and one EC key and waits until audgate has loaded them.
async fn standard_stack(mode: Mode) -> (ModeStack, TestKey, TestKey) {
    let rsa = TestKey::rsa("rsa-1");
    let ec = TestKey::ec("ec-1");
    let stack = ModeStack::start(mode, &[&rsa, &ec], standard_config).await;
    let token = rsa.mint(keycloak_claims(&stack.issuer.issuer_url(), "my-app"));
    let reply = stack.wait_ready("/app/ready", &token).await;
    assert_eq!(
        reply.status,
        200,
        "a valid Keycloak token on route `keycloak` must be allowed\n{reply}\n{}",
        stack.logs()
    );
    (stack, rsa, ec)
}

/// Checks Envoy counted as errors: ext_authz's `error` stat, or the module's
/// `audgate_checks_total{decision="error"}` summed over routes and reasons (handed to Envoy's
/// stats within about a second).
async fn error_count(stack: &ModeStack) -> u64 {
    match stack.mode {
        Mode::ExtAuthz => stack.envoy_stat("http.ingress.ext_authz.error").await.unwrap_or(0),
        Mode::Module => common::module_checks(&stack.envoy_prometheus().await, |labels| {
            labels.get("decision").map(String::as_str) == Some("error")
        }),
    }
}

/// A 401 for an invalid token (the challenge is checked by `assert_deny`).
fn assert_invalid_token(reply: &Reply, reason: &str, token: &str, context: &str) {
    assert_deny(reply, 401, reason, Some(token), context);
}

// ---------------------------------------------------------------------------------------------
// Harness checks that need neither audgate nor a full stack
// ---------------------------------------------------------------------------------------------

/// The Envoy template renders without leftover placeholders and `envoy --mode validate` accepts it.
#[test]
fn envoy_template_validates() {
    let template = std::fs::read_to_string(common::envoy_template_path())
        .unwrap_or_else(|e| panic!("cannot read the Envoy template: {e}"));
    for placeholder in [
        "{{LISTEN_PORT}}",
        "{{ADMIN_PORT}}",
        "{{AUDGATE_GRPC_PORT}}",
        "{{UPSTREAM_PORT}}",
    ] {
        assert!(template.contains(placeholder), "template lacks {placeholder}");
    }
    let ports = common::EnvoyPorts {
        listen: free_port(),
        admin: free_port(),
        audgate_grpc: free_port(),
        upstream: free_port(),
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, common::render_envoy_config(&ports))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    let output = common::validate_envoy_config(&path);
    assert!(output.contains("OK"), "unexpected validate output:\n{output}");
}

/// The issuer server, the echo upstream and the token minting work, independently of audgate:
/// tokens verify with the `jsonwebtoken` crate against the published JWKs.
/// The examples under deploy/envoy must load in the Envoy we test against.
#[test]
fn deploy_envoy_examples_validate() {
    for file in ["envoy.yaml", "envoy-http-service.yaml"] {
        common::validate_envoy_config(&common::repo_root().join("deploy/envoy").join(file));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn harness_self_test() {
    let rsa = TestKey::rsa("self-rsa");
    let ec = TestKey::ec("self-ec");
    let issuer = IssuerServer::start(&[&rsa, &ec]).await;
    let client = common::http_client();

    let discovery: Value = serde_json::from_str(&common::get(&client, &issuer.discovery_url(), "", &[]).await.body)
        .expect("discovery document is JSON");
    assert_eq!(discovery["issuer"], json!(issuer.issuer_url()));
    assert_eq!(discovery["jwks_uri"], json!(issuer.jwks_uri()));
    assert!(issuer.issuer_url().starts_with("http://127.0.0.1:") && issuer.issuer_url().ends_with("/realms/test"));

    let reply = common::get(&client, &issuer.jwks_uri(), "", &[]).await;
    assert_eq!(reply.header("cache-control"), Some("no-cache"));
    let jwks = reply.json();
    let keys = jwks["keys"].as_array().expect("keys array");
    assert_eq!(keys.len(), 2);
    assert_eq!(issuer.jwks_fetches(), 1);
    assert_eq!(issuer.discovery_fetches(), 1);
    let rsa_jwk = &keys[0];
    assert_eq!(rsa_jwk["kty"], "RSA");
    assert_eq!(rsa_jwk["kid"], "self-rsa");
    assert_eq!(rsa_jwk["e"], "AQAB");
    assert_eq!(rsa_jwk["use"], "sig");
    // 2048-bit modulus: 256 bytes → 342 base64url characters, no padding.
    assert_eq!(rsa_jwk["n"].as_str().map(str::len), Some(342));
    let ec_jwk = &keys[1];
    assert_eq!(ec_jwk["kty"], "EC");
    assert_eq!(ec_jwk["crv"], "P-256");
    assert_eq!(ec_jwk["x"].as_str().map(str::len), Some(43));
    assert_eq!(ec_jwk["y"].as_str().map(str::len), Some(43));

    // Tokens verify with an independent JOSE implementation.
    let claims = merge(
        keycloak_claims(&issuer.issuer_url(), "my-app"),
        json!({"aud": ["my-app", "account"]}),
    );
    for (key, jwk, alg) in [
        (&rsa, rsa_jwk, jsonwebtoken::Algorithm::RS256),
        (&ec, ec_jwk, jsonwebtoken::Algorithm::ES256),
    ] {
        let token = key.mint(claims.clone());
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(jwk.clone()).expect("JWK parses as jsonwebtoken::jwk::Jwk");
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("usable JWK");
        let mut validation = jsonwebtoken::Validation::new(alg);
        validation.set_audience(&["my-app"]);
        validation.set_issuer(&[issuer.issuer_url()]);
        let data = jsonwebtoken::decode::<Value>(&token, &decoding, &validation)
            .unwrap_or_else(|e| panic!("{alg:?} token does not verify: {e}"));
        assert_eq!(data.claims, claims);
        assert_eq!(data.header.kid.as_deref(), Some(key.kid.as_str()));
        assert_eq!(decode_payload(&token), claims);
        // ES256 signatures are fixed-size r||s (64 bytes → 86 characters).
        if alg == jsonwebtoken::Algorithm::ES256 {
            assert_eq!(token.rsplit('.').next().map(str::len), Some(86));
        }
    }

    // Key replacement and the fetch counter.
    let rotated = TestKey::ec("self-ec-2");
    issuer.set_keys(&[&rotated]);
    let jwks = common::get(&client, &issuer.jwks_uri(), "", &[]).await.json();
    assert_eq!(jwks["keys"][0]["kid"], "self-ec-2");
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(1));
    assert_eq!(issuer.jwks_fetches(), 2);
    let dead = format!("http://127.0.0.1:{}/certs", free_port());
    issuer.set_jwks_uri_override(Some(dead.clone()));
    let discovery = common::get(&client, &issuer.discovery_url(), "", &[]).await.json();
    assert_eq!(discovery["jwks_uri"], json!(dead));

    // The echo upstream reports what it received.
    let echo = common::EchoServer::start().await;
    let reply = common::get(
        &client,
        &echo.url(),
        "/some/path?x=1",
        &[("X-Test", "a"), ("host", "orders.example.com")],
    )
    .await;
    let body = reply.json();
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/some/path?x=1");
    assert_eq!(reply.upstream("x-test").as_deref(), Some("a"));
    assert_eq!(reply.upstream("host").as_deref(), Some("orders.example.com"));

    // Helpers for deliberately broken tokens.
    let none = unsigned_jws(&json!({"alg": "none", "typ": "JWT"}), &claims);
    assert!(none.ends_with('.') && none.split('.').count() == 3);
    let hs = hs256_jws(b"secret", &json!({"alg": "HS256"}), &claims);
    assert_eq!(hs.split('.').count(), 3);
    assert_eq!(
        merge(json!({"a": 1, "b": {"c": 2}}), json!({"a": null, "b": {"d": 3}})),
        json!({"b": {"c": 2, "d": 3}})
    );
}

// ---------------------------------------------------------------------------------------------
// Through Envoy against the real binary
// ---------------------------------------------------------------------------------------------

both_modes!(allow_sets_claim_headers_and_strips_spoofed_ones);
/// Allow: the claim headers as the upstream sees them, spoofed copies overwritten or removed,
/// anonymous routes, and a route where Envoy skips ext_authz.
async fn allow_sets_claim_headers_and_strips_spoofed_ones(mode: Mode) {
    let (stack, rsa, ec) = standard_stack(mode).await;
    let iss = stack.issuer.issuer_url();

    // RS256 Keycloak token on the aud/azp route.
    let claims = keycloak_claims(&iss, "my-app");
    let token = rsa.mint(claims.clone());
    let reply = stack.get_with_token("/app/orders?page=2", &token, &[]).await;
    let sub = str_claim(&claims, "sub");
    assert_upstream(
        &reply,
        &[
            ("x-auth-subject", Some(sub)),
            ("x-auth-issuer", Some(iss.as_str())),
            ("x-auth-client-id", Some("my-app")),
            (
                "x-auth-roles",
                Some("offline_access,uma_authorization,default-roles-test"),
            ),
            ("x-auth-email", None),
        ],
        "RS256 Keycloak token on /app",
    );
    assert_eq!(
        reply.json()["path"],
        "/app/orders?page=2",
        "the upstream must see the original path"
    );
    // The decision is returned as dynamic metadata; the Envoy template copies the route into a
    // response header.
    assert_eq!(
        reply.header("x-test-audgate-route"),
        Some("keycloak"),
        "dynamic metadata envoy.filters.http.ext_authz:audgate:route\nreply:\n{reply}"
    );

    // Spoofed claim headers: the ones audgate sets are overwritten, the configured one the token
    // cannot fill (no `email` claim) is removed; unrelated headers pass.
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
            ("x-auth-subject", Some(sub)),
            ("x-auth-issuer", Some(iss.as_str())),
            ("x-auth-client-id", Some("my-app")),
            (
                "x-auth-roles",
                Some("offline_access,uma_authorization,default-roles-test"),
            ),
            ("x-auth-email", None),
            ("x-unrelated", Some("kept")),
        ],
        "spoofed claim headers with a valid token",
    );

    // ES256 token with an `email` claim and an RFC 9068 header typ: every configured header is set.
    let claims = merge(
        keycloak_claims(&iss, "my-app"),
        json!({"email": "alice@example.com", "email_verified": true,
               "realm_access": {"roles": ["orders-reader"]}}),
    );
    let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": ec.kid});
    let token = ec.sign(&header, &claims);
    let reply = stack
        .get_with_token("/app/x", &token, &[("x-auth-email", "spoofed@example.com")])
        .await;
    assert_upstream(
        &reply,
        &[
            ("x-auth-subject", Some(str_claim(&claims, "sub"))),
            ("x-auth-client-id", Some("my-app")),
            ("x-auth-roles", Some("orders-reader")),
            ("x-auth-email", Some("alice@example.com")),
        ],
        "ES256 token with typ at+jwt and an email claim",
    );

    // Anonymous route: no token needed, but spoofed claim headers are still stripped.
    let reply = stack
        .get(
            "/health/live",
            &[
                ("x-auth-subject", "admin"),
                ("x-auth-client-id", "trusted-backend"),
                ("x-auth-issuer", "https://evil.example"),
                ("x-auth-roles", "admin"),
                ("x-auth-email", "boss@example.com"),
            ],
        )
        .await;
    assert_upstream(
        &reply,
        &[
            ("x-auth-subject", None),
            ("x-auth-client-id", None),
            ("x-auth-issuer", None),
            ("x-auth-roles", None),
            ("x-auth-email", None),
        ],
        "anonymous route with spoofed claim headers",
    );

    // Envoy skips ext_authz on /public entirely (per-route `disabled: true`).
    let reply = stack.get("/public/logo.png", &[]).await;
    assert_eq!(reply.status, 200, "/public bypasses ext_authz\n{reply}");
}

both_modes!(keycloak_audience_versus_azp);
/// Keycloak >= 4.6 tokens carry `aud: "account"` and the client id in `azp`: denied on a route
/// that checks only `aud`, allowed where the route accepts `azp`.
async fn keycloak_audience_versus_azp(mode: Mode) {
    let (stack, rsa, _ec) = standard_stack(mode).await;
    let iss = stack.issuer.issuer_url();

    let modern = keycloak_claims(&iss, "my-app");
    assert_eq!(modern["aud"], "account");
    let token = rsa.mint(modern.clone());

    let reply = stack.get_with_token("/strict/orders", &token, &[]).await;
    assert_deny(
        &reply,
        403,
        "audience_mismatch",
        Some(&token),
        "aud=account, azp=my-app on a route with client_id_claims [aud]",
    );
    let description = reply.json()["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        description.contains("aud") && description.contains("my-app"),
        "the description should name the claim and the expected client id: {description:?}"
    );

    let reply = stack.get_with_token("/app/orders", &token, &[]).await;
    assert_upstream(
        &reply,
        &[
            ("x-auth-client-id", Some("my-app")),
            ("x-auth-subject", Some(str_claim(&modern, "sub"))),
        ],
        "aud=account, azp=my-app on a route with client_id_claims [aud, azp]",
    );

    // With an audience mapper (aud contains the client id) the strict route allows too.
    let mapped = merge(modern.clone(), json!({"aud": ["my-app", "account"]}));
    let token = rsa.mint(mapped.clone());
    let reply = stack.get_with_token("/strict/orders", &token, &[]).await;
    assert_upstream(
        &reply,
        &[("x-auth-client-id", Some("my-app"))],
        "aud=[my-app, account] on the strict route",
    );

    // azp is only accepted where configured, and a different azp is still a mismatch.
    let other = keycloak_claims(&iss, "other-app");
    let token = rsa.mint(other);
    let reply = stack.get_with_token("/app/orders", &token, &[]).await;
    assert_deny(
        &reply,
        403,
        "audience_mismatch",
        Some(&token),
        "azp=other-app on a route for my-app",
    );
}

both_modes!(token_problems_are_401_with_reason);
/// Every token problem is a 401 with `WWW-Authenticate` and a JSON body naming the reason.
async fn token_problems_are_401_with_reason(mode: Mode) {
    let (stack, rsa, ec) = standard_stack(mode).await;
    let iss = stack.issuer.issuer_url();
    let good = keycloak_claims(&iss, "my-app");
    let path = "/app/orders";

    // missing_token: exactly `Bearer realm="audgate"` (RFC 6750 §3.1: no error code).
    let reply = stack.get(path, &[]).await;
    assert_deny(&reply, 401, "missing_token", None, "no Authorization header");
    assert_eq!(
        reply.header("www-authenticate"),
        Some(r#"Bearer realm="audgate""#),
        "missing_token WWW-Authenticate\n{reply}"
    );

    let now = now();
    let unpublished = TestKey::rsa("rsa-1"); // same kid as the published key, different key
    let stranger = TestKey::ec(&format!("unpublished-{}", random_hex(6)));
    let mut tampered = rsa.mint(good.clone());
    {
        // Swap the payload for one with another subject, keep the original signature.
        let mut parts: Vec<&str> = tampered.split('.').collect();
        let forged = common::b64url(merge(good.clone(), json!({"sub": "admin"})).to_string());
        parts[1] = &forged;
        tampered = parts.join(".");
    }

    let cases: Vec<(&str, &str, String)> = vec![
        // malformed_token
        ("not a JWS", "malformed_token", "not-a-jwt".to_owned()),
        (
            "parts that are not base64url JSON",
            "malformed_token",
            "aaa.bbb.ccc".to_owned(),
        ),
        (
            "token without exp",
            "malformed_token",
            rsa.mint(merge(good.clone(), json!({"exp": null}))),
        ),
        (
            "token over max_bytes (16384)",
            "malformed_token",
            rsa.mint(merge(good.clone(), json!({"padding": "x".repeat(17_000)}))),
        ),
        // wrong_token_type
        (
            "Keycloak ID token (typ ID)",
            "wrong_token_type",
            rsa.mint(merge(good.clone(), json!({"typ": "ID"}))),
        ),
        (
            "Keycloak refresh token (typ Refresh)",
            "wrong_token_type",
            rsa.mint(merge(good.clone(), json!({"typ": "Refresh"}))),
        ),
        (
            "header typ dpop+jwt",
            "wrong_token_type",
            rsa.sign(&json!({"alg": "RS256", "typ": "dpop+jwt", "kid": rsa.kid}), &good),
        ),
        // unsupported_alg
        (
            "alg none",
            "unsupported_alg",
            unsigned_jws(&json!({"alg": "none", "typ": "JWT", "kid": rsa.kid}), &good),
        ),
        (
            "HS256 keyed with the RSA public key",
            "unsupported_alg",
            hs256_jws(
                &rsa.public_key_bytes(),
                &json!({"alg": "HS256", "typ": "JWT", "kid": rsa.kid}),
                &good,
            ),
        ),
        // unknown_issuer
        (
            "iss of another realm",
            "unknown_issuer",
            rsa.mint(merge(
                good.clone(),
                json!({"iss": format!("http://127.0.0.1:{}/realms/other", free_port())}),
            )),
        ),
        // unknown_kid
        ("kid not in the JWKS", "unknown_kid", stranger.mint(good.clone())),
        // bad_signature
        (
            "published kid, signed by another key",
            "bad_signature",
            unpublished.mint(good.clone()),
        ),
        ("payload changed after signing", "bad_signature", tampered),
        ("ES256 signature with one bit flipped", "bad_signature", {
            let input = common::signing_input(&ec.header(), &good);
            let mut sig = ec.sign_bytes(input.as_bytes());
            sig[10] ^= 0x01;
            format!("{input}.{}", common::b64url(sig))
        }),
        // expired / not_yet_valid (well outside the 30 s leeway)
        (
            "expired ten minutes ago",
            "expired",
            rsa.mint(merge(
                good.clone(),
                json!({"exp": now - 600, "iat": now - 900, "auth_time": now - 900}),
            )),
        ),
        (
            "nbf ten minutes ahead",
            "not_yet_valid",
            rsa.mint(merge(good.clone(), json!({"nbf": now + 600, "exp": now + 900}))),
        ),
        (
            "iat ten minutes ahead",
            "not_yet_valid",
            rsa.mint(merge(good.clone(), json!({"iat": now + 600, "exp": now + 900}))),
        ),
    ];

    let mut failures = Vec::new();
    for (label, reason, token) in &cases {
        let reply = stack.get_with_token(path, token, &[]).await;
        // Collect every failure so one run shows the whole picture.
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert_invalid_token(&reply, reason, token, label);
        })) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(message);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} token cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );

    // A token that is fine is still allowed afterwards (nothing above poisoned a cache).
    let token = rsa.mint(good);
    let reply = stack.get_with_token(path, &token, &[]).await;
    assert_eq!(reply.status, 200, "valid token after the bad ones\n{reply}");
}

both_modes!(authorization_problems_are_403);
/// Authorization problems are 403: audience, scope and role, and no matching route.
async fn authorization_problems_are_403(mode: Mode) {
    let (stack, rsa, ec) = standard_stack(mode).await;
    let iss = stack.issuer.issuer_url();
    let good = keycloak_claims(&iss, "my-app");

    // insufficient_scope: a required scope is missing.
    let token = rsa.mint(good.clone());
    let reply = stack.get_with_token("/scoped/orders", &token, &[]).await;
    assert_deny(
        &reply,
        403,
        "insufficient_scope",
        Some(&token),
        "scope lacks orders:write",
    );
    let www = reply.header("www-authenticate").unwrap_or_default();
    assert!(
        www.contains(r#"error="insufficient_scope""#),
        "insufficient_scope must be named in WWW-Authenticate (RFC 6750), got {www:?}\n{reply}"
    );
    // ... present in `scope` (space separated) or `scp` (array): allowed.
    let token = rsa.mint(merge(good.clone(), json!({"scope": "openid orders:write profile"})));
    let reply = stack.get_with_token("/scoped/orders", &token, &[]).await;
    assert_eq!(reply.status, 200, "scope contains orders:write\n{reply}");
    let token = ec.mint(merge(
        good.clone(),
        json!({"scope": null, "scp": ["orders:read", "orders:write"]}),
    ));
    let reply = stack.get_with_token("/scoped/orders", &token, &[]).await;
    assert_eq!(reply.status, 200, "scp contains orders:write\n{reply}");

    // insufficient_scope: a required role (realm role `admin`) is missing.
    let token = rsa.mint(good.clone());
    let reply = stack.get_with_token("/admin/users", &token, &[]).await;
    assert_deny(
        &reply,
        403,
        "insufficient_scope",
        Some(&token),
        "realm role admin missing",
    );
    // Realm role `admin` plus client role `my-app:user` (resource_access.my-app.roles).
    let with_admin = merge(
        good.clone(),
        json!({"realm_access": {"roles": ["offline_access", "admin"]}}),
    );
    let token = rsa.mint(with_admin.clone());
    let reply = stack.get_with_token("/admin/users", &token, &[]).await;
    assert_eq!(reply.status, 200, "both roles present\n{reply}");
    let token = rsa.mint(merge(
        with_admin,
        json!({"resource_access": {"my-app": {"roles": ["viewer"]}}}),
    ));
    let reply = stack.get_with_token("/admin/users", &token, &[]).await;
    assert_deny(
        &reply,
        403,
        "insufficient_scope",
        Some(&token),
        "client role my-app:user missing",
    );

    // audience_mismatch on the strict route.
    let token = rsa.mint(good.clone());
    let reply = stack.get_with_token("/strict/x", &token, &[]).await;
    assert_deny(&reply, 403, "audience_mismatch", Some(&token), "aud=account on /strict");

    // no_route with `default: deny`: a host no route matches...
    let reply = stack
        .get_with_token("/v1/items", &token, &[("host", "other.example.test")])
        .await;
    assert_deny(
        &reply,
        403,
        "no_route",
        Some(&token),
        "host other.example.test, path /v1/items",
    );
    // ... while the host route matches (port ignored).
    let reply = stack
        .get_with_token("/v1/items", &token, &[("host", "api.example.test:8443")])
        .await;
    assert_upstream(
        &reply,
        &[("x-auth-client-id", Some("my-app"))],
        "host api.example.test:8443 on route api-host",
    );
}

both_modes!(context_extension_selects_route);
/// Envoy's per-route `context_extensions` pick the audgate route by name.
async fn context_extension_selects_route(mode: Mode) {
    let (stack, rsa, _ec) = standard_stack(mode).await;
    let iss = stack.issuer.issuer_url();
    let ctx_token = rsa.mint(keycloak_claims(&iss, "ctx-client"));
    let path_token = rsa.mint(keycloak_claims(&iss, "path-client"));

    // /ctx carries audgate.route=ctx-orders: the ctx-client token is allowed although by host and
    // path the request matches route ctx-by-path (client path-client) ...
    let reply = stack.get_with_token("/ctx/orders", &ctx_token, &[]).await;
    assert_upstream(
        &reply,
        &[("x-auth-client-id", Some("ctx-client"))],
        "/ctx with a ctx-client token (route chosen by context extension)",
    );
    assert_eq!(
        reply.header("x-test-audgate-route"),
        Some("ctx-orders"),
        "dynamic metadata route\n{reply}"
    );
    // ... and the path-client token, which ctx-by-path would allow, is denied by ctx-orders.
    let reply = stack.get_with_token("/ctx/orders", &path_token, &[]).await;
    assert_deny(
        &reply,
        403,
        "audience_mismatch",
        Some(&path_token),
        "/ctx with a path-client token must be decided by route ctx-orders",
    );

    // An unknown route name is a deny (no_route), never a fallback to matching or to `default`.
    for token in [&path_token, &ctx_token] {
        let reply = stack.get_with_token("/ctx-unknown/orders", token, &[]).await;
        assert_deny(
            &reply,
            403,
            "no_route",
            Some(token),
            "/ctx-unknown carries audgate.route=no-such-route",
        );
    }
}

both_modes!(key_rotation_and_refetch_rate_limit);
/// A key rotated in under a new `kid` is fetched on first use; unknown kids cannot make audgate
/// hammer the JWKS endpoint (`min_refresh_interval`); a withdrawn key stops working.
async fn key_rotation_and_refetch_rate_limit(mode: Mode) {
    let old_key = TestKey::rsa("rotating-1");
    let new_key = TestKey::ec("rotating-2");
    let steady_key = TestKey::rsa("steady-1");
    let steady = IssuerServer::start_at("/realms/steady", &[&steady_key]).await;
    let steady_url = steady.issuer_url();
    let stack = ModeStack::start(mode, &[&old_key], |rotating_url| {
        format!(
            r#"
issuers:
  rotating:
    issuer: {rotating_url}
    discovery: true
    refresh_interval: 5m
    min_refresh_interval: 1s
  steady:
    issuer: {steady_url}
    discovery: true
    refresh_interval: 5m
    min_refresh_interval: 30s

routes:
  - name: app
    match: {{ path_prefix: / }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]

default: deny
"#
        )
    })
    .await;
    let rotating = &stack.issuer;

    // Phase 1: the original key works (and the token is now possibly cached).
    let old_token = old_key.mint(keycloak_claims(&rotating.issuer_url(), "my-app"));
    let reply = stack.wait_ready("/orders", &old_token).await;
    assert_eq!(reply.status, 200, "original key\n{reply}\n{}", stack.logs());
    let steady_token = steady_key.mint(keycloak_claims(&steady_url, "my-app"));
    let reply = stack.wait_ready("/orders", &steady_token).await;
    assert_eq!(reply.status, 200, "steady issuer\n{reply}\n{}", stack.logs());

    // Phase 2: rotate. Wait out min_refresh_interval (1 s) so a refetch is permitted, publish only
    // the new key and use it: audgate must refetch on the unknown kid and allow.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = rotating.jwks_fetches();
    rotating.set_keys(&[&new_key]);
    let new_claims = keycloak_claims(&rotating.issuer_url(), "my-app");
    let new_token = new_key.mint(new_claims.clone());
    let reply = stack.get_with_token("/orders", &new_token, &[]).await;
    assert_upstream(
        &reply,
        &[("x-auth-subject", Some(str_claim(&new_claims, "sub")))],
        "token signed by the rotated-in key",
    );
    assert!(
        rotating.jwks_fetches() > before,
        "audgate allowed a new kid without refetching the JWKS?"
    );

    // The withdrawn key (same token as in phase 1, which may be cached) no longer works.
    let reply = stack.get_with_token("/orders", &old_token, &[]).await;
    assert_invalid_token(&reply, "unknown_kid", &old_token, "token of a key the issuer withdrew");

    // Phase 3: a burst of unknown kids against the steady issuer (min_refresh_interval 30 s)
    // causes at most one JWKS fetch.
    let attacker = TestKey::ec("attacker");
    let before = steady.jwks_fetches();
    for _ in 0..8 {
        let kid = format!("random-{}", random_hex(8));
        let token = attacker.sign(
            &json!({"alg": "ES256", "typ": "JWT", "kid": kid}),
            &keycloak_claims(&steady_url, "my-app"),
        );
        let reply = stack.get_with_token("/orders", &token, &[]).await;
        assert_invalid_token(&reply, "unknown_kid", &token, "random unknown kid");
    }
    let fetched = steady.jwks_fetches() - before;
    assert!(
        fetched <= 1,
        "8 unknown kids within min_refresh_interval caused {fetched} JWKS fetches (at most 1 allowed)\n{}",
        stack.logs()
    );
    // The steady issuer's real key is unaffected.
    let reply = stack.get_with_token("/orders", &steady_token, &[]).await;
    assert_eq!(reply.status, 200, "steady key after the burst\n{reply}");
}

both_modes!(keys_unavailable_is_503_and_dry_run_allows);
/// An issuer whose keys were never loaded is an error (503 through a fail-closed Envoy), on any
/// route including `dry_run`; `dry_run` otherwise allows what it would deny.
async fn keys_unavailable_is_503_and_dry_run_allows(mode: Mode) {
    let good_key = TestKey::rsa("good-1");
    let down_key = TestKey::rsa("down-1");
    // Discovery works but the advertised jwks_uri is a closed port.
    let down_discovery = IssuerServer::start_at("/realms/down-discovery", &[&down_key]).await;
    let closed = free_port();
    down_discovery.set_jwks_uri_override(Some(format!(
        "http://127.0.0.1:{closed}/realms/down-discovery/protocol/openid-connect/certs"
    )));
    let down_discovery_url = down_discovery.issuer_url();
    // No server at all behind this issuer's jwks_uri.
    let down_direct_url = format!("http://127.0.0.1:{}/realms/down-direct", free_port());

    let stack = ModeStack::start(mode, &[&good_key], |good_url| {
        format!(
            r#"
issuers:
  good:
    issuer: {good_url}
    discovery: true
  down-discovery:
    issuer: {down_discovery_url}
    discovery: true
  down-direct:
    issuer: {down_direct_url}
    jwks_uri: {down_direct_url}/protocol/openid-connect/certs

routes:
  - name: dry
    match: {{ path_prefix: /dry }}
    client_ids: [nobody]
    mode: dry_run
  - name: app
    match: {{ path_prefix: / }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]

default: deny
"#
        )
    })
    .await;
    let good_token = good_key.mint(keycloak_claims(&stack.issuer.issuer_url(), "my-app"));
    let reply = stack.wait_ready("/orders", &good_token).await;
    assert_eq!(reply.status, 200, "good issuer\n{reply}\n{}", stack.logs());

    let errors_before = error_count(&stack).await;
    let mut unavailable = 0;
    for (label, iss) in [
        ("discovery ok, jwks_uri down", &down_discovery_url),
        ("jwks_uri down", &down_direct_url),
    ] {
        let token = down_key.mint(keycloak_claims(iss, "my-app"));
        for path in ["/orders", "/dry/orders"] {
            let reply = stack.get_with_token(path, &token, &[]).await;
            assert_eq!(
                reply.status,
                503,
                "{label}, {path}: keys_unavailable must be a 503 error\n{reply}\n{}",
                stack.logs()
            );
            if let Some(code) = reply.error_code() {
                assert_eq!(code, "keys_unavailable", "{label}, {path}\n{reply}");
            }
            unavailable += 1;
        }
    }
    // Envoy counted these as errors, not as denials: ext_authz's error_response, or the
    // module's decision=error count.
    // (the module hands its counts to Envoy's stats once a second)
    let mut errors_after = error_count(&stack).await;
    for _ in 0..50 {
        if errors_after >= errors_before + unavailable {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        errors_after = error_count(&stack).await;
    }
    assert!(
        errors_after >= errors_before + unavailable,
        "expected {unavailable} more errors in Envoy (before {errors_before}, after \
         {errors_after}): keys_unavailable must be returned as an error, not a denial\n{}",
        stack.logs()
    );

    // dry_run: a verified token the route would deny (client `nobody`) is allowed with claim headers.
    let claims = keycloak_claims(&stack.issuer.issuer_url(), "my-app");
    let token = good_key.mint(claims.clone());
    let reply = stack
        .get_with_token("/dry/orders", &token, &[("x-auth-subject", "admin")])
        .await;
    assert_upstream(
        &reply,
        &[("x-auth-subject", Some(str_claim(&claims, "sub")))],
        "dry_run route, verified token that would be denied",
    );
    // ... and without a token: allowed, no claim headers, spoofed ones stripped.
    let reply = stack.get("/dry/orders", &[("x-auth-subject", "admin")]).await;
    assert_upstream(
        &reply,
        &[("x-auth-subject", None), ("x-auth-client-id", None)],
        "dry_run route without a token",
    );
}
