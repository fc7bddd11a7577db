//! The filter's logic, with no FFI: a [`FilterConfig`] per Envoy filter config (the audgate
//! config file, its issuers' key caches and the background thread), a [`Filter`] per stream.
//! Envoy is reached only through the [`Stream`] trait, which src/ffi.rs implements over the C
//! ABI (and the unit tests implement in memory).

use std::borrow::Cow;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use audgate_core::authz::{self, CheckInput, Decision, Headers, Reason, Verdict};
use audgate_core::config::{self, Config};
use audgate_keys::KeyStore;
use audgate_keys::token_cache::TokenCache;

use crate::background::Background;
use crate::metrics::{CheckCounts, Pending, Recording, StatIds};
use crate::{Level, log};

/// The dynamic metadata namespace (`%DYNAMIC_METADATA(audgate:route)%`).
pub const METADATA_NAMESPACE: &str = "audgate";

/// What the filter needs from Envoy for one stream, during one hook.
///
/// Reading borrows `self`; every call that changes the stream takes `&mut self`. Envoy keeps
/// the header buffers it lends valid until the end of the hook *unless a setter is called*, so
/// this split lets the compiler prove that no borrowed header outlives a change to the request.
pub trait Stream {
    /// The request headers (pseudo-headers included) as Envoy holds them, names lower-case,
    /// borrowed from Envoy's header map: no copy is made.
    fn request_headers(&self) -> Vec<(&[u8], &[u8])>;
    /// The audgate route named by the Envoy route's per-filter config, if any.
    fn route_name(&self) -> Option<&str>;
    /// Overwrite a request header (the client's copies included).
    fn set_request_header(&mut self, name: &str, value: &str);
    /// Add a request header the request does not carry (cheaper for Envoy than a set, which
    /// looks for copies to replace first).
    fn add_request_header(&mut self, name: &str, value: &str);
    fn remove_request_header(&mut self, name: &str);
    /// Answer the client with a local reply; `details` is Envoy's response code details.
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str, details: &str);
    /// Strings in the `audgate` dynamic metadata namespace, in one go.
    fn set_metadata(&mut self, entries: &[(&str, &str)]);
    /// How long a check took ([`crate::metrics::CHECK_DURATION`]); the decision itself is
    /// counted in the snapshot's [`CheckCounts`].
    fn record_duration(&mut self, micros: u64);
}

/// A config with the key caches of its issuers: what every check reads.
pub struct Snapshot {
    pub config: Config,
    pub keys: KeyStore,
    /// Verified tokens (SPEC.md "Caching"), as `audgate serve` keeps them; new per config.
    pub tokens: TokenCache,
    /// Decisions by route, verdict and reason, until the background thread takes them.
    pub counts: CheckCounts,
}

impl Snapshot {
    /// A snapshot whose decision counts drain into `pending`.
    pub fn new(config: Config, keys: KeyStore, pending: Arc<Pending>) -> Snapshot {
        let tokens = TokenCache::new(&config.token_cache);
        let routes = config.policy.routes.routes().iter().map(|r| r.name.as_str());
        let counts = CheckCounts::new(routes, pending);
        Snapshot {
            config,
            keys,
            tokens,
            counts,
        }
    }
}

/// The snapshot in use, replaced whole by a reload.
pub struct Shared {
    pub path: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    /// The background thread's runtime, once started (never in `envoy --mode validate`).
    pub runtime: OnceLock<tokio::runtime::Handle>,
    /// Counts made off Envoy's workers, for Envoy's stats ([`crate::metrics`]).
    pub pending: Arc<Pending>,
    /// Asks Envoy's main thread to take [`Self::pending`] (set once Envoy's config scheduler
    /// exists; callable from any thread).
    pub notify: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Shared {
    fn new(path: &Path, snapshot: Snapshot, pending: Arc<Pending>) -> Shared {
        Shared {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(snapshot)),
            runtime: OnceLock::new(),
            pending,
            notify: OnceLock::new(),
        }
    }

    pub fn current(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn replace(&self, snapshot: Snapshot) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }
}

/// What `envoy --mode validate` runs with when the config file is not there: denies everything.
const PLACEHOLDER: &str = "default: deny\n";

/// One Envoy filter config: `filter_config` names the audgate config file.
pub struct FilterConfig {
    pub shared: Arc<Shared>,
    /// Held for its Drop: stopping the thread when Envoy destroys the config.
    _background: Option<Background>,
    /// Envoy's ids of the module's stats, once defined.
    pub stats: StatIds,
}

impl FilterConfig {
    /// Load and validate the config file at `path`; with `run`, start the background thread
    /// (key refresh, refetch, reload). Errors are audgate's `file:line:column: error: ...` lines.
    pub fn load(path: &str, run: bool) -> Result<FilterConfig, Vec<String>> {
        let path = path.trim();
        if path.is_empty() {
            return Err(vec![
                "audgate: filter_config must be the path of an audgate config file".to_owned(),
            ]);
        }
        let path = Path::new(path);
        if !run && !path.exists() {
            // `envoy --mode validate` where the file is not mounted: nothing will be served
            log(
                Level::Warn,
                &format!(
                    "audgate: {} does not exist; validating the Envoy config without it",
                    path.display()
                ),
            );
            let loaded = config::parse(PLACEHOLDER).map_err(|e| vec![format!("audgate: placeholder config: {e:?}")])?;
            let (keys, _) = KeyStore::build(&loaded.config, None).map_err(|e| vec![e])?;
            let pending = Arc::new(Pending::default());
            let snapshot = Snapshot::new(loaded.config, keys, Arc::clone(&pending));
            return Ok(FilterConfig {
                shared: Arc::new(Shared::new(path, snapshot, pending)),
                _background: None,
                stats: StatIds::default(),
            });
        }
        let loaded = config::load(path).map_err(|e| e.to_string().lines().map(str::to_owned).collect::<Vec<_>>())?;
        for w in &loaded.warnings {
            log(Level::Warn, &config::located(path, w, "warning"));
        }
        let (keys, fresh) =
            KeyStore::build(&loaded.config, None).map_err(|e| vec![format!("{}: error: {e}", path.display())])?;
        let text = std::fs::read(path).unwrap_or_default();
        let pending = Arc::new(Pending::default());
        // the token cache's hit and miss counters are taken here: they count for this config
        let snapshot =
            Recording(Arc::clone(&pending)).scope(|| Snapshot::new(loaded.config, keys, Arc::clone(&pending)));
        let shared = Arc::new(Shared::new(path, snapshot, pending));
        let background = if run {
            let bg = Background::start(Arc::clone(&shared), fresh, text)
                .map_err(|e| vec![format!("audgate: cannot start the background thread: {e}")])?;
            Some(bg)
        } else {
            None
        };
        Ok(FilterConfig {
            shared,
            _background: background,
            stats: StatIds::default(),
        })
    }
}

/// What the stream should do next.
pub enum Step {
    /// Let the request through (headers already adjusted).
    Continue,
    /// A local reply was sent, or the stream waits.
    Stop,
    /// The token named a `kid` the issuer's (or tenant's) current keys lack, or no keys ever
    /// loaded: stop, let the background thread refetch (rate-limited, shared), then
    /// [`Filter::on_resume`].
    WaitForKeys(Refetch),
}

/// A refetch a check asked for: the issuer, the tenant of a templated one, and the keys'
/// generation the check saw.
pub struct Refetch {
    snapshot: Arc<Snapshot>,
    issuer: authz::IssuerId,
    tenant: Option<String>,
    generation: u64,
}

impl Refetch {
    /// Fetch within the rate limits (a new tenant's keys cache is created here); on the
    /// background thread's runtime.
    pub async fn run(self) {
        self.snapshot
            .keys
            .refetch(self.issuer, self.tenant.as_deref(), self.generation)
            .await;
    }
}

/// One stream.
pub struct Filter {
    shared: Arc<Shared>,
    /// Whether this stream already waited for a refetch (at most one per request).
    refetched: bool,
    /// Stopped, waiting for the background thread.
    pub waiting: bool,
    /// When the check began (a check that waits for keys counts its wait).
    started: Option<Instant>,
}

impl Filter {
    pub fn new(config: &FilterConfig) -> Filter {
        Filter {
            shared: Arc::clone(&config.shared),
            refetched: false,
            waiting: false,
            started: None,
        }
    }

    /// Decide on the request headers.
    pub fn on_request_headers(&mut self, stream: &mut dyn Stream) -> Step {
        self.check(stream)
    }

    /// Run `task` on the background thread; false when there is none (`envoy --mode validate`).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> bool {
        match self.shared.runtime.get() {
            Some(runtime) => {
                runtime.spawn(task);
                true
            }
            None => false,
        }
    }

    /// The refetch ended (or could not run): decide again, once, and answer.
    pub fn on_resume(&mut self, stream: &mut dyn Stream) -> Step {
        self.refetched = true;
        self.waiting = false;
        self.check(stream)
    }

    /// Decide and answer, or (once per request) wait for a refetch of the token's keys.
    fn check(&mut self, stream: &mut dyn Stream) -> Step {
        let started = *self.started.get_or_insert_with(Instant::now);
        let snapshot = self.shared.current();
        // outlives the request's headers: the plan borrows the answer's text from it
        let decision;
        let plan = {
            let raw = stream.request_headers();
            let mut buf = Vec::new();
            let text = text_headers(&raw, &mut buf);
            let pairs: Vec<(&str, &str)> = text.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
            let input = input(&pairs, stream.route_name());
            decision = evaluate(&snapshot, &input);
            if let (Reason::UnknownKid | Reason::KeysUnavailable, Some(id), false) =
                (decision.reason, decision.issuer, self.refetched)
            {
                self.refetched = true;
                let tenant = decision.tenant.clone();
                let generation = snapshot.keys.generation_for(id, tenant.as_deref());
                return Step::WaitForKeys(Refetch {
                    snapshot: Arc::clone(&snapshot),
                    issuer: id,
                    tenant,
                    generation,
                });
            }
            plan(&snapshot, &input, &decision)
        };
        apply(plan, &snapshot.counts, started, stream)
    }
}

fn evaluate<'p>(snapshot: &'p Snapshot, input: &CheckInput<'_>) -> Decision<'p> {
    let memo = snapshot.tokens.view(&snapshot.keys);
    authz::evaluate_tenants(
        &snapshot.config.policy,
        input,
        |id, tenant| snapshot.keys.current_for(id, tenant),
        &memo,
        unix_now(),
    )
}

/// Unix seconds now.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Envoy's headers as the core reads them: text (invalid UTF-8 replaced by U+FFFD, so the core
/// only ever sees `str`s whose lengths are their own), borrowed where the bytes are valid
/// UTF-8 (always, but for a client's obs-text); a repeated header joined into its first
/// occurrence with `,` (`cookie` with `; `, as one Cookie header would carry them), so a
/// lookup finds every copy, as a map would.
///
/// The headers are copied into `buf` and checked as one text (SIMD, `simdutf8`): checking
/// each of a request's ~30 short names and values on its own costs ~100 instructions a
/// call, the copy and one check a fraction of it. Each header is then a slice of that text,
/// taken only on character boundaries (else the header is checked on its own).
pub fn text_headers<'b>(raw: &[(&[u8], &[u8])], buf: &'b mut Vec<u8>) -> Vec<(Cow<'b, str>, Cow<'b, str>)> {
    buf.clear();
    buf.reserve(raw.iter().map(|(n, v)| n.len() + v.len()).sum());
    for (name, value) in raw {
        buf.extend_from_slice(name);
        buf.extend_from_slice(value);
    }
    let bytes: &'b [u8] = buf;
    let all = simdutf8::basic::from_utf8(bytes).ok();
    let piece = |start: usize, len: usize| match all.and_then(|a| a.get(start..start + len)) {
        Some(valid) => Cow::Borrowed(valid),
        None => text(&bytes[start..start + len]),
    };
    let mut out: Vec<(Cow<'b, str>, Cow<'b, str>)> = Vec::with_capacity(raw.len());
    // which name slots have been seen: a name whose slot is new is not a repeat, so the list
    // is searched only on a slot seen before (rare: ~15 names over 256 slots)
    let mut seen = [0u64; 4];
    let mut at = 0;
    for (name, value) in raw {
        let name_text = piece(at, name.len());
        let value_text = piece(at + name.len(), value.len());
        at += name.len() + value.len();
        let slot = name_slot(name_text.as_bytes());
        let (word, bit) = (usize::from(slot / 64), 1u64 << (slot % 64));
        let repeat = if seen[word] & bit == 0 {
            seen[word] |= bit;
            None
        } else {
            out.iter_mut().find(|(n, _)| *n == name_text)
        };
        match repeat {
            Some((_, existing)) => {
                let joined = existing.to_mut();
                joined.push_str(if name_text == "cookie" { "; " } else { "," });
                joined.push_str(&value_text);
            }
            None => out.push((name_text, value_text)),
        }
    }
    out
}

/// A header name's slot in [`text_headers`]' 256-bit set of names seen: equal names share it.
fn name_slot(name: &[u8]) -> u8 {
    let len = u8::try_from(name.len() % 256).unwrap_or_default();
    let (first, last) = (name.first().copied().unwrap_or(0), name.last().copied().unwrap_or(0));
    len.wrapping_mul(31) ^ first.rotate_left(3) ^ last
}

/// `bytes` as text: borrowed when valid UTF-8, else with each invalid sequence replaced by
/// U+FFFD.
fn text(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(valid) => Cow::Borrowed(valid),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

fn input<'a>(pairs: &'a [(&'a str, &'a str)], route_hint: Option<&'a str>) -> CheckInput<'a> {
    let headers = Headers::Pairs(pairs);
    let get = |name: &str| headers.get(name).unwrap_or("");
    CheckInput {
        method: get(":method"),
        host: get(":authority"),
        path: get(":path"),
        headers,
        route_hint,
    }
}

/// Everything a decision does to the stream, worked out while the request's headers are
/// borrowed and carried out ([`apply`]) after: it holds nothing of the request.
struct Plan<'p> {
    response: authz::Response<'p>,
    counted: (&'p str, Verdict, Reason),
    action: Action<'p>,
}

enum Action<'p> {
    /// Let the request through with its headers adjusted.
    Pass {
        /// Which of the response's upstream headers the request carries already (those are
        /// overwritten, the others added).
        carried: Vec<bool>,
        /// Claim-header spellings to remove that the request carries (removing a header the
        /// request does not carry is a no-op: the call is skipped).
        remove: Vec<&'p str>,
        token: authz::token::TokenRemoval<'p>,
        /// `:path` without the token's query parameters.
        path: Option<String>,
    },
    /// Answer with a local reply.
    Reply { details: String },
}

/// Work out the answer to a decision and log it (the log line reads `x-request-id`).
fn plan<'p>(snapshot: &'p Snapshot, input: &CheckInput<'_>, decision: &'p Decision<'_>) -> Plan<'p> {
    let policy = &snapshot.config.policy;
    let response = authz::respond(policy, decision);
    if snapshot.config.log_decisions.wants(decision.verdict) {
        log_decision(snapshot, decision, input);
    }
    let action = match decision.verdict {
        Verdict::Allow | Verdict::DryRunDeny => {
            // usually none: a client rarely sends a claim header of its own
            let in_request = policy.claim_headers_carried(input.headers.names());
            let remove = response
                .remove_headers
                .iter()
                .copied()
                .filter(|n| in_request.contains(n))
                .collect();
            let carried = response
                .upstream_headers
                .iter()
                .map(|(name, _)| in_request.contains(name))
                .collect();
            let token = authz::token::removal(&policy.token, input);
            let path = (!token.query_parameters.is_empty())
                .then(|| without_query_parameters(input.path, &token.query_parameters));
            Action::Pass {
                carried,
                remove,
                token,
                path,
            }
        }
        Verdict::Deny | Verdict::Error => Action::Reply {
            details: format!("audgate_{}", decision.reason.code()),
        },
    };
    Plan {
        response,
        counted: (decision.route_name(), decision.verdict, decision.reason),
        action,
    }
}

/// Carry out a [`Plan`]: metadata, the count (into `counts`), then the request's headers
/// (allow) or a local reply (deny, error). `started`: when the check began.
fn apply(plan: Plan<'_>, counts: &CheckCounts, started: Instant, stream: &mut dyn Stream) -> Step {
    let Plan {
        response,
        counted,
        action,
    } = plan;
    let m = &response.metadata;
    let entries = [
        ("route", m.route),
        ("reason", m.reason),
        ("subject", m.subject.as_ref()),
        ("client_id", m.client_id.as_ref()),
        ("issuer", m.issuer),
        ("tenant", m.tenant.as_ref()),
    ];
    // `tenant` only for a templated issuer's token: each entry costs Envoy a metadata update on
    // every request, and most configs have no tenants
    let n = if m.tenant.is_empty() {
        entries.len() - 1
    } else {
        entries.len()
    };
    stream.set_metadata(&entries[..n]);
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    counts.count(counted.0, counted.1, counted.2);
    stream.record_duration(micros);
    match action {
        Action::Pass {
            carried,
            remove,
            token,
            path,
        } => {
            for ((name, value), carried) in response.upstream_headers.iter().zip(carried) {
                if carried {
                    stream.set_request_header(name, value);
                } else {
                    stream.add_request_header(name, value);
                }
            }
            for name in remove {
                stream.remove_request_header(name);
            }
            for name in &token.headers {
                stream.remove_request_header(name);
            }
            match token.cookie.as_deref() {
                Some("") => stream.remove_request_header("cookie"),
                Some(cookie) => stream.set_request_header("cookie", cookie),
                None => {}
            }
            if let Some(path) = path {
                stream.set_request_header(":path", &path);
            }
            Step::Continue
        }
        Action::Reply { details } => {
            let headers: Vec<(&str, &str)> = response.client_headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            stream.send_response(response.status, &headers, &response.body, &details);
            Step::Stop
        }
    }
}

/// One decision as a log line (never the token): what `audgate serve` logs, through Envoy's log.
fn log_decision(snapshot: &Snapshot, d: &Decision<'_>, input: &CheckInput<'_>) {
    let issuer = d.issuer.map_or("", |i| snapshot.config.policy.issuers[i].name.as_str());
    let line = serde_json::json!({
        "message": "audgate decision",
        "route": d.route_name(),
        "decision": d.verdict.label(),
        "reason": d.reason.code(),
        "issuer": issuer,
        "tenant": d.tenant.as_deref().unwrap_or(""),
        "subject": d.subject().unwrap_or(""),
        "client_id": d.client_id.as_deref().unwrap_or(""),
        "request_id": input.header("x-request-id").unwrap_or(""),
    });
    log(Level::Info, &line.to_string());
}

/// `path` with the query parameters named in `names` taken out (names compared after
/// percent-decoding, as the core finds them); the fragment, if any, is kept.
pub fn without_query_parameters(path: &str, names: &[&str]) -> String {
    let Some(q) = path.find('?') else {
        return path.to_owned();
    };
    let (base, rest) = path.split_at(q);
    let rest = &rest[1..];
    let (query, fragment) = match rest.find('#') {
        Some(f) => (&rest[..f], &rest[f..]),
        None => (rest, ""),
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let decoded = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
            !names.contains(&decoded.as_ref())
        })
        .collect();
    if kept.is_empty() {
        format!("{base}{fragment}")
    } else {
        format!("{base}?{}{fragment}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A local reply: status, headers, body, details.
    type Reply = (u16, Vec<(String, String)>, String, String);

    #[derive(Default)]
    struct Fake {
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        route: Option<String>,
        set: Vec<(String, String)>,
        added: Vec<(String, String)>,
        removed: Vec<String>,
        replies: Vec<Reply>,
        metadata: HashMap<String, String>,
        durations: Vec<u64>,
    }

    impl Stream for Fake {
        fn request_headers(&self) -> Vec<(&[u8], &[u8])> {
            self.headers.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect()
        }
        fn route_name(&self) -> Option<&str> {
            self.route.as_deref()
        }
        fn set_request_header(&mut self, name: &str, value: &str) {
            self.set.push((name.into(), value.into()));
        }
        fn add_request_header(&mut self, name: &str, value: &str) {
            self.added.push((name.into(), value.into()));
        }
        fn remove_request_header(&mut self, name: &str) {
            self.removed.push(name.into());
        }
        fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str, details: &str) {
            let headers = headers.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
            self.replies.push((status, headers, body.into(), details.into()));
        }
        fn set_metadata(&mut self, entries: &[(&str, &str)]) {
            for (key, value) in entries {
                self.metadata.insert((*key).into(), (*value).into());
            }
        }
        fn record_duration(&mut self, micros: u64) {
            self.durations.push(micros);
        }
    }

    /// The decisions counted since the last call, as the background thread hands them on.
    fn counted(cfg: &FilterConfig) -> Vec<(String, &'static str, &'static str, u64)> {
        cfg.shared.current().counts.drain();
        cfg.shared.pending.take().checks
    }

    fn config(body: &str) -> (tempfile_free::Dir, FilterConfig) {
        let dir = tempfile_free::Dir::new();
        let path = dir.path.join("audgate.yaml");
        std::fs::write(&path, body).unwrap();
        let cfg = FilterConfig::load(path.to_str().unwrap(), false).unwrap_or_else(|e| panic!("{e:?}"));
        (dir, cfg)
    }

    /// A throwaway directory without another dependency.
    mod tempfile_free {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Dir {
                let n = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
                let path = std::env::temp_dir().join(format!("audgate-envoy-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).unwrap();
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    const CONFIG: &str = r#"
issuers:
  corp:
    issuer: https://idp.example.com/realms/corp
    jwks_file: /nonexistent/jwks.json
claim_headers:
  x-auth-subject: sub
routes:
  - name: public
    match: { path_prefix: /public }
    allow_anonymous: true
  - name: orders
    match: { path_prefix: /orders }
    client_ids: [orders-web]
"#;

    fn request(path: &str, extra: &[(&str, &str)]) -> Fake {
        let mut headers = vec![
            (b":method".to_vec(), b"GET".to_vec()),
            (b":authority".to_vec(), b"shop.example.com".to_vec()),
            (b":path".to_vec(), path.as_bytes().to_vec()),
        ];
        headers.extend(
            extra
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())),
        );
        Fake {
            headers,
            ..Fake::default()
        }
    }

    #[test]
    fn anonymous_route_passes_and_removes_spoofed_claim_headers() {
        let (_dir, cfg) = config(CONFIG);
        let mut stream = request(
            "/public/x",
            &[("x-auth-subject", "mallory"), ("x_auth_subject", "mallory")],
        );
        let mut filter = Filter::new(&cfg);
        assert!(matches!(filter.on_request_headers(&mut stream), Step::Continue));
        assert!(stream.removed.contains(&"x-auth-subject".to_owned()));
        assert!(stream.removed.contains(&"x_auth_subject".to_owned()));
        // headers the request does not carry are not asked to be removed
        assert_eq!(stream.removed.len(), 2, "{:?}", stream.removed);
        assert_eq!(stream.metadata["route"], "public");
        assert_eq!(stream.metadata["reason"], "anonymous");
        assert!(!stream.metadata.contains_key("tenant"), "no tenant, no tenant metadata");
        assert_eq!(counted(&cfg), [("public".to_owned(), "allow", "anonymous", 1)]);
        assert_eq!(stream.durations.len(), 1);
    }

    #[test]
    fn missing_token_is_a_401_with_a_bearer_challenge() {
        let (_dir, cfg) = config(CONFIG);
        let mut stream = request("/orders/1", &[]);
        let mut filter = Filter::new(&cfg);
        assert!(matches!(filter.on_request_headers(&mut stream), Step::Stop));
        let replies = stream.replies;
        let (status, headers, body, details) = &replies[0];
        assert_eq!(*status, 401);
        assert!(headers.contains(&("www-authenticate".into(), r#"Bearer realm="audgate""#.into())));
        assert!(body.contains("missing_token"));
        assert_eq!(details, "audgate_missing_token");
    }

    #[test]
    fn per_route_name_selects_the_route() {
        let (_dir, cfg) = config(CONFIG);
        let mut stream = request("/elsewhere", &[]);
        stream.route = Some("public".into());
        let mut filter = Filter::new(&cfg);
        assert!(matches!(filter.on_request_headers(&mut stream), Step::Continue));
        stream.route = Some("nope".into());
        let mut filter = Filter::new(&cfg);
        assert!(matches!(filter.on_request_headers(&mut stream), Step::Stop));
        assert_eq!(stream.replies[0].0, 403);
        assert_eq!(stream.metadata["reason"], "no_route");
    }

    #[test]
    fn keys_never_loaded_wait_once_then_answer_503() {
        let (_dir, cfg) = config(CONFIG);
        let header = r#"{"alg":"RS256","kid":"k1"}"#;
        let claims = r#"{"iss":"https://idp.example.com/realms/corp","sub":"a","exp":9999999999}"#;
        let b64 = |s: &str| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
        };
        let token = format!("{}.{}.c2ln", b64(header), b64(claims));
        let mut stream = request("/orders/1", &[("authorization", &format!("Bearer {token}"))]);
        let mut filter = Filter::new(&cfg);
        assert!(matches!(filter.on_request_headers(&mut stream), Step::WaitForKeys(_)));
        assert!(stream.replies.is_empty());
        assert!(matches!(filter.on_resume(&mut stream), Step::Stop));
        let replies = stream.replies;
        assert_eq!(replies[0].0, 503);
        assert!(replies[0].2.contains("keys_unavailable"));
    }

    /// A verified token is remembered: the next request with it skips parsing and the signature
    /// (SPEC.md "Caching"), as in `audgate serve`.
    #[test]
    fn verified_tokens_are_cached() {
        use aws_lc_rs::rand::SystemRandom;
        use aws_lc_rs::rsa::KeySize;
        use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let public = pair.public_key();
        let jwks = serde_json::json!({"keys": [{
            "kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig",
            "n": b64(public.modulus().big_endian_without_leading_zero()),
            "e": b64(public.exponent().big_endian_without_leading_zero()),
        }]});
        let claims = serde_json::json!({
            "iss": "https://idp.example.com/realms/corp", "sub": "alice", "aud": "orders-web",
            "exp": unix_now() + 600, "iat": unix_now(),
        });
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"RS256","kid":"k1"}"#),
            b64(claims.to_string().as_bytes())
        );
        let mut sig = vec![0u8; pair.public_modulus_len()];
        pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), input.as_bytes(), &mut sig)
            .unwrap();
        let token = format!("{input}.{}", b64(&sig));

        let dir = tempfile_free::Dir::new();
        let jwks_path = dir.path.join("jwks.json");
        std::fs::write(&jwks_path, jwks.to_string()).unwrap();
        let config_path = dir.path.join("audgate.yaml");
        std::fs::write(
            &config_path,
            CONFIG.replace("/nonexistent/jwks.json", jwks_path.to_str().unwrap()),
        )
        .unwrap();
        let cfg = FilterConfig::load(config_path.to_str().unwrap(), true).unwrap_or_else(|e| panic!("{e:?}"));
        let mut stream = request("/orders/1", &[("authorization", &format!("Bearer {token}"))]);
        let mut step = Filter::new(&cfg).on_request_headers(&mut stream);
        for _ in 0..200 {
            // the background thread loads the keys
            if !matches!(step, Step::WaitForKeys(_)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            step = Filter::new(&cfg).on_request_headers(&mut stream);
        }
        assert!(matches!(step, Step::Continue), "{:?}", stream.replies);
        assert_eq!(
            cfg.shared.current().tokens.len(),
            1,
            "the verified token was not remembered"
        );
        // a claim header the request does not carry is added ...
        let subject = [("x-auth-subject".to_owned(), "alice".to_owned())];
        assert_eq!(stream.added, subject);
        assert!(stream.set.is_empty(), "{:?}", stream.set);
        // ... one it carries (a client's own copy) is overwritten
        let bearer = format!("Bearer {token}");
        let mut spoofed = request(
            "/orders/1",
            &[("authorization", &bearer), ("x-auth-subject", "mallory")],
        );
        assert!(matches!(
            Filter::new(&cfg).on_request_headers(&mut spoofed),
            Step::Continue
        ));
        assert_eq!(spoofed.set, subject);
        assert!(spoofed.added.is_empty(), "{:?}", spoofed.added);
    }

    #[test]
    fn query_token_parameters_are_taken_out_of_the_path() {
        assert_eq!(
            without_query_parameters("/a?access_token=x&b=1#f", &["access_token"]),
            "/a?b=1#f"
        );
        assert_eq!(without_query_parameters("/a?access%5Ftoken=x", &["access_token"]), "/a");
        assert_eq!(without_query_parameters("/a", &["access_token"]), "/a");
    }

    /// xorshift64*: deterministic pseudo-random input without another dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, max: usize) -> Vec<u8> {
            const PIECES: [&[u8]; 14] = [
                b"Bearer ",
                b"bearer",
                b"eyJhbGciOiJSUzI1NiJ9",
                b".",
                b"%2F",
                b"%",
                b"?",
                b"&",
                b"=",
                b";",
                b",",
                b"access_token",
                b"\xff\xfe",
                b"x-auth-subject",
            ];
            let mut out = Vec::new();
            let len = self.below(max + 1);
            while out.len() < len {
                if self.below(3) == 0 {
                    out.extend_from_slice(PIECES[self.below(PIECES.len())]);
                } else {
                    out.push(self.next() as u8);
                }
            }
            out
        }
    }

    /// The boundary's header handling under arbitrary bytes: whatever a request carries (invalid
    /// UTF-8, control characters, huge or repeated headers, broken tokens, odd paths and
    /// queries), a check never panics and always ends in exactly one of: continue without a
    /// local reply, or one local reply with a 401/403/503 and a JSON body.
    #[test]
    fn arbitrary_request_bytes_always_get_one_clean_answer() {
        let (_dir, cfg) = config(&format!(
            "{CONFIG}token:\n  sources: [authorization, {{query: access_token}}, {{cookie: session}}, {{header: x-token}}]\n  forward: false\n"
        ));
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let names: [&[u8]; 9] = [
            b":path",
            b"authorization",
            b"cookie",
            b"x-token",
            b"x-auth-subject",
            b"x_auth_subject",
            b":authority",
            b"x-request-id",
            b"\x00bad",
        ];
        for _ in 0..3000 {
            let mut headers = vec![
                (b":method".to_vec(), b"GET".to_vec()),
                (b":authority".to_vec(), rng.bytes(20)),
            ];
            let mut path = if rng.below(2) == 0 {
                b"/orders".to_vec()
            } else {
                b"/public".to_vec()
            };
            path.extend(rng.bytes(40));
            headers.push((b":path".to_vec(), path));
            for _ in 0..rng.below(6) {
                let name = names[rng.below(names.len())];
                headers.push((name.to_vec(), rng.bytes(300)));
            }
            let mut stream = Fake {
                headers,
                route: (rng.below(4) == 0).then(|| String::from_utf8_lossy(&rng.bytes(10)).into_owned()),
                ..Fake::default()
            };
            let mut filter = Filter::new(&cfg);
            let step = match filter.on_request_headers(&mut stream) {
                Step::WaitForKeys(_) => filter.on_resume(&mut stream),
                other => other,
            };
            let replies = stream.replies;
            match step {
                Step::Continue => assert!(replies.is_empty()),
                Step::Stop => {
                    assert_eq!(replies.len(), 1);
                    assert!(matches!(replies[0].0, 401 | 403 | 503), "{}", replies[0].0);
                    assert!(serde_json::from_str::<serde_json::Value>(&replies[0].2).is_ok());
                }
                Step::WaitForKeys(_) => panic!("waited twice"),
            }
            assert_eq!(stream.durations.len(), 1);
            assert_eq!(counted(&cfg).iter().map(|c| c.3).sum::<u64>(), 1);
        }
    }

    #[test]
    fn repeated_headers_are_joined_and_valid_text_is_borrowed() {
        let raw: [(&[u8], &[u8]); 6] = [
            (b"cookie", b"a=1"),
            (b"x", b"1"),
            (b"cookie", b"b=2"),
            (b"x", b"2"),
            (b"y", b"ok"),
            (b"z", b"\xffbad"),
        ];
        let mut buf = Vec::new();
        let text = text_headers(&raw, &mut buf);
        let pairs: Vec<(&str, &str)> = text.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        assert_eq!(
            pairs,
            [("cookie", "a=1; b=2"), ("x", "1,2"), ("y", "ok"), ("z", "\u{fffd}bad")]
        );
        assert!(matches!(text[2].1, Cow::Borrowed(_)), "valid UTF-8 is not copied");
        let input = input(&pairs, None);
        assert_eq!(input.header("cookie"), Some("a=1; b=2"));
    }

    /// `text_headers` (one buffer, one check, slots) answers exactly what checking and joining
    /// each header on its own would, for names drawn from a few (so they repeat) and values of
    /// arbitrary bytes (split characters, invalid sequences).
    #[test]
    fn text_headers_match_a_header_by_header_reading() {
        fn reference(raw: &[(&[u8], &[u8])]) -> Vec<(String, String)> {
            let mut out: Vec<(String, String)> = Vec::new();
            for (name, value) in raw {
                let (name, value) = (String::from_utf8_lossy(name), String::from_utf8_lossy(value));
                match out.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, joined)) => {
                        joined.push_str(if name == "cookie" { "; " } else { "," });
                        joined.push_str(&value);
                    }
                    None => out.push((name.into_owned(), value.into_owned())),
                }
            }
            out
        }
        const NAMES: [&[u8]; 7] = [b"cookie", b"x", b"x-auth-subject", b"\xc3", b"\xa9", b"\xe6\x97", b""];
        let mut rng = Rng(0x5eed_cafe);
        let mut buf = Vec::new();
        for _ in 0..3000 {
            let headers: Vec<(Vec<u8>, Vec<u8>)> = (0..rng.below(12))
                .map(|_| {
                    let name = NAMES[rng.below(NAMES.len())].to_vec();
                    let value = if rng.below(4) == 0 {
                        NAMES[rng.below(NAMES.len())].to_vec()
                    } else {
                        rng.bytes(40)
                    };
                    (name, value)
                })
                .collect();
            let raw: Vec<(&[u8], &[u8])> = headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())).collect();
            let got: Vec<(String, String)> = text_headers(&raw, &mut buf)
                .into_iter()
                .map(|(n, v)| (n.into_owned(), v.into_owned()))
                .collect();
            assert_eq!(got, reference(&raw), "{raw:?}");
        }
    }

    #[test]
    fn a_character_split_between_name_and_value_is_not_read_across_them() {
        // "x\xc3" + "\xa9" is "xé" as one text, but neither half is text on its own
        let raw: [(&[u8], &[u8]); 2] = [(b"x\xc3", b"\xa9"), (b"ok", b"\xc3\xa9")];
        let mut buf = Vec::new();
        let text = text_headers(&raw, &mut buf);
        let pairs: Vec<(&str, &str)> = text.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        assert_eq!(pairs, [("x\u{fffd}", "\u{fffd}"), ("ok", "é")]);
    }

    #[test]
    fn names_that_share_a_slot_are_kept_apart() {
        let names: Vec<String> = (0..2000).map(|i| format!("x-{i}")).collect();
        let (a, b) = names
            .iter()
            .enumerate()
            .find_map(|(i, a)| {
                let b = names[i + 1..]
                    .iter()
                    .find(|b| name_slot(b.as_bytes()) == name_slot(a.as_bytes()))?;
                Some((a, b))
            })
            .expect("two names in one slot");
        let raw: [(&[u8], &[u8]); 3] = [(a.as_bytes(), b"1"), (b.as_bytes(), b"2"), (a.as_bytes(), b"3")];
        let mut buf = Vec::new();
        let text = text_headers(&raw, &mut buf);
        let pairs: Vec<(&str, &str)> = text.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        assert_eq!(pairs, [(a.as_str(), "1,3"), (b.as_str(), "2")]);
    }

    #[test]
    fn validation_without_the_file_uses_a_deny_all_placeholder() {
        let cfg = FilterConfig::load("/nonexistent/audgate.yaml", false).unwrap_or_else(|e| panic!("{e:?}"));
        let mut stream = request("/x", &[]);
        assert!(matches!(Filter::new(&cfg).on_request_headers(&mut stream), Step::Stop));
        assert!(FilterConfig::load("/nonexistent/audgate.yaml", true).is_err());
    }

    #[test]
    fn a_bad_config_gives_located_errors() {
        let dir = tempfile_free::Dir::new();
        let path = dir.path.join("bad.yaml");
        std::fs::write(&path, "issuers: []\nroutes:\n  - name: x\n    bogus: 1\n").unwrap();
        let Err(errors) = FilterConfig::load(path.to_str().unwrap(), false) else {
            panic!("a bad config loaded");
        };
        assert!(
            errors.iter().any(|e| e.contains("bad.yaml:") && e.contains("error")),
            "{errors:?}"
        );
    }
}
