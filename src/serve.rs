//! The accept loop the three listeners share: HTTP/1.1 and HTTP/2 (prior knowledge) on one
//! port, with limits that a slow, silent or greedy client cannot get around.
//!
//! - at most [`Limits::max_connections`] open connections; past that, new ones wait in the
//!   kernel's backlog instead of taking file descriptors the other listeners need;
//! - a connection must send its first complete request within [`HANDSHAKE_TIMEOUT`] (this
//!   covers the HTTP/2 preface and SETTINGS, which hyper itself never times out);
//! - HTTP/1: every request's headers within [`HEADER_READ_TIMEOUT`], which also closes a
//!   keep-alive connection idle for that long;
//! - HTTP/2: a PING every [`KEEPALIVE_INTERVAL`], the connection closed when one is not
//!   answered within [`KEEPALIVE_TIMEOUT`]; at most [`Limits::max_streams`] concurrent streams
//!   and [`MAX_HEADER_LIST_BYTES`] of headers;
//! - with TLS (`listen.tls`), the TLS handshake counts against the same
//!   [`HANDSHAKE_TIMEOUT`], and each connection takes the certificate in use when it arrives
//!   (a rotation changes only later handshakes);
//! - on `stop`, no new connections; open ones finish their requests (HTTP/1 closes after the
//!   response, HTTP/2 gets a GOAWAY) and `serve` returns once every one has closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tower_service::Service;

use crate::tls::Tls;

/// From accept to the first complete request (headers read; for HTTP/2 also the preface and
/// the SETTINGS exchange).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/1: the time a request's headers may take, and how long a keep-alive connection may
/// wait for its next request. Longer than Envoy's usual upstream idle timeouts would allow,
/// so set the `http_service` cluster's `idle_timeout` below it (deploy/envoy does).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2: how often an idle peer is PINGed, and how long it has to answer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`. Envoy sends the checked request's headers inside the
/// gRPC message, not as HTTP/2 headers, so this only bounds the call's own headers.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;
/// After a failed `accept` (e.g. out of file descriptors), wait this long before the next one
/// instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a listener serves: an axum `Router`, or the gRPC port's [`crate::grpc::Listener`].
pub trait Handler:
    Service<hyper::Request<Incoming>, Response = hyper::Response<Self::Body>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static
{
    type Body: http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static;
}

impl<S, B> Handler for S
where
    S: Service<hyper::Request<Incoming>, Response = hyper::Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    type Body = B;
}

/// The peer address of a request's connection, in the request's extensions (tonic copies them
/// into its `Request`).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// What one listener allows.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub max_streams: u32,
}

/// Serve `router` on `listener` (over TLS when `tls` is set) until `stop` turns true and
/// every open connection has closed.
pub async fn serve(
    listener: TcpListener,
    router: impl Handler,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    what: &'static str,
    stop: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut stopping = stop.clone();
    let mut full = false; // warned once for this episode of being at the limit
    loop {
        let free = slots.available_permits();
        if free == 0 && !full {
            tracing::warn!(
                "{what}: {} connections open, the limit; new ones wait until one closes",
                limits.max_connections
            );
        }
        full = free == 0 || (full && free < limits.max_connections / 2);
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = stopping.wait_for(|s| *s) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|s| *s) => break,
        };
        match stream {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let router = router.clone();
                let builder = Arc::clone(&builder);
                let stop = stop.clone();
                match &tls {
                    None => {
                        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
                        tokio::spawn(connection(stream, peer, deadline, router, builder, stop, permit));
                    }
                    Some(tls) => {
                        tokio::spawn(tls_connection(
                            stream,
                            peer,
                            tls.acceptor(),
                            router,
                            builder,
                            stop,
                            permit,
                        ));
                    }
                }
            }
            Err(e) => {
                tracing::warn!("{what}: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    drop(listener);
    // Every connection holds a permit until it closes: all of them back means all closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

fn builder(limits: Limits) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    builder
}

/// A TLS handshake (within [`HANDSHAKE_TIMEOUT`], abandoned on `stop`), then the connection.
async fn tls_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    router: impl Handler,
    builder: Arc<Builder<TokioExecutor>>,
    mut stop: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let accepted = tokio::select! {
        accepted = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => accepted,
        _ = stop.wait_for(|s| *s) => return,
    };
    match accepted {
        Ok(Ok(stream)) => connection(stream, peer, deadline, router, builder, stop, slot).await,
        Ok(Err(e)) => tracing::debug!(?peer, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(?peer, "TLS handshake not done within {HANDSHAKE_TIMEOUT:?}"),
    }
}

/// One connection, until it closes, fails, misses [`HANDSHAKE_TIMEOUT`] (counted from
/// `deadline`), or `stop` drains it.
async fn connection<I>(
    stream: I,
    peer: SocketAddr,
    deadline: Instant,
    router: impl Handler,
    builder: Arc<Builder<TokioExecutor>>,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let requested = Arc::clone(&requested);
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            requested.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(Peer(peer));
            let mut router = router.clone();
            async move { Ok::<_, Infallible>(router.call(request).await.unwrap_or_else(|e| match e {})) }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let handshake = tokio::time::sleep_until(deadline);
    tokio::pin!(handshake);
    let mut handshake_done = false;
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection closed: {e}");
                }
                return;
            }
            () = &mut handshake, if !handshake_done => {
                if !requested.load(Ordering::Relaxed) {
                    tracing::debug!("connection closed: no request within {HANDSHAKE_TIMEOUT:?}");
                    return;
                }
                handshake_done = true;
            }
            _ = stop.wait_for(|s| *s), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
