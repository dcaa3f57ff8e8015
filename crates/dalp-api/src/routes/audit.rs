//! Audit trail for auditors: `GET /api/v1/audit/events` (filtered, paged, always bounded in
//! time so only the partitions in range are scanned) and `GET /api/v1/audit/verify`.

use dalp_db::TypedClient;
use std::collections::HashMap;

use axum::extract::{Query, State};
use chrono::{DateTime, Duration, Utc};
use dalp_db::Component;
use dalp_identity::types::PlatformRole;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{page_limit, time_param};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(events))
        .routes(routes!(verify))
}

/// One audit record.
#[derive(Serialize, ToSchema)]
struct AuditEvent {
    id: i64,
    occurred_at: DateTime<Utc>,
    actor: String,
    organisation_id: Option<String>,
    action: String,
    resource_type: String,
    resource_id: Option<String>,
    /// `success`, `denied` or `error`.
    outcome: String,
    request_id: Option<String>,
    source_ip: Option<String>,
    details: Value,
}

#[derive(Serialize, ToSchema)]
struct AuditEvents {
    /// Newest first.
    events: Vec<AuditEvent>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// Pass as `before_id` for the next page; absent on the last page.
    next_before_id: Option<i64>,
}

#[derive(Serialize, ToSchema)]
struct ProblemReport {
    detail: dalp_audit::verify::Problem,
    message: String,
}

#[derive(Serialize, ToSchema)]
struct VerifyResult {
    /// True when nothing was found wrong.
    ok: bool,
    /// The first thing found wrong.
    problem: Option<ProblemReport>,
    batches: u64,
    events_checked: u64,
    events_retained: u64,
    last_seq: i64,
    witnessed_heads_checked: u64,
}

/// A pooled connection as the read-only auditor role.
async fn auditor_client(state: &AppState) -> Result<deadpool_postgres::Object, ApiError> {
    state
        .pools
        .get(Component::Auditor)
        .get()
        .await
        .map_err(|e| ApiError::NotReady(format!("database unreachable: {e}")))
}

fn text_param(q: &HashMap<String, String>, k: &str) -> Result<Option<String>, ApiError> {
    match q.get(k) {
        Some(v) if v.len() > 200 => Err(ApiError::BadRequest(format!("{k} is too long"))),
        v => Ok(v.cloned()),
    }
}

/// Audit events (auditor), newest first, always bounded in time (default: the last 30 days).
#[utoipa::path(get, path = "/api/v1/audit/events", tag = "audit",
    params(
        ("from" = Option<DateTime<Utc>>, Query, description = "RFC 3339; default `to` minus 30 days"),
        ("to" = Option<DateTime<Utc>>, Query, description = "RFC 3339, exclusive; default now"),
        ("actor" = Option<String>, Query, max_length = 200),
        ("action" = Option<String>, Query, max_length = 200),
        ("resource_type" = Option<String>, Query, max_length = 200),
        ("resource_id" = Option<String>, Query, max_length = 200),
        ("outcome" = Option<String>, Query, description = "success, denied or error"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000, description = "Page size (default 100)"),
        ("before_id" = Option<i64>, Query, description = "Only events older than this id (the previous page's next_before_id)"),
    ),
    responses((status = 200, description = "A page of events", body = AuditEvents)))]
#[tracing::instrument(skip_all)]
async fn events(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<AuditEvents>, ApiError> {
    auth.require_role(&state, PlatformRole::Auditor, "audit.events.read")
        .await?;
    super::known_params(
        &q,
        &[
            "from",
            "to",
            "actor",
            "action",
            "resource_type",
            "resource_id",
            "outcome",
            "limit",
            "before_id",
        ],
    )?;
    let now = Utc::now();
    let to = time_param(&q, "to")?.unwrap_or(now + Duration::minutes(1));
    let from = time_param(&q, "from")?.unwrap_or(to - Duration::days(30));
    if from >= to {
        return Err(ApiError::BadRequest("from must be before to".into()));
    }
    let limit = page_limit(&q)?;
    let before_id: i64 = match q.get("before_id") {
        None => i64::MAX,
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::BadRequest("before_id must be an event id".into()))?,
    };
    let outcome = text_param(&q, "outcome")?;
    if let Some(o) = &outcome {
        if !["success", "denied", "error"].contains(&o.as_str()) {
            return Err(ApiError::BadRequest(
                "outcome must be success, denied or error".into(),
            ));
        }
    }
    let client = auditor_client(&state).await?;
    let rows = client
        .typed_query(
            "SELECT id, occurred_at, actor, organisation_id::text, action, resource_type, resource_id, outcome,
                    request_id, host(source_ip), details
               FROM dalp_audit.events
              WHERE occurred_at >= $1 AND occurred_at < $2 AND id < $3
                AND ($4::text IS NULL OR actor = $4) AND ($5::text IS NULL OR action = $5)
                AND ($6::text IS NULL OR resource_type = $6) AND ($7::text IS NULL OR resource_id = $7)
                AND ($8::text IS NULL OR outcome = $8)
              ORDER BY id DESC LIMIT $9",
            &[
                &from,
                &to,
                &before_id,
                &text_param(&q, "actor")?,
                &text_param(&q, "action")?,
                &text_param(&q, "resource_type")?,
                &text_param(&q, "resource_id")?,
                &outcome,
                &limit,
            ],
        )
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let events: Vec<AuditEvent> = rows
        .iter()
        .map(|r| AuditEvent {
            id: r.get(0),
            occurred_at: r.get(1),
            actor: r.get(2),
            organisation_id: r.get(3),
            action: r.get(4),
            resource_type: r.get(5),
            resource_id: r.get(6),
            outcome: r.get(7),
            request_id: r.get(8),
            source_ip: r.get(9),
            details: r.get(10),
        })
        .collect();
    let next_before_id = (events.len() as i64 == limit)
        .then(|| events.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditEvents {
        events,
        from,
        to,
        next_before_id,
    }))
}

/// Recompute the audit hash chain and check its signatures and witnessed heads (auditor).
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    responses((status = 200, description = "The report; `ok` false names the first problem", body = VerifyResult)))]
#[tracing::instrument(skip_all)]
async fn verify(State(state): State<AppState>, auth: Auth) -> Result<Json<VerifyResult>, ApiError> {
    auth.require_role(&state, PlatformRole::Auditor, "audit.verify")
        .await?;
    let keys = state
        .audit_keys
        .as_ref()
        .ok_or_else(|| ApiError::NotReady("no audit signing key configured".into()))?;
    // Every head the sealer witnessed outside the database: truncation, wipes and re-signing
    // are caught without anyone exporting a checkpoint.
    let heads = match &state.audit_witness {
        Some(w) => w.heads().map_err(|e| ApiError::Internal(e.to_string()))?,
        None => Vec::new(),
    };
    let client = auditor_client(&state).await?;
    let report = dalp_audit::verify_with(
        &client,
        &dalp_audit::VerifyOptions {
            heads: &heads,
            ..dalp_audit::VerifyOptions::new(keys)
        },
    )
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(VerifyResult {
        ok: report.ok(),
        problem: report.problem.as_ref().map(|p| ProblemReport {
            detail: p.clone(),
            message: p.to_string(),
        }),
        batches: report.batches,
        events_checked: report.events_checked,
        events_retained: report.events_retained,
        last_seq: report.last_seq,
        witnessed_heads_checked: report.heads_checked,
    }))
}
