//! Shared by the criterion benches (`benches/core.rs`) and the load generator
//! (`examples/loadgen.rs`, through `#[path]`): signing keys made at run time with aws-lc-rs
//! (never written to disk), a Keycloak-sized access-token payload, audgate configs, and the
//! CheckRequest Envoy sends for one request.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Write as _;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use serde_json::{Value, json};

/// The issuer every bench token names.
pub const ISSUER: &str = "https://sso.bench.test/realms/shop";
/// The client id the bench route requires in `aud` (and Envoy's `jwt_authn` `audiences`).
pub const CLIENT_ID: &str = "orders-api";
/// The host and path of the benchmarked request.
pub const HOST: &str = "shop.bench.test";
pub const PATH: &str = "/api/orders/7?expand=items";

/// The signature algorithms benchmarked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    RS256,
    ES256,
    EdDSA,
}

impl Alg {
    pub const ALL: [Alg; 3] = [Alg::RS256, Alg::ES256, Alg::EdDSA];

    pub fn name(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::ES256 => "ES256",
            Alg::EdDSA => "EdDSA",
        }
    }

    pub fn parse(s: &str) -> Option<Alg> {
        Alg::ALL.into_iter().find(|a| a.name().eq_ignore_ascii_case(s))
    }

    fn kid(self) -> &'static str {
        match self {
            Alg::RS256 => "bench-rsa",
            Alg::ES256 => "bench-p256",
            Alg::EdDSA => "bench-ed25519",
        }
    }
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// One key per algorithm (RSA 2048, P-256, Ed25519), made in memory.
pub struct Keys {
    rsa: RsaKeyPair,
    p256: EcdsaKeyPair,
    ed25519: Ed25519KeyPair,
    rng: SystemRandom,
}

impl Keys {
    pub fn generate() -> Keys {
        Keys {
            rsa: RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA 2048 key"),
            p256: EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).expect("P-256 key"),
            ed25519: Ed25519KeyPair::generate().expect("Ed25519 key"),
            rng: SystemRandom::new(),
        }
    }

    /// The public JWKS (`{"keys": [...]}`) of all three keys.
    pub fn jwks(&self) -> String {
        let rsa = self.rsa.public_key();
        let point = self.p256.public_key().as_ref();
        let half = (point.len() - 1) / 2;
        json!({"keys": [
            {"kty": "RSA", "kid": Alg::RS256.kid(), "alg": "RS256", "use": "sig",
             "n": b64(rsa.modulus().big_endian_without_leading_zero()),
             "e": b64(rsa.exponent().big_endian_without_leading_zero())},
            {"kty": "EC", "kid": Alg::ES256.kid(), "alg": "ES256", "use": "sig", "crv": "P-256",
             "x": b64(&point[1..=half]), "y": b64(&point[1 + half..])},
            {"kty": "OKP", "kid": Alg::EdDSA.kid(), "alg": "EdDSA", "use": "sig", "crv": "Ed25519",
             "x": b64(self.ed25519.public_key().as_ref())},
        ]})
        .to_string()
    }

    /// A compact JWS over `claims` with header `{alg, typ: JWT, kid}`.
    pub fn sign(&self, alg: Alg, claims: &Value) -> String {
        let header = json!({"alg": alg.name(), "typ": "JWT", "kid": alg.kid()});
        let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let sig = match alg {
            Alg::RS256 => {
                let mut sig = vec![0; self.rsa.public_modulus_len()];
                self.rsa
                    .sign(&signature::RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut sig)
                    .expect("RS256 sign");
                sig
            }
            Alg::ES256 => self
                .p256
                .sign(&self.rng, input.as_bytes())
                .expect("ES256 sign")
                .as_ref()
                .to_vec(),
            Alg::EdDSA => self.ed25519.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", b64(sig))
    }
}

/// A Keycloak (>= 4.6, with an Audience mapper for [`CLIENT_ID`]) access-token payload of
/// about 1 KB: realm and client roles, scope, profile claims. `n` makes `sub`, `sid` and
/// `jti` distinct per token; valid from `now` for `ttl` seconds.
pub fn keycloak_claims(n: u64, now: i64, ttl: i64) -> Value {
    let id = |salt: u64| {
        let x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(salt);
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            x >> 32,
            (x >> 16) & 0xffff,
            x & 0xfff,
            (x >> 4) & 0xfff,
            x & 0xffff_ffff_ffff
        )
    };
    json!({
        "exp": now + ttl,
        "iat": now,
        "auth_time": now,
        "jti": id(1),
        "iss": ISSUER,
        "aud": [CLIENT_ID, "account"],
        "sub": id(2),
        "typ": "Bearer",
        "azp": "shop-frontend",
        "nonce": "b6a1f4f0-0f0e-4c2e-9a8f-1c3d5e7f9a0b",
        "session_state": id(3),
        "sid": id(3),
        "acr": "1",
        "allowed-origins": ["https://shop.bench.test", "https://admin.shop.bench.test"],
        "realm_access": {"roles": ["offline_access", "uma_authorization", "default-roles-shop", "customer"]},
        "resource_access": {
            "orders-api": {"roles": ["orders:read", "orders:write"]},
            "catalog-api": {"roles": ["catalog:read"]},
            "account": {"roles": ["manage-account", "manage-account-links", "view-profile"]}
        },
        "scope": "openid profile email orders:read orders:write",
        "email_verified": true,
        "name": "Alice Example",
        "preferred_username": format!("alice{n}"),
        "given_name": "Alice",
        "family_name": "Example",
        "email": format!("alice{n}@shop.bench.test"),
        "locale": "en",
        "tenant": "eu-west-1"
    })
}

/// Where the audgate config finds its keys and listens.
pub struct ConfigOptions<'a> {
    pub jwks_file: &'a str,
    /// Routes before the benchmarked one (which is last): 0 for a one-route config.
    pub extra_routes: usize,
    /// `token_cache`: `None` keeps the defaults (100,000 entries, 32 MiB); `Some(0)` turns it off.
    pub cache_entries: Option<u64>,
    /// `token_cache.max_bytes`, when not the default.
    pub cache_bytes: Option<u64>,
    /// `grpc`, `http`, `admin` listen ports on 127.0.0.1 (absent: defaults).
    pub ports: Option<(u16, u16, u16)>,
}

/// An audgate config equivalent to the `jwt_authn` baseline: one issuer, `aud` must carry
/// [`CLIENT_ID`] on `/api/orders` of [`HOST`], claim headers `sub`, `azp`, `aud` and `scope`.
pub fn audgate_config(o: &ConfigOptions<'_>) -> String {
    let mut y = String::new();
    if let Some((grpc, http, admin)) = o.ports {
        let _ = writeln!(
            y,
            "listen:\n  grpc: 127.0.0.1:{grpc}\n  http: 127.0.0.1:{http}\n  admin: 127.0.0.1:{admin}"
        );
    }
    let _ = writeln!(
        y,
        "issuers:\n  shop:\n    issuer: {ISSUER}\n    jwks_file: {}\n    algorithms: [RS256, ES256, EdDSA]\n    refresh_interval: 1h",
        o.jwks_file
    );
    y.push_str(
        "claim_headers:\n  x-auth-subject: sub\n  x-auth-azp: azp\n  x-auth-aud: aud\n  x-auth-scope: scope\n  x-auth-client-id: $client_id\n",
    );
    if o.cache_entries.is_some() || o.cache_bytes.is_some() {
        y.push_str("token_cache:\n");
    }
    if let Some(entries) = o.cache_entries {
        let _ = writeln!(y, "  max_entries: {entries}");
    }
    if let Some(bytes) = o.cache_bytes {
        let _ = writeln!(y, "  max_bytes: {bytes}");
    }
    y.push_str("routes:\n");
    for i in 0..o.extra_routes {
        let _ = writeln!(
            y,
            "  - name: svc{i}\n    match: {{ hosts: [svc{i}.bench.test], path_prefix: /api/svc{i} }}\n    client_ids: [svc{i}-api]"
        );
    }
    let _ = writeln!(
        y,
        "  - name: orders\n    match: {{ hosts: [{HOST}], path_prefix: /api/orders, methods: [GET, POST] }}\n    client_ids: [{CLIENT_ID}]\n    client_id_claims: [aud]"
    );
    y.push_str("default: deny\n");
    y
}

fn peer(ip: &str, port: u32) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.to_owned(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// The headers of a browser-ish `GET` as Envoy forwards them (without `authorization`).
pub fn request_headers(request_id: &str) -> Vec<(&'static str, String)> {
    vec![
        (":authority", HOST.to_owned()),
        (":method", "GET".to_owned()),
        (":path", PATH.to_owned()),
        (":scheme", "https".to_owned()),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36".to_owned()),
        ("accept", "application/json, text/plain, */*".to_owned()),
        ("accept-encoding", "gzip, deflate, br, zstd".to_owned()),
        ("accept-language", "en-GB,en;q=0.9,de;q=0.8".to_owned()),
        ("x-forwarded-proto", "https".to_owned()),
        ("x-forwarded-for", "203.0.113.7".to_owned()),
        ("x-envoy-external-address", "203.0.113.7".to_owned()),
        ("x-request-id", request_id.to_owned()),
        ("cookie", "_ga=GA1.1.1234567890.1700000000; _ga_ABCDEF=GS1.1.1700000000.1.1.1700000100.0.0.0; KEYCLOAK_LOCALE=en; csrf_token=4f2a9c1e8b7d6a5f4e3d2c1b0a998877665544332211; theme=dark; consent=analytics%3D1%26ads%3D0".to_owned()),
        ("referer", "https://shop.bench.test/orders".to_owned()),
    ]
}

/// The CheckRequest Envoy's ext_authz filter sends for a `GET` with `token` (no
/// `allowed_headers` restriction: every request header goes along): about 2.4 KB encoded with
/// a ~1 KB-payload RS256 token.
pub fn check_request(token: &str, request_id: &str) -> CheckRequest {
    let mut headers: HashMap<String, String> = request_headers(request_id)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    headers.insert("authorization".to_owned(), format!("Bearer {token}"));
    let http = HttpRequest {
        id: "4811271375457126617".to_owned(),
        method: "GET".to_owned(),
        headers,
        path: PATH.to_owned(),
        host: HOST.to_owned(),
        scheme: "https".to_owned(),
        protocol: "HTTP/2".to_owned(),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("203.0.113.7", 51234)),
            destination: Some(peer("10.0.0.12", 10000)),
            request: Some(Request {
                time: Some(envoy_types::pb::google::protobuf::Timestamp {
                    seconds: 1_750_000_000,
                    nanos: 123_456_000,
                }),
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}
