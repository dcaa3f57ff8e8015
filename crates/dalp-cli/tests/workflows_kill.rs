//! kill -9 of a `dalp workflows worker` mid-run: another worker resumes its runs once their
//! leases expire, and no step runs twice (side effects counted per step).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_testkit::{migrated_database, Reaped, TestDb};
use dalp_workflows::{NewRun, WorkflowStore};
use serde_json::json;
use uuid::Uuid;

const DALP: &str = env!("CARGO_BIN_EXE_dalp");
const RUNS: usize = 12;
const STEPS: i64 = 8;

fn worker(db: &TestDb) -> Reaped {
    Reaped(
        Command::new(DALP)
            .args([
                "workflows",
                "worker",
                "--concurrency",
                "6",
                "--lease-seconds",
                "2",
            ])
            .args(["--poll-ms", "50", "--retry-base-ms", "50"])
            .env(
                "DALP_DATABASE_URL",
                db.options(Component::Workflows.role()).to_url(),
            )
            .env_remove("DALP_DATA_DIR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
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
async fn a_worker_killed_mid_run_is_replaced_and_no_step_runs_twice() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let store = WorkflowStore::new(db.pools_sized(2).get(Component::Workflows).clone());
    let mut ids = Vec::new();
    for i in 0..RUNS {
        let (run, _) = store
            .start(
                &RequestContext::service("test"),
                &NewRun::new(
                    Uuid::nil(),
                    "dalp.selftest",
                    &format!("k{i}"),
                    json!({"steps": STEPS, "step_ms": 120}),
                ),
            )
            .await
            .unwrap();
        ids.push(run.id);
    }
    let mut first = worker(&db);
    // Wait until some run is part-way through its steps, then kill -9.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let partial = scalar(
            &db,
            &format!(
                "SELECT count(*) FROM (SELECT run_id FROM dalp_workflows.selftest_effects
                   GROUP BY run_id HAVING count(*) BETWEEN 2 AND {}) p",
                STEPS - 2
            ),
        )
        .await;
        if partial > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.0.kill().unwrap(); // SIGKILL
    first.0.wait().unwrap();
    let effects_at_kill = scalar(&db, "SELECT count(*) FROM dalp_workflows.selftest_effects").await;
    assert!(
        effects_at_kill < RUNS as i64 * STEPS,
        "killed before finishing"
    );

    let _second = worker(&db);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = scalar(
            &db,
            "SELECT count(*) FROM dalp_workflows.runs WHERE status = 'completed'",
        )
        .await;
        if done == RUNS as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "runs were not finished by the second worker ({done} of {RUNS})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every step ran exactly once: one side effect and one journal entry per (run, step).
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM dalp_workflows.selftest_effects").await,
        RUNS as i64 * STEPS
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT count(DISTINCT (run_id, op_id)) FROM dalp_workflows.selftest_effects"
        )
        .await,
        RUNS as i64 * STEPS
    );
    assert_eq!(
        scalar(&db, "SELECT count(*) FROM dalp_workflows.steps").await,
        RUNS as i64 * STEPS
    );
    // Some run was finished by the other worker after the kill: its effects come from two workers.
    let resumed = scalar(
        &db,
        "SELECT count(*) FROM (SELECT run_id FROM dalp_workflows.selftest_effects
           GROUP BY run_id HAVING count(DISTINCT worker) = 2) r",
    )
    .await;
    assert!(resumed >= 1, "a run was resumed by the second worker");
    let retried = scalar(
        &db,
        "SELECT count(*) FROM dalp_workflows.runs WHERE attempts >= 2",
    )
    .await;
    assert!(retried >= resumed);
    for id in ids {
        assert_eq!(
            store.get(id).await.unwrap().output,
            Some(json!({"steps": STEPS}))
        );
    }
}
