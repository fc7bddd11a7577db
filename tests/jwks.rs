//! The per-issuer key cache against a real HTTP issuer on loopback: discovery, last good keys
//! on a failed or garbage refresh, the size cap, the refetch rate limit, and static files.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use audgate::config::{KeySource, KeySourceConfig};
use audgate::jwks::{IssuerKeys, MAX_DOCUMENT_BYTES, Refreshed};
use common::{IssuerServer, TestKey, free_port, jwks};
use serde_json::json;

fn source(source: KeySource, min_refresh: Duration) -> KeySourceConfig {
    KeySourceConfig {
        source,
        refresh_interval: Duration::from_secs(300),
        min_refresh_interval: min_refresh,
        ca_file: None,
    }
}

fn discovery(server: &IssuerServer, min_refresh: Duration) -> IssuerKeys {
    let config = source(KeySource::Discovery(server.discovery_url()), min_refresh);
    IssuerKeys::new("test".into(), config).expect("client builds")
}

fn kids(keys: &IssuerKeys) -> Vec<String> {
    let set = keys.current().expect("keys loaded");
    set.kids().into_iter().map(str::to_owned).collect()
}

#[tokio::test]
async fn discovery_loads_keys_and_a_bad_refresh_keeps_the_last_good_ones() {
    let k1 = TestKey::rsa("k1");
    let server = IssuerServer::start(&[&k1]).await;
    let keys = discovery(&server, Duration::from_secs(30));
    assert!(keys.current().is_none(), "nothing before the first load");

    assert_eq!(keys.refresh().await, Refreshed::Ok { keys: 1, changed: true });
    assert_eq!(kids(&keys), ["k1"]);
    assert_eq!(server.discovery_fetches(), 1);
    let generation = keys.generation();

    // the same document again: no change, the discovered jwks_uri is reused
    assert_eq!(
        keys.refresh().await,
        Refreshed::Ok {
            keys: 1,
            changed: false
        }
    );
    assert_eq!(keys.generation(), generation);
    assert_eq!(server.discovery_fetches(), 1);

    // garbage, then an unreachable endpoint: both fail, the last good keys stay
    server.set_jwks(json!("<html>maintenance</html>"));
    assert!(matches!(keys.refresh().await, Refreshed::Failed(_)));
    server.set_jwks_uri_override(Some(format!("http://127.0.0.1:{}/certs", free_port())));
    server.set_jwks(jwks(&[&k1]));
    assert!(
        matches!(keys.refresh().await, Refreshed::Failed(_)),
        "the old uri now fails"
    );
    assert!(
        matches!(keys.refresh().await, Refreshed::Failed(_)),
        "re-discovered, still down"
    );
    assert_eq!(kids(&keys), ["k1"]);
    assert_eq!(keys.generation(), generation);

    // back up with a rotated key: replaced, generation bumped
    server.set_jwks_uri_override(None);
    let k2 = TestKey::ec("k2");
    server.set_keys(&[&k2]);
    assert_eq!(keys.refresh().await, Refreshed::Ok { keys: 1, changed: true });
    assert_eq!(kids(&keys), ["k2"]);
    assert!(keys.generation() > generation);
}

#[tokio::test]
async fn oversized_documents_are_refused() {
    let k1 = TestKey::rsa("k1");
    let server = IssuerServer::start(&[&k1]).await;
    let keys = discovery(&server, Duration::from_secs(30));
    let padding = "x".repeat(MAX_DOCUMENT_BYTES);
    server.set_jwks(json!({"keys": [k1.jwk()], "padding": padding}));
    match keys.refresh().await {
        Refreshed::Failed(e) => assert!(e.contains("over"), "{e}"),
        other => panic!("an oversized JWKS loaded: {other:?}"),
    }
    assert!(keys.current().is_none());
}

#[tokio::test]
async fn unknown_kid_refetches_are_rate_limited_and_shared() {
    let k1 = TestKey::rsa("k1");
    let server = IssuerServer::start(&[&k1]).await;
    let keys = Arc::new(discovery(&server, Duration::from_secs(30)));
    keys.refresh().await;
    let fetches = server.jwks_fetches();

    // within min_refresh_interval of the last fetch: no fetch at all
    let seen = keys.generation();
    let many = (0..16).map(|_| {
        let keys = Arc::clone(&keys);
        tokio::spawn(async move { keys.refetch_for_unknown_kid(seen).await })
    });
    for task in many {
        assert!(!task.await.unwrap());
    }
    assert_eq!(server.jwks_fetches(), fetches);

    // with the interval elapsed (zero here), concurrent requests share one fetch
    let eager = Arc::new(discovery(&server, Duration::ZERO));
    eager.refresh().await;
    let k2 = TestKey::rsa("k2");
    server.set_keys(&[&k1, &k2]);
    let before = server.jwks_fetches();
    let seen = eager.generation();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let keys = Arc::clone(&eager);
            tokio::spawn(async move { keys.refetch_for_unknown_kid(seen).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap(), "every waiter sees the new keys");
    }
    assert_eq!(server.jwks_fetches() - before, 1, "one fetch for all of them");
    assert_eq!(kids(&eager), ["k1", "k2"]);
}

#[tokio::test]
async fn a_jwks_file_is_read_and_a_missing_one_is_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let k1 = TestKey::rsa("file-key");
    std::fs::write(&path, jwks(&[&k1]).to_string()).unwrap();
    let keys = IssuerKeys::new("file".into(), source(KeySource::File(path), Duration::ZERO)).unwrap();
    assert_eq!(keys.refresh().await, Refreshed::Ok { keys: 1, changed: true });
    assert_eq!(kids(&keys), ["file-key"]);

    let missing = source(KeySource::File(PathBuf::from("/nonexistent/jwks.json")), Duration::ZERO);
    let keys = IssuerKeys::new("missing".into(), missing).unwrap();
    assert!(matches!(keys.refresh().await, Refreshed::Failed(_)));
    assert!(keys.current().is_none());
}
