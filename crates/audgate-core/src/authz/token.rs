//! Finding the bearer token in the configured places of a request.

use std::borrow::Cow;

use super::reason::{Denial, Reason};
use super::request::CheckInput;

/// One place a token may be carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>` (scheme case-insensitive).
    Authorization,
    /// A named header holding the token (optionally with a `Bearer ` prefix).
    Header(String),
    Cookie(String),
    Query(String),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Authorization => f.write_str("authorization header"),
            TokenSource::Header(h) => write!(f, "header {h}"),
            TokenSource::Cookie(c) => write!(f, "cookie {c}"),
            TokenSource::Query(q) => write!(f, "query parameter {q}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub sources: Vec<TokenSource>,
    pub max_bytes: usize,
    /// `token.forward`: false removes the token from the request the upstream gets, on allow.
    pub forward: bool,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            sources: vec![TokenSource::Authorization],
            max_bytes: 16384,
            forward: true,
        }
    }
}

/// The token the request carries. Every configured source is read: two different tokens are
/// refused rather than one picked, since the upstream may read the other one.
pub fn extract<'a>(config: &TokenConfig, input: &CheckInput<'a>) -> Result<Cow<'a, str>, Denial> {
    locate(config, input).map(|(token, _)| token)
}

/// [`extract`], also saying which source the token came from.
pub fn locate<'a, 'c>(
    config: &'c TokenConfig,
    input: &CheckInput<'a>,
) -> Result<(Cow<'a, str>, &'c TokenSource), Denial> {
    let mut found: Option<(Cow<'a, str>, &TokenSource)> = None;
    for source in &config.sources {
        for candidate in candidates(source, input)? {
            if candidate.len() > config.max_bytes {
                return Err(Denial::new(
                    Reason::MalformedToken,
                    format!(
                        "the token in the {source} is over the limit of {} bytes",
                        config.max_bytes
                    ),
                ));
            }
            match &found {
                Some((first, _)) if *first == candidate => {}
                Some((_, first_source)) => {
                    return Err(Denial::new(
                        Reason::MalformedToken,
                        format!("two different tokens were sent ({first_source} and {source}); send one"),
                    ));
                }
                None => found = Some((candidate, source)),
            }
        }
    }
    found.ok_or_else(|| {
        let places: Vec<String> = config.sources.iter().map(ToString::to_string).collect();
        Denial::new(
            Reason::MissingToken,
            format!("no bearer token in the {}", places.join(" or ")),
        )
    })
}

/// What to take out of an allowed request so the upstream never sees the token
/// (`token.forward: false`, as Envoy jwt_authn's `forward: false` and Istio's
/// `forwardOriginalToken: false`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenRemoval<'c> {
    /// Request headers to remove (`authorization`, or a configured token header).
    pub headers: Vec<&'c str>,
    /// Query parameters to remove.
    pub query_parameters: Vec<&'c str>,
    /// The `Cookie` header without the token cookie, when a cookie source carried one (empty:
    /// no cookie is left, remove the header).
    pub cookie: Option<String>,
}

impl TokenRemoval<'_> {
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.query_parameters.is_empty() && self.cookie.is_none()
    }
}

/// Where `input` carries something in one of the configured token places: empty when
/// `token.forward` is true.
pub fn removal<'c>(config: &'c TokenConfig, input: &CheckInput<'_>) -> TokenRemoval<'c> {
    let mut out = TokenRemoval::default();
    if config.forward {
        return out;
    }
    let mut cookies_to_drop: Vec<&str> = Vec::new();
    for source in &config.sources {
        match source {
            TokenSource::Authorization => {
                let bearer_sent = input
                    .header("authorization")
                    .is_some_and(|v| v.split(',').any(|v| matches!(bearer(v), Ok(Some(_)) | Err(_))));
                if bearer_sent {
                    out.headers.push("authorization");
                }
            }
            TokenSource::Header(name) => {
                if input.header(name).is_some() {
                    out.headers.push(name);
                }
            }
            TokenSource::Query(name) => {
                let sent = input
                    .query()
                    .into_iter()
                    .flat_map(|q| q.split('&'))
                    .any(|pair| percent_decode(pair.split_once('=').map_or(pair, |(k, _)| k)).as_ref() == name);
                if sent {
                    out.query_parameters.push(name);
                }
            }
            TokenSource::Cookie(name) => cookies_to_drop.push(name),
        }
    }
    if let Some(header) = input.header("cookie").filter(|_| !cookies_to_drop.is_empty()) {
        let pairs = header.split([';', ',']).map(str::trim).filter(|p| !p.is_empty());
        let is_token = |pair: &str| {
            pair.split_once('=')
                .is_some_and(|(k, _)| cookies_to_drop.contains(&k.trim()))
        };
        if pairs.clone().any(is_token) {
            let kept: Vec<&str> = pairs.filter(|p| !is_token(p)).collect();
            out.cookie = Some(kept.join("; "));
        }
    }
    out
}

/// The tokens one source holds (several when a header was sent more than once: Envoy joins
/// repeated headers with `,`, a character no compact JWS contains).
fn candidates<'a>(source: &TokenSource, input: &CheckInput<'a>) -> Result<Vec<Cow<'a, str>>, Denial> {
    let mut out = Vec::new();
    match source {
        TokenSource::Authorization => {
            for value in input.header("authorization").into_iter().flat_map(comma_separated) {
                if let Some(token) = bearer(value)? {
                    out.push(Cow::Borrowed(token));
                }
            }
        }
        TokenSource::Header(name) => {
            for value in input.header(name).into_iter().flat_map(comma_separated) {
                let value = value.trim();
                let token = bearer(value)?.unwrap_or(value);
                if token.is_empty() {
                    return Err(empty(source));
                }
                out.push(Cow::Borrowed(token));
            }
        }
        TokenSource::Cookie(name) => {
            // Envoy joins repeated Cookie headers with ',' rather than "; ".
            let pairs = input.header("cookie").into_iter().flat_map(|v| v.split([';', ',']));
            for (k, v) in pairs.filter_map(|p| p.split_once('=')) {
                if k.trim() == name {
                    let v = v.trim().trim_matches('"');
                    if v.is_empty() {
                        return Err(empty(source));
                    }
                    out.push(Cow::Borrowed(v));
                }
            }
        }
        TokenSource::Query(name) => {
            for pair in input.query().into_iter().flat_map(|q| q.split('&')) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if percent_decode(k).as_ref() == name {
                    let v = percent_decode(v);
                    if v.is_empty() {
                        return Err(empty(source));
                    }
                    out.push(v);
                }
            }
        }
    }
    Ok(out)
}

/// The comma-separated parts of a header value (as `str::split(',')`), found with SIMD
/// `memchr`: the token is most of the header, and every check reads it.
fn comma_separated(value: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let v = rest?;
        match memchr::memchr(b',', v.as_bytes()) {
            Some(i) => {
                rest = Some(&v[i + 1..]);
                Some(&v[..i])
            }
            None => {
                rest = None;
                Some(v)
            }
        }
    })
}

/// `Bearer <token>` -> the token; another scheme -> None; `Bearer` with nothing -> malformed.
fn bearer(value: &str) -> Result<Option<&str>, Denial> {
    let value = value.trim();
    let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim();
    if token.is_empty() {
        return Err(Denial::new(
            Reason::MalformedToken,
            "the authorization header says Bearer but carries no token",
        ));
    }
    Ok(Some(token))
}

fn empty(source: &TokenSource) -> Denial {
    Denial::new(Reason::MalformedToken, format!("the {source} is empty"))
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let plus_decoded = s.replace('+', " ");
    let decoded = percent_encoding::percent_decode_str(&plus_decoded).decode_utf8_lossy();
    Cow::Owned(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn comma_separated_splits_as_str_split_does() {
        for value in ["", ",", "a", "a,b", ",a,,b,", "Bearer x, Basic y", "é,ü,"] {
            assert_eq!(
                comma_separated(value).collect::<Vec<_>>(),
                value.split(',').collect::<Vec<_>>(),
                "{value:?}"
            );
        }
    }

    fn run(sources: Vec<TokenSource>, headers: &[(&str, &str)], path: &str) -> Result<String, Denial> {
        let headers: HashMap<String, String> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let input = CheckInput {
            method: "GET",
            host: "h",
            path,
            headers: crate::authz::Headers::Map(&headers),
            route_hint: None,
        };
        let config = TokenConfig {
            sources,
            max_bytes: 64,
            forward: true,
        };
        extract(&config, &input).map(|t| t.into_owned())
    }

    fn reason(r: Result<String, Denial>) -> Reason {
        r.expect_err("expected a denial").reason
    }

    #[test]
    fn authorization_bearer_is_case_insensitive() {
        let a = vec![TokenSource::Authorization];
        assert_eq!(run(a.clone(), &[("authorization", "Bearer abc")], "/").unwrap(), "abc");
        assert_eq!(
            run(a.clone(), &[("authorization", "bEaReR   abc ")], "/").unwrap(),
            "abc"
        );
        assert_eq!(
            reason(run(a.clone(), &[("authorization", "Basic dXNlcg==")], "/")),
            Reason::MissingToken
        );
        assert_eq!(
            reason(run(a.clone(), &[("authorization", "Bearer")], "/")),
            Reason::MalformedToken
        );
        assert_eq!(reason(run(a, &[], "/")), Reason::MissingToken);
    }

    #[test]
    fn other_sources_are_read_only_when_configured() {
        let only_auth = vec![TokenSource::Authorization];
        assert_eq!(
            reason(run(only_auth, &[("cookie", "at=abc")], "/?access_token=abc")),
            Reason::MissingToken
        );

        let cookie = vec![TokenSource::Cookie("at".into())];
        assert_eq!(run(cookie.clone(), &[("cookie", "x=1; at=abc")], "/").unwrap(), "abc");
        assert_eq!(
            run(cookie, &[("cookie", "x=1,at=abc")], "/").unwrap(),
            "abc",
            "Envoy joins cookies with ','"
        );

        let query = vec![TokenSource::Query("access_token".into())];
        assert_eq!(run(query, &[], "/p?a=1&access_token=a%2Eb").unwrap(), "a.b");

        let header = vec![TokenSource::Header("x-token".into())];
        assert_eq!(run(header.clone(), &[("x-token", "abc")], "/").unwrap(), "abc");
        assert_eq!(run(header, &[("x-token", "Bearer abc")], "/").unwrap(), "abc");
    }

    #[test]
    fn two_different_tokens_are_refused_the_same_one_twice_is_fine() {
        let both = vec![TokenSource::Authorization, TokenSource::Cookie("at".into())];
        let same = run(
            both.clone(),
            &[("authorization", "Bearer abc"), ("cookie", "at=abc")],
            "/",
        );
        assert_eq!(same.unwrap(), "abc");
        let different = run(both, &[("authorization", "Bearer abc"), ("cookie", "at=xyz")], "/");
        assert_eq!(reason(different), Reason::MalformedToken);
        let repeated = run(
            vec![TokenSource::Authorization],
            &[("authorization", "Bearer a,Bearer b")],
            "/",
        );
        assert_eq!(reason(repeated), Reason::MalformedToken);
    }

    #[test]
    fn a_token_over_max_bytes_is_malformed() {
        let long = format!("Bearer {}", "a".repeat(65));
        assert_eq!(
            reason(run(vec![TokenSource::Authorization], &[("authorization", &long)], "/")),
            Reason::MalformedToken
        );
    }

    #[test]
    fn forward_false_names_every_place_that_carried_the_token() {
        let headers: HashMap<String, String> = [
            ("authorization", "Bearer abc"),
            ("x-token", "abc"),
            ("cookie", "theme=dark; session=abc, lang=en"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let input = CheckInput {
            method: "GET",
            host: "h",
            path: "/x?a=1&access%5Ftoken=abc",
            headers: crate::authz::Headers::Map(&headers),
            route_hint: None,
        };
        let mut config = TokenConfig {
            sources: vec![
                TokenSource::Authorization,
                TokenSource::Header("x-token".into()),
                TokenSource::Header("x-absent".into()),
                TokenSource::Cookie("session".into()),
                TokenSource::Query("access_token".into()),
            ],
            max_bytes: 64,
            forward: true,
        };
        assert!(removal(&config, &input).is_empty(), "forward: true keeps everything");
        config.forward = false;
        let r = removal(&config, &input);
        assert_eq!(r.headers, ["authorization", "x-token"]);
        assert_eq!(r.query_parameters, ["access_token"]);
        assert_eq!(r.cookie.as_deref(), Some("theme=dark; lang=en"));

        let basic: HashMap<String, String> = [("authorization".to_string(), "Basic dXNlcg==".to_string())].into();
        let input = CheckInput {
            headers: crate::authz::Headers::Map(&basic),
            path: "/",
            ..input
        };
        assert!(removal(&config, &input).is_empty(), "Basic credentials are not a token");
    }
}
