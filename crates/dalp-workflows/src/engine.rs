//! [`WorkflowStore`]: durable runs that are also the work queue. Starting a run is idempotent
//! per (organisation, kind, key); workers claim ready runs in batches with `FOR UPDATE SKIP
//! LOCKED`, hold a lease they renew by heartbeat, and end each attempt by completing,
//! sleeping, waiting for a signal or failing (retried with exponential backoff and jitter up
//! to `max_attempts`, then `dead_letter`). A run whose lease expires (its worker died) is
//! claimable again. Runs with a concurrency key run one at a time per key.

use dalp_db::{TypedClient, WriteError, Writer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dalp_audit::RequestContext;
use dalp_types::Invalid;
use deadpool_postgres::Pool;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::types::Type;
use tokio_postgres::Row;
use uuid::Uuid;

/// NOTIFY channel hinting that work is ready (payload: the kind). Only a hint: workers poll.
pub const READY_CHANNEL: &str = "dalp_workflows_ready";

#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("lease on run {0} is no longer held by this worker (it expired and the run was claimed again)")]
    LeaseLost(Uuid),
    #[error("illegal transition of transaction request {id}: {from} -> {to}; nothing was changed")]
    IllegalTransition { id: Uuid, from: String, to: String },
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Write(WriteError),
}

impl From<WriteError> for WorkflowError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Db(e) => WorkflowError::Db(e),
            e => WorkflowError::Write(e),
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub organisation_id: Uuid,
    pub kind: String,
    pub idempotency_key: String,
    pub input: Value,
    pub correlation_id: Option<String>,
    pub priority: i16,
    pub max_attempts: i32,
    pub concurrency_key: Option<String>,
    /// Not before this time (a timer from the start).
    pub run_at: Option<DateTime<Utc>>,
}

impl NewRun {
    pub fn new(organisation_id: Uuid, kind: &str, idempotency_key: &str, input: Value) -> NewRun {
        NewRun {
            organisation_id,
            kind: kind.to_string(),
            idempotency_key: idempotency_key.to_string(),
            input,
            correlation_id: None,
            priority: 0,
            max_attempts: 5,
            concurrency_key: None,
            run_at: None,
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        let k = &self.kind;
        let ok = !k.is_empty()
            && k.len() <= 100
            && k.starts_with(|c: char| c.is_ascii_lowercase())
            && k.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')
            });
        if !ok {
            return Err(Invalid::new(
                "kind",
                "must be lower-case letters, digits, '.', '_' or '-', starting with a letter (at most 100)",
            ));
        }
        if self.idempotency_key.is_empty() || self.idempotency_key.len() > 200 {
            return Err(Invalid::new(
                "idempotency_key",
                "must be 1 to 200 characters",
            ));
        }
        if !(-100..=100).contains(&self.priority) {
            return Err(Invalid::new("priority", "must be between -100 and 100"));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(Invalid::new("max_attempts", "must be between 1 and 100"));
        }
        for (field, v) in [
            ("correlation_id", &self.correlation_id),
            ("concurrency_key", &self.concurrency_key),
        ] {
            if v.as_ref().is_some_and(|s| s.is_empty() || s.len() > 200) {
                return Err(Invalid::new(field, "must be 1 to 200 characters"));
            }
        }
        if self.input.to_string().len() > 256 * 1024 {
            return Err(Invalid::new("input", "is larger than 256 KiB"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Run {
    pub id: Uuid,
    pub organisation_id: Uuid,
    pub kind: String,
    pub idempotency_key: String,
    pub correlation_id: Option<String>,
    pub status: String,
    pub priority: i16,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub concurrency_key: Option<String>,
    pub waiting_for: Option<String>,
    pub signal: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const RUN_COLUMNS: &str = "id, organisation_id, kind, idempotency_key, correlation_id, status, priority, input, output, error, attempts, max_attempts, run_at, lease_owner, lease_expires_at, concurrency_key, waiting_for, signal, created_at, updated_at, started_at, finished_at";

fn run_row(r: &Row) -> Run {
    Run {
        id: r.get(0),
        organisation_id: r.get(1),
        kind: r.get(2),
        idempotency_key: r.get(3),
        correlation_id: r.get(4),
        status: r.get(5),
        priority: r.get(6),
        input: r.get(7),
        output: r.get(8),
        error: r.get(9),
        attempts: r.get(10),
        max_attempts: r.get(11),
        run_at: r.get(12),
        lease_owner: r.get(13),
        lease_expires_at: r.get(14),
        concurrency_key: r.get(15),
        waiting_for: r.get(16),
        signal: r.get(17),
        created_at: r.get(18),
        updated_at: r.get(19),
        started_at: r.get(20),
        finished_at: r.get(21),
    }
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed(Value),
    /// Resume at this time (a durable timer).
    Sleep(DateTime<Utc>),
    /// Resume when signal `name` arrives (its payload is in the run's `signal`).
    Wait(String),
    /// Retry later (backoff) unless attempts are used up: then `dead_letter`.
    Retry(String),
    /// Give up now: `failed`.
    Fail(String),
}

/// Queue state for metrics and `dalp workflows status`.
#[derive(Debug, Clone, Serialize, Default, utoipa::ToSchema)]
pub struct QueueStats {
    pub ready: i64,
    pub running: i64,
    pub sleeping: i64,
    pub waiting: i64,
    pub dead_letter: i64,
    pub failed: i64,
    /// Running runs whose lease has expired (their worker stopped).
    pub stalled: i64,
    /// Seconds the oldest ready run has waited.
    pub oldest_ready_seconds: f64,
    /// Enqueue-to-start latency of runs started in the last 5 minutes.
    pub claim_latency_p50_seconds: f64,
    pub claim_latency_p99_seconds: f64,
}

#[derive(Clone)]
pub struct WorkflowStore {
    pool: Pool,
    writer: Writer,
    /// When this process last sent a wake-up NOTIFY, and last freed expired leases
    /// (milliseconds since the store was made).
    hints: Arc<Hints>,
}

struct Hints {
    epoch: std::time::Instant,
    /// Milliseconds since `epoch` plus one; 0 means never.
    last_notify_ms: AtomicU64,
    last_reclaim_ms: AtomicU64,
}

impl Hints {
    fn new() -> Hints {
        Hints {
            epoch: std::time::Instant::now(),
            last_notify_ms: AtomicU64::new(0),
            last_reclaim_ms: AtomicU64::new(0),
        }
    }

    /// True at most once per `every_ms` across this process (first call: true).
    fn due(&self, slot: &AtomicU64, every_ms: u64) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = slot.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= every_ms)
            && slot
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Wake-up NOTIFYs are coalesced to one per this many milliseconds per process: NOTIFY
/// serialises commits, and busy workers poll anyway.
const NOTIFY_EVERY_MS: u64 = 20;
/// Expired leases are looked for at most this often per process.
const RECLAIM_EVERY_MS: u64 = 250;

impl WorkflowStore {
    pub fn new(pool: Pool) -> WorkflowStore {
        WorkflowStore {
            writer: Writer::new(pool.clone(), "workflows"),
            pool,
            hints: Arc::new(Hints::new()),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(crate) fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Starts a run, or returns the run already started under the same (organisation, kind,
    /// idempotency key) with `false`.
    #[tracing::instrument(target = "dalp_store", name = "workflows.start", skip_all)]
    pub async fn start(
        &self,
        ctx: &RequestContext,
        new: &NewRun,
    ) -> Result<(Run, bool), WorkflowError> {
        new.validate()?;
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("workflows.start").await?;
        let row = tx
            .typed_query_opt(
                &format!(
                    "INSERT INTO dalp_workflows.runs (organisation_id, kind, idempotency_key, input, correlation_id,
                         priority, max_attempts, concurrency_key, run_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, coalesce($9, now()))
                     ON CONFLICT (organisation_id, kind, idempotency_key) DO NOTHING
                     RETURNING {RUN_COLUMNS}"
                ),
                &[
                    &new.organisation_id,
                    &new.kind,
                    &new.idempotency_key,
                    &new.input,
                    &new.correlation_id,
                    &new.priority,
                    &new.max_attempts,
                    &new.concurrency_key,
                    &new.run_at,
                ],
            )
            .await?;
        let Some(row) = row else {
            let existing = tx
                .typed_query_one(
                    &format!(
                        "SELECT {RUN_COLUMNS} FROM dalp_workflows.runs
                          WHERE organisation_id = $1 AND kind = $2 AND idempotency_key = $3"
                    ),
                    &[&new.organisation_id, &new.kind, &new.idempotency_key],
                )
                .await?;
            return Ok((run_row(&existing), false));
        };
        let run = run_row(&row);
        let mut event = ctx
            .event("workflows.run.start", "run")
            .resource(run.id)
            .details(json!({ "kind": run.kind, "idempotency_key": run.idempotency_key }));
        event.organisation_id = Some(run.organisation_id);
        tx.record(&event).await?;
        if self.hints.due(&self.hints.last_notify_ms, NOTIFY_EVERY_MS) {
            tx.typed_execute("SELECT pg_notify($1, $2)", &[&READY_CHANNEL, &run.kind])
                .await?;
        }
        tx.commit().await?;
        Ok((run, true))
    }

    #[tracing::instrument(target = "dalp_store", name = "workflows.get", skip_all)]
    pub async fn get(&self, id: Uuid) -> Result<Run, WorkflowError> {
        let client = dalp_db::pool::checkout(&self.pool, "workflows").await?;
        let row = client
            .query_typed(
                &format!("SELECT {RUN_COLUMNS} FROM dalp_workflows.runs WHERE id = $1"),
                &[(&id, Type::UUID)],
            )
            .await?;
        row.first()
            .map(run_row)
            .ok_or_else(|| WorkflowError::NotFound(format!("run {id}")))
    }

    /// Runs by status (newest first), e.g. `dead_letter` or `failed`; `stalled` lists running
    /// runs whose lease expired.
    #[tracing::instrument(target = "dalp_store", name = "workflows.list", skip_all)]
    pub async fn list(&self, status: Option<&str>, limit: i64) -> Result<Vec<Run>, WorkflowError> {
        const STATUSES: [&str; 9] = [
            "pending",
            "running",
            "sleeping",
            "waiting",
            "completed",
            "failed",
            "cancelled",
            "dead_letter",
            "stalled",
        ];
        if let Some(s) = status {
            if !STATUSES.contains(&s) {
                return Err(Invalid::new(
                    "status",
                    format!("must be one of {}", STATUSES.join(", ")),
                )
                .into());
            }
        }
        let client = dalp_db::pool::checkout(&self.pool, "workflows").await?;
        let cond = match status {
            None => "true",
            Some("stalled") => "status = 'running' AND lease_expires_at < now()",
            Some(_) => "status = $1",
        };
        let status_param = status.unwrap_or("");
        let rows = client
            .query_typed(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM dalp_workflows.runs
                      WHERE {cond} ORDER BY updated_at DESC LIMIT $2"
                ),
                &[(&status_param, Type::TEXT), (&limit, Type::INT8)],
            )
            .await?;
        Ok(rows.iter().map(run_row).collect())
    }

    /// Claims up to `batch` ready runs of `kinds` for `worker`, leased for `lease`. First
    /// frees runs whose lease expired.
    #[tracing::instrument(target = "dalp_store", name = "workflows.claim", skip_all)]
    pub async fn claim(
        &self,
        worker: &str,
        kinds: &[String],
        batch: i64,
        lease: Duration,
    ) -> Result<Vec<Run>, WorkflowError> {
        self.writer
            .autocommit(
                "workflows.claim",
                "a worker's claim of ready runs (and freeing expired leases): the queue's own bookkeeping; a run's start, signals and end are audited",
                async |client: &deadpool_postgres::Object| -> Result<Vec<Run>, WorkflowError> {
                    // Expired leases: the worker is gone; the run is pending again (its attempt counted).
                    if self
                        .hints
                        .due(&self.hints.last_reclaim_ms, RECLAIM_EVERY_MS)
                    {
                        client.typed_execute(
                        "WITH expired AS (
                             SELECT id FROM dalp_workflows.runs
                              WHERE status = 'running' AND lease_expires_at < now()
                              FOR UPDATE SKIP LOCKED LIMIT 100),
                         freed AS (
                             DELETE FROM dalp_workflows.concurrency_slots s USING expired e WHERE s.run_id = e.id)
                         UPDATE dalp_workflows.runs r
                            SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
                                error = 'lease expired (worker ' || r.lease_owner || ' stopped)'
                           FROM expired e WHERE r.id = e.id",
                            &[],
                        )
                        .await?;
                    }
                    // One statement: pick ready runs, take a concurrency slot for keyed ones (a run
                    // whose key is taken stays queued), lease what was granted.
                    let lease_ms = lease.as_millis() as f64;
                    let rows = client
                        .typed_query(
                            &format!(
                                "WITH c AS (
                                     SELECT id, concurrency_key FROM dalp_workflows.runs
                                      WHERE status IN ('pending', 'sleeping') AND run_at <= now() AND kind = ANY($1)
                                      ORDER BY priority DESC, run_at, id
                                      LIMIT $2 FOR UPDATE SKIP LOCKED),
                                 slots AS (
                                     INSERT INTO dalp_workflows.concurrency_slots (concurrency_key, run_id)
                                     SELECT concurrency_key, id FROM c WHERE concurrency_key IS NOT NULL
                                     ON CONFLICT (concurrency_key) DO NOTHING RETURNING run_id),
                                 granted AS (
                                     SELECT id FROM c WHERE concurrency_key IS NULL
                                     UNION ALL SELECT run_id FROM slots)
                                 UPDATE dalp_workflows.runs r
                                    SET status = 'running', lease_owner = $3,
                                        lease_expires_at = now() + $4 * interval '1 millisecond',
                                        attempts = attempts + 1, started_at = coalesce(started_at, now()),
                                        updated_at = now()
                                   FROM granted g WHERE r.id = g.id
                              RETURNING {}",
                                RUN_COLUMNS
                                    .split(", ")
                                    .map(|c| format!("r.{c}"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                            &[&kinds, &batch, &worker, &lease_ms],
                        )
                        .await?;
                    Ok(rows.iter().map(run_row).collect())
                },
            )
            .await
    }

    /// Renews the leases `worker` holds on `ids`; returns the ids it no longer holds.
    #[tracing::instrument(target = "dalp_store", name = "workflows.heartbeat", skip_all)]
    pub async fn heartbeat(
        &self,
        worker: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<Vec<Uuid>, WorkflowError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.writer
            .autocommit(
                "workflows.heartbeat",
                "renewing a worker's leases: the queue's own bookkeeping",
                async |client: &deadpool_postgres::Object| -> Result<Vec<Uuid>, WorkflowError> {
                    let lease_ms = lease.as_millis() as f64;
                    // Only lease_expires_at changes, and no index covers it: a HOT update.
                    let held: Vec<Uuid> = client
                        .query_typed(
                            "UPDATE dalp_workflows.runs SET lease_expires_at = now() + $3 * interval '1 millisecond'
                              WHERE id = ANY($1) AND status = 'running' AND lease_owner = $2 RETURNING id",
                            &[
                                (&ids, Type::UUID_ARRAY),
                                (&worker, Type::TEXT),
                                (&lease_ms, Type::FLOAT8),
                            ],
                        )
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    Ok(ids.iter().filter(|i| !held.contains(i)).copied().collect())
                },
            )
            .await
    }

    /// Hands back runs `worker` claimed but never started (a stopping worker's local queue):
    /// pending again at once, the attempt not counted, their concurrency slots freed.
    #[tracing::instrument(target = "dalp_store", name = "workflows.release", skip_all)]
    pub async fn release(&self, worker: &str, ids: &[Uuid]) -> Result<u64, WorkflowError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.writer
            .autocommit(
                "workflows.release",
                "a stopping worker hands its unstarted runs back: the queue's own bookkeeping",
                async |client: &deadpool_postgres::Object| -> Result<u64, WorkflowError> {
                    let n: i64 = client
                        .typed_query_one(
                            "WITH upd AS (
                                 UPDATE dalp_workflows.runs
                                    SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL,
                                        attempts = attempts - 1,
                                        started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END,
                                        updated_at = now()
                                  WHERE id = ANY($1) AND status = 'running' AND lease_owner = $2
                              RETURNING id),
                             freed AS (
                                 DELETE FROM dalp_workflows.concurrency_slots s USING upd WHERE s.run_id = upd.id)
                             SELECT count(*) FROM upd",
                            &[&ids, &worker],
                        )
                        .await?
                        .get(0);
                    Ok(n as u64)
                },
            )
            .await
    }

    /// Ends attempts of runs `worker` holds, in one transaction. Runs whose lease was lost
    /// are left alone and returned.
    #[tracing::instrument(target = "dalp_store", name = "workflows.finish", skip_all)]
    pub async fn finish(
        &self,
        worker: &str,
        outcomes: &[(Uuid, Outcome)],
        retry_base: Duration,
        retry_max: Duration,
    ) -> Result<Vec<Uuid>, WorkflowError> {
        if outcomes.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::new();
        let mut statuses = Vec::new();
        let mut outputs: Vec<Option<Value>> = Vec::new();
        let mut errors: Vec<Option<String>> = Vec::new();
        let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::new();
        let mut waits: Vec<Option<String>> = Vec::new();
        for (id, o) in outcomes {
            ids.push(*id);
            let (status, output, error, run_at, wait) = match o {
                Outcome::Completed(v) => ("completed", Some(v.clone()), None, None, None),
                Outcome::Sleep(t) => ("sleeping", None, None, Some(*t), None),
                Outcome::Wait(n) => ("waiting", None, None, None, Some(n.clone())),
                Outcome::Retry(e) => ("retry", None, Some(truncate(e)), None, None),
                Outcome::Fail(e) => ("failed", None, Some(truncate(e)), None, None),
            };
            statuses.push(status.to_string());
            outputs.push(output);
            errors.push(error);
            run_ats.push(run_at);
            waits.push(wait);
        }
        self.writer
            .autocommit(
                "workflows.finish",
                "a run's end as its worker reports it: the queue's own bookkeeping",
                async |client: &deadpool_postgres::Object| -> Result<Vec<Uuid>, WorkflowError> {
                    let base_ms = retry_base.as_millis() as f64;
                    let max_ms = retry_max.as_millis() as f64;
                    // One statement: retries become pending after an exponential backoff with jitter,
                    // or dead_letter once attempts are used up; slots are released.
                    let held: Vec<Uuid> = client
                        .typed_query(
                            "WITH o AS (
                                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::timestamptz[], $6::text[])
                                     AS o(id, status, output, error, run_at, waiting_for)),
                             upd AS (
                                 UPDATE dalp_workflows.runs r
                                    SET status = CASE
                                            WHEN o.status = 'retry' AND r.attempts >= r.max_attempts THEN 'dead_letter'
                                            WHEN o.status = 'retry' THEN 'pending'
                                            WHEN o.status = 'waiting' AND r.signal ? o.waiting_for THEN 'pending'
                                            ELSE o.status END,
                                        output = coalesce(o.output, r.output),
                                        error = o.error,
                                        run_at = CASE
                                            WHEN o.status = 'retry' THEN now() + least($8 * 2 ^ (r.attempts - 1), $9)
                                                                         * (0.5 + random() / 2) * interval '1 millisecond'
                                            ELSE coalesce(o.run_at, r.run_at) END,
                                        waiting_for = o.waiting_for,
                                        lease_owner = NULL, lease_expires_at = NULL,
                                        finished_at = CASE WHEN o.status IN ('completed', 'failed')
                                                             OR (o.status = 'retry' AND r.attempts >= r.max_attempts)
                                                           THEN now() END,
                                        updated_at = now()
                                   FROM o
                                  WHERE r.id = o.id AND r.status = 'running' AND r.lease_owner = $7
                              RETURNING r.id),
                             freed AS (
                                 DELETE FROM dalp_workflows.concurrency_slots s USING upd WHERE s.run_id = upd.id)
                             SELECT id FROM upd",
                            &[&ids, &statuses, &outputs, &errors, &run_ats, &waits, &worker, &base_ms, &max_ms],
                        )
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    Ok(ids.into_iter().filter(|i| !held.contains(i)).collect())
                },
            )
            .await
    }

    /// Delivers signal `name` with `payload` to run `id`: a run waiting for it becomes ready;
    /// a run not waiting yet keeps it and will not wait.
    #[tracing::instrument(target = "dalp_store", name = "workflows.signal", skip_all)]
    pub async fn signal(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        name: &str,
        payload: Value,
    ) -> Result<Run, WorkflowError> {
        let name = dalp_types::parse_text("name", name, 200)?;
        let name = name.as_str();
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("workflows.signal").await?;
        let row = tx
            .typed_query_opt(
                &format!(
                    "UPDATE dalp_workflows.runs
                        SET signal = coalesce(signal, '{{}}'::jsonb) || jsonb_build_object($2::text, $3::jsonb),
                            status = CASE WHEN status = 'waiting' AND waiting_for = $2 THEN 'pending' ELSE status END,
                            run_at = CASE WHEN status = 'waiting' AND waiting_for = $2 THEN now() ELSE run_at END,
                            waiting_for = CASE WHEN status = 'waiting' AND waiting_for = $2 THEN NULL ELSE waiting_for END,
                            updated_at = now()
                      WHERE id = $1 AND status NOT IN ('completed', 'failed', 'cancelled', 'dead_letter')
                  RETURNING {RUN_COLUMNS}"
                ),
                &[&id, &name, &payload],
            )
            .await?;
        let Some(row) = row else {
            self.exists_in(&tx, id).await?;
            return Err(WorkflowError::Conflict(format!(
                "run {id} has ended; it takes no signals"
            )));
        };
        let run = run_row(&row);
        tx.record(
            &ctx.event("workflows.run.signal", "run")
                .resource(id)
                .details(json!({ "signal": name })),
        )
        .await?;
        tx.typed_execute("SELECT pg_notify($1, $2)", &[&READY_CHANNEL, &run.kind])
            .await?;
        tx.commit().await?;
        Ok(run)
    }

    async fn exists_in(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        id: Uuid,
    ) -> Result<(), WorkflowError> {
        if tx
            .typed_query_opt("SELECT 1 FROM dalp_workflows.runs WHERE id = $1", &[&id])
            .await?
            .is_none()
        {
            return Err(WorkflowError::NotFound(format!("run {id}")));
        }
        Ok(())
    }

    /// Operator action: a `dead_letter` or `failed` run becomes ready again with fresh attempts.
    #[tracing::instrument(target = "dalp_store", name = "workflows.retry", skip_all)]
    pub async fn retry(&self, ctx: &RequestContext, id: Uuid) -> Result<Run, WorkflowError> {
        self.operator_change(
            ctx,
            id,
            "workflows.run.retry",
            "status IN ('dead_letter', 'failed')",
            "status = 'pending', attempts = 0, run_at = now(), error = NULL, finished_at = NULL",
            "only dead-lettered or failed runs can be retried",
        )
        .await
    }

    /// Operator action: a run that has not ended is cancelled (a running attempt's lease is
    /// revoked; its worker's next step or finish is refused).
    #[tracing::instrument(target = "dalp_store", name = "workflows.cancel", skip_all)]
    pub async fn cancel(&self, ctx: &RequestContext, id: Uuid) -> Result<Run, WorkflowError> {
        self.operator_change(
            ctx,
            id,
            "workflows.run.cancel",
            "status NOT IN ('completed', 'failed', 'cancelled')",
            "status = 'cancelled', lease_owner = NULL, lease_expires_at = NULL, finished_at = now()",
            "the run has already ended",
        )
        .await
    }

    async fn operator_change(
        &self,
        ctx: &RequestContext,
        id: Uuid,
        action: &'static str,
        allowed: &str,
        set: &str,
        refusal: &str,
    ) -> Result<Run, WorkflowError> {
        let mut conn = self.writer.checkout().await?;
        let mut tx = conn.begin("workflows.cancel").await?;
        let row = tx
            .typed_query_opt(
                &format!(
                    "UPDATE dalp_workflows.runs SET {set}, updated_at = now()
                      WHERE id = $1 AND {allowed} RETURNING {RUN_COLUMNS}"
                ),
                &[&id],
            )
            .await?;
        let Some(row) = row else {
            self.exists_in(&tx, id).await?;
            return Err(WorkflowError::Conflict(refusal.to_string()));
        };
        tx.typed_execute(
            "DELETE FROM dalp_workflows.concurrency_slots WHERE run_id = $1",
            &[&id],
        )
        .await?;
        let run = run_row(&row);
        tx.record(&ctx.event(action, "run").resource(id)).await?;
        tx.commit().await?;
        Ok(run)
    }

    /// The journaled result of step `op_id` of `run`, if it completed.
    #[tracing::instrument(target = "dalp_store", name = "workflows.journaled", skip_all)]
    pub async fn journaled(&self, run: Uuid, op_id: &str) -> Result<Option<Value>, WorkflowError> {
        let client = dalp_db::pool::checkout(&self.pool, "workflows").await?;
        Ok(client
            .query_typed(
                "SELECT result FROM dalp_workflows.steps WHERE run_id = $1 AND op_id = $2",
                &[(&run, Type::UUID), (&op_id, Type::TEXT)],
            )
            .await?
            .first()
            .map(|r| r.get(0)))
    }

    /// Deletes up to `limit` completed or cancelled runs (with their journals) that ended
    /// more than `older_than` ago; failed and dead-lettered runs stay for operators.
    /// Returns how many went.
    #[tracing::instrument(target = "dalp_store", name = "workflows.purge_finished", skip_all)]
    pub async fn purge_finished(
        &self,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, WorkflowError> {
        self.writer
            .autocommit(
                "workflows.purge_finished",
                "deleting finished runs past their retention: housekeeping",
                async |client: &deadpool_postgres::Object| -> Result<u64, WorkflowError> {
                    let secs = older_than.as_secs_f64();
                    Ok(client
                        .execute_typed(
                            "DELETE FROM dalp_workflows.runs WHERE id IN (
                     SELECT id FROM dalp_workflows.runs
                      WHERE status IN ('completed', 'cancelled')
                        AND finished_at < now() - $1 * interval '1 second'
                      LIMIT $2)",
                            &[(&secs, Type::FLOAT8), (&limit, Type::INT8)],
                        )
                        .await?)
                },
            )
            .await
    }

    #[tracing::instrument(target = "dalp_store", name = "workflows.stats", skip_all)]
    pub async fn stats(&self) -> Result<QueueStats, WorkflowError> {
        let client = dalp_db::pool::checkout(&self.pool, "workflows").await?;
        let r = client
            .query_typed(
                "SELECT count(*) FILTER (WHERE status IN ('pending', 'sleeping') AND run_at <= now()),
                        count(*) FILTER (WHERE status = 'running'),
                        count(*) FILTER (WHERE status = 'sleeping' AND run_at > now()),
                        count(*) FILTER (WHERE status = 'waiting'),
                        count(*) FILTER (WHERE status = 'dead_letter'),
                        count(*) FILTER (WHERE status = 'failed'),
                        count(*) FILTER (WHERE status = 'running' AND lease_expires_at < now()),
                        coalesce(extract(epoch FROM now() - min(run_at) FILTER (
                            WHERE status IN ('pending', 'sleeping') AND run_at <= now())), 0)::float8
                   FROM dalp_workflows.runs
                  WHERE status NOT IN ('completed', 'cancelled')",
                &[],
            )
            .await?;
        let r = &r[0];
        let lat = client
            .query_typed(
                "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)), 0)::float8,
                        coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)), 0)::float8
                   FROM dalp_workflows.runs WHERE started_at > now() - interval '5 minutes'",
                &[],
            )
            .await?;
        Ok(QueueStats {
            ready: r.get(0),
            running: r.get(1),
            sleeping: r.get(2),
            waiting: r.get(3),
            dead_letter: r.get(4),
            failed: r.get(5),
            stalled: r.get(6),
            oldest_ready_seconds: r.get(7),
            claim_latency_p50_seconds: lat[0].get(0),
            claim_latency_p99_seconds: lat[0].get(1),
        })
    }
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(4000);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
