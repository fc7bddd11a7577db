//! The module's metrics, as Envoy stats (so they appear in Envoy's `/stats/prometheus`, prefixed
//! `envoy_dynamicmodulescustom_`).
//!
//! Envoy 1.40's ABI lets a module define stats only while `on_http_filter_config_new` runs; after
//! that it can only add to them. A stat with labels costs Envoy a stat-name build and a scope
//! lookup on every call, one without labels an add to a stat it already holds; so:
//!
//! - **The check's duration**: an unlabelled histogram, recorded through the stream's own
//!   callback (`http_filter_record_histogram_value`) in the hook that decided. Envoy histograms
//!   take whole numbers, so it is in microseconds (`audgate_check_duration_microseconds`);
//!   `audgate serve`'s is in seconds, by route.
//! - **Decisions by route, decision and reason** (`audgate_checks_total`): counted on the worker
//!   into the config's [`CheckCounts`] (one relaxed atomic add, no call into Envoy), and handed
//!   to Envoy once a second like the counts below.
//! - **Anywhere else** (verified-token cache hits and misses, which the shared cache counts
//!   through the `metrics` facade; key refreshes on the background thread; config reloads):
//!   into the atomics of [`Pending`].
//!
//! The background thread moves the decision counts into [`Pending`] once a second and hands it
//! to Envoy's main thread through the config scheduler; the main thread adds it with
//! `http_filter_config_increment_counter`. Envoy's stats are not safe to touch from a thread
//! Envoy does not know, so the background thread never calls into them itself. A count reaches
//! `/stats/prometheus` within about a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use audgate_core::authz::{NO_ROUTE, Reason, Verdict};
use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Decisions by route, decision and reason (SPEC.md's `audgate_checks_total`).
pub const CHECKS: (&str, &[&str]) = ("audgate_checks_total", &["route", "decision", "reason"]);
/// How long a check took inside the module, in microseconds.
pub const CHECK_DURATION: (&str, &[&str]) = ("audgate_check_duration_microseconds", &[]);
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
    /// (route, decision, reason) -> decisions, moved here from [`CheckCounts`].
    checks: Mutex<HashMap<(String, &'static str, &'static str), u64>>,
}

/// One flush: what to add to each of Envoy's counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Flush {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub reloads: Vec<(&'static str, u64)>,
    pub jwks: Vec<(String, &'static str, u64)>,
    /// (route, decision, reason, decisions).
    pub checks: Vec<(String, &'static str, &'static str, u64)>,
}

impl Flush {
    pub fn is_empty(&self) -> bool {
        self.cache_hits == 0
            && self.cache_misses == 0
            && self.reloads.is_empty()
            && self.jwks.is_empty()
            && self.checks.is_empty()
    }
}

impl Pending {
    pub fn reload(&self, ok: bool) {
        if ok { &self.reloads_ok } else { &self.reloads_error }.fetch_add(1, Ordering::Relaxed);
    }

    fn checks(&self, route: &str, verdict: Verdict, reason: Reason, n: u64) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        *checks
            .entry((route.to_owned(), verdict.label(), reason.code()))
            .or_default() += n;
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
            || !self.checks.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Take everything counted so far (each count is taken exactly once).
    pub fn take(&self) -> Flush {
        let reloads = [
            ("ok", self.reloads_ok.swap(0, Ordering::Relaxed)),
            ("error", self.reloads_error.swap(0, Ordering::Relaxed)),
        ];
        let jwks = std::mem::take(&mut *self.jwks.lock().unwrap_or_else(|e| e.into_inner()));
        let checks = std::mem::take(&mut *self.checks.lock().unwrap_or_else(|e| e.into_inner()));
        Flush {
            cache_hits: self.cache_hits.swap(0, Ordering::Relaxed),
            cache_misses: self.cache_misses.swap(0, Ordering::Relaxed),
            reloads: reloads.into_iter().filter(|(_, n)| *n != 0).collect(),
            jwks: jwks
                .into_iter()
                .map(|((issuer, result), n)| (issuer, result, n))
                .collect(),
            checks: checks
                .into_iter()
                .map(|((route, decision, reason), n)| (route, decision, reason, n))
                .collect(),
        }
    }
}

/// One config's decisions by route, verdict and reason, counted on Envoy's workers: a table of
/// atomics, one row per route (and [`NO_ROUTE`]) of [`Verdict::ALL`] x [`Reason::ALL`] cells.
/// [`CheckCounts::drain`] moves them into the [`Pending`] they were made for; dropping the table
/// (the config it counted for was replaced and its last check ended) drains it one last time,
/// so no decision goes uncounted across a reload.
pub struct CheckCounts {
    rows: HashMap<String, Box<[AtomicU64]>>,
    pending: Arc<Pending>,
}

const CELLS: usize = Verdict::ALL.len() * Reason::ALL.len();

impl CheckCounts {
    /// A table for these route names (and [`NO_ROUTE`]), draining into `pending`.
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a str>, pending: Arc<Pending>) -> CheckCounts {
        let rows = routes
            .into_iter()
            .chain([NO_ROUTE])
            .map(|name| (name.to_owned(), (0..CELLS).map(|_| AtomicU64::new(0)).collect()))
            .collect();
        CheckCounts { rows, pending }
    }

    /// Count one decision (a route this table does not know is counted straight into
    /// [`Pending`]: it cannot happen, the decision came from the same config).
    pub fn count(&self, route: &str, verdict: Verdict, reason: Reason) {
        match self.rows.get(route) {
            Some(row) => {
                row[verdict as usize * Reason::ALL.len() + reason as usize].fetch_add(1, Ordering::Relaxed);
            }
            None => self.pending.checks(route, verdict, reason, 1),
        }
    }

    /// Move the counts made so far into [`Pending`] (each decision exactly once).
    pub fn drain(&self) {
        for (route, row) in &self.rows {
            for (cell, n) in row.iter().enumerate() {
                if n.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let n = n.swap(0, Ordering::Relaxed);
                let verdict = Verdict::ALL[cell / Reason::ALL.len()];
                let reason = Reason::ALL[cell % Reason::ALL.len()];
                self.pending.checks(route, verdict, reason, n);
            }
        }
    }
}

impl Drop for CheckCounts {
    fn drop(&mut self) {
        self.drain();
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
                checks: vec![],
            }
        );
        assert!(!recording.0.any());
        assert!(recording.0.take().is_empty());
    }

    #[test]
    fn decisions_are_counted_once_across_drains_and_a_replaced_table() {
        let pending = Arc::new(Pending::default());
        let counts = CheckCounts::new(["orders"], Arc::clone(&pending));
        counts.count("orders", Verdict::Allow, Reason::Allowed);
        counts.count("orders", Verdict::Allow, Reason::Allowed);
        counts.count(NO_ROUTE, Verdict::Deny, Reason::NoRoute);
        // the last cell of the table
        counts.count("orders", Verdict::Error, Reason::KeysUnavailable);
        assert!(!pending.any(), "counted on the table, not yet handed on");
        counts.drain();
        counts.drain();
        let mut checks = pending.take().checks;
        checks.sort();
        assert_eq!(
            checks,
            [
                (NO_ROUTE.to_owned(), "deny", "no_route", 1),
                ("orders".to_owned(), "allow", "allowed", 2),
                ("orders".to_owned(), "error", "keys_unavailable", 1),
            ]
        );
        // a route the table does not know still counts; a replaced table's last counts are
        // drained when it goes
        counts.count("elsewhere", Verdict::Deny, Reason::Expired);
        counts.count("orders", Verdict::DryRunDeny, Reason::AudienceMismatch);
        drop(counts);
        let mut checks = pending.take().checks;
        checks.sort();
        assert_eq!(
            checks,
            [
                ("elsewhere".to_owned(), "deny", "expired", 1),
                ("orders".to_owned(), "dry_run_deny", "audience_mismatch", 1),
            ]
        );
        assert!(pending.take().is_empty());
    }
}
