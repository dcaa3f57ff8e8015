//! `dalp node up|down --bundle DIR`: one host of a cluster made by `dalp cluster init`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Subcommand;
use dalp_ops::HaCluster;

/// What runs on this host.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Start what this host runs (its etcd member, its PostgreSQL under Patroni) and wait
    /// until it serves: etcd's quorum (start the other hosts meanwhile), then this node
    /// running as leader or streaming replica. Pieces already running are left alone, so it
    /// also restarts one stopped piece (e.g. an etcd member alone). The host whose node leads
    /// creates dalp's roles and database and applies the migrations. The processes are
    /// daemons with pids recorded in the bundle.
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
    }
}
