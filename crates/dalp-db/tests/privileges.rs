//! The role × schema × privilege matrix produced by the real migrations.

use dalp_app::catalog::{ACCESS, MIGRATIONS};
use dalp_db::{access, migrate, Component, MIGRATOR_ROLE};
use dalp_testkit::migrated_database;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn migrated_database_matches_the_declared_matrix() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let c = db.connect(MIGRATOR_ROLE).await;
    let report = access::check(&c, &ACCESS).await.unwrap();
    assert!(
        report.is_clean(),
        "drift: {:#?}\n{}",
        report.drift,
        report.render()
    );
    // Spot-check the rendered matrix says what the declaration says.
    assert_eq!(
        report
            .cell("dalp_indexer_svc", "dalp_identity")
            .unwrap()
            .summary(),
        "-"
    );
    let writer = report.cell("dalp_identity_svc", "dalp_audit").unwrap();
    assert_eq!(writer.tables["events"], "a");
    assert_eq!(writer.tables["seal_batches"], "-");
    let sealer = report.cell("dalp_audit_sealer", "dalp_audit").unwrap();
    assert_eq!(sealer.tables["seal_batches"], "ar");
    assert_eq!(sealer.tables["events"], "r");
    assert_eq!(
        report.cell("dalp_auditor", "dalp_audit").unwrap().summary(),
        "U:r"
    );
    assert_eq!(
        report
            .cell("dalp_readonly", "dalp_identity")
            .unwrap()
            .summary(),
        "U:mixed"
    );
    let status = migrate::status(&c, &MIGRATIONS).await.unwrap();
    assert!(status.iter().all(|s| s.is_current()), "{status:?}");
}

#[tokio::test]
async fn a_manual_grant_is_reported_as_drift() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let su = db.superuser().await;
    su.batch_execute("GRANT SELECT ON dalp_identity.users TO dalp_indexer_svc")
        .await
        .unwrap();
    let c = db.connect(MIGRATOR_ROLE).await;
    let report = access::check(&c, &ACCESS).await.unwrap();
    assert!(
        report
            .drift
            .iter()
            .any(|d| d.contains("dalp_indexer_svc on dalp_identity.users: has r, declared -")),
        "{:#?}",
        report.drift
    );
    // A grant to PUBLIC reaches every role and is caught too.
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    db.superuser()
        .await
        .batch_execute("GRANT USAGE ON SCHEMA dalp_identity TO PUBLIC")
        .await
        .unwrap();
    let report = access::check(&db.connect(MIGRATOR_ROLE).await, &ACCESS)
        .await
        .unwrap();
    assert!(
        report
            .drift
            .iter()
            .any(|d| d.contains("dalp_indexer_svc USAGE on schema dalp_identity")),
        "{:#?}",
        report.drift
    );
}

#[tokio::test]
async fn indexer_cannot_read_identity_and_auditor_cannot_change_audit() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let indexer = db.connect_as(Component::Indexer).await;
    let err = indexer
        .query("SELECT * FROM dalp_identity.users", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");

    let identity = db.connect_as(Component::Identity).await;
    identity
        .execute(
            "INSERT INTO dalp_audit.events (actor, action, resource_type, outcome) VALUES ('t', 'test', 'x', 'success')",
            &[],
        )
        .await
        .unwrap();
    for sql in [
        "UPDATE dalp_audit.events SET actor = 'x'",
        "DELETE FROM dalp_audit.events",
        "TRUNCATE dalp_audit.events",
    ] {
        for who in [Component::Auditor, Component::Identity] {
            let c = db.connect_as(who).await;
            let err = c.batch_execute(sql).await.unwrap_err();
            assert_eq!(
                err.code(),
                Some(&SqlState::INSUFFICIENT_PRIVILEGE),
                "{who} {sql}: {err}"
            );
        }
    }
    // Even the owner is stopped by the append-only trigger.
    let mut owner = db.connect(MIGRATOR_ROLE).await;
    let tx = owner.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL ROLE dalp_owner").await.unwrap();
    let err = tx
        .batch_execute("DELETE FROM dalp_audit.events")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("append-only") || format!("{err:?}").contains("append-only"),
        "{err:?}"
    );
    drop(tx);
    let auditor = db.connect_as(Component::Auditor).await;
    let n: i64 = auditor
        .query_one("SELECT count(*) FROM dalp_audit.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn no_component_may_create_in_public_or_connect_without_tls() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    for c in Component::ALL {
        let client = db.connect_as(c).await;
        let err = client
            .batch_execute("CREATE TABLE public.sneaky (x int)")
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{c}: {err}"
        );
    }
    // Plain TCP without TLS is refused by pg_hba.conf.
    let mut cfg = db.options("dalp_readonly").pg_config();
    cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let Err(err) = cfg.connect(tokio_postgres::NoTls).await else {
        panic!("a connection without TLS was accepted");
    };
    let text = format!("{err:?}");
    assert!(
        text.contains("no encryption") || text.contains("pg_hba"),
        "{text}"
    );
}

/// Every component role tries every table privilege it is not declared to have, on every
/// table of every dalp schema, and is refused each time (in a transaction rolled back, so
/// a privilege that slipped through would still change nothing).
#[tokio::test]
async fn every_undeclared_privilege_is_refused_in_practice() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let owner = db.connect(MIGRATOR_ROLE).await;
    let mut schemas: Vec<&access::SchemaAccess> = ACCESS.iter().collect();
    schemas.push(&access::META_ACCESS);
    // (schema, table, first column)
    let tables: Vec<(String, String, String)> = owner
        .query(
            "SELECT n.nspname::text, c.relname::text,
                    (SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped AND attidentity = '' AND attgenerated = '' ORDER BY attnum LIMIT 1)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname LIKE 'dalp\\_%' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
              ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(tables.len() > 30);
    let mut tried = 0;
    let mut slipped = Vec::new();
    for component in Component::ALL {
        let mut c = db.connect_as(component).await;
        for (schema, table, col) in &tables {
            let Some(decl) = schemas.iter().find(|s| s.schema == schema) else {
                continue;
            };
            let (_, have) = decl.expected(component.role(), table);
            let t = format!("{schema}.{table}");
            for (privilege, sql) in [
                (access::Privs::SELECT, format!("SELECT 1 FROM {t} LIMIT 0")),
                (
                    access::Privs::INSERT,
                    format!("INSERT INTO {t} DEFAULT VALUES"),
                ),
                (
                    access::Privs::UPDATE,
                    format!("UPDATE {t} SET {col} = {col} WHERE false"),
                ),
                (
                    access::Privs::DELETE,
                    format!("DELETE FROM {t} WHERE false"),
                ),
                (access::Privs::TRUNCATE, format!("TRUNCATE {t}")),
            ] {
                if have.contains(privilege) {
                    continue;
                }
                tried += 1;
                let tx = c.transaction().await.unwrap();
                match tx.batch_execute(&sql).await {
                    Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
                    other => slipped.push(format!("{} {sql}: {other:?}", component.role())),
                }
                drop(tx);
            }
        }
    }
    assert!(tried > 1000, "only {tried} attempts");
    assert!(slipped.is_empty(), "not refused: {slipped:#?}");
}
