//! The request checked must be the request served (issue 16): path, host and header confusion
//! through real proxies in front of the real binary.
//!
//! - Envoy 1.40 **without** `normalize_path` (its default), over gRPC, with audgate inside Envoy
//!   (the dynamic module) and over `http_service` with an HTTP/1 and an HTTP/2 cluster: dot segments raw, percent-encoded in any case, with
//!   `;` parameters and above the root, repeated slashes, hosts with case, port and trailing
//!   dot, never reach a protected resource through the anonymous route;
//! - real nginx (`auth_request`) in nginx.org's wiring (`http_endpoint.proxy: nginx`) and in
//!   ingress-nginx's (`proxy: ingress-nginx`): a client's own `X-Original-*` / `X-Forwarded-*`
//!   headers never choose the request that is checked;
//! - a WSGI upstream (Python's wsgiref, which merges `x_auth_subject` into
//!   `HTTP_X_AUTH_SUBJECT`) never sees a client's underscore spelling of a claim header;
//! - `token.forward: false` keeps the token from the upstream (ext_authz and the module).
//!
//! Requests are written on a raw TCP socket: HTTP client libraries resolve dot segments before
//! sending, which would hide exactly what is tested here.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An anonymous `/open`, a protected `/strict`, a host-only `admin.example.com` route before an
/// anonymous `/api`, and orders readable anonymously but written with a token; `default:
/// allow`, the setting under which a wrong route is most dangerous. (Not `/public`: the Envoy
/// test templates turn the check off for `/public` themselves, and Envoy's own prefix match
/// without `normalize_path` is the same confusion one layer earlier.)
fn config(issuer: &str, extra: &str) -> String {
    format!(
        r#"
issuers:
  test:
    issuer: {issuer}
    discovery: true
routes:
  - name: open
    match: {{ path_prefix: /open }}
    allow_anonymous: true
  - name: admin
    match: {{ hosts: [admin.example.com] }}
    client_ids: [api]
  - name: strict
    match: {{ path_prefix: /strict }}
    client_ids: [api]
  - name: orders-read
    match: {{ path_prefix: /orders, methods: [GET] }}
    allow_anonymous: true
  - name: orders-write
    match: {{ path_prefix: /orders }}
    client_ids: [api]
  - name: open-api
    match: {{ path_prefix: /api }}
    allow_anonymous: true
default: allow
{extra}
"#
    )
}

/// One raw HTTP/1.1 request (`Connection: close`); the status and body of the answer.
async fn raw(port: u16, method: &str, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = format!("{method} {target} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str("host: shop.example.com\r\n");
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Waits (up to [`KEYS_READY_TIMEOUT`]) until `GET /strict/x` with `auth` passes through
/// `port`: audgate has loaded the issuer's keys. Panics with `what` and `logs()` on timeout.
async fn wait_allowed(port: u16, auth: &str, what: &str, logs: impl Fn() -> String) {
    let deadline = Instant::now() + KEYS_READY_TIMEOUT;
    while raw(port, "GET", "/strict/x", &[("authorization", auth)]).await.0 != 200 {
        assert!(Instant::now() < deadline, "{what}: keys never loaded\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Paths that name something under `/strict` once resolved, each spelled to look like
/// `/open` (or the root) to a matcher that does not normalize.
const STRICT_SPELLINGS: [&str; 12] = [
    "/open/../strict/x",
    "/open/%2e%2e/strict/x",
    "/open/%2E%2e/strict/x",
    "/open/.%2E/strict/x",
    "/open//../strict/x",
    "/open/./../strict/x",
    "/open;x/../strict/x",
    "/open/..;/strict/x",
    "/open/..;jsessionid=1/strict/x",
    "/../strict/x",
    "/open/../../../strict/x",
    "/%6Fpen/../%73trict/x",
];

/// Hosts that are `admin.example.com` to DNS and to the upstream.
const ADMIN_SPELLINGS: [&str; 5] = [
    "admin.example.com",
    "ADMIN.Example.COM",
    "admin.example.com.",
    "admin.example.com:8080",
    "Admin.Example.Com.:443",
];

/// Every spelling of a protected request is denied without a token, through `port`; the
/// controls pass. `what` names the proxy in messages.
async fn assert_no_confusion(port: u16, what: &str, logs: impl Fn() -> String) {
    for path in STRICT_SPELLINGS {
        let (status, body) = raw(port, "GET", path, &[]).await;
        assert_eq!(status, 401, "{what}: GET {path} without a token\n{body}\n{}", logs());
        assert!(body.contains("missing_token"), "{what}: {path}: {body}");
    }
    for host in ADMIN_SPELLINGS {
        let (status, body) = raw(port, "GET", "/api/orders", &[("host", host)]).await;
        assert_eq!(
            status,
            401,
            "{what}: GET /api/orders for host {host}\n{body}\n{}",
            logs()
        );
    }
    // controls: the anonymous routes still work, and an encoded slash stays one segment
    for path in ["/open/x", "/open/a/../b", "/api/orders", "/open%2F..%2Fstrict"] {
        let (status, body) = raw(port, "GET", path, &[]).await;
        assert_eq!(status, 200, "{what}: GET {path}\n{body}\n{}", logs());
    }
    let (status, _) = raw(port, "GET", "/api/orders", &[("host", "shop.example.com.")]).await;
    assert_eq!(
        status, 200,
        "{what}: another host with a trailing dot reaches the open route"
    );
}

/// Envoy over gRPC ext_authz, and audgate inside Envoy (the dynamic module, which reads Envoy's
/// `:path` and `:authority` as the CheckRequest carries them): the same cases in both.
#[tokio::test]
async fn envoy_without_normalize_path_checks_the_resolved_path_and_host_in_both_modes() {
    let key = TestKey::rsa("k1");
    for mode in [Mode::ExtAuthz, Mode::Module] {
        let stack = ModeStack::start(mode, &[&key], |iss| config(iss, "")).await;
        let token = key.mint(merge(
            keycloak_claims(&stack.issuer.issuer_url(), "web"),
            json!({"aud": "api"}),
        ));
        stack.wait_ready("/strict/x", &token).await;
        let rendered = std::fs::read_to_string(&stack.envoy.config_path).unwrap();
        assert!(!rendered.contains("normalize_path"), "this Envoy must not normalize");
        let what = format!("envoy {mode:?}");
        assert_no_confusion(stack.envoy.ports.listen, &what, || stack.logs()).await;
    }
}

#[tokio::test]
async fn envoy_http_service_over_http1_and_http2_checks_the_resolved_path_and_host() {
    let key = TestKey::rsa("k1");
    let issuer = IssuerServer::start(&[&key]).await;
    let echo = EchoServer::start().await;
    let audgate = Audgate::start(&config(&issuer.issuer_url(), "http_endpoint: {path_prefix: /authz}")).await;
    let token = key.mint(merge(
        keycloak_claims(&issuer.issuer_url(), "web"),
        json!({"aud": "api"}),
    ));
    for http2 in [false, true] {
        let ports = EnvoyPorts {
            listen: free_port(),
            admin: free_port(),
            audgate_grpc: 0,
            upstream: echo.port(),
        };
        let mut rendered = render_envoy_http_config(&ports, audgate.ports.http);
        if http2 {
            rendered = rendered.replace("http_protocol_options: {}", "http2_protocol_options: {}");
        }
        let envoy = Envoy::start_rendered(ports, &rendered).await;
        let what = if http2 {
            "envoy http_service h2"
        } else {
            "envoy http_service h1"
        };
        let auth = bearer(&token);
        wait_allowed(envoy.ports.listen, &auth, what, || audgate.logs()).await;
        assert_no_confusion(envoy.ports.listen, what, || {
            format!("{}\n{}", audgate.logs(), envoy.logs())
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// nginx auth_request
// ---------------------------------------------------------------------------------------------

fn nginx_binary() -> String {
    for candidate in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(candidate).exists() {
            return candidate.to_owned();
        }
    }
    panic!("nginx is not installed: run scripts/install-nginx.sh (scripts/test.sh does)");
}

/// How nginx tells audgate about the original request.
#[derive(Clone, Copy, Debug)]
enum Wiring {
    /// nginx.org's `auth_request` recipe, with the method added: `X-Original-URI $request_uri`,
    /// `X-Original-Method $request_method`, `Host $host`.
    NginxOrg,
    /// ingress-nginx's auth location: `X-Original-URL $scheme://$http_host$request_uri`,
    /// `X-Original-Method $request_method`.
    IngressNginx,
}

/// A real nginx on a free loopback port: every location behind `auth_request` to audgate's HTTP
/// endpoint, then proxied to `upstream`. Killed on drop.
struct Nginx {
    port: u16,
    process: TestProcess,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(wiring: Wiring, audgate_http: u16, upstream: u16) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let headers = match wiring {
            Wiring::NginxOrg => {
                "proxy_set_header X-Original-URI $request_uri;\n      proxy_set_header X-Original-Method $request_method;\n      proxy_set_header Host $host;"
            }
            Wiring::IngressNginx => {
                "proxy_set_header X-Original-URL $scheme://$http_host$request_uri;\n      proxy_set_header X-Original-Method $request_method;\n      proxy_set_header Host $host;"
            }
        };
        let conf = format!(
            r#"
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      auth_request /_audgate;
      # the verified claims travel upstream as nginx.org documents: copied from the answer
      auth_request_set $auth_subject $upstream_http_x_auth_subject;
      auth_request_set $auth_client_id $upstream_http_x_auth_client_id;
      proxy_set_header x-auth-subject $auth_subject;
      proxy_set_header x-auth-client-id $auth_client_id;
      proxy_pass http://127.0.0.1:{upstream};
    }}
    location = /_audgate {{
      internal;
      proxy_pass http://127.0.0.1:{audgate_http}/auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      {headers}
    }}
  }}
}}
"#,
            dir = dir.path().display()
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut command = Command::new(nginx_binary());
        command.arg("-p").arg(dir.path()).arg("-c").arg(&conf_path);
        let mut process = TestProcess::spawn("nginx", command, dir.path());
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if let Some(exit) = process.exited() {
                panic!("nginx exited ({exit})\n{}", process.logs());
            }
            assert!(Instant::now() < deadline, "nginx did not listen\n{}", process.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Nginx {
            port,
            process,
            _dir: dir,
        }
    }
}

/// The client headers of every convention, pointing at the anonymous route.
const SPOOFED: [(&str, &str); 7] = [
    ("X-Original-URI", "/open"),
    ("X-Original-URL", "http://shop.example.com/open"),
    ("X-Original-Method", "GET"),
    ("X-Forwarded-Uri", "/open"),
    ("X-Forwarded-Method", "GET"),
    ("X-Forwarded-Host", "shop.example.com"),
    ("X-Forwarded-Prefix", "/open"),
];

#[tokio::test]
async fn nginx_auth_request_in_both_wirings_checks_the_request_nginx_serves() {
    let key = TestKey::rsa("k1");
    let issuer = IssuerServer::start(&[&key]).await;
    let echo = EchoServer::start().await;
    let claims = merge(keycloak_claims(&issuer.issuer_url(), "web"), json!({"aud": "api"}));
    let sub = claims["sub"].clone();
    let token = key.mint(claims);
    for (wiring, proxy) in [(Wiring::NginxOrg, "nginx"), (Wiring::IngressNginx, "ingress-nginx")] {
        let extra = format!("http_endpoint: {{proxy: {proxy}}}");
        let audgate = Audgate::start(&config(&issuer.issuer_url(), &extra)).await;
        let nginx = Nginx::start(wiring, audgate.ports.http, echo.port()).await;
        let logs = || format!("{}\n{}", audgate.logs(), nginx.process.logs());
        let auth = bearer(&token);
        wait_allowed(nginx.port, &auth, proxy, logs).await;
        // every spoofed header, alone and all together, on a protected path and method
        let mut sets: Vec<Vec<(&str, &str)>> = SPOOFED.iter().map(|h| vec![*h]).collect();
        sets.push(SPOOFED.to_vec());
        for spoofed in &sets {
            let (status, body) = raw(nginx.port, "GET", "/strict/secret", spoofed).await;
            assert_eq!(
                status,
                401,
                "{proxy}: GET /strict/secret with {spoofed:?}\n{body}\n{}",
                logs()
            );
            let (status, body) = raw(nginx.port, "DELETE", "/orders/1", spoofed).await;
            assert_eq!(
                status,
                401,
                "{proxy}: DELETE /orders/1 with {spoofed:?}\n{body}\n{}",
                logs()
            );
        }
        // dot segments in $request_uri (nginx itself serves the resolved path)
        for path in STRICT_SPELLINGS {
            let (status, body) = raw(nginx.port, "GET", path, &[]).await;
            assert!(
                status == 401 || status == 400,
                "{proxy}: GET {path} without a token gave {status}\n{body}\n{}",
                logs()
            );
        }
        let (status, _) = raw(nginx.port, "GET", "/api/orders", &[("host", "ADMIN.example.com.")]).await;
        assert_eq!(status, 401, "{proxy}: the admin host in another spelling");
        // controls
        let (status, body) = raw(nginx.port, "GET", "/orders/1", &[]).await;
        assert_eq!(status, 200, "{proxy}: GET /orders/1 is anonymous\n{body}\n{}", logs());
        let (status, body) = raw(nginx.port, "DELETE", "/orders/1", &[("authorization", &auth)]).await;
        assert_eq!(status, 200, "{proxy}: DELETE with a token\n{body}\n{}", logs());
        // the claims audgate verified reach the upstream; a client's own copies do not
        let spoofed = [
            ("authorization", auth.as_str()),
            ("x-auth-subject", "admin"),
            ("x-auth-client-id", "evil"),
        ];
        let (status, body) = raw(nginx.port, "GET", "/strict/x", &spoofed).await;
        assert_eq!(status, 200, "{proxy}: {body}");
        let seen: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{proxy}: {e}: {body}"));
        assert_eq!(seen["headers"]["x-auth-subject"], sub, "{proxy}: {seen}");
        assert_eq!(seen["headers"]["x-auth-client-id"], "api", "{proxy}: {seen}");
        // on an anonymous route audgate sets none, so nginx sends them empty: never the client's
        let (status, body) = raw(nginx.port, "GET", "/orders/1", &spoofed[1..]).await;
        assert_eq!(status, 200, "{proxy}: {body}");
        let seen: Value = serde_json::from_str(&body).unwrap();
        assert!(
            seen["headers"].get("x-auth-subject").is_none_or(|v| v == ""),
            "{proxy}: a client's x-auth-subject reached the upstream: {seen}"
        );
    }
}

#[tokio::test]
async fn a_proxy_header_that_is_missing_is_a_deny_naming_it() {
    let key = TestKey::rsa("k1");
    let issuer = IssuerServer::start(&[&key]).await;
    let audgate = Audgate::start(&config(&issuer.issuer_url(), "http_endpoint: {proxy: nginx}")).await;
    // straight to the endpoint, as a misconfigured nginx would: X-Original-Method is not sent
    let (status, body) = raw(audgate.ports.http, "GET", "/auth", &[("x-original-uri", "/open/x")]).await;
    assert_eq!(status, 403, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "no_route");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("X-Original-Method"),
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------------
// Claim headers spelled with underscores, against a WSGI upstream
// ---------------------------------------------------------------------------------------------

/// Python's wsgiref server answering with every `HTTP_*` variable of the WSGI environ: the
/// upstream kind that merges `x_auth_subject` with `x-auth-subject`.
const WSGI_APP: &str = r#"
import json, sys
from wsgiref.simple_server import make_server, WSGIRequestHandler

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

def app(environ, start_response):
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    body = json.dumps(seen).encode()
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
    return [body]

make_server("127.0.0.1", int(sys.argv[1]), app, handler_class=Quiet).serve_forever()
"#;

#[tokio::test]
async fn underscore_spellings_of_claim_headers_never_reach_a_wsgi_upstream() {
    let key = TestKey::rsa("k1");
    let issuer = IssuerServer::start(&[&key]).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("upstream.py");
    std::fs::write(&script, WSGI_APP).unwrap();
    let upstream_port = free_port();
    let mut command = Command::new("python3");
    command.arg(&script).arg(upstream_port.to_string());
    let mut upstream = TestProcess::spawn("wsgi", command, dir.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", upstream_port)).await.is_err() {
        assert!(upstream.exited().is_none(), "wsgi upstream exited\n{}", upstream.logs());
        assert!(Instant::now() < deadline, "wsgi upstream did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let audgate = Audgate::start(&config(&issuer.issuer_url(), "http_endpoint: {path_prefix: /authz}")).await;
    let claims = merge(keycloak_claims(&issuer.issuer_url(), "web"), json!({"aud": "api"}));
    let sub = claims["sub"].clone();
    let token = key.mint(claims);
    let auth = bearer(&token);
    let grpc = Envoy::start(audgate.ports.grpc, upstream_port).await;
    let http = Envoy::start_http(audgate.ports.http, upstream_port).await;
    for (what, envoy) in [("grpc", &grpc), ("http_service", &http)] {
        wait_allowed(envoy.ports.listen, &auth, what, || audgate.logs()).await;
        let spoofed = [
            ("x_auth_subject", "admin"),
            ("X_Auth_Subject", "root"),
            ("x-auth_subject", "admin2"),
            ("x_auth_client_id", "evil"),
            ("x-auth_client-id", "evil2"),
            ("x_auth_issuer", "https://evil"),
        ];
        // with a valid token: only the verified claims arrive
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(spoofed);
        let (status, body) = raw(envoy.ports.listen, "GET", "/strict/x", &headers).await;
        assert_eq!(status, 200, "{what}: {body}\n{}", envoy.logs());
        let seen: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        assert_eq!(seen["HTTP_X_AUTH_SUBJECT"], sub, "{what}: {seen}");
        assert_eq!(seen["HTTP_X_AUTH_CLIENT_ID"], "api", "{what}: {seen}");
        assert_eq!(seen["HTTP_X_AUTH_ISSUER"], issuer.issuer_url(), "{what}: {seen}");
        // on an anonymous route: none of them arrive at all
        let (status, body) = raw(envoy.ports.listen, "GET", "/api/x", &spoofed).await;
        assert_eq!(status, 200, "{what}: {body}");
        let seen: Value = serde_json::from_str(&body).unwrap();
        for name in ["HTTP_X_AUTH_SUBJECT", "HTTP_X_AUTH_CLIENT_ID", "HTTP_X_AUTH_ISSUER"] {
            assert!(seen.get(name).is_none(), "{what}: {name} reached the upstream: {seen}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// token.forward: false
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn forward_false_keeps_the_token_from_the_upstream_in_both_modes() {
    let key = TestKey::rsa("k1");
    for mode in [Mode::ExtAuthz, Mode::Module] {
        let stack = ModeStack::start(mode, &[&key], |iss| {
            config(
                iss,
                "token:\n  sources: [authorization, {cookie: session}, {query: access_token}]\n  forward: false",
            )
        })
        .await;
        let claims = merge(
            keycloak_claims(&stack.issuer.issuer_url(), "web"),
            json!({"aud": "api"}),
        );
        let sub = claims["sub"].clone();
        let token = key.mint(claims);
        stack.wait_ready("/strict/x", &token).await;
        let port = stack.envoy.ports.listen;
        let upstream =
            |body: &str| -> Value { serde_json::from_str(body).unwrap_or_else(|e| panic!("{mode:?}: {e}: {body}")) };

        let auth = bearer(&token);
        let (status, body) = raw(port, "GET", "/strict/x", &[("authorization", &auth)]).await;
        assert_eq!(status, 200, "{mode:?}: {body}");
        let seen = upstream(&body);
        assert!(seen["headers"].get("authorization").is_none(), "{mode:?}: {seen}");
        assert_eq!(seen["headers"]["x-auth-subject"], sub, "{mode:?}");

        let cookie = format!("theme=dark; session={token}; lang=en");
        let (status, body) = raw(port, "GET", "/strict/x", &[("cookie", &cookie)]).await;
        assert_eq!(status, 200, "{mode:?}: {body}");
        assert_eq!(
            upstream(&body)["headers"]["cookie"],
            "theme=dark; lang=en",
            "{mode:?}: {body}"
        );

        let target = format!("/strict/x?a=1&access_token={token}&b=2");
        let (status, body) = raw(port, "GET", &target, &[]).await;
        assert_eq!(status, 200, "{mode:?}: {body}");
        assert_eq!(upstream(&body)["path"], "/strict/x?a=1&b=2", "{mode:?}");
    }
}
