//! A JWKS document parsed into verification keys (pure: bytes in, keys out).
//!
//! Each entry of `keys[]` is parsed on its own: one key audgate cannot use (an encryption key,
//! an unknown `kty`, a curve it does not support, a broken value) is skipped with a reason and
//! never takes the rest of the issuer's keys down with it.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use serde_json::Value;

use crate::authz::Alg;

/// What kind of public key a JWK holds; decides which algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    pub fn fits(self, alg: Alg) -> bool {
        matches!(
            (self, alg),
            (
                KeyKind::Rsa,
                Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512
            ) | (KeyKind::EcP256, Alg::ES256)
                | (KeyKind::EcP384, Alg::ES384)
                | (KeyKind::Ed25519, Alg::EdDSA)
        )
    }
}

/// One usable signing key.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The key's own `alg`, when the JWK names one: then only that algorithm may use it.
    pub alg: Option<Alg>,
    pub kind: KeyKind,
    pub(crate) decoding: DecodingKey,
}

impl Key {
    pub fn fits(&self, alg: Alg) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|own| own == alg)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A key left out of the set, and why (for logs and `doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey {
    pub kid: Option<String>,
    pub why: String,
}

#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
    skipped: Vec<SkippedKey>,
    /// Which of its issuer's key sets this is (set by the key cache): tokens verified with
    /// one generation are not reused from the token cache once another replaced it.
    generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksError(pub String);

impl fmt::Display for JwksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JwksError {}

impl KeySet {
    /// Parse a JWKS document. Fails only when the document itself is unusable (not JSON, no
    /// `keys` array); bad entries are skipped.
    pub fn parse(json: &[u8]) -> Result<KeySet, JwksError> {
        let doc: Value = serde_json::from_slice(json).map_err(|e| JwksError(format!("not a JSON document: {e}")))?;
        let entries = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwksError("not a JWKS: no `keys` array".into()))?;
        let mut set = KeySet::default();
        for entry in entries {
            let kid = entry.get("kid").and_then(Value::as_str).map(str::to_owned);
            match parse_key(entry) {
                Ok(mut key) => {
                    key.kid = kid;
                    set.keys.push(key);
                }
                Err(why) => set.skipped.push(SkippedKey { kid, why }),
            }
        }
        Ok(set)
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn with_generation(mut self, generation: u64) -> KeySet {
        self.generation = generation;
        self
    }

    pub fn skipped(&self) -> &[SkippedKey] {
        &self.skipped
    }

    /// The keys a token with this `kid` and `alg` may be verified with: the keys with that
    /// kid (a token without one: every key) whose type and own `alg` fit.
    pub fn candidates<'s>(&'s self, kid: Option<&'s str>, alg: Alg) -> impl Iterator<Item = &'s Key> + 's {
        self.keys
            .iter()
            .filter(move |k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)) && k.fits(alg))
    }

    /// The kids the issuer publishes (for descriptions and hints).
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().filter_map(|k| k.kid.as_deref()).collect()
    }
}

fn parse_key(jwk: &Value) -> Result<Key, String> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if let Some(usage) = jwk.get("use")
        && usage.as_str() != Some("sig")
    {
        return Err(format!("`use` is {usage}, not \"sig\""));
    }
    if let Some(ops) = jwk.get("key_ops") {
        let verifies = ops.as_array().is_some_and(|ops| ops.iter().any(|o| o == "verify"));
        if !verifies {
            return Err("`key_ops` does not include \"verify\"".into());
        }
    }
    let alg = match jwk.get("alg") {
        None => None,
        Some(Value::String(name)) => Some(
            Alg::from_name(name)
                .ok_or_else(|| format!("`alg` {name} is not a signature algorithm audgate verifies"))?,
        ),
        Some(other) => return Err(format!("`alg` is {other}, not a string")),
    };
    let b64 = |name: &str| -> Result<Vec<u8>, String> {
        let value = field(name).ok_or_else(|| format!("missing `{name}`"))?;
        URL_SAFE_NO_PAD
            .decode(value.trim_end_matches('='))
            .map_err(|_| format!("`{name}` is not base64url"))
    };
    let (kind, decoding) = match field("kty") {
        Some("RSA") => {
            let n = b64("n")?;
            let e = b64("e")?;
            let significant: Vec<u8> = n.iter().copied().skip_while(|&b| b == 0).collect();
            let n_bits = significant
                .first()
                .map_or(0, |&top| 8 * significant.len() - top.leading_zeros() as usize);
            if n_bits < 2048 {
                return Err(format!("RSA modulus of {n_bits} bits is under 2048"));
            }
            (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        Some("EC") => {
            let (kind, len) = match field("crv") {
                Some("P-256") => (KeyKind::EcP256, 32),
                Some("P-384") => (KeyKind::EcP384, 48),
                other => return Err(format!("EC curve {} is not supported", other.unwrap_or("(none)"))),
            };
            let (x, y) = (b64("x")?, b64("y")?);
            if x.len() != len || y.len() != len {
                return Err(format!("EC coordinates are not {len} bytes"));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (kind, DecodingKey::from_ec_der(&point))
        }
        Some("OKP") => {
            if field("crv") != Some("Ed25519") {
                return Err(format!(
                    "OKP curve {} is not supported",
                    field("crv").unwrap_or("(none)")
                ));
            }
            let x = b64("x")?;
            if x.len() != 32 {
                return Err("Ed25519 key is not 32 bytes".into());
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
        }
        Some(other) => {
            return Err(format!(
                "key type {other} is not a public signing key type audgate verifies"
            ));
        }
        None => return Err("missing `kty`".into()),
    };
    if let Some(alg) = alg
        && !kind.fits(alg)
    {
        return Err(format!("`alg` {alg} does not fit a {kind:?} key"));
    }
    Ok(Key {
        kid: None,
        alg,
        kind,
        decoding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const N_2048: &str = "qDi7Tx4DhNvPQsl1ofxxc2ePQFcs-L0mXYo6TGS64CY_2WmOtvYlcLNZjhuddZVV2X88m0MfwaSA16wE-RiKM9hqo5EY8BPXj57CMiYAyiHuQPp1yayjMgoE1P2jvp4eqF-BTillGJt5W5RuXti9uqfMtCQdagB8EC3MNRuU_KdeLgBy3lS3oo4LOYd-74kRBVZbk2wnmmb7IhP9OoLc1-7-9qU1uhpDxmE6JwBau0mDSwMnYDS4G_ML17dC-ZDtLd1i24STUw39KH0pcSdfFbL2NtEZdNeam1DDdk0iUtJSPZliUHJBI_pj8M-2Mn_oA8jBuI8YKwBqYkZCN1I95Q";

    #[test]
    fn bad_entries_are_skipped_not_fatal() {
        let doc = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "good", "alg": "RS256", "use": "sig", "n": N_2048, "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": N_2048, "e": "AQAB"},
            {"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": N_2048, "e": "AQAB"},
            {"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "WAT", "kid": "future"},
            "not even an object"
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids(), vec!["good"]);
        assert_eq!(set.skipped().len(), 7);
        assert_eq!(set.candidates(Some("good"), Alg::RS256).count(), 1);
        assert_eq!(
            set.candidates(Some("good"), Alg::PS256).count(),
            0,
            "the key's own alg must agree"
        );
        assert_eq!(set.candidates(None, Alg::ES256).count(), 0);
    }

    #[test]
    fn a_document_that_is_not_a_jwks_is_an_error() {
        assert!(KeySet::parse(b"<html>").is_err());
        assert!(KeySet::parse(b"{\"keys\": 1}").is_err());
        assert!(KeySet::parse(b"{\"keys\": []}").unwrap().keys().is_empty());
    }
}
