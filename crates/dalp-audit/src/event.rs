//! Writing audit records. Every store calls [`record`] with its own open transaction, so the
//! state change and the record describing it commit (or roll back) together.

use dalp_db::TypedClient;
use std::net::IpAddr;

use serde_json::Value;
use uuid::Uuid;

/// How the audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Denied,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// One audit record. `details` must already be free of secrets and PII: callers put
/// identifiers and field names there, never values such as passwords, tokens or KYC data.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// `user:<uuid>`, `api_key:<uuid>`, `service:<role>` or `anonymous`.
    pub actor: String,
    pub organisation_id: Option<Uuid>,
    /// Dotted verb, e.g. `identity.user.create`.
    pub action: &'static str,
    pub resource_type: &'static str,
    pub resource_id: Option<String>,
    pub outcome: Outcome,
    pub request_id: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub details: Value,
}

impl AuditEvent {
    pub fn new(
        actor: impl Into<String>,
        action: &'static str,
        resource_type: &'static str,
    ) -> Self {
        AuditEvent {
            actor: actor.into(),
            organisation_id: None,
            action,
            resource_type,
            resource_id: None,
            outcome: Outcome::Success,
            request_id: None,
            source_ip: None,
            details: Value::Object(Default::default()),
        }
    }

    pub fn resource(mut self, id: impl ToString) -> Self {
        self.resource_id = Some(id.to_string());
        self
    }

    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// Who is acting and from where: every store takes one and stamps its audit records with it.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// `user:<uuid>`, `api_key:<uuid>`, `service:<name>` or `anonymous`.
    pub actor: String,
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
}

impl RequestContext {
    /// A service acting on its own behalf (CLI, background job).
    pub fn service(name: &str) -> RequestContext {
        RequestContext {
            actor: format!("service:{name}"),
            ..Default::default()
        }
    }

    /// An event by this actor, carrying the request id and client address.
    pub fn event(&self, action: &'static str, resource_type: &'static str) -> AuditEvent {
        let mut e = AuditEvent::new(self.actor.clone(), action, resource_type);
        e.source_ip = self.ip;
        e.request_id = self.request_id.clone();
        e
    }
}

/// Inserts `events` in one statement (one commit when `client` is not in a transaction).
#[tracing::instrument(target = "dalp_store", name = "audit.record_many", skip_all)]
pub async fn record_many<C: TypedClient>(
    client: &C,
    events: &[AuditEvent],
) -> Result<(), tokio_postgres::Error> {
    // One array per column, borrowing from the events.
    let actors: Vec<&str> = events.iter().map(|e| e.actor.as_str()).collect();
    let orgs: Vec<Option<uuid::Uuid>> = events.iter().map(|e| e.organisation_id).collect();
    let actions: Vec<&str> = events.iter().map(|e| e.action).collect();
    let types: Vec<&str> = events.iter().map(|e| e.resource_type).collect();
    let resources: Vec<Option<&str>> = events.iter().map(|e| e.resource_id.as_deref()).collect();
    let outcomes: Vec<&str> = events.iter().map(|e| e.outcome.as_str()).collect();
    let request_ids: Vec<Option<&str>> = events.iter().map(|e| e.request_id.as_deref()).collect();
    let ips: Vec<Option<IpAddr>> = events.iter().map(|e| e.source_ip).collect();
    let details: Vec<&Value> = events.iter().map(|e| &e.details).collect();
    client
        .typed_execute(
            "INSERT INTO dalp_audit.events
                 (actor, organisation_id, action, resource_type, resource_id, outcome, request_id, source_ip, details)
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                                  $7::text[], $8::inet[], $9::jsonb[])",
            &[
                &actors,
                &orgs,
                &actions,
                &types,
                &resources,
                &outcomes,
                &request_ids,
                &ips,
                &details,
            ],
        )
        .await?;
    Ok(())
}

/// Inserts `event` through `client` — pass the caller's transaction.
#[tracing::instrument(target = "dalp_store", name = "audit.record", skip_all)]
pub async fn record<C: TypedClient>(
    client: &C,
    event: &AuditEvent,
) -> Result<(), tokio_postgres::Error> {
    client
        .typed_execute(
            "INSERT INTO dalp_audit.events
                 (actor, organisation_id, action, resource_type, resource_id, outcome, request_id, source_ip, details)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &event.actor,
                &event.organisation_id,
                &event.action,
                &event.resource_type,
                &event.resource_id,
                &event.outcome.as_str(),
                &event.request_id,
                &event.source_ip,
                &event.details,
            ],
        )
        .await?;
    Ok(())
}

/// A change's audit record, inserted by `dalp_db::write::Write::record` in the change's
/// transaction.
impl dalp_db::Record for AuditEvent {
    async fn insert(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        record(tx, self).await
    }
}
