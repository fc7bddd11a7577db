//! Criterion micro-benchmarks of the decision core (issue 6, part a). Run with
//! `cargo bench --bench core` (or `scripts/bench.sh --micro`); never part of `cargo test`.
//!
//! - `verify/uncached/{RS256,ES256,EdDSA}`: `authz::evaluate` for an allow with a Keycloak-sized
//!   token (~1 KB payload), no token cache: parse, key lookup, signature, times, route rule.
//! - `verify/cached/*`: `authz::evaluate_with_memo` with the real verified-token cache, warm
//!   (SHA-256 of header and signature + cache hit + times + route rule).
//! - `decide/*`: `evaluate` + `authz::respond` for an allow, and `check::check` (adds the clock
//!   reads, the metric calls — no recorder installed — and the decision log call — no
//!   subscriber), both cached.
//! - `route/*`: route selection when the matching route is the last of 1, 100, 1,000, and by
//!   name (`audgate.route`) among 1,000.
//! - `parts/*`: pieces of the hot path for orientation: SHA-256 of the whole token (the cache
//!   key before) and of its header and signature (the cache key now), the cache map's own keyed hasher
//!   (foldhash) over the token, prost decode of the ~2.4 KB CheckRequest.
//! - `server/*` (last: installs process-wide state): with the Prometheus recorder installed,
//!   `metrics::record_check` (a registry lookup per call) and `CheckMetrics::record` (the
//!   handles `audgate serve` uses), and `check::check` on a snapshot made after the recorder,
//!   then also with the decision log line written to /dev/null.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::hint::black_box;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use audgate::authz::{self, CheckInput, Reason, Selected, Verdict};
use audgate::check::{self, Snapshot};
use audgate::jwks::KeyStore;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use prost::Message as _;

#[path = "support/mod.rs"]
mod support;

use support::{Alg, ConfigOptions, HOST, Keys, PATH};

struct Setup {
    snapshot: Snapshot,
    tokens: Vec<(Alg, String)>,
    headers: Vec<HashMap<String, String>>,
    _dir: tempfile::TempDir,
}

fn setup(extra_routes: usize, keys: &Keys) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, keys.jwks()).expect("write jwks");
    let yaml = support::audgate_config(&ConfigOptions {
        jwks_file: jwks.to_str().expect("utf-8 path"),
        extra_routes,
        cache_entries: None,
        cache_bytes: None,
        ports: None,
    });
    let config = audgate::config::parse(&yaml)
        .unwrap_or_else(|e| panic!("bench config does not load: {e:?}\n{yaml}"))
        .config;
    let (store, fresh) = KeyStore::build(&config, None).expect("key store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for issuer in fresh {
        rt.block_on(issuer.refresh());
    }
    let snapshot = Snapshot::new(config, store);
    let now = check::unix_now();
    let tokens: Vec<(Alg, String)> = Alg::ALL
        .into_iter()
        .map(|alg| (alg, keys.sign(alg, &support::keycloak_claims(1, now, 3600))))
        .collect();
    let headers = tokens
        .iter()
        .map(|(_, t)| {
            let req = support::check_request(t, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
            req.attributes.unwrap().request.unwrap().http.unwrap().headers
        })
        .collect();
    Setup {
        snapshot,
        tokens,
        headers,
        _dir: dir,
    }
}

fn input<'a>(headers: &'a HashMap<String, String>, host: &'a str, path: &'a str) -> CheckInput<'a> {
    CheckInput {
        method: "GET",
        host,
        path,
        headers: audgate::authz::Headers::Map(headers),
        route_hint: None,
    }
}

/// Polls a future that never waits (the check path on a cache hit or with loaded keys).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the check waited"),
    }
}

fn verify(c: &mut Criterion, s: &Setup) {
    let policy = &s.snapshot.config.policy;
    let keys = |id| s.snapshot.keys.current(id);
    let memo = s.snapshot.tokens.view(&s.snapshot.keys);
    let now = check::unix_now();
    let mut group = c.benchmark_group("verify");
    for ((alg, token), headers) in s.tokens.iter().zip(&s.headers) {
        let input = input(headers, HOST, PATH);
        let d = authz::evaluate(policy, &input, keys, now);
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Allow, Reason::Allowed),
            "{}",
            d.description
        );
        let payload = token.split('.').nth(1).map_or(0, |p| p.len() * 3 / 4);
        group.bench_function(
            BenchmarkId::new("uncached", format!("{}-{payload}B", alg.name())),
            |b| b.iter(|| authz::evaluate(policy, black_box(&input), keys, now).verdict),
        );
        let d = authz::evaluate_with_memo(policy, &input, keys, &memo, now);
        assert_eq!(d.reason, Reason::Allowed);
        group.bench_function(BenchmarkId::new("cached", alg.name()), |b| {
            b.iter(|| authz::evaluate_with_memo(policy, black_box(&input), keys, &memo, now).verdict)
        });
    }
    group.finish();
}

fn decide(c: &mut Criterion, s: &Setup) {
    let policy = &s.snapshot.config.policy;
    let keys = |id| s.snapshot.keys.current(id);
    let memo = s.snapshot.tokens.view(&s.snapshot.keys);
    let now = check::unix_now();
    let input = input(&s.headers[0], HOST, PATH);
    let mut group = c.benchmark_group("decide");
    group.bench_function("evaluate+respond/cached", |b| {
        b.iter(|| {
            let d = authz::evaluate_with_memo(policy, black_box(&input), keys, &memo, now);
            authz::respond(policy, &d).status
        })
    });
    group.bench_function("evaluate+respond/uncached-RS256", |b| {
        b.iter(|| {
            let d = authz::evaluate(policy, black_box(&input), keys, now);
            authz::respond(policy, &d).status
        })
    });
    let d = ready(check::check(&s.snapshot, &input));
    assert_eq!(d.reason, Reason::Allowed);
    group.bench_function("check_fn/cached", |b| {
        b.iter(|| ready(check::check(&s.snapshot, black_box(&input))).verdict)
    });
    group.finish();
}

fn routes(c: &mut Criterion, keys: &Keys) {
    let mut group = c.benchmark_group("route");
    for n in [1usize, 100, 1000] {
        let s = setup(n - 1, keys);
        let routes = &s.snapshot.config.policy.routes;
        let input = input(&s.headers[0], HOST, PATH);
        assert!(matches!(routes.select(&input), Selected::Route(r) if r.name == "orders"));
        group.bench_with_input(BenchmarkId::new("last_of", n), &input, |b, input| {
            b.iter(|| matches!(routes.select(black_box(input)), Selected::Route(_)))
        });
        if n == 1000 {
            let hinted = CheckInput {
                route_hint: Some("orders"),
                ..input
            };
            group.bench_with_input(BenchmarkId::new("by_name_of", n), &hinted, |b, input| {
                b.iter(|| matches!(routes.select(black_box(input)), Selected::Route(_)))
            });
        }
    }
    group.finish();
}

fn parts(c: &mut Criterion, s: &Setup) {
    let token = &s.tokens[0].1;
    let request = support::check_request(token, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
    let encoded = request.encode_to_vec();
    let mut group = c.benchmark_group("parts");
    group.bench_function(format!("sha256_token/{}B", token.len()), |b| {
        b.iter(|| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, black_box(token.as_bytes())))
    });
    let (header, rest) = token.split_once('.').expect("a JWS");
    let signature = rest.rsplit_once('.').map_or("", |(_, s)| s);
    group.bench_function(
        format!("sha256_header_signature/{}B", header.len() + signature.len() + 1),
        |b| {
            b.iter(|| {
                let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
                digest.update(black_box(header.as_bytes()));
                digest.update(b".");
                digest.update(black_box(signature.as_bytes()));
                digest.finish()
            })
        },
    );
    group.bench_function(
        format!("siphash128_header_signature/{}B", header.len() + signature.len() + 8),
        |b| {
            // the cache key now (crates/audgate-keys/src/token_cache.rs)
            use siphasher::sip128::{Hasher128, SipHasher13};
            use std::hash::Hasher;
            b.iter(|| {
                let mut h = SipHasher13::new_with_key(&[7; 16]);
                h.write(&(header.len() as u64).to_le_bytes());
                h.write(black_box(header.as_bytes()));
                h.write(black_box(signature.as_bytes()));
                h.finish128().as_u128()
            })
        },
    );
    let foldhash = quick_cache::DefaultHashBuilder::default();
    group.bench_function(format!("cache_hasher_token/{}B", token.len()), |b| {
        b.iter(|| foldhash.hash_one(black_box(token.as_str())))
    });
    group.bench_function(format!("decode_check_request/{}B", encoded.len()), |b| {
        b.iter(|| envoy_types::ext_authz::v3::pb::CheckRequest::decode(black_box(encoded.as_slice())).is_ok())
    });
    group.finish();
}

/// The check as `audgate serve` runs it: the Prometheus recorder installed and the decision
/// log line written (text format, info level) to /dev/null. Installs process-wide state, so
/// it runs last.
fn server(c: &mut Criterion, keys: &Keys) {
    let mut group = c.benchmark_group("server");
    let _handle = audgate::metrics::install().expect("metrics recorder");
    // made after the recorder, as `audgate serve` does: its metric handles are real ones
    let s = setup(0, keys);
    let input = input(&s.headers[0], HOST, PATH);
    group.bench_function("record_check", |b| {
        b.iter(|| {
            audgate::metrics::record_check(
                black_box("orders"),
                Verdict::Allow,
                Reason::Allowed,
                Duration::from_micros(3),
            )
        })
    });
    let handles = audgate::metrics::CheckMetrics::new(["orders"]);
    group.bench_function("record_check_with_handles", |b| {
        b.iter(|| {
            handles.record(
                black_box("orders"),
                Verdict::Allow,
                Reason::Allowed,
                Duration::from_micros(3),
            )
        })
    });
    group.bench_function("check_fn/cached+metrics", |b| {
        b.iter(|| ready(check::check(&s.snapshot, black_box(&input))).verdict)
    });
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::sync::Mutex::new(null))
        .with_ansi(false)
        .init();
    group.bench_function("check_fn/cached+metrics+log", |b| {
        b.iter(|| ready(check::check(&s.snapshot, black_box(&input))).verdict)
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let keys = Keys::generate();
    let s = setup(0, &keys);
    verify(c, &s);
    decide(c, &s);
    routes(c, &keys);
    parts(c, &s);
    server(c, &keys);
}

criterion_group!(core, benches);
criterion_main!(core);
