//! The workflow engine against a real PostgreSQL: idempotent starts, exactly-once steps,
//! leases, retries and dead letters, timers, signals, priorities, per-key concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_testkit::{migrated_database, TestDb};
use dalp_workflows::worker::{selftest_handler, Handler, RunContext, Worker, WorkerOptions};
use dalp_workflows::{NewRun, Outcome, WorkflowError, WorkflowStore};
use serde_json::json;
use uuid::Uuid;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 2] = [dalp_workflows::MIGRATIONS, dalp_audit::MIGRATIONS];

fn ctx() -> RequestContext {
    RequestContext::service("workflows-test")
}

fn store(db: &TestDb) -> WorkflowStore {
    WorkflowStore::new(db.pools_sized(6).get(Component::Workflows).clone())
}

fn fast(id: &str) -> WorkerOptions {
    WorkerOptions {
        id: id.into(),
        concurrency: 4,
        batch: 4,
        max_batch: 16,
        lease: Duration::from_secs(2),
        poll_interval: Duration::from_millis(20),
        retry_base: Duration::from_millis(30),
        retry_max: Duration::from_millis(200),
    }
}

/// A worker running in a task until [`Running::stop`].
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

impl Running {
    fn spawn(worker: Worker) -> Running {
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            worker
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
        Running { stop, handle }
    }

    /// Asks the worker to stop and waits until it has.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.unwrap();
    }
}

/// Runs `worker` until `done` holds (checked every 20 ms), at most 30 s.
async fn work_until<F, Fut>(worker: Worker, done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let running = Running::spawn(worker);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "work did not finish in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
}

async fn all_in(store: &WorkflowStore, ids: &[Uuid], status: &str) -> bool {
    for id in ids {
        if store.get(*id).await.unwrap().status != status {
            return false;
        }
    }
    true
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    db.superuser()
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn starting_twice_returns_the_first_run_and_steps_run_exactly_once() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db);
    let org = Uuid::new_v4();
    let new = NewRun::new(org, "dalp.selftest", "order-1", json!({"steps": 4}));
    let (first, created) = store.start(&ctx(), &new).await.unwrap();
    assert!(created);
    let (again, created) = store.start(&ctx(), &new).await.unwrap();
    assert!(!created);
    assert_eq!(again.id, first.id);
    // Another organisation may use the same key.
    let (other, created) = store
        .start(
            &ctx(),
            &NewRun::new(
                Uuid::new_v4(),
                "dalp.selftest",
                "order-1",
                json!({"steps": 4}),
            ),
        )
        .await
        .unwrap();
    assert!(created && other.id != first.id);
    let e = store
        .start(&ctx(), &NewRun::new(org, "Bad Kind!", "k", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(e, WorkflowError::Invalid(ref i) if i.field == "kind"),
        "{e}"
    );

    let worker = Worker::new(store.clone(), fast("w1")).handle("dalp.selftest", selftest_handler());
    let ids = [first.id, other.id];
    work_until(worker, || all_in(&store, &ids, "completed")).await;
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM dalp_workflows.selftest_effects").await,
        8
    );
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM dalp_workflows.steps").await,
        8
    );
    let run = store.get(first.id).await.unwrap();
    assert_eq!(run.output, Some(json!({"steps": 4})));
    assert_eq!(run.attempts, 1);
    assert!(run.lease_owner.is_none() && run.finished_at.is_some());
    let audited = scalar(
        &db,
        "SELECT count(*) FROM dalp_audit.events WHERE action = 'workflows.run.start'",
    )
    .await;
    assert_eq!(
        audited, 2,
        "one audit record per started run, none for the duplicate"
    );
}

#[tokio::test]
async fn an_expired_lease_makes_the_run_claimable_and_fences_the_old_worker() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db);
    let (run, _) = store
        .start(
            &ctx(),
            &NewRun::new(Uuid::new_v4(), "dalp.selftest", "k", json!({})),
        )
        .await
        .unwrap();
    let kinds = vec!["dalp.selftest".to_string()];
    let claimed = store
        .claim("w-dead", &kinds, 10, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(store
        .claim("w-other", &kinds, 10, Duration::from_secs(5))
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(store.list(Some("stalled"), 10).await.unwrap().len(), 1);
    let reclaimed = store
        .claim("w-other", &kinds, 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].attempts, 2);
    // The first worker comes back: its heartbeat and its finish are refused.
    let lost = store
        .heartbeat("w-dead", &[run.id], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(lost, vec![run.id]);
    let lost = store
        .finish(
            "w-dead",
            &[(run.id, Outcome::Completed(json!(1)))],
            Duration::ZERO,
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert_eq!(lost, vec![run.id]);
    assert_eq!(store.get(run.id).await.unwrap().status, "running");
    assert_eq!(
        store.get(run.id).await.unwrap().lease_owner.as_deref(),
        Some("w-other")
    );
}

#[tokio::test]
async fn failures_back_off_then_dead_letter_and_an_operator_can_retry_or_cancel() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db);
    let mut new = NewRun::new(
        Uuid::new_v4(),
        "dalp.selftest",
        "flaky",
        json!({"steps": 1, "fail_until": 99}),
    );
    new.max_attempts = 3;
    let (run, _) = store.start(&ctx(), &new).await.unwrap();
    let worker = Worker::new(store.clone(), fast("w1")).handle("dalp.selftest", selftest_handler());
    let started = Instant::now();
    work_until(worker, || {
        all_in(&store, std::slice::from_ref(&run.id), "dead_letter")
    })
    .await;
    let r = store.get(run.id).await.unwrap();
    assert_eq!(r.attempts, 3);
    assert!(r.error.unwrap().contains("attempt 3"));
    // Two backoffs of at least 0.5 × 30 ms and 0.5 × 60 ms.
    assert!(started.elapsed() >= Duration::from_millis(45));
    assert_eq!(store.list(Some("dead_letter"), 10).await.unwrap().len(), 1);
    assert_eq!(store.list(None, 10).await.unwrap().len(), 1, "every run");

    let r = store.retry(&ctx(), run.id).await.unwrap();
    assert_eq!((r.status.as_str(), r.attempts), ("pending", 0));
    let e = store.retry(&ctx(), run.id).await.unwrap_err();
    assert!(matches!(e, WorkflowError::Conflict(_)), "{e}");
    let r = store.cancel(&ctx(), run.id).await.unwrap();
    assert_eq!(r.status, "cancelled");
    let e = store.cancel(&ctx(), run.id).await.unwrap_err();
    assert!(matches!(e, WorkflowError::Conflict(_)), "{e}");
    let e = store.cancel(&ctx(), Uuid::new_v4()).await.unwrap_err();
    assert!(matches!(e, WorkflowError::NotFound(_)), "{e}");

    // Retention takes cancelled and completed runs past the age, never dead letters.
    let mut keep = NewRun::new(
        Uuid::new_v4(),
        "dalp.selftest",
        "dead",
        json!({"fail_until": 99}),
    );
    keep.max_attempts = 1;
    let (dead, _) = store.start(&ctx(), &keep).await.unwrap();
    let worker = Worker::new(store.clone(), fast("w2")).handle("dalp.selftest", selftest_handler());
    work_until(worker, || {
        all_in(&store, std::slice::from_ref(&dead.id), "dead_letter")
    })
    .await;
    assert_eq!(
        store
            .purge_finished(Duration::from_secs(3600), 100)
            .await
            .unwrap(),
        0,
        "too young"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        store
            .purge_finished(Duration::from_secs(1), 100)
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        store.get(run.id).await,
        Err(WorkflowError::NotFound(_))
    ));
    assert_eq!(store.get(dead.id).await.unwrap().status, "dead_letter");
}

/// Sleeps 300 ms on its first attempt (a durable timer), then waits for signal `receipt`,
/// then completes with the signal's payload.
fn timer_and_signal() -> Handler {
    Arc::new(|ctx: RunContext| {
        Box::pin(async move {
            let slept = ctx
                .step("slept", |_tx| Box::pin(async { Ok(json!(true)) }))
                .await;
            if ctx.run.attempts == 1 {
                assert!(slept.is_ok());
                return Outcome::Sleep(Utc::now() + chrono::Duration::milliseconds(300));
            }
            match ctx.signal("receipt") {
                None => Outcome::Wait("receipt".into()),
                Some(p) => Outcome::Completed(json!({ "receipt": p })),
            }
        })
    })
}

#[tokio::test]
async fn timers_and_signals_resume_runs() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db);
    let (run, _) = store
        .start(
            &ctx(),
            &NewRun::new(Uuid::new_v4(), "test.timer", "t1", json!({})),
        )
        .await
        .unwrap();
    let worker = Worker::new(store.clone(), fast("w1")).handle("test.timer", timer_and_signal());
    let started = Instant::now();
    work_until(worker, || {
        all_in(&store, std::slice::from_ref(&run.id), "waiting")
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "slept first"
    );
    let r = store.get(run.id).await.unwrap();
    assert_eq!(r.waiting_for.as_deref(), Some("receipt"));
    store
        .signal(&ctx(), run.id, "receipt", json!({"status": 1, "block": 42}))
        .await
        .unwrap();
    let worker = Worker::new(store.clone(), fast("w2")).handle("test.timer", timer_and_signal());
    work_until(worker, || {
        all_in(&store, std::slice::from_ref(&run.id), "completed")
    })
    .await;
    let r = store.get(run.id).await.unwrap();
    assert_eq!(
        r.output,
        Some(json!({"receipt": {"status": 1, "block": 42}}))
    );
    let e = store
        .signal(&ctx(), run.id, "receipt", json!({}))
        .await
        .unwrap_err();
    assert!(matches!(e, WorkflowError::Conflict(_)), "{e}");
}

#[tokio::test]
async fn priorities_order_claims_and_a_concurrency_key_runs_one_at_a_time() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db);
    let org = Uuid::new_v4();
    let kinds = vec!["dalp.selftest".to_string()];
    let (low, _) = store
        .start(&ctx(), &NewRun::new(org, "dalp.selftest", "low", json!({})))
        .await
        .unwrap();
    let mut hi = NewRun::new(org, "dalp.selftest", "high", json!({}));
    hi.priority = 10;
    let (high, _) = store.start(&ctx(), &hi).await.unwrap();
    let first = store
        .claim("w", &kinds, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(first[0].id, high.id);
    let second = store
        .claim("w", &kinds, 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(second[0].id, low.id);
    store
        .finish(
            "w",
            &[
                (high.id, Outcome::Completed(json!(1))),
                (low.id, Outcome::Completed(json!(2))),
            ],
            Duration::ZERO,
            Duration::ZERO,
        )
        .await
        .unwrap();

    let mut ids = Vec::new();
    for i in 0..4 {
        let mut n = NewRun::new(
            org,
            "dalp.selftest",
            &format!("signer-{i}"),
            json!({"steps": 3, "step_ms": 40}),
        );
        n.concurrency_key = Some("signer:0xabc".into());
        ids.push(store.start(&ctx(), &n).await.unwrap().0.id);
    }
    let worker = Worker::new(store.clone(), fast("w1")).handle("dalp.selftest", selftest_handler());
    let running = Running::spawn(worker);
    let su = db.superuser().await;
    let mut max_running = 0i64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !all_in(&store, &ids, "completed").await {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM dalp_workflows.runs WHERE concurrency_key = 'signer:0xabc' AND status = 'running'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        max_running = max_running.max(n);
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.stop().await;
    assert_eq!(max_running, 1, "one run at a time per key");
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM dalp_workflows.concurrency_slots").await,
        0
    );
}

/// Under a backlog the worker claims more than it can start (the claim size doubles while
/// claims come back full); a worker that stops hands the runs it never started back at once,
/// attempt uncounted, and another worker completes them: every run ends with one attempt.
#[tokio::test]
async fn a_stopping_worker_hands_back_the_runs_it_claimed_but_never_started() {
    let db = migrated_database(&SCHEMAS).await;
    let store = store(&db);
    let org = Uuid::new_v4();
    let mut ids = Vec::new();
    for i in 0..24 {
        let n = NewRun::new(
            org,
            "dalp.selftest",
            &format!("gated-{i}"),
            json!({"steps": 1, "step_ms": 1}),
        );
        ids.push(store.start(&ctx(), &n).await.unwrap().0.id);
    }
    // The hoarder's handlers wait for the test to open the gate, so nothing it queued can
    // start however the machine schedules it: what it holds beyond its slots stays queued.
    let (gate, opened) = tokio::sync::watch::channel(false);
    let gated: Handler = Arc::new(move |_ctx: RunContext| {
        let mut opened = opened.clone();
        Box::pin(async move {
            let _ = opened.wait_for(|open| *open).await;
            Outcome::Completed(json!(null))
        })
    });
    let mut opts = fast("hoarder");
    opts.concurrency = 2;
    opts.batch = 2;
    let worker = Worker::new(store.clone(), opts).handle("dalp.selftest", gated);
    let Running { stop, handle } = Running::spawn(worker);
    let held = "SELECT count(*) FROM dalp_workflows.runs WHERE status = 'running' AND lease_owner = 'hoarder'";
    let handed_back_sql = "SELECT count(*) FROM dalp_workflows.runs WHERE status = 'pending' AND attempts = 0 AND started_at IS NULL AND lease_owner IS NULL";
    // Wait until it holds more runs than it has slots.
    let deadline = Instant::now() + Duration::from_secs(30);
    while scalar(&db, held).await <= 2 {
        assert!(Instant::now() < deadline, "the worker never claimed ahead");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Stop: the two running handlers are still held at the gate, so the runs it claimed
    // beyond them go back before any of them could start.
    let _ = stop.send(());
    let deadline = Instant::now() + Duration::from_secs(30);
    while scalar(&db, held).await > 2 {
        assert!(
            Instant::now() < deadline,
            "the unstarted runs were not handed back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = gate.send(true);
    handle.await.unwrap();
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM dalp_workflows.runs WHERE status = 'running'"
        )
        .await,
        0,
        "nothing left leased to a stopped worker"
    );
    let handed_back = scalar(&db, handed_back_sql).await;
    let completed = scalar(
        &db,
        "SELECT count(*) FROM dalp_workflows.runs WHERE status = 'completed'",
    )
    .await;
    assert!(handed_back > 0, "the runs it never started went back");
    assert_eq!(completed, 2, "only the two runs in its slots ran");
    assert_eq!(handed_back + completed, 24);
    let other =
        Worker::new(store.clone(), fast("other")).handle("dalp.selftest", selftest_handler());
    work_until(other, || all_in(&store, &ids, "completed")).await;
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM dalp_workflows.runs WHERE attempts <> 1"
        )
        .await,
        0,
        "no attempt was spent on a run that never started"
    );
}
