//! Sealing and verification against a real cluster, with real concurrent writers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use dalp_audit::{verify, AuditEvent, AuditKey, Problem, Sealer};
use dalp_db::{partitions, Component, MIGRATOR_ROLE};
use dalp_testkit::{migrated_database, TestDb};

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 1] = [dalp_audit::MIGRATIONS];

struct Setup {
    db: TestDb,
    pools: dalp_db::ComponentPools,
    key: Arc<AuditKey>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let db = migrated_database(&SCHEMAS).await;
    let pools = db.pools_sized(20);
    let dir = tempfile::tempdir().unwrap();
    let key = Arc::new(AuditKey::open_or_create(&dir.path().join("audit.json")).unwrap());
    Setup {
        db,
        pools,
        key,
        _dir: dir,
    }
}

impl Setup {
    fn sealer(&self) -> Sealer {
        Sealer::new(
            self.pools.get(Component::AuditSealer).clone(),
            self.key.clone(),
        )
    }

    async fn verify(&self, cp: Option<&dalp_audit::Checkpoint>) -> dalp_audit::VerifyReport {
        let auditor = self.db.connect_as(Component::Auditor).await;
        verify(&auditor, &self.key.public(), cp).await.unwrap()
    }

    async fn write(&self, n: usize) {
        let c = self.pools.get(Component::Identity).get().await.unwrap();
        for i in 0..n {
            dalp_audit::record(
                &**c,
                &AuditEvent::new("service:test", "test.write", "thing").resource(i),
            )
            .await
            .unwrap();
        }
    }

    /// Tampering is done by the superuser, with triggers off as a real attacker would.
    async fn tamper(&self, sql: &str) {
        let su = self.db.superuser().await;
        su.batch_execute(&format!("SET session_replication_role = replica; {sql}"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn concurrent_writers_with_rollbacks_are_sealed_exactly_once() {
    let s = Arc::new(setup().await);
    // One batch sealed before the writers start: every writer event lands in a later batch,
    // so more than one batch exists however the background sealer below was scheduled.
    {
        let mut client = s.pools.get(Component::Identity).get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let e = AuditEvent::new("service:pre", "test.write", "thing").resource("pre");
        dalp_audit::record(&*tx, &e).await.unwrap();
        tx.commit().await.unwrap();
        // Other tests share the cluster: their open transactions may hold the cluster-wide
        // xmin (the seal watermark) back for a moment, so wait for it rather than seal once.
        let sealed = s
            .sealer()
            .seal_caught_up(Duration::from_secs(30))
            .await
            .unwrap();
        assert!(sealed >= 1, "the first event is sealed");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A sealer runs throughout, so batches interleave with late commits.
    let sealer_task = {
        let s = s.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let sealer = s.sealer();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sealer.seal_once().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..16u32 {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            let mut client = s.pools.get(Component::Identity).get().await.unwrap();
            let mut committed = Vec::new();
            for n in 0..25u32 {
                let tx = client.transaction().await.unwrap();
                let events = 1 + (n + w) % 3;
                for k in 0..events {
                    let e = AuditEvent::new(format!("service:w{w}"), "test.write", "thing")
                        .resource(format!("{w}-{n}-{k}"));
                    dalp_audit::record(&*tx, &e).await.unwrap();
                }
                // Some transactions stay open a while: they allocated low ids and commit late.
                if (w + n) % 7 == 0 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                if rand::random::<u8>() % 4 == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    for k in 0..events {
                        committed.push(format!("{w}-{n}-{k}"));
                    }
                }
            }
            committed
        }));
    }
    let mut committed = HashSet::from(["pre".to_string()]);
    for w in writers {
        committed.extend(w.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sealer_task.await.unwrap();
    s.sealer()
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();

    let report = s.verify(None).await;
    assert!(report.ok(), "{:?}", report.problem);
    let su = s.db.superuser().await;
    // Every committed event sealed exactly once, nothing else sealed.
    let sealed: Vec<String> = su
        .query(
            "SELECT e.resource_id FROM dalp_audit.seal_batches b, unnest(b.event_ids) AS x(id)
               JOIN dalp_audit.events e ON e.id = x.id WHERE e.action = 'test.write'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let sealed_set: HashSet<String> = sealed.iter().cloned().collect();
    assert_eq!(sealed.len(), sealed_set.len(), "an event was sealed twice");
    assert_eq!(sealed_set, committed);
    let batches: i64 = su
        .query_one("SELECT count(*) FROM dalp_audit.seal_batches", &[])
        .await
        .unwrap()
        .get(0);
    assert!(batches > 1, "sealing ran only once: {batches}");
    assert_eq!(report.events_checked as usize, committed.len());
}

#[tokio::test]
async fn every_kind_of_tampering_is_detected() {
    // Each case on its own database, sealed first.
    async fn sealed(n: usize) -> Setup {
        let s = setup().await;
        s.write(n).await;
        s.sealer()
            .seal_caught_up(Duration::from_secs(30))
            .await
            .unwrap();
        let r = s.verify(None).await;
        assert!(r.ok(), "{:?}", r.problem);
        s
    }
    let first_id = "(SELECT min(id) FROM dalp_audit.events)";

    let s = sealed(5).await;
    s.tamper(&format!(
        "UPDATE dalp_audit.events SET actor = 'someone else' WHERE id = {first_id}"
    ))
    .await;
    assert!(matches!(
        s.verify(None).await.problem,
        Some(Problem::EventChanged { .. })
    ));

    let s = sealed(5).await;
    s.tamper(&format!(
        "DELETE FROM dalp_audit.events WHERE id = {first_id} + 2"
    ))
    .await;
    assert!(matches!(
        s.verify(None).await.problem,
        Some(Problem::EventDeleted { .. })
    ));

    let s = sealed(5).await;
    s.tamper(
        "INSERT INTO dalp_audit.events (id, txid, actor, action, resource_type, outcome) VALUES (nextval('dalp_audit.event_ids'), '2', 'forger', 'x', 'y', 'success')",
    )
    .await;
    let r = s.verify(None).await;
    assert!(
        matches!(r.problem, Some(Problem::UnsealedEvent { .. })),
        "{r:?}"
    );

    // Reordering events inside a batch, with or without their hashes.
    let s = sealed(5).await;
    s.tamper(
        "UPDATE dalp_audit.seal_batches SET event_ids[1] = event_ids[2], event_ids[2] = event_ids[1] WHERE batch_no = 1",
    )
    .await;
    assert!(matches!(
        s.verify(None).await.problem,
        Some(Problem::EventChanged { .. })
    ));
    let s = sealed(5).await;
    s.tamper(
        "UPDATE dalp_audit.seal_batches SET event_ids[1] = event_ids[2], event_ids[2] = event_ids[1],
                event_hashes[1] = event_hashes[2], event_hashes[2] = event_hashes[1] WHERE batch_no = 1",
    )
    .await;
    assert!(matches!(
        s.verify(None).await.problem,
        Some(Problem::MerkleMismatch { .. })
    ));

    // Rewriting a batch consistently still fails on the signature.
    let s = sealed(3).await;
    s.tamper(&format!(
        "UPDATE dalp_audit.events SET actor = 'x' WHERE id = {first_id}"
    ))
    .await;
    s.tamper(
        "UPDATE dalp_audit.seal_batches SET batch_hash = sha256(batch_hash) WHERE batch_no = 1",
    )
    .await;
    assert!(matches!(
        s.verify(None).await.problem,
        Some(Problem::BatchHashMismatch { .. })
    ));

    // A truncated chain is caught by a checkpoint exported before; a forged one is refused.
    let s = sealed(3).await;
    s.write(3).await;
    s.sealer()
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    let auditor = s.db.connect_as(Component::Auditor).await;
    let cp = Sealer::checkpoint(&auditor).await.unwrap().unwrap();
    assert!(s.verify(Some(&cp)).await.ok());
    let mut forged = cp.clone();
    forged.batch_hash = hex::encode([7u8; 32]);
    assert!(matches!(
        s.verify(Some(&forged)).await.problem,
        Some(Problem::CheckpointForged { .. })
    ));
    s.tamper(&format!(
        "DELETE FROM dalp_audit.seal_batches WHERE batch_no = {}",
        cp.batch_no
    ))
    .await;
    assert!(matches!(
        s.verify(Some(&cp)).await.problem,
        Some(Problem::CheckpointMissing { .. })
    ));
    // Deleting a batch in the middle breaks the numbering.
    let s = sealed(3).await;
    s.write(2).await;
    s.sealer()
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    s.write(2).await;
    s.sealer()
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    s.tamper("DELETE FROM dalp_audit.seal_batches WHERE batch_no = 2")
        .await;
    assert!(matches!(
        s.verify(None).await.problem,
        Some(Problem::BatchMissing { expected_batch: 2 })
    ));
}

#[tokio::test]
async fn a_dropped_partition_is_tampering_unless_retention_dropped_it() {
    let s = setup().await;
    let mut owner = s.db.connect(MIGRATOR_ROLE).await;
    let long_ago = Utc.with_ymd_and_hms(2010, 3, 15, 12, 0, 0).unwrap();
    partitions::maintain(&mut owner, &dalp_audit::PARTITIONS, long_ago)
        .await
        .unwrap();
    // Events from 2010: writers cannot backdate, so they are planted as they would have
    // been written back then (the superuser, triggers off).
    let su = s.db.superuser().await;
    su.batch_execute("SET session_replication_role = replica")
        .await
        .unwrap();
    for i in 0..4 {
        su.execute(
            "INSERT INTO dalp_audit.events (id, occurred_at, actor, action, resource_type, outcome) VALUES (nextval('dalp_audit.event_ids'), $1, 'old', 'x', 'y', 'success')",
            &[&(long_ago + chrono::Duration::days(i))],
        )
        .await
        .unwrap();
    }
    s.write(3).await;
    s.sealer()
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(s.verify(None).await.ok());

    // Retention (7 years) drops the 2010 partitions, records it, and verify still passes.
    let report = partitions::maintain(&mut owner, &dalp_audit::PARTITIONS, Utc::now())
        .await
        .unwrap();
    assert!(
        report
            .dropped
            .iter()
            .any(|(name, rows)| name == "events_p201003" && *rows == 4),
        "{report:?}"
    );
    assert!(report.horizon.unwrap() > Utc::now() + chrono::Duration::days(60));
    let v = s.verify(None).await;
    assert!(v.ok(), "{:?}", v.problem);
    assert_eq!(v.events_retained, 4);
    let logged: i64 = s
        .db
        .superuser()
        .await
        .query_one(
            "SELECT count(*) FROM dalp_audit.retention_log WHERE partition_name = 'events_p201003'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 1);

    // Dropping the current partition by hand is not retention: detected.
    let current = format!("events_p{}", Utc::now().format("%Y%m"));
    s.tamper(&format!("DROP TABLE dalp_audit.{current}")).await;
    assert!(matches!(
        s.verify(None).await.problem,
        Some(Problem::EventDeleted { .. })
    ));
}

#[tokio::test]
async fn the_owner_cannot_change_audit_rows() {
    let s = setup().await;
    s.write(2).await;
    s.sealer()
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    let owner = s.db.connect(MIGRATOR_ROLE).await;
    // Row triggers need rows to refuse: give the retention log one.
    owner
        .batch_execute(
            "SET ROLE dalp_owner; INSERT INTO dalp_audit.retention_log (table_name, partition_name, range_from, range_to, rows_dropped)
             VALUES ('t', 'p', now(), now(), 0); RESET ROLE",
        )
        .await
        .unwrap();
    for sql in [
        "UPDATE dalp_audit.events SET actor = 'x'",
        "DELETE FROM dalp_audit.events",
        "TRUNCATE dalp_audit.events",
        "UPDATE dalp_audit.seal_batches SET key_id = 'x'",
        "DELETE FROM dalp_audit.seal_batches",
        "DELETE FROM dalp_audit.retention_log",
    ] {
        let Err(err) = owner
            .batch_execute(&format!("SET ROLE dalp_owner; {sql}"))
            .await
        else {
            panic!("the owner was allowed: {sql}");
        };
        assert!(format!("{err:?}").contains("append-only"), "{sql}: {err:?}");
        owner.batch_execute("RESET ROLE").await.unwrap();
    }
    // The sealer can append batches but not change events.
    let sealer = s.db.connect_as(Component::AuditSealer).await;
    assert!(sealer
        .batch_execute("DELETE FROM dalp_audit.events")
        .await
        .is_err());
    assert!(sealer.batch_execute("INSERT INTO dalp_audit.events (actor, action, resource_type, outcome) VALUES ('a','b','c','success')").await.is_err());
}

#[tokio::test]
async fn a_window_of_batches_verifies_against_the_batch_before_it() {
    let s = setup().await;
    for _ in 0..3 {
        s.write(2).await;
        s.sealer()
            .seal_caught_up(Duration::from_secs(30))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let su = s.db.superuser().await;
    let second: chrono::DateTime<Utc> = su
        .query_one(
            "SELECT sealed_at FROM dalp_audit.seal_batches WHERE batch_no = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let auditor = s.db.connect_as(Component::Auditor).await;
    let w = dalp_audit::verify_window(&auditor, &s.key.public(), None, Some(second), None)
        .await
        .unwrap();
    assert!(w.ok(), "{:?}", w.problem);
    // The window holds batch 2 and every later one. How many batches each round made
    // depends on other transactions holding the seal horizon (other tests share the
    // cluster), so the expectation comes from the table, not from the number of rounds.
    let since_second: i64 = su
        .query_one(
            "SELECT count(*) FROM dalp_audit.seal_batches WHERE batch_no >= 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        since_second >= 2,
        "three rounds sealed at least three batches"
    );
    assert_eq!(w.batches as i64, since_second);
    // Tampering before the window is outside it; the whole chain still catches it.
    s.tamper("UPDATE dalp_audit.events SET actor = 'x' WHERE id = (SELECT min(id) FROM dalp_audit.events)").await;
    let w = dalp_audit::verify_window(&auditor, &s.key.public(), None, Some(second), None)
        .await
        .unwrap();
    assert!(w.ok());
    assert!(matches!(
        s.verify(None).await.problem,
        Some(Problem::EventChanged { batch: 1, .. })
    ));
    // Without its anchor the window cannot be trusted.
    s.tamper("DELETE FROM dalp_audit.seal_batches WHERE batch_no = 1")
        .await;
    let w = dalp_audit::verify_window(&auditor, &s.key.public(), None, Some(second), None)
        .await
        .unwrap();
    assert_eq!(w.problem, Some(Problem::BatchMissing { expected_batch: 1 }));
}
