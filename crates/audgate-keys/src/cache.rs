//! Per-issuer key cache: the last good key set, periodic refresh, and the rate-limited,
//! single-flight refetch a request triggers when it meets an unknown `kid`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::fetch::Fetcher;
use super::keyset::KeySet;
use crate::config::KeySourceConfig;
use crate::metrics;

/// Wait between load attempts while an issuer's keys have never loaded.
const FIRST_LOAD_RETRY_MIN: Duration = Duration::from_millis(500);
const FIRST_LOAD_RETRY_MAX: Duration = Duration::from_secs(30);

/// One issuer's keys.
pub struct IssuerKeys {
    name: String,
    config: KeySourceConfig,
    fetcher: Fetcher,
    /// The last good key set; `None` until the first successful load. A std lock: it is held
    /// only to clone or replace an `Arc`, never across an await.
    current: RwLock<Option<Arc<KeySet>>>,
    /// Bumped whenever the published key set changes (cached tokens compare it).
    generation: AtomicU64,
    /// Held while fetching, so concurrent requests share one fetch.
    fetch: Mutex<FetchState>,
    /// The tenant of a templated issuer these keys belong to (logs only).
    tenant: Option<String>,
    /// A tenant's keys count into its issuer's `audgate_jwks_keys` through this sum.
    gauge: Option<Arc<TenantGauge>>,
    /// Keys in the last good set (what this cache adds to the gauge).
    key_count: AtomicUsize,
}

/// `audgate_jwks_keys` of a templated issuer: the sum over its loaded tenants (the issuer's
/// name stays the only label).
pub struct TenantGauge {
    name: String,
    total: AtomicI64,
    /// Cleared when the issuer's tenant caches are replaced (a reload): the caches dropped
    /// with them must not lower the gauge the new ones set.
    live: AtomicBool,
}

impl TenantGauge {
    pub fn new(name: String) -> TenantGauge {
        TenantGauge {
            name,
            total: AtomicI64::new(0),
            live: AtomicBool::new(true),
        }
    }

    fn add(&self, delta: i64) {
        let total = self.total.fetch_add(delta, Ordering::AcqRel) + delta;
        if self.live.load(Ordering::Acquire) {
            metrics::set_jwks_keys(&self.name, usize::try_from(total).unwrap_or(0));
        }
    }

    /// Stop reporting: the caches this gauge sums are being replaced.
    pub fn retire(&self) {
        self.live.store(false, Ordering::Release);
    }

    pub fn total(&self) -> i64 {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for IssuerKeys {
    fn drop(&mut self) {
        if let Some(gauge) = &self.gauge {
            gauge.add(-i64::try_from(self.key_count.load(Ordering::Acquire)).unwrap_or(0));
        }
    }
}

#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    document: Vec<u8>,
    jwks_uri: Option<String>,
}

/// What a fetch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// Loaded; `changed` when the document differs from the previous one.
    Ok { keys: usize, changed: bool },
    /// Failed; the previous keys (if any) stay in use.
    Failed(String),
}

impl IssuerKeys {
    pub fn new(name: String, config: KeySourceConfig) -> Result<IssuerKeys, String> {
        let fetcher = Fetcher::new(config.ca_file.as_deref())?;
        Ok(IssuerKeys {
            name,
            config,
            fetcher,
            current: RwLock::new(None),
            generation: AtomicU64::new(0),
            fetch: Mutex::new(FetchState::default()),
            tenant: None,
            gauge: None,
            key_count: AtomicUsize::new(0),
        })
    }

    /// The keys of one tenant of a templated issuer: `config` has the tenant filled in, and the
    /// key count goes into `gauge`.
    pub fn new_tenant(
        name: String,
        tenant: String,
        config: KeySourceConfig,
        gauge: Arc<TenantGauge>,
    ) -> Result<IssuerKeys, String> {
        let mut keys = IssuerKeys::new(name, config)?;
        keys.tenant = Some(tenant);
        keys.gauge = Some(gauge);
        Ok(keys)
    }

    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// [`Self::refetch_for_unknown_kid`], where a fetch that the per-issuer rate limit
    /// would allow also needs `permit()` (a budget shared by many tenants).
    pub async fn refetch_if(&self, seen_generation: u64, permit: impl FnOnce() -> bool) -> bool {
        let mut state = self.fetch.lock().await;
        if self.generation() != seen_generation {
            return true;
        }
        let recent = state
            .last_attempt
            .is_some_and(|t| t.elapsed() < self.config.min_refresh_interval);
        if recent || !permit() {
            return false;
        }
        let outcome = self.fetch_locked(&mut state).await;
        tracing::info!(issuer = %self.name, tenant = ?self.tenant, outcome = ?outcome, "JWKS fetch for a tenant");
        self.generation() != seen_generation
    }

    /// A templated issuer's tenant keys: refresh every `refresh_interval` once loaded, never
    /// retry a load that failed (the next request does, within the rate limits). Ends once the
    /// tenant is dropped from the cache.
    pub async fn run_tenant_refresh(keys: Weak<IssuerKeys>) {
        loop {
            let Some(wait) = keys.upgrade().map(|k| k.config.refresh_interval) else {
                return;
            };
            tokio::time::sleep(wait).await;
            let Some(this) = keys.upgrade() else { return };
            if this.current().is_some() {
                let outcome = this.refresh().await;
                tracing::info!(issuer = %this.name, tenant = ?this.tenant, outcome = ?outcome, "JWKS refreshed");
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &KeySourceConfig {
        &self.config
    }

    /// The current key set, `None` while it has never loaded.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Fetch now (periodic refresh, start-up).
    pub async fn refresh(&self) -> Refreshed {
        let mut state = self.fetch.lock().await;
        self.fetch_locked(&mut state).await
    }

    /// A request met a `kid` (or found no keys) it could not use: refetch, unless a fetch
    /// already ran within `min_refresh_interval`. Requests arriving during a fetch wait for it
    /// and share its result. Returns whether the key set changed since `seen_generation`.
    pub async fn refetch_for_unknown_kid(&self, seen_generation: u64) -> bool {
        let mut state = self.fetch.lock().await;
        if self.generation() != seen_generation {
            return true; // someone else's fetch brought new keys while we waited
        }
        let recent = state
            .last_attempt
            .is_some_and(|t| t.elapsed() < self.config.min_refresh_interval);
        if recent {
            return false;
        }
        let outcome = self.fetch_locked(&mut state).await;
        tracing::info!(issuer = %self.name, outcome = ?outcome, "JWKS refetch for an unknown kid");
        self.generation() != seen_generation
    }

    async fn fetch_locked(&self, state: &mut FetchState) -> Refreshed {
        // Set at the start (a check's fetch may be cancelled half-way) and again at the end,
        // so that requests that waited for this fetch never start another one right after it:
        // a check waits for at most one fetch, however slow the issuer.
        state.last_attempt = Some(Instant::now());
        let fetched = self.fetcher.fetch(&self.config.source, state.jwks_uri.as_deref()).await;
        state.last_attempt = Some(Instant::now());
        let fetched = match fetched {
            Ok(f) => f,
            Err(e) => {
                state.jwks_uri = None; // re-run discovery next time: the JWKS may have moved
                metrics::record_jwks_refresh(&self.name, false);
                return Refreshed::Failed(e);
            }
        };
        metrics::record_jwks_refresh(&self.name, true);
        let count = fetched.keys.keys().len();
        match &self.gauge {
            Some(gauge) => {
                let before = self.key_count.swap(count, Ordering::AcqRel);
                gauge.add(i64::try_from(count).unwrap_or(0) - i64::try_from(before).unwrap_or(0));
            }
            None => {
                self.key_count.store(count, Ordering::Release);
                metrics::set_jwks_keys(&self.name, count);
            }
        }
        state.jwks_uri = fetched.jwks_uri;
        for skipped in fetched.keys.skipped() {
            tracing::debug!(issuer = %self.name, kid = ?skipped.kid, why = %skipped.why, "JWKS key skipped");
        }
        let keys = fetched.keys.keys().len();
        let changed = fetched.document != state.document || self.current().is_none();
        if changed {
            state.document = fetched.document;
            // the set carries its generation before it is published, so a token verified with
            // it is never cached under an older generation
            let generation = self.generation() + 1;
            *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                Some(Arc::new(fetched.keys.with_generation(generation)));
            self.generation.store(generation, Ordering::Release);
        }
        Refreshed::Ok { keys, changed }
    }

    /// Keep the keys fresh: retry quickly (with backoff) until the first load succeeds, then
    /// refresh every `refresh_interval`. Holds only a weak reference between fetches: once no
    /// config uses these keys any more, the loop ends at its next wake-up.
    pub async fn run_refresh(keys: Weak<IssuerKeys>) {
        let mut retry = FIRST_LOAD_RETRY_MIN;
        while let Some(this) = keys.upgrade() {
            match this.refresh().await {
                Refreshed::Ok { keys, changed } => {
                    tracing::info!(issuer = %this.name, keys, changed, "JWKS refreshed");
                }
                Refreshed::Failed(e) if this.current().is_some() => {
                    tracing::warn!(issuer = %this.name, error = %e, "JWKS refresh failed; keeping the last good keys");
                }
                Refreshed::Failed(e) => {
                    tracing::warn!(issuer = %this.name, error = %e, retry_in = ?retry, "JWKS not loaded yet");
                }
            }
            let wait = if this.current().is_some() {
                retry = FIRST_LOAD_RETRY_MIN;
                this.config.refresh_interval
            } else {
                let wait = retry;
                retry = (retry * 2).min(FIRST_LOAD_RETRY_MAX).min(this.config.refresh_interval);
                wait
            };
            drop(this);
            tokio::time::sleep(wait).await;
        }
    }
}
