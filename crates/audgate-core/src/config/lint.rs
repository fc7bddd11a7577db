//! Configs that are valid but probably wrong: `check-config` warns, loading still succeeds.

use super::compile::Diagnostics;
use super::raw::{RawConfig, RawRoute, S};
use crate::authz::Route;
use crate::authz::route::{HostPattern, Match, PathMatch};

pub(super) fn routes(raw: &[S<RawRoute>], routes: &[Route], d: &mut Diagnostics) {
    for (j, route) in routes.iter().enumerate() {
        let at = &raw[j].value.name;
        if let Some(ids) = &raw[j].value.client_ids {
            for id in ids.value.iter().filter(|id| id.value == "account") {
                d.warn(
                    id,
                    format!(
                        "route {}: every Keycloak token of the realm has `account` in aud; it does not identify this API",
                        route.name
                    ),
                );
            }
        }
        if let Some(m) = &raw[j].value.matcher {
            for (key, path) in [("path", &m.value.path), ("path_prefix", &m.value.path_prefix)] {
                let Some(path) = path else { continue };
                let normal = crate::authz::path::normalize(&path.value);
                if normal != path.value.as_str() {
                    d.warn(
                        path,
                        format!(
                            "route {}: {key} `{}` is not a normalized path, and requests are matched normalized (as `{normal}`): it can never match as written",
                            route.name, path.value
                        ),
                    );
                }
            }
        }
        if let Some(earlier) = routes[..j].iter().find(|i| covers(&i.matcher, &route.matcher)) {
            d.warn(
                at,
                format!(
                    "route {} is shadowed by the earlier route {}: only an `audgate.route` context extension can reach it",
                    route.name, earlier.name
                ),
            );
        }
    }
}

pub(super) fn issuers(raw: &RawConfig, d: &mut Diagnostics) {
    for (name, spanned) in &raw.issuers {
        let i = &spanned.value;
        let urls = std::iter::once(&i.issuer).chain(&i.discovery_url).chain(&i.jwks_uri);
        for url in urls {
            if url.value.starts_with("http://") && !is_loopback_url(&url.value) {
                d.warn(
                    url,
                    format!(
                        "issuer {name}: `{}` is plain http: keys fetched over it can be replaced in transit",
                        url.value
                    ),
                );
            }
        }
    }
}

fn is_loopback_url(url: &str) -> bool {
    let rest = url.trim_start_matches("http://");
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether every request `later` matches is also matched by `earlier`. Conservative: says
/// no when it cannot tell (a regex against a prefix).
fn covers(earlier: &Match, later: &Match) -> bool {
    let hosts = earlier.hosts.is_empty()
        || (!later.hosts.is_empty()
            && later
                .hosts
                .iter()
                .all(|h| earlier.hosts.iter().any(|e| host_covers(e, h))));
    let methods = earlier.methods.is_empty()
        || (!later.methods.is_empty() && later.methods.iter().all(|m| earlier.methods.contains(m)));
    let path = match (&earlier.path, &later.path) {
        (PathMatch::Any, _) => true,
        // every path a route sees is normalized and starts with `/`
        (PathMatch::Prefix(p), PathMatch::Any | PathMatch::Regex(_)) => p.is_empty() || p == "/",
        (PathMatch::Prefix(p), PathMatch::Prefix(q) | PathMatch::Exact(q)) => q.starts_with(p.as_str()),
        (PathMatch::Exact(p), PathMatch::Exact(q)) => p == q,
        (PathMatch::Regex(re), PathMatch::Exact(q)) => re.is_match(q),
        _ => false,
    };
    hosts && methods && path
}

fn host_covers(earlier: &HostPattern, later: &HostPattern) -> bool {
    match (earlier, later) {
        (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
        (HostPattern::Suffix(s), HostPattern::Exact(b)) => b.len() > s.len() && b.ends_with(s.as_str()),
        (HostPattern::Suffix(s), HostPattern::Suffix(t)) => t.ends_with(s.as_str()),
        (HostPattern::Exact(_), HostPattern::Suffix(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_prefix_covers_any_path() {
        let m = |path| Match {
            hosts: Vec::new(),
            path,
            methods: Vec::new(),
        };
        let root = m(PathMatch::Prefix("/".into()));
        assert!(covers(&root, &m(PathMatch::Any)));
        assert!(covers(
            &root,
            &m(PathMatch::Regex(regex::Regex::new("^(?:/x)$").unwrap()))
        ));
        assert!(!covers(&m(PathMatch::Prefix("/api".into())), &m(PathMatch::Any)));
        assert!(!covers(&m(PathMatch::Exact("/".into())), &m(PathMatch::Any)));
    }

    #[test]
    fn loopback_urls_are_recognised() {
        assert!(is_loopback_url("http://127.0.0.1:8080/realms/x"));
        assert!(is_loopback_url("http://localhost/realms/x"));
        assert!(is_loopback_url("http://[::1]:80/x"));
        assert!(!is_loopback_url("http://keycloak.sso.svc:8080/realms/x"));
    }
}
