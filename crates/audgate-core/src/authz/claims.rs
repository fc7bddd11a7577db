//! A route's rule applied to verified claims: client id, scopes, roles, `required_claims`.

use serde_json::Value;

use super::jwt::{Claims, printable};
use super::reason::{Denial, Reason};
use super::route::{ClientIdClaim, Role, Route};

/// Check the route's rule; on success, the client id that satisfied it.
pub fn authorize(route: &Route, claims: &Claims) -> Result<String, Denial> {
    let client_id = find_client_id(route, claims)?;
    check_scopes(route, claims)?;
    check_roles(route, claims)?;
    super::conditions::check(&route.name, &route.required_claims, &claims.payload)?;
    Ok(client_id)
}

fn claim_values(claims: &Claims, claim: ClientIdClaim) -> &[String] {
    match claim {
        ClientIdClaim::Aud => &claims.aud,
        ClientIdClaim::Azp => claims.azp.as_slice(),
        ClientIdClaim::ClientId => claims.client_id.as_slice(),
    }
}

/// The first of the route's client ids found in its client-id claims.
pub fn find_client_id(route: &Route, claims: &Claims) -> Result<String, Denial> {
    for &claim in &route.client_id_claims {
        if let Some(found) = claim_values(claims, claim)
            .iter()
            .find(|v| route.client_ids.contains(v))
        {
            return Ok(found.clone());
        }
    }
    let searched: Vec<String> = route
        .client_id_claims
        .iter()
        .map(|&c| format!("{} = {}", c.name(), shown(claim_values(claims, c))))
        .collect();
    let mut description = format!(
        "route {} needs one of [{}] in {}; the token has {}",
        route.name,
        route.client_ids.join(", "),
        names(&route.client_id_claims),
        searched.join(", ")
    );
    let in_azp = claims.azp.as_ref().filter(|azp| route.client_ids.contains(azp));
    if let (Some(azp), false) = (in_azp, route.client_id_claims.contains(&ClientIdClaim::Azp)) {
        description.push_str(&format!(
            " (`{azp}` is in azp: add an Audience mapper for it in the issuer, or `client_id_claims: [aud, azp]` on the route)"
        ));
    }
    Err(Denial::new(Reason::AudienceMismatch, description))
}

fn names(claims: &[ClientIdClaim]) -> String {
    claims.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
}

/// Claim values for a description: `"a"`, `["a", "b"]` or `(absent)`.
pub fn shown(values: &[String]) -> String {
    match values {
        [] => "(absent)".to_owned(),
        [one] => format!("\"{}\"", printable(one)),
        many => {
            let items: Vec<String> = many.iter().take(8).map(|v| format!("\"{}\"", printable(v))).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

/// Scopes from `scope` (space separated, RFC 8693) or `scp` (an array, Azure/Okta style).
fn has_scope(claims: &Claims, wanted: &str) -> bool {
    let in_scope = claims.str("scope").split(' ').any(|s| s == wanted);
    let in_scp = match claims.payload.get("scp") {
        Some(Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(wanted)),
        Some(Value::String(s)) => s.split(' ').any(|s| s == wanted),
        _ => false,
    };
    in_scope || in_scp
}

fn check_scopes(route: &Route, claims: &Claims) -> Result<(), Denial> {
    let missing: Vec<&str> = route
        .required_scopes
        .iter()
        .filter(|s| !has_scope(claims, s))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Denial::new(
        Reason::InsufficientScope,
        format!(
            "route {} needs scope {} (in `scope` or `scp`)",
            route.name,
            missing.join(" ")
        ),
    ))
}

fn has_role(claims: &Claims, role: &Role) -> bool {
    let (path, name): (&[&str], &str) = match role {
        Role::Realm(r) => (&["realm_access", "roles"], r),
        Role::Client { client, role } => (&["resource_access", client.as_str(), "roles"], role),
    };
    let mut node = claims.payload.get(path[0]);
    for key in &path[1..] {
        node = node.and_then(|n| n.get(key));
    }
    node.and_then(Value::as_array)
        .is_some_and(|roles| roles.iter().any(|r| r.as_str() == Some(name)))
}

fn check_roles(route: &Route, claims: &Claims) -> Result<(), Denial> {
    let missing: Vec<String> = route
        .required_roles
        .iter()
        .filter(|r| !has_role(claims, r))
        .map(|r| match r {
            Role::Realm(name) => format!("realm role {name} (realm_access.roles)"),
            Role::Client { client, role } => format!("client role {role} of {client} (resource_access.{client}.roles)"),
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Denial::new(
        Reason::InsufficientScope,
        format!("route {} needs {}", route.name, missing.join(" and ")),
    ))
}
