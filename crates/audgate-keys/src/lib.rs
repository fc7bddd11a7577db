//! Issuer keys: fetching a JWKS and caching it per issuer (parsing is in `audgate_core::jwks`).
#![forbid(unsafe_code)]

mod cache;
mod fetch;
mod metrics;
pub mod token_cache;

use audgate_core::jwks as keyset;
use audgate_core::{authz, config};

use std::sync::Arc;

pub use cache::{IssuerKeys, Refreshed};
pub use fetch::{Fetcher, MAX_DOCUMENT_BYTES};
pub use keyset::{JwksError, Key, KeyKind, KeySet, SkippedKey};
pub use metrics::TokenCacheMetrics;

use crate::authz::IssuerId;
use crate::config::Config;

/// The key caches of every configured issuer, indexed by [`IssuerId`].
pub struct KeyStore {
    issuers: Vec<Arc<IssuerKeys>>,
}

impl KeyStore {
    /// The key caches for `config`. An issuer whose name and key source are unchanged from
    /// `previous` keeps its cache (and its loaded keys); the others start empty and are
    /// returned in the second list, for the caller to start refreshing.
    pub fn build(config: &Config, previous: Option<&KeyStore>) -> Result<(KeyStore, Vec<Arc<IssuerKeys>>), String> {
        let mut fresh = Vec::new();
        let mut issuers = Vec::with_capacity(config.key_sources.len());
        for (issuer, source) in config.policy.issuers.iter().zip(&config.key_sources) {
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
        Ok((KeyStore { issuers }, fresh))
    }

    /// Start the periodic refresh of each of `issuers` on the current runtime. The tasks hold
    /// weak references: they end once no key store uses the issuer any more.
    pub fn spawn_refresh(issuers: Vec<Arc<IssuerKeys>>) {
        for keys in issuers {
            tokio::spawn(IssuerKeys::run_refresh(Arc::downgrade(&keys)));
        }
    }

    /// Names of the issuers whose keys have never loaded.
    pub fn missing(&self) -> Vec<&str> {
        self.issuers
            .iter()
            .filter(|k| k.current().is_none())
            .map(|k| k.name())
            .collect()
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
