//! The floor for the benchmarks (issue 6): an ext_authz gRPC server that answers every
//! `Check` with an explicit OK status and an empty `ok_response`, on the same stack as audgate
//! (tonic, TCP_NODELAY, and by default the runtime `audgate serve` picks: current-thread on one
//! CPU, else multi-thread). Whatever it costs per check, any ext_authz server written with tonic
//! costs at least that.
//!
//! With `--rich` the answer has the shape of audgate's allow for the bench token (claim headers,
//! removals, metadata): Envoy's own cost of applying such an answer, measured apart.
//! With `--http ADDR` it also answers every HTTP request on ADDR with an empty 200: the floor
//! for audgate's HTTP endpoint behind Envoy's `http_service` (HTTP/1.1, axum, as audgate).
//!
//! ```sh
//! cargo run --release --example allow_all -- --listen 127.0.0.1:27291 [--http 127.0.0.1:27292] \
//!     [--rich [--without headers|removals|metadata]...] [--runtime auto|current|multi]
//! ```

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HeaderAppendAction, HeaderValue,
    HeaderValueOption, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{BoolValue, Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

struct AllowAll {
    response: CheckResponse,
}

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        drop(request);
        Ok(Response::new(self.response.clone()))
    }
}

/// The empty allow: what any ext_authz server must at least send.
fn empty_allow() -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status {
            code: tonic::Code::Ok as i32,
            message: String::new(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        dynamic_metadata: None,
    }
}

/// `--rich`: an allow shaped like audgate's for the bench token (three claim headers set with
/// overwrite, the 13 other spellings of the default claim headers removed, the `audgate`
/// metadata struct), so Envoy's share of handling such an answer can be told apart from the
/// authorizer's own cost.
#[allow(deprecated)]
fn rich_allow() -> CheckResponse {
    let overwrite = |key: &str, value: &str| HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append: Some(BoolValue { value: false }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    };
    let headers = vec![
        overwrite("x-auth-subject", "00000000-0000-4002-a000-000000000002"),
        overwrite("x-auth-issuer", "https://sso.bench.test/realms/shop"),
        overwrite("x-auth-client-id", "orders-api"),
    ];
    let removed = [
        "x_auth-subject",
        "x-auth_subject",
        "x_auth_subject",
        "x_auth-issuer",
        "x-auth_issuer",
        "x_auth_issuer",
        "x_auth-client-id",
        "x-auth_client-id",
        "x_auth_client-id",
        "x-auth-client_id",
        "x_auth-client_id",
        "x-auth_client_id",
        "x_auth_client_id",
    ];
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let fields: HashMap<String, Value> = [
        ("route", "orders"),
        ("reason", "allowed"),
        ("subject", "00000000-0000-4002-a000-000000000002"),
        ("client_id", "orders-api"),
        ("issuer", "shop"),
        ("tenant", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), string(v)))
    .collect();
    let audgate = Value {
        kind: Some(Kind::StructValue(Struct { fields })),
    };
    CheckResponse {
        status: Some(rpc::Status {
            code: tonic::Code::Ok as i32,
            message: "allowed".into(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove: removed.iter().map(|h| (*h).to_owned()).collect(),
            ..Default::default()
        })),
        dynamic_metadata: Some(Struct {
            fields: HashMap::from([("audgate".to_owned(), audgate)]),
        }),
    }
}

/// `--rich --without PART`: the rich answer less one part, to tell what each part costs Envoy
/// (scripts/bench-instructions.sh's Envoy counts, docs/performance.md).
fn strip(response: &mut CheckResponse, part: &str) -> Result<(), String> {
    let Some(HttpResponse::OkResponse(ok)) = response.http_response.as_mut() else {
        return Err("--without goes after --rich".into());
    };
    match part {
        "headers" => ok.headers.clear(),
        "removals" => ok.headers_to_remove.clear(),
        "metadata" => response.dynamic_metadata = None,
        other => return Err(format!("--without {other}: headers, removals or metadata")),
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen = "127.0.0.1:27291".to_owned();
    let mut runtime = "auto".to_owned();
    let mut http = None;
    let mut response = empty_allow();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs ADDR")?,
            "--runtime" => runtime = args.next().ok_or("--runtime needs auto|current|multi")?,
            "--http" => http = Some(args.next().ok_or("--http needs ADDR")?),
            "--rich" => response = rich_allow(),
            "--without" => strip(
                &mut response,
                &args.next().ok_or("--without needs headers|removals|metadata")?,
            )?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let rt = match runtime.as_str() {
        "auto" => audgate::app::runtime().build()?,
        "current" => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        "multi" => tokio::runtime::Builder::new_multi_thread().enable_all().build()?,
        other => return Err(format!("--runtime {other}: auto, current or multi").into()),
    };
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        eprintln!("allow_all listening on {listen} ({runtime} runtime, {workers} worker(s))");
        if let Some(http) = http {
            use axum::serve::ListenerExt;
            let listener = tokio::net::TcpListener::bind(&http)
                .await?
                .tap_io(|tcp| drop(tcp.set_nodelay(true)));
            eprintln!("allow_all answering HTTP on {http}");
            let router = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
            tokio::spawn(async move { axum::serve(listener, router).await });
        }
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(AllowAll { response }))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}
