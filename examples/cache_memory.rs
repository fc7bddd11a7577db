//! What a verified-token cache entry really costs in heap, next to what the cache's weigher
//! charges for it (issue 6, part d: "the cache cap must hold"). A counting global allocator
//! measures the live heap while tokens are verified and remembered through the real
//! `TokenCache`, first unbounded (the true bytes per entry), then with the default bounds
//! (the heap the cap really allows).
//!
//! ```sh
//! cache_memory --config target/bench/audgate.yaml --tokens target/bench/tokens-eddsa-100000.txt
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};

use audgate::authz::{self, CheckInput, Headers, Reason};
use audgate::config::TokenCacheConfig;
use audgate::token_cache::TokenCache;

#[path = "../benches/support/mod.rs"]
mod support;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or(format!("{name} is required"))
    };
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    let config = audgate::config::load(Path::new(&arg("--config")?))
        .map_err(|e| e.to_string())?
        .config;
    let text = std::fs::read_to_string(arg("--tokens")?)?;
    let tokens: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let (store, fresh) = audgate::jwks::KeyStore::build(&config, None)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for issuer in fresh {
        rt.block_on(issuer.refresh());
    }
    let policy = &config.policy;
    let keys = |id| store.current(id);
    let now = audgate::check::unix_now();
    let request = support::check_request(tokens[0], "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
    let mut headers = request
        .attributes
        .and_then(|a| a.request)
        .and_then(|r| r.http)
        .ok_or("no http request")?
        .headers;

    let mut fill = |cache: &TokenCache, n: usize| -> Result<i64, String> {
        let memo = cache.view(&store);
        let before = LIVE.load(Ordering::Relaxed);
        for token in tokens.iter().take(n) {
            let value = headers.get_mut("authorization").ok_or("no authorization")?;
            value.clear();
            value.push_str("Bearer ");
            value.push_str(token);
            let input = CheckInput {
                method: "GET",
                host: support::HOST,
                path: support::PATH,
                headers: Headers::Map(&headers),
                route_hint: None,
            };
            let d = authz::evaluate_with_memo(policy, &input, keys, &memo, now);
            if d.reason != Reason::Allowed {
                return Err(format!("token not allowed: {} {}", d.reason.code(), d.description));
            }
        }
        Ok(LIVE.load(Ordering::Relaxed) - before)
    };

    let n = tokens.len().min(20_000);
    let unbounded = TokenCache::new(&TokenCacheConfig {
        max_entries: 1 << 30,
        max_bytes: 1 << 40,
    });
    let grown = fill(&unbounded, n)?;
    let weight = unbounded.weight();
    println!(
        "ENTRY entries={} heap_bytes_per_entry={:.0} weighed_bytes_per_entry={:.0} payload_json_bytes={}",
        unbounded.len(),
        grown as f64 / unbounded.len() as f64,
        weight as f64 / unbounded.len() as f64,
        tokens[0].split('.').nth(1).map_or(0, |p| p.len() * 3 / 4),
    );
    drop(unbounded);

    let defaults = TokenCacheConfig::default();
    let bounded = TokenCache::new(&defaults);
    let grown = fill(&bounded, tokens.len())?;
    println!(
        "BOUNDED tokens={} max_bytes={} entries={} weighed_bytes={} live_heap_bytes={} heap_over_cap={:.2}",
        tokens.len(),
        defaults.max_bytes,
        bounded.len(),
        bounded.weight(),
        grown,
        grown as f64 / defaults.max_bytes as f64
    );
    Ok(())
}
