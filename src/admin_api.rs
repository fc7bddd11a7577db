//! `audgate.v1.Admin` (proto/audgate/v1/admin.proto): the Explain call, served on the admin
//! listener when the config says `admin: {explain: true}`, and the client that
//! `audgate explain --server HOST:PORT` uses. It explains with the running instance's config
//! and cached keys: what an operator inside a mesh needs when neither is on their laptop.

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::State;
use crate::explain::{self, Signatures};
use crate::serve::Peer;

/// The generated types and services.
pub mod pb {
    tonic::include_proto!("audgate.v1");

    /// For gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/audgate_descriptor.bin"));
}

use pb::admin_server::{Admin, AdminServer};
use pb::{ExplainRequest, ExplainResponse};

/// The gRPC routes to merge into the admin listener: Admin and its reflection.
pub fn routes(state: Arc<State>) -> Result<axum::Router, String> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("gRPC reflection: {e}"))?;
    Ok(tonic::service::Routes::new(AdminServer::new(AdminService { state }))
        .add_service(reflection)
        .into_axum_router())
}

struct AdminService {
    state: Arc<State>,
}

/// An explain request from the wire; empty strings mean "not given".
pub fn request_from(r: &ExplainRequest) -> Result<explain::Request, Status> {
    let given = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    if r.route.is_empty() && r.host.is_empty() {
        return Err(Status::invalid_argument("give a route name, or a host and a path"));
    }
    Ok(explain::Request {
        method: given(&r.method).map_or_else(|| "GET".to_owned(), |m| m.to_ascii_uppercase()),
        host: r.host.clone(),
        path: given(&r.path).unwrap_or_else(|| "/".to_owned()),
        route: given(&r.route),
        token: given(&r.token),
    })
}

/// Explain reveals every route and its rules: only a peer on this host may ask (loopback,
/// also as an IPv4-mapped IPv6 address). An unknown peer is refused.
pub fn explain_allowed(peer: Option<SocketAddr>) -> bool {
    peer.is_some_and(|p| p.ip().to_canonical().is_loopback())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn explain(&self, request: Request<ExplainRequest>) -> Result<Response<ExplainResponse>, Status> {
        let peer = request.extensions().get::<Peer>().map(|p| p.0);
        if !explain_allowed(peer) {
            return Err(Status::permission_denied(
                "audgate.v1.Admin/Explain answers loopback peers only (kubectl port-forward, or from inside the pod): it reveals the routes and their rules",
            ));
        }
        let r = request.into_inner();
        let req = request_from(&r)?;
        let snapshot = self.state.snapshot();
        let signatures = if r.no_verify {
            Signatures::Skip
        } else {
            Signatures::Verify
        };
        let now = if r.at == 0 { crate::check::unix_now() } else { r.at };
        // the tenant of a templated issuer, from the token's iss: its keys decide
        let policy = &snapshot.config.policy;
        let tenant = req
            .token
            .as_deref()
            .and_then(|t| crate::authz::jwt::parse(t).ok())
            .and_then(|p| {
                policy
                    .resolve_iss(&p.claims.iss)
                    .and_then(|(_, t)| t.map(str::to_owned))
            });
        let e = explain::explain(
            policy,
            &req,
            |id| snapshot.keys.current_for(id, tenant.as_deref()),
            signatures,
            now,
        );
        Ok(Response::new(ExplainResponse {
            decision: e.decision.to_owned(),
            reason: e.reason.to_owned(),
            status: u32::from(e.status),
            text: explain::render_text(&e),
            json: serde_json::to_string_pretty(&e).unwrap_or_default(),
            exit_code: u32::from(e.exit_code()),
        }))
    }
}

/// Ask a running instance (`HOST:PORT` of its admin listener) to explain.
pub async fn explain_remote(server: &str, request: ExplainRequest) -> Result<ExplainResponse, String> {
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let mut client = pb::admin_client::AdminClient::connect(url.clone())
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    client
        .explain(request)
        .await
        .map(Response::into_inner)
        .map_err(|s| match s.code() {
            tonic::Code::Unimplemented => format!(
                "{url} does not serve audgate.v1.Admin: set `admin: {{explain: true}}` in its config (and point --server at listen.admin)"
            ),
            _ => format!("{url}: {}", s.message()),
        })
}

#[cfg(test)]
mod peer_tests {
    use super::explain_allowed;

    #[test]
    fn only_loopback_peers_may_explain() {
        for ok in ["127.0.0.1:5", "127.9.8.7:5", "[::1]:5", "[::ffff:127.0.0.1]:5"] {
            assert!(explain_allowed(Some(ok.parse().unwrap())), "{ok}");
        }
        for no in [
            "10.0.0.1:5",
            "192.168.1.2:5",
            "[::ffff:10.0.0.1]:5",
            "[fe80::1]:5",
            "0.0.0.0:5",
        ] {
            assert!(!explain_allowed(Some(no.parse().unwrap())), "{no}");
        }
        assert!(!explain_allowed(None));
    }
}
