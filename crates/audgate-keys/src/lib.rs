//! Issuer keys: fetching a JWKS and caching it per issuer (parsing is in `audgate_core::jwks`).
#![forbid(unsafe_code)]

mod cache;
mod fetch;
mod metrics;
mod tenants;
pub mod token_cache;

use audgate_core::jwks as keyset;
use audgate_core::{authz, config};

use std::sync::Arc;

pub use cache::{IssuerKeys, Refreshed, TenantGauge};
pub use fetch::{Fetcher, MAX_DOCUMENT_BYTES};
pub use keyset::{JwksError, Key, KeyKind, KeySet, SkippedKey};
pub use metrics::TokenCacheMetrics;
pub use tenants::{TenantKeys, tenant_source};

use crate::authz::IssuerId;
use crate::config::Config;

/// The key caches of every configured issuer, indexed by [`IssuerId`].
pub struct KeyStore {
    issuers: Vec<Arc<IssuerKeys>>,
    /// The per-tenant caches of templated issuers, indexed like `issuers` (whose entry for a
    /// templated issuer is never loaded nor refreshed).
    tenants: Vec<Option<Arc<TenantKeys>>>,
}

impl KeyStore {
    /// The key caches for `config`. An issuer whose name and key source are unchanged from
    /// `previous` keeps its cache (and its loaded keys); the others start empty and are
    /// returned in the second list, for the caller to start refreshing.
    pub fn build(config: &Config, previous: Option<&KeyStore>) -> Result<(KeyStore, Vec<Arc<IssuerKeys>>), String> {
        let mut fresh = Vec::new();
        let mut issuers = Vec::with_capacity(config.key_sources.len());
        let mut tenants = Vec::with_capacity(config.key_sources.len());
        for (id, (issuer, source)) in config.policy.issuers.iter().zip(&config.key_sources).enumerate() {
            if let Some(template) = config.policy.template(id) {
                let reusable = previous
                    .into_iter()
                    .flat_map(|p| p.tenants.iter().flatten())
                    .find(|t| t.same_as(&issuer.name, source, &template.tenants));
                let keys = match reusable {
                    Some(keys) => Arc::clone(keys),
                    None => {
                        let (keys, listed) = TenantKeys::new(&issuer.name, source, &template.tenants)?;
                        fresh.extend(listed);
                        Arc::new(keys)
                    }
                };
                tenants.push(Some(keys));
                // a placeholder that is never fetched, so issuer indexes stay as they are
                issuers.push(Arc::new(IssuerKeys::new(issuer.name.clone(), source.clone())?));
                continue;
            }
            tenants.push(None);
            let reusable = previous
                .into_iter()
                .flat_map(|p| p.issuers.iter())
                .find(|k| k.name() == issuer.name && k.config() == source);
            match reusable {
                Some(keys) => issuers.push(Arc::clone(keys)),
                None => {
                    let keys = Arc::new(IssuerKeys::new(issuer.name.clone(), source.clone())?);
                    fresh.push(Arc::clone(&keys));
                    issuers.push(keys);
                }
            }
        }
        Ok((KeyStore { issuers, tenants }, fresh))
    }

    /// Start the periodic refresh of each of `issuers` on the current runtime. The tasks hold
    /// weak references: they end once no key store uses the issuer any more.
    pub fn spawn_refresh(issuers: Vec<Arc<IssuerKeys>>) {
        for keys in issuers {
            tokio::spawn(IssuerKeys::run_refresh(Arc::downgrade(&keys)));
        }
    }

    /// Names of the issuers whose keys have never loaded; a templated issuer's listed
    /// tenants as `NAME (tenant T)` (pattern tenants never block readiness).
    pub fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, tenants) in self.issuers.iter().zip(&self.tenants) {
            match tenants {
                Some(t) => out.extend(
                    t.missing()
                        .into_iter()
                        .map(|tenant| format!("{} (tenant {tenant})", k.name())),
                ),
                None if k.current().is_none() => out.push(k.name().to_owned()),
                None => {}
            }
        }
        out
    }

    /// The per-tenant caches of a templated issuer.
    pub fn tenants(&self, id: IssuerId) -> Option<&Arc<TenantKeys>> {
        self.tenants.get(id).and_then(Option::as_ref)
    }

    /// The current key set of an issuer, or of a tenant of a templated issuer.
    pub fn current_for(&self, id: IssuerId, tenant: Option<&str>) -> Option<Arc<KeySet>> {
        match (self.tenants(id), tenant) {
            (Some(t), Some(tenant)) => t.current(tenant),
            (Some(_), None) => None,
            (None, _) => self.issuers[id].current(),
        }
    }

    /// The generation of the keys a check saw, for [`Self::refetch`].
    pub fn generation_for(&self, id: IssuerId, tenant: Option<&str>) -> u64 {
        match (self.tenants(id), tenant) {
            (Some(t), Some(tenant)) => t.generation(tenant),
            _ => self.issuers[id].generation(),
        }
    }

    /// A check met an unknown `kid` or keys never loaded: refetch within the rate limits.
    /// Returns whether the keys changed since `seen_generation`.
    pub async fn refetch(&self, id: IssuerId, tenant: Option<&str>, seen_generation: u64) -> bool {
        match (self.tenants(id), tenant) {
            (Some(t), Some(tenant)) => t.refetch(tenant, seen_generation).await,
            (Some(_), None) => false,
            (None, _) => self.issuers[id].refetch_for_unknown_kid(seen_generation).await,
        }
    }

    pub fn issuer(&self, id: IssuerId) -> &Arc<IssuerKeys> {
        &self.issuers[id]
    }

    pub fn issuers(&self) -> &[Arc<IssuerKeys>] {
        &self.issuers
    }

    /// The current key set of an issuer, `None` while it has never loaded.
    pub fn current(&self, id: IssuerId) -> Option<Arc<KeySet>> {
        self.issuers[id].current()
    }
}
