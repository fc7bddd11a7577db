//! One check, end to end, for any transport: evaluate with the current keys; when the core
//! met an unknown `kid` (or keys that never loaded), let the issuer's cache refetch once —
//! rate-limited and shared by concurrent requests — and evaluate again; then log.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::authz::{self, CheckInput, Decision, Reason};
use crate::config::Config;
use crate::jwks::KeyStore;
use crate::metrics::CheckMetrics;
use crate::telemetry::{Carrier, CheckSpan, Telemetry};
use crate::token_cache::TokenCache;

/// A config with the key caches of its issuers and its verified-token cache: what every
/// check reads. A reload starts a new token cache (issuer indexes may change), while
/// unchanged issuers keep their keys.
pub struct Snapshot {
    pub config: Config,
    pub keys: KeyStore,
    pub tokens: TokenCache,
    pub metrics: CheckMetrics,
    /// OpenTelemetry spans (`tracing:`), kept across reloads; `None` costs nothing.
    pub telemetry: Option<Arc<Telemetry>>,
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
            telemetry: None,
        }
    }

    /// Trace the checks of this snapshot.
    pub fn with_telemetry(mut self, telemetry: Option<Arc<Telemetry>>) -> Snapshot {
        self.telemetry = telemetry;
        self
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

/// The longest a check waits for its issuer's keys to be refetched; then it is decided with the
/// keys at hand (`unknown_kid`, or `keys_unavailable`). The refetch is the only await of a
/// check, so only a check that refetches arms a timer: the cached path never touches the timer
/// wheel. Envoy's own ext_authz timeout is usually far shorter.
pub const REFETCH_WAIT: Duration = Duration::from_secs(10);

/// Unix seconds now; the only clock read on the request path.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Decide on one request and log the decision (with Envoy's `x-request-id`).
pub async fn check<'p>(snapshot: &'p Snapshot, input: &CheckInput<'_>) -> Decision<'p> {
    check_traced(snapshot, input, Carrier::default()).await
}

/// [`check`], with the trace context of the call itself (gRPC metadata) when there is one;
/// without it the parent span comes from the checked request's headers.
pub async fn check_traced<'p>(snapshot: &'p Snapshot, input: &CheckInput<'_>, call: Carrier<'_>) -> Decision<'p> {
    let started = Instant::now();
    let span = snapshot
        .telemetry
        .as_deref()
        .map(|t| t.start_check(call, input.headers));
    let policy = &snapshot.config.policy;
    let keys = |id, tenant: Option<&str>| snapshot.keys.current_for(id, tenant);
    let memo = snapshot.tokens.view(&snapshot.keys);
    let mut decision = authz::evaluate_tenants(policy, input, keys, &memo, unix_now());
    if let (Reason::UnknownKid | Reason::KeysUnavailable, Some(id)) = (decision.reason, decision.issuer) {
        let tenant = decision.tenant.clone();
        let seen = snapshot.keys.generation_for(id, tenant.as_deref());
        let fetch_span = span
            .as_ref()
            .zip(snapshot.telemetry.as_deref())
            .map(|(s, t)| s.jwks_fetch(t, &snapshot.config.policy.issuers[id].name));
        let refetch = tokio::time::timeout(REFETCH_WAIT, snapshot.keys.refetch(id, tenant.as_deref(), seen));
        let refetched = refetch.await.unwrap_or(false);
        if let Some(fetch_span) = fetch_span {
            fetch_span.end(refetched);
        }
        if refetched {
            decision = authz::evaluate_tenants(policy, input, keys, &memo, unix_now());
        }
    }
    let trace_id = span.as_ref().and_then(CheckSpan::trace_id);
    record_traced(snapshot, &decision, input, started, trace_id.as_deref());
    if let Some(span) = span {
        let issuer = decision
            .issuer
            .map_or("", |i| snapshot.config.policy.issuers[i].name.as_str());
        span.end(
            decision.route_name(),
            decision.verdict.label(),
            decision.reason.code(),
            issuer,
        );
    }
    decision
}

/// Count and log a decision (also one an adapter made itself, such as a request it could not
/// read); `started` is when the check began.
pub fn record(snapshot: &Snapshot, decision: &Decision<'_>, input: &CheckInput<'_>, started: Instant) {
    record_traced(snapshot, decision, input, started, None);
}

fn record_traced(
    snapshot: &Snapshot,
    decision: &Decision<'_>,
    input: &CheckInput<'_>,
    started: Instant,
    trace_id: Option<&str>,
) {
    let elapsed = started.elapsed();
    snapshot
        .metrics
        .record(decision.route_name(), decision.verdict, decision.reason, elapsed);
    log(snapshot, decision, input, elapsed, trace_id);
}

fn log(snapshot: &Snapshot, d: &Decision<'_>, input: &CheckInput<'_>, elapsed: Duration, trace_id: Option<&str>) {
    if !snapshot.config.log_decisions.wants(d.verdict) {
        return;
    }
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
        trace_id,
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
