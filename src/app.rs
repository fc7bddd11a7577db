//! Wiring for `audgate serve`: the shared state, the three listeners (gRPC ext_authz + health,
//! HTTP authorization, admin), config reloads, and the shutdown sequence.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;

use crate::check::Snapshot;
use crate::config::{self, Config};
use crate::grpc;
use crate::jwks::KeyStore;
use crate::serve::{self, Limits};
use crate::telemetry::Telemetry;
use crate::tls::{self, Tls};
use crate::{admin, admin_api, http, metrics, reload};

/// How long in-flight checks get to finish after SIGTERM before the process exits anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest CheckRequest accepted (tonic's default, made explicit): Envoy sends headers,
/// and a body only with `with_request_body`, which audgate does not need.
pub const MAX_CHECK_BYTES: usize = 4 << 20;
/// Concurrent streams on one HTTP/2 connection (Envoy opens one connection per worker).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Open connections per listener at most (fewer when the open-files limit is low: see
/// [`connection_budget`]). Istio gives every sidecar's Envoy its own connections to audgate.
pub const MAX_CONNECTIONS: usize = 16_384;
/// Admin connections at most: probes, Prometheus and the occasional `explain --server`.
pub const MAX_ADMIN_CONNECTIONS: usize = 256;
/// File descriptors kept out of every listener's reach: JWKS fetches, config reads, the
/// directory watch, logs.
const RESERVED_FILES: u64 = 128;
/// How often readiness is re-evaluated for gRPC health: often while not ready, so gRPC health
/// turns SERVING within milliseconds of `/readyz` (an Envoy health check right after keys load
/// must not see NOT_SERVING), and at a calmer pace once serving.
const HEALTH_POLL_NOT_READY: Duration = Duration::from_millis(10);
/// How often the recorded check durations are folded into the histogram. The fold runs on the
/// serving thread, 2-4 ns a sample (measured: 25,000 samples 52 µs, 225,000 samples 0.8-0.9 ms):
/// every 5 s at ~45,000 checks/s it held up the checks behind it for nearly a millisecond; a
/// fifth of a second keeps each fold to ~40 µs at that rate.
const METRICS_UPKEEP: Duration = Duration::from_millis(200);
const HEALTH_POLL_READY: Duration = Duration::from_millis(200);
/// The gRPC service names health is reported for ("" is the whole server).
const HEALTH_SERVICES: [&str; 2] = ["", "envoy.service.auth.v3.Authorization"];

/// What the listeners share. A check clones the snapshot `Arc` once and finishes on it,
/// whatever a reload swaps in meanwhile.
pub struct State {
    snapshot: RwLock<Arc<Snapshot>>,
    draining: AtomicBool,
    pub config_path: PathBuf,
}

impl State {
    pub fn new(snapshot: Snapshot, config_path: PathBuf) -> State {
        State {
            snapshot: RwLock::new(Arc::new(snapshot)),
            draining: AtomicBool::new(false),
            config_path,
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ready: not shutting down, and every issuer's keys loaded. `Err` lists what is missing.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        if self.draining.load(Ordering::Acquire) {
            return Err(vec!["shutting down".to_owned()]);
        }
        let missing = self.snapshot().missing();
        if missing.is_empty() { Ok(()) } else { Err(missing) }
    }

    /// Validate and swap in a new config. Issuers whose key source is unchanged keep their
    /// keys; new ones start loading. A static key file is re-read.
    pub fn apply(&self, config: Config) -> Result<(), String> {
        let current = self.snapshot();
        if config.listen != current.config.listen || config.admin_explain != current.config.admin_explain {
            tracing::warn!(
                "listen addresses, listen.tls or admin.explain changed in {}: they take effect after a restart",
                self.config_path.display()
            );
        }
        if config.tracing != current.config.tracing {
            tracing::warn!(
                "tracing changed in {}: it takes effect after a restart",
                self.config_path.display()
            );
        }
        let (keys, fresh) = KeyStore::build(&config, Some(&current.keys))?;
        for reused in keys
            .issuers()
            .iter()
            .filter(|k| !fresh.iter().any(|f| Arc::ptr_eq(f, k)))
        {
            if matches!(reused.config().source, config::KeySource::File(_)) {
                let reused = Arc::clone(reused);
                tokio::spawn(async move { reused.refresh().await });
            }
        }
        KeyStore::spawn_refresh(fresh);
        metrics::set_config_info(Some(&current.config.hash), &config.hash);
        tracing::info!(hash = %config.hash, "config loaded");
        let snapshot = Snapshot::new(config, keys).with_telemetry(current.telemetry.clone());
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
        Ok(())
    }
}

/// The runtime for `audgate serve`. One CPU (a pinned process, or a container limited to one
/// core): tokio's current-thread runtime, which served a cached check with 10-15% less CPU than
/// the multi-thread runtime with its one worker on a busy machine, and no more on a quiet one
/// (docs/performance.md). More CPUs: the
/// multi-thread runtime, one worker per CPU. `available_parallelism` follows the affinity mask
/// and the cgroup CPU quota.
pub fn runtime() -> tokio::runtime::Builder {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all();
    builder
}

/// Load the config or return every error (file:line:column), one a line.
pub fn load_config(path: &std::path::Path) -> Result<Config, String> {
    match config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                tracing::warn!("{}", config::located(path, w, "warning"));
            }
            Ok(loaded.config)
        }
        Err(errors) => Err(errors.to_string()),
    }
}

/// Connections the kernel queues for a listener that has not accepted them yet (capped by
/// `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 128: a burst of sidecars
/// connecting at once, or a listener at its connection limit, would see SYNs dropped and
/// retried for seconds.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    let cannot = |e: std::io::Error| format!("cannot listen on {addr} ({what}): {e}");
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(cannot)?;
    socket.set_reuseaddr(true).map_err(cannot)?;
    socket.bind(addr).map_err(cannot)?;
    let listener = socket.listen(LISTEN_BACKLOG).map_err(cannot)?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(addr = %local, "{what} listening");
    Ok(listener)
}

/// Run the service until `shutdown` resolves, then drain: readiness goes to 503/NOT_SERVING,
/// the listeners stop accepting, in-flight checks finish (up to [`DRAIN_TIMEOUT`]).
pub async fn run(
    config: Config,
    config_path: PathBuf,
    metrics_handle: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    // bad certificate files stop audgate here, before anything listens
    let tls = match &config.listen.tls {
        Some(settings) => {
            let tls = Tls::load(settings)?;
            tracing::info!("TLS on listen.grpc and listen.http: {}", tls::describe(settings));
            Some(tls)
        }
        None => None,
    };
    let telemetry = match &config.tracing {
        Some(settings) => {
            metrics::describe_tracing();
            Some(Arc::new(Telemetry::start(settings)?))
        }
        None => None,
    };
    let (keys, fresh) = KeyStore::build(&config, None)?;
    KeyStore::spawn_refresh(fresh);
    metrics::set_config_info(None, &config.hash);
    let listen = config.listen.clone();
    let admin_explain = config.admin_explain;
    let snapshot = Snapshot::new(config, keys).with_telemetry(telemetry.clone());
    let state = Arc::new(State::new(snapshot, config_path));

    let grpc_listener = bind(listen.grpc, "gRPC ext_authz (listen.grpc)")?;
    let http_listener = bind(listen.http, "HTTP authorization (listen.http)")?;
    let admin_listener = bind(listen.admin, "admin (listen.admin)")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);

    let (health, health_service) = tonic_health::server::health_reporter();
    for service in HEALTH_SERVICES {
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
    let health_task = tokio::spawn(report_health(Arc::clone(&state), health.clone()));
    let upkeep = tokio::spawn({
        let handle = metrics_handle.clone();
        async move {
            loop {
                tokio::time::sleep(METRICS_UPKEEP).await;
                handle.run_upkeep();
            }
        }
    });
    let reloader = tokio::spawn(reload::watch(Arc::clone(&state), stop_rx.clone()));
    let tls_watch = tls
        .as_ref()
        .map(|tls| tokio::spawn(tls::watch(Arc::clone(tls), stop_rx.clone())));

    let budget = connection_budget(raise_open_files_limit());
    let grpc_router = grpc::Listener::new(
        Arc::clone(&state),
        MAX_CHECK_BYTES,
        tonic::service::Routes::new(health_service).prepare().into_axum_router(),
    );
    let mut grpc = tokio::spawn(serve::serve(
        grpc_listener,
        grpc_router,
        budget.grpc,
        tls.clone(),
        "listen.grpc",
        stop_rx.clone(),
    ));
    let mut http = tokio::spawn(serve::serve(
        http_listener,
        http::router(Arc::clone(&state)),
        budget.http,
        tls.clone(),
        "listen.http",
        stop_rx.clone(),
    ));
    let mut admin_router = admin::router(Arc::clone(&state), metrics_handle);
    if admin_explain {
        admin_router = admin_router.merge(admin_api::routes(Arc::clone(&state))?);
        tracing::info!("audgate.v1.Admin/Explain served on the admin listener");
    }
    let admin = tokio::spawn(serve::serve(
        admin_listener,
        admin_router,
        budget.admin,
        None, // admin stays plain: probes and Prometheus
        "listen.admin",
        admin_stop_rx,
    ));

    tokio::select! {
        () = shutdown => {}
        result = &mut grpc => return Err(format!("the gRPC listener stopped: {result:?}")),
        result = &mut http => return Err(format!("the HTTP listener stopped: {result:?}")),
    }
    state.draining.store(true, Ordering::Release);
    for service in HEALTH_SERVICES {
        health.set_service_status(service, ServingStatus::NotServing).await;
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let grpc = grpc.await;
        let http = http.await;
        (grpc, http)
    })
    .await;
    match drained {
        Ok((grpc, http)) => {
            report_server_exit("gRPC", grpc);
            report_server_exit("HTTP", http);
            tracing::info!("drained: every in-flight check answered");
        }
        Err(_) => tracing::warn!("drain took longer than {DRAIN_TIMEOUT:?}; exiting anyway"),
    }
    let _ = admin_stop_tx.send(true);
    let _ = admin.await;
    for task in [health_task, upkeep, reloader].into_iter().chain(tls_watch) {
        task.abort();
    }
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
    Ok(())
}

fn report_server_exit(what: &str, result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result {
        tracing::error!("{what} server task: {e}");
    }
}

/// Keep gRPC health in step with readiness, so Envoy health checks and Kubernetes gRPC probes
/// see NOT_SERVING until every issuer's keys have loaded.
async fn report_health(state: Arc<State>, health: tonic_health::server::HealthReporter) {
    let mut serving = false;
    loop {
        let ready = state.readiness().is_ok();
        if ready != serving {
            serving = ready;
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for service in HEALTH_SERVICES {
                health.set_service_status(service, status).await;
            }
            tracing::info!(ready, "readiness changed");
        }
        tokio::time::sleep(if serving {
            HEALTH_POLL_READY
        } else {
            HEALTH_POLL_NOT_READY
        })
        .await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot install the SIGTERM handler: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
}

/// How many connections each listener may hold open.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub grpc: Limits,
    pub http: Limits,
    pub admin: Limits,
}

/// Split the open-files limit so that no listener can take the descriptors another needs:
/// a flood of connections on `listen.http` must leave room for gRPC checks, `/healthz` and
/// config reloads. Half to gRPC, a quarter to HTTP, an eighth to admin, within the caps.
pub fn connection_budget(open_files: u64) -> Budget {
    let spare = usize::try_from(open_files.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX);
    let limits = |share: usize, cap: usize| Limits {
        max_connections: (spare / share).clamp(1, cap),
        max_streams: MAX_STREAMS_PER_CONNECTION,
    };
    Budget {
        grpc: limits(2, MAX_CONNECTIONS),
        http: limits(4, MAX_CONNECTIONS),
        admin: limits(8, MAX_ADMIN_CONNECTIONS),
    }
}

/// Raise the soft open-files limit to the hard one (the soft default is often 1024) and return
/// the limit in force.
fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), hard) = (limit.current, limit.maximum) else {
        return u64::MAX; // unlimited
    };
    let wanted = hard.unwrap_or(u64::MAX);
    if wanted > soft {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(wanted),
                maximum: hard,
            },
        ) {
            Ok(()) => return wanted,
            Err(e) => tracing::warn!("cannot raise the open-files limit from {soft} to {wanted}: {e}"),
        }
    }
    soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_leaves_every_listener_room_on_a_small_limit() {
        let b = connection_budget(256);
        assert_eq!(
            (b.grpc.max_connections, b.http.max_connections, b.admin.max_connections),
            (64, 32, 16)
        );
        let total = b.grpc.max_connections + b.http.max_connections + b.admin.max_connections;
        assert!(total as u64 + RESERVED_FILES <= 256);
    }

    #[test]
    fn budget_is_capped_on_a_large_limit() {
        let b = connection_budget(1 << 20);
        assert_eq!(b.grpc.max_connections, MAX_CONNECTIONS);
        assert_eq!(b.http.max_connections, MAX_CONNECTIONS);
        assert_eq!(b.admin.max_connections, MAX_ADMIN_CONNECTIONS);
        assert_eq!(connection_budget(u64::MAX).grpc.max_connections, MAX_CONNECTIONS);
    }

    #[test]
    fn budget_never_drops_to_zero() {
        let b = connection_budget(10);
        assert_eq!(
            (b.grpc.max_connections, b.http.max_connections, b.admin.max_connections),
            (1, 1, 1)
        );
    }
}
