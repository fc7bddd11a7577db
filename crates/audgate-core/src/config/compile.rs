//! Raw config -> runtime types, collecting every semantic error with its position.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;

use super::raw::{self, ProxyKeyword, RawConfig, RawDuration, RawIssuer, RawRoute, RawSource, S};
use super::{Config, Diagnostic, KeySource, KeySourceConfig, Listen, Proxy, lint};
use crate::authz::conditions::ClaimCondition;
use crate::authz::route::{ClientIdClaim, HostPattern, Match, Mode, PathMatch, Role};
use crate::authz::tenant::{self, TenantSet, TenantTemplate};
use crate::authz::{
    Alg, ClaimHeader, ClaimValue, DefaultAction, Issuer, Policy, Route, RouteTable, TokenConfig, TokenSource,
};

const DEFAULT_ALGORITHMS: [Alg; 2] = [Alg::RS256, Alg::ES256];
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(30);
const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Collects diagnostics while compiling.
#[derive(Default)]
pub(super) struct Diagnostics {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn error<T>(&mut self, at: &S<T>, message: impl Into<String>) {
        self.errors.push(diag(at, message));
    }

    pub fn warn<T>(&mut self, at: &S<T>, message: impl Into<String>) {
        self.warnings.push(diag(at, message));
    }
}

fn diag<T>(at: &S<T>, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        line: at.referenced.line(),
        column: at.referenced.column(),
        message: message.into(),
    }
}

/// A parser or type error from serde-saphyr, as one diagnostic.
pub fn yaml_error(e: &serde_saphyr::Error) -> Diagnostic {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut message = e.without_snippet().to_string();
    // serde-saphyr prefixes "line L column C: " (or "error: ..."); we print our own position.
    if let Some(rest) = message.strip_prefix("error: ") {
        message = rest.to_owned();
    }
    let prefix = format!("line {line} column {column}: ");
    if let Some(rest) = message.strip_prefix(&prefix) {
        message = rest.to_owned();
    }
    let mut message = message.lines().next().unwrap_or_default().trim().to_owned();
    for suffix in [
        format!(" at line {line}, column {column}"),
        ", set DuplicateKeyPolicy in Options if acceptable".to_owned(),
    ] {
        if let Some(i) = message.rfind(&suffix) {
            message.replace_range(i..i + suffix.len(), "");
        }
    }
    Diagnostic { line, column, message }
}

pub(super) fn compile(raw: RawConfig, text: &str) -> Result<(Config, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut d = Diagnostics::default();
    let listen = listen(&raw.listen, &mut d);
    let (issuers, key_sources) = issuers(&raw, &mut d);
    let token = token(raw.token.as_ref(), &mut d);
    let claim_headers = claim_headers(raw.claim_headers.as_ref(), &mut d);
    let templates = templates(&raw, &mut d);
    let mut routes = routes(&raw, &issuers, &mut d);
    route_tenants(&raw, &mut routes, &templates, &mut d);
    let log_decisions = match raw.logging.as_ref().and_then(|l| l.decisions) {
        None | Some(raw::DecisionsKeyword::Denials) => super::LogDecisions::Denials,
        Some(raw::DecisionsKeyword::All) => super::LogDecisions::All,
        Some(raw::DecisionsKeyword::Off) => super::LogDecisions::Off,
    };
    let http_endpoint = http_endpoint(raw.http_endpoint.as_ref(), &mut d);
    let tracing = raw.tracing.as_ref().map(|t| tracing(t, &mut d));
    if !d.errors.is_empty() {
        return Err(d.errors);
    }
    lint::routes(&raw.routes, &routes, &mut d);
    lint::issuers(&raw, &mut d);
    let default = match raw.default {
        Some(raw::DefaultKeyword::Allow) => DefaultAction::Allow,
        _ => DefaultAction::Deny,
    };
    let policy = Policy::new(issuers, token, claim_headers, RouteTable::new(routes, default)).with_templates(templates);
    let config = Config {
        listen,
        policy,
        key_sources,
        http_endpoint,
        log_decisions,
        admin_explain: raw.admin.explain,
        token_cache: raw.token_cache.map_or_else(Default::default, |t| {
            let defaults = super::TokenCacheConfig::default();
            super::TokenCacheConfig {
                max_entries: t
                    .max_entries
                    .map_or(defaults.max_entries, |n| usize::try_from(n).unwrap_or(usize::MAX)),
                max_bytes: t.max_bytes.unwrap_or(defaults.max_bytes),
            }
        }),
        hash: hash_text(text),
        tracing,
    };
    Ok((config, d.warnings))
}

/// The config's identity: the first 64 bits of SHA-256 of the file, in hex.
pub fn hash_text(text: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn http_endpoint(raw: Option<&raw::RawHttpEndpoint>, d: &mut Diagnostics) -> super::HttpEndpoint {
    let Some(raw) = raw else {
        return super::HttpEndpoint::default();
    };
    let proxy = match raw.proxy.as_ref().map(|p| p.value) {
        None | Some(ProxyKeyword::Envoy) => Proxy::Envoy,
        Some(ProxyKeyword::Nginx) => Proxy::Nginx,
        Some(ProxyKeyword::IngressNginx) => Proxy::IngressNginx,
        Some(ProxyKeyword::Traefik) => Proxy::Traefik,
    };
    let Some(prefix) = &raw.path_prefix else {
        return super::HttpEndpoint {
            proxy,
            path_prefix: String::new(),
        };
    };
    if !prefix.value.starts_with('/') {
        d.error(
            prefix,
            format!("http_endpoint.path_prefix `{}` must start with /", prefix.value),
        );
    }
    if proxy != Proxy::Envoy {
        d.warn(
            prefix,
            format!(
                "http_endpoint.path_prefix is for Envoy's http_service; with proxy: {} the path comes from its headers and the prefix is not used",
                proxy.name()
            ),
        );
    }
    super::HttpEndpoint {
        proxy,
        path_prefix: prefix.value.trim_end_matches('/').to_owned(),
    }
}

fn listen(raw: &raw::RawListen, d: &mut Diagnostics) -> Listen {
    let mut listen = Listen::default();
    for (value, slot, name) in [
        (&raw.grpc, &mut listen.grpc, "grpc"),
        (&raw.http, &mut listen.http, "http"),
        (&raw.admin, &mut listen.admin, "admin"),
    ] {
        if let Some(v) = value {
            match v.value.parse::<SocketAddr>() {
                Ok(addr) => *slot = addr,
                Err(_) => d.error(
                    v,
                    format!("listen.{name}: `{}` is not an address like 0.0.0.0:9191", v.value),
                ),
            }
        }
    }
    listen.tls = raw.tls.as_ref().map(|t| tls(t, d));
    listen
}

fn tls(raw: &S<raw::RawTls>, d: &mut Diagnostics) -> super::TlsConfig {
    let t = &raw.value;
    let mut path = |v: &S<String>, name: &str| {
        if v.value.trim().is_empty() {
            d.error(v, format!("listen.tls.{name} is empty"));
        }
        PathBuf::from(&v.value)
    };
    let cert_file = path(&t.cert_file, "cert_file");
    let key_file = path(&t.key_file, "key_file");
    let client_ca_file = t.client_ca_file.as_ref().map(|v| path(v, "client_ca_file"));
    let mut client_sans = Vec::new();
    if let Some(sans) = &t.client_sans {
        if client_ca_file.is_none() && !sans.value.is_empty() {
            d.error(
                sans,
                "listen.tls.client_sans needs listen.tls.client_ca_file: without a client CA no client certificate is asked for",
            );
        }
        for san in &sans.value {
            if san.value.trim().is_empty() || san.value.chars().any(char::is_whitespace) {
                d.error(
                    san,
                    format!("listen.tls.client_sans: `{}` is not a URI or DNS name", san.value),
                );
            }
            client_sans.push(san.value.clone());
        }
    }
    super::TlsConfig {
        cert_file,
        key_file,
        client_ca_file,
        client_sans,
    }
}

fn tracing(raw: &S<raw::RawTracing>, d: &mut Diagnostics) -> super::TracingConfig {
    use super::TracingConfig as T;
    let t = &raw.value;
    let otlp_endpoint = t.otlp_endpoint.as_ref().map_or(T::DEFAULT_ENDPOINT.to_owned(), |e| {
        let value = e.value.trim_end_matches('/');
        let rest = value.strip_prefix("http://");
        if rest.is_none_or(|r| r.is_empty() || r.contains('/')) {
            d.error(
                e,
                format!(
                    "tracing.otlp_endpoint: `{}` is not an OTLP/gRPC address like http://otel-collector:4317 (plain http://: send to a collector on the node or in the pod for TLS)",
                    e.value
                ),
            );
        }
        value.to_owned()
    });
    let sample_ratio = t.sample_ratio.as_ref().map_or(T::DEFAULT_SAMPLE_RATIO, |r| {
        if !(0.0..=1.0).contains(&r.value) {
            d.error(r, format!("tracing.sample_ratio: {} is not between 0 and 1", r.value));
        }
        r.value
    });
    let service_name = t.service_name.as_ref().map_or(T::DEFAULT_SERVICE_NAME.to_owned(), |s| {
        if s.value.trim().is_empty() {
            d.error(s, "tracing.service_name is empty");
        }
        s.value.clone()
    });
    T {
        otlp_endpoint,
        sample_ratio,
        service_name,
    }
}

/// `30s`, `5m`, `1h 30m` (humantime) or plain seconds.
pub fn parse_duration(raw: &RawDuration) -> Result<Duration, String> {
    match raw {
        RawDuration::Seconds(s) => Ok(Duration::from_secs(*s)),
        RawDuration::Text(t) => {
            humantime::parse_duration(t.trim()).map_err(|e| format!("`{t}` is not a duration like 30s or 5m: {e}"))
        }
    }
}

fn duration(raw: Option<&S<RawDuration>>, default: Duration, what: &str, d: &mut Diagnostics) -> Duration {
    let Some(v) = raw else { return default };
    match parse_duration(&v.value) {
        Ok(dur) => dur,
        Err(e) => {
            d.error(v, format!("{what}: {e}"));
            default
        }
    }
}

fn is_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://")
}

fn issuers(raw: &RawConfig, d: &mut Diagnostics) -> (Vec<Issuer>, Vec<KeySourceConfig>) {
    let mut issuers = Vec::new();
    let mut sources = Vec::new();
    let mut seen_iss = HashSet::new();
    for (name, spanned) in &raw.issuers {
        let i: &RawIssuer = &spanned.value;
        let what = format!("issuer {name}");
        if i.issuer.value.is_empty() {
            d.error(&i.issuer, format!("{what}: `issuer` is empty"));
        }
        for iss in std::iter::once(&i.issuer).chain(&i.issuer_aliases) {
            if !iss.value.is_empty() && !seen_iss.insert(iss.value.clone()) {
                d.error(
                    iss,
                    format!(
                        "{what}: `{}` is already the issuer or alias of another issuer",
                        iss.value
                    ),
                );
            }
        }
        let source = key_source(name, spanned, d);
        let algorithms = match &i.algorithms {
            None => DEFAULT_ALGORITHMS.to_vec(),
            Some(list) => {
                let mut algs = Vec::new();
                for a in list {
                    match Alg::from_name(&a.value) {
                        Some(alg) => algs.push(alg),
                        None if a.value.eq_ignore_ascii_case("none") || a.value.to_ascii_uppercase().starts_with("HS") => {
                            d.error(a, format!("{what}: `{}` is never accepted with JWKS keys", a.value))
                        }
                        None => d.error(
                            a,
                            format!(
                                "{what}: unknown algorithm `{}`; one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA",
                                a.value
                            ),
                        ),
                    }
                }
                if list.is_empty() {
                    d.error(spanned, format!("{what}: `algorithms` is empty"));
                }
                algs
            }
        };
        let leeway = duration(i.leeway.as_ref(), DEFAULT_LEEWAY, &format!("{what}: leeway"), d);
        let refresh_interval = duration(
            i.refresh_interval.as_ref(),
            DEFAULT_REFRESH,
            &format!("{what}: refresh_interval"),
            d,
        );
        let min_refresh_interval = duration(
            i.min_refresh_interval.as_ref(),
            DEFAULT_MIN_REFRESH,
            &format!("{what}: min_refresh_interval"),
            d,
        );
        if refresh_interval.is_zero()
            && let Some(r) = &i.refresh_interval
        {
            d.error(r, format!("{what}: refresh_interval must be above zero"));
        }
        issuers.push(Issuer {
            name: name.clone(),
            issuer: i.issuer.value.clone(),
            aliases: i.issuer_aliases.iter().map(|a| a.value.clone()).collect(),
            algorithms,
            leeway: i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX),
        });
        sources.push(KeySourceConfig {
            source,
            refresh_interval,
            min_refresh_interval,
            ca_file: i.ca_file.as_ref().map(|c| PathBuf::from(&c.value)),
        });
    }
    (issuers, sources)
}

fn key_source(name: &str, spanned: &S<RawIssuer>, d: &mut Diagnostics) -> KeySource {
    let i = &spanned.value;
    let mut found = Vec::new();
    if i.discovery == Some(true) {
        let url = format!(
            "{}/.well-known/openid-configuration",
            i.issuer.value.trim_end_matches('/')
        );
        if !is_url(&i.issuer.value) {
            d.error(
                &i.issuer,
                format!("issuer {name}: `discovery: true` needs an http(s) issuer URL"),
            );
        }
        found.push(KeySource::Discovery(url));
    }
    if let Some(u) = &i.discovery_url {
        found.push(KeySource::Discovery(u.value.clone()));
    }
    if let Some(u) = &i.jwks_uri {
        found.push(KeySource::JwksUri(u.value.clone()));
    }
    if let Some(f) = &i.jwks_file {
        found.push(KeySource::File(PathBuf::from(&f.value)));
    }
    for url in [&i.discovery_url, &i.jwks_uri].into_iter().flatten() {
        if !is_url(&url.value) {
            d.error(url, format!("issuer {name}: `{}` is not an http(s) URL", url.value));
        }
    }
    if found.len() != 1 {
        d.error(
            spanned,
            format!(
                "issuer {name}: needs exactly one key source of `discovery: true`, `discovery_url`, `jwks_uri`, `jwks_file` (found {})",
                found.len()
            ),
        );
    }
    found.into_iter().next().unwrap_or(KeySource::File(PathBuf::new()))
}

fn token(raw: Option<&raw::RawToken>, d: &mut Diagnostics) -> TokenConfig {
    let mut config = TokenConfig::default();
    let Some(raw) = raw else { return config };
    if let Some(sources) = &raw.sources {
        if sources.value.is_empty() {
            d.error(sources, "token.sources is empty: list at least `authorization`");
        }
        config.sources = sources
            .value
            .iter()
            .map(|s| match s {
                RawSource::Authorization => TokenSource::Authorization,
                RawSource::Header(h) => {
                    if !valid_header_name(&h.to_ascii_lowercase()) {
                        d.error(sources, format!("token.sources: `{h}` is not a header name"));
                    }
                    TokenSource::Header(h.to_ascii_lowercase())
                }
                RawSource::Cookie(c) => TokenSource::Cookie(c.clone()),
                RawSource::Query(q) => TokenSource::Query(q.clone()),
            })
            .collect();
    }
    if let Some(max) = &raw.max_bytes {
        if max.value == 0 {
            d.error(max, "token.max_bytes must be above zero");
        }
        config.max_bytes = usize::try_from(max.value).unwrap_or(usize::MAX);
    }
    if let Some(forward) = raw.forward {
        config.forward = forward;
    }
    config
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The most `-`/`_` a claim header name may have: its 2^n spellings are all removed.
const MAX_HEADER_SEPARATORS: usize = 6;

/// Headers a claim may never be written to: they would change how the request is routed,
/// framed or authenticated upstream.
const RESERVED_HEADERS: [&str; 8] = [
    "host",
    "authorization",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
];

fn claim_headers(raw: Option<&indexmap::IndexMap<String, S<String>>>, d: &mut Diagnostics) -> Vec<ClaimHeader> {
    let Some(raw) = raw else {
        return ClaimHeader::defaults();
    };
    let mut out = Vec::new();
    for (name, value) in raw {
        let lower = name.to_ascii_lowercase();
        if !valid_header_name(&lower) || lower.starts_with(':') {
            d.error(value, format!("claim_headers: `{name}` is not a header name"));
        } else if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("x-envoy-") {
            d.error(value, format!("claim_headers: `{name}` cannot carry a claim"));
        } else if lower.bytes().filter(|b| matches!(b, b'-' | b'_')).count() > MAX_HEADER_SEPARATORS {
            d.error(
                value,
                format!(
                    "claim_headers: `{name}` has more than {MAX_HEADER_SEPARATORS} `-` or `_`: audgate removes every spelling of a claim header with `_` for `-`, and keeps that list short"
                ),
            );
        }
        let v = value.value.trim();
        let claim = match v {
            "$client_id" => ClaimValue::ClientId,
            "$payload" => ClaimValue::Payload,
            "$tenant" => ClaimValue::Tenant,
            _ if v.starts_with('$') => {
                d.error(
                    value,
                    format!("claim_headers.{name}: `{v}` is not one of $client_id, $payload, $tenant"),
                );
                continue;
            }
            _ => {
                let path: Vec<String> = v.split('.').map(str::to_owned).collect();
                if path.iter().any(String::is_empty) {
                    d.error(
                        value,
                        format!("claim_headers.{name}: `{v}` is not a claim path like realm_access.roles"),
                    );
                }
                ClaimValue::Claim(path)
            }
        };
        if out.iter().any(|h: &ClaimHeader| h.name == lower) {
            d.error(value, format!("claim_headers: `{name}` is listed twice"));
        }
        out.push(ClaimHeader {
            name: lower,
            value: claim,
        });
    }
    out
}

fn routes(raw: &RawConfig, issuers: &[Issuer], d: &mut Diagnostics) -> Vec<Route> {
    let mut names = HashSet::new();
    let mut routes = Vec::new();
    for spanned in &raw.routes {
        let r: &RawRoute = &spanned.value;
        let name = r.name.value.clone();
        if name.is_empty() {
            d.error(&r.name, "a route needs a non-empty `name`");
        } else if !names.insert(name.clone()) {
            d.error(&r.name, format!("route name `{name}` is used twice"));
        }
        let matcher = matcher(&name, r.matcher.as_ref(), d);
        let route_issuers: Vec<usize> = match &r.issuers {
            None => (0..issuers.len()).collect(),
            Some(list) => list
                .iter()
                .filter_map(|i| {
                    let id = issuers.iter().position(|known| known.name == i.value);
                    if id.is_none() {
                        let known: Vec<&str> = issuers.iter().map(|k| k.name.as_str()).collect();
                        d.error(
                            i,
                            format!(
                                "route {name}: unknown issuer `{}` (configured: {})",
                                i.value,
                                known.join(", ")
                            ),
                        );
                    }
                    id
                })
                .collect(),
        };
        let client_ids: Vec<String> = r
            .client_ids
            .as_ref()
            .map(|c| c.value.iter().map(|id| id.value.clone()).collect())
            .unwrap_or_default();
        if !r.allow_anonymous {
            match &r.client_ids {
                None => d.error(
                    spanned,
                    format!("route {name}: needs `client_ids` (or `allow_anonymous: true`)"),
                ),
                Some(c) if client_ids.is_empty() => d.error(c, format!("route {name}: `client_ids` is empty")),
                _ => {}
            }
            if route_issuers.is_empty() && r.issuers.is_none() {
                d.error(
                    spanned,
                    format!("route {name}: no issuers are configured to verify its tokens"),
                );
            }
        }
        let client_id_claims = match &r.client_id_claims {
            None => vec![ClientIdClaim::Aud],
            Some(list) => {
                if list.is_empty() {
                    d.error(spanned, format!("route {name}: `client_id_claims` is empty"));
                }
                list.iter()
                    .filter_map(|c| {
                        let claim = ClientIdClaim::from_name(&c.value);
                        if claim.is_none() {
                            d.error(
                                c,
                                format!(
                                    "route {name}: client_id_claims: `{}` is not aud, azp or client_id",
                                    c.value
                                ),
                            );
                        }
                        claim
                    })
                    .collect()
            }
        };
        let required_roles = r
            .required_roles
            .iter()
            .map(|role| {
                if role.value.is_empty() || role.value.starts_with(':') || role.value.ends_with(':') {
                    d.error(
                        role,
                        format!("route {name}: `{}` is not a role (ROLE or CLIENT:ROLE)", role.value),
                    );
                }
                Role::parse(&role.value)
            })
            .collect();
        let required_claims = required_claims(&name, r, d);
        routes.push(Route {
            name,
            matcher,
            issuers: route_issuers,
            client_ids,
            client_id_claims,
            required_scopes: r.required_scopes.clone(),
            required_roles,
            allow_anonymous: r.allow_anonymous,
            mode: match r.mode {
                Some(raw::ModeKeyword::DryRun) => Mode::DryRun,
                _ => Mode::Enforce,
            },
            required_claims,
            allow_cors_preflight: r.allow_cors_preflight,
            tenants: Vec::new(),
        });
    }
    routes
}

fn matcher(route: &str, raw: Option<&S<raw::RawMatch>>, d: &mut Diagnostics) -> Match {
    let Some(spanned) = raw else {
        return Match {
            hosts: Vec::new(),
            path: PathMatch::Any,
            methods: Vec::new(),
        };
    };
    let m = &spanned.value;
    let hosts = m
        .hosts
        .iter()
        .map(|h| {
            let v = h.value.trim();
            let stars = v.matches('*').count();
            let bad_wildcard = stars > 1 || (stars == 1 && !v.starts_with("*."));
            if v.is_empty() || bad_wildcard || v.contains(['/', ' ']) {
                d.error(h, format!("route {route}: host `{v}` is not a host name or `*.domain`"));
            }
            HostPattern::parse(v.split(':').next().unwrap_or(v))
        })
        .collect();
    let set = [m.path_prefix.is_some(), m.path.is_some(), m.path_regex.is_some()];
    if set.iter().filter(|&&s| s).count() > 1 {
        d.error(
            spanned,
            format!("route {route}: use one of `path_prefix`, `path`, `path_regex`"),
        );
    }
    let path = if let Some(p) = &m.path_prefix {
        check_path(route, p, d);
        PathMatch::Prefix(p.value.clone())
    } else if let Some(p) = &m.path {
        check_path(route, p, d);
        PathMatch::Exact(p.value.clone())
    } else if let Some(p) = &m.path_regex {
        match Regex::new(&format!("^(?:{})$", p.value)) {
            Ok(re) => PathMatch::Regex(re),
            Err(e) => {
                let first = e.to_string().lines().last().unwrap_or_default().trim().to_owned();
                d.error(
                    p,
                    format!("route {route}: path_regex `{}` does not compile: {first}", p.value),
                );
                PathMatch::Any
            }
        }
    } else {
        PathMatch::Any
    };
    let methods = m
        .methods
        .iter()
        .map(|meth| {
            if meth.value.is_empty() || !meth.value.bytes().all(|b| b.is_ascii_alphabetic()) {
                d.error(meth, format!("route {route}: `{}` is not an HTTP method", meth.value));
            }
            meth.value.to_ascii_uppercase()
        })
        .collect();
    Match { hosts, path, methods }
}

fn check_path(route: &str, p: &S<String>, d: &mut Diagnostics) {
    if !p.value.starts_with('/') {
        d.error(p, format!("route {route}: path `{}` must start with /", p.value));
    }
}

/// `required_claims`: each entry compiled, each bad one an error at its value (or its key's
/// mapping when the key itself is bad).
fn required_claims(route: &str, r: &RawRoute, d: &mut Diagnostics) -> Vec<ClaimCondition> {
    let Some(map) = &r.required_claims else {
        return Vec::new();
    };
    if r.allow_anonymous {
        d.error(
            map,
            format!("route {route}: `required_claims` cannot apply with `allow_anonymous: true` (no token is checked)"),
        );
    }
    if map.value.is_empty() {
        d.error(map, format!("route {route}: `required_claims` is empty"));
    }
    let mut out = Vec::new();
    for (claim, value) in &map.value {
        match ClaimCondition::parse(claim, &value.value) {
            Ok(c) => out.push(c),
            Err(e) => d.error(value, format!("route {route}: required_claims: {e}")),
        }
    }
    out
}

/// Default and upper bound of `max_tenants`.
const DEFAULT_MAX_TENANTS: u64 = 100;
const MAX_MAX_TENANTS: u64 = 10_000;

/// The `{tenant}` template of each issuer (`None` for a plain one), every misuse an error:
/// `{tenant}` not exactly one whole path segment, `tenants` and `tenant_pattern` both or
/// neither, a pattern that does not compile.
fn templates(raw: &RawConfig, d: &mut Diagnostics) -> Vec<Option<TenantTemplate>> {
    let mut out = Vec::new();
    for (name, spanned) in &raw.issuers {
        let i = &spanned.value;
        let what = format!("issuer {name}");
        let templated = i.issuer.value.contains(tenant::PLACEHOLDER);
        if !templated {
            for (given, key) in [
                (i.tenants.is_some(), "tenants"),
                (i.tenant_pattern.is_some(), "tenant_pattern"),
                (i.max_tenants.is_some(), "max_tenants"),
            ] {
                if given {
                    d.error(
                        &i.issuer,
                        format!("{what}: `{key}` needs `{{tenant}}` in `issuer` (like https://sso.example.com/realms/{{tenant}})"),
                    );
                }
            }
            for alias in &i.issuer_aliases {
                if alias.value.contains(tenant::PLACEHOLDER) {
                    d.error(
                        alias,
                        format!("{what}: an alias may hold `{{tenant}}` only when `issuer` does"),
                    );
                }
            }
            for url in [&i.discovery_url, &i.jwks_uri, &i.jwks_file].into_iter().flatten() {
                if url.value.contains(tenant::PLACEHOLDER) {
                    d.error(url, format!("{what}: `{{tenant}}` here needs `{{tenant}}` in `issuer`"));
                }
            }
            out.push(None);
            continue;
        }
        for t in std::iter::once(&i.issuer).chain(&i.issuer_aliases) {
            if let Err(e) = tenant::check_template(&t.value) {
                d.error(t, format!("{what}: {e}"));
            }
        }
        for url in [&i.discovery_url, &i.jwks_uri].into_iter().flatten() {
            if url.value.contains(tenant::PLACEHOLDER)
                && let Err(e) = tenant::check_template(&url.value)
            {
                d.error(url, format!("{what}: {e}"));
            }
        }
        if let Some(max) = &i.max_tenants {
            if i.tenant_pattern.is_none() {
                d.error(max, format!("{what}: `max_tenants` applies to `tenant_pattern` only"));
            }
            if max.value == 0 || max.value > MAX_MAX_TENANTS {
                d.error(max, format!("{what}: max_tenants must be 1 to {MAX_MAX_TENANTS}"));
            }
        }
        let set = match (&i.tenants, &i.tenant_pattern) {
            (Some(list), None) => {
                if list.value.is_empty() {
                    d.error(list, format!("{what}: `tenants` is empty"));
                }
                let mut names: Vec<String> = Vec::new();
                for t in &list.value {
                    if let Err(e) = tenant::check_tenant_name(&t.value) {
                        d.error(t, format!("{what}: {e}"));
                    } else if names.contains(&t.value) {
                        d.error(t, format!("{what}: tenant `{}` is listed twice", t.value));
                    }
                    names.push(t.value.clone());
                }
                TenantSet::Listed(names)
            }
            (None, Some(p)) => match TenantSet::pattern(
                &p.value,
                usize::try_from(i.max_tenants.as_ref().map_or(DEFAULT_MAX_TENANTS, |m| m.value)).unwrap_or(usize::MAX),
            ) {
                Ok(set) => set,
                Err(e) => {
                    d.error(p, format!("{what}: {e}"));
                    TenantSet::Listed(Vec::new())
                }
            },
            _ => {
                d.error(
                    spanned,
                    format!(
                        "{what}: a `{{tenant}}` issuer needs exactly one of `tenants` (a list) or `tenant_pattern`"
                    ),
                );
                TenantSet::Listed(Vec::new())
            }
        };
        let templates = std::iter::once(&i.issuer)
            .chain(&i.issuer_aliases)
            .map(|t| t.value.as_str());
        out.push(Some(TenantTemplate::new(templates, set)));
    }
    out
}

/// A route's `tenants`: each must be a tenant one of the route's templated issuers accepts.
fn route_tenants(raw: &RawConfig, routes: &mut [Route], templates: &[Option<TenantTemplate>], d: &mut Diagnostics) {
    for (spanned, route) in raw.routes.iter().zip(routes.iter_mut()) {
        let Some(list) = &spanned.value.tenants else { continue };
        let templated: Vec<&TenantTemplate> = route
            .issuers
            .iter()
            .filter_map(|&id| templates.get(id).and_then(Option::as_ref))
            .collect();
        if templated.is_empty() {
            d.error(
                list,
                format!(
                    "route {}: `tenants` needs an issuer with `{{tenant}}` among the route's issuers",
                    route.name
                ),
            );
            continue;
        }
        if list.value.is_empty() {
            d.error(list, format!("route {}: `tenants` is empty", route.name));
        }
        for t in &list.value {
            if !templated.iter().any(|tpl| tpl.tenants.accepts(&t.value)) {
                d.error(
                    t,
                    format!(
                        "route {}: tenant `{}` is not accepted by the route's templated issuers (their `tenants` / `tenant_pattern`)",
                        route.name, t.value
                    ),
                );
            }
            route.tenants.push(t.value.clone());
        }
    }
}
