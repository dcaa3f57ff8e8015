//! The caller's API keys. The key itself is returned once, at creation.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{Duration, Utc};
use dalp_identity::store::{ApiKeyInfo, NewApiKey};
use dalp_identity::types::Scope;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::parse_id;
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(revoke))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewApiKey)]
struct CreateBody {
    #[schema(max_length = 100, extensions(("x-dalp-text" = json!(true))))]
    name: String,
    scope: Scope,
    #[schema(minimum = 1, maximum = 3650)]
    expires_in_days: Option<u32>,
    /// Requests a minute the key may make (default 600).
    #[schema(minimum = 1, maximum = 100000)]
    rate_limit_per_minute: Option<i32>,
}

#[derive(Serialize, ToSchema)]
struct CreatedKey {
    /// The key itself, shown only now.
    key: String,
    api_key: ApiKeyInfo,
}

#[derive(Serialize, ToSchema)]
struct ApiKeys {
    api_keys: Vec<ApiKeyInfo>,
}

/// Create an API key for the caller. Needs a login within the last 5 minutes.
#[utoipa::path(post, path = "/api/v1/api-keys", tag = "auth",
    request_body = CreateBody,
    responses(
        (status = 201, description = "The key, shown once", body = CreatedKey),
        (status = 401, description = "Not authenticated, or the login is older than 5 minutes (log in again)", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<CreateBody>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    auth.principal.require_fresh()?;
    if body
        .expires_in_days
        .map(|d| d == 0 || d > 3650)
        .unwrap_or(false)
    {
        return Err(ApiError::Unprocessable(
            "expires_in_days must be 1 to 3650".into(),
        ));
    }
    let (key, info) = state
        .identity
        .create_api_key(
            &auth.ctx,
            &auth.principal,
            NewApiKey {
                name: body.name,
                scope: body.scope,
                expires_at: body
                    .expires_in_days
                    .map(|d| Utc::now() + Duration::days(d as i64)),
                rate_limit_per_minute: body.rate_limit_per_minute.unwrap_or(600),
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(CreatedKey { key, api_key: info })))
}

/// The caller's API keys (never the keys themselves).
#[utoipa::path(get, path = "/api/v1/api-keys", tag = "auth",
    responses((status = 200, description = "The caller's keys", body = ApiKeys)))]
#[tracing::instrument(skip_all)]
async fn list(State(state): State<AppState>, auth: Auth) -> Result<Json<ApiKeys>, ApiError> {
    let api_keys = state.identity.list_api_keys(auth.principal.user_id).await?;
    Ok(Json(ApiKeys { api_keys }))
}

/// Revoke one of the caller's API keys.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", tag = "auth",
    params(("id" = String, Path, description = "API key id (UUID)")),
    responses((status = 204, description = "Revoked")))]
#[tracing::instrument(skip_all)]
async fn revoke(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id, "API key")?;
    state
        .identity
        .revoke_api_key(&auth.ctx, auth.principal.user_id, id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
