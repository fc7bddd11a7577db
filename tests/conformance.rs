//! google/jwt_verify_lib's test vectors (the verifier inside Envoy's jwt_authn), mapped to
//! audgate's reason codes: see tests/conformance/README.md. Every case runs through the
//! decision core with the case's JWKS, issuer, algorithms and route.

use std::collections::HashMap;
use std::sync::Arc;

use audgate::authz::{self, CheckInput, Headers, Verdict};
use audgate::config;
use audgate::jwks::KeySet;
use serde_json::Value;

fn now() -> i64 {
    audgate::check::unix_now()
}

fn yaml_list(items: &[Value]) -> String {
    let quoted: Vec<String> = items.iter().map(|v| v.to_string()).collect();
    format!("[{}]", quoted.join(", "))
}

/// The vectors were signed 2017-2020: cases marked `needs_leeway` get a leeway that reaches
/// back to one day before the earliest such `exp` (the README's rule), standing in for a
/// clock set before the tokens expired.
fn leeway_for(cases: &[Value]) -> i64 {
    let earliest = cases
        .iter()
        .filter(|c| c["time"]["needs_leeway"].as_bool() == Some(true))
        .filter_map(|c| c["time"]["exp"].as_i64())
        .min()
        .unwrap_or(now());
    now() - earliest + 86_400
}

/// The decision for one case, as `allow` or a reason code.
fn run_case(case: &Value, long_leeway: i64) -> String {
    let leeway = match case["time"]["needs_leeway"].as_bool() {
        Some(true) => long_leeway,
        _ => 30,
    };
    let route = &case["route"];
    let yaml = format!(
        "issuers:\n  conformance:\n    issuer: {issuer}\n    jwks_file: /dev/null\n    algorithms: {algs}\n    leeway: {leeway}\n\
         routes:\n  - name: conformance\n    client_ids: {ids}\n    client_id_claims: {claims}\n",
        issuer = case["issuer"],
        algs = yaml_list(case["algorithms"].as_array().unwrap()),
        ids = yaml_list(route["client_ids"].as_array().unwrap()),
        claims = yaml_list(route["client_id_claims"].as_array().unwrap()),
    );
    let loaded = config::parse(&yaml).unwrap_or_else(|e| panic!("{}: config does not load: {e:?}\n{yaml}", case["id"]));
    let keys = Arc::new(KeySet::parse(case["jwks"].to_string().as_bytes()).expect("case JWKS parses"));
    let headers = HashMap::from([(
        "authorization".to_owned(),
        format!("Bearer {}", case["token"].as_str().unwrap_or_default()),
    )]);
    let input = CheckInput {
        method: "GET",
        host: "conformance.test",
        path: "/",
        headers: Headers::Map(&headers),
        route_hint: None,
    };
    let decision = authz::evaluate(&loaded.config.policy, &input, |_| Some(keys.clone()), now());
    let response = authz::respond(&loaded.config.policy, &decision);
    assert_eq!(
        response.status,
        decision.reason.http_status(),
        "{}: status and reason disagree",
        case["id"]
    );
    match decision.verdict {
        Verdict::Allow => "allow".to_owned(),
        _ => decision.reason.code().to_owned(),
    }
}

fn run_file(path: &str) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let cases: Vec<Value> = serde_json::from_str(&text).expect("vectors are JSON");
    assert!(!cases.is_empty());
    let leeway = leeway_for(&cases);
    let mut failures = Vec::new();
    for case in &cases {
        let got = run_case(case, leeway);
        let expected = &case["expected"];
        let ok = match expected {
            Value::String(s) => *s == got,
            Value::Array(list) => list.iter().any(|r| r.as_str() == Some(&got)),
            _ => false,
        };
        if !ok {
            failures.push(format!("{}: got {got}, expected {expected}", case["id"]));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn jwt_verify_lib_vectors() {
    run_file("tests/conformance/jwt_verify_lib.json");
}

#[test]
fn jwt_verify_lib_kidless_tokens_tried_against_every_fitting_key() {
    run_file("tests/conformance/jwt_verify_lib.compat.json");
}
