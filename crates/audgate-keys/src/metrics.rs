//! The key-cache metrics of SPEC.md, over the `metrics` facade (a no-op until a recorder is
//! installed: `audgate serve` installs its Prometheus recorder).

use metrics::{Counter, counter, gauge};

const JWKS_REFRESH: &str = "audgate_jwks_refresh_total";
const JWKS_KEYS: &str = "audgate_jwks_keys";
const CACHE_HITS: &str = "audgate_token_cache_hits_total";
const CACHE_MISSES: &str = "audgate_token_cache_misses_total";

pub fn record_jwks_refresh(issuer: &str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(JWKS_REFRESH, "issuer" => issuer.to_owned(), "result" => result).increment(1);
}

pub fn set_jwks_keys(issuer: &str, keys: usize) {
    gauge!(JWKS_KEYS, "issuer" => issuer.to_owned()).set(keys as f64);
}

/// Hits and misses of the verified-token cache.
pub struct TokenCacheMetrics {
    hits: Counter,
    misses: Counter,
}

impl TokenCacheMetrics {
    pub fn new() -> TokenCacheMetrics {
        TokenCacheMetrics {
            hits: counter!(CACHE_HITS),
            misses: counter!(CACHE_MISSES),
        }
    }

    pub fn record(&self, hit: bool) {
        if hit { &self.hits } else { &self.misses }.increment(1);
    }
}

impl Default for TokenCacheMetrics {
    fn default() -> Self {
        TokenCacheMetrics::new()
    }
}
