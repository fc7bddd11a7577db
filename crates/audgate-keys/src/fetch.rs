//! Fetching key sets: OpenID discovery, a JWKS URL, or a file. Every network read has a
//! timeout and a size cap, so a slow or hostile endpoint cannot hold or flood audgate.

use std::path::Path;
use std::time::Duration;

use super::keyset::KeySet;
use crate::config::KeySource;

/// Largest discovery or JWKS document read (Keycloak's are a few KiB).
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP client for one issuer (its `ca_file` is part of the client).
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
}

/// One GET as `audgate doctor` reports it: any HTTP status, with the response headers, the
/// body (capped at [`MAX_DOCUMENT_BYTES`]) and how long it took.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The URL that answered (after redirects).
    pub url: String,
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
    /// From sending the request to the end of the body.
    pub elapsed: Duration,
}

/// A fetched key set and the bytes it came from (to tell whether it changed).
pub struct Fetched {
    pub keys: KeySet,
    pub document: Vec<u8>,
    /// The JWKS URL discovery pointed at, to reuse until a fetch fails.
    pub jwks_uri: Option<String>,
}

impl Fetcher {
    pub fn new(ca_file: Option<&Path>) -> Result<Fetcher, String> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .user_agent(concat!("audgate/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("ca_file {} holds no PEM certificate: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("ca_file {} holds no PEM certificate", path.display()));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Fetcher { client })
    }

    /// Fetch the key set. `jwks_uri` is a URL an earlier discovery found; without it a
    /// discovery source asks the discovery document first.
    pub async fn fetch(&self, source: &KeySource, jwks_uri: Option<&str>) -> Result<Fetched, String> {
        let (document, jwks_uri) = match source {
            KeySource::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                (bytes, None)
            }
            KeySource::JwksUri(url) => (self.get(url).await?, None),
            KeySource::Discovery(url) => {
                let uri = match jwks_uri {
                    Some(uri) => uri.to_owned(),
                    None => self.discover(url).await?,
                };
                (self.get(&uri).await?, Some(uri))
            }
        };
        let keys = KeySet::parse(&document).map_err(|e| e.to_string())?;
        Ok(Fetched {
            keys,
            document,
            jwks_uri,
        })
    }

    async fn discover(&self, url: &str) -> Result<String, String> {
        let body = self.get(url).await?;
        let doc: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("discovery document {url} is not JSON: {e}"))?;
        doc.get("jwks_uri")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("discovery document {url} has no jwks_uri"))
    }

    /// GET `url` with the same client settings as [`Fetcher::fetch`] (timeouts, redirects,
    /// `ca_file`, size cap) and return the answer whatever its status. `Err` only when no
    /// complete answer arrived: unreachable, TLS, timeout, a body over [`MAX_DOCUMENT_BYTES`].
    pub async fn probe(&self, url: &str) -> Result<Probe, String> {
        let started = std::time::Instant::now();
        let mut response = self
            .client
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let final_url = response.url().to_string();
        let body = read_capped(&mut response, url).await?;
        Ok(Probe {
            url: final_url,
            status,
            headers,
            body,
            elapsed: started.elapsed(),
        })
    }

    /// GET a document, refusing non-2xx answers and bodies over [`MAX_DOCUMENT_BYTES`].
    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let answer = self.probe(url).await?;
        if !answer.status.is_success() {
            return Err(format!("GET {url}: HTTP {}", answer.status));
        }
        Ok(answer.body)
    }
}

/// Read a response body, refusing one over [`MAX_DOCUMENT_BYTES`].
async fn read_capped(response: &mut reqwest::Response, url: &str) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(format!("GET {url}: body is over {MAX_DOCUMENT_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// reqwest's Display stops at the outermost error; the cause (refused, TLS, timeout) is inside.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
