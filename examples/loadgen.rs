//! audgate's own load generator (issue 6, parts b and d), driven by `scripts/bench.sh`.
//!
//! ```sh
//! loadgen setup --dir DIR [--memory-tokens 100000] [--ttl 7200] [--envoy-template benches/envoy/bench.yaml]
//!               [--configs 'audgate:default:27191,27192,27901;audgate-nocache:off:27391,27392,27902']
//! loadgen run   --target 127.0.0.1:27191 --tokens DIR/tokens-rs256-1.txt [--connections 32]
//!               [--depth 1] [--duration 10] [--warmup 2] [--server-pid PID] [--label NAME]
//!               [--rate CHECKS_PER_S]
//!               [--expect allow]
//! loadgen cost  --config DIR/audgate.yaml --tokens DIR/tokens-rs256-1.txt [--seconds 2]
//! ```
//!
//! `setup` makes three signing keys in memory (RSA 2048, P-256, Ed25519; never written), and
//! writes their public JWKS, token files (one token a line, Keycloak-sized payloads), audgate
//! configs equivalent to the Envoy `jwt_authn` baseline (with the default token cache, and
//! without a cache), the Envoy bench config rendered from its template, and the request
//! headers wrk should send.
//!
//! `run` sends realistic `CheckRequest`s (~2.4 KB, Envoy's header map) straight to an ext_authz
//! gRPC port over `--connections` HTTP/2 connections with `--depth` requests in flight on each,
//! cycling through the tokens, for `--warmup` + `--duration` seconds (or `--requests`). It
//! prints one `RESULT` line: checks/s, the server's CPU per check (utime + stime of
//! `--server-pid` from /proc, before and after the measured window), the load generator's own
//! CPU, and latency percentiles. Requests are encoded once up front (on the fly for more than
//! 20,000 tokens) and sent with a pass-through codec, so the client spends its core on HTTP/2,
//! not on protobuf.
//!
//! `cost` times the decision core in-process for the same token: `authz::evaluate` without a
//! cache (parse + signature + rules) and with a warm token cache, per call, in on-CPU time of
//! the thread (descheduled time on a shared core is not counted).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckResponse;
use prost::Message as _;
use prost::bytes::{Buf as _, BufMut as _, Bytes};
use tokio::sync::Semaphore;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

#[path = "../benches/support/mod.rs"]
mod support;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(&Args::parse(&args[1..])),
        Some("run") => run(&Args::parse(&args[1..])),
        Some("cost") => cost(&Args::parse(&args[1..])),
        _ => Err("usage: loadgen setup|run|cost [--flag value]...".into()),
    };
    if let Err(e) = result {
        eprintln!("loadgen: {e}");
        std::process::exit(2);
    }
}

/// `--name value` pairs.
struct Args(Vec<(String, String)>);

impl Args {
    fn parse(args: &[String]) -> Args {
        Args(
            args.chunks(2)
                .map(|c| {
                    let name = c[0].trim_start_matches("--").to_owned();
                    (name, c.get(1).cloned().unwrap_or_default())
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn need(&self, name: &str) -> Result<&str, Error> {
        self.get(name).ok_or_else(|| format!("--{name} is required").into())
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, Error> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name} {v}: not a number").into()),
        }
    }
}

// ---------------------------------------------------------------------------------------- setup

fn setup(args: &Args) -> Result<(), Error> {
    let dir = PathBuf::from(args.need("dir")?);
    std::fs::create_dir_all(&dir)?;
    let memory_tokens: u64 = args.num("memory-tokens", 100_000)?;
    let ttl: i64 = args.num("ttl", 7200)?;
    let keys = support::Keys::generate();
    let jwks = keys.jwks();
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, &jwks)?;
    let now = audgate::check::unix_now();
    let write_tokens = |alg: support::Alg, n: u64| -> Result<(), Error> {
        let path = dir.join(format!("tokens-{}-{n}.txt", alg.name().to_ascii_lowercase()));
        let mut out = String::new();
        for i in 0..n {
            out.push_str(&keys.sign(alg, &support::keycloak_claims(i, now, ttl)));
            out.push('\n');
        }
        std::fs::write(path, out)?;
        Ok(())
    };
    for alg in support::Alg::ALL {
        write_tokens(alg, 1)?;
    }
    write_tokens(support::Alg::RS256, 1000)?;
    write_tokens(support::Alg::EdDSA, memory_tokens)?;
    let jwks_file = jwks_path.to_str().ok_or("non-UTF-8 directory")?;
    // NAME:CACHE:GRPC,HTTP,ADMIN;... with CACHE `default` (100,000 entries, 32 MiB), `off`,
    // or `<N>MiB` (max_bytes)
    let configs = args
        .get("configs")
        .unwrap_or("audgate:default:27191,27192,27901;audgate-nocache:off:27391,27392,27902");
    for spec in configs.split(';').filter(|s| !s.is_empty()) {
        let bad = || format!("--configs {spec}: NAME:default|off|<N>MiB:GRPC,HTTP,ADMIN");
        let mut parts = spec.split(':');
        let (Some(name), Some(cache), Some(ports), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad().into());
        };
        let ports: Vec<u16> = ports
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let [grpc, http, admin] = ports[..] else {
            return Err(bad().into());
        };
        let (cache_entries, cache_bytes) = match cache {
            "default" => (None, None),
            "off" => (Some(0), None),
            mib => match mib.strip_suffix("MiB").and_then(|n| n.parse::<u64>().ok()) {
                Some(n) => (None, Some(n << 20)),
                None => return Err(bad().into()),
            },
        };
        let yaml = support::audgate_config(&support::ConfigOptions {
            jwks_file,
            extra_routes: 0,
            cache_entries,
            cache_bytes,
            ports: Some((grpc, http, admin)),
        });
        std::fs::write(dir.join(format!("{name}.yaml")), yaml)?;
    }
    let headers: String = support::request_headers("")
        .into_iter()
        .filter(|(k, _)| !k.starts_with(':') && *k != "x-request-id")
        .map(|(k, v)| format!("{k}: {v}\n"))
        .collect();
    std::fs::write(dir.join("wrk-headers.txt"), headers)?;
    if let Some(template) = args.get("envoy-template") {
        let text = std::fs::read_to_string(template)?;
        // the in-process listener reads the same config file as `audgate serve` (absolute:
        // Envoy may run from anywhere)
        let audgate_config = std::path::absolute(dir.join("audgate.yaml"))?;
        let audgate_config = audgate_config.to_str().ok_or("non-UTF-8 directory")?;
        std::fs::write(
            dir.join("envoy.yaml"),
            text.replace("__JWKS__", &jwks)
                .replace("__AUDGATE_CONFIG__", audgate_config),
        )?;
    }
    let sample = std::fs::read_to_string(dir.join("tokens-rs256-1.txt"))?;
    let token = sample.trim();
    let request = support::check_request(token, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
    println!(
        "setup: {} written; RS256 token {} bytes (payload {} bytes), CheckRequest {} bytes",
        dir.display(),
        token.len(),
        token.split('.').nth(1).map_or(0, |p| p.len() * 3 / 4),
        request.encoded_len()
    );
    Ok(())
}

fn read_tokens(path: &str) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let tokens: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
    if tokens.is_empty() {
        return Err(format!("{path}: no tokens").into());
    }
    Ok(tokens)
}

// ------------------------------------------------------------------------------------------ run

/// Sends pre-encoded `CheckRequest` bytes; decodes the `CheckResponse`.
#[derive(Clone, Copy)]
struct RawCodec;

struct RawEncoder;
struct ResponseDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = CheckResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = CheckResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<CheckResponse>, tonic::Status> {
        let response = CheckResponse::decode(&mut *src).map_err(|e| tonic::Status::internal(e.to_string()))?;
        src.advance(src.remaining());
        Ok(Some(response))
    }
}

/// Where requests come from: encoded up front, or per call for large token sets.
enum Requests {
    Encoded(Vec<Bytes>),
    OnTheFly(Vec<String>),
}

impl Requests {
    fn len(&self) -> usize {
        match self {
            Requests::Encoded(v) => v.len(),
            Requests::OnTheFly(v) => v.len(),
        }
    }

    fn get(&self, i: usize) -> Bytes {
        match self {
            Requests::Encoded(v) => v[i % v.len()].clone(),
            Requests::OnTheFly(v) => encode(&v[i % v.len()], i),
        }
    }
}

fn encode(token: &str, i: usize) -> Bytes {
    let request_id = format!("{:08x}-4b5a-6978-8796-a5b4c3d2e1f0", i as u32);
    Bytes::from(support::check_request(token, &request_id).encode_to_vec())
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    denied: AtomicU64,
    failed: AtomicU64,
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: &str) -> Result<f64, Error> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').ok_or("bad /proc stat")? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // after "pid (comm) ": state is field 3, utime 14, stime 15 => indexes 11 and 12 here
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn run(args: &Args) -> Result<(), Error> {
    let target = args.need("target")?.to_owned();
    let tokens = read_tokens(args.need("tokens")?)?;
    let connections: usize = args.num("connections", 32)?;
    let depth: usize = args.num("depth", 1)?;
    let duration = Duration::from_secs_f64(args.num("duration", 10.0)?);
    let warmup = Duration::from_secs_f64(args.num("warmup", 2.0)?);
    let label = args.get("label").unwrap_or("run").to_owned();
    let server_pid = args.get("server-pid").map(str::to_owned);
    let expect_allow = args.get("expect") != Some("any");
    // Open loop: a pacer thread lets one request go every `1 / rate` seconds (to whichever
    // worker is free), so the offered load is fixed below saturation; 0: closed loop. The pacer
    // sleeps on the OS timer (tens of microseconds late at most), not on tokio's, whose 1 ms
    // wheel released the requests of a millisecond together: bursts that queued in the server
    // and measured the burst, not the check. Latency counts from the send.
    let rate: f64 = args.num("rate", 0.0)?;
    let requests = if tokens.len() <= 20_000 {
        Requests::Encoded(tokens.iter().enumerate().map(|(i, t)| encode(t, i)).collect())
    } else {
        Requests::OnTheFly(tokens)
    };
    let request_bytes = requests.get(0).len();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let requests = Arc::new(requests);
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            let channel = Endpoint::from_shared(format!("http://{target}"))?
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| format!("cannot connect to {target}: {e}"))?;
            channels.push(channel);
        }
        let next = Arc::new(AtomicUsize::new(0));
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut workers = Vec::new();
        let workers_n = connections * depth;
        let pacer = (rate > 0.0).then(|| {
            let permits = Arc::new(Semaphore::new(0));
            let (permits_, stop_) = (Arc::clone(&permits), Arc::clone(&stop));
            std::thread::spawn(move || pace(rate, &permits_, &stop_));
            permits
        });
        for i in 0..workers_n {
            let pacer = pacer.clone();
            let channel = channels[i % connections].clone();
            let (requests, next, measuring, stop, tally) = (
                Arc::clone(&requests),
                Arc::clone(&next),
                Arc::clone(&measuring),
                Arc::clone(&stop),
                Arc::clone(&tally),
            );
            workers.push(tokio::spawn(worker(
                channel,
                requests,
                next,
                measuring,
                stop,
                tally,
                expect_allow,
                pacer,
            )));
        }
        tokio::time::sleep(warmup).await;
        let server_before = server_pid.as_deref().map(cpu_seconds).transpose()?;
        let client_before = cpu_seconds("self")?;
        let started = Instant::now();
        measuring.store(true, Ordering::Release);
        tokio::time::sleep(duration).await;
        measuring.store(false, Ordering::Release);
        let elapsed = started.elapsed().as_secs_f64();
        let server_after = server_pid.as_deref().map(cpu_seconds).transpose()?;
        let client_after = cpu_seconds("self")?;
        stop.store(true, Ordering::Release);
        let mut latencies: Vec<u32> = Vec::new();
        for w in workers {
            latencies.extend(w.await?);
        }
        latencies.sort_unstable();
        let n = latencies.len();
        let pct = |p: f64| {
            if n == 0 {
                0.0
            } else {
                f64::from(latencies[((n as f64 * p) as usize).min(n - 1)]) / 1000.0
            }
        };
        let (ok, denied, failed) = (
            tally.ok.load(Ordering::Relaxed),
            tally.denied.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
        );
        let server_cpu = match (server_before, server_after) {
            (Some(b), Some(a)) => a - b,
            _ => f64::NAN,
        };
        let client_cpu = client_after - client_before;
        let per_check = |cpu: f64| cpu / n.max(1) as f64 * 1e6;
        println!(
            "RESULT label={label} checks={n} rps={:.0} server_cpu_us={:.2} server_util={:.2} client_cpu_us={:.2} client_util={:.2} p50_us={:.1} p99_us={:.1} p999_us={:.1} ok={ok} denied={denied} failed={failed} conns={connections} depth={depth} rate={rate} tokens={} request_bytes={request_bytes}",
            n as f64 / elapsed,
            per_check(server_cpu),
            server_cpu / elapsed,
            per_check(client_cpu),
            client_cpu / elapsed,
            pct(0.50),
            pct(0.99),
            pct(0.999),
            requests.len(),
        );
        if failed > 0 || (expect_allow && denied > 0) {
            return Err(format!("{label}: {denied} denied, {failed} failed (expected every check allowed)").into());
        }
        Ok::<(), Error>(())
    })
}

/// When an open-loop worker sends its next check, and how far apart its checks are.
/// Release one request every `1 / rate` seconds until `stop`, then close `permits` (the
/// workers waiting on it end).
fn pace(rate: f64, permits: &Semaphore, stop: &AtomicBool) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    while !stop.load(Ordering::Acquire) {
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        permits.add_permits(1);
    }
    permits.close();
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    channel: Channel,
    requests: Arc<Requests>,
    next: Arc<AtomicUsize>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    expect_allow: bool,
    pacer: Option<Arc<Semaphore>>,
) -> Vec<u32> {
    let mut client = tonic::client::Grpc::new(channel);
    let path = PathAndQuery::from_static("/envoy.service.auth.v3.Authorization/Check");
    let mut latencies = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Acquire) {
        let body = requests.get(next.fetch_add(1, Ordering::Relaxed));
        if let Some(pacer) = &pacer {
            match pacer.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => break, // closed: the run is over
            }
        }
        let started = Instant::now();
        let counted = measuring.load(Ordering::Acquire);
        let result = match client.ready().await {
            Ok(()) => client.unary(tonic::Request::new(body), path.clone(), RawCodec).await,
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        let took = started.elapsed();
        if !(counted && measuring.load(Ordering::Acquire)) {
            continue;
        }
        latencies.push(u32::try_from(took.as_nanos()).unwrap_or(u32::MAX));
        match result {
            Ok(r) if r.get_ref().status.as_ref().map_or(-1, |s| s.code) == 0 => &tally.ok,
            Ok(r) => {
                if expect_allow && tally.denied.load(Ordering::Relaxed) == 0 {
                    eprintln!("loadgen: first non-OK answer: {:?}", r.get_ref().status);
                }
                &tally.denied
            }
            Err(e) => {
                if tally.failed.load(Ordering::Relaxed) == 0 {
                    eprintln!("loadgen: first failure: {e}");
                }
                &tally.failed
            }
        }
        .fetch_add(1, Ordering::Relaxed);
    }
    latencies
}

// ----------------------------------------------------------------------------------------- cost

/// Nanoseconds this thread has run on a CPU (/proc/thread-self/schedstat, first field).
fn thread_cpu_ns() -> Result<u64, Error> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    Ok(text.split_whitespace().next().ok_or("empty schedstat")?.parse()?)
}

fn cost(args: &Args) -> Result<(), Error> {
    use audgate::authz::{self, CheckInput, Reason};
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    let config = audgate::config::load(Path::new(args.need("config")?))
        .map_err(|e| e.to_string())?
        .config;
    let tokens = read_tokens(args.need("tokens")?)?;
    let seconds: f64 = args.num("seconds", 2.0)?;
    let (store, fresh) = audgate::jwks::KeyStore::build(&config, None)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for issuer in fresh {
        rt.block_on(issuer.refresh());
    }
    let snapshot = audgate::check::Snapshot::new(config, store);
    let policy = &snapshot.config.policy;
    let request = support::check_request(&tokens[0], "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
    let http = request
        .attributes
        .and_then(|a| a.request)
        .and_then(|r| r.http)
        .ok_or("no http request")?;
    let input = CheckInput {
        method: &http.method,
        host: &http.host,
        path: &http.path,
        headers: audgate::authz::Headers::Map(&http.headers),
        route_hint: None,
    };
    let keys = |id| snapshot.keys.current(id);
    let memo = snapshot.tokens.view(&snapshot.keys);
    let now = audgate::check::unix_now();
    let time = |f: &dyn Fn() -> Reason| -> Result<f64, Error> {
        let reason = f();
        if reason != Reason::Allowed {
            return Err(format!("the cost token is not allowed: {}", reason.code()).into());
        }
        // on-CPU time of this thread, so time spent descheduled on a shared core is not counted
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let started = thread_cpu_ns()?;
        let mut n = 0u64;
        while Instant::now() < deadline {
            for _ in 0..64 {
                std::hint::black_box(f());
            }
            n += 64;
        }
        Ok((thread_cpu_ns()? - started) as f64 / n as f64 / 1e3)
    };
    let uncached = time(&|| authz::evaluate(policy, std::hint::black_box(&input), keys, now).reason)?;
    let cached = time(&|| authz::evaluate_with_memo(policy, std::hint::black_box(&input), keys, &memo, now).reason)?;
    println!(
        "COST uncached_us={uncached:.2} cached_us={cached:.2} verify_us={:.2}",
        uncached - cached
    );
    Ok(())
}
