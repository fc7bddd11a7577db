//! The properties audgate's fuzz targets check, shared by the libFuzzer targets in
//! `fuzz/fuzz_targets/` and by `tests/adversarial.rs`, which replays every file of
//! `fuzz/corpus/<target>/` through the same functions as part of `cargo test`.
//!
//! Every target asserts: no panic (a panic is the finding), and never an allow unless the token
//! verifies under a configured key of its issuer. Fuzz input cannot forge a signature, so an
//! `allowed` decision must be backed by a signature that an independent check (aws-lc-rs
//! directly, not audgate's key selection) accepts under one of the fixed keys below.
//!
//! Input formats (seeds: `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`):
//! - `jwt`: the input is a token (UTF-8). An input starting with [`SIGN`] is instead
//!   `SIGN signer flip header-json 0xFF payload-json`: the JSON is signed with fixed key
//!   `signer`, the token checked, then checked again with signature byte `flip` changed.
//! - `evaluate`: fields separated by 0xFF (never in UTF-8): control bytes, method, host, path,
//!   route hint, token header JSON, token payload JSON, then header name / value pairs. The
//!   control bytes pick where a token signed from the two JSON fields goes (none,
//!   authorization, cookie, query, x-token, two sources), which key signs it, whether a
//!   signature byte is flipped, whether the route hint is sent.
//! - `config`: YAML text. `jwks`: a JWKS document.
//!
//! The private keys here are test fixtures published with the source: nothing trusts them.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use audgate::authz::{self, CheckInput, DefaultAction, Headers, Reason, TokenMemo, Verdict, VerifiedToken, jwt};
use audgate::config;
use audgate::jwks::KeySet;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self as sig, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// The clock every target decides at.
pub const NOW: i64 = 1_800_000_000;
pub const ISSUER: &str = "https://sso.example.com/realms/fuzz";
pub const PARTNER: &str = "https://partner.example.net";
/// An issuer whose keys never load: its tokens must be `keys_unavailable`, never allowed.
pub const DOWN: &str = "https://down.example.org";
/// First byte of a `jwt` input that asks for a token signed from fuzz-chosen JSON.
pub const SIGN: u8 = 0x01;
/// Field separator of `evaluate` inputs.
pub const SEP: u8 = 0xff;
/// Longest description a denial may carry: descriptions quote token values through
/// `jwt::printable` (64 characters each), so a long one echoes attacker-chosen text.
pub const MAX_DESCRIPTION: usize = 1024;

/// The policy the `evaluate` target decides with: every route feature, every token source,
/// claim headers from nested claims and the whole payload.
pub const CONFIG: &str = r#"
issuers:
  kc:
    issuer: https://sso.example.com/realms/fuzz
    issuer_aliases: [http://keycloak:8080/realms/fuzz]
    jwks_file: /dev/null
    algorithms: [RS256, PS256, ES256, EdDSA]
    leeway: 30s
  partner:
    issuer: https://partner.example.net
    jwks_file: /dev/null
    algorithms: [ES256]
    leeway: 0s
  down:
    issuer: https://down.example.org
    jwks_file: /dev/null
token:
  sources: [authorization, {cookie: at}, {query: access_token}, {header: x-token}]
  max_bytes: 8192
claim_headers:
  x-auth-subject: sub
  x-auth-issuer: iss
  x-auth-client-id: $client_id
  x-auth-claims: $payload
  x-auth-roles: realm_access.roles
  x-auth-email: email
  x-auth-tenant: org.tenant.id
routes:
  - name: health
    match: { path: /healthz }
    allow_anonymous: true
  - name: orders
    match: { hosts: [orders.example.com, "*.shop.example.com"], path_prefix: /api/orders, methods: [GET, POST] }
    issuers: [kc]
    client_ids: [orders-api]
    required_scopes: [orders:read]
  - name: legacy
    match: { path_regex: "/legacy/[0-9]+(/.*)?" }
    client_ids: [web-shop, account-console]
    client_id_claims: [aud, azp]
  - name: admin
    match: { path_prefix: /admin }
    issuers: [kc, partner]
    client_ids: [admin-ui]
    client_id_claims: [azp, client_id]
    required_roles: [admin, "admin-ui:editor"]
  - name: shadow
    match: { path_prefix: /shadow }
    client_ids: [nobody]
    mode: dry_run
  - name: partner
    match: { hosts: [partner.example.com] }
    issuers: [partner, down]
    client_ids: [partner-app]
    client_id_claims: [client_id]
default: deny
"#;

const EC_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBFpVtYbn3JE7y13gL/XT6jnZNAssPj1mxfTuLhbeZ3yhRANCAATS/5XGlUS7FqLC5jkA3CeER1EkfNf50+VsXrFQKt+GlJlTKwj0c8KckwPtWYyhLUPn/2N/3m06/LPkGjl+MKKz";
const PARTNER_EC_PKCS8: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgMxyCMjkynJRDMJtDfuevhW7ro0GgY/g3gwSLnhjsvTyhRANCAASS6ITPdMGU2cOQIfPpQ+jXvzCnGf/RreFX9zRtP0llMRKzbtVwngnW/+ijIUGgkKeNhdyuviDV8RNyNR5prdmU";
const RSA_PKCS8: &[&str] = &[
    "MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCwvTZCJfdU8lgCOnNw17g2XDz5GRl6IiPTJKgm23nDYY1g",
    "TyX6zv90fOLEqCdiHz8u59m0qvBF55Qa2PcRzIgE6iZnHjOGwZt/caCCYU+4jOVJx1d4E8KES9Fkd/AG9brPoWwOpSIIA/+U",
    "C2DB6vVeCyllqDYDsWvHr4dXpbJNl8VwgGvszcCKhRmTwZEkYjOm7fK0mfckpAoVnIGPfrklrP45cq5CVQHJjM4LGRMxs/94",
    "DadEubyQapHmR9toxALXpNNZJ1OUnmybWmPV7FHIXVmYDEw5tQhCuH8Aql598IQq7fyoycFSUW+tQqbe8EecFl4lDg+96gYl",
    "mvvT8OHDAgMBAAECggEAQq3oKhWz1hcmcBTIV/LzG4M6N8qp64O022SxkhNswXNtCMBjtlfhVfwF/Cbq0OC0EEjFwJ1bUCxa",
    "GrTvpgXx7VS/z1i8HOOvfGoMohP/pUN3ABpWnEVsNkh6g/qiEqYj6FDg+TeA+uAzTRHr281+7A+u+xz23/bQkIJfQAiSGCaB",
    "MmLVchb7jpW7FQdg5gSxJ05iBaeGXNl6s+L0vixVwH84qrOscRHXOIVAGulol49/2nUW3xaC8B7bvAhfwpZCrAo0G5FG39si",
    "IJGj/c7PiSBPB1hR82r13JERlPGuPT28Ey7vpqUsKIwy6J0aAEv4oyc1rJMzvk5TiWx9pS4SAQKBgQDinyGu7IpWI4hpktPH",
    "YXSUmCdHRDaHY/BsOHfePwhtyJfMZPiZQKn8h8oTOAoQe+HK+ReCwUJUSlz6hQTZb1FGC/nCJGzARa9ueJMkBnSVgQQfXQDR",
    "eeHNolUVgFjOUBSggZoISrJiojuDa3hdcP7NPm/YhGlckBUylJ+cnKF/wwKBgQDHpqKKhxGszhC7AxfbHC+2V9oa9pzzeT38",
    "6ChlHk7bpNgtvwqOTXWSYlq3IwkX6jcJCWwBbE5z+3eepjtP2Ej+cfcXwHqVyA+snoSA7N56CAREyjD2QYV9nAEXjTy+xtW7",
    "E2q2sz3nNDyBnwUS6HQZymGavv8YOcixi/XJEK72AQKBgQCrX9uBBK+4ZDaMX9R3OmOG22kYo6T4zcLKlAlRsCkXnFHu54x3",
    "mEb0CVvvHLm/rW8apzP4VV1rkLCvYlhAdcXoSrYc8p6q6Ae6asQawib3yBDuBs7PmnP/pXriP6Ton/Z5SojJLHOp0zVeNK9Z",
    "OlH1s/mwqrFipjLhhTMOpAQdMQKBgQCEDseSo5bgW4kbegdMig9RKDj+/sKAFWEYKSOXBv4YMKhBUg0UZU3wXpgsbMM2C1kN",
    "5CqJom8eLmZIDSJMRP67Nvy+vDUZX7RmdI+mi4b45taT/b13FY3LsOXUAzr74Z8717MNV/AJPzcKcfm0MQeii4gWCGHJT2dd",
    "cPtJXHyuAQKBgCARL7OvdHGQ9J8a99o+bVXcwRduv+Zr+/IXewjIzbCuXV0oO28uOGeYuY3Ev+4sLD47eorwR2CJtIe62xo8",
    "pQQpO/V22WEkldFxj0WnU+ksS2w2S+nZOTz0qIN0TX5xzp6Qk5NbrYG4Fp+CYY5W078khzzcCw+4u9t0XD65KpNQ",
];
const ED25519_SEED: [u8; 32] = [
    165, 59, 169, 252, 85, 166, 191, 228, 4, 148, 46, 58, 92, 26, 172, 168, 179, 107, 241, 162, 178, 0, 86, 216, 52,
    25, 44, 125, 116, 151, 19, 128,
];
const ATTACKER_SEED: [u8; 32] = [7; 32];

enum Material {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

/// A fixed private key and how tokens signed with it look.
pub struct Signer {
    pub kid: &'static str,
    pub alg: &'static str,
    /// The `iss` of the issuer that publishes it (`None`: published nowhere).
    pub issuer: Option<&'static str>,
    material: Arc<Material>,
}

impl Signer {
    pub fn sign(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &*self.material {
            Material::Rsa(pair) => {
                let padding: &dyn sig::RsaEncoding = if self.alg == "PS256" {
                    &sig::RSA_PSS_SHA256
                } else {
                    &sig::RSA_PKCS1_SHA256
                };
                let mut out = vec![0; pair.public_modulus_len()];
                pair.sign(padding, &rng, input, &mut out).expect("RSA signing");
                out
            }
            Material::Ec(pair) => pair.sign(&rng, input).expect("ECDSA signing").as_ref().to_vec(),
            Material::Ed(pair) => pair.sign(input).as_ref().to_vec(),
        }
    }

    /// `{alg, kid, typ: JWT}`.
    pub fn header(&self) -> Value {
        json!({"alg": self.alg, "kid": self.kid, "typ": "JWT"})
    }

    /// A compact JWS of exactly these header and payload bytes.
    pub fn token(&self, header: &[u8], payload: &[u8]) -> String {
        let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
        let signature = self.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    pub fn mint(&self, claims: &Value) -> String {
        self.token(self.header().to_string().as_bytes(), claims.to_string().as_bytes())
    }

    /// The public key as a JWK (`use: sig`).
    pub fn jwk(&self) -> Value {
        match &*self.material {
            Material::Rsa(pair) => {
                let public = pair.public_key();
                json!({
                    "kty": "RSA", "kid": self.kid, "use": "sig",
                    "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
                    "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero()),
                })
            }
            Material::Ec(pair) => {
                let point = pair.public_key().as_ref();
                json!({
                    "kty": "EC", "kid": self.kid, "alg": self.alg, "use": "sig", "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                })
            }
            Material::Ed(pair) => json!({
                "kty": "OKP", "kid": self.kid, "crv": "Ed25519", "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
            }),
        }
    }

    /// The bytes that identify the public key in a JWK: RSA `n`, EC / OKP `x`.
    fn public_id(&self) -> Vec<u8> {
        match &*self.material {
            Material::Rsa(pair) => pair.public_key().modulus().big_endian_without_leading_zero().to_vec(),
            Material::Ec(pair) => pair.public_key().as_ref()[1..33].to_vec(),
            Material::Ed(pair) => pair.public_key().as_ref().to_vec(),
        }
    }

    /// Verify with aws-lc-rs directly, under this signer's own algorithm.
    pub fn verifies(&self, input: &[u8], signature: &[u8]) -> bool {
        match &*self.material {
            Material::Rsa(pair) => {
                let algorithm: &dyn sig::VerificationAlgorithm = if self.alg == "PS256" {
                    &sig::RSA_PSS_2048_8192_SHA256
                } else {
                    &sig::RSA_PKCS1_2048_8192_SHA256
                };
                UnparsedPublicKey::new(algorithm, pair.public_key().as_ref())
                    .verify(input, signature)
                    .is_ok()
            }
            Material::Ec(pair) => UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref())
                .verify(input, signature)
                .is_ok(),
            Material::Ed(pair) => UnparsedPublicKey::new(&sig::ED25519, pair.public_key().as_ref())
                .verify(input, signature)
                .is_ok(),
        }
    }
}

/// The fixed policy, keys and signers every target uses.
pub struct Fixture {
    pub loaded: config::Loaded,
    /// Indexed like the policy's issuers: kc, partner, down (never loaded).
    pub keys: Vec<Option<Arc<KeySet>>>,
    /// kc: RS256, PS256 (the same RSA key), ES256, EdDSA; partner: ES256; an attacker's
    /// Ed25519 key published nowhere.
    pub signers: Vec<Signer>,
    /// One valid token per signer (claims for route `legacy`), for the `jwks` target.
    pub tokens: Vec<String>,
}

impl Fixture {
    pub fn policy(&self) -> &authz::Policy {
        &self.loaded.config.policy
    }

    pub fn signer(&self, selector: u8) -> &Signer {
        &self.signers[usize::from(selector) % self.signers.len()]
    }

    pub fn key_set(&self, id: usize) -> Option<Arc<KeySet>> {
        self.keys.get(id).cloned().flatten()
    }

    /// The kid of a fixed key of issuer `id` whose own verification accepts this token's
    /// signature under the `alg` its header names, or `None`.
    pub fn signed_by(&self, token: &str, id: usize) -> Option<&'static str> {
        let iss = &self.policy().issuers[id].issuer;
        let (input, signature) = token.rsplit_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(input.split('.').next()?).ok()?).ok()?;
        let alg = header.get("alg")?.as_str()?;
        self.signers
            .iter()
            .filter(|s| s.issuer == Some(iss.as_str()) && s.alg == alg)
            .find(|s| s.verifies(input.as_bytes(), &signature))
            .map(|s| s.kid)
    }
}

fn material_rsa() -> RsaKeyPair {
    let der = STANDARD.decode(RSA_PKCS8.concat()).expect("RSA key base64");
    RsaKeyPair::from_pkcs8(&der).expect("RSA key")
}

fn material_ec(b64: &str) -> EcdsaKeyPair {
    let der = STANDARD.decode(b64).expect("EC key base64");
    EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &der).expect("EC key")
}

/// Claims valid at [`NOW`] that route `legacy` allows.
pub fn good_claims(iss: &str) -> Value {
    json!({
        "iss": iss, "sub": "f1e2d3c4-0000-4000-8000-000000000001", "aud": "account", "azp": "web-shop",
        "typ": "Bearer", "exp": NOW + 300, "iat": NOW - 10, "nbf": NOW - 10, "jti": "fuzz-1",
        "scope": "openid orders:read", "client_id": "partner-app", "email": "alice@example.com",
        "realm_access": {"roles": ["admin", "user"]},
        "resource_access": {"admin-ui": {"roles": ["editor"]}},
        "org": {"tenant": {"id": "t-42"}},
    })
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rsa = Arc::new(Material::Rsa(material_rsa()));
        let signer = |kid, alg, issuer, material: &Arc<Material>| Signer {
            kid,
            alg,
            issuer,
            material: Arc::clone(material),
        };
        let ec = Arc::new(Material::Ec(material_ec(EC_PKCS8)));
        let ed = Arc::new(Material::Ed(
            Ed25519KeyPair::from_seed_unchecked(&ED25519_SEED).expect("Ed25519 key"),
        ));
        let partner = Arc::new(Material::Ec(material_ec(PARTNER_EC_PKCS8)));
        let attacker = Arc::new(Material::Ed(
            Ed25519KeyPair::from_seed_unchecked(&ATTACKER_SEED).expect("Ed25519 key"),
        ));
        let signers = vec![
            signer("fz-rsa", "RS256", Some(ISSUER), &rsa),
            signer("fz-rsa", "PS256", Some(ISSUER), &rsa),
            signer("fz-ec", "ES256", Some(ISSUER), &ec),
            signer("fz-ed", "EdDSA", Some(ISSUER), &ed),
            signer("fz-partner", "ES256", Some(PARTNER), &partner),
            signer("fz-attacker", "EdDSA", None, &attacker),
        ];
        let set = |jwks: Vec<Value>| {
            let doc = json!({"keys": jwks}).to_string();
            Some(Arc::new(KeySet::parse(doc.as_bytes()).expect("fixture JWKS")))
        };
        let keys = vec![
            set(vec![signers[0].jwk(), signers[2].jwk(), signers[3].jwk()]),
            set(vec![signers[4].jwk()]),
            None,
        ];
        let loaded = config::parse(CONFIG).unwrap_or_else(|e| panic!("fuzz config: {e:?}"));
        let tokens = signers
            .iter()
            .map(|s| s.mint(&good_claims(s.issuer.unwrap_or(ISSUER))))
            .collect();
        Fixture {
            loaded,
            keys,
            signers,
            tokens,
        }
    })
}

/// What every denial must look like: a deny reason, a bounded description without control
/// characters (it goes into logs and the `WWW-Authenticate` header).
pub fn check_denial(reason: Reason, description: &str, context: &str) {
    assert!(
        !matches!(reason, Reason::Allowed | Reason::Anonymous),
        "{context}: a denial with reason {reason}"
    );
    assert!(
        description.len() <= MAX_DESCRIPTION,
        "{context}: {reason} description of {} bytes: {:?}",
        description.len(),
        description.chars().take(200).collect::<String>()
    );
    assert!(
        !description.chars().any(char::is_control),
        "{context}: {reason} description carries a control character: {description:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// jwt: parse + verify
// ---------------------------------------------------------------------------------------------

pub fn jwt_target(data: &[u8]) {
    let f = fixture();
    match data.split_first() {
        Some((&SIGN, rest)) if rest.len() >= 2 => signed_case(f, rest[0], rest[1], &rest[2..]),
        _ => {
            if let Ok(token) = std::str::from_utf8(data) {
                check_token(f, token);
            }
        }
    }
}

fn signed_case(f: &Fixture, selector: u8, flip: u8, json_parts: &[u8]) {
    let signer = f.signer(selector);
    let default_header = signer.header().to_string();
    let (header, payload) = match json_parts.iter().position(|&b| b == SEP) {
        Some(i) if i > 0 => (&json_parts[..i], &json_parts[i + 1..]),
        Some(i) => (default_header.as_bytes(), &json_parts[i + 1..]),
        None => (default_header.as_bytes(), json_parts),
    };
    let token = signer.token(header, payload);
    let verified = check_token(f, &token);
    // the same token with one signature byte changed never verifies
    let (input, signature) = token.rsplit_once('.').expect("three parts");
    let mut signature = URL_SAFE_NO_PAD.decode(signature).expect("own base64");
    let at = usize::from(flip) % signature.len();
    signature[at] ^= 1 << (flip % 8);
    let tampered = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&signature));
    if let Some(Ok(_)) = check_token(f, &tampered) {
        panic!("a token with signature byte {at} changed verified: {tampered}");
    }
    if let Some(Err(reason)) = verified {
        // a signature made by the issuer's key is never called bad
        let own_key =
            signer.issuer == Some(ISSUER) && f.policy().issuers[0].algorithms.iter().any(|a| a.name() == signer.alg);
        let parsed = jwt::parse(&token).ok();
        let plain = parsed.is_some_and(|p| {
            p.claims.iss == ISSUER
                && p.header.kid.as_deref().is_none_or(|k| k == signer.kid)
                && p.header.alg == signer.alg
        });
        if own_key && plain {
            assert_ne!(
                reason,
                Reason::BadSignature,
                "a token the issuer's key signed was called bad_signature: {token}"
            );
        }
    }
}

/// Parse and verify `token` against the fixed keys of the issuer it names (kc when it names
/// none). `None` when it did not parse or its issuer has no keys.
pub fn check_token(f: &Fixture, token: &str) -> Option<Result<(), Reason>> {
    let parsed = match jwt::parse(token) {
        Ok(parsed) => parsed,
        Err(d) => {
            check_denial(d.reason, &d.description, "parse");
            return None;
        }
    };
    assert!(
        jwt::Alg::from_name(&parsed.header.alg).is_some(),
        "parse let alg {:?} through",
        parsed.header.alg
    );
    let policy = f.policy();
    let id = policy.issuer_by_iss(&parsed.claims.iss).unwrap_or(0);
    let issuer = &policy.issuers[id];
    let keys = f.key_set(id)?;
    match jwt::verify(parsed, id, issuer, &keys, NOW) {
        Ok(verified) => {
            let kid = f
                .signed_by(token, id)
                .unwrap_or_else(|| panic!("verified a token that no key of issuer {} signed: {token}", issuer.name));
            assert_eq!(
                verified.key_id(),
                Some(kid),
                "verified by another key than the signer's: {token}"
            );
            assert!(
                NOW < verified.claims().exp.saturating_add(issuer.leeway),
                "verified an expired token: {token}"
            );
            Some(Ok(()))
        }
        Err(d) => {
            check_denial(d.reason, &d.description, "verify");
            Some(Err(d.reason))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// evaluate + respond
// ---------------------------------------------------------------------------------------------

/// Where the `evaluate` target puts the token it signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    None,
    Authorization,
    Cookie,
    Query,
    Header,
    /// authorization and cookie, the same token.
    Twice,
    /// authorization with the token, cookie with the token whose signature byte is flipped.
    TwoDifferent,
}

impl Place {
    pub const ALL: [Place; 7] = [
        Place::None,
        Place::Authorization,
        Place::Cookie,
        Place::Query,
        Place::Header,
        Place::Twice,
        Place::TwoDifferent,
    ];
}

/// A request for the `evaluate` target, before encoding.
#[derive(Debug, Clone, Default)]
pub struct EvalCase {
    pub place: u8,
    pub signer: u8,
    /// 0: the signature as made; else flip a bit of byte `flip`.
    pub flip: u8,
    pub send_hint: bool,
    pub method: Vec<u8>,
    pub host: Vec<u8>,
    pub path: Vec<u8>,
    pub hint: Vec<u8>,
    pub token_header: Vec<u8>,
    pub token_payload: Vec<u8>,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

impl EvalCase {
    pub fn encode(&self) -> Vec<u8> {
        let control = vec![self.place, self.signer, self.flip, u8::from(self.send_hint)];
        let mut fields: Vec<&[u8]> = vec![
            &control,
            &self.method,
            &self.host,
            &self.path,
            &self.hint,
            &self.token_header,
            &self.token_payload,
        ];
        for (name, value) in &self.headers {
            fields.push(name);
            fields.push(value);
        }
        fields.join(&SEP)
    }

    pub fn decode(data: &[u8]) -> EvalCase {
        let mut fields = data.split(|&b| b == SEP);
        let mut next = || fields.next().unwrap_or_default().to_vec();
        let control = next();
        let at = |i: usize| control.get(i).copied().unwrap_or(0);
        let mut case = EvalCase {
            place: at(0),
            signer: at(1),
            flip: at(2),
            send_hint: at(3) & 1 == 1,
            method: next(),
            host: next(),
            path: next(),
            hint: next(),
            token_header: next(),
            token_payload: next(),
            headers: Vec::new(),
        };
        loop {
            let name = next();
            let value = next();
            if name.is_empty() && value.is_empty() {
                break;
            }
            case.headers.push((name, value));
        }
        case
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A token memo that remembers everything, to check that a cache hit decides the same.
#[derive(Default)]
struct MapMemo(RefCell<HashMap<String, VerifiedToken>>);

impl TokenMemo for MapMemo {
    fn get(&self, token: &str) -> Option<VerifiedToken> {
        self.0.borrow().get(token).cloned()
    }
    fn put(&self, token: &str, verified: &VerifiedToken) {
        self.0.borrow_mut().insert(token.to_owned(), verified.clone());
    }
}

pub fn evaluate_target(data: &[u8]) {
    let f = fixture();
    let case = EvalCase::decode(data);
    let mut headers: HashMap<String, String> = HashMap::new();
    let mut add = |name: String, value: String| {
        headers
            .entry(name)
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    };
    for (name, value) in &case.headers {
        add(text(name).to_ascii_lowercase(), text(value));
    }
    let mut path = text(&case.path);
    let place = Place::ALL[usize::from(case.place) % Place::ALL.len()];
    if place != Place::None && !case.token_payload.is_empty() {
        let signer = f.signer(case.signer);
        let header = if case.token_header.is_empty() {
            signer.header().to_string().into_bytes()
        } else {
            case.token_header.clone()
        };
        let mut token = signer.token(&header, &case.token_payload);
        let (input, signature) = token.rsplit_once('.').expect("three parts");
        let mut signature = URL_SAFE_NO_PAD.decode(signature).expect("own base64");
        let flipped = {
            let mut s = signature.clone();
            let at = usize::from(case.flip) % s.len();
            s[at] ^= 1 << (case.flip % 8);
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(s))
        };
        if case.flip != 0 {
            let at = usize::from(case.flip) % signature.len();
            signature[at] ^= 1 << (case.flip % 8);
            token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&signature));
        }
        match place {
            Place::None => {}
            Place::Authorization => add("authorization".into(), format!("Bearer {token}")),
            Place::Cookie => add("cookie".into(), format!("at={token}")),
            Place::Query => {
                path.push(if path.contains('?') { '&' } else { '?' });
                path.push_str("access_token=");
                path.push_str(&token);
            }
            Place::Header => add("x-token".into(), token),
            Place::Twice => {
                add("authorization".into(), format!("Bearer {token}"));
                add("cookie".into(), format!("at={token}"));
            }
            Place::TwoDifferent => {
                add("authorization".into(), format!("Bearer {token}"));
                add("cookie".into(), format!("at={flipped}"));
            }
        }
    }
    let method = text(&case.method);
    let host = text(&case.host);
    let hint = text(&case.hint);
    let input = CheckInput {
        method: &method,
        host: &host,
        path: &path,
        headers: Headers::Map(&headers),
        route_hint: case.send_hint.then_some(hint.as_str()),
    };
    check_request(f, &input);
}

/// Decide on one request and check every property of the decision and the response.
pub fn check_request(f: &Fixture, input: &CheckInput<'_>) {
    let policy = f.policy();
    let keys = |id| f.key_set(id);
    let d = authz::evaluate(policy, input, keys, NOW);
    let r = authz::respond(policy, &d);
    let extracted = authz::token::extract(&policy.token, input).ok();
    let context = format!(
        "{} {} {} hint {:?} -> {:?} {} ({})",
        input.method, input.host, input.path, input.route_hint, d.verdict, d.reason, d.description
    );
    match (d.verdict, d.reason) {
        (Verdict::Allow, Reason::Allowed) => {
            let route = d.route.expect("allowed without a route");
            assert!(!route.allow_anonymous, "{context}");
            let token = d.token.as_ref().expect("allowed without a verified token");
            let raw = extracted.as_deref().expect("allowed without a token in the request");
            let id = token.issuer();
            assert!(route.accepts_issuer(id), "{context}: issuer not accepted by the route");
            assert!(
                f.signed_by(raw, id).is_some(),
                "{context}: allowed a token no key of issuer {} signed: {raw}",
                policy.issuers[id].name
            );
            let claims = token.claims();
            assert!(
                NOW < claims.exp.saturating_add(policy.issuers[id].leeway),
                "{context}: expired"
            );
            let client_id = d.client_id.as_deref().expect("allowed without a client id");
            assert!(route.client_ids.iter().any(|c| c == client_id), "{context}");
            let named = route.client_id_claims.iter().any(|c| match c.name() {
                "aud" => claims.aud.iter().any(|a| a == client_id),
                "azp" => claims.azp.as_deref() == Some(client_id),
                _ => claims.client_id.as_deref() == Some(client_id),
            });
            assert!(
                named,
                "{context}: client id {client_id} is in none of the route's claims"
            );
            for scope in &route.required_scopes {
                let in_scope = claims.str("scope").split(' ').any(|s| s == scope);
                let in_scp = match claims.payload.get("scp") {
                    Some(Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(scope)),
                    Some(Value::String(s)) => s.split(' ').any(|s| s == scope),
                    _ => false,
                };
                assert!(in_scope || in_scp, "{context}: scope {scope} missing");
            }
            for condition in &route.required_claims {
                assert!(
                    condition.holds(&claims.payload),
                    "{context}: required claim {} does not hold",
                    condition.claim
                );
            }
            assert_eq!(r.status, 200, "{context}");
        }
        (Verdict::Allow, Reason::CorsPreflight) => {
            let route = d.route.expect("a preflight passed without a route");
            assert!(route.allow_cors_preflight, "{context}");
            assert!(authz::route::is_cors_preflight(input), "{context}: not a preflight");
            assert!(d.token.is_none() && r.upstream_headers.is_empty(), "{context}");
            assert_eq!(r.status, 200, "{context}");
        }
        (Verdict::Allow, Reason::Anonymous) => {
            match d.route {
                Some(route) => assert!(route.allow_anonymous, "{context}"),
                None => assert_eq!(policy.routes.default, DefaultAction::Allow, "{context}"),
            }
            assert!(d.token.is_none() && r.upstream_headers.is_empty(), "{context}");
            assert_eq!(r.status, 200, "{context}");
        }
        (Verdict::Allow, _) => panic!("{context}: allow with a denial reason"),
        (Verdict::DryRunDeny, reason) => {
            let route = d.route.expect("dry run without a route");
            assert_eq!(route.mode, authz::route::Mode::DryRun, "{context}");
            assert_eq!(r.status, 200, "{context}");
            check_denial(reason, &d.description, &context);
            if d.token.is_none() {
                assert!(
                    r.upstream_headers.is_empty(),
                    "{context}: claim headers without a verified token"
                );
            }
        }
        (Verdict::Deny, reason) => {
            check_denial(reason, &d.description, &context);
            assert_ne!(reason, Reason::KeysUnavailable, "{context}");
            assert_eq!(r.status, reason.http_status(), "{context}");
            assert!(r.upstream_headers.is_empty(), "{context}");
        }
        (Verdict::Error, reason) => {
            assert_eq!(reason, Reason::KeysUnavailable, "{context}");
            assert_eq!(r.status, 503, "{context}");
        }
    }
    // the response, whatever the decision
    assert_eq!(r.metadata.reason, d.reason.code(), "{context}");
    let configured: Vec<&str> = policy.claim_headers.iter().map(|h| h.name.as_str()).collect();
    let mut seen: Vec<&str> = r
        .upstream_headers
        .iter()
        .map(|(n, _)| *n)
        .chain(r.remove_headers.iter().copied())
        .collect();
    seen.sort_unstable();
    // ... and every other spelling of them (x_auth_subject) is removed
    let mut expected = configured.clone();
    expected.extend(policy.claim_header_spellings.iter().map(String::as_str));
    expected.sort_unstable();
    if r.status == 200 {
        assert_eq!(
            seen, expected,
            "{context}: every claim header is set or removed, once, and its other spellings removed"
        );
    }
    for (name, value) in &r.upstream_headers {
        assert!(
            !value.is_empty() && !value.chars().any(char::is_control),
            "{context}: claim header {name} = {value:?}"
        );
    }
    for (name, value) in &r.client_headers {
        assert!(
            value.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "{context}: client header {name} = {value:?} is not visible ASCII"
        );
    }
    if r.status != 200 {
        let body: Value = serde_json::from_str(&r.body).expect("deny body is JSON");
        assert_eq!(body["error"], d.reason.code(), "{context}");
    }
    if let Some(raw) = extracted.as_deref().filter(|t| t.len() > 64) {
        assert!(
            !d.description.contains(raw),
            "{context}: the description carries the token"
        );
        assert!(!r.body.contains(raw), "{context}: the body carries the token");
    }
    // `audgate explain --no-verify`: every check but the signature, so never stricter
    let unsigned = authz::evaluate_without_signature(policy, input, NOW);
    if d.reason == Reason::Allowed {
        assert_eq!(
            unsigned.reason,
            Reason::Allowed,
            "{context}: --no-verify denied what verifying allowed"
        );
    }
    // the debug log's hints must not panic either
    let keys_of_issuer = d.issuer.and_then(|i| f.key_set(i));
    let _ = authz::hint::hints(policy, &d, extracted.as_deref(), keys_of_issuer.as_deref());
    // a remembered token decides exactly like a fresh one
    let memo = MapMemo::default();
    let first = authz::evaluate_with_memo(policy, input, keys, &memo, NOW);
    let second = authz::evaluate_with_memo(policy, input, keys, &memo, NOW);
    for other in [&first, &second] {
        assert_eq!(
            (
                other.verdict,
                other.reason,
                other.route_name(),
                other.client_id.as_deref()
            ),
            (d.verdict, d.reason, d.route_name(), d.client_id.as_deref()),
            "{context}: the token memo changed the decision"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------------------------

pub fn config_target(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(loaded) = config::parse(&text) else {
        return;
    };
    let _ = audgate::summary::render(std::path::Path::new("fuzz.yaml"), &loaded);
    // with no keys loaded, nothing but an anonymous route or default allow can pass
    let policy = &loaded.config.policy;
    let f = fixture();
    let token = &f.tokens[2];
    let mut headers = HashMap::new();
    headers.insert("authorization".to_owned(), format!("Bearer {token}"));
    headers.insert("cookie".to_owned(), format!("at={token}"));
    for (host, path) in [
        ("orders.example.com", "/api/orders/1?access_token=x"),
        ("a", "/"),
        ("", ""),
    ] {
        let input = CheckInput {
            method: "GET",
            host,
            path,
            headers: Headers::Map(&headers),
            route_hint: None,
        };
        let d = authz::evaluate(policy, &input, |_| None, NOW);
        assert_ne!(d.reason, Reason::Allowed, "allowed with no keys loaded");
        let _ = authz::respond(policy, &d);
    }
}

// ---------------------------------------------------------------------------------------------
// jwks
// ---------------------------------------------------------------------------------------------

pub fn jwks_target(data: &[u8]) {
    let Ok(set) = KeySet::parse(data) else {
        return;
    };
    let f = fixture();
    let everything = jwt::Issuer {
        name: "fuzz".into(),
        issuer: ISSUER.into(),
        aliases: Vec::new(),
        algorithms: jwt::Alg::ALL.to_vec(),
        leeway: 0,
    };
    for alg in jwt::Alg::ALL {
        for key in set.candidates(None, alg) {
            assert!(key.fits(alg), "candidate {key:?} does not fit {alg}");
        }
    }
    let doc: Value = serde_json::from_slice(data).expect("parsed once already");
    for (signer, token) in f.signers.iter().zip(&f.tokens) {
        let Ok(parsed) = jwt::parse(token) else {
            panic!("fixture token does not parse");
        };
        if jwt::verify(parsed, 0, &everything, &set, NOW).is_ok() {
            let published = doc["keys"].as_array().into_iter().flatten().any(|jwk| {
                let id_field = if jwk["kty"] == "RSA" { "n" } else { "x" };
                let usable_use = jwk.get("use").is_none_or(|u| u == "sig");
                let usable_ops = jwk
                    .get("key_ops")
                    .is_none_or(|ops| ops.as_array().is_some_and(|o| o.iter().any(|op| op == "verify")));
                let material = jwk[id_field]
                    .as_str()
                    .and_then(|v| URL_SAFE_NO_PAD.decode(v.trim_end_matches('=')).ok())
                    .map(|bytes| bytes.into_iter().skip_while(|&b| b == 0).collect::<Vec<_>>());
                usable_use && usable_ops && material.as_deref() == Some(signer.public_id().as_slice())
            });
            assert!(
                published,
                "a token of key {} ({}) verified under a JWKS that does not publish it as a signing key",
                signer.kid, signer.alg
            );
        }
    }
}

/// Target `path`: the input (UTF-8, lossy) is a request path. Its normalized form holds what
/// SPEC.md promises ([`authz::path::is_normalized`]: starts with `/`, no `//`, no dot segment,
/// no encoded unreserved character), normalizing it again changes nothing, and route matching
/// sees that form whatever the spelling: a path whose normalized form is under `/strict` never
/// selects the anonymous `/public` route of [`PATH_CONFIG`].
pub fn path_target(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let raw = raw.split(['?', '#']).next().unwrap_or_default();
    let once = authz::path::normalize(raw);
    assert!(authz::path::is_normalized(&once), "{raw:?} -> {once:?}");
    assert_eq!(authz::path::normalize(&once), once, "normalizing {raw:?} twice");
    let headers = HashMap::new();
    let input = CheckInput {
        method: "GET",
        host: "shop.example.com",
        path: raw,
        headers: Headers::Map(&headers),
        route_hint: None,
    };
    let policy = path_policy();
    let selected = match policy.routes.select(&input) {
        authz::Selected::Route(r) => Some(r.name.as_str()),
        authz::Selected::NoRoute { .. } => None,
    };
    if once.starts_with("/strict") {
        assert_eq!(selected, Some("strict"), "{raw:?} (normalized {once:?})");
    }
    if selected == Some("public") {
        assert!(
            once.starts_with("/public"),
            "{raw:?} (normalized {once:?}) chose public"
        );
    }
}

/// An anonymous `/public` route before a protected `/strict` one, `default: allow`.
pub const PATH_CONFIG: &str = r#"
issuers:
  kc: {issuer: "https://sso.example.com/realms/fuzz", jwks_file: /dev/null}
routes:
  - {name: public, match: {path_prefix: /public}, allow_anonymous: true}
  - {name: strict, match: {path_prefix: /strict}, client_ids: [api]}
default: allow
"#;

fn path_policy() -> &'static authz::Policy {
    static POLICY: OnceLock<authz::Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        config::parse(PATH_CONFIG)
            .unwrap_or_else(|e| panic!("PATH_CONFIG: {e:?}"))
            .config
            .policy
    })
}
