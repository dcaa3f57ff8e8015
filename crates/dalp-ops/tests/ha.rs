//! The local HA cluster with real Patroni + etcd: replica routing with read-your-writes, a
//! stopped replica, a planned switchover, and five leader crashes under a steady writer.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dalp_db::ha::{ExecError, Router, RouterOptions, Served, Session};
use dalp_db::MIGRATOR_ROLE;
use std::path::Path;

use dalp_ops::backup::{RestoredServer, Target};
use dalp_ops::{HaCluster, HaOptions, Pooler, PoolerSpec};
use futures_util::FutureExt;

fn cluster_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("dalp-ha-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Waits for a leader, every replica streaming and a synchronous standby; returns that view.
async fn healthy(c: &HaCluster) -> dalp_ops::ha::ClusterStatus {
    c.wait_healthy(Duration::from_secs(120)).await.unwrap()
}

/// Options for every node except the current leader, as the router's replicas.
async fn replica_options(c: &HaCluster) -> Vec<dalp_db::ConnectOptions> {
    let leader = c.leader().await.unwrap();
    c.nodes()
        .iter()
        .filter(|n| n.name != leader)
        .map(|n| c.node_options(&n.name, MIGRATOR_ROLE).unwrap())
        .collect()
}

/// A replica-safe read of one count, `$1` bound to `n`; the count and where it was served.
async fn count_read(
    router: &Router,
    session: &Session,
    sql: &'static str,
    n: i64,
) -> Result<(i64, Served), ExecError> {
    router
        .read(session, |c| {
            async move {
                let r = c
                    .query_typed(sql, &[(&n, tokio_postgres::types::Type::INT8)])
                    .await?;
                Ok(r[0].get::<_, i64>(0))
            }
            .boxed()
        })
        .await
}

#[derive(Default)]
struct Ledger {
    acked: BTreeSet<i64>,
    unknown: BTreeSet<i64>,
    failed: Vec<(i64, String)>,
    /// (instant, n) of every acknowledgement.
    acks: Vec<(Instant, i64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_cluster_routing_switchover_and_failover_under_load() {
    let dir = cluster_dir();
    let started = Instant::now();
    let cluster = HaCluster::up(dir.path(), HaOptions::default())
        .await
        .unwrap()
        .stop_on_drop(true);
    eprintln!("cluster up in {:?}", started.elapsed());
    let status = cluster.status().await.unwrap();
    assert!(status.leader().is_some() && status.sync_standby().is_some());
    assert!(status.missing.is_empty());

    let migrator = cluster.connect_options(MIGRATOR_ROLE).unwrap();
    let mut setup = migrator.connect().await.unwrap();
    // dalp_meta (with the replica-state function the router reads), as `dalp migrate` makes.
    dalp_db::migrate::migrate(&mut setup, &[], false)
        .await
        .unwrap();
    setup
        .batch_execute(
            "RESET ROLE; CREATE SCHEMA ha_probe;
             CREATE TABLE ha_probe.writes (n bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
             CREATE TABLE ha_probe.ryw (n bigint PRIMARY KEY)",
        )
        .await
        .unwrap();
    // Replication really is synchronous and over TLS.
    let sync: String = setup
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap()
        .get(0);
    // One synchronous standby, named (not quorum commit's `ANY 1 (…)`).
    assert!(
        !sync.is_empty() && !sync.starts_with("ANY"),
        "synchronous_standby_names is `{sync}`"
    );
    drop(setup);
    let su = cluster
        .superuser_options(&cluster.leader().await.unwrap(), "postgres")
        .connect()
        .await
        .unwrap();
    let senders = su
        .query(
            "SELECT r.application_name, r.sync_state, s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(senders.len(), 2, "two replicas stream from the leader");
    assert!(
        senders.iter().all(|r| r.get::<_, bool>(2)),
        "replication must use TLS"
    );
    // Exactly one synchronous standby; the other replica is a potential one.
    assert!(
        senders
            .iter()
            .filter(|r| r.get::<_, String>(1) == "sync")
            .count()
            == 1,
        "sync states: {:?}",
        senders
            .iter()
            .map(|r| r.get::<_, String>(1))
            .collect::<Vec<_>>()
    );
    drop(su);

    // WAL is archived to pgBackRest from the start; a full backup now is the base for the
    // restore after all the failovers below.
    let backups = cluster.backups().unwrap().expect("the cluster archives");
    {
        let b = backups.clone();
        let full = tokio::task::spawn_blocking(move || b.backup("full", 1, &|_| {}))
            .await
            .unwrap()
            .unwrap();
        eprintln!("full backup {} of the HA cluster", full.label);
    }

    // --- Read-your-writes across 1,000 write-then-read pairs. ---
    let router = Router::new(
        &migrator,
        &replica_options(&cluster).await,
        RouterOptions::default(),
    )
    .unwrap();
    router.probe().await;
    let mut session = Session::default();
    let mut on_replica = 0;
    let t = Instant::now();
    for n in 0..1000i64 {
        router
            .write(&mut session, |tx| {
                async move {
                    tx.execute("INSERT INTO ha_probe.ryw (n) VALUES ($1)", &[&n])
                        .await
                }
                .boxed()
            })
            .await
            .unwrap();
        let (seen, served) = count_read(
            &router,
            &session,
            "SELECT count(*) FROM ha_probe.ryw WHERE n = $1",
            n,
        )
        .await
        .unwrap();
        assert_eq!(
            seen, 1,
            "read {n} did not see its own write (served by {served:?})"
        );
        if matches!(served, Served::Replica(_)) {
            on_replica += 1;
        }
    }
    eprintln!(
        "read-your-writes: 1000/1000 pairs consistent, {on_replica} served by replicas, {:?}",
        t.elapsed()
    );
    assert!(
        on_replica > 500,
        "replicas served only {on_replica} of 1000 reads"
    );

    // --- A stopped replica is skipped. ---
    let leader = cluster.leader().await.unwrap();
    let victim = cluster
        .nodes()
        .iter()
        .find(|n| n.name != leader)
        .unwrap()
        .name
        .clone();
    cluster.stop_node(&victim);
    let victim_port = cluster.node_options(&victim, MIGRATOR_ROLE).unwrap().hosts[0].1;
    let victim_name = format!("127.0.0.1:{victim_port}");
    for n in 0..200i64 {
        let (count, served) = count_read(
            &router,
            &session,
            "SELECT count(*) FROM ha_probe.ryw WHERE n <= $1",
            n,
        )
        .await
        .expect("reads keep working with a replica down");
        assert_eq!(count, n + 1);
        assert_ne!(served, Served::Replica(victim_name.clone()));
    }
    let health = router.replica_health();
    let h = health.iter().find(|h| h.name == victim_name).unwrap();
    assert!(!h.up, "the stopped replica must be marked down: {health:?}");
    cluster.start_node(&victim).unwrap();
    healthy(&cluster).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    router.probe().await;
    let health = router.replica_health();
    assert!(
        health.iter().find(|h| h.name == victim_name).unwrap().up,
        "the restarted replica is used again: {health:?}"
    );
    drop(router);

    // --- A planned switchover, with PgBouncer following the leader. ---
    let before = cluster.leader().await.unwrap();
    let users = dalp_ops::pooler::scram_verifiers(
        &cluster.superuser_options(&before, "postgres"),
        &[MIGRATOR_ROLE],
    )
    .await
    .unwrap();
    let pooler = Pooler::start(PoolerSpec {
        dir: dir.path().join("pgbouncer"),
        tls_dir: dir.path().join("tls"),
        server_port: cluster.pg_port(&before).unwrap(),
        // The leader moves between nodes: TCP, and two processes that must both follow.
        server_socket_dir: None,
        processes: 2,
        port: None,
        pool_size: 5,
        max_client_conn: 50,
        users,
    })
    .await
    .unwrap();
    let via = pooler.client_options(&migrator);
    let primary_port = |c: tokio_postgres::Client| async move {
        let r = c
            .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
            .await?;
        Ok::<_, tokio_postgres::Error>((r.get::<_, i32>(0) as u16, r.get::<_, bool>(1)))
    };
    assert_eq!(
        primary_port(via.connect().await.unwrap()).await.unwrap(),
        (cluster.pg_port(&before).unwrap(), false)
    );
    let after = {
        let follow = pooler.follow_leader(&cluster, Duration::from_millis(500));
        tokio::pin!(follow);
        tokio::select! {
            _ = &mut follow => unreachable!("follow_leader never returns"),
            after = async {
                let after = cluster.switchover(None).await.unwrap();
                healthy(&cluster).await;
                // Through the pooler, sessions reach the new primary.
                let want = (cluster.pg_port(&after).unwrap(), false);
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let seen = match via.connect().await {
                        Ok(c) => primary_port(c).await.ok(),
                        Err(_) => None,
                    };
                    if seen == Some(want) {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the pooler still serves {seen:?}, want {want:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                after
            } => after,
        }
    };
    assert_ne!(before, after);
    drop(pooler);
    let e = cluster.switchover(Some("node9")).await.unwrap_err();
    assert!(e.to_string().contains("node9"), "{e}");

    // --- Five leader crashes under a steady writer. ---
    let writer_router = Router::new(&migrator, &[], RouterOptions::default()).unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let ledger = ledger.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut session = Session::default();
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let r = writer_router
                    .write(&mut session, |tx| {
                        async move {
                            tx.execute(
                                "INSERT INTO ha_probe.writes (n) VALUES ($1) ON CONFLICT DO NOTHING",
                                &[&n],
                            )
                            .await
                        }
                        .boxed()
                    })
                    .await;
                {
                    let mut l = ledger.lock().unwrap();
                    match r {
                        Ok(_) => {
                            l.acked.insert(n);
                            l.acks.push((Instant::now(), n));
                        }
                        Err(ExecError::CommitUnknown(_)) => {
                            l.unknown.insert(n);
                        }
                        Err(e) => l.failed.push((n, e.to_string())),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let ttl = cluster.ttl();
    let mut windows = Vec::new();
    for kill in 1..=5 {
        healthy(&cluster).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The leader as a healthy view names it right now (a restarted node can be listed
        // from the DCS a moment before its PostgreSQL runs again).
        let leader = healthy(&cluster).await.leader().unwrap().name.clone();
        let (acked_before, last_acked) = {
            let l = ledger.lock().unwrap();
            (l.acks.len(), l.acks.last().map(|a| a.1).unwrap_or(0))
        };
        assert!(acked_before > 0);
        let killed_at = Instant::now();
        cluster.kill_node(&leader);
        // Writes resume once a new leader is promoted: the first acknowledgement of an id
        // written after the kill (the one write in flight may still be acknowledged by the
        // killed server).
        let resumed = loop {
            if let Some((at, _)) = ledger
                .lock()
                .unwrap()
                .acks
                .iter()
                .find(|(at, n)| *at > killed_at && *n > last_acked + 1)
            {
                break *at;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(90),
                "no write acknowledged 90 s after killing {leader}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let window = resumed - killed_at;
        let last_before = ledger.lock().unwrap().acks[acked_before - 1].0;
        eprintln!(
            "kill {kill}: leader {leader} killed; writes unavailable for {:.2} s (last ack {:.2} s before the kill); new leader {}",
            window.as_secs_f64(),
            (killed_at - last_before).as_secs_f64(),
            cluster.leader().await.map(|l| l.to_string()).unwrap_or_default()
        );
        windows.push(window);
        // The crashed node rejoins (pg_rewind) before the next round.
        cluster.start_node(&leader).unwrap();
    }
    healthy(&cluster).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let check = migrator.connect().await.unwrap();
    let present: BTreeSet<i64> = check
        .query("SELECT n FROM ha_probe.writes", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let l = std::mem::take(&mut *ledger.lock().unwrap());
    let lost: Vec<&i64> = l.acked.difference(&present).collect();
    let unknown_landed = l.unknown.intersection(&present).count();
    eprintln!(
        "writes: {} acknowledged, {} unknown outcome ({} of them landed), {} failed; acknowledged but missing: {}",
        l.acked.len(),
        l.unknown.len(),
        unknown_landed,
        l.failed.len(),
        lost.len()
    );
    eprintln!(
        "unavailability windows (s): {:?}; goal ttl + 2 s = {} s",
        windows
            .iter()
            .map(|w| format!("{:.2}", w.as_secs_f64()))
            .collect::<Vec<_>>(),
        ttl.as_secs() + 2
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // Archiving continued across every leader change: the archive restores to the end
    // with every acknowledged write, one continuous history of timelines.
    let into = dir.path().join("restored");
    let restored_rows = {
        let (b, target_dir) = (backups.clone(), into.clone());
        tokio::task::spawn_blocking(move || {
            b.check()?;
            b.restore(&Target::Latest, &target_dir, 1, &|_| {})
        })
        .await
        .unwrap()
        .unwrap();
        let copy = RestoredServer::start(
            &into,
            Path::new(dalp_ops::embedded::DEFAULT_PG_BIN),
            false,
            Duration::from_secs(300),
        )
        .await
        .unwrap();
        let recovered = copy.recovered().await.unwrap();
        eprintln!("restored from the archive after the failovers: {recovered:?}");
        assert!(recovered.timeline >= 7, "{recovered:?}");
        let c = copy.superuser_options("dalp").connect().await.unwrap();
        let rows: BTreeSet<i64> = c
            .query("SELECT n FROM ha_probe.writes", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        rows
    };
    let missing: Vec<&i64> = l.acked.difference(&restored_rows).collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing from the archive: {missing:?}"
    );
    assert!(
        l.failed.is_empty(),
        "writes failed outright: {:?}",
        l.failed
    );
    // Generous bound: a failover that takes far longer than the lock ttl is broken.
    for w in &windows {
        assert!(
            *w < ttl + Duration::from_secs(15),
            "write outage {w:?} is far above ttl {ttl:?}"
        );
    }
}

#[test]
fn refuses_unsafe_timings_and_reports_a_missing_cluster() {
    let e = HaOptions {
        ttl: 10,
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("minimum of 20"), "{e}");
    let e = HaOptions {
        ttl: 20,
        loop_wait: 10,
        retry_timeout: 10,
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("must not exceed ttl"), "{e}");
    let dir = cluster_dir();
    let e = HaCluster::open(dir.path()).err().unwrap();
    assert!(e.to_string().contains("dalp cluster up"), "{e}");
}
