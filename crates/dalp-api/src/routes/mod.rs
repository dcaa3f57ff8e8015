//! Route table. Handlers stay private to their endpoint-group module.

mod api_keys;
mod assets;
mod audit;
mod auth;
mod health;
mod indexed;
mod metrics;
mod mfa;
mod openapi;
mod settings;
mod templates;
mod users;
mod versioning;
mod workflows;

use axum::Router;
use uuid::Uuid;

use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .merge(health::router())
        .merge(auth::router())
        .merge(mfa::router())
        .merge(api_keys::router())
        .merge(users::router())
        .merge(assets::router())
        .merge(settings::router())
        .merge(templates::router())
        .merge(audit::router())
        .merge(indexed::router())
        .merge(workflows::router())
        .merge(metrics::router())
        .merge(openapi::router())
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
}

/// Path ids: anything that is not a UUID cannot name an existing resource.
pub(crate) fn parse_id(s: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::NotFound(format!("{what} not found")))
}
