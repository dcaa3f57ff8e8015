//! `cargo bench -p dalp-workflows --bench soak` (`DALP_SOAK_SECONDS`, default 600;
//! `DALP_SOAK_RATE` runs/s, default 100)
//!
//! Moderate steady load for ten minutes: runs of 3 journaled steps started at a fixed rate,
//! a worker of concurrency 8 executing them, and retention deleting runs finished more than
//! 30 s ago every 5 s (as `dalp workflows purge` would, with a longer window). Every 30 s it
//! prints the size of the workflow tables, live and dead tuples and autovacuum counts. The
//! table size must level off: the last sample may not exceed twice the sample at a third of
//! the run, and dead tuples must be reclaimed.

use std::time::{Duration, Instant};

use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_workflows::worker::{selftest_handler, Worker, WorkerOptions};
use dalp_workflows::{NewRun, WorkflowStore};
use serde_json::json;
use uuid::Uuid;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 2] = [dalp_workflows::MIGRATIONS, dalp_audit::MIGRATIONS];

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = env_u64("DALP_SOAK_SECONDS", 600);
    let rate = env_u64("DALP_SOAK_RATE", 100);
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    let pools = db.pools_sized(12);
    let store = WorkflowStore::new(pools.get(Component::Workflows).clone());
    let worker = Worker::new(
        store.clone(),
        WorkerOptions {
            concurrency: 8,
            batch: 8,
            poll_interval: Duration::from_millis(100),
            ..WorkerOptions::default()
        },
    )
    .handle("dalp.selftest", selftest_handler());
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
    let end = started + Duration::from_secs(seconds);
    let enqueue = {
        let store = store.clone();
        tokio::spawn(async move {
            let ctx = RequestContext::service("soak");
            let org = Uuid::new_v4();
            let mut i = 0u64;
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            while Instant::now() < end {
                tick.tick().await;
                store
                    .start(
                        &ctx,
                        &NewRun::new(org, "dalp.selftest", &i.to_string(), json!({"steps": 3})),
                    )
                    .await
                    .unwrap();
                i += 1;
            }
            i
        })
    };
    let purge = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut purged = 0;
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_secs(5)).await;
                purged += store
                    .purge_finished(Duration::from_secs(30), 100_000)
                    .await
                    .unwrap();
            }
            purged
        })
    };
    let su = db.superuser().await;
    let mut samples: Vec<(u64, i64)> = Vec::new();
    println!(
        "{:>5} {:>12} {:>10} {:>10} {:>9} {:>6}",
        "t(s)", "bytes", "live", "dead", "autovac", "ready"
    );
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(30).min(end - Instant::now())).await;
        let r = su
            .query_one(
                "SELECT sum(pg_total_relation_size(relid))::int8, sum(n_live_tup)::int8, sum(n_dead_tup)::int8,
                        sum(autovacuum_count)::int8
                   FROM pg_stat_user_tables WHERE schemaname = 'dalp_workflows'",
                &[],
            )
            .await
            .unwrap();
        let t = started.elapsed().as_secs();
        let (bytes, live, dead, av): (i64, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let ready = store.stats().await.unwrap().ready;
        println!("{t:>5} {bytes:>12} {live:>10} {dead:>10} {av:>9} {ready:>6}");
        samples.push((t, bytes));
    }
    let started_runs = enqueue.await.unwrap();
    let purged = purge.await.unwrap();
    let _ = stop_tx.send(());
    let _ = runner.await;
    let third = samples
        .iter()
        .find(|(t, _)| *t >= seconds / 3)
        .map(|s| s.1)
        .unwrap_or(samples[0].1);
    let last = samples.last().unwrap().1;
    println!("started {started_runs} runs, purged {purged}; size at a third {third} B, at the end {last} B");
    println!(
        "growth after the first third: {:.2}x (bounded if <= 2x)",
        last as f64 / third as f64
    );
}
