//! `audgate test`: policy tests for a config, like `opa test`. A case names a request and a
//! token — a raw one, or the claims of one that is signed here with an ephemeral key standing
//! in for the issuers' keys — and the decision, reason and claim headers it expects. One line
//! a case, then `N passed, M failed`.
//!
//! ```yaml
//! cases:
//!   - name: orders with an audience mapper
//!     request: { method: GET, host: orders.example.com, path: /api/orders/1 }
//!     claims: { aud: orders-api, azp: web-shop, scope: "openid orders:read" }
//!     expect: { decision: allow, reason: allowed, headers: { x-auth-client-id: orders-api } }
//!   - name: an expired token
//!     request: { route: orders }
//!     claims: { aud: orders-api, exp: now-5m }
//!     expect: { decision: deny, reason: expired }
//! ```
//!
//! Claims default to `iss` = the first configured issuer, `sub: audgate-test`, `iat: now`,
//! `exp: now+5m`; `exp`, `nbf` and `iat` accept `now`, `now+DURATION`, `now-DURATION`; a
//! `null` removes a claim. `token_header` overrides header fields (`alg`, `kid`, `typ`; an
//! `alg` that cannot sign, like `none` or `HS256`, gives a token with a dummy signature).

mod signer;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::{Map, Value};
use serde_saphyr::Spanned;

use crate::authz::{self, Alg, CheckInput, Headers, Policy, Reason, hint, jwt};
use crate::config::{self, Diagnostic};
use signer::Signer;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    cases: Vec<Spanned<Case>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    request: RequestSpec,
    /// A raw token.
    token: Option<String>,
    /// Or the claims of a token signed at test time.
    claims: Option<Map<String, Value>>,
    token_header: Option<Map<String, Value>>,
    expect: Spanned<Expect>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestSpec {
    method: Option<String>,
    host: Option<String>,
    path: Option<String>,
    #[serde(default)]
    headers: IndexMap<String, String>,
    /// Pick a route by name, like Envoy's `audgate.route` context extension.
    route: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    decision: Option<String>,
    reason: Option<String>,
    status: Option<u16>,
    /// Claim headers set upstream; `null`: the header must not be set (it is removed).
    #[serde(default)]
    headers: IndexMap<String, Option<String>>,
}

const DECISIONS: [&str; 4] = ["allow", "deny", "dry_run_deny", "error"];

/// A case ready to run: its request with the token in place.
struct Prepared {
    name: String,
    line: u64,
    request: RequestSpec,
    token: Option<String>,
    expect: Expect,
}

/// The outcome of a run.
pub struct Report {
    pub text: String,
    pub passed: usize,
    pub failed: usize,
}

/// Parse every cases file; problems come back with file:line:column.
fn load_cases(
    policy: &Policy,
    files: &[&Path],
    signer: &mut Signer,
    now: i64,
) -> Result<Vec<(String, Prepared)>, Vec<String>> {
    let mut errors = Vec::new();
    let mut prepared = Vec::new();
    for file in files {
        let located = |d: &Diagnostic| config::located(file, d, "error");
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{}: {e}", file.display()));
                continue;
            }
        };
        let parsed: CasesFile = match serde_saphyr::from_str(&text) {
            Ok(p) => p,
            Err(e) => {
                errors.push(located(&config::yaml_diagnostic(&e)));
                continue;
            }
        };
        for case in parsed.cases {
            let at = |message: String| Diagnostic {
                line: case.referenced.line(),
                column: case.referenced.column(),
                message,
            };
            let Spanned { value: case, .. } = case;
            match prepare(policy, case, signer, now) {
                Ok(mut p) => {
                    p.line = at(String::new()).line;
                    prepared.push((file.display().to_string(), p));
                }
                Err(message) => errors.push(located(&at(message))),
            }
        }
    }
    if errors.is_empty() { Ok(prepared) } else { Err(errors) }
}

fn prepare(policy: &Policy, case: Case, signer: &mut Signer, now: i64) -> Result<Prepared, String> {
    let name = case.name;
    let expect = case.expect.value;
    if let Some(d) = &expect.decision
        && !DECISIONS.contains(&d.as_str())
    {
        return Err(format!(
            "case `{name}`: decision `{d}` is not one of {}",
            DECISIONS.join(", ")
        ));
    }
    if let Some(r) = &expect.reason
        && !Reason::ALL.iter().any(|known| known.code() == r)
    {
        return Err(format!("case `{name}`: `{r}` is not a reason code"));
    }
    let token = match (case.token, case.claims) {
        (Some(_), Some(_)) => return Err(format!("case `{name}`: give `token` or `claims`, not both")),
        (Some(raw), None) => Some(raw),
        (None, Some(claims)) => {
            Some(mint(policy, claims, case.token_header, signer, now).map_err(|e| format!("case `{name}`: {e}"))?)
        }
        (None, None) => None,
    };
    Ok(Prepared {
        name,
        line: 0,
        request: case.request,
        token,
        expect,
    })
}

/// `now`, `now+5m`, `now-30s` -> Unix seconds.
fn relative_time(text: &str, now: i64) -> Option<i64> {
    let rest = text.trim().strip_prefix("now")?.trim();
    if rest.is_empty() {
        return Some(now);
    }
    let (sign, span) = match rest.split_at(1) {
        ("+", span) => (1, span),
        ("-", span) => (-1, span),
        _ => return None,
    };
    let secs = i64::try_from(humantime::parse_duration(span.trim()).ok()?.as_secs()).ok()?;
    now.checked_add(sign * secs)
}

fn mint(
    policy: &Policy,
    mut claims: Map<String, Value>,
    header: Option<Map<String, Value>>,
    signer: &mut Signer,
    now: i64,
) -> Result<String, String> {
    let default_iss = policy.issuers.first().map(|i| i.issuer.clone()).unwrap_or_default();
    let defaults = [
        ("iss", Value::from(default_iss)),
        ("sub", Value::from("audgate-test")),
        ("iat", Value::from(now)),
        ("exp", Value::from(now + 300)),
    ];
    for (k, v) in defaults {
        claims.entry(k).or_insert(v);
    }
    for name in ["exp", "nbf", "iat"] {
        if let Some(t) = claims
            .get(name)
            .and_then(Value::as_str)
            .and_then(|s| relative_time(s, now))
        {
            claims.insert(name.to_owned(), Value::from(t));
        }
    }
    claims.retain(|_, v| !v.is_null());
    let issuer_algs = claims
        .get("iss")
        .and_then(Value::as_str)
        .and_then(|iss| policy.issuer_by_iss(iss))
        .map(|id| policy.issuers[id].algorithms.clone())
        .unwrap_or_else(|| vec![Alg::RS256]);
    let alg = issuer_algs
        .into_iter()
        .find(|a| signer::can_sign(*a))
        .unwrap_or(Alg::RS256);
    let mut head = Map::new();
    head.insert("alg".into(), alg.name().into());
    head.insert("typ".into(), "JWT".into());
    if let Some(kid) = Signer::kid(alg) {
        head.insert("kid".into(), kid.into());
    }
    for (k, v) in header.unwrap_or_default() {
        head.insert(k, v);
    }
    head.retain(|_, v| !v.is_null());
    let (header, claims) = (Value::Object(head), Value::Object(claims));
    match header.get("alg").and_then(Value::as_str).and_then(Alg::from_name) {
        Some(alg) if signer::can_sign(alg) => signer.sign(alg, &header, &claims),
        // `none`, HS*, ES512...: a token with a signature that cannot verify
        _ => {
            use base64::Engine as _;
            let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
            let signature = if header["alg"] == "none" { "" } else { "c2lnbmF0dXJl" };
            Ok(format!("{}.{}.{signature}", b64(&header), b64(&claims)))
        }
    }
}

/// Run the cases of `files` against `policy` at time `now`.
pub fn run(policy: &Policy, files: &[&Path], now: i64) -> Result<Report, Vec<String>> {
    let mut signer = Signer::default();
    let cases = load_cases(policy, files, &mut signer, now)?;
    let keys = Arc::new(signer.key_set());
    let mut report = Report {
        text: String::new(),
        passed: 0,
        failed: 0,
    };
    for (file, case) in &cases {
        let problems = run_case(policy, case, &keys, now);
        if problems.is_empty() {
            report.passed += 1;
            let _ = writeln!(report.text, "ok    {}", case.name);
        } else {
            report.failed += 1;
            let _ = writeln!(report.text, "FAIL  {}  ({file}:{})", case.name, case.line);
            for p in problems {
                let _ = writeln!(report.text, "        {p}");
            }
        }
    }
    let _ = writeln!(report.text, "{} passed, {} failed", report.passed, report.failed);
    Ok(report)
}

/// What differs from the expectation (empty: the case passed).
fn run_case(policy: &Policy, case: &Prepared, keys: &Arc<crate::jwks::KeySet>, now: i64) -> Vec<String> {
    let mut headers: HashMap<String, String> = case
        .request
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    if let Some(t) = &case.token {
        headers
            .entry("authorization".to_owned())
            .or_insert_with(|| format!("Bearer {t}"));
    }
    let input = CheckInput {
        method: case.request.method.as_deref().unwrap_or("GET"),
        host: case.request.host.as_deref().unwrap_or(""),
        path: case.request.path.as_deref().unwrap_or("/"),
        headers: Headers::Map(&headers),
        route_hint: case.request.route.as_deref(),
    };
    let decision = authz::evaluate(policy, &input, |_| Some(Arc::clone(keys)), now);
    let response = authz::respond(policy, &decision);
    let mut problems = Vec::new();
    let e = &case.expect;
    let got = format!(
        "{} {} {} on route {}",
        decision.verdict.label(),
        response.status,
        decision.reason,
        decision.route_name()
    );
    if e.decision.as_deref().is_some_and(|d| d != decision.verdict.label())
        || e.reason.as_deref().is_some_and(|r| r != decision.reason.code())
        || e.status.is_some_and(|s| s != response.status)
    {
        let want = [
            e.decision.as_deref(),
            e.status.map(|s| s.to_string()).as_deref(),
            e.reason.as_deref(),
        ]
        .iter()
        .flatten()
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
        problems.push(format!("expected {want}, got {got}"));
        if !decision.description.is_empty() {
            problems.push(format!("why: {}", decision.description));
        }
        let token = case.token.as_deref();
        for h in hint::hints(policy, &decision, token, Some(keys)) {
            problems.push(format!("hint: {h}"));
        }
    }
    for (name, want) in &e.headers {
        let name = name.to_ascii_lowercase();
        let set = response
            .upstream_headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_ref());
        if set != want.as_deref() {
            let show = |v: Option<&str>| v.map_or("not set".to_owned(), |v| format!("`{}`", jwt::printable(v)));
            problems.push(format!(
                "header {name}: expected {}, got {}",
                show(want.as_deref()),
                show(set)
            ));
        }
    }
    problems
}
