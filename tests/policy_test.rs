//! `audgate test`, run as a user runs it: the real binary on the cases in tests/testdata/policy.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn data(name: &str) -> PathBuf {
    common::repo_root().join("tests/testdata/policy").join(name)
}

fn audgate_test(cases: &[&str]) -> (i32, String, String) {
    let Output { status, stdout, stderr } = Command::new(common::audgate_binary())
        .arg("test")
        .arg("--config")
        .arg(data("audgate.yaml"))
        .args(cases.iter().map(|c| data(c)))
        .output()
        .expect("audgate runs");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[test]
fn every_reason_code_a_policy_test_can_reach_passes() {
    let (code, out, err) = audgate_test(&["cases.yaml"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.ends_with("26 passed, 0 failed\n"), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("ok    ")).count(), 26);
    // the cases file really covers every reason (keys_unavailable cannot happen: the
    // ephemeral keys stand in for every issuer's)
    let cases = std::fs::read_to_string(data("cases.yaml")).unwrap();
    for reason in audgate::authz::Reason::ALL
        .iter()
        .filter(|r| r.code() != "keys_unavailable")
    {
        assert!(
            cases.contains(&format!("reason: {}", reason.code())),
            "no case for {reason}"
        );
    }
}

#[test]
fn a_failing_case_says_what_was_expected_what_happened_and_how_to_fix_it() {
    let (code, out, _) = audgate_test(&["failing.yaml"]);
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "ok    passes");
    assert!(
        lines[1].starts_with("FAIL  expects an allow that the azp-only token does not get  (")
            && lines[1].ends_with("failing.yaml:7)"),
        "{}",
        lines[1]
    );
    assert_eq!(
        lines[2].trim(),
        "expected allow allowed, got deny 403 audience_mismatch on route orders"
    );
    assert!(
        lines[3]
            .trim()
            .starts_with("why: route orders needs one of [orders-api] in aud")
    );
    assert!(out.contains("hint: (a) in Keycloak, add an Audience mapper that puts `orders-api` in aud"));
    assert!(out.contains("-r shop"), "the realm comes from iss: {out}");
    assert!(out.contains("hint: (b) or set `client_id_claims: [aud, azp]` on route orders"));
    assert!(out.contains("header x-auth-client-id: expected `orders-api`, got not set"));
    assert_eq!(*lines.last().unwrap(), "1 passed, 1 failed");
}

#[test]
fn broken_cases_files_are_reported_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "cases:\n  - name: x\n    expect: { reason: allowd }\n  - name: y\n    tokn: abc\n",
    )
    .unwrap();
    let output = Command::new(common::audgate_binary())
        .args(["test", "--config"])
        .arg(data("audgate.yaml"))
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.yaml:") && err.contains("tokn"), "{err}");
}
