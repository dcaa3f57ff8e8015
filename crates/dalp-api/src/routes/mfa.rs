//! TOTP enrolment. Open to sessions still waiting for their second factor, so an admin's
//! first login can enrol.

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::PendingAuth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/mfa/totp", post(enroll))
        .route("/api/v1/mfa/totp/confirm", post(confirm))
}

#[tracing::instrument(skip_all)]
async fn enroll(
    State(state): State<AppState>,
    PendingAuth(auth): PendingAuth,
) -> Result<Json<Value>, ApiError> {
    let e = state
        .identity
        .enroll_totp(&auth.ctx, &auth.principal)
        .await?;
    Ok(Json(
        json!({ "secret": e.secret, "otpauth_uri": e.otpauth_uri }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeBody {
    code: String,
}

#[tracing::instrument(skip_all)]
async fn confirm(
    State(state): State<AppState>,
    PendingAuth(auth): PendingAuth,
    Json(body): Json<CodeBody>,
) -> Result<Json<Value>, ApiError> {
    let codes = state
        .identity
        .confirm_totp(&auth.ctx, &auth.principal, &body.code)
        .await?;
    Ok(Json(json!({ "backup_codes": codes })))
}
