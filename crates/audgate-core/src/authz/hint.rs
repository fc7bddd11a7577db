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
        Reason::InsufficientScope => insufficient_scope(route, claims),
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
            super::tenant::TenantSet::Pattern { pattern, .. } => format!("its `tenant_pattern` {pattern}"),
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
    let name = iss.split("/realms/").nth(1)?;
    let name = name.split('/').next().unwrap_or(name);
    (!name.is_empty()).then_some(name)
}

/// The Keycloak server URL `kcadm.sh config credentials --server` takes: the issuer without
/// `/realms/NAME` (it keeps a legacy `/auth` prefix, which kcadm needs then).
fn keycloak_server(iss: &str) -> Option<&str> {
    iss.split_once("/realms/").map(|(server, _)| server)
}

/// A word to paste into a POSIX shell: as it is when it holds only characters no shell
/// treats specially, else in single quotes. Client ids and realm names in a hint come from
/// the token, and a printed command is meant to be pasted.
fn sh(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.:/=@%+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `$(kcadm.sh get clients ...)`: the internal id of client `client_id` in `realm`.
fn kcadm_client_uuid(realm: &str, client_id: &str) -> String {
    format!(
        "$(kcadm.sh get clients -r {} -q {} --fields id --format csv --noquotes)",
        sh(realm),
        sh(&format!("clientId={client_id}"))
    )
}

/// The `kcadm.sh` command that adds an Audience mapper (`oidc-audience-mapper`, Included Client
/// Audience = `audience`) to client `on_client`'s dedicated scope in `realm`. `lightweight`:
/// also into lightweight access tokens.
fn audience_mapper_command(realm: &str, on_client: &str, audience: &str, lightweight: bool) -> String {
    let mut words = vec![
        format!(
            "kcadm.sh create clients/{}/protocol-mappers/models -r {}",
            kcadm_client_uuid(realm, on_client),
            sh(realm)
        ),
        format!("-s {}", sh(&format!("name=audience-{audience}"))),
        "-s protocol=openid-connect -s protocolMapper=oidc-audience-mapper".to_owned(),
        format!("-s {}", sh(&format!("config.\"included.client.audience\"={audience}"))),
        format!("-s {}", sh("config.\"access.token.claim\"=true")),
        format!("-s {}", sh("config.\"introspection.token.claim\"=true")),
    ];
    if lightweight {
        words.push(format!("-s {}", sh("config.\"lightweight.claim\"=true")));
    }
    words.join(" ")
}

/// Where to log in before running a printed command.
fn kcadm_login(iss: &str) -> String {
    match keycloak_server(iss) {
        Some(server) => format!(
            "after `kcadm.sh config credentials --server {} --realm master --user ADMIN`",
            sh(server)
        ),
        None => "after `kcadm.sh config credentials`".to_owned(),
    }
}

/// A Keycloak *lightweight* access token (client option "Always use lightweight access token",
/// `client.use.lightweight.access.token.enabled`): Keycloak leaves out every claim whose mapper
/// does not say "Add to lightweight access token" — `sub`, `aud`, the roles — and keeps `iss`,
/// `azp`, `typ`, `scope`, `sid`, `jti` and the times.
fn is_lightweight(claims: &Claims) -> bool {
    claims.azp.is_some()
        && claims.sub.is_none()
        && claims.aud.is_empty()
        && !claims.payload.contains_key("realm_access")
        && !claims.payload.contains_key("resource_access")
}

fn lightweight_note(claims: &Claims, realm: &str, what: &str) -> String {
    let client = claims.azp.as_deref().unwrap_or_default();
    format!(
        "this is a Keycloak lightweight access token (client `{}` has *Always use lightweight access token* on): it carries only iss, azp, scope and the times, and leaves out {what} unless a mapper has *Add to lightweight access token* on. Either turn that on where the claim comes from, or give the client full access tokens again: `kcadm.sh update clients/{} -r {} -s {}` — a resource server that must stay with lightweight tokens reads the claims from token introspection instead",
        jwt::readable(client),
        kcadm_client_uuid(realm, client),
        sh(realm),
        sh("attributes.\"client.use.lightweight.access.token.enabled\"=false")
    )
}

fn audience(route: &Route, claims: &Claims) -> Vec<String> {
    let mut out = Vec::new();
    let checks_aud = route.client_id_claims.contains(&ClientIdClaim::Aud);
    let azp_accepted = route.client_id_claims.contains(&ClientIdClaim::Azp);
    let realm = realm(&claims.iss);
    let lightweight = is_lightweight(claims);
    let api = route.client_ids.first().map(String::as_str);
    let others = if route.client_ids.len() > 1 {
        format!(" (any of [{}] will do)", route.client_ids.join(", "))
    } else {
        String::new()
    };
    let aud_lacks = |api: &str| {
        if claims.aud.is_empty() {
            format!("it has no aud, so nothing names `{api}`")
        } else {
            format!(
                "its aud [{}] does not name `{api}`",
                jwt::readable(&claims.aud.join(", "))
            )
        }
    };
    let azp = claims.azp.as_deref();
    let api_in_azp = azp.filter(|a| route.client_ids.iter().any(|c| c == a));
    match (realm, azp, api) {
        (Some(realm), Some(_), Some(_)) if checks_aud && lightweight => {
            out.push(lightweight_note(claims, realm, "aud (and sub and the roles)"));
        }
        _ => {}
    }
    match (realm, azp, api, api_in_azp) {
        // the API's own client id is in azp: the token was issued to the API's client
        (Some(realm), _, _, Some(client)) if checks_aud && !azp_accepted => {
            let client = jwt::readable(client);
            out.push(format!(
                "the token was issued to client `{client}` (azp) but its aud does not name it: since Keycloak 4.6 the client id is no longer put in aud. Two ways out:"
            ));
            out.push(format!(
                "(a) in Keycloak, add an Audience mapper that puts `{client}` in aud, {}: `{}` — then `client_id_claims: [aud]` keeps checking the audience",
                kcadm_login(&claims.iss),
                audience_mapper_command(realm, &client, &client, lightweight)
            ));
            out.push(format!(
                "(b) or set `client_id_claims: [aud, azp]` on route {}: it then accepts any token issued to `{client}`, including ones the client obtained for other APIs",
                route.name
            ));
        }
        // azp names the caller (a front end, another service), and aud lacks the API
        (Some(realm), Some(caller), Some(api), None) if checks_aud => {
            let caller = jwt::readable(caller);
            out.push(format!(
                "the token was issued to client `{caller}` (azp), the caller, and {}{others}: Keycloak puts an API in aud only when a mapper says so. Add an Audience mapper with *Included Client Audience* `{api}` to client `{caller}` (or to a client scope assigned to it, to cover every caller at once), {}: `{}` — the next token `{caller}` gets names `{api}` in aud and passes route {}",
                aud_lacks(api),
                kcadm_login(&claims.iss),
                audience_mapper_command(realm, &caller, api, lightweight),
                route.name
            ));
        }
        _ => {}
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
            "`{iss}` differs from issuer {name} (`{}`) only by scheme, host, port, the legacy /auth prefix or a trailing slash: Keycloak writes the hostname the client used into iss. Accept this form too: `issuer_aliases: [{}]` on issuer {name} (next to any aliases it has), or give Keycloak one public hostname (KC_HOSTNAME, --hostname) so every token carries the same iss",
            issuer.issuer,
            yaml_str(&claims.iss),
            name = issuer.name,
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

/// A string as a YAML value: double-quoted, which YAML reads as JSON does (escapes included).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn insufficient_scope(route: Option<&Route>, claims: Option<&Claims>) -> Vec<String> {
    let Some(route) = route else { return Vec::new() };
    let mut out = Vec::new();
    if let Some(claims) = claims.filter(|c| is_lightweight(c) && !route.required_roles.is_empty())
        && let Some(realm) = realm(&claims.iss)
    {
        out.push(lightweight_note(
            claims,
            realm,
            "realm_access and resource_access (the roles: mappers *realm roles* and *client roles* of client scope `roles`)",
        ));
    }
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

    #[test]
    fn printed_commands_quote_what_a_shell_would_interpret() {
        assert_eq!(sh("web-shop"), "web-shop");
        assert_eq!(sh("clientId=web-shop"), "clientId=web-shop");
        assert_eq!(sh("a b"), "'a b'");
        assert_eq!(sh("$(rm -rf ~)"), "'$(rm -rf ~)'");
        assert_eq!(sh("it's"), r"'it'\''s'");
        assert_eq!(sh(""), "''");
        let cmd = audience_mapper_command("shop", "x;reboot", "orders-api", false);
        assert!(cmd.contains("'clientId=x;reboot'"), "{cmd}");
        assert!(!cmd.contains("lightweight"), "{cmd}");
        assert!(audience_mapper_command("shop", "web-shop", "orders-api", true).contains("lightweight.claim"));
    }

    #[test]
    fn kcadm_server_is_the_issuer_without_the_realm() {
        assert_eq!(
            keycloak_server("http://127.0.0.1:8080/realms/shop"),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            keycloak_server("https://sso/auth/realms/shop"),
            Some("https://sso/auth")
        );
        assert_eq!(keycloak_server("https://login.partner.example"), None);
        assert_eq!(realm("https://sso/realms/"), None);
    }
}
