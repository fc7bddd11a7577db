//! audgate's pure decision core, shared by the ext_authz server (`audgate`) and the in-process
//! Envoy filter (`audgate-envoy`):
//!
//! - [`authz`]: route table, token extraction, JWT parsing and verification, claim checks, the
//!   reason codes and the plain-data response. No I/O, no clock: `now` and the issuers' keys
//!   are parameters.
//! - [`config`]: YAML -> validated [`config::Config`], every error with file:line:column.
//! - [`jwks`]: JWKS parsing (fetching and caching live in `audgate-keys`).
#![forbid(unsafe_code)]

pub mod authz;
pub mod config;
pub mod jwks;
