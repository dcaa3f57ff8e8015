//! Instrument templates: `tokenManager` manages them, readers (`tokenManager`, `auditor`)
//! list what an organisation may use. ETag / If-Match as for assets.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use dalp_assets::templates::TemplateInput;
use dalp_identity::types::PlatformRole;
use serde::Deserialize;
use serde_json::json;

use super::parse_id;
use super::versioning::{if_match, with_etag};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/templates", get(list).post(create))
        .route("/api/v1/templates/{id}", get(show).put(replace))
        .route("/api/v1/templates/{id}/publish", post(publish))
        .route("/api/v1/templates/{id}/visibility", post(visibility))
        .route("/api/v1/templates/{id}/history", get(history))
}

#[tracing::instrument(skip_all)]
async fn history(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    auth.require_any_role(&state, READERS, "assets.template.history")
        .await?;
    let v = state
        .assets
        .versions_of(
            dalp_assets::store::VersionedKind::Template,
            parse_id(&id, "template")?,
        )
        .await?;
    Ok(Json(json!({ "versions": v })))
}

/// Who may read templates: those who manage them and auditors.
const READERS: &[PlatformRole] = &[PlatformRole::TokenManager, PlatformRole::Auditor];

#[tracing::instrument(skip_all)]
async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<TemplateInput>,
) -> Result<Response, ApiError> {
    auth.require_role(&state, PlatformRole::TokenManager, "assets.template.create")
        .await?;
    let t = state.assets.create_template(&auth.ctx, body).await?;
    Ok(with_etag(
        StatusCode::CREATED,
        t.version,
        json!({ "template": t }),
    ))
}

#[tracing::instrument(skip_all)]
async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    auth.require_any_role(&state, READERS, "assets.template.list")
        .await?;
    let org = q
        .get("organisation_id")
        .ok_or_else(|| {
            ApiError::BadRequest(
                "organisation_id is required: templates are listed as one organisation sees them"
                    .into(),
            )
        })
        .and_then(|s| {
            uuid::Uuid::parse_str(s)
                .map_err(|_| ApiError::BadRequest("organisation_id must be a UUID".into()))
        })?;
    Ok(Json(
        json!({ "templates": state.assets.templates_for(org).await? }),
    ))
}

#[tracing::instrument(skip_all)]
async fn show(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require_any_role(&state, READERS, "assets.template.read")
        .await?;
    let t = state.assets.template(parse_id(&id, "template")?).await?;
    Ok(with_etag(
        StatusCode::OK,
        t.version,
        json!({ "template": t }),
    ))
}

#[tracing::instrument(skip_all)]
async fn replace(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<TemplateInput>,
) -> Result<Response, ApiError> {
    auth.require_role(&state, PlatformRole::TokenManager, "assets.template.update")
        .await?;
    let t = state
        .assets
        .update_template(
            &auth.ctx,
            parse_id(&id, "template")?,
            if_match(&headers)?,
            body,
        )
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        t.version,
        json!({ "template": t }),
    ))
}

#[tracing::instrument(skip_all)]
async fn publish(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth.require_role(
        &state,
        PlatformRole::TokenManager,
        "assets.template.publish",
    )
    .await?;
    let t = state
        .assets
        .publish_template(&auth.ctx, parse_id(&id, "template")?, if_match(&headers)?)
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        t.version,
        json!({ "template": t }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Visibility {
    organisation_id: uuid::Uuid,
    hidden: bool,
}

#[tracing::instrument(skip_all)]
async fn visibility(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<Visibility>,
) -> Result<StatusCode, ApiError> {
    auth.require_role(
        &state,
        PlatformRole::TokenManager,
        "assets.template.visibility",
    )
    .await?;
    state
        .assets
        .set_template_hidden(
            &auth.ctx,
            body.organisation_id,
            parse_id(&id, "template")?,
            body.hidden,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
