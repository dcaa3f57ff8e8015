//! One audit event per API request that touches data (`api.request`: method, route, status,
//! actor, request id, client address), committed before the response leaves, through the
//! group-commit writer (`dalp_audit::group`): concurrent requests share one commit. Domain writes
//! additionally record their own events inside their transactions.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use dalp_audit::{AuditEvent, Outcome};

use crate::AppState;

/// Filled by the authentication extractor with the caller's audit actor.
#[derive(Clone, Default)]
pub struct ActorSlot(pub Arc<Mutex<Option<String>>>);

impl ActorSlot {
    pub fn set(&self, actor: String) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(actor);
    }
}

fn touches_data(path: &str) -> bool {
    path.starts_with("/api/v1/") && path != "/api/v1/openapi.json"
}

pub async fn record(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if !touches_data(&path) {
        return next.run(req).await;
    }
    // One request id for the handler's records, this record and the response header.
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 100 && v.chars().all(|c| !c.is_control()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        req.headers_mut().insert("x-request-id", v);
    }
    let slot = ActorSlot::default();
    req.extensions_mut().insert(slot.clone());
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let started = std::time::Instant::now();
    let span =
        tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);
    let mut response = tracing::Instrument::instrument(next.run(req), span).await;
    let status = response.status();
    state
        .http_metrics
        .observe(&method, &route, status.as_u16(), started.elapsed());
    let outcome = match status.as_u16() {
        401 | 403 | 429 => Outcome::Denied,
        s if s >= 400 => Outcome::Error,
        _ => Outcome::Success,
    };
    let actor = slot
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| "anonymous".into());
    let mut event = AuditEvent::new(actor, "api.request", "http_request")
        .resource(format!("{method} {route}"))
        .outcome(outcome)
        .details(serde_json::json!({ "method": method, "path": path, "status": status.as_u16() }));
    event.request_id = Some(request_id.clone());
    event.source_ip = ip;
    // Group commit: this waits for the commit that holds the event (shared with the other
    // requests waiting at that moment), so the event is durable before the answer leaves.
    if let Err(e) = state.request_audit.record(event).await {
        // Refuse to answer a data request we could not record.
        tracing::error!(error = %e, "recording the request's audit event failed");
        return crate::ApiError::NotReady("the audit trail is unavailable".into())
            .into_response_with_id(&request_id);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}
