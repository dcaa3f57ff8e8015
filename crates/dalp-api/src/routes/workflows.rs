//! Workflow runs and transaction requests. Operators (`admin`, `systemManager`) start, signal,
//! retry and cancel runs and move transaction requests through their lifecycle; `auditor`
//! reads too; `tokenManager` may also create transaction requests. Every change is audited by
//! the store in its own transaction.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use dalp_identity::types::PlatformRole;
use dalp_workflows::{NewRun, NewTxRequest, TransitionInput, TxStatus};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{page_limit, parse_id};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

const OPERATORS: &[PlatformRole] = &[PlatformRole::Admin, PlatformRole::SystemManager];
const READERS: &[PlatformRole] = &[
    PlatformRole::Admin,
    PlatformRole::SystemManager,
    PlatformRole::Auditor,
];
const REQUESTERS: &[PlatformRole] = &[
    PlatformRole::Admin,
    PlatformRole::SystemManager,
    PlatformRole::TokenManager,
];

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/workflows/runs", get(list_runs).post(start_run))
        .route("/api/v1/workflows/runs/{id}", get(show_run))
        .route("/api/v1/workflows/runs/{id}/retry", post(retry_run))
        .route("/api/v1/workflows/runs/{id}/cancel", post(cancel_run))
        .route("/api/v1/workflows/runs/{id}/signal", post(signal_run))
        .route("/api/v1/workflows/stats", get(stats))
        .route(
            "/api/v1/workflows/tx-requests",
            get(list_tx).post(create_tx),
        )
        .route("/api/v1/workflows/tx-requests/{id}", get(show_tx))
        .route(
            "/api/v1/workflows/tx-requests/{id}/transition",
            post(transition_tx),
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    organisation_id: Uuid,
    kind: String,
    idempotency_key: String,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    priority: Option<i16>,
    #[serde(default)]
    max_attempts: Option<i32>,
    #[serde(default)]
    concurrency_key: Option<String>,
}

#[tracing::instrument(skip_all)]
async fn start_run(
    State(state): State<AppState>,
    auth: Auth,
    Json(b): Json<StartBody>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    auth.require_any_role(&state, OPERATORS, "workflows.run.start")
        .await?;
    let mut new = NewRun::new(
        b.organisation_id,
        &b.kind,
        &b.idempotency_key,
        b.input.unwrap_or_else(|| json!({})),
    );
    new.correlation_id = b.correlation_id;
    new.priority = b.priority.unwrap_or(0);
    new.max_attempts = b.max_attempts.unwrap_or(5);
    new.concurrency_key = b.concurrency_key;
    let (run, created) = state.workflows.start(&auth.ctx, &new).await?;
    Ok(created_or_existing(created, json!({ "run": run })))
}

/// 201 for something new, 200 for the one an idempotency key already named.
fn created_or_existing(created: bool, mut body: Value) -> (StatusCode, axum::Json<Value>) {
    body["created"] = json!(created);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, axum::Json(body))
}

#[tracing::instrument(skip_all)]
async fn list_runs(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, READERS, "workflows.run.list")
        .await?;
    let runs = state
        .workflows
        .list(q.get("status").map(String::as_str), page_limit(&q)?)
        .await?;
    Ok(axum::Json(json!({ "runs": runs })))
}

#[tracing::instrument(skip_all)]
async fn show_run(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, READERS, "workflows.run.read")
        .await?;
    let run = state.workflows.get(parse_id(&id, "run")?).await?;
    Ok(axum::Json(json!({ "run": run })))
}

#[tracing::instrument(skip_all)]
async fn retry_run(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, OPERATORS, "workflows.run.retry")
        .await?;
    let run = state
        .workflows
        .retry(&auth.ctx, parse_id(&id, "run")?)
        .await?;
    Ok(axum::Json(json!({ "run": run })))
}

#[tracing::instrument(skip_all)]
async fn cancel_run(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, OPERATORS, "workflows.run.cancel")
        .await?;
    let run = state
        .workflows
        .cancel(&auth.ctx, parse_id(&id, "run")?)
        .await?;
    Ok(axum::Json(json!({ "run": run })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    name: String,
    #[serde(default)]
    payload: Value,
}

#[tracing::instrument(skip_all)]
async fn signal_run(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(b): Json<SignalBody>,
) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, OPERATORS, "workflows.run.signal")
        .await?;
    let run = state
        .workflows
        .signal(&auth.ctx, parse_id(&id, "run")?, &b.name, b.payload)
        .await?;
    Ok(axum::Json(json!({ "run": run })))
}

#[tracing::instrument(skip_all)]
async fn stats(State(state): State<AppState>, auth: Auth) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, READERS, "workflows.stats.read")
        .await?;
    Ok(axum::Json(
        json!({ "stats": state.workflows.stats().await? }),
    ))
}

#[tracing::instrument(skip_all)]
async fn create_tx(
    State(state): State<AppState>,
    auth: Auth,
    Json(b): Json<NewTxRequest>,
) -> Result<(StatusCode, axum::Json<Value>), ApiError> {
    auth.require_any_role(&state, REQUESTERS, "workflows.tx_request.create")
        .await?;
    let (req, created) = state.workflows.create_tx_request(&auth.ctx, &b).await?;
    Ok(created_or_existing(created, json!({ "tx_request": req })))
}

#[tracing::instrument(skip_all)]
async fn show_tx(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, READERS, "workflows.tx_request.read")
        .await?;
    let id = parse_id(&id, "transaction request")?;
    let req = state.workflows.tx_request(id).await?;
    let transitions = state.workflows.tx_transitions(id).await?;
    Ok(axum::Json(
        json!({ "tx_request": req, "transitions": transitions }),
    ))
}

#[tracing::instrument(skip_all)]
async fn list_tx(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, READERS, "workflows.tx_request.list")
        .await?;
    let status = TxStatus::parse(q.get("status").map(String::as_str).unwrap_or("DEAD_LETTER"))
        .map_err(dalp_workflows::WorkflowError::from)?;
    let reqs = state.workflows.tx_requests(status, page_limit(&q)?).await?;
    Ok(axum::Json(json!({ "tx_requests": reqs })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransitionBody {
    to: String,
    #[serde(default)]
    gas_limit: Option<i64>,
    #[serde(default)]
    tx_hash: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[tracing::instrument(skip_all)]
async fn transition_tx(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(b): Json<TransitionBody>,
) -> Result<axum::Json<Value>, ApiError> {
    auth.require_any_role(&state, OPERATORS, "workflows.tx_request.transition")
        .await?;
    let to = TxStatus::parse(&b.to).map_err(dalp_workflows::WorkflowError::from)?;
    let req = state
        .workflows
        .transition(
            &auth.ctx,
            parse_id(&id, "transaction request")?,
            to,
            &TransitionInput {
                gas_limit: b.gas_limit,
                tx_hash: b.tx_hash,
                error: b.error,
            },
        )
        .await?;
    Ok(axum::Json(json!({ "tx_request": req })))
}
