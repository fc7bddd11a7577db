//! `audgate doctor`: check every configured issuer live from this host, the way audgate itself
//! would fetch its keys (same HTTP client settings: timeouts, size cap, redirects, `ca_file`),
//! and print a report a person can act on.
//!
//! Per issuer: the discovery document (reachable, JSON, `issuer` equal to the configured issuer
//! or an alias, a `jwks_uri`), the JWKS (reachable, parses, which keys are usable for the
//! issuer's `algorithms` and why the others are not), the JWKS response's cache headers
//! (informational) and the clock difference to the server's `Date` header.
//!
//! An issuer is unusable when its discovery document or JWKS cannot be read, the discovery
//! `issuer` is not the configured one, or no published key fits the allowed algorithms.
//! Clock skew, skipped keys and plain http off loopback are warnings. A key's material is never
//! printed: only its `kid`, type and `alg`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::authz::{Alg, Issuer};
use crate::config::{Config, KeySource, KeySourceConfig};
use crate::jwks::{Fetcher, Key, KeyKind, KeySet};

/// Where the text of a line starts (after the marker and the topic).
const TEXT_COLUMN: usize = 19;
/// A fetch slower than this is worth a warning (audgate gives up after a few seconds).
const SLOW: Duration = Duration::from_secs(1);

/// Check every configured issuer live; print a report; true when every issuer is usable.
pub async fn run(config: &Config, out: &mut String) -> bool {
    let issuers = &config.policy.issuers;
    let _ = writeln!(
        out,
        "audgate doctor: {}, checked from this host at {}",
        count(issuers.len(), "issuer"),
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
    // a templated issuer is checked for each listed tenant; pattern tenants are not known here
    let units = units(config);
    // Every issuer is checked at the same time: one slow issuer does not delay the others.
    let tasks: Vec<_> = units
        .iter()
        .map(|(issuer, source)| match source {
            Some(source) => tokio::spawn(check_issuer(issuer.clone(), source.clone())),
            None => {
                let mut b = Block::new(issuer);
                b.info(
                    "tenants",
                    "by tenant_pattern: each tenant's keys load on first use, so none is checked here (list `tenants` to have them checked)",
                );
                tokio::spawn(async move { b })
            }
        })
        .collect();
    let issuers: Vec<Issuer> = units.into_iter().map(|(i, _)| i).collect();
    let mut usable = 0;
    for (task, issuer) in tasks.into_iter().zip(&issuers) {
        let block = task.await.unwrap_or_else(|e| {
            let mut b = Block::new(issuer);
            b.fail("doctor", format!("the check itself failed: {e}"), "internal error");
            b
        });
        out.push('\n');
        out.push_str(&block.text);
        match &block.failure {
            None => {
                usable += 1;
                let _ = writeln!(out, "  => usable");
            }
            Some(why) => {
                let _ = writeln!(out, "  => UNUSABLE: {why}");
            }
        }
    }
    let unusable = issuers.len() - usable;
    let _ = writeln!(
        out,
        "\n{}: {usable} usable, {unusable} unusable",
        count(issuers.len(), "issuer")
    );
    unusable == 0
}

/// What doctor checks: each plain issuer, each listed tenant of a templated one (with
/// `{tenant}` filled in), and a templated one with a pattern as a note (`None`).
fn units(config: &Config) -> Vec<(Issuer, Option<KeySourceConfig>)> {
    use crate::authz::tenant::{TenantSet, fill};
    let mut out = Vec::new();
    for (id, (issuer, source)) in config.policy.issuers.iter().zip(&config.key_sources).enumerate() {
        match config.policy.template(id).map(|t| &t.tenants) {
            None => out.push((issuer.clone(), Some(source.clone()))),
            Some(TenantSet::Pattern { .. }) => out.push((issuer.clone(), None)),
            Some(TenantSet::Listed(list)) => {
                for tenant in list {
                    let mut one = issuer.clone();
                    one.name = format!("{} (tenant {tenant})", issuer.name);
                    one.issuer = fill(&issuer.issuer, tenant);
                    one.aliases = issuer.aliases.iter().map(|a| fill(a, tenant)).collect();
                    out.push((one, Some(crate::jwks::tenant_source(source, tenant))));
                }
            }
        }
    }
    out
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[derive(Clone, Copy)]
enum Mark {
    Ok,
    Fail,
    Warn,
    Info,
}

impl Mark {
    fn text(self) -> &'static str {
        match self {
            Mark::Ok => "ok",
            Mark::Fail => "FAIL",
            Mark::Warn => "warn",
            Mark::Info => "info",
        }
    }
}

/// One issuer's part of the report.
struct Block {
    text: String,
    /// The first problem that makes the issuer unusable, in a few words.
    failure: Option<String>,
}

impl Block {
    fn new(issuer: &Issuer) -> Block {
        let mut text = String::new();
        let _ = writeln!(text, "issuer {}  {}", issuer.name, issuer.issuer);
        Block { text, failure: None }
    }

    fn line(&mut self, mark: Mark, topic: &str, text: impl AsRef<str>) {
        let _ = writeln!(self.text, "  {:<4}  {topic:<9}  {}", mark.text(), text.as_ref());
    }

    /// A continuation line under the previous one's text.
    fn detail(&mut self, text: impl AsRef<str>) {
        let _ = writeln!(self.text, "{:TEXT_COLUMN$}{}", "", text.as_ref());
    }

    fn ok(&mut self, topic: &str, text: impl AsRef<str>) {
        self.line(Mark::Ok, topic, text);
    }

    fn warn(&mut self, topic: &str, text: impl AsRef<str>) {
        self.line(Mark::Warn, topic, text);
    }

    fn info(&mut self, topic: &str, text: impl AsRef<str>) {
        self.line(Mark::Info, topic, text);
    }

    fn fail(&mut self, topic: &str, text: impl AsRef<str>, short: &str) {
        self.line(Mark::Fail, topic, text);
        if self.failure.is_none() {
            self.failure = Some(short.to_owned());
        }
    }

    fn fix(&mut self, text: impl AsRef<str>) {
        self.detail(format!("fix: {}", text.as_ref()));
    }
}

/// An HTTP answer, with this host's clock read before and after it.
struct Answer {
    url: String,
    status: reqwest::StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
    elapsed: Duration,
    sent: SystemTime,
    received: SystemTime,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        let values: Vec<String> = self
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// `GET URL -> 200 OK in 3 ms`, naming where a redirect ended.
    fn describe(&self, requested: &str) -> String {
        let mut text = format!("GET {requested} -> {} in {}", self.status, millis(self.elapsed));
        if self.url != requested {
            let _ = write!(text, " (redirected to {})", self.url);
        }
        text
    }
}

async fn get(fetcher: &Fetcher, url: &str) -> Result<Answer, String> {
    let sent = SystemTime::now();
    let probe = fetcher.probe(url).await?;
    Ok(Answer {
        url: probe.url,
        status: probe.status,
        headers: probe.headers,
        body: probe.body,
        elapsed: probe.elapsed,
        sent,
        received: SystemTime::now(),
    })
}

fn millis(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn secs(s: u64) -> String {
    humantime::format_duration(Duration::from_secs(s)).to_string()
}

async fn check_issuer(issuer: Issuer, source: KeySourceConfig) -> Block {
    let mut b = Block::new(&issuer);
    let algs: Vec<&str> = issuer.algorithms.iter().map(|a| a.name()).collect();
    b.detail(format!(
        "keys from {}; algorithms {}; leeway {}; refresh every {}",
        source.source,
        algs.join(", "),
        secs(issuer.leeway.unsigned_abs()),
        humantime::format_duration(source.refresh_interval)
    ));
    for alias in &issuer.aliases {
        b.detail(format!("alias {alias}"));
    }
    let fetcher = match Fetcher::new(source.ca_file.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            b.fail("tls", e, "ca_file unusable");
            return b;
        }
    };
    // the answers of this issuer's endpoints: JWKS for the cache headers, either for the clock
    let mut jwks_answer = None;
    let mut discovery_answer = None;
    let set = match &source.source {
        KeySource::File(path) => check_file(&mut b, path).await,
        KeySource::JwksUri(url) => {
            let (answer, set) = check_jwks_http(&mut b, &fetcher, url, false).await;
            jwks_answer = answer;
            set
        }
        KeySource::Discovery(url) => {
            let (jwks_uri, answer) = check_discovery(&mut b, &fetcher, &issuer, url).await;
            discovery_answer = answer;
            match jwks_uri {
                Some(uri) => {
                    let (answer, set) = check_jwks_http(&mut b, &fetcher, &uri, true).await;
                    jwks_answer = answer;
                    set
                }
                None => None,
            }
        }
    };
    if let Some(set) = &set {
        check_keys(&mut b, set, &issuer.algorithms);
    }
    if let Some(answer) = jwks_answer.as_ref().filter(|a| a.status.is_success()) {
        cache_headers(&mut b, answer, &source);
    }
    match (jwks_answer.or(discovery_answer), &source.source) {
        (Some(answer), _) => clock(&mut b, &answer, issuer.leeway),
        (None, KeySource::File(_)) => b.info("clock", "not checked: the keys come from a file"),
        (None, _) => b.info("clock", "not checked: no HTTP answer"),
    }
    b
}

/// Fetch and check the discovery document. Returns its `jwks_uri` (when the document is
/// usable) and the answer (for the clock check).
async fn check_discovery(
    b: &mut Block,
    fetcher: &Fetcher,
    issuer: &Issuer,
    url: &str,
) -> (Option<String>, Option<Answer>) {
    let topic = "discovery";
    plain_http(b, url);
    let answer = match get(fetcher, url).await {
        Ok(a) => a,
        Err(e) => {
            b.fail(topic, format!("unreachable: {e}"), "discovery document unreachable");
            b.fix(
                "check that this host can resolve and reach the issuer (DNS, network policy, proxy, TLS trust: \
                 `ca_file`); where the issuer's public URL is not reachable from here, point `discovery_url` \
                 at an internal address",
            );
            return (None, None);
        }
    };
    if answer.url != url {
        plain_http(b, &answer.url);
    }
    let described = answer.describe(url);
    if !answer.status.is_success() {
        b.fail(topic, described, "discovery document not served");
        excerpt(b, &answer.body);
        if answer.status == reqwest::StatusCode::NOT_FOUND {
            b.fix(
                "check the realm name and path; Keycloak before 17 (or with --http-relative-path=/auth) serves \
                 realms under /auth/realms/NAME",
            );
        }
        return (None, Some(answer));
    }
    let doc: Value = match serde_json::from_slice(&answer.body) {
        Ok(doc) => doc,
        Err(e) => {
            b.fail(
                topic,
                format!("{described}, but the body is not JSON: {e}"),
                "discovery document is not JSON",
            );
            excerpt(b, &answer.body);
            return (None, Some(answer));
        }
    };
    if answer.elapsed > SLOW {
        b.warn(topic, format!("{described}: slow"));
    } else {
        b.ok(topic, described);
    }
    match doc.get("issuer").and_then(Value::as_str) {
        Some(found) if found == issuer.issuer => b.ok("issuer", format!("{found:?} is the configured issuer")),
        Some(found) if issuer.aliases.iter().any(|a| a == found) => {
            b.ok("issuer", format!("{found:?} is one of the configured issuer_aliases"));
        }
        Some(found) => {
            let aliases = if issuer.aliases.is_empty() {
                "no issuer_aliases".to_owned()
            } else {
                format!("issuer_aliases {:?}", issuer.aliases)
            };
            b.fail(
                "issuer",
                format!(
                    "the discovery document says issuer {found:?}, the config says {:?} ({aliases})",
                    issuer.issuer
                ),
                "discovery issuer mismatch",
            );
            b.detail(format!(
                "tokens this server signs carry iss {found:?}: audgate would deny them (unknown_issuer)"
            ));
            b.fix(format!(
                "if both name the same issuer, add {found:?} to `issuer_aliases`; with Keycloak, whose iss follows \
                 the hostname a client used, set its hostname (KC_HOSTNAME / --hostname, or the realm's Frontend \
                 URL) so that iss is always {:?}",
                issuer.issuer
            ));
        }
        None => b.warn(
            "issuer",
            "the discovery document has no `issuer` (OpenID Discovery requires one): cannot confirm it",
        ),
    }
    match doc.get("jwks_uri").and_then(Value::as_str) {
        Some(uri) => (Some(uri.to_owned()), Some(answer)),
        None => {
            b.fail(
                "discovery",
                "the discovery document has no `jwks_uri`",
                "discovery has no jwks_uri",
            );
            b.fix("set `jwks_uri` to the issuer's JWKS URL instead of using discovery");
            (None, Some(answer))
        }
    }
}

/// Fetch the JWKS over HTTP and parse it; the answer, when one arrived, and the key set.
async fn check_jwks_http(
    b: &mut Block,
    fetcher: &Fetcher,
    url: &str,
    discovered: bool,
) -> (Option<Answer>, Option<KeySet>) {
    let topic = "jwks";
    plain_http(b, url);
    let answer = match get(fetcher, url).await {
        Ok(a) => a,
        Err(e) => {
            b.fail(topic, format!("unreachable: {e}"), "JWKS unreachable");
            if discovered {
                b.detail("(this is the jwks_uri the discovery document advertises)");
                b.fix(
                    "an issuer advertises the JWKS under its own public hostname; if this host cannot reach that, \
                     set `jwks_uri` to an address it can reach (the keys are the same)",
                );
            }
            return (None, None);
        }
    };
    if answer.url != url {
        plain_http(b, &answer.url);
    }
    let described = answer.describe(url);
    if !answer.status.is_success() {
        b.fail(topic, described, "JWKS not served");
        excerpt(b, &answer.body);
        return (Some(answer), None);
    }
    match KeySet::parse(&answer.body) {
        Ok(set) => {
            let published = set.keys().len() + set.skipped().len();
            let text = format!("{described}, {} published", count(published, "key"));
            if answer.elapsed > SLOW {
                b.warn(topic, format!("{text}: slow"));
            } else {
                b.ok(topic, text);
            }
            (Some(answer), Some(set))
        }
        Err(e) => {
            b.fail(
                topic,
                format!("{described}, but it is not a JWKS: {e}"),
                "JWKS unreadable",
            );
            if serde_json::from_slice::<Value>(&answer.body).is_err() {
                excerpt(b, &answer.body);
            }
            (Some(answer), None)
        }
    }
}

async fn check_file(b: &mut Block, path: &Path) -> Option<KeySet> {
    let topic = "jwks";
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(e) => {
            b.fail(
                topic,
                format!("cannot read {}: {e}", path.display()),
                "jwks_file unreadable",
            );
            return None;
        }
    };
    let modified = tokio::fs::metadata(path)
        .await
        .and_then(|m| m.modified())
        .map(|t| format!(", modified {}", humantime::format_rfc3339_seconds(t)))
        .unwrap_or_default();
    match KeySet::parse(&bytes) {
        Ok(set) => {
            let published = set.keys().len() + set.skipped().len();
            b.ok(
                topic,
                format!(
                    "read {} ({} bytes{modified}), {} published",
                    path.display(),
                    bytes.len(),
                    count(published, "key")
                ),
            );
            Some(set)
        }
        Err(e) => {
            b.fail(
                topic,
                format!("{} is not a JWKS: {e}", path.display()),
                "jwks_file unreadable",
            );
            None
        }
    }
}

/// Which published keys are usable for the issuer's algorithms, which are not, and why.
fn check_keys(b: &mut Block, set: &KeySet, algorithms: &[Alg]) {
    let fitting = |k: &Key| -> Vec<Alg> { algorithms.iter().copied().filter(|a| k.fits(*a)).collect() };
    let (usable, unfit): (Vec<&Key>, Vec<&Key>) = set.keys().iter().partition(|k| !fitting(k).is_empty());
    let algs: Vec<&str> = algorithms.iter().map(|a| a.name()).collect();
    if usable.is_empty() {
        let mut parts = vec![format!("{} published", set.keys().len() + set.skipped().len())];
        if !set.skipped().is_empty() {
            parts.push(format!("{} skipped", set.skipped().len()));
        }
        if !unfit.is_empty() {
            parts.push(format!("{} of another type", unfit.len()));
        }
        b.fail(
            "keys",
            format!("no key usable for {} ({})", algs.join(", "), parts.join(", ")),
            &format!("no key usable for {}", algs.join(", ")),
        );
    } else {
        let per_alg: Vec<String> = algorithms
            .iter()
            .map(|a| {
                let n = usable.iter().filter(|k| k.fits(*a)).count();
                format!("{a}: {n}")
            })
            .collect();
        b.ok(
            "keys",
            format!("{} ({})", count(usable.len(), "usable key"), per_alg.join(", ")),
        );
        let width = usable.iter().map(|k| kid(k).len()).max().unwrap_or(0);
        for k in &usable {
            let own = k.alg.map_or("(none)", Alg::name);
            let used: Vec<&str> = fitting(k).iter().map(|a| a.name()).collect();
            b.detail(format!(
                "{:<width$}  {:<8}  alg {own:<6}  verifies {}",
                kid(k),
                kind(k.kind),
                used.join(", ")
            ));
        }
    }
    for k in &unfit {
        b.warn(
            "unusable",
            format!(
                "{}: {} key{} fits none of the allowed algorithms ({})",
                kid(k),
                kind(k.kind),
                k.alg.map(|a| format!(" with alg {a}")).unwrap_or_default(),
                algs.join(", ")
            ),
        );
    }
    for s in set.skipped() {
        let name = s
            .kid
            .as_deref()
            .map_or_else(|| "(no kid)".to_owned(), |k| format!("{k:?}"));
        b.warn("skipped", format!("{name}: {}", s.why));
    }
    let mut seen: Vec<&str> = Vec::new();
    for k in &usable {
        match k.kid.as_deref() {
            None => b.warn(
                "kid",
                format!(
                    "a {} key has no `kid`: only tokens without a kid can use it",
                    kind(k.kind)
                ),
            ),
            Some(id) if seen.contains(&id) => {}
            Some(id) => {
                let n = usable.iter().filter(|o| o.kid.as_deref() == Some(id)).count();
                if n > 1 {
                    b.warn("kid", format!("{id:?} is published {n} times"));
                }
                seen.push(id);
            }
        }
    }
    if usable.is_empty() {
        keys_fix(b, set, &unfit, algorithms);
    }
}

fn keys_fix(b: &mut Block, set: &KeySet, unfit: &[&Key], algorithms: &[Alg]) {
    if set.keys().is_empty() && set.skipped().is_empty() {
        b.fix("the issuer publishes no keys at all: in Keycloak, check the realm's keys (Realm settings -> Keys)");
        return;
    }
    if !unfit.is_empty() {
        let mut suggest: Vec<&str> = Vec::new();
        for k in unfit {
            let alg = k.alg.unwrap_or(match k.kind {
                KeyKind::Rsa => Alg::RS256,
                KeyKind::EcP256 => Alg::ES256,
                KeyKind::EcP384 => Alg::ES384,
                KeyKind::Ed25519 => Alg::EdDSA,
            });
            if !suggest.contains(&alg.name()) {
                suggest.push(alg.name());
            }
        }
        let algs: Vec<&str> = algorithms.iter().map(|a| a.name()).collect();
        b.fix(format!(
            "`algorithms` is [{}] but the issuer signs with other key types: add {} to `algorithms` if tokens use it",
            algs.join(", "),
            suggest.join(", ")
        ));
    }
    if set.skipped().iter().any(|s| s.why.starts_with("`use`")) {
        b.fix(
            "a `use: enc` key only encrypts (Keycloak publishes its RSA-OAEP key next to the signing keys); the \
             issuer needs an active signing key (`use: sig`) for these algorithms: in Keycloak, Realm settings -> \
             Keys -> providers",
        );
    }
}

fn kid(k: &Key) -> String {
    k.kid
        .as_deref()
        .map_or_else(|| "(no kid)".to_owned(), |id| format!("{id:?}"))
}

fn kind(k: KeyKind) -> &'static str {
    match k {
        KeyKind::Rsa => "RSA",
        KeyKind::EcP256 => "EC P-256",
        KeyKind::EcP384 => "EC P-384",
        KeyKind::Ed25519 => "Ed25519",
    }
}

/// The JWKS response's caching headers: informational, audgate refreshes on its own schedule.
fn cache_headers(b: &mut Block, answer: &Answer, source: &KeySourceConfig) {
    let show = |name: &str| answer.header(name).unwrap_or_else(|| "-".to_owned());
    b.info(
        "cache",
        format!(
            "Cache-Control: {}; Expires: {}; ETag: {}",
            show("cache-control"),
            show("expires"),
            show("etag")
        ),
    );
    b.detail(format!(
        "(audgate ignores these: it refreshes every {}, and on an unknown kid at most every {})",
        humantime::format_duration(source.refresh_interval),
        humantime::format_duration(source.min_refresh_interval)
    ));
}

/// This host's clock against the server's `Date` header.
fn clock(b: &mut Block, answer: &Answer, leeway: i64) {
    let Some(date) = answer.header("date") else {
        b.info("clock", "not checked: the answer has no Date header");
        return;
    };
    let Some(server) = parse_http_date(&date) else {
        b.info("clock", format!("not checked: cannot read the Date header {date:?}"));
        return;
    };
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let skew = Skew::between(server, unix(answer.sent), unix(answer.received));
    let leeway = leeway.unsigned_abs();
    let (s, behind) = match skew {
        Skew::Agree => {
            b.ok(
                "clock",
                format!(
                    "this host agrees with the server's Date within a second (leeway {})",
                    secs(leeway)
                ),
            );
            return;
        }
        Skew::HostBehind(s) => (s, true),
        Skew::HostAhead(s) => (s, false),
    };
    let direction = if behind { "behind" } else { "ahead of" };
    if s <= leeway {
        b.ok(
            "clock",
            format!(
                "this host is {} {direction} the server's Date, within the leeway of {}",
                skew_text(s),
                secs(leeway)
            ),
        );
        return;
    }
    b.warn(
        "clock",
        format!(
            "this host is {} {direction} the server's Date ({date}), more than the leeway of {}",
            skew_text(s),
            secs(leeway)
        ),
    );
    let beyond = skew_text(s - leeway);
    if behind {
        b.detail(format!(
            "fresh tokens carry iat/nbf in this host's future: each is denied not_yet_valid for its first {beyond}"
        ));
    } else {
        b.detail(format!(
            "tokens expire {beyond} early here: one that lives less than that is denied expired on arrival"
        ));
    }
    b.fix("sync the clocks (NTP, chrony) of this host and the issuer, or raise `leeway`");
}

/// `42 s`, and for longer differences also in larger units: `7322 s (2h 2m 2s)`.
fn skew_text(s: u64) -> String {
    if s < 60 {
        format!("{s} s")
    } else {
        format!("{s} s ({})", secs(s))
    }
}

/// The smallest clock difference consistent with one observation: the server wrote `date`
/// (whole seconds, truncated) at some moment this host saw between `sent` and `received`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skew {
    Agree,
    /// The server's clock is ahead of this host's by at least this many seconds.
    HostBehind(u64),
    /// This host's clock is ahead of the server's by at least this many seconds.
    HostAhead(u64),
}

impl Skew {
    fn between(date: i64, sent: f64, received: f64) -> Skew {
        let date = date as f64;
        // server time - host time lies in (date - received, date + 1 - sent)
        let low = date - received;
        let high = date + 1.0 - sent;
        if low > 0.0 {
            Skew::HostBehind(low.floor() as u64).normalized()
        } else if high < 0.0 {
            Skew::HostAhead((-high).floor() as u64).normalized()
        } else {
            Skew::Agree
        }
    }

    fn normalized(self) -> Skew {
        match self {
            Skew::HostBehind(0) | Skew::HostAhead(0) => Skew::Agree,
            other => other,
        }
    }
}

/// An HTTP date in the IMF-fixdate form servers send (`Sun, 06 Nov 1994 08:49:37 GMT`), as
/// Unix seconds.
fn parse_http_date(text: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (_weekday, rest) = text.trim().split_once(", ")?;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: i64 = day.parse().ok()?;
    let month = i64::try_from(MONTHS.iter().position(|m| m == month)?).ok()? + 1;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else { return None };
    if !(1..=31).contains(&day) || !(0..24).contains(h) || !(0..60).contains(m) || !(0..=60).contains(s) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Warn about a plain-http URL off loopback: keys fetched over it can be replaced in transit.
fn plain_http(b: &mut Block, url: &str) {
    let Ok(parsed) = reqwest::Url::parse(url) else { return };
    if parsed.scheme() != "http" {
        return;
    }
    let host = parsed.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        b.warn(
            "transport",
            format!("{url} is plain http off loopback: keys fetched over it can be replaced in transit"),
        );
    }
}

/// The start of a body that is not a usable document, on one line (error pages, HTML).
fn excerpt(b: &mut Block, body: &[u8]) {
    const MAX: usize = 160;
    let text = String::from_utf8_lossy(body);
    let flat: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if flat.is_empty() {
        b.detail("(empty body)");
    } else if flat.chars().count() > MAX {
        b.detail(format!("body: {}...", flat.chars().take(MAX).collect::<String>()));
    } else {
        b.detail(format!("body: {flat}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_off_loopback_is_a_warning() {
        let warns = |url: &str| {
            let mut b = Block {
                text: String::new(),
                failure: None,
            };
            plain_http(&mut b, url);
            assert!(b.failure.is_none());
            b.text.contains("warn")
        };
        assert!(warns(
            "http://keycloak.sso.svc:8080/realms/shop/.well-known/openid-configuration"
        ));
        assert!(warns("http://10.0.0.7/certs"));
        assert!(!warns(
            "https://sso.example.com/realms/shop/protocol/openid-connect/certs"
        ));
        assert!(!warns("http://127.0.0.1:8080/certs"));
        assert!(!warns("http://localhost/certs"));
        assert!(!warns("http://[::1]:8080/certs"));
    }

    #[test]
    fn http_dates_parse() {
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_date("Tue, 29 Feb 2000 23:59:59 GMT"), Some(951_868_799));
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(parse_http_date("garbage"), None);
    }

    #[test]
    fn skew_allows_for_the_truncated_date_and_the_round_trip() {
        // the server wrote 100 (i.e. 100.0..101.0) while this host went from 100.9 to 101.2
        assert_eq!(Skew::between(100, 100.9, 101.2), Skew::Agree);
        assert_eq!(Skew::between(100, 99.2, 99.4), Skew::Agree);
        assert_eq!(Skew::between(160, 100.0, 100.5), Skew::HostBehind(59));
        assert_eq!(Skew::between(100, 160.0, 160.5), Skew::HostAhead(59));
    }
}
