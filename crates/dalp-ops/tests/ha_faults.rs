//! Faults on the local Patroni cluster, each under write load and judged by the history
//! checker (`history/`): every acknowledged id on every member, nothing twice, never two
//! primaries acknowledging at once, and the cluster heals by itself.
//!
//! `zombie_leader_*` runs once here; `DALP_SOAK_ROUNDS=20 cargo test --release -p dalp-ops
//! --test ha_faults -- --ignored zombie_soak --nocapture` is the soak (docs/benchmarks.md).

// The history checker, shared with the multi-host tests (dalp-testkit cannot be a
// dependency of dalp-ops, which it depends on).
#[path = "../../dalp-testkit/src/history.rs"]
#[allow(dead_code)] // the reader sessions are the multi-host soak's
mod history;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dalp_db::MIGRATOR_ROLE;
use dalp_ops::{HaCluster, HaOptions};
use history::{History, Writer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn cluster_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("dalp-haf-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

async fn healthy(c: &HaCluster, within: Duration) {
    c.wait_healthy(within).await.unwrap();
}

/// A three-node cluster without archiving (stopped when dropped), once healthy.
async fn started_cluster() -> (tempfile::TempDir, HaCluster) {
    let dir = cluster_dir();
    let cluster = HaCluster::up(
        dir.path(),
        HaOptions {
            archive: false,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .stop_on_drop(true);
    healthy(&cluster, Duration::from_secs(120)).await;
    (dir, cluster)
}

/// The history table, created through the primary; returns the migrator's options.
async fn history_table(cluster: &HaCluster) -> dalp_db::ConnectOptions {
    let migrator = cluster.connect_options(MIGRATOR_ROLE).unwrap();
    migrator
        .connect()
        .await
        .unwrap()
        .batch_execute(history::SETUP_SQL)
        .await
        .unwrap();
    migrator
}

/// Every member, reached as the superuser on its socket whatever its role.
fn members(cluster: &HaCluster) -> Vec<(String, dalp_db::ConnectOptions)> {
    cluster
        .nodes()
        .iter()
        .map(|n| (n.name.clone(), cluster.superuser_options(&n.name, "dalp")))
        .collect()
}

/// Resumes a stopped process when dropped, so a failing test never leaves it frozen.
struct Frozen(i32);
impl Frozen {
    fn stop(pid: i32) -> Frozen {
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
        Frozen(pid)
    }
}
impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// Figures of one zombie round.
#[derive(Debug)]
struct ZombieRound {
    promoted: String,
    /// Longest gap between acknowledgements to any writer (the Patroni-aware one moves to
    /// the promoted node as soon as it leads).
    unavailable: Duration,
    /// The same for the writer that only knows the host list (`target_session_attrs`): it
    /// keeps reaching the frozen leader's PostgreSQL until Patroni resumes and demotes it.
    unaware_unavailable: Duration,
    healed: Duration,
    verdict: history::Verdict,
}

/// Freezes the leader's Patroni past ttl (its PostgreSQL keeps running and accepting
/// connections), lets the synchronous standby be promoted and take writes, then resumes the
/// old Patroni. Two writers: one that knows nothing of Patroni (every host, read-write), one
/// pointed at the promoted node as soon as it leads.
async fn zombie_round(cluster: &HaCluster) -> ZombieRound {
    healthy(cluster, Duration::from_secs(120)).await;
    let status = cluster.status().await.unwrap();
    let old = status.leader().unwrap().name.clone();
    let replicas: Vec<String> = status.sync_standbys().map(|m| m.name.clone()).collect();
    assert!(!replicas.is_empty(), "no synchronous standby: {status:?}");
    let migrator = history_table(cluster).await;
    let ids = Arc::new(AtomicI64::new(1));
    let hist = Arc::new(Mutex::new(History::default()));
    let (pause, limit) = (Duration::from_millis(20), Duration::from_secs(3));
    let plain = Writer::spawn(
        "unaware",
        migrator.clone(),
        ids.clone(),
        hist.clone(),
        pause,
        limit,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !hist.lock().unwrap().acks.is_empty(),
        "no write before the fault"
    );

    let frozen_at = Instant::now();
    let frozen = Frozen::stop(cluster.patroni_pid(&old).expect("leader's Patroni runs"));
    // The synchronous standby is promoted once the frozen leader's key expires.
    let deadline = Instant::now() + cluster.ttl() * 4;
    let (standby, promoted) = 'promoted: loop {
        for name in &replicas {
            let options = cluster.node_options(name, MIGRATOR_ROLE).unwrap();
            let primary = match options.connect().await {
                Ok(c) => c
                    .query_one("SELECT NOT pg_is_in_recovery()", &[])
                    .await
                    .map(|r| r.get::<_, bool>(0))
                    .unwrap_or(false),
                Err(_) => false,
            };
            if primary {
                break 'promoted (name.clone(), options);
            }
        }
        assert!(
            Instant::now() < deadline,
            "none of {replicas:?} was promoted while {old}'s Patroni was frozen"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let aware = Writer::spawn("aware", promoted, ids.clone(), hist.clone(), pause, limit);
    // (After the aware writer started, so the probes' deadlines do not delay it.)
    // Status tells the truth meanwhile: the frozen leader's PostgreSQL still runs as a
    // primary that is no longer the leader.
    let report = cluster.inspect().await;
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.starts_with(&format!("{old}: runs as a primary but is not the leader"))),
        "{:?}",
        report.problems
    );
    // Writes on the promoted primary for a while (the bug took the key back right away).
    let promoted_at = Instant::now();
    while hist.lock().unwrap().first_ack_after(promoted_at).is_none() {
        assert!(
            promoted_at.elapsed() < Duration::from_secs(60),
            "the promoted primary acknowledged nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(frozen); // SIGCONT: the zombie resumes
    let resumed = Instant::now();
    // It must step down and rejoin; the writers keep going meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    healthy(cluster, Duration::from_secs(180)).await;
    let healed = resumed.elapsed();
    let (unavailable, unaware_unavailable) = {
        let h = hist.lock().unwrap();
        let now = Instant::now();
        (
            h.longest_gap(frozen_at, now, None),
            h.longest_gap(frozen_at, now, Some("unaware")),
        )
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    aware.stop().await;
    plain.stop().await;

    let h = std::mem::take(&mut *hist.lock().unwrap());
    let verdict = history::check(&h, &members(cluster), Duration::from_secs(30)).await;
    let leader = cluster.leader().await.unwrap();
    // Clean slate for the next round.
    migrator
        .connect()
        .await
        .unwrap()
        .batch_execute("TRUNCATE ha_history.writes")
        .await
        .unwrap();
    eprintln!(
        "zombie: {old} frozen, {standby} promoted; writes unavailable {:.2} s (Patroni-unaware client {:.2} s); healed {:.1} s after resume; leader now {leader}; {verdict:?}",
        unavailable.as_secs_f64(),
        unaware_unavailable.as_secs_f64(),
        healed.as_secs_f64()
    );
    assert_eq!(
        leader, standby,
        "the resumed old leader took the leader key back"
    );
    ZombieRound {
        promoted: standby,
        unavailable,
        unaware_unavailable,
        healed,
        verdict,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_leader_resumed_after_failover_loses_no_acknowledged_write() {
    let (_dir, cluster) = started_cluster().await;
    let round = zombie_round(&cluster).await;
    round.verdict.assert_clean();
    assert!(round.verdict.acked > 0 && !round.promoted.is_empty());
    assert!(
        round.unavailable < cluster.ttl() + Duration::from_secs(15),
        "write outage {:?}",
        round.unavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: DALP_SOAK_ROUNDS rounds of the zombie fault (a minute each)"]
async fn zombie_soak() {
    let rounds: usize = std::env::var("DALP_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (_dir, cluster) = started_cluster().await;
    let mut results = Vec::new();
    for i in 1..=rounds {
        let r = zombie_round(&cluster).await;
        eprintln!("round {i}/{rounds}: {r:?}");
        r.verdict.assert_clean();
        results.push(r);
    }
    let secs = |f: fn(&ZombieRound) -> Duration| {
        let mut v: Vec<f64> = results.iter().map(|r| f(r).as_secs_f64()).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let acked: usize = results.iter().map(|r| r.verdict.acked).sum();
    let unknown: usize = results.iter().map(|r| r.verdict.unknown).sum();
    let landed: usize = results.iter().map(|r| r.verdict.unknown_landed).sum();
    let failed: usize = results.iter().map(|r| r.verdict.failed).sum();
    eprintln!(
        "zombie soak: {rounds} rounds, {acked} acknowledged, 0 lost, {unknown} unknown ({landed} landed), {failed} failed before COMMIT; unavailable min/median/max {:?} s (Patroni-unaware client {:?} s); healed after resume {:?} s",
        secs(|r| r.unavailable),
        secs(|r| r.unaware_unavailable),
        secs(|r| r.healed)
    );
}

/// etcd (the DCS) killed under load: with failsafe mode the primary keeps taking writes while
/// every member still answers its REST API; etcd then comes back with its data lost, and the
/// cluster re-creates its keys and heals without anyone stepping in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_etcd_and_its_data_keeps_writes_going_and_heals() {
    let (_dir, cluster) = started_cluster().await;
    healthy(&cluster, Duration::from_secs(120)).await;
    let leader = cluster.leader().await.unwrap();
    let migrator = history_table(&cluster).await;
    let ids = Arc::new(AtomicI64::new(1));
    let hist = Arc::new(Mutex::new(History::default()));
    let writer = Writer::spawn(
        "unaware",
        migrator.clone(),
        ids,
        hist.clone(),
        Duration::from_millis(20),
        Duration::from_secs(3),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let etcd = cluster.etcd_pid().expect("etcd runs");
    kill(Pid::from_raw(etcd), Signal::SIGKILL).unwrap();
    let down_at = Instant::now();
    // Twice the leader key's ttl without a DCS: a primary without failsafe mode demotes
    // itself within ttl.
    let outage = cluster.ttl() * 2;
    while down_at.elapsed() < outage {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let gap = hist
        .lock()
        .unwrap()
        .longest_gap(down_at, Instant::now(), None);
    let acked_during = hist
        .lock()
        .unwrap()
        .acks
        .iter()
        .filter(|a| a.0 > down_at)
        .count();
    eprintln!(
        "etcd down {:.0} s: {acked_during} writes acknowledged meanwhile, longest gap {:.2} s",
        outage.as_secs_f64(),
        gap.as_secs_f64()
    );
    assert!(acked_during > 0, "writes stopped while etcd was down");
    assert!(
        gap < cluster.ttl() / 2,
        "writes stalled {gap:?} while etcd was down (failsafe mode should keep the primary)"
    );
    // etcd returns with nothing: the cluster re-creates its keys and heals by itself.
    cluster.restart_etcd(true).await.unwrap();
    let back = Instant::now();
    healthy(&cluster, Duration::from_secs(180)).await;
    // Healed in etcd itself, not only in Patroni's cached view: the leader key is back.
    let deadline = Instant::now() + Duration::from_secs(120);
    let dcs_leader = loop {
        if let Ok(Some(l)) = cluster.dcs_leader().await {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no leader key in etcd after it came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    healthy(&cluster, Duration::from_secs(180)).await;
    assert_eq!(dcs_leader, cluster.leader().await.unwrap());
    eprintln!(
        "etcd back with its data lost: leader key re-created after {:.1} s, leader {dcs_leader}",
        back.elapsed().as_secs_f64(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    writer.stop().await;
    let h = std::mem::take(&mut *hist.lock().unwrap());
    let verdict = history::check(&h, &members(&cluster), Duration::from_secs(30)).await;
    eprintln!("etcd loss: leader before {leader}; {verdict:?}");
    verdict.assert_clean();
}

/// `inspect` (behind `dalp cluster status`) names what Patroni's own view hides: a leader
/// whose postmaster takes no new connection, a member whose Patroni is stalled, etcd down —
/// and still answers while etcd is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_a_frozen_postmaster_a_stalled_patroni_and_a_dead_etcd() {
    let (_dir, cluster) = started_cluster().await;
    healthy(&cluster, Duration::from_secs(120)).await;
    let report = cluster.inspect().await;
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let leader = cluster.leader().await.unwrap();
    let replica = cluster
        .nodes()
        .iter()
        .find(|n| n.name != leader)
        .unwrap()
        .name
        .clone();

    // A frozen postmaster: Patroni still calls the node healthy.
    {
        let _frozen = Frozen::stop(cluster.postmaster_pid(&leader).unwrap());
        let report = cluster.inspect().await;
        let patroni_view = report
            .status
            .as_ref()
            .and_then(|s| s.leader())
            .map(|m| m.name.clone());
        assert_eq!(
            patroni_view.as_deref(),
            Some(leader.as_str()),
            "Patroni's view"
        );
        assert!(
            report.problems.iter().any(|p| p.starts_with(&format!(
                "{leader}: the leader's PostgreSQL takes no new connection"
            ))),
            "{:?}",
            report.problems
        );
    }
    // A stalled Patroni on a replica.
    {
        let _frozen = Frozen::stop(cluster.patroni_pid(&replica).unwrap());
        let report = cluster.inspect().await;
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.starts_with(&format!("{replica}: Patroni does not answer"))),
            "{:?}",
            report.problems
        );
    }
    // etcd down: every node still answers for itself.
    kill(Pid::from_raw(cluster.etcd_pid().unwrap()), Signal::SIGKILL).unwrap();
    let report = cluster.inspect().await;
    assert!(!report.etcd_up);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.starts_with("etcd does not answer")),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .nodes
            .iter()
            .all(|n| n.patroni.is_some() && n.postgres.is_ok()),
        "{:?}",
        report.nodes
    );
    // The one stopped piece is started again, the running ones left alone (`dalp cluster heal`).
    assert_eq!(
        cluster.start_missing().await.unwrap(),
        vec!["etcd".to_string()]
    );
    assert!(cluster.start_missing().await.unwrap().is_empty());
    healthy(&cluster, Duration::from_secs(120)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = cluster.inspect().await;
        if report.problems.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still: {:?}", report.problems);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
