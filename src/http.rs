//! The HTTP authorization endpoint, for Envoy's `http_service`, nginx `auth_request`,
//! ingress-nginx and Traefik ForwardAuth. Any method, any path. The request to decide on is
//! read from the headers of the one proxy `http_endpoint.proxy` names, and only those
//! ([`Original::read`]): a client can send any other convention's headers, and they must not
//! choose what is checked. Allow is exactly 200 (Envoy's rule), with the claim headers in the
//! response; deny carries the same status, challenge and body as gRPC.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State as Extract};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::Response;

use crate::app::State;
use crate::authz::{self, CheckInput, Headers};
use crate::check;
use crate::config::Proxy;

/// Envoy's `http_service` removes the request headers this response header names.
pub const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

pub fn router(state: Arc<State>) -> Router {
    Router::new().fallback(authorize).with_state(state)
}

async fn authorize(Extract(state): Extract<Arc<State>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, _body) = request.into_parts(); // the body is never read
    let headers = header_map(&parts.headers);
    let snapshot = state.snapshot();
    let endpoint = &snapshot.config.http_endpoint;
    let original = Original::read(
        endpoint.proxy,
        parts.method.as_str(),
        &parts.uri,
        &parts.headers,
        &endpoint.path_prefix,
    );
    let policy = &snapshot.config.policy;
    match original {
        Ok(original) => {
            let input = CheckInput {
                method: &original.method,
                host: &original.host,
                path: &original.path,
                headers: Headers::Map(&headers),
                route_hint: None,
            };
            let decision = check::check(&snapshot, &input).await;
            let removal = authz::token_removal(policy, &decision, &input);
            to_http(&authz::respond(policy, &decision), &removal)
        }
        Err(missing) => {
            let description = format!(
                "the request to check is unknown: the {} header that http_endpoint.proxy {} sends is missing or repeated",
                missing,
                endpoint.proxy.name()
            );
            let decision = authz::unreadable_request(description);
            let own_path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let input = CheckInput {
                method: parts.method.as_str(),
                host: "",
                path: own_path,
                headers: Headers::Map(&headers),
                route_hint: None,
            };
            check::record(&snapshot, &decision, &input, started);
            to_http(&authz::respond(policy, &decision), &authz::TokenRemoval::default())
        }
    }
}

/// Lower-case names; repeated headers joined with `,` as Envoy does for gRPC.
fn header_map(headers: &HeaderMap) -> HashMap<String, String> {
    let mut map: HashMap<String, String> = HashMap::with_capacity(headers.len());
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

/// The request the proxy asks about.
#[derive(Debug, PartialEq, Eq)]
struct Original {
    method: String,
    host: String,
    path: String,
}

impl Original {
    /// The request `proxy` describes, from its headers only; `Err` names a header the
    /// convention needs that is missing, empty or sent more than once, spelled as the proxies'
    /// docs spell it (`X-Original-URI`: what an operator looks for in their config; header
    /// lookup ignores case).
    fn read(
        proxy: Proxy,
        method: &str,
        uri: &Uri,
        headers: &HeaderMap,
        prefix: &str,
    ) -> Result<Original, &'static str> {
        let one = |name: &'static str| -> Result<&str, &'static str> {
            let mut values = headers.get_all(name).iter();
            match (values.next(), values.next()) {
                (Some(v), None) => v.to_str().ok().filter(|v| !v.is_empty()).ok_or(name),
                _ => Err(name),
            }
        };
        let original = |method: &str, host: &str, path: &str| Original {
            method: method.to_owned(),
            host: host.to_owned(),
            path: path.to_owned(),
        };
        match proxy {
            Proxy::Envoy => {
                // HTTP/2 (and an absolute-form HTTP/1 target) carry the host in the URI
                let host = match uri.authority() {
                    Some(authority) => authority.as_str(),
                    None => one("Host")?,
                };
                let own_path = uri.path_and_query().map_or("/", |p| p.as_str());
                Ok(original(method, host, &strip_prefix(own_path, prefix)))
            }
            Proxy::Nginx => Ok(original(
                one("X-Original-Method")?,
                one("Host")?,
                one("X-Original-URI")?,
            )),
            Proxy::IngressNginx => {
                let (host, path) = split_url(one("X-Original-URL")?).ok_or("X-Original-URL")?;
                Ok(original(one("X-Original-Method")?, host, path))
            }
            Proxy::Traefik => Ok(original(
                one("X-Forwarded-Method")?,
                one("X-Forwarded-Host")?,
                one("X-Forwarded-Uri")?,
            )),
        }
    }
}

/// `path` without Envoy's `http_service.path_prefix`, which ends at a segment boundary.
fn strip_prefix(path: &str, prefix: &str) -> String {
    let stripped = match path.strip_prefix(prefix) {
        Some(rest) if !prefix.is_empty() && (rest.is_empty() || rest.starts_with(['/', '?'])) => rest,
        _ => path,
    };
    if stripped.starts_with('/') {
        stripped.to_owned()
    } else {
        format!("/{stripped}")
    }
}

/// An absolute URL (ingress-nginx's `X-Original-URL`, `$scheme://$http_host$request_uri`) ->
/// host and path: `https://shop.example.com:8443/api/x?y` -> (`shop.example.com:8443`,
/// `/api/x?y`). Anything that is not an absolute http(s) URL with a host is refused.
fn split_url(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let (host, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    (!host.is_empty() && !host.contains('@')).then_some((host, path))
}

/// The answer for the proxy. `token` lists what carries the token under `token.forward:
/// false`: its headers join `x-envoy-auth-headers-to-remove`, and a cookie source's `Cookie`
/// header comes back rewritten (Envoy copies it when `allowed_upstream_headers` lists
/// `cookie`). Query parameters cannot be removed through this endpoint (docs/security.md).
fn to_http(r: &authz::Response<'_>, token: &authz::TokenRemoval<'_>) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(Body::from(r.body.clone()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let mut removed: Vec<&str> = r.remove_headers.clone();
    removed.extend(&token.headers);
    match token.cookie.as_deref() {
        Some("") => removed.push("cookie"),
        Some(cookie) => {
            if let Ok(v) = HeaderValue::from_str(cookie) {
                headers.insert(axum::http::header::COOKIE, v);
            }
        }
        None => {}
    }
    for (name, value) in &r.upstream_headers {
        match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            (Ok(n), Ok(v)) => {
                headers.insert(n, v);
            }
            _ => removed.push(name),
        }
    }
    if !removed.is_empty()
        && let Ok(v) = HeaderValue::from_str(&removed.join(", "))
    {
        headers.insert(HEADERS_TO_REMOVE, v);
    }
    for (name, value) in &r.client_headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(*name, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(
        proxy: Proxy,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        prefix: &str,
    ) -> Result<Original, &'static str> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Original::read(proxy, method, &uri.parse().unwrap(), &map, prefix)
    }

    fn o(method: &str, host: &str, path: &str) -> Result<Original, &'static str> {
        Ok(Original {
            method: method.into(),
            host: host.into(),
            path: path.into(),
        })
    }

    /// Every convention's headers, as a client could add them to any request.
    const SPOOFED: [(&str, &str); 7] = [
        ("x-forwarded-method", "GET"),
        ("x-forwarded-host", "public.example.com"),
        ("x-forwarded-uri", "/public"),
        ("x-original-method", "GET"),
        ("x-original-uri", "/public"),
        ("x-original-url", "https://public.example.com/public"),
        ("x-envoy-original-path", "/public"),
    ];

    #[test]
    fn envoy_sends_the_original_request_behind_a_prefix() {
        let h = [("host", "shop.example.com")];
        assert_eq!(
            read(Proxy::Envoy, "POST", "/authz/api/orders?id=7", &h, "/authz"),
            o("POST", "shop.example.com", "/api/orders?id=7")
        );
        assert_eq!(
            read(Proxy::Envoy, "GET", "/authz", &h, "/authz"),
            o("GET", "shop.example.com", "/")
        );
        assert_eq!(
            read(Proxy::Envoy, "GET", "/authzx/a", &h, "/authz"),
            o("GET", "shop.example.com", "/authzx/a"),
            "prefix ends at a segment"
        );
        assert_eq!(
            read(Proxy::Envoy, "GET", "/api", &h, ""),
            o("GET", "shop.example.com", "/api")
        );
    }

    #[test]
    fn envoy_over_http2_names_the_host_in_the_authority() {
        // hyper puts HTTP/2's :authority in the URI; there may be no Host header at all
        assert_eq!(
            read(Proxy::Envoy, "GET", "http://admin.example.com/api/orders", &[], ""),
            o("GET", "admin.example.com", "/api/orders")
        );
        assert_eq!(
            read(
                Proxy::Envoy,
                "GET",
                "http://admin.example.com/x",
                &[("host", "public.example.com")],
                ""
            ),
            o("GET", "admin.example.com", "/x"),
            "the authority wins over Host"
        );
        assert_eq!(read(Proxy::Envoy, "GET", "/x", &[], ""), Err("Host"));
    }

    #[test]
    fn envoy_ignores_every_other_conventions_headers() {
        let mut h = vec![("host", "admin.example.com")];
        h.extend(SPOOFED);
        assert_eq!(
            read(Proxy::Envoy, "DELETE", "/strict/secret", &h, ""),
            o("DELETE", "admin.example.com", "/strict/secret")
        );
    }

    #[test]
    fn nginx_reads_only_original_method_and_uri_and_the_host() {
        let mut h = vec![
            ("host", "shop.example.com"),
            ("x-original-method", "DELETE"),
            ("x-original-uri", "/strict/secret?y=1"),
        ];
        h.extend(
            SPOOFED
                .iter()
                .filter(|(k, _)| !k.starts_with("x-original-m") && *k != "x-original-uri"),
        );
        assert_eq!(
            read(Proxy::Nginx, "GET", "/auth", &h, ""),
            o("DELETE", "shop.example.com", "/strict/secret?y=1")
        );
        assert_eq!(
            read(
                Proxy::Nginx,
                "GET",
                "/auth",
                &[("host", "s"), ("x-original-uri", "/a")],
                ""
            ),
            Err("X-Original-Method")
        );
        assert_eq!(
            read(
                Proxy::Nginx,
                "GET",
                "/auth",
                &[("host", "s"), ("x-original-method", "GET")],
                ""
            ),
            Err("X-Original-URI"),
            "X-Original-URL does not stand in for X-Original-URI"
        );
    }

    #[test]
    fn a_repeated_convention_header_is_refused() {
        let h = [
            ("host", "s"),
            ("x-original-method", "GET"),
            ("x-original-uri", "/strict"),
            ("x-original-uri", "/public"),
        ];
        assert_eq!(read(Proxy::Nginx, "GET", "/auth", &h, ""), Err("X-Original-URI"));
    }

    #[test]
    fn ingress_nginx_reads_the_original_url() {
        let h = [
            ("host", "authz"),
            ("x-original-method", "PUT"),
            ("x-original-url", "https://shop.example.com:8443/api/x?y"),
            ("x-original-uri", "/public"),
            ("x-forwarded-uri", "/public"),
        ];
        assert_eq!(
            read(Proxy::IngressNginx, "GET", "/auth", &h, ""),
            o("PUT", "shop.example.com:8443", "/api/x?y")
        );
        let h = [("x-original-method", "GET"), ("x-original-url", "/relative")];
        assert_eq!(read(Proxy::IngressNginx, "GET", "/auth", &h, ""), Err("X-Original-URL"));
        let h = [
            ("x-original-method", "GET"),
            ("x-original-url", "https://shop.example.com"),
        ];
        assert_eq!(
            read(Proxy::IngressNginx, "GET", "/auth", &h, ""),
            o("GET", "shop.example.com", "/")
        );
    }

    #[test]
    fn traefik_reads_only_forwarded_headers() {
        let h = [
            ("host", "authz.internal"),
            ("x-forwarded-method", "DELETE"),
            ("x-forwarded-host", "shop.example.com"),
            ("x-forwarded-uri", "/api/orders/1"),
            ("x-original-uri", "/public"),
            ("x-original-method", "GET"),
        ];
        assert_eq!(
            read(Proxy::Traefik, "GET", "/auth", &h, ""),
            o("DELETE", "shop.example.com", "/api/orders/1")
        );
        assert_eq!(
            read(Proxy::Traefik, "GET", "/auth", &h[..3], ""),
            Err("X-Forwarded-Uri")
        );
    }
}
