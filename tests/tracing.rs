//! OpenTelemetry traces (`tracing:`), for real: a real Envoy 1.40 with its OpenTelemetry
//! tracer and audgate both export over OTLP/gRPC to a receiver on loopback, built here on the
//! official `opentelemetry-proto` service definitions (the Collector is a large Go build).
//!
//! - audgate's check span is a child of Envoy's ext_authz client span: same trace id, parent
//!   span id = that span's id; it carries route, decision and reason.
//! - A JWKS refetch the check waited for is a child span of the check.
//! - The decision log line carries the trace id.
//! - The parent comes from the CheckRequest's headers when the call's metadata has none, and
//!   from the request headers on the HTTP endpoint; a sampled parent is always followed, an
//!   unsampled one or none only by `sample_ratio`.
//! - A receiver that is down delays no check; the spans it missed are counted.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Audgate, CheckCall, EchoServer, Envoy, EnvoyPorts, IssuerServer, TestKey, free_port, keycloak_claims};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

const AUDGATE_SERVICE: &str = "audgate-under-test";
const ENVOY_SERVICE: &str = "envoy-under-test";

/// One span as received, with its resource's `service.name`.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: Vec<(String, String)>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// An OTLP/gRPC trace receiver on 127.0.0.1 that keeps every span it gets.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(text)
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Received {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text(kv))).collect(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr, tokio::task::JoinHandle<()>) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = TraceServiceServer::new(receiver.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        (receiver, addr, task)
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (up to 20 s: Envoy flushes on a timer) until `found` picks something.
    async fn wait_for<T>(&self, what: &str, found: impl Fn(&[Received]) -> Option<T>, logs: impl Fn() -> String) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = found(&self.spans()) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within 20 s; received:\n{:#?}\n{}",
                self.spans(),
                logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn config(issuer: &str, otlp: SocketAddr, ratio: f64) -> String {
    format!(
        r#"tracing:
  otlp_endpoint: http://{otlp}
  sample_ratio: {ratio}
  service_name: {AUDGATE_SERVICE}
logging:
  decisions: all   # the tests read the trace id from allow lines too
issuers:
  kc:
    issuer: {issuer}
    discovery: true
    min_refresh_interval: 0s
routes:
  - name: app
    match: {{ path_prefix: /app }}
    client_ids: [my-app]
    client_id_claims: [aud, azp]
default: deny
"#
    )
}

/// tests/envoy/ext_authz_grpc.yaml with Envoy's OpenTelemetry tracer on (every request
/// sampled) exporting to `otlp`, flushing every 200 ms.
async fn envoy_with_tracer(audgate: &Audgate, echo: &EchoServer, otlp: SocketAddr) -> Envoy {
    let ports = EnvoyPorts {
        listen: free_port(),
        admin: free_port(),
        audgate_grpc: audgate.ports.grpc,
        upstream: echo.port(),
    };
    let rendered = common::render_envoy_config(&ports);
    let anchor = "          stat_prefix: ingress\n";
    assert_eq!(rendered.matches(anchor).count(), 1, "the template's HCM changed");
    let tracing = format!(
        r#"{anchor}          tracing:
            random_sampling: {{ value: 100 }}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service:
                  envoy_grpc: {{ cluster_name: otlp }}
                  timeout: 1s
                service_name: {ENVOY_SERVICE}
"#
    );
    let mut rendered = rendered.replace(anchor, &tracing);
    assert!(
        rendered
            .trim_end()
            .ends_with(&format!("port_value: {} }}", echo.port())),
        "the template no longer ends with the clusters: the otlp cluster is appended there"
    );
    rendered.push_str(&format!(
        r#"  - name: otlp
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: otlp
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
layered_runtime:
  layers:
  - name: static
    static_layer:
      tracing.opentelemetry.flush_interval_ms: 200
      tracing.opentelemetry.min_flush_spans: 1
"#,
        port = otlp.port()
    ));
    Envoy::start_rendered(ports, &rendered).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_check_span_is_a_child_of_envoys_span_and_a_jwks_refetch_of_the_check() {
    let (receiver, otlp, _task) = Receiver::start().await;
    let first = TestKey::rsa("trace-1");
    let issuer = IssuerServer::start(&[&first]).await;
    let echo = EchoServer::start().await;
    // ratio 0: only Envoy's sampled parent makes audgate trace
    let audgate = Audgate::start(&config(&issuer.issuer_url(), otlp, 0.0)).await;
    audgate.wait_ready().await;
    let envoy = envoy_with_tracer(&audgate, &echo, otlp).await;
    let logs = || format!("{}\n{}", audgate.logs(), envoy.logs());
    let client = common::http_client();

    let token = first.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
    let auth = common::bearer(&token);
    let reply = common::send(
        &client,
        "GET",
        &format!("{}/app/one", envoy.url()),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply}\n{}", logs());

    let (check, parent) = receiver
        .wait_for(
            "audgate check span with its Envoy parent",
            |spans| {
                let check = spans
                    .iter()
                    .find(|s| s.service == AUDGATE_SERVICE && s.name == "check")?;
                let parent = spans
                    .iter()
                    .find(|s| s.service == ENVOY_SERVICE && s.span_id == check.parent_span_id)?;
                Some((check.clone(), parent.clone()))
            },
            logs,
        )
        .await;
    assert_eq!(check.trace_id, parent.trace_id);
    assert_ne!(check.trace_id, "0".repeat(32));
    assert_eq!(check.attribute("audgate.route"), Some("app"), "{check:?}");
    assert_eq!(check.attribute("audgate.decision"), Some("allow"), "{check:?}");
    assert_eq!(check.attribute("audgate.reason"), Some("allowed"), "{check:?}");
    // Envoy's span that audgate hangs under is its ext_authz call, inside the request's trace.
    assert!(
        parent.name.contains("Authorization") || parent.name.contains("ext_authz") || parent.name.contains("async"),
        "audgate's parent is Envoy's {parent:?}"
    );

    // The decision log line carries the trace id.
    common::wait_for_log(
        "no trace id in the decision log",
        Duration::from_secs(5),
        || audgate.logs(),
        |logs| {
            logs.contains(&format!("trace_id={}", check.trace_id))
                || logs.contains(&format!("trace_id=\"{}\"", check.trace_id))
        },
    )
    .await;

    // A token signed with a key the issuer only now publishes: the check waits for a JWKS
    // refetch, which is a child span of the check.
    let second = TestKey::rsa("trace-2");
    issuer.set_keys(&[&first, &second]);
    let token = second.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));
    let auth = common::bearer(&token);
    let reply = common::send(
        &client,
        "GET",
        &format!("{}/app/two", envoy.url()),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply}\n{}", logs());
    let (check, fetch) = receiver
        .wait_for(
            "jwks fetch span under a check",
            |spans| {
                let fetch = spans
                    .iter()
                    .find(|s| s.service == AUDGATE_SERVICE && s.name == "jwks fetch")?;
                let check = spans
                    .iter()
                    .find(|s| s.service == AUDGATE_SERVICE && s.name == "check" && s.span_id == fetch.parent_span_id)?;
                Some((check.clone(), fetch.clone()))
            },
            logs,
        )
        .await;
    assert_eq!(fetch.trace_id, check.trace_id);
    assert_eq!(fetch.attribute("audgate.issuer"), Some("kc"));
    assert_eq!(fetch.attribute("audgate.jwks.refetched"), Some("true"));
    assert!(
        receiver
            .spans()
            .iter()
            .any(|s| s.service == ENVOY_SERVICE && s.span_id == check.parent_span_id),
        "the refetching check hangs under Envoy's span too"
    );
}

fn traceparent(trace_id: &str, span_id: &str, sampled: bool) -> String {
    format!("00-{trace_id}-{span_id}-{}", if sampled { "01" } else { "00" })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_parent_comes_from_metadata_then_request_headers_and_sampling_follows_it() {
    let (receiver, otlp, _task) = Receiver::start().await;
    let key = TestKey::rsa("trace-3");
    let issuer = IssuerServer::start(&[&key]).await;
    let audgate = Audgate::start(&config(&issuer.issuer_url(), otlp, 0.0)).await;
    audgate.wait_ready().await;
    let logs = || audgate.logs();
    let channel = tonic::transport::Endpoint::from_shared(audgate.grpc_url())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = AuthorizationClient::new(channel);
    let token = key.mint(keycloak_claims(&issuer.issuer_url(), "my-app"));

    // 1. Metadata wins over the CheckRequest's headers.
    let (meta_trace, meta_span) = ("11111111111111111111111111111111", "1111111111111111");
    let (hdr_trace, hdr_span) = ("22222222222222222222222222222222", "2222222222222222");
    let call = CheckCall::get("app.example.com", "/app/meta")
        .bearer(&token)
        .header("traceparent", &traceparent(hdr_trace, hdr_span, true));
    let mut request = tonic::Request::new(call.to_request());
    request
        .metadata_mut()
        .insert("traceparent", traceparent(meta_trace, meta_span, true).parse().unwrap());
    grpc.check(request).await.expect("check");

    // 2. Without metadata: the CheckRequest's headers.
    let (only_trace, only_span) = ("33333333333333333333333333333333", "3333333333333333");
    let call = CheckCall::get("app.example.com", "/app/headers")
        .header("traceparent", &traceparent(only_trace, only_span, true));
    grpc.check(tonic::Request::new(call.to_request())).await.expect("check");

    // 3. The HTTP endpoint: its request headers.
    let (http_trace, http_span) = ("44444444444444444444444444444444", "4444444444444444");
    let reply = common::send(
        &common::http_client(),
        "GET",
        &format!("{}/app/http", audgate.http_url()),
        &[("traceparent", &traceparent(http_trace, http_span, true))],
    )
    .await;
    assert_eq!(reply.status, 401, "{reply}");

    // 4. Not traced at ratio 0: an unsampled parent, and no parent.
    let (unsampled_trace, unsampled_span) = ("55555555555555555555555555555555", "5555555555555555");
    let call = CheckCall::get("app.example.com", "/app/unsampled")
        .header("traceparent", &traceparent(unsampled_trace, unsampled_span, false));
    grpc.check(tonic::Request::new(call.to_request())).await.expect("check");
    let call = CheckCall::get("app.example.com", "/app/none");
    grpc.check(tonic::Request::new(call.to_request())).await.expect("check");
    // 5. A sampled parent after them, so their absence below is not just a slow exporter.
    let (last_trace, last_span) = ("66666666666666666666666666666666", "6666666666666666");
    let call =
        CheckCall::get("app.example.com", "/app/last").header("traceparent", &traceparent(last_trace, last_span, true));
    grpc.check(tonic::Request::new(call.to_request())).await.expect("check");

    for (trace, parent, reason) in [
        (meta_trace, meta_span, "allowed"),
        (only_trace, only_span, "missing_token"),
        (http_trace, http_span, "missing_token"),
        (last_trace, last_span, "missing_token"),
    ] {
        let span = receiver
            .wait_for(
                &format!("check span in trace {trace}"),
                |spans| spans.iter().find(|s| s.trace_id == trace).cloned(),
                logs,
            )
            .await;
        assert_eq!(span.parent_span_id, parent, "{span:?}");
        assert_eq!(span.attribute("audgate.reason"), Some(reason), "{span:?}");
    }
    // the export task keeps the queue's order: everything before `last` has been sent
    let spans = receiver.spans();
    assert!(
        !spans.iter().any(|s| s.trace_id == hdr_trace),
        "headers beat metadata: {spans:#?}"
    );
    assert!(
        !spans.iter().any(|s| s.trace_id == unsampled_trace),
        "an unsampled parent was traced at ratio 0"
    );
    assert_eq!(
        spans.len(),
        4,
        "a check without a parent was traced at ratio 0: {spans:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_is_down_delays_no_check_and_its_spans_are_counted() {
    let key = TestKey::rsa("trace-4");
    let issuer = IssuerServer::start(&[&key]).await;
    // a port nobody listens on; ratio 1: every check is traced
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let audgate = Audgate::start(&config(&issuer.issuer_url(), closed, 1.0)).await;
    audgate.wait_ready().await;
    let client = common::http_client();
    let started = Instant::now();
    for _ in 0..50 {
        let reply = common::send(&client, "GET", &format!("{}/app/x", audgate.http_url()), &[]).await;
        assert_eq!(reply.status, 401, "{reply}");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "50 checks took {elapsed:?} with the receiver down"
    );
    audgate
        .wait_metric(
            "audgate_trace_spans_dropped_total",
            &[("reason", "export_failed")],
            Duration::from_secs(30),
            |v| v >= 1.0,
        )
        .await;
    let metrics = audgate.metrics().await;
    assert_eq!(
        metrics.get("audgate_trace_spans_dropped_total", &[("reason", "queue_full")]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_tracing_section_there_is_no_trace_id_and_no_span_metric() {
    let key = TestKey::rsa("trace-5");
    let issuer = IssuerServer::start(&[&key]).await;
    let body = config(&issuer.issuer_url(), SocketAddr::from(([127, 0, 0, 1], 9)), 1.0);
    let body = body
        .split_once("issuers:")
        .map(|(_, rest)| format!("issuers:{rest}"))
        .unwrap();
    let audgate = Audgate::start(&body).await;
    audgate.wait_ready().await;
    let reply = common::send(
        &common::http_client(),
        "GET",
        &format!("{}/app/x", audgate.http_url()),
        &[(
            "traceparent",
            &traceparent("77777777777777777777777777777777", "7777777777777777", true),
        )],
    )
    .await;
    assert_eq!(reply.status, 401);
    common::wait_for_log(
        "no decision line for the check",
        Duration::from_secs(5),
        || audgate.logs(),
        |logs| logs.contains("reason=\"missing_token\""),
    )
    .await;
    assert!(!audgate.logs().contains("trace_id"), "{}", audgate.logs());
    assert!(
        audgate
            .metrics()
            .await
            .series("audgate_trace_spans_dropped_total")
            .is_empty()
    );
}
