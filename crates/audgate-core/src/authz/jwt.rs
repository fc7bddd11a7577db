//! Compact JWS parsing and verification: header peek, claim types, the issuer's algorithm
//! allow-list, key choice, signature, then time. The only way to get a [`VerifiedToken`] is
//! [`verify`], so nothing later can act on claims whose signature was not checked.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::reason::{Denial, Reason};
use super::route::IssuerId;
use crate::jwks::KeySet;

/// The signature algorithms audgate can be configured to accept. `none` and the HMAC family
/// are not here: a JWKS holds public keys, and an HS* token "verified" with one is a forgery.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    /// Accepted in the config (peers list it), but no key audgate loads fits it.
    ES512,
    EdDSA,
}

impl Alg {
    pub const ALL: [Alg; 10] = [
        Alg::RS256,
        Alg::RS384,
        Alg::RS512,
        Alg::PS256,
        Alg::PS384,
        Alg::PS512,
        Alg::ES256,
        Alg::ES384,
        Alg::ES512,
        Alg::EdDSA,
    ];

    pub fn from_name(name: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|a| a.name() == name)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::ES512 => "ES512",
            Alg::EdDSA => "EdDSA",
        }
    }

    fn backend(self) -> Option<jsonwebtoken::Algorithm> {
        use jsonwebtoken::Algorithm as A;
        Some(match self {
            Alg::RS256 => A::RS256,
            Alg::RS384 => A::RS384,
            Alg::RS512 => A::RS512,
            Alg::PS256 => A::PS256,
            Alg::PS384 => A::PS384,
            Alg::PS512 => A::PS512,
            Alg::ES256 => A::ES256,
            Alg::ES384 => A::ES384,
            Alg::EdDSA => A::EdDSA,
            Alg::ES512 => return None,
        })
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What verification needs to know about an issuer.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// The config name (metrics, logs).
    pub name: String,
    /// The exact `iss` value; aliases are also accepted.
    pub issuer: String,
    pub aliases: Vec<String>,
    pub algorithms: Vec<Alg>,
    /// Clock skew allowed for `exp`, `nbf` and `iat`, in seconds.
    pub leeway: i64,
}

/// The protected header fields audgate reads. `jku`, `jwk`, `x5u` and `x5c` are ignored on
/// purpose: keys come only from the issuer's configured source.
#[derive(Debug, Clone)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
    pub typ: Option<String>,
}

/// The registered claims audgate decides on, type-checked, plus the whole payload.
#[derive(Debug, Clone)]
pub struct Claims {
    pub iss: String,
    pub sub: Option<String>,
    pub aud: Vec<String>,
    pub azp: Option<String>,
    pub client_id: Option<String>,
    pub exp: i64,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
    pub payload: Map<String, Value>,
    /// The payload segment as sent: base64url of the payload JSON.
    pub payload_b64: String,
}

impl Claims {
    /// A string claim, or the empty string.
    pub fn str(&self, name: &str) -> &str {
        self.payload.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

/// A token split and decoded, nothing verified yet.
#[derive(Debug)]
pub struct UnverifiedToken<'t> {
    pub header: Header,
    pub claims: Claims,
    signing_input: &'t str,
    signature: &'t str,
}

/// A token whose signature verified under a key of `issuer` and whose times are valid.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    claims: Arc<Claims>,
    issuer: IssuerId,
    /// The `kid` of the key that verified it (`None`: the key has none, or not checked).
    /// Shared, so a token served from the cache is cloned without allocating.
    key_id: Option<Arc<str>>,
    /// The generation of the key set that verified it.
    key_generation: u64,
}

impl VerifiedToken {
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    pub fn key_generation(&self) -> u64 {
        self.key_generation
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    pub fn issuer(&self) -> IssuerId {
        self.issuer
    }
}

fn malformed(description: impl Into<String>) -> Denial {
    Denial::new(Reason::MalformedToken, description)
}

/// Split a compact JWS and decode its header and payload. Checks shape and claim types, the
/// header `typ`, the payload `typ`, `crit`, and that `alg` is one audgate could ever accept.
pub fn parse(token: &str) -> Result<UnverifiedToken<'_>, Denial> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed("not a compact JWS (three base64url parts separated by '.')"));
    };
    let header_json = decode_part(h, "header")?;
    let payload_json = decode_part(p, "payload")?;
    if URL_SAFE_NO_PAD.decode(s).is_err() {
        return Err(malformed("the signature is not base64url"));
    }
    let header = match parse_header(&header_json) {
        // Keycloak signs its refresh tokens with the realm's HMAC key (HS512), an alg never
        // accepted: say what the token is, which tells the caller what to send instead.
        Err(denial) if denial.reason == Reason::UnsupportedAlg => {
            return Err(payload_typ_denial(&payload_json).unwrap_or(denial));
        }
        other => other?,
    };
    let claims = parse_claims(&payload_json, p)?;
    check_token_types(&header, &claims)?;
    Ok(UnverifiedToken {
        header,
        claims,
        signing_input: &token[..h.len() + 1 + p.len()],
        signature: s,
    })
}

fn decode_part(part: &str, what: &str) -> Result<Map<String, Value>, Denial> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| malformed(format!("the {what} is not base64url")))?;
    // serde_json's message may quote the input: say where, never what
    let UniqueKeys(map) = serde_json::from_slice(&bytes).map_err(|e| {
        malformed(format!(
            "the {what} is not a JSON object ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    Ok(map)
}

fn parse_header(h: &Map<String, Value>) -> Result<Header, Denial> {
    if h.contains_key("crit") {
        return Err(malformed(
            "the header lists `crit` extensions audgate does not understand",
        ));
    }
    let alg = match h.get("alg") {
        Some(Value::String(a)) => a.clone(),
        Some(_) => return Err(malformed("the header `alg` is not a string")),
        None => return Err(malformed("the header has no `alg`")),
    };
    if Alg::from_name(&alg).is_none() {
        return Err(Denial::new(
            Reason::UnsupportedAlg,
            format!("alg `{}` is never accepted with JWKS keys", printable(&alg)),
        ));
    }
    Ok(Header {
        alg,
        kid: opt_string(h, "kid", "header")?,
        typ: opt_string(h, "typ", "header")?,
    })
}

fn parse_claims(p: &Map<String, Value>, payload_b64: &str) -> Result<Claims, Denial> {
    let iss = match p.get("iss") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(malformed("the `iss` claim is not a string")),
        None => return Err(Denial::new(Reason::UnknownIssuer, "the token has no `iss` claim")),
    };
    let aud = match p.get("aud") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| malformed("the `aud` claim has an entry that is not a string"))?,
        Some(_) => return Err(malformed("the `aud` claim is neither a string nor an array of strings")),
    };
    for name in ["jti", "typ", "scope"] {
        opt_string(p, name, "payload")?;
    }
    let exp = numeric_date(p, "exp")?.ok_or_else(|| malformed("the token has no `exp` claim"))?;
    Ok(Claims {
        iss,
        sub: opt_string(p, "sub", "payload")?,
        aud,
        azp: opt_string(p, "azp", "payload")?,
        client_id: opt_string(p, "client_id", "payload")?,
        exp,
        nbf: numeric_date(p, "nbf")?,
        iat: numeric_date(p, "iat")?,
        payload: p.clone(),
        payload_b64: payload_b64.to_owned(),
    })
}

/// Keycloak marks ID, refresh and offline tokens in the payload `typ`; RFC 9068 access tokens
/// carry `at+jwt` in the header.
fn check_token_types(header: &Header, claims: &Claims) -> Result<(), Denial> {
    if let Some(typ) = &header.typ {
        let ok = ["JWT", "at+jwt", "application/at+jwt"]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(typ));
        if !ok {
            return Err(Denial::new(
                Reason::WrongTokenType,
                format!("header typ is `{}`; expected JWT or at+jwt", printable(typ)),
            ));
        }
    }
    match payload_typ_denial(&claims.payload) {
        Some(denial) => Err(denial),
        None => Ok(()),
    }
}

/// `wrong_token_type` when the payload `typ` is a string other than `Bearer`.
fn payload_typ_denial(payload: &Map<String, Value>) -> Option<Denial> {
    let typ = payload.get("typ").and_then(Value::as_str).unwrap_or_default();
    if typ.is_empty() || typ.eq_ignore_ascii_case("Bearer") {
        return None;
    }
    let what = match typ {
        "ID" => "an ID token; send the access token",
        "Refresh" | "Offline" => "a refresh token; send the access token",
        _ => "not an access token",
    };
    Some(Denial::new(
        Reason::WrongTokenType,
        format!("token typ is `{}`: this is {what}", printable(typ)),
    ))
}

fn opt_string(map: &Map<String, Value>, name: &str, part: &str) -> Result<Option<String>, Denial> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(malformed(format!("the {part} `{name}` is not a string"))),
    }
}

/// RFC 7519 NumericDate: seconds since the epoch, possibly fractional (truncated here).
fn numeric_date(map: &Map<String, Value>, name: &str) -> Result<Option<i64>, Denial> {
    let Some(v) = map.get(name) else {
        return Ok(None);
    };
    let n = v
        .as_number()
        .ok_or_else(|| malformed(format!("the `{name}` claim is not a number")))?;
    if let Some(i) = n.as_i64() {
        return Ok(Some(i));
    }
    if n.as_u64().is_some() {
        return Ok(Some(i64::MAX));
    }
    match n.as_f64() {
        // `as` saturates for out-of-range floats
        Some(f) if f.is_finite() => Ok(Some(f.floor() as i64)),
        _ => Err(malformed(format!("the `{name}` claim is not a valid date"))),
    }
}

/// Verify a parsed token: the issuer's allow-list, the key chosen from that issuer's keys
/// only, the signature, then `exp` / `nbf` / `iat` against `now` with the issuer's leeway.
pub fn verify(
    token: UnverifiedToken<'_>,
    issuer_id: IssuerId,
    issuer: &Issuer,
    keys: &KeySet,
    now: i64,
) -> Result<VerifiedToken, Denial> {
    let alg = allowed_alg(&token, issuer)?;
    let kid = token.header.kid.as_deref();
    let mut tried = 0;
    let mut verified_by = None;
    for key in keys.candidates(kid, alg) {
        tried += 1;
        if check_signature(&token, key, alg) {
            verified_by = Some(key);
            break;
        }
    }
    if tried == 0 {
        let description = match kid {
            Some(kid) => format!(
                "no {alg} signing key with kid `{}` in issuer {}'s JWKS",
                printable(kid),
                issuer.name
            ),
            None => format!("issuer {} publishes no {alg} signing key", issuer.name),
        };
        return Err(Denial::new(Reason::UnknownKid, description));
    }
    let Some(key) = verified_by else {
        return Err(Denial::new(
            Reason::BadSignature,
            format!("the signature does not verify with issuer {}'s key", issuer.name),
        ));
    };
    check_times(&token.claims, issuer.leeway, now)?;
    Ok(VerifiedToken {
        claims: Arc::new(token.claims),
        issuer: issuer_id,
        key_id: key.kid.as_deref().map(Arc::from),
        key_generation: keys.generation(),
    })
}

/// Every check of [`verify`] except the signature. Only `audgate explain --no-verify` uses
/// it, to explain a token whose keys are not at hand; it says so loudly.
pub fn accept_without_signature(
    token: UnverifiedToken<'_>,
    issuer_id: IssuerId,
    issuer: &Issuer,
    now: i64,
) -> Result<VerifiedToken, Denial> {
    allowed_alg(&token, issuer)?;
    check_times(&token.claims, issuer.leeway, now)?;
    Ok(VerifiedToken {
        claims: Arc::new(token.claims),
        issuer: issuer_id,
        key_id: None,
        key_generation: 0,
    })
}

fn allowed_alg(token: &UnverifiedToken<'_>, issuer: &Issuer) -> Result<Alg, Denial> {
    Alg::from_name(&token.header.alg)
        .filter(|a| issuer.algorithms.contains(a))
        .ok_or_else(|| {
            let allowed: Vec<&str> = issuer.algorithms.iter().map(|a| a.name()).collect();
            Denial::new(
                Reason::UnsupportedAlg,
                format!(
                    "alg `{}` is not allowed for issuer {}; allowed: {}",
                    token.header.alg,
                    issuer.name,
                    allowed.join(", ")
                ),
            )
        })
}

fn check_signature(token: &UnverifiedToken<'_>, key: &crate::jwks::Key, alg: Alg) -> bool {
    let Some(backend) = alg.backend() else {
        return false;
    };
    jsonwebtoken::crypto::verify(token.signature, token.signing_input.as_bytes(), &key.decoding, backend)
        .unwrap_or(false)
}

/// `exp` is exclusive (RFC 7519 §4.1.4); `leeway` widens every window by that many seconds.
pub fn check_times(claims: &Claims, leeway: i64, now: i64) -> Result<(), Denial> {
    if now >= claims.exp.saturating_add(leeway) {
        return Err(Denial::new(
            Reason::Expired,
            format!(
                "the token expired {} ago (leeway {leeway}s)",
                ago(now.saturating_sub(claims.exp))
            ),
        ));
    }
    if let Some(nbf) = claims.nbf
        && now < nbf.saturating_sub(leeway)
    {
        return Err(Denial::new(
            Reason::NotYetValid,
            format!(
                "the token is not valid for another {} (nbf, leeway {leeway}s)",
                ago(nbf.saturating_sub(now))
            ),
        ));
    }
    if let Some(iat) = claims.iat
        && iat > now.saturating_add(leeway)
    {
        return Err(Denial::new(
            Reason::NotYetValid,
            format!(
                "the token was issued {} in the future (iat, leeway {leeway}s)",
                ago(iat.saturating_sub(now))
            ),
        ));
    }
    Ok(())
}

/// A span of seconds for people: `252` -> `4 min 12 s`.
pub fn ago(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// A value from the token, safe to put in a description: printable ASCII, at most 64 chars.
pub fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect()
}

pub type JsonObject = Map<String, Value>;

/// A token's header and payload decoded without any check, for display and hints only (a
/// token `parse` refuses can still say what it is). Never used to decide.
pub fn peek(token: &str) -> (Option<JsonObject>, Option<JsonObject>) {
    let mut parts = token.split('.');
    let mut decode = || -> Option<JsonObject> {
        let bytes = URL_SAFE_NO_PAD.decode(parts.next()?.trim_end_matches('=')).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let header = decode();
    (header, decode())
}

/// A value from the token for a person to read: control characters replaced, not shortened.
pub fn readable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// A JSON object whose keys must be unique: `{"alg":"RS256","alg":"none"}` means different
/// things to different parsers, so it is refused.
struct UniqueKeys(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<UniqueKeys, A::Error> {
                let mut map = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if map.contains_key(&key) {
                        return Err(de::Error::custom(format_args!("duplicate key `{}`", printable(&key))));
                    }
                    map.insert(key, value);
                }
                Ok(UniqueKeys(map))
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(header: &str, payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn keycloak_refresh_token_signed_hs512_is_a_wrong_token_type() {
        // what Keycloak 26 issues as refresh_token: HS512 with the realm's HMAC key
        let token = compact(
            r#"{"alg":"HS512","typ":"JWT","kid":"245abfc2"}"#,
            r#"{"exp":1796179408,"iss":"http://127.0.0.1:8080/realms/shop","typ":"Refresh","azp":"web-shop"}"#,
        );
        let denial = parse(&token).err().map(|d| d.reason);
        assert_eq!(denial, Some(Reason::WrongTokenType));
        // an HMAC access token stays unsupported_alg
        let token = compact(
            r#"{"alg":"HS512","typ":"JWT"}"#,
            r#"{"exp":1796179408,"iss":"http://127.0.0.1:8080/realms/shop","typ":"Bearer"}"#,
        );
        assert_eq!(parse(&token).err().map(|d| d.reason), Some(Reason::UnsupportedAlg));
    }
}
