//! `dalp node up|down --bundle DIR`: one host of a cluster made by `dalp cluster init`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Subcommand;
use dalp_ops::HaCluster;

/// What runs on this host.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Start what this host runs (its etcd member, its PostgreSQL under Patroni and the
    /// node's guard, the repository's pgBackRest server) and wait until it serves: etcd's
    /// quorum (start the other hosts meanwhile), then this node running as leader or
    /// streaming replica. Pieces already running are left alone, so it also restarts one
    /// stopped piece (e.g. an etcd member alone); on a running host it re-reads the bundle,
    /// so after `dalp cluster add-host`/`remove-host` Patroni reloads and the repository's
    /// server restarts with the new topology. The host whose node leads creates dalp's
    /// roles and database and applies the migrations. The processes are daemons with pids
    /// recorded in the bundle.
    Up {
        /// This host's bundle, made by `dalp cluster init` (DIR/hosts/<name>).
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Stop what this host runs (Patroni stops its PostgreSQL first, then the etcd member).
    /// The data stays; `dalp node up` starts it again.
    Down {
        #[arg(long)]
        bundle: PathBuf,
        /// Stop only this host's etcd member, leaving PostgreSQL running.
        #[arg(long)]
        etcd_only: bool,
    },
    /// Guard one node's PostgreSQL (`node up` and `cluster up` start one per node, as the
    /// server user; `node down` stops it first). It fences the node — SIGKILL to its
    /// postmaster and backends — when the postmaster answers no new connection for a
    /// quarter of the ttl (Patroni then restarts PostgreSQL), or when the node is the
    /// primary and its Patroni has answered nothing for ttl − loop_wait − 5 s (before the
    /// leader key can expire and a replica be promoted: what a kernel watchdog would do).
    /// Each fence is logged and recorded in <node>/guard.events.
    Guard {
        #[arg(long)]
        bundle: PathBuf,
        /// The node to guard (default: the one node this bundle runs).
        #[arg(long)]
        node: Option<String>,
    },
}

pub async fn run(command: NodeCommand) -> anyhow::Result<ExitCode> {
    match command {
        NodeCommand::Up { bundle } => {
            let started = Instant::now();
            eprintln!("starting this host's pieces from {} …", bundle.display());
            let cluster = HaCluster::node_up(&bundle).await?;
            let leader = cluster.leader().await?;
            let local = cluster.running_processes();
            if local.iter().any(|p| p == &format!("patroni {leader}")) {
                super::cluster::migrate(&cluster).await?;
            }
            println!(
                "node up in {:.1} s: {} (leader: {leader})",
                started.elapsed().as_secs_f64(),
                local.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Down { bundle, etcd_only } => super::cluster::stop(&bundle, etcd_only).await,
        NodeCommand::Guard { bundle, node } => {
            let cluster = HaCluster::open_as_guard(&bundle)?;
            let node = match node {
                Some(n) => n,
                None => match cluster.local_node_names().as_slice() {
                    [one] => one.clone(),
                    names => anyhow::bail!(
                        "{} runs {} nodes ({}); name one with --node",
                        bundle.display(),
                        names.len(),
                        names.join(", ")
                    ),
                },
            };
            cluster.guard(&node).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
