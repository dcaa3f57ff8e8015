//! TOTP enrolment. Open to sessions still waiting for their second factor, so an admin's
//! first login can enrol.

use axum::extract::State;
use dalp_identity::store::TotpEnrolment;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::CodeBody;

use crate::auth::PendingAuth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enroll))
        .routes(routes!(confirm))
}

/// Start TOTP enrolment: a secret and its otpauth URI for an authenticator app.
#[utoipa::path(post, path = "/api/v1/mfa/totp", tag = "auth",
    responses(
        (status = 200, description = "The secret to confirm", body = TotpEnrolment),
        (status = 409, description = "TOTP is already enrolled", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn enroll(
    State(state): State<AppState>,
    PendingAuth(auth): PendingAuth,
) -> Result<Json<TotpEnrolment>, ApiError> {
    let e = state
        .identity
        .enroll_totp(&auth.ctx, &auth.principal)
        .await?;
    Ok(Json(e))
}

#[derive(Serialize, ToSchema)]
struct BackupCodes {
    /// One-time codes, shown only now.
    backup_codes: Vec<String>,
}

/// Confirm TOTP enrolment with a current code; returns one-time backup codes.
#[utoipa::path(post, path = "/api/v1/mfa/totp/confirm", tag = "auth",
    request_body = CodeBody,
    responses(
        (status = 200, description = "Enrolled", body = BackupCodes),
        (status = 401, description = "Wrong code", body = crate::error::Body),
        (status = 404, description = "No enrolment was started", body = crate::error::Body),
        (status = 409, description = "TOTP is already confirmed", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn confirm(
    State(state): State<AppState>,
    PendingAuth(auth): PendingAuth,
    Json(body): Json<CodeBody>,
) -> Result<Json<BackupCodes>, ApiError> {
    let codes = state
        .identity
        .confirm_totp(&auth.ctx, &auth.principal, &body.code)
        .await?;
    Ok(Json(BackupCodes {
        backup_codes: codes,
    }))
}
