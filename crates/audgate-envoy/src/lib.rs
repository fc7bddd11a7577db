//! audgate inside Envoy: an HTTP filter for Envoy's dynamic modules
//! (`envoy.filters.http.dynamic_modules`, Envoy 1.40+), making the decisions `audgate serve`
//! makes, from the same config file, without the gRPC hop. See docs/envoy-filter.md.
//!
//! - `ffi`: the C ABI (Envoy 1.40, ABI v0.2.0): hooks Envoy calls, callbacks the module calls.
//!   The only module with `unsafe`; every hook runs inside `catch_unwind`.
//! - [`filter`]: the decision flow per stream, over the [`filter::Stream`] trait.
//! - `background`: the module's own thread (key refresh, refetch, config reload, stats hand-over).
//! - [`metrics`]: the module's Envoy stats and how counts made off Envoy's workers reach them.
#![deny(unsafe_code)]

mod background;
#[cfg(not(test))]
mod ffi;
pub mod filter;
pub mod metrics;

/// Envoy's log levels (`envoy_dynamic_module_type_log_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// Route the `tracing` events of the shared crates (key refresh and refetch outcomes) into
/// Envoy's log, at their level (debug and above reach Envoy, which filters by its own level).
/// Once per process; later calls do nothing.
#[cfg_attr(test, allow(dead_code))]
pub(crate) fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_writer(EnvoyLogWriter)
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::DEBUG)
            .try_init();
    });
}

/// Makes one [`EnvoyLine`] per event, at the event's level.
struct EnvoyLogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for EnvoyLogWriter {
    type Writer = EnvoyLine;

    fn make_writer(&'a self) -> EnvoyLine {
        EnvoyLine(Level::Info, Vec::new())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EnvoyLine {
        let level = match *meta.level() {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Info,
            _ => Level::Debug,
        };
        EnvoyLine(level, Vec::new())
    }
}

/// One formatted event, handed to Envoy's log when dropped.
struct EnvoyLine(Level, Vec<u8>);

impl std::io::Write for EnvoyLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EnvoyLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.1);
        let text = text.trim_end();
        if !text.is_empty() {
            log(self.0, &format!("audgate: {text}"));
        }
    }
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
