//! audgate deployed the Istio way, end to end: the real `audgate serve` binary with the audgate
//! config from the ConfigMap in deploy/istio/audgate.yaml, behind a real Envoy 1.40 whose
//! HTTP filters are the ones istiod generates for an AuthorizationPolicy with `action: CUSTOM`
//! (tests/envoy/istio_custom_authz.yaml says where that shape comes from in istio/istio).
//!
//! Nothing here is a private copy of the deploy files: the ext_authz filter is built from
//! deploy/istio/extension-provider.istiooperator.yaml (cluster, timeout, failOpen,
//! statusOnError), the shadow RBAC rules that switch it on from the two AuthorizationPolicies in
//! deploy/istio/ (translated as istiod's authz builder does), and audgate runs the ConfigMap's
//! config with only the issuer's address and the listeners changed. One Envoy plays both the
//! ingress gateway and the orders workload's sidecar.
//!
//! What it proves, as README's "Deploy" section and deploy/istio say:
//! - no context extension reaches audgate, so its route is picked by host, path and method;
//! - allowed requests reach the workload with the claim headers (forged ones replaced);
//! - denials are 401/403 with RFC 6750 headers and a JSON reason;
//! - requests the policies do not select never reach audgate;
//! - audgate down means 503 (failOpen false, statusOnError 503), not a pass.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    Audgate, EchoServer, Envoy, EnvoyPorts, IssuerServer, Reply, TestKey, find_object, free_port, keycloak_claims,
    localize_deploy_config, merge, now, repo_root, yaml_documents,
};
use serde_json::{Map, Value, json};

const PROVIDER_FILE: &str = "deploy/istio/extension-provider.istiooperator.yaml";
const MANIFEST_FILE: &str = "deploy/istio/audgate.yaml";
const GATEWAY_POLICY_FILE: &str = "deploy/istio/authorizationpolicy-ingressgateway.yaml";
const WORKLOAD_POLICY_FILE: &str = "deploy/istio/authorizationpolicy-orders.yaml";
const TEMPLATE_FILE: &str = "tests/envoy/istio_custom_authz.yaml";

/// The issuer the deploy config names; the test swaps its origin for the in-process issuer's.
const DEPLOY_ISSUER_ORIGIN: &str = "https://sso.example.com";
const DEPLOY_REALM_PATH: &str = "/realms/shop";

// ---------------------------------------------------------------------------------------------
// What istiod would generate
// ---------------------------------------------------------------------------------------------

/// meshConfig.extensionProviders[] entry for audgate, as the deploy file gives it.
#[derive(Debug)]
struct Provider {
    name: String,
    service: String,
    port: u64,
    timeout: String,
    fail_open: bool,
    status_on_error: u64,
}

fn provider() -> Provider {
    let docs = yaml_documents(&repo_root().join(PROVIDER_FILE));
    let operator = docs
        .iter()
        .find(|d| d["kind"] == "IstioOperator")
        .unwrap_or_else(|| panic!("{PROVIDER_FILE} has no IstioOperator"));
    let providers = operator["spec"]["meshConfig"]["extensionProviders"]
        .as_array()
        .unwrap_or_else(|| panic!("{PROVIDER_FILE}: spec.meshConfig.extensionProviders is not a list"));
    let entry = providers
        .iter()
        .find(|p| p.get("envoyExtAuthzGrpc").is_some())
        .unwrap_or_else(|| panic!("{PROVIDER_FILE}: no envoyExtAuthzGrpc provider"));
    let grpc = &entry["envoyExtAuthzGrpc"];
    let text = |v: &Value, what: &str| {
        v.as_str()
            .unwrap_or_else(|| panic!("{PROVIDER_FILE}: {what} is not a string: {v}"))
            .to_owned()
    };
    Provider {
        name: text(&entry["name"], "name"),
        service: text(&grpc["service"], "envoyExtAuthzGrpc.service"),
        port: grpc["port"]
            .as_u64()
            .unwrap_or_else(|| panic!("{PROVIDER_FILE}: envoyExtAuthzGrpc.port is not a number")),
        // Istio's default when unset is 600s; the deploy file must set one.
        timeout: text(&grpc["timeout"], "envoyExtAuthzGrpc.timeout"),
        fail_open: grpc["failOpen"].as_bool().unwrap_or(false),
        // istiod parses the string; unset means Envoy's default (403), which the template
        // cannot express, and the deploy file sets it.
        status_on_error: text(&grpc["statusOnError"], "envoyExtAuthzGrpc.statusOnError")
            .parse()
            .unwrap_or_else(|e| panic!("{PROVIDER_FILE}: statusOnError is not a number: {e}")),
    }
}

/// `string_match` for a value with Istio's wildcard rules (matcher.StringMatcherWithPrefix /
/// HostMatcher): `*` alone is "present", `*x` a suffix, `x*` a prefix, else exact.
fn istio_string_match(value: &str, ignore_case: bool) -> Value {
    let mut m = if let Some(suffix) = value.strip_prefix('*') {
        json!({ "suffix": suffix })
    } else if let Some(prefix) = value.strip_suffix('*') {
        json!({ "prefix": prefix })
    } else {
        json!({ "exact": value })
    };
    if ignore_case {
        m["ignore_case"] = json!(true);
    }
    m
}

fn header_rule(header: &str, value: &str, ignore_case: bool) -> Value {
    if value == "*" {
        return json!({ "header": { "name": header, "present_match": true } });
    }
    json!({ "header": { "name": header, "string_match": istio_string_match(value, ignore_case) } })
}

fn path_rule(value: &str) -> Value {
    assert!(
        !value.contains('{'),
        "path templates ({value}) are not translated by this test; use prefix/suffix wildcards"
    );
    if value == "*" {
        return json!({ "url_path": { "path": { "safe_regex": { "regex": ".+" } } } });
    }
    json!({ "url_path": { "path": istio_string_match(value, false) } })
}

/// One `to.operation` as istiod's permission: and_rules over or_rules per field (hosts,
/// notHosts, methods, notMethods, paths, notPaths, in that order).
fn operation_permission(operation: &Map<String, Value>, file: &str) -> Value {
    let list = |key: &str| -> Vec<String> {
        operation.get(key).map_or_else(Vec::new, |v| {
            v.as_array()
                .unwrap_or_else(|| panic!("{file}: operation.{key} is not a list"))
                .iter()
                .map(|s| {
                    s.as_str()
                        .unwrap_or_else(|| panic!("{file}: operation.{key} has a non-string"))
                        .to_owned()
                })
                .collect()
        })
    };
    for key in operation.keys() {
        assert!(
            ["hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"].contains(&key.as_str()),
            "{file}: operation.{key} is not translated by this test (ports need the listener's port)"
        );
    }
    let mut rules = Vec::new();
    let mut field = |values: Vec<String>, negate: bool, rule: &dyn Fn(&str) -> Value| {
        if values.is_empty() {
            return;
        }
        let or = json!({ "or_rules": { "rules": values.iter().map(|v| rule(v)).collect::<Vec<_>>() } });
        rules.push(if negate { json!({ "not_rule": or }) } else { or });
    };
    let host = |v: &str| header_rule(":authority", v, true);
    let method = |v: &str| header_rule(":method", v, false);
    field(list("hosts"), false, &host);
    field(list("notHosts"), true, &host);
    field(list("methods"), false, &method);
    field(list("notMethods"), true, &method);
    field(list("paths"), false, &path_rule);
    field(list("notPaths"), true, &path_rule);
    json!({ "and_rules": { "rules": rules } })
}

/// The shadow RBAC policies istiod derives from one AuthorizationPolicy with `action: CUSTOM`
/// (builder.go: one policy per rule, named after provider, namespace, policy and rule index;
/// a rule without `to` matches any request; no `from` means any principal).
fn rbac_policies(file: &str, provider: &str) -> Value {
    let docs = yaml_documents(&repo_root().join(file));
    let mut policies = Map::new();
    for policy in docs.iter().filter(|d| d["kind"] == "AuthorizationPolicy") {
        let spec = &policy["spec"];
        assert_eq!(spec["action"], "CUSTOM", "{file}: not a CUSTOM policy");
        assert_eq!(spec["provider"]["name"], provider, "{file}: another provider");
        let namespace = policy["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = policy["metadata"]["name"].as_str().expect("a policy has a name");
        let rules = spec["rules"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: CUSTOM needs rules (they select what audgate sees)"));
        for (index, rule) in rules.iter().enumerate() {
            assert!(
                rule.get("from").is_none() && rule.get("when").is_none(),
                "{file}: `from`/`when` are not translated by this test"
            );
            let permissions: Vec<Value> = match rule.get("to").and_then(Value::as_array) {
                None => vec![json!({ "any": true })],
                Some(to) => to
                    .iter()
                    .map(|t| {
                        let operation = t["operation"]
                            .as_object()
                            .unwrap_or_else(|| panic!("{file}: `to` without an operation"));
                        operation_permission(operation, file)
                    })
                    .collect(),
            };
            policies.insert(
                format!("istio-ext-authz-{provider}-ns[{namespace}]-policy[{name}]-rule[{index}]"),
                json!({
                    "permissions": permissions,
                    "principals": [{ "and_ids": { "ids": [{ "any": true }] } }],
                }),
            );
        }
    }
    assert!(!policies.is_empty(), "{file} has no AuthorizationPolicy");
    Value::Object(policies)
}

/// The audgate config of the ConfigMap in deploy/istio/audgate.yaml, verbatim.
fn configmap_config() -> String {
    let docs = yaml_documents(&repo_root().join(MANIFEST_FILE));
    let configmap = find_object(&docs, "ConfigMap", "audgate-config");
    configmap["data"]["audgate.yaml"]
        .as_str()
        .unwrap_or_else(|| panic!("{MANIFEST_FILE}: ConfigMap audgate-config has no data.audgate.yaml"))
        .to_owned()
}

fn render_envoy(ports: &EnvoyPorts, gateway_port: u16, provider: &Provider) -> String {
    let path = repo_root().join(TEMPLATE_FILE);
    let template = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    // model.BuildSubsetKey(outbound, "", host, port)
    let cluster = format!("outbound|{}||{}", provider.port, provider.service);
    let rendered = template
        .replace("{{ADMIN_PORT}}", &ports.admin.to_string())
        .replace("{{SIDECAR_PORT}}", &ports.listen.to_string())
        .replace("{{GATEWAY_PORT}}", &gateway_port.to_string())
        .replace("{{UPSTREAM_PORT}}", &ports.upstream.to_string())
        .replace("{{AUDGATE_GRPC_PORT}}", &ports.audgate_grpc.to_string())
        .replace("{{AUTHZ_CLUSTER}}", &cluster)
        .replace("{{AUTHZ_AUTHORITY}}", &provider.service)
        .replace("{{TIMEOUT}}", &provider.timeout)
        .replace("{{FAILURE_MODE_ALLOW}}", &provider.fail_open.to_string())
        .replace("{{STATUS_ON_ERROR}}", &provider.status_on_error.to_string())
        .replace(
            "{{SIDECAR_RBAC_POLICIES}}",
            &rbac_policies(WORKLOAD_POLICY_FILE, &provider.name).to_string(),
        )
        .replace(
            "{{GATEWAY_RBAC_POLICIES}}",
            &rbac_policies(GATEWAY_POLICY_FILE, &provider.name).to_string(),
        )
        .replace("{{PROVIDER}}", &provider.name);
    if let Some(pos) = rendered.find("{{") {
        let rest: String = rendered[pos..].chars().take(40).collect();
        panic!("unreplaced placeholder in {}: {rest:?}", path.display());
    }
    rendered
}

// ---------------------------------------------------------------------------------------------
// The mesh in one process tree
// ---------------------------------------------------------------------------------------------

/// Envoy (gateway + sidecar) → audgate (deploy config) → in-process issuer; Envoy → echo.
/// Field order is drop order.
struct Mesh {
    envoy: Envoy,
    audgate: Option<Audgate>,
    _echo: EchoServer,
    issuer: IssuerServer,
    gateway_port: u16,
    client: reqwest::Client,
}

/// Which listener a request enters.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// The ingress gateway (policy authorizationpolicy-ingressgateway.yaml).
    Gateway,
    /// The orders workload's sidecar (policy authorizationpolicy-orders.yaml).
    Sidecar,
}

/// One row of `audgate_checks_total` that moved.
type Check = (String, String, String);

impl Mesh {
    async fn start(key: &TestKey) -> Self {
        let issuer = IssuerServer::start_at(DEPLOY_REALM_PATH, &[key]).await;
        let origin = format!("http://{}", issuer.addr());
        let deploy = configmap_config();
        assert!(
            deploy.contains(&format!("{DEPLOY_ISSUER_ORIGIN}{DEPLOY_REALM_PATH}")),
            "the Istio config no longer names issuer {DEPLOY_ISSUER_ORIGIN}{DEPLOY_REALM_PATH}; update this test"
        );
        let config = localize_deploy_config(&deploy, DEPLOY_ISSUER_ORIGIN, &origin);
        let echo = EchoServer::start().await;
        let audgate = Audgate::start(&config).await;
        audgate.wait_ready().await;
        let provider = provider();
        let ports = EnvoyPorts {
            listen: free_port(),
            admin: free_port(),
            audgate_grpc: audgate.ports.grpc,
            upstream: echo.port(),
        };
        let gateway_port = free_port();
        let rendered = render_envoy(&ports, gateway_port, &provider);
        let envoy = Envoy::start_rendered(ports, &rendered).await;
        Self {
            envoy,
            audgate: Some(audgate),
            _echo: echo,
            issuer,
            gateway_port,
            client: common::http_client(),
        }
    }

    fn audgate(&self) -> &Audgate {
        self.audgate.as_ref().expect("audgate is running")
    }

    fn iss(&self) -> String {
        self.issuer.issuer_url()
    }

    fn url(&self, via: Via, path: &str) -> String {
        let port = match via {
            Via::Gateway => self.gateway_port,
            Via::Sidecar => self.envoy.ports.listen,
        };
        format!("http://127.0.0.1:{port}{path}")
    }

    async fn checks(&self) -> Vec<(Check, f64)> {
        let metrics = self.audgate().metrics().await;
        metrics
            .series("audgate_checks_total")
            .into_iter()
            .map(|s| {
                let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
                ((label("route"), label("decision"), label("reason")), s.value)
            })
            .collect()
    }

    /// Sends the request and returns the reply with the audgate checks it caused (route,
    /// decision, reason), read from audgate's metrics before and after.
    async fn send(
        &self,
        via: Via,
        method: &str,
        host: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (Reply, Vec<Check>) {
        let before = self.checks().await;
        let auth = token.map(common::bearer);
        let mut all: Vec<(&str, &str)> = vec![("host", host)];
        if let Some(auth) = &auth {
            all.push(("authorization", auth.as_str()));
        }
        all.extend_from_slice(headers);
        let reply = common::send(&self.client, method, &self.url(via, path), &all).await;
        let after = self.checks().await;
        let mut moved = Vec::new();
        for (check, value) in after {
            let old = before.iter().find(|(c, _)| *c == check).map_or(0.0, |(_, v)| *v);
            for _ in 0..((value - old).round() as i64) {
                moved.push(check.clone());
            }
        }
        (reply, moved)
    }

    fn logs(&self) -> String {
        let audgate = self
            .audgate
            .as_ref()
            .map_or_else(|| "(audgate stopped)".to_owned(), Audgate::logs);
        format!("{audgate}\n{}", self.envoy.logs())
    }
}

fn check(route: &str, decision: &str, reason: &str) -> Check {
    (route.to_owned(), decision.to_owned(), reason.to_owned())
}

/// A Keycloak access token payload for a user of the web shop, with `extra` merged in.
fn user_claims(iss: &str, azp: &str, extra: Value) -> Value {
    merge(keycloak_claims(iss, azp), extra)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The Envoy config the test builds from deploy/istio loads in Envoy 1.40 (a quick, precise
/// failure when a deploy file or the template goes wrong).
#[test]
fn istio_shaped_envoy_config_validates() {
    let ports = EnvoyPorts {
        listen: free_port(),
        admin: free_port(),
        audgate_grpc: free_port(),
        upstream: free_port(),
    };
    let rendered = render_envoy(&ports, free_port(), &provider());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    let path = dir.path().join("envoy-istio.yaml");
    std::fs::write(&path, &rendered).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    common::validate_envoy_config(&path);
    // The generated filter is what the provider file says, and nothing Istio never sets.
    assert!(rendered.contains("cluster_name: \"outbound|9191||audgate.audgate.svc.cluster.local\""));
    let config: String = rendered
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !config.contains("context_extensions"),
        "Istio never sets context extensions"
    );
    assert!(
        !config.contains("allowed_headers"),
        "Istio sends every header to a gRPC provider"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn istio_gateway_and_sidecar_ask_audgate_as_the_docs_say() {
    let key = TestKey::rsa("shop-2026");
    let mesh = Mesh::start(&key).await;
    let iss = mesh.iss();
    let shop = "shop.example.com";

    // --- the ingress gateway: shop.example.com ---

    // A web-shop user whose token has an Audience mapper for orders-api: allowed, with the
    // verified claims upstream and the client's forged x-auth-subject replaced.
    let claims = user_claims(
        &iss,
        "web-shop",
        json!({ "aud": ["orders-api", "account"], "scope": "openid profile orders:read" }),
    );
    let token = key.mint(claims.clone());
    let (reply, checks) = mesh
        .send(
            Via::Gateway,
            "GET",
            shop,
            "/api/orders/7",
            Some(&token),
            &[("x-auth-subject", "forged-admin")],
        )
        .await;
    assert_eq!(reply.status, 200, "{reply}\n{}", mesh.logs());
    assert_eq!(
        checks,
        vec![check("shop-orders", "allow", "allowed")],
        "{}",
        mesh.logs()
    );
    assert_eq!(reply.upstream("x-auth-subject").as_deref(), claims["sub"].as_str());
    assert_eq!(reply.upstream("x-auth-client-id").as_deref(), Some("orders-api"));
    assert_eq!(reply.upstream("x-auth-issuer"), Some(iss.clone()));
    assert_eq!(
        reply.upstream("x-auth-roles").as_deref(),
        Some("offline_access,uma_authorization,default-roles-test")
    );
    assert_eq!(reply.upstream("authorization"), Some(common::bearer(&token)));

    // The same user without the mapper (Keycloak >= 4.6: aud "account", client id in azp):
    // 403 audience_mismatch, and the description names both ways out.
    let no_mapper = key.mint(user_claims(
        &iss,
        "orders-api",
        json!({ "scope": "openid orders:read" }),
    ));
    let (reply, checks) = mesh
        .send(Via::Gateway, "GET", shop, "/api/orders/7", Some(&no_mapper), &[])
        .await;
    assert_eq!(reply.status, 403, "{reply}");
    assert_eq!(checks, vec![check("shop-orders", "deny", "audience_mismatch")]);
    assert_eq!(reply.error_code().as_deref(), Some("audience_mismatch"), "{reply}");
    let description = reply.json()["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        description.contains("Audience mapper") && description.contains("client_id_claims: [aud, azp]"),
        "{description}"
    );

    // A route that opted into azp accepts the plain Keycloak token of its own client.
    let web_shop = key.mint(user_claims(&iss, "web-shop", json!({})));
    let (reply, checks) = mesh
        .send(Via::Gateway, "GET", shop, "/api/account/me", Some(&web_shop), &[])
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(checks, vec![check("shop-account", "allow", "allowed")]);
    assert_eq!(reply.upstream("x-auth-client-id").as_deref(), Some("web-shop"));

    // No token: 401 with the bare challenge (RFC 6750 3.1).
    let (reply, checks) = mesh.send(Via::Gateway, "GET", shop, "/api/orders/7", None, &[]).await;
    assert_eq!(reply.status, 401, "{reply}");
    assert_eq!(checks, vec![check("shop-orders", "deny", "missing_token")]);
    assert_eq!(reply.header("www-authenticate"), Some("Bearer realm=\"audgate\""));
    assert_eq!(reply.error_code().as_deref(), Some("missing_token"));

    // Expired: 401 invalid_token.
    let expired = key.mint(user_claims(
        &iss,
        "web-shop",
        json!({ "aud": "orders-api", "scope": "orders:read", "exp": now() - 600, "iat": now() - 900 }),
    ));
    let (reply, checks) = mesh
        .send(Via::Gateway, "GET", shop, "/api/orders/7", Some(&expired), &[])
        .await;
    assert_eq!(reply.status, 401, "{reply}");
    assert_eq!(checks, vec![check("shop-orders", "deny", "expired")]);
    let challenge = reply.header("www-authenticate").unwrap_or_default();
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");

    // Right audience, scope missing: 403 insufficient_scope.
    let no_scope = key.mint(user_claims(
        &iss,
        "web-shop",
        json!({ "aud": "orders-api", "scope": "openid" }),
    ));
    let (reply, checks) = mesh
        .send(Via::Gateway, "GET", shop, "/api/orders/7", Some(&no_scope), &[])
        .await;
    assert_eq!(reply.status, 403, "{reply}");
    assert_eq!(checks, vec![check("shop-orders", "deny", "insufficient_scope")]);
    let challenge = reply.header("www-authenticate").unwrap_or_default();
    assert!(challenge.contains("error=\"insufficient_scope\""), "{challenge}");

    // Admin pages: realm role `admin` required.
    let admin = key.mint(user_claims(
        &iss,
        "admin-console",
        json!({ "realm_access": { "roles": ["admin", "offline_access"] } }),
    ));
    let (reply, checks) = mesh.send(Via::Gateway, "GET", shop, "/admin", Some(&admin), &[]).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(checks, vec![check("shop-admin", "allow", "allowed")]);
    let not_admin = key.mint(user_claims(&iss, "admin-console", json!({})));
    let (reply, checks) = mesh
        .send(Via::Gateway, "GET", shop, "/admin/users", Some(&not_admin), &[])
        .await;
    assert_eq!(reply.status, 403, "{reply}");
    assert_eq!(checks, vec![check("shop-admin", "deny", "insufficient_scope")]);

    // The anonymous catalog: allowed without a token, forged claim headers removed; its
    // method list leaves POST to the default deny.
    let (reply, checks) = mesh
        .send(
            Via::Gateway,
            "GET",
            shop,
            "/api/catalog/items",
            None,
            &[("x-auth-subject", "forged")],
        )
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(checks, vec![check("shop-catalog", "allow", "anonymous")]);
    assert_eq!(
        reply.upstream("x-auth-subject"),
        None,
        "a forged claim header reached the app"
    );
    let (reply, checks) = mesh
        .send(Via::Gateway, "POST", shop, "/api/catalog/items", None, &[])
        .await;
    assert_eq!(reply.status, 403, "{reply}");
    assert_eq!(checks, vec![check("-", "deny", "no_route")]);
    assert_eq!(reply.error_code().as_deref(), Some("no_route"));

    // Not selected by the gateway policy (another path, another host): audgate is never asked.
    // (So a forged x-auth-* header is not removed there: the policy must cover every path
    // whose backend reads them, as deploy/istio's comments say.)
    for (host, path) in [(shop, "/index.html"), ("other.example.com", "/api/orders/7")] {
        let (reply, checks) = mesh
            .send(Via::Gateway, "GET", host, path, None, &[("x-auth-subject", "forged")])
            .await;
        assert_eq!(reply.status, 200, "{host}{path}: {reply}");
        assert!(checks.is_empty(), "{host}{path} reached audgate: {checks:?}");
        assert_eq!(reply.upstream("x-auth-subject").as_deref(), Some("forged"));
    }

    // --- the orders workload's sidecar: calls inside the mesh ---

    // A service account of the billing client (client credentials: azp = billing) with an
    // audience mapper for orders-api and the orders-api client role `service`. Any of the
    // names a caller may use for the service picks route orders-internal; a port is ignored.
    let service_claims = json!({
        "exp": now() + 300, "iat": now(), "iss": iss, "sub": "service-account-billing-uuid",
        "typ": "Bearer", "azp": "billing", "aud": "orders-api", "scope": "profile email",
        "preferred_username": "service-account-billing", "client_id": "billing",
        "resource_access": { "orders-api": { "roles": ["service"] } },
    });
    let service = key.mint(service_claims.clone());
    for host in [
        "orders",
        "orders.shop",
        "orders.shop.svc.cluster.local",
        "orders.shop.svc.cluster.local:8080",
    ] {
        let (reply, checks) = mesh
            .send(Via::Sidecar, "POST", host, "/api/orders", Some(&service), &[])
            .await;
        assert_eq!(reply.status, 200, "host {host}: {reply}\n{}", mesh.logs());
        assert_eq!(
            checks,
            vec![check("orders-internal", "allow", "allowed")],
            "host {host}"
        );
        assert_eq!(
            reply.upstream("x-auth-subject").as_deref(),
            Some("service-account-billing-uuid")
        );
        assert_eq!(reply.upstream("x-auth-client-id").as_deref(), Some("orders-api"));
    }

    // Without the client role: 403 insufficient_scope.
    let no_role = key.mint(merge(service_claims, json!({ "resource_access": null })));
    let (reply, checks) = mesh
        .send(Via::Sidecar, "GET", "orders.shop", "/api/orders/7", Some(&no_role), &[])
        .await;
    assert_eq!(reply.status, 403, "{reply}");
    assert_eq!(checks, vec![check("orders-internal", "deny", "insufficient_scope")]);

    // The host picks the route: the gateway's user token, forwarded to the workload with the
    // public host, is still shop-orders (allowed); sent to the in-mesh name it is
    // orders-internal, which wants the service role (denied).
    let (reply, checks) = mesh
        .send(Via::Sidecar, "GET", shop, "/api/orders/7", Some(&token), &[])
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(checks, vec![check("shop-orders", "allow", "allowed")]);
    let (reply, checks) = mesh
        .send(Via::Sidecar, "GET", "orders.shop", "/api/orders/7", Some(&token), &[])
        .await;
    assert_eq!(reply.status, 403, "{reply}");
    assert_eq!(checks, vec![check("orders-internal", "deny", "insufficient_scope")]);

    // A name no route lists: no_route.
    let (reply, checks) = mesh
        .send(
            Via::Sidecar,
            "GET",
            "orders.elsewhere",
            "/api/orders/7",
            Some(&service),
            &[],
        )
        .await;
    assert_eq!(reply.status, 403, "{reply}");
    assert_eq!(checks, vec![check("-", "deny", "no_route")]);

    // Paths the workload policy does not select are not checked.
    let (reply, checks) = mesh
        .send(Via::Sidecar, "GET", "orders.shop", "/healthz", None, &[])
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert!(checks.is_empty(), "/healthz reached audgate: {checks:?}");
}

/// failOpen: false with statusOnError "503": when audgate is gone, selected requests fail
/// closed with 503; unselected ones still pass.
#[tokio::test(flavor = "multi_thread")]
async fn istio_provider_fails_closed_when_audgate_is_down() {
    let key = TestKey::rsa("shop-2026");
    let mut mesh = Mesh::start(&key).await;
    let token = key.mint(user_claims(
        &mesh.iss(),
        "web-shop",
        json!({ "aud": "orders-api", "scope": "orders:read" }),
    ));
    let url = mesh.url(Via::Gateway, "/api/orders/7");
    let auth = common::bearer(&token);
    let headers = [("host", "shop.example.com"), ("authorization", auth.as_str())];
    let reply = common::send(&mesh.client, "GET", &url, &headers).await;
    assert_eq!(reply.status, 200, "{reply}\n{}", mesh.logs());

    drop(mesh.audgate.take());
    let mut last = None;
    for _ in 0..50 {
        let reply = common::send(&mesh.client, "GET", &url, &headers).await;
        if reply.status == 503 {
            last = None;
            break;
        }
        last = Some(reply);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(reply) = last {
        panic!(
            "with audgate stopped, the gateway answered\n{reply}\n(expected 503)\n{}",
            mesh.logs()
        );
    }
    let reply = common::send(
        &mesh.client,
        "GET",
        &mesh.url(Via::Gateway, "/index.html"),
        &[("host", "shop.example.com")],
    )
    .await;
    assert_eq!(
        reply.status, 200,
        "an unselected path must not depend on audgate: {reply}"
    );
}

/// The files this test reads exist where the docs say (a moved file fails here, not in a
/// confusing parse error).
#[test]
fn istio_deploy_files_exist() {
    for file in [
        PROVIDER_FILE,
        MANIFEST_FILE,
        GATEWAY_POLICY_FILE,
        WORKLOAD_POLICY_FILE,
        TEMPLATE_FILE,
    ] {
        assert!(Path::new(&repo_root().join(file)).is_file(), "{file} is missing");
    }
}
