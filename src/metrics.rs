//! The metrics of SPEC.md, as domain functions over the `metrics` facade. Every label value
//! comes from the config (route and issuer names, the config hash) or from a closed enum
//! (decision, reason, result): nothing a request or token carries ever becomes a label.
//!
//! Until [`install`] runs (the binary does it; library tests do not), recording is a no-op.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::authz::{NO_ROUTE, Reason, Verdict};

const CHECKS: &str = "audgate_checks_total";
const CHECK_DURATION: &str = "audgate_check_duration_seconds";
const JWKS_REFRESH: &str = "audgate_jwks_refresh_total";
const JWKS_KEYS: &str = "audgate_jwks_keys";
const CONFIG_RELOADS: &str = "audgate_config_reloads_total";
const CONFIG_INFO: &str = "audgate_config_info";
const CACHE_HITS: &str = "audgate_token_cache_hits_total";
const CACHE_MISSES: &str = "audgate_token_cache_misses_total";
/// Not in SPEC.md's table: only with `tracing:` (src/telemetry.rs).
const TRACE_SPANS_DROPPED: &str = "audgate_trace_spans_dropped_total";

/// Check latency buckets, in seconds: from a cache hit (tens of µs) to a JWKS refetch.
const DURATION_BUCKETS: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Install the Prometheus recorder process-wide; the handle renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(CHECK_DURATION.to_owned()), &DURATION_BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe_counter!(CHECKS, "Checks answered, by route, decision and reason.");
    describe_histogram!(
        CHECK_DURATION,
        metrics::Unit::Seconds,
        "Time to decide one check, by route."
    );
    describe_counter!(JWKS_REFRESH, "JWKS fetches, by issuer and result.");
    describe_gauge!(JWKS_KEYS, "Usable signing keys in the issuer's current key set.");
    describe_counter!(CONFIG_RELOADS, "Config reloads, by result.");
    describe_gauge!(CONFIG_INFO, "1 for the hash of the loaded config.");
    describe_counter!(CACHE_HITS, "Tokens found in the verified-token cache.");
    describe_counter!(CACHE_MISSES, "Tokens verified because the cache did not have them.");
    counter!(CACHE_HITS).absolute(0);
    counter!(CACHE_MISSES).absolute(0);
    for result in ["ok", "error"] {
        counter!(CONFIG_RELOADS, "result" => result).absolute(0);
    }
    Ok(handle)
}

/// The per-check metrics of one config, as handles: a series is registered the first time it
/// is recorded (so `/metrics` lists only what happened), and from then on recording is an
/// atomic add, with no label strings built and no registry lookup per check.
pub struct CheckMetrics {
    routes: HashMap<String, RouteMetrics>,
}

#[derive(Default)]
struct RouteMetrics {
    duration: OnceLock<Histogram>,
    /// By verdict, then reason.
    checks: [[OnceLock<Counter>; Reason::ALL.len()]; Verdict::ALL.len()],
}

impl CheckMetrics {
    /// Handles for these route names and for [`NO_ROUTE`].
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a str>) -> CheckMetrics {
        let routes = routes
            .into_iter()
            .chain([NO_ROUTE])
            .map(|name| (name.to_owned(), RouteMetrics::default()))
            .collect();
        CheckMetrics { routes }
    }

    pub fn record(&self, route: &str, verdict: Verdict, reason: Reason, elapsed: Duration) {
        let Some((name, handles)) = self.routes.get_key_value(route) else {
            // not a route of this config (cannot happen: the decision came from it)
            return record_check(route, verdict, reason, elapsed);
        };
        handles.checks[verdict as usize][reason as usize]
            .get_or_init(|| checks_counter(name, verdict, reason))
            .increment(1);
        handles
            .duration
            .get_or_init(|| histogram!(CHECK_DURATION, "route" => name.clone()))
            .record(elapsed.as_secs_f64());
    }
}

fn checks_counter(route: &str, verdict: Verdict, reason: Reason) -> Counter {
    counter!(CHECKS, "route" => route.to_owned(), "decision" => verdict.label(), "reason" => reason.code())
}

/// One check, without handles (what [`CheckMetrics::record`] does the first time).
pub fn record_check(route: &str, verdict: Verdict, reason: Reason, elapsed: Duration) {
    checks_counter(route, verdict, reason).increment(1);
    histogram!(CHECK_DURATION, "route" => route.to_owned()).record(elapsed.as_secs_f64());
}

pub use audgate_keys::TokenCacheMetrics;

pub fn record_config_reload(ok: bool) {
    counter!(CONFIG_RELOADS, "result" => if ok { "ok" } else { "error" }).increment(1);
}

/// Spans not exported: `queue_full` (the exporter fell behind; the check did not wait) or
/// `export_failed` (the OTLP receiver did not take them).
pub fn trace_spans_dropped(reason: &'static str, spans: u64) {
    counter!(TRACE_SPANS_DROPPED, "reason" => reason).increment(spans);
}

/// With `tracing:` on: the dropped-spans series start at 0, so an alert can use `rate()`.
pub fn describe_tracing() {
    describe_counter!(
        TRACE_SPANS_DROPPED,
        "OpenTelemetry spans not exported, by reason (queue_full, export_failed)."
    );
    for reason in ["queue_full", "export_failed"] {
        counter!(TRACE_SPANS_DROPPED, "reason" => reason).absolute(0);
    }
}

/// Mark `hash` as the loaded config (and a replaced one as no longer loaded).
pub fn set_config_info(previous: Option<&str>, hash: &str) {
    if let Some(old) = previous.filter(|old| *old != hash) {
        gauge!(CONFIG_INFO, "hash" => old.to_owned()).set(0.0);
    }
    gauge!(CONFIG_INFO, "hash" => hash.to_owned()).set(1.0);
}
