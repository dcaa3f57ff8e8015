//! Group commit of request events against a real cluster: events waiting together share one
//! commit, every caller returns only after its commit, and a bad event fails alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dalp_audit::{AuditEvent, GroupWriter};
use dalp_db::Component;

async fn count(db: &dalp_testkit::TestDb, action: &str) -> i64 {
    db.superuser()
        .await
        .query_one(
            "SELECT count(*) FROM dalp_audit.events WHERE action = $1",
            &[&action],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until `n` events were handed over to the writer.
async fn wait_submitted(w: &GroupWriter, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let submitted = || {
        w.stats()
            .submitted
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    while submitted() < n {
        assert!(
            Instant::now() < deadline,
            "only {} handed over",
            submitted()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn waiting_events_share_one_commit_and_each_caller_sees_it_committed() {
    let db = dalp_testkit::migrated_database().await;
    let pools = db.pools_sized(1);
    let pool = pools.get(Component::Identity).clone();
    // Hold the only connection: the writer takes what is there, then waits for the
    // connection while the rest queue up behind: two commits at most for all 50.
    let held = pool.get().await.unwrap();
    let w = Arc::new(GroupWriter::new(pool.clone(), 256, 1024));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            w.record(AuditEvent::new("service:test", "test.group", "thing").resource(i))
                .await
        }));
    }
    wait_submitted(&w, 50).await;
    drop(held);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Returned means committed: all 50 are there, in two commits.
    assert_eq!(count(&db, "test.group").await, 50);
    let s = w.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert!(s.batches.load(Relaxed) <= 2, "{s:?}");
    assert_eq!(s.events.load(Relaxed), 50);
    assert!(s.max_batch.load(Relaxed) >= 25, "{s:?}");
}

#[tokio::test]
async fn a_bad_event_fails_alone() {
    let db = dalp_testkit::migrated_database().await;
    let pools = db.pools_sized(1);
    let pool = pools.get(Component::Identity).clone();
    let held = pool.get().await.unwrap();
    let w = Arc::new(GroupWriter::new(pool.clone(), 256, 1024));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let w = w.clone();
        // Event 5's actor is over the column's 200-character limit.
        let actor = if i == 5 {
            "x".repeat(300)
        } else {
            "service:test".into()
        };
        tasks.push(tokio::spawn(async move {
            w.record(AuditEvent::new(actor, "test.bad", "thing").resource(i))
                .await
        }));
    }
    wait_submitted(&w, 10).await;
    drop(held);
    let mut failed = 0;
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            assert!(e.contains("check"), "{e}");
            failed += 1;
        }
    }
    assert_eq!(failed, 1);
    assert_eq!(count(&db, "test.bad").await, 9);
}
