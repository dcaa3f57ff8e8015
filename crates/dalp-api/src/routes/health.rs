//! `GET /healthz` (the process is up) and `GET /readyz` (the database answers and every
//! schema's migrations are current).

use axum::extract::State;
use dalp_db::migrate::{self, SchemaStatus};
use dalp_db::Component;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{ApiError, AppState};
use dalp_app::catalog::MIGRATIONS;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok`.
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
struct Ready {
    /// `ready`.
    status: &'static str,
    /// Each schema's applied and latest migration.
    #[schema(value_type = Vec<Object>)]
    schemas: Vec<SchemaStatus>,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, description = "Up", body = Health)))]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

/// The database answers and every schema's migrations are current.
#[utoipa::path(get, path = "/readyz", tag = "meta", security(()),
    responses((status = 200, description = "Ready", body = Ready)))]
#[tracing::instrument(skip_all)]
async fn readyz(State(state): State<AppState>) -> Result<axum::Json<Ready>, ApiError> {
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
    Ok(axum::Json(Ready {
        status: "ready",
        schemas,
    }))
}
