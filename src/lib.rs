//! audgate: an Envoy / Istio external authorization service that verifies bearer JWTs against
//! each issuer's JWKS and enforces per-route client ids, scopes and roles.
//!
//! The architecture, one module a line:
//!
//! - [`authz`]: the pure decision core. Route table, token extraction, JWT parsing and
//!   verification, claim checks, the reason codes and the plain-data response. No I/O, no
//!   clock, no wire types: `now` and the issuers' keys are parameters.
//! - [`config`]: YAML -> validated [`config::Config`], every error with file:line:column.
//! - [`jwks`]: JWKS parsing (pure), fetching (discovery, URL, file) and the per-issuer cache
//!   with periodic refresh and rate-limited refetch on an unknown `kid`.
//! - [`check`]: one check end to end: evaluate, refetch keys once when the core asks, log.
//! - [`grpc`]: Envoy's `envoy.service.auth.v3.Authorization` over tonic; the only module that
//!   touches envoy-types.
//! - [`http`]: the HTTP authorization endpoint (Envoy `http_service`, nginx, Traefik).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`metrics`]: SPEC.md's metrics as domain functions; labels come only from the config.
//! - [`reload`]: config reloads on a directory watch, SIGHUP and a periodic check.
//! - [`app`]: wiring for `audgate serve`: shared state, listeners, gRPC health, shutdown.
//! - [`summary`]: the one-screen config summary `audgate check-config` prints.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod check;
pub mod config;
pub mod grpc;
pub mod http;
pub mod jwks;
pub mod metrics;
pub mod reload;
pub mod summary;
