//! The one-screen summary `audgate check-config` prints for a valid config.

use std::fmt::Write as _;
use std::path::Path;

use crate::authz::route::{HostPattern, Mode, PathMatch};
use crate::authz::{ClaimValue, DefaultAction, Route};
use crate::config::{self, Loaded};

pub fn render(path: &Path, loaded: &Loaded) -> String {
    let c = &loaded.config;
    let p = &c.policy;
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK (hash {})", path.display(), c.hash);
    let _ = writeln!(
        out,
        "listen: grpc {}, http {}, admin {}",
        c.listen.grpc, c.listen.http, c.listen.admin
    );
    if let Some(tls) = &c.listen.tls {
        let _ = writeln!(out, "tls on grpc and http: {}", crate::tls::describe(tls));
    }
    if let Some(t) = &c.tracing {
        let _ = writeln!(
            out,
            "tracing: OTLP to {} as {}; sample ratio {} without a sampled parent",
            t.otlp_endpoint, t.service_name, t.sample_ratio
        );
    }
    let _ = writeln!(out, "\nissuers ({}):", p.issuers.len());
    for (id, (issuer, source)) in p.issuers.iter().zip(&c.key_sources).enumerate() {
        let algs: Vec<&str> = issuer.algorithms.iter().map(|a| a.name()).collect();
        let _ = writeln!(out, "  {}  {}", issuer.name, issuer.issuer);
        for alias in &issuer.aliases {
            let _ = writeln!(out, "      alias {alias}");
        }
        if let Some(t) = p.template(id) {
            let _ = match &t.tenants {
                crate::authz::tenant::TenantSet::Listed(list) => writeln!(out, "      tenants {}", list.join(", ")),
                crate::authz::tenant::TenantSet::Pattern { pattern, max, .. } => writeln!(
                    out,
                    "      tenants matching {pattern} (keys on first use, at most {max} at once)"
                ),
            };
        }
        let _ = writeln!(
            out,
            "      keys from {}; algorithms {}; refresh {:?} (min {:?}); leeway {}s",
            source.source,
            algs.join(", "),
            source.refresh_interval,
            source.min_refresh_interval,
            issuer.leeway
        );
    }
    let sources: Vec<String> = p.token.sources.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "\ntoken: from {}; at most {} bytes",
        sources.join(", "),
        p.token.max_bytes
    );
    let headers: Vec<String> = p
        .claim_headers
        .iter()
        .map(|h| {
            let v = match &h.value {
                ClaimValue::ClientId => "$client_id".to_owned(),
                ClaimValue::Payload => "$payload".to_owned(),
                ClaimValue::Tenant => "$tenant".to_owned(),
                ClaimValue::Claim(path) => path.join("."),
            };
            format!("{}={v}", h.name)
        })
        .collect();
    let _ = writeln!(out, "claim headers: {}", headers.join(", "));
    let routes = p.routes.routes();
    let _ = writeln!(out, "\nroutes ({}, first match wins):", routes.len());
    for (i, r) in routes.iter().enumerate() {
        let _ = writeln!(out, "  {}. {}  {}", i + 1, r.name, describe_match(r));
        let _ = writeln!(out, "      {}", describe_rule(r, p));
    }
    let default = match p.routes.default {
        DefaultAction::Deny => "deny (403 no_route)",
        DefaultAction::Allow => "allow",
    };
    let _ = writeln!(out, "  otherwise: {default}");
    if !loaded.warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings ({}):", loaded.warnings.len());
        for w in &loaded.warnings {
            let _ = writeln!(out, "  {}", config::located(path, w, "warning"));
        }
    }
    out
}

fn describe_match(r: &Route) -> String {
    let m = &r.matcher;
    let hosts: Vec<String> = m
        .hosts
        .iter()
        .map(|h| match h {
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Suffix(s) => format!("*{s}"),
        })
        .collect();
    let host = if hosts.is_empty() {
        "any host".to_owned()
    } else {
        hosts.join(",")
    };
    let path = match &m.path {
        PathMatch::Any => "any path".to_owned(),
        PathMatch::Prefix(p) => format!("{p}*"),
        PathMatch::Exact(p) => p.clone(),
        PathMatch::Regex(re) => format!("~{}", re.as_str()),
    };
    let methods = if m.methods.is_empty() {
        "any method".to_owned()
    } else {
        m.methods.join(",")
    };
    format!("[{host}] [{path}] [{methods}]")
}

fn describe_rule(r: &Route, p: &crate::authz::Policy) -> String {
    let mode = if r.mode == Mode::DryRun { " (dry run)" } else { "" };
    let preflight = if r.allow_cors_preflight {
        "; CORS preflights pass without a token"
    } else {
        ""
    };
    if r.allow_anonymous {
        return format!("anonymous: no token needed{preflight}{mode}");
    }
    let claims: Vec<&str> = r.client_id_claims.iter().map(|c| c.name()).collect();
    let issuers: Vec<&str> = r.issuers.iter().map(|&i| p.issuers[i].name.as_str()).collect();
    let mut rule = format!(
        "token from {}; client id {} in {}",
        issuers.join(","),
        r.client_ids.join(","),
        claims.join(",")
    );
    if !r.required_scopes.is_empty() {
        let _ = write!(rule, "; scopes {}", r.required_scopes.join(" "));
    }
    if !r.required_roles.is_empty() {
        let roles: Vec<String> = r.required_roles.iter().map(ToString::to_string).collect();
        let _ = write!(rule, "; roles {}", roles.join(","));
    }
    if !r.required_claims.is_empty() {
        let conditions: Vec<String> = r
            .required_claims
            .iter()
            .map(|c| format!("{} {}", c.claim, c.requirement()))
            .collect();
        let _ = write!(rule, "; claims {}", conditions.join(" and "));
    }
    if !r.tenants.is_empty() {
        let _ = write!(rule, "; tenants {}", r.tenants.join(","));
    }
    rule + preflight + mode
}
