//! Soak (issue 7): mixed traffic through a real Envoy into the real `audgate serve` for a
//! configurable time, every answer checked, and audgate's RSS and open file descriptors
//! watched. Run it with `scripts/soak.sh` (release build, 10 minutes); `tests/soak.rs` runs a
//! short version of the same code in CI (it includes this file as a module).
//!
//! ```sh
//! soak [--duration 600] [--warmup 30] [--connections 8] [--rate 0] [--sample-interval 30]
//!      [--tokens 20000] [--hot-tokens 1000] [--cache-entries 4096]
//!      [--rss-tolerance-mib 16] [--fd-tolerance 4] [--log info] [--audgate PATH]
//! ```
//!
//! What it sets up, all on 127.0.0.1 (tests/common, through `#[path]`): an OpenID issuer in this
//! process (discovery document + JWKS of an RSA and a P-256 key made in memory, never written),
//! the echo upstream, `audgate serve` with the config below, and Envoy
//! (`$AUDGATE_TEST_ENVOY`, tests/envoy/ext_authz_grpc.yaml).
//!
//! The traffic: `--connections` HTTP/1.1 connections (one reqwest client each), closed loop (or
//! paced to `--rate` requests/s in total), each request `GET /api/orders/N` with one of
//!
//! | share | kind | expected |
//! |---|---|---|
//! | 50 % | valid token (`--tokens` distinct; ¾ from a hot set, ¼ cycling the rest) | 200, the upstream sees the token's own `sub` in `x-auth-subject` |
//! | 10 % | expired (256 distinct) | 401 `expired` |
//! | 10 % | forged: signed by another key under the issuer's `kid` (256 distinct) | 401 `bad_signature` |
//! | 10 % | a random `kid`, new for every request | 401 `unknown_kid` |
//! | 10 % | no token | 401 `missing_token` |
//! | 10 % | wrong audience (256 distinct) | 403 `audience_mismatch` |
//!
//! A deny must carry the status, a JSON body whose `error` is the reason, and on 401 a
//! `WWW-Authenticate: Bearer realm="audgate"...` challenge. Anything else is a *wrong decision*;
//! a 5xx, a connection error or a timeout is an *error* (counted apart).
//!
//! What it reports: checks per kind, rate, wrong decisions, errors, p50/p99 latency (client side,
//! through Envoy), audgate's VmRSS and open fds at the start (after `--warmup`) and at the end,
//! sampled every `--sample-interval`; audgate's `audgate_checks_total` (total and per reason)
//! against the client's counts; token-cache hits/misses; JWKS fetches against the bound that
//! `min_refresh_interval` implies (random `kid`s must not cause a refetch storm); Envoy's
//! ext_authz counters; WARN/ERROR lines in audgate's log; the load average.
//!
//! It exits 1 on any wrong decision or error, an fd count that leaves start ± `--fd-tolerance`,
//! RSS at the end above start + `--rss-tolerance-mib`, a metrics count that disagrees with the
//! client's, more JWKS fetches than the bound, an ERROR line in audgate's log, or audgate dying.
//! Tokens are never printed.

#![allow(dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{AudgateOptions, IssuerServer, Stack, TestKey, keycloak_claims, merge};
use serde_json::{Value, json};

/// The client id the soak route requires in `aud`.
pub const CLIENT_ID: &str = "orders-api";
/// Issuer settings written into the config (also the base of the JWKS-fetch bound).
pub const REFRESH_INTERVAL_S: u64 = 300;
pub const MIN_REFRESH_INTERVAL_S: u64 = 30;

/// Everything the soak can be told.
#[derive(Debug, Clone)]
pub struct Options {
    /// Measured time, after the warm-up.
    pub duration: Duration,
    /// Traffic before the start sample (fills the token cache, lets allocators settle).
    pub warmup: Duration,
    pub connections: usize,
    /// Requests per second in total; 0 = closed loop (each connection sends as soon as the
    /// previous answer arrived).
    pub rate: f64,
    pub sample_interval: Duration,
    /// Distinct valid tokens.
    pub tokens: usize,
    /// How many of them form the hot set (¾ of valid requests).
    pub hot_tokens: usize,
    /// `token_cache.max_entries` in audgate's config.
    pub cache_entries: u64,
    /// RSS at the end may exceed RSS at the start by this much.
    pub rss_tolerance_mib: f64,
    /// Whether RSS growth fails the soak (the CI version only reports it).
    pub check_rss: bool,
    /// Every sample's fd count must stay within start ± this.
    pub fd_tolerance: i64,
    /// audgate's `RUST_LOG`.
    pub log: String,
    /// Progress lines on stderr while running.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(600),
            warmup: Duration::from_secs(30),
            connections: 8,
            rate: 0.0,
            sample_interval: Duration::from_secs(30),
            tokens: 20_000,
            hot_tokens: 1_000,
            cache_entries: 4_096,
            rss_tolerance_mib: 16.0,
            check_rss: true,
            fd_tolerance: 4,
            log: "info".to_owned(),
            progress: true,
        }
    }
}

fn config(issuer: &str, cache_entries: u64) -> String {
    format!(
        r#"
issuers:
  soak:
    issuer: {issuer}
    discovery: true
    algorithms: [RS256, ES256]
    refresh_interval: {REFRESH_INTERVAL_S}s
    min_refresh_interval: {MIN_REFRESH_INTERVAL_S}s
token_cache:
  max_entries: {cache_entries}
routes:
  - name: orders
    match: {{ path_prefix: /api/orders }}
    client_ids: [{CLIENT_ID}]
    client_id_claims: [aud]
default: deny
"#
    )
}

// ------------------------------------------------------------------------------------ traffic

/// The kinds of request, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Valid,
    Expired,
    Forged,
    RandomKid,
    NoToken,
    WrongAudience,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Valid,
        Kind::Expired,
        Kind::Forged,
        Kind::RandomKid,
        Kind::NoToken,
        Kind::WrongAudience,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Valid => "valid",
            Kind::Expired => "expired",
            Kind::Forged => "forged",
            Kind::RandomKid => "random_kid",
            Kind::NoToken => "no_token",
            Kind::WrongAudience => "wrong_audience",
        }
    }

    /// The status and reason audgate must answer with.
    pub fn expected(self) -> (u16, &'static str) {
        match self {
            Kind::Valid => (200, "allowed"),
            Kind::Expired => (401, "expired"),
            Kind::Forged => (401, "bad_signature"),
            Kind::RandomKid => (401, "unknown_kid"),
            Kind::NoToken => (401, "missing_token"),
            Kind::WrongAudience => (403, "audience_mismatch"),
        }
    }

    /// Percent of requests.
    fn weight(self) -> u64 {
        match self {
            Kind::Valid => 50,
            _ => 10,
        }
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// splitmix64: cheap, per worker, good enough to pick tokens and make random `kid`s.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The tokens, minted once before the traffic starts.
struct Tokens {
    /// (token, its `sub`).
    valid: Vec<(String, String)>,
    hot: usize,
    expired: Vec<String>,
    forged: Vec<String>,
    wrong_audience: Vec<String>,
    /// base64url of a valid payload, for the random-`kid` tokens.
    payload: String,
}

impl Tokens {
    fn mint(issuer: &str, rsa: &TestKey, ec: &TestKey, attacker: &TestKey, o: &Options, ttl: u64) -> Tokens {
        let now = common::now();
        let fresh = |aud: Value| {
            merge(
                keycloak_claims(issuer, "shop-frontend"),
                json!({"aud": aud, "exp": now + ttl, "preferred_username": "soak"}),
            )
        };
        let valid = (0..o.tokens.max(1))
            .map(|i| {
                let claims = fresh(json!([CLIENT_ID, "account"]));
                let sub = common::str_claim(&claims, "sub").to_owned();
                // one in eight RS256, the rest ES256 (cheaper to mint)
                let key = if i % 8 == 0 { rsa } else { ec };
                (key.mint(claims), sub)
            })
            .collect();
        let expired = (0..256)
            .map(|i| {
                let claims = merge(
                    fresh(json!([CLIENT_ID, "account"])),
                    json!({"exp": now - 3600, "iat": now - 7200, "auth_time": now - 7200}),
                );
                if i % 8 == 0 { rsa.mint(claims) } else { ec.mint(claims) }
            })
            .collect();
        // another key signing under the issuer's real kid: the signature cannot verify
        let forged = (0..256)
            .map(|_| attacker.sign(&ec.header(), &fresh(json!([CLIENT_ID, "account"]))))
            .collect();
        let wrong_audience = (0..256)
            .map(|i| {
                let claims = fresh(json!(["billing-api", "account"]));
                if i % 8 == 0 { rsa.mint(claims) } else { ec.mint(claims) }
            })
            .collect();
        let payload = common::b64url(fresh(json!([CLIENT_ID, "account"])).to_string());
        Tokens {
            hot: o.hot_tokens.clamp(1, o.tokens.max(1)),
            valid,
            expired,
            forged,
            wrong_audience,
            payload,
        }
    }

    /// A token with a `kid` the issuer never published (and a random signature: audgate looks
    /// the key up before it verifies anything).
    fn random_kid(&self, rng: &mut Rng) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": format!("rotated-{:016x}", rng.next())});
        let sig: Vec<u8> = (0..8).flat_map(|_| rng.next().to_le_bytes()).collect();
        format!(
            "{}.{}.{}",
            common::b64url(header.to_string()),
            self.payload,
            URL_SAFE_NO_PAD.encode(sig)
        )
    }
}

/// Distinct wrong decisions and errors kept for the report (never with the token).
const EXAMPLES_KEPT: usize = 10;

#[derive(Default)]
struct KindCounts {
    sent: AtomicU64,
    wrong: AtomicU64,
    errors: AtomicU64,
}

/// Shared between the workers and the sampler.
struct Shared {
    url: String,
    tokens: Tokens,
    cold_cursor: AtomicUsize,
    stop: AtomicBool,
    counts: [KindCounts; 6],
    /// Latencies (µs) since the last sample; the sampler takes them.
    latencies: Mutex<Vec<u32>>,
    examples: Mutex<Vec<String>>,
}

enum Outcome {
    Right,
    Wrong(String),
    Error(String),
}

impl Shared {
    fn totals(&self) -> (u64, u64, u64) {
        self.counts.iter().fold((0, 0, 0), |(s, w, e), c| {
            (
                s + c.sent.load(Ordering::Relaxed),
                w + c.wrong.load(Ordering::Relaxed),
                e + c.errors.load(Ordering::Relaxed),
            )
        })
    }

    fn record(&self, kind: Kind, outcome: Outcome, took: Duration) {
        let counts = &self.counts[kind.index()];
        counts.sent.fetch_add(1, Ordering::Relaxed);
        let detail = match outcome {
            Outcome::Right => None,
            Outcome::Wrong(d) => {
                counts.wrong.fetch_add(1, Ordering::Relaxed);
                Some(format!("WRONG {}: {d}", kind.name()))
            }
            Outcome::Error(d) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                Some(format!("ERROR {}: {d}", kind.name()))
            }
        };
        if let Some(detail) = detail {
            let mut examples = self.examples.lock().unwrap_or_else(|e| e.into_inner());
            if examples.len() < EXAMPLES_KEPT && !examples.contains(&detail) {
                examples.push(detail);
            }
        }
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        self.latencies.lock().unwrap_or_else(|e| e.into_inner()).push(us);
    }
}

fn soak_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_else(|e| panic!("cannot build the HTTP client: {e}"))
}

async fn worker(id: usize, shared: Arc<Shared>, period: Option<Duration>) {
    let client = soak_client();
    let mut rng = Rng(0x5EED_0000_0000_0000 ^ ((id as u64) << 32) ^ u64::from(std::process::id()));
    let weights: u64 = Kind::ALL.iter().map(|k| k.weight()).sum();
    let mut next_send = tokio::time::Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        if let Some(period) = period {
            tokio::time::sleep_until(next_send).await;
            next_send += period;
        }
        let mut pick = rng.next() % weights;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| {
                if pick < k.weight() {
                    true
                } else {
                    pick -= k.weight();
                    false
                }
            })
            .unwrap_or(Kind::Valid);
        let t = &shared.tokens;
        let (token, sub): (Option<String>, Option<&str>) = match kind {
            Kind::Valid => {
                let i = if t.valid.len() > t.hot && rng.below(4) == 0 {
                    let cold = t.valid.len() - t.hot;
                    t.hot + shared.cold_cursor.fetch_add(1, Ordering::Relaxed) % cold
                } else {
                    rng.below(t.hot)
                };
                let (token, sub) = &t.valid[i];
                (Some(token.clone()), Some(sub.as_str()))
            }
            Kind::Expired => (Some(t.expired[rng.below(t.expired.len())].clone()), None),
            Kind::Forged => (Some(t.forged[rng.below(t.forged.len())].clone()), None),
            Kind::WrongAudience => (Some(t.wrong_audience[rng.below(t.wrong_audience.len())].clone()), None),
            Kind::RandomKid => (Some(t.random_kid(&mut rng)), None),
            Kind::NoToken => (None, None),
        };
        let url = format!("{}/api/orders/{}", shared.url, rng.below(10_000));
        let mut request = client.get(&url);
        if let Some(token) = &token {
            request = request.header("authorization", common::bearer(token));
        }
        let started = Instant::now();
        let response = match request.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let headers = r.headers().clone();
                r.text().await.map(|body| (status, headers, body))
            }
            Err(e) => Err(e),
        };
        let took = started.elapsed();
        let outcome = match response {
            Err(e) => Outcome::Error(format!("no answer after {took:?}: {e}")),
            Ok((status, headers, body)) => judge(kind, sub, status, &headers, &body, token.as_deref()),
        };
        shared.record(kind, outcome, took);
    }
}

/// Replaces the token (and each of its parts) wherever it appears.
fn redact(text: &str, token: Option<&str>) -> String {
    let mut out = text.to_owned();
    if let Some(token) = token {
        out = out.replace(token, "<token>");
        for part in token.split('.').filter(|p| p.len() >= 16) {
            out = out.replace(part, "<token part>");
        }
    }
    out
}

fn judge(
    kind: Kind,
    sub: Option<&str>,
    status: u16,
    headers: &reqwest::header::HeaderMap,
    body: &str,
    token: Option<&str>,
) -> Outcome {
    let (want_status, want_reason) = kind.expected();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    if status >= 500 {
        let short: String = redact(body, token).chars().take(200).collect();
        return Outcome::Error(format!(
            "HTTP {status} ({}) {short}",
            header("x-envoy-upstream-service-time")
        ));
    }
    if status == 200 {
        // an echo of what the upstream saw; it holds the request's headers, so never print it
        let echo: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        let seen = |name: &str| echo["headers"][name].as_str().map(str::to_owned);
        let got_sub = seen("x-auth-subject");
        let got_client = seen("x-auth-client-id");
        let route = header("x-test-audgate-route");
        if kind == Kind::Valid {
            if got_sub.as_deref() == sub && got_client.as_deref() == Some(CLIENT_ID) && route == "orders" {
                return Outcome::Right;
            }
            return Outcome::Wrong(format!(
                "allowed, but the upstream saw x-auth-subject {got_sub:?} (token's sub {sub:?}), \
                 x-auth-client-id {got_client:?}, route {route:?}"
            ));
        }
        return Outcome::Wrong(format!(
            "expected {want_status} {want_reason}, got 200 (upstream saw x-auth-subject {got_sub:?}, route {route:?})"
        ));
    }
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let reason = parsed["error"].as_str().unwrap_or("(no JSON error)");
    let description: String = redact(parsed["error_description"].as_str().unwrap_or(""), token)
        .chars()
        .take(160)
        .collect();
    let got = format!("got {status} {reason} ({description})");
    if status != want_status || reason != want_reason {
        return Outcome::Wrong(format!("expected {want_status} {want_reason}, {got}"));
    }
    if !header("content-type").starts_with("application/json") {
        return Outcome::Wrong(format!("{got} without content-type: application/json"));
    }
    let www = header("www-authenticate");
    if status == 401 && !www.starts_with(r#"Bearer realm="audgate""#) {
        return Outcome::Wrong(format!("{got} with WWW-Authenticate {www:?}"));
    }
    Outcome::Right
}

// ------------------------------------------------------------------------------- measurements

/// One look at audgate's process and the traffic since the previous sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the start sample.
    pub t: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub fds: i64,
    pub threads: u64,
    /// Checks answered since the previous sample (the start sample: during the warm-up), and
    /// their rate and latency.
    pub checks: u64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Cumulative wrong decisions and errors (warm-up included).
    pub wrong: u64,
    pub errors: u64,
}

fn proc_status(pid: u32) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"), field("Threads:"))
}

fn open_fds(pid: u32) -> i64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(-1, |d| d.count() as i64)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

fn envoy_version() -> String {
    std::process::Command::new(common::envoy_binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            // "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let build = text.split_whitespace().skip_while(|w| *w != "version:").nth(1)?;
            build.split('/').nth(1).map(str::to_owned)
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// audgate's `audgate_checks_total` by reason, and the cache counters.
#[derive(Debug, Clone, Default)]
struct Counters {
    checks: f64,
    by_reason: Vec<f64>,
    cache_hits: f64,
    cache_misses: f64,
}

async fn counters(stack: &Stack) -> Counters {
    let m = stack.audgate.metrics().await;
    Counters {
        checks: m.sum("audgate_checks_total", &[]),
        by_reason: Kind::ALL
            .iter()
            .map(|k| m.sum("audgate_checks_total", &[("reason", k.expected().1)]))
            .collect(),
        cache_hits: m.sum("audgate_token_cache_hits_total", &[]),
        cache_misses: m.sum("audgate_token_cache_misses_total", &[]),
    }
}

// ------------------------------------------------------------------------------------- report

#[derive(Debug, Clone)]
pub struct KindReport {
    pub kind: Kind,
    pub sent: u64,
    pub wrong: u64,
    pub errors: u64,
    /// `audgate_checks_total{reason=<expected>}` over the run.
    pub server: u64,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub options: Options,
    pub audgate: PathBuf,
    pub audgate_pid: u32,
    pub envoy_version: String,
    pub kinds: Vec<KindReport>,
    /// Every request of the run, warm-up included.
    pub checks: u64,
    pub warmup_checks: u64,
    pub measured_checks: u64,
    pub measured_secs: f64,
    pub wrong: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The start sample first, the end sample last.
    pub series: Vec<Sample>,
    pub server_checks: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub jwks_fetches: usize,
    pub jwks_fetch_bound: usize,
    pub discovery_fetches: usize,
    pub envoy_stats: Vec<(String, Option<u64>)>,
    pub log_warn: usize,
    pub log_error: usize,
    pub log_examples: Vec<String>,
    pub examples: Vec<String>,
    pub loadavg_start: String,
    pub loadavg_end: String,
    /// `Some(status)` when audgate had exited by the end.
    pub audgate_exited: Option<String>,
    pub setup_secs: f64,
}

impl Report {
    pub fn start(&self) -> &Sample {
        &self.series[0]
    }

    pub fn end(&self) -> &Sample {
        &self.series[self.series.len() - 1]
    }

    pub fn rss_growth_mib(&self) -> f64 {
        (self.end().rss_kib as f64 - self.start().rss_kib as f64) / 1024.0
    }

    /// The largest distance of a sample's fd count from the start sample's.
    pub fn fd_drift(&self) -> i64 {
        let start = self.start().fds;
        self.series.iter().map(|s| (s.fds - start).abs()).max().unwrap_or(0)
    }

    /// Why the soak failed; empty when it passed.
    pub fn failures(&self) -> Vec<String> {
        let o = &self.options;
        let mut f = Vec::new();
        if self.wrong > 0 {
            f.push(format!("{} wrong decisions", self.wrong));
        }
        if self.errors > 0 {
            f.push(format!(
                "{} failed checks (5xx, connection errors, timeouts)",
                self.errors
            ));
        }
        if self.fd_drift() > o.fd_tolerance || self.series.iter().any(|s| s.fds < 0) {
            f.push(format!(
                "open fds moved by {} from the start sample ({}), tolerance ±{}",
                self.fd_drift(),
                self.start().fds,
                o.fd_tolerance
            ));
        }
        if o.check_rss && self.rss_growth_mib() > o.rss_tolerance_mib {
            f.push(format!(
                "RSS grew by {:.1} MiB after warm-up, tolerance {} MiB",
                self.rss_growth_mib(),
                o.rss_tolerance_mib
            ));
        }
        if self.server_checks != self.checks {
            f.push(format!(
                "audgate_checks_total grew by {}, the client sent {}",
                self.server_checks, self.checks
            ));
        }
        for k in &self.kinds {
            // with a wrong decision or an error the per-reason counts cannot match; that failed already
            if self.wrong + self.errors == 0 && k.server != k.sent {
                f.push(format!(
                    "audgate_checks_total{{reason=\"{}\"}} grew by {}, the client got {} such answers",
                    k.kind.expected().1,
                    k.server,
                    k.sent
                ));
            }
        }
        if self.jwks_fetches > self.jwks_fetch_bound {
            f.push(format!(
                "{} JWKS fetches, more than the {} that refresh_interval and min_refresh_interval allow",
                self.jwks_fetches, self.jwks_fetch_bound
            ));
        }
        if self.log_error > 0 {
            f.push(format!("{} ERROR lines in audgate's log", self.log_error));
        }
        if let Some(status) = &self.audgate_exited {
            f.push(format!("audgate exited during the soak ({status})"));
        }
        f
    }

    pub fn render(&self) -> String {
        let o = &self.options;
        let mut r = String::new();
        let mib = |kib: u64| kib as f64 / 1024.0;
        let _ = writeln!(
            r,
            "soak: {:.0} s measured after {:.0} s warm-up; {} connections, {}; {} distinct valid tokens ({} hot), token_cache.max_entries {}",
            o.duration.as_secs_f64(),
            o.warmup.as_secs_f64(),
            o.connections,
            if o.rate > 0.0 {
                format!("paced to {} req/s", o.rate)
            } else {
                "closed loop".to_owned()
            },
            o.tokens,
            o.hot_tokens.min(o.tokens),
            o.cache_entries
        );
        let _ = writeln!(
            r,
            "audgate: {} (pid {}), RUST_LOG={}; Envoy {}; set-up {:.1} s",
            self.audgate.display(),
            self.audgate_pid,
            o.log,
            self.envoy_version,
            self.setup_secs
        );
        let _ = writeln!(
            r,
            "load average (1/5/15 min): {} at start, {} at end; {} CPUs",
            self.loadavg_start,
            self.loadavg_end,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let _ = writeln!(
            r,
            "checks: {} ({} in warm-up, {} measured = {:.0}/s)",
            self.checks,
            self.warmup_checks,
            self.measured_checks,
            self.measured_checks as f64 / self.measured_secs.max(1e-9)
        );
        let _ = writeln!(
            r,
            "  {:<15} {:>10} {:>8} {:>7}  {:<22} {:>12}",
            "kind", "sent", "wrong", "errors", "expected", "audgate says"
        );
        for k in &self.kinds {
            let (status, reason) = k.kind.expected();
            let _ = writeln!(
                r,
                "  {:<15} {:>10} {:>8} {:>7}  {:<22} {:>12}",
                k.kind.name(),
                k.sent,
                k.wrong,
                k.errors,
                format!("{status} {reason}"),
                k.server
            );
        }
        let _ = writeln!(r, "wrong decisions: {}", self.wrong);
        let _ = writeln!(r, "errors: {}", self.errors);
        let _ = writeln!(
            r,
            "latency through Envoy (measured window): p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            self.p50_ms, self.p99_ms, self.max_ms
        );
        let (start, end) = (self.start(), self.end());
        let _ = writeln!(
            r,
            "audgate RSS: start {:.1} MiB, end {:.1} MiB ({:+.1} MiB; tolerance +{} MiB{}), peak (VmHWM) {:.1} MiB",
            mib(start.rss_kib),
            mib(end.rss_kib),
            self.rss_growth_mib(),
            o.rss_tolerance_mib,
            if o.check_rss { "" } else { ", reported only" },
            mib(end.hwm_kib)
        );
        let _ = writeln!(
            r,
            "audgate open fds: start {}, end {} (largest drift {}; tolerance ±{}); threads {} -> {}",
            start.fds,
            end.fds,
            self.fd_drift(),
            o.fd_tolerance,
            start.threads,
            end.threads
        );
        let _ = writeln!(
            r,
            "series (every {:.0} s; checks, rate and latency of the interval before each sample):",
            o.sample_interval.as_secs_f64()
        );
        let _ = writeln!(
            r,
            "  {:>6} {:>9} {:>8} {:>7} {:>7} {:>8} {:>5} {:>7} {:>6} {:>6}",
            "t s", "checks", "rate/s", "p50 ms", "p99 ms", "RSS MiB", "fds", "threads", "wrong", "errors"
        );
        for s in &self.series {
            let _ = writeln!(
                r,
                "  {:>6.0} {:>9} {:>8.0} {:>7.2} {:>7.2} {:>8.1} {:>5} {:>7} {:>6} {:>6}",
                s.t,
                s.checks,
                s.rate,
                s.p50_ms,
                s.p99_ms,
                mib(s.rss_kib),
                s.fds,
                s.threads,
                s.wrong,
                s.errors
            );
        }
        let _ = writeln!(
            r,
            "audgate_checks_total: +{} over the run, client sent {} ({})",
            self.server_checks,
            self.checks,
            if self.server_checks == self.checks {
                "equal"
            } else {
                "DIFFERENT"
            }
        );
        let lookups = self.cache_hits + self.cache_misses;
        let _ = writeln!(
            r,
            "token cache: {} hits, {} misses ({:.1} % hits)",
            self.cache_hits,
            self.cache_misses,
            100.0 * self.cache_hits as f64 / lookups.max(1) as f64
        );
        let _ = writeln!(
            r,
            "JWKS fetches: {} (bound {}: start + one per {MIN_REFRESH_INTERVAL_S} s of unknown kids + one per {REFRESH_INTERVAL_S} s refresh); discovery fetches {}",
            self.jwks_fetches, self.jwks_fetch_bound, self.discovery_fetches
        );
        let stats: Vec<String> = self
            .envoy_stats
            .iter()
            .map(|(n, v)| format!("{n} {}", v.map_or("-".to_owned(), |v| v.to_string())))
            .collect();
        let _ = writeln!(r, "Envoy ext_authz: {}", stats.join(", "));
        let _ = writeln!(r, "audgate log: {} WARN, {} ERROR lines", self.log_warn, self.log_error);
        for line in &self.log_examples {
            let _ = writeln!(r, "  {line}");
        }
        if !self.examples.is_empty() {
            let _ = writeln!(r, "first wrong decisions / errors:");
            for e in &self.examples {
                let _ = writeln!(r, "  {e}");
            }
        }
        if let Some(status) = &self.audgate_exited {
            let _ = writeln!(r, "audgate EXITED: {status}");
        }
        let failures = self.failures();
        if failures.is_empty() {
            let _ = writeln!(r, "RESULT: PASS");
        } else {
            let _ = writeln!(r, "RESULT: FAIL: {}", failures.join("; "));
        }
        r
    }
}

/// The last 30 lines (at most 16 KiB) of a log file, under a heading.
fn tail_file(path: &std::path::Path) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map_or(0, |m| m.len());
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 << 10)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "----- {} (last lines) -----\n{}",
        path.display(),
        lines[lines.len().saturating_sub(30)..].join("\n")
    )
}

/// Counts WARN and ERROR lines in audgate's log (streamed: at `info` it has a line per check).
fn scan_log(path: &std::path::Path) -> (usize, usize, Vec<String>) {
    let Ok(file) = std::fs::File::open(path) else {
        return (0, 0, vec![format!("(cannot open {})", path.display())]);
    };
    let (mut warn, mut error, mut examples) = (0, 0, Vec::new());
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
        let is_warn = line.contains(" WARN ");
        let is_error = line.contains(" ERROR ");
        warn += usize::from(is_warn);
        error += usize::from(is_error);
        if (is_warn || is_error) && examples.len() < 5 {
            examples.push(line.chars().take(300).collect());
        }
    }
    (warn, error, examples)
}

// ---------------------------------------------------------------------------------------- run

/// Sets everything up, drives the traffic, takes the samples, tears down, and reports.
/// Panics (with logs) when the set-up fails.
pub async fn run(o: &Options) -> Report {
    let setup_started = Instant::now();
    let loadavg_start = loadavg();
    let rsa = TestKey::rsa("soak-rsa");
    let ec = TestKey::ec("soak-ec");
    let attacker = TestKey::ec("attacker");
    let issuer = IssuerServer::start_at("/realms/soak", &[&rsa, &ec]).await;
    let issuer_url = issuer.issuer_url();
    // valid for the whole run and then some (tokens are minted once, up front)
    let ttl = (o.warmup + o.duration).as_secs() + 900;
    let tokens = Tokens::mint(&issuer_url, &rsa, &ec, &attacker, o, ttl);
    let options = AudgateOptions::new().env("RUST_LOG", o.log.clone());
    let mut stack = Stack::start_full(issuer, |iss| config(iss, o.cache_entries), options, false).await;
    let probe = &tokens.valid[0].0;
    let ready = stack.wait_ready("/api/orders/0", probe).await;
    assert_eq!(
        ready.status,
        200,
        "the first valid token is not allowed through Envoy\n{ready}\n{}",
        stack.logs()
    );
    let pid = stack.audgate.pid();
    let audgate = common::audgate_binary();
    let before = counters(&stack).await;
    let setup_secs = setup_started.elapsed().as_secs_f64();

    let shared = Arc::new(Shared {
        url: stack.envoy.url(),
        tokens,
        cold_cursor: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        counts: Default::default(),
        latencies: Mutex::new(Vec::new()),
        examples: Mutex::new(Vec::new()),
    });
    let period = (o.rate > 0.0).then(|| Duration::from_secs_f64(o.connections as f64 / o.rate));
    let workers: Vec<_> = (0..o.connections.max(1))
        .map(|i| tokio::spawn(worker(i, Arc::clone(&shared), period)))
        .collect();
    if o.progress {
        eprintln!(
            "soak: set up in {setup_secs:.1} s; warming up for {:.0} s",
            o.warmup.as_secs_f64()
        );
    }
    tokio::time::sleep(o.warmup).await;

    let sample = |t: f64, interval: Duration, latencies: &mut Vec<u32>, checks: u64| {
        latencies.sort_unstable();
        let (rss_kib, hwm_kib, threads) = proc_status(pid);
        let (_, wrong, errors) = shared.totals();
        Sample {
            t,
            rss_kib,
            hwm_kib,
            fds: open_fds(pid),
            threads,
            checks,
            rate: checks as f64 / interval.as_secs_f64().max(1e-9),
            p50_ms: percentile(latencies, 0.50),
            p99_ms: percentile(latencies, 0.99),
            wrong,
            errors,
        }
    };
    let take = || std::mem::take(&mut *shared.latencies.lock().unwrap_or_else(|e| e.into_inner()));
    let print = |s: &Sample| {
        if o.progress {
            eprintln!(
                "soak: t={:>4.0}s checks={} rate={:.0}/s p50={:.2}ms p99={:.2}ms rss={:.1}MiB fds={} threads={} wrong={} errors={}",
                s.t,
                s.checks,
                s.rate,
                s.p50_ms,
                s.p99_ms,
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.threads,
                s.wrong,
                s.errors
            );
        }
    };

    let (warmup_checks, _, _) = shared.totals();
    let start = Instant::now();
    let first = sample(0.0, o.warmup, &mut take(), warmup_checks);
    print(&first);
    let mut series = vec![first];
    let mut all: Vec<u32> = Vec::new();
    let mut last_at = Duration::ZERO;
    let mut last_sent = warmup_checks;
    loop {
        let next = (last_at + o.sample_interval).min(o.duration);
        tokio::time::sleep_until(tokio::time::Instant::from_std(start + next)).await;
        let mut latencies = take();
        let (sent, _, _) = shared.totals();
        let s = sample(
            start.elapsed().as_secs_f64(),
            next - last_at,
            &mut latencies,
            sent - last_sent,
        );
        print(&s);
        series.push(s);
        all.extend_from_slice(&latencies);
        last_at = next;
        last_sent = sent;
        if next >= o.duration {
            break;
        }
    }
    let measured_secs = start.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let (checks, wrong, errors) = shared.totals();
    let after = counters(&stack).await;
    all.sort_unstable();

    let kinds = Kind::ALL
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let c = &shared.counts[i];
            KindReport {
                kind: *k,
                sent: c.sent.load(Ordering::Relaxed),
                wrong: c.wrong.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                server: (after.by_reason[i] - before.by_reason[i]).round() as u64,
            }
        })
        .collect();
    let total_secs = (setup_secs + o.warmup.as_secs_f64() + measured_secs).ceil() as usize;
    let jwks_fetch_bound =
        2 + total_secs.div_ceil(MIN_REFRESH_INTERVAL_S as usize) + total_secs.div_ceil(REFRESH_INTERVAL_S as usize);
    let mut envoy_stats = Vec::new();
    for name in ["ok", "denied", "error", "failure_mode_allowed"] {
        let value = stack.envoy_stat(&format!("http.ingress.ext_authz.{name}")).await;
        envoy_stats.push((name.to_owned(), value));
    }
    let audgate_exited = stack.audgate.exited();
    let (log_warn, log_error, log_examples) = scan_log(&stack.audgate.dir().join("audgate.stderr.log"));
    let examples = shared.examples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let report = Report {
        options: o.clone(),
        audgate,
        audgate_pid: pid,
        envoy_version: envoy_version(),
        kinds,
        checks,
        warmup_checks,
        measured_checks: checks - warmup_checks,
        measured_secs,
        wrong,
        errors,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
        max_ms: all.last().map_or(0.0, |m| f64::from(*m) / 1000.0),
        series,
        server_checks: (after.checks - before.checks).round() as u64,
        cache_hits: (after.cache_hits - before.cache_hits).round() as u64,
        cache_misses: (after.cache_misses - before.cache_misses).round() as u64,
        jwks_fetches: stack.issuer.jwks_fetches(),
        jwks_fetch_bound,
        discovery_fetches: stack.issuer.discovery_fetches(),
        envoy_stats,
        log_warn,
        log_error,
        log_examples,
        examples,
        loadavg_start,
        loadavg_end: loadavg(),
        audgate_exited,
        setup_secs,
    };
    if !report.failures().is_empty() {
        // the ends of the logs only: at info audgate logs a line per check, Envoy an access-log line
        let audgate_dir = stack.audgate.dir().to_owned();
        let envoy_dir = stack.envoy.config_path.parent().map(std::path::Path::to_owned);
        eprintln!("{}", tail_file(&audgate_dir.join("audgate.stderr.log")));
        if let Some(dir) = envoy_dir {
            eprintln!("{}", tail_file(&dir.join("envoy.stdout.log")));
            eprintln!("{}", tail_file(&dir.join("envoy.stderr.log")));
        }
    }
    drop(stack);
    report
}

// ---------------------------------------------------------------------------------------- main

fn usage() -> ! {
    eprintln!(
        "usage: soak [--duration SECONDS] [--warmup SECONDS] [--connections N] [--rate REQ_PER_S]\n\
         \x20           [--sample-interval SECONDS] [--tokens N] [--hot-tokens N] [--cache-entries N]\n\
         \x20           [--rss-tolerance-mib MIB] [--fd-tolerance N] [--log RUST_LOG] [--audgate PATH]\n\
         Envoy: $AUDGATE_TEST_ENVOY (`. scripts/envoy-env.sh`), else `envoy` on PATH, else .venv/bin/envoy."
    );
    std::process::exit(2)
}

/// The audgate binary of this example's own profile (target/release or target/debug), else the
/// other one.
fn default_audgate() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join("target"));
    let (own, other) = if cfg!(debug_assertions) {
        ("debug", "release")
    } else {
        ("release", "debug")
    };
    let own = target.join(own).join("audgate");
    if own.is_file() {
        own
    } else {
        target.join(other).join("audgate")
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Options::default();
    let mut audgate = None;
    let mut i = 0;
    while i < args.len() {
        let name = args[i].as_str();
        if matches!(name, "-h" | "--help") {
            usage();
        }
        let Some(value) = args.get(i + 1) else { usage() };
        let secs = || Duration::from_secs_f64(value.parse().unwrap_or_else(|_| usage()));
        let num = || value.parse::<u64>().unwrap_or_else(|_| usage());
        match name {
            "--duration" => o.duration = secs(),
            "--warmup" => o.warmup = secs(),
            "--connections" => o.connections = num() as usize,
            "--rate" => o.rate = value.parse().unwrap_or_else(|_| usage()),
            "--sample-interval" => o.sample_interval = secs(),
            "--tokens" => o.tokens = num() as usize,
            "--hot-tokens" => o.hot_tokens = num() as usize,
            "--cache-entries" => o.cache_entries = num(),
            "--rss-tolerance-mib" => o.rss_tolerance_mib = value.parse().unwrap_or_else(|_| usage()),
            "--fd-tolerance" => o.fd_tolerance = value.parse().unwrap_or_else(|_| usage()),
            "--log" => o.log = value.clone(),
            "--audgate" => audgate = Some(PathBuf::from(value)),
            _ => usage(),
        }
        i += 2;
    }
    if o.sample_interval.is_zero() || o.duration.is_zero() {
        usage();
    }
    let audgate = audgate.unwrap_or_else(default_audgate);
    if !audgate.is_file() {
        eprintln!(
            "soak: no audgate binary at {} (build it, or pass --audgate PATH)",
            audgate.display()
        );
        std::process::exit(2);
    }
    // audgate runs in a temp dir: a relative path would not find it there
    let audgate = std::fs::canonicalize(&audgate).unwrap_or(audgate);
    // SAFETY: no other thread exists yet (the runtime is built below); tests/common reads
    // AUDGATE_BIN to find the binary it starts.
    unsafe { std::env::set_var("AUDGATE_BIN", &audgate) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build the tokio runtime: {e}"));
    let report = rt.block_on(run(&o));
    print!("{}", report.render());
    std::process::exit(if report.failures().is_empty() { 0 } else { 1 });
}
