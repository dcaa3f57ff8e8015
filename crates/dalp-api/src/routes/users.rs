//! Users (admin only), role grants (admin only, fresh login), the caller's own profile, and
//! KYC profiles (identityManager only; every read is audited).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use dalp_identity::store::{NewUser, UserPatch};
use dalp_identity::types::{Email, EvmAddress, KycProfile, Password, PlatformRole};
use serde::Deserialize;
use serde_json::{json, Value};

use super::parse_id;
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/me", get(me))
        .route("/api/v1/users", post(create).get(list))
        .route("/api/v1/users/{id}", get(show).patch(update).delete(remove))
        .route("/api/v1/users/{id}/roles", post(grant))
        .route("/api/v1/users/{id}/roles/{role}", delete(revoke))
        .route("/api/v1/users/{id}/kyc", get(kyc_read).put(kyc_write))
}

#[tracing::instrument(skip_all)]
async fn me(State(state): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
    let user = state.identity.get_user(auth.principal.user_id).await?;
    Ok(Json(
        json!({ "user": user, "credential": auth.principal.credential }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    email: String,
    name: String,
    password: Option<String>,
    wallet_address: Option<String>,
    #[serde(default)]
    roles: Vec<PlatformRole>,
}

#[tracing::instrument(skip_all)]
async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.user.create")
        .await?;
    if !body.roles.is_empty() {
        auth.principal.require_fresh()?;
    }
    let new = NewUser {
        email: Email::parse(&body.email).map_err(dalp_identity::IdentityError::from)?,
        name: body.name,
        password: body
            .password
            .as_deref()
            .map(Password::parse)
            .transpose()
            .map_err(dalp_identity::IdentityError::from)?,
        wallet_address: body
            .wallet_address
            .as_deref()
            .map(EvmAddress::parse)
            .transpose()
            .map_err(|e| e.for_field("wallet_address"))
            .map_err(dalp_identity::IdentityError::from)?,
        roles: body.roles,
    };
    let user = state.identity.create_user(&auth.ctx, new).await?;
    Ok((StatusCode::CREATED, Json(json!({ "user": user }))))
}

#[tracing::instrument(skip_all)]
async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.user.list")
        .await?;
    let num = |k: &str, default: i64, max: i64| -> Result<i64, ApiError> {
        match q.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|n| (0..=max).contains(n))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("{k} must be a number from 0 to {max}"))
                }),
        }
    };
    let limit = num("limit", 50, 500)?;
    let offset = num("offset", 0, i64::MAX)?;
    let users = state.identity.list_users(limit, offset).await?;
    Ok(Json(
        json!({ "users": users, "limit": limit, "offset": offset }),
    ))
}

#[tracing::instrument(skip_all)]
async fn show(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.user.read")
        .await?;
    let user = state.identity.get_user(parse_id(&id, "user")?).await?;
    Ok(Json(json!({ "user": user })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ban {
    reason: String,
    until: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    name: Option<String>,
    /// A string sets it, `null` clears it, absent leaves it.
    #[serde(default)]
    wallet_address: Option<Value>,
    ban: Option<Ban>,
    #[serde(default)]
    unban: bool,
}

#[tracing::instrument(skip_all)]
async fn update(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<PatchBody>,
) -> Result<Json<Value>, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.user.update")
        .await?;
    let id = parse_id(&id, "user")?;
    if body.ban.is_some() || body.unban {
        auth.principal.require_fresh()?;
    }
    let wallet_address = match body.wallet_address {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) => {
            Some(Some(EvmAddress::parse(&s).map_err(|e| {
                dalp_identity::IdentityError::from(e.for_field("wallet_address"))
            })?))
        }
        Some(_) => {
            return Err(ApiError::Unprocessable(
                "wallet_address must be a string or null".into(),
            ))
        }
    };
    let patch = UserPatch {
        name: body.name,
        wallet_address,
        ban: body.ban.map(|b| (b.reason, b.until)),
        unban: body.unban,
    };
    let user = state.identity.update_user(&auth.ctx, id, patch).await?;
    Ok(Json(json!({ "user": user })))
}

#[tracing::instrument(skip_all)]
async fn remove(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.user.delete")
        .await?;
    auth.principal.require_fresh()?;
    state
        .identity
        .delete_user(&auth.ctx, parse_id(&id, "user")?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    role: PlatformRole,
}

#[tracing::instrument(skip_all)]
async fn grant(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<GrantBody>,
) -> Result<Json<Value>, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.role.grant")
        .await?;
    auth.principal.require_fresh()?;
    let user = state
        .identity
        .grant_role(&auth.ctx, parse_id(&id, "user")?, body.role)
        .await?;
    Ok(Json(json!({ "user": user })))
}

#[tracing::instrument(skip_all)]
async fn revoke(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, role)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.role.revoke")
        .await?;
    auth.principal.require_fresh()?;
    let role = PlatformRole::parse(&role)
        .map_err(|_| ApiError::NotFound("role grant not found".into()))?;
    let user = state
        .identity
        .revoke_role(&auth.ctx, parse_id(&id, "user")?, role)
        .await?;
    Ok(Json(json!({ "user": user })))
}

#[tracing::instrument(skip_all)]
async fn kyc_read(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth.require_role(&state, PlatformRole::IdentityManager, "identity.kyc.read")
        .await?;
    let profile = state
        .identity
        .get_kyc(&auth.ctx, parse_id(&id, "user")?)
        .await?;
    Ok(Json(json!({ "kyc": profile })))
}

#[tracing::instrument(skip_all)]
async fn kyc_write(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<KycProfile>,
) -> Result<StatusCode, ApiError> {
    auth.require_role(&state, PlatformRole::IdentityManager, "identity.kyc.write")
        .await?;
    state
        .identity
        .put_kyc(&auth.ctx, parse_id(&id, "user")?, &body)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
