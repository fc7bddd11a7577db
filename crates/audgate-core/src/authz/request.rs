//! What the core needs to know about one request, independent of the wire it arrived on.

use std::borrow::Cow;
use std::collections::HashMap;

use super::path;

/// One request to decide on. The gRPC and HTTP adapters fill it from their own types; header
/// names are lower-case (Envoy sends them so), repeated headers joined with `,`.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    pub method: &'a str,
    /// `:authority` / `Host`, possibly with a port.
    pub host: &'a str,
    /// The raw request path, possibly with a query string.
    pub path: &'a str,
    pub headers: Headers<'a>,
    /// A route picked by name (Envoy's `context_extensions["audgate.route"]`).
    pub route_hint: Option<&'a str>,
}

impl<'a> CheckInput<'a> {
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers.get(name)
    }

    /// The host as route matching sees it: without a port and without a trailing dot
    /// (`Shop.example.com.:8443` -> `Shop.example.com`; hosts compare case-insensitively).
    pub fn hostname(&self) -> &'a str {
        strip_port(self.host).trim_end_matches('.')
    }

    /// The path as route matching sees it: without query, percent-encoded unreserved
    /// characters decoded, repeated slashes merged, dot segments resolved ([`path::normalize`]).
    pub fn normalized_path(&self) -> Cow<'a, str> {
        path::normalize(self.path_only())
    }

    /// What route matching compares: method, [`Self::hostname`], [`Self::normalized_path`].
    pub fn target(&self) -> Target<'a> {
        Target {
            method: self.method,
            host: self.hostname(),
            path: self.normalized_path(),
        }
    }

    /// The raw path without query string or fragment.
    pub fn path_only(&self) -> &'a str {
        let end = self.path.find(['?', '#']).unwrap_or(self.path.len());
        &self.path[..end]
    }

    /// The query string (after `?`, before `#`), if any.
    pub fn query(&self) -> Option<&'a str> {
        let start = self.path.find('?')? + 1;
        let rest = &self.path[start..];
        Some(rest.split('#').next().unwrap_or(rest))
    }
}

/// The request's headers as the adapter holds them. Names are lower-case and each appears once
/// (repeated headers joined with `,`); should a name appear twice in `Pairs`, the last counts,
/// as in a decoded protobuf map.
#[derive(Debug, Clone, Copy)]
pub enum Headers<'a> {
    Map(&'a HashMap<String, String>),
    /// Borrowed straight from the wire (the gRPC adapter's lean decode, the Envoy module): no
    /// map is built for the handful of lookups a check makes.
    Pairs(&'a [(&'a str, &'a str)]),
}

impl<'a> Headers<'a> {
    pub fn get(&self, name: &str) -> Option<&'a str> {
        match *self {
            Headers::Map(map) => map.get(name).map(String::as_str),
            Headers::Pairs(pairs) => pairs.iter().rev().find(|(n, _)| *n == name).map(|(_, v)| *v),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every header name (for trace-context extraction and the claim header scan).
    pub fn names(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        let (map, pairs) = match *self {
            Headers::Map(map) => (Some(map), None),
            Headers::Pairs(pairs) => (None, Some(pairs)),
        };
        let from_map = map.into_iter().flat_map(|m| m.keys().map(String::as_str));
        from_map.chain(pairs.into_iter().flat_map(|p| p.iter().map(|(n, _)| *n)))
    }
}

/// The request as route matching sees it, computed once per check.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: Cow<'a, str>,
}

/// `example.com:8443` -> `example.com`; `[::1]:80` -> `[::1]`; a bare IPv6 literal is kept.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[..i].contains(':') => host, // unbracketed IPv6, no port to strip
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(host: &'a str, path: &'a str, headers: &'a HashMap<String, String>) -> CheckInput<'a> {
        CheckInput {
            method: "GET",
            host,
            path,
            headers: Headers::Map(headers),
            route_hint: None,
        }
    }

    #[test]
    fn host_port_is_ignored() {
        let h = HashMap::new();
        assert_eq!(input("example.com:8443", "/", &h).hostname(), "example.com");
        assert_eq!(input("example.com", "/", &h).hostname(), "example.com");
        assert_eq!(input("[::1]:8080", "/", &h).hostname(), "[::1]");
        assert_eq!(input("::1", "/", &h).hostname(), "::1");
    }

    #[test]
    fn a_trailing_dot_is_not_part_of_the_host() {
        let h = HashMap::new();
        assert_eq!(input("shop.example.com.", "/", &h).hostname(), "shop.example.com");
        assert_eq!(input("shop.example.com.:8443", "/", &h).hostname(), "shop.example.com");
        assert_eq!(input("shop.example.com..", "/", &h).hostname(), "shop.example.com");
    }

    #[test]
    fn the_target_has_the_normalized_path() {
        let h = HashMap::new();
        let t = input("A.example.com.", "/public/%2e%2e/strict?x=/../", &h).target();
        assert_eq!((t.host, t.path.as_ref()), ("A.example.com", "/strict"));
    }

    #[test]
    fn pairs_answer_like_the_map_they_stand_for() {
        let pairs = [("a", "1"), ("b", "2"), ("a", "3")];
        let headers = Headers::Pairs(&pairs);
        assert_eq!(headers.get("a"), Some("3"), "the last of a repeated name counts");
        assert_eq!(headers.get("b"), Some("2"));
        assert!(!headers.contains("c"));
        assert_eq!(headers.names().collect::<Vec<_>>(), ["a", "b", "a"]);
    }

    #[test]
    fn query_and_fragment_are_split_off() {
        let h = HashMap::new();
        let i = input("h", "/api/orders?token=abc&x=1#frag", &h);
        assert_eq!(i.path_only(), "/api/orders");
        assert_eq!(i.query(), Some("token=abc&x=1"));
        assert_eq!(input("h", "/a", &h).query(), None);
    }
}
