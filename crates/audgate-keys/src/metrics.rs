//! The key-cache metrics of SPEC.md, over the `metrics` facade (a no-op until a recorder is
//! installed: `audgate serve` installs its Prometheus recorder).

use metrics::{counter, gauge};

const JWKS_REFRESH: &str = "audgate_jwks_refresh_total";
const JWKS_KEYS: &str = "audgate_jwks_keys";

pub fn record_jwks_refresh(issuer: &str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(JWKS_REFRESH, "issuer" => issuer.to_owned(), "result" => result).increment(1);
}

pub fn set_jwks_keys(issuer: &str, keys: usize) {
    gauge!(JWKS_KEYS, "issuer" => issuer.to_owned()).set(keys as f64);
}
