//! The filter's logic, with no FFI: a [`FilterConfig`] per Envoy filter config (the audgate
//! config file, its issuers' key caches and the background thread), a [`Filter`] per stream.
//! Envoy is reached only through the [`Stream`] trait, which src/ffi.rs implements over the C
//! ABI (and the unit tests implement in memory).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use audgate_core::authz::{self, CheckInput, Decision, Headers, Reason, Verdict};
use audgate_core::config::{self, Config};
use audgate_keys::token_cache::TokenCache;
use audgate_keys::{IssuerKeys, KeyStore};

use crate::background::Background;
use crate::{Level, log};

/// The dynamic metadata namespace (`%DYNAMIC_METADATA(audgate:route)%`).
pub const METADATA_NAMESPACE: &str = "audgate";
/// The counter of decisions, by route, decision and reason (SPEC.md's `audgate_checks_total`).
pub const CHECKS_COUNTER: &str = "audgate_checks_total";
pub const CHECKS_LABELS: [&str; 3] = ["route", "decision", "reason"];

/// What the filter needs from Envoy for one stream.
pub trait Stream {
    /// The request headers (pseudo-headers included), names lower-case as Envoy keeps them.
    fn request_headers(&self) -> Vec<(String, String)>;
    /// Overwrite a request header (the client's copies included).
    fn set_request_header(&self, name: &str, value: &str);
    fn remove_request_header(&self, name: &str);
    /// Answer the client with a local reply; `details` is Envoy's response code details.
    fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &str, details: &str);
    /// Strings in the `audgate` dynamic metadata namespace, in one go.
    fn set_metadata(&self, entries: &[(&str, &str)]);
    /// The audgate route named by the Envoy route's per-filter config, if any.
    fn route_name(&self) -> Option<String>;
    /// Count one decision.
    fn count_check(&self, route: &str, decision: &str, reason: &str);
}

/// A config with the key caches of its issuers: what every check reads.
pub struct Snapshot {
    pub config: Config,
    pub keys: KeyStore,
    /// Verified tokens (SPEC.md "Caching"), as `audgate serve` keeps them; new per config.
    pub tokens: TokenCache,
}

impl Snapshot {
    pub fn new(config: Config, keys: KeyStore) -> Snapshot {
        let tokens = TokenCache::new(&config.token_cache);
        Snapshot { config, keys, tokens }
    }
}

/// The snapshot in use, replaced whole by a reload.
pub struct Shared {
    pub path: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    /// The background thread's runtime, once started (never in `envoy --mode validate`).
    pub runtime: OnceLock<tokio::runtime::Handle>,
}

impl Shared {
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
    /// Envoy's id for [`CHECKS_COUNTER`], once defined.
    pub checks_counter: Option<usize>,
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
            return Ok(FilterConfig {
                shared: Arc::new(Shared {
                    path: path.to_owned(),
                    current: RwLock::new(Arc::new(Snapshot::new(loaded.config, keys))),
                    runtime: OnceLock::new(),
                }),
                _background: None,
                checks_counter: None,
            });
        }
        let loaded = config::load(path).map_err(|e| e.to_string().lines().map(str::to_owned).collect::<Vec<_>>())?;
        for w in &loaded.warnings {
            log(Level::Warn, &config::located(path, w, "warning"));
        }
        let (keys, fresh) =
            KeyStore::build(&loaded.config, None).map_err(|e| vec![format!("{}: error: {e}", path.display())])?;
        let text = std::fs::read(path).unwrap_or_default();
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(Snapshot::new(loaded.config, keys))),
            runtime: OnceLock::new(),
        });
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
            checks_counter: None,
        })
    }
}

/// What the stream should do next.
pub enum Step {
    /// Let the request through (headers already adjusted).
    Continue,
    /// A local reply was sent, or the stream waits.
    Stop,
    /// The token named a `kid` the issuer's current keys lack (or no keys ever loaded): stop,
    /// let the background thread refetch (rate-limited, shared), then [`Filter::on_resume`].
    WaitForKeys { issuer: Arc<IssuerKeys>, generation: u64 },
}

/// One stream.
pub struct Filter {
    shared: Arc<Shared>,
    /// Whether this stream already waited for a refetch (at most one per request).
    refetched: bool,
    /// Stopped, waiting for the background thread.
    pub waiting: bool,
}

impl Filter {
    pub fn new(config: &FilterConfig) -> Filter {
        Filter {
            shared: Arc::clone(&config.shared),
            refetched: false,
            waiting: false,
        }
    }

    /// Decide on the request headers.
    pub fn on_request_headers(&mut self, stream: &dyn Stream) -> Step {
        let snapshot = self.shared.current();
        let headers = header_map(stream.request_headers());
        let route_hint = stream.route_name();
        let input = input(&headers, route_hint.as_deref());
        let generations: Vec<u64> = snapshot.keys.issuers().iter().map(|k| k.generation()).collect();
        let decision = evaluate(&snapshot, &input);
        if let (Reason::UnknownKid | Reason::KeysUnavailable, Some(id), false) =
            (decision.reason, decision.issuer, self.refetched)
        {
            self.refetched = true;
            return Step::WaitForKeys {
                issuer: Arc::clone(snapshot.keys.issuer(id)),
                generation: generations.get(id).copied().unwrap_or_default(),
            };
        }
        finish(&snapshot, &input, &decision, stream)
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
    pub fn on_resume(&mut self, stream: &dyn Stream) -> Step {
        self.refetched = true;
        self.waiting = false;
        let snapshot = self.shared.current();
        let headers = header_map(stream.request_headers());
        let route_hint = stream.route_name();
        let input = input(&headers, route_hint.as_deref());
        let decision = evaluate(&snapshot, &input);
        finish(&snapshot, &input, &decision, stream)
    }
}

fn evaluate<'p>(snapshot: &'p Snapshot, input: &CheckInput<'_>) -> Decision<'p> {
    let memo = snapshot.tokens.view(&snapshot.keys);
    authz::evaluate_with_memo(
        &snapshot.config.policy,
        input,
        |id| snapshot.keys.current(id),
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

/// One header as Envoy handed it over, as text: invalid UTF-8 is replaced (U+FFFD), so the
/// core only ever sees `str`s whose lengths are their own.
pub fn header_from_bytes(name: &[u8], value: &[u8]) -> (String, String) {
    (
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    )
}

/// Envoy's headers as the core reads them: repeated headers joined with `,` (`cookie` with
/// `; `, as one Cookie header would carry them).
fn header_map(headers: Vec<(String, String)>) -> HashMap<String, String> {
    let mut map: HashMap<String, String> = HashMap::with_capacity(headers.len());
    for (name, value) in headers {
        match map.get_mut(&name) {
            Some(existing) => {
                existing.push_str(if name == "cookie" { "; " } else { "," });
                existing.push_str(&value);
            }
            None => {
                map.insert(name, value);
            }
        }
    }
    map
}

fn input<'a>(headers: &'a HashMap<String, String>, route_hint: Option<&'a str>) -> CheckInput<'a> {
    let get = |name: &str| headers.get(name).map_or("", String::as_str);
    CheckInput {
        method: get(":method"),
        host: get(":authority"),
        path: get(":path"),
        headers: Headers::Map(headers),
        route_hint,
    }
}

/// Answer a decision: metadata, the count, the log line, then the request's headers (allow)
/// or a local reply (deny, error).
fn finish(snapshot: &Snapshot, input: &CheckInput<'_>, decision: &Decision<'_>, stream: &dyn Stream) -> Step {
    let policy = &snapshot.config.policy;
    let response = authz::respond(policy, decision);
    let m = &response.metadata;
    stream.set_metadata(&[
        ("route", m.route),
        ("reason", m.reason),
        ("subject", &m.subject),
        ("client_id", &m.client_id),
        ("issuer", &m.issuer),
    ]);
    stream.count_check(decision.route_name(), decision.verdict.label(), decision.reason.code());
    if snapshot.config.log_decisions.wants(decision.verdict) {
        log_decision(snapshot, decision, input);
    }
    match decision.verdict {
        Verdict::Allow | Verdict::DryRunDeny => {
            for (name, value) in &response.upstream_headers {
                stream.set_request_header(name, value);
            }
            // removing a header the request does not carry is a no-op: skip the call
            for name in response.remove_headers.iter().filter(|n| input.headers.contains(n)) {
                stream.remove_request_header(name);
            }
            let removal = authz::token::removal(&policy.token, input);
            for name in &removal.headers {
                stream.remove_request_header(name);
            }
            match removal.cookie.as_deref() {
                Some("") => stream.remove_request_header("cookie"),
                Some(cookie) => stream.set_request_header("cookie", cookie),
                None => {}
            }
            if !removal.query_parameters.is_empty() {
                stream.set_request_header(
                    ":path",
                    &without_query_parameters(input.path, &removal.query_parameters),
                );
            }
            Step::Continue
        }
        Verdict::Deny | Verdict::Error => {
            let headers: Vec<(&str, &str)> = response.client_headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let details = format!("audgate_{}", decision.reason.code());
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
    use std::cell::RefCell;

    use super::*;

    /// A local reply: status, headers, body, details.
    type Reply = (u16, Vec<(String, String)>, String, String);

    #[derive(Default)]
    struct Fake {
        headers: Vec<(String, String)>,
        route: Option<String>,
        set: RefCell<Vec<(String, String)>>,
        removed: RefCell<Vec<String>>,
        replies: RefCell<Vec<Reply>>,
        metadata: RefCell<HashMap<String, String>>,
        counts: RefCell<Vec<[String; 3]>>,
    }

    impl Stream for Fake {
        fn request_headers(&self) -> Vec<(String, String)> {
            self.headers.clone()
        }
        fn set_request_header(&self, name: &str, value: &str) {
            self.set.borrow_mut().push((name.into(), value.into()));
        }
        fn remove_request_header(&self, name: &str) {
            self.removed.borrow_mut().push(name.into());
        }
        fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &str, details: &str) {
            let headers = headers.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
            self.replies
                .borrow_mut()
                .push((status, headers, body.into(), details.into()));
        }
        fn set_metadata(&self, entries: &[(&str, &str)]) {
            for (key, value) in entries {
                self.metadata.borrow_mut().insert((*key).into(), (*value).into());
            }
        }
        fn route_name(&self) -> Option<String> {
            self.route.clone()
        }
        fn count_check(&self, route: &str, decision: &str, reason: &str) {
            self.counts
                .borrow_mut()
                .push([route.into(), decision.into(), reason.into()]);
        }
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
            (":method".to_owned(), "GET".to_owned()),
            (":authority".to_owned(), "shop.example.com".to_owned()),
            (":path".to_owned(), path.to_owned()),
        ];
        headers.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Fake {
            headers,
            ..Fake::default()
        }
    }

    #[test]
    fn anonymous_route_passes_and_removes_spoofed_claim_headers() {
        let (_dir, cfg) = config(CONFIG);
        let stream = request(
            "/public/x",
            &[("x-auth-subject", "mallory"), ("x_auth_subject", "mallory")],
        );
        let mut filter = Filter::new(&cfg);
        assert!(matches!(filter.on_request_headers(&stream), Step::Continue));
        assert!(stream.removed.borrow().contains(&"x-auth-subject".to_owned()));
        assert!(stream.removed.borrow().contains(&"x_auth_subject".to_owned()));
        // headers the request does not carry are not asked to be removed
        assert_eq!(stream.removed.borrow().len(), 2, "{:?}", stream.removed.borrow());
        assert_eq!(stream.metadata.borrow()["route"], "public");
        assert_eq!(stream.metadata.borrow()["reason"], "anonymous");
        assert_eq!(
            stream.counts.borrow()[0],
            ["public".to_owned(), "allow".into(), "anonymous".into()]
        );
    }

    #[test]
    fn missing_token_is_a_401_with_a_bearer_challenge() {
        let (_dir, cfg) = config(CONFIG);
        let stream = request("/orders/1", &[]);
        let mut filter = Filter::new(&cfg);
        assert!(matches!(filter.on_request_headers(&stream), Step::Stop));
        let replies = stream.replies.borrow();
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
        assert!(matches!(filter.on_request_headers(&stream), Step::Continue));
        stream.route = Some("nope".into());
        let mut filter = Filter::new(&cfg);
        assert!(matches!(filter.on_request_headers(&stream), Step::Stop));
        assert_eq!(stream.replies.borrow()[0].0, 403);
        assert_eq!(stream.metadata.borrow()["reason"], "no_route");
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
        let stream = request("/orders/1", &[("authorization", &format!("Bearer {token}"))]);
        let mut filter = Filter::new(&cfg);
        assert!(matches!(filter.on_request_headers(&stream), Step::WaitForKeys { .. }));
        assert!(stream.replies.borrow().is_empty());
        assert!(matches!(filter.on_resume(&stream), Step::Stop));
        let replies = stream.replies.borrow();
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
        let stream = request("/orders/1", &[("authorization", &format!("Bearer {token}"))]);
        let mut step = Filter::new(&cfg).on_request_headers(&stream);
        for _ in 0..200 {
            // the background thread loads the keys
            if !matches!(step, Step::WaitForKeys { .. }) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            step = Filter::new(&cfg).on_request_headers(&stream);
        }
        assert!(matches!(step, Step::Continue), "{:?}", stream.replies.borrow());
        assert_eq!(
            cfg.shared.current().tokens.len(),
            1,
            "the verified token was not remembered"
        );
        assert!(matches!(Filter::new(&cfg).on_request_headers(&stream), Step::Continue));
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
                header_from_bytes(b":method", b"GET"),
                header_from_bytes(b":authority", &rng.bytes(20)),
            ];
            let mut path = if rng.below(2) == 0 {
                b"/orders".to_vec()
            } else {
                b"/public".to_vec()
            };
            path.extend(rng.bytes(40));
            headers.push(header_from_bytes(b":path", &path));
            for _ in 0..rng.below(6) {
                let name = names[rng.below(names.len())];
                headers.push(header_from_bytes(name, &rng.bytes(300)));
            }
            let stream = Fake {
                headers,
                route: (rng.below(4) == 0).then(|| String::from_utf8_lossy(&rng.bytes(10)).into_owned()),
                ..Fake::default()
            };
            let mut filter = Filter::new(&cfg);
            let step = match filter.on_request_headers(&stream) {
                Step::WaitForKeys { .. } => filter.on_resume(&stream),
                other => other,
            };
            let replies = stream.replies.borrow();
            match step {
                Step::Continue => assert!(replies.is_empty()),
                Step::Stop => {
                    assert_eq!(replies.len(), 1);
                    assert!(matches!(replies[0].0, 401 | 403 | 503), "{}", replies[0].0);
                    assert!(serde_json::from_str::<serde_json::Value>(&replies[0].2).is_ok());
                }
                Step::WaitForKeys { .. } => panic!("waited twice"),
            }
            assert_eq!(stream.counts.borrow().len(), 1);
        }
    }

    #[test]
    fn repeated_headers_are_joined() {
        let map = header_map(vec![
            ("cookie".into(), "a=1".into()),
            ("cookie".into(), "b=2".into()),
            ("x".into(), "1".into()),
            ("x".into(), "2".into()),
        ]);
        assert_eq!(map["cookie"], "a=1; b=2");
        assert_eq!(map["x"], "1,2");
    }

    #[test]
    fn validation_without_the_file_uses_a_deny_all_placeholder() {
        let cfg = FilterConfig::load("/nonexistent/audgate.yaml", false).unwrap_or_else(|e| panic!("{e:?}"));
        let stream = request("/x", &[]);
        assert!(matches!(Filter::new(&cfg).on_request_headers(&stream), Step::Stop));
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
