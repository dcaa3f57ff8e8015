//! `cargo bench -p dalp-workflows --bench queue`
//!
//! Enqueue + claim + complete of `DALP_BENCH_JOBS` (default 100,000) trivial jobs, with 4
//! enqueuing tasks and workers of concurrency 8 running at the same time, on the same
//! PostgreSQL cluster, each system on a fresh database:
//!
//! 1. the published `graphile_worker` crate (its defaults; `add_job` per job), and
//! 2. our engine (`WorkflowStore::start` per job — which also writes the audit record and a
//!    NOTIFY — and a `Worker` with batch claims, batch finishes and a LISTEN wake-up).
//!
//! Jobs/second is N over the time from the first enqueue to the last completion. Latency is
//! from enqueue (a timestamp in the payload) to the handler starting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_workflows::worker::{Handler, RunContext, Worker, WorkerOptions};
use dalp_workflows::{NewRun, Outcome, WorkflowStore};
use graphile_worker::{IntoTaskHandlerResult, JobSpec, TaskHandler, WorkerContext};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 2] = [dalp_workflows::MIGRATIONS, dalp_audit::MIGRATIONS];

const CONCURRENCY: usize = 8;
const ENQUEUERS: usize = 4;

static LATENCIES: OnceLock<Mutex<Vec<u64>>> = OnceLock::new();
static DONE: AtomicU64 = AtomicU64::new(0);

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn record(enqueued: u64) {
    let lat = now_micros().saturating_sub(enqueued);
    LATENCIES
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .push(lat);
    DONE.fetch_add(1, Ordering::Relaxed);
}

fn reset() -> Vec<u64> {
    DONE.store(0, Ordering::Relaxed);
    std::mem::take(&mut *LATENCIES.get_or_init(Default::default).lock().unwrap())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[derive(Serialize, Deserialize)]
struct Noop {
    t: u64,
}

impl TaskHandler for Noop {
    const IDENTIFIER: &'static str = "noop";

    async fn run(self, _ctx: WorkerContext) -> impl IntoTaskHandlerResult {
        record(self.t);
    }
}

async fn wait_done(n: u64) {
    let deadline = Instant::now() + Duration::from_secs(1800);
    while DONE.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "benchmark stuck at {}",
            DONE.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Result_ {
    name: &'static str,
    secs: f64,
    n: u64,
    p50_ms: f64,
    p99_ms: f64,
}

fn summarise(name: &'static str, secs: f64, n: u64) -> Result_ {
    let mut lat = reset();
    lat.sort_unstable();
    Result_ {
        name,
        secs,
        n,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}

async fn graphile(n: u64) -> Result_ {
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    let url = db.options(dalp_db::MIGRATOR_ROLE).to_url();
    let worker = Arc::new(
        graphile_worker::WorkerOptions::default()
            .concurrency(CONCURRENCY)
            .schema("graphile_worker")
            .define_job::<Noop>()
            .database_url(&url)
            .max_pg_conn((CONCURRENCY + ENQUEUERS + 2) as u32)
            .listen_os_shutdown_signals(false)
            .init()
            .await
            .expect("graphile_worker init"),
    );
    let runner = {
        let w = worker.clone();
        tokio::spawn(async move { w.run().await })
    };
    let started = Instant::now();
    let mut enqueuers = Vec::new();
    for e in 0..ENQUEUERS as u64 {
        let utils = worker.create_utils();
        enqueuers.push(tokio::spawn(async move {
            for _ in (e..n).step_by(ENQUEUERS) {
                utils
                    .add_job(Noop { t: now_micros() }, JobSpec::default())
                    .await
                    .unwrap();
            }
        }));
    }
    for e in enqueuers {
        e.await.unwrap();
    }
    wait_done(n).await;
    let secs = started.elapsed().as_secs_f64();
    worker.request_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(10), runner).await;
    summarise("graphile_worker", secs, n)
}

fn noop_handler() -> Handler {
    Arc::new(|ctx: RunContext| {
        Box::pin(async move {
            record(ctx.input()["t"].as_u64().unwrap_or(0));
            Outcome::Completed(json!(null))
        })
    })
}

async fn ours(n: u64) -> Result_ {
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    let pools = db.pools_sized(CONCURRENCY + ENQUEUERS + 2);
    let store = WorkflowStore::new(pools.get(Component::Workflows).clone());
    let worker = Worker::new(
        store.clone(),
        WorkerOptions {
            concurrency: CONCURRENCY,
            batch: CONCURRENCY as i64,
            poll_interval: Duration::from_millis(200),
            ..WorkerOptions::default()
        },
    )
    .handle("bench.noop", noop_handler());
    let _listener = dalp_db::cache::spawn_listener(
        pools.options(Component::Workflows).clone(),
        dalp_workflows::engine::READY_CHANNEL,
        worker.wakeup(),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(async move {
        worker
            .run(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let started = Instant::now();
    let org = Uuid::new_v4();
    let mut enqueuers = Vec::new();
    for e in 0..ENQUEUERS as u64 {
        let store = store.clone();
        enqueuers.push(tokio::spawn(async move {
            let ctx = RequestContext::service("bench");
            for i in (e..n).step_by(ENQUEUERS) {
                store
                    .start(
                        &ctx,
                        &NewRun::new(
                            org,
                            "bench.noop",
                            &i.to_string(),
                            json!({ "t": now_micros() }),
                        ),
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for e in enqueuers {
        e.await.unwrap();
    }
    let enqueued = started.elapsed().as_secs_f64();
    let backlog = n - DONE.load(Ordering::Relaxed);
    wait_done(n).await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "dalp workflows: all {n} enqueued after {enqueued:.2} s ({:.0}/s), {backlog} not started yet then",
        n as f64 / enqueued
    );
    let _ = stop_tx.send(());
    let _ = runner.await;
    summarise("dalp workflows", secs, n)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::var("DALP_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!("{n} trivial jobs, {ENQUEUERS} enqueuers, worker concurrency {CONCURRENCY}");
    // DALP_BENCH_ONLY_OURS=1 skips the baseline while tuning; published figures run both.
    let only_ours = std::env::var("DALP_BENCH_ONLY_OURS").is_ok_and(|v| v == "1");
    let g = if only_ours {
        None
    } else {
        Some(graphile(n).await)
    };
    let o = ours(n).await;
    for r in g.iter().chain([&o]) {
        println!(
            "{:<16} {} jobs in {:.2} s = {:.0} jobs/s; enqueue->start p50 {:.1} ms, p99 {:.1} ms",
            r.name,
            r.n,
            r.secs,
            r.n as f64 / r.secs,
            r.p50_ms,
            r.p99_ms
        );
    }
    if let Some(g) = g {
        println!(
            "dalp / graphile_worker = {:.2}x (goal >= 2x, enqueue->start p99 <= 1 s)",
            g.secs / o.secs
        );
    }
}
