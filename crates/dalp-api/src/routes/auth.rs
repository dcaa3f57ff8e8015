//! Login, second factor, logout and the caller's sessions.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use dalp_identity::store::{LoginResult, SessionInfo};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::parse_id;
use crate::auth::{Auth, Ctx, PendingAuth};
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(verify_mfa))
        .routes(routes!(logout))
        .routes(routes!(list_sessions))
        .routes(routes!(revoke_session))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Login)]
struct LoginBody {
    #[schema(max_length = 254)]
    email: String,
    #[schema(max_length = 1024)]
    password: String,
}

/// Log in with email and password; the session may still need a second factor.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", security(()),
    request_body = LoginBody,
    responses(
        (status = 200, description = "A session token; `mfa_required` says whether it still waits for a second factor", body = LoginResult),
        (status = 401, description = "Wrong email or password", body = crate::error::Body),
        (status = 403, description = "The user is banned", body = crate::error::Body),
        (status = 429, description = "Too many attempts for this address and email; wait a minute", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn login(
    State(state): State<AppState>,
    Ctx(ctx): Ctx,
    Json(body): Json<LoginBody>,
) -> Result<Json<LoginResult>, ApiError> {
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
    Ok(Json(r))
}

/// A one-time code: six TOTP digits or a backup code.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Code)]
pub(crate) struct CodeBody {
    #[schema(max_length = 64)]
    pub(crate) code: String,
}

#[derive(Serialize, ToSchema)]
struct Authenticated {
    /// Always `authenticated`.
    status: &'static str,
}

/// Complete a pending login with a TOTP or backup code. Five wrong codes revoke the pending
/// session; five in a row lock the user's second factor (1 minute, doubling to 24 hours).
#[utoipa::path(post, path = "/api/v1/auth/mfa/verify", tag = "auth",
    request_body = CodeBody,
    responses(
        (status = 200, description = "The session is authenticated", body = Authenticated),
        (status = 401, description = "Wrong code, or the pending session was revoked after too many", body = crate::error::Body),
        (status = 409, description = "No second factor is enrolled or pending", body = crate::error::Body),
        (status = 429, description = "Second-factor checks are locked for this user; see Retry-After", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn verify_mfa(
    State(state): State<AppState>,
    PendingAuth(auth): PendingAuth,
    Json(body): Json<CodeBody>,
) -> Result<Json<Authenticated>, ApiError> {
    state
        .identity
        .verify_mfa(&auth.ctx, &auth.principal, &body.code)
        .await?;
    Ok(Json(Authenticated {
        status: "authenticated",
    }))
}

/// Revoke the current session.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth",
    responses((status = 204, description = "Logged out")))]
#[tracing::instrument(skip_all)]
async fn logout(
    State(state): State<AppState>,
    PendingAuth(auth): PendingAuth,
) -> Result<StatusCode, ApiError> {
    state.identity.logout(&auth.ctx, &auth.principal).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
struct Sessions {
    sessions: Vec<SessionInfo>,
}

/// The caller's sessions.
#[utoipa::path(get, path = "/api/v1/auth/sessions", tag = "auth",
    responses((status = 200, description = "The caller's sessions", body = Sessions)))]
#[tracing::instrument(skip_all)]
async fn list_sessions(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Sessions>, ApiError> {
    let sessions = state.identity.list_sessions(&auth.principal).await?;
    Ok(Json(Sessions { sessions }))
}

/// Revoke one of the caller's sessions.
#[utoipa::path(delete, path = "/api/v1/auth/sessions/{id}", tag = "auth",
    params(("id" = String, Path, description = "Session id (UUID)")),
    responses((status = 204, description = "Revoked")))]
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
