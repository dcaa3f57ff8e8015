//! Assets: `tokenManager` manages them, `auditor` reads everything. Reads return the version
//! as an `ETag`; updates and deletes must send it back as `If-Match` (428 without it, 409 when
//! someone else changed the asset first).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use dalp_assets::types::AssetInput;
use dalp_identity::types::PlatformRole;
use serde_json::json;

use super::parse_id;
use super::versioning::{if_match, with_etag};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/assets", get(list).post(create))
        .route("/api/v1/assets/{id}", get(show).put(replace).delete(remove))
        .route("/api/v1/assets/{id}/history", get(history))
        .route("/api/v1/assets/{id}/publish", axum::routing::post(publish))
        .route(
            "/api/v1/assets/{id}/compliance",
            get(compliance).put(propose),
        )
        .route(
            "/api/v1/assets/{id}/compliance/history",
            get(compliance_history),
        )
        .route(
            "/api/v1/compliance-changes/{id}/approve",
            axum::routing::post(approve),
        )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModulesBody {
    modules: Vec<dalp_assets::compliance::Module>,
}

#[tracing::instrument(skip_all)]
async fn publish(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth.require_role(&state, PlatformRole::TokenManager, "assets.asset.publish")
        .await?;
    let asset = state
        .assets
        .publish(&auth.ctx, parse_id(&id, "asset")?, if_match(&headers)?)
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        asset.version,
        json!({ "asset": asset }),
    ))
}

#[tracing::instrument(skip_all)]
async fn compliance(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require_any_role(&state, COMPLIANCE_READERS, "assets.compliance.read")
        .await?;
    let c = state.assets.compliance(parse_id(&id, "asset")?).await?;
    Ok(with_etag(
        StatusCode::OK,
        c.version,
        json!({ "compliance": c }),
    ))
}

#[tracing::instrument(skip_all)]
async fn propose(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<ModulesBody>,
) -> Result<Response, ApiError> {
    auth.require_role(
        &state,
        PlatformRole::ComplianceManager,
        "assets.compliance.update",
    )
    .await?;
    let id = parse_id(&id, "asset")?;
    match state.assets.propose_compliance(&auth.ctx, id, if_match(&headers)?, body.modules).await? {
        dalp_assets::compliance::Proposal::Applied { config } => {
            Ok(with_etag(StatusCode::OK, config.version, json!({ "status": "applied", "compliance": config })))
        }
        dalp_assets::compliance::Proposal::Pending { change_id } => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "status": "pending", "change_id": change_id,
                         "message": "the asset is published: a second complianceManager must approve this change" })),
        )
            .into_response()),
    }
}

#[tracing::instrument(skip_all)]
async fn approve(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require_role(
        &state,
        PlatformRole::ComplianceManager,
        "assets.compliance.approve",
    )
    .await?;
    let c = state
        .assets
        .approve_compliance(&auth.ctx, parse_id(&id, "change")?)
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        c.version,
        json!({ "status": "applied", "compliance": c }),
    ))
}

/// Who may read asset data: managers of it and auditors.
const READERS: &[PlatformRole] = &[PlatformRole::TokenManager, PlatformRole::Auditor];
/// Who may read compliance configuration.
const COMPLIANCE_READERS: &[PlatformRole] = &[
    PlatformRole::ComplianceManager,
    PlatformRole::TokenManager,
    PlatformRole::Auditor,
];

#[tracing::instrument(skip_all)]
async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<AssetInput>,
) -> Result<Response, ApiError> {
    auth.require_role(&state, PlatformRole::TokenManager, "assets.asset.create")
        .await?;
    let spec = body.parse().map_err(dalp_assets::AssetError::from)?;
    let asset = state.assets.create(&auth.ctx, &spec).await?;
    Ok(with_etag(
        StatusCode::CREATED,
        asset.version,
        json!({ "asset": asset }),
    ))
}

#[tracing::instrument(skip_all)]
async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    auth.require_any_role(&state, READERS, "assets.asset.list")
        .await?;
    let org = q
        .get("organisation_id")
        .map(|s| {
            uuid::Uuid::parse_str(s)
                .map_err(|_| ApiError::BadRequest("organisation_id must be a UUID".into()))
        })
        .transpose()?;
    let num = |k: &str, d: i64, max: i64| -> Result<i64, ApiError> {
        q.get(k)
            .map(|v| {
                v.parse::<i64>()
                    .ok()
                    .filter(|n| (0..=max).contains(n))
                    .ok_or_else(|| ApiError::BadRequest(format!("{k} must be 0 to {max}")))
            })
            .unwrap_or(Ok(d))
    };
    let assets = state
        .assets
        .list(org, num("limit", 50, 500)?, num("offset", 0, i64::MAX)?)
        .await?;
    Ok(Json(json!({ "assets": assets })))
}

#[tracing::instrument(skip_all)]
async fn show(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require_any_role(&state, READERS, "assets.asset.read")
        .await?;
    let asset = state.assets.get(parse_id(&id, "asset")?).await?;
    Ok(with_etag(
        StatusCode::OK,
        asset.version,
        json!({ "asset": asset }),
    ))
}

#[tracing::instrument(skip_all)]
async fn replace(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<AssetInput>,
) -> Result<Response, ApiError> {
    auth.require_role(&state, PlatformRole::TokenManager, "assets.asset.update")
        .await?;
    let id = parse_id(&id, "asset")?;
    let expected = if_match(&headers)?;
    let spec = body.parse().map_err(dalp_assets::AssetError::from)?;
    let asset = state.assets.update(&auth.ctx, id, expected, &spec).await?;
    Ok(with_etag(
        StatusCode::OK,
        asset.version,
        json!({ "asset": asset }),
    ))
}

#[tracing::instrument(skip_all)]
async fn remove(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    auth.require_role(&state, PlatformRole::TokenManager, "assets.asset.delete")
        .await?;
    let id = parse_id(&id, "asset")?;
    state
        .assets
        .delete(&auth.ctx, id, if_match(&headers)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[tracing::instrument(skip_all)]
async fn history(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    auth.require_any_role(&state, READERS, "assets.asset.history")
        .await?;
    let versions = state.assets.history(parse_id(&id, "asset")?).await?;
    Ok(Json(json!({ "versions": versions })))
}

#[tracing::instrument(skip_all)]
async fn compliance_history(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    auth.require_any_role(&state, COMPLIANCE_READERS, "assets.compliance.history")
        .await?;
    let v = state
        .assets
        .versions_of(
            dalp_assets::store::VersionedKind::Compliance,
            parse_id(&id, "asset")?,
        )
        .await?;
    Ok(Json(json!({ "versions": v })))
}
