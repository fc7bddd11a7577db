//! A Keycloak-shaped host with many realms, for templated (`{tenant}`) issuers: both adapters'
//! tenant tests (tests/e2e_policies.rs for the server, tests/e2e_module.rs for the module).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::TestKey;

/// A Keycloak-shaped host with many realms: `/{kind}/{realm}/.well-known/openid-configuration`
/// and `/{kind}/{realm}/protocol/openid-connect/certs` for the realms it knows (404 for any
/// other), each realm with its own key. Every request is counted.
pub struct Realms {
    pub base: String,
    keys: Arc<Mutex<HashMap<String, Value>>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct RealmsState {
    base: String,
    keys: Arc<Mutex<HashMap<String, Value>>>,
    requests: Arc<AtomicUsize>,
}

impl Realms {
    pub async fn start() -> Realms {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = RealmsState {
            base: base.clone(),
            keys: Arc::default(),
            requests: Arc::default(),
        };
        let app = axum::Router::new()
            .route(
                "/{kind}/{realm}/.well-known/openid-configuration",
                axum::routing::get(realm_discovery),
            )
            .route(
                "/{kind}/{realm}/protocol/openid-connect/certs",
                axum::routing::get(realm_jwks),
            )
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Realms {
            base,
            keys: state.keys,
            requests: state.requests,
            task,
        }
    }

    /// Publish `key` for `/{kind}/{realm}`; returns that realm's issuer URL.
    pub fn add(&self, kind: &str, realm: &str, key: &TestKey) -> String {
        let path = format!("{kind}/{realm}");
        self.keys.lock().unwrap().insert(path.clone(), super::jwks(&[key]));
        format!("{}/{path}", self.base)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Realms {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type RealmPath = axum::extract::Path<(String, String)>;

async fn realm_discovery(
    axum::extract::State(s): axum::extract::State<RealmsState>,
    axum::extract::Path((kind, realm)): RealmPath,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    s.requests.fetch_add(1, Ordering::SeqCst);
    let path = format!("{kind}/{realm}");
    if !s.keys.lock().unwrap().contains_key(&path) {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    }
    let issuer = format!("{}/{path}", s.base);
    axum::Json(json!({"issuer": issuer, "jwks_uri": format!("{issuer}/protocol/openid-connect/certs")})).into_response()
}

async fn realm_jwks(
    axum::extract::State(s): axum::extract::State<RealmsState>,
    axum::extract::Path((kind, realm)): RealmPath,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    s.requests.fetch_add(1, Ordering::SeqCst);
    match s.keys.lock().unwrap().get(&format!("{kind}/{realm}")) {
        Some(jwks) => axum::Json(jwks.clone()).into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

/// The tenant tests' audgate config, issuers on `base` (a [`Realms`] host): `realms` lists its
/// tenants, `teams` takes any tenant its pattern admits (at most 3); `extra` is appended.
pub fn tenants_config(base: &str, extra: &str) -> String {
    format!(
        r#"
issuers:
  realms:
    issuer: {base}/realms/{{tenant}}
    tenants: [shop, billing]
    discovery: true
  teams:
    issuer: {base}/orgs/{{tenant}}
    tenant_pattern: "^team-[a-z0-9]{{1,20}}$"
    max_tenants: 3
    discovery: true
    min_refresh_interval: 30s
claim_headers:
  x-auth-subject: sub
  x-auth-tenant: $tenant
  x-auth-client-id: $client_id
routes:
  - name: shop-only
    match: {{ path_prefix: /shop }}
    issuers: [realms]
    tenants: [shop]
    client_ids: [api]
    client_id_claims: [aud, azp]
  - name: any
    match: {{ path_prefix: / }}
    client_ids: [api]
    client_id_claims: [aud, azp]
default: deny
{extra}"#
    )
}
