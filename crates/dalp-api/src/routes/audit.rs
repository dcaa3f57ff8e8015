//! Audit trail for auditors: `GET /api/v1/audit/events` (filtered, paged, always bounded in
//! time so only the partitions in range are scanned) and `GET /api/v1/audit/verify`.

use dalp_db::TypedClient;
use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Duration, Utc};
use dalp_db::Component;
use dalp_identity::types::PlatformRole;
use serde_json::{json, Value};

use super::{page_limit, time_param};
use crate::auth::Auth;
use crate::extract::Json;
use crate::{ApiError, AppState};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/audit/events", get(events))
        .route("/api/v1/audit/verify", get(verify))
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

#[tracing::instrument(skip_all)]
async fn events(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    auth.require_role(&state, PlatformRole::Auditor, "audit.events.read")
        .await?;
    const KNOWN: [&str; 9] = [
        "from",
        "to",
        "actor",
        "action",
        "resource_type",
        "resource_id",
        "outcome",
        "limit",
        "before_id",
    ];
    if let Some(k) = q.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::BadRequest(format!(
            "unknown parameter `{k}`; known: {}",
            KNOWN.join(", ")
        )));
    }
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
    let events: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, i64>(0), "occurred_at": r.get::<_, DateTime<Utc>>(1), "actor": r.get::<_, String>(2),
                "organisation_id": r.get::<_, Option<String>>(3), "action": r.get::<_, String>(4),
                "resource_type": r.get::<_, String>(5), "resource_id": r.get::<_, Option<String>>(6),
                "outcome": r.get::<_, String>(7), "request_id": r.get::<_, Option<String>>(8),
                "source_ip": r.get::<_, Option<String>>(9), "details": r.get::<_, Value>(10),
            })
        })
        .collect();
    let next = (events.len() as i64 == limit)
        .then(|| events.last().map(|e| e["id"].clone()))
        .flatten();
    Ok(Json(
        json!({ "events": events, "from": from, "to": to, "next_before_id": next }),
    ))
}

#[tracing::instrument(skip_all)]
async fn verify(State(state): State<AppState>, auth: Auth) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({
        "ok": report.ok(),
        "problem": report.problem.as_ref().map(|p| json!({ "detail": p, "message": p.to_string() })),
        "batches": report.batches, "events_checked": report.events_checked,
        "events_retained": report.events_retained, "last_seq": report.last_seq,
        "witnessed_heads_checked": report.heads_checked,
    })))
}
