//! A decision, and the answer built from it as plain data: status, headers for the upstream,
//! headers and body for the client, and the metadata Envoy stores for access logs.

use std::borrow::Cow;

use serde_json::Value;

use super::Policy;
use super::jwt::VerifiedToken;
use super::reason::{Denial, Reason};
use super::route::{IssuerId, Mode, Route};

/// The route name reported when no route matched (SPEC.md: the `route` label is `-`).
pub const NO_ROUTE: &str = "-";

/// The four outcomes a check can have; also the `decision` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// A `dry_run` route that would have denied: the request passes.
    DryRunDeny,
    /// Could not decide (keys never loaded): Envoy's failure mode applies.
    Error,
}

impl Verdict {
    /// Every verdict, in declaration order (`verdict as usize` indexes it).
    pub const ALL: [Verdict; 4] = [Verdict::Allow, Verdict::Deny, Verdict::DryRunDeny, Verdict::Error];

    pub const fn label(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::DryRunDeny => "dry_run_deny",
            Verdict::Error => "error",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Decision<'p> {
    pub route: Option<&'p Route>,
    pub verdict: Verdict,
    pub reason: Reason,
    /// Why, for a person: set for every reason but `allowed` and `anonymous`.
    pub description: String,
    /// The issuer the token named, when it is a configured one.
    pub issuer: Option<IssuerId>,
    /// Present when the token verified (also on a route-rule deny).
    pub token: Option<VerifiedToken>,
    /// The client id that satisfied the route's rule.
    pub client_id: Option<String>,
    /// The tenant of a templated issuer the token named (`$tenant`).
    pub tenant: Option<String>,
}

impl<'p> Decision<'p> {
    pub(super) fn allow(route: Option<&'p Route>, reason: Reason) -> Self {
        Decision {
            route,
            verdict: Verdict::Allow,
            reason,
            description: String::new(),
            issuer: None,
            token: None,
            client_id: None,
            tenant: None,
        }
    }

    /// A denial, turned into an error for `keys_unavailable` and into a pass on a dry-run route.
    pub(super) fn deny(route: Option<&'p Route>, denial: Denial) -> Self {
        let verdict = match (denial.reason, route.map(|r| r.mode)) {
            (Reason::KeysUnavailable, _) => Verdict::Error,
            (_, Some(Mode::DryRun)) => Verdict::DryRunDeny,
            _ => Verdict::Deny,
        };
        Decision {
            route,
            verdict,
            reason: denial.reason,
            description: denial.description,
            issuer: None,
            token: None,
            client_id: None,
            tenant: None,
        }
    }

    /// The route's name, or [`NO_ROUTE`]: the `route` of metrics, logs and metadata.
    pub fn route_name(&self) -> &'p str {
        self.route.map_or(NO_ROUTE, |r| r.name.as_str())
    }

    pub fn subject(&self) -> Option<&str> {
        self.token.as_ref().and_then(|t| t.claims().sub.as_deref())
    }
}

/// Where a claim header's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimValue {
    /// `$client_id`: the client id that satisfied the route's rule.
    ClientId,
    /// `$payload`: base64url of the verified payload JSON.
    Payload,
    /// A claim, by dotted path (`realm_access.roles`).
    Claim(Vec<String>),
    /// `$tenant`: the tenant of a templated issuer.
    Tenant,
}

#[derive(Debug, Clone)]
pub struct ClaimHeader {
    /// Lower-case header name.
    pub name: String,
    pub value: ClaimValue,
}

impl ClaimHeader {
    /// The other spellings of `name` with `_` for `-` (and `-` for `_`) in any position:
    /// `x-auth-subject` -> `x_auth_subject`, `x-auth_subject`, `x_auth-subject`. CGI, WSGI and
    /// Rack upstreams turn every one of them into the same `HTTP_X_AUTH_SUBJECT`, so a client's
    /// copy under any of them would reach the upstream as the claim. Names with many
    /// separators are refused by the config (2^n spellings).
    pub fn other_spellings(name: &str) -> Vec<String> {
        let positions: Vec<usize> = name
            .bytes()
            .enumerate()
            .filter(|(_, b)| matches!(b, b'-' | b'_'))
            .map(|(i, _)| i)
            .collect();
        let count = positions.len().min(16);
        let mut out = Vec::new();
        for mask in 0u32..(1 << count) {
            let mut bytes = name.as_bytes().to_vec();
            for (bit, &at) in positions.iter().take(count).enumerate() {
                bytes[at] = if mask & (1 << bit) == 0 { b'-' } else { b'_' };
            }
            // only ASCII `-`/`_` were swapped for ASCII, so the bytes stay UTF-8
            let spelled = String::from_utf8(bytes).unwrap_or_default();
            if spelled != name && !spelled.is_empty() {
                out.push(spelled);
            }
        }
        out
    }

    /// The defaults SPEC.md names when `claim_headers` is absent.
    pub fn defaults() -> Vec<ClaimHeader> {
        let claim = |c: &str| ClaimValue::Claim(vec![c.to_owned()]);
        vec![
            ClaimHeader {
                name: "x-auth-subject".into(),
                value: claim("sub"),
            },
            ClaimHeader {
                name: "x-auth-issuer".into(),
                value: claim("iss"),
            },
            ClaimHeader {
                name: "x-auth-client-id".into(),
                value: ClaimValue::ClientId,
            },
        ]
    }
}

/// The answer, independent of gRPC or HTTP. It borrows from the policy and the decision what
/// it can (a claim's text, the subject), so an adapter that hands the values straight on
/// copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response<'p> {
    /// 200 allow, 401/403 deny, 503 error.
    pub status: u16,
    /// Request headers to set on the upstream request, overwriting any the client sent.
    pub upstream_headers: Vec<(&'p str, Cow<'p, str>)>,
    /// Headers removed so the client cannot supply a claim: every other spelling of the
    /// configured claim headers (`x_auth_subject`), then the configured ones not set above.
    pub remove_headers: Vec<&'p str>,
    /// Headers for the client on deny or error.
    pub client_headers: Vec<(&'static str, String)>,
    /// JSON body for the client on deny or error; empty on allow.
    pub body: String,
    pub metadata: Metadata<'p>,
}

/// What Envoy files under the ext_authz namespace as struct `audgate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata<'p> {
    pub route: &'p str,
    pub reason: &'static str,
    pub subject: Cow<'p, str>,
    pub client_id: Cow<'p, str>,
    pub issuer: &'p str,
    /// The tenant of a templated issuer; empty otherwise.
    pub tenant: Cow<'p, str>,
}

/// Build the answer for a decision (borrowing from `policy` and `d`).
pub fn respond<'p>(policy: &'p Policy, d: &'p Decision<'_>) -> Response<'p> {
    // control characters never leave audgate, in metadata as in headers
    let clean = |s: &'p str| -> Cow<'p, str> {
        if has_control(s) {
            Cow::Owned(s.chars().filter(|c| !c.is_control()).collect())
        } else {
            Cow::Borrowed(s)
        }
    };
    let metadata = Metadata {
        route: d.route_name(),
        reason: d.reason.code(),
        subject: clean(d.subject().unwrap_or_default()),
        client_id: clean(d.client_id.as_deref().unwrap_or_default()),
        issuer: d.issuer.map_or("", |i| policy.issuers[i].name.as_str()),
        tenant: clean(d.tenant.as_deref().unwrap_or_default()),
    };
    match d.verdict {
        Verdict::Allow | Verdict::DryRunDeny => {
            let (upstream_headers, remove_headers) = claim_headers(policy, d);
            Response {
                status: 200,
                upstream_headers,
                remove_headers,
                client_headers: Vec::new(),
                body: String::new(),
                metadata,
            }
        }
        Verdict::Deny | Verdict::Error => {
            let mut client_headers = vec![("content-type", "application/json".to_owned())];
            if let Some(challenge) = challenge(d.reason, &d.description) {
                client_headers.push(("www-authenticate", challenge));
            }
            if d.verdict == Verdict::Error {
                client_headers.push(("retry-after", "5".to_owned()));
            }
            let body = serde_json::json!({"error": d.reason.code(), "error_description": d.description});
            Response {
                status: d.reason.http_status(),
                upstream_headers: Vec::new(),
                remove_headers: Vec::new(),
                client_headers,
                body: body.to_string(),
                metadata,
            }
        }
    }
}

/// RFC 6750 §3: no error attributes when no token was sent; `invalid_token` for a token that
/// failed verification (or is not meant for this route); `insufficient_scope` for scope.
fn challenge(reason: Reason, description: &str) -> Option<String> {
    let error = match reason {
        Reason::MissingToken => return Some(r#"Bearer realm="audgate""#.to_owned()),
        Reason::InsufficientScope | Reason::ClaimMismatch => "insufficient_scope",
        Reason::NoRoute | Reason::KeysUnavailable => return None,
        _ => "invalid_token",
    };
    // error_description is a quoted-string of %x20-21 / %x23-5B / %x5D-7E (RFC 6750 §3)
    let safe: String = description
        .chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            ' ' | '!' | '#'..='~' => c,
            _ => '?',
        })
        .collect();
    Some(format!(
        r#"Bearer realm="audgate", error="{error}", error_description="{safe}""#
    ))
}

/// The claim headers to set, and the configured ones to remove because they have no value.
/// On a route-rule denial of a dry-run route the token verified, so headers are still set.
type ClaimHeaders<'p> = (Vec<(&'p str, Cow<'p, str>)>, Vec<&'p str>);

fn claim_headers<'p>(policy: &'p Policy, d: &'p Decision<'_>) -> ClaimHeaders<'p> {
    let mut set = Vec::with_capacity(policy.claim_headers.len());
    let mut remove: Vec<&'p str> = policy.claim_header_spellings.iter().map(String::as_str).collect();
    for h in &policy.claim_headers {
        match d
            .token
            .as_ref()
            .and_then(|t| claim_header_value(&h.value, t, d.client_id.as_deref(), d.tenant.as_deref()))
        {
            Some(v) => set.push((h.name.as_str(), v)),
            None => remove.push(h.name.as_str()),
        }
    }
    (set, remove)
}

fn claim_header_value<'t>(
    value: &ClaimValue,
    token: &'t VerifiedToken,
    client_id: Option<&'t str>,
    tenant: Option<&'t str>,
) -> Option<Cow<'t, str>> {
    let claims = token.claims();
    let text = match value {
        ClaimValue::ClientId => Cow::Borrowed(client_id?),
        ClaimValue::Tenant => Cow::Borrowed(tenant?),
        ClaimValue::Payload => Cow::Borrowed(claims.payload_b64.as_str()),
        ClaimValue::Claim(path) => {
            let mut node = claims.payload.get(&path[0])?;
            for key in &path[1..] {
                node = node.get(key)?;
            }
            render(node)?
        }
    };
    // A header value with CR, LF, NUL or another control character is never sent upstream.
    let clean = !text.is_empty() && !has_control(&text);
    clean.then_some(text)
}

/// Whether `s` holds a control character (C0, DEL or C1). Printable ASCII, the usual case, is
/// settled a byte at a time without decoding characters.
fn has_control(s: &str) -> bool {
    !s.bytes().all(|b| (0x20..0x7f).contains(&b)) && s.chars().any(char::is_control)
}

/// A claim as a header value: strings as they are, arrays joined with `,`, objects as JSON.
fn render(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(Cow::Borrowed(s)),
        // the usual `aud`: one string, nothing to join
        Value::Array(items) if items.len() == 1 => render(&items[0]),
        Value::Array(items) => {
            let parts: Vec<Cow<'_, str>> = items.iter().filter_map(render).collect();
            Some(Cow::Owned(parts.join(",")))
        }
        other => Some(Cow::Owned(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::{ClaimHeader, Reason, Verdict};

    /// Adapters index tables by `verdict as usize` and `reason as usize`.
    #[test]
    fn the_all_lists_are_in_discriminant_order() {
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*v as usize, i);
        }
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn control_characters_are_found_in_ascii_and_beyond() {
        use super::has_control;
        for clean in ["", "alice", "a b~", "é ü", "日本"] {
            assert!(!has_control(clean), "{clean:?}");
        }
        for dirty in ["a\r\nb", "\u{0}", "x\u{7f}", "é\u{85}", "\t"] {
            assert!(has_control(dirty), "{dirty:?}");
        }
    }

    #[test]
    fn every_underscore_spelling_of_a_claim_header() {
        let mut s = ClaimHeader::other_spellings("x-auth-subject");
        s.sort();
        assert_eq!(s, ["x-auth_subject", "x_auth-subject", "x_auth_subject"]);
        assert_eq!(ClaimHeader::other_spellings("x-auth-client-id").len(), 7);
        assert_eq!(ClaimHeader::other_spellings("x_user"), ["x-user"]);
        assert!(ClaimHeader::other_spellings("subject").is_empty());
    }
}
