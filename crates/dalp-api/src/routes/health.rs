//! `GET /healthz` (the process is up) and `GET /readyz` (the database answers and every
//! schema's migrations are current).

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use dalp_db::migrate::{self, SchemaStatus};
use dalp_db::Component;
use serde_json::{json, Value};

use crate::{ApiError, AppState};
use dalp_app::catalog::MIGRATIONS;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> axum::Json<Value> {
    axum::Json(json!({ "status": "ok" }))
}

#[tracing::instrument(skip_all)]
async fn readyz(State(state): State<AppState>) -> Result<axum::Json<Value>, ApiError> {
    // The reporting role can read the migration bookkeeping and nothing sensitive.
    let client = state
        .pools
        .get(Component::Readonly)
        .get()
        .await
        .map_err(|e| ApiError::NotReady(format!("database unreachable: {e}")))?;
    let schemas: Vec<SchemaStatus> = migrate::status(&client, &MIGRATIONS)
        .await
        .map_err(|e| ApiError::NotReady(format!("cannot read migration state: {e}")))?;
    let behind: Vec<String> = schemas
        .iter()
        .filter(|s| !s.is_current())
        .map(|s| {
            format!(
                "{} at {} of {}",
                s.schema, s.applied_version, s.latest_version
            )
        })
        .collect();
    if !behind.is_empty() {
        return Err(ApiError::NotReady(format!(
            "migrations pending: {} (run `dalp migrate`)",
            behind.join(", ")
        )));
    }
    Ok(axum::Json(json!({ "status": "ready", "schemas": schemas })))
}
