//! TLS and mTLS on audgate's gRPC and HTTP listeners (`listen.tls`), for real:
//!
//! - Envoy 1.40 reaches audgate's gRPC port through an `UpstreamTlsContext` with a client
//!   certificate; checks pass over it, and keep passing (0 failures) while audgate's
//!   certificate is rotated in place, as cert-manager does. New handshakes then get the new
//!   certificate; files that do not load leave the one in use in place.
//! - A client without a certificate, or with one whose SAN is not in `client_sans`, is refused
//!   at the handshake (directly, and behind Envoy, which then fails closed with 503).
//! - Bad files at start: audgate exits 1 with an error naming the file.
//! - deploy/envoy/envoy-tls.yaml runs for real against audgate over mTLS.
//!
//! Certificates are made at test time with rcgen (an ECDSA P-256 CA, server and client leaves).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    Audgate, AudgateOptions, EchoServer, Envoy, EnvoyPorts, IssuerServer, TestKey, free_port, keycloak_claims,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use tempfile::TempDir;

/// The DNS name in audgate's server certificate (Envoy's `sni` and SAN match).
const SERVER_NAME: &str = "audgate.test";
/// The SPIFFE id of the Envoy that may call audgate.
const ENVOY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account";
/// A client the CA vouches for, but not on the allow-list.
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/someone-else";

/// A test CA that issues server and client certificates into a temp directory.
struct Pki {
    ca: Issuer<'static, KeyPair>,
    dir: TempDir,
    serial: AtomicU64,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "audgate test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let dir = tempfile::Builder::new()
            .prefix("audgate-tls-")
            .tempdir()
            .expect("temp dir");
        std::fs::write(dir.path().join("ca.crt"), cert.pem()).expect("write ca.crt");
        Pki {
            ca: Issuer::new(params, key),
            dir,
            serial: AtomicU64::new(1),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca_file(&self) -> PathBuf {
        self.path("ca.crt")
    }

    /// A leaf (new key) for `sans` (entries with `://` are URI SANs), as (cert PEM, key PEM, DER).
    fn leaf(&self, sans: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String, Vec<u8>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        for san in sans {
            params.subject_alt_names.push(if san.contains("://") {
                SanType::URI((*san).try_into().expect("a URI SAN"))
            } else {
                SanType::DnsName((*san).try_into().expect("a DNS SAN"))
            });
        }
        params.distinguished_name.push(DnType::CommonName, sans[0]);
        params.extended_key_usages = vec![purpose];
        params.serial_number = Some(self.serial.fetch_add(1, Ordering::SeqCst).into());
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("leaf certificate");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    /// Writes a server certificate and key to `tls.crt` / `tls.key`; returns the DER.
    fn server(&self) -> Vec<u8> {
        let (cert, key, der) = self.leaf(&[SERVER_NAME], ExtendedKeyUsagePurpose::ServerAuth);
        std::fs::write(self.path("tls.crt"), cert).expect("write tls.crt");
        std::fs::write(self.path("tls.key"), key).expect("write tls.key");
        der
    }

    /// Writes a client certificate for `id` to `NAME.crt` / `NAME.key`.
    fn client(&self, name: &str, id: &str) {
        let (cert, key, _) = self.leaf(&[id], ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(self.path(&format!("{name}.crt")), cert).expect("write client cert");
        std::fs::write(self.path(&format!("{name}.key")), key).expect("write client key");
    }

    /// The `listen.tls` section for audgate (mTLS with the SAN allow-list when `mtls`).
    fn listen_tls(&self, mtls: bool) -> String {
        let mut yaml = format!(
            "tls:\n  cert_file: {}\n  key_file: {}\n",
            self.path("tls.crt").display(),
            self.path("tls.key").display()
        );
        if mtls {
            yaml.push_str(&format!(
                "  client_ca_file: {}\n  client_sans: [\"{ENVOY_ID}\"]\n",
                self.ca_file().display()
            ));
        }
        yaml
    }

    /// A reqwest client that trusts the CA and reaches `audgate.test` at `addr`, presenting
    /// the client certificate `name` when given.
    fn https_client(&self, addr: SocketAddr, name: Option<&str>) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.ca_file()).expect("ca")).expect("CA PEM");
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([ca])
            .tls_info(true)
            .resolve(SERVER_NAME, addr)
            .timeout(Duration::from_secs(10));
        if let Some(name) = name {
            let mut pem = std::fs::read(self.path(&format!("{name}.crt"))).expect("client cert");
            pem.extend(std::fs::read(self.path(&format!("{name}.key"))).expect("client key"));
            builder = builder.identity(reqwest::Identity::from_pem(&pem).expect("client identity"));
        }
        builder.build().expect("https client")
    }
}

fn config(issuer: &str) -> String {
    format!(
        r#"issuers:
  kc:
    issuer: {issuer}
    discovery: true
routes:
  - name: app
    match: {{ path_prefix: /app }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]
default: deny
"#
    )
}

/// The UpstreamTlsContext Envoy uses to reach audgate, presenting client certificate `client`
/// (none when `None`).
fn upstream_tls(pki: &Pki, client: Option<&str>) -> String {
    let certificate = client.map_or(String::new(), |name| {
        format!(
            "          tls_certificates:\n          - certificate_chain: {{ filename: {} }}\n            private_key: {{ filename: {} }}\n",
            pki.path(&format!("{name}.crt")).display(),
            pki.path(&format!("{name}.key")).display()
        )
    });
    format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {SERVER_NAME}
        common_tls_context:
          alpn_protocols: [h2]
{certificate}          validation_context:
            trusted_ca: {{ filename: {ca} }}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{ exact: {SERVER_NAME} }}
"#,
        ca = pki.ca_file().display()
    )
}

/// tests/envoy/ext_authz_grpc.yaml with the audgate cluster over TLS.
async fn envoy_over_tls(pki: &Pki, client: Option<&str>, audgate: &Audgate, echo: &EchoServer) -> Envoy {
    let ports = EnvoyPorts {
        listen: free_port(),
        admin: free_port(),
        audgate_grpc: audgate.ports.grpc,
        upstream: echo.port(),
    };
    let rendered = common::render_envoy_config(&ports);
    let cluster = "  - name: audgate\n    type: STATIC\n    connect_timeout: 1s\n";
    assert_eq!(
        rendered.matches(cluster).count(),
        1,
        "the template's audgate cluster changed"
    );
    let rendered = rendered.replace(cluster, &format!("{cluster}{}", upstream_tls(pki, client)));
    // A new connection (so a new handshake) every 25 checks: rotations happen under
    // handshakes, not only under one long-lived HTTP/2 connection.
    let options = "        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n";
    assert_eq!(
        rendered.matches(options).count(),
        1,
        "the template's audgate protocol options changed"
    );
    let rendered = rendered.replace(
        options,
        &format!("{options}        common_http_protocol_options: {{ max_requests_per_connection: 25 }}\n"),
    );
    Envoy::start_rendered(ports, &rendered).await
}

struct Run {
    pki: Pki,
    issuer: IssuerServer,
    _echo: EchoServer,
    audgate: Audgate,
    envoy: Envoy,
    token: String,
    client: reqwest::Client,
}

impl Run {
    /// audgate with mTLS (client SAN allow-list) behind an Envoy presenting client `envoy`.
    async fn start(key: &TestKey) -> Run {
        let pki = Pki::new();
        pki.server();
        pki.client("envoy", ENVOY_ID);
        pki.client("other", OTHER_ID);
        let issuer = IssuerServer::start(&[key]).await;
        let echo = EchoServer::start().await;
        let options = AudgateOptions::new().listen_extra(&pki.listen_tls(true));
        let audgate = Audgate::start_with(&config(&issuer.issuer_url()), options).await;
        audgate.wait_ready().await;
        let envoy = envoy_over_tls(&pki, Some("envoy"), &audgate, &echo).await;
        let token = key.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
        Run {
            pki,
            issuer,
            _echo: echo,
            audgate,
            envoy,
            token,
            client: common::http_client(),
        }
    }

    async fn get(&self, envoy: &Envoy, path: &str, token: Option<&str>) -> common::Reply {
        let auth = token.map(common::bearer);
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        common::send(&self.client, "GET", &format!("{}{path}", envoy.url()), &headers).await
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.audgate.logs(), self.envoy.logs())
    }

    fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.audgate.ports.http))
    }

    /// The certificate audgate's HTTP listener presents to a new connection.
    async fn presented_certificate(&self) -> Vec<u8> {
        let client = self.pki.https_client(self.http_addr(), Some("envoy"));
        let url = format!("https://{SERVER_NAME}:{}/app", self.audgate.ports.http);
        let response = client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url} over mTLS failed: {e:?}\n{}", self.logs()));
        let info = response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .expect("tls_info(true) gives the TLS info");
        info.peer_certificate().expect("a server certificate").to_vec()
    }

    /// Waits until a new connection gets the certificate `der`.
    async fn wait_presented(&self, der: &[u8], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.presented_certificate().await != der {
            assert!(
                Instant::now() < deadline,
                "new connections still get the old certificate ({what})\n{}",
                self.audgate.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checks_pass_over_mtls_through_envoy_and_a_rotation_drops_none() {
    let key = TestKey::rsa("tls-1");
    let run = Run::start(&key).await;

    // A check over mTLS: allowed, and denied with audgate's own answer.
    let reply = run.get(&run.envoy, "/app/x", Some(&run.token)).await;
    assert_eq!(reply.status, 200, "{reply}\n{}", run.logs());
    assert_eq!(reply.header("x-test-audgate-route"), Some("app"));
    let reply = run.get(&run.envoy, "/app/x", None).await;
    assert_eq!(reply.status, 401, "{reply}\n{}", run.logs());
    assert_eq!(reply.error_code().as_deref(), Some("missing_token"));
    // admin stays plain HTTP
    assert_eq!(run.audgate.readyz().await.map(|r| r.status), Ok(200));

    // Envoy keeps sending while the certificate is rotated twice, then broken, then fixed.
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for _ in 0..2 {
        let stop = Arc::clone(&stop);
        let url = format!("{}/app/rotate", run.envoy.url());
        let token = run.token.clone();
        senders.push(tokio::spawn(async move {
            let client = common::http_client();
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let auth = common::bearer(&token);
                match common::try_send(&client, "GET", &url, &[("authorization", auth.as_str())]).await {
                    Ok(reply) if reply.status == 200 => ok += 1,
                    Ok(reply) => failed.push(reply.to_string()),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    let first = run.presented_certificate().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. cert-manager style: new key and certificate written in place, the key a moment later
    //    (a reader that caught the new certificate with the old key must not switch).
    let (cert, key_pem, second) = run.pki.leaf(&[SERVER_NAME], ExtendedKeyUsagePurpose::ServerAuth);
    assert_ne!(first, second);
    std::fs::write(run.pki.path("tls.crt"), &cert).expect("write");
    tokio::time::sleep(Duration::from_millis(30)).await;
    std::fs::write(run.pki.path("tls.key"), &key_pem).expect("write");
    run.wait_presented(&second, "after the first rotation").await;

    // 2. A Kubernetes Secret volume: files swapped through a `..data` style rename.
    let third = {
        let (cert, key_pem, der) = run.pki.leaf(&[SERVER_NAME], ExtendedKeyUsagePurpose::ServerAuth);
        for (name, text) in [("tls.key", key_pem), ("tls.crt", cert)] {
            let tmp = run.pki.path(&format!(".{name}.tmp"));
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, run.pki.path(name)).expect("rename");
        }
        der
    };
    run.wait_presented(&third, "after the second rotation").await;

    // 3. A broken certificate file: logged, and the certificate in use stays.
    std::fs::write(run.pki.path("tls.crt"), "not a certificate\n").expect("write");
    common::wait_for_log(
        "no error for the broken file",
        Duration::from_secs(10),
        || run.audgate.logs(),
        |logs| logs.contains("the certificate in use stays in use"),
    )
    .await;
    assert_eq!(
        run.presented_certificate().await,
        third,
        "a broken file replaced the certificate"
    );
    let reply = run.get(&run.envoy, "/app/x", Some(&run.token)).await;
    assert_eq!(reply.status, 200, "{reply}\n{}", run.logs());

    // 4. Fixed again.
    let fourth = run.pki.server();
    run.wait_presented(&fourth, "after the fix").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for sender in senders {
        let (o, f) = sender.await.expect("sender task");
        ok += o;
        failed.extend(f);
    }
    assert!(ok > 20, "only {ok} checks were sent during the rotations");
    assert!(
        failed.is_empty(),
        "{} of {} checks failed during the rotations, e.g.:\n{}\n{}",
        failed.len(),
        ok + failed.len() as u64,
        failed[0],
        run.logs()
    );
    let logs = run.audgate.logs();
    assert!(logs.matches("TLS certificate reloaded").count() >= 3, "{logs}");
    // Envoy's own view: it kept opening connections (handshakes with each certificate), and
    // none of them failed.
    let stats = common::send(&run.client, "GET", &format!("{}/stats", run.envoy.admin_url()), &[]).await;
    let connections: u64 = stats
        .body
        .lines()
        .find_map(|l| l.strip_prefix("cluster.audgate.upstream_cx_total: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        connections >= 4,
        "Envoy opened only {connections} connections to audgate"
    );
    for stat in [
        "cluster.audgate.upstream_cx_connect_fail",
        "cluster.audgate.ssl.connection_error",
    ] {
        let value = stats
            .body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{stat}: ")))
            .map(str::trim);
        assert!(matches!(value, None | Some("0")), "{stat}: {value:?}\n{}", stats.body);
    }
    drop(run.issuer);
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_certificate_or_with_a_san_off_the_list_are_refused() {
    let key = TestKey::rsa("tls-2");
    let run = Run::start(&key).await;
    let url = format!("https://{SERVER_NAME}:{}/app/x", run.audgate.ports.http);

    // The HTTP listener: the allowed client gets audgate's answer ...
    let allowed = run.pki.https_client(run.http_addr(), Some("envoy"));
    let reply = allowed.get(&url).send().await.expect("mTLS with the allowed SAN");
    assert_eq!(reply.status().as_u16(), 401, "missing_token from audgate itself");

    // ... no certificate, or a certificate with a SAN off the list, gets no answer at all.
    for (client, what) in [(None, "no client certificate"), (Some("other"), "a SAN off the list")] {
        let https = run.pki.https_client(run.http_addr(), client);
        let result = https.get(&url).send().await;
        assert!(result.is_err(), "{what}: audgate answered {result:?}");
    }
    // Plain HTTP on a TLS listener is no way around it.
    let plain = common::try_send(
        &common::http_client(),
        "GET",
        &format!("http://127.0.0.1:{}/app/x", run.audgate.ports.http),
        &[],
    )
    .await;
    assert!(
        plain.is_err() || plain.as_ref().is_ok_and(|r| r.status != 200 && r.status != 401),
        "{plain:?}"
    );

    // The gRPC listener behind Envoy: Envoy with the wrong SAN, or with no certificate, cannot
    // reach audgate, and fails closed.
    let echo = EchoServer::start().await;
    for (client, what) in [(Some("other"), "a SAN off the list"), (None, "no client certificate")] {
        let envoy = envoy_over_tls(&run.pki, client, &run.audgate, &echo).await;
        let reply = run.get(&envoy, "/app/x", Some(&run.token)).await;
        assert_eq!(
            reply.status,
            503,
            "{what}: {reply}\n{}\n{}",
            run.audgate.logs(),
            envoy.logs()
        );
    }
    let logs = run.audgate.logs();
    assert!(
        logs.contains("TLS client refused: its certificate carries none of listen.tls.client_sans")
            && logs.contains(OTHER_ID),
        "audgate does not say why it refused the client\n{logs}"
    );
    // The allowed Envoy still passes.
    let reply = run.get(&run.envoy, "/app/x", Some(&run.token)).await;
    assert_eq!(reply.status, 200, "{reply}\n{}", run.logs());
}

/// `audgate serve` with `listen.tls` naming `cert`/`key`; returns (exit code, stderr).
fn serve_once(dir: &Path, cert: &Path, key: &Path) -> (Option<i32>, String) {
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        format!(
            "listen:\n  grpc: 127.0.0.1:{}\n  http: 127.0.0.1:{}\n  admin: 127.0.0.1:{}\n  tls:\n    cert_file: {}\n    key_file: {}\n{}",
            free_port(),
            free_port(),
            free_port(),
            cert.display(),
            key.display(),
            config("http://127.0.0.1:9/realms/test")
        ),
    )
    .expect("write config");
    let output = std::process::Command::new(common::audgate_binary())
        .args(["serve", "--config"])
        .arg(&path)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run audgate");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_certificate_files_stop_audgate_at_start_with_the_file_named() {
    let pki = Pki::new();
    pki.server();
    let (other_cert, _, _) = pki.leaf(&["other.test"], ExtendedKeyUsagePurpose::ServerAuth);
    std::fs::write(pki.path("other.crt"), other_cert).expect("write");
    std::fs::write(pki.path("garbage.crt"), "-----BEGIN CERTIFICATE-----\nnot base64!\n").expect("write");
    std::fs::write(pki.path("empty.key"), "").expect("write");
    let cert = pki.path("tls.crt");
    let key = pki.path("tls.key");
    let cases = [
        (pki.path("missing.crt"), key.clone(), "cannot read listen.tls.cert_file"),
        (pki.path("garbage.crt"), key.clone(), "listen.tls.cert_file"),
        (cert.clone(), pki.path("empty.key"), "listen.tls.key_file"),
        (pki.path("other.crt"), key.clone(), "is not the key of the certificate"),
    ];
    for (cert, key, expected) in cases {
        let (code, stderr) = serve_once(pki.dir.path(), &cert, &key);
        assert_eq!(code, Some(1), "{}/{}: {stderr}", cert.display(), key.display());
        assert!(stderr.contains(expected), "expected `{expected}` in:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn check_config_summarises_tls_and_tracing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("audgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listen:\n  tls:\n    cert_file: /x/tls.crt\n    key_file: /x/tls.key\n    client_ca_file: /x/ca.crt\n    client_sans: [\"{ENVOY_ID}\", envoy.example.com]\ntracing:\n  otlp_endpoint: http://otel:4317\n  sample_ratio: 0.5\n{}",
            config_text()
        ),
    )
    .expect("write");
    let output = check_config(&config);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "tls on grpc and http: certificate /x/tls.crt, key /x/tls.key; client CA /x/ca.crt; client SANs {ENVOY_ID}, envoy.example.com"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("tracing: OTLP to http://otel:4317 as audgate; sample ratio 0.5 without a sampled parent"),
        "{stdout}"
    );
    // and what a tracing section may not say
    for (bad, expected) in [
        (
            "  sample_ratio: 1.5\n",
            "tracing.sample_ratio: 1.5 is not between 0 and 1",
        ),
        (
            "  otlp_endpoint: https://otel:4317\n",
            "tracing.otlp_endpoint: `https://otel:4317`",
        ),
        ("  otlp_endpoint: otel:4317\n", "is not an OTLP/gRPC address"),
    ] {
        std::fs::write(&config, format!("tracing:\n{bad}{}", config_text())).expect("write");
        let output = check_config(&config);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{bad}: {stderr}");
        assert!(stderr.contains(":2:") && stderr.contains(expected), "{bad}: {stderr}");
    }
}

#[test]
fn check_config_explains_tls_settings_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("audgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listen:\n  tls:\n    cert_file: /x/tls.crt\n    key_file: /x/tls.key\n    client_sans: [\"{ENVOY_ID}\"]\n{}",
            config_text()
        ),
    )
    .expect("write");
    let output = check_config(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(":5:") && stderr.contains("client_sans needs listen.tls.client_ca_file"),
        "{stderr}"
    );
}

/// `audgate check-config --config PATH`, run to completion.
fn check_config(config: &Path) -> std::process::Output {
    std::process::Command::new(common::audgate_binary())
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .expect("run audgate")
}

fn config_text() -> String {
    config("https://sso.example.com/realms/test")
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_envoy_tls_runs_against_audgate_over_mtls() {
    let file = "deploy/envoy/envoy-tls.yaml";
    let text = std::fs::read_to_string(common::repo_root().join(file)).expect("read the deploy file");
    let key = TestKey::rsa("tls-deploy");
    let pki = Pki::new();
    pki.server();
    pki.client("envoy", ENVOY_ID);
    let issuer = IssuerServer::start(&[&key]).await;
    let echo = EchoServer::start().await;
    let options = AudgateOptions::new().listen_extra(&pki.listen_tls(true));
    let audgate = Audgate::start_with(&config(&issuer.issuer_url()), options).await;
    audgate.wait_ready().await;
    let ports = EnvoyPorts {
        listen: free_port(),
        admin: free_port(),
        audgate_grpc: audgate.ports.grpc,
        upstream: echo.port(),
    };
    let mut rendered = text.clone();
    for (from, to) in [
        (
            "socket_address: { address: 0.0.0.0, port_value: 10000 }".to_owned(),
            format!("socket_address: {{ address: 127.0.0.1, port_value: {} }}", ports.listen),
        ),
        (
            "socket_address: { address: 127.0.0.1, port_value: 9902 }".to_owned(),
            format!("socket_address: {{ address: 127.0.0.1, port_value: {} }}", ports.admin),
        ),
        (
            "socket_address: { address: audgate, port_value: 9191 }".to_owned(),
            format!(
                "socket_address: {{ address: 127.0.0.1, port_value: {} }}",
                audgate.ports.grpc
            ),
        ),
        (
            "socket_address: { address: app, port_value: 8080 }".to_owned(),
            format!(
                "socket_address: {{ address: 127.0.0.1, port_value: {} }}",
                ports.upstream
            ),
        ),
        (
            "/etc/envoy/tls/tls.crt".to_owned(),
            pki.path("envoy.crt").display().to_string(),
        ),
        (
            "/etc/envoy/tls/tls.key".to_owned(),
            pki.path("envoy.key").display().to_string(),
        ),
        ("/etc/envoy/tls/ca.crt".to_owned(), pki.ca_file().display().to_string()),
        ("audgate.audgate.svc.cluster.local".to_owned(), SERVER_NAME.to_owned()),
    ] {
        assert!(
            rendered.contains(&from),
            "{file}: expected `{from}` (the test adapts the file by it)"
        );
        rendered = rendered.replace(&from, &to);
    }
    let path = pki.path("envoy-tls.yaml");
    std::fs::write(&path, &rendered).expect("write");
    common::validate_envoy_config(&path);
    let envoy = Envoy::start_rendered(ports, &rendered).await;

    // Envoy's gRPC health checks over mTLS succeed ...
    let client = common::http_client();
    envoy
        .wait_health_check_success("audgate", Duration::from_secs(15), || {
            format!("{}\n{}", audgate.logs(), envoy.logs())
        })
        .await;
    // ... and a check over it decides.
    let token = key.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
    let auth = common::bearer(&token);
    let reply = common::send(
        &client,
        "GET",
        &format!("{}/app/1", envoy.url()),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply}\n{}\n{}", audgate.logs(), envoy.logs());
    let reply = common::send(&client, "GET", &format!("{}/app/1", envoy.url()), &[]).await;
    assert_eq!(reply.status, 401, "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_on_a_tls_listener_is_closed_within_the_first_request_limit() {
    use tokio::io::AsyncReadExt;

    let key = TestKey::rsa("tls-silent");
    let pki = Pki::new();
    pki.server();
    let issuer = IssuerServer::start(&[&key]).await;
    let audgate = Audgate::start_with(
        &config(&issuer.issuer_url()),
        AudgateOptions::new().listen_extra(&pki.listen_tls(false)),
    )
    .await;
    audgate.wait_ready().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], audgate.ports.grpc));

    // no ClientHello at all
    let silent = tokio::spawn(async move {
        let started = Instant::now();
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await;
        started.elapsed()
    });
    // a completed handshake, then no request
    let ca = std::fs::read(pki.ca_file()).expect("ca");
    let handshaken = tokio::spawn(async move {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
            roots.add(cert.expect("CA PEM")).expect("CA");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let started = Instant::now();
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).expect("name");
        let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .expect("a client without a certificate is fine without client_ca_file");
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await;
        (started.elapsed(), read.map(|r| r.map(|n| n == 0).unwrap_or(true)))
    });
    let silent = silent.await.expect("task");
    let (handshaken, closed) = handshaken.await.expect("task");
    for (what, elapsed) in [
        ("no ClientHello", silent),
        ("no request after the handshake", handshaken),
    ] {
        assert!(
            (Duration::from_secs(9)..Duration::from_secs(13)).contains(&elapsed),
            "{what}: closed after {elapsed:?}, not at the 10 s first-request limit\n{}",
            audgate.logs()
        );
    }
    assert_eq!(closed, Ok(true), "the handshaken connection was not closed");
}
