//! The verified-token cache (SPEC.md "Caching"): a token whose signature verified is
//! remembered, so the next request with it skips parsing and the signature. Bounded in
//! entries and bytes (S3-FIFO eviction, quick_cache), never used past `exp` (the core re-checks
//! times and runs the route's rule on every hit), and an entry is ignored once its issuer's
//! key set changed: a withdrawn key stops working at the next refresh. Readers never block
//! each other.
//!
//! The key is a keyed hash (SipHash-1-3, 128 bits, with a random key drawn per cache) of the
//! token's header and signature segments, and a hit also needs the token's payload segment to
//! equal the entry's (which the entry keeps anyway, for `$payload`). Another token can only hit
//! an entry by carrying the same payload and a header and signature of the same 128-bit keyed
//! hash, which nobody can aim at without the key: it never leaves the process, and SipHash is a
//! keyed pseudo-random function. Hashing the ~500 bytes of header and signature instead of a
//! whole ~1.8 KB Keycloak token takes about a quarter of the time, and the cache holds nothing a
//! token could be rebuilt from: no signature, no whole token. (It was SHA-256 before: the same
//! guarantee without a key, at ~18,000 instructions a check against ~2,000 now.)

use std::hash::Hasher;

use quick_cache::Weighter;
use quick_cache::sync::Cache;
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::KeyStore;
use crate::authz::{TokenMemo, VerifiedToken};
use crate::config::TokenCacheConfig;
use crate::metrics::TokenCacheMetrics;

type Key = u128;

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
    /// The SipHash key of [`split`].
    hash_key: [u8; 16],
    metrics: TokenCacheMetrics,
}

impl TokenCache {
    pub fn new(config: &TokenCacheConfig) -> TokenCache {
        if config.max_entries == 0 || config.max_bytes == 0 {
            return TokenCache {
                cache: None,
                hash_key: [0; 16],
                metrics: TokenCacheMetrics::new(),
            };
        }
        let floor = (config.max_bytes / config.max_entries as u64).max(1);
        let estimated = config.max_entries.min(1 << 16);
        let mut hash_key = [0; 16];
        // the system's random source failing is not something to serve through
        aws_lc_rs::rand::fill(&mut hash_key).expect("the system random source works");
        TokenCache {
            cache: Some(Cache::with_weighter(estimated, config.max_bytes, ByBytes { floor })),
            hash_key,
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

/// A compact JWS's key (the keyed hash of its header and signature segments) and its payload
/// segment; `None` when it is not three segments.
fn split<'t>(hash_key: &[u8; 16], token: &'t str) -> Option<(Key, &'t str)> {
    // the dots are ASCII, so the byte positions memchr finds are char boundaries
    let dot = |s: &str| memchr::memchr(b'.', s.as_bytes());
    let first = dot(token)?;
    let (header, rest) = (&token[..first], &token[first + 1..]);
    let second = dot(rest)?;
    let (payload, signature) = (&rest[..second], &rest[second + 1..]);
    if dot(signature).is_some() {
        return None;
    }
    let mut hasher = SipHasher13::new_with_key(hash_key);
    // the lengths keep (header, signature) pairs apart that concatenate alike
    hasher.write(&(header.len() as u64).to_le_bytes());
    hasher.write(header.as_bytes());
    hasher.write(signature.as_bytes());
    Some((hasher.finish128().as_u128(), payload))
}

struct View<'a> {
    cache: &'a TokenCache,
    keys: &'a KeyStore,
}

impl TokenMemo for View<'_> {
    fn get(&self, token: &str) -> Option<VerifiedToken> {
        let cache = self.cache.cache.as_ref()?;
        let Some((key, payload)) = split(&self.cache.hash_key, token) else {
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
        if let (Some(cache), Some((key, payload))) = (&self.cache.cache, split(&self.cache.hash_key, token))
            && verified.claims().payload_b64 == payload
        {
            cache.insert(key, verified.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 16] = [7; 16];

    #[test]
    fn the_key_covers_header_and_signature_and_the_payload_is_returned() {
        let (key, payload) = split(&KEY, "aGVhZA.cGF5bG9hZA.c2ln").expect("three segments");
        assert_eq!(payload, "cGF5bG9hZA");
        assert_eq!(
            split(&KEY, "aGVhZA.b3RoZXI.c2ln").map(|(k, _)| k),
            Some(key),
            "payload is compared, not hashed"
        );
        assert_ne!(split(&KEY, "aGVhZB.cGF5bG9hZA.c2ln").map(|(k, _)| k), Some(key));
        assert_ne!(split(&KEY, "aGVhZA.cGF5bG9hZA.c2lo").map(|(k, _)| k), Some(key));
    }

    #[test]
    fn moving_the_boundary_between_header_and_signature_changes_the_key() {
        let a = split(&KEY, "ab.p.c").map(|(k, _)| k);
        let b = split(&KEY, "a.p.bc").map(|(k, _)| k);
        assert_ne!(a, b);
    }

    #[test]
    fn the_key_depends_on_the_secret() {
        let token = "aGVhZA.cGF5bG9hZA.c2ln";
        assert_ne!(
            split(&KEY, token).map(|(k, _)| k),
            split(&[8; 16], token).map(|(k, _)| k)
        );
        let (one, two) = (TokenCache::new(&config()), TokenCache::new(&config()));
        assert_ne!(one.hash_key, two.hash_key, "each cache draws its own key");
    }

    #[test]
    fn not_three_segments_is_no_key() {
        for token in ["", "a", "a.b", "a.b.c.d", "a.b.c.d.e"] {
            assert!(split(&KEY, token).is_none(), "{token}");
        }
    }

    fn config() -> TokenCacheConfig {
        TokenCacheConfig {
            max_entries: 10,
            max_bytes: 1 << 20,
        }
    }
}
