//! Envoy's `envoy.service.auth.v3.Authorization/Check` over tonic. The only module that
//! touches envoy-types: the request is turned into a [`CheckInput`] once, the plain-data
//! [`Response`] into a `CheckResponse` once.

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use tonic::{Request, Response as GrpcResponse, Status};

use crate::app::State;
use crate::authz;
use crate::check;
use crate::telemetry;

/// The route a per-route `check_settings.context_extensions` entry selects.
pub const ROUTE_CONTEXT_KEY: &str = "audgate.route";

pub struct AuthorizationService {
    state: Arc<State>,
}

impl AuthorizationService {
    pub fn new(state: Arc<State>) -> Self {
        AuthorizationService { state }
    }
}

#[tonic::async_trait]
impl Authorization for AuthorizationService {
    async fn check(&self, request: Request<CheckRequest>) -> Result<GrpcResponse<CheckResponse>, Status> {
        let (metadata, _, request) = request.into_parts();
        let snapshot = self.state.snapshot();
        let empty = Default::default();
        let input = convert::input(&request, &empty);
        // Envoy's ext_authz client span travels in the call's metadata
        let call = match snapshot.telemetry {
            Some(_) => telemetry::Carrier {
                traceparent: metadata.get("traceparent").and_then(|v| v.to_str().ok()),
                tracestate: metadata.get("tracestate").and_then(|v| v.to_str().ok()),
            },
            None => telemetry::Carrier::default(),
        };
        // nothing here waits but a key refetch, which check::check_traced bounds (REFETCH_WAIT)
        let decision = check::check_traced(&snapshot, &input, call).await;
        let policy = &snapshot.config.policy;
        let response = authz::respond(policy, &decision);
        let removal = authz::token_removal(policy, &decision, &input);
        Ok(GrpcResponse::new(convert::check_response(response, removal)))
    }
}

mod convert {
    use std::collections::HashMap;

    use envoy_types::ext_authz::v3::pb::{
        CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
        HttpResponse, OkHttpResponse,
    };
    use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    use envoy_types::pb::google::protobuf::{BoolValue, Struct, Value, value::Kind};
    use envoy_types::pb::google::rpc;

    use super::ROUTE_CONTEXT_KEY;
    use crate::authz::{CheckInput, Headers, Metadata, Response, TokenRemoval};

    /// Borrow what the core needs from Envoy's request; `empty` stands in for absent headers.
    pub fn input<'a>(req: &'a CheckRequest, empty: &'a HashMap<String, String>) -> CheckInput<'a> {
        let attributes = req.attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let headers = http.map_or(empty, |h| &h.headers);
        let pick = |field: Option<&'a str>, header: &str| {
            field
                .filter(|v| !v.is_empty())
                .or_else(|| headers.get(header).map(String::as_str))
                .unwrap_or("")
        };
        CheckInput {
            method: pick(http.map(|h| h.method.as_str()), ":method"),
            host: pick(http.map(|h| h.host.as_str()), ":authority"),
            path: pick(http.map(|h| h.path.as_str()), ":path"),
            headers: Headers::Map(headers),
            route_hint: attributes
                .and_then(|a| a.context_extensions.get(ROUTE_CONTEXT_KEY))
                .map(String::as_str),
        }
    }

    /// Overwrite, never append. Envoy 1.40 reads only the deprecated `append` for request
    /// headers; 1.37 read `append_action` (with APPEND as its default): set both.
    #[allow(deprecated)]
    fn overwrite(key: &str, value: String) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: key.to_owned(),
                value,
                raw_value: Vec::new(),
            }),
            append: Some(BoolValue { value: false }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            keep_empty_value: false,
        }
    }

    fn string(s: String) -> Value {
        Value {
            kind: Some(Kind::StringValue(s)),
        }
    }

    /// Filed by Envoy under the ext_authz filter's namespace, as struct `audgate`.
    fn metadata(m: Metadata<'_>) -> Struct {
        let fields = HashMap::from([
            ("route".to_owned(), string(m.route.to_owned())),
            ("reason".to_owned(), string(m.reason.to_owned())),
            ("subject".to_owned(), string(m.subject)),
            ("client_id".to_owned(), string(m.client_id)),
            ("issuer".to_owned(), string(m.issuer)),
            ("tenant".to_owned(), string(m.tenant)),
        ]);
        let audgate = Value {
            kind: Some(Kind::StructValue(Struct { fields })),
        };
        Struct {
            fields: HashMap::from([("audgate".to_owned(), audgate)]),
        }
    }

    /// Every answer carries an explicit status: Envoy treats a missing one as OK. Takes the
    /// response by value: its strings move into the message instead of being copied. `token`
    /// is what `token.forward: false` takes out of an allowed request.
    pub fn check_response(r: Response<'_>, token: TokenRemoval<'_>) -> CheckResponse {
        let (code, http_response) = match r.status {
            200 => {
                let mut headers: Vec<HeaderValueOption> =
                    r.upstream_headers.into_iter().map(|(k, v)| overwrite(k, v)).collect();
                let mut headers_to_remove: Vec<String> = r
                    .remove_headers
                    .iter()
                    .chain(&token.headers)
                    .map(|h| (*h).to_owned())
                    .collect();
                match token.cookie {
                    Some(cookie) if cookie.is_empty() => headers_to_remove.push("cookie".to_owned()),
                    Some(cookie) => headers.push(overwrite("cookie", cookie)),
                    None => {}
                }
                let ok = OkHttpResponse {
                    headers,
                    headers_to_remove,
                    query_parameters_to_remove: token.query_parameters.iter().map(|q| (*q).to_owned()).collect(),
                    ..Default::default()
                };
                (tonic::Code::Ok, HttpResponse::OkResponse(ok))
            }
            status => {
                let denied = DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: i32::from(status),
                    }),
                    headers: r.client_headers.into_iter().map(|(k, v)| overwrite(k, v)).collect(),
                    body: r.body,
                };
                match status {
                    401 => (tonic::Code::Unauthenticated, HttpResponse::DeniedResponse(denied)),
                    403 => (tonic::Code::PermissionDenied, HttpResponse::DeniedResponse(denied)),
                    // An error, not a denial: Envoy's failure_mode_allow / status_on_error decide.
                    _ => (tonic::Code::Unavailable, HttpResponse::ErrorResponse(denied)),
                }
            }
        };
        CheckResponse {
            status: Some(rpc::Status {
                code: code as i32,
                message: r.metadata.reason.to_owned(),
                details: Vec::new(),
            }),
            http_response: Some(http_response),
            dynamic_metadata: Some(metadata(r.metadata)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::CheckInput;
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttrRequest};

    #[test]
    fn context_extension_names_the_route_and_fields_fall_back_to_pseudo_headers() {
        let mut req = CheckRequest::default();
        let mut attrs = AttributeContext::default();
        attrs
            .context_extensions
            .insert(ROUTE_CONTEXT_KEY.into(), "orders".into());
        let mut http = HttpRequest::default();
        http.headers.insert(":authority".into(), "shop.example.com".into());
        http.headers.insert(":path".into(), "/a?b".into());
        http.method = "GET".into();
        attrs.request = Some(AttrRequest {
            http: Some(http),
            ..Default::default()
        });
        req.attributes = Some(attrs);
        let empty = Default::default();
        let input: CheckInput<'_> = convert::input(&req, &empty);
        assert_eq!(input.route_hint, Some("orders"));
        assert_eq!(input.host, "shop.example.com");
        assert_eq!(input.path, "/a?b");
        assert_eq!(input.method, "GET");
    }

    #[test]
    #[allow(deprecated)]
    fn allow_overwrites_claim_headers_and_removes_the_rest() {
        let response = authz::Response {
            status: 200,
            upstream_headers: vec![("x-auth-subject", "alice".into())],
            remove_headers: vec!["x-auth-client-id"],
            client_headers: vec![],
            body: String::new(),
            metadata: authz::Metadata {
                route: "orders",
                reason: "allowed",
                subject: "alice".into(),
                client_id: String::new(),
                issuer: "kc".into(),
                tenant: String::new(),
            },
        };
        let out = convert::check_response(response, authz::TokenRemoval::default());
        assert_eq!(out.status.as_ref().map(|s| s.code), Some(0));
        let Some(HttpResponse::OkResponse(ok)) = out.http_response else {
            panic!("expected ok_response")
        };
        let h = &ok.headers[0];
        assert_eq!(h.append.as_ref().map(|b| b.value), Some(false));
        assert_eq!(h.append_action, 2, "OVERWRITE_IF_EXISTS_OR_ADD");
        assert_eq!(ok.headers_to_remove, vec!["x-auth-client-id".to_string()]);
        assert!(out.dynamic_metadata.unwrap().fields.contains_key("audgate"));
    }
}
