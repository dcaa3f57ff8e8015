//! The HTTP service: composes the domain stores behind one axum router, with one JSON error
//! shape ([`error::ApiError`]). Each endpoint group lives in its own file under `routes/`.

pub mod catalog;
pub mod error;
mod routes;

use std::sync::Arc;

use axum::Router;
use dalp_db::ComponentPools;

pub use error::ApiError;

/// What handlers share: one pool per component role.
#[derive(Clone)]
pub struct AppState {
    pub pools: Arc<ComponentPools>,
}

/// The full router. `max_body_bytes` caps every request body.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    routes::router()
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
