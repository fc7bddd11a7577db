//! Adversarial tokens and requests: what an attacker (or a broken issuer) sends, and the reason
//! code each must get (SPEC.md "Decisions"). Most cases go through the decision core with a
//! fixed clock; the ones where the transport matters (header injection, two tokens, huge
//! headers, jku/x5u never fetched, message and stream limits, slow clients) go through the real
//! binary's gRPC and HTTP ports. The fuzz corpus (fuzz/corpus/*) is replayed through the fuzz
//! targets' properties (fuzz/src/props.rs) here too, so `cargo test` runs every seed and
//! every input a fuzzing run kept. docs/security.md has the table.
//!
//! A test named `bug_*` and marked `#[ignore]` reproduces a bug that is not fixed yet: it
//! asserts the right behaviour and fails today.

mod common;
#[path = "../fuzz/src/props.rs"]
mod props;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use audgate::authz::{self, CheckInput, Reason, Verdict};
use audgate::config::{self, Loaded};
use audgate::jwks::KeySet;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::{
    Audgate, CheckCall, CheckKind, GrpcAuthz, IssuerServer, TestKey, b64url, hs256_jws, jwks, keycloak_claims, merge,
    unsigned_jws,
};
use serde_json::{Value, json};

const KC: &str = "https://sso.example.com/realms/shop";
const OTHER: &str = "https://other.example.com";
/// The core's fixed clock.
const NOW: i64 = 1_800_000_000;
const MAX_BYTES: usize = 16384;

const CONFIG: &str = r#"
issuers:
  kc:
    issuer: https://sso.example.com/realms/shop
    jwks_file: /dev/null
    algorithms: [RS256, ES256]
    leeway: 30s
  other:
    issuer: https://other.example.com
    jwks_file: /dev/null
token:
  sources: [authorization, {cookie: at}]
  max_bytes: 16384
claim_headers:
  x-auth-subject: sub
  x-auth-issuer: iss
  x-auth-client-id: $client_id
  x-auth-roles: realm_access.roles
  x-auth-email: email
routes:
  - name: aud
    match: { path_prefix: /aud }
    client_ids: [my-app]
  - name: roles
    match: { path_prefix: /roles }
    client_ids: [my-app]
    client_id_claims: [azp]
    required_roles: [admin]
  - name: app
    match: { path_prefix: / }
    client_ids: [my-app]
    client_id_claims: [aud, azp]
default: deny
"#;

// ---------------------------------------------------------------------------------------------
// The core, with a table of what each case got
// ---------------------------------------------------------------------------------------------

/// What one decision came to.
#[derive(Debug)]
struct Outcome {
    verdict: Verdict,
    reason: Reason,
    description: String,
    status: u16,
    upstream: HashMap<String, String>,
    removed: Vec<String>,
}

struct Core {
    loaded: Loaded,
    keys: Vec<Option<Arc<KeySet>>>,
}

impl Core {
    fn new(keys: Vec<Value>) -> Core {
        let loaded = config::parse(CONFIG).unwrap_or_else(|e| panic!("config: {e:?}"));
        let keys = keys
            .into_iter()
            .map(|doc| Some(Arc::new(KeySet::parse(doc.to_string().as_bytes()).expect("JWKS"))))
            .collect();
        Core { loaded, keys }
    }

    fn decide(&self, path: &str, headers: &[(&str, String)]) -> Outcome {
        let mut map: HashMap<String, String> = HashMap::new();
        for (name, value) in headers {
            map.entry((*name).to_owned())
                .and_modify(|v| {
                    v.push(',');
                    v.push_str(value);
                })
                .or_insert_with(|| value.clone());
        }
        let input = CheckInput {
            method: "GET",
            host: "api.example.com",
            path,
            headers: audgate::authz::Headers::Map(&map),
            route_hint: None,
        };
        let policy = &self.loaded.config.policy;
        let d = authz::evaluate(policy, &input, |id| self.keys.get(id).cloned().flatten(), NOW);
        let r = authz::respond(policy, &d);
        Outcome {
            verdict: d.verdict,
            reason: d.reason,
            description: d.description.clone(),
            status: r.status,
            upstream: r
                .upstream_headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.to_string()))
                .collect(),
            removed: r.remove_headers.iter().map(|h| (*h).to_owned()).collect(),
        }
    }

    fn bearer(&self, path: &str, token: &str) -> Outcome {
        self.decide(path, &[("authorization", format!("Bearer {token}"))])
    }
}

/// Collects cases and their outcomes; fails with the whole table when any case got another
/// reason than expected (run with `--nocapture` to see the table of a passing run).
struct Table {
    group: &'static str,
    rows: Vec<(String, Reason, Reason, String)>,
}

impl Table {
    fn new(group: &'static str) -> Table {
        Table {
            group,
            rows: Vec::new(),
        }
    }

    fn expect(&mut self, case: &str, expected: Reason, out: &Outcome) {
        if matches!(expected, Reason::Allowed) {
            assert_eq!(out.verdict, Verdict::Allow, "{case}: {out:?}");
        } else {
            assert_ne!(out.verdict, Verdict::Allow, "{}: {case}: ALLOWED: {out:?}", self.group);
            props::check_denial(out.reason, &out.description, case);
            assert_eq!(out.status, out.reason.http_status(), "{case}");
        }
        self.rows
            .push((case.to_owned(), expected, out.reason, out.description.clone()));
    }

    fn finish(self) {
        let mut text = String::new();
        let mut wrong = 0;
        for (case, expected, got, description) in &self.rows {
            let mark = if expected == got { "ok " } else { "BAD" };
            wrong += usize::from(expected != got);
            let _ = writeln!(text, "{mark} | {case} | {expected} | {got} | {description}");
        }
        println!("== {}\n{text}", self.group);
        assert_eq!(
            wrong, 0,
            "{}: {wrong} case(s) got the wrong reason:\n{text}",
            self.group
        );
    }
}

struct Fixture {
    core: Core,
    rsa: TestKey,
    ec: TestKey,
    other: TestKey,
    attacker: TestKey,
}

fn fixture() -> Fixture {
    let rsa = TestKey::rsa("k1");
    let ec = TestKey::ec("e1");
    let other = TestKey::rsa("o1");
    let attacker = TestKey::rsa("attacker");
    let core = Core::new(vec![jwks(&[&rsa, &ec]), jwks(&[&other])]);
    Fixture {
        core,
        rsa,
        ec,
        other,
        attacker,
    }
}

/// A Keycloak token for `my-app` (aud "account", azp "my-app"), valid at [`NOW`].
fn claims(patch: Value) -> Value {
    let base = merge(
        keycloak_claims(KC, "my-app"),
        json!({"iat": NOW - 10, "exp": NOW + 300, "sub": "alice-id"}),
    );
    merge(base, patch)
}

/// `header.payload.signature` from raw header and payload bytes, signed by `key`.
fn raw_token(key: &TestKey, header: &[u8], payload: &[u8]) -> String {
    let input = format!("{}.{}", b64url(header), b64url(payload));
    let signature = key.sign_bytes(input.as_bytes());
    format!("{input}.{}", b64url(signature))
}

/// The same token with another signature.
fn with_signature(token: &str, signature: &[u8]) -> String {
    let (input, _) = token.rsplit_once('.').expect("three parts");
    format!("{input}.{}", b64url(signature))
}

fn signature_of(token: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(token.rsplit_once('.').expect("three parts").1)
        .expect("base64url")
}

#[test]
fn alg_none_and_algorithms_outside_the_allow_list() {
    let f = fixture();
    let c = claims(json!({}));
    let good = f.rsa.mint(c.clone());
    let mut t = Table::new("alg");
    for alg in ["none", "None", "NONE", "nOnE"] {
        let token = unsigned_jws(&json!({"alg": alg, "typ": "JWT", "kid": "k1"}), &c);
        t.expect(
            &format!("alg {alg}, empty signature"),
            Reason::UnsupportedAlg,
            &f.core.bearer("/", &token),
        );
    }
    let none_with_sig = with_signature(
        &unsigned_jws(&json!({"alg": "none", "kid": "k1"}), &c),
        &signature_of(&good),
    );
    t.expect(
        "alg none with a real signature",
        Reason::UnsupportedAlg,
        &f.core.bearer("/", &none_with_sig),
    );
    let ps = f.rsa.sign(&json!({"alg": "PS256", "kid": "k1"}), &c);
    t.expect(
        "PS256: supported, not on the issuer's list",
        Reason::UnsupportedAlg,
        &f.core.bearer("/", &ps),
    );
    let spaced = f.rsa.sign(&json!({"alg": "RS256 ", "kid": "k1"}), &c);
    t.expect("alg \"RS256 \"", Reason::UnsupportedAlg, &f.core.bearer("/", &spaced));
    let lower = f.rsa.sign(&json!({"alg": "rs256", "kid": "k1"}), &c);
    t.expect("alg \"rs256\"", Reason::UnsupportedAlg, &f.core.bearer("/", &lower));
    let no_alg = f.rsa.sign(&json!({"kid": "k1"}), &c);
    t.expect("no alg", Reason::MalformedToken, &f.core.bearer("/", &no_alg));
    let array_alg = f.rsa.sign(&json!({"alg": ["RS256"], "kid": "k1"}), &c);
    t.expect(
        "alg is an array",
        Reason::MalformedToken,
        &f.core.bearer("/", &array_alg),
    );
    // ES256 header on an RSA key's kid, and the other way round
    let es_on_rsa = f.rsa.sign(&json!({"alg": "ES256", "kid": "k1"}), &c);
    t.expect(
        "ES256 naming the RSA key's kid",
        Reason::UnknownKid,
        &f.core.bearer("/", &es_on_rsa),
    );
    let rs_on_ec = f.ec.sign(&json!({"alg": "RS256", "kid": "e1"}), &c);
    t.expect(
        "RS256 naming the EC key's kid",
        Reason::UnknownKid,
        &f.core.bearer("/", &rs_on_ec),
    );
    t.finish();
}

/// DER `SEQUENCE`/`INTEGER`/... with a definite length.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|&b| b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

/// SubjectPublicKeyInfo DER for a PKCS#1 RSAPublicKey.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    let algorithm = der(
        0x30,
        &[
            &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01][..],
            &[0x05, 0x00][..],
        ]
        .concat(),
    );
    let bits = der(0x03, &[&[0u8][..], pkcs1].concat());
    der(0x30, &[algorithm, bits].concat())
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[test]
fn hs256_signed_with_the_rsa_public_key() {
    let f = fixture();
    let c = claims(json!({}));
    let pkcs1 = f.rsa.public_key_bytes();
    let spki = rsa_spki(&pkcs1);
    let jwk = f.rsa.jwk();
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("PKCS#1 DER", pkcs1.clone()),
        ("SubjectPublicKeyInfo DER", spki.clone()),
        ("PEM PUBLIC KEY", pem("PUBLIC KEY", &spki).into_bytes()),
        (
            "PEM PUBLIC KEY without the last newline",
            pem("PUBLIC KEY", &spki).trim_end().as_bytes().to_vec(),
        ),
        ("PEM RSA PUBLIC KEY", pem("RSA PUBLIC KEY", &pkcs1).into_bytes()),
        ("JWK n bytes", n),
        ("JWK n text", jwk["n"].as_str().unwrap().as_bytes().to_vec()),
        ("JWK JSON", jwk.to_string().into_bytes()),
        ("EC point", f.ec.public_key_bytes()),
    ];
    let mut t = Table::new("HS256 key confusion");
    for (what, secret) in secrets {
        for kid in [Some("k1"), None] {
            let header = match kid {
                Some(kid) => json!({"alg": "HS256", "typ": "JWT", "kid": kid}),
                None => json!({"alg": "HS256", "typ": "JWT"}),
            };
            let token = hs256_jws(&secret, &header, &c);
            let case = format!("HS256, secret = {what}, kid {kid:?}");
            t.expect(&case, Reason::UnsupportedAlg, &f.core.bearer("/", &token));
        }
    }
    for alg in ["HS384", "HS512"] {
        let token = hs256_jws(&pkcs1, &json!({"alg": alg, "kid": "k1"}), &c);
        t.expect(
            &format!("{alg} (HMAC), PKCS#1 DER"),
            Reason::UnsupportedAlg,
            &f.core.bearer("/", &token),
        );
    }
    t.finish();
}

#[test]
fn kids_of_other_issuers_and_keys_named_in_the_header() {
    let f = fixture();
    let c = claims(json!({}));
    let mut t = Table::new("kid and key headers");
    let cross = f.other.sign(&json!({"alg": "RS256", "kid": "o1"}), &c);
    t.expect(
        "other issuer's key and kid, iss = kc",
        Reason::UnknownKid,
        &f.core.bearer("/", &cross),
    );
    let cross_kid = f.other.sign(&json!({"alg": "RS256", "kid": "k1"}), &c);
    t.expect(
        "other issuer's key under kc's kid",
        Reason::BadSignature,
        &f.core.bearer("/", &cross_kid),
    );
    let kc_key_other_iss = f.rsa.mint(claims(json!({"iss": OTHER})));
    t.expect(
        "kc's key, iss = other issuer",
        Reason::UnknownKid,
        &f.core.bearer("/", &kc_key_other_iss),
    );
    let kc_key_other_iss_nokid = f.rsa.sign(&json!({"alg": "RS256"}), &claims(json!({"iss": OTHER})));
    t.expect(
        "kc's key, iss = other issuer, no kid",
        Reason::BadSignature,
        &f.core.bearer("/", &kc_key_other_iss_nokid),
    );

    let a = &f.attacker;
    let attacker_jwk = a.jwk();
    let attacker_der = STANDARD.encode(a.public_key_bytes());
    let headers = [
        (
            "jku to the attacker's JWKS, attacker kid",
            json!({"alg": "RS256", "kid": "attacker", "jku": "https://attacker.example/jwks.json"}),
            Reason::UnknownKid,
        ),
        (
            "jku, kc's kid",
            json!({"alg": "RS256", "kid": "k1", "jku": "https://attacker.example/jwks.json"}),
            Reason::BadSignature,
        ),
        (
            "embedded jwk, attacker kid",
            json!({"alg": "RS256", "kid": "attacker", "jwk": attacker_jwk}),
            Reason::UnknownKid,
        ),
        (
            "embedded jwk, kc's kid",
            json!({"alg": "RS256", "kid": "k1", "jwk": attacker_jwk}),
            Reason::BadSignature,
        ),
        (
            "embedded jwk carrying kid k1, no header kid",
            json!({"alg": "RS256", "jwk": merge(attacker_jwk.clone(), json!({"kid": "k1"}))}),
            Reason::BadSignature,
        ),
        (
            "x5u, attacker kid",
            json!({"alg": "RS256", "kid": "attacker", "x5u": "https://attacker.example/cert.pem"}),
            Reason::UnknownKid,
        ),
        (
            "x5c, kc's kid",
            json!({"alg": "RS256", "kid": "k1", "x5c": [attacker_der]}),
            Reason::BadSignature,
        ),
        (
            "x5c, no kid",
            json!({"alg": "RS256", "x5c": [attacker_der]}),
            Reason::BadSignature,
        ),
        (
            "x5t#S256 and x5t naming nothing",
            json!({"alg": "RS256", "kid": "k1", "x5t": "AAAA", "x5t#S256": "AAAA"}),
            Reason::BadSignature,
        ),
    ];
    for (what, header, expected) in headers {
        let token = a.sign(&header, &c);
        t.expect(what, expected, &f.core.bearer("/", &token));
    }
    let kid_crlf = f.rsa.sign(&json!({"alg": "RS256", "kid": "k1\r\n"}), &c);
    t.expect("kid \"k1\\r\\n\"", Reason::UnknownKid, &f.core.bearer("/", &kid_crlf));
    let kid_number = f.rsa.sign(&json!({"alg": "RS256", "kid": 1}), &c);
    t.expect(
        "kid is a number",
        Reason::MalformedToken,
        &f.core.bearer("/", &kid_number),
    );
    t.finish();
}

#[test]
fn crit_headers_are_refused() {
    let f = fixture();
    let c = claims(json!({}));
    let mut t = Table::new("crit");
    for (what, header) in [
        (
            "crit [exp]",
            json!({"alg": "RS256", "kid": "k1", "crit": ["exp"], "exp": 1}),
        ),
        (
            "crit [] (RFC 7515: must not be empty)",
            json!({"alg": "RS256", "kid": "k1", "crit": []}),
        ),
        (
            "crit [b64], b64 false",
            json!({"alg": "RS256", "kid": "k1", "crit": ["b64"], "b64": false}),
        ),
        ("crit not an array", json!({"alg": "RS256", "kid": "k1", "crit": "exp"})),
        ("crit null", json!({"alg": "RS256", "kid": "k1", "crit": null})),
    ] {
        t.expect(
            what,
            Reason::MalformedToken,
            &f.core.bearer("/", &f.rsa.sign(&header, &c)),
        );
    }
    t.finish();
}

#[test]
fn keys_that_must_not_verify() {
    let rsa = TestKey::rsa("k1");
    let token = rsa.mint(claims(json!({})));
    let mut t = Table::new("unusable keys");
    let variants = [
        ("use: enc", json!({"use": "enc"})),
        ("key_ops [encrypt]", json!({"use": null, "key_ops": ["encrypt"]})),
        ("key_ops [sign] (no verify)", json!({"use": null, "key_ops": ["sign"]})),
        ("alg RSA-OAEP", json!({"alg": "RSA-OAEP"})),
        ("alg RS384 on an RS256 token", json!({"alg": "RS384"})),
        ("kty oct", json!({"kty": "oct", "k": "c2VjcmV0"})),
        ("kty EC with RSA members", json!({"kty": "EC"})),
    ];
    for (what, patch) in variants {
        let core = Core::new(vec![json!({"keys": [merge(rsa.jwk(), patch)]}), jwks(&[])]);
        t.expect(what, Reason::UnknownKid, &core.bearer("/", &token));
    }
    // the same key published twice, once for encryption: the signing copy verifies
    let twice = Core::new(vec![
        json!({"keys": [merge(rsa.jwk(), json!({"use": "enc"})), rsa.jwk()]}),
        jwks(&[]),
    ]);
    t.expect(
        "enc and sig copies of one key",
        Reason::Allowed,
        &twice.bearer("/", &token),
    );
    // RSA under 2048 bits: a real 1024-bit key and the token it signed (made with openssl)
    let small = Core::new(vec![
        json!({"keys": [{"kty": "RSA", "kid": "small", "use": "sig", "n": SMALL_RSA_N, "e": "AQAB"}]}),
        jwks(&[]),
    ]);
    t.expect(
        "RSA 1024-bit key in the JWKS",
        Reason::UnknownKid,
        &small.bearer("/", SMALL_RSA_TOKEN),
    );
    t.finish();
}

/// A 1024-bit RSA modulus and a token its private key signed (kid `small`, iss kc, aud and
/// azp `my-app`, exp 2100-01-01): keys under 2048 bits must be skipped, never verify.
const SMALL_RSA_N: &str = "uw06E9-niO8OCV0berOzISD__GFeDX_6Z5S2G0BDv2U2In5KEOMllQ-I5XYk8bjq0ONxnnpwX3KM_opjuzw17KKc_laXMtJprvWVG2hJxt0ahnDVJvA8Minsw5xnjZRHUP0ZgARJ-ZHFbra5914Qt2SF-Y5hiwRMwDTH8r6d6F8";
const SMALL_RSA_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InNtYWxsIiwidHlwIjoiSldUIn0.eyJpc3MiOiJodHRwczovL3Nzby5leGFtcGxlLmNvbS9yZWFsbXMvc2hvcCIsImF1ZCI6Im15LWFwcCIsImF6cCI6Im15LWFwcCIsInN1YiI6InNtYWxsLWtleS11c2VyIiwidHlwIjoiQmVhcmVyIiwiZXhwIjo0MTAyNDQ0ODAwLCJpYXQiOjE3MDAwMDAwMDB9.JBHo36AAwqzGnSvlRy6hYEWvd72KuYHuTexlofiS-MwxtlBqlaJ-K-Y36Ja40KGi86vnvXUxTprkhV11VdScMYx3EbySzITeSHsXDvKZHpTpQU-sXfU7h5ciPe35zcjULpsujUTnqmQEvgfVw2SQQh7jjaY1ZEJY7qy3v_1qqzw";

/// A 2047-bit modulus (256 bytes, top byte 0x7f): under 2048 bits, so it must be skipped
/// (`unknown_kid`). audgate counts whole bytes and keeps it; verification then fails anyway
/// (aws-lc refuses moduli under 2048 bits), so no such key can ever verify: the reason is
/// wrong, not the decision.
#[test]
fn bug_rsa_modulus_just_under_2048_bits_is_not_skipped() {
    let rsa = TestKey::rsa("k1");
    let token = rsa.mint(claims(json!({})));
    let mut n = vec![0xffu8; 256];
    n[0] = 0x7f;
    let core = Core::new(vec![
        json!({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "n": b64url(&n), "e": "AQAB"}]}),
        jwks(&[]),
    ]);
    let set = KeySet::parse(
        json!({"keys": [{"kty": "RSA", "kid": "k1", "n": b64url(&n), "e": "AQAB"}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert!(set.keys().is_empty(), "a 2047-bit RSA key was kept: {:?}", set.keys());
    assert_eq!(core.bearer("/", &token).reason, Reason::UnknownKid);
}

/// P-256's group order n.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc, 0xe6, 0xfa,
    0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// `a - b` for 32-byte big-endian numbers with a >= b.
fn sub256(a: &[u8; 32], b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(a[i]) - i16::from(b[i]) - borrow;
        borrow = 0;
        if d < 0 {
            d += 256;
            borrow = 1;
        }
        out[i] = d as u8;
    }
    out
}

/// An ECDSA `r || s` signature as DER `SEQUENCE { INTEGER r, INTEGER s }`.
fn ecdsa_der(fixed: &[u8]) -> Vec<u8> {
    let int = |x: &[u8]| {
        let trimmed: Vec<u8> = x.iter().copied().skip_while(|&b| b == 0).collect();
        let mut v = if trimmed.first().is_some_and(|&b| b >= 0x80) {
            vec![0]
        } else {
            Vec::new()
        };
        v.extend(trimmed);
        der(0x02, &v)
    };
    der(0x30, &[int(&fixed[..32]), int(&fixed[32..])].concat())
}

#[test]
fn malformed_ecdsa_signatures() {
    let f = fixture();
    let token = f.ec.mint(claims(json!({})));
    let good = signature_of(&token);
    assert_eq!(good.len(), 64);
    let (r, s) = (&good[..32], &good[32..]);
    let cat = |a: &[u8], b: &[u8]| [a, b].concat();
    let n = &P256_N[..];
    let zero = [0u8; 32];
    let mut one = [0u8; 32];
    one[31] = 1;
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        ("r = s = 0 (CVE-2022-21449)", vec![0; 64], Reason::BadSignature),
        ("r = 0", cat(&zero, s), Reason::BadSignature),
        ("s = 0", cat(r, &zero), Reason::BadSignature),
        ("r = s = n", cat(n, n), Reason::BadSignature),
        ("r = n", cat(n, s), Reason::BadSignature),
        ("s = n", cat(r, n), Reason::BadSignature),
        ("r = s = 1", cat(&one, &one), Reason::BadSignature),
        ("all 0xff", vec![0xff; 64], Reason::BadSignature),
        ("r = n - 1", cat(&sub256(&P256_N, &one), s), Reason::BadSignature),
        ("63 bytes", good[..63].to_vec(), Reason::BadSignature),
        ("65 bytes", cat(&good, &[0]), Reason::BadSignature),
        ("r only", r.to_vec(), Reason::BadSignature),
        ("empty", Vec::new(), Reason::BadSignature),
        ("DER-encoded (valid r, s)", ecdsa_der(&good), Reason::BadSignature),
        (
            "128 bytes (P-521 sized)",
            [good.clone(), good.clone()].concat(),
            Reason::BadSignature,
        ),
    ];
    let mut t = Table::new("ECDSA signatures");
    for (what, signature, expected) in cases {
        let out = f.core.bearer("/", &with_signature(&token, &signature));
        t.expect(what, expected, &out);
    }
    // (r, n - s) is the same signer's signature of the same message: ECDSA is malleable.
    // Not a forgery, but it means two token strings for one token: nothing may key on the
    // token string to detect a replay (the token cache only ever saves work).
    let high_s = cat(r, &sub256(&P256_N, s));
    t.expect(
        "(r, n - s): the malleable twin",
        Reason::Allowed,
        &f.core.bearer("/", &with_signature(&token, &high_s)),
    );
    let padded = format!("{}==", token);
    t.expect(
        "base64 padding on the signature",
        Reason::MalformedToken,
        &f.core.bearer("/", &padded),
    );
    // a signature part in standard base64 (+ and /) instead of base64url
    let standard = format!(
        "{}.{}",
        token.rsplit_once('.').unwrap().0,
        STANDARD.encode(&good).trim_end_matches('=')
    );
    let expected = if standard == token {
        Reason::Allowed
    } else {
        Reason::MalformedToken
    };
    t.expect("signature in standard base64", expected, &f.core.bearer("/", &standard));
    t.finish();
}

#[test]
fn duplicate_json_keys() {
    let f = fixture();
    let c = claims(json!({})).to_string();
    let body = &c[1..];
    let mut t = Table::new("duplicate keys");
    let headers = [
        (
            "header alg twice (RS256, none)",
            r#"{"alg":"RS256","kid":"k1","alg":"none"}"#,
        ),
        (
            "header alg twice (none, RS256)",
            r#"{"alg":"none","kid":"k1","alg":"RS256"}"#,
        ),
        ("header kid twice", r#"{"alg":"RS256","kid":"nope","kid":"k1"}"#),
        (
            "header alg twice, once escaped",
            r#"{"alg":"RS256","kid":"k1","\u0061lg":"RS256"}"#,
        ),
    ];
    for (what, header) in headers {
        let token = raw_token(&f.rsa, header.as_bytes(), c.as_bytes());
        t.expect(what, Reason::MalformedToken, &f.core.bearer("/", &token));
    }
    let payloads = [
        (
            "payload iss twice",
            format!(r#"{{"iss":"https://evil.example.com",{body}"#),
        ),
        ("payload exp twice", format!(r#"{{"exp":1,{body}"#)),
        ("payload aud twice", format!(r#"{{"aud":"my-app",{body}"#)),
        ("payload sub twice", format!(r#"{{"sub":"admin",{body}"#)),
        (
            "payload iss twice, once escaped",
            format!(r#"{{"i\u0073s":"https://evil.example.com",{body}"#),
        ),
    ];
    for (what, payload) in payloads {
        let token = raw_token(&f.rsa, f.rsa.header().to_string().as_bytes(), payload.as_bytes());
        t.expect(what, Reason::MalformedToken, &f.core.bearer("/", &token));
    }
    // Nested duplicates are not refused: serde_json keeps the lexically last one, which RFC
    // 7519 §4 allows for claim names; audgate and `x-auth-roles` see ["admin"].
    let nested = format!(r#"{{"realm_access":{{"roles":["user"],"roles":["admin"]}},{body}"#);
    let nested = nested.replacen(
        r#""realm_access":{"roles":["offline_access","uma_authorization","default-roles-test"]},"#,
        "",
        1,
    );
    let token = raw_token(&f.rsa, f.rsa.header().to_string().as_bytes(), nested.as_bytes());
    let out = f.core.bearer("/roles", &token);
    t.expect(
        "nested duplicate (realm_access.roles twice): last wins",
        Reason::Allowed,
        &out,
    );
    assert_eq!(
        out.upstream.get("x-auth-roles").map(String::as_str),
        Some("admin"),
        "{out:?}"
    );
    t.finish();
}

/// A token of exactly `len` bytes: `claims` padded with an `x` claim, the header with a `p`
/// member (base64url never yields a length of 4k+1, so both parts are adjusted).
fn token_of_length(key: &TestKey, len: usize) -> String {
    let make = |hpad: usize, pad: usize| {
        let header = json!({"alg": key.alg, "typ": "JWT", "kid": key.kid, "p": "h".repeat(hpad)});
        key.sign(&header, &claims(json!({"x": "a".repeat(pad)})))
    };
    let base = make(0, 0).len();
    let estimate = (len.saturating_sub(base)) * 3 / 4;
    for hpad in 0..4 {
        for pad in estimate.saturating_sub(8)..estimate + 8 {
            let token = make(hpad, pad);
            if token.len() == len {
                return token;
            }
        }
    }
    panic!("cannot make a token of exactly {len} bytes");
}

#[test]
fn sizes_and_nesting() {
    let f = fixture();
    let mut t = Table::new("sizes and nesting");
    let exact = token_of_length(&f.rsa, MAX_BYTES);
    assert_eq!(exact.len(), MAX_BYTES);
    t.expect(
        "token of exactly max_bytes",
        Reason::Allowed,
        &f.core.bearer("/", &exact),
    );
    let over = token_of_length(&f.rsa, MAX_BYTES + 1);
    t.expect(
        "token of max_bytes + 1",
        Reason::MalformedToken,
        &f.core.bearer("/", &over),
    );
    let huge = "a".repeat(1 << 20);
    t.expect("1 MiB of token", Reason::MalformedToken, &f.core.bearer("/", &huge));

    // nesting: serde_json stops at depth 128, far from a stack overflow
    for depth in [100usize, 127, 128, 129, 5000] {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let payload = claims(json!({}))
            .to_string()
            .replacen('{', &format!("{{\"deep\":{nested},"), 1);
        if payload.len() * 4 / 3 > MAX_BYTES {
            continue;
        }
        let token = raw_token(&f.rsa, f.rsa.header().to_string().as_bytes(), payload.as_bytes());
        // the array is one level below the payload object
        let expected = if depth < 127 {
            Reason::Allowed
        } else {
            Reason::MalformedToken
        };
        t.expect(
            &format!("payload nested {depth} arrays deep"),
            expected,
            &f.core.bearer("/", &token),
        );
    }
    let objects = format!("{}1{}", "{\"a\":".repeat(3000), "}".repeat(3000));
    let payload = claims(json!({}))
        .to_string()
        .replacen('{', &format!("{{\"deep\":{objects},"), 1);
    let token = raw_token(&f.rsa, f.rsa.header().to_string().as_bytes(), payload.as_bytes());
    t.expect(
        "payload nested 3000 objects deep",
        Reason::MalformedToken,
        &f.core.bearer("/", &token),
    );
    let header = format!(
        r#"{{"alg":"RS256","kid":"k1","x":{}{}}}"#,
        "[".repeat(3000),
        "]".repeat(3000)
    );
    let token = raw_token(&f.rsa, header.as_bytes(), claims(json!({})).to_string().as_bytes());
    t.expect(
        "header nested 3000 arrays deep",
        Reason::MalformedToken,
        &f.core.bearer("/", &token),
    );
    // many small claims
    let mut many = claims(json!({}));
    for i in 0..1000 {
        many[format!("c{i}")] = json!(i);
    }
    t.expect("1000 claims", Reason::Allowed, &f.core.bearer("/", &f.rsa.mint(many)));
    // a number serde_json cannot hold
    let payload = claims(json!({})).to_string().replacen('{', "{\"big\":1e400,", 1);
    let token = raw_token(&f.rsa, f.rsa.header().to_string().as_bytes(), payload.as_bytes());
    t.expect("a claim of 1e400", Reason::MalformedToken, &f.core.bearer("/", &token));
    t.finish();
}

#[test]
fn bytes_that_are_not_utf8_and_control_characters() {
    let f = fixture();
    let c = claims(json!({})).to_string();
    let mut t = Table::new("encoding and control characters");
    let invalid: [(&str, Vec<u8>); 2] = [
        (
            "0xff in a payload string",
            c.replacen("alice-id", "alice?id", 1)
                .replace('?', "\u{ff}")
                .into_bytes(),
        ),
        (
            "lone surrogate escape in a claim",
            c.replacen("alice-id", "alice\\ud800", 1).into_bytes(),
        ),
    ];
    for (what, mut bytes) in invalid {
        if let Some(at) = bytes.windows(2).position(|w| w == "\u{ff}".as_bytes()) {
            bytes.splice(at..at + 2, [0xff]); // a raw 0xff byte: never valid UTF-8
        }
        let token = raw_token(&f.rsa, f.rsa.header().to_string().as_bytes(), &bytes);
        t.expect(what, Reason::MalformedToken, &f.core.bearer("/", &token));
    }
    let overlong = raw_token(&f.rsa, b"{\"alg\":\"RS256\",\"kid\":\"k1\xc0\xaf\"}", c.as_bytes());
    t.expect(
        "overlong UTF-8 in the header",
        Reason::MalformedToken,
        &f.core.bearer("/", &overlong),
    );
    let raw_newline = raw_token(
        &f.rsa,
        f.rsa.header().to_string().as_bytes(),
        c.replacen("alice-id", "alice\nid", 1).as_bytes(),
    );
    t.expect(
        "raw newline inside a JSON string",
        Reason::MalformedToken,
        &f.core.bearer("/", &raw_newline),
    );
    let bom = raw_token(
        &f.rsa,
        f.rsa.header().to_string().as_bytes(),
        format!("\u{feff}{c}").as_bytes(),
    );
    t.expect(
        "byte-order mark before the payload",
        Reason::MalformedToken,
        &f.core.bearer("/", &bom),
    );
    let iss = f.rsa.mint(claims(json!({"iss": format!("{KC}\r\n")})));
    t.expect("iss with CR LF", Reason::UnknownIssuer, &f.core.bearer("/", &iss));
    let typ = f.rsa.sign(
        &json!({"alg": "RS256", "kid": "k1", "typ": "JWT\n"}),
        &claims(json!({})),
    );
    t.expect(
        "header typ \"JWT\\n\"",
        Reason::WrongTokenType,
        &f.core.bearer("/", &typ),
    );
    let token_ctl = format!("{}\u{0}", f.rsa.mint(claims(json!({}))));
    t.expect(
        "NUL after the token",
        Reason::MalformedToken,
        &f.core.bearer("/", &token_ctl),
    );

    // control characters in claims that become headers: the token is fine, the header is
    // never set (removed instead)
    let injected = [
        ("sub", json!({"sub": "alice\r\nx-injected: 1"}), "x-auth-subject"),
        ("sub", json!({"sub": "alice\u{0}"}), "x-auth-subject"),
        ("sub", json!({"sub": "alice\u{7f}"}), "x-auth-subject"),
        ("sub", json!({"sub": "alice\u{85}"}), "x-auth-subject"),
        ("email", json!({"email": "a@b\tc"}), "x-auth-email"),
        (
            "realm_access.roles",
            json!({"realm_access": {"roles": ["admin", "x\ny"]}}),
            "x-auth-roles",
        ),
    ];
    for (claim, patch, header) in injected {
        let out = f.core.bearer("/", &f.rsa.mint(claims(patch.clone())));
        t.expect(
            &format!(
                "{claim} = {} (allowed, {header} removed)",
                patch.to_string().escape_debug()
            ),
            Reason::Allowed,
            &out,
        );
        assert!(!out.upstream.contains_key(header), "{patch}: {out:?}");
        assert!(out.removed.iter().any(|h| h == header), "{patch}: {out:?}");
    }
    // an object in a claim header is JSON text: its escapes are not control characters
    let out = f.core.bearer(
        "/",
        &f.rsa.mint(claims(json!({"realm_access": {"roles": [{"a": "\r\n"}]}}))),
    );
    t.expect(
        "realm_access.roles = [{\"a\": \"\\r\\n\"}] (set as JSON text)",
        Reason::Allowed,
        &out,
    );
    assert_eq!(
        out.upstream.get("x-auth-roles").map(String::as_str),
        Some(r#"{"a":"\r\n"}"#),
        "{out:?}"
    );
    // U+2028 is not a control character, and not a line break to HTTP: passed on as UTF-8
    let out = f.core.bearer("/", &f.rsa.mint(claims(json!({"sub": "alice\u{2028}"}))));
    t.expect("sub with U+2028 (passed on)", Reason::Allowed, &out);
    for (name, value) in &out.upstream {
        assert!(!value.contains(['\r', '\n', '\0']), "{name}: {value:?}");
    }
    t.finish();
}

#[test]
fn over_max_bytes_and_two_tokens() {
    let f = fixture();
    let a = f.rsa.mint(claims(json!({"jti": "a"})));
    let b = f.rsa.mint(claims(json!({"jti": "b"})));
    let mut t = Table::new("token sources");
    let two = |headers: &[(&str, String)]| f.core.decide("/", headers);
    t.expect(
        "authorization and cookie, different tokens",
        Reason::MalformedToken,
        &two(&[("authorization", format!("Bearer {a}")), ("cookie", format!("at={b}"))]),
    );
    t.expect(
        "authorization and cookie, the same token",
        Reason::Allowed,
        &two(&[
            ("authorization", format!("Bearer {a}")),
            ("cookie", format!("x=1; at={a}")),
        ]),
    );
    t.expect(
        "two authorization headers, different tokens",
        Reason::MalformedToken,
        &two(&[
            ("authorization", format!("Bearer {a}")),
            ("authorization", format!("Bearer {b}")),
        ]),
    );
    t.expect(
        "two at cookies, different tokens",
        Reason::MalformedToken,
        &two(&[("cookie", format!("at={a}; at={b}"))]),
    );
    t.expect(
        "Bearer with two tokens separated by a space",
        Reason::MalformedToken,
        &two(&[("authorization", format!("Bearer {a} {b}"))]),
    );
    t.expect(
        "Basic and Bearer in one header",
        Reason::Allowed,
        &two(&[("authorization", format!("Basic YTpi, Bearer {a}"))]),
    );
    t.expect(
        "a good token and one over max_bytes",
        Reason::MalformedToken,
        &two(&[
            ("authorization", format!("Bearer {a}")),
            ("cookie", format!("at={}", "a".repeat(MAX_BYTES + 1))),
        ]),
    );
    t.finish();
}

#[test]
fn aud_of_wrong_types() {
    let f = fixture();
    let mut t = Table::new("aud types");
    let cases = [
        (json!(7), Reason::MalformedToken),
        (json!(7.5), Reason::MalformedToken),
        (json!(true), Reason::MalformedToken),
        (json!(null), Reason::MalformedToken),
        (json!({"my-app": true}), Reason::MalformedToken),
        (json!([1, 2]), Reason::MalformedToken),
        (json!(["my-app", 1]), Reason::MalformedToken),
        (json!(["my-app", null]), Reason::MalformedToken),
        (json!([["my-app"]]), Reason::MalformedToken),
        (json!([{"aud": "my-app"}]), Reason::MalformedToken),
        (json!([]), Reason::AudienceMismatch),
        (json!(""), Reason::AudienceMismatch),
        (json!("my-app "), Reason::AudienceMismatch),
        (json!("MY-APP"), Reason::AudienceMismatch),
        (json!("my-app"), Reason::Allowed),
        (json!(["account", "my-app"]), Reason::Allowed),
    ];
    for (aud, expected) in cases {
        let mut c = claims(json!({}));
        c["aud"] = aud.clone(); // not `merge`: a merge patch's null removes the member
        let token = f.rsa.mint(c);
        t.expect(&format!("aud = {aud}"), expected, &f.core.bearer("/aud/x", &token));
    }
    // azp / client_id of the wrong type
    for (claim, value) in [
        ("azp", json!(["my-app"])),
        ("azp", json!(1)),
        ("client_id", json!({"id": "my-app"})),
    ] {
        let token = f.rsa.mint(claims(json!({claim: value.clone()})));
        t.expect(
            &format!("{claim} = {value}"),
            Reason::MalformedToken,
            &f.core.bearer("/", &token),
        );
    }
    t.finish();
}

#[test]
fn exp_nbf_iat_of_odd_types_and_sizes() {
    let f = fixture();
    let mut t = Table::new("times");
    let cases: Vec<(&str, Value, Reason)> = vec![
        (
            "exp as a string",
            json!({"exp": (NOW + 300).to_string()}),
            Reason::MalformedToken,
        ),
        ("exp true", json!({"exp": true}), Reason::MalformedToken),
        (
            "exp absent (a merge patch's null removes it)",
            json!({"exp": null}),
            Reason::MalformedToken,
        ),
        ("exp an array", json!({"exp": [NOW + 300]}), Reason::MalformedToken),
        (
            "exp float in the future",
            json!({"exp": NOW as f64 + 300.75}),
            Reason::Allowed,
        ),
        (
            "exp float just past now + leeway",
            json!({"exp": (NOW - 30) as f64 + 0.5}),
            Reason::Expired,
        ),
        ("exp 0", json!({"exp": 0}), Reason::Expired),
        ("exp -1", json!({"exp": -1}), Reason::Expired),
        ("exp 1e300", json!({"exp": 1e300}), Reason::Allowed),
        ("exp u64::MAX", json!({"exp": u64::MAX}), Reason::Allowed),
        ("exp i64::MAX", json!({"exp": i64::MAX}), Reason::Allowed),
        ("nbf as a string", json!({"nbf": "0"}), Reason::MalformedToken),
        ("nbf 1e300", json!({"nbf": 1e300}), Reason::NotYetValid),
        ("nbf u64::MAX", json!({"nbf": u64::MAX}), Reason::NotYetValid),
        ("nbf -1e300", json!({"nbf": -1e300}), Reason::Allowed),
        ("nbf i64::MIN", json!({"nbf": i64::MIN}), Reason::Allowed),
        (
            "nbf float within leeway",
            json!({"nbf": (NOW + 29) as f64 + 0.9}),
            Reason::Allowed,
        ),
        ("iat as a string", json!({"iat": "now"}), Reason::MalformedToken),
        ("iat 1e300", json!({"iat": 1e300}), Reason::NotYetValid),
        ("iat u64::MAX", json!({"iat": u64::MAX}), Reason::NotYetValid),
        ("iat i64::MIN", json!({"iat": i64::MIN}), Reason::Allowed),
        ("iat -1e300", json!({"iat": -1e300}), Reason::Allowed),
    ];
    for (what, patch, expected) in cases {
        let out = f.core.bearer("/", &f.rsa.mint(claims(patch)));
        t.expect(what, expected, &out);
    }
    let mut null_exp = claims(json!({}));
    null_exp["exp"] = Value::Null;
    t.expect(
        "exp null",
        Reason::MalformedToken,
        &f.core.bearer("/", &f.rsa.mint(null_exp)),
    );
    let payload = claims(json!({}))
        .to_string()
        .replacen(&format!("\"exp\":{}", NOW + 300), "\"exp\":1e400", 1);
    let token = raw_token(&f.rsa, f.rsa.header().to_string().as_bytes(), payload.as_bytes());
    t.expect(
        "exp 1e400 (out of f64 range)",
        Reason::MalformedToken,
        &f.core.bearer("/", &token),
    );
    t.finish();
}

/// `exp` far in the past: `now - exp` overflows i64 when the description is written. A debug
/// build panics (the check never answers; in the server the connection's task dies); a release
/// build wraps and says "expired 0 s ago".
#[test]
fn bug_exp_far_in_the_past_overflows() {
    let f = fixture();
    for exp in [json!(i64::MIN), json!(-1e300), json!(-9.2e18)] {
        let out = f.core.bearer("/", &f.rsa.mint(claims(json!({"exp": exp.clone()}))));
        assert_eq!(out.reason, Reason::Expired, "exp {exp}: {out:?}");
        assert!(
            !out.description.contains("expired 0 s ago"),
            "exp {exp}: {}",
            out.description
        );
    }
}

/// A header or payload that is valid JSON but not an object gets serde_json's error message as
/// its description, and that message quotes the value whole: a payload that is a 3000-byte JSON
/// string yields a 3 KiB description (up to ~12 KiB within `max_bytes`) of attacker-chosen text
/// in the 401 body, the `WWW-Authenticate` header and the debug log. Descriptions quote token
/// values through `jwt::printable` (64 characters) everywhere else.
#[test]
fn bug_description_echoes_unbounded_token_text() {
    let f = fixture();
    let payload = format!("\"{}\"", "a".repeat(3000));
    for token in [
        format!(
            "{}.{}.{}",
            b64url(r#"{"alg":"RS256"}"#),
            b64url(&payload),
            b64url("sig")
        ),
        format!("{}.{}.{}", b64url(&payload), b64url("{}"), b64url("sig")),
    ] {
        let out = f.core.bearer("/", &token);
        assert_eq!(out.reason, Reason::MalformedToken);
        assert!(
            out.description.len() <= props::MAX_DESCRIPTION,
            "a description of {} bytes: {}...",
            out.description.len(),
            &out.description[..120]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The fuzz corpus through the fuzz targets' properties
// ---------------------------------------------------------------------------------------------

/// Corpus files that reproduce a bug not fixed yet (target/file -> the bug); skipped by
/// [`fuzz_corpus_replays_through_the_properties`] and run by [`bug_fuzz_corpus_known_failures`].
const KNOWN_FAILURES: &[(&str, &str)] = &[];

fn corpus_files() -> Vec<(String, PathBuf)> {
    let root = common::repo_root().join("fuzz/corpus");
    let mut files = Vec::new();
    for target in ["jwt", "evaluate", "config", "jwks", "path"] {
        let dir = root.join(target);
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        assert!(!entries.is_empty(), "no seeds in {}", dir.display());
        files.extend(entries.into_iter().map(|p| (target.to_owned(), p)));
    }
    files
}

fn run_corpus_file(target: &str, path: &Path) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    let run = match target {
        "jwt" => props::jwt_target,
        "evaluate" => props::evaluate_target,
        "config" => props::config_target,
        "jwks" => props::jwks_target,
        "path" => props::path_target,
        other => panic!("unknown target {other}"),
    };
    std::panic::catch_unwind(|| run(&data)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".to_owned())
    })
}

fn corpus_name(target: &str, path: &Path) -> String {
    format!("{target}/{}", path.file_name().unwrap().to_string_lossy())
}

/// The CI smoke of the fuzz targets: every seed and every kept input, no libFuzzer needed.
#[test]
fn fuzz_corpus_replays_through_the_properties() {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut count = 0;
    for (target, path) in corpus_files() {
        let name = corpus_name(&target, &path);
        if KNOWN_FAILURES.iter().any(|(n, _)| *n == name) {
            continue;
        }
        count += 1;
        if let Err(e) = run_corpus_file(&target, &path) {
            failures.push(format!("{name}: {e}"));
        }
    }
    println!("replayed {count} corpus files in {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} corpus file(s) broke a property:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn bug_fuzz_corpus_known_failures() {
    let mut failures = Vec::new();
    for (target, path) in corpus_files() {
        let name = corpus_name(&target, &path);
        if let Some((_, bug)) = KNOWN_FAILURES.iter().find(|(n, _)| *n == name)
            && let Err(e) = run_corpus_file(&target, &path)
        {
            failures.push(format!("{name} ({bug}): {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Through the real binary: gRPC ext_authz, the HTTP listeners
// ---------------------------------------------------------------------------------------------

const HOST: &str = "api.example.com";

fn binary_config(issuer: &str) -> String {
    format!(
        r#"
issuers:
  kc:
    issuer: {issuer}
    discovery: true
    refresh_interval: 5m
    min_refresh_interval: 1s
token:
  sources: [authorization, {{cookie: at}}]
  max_bytes: 16384
claim_headers:
  x-auth-subject: sub
  x-auth-issuer: iss
  x-auth-client-id: $client_id
  x-auth-roles: realm_access.roles
  x-auth-email: email
routes:
  - name: open
    match: {{ path_prefix: /open }}
    allow_anonymous: true
  - name: app
    match: {{ path_prefix: / }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]
default: deny
"#
    )
}

/// An issuer publishing `key`, audgate on it, a gRPC connection; returns once a token of `key`
/// is allowed.
async fn running(key: &TestKey, config: impl FnOnce(&str) -> String) -> (IssuerServer, Audgate, GrpcAuthz) {
    let issuer = IssuerServer::start(&[key]).await;
    let audgate = Audgate::start(&config(&issuer.issuer_url())).await;
    let grpc = audgate.grpc().await;
    let token = key.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
    let deadline = Instant::now() + common::KEYS_READY_TIMEOUT;
    loop {
        let reply = grpc
            .check(&CheckCall::get(HOST, "/x").bearer(&token))
            .await
            .expect("check");
        if reply.is_allow() {
            break;
        }
        assert!(
            reply.kind == CheckKind::Error && Instant::now() < deadline,
            "a good token was not allowed: {reply}\n{}",
            audgate.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (issuer, audgate, grpc)
}

fn assert_grpc_reason(reply: &common::CheckReply, status: u16, reason: &str, context: &str) {
    assert_eq!(reply.kind, CheckKind::Denied, "{context}: {reply}");
    assert_eq!(
        (reply.status, reply.error_code().as_deref()),
        (status, Some(reason)),
        "{context}: {reply}"
    );
}

/// Claims with CR, LF, NUL and other control characters are allowed, but those claim headers
/// are never set: they are listed in `headers_to_remove`, and no header audgate returns
/// carries CR, LF or NUL. A header the client sent itself never survives either.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_claim_headers_never_carry_cr_lf_nul() {
    let key = TestKey::rsa("inj-1");
    let (issuer, audgate, grpc) = running(&key, binary_config).await;
    let iss = issuer.issuer_url();
    let cases = [
        (json!({"sub": "alice\r\nx-injected: 1"}), "x-auth-subject"),
        (json!({"sub": "alice\nx-injected: 1"}), "x-auth-subject"),
        (json!({"sub": "alice\u{0}"}), "x-auth-subject"),
        (json!({"sub": "\r\n\r\nGET /admin HTTP/1.1"}), "x-auth-subject"),
        (json!({"email": "a@b\rc"}), "x-auth-email"),
        (
            json!({"realm_access": {"roles": ["admin", "x\r\nx-injected: 1"]}}),
            "x-auth-roles",
        ),
    ];
    for (patch, header) in cases {
        let token = key.mint(merge(keycloak_claims(&iss, "my-app"), patch.clone()));
        let call = CheckCall::get(HOST, "/x")
            .bearer(&token)
            .header("x-auth-subject", "spoofed")
            .header(header, "spoofed");
        let reply = grpc.check(&call).await.expect("check");
        assert!(reply.is_allow(), "{patch}: {reply}\n{}", audgate.logs());
        assert!(
            !reply.headers.contains_key(header),
            "{patch}: {header} was set: {reply}"
        );
        assert!(
            reply.headers_to_remove.iter().any(|h| h == header),
            "{patch}: {header} not removed: {reply}"
        );
        for (name, value) in &reply.headers {
            assert!(
                !name.contains(['\r', '\n', '\0', ':']) && !value.contains(['\r', '\n', '\0']),
                "{patch}: header {name:?} = {value:?}"
            );
            assert_ne!(name, "x-injected", "{patch}");
        }
    }
    // the deny side: a description quoting a hostile kid stays one header line
    let token = key.sign(
        &json!({"alg": "RS256", "kid": "k\r\nx-injected: 1"}),
        &keycloak_claims(&iss, "my-app"),
    );
    let reply = grpc
        .check(&CheckCall::get(HOST, "/x").bearer(&token))
        .await
        .expect("check");
    assert_grpc_reason(&reply, 401, "unknown_kid", "hostile kid");
    for (name, value) in &reply.headers {
        assert!(!value.contains(['\r', '\n', '\0']), "deny header {name:?} = {value:?}");
    }
}

/// The decision's dynamic metadata (`audgate.subject`, read by Envoy access logs and by
/// `%DYNAMIC_METADATA(...)%` header formatters) carries the token's `sub` verbatim, CR/LF and
/// NUL included, although the same value is refused as a claim header.
#[tokio::test(flavor = "multi_thread")]
async fn bug_grpc_metadata_subject_carries_control_characters() {
    let key = TestKey::rsa("meta-1");
    let (issuer, _audgate, grpc) = running(&key, binary_config).await;
    let claims = merge(
        keycloak_claims(&issuer.issuer_url(), "my-app"),
        json!({"sub": "alice\r\nx-injected: 1\u{0}"}),
    );
    let reply = grpc
        .check(&CheckCall::get(HOST, "/x").bearer(&key.mint(claims)))
        .await
        .expect("check");
    assert!(reply.is_allow(), "{reply}");
    for (name, value) in &reply.metadata {
        assert!(!value.contains(['\r', '\n', '\0']), "metadata {name} = {value:?}");
    }
}

/// The HTTP authorization endpoint (Envoy `http_service`, nginx, Traefik): a claim with CR/LF
/// or NUL is never a response header (it is named in `x-envoy-auth-headers-to-remove`
/// instead), and two different tokens are `malformed_token`.
#[tokio::test(flavor = "multi_thread")]
async fn http_endpoint_claim_headers_and_two_tokens() {
    let key = TestKey::rsa("http-adv-1");
    let (issuer, audgate, _grpc) = running(&key, binary_config).await;
    let iss = issuer.issuer_url();
    let client = common::http_client();
    let url = format!("{}/x", audgate.http_url());
    let injected = key.mint(merge(
        keycloak_claims(&iss, "my-app"),
        json!({"sub": "alice\r\nx-injected: 1", "realm_access": {"roles": ["a\u{0}"]}}),
    ));
    let auth = common::bearer(&injected);
    let reply = common::send(&client, "GET", &url, &[("host", HOST), ("authorization", &auth)]).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert!(
        reply.header("x-auth-subject").is_none() && reply.header("x-injected").is_none(),
        "{reply}"
    );
    let removed = reply
        .header(audgate::http::HEADERS_TO_REMOVE)
        .unwrap_or_default()
        .to_owned();
    for header in ["x-auth-subject", "x-auth-roles"] {
        assert!(removed.contains(header), "{header} not in {removed:?}: {reply}");
    }
    for (name, value) in &reply.headers {
        assert!(
            !value.as_bytes().iter().any(|b| [b'\r', b'\n', 0].contains(b)),
            "{name}: {value:?}"
        );
    }
    let a = common::bearer(&key.mint(keycloak_claims(&iss, "my-app")));
    let b = key.mint(merge(keycloak_claims(&iss, "my-app"), json!({"jti": "b"})));
    let reply = common::send(
        &client,
        "GET",
        &url,
        &[("host", HOST), ("authorization", &a), ("cookie", &format!("at={b}"))],
    )
    .await;
    assert_eq!(
        (reply.status, reply.error_code().as_deref()),
        (401, Some("malformed_token")),
        "{reply}"
    );
}

/// Two different tokens, repeated headers, oversized tokens: `malformed_token`, quickly.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_two_tokens_and_oversized_tokens() {
    let key = TestKey::rsa("two-1");
    let (issuer, _audgate, grpc) = running(&key, binary_config).await;
    let iss = issuer.issuer_url();
    let a = key.mint(merge(keycloak_claims(&iss, "my-app"), json!({"jti": "a"})));
    let b = key.mint(merge(keycloak_claims(&iss, "my-app"), json!({"jti": "b"})));
    let call = || CheckCall::get(HOST, "/x");
    let cases = [
        (
            "authorization and cookie differ",
            call().bearer(&a).header("cookie", &format!("at={b}")),
            false,
        ),
        ("two authorization headers", call().bearer(&a).bearer(&b), false),
        (
            "the same token twice",
            call().bearer(&a).header("cookie", &format!("at={a}")),
            true,
        ),
        ("token over max_bytes", call().bearer(&"a".repeat(MAX_BYTES + 1)), false),
        ("1 MiB authorization header", call().bearer(&"a".repeat(1 << 20)), false),
        (
            "1 MiB cookie besides a good token",
            call()
                .bearer(&a)
                .header("cookie", &format!("at={}", "a".repeat(1 << 20))),
            false,
        ),
    ];
    for (what, call, allowed) in cases {
        let started = Instant::now();
        let reply = grpc.check(&call).await.expect("check");
        if allowed {
            assert!(reply.is_allow(), "{what}: {reply}");
        } else {
            assert_grpc_reason(&reply, 401, "malformed_token", what);
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what} took {:?}",
            started.elapsed()
        );
    }
}

/// `jku`, `x5u` and `jwk` name the attacker's keys; audgate never fetches or uses them.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_jku_and_x5u_are_never_fetched() {
    let key = TestKey::rsa("real-1");
    let attacker_key = TestKey::rsa("attacker-1");
    let attacker = IssuerServer::start_at("/realms/evil", &[&attacker_key]).await;
    let (issuer, audgate, grpc) = running(&key, binary_config).await;
    let claims = keycloak_claims(&issuer.issuer_url(), "my-app");
    let (jwks_before, discovery_before) = (attacker.jwks_fetches(), attacker.discovery_fetches());
    let headers = [
        (
            json!({"alg": "RS256", "kid": "attacker-1", "jku": attacker.jwks_uri()}),
            "unknown_kid",
        ),
        (
            json!({"alg": "RS256", "kid": "real-1", "jku": attacker.jwks_uri()}),
            "bad_signature",
        ),
        (
            json!({"alg": "RS256", "kid": "attacker-1", "x5u": attacker.discovery_url()}),
            "unknown_kid",
        ),
        (
            json!({"alg": "RS256", "jku": attacker.jwks_uri(), "jwk": attacker_key.jwk()}),
            "bad_signature",
        ),
    ];
    for (header, reason) in headers {
        let token = attacker_key.sign(&header, &claims);
        let reply = grpc
            .check(&CheckCall::get(HOST, "/x").bearer(&token))
            .await
            .expect("check");
        assert_grpc_reason(&reply, 401, reason, &header.to_string());
    }
    assert_eq!(
        (attacker.jwks_fetches(), attacker.discovery_fetches()),
        (jwks_before, discovery_before),
        "audgate fetched a URL from a token header\n{}",
        audgate.logs()
    );
}

/// gRPC limits as they are: tonic's default 4 MiB cap on a request message (a larger one is
/// refused, the server keeps serving), and many concurrent streams answered correctly.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_message_size_and_concurrent_streams() {
    let key = TestKey::ec("streams-1");
    let (issuer, audgate, grpc) = running(&key, binary_config).await;
    let token = key.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
    let big = |bytes: usize| {
        CheckCall::get(HOST, "/x")
            .bearer(&token)
            .header("x-junk", &"a".repeat(bytes))
    };
    let reply = grpc.check(&big(3 << 20)).await.expect("a 3 MiB CheckRequest");
    assert!(reply.is_allow(), "3 MiB request: {reply}");
    let started = Instant::now();
    match grpc.check(&big(5 << 20)).await {
        Ok(reply) => panic!("a 5 MiB CheckRequest was answered: {reply}"),
        Err(status) => {
            println!(
                "5 MiB CheckRequest: {:?} {} after {:?}",
                status.code(),
                status.message(),
                started.elapsed()
            );
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::OutOfRange | tonic::Code::ResourceExhausted | tonic::Code::Internal
                ),
                "{status:?}"
            );
        }
    }
    let fresh = audgate.grpc().await;
    assert!(fresh.check(&big(10)).await.expect("check after the big one").is_allow());

    // 4 connections x 500 concurrent streams (the test client gives each call 10 s)
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let conn = audgate.grpc().await;
        for i in 0..500 {
            let conn = conn.clone();
            let call = if i % 2 == 0 {
                CheckCall::get(HOST, "/x").bearer(&token)
            } else {
                CheckCall::get(HOST, "/x")
            };
            tasks.push(tokio::spawn(async move { (i % 2 == 0, conn.check(&call).await) }));
        }
    }
    let mut wrong = Vec::new();
    for task in tasks {
        let (with_token, reply) = task.await.expect("task");
        match reply {
            Ok(r) if r.is_allow() == with_token => {}
            other => wrong.push(format!("{other:?}")),
        }
    }
    println!("2000 concurrent checks over 4 connections in {:?}", started.elapsed());
    assert!(wrong.is_empty(), "{} wrong answers, first: {}", wrong.len(), wrong[0]);
    drop(grpc);
}

async fn http_status(port: u16, path: &str) -> Result<(u16, Duration), String> {
    let started = Instant::now();
    let client = common::http_client();
    let reply = common::try_send(&client, "GET", &format!("http://127.0.0.1:{port}{path}"), &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok((reply.status, started.elapsed()))
}

/// Slow clients: connections that send their headers a byte at a time, and connections that
/// send nothing at all, on every listener. While they are open, other requests on every
/// listener keep being answered promptly. (They are not closed: see the ignored test below.)
#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_do_not_hold_the_listeners() {
    use tokio::io::AsyncWriteExt as _;
    let key = TestKey::ec("slow-1");
    let (issuer, audgate, grpc) = running(&key, binary_config).await;
    let token = key.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
    let ports = [audgate.ports.http, audgate.ports.admin, audgate.ports.grpc];
    let mut slow = Vec::new();
    for port in ports {
        for _ in 0..100 {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            s.write_all(b"GET /open/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .expect("write");
            slow.push(s);
        }
        for _ in 0..100 {
            slow.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connect"),
            );
        }
    }
    let mut worst = Duration::ZERO;
    for round in 0..10 {
        for s in slow.iter_mut().step_by(2) {
            let _ = s.write_all(b"a").await;
        }
        let (status, took) = http_status(audgate.ports.http, "/open/x").await.expect("HTTP endpoint");
        assert_eq!(status, 200, "round {round}");
        worst = worst.max(took);
        let (status, took) = http_status(audgate.ports.admin, "/healthz").await.expect("admin");
        assert_eq!(status, 200, "round {round}");
        worst = worst.max(took);
        let started = Instant::now();
        let reply = grpc
            .check(&CheckCall::get(HOST, "/x").bearer(&token))
            .await
            .expect("gRPC");
        assert!(reply.is_allow(), "round {round}: {reply}");
        worst = worst.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("{} slow connections open; slowest other request {worst:?}", slow.len());
    assert!(
        worst < Duration::from_secs(1),
        "a request took {worst:?} while slow clients were connected"
    );
}

/// Reads from `s` until the peer closes the connection (or resets it); `Err` with what it read
/// when it is still open after `within`. Whatever the server answers first (a 408, a GOAWAY)
/// is read and ignored.
/// While waiting, it sends the bytes of `trickle`, one a second.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration, trickle: &[u8]) -> Result<Duration, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let started = Instant::now();
    let mut got = Vec::new();
    let mut trickle = trickle.iter();
    while started.elapsed() < within {
        if let Some(byte) = trickle.next()
            && s.write_all(&[*byte]).await.is_err()
        {
            return Ok(started.elapsed());
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    Err(format!(
        "still open after {within:?}; read {:?}",
        String::from_utf8_lossy(&got[..got.len().min(200)])
    ))
}

/// Slowloris and silence on every listener: a connection that trickles its request headers
/// (HTTP/1) or its HTTP/2 preface and SETTINGS, or sends nothing, is closed once it has not completed a
/// request within the handshake timeout (10 s); an idle HTTP/1 keep-alive connection is closed
/// after the header read timeout (30 s). A connection that keeps making requests is not.
#[tokio::test(flavor = "multi_thread")]
async fn slowloris_and_silent_connections_are_closed() {
    use tokio::io::AsyncWriteExt as _;
    let key = TestKey::ec("slowloris-1");
    let (issuer, audgate, grpc) = running(&key, binary_config).await;
    let handshake = Duration::from_secs(10);
    let slack = Duration::from_secs(5);
    // 20 s of a header value; the rest of the HTTP/2 preface, then an empty SETTINGS frame.
    const HEADER_BYTES: &[u8] = b"aaaaaaaaaaaaaaaaaaaa";
    const PREFACE_REST: &[u8] = b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let connect = |port: u16| async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect")
    };
    let mut cases = Vec::new();
    for (name, port) in [
        ("http", audgate.ports.http),
        ("admin", audgate.ports.admin),
        ("grpc", audgate.ports.grpc),
    ] {
        let mut headers = connect(port).await;
        headers
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("write");
        cases.push((
            format!("{name}: HTTP/1 headers a byte at a time"),
            headers,
            HEADER_BYTES,
        ));
        let mut preface = connect(port).await;
        preface.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
        cases.push((
            format!("{name}: HTTP/2 preface a byte at a time"),
            preface,
            PREFACE_REST,
        ));
        cases.push((format!("{name}: nothing sent"), connect(port).await, b""));
    }
    let checks = async {
        // Meanwhile, checks on a live connection go on being answered.
        let token = key.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
        for _ in 0..10 {
            let reply = grpc
                .check(&CheckCall::get(HOST, "/x").bearer(&token))
                .await
                .expect("gRPC");
            assert!(reply.is_allow(), "{reply}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let closing: Vec<_> = cases
        .into_iter()
        .map(|(what, mut s, trickle)| {
            tokio::spawn(async move { (what, closed_within(&mut s, handshake + slack, trickle).await) })
        })
        .collect();
    checks.await;
    for task in closing {
        let (what, result) = task.await.expect("task");
        let took = result.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            took >= handshake - Duration::from_secs(1),
            "{what}: closed after only {took:?}"
        );
    }

    // A keep-alive connection that made a request and then went quiet: closed after 30 s.
    use tokio::io::AsyncReadExt as _;
    let mut idle = connect(audgate.ports.admin).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.expect("read the answer");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let took = closed_within(&mut idle, Duration::from_secs(30) + slack, b"")
        .await
        .unwrap_or_else(|e| panic!("idle keep-alive connection: {e}"));
    assert!(
        took >= Duration::from_secs(25),
        "idle keep-alive connection closed after only {took:?}"
    );
}

/// With a small open-files limit (256, as `ulimit -n` may leave it), a flood of slow
/// connections on `listen.http` takes only that listener's share of descriptors: gRPC checks,
/// `/healthz` and a config reload keep working, and the HTTP endpoint answers again once the
/// flood is gone. (Before the limits, 300 such connections blocked
/// all three listeners with "Too many open files".)
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_flood_on_one_listener_leaves_the_others_working() {
    use tokio::io::AsyncWriteExt as _;
    let key = TestKey::ec("flood-1");
    let issuer = IssuerServer::start(&[&key]).await;
    let options = common::AudgateOptions::new().open_files(256);
    let audgate = Audgate::start_with(&binary_config(&issuer.issuer_url()), options).await;
    let grpc = audgate.grpc().await;
    let token = key.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
    audgate.wait_ready().await;

    let mut flood = Vec::new();
    for _ in 0..300 {
        // Connects succeed past the limit too (the kernel's backlog); those are not accepted.
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", audgate.ports.http))
            .await
            .expect("connect");
        let _ = s.write_all(b"GET /open/x HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
        flood.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !audgate.logs().contains("listen.http: 32 connections open, the limit") {
        assert!(
            Instant::now() < deadline,
            "the HTTP listener should be at its limit of 32:\n{}",
            audgate.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for round in 0..5 {
        let started = Instant::now();
        let reply = grpc
            .check(&CheckCall::get(HOST, "/x").bearer(&token))
            .await
            .expect("gRPC");
        assert!(reply.is_allow(), "round {round}: {reply}");
        let (status, _) = http_status(audgate.ports.admin, "/healthz").await.expect("admin");
        assert_eq!(status, 200, "round {round}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "round {round}: {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let config = std::fs::read_to_string(&audgate.config_path).expect("read the config");
    audgate.replace_config_text(&config.replace("x-auth-email: email", "x-auth-mail: email"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !audgate.logs().contains("config loaded") {
        assert!(
            Instant::now() < deadline,
            "no reload during the flood:\n{}",
            audgate.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!audgate.logs().contains("Too many open files"), "{}", audgate.logs());

    // Once the flood goes away (the handshake timeout would close it in turns of 32 every
    // 10 s: `slowloris_and_silent_connections_are_closed`), the HTTP endpoint answers again.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), http_status(audgate.ports.http, "/open/x")).await {
            Ok(Ok((200, _))) => break,
            other => assert!(
                Instant::now() < deadline,
                "the HTTP endpoint never recovered: {other:?}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fault injection beyond tests/jwks.rs, tests/e2e_ops.rs and tests/e2e_envoy.rs
// ---------------------------------------------------------------------------------------------

async fn wait_fetches(issuer: &IssuerServer, more_than: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while issuer.jwks_fetches() <= more_than {
        assert!(Instant::now() < deadline, "{what}: audgate did not refetch the JWKS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fast_refresh_config(issuer: &str) -> String {
    binary_config(issuer).replace("refresh_interval: 5m", "refresh_interval: 1s")
}

/// A way to make the test issuer misbehave.
type BreakIssuer = Box<dyn Fn(&IssuerServer)>;

/// After the keys loaded, the JWKS endpoint fails (5xx), serves garbage, serves an oversized
/// document, then keys of another realm: the last good keys keep working through all the
/// failures, and /readyz stays ready.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_failing_later_keeps_the_last_good_keys() {
    let key = TestKey::rsa("last-good-1");
    let (issuer, audgate, grpc) = running(&key, fast_refresh_config).await;
    let token = key.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
    let steps: Vec<(&str, BreakIssuer)> = vec![
        ("HTTP 500", Box::new(|i: &IssuerServer| i.set_jwks_failure(Some(500)))),
        ("HTTP 502", Box::new(|i: &IssuerServer| i.set_jwks_failure(Some(502)))),
        ("HTTP 404", Box::new(|i: &IssuerServer| i.set_jwks_failure(Some(404)))),
        (
            "an HTML page",
            Box::new(|i: &IssuerServer| {
                i.set_jwks_failure(None);
                i.set_jwks(json!("<html>maintenance</html>"));
            }),
        ),
        (
            "no keys member",
            Box::new(|i: &IssuerServer| i.set_jwks(json!({"kids": []}))),
        ),
        (
            "a document over 1 MiB",
            Box::new(|i: &IssuerServer| i.set_jwks(json!({"keys": [], "pad": "x".repeat(2 << 20)}))),
        ),
        (
            "an unreachable jwks_uri",
            Box::new(|i: &IssuerServer| {
                i.set_jwks(jwks(&[]));
                i.set_jwks_uri_override(Some(format!("http://127.0.0.1:{}/certs", common::free_port())));
            }),
        ),
    ];
    for (what, break_it) in steps {
        let before = issuer.jwks_fetches() + issuer.discovery_fetches();
        break_it(&issuer);
        let deadline = Instant::now() + Duration::from_secs(15);
        while issuer.jwks_fetches() + issuer.discovery_fetches() <= before + 1 {
            assert!(Instant::now() < deadline, "{what}: no refresh attempt");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let reply = grpc
            .check(&CheckCall::get(HOST, "/x").bearer(&token))
            .await
            .expect("check");
        assert!(
            reply.is_allow(),
            "{what}: the last good key stopped working: {reply}\n{}",
            audgate.logs()
        );
        let ready = audgate.readyz().await.expect("readyz");
        assert_eq!(ready.status, 200, "{what}: {ready}");
    }
    let metrics = audgate.metrics().await;
    assert!(
        metrics.sum("audgate_jwks_refresh_total", &[("issuer", "kc"), ("result", "error")]) >= 7.0,
        "{}",
        metrics.describe("audgate_jwks_refresh_total")
    );
}

/// The issuer's realm is deleted and created again: every kid changes. Tokens of the old
/// realm get `unknown_kid` (after one refetch), tokens of the new one are allowed at once.
#[tokio::test(flavor = "multi_thread")]
async fn realm_recreated_with_all_new_kids() {
    let old = [TestKey::rsa("old-rsa"), TestKey::ec("old-ec")];
    let new = [TestKey::rsa("new-rsa"), TestKey::ec("new-ec")];
    let issuer = IssuerServer::start(&[&old[0], &old[1]]).await;
    let audgate = Audgate::start(&binary_config(&issuer.issuer_url())).await;
    let grpc = audgate.grpc().await;
    let claims = keycloak_claims(&issuer.issuer_url(), "my-app");
    let old_tokens: Vec<String> = old.iter().map(|k| k.mint(claims.clone())).collect();
    let deadline = Instant::now() + common::KEYS_READY_TIMEOUT;
    while !grpc
        .check(&CheckCall::get(HOST, "/x").bearer(&old_tokens[0]))
        .await
        .expect("check")
        .is_allow()
    {
        assert!(Instant::now() < deadline, "old realm never allowed\n{}", audgate.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    issuer.set_keys(&[&new[0], &new[1]]);
    tokio::time::sleep(Duration::from_millis(1100)).await; // min_refresh_interval
    for key in &new {
        let token = key.mint(claims.clone());
        let reply = grpc
            .check(&CheckCall::get(HOST, "/x").bearer(&token))
            .await
            .expect("check");
        assert!(reply.is_allow(), "new realm's {}: {reply}\n{}", key.kid, audgate.logs());
    }
    for token in &old_tokens {
        let reply = grpc
            .check(&CheckCall::get(HOST, "/x").bearer(token))
            .await
            .expect("check");
        assert_grpc_reason(&reply, 401, "unknown_kid", "old realm's token");
    }
}

/// A JWKS endpoint that hangs: checks whose key is known never wait for it; a check that
/// needs a refetch (unknown kid) waits at most for the fetch timeout (5 s), then is answered.
#[tokio::test(flavor = "multi_thread")]
async fn hanging_jwks_never_holds_checks_for_known_keys() {
    let key = TestKey::ec("hang-1");
    // refresh every second, refetch for an unknown kid at most every second: a check that
    // meets an unknown kid waits for the refresh in flight and makes no fetch of its own
    let (issuer, audgate, grpc) = running(&key, fast_refresh_config).await;
    let claims = keycloak_claims(&issuer.issuer_url(), "my-app");
    let token = key.mint(claims.clone());
    let fetched = issuer.jwks_fetches();
    issuer.set_jwks_delay(Duration::from_secs(60));
    wait_fetches(&issuer, fetched, "hanging").await; // a refresh is now stuck in the endpoint
    let mut worst = Duration::ZERO;
    for _ in 0..30 {
        let started = Instant::now();
        let reply = grpc
            .check(&CheckCall::get(HOST, "/x").bearer(&token))
            .await
            .expect("check");
        assert!(reply.is_allow(), "{reply}");
        worst = worst.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        worst < Duration::from_millis(500),
        "a check with a known key waited {worst:?} on a hanging JWKS"
    );
    let stranger = TestKey::ec("hang-2").mint(claims);
    let started = Instant::now();
    let reply = grpc
        .check(&CheckCall::get(HOST, "/x").bearer(&stranger))
        .await
        .expect("check");
    let waited = started.elapsed();
    println!("known kid: slowest {worst:?}; unknown kid answered after {waited:?}");
    assert_grpc_reason(&reply, 401, "unknown_kid", "unknown kid while the JWKS hangs");
    // bounded by the fetch timeout (5 s) of the refresh in flight: once that fetch fails, the
    // check does not start a second one, although min_refresh_interval (1 s) is shorter than
    // the fetch took (before the fix: up to 10 s, 6.5 s measured).
    assert!(
        waited < Duration::from_millis(5800),
        "an unknown-kid check waited {waited:?}\n{}",
        audgate.logs()
    );
    drop(issuer);
}

/// Redirects: followed up to 3 hops; a loop or a longer chain fails (and the keys stay
/// unloaded: never a half-followed document).
#[tokio::test(flavor = "multi_thread")]
async fn jwks_redirects_are_bounded() {
    use audgate::config::{KeySource, KeySourceConfig};
    use audgate::jwks::{IssuerKeys, Refreshed};
    use axum::response::Redirect;
    let key = TestKey::rsa("redirect-1");
    let issuer = IssuerServer::start(&[&key]).await;
    let target = issuer.jwks_uri();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new()
        .route("/loop", axum::routing::get(|| async { Redirect::temporary("/loop") }))
        .route(
            "/hop/{n}",
            axum::routing::get({
                let target = target.clone();
                move |axum::extract::Path(n): axum::extract::Path<u32>| {
                    let target = target.clone();
                    async move {
                        if n == 0 {
                            Redirect::permanent(&target)
                        } else {
                            Redirect::temporary(&format!("/hop/{}", n - 1))
                        }
                    }
                }
            }),
        );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let load = |url: String| async move {
        let source = KeySourceConfig {
            source: KeySource::JwksUri(url),
            refresh_interval: Duration::from_secs(300),
            min_refresh_interval: Duration::ZERO,
            ca_file: None,
        };
        let keys = IssuerKeys::new("redirects".into(), source).expect("client");
        let outcome = keys.refresh().await;
        (outcome, keys.current().is_some())
    };
    let (outcome, loaded) = load(format!("{base}/hop/0")).await;
    assert!(
        loaded && matches!(outcome, Refreshed::Ok { keys: 1, .. }),
        "1 hop: {outcome:?}"
    );
    let (outcome, loaded) = load(format!("{base}/hop/2")).await;
    assert!(loaded, "3 hops: {outcome:?}");
    for url in [
        format!("{base}/hop/3"),
        format!("{base}/hop/50"),
        format!("{base}/loop"),
    ] {
        let started = Instant::now();
        let (outcome, loaded) = load(url.clone()).await;
        assert!(!loaded && matches!(outcome, Refreshed::Failed(_)), "{url}: {outcome:?}");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{url} took {:?}",
            started.elapsed()
        );
    }
    server.abort();
}

/// Runs `openssl` with `args` in `dir`, panicking with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (apt-get install openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate for 127.0.0.1 that it signed, in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
            "-days",
            "2",
            "-subj",
            "/CN=audgate test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// JWKS over HTTPS from a server whose certificate only a private CA vouches for: loads with
/// that CA as `ca_file`, fails without it or with another CA (and nothing is loaded).
#[tokio::test(flavor = "multi_thread")]
async fn jwks_over_tls_needs_the_right_ca_file() {
    use audgate::config::{KeySource, KeySourceConfig};
    use audgate::jwks::{IssuerKeys, Refreshed};
    let dir = tempfile::tempdir().expect("tempdir");
    make_ca(dir.path(), "server");
    make_ca(dir.path(), "other");
    let key = TestKey::ec("tls-1");
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&key]).to_string()).expect("write jwks");
    let port = common::free_port();
    let _server = KillOnDrop(
        std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept", &format!("127.0.0.1:{port}")])
            .args(["-cert", "server.pem", "-key", "server.key"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("https://127.0.0.1:{port}/jwks.json");
    let load = |ca: Option<PathBuf>| {
        let url = url.clone();
        async move {
            let source = KeySourceConfig {
                source: KeySource::JwksUri(url),
                refresh_interval: Duration::from_secs(300),
                min_refresh_interval: Duration::ZERO,
                ca_file: ca,
            };
            let keys = IssuerKeys::new("tls".into(), source).expect("client");
            let outcome = keys.refresh().await;
            (outcome, keys.current().map(|k| k.kids().len()))
        }
    };
    let (outcome, loaded) = load(Some(dir.path().join("server-ca.pem"))).await;
    assert_eq!(loaded, Some(1), "with the right CA: {outcome:?}");
    for (what, ca) in [
        ("no ca_file", None),
        ("another CA", Some(dir.path().join("other-ca.pem"))),
    ] {
        let (outcome, loaded) = load(ca).await;
        assert!(loaded.is_none(), "{what}: keys loaded");
        match outcome {
            Refreshed::Failed(e) => println!("{what}: {e}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

/// A child process killed (and reaped) when the test ends, also when it panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Through real Envoy
// ---------------------------------------------------------------------------------------------

/// What reaches the upstream through Envoy: never a claim header with CR/LF/NUL (nor a header
/// smuggled through one), never the client's own copy; two tokens and oversized tokens are
/// `malformed_token`; a header over Envoy's own limit never reaches audgate. Then Envoy
/// restarts while audgate runs, and the new Envoy is served at once.
#[tokio::test(flavor = "multi_thread")]
async fn through_envoy_injection_two_tokens_and_huge_headers() {
    let key = TestKey::rsa("envoy-adv-1");
    let stack = common::Stack::start(&[&key], binary_config).await;
    let iss = stack.issuer.issuer_url();
    let good = key.mint(keycloak_claims(&iss, "my-app"));
    let reply = stack.wait_ready("/x", &good).await;
    assert_eq!(reply.status, 200, "{reply}\n{}", stack.logs());

    let injected = [
        (json!({"sub": "alice\r\nx-injected: 1"}), "x-auth-subject"),
        (json!({"sub": "alice\u{0}"}), "x-auth-subject"),
        (
            json!({"realm_access": {"roles": ["admin\nx-injected: 1"]}}),
            "x-auth-roles",
        ),
    ];
    for (patch, header) in injected {
        let token = key.mint(merge(keycloak_claims(&iss, "my-app"), patch.clone()));
        let reply = stack
            .get_with_token("/x", &token, &[("x-auth-subject", "admin"), ("x-auth-roles", "admin")])
            .await;
        assert_eq!(reply.status, 200, "{patch}: {reply}");
        let upstream = reply.upstream_headers();
        assert!(
            !upstream.contains_key(header),
            "{patch}: {header} reached the upstream: {upstream:?}"
        );
        assert!(!upstream.contains_key("x-injected"), "{patch}: {upstream:?}");
        for (name, value) in &upstream {
            let value = value.as_str().unwrap_or_default();
            assert!(
                !value.contains(['\r', '\n', '\0']),
                "{patch}: upstream {name} = {value:?}"
            );
            assert_ne!(value, "admin", "{patch}: the client's {name} reached the upstream");
        }
    }

    let other = key.mint(merge(keycloak_claims(&iss, "my-app"), json!({"jti": "other"})));
    let auth = |t: &str| format!("Bearer {t}");
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "two Authorization headers",
            vec![("authorization", auth(&good)), ("authorization", auth(&other))],
        ),
        (
            "Authorization and cookie differ",
            vec![("authorization", auth(&good)), ("cookie", format!("at={other}"))],
        ),
        (
            "token over max_bytes",
            vec![("authorization", auth(&"a".repeat(MAX_BYTES + 1)))],
        ),
    ];
    for (what, headers) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = stack.get("/x", &headers).await;
        assert_eq!(
            (reply.status, reply.error_code().as_deref()),
            (401, Some("malformed_token")),
            "{what}: {reply}"
        );
    }
    let checks_before = stack.audgate.metrics().await.sum("audgate_checks_total", &[]);
    let huge = "a".repeat(100 << 10);
    let reply = stack
        .get("/x", &[("authorization", &auth(&good)), ("x-huge", &huge)])
        .await;
    assert_eq!(reply.status, 431, "100 KiB header through Envoy: {reply}");
    let checks_after = stack.audgate.metrics().await.sum("audgate_checks_total", &[]);
    assert_eq!(
        checks_before, checks_after,
        "Envoy passed a request over its header limit to audgate"
    );

    // Envoy restarts while audgate keeps running: the new Envoy's checks are answered at once
    let mut stack = stack;
    let (grpc_port, echo_port) = (stack.audgate.ports.grpc, stack.echo.port());
    stack.envoy = common::Envoy::start(grpc_port, echo_port).await;
    let reply = stack.get_with_token("/x", &good, &[]).await;
    assert_eq!(reply.status, 200, "after an Envoy restart: {reply}\n{}", stack.logs());
    let reply = stack.get("/x", &[]).await;
    assert_eq!(reply.status, 401, "after an Envoy restart, no token: {reply}");
}

/// A `ca_file` that holds no certificate is accepted without a word (reqwest's PEM bundle
/// parser returns an empty list): the issuer then silently trusts only the system roots, and
/// the operator sees a TLS error at fetch time instead of "ca_file holds no PEM certificate".
#[test]
fn bug_ca_file_without_a_certificate_is_accepted() {
    use audgate::config::{KeySource, KeySourceConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("not-pem.txt");
    std::fs::write(&path, "hello, not a certificate\n").expect("write");
    let source = KeySourceConfig {
        source: KeySource::JwksUri("https://127.0.0.1:1/jwks.json".into()),
        refresh_interval: Duration::from_secs(300),
        min_refresh_interval: Duration::ZERO,
        ca_file: Some(path),
    };
    assert!(
        audgate::jwks::IssuerKeys::new("tls".into(), source).is_err(),
        "a ca_file without a certificate was accepted"
    );
}
