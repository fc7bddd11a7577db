//! The verified-token cache (SPEC.md "Caching"): a token whose signature verified is
//! remembered, so the next request with it skips parsing and the signature. Bounded in
//! entries and bytes (S3-FIFO eviction, quick_cache), never used past `exp` (the core re-checks
//! times and runs the route's rule on every hit), and an entry is ignored once its issuer's
//! key set changed: a withdrawn key stops working at the next refresh. Readers never block
//! each other.
//!
//! The key is the SHA-256 of the token's header and signature segments, and a hit also needs
//! the token's payload segment to equal the entry's (which the entry keeps anyway, for
//! `$payload`): a hit is the very same token, byte for byte. Hashing the ~500 bytes of header
//! and signature instead of a whole ~1.8 KB Keycloak token takes about a quarter of the time,
//! and the cache holds nothing a token could be rebuilt from: no signature, no whole token.

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use crate::KeyStore;
use crate::authz::{TokenMemo, VerifiedToken};
use crate::config::TokenCacheConfig;
use crate::metrics::TokenCacheMetrics;

type Key = [u8; 32];

/// Heap an entry holds per byte of its base64url payload: the segment itself and the parsed
/// claims map (measured with a counting allocator: examples/cache_memory.rs).
const BYTES_PER_PAYLOAD_B64_BYTE: u64 = 6;
/// Heap an entry holds besides that: the key, the claim structs, the cache's own node.
const ENTRY_OVERHEAD: u64 = 1024;

#[derive(Clone)]
struct ByBytes {
    /// Every entry weighs at least this much, so `max_bytes / floor` bounds the entry count.
    floor: u64,
}

impl Weighter<Key, VerifiedToken> for ByBytes {
    fn weight(&self, _: &Key, token: &VerifiedToken) -> u64 {
        let payload = token.claims().payload_b64.len() as u64 * BYTES_PER_PAYLOAD_B64_BYTE;
        (payload + ENTRY_OVERHEAD).max(self.floor)
    }
}

pub struct TokenCache {
    cache: Option<Cache<Key, VerifiedToken, ByBytes>>,
    metrics: TokenCacheMetrics,
}

impl TokenCache {
    pub fn new(config: &TokenCacheConfig) -> TokenCache {
        if config.max_entries == 0 || config.max_bytes == 0 {
            return TokenCache {
                cache: None,
                metrics: TokenCacheMetrics::new(),
            };
        }
        let floor = (config.max_bytes / config.max_entries as u64).max(1);
        let estimated = config.max_entries.min(1 << 16);
        TokenCache {
            cache: Some(Cache::with_weighter(estimated, config.max_bytes, ByBytes { floor })),
            metrics: TokenCacheMetrics::new(),
        }
    }

    /// The cache as the core sees it, for one check against `keys`.
    pub fn view<'a>(&'a self, keys: &'a KeyStore) -> impl TokenMemo + 'a {
        View { cache: self, keys }
    }

    pub fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, Cache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, as weighed.
    pub fn weight(&self) -> u64 {
        self.cache.as_ref().map_or(0, Cache::weight)
    }
}

/// A compact JWS's key (the hash of its header and signature segments) and its payload
/// segment; `None` when it is not three segments.
fn split(token: &str) -> Option<(Key, &str)> {
    let (header, rest) = token.split_once('.')?;
    let (payload, signature) = rest.split_once('.')?;
    if signature.contains('.') {
        return None;
    }
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    digest.update(header.as_bytes());
    digest.update(b".");
    digest.update(signature.as_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(digest.finish().as_ref());
    Some((key, payload))
}

struct View<'a> {
    cache: &'a TokenCache,
    keys: &'a KeyStore,
}

impl TokenMemo for View<'_> {
    fn get(&self, token: &str) -> Option<VerifiedToken> {
        let cache = self.cache.cache.as_ref()?;
        let Some((key, payload)) = split(token) else {
            self.cache.metrics.record(false);
            return None;
        };
        let found = cache.get(&key).filter(|t| {
            t.claims().payload_b64 == payload && t.key_generation() == self.keys.issuer(t.issuer()).generation()
        });
        self.cache.metrics.record(found.is_some());
        found
    }

    fn put(&self, token: &str, verified: &VerifiedToken) {
        if let (Some(cache), Some((key, payload))) = (&self.cache.cache, split(token))
            && verified.claims().payload_b64 == payload
        {
            cache.insert(key, verified.clone());
        }
    }
}
