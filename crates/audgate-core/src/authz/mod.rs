//! The decision core. Pure: no I/O, no clock, no wire types. The adapters hand it a
//! [`CheckInput`], a way to look up an issuer's current keys and the time; it hands back a
//! [`Decision`], which [`respond`] turns into a plain-data [`Response`].
//!
//! One check: select the route -> (anonymous routes stop here) -> extract the token -> parse
//! it -> find its issuer -> verify signature and times with that issuer's keys -> apply the
//! route's rule (client id, scopes, roles).

pub mod claims;
pub mod conditions;
pub mod decision;
pub mod hint;
pub mod jwt;
pub mod path;
pub mod reason;
pub mod request;
pub mod route;
pub mod tenant;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;

pub use decision::{ClaimHeader, ClaimValue, Decision, Metadata, NO_ROUTE, Response, Verdict, respond};
pub use jwt::{Alg, Issuer, VerifiedToken};
pub use reason::{Denial, Reason};
pub use request::{CheckInput, Headers};
pub use route::{DefaultAction, IssuerId, Route, RouteTable, Selected};
pub use token::{TokenConfig, TokenRemoval, TokenSource};

use crate::jwks::KeySet;

/// Everything a decision depends on, compiled once from the config.
#[derive(Debug, Clone)]
pub struct Policy {
    pub issuers: Vec<Issuer>,
    /// `iss` value (issuer or alias) -> issuer.
    by_iss: HashMap<String, IssuerId>,
    pub token: TokenConfig,
    pub claim_headers: Vec<ClaimHeader>,
    /// [`ClaimHeader::other_spellings`] of every claim header: removed on every allow.
    pub claim_header_spellings: Vec<String>,
    /// Bit `n` set when a claim header name (and so each of its spellings) is `n` bytes long
    /// (bit 63: 63 or more): lets [`Policy::claim_headers_carried`] pass over most names
    /// without comparing them.
    claim_header_lengths: u64,
    pub routes: RouteTable,
    /// The `{tenant}` template of each templated issuer, indexed like `issuers`.
    templates: Vec<Option<tenant::TenantTemplate>>,
}

impl Policy {
    pub fn new(issuers: Vec<Issuer>, token: TokenConfig, claim_headers: Vec<ClaimHeader>, routes: RouteTable) -> Self {
        let mut by_iss = HashMap::new();
        for (id, issuer) in issuers.iter().enumerate() {
            for iss in std::iter::once(&issuer.issuer).chain(&issuer.aliases) {
                by_iss.entry(iss.clone()).or_insert(id);
            }
        }
        let claim_header_spellings = claim_headers
            .iter()
            .flat_map(|h| ClaimHeader::other_spellings(&h.name))
            .collect();
        let claim_header_lengths = claim_headers.iter().fold(0, |bits, h| bits | length_bit(&h.name));
        let templates = vec![None; issuers.len()];
        Policy {
            issuers,
            by_iss,
            token,
            claim_headers,
            claim_header_spellings,
            claim_header_lengths,
            routes,
            templates,
        }
    }

    /// Mark issuers as templated (`{tenant}` in `issuer`), indexed like `issuers`. Their
    /// templates are never compared with `iss` literally.
    pub fn with_templates(mut self, templates: Vec<Option<tenant::TenantTemplate>>) -> Self {
        self.by_iss
            .retain(|_, id| templates.get(*id).is_none_or(Option::is_none));
        self.templates = templates;
        self.templates.resize(self.issuers.len(), None);
        self
    }

    /// The `{tenant}` template of an issuer, if it is templated.
    pub fn template(&self, id: IssuerId) -> Option<&tenant::TenantTemplate> {
        self.templates.get(id).and_then(Option::as_ref)
    }

    /// The issuer `iss` names and, for a templated one, the (accepted) tenant: an exact
    /// issuer or alias first, then the templates in file order.
    pub fn resolve_iss<'i>(&self, iss: &'i str) -> Option<(IssuerId, Option<&'i str>)> {
        if let Some(id) = self.issuer_by_iss(iss) {
            return Some((id, None));
        }
        self.templates
            .iter()
            .enumerate()
            .find_map(|(id, t)| Some((id, Some(t.as_ref()?.tenant_of(iss)?))))
    }

    /// The issuer whose `issuer` or one of whose `issuer_aliases` equals `iss` exactly.
    pub fn issuer_by_iss(&self, iss: &str) -> Option<IssuerId> {
        self.by_iss.get(iss).copied()
    }

    /// The claim header names and their other spellings found among a request's header
    /// `names` (lower-case), as the policy spells them: what an adapter that changes the
    /// request itself must overwrite or remove. One pass over the request; most names are
    /// passed over on their length alone.
    pub fn claim_headers_carried<'n>(&self, names: impl Iterator<Item = &'n str>) -> Vec<&str> {
        let mut found = Vec::new();
        for name in names.filter(|n| self.claim_header_lengths & length_bit(n) != 0) {
            let Some(header) = self.claim_headers.iter().find(|h| same_but_separators(&h.name, name)) else {
                continue;
            };
            let ours = if header.name == name {
                Some(header.name.as_str())
            } else {
                self.claim_header_spellings
                    .iter()
                    .map(String::as_str)
                    .find(|s| *s == name)
            };
            if let Some(ours) = ours
                && !found.contains(&ours)
            {
                found.push(ours);
            }
        }
        found
    }
}

/// [`Policy::claim_header_lengths`]'s bit for a name.
fn length_bit(name: &str) -> u64 {
    1 << name.len().min(63)
}

/// Whether `a` and `b` are spellings of one name: equal but for `-` and `_`.
fn same_but_separators(a: &str, b: &str) -> bool {
    let separator = |c: u8| c == b'-' || c == b'_';
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .all(|(x, y)| x == y || separator(x) && separator(y))
}

/// What `token.forward: false` takes out of the request `decision` lets through: nothing on a
/// deny or error (no upstream request), nothing when the token is forwarded.
pub fn token_removal<'p>(policy: &'p Policy, decision: &Decision<'_>, input: &CheckInput<'_>) -> TokenRemoval<'p> {
    match decision.verdict {
        Verdict::Allow | Verdict::DryRunDeny => token::removal(&policy.token, input),
        Verdict::Deny | Verdict::Error => TokenRemoval::default(),
    }
}

/// A request the adapter could not read (a header its proxy's convention needs is missing):
/// 403 `no_route`, since no route can be chosen for a request that is not known.
pub fn unreadable_request<'p>(description: String) -> Decision<'p> {
    Decision::deny(None, Denial::new(Reason::NoRoute, description))
}

/// Where verified tokens may be remembered between requests (the adapter's token cache).
/// `get` answers only with a token that is still good under its issuer's current keys; the
/// core still checks its times and runs the route's rule on it.
pub trait TokenMemo {
    fn get(&self, token: &str) -> Option<VerifiedToken>;
    fn put(&self, token: &str, verified: &VerifiedToken);
}

/// No memory: every token is verified.
pub struct NoMemo;

impl TokenMemo for NoMemo {
    fn get(&self, _: &str) -> Option<VerifiedToken> {
        None
    }
    fn put(&self, _: &str, _: &VerifiedToken) {}
}

/// Decide on one request. `keys` returns an issuer's current key set, `None` while it has
/// never loaded; `now` is Unix seconds.
pub fn evaluate<'p>(
    policy: &'p Policy,
    input: &CheckInput<'_>,
    keys: impl Fn(IssuerId) -> Option<Arc<KeySet>>,
    now: i64,
) -> Decision<'p> {
    evaluate_with_memo(policy, input, keys, &NoMemo, now)
}

/// [`evaluate`], reusing tokens `memo` verified before and remembering new ones.
pub fn evaluate_with_memo<'p>(
    policy: &'p Policy,
    input: &CheckInput<'_>,
    keys: impl Fn(IssuerId) -> Option<Arc<KeySet>>,
    memo: &dyn TokenMemo,
    now: i64,
) -> Decision<'p> {
    evaluate_tenants(policy, input, |id, _| keys(id), memo, now)
}

/// [`evaluate_with_memo`] where `keys` also gets the tenant of a templated issuer (each
/// tenant has its own keys). Tokens of templated issuers are never remembered.
pub fn evaluate_tenants<'p>(
    policy: &'p Policy,
    input: &CheckInput<'_>,
    keys: impl Fn(IssuerId, Option<&str>) -> Option<Arc<KeySet>>,
    memo: &dyn TokenMemo,
    now: i64,
) -> Decision<'p> {
    let verify = |token: jwt::UnverifiedToken<'_>, id: IssuerId, tenant: Option<&str>| {
        let issuer = &policy.issuers[id];
        let key_set = keys(id, tenant).ok_or_else(|| {
            Denial::new(
                Reason::KeysUnavailable,
                format!("the keys of issuer {} have not been loaded yet", issuer.name),
            )
        })?;
        jwt::verify(token, id, issuer, &key_set, now)
    };
    decide(policy, input, &verify, memo, now)
}

/// [`evaluate`] with every check but the signature: for `audgate explain --no-verify` only,
/// which says loudly that the signature was not checked. Never used to answer a request, and
/// never remembered.
pub fn evaluate_without_signature<'p>(policy: &'p Policy, input: &CheckInput<'_>, now: i64) -> Decision<'p> {
    let verify = |token: jwt::UnverifiedToken<'_>, id: IssuerId, _: Option<&str>| {
        jwt::accept_without_signature(token, id, &policy.issuers[id], now)
    };
    decide(policy, input, &verify, &NoMemo, now)
}

type Verifier<'v> = dyn Fn(jwt::UnverifiedToken<'_>, IssuerId, Option<&str>) -> Result<VerifiedToken, Denial> + 'v;

fn decide<'p>(
    policy: &'p Policy,
    input: &CheckInput<'_>,
    verify: &Verifier<'_>,
    memo: &dyn TokenMemo,
    now: i64,
) -> Decision<'p> {
    let route = match policy.routes.select(input) {
        Selected::Route(route) => route,
        Selected::NoRoute { hint: Some(name) } => {
            let description = format!("no route is named `{}` (from audgate.route)", jwt::printable(&name));
            return Decision::deny(None, Denial::new(Reason::NoRoute, description));
        }
        Selected::NoRoute { hint: None } => {
            return match policy.routes.default {
                DefaultAction::Allow => Decision::allow(None, Reason::Anonymous),
                DefaultAction::Deny => Decision::deny(
                    None,
                    Denial::new(
                        Reason::NoRoute,
                        format!(
                            "no route matches {} {}{}",
                            jwt::printable(input.method),
                            jwt::printable(input.hostname()),
                            jwt::printable(&input.normalized_path())
                        ),
                    ),
                ),
            };
        }
    };
    if route.passes_as_preflight(input) {
        return Decision::allow(Some(route), Reason::CorsPreflight);
    }
    if route.allow_anonymous {
        return Decision::allow(Some(route), Reason::Anonymous);
    }
    let mut issuer = (None, None);
    let verified = authenticate(policy, route, input, verify, memo, now, &mut issuer);
    let mut decision = match verified {
        Err(denial) => Decision::deny(Some(route), denial),
        Ok(token) => match claims::authorize(route, token.claims()) {
            Ok(client_id) => Decision {
                client_id: Some(client_id),
                token: Some(token),
                ..Decision::allow(Some(route), Reason::Allowed)
            },
            Err(denial) => Decision {
                token: Some(token),
                ..Decision::deny(Some(route), denial)
            },
        },
    };
    (decision.issuer, decision.tenant) = issuer;
    decision
}

/// Token extraction through verification; `issuer` is set as soon as the token names one.
/// A remembered token skips parsing and the signature, never the issuer or time checks.
fn authenticate(
    policy: &Policy,
    route: &Route,
    input: &CheckInput<'_>,
    verify: &Verifier<'_>,
    memo: &dyn TokenMemo,
    now: i64,
    issuer: &mut (Option<IssuerId>, Option<String>),
) -> Result<VerifiedToken, Denial> {
    let raw = token::extract(&policy.token, input)?;
    if let Some(known) = memo.get(&raw) {
        let id = known.issuer();
        issuer.0 = Some(id);
        check_route_issuer(policy, route, id)?;
        jwt::check_times(known.claims(), policy.issuers[id].leeway, now)?;
        return Ok(known);
    }
    let parsed = jwt::parse(&raw)?;
    let iss = &parsed.claims.iss;
    let (id, tenant) = policy.resolve_iss(iss).ok_or_else(|| {
        Denial::new(
            Reason::UnknownIssuer,
            format!("iss `{}` is not a configured issuer", jwt::printable(iss)),
        )
    })?;
    let tenant = tenant.map(str::to_owned);
    *issuer = (Some(id), tenant.clone());
    check_route_issuer(policy, route, id)?;
    check_route_tenant(policy, route, id, tenant.as_deref())?;
    let verified = verify(parsed, id, tenant.as_deref())?;
    if tenant.is_none() {
        memo.put(&raw, &verified);
    }
    Ok(verified)
}

/// A route with `tenants` accepts tokens of a templated issuer only for those tenants.
fn check_route_tenant(policy: &Policy, route: &Route, id: IssuerId, tenant: Option<&str>) -> Result<(), Denial> {
    match tenant {
        Some(t) if !route.tenants.is_empty() && !route.tenants.iter().any(|r| r == t) => Err(Denial::new(
            Reason::UnknownIssuer,
            format!(
                "tenant `{}` of issuer {} is not accepted on route {} (accepts tenants {})",
                jwt::printable(t),
                policy.issuers[id].name,
                route.name,
                route.tenants.join(", ")
            ),
        )),
        _ => Ok(()),
    }
}

fn check_route_issuer(policy: &Policy, route: &Route, id: IssuerId) -> Result<(), Denial> {
    if route.accepts_issuer(id) {
        return Ok(());
    }
    let accepted: Vec<&str> = route.issuers.iter().map(|&i| policy.issuers[i].name.as_str()).collect();
    Err(Denial::new(
        Reason::UnknownIssuer,
        format!(
            "issuer {} is not accepted on route {} (accepts {})",
            policy.issuers[id].name,
            route.name,
            accepted.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_headers_a_request_carries_in_any_spelling() {
        let policy = Policy::new(
            vec![],
            TokenConfig::default(),
            ClaimHeader::defaults(),
            RouteTable::new(vec![], DefaultAction::Deny),
        );
        let carried = |names: &[&str]| policy.claim_headers_carried(names.iter().copied());
        let plain = [
            "user-agent",
            "accept",
            ":authority",
            "x-request-id",
            "authorization",
            "x-auth-subjects",
        ];
        assert!(carried(&plain).is_empty());
        assert_eq!(carried(&["accept", "x-auth-subject"]), ["x-auth-subject"]);
        assert_eq!(
            carried(&["x_auth_client-id", "x-auth-issuer", "x_auth_client-id"]),
            ["x_auth_client-id", "x-auth-issuer"],
            "each once, in request order"
        );
        assert!(
            carried(&["X-Auth-Subject"]).is_empty(),
            "names are lower-case by contract"
        );
    }
}
