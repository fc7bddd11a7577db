//! The `audgate` command line: parse arguments, set up logging, run the command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use audgate::{app, commands, config, explain, logging, summary};

#[derive(Parser)]
#[command(
    name = "audgate",
    version,
    about = "Envoy ext_authz: verify bearer JWTs, enforce per-route client ids"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Config file.
    #[arg(long, env = "AUDGATE_CONFIG", default_value = "audgate.yaml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ext_authz service.
    Serve(ConfigArg),
    /// Validate a config: a summary (exit 0) or every problem with file:line:column (exit 1).
    CheckConfig(ConfigArg),
    /// The decision for one request, as a trace with hints: exit 0 allow, 3 deny, 2 error.
    Explain(ExplainArgs),
    /// Policy tests for a config: one line a case, then `N passed, M failed`; exit 1 on a failure.
    Test(TestArgs),
    /// Check every configured issuer live (discovery, issuer, usable keys, clock); exit 1 when
    /// one is unusable.
    Doctor(ConfigArg),
}

#[derive(clap::Args)]
struct TestArgs {
    /// Config file.
    #[arg(long, env = "AUDGATE_CONFIG", default_value = "audgate.yaml")]
    config: PathBuf,
    /// Cases files (YAML).
    #[arg(required = true)]
    cases: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["route", "host"])))]
struct ExplainArgs {
    /// Config file.
    #[arg(long, env = "AUDGATE_CONFIG", default_value = "audgate.yaml")]
    config: PathBuf,
    /// Ask a running audgate (its admin listener, with `admin: {explain: true}`) instead of
    /// reading the config: its config and cached keys decide.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "jwks")]
    server: Option<String>,
    /// Pick the route by name (as Envoy's `audgate.route` context extension does).
    #[arg(long, conflicts_with_all = ["host", "path"])]
    route: Option<String>,
    /// The request's host.
    #[arg(long, requires = "path")]
    host: Option<String>,
    /// The request's path (a query string is ignored for matching).
    #[arg(long)]
    path: Option<String>,
    #[arg(long, default_value = "GET")]
    method: String,
    /// The access token; read from standard input when absent.
    #[arg(long)]
    token: Option<String>,
    /// Verify with the keys in this JWKS file instead of the issuer's configured source.
    #[arg(long, conflicts_with = "no_verify")]
    jwks: Option<PathBuf>,
    /// Explain without checking the signature (when the keys are not at hand).
    #[arg(long)]
    no_verify: bool,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    format: OutputFormat,
    /// Decide as of this Unix time instead of now (e.g. to explain a logged request).
    #[arg(long)]
    at: Option<i64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve(_));
    // flushes the log writer thread when main returns
    let _log_writer = init_logging(cli.log_format, serving);
    match cli.command {
        Command::Serve(args) => serve(&args.config),
        Command::CheckConfig(args) => check_config(&args.config),
        Command::Explain(args) => ExitCode::from(explain(args)),
        Command::Test(args) => ExitCode::from(commands::policy_test(&args.config, &args.cases)),
        Command::Doctor(args) => ExitCode::from(commands::doctor(&args.config)),
    }
}

fn explain(args: ExplainArgs) -> u8 {
    let request = explain::Request {
        method: args.method.to_ascii_uppercase(),
        host: args.host.unwrap_or_default(),
        path: args.path.unwrap_or_else(|| "/".to_owned()),
        route: args.route,
        token: args.token.or_else(commands::token_from_stdin),
    };
    let options = commands::ExplainOptions {
        config: args.config,
        request,
        jwks: args.jwks,
        no_verify: args.no_verify,
        format: match args.format {
            OutputFormat::Text => commands::Format::Text,
            OutputFormat::Json => commands::Format::Json,
        },
        at: args.at,
    };
    match args.server {
        Some(server) => commands::explain_remote(&server, options),
        None => commands::explain(options),
    }
}

/// Logs to stderr, filtered `RUST_LOG` style (default `info` for `serve`, else `warn`);
/// `serve` writes through the log writer thread (see [`logging`]).
fn init_logging(format: LogFormat, serving: bool) -> Option<logging::Guard> {
    let default = if serving { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let writer = if serving {
        logging::Writer::Thread
    } else {
        logging::Writer::Stderr
    };
    logging::init(filter, matches!(format, LogFormat::Json), writer)
}

fn serve(path: &Path) -> ExitCode {
    if jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER
        .install_default()
        .is_err()
    {
        tracing::debug!("a JWT crypto provider was already installed");
    }
    let config = match app::load_config(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = match audgate::metrics::install() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match app::runtime().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(config, path.to_owned(), metrics, app::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(loaded) => {
            print!("{}", summary::render(path, &loaded));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.errors.len());
            ExitCode::FAILURE
        }
    }
}
