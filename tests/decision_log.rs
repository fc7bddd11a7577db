//! `logging.decisions` (SPEC.md "Logs"): `denials` (the default) logs deny, dry_run_deny and
//! error and no allow; `all` logs every decision; `off` none. Checked on the real binary's
//! stderr, with Envoy's `x-request-id` identifying each check's line.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Routes for an allow (`/open`, anonymous), a deny (`/strict` without a token) and a
/// dry-run deny (`/dry` without a token).
fn config(issuer: &str, logging: &str) -> String {
    format!(
        r#"
issuers:
  test: {{ issuer: "{issuer}", discovery: true }}
routes:
  - {{ name: open, match: {{ path_prefix: /open }}, allow_anonymous: true }}
  - {{ name: strict, match: {{ path_prefix: /strict }}, client_ids: [api] }}
  - {{ name: dry, match: {{ path_prefix: /dry }}, client_ids: [api], mode: dry_run }}
{logging}
"#
    )
}

#[tokio::test]
async fn which_decisions_get_a_line() {
    let key = TestKey::rsa("k1");
    let issuer = IssuerServer::start(&[&key]).await;
    let token = key.mint(merge(
        keycloak_claims(&issuer.issuer_url(), "web"),
        json!({"aud": "api"}),
    ));
    // (logging section, whether allow / deny / dry_run_deny get a line)
    let cases = [
        ("", [false, true, true]),
        ("logging: {decisions: denials}", [false, true, true]),
        ("logging: {decisions: all}", [true, true, true]),
        ("logging: {decisions: off}", [false, false, false]),
    ];
    for (logging, expected) in cases {
        let audgate = Audgate::start(&config(&issuer.issuer_url(), logging)).await;
        audgate.wait_ready().await;
        let grpc = GrpcAuthz::connect(audgate.ports.grpc).await.unwrap();
        let tag = format!("{}", audgate.ports.grpc);
        let ids = [
            format!("allow-{tag}"),
            format!("deny-{tag}"),
            format!("dry-{tag}"),
            format!("valid-{tag}"),
        ];
        for (path, id) in [("/open/x", &ids[0]), ("/strict/x", &ids[1]), ("/dry/x", &ids[2])] {
            grpc.check(&CheckCall::get("h", path).request_id(id)).await.unwrap();
        }
        // a verified allow too, and a last deny that marks the end of the checks
        let reply = grpc
            .check(&CheckCall::get("h", "/strict/y").bearer(&token).request_id(&ids[3]))
            .await
            .unwrap();
        assert!(reply.is_allow(), "{reply}");
        let marker = format!("end-{tag}");
        grpc.check(&CheckCall::get("h", "/strict/z").request_id(&marker))
            .await
            .unwrap();
        if logging.contains("off") {
            // nothing to wait for: give the writer thread a moment, then expect silence
            tokio::time::sleep(Duration::from_millis(500)).await;
        } else {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !audgate.logs().contains(&marker) {
                assert!(
                    Instant::now() < deadline,
                    "{logging:?}: no line for the last deny\n{}",
                    audgate.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let logs = audgate.logs();
        let logged = |id: &str| logs.contains(&format!("request_id=\"{id}\""));
        assert_eq!(
            [logged(&ids[0]), logged(&ids[1]), logged(&ids[2])],
            expected,
            "{logging:?}: allow / deny / dry_run_deny lines\n{logs}"
        );
        assert_eq!(logged(&ids[3]), expected[0], "{logging:?}: a verified allow\n{logs}");
        assert!(!logs.contains(&token), "a token in the log");
    }
}
