//! What to change after a denial: in the token issuer (usually Keycloak) or in the config.
//! Pure: it reads the decision, the config and the token as sent. Hints go to `explain`, to
//! `audgate test` and to the decision log at debug level — never to the client.

use serde_json::Value;

use super::jwt::{self, Claims};
use super::reason::Reason;
use super::route::{ClientIdClaim, Route};
use super::{Decision, Policy};
use crate::jwks::KeySet;

/// Hints for a decision. `token` is the raw token the request carried (if any), `keys` the key
/// set of the issuer it named (if loaded).
pub fn hints(policy: &Policy, decision: &Decision<'_>, token: Option<&str>, keys: Option<&KeySet>) -> Vec<String> {
    let parsed = token.and_then(|t| jwt::parse(t).ok());
    let claims = parsed.as_ref().map(|p| &p.claims);
    // what a token parse refused still says about itself
    let (peeked_header, peeked) = token.map(jwt::peek).unwrap_or_default();
    let peeked_str = |map: &Option<serde_json::Map<String, Value>>, name: &str| {
        map.as_ref()
            .and_then(|m| m.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let route = decision.route;
    match decision.reason {
        Reason::Allowed | Reason::Anonymous | Reason::CorsPreflight => Vec::new(),
        Reason::MissingToken => {
            let sources: Vec<String> = policy.token.sources.iter().map(ToString::to_string).collect();
            vec![format!(
                "send the access token as `Authorization: Bearer <token>` (audgate reads: {})",
                sources.join(", ")
            )]
        }
        Reason::MalformedToken => vec![
            "send the access token itself: a compact JWS (header.payload.signature, base64url), one token per request, with an `exp` claim".to_owned(),
        ],
        Reason::WrongTokenType => match peeked_str(&peeked, "typ").as_deref() {
            Some("ID") => vec!["this is an ID token; send the access token (the `access_token` of the token response)".to_owned()],
            Some("Refresh" | "Offline") => vec!["this is a refresh token; send the access token instead".to_owned()],
            _ => vec![format!(
                "send an access token (payload typ `Bearer`, header typ JWT or at+jwt; this one has header typ `{}`)",
                jwt::readable(&peeked_str(&peeked_header, "typ").unwrap_or_default())
            )],
        },
        Reason::UnsupportedAlg => {
            let issuer = decision.issuer.or_else(|| peeked_str(&peeked, "iss").and_then(|i| policy.issuer_by_iss(&i)));
            let allowed = match issuer {
                Some(i) => format!(
                    "issuer {}'s allowed algorithms ({})",
                    policy.issuers[i].name,
                    policy.issuers[i].algorithms.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
                ),
                None => "an algorithm on the issuer's `algorithms` list".to_owned(),
            };
            vec![format!(
                "sign with {allowed} — in Keycloak: Realm settings > Keys, and the client's access token signature algorithm — or add the algorithm to `algorithms`; `none` and HS* are never accepted"
            )]
        }
        Reason::UnknownIssuer if claims.is_some_and(|c| tenant_hint(policy, route, c).is_some()) => {
            claims.and_then(|c| tenant_hint(policy, route, c)).unwrap_or_default()
        }
        Reason::UnknownIssuer => match claims {
            Some(c) => unknown_issuer(policy, route, c),
            None => vec![
                "the token names no issuer (`iss`): send an access token from a configured issuer".to_owned(),
            ],
        },
        Reason::UnknownKid => {
            let kid = parsed.as_ref().and_then(|p| p.header.kid.clone()).unwrap_or_default();
            let published = keys.map(|k| k.kids().join(", ")).unwrap_or_default();
            vec![format!(
                "the issuer publishes kids [{published}], not `{}`: its keys were rotated or the realm was re-created after this token was issued, or the token comes from another realm or environment; get a new token",
                jwt::readable(&kid)
            )]
        }
        Reason::BadSignature => vec![match parsed.as_ref().and_then(|p| p.header.kid.as_deref()) {
            Some(kid) => format!(
                "the token was not signed by the key the issuer publishes as `{}`: a token from another environment with the same kid, or a token altered in transit; get a new token from the configured issuer",
                jwt::readable(kid)
            ),
            None => "no key the issuer publishes verifies this token (it names no kid, so each fitting key was tried): a token from another environment, or altered in transit; get a new token from the configured issuer".to_owned(),
        }],
        Reason::Expired | Reason::NotYetValid => vec![
            "get a new token; if the times look wrong, compare this host's clock with the issuer's (NTP), or raise the issuer's `leeway`".to_owned(),
        ],
        Reason::AudienceMismatch => match (route, claims) {
            (Some(route), Some(claims)) => audience(route, claims),
            _ => Vec::new(),
        },
        Reason::InsufficientScope => insufficient_scope(route),
        Reason::NoRoute => vec![match route {
            None if decision.description.contains("audgate.route") => {
                "the Envoy route's `audgate.route` context extension names a route that is not in the config: fix the name on either side".to_owned()
            }
            _ => "add a route that matches this host, path and method (routes are tried in file order), or set `default: allow`".to_owned(),
        }],
        Reason::KeysUnavailable => vec![
            "audgate has not loaded this issuer's keys yet: check that the discovery / JWKS URL is reachable from audgate (`audgate doctor`)".to_owned(),
        ],
        Reason::ClaimMismatch => match (route, claims) {
            (Some(route), Some(claims)) => claim_mismatch(route, claims),
            _ => Vec::new(),
        },
    }
}

/// `unknown_issuer` for a templated issuer: the tenant is not accepted by the route, or `iss`
/// has the template's shape but names a tenant the issuer does not accept.
fn tenant_hint(policy: &Policy, route: Option<&Route>, claims: &Claims) -> Option<Vec<String>> {
    if let Some((id, Some(tenant))) = policy.resolve_iss(&claims.iss) {
        let route = route?;
        return Some(vec![format!(
            "tenant `{}` of issuer {} is valid, but route {} accepts only the tenants [{}]: add it to the route's `tenants` if its users belong here",
            jwt::readable(tenant),
            policy.issuers[id].name,
            route.name,
            route.tenants.join(", ")
        )]);
    }
    (0..policy.issuers.len()).find_map(|id| {
        let template = policy.template(id)?;
        let issuer = &policy.issuers[id];
        let (before, after) = issuer.issuer.split_once(super::tenant::PLACEHOLDER)?;
        let tenant = claims.iss.strip_prefix(before)?.strip_suffix(after)?;
        let accepted = match &template.tenants {
            super::tenant::TenantSet::Listed(list) => format!("its `tenants` [{}]", list.join(", ")),
            super::tenant::TenantSet::Pattern { regex, .. } => format!("its `tenant_pattern` {}", regex.as_str()),
        };
        Some(vec![format!(
            "`{}` has the shape of issuer {} (`{}`), but tenant `{}` is not one of {accepted}: add the tenant there, or get a token from an accepted tenant",
            jwt::readable(&claims.iss),
            issuer.name,
            issuer.issuer,
            jwt::readable(tenant)
        )])
    })
}

/// `claim_mismatch`: which condition failed and where such a claim comes from in Keycloak.
fn claim_mismatch(route: &Route, claims: &Claims) -> Vec<String> {
    let Some(failed) = route.required_claims.iter().find(|c| !c.holds(&claims.payload)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if failed.lookup(&claims.payload).is_none() {
        out.push(format!(
            "the token has no claim `{}`: in Keycloak a protocol mapper on the client (or on a client scope assigned to it) puts it in the access token (a User Attribute, Group Membership or Hardcoded claim mapper, with `Add to access token` on); a dotted name reaches nested claims, and a claim whose own name has a dot is matched too",
            failed.claim
        ));
    } else {
        out.push(format!(
            "claim `{}` must be {}: change the user's attributes, groups or roles in the issuer so that it is, or widen the route's `required_claims` (a list accepts any of its values, a leading or trailing `*` a suffix or prefix)",
            failed.claim,
            failed.requirement()
        ));
    }
    out.push("the token's claims only change when a new token is issued: get a new one after the change".to_owned());
    out
}

/// The realm of a Keycloak issuer URL (`.../realms/NAME`).
fn realm(iss: &str) -> Option<&str> {
    iss.split("/realms/").nth(1).map(|r| r.split('/').next().unwrap_or(r))
}

fn audience(route: &Route, claims: &Claims) -> Vec<String> {
    let mut out = Vec::new();
    let in_azp = claims
        .azp
        .as_deref()
        .filter(|azp| route.client_ids.iter().any(|c| c == azp));
    let azp_accepted = route.client_id_claims.contains(&ClientIdClaim::Azp);
    if let (Some(client), false) = (in_azp, azp_accepted) {
        let realm = realm(&claims.iss).unwrap_or("REALM");
        out.push(format!(
            "the token was issued to client `{client}` (azp) but its aud does not name it: since Keycloak 4.6 the client id is no longer put in aud. Two ways out:"
        ));
        out.push(format!(
            "(a) in Keycloak, add an Audience mapper that puts `{client}` in aud, e.g. `kcadm.sh create clients/$(kcadm.sh get clients -r {realm} -q clientId={client} --fields id --format csv --noquotes)/protocol-mappers/models -r {realm} -s name=audience-{client} -s protocol=openid-connect -s protocolMapper=oidc-audience-mapper -s 'config.\"included.client.audience\"={client}' -s 'config.\"access.token.claim\"=true'` — then `client_id_claims: [aud]` keeps checking the audience"
        ));
        out.push(format!(
            "(b) or set `client_id_claims: [aud, azp]` on route {}: it then accepts any token issued to `{client}`, including ones the client obtained for other APIs",
            route.name
        ));
    }
    if claims.aud.iter().all(|a| a == "account") && !claims.aud.is_empty() {
        out.push(
            "aud holds only `account`: Keycloak adds it to every token of the realm (for the account console), so it never identifies this API"
                .to_owned(),
        );
    }
    if out.is_empty() {
        out.push(format!(
            "make the token name one of [{}] in {} (an Audience mapper in the issuer), or add the client the token names to the route's `client_ids`",
            route.client_ids.join(", "),
            route.client_id_claims.iter().map(|c| c.name()).collect::<Vec<_>>().join(" or ")
        ));
    }
    out
}

/// `https://sso.example.com:8443/auth/realms/shop/` -> `realms/shop`: what is left of an
/// issuer URL when scheme, host, port, the legacy `/auth` prefix and a trailing slash go.
fn issuer_core(iss: &str) -> &str {
    let no_scheme = iss.split_once("://").map_or(iss, |(_, rest)| rest);
    let path = no_scheme.find('/').map_or("", |i| &no_scheme[i + 1..]);
    let path = path.strip_prefix("auth/").unwrap_or(path);
    path.trim_end_matches('/')
}

fn unknown_issuer(policy: &Policy, route: Option<&Route>, claims: &Claims) -> Vec<String> {
    let iss = jwt::readable(&claims.iss);
    if let Some(id) = policy.issuer_by_iss(&claims.iss) {
        let name = &policy.issuers[id].name;
        return vec![format!(
            "issuer {name} is configured but route {} does not list it in `issuers`: add it there if its tokens belong on this route",
            route.map_or("-", |r| r.name.as_str())
        )];
    }
    let core = issuer_core(&claims.iss);
    let close = policy.issuers.iter().find(|i| {
        std::iter::once(&i.issuer)
            .chain(&i.aliases)
            .any(|known| !core.is_empty() && issuer_core(known) == core)
    });
    match close {
        Some(issuer) => vec![format!(
            "`{iss}` differs from issuer {} (`{}`) only by scheme, host, port, the legacy /auth prefix or a trailing slash: Keycloak writes the hostname the client used into iss. Add `{iss}` to `issuer_aliases`, or give Keycloak one public hostname (KC_HOSTNAME) so every token carries the same iss",
            issuer.name, issuer.issuer
        )],
        None => {
            let known: Vec<&str> = policy.issuers.iter().map(|i| i.issuer.as_str()).collect();
            vec![format!(
                "no configured issuer is `{iss}` (configured: {}): add an issuer for it, or get the token from a configured one",
                known.join(", ")
            )]
        }
    }
}

fn insufficient_scope(route: Option<&Route>) -> Vec<String> {
    let Some(route) = route else { return Vec::new() };
    let mut out = Vec::new();
    if !route.required_scopes.is_empty() {
        out.push(format!(
            "request the scope(s) {} when getting the token (the `scope` parameter), and in Keycloak assign a client scope of that name to the client",
            route.required_scopes.join(" ")
        ));
    }
    if !route.required_roles.is_empty() {
        out.push(
            "Keycloak puts realm roles in realm_access.roles and client roles in resource_access.<client>.roles: assign the role to the user (or to the client's service account), and keep the `roles` client scope on the client so the claims are included"
                .to_owned(),
        );
    }
    out
}

/// A claim for display: strings plain, anything else as JSON.
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => jwt::readable(s),
        other => jwt::readable(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_core_ignores_host_scheme_port_auth_prefix_and_slash() {
        let core = "realms/shop";
        for iss in [
            "https://sso.example.com/realms/shop",
            "http://sso.internal:8080/auth/realms/shop/",
            "https://10.0.0.5:8443/realms/shop",
        ] {
            assert_eq!(issuer_core(iss), core, "{iss}");
        }
        assert_ne!(issuer_core("https://sso.example.com/realms/other"), core);
        assert_eq!(realm("https://sso/auth/realms/shop"), Some("shop"));
    }
}
