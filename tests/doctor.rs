//! `audgate doctor` against a real HTTP issuer on loopback: a healthy issuer, an unreachable
//! one, a discovery `issuer` that is not the configured one, keys that cannot sign, a mix, and
//! static keys from a file.

mod common;

use audgate::config::Config;
use common::{IssuerServer, TestKey, free_port, jwks};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn config(yaml: &str) -> Config {
    match audgate::config::parse(yaml) {
        Ok(loaded) => loaded.config,
        Err(errors) => panic!("test config does not load: {errors:?}\n{yaml}"),
    }
}

/// A config with one issuer `kc` and one route; `issuer_body` is the YAML of the issuer's keys.
fn one_issuer(issuer_body: &str) -> Config {
    config(&format!(
        "issuers:\n  kc:\n{}\nroutes:\n  - name: api\n    client_ids: [api]\n",
        issuer_body
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ))
}

async fn doctor(config: &Config) -> (bool, String) {
    let mut out = String::new();
    let ok = audgate::doctor::run(config, &mut out).await;
    println!("{out}"); // shown with `cargo test --test doctor -- --nocapture`
    (ok, out)
}

fn assert_has(report: &str, needle: &str) {
    assert!(report.contains(needle), "the report lacks {needle:?}:\n{report}");
}

fn assert_lacks(report: &str, needle: &str) {
    assert!(
        !report.contains(needle),
        "the report should not contain {needle:?}:\n{report}"
    );
}

/// The line of the report for one topic (the first one), e.g. `line(report, "clock")`.
fn line<'r>(report: &'r str, topic: &str) -> &'r str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(topic))
        .unwrap_or_else(|| panic!("no {topic} line in the report:\n{report}"))
}

#[tokio::test]
async fn a_healthy_issuer_is_usable_and_its_keys_are_listed() {
    let rsa = TestKey::rsa("rsa-1");
    let ec = TestKey::ec("ec-1");
    let server = IssuerServer::start(&[&rsa, &ec]).await;
    let cfg = one_issuer(&format!("issuer: {}\ndiscovery: true", server.issuer_url()));

    let (ok, report) = doctor(&cfg).await;

    assert!(ok, "a healthy issuer is usable:\n{report}");
    assert_has(&report, &server.discovery_url());
    assert_has(&report, &server.jwks_uri());
    assert!(line(&report, "discovery").contains("ok"), "{report}");
    assert!(line(&report, "discovery").contains("200 OK"), "{report}");
    assert!(line(&report, "issuer").contains("is the configured issuer"), "{report}");
    assert!(line(&report, "jwks").contains("2 keys published"), "{report}");
    assert!(
        line(&report, "keys").contains("2 usable keys (RS256: 1, ES256: 1)"),
        "{report}"
    );
    assert_has(&report, "\"rsa-1\"");
    assert_has(&report, "\"ec-1\"");
    assert_has(&report, "EC P-256");
    // cache headers are shown (the test issuer sends Keycloak's no-cache) and the clock agrees
    assert!(line(&report, "cache").contains("Cache-Control: no-cache"), "{report}");
    assert!(line(&report, "clock").starts_with("  ok"), "{report}");
    assert_lacks(&report, "FAIL");
    assert_lacks(&report, "warn");
    assert_has(&report, "=> usable");
    assert_eq!(
        report.lines().last(),
        Some("1 issuer: 1 usable, 0 unusable"),
        "{report}"
    );
    // never a key's material
    let n = rsa.jwk()["n"].as_str().unwrap().to_owned();
    assert_lacks(&report, &n[..32]);
    let x = ec.jwk()["x"].as_str().unwrap().to_owned();
    assert_lacks(&report, &x[..20]);
}

#[tokio::test]
async fn an_unreachable_discovery_document_makes_the_issuer_unusable() {
    let issuer = format!("http://127.0.0.1:{}/realms/gone", free_port());
    let cfg = one_issuer(&format!("issuer: {issuer}\ndiscovery: true"));

    let (ok, report) = doctor(&cfg).await;

    assert!(!ok, "nothing answers there:\n{report}");
    let discovery = line(&report, "discovery");
    assert!(
        discovery.contains("FAIL") && discovery.contains("unreachable"),
        "{report}"
    );
    assert_has(&report, &format!("{issuer}/.well-known/openid-configuration"));
    assert_has(&report, "=> UNUSABLE: discovery document unreachable");
    assert_has(&report, "clock      not checked");
    assert_eq!(
        report.lines().last(),
        Some("1 issuer: 0 usable, 1 unusable"),
        "{report}"
    );
}

#[tokio::test]
async fn a_discovery_issuer_that_is_not_the_configured_one_is_a_failure() {
    let key = TestKey::rsa("k1");
    let server = IssuerServer::start(&[&key]).await;
    // as with Keycloak reached through an internal address: the configured issuer is the public
    // URL, discovery is fetched (and answers) under the internal one
    let public = "https://sso.example.com/realms/test";
    let cfg = one_issuer(&format!("issuer: {public}\ndiscovery_url: {}", server.discovery_url()));

    let (ok, report) = doctor(&cfg).await;

    assert!(!ok, "an issuer mismatch is unusable:\n{report}");
    let issuer = line(&report, "issuer");
    assert!(issuer.contains("FAIL"), "{report}");
    assert!(
        issuer.contains(&format!("{:?}", server.issuer_url())),
        "names what discovery says:\n{report}"
    );
    assert!(
        issuer.contains(&format!("{public:?}")),
        "names what the config says:\n{report}"
    );
    assert_has(&report, "issuer_aliases");
    assert_has(&report, "hostname");
    assert_has(&report, "=> UNUSABLE: discovery issuer mismatch");
    // the keys are still checked and shown
    assert!(line(&report, "keys").contains("1 usable key"), "{report}");

    // with the discovered issuer as an alias, the same server is fine
    let cfg = one_issuer(&format!(
        "issuer: {public}\nissuer_aliases: [{}]\ndiscovery_url: {}",
        server.issuer_url(),
        server.discovery_url()
    ));
    let (ok, report) = doctor(&cfg).await;
    assert!(ok, "{report}");
    assert!(line(&report, "issuer").contains("issuer_aliases"), "{report}");
}

#[tokio::test]
async fn only_encryption_keys_leave_nothing_to_verify_with() {
    let key = TestKey::rsa("enc-1");
    let server = IssuerServer::start(&[]).await;
    let mut enc = key.jwk();
    enc["use"] = json!("enc");
    enc["alg"] = json!("RSA-OAEP");
    server.set_jwks(json!({ "keys": [enc] }));
    let cfg = one_issuer(&format!(
        "issuer: {}\ndiscovery: true\nalgorithms: [RS256]",
        server.issuer_url()
    ));

    let (ok, report) = doctor(&cfg).await;

    assert!(!ok, "no signing key:\n{report}");
    let keys = line(&report, "keys");
    assert!(
        keys.contains("FAIL") && keys.contains("no key usable for RS256"),
        "{report}"
    );
    let skipped = line(&report, "skipped");
    assert!(skipped.contains("\"enc-1\""), "{report}");
    assert!(skipped.contains("`use` is \"enc\""), "says why:\n{report}");
    assert_has(&report, "fix: a `use: enc` key only encrypts");
    assert_has(&report, "=> UNUSABLE: no key usable for RS256");
    assert_eq!(
        report.lines().last(),
        Some("1 issuer: 0 usable, 1 unusable"),
        "{report}"
    );
}

#[tokio::test]
async fn usable_keys_next_to_skipped_ones_pass_with_warnings() {
    let good = TestKey::rsa("sig-1");
    let other = TestKey::ec("ec-1");
    let enc = TestKey::rsa("enc-1");
    let server = IssuerServer::start(&[]).await;
    let mut enc_jwk = enc.jwk();
    enc_jwk["use"] = json!("enc");
    enc_jwk["alg"] = json!("RSA-OAEP");
    server.set_jwks(json!({ "keys": [
        good.jwk(),
        enc_jwk,
        other.jwk(),
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
    ]}));
    let cfg = one_issuer(&format!(
        "issuer: {}\ndiscovery: true\nalgorithms: [RS256]",
        server.issuer_url()
    ));

    let (ok, report) = doctor(&cfg).await;

    assert!(ok, "one usable key is enough:\n{report}");
    assert!(line(&report, "jwks").contains("4 keys published"), "{report}");
    assert!(line(&report, "keys").contains("1 usable key (RS256: 1)"), "{report}");
    assert_has(&report, "\"sig-1\"");
    assert_has(&report, "warn  skipped    \"enc-1\": `use` is \"enc\"");
    assert_has(&report, "warn  skipped    \"hmac\": key type oct");
    assert_has(
        &report,
        "warn  unusable   \"ec-1\": EC P-256 key with alg ES256 fits none of the allowed algorithms (RS256)",
    );
    assert_has(&report, "=> usable");
    assert_eq!(
        report.lines().last(),
        Some("1 issuer: 1 usable, 0 unusable"),
        "{report}"
    );
}

#[tokio::test]
async fn a_jwks_file_is_read_and_checked() {
    let key = TestKey::ec("file-1");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&key]).to_string()).expect("write the JWKS");
    let cfg = one_issuer(&format!(
        "issuer: https://sso.example.com/realms/static\njwks_file: {}",
        path.display()
    ));

    let (ok, report) = doctor(&cfg).await;

    assert!(ok, "{report}");
    let jwks_line = line(&report, "jwks");
    assert!(jwks_line.contains(&path.display().to_string()), "{report}");
    assert!(jwks_line.contains("1 key published"), "{report}");
    assert!(
        line(&report, "keys").contains("1 usable key (RS256: 0, ES256: 1)"),
        "{report}"
    );
    assert_has(&report, "\"file-1\"");
    assert_has(&report, "clock      not checked: the keys come from a file");

    // a file that is not a JWKS
    std::fs::write(&path, "<html>oops</html>").expect("overwrite");
    let (ok, report) = doctor(&cfg).await;
    assert!(!ok, "{report}");
    assert!(line(&report, "jwks").contains("is not a JWKS"), "{report}");
    assert_has(&report, "=> UNUSABLE: jwks_file unreadable");
}

#[tokio::test]
async fn a_failing_jwks_endpoint_and_a_healthy_issuer_are_reported_side_by_side() {
    let good = TestKey::rsa("good-1");
    let healthy = IssuerServer::start(&[&good]).await;
    let broken = IssuerServer::start_at("/realms/broken", &[&good]).await;
    broken.set_jwks_failure(Some(503));
    let cfg = config(&format!(
        "issuers:\n  healthy:\n    issuer: {}\n    discovery: true\n  broken:\n    issuer: {}\n    jwks_uri: {}\n\
         routes:\n  - name: api\n    client_ids: [api]\n",
        healthy.issuer_url(),
        broken.issuer_url(),
        broken.jwks_uri()
    ));

    let (ok, report) = doctor(&cfg).await;

    assert!(!ok, "{report}");
    assert_has(&report, "issuer healthy");
    assert_has(&report, "issuer broken");
    assert_has(&report, "503 Service Unavailable");
    assert_has(&report, "test issuer: JWKS switched off");
    assert_has(&report, "=> UNUSABLE: JWKS not served");
    assert!(
        report.find("issuer healthy") < report.find("issuer broken"),
        "issuers in config order:\n{report}"
    );
    assert_eq!(
        report.lines().last(),
        Some("2 issuers: 1 usable, 1 unusable"),
        "{report}"
    );
}

#[tokio::test]
async fn an_unreachable_discovered_jwks_uri_says_where_it_came_from() {
    let key = TestKey::rsa("k1");
    let server = IssuerServer::start(&[&key]).await;
    let gone = format!("http://127.0.0.1:{}/certs", free_port());
    server.set_jwks_uri_override(Some(gone.clone()));
    let cfg = one_issuer(&format!("issuer: {}\ndiscovery: true", server.issuer_url()));

    let (ok, report) = doctor(&cfg).await;

    assert!(!ok, "{report}");
    assert!(line(&report, "discovery").contains("ok"), "{report}");
    let jwks_line = line(&report, "jwks");
    assert!(jwks_line.contains("FAIL") && jwks_line.contains(&gone), "{report}");
    assert_has(&report, "the jwks_uri the discovery document advertises");
    assert_has(&report, "set `jwks_uri`");
    // the clock is still checked against the discovery answer
    assert!(line(&report, "clock").starts_with("  ok"), "{report}");
    assert_has(&report, "=> UNUSABLE: JWKS unreachable");
}

/// A JWKS endpoint on loopback that answers every request with `body` and these extra headers
/// (hyper's servers always send the real `Date`; this one sends whatever the test says).
async fn raw_jwks_server(body: String, headers: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/certs", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n{headers}\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    (url, task)
}

#[tokio::test]
async fn a_clock_far_from_the_servers_is_a_warning_not_a_failure() {
    let key = TestKey::rsa("k1");
    let (url, server) = raw_jwks_server(
        jwks(&[&key]).to_string(),
        "date: Thu, 01 Jan 2015 00:00:00 GMT\r\ncache-control: max-age=60\r\n\
         expires: Thu, 01 Jan 2015 00:01:00 GMT\r\netag: \"v1\"\r\n",
    )
    .await;
    let cfg = one_issuer(&format!(
        "issuer: http://127.0.0.1:1/realms/x\njwks_uri: {url}\nleeway: 10s"
    ));

    let (ok, report) = doctor(&cfg).await;
    server.abort();

    assert!(ok, "clock skew warns, it does not make the issuer unusable:\n{report}");
    let clock = line(&report, "clock");
    assert!(clock.starts_with("  warn"), "{report}");
    assert!(clock.contains("ahead of the server's Date"), "{report}");
    assert!(clock.contains("leeway of 10s"), "{report}");
    assert_has(&report, "denied expired on arrival");
    let cache = line(&report, "cache");
    assert!(cache.contains("Cache-Control: max-age=60"), "{report}");
    assert!(cache.contains("Expires: Thu, 01 Jan 2015 00:01:00 GMT"), "{report}");
    assert!(cache.contains("ETag: \"v1\""), "{report}");
    assert_has(&report, "=> usable");
}
