//! The `CheckResponse` written straight from the core's plain-data [`Response`].
//!
//! Every byte is what SPEC.md asks for and what prost would send for the same message (the
//! tests decode it with envoy-types and compare): an explicit status, claim headers set with
//! overwrite, removals in `headers_to_remove`, the `audgate` metadata struct. Written in one
//! pass into one buffer, instead of building the envoy-types message (a `String` per header
//! name, two `HashMap`s for the metadata) and then letting prost size every nested message
//! again at each level of nesting.

use bytes::Bytes;
use prost::encoding::{WireType, encode_key, encode_varint};

use crate::authz::{Metadata, Response, TokenRemoval};

// Field numbers of envoy.service.auth.v3.CheckResponse and the messages inside it.
mod field {
    pub const STATUS: u32 = 1; // google.rpc.Status
    pub const DENIED_RESPONSE: u32 = 2;
    pub const OK_RESPONSE: u32 = 3;
    pub const DYNAMIC_METADATA: u32 = 4; // google.protobuf.Struct
    pub const ERROR_RESPONSE: u32 = 5;

    pub const RPC_CODE: u32 = 1;
    pub const RPC_MESSAGE: u32 = 2;

    pub const OK_HEADERS: u32 = 2;
    pub const OK_HEADERS_TO_REMOVE: u32 = 5;
    pub const OK_QUERY_PARAMETERS_TO_REMOVE: u32 = 8;

    pub const DENIED_STATUS: u32 = 1; // envoy.type.v3.HttpStatus, its `code` is field 1
    pub const DENIED_HEADERS: u32 = 2;
    pub const DENIED_BODY: u32 = 3;

    pub const OPTION_HEADER: u32 = 1; // HeaderValueOption.header: HeaderValue
    pub const OPTION_APPEND: u32 = 2; // google.protobuf.BoolValue
    pub const OPTION_APPEND_ACTION: u32 = 3;
    pub const HEADER_KEY: u32 = 1;
    pub const HEADER_VALUE: u32 = 2;

    pub const STRUCT_FIELDS: u32 = 1; // map<string, Value>: entries of key 1, value 2
    pub const ENTRY_KEY: u32 = 1;
    pub const ENTRY_VALUE: u32 = 2;
    pub const VALUE_STRING: u32 = 3;
    pub const VALUE_STRUCT: u32 = 5;
}

/// `HeaderValueOption.append_action`: OVERWRITE_IF_EXISTS_OR_ADD.
const OVERWRITE_IF_EXISTS_OR_ADD: u64 = 2;

/// The encoded `CheckResponse` for `r`; `token` is what `token.forward: false` takes out of an
/// allowed request.
pub fn encode(r: &Response<'_>, token: &TokenRemoval<'_>) -> Bytes {
    let mut w = Writer(Vec::with_capacity(512 + r.body.len()));
    let code = match r.status {
        200 => tonic::Code::Ok,
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        // an error, not a denial: Envoy's failure_mode_allow / status_on_error decide
        _ => tonic::Code::Unavailable,
    };
    w.message(field::STATUS, |s| {
        s.varint(field::RPC_CODE, code as u64);
        s.string(field::RPC_MESSAGE, r.metadata.reason);
    });
    match code {
        tonic::Code::Ok => w.message(field::OK_RESPONSE, |ok| {
            for (name, value) in &r.upstream_headers {
                ok.overwrite(field::OK_HEADERS, name, value);
            }
            if let Some(cookie) = token.cookie.as_deref().filter(|c| !c.is_empty()) {
                ok.overwrite(field::OK_HEADERS, "cookie", cookie);
            }
            for name in r.remove_headers.iter().chain(&token.headers) {
                ok.string(field::OK_HEADERS_TO_REMOVE, name);
            }
            if token.cookie.as_deref() == Some("") {
                ok.string(field::OK_HEADERS_TO_REMOVE, "cookie");
            }
            for name in &token.query_parameters {
                ok.string(field::OK_QUERY_PARAMETERS_TO_REMOVE, name);
            }
        }),
        _ => {
            let tag = match code {
                tonic::Code::Unavailable => field::ERROR_RESPONSE,
                _ => field::DENIED_RESPONSE,
            };
            w.message(tag, |denied| {
                denied.message(field::DENIED_STATUS, |s| s.varint(1, u64::from(r.status)));
                for (name, value) in &r.client_headers {
                    denied.overwrite(field::DENIED_HEADERS, name, value);
                }
                denied.string(field::DENIED_BODY, &r.body);
            });
        }
    }
    w.message(field::DYNAMIC_METADATA, |m| metadata(m, &r.metadata));
    Bytes::from(w.0)
}

/// Filed by Envoy under the ext_authz filter's namespace, as struct `audgate`.
fn metadata(w: &mut Writer, m: &Metadata<'_>) {
    w.message(field::STRUCT_FIELDS, |entry| {
        entry.string(field::ENTRY_KEY, "audgate");
        entry.message(field::ENTRY_VALUE, |value| {
            value.message(field::VALUE_STRUCT, |s| {
                for (key, text) in [
                    ("route", m.route),
                    ("reason", m.reason),
                    ("subject", &m.subject),
                    ("client_id", &m.client_id),
                    ("issuer", m.issuer),
                    ("tenant", &m.tenant),
                ] {
                    s.message(field::STRUCT_FIELDS, |entry| {
                        entry.string(field::ENTRY_KEY, key);
                        // a oneof member is sent even when empty: the value is a string
                        entry.message(field::ENTRY_VALUE, |v| v.bytes(field::VALUE_STRING, text.as_bytes()));
                    });
                }
            });
        });
    });
}

/// Protobuf wire format into one growing buffer.
struct Writer(Vec<u8>);

impl Writer {
    /// A length-delimited field whose body `f` writes. The length is written before the body
    /// is known: one byte is reserved, which is enough below 128 bytes; a longer body is moved
    /// up to make room for its varint (a few hundred bytes, once or twice per response).
    fn message(&mut self, tag: u32, f: impl FnOnce(&mut Writer)) {
        encode_key(tag, WireType::LengthDelimited, &mut self.0);
        let at = self.0.len();
        self.0.push(0);
        f(self);
        let len = self.0.len() - at - 1;
        match u8::try_from(len) {
            Ok(short) if short < 0x80 => self.0[at] = short,
            _ => {
                let mut prefix = [0u8; 10];
                let mut room = &mut prefix[..];
                encode_varint(len as u64, &mut room);
                let written = 10 - room.len();
                self.0.splice(at..=at, prefix[..written].iter().copied());
            }
        }
    }

    /// A proto3 string: not sent when empty (what it reads as when absent).
    fn string(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(tag, s.as_bytes());
        }
    }

    fn bytes(&mut self, tag: u32, b: &[u8]) {
        encode_key(tag, WireType::LengthDelimited, &mut self.0);
        encode_varint(b.len() as u64, &mut self.0);
        self.0.extend_from_slice(b);
    }

    /// A proto3 integer: not sent when zero.
    fn varint(&mut self, tag: u32, v: u64) {
        if v != 0 {
            encode_key(tag, WireType::Varint, &mut self.0);
            encode_varint(v, &mut self.0);
        }
    }

    /// A header set with overwrite, never appended. Envoy 1.40 reads only the deprecated
    /// `append` for request headers; 1.37 read `append_action` (with APPEND as its default):
    /// both are set.
    fn overwrite(&mut self, tag: u32, name: &str, value: &str) {
        self.message(tag, |option| {
            option.message(field::OPTION_HEADER, |header| {
                header.string(field::HEADER_KEY, name);
                header.string(field::HEADER_VALUE, value);
            });
            option.message(field::OPTION_APPEND, |_| {}); // BoolValue { value: false }
            option.varint(field::OPTION_APPEND_ACTION, OVERWRITE_IF_EXISTS_OR_ADD);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::ext_authz::v3::pb::{
        CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse,
        OkHttpResponse,
    };
    use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    use envoy_types::pb::google::protobuf::{BoolValue, Struct, Value, value::Kind};
    use envoy_types::pb::google::rpc;
    use prost::Message;

    use super::*;

    /// The message as envoy-types spells it: what `encode` must be byte-for-byte equivalent to.
    #[allow(deprecated)]
    fn expected(r: &Response<'_>, token: &TokenRemoval<'_>) -> CheckResponse {
        let overwrite = |key: &str, value: &str| HeaderValueOption {
            header: Some(HeaderValue {
                key: key.to_owned(),
                value: value.to_owned(),
                raw_value: Vec::new(),
            }),
            append: Some(BoolValue { value: false }),
            append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
            keep_empty_value: false,
        };
        let string = |s: &str| Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        let m = &r.metadata;
        let fields: HashMap<String, Value> = [
            ("route", string(m.route)),
            ("reason", string(m.reason)),
            ("subject", string(&m.subject)),
            ("client_id", string(&m.client_id)),
            ("issuer", string(m.issuer)),
            ("tenant", string(&m.tenant)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let audgate = Value {
            kind: Some(Kind::StructValue(Struct { fields })),
        };
        let (code, http) = match r.status {
            200 => {
                let mut headers: Vec<_> = r.upstream_headers.iter().map(|(k, v)| overwrite(k, v)).collect();
                let mut remove: Vec<String> = r
                    .remove_headers
                    .iter()
                    .chain(&token.headers)
                    .map(|h| (*h).to_owned())
                    .collect();
                match token.cookie.as_deref() {
                    Some("") => remove.push("cookie".into()),
                    Some(cookie) => headers.push(overwrite("cookie", cookie)),
                    None => {}
                }
                let ok = OkHttpResponse {
                    headers,
                    headers_to_remove: remove,
                    query_parameters_to_remove: token.query_parameters.iter().map(|q| (*q).to_owned()).collect(),
                    ..Default::default()
                };
                (0, HttpResponse::OkResponse(ok))
            }
            status => {
                let denied = DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: i32::from(status),
                    }),
                    headers: r.client_headers.iter().map(|(k, v)| overwrite(k, v)).collect(),
                    body: r.body.clone(),
                };
                match status {
                    401 => (16, HttpResponse::DeniedResponse(denied)),
                    403 => (7, HttpResponse::DeniedResponse(denied)),
                    _ => (14, HttpResponse::ErrorResponse(denied)),
                }
            }
        };
        CheckResponse {
            status: Some(rpc::Status {
                code,
                message: r.metadata.reason.to_owned(),
                details: Vec::new(),
            }),
            http_response: Some(http),
            dynamic_metadata: Some(Struct {
                fields: HashMap::from([("audgate".to_owned(), audgate)]),
            }),
        }
    }

    fn response(status: u16, subject: String) -> Response<'static> {
        Response {
            status,
            upstream_headers: vec![
                ("x-auth-subject", subject.clone().into()),
                ("x-auth-issuer", "kc".into()),
            ],
            remove_headers: vec!["x_auth_subject", "x-auth-client-id"],
            client_headers: vec![("www-authenticate", "Bearer error=\"invalid_token\"".into())],
            body: if status == 200 {
                String::new()
            } else {
                "{\"error\":\"invalid_token\"}".into()
            },
            metadata: Metadata {
                route: "orders",
                reason: if status == 200 { "allowed" } else { "expired" },
                subject: subject.into(),
                client_id: "".into(),
                issuer: "kc",
                tenant: "".into(),
            },
        }
    }

    fn check(r: &Response<'_>, token: &TokenRemoval<'_>) {
        let wire = encode(r, token);
        let decoded = CheckResponse::decode(wire.clone()).expect("a valid CheckResponse");
        assert_eq!(decoded, expected(r, token), "status {}", r.status);
        // prost would send the same number of bytes (map order aside, the bytes are the same)
        assert_eq!(wire.len(), expected(r, token).encoded_len());
    }

    #[test]
    fn every_status_encodes_as_envoy_types_would() {
        for status in [200, 401, 403, 503] {
            check(&response(status, "alice".into()), &TokenRemoval::default());
        }
    }

    #[test]
    fn token_removal_encodes_as_envoy_types_would() {
        let removals = [
            TokenRemoval {
                headers: vec!["authorization"],
                ..Default::default()
            },
            TokenRemoval {
                cookie: Some("a=1; b=2".into()),
                ..Default::default()
            },
            TokenRemoval {
                cookie: Some(String::new()),
                query_parameters: vec!["access_token"],
                ..Default::default()
            },
        ];
        for removal in &removals {
            check(&response(200, "alice".into()), removal);
        }
    }

    #[test]
    fn lengths_of_every_varint_size_encode_as_envoy_types_would() {
        // 127/128 and 16383/16384 bytes are where a length takes one more byte, at every level
        for len in [0, 1, 100, 127, 128, 129, 300, 16_300, 16_383, 16_384, 70_000] {
            for status in [200, 401] {
                let mut r = response(status, "s".repeat(len));
                r.body = "b".repeat(len);
                check(&r, &TokenRemoval::default());
            }
        }
    }

    #[test]
    fn an_allow_without_headers_still_sends_an_ok_response() {
        let mut r = response(200, String::new());
        r.upstream_headers.clear();
        r.remove_headers.clear();
        check(&r, &TokenRemoval::default());
        let decoded = CheckResponse::decode(encode(&r, &TokenRemoval::default())).expect("decodes");
        assert!(matches!(decoded.http_response, Some(HttpResponse::OkResponse(_))));
    }
}
