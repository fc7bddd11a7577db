//! The one-shot commands behind the CLI (`explain`, `test`, `doctor`): load what they need,
//! run, print, and return the exit code. `main.rs` only parses arguments.

use std::cell::OnceCell;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::authz::{IssuerId, jwt};
use crate::config::{self, Config};
use crate::explain::{self, Signatures};
use crate::jwks::{IssuerKeys, KeySet, Refreshed};

/// Exit code for usage errors, bad configs and keys that cannot be loaded.
pub const EXIT_ERROR: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// What `audgate explain` was asked.
pub struct ExplainOptions {
    pub config: PathBuf,
    pub request: explain::Request,
    /// Keys for the token's issuer from this JWKS file instead of the config's source.
    pub jwks: Option<PathBuf>,
    pub no_verify: bool,
    pub format: Format,
    /// Evaluate as of this Unix time instead of now.
    pub at: Option<i64>,
}

fn load(path: &Path) -> Result<Config, String> {
    config::load(path).map(|l| l.config).map_err(|e| e.to_string())
}

/// The token from `--token`, or from standard input (trimmed; empty means none).
pub fn token_from_stdin() -> Option<String> {
    let mut text = String::new();
    if std::io::stdin().read_to_string(&mut text).is_err() {
        return None;
    }
    let token = text.trim();
    let token = token.strip_prefix("Bearer ").unwrap_or(token).trim();
    (!token.is_empty()).then(|| token.to_owned())
}

/// Run one future on a small runtime of its own (the one-shot commands are synchronous).
fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(|runtime| runtime.block_on(future))
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// Print to stdout; a closed pipe (`| head`) is not an error worth a panic.
pub fn print_out(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// `audgate explain` against the config file.
pub fn explain(options: ExplainOptions) -> u8 {
    let config = match load(&options.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_ERROR;
        }
    };
    let policy = &config.policy;
    let parsed = options.request.token.as_deref().and_then(|t| jwt::parse(t).ok());
    let resolved = parsed.as_ref().and_then(|p| policy.resolve_iss(&p.claims.iss));
    let issuer = resolved.map(|(id, _)| id);
    let tenant = resolved.and_then(|(_, t)| t);
    // fetched when first asked for, by the decision or by the explanation of a token's key;
    // keys that cannot be loaded are exit 2 (the error on stderr, nothing on stdout) only when
    // the decision needs them: an anonymous route, no route or an issuer the route does not
    // accept is answered as it would be with the issuer reachable
    let fetched: OnceCell<Result<Arc<KeySet>, String>> = OnceCell::new();
    let keys = |id: IssuerId| {
        let wanted = issuer.filter(|i| *i == id && !options.no_verify)?;
        let got = fetched.get_or_init(|| issuer_keys(&config, wanted, tenant, options.jwks.as_deref()));
        got.as_ref().ok().cloned()
    };
    let signatures = if options.no_verify {
        Signatures::Skip
    } else {
        Signatures::Verify
    };
    let now = options.at.unwrap_or_else(crate::check::unix_now);
    let e = explain::explain(policy, &options.request, keys, signatures, now);
    if let (Some(Err(why)), EXIT_ERROR) = (fetched.get(), e.exit_code()) {
        // the decision needed the keys (keys_unavailable): the error, not an explanation
        eprintln!("{why}");
        return EXIT_ERROR;
    }
    let text = match options.format {
        Format::Text => explain::render_text(&e),
        Format::Json => serde_json::to_string_pretty(&e).unwrap_or_default() + "\n",
    };
    print_out(&text);
    e.exit_code()
}

/// `audgate explain --server HOST:PORT`: the running instance's config and keys decide.
pub fn explain_remote(server: &str, options: ExplainOptions) -> u8 {
    let r = &options.request;
    let request = crate::admin_api::pb::ExplainRequest {
        route: r.route.clone().unwrap_or_default(),
        host: r.host.clone(),
        path: r.path.clone(),
        method: r.method.clone(),
        token: r.token.clone().unwrap_or_default(),
        no_verify: options.no_verify,
        at: options.at.unwrap_or(0),
    };
    match block_on(crate::admin_api::explain_remote(server, request)).and_then(|answer| answer) {
        Ok(answer) => {
            match options.format {
                Format::Text => print_out(&answer.text),
                Format::Json => print_out(&(answer.json + "\n")),
            }
            u8::try_from(answer.exit_code).unwrap_or(EXIT_ERROR)
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_ERROR
        }
    }
}

/// The issuer's keys (a templated issuer's: the tenant's): from `--jwks`, else fetched once
/// from the config's source.
fn issuer_keys(
    config: &Config,
    id: IssuerId,
    tenant: Option<&str>,
    jwks: Option<&Path>,
) -> Result<Arc<KeySet>, String> {
    let name = &config.policy.issuers[id].name;
    if let Some(path) = jwks {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        return KeySet::parse(&bytes)
            .map(Arc::new)
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    let source = match tenant {
        Some(t) => crate::jwks::tenant_source(&config.key_sources[id], t),
        None => config.key_sources[id].clone(),
    };
    let keys = IssuerKeys::new(name.clone(), source.clone())?;
    match block_on(keys.refresh())? {
        Refreshed::Ok { .. } => keys.current().ok_or_else(|| format!("issuer {name}: no keys")),
        Refreshed::Failed(e) => Err(format!(
            "the keys of issuer {name} cannot be loaded ({}): {e}\n(--jwks FILE explains with keys from a file, --no-verify without checking the signature)",
            source.source
        )),
    }
}

/// `audgate test`: exit 0 when every case passes, 1 on a failure, 2 when the config or a
/// cases file does not load.
pub fn policy_test(config_path: &Path, files: &[PathBuf]) -> u8 {
    let config = match load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_ERROR;
        }
    };
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    match crate::policy_test::run(&config.policy, &files, crate::check::unix_now()) {
        Ok(report) => {
            print_out(&report.text);
            u8::from(report.failed > 0)
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            EXIT_ERROR
        }
    }
}

/// `audgate doctor`: exit 0 when every issuer is usable, 1 when one is not, 2 when the config
/// does not load.
pub fn doctor(config_path: &Path) -> u8 {
    let config = match load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_ERROR;
        }
    };
    let mut report = String::new();
    match block_on(crate::doctor::run(&config, &mut report)) {
        Ok(usable) => {
            print_out(&report);
            u8::from(!usable)
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_ERROR
        }
    }
}
