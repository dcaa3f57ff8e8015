//! Organisation settings (`admin` writes, `auditor` reads; ETag / If-Match as for assets,
//! `"0"` for the first save), currencies, and FX rates (`admin` records, anyone signed in
//! reads the latest).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use dalp_assets::settings::{FxInput, FxRate, OrgSettings, SettingsInput};
use dalp_identity::types::PlatformRole;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::assets::Versions;
use super::parse_id;
use super::versioning::{if_match, with_etag, IfMatch};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(show, save))
        .routes(routes!(history))
        .routes(routes!(currencies))
        .routes(routes!(record_fx))
        .routes(routes!(latest_fx))
}

#[derive(Serialize, ToSchema)]
struct SettingsBody {
    settings: OrgSettings,
}

#[derive(Serialize, ToSchema)]
struct Currency {
    /// ISO 4217.
    code: String,
    name: String,
    decimals: i16,
}

#[derive(Serialize, ToSchema)]
struct Currencies {
    currencies: Vec<Currency>,
}

#[derive(Serialize, ToSchema)]
struct FxRateBody {
    fx_rate: FxRate,
}

#[derive(Serialize, ToSchema)]
struct FxRates {
    fx_rates: Vec<FxRate>,
}

/// An organisation's settings (admin, auditor); defaults when never saved. The ETag is the
/// version.
#[utoipa::path(get, path = "/api/v1/settings/{organisation_id}", tag = "settings",
    params(("organisation_id" = String, Path, description = "Organisation id (UUID)")),
    responses((status = 200, description = "The settings", body = SettingsBody, headers(("ETag" = String, description = "The version (0: never saved)")))))]
#[tracing::instrument(skip_all)]
async fn show(
    State(state): State<AppState>,
    auth: Auth,
    Path(org): Path<String>,
) -> Result<Response, ApiError> {
    auth.require_any_role(
        &state,
        &[PlatformRole::Admin, PlatformRole::Auditor],
        "assets.settings.read",
    )
    .await?;
    let s = state
        .assets
        .settings(organisation(&state, &org).await?)
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        s.version,
        SettingsBody { settings: s },
    ))
}

/// Save an organisation's settings (admin); If-Match with the version read, `"0"` for the
/// first save.
#[utoipa::path(put, path = "/api/v1/settings/{organisation_id}", tag = "settings",
    params(("organisation_id" = String, Path, description = "Organisation id (UUID)"), IfMatch),
    request_body = SettingsInput,
    responses(
        (status = 200, description = "Saved", body = SettingsBody, headers(("ETag" = String, description = "The new version"))),
        (status = 409, description = "Changed by someone else first", body = crate::error::Body),
        (status = 428, description = "If-Match missing", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn save(
    State(state): State<AppState>,
    auth: Auth,
    Path(org): Path<String>,
    headers: HeaderMap,
    Json(body): Json<SettingsInput>,
) -> Result<Response, ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "assets.settings.update")
        .await?;
    let org = organisation(&state, &org).await?;
    let expected = if_match(&headers)?;
    let s = state
        .assets
        .put_settings(&auth.ctx, org, expected, body)
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        s.version,
        SettingsBody { settings: s },
    ))
}

/// The organisation a path names: 404 unless it exists (settings are kept only for
/// organisations that do).
async fn organisation(state: &AppState, id: &str) -> Result<uuid::Uuid, ApiError> {
    let id = parse_id(id, "organisation")?;
    if state.identity.organisation_exists(id).await? {
        Ok(id)
    } else {
        Err(ApiError::NotFound("organisation not found".into()))
    }
}

/// The currencies dalp knows.
#[utoipa::path(get, path = "/api/v1/currencies", tag = "settings",
    responses((status = 200, description = "Currencies by code", body = Currencies)))]
#[tracing::instrument(skip_all)]
async fn currencies(
    State(state): State<AppState>,
    _auth: Auth,
) -> Result<Json<Currencies>, ApiError> {
    let currencies = state
        .assets
        .currencies()
        .await?
        .into_iter()
        .map(|(code, name, decimals)| Currency {
            code,
            name,
            decimals,
        })
        .collect();
    Ok(Json(Currencies { currencies }))
}

/// Record an FX rate (admin); the rate is exact decimal text.
#[utoipa::path(post, path = "/api/v1/fx-rates", tag = "settings",
    request_body = FxInput,
    responses(
        (status = 201, description = "Recorded", body = FxRateBody),
        (status = 409, description = "This provider already has a rate for the pair at that time", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn record_fx(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<FxInput>,
) -> Result<(StatusCode, Json<FxRateBody>), ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "assets.fx.record")
        .await?;
    let rate = state.assets.record_fx(&auth.ctx, body).await?;
    Ok((StatusCode::CREATED, Json(FxRateBody { fx_rate: rate })))
}

/// The newest rate of each currency pair.
#[utoipa::path(get, path = "/api/v1/fx-rates/latest", tag = "settings",
    params(("base" = Option<String>, Query, pattern = "^[A-Za-z]{3}$", description = "Only pairs with this base currency (ISO 4217)")),
    responses((status = 200, description = "Newest rate per pair", body = FxRates)))]
#[tracing::instrument(skip_all)]
async fn latest_fx(
    State(state): State<AppState>,
    _auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<FxRates>, ApiError> {
    super::known_params(&q, &["base"])?;
    let rates = state
        .assets
        .latest_fx(q.get("base").map(String::as_str))
        .await?;
    Ok(Json(FxRates { fx_rates: rates }))
}

/// Every version of an organisation's settings.
#[utoipa::path(get, path = "/api/v1/settings/{organisation_id}/history", tag = "settings",
    params(("organisation_id" = String, Path, description = "Organisation id (UUID)")),
    responses((status = 200, description = "Versions, oldest first", body = Versions)))]
#[tracing::instrument(skip_all)]
async fn history(
    State(state): State<AppState>,
    auth: Auth,
    Path(org): Path<String>,
) -> Result<Json<Versions>, ApiError> {
    auth.require_any_role(
        &state,
        &[PlatformRole::Admin, PlatformRole::Auditor],
        "assets.settings.history",
    )
    .await?;
    let v = state
        .assets
        .versions_of(
            dalp_assets::store::VersionedKind::Settings,
            organisation(&state, &org).await?,
        )
        .await?;
    Ok(Json(Versions::of(v)))
}
