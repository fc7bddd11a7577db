//! `audgate serve`, with the knobs the benchmarks compare (issue 6): the same `app::run` the
//! binary runs, on a runtime and with metrics and logging chosen on the command line. Used by
//! `scripts/bench.sh --variants` to measure what the runtime flavour, the Prometheus recorder
//! and the decision log line cost per check, without touching `src/`.
//!
//! ```sh
//! serve_variant --config audgate.yaml [--runtime multi|current] [--metrics on|off] [--log info|warn|off]
//! ```
//! Defaults are what `audgate serve` does: multi-thread runtime, metrics on, log level info
//! (text to stderr).

use std::path::PathBuf;

use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = PathBuf::from("audgate.yaml");
    let (mut runtime, mut metrics, mut log) = ("multi".to_owned(), "on".to_owned(), "info".to_owned());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--config" => config = PathBuf::from(value()?),
            "--runtime" => runtime = value()?,
            "--metrics" => metrics = value()?,
            "--log" => log = value()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if log != "off" {
        tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(&log))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    let loaded = audgate::app::load_config(&config)?;
    let handle = match metrics.as_str() {
        "on" => audgate::metrics::install()?,
        // a handle to render an empty /metrics: no recorder installed, recording is a no-op
        "off" => PrometheusBuilder::new().build_recorder().handle(),
        other => return Err(format!("--metrics {other}: on or off").into()),
    };
    let rt = match runtime.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        "multi" => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
        other => return Err(format!("--runtime {other}: current or multi").into()),
    };
    eprintln!("serve_variant: runtime={runtime} metrics={metrics} log={log}");
    rt.block_on(audgate::app::run(
        loaded,
        config,
        handle,
        audgate::app::shutdown_signal(),
    ))?;
    Ok(())
}
