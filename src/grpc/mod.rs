//! Envoy's `envoy.service.auth.v3.Authorization/Check`: the one gRPC method on audgate's hot
//! path, served without envoy-types' generated server.
//!
//! - [`request`]: the fields of `CheckRequest` a check reads, decoded as slices of the frame;
//! - [`response`]: the `CheckResponse` written straight from the core's [`Response`](crate::authz::Response);
//! - here: the codec that joins them to tonic's unary call handling (framing, size limit,
//!   status and trailers stay tonic's), and [`Listener`], which sends `Check` there and every
//!   other path of the gRPC port (gRPC health) to the ordinary tonic router.

mod request;
mod response;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tower_service::Service;

use crate::app::State;
use crate::authz;
use crate::check;
use crate::telemetry;

/// The route a per-route `check_settings.context_extensions` entry selects.
pub const ROUTE_CONTEXT_KEY: &str = "audgate.route";

/// The gRPC path of `Check`.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The gRPC listener's service: `Check` to audgate, anything else to `rest`.
#[derive(Clone)]
pub struct Listener {
    check: Check,
    rest: axum::Router,
}

impl Listener {
    /// `max_request_bytes` bounds a `CheckRequest` as tonic's `max_decoding_message_size` does.
    pub fn new(state: Arc<State>, max_request_bytes: usize, rest: axum::Router) -> Listener {
        Listener {
            check: Check {
                state,
                max_request_bytes,
            },
            rest,
        }
    }
}

impl<B> Service<http::Request<B>> for Listener
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == CHECK_PATH {
            let check = self.check.clone();
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(CheckCodec)
                    .apply_max_message_size_config(Some(check.max_request_bytes), None);
                Ok(grpc.unary(check, request).await)
            })
        } else {
            let mut rest = self.rest.clone();
            Box::pin(async move {
                let response = rest.call(request).await?;
                Ok(response.map(Body::new))
            })
        }
    }
}

/// One `Check` call: decode, decide, encode.
#[derive(Clone)]
struct Check {
    state: Arc<State>,
    max_request_bytes: usize,
}

impl tonic::server::UnaryService<request::CheckRequest> for Check {
    type Response = Bytes;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, tonic::Status>>;

    fn call(&mut self, call: tonic::Request<request::CheckRequest>) -> Self::Future {
        let state = Arc::clone(&self.state);
        Box::pin(async move {
            let (metadata, _, request) = call.into_parts();
            let strings = request::Strings::read(&request)?;
            let input = strings.input();
            let snapshot = state.snapshot();
            // Envoy's ext_authz client span travels in the call's metadata
            let carrier = match snapshot.telemetry {
                Some(_) => telemetry::Carrier {
                    traceparent: metadata.get("traceparent").and_then(|v| v.to_str().ok()),
                    tracestate: metadata.get("tracestate").and_then(|v| v.to_str().ok()),
                },
                None => telemetry::Carrier::default(),
            };
            // nothing here waits but a key refetch, which check::check_traced bounds (REFETCH_WAIT)
            let decision = check::check_traced(&snapshot, &input, carrier).await;
            let policy = &snapshot.config.policy;
            let response = authz::respond(policy, &decision);
            let removal = authz::token_removal(policy, &decision, &input);
            Ok(tonic::Response::new(response::encode(&response, &removal)))
        })
    }
}

/// Decodes [`request::CheckRequest`] from the frame without copying it; sends the already
/// encoded `CheckResponse`.
struct CheckCodec;

impl Codec for CheckCodec {
    type Encode = Bytes;
    type Decode = request::CheckRequest;
    type Encoder = Encoded;
    type Decoder = Lean;

    fn encoder(&mut self) -> Encoded {
        Encoded
    }

    fn decoder(&mut self) -> Lean {
        Lean
    }
}

struct Encoded;

impl Encoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

struct Lean;

impl Decoder for Lean {
    type Item = request::CheckRequest;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<request::CheckRequest>, tonic::Status> {
        let frame = src.copy_to_bytes(src.remaining());
        prost::Message::decode(frame)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("failed to decode Protobuf message: {e}")))
    }
}
