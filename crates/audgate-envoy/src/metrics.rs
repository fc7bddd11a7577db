//! The module's metrics, as Envoy stats (so they appear in Envoy's `/stats/prometheus`, prefixed
//! `envoy_dynamicmodulescustom_`).
//!
//! Envoy 1.40's ABI lets a module define stats only while `on_http_filter_config_new` runs; after
//! that it can only increment them. Two ways in, by where the event happens:
//!
//! - **On a worker, per request** (the decision count and its duration): through the stream's
//!   own callbacks (`http_filter_increment_counter`, `http_filter_record_histogram_value`), in
//!   the hook that decided.
//! - **Anywhere else** (verified-token cache hits and misses, which the shared cache counts
//!   through the `metrics` facade; key refreshes on the background thread; config reloads):
//!   into the atomics of [`Pending`], which the background thread hands to Envoy's main thread
//!   once a second through the config scheduler; the main thread adds them with
//!   `http_filter_config_increment_counter`. Envoy's stats are not safe to touch from a thread
//!   Envoy does not know, so the background thread never calls into them itself.
//!
//! Envoy histograms take whole numbers, so the check's duration is recorded in microseconds
//! (`audgate_check_duration_microseconds`); `audgate serve`'s is in seconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Decisions by route, decision and reason (SPEC.md's `audgate_checks_total`).
pub const CHECKS: (&str, &[&str]) = ("audgate_checks_total", &["route", "decision", "reason"]);
/// How long a check took inside the module, by route, in microseconds.
pub const CHECK_DURATION: (&str, &[&str]) = ("audgate_check_duration_microseconds", &["route"]);
pub const CACHE_HITS: (&str, &[&str]) = ("audgate_token_cache_hits_total", &[]);
pub const CACHE_MISSES: (&str, &[&str]) = ("audgate_token_cache_misses_total", &[]);
/// Key refreshes and refetches by issuer and result (`ok`, `error`).
pub const JWKS_REFRESH: (&str, &[&str]) = ("audgate_jwks_refresh_total", &["issuer", "result"]);
/// Config file reloads by result (`ok`, `error`).
pub const CONFIG_RELOADS: (&str, &[&str]) = ("audgate_config_reloads_total", &["result"]);

/// Envoy's ids of the stats a filter config defined (each `None` when Envoy refused it).
#[derive(Debug, Default, Clone, Copy)]
pub struct StatIds {
    pub checks: Option<usize>,
    pub check_duration: Option<usize>,
    pub cache_hits: Option<usize>,
    pub cache_misses: Option<usize>,
    pub jwks_refresh: Option<usize>,
    pub config_reloads: Option<usize>,
}

/// Counts made off Envoy's workers, waiting to be added to Envoy's counters on the main thread.
#[derive(Default)]
pub struct Pending {
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_error: AtomicU64,
    /// (issuer, result) -> refreshes; issuers are configured names, so the map stays small.
    jwks: Mutex<HashMap<(String, &'static str), u64>>,
}

/// One flush: what to add to each of Envoy's counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Flush {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub reloads: Vec<(&'static str, u64)>,
    pub jwks: Vec<(String, &'static str, u64)>,
}

impl Flush {
    pub fn is_empty(&self) -> bool {
        self.cache_hits == 0 && self.cache_misses == 0 && self.reloads.is_empty() && self.jwks.is_empty()
    }
}

impl Pending {
    pub fn reload(&self, ok: bool) {
        if ok { &self.reloads_ok } else { &self.reloads_error }.fetch_add(1, Ordering::Relaxed);
    }

    fn jwks_refresh(&self, issuer: &str, result: &'static str) {
        let mut jwks = self.jwks.lock().unwrap_or_else(|e| e.into_inner());
        *jwks.entry((issuer.to_owned(), result)).or_default() += 1;
    }

    /// Whether anything waits to be flushed (cheap: for the background thread's tick).
    pub fn any(&self) -> bool {
        self.cache_hits.load(Ordering::Relaxed) != 0
            || self.cache_misses.load(Ordering::Relaxed) != 0
            || self.reloads_ok.load(Ordering::Relaxed) != 0
            || self.reloads_error.load(Ordering::Relaxed) != 0
            || !self.jwks.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Take everything counted so far (each count is taken exactly once).
    pub fn take(&self) -> Flush {
        let reloads = [
            ("ok", self.reloads_ok.swap(0, Ordering::Relaxed)),
            ("error", self.reloads_error.swap(0, Ordering::Relaxed)),
        ];
        let jwks = std::mem::take(&mut *self.jwks.lock().unwrap_or_else(|e| e.into_inner()));
        Flush {
            cache_hits: self.cache_hits.swap(0, Ordering::Relaxed),
            cache_misses: self.cache_misses.swap(0, Ordering::Relaxed),
            reloads: reloads.into_iter().filter(|(_, n)| *n != 0).collect(),
            jwks: jwks
                .into_iter()
                .map(|((issuer, result), n)| (issuer, result, n))
                .collect(),
        }
    }
}

/// A `metrics` recorder that counts the shared crates' metrics (audgate-keys counts cache hits
/// and misses and key refreshes through the `metrics` facade) into one config's [`Pending`].
/// Installed as the thread's local recorder where that config's key caches and token caches
/// are built and run (see [`Recording::scope`]); every other metric is dropped.
pub struct Recording(pub Arc<Pending>);

impl Recording {
    /// Run `f` with this recorder as the thread's recorder.
    pub fn scope<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self, f)
    }
}

enum Target {
    CacheHits,
    CacheMisses,
    Jwks { issuer: String, result: &'static str },
}

struct PendingCounter {
    pending: Arc<Pending>,
    target: Target,
}

impl CounterFn for PendingCounter {
    fn increment(&self, value: u64) {
        let p = &self.pending;
        match &self.target {
            Target::CacheHits => {
                p.cache_hits.fetch_add(value, Ordering::Relaxed);
            }
            Target::CacheMisses => {
                p.cache_misses.fetch_add(value, Ordering::Relaxed);
            }
            Target::Jwks { issuer, result } => {
                for _ in 0..value {
                    p.jwks_refresh(issuer, result);
                }
            }
        }
    }

    fn absolute(&self, _value: u64) {}
}

impl Recorder for Recording {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let label = |name: &str| key.labels().find(|l| l.key() == name).map(|l| l.value().to_owned());
        let target = match key.name() {
            n if n == CACHE_HITS.0 => Target::CacheHits,
            n if n == CACHE_MISSES.0 => Target::CacheMisses,
            n if n == JWKS_REFRESH.0 => Target::Jwks {
                issuer: label("issuer").unwrap_or_default(),
                result: if label("result").as_deref() == Some("ok") {
                    "ok"
                } else {
                    "error"
                },
            },
            _ => return Counter::noop(),
        };
        Counter::from_arc(Arc::new(PendingCounter {
            pending: Arc::clone(&self.0),
            target,
        }))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_crates_counts_land_in_pending_once() {
        let recording = Recording(Arc::new(Pending::default()));
        recording.scope(|| {
            metrics::counter!(CACHE_HITS.0).increment(2);
            metrics::counter!(CACHE_MISSES.0).increment(1);
            metrics::counter!(JWKS_REFRESH.0, "issuer" => "corp", "result" => "ok").increment(1);
            metrics::counter!(JWKS_REFRESH.0, "issuer" => "corp", "result" => "error").increment(1);
            metrics::counter!("something_else").increment(5);
        });
        // outside the scope, nothing is recorded here
        metrics::counter!(CACHE_HITS.0).increment(7);
        recording.0.reload(true);
        assert!(recording.0.any());
        let mut flush = recording.0.take();
        flush.jwks.sort();
        assert_eq!(
            flush,
            Flush {
                cache_hits: 2,
                cache_misses: 1,
                reloads: vec![("ok", 1)],
                jwks: vec![("corp".into(), "error", 1), ("corp".into(), "ok", 1)],
            }
        );
        assert!(!recording.0.any());
        assert!(recording.0.take().is_empty());
    }
}
