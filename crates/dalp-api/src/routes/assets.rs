//! Assets: `tokenManager` manages them, `auditor` reads everything. Reads return the version
//! as an `ETag`; updates and deletes must send it back as `If-Match` (428 without it, 409 when
//! someone else changed the asset first).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use dalp_assets::compliance::{ComplianceConfig, Module};
use dalp_assets::store::{Asset, AssetVersion};
use dalp_assets::types::AssetInput;
use dalp_identity::types::PlatformRole;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::versioning::{if_match, with_etag, IfMatch};
use super::{parse_id, require_organisation};
use crate::auth::Auth;
use crate::consistency::{read_from, ReadAt};
use crate::extract::Json;
use crate::{ApiError, AppState};
use axum::Extension;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, replace, remove))
        .routes(routes!(history))
        .routes(routes!(publish))
        .routes(routes!(compliance, propose))
        .routes(routes!(compliance_history))
        .routes(routes!(approve))
}

#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Modules)]
struct ModulesBody {
    /// At most 12, each type at most once.
    #[schema(max_items = 12)]
    modules: Vec<Module>,
}

#[derive(Serialize, ToSchema)]
struct AssetBody {
    asset: Asset,
}

#[derive(Serialize, ToSchema)]
struct AssetPage {
    assets: Vec<Asset>,
}

#[derive(Serialize, ToSchema)]
struct AssetHistory {
    versions: Vec<AssetVersion>,
}

/// Every saved version of a record: who, when, what.
#[derive(Serialize, ToSchema)]
pub(crate) struct Versions {
    versions: Vec<Value>,
}

impl Versions {
    pub(crate) fn of(versions: Vec<Value>) -> Versions {
        Versions { versions }
    }
}

#[derive(Serialize, ToSchema)]
struct ComplianceBody {
    compliance: ComplianceConfig,
}

#[derive(Serialize, ToSchema)]
struct Applied {
    /// `applied`.
    status: &'static str,
    compliance: ComplianceConfig,
}

#[derive(Serialize, ToSchema)]
struct Pending {
    /// `pending`.
    status: &'static str,
    change_id: uuid::Uuid,
    message: &'static str,
}

/// Publish a draft asset (tokenManager).
#[utoipa::path(post, path = "/api/v1/assets/{id}/publish", tag = "assets",
    params(("id" = String, Path, description = "Asset id (UUID)"), IfMatch),
    responses(
        (status = 200, description = "Published", body = AssetBody, headers(("ETag" = String, description = "The new version"))),
        (status = 409, description = "Changed by someone else first, or not a draft", body = crate::error::Body),
        (status = 428, description = "If-Match missing", body = crate::error::Body),
    ))]
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
        AssetBody { asset },
    ))
}

/// The asset's compliance modules; the ETag is the configuration's version.
#[utoipa::path(get, path = "/api/v1/assets/{id}/compliance", tag = "assets",
    params(("id" = String, Path, description = "Asset id (UUID)")),
    responses((status = 200, description = "The configuration", body = ComplianceBody, headers(("ETag" = String, description = "The configuration's version")))))]
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
        ComplianceBody { compliance: c },
    ))
}

/// Set the asset's compliance modules (complianceManager). A draft asset's change applies at
/// once (200); a published asset's waits for a second complianceManager (202).
#[utoipa::path(put, path = "/api/v1/assets/{id}/compliance", tag = "assets",
    params(("id" = String, Path, description = "Asset id (UUID)"), IfMatch),
    request_body = ModulesBody,
    responses(
        (status = 200, description = "Applied", body = Applied, headers(("ETag" = String, description = "The new version"))),
        (status = 202, description = "Pending a second person's approval", body = Pending),
        (status = 409, description = "Changed by someone else first", body = crate::error::Body),
        (status = 428, description = "If-Match missing", body = crate::error::Body),
    ))]
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
    match state
        .assets
        .propose_compliance(&auth.ctx, id, if_match(&headers)?, body.modules)
        .await?
    {
        dalp_assets::compliance::Proposal::Applied { config } => Ok(with_etag(
            StatusCode::OK,
            config.version,
            Applied {
                status: "applied",
                compliance: config,
            },
        )),
        dalp_assets::compliance::Proposal::Pending { change_id } => Ok((
            StatusCode::ACCEPTED,
            Json(Pending {
                status: "pending",
                change_id,
                message:
                    "the asset is published: a second complianceManager must approve this change",
            }),
        )
            .into_response()),
    }
}

/// Approve a pending compliance change (complianceManager, not its proposer).
#[utoipa::path(post, path = "/api/v1/compliance-changes/{id}/approve", tag = "assets",
    params(("id" = String, Path, description = "Change id (UUID)")),
    responses(
        (status = 200, description = "Applied", body = Applied, headers(("ETag" = String, description = "The new version"))),
        (status = 409, description = "Not pending any more", body = crate::error::Body),
    ))]
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
        Applied {
            status: "applied",
            compliance: c,
        },
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

/// Create an asset (tokenManager), as a draft; the ETag is its version.
#[utoipa::path(post, path = "/api/v1/assets", tag = "assets",
    request_body = AssetInput,
    responses(
        (status = 201, description = "Created", body = AssetBody, headers(("ETag" = String, description = "The version"))),
        (status = 409, description = "The symbol or ISIN is taken in the organisation", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<AssetInput>,
) -> Result<Response, ApiError> {
    auth.require_role(&state, PlatformRole::TokenManager, "assets.asset.create")
        .await?;
    let spec = body.parse().map_err(dalp_assets::AssetError::from)?;
    require_organisation(&state, spec.organisation_id, "organisation_id").await?;
    let asset = state.assets.create(&auth.ctx, &spec).await?;
    Ok(with_etag(
        StatusCode::CREATED,
        asset.version,
        AssetBody { asset },
    ))
}

/// Assets (tokenManager, auditor), newest change first.
#[utoipa::path(get, path = "/api/v1/assets", tag = "assets",
    params(
        ("organisation_id" = Option<uuid::Uuid>, Query, description = "Only this organisation's"),
        ("limit" = Option<i64>, Query, minimum = 0, maximum = 500, description = "Page size (default 50)"),
        ("offset" = Option<i64>, Query, minimum = 0, description = "Rows to skip"),
    ),
    responses((status = 200, description = "A page of assets", body = AssetPage)))]
#[tracing::instrument(skip_all)]
async fn list(
    State(state): State<AppState>,
    auth: Auth,
    at: Option<Extension<ReadAt>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    super::known_params(&q, &["organisation_id", "limit", "offset"])?;
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
    let (store, served) = state.assets_reader(at.as_deref()).await;
    let assets = store
        .list(org, num("limit", 50, 500)?, num("offset", 0, i64::MAX)?)
        .await?;
    Ok(([read_from(&served)], Json(AssetPage { assets })).into_response())
}

/// Read an asset; the ETag is its version.
#[utoipa::path(get, path = "/api/v1/assets/{id}", tag = "assets",
    params(("id" = String, Path, description = "Asset id (UUID)")),
    responses((status = 200, description = "The asset", body = AssetBody, headers(("ETag" = String, description = "The version")))))]
#[tracing::instrument(skip_all)]
async fn show(
    State(state): State<AppState>,
    auth: Auth,
    at: Option<Extension<ReadAt>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require_any_role(&state, READERS, "assets.asset.read")
        .await?;
    let (store, served) = state.assets_reader(at.as_deref()).await;
    let asset = store.get(parse_id(&id, "asset")?).await?;
    let mut r = with_etag(StatusCode::OK, asset.version, AssetBody { asset });
    let (k, v) = read_from(&served);
    r.headers_mut().insert(k, v);
    Ok(r)
}

/// Replace an asset (tokenManager); If-Match with the version read.
#[utoipa::path(put, path = "/api/v1/assets/{id}", tag = "assets",
    params(("id" = String, Path, description = "Asset id (UUID)"), IfMatch),
    request_body = AssetInput,
    responses(
        (status = 200, description = "Replaced", body = AssetBody, headers(("ETag" = String, description = "The new version"))),
        (status = 409, description = "Changed by someone else first, or the symbol or ISIN is taken", body = crate::error::Body),
        (status = 428, description = "If-Match missing", body = crate::error::Body),
    ))]
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
    require_organisation(&state, spec.organisation_id, "organisation_id").await?;
    let asset = state.assets.update(&auth.ctx, id, expected, &spec).await?;
    Ok(with_etag(
        StatusCode::OK,
        asset.version,
        AssetBody { asset },
    ))
}

/// Delete an asset (tokenManager); If-Match with the version read.
#[utoipa::path(delete, path = "/api/v1/assets/{id}", tag = "assets",
    params(("id" = String, Path, description = "Asset id (UUID)"), IfMatch),
    responses(
        (status = 204, description = "Deleted"),
        (status = 409, description = "Changed by someone else first", body = crate::error::Body),
        (status = 428, description = "If-Match missing", body = crate::error::Body),
    ))]
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

/// Every version of an asset: who, when, before, after.
#[utoipa::path(get, path = "/api/v1/assets/{id}/history", tag = "assets",
    params(("id" = String, Path, description = "Asset id (UUID)")),
    responses((status = 200, description = "Versions, oldest first", body = AssetHistory)))]
#[tracing::instrument(skip_all)]
async fn history(
    State(state): State<AppState>,
    auth: Auth,
    at: Option<Extension<ReadAt>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require_any_role(&state, READERS, "assets.asset.history")
        .await?;
    let (store, served) = state.assets_reader(at.as_deref()).await;
    let versions = store.history(parse_id(&id, "asset")?).await?;
    Ok(([read_from(&served)], Json(AssetHistory { versions })).into_response())
}

/// Every version of an asset's compliance modules, with approvers.
#[utoipa::path(get, path = "/api/v1/assets/{id}/compliance/history", tag = "assets",
    params(("id" = String, Path, description = "Asset id (UUID)")),
    responses((status = 200, description = "Versions, oldest first", body = Versions)))]
#[tracing::instrument(skip_all)]
async fn compliance_history(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Versions>, ApiError> {
    auth.require_any_role(&state, COMPLIANCE_READERS, "assets.compliance.history")
        .await?;
    let v = state
        .assets
        .versions_of(
            dalp_assets::store::VersionedKind::Compliance,
            parse_id(&id, "asset")?,
        )
        .await?;
    Ok(Json(Versions::of(v)))
}
