//! Users (admin only), role grants (admin only, fresh login), the caller's own profile, and
//! KYC profiles (identityManager only; every read is audited).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use dalp_identity::store::{Credential, NewUser, User, UserPatch};
use dalp_identity::types::{Email, EvmAddress, KycProfile, Password, PlatformRole};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::parse_id;
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(me))
        .routes(routes!(create, list))
        .routes(routes!(show, update, remove))
        .routes(routes!(grant))
        .routes(routes!(revoke))
        .routes(routes!(kyc_read, kyc_write))
}

#[derive(Serialize, ToSchema)]
struct Me {
    user: User,
    /// How this request authenticated.
    credential: Credential,
}

#[derive(Serialize, ToSchema)]
struct UserBody {
    user: User,
}

#[derive(Serialize, ToSchema)]
struct UserPage {
    users: Vec<User>,
    limit: i64,
    offset: i64,
}

#[derive(Serialize, ToSchema)]
struct KycBody {
    kyc: KycProfile,
}

/// The caller's own profile and how the request authenticated.
#[utoipa::path(get, path = "/api/v1/me", tag = "users",
    responses((status = 200, description = "The caller", body = Me)))]
#[tracing::instrument(skip_all)]
async fn me(State(state): State<AppState>, auth: Auth) -> Result<Json<Me>, ApiError> {
    let user = state.identity.get_user(auth.principal.user_id).await?;
    Ok(Json(Me {
        user,
        credential: auth.principal.credential,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewUser)]
struct CreateBody {
    #[schema(
        max_length = 254,
        pattern = "^[A-Za-z0-9.!#$%&*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)+$"
    )]
    email: String,
    #[schema(max_length = 200, extensions(("x-dalp-text" = json!(true))))]
    name: String,
    /// 12 to 256 characters; absent: the user cannot log in with a password.
    #[schema(min_length = 12, max_length = 256)]
    password: Option<String>,
    #[schema(pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$")]
    wallet_address: Option<String>,
    /// No role twice. Granting any needs a login within the last 5 minutes.
    #[serde(default)]
    #[schema(schema_with = distinct_roles)]
    roles: Vec<PlatformRole>,
}

/// A list of platform roles, none twice.
pub(crate) fn distinct_roles() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(<PlatformRole as utoipa::PartialSchema>::schema())
        .unique_items(true)
        .build()
}

/// Create a user (admin).
#[utoipa::path(post, path = "/api/v1/users", tag = "users",
    request_body = CreateBody,
    responses(
        (status = 201, description = "Created", body = UserBody),
        (status = 409, description = "The email or wallet address is taken", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<CreateBody>,
) -> Result<(StatusCode, Json<UserBody>), ApiError> {
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
    Ok((StatusCode::CREATED, Json(UserBody { user })))
}

/// Users, oldest first (admin).
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    params(
        ("limit" = Option<i64>, Query, minimum = 0, maximum = 500, description = "Page size (default 50)"),
        ("offset" = Option<i64>, Query, minimum = 0, description = "Rows to skip"),
    ),
    responses((status = 200, description = "A page of users", body = UserPage)))]
#[tracing::instrument(skip_all)]
async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<UserPage>, ApiError> {
    super::known_params(&q, &["limit", "offset"])?;
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
    Ok(Json(UserPage {
        users,
        limit,
        offset,
    }))
}

/// Read a user (admin).
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users",
    params(("id" = String, Path, description = "User id (UUID)")),
    responses((status = 200, description = "The user", body = UserBody)))]
#[tracing::instrument(skip_all)]
async fn show(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<UserBody>, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.user.read")
        .await?;
    let user = state.identity.get_user(parse_id(&id, "user")?).await?;
    Ok(Json(UserBody { user }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Ban {
    #[schema(max_length = 500, extensions(("x-dalp-text" = json!(true))))]
    reason: String,
    /// Must be in the future; absent: until lifted.
    until: Option<DateTime<Utc>>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = UserPatch)]
struct PatchBody {
    #[schema(max_length = 200, extensions(("x-dalp-text" = json!(true))))]
    name: Option<String>,
    /// A string sets it, `null` clears it, absent leaves it.
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^0x([0-9a-f]{40}|[0-9A-F]{40})$")]
    wallet_address: Option<Value>,
    /// Ban the user (needs a login within the last 5 minutes).
    ban: Option<Ban>,
    /// Lift a ban (needs a login within the last 5 minutes).
    #[serde(default)]
    unban: bool,
}

/// Change a user's name, wallet address or ban state (admin).
#[utoipa::path(patch, path = "/api/v1/users/{id}", tag = "users",
    params(("id" = String, Path, description = "User id (UUID)")),
    request_body = PatchBody,
    responses(
        (status = 200, description = "The changed user", body = UserBody),
        (status = 409, description = "The wallet address is taken, or the caller tried to ban themselves", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn update(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<PatchBody>,
) -> Result<Json<UserBody>, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.user.update")
        .await?;
    let id = parse_id(&id, "user")?;
    if body.ban.is_some() || body.unban {
        auth.principal.require_fresh()?;
    }
    if body.ban.is_some() {
        not_yourself(&auth, id, "ban")?;
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
    Ok(Json(UserBody { user }))
}

/// Delete a user (admin; needs a login within the last 5 minutes).
#[utoipa::path(delete, path = "/api/v1/users/{id}", tag = "users",
    params(("id" = String, Path, description = "User id (UUID)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "The caller's own account", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn remove(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.user.delete")
        .await?;
    auth.principal.require_fresh()?;
    let id = parse_id(&id, "user")?;
    not_yourself(&auth, id, "delete")?;
    state.identity.delete_user(&auth.ctx, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RoleGrant)]
struct GrantBody {
    role: PlatformRole,
}

/// Grant a platform role (admin; needs a login within the last 5 minutes).
#[utoipa::path(post, path = "/api/v1/users/{id}/roles", tag = "users",
    params(("id" = String, Path, description = "User id (UUID)")),
    request_body = GrantBody,
    responses((status = 200, description = "The user with the role", body = UserBody)))]
#[tracing::instrument(skip_all)]
async fn grant(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<GrantBody>,
) -> Result<Json<UserBody>, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.role.grant")
        .await?;
    auth.principal.require_fresh()?;
    let user = state
        .identity
        .grant_role(&auth.ctx, parse_id(&id, "user")?, body.role)
        .await?;
    Ok(Json(UserBody { user }))
}

/// Revoke a platform role (admin; needs a login within the last 5 minutes).
#[utoipa::path(delete, path = "/api/v1/users/{id}/roles/{role}", tag = "users",
    params(
        ("id" = String, Path, description = "User id (UUID)"),
        ("role" = String, Path, description = "A platform role, e.g. tokenManager"),
    ),
    responses(
        (status = 200, description = "The user without the role", body = UserBody),
        (status = 409, description = "The admin role of the caller's own account", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn revoke(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, role)): Path<(String, String)>,
) -> Result<Json<UserBody>, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "identity.role.revoke")
        .await?;
    auth.principal.require_fresh()?;
    let role = PlatformRole::parse(&role)
        .map_err(|_| ApiError::NotFound("role grant not found".into()))?;
    let id = parse_id(&id, "user")?;
    if role == PlatformRole::Admin {
        not_yourself(&auth, id, "remove the admin role from")?;
    }
    let user = state.identity.revoke_role(&auth.ctx, id, role).await?;
    Ok(Json(UserBody { user }))
}

/// An administrator cannot lock themselves out: another administrator must do it.
fn not_yourself(auth: &Auth, id: uuid::Uuid, what: &str) -> Result<(), ApiError> {
    if id == auth.principal.user_id {
        return Err(ApiError::Conflict(format!(
            "you cannot {what} your own account; ask another administrator"
        )));
    }
    Ok(())
}

/// Read a user's KYC profile (identityManager; every read is audited).
#[utoipa::path(get, path = "/api/v1/users/{id}/kyc", tag = "users",
    params(("id" = String, Path, description = "User id (UUID)")),
    responses((status = 200, description = "The profile", body = KycBody)))]
#[tracing::instrument(skip_all)]
async fn kyc_read(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<KycBody>, ApiError> {
    auth.require_role(&state, PlatformRole::IdentityManager, "identity.kyc.read")
        .await?;
    let profile = state
        .identity
        .get_kyc(&auth.ctx, parse_id(&id, "user")?)
        .await?;
    Ok(Json(KycBody { kyc: profile }))
}

/// Write a user's KYC profile (identityManager); stored encrypted.
#[utoipa::path(put, path = "/api/v1/users/{id}/kyc", tag = "users",
    params(("id" = String, Path, description = "User id (UUID)")),
    request_body = KycProfile,
    responses((status = 204, description = "Stored")))]
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
