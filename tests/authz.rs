//! The decision core through its public API: every reason code, the time edges, `aud` shapes,
//! Keycloak's azp case, dry-run, anonymous routes and the response built for each. No network:
//! keys are generated here and handed to `evaluate` directly, with a fixed `now`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use audgate::authz::{self, CheckInput, Headers, Reason, Verdict};
use audgate::config::{self, Loaded};
use audgate::jwks::KeySet;
use common::{TestKey, b64url, hs256_jws, jwks, keycloak_claims, merge, unsigned_jws};
use serde_json::{Value, json};

const KC: &str = "https://sso.example.com/realms/shop";
const OTHER: &str = "https://other.example.com";
/// A fixed clock: the core never reads the real one.
const NOW: i64 = 1_800_000_000;

const CONFIG: &str = r#"
issuers:
  kc:
    issuer: https://sso.example.com/realms/shop
    jwks_file: /dev/null
    algorithms: [RS256, ES256, EdDSA]
  other:
    issuer: https://other.example.com
    jwks_file: /dev/null
token:
  sources: [authorization, {cookie: at}]
claim_headers:
  x-auth-subject: sub
  x-auth-issuer: iss
  x-auth-client-id: $client_id
  x-auth-roles: realm_access.roles
  x-auth-email: email
routes:
  - name: orders
    match: { hosts: [orders.example.com], path_prefix: /api/orders, methods: [GET, POST] }
    issuers: [kc]
    client_ids: [orders-api]
    required_scopes: [orders:read]
  - name: azp
    match: { path_prefix: /azp }
    client_ids: [my-app]
    client_id_claims: [aud, azp]
  - name: aud-only
    match: { path_prefix: /aud }
    client_ids: [my-app]
  - name: roles
    match: { path_prefix: /roles }
    client_ids: [my-app]
    client_id_claims: [azp]
    required_roles: [admin, "my-app:editor"]
  - name: rfc9068
    match: { path_prefix: /rfc9068 }
    client_ids: [svc]
    client_id_claims: [client_id]
  - name: dry
    match: { path_prefix: /dry }
    client_ids: [nobody]
    mode: dry_run
  - name: public
    match: { path_prefix: /public }
    allow_anonymous: true
default: deny
"#;

/// A compiled config plus the key sets `evaluate` will see.
struct Core {
    loaded: Loaded,
    keys: Vec<Option<Arc<KeySet>>>,
}

/// What one decision came to, owned so tests can compare freely.
#[derive(Debug)]
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
}

struct Req<'a> {
    host: &'a str,
    path: &'a str,
    method: &'a str,
    headers: Vec<(&'a str, String)>,
    hint: Option<&'a str>,
}

fn req(path: &str) -> Req<'_> {
    Req {
        host: "api.example.com",
        path,
        method: "GET",
        headers: Vec::new(),
        hint: None,
    }
}

impl<'a> Req<'a> {
    fn bearer(mut self, token: &str) -> Self {
        self.headers.push(("authorization", format!("Bearer {token}")));
        self
    }
    fn header(mut self, name: &'a str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }
    fn host(mut self, host: &'a str) -> Self {
        self.host = host;
        self
    }
}

impl Core {
    fn new(yaml: &str, keys: &[&[&TestKey]]) -> Core {
        let loaded = config::parse(yaml).unwrap_or_else(|e| panic!("config does not load: {e:?}"));
        let keys = keys
            .iter()
            .map(|set| Some(Arc::new(KeySet::parse(jwks(set).to_string().as_bytes()).unwrap())))
            .collect();
        Core { loaded, keys }
    }

    fn decide(&self, r: Req<'_>) -> Outcome {
        let headers: HashMap<String, String> = r.headers.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let input = CheckInput {
            method: r.method,
            host: r.host,
            path: r.path,
            headers: Headers::Map(&headers),
            route_hint: r.hint,
        };
        let policy = &self.loaded.config.policy;
        let d = authz::evaluate(policy, &input, |id| self.keys.get(id).cloned().flatten(), NOW);
        let resp = authz::respond(policy, &d);
        // on every pass, each claim header's `_` spellings are removed first; `removed` below
        // keeps the configured names the tests reason about
        let (spellings, configured): (Vec<&str>, Vec<&str>) = resp
            .remove_headers
            .iter()
            .partition(|h| policy.claim_header_spellings.iter().any(|s| s == *h));
        if resp.status == 200 {
            assert_eq!(
                spellings.len(),
                policy.claim_header_spellings.len(),
                "every spelling removed"
            );
        }
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
            removed: configured.iter().map(|h| h.to_string()).collect(),
            client: resp
                .client_headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            body: serde_json::from_str(&resp.body).unwrap_or(Value::Null),
        }
    }
}

struct Fixture {
    core: Core,
    rsa: TestKey,
    ec: TestKey,
    other: TestKey,
}

fn fixture() -> Fixture {
    let rsa = TestKey::rsa("k1");
    let ec = TestKey::ec("e1");
    let other = TestKey::rsa("o1");
    let core = Core::new(CONFIG, &[&[&rsa, &ec], &[&other]]);
    Fixture { core, rsa, ec, other }
}

/// A Keycloak token (aud "account", azp my-app) valid at NOW.
fn claims(patch: Value) -> Value {
    let base = merge(
        keycloak_claims(KC, "my-app"),
        json!({"iat": NOW - 10, "exp": NOW + 300, "sub": "alice-id"}),
    );
    merge(base, patch)
}

fn orders_req(token: &str) -> Req<'_> {
    req("/api/orders/42?x=1").host("orders.example.com").bearer(token)
}

#[test]
fn allow_sets_claim_headers_and_removes_the_ones_without_a_value() {
    let f = fixture();
    let token = f.rsa.mint(claims(
        json!({"aud": ["orders-api", "account"], "scope": "openid orders:read"}),
    ));
    let out = f.core.decide(orders_req(&token).header("x-auth-subject", "spoofed"));
    assert_eq!(
        (out.verdict, out.reason, out.status),
        (Verdict::Allow, Reason::Allowed, 200),
        "{out:?}"
    );
    assert_eq!(out.route, "orders");
    assert_eq!(out.upstream["x-auth-subject"], "alice-id");
    assert_eq!(out.upstream["x-auth-issuer"], KC);
    assert_eq!(out.upstream["x-auth-client-id"], "orders-api");
    assert_eq!(
        out.upstream["x-auth-roles"],
        "offline_access,uma_authorization,default-roles-test"
    );
    assert_eq!(
        out.removed,
        vec!["x-auth-email"],
        "no email claim: the header is removed"
    );
}

#[test]
fn aud_may_be_a_string_or_an_array() {
    let f = fixture();
    for aud in [json!("orders-api"), json!(["account", "orders-api"])] {
        let token = f.rsa.mint(claims(json!({"aud": aud, "scope": "orders:read"})));
        assert_eq!(f.core.decide(orders_req(&token)).reason, Reason::Allowed, "aud {aud}");
    }
    let token = f.rsa.mint(claims(
        json!({"aud": ["account", "orders-apix"], "scope": "orders:read"}),
    ));
    assert_eq!(f.core.decide(orders_req(&token)).reason, Reason::AudienceMismatch);
    let token = f.rsa.mint(claims(json!({"aud": 5})));
    assert_eq!(f.core.decide(orders_req(&token)).reason, Reason::MalformedToken);
}

#[test]
fn keycloak_azp_token_is_denied_on_aud_routes_and_allowed_where_azp_is_accepted() {
    let f = fixture();
    let token = f.rsa.mint(claims(json!({})));
    let denied = f.core.decide(req("/aud").bearer(&token));
    assert_eq!((denied.reason, denied.status), (Reason::AudienceMismatch, 403));
    assert!(
        denied.description.contains("azp") && denied.description.contains("Audience mapper"),
        "the description names the way out: {}",
        denied.description
    );
    assert_eq!(denied.body["error"], "audience_mismatch");
    let allowed = f.core.decide(req("/azp").bearer(&token));
    assert_eq!(allowed.reason, Reason::Allowed);
    assert_eq!(allowed.upstream["x-auth-client-id"], "my-app");
}

#[test]
fn client_id_claim_of_rfc9068() {
    let f = fixture();
    let token = f.rsa.mint(claims(json!({"client_id": "svc"})));
    assert_eq!(f.core.decide(req("/rfc9068").bearer(&token)).reason, Reason::Allowed);
    let token = f.rsa.mint(claims(json!({"azp": "svc"})));
    assert_eq!(
        f.core.decide(req("/rfc9068").bearer(&token)).reason,
        Reason::AudienceMismatch
    );
}

#[test]
fn scopes_come_from_scope_or_scp() {
    let f = fixture();
    let token = f
        .rsa
        .mint(claims(json!({"aud": "orders-api", "scope": "openid orders:write"})));
    let out = f.core.decide(orders_req(&token));
    assert_eq!((out.reason, out.status), (Reason::InsufficientScope, 403));
    assert!(out.client["www-authenticate"].contains(r#"error="insufficient_scope""#));
    assert!(out.description.contains("orders:read"));
    let token = f.rsa.mint(claims(
        json!({"aud": "orders-api", "scope": null, "scp": ["orders:read"]}),
    ));
    assert_eq!(f.core.decide(orders_req(&token)).reason, Reason::Allowed);
}

#[test]
fn realm_and_client_roles() {
    let f = fixture();
    let both = claims(json!({
        "realm_access": {"roles": ["admin"]},
        "resource_access": {"my-app": {"roles": ["editor"]}}
    }));
    assert_eq!(
        f.core.decide(req("/roles").bearer(&f.rsa.mint(both))).reason,
        Reason::Allowed
    );
    let realm_only = claims(json!({"realm_access": {"roles": ["admin"]}}));
    let out = f.core.decide(req("/roles").bearer(&f.rsa.mint(realm_only)));
    assert_eq!(out.reason, Reason::InsufficientScope);
    assert!(
        out.description.contains("resource_access.my-app.roles"),
        "{}",
        out.description
    );
    let client_only = claims(json!({"resource_access": {"my-app": {"roles": ["editor"]}}}));
    assert_eq!(
        f.core.decide(req("/roles").bearer(&f.rsa.mint(client_only))).reason,
        Reason::InsufficientScope
    );
}

#[test]
fn time_edges_with_leeway_on_both_sides() {
    let f = fixture();
    let at = |patch: Value| f.core.decide(req("/azp").bearer(&f.rsa.mint(claims(patch)))).reason;
    // default leeway 30 s; exp is exclusive
    assert_eq!(at(json!({"exp": NOW - 29})), Reason::Allowed);
    assert_eq!(at(json!({"exp": NOW - 30})), Reason::Expired);
    assert_eq!(at(json!({"exp": NOW - 3600})), Reason::Expired);
    assert_eq!(at(json!({"nbf": NOW + 30})), Reason::Allowed);
    assert_eq!(at(json!({"nbf": NOW + 31})), Reason::NotYetValid);
    assert_eq!(at(json!({"iat": NOW + 30})), Reason::Allowed);
    assert_eq!(at(json!({"iat": NOW + 31})), Reason::NotYetValid, "iat in the future");
    assert_eq!(at(json!({"exp": null})), Reason::MalformedToken, "exp is required");
    assert_eq!(at(json!({"exp": "1800000300"})), Reason::MalformedToken);
    assert_eq!(
        at(json!({"exp": 1_800_000_300.5})),
        Reason::Allowed,
        "NumericDate may be fractional"
    );

    let expired = f
        .core
        .decide(req("/azp").bearer(&f.rsa.mint(claims(json!({"exp": NOW - 252})))));
    assert!(expired.description.contains("4 min 12 s"), "{}", expired.description);
    assert_eq!(expired.status, 401);
}

#[test]
fn missing_token_gets_a_bare_challenge() {
    let f = fixture();
    let out = f.core.decide(req("/azp"));
    assert_eq!((out.reason, out.status), (Reason::MissingToken, 401));
    assert_eq!(out.client["www-authenticate"], r#"Bearer realm="audgate""#);
    assert_eq!(out.client["content-type"], "application/json");
    assert_eq!(out.body["error"], "missing_token");
    assert!(
        out.body["error_description"]
            .as_str()
            .unwrap()
            .contains("authorization header")
    );
    let basic = f.core.decide(req("/azp").header("authorization", "Basic YTpi"));
    assert_eq!(basic.reason, Reason::MissingToken);
}

#[test]
fn malformed_tokens() {
    let f = fixture();
    let good = f.rsa.mint(claims(json!({})));
    let [h, p, s]: [&str; 3] = good.split('.').collect::<Vec<_>>().try_into().unwrap();
    let cases = [
        ("two parts", format!("{h}.{p}")),
        ("four parts", format!("{good}.x")),
        ("bad base64 header", format!("!!.{p}.{s}")),
        ("header not JSON", format!("{}.{p}.{s}", b64url("nope"))),
        ("payload not an object", format!("{h}.{}.{s}", b64url("[1,2]"))),
        ("padding", format!("{h}=.{p}.{s}")),
        (
            "duplicate payload key",
            format!("{h}.{}.{s}", b64url(r#"{"iss":"x","iss":"y","exp":1}"#)),
        ),
        (
            "crit header",
            f.rsa.sign(
                &json!({"alg": "RS256", "kid": "k1", "crit": ["exp"], "exp": 1}),
                &claims(json!({})),
            ),
        ),
        ("over max_bytes", "a".repeat(16385)),
    ];
    for (what, token) in cases {
        let out = f.core.decide(req("/azp").bearer(&token));
        assert_eq!(out.reason, Reason::MalformedToken, "{what}: {}", out.description);
        assert!(
            out.client["www-authenticate"].contains(r#"error="invalid_token""#),
            "{what}"
        );
    }
    // two different tokens in two sources
    let other = f.rsa.mint(claims(json!({"jti": "another"})));
    let two = f
        .core
        .decide(req("/azp").bearer(&good).header("cookie", &format!("at={other}")));
    assert_eq!(two.reason, Reason::MalformedToken);
    let same = f
        .core
        .decide(req("/azp").bearer(&good).header("cookie", &format!("at={good}")));
    assert_eq!(same.reason, Reason::Allowed);
}

#[test]
fn wrong_token_types() {
    let f = fixture();
    for typ in ["ID", "Refresh", "Offline"] {
        let out = f
            .core
            .decide(req("/azp").bearer(&f.rsa.mint(claims(json!({"typ": typ})))));
        assert_eq!(out.reason, Reason::WrongTokenType, "payload typ {typ}");
    }
    let id = f
        .core
        .decide(req("/azp").bearer(&f.rsa.mint(claims(json!({"typ": "ID"})))));
    assert!(id.description.contains("ID token"), "{}", id.description);
    for typ in ["at+jwt", "application/AT+JWT", "jwt"] {
        let token = f
            .rsa
            .sign(&json!({"alg": "RS256", "kid": "k1", "typ": typ}), &claims(json!({})));
        assert_eq!(
            f.core.decide(req("/azp").bearer(&token)).reason,
            Reason::Allowed,
            "header typ {typ}"
        );
    }
    let token = f
        .rsa
        .sign(&json!({"alg": "RS256", "kid": "k1", "typ": "JWE"}), &claims(json!({})));
    assert_eq!(f.core.decide(req("/azp").bearer(&token)).reason, Reason::WrongTokenType);
    let no_typ = f
        .rsa
        .sign(&json!({"alg": "RS256", "kid": "k1"}), &claims(json!({"typ": null})));
    assert_eq!(f.core.decide(req("/azp").bearer(&no_typ)).reason, Reason::Allowed);
}

#[test]
fn unsupported_algorithms() {
    let f = fixture();
    let c = claims(json!({}));
    let none = unsigned_jws(&json!({"alg": "none", "kid": "k1"}), &c);
    let hs = hs256_jws(&f.rsa.public_key_bytes(), &json!({"alg": "HS256", "kid": "k1"}), &c);
    // PS256 is a fine algorithm, but not on kc's allow-list
    let ps = f.rsa.sign(&json!({"alg": "PS256", "kid": "k1"}), &c);
    for (what, token) in [("none", none), ("HS256 with the RSA public key", hs), ("PS256", ps)] {
        assert_eq!(
            f.core.decide(req("/azp").bearer(&token)).reason,
            Reason::UnsupportedAlg,
            "{what}"
        );
    }
}

#[test]
fn unknown_issuers() {
    let f = fixture();
    let stranger = f
        .rsa
        .mint(claims(json!({"iss": "https://evil.example.com/realms/shop"})));
    let out = f.core.decide(req("/azp").bearer(&stranger));
    assert_eq!((out.reason, out.status), (Reason::UnknownIssuer, 401));
    // a configured issuer the route does not accept
    let other = f.other.mint(claims(
        json!({"iss": OTHER, "aud": "orders-api", "scope": "orders:read"}),
    ));
    assert_eq!(f.core.decide(orders_req(&other)).reason, Reason::UnknownIssuer);
    // ... but accepted where the route takes every issuer
    assert_eq!(f.core.decide(req("/azp").bearer(&other)).reason, Reason::Allowed);
    // iss must match exactly: no trailing-slash leniency
    let slash = f.rsa.mint(claims(json!({"iss": format!("{KC}/")})));
    assert_eq!(f.core.decide(req("/azp").bearer(&slash)).reason, Reason::UnknownIssuer);
}

#[test]
fn keys_are_chosen_by_kid_from_the_issuers_own_set() {
    let f = fixture();
    let c = claims(json!({}));
    let unknown = f.rsa.sign(&json!({"alg": "RS256", "kid": "nope"}), &c);
    let out = f.core.decide(req("/azp").bearer(&unknown));
    assert_eq!(out.reason, Reason::UnknownKid);
    // signed by the other issuer's key, naming its kid, but claiming to be kc
    let cross = f.other.sign(&json!({"alg": "RS256", "kid": "o1"}), &c);
    assert_eq!(f.core.decide(req("/azp").bearer(&cross)).reason, Reason::UnknownKid);
    // the kid of an EC key with alg RS256: the key does not fit
    let misfit = f.rsa.sign(&json!({"alg": "RS256", "kid": "e1"}), &c);
    assert_eq!(f.core.decide(req("/azp").bearer(&misfit)).reason, Reason::UnknownKid);
    // no kid: every fitting key is tried
    let kidless = f.rsa.sign(&json!({"alg": "RS256"}), &c);
    assert_eq!(f.core.decide(req("/azp").bearer(&kidless)).reason, Reason::Allowed);
    let kidless_foreign = f.other.sign(&json!({"alg": "RS256"}), &c);
    assert_eq!(
        f.core.decide(req("/azp").bearer(&kidless_foreign)).reason,
        Reason::BadSignature
    );
    // ES256 verifies with the EC key
    assert_eq!(
        f.core.decide(req("/azp").bearer(&f.ec.mint(c.clone()))).reason,
        Reason::Allowed
    );
}

#[test]
fn encryption_keys_never_verify() {
    let rsa = TestKey::rsa("k1");
    let mut jwk = rsa.jwk();
    jwk["use"] = json!("enc");
    let yaml = "issuers:\n  kc:\n    issuer: https://sso.example.com/realms/shop\n    jwks_file: /dev/null\n\
                routes:\n  - name: r\n    client_ids: [my-app]\n    client_id_claims: [azp]\n";
    let loaded = config::parse(yaml).unwrap();
    let keys = Arc::new(KeySet::parse(json!({"keys": [jwk]}).to_string().as_bytes()).unwrap());
    let core = Core {
        loaded,
        keys: vec![Some(keys)],
    };
    let out = core.decide(req("/").bearer(&rsa.mint(claims(json!({})))));
    assert_eq!(out.reason, Reason::UnknownKid);
}

#[test]
fn bad_signatures() {
    let f = fixture();
    let token = f.rsa.mint(claims(json!({})));
    let [h, _, s]: [&str; 3] = token.split('.').collect::<Vec<_>>().try_into().unwrap();
    let forged_payload = b64url(claims(json!({"sub": "admin"})).to_string());
    let forged = format!("{h}.{forged_payload}.{s}");
    let out = f.core.decide(req("/azp").bearer(&forged));
    assert_eq!((out.reason, out.status), (Reason::BadSignature, 401));
    let unsigned = format!("{h}.{}.", token.split('.').nth(1).unwrap());
    assert_eq!(
        f.core.decide(req("/azp").bearer(&unsigned)).reason,
        Reason::BadSignature
    );
    // a signature made by another key under the right kid
    let wrong_key = f.other.sign(&json!({"alg": "RS256", "kid": "k1"}), &claims(json!({})));
    assert_eq!(
        f.core.decide(req("/azp").bearer(&wrong_key)).reason,
        Reason::BadSignature
    );
}

#[test]
fn eddsa_tokens_verify() {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    let pair = Ed25519KeyPair::generate().unwrap();
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64url(pair.public_key().as_ref())});
    let yaml = "issuers:\n  kc:\n    issuer: https://sso.example.com/realms/shop\n    jwks_file: /dev/null\n    algorithms: [EdDSA]\n\
                routes:\n  - name: r\n    client_ids: [my-app]\n    client_id_claims: [azp]\n";
    let core = Core {
        loaded: config::parse(yaml).unwrap(),
        keys: vec![Some(Arc::new(
            KeySet::parse(json!({"keys": [jwk]}).to_string().as_bytes()).unwrap(),
        ))],
    };
    let input = common::signing_input(&json!({"alg": "EdDSA", "kid": "ed"}), &claims(json!({})));
    let token = format!("{input}.{}", b64url(pair.sign(input.as_bytes())));
    assert_eq!(core.decide(req("/").bearer(&token)).reason, Reason::Allowed);
    let mut signature = pair.sign(input.as_bytes()).as_ref().to_vec();
    signature[10] ^= 1;
    let tampered = format!("{input}.{}", b64url(signature));
    assert_eq!(core.decide(req("/").bearer(&tampered)).reason, Reason::BadSignature);
}

#[test]
fn no_route_and_named_routes() {
    let f = fixture();
    let token = f.rsa.mint(claims(json!({})));
    let out = f.core.decide(req("/nothing/here").bearer(&token));
    assert_eq!(
        (out.reason, out.status, out.route.as_str()),
        (Reason::NoRoute, 403, "-")
    );
    assert!(!out.client.contains_key("www-authenticate"));
    // the context extension picks a route whatever the path
    let mut named = req("/nothing/here").bearer(&token);
    named.hint = Some("azp");
    assert_eq!(f.core.decide(named).reason, Reason::Allowed);
    let mut unknown = req("/azp").bearer(&token);
    unknown.hint = Some("typo");
    assert_eq!(
        f.core.decide(unknown).reason,
        Reason::NoRoute,
        "an unknown name never falls back"
    );
    // method not listed on the orders route
    let mut delete = orders_req(&token);
    delete.method = "DELETE";
    assert_eq!(f.core.decide(delete).reason, Reason::NoRoute);
}

#[test]
fn default_allow_lets_unmatched_requests_pass_without_claims() {
    let rsa = TestKey::rsa("k1");
    let yaml = CONFIG.replace("default: deny", "default: allow");
    let core = Core::new(&yaml, &[&[&rsa], &[]]);
    let out = core.decide(req("/unmatched").header("x-auth-subject", "spoofed"));
    assert_eq!(
        (out.verdict, out.reason, out.status),
        (Verdict::Allow, Reason::Anonymous, 200)
    );
    assert!(out.upstream.is_empty());
    assert!(out.removed.contains(&"x-auth-subject".to_owned()));
}

#[test]
fn keys_never_loaded_are_an_error_not_a_deny() {
    let f = fixture();
    let token = f.rsa.mint(claims(json!({})));
    let core = Core {
        loaded: f.core.loaded,
        keys: vec![None, None],
    };
    let out = core.decide(req("/azp").bearer(&token));
    assert_eq!(
        (out.verdict, out.reason, out.status),
        (Verdict::Error, Reason::KeysUnavailable, 503)
    );
    assert_eq!(out.body["error"], "keys_unavailable");
    let dry = core.decide(req("/dry").bearer(&token));
    assert_eq!(
        dry.verdict,
        Verdict::Error,
        "keys_unavailable stays an error on dry-run routes"
    );
}

#[test]
fn dry_run_records_the_denial_and_allows() {
    let f = fixture();
    let token = f.rsa.mint(claims(json!({})));
    let out = f.core.decide(req("/dry").bearer(&token));
    assert_eq!(
        (out.verdict, out.reason, out.status),
        (Verdict::DryRunDeny, Reason::AudienceMismatch, 200)
    );
    assert_eq!(
        out.upstream["x-auth-subject"], "alice-id",
        "the token verified: claims are passed"
    );
    assert!(
        out.removed.contains(&"x-auth-client-id".to_owned()),
        "no client id satisfied the rule"
    );
    let anonymous = f.core.decide(req("/dry").header("x-auth-subject", "spoofed"));
    assert_eq!(
        (anonymous.verdict, anonymous.reason),
        (Verdict::DryRunDeny, Reason::MissingToken)
    );
    assert!(anonymous.upstream.is_empty());
    assert_eq!(anonymous.removed.len(), 5, "every configured claim header is stripped");
}

#[test]
fn anonymous_routes_need_no_token_and_strip_claim_headers() {
    let f = fixture();
    let out = f.core.decide(req("/public/x").header("x-auth-subject", "spoofed"));
    assert_eq!(
        (out.verdict, out.reason, out.status),
        (Verdict::Allow, Reason::Anonymous, 200)
    );
    assert!(out.upstream.is_empty());
    assert_eq!(
        out.removed,
        vec![
            "x-auth-subject",
            "x-auth-issuer",
            "x-auth-client-id",
            "x-auth-roles",
            "x-auth-email"
        ]
    );
}

#[test]
fn claim_values_with_control_characters_never_reach_a_header() {
    let f = fixture();
    let token = f
        .rsa
        .mint(claims(json!({"sub": "alice\r\nx-admin: true", "email": "a@b\u{0}"})));
    let out = f.core.decide(req("/azp").bearer(&token));
    assert_eq!(out.reason, Reason::Allowed);
    assert!(!out.upstream.contains_key("x-auth-subject"));
    assert!(out.removed.contains(&"x-auth-subject".to_owned()));
    assert!(out.removed.contains(&"x-auth-email".to_owned()));
}

#[test]
fn descriptions_are_safe_in_a_header_and_never_carry_the_token() {
    let f = fixture();
    let token = f.rsa.mint(claims(json!({"aud": "quote\"back\\slash\u{7f}"})));
    let out = f.core.decide(req("/aud").bearer(&token));
    let challenge = &out.client["www-authenticate"];
    let inner = challenge
        .split("error_description=\"")
        .nth(1)
        .and_then(|s| s.strip_suffix('"'))
        .unwrap();
    assert!(
        inner
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\'),
        "{challenge}"
    );
    for o in [out, f.core.decide(req("/azp").bearer(&format!("{token}x")))] {
        assert!(!o.description.contains(&token[..40]), "{}", o.description);
        assert!(!o.body.to_string().contains(&token[..40]));
    }
}

#[test]
fn every_reason_has_its_status() {
    let statuses: Vec<(&str, u16)> = Reason::ALL.iter().map(|r| (r.code(), r.http_status())).collect();
    assert_eq!(
        statuses,
        vec![
            ("allowed", 200),
            ("anonymous", 200),
            ("cors_preflight", 200),
            ("missing_token", 401),
            ("malformed_token", 401),
            ("wrong_token_type", 401),
            ("unsupported_alg", 401),
            ("unknown_issuer", 401),
            ("unknown_kid", 401),
            ("bad_signature", 401),
            ("expired", 401),
            ("not_yet_valid", 401),
            ("audience_mismatch", 403),
            ("insufficient_scope", 403),
            ("claim_mismatch", 403),
            ("no_route", 403),
            ("keys_unavailable", 503),
        ]
    );
}

/// Found by fuzzing (fuzz/ evaluate target): the description of `exp: -1e300` computed
/// `now - exp`, which overflowed (a panic in debug builds).
#[test]
fn regression_extreme_numeric_dates_do_not_overflow() {
    let f = fixture();
    let cases = [
        (json!({"exp": -1e300, "iat": u64::MAX, "nbf": 1.5}), Reason::Expired),
        (json!({"exp": i64::MIN}), Reason::Expired),
        (json!({"exp": 1e300, "iat": -1e300}), Reason::Allowed),
        (json!({"exp": u64::MAX, "nbf": i64::MAX}), Reason::NotYetValid),
        (json!({"exp": u64::MAX, "iat": u64::MAX}), Reason::NotYetValid),
    ];
    for (patch, reason) in cases {
        let token = f.rsa.mint(claims(patch.clone()));
        assert_eq!(f.core.decide(req("/azp").bearer(&token)).reason, reason, "{patch}");
    }
}
