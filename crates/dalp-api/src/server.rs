//! The accept loop: HTTP/1.1 and HTTP/2 over any listener (plain TCP or [`crate::tls`]), with
//! the limits a public endpoint needs — a deadline for the request head (slow-header clients
//! are dropped), a deadline for each request (503 in the JSON error shape), and a bound on open
//! connections (the accept loop waits when it is reached) — and a graceful shutdown that lets
//! in-flight requests finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tower::Service;

use crate::ApiError;

/// Connection hygiene; `[api]` settings of the configuration.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// The whole request head must arrive within this (HTTP/1).
    pub header_read_timeout: Duration,
    /// A request must be answered within this, body included.
    pub request_timeout: Duration,
    /// Open connections at most; further clients wait in the kernel's backlog.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        let d = dalp_app::config::ApiConfig::default();
        ConnectionLimits::from_config(&d)
    }
}

impl ConnectionLimits {
    pub fn from_config(c: &dalp_app::config::ApiConfig) -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            request_timeout: Duration::from_millis(c.request_timeout_ms),
            max_connections: c.max_connections,
        }
    }
}

/// Bounds each request by `limit`: past it the client gets 503 `request_timeout`.
async fn with_deadline(
    limit: Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            ApiError::NotReady(format!("the request took longer than {limit:?}")).into_response()
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish.
pub async fn serve_on<L>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let deadline = limits.request_timeout;
    let app = app.layer(axum::middleware::from_fn(move |req, next| {
        with_deadline(deadline, req, next)
    }));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Far above the API's own bounds (crate::MAX_HEADERS, crate::MAX_HEADER_BYTES), so
        // the router refuses oversized heads with 431 in the JSON shape; hyper's own (empty)
        // 431 is left for heads past these.
        .max_headers(4 * crate::MAX_HEADERS)
        .max_buf_size(1024 * 1024);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        let (io, addr) = tokio::select! {
            c = listener.accept() => c,
            _ = &mut shutdown => break,
        };
        let router = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(addr));
                router.clone().call(req.map(axum::body::Body::new))
            });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(client = %addr, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    // Stop accepting, let open requests finish (bounded by the request deadline).
    drop(listener);
    let _ = tokio::time::timeout(deadline + Duration::from_secs(1), graceful.shutdown()).await;
    Ok(())
}
