//! `audgate explain`: the decision for one request as a trace a person reads top to bottom —
//! the route and why, where the token came from, its header, issuer, key, signature, times,
//! the client-id check, scopes and roles, the claims that mattered and, on deny, what to
//! change. The decision itself always comes from the core's `evaluate`; this module only
//! reads the same inputs again to show them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::authz::route::ClientIdClaim;
use crate::authz::{self, CheckInput, Decision, Headers, IssuerId, Policy, Reason, Selected, hint, jwt, token};
use crate::jwks::KeySet;

/// The request to explain.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub host: String,
    pub path: String,
    /// A route picked by name, as Envoy's `audgate.route` context extension would.
    pub route: Option<String>,
    pub token: Option<String>,
}

/// Whether signatures are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signatures {
    Verify,
    /// `--no-verify`: every check but the signature.
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// allow, deny, dry_run_deny or error.
    pub decision: &'static str,
    pub status: u16,
    pub reason: &'static str,
    pub description: String,
    pub route: RouteStep,
    pub token: Option<TokenStep>,
    pub issuer: Option<IssuerStep>,
    pub key: Option<String>,
    pub signature: String,
    pub signature_checked: bool,
    pub time: Option<String>,
    pub client_id: Option<String>,
    pub scopes: Option<String>,
    pub roles: Option<String>,
    /// Each `required_claims` condition of the route and whether the token meets it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub required_claims: Vec<String>,
    /// The claims that mattered, as the token carries them.
    pub claims: BTreeMap<String, Value>,
    pub hints: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteStep {
    pub name: Option<String>,
    pub how: String,
    /// Routes tried before it (or all of them when none matched), with the part that missed.
    pub tried: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IssuerStep {
    /// The configured issuer `iss` names, if any.
    pub name: Option<String>,
    /// The tenant of a templated issuer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub iss: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenStep {
    pub source: String,
    pub bytes: usize,
    pub alg: Option<String>,
    pub kid: Option<String>,
    pub typ: Option<String>,
}

impl Explanation {
    /// `audgate explain`'s exit code: 0 allow (a dry-run deny included), 3 deny, 2 error.
    pub fn exit_code(&self) -> u8 {
        match self.decision {
            "allow" | "dry_run_deny" => 0,
            "deny" => 3,
            _ => 2,
        }
    }
}

/// The claims shown: the registered ones and where Keycloak keeps scopes and roles.
const SHOWN_CLAIMS: [&str; 14] = [
    "iss",
    "sub",
    "aud",
    "azp",
    "client_id",
    "typ",
    "exp",
    "nbf",
    "iat",
    "scope",
    "scp",
    "realm_access",
    "resource_access",
    "preferred_username",
];

/// Explain the decision for `request` at time `now` (Unix seconds).
pub fn explain(
    policy: &Policy,
    request: &Request,
    keys: impl Fn(IssuerId) -> Option<Arc<KeySet>>,
    signatures: Signatures,
    now: i64,
) -> Explanation {
    let mut headers = HashMap::new();
    if let Some(t) = &request.token {
        headers.insert("authorization".to_owned(), format!("Bearer {t}"));
    }
    let input = CheckInput {
        method: &request.method,
        host: &request.host,
        path: &request.path,
        headers: Headers::Map(&headers),
        route_hint: request.route.as_deref(),
    };
    let decision = match signatures {
        Signatures::Verify => authz::evaluate(policy, &input, &keys, now),
        Signatures::Skip => authz::evaluate_without_signature(policy, &input, now),
    };
    let response = authz::respond(policy, &decision);
    let located = token::locate(&policy.token, &input).ok();
    let raw = located.as_ref().map(|(t, _)| t.as_ref());
    let parsed = raw.and_then(|t| jwt::parse(t).ok());
    // a token the parser refused is still shown as sent
    let (header, payload) = raw.map(jwt::peek).unwrap_or_default();
    let text = |map: &Option<Map<String, Value>>, name: &str| {
        map.as_ref()
            .and_then(|m| m.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let iss = text(&payload, "iss");
    let issuer_id = decision
        .issuer
        .or_else(|| iss.as_deref().and_then(|i| policy.resolve_iss(i)).map(|(id, _)| id));
    let issuer_keys = issuer_id.and_then(&keys);
    let claims = parsed.as_ref().map(|p| &p.claims);
    let checked = signatures == Signatures::Verify;
    Explanation {
        decision: decision.verdict.label(),
        status: response.status,
        reason: decision.reason.code(),
        description: decision.description.clone(),
        route: route_step(policy, &input, &decision),
        token: located.as_ref().map(|(t, source)| TokenStep {
            source: source.to_string(),
            bytes: t.len(),
            alg: header.as_ref().and_then(|h| h.get("alg")).map(hint::show),
            kid: header.as_ref().and_then(|h| h.get("kid")).map(hint::show),
            typ: header.as_ref().and_then(|h| h.get("typ")).map(hint::show),
        }),
        issuer: iss.map(|iss| IssuerStep {
            name: issuer_id.map(|id| policy.issuers[id].name.clone()),
            tenant: policy.resolve_iss(&iss).and_then(|(_, t)| t.map(jwt::readable)),
            iss: jwt::readable(&iss),
        }),
        key: key_step(
            &decision,
            text(&header, "kid").as_deref(),
            issuer_keys.as_deref(),
            checked,
        ),
        signature: signature_step(&decision, checked),
        signature_checked: checked,
        time: claims.map(|c| time_step(c, issuer_id.map(|i| policy.issuers[i].leeway), now)),
        client_id: claims.and_then(|c| client_id_step(&decision, c)),
        scopes: decision
            .route
            .filter(|r| !r.required_scopes.is_empty() && claims.is_some())
            .map(|r| {
                let present = claims.map(|c| c.str("scope")).unwrap_or_default();
                format!(
                    "needs {}; the token's scope is \"{}\"",
                    r.required_scopes.join(" "),
                    jwt::readable(present)
                )
            }),
        roles: decision
            .route
            .filter(|r| !r.required_roles.is_empty() && claims.is_some())
            .map(|r| {
                let roles: Vec<String> = r.required_roles.iter().map(ToString::to_string).collect();
                format!(
                    "needs {} (realm roles in realm_access.roles, CLIENT:ROLE in resource_access)",
                    roles.join(", ")
                )
            }),
        required_claims: claims
            .zip(decision.route)
            .map(|(c, r)| conditions_step(r, c, decision.reason == Reason::ClaimMismatch))
            .unwrap_or_default(),
        claims: payload.map_or_else(BTreeMap::new, |p| {
            let mut shown: BTreeMap<String, Value> = SHOWN_CLAIMS
                .iter()
                .filter_map(|&name| p.get(name).map(|v| (name.to_owned(), v.clone())))
                .collect();
            // the claims the route's conditions read matter too
            for c in decision.route.iter().flat_map(|r| &r.required_claims) {
                if let Some(v) = c.lookup(&p) {
                    shown.insert(c.claim.clone(), v.clone());
                }
            }
            shown
        }),
        hints: hint::hints(policy, &decision, raw, issuer_keys.as_deref()),
    }
}

fn route_step(policy: &Policy, input: &CheckInput<'_>, decision: &Decision<'_>) -> RouteStep {
    if let Some(name) = input.route_hint {
        let how = match policy.routes.by_name(name) {
            Some(_) => "picked by name (audgate.route)".to_owned(),
            None => format!("no route is named `{}`", jwt::readable(name)),
        };
        return RouteStep {
            name: decision.route.map(|r| r.name.clone()),
            how,
            tried: Vec::new(),
        };
    }
    let routes = policy.routes.routes();
    let matched = match policy.routes.select(input) {
        Selected::Route(r) => Some(r),
        Selected::NoRoute { .. } => None,
    };
    let target = input.target();
    let tried = routes
        .iter()
        .take_while(|r| matched.is_none_or(|m| !std::ptr::eq(*r, m)))
        .map(|r| {
            format!(
                "{} (its {} does not match)",
                r.name,
                r.matcher.mismatch(&target).unwrap_or("match")
            )
        })
        .collect();
    // the request as matched; the path as sent too when normalizing changed it
    let mut request = format!(
        "{} {}{}",
        jwt::readable(input.method),
        jwt::readable(target.host),
        jwt::readable(&target.path)
    );
    if target.path != input.path_only() {
        request.push_str(&format!(" (sent as {})", jwt::readable(input.path_only())));
    }
    let how = match matched {
        Some(_) => format!("matched {request}"),
        None => format!(
            "no route matched {request}; default: {}",
            match policy.routes.default {
                authz::DefaultAction::Deny => "deny",
                authz::DefaultAction::Allow => "allow",
            }
        ),
    };
    RouteStep {
        name: matched.map(|r| r.name.clone()),
        how,
        tried,
    }
}

fn key_step(decision: &Decision<'_>, kid: Option<&str>, keys: Option<&KeySet>, checked: bool) -> Option<String> {
    if !checked {
        return decision
            .token
            .as_ref()
            .map(|_| "not looked up (--no-verify)".to_owned());
    }
    if let Some(token) = &decision.token {
        return Some(match token.key_id() {
            Some(kid) => format!("kid {}", jwt::readable(kid)),
            None => "a key without kid (tried every key that fits the alg)".to_owned(),
        });
    }
    let published = keys.map(|k| k.kids().join(", ")).unwrap_or_default();
    match (decision.reason, kid) {
        (Reason::UnknownKid, _) => Some(format!("none fits; the issuer publishes kids [{published}]")),
        (Reason::KeysUnavailable, _) => Some("the issuer's keys are not loaded".to_owned()),
        (Reason::BadSignature | Reason::Expired | Reason::NotYetValid, Some(kid)) => {
            Some(format!("kid {}", jwt::readable(kid)))
        }
        (Reason::BadSignature, None) => Some(format!("no kid: tried each fitting key of [{published}]")),
        _ => None,
    }
}

fn signature_step(decision: &Decision<'_>, checked: bool) -> String {
    match (checked, decision.token.is_some(), decision.reason) {
        (false, _, _) => {
            "NOT CHECKED: --no-verify explains the claims of a token whose keys are not at hand".to_owned()
        }
        (true, true, _) => "verified".to_owned(),
        (true, false, Reason::BadSignature) => "does NOT verify".to_owned(),
        (true, false, Reason::Expired | Reason::NotYetValid) => "verified".to_owned(),
        _ => "not reached".to_owned(),
    }
}

/// RFC 3339 for the dates humantime can print (years 1970 to 9999), the number otherwise.
fn when(t: i64) -> String {
    const LAST_PRINTABLE: i64 = 253_402_300_799;
    match u64::try_from(t) {
        Ok(secs) if t <= LAST_PRINTABLE => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
        }
        _ => t.to_string(),
    }
}

fn span(secs: i64) -> String {
    jwt::ago(secs.saturating_abs())
}

fn time_step(c: &jwt::Claims, leeway: Option<i64>, now: i64) -> String {
    let leeway = leeway.map_or_else(String::new, |l| format!(", leeway {l}s"));
    let mut text = if now < c.exp {
        format!(
            "valid for another {} (exp {}{leeway})",
            span(c.exp.saturating_sub(now)),
            when(c.exp)
        )
    } else {
        format!(
            "expired {} ago (exp {}{leeway})",
            span(now.saturating_sub(c.exp)),
            when(c.exp)
        )
    };
    if let Some(nbf) = c.nbf.filter(|&n| n > now) {
        let _ = write!(
            text,
            "; not valid before {} (in {})",
            when(nbf),
            span(nbf.saturating_sub(now))
        );
    }
    if let Some(iat) = c.iat.filter(|&i| i > now) {
        let _ = write!(
            text,
            "; issued {} in the future (iat {})",
            span(iat.saturating_sub(now)),
            when(iat)
        );
    }
    text
}

fn client_id_step(decision: &Decision<'_>, c: &jwt::Claims) -> Option<String> {
    let route = decision.route.filter(|r| !r.allow_anonymous)?;
    let values: Vec<String> = route
        .client_id_claims
        .iter()
        .map(|claim| {
            let v = match claim {
                ClientIdClaim::Aud => authz::claims::shown(&c.aud),
                ClientIdClaim::Azp => authz::claims::shown(c.azp.as_slice()),
                ClientIdClaim::ClientId => authz::claims::shown(c.client_id.as_slice()),
            };
            format!("{} = {v}", claim.name())
        })
        .collect();
    let outcome = match authz::claims::find_client_id(route, c) {
        Ok(id) => format!(" -> `{id}` satisfies it"),
        Err(_) => " -> none of them".to_owned(),
    };
    Some(format!(
        "needs one of [{}] in {}; {}{outcome}",
        route.client_ids.join(", "),
        route
            .client_id_claims
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", "),
        values.join(", ")
    ))
}

/// One line a `required_claims` condition: what it needs, what the token has, and whether it
/// holds; the first that does not is the one the decision names.
fn conditions_step(route: &authz::Route, c: &jwt::Claims, denied_by_claims: bool) -> Vec<String> {
    let mut failed_seen = !denied_by_claims;
    route
        .required_claims
        .iter()
        .map(|cond| {
            let outcome = if cond.holds(&c.payload) {
                "holds"
            } else if failed_seen {
                "does NOT hold"
            } else {
                failed_seen = true;
                "does NOT hold <- denied here"
            };
            format!(
                "{} {}; the token has {} -> {outcome}",
                cond.claim,
                cond.requirement(),
                authz::conditions::shown(cond.lookup(&c.payload))
            )
        })
        .collect()
}

/// The trace as text.
pub fn render_text(e: &Explanation) -> String {
    let mut out = String::new();
    let unchecked = if e.signature_checked {
        ""
    } else {
        "; signature NOT CHECKED"
    };
    let verdict = match e.decision {
        "dry_run_deny" => format!(
            "ALLOW (dry run: would deny {} {}{unchecked})",
            e.status_of_denial(),
            e.reason
        ),
        "allow" => format!("ALLOW ({}{unchecked})", e.reason),
        "deny" => format!("DENY {} {}{unchecked}", e.status, e.reason),
        _ => format!("ERROR {} {}", e.status, e.reason),
    };
    let _ = writeln!(out, "decision:   {verdict}");
    if !e.description.is_empty() {
        let _ = writeln!(out, "why:        {}", e.description);
    }
    let route = e.route.name.as_deref().unwrap_or("-");
    let _ = writeln!(out, "route:      {route}: {}", e.route.how);
    for t in &e.route.tried {
        let _ = writeln!(out, "            tried {t}");
    }
    match &e.token {
        Some(t) => {
            let _ = writeln!(out, "token:      from the {}, {} bytes", t.source, t.bytes);
            let field = |v: &Option<String>| v.as_deref().map_or("-".to_owned(), jwt::printable);
            let _ = writeln!(
                out,
                "header:     alg {}, kid {}, typ {}",
                field(&t.alg),
                field(&t.kid),
                field(&t.typ)
            );
        }
        None => {
            let _ = writeln!(out, "token:      none");
        }
    }
    if let Some(i) = &e.issuer {
        let _ = match &i.name {
            Some(name) => match &i.tenant {
                Some(t) => writeln!(out, "issuer:     {name}, tenant {t} ({})", i.iss),
                None => writeln!(out, "issuer:     {name} ({})", i.iss),
            },
            None => writeln!(out, "issuer:     `{}` is not a configured issuer", i.iss),
        };
    }
    if let Some(key) = &e.key {
        let _ = writeln!(out, "key:        {key}");
    }
    if e.token.is_some() {
        let _ = writeln!(out, "signature:  {}", e.signature);
    }
    for (label, value) in [
        ("time:", &e.time),
        ("client id:", &e.client_id),
        ("scopes:", &e.scopes),
        ("roles:", &e.roles),
    ] {
        if let Some(v) = value {
            let _ = writeln!(out, "{label:<11} {v}");
        }
    }
    for (i, c) in e.required_claims.iter().enumerate() {
        let label = if i == 0 { "claims if:" } else { "" };
        let _ = writeln!(out, "{label:<11} {c}");
    }
    if !e.claims.is_empty() {
        let _ = writeln!(out, "claims:");
        for (name, value) in &e.claims {
            let _ = writeln!(out, "  {name}: {}", hint::show(value));
        }
    }
    for (i, h) in e.hints.iter().enumerate() {
        let label = if i == 0 { "hint:" } else { "" };
        let _ = writeln!(out, "{label:<11} {h}");
    }
    out
}

impl Explanation {
    fn status_of_denial(&self) -> u16 {
        Reason::ALL
            .iter()
            .find(|r| r.code() == self.reason)
            .map_or(self.status, |r| r.http_status())
    }
}
