//! The worker: claims runs of its kinds in batches, runs their handlers with at most
//! `concurrency` in flight, renews leases by heartbeat and ends attempts in batches. The
//! claim size adapts to the backlog: a claim that comes back full doubles the next one (up
//! to `max_batch`), one that comes back less than half full halves it; runs claimed beyond
//! the free slots wait in the worker (leases renewed) and go back to the queue, attempt
//! uncounted, when the worker stops. Steps are
//! journaled in the transaction that performs them, fenced by the lease, so a run resumed
//! after a crash replays completed steps and never executes one twice.

use dalp_db::TypedClient;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dalp_db::cache::Invalidate;
use deadpool_postgres::Transaction;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::engine::{Outcome, Run, WorkflowError, WorkflowStore};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a step can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Failed(String),
}

/// A claimed run as its handler sees it.
pub struct RunContext {
    store: WorkflowStore,
    worker: String,
    pub run: Run,
}

impl RunContext {
    pub fn input(&self) -> &Value {
        &self.run.input
    }

    /// The payload of signal `name`, once delivered.
    pub fn signal(&self, name: &str) -> Option<&Value> {
        self.run.signal.as_ref().and_then(|s| s.get(name))
    }

    /// Runs step `op_id` once: its writes (through the given transaction), its journal entry
    /// and a check that this worker still holds the lease commit together. A step already
    /// journaled returns its stored result without running.
    pub async fn step<F>(&self, op_id: &str, f: F) -> Result<Value, StepError>
    where
        F: for<'t> FnOnce(&'t Transaction<'t>) -> BoxFuture<'t, Result<Value, StepError>>,
    {
        if let Some(v) = self.store.journaled(self.run.id, op_id).await? {
            return Ok(v);
        }
        let mut conn = self
            .store
            .writer()
            .checkout()
            .await
            .map_err(WorkflowError::from)?;
        let tx = conn.begin("workflows.step").await?;
        let held = tx
            .typed_query_opt(
                "SELECT 1 FROM dalp_workflows.runs
                  WHERE id = $1 AND status = 'running' AND lease_owner = $2 FOR NO KEY UPDATE",
                &[&self.run.id, &self.worker],
            )
            .await?;
        if held.is_none() {
            return Err(WorkflowError::LeaseLost(self.run.id).into());
        }
        let value = f(&tx).await?;
        tx.typed_execute(
            "INSERT INTO dalp_workflows.steps (run_id, op_id, result, attempt, worker) VALUES ($1, $2, $3, $4, $5)",
            &[&self.run.id, &op_id, &value, &self.run.attempts, &self.worker],
        )
        .await?;
        tx.commit_unaudited("a step's journal entry: the run's start, signals and end are audited")
            .await
            .map_err(WorkflowError::from)?;
        Ok(value)
    }
}

/// A handler: takes the run, returns how the attempt ended.
pub type Handler = Arc<dyn Fn(RunContext) -> BoxFuture<'static, Outcome> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Unique per worker process (lease owner).
    pub id: String,
    pub concurrency: usize,
    /// The first claim size (and the smallest the adaptive size goes back to).
    pub batch: i64,
    /// The largest claim under a backlog.
    pub max_batch: i64,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            id: format!("worker-{}-{}", std::process::id(), Uuid::new_v4().simple()),
            concurrency: 8,
            batch: 8,
            max_batch: 128,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
        }
    }
}

/// Wakes the worker when a NOTIFY arrives (a hint; it polls regardless).
#[derive(Default)]
pub struct Wakeup(Notify);

impl Wakeup {
    pub fn notify(&self) {
        self.0.notify_one();
    }
}

impl Invalidate for Wakeup {
    fn invalidate(&self, _tags: &[&str]) {
        self.0.notify_one();
    }
    fn flush(&self) {
        self.0.notify_one();
    }
    fn set_listening(&self, _listening: bool) {}
}

pub struct Worker {
    store: WorkflowStore,
    opts: WorkerOptions,
    handlers: HashMap<String, Handler>,
    wakeup: Arc<Wakeup>,
}

impl Worker {
    pub fn new(store: WorkflowStore, opts: WorkerOptions) -> Worker {
        Worker {
            store,
            opts,
            handlers: HashMap::new(),
            wakeup: Arc::new(Wakeup::default()),
        }
    }

    pub fn handle(mut self, kind: &str, handler: Handler) -> Worker {
        self.handlers.insert(kind.to_string(), handler);
        self
    }

    /// Pass to `dalp_db::cache::spawn_listener` on [`crate::engine::READY_CHANNEL`].
    pub fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }

    pub fn id(&self) -> &str {
        &self.opts.id
    }

    /// Works until `shutdown` completes; then finishes what is in flight.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), WorkflowError> {
        tokio::pin!(shutdown);
        let kinds: Vec<String> = self.handlers.keys().cloned().collect();
        let active: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
        let heartbeat = {
            let (store, active, worker, lease) = (
                self.store.clone(),
                active.clone(),
                self.opts.id.clone(),
                self.opts.lease,
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    let ids: Vec<Uuid> = active.lock().expect("active").iter().copied().collect();
                    match store.heartbeat(&worker, &ids, lease).await {
                        Ok(lost) if !lost.is_empty() => {
                            tracing::warn!(?lost, "leases lost (expired or cancelled)")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                    }
                }
            })
        };
        let mut tasks: JoinSet<(Uuid, Outcome)> = JoinSet::new();
        let mut queued: VecDeque<Run> = VecDeque::new();
        let mut done: Vec<(Uuid, Outcome)> = Vec::new();
        let mut finishing: Option<tokio::task::JoinHandle<()>> = None;
        let mut stopping = false;
        let concurrency = self.opts.concurrency.max(1);
        let floor = self.opts.batch.max(1);
        let ceiling = self.opts.max_batch.max(floor);
        let mut want = floor;
        let result = loop {
            let mut claimed = 0;
            // Claim when what is queued here would not keep every slot busy.
            let held = tasks.len() + queued.len();
            if !stopping && queued.len() < concurrency && held < concurrency + want as usize {
                let ask = want.min((concurrency + want as usize - held) as i64);
                match self
                    .store
                    .claim(&self.opts.id, &kinds, ask, self.opts.lease)
                    .await
                {
                    Ok(runs) => {
                        claimed = runs.len();
                        if claimed as i64 >= ask {
                            want = (want * 2).min(ceiling);
                        } else if (claimed as i64) < ask / 2 {
                            want = (want / 2).max(floor);
                        }
                        let mut a = active.lock().expect("active");
                        for run in runs {
                            a.insert(run.id);
                            queued.push_back(run);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "claim failed"),
                }
            }
            if stopping && !queued.is_empty() {
                // Not started: back to the queue at once for another worker.
                let ids: Vec<Uuid> = queued.drain(..).map(|r| r.id).collect();
                match self.store.release(&self.opts.id, &ids).await {
                    Ok(_) => {
                        let mut a = active.lock().expect("active");
                        for i in &ids {
                            a.remove(i);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "releasing unstarted runs failed; their leases will expire")
                    }
                }
            }
            while tasks.len() < concurrency {
                let Some(run) = queued.pop_front() else {
                    break;
                };
                let Some(handler) = self.handlers.get(&run.kind).cloned() else {
                    continue;
                };
                let ctx = RunContext {
                    store: self.store.clone(),
                    worker: self.opts.id.clone(),
                    run,
                };
                tasks.spawn(async move {
                    let id = ctx.run.id;
                    (id, handler(ctx).await)
                });
            }
            drain(&mut tasks, &mut done);
            if done.is_empty() && claimed == 0 {
                if stopping && tasks.is_empty() {
                    break Ok(());
                }
                // Nothing to do right now: wait for a handler, a wake-up hint, the poll
                // interval or shutdown.
                tokio::select! {
                    Some(r) = tasks.join_next(), if !tasks.is_empty() => collect(r, &mut done),
                    _ = self.wakeup.0.notified(), if !stopping => {}
                    _ = tokio::time::sleep(self.opts.poll_interval) => {}
                    _ = &mut shutdown, if !stopping => { stopping = true; }
                }
                drain(&mut tasks, &mut done);
            }
            if !done.is_empty() {
                // Written in the background while the next batch is claimed; one write in
                // flight at a time.
                if let Some(prev) = finishing.take() {
                    let _ = prev.await;
                }
                let batch: Vec<(Uuid, Outcome)> = std::mem::take(&mut done);
                let (store, worker, active) =
                    (self.store.clone(), self.opts.id.clone(), active.clone());
                let (base, max) = (self.opts.retry_base, self.opts.retry_max);
                finishing = Some(tokio::spawn(async move {
                    match store.finish(&worker, &batch, base, max).await {
                        Ok(lost) if !lost.is_empty() => {
                            tracing::warn!(?lost, "finished runs whose lease was lost; left alone")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "finish failed; leases will expire and the runs retry")
                        }
                    }
                    let mut a = active.lock().expect("active");
                    for (i, _) in &batch {
                        a.remove(i);
                    }
                }));
            }
        };
        if let Some(prev) = finishing.take() {
            let _ = prev.await;
        }
        heartbeat.abort();
        result
    }
}

fn collect(r: Result<(Uuid, Outcome), tokio::task::JoinError>, done: &mut Vec<(Uuid, Outcome)>) {
    match r {
        Ok(o) => done.push(o),
        Err(e) => tracing::error!(error = %e, "handler panicked; its lease will expire"),
    }
}

/// Everything that has finished, without waiting.
fn drain(tasks: &mut JoinSet<(Uuid, Outcome)>, done: &mut Vec<(Uuid, Outcome)>) {
    while let Some(r) = tasks.try_join_next() {
        collect(r, done);
    }
}

/// The engine's self-test workflow (`dalp.selftest`): `steps` steps, each recording one row
/// in `selftest_effects` in its own journaled transaction, `step_ms` apart; with `fail_until`
/// the first attempts fail (to exercise retries).
pub fn selftest_handler() -> Handler {
    Arc::new(|ctx: RunContext| {
        Box::pin(async move {
            let steps = ctx.input()["steps"].as_u64().unwrap_or(3).min(1000);
            let step_ms = ctx.input()["step_ms"].as_u64().unwrap_or(0).min(60_000);
            let fail_until = ctx.input()["fail_until"].as_i64().unwrap_or(0);
            if i64::from(ctx.run.attempts) <= fail_until {
                return Outcome::Retry(format!(
                    "self-test failure on attempt {}",
                    ctx.run.attempts
                ));
            }
            for i in 0..steps {
                let op = format!("step-{i}");
                let run_id = ctx.run.id;
                let worker = ctx.worker.clone();
                let op_id = op.clone();
                let r = ctx
                    .step(&op, move |tx| {
                        Box::pin(async move {
                            tx.typed_execute(
                                "INSERT INTO dalp_workflows.selftest_effects (run_id, op_id, worker) VALUES ($1, $2, $3)",
                                &[&run_id, &op_id, &worker],
                            )
                            .await?;
                            Ok(json!({ "step": i }))
                        })
                    })
                    .await;
                if let Err(e) = r {
                    return Outcome::Retry(e.to_string());
                }
                if step_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(step_ms)).await;
                }
            }
            Outcome::Completed(json!({ "steps": steps }))
        })
    })
}
