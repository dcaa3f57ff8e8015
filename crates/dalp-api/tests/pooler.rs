//! PgBouncer (real, transaction mode, TLS + SCRAM on both sides) in front of the test
//! cluster: many clients on few server connections, and pooler-safe statements.

use std::collections::BTreeSet;
use std::sync::Arc;

use dalp_db::{Component, TypedClient};
use dalp_testkit::{cluster, migrated_database, pooler};
use tokio::sync::Barrier;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_twenty_server_connections() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let direct = db.options(Component::Workflows.role());
    let via = pooler().client_options(&direct);
    const CLIENTS: usize = 500;
    // All 500 connect first (PostgreSQL itself allows only 200), then all work at once.
    let connected = Arc::new(Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let via = via.clone();
        let connected = connected.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = via
                .connect()
                .await
                .map_err(|e| format!("client {i}: {e}"))?;
            connected.wait().await;
            let mut pids = BTreeSet::new();
            for round in 0..4i64 {
                // Outside a transaction: one unnamed statement, any server connection.
                let row = client
                    .typed_query_one("SELECT pg_backend_pid(), $1::bigint + 1", &[&round])
                    .await
                    .map_err(|e| format!("client {i}: {e}"))?;
                assert_eq!(row.get::<_, i64>(1), round + 1);
                pids.insert(row.get::<_, i32>(0));
                // Inside a transaction: pinned to one server connection until COMMIT.
                let tx = client.transaction().await.map_err(|e| e.to_string())?;
                let a: i32 = tx
                    .typed_query_one("SELECT pg_backend_pid()", &[])
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
                let b: i32 = tx
                    .query_one("SELECT pg_backend_pid()", &[])
                    .await
                    .map_err(|e| e.to_string())?
                    .get(0);
                assert_eq!(a, b, "a transaction moved between server connections");
                tx.commit().await.map_err(|e| e.to_string())?;
                pids.insert(a);
            }
            Ok::<_, String>(pids)
        }));
    }
    let mut all = BTreeSet::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(p) => all.extend(p),
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "{} clients failed, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    eprintln!(
        "{CLIENTS} clients were served by {} server connections",
        all.len()
    );
    assert!(
        all.len() <= 20,
        "{} server connections for one role",
        all.len()
    );

    // On the server: at most 20 connections of that role on this database.
    let su = db.superuser().await;
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND datname = $2",
            &[&Component::Workflows.role(), &db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n <= 20, "{n} server connections");
    // The pooler sits beside the server: its server connections come over the Unix socket
    // (no client address); two PgBouncer processes share the port.
    let (over_socket, over_tcp): (i64, i64) = {
        let r = su
            .query_one(
                "SELECT count(*) FILTER (WHERE client_addr IS NULL), count(*) FILTER (WHERE client_addr IS NOT NULL)
                   FROM pg_stat_activity WHERE usename = $1 AND datname = $2",
                &[&Component::Workflows.role(), &db.name],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        over_socket > 0 && over_tcp == 0,
        "socket {over_socket}, tcp {over_tcp}"
    );
    assert_eq!(pooler().pids().len(), 2);
}

#[tokio::test]
async fn the_pooler_refuses_plaintext_and_wrong_passwords_and_serves_tls() {
    let db = migrated_database(&dalp_app::catalog::MIGRATIONS).await;
    let direct = db.options(Component::Identity.role());
    let via = pooler().client_options(&direct);
    let url = via.to_url();
    let psql = |url: &str| {
        std::process::Command::new("psql")
            .args([url, "-X", "-At", "-c", "select current_user"])
            .output()
            .unwrap()
    };
    let ok = psql(&url);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "dalp_identity_svc"
    );
    let plain = psql(&url.replace("sslmode=verify-full", "sslmode=disable"));
    assert!(
        !plain.status.success(),
        "plaintext through the pooler must be refused"
    );
    let mut wrong = via.clone();
    wrong.password = Some("not-the-password".into());
    let Err(e) = wrong.connect().await else {
        panic!("a wrong password must fail")
    };
    assert!(
        e.to_string().contains("password") || e.to_string().contains("auth"),
        "{e}"
    );
    // The superuser has no entry in the pooler's auth file.
    let mut su = via.clone();
    su.user = "postgres".into();
    assert!(su.connect().await.is_err());
    let _ = cluster();
}
