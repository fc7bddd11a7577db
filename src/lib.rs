//! audgate: an Envoy / Istio external authorization service that verifies bearer JWTs against
//! each issuer's JWKS and enforces per-route client ids, scopes and roles.
//!
//! The architecture, one module a line:
//!
//! - [`authz`] (crates/audgate-core): the pure decision core. Route table, token extraction,
//!   JWT parsing and verification, claim checks (`required_claims` in `conditions`), CORS
//!   preflights, templated issuers' tenants (`tenant`), the reason codes and the plain-data
//!   response. No I/O, no clock, no wire types: `now` and the issuers' keys are parameters.
//! - [`config`] (crates/audgate-core): YAML -> validated [`config::Config`], every error with
//!   file:line:column.
//! - [`jwks`] (crates/audgate-keys; parsing in crates/audgate-core): JWKS parsing (pure),
//!   fetching (discovery, URL, file) and the per-issuer cache with periodic refresh and
//!   rate-limited refetch on an unknown `kid`; a templated issuer's per-tenant caches (bounded,
//!   with a fetch budget).
//! - `crates/audgate-envoy` (not a module of this crate): the same decisions inside Envoy, as
//!   a dynamic module (`libaudgate_envoy.so`), over the same core and key cache.
//! - [`token_cache`] (crates/audgate-keys): the verified-token cache (bounded, keyed by a
//!   token hash, dropped when the issuer's keys change).
//! - [`check`]: one check end to end: evaluate, refetch keys once when the core asks, log.
//! - [`grpc`]: Envoy's `envoy.service.auth.v3.Authorization/Check` on tonic's unary handling,
//!   with its own codec (the fields a check reads, decoded in place; the answer written in one
//!   pass). envoy-types is only its tests' oracle.
//! - [`http`]: the HTTP authorization endpoint (Envoy `http_service`, nginx, Traefik).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`admin_api`]: the `audgate.v1.Admin/Explain` gRPC call (admin listener, opt-in) and its
//!   client.
//! - [`metrics`]: SPEC.md's metrics as domain functions; labels come only from the config.
//! - [`logging`]: log lines to stderr, through a batching writer thread for `serve`.
//! - [`reload`]: config reloads on a directory watch, SIGHUP and a periodic check.
//! - [`tls`]: TLS and mTLS for the gRPC and HTTP listeners (`listen.tls`), with the
//!   certificate re-read when its files change and the client SAN allow-list.
//! - [`telemetry`]: OpenTelemetry spans (`tracing:`): a span per check, its parent from
//!   Envoy's `traceparent`, exported over OTLP/gRPC off the check path.
//! - [`serve`]: the accept loop of the three listeners, with connection, handshake, header
//!   and keep-alive limits.
//! - [`app`]: wiring for `audgate serve`: shared state, listeners, gRPC health, shutdown.
//! - [`summary`]: the one-screen config summary `audgate check-config` prints.
//! - [`doctor`]: `audgate doctor`: every issuer checked live (discovery, issuer, keys, clock).
//! - [`explain`]: `audgate explain`: one decision as a trace, with hints on deny.
//! - [`policy_test`]: `audgate test`: cases (request, token or claims, expectation) run
//!   against a config, with ephemeral keys standing in for the issuers'.
//! - [`commands`]: the one-shot CLI commands (`explain`, `test`, `doctor`) around the above.
#![forbid(unsafe_code)]

pub use audgate_core::{authz, config};
pub use audgate_keys as jwks;
pub use audgate_keys::token_cache;

pub mod admin;
pub mod admin_api;
pub mod app;
pub mod check;
pub mod commands;
pub mod doctor;
pub mod explain;
pub mod grpc;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod policy_test;
pub mod reload;
pub mod serve;
pub mod summary;
pub mod telemetry;
pub mod tls;
