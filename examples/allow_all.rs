//! The floor for the benchmarks (issue 6): an ext_authz gRPC server that answers every
//! `Check` with an explicit OK status and an empty `ok_response`, on the same stack as audgate
//! (tonic, TCP_NODELAY, and by default the runtime `audgate serve` picks: current-thread on one
//! CPU, else multi-thread). Whatever it costs per check, any ext_authz server written with tonic
//! costs at least that.
//!
//! With `--http ADDR` it also answers every HTTP request on ADDR with an empty 200: the floor
//! for audgate's HTTP endpoint behind Envoy's `http_service` (HTTP/1.1, axum, as audgate).
//!
//! ```sh
//! cargo run --release --example allow_all -- --listen 127.0.0.1:27291 [--http 127.0.0.1:27292] \
//!     [--runtime auto|current|multi]
//! ```

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

struct AllowAll;

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        drop(request);
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status {
                code: tonic::Code::Ok as i32,
                message: String::new(),
                details: Vec::new(),
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        }))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen = "127.0.0.1:27291".to_owned();
    let mut runtime = "auto".to_owned();
    let mut http = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs ADDR")?,
            "--runtime" => runtime = args.next().ok_or("--runtime needs auto|current|multi")?,
            "--http" => http = Some(args.next().ok_or("--http needs ADDR")?),
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
            .add_service(AuthorizationServer::new(AllowAll))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}
