//! A cluster over three hosts (network namespaces on a test bridge), made the way an operator
//! makes one: `dalp cluster init --spec`, then `dalp node up --bundle` inside each host. Each
//! fault runs under write load judged by the history checker (every acknowledged id on every
//! member, nothing twice, never two primaries acknowledging at once), and the cluster must
//! heal: by itself, or by `dalp node up` on the host that lost a piece.
//!
//! The reduced schedule runs here (CI); `DALP_HOST_FAULT_ROUNDS=N cargo test --release -p
//! dalp-cli --test ha_hosts -- --ignored host_fault_soak --nocapture` repeats the full one
//! (docs/benchmarks.md).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{text, DALP};
use dalp_db::MIGRATOR_ROLE;
use dalp_ops::HaCluster;
use dalp_testkit::history::{self, History, Writer};
use dalp_testkit::netns::TestNet;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The database hosts (etcd and PostgreSQL on each).
const HOSTS: [&str; 3] = ["db1", "db2", "db3"];
/// The backup repository host (pgBackRest's TLS server).
const REPO: &str = "repo";
const ALL: [&str; 4] = ["db1", "db2", "db3", REPO];
/// A namespace with no piece of the cluster until `dalp cluster add-host` adds it.
const SPARE: &str = "db4";

/// The hosts, the cluster's operator directory and each host's bundle. Dropping it stops
/// every process by the pids in the bundles, then removes the namespaces and the bridge.
struct Hosts {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    net: TestNet,
    /// Also run a reader session through the replicas in each round (the soak).
    readers: bool,
}

impl Hosts {
    fn bundle(&self, host: &str) -> PathBuf {
        self.dir.join("hosts").join(host)
    }

    /// The operator's view (runs nothing; reaches every host over the bridge).
    fn operator(&self) -> HaCluster {
        HaCluster::open(&self.dir).unwrap()
    }

    /// This host's own directory (its pids: faults and restarts).
    fn local(&self, host: &str) -> HaCluster {
        HaCluster::open(&self.bundle(host)).unwrap()
    }

    /// `dalp node up` inside `host`, as a child process (several run at once).
    fn spawn_node_up(&self, host: &str) -> std::process::Child {
        self.net
            .command(host, Path::new(DALP))
            .args(["node", "up", "--bundle"])
            .arg(self.bundle(host))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn node_up(&self, hosts: &[&str]) {
        let started = Instant::now();
        let children: Vec<_> = hosts.iter().map(|h| self.spawn_node_up(h)).collect();
        for (h, c) in hosts.iter().zip(children) {
            let out: Output = c.wait_with_output().unwrap();
            assert!(out.status.success(), "node up on {h}: {}", text(&out));
            eprint!("{h}: {}", String::from_utf8_lossy(&out.stdout));
        }
        if started.elapsed() > Duration::from_secs(30) {
            // Slow: say what each node did meanwhile.
            self.show_patroni_logs(hosts.iter().filter(|h| **h != REPO).copied());
        }
    }

    /// Prints the last 40 lines of each named node's Patroni log, without the idle loop's
    /// "no action" lines.
    fn show_patroni_logs<'a>(&self, nodes: impl Iterator<Item = &'a str>) {
        for h in nodes {
            let log = self.bundle(h).join(h).join("patroni.log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.contains("no action")).collect();
            eprintln!(
                "--- {} ---\n{}",
                log.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in ALL.iter().chain([&SPARE]) {
            if let Ok(c) = HaCluster::open(&self.bundle(h)) {
                for m in c.etcd_members().to_vec() {
                    if let Some(pid) = c.etcd_member_pid(&m.name) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                    }
                }
                if let Some(pid) = c.patroni_pid(h) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                }
                c.down();
            }
        }
    }
}

/// The spec: etcd and PostgreSQL on each database host, the repository on its own; each
/// host's bundle stays where `cluster init` wrote it (`dir`).
fn spec(net: &TestNet, cluster_dir: &Path) -> String {
    let mut s = format!(
        "clients = [\"{}\"]\n[timings]\nttl = 20\nloop_wait = 2\nretry_timeout = 5\n",
        net.subnet()
    );
    for h in net.hosts.iter().filter(|h| h.name != SPARE) {
        let roles = if h.name == REPO {
            "[\"repository\"]"
        } else {
            "[\"etcd\", \"postgres\"]"
        };
        s.push_str(&format!(
            "[[host]]\nname = \"{}\"\naddress = \"{}\"\nroles = {roles}\ndir = \"{}\"\n",
            h.name,
            h.address,
            cluster_dir.join("hosts").join(&h.name).display()
        ));
    }
    s
}

/// `dalp cluster init --spec SPEC --dir DIR`.
fn cluster_init(spec: &Path, dir: &Path) -> Output {
    common::dalp(&[
        "cluster",
        "init",
        "--spec",
        spec.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
    ])
}

/// Three hosts with the cluster running on them, healthy.
async fn three_hosts() -> Hosts {
    assert!(
        TestNet::available(),
        "multi-host tests need root and iproute2 (scripts/deps.sh)"
    );
    let net = TestNet::create(&[ALL[0], ALL[1], ALL[2], ALL[3], SPARE]).unwrap();
    let tmp = dalp_testkit::server_dir("dalp-hosts-");
    let spec_path = tmp.path().join("cluster.toml");
    let dir = tmp.path().join("cluster");
    std::fs::write(&spec_path, spec(&net, &dir)).unwrap();
    let out = cluster_init(&spec_path, &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("dalp node up --bundle"),
        "{}",
        text(&out)
    );
    let hosts = Hosts {
        _tmp: tmp,
        dir,
        net,
        readers: false,
    };
    let started = Instant::now();
    hosts.node_up(&ALL);
    hosts
        .operator()
        .wait_healthy(Duration::from_secs(120))
        .await
        .unwrap();
    eprintln!(
        "three hosts up and healthy in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    hosts
}

/// One line per round, as in docs/benchmarks.md: fault, write outage, time to healthy,
/// acknowledged / unknown / lost.
fn print_table(rounds: &[Round]) {
    for r in rounds {
        let lost: usize = r.verdict.lost.iter().map(|(_, ids)| ids.len()).sum();
        eprintln!(
            "| {} | {:.1} s | {:.1} s | {} / {} / {lost} |",
            r.fault,
            r.unavailable.as_secs_f64(),
            r.healed.as_secs_f64(),
            r.verdict.acked,
            r.verdict.unknown
        );
    }
}

/// What one fault did.
#[derive(Debug)]
struct Round {
    fault: &'static str,
    /// Longest time without an acknowledged write, from the fault to healthy again.
    unavailable: Duration,
    /// From the fault to every member streaming with a synchronous standby again.
    healed: Duration,
    verdict: history::Verdict,
    /// The ids acknowledged in this round.
    acked: BTreeSet<i64>,
    /// The reader session's reads through replicas, when one ran.
    reads: Option<history::ReadVerdict>,
}

/// Runs `fault` under two writers (one connection per write over the three hosts,
/// `target_session_attrs=read-write`), waits until the cluster is healthy, and judges the
/// history on every member.
async fn under_load<F, Fut>(hosts: &Hosts, fault: &'static str, act: F) -> Round
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let op = hosts.operator();
    op.wait_healthy(Duration::from_secs(120)).await.unwrap();
    let migrator = op.connect_options(MIGRATOR_ROLE).unwrap();
    migrator
        .connect()
        .await
        .unwrap()
        .batch_execute(&format!(
            "{}; TRUNCATE ha_history.writes",
            history::SETUP_SQL
        ))
        .await
        .unwrap();
    let ids = Arc::new(AtomicI64::new(1));
    let hist = Arc::new(Mutex::new(History::default()));
    let (pause, limit) = (Duration::from_millis(20), Duration::from_secs(3));
    let writers: Vec<Writer> = ["w1", "w2"]
        .into_iter()
        .map(|name| {
            Writer::spawn(
                name,
                migrator.clone(),
                ids.clone(),
                hist.clone(),
                pause,
                limit,
            )
        })
        .collect();
    let reader = hosts.readers.then(|| {
        let replicas = HOSTS
            .iter()
            .map(|h| op.node_options(h, MIGRATOR_ROLE).unwrap())
            .collect();
        history::Reader::spawn(
            "r1",
            migrator.clone(),
            replicas,
            ids.clone(),
            hist.clone(),
            Duration::from_millis(50),
            limit,
            Duration::from_secs(1),
        )
    });
    // Some writes before the fault.
    let deadline = Instant::now() + Duration::from_secs(30);
    while hist.lock().unwrap().acks.len() < 20 {
        assert!(
            Instant::now() < deadline,
            "no writes acknowledged before {fault}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = Instant::now();
    act().await;
    op.wait_healthy(Duration::from_secs(180)).await.unwrap();
    let healed = at.elapsed();
    // Writes after healing, too.
    let after = hist.lock().unwrap().acks.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while hist.lock().unwrap().acks.len() < after + 20 {
        assert!(
            Instant::now() < deadline,
            "no writes acknowledged after {fault}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in writers {
        w.stop().await;
    }
    let reads = match reader {
        Some(r) => Some(r.stop().await),
        None => None,
    };
    let hist = Arc::try_unwrap(hist).ok().unwrap().into_inner().unwrap();
    let unavailable = hist.longest_gap(at, at + healed, None);
    let members: Vec<(String, dalp_db::ConnectOptions)> = HOSTS
        .iter()
        .map(|h| (h.to_string(), hosts.local(h).superuser_options(h, "dalp")))
        .collect();
    let verdict = history::check(&hist, &members, Duration::from_secs(60)).await;
    let round = Round {
        fault,
        unavailable,
        healed,
        verdict,
        acked: hist.acked(),
        reads,
    };
    if let Some(r) = &round.reads {
        eprintln!(
            "{fault}: reader session: {} reads through replicas at the session's position, {} skipped (no replica there within 1 s), violations {:?}",
            r.replica_reads, r.skipped, r.violations
        );
    }
    eprintln!(
        "{fault}: writes unavailable {:.1} s, healthy after {:.1} s; acknowledged {}, unknown {} ({} landed), failed {}, lost {:?}",
        round.unavailable.as_secs_f64(),
        round.healed.as_secs_f64(),
        round.verdict.acked,
        round.verdict.unknown,
        round.verdict.unknown_landed,
        round.verdict.failed,
        round.verdict.lost,
    );
    // Both verdicts are printed before either fails the round; on a reader violation, what
    // each node's Patroni did meanwhile.
    if let Some(r) = &round.reads {
        if !r.violations.is_empty() {
            hosts.show_patroni_logs(HOSTS.into_iter());
        }
        assert!(r.violations.is_empty(), "{fault}: {:?}", r.violations);
    }
    round.verdict.assert_clean();
    round
}

async fn leader(hosts: &Hosts) -> String {
    hosts.operator().leader().await.unwrap()
}

/// Waits until a host other than `old` leads.
async fn new_leader(hosts: &Hosts, old: &str, within: Duration) -> String {
    let old = old.to_string();
    hosts
        .operator()
        .wait_for(within, "a new leader", move |s| {
            s.leader().is_some_and(|l| l.name != old)
        })
        .await
        .unwrap()
        .leader()
        .unwrap()
        .name
        .clone()
}

async fn kill_leader(hosts: &Hosts) -> Round {
    under_load(hosts, "SIGKILL leader", || async {
        let old = leader(hosts).await;
        hosts.local(&old).kill_node(&old);
        new_leader(hosts, &old, Duration::from_secs(60)).await;
        // The host's operator (or its supervisor) starts it again.
        hosts.node_up(&[old.as_str()]);
    })
    .await
}

/// The leader's Patroni and PostgreSQL die (SIGKILL) on a host that stays up: its guard
/// starts Patroni again by itself — no `node up` — and the cluster heals (the old leader
/// back, or a replica promoted meanwhile), nothing lost.
async fn patroni_crash(hosts: &Hosts) -> Round {
    under_load(
        hosts,
        "leader's Patroni and postmaster SIGKILLed (the guard restarts them)",
        || async {
            let old = leader(hosts).await;
            let local = hosts.local(&old);
            let before = local.guard_restarts(&old).len();
            let t = Instant::now();
            local.kill_patroni(&old);
            loop {
                if let Some(e) = local.guard_restarts(&old).get(before) {
                    assert!(
                        e["error"].is_null(),
                        "the guard could not restart Patroni: {e}"
                    );
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "{old}'s guard did not restart Patroni; guard.log:\n{}",
                    tail(&local.root().join(&old).join("guard.log"), 20)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let restarted = t.elapsed();
            // Healthy again without `node up`: status (each Patroni, each PostgreSQL taking
            // a new connection, etcd) finds nothing wrong.
            let problems = loop {
                let report = hosts.operator().inspect().await;
                if report.problems.is_empty() {
                    break None;
                }
                if t.elapsed() > Duration::from_secs(90) {
                    break Some(report.problems);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert!(problems.is_none(), "not healed after the guard's restart: {problems:?}");
            eprintln!(
                "patroni crash: {old}'s guard restarted Patroni {:.1} s after the kill; nothing wrong {:.1} s after it (leader {})",
                restarted.as_secs_f64(),
                t.elapsed().as_secs_f64(),
                leader(hosts).await
            );
        },
    )
    .await
}

async fn partition_leader(hosts: &Hosts) -> Round {
    under_load(hosts, "leader cut off", || async {
        let old = leader(hosts).await;
        hosts.net.isolate(&old, true).unwrap();
        let promoted = new_leader(hosts, &old, Duration::from_secs(90)).await;
        assert_ne!(promoted, old);
        hosts.net.isolate(&old, false).unwrap();
    })
    .await
}

/// 100 ms more on every packet each host sends (what `tc netem delay 100ms` on each host's
/// link does; this kernel has no netem, so the test net queues and releases them), for
/// longer than the ttl: nothing fails over, writes go on (slower), nothing is lost.
async fn latency(hosts: &Hosts) -> Round {
    under_load(
        hosts,
        "100 ms latency on every host's link, past the ttl",
        || async {
            let old = leader(hosts).await;
            let by = Duration::from_millis(100);
            let delays: Vec<_> = ALL
                .iter()
                .map(|h| hosts.net.delay(h, by).unwrap())
                .collect();
            tokio::time::sleep(hosts.operator().ttl() + Duration::from_secs(5)).await;
            let still = leader(hosts).await;
            let packets: u64 = delays.into_iter().map(|d| d.finish()).sum();
            eprintln!("latency: {packets} packets held {by:?} on their way out");
            assert!(packets > 0, "no packet went through the delay");
            assert_eq!(still, old, "100 ms of latency moved the leader");
        },
    )
    .await
}

async fn one_way_partition(hosts: &Hosts) -> Round {
    under_load(
        hosts,
        "leader cannot reach its synchronous standby (one way)",
        || async {
            let status = hosts.operator().status().await.unwrap();
            let old = status.leader().unwrap().name.clone();
            let sync = status.sync_standby().unwrap().name.clone();
            hosts.net.block(&old, &sync, true).unwrap();
            tokio::time::sleep(hosts.operator().ttl()).await;
            hosts.net.block(&old, &sync, false).unwrap();
        },
    )
    .await
}

async fn etcd_member_lost(hosts: &Hosts) -> Round {
    under_load(
        hosts,
        "etcd member killed with its disk lost, then restarted",
        || async {
            let old = leader(hosts).await;
            let victim = HOSTS.iter().find(|h| **h != old).unwrap().to_string();
            let local = hosts.local(&victim);
            let pid = local.etcd_pid().unwrap();
            kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
            // The member's loss is reported within one probe, while writes go on.
            // The loss is reported; the two others keep (or, when the victim led etcd, elect
            // within about a second) a quorum.
            let named = format!("etcd member etcd-{victim} does not answer");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let report = hosts.operator().inspect().await;
                let reported = report.problems.iter().any(|p| p.contains(&named));
                if reported && report.etcd_up {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "quorum {} / problems {:?}",
                    report.etcd_up,
                    report.problems
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert_eq!(
                leader(hosts).await,
                old,
                "losing one etcd member moved the leader"
            );
            // Its disk is lost too: `dalp node up` starts only the stopped member, which
            // rejoins the running etcd cluster as a new member (removed and added again).
            let data = local.root().join(format!("etcd-{victim}"));
            assert!(data.join("member").exists(), "{}", data.display());
            std::fs::remove_dir_all(&data).unwrap();
            hosts.node_up(&[victim.as_str()]);
            let report = hosts.operator().inspect().await;
            assert!(
                report.etcd_up && report.etcd_members.iter().all(|(_, up)| *up),
                "{:?}",
                report.etcd_members
            );
            assert!(data.join("member").exists(), "the member did not rejoin");
        },
    )
    .await
}

/// The leader with one of its processes stopped (SIGSTOP): its name, its host's view, the
/// guard's fence count before, the stopped pid, and when (monotonic and wall clock).
struct Stalled {
    old: String,
    local: HaCluster,
    fences: usize,
    pid: i32,
    at: (Instant, i64),
}

/// Stops the leader's process that `pick` names (its pid, by the leader's name).
async fn stall_leader(hosts: &Hosts, pick: fn(&HaCluster, &str) -> Option<i32>) -> Stalled {
    let old = leader(hosts).await;
    let local = hosts.local(&old);
    let fences = local.guard_events(&old).len();
    let pid = pick(&local, &old).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    Stalled {
        old,
        local,
        fences,
        pid,
        at: (Instant::now(), unix_ms()),
    }
}

async fn zombie_leader(hosts: &Hosts) -> Round {
    under_load(
        hosts,
        "leader's Patroni stalled past ttl, then resumed",
        || async {
            let stalled = stall_leader(hosts, HaCluster::patroni_pid).await;
            let (old, pid, frozen) = (&stalled.old, stalled.pid, stalled.at.0);
            let promoted = new_leader(hosts, old, Duration::from_secs(90)).await;
            eprintln!(
                "zombie: {promoted} leads {:.1} s after {old}'s Patroni froze",
                frozen.elapsed().as_secs_f64()
            );
            // The old primary's guard fenced it (what a watchdog would have done).
            let fence = wait_fence(&stalled, "Patroni").await;
            eprintln!("zombie: {old}'s guard fenced its primary: {fence}");
            tokio::time::sleep(Duration::from_secs(3)).await;
            kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
            // The resumed Patroni must not take the leader key back.
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert_eq!(leader(hosts).await, promoted);
        },
    )
    .await
}

/// The primary's postmaster freezes (SIGSTOP) and is never resumed: its backends and
/// Patroni's own connection keep working, so Patroni sees nothing, but no new connection
/// succeeds. The operator's status must say so from outside the host (a probe of each
/// node's PostgreSQL) within a probe round, and the node's guard must fence the frozen
/// postmaster (SIGKILL) so that Patroni restarts PostgreSQL: the cluster heals by itself,
/// nothing lost.
async fn frozen_postmaster(hosts: &Hosts) -> Round {
    under_load(
        hosts,
        "primary's postmaster frozen (never resumed)",
        || async {
            let stalled = stall_leader(hosts, HaCluster::postmaster_pid).await;
            let (old, pid, frozen) = (&stalled.old, stalled.pid, stalled.at.0);
            let named = format!("{old}: the leader's PostgreSQL takes no new connection");
            let reported = loop {
                let report = hosts.operator().inspect().await;
                if report.problems.iter().any(|p| p.starts_with(&named)) {
                    break frozen.elapsed();
                }
                if frozen.elapsed() > Duration::from_secs(30) {
                    kill(Pid::from_raw(pid), Signal::SIGCONT).unwrap();
                    panic!("frozen postmaster not reported: {:?}", report.problems);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            eprintln!(
                "frozen postmaster on {old} reported by status after {:.1} s",
                reported.as_secs_f64()
            );
            let fence = wait_fence(&stalled, "no new connection").await;
            eprintln!("frozen postmaster on {old}: {fence}");
        },
    )
    .await
}

/// Waits (up to 40 s after the stall) until the stalled leader's guard records a fence beyond
/// those it had made before, whose reason mentions `why`; on failure the stopped process is
/// resumed and the guard's log shown. Returns a line saying when
/// (the guard's own clock) and why.
async fn wait_fence(stalled: &Stalled, why: &str) -> String {
    let &Stalled {
        old: ref name,
        ref local,
        fences: before,
        pid,
        at: (since, since_ms),
    } = stalled;
    loop {
        if let Some(e) = local.guard_events(name).get(before) {
            let reason = e["reason"].as_str().unwrap_or_default().to_string();
            assert!(
                reason.contains(why),
                "{name}'s guard fenced for another reason: {e}"
            );
            let after = e["unix_ms"].as_i64().unwrap_or_default() - since_ms;
            return format!(
                "fenced by its guard {:.1} s after the fault ({reason})",
                after as f64 / 1000.0
            );
        }
        if since.elapsed() > Duration::from_secs(40) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            panic!(
                "{name}'s guard fenced nothing within 40 s; guard.log:\n{}",
                tail(&local.root().join(name).join("guard.log"), 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The synchronous standby dies, then 3 s later the leader. The remaining replica may lead
/// only if the leader had made it the synchronous standby in the meantime (else it may lack
/// writes the dead standby acknowledged, and Patroni rightly keeps it a replica); either
/// way the cluster leads again once the two hosts are back (`node up`), with nothing lost.
async fn standby_then_leader_killed(hosts: &Hosts) -> Round {
    under_load(
        hosts,
        "sync standby killed, then the leader 3 s later",
        || async {
            let status = hosts.operator().status().await.unwrap();
            let leader = status.leader().unwrap().name.clone();
            let standby = status.sync_standby().unwrap().name.clone();
            hosts.local(&standby).kill_node(&standby);
            tokio::time::sleep(Duration::from_secs(3)).await;
            hosts.local(&leader).kill_node(&leader);
            let survivor = HOSTS
                .iter()
                .find(|h| **h != leader && **h != standby)
                .unwrap()
                .to_string();
            let s = survivor.clone();
            let took_over = hosts
                .operator()
                .wait_for(
                    Duration::from_secs(30),
                    "the surviving replica leading",
                    move |st| st.leader().is_some_and(|l| l.name == s),
                )
                .await
                .is_ok();
            eprintln!(
                "the surviving replica {survivor} {} within 30 s",
                if took_over {
                    "took over"
                } else {
                    "stayed a replica (it was not the synchronous standby yet)"
                }
            );
            hosts.node_up(&[standby.as_str(), leader.as_str()]);
        },
    )
    .await
}

/// Two of the three etcd members die: no quorum, but every Patroni still reaches the others,
/// so failsafe mode keeps the primary writing; `node up` restarts the members.
async fn etcd_majority_lost(hosts: &Hosts) -> Round {
    under_load(hosts, "etcd majority killed, then restarted", || async {
        let victims: Vec<&str> = HOSTS[..2].to_vec();
        for v in &victims {
            let pid = hosts.local(v).etcd_pid().unwrap();
            kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        }
        let report = hosts.operator().inspect().await;
        assert!(!report.etcd_up, "{:?}", report.etcd_members);
        tokio::time::sleep(Duration::from_secs(15)).await;
        hosts.node_up(&victims);
    })
    .await
}

/// The repository host is cut off while the primary archives (WAL switched every second):
/// writes go on, archiving fails meanwhile, and once the host is back the archive catches
/// up (pgBackRest's check: a fresh segment reaches the repository).
async fn repository_host_lost(hosts: &Hosts) -> Round {
    under_load(hosts, "repository host cut off while archiving", || async {
        let leader = leader(hosts).await;
        let su = hosts.local(&leader).superuser_options(&leader, "postgres");
        let c = su.connect().await.unwrap();
        let archived = |c: tokio_postgres::Client| async move {
            let n: i64 = c
                .query_one("SELECT archived_count FROM pg_stat_archiver", &[])
                .await
                .unwrap()
                .get(0);
            (c, n)
        };
        hosts.net.isolate(REPO, true).unwrap();
        // A segment already on its way may still land; count from a moment later.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (c, before) = archived(c).await;
        for _ in 0..15 {
            let _ = c.batch_execute("SELECT pg_switch_wal()").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (_c, during) = archived(c).await;
        assert_eq!(
            during, before,
            "segments were archived while the repository host was cut off"
        );
        hosts.net.isolate(REPO, false).unwrap();
        let repo = hosts.local(REPO).backups().unwrap().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = repo.clone();
            match tokio::task::spawn_blocking(move || r.check())
                .await
                .unwrap()
            {
                Ok(()) => break,
                Err(e) => assert!(Instant::now() < deadline, "archive did not catch up: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
    .await
}

/// A PostgreSQL host joins and leaves a running cluster the way docs/deploy-self-managed.md
/// says: `dalp cluster add-host` on the operator's copy, `dalp node up` on every host (they
/// re-read the topology: Patroni reloads, the repository host restarts its server with the
/// new node), then `node up` on the new host, which clones from the leader. It leads (a
/// switchover), takes a write, and the repository host backs it up (it must know the new
/// node to find the primary); then it is removed:
/// refused while it runs, then `node down` on it and `dalp cluster remove-host`, and the
/// cluster is healthy on the three first hosts with the write on each.
async fn add_and_remove_a_host(hosts: &Hosts) {
    let started = Instant::now();
    let dir = hosts.dir.to_str().unwrap().to_string();
    let address = hosts.net.host(SPARE).address.clone();
    let bundle = hosts.bundle(SPARE);
    let out = common::dalp(&[
        "cluster",
        "add-host",
        "--dir",
        &dir,
        "--name",
        SPARE,
        "--address",
        &address,
        "--bundle-dir",
        bundle.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("dalp node up"), "{}", text(&out));
    // The same address or name again is refused.
    let again = common::dalp(&[
        "cluster",
        "add-host",
        "--dir",
        &dir,
        "--name",
        "db5",
        "--address",
        &address,
    ]);
    assert!(!again.status.success());
    assert!(text(&again).contains("already a host"), "{}", text(&again));
    hosts.node_up(&ALL);
    hosts.node_up(&[SPARE]);
    let op = hosts.operator();
    assert_eq!(op.nodes().len(), 4);
    op.wait_healthy(Duration::from_secs(120)).await.unwrap();
    let joined = started.elapsed();
    // Patroni hands the lead only to its synchronous standby: stop the other replicas'
    // nodes (their etcd members stay) until the new host is that standby, switch over to
    // it, and bring them back.
    let lead = leader(hosts).await;
    let others: Vec<&str> = HOSTS.iter().copied().filter(|h| *h != lead).collect();
    for h in &others {
        hosts.local(h).stop_node(h);
    }
    op.wait_for(Duration::from_secs(60), "db4 as synchronous standby", |s| {
        s.sync_standbys().any(|m| m.name == SPARE)
    })
    .await
    .unwrap();
    assert_eq!(op.switchover(Some(SPARE)).await.unwrap(), SPARE);
    hosts.node_up(&others);
    op.wait_healthy(Duration::from_secs(120)).await.unwrap();
    let migrator = op.connect_options(MIGRATOR_ROLE).unwrap();
    let marker = 987_654_321_i64;
    let c = migrator.connect().await.unwrap();
    c.batch_execute(history::SETUP_SQL).await.unwrap();
    c.execute(
        "INSERT INTO ha_history.writes (n, server) VALUES ($1, 'db4 leading')",
        &[&marker],
    )
    .await
    .unwrap();
    full_backup_on_the_repository_host(hosts).await;
    // Leaving: refused while it runs; then stopped (after handing the lead back) and removed.
    let remove = || common::dalp(&["cluster", "remove-host", "--dir", &dir, "--name", SPARE]);
    let out = remove();
    assert!(!out.status.success());
    assert!(text(&out).contains("still runs"), "{}", text(&out));
    op.wait_healthy(Duration::from_secs(60)).await.unwrap();
    assert_ne!(op.switchover(None).await.unwrap(), SPARE);
    let down = hosts
        .net
        .command(SPARE, Path::new(DALP))
        .args(["node", "down", "--bundle"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(down.status.success(), "{}", text(&down));
    let out = remove();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !bundle.exists(),
        "the removed host's bundle (its key) stays"
    );
    hosts.node_up(&ALL);
    let op = hosts.operator();
    assert_eq!(op.nodes().len(), 3);
    op.wait_healthy(Duration::from_secs(120)).await.unwrap();
    for h in HOSTS {
        let c = hosts
            .local(h)
            .superuser_options(h, "dalp")
            .connect()
            .await
            .unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM ha_history.writes WHERE n = $1",
                &[&marker],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{h} lacks the write made while {SPARE} led");
    }
    eprintln!(
        "{SPARE} added and streaming after {:.1} s, led, was backed up and removed; {:.1} s in all",
        joined.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

async fn switchover(hosts: &Hosts) -> Round {
    under_load(hosts, "switchover", || async {
        let op = hosts.operator();
        let old = leader(hosts).await;
        let new = op.switchover(None).await.unwrap();
        assert_ne!(new, old);
    })
    .await
}

/// The repository host takes a full backup of the cluster (from whichever node pgBackRest
/// picks, over TLS), into both repositories it holds.
async fn full_backup_on_the_repository_host(hosts: &Hosts) {
    let b = hosts
        .local(REPO)
        .backups()
        .unwrap()
        .expect("a cluster with a repository host archives");
    let started = Instant::now();
    let info = match tokio::task::spawn_blocking(move || b.backup("full", 1, &|_| {}))
        .await
        .unwrap()
    {
        Ok(info) => info,
        Err(e) => {
            // What each host's pgBackRest said (archive-push runs on the database hosts).
            let logs: String = ALL
                .iter()
                .flat_map(|h| {
                    let mut f = dalp_testkit::files_under(&hosts.bundle(h).join("backup/log"));
                    f.extend(dalp_testkit::files_under(
                        &hosts.bundle(h).join(h).join("log"),
                    ));
                    f
                })
                .map(|p| format!("\n--- {} ---\n{}", p.display(), tail(&p, 8)))
                .collect();
            panic!("full backup: {e}{logs}");
        }
    };
    eprintln!(
        "full backup {} on the repository host in {:.1} s",
        info.label,
        started.elapsed().as_secs_f64()
    );
}

/// After every failover, the shared repository restores — on a database host, fetching
/// from the repository host — to the end of the archive with every write the last round
/// acknowledged: archiving continued from each new primary.
async fn restore_after_the_failovers(hosts: &Hosts, acked: &BTreeSet<i64>) {
    let repo = hosts.local(REPO).backups().unwrap().unwrap();
    let db = hosts.local("db1").backups().unwrap().unwrap();
    let into = hosts._tmp.path().join("restored");
    let target = into.clone();
    tokio::task::spawn_blocking(move || {
        // Switches WAL on the primary and waits until the segment is in the repository.
        repo.check()?;
        db.restore(&dalp_ops::backup::Target::Latest, &target, 1, &|_| {})
    })
    .await
    .unwrap()
    .unwrap();
    let copy = dalp_ops::backup::RestoredServer::start(
        &into,
        Path::new(dalp_ops::embedded::DEFAULT_PG_BIN),
        false,
        Duration::from_secs(300),
    )
    .await
    .unwrap();
    let recovered = copy.recovered().await.unwrap();
    eprintln!("restored from the repository host after the failovers: {recovered:?}");
    let c = copy.superuser_options("dalp").connect().await.unwrap();
    let rows: BTreeSet<i64> = c
        .query("SELECT n FROM ha_history.writes", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&i64> = acked.difference(&rows).collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing from the restore: {missing:?}"
    );
    assert!(!acked.is_empty());
}

/// Patroni's write verbs need a client certificate from the cluster's CA: without one a
/// switchover is refused, and nothing changes.
async fn write_verbs_need_a_client_certificate(hosts: &Hosts) {
    let op = hosts.operator();
    let status = op.status().await.unwrap();
    let leader = status.leader().unwrap();
    let ca = std::fs::read(hosts.dir.join("tls/ca.crt")).unwrap();
    let anonymous = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("https://{}:{}", leader.host, 8008);
    // Reading is open to anyone who trusts the CA …
    let r = anonymous
        .get(format!("{url}/patroni"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    // … changing needs the certificate, even with the password.
    let secrets = dalp_db::Secrets::load(&hosts.dir.join("secrets.json")).unwrap();
    let r = anonymous
        .post(format!("{url}/switchover"))
        .basic_auth(
            dalp_ops::ha::API_USER,
            Some(&secrets.roles[dalp_ops::ha::API_USER]),
        )
        .json(&serde_json::json!({"leader": leader.name}))
        .send()
        .await;
    if let Ok(r) = r {
        assert!(
            r.status().is_client_error(),
            "switchover without a certificate: {}",
            r.status()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(op.leader().await.unwrap(), leader.name);
}

/// `dalp serve` outside the hosts (no superuser), configured as docs/deploy-self-managed.md
/// says: every database host listed (writes go to whichever is primary), the same list as
/// replicas, the cluster's CA and a copy of its secrets. Stopped by pid when dropped.
struct Serve {
    _child: dalp_testkit::Reaped,
    port: u16,
    dir: tempfile::TempDir,
}

impl Serve {
    fn start(hosts: &Hosts) -> Serve {
        let op = hosts.operator();
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let nodes: Vec<String> = op
            .nodes()
            .iter()
            .map(|n| format!("\"{}:{}\"", n.address, n.pg_port))
            .collect();
        let config = dir.path().join("serve.toml");
        std::fs::write(
            &config,
            format!(
                "[database]\nhosts = [{n}]\nreplicas = [{n}]\nname = \"dalp\"\nca_file = \"{}\"\nsecrets_file = \"{}\"\n\n[api]\nlisten = \"127.0.0.1:{port}\"\n\n[keys]\ndir = \"{}\"\n",
                op.ca_cert().display(),
                hosts.dir.join("secrets.json").display(),
                dir.path().join("keys").display(),
                n = nodes.join(", "),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let child = std::process::Command::new(DALP)
            .args(["serve", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Serve {
            _child: dalp_testkit::Reaped(child),
            port,
            dir,
        }
    }

    /// Within `within`: `/readyz` answers 200, and a login with wrong credentials answers
    /// 401 — its audit record is a write through whichever host is primary now, so a
    /// server that lost the primary would answer 5xx. Returns how long that took.
    async fn writes(&self, within: Duration) -> Duration {
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{}", self.port);
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < within {
            let ready = http
                .get(format!("{base}/readyz"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if ready.as_ref().is_ok_and(|r| r.status() == 200) {
                let r = http
                    .post(format!("{base}/api/v1/auth/login"))
                    .json(&serde_json::json!({"email": "nobody@bank.example", "password": "not this one"}))
                    .timeout(Duration::from_secs(70))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 401 => return started.elapsed(),
                    Ok(r) => {
                        last = format!(
                            "login: {} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        )
                    }
                    Err(e) => last = format!("login: {e}"),
                }
            } else {
                last = format!("readyz: {ready:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "dalp serve did not write within {within:?}: {last}\n{}",
            tail(&self.dir.path().join("serve.log"), 30)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_heal_every_fault_without_losing_a_write() {
    let hosts = three_hosts().await;
    // The operator's status answers over TLS from outside the hosts.
    let out = common::dalp(&["cluster", "status", "--dir", hosts.dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("etcd-db1 up"), "{}", text(&out));
    // `cluster down` cannot stop other hosts: it stops nothing and says in which order to
    // run `node down`, the leader's host last of the database hosts.
    let out = common::dalp(&["cluster", "down", "--dir", hosts.dir.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    let leader = leader(&hosts).await;
    let t = text(&out);
    let at = |h: &str| {
        t.find(&format!("on {h}: dalp node down"))
            .unwrap_or_else(|| panic!("{h} missing: {t}"))
    };
    for h in HOSTS.iter().filter(|h| **h != leader) {
        assert!(at(h) < at(&leader), "{t}");
    }
    assert!(at(&leader) < at(REPO), "{t}");
    assert_eq!(
        hosts.operator().leader().await.unwrap(),
        leader,
        "nothing stopped"
    );
    write_verbs_need_a_client_certificate(&hosts).await;
    // dalp's own server, outside the hosts, on the multi-host URL.
    let serve = Serve::start(&hosts);
    let took = serve.writes(Duration::from_secs(60)).await;
    eprintln!(
        "dalp serve on the three hosts: ready and writing after {:.1} s",
        took.as_secs_f64()
    );
    full_backup_on_the_repository_host(&hosts).await;
    let mut rounds = Vec::new();
    rounds.push(kill_leader(&hosts).await);
    rounds.push(partition_leader(&hosts).await);
    rounds.push(etcd_member_lost(&hosts).await);
    rounds.push(latency(&hosts).await);
    rounds.push(patroni_crash(&hosts).await);
    rounds.push(zombie_leader(&hosts).await);
    rounds.push(frozen_postmaster(&hosts).await);
    rounds.push(standby_then_leader_killed(&hosts).await);
    rounds.push(switchover(&hosts).await);
    // The same server process, after five changes of primary: it writes again.
    let took = serve.writes(Duration::from_secs(60)).await;
    eprintln!(
        "dalp serve after the failovers: writing after {:.1} s (leader now {})",
        took.as_secs_f64(),
        hosts.operator().leader().await.unwrap()
    );
    drop(serve);
    restore_after_the_failovers(&hosts, &rounds.last().unwrap().acked).await;
    add_and_remove_a_host(&hosts).await;
    print_table(&rounds);
}

/// What the multi-host verbs refuse, with a sentence and a non-zero exit, changing nothing:
/// `cluster init` into a directory that holds a cluster (its CA and secrets would be
/// replaced), `node up` on the operator's copy (it runs no host), `cluster down` on a
/// cluster spread over hosts. Nothing is started; the hosts' addresses are on loopback.
#[test]
fn multi_host_verbs_refuse_what_they_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let spec_path = tmp.path().join("cluster.toml");
    let dir = tmp.path().join("cluster");
    let mut spec = String::new();
    for (i, h) in HOSTS.iter().enumerate() {
        spec.push_str(&format!(
            "[[host]]\nname = \"{h}\"\naddress = \"127.0.0.{}\"\nroles = [\"etcd\", \"postgres\"]\n",
            21 + i
        ));
    }
    std::fs::write(&spec_path, spec).unwrap();
    let out = cluster_init(&spec_path, &dir);
    assert!(out.status.success(), "{}", text(&out));
    let ca = std::fs::read(dir.join("tls/ca.crt")).unwrap();
    let secrets = std::fs::read(dir.join("secrets.json")).unwrap();

    let out = cluster_init(&spec_path, &dir);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("already holds a cluster"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(dir.join("tls/ca.crt")).unwrap(),
        ca,
        "CA replaced"
    );
    assert_eq!(
        std::fs::read(dir.join("secrets.json")).unwrap(),
        secrets,
        "secrets replaced"
    );

    let out = common::dalp(&["node", "up", "--bundle", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("operator's copy"), "{}", text(&out));

    let out = common::dalp(&["cluster", "down", "--dir", dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("leader is unknown"), "{t}");
    for h in HOSTS {
        assert!(t.contains(&format!("on {h}: dalp node down")), "{t}");
    }
}

/// The full schedule's faults, in order; `DALP_HOST_FAULTS` (a comma-separated subset of
/// these names) runs only some.
const SCHEDULE: [&str; 12] = [
    "kill_leader",
    "patroni_crash",
    "latency",
    "partition_leader",
    "one_way_partition",
    "etcd_member_lost",
    "etcd_majority_lost",
    "zombie_leader",
    "standby_then_leader_killed",
    "repository_host_lost",
    "frozen_postmaster",
    "switchover",
];

async fn fault(hosts: &Hosts, name: &str) -> Round {
    match name {
        "kill_leader" => kill_leader(hosts).await,
        "patroni_crash" => patroni_crash(hosts).await,
        "latency" => latency(hosts).await,
        "partition_leader" => partition_leader(hosts).await,
        "one_way_partition" => one_way_partition(hosts).await,
        "etcd_member_lost" => etcd_member_lost(hosts).await,
        "etcd_majority_lost" => etcd_majority_lost(hosts).await,
        "zombie_leader" => zombie_leader(hosts).await,
        "standby_then_leader_killed" => standby_then_leader_killed(hosts).await,
        "repository_host_lost" => repository_host_lost(hosts).await,
        "frozen_postmaster" => frozen_postmaster(hosts).await,
        "switchover" => switchover(hosts).await,
        other => panic!("DALP_HOST_FAULTS: no fault `{other}`; the faults: {SCHEDULE:?}"),
    }
}

/// The full schedule, `DALP_HOST_FAULT_ROUNDS` times (default 1): docs/benchmarks.md.
/// `DALP_HOST_FAULTS=zombie_leader,switchover` runs only those faults, in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn host_fault_soak() {
    let rounds: usize = std::env::var("DALP_HOST_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut hosts = three_hosts().await;
    hosts.readers = true;
    full_backup_on_the_repository_host(&hosts).await;
    let faults: Vec<String> = match std::env::var("DALP_HOST_FAULTS") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|f| f.trim().to_string()).collect(),
        _ => SCHEDULE.iter().map(|f| f.to_string()).collect(),
    };
    let mut all = Vec::new();
    for _ in 0..rounds {
        for f in &faults {
            all.push(fault(&hosts, f).await);
        }
    }
    restore_after_the_failovers(&hosts, &all.last().unwrap().acked).await;
    print_table(&all);
}

/// Milliseconds since the Unix epoch (the guard's events carry the same clock).
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Only the host joining and leaving (the CI test runs it after the faults):
/// `cargo test -p dalp-cli --test ha_hosts -- --ignored a_host_joins_and_leaves`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn a_host_joins_and_leaves() {
    let hosts = three_hosts().await;
    add_and_remove_a_host(&hosts).await;
}
