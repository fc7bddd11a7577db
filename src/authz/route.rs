//! The compiled, first-match route table and the rules each route enforces.

use std::collections::HashMap;

use regex::Regex;

use super::request::CheckInput;

/// Index of an issuer in [`super::Policy::issuers`].
pub type IssuerId = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    DryRun,
}

/// Where a route looks for its client ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIdClaim {
    Aud,
    Azp,
    /// RFC 9068's `client_id`.
    ClientId,
}

impl ClientIdClaim {
    pub const fn name(self) -> &'static str {
        match self {
            ClientIdClaim::Aud => "aud",
            ClientIdClaim::Azp => "azp",
            ClientIdClaim::ClientId => "client_id",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "aud" => Some(ClientIdClaim::Aud),
            "azp" => Some(ClientIdClaim::Azp),
            "client_id" => Some(ClientIdClaim::ClientId),
            _ => None,
        }
    }
}

/// A required role: Keycloak's `realm_access.roles`, or `resource_access.CLIENT.roles`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Realm(String),
    Client { client: String, role: String },
}

impl Role {
    /// `"admin"` is a realm role, `"orders-api:admin"` a client role.
    pub fn parse(s: &str) -> Role {
        match s.split_once(':') {
            Some((client, role)) => Role::Client {
                client: client.to_owned(),
                role: role.to_owned(),
            },
            None => Role::Realm(s.to_owned()),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Realm(r) => write!(f, "{r}"),
            Role::Client { client, role } => write!(f, "{client}:{role}"),
        }
    }
}

#[derive(Debug, Clone)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: matches any name ending with it.
    Suffix(String),
}

impl HostPattern {
    pub fn parse(pattern: &str) -> HostPattern {
        let p = pattern.to_ascii_lowercase();
        match p.strip_prefix('*') {
            Some(suffix) => HostPattern::Suffix(suffix.to_owned()),
            None => HostPattern::Exact(p),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
            HostPattern::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Any,
    Prefix(String),
    Exact(String),
    /// Anchored at both ends, like Envoy's `safe_regex`.
    Regex(Regex),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Match {
    /// Empty: any host.
    pub hosts: Vec<HostPattern>,
    pub path: PathMatch,
    /// Upper-case; empty: any method.
    pub methods: Vec<String>,
}

impl Match {
    pub fn matches(&self, input: &CheckInput<'_>) -> bool {
        self.mismatch(input).is_none()
    }

    /// The first part of the match the request fails (`"host"`, `"path"`, `"method"`).
    pub fn mismatch(&self, input: &CheckInput<'_>) -> Option<&'static str> {
        let host = input.hostname();
        if !(self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host))) {
            return Some("host");
        }
        if !self.path.matches(input.path_only()) {
            return Some("path");
        }
        if !(self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(input.method))) {
            return Some("method");
        }
        None
    }
}

/// One route rule, compiled from the config.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: Match,
    /// Issuers whose tokens this route accepts.
    pub issuers: Vec<IssuerId>,
    pub client_ids: Vec<String>,
    pub client_id_claims: Vec<ClientIdClaim>,
    pub required_scopes: Vec<String>,
    pub required_roles: Vec<Role>,
    pub allow_anonymous: bool,
    pub mode: Mode,
}

impl Route {
    pub fn accepts_issuer(&self, id: IssuerId) -> bool {
        self.issuers.contains(&id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    Deny,
    Allow,
}

/// The routes in file order plus an index by name.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    by_name: HashMap<String, usize>,
    pub default: DefaultAction,
}

/// What route selection found.
#[derive(Debug)]
pub enum Selected<'p> {
    Route(&'p Route),
    /// Nothing matched (or the hinted name is unknown).
    NoRoute {
        hint: Option<String>,
    },
}

impl RouteTable {
    pub fn new(routes: Vec<Route>, default: DefaultAction) -> Self {
        let by_name = routes.iter().enumerate().map(|(i, r)| (r.name.clone(), i)).collect();
        RouteTable {
            routes,
            by_name,
            default,
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn by_name(&self, name: &str) -> Option<&Route> {
        self.by_name.get(name).map(|&i| &self.routes[i])
    }

    /// A route named by the request wins; otherwise the first route whose match applies.
    /// An unknown name never falls back to matching: that would let a typo widen access.
    pub fn select(&self, input: &CheckInput<'_>) -> Selected<'_> {
        if let Some(name) = input.route_hint {
            return match self.by_name(name) {
                Some(r) => Selected::Route(r),
                None => Selected::NoRoute {
                    hint: Some(name.to_owned()),
                },
            };
        }
        match self.routes.iter().find(|r| r.matcher.matches(input)) {
            Some(r) => Selected::Route(r),
            None => Selected::NoRoute { hint: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, hosts: &[&str], path: PathMatch, methods: &[&str]) -> Route {
        Route {
            name: name.into(),
            matcher: Match {
                hosts: hosts.iter().map(|h| HostPattern::parse(h)).collect(),
                path,
                methods: methods.iter().map(|m| m.to_string()).collect(),
            },
            issuers: vec![0],
            client_ids: vec!["c".into()],
            client_id_claims: vec![ClientIdClaim::Aud],
            required_scopes: vec![],
            required_roles: vec![],
            allow_anonymous: false,
            mode: Mode::Enforce,
        }
    }

    fn pick<'t>(table: &'t RouteTable, method: &str, host: &str, path: &str, hint: Option<&str>) -> Option<&'t str> {
        let headers = HashMap::new();
        let input = CheckInput {
            method,
            host,
            path,
            headers: &headers,
            route_hint: hint,
        };
        match table.select(&input) {
            Selected::Route(r) => Some(r.name.as_str()),
            Selected::NoRoute { .. } => None,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(
            vec![
                route(
                    "exact",
                    &["orders.example.com"],
                    PathMatch::Prefix("/api/orders".into()),
                    &["GET", "POST"],
                ),
                route("wild", &["*.example.com"], PathMatch::Exact("/status".into()), &[]),
                route(
                    "re",
                    &[],
                    PathMatch::Regex(Regex::new("^(?:/items/[0-9]+)$").unwrap()),
                    &[],
                ),
                route("catch-all", &[], PathMatch::Prefix("/api".into()), &[]),
            ],
            DefaultAction::Deny,
        )
    }

    #[test]
    fn first_match_wins_in_file_order() {
        let t = table();
        assert_eq!(
            pick(&t, "GET", "orders.example.com", "/api/orders/1", None),
            Some("exact")
        );
        // the same path on another host falls through to the later, broader route
        assert_eq!(
            pick(&t, "GET", "shop.example.com", "/api/orders/1", None),
            Some("catch-all")
        );
        // a method the first route does not list falls through too
        assert_eq!(
            pick(&t, "DELETE", "orders.example.com", "/api/orders/1", None),
            Some("catch-all")
        );
    }

    #[test]
    fn hosts_match_exactly_or_by_wildcard_ignoring_port_and_case() {
        let t = table();
        assert_eq!(
            pick(&t, "GET", "Orders.Example.com:8443", "/api/orders", None),
            Some("exact")
        );
        assert_eq!(pick(&t, "GET", "a.example.com", "/status", None), Some("wild"));
        assert_eq!(pick(&t, "GET", "a.b.example.com:80", "/status", None), Some("wild"));
        assert_eq!(
            pick(&t, "GET", "example.com", "/status", None),
            None,
            "*.x does not match x itself"
        );
        assert_eq!(pick(&t, "GET", "evilexample.com", "/status", None), None);
    }

    #[test]
    fn paths_ignore_the_query_string() {
        let t = table();
        assert_eq!(pick(&t, "GET", "x", "/items/42?a=b", None), Some("re"));
        assert_eq!(pick(&t, "GET", "x", "/items/42/more", None), None, "regex is anchored");
        assert_eq!(pick(&t, "GET", "a.example.com", "/status?x=1", None), Some("wild"));
        assert_eq!(pick(&t, "GET", "a.example.com", "/status/x", None), None, "exact path");
    }

    #[test]
    fn a_named_route_skips_matching_and_an_unknown_name_matches_nothing() {
        let t = table();
        assert_eq!(pick(&t, "GET", "x", "/nothing", Some("wild")), Some("wild"));
        assert_eq!(pick(&t, "GET", "orders.example.com", "/api/orders", Some("nope")), None);
    }
}
