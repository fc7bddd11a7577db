//! audgate against a real Keycloak 26 server (`org.keycloak:keycloak-quarkus-dist`, pinned and
//! installed by scripts/install-keycloak.sh into `.keycloak/`), through a real Envoy and the
//! `audgate` binary. Every token comes from Keycloak's token endpoint (password and
//! client_credentials grants); every realm change is made with Keycloak's own `kcadm.sh`.
//!
//! One Keycloak serves the whole test binary (measured on the 2-core machine: ready 14 s after
//! `kc.sh start-dev` when the machine is quiet, 30-70 s while other builds run, plus about 40 s
//! the first time after the install, when Keycloak runs its build step): it is
//! started by the first test that needs it, on a free 127.0.0.1 port with an in-memory database
//! (`start-dev --db=dev-mem`), and every test creates its own realm, so tests stay independent and
//! may run in parallel. Keycloak never outlives this binary: it runs under a small shell guard
//! whose standard input is a pipe from this process; when this process exits, however it ends,
//! the kernel closes the pipe, the guard reads EOF and stops Keycloak's whole process group
//! (SIGTERM, then SIGKILL after 15 s).
//!
//! What runs (the points of issue 12):
//! 1. the seed case: a `web-shop` user token on a route for `orders-api` is denied
//!    `audience_mismatch`; the `kcadm.sh` command `audgate explain` prints is run as printed, and
//!    the next token passes;
//! 2. `client_id_claims: [aud, azp]` takes the `web-shop` token, realm and client roles of the
//!    user are enforced; the route that checks only `aud` gets the other hint (the route's own
//!    client in `azp`), whose printed command also makes the next token pass;
//! 3. a refresh token and an ID token of the same login are `wrong_token_type`;
//! 4. the `reports` service-account token passes on its `client_id`, with its real realm and
//!    client roles enforced;
//! 5. the realm's `RSA-OAEP` `use: enc` key is skipped, and `audgate doctor` passes and says so;
//! 6. key rotation with kcadm (a new `rsa-generated` provider with a higher priority, then the
//!    old one removed): one refetch, then the old tokens stop at the next refresh;
//! 7. `iss` follows the hostname: a token asked for at `localhost` is `unknown_issuer`, the hint
//!    names the `issuer_aliases` entry, and with it the token passes;
//! 8. an `at+jwt` access token passes; a lightweight access token is denied with a hint that
//!    fits it, and its printed command makes the next one pass.
//!
//! Needs Java 17 or 21 and scripts/install-keycloak.sh (scripts/test.sh runs it). Without the
//! install these tests fail with that command under CI (`CI=true`); elsewhere they are skipped
//! with a message only while `.keycloak/` does not exist at all (the install never ran).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{
    Audgate, EchoServer, Envoy, Reply, assert_deny, assert_upstream, audgate_binary, bearer, decode_payload,
    form_encode, free_port, get, http_client, jose_header, random_hex, repo_root,
};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The Keycloak version scripts/install-keycloak.sh installs (keep the two in step).
const KEYCLOAK_VERSION: &str = "26.5.6";
const INSTALL_HINT: &str = "scripts/install-keycloak.sh (Maven and Java 17 or 21; scripts/test.sh runs it)";
/// How long Keycloak may take to listen: about a minute on two busy cores, more on a slow CI.
const KEYCLOAK_START_TIMEOUT: Duration = Duration::from_secs(420);
const ADMIN_USER: &str = "admin";
const USER: &str = "alice";
const USER_PASSWORD: &str = "alice-test-password";
const REPORTS_SECRET: &str = "reports-test-secret";

// ---------------------------------------------------------------------------------------------
// The shared Keycloak
// ---------------------------------------------------------------------------------------------

/// The Keycloak this test binary runs (see the module doc).
struct Keycloak {
    home: PathBuf,
    /// The Java 21 or 17 scripts/install-keycloak.sh chose (`.keycloak/java-home`), if any.
    java_home: Option<PathBuf>,
    port: u16,
    admin_password: String,
    /// Keycloak's output, and each test's kcadm home directories.
    dir: PathBuf,
    log: PathBuf,
    /// The guard's stdin: never written, closed by the kernel when this process exits.
    _guard: Child,
}

static KEYCLOAK: OnceLock<Result<Keycloak, String>> = OnceLock::new();

fn keycloak_home() -> PathBuf {
    std::env::var_os("AUDGATE_TEST_KEYCLOAK")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            repo_root()
                .join(".keycloak")
                .join(format!("keycloak-{KEYCLOAK_VERSION}"))
        })
}

/// The shared Keycloak, started on first use; `None` (after a message) when it is not installed
/// and may be skipped: not under CI, and the install script never ran here.
fn keycloak() -> Option<&'static Keycloak> {
    let home = keycloak_home();
    if !home.join("bin/kc.sh").is_file() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        let attempted = repo_root().join(".keycloak").exists() || std::env::var_os("AUDGATE_TEST_KEYCLOAK").is_some();
        assert!(
            !ci && !attempted,
            "Keycloak {KEYCLOAK_VERSION} is not installed at {} (CI={ci}, install attempted: {attempted}). Install it with: {INSTALL_HINT}",
            home.display()
        );
        eprintln!(
            "SKIPPED: Keycloak is not installed ({} missing); run {INSTALL_HINT} to run tests/keycloak.rs",
            home.display()
        );
        return None;
    }
    match KEYCLOAK.get_or_init(|| Keycloak::start(home)) {
        Ok(kc) => Some(kc),
        Err(e) => panic!("{e}"),
    }
}

/// Stops the child's process group once this process's end closes the guard's stdin.
const GUARD: &str = r#"
"$@" </dev/null &
kc=$!
read -r _ || true
trap '' TERM
kill -TERM 0 2>/dev/null
for _ in $(seq 30); do kill -0 "$kc" 2>/dev/null || exit 0; sleep 0.5; done
kill -KILL 0
"#;

impl Keycloak {
    fn start(home: PathBuf) -> Result<Self, String> {
        use std::os::unix::process::CommandExt as _;
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("keycloak-{}", std::process::id()));
        remove_stale_dirs(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let log = dir.join("keycloak.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot clone a file handle: {e}"))?;
        let java_home = std::fs::read_to_string(repo_root().join(".keycloak/java-home"))
            .ok()
            .map(|s| PathBuf::from(s.trim()))
            .filter(|p| p.join("bin/java").is_file());
        let port = free_port();
        let admin_password = format!("admin-{}", random_hex(12));
        let started = Instant::now();
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(GUARD)
            .arg("keycloak-guard")
            .arg(home.join("bin/kc.sh"))
            .arg("start-dev")
            .arg("--db=dev-mem")
            .arg("--http-host=127.0.0.1")
            .arg(format!("--http-port={port}"))
            .env("KC_BOOTSTRAP_ADMIN_USERNAME", ADMIN_USER)
            .env("KC_BOOTSTRAP_ADMIN_PASSWORD", &admin_password)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // its own process group, for the guard's `kill 0`
            .process_group(0);
        if let Some(java) = &java_home {
            command.env("JAVA_HOME", java);
        }
        let mut guard = command
            .spawn()
            .map_err(|e| format!("cannot start Keycloak through bash ({e})"))?;
        let deadline = started + KEYCLOAK_START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Listening on: http://127.0.0.1") && realm_answers(port, "master") {
                break;
            }
            if let Ok(Some(status)) = guard.try_wait() {
                return Err(format!(
                    "Keycloak ({}) exited ({status}) before listening; its output:\n{text}",
                    home.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Keycloak did not listen on 127.0.0.1:{port} within {KEYCLOAK_START_TIMEOUT:?}; its output:\n{text}"
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!(
            "keycloak: Keycloak {KEYCLOAK_VERSION} ready on 127.0.0.1:{port} after {:.1} s (log {})",
            started.elapsed().as_secs_f64(),
            log.display()
        );
        Ok(Self {
            home,
            java_home,
            port,
            admin_password,
            dir,
            log,
            _guard: guard,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn issuer(&self, realm: &str) -> String {
        format!("{}/realms/{realm}", self.url())
    }

    fn bin(&self) -> PathBuf {
        self.home.join("bin")
    }

    fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        format!(
            "----- last lines of Keycloak's log ({}) -----\n{}",
            self.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// A home directory for one test's `kcadm.sh` (its config lives in `$HOME/.keycloak`).
    fn admin_home(&self) -> TempDir {
        tempfile::Builder::new()
            .prefix("kcadm-")
            .tempdir_in(&self.dir)
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"))
    }

    /// Runs `kcadm.sh ARGS` as the admin without a config file (`--no-config`, one login per
    /// call); returns stdout, panics with the output on failure.
    fn kcadm(&self, args: &[&str]) -> String {
        let mut command = Command::new(self.bin().join("kcadm.sh"));
        command.args(args).args([
            "--no-config",
            "--server",
            &self.url(),
            "--realm",
            "master",
            "--user",
            ADMIN_USER,
            "--password",
            &self.admin_password,
        ]);
        self.run(command, &format!("kcadm.sh {}", args.join(" ")))
    }

    /// Runs `script` in bash with `kcadm.sh` on PATH and `home` as HOME (so kcadm uses the
    /// config `kcadm.sh config credentials` wrote there).
    fn shell(&self, home: &Path, script: &str) -> String {
        let path = std::env::var("PATH").unwrap_or_default();
        let mut command = Command::new("bash");
        command
            .arg("-euo")
            .arg("pipefail")
            .arg("-c")
            .arg(script)
            .env("HOME", home)
            .env("PATH", format!("{}:{path}", self.bin().display()));
        self.run(command, script)
    }

    fn run(&self, mut command: Command, what: &str) -> String {
        if let Some(java) = &self.java_home {
            command.env("JAVA_HOME", java);
        }
        let out = command
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{what} failed ({})\nstdout: {stdout}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        stdout
    }

    /// Creates realm `name` with kcadm from [`realm_representation`].
    fn create_realm(&self, name: &str) -> Realm<'_> {
        let file = self.dir.join(format!("realm-{name}.json"));
        std::fs::write(&file, realm_representation(name).to_string())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        self.kcadm(&["create", "realms", "-f", &file.to_string_lossy()]);
        Realm {
            kc: self,
            name: name.to_owned(),
            client: http_client(),
        }
    }
}

/// `GET /realms/NAME` answers 200 (plain std TCP: no runtime needed while starting).
fn realm_answers(port: u16, realm: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = format!("GET /realms/{realm} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
}

/// Removes the directories earlier runs of this binary left (their process is gone).
fn remove_stale_dirs(mine: &Path) {
    let Some(parent) = mine.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("keycloak-")
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The realm every test starts from (one per test, named by the test):
/// - `web-shop`: a public client with direct access grants (the web front end);
/// - `orders-api`: the API, a confidential client with no flows, and client role `read`;
/// - `reports`: a confidential client with a service account holding realm role `reporting` and
///   client role `orders-api:read`, and the `service_account` client scope Keycloak 26 gives a
///   client when its service account is switched on (it puts `client_id` in the token);
/// - `web-shop-rfc9068` (access token header `typ: at+jwt`) and `web-shop-light` (lightweight
///   access tokens): public clients like `web-shop`;
/// - user `alice` with realm role `shopper` and client role `web-shop:customer`.
fn realm_representation(name: &str) -> Value {
    let default_roles = format!("default-roles-{name}");
    let public_client = |client_id: &str, attributes: Value| {
        json!({
            "clientId": client_id, "publicClient": true, "directAccessGrantsEnabled": true,
            "standardFlowEnabled": false, "attributes": attributes
        })
    };
    json!({
        "id": name,
        "realm": name,
        "enabled": true,
        "roles": {
            "realm": [{ "name": "shopper" }, { "name": "reporting" }],
            "client": {
                "web-shop": [{ "name": "customer" }],
                "orders-api": [{ "name": "read" }]
            }
        },
        "clients": [
            public_client("web-shop", json!({})),
            {
                "clientId": "orders-api", "publicClient": false, "secret": "orders-api-test-secret",
                "standardFlowEnabled": false, "directAccessGrantsEnabled": false
            },
            {
                "clientId": "reports", "publicClient": false, "secret": REPORTS_SECRET,
                "serviceAccountsEnabled": true, "standardFlowEnabled": false, "directAccessGrantsEnabled": false,
                "defaultClientScopes": ["web-origins", "acr", "profile", "roles", "basic", "email", "service_account"]
            },
            public_client("web-shop-rfc9068", json!({ "access.token.header.type.rfc9068": "true" })),
            public_client("web-shop-light", json!({ "client.use.lightweight.access.token.enabled": "true" }))
        ],
        "users": [
            {
                "username": USER, "enabled": true, "email": "alice@example.com", "emailVerified": true,
                "firstName": "Alice", "lastName": "Shopper",
                "credentials": [{ "type": "password", "value": USER_PASSWORD, "temporary": false }],
                "realmRoles": ["shopper", default_roles],
                "clientRoles": { "web-shop": ["customer"] }
            },
            {
                "username": "service-account-reports", "enabled": true, "serviceAccountClientId": "reports",
                "realmRoles": ["reporting", format!("default-roles-{name}")],
                "clientRoles": { "orders-api": ["read"] }
            }
        ]
    })
}

/// One test's realm.
struct Realm<'a> {
    kc: &'a Keycloak,
    name: String,
    client: reqwest::Client,
}

/// A token response.
struct Tokens {
    access: String,
    refresh: String,
    id: Option<String>,
}

impl Realm<'_> {
    fn issuer(&self) -> String {
        self.kc.issuer(&self.name)
    }

    /// A token request to the realm's token endpoint, with `Host: host` when given (`iss`
    /// follows it).
    async fn token_request(&self, form: &[(&str, &str)], host: Option<&str>) -> Tokens {
        let url = format!("{}/protocol/openid-connect/token", self.issuer());
        let mut request = self
            .client
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_encode(form));
        if let Some(host) = host {
            request = request.header("host", host);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url} failed: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        // an error answer carries no token: it can be shown whole
        assert!(status.is_success(), "token request to {url} answered {status}: {text}");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("token response is not JSON: {e}"));
        let field = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_owned);
        Tokens {
            access: field("access_token").expect("the token response has an access_token"),
            refresh: field("refresh_token").unwrap_or_default(),
            id: field("id_token"),
        }
    }

    /// Alice logs in at `client` (password grant) with `scope`.
    async fn login(&self, client: &str, scope: &str) -> Tokens {
        self.token_request(
            &[
                ("grant_type", "password"),
                ("client_id", client),
                ("username", USER),
                ("password", USER_PASSWORD),
                ("scope", scope),
            ],
            None,
        )
        .await
    }

    /// Alice's access token from `client`.
    async fn user_token(&self, client: &str) -> String {
        self.login(client, "profile").await.access
    }

    /// The `reports` service account's access token (client_credentials).
    async fn service_token(&self) -> String {
        self.token_request(
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "reports"),
                ("client_secret", REPORTS_SECRET),
            ],
            None,
        )
        .await
        .access
    }

    /// The realm's published JWKS.
    async fn jwks(&self) -> Value {
        let url = format!("{}/protocol/openid-connect/certs", self.issuer());
        let reply = get(&self.client, &url, "", &[]).await;
        assert_eq!(reply.status, 200, "GET {url}: {reply}");
        reply.json()
    }
}

/// `aud` (a string or an array) names `client`.
fn aud_has(claims: &Value, client: &str) -> bool {
    match &claims["aud"] {
        Value::String(a) => a == client,
        Value::Array(items) => items.iter().any(|a| a == client),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// audgate and Envoy in front of an echo upstream
// ---------------------------------------------------------------------------------------------

/// Client -> Envoy (gRPC ext_authz) -> audgate, and on allow the echo upstream.
struct Gate {
    envoy: Envoy,
    audgate: Audgate,
    _echo: EchoServer,
    client: reqwest::Client,
}

impl Gate {
    async fn start(config: &str) -> Self {
        let echo = EchoServer::start().await;
        let audgate = Audgate::start(config).await;
        audgate.wait_ready().await;
        let envoy = Envoy::start(audgate.ports.grpc, echo.port()).await;
        Self {
            envoy,
            audgate,
            _echo: echo,
            client: http_client(),
        }
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        let auth = bearer(token);
        get(
            &self.client,
            &self.envoy.url(),
            path,
            &[("authorization", auth.as_str())],
        )
        .await
    }

    /// `audgate explain` (text) for `GET path` with `token`, with this audgate's config file;
    /// returns stdout and the exit code.
    fn explain(&self, path: &str, token: &str) -> (String, i32) {
        let out = Command::new(audgate_binary())
            .arg("explain")
            .arg("--config")
            .arg(&self.audgate.config_path)
            .args(["--host", "shop.example.com", "--path", path, "--token", token])
            .env("NO_PROXY", "127.0.0.1,localhost")
            .output()
            .unwrap_or_else(|e| panic!("cannot run audgate explain: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_ne!(
            out.status.code(),
            Some(2),
            "audgate explain failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (stdout, out.status.code().unwrap_or(-1))
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.audgate.logs(), self.envoy.logs())
    }
}

/// The hint lines of `audgate explain`'s text output, joined.
fn hints(explain: &str) -> String {
    let mut out = Vec::new();
    let mut in_hint = false;
    for line in explain.lines() {
        if let Some(rest) = line.strip_prefix("hint:") {
            in_hint = true;
            out.push(rest.trim().to_owned());
        } else if in_hint && line.starts_with("            ") {
            out.push(line.trim().to_owned());
        } else {
            in_hint = false;
        }
    }
    out.join("\n")
}

/// The one backquoted command in `hint` that starts with `start`.
fn printed_command(hint: &str, start: &str) -> String {
    let found: Vec<&str> = hint
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|quoted| quoted.starts_with(start))
        .collect();
    assert_eq!(found.len(), 1, "expected one `{start}...` command in the hint:\n{hint}");
    found[0].to_owned()
}

/// Logs kcadm in with the admin's credentials into `home` (what the hint says to do first),
/// with the server URL the hint printed.
fn kcadm_login(kc: &Keycloak, home: &Path, hint: &str) {
    let login = printed_command(hint, "kcadm.sh config credentials");
    assert_eq!(
        login,
        format!(
            "kcadm.sh config credentials --server {} --realm master --user ADMIN",
            kc.url()
        ),
        "the hint's login line names this Keycloak"
    );
    let login = login.replace(
        "--user ADMIN",
        &format!("--user {ADMIN_USER} --password {}", kc.admin_password),
    );
    kc.shell(home, &login);
}

fn issuer_config(issuer: &str, extra: &str) -> String {
    format!("issuers:\n  keycloak:\n    issuer: {issuer}\n    discovery: true\n{extra}")
}

// ---------------------------------------------------------------------------------------------
// 1. The seed case, end to end
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_case_the_printed_kcadm_command_makes_the_next_token_pass() {
    let Some(kc) = keycloak() else { return };
    let realm = kc.create_realm("seed");
    let config = issuer_config(&realm.issuer(), "")
        + "routes:\n  - name: orders\n    match: { path_prefix: /api/orders }\n    client_ids: [orders-api]\ndefault: deny\n";
    let gate = Gate::start(&config).await;

    // Keycloak's default: aud is `account`, azp the caller
    let token = realm.user_token("web-shop").await;
    let claims = decode_payload(&token);
    assert_eq!(claims["aud"], "account", "{claims}");
    assert_eq!(claims["azp"], "web-shop", "{claims}");
    let reply = gate.get("/api/orders/7", &token).await;
    assert_deny(
        &reply,
        403,
        "audience_mismatch",
        Some(&token),
        "web-shop token on orders",
    );

    let (explained, code) = gate.explain("/api/orders/7", &token);
    // the walkthrough in docs/keycloak.md is this output (`--nocapture` shows it)
    eprintln!("--- the deny through Envoy ---\n{reply}\n--- audgate explain (exit {code}) ---\n{explained}");
    assert_eq!(code, 3, "explain exits 3 on a deny:\n{explained}");
    assert!(
        explained.starts_with("decision:   DENY 403 audience_mismatch"),
        "{explained}"
    );
    let hint = hints(&explained);
    for needed in [
        "`web-shop`",
        "Audience mapper",
        "*Included Client Audience* `orders-api`",
        "client scope",
    ] {
        assert!(hint.contains(needed), "the hint names {needed}:\n{explained}");
    }
    let command = printed_command(&hint, "kcadm.sh create");
    assert!(
        command.contains("-r seed") && command.contains("clientId=web-shop"),
        "the command is for realm seed and client web-shop: {command}"
    );

    // run it as printed, after `kcadm.sh config credentials`
    let home = kc.admin_home();
    kcadm_login(kc, home.path(), &hint);
    let created = kc.shell(home.path(), &command);
    eprintln!("--- the printed command, run ---\n$ {command}\n{created}");

    let token = realm.user_token("web-shop").await;
    let claims = decode_payload(&token);
    assert!(
        aud_has(&claims, "orders-api"),
        "the mapper put orders-api in aud: {claims}"
    );
    let reply = gate.get("/api/orders/7", &token).await;
    eprintln!(
        "--- the next token: aud {} ---\nHTTP {}, the upstream saw x-auth-client-id: {}",
        claims["aud"],
        reply.status,
        reply
            .try_json()
            .and_then(|_| reply.upstream("x-auth-client-id"))
            .unwrap_or_default()
    );
    assert_upstream(
        &reply,
        &[
            ("x-auth-client-id", Some("orders-api")),
            ("x-auth-issuer", Some(&realm.issuer())),
        ],
        &format!("the token after the printed command\n{}", gate.logs()),
    );
    let (explained, code) = gate.explain("/api/orders/7", &token);
    assert_eq!(code, 0, "{explained}");
}

// ---------------------------------------------------------------------------------------------
// 2. client_id_claims: [aud, azp]; the API's own client in azp; user roles
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azp_routes_take_the_plain_token_and_the_own_client_case_has_its_command() {
    let Some(kc) = keycloak() else { return };
    let realm = kc.create_realm("azp");
    let config = issuer_config(&realm.issuer(), "")
        + r#"routes:
  - name: account
    match: { path_prefix: /api/account }
    client_ids: [web-shop]
    client_id_claims: [aud, azp]
    required_roles: [shopper, "web-shop:customer"]
  - name: account-admin
    match: { path_prefix: /api/admin }
    client_ids: [web-shop]
    client_id_claims: [aud, azp]
    required_roles: ["web-shop:admin"]
  - name: bff
    match: { path_prefix: /api/bff }
    client_ids: [web-shop]
default: deny
"#;
    let gate = Gate::start(&config).await;
    let token = realm.user_token("web-shop").await;

    let reply = gate.get("/api/account/me", &token).await;
    assert_upstream(
        &reply,
        &[("x-auth-client-id", Some("web-shop"))],
        "[aud, azp] takes azp",
    );
    let reply = gate.get("/api/admin/users", &token).await;
    assert_deny(
        &reply,
        403,
        "insufficient_scope",
        Some(&token),
        "a client role alice lacks",
    );

    // the route that checks aud only: the client is in azp, not in aud
    let reply = gate.get("/api/bff/cart", &token).await;
    assert_deny(&reply, 403, "audience_mismatch", Some(&token), "bff checks aud only");
    let (explained, _) = gate.explain("/api/bff/cart", &token);
    let hint = hints(&explained);
    assert!(
        hint.contains("issued to client `web-shop` (azp) but its aud does not name it")
            && hint.contains("`client_id_claims: [aud, azp]` on route bff"),
        "the own-client hint, with both ways out:\n{explained}"
    );
    let command = printed_command(&hint, "kcadm.sh create");
    let home = kc.admin_home();
    kcadm_login(kc, home.path(), &hint);
    kc.shell(home.path(), &command);

    let token = realm.user_token("web-shop").await;
    let reply = gate.get("/api/bff/cart", &token).await;
    assert_upstream(
        &reply,
        &[("x-auth-client-id", Some("web-shop"))],
        &format!("after the printed command\n{}", gate.logs()),
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Refresh and ID tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_and_id_tokens_of_a_login_are_wrong_token_type() {
    let Some(kc) = keycloak() else { return };
    let realm = kc.create_realm("types");
    let config = issuer_config(&realm.issuer(), "")
        + "routes:\n  - name: shop\n    match: { path_prefix: /api }\n    client_ids: [web-shop]\n    client_id_claims: [aud, azp]\ndefault: deny\n";
    let gate = Gate::start(&config).await;
    let tokens = realm.login("web-shop", "openid profile").await;
    let id = tokens.id.expect("scope openid gives an id_token");

    let reply = gate.get("/api/cart", &tokens.access).await;
    assert_upstream(
        &reply,
        &[("x-auth-client-id", Some("web-shop"))],
        "the access token of the login",
    );
    for (token, typ, words) in [(&tokens.refresh, "Refresh", "refresh token"), (&id, "ID", "ID token")] {
        assert_eq!(decode_payload(token)["typ"], typ);
        let reply = gate.get("/api/cart", token).await;
        assert_deny(&reply, 401, "wrong_token_type", Some(token), typ);
        let (explained, code) = gate.explain("/api/cart", token);
        assert_eq!(code, 3, "{explained}");
        assert!(
            hints(&explained).contains(&format!("this is {} {words}", if typ == "ID" { "an" } else { "a" })),
            "{explained}"
        );
    }
    // Keycloak signs refresh tokens with the realm's HMAC key: still a token type, not an alg
    assert_eq!(jose_header(&tokens.refresh)["alg"], "HS512");
}

// ---------------------------------------------------------------------------------------------
// 4. The service account: client_id, realm and client roles
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_token_passes_on_its_client_id_with_real_roles() {
    let Some(kc) = keycloak() else { return };
    let realm = kc.create_realm("service");
    let config = issuer_config(&realm.issuer(), "")
        + r#"claim_headers:
  x-auth-client-id: $client_id
  x-auth-roles: realm_access.roles
  x-auth-orders-roles: resource_access.orders-api.roles
routes:
  - name: reports
    match: { path_prefix: /api/reports }
    client_ids: [reports]
    client_id_claims: [client_id]
    required_roles: [reporting, "orders-api:read"]
  - name: reports-write
    match: { path_prefix: /api/write }
    client_ids: [reports]
    client_id_claims: [client_id]
    required_roles: ["orders-api:write"]
  - name: shoppers
    match: { path_prefix: /api/shop }
    client_ids: [reports]
    client_id_claims: [azp]
    required_roles: [shopper]
  - name: user-only
    match: { path_prefix: /api/user }
    client_ids: [web-shop]
    client_id_claims: [aud, azp]
default: deny
"#;
    let gate = Gate::start(&config).await;
    let token = realm.service_token().await;
    let claims = decode_payload(&token);
    assert_eq!(
        claims["client_id"], "reports",
        "Keycloak 26 puts client_id in it: {claims}"
    );
    assert_eq!(claims["azp"], "reports", "{claims}");
    assert_eq!(claims["preferred_username"], "service-account-reports", "{claims}");

    let reply = gate.get("/api/reports/daily", &token).await;
    assert_upstream(
        &reply,
        &[
            ("x-auth-client-id", Some("reports")),
            ("x-auth-orders-roles", Some("read")),
        ],
        "the service account on its client_id, with realm and client role",
    );
    let roles = reply.upstream("x-auth-roles").unwrap_or_default();
    assert!(
        roles.split(',').any(|r| r == "reporting"),
        "realm roles upstream: {roles}"
    );

    let reply = gate.get("/api/write/x", &token).await;
    assert_deny(
        &reply,
        403,
        "insufficient_scope",
        Some(&token),
        "a client role it lacks",
    );
    let reply = gate.get("/api/shop/x", &token).await;
    assert_deny(&reply, 403, "insufficient_scope", Some(&token), "a realm role it lacks");
    let reply = gate.get("/api/user/x", &token).await;
    assert_deny(
        &reply,
        403,
        "audience_mismatch",
        Some(&token),
        "a route for another client",
    );
    let (explained, _) = gate.explain("/api/write/x", &token);
    assert!(hints(&explained).contains("resource_access"), "{explained}");
}

// ---------------------------------------------------------------------------------------------
// 5. The use: enc key, and doctor
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rsa_oaep_enc_key_is_skipped_and_doctor_says_so() {
    let Some(kc) = keycloak() else { return };
    let realm = kc.create_realm("enckey");
    let jwks = realm.jwks().await;
    let keys = jwks["keys"].as_array().expect("a JWKS has keys");
    let enc = keys
        .iter()
        .find(|k| k["use"] == "enc")
        .unwrap_or_else(|| panic!("Keycloak publishes an enc key: {jwks}"));
    assert_eq!(enc["alg"], "RSA-OAEP", "{jwks}");
    let enc_kid = enc["kid"].as_str().expect("the enc key has a kid");
    let sig_kid = keys
        .iter()
        .find(|k| k["use"] == "sig")
        .and_then(|k| k["kid"].as_str())
        .unwrap_or_else(|| panic!("a sig key: {jwks}"));

    let config = issuer_config(&realm.issuer(), "")
        + "routes:\n  - name: shop\n    match: { path_prefix: /api }\n    client_ids: [web-shop]\n    client_id_claims: [aud, azp]\ndefault: deny\n";
    let gate = Gate::start(&config).await;
    let token = realm.user_token("web-shop").await;
    assert_eq!(jose_header(&token)["kid"], sig_kid);
    let reply = gate.get("/api/cart", &token).await;
    assert_upstream(
        &reply,
        &[("x-auth-client-id", Some("web-shop"))],
        "signed with the sig key",
    );
    let metrics = gate.audgate.metrics().await;
    assert_eq!(
        metrics.get("audgate_jwks_keys", &[("issuer", "keycloak")]),
        Some(1.0),
        "one usable key of the two published:\n{}",
        metrics.describe("audgate_jwks_keys")
    );

    let out = Command::new(audgate_binary())
        .arg("doctor")
        .arg("--config")
        .arg(&gate.audgate.config_path)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .unwrap_or_else(|e| panic!("cannot run audgate doctor: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "doctor passes against the realm ({}):\n{text}",
        out.status
    );
    let enc_line = text.lines().find(|l| l.contains(enc_kid)).unwrap_or_default();
    assert!(
        enc_line.contains("skipped") && enc_line.contains("`use`") && enc_line.contains("enc"),
        "doctor names the skipped enc key:\n{text}"
    );
    assert!(
        text.contains("2 keys published") && text.contains("1 usable key"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Key rotation, the Keycloak way
// ---------------------------------------------------------------------------------------------

/// Lines of audgate's log that contain `what`.
fn count_lines(logs: &str, what: &str) -> usize {
    logs.lines().filter(|l| l.contains(what)).count()
}

const REFETCH: &str = "JWKS refetch for an unknown kid";
const REFRESHED: &str = "JWKS refreshed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_with_kcadm_one_refetch_then_the_removed_key_stops_at_the_next_refresh() {
    let Some(kc) = keycloak() else { return };
    let realm = kc.create_realm("rotation");
    // long enough that the new key is met by a request before a periodic refresh finds it
    let refresh = Duration::from_secs(30);
    let config = issuer_config(
        &realm.issuer(),
        &format!(
            "    refresh_interval: {}s\n    min_refresh_interval: 1s\n",
            refresh.as_secs()
        ),
    ) + "routes:\n  - name: shop\n    match: { path_prefix: /api }\n    client_ids: [web-shop]\n    client_id_claims: [aud, azp]\ndefault: deny\n";
    let gate = Gate::start(&config).await;
    let old_token = realm.user_token("web-shop").await;
    let old_kid = jose_header(&old_token)["kid"].as_str().unwrap_or_default().to_owned();
    let reply = gate.get("/api/cart", &old_token).await;
    assert_upstream(&reply, &[], "the token of the first key");

    // a new RSA key provider with a higher priority than the realm's `rsa-generated` (100)
    let refreshes_before_rotation = count_lines(&gate.audgate.logs(), REFRESHED);
    kc.kcadm(&[
        "create",
        "components",
        "-r",
        &realm.name,
        "-s",
        "name=rsa-rotated",
        "-s",
        "providerId=rsa-generated",
        "-s",
        "providerType=org.keycloak.keys.KeyProvider",
        "-s",
        &format!("parentId={}", realm.name), // the realm's id: realm_representation sets it
        "-s",
        "config.priority=[\"200\"]",
        "-s",
        "config.keySize=[\"2048\"]",
    ]);
    let new_token = realm.user_token("web-shop").await;
    let new_kid = jose_header(&new_token)["kid"].as_str().unwrap_or_default().to_owned();
    assert_ne!(new_kid, old_kid, "the new provider signs new tokens");

    let before = gate.audgate.logs();
    let reply = gate.get("/api/cart", &new_token).await;
    assert_upstream(
        &reply,
        &[],
        &format!("the new key's token after one refetch\n{}", gate.logs()),
    );
    for _ in 0..3 {
        assert_eq!(gate.get("/api/cart", &new_token).await.status, 200);
        assert_eq!(
            gate.get("/api/cart", &old_token).await.status,
            200,
            "the old key is still published"
        );
    }
    let after = gate.audgate.logs();
    let refetched = count_lines(&after, REFETCH) - count_lines(&before, REFETCH);
    if count_lines(&before, REFRESHED) == refreshes_before_rotation {
        assert_eq!(
            refetched, 1,
            "exactly one refetch for the new kid, none for the requests after it\n{after}"
        );
    } else {
        // a slow machine: the periodic refresh found the new key before any request needed it
        eprintln!("key rotation: a periodic refresh fetched the new key first ({refetched} refetches)");
        assert!(refetched <= 1, "at most one refetch for the new kid\n{after}");
    }

    // remove the old provider: the JWKS drops its key. Counted from here: until the next
    // periodic refresh, the cached set still has the old key and nothing is fetched.
    let refreshes = count_lines(&gate.audgate.logs(), REFRESHED);
    let refetches = count_lines(&gate.audgate.logs(), REFETCH);
    kc.kcadm(&[
        "delete",
        &format!(
            "components/{}",
            kc.kcadm(&[
                "get",
                "components",
                "-r",
                &realm.name,
                "-q",
                "name=rsa-generated",
                "--fields",
                "id",
                "--format",
                "csv",
                "--noquotes",
            ])
            .trim()
        ),
        "-r",
        &realm.name,
    ]);
    let published: Vec<String> = realm.jwks().await["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !published.contains(&old_kid) && published.contains(&new_kid),
        "{published:?}"
    );

    let deadline = Instant::now() + refresh * 3;
    loop {
        let reply = gate.get("/api/cart", &old_token).await;
        let logs = gate.audgate.logs();
        if reply.status != 200 {
            assert!(
                count_lines(&logs, REFRESHED) > refreshes,
                "the old token stopped only after a periodic refresh\n{reply}\n{logs}"
            );
            assert_deny(&reply, 401, "unknown_kid", Some(&old_token), "the removed key's token");
            break;
        }
        assert_eq!(
            count_lines(&logs, REFETCH),
            refetches,
            "no refetch while the old kid is known\n{logs}"
        );
        assert!(
            Instant::now() < deadline,
            "the old token still passes after {:?}\n{logs}",
            refresh * 3
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = gate.get("/api/cart", &new_token).await;
    assert_upstream(&reply, &[], "the new key's token after the refresh");
}

// ---------------------------------------------------------------------------------------------
// 7. iss follows the hostname
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_asked_for_at_localhost_is_unknown_issuer_until_the_hinted_alias() {
    let Some(kc) = keycloak() else { return };
    let realm = kc.create_realm("hostname");
    let routes = "routes:\n  - name: shop\n    match: { path_prefix: /api }\n    client_ids: [web-shop]\n    client_id_claims: [aud, azp]\ndefault: deny\n";
    let gate = Gate::start(&(issuer_config(&realm.issuer(), "") + routes)).await;

    // the same Keycloak, asked as `localhost` (no fixed --hostname): iss follows
    let localhost = format!("localhost:{}", kc.port);
    let token = realm
        .token_request(
            &[
                ("grant_type", "password"),
                ("client_id", "web-shop"),
                ("username", USER),
                ("password", USER_PASSWORD),
            ],
            Some(&localhost),
        )
        .await
        .access;
    let alias = format!("http://{localhost}/realms/{}", realm.name);
    assert_eq!(decode_payload(&token)["iss"], alias);
    let reply = gate.get("/api/cart", &token).await;
    assert_deny(&reply, 401, "unknown_issuer", Some(&token), "iss with localhost");
    let (explained, _) = gate.explain("/api/cart", &token);
    let hint = hints(&explained);
    let yaml = format!("issuer_aliases: [\"{alias}\"]");
    assert!(hint.contains(&yaml), "the hint names the alias {yaml}:\n{explained}");

    // follow the hint
    let aliased = issuer_config(&realm.issuer(), &format!("    {yaml}\n")) + routes;
    gate.audgate.replace_config(&aliased);
    gate.audgate
        .wait_metric(
            "audgate_config_reloads_total",
            &[("result", "ok")],
            Duration::from_secs(15),
            |n| n >= 1.0,
        )
        .await;
    let reply = gate.get("/api/cart", &token).await;
    assert_upstream(
        &reply,
        &[("x-auth-issuer", Some(&alias))],
        &format!("with the alias\n{}", gate.logs()),
    );
}

// ---------------------------------------------------------------------------------------------
// 8. at+jwt and lightweight access tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_jwt_passes_and_a_lightweight_token_gets_a_hint_that_fits() {
    let Some(kc) = keycloak() else { return };
    let realm = kc.create_realm("light");
    let config = issuer_config(&realm.issuer(), "")
        + r#"routes:
  - name: orders
    match: { path_prefix: /api/orders }
    client_ids: [orders-api]
  - name: light-roles
    match: { path_prefix: /api/light }
    client_ids: [web-shop-light]
    client_id_claims: [aud, azp]
    required_roles: [shopper]
  - name: shop
    match: { path_prefix: /api/shop }
    client_ids: [web-shop]
default: deny
"#;
    let gate = Gate::start(&config).await;

    // RFC 9068: header typ at+jwt; alice's client role puts web-shop in aud (Audience Resolve)
    let token = realm.user_token("web-shop-rfc9068").await;
    assert_eq!(jose_header(&token)["typ"], "at+jwt");
    let reply = gate.get("/api/shop/cart", &token).await;
    assert_upstream(
        &reply,
        &[("x-auth-client-id", Some("web-shop"))],
        "an at+jwt access token",
    );

    // lightweight: no aud, no sub, no roles
    let token = realm.user_token("web-shop-light").await;
    let claims = decode_payload(&token);
    assert!(
        claims.get("aud").is_none() && claims.get("sub").is_none() && claims.get("realm_access").is_none(),
        "a lightweight token: {claims}"
    );
    let reply = gate.get("/api/light/x", &token).await;
    assert_deny(&reply, 403, "insufficient_scope", Some(&token), "roles left out");
    let (explained, _) = gate.explain("/api/light/x", &token);
    assert!(
        hints(&explained).contains("lightweight access token") && hints(&explained).contains("realm_access"),
        "{explained}"
    );

    let reply = gate.get("/api/orders/1", &token).await;
    assert_deny(&reply, 403, "audience_mismatch", Some(&token), "lightweight on orders");
    let (explained, _) = gate.explain("/api/orders/1", &token);
    let hint = hints(&explained);
    assert!(
        hint.contains("lightweight access token") && hint.contains("client.use.lightweight.access.token.enabled"),
        "{explained}"
    );
    let command = printed_command(&hint, "kcadm.sh create");
    assert!(command.contains("lightweight.claim"), "{command}");
    let home = kc.admin_home();
    kcadm_login(kc, home.path(), &hint);
    kc.shell(home.path(), &command);

    let token = realm.user_token("web-shop-light").await;
    let claims = decode_payload(&token);
    assert!(
        aud_has(&claims, "orders-api"),
        "the mapper reaches lightweight tokens: {claims}"
    );
    let reply = gate.get("/api/orders/1", &token).await;
    assert_upstream(
        &reply,
        &[("x-auth-client-id", Some("orders-api"))],
        &format!("a lightweight token after the printed command\n{}", gate.logs()),
    );
}
