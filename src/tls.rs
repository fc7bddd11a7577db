//! TLS and mTLS on the gRPC and HTTP listeners (`listen.tls`), with rustls.
//!
//! - The certificate chain, key and client CA are read at start (a bad file stops audgate
//!   with a clear error) and re-read whenever one of them changes: cert-manager rewrites a
//!   Secret volume in place. New handshakes use the new files; open connections keep theirs,
//!   so a rotation drops nothing. Files that do not load keep the old certificate in use.
//! - With `client_ca_file`, a client must present a certificate issued by that CA; with
//!   `client_sans`, its leaf must also carry one of the listed URI SANs (SPIFFE ids) or DNS
//!   SANs. Both are enforced in the handshake: a refused client never sends a request.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// How often the files are compared with what is loaded. Reading three small files is cheap;
/// a directory watch would miss nothing sooner that matters for a rotation days ahead.
const POLL: Duration = Duration::from_secs(1);
/// A changed set of files is read twice this far apart and used only if both reads agree,
/// so a certificate written before its key is not taken for a pair.
const SETTLE: Duration = Duration::from_millis(100);

/// The listeners' TLS state: the server config in use, swapped whole when the files change.
pub struct Tls {
    settings: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The file contents last tried (loaded or refused), to notice a change.
    seen: Mutex<Files>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The bytes of the configured files.
#[derive(Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Tls {
    /// Read the files and build the server config; `Err` says which file is wrong and how.
    pub fn load(settings: &TlsConfig) -> Result<Arc<Tls>, String> {
        let files = read(settings)?;
        let config = server_config(settings, &files)?;
        Ok(Arc::new(Tls {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new(files),
        }))
    }

    /// An acceptor on the config in use now (one `Arc` clone per connection).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Re-read the files; when they changed (and agree with a second read), switch to them,
    /// or keep the config in use and say why not. `Some(Ok)` on a switch, `Some(Err)` on a
    /// refused change, `None` when nothing changed.
    pub async fn reload_if_changed(&self) -> Option<Result<(), String>> {
        let first = read(&self.settings);
        if let Ok(files) = &first
            && *self.seen.lock().unwrap_or_else(|e| e.into_inner()) == *files
        {
            return None;
        }
        tokio::time::sleep(SETTLE).await;
        let second = read(&self.settings);
        let files = match (first, second) {
            (Ok(a), Ok(b)) if a == b => b,
            (_, Ok(_)) => return None, // still being written: next round
            (_, Err(e)) => return Some(Err(e)),
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == files {
                return None;
            }
            *seen = files.clone();
        }
        match server_config(&self.settings, &files) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                Some(Ok(()))
            }
            Err(e) => Some(Err(e)),
        }
    }
}

/// Re-read the files every [`POLL`] until `stop`, logging each switch and each refusal once
/// (a refused set of files is not retried until it changes again).
pub async fn watch(tls: Arc<Tls>, mut stop: watch::Receiver<bool>) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = poll.tick() => {}
        }
        match tls.reload_if_changed().await {
            None => {}
            Some(Ok(())) => {
                failing = None;
                tracing::info!(
                    cert_file = %tls.settings.cert_file.display(),
                    "TLS certificate reloaded: new connections use it"
                );
            }
            Some(Err(e)) if failing.as_deref() != Some(e.as_str()) => {
                tracing::error!("listen.tls: {e}; the certificate in use stays in use");
                failing = Some(e);
            }
            Some(Err(_)) => {} // said already
        }
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read listen.tls.{what} {}: {e}", path.display()))
}

fn read(settings: &TlsConfig) -> Result<Files, String> {
    Ok(Files {
        cert: read_file(&settings.cert_file, "cert_file")?,
        key: read_file(&settings.key_file, "key_file")?,
        client_ca: settings
            .client_ca_file
            .as_deref()
            .map(|p| read_file(p, "client_ca_file"))
            .transpose()?,
    })
}

fn certificates(pem: &[u8], path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("listen.tls.{what} {}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "listen.tls.{what} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server config for one set of files: the chain and key (they must match), ALPN for
/// HTTP/2 and HTTP/1.1, and the client verifier when a client CA is configured.
fn server_config(settings: &TlsConfig, files: &Files) -> Result<ServerConfig, String> {
    let chain = certificates(&files.cert, &settings.cert_file, "cert_file")?;
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| {
        format!(
            "listen.tls.key_file {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}",
            settings.key_file.display()
        )
    })?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match (&files.client_ca, &settings.client_ca_file) {
        (Some(pem), Some(path)) => {
            builder.with_client_cert_verifier(client_verifier(pem, path, &settings.client_sans, &provider)?)
        }
        _ => builder.with_no_client_auth(),
    };
    let signing_key = provider.key_provider.load_private_key(key.clone_key()).map_err(|e| {
        format!(
            "listen.tls.key_file {}: unusable private key: {e}",
            settings.key_file.display()
        )
    })?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing_key);
    certified.keys_match().map_err(|e| {
        format!(
            "listen.tls.key_file {} is not the key of the certificate in {}: {e}",
            settings.key_file.display(),
            settings.cert_file.display()
        )
    })?;
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("listen.tls.cert_file {}: {e}", settings.cert_file.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn client_verifier(
    pem: &[u8],
    path: &Path,
    sans: &[String],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(pem, path, "client_ca_file")? {
        roots.add(cert).map_err(|e| {
            format!(
                "listen.tls.client_ca_file {}: not a usable CA certificate: {e}",
                path.display()
            )
        })?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| format!("listen.tls.client_ca_file {}: {e}", path.display()))?;
    if sans.is_empty() {
        return Ok(inner);
    }
    Ok(Arc::new(SanAllowList {
        inner,
        allowed: AllowedSans::new(sans),
    }))
}

/// `client_sans`, split by kind: an entry with a URI scheme (`spiffe://...`) is a URI SAN,
/// compared exactly; anything else is a DNS SAN, compared case-insensitively without a
/// trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedSans {
    uris: Vec<String>,
    dns: Vec<String>,
}

impl AllowedSans {
    pub fn new(entries: &[String]) -> AllowedSans {
        let (uris, dns): (Vec<&String>, Vec<&String>) = entries.iter().partition(|e| e.contains(':'));
        AllowedSans {
            uris: uris.into_iter().cloned().collect(),
            dns: dns.into_iter().map(|d| dns_key(d)).collect(),
        }
    }

    /// Whether a certificate with these SANs is allowed.
    pub fn allows<'a>(&self, uris: impl IntoIterator<Item = &'a str>, dns: impl IntoIterator<Item = &'a str>) -> bool {
        uris.into_iter().any(|u| self.uris.iter().any(|a| a == u))
            || dns.into_iter().any(|d| {
                let d = dns_key(d);
                self.dns.contains(&d)
            })
    }
}

fn dns_key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The CA's verdict first, then the SAN allow-list, both inside the handshake.
#[derive(Debug)]
struct SanAllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: AllowedSans,
}

impl ClientCertVerifier for SanAllowList {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.allowed.allows(cert.valid_uri_names(), cert.valid_dns_names()) {
            return Ok(verified);
        }
        let presented: Vec<&str> = cert.valid_uri_names().chain(cert.valid_dns_names()).collect();
        tracing::warn!(
            sans = ?presented,
            "TLS client refused: its certificate carries none of listen.tls.client_sans"
        );
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The files named in `settings`, for messages.
pub fn describe(settings: &TlsConfig) -> String {
    let mut parts: Vec<String> = vec![format!(
        "certificate {}, key {}",
        settings.cert_file.display(),
        settings.key_file.display()
    )];
    if let Some(ca) = &settings.client_ca_file {
        parts.push(format!("client CA {}", ca.display()));
    }
    if !settings.client_sans.is_empty() {
        parts.push(format!("client SANs {}", settings.client_sans.join(", ")));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_split_into_uri_and_dns_and_dns_ignores_case_and_trailing_dot() {
        let allowed = AllowedSans::new(&[
            "spiffe://cluster.local/ns/istio-system/sa/gateway".to_owned(),
            "Envoy.Example.com.".to_owned(),
        ]);
        assert!(allowed.allows(["spiffe://cluster.local/ns/istio-system/sa/gateway"], []));
        assert!(allowed.allows([], ["envoy.example.com"]));
        assert!(allowed.allows([], ["ENVOY.example.com."]));
        assert!(!allowed.allows(["spiffe://cluster.local/ns/default/sa/other"], ["other.example.com"]));
        // a DNS entry never matches a URI SAN that spells the same text, nor the reverse
        assert!(!allowed.allows(["envoy.example.com"], []));
        assert!(!allowed.allows([], ["spiffe://cluster.local/ns/istio-system/sa/gateway"]));
    }
}
