//! Login, second factor, logout and the caller's sessions.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::parse_id;
use crate::auth::{Auth, Ctx, PendingAuth};
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/mfa/verify", post(verify_mfa))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/auth/sessions", get(list_sessions))
        .route("/api/v1/auth/sessions/{id}", delete(revoke_session))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    email: String,
    password: String,
}

#[tracing::instrument(skip_all)]
async fn login(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<LoginBody>,
) -> Result<Json<Value>, ApiError> {
    if body.email.len() > 254 || body.password.len() > 1024 {
        return Err(ApiError::Unprocessable(
            "email or password is too long".into(),
        ));
    }
    let who = format!(
        "login:{}:{}",
        ctx.ip.map(|i| i.to_string()).unwrap_or_default(),
        body.email.trim().to_lowercase()
    );
    if !state
        .limits
        .allow(&who, state.settings.login_attempts_per_minute)
    {
        return Err(ApiError::TooManyRequests(
            "too many login attempts; wait a minute".into(),
        ));
    }
    let r = state
        .identity
        .login(&ctx, &body.email, &body.password)
        .await?;
    Ok(Json(json!({
        "token": r.token,
        "session_id": r.session_id,
        "expires_at": r.expires_at,
        "mfa_required": r.mfa_required,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeBody {
    code: String,
}

#[tracing::instrument(skip_all)]
async fn verify_mfa(
    State(state): State<AppState>,
    PendingAuth(auth): PendingAuth,
    Json(body): Json<CodeBody>,
) -> Result<Json<Value>, ApiError> {
    state
        .identity
        .verify_mfa(&auth.ctx, &auth.principal, &body.code)
        .await?;
    Ok(Json(json!({ "status": "authenticated" })))
}

#[tracing::instrument(skip_all)]
async fn logout(
    State(state): State<AppState>,
    PendingAuth(auth): PendingAuth,
) -> Result<StatusCode, ApiError> {
    state.identity.logout(&auth.ctx, &auth.principal).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[tracing::instrument(skip_all)]
async fn list_sessions(State(state): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    let sessions = state.identity.list_sessions(&auth.principal).await?;
    Ok(Json(json!({ "sessions": sessions })))
}

#[tracing::instrument(skip_all)]
async fn revoke_session(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id, "session")?;
    state
        .identity
        .revoke_session(&auth.ctx, auth.principal.user_id, id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
