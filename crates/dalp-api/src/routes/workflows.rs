//! Workflow runs and transaction requests. Operators (`admin`, `systemManager`) start, signal,
//! retry and cancel runs and move transaction requests through their lifecycle; `auditor`
//! reads too; `tokenManager` may also create transaction requests. Every change is audited by
//! the store in its own transaction.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use dalp_identity::types::PlatformRole;
use dalp_workflows::{
    engine::QueueStats, txreq::Transition, NewRun, NewTxRequest, Run, TransitionInput, TxRequest,
    TxStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{page_limit, parse_id, require_organisation};
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

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_runs, start_run))
        .routes(routes!(show_run))
        .routes(routes!(retry_run))
        .routes(routes!(cancel_run))
        .routes(routes!(signal_run))
        .routes(routes!(stats))
        .routes(routes!(list_tx, create_tx))
        .routes(routes!(show_tx))
        .routes(routes!(transition_tx))
}

#[derive(Serialize, ToSchema)]
struct RunBody {
    run: Run,
}

#[derive(Serialize, ToSchema)]
struct Started {
    run: Run,
    /// False when the idempotency key named a run started before (then 200, not 201).
    created: bool,
}

#[derive(Serialize, ToSchema)]
struct Runs {
    runs: Vec<Run>,
}

#[derive(Serialize, ToSchema)]
struct Stats {
    stats: QueueStats,
}

#[derive(Serialize, ToSchema)]
struct TxRequestBody {
    tx_request: TxRequest,
}

#[derive(Serialize, ToSchema)]
struct TxCreated {
    tx_request: TxRequest,
    /// False when (sender, chain, idempotency key) named a request made in the last 24 hours.
    created: bool,
}

#[derive(Serialize, ToSchema)]
struct TxRequestDetail {
    tx_request: TxRequest,
    transitions: Vec<Transition>,
}

#[derive(Serialize, ToSchema)]
struct TxRequests {
    tx_requests: Vec<TxRequest>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewRun)]
struct StartBody {
    organisation_id: Uuid,
    /// Lower-case letters, digits, `.`, `_` or `-`, starting with a letter.
    #[schema(pattern = "^[a-z][a-z0-9._-]{0,99}$")]
    kind: String,
    #[schema(min_length = 1, max_length = 200)]
    idempotency_key: String,
    /// Up to 256 KiB of JSON (default `{}`).
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200)]
    correlation_id: Option<String>,
    #[serde(default)]
    #[schema(minimum = -100, maximum = 100)]
    priority: Option<i16>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    max_attempts: Option<i32>,
    /// Runs with the same key never run at once.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200)]
    concurrency_key: Option<String>,
}

/// Start a run (admin, systemManager). The same idempotency key returns the first run (200).
#[utoipa::path(post, path = "/api/v1/workflows/runs", tag = "workflows",
    request_body = StartBody,
    responses(
        (status = 201, description = "Started", body = Started),
        (status = 200, description = "The run this idempotency key started before", body = Started),
    ))]
#[tracing::instrument(skip_all)]
async fn start_run(
    State(state): State<AppState>,
    auth: Auth,
    Json(b): Json<StartBody>,
) -> Result<(StatusCode, axum::Json<Started>), ApiError> {
    auth.require_any_role(&state, OPERATORS, "workflows.run.start")
        .await?;
    require_organisation(&state, b.organisation_id, "organisation_id").await?;
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
    Ok((
        created_or_existing(created),
        axum::Json(Started { run, created }),
    ))
}

/// 201 for something new, 200 for the one an idempotency key already named.
fn created_or_existing(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// Runs, newest change first (admin, systemManager, auditor).
#[utoipa::path(get, path = "/api/v1/workflows/runs", tag = "workflows",
    params(
        ("status" = Option<String>, Query, pattern = "^(pending|running|sleeping|waiting|completed|failed|cancelled|dead_letter|stalled)$"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "Page size (default 100)"),
    ),
    responses((status = 200, description = "Runs", body = Runs)))]
#[tracing::instrument(skip_all)]
async fn list_runs(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<Runs>, ApiError> {
    super::known_params(&q, &["status", "limit"])?;
    auth.require_any_role(&state, READERS, "workflows.run.list")
        .await?;
    let runs = state
        .workflows
        .list(q.get("status").map(String::as_str), page_limit(&q)?)
        .await?;
    Ok(axum::Json(Runs { runs }))
}

/// One run.
#[utoipa::path(get, path = "/api/v1/workflows/runs/{id}", tag = "workflows",
    params(("id" = String, Path, description = "Run id (UUID)")),
    responses((status = 200, description = "The run", body = RunBody)))]
#[tracing::instrument(skip_all)]
async fn show_run(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<RunBody>, ApiError> {
    auth.require_any_role(&state, READERS, "workflows.run.read")
        .await?;
    let run = state.workflows.get(parse_id(&id, "run")?).await?;
    Ok(axum::Json(RunBody { run }))
}

/// Make a dead-lettered or failed run ready again (admin, systemManager).
#[utoipa::path(post, path = "/api/v1/workflows/runs/{id}/retry", tag = "workflows",
    params(("id" = String, Path, description = "Run id (UUID)")),
    responses(
        (status = 200, description = "Ready again", body = RunBody),
        (status = 409, description = "The run is not dead-lettered or failed", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn retry_run(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<RunBody>, ApiError> {
    auth.require_any_role(&state, OPERATORS, "workflows.run.retry")
        .await?;
    let run = state
        .workflows
        .retry(&auth.ctx, parse_id(&id, "run")?)
        .await?;
    Ok(axum::Json(RunBody { run }))
}

/// Cancel a run that has not ended (admin, systemManager).
#[utoipa::path(post, path = "/api/v1/workflows/runs/{id}/cancel", tag = "workflows",
    params(("id" = String, Path, description = "Run id (UUID)")),
    responses(
        (status = 200, description = "Cancelled", body = RunBody),
        (status = 409, description = "The run has ended", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn cancel_run(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<RunBody>, ApiError> {
    auth.require_any_role(&state, OPERATORS, "workflows.run.cancel")
        .await?;
    let run = state
        .workflows
        .cancel(&auth.ctx, parse_id(&id, "run")?)
        .await?;
    Ok(axum::Json(RunBody { run }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Signal)]
struct SignalBody {
    #[schema(max_length = 200, extensions(("x-dalp-text" = json!(true))))]
    name: String,
    /// Any JSON; the run reads it when it resumes.
    #[serde(default)]
    payload: Value,
}

/// Deliver a signal to a run (admin, systemManager).
#[utoipa::path(post, path = "/api/v1/workflows/runs/{id}/signal", tag = "workflows",
    params(("id" = String, Path, description = "Run id (UUID)")),
    request_body = SignalBody,
    responses(
        (status = 200, description = "Delivered", body = RunBody),
        (status = 409, description = "The run has ended", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn signal_run(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(b): Json<SignalBody>,
) -> Result<axum::Json<RunBody>, ApiError> {
    auth.require_any_role(&state, OPERATORS, "workflows.run.signal")
        .await?;
    let run = state
        .workflows
        .signal(&auth.ctx, parse_id(&id, "run")?, &b.name, b.payload)
        .await?;
    Ok(axum::Json(RunBody { run }))
}

/// Queue depth, stalled runs and claim latency (admin, systemManager, auditor).
#[utoipa::path(get, path = "/api/v1/workflows/stats", tag = "workflows",
    responses((status = 200, description = "The queue", body = Stats)))]
#[tracing::instrument(skip_all)]
async fn stats(State(state): State<AppState>, auth: Auth) -> Result<axum::Json<Stats>, ApiError> {
    auth.require_any_role(&state, READERS, "workflows.stats.read")
        .await?;
    Ok(axum::Json(Stats {
        stats: state.workflows.stats().await?,
    }))
}

/// Create a transaction request (admin, systemManager, tokenManager); deduplicated by
/// (sender, chain, idempotency key) for 24 hours.
#[utoipa::path(post, path = "/api/v1/workflows/tx-requests", tag = "workflows",
    request_body = NewTxRequest,
    responses(
        (status = 201, description = "Created", body = TxCreated),
        (status = 200, description = "The request this key made before", body = TxCreated),
    ))]
#[tracing::instrument(skip_all)]
async fn create_tx(
    State(state): State<AppState>,
    auth: Auth,
    Json(b): Json<NewTxRequest>,
) -> Result<(StatusCode, axum::Json<TxCreated>), ApiError> {
    auth.require_any_role(&state, REQUESTERS, "workflows.tx_request.create")
        .await?;
    require_organisation(&state, b.organisation_id, "organisation_id").await?;
    let (req, created) = state.workflows.create_tx_request(&auth.ctx, &b).await?;
    Ok((
        created_or_existing(created),
        axum::Json(TxCreated {
            tx_request: req,
            created,
        }),
    ))
}

/// A transaction request and its transitions.
#[utoipa::path(get, path = "/api/v1/workflows/tx-requests/{id}", tag = "workflows",
    params(("id" = String, Path, description = "Transaction request id (UUID)")),
    responses((status = 200, description = "The request", body = TxRequestDetail)))]
#[tracing::instrument(skip_all)]
async fn show_tx(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<axum::Json<TxRequestDetail>, ApiError> {
    auth.require_any_role(&state, READERS, "workflows.tx_request.read")
        .await?;
    let id = parse_id(&id, "transaction request")?;
    let req = state.workflows.tx_request(id).await?;
    let transitions = state.workflows.tx_transitions(id).await?;
    Ok(axum::Json(TxRequestDetail {
        tx_request: req,
        transitions,
    }))
}

/// Transaction requests in one status (default DEAD_LETTER).
#[utoipa::path(get, path = "/api/v1/workflows/tx-requests", tag = "workflows",
    params(("status" = Option<TxStatus>, Query, description = "Default DEAD_LETTER"), ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "Page size (default 100)")),
    responses((status = 200, description = "Requests", body = TxRequests)))]
#[tracing::instrument(skip_all)]
async fn list_tx(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<TxRequests>, ApiError> {
    super::known_params(&q, &["status", "limit"])?;
    auth.require_any_role(&state, READERS, "workflows.tx_request.list")
        .await?;
    let status = TxStatus::parse(q.get("status").map(String::as_str).unwrap_or("DEAD_LETTER"))
        .map_err(dalp_workflows::WorkflowError::from)?;
    let reqs = state.workflows.tx_requests(status, page_limit(&q)?).await?;
    Ok(axum::Json(TxRequests { tx_requests: reqs }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = TxTransition)]
struct TransitionBody {
    #[schema(value_type = TxStatus)]
    to: String,
    #[serde(default)]
    gas_limit: Option<i64>,
    #[serde(default)]
    tx_hash: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// Move a request to `to` if that is a legal step (admin, systemManager); entering
/// PREPARING allocates the nonce.
#[utoipa::path(post, path = "/api/v1/workflows/tx-requests/{id}/transition", tag = "workflows",
    params(("id" = String, Path, description = "Transaction request id (UUID)")),
    request_body = TransitionBody,
    responses(
        (status = 200, description = "Moved", body = TxRequestBody),
        (status = 409, description = "Not a legal step from the current status", body = crate::error::Body),
    ))]
#[tracing::instrument(skip_all)]
async fn transition_tx(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(b): Json<TransitionBody>,
) -> Result<axum::Json<TxRequestBody>, ApiError> {
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
    Ok(axum::Json(TxRequestBody { tx_request: req }))
}
