//! Group commit of request events against a real cluster: events waiting together share one
//! commit, every caller returns only after its commit, and a bad event fails alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dalp_audit::{AuditEvent, GroupWriter};
use dalp_db::Component;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 1] = [dalp_audit::MIGRATIONS];

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

/// Hands `events` to a writer over a one-connection pool whose connection is held until all
/// were handed over (so they queue behind the first), then releases it; returns each
/// caller's result and the writer.
async fn record_queued(
    db: &dalp_testkit::TestDb,
    events: Vec<AuditEvent>,
) -> (Vec<Result<(), String>>, Arc<GroupWriter>) {
    let pools = db.pools_sized(1);
    let pool = pools.get(Component::Identity).clone();
    let held = pool.get().await.unwrap();
    let w = Arc::new(GroupWriter::new(pool.clone(), 256, 1024));
    let n = events.len() as u64;
    let tasks: Vec<_> = events
        .into_iter()
        .map(|e| {
            let w = w.clone();
            tokio::spawn(async move { w.record(e).await })
        })
        .collect();
    wait_submitted(&w, n).await;
    drop(held);
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    (results, w)
}

#[tokio::test]
async fn waiting_events_share_one_commit_and_each_caller_sees_it_committed() {
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    // The writer takes what is there, then waits for the connection while the rest queue
    // up behind: two commits at most for all 50.
    let events = (0..50)
        .map(|i| AuditEvent::new("service:test", "test.group", "thing").resource(i))
        .collect();
    let (results, w) = record_queued(&db, events).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // Returned means committed: all 50 are there.
    assert_eq!(count(&db, "test.group").await, 50);
    let s = w.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert!(s.batches.load(Relaxed) <= 2, "{s:?}");
    assert_eq!(s.events.load(Relaxed), 50);
    assert!(s.max_batch.load(Relaxed) >= 25, "{s:?}");
}

#[tokio::test]
async fn a_bad_event_fails_alone() {
    let db = dalp_testkit::migrated_database(&SCHEMAS).await;
    // Event 5's actor is over the column's 200-character limit.
    let events = (0..10)
        .map(|i| {
            let actor = if i == 5 {
                "x".repeat(300)
            } else {
                "service:test".into()
            };
            AuditEvent::new(actor, "test.bad", "thing").resource(i)
        })
        .collect();
    let (results, _) = record_queued(&db, events).await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failed.len(), 1, "{results:?}");
    assert!(failed[0].contains("check"), "{}", failed[0]);
    assert_eq!(count(&db, "test.bad").await, 9);
}
