//! A hostile database administrator against a sealed, witnessed trail: one test per kind
//! of tampering, each done as the least-privileged role that can attempt it (a writer, the
//! migrator acting as the schema owner, the sealer's credentials), each on its own database.
//! Every one is either refused by the database or detected by verification — with no
//! checkpoint exported by hand: the heads the sealer witnessed outside the database suffice.

use std::sync::Arc;
use std::time::Duration;

use dalp_audit::{
    verify_with, AuditEvent, AuditKey, Problem, Sealer, TrustedKeys, VerifyOptions, Witness,
};
use dalp_db::{Component, MIGRATOR_ROLE};
use dalp_testkit::{migrated_database, TestDb};

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 1] = [dalp_audit::MIGRATIONS];

struct Trail {
    db: TestDb,
    pools: dalp_db::ComponentPools,
    key: Arc<AuditKey>,
    witness: Witness,
    dir: tempfile::TempDir,
}

impl Trail {
    /// A trail of `n` events, sealed, its head witnessed; verification passes.
    async fn sealed(n: usize) -> Trail {
        let db = migrated_database(&SCHEMAS).await;
        let pools = db.pools();
        let dir = tempfile::tempdir().unwrap();
        let key = Arc::new(AuditKey::open_or_create(&dir.path().join("audit.json")).unwrap());
        let witness = Witness::new(dir.path().join("witness"));
        let t = Trail {
            db,
            pools,
            key,
            witness,
            dir,
        };
        t.write(n).await;
        t.seal().await;
        let r = t.verify().await;
        assert!(r.ok(), "{:?}", r.problem);
        assert!(r.heads_checked >= 1, "{r:?}");
        t
    }

    fn sealer_with(&self, key: Arc<AuditKey>) -> Sealer {
        Sealer::new(self.pools.get(Component::AuditSealer).clone(), key)
            .with_witness(self.witness.clone(), Duration::ZERO)
    }

    /// Seals everything and witnesses the head, as the running sealer does.
    async fn seal(&self) {
        let s = self.sealer_with(self.key.clone());
        s.seal_caught_up(Duration::from_secs(30)).await.unwrap();
        s.witness_now().await.unwrap();
    }

    /// `n` events in one transaction: a batch never splits a transaction, so each
    /// `write` + `seal` adds exactly one batch however other tests' transactions in the
    /// shared cluster hold the seal watermark back.
    async fn write(&self, n: usize) {
        let mut c = self.pools.get(Component::Identity).get().await.unwrap();
        let tx = c.transaction().await.unwrap();
        for i in 0..n {
            dalp_audit::record(
                &*tx,
                &AuditEvent::new("service:test", "test.write", "thing").resource(i),
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }

    /// Verification as `dalp audit verify` runs it: the public key only, every witnessed
    /// head, no checkpoint.
    async fn verify(&self) -> dalp_audit::VerifyReport {
        let public = self.dir.path().join("audit.pub.json");
        self.key.write_public(&public).unwrap();
        let mut keys = TrustedKeys::default();
        keys.load(&public).unwrap();
        let heads = self.witness.heads().unwrap();
        let auditor = self.db.connect_as(Component::Auditor).await;
        verify_with(
            &auditor,
            &VerifyOptions {
                heads: &heads,
                ..VerifyOptions::new(&keys)
            },
        )
        .await
        .unwrap()
    }

    /// Runs `sql` as the schema owner (the migrator's `SET ROLE`), not the superuser.
    async fn as_owner(&self, sql: &str) {
        let c = self.db.connect(MIGRATOR_ROLE).await;
        c.batch_execute(&format!("SET ROLE dalp_owner; {sql}"))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// As the owner with the append-only triggers off for the statement, back on after.
    async fn as_owner_unguarded(&self, table: &str, sql: &str) {
        self.as_owner(&format!(
            "ALTER TABLE dalp_audit.{table} DISABLE TRIGGER USER; {sql}; ALTER TABLE dalp_audit.{table} ENABLE TRIGGER USER"
        ))
        .await;
    }

    /// A statement a writer role (the identity service) attempts; its error.
    async fn as_writer_refused(&self, sql: &str) -> String {
        let c = self.db.connect_as(Component::Identity).await;
        match c.batch_execute(sql).await {
            Ok(()) => panic!("a writer was allowed: {sql}"),
            Err(e) => format!("{e:?}"),
        }
    }
}

/// The problem and its message, which must name a batch or an event.
fn problem(r: &dalp_audit::VerifyReport) -> (Problem, String) {
    let p = r.problem.clone().expect("tampering went undetected");
    let m = p.to_string();
    (p, m)
}

const FIRST: &str = "(SELECT min(id) FROM dalp_audit.events)";

#[tokio::test]
async fn an_edited_event_is_detected() {
    let t = Trail::sealed(5).await;
    t.as_owner_unguarded(
        "events",
        &format!("UPDATE dalp_audit.events SET actor = 'someone else' WHERE id = {FIRST}"),
    )
    .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::EventChanged { batch: 1, .. }), "{m}");
    assert!(m.contains("batch 1") && m.contains("event "), "{m}");
}

#[tokio::test]
async fn a_deleted_event_is_detected() {
    let t = Trail::sealed(5).await;
    t.as_owner_unguarded(
        "events",
        &format!("DELETE FROM dalp_audit.events WHERE id = {FIRST} + 2"),
    )
    .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::EventDeleted { batch: 1, .. }), "{m}");
}

#[tokio::test]
async fn writers_cannot_forge_ids_transactions_or_times() {
    let t = Trail::sealed(3).await;
    let cols = "actor, action, resource_type, outcome";
    // Writers cannot read events; the attacker knows an id from elsewhere.
    let first: i64 =
        t.db.superuser()
            .await
            .query_one(&format!("SELECT {FIRST}"), &[])
            .await
            .unwrap()
            .get(0);
    for (sql, says) in [
        (
            format!("INSERT INTO dalp_audit.events (id, {cols}) VALUES ({first}, 'f', 'x', 'y', 'success')"),
            "assigned by the database",
        ),
        (
            format!("INSERT INTO dalp_audit.events (txid, {cols}) VALUES ('1', 'f', 'x', 'y', 'success')"),
            "txid",
        ),
        (
            format!("INSERT INTO dalp_audit.events (txid, {cols}) VALUES ('999999999999', 'f', 'x', 'y', 'success')"),
            "txid",
        ),
        (
            format!("INSERT INTO dalp_audit.events (occurred_at, {cols}) VALUES (now() - interval '1 day', 'f', 'x', 'y', 'success')"),
            "occurred_at",
        ),
    ] {
        let e = t.as_writer_refused(&sql).await;
        assert!(e.contains(says), "{sql}: {e}");
    }
    // Several rows in one statement still get their own ids, transaction and time.
    let c = t.db.connect_as(Component::Identity).await;
    c.batch_execute(&format!(
        "INSERT INTO dalp_audit.events ({cols}) VALUES ('a', 'x', 'y', 'success'), ('b', 'x', 'y', 'success')"
    ))
    .await
    .unwrap();
    t.seal().await;
    assert!(t.verify().await.ok());
}

#[tokio::test]
async fn an_event_inserted_below_the_watermark_is_detected() {
    let t = Trail::sealed(3).await;
    t.as_owner_unguarded(
        "events",
        "INSERT INTO dalp_audit.events (id, txid, actor, action, resource_type, outcome) VALUES (nextval('dalp_audit.event_ids'), '3', 'forger', 'x', 'y', 'success')",
    )
    .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::UnsealedEvent { .. }), "{m}");
}

#[tokio::test]
async fn a_forged_copy_of_a_sealed_id_is_detected() {
    let t = Trail::sealed(3).await;
    // The same id next month, in another partition, below the watermark.
    t.as_owner_unguarded(
        "events",
        &format!(
            "INSERT INTO dalp_audit.events (id, occurred_at, txid, actor, action, resource_type, outcome)
             SELECT {FIRST}, now() + interval '32 days', '3', 'forger', 'x', 'y', 'success'"
        ),
    )
    .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::DuplicateEventId { .. }), "{m}");
}

#[tokio::test]
async fn an_event_that_could_never_be_sealed_is_detected() {
    let t = Trail::sealed(3).await;
    t.as_owner_unguarded(
        "events",
        "INSERT INTO dalp_audit.events (id, txid, actor, action, resource_type, outcome) VALUES (nextval('dalp_audit.event_ids'), '999999999999', 'forger', 'x', 'y', 'success')",
    )
    .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::ImpossibleTxid { .. }), "{m}");
}

#[tokio::test]
async fn a_forged_retention_entry_explains_nothing() {
    // Deleted events "explained" by a retention entry for this month: too young.
    let t = Trail::sealed(5).await;
    t.as_owner_unguarded(
        "events",
        &format!("DELETE FROM dalp_audit.events WHERE id = {FIRST}"),
    )
    .await;
    t.as_owner(
        "INSERT INTO dalp_audit.retention_log (table_name, partition_name, range_from, range_to, rows_dropped)
         VALUES ('dalp_audit.events', 'events_forged', now() - interval '1 day', now() + interval '1 day', 1)",
    )
    .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::RetentionTooYoung { .. }), "{m}");
}

#[tokio::test]
async fn a_partition_dropped_and_recreated_is_detected() {
    let t = Trail::sealed(5).await;
    let month = chrono::Utc::now().format("%Y%m").to_string();
    let name = format!("events_p{month}");
    let (from, to) = {
        let c = t.db.superuser().await;
        let r = c
            .query_one(
                "SELECT date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                        (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC'",
                &[],
            )
            .await
            .unwrap();
        (
            r.get::<_, chrono::DateTime<chrono::Utc>>(0),
            r.get::<_, chrono::DateTime<chrono::Utc>>(1),
        )
    };
    // The migrator's credentials suffice: drop the month, recreate it empty, record it as
    // retention with the right count.
    t.as_owner(&format!(
        "DROP TABLE dalp_audit.{name};
         CREATE TABLE dalp_audit.{name} PARTITION OF dalp_audit.events FOR VALUES FROM ('{}') TO ('{}');
         INSERT INTO dalp_audit.retention_log (table_name, partition_name, range_from, range_to, rows_dropped)
         VALUES ('dalp_audit.events', '{name}', '{}', '{}', 5)",
        from.to_rfc3339(),
        to.to_rfc3339(),
        from.to_rfc3339(),
        to.to_rfc3339(),
    ))
    .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::RetentionTooYoung { .. }), "{m}");
}

#[tokio::test]
async fn a_chain_re_signed_with_another_key_is_refused() {
    let t = Trail::sealed(5).await;
    // Owner wipes the batches; the sealer's credentials with the attacker's key re-seal.
    t.as_owner_unguarded("seal_batches", "DELETE FROM dalp_audit.seal_batches")
        .await;
    let other = Arc::new(AuditKey::open_or_create(&t.dir.path().join("attacker.json")).unwrap());
    Sealer::new(t.pools.get(Component::AuditSealer).clone(), other)
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::UnknownKey { batch: 1, .. }), "{m}");
}

#[tokio::test]
async fn deleted_batches_re_sealed_by_the_real_sealer_are_caught_by_the_witness() {
    let t = Trail::sealed(5).await;
    t.as_owner_unguarded(
        "events",
        &format!("UPDATE dalp_audit.events SET actor = 'rewritten' WHERE id = {FIRST}"),
    )
    .await;
    t.as_owner_unguarded("seal_batches", "DELETE FROM dalp_audit.seal_batches")
        .await;
    // The running sealer (the real key) builds a fresh, validly signed chain over the edit.
    t.sealer_with(t.key.clone())
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::CheckpointMismatch { batch: 1 }), "{m}");
}

#[tokio::test]
async fn a_truncated_tail_is_caught_by_the_witness() {
    let t = Trail::sealed(3).await;
    t.write(3).await;
    t.seal().await;
    t.as_owner_unguarded(
        "seal_batches",
        "DELETE FROM dalp_audit.seal_batches WHERE batch_no = (SELECT max(batch_no) FROM dalp_audit.seal_batches)",
    )
    .await;
    t.as_owner_unguarded(
        "events",
        &format!("DELETE FROM dalp_audit.events WHERE id > {FIRST} + 2"),
    )
    .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::CheckpointMissing { batch: 2 }), "{m}");
}

#[tokio::test]
async fn a_total_wipe_is_caught_by_the_witness() {
    let t = Trail::sealed(4).await;
    t.as_owner_unguarded("seal_batches", "DELETE FROM dalp_audit.seal_batches")
        .await;
    t.as_owner_unguarded("events", "DELETE FROM dalp_audit.events")
        .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::CheckpointMissing { batch: 1 }), "{m}");
}

#[tokio::test]
async fn a_trigger_left_disabled_by_the_owner_is_reported() {
    let t = Trail::sealed(2).await;
    t.as_owner("ALTER TABLE dalp_audit.events DISABLE TRIGGER events_append_only")
        .await;
    let (p, m) = problem(&t.verify().await);
    assert!(matches!(p, Problem::TriggerDisabled { .. }), "{m}");
    assert!(m.contains("events_append_only"), "{m}");
}

#[tokio::test]
async fn a_new_key_never_continues_an_existing_chain() {
    let t = Trail::sealed(2).await;
    t.write(1).await;
    let replaced = Arc::new(AuditKey::open_or_create(&t.dir.path().join("new.json")).unwrap());
    let err = t
        .sealer_with(replaced)
        .seal_once()
        .await
        .expect_err("a replaced key sealed");
    assert!(
        err.to_string().contains("restore the original key"),
        "{err}"
    );
    // Nothing was sealed by it; the real key carries on.
    t.seal().await;
    assert!(t.verify().await.ok());
}

#[tokio::test]
async fn incremental_verification_covers_what_is_new_and_its_anchor() {
    let t = Trail::sealed(4).await;
    let full = t.verify().await;
    let auditor = t.db.connect_as(Component::Auditor).await;
    let anchor = Sealer::checkpoint_of(&auditor, full.last_batch)
        .await
        .unwrap()
        .unwrap();
    t.write(3).await;
    t.seal().await;
    let keys = TrustedKeys::one(t.key.public());
    let heads = t.witness.heads().unwrap();
    let incremental = || async {
        verify_with(
            &auditor,
            &VerifyOptions {
                heads: &heads,
                after: Some(&anchor),
                ..VerifyOptions::new(&keys)
            },
        )
        .await
        .unwrap()
    };
    let r = incremental().await;
    assert!(r.ok(), "{:?}", r.problem);
    assert_eq!(r.events_checked, 3, "only the new events: {r:?}");
    assert_eq!(r.last_seq, 7);
    // A new event edited: caught.
    t.as_owner_unguarded(
        "events",
        "UPDATE dalp_audit.events SET actor = 'x' WHERE id = (SELECT max(id) FROM dalp_audit.events)",
    )
    .await;
    let (p, m) = problem(&incremental().await);
    assert!(matches!(p, Problem::EventChanged { .. }), "{m}");
    // The anchor rewritten: caught.
    t.as_owner_unguarded(
        "seal_batches",
        &format!(
            "UPDATE dalp_audit.seal_batches SET batch_hash = sha256(batch_hash) WHERE batch_no = {}",
            anchor.batch_no
        ),
    )
    .await;
    let (p, m) = problem(&incremental().await);
    assert!(matches!(p, Problem::CheckpointMismatch { .. }), "{m}");
}

#[tokio::test]
async fn a_rotated_key_is_followed_from_the_first_key_and_picked_up_by_a_running_sealer() {
    let t = Trail::sealed(3).await;
    let next_file = t.dir.path().join("next.json");
    let next = Arc::new(AuditKey::open_or_create(&next_file).unwrap());
    let rotation = t.sealer_with(t.key.clone()).rotate(&next).await.unwrap();
    assert_eq!(rotation, 2);
    // The running sealer still holds the old key; its key file now has the new one.
    t.write(2).await;
    let running = t.sealer_with(t.key.clone()).with_key_file(&next_file);
    running
        .seal_caught_up(Duration::from_secs(30))
        .await
        .unwrap();
    running.witness_now().await.unwrap();
    // Verification trusts only the first key's public half and follows the rotation; the
    // heads witnessed after it are signed by the new key.
    let r = t.verify().await;
    assert!(r.ok(), "{:?}", r.problem);
    assert_eq!((r.batches, r.events_checked), (3, 5));
    // A window after the rotation verifies too: the hand-over before it is followed.
    let auditor = t.db.connect_as(Component::Auditor).await;
    let after_rotation = Sealer::checkpoint_of(&auditor, 3).await.unwrap().unwrap();
    let keys = TrustedKeys::one(t.key.public());
    let r = verify_with(
        &auditor,
        &VerifyOptions {
            from: Some(after_rotation.sealed_at),
            ..VerifyOptions::new(&keys)
        },
    )
    .await
    .unwrap();
    assert!(r.ok(), "{:?}", r.problem);
    assert_eq!((r.batches, r.events_checked), (1, 2));
    // The old key cannot continue the chain any more.
    t.write(1).await;
    let err = t
        .sealer_with(t.key.clone())
        .seal_once()
        .await
        .expect_err("the retired key sealed");
    assert!(err.to_string().contains(&next.key_id), "{err}");
}
