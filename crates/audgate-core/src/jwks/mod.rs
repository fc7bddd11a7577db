//! Issuer keys: parsing a JWKS document into the keys the core verifies with. Pure.

mod keyset;

pub use keyset::{JwksError, Key, KeyKind, KeySet, SkippedKey};
