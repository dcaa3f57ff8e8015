//! Organisation settings (`admin` writes, `auditor` reads; ETag / If-Match as for assets,
//! `"0"` for the first save), currencies, and FX rates (`admin` records, anyone signed in
//! reads the latest).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use dalp_assets::settings::{FxInput, SettingsInput};
use dalp_identity::types::PlatformRole;
use serde_json::json;

use super::parse_id;
use super::versioning::{if_match, with_etag};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/settings/{organisation_id}", get(show).put(save))
        .route("/api/v1/settings/{organisation_id}/history", get(history))
        .route("/api/v1/currencies", get(currencies))
        .route("/api/v1/fx-rates", post(record_fx))
        .route("/api/v1/fx-rates/latest", get(latest_fx))
}

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
        .settings(parse_id(&org, "organisation")?)
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        s.version,
        json!({ "settings": s }),
    ))
}

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
    let org = parse_id(&org, "organisation")?;
    let expected = if_match(&headers)?;
    let s = state
        .assets
        .put_settings(&auth.ctx, org, expected, body)
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        s.version,
        json!({ "settings": s }),
    ))
}

#[tracing::instrument(skip_all)]
async fn currencies(
    State(state): State<AppState>,
    _auth: Auth,
) -> Result<Json<serde_json::Value>, ApiError> {
    let list: Vec<_> = state
        .assets
        .currencies()
        .await?
        .into_iter()
        .map(|(code, name, decimals)| json!({ "code": code, "name": name, "decimals": decimals }))
        .collect();
    Ok(Json(json!({ "currencies": list })))
}

#[tracing::instrument(skip_all)]
async fn record_fx(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<FxInput>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    auth.require_role(&state, PlatformRole::Admin, "assets.fx.record")
        .await?;
    let rate = state.assets.record_fx(&auth.ctx, body).await?;
    Ok((StatusCode::CREATED, Json(json!({ "fx_rate": rate }))))
}

#[tracing::instrument(skip_all)]
async fn latest_fx(
    State(state): State<AppState>,
    _auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rates = state
        .assets
        .latest_fx(q.get("base").map(String::as_str))
        .await?;
    Ok(Json(json!({ "fx_rates": rates })))
}

#[tracing::instrument(skip_all)]
async fn history(
    State(state): State<AppState>,
    auth: Auth,
    Path(org): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
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
            parse_id(&org, "organisation")?,
        )
        .await?;
    Ok(Json(json!({ "versions": v })))
}
