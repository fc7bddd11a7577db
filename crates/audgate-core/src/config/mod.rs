//! YAML config -> validated [`Config`]. Every problem is reported with file, line and column;
//! the semantic pass collects all of them before failing. A config that does not validate is
//! never used: at start audgate exits, on reload the old one keeps serving.

mod compile;
mod lint;
mod raw;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::authz::Policy;

pub use compile::{hash_text, parse_duration, yaml_error as yaml_diagnostic};

/// A validated, compiled config.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub policy: Policy,
    /// Where each issuer's keys come from, indexed like `policy.issuers`.
    pub key_sources: Vec<KeySourceConfig>,
    pub http_endpoint: HttpEndpoint,
    /// Serve `audgate.v1.Admin/Explain` on the admin listener (`admin: {explain: true}`).
    pub admin_explain: bool,
    pub token_cache: TokenCacheConfig,
    /// Which decisions get a log line (`logging.decisions`).
    pub log_decisions: LogDecisions,
    /// Hex digest of the file's bytes (the `audgate_config_info` label).
    pub hash: String,
    /// `tracing:`: OpenTelemetry spans; `None` when the section is absent (no cost then).
    pub tracing: Option<TracingConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// `listen.tls`: TLS on the gRPC and HTTP listeners (admin stays plain).
    pub tls: Option<TlsConfig>,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            grpc: SocketAddr::from(([0, 0, 0, 0], 9191)),
            http: SocketAddr::from(([0, 0, 0, 0], 9192)),
            admin: SocketAddr::from(([0, 0, 0, 0], 9901)),
            tls: None,
        }
    }
}

/// `logging.decisions`: which decisions get a log line. Envoy's access log sees every decision
/// through the dynamic metadata, so allows need no line of their own by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogDecisions {
    /// deny, dry_run_deny and error (the default).
    #[default]
    Denials,
    All,
    Off,
}

impl LogDecisions {
    pub fn wants(self, verdict: crate::authz::Verdict) -> bool {
        match self {
            LogDecisions::All => true,
            LogDecisions::Off => false,
            LogDecisions::Denials => verdict != crate::authz::Verdict::Allow,
        }
    }
}

/// `listen.tls`: where the certificate, key and (for mTLS) client CA are read from. The files
/// themselves are read at start and whenever they change (src/tls.rs), not at config load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Require a client certificate issued by this CA.
    pub client_ca_file: Option<PathBuf>,
    /// The client certificate must carry one of these URI SANs (an entry with a `scheme:`,
    /// such as a SPIFFE id) or DNS SANs; empty for any.
    pub client_sans: Vec<String>,
}

/// `tracing:`: OpenTelemetry spans over OTLP/gRPC.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// `http://host:port` of an OTLP/gRPC receiver (an OpenTelemetry Collector).
    pub otlp_endpoint: String,
    /// The share of checks traced when no sampled parent came with them (0 to 1).
    pub sample_ratio: f64,
    pub service_name: String,
}

impl TracingConfig {
    pub const DEFAULT_ENDPOINT: &str = "http://localhost:4317";
    pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;
    pub const DEFAULT_SERVICE_NAME: &str = "audgate";
}

/// Bounds of the verified-token cache; 0 entries turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCacheConfig {
    pub max_entries: usize,
    pub max_bytes: u64,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        TokenCacheConfig {
            max_entries: 100_000,
            max_bytes: 32 << 20,
        }
    }
}

/// The HTTP authorization endpoint's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpEndpoint {
    /// Whose headers describe the request to check; no other proxy's headers are read.
    pub proxy: Proxy,
    /// Stripped from the path Envoy's `http_service` sends (`path_prefix` there); empty for
    /// none. Envoy only.
    pub path_prefix: String,
}

/// The proxy in front of the HTTP authorization endpoint (`http_endpoint.proxy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Proxy {
    /// Envoy's `http_service`: the request as sent (host from `Host` or `:authority`).
    #[default]
    Envoy,
    /// nginx `auth_request`: `X-Original-Method` + `X-Original-URI`, host from `Host`.
    Nginx,
    /// ingress-nginx's auth location: `X-Original-Method` + `X-Original-URL`.
    IngressNginx,
    /// Traefik ForwardAuth: `X-Forwarded-Method` + `X-Forwarded-Host` + `X-Forwarded-Uri`.
    Traefik,
}

impl Proxy {
    /// The config keyword.
    pub const fn name(self) -> &'static str {
        match self {
            Proxy::Envoy => "envoy",
            Proxy::Nginx => "nginx",
            Proxy::IngressNginx => "ingress-nginx",
            Proxy::Traefik => "traefik",
        }
    }
}

/// How one issuer's keys are obtained and refreshed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySourceConfig {
    pub source: KeySource,
    pub refresh_interval: Duration,
    pub min_refresh_interval: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// An OpenID discovery document URL; its `jwks_uri` names the key set.
    Discovery(String),
    JwksUri(String),
    File(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Discovery(url) => write!(f, "discovery {url}"),
            KeySource::JwksUri(url) => write!(f, "jwks_uri {url}"),
            KeySource::File(path) => write!(f, "jwks_file {}", path.display()),
        }
    }
}

/// One problem (or warning) at a place in the file. Line and column are 1-based; 0 when the
/// parser could not tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: u64,
    pub column: u64,
    pub message: String,
}

/// The problems that stopped a config from loading.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub path: PathBuf,
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", located(&self.path, d, "error"))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// `path:line:column: error: message`.
pub fn located(path: &Path, d: &Diagnostic, severity: &str) -> String {
    format!("{}:{}:{}: {severity}: {}", path.display(), d.line, d.column, d.message)
}

/// A config that validated, with what `check-config` warns about.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Diagnostic>,
}

/// Read, parse and validate a config file.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        path: path.to_owned(),
        errors,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(vec![Diagnostic {
            line: 0,
            column: 0,
            message: format!("cannot read the config: {e}"),
        }])
    })?;
    parse(&text).map_err(fail)
}

/// Parse and validate config text.
pub fn parse(text: &str) -> Result<Loaded, Vec<Diagnostic>> {
    if text.trim().is_empty() {
        // also what a file caught mid-rewrite looks like: never a config to switch to
        return Err(vec![Diagnostic {
            line: 1,
            column: 1,
            message: "the config is empty".to_owned(),
        }]);
    }
    let raw: raw::RawConfig = serde_saphyr::from_str(text).map_err(|e| vec![compile::yaml_error(&e)])?;
    let (config, warnings) = compile::compile(raw, text)?;
    Ok(Loaded { config, warnings })
}
