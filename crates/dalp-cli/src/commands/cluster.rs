//! `dalp cluster up|init|status|switchover|heal|down`: an HA cluster (Patroni + etcd), on
//! this host (`up`) or over several (`init` makes the bundles `dalp node up` starts).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use dalp_db::MIGRATOR_ROLE;
use dalp_ops::{HaCluster, HaOptions};

// ---- command line ------------------------------------------------------------------

use clap::Subcommand;

use crate::cli::HaArgs;
use std::path::PathBuf;

/// Shape and timings of a local HA cluster.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create (first time) or restart the cluster, wait until every replica streams with a
    /// synchronous standby, create roles and apply migrations; then return, leaving it running.
    Up {
        /// Cluster directory (data of every node, TLS material, secrets, logs).
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
        #[command(flatten)]
        ha: HaArgs,
        /// pgAudit session classes (see `dalp up --help`).
        #[arg(long, default_value = "write, ddl, role")]
        pgaudit_log: String,
        /// Log plans of statements slower than this many milliseconds.
        #[arg(long, default_value_t = 500)]
        slow_query_ms: u32,
    },
    /// Make a cluster over several hosts from a spec file (TOML: hosts with name, address
    /// and roles etcd/postgres; client networks; timings; ports): the cluster's CA, one
    /// certificate per host, the secrets, and one bundle per host in DIR/hosts/<name>. Copy
    /// each bundle to its host and run `dalp node up --bundle <bundle>` there (every host at
    /// about the same time: etcd needs a majority). DIR is the operator's copy: status and
    /// switchover work from it. See docs/deploy-self-managed.md.
    Init {
        /// The cluster spec file.
        #[arg(long)]
        spec: PathBuf,
        /// Where to write the operator's copy and the bundles (must not hold a cluster).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Add a PostgreSQL host to a cluster made by `dalp cluster init` (run on the operator's
    /// copy, which holds the CA key): a certificate from the cluster's CA and a bundle in
    /// DIR/hosts/<name>, and the new topology in every other bundle's cluster.json. Then:
    /// copy each changed cluster.json to its host and run `dalp node up` there (Patroni
    /// reloads pg_hba for the new address; the repository host restarts its server with
    /// the new node), and install the new bundle and run `dalp node up` on the new host: its
    /// Patroni clones from the leader. To replace a host, add the new one, then remove the
    /// old one.
    AddHost {
        /// The operator's copy made by `dalp cluster init`.
        #[arg(long)]
        dir: PathBuf,
        /// The new host's name (1-32 of a-z, 0-9 and -).
        #[arg(long)]
        name: String,
        /// The new host's IP address.
        #[arg(long)]
        address: String,
        /// Where the bundle will be installed on the new host.
        #[arg(long, default_value = dalp_ops::spec::DEFAULT_BUNDLE_DIR)]
        bundle_dir: PathBuf,
    },
    /// Remove a PostgreSQL host from a cluster made by `dalp cluster init` (run on the
    /// operator's copy). Stop it first (`dalp node down` on it): its Patroni must not
    /// answer. Every other bundle's topology drops it and its bundle (its key, the secrets)
    /// is deleted from DIR/hosts; copy each changed cluster.json to its host and run `dalp
    /// node up` there. Hosts running etcd or the repository cannot be removed this way.
    RemoveHost {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Leader, synchronous standby, replicas, their lag and timeline (from Patroni's REST API).
    Status {
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover: the leader hands over to the candidate (default: the synchronous
    /// standby) without losing committed writes.
    Switchover {
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
        /// Node to promote, e.g. node2.
        #[arg(long)]
        candidate: Option<String>,
    },
    /// Start whatever piece of a running cluster has stopped (etcd, a node's Patroni), leaving
    /// the running ones alone, and wait until the cluster is healthy again.
    Heal {
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
    },
    /// Stop every process of the cluster (Patroni stops its PostgreSQL first, then etcd).
    /// The data stays; `dalp cluster up` restarts it. For a cluster spread over hosts
    /// (`dalp cluster init`) it stops nothing and exits 1, listing the hosts in the order to
    /// run `dalp node down` on each: replicas, then the leader, then etcd-only hosts and
    /// the repository.
    Down {
        #[arg(long, default_value = ".dalp-ha")]
        dir: PathBuf,
    },
}

pub async fn run(command: ClusterCommand) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::Up {
            dir,
            ha,
            pgaudit_log,
            slow_query_ms,
        } => {
            let cluster = up(&dir, ha.options(&pgaudit_log, slow_query_ms)).await?;
            print_status(&cluster, false).await?;
            println!(
                "  connect: psql \"$(dalp db url --data-dir {} --role dalp_readonly)\"   stop: dalp cluster down --dir {}",
                cluster.root().display(),
                cluster.root().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Init { spec, dir } => {
            let parsed = dalp_ops::ClusterSpec::load(&spec)?;
            let made = dalp_ops::spec::init(&parsed, &dir)?;
            println!("cluster made in {}", made.dir.display());
            for (host, bundle) in &made.bundles {
                println!("  {host:<12} dalp node up --bundle {}", bundle.display());
            }
            println!(
                "copy each bundle to its host (it holds that host's key and every role's password: keep it private), run the line above on every host, then: dalp cluster status --dir {}",
                made.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::AddHost {
            dir,
            name,
            address,
            bundle_dir,
        } => {
            let change = dalp_ops::spec::add_host(&dir, &name, &address, &bundle_dir)?;
            let bundle = change.bundle.expect("add_host makes a bundle");
            println!(
                "host {name} ({address}) added; its bundle: {}",
                bundle.display()
            );
            print_topology_steps(&dir, &change.rewritten);
            println!(
                "  then on {name}: install {} and run dalp node up --bundle <where you installed it>; it clones from the leader",
                bundle.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::RemoveHost { dir, name } => {
            let cluster = HaCluster::open(&dir)?;
            if cluster.member_answers(&name).await {
                anyhow::bail!(
                    "{name} still runs (its Patroni answers); on {name} run `dalp node down --bundle <its bundle>` first"
                );
            }
            let change = dalp_ops::spec::remove_host(&dir, &name)?;
            println!(
                "host {name} removed; its bundle is deleted from {}",
                dir.join("hosts").display()
            );
            print_topology_steps(&dir, &change.rewritten);
            println!("  {name}'s certificate stays valid until it expires: destroy its bundle on {name} (its key and the secrets)");
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Status { dir, json } => {
            let cluster = HaCluster::open(&dir)?;
            print_status(&cluster, json).await
        }
        ClusterCommand::Switchover { dir, candidate } => {
            let cluster = HaCluster::open(&dir)?;
            let before = cluster.leader().await?;
            eprintln!("switching over from {before} …");
            let after = cluster.switchover(candidate.as_deref()).await?;
            println!("leader is now {after} (was {before})");
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Heal { dir } => {
            let cluster = HaCluster::open(&dir)?;
            let started = cluster.start_missing().await?;
            if started.is_empty() {
                eprintln!("every process runs; waiting for the cluster to be healthy …");
            } else {
                eprintln!(
                    "started {}; waiting for the cluster to be healthy …",
                    started.join(", ")
                );
            }
            cluster
                .wait_healthy(std::time::Duration::from_secs(180))
                .await?;
            print_status(&cluster, false).await
        }
        ClusterCommand::Down { dir } => down(&dir).await,
    }
}

/// What the operator does after the topology changed: each changed bundle's cluster.json
/// to its host, then `dalp node up` there.
fn print_topology_steps(dir: &Path, rewritten: &[String]) {
    println!("next, on each of these hosts copy the new cluster.json into its bundle and run dalp node up (running pieces stay up; Patroni reloads its configuration):");
    for h in rewritten {
        println!(
            "  {h}: {} → <bundle>/cluster.json; dalp node up --bundle <bundle>",
            dir.join("hosts").join(h).join("cluster.json").display()
        );
    }
}

/// `dalp cluster down`: stops the one-host cluster. A cluster spread over hosts is stopped
/// host by host (dalp has no agent on the other hosts), so this says in which order.
async fn down(dir: &Path) -> anyhow::Result<ExitCode> {
    let cluster = HaCluster::open(dir)?;
    if !cluster.spans_hosts() {
        return stop(dir, false).await;
    }
    let leader = cluster.leader().await.ok();
    let order = cluster
        .shutdown_order(leader.as_deref())
        .expect("a cluster spread over hosts");
    let steps: Vec<String> = order
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let role = if leader.as_deref().is_some_and(|l| {
                cluster
                    .nodes()
                    .iter()
                    .any(|n| n.name == l && n.host.as_deref() == Some(h.as_str()))
            }) {
                " (the leader: last of the database hosts, so no replica is promoted meanwhile)"
            } else {
                ""
            };
            format!(
                "  {}. on {h}: dalp node down --bundle <its bundle>{role}",
                i + 1
            )
        })
        .collect();
    anyhow::bail!(
        "{} is a cluster spread over hosts; dalp stops only what runs where it is invoked. Stop it host by host, in this order{}:\n{}\n(`dalp node down --bundle DIR --etcd-only` stops only a host's etcd member.)",
        cluster.root().display(),
        if leader.is_none() {
            " (no Patroni answered, so the leader is unknown: database hosts first, any order)"
        } else {
            ""
        },
        steps.join("\n")
    )
}

/// Stops what the directory `dir` runs (every piece; with `etcd_only` only its etcd
/// members): `dalp cluster down` and `dalp node down`.
pub(crate) async fn stop(dir: &Path, etcd_only: bool) -> anyhow::Result<ExitCode> {
    let cluster = HaCluster::open(dir)?;
    let running = cluster.running_processes();
    if running.is_empty() {
        println!("nothing running from {}", cluster.root().display());
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("stopping {} …", running.join(", "));
    let left = tokio::task::spawn_blocking(move || {
        if etcd_only {
            for m in cluster.etcd_members().to_vec() {
                cluster.stop_daemon(&m.name);
            }
        } else {
            cluster.down();
        }
        cluster.running_processes()
    })
    .await?;
    if !etcd_only && !left.is_empty() {
        anyhow::bail!(
            "still running: {}; see `dalp cluster status`",
            left.join(", ")
        );
    }
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Starts (or restarts) the cluster in `dir`, then applies migrations through the primary.
pub async fn up(dir: &Path, opts: HaOptions) -> anyhow::Result<HaCluster> {
    eprintln!(
        "starting etcd and {} PostgreSQL nodes under Patroni in {} …",
        opts.nodes,
        dir.display()
    );
    let started = std::time::Instant::now();
    let cluster = HaCluster::up(dir, opts).await?;
    eprintln!(
        "cluster ready in {:.1} s; applying migrations …",
        started.elapsed().as_secs_f64()
    );
    migrate(&cluster).await?;
    Ok(cluster)
}

/// Applies the migrations as the migrator through whichever node is primary.
pub(crate) async fn migrate(cluster: &HaCluster) -> anyhow::Result<()> {
    let migrator = cluster.connect_options(MIGRATOR_ROLE)?;
    let mut client = migrator
        .connect()
        .await
        .context("connect to the primary as the migrator")?;
    super::lifecycle::apply_migrations(&mut client).await
}

async fn print_status(cluster: &HaCluster, json: bool) -> anyhow::Result<ExitCode> {
    // Patroni's view, checked against each node and etcd asked directly: answers also while
    // etcd is down, and names a leader that takes no connection or a deposed primary.
    let report = cluster.inspect().await;
    let problems = &report.problems;
    if json {
        // Patroni's fields at the top (as before), the direct probes beside them.
        let mut v = match &report.status {
            Some(s) => serde_json::to_value(s)?,
            None => serde_json::json!({}),
        };
        v["nodes"] = serde_json::to_value(&report.nodes)?;
        v["etcd_up"] = report.etcd_up.into();
        v["etcd_members"] = serde_json::to_value(&report.etcd_members)?;
        v["problems"] = serde_json::to_value(problems)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<8} {:<13} {:<10} {:<17} {:>8} {:>12}  postgres",
            "member", "role", "state", "address", "timeline", "lag (bytes)"
        );
        let members = report
            .status
            .as_ref()
            .map(|s| s.members.clone())
            .unwrap_or_default();
        for n in &report.nodes {
            let m = members.iter().find(|m| m.name == n.name);
            let (role, state) = match (m, &n.patroni) {
                (Some(m), _) => (m.role.clone(), m.state.clone()),
                (None, Some((r, s))) => (r.clone(), s.clone()),
                (None, None) => ("-".into(), "no answer".into()),
            };
            let postgres = match &n.postgres {
                Ok(true) => "primary".to_string(),
                Ok(false) => "replica".to_string(),
                Err(_) => "no connection".to_string(),
            };
            println!(
                "{:<8} {:<13} {:<10} {:<17} {:>8} {:>12}  {}",
                n.name,
                role,
                state,
                m.map(|m| format!("{}:{}", m.host, m.port))
                    .unwrap_or_default(),
                m.and_then(|m| m.timeline)
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
                m.map(|m| m
                    .lag
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| if m.role == "leader" {
                        String::new()
                    } else {
                        "unknown".into()
                    }))
                .unwrap_or_default(),
                postgres
            );
        }
        let members: Vec<String> = report
            .etcd_members
            .iter()
            .map(|(n, up)| format!("{n} {}", if *up { "up" } else { "DOWN" }))
            .collect();
        println!(
            "etcd     {} ({})",
            if report.etcd_up { "up" } else { "DOWN" },
            members.join(", ")
        );
        for p in problems {
            eprintln!("problem: {p}");
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
