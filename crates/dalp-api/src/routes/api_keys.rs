//! The caller's API keys. The key itself is returned once, at creation.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::Router;
use chrono::{Duration, Utc};
use dalp_identity::store::NewApiKey;
use dalp_identity::types::Scope;
use serde::Deserialize;
use serde_json::{json, Value};

use super::parse_id;
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/api-keys", post(create).get(list))
        .route("/api/v1/api-keys/{id}", delete(revoke))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    scope: Scope,
    expires_in_days: Option<u32>,
    rate_limit_per_minute: Option<i32>,
}

#[tracing::instrument(skip_all)]
async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    Ok((
        StatusCode::CREATED,
        Json(json!({ "key": key, "api_key": info })),
    ))
}

#[tracing::instrument(skip_all)]
async fn list(State(state): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    let keys = state.identity.list_api_keys(auth.principal.user_id).await?;
    Ok(Json(json!({ "api_keys": keys })))
}

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
