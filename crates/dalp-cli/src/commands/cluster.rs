//! `dalp cluster up|status|switchover|down`: the local HA cluster (Patroni + etcd).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use dalp_db::MIGRATOR_ROLE;
use dalp_ops::{HaCluster, HaOptions};

use crate::cli::ClusterCommand;

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
        ClusterCommand::Down { dir } => {
            let cluster = HaCluster::open(&dir)?;
            let running = cluster.running_processes();
            if running.is_empty() {
                println!("nothing running in {}", cluster.root().display());
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("stopping {} …", running.join(", "));
            tokio::task::spawn_blocking(move || {
                cluster.down();
                cluster.running_processes()
            })
            .await?
            .is_empty()
            .then_some(())
            .context("some processes did not stop; see `dalp cluster status`")?;
            println!("stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
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
    let migrator = cluster.connect_options(MIGRATOR_ROLE)?;
    let mut client = migrator
        .connect()
        .await
        .context("connect to the primary as the migrator")?;
    super::up::apply_migrations(&mut client).await?;
    Ok(cluster)
}

async fn print_status(cluster: &HaCluster, json: bool) -> anyhow::Result<ExitCode> {
    let status = cluster.status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!(
            "{:<8} {:<13} {:<10} {:<17} {:>8} {:>12}",
            "member", "role", "state", "address", "timeline", "lag (bytes)"
        );
        for m in &status.members {
            println!(
                "{:<8} {:<13} {:<10} {:<17} {:>8} {:>12}",
                m.name,
                m.role,
                m.state,
                format!("{}:{}", m.host, m.port),
                m.timeline.map(|t| t.to_string()).unwrap_or_default(),
                m.lag.map(|l| l.to_string()).unwrap_or_else(|| {
                    if m.role == "leader" {
                        String::new()
                    } else {
                        "unknown".into()
                    }
                }),
            );
        }
        for n in &status.missing {
            println!("{n:<8} {:<13} {:<10}", "-", "not running");
        }
    }
    let healthy = status.leader().is_some()
        && status.missing.is_empty()
        && (cluster.nodes().len() == 1 || status.sync_standby().is_some());
    if !healthy && !json {
        eprintln!("the cluster is degraded: no leader, a missing node, or no synchronous standby");
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
