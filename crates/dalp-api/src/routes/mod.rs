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
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use crate::{ApiError, AppState};

/// Every route, each registered with its OpenAPI description (see [`openapi`]).
fn openapi_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
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
}

pub(crate) fn router() -> Router<AppState> {
    let (router, _) = openapi_router().split_for_parts();
    router
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

pub use openapi::document;

/// Refuses a request target that PostgreSQL text could not hold or that is not UTF-8 once
/// percent-decoded (`%00`, `%FF`), in the one JSON error shape, before any handler runs.
pub(crate) async fn reject_bad_target(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let uri = req.uri();
    for (part, raw) in [("path", Some(uri.path())), ("query", uri.query())] {
        let Some(raw) = raw else { continue };
        match percent_decode(raw) {
            Some(text) if text.contains('\0') => {
                return ApiError::BadRequest(format!("the {part} must not contain %00 (NUL)"))
                    .into_response()
            }
            Some(_) => {}
            None => {
                return ApiError::BadRequest(format!(
                    "the {part} is not valid UTF-8 once percent-decoded"
                ))
                .into_response()
            }
        }
    }
    next.run(req).await
}

/// Percent-decodes `s` (a malformed escape stays as it is); `None` when the bytes are not
/// UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Refuses query parameters the endpoint does not take (a misspelt filter would otherwise
/// be ignored silently): 400 naming them and the known ones.
pub(crate) fn known_params(q: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::BadRequest(format!(
            "unknown parameter `{k}`; known: {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
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

/// Refuses a reference to an organisation that does not exist (422 naming `field`) before a
/// domain stores it: organisations live in the identity schema, which no other component
/// reads, so the API asks the identity store.
pub(crate) async fn require_organisation(
    state: &AppState,
    id: Uuid,
    field: &'static str,
) -> Result<(), ApiError> {
    if state.identity.organisation_exists(id).await? {
        Ok(())
    } else {
        Err(ApiError::Identity(dalp_identity::IdentityError::Invalid(
            dalp_identity::types::Invalid::new(field, "no organisation has this id"),
        )))
    }
}

/// Path ids: anything that is not a UUID cannot name an existing resource.
pub(crate) fn parse_id(s: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(s).map_err(|_| ApiError::NotFound(format!("{what} not found")))
}
