//! `audgate serve`, with the knobs the benchmarks compare (issue 6): the same `app::run` the
//! binary runs, on a runtime and with metrics and logging chosen on the command line. Used by
//! `scripts/bench.sh --variants` to measure what the runtime flavour, the Prometheus recorder
//! and the decision log line cost per check, without touching `src/`.
//!
//! ```sh
//! serve_variant --config audgate.yaml [--runtime auto|multi|current] [--metrics on|off]
//!               [--log info|warn|off] [--log-writer thread|stderr]
//! ```
//! Defaults are what `audgate serve` does: the runtime `app::runtime` picks (current-thread on
//! one CPU), metrics on, log level info, text lines through the log writer thread.

use std::path::PathBuf;

use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = PathBuf::from("audgate.yaml");
    let (mut runtime, mut metrics, mut log) = ("auto".to_owned(), "on".to_owned(), "info".to_owned());
    let mut log_writer = "thread".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--config" => config = PathBuf::from(value()?),
            "--runtime" => runtime = value()?,
            "--metrics" => metrics = value()?,
            "--log" => log = value()?,
            "--log-writer" => log_writer = value()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let writer = match log_writer.as_str() {
        "thread" => audgate::logging::Writer::Thread,
        "stderr" => audgate::logging::Writer::Stderr,
        other => return Err(format!("--log-writer {other}: thread or stderr").into()),
    };
    let _log_guard = (log != "off").then(|| audgate::logging::init(EnvFilter::new(&log), false, writer));
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    let loaded = audgate::app::load_config(&config)?;
    let handle = match metrics.as_str() {
        "on" => audgate::metrics::install()?,
        // a handle to render an empty /metrics: no recorder installed, recording is a no-op
        "off" => PrometheusBuilder::new().build_recorder().handle(),
        other => return Err(format!("--metrics {other}: on or off").into()),
    };
    let rt = match runtime.as_str() {
        "auto" => audgate::app::runtime().build()?,
        "current" => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        "multi" => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
        other => return Err(format!("--runtime {other}: current or multi").into()),
    };
    eprintln!("serve_variant: runtime={runtime} metrics={metrics} log={log} log-writer={log_writer}");
    rt.block_on(audgate::app::run(
        loaded,
        config,
        handle,
        audgate::app::shutdown_signal(),
    ))?;
    Ok(())
}
