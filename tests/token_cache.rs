//! The verified-token cache: hits skip the signature but never the route's rule or the
//! clock, entries die with their issuer's key set, and the bounds hold.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use audgate::authz::{self, CheckInput, Headers, Reason};
use audgate::check::Snapshot;
use audgate::config::{self, TokenCacheConfig};
use audgate::jwks::KeyStore;
use audgate::token_cache::TokenCache;
use common::{Audgate, CheckCall, GrpcAuthz, IssuerServer, TestKey, keycloak_claims, merge, now};
use serde_json::json;

fn config(issuer: &str) -> String {
    format!(
        "issuers:\n  kc:\n    issuer: {issuer}\n    discovery: true\n    min_refresh_interval: 0s\n\
         routes:\n  - name: a\n    match: {{ path_prefix: /a }}\n    client_ids: [app-a]\n    client_id_claims: [aud, azp]\n\
         \x20 - name: b\n    match: {{ path_prefix: /b }}\n    client_ids: [app-b]\n"
    )
}

/// A snapshot whose keys are loaded from `issuer`.
async fn snapshot(issuer: &IssuerServer) -> Snapshot {
    let loaded = config::parse(&config(&issuer.issuer_url())).expect("config loads");
    let (keys, _) = KeyStore::build(&loaded.config, None).unwrap();
    keys.issuer(0).refresh().await;
    Snapshot::new(loaded.config, keys)
}

fn decide(s: &Snapshot, path: &str, token: &str, now: i64) -> Reason {
    let headers = HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
    let input = CheckInput {
        method: "GET",
        host: "h",
        path,
        headers: Headers::Map(&headers),
        route_hint: None,
    };
    let memo = s.tokens.view(&s.keys);
    authz::evaluate_with_memo(&s.config.policy, &input, |id| s.keys.current(id), &memo, now).reason
}

#[tokio::test]
async fn hits_still_run_the_route_rule_and_the_clock() {
    let key = TestKey::rsa("k1");
    let issuer = IssuerServer::start(&[&key]).await;
    let s = snapshot(&issuer).await;
    let t = now() as i64;
    let token = key.mint(merge(
        keycloak_claims(&issuer.issuer_url(), "app-a"),
        json!({"exp": t + 60}),
    ));
    assert_eq!(decide(&s, "/a", &token, t), Reason::Allowed);
    assert_eq!(s.tokens.len(), 1, "verified once, remembered");
    assert_eq!(decide(&s, "/a", &token, t), Reason::Allowed);
    assert_eq!(
        decide(&s, "/b", &token, t),
        Reason::AudienceMismatch,
        "a hit runs the route's rule"
    );
    assert_eq!(
        decide(&s, "/a", &token, t + 60 + 30),
        Reason::Expired,
        "never past exp (+leeway)"
    );
    // a token that failed verification is never remembered
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert_ne!(decide(&s, "/a", &forged, t), Reason::Allowed);
    assert_eq!(s.tokens.len(), 1);
}

/// A hit is the very same token: a verified token's signature on another payload, or under
/// another header, is verified again (and refused), never answered from the cache.
#[tokio::test]
async fn a_copied_signature_is_never_a_hit() {
    let key = TestKey::rsa("k1");
    let issuer = IssuerServer::start(&[&key]).await;
    let s = snapshot(&issuer).await;
    let t = now() as i64;
    let claims = keycloak_claims(&issuer.issuer_url(), "app-a");
    let token = key.mint(claims.clone());
    assert_eq!(decide(&s, "/a", &token, t), Reason::Allowed);
    assert_eq!(s.tokens.len(), 1);
    let (header, rest) = token.split_once('.').unwrap();
    let (_, signature) = rest.rsplit_once('.').unwrap();
    // the same signature on an elevated payload: re-verified, and refused
    let elevated = common::b64url(serde_json::to_vec(&merge(claims, json!({"aud": "app-b"}))).unwrap());
    let forged = format!("{header}.{elevated}.{signature}");
    assert_eq!(decide(&s, "/b", &forged, t), Reason::BadSignature);
    // the same signature and payload under another header: re-verified, and refused
    let other_header = common::b64url(br#"{"alg":"RS256","kid":"k1","typ":"JWT","x":1}"#);
    let payload = rest.split_once('.').unwrap().0;
    let reheadered = format!("{other_header}.{payload}.{signature}");
    assert_eq!(decide(&s, "/a", &reheadered, t), Reason::BadSignature);
    // extra segments never reach the cache either
    assert_eq!(
        decide(&s, "/a", &format!("{header}.x.{payload}.{signature}"), t),
        Reason::MalformedToken
    );
    assert_eq!(s.tokens.len(), 1, "nothing new remembered");
    assert_eq!(
        decide(&s, "/a", &token, t),
        Reason::Allowed,
        "the real token still hits"
    );
}

#[tokio::test]
async fn a_withdrawn_key_stops_working_at_the_next_refresh() {
    let old = TestKey::rsa("old");
    let issuer = IssuerServer::start(&[&old]).await;
    let s = snapshot(&issuer).await;
    let t = now() as i64;
    let token = old.mint(keycloak_claims(&issuer.issuer_url(), "app-a"));
    assert_eq!(decide(&s, "/a", &token, t), Reason::Allowed);
    assert_eq!(decide(&s, "/a", &token, t), Reason::Allowed, "served from the cache");
    let new = TestKey::rsa("new");
    issuer.set_keys(&[&new]);
    s.keys.issuer(0).refresh().await;
    assert_eq!(
        decide(&s, "/a", &token, t),
        Reason::UnknownKid,
        "the cached entry died with the old key set"
    );
    let fresh = new.mint(keycloak_claims(&issuer.issuer_url(), "app-a"));
    assert_eq!(decide(&s, "/a", &fresh, t), Reason::Allowed);
}

#[test]
fn bounded_in_entries_and_bytes() {
    let key = TestKey::ec("k");
    let loaded = config::parse(
        "issuers:\n  kc:\n    issuer: https://sso.example.com/realms/x\n    jwks_file: /dev/null\n    algorithms: [ES256]\n\
         routes:\n  - name: a\n    client_ids: [app-a]\n    client_id_claims: [azp]\n",
    )
    .unwrap();
    let keyset = Arc::new(audgate::jwks::KeySet::parse(common::jwks(&[&key]).to_string().as_bytes()).unwrap());
    let t = now() as i64;
    for (bounds, what) in [
        (
            TokenCacheConfig {
                max_entries: 50,
                max_bytes: 1 << 30,
            },
            "entries",
        ),
        (
            TokenCacheConfig {
                max_entries: 1_000_000,
                max_bytes: 256 << 10,
            },
            "bytes",
        ),
    ] {
        let cache = TokenCache::new(&bounds);
        let (store, _) = KeyStore::build(&loaded.config, None).unwrap();
        let memo = cache.view(&store);
        for i in 0..2000 {
            let token = key.mint(merge(
                keycloak_claims("https://sso.example.com/realms/x", "app-a"),
                json!({"jti": format!("t{i}")}),
            ));
            let headers = HashMap::from([("authorization".to_owned(), format!("Bearer {token}"))]);
            let input = CheckInput {
                method: "GET",
                host: "h",
                path: "/",
                headers: Headers::Map(&headers),
                route_hint: None,
            };
            let d = authz::evaluate_with_memo(&loaded.config.policy, &input, |_| Some(keyset.clone()), &memo, t);
            assert_eq!(d.reason, Reason::Allowed);
        }
        assert!(cache.len() <= bounds.max_entries, "{what}: {} entries", cache.len());
        assert!(cache.weight() <= bounds.max_bytes, "{what}: {} bytes", cache.weight());
        assert!(
            cache.len() > 10,
            "{what}: the cache still holds tokens ({})",
            cache.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hits_and_misses_are_counted_on_metrics() {
    let key = TestKey::rsa("k1");
    let issuer = IssuerServer::start(&[&key]).await;
    let audgate = Audgate::start(&config(&issuer.issuer_url())).await;
    audgate.wait_ready().await;
    let grpc = GrpcAuthz::connect(audgate.ports.grpc).await.unwrap();
    let token = key.mint(keycloak_claims(&issuer.issuer_url(), "app-a"));
    for _ in 0..5 {
        let reply = grpc.check(&CheckCall::get("h", "/a").bearer(&token)).await.unwrap();
        assert!(reply.is_allow());
    }
    let metrics = audgate.metrics().await;
    assert_eq!(metrics.sum("audgate_token_cache_misses_total", &[]), 1.0);
    assert_eq!(metrics.sum("audgate_token_cache_hits_total", &[]), 4.0);
}
