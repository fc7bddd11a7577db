//! The keys of a templated issuer (`issuer: https://sso.example.com/realms/{tenant}`): one
//! [`IssuerKeys`] per tenant, each with its own refresh and rate-limited refetch.
//!
//! Listed tenants (`tenants: [...]`) are created at start and refreshed like issuers; they
//! count for readiness. Pattern tenants (`tenant_pattern`) are created on first use: at most
//! `max_tenants` are held (the least recently used is dropped first), and every fetch a request
//! triggers for them takes from one budget per issuer, `max_tenants` fetches per
//! `min_refresh_interval`. So a flood of made-up tenant names (each a valid-looking `iss`)
//! holds at most `max_tenants` caches and makes at most that many fetches a window from the
//! configured host; while the budget is spent, new tenants answer `keys_unavailable`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::cache::{IssuerKeys, TenantGauge};
use super::keyset::KeySet;
use crate::authz::tenant::{TenantSet, fill};
use crate::config::{KeySource, KeySourceConfig};

pub struct TenantKeys {
    name: String,
    /// The key source with `{tenant}` still in it.
    template: KeySourceConfig,
    /// What the tenants are (for reuse across reloads): the list, or pattern and bound.
    spec: String,
    /// `None`: listed tenants (fixed); `Some(max)`: pattern tenants, at most `max` held.
    max: Option<usize>,
    entries: Mutex<Entries>,
    budget: Mutex<Budget>,
    gauge: Arc<TenantGauge>,
}

#[derive(Default)]
struct Entries {
    /// tenant -> keys, last use
    map: HashMap<String, (Arc<IssuerKeys>, u64)>,
    tick: u64,
}

struct Budget {
    window_start: Instant,
    used: usize,
}

impl TenantKeys {
    /// The caches of a templated issuer; for listed tenants, also their key caches, for the
    /// caller to start refreshing.
    pub fn new(
        name: &str,
        template: &KeySourceConfig,
        set: &TenantSet,
    ) -> Result<(TenantKeys, Vec<Arc<IssuerKeys>>), String> {
        let gauge = Arc::new(TenantGauge::new(name.to_owned()));
        let mut keys = TenantKeys {
            name: name.to_owned(),
            template: template.clone(),
            spec: spec(set),
            max: None,
            entries: Mutex::new(Entries::default()),
            budget: Mutex::new(Budget {
                window_start: Instant::now(),
                used: 0,
            }),
            gauge,
        };
        let mut fresh = Vec::new();
        match set {
            TenantSet::Listed(list) => {
                let mut entries = Entries::default();
                for tenant in list {
                    let k = Arc::new(keys.create(tenant)?);
                    fresh.push(Arc::clone(&k));
                    entries.map.insert(tenant.clone(), (k, 0));
                }
                keys.entries = Mutex::new(entries);
            }
            TenantSet::Pattern { max, .. } => keys.max = Some(*max),
        }
        Ok((keys, fresh))
    }

    fn create(&self, tenant: &str) -> Result<IssuerKeys, String> {
        let config = tenant_source(&self.template, tenant);
        IssuerKeys::new_tenant(self.name.clone(), tenant.to_owned(), config, Arc::clone(&self.gauge))
    }

    /// Whether this cache can serve `other`'s issuer after a reload (same source and tenants).
    pub fn same_as(&self, name: &str, template: &KeySourceConfig, set: &TenantSet) -> bool {
        self.name == name && &self.template == template && self.spec == spec(set)
    }

    fn entry(&self, tenant: &str) -> Option<Arc<IssuerKeys>> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.tick += 1;
        let tick = e.tick;
        e.map.get_mut(tenant).map(|(k, used)| {
            *used = tick;
            Arc::clone(k)
        })
    }

    /// A tenant's current keys, `None` while they never loaded (or the tenant is not held).
    pub fn current(&self, tenant: &str) -> Option<Arc<KeySet>> {
        self.entry(tenant).and_then(|k| k.current())
    }

    pub fn generation(&self, tenant: &str) -> u64 {
        self.entry(tenant).map_or(0, |k| k.generation())
    }

    /// Take one fetch from the issuer's budget: `max_tenants` per `min_refresh_interval`.
    fn take_budget(&self) -> bool {
        let Some(max) = self.max else { return true };
        let window = self.template.min_refresh_interval.max(Duration::from_secs(1));
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        if b.window_start.elapsed() >= window {
            b.window_start = Instant::now();
            b.used = 0;
        }
        if b.used >= max {
            return false;
        }
        b.used += 1;
        true
    }

    /// A request met a tenant's unknown `kid` or its missing keys: fetch them, within the
    /// tenant's own rate limit and (for pattern tenants) the issuer's budget. A pattern tenant
    /// not held yet is created only when the budget allows its first fetch, dropping the least
    /// recently used tenant when `max_tenants` are held. Returns whether the keys changed.
    pub async fn refetch(&self, tenant: &str, seen_generation: u64) -> bool {
        if let Some(keys) = self.entry(tenant) {
            return keys.refetch_if(seen_generation, || self.take_budget()).await;
        }
        let Some(max) = self.max else {
            return false; // a listed issuer has no other tenants
        };
        if !self.take_budget() {
            tracing::debug!(issuer = %self.name, "tenant key fetch budget spent: no new tenant now");
            return false;
        }
        let keys = {
            let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((k, _)) = e.map.get(tenant) {
                Arc::clone(k) // created meanwhile by a concurrent request
            } else {
                let created = match self.create(tenant) {
                    Ok(k) => Arc::new(k),
                    Err(err) => {
                        tracing::warn!(issuer = %self.name, error = %err, "tenant key cache not created");
                        return false;
                    }
                };
                while e.map.len() >= max {
                    let Some(oldest) = e.map.iter().min_by_key(|(_, (_, used))| *used).map(|(t, _)| t.clone()) else {
                        break;
                    };
                    e.map.remove(&oldest);
                }
                e.tick += 1;
                let tick = e.tick;
                e.map.insert(tenant.to_owned(), (Arc::clone(&created), tick));
                tokio::spawn(IssuerKeys::run_tenant_refresh(Arc::downgrade(&created)));
                created
            }
        };
        keys.refetch_if(seen_generation, || true).await
    }

    /// Listed tenants whose keys never loaded (pattern tenants never block readiness).
    pub fn missing(&self) -> Vec<String> {
        if self.max.is_some() {
            return Vec::new();
        }
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = e
            .map
            .iter()
            .filter(|(_, (k, _))| k.current().is_none())
            .map(|(t, _)| t.clone())
            .collect();
        out.sort();
        out
    }

    /// Tenants held now (listed, or pattern tenants in the cache).
    pub fn held(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).map.len()
    }

    /// `audgate_jwks_keys` of this issuer: the keys of every loaded tenant.
    pub fn key_count(&self) -> i64 {
        self.gauge.total()
    }
}

/// A templated issuer's key source for one tenant: `{tenant}` filled in.
pub fn tenant_source(template: &KeySourceConfig, tenant: &str) -> KeySourceConfig {
    let mut config = template.clone();
    config.source = match &config.source {
        KeySource::Discovery(url) => KeySource::Discovery(fill(url, tenant)),
        KeySource::JwksUri(url) => KeySource::JwksUri(fill(url, tenant)),
        KeySource::File(path) => KeySource::File(fill(&path.to_string_lossy(), tenant).into()),
    };
    config
}

impl Drop for TenantKeys {
    fn drop(&mut self) {
        // runs before the tenant caches (fields) drop: their counts leave the sum silently
        self.gauge.retire();
    }
}

fn spec(set: &TenantSet) -> String {
    match set {
        TenantSet::Listed(list) => format!("listed {}", list.join(",")),
        TenantSet::Pattern { pattern, max, .. } => format!("pattern {pattern} max {max}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k","use":"sig","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]}"#;

    fn store(dir: &std::path::Path, max: usize) -> TenantKeys {
        let template = KeySourceConfig {
            source: KeySource::File(PathBuf::from(format!("{}/{{tenant}}.json", dir.display()))),
            refresh_interval: Duration::from_secs(300),
            min_refresh_interval: Duration::from_secs(30),
            ca_file: None,
        };
        let set = TenantSet::pattern("^[a-z0-9-]+$", max).unwrap();
        TenantKeys::new("teams", &template, &set).unwrap().0
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_made_up_tenants_holds_at_most_max_and_fetches_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        for t in ["a", "b", "c", "d"] {
            std::fs::write(dir.path().join(format!("{t}.json")), JWKS).unwrap();
        }
        let keys = store(dir.path(), 3);
        assert!(keys.refetch("a", 0).await, "a real tenant loads on first use");
        assert!(keys.current("a").is_some());
        // 10,000 made-up names in one window: 2 get a fetch (the budget is 3), none loads
        for i in 0..10_000 {
            assert!(!keys.refetch(&format!("fake-{i}"), 0).await);
            assert!(keys.held() <= 3);
        }
        assert_eq!(keys.held(), 3);
        assert!(keys.current("a").is_some(), "the recently used tenant is kept");
        // a real tenant must wait for the next window, then loads and evicts the LRU fake
        assert!(!keys.refetch("b", 0).await);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(keys.refetch("b", 0).await);
        assert_eq!(keys.held(), 3);
        assert!(keys.current("a").is_some() && keys.current("b").is_some());
        // a known tenant's refetch is rate limited per tenant as well
        assert!(!keys.refetch("b", keys.generation("b")).await);
        assert_eq!(keys.key_count(), 2, "the gauge sums the loaded tenants");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(keys.refetch("c", 0).await);
        assert!(keys.refetch("d", 0).await);
        // a, b, c, d used in that order: a was the least recently used, so it went first
        assert_eq!(keys.held(), 3);
        assert!(keys.current("a").is_none());
        assert_eq!(keys.key_count(), 3, "an evicted tenant's keys leave the gauge");
        assert!(keys.missing().is_empty(), "pattern tenants never block readiness");
    }
}
