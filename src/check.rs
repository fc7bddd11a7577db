//! One check, end to end, for any transport: evaluate with the current keys; when the core
//! met an unknown `kid` (or keys that never loaded), let the issuer's cache refetch once —
//! rate-limited and shared by concurrent requests — and evaluate again; then log.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::authz::{self, CheckInput, Decision, Reason};
use crate::config::Config;
use crate::jwks::KeyStore;
use crate::metrics::CheckMetrics;
use crate::token_cache::TokenCache;

/// A config with the key caches of its issuers and its verified-token cache: what every
/// check reads. A reload starts a new token cache (issuer indexes may change), while
/// unchanged issuers keep their keys.
pub struct Snapshot {
    pub config: Config,
    pub keys: KeyStore,
    pub tokens: TokenCache,
    pub metrics: CheckMetrics,
}

impl Snapshot {
    pub fn new(config: Config, keys: KeyStore) -> Snapshot {
        let tokens = TokenCache::new(&config.token_cache);
        let routes = config.policy.routes.routes().iter().map(|r| r.name.as_str());
        let metrics = CheckMetrics::new(routes);
        Snapshot {
            config,
            keys,
            tokens,
            metrics,
        }
    }
}

impl Snapshot {
    /// What keeps this snapshot from being ready: issuers whose keys never loaded.
    pub fn missing(&self) -> Vec<String> {
        self.keys
            .missing()
            .into_iter()
            .map(|name| format!("keys of issuer {name}"))
            .collect()
    }
}

/// Unix seconds now; the only clock read on the request path.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Decide on one request and log the decision (with Envoy's `x-request-id`).
pub async fn check<'p>(snapshot: &'p Snapshot, input: &CheckInput<'_>) -> Decision<'p> {
    let started = Instant::now();
    let policy = &snapshot.config.policy;
    let keys = |id, tenant: Option<&str>| snapshot.keys.current_for(id, tenant);
    let memo = snapshot.tokens.view(&snapshot.keys);
    let mut decision = authz::evaluate_tenants(policy, input, keys, &memo, unix_now());
    if let (Reason::UnknownKid | Reason::KeysUnavailable, Some(id)) = (decision.reason, decision.issuer) {
        let tenant = decision.tenant.clone();
        let seen = snapshot.keys.generation_for(id, tenant.as_deref());
        if snapshot.keys.refetch(id, tenant.as_deref(), seen).await {
            decision = authz::evaluate_tenants(policy, input, keys, &memo, unix_now());
        }
    }
    let elapsed = started.elapsed();
    snapshot
        .metrics
        .record(decision.route_name(), decision.verdict, decision.reason, elapsed);
    log(snapshot, &decision, input, elapsed);
    decision
}

fn log(snapshot: &Snapshot, d: &Decision<'_>, input: &CheckInput<'_>, elapsed: Duration) {
    tracing::info!(
        target: "audgate::decision",
        route = d.route_name(),
        decision = d.verdict.label(),
        reason = d.reason.code(),
        issuer = d.issuer.map_or("", |i| snapshot.config.policy.issuers[i].name.as_str()),
        tenant = d.tenant.as_deref().unwrap_or(""),
        subject = d.subject().unwrap_or(""),
        client_id = d.client_id.as_deref().unwrap_or(""),
        request_id = input.header("x-request-id").unwrap_or(""),
        latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
    );
    if !d.description.is_empty() && tracing::enabled!(target: "audgate::decision", tracing::Level::DEBUG) {
        let policy = &snapshot.config.policy;
        let token = authz::token::extract(&policy.token, input).ok();
        let keys = d.issuer.and_then(|i| snapshot.keys.current_for(i, d.tenant.as_deref()));
        let hints = authz::hint::hints(policy, d, token.as_deref(), keys.as_deref());
        tracing::debug!(
            target: "audgate::decision",
            reason = d.reason.code(),
            description = %d.description,
            hint = %hints.join(" "),
        );
    }
}
