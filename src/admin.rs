//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process answers),
//! `/readyz` (a config is loaded and every issuer's keys loaded at least once; 503 naming what
//! is missing otherwise, and while shutting down).

use std::sync::Arc;

use axum::Router;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::app::State;

#[derive(Clone)]
struct Admin {
    state: Arc<State>,
    metrics: PrometheusHandle,
}

pub fn router(state: Arc<State>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Admin { state, metrics })
}

async fn metrics_text(Extract(admin): Extract<Admin>) -> Response {
    let body = admin.metrics.render();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn readyz(Extract(admin): Extract<Admin>) -> Response {
    match admin.state.readiness() {
        Ok(()) => axum::Json(serde_json::json!({"ready": true})).into_response(),
        Err(missing) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"ready": false, "missing": missing})),
        )
            .into_response(),
    }
}
