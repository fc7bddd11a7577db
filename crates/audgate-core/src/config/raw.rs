//! The config file as written: serde types that mirror SPEC.md's YAML, with the positions of
//! the values later checks point at. Nothing here is used after loading.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_saphyr::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub issuers: IndexMap<String, S<RawIssuer>>,
    pub token: Option<RawToken>,
    pub claim_headers: Option<IndexMap<String, S<String>>>,
    #[serde(default)]
    pub routes: Vec<S<RawRoute>>,
    pub default: Option<DefaultKeyword>,
    pub http_endpoint: Option<RawHttpEndpoint>,
    #[serde(default)]
    pub admin: RawAdmin,
    pub token_cache: Option<RawTokenCache>,
    pub logging: Option<RawLogging>,
    pub tracing: Option<S<RawTracing>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    pub decisions: Option<DecisionsKeyword>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionsKeyword {
    Denials,
    All,
    Off,
}

/// `tracing:` OpenTelemetry spans over OTLP/gRPC.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp_endpoint: Option<S<String>>,
    pub sample_ratio: Option<S<f64>>,
    pub service_name: Option<S<String>>,
}

/// `listen.tls`: TLS (and mTLS) on the gRPC and HTTP listeners.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: S<String>,
    pub key_file: S<String>,
    pub client_ca_file: Option<S<String>>,
    pub client_sans: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenCache {
    pub max_entries: Option<u64>,
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Serve `audgate.v1.Admin/Explain` on the admin listener.
    #[serde(default)]
    pub explain: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpEndpoint {
    pub proxy: Option<S<ProxyKeyword>>,
    pub path_prefix: Option<S<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyKeyword {
    Envoy,
    Nginx,
    IngressNginx,
    Traefik,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub grpc: Option<S<String>>,
    pub http: Option<S<String>>,
    pub admin: Option<S<String>>,
    pub tls: Option<S<RawTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    pub issuer: S<String>,
    #[serde(default)]
    pub issuer_aliases: Vec<S<String>>,
    pub discovery: Option<bool>,
    pub discovery_url: Option<S<String>>,
    pub jwks_uri: Option<S<String>>,
    pub jwks_file: Option<S<String>>,
    pub algorithms: Option<Vec<S<String>>>,
    pub refresh_interval: Option<S<RawDuration>>,
    pub min_refresh_interval: Option<S<RawDuration>>,
    pub leeway: Option<S<RawDuration>>,
    pub ca_file: Option<S<String>>,
    /// A templated issuer (`{tenant}` in `issuer`): the tenants it accepts ...
    pub tenants: Option<S<Vec<S<String>>>>,
    /// ... or a pattern for them, with a bound on the tenants whose keys are held.
    pub tenant_pattern: Option<S<String>>,
    pub max_tenants: Option<S<u64>>,
}

/// `30s`, `5m`, `1h 30m` or a number of seconds.
#[derive(Debug, Clone)]
pub enum RawDuration {
    Seconds(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl serde::de::Visitor<'_> for DurationVisitor {
            type Value = RawDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration like 30s or 5m, or a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }
        }
        d.deserialize_any(DurationVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    pub sources: Option<S<Vec<RawSource>>>,
    pub max_bytes: Option<S<u64>>,
    pub forward: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawSource {
    Authorization,
    Header(String),
    Cookie(String),
    Query(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: S<String>,
    #[serde(rename = "match")]
    pub matcher: Option<S<RawMatch>>,
    pub issuers: Option<Vec<S<String>>>,
    pub client_ids: Option<S<Vec<S<String>>>>,
    pub client_id_claims: Option<Vec<S<String>>>,
    #[serde(default)]
    pub required_scopes: Vec<String>,
    #[serde(default)]
    pub required_roles: Vec<S<String>>,
    pub mode: Option<ModeKeyword>,
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Claim path -> a scalar or a list of scalars (checked in `compile`).
    pub required_claims: Option<S<IndexMap<String, S<serde_json::Value>>>>,
    #[serde(default)]
    pub allow_cors_preflight: bool,
    /// The tenants of templated issuers this route accepts.
    pub tenants: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default)]
    pub hosts: Vec<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub path: Option<S<String>>,
    pub path_regex: Option<S<String>>,
    #[serde(default)]
    pub methods: Vec<S<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeKeyword {
    Enforce,
    DryRun,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultKeyword {
    Deny,
    Allow,
}
