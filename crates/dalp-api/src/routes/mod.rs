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

use std::collections::HashMap;

use axum::Router;
use chrono::{DateTime, Utc};
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

/// `?limit=`: 1 to 1000 rows a page, 100 when absent.
pub(crate) fn page_limit(q: &HashMap<String, String>) -> Result<i64, ApiError> {
    match q.get("limit") {
        None => Ok(100),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::BadRequest("limit must be between 1 and 1000".into())),
    }
}

/// An optional RFC 3339 time parameter.
pub(crate) fn time_param(
    q: &HashMap<String, String>,
    k: &str,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    q.get(k)
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|d| d.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::BadRequest(format!(
                        "{k} must be an RFC 3339 time, e.g. 2026-11-01T00:00:00Z"
                    ))
                })
        })
        .transpose()
}

/// Path ids: anything that is not a UUID cannot name an existing resource.
pub(crate) fn parse_id(s: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::NotFound(format!("{what} not found")))
}
