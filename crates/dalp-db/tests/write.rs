//! The one write path (`dalp_db::write`): a change commits only with its record, rolls back
//! when dropped, evicts the cache entries it names, and is counted per operation.

use std::sync::Arc;

use dalp_db::cache::{Invalidate, InvalidatingCache};
use dalp_db::write::{self, Record};
use dalp_db::{Component, TypedClient, WriteError, Writer};
use dalp_testkit::fresh_database;

/// A record in the test's own table (what an audit event is to a store).
struct Note(&'static str);

impl Record for Note {
    async fn insert(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        tx.typed_execute("INSERT INTO public.notes (what) VALUES ($1)", &[&self.0])
            .await
            .map(|_| ())
    }
}

#[tokio::test]
async fn a_change_commits_only_with_its_record_and_rolls_back_when_dropped() {
    let db = fresh_database().await;
    let role = Component::Identity.role();
    db.superuser()
        .await
        .batch_execute(&format!(
            "CREATE TABLE public.items (v int PRIMARY KEY);
             CREATE TABLE public.notes (what text NOT NULL);
             GRANT SELECT, INSERT ON public.items, public.notes TO {role};"
        ))
        .await
        .unwrap();
    let pools = db.pools_sized(1);
    let cache: Arc<InvalidatingCache<String>> = InvalidatingCache::new(16);
    cache.set_listening(true);
    let writer = Writer::new(pools.get(Component::Identity).clone(), "test")
        .invalidating("dalp_test_cache", cache.clone() as Arc<dyn Invalidate>);
    let count = |table: &'static str| {
        let pool = pools.get(Component::Identity).clone();
        async move {
            let c = pool.get().await.unwrap();
            c.typed_query_one(&format!("SELECT count(*) FROM public.{table}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };

    // Without a record: refused, nothing kept.
    let mut conn = writer.checkout().await.unwrap();
    let tx = conn.begin("test.unaudited").await.unwrap();
    tx.typed_execute("INSERT INTO public.items VALUES (1)", &[])
        .await
        .unwrap();
    let refused = tx.commit().await;
    assert!(
        matches!(refused, Err(WriteError::Unaudited("test.unaudited"))),
        "{refused:?}"
    );
    drop(conn);
    assert_eq!(count("items").await, 0);

    // Dropped before commit (an error, a cancelled request): rolled back, and the one pooled
    // connection is clean for the next change.
    {
        let mut conn = writer.checkout().await.unwrap();
        let mut tx = conn.begin("test.dropped").await.unwrap();
        tx.typed_execute("INSERT INTO public.items VALUES (2)", &[])
            .await
            .unwrap();
        tx.record(&Note("dropped")).await.unwrap();
    }
    assert_eq!(write::outcomes("test.dropped", "rolled_back"), 1);

    // With its record: committed together, and the named cache entry is gone here at once.
    let generation = cache.generation();
    cache.insert("k".into(), "old".into(), vec!["item:3".into()], generation);
    assert_eq!(cache.get("k").as_deref(), Some("old"));
    let mut conn = writer.checkout().await.unwrap();
    let mut tx = conn.begin("test.audited").await.unwrap();
    tx.typed_execute("INSERT INTO public.items VALUES (3)", &[])
        .await
        .unwrap();
    tx.record(&Note("item 3")).await.unwrap();
    tx.invalidate(["item:3".to_string()]);
    tx.commit().await.unwrap();
    drop(conn);
    assert_eq!(
        cache.get("k"),
        None,
        "the writer's own process evicts at commit"
    );
    assert_eq!(count("items").await, 1);
    assert_eq!(count("notes").await, 1);
    assert_eq!(write::outcomes("test.audited", "committed"), 1);

    // A change that has no record of its own says why and commits.
    let mut conn = writer.checkout().await.unwrap();
    let tx = conn.begin("test.bookkeeping").await.unwrap();
    tx.typed_execute("INSERT INTO public.items VALUES (4)", &[])
        .await
        .unwrap();
    tx.commit_unaudited("the test's bookkeeping").await.unwrap();
    drop(conn);
    assert_eq!(count("items").await, 2);

    // A failure at commit (a deferred check) is counted as failed and surfaces the cause.
    db.superuser()
        .await
        .batch_execute(
            "ALTER TABLE public.items DROP CONSTRAINT items_pkey;
             ALTER TABLE public.items ADD CONSTRAINT items_pkey PRIMARY KEY (v) DEFERRABLE INITIALLY DEFERRED;",
        )
        .await
        .unwrap();
    let mut conn = writer.checkout().await.unwrap();
    let mut tx = conn.begin("test.deferred").await.unwrap();
    tx.typed_execute("INSERT INTO public.items VALUES (3)", &[])
        .await
        .unwrap();
    tx.record(&Note("duplicate")).await.unwrap();
    let failed = tx.commit().await;
    assert!(
        matches!(&failed, Err(WriteError::Db(e)) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)),
        "{failed:?}"
    );
    drop(conn);
    assert_eq!(write::outcomes("test.deferred", "failed"), 1);
    assert_eq!(
        count("notes").await,
        1,
        "the failed change's record is gone too"
    );

    let mut metrics = String::new();
    write::render(&mut metrics);
    assert!(
        metrics.contains(
            "dalp_store_writes_total{store=\"test\",operation=\"test.unaudited\",outcome=\"rolled_back\"} 1"
        ),
        "{metrics}"
    );
}
