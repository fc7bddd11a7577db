//! Issuer keys: parsing a JWKS (pure), fetching it, and caching it per issuer.

mod cache;
mod fetch;
mod keyset;

use std::sync::Arc;

pub use cache::{IssuerKeys, Refreshed};
pub use fetch::{Fetcher, MAX_DOCUMENT_BYTES};
pub use keyset::{JwksError, Key, KeyKind, KeySet, SkippedKey};

use crate::authz::IssuerId;
use crate::config::Config;

/// The key caches of every configured issuer, indexed by [`IssuerId`].
pub struct KeyStore {
    issuers: Vec<Arc<IssuerKeys>>,
}

impl KeyStore {
    pub fn new(config: &Config) -> Result<KeyStore, String> {
        let issuers = config
            .policy
            .issuers
            .iter()
            .zip(&config.key_sources)
            .map(|(issuer, source)| IssuerKeys::new(issuer.name.clone(), source.clone()).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(KeyStore { issuers })
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
