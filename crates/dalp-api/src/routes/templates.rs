//! Instrument templates: `tokenManager` manages them, readers (`tokenManager`, `auditor`)
//! list what an organisation may use. ETag / If-Match as for assets.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use dalp_assets::templates::{Template, TemplateInput};
use dalp_identity::types::PlatformRole;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::assets::Versions;
use super::versioning::{if_match, with_etag, IfMatch};
use super::{parse_id, require_organisation};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, replace))
        .routes(routes!(publish))
        .routes(routes!(visibility))
        .routes(routes!(history))
}

#[derive(Serialize, ToSchema)]
struct TemplateBody {
    template: Template,
}

#[derive(Serialize, ToSchema)]
struct Templates {
    templates: Vec<Template>,
}

/// Every version of a template.
#[utoipa::path(get, path = "/api/v1/templates/{id}/history", tag = "templates",
    params(("id" = String, Path, description = "Template id (UUID)")),
    responses((status = 200, description = "Versions, oldest first", body = Versions)))]
#[tracing::instrument(skip_all)]
async fn history(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Versions>, ApiError> {
    auth.require_any_role(&state, READERS, "assets.template.history")
        .await?;
    let v = state
        .assets
        .versions_of(
            dalp_assets::store::VersionedKind::Template,
            parse_id(&id, "template")?,
        )
        .await?;
    Ok(Json(Versions::of(v)))
}

/// Who may read templates: those who manage them and auditors.
const READERS: &[PlatformRole] = &[PlatformRole::TokenManager, PlatformRole::Auditor];

/// Create an instrument template, as a draft (tokenManager).
#[utoipa::path(post, path = "/api/v1/templates", tag = "templates",
    request_body = TemplateInput,
    responses(
        (status = 201, description = "Created", body = TemplateBody, headers(("ETag" = String, description = "The version"))),
        (status = 409, description = "The slug is taken", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<TemplateInput>,
) -> Result<Response, ApiError> {
    auth.require_role(&state, PlatformRole::TokenManager, "assets.template.create")
        .await?;
    if let Some(org) = body.organisation_id {
        require_organisation(&state, org, "organisation_id").await?;
    }
    let t = state.assets.create_template(&auth.ctx, body).await?;
    Ok(with_etag(
        StatusCode::CREATED,
        t.version,
        TemplateBody { template: t },
    ))
}

/// Templates an organisation may use: the system's and its own, minus those it hid.
#[utoipa::path(get, path = "/api/v1/templates", tag = "templates",
    params(("organisation_id" = uuid::Uuid, Query, description = "The organisation whose view to list")),
    responses(
        (status = 200, description = "Templates", body = Templates),
        (status = 404, description = "No organisation has this id", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Templates>, ApiError> {
    super::known_params(&q, &["organisation_id"])?;
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
    if !state.identity.organisation_exists(org).await? {
        return Err(ApiError::NotFound("organisation not found".into()));
    }
    Ok(Json(Templates {
        templates: state.assets.templates_for(org).await?,
    }))
}

/// Read a template; the ETag is its version.
#[utoipa::path(get, path = "/api/v1/templates/{id}", tag = "templates",
    params(("id" = String, Path, description = "Template id (UUID)")),
    responses((status = 200, description = "The template", body = TemplateBody, headers(("ETag" = String, description = "The version")))))]
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
        TemplateBody { template: t },
    ))
}

/// Replace a template (tokenManager, If-Match); once published only the name may change.
#[utoipa::path(put, path = "/api/v1/templates/{id}", tag = "templates",
    params(("id" = String, Path, description = "Template id (UUID)"), IfMatch),
    request_body = TemplateInput,
    responses(
        (status = 200, description = "Replaced", body = TemplateBody, headers(("ETag" = String, description = "The new version"))),
        (status = 409, description = "Changed by someone else first, or published and more than the name changed", body = crate::error::Body),
        (status = 428, description = "If-Match missing", body = crate::error::Body),
    ))]
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
        TemplateBody { template: t },
    ))
}

/// Publish a draft template (tokenManager, If-Match).
#[utoipa::path(post, path = "/api/v1/templates/{id}/publish", tag = "templates",
    params(("id" = String, Path, description = "Template id (UUID)"), IfMatch),
    responses(
        (status = 200, description = "Published", body = TemplateBody, headers(("ETag" = String, description = "The new version"))),
        (status = 409, description = "Changed by someone else first, or already published", body = crate::error::Body),
        (status = 428, description = "If-Match missing", body = crate::error::Body),
    ))]
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
        TemplateBody { template: t },
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Visibility {
    organisation_id: uuid::Uuid,
    hidden: bool,
}

/// Hide a template from an organisation's list, or show it again (tokenManager).
#[utoipa::path(post, path = "/api/v1/templates/{id}/visibility", tag = "templates",
    params(("id" = String, Path, description = "Template id (UUID)")),
    request_body = Visibility,
    responses((status = 204, description = "Done")))]
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
    require_organisation(&state, body.organisation_id, "organisation_id").await?;
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
