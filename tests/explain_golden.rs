//! Golden tests of `audgate explain`: for every reason code of SPEC.md and every hint of
//! src/authz/hint.rs, the text and the JSON output of the real binary, compared with
//! tests/golden/explain/CASE.txt and CASE.json, and the exit code (0 allow or dry-run deny,
//! 3 deny, 2 error).
//!
//! `UPDATE_GOLDEN=1 cargo test --test explain_golden` (re)writes the golden files; review the
//! diff before committing. Output is deterministic: a fixed `--at` time, fixed claims, and key
//! material that explain never prints (RSA-2048 and P-256 signatures have fixed lengths, so
//! token byte counts are stable). The temp dir's path is replaced by `<TMP>`. When explain
//! writes to stderr (the exit-2 cases), the golden file holds stdout, a `--- stderr ---` line
//! and stderr.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{TestKey, audgate_binary, hs256_jws, jwks, keycloak_claims, merge, unsigned_jws};
use serde_json::{Value, json};

/// The moment every case is explained at: 2025-06-15T15:06:40Z.
const AT: i64 = 1_750_000_000;
const SHOP: &str = "https://sso.example.com/realms/shop";
const PARTNER: &str = "https://login.partner.example";
const LEGACY: &str = "https://old-sso.example.com/auth/realms/legacy";

const CONFIG: &str = r#"
issuers:
  keycloak:
    issuer: https://sso.example.com/realms/shop
    jwks_file: <TMP>/keycloak.json
  partner:
    issuer: https://login.partner.example
    jwks_file: <TMP>/partner.json
    algorithms: [ES256]
    leeway: 0s
  legacy:                         # its key source cannot be loaded
    issuer: https://old-sso.example.com/auth/realms/legacy
    jwks_file: <TMP>/missing.json
routes:
  - name: health
    match: { path_prefix: /healthz }
    allow_anonymous: true
  - name: orders
    match: { hosts: [orders.example.com], path_prefix: /api/orders, methods: [GET, POST] }
    issuers: [keycloak]
    client_ids: [orders-api]
    required_scopes: [orders:read]
  - name: admin
    match: { hosts: ["*.admin.example.com"] }
    issuers: [keycloak]
    client_ids: [admin-ui]
    client_id_claims: [aud, azp]
    required_roles: [admin, "admin-ui:manage"]
  - name: reports
    match: { path_prefix: /reports }
    client_ids: [reports-api]
    mode: dry_run
  - name: partner
    match: { hosts: [partner.example.com] }
    issuers: [partner, legacy]
    client_ids: [partner-api]
default: deny
"#;

/// The keys of one run: published ones and a stranger that reuses a published kid.
struct Keys {
    rsa: TestKey,
    ec: TestKey,
    partner: TestKey,
    legacy: TestKey,
    stranger: TestKey,
}

/// A Keycloak access token payload at [`AT`] (issued a minute ago, valid four more minutes).
fn kc(iss: &str, azp: &str, patch: Value) -> Value {
    let fixed = json!({
        "exp": AT + 240, "iat": AT - 60, "auth_time": AT - 60,
        "jti": "0b4a4f7e-5c36-4d1e-a0c2-6f1f8f3d2a11", "sid": "5f1c9e2a-7d43-4b8e-a1f6-93c0d4e5b7a2",
        "sub": "8d7c3f0e-2b1a-4c5d-9e8f-7a6b5c4d3e2f",
    });
    merge(merge(keycloak_claims(iss, azp), fixed), patch)
}

/// One `audgate explain` invocation: `args` split at spaces; `token` goes to `--token`, or to
/// stdin (as `Bearer TOKEN`) when `stdin`.
struct Case {
    name: &'static str,
    exit: i32,
    args: &'static str,
    token: Option<String>,
    stdin: bool,
}

fn case(name: &'static str, exit: i32, args: &'static str, token: Option<String>) -> Case {
    Case {
        name,
        exit,
        args,
        token,
        stdin: false,
    }
}

const ORDERS: &str = "--host orders.example.com --path /api/orders/42";
const ADMIN: &str = "--host console.admin.example.com --path /users";
const FEED: &str = "--host partner.example.com --path /v1/feed";
const REPORTS: &str = "--host any.example.com --path /reports/q3";

#[rustfmt::skip]
fn cases(k: &Keys) -> Vec<Case> {
    let good = || kc(SHOP, "orders-web", json!({"aud": ["orders-api", "account"], "scope": "openid orders:read"}));
    let orders = |patch: Value| Some(k.rsa.mint(merge(good(), patch)));
    let admin = |patch: Value| Some(k.rsa.mint(kc(SHOP, "admin-ui", patch)));
    let partner = |key: &TestKey, patch: Value| {
        let claims = json!({"iss": PARTNER, "sub": "svc-feed", "aud": "partner-api", "exp": AT + 600, "iat": AT - 5});
        Some(key.mint(merge(claims, patch)))
    };
    let legacy = || Some(k.legacy.mint(kc(LEGACY, "partner-web", json!({"aud": ["partner-api", "account"]}))));
    // a Keycloak lightweight access token: no sub, aud or roles
    let lightweight = |azp: &str| {
        let claims = json!({"exp": AT + 240, "iat": AT - 60, "jti": "onltro:b0097a25-ed68-e048-2caf-82865ede5f65", "iss": SHOP,
            "typ": "Bearer", "azp": azp, "sid": "PNrbOvimYdwU0IcEK6pfCRk5", "scope": "openid orders:read"});
        Some(k.rsa.mint(claims))
    };
    let header = |alg: &str, kid: Option<&str>, typ: &str| match kid {
        Some(kid) => json!({"alg": alg, "typ": typ, "kid": kid}),
        None => json!({"alg": alg, "typ": typ}),
    };
    vec![
        case("allowed", 0, ORDERS, orders(json!({}))),
        Case { stdin: true, ..case("allowed_stdin_post", 0, "--host orders.example.com:8443 --path /api/orders?x=1 --method post", orders(json!({}))) },
        case("allowed_route_by_name", 0, "--route orders", orders(json!({}))),
        case("allowed_ec_key_at_jwt", 0, ORDERS, Some(k.ec.sign(&header("ES256", Some("ec-1"), "at+jwt"), &good()))),
        case("allowed_azp_roles", 0, ADMIN, admin(json!({"realm_access": {"roles": ["admin"]}, "resource_access": {"admin-ui": {"roles": ["manage"]}}}))),
        case("anonymous", 0, "--host orders.example.com --path /healthz", None),
        case("anonymous_with_token", 0, "--host orders.example.com --path /healthz", orders(json!({}))),
        case("missing_token", 3, ORDERS, None),
        case("malformed_token", 3, ORDERS, Some("not-a-jwt".to_owned())),
        case("malformed_token_no_exp", 3, ORDERS, orders(json!({"exp": null}))),
        case("wrong_token_type_id", 3, ORDERS, orders(json!({"typ": "ID", "aud": "orders-web"}))),
        case("wrong_token_type_refresh", 3, ORDERS, orders(json!({"typ": "Refresh", "aud": SHOP}))),
        // what Keycloak issues as refresh_token: HS512 with the realm's HMAC key
        case("wrong_token_type_refresh_hs512", 3, ORDERS, Some(hs256_jws(b"realm-hmac-key", &header("HS512", Some("hmac-1"), "JWT"), &merge(good(), json!({"typ": "Refresh", "aud": SHOP}))))),
        case("wrong_token_type_header", 3, ORDERS, Some(k.rsa.sign(&header("RS256", Some("rsa-1"), "JOSE"), &good()))),
        case("unsupported_alg_hs256", 3, ORDERS, Some(hs256_jws(&k.rsa.public_key_bytes(), &header("HS256", Some("rsa-1"), "JWT"), &good()))),
        case("unsupported_alg_none", 3, ORDERS, Some(unsigned_jws(&header("none", None, "JWT"), &good()))),
        case("unsupported_alg_not_allowed", 3, FEED, partner(&k.rsa, json!({}))),
        case("unknown_issuer", 3, ORDERS, orders(json!({"iss": "https://evil.example.net/realms/other"}))),
        case("unknown_issuer_host", 3, ORDERS, orders(json!({"iss": "https://sso.internal/realms/shop"}))),
        case("unknown_issuer_scheme_port", 3, ORDERS, orders(json!({"iss": "http://sso.example.com:8080/realms/shop"}))),
        case("unknown_issuer_trailing_slash", 3, ORDERS, orders(json!({"iss": "https://sso.example.com/realms/shop/"}))),
        case("unknown_issuer_auth_prefix", 3, ORDERS, orders(json!({"iss": "https://sso.example.com/auth/realms/shop"}))),
        case("unknown_issuer_no_iss", 3, ORDERS, orders(json!({"iss": null}))),
        case("unknown_issuer_route", 3, ORDERS, partner(&k.partner, json!({}))),
        case("unknown_kid", 3, ORDERS, Some(k.rsa.sign(&header("RS256", Some("rotated-2024"), "JWT"), &good()))),
        case("bad_signature", 3, ORDERS, Some(k.stranger.mint(good()))),
        case("bad_signature_no_kid", 3, ORDERS, Some(k.stranger.sign(&header("RS256", None, "JWT"), &good()))),
        case("expired", 3, ORDERS, orders(json!({"exp": AT - 3725, "iat": AT - 4025}))),
        case("not_yet_valid_nbf", 3, ORDERS, orders(json!({"nbf": AT + 600}))),
        case("not_yet_valid_iat", 3, FEED, partner(&k.partner, json!({"iat": AT + 90}))),
        case("audience_mismatch_azp", 3, ORDERS, orders(json!({"aud": "account", "azp": "orders-api"}))),
        case("audience_mismatch_account", 3, ORDERS, orders(json!({"aud": "account"}))),
        case("audience_mismatch_other", 3, ORDERS, orders(json!({"aud": ["billing-api"], "azp": "billing-web"}))),
        case("audience_mismatch_lightweight", 3, ORDERS, lightweight("orders-web")),
        case("insufficient_scope_lightweight", 3, ADMIN, lightweight("admin-ui")),
        case("insufficient_scope", 3, ORDERS, orders(json!({"scope": "openid profile email"}))),
        case("insufficient_scope_roles", 3, ADMIN, admin(json!({}))),
        case("insufficient_scope_client_role", 3, ADMIN, admin(json!({"realm_access": {"roles": ["admin"]}}))),
        case("no_route", 3, "--host orders.example.com --path /api/orders/42 --method DELETE", orders(json!({}))),
        case("no_route_unknown_name", 3, "--route order", orders(json!({}))),
        case("dry_run_deny", 0, REPORTS, orders(json!({}))),
        case("dry_run_allowed", 0, REPORTS, orders(json!({"aud": "reports-api"}))),
        case("no_verify", 0, "--host partner.example.com --path /v1/feed --no-verify", legacy()),
        case("no_verify_deny", 3, "--host orders.example.com --path /api/orders/42 --no-verify", Some(k.stranger.mint(merge(good(), json!({"aud": "account"}))))),
        // explain loads the token's issuer's keys when the decision needs them: when the
        // config's source cannot be loaded it exits 2 with the error on stderr and nothing on
        // stdout (also with --format json); the keys_unavailable reason itself never reaches
        // explain's output (tests/explain_remote.rs: decisions that need no keys).
        case("keys_unavailable", 2, FEED, legacy()),
        case("jwks_file", 0, "--host partner.example.com --path /v1/feed --jwks <TMP>/legacy.json", legacy()),
        case("jwks_file_missing", 2, "--host partner.example.com --path /v1/feed --jwks <TMP>/nope.json", legacy()),
    ]
}

/// Runs explain for `case` in `format`; stdout (plus stderr when there is any) with the temp
/// dir replaced by `<TMP>`, and the exit code.
fn run(dir: &Path, case: &Case, format: &str) -> (String, i32) {
    let tmp = dir.display().to_string();
    let config = dir.join("audgate.yaml");
    let mut command = Command::new(audgate_binary());
    command
        .args(["explain", "--config"])
        .arg(&config)
        .args(case.args.split(' ').map(|a| a.replace("<TMP>", &tmp)))
        .args(["--at", &AT.to_string(), "--format", format])
        .env_remove("RUST_LOG")
        .env_remove("AUDGATE_CONFIG")
        .env("NO_COLOR", "1")
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let (Some(token), false) = (&case.token, case.stdin) {
        command.args(["--token", token]);
    }
    let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot run audgate: {e}"));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    if let (Some(token), true) = (&case.token, case.stdin) {
        writeln!(stdin, "Bearer {token}").expect("writing the token to stdin");
    }
    drop(stdin);
    let output = child.wait_with_output().expect("waiting for audgate");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.stderr.is_empty() {
        text.push_str("--- stderr ---\n");
        text.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    (text.replace(&tmp, "<TMP>"), output.status.code().unwrap_or(-1))
}

/// `None` when equal, else expected vs actual from the first differing line on.
fn diff(expected: &str, actual: &str) -> Option<String> {
    if expected == actual {
        return None;
    }
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let line = e.iter().zip(&a).take_while(|(x, y)| x == y).count();
    let show = |v: &[&str]| {
        v.get(line)
            .map_or_else(|| "(end of output)".to_owned(), |l| format!("{l:?}"))
    };
    Some(format!(
        "first difference at line {}:\n  expected: {}\n  actual:   {}\n--- expected ---\n{expected}--- actual ---\n{actual}",
        line + 1,
        show(&e),
        show(&a)
    ))
}

#[test]
fn explain_output_matches_the_golden_files() {
    let dir = tempfile::Builder::new()
        .prefix("audgate-explain-")
        .tempdir()
        .expect("temp dir");
    let k = Keys {
        rsa: TestKey::rsa("rsa-1"),
        ec: TestKey::ec("ec-1"),
        partner: TestKey::ec("partner-2025"),
        legacy: TestKey::rsa("legacy-1"),
        stranger: TestKey::rsa("rsa-1"),
    };
    let tmp = dir.path().display().to_string();
    let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).expect("writing a test file");
    write("audgate.yaml", CONFIG.replace("<TMP>", &tmp));
    write("keycloak.json", jwks(&[&k.rsa, &k.ec]).to_string());
    write("partner.json", jwks(&[&k.partner]).to_string());
    write("legacy.json", jwks(&[&k.legacy]).to_string());

    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/explain");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    if update {
        std::fs::create_dir_all(&golden).expect("creating the golden dir");
    }
    let cases = cases(&k);
    let mut failures = Vec::new();
    let mut expected_files = Vec::new();
    for case in &cases {
        for (format, ext) in [("text", "txt"), ("json", "json")] {
            let file = format!("{}.{ext}", case.name);
            let (actual, exit) = run(dir.path(), case, format);
            if exit != case.exit {
                failures.push(format!("{file}: exit {exit}, expected {}\n{actual}", case.exit));
            }
            if format == "json"
                && case.exit != 2
                && let Err(e) = serde_json::from_str::<Value>(&actual)
            {
                failures.push(format!("{file}: not JSON ({e})\n{actual}"));
            }
            let path = golden.join(&file);
            expected_files.push(file.clone());
            if update {
                std::fs::write(&path, &actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(expected) => failures.extend(diff(&expected, &actual).map(|d| format!("{file}: {d}"))),
                Err(e) => failures.push(format!(
                    "{file}: cannot read {} ({e}); run UPDATE_GOLDEN=1 cargo test --test explain_golden\n{actual}",
                    path.display()
                )),
            }
        }
    }
    let stale: Vec<String> = std::fs::read_dir(&golden)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| !expected_files.contains(name))
                .collect()
        })
        .unwrap_or_default();
    if !stale.is_empty() {
        failures.push(format!(
            "golden files without a case (delete them): {}",
            stale.join(", ")
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {} explain outputs differ (UPDATE_GOLDEN=1 cargo test --test explain_golden rewrites the golden files):\n\n{}",
        failures.len(),
        2 * cases.len(),
        failures.join("\n\n")
    );
}
