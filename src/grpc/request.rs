//! The part of Envoy's `CheckRequest` a check reads, decoded without copying.
//!
//! These messages keep the field numbers of `envoy.service.auth.v3.CheckRequest` and declare
//! only what the core reads: method, host, path, the header map and `context_extensions`. prost
//! skips every other field (peers, TLS session, metadata, body) on the wire, and the strings
//! that are read stay slices of the received frame (`Bytes`) instead of a `String` each and a
//! `HashMap` per map. A protobuf `map<string, string>` is on the wire a repeated message with
//! `key = 1` and `value = 2`, which is what [`Entry`] declares; of a repeated key the last
//! counts, as in a decoded map ([`Headers::Pairs`]).

use bytes::Bytes;
use tonic::Status;

use super::ROUTE_CONTEXT_KEY;
use crate::authz::{CheckInput, Headers};

#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
    #[prost(message, repeated, tag = "10")]
    pub context_extensions: Vec<Entry>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(bytes = "bytes", tag = "2")]
    pub method: Bytes,
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<Entry>,
    #[prost(bytes = "bytes", tag = "4")]
    pub path: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub host: Bytes,
}

/// One entry of a `map<string, string>`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// The strings of a [`CheckRequest`], checked to be UTF-8 once, as `&str`s for a [`CheckInput`].
pub struct Strings<'a> {
    method: &'a str,
    host: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    route_hint: Option<&'a str>,
}

impl<'a> Strings<'a> {
    /// Protobuf strings are UTF-8; a request whose strings are not is refused whole, with the
    /// status prost gives a `string` field that is not (`INTERNAL`).
    pub fn read(req: &'a CheckRequest) -> Result<Strings<'a>, Status> {
        let attributes = req.attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let mut headers = Vec::with_capacity(http.map_or(0, |h| h.headers.len()));
        for entry in http.map_or(&[][..], |h| &h.headers) {
            headers.push((text(&entry.key)?, text(&entry.value)?));
        }
        let mut route_hint = None;
        for entry in attributes.map_or(&[][..], |a| &a.context_extensions) {
            if text(&entry.key)? == ROUTE_CONTEXT_KEY {
                route_hint = Some(text(&entry.value)?);
            }
        }
        let field = |f: fn(&HttpRequest) -> &Bytes| http.map_or(Ok(""), |h| text(f(h)));
        Ok(Strings {
            method: field(|h| &h.method)?,
            host: field(|h| &h.host)?,
            path: field(|h| &h.path)?,
            headers,
            route_hint,
        })
    }

    /// What the core checks; a field Envoy left empty falls back to its pseudo-header.
    pub fn input(&self) -> CheckInput<'_> {
        let headers = Headers::Pairs(&self.headers);
        let pick = |field: &'a str, header: &str| match field {
            "" => headers.get(header).unwrap_or(""),
            set => set,
        };
        CheckInput {
            method: pick(self.method, ":method"),
            host: pick(self.host, ":authority"),
            path: pick(self.path, ":path"),
            headers,
            route_hint: self.route_hint,
        }
    }
}

fn text(bytes: &Bytes) -> Result<&str, Status> {
    std::str::from_utf8(bytes).map_err(|_| {
        Status::internal("failed to decode Protobuf message: invalid string value: data is not UTF-8 encoded")
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::ext_authz::v3::pb::CheckRequest as Full;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext as FullAttributes;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest as FullHttp, Peer, Request as FullRequest,
    };
    use prost::Message;

    use super::*;

    fn full(headers: &[(&str, &str)], method: &str, host: &str, path: &str, route: Option<&str>) -> Vec<u8> {
        let peer = Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "10.0.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(443)),
                    ..Default::default()
                })),
            }),
            principal: "spiffe://cluster.local/ns/a/sa/b".into(),
            ..Default::default()
        };
        let http = FullHttp {
            id: "123".into(),
            method: method.into(),
            headers: headers.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            path: path.into(),
            host: host.into(),
            scheme: "https".into(),
            protocol: "HTTP/2".into(),
            size: 12,
            body: "ignored".into(),
            ..Default::default()
        };
        let attributes = FullAttributes {
            source: Some(peer.clone()),
            destination: Some(peer),
            request: Some(FullRequest {
                time: None,
                http: Some(http),
            }),
            context_extensions: route
                .into_iter()
                .map(|r| (ROUTE_CONTEXT_KEY.to_owned(), r.to_owned()))
                .chain([("other".to_owned(), "x".to_owned())])
                .collect::<HashMap<_, _>>(),
            ..Default::default()
        };
        Full {
            attributes: Some(attributes),
        }
        .encode_to_vec()
    }

    fn decode(wire: Vec<u8>) -> CheckRequest {
        CheckRequest::decode(Bytes::from(wire)).expect("decodes")
    }

    #[test]
    fn reads_what_envoy_sends_and_skips_the_rest() {
        let headers = [
            (":authority", "shop.example.com"),
            ("authorization", "Bearer t"),
            ("x-request-id", "r1"),
        ];
        let req = decode(full(
            &headers,
            "POST",
            "shop.example.com:443",
            "/a/../b?x=1",
            Some("orders"),
        ));
        let strings = Strings::read(&req).expect("UTF-8");
        let input = strings.input();
        assert_eq!(
            (input.method, input.host, input.path),
            ("POST", "shop.example.com:443", "/a/../b?x=1")
        );
        assert_eq!(input.route_hint, Some("orders"));
        assert_eq!(input.header("authorization"), Some("Bearer t"));
        assert_eq!(input.header("x-request-id"), Some("r1"));
        assert_eq!(input.header("cookie"), None);
    }

    #[test]
    fn empty_fields_fall_back_to_pseudo_headers() {
        let headers = [(":method", "DELETE"), (":authority", "h.example"), (":path", "/p")];
        let req = decode(full(&headers, "", "", "", None));
        let strings = Strings::read(&req).expect("UTF-8");
        let input = strings.input();
        assert_eq!((input.method, input.host, input.path), ("DELETE", "h.example", "/p"));
        assert_eq!(input.route_hint, None);
    }

    #[test]
    fn an_empty_request_reads_as_empty() {
        let req = decode(Vec::new());
        let strings = Strings::read(&req).expect("UTF-8");
        let input = strings.input();
        assert_eq!(
            (input.method, input.host, input.path, input.route_hint),
            ("", "", "", None)
        );
    }

    #[test]
    fn strings_that_are_not_utf8_refuse_the_request_as_prost_would() {
        // a header value of 0xff, spliced into an otherwise valid request by hand
        let entry = Entry {
            key: Bytes::from_static(b"authorization"),
            value: Bytes::from_static(b"Bearer \xff"),
        };
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        headers: vec![entry],
                        ..Default::default()
                    }),
                }),
                context_extensions: Vec::new(),
            }),
        };
        let wire = req.encode_to_vec();
        let err = Strings::read(&decode(wire.clone())).err().expect("refused");
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(Full::decode(&wire[..]).is_err(), "prost refuses it too");
    }

    #[test]
    fn a_repeated_map_key_reads_as_its_last_value_like_a_decoded_map() {
        let entries = |v: [&str; 2]| {
            v.iter()
                .map(|v| Entry {
                    key: Bytes::from_static(b"x-a"),
                    value: Bytes::copy_from_slice(v.as_bytes()),
                })
                .collect()
        };
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        headers: entries(["1", "2"]),
                        ..Default::default()
                    }),
                }),
                context_extensions: Vec::new(),
            }),
        };
        let wire = req.encode_to_vec();
        let full = Full::decode(&wire[..]).expect("decodes");
        let map = &full.attributes.unwrap().request.unwrap().http.unwrap().headers;
        let lean = decode(wire);
        let strings = Strings::read(&lean).expect("UTF-8");
        assert_eq!(strings.input().header("x-a"), map.get("x-a").map(String::as_str));
    }

    /// A small deterministic generator, so a failure replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn text(&mut self) -> String {
            const ALPHABET: &[&str] = &[
                "a",
                "Z",
                "-",
                "_",
                ":",
                "/",
                "%2e",
                ".",
                " ",
                "é",
                "\u{0}",
                ",",
                "audgate.route",
            ];
            (0..self.below(8))
                .map(|_| ALPHABET[self.below(ALPHABET.len())])
                .collect()
        }
    }

    #[test]
    fn reads_every_generated_request_as_envoy_types_does() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2_000 {
            let headers: Vec<(String, String)> = (0..rng.below(6)).map(|_| (rng.text(), rng.text())).collect();
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let route = (rng.below(2) == 0).then(|| rng.text());
            let (method, host, path) = (rng.text(), rng.text(), rng.text());
            let wire = full(&pairs, &method, &host, &path, route.as_deref());
            let reference = Full::decode(&wire[..]).expect("envoy-types decodes it");
            let attributes = reference.attributes.as_ref().expect("attributes");
            let http = attributes.request.as_ref().and_then(|r| r.http.as_ref()).expect("http");
            let lean = decode(wire);
            let strings = Strings::read(&lean).expect("UTF-8");
            let input = strings.input();
            fn or_header<'a>(headers: &'a HashMap<String, String>, field: &'a str, name: &str) -> &'a str {
                match field {
                    "" => headers.get(name).map_or("", String::as_str),
                    set => set,
                }
            }
            let or_header = |field, name| or_header(&http.headers, field, name);
            assert_eq!(input.method, or_header(&http.method, ":method"));
            assert_eq!(input.host, or_header(&http.host, ":authority"));
            assert_eq!(input.path, or_header(&http.path, ":path"));
            assert_eq!(
                input.route_hint,
                attributes.context_extensions.get(ROUTE_CONTEXT_KEY).map(String::as_str)
            );
            for name in http.headers.keys() {
                assert_eq!(input.header(name), http.headers.get(name).map(String::as_str), "{name}");
            }
        }
    }

    #[test]
    fn damaged_frames_are_refused_or_read_never_a_panic() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let base = full(
            &[("authorization", "Bearer t"), (":path", "/a")],
            "GET",
            "h",
            "/a",
            Some("r"),
        );
        for _ in 0..5_000 {
            let mut wire = base.clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(wire.len());
                match rng.below(3) {
                    0 => wire[at] = rng.next() as u8,
                    1 => wire.truncate(at),
                    _ => wire.insert(at, rng.next() as u8),
                }
                if wire.is_empty() {
                    break;
                }
            }
            if let Ok(request) = CheckRequest::decode(Bytes::from(wire))
                && let Ok(strings) = Strings::read(&request)
            {
                let _ = strings.input().target();
            }
        }
    }
}
