//! Wiring for `audgate serve`: load the config, start the issuers' key caches, serve gRPC
//! until SIGTERM / SIGINT.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, RwLock};

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::check::Snapshot;
use crate::config::{self, Config};
use crate::grpc::AuthorizationService;
use crate::jwks::KeyStore;

/// What the listeners share: the current snapshot. A check clones the `Arc` once and works on
/// that snapshot to the end, whatever replaces it meanwhile.
pub struct State {
    snapshot: RwLock<Arc<Snapshot>>,
}

impl State {
    pub fn new(snapshot: Snapshot) -> State {
        State {
            snapshot: RwLock::new(Arc::new(snapshot)),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Load the config or print every error (file:line:column) and fail.
pub fn load_config(path: &Path) -> Result<Config, String> {
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

/// Run the service until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), String> {
    let keys = KeyStore::new(&config)?;
    let grpc_addr = config.listen.grpc;
    let mut refreshers = JoinSet::new();
    for issuer in keys.issuers() {
        refreshers.spawn(Arc::clone(issuer).run_refresh());
    }
    let state = Arc::new(State::new(Snapshot { config, keys }));

    let listener = TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| format!("cannot listen on {grpc_addr} (listen.grpc): {e}"))?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| e.to_string())?, "gRPC ext_authz listening");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let result = tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(AuthorizationService::new(state)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| format!("gRPC server failed: {e}"));
    refreshers.abort_all();
    result
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
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
