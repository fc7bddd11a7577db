//! `audgate explain`: from the config file, keys fetched only when the decision needs them; with
//! `--server`, a running instance explains with its own config and cached keys,
//! over `audgate.v1.Admin/Explain` on the admin listener, only when the config enables it.

mod common;

use std::process::Command;

use common::{Audgate, IssuerServer, TestKey, keycloak_claims, merge};
use serde_json::{Value, json};

fn config(issuer: &str, explain: bool) -> String {
    format!(
        "admin: {{ explain: {explain} }}\nissuers:\n  kc:\n    issuer: {issuer}\n    discovery: true\n\
         routes:\n  - name: orders\n    match: {{ path_prefix: /api/orders }}\n    client_ids: [orders-api]\n"
    )
}

fn explain(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::audgate_binary())
        .arg("explain")
        .args(args)
        .env_remove("AUDGATE_CONFIG")
        .output()
        .expect("audgate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_instance_explains_with_its_config_and_cached_keys() {
    let key = TestKey::rsa("live-key");
    let issuer = IssuerServer::start(&[&key]).await;
    let audgate = Audgate::start(&config(&issuer.issuer_url(), true)).await;
    audgate.wait_ready().await;
    let server = format!("127.0.0.1:{}", audgate.ports.admin);
    let fetches = issuer.jwks_fetches();

    let good = key.mint(merge(
        keycloak_claims(&issuer.issuer_url(), "web"),
        json!({"aud": "orders-api"}),
    ));
    let (code, out, err) = explain(&[
        "--server",
        &server,
        "--host",
        "shop",
        "--path",
        "/api/orders/1",
        "--token",
        &good,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("decision:   ALLOW (allowed)"), "{out}");
    assert!(
        out.contains("key:        kid live-key") && out.contains("signature:  verified"),
        "{out}"
    );

    let azp_only = key.mint(keycloak_claims(&issuer.issuer_url(), "orders-api"));
    let (code, out, _) = explain(&[
        "--server", &server, "--route", "orders", "--format", "json", "--token", &azp_only,
    ]);
    assert_eq!(code, 3);
    let json: Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(json["reason"], "audience_mismatch");
    assert!(json["hints"].to_string().contains("Audience mapper"), "{json}");
    assert_eq!(
        issuer.jwks_fetches(),
        fetches,
        "the instance's cached keys were used, no fetch"
    );
    assert!(
        !audgate.logs().contains(&good[good.len() - 40..]),
        "a token reached the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_is_off_unless_enabled_and_never_on_the_ext_authz_port() {
    let key = TestKey::rsa("k");
    let issuer = IssuerServer::start(&[&key]).await;
    let audgate = Audgate::start(&config(&issuer.issuer_url(), false)).await;
    audgate.wait_ready().await;
    for port in [audgate.ports.admin, audgate.ports.grpc] {
        let (code, _, err) = explain(&[
            "--server",
            &format!("127.0.0.1:{port}"),
            "--route",
            "orders",
            "--token",
            "x",
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("does not serve audgate.v1.Admin"), "{err}");
    }
    let enabled = Audgate::start(&config(&issuer.issuer_url(), true)).await;
    let (code, _, err) = explain(&[
        "--server",
        &format!("127.0.0.1:{}", enabled.ports.grpc),
        "--route",
        "orders",
        "--token",
        "x",
    ]);
    assert_eq!(code, 2, "the ext_authz port never serves Explain: {err}");
}

/// From the config file, `explain` fetches the token issuer's keys only when the decision needs
/// them: with the issuer unreachable, a request decided without keys still gets its answer
/// (anonymous route: 0; no route or an issuer the route does not accept: 3), and one that
/// needs them is exit 2 naming the keys.
#[test]
fn explain_from_the_file_needs_keys_only_when_the_decision_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audgate.yaml");
    // nothing listens on port 1: the discovery document cannot be fetched
    let issuer = "http://127.0.0.1:1/realms/shop";
    std::fs::write(
        &path,
        format!(
            "issuers:\n  kc: {{ issuer: {issuer}, discovery: true }}\n  other: {{ issuer: https://other.example.com, jwks_file: /dev/null }}\n\
             routes:\n  - name: health\n    match: {{ path_prefix: /healthz }}\n    allow_anonymous: true\n\
             \x20 - name: billing\n    match: {{ path_prefix: /billing }}\n    issuers: [other]\n    client_ids: [billing]\n\
             \x20 - name: orders\n    match: {{ path_prefix: /api/orders }}\n    client_ids: [orders-api]\n"
        ),
    )
    .unwrap();
    let token = TestKey::rsa("k1").mint(merge(keycloak_claims(issuer, "web"), json!({"aud": "orders-api"})));
    let config = path.to_str().unwrap();
    let run = |request: &[&str]| {
        let mut args = vec!["--config", config, "--host", "shop", "--token", &token];
        args.extend_from_slice(request);
        explain(&args)
    };

    let (code, out, err) = run(&["--path", "/healthz"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(anonymous)"), "{out}");
    let (code, out, err) = run(&["--path", "/nowhere"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("no_route"), "{out}");
    let (code, out, err) = run(&["--path", "/billing/1"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("unknown_issuer"), "{out}");
    let (code, out, err) = run(&["--path", "/api/orders/1"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("the keys of issuer kc cannot be loaded"), "{err}");
}
