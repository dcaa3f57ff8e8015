//! The migration runner against a real cluster.

use dalp_app::catalog::MIGRATIONS;
use dalp_db::migrate::{self, MigrateError};
use dalp_db::{Component, Migration, MigrationSet, MIGRATOR_ROLE};
use dalp_testkit::{fresh_database, TestDb};

fn total() -> usize {
    MIGRATIONS.iter().map(|s| s.migrations.len()).sum()
}

const V1: Migration = Migration {
    version: 1,
    name: "init",
    sql: "CREATE SCHEMA t_mig; CREATE TABLE t_mig.items (id int PRIMARY KEY);",
};
const V2: Migration = Migration {
    version: 2,
    name: "more",
    sql: "ALTER TABLE t_mig.items ADD COLUMN label text;",
};

async fn recorded(db: &TestDb) -> Vec<(String, i32, String)> {
    db.superuser()
        .await
        .query(
            "SELECT schema_name, version, checksum FROM dalp_meta.schema_migrations ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn applies_everything_once_and_then_nothing() {
    let db = fresh_database().await;
    let mut c = db.connect(MIGRATOR_ROLE).await;
    let first = migrate::migrate(&mut c, &MIGRATIONS, false).await.unwrap();
    assert_eq!(first.applied.len(), total());
    assert_eq!(first.already_applied, 0);
    let second = migrate::migrate(&mut c, &MIGRATIONS, false).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.already_applied, total());
    // Objects belong to the owner role, not to the login role that ran the migration.
    let owner: String = c
        .query_one("SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = 'dalp_identity'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "dalp_owner");
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let db = fresh_database().await;
    let mut c = db.connect(MIGRATOR_ROLE).await;
    let plan = migrate::migrate(&mut c, &MIGRATIONS, true).await.unwrap();
    assert_eq!(plan.applied.len(), total());
    let exists: bool = c
        .query_one("SELECT to_regnamespace('dalp_identity') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "a dry run created a schema");
}

#[tokio::test]
async fn an_edited_applied_migration_is_refused_and_changes_nothing() {
    let db = fresh_database().await;
    let mut c = db.connect(MIGRATOR_ROLE).await;
    let original = [MigrationSet {
        schema: "t_mig",
        migrations: &[V1],
    }];
    migrate::migrate(&mut c, &original, false).await.unwrap();
    let before = recorded(&db).await;

    const EDITED: Migration = Migration {
        version: 1,
        name: "init",
        sql: "CREATE SCHEMA t_mig; CREATE TABLE t_mig.items (id bigint PRIMARY KEY);",
    };
    let tampered = [MigrationSet {
        schema: "t_mig",
        migrations: &[EDITED, V2],
    }];
    let err = migrate::migrate(&mut c, &tampered, false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, MigrateError::Tampered { version: 1, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("t_mig/0001_init was edited after it was applied"),
        "{msg}"
    );
    // V2 was not applied either: nothing changed.
    assert_eq!(recorded(&db).await, before);
    let has_label: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 't_mig' AND column_name = 'label')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!has_label);
}

#[tokio::test]
async fn concurrent_runners_apply_each_migration_exactly_once() {
    let db = fresh_database().await;
    let mut a = db.connect(MIGRATOR_ROLE).await;
    let mut b = db.connect(MIGRATOR_ROLE).await;
    let (ra, rb) = tokio::join!(
        migrate::migrate(&mut a, &MIGRATIONS, false),
        migrate::migrate(&mut b, &MIGRATIONS, false)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.applied.len() + rb.applied.len(),
        total(),
        "{ra:?} {rb:?}"
    );
    assert!(
        ra.applied.is_empty() || rb.applied.is_empty(),
        "runners interleaved: {ra:?} {rb:?}"
    );
    assert_eq!(recorded(&db).await.len(), total());
}

#[tokio::test]
async fn a_failing_migration_rolls_back_alone() {
    let db = fresh_database().await;
    let mut c = db.connect(MIGRATOR_ROLE).await;
    const BROKEN: Migration = Migration {
        version: 2,
        name: "broken",
        sql: "CREATE TABLE t_mig.half (x int); SELECT no_such_function();",
    };
    let sets = [MigrationSet {
        schema: "t_mig",
        migrations: &[V1, BROKEN],
    }];
    let err = migrate::migrate(&mut c, &sets, false).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::Failed { version: 2, .. }),
        "{err}"
    );
    assert_eq!(recorded(&db).await.len(), 1, "only v1 is recorded");
    let half: bool = c
        .query_one("SELECT to_regclass('t_mig.half') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !half,
        "the failed migration's first statement was not rolled back"
    );
}

#[tokio::test]
async fn a_role_outside_the_owner_cannot_migrate() {
    let db = fresh_database().await;
    let mut c = db.connect_as(Component::Readonly).await;
    let err = migrate::migrate(&mut c, &MIGRATIONS, false)
        .await
        .unwrap_err();
    assert!(matches!(err, MigrateError::NotOwner { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("GRANT dalp_owner TO dalp_readonly"),
        "{err}"
    );
}

#[tokio::test]
async fn a_database_ahead_of_the_binary_is_refused() {
    let db = fresh_database().await;
    let mut c = db.connect(MIGRATOR_ROLE).await;
    let newer = [MigrationSet {
        schema: "t_mig",
        migrations: &[V1, V2],
    }];
    migrate::migrate(&mut c, &newer, false).await.unwrap();
    let older = [MigrationSet {
        schema: "t_mig",
        migrations: &[V1],
    }];
    let err = migrate::migrate(&mut c, &older, false).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::Unknown { version: 2, .. }),
        "{err}"
    );
}
