//! The HTTP authorization endpoint, for Envoy's `http_service`, nginx `auth_request` and
//! Traefik ForwardAuth. Any method, any path. The request to decide on is read from Traefik's
//! `X-Forwarded-Method/-Uri/-Host` if present, else nginx's `X-Original-Method/-URI` (or
//! ingress-nginx's `X-Original-URL`), else the request itself minus `http_endpoint.path_prefix`
//! (Envoy sends the original method, Host and path). Allow is exactly 200 (Envoy's rule), with
//! the claim headers in the response; deny carries the same status, challenge and body as gRPC.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State as Extract};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;

use crate::app::State;
use crate::authz::{self, CheckInput};
use crate::check;

/// Envoy's `http_service` removes the request headers this response header names.
pub const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

pub fn router(state: Arc<State>) -> Router {
    Router::new().fallback(authorize).with_state(state)
}

async fn authorize(Extract(state): Extract<Arc<State>>, request: Request) -> Response {
    let (parts, _body) = request.into_parts(); // the body is never read
    let headers = header_map(&parts.headers);
    let snapshot = state.snapshot();
    let own_path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let original = Original::from_request(
        parts.method.as_str(),
        own_path,
        &headers,
        &snapshot.config.http_endpoint.path_prefix,
    );
    let input = CheckInput {
        method: &original.method,
        host: &original.host,
        path: &original.path,
        headers: &headers,
        route_hint: None,
    };
    let decision = check::check(&snapshot, &input).await;
    to_http(&authz::respond(&snapshot.config.policy, &decision))
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
    fn from_request(method: &str, path: &str, headers: &HashMap<String, String>, prefix: &str) -> Original {
        let h = |name: &str| headers.get(name).map(String::as_str).filter(|v| !v.is_empty());
        let own_host = h("host").unwrap_or_default();
        let pick = |method_h: Option<&str>, host: Option<&str>, path: Option<&str>| Original {
            method: method_h.unwrap_or(method).to_owned(),
            host: host.unwrap_or(own_host).to_owned(),
            path: path.unwrap_or("/").to_owned(),
        };
        if h("x-forwarded-uri").is_some() || h("x-forwarded-method").is_some() {
            return pick(h("x-forwarded-method"), h("x-forwarded-host"), h("x-forwarded-uri"));
        }
        if ["x-original-uri", "x-original-url", "x-original-method"]
            .iter()
            .any(|n| h(n).is_some())
        {
            let (url_host, url_path) = h("x-original-url").map(split_url).unwrap_or((None, None));
            return pick(h("x-original-method"), url_host, h("x-original-uri").or(url_path));
        }
        let stripped = match path.strip_prefix(prefix) {
            Some(rest) if !prefix.is_empty() && (rest.is_empty() || rest.starts_with(['/', '?'])) => rest,
            _ => path,
        };
        let path = if stripped.starts_with('/') {
            stripped.to_owned()
        } else {
            format!("/{stripped}")
        };
        Original {
            method: method.to_owned(),
            host: own_host.to_owned(),
            path,
        }
    }
}

/// `https://shop.example.com:8443/api/x?y` -> (`shop.example.com:8443`, `/api/x?y`).
fn split_url(url: &str) -> (Option<&str>, Option<&str>) {
    let Some((_, rest)) = url.split_once("://") else {
        return (None, Some(url));
    };
    match rest.find(['/', '?']) {
        Some(i) => (Some(&rest[..i]), Some(&rest[i..])),
        None => (Some(rest), None),
    }
}

fn to_http(r: &authz::Response<'_>) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(Body::from(r.body.clone()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let mut removed: Vec<&str> = r.remove_headers.clone();
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

    fn original(method: &str, path: &str, headers: &[(&str, &str)], prefix: &str) -> Original {
        let map = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Original::from_request(method, path, &map, prefix)
    }

    fn o(method: &str, host: &str, path: &str) -> Original {
        Original {
            method: method.into(),
            host: host.into(),
            path: path.into(),
        }
    }

    #[test]
    fn envoy_sends_the_original_request_behind_a_prefix() {
        let h = [("host", "shop.example.com")];
        assert_eq!(
            original("POST", "/authz/api/orders?id=7", &h, "/authz"),
            o("POST", "shop.example.com", "/api/orders?id=7")
        );
        assert_eq!(
            original("GET", "/authz", &h, "/authz"),
            o("GET", "shop.example.com", "/")
        );
        assert_eq!(
            original("GET", "/authzx/a", &h, "/authz"),
            o("GET", "shop.example.com", "/authzx/a"),
            "prefix ends at a segment"
        );
        assert_eq!(original("GET", "/api", &h, ""), o("GET", "shop.example.com", "/api"));
    }

    #[test]
    fn traefik_forwarded_headers_win_over_nginx_and_the_request() {
        let h = [
            ("host", "authz.internal"),
            ("x-forwarded-method", "DELETE"),
            ("x-forwarded-host", "shop.example.com"),
            ("x-forwarded-uri", "/api/orders/1"),
            ("x-original-uri", "/ignored"),
        ];
        assert_eq!(
            original("GET", "/auth", &h, ""),
            o("DELETE", "shop.example.com", "/api/orders/1")
        );
    }

    #[test]
    fn nginx_original_uri_and_ingress_nginx_original_url() {
        let h = [
            ("host", "shop.example.com"),
            ("x-original-uri", "/api/x?y=1"),
            ("x-original-method", "PUT"),
        ];
        assert_eq!(
            original("GET", "/auth", &h, ""),
            o("PUT", "shop.example.com", "/api/x?y=1")
        );
        let h = [
            ("host", "authz"),
            ("x-original-url", "https://shop.example.com:8443/api/x?y"),
        ];
        assert_eq!(
            original("GET", "/auth", &h, ""),
            o("GET", "shop.example.com:8443", "/api/x?y")
        );
    }
}
