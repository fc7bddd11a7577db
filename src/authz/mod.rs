//! The decision core. Pure: no I/O, no clock, no wire types. The adapters hand it a
//! [`CheckInput`], a way to look up an issuer's current keys and the time; it hands back a
//! [`Decision`], which [`respond`] turns into a plain-data [`Response`].
//!
//! One check: select the route -> (anonymous routes stop here) -> extract the token -> parse
//! it -> find its issuer -> verify signature and times with that issuer's keys -> apply the
//! route's rule (client id, scopes, roles).

pub mod claims;
pub mod decision;
pub mod hint;
pub mod jwt;
pub mod reason;
pub mod request;
pub mod route;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;

pub use decision::{ClaimHeader, ClaimValue, Decision, Metadata, Response, Verdict, respond};
pub use jwt::{Alg, Issuer, VerifiedToken};
pub use reason::{Denial, Reason};
pub use request::CheckInput;
pub use route::{DefaultAction, IssuerId, Route, RouteTable, Selected};
pub use token::{TokenConfig, TokenSource};

use crate::jwks::KeySet;

/// Everything a decision depends on, compiled once from the config.
#[derive(Debug, Clone)]
pub struct Policy {
    pub issuers: Vec<Issuer>,
    /// `iss` value (issuer or alias) -> issuer.
    by_iss: HashMap<String, IssuerId>,
    pub token: TokenConfig,
    pub claim_headers: Vec<ClaimHeader>,
    pub routes: RouteTable,
}

impl Policy {
    pub fn new(issuers: Vec<Issuer>, token: TokenConfig, claim_headers: Vec<ClaimHeader>, routes: RouteTable) -> Self {
        let mut by_iss = HashMap::new();
        for (id, issuer) in issuers.iter().enumerate() {
            for iss in std::iter::once(&issuer.issuer).chain(&issuer.aliases) {
                by_iss.entry(iss.clone()).or_insert(id);
            }
        }
        Policy {
            issuers,
            by_iss,
            token,
            claim_headers,
            routes,
        }
    }

    /// The issuer whose `issuer` or one of whose `issuer_aliases` equals `iss` exactly.
    pub fn issuer_by_iss(&self, iss: &str) -> Option<IssuerId> {
        self.by_iss.get(iss).copied()
    }
}

/// Decide on one request. `keys` returns an issuer's current key set, `None` while it has
/// never loaded; `now` is Unix seconds.
pub fn evaluate<'p>(
    policy: &'p Policy,
    input: &CheckInput<'_>,
    keys: impl Fn(IssuerId) -> Option<Arc<KeySet>>,
    now: i64,
) -> Decision<'p> {
    decide(policy, input, &|token, id| {
        let issuer = &policy.issuers[id];
        let key_set = keys(id).ok_or_else(|| {
            Denial::new(
                Reason::KeysUnavailable,
                format!("the keys of issuer {} have not been loaded yet", issuer.name),
            )
        })?;
        jwt::verify(token, id, issuer, &key_set, now)
    })
}

/// [`evaluate`] with every check but the signature: for `audgate explain --no-verify` only,
/// which says loudly that the signature was not checked. Never used to answer a request.
pub fn evaluate_without_signature<'p>(policy: &'p Policy, input: &CheckInput<'_>, now: i64) -> Decision<'p> {
    decide(policy, input, &|token, id| {
        jwt::accept_without_signature(token, id, &policy.issuers[id], now)
    })
}

type Verifier<'v> = dyn Fn(jwt::UnverifiedToken<'_>, IssuerId) -> Result<VerifiedToken, Denial> + 'v;

fn decide<'p>(policy: &'p Policy, input: &CheckInput<'_>, verify: &Verifier<'_>) -> Decision<'p> {
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
                            jwt::printable(input.path_only())
                        ),
                    ),
                ),
            };
        }
    };
    if route.allow_anonymous {
        return Decision::allow(Some(route), Reason::Anonymous);
    }
    let mut issuer = None;
    let verified = authenticate(policy, route, input, verify, &mut issuer);
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
    decision.issuer = issuer;
    decision
}

/// Token extraction through verification; `issuer` is set as soon as the token names one.
fn authenticate(
    policy: &Policy,
    route: &Route,
    input: &CheckInput<'_>,
    verify: &Verifier<'_>,
    issuer: &mut Option<IssuerId>,
) -> Result<VerifiedToken, Denial> {
    let raw = token::extract(&policy.token, input)?;
    let parsed = jwt::parse(&raw)?;
    let iss = &parsed.claims.iss;
    let id = policy.issuer_by_iss(iss).ok_or_else(|| {
        Denial::new(
            Reason::UnknownIssuer,
            format!("iss `{}` is not a configured issuer", jwt::printable(iss)),
        )
    })?;
    *issuer = Some(id);
    if !route.accepts_issuer(id) {
        let accepted: Vec<&str> = route.issuers.iter().map(|&i| policy.issuers[i].name.as_str()).collect();
        return Err(Denial::new(
            Reason::UnknownIssuer,
            format!(
                "issuer {} is not accepted on route {} (accepts {})",
                policy.issuers[id].name,
                route.name,
                accepted.join(", ")
            ),
        ));
    }
    verify(parsed, id)
}
