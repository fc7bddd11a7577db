//! audgate inside Envoy: an HTTP filter for Envoy's dynamic modules
//! (`envoy.filters.http.dynamic_modules`, Envoy 1.40+), making the decisions `audgate serve`
//! makes, from the same config file, without the gRPC hop. See docs/envoy-filter.md.
//!
//! - `ffi`: the C ABI (Envoy 1.40, ABI v0.2.0): hooks Envoy calls, callbacks the module calls.
//!   The only module with `unsafe`; every hook runs inside `catch_unwind`.
//! - [`filter`]: the decision flow per stream, over the [`filter::Stream`] trait.
//! - `background`: the module's own thread (key refresh, refetch, config reload).
#![deny(unsafe_code)]

mod background;
#[cfg(not(test))]
mod ffi;
pub mod filter;

/// Envoy's log levels (`envoy_dynamic_module_type_log_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// A line in Envoy's log (from any thread).
#[cfg(not(test))]
pub(crate) fn log(level: Level, message: &str) {
    ffi::log(level, message);
}

/// Unit tests run without Envoy: log lines go to stderr.
#[cfg(test)]
pub(crate) fn log(level: Level, message: &str) {
    eprintln!("{level:?}: {message}");
}
