//! A local demo (run it with `scripts/demo.sh`): a development OpenID issuer with a key made at
//! start, the real `audgate serve`, a real Envoy with the ext_authz filter and an echo upstream,
//! all on 127.0.0.1. Prints curl commands that show an allow and the denials, then waits for
//! Ctrl-C. The private key lives only in this process's memory.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Stack, TestKey, keycloak_claims, merge, now};
use serde_json::json;

fn config(issuer: &str) -> String {
    format!(
        r#"
issuers:
  dev:
    issuer: {issuer}
    discovery: true
    algorithms: [RS256]
routes:
  - name: open
    match: {{ path_prefix: /open }}
    allow_anonymous: true
  - name: orders
    match: {{ path_prefix: /api/orders }}
    client_ids: [orders-api]
    client_id_claims: [aud]
  - name: legacy-azp
    match: {{ path_prefix: /api/legacy }}
    client_ids: [orders-api]
    client_id_claims: [aud, azp]
default: deny
"#
    )
}

#[tokio::main]
async fn main() {
    let key = TestKey::rsa("dev-key-1");
    let stack = Stack::start(&[&key], config).await;
    let issuer = stack.issuer.issuer_url();
    let hour = json!({"exp": now() + 3600});
    // An access token with an audience mapper: aud names the API.
    let good = key.mint(merge(
        keycloak_claims(&issuer, "web-shop"),
        merge(
            hour.clone(),
            json!({"aud": ["orders-api", "account"], "preferred_username": "alice"}),
        ),
    ));
    // Keycloak >= 4.6 without an audience mapper: aud is only "account", the client id in azp.
    let azp_only = key.mint(merge(keycloak_claims(&issuer, "orders-api"), hour));
    stack.wait_ready("/api/orders", &good).await;

    let url = stack.envoy.url();
    println!(
        "audgate demo is up: Envoy on {url}, audgate gRPC on 127.0.0.1:{}",
        stack.audgate.ports.grpc
    );
    println!("audgate config: {}\n", stack.audgate.config_path.display());
    println!("# paste into a shell: two tokens signed by the demo issuer, valid for an hour");
    println!("GOOD='{good}'");
    println!("AZP_ONLY='{azp_only}'\n");
    println!("# allowed: the echo upstream shows the x-auth-* headers audgate set");
    println!("curl -s {url}/api/orders -H \"Authorization: Bearer $GOOD\"\n");
    println!("# 403 audience_mismatch: a Keycloak >= 4.6 token whose client id is only in azp");
    println!("curl -si {url}/api/orders -H \"Authorization: Bearer $AZP_ONLY\"\n");
    println!("# allowed: the same token on a route that opts into azp");
    println!("curl -s {url}/api/legacy -H \"Authorization: Bearer $AZP_ONLY\"\n");
    println!("# 401 missing_token");
    println!("curl -si {url}/api/orders\n");
    println!("# allowed without a token; the spoofed x-auth-subject is stripped");
    println!("curl -s {url}/open -H 'x-auth-subject: admin'\n");
    println!("Ctrl-C stops the demo.");
    let _ = tokio::signal::ctrl_c().await;
    drop(stack);
}
