//! Ephemeral signing keys for `audgate test`: they stand in for every issuer's keys, so a case
//! can give the claims of a token instead of a real one. Made in memory for one run, never
//! written anywhere.

use std::collections::HashMap;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::authz::Alg;
use crate::jwks::KeySet;

enum Material {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, &'static str),
    Ed(Ed25519KeyPair),
}

/// One key per key type, made on first use.
#[derive(Default)]
pub struct Signer {
    keys: HashMap<&'static str, Material>,
}

/// The key type an algorithm signs with, also the kid of its stand-in key.
fn key_name(alg: Alg) -> Option<&'static str> {
    Some(match alg {
        Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => "audgate-test-rsa",
        Alg::ES256 => "audgate-test-p256",
        Alg::ES384 => "audgate-test-p384",
        Alg::EdDSA => "audgate-test-ed25519",
        Alg::ES512 => return None,
    })
}

pub fn can_sign(alg: Alg) -> bool {
    key_name(alg).is_some()
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    /// The kid a token signed with `alg` carries by default.
    pub fn kid(alg: Alg) -> Option<&'static str> {
        key_name(alg)
    }

    fn key(&mut self, name: &'static str) -> Result<&Material, String> {
        if !self.keys.contains_key(name) {
            let material = match name {
                "audgate-test-rsa" => Material::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).map_err(|e| e.to_string())?),
                "audgate-test-p256" => Material::Ec(
                    EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).map_err(|e| e.to_string())?,
                    "P-256",
                ),
                "audgate-test-p384" => Material::Ec(
                    EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING).map_err(|e| e.to_string())?,
                    "P-384",
                ),
                _ => Material::Ed(Ed25519KeyPair::generate().map_err(|e| e.to_string())?),
            };
            self.keys.insert(name, material);
        }
        self.keys.get(name).ok_or_else(|| "no key".to_owned())
    }

    /// A compact JWS over `header` and `claims`, signed with the stand-in key for `alg`.
    pub fn sign(&mut self, alg: Alg, header: &Value, claims: &Value) -> Result<String, String> {
        let name = key_name(alg).ok_or_else(|| format!("audgate test cannot sign {alg}"))?;
        let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let rng = SystemRandom::new();
        let sig = match self.key(name)? {
            Material::Rsa(pair) => {
                let padding: &'static dyn signature::RsaEncoding = match alg {
                    Alg::RS256 => &signature::RSA_PKCS1_SHA256,
                    Alg::RS384 => &signature::RSA_PKCS1_SHA384,
                    Alg::RS512 => &signature::RSA_PKCS1_SHA512,
                    Alg::PS256 => &signature::RSA_PSS_SHA256,
                    Alg::PS384 => &signature::RSA_PSS_SHA384,
                    _ => &signature::RSA_PSS_SHA512,
                };
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(padding, &rng, input.as_bytes(), &mut sig)
                    .map_err(|e| e.to_string())?;
                sig
            }
            Material::Ec(pair, _) => pair
                .sign(&rng, input.as_bytes())
                .map_err(|e| e.to_string())?
                .as_ref()
                .to_vec(),
            Material::Ed(pair) => pair.sign(input.as_bytes()).as_ref().to_vec(),
        };
        Ok(format!("{input}.{}", b64(sig)))
    }

    /// The public halves of every key made so far, as the key set of every issuer.
    pub fn key_set(&self) -> KeySet {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|(kid, m)| match m {
                Material::Rsa(pair) => {
                    let public = pair.public_key();
                    json!({"kty": "RSA", "kid": kid, "use": "sig",
                           "n": b64(public.modulus().big_endian_without_leading_zero()),
                           "e": b64(public.exponent().big_endian_without_leading_zero())})
                }
                Material::Ec(pair, crv) => {
                    let point = pair.public_key().as_ref();
                    let half = (point.len() - 1) / 2;
                    json!({"kty": "EC", "kid": kid, "use": "sig", "crv": crv,
                           "x": b64(&point[1..=half]), "y": b64(&point[1 + half..])})
                }
                Material::Ed(pair) => {
                    json!({"kty": "OKP", "kid": kid, "use": "sig", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
                }
            })
            .collect();
        KeySet::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap_or_default()
    }
}
