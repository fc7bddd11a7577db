//! Writes the seed corpus: `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`.
//! Seeds are named `seed-*` and overwritten on each run; what libFuzzer adds to the corpus
//! directories keeps its hash names.
//!
//! - jwt: tokens of every fixed key, expired / forged / `alg: none` / HS256 / `crit` / `jku`
//!   shapes, the jwt_verify_lib conformance tokens, and signed-JSON inputs ([`props::SIGN`]).
//! - evaluate: requests for every route and token source of `props::CONFIG`.
//! - config: every config in the repository (tests, deploy, SPEC.md's example).
//! - jwks: the fixture key sets, the conformance JWKS documents, broken entries.

use std::fs;
use std::path::{Path, PathBuf};

use audgate_fuzz::props::{self, EvalCase, ISSUER, NOW, PARTNER, SEP, SIGN, fixture, good_claims};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn merge(mut base: Value, patch: Value) -> Value {
    if let (Some(b), Value::Object(p)) = (base.as_object_mut(), patch) {
        for (k, v) in p {
            if v.is_null() {
                b.remove(&k);
            } else {
                b.insert(k, v);
            }
        }
    }
    base
}

struct Out {
    dir: PathBuf,
    count: usize,
}

impl Out {
    fn new(root: &Path, target: &str) -> Out {
        let dir = root.join("corpus").join(target);
        fs::create_dir_all(&dir).unwrap();
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with("seed-") {
                fs::remove_file(path).unwrap();
            }
        }
        Out { dir, count: 0 }
    }

    fn put(&mut self, name: &str, bytes: impl AsRef<[u8]>) {
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
            .collect();
        fs::write(self.dir.join(format!("seed-{name}")), bytes).unwrap();
        self.count += 1;
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let repo = root.parent().unwrap();
    let f = fixture();
    let conformance: Vec<Value> = ["jwt_verify_lib.json", "jwt_verify_lib.compat.json"]
        .iter()
        .flat_map(|name| {
            let text = fs::read_to_string(repo.join("tests/conformance").join(name)).unwrap();
            serde_json::from_str::<Vec<Value>>(&text).unwrap()
        })
        .collect();

    // ---- jwt
    let mut jwt = Out::new(&root, "jwt");
    let kc = &f.signers[0];
    let ec = &f.signers[2];
    for (signer, token) in f.signers.iter().zip(&f.tokens) {
        jwt.put(&format!("good-{}-{}", signer.kid, signer.alg), token);
    }
    let claims = good_claims(ISSUER);
    let shapes: Vec<(&str, String)> = vec![
        ("expired", kc.mint(&merge(claims.clone(), json!({"exp": NOW - 3600})))),
        ("exp-float", ec.mint(&merge(claims.clone(), json!({"exp": (NOW + 60) as f64 + 0.5})))),
        ("exp-huge", ec.mint(&merge(claims.clone(), json!({"exp": 1e300})))),
        ("exp-string", ec.mint(&merge(claims.clone(), json!({"exp": "1800000300"})))),
        ("nbf-future", ec.mint(&merge(claims.clone(), json!({"nbf": NOW + 3600})))),
        ("aud-array", ec.mint(&merge(claims.clone(), json!({"aud": ["orders-api", "account"]})))),
        ("aud-number", ec.mint(&merge(claims.clone(), json!({"aud": 7})))),
        ("typ-id", ec.mint(&merge(claims.clone(), json!({"typ": "ID"})))),
        ("other-iss", ec.mint(&merge(claims.clone(), json!({"iss": "https://evil.example.com"})))),
        ("partner", f.signers[4].mint(&good_claims(PARTNER))),
        (
            "kid-unknown",
            ec.token(json!({"alg": "ES256", "kid": "nope"}).to_string().as_bytes(), claims.to_string().as_bytes()),
        ),
        ("no-kid", ec.token(br#"{"alg":"ES256"}"#, claims.to_string().as_bytes())),
        (
            "jku",
            f.signers[5].token(
                json!({"alg": "EdDSA", "kid": "fz-attacker", "jku": "https://evil.example.com/jwks", "jwk": f.signers[5].jwk()})
                    .to_string()
                    .as_bytes(),
                claims.to_string().as_bytes(),
            ),
        ),
        (
            "crit",
            ec.token(br#"{"alg":"ES256","kid":"fz-ec","crit":["exp"],"exp":1}"#, claims.to_string().as_bytes()),
        ),
        (
            "alg-none",
            format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(claims.to_string())),
        ),
        (
            "hs256",
            format!("{}.{}.{}", b64(r#"{"alg":"HS256","kid":"fz-rsa"}"#), b64(claims.to_string()), b64([7u8; 32])),
        ),
        (
            "es256-zero",
            format!("{}.{}.{}", b64(ec.header().to_string()), b64(claims.to_string()), b64([0u8; 64])),
        ),
        (
            "dup-header",
            ec.token(br#"{"alg":"ES256","alg":"none","kid":"fz-ec"}"#, claims.to_string().as_bytes()),
        ),
        (
            "nested",
            ec.mint(&merge(claims.clone(), json!({"x": [[[[[[[[[[{"a": [{"b": null}]}]]]]]]]]]]}))),
        ),
        (
            "control-chars",
            ec.mint(&merge(claims.clone(), json!({"sub": "a\r\nx-injected: 1\u{0}", "email": "\u{7f}"}))),
        ),
    ];
    // a payload that is a JSON string: serde_json's error message quotes it whole
    jwt.put(
        "payload-json-string",
        format!(
            "{}.{}.{}",
            b64(r#"{"alg":"RS256"}"#),
            b64(format!("\"{}\"", "a".repeat(3000))),
            b64("sig")
        ),
    );
    for (name, token) in shapes {
        jwt.put(name, token);
    }
    for case in &conformance {
        if let Some(token) = case["token"].as_str() {
            jwt.put(&format!("conformance-{}", case["id"].as_str().unwrap()), token);
        }
    }
    let signed = |selector: u8, header: &str, payload: &Value| {
        let mut bytes = vec![SIGN, selector, 17];
        bytes.extend_from_slice(header.as_bytes());
        bytes.push(SEP);
        bytes.extend_from_slice(payload.to_string().as_bytes());
        bytes
    };
    for (i, signer) in f.signers.iter().enumerate() {
        let header = signer.header().to_string();
        let claims = good_claims(signer.issuer.unwrap_or(ISSUER));
        jwt.put(&format!("signed-{i}"), signed(i as u8, &header, &claims));
        jwt.put(&format!("signed-default-header-{i}"), signed(i as u8, "", &claims));
    }
    jwt.put(
        "signed-min",
        signed(2, r#"{"alg":"ES256"}"#, &json!({"iss": ISSUER, "exp": NOW + 1})),
    );
    jwt.put(
        "signed-times",
        signed(
            3,
            "",
            &json!({"iss": ISSUER, "exp": -1e300, "nbf": 1.5, "iat": u64::MAX}),
        ),
    );
    println!("jwt: {} seeds", jwt.count);

    // ---- evaluate
    let mut eval = Out::new(&root, "evaluate");
    let case = |place: u8, signer: u8, host: &str, path: &str, payload: &Value| EvalCase {
        place,
        signer,
        method: b"GET".to_vec(),
        host: host.as_bytes().to_vec(),
        path: path.as_bytes().to_vec(),
        token_payload: payload.to_string().into_bytes(),
        headers: vec![(b"x-request-id".to_vec(), b"r-1".to_vec())],
        ..EvalCase::default()
    };
    let good = good_claims(ISSUER);
    let orders = merge(good.clone(), json!({"aud": ["orders-api", "account"]}));
    let seeds: Vec<(&str, EvalCase)> = vec![
        ("health", case(0, 0, "x", "/healthz", &good)),
        ("no-route", case(1, 0, "x", "/nowhere", &good)),
        (
            "orders-rs256",
            case(1, 0, "orders.example.com", "/api/orders/7?x=1", &orders),
        ),
        (
            "orders-wildcard-ps256",
            case(1, 1, "a.shop.example.com:8443", "/api/orders", &orders),
        ),
        (
            "orders-no-scope",
            case(
                1,
                2,
                "orders.example.com",
                "/api/orders",
                &merge(orders.clone(), json!({"scope": "openid"})),
            ),
        ),
        ("legacy-cookie", case(2, 2, "x", "/legacy/12/a", &good)),
        ("legacy-query", case(3, 3, "x", "/legacy/12?y=2", &good)),
        ("legacy-x-token", case(4, 3, "x", "/legacy/1", &good)),
        ("legacy-twice", case(5, 2, "x", "/legacy/1", &good)),
        ("legacy-two-different", case(6, 2, "x", "/legacy/1", &good)),
        (
            "admin-roles",
            case(
                1,
                2,
                "x",
                "/admin/users",
                &merge(good.clone(), json!({"azp": "admin-ui"})),
            ),
        ),
        (
            "admin-partner",
            case(
                1,
                4,
                "x",
                "/admin",
                &merge(good_claims(PARTNER), json!({"client_id": "admin-ui"})),
            ),
        ),
        ("shadow", case(1, 2, "x", "/shadow/x", &good)),
        (
            "partner",
            case(1, 4, "partner.example.com", "/p", &good_claims(PARTNER)),
        ),
        (
            "down",
            case(1, 4, "partner.example.com", "/p", &good_claims(props::DOWN)),
        ),
        ("attacker", case(1, 5, "x", "/legacy/1", &good)),
        (
            "expired",
            case(1, 2, "x", "/legacy/1", &merge(good.clone(), json!({"exp": NOW - 100}))),
        ),
        (
            "claims-control",
            case(
                1,
                3,
                "x",
                "/legacy/1",
                &merge(
                    good.clone(),
                    json!({"sub": "a\nb", "realm_access": {"roles": ["x\r\ny"]}}),
                ),
            ),
        ),
    ];
    for (name, mut c) in seeds {
        eval.put(name, c.encode());
        c.flip = 9;
        eval.put(&format!("{name}-flipped"), c.encode());
    }
    let mut hinted = case(1, 2, "x", "/anything", &good);
    hinted.send_hint = true;
    hinted.hint = b"legacy".to_vec();
    eval.put("hint-legacy", hinted.encode());
    hinted.hint = b"nope".to_vec();
    eval.put("hint-unknown", hinted.encode());
    let mut spoof = case(1, 2, "x", "/legacy/1", &good);
    spoof.headers.push((b"x-auth-subject".to_vec(), b"admin".to_vec()));
    spoof.headers.push((b"authorization".to_vec(), b"Basic YTpi".to_vec()));
    eval.put("spoofed-claim-header", spoof.encode());
    let mut raw = case(0, 0, "x", "/legacy/1", &good);
    raw.headers.push((
        b"authorization".to_vec(),
        format!("Bearer {}", f.tokens[3]).into_bytes(),
    ));
    eval.put("raw-authorization", raw.encode());
    println!("evaluate: {} seeds", eval.count);

    // ---- config
    let mut config = Out::new(&root, "config");
    config.put("fuzz-config", props::CONFIG);
    for path in [
        "tests/testdata/policy/audgate.yaml",
        "deploy/kubernetes/base/audgate.yaml",
        "deploy/kubernetes/overlays/istio/audgate.yaml",
    ] {
        if let Ok(text) = fs::read_to_string(repo.join(path)) {
            config.put(path, text);
        }
    }
    for (name, path) in [("spec", "../shared/SPEC.md"), ("readme", "README.md")] {
        let Ok(text) = fs::read_to_string(repo.join(path)) else {
            continue;
        };
        for (i, block) in text.split("```yaml\n").skip(1).enumerate() {
            if let Some(end) = block.find("```") {
                config.put(&format!("{name}-{i}"), &block[..end]);
            }
        }
    }
    // the config strings of the test files (`const CONFIG: &str = r#"..."#;`)
    for entry in fs::read_dir(repo.join("tests")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).unwrap();
            for (i, block) in text.split("r#\"\n").skip(1).enumerate() {
                let Some(end) = block.find("\"#") else { continue };
                let body = &block[..end];
                if body.contains("issuers:") && !body.contains('{') || body.contains("routes:") && !body.contains("{{")
                {
                    let stem = path.file_stem().unwrap().to_string_lossy();
                    config.put(&format!("tests-{stem}-{i}"), body);
                }
            }
        }
    }
    config.put(
        "yaml-aliases",
        "issuers: &i\n  kc: {issuer: https://a, jwks_file: /dev/null}\nroutes:\n  - &r {name: a, client_ids: [x]}\n  - *r\n",
    );
    // aliases of aliases: the schema has no nested lists of strings, so they cannot expand
    let mut laughs = String::from("issuers:\n  kc:\n    issuer: https://a\n    jwks_file: /dev/null\n");
    laughs.push_str("    issuer_aliases: &a0 [x, x, x, x, x, x, x, x]\n");
    for i in 1..8 {
        let refs = vec![format!("*a{}", i - 1); 8].join(", ");
        laughs.push_str(&format!(
            "  k{i}:\n    issuer: https://b{i}\n    jwks_file: /dev/null\n    issuer_aliases: &a{i} [{refs}]\n"
        ));
    }
    laughs.push_str("routes:\n  - {name: r, client_ids: [x]}\n");
    config.put("yaml-alias-bomb", laughs);
    println!("config: {} seeds", config.count);

    // ---- jwks
    let mut jwks = Out::new(&root, "jwks");
    let all: Vec<Value> = f.signers.iter().map(|s| s.jwk()).collect();
    jwks.put("fixture-all", json!({"keys": all}).to_string());
    for (i, s) in f.signers.iter().enumerate() {
        jwks.put(&format!("fixture-{i}"), json!({"keys": [s.jwk()]}).to_string());
        let mut enc = s.jwk();
        enc["use"] = json!("enc");
        jwks.put(&format!("fixture-enc-{i}"), json!({"keys": [enc]}).to_string());
    }
    let mut padded = f.signers[0].jwk();
    padded["n"] = json!(format!("AA{}==", padded["n"].as_str().unwrap()));
    jwks.put("rsa-leading-zero-padding", json!({"keys": [padded]}).to_string());
    jwks.put(
        "broken-entries",
        json!({"keys": [
            {"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "OKP", "kid": "x25519", "crv": "X25519", "x": "AA"},
            {"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "ops", "key_ops": ["encrypt"], "n": "AQAB", "e": "AQAB"},
            "not an object", 7, null
        ]})
        .to_string(),
    );
    let mut seen = std::collections::HashSet::new();
    for case in &conformance {
        let doc = case["jwks"].to_string();
        if case["jwks"].is_object() && seen.insert(doc.clone()) {
            jwks.put(&format!("conformance-{}", case["id"].as_str().unwrap()), doc);
        }
    }
    println!("jwks: {} seeds", jwks.count);
}
