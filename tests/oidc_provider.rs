//! audgate against a real OpenID provider that nobody here wrote: npm's `oidc-provider` (OpenID
//! Certified; the version is pinned by tests/oidc-provider/package-lock.json), run by node from
//! tests/oidc-provider/server.js on a free 127.0.0.1 port. Tokens come from real token requests
//! (`grant_type=client_credentials` with an RFC 8707 `resource`, which picks the audience), and
//! audgate finds the keys through discovery (`discovery: true` -> `jwks_uri`), as in production.
//!
//! What runs: discovery and the audience/claim checks on RFC 9068 tokens (header `typ: at+jwt`,
//! claims `iss sub aud client_id scope jti iat exp`), the same through a real Envoy, key rotation
//! (new key published first, old one kept), realm re-creation (every kid changes), a new key under
//! a kid audgate already holds, and a provider that is down when audgate starts.
//!
//! Needs node (20 or later) and `npm ci` in tests/oidc-provider: scripts/test.sh runs
//! scripts/install-oidc-provider.sh for that; without it these tests fail with that command,
//! they never skip.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Audgate, CheckCall, CheckKind, CheckReply, EchoServer, Envoy, GrpcAuthz, TestKey, TestProcess, assert_deny,
    assert_upstream, bearer, form_encode, free_port, http_client, jose_header, keycloak_claims, merge, repo_root,
};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The command that installs the provider (what the panics tell you to run).
const INSTALL_HINT: &str = "scripts/install-oidc-provider.sh \
     (it runs `npm ci --no-audit --no-fund` in tests/oidc-provider; needs node 20+ and npm)";

/// The client server.js registers (test-only credentials).
const CLIENT_ID: &str = "audgate-test-client";
const CLIENT_SECRET: &str = "audgate-test-secret-not-for-production";

/// Resource indicators server.js knows, and the `aud` each one gets.
const ORDERS: &str = "https://orders.example.com/"; // aud orders-api, RS256
const ORDERS_ES256: &str = "https://orders.example.com/es256"; // aud orders-api, ES256
const BILLING: &str = "https://billing.example.com/"; // aud billing-api, RS256

const ORDERS_HOST: &str = "orders.example.com";
const M2M_HOST: &str = "m2m.example.com";

/// How long node may take to print `ready`.
const PROVIDER_START_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The provider
// ---------------------------------------------------------------------------------------------

fn provider_dir() -> PathBuf {
    repo_root().join("tests/oidc-provider")
}

/// Panics (never skips) unless node runs and tests/oidc-provider/node_modules holds the pinned
/// oidc-provider.
fn assert_installed() {
    let dir = provider_dir();
    let read_json =
        |path: PathBuf| -> Option<Value> { serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok() };
    let manifest = read_json(dir.join("package.json")).expect("tests/oidc-provider/package.json is readable JSON");
    let pinned = manifest["dependencies"]["oidc-provider"]
        .as_str()
        .expect("package.json pins oidc-provider")
        .to_owned();
    let installed = dir.join("node_modules/oidc-provider/package.json");
    let Some(installed) = read_json(installed.clone()) else {
        panic!(
            "{} is missing: the oidc-provider tests need the pinned npm package installed. Install it with: {INSTALL_HINT}",
            installed.display()
        );
    };
    assert_eq!(
        installed["version"].as_str(),
        Some(pinned.as_str()),
        "tests/oidc-provider/node_modules holds another oidc-provider than package.json pins (stale install). \
         Reinstall with: {INSTALL_HINT}"
    );
    match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`node --version` failed ({}); the oidc-provider tests need node 20+",
            out.status
        ),
        Err(e) => panic!("cannot run `node` ({e}); the oidc-provider tests need node 20+ on PATH"),
    }
}

/// `node tests/oidc-provider/server.js` on a fixed 127.0.0.1 port (kept across restarts, so the
/// issuer URL stays the same), with signing keys the test names. The private keys live in a temp
/// dir that is removed on drop; the provider is killed on drop.
struct OidcProvider {
    port: u16,
    dir: TempDir,
    process: Option<TestProcess>,
    starts: u32,
    client: reqwest::Client,
}

impl OidcProvider {
    /// Picks a port; does not start anything.
    fn new() -> Self {
        assert_installed();
        let dir = tempfile::Builder::new()
            .prefix("audgate-oidc-provider-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        std::fs::create_dir(dir.path().join("keys")).expect("create the keys dir");
        Self {
            port: free_port(),
            dir,
            process: None,
            starts: 0,
            client: http_client(),
        }
    }

    /// `http://127.0.0.1:PORT`, the provider's `iss`.
    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the provider publishing `keys` (`KID:ALG`, in this order; the first key of an
    /// algorithm signs) and waits for its `ready` line. A kid used before keeps its key.
    async fn start(&mut self, keys: &[&str]) {
        assert!(self.process.is_none(), "the provider is already running");
        self.starts += 1;
        let run_dir = self.dir.path().join(format!("run-{}", self.starts));
        std::fs::create_dir(&run_dir).expect("create the run dir");
        let mut command = Command::new("node");
        command
            .arg("server.js")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--keys-dir")
            .arg(self.dir.path().join("keys"))
            .arg("--keys")
            .arg(keys.join(","))
            .current_dir(provider_dir());
        let mut process = TestProcess::spawn("oidc-provider", command, &run_dir);
        let deadline = Instant::now() + PROVIDER_START_TIMEOUT;
        while !process.stdout().lines().any(|line| line.starts_with("ready ")) {
            // (its output is printed when `process` drops during the panic)
            if let Some(status) = process.exited() {
                panic!("node tests/oidc-provider/server.js exited ({status}) before printing `ready`");
            }
            assert!(
                Instant::now() < deadline,
                "node tests/oidc-provider/server.js printed no `ready` line within {PROVIDER_START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.process = Some(process);
    }

    /// Kills the provider (its port stops answering).
    fn stop(&mut self) {
        self.process = None;
    }

    /// Deletes the stored key of `kid`: the next start makes a new key under the same kid.
    fn forget_key(&self, kid: &str) {
        let path = self.dir.path().join("keys").join(format!("{kid}.json"));
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("cannot remove {}: {e}", path.display()));
    }

    /// Stops and starts again with `keys` on the same port.
    async fn restart(&mut self, keys: &[&str]) {
        self.stop();
        self.start(keys).await;
    }

    /// A client-credentials access token for `resource` (RFC 8707), with `scope` if given.
    async fn token(&self, resource: &str, scope: Option<&str>) -> String {
        let mut form = vec![("grant_type", "client_credentials"), ("resource", resource)];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        let url = format!("{}/token", self.issuer());
        let response = self
            .client
            .post(&url)
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_encode(&form))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url} failed: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        // An error answer carries no token, so it can be shown whole.
        assert!(
            status.is_success(),
            "token request for {resource} answered {status}: {text}"
        );
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("token response is not JSON: {e}"));
        assert_eq!(
            body["token_type"], "Bearer",
            "token_type of the token response for {resource}"
        );
        body["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in the token response for {resource}"))
            .to_owned()
    }
}

fn kid(token: &str) -> String {
    jose_header(token)["kid"].as_str().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------------------------
// audgate
// ---------------------------------------------------------------------------------------------

/// The audgate config: one issuer found by discovery, three routes.
/// - `orders-write` (host orders.example.com, /write): `aud` orders-api and scope orders:write;
/// - `orders` (host orders.example.com): `aud` orders-api — what a resource indicator for
///   https://orders.example.com/ yields;
/// - `by-oauth-client` (host m2m.example.com): the RFC 9068 `client_id` claim names the client.
fn config(issuer: &str, refresh_interval: &str, min_refresh_interval: &str) -> String {
    format!(
        r#"
issuers:
  op:
    issuer: {issuer}
    discovery: true
    algorithms: [RS256, ES256]
    refresh_interval: {refresh_interval}
    min_refresh_interval: {min_refresh_interval}
    leeway: 5s

claim_headers:
  x-auth-subject: sub
  x-auth-issuer: iss
  x-auth-client-id: $client_id
  x-auth-oauth-client: client_id
  x-auth-scope: scope

routes:
  - name: orders-write
    match: {{ hosts: [{ORDERS_HOST}], path_prefix: /write }}
    client_ids: [orders-api]
    required_scopes: ["orders:write"]
  - name: orders
    match: {{ hosts: [{ORDERS_HOST}] }}
    client_ids: [orders-api]
  - name: by-oauth-client
    match: {{ hosts: [{M2M_HOST}] }}
    client_ids: [{CLIENT_ID}]
    client_id_claims: [client_id]

default: deny
"#
    )
}

async fn check(audgate: &Audgate, grpc: &GrpcAuthz, host: &str, path: &str, token: &str) -> CheckReply {
    grpc.check(&CheckCall::get(host, path).bearer(token))
        .await
        .unwrap_or_else(|e| panic!("gRPC Check failed: {e}\n{}", audgate.logs()))
}

fn assert_allow(reply: &CheckReply, route: &str, context: &str) {
    assert!(reply.is_allow(), "{context}: expected an allow\n{reply}");
    assert_eq!(
        reply.metadata.get("route").map(String::as_str),
        Some(route),
        "{context}\n{reply}"
    );
}

fn assert_grpc_deny(reply: &CheckReply, status: u16, reason: &str, context: &str) {
    assert!(
        reply.kind == CheckKind::Denied && reply.grpc_code != 0 && reply.status == status,
        "{context}: expected a {status} deny ({reason})\n{reply}"
    );
    assert_eq!(reply.error_code().as_deref(), Some(reason), "{context}\n{reply}");
}

fn refreshes(metrics: &common::Metrics, result: &str) -> f64 {
    metrics.sum("audgate_jwks_refresh_total", &[("issuer", "op"), ("result", result)])
}

/// Checks `token` over gRPC (every 100 ms, up to `timeout`) until `done` accepts the reply;
/// returns that reply. Panics with the last reply and audgate's logs otherwise.
async fn wait_reply(
    audgate: &Audgate,
    grpc: &GrpcAuthz,
    token: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&CheckReply) -> bool,
) -> CheckReply {
    let deadline = Instant::now() + timeout;
    loop {
        let reply = check(audgate, grpc, ORDERS_HOST, "/orders/1", token).await;
        if done(&reply) {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\nlast reply: {reply}\n{}",
            audgate.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Discovery finds the provider's JWKS; its RS256 and ES256 tokens with `aud` from the resource
/// indicator pass the route for that audience with the claim headers set, a token for another
/// resource is `audience_mismatch`, and `client_id` (RFC 9068) works as the client-id claim.
#[tokio::test(flavor = "multi_thread")]
async fn discovery_and_resource_indicator_audiences() {
    let mut provider = OidcProvider::new();
    provider.start(&["op-rsa:RS256", "op-ec:ES256"]).await;
    let issuer = provider.issuer();
    let audgate = Audgate::start(&config(&issuer, "5m", "1s")).await;
    audgate.wait_ready().await;
    let grpc = audgate.grpc().await;

    let orders = provider.token(ORDERS, Some("orders:read")).await;
    let header = jose_header(&orders);
    assert_eq!(
        (header["alg"].as_str(), header["typ"].as_str(), header["kid"].as_str()),
        (Some("RS256"), Some("at+jwt"), Some("op-rsa")),
        "oidc-provider's JWT access-token header"
    );
    let claims = common::decode_payload(&orders);
    for name in ["iss", "sub", "aud", "client_id", "scope", "jti", "iat", "exp"] {
        assert!(
            claims.get(name).is_some(),
            "oidc-provider's token has no `{name}`: {claims}"
        );
    }
    assert_eq!(
        (claims["aud"].as_str(), claims["iss"].as_str()),
        (Some("orders-api"), Some(issuer.as_str()))
    );

    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &orders).await;
    assert_allow(&reply, "orders", "RS256 token for https://orders.example.com/");
    for (name, want) in [
        ("x-auth-subject", CLIENT_ID),
        ("x-auth-issuer", issuer.as_str()),
        ("x-auth-client-id", "orders-api"),
        ("x-auth-oauth-client", CLIENT_ID),
        ("x-auth-scope", "orders:read"),
    ] {
        assert_eq!(reply.header(name), Some(want), "claim header {name}\n{reply}");
    }

    let orders_ec = provider.token(ORDERS_ES256, None).await;
    assert_eq!(jose_header(&orders_ec)["alg"], "ES256");
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &orders_ec).await;
    assert_allow(&reply, "orders", "ES256 token for the same audience");

    let billing = provider.token(BILLING, None).await;
    assert_eq!(common::decode_payload(&billing)["aud"], "billing-api");
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &billing).await;
    assert_grpc_deny(
        &reply,
        403,
        "audience_mismatch",
        "token for https://billing.example.com/ on orders",
    );

    let reply = check(&audgate, &grpc, ORDERS_HOST, "/write/1", &orders).await;
    assert_grpc_deny(
        &reply,
        403,
        "insufficient_scope",
        "orders:read token where orders:write is required",
    );
    let writer = provider.token(ORDERS, Some("orders:read orders:write")).await;
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/write/1", &writer).await;
    assert_allow(&reply, "orders-write", "orders:write token");

    // Any resource's token names the OAuth client in `client_id`.
    let reply = check(&audgate, &grpc, M2M_HOST, "/jobs", &billing).await;
    assert_allow(&reply, "by-oauth-client", "client_id claim (RFC 9068)");
    assert_eq!(reply.header("x-auth-client-id"), Some(CLIENT_ID), "{reply}");

    let metrics = audgate.metrics().await;
    assert_eq!(
        metrics.get("audgate_jwks_keys", &[("issuer", "op")]),
        Some(2.0),
        "both published keys are usable\n{}",
        metrics.describe("audgate_jwks_keys")
    );
}

/// The same through a real Envoy: an allowed request reaches the upstream with the claim
/// headers (a client-sent copy replaced), a token for another audience is a 403 there.
#[tokio::test(flavor = "multi_thread")]
async fn through_envoy() {
    let mut provider = OidcProvider::new();
    provider.start(&["envoy-rsa:RS256"]).await;
    let issuer = provider.issuer();
    let echo = EchoServer::start().await;
    let audgate = Audgate::start(&config(&issuer, "5m", "1s")).await;
    audgate.wait_ready().await;
    let envoy = Envoy::start(audgate.ports.grpc, echo.port()).await;
    let client = http_client();

    let orders = provider.token(ORDERS, Some("orders:read")).await;
    let auth = bearer(&orders);
    let reply = common::get(
        &client,
        &envoy.url(),
        "/orders/1",
        &[
            ("host", ORDERS_HOST),
            ("authorization", &auth),
            ("x-auth-subject", "smuggled"),
        ],
    )
    .await;
    assert_upstream(
        &reply,
        &[
            ("x-auth-subject", Some(CLIENT_ID)),
            ("x-auth-issuer", Some(issuer.as_str())),
            ("x-auth-client-id", Some("orders-api")),
            ("x-auth-oauth-client", Some(CLIENT_ID)),
            ("x-auth-scope", Some("orders:read")),
        ],
        &format!("through Envoy\n{}", envoy.logs()),
    );

    let billing = provider.token(BILLING, None).await;
    let auth = bearer(&billing);
    let reply = common::get(
        &client,
        &envoy.url(),
        "/orders/1",
        &[("host", ORDERS_HOST), ("authorization", &auth)],
    )
    .await;
    assert_deny(
        &reply,
        403,
        "audience_mismatch",
        Some(&billing),
        "billing token through Envoy",
    );
}

/// Rotation: the provider restarts publishing a new key first and the old one still. A token
/// with the new kid is `unknown_kid` while audgate's refetch is rate-limited (the keys were
/// fetched less than `min_refresh_interval` ago), then allowed by one refetch (the periodic
/// refresh is 5 minutes away); tokens with the old kid keep working.
#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_new_key_first_old_key_kept() {
    const MIN_REFRESH: Duration = Duration::from_secs(4);
    let mut provider = OidcProvider::new();
    provider.start(&["rot-1:RS256"]).await;
    let started = Instant::now(); // audgate's first fetch is after this
    let audgate = Audgate::start(&config(&provider.issuer(), "5m", "4s")).await;
    audgate.wait_ready().await;
    let grpc = audgate.grpc().await;

    let old = provider.token(ORDERS, None).await;
    assert_eq!(kid(&old), "rot-1");
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &old).await;
    assert_allow(&reply, "orders", "token before the rotation");

    provider.restart(&["rot-2:RS256", "rot-1:RS256"]).await;
    let new = provider.token(ORDERS, None).await;
    assert_eq!(kid(&new), "rot-2", "the provider signs with the first key");

    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &new).await;
    if started.elapsed() < MIN_REFRESH {
        // The last fetch happened after `started`, so a refetch now would be too soon.
        assert_grpc_deny(
            &reply,
            401,
            "unknown_kid",
            "new kid within min_refresh_interval of the last fetch",
        );
    } else {
        eprintln!(
            "note: the provider restart took {:?}, past min_refresh_interval; the rate-limited deny was not observed",
            started.elapsed()
        );
    }
    let reply = wait_reply(&audgate, &grpc, &new, Duration::from_secs(15), "new kid allowed", |r| {
        r.is_allow()
    })
    .await;
    assert_allow(&reply, "orders", "token with the new kid");
    assert!(
        started.elapsed() >= MIN_REFRESH,
        "the new kid was allowed {:?} after audgate started, before min_refresh_interval {MIN_REFRESH:?}",
        started.elapsed()
    );

    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &old).await;
    assert_allow(&reply, "orders", "token with the old kid, which is still published");
    let metrics = audgate.metrics().await;
    assert_eq!(
        (refreshes(&metrics, "ok"), refreshes(&metrics, "error")),
        (2.0, 0.0),
        "one start-up fetch and one refetch for the unknown kid\n{}",
        metrics.describe("audgate_jwks_refresh_total")
    );
    assert_eq!(metrics.get("audgate_jwks_keys", &[("issuer", "op")]), Some(2.0));
}

/// Realm re-creation: the provider restarts with all-new keys. The periodic refresh (2 s)
/// replaces the key set by itself; from then on tokens with the old kids — allowed and cached
/// before — are `unknown_kid`, and new tokens are allowed.
#[tokio::test(flavor = "multi_thread")]
async fn realm_recreation_every_kid_changes() {
    let mut provider = OidcProvider::new();
    provider.start(&["realm-a-rsa:RS256", "realm-a-ec:ES256"]).await;
    let audgate = Audgate::start(&config(&provider.issuer(), "2s", "1s")).await;
    audgate.wait_ready().await;
    let grpc = audgate.grpc().await;

    let old_rsa = provider.token(ORDERS, None).await;
    let old_ec = provider.token(ORDERS_ES256, None).await;
    for (token, what) in [(&old_rsa, "RS256"), (&old_ec, "ES256")] {
        let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", token).await;
        assert_allow(&reply, "orders", &format!("{what} token of the first realm"));
    }

    provider.restart(&["realm-b-rsa:RS256", "realm-b-ec:ES256"]).await;
    let recreated = Instant::now();
    // Only the old token is presented until it fails: the periodic refresh must find the change.
    let reply = wait_reply(
        &audgate,
        &grpc,
        &old_rsa,
        Duration::from_secs(15),
        "old kid denied after the refresh",
        |r| r.kind == CheckKind::Denied,
    )
    .await;
    assert_grpc_deny(&reply, 401, "unknown_kid", "RS256 token of the deleted realm");
    eprintln!(
        "old kid denied {:?} after the realm was re-created",
        recreated.elapsed()
    );
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &old_ec).await;
    assert_grpc_deny(&reply, 401, "unknown_kid", "ES256 token of the deleted realm");

    for (resource, what) in [(ORDERS, "RS256"), (ORDERS_ES256, "ES256")] {
        let token = provider.token(resource, None).await;
        assert!(
            kid(&token).starts_with("realm-b-"),
            "{what} token signed by the new realm"
        );
        let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &token).await;
        assert_allow(&reply, "orders", &format!("{what} token of the new realm"));
    }
}

/// The provider is down when audgate starts: checks are `keys_unavailable` errors (a gRPC
/// `error_response` with 503, not a deny) and /readyz is not ready; once the provider starts,
/// audgate's retries load the keys and its tokens are allowed. When it goes down again later,
/// the last good keys stay in use and audgate stays ready.
#[tokio::test(flavor = "multi_thread")]
async fn provider_down_at_start_then_recovers() {
    let mut provider = OidcProvider::new();
    let issuer = provider.issuer();
    let audgate = Audgate::start(&config(&issuer, "2s", "1s")).await;
    let grpc = audgate.grpc().await;

    // No token can be had from a provider that is down: any well-formed token naming its
    // issuer shows the decision.
    let stand_in = TestKey::rsa("stand-in").mint(merge(keycloak_claims(&issuer, "x"), json!({"aud": "orders-api"})));
    audgate
        .wait_metric(
            "audgate_jwks_refresh_total",
            &[("issuer", "op"), ("result", "error")],
            Duration::from_secs(10),
            |v| v >= 1.0,
        )
        .await;
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &stand_in).await;
    assert!(
        reply.kind == CheckKind::Error && reply.grpc_code != 0 && reply.status == 503,
        "keys never loaded must be an error_response with 503\n{reply}"
    );
    assert_eq!(reply.error_code().as_deref(), Some("keys_unavailable"), "{reply}");
    let ready = audgate.readyz().await.expect("GET /readyz");
    assert_ne!(ready.status, 200, "/readyz before the keys loaded\n{ready}");

    provider.start(&["late-rsa:RS256"]).await;
    audgate.wait_ready().await;
    let token = provider.token(ORDERS, None).await;
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &token).await;
    assert_allow(&reply, "orders", "token once the provider is up");

    let unseen = provider.token(ORDERS, Some("orders:read")).await; // not in audgate's token cache
    let errors = refreshes(&audgate.metrics().await, "error");
    provider.stop();
    audgate
        .wait_metric(
            "audgate_jwks_refresh_total",
            &[("issuer", "op"), ("result", "error")],
            Duration::from_secs(10),
            |v| v > errors,
        )
        .await;
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &unseen).await;
    assert_allow(
        &reply,
        "orders",
        "token verified with the last good keys while the provider is down",
    );
    let ready = audgate.readyz().await.expect("GET /readyz");
    assert_eq!(
        ready.status, 200,
        "/readyz once keys loaded, provider down again\n{ready}"
    );
}

/// The same kid with new key material (a provider whose kid is fixed, e.g. a realm restored
/// with another key): audgate refetches only for an unknown kid, so new tokens are
/// `bad_signature` until the periodic refresh; from then on they are allowed and the old token,
/// allowed and cached before, is `bad_signature` (the cache is dropped when the key set changes
/// even though no kid did).
#[tokio::test(flavor = "multi_thread")]
async fn same_kid_new_key_waits_for_the_periodic_refresh() {
    const REFRESH: Duration = Duration::from_secs(3);
    let mut provider = OidcProvider::new();
    provider.start(&["fixed:RS256"]).await;
    let audgate = Audgate::start(&config(&provider.issuer(), "3s", "1s")).await;
    audgate.wait_ready().await;
    let grpc = audgate.grpc().await;
    let old = provider.token(ORDERS, None).await;
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &old).await;
    assert_allow(&reply, "orders", "token before the key changed");

    provider.forget_key("fixed");
    provider.restart(&["fixed:RS256"]).await;
    let new = provider.token(ORDERS, None).await;
    assert_eq!(kid(&new), "fixed");
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &new).await;
    if !reply.is_allow() {
        // (allowed when a periodic refresh already ran since the restart)
        assert_grpc_deny(
            &reply,
            401,
            "bad_signature",
            "new key under the old kid, before a refresh",
        );
    }
    let reply = wait_reply(
        &audgate,
        &grpc,
        &new,
        REFRESH * 3,
        "new key under the old kid allowed",
        |r| r.is_allow(),
    )
    .await;
    assert_allow(
        &reply,
        "orders",
        "new key under the old kid, after the periodic refresh",
    );
    let reply = check(&audgate, &grpc, ORDERS_HOST, "/orders/1", &old).await;
    assert_grpc_deny(&reply, 401, "bad_signature", "cached token of the replaced key");
}
