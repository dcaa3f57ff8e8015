//! `dalp pool up`: PgBouncer in front of the embedded instance or the HA cluster's leader.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use dalp_db::component::login_roles;
use dalp_ops::pooler::scram_verifiers;
use dalp_ops::{HaCluster, Layout, Pooler, PoolerSpec};

use super::lifecycle::shutdown_signal;

// ---- command line ------------------------------------------------------------------

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Run PgBouncer in front of the instance in --data-dir (embedded, or an HA cluster
    /// whose leader it follows) until Ctrl-C: transaction pooling, one pool per component
    /// role, SCRAM and TLS on both sides. Point `database.pooler` (dalp serve) at it;
    /// LISTEN keeps going directly to PostgreSQL.
    Up {
        /// Data directory of a running `dalp up`, or a `dalp cluster up` directory.
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Port on 127.0.0.1 [default: any free port].
        #[arg(long)]
        port: Option<u16>,
        /// Server connections per component role.
        #[arg(long, default_value_t = 20)]
        pool_size: u32,
        /// Client connections accepted in all.
        #[arg(long, default_value_t = 1000)]
        max_client_conn: u32,
        /// PgBouncer processes sharing the port (each single-threaded, with its own server
        /// pool); 0: one per CPU.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
        processes: u32,
    },
}

pub async fn run(command: PoolCommand) -> anyhow::Result<ExitCode> {
    let PoolCommand::Up {
        data_dir,
        port,
        pool_size,
        max_client_conn,
        processes,
    } = command;
    let ha = if dalp_ops::HaCluster::is_cluster_dir(&data_dir) {
        Some(HaCluster::open(&data_dir)?)
    } else {
        None
    };
    // Beside the embedded instance: its Unix socket; an HA leader moves, so TCP.
    let (root, su_options, server_port, socket_dir) = match &ha {
        Some(c) => {
            let leader = c
                .leader()
                .await
                .context("the pooler needs the HA cluster's leader")?;
            (
                c.root().to_path_buf(),
                c.superuser_options(&leader, "postgres"),
                c.pg_port(&leader).expect("leader is a node"),
                None,
            )
        }
        None => {
            let layout = Layout::new(&data_dir);
            let su = layout.superuser_options("postgres")?;
            let port = layout.port().expect("instance has a port");
            (
                layout.root().to_path_buf(),
                su,
                port,
                Some(layout.socket_dir()),
            )
        }
    };
    let roles: Vec<&str> = login_roles().collect();
    let users = scram_verifiers(&su_options, &roles)
        .await
        .with_context(|| format!("the instance in {}", root.display()))?;
    let pooler = Pooler::start(PoolerSpec {
        dir: root.join("pgbouncer"),
        tls_dir: root.join("tls"),
        server_port,
        server_socket_dir: socket_dir.clone(),
        processes,
        port,
        pool_size,
        max_client_conn,
        users,
    })
    .await?;
    let server = match &socket_dir {
        Some(d) => format!("the server's Unix socket in {}", d.display()),
        None => format!("127.0.0.1:{server_port} over TLS"),
    };
    println!(
        "pool ready: 127.0.0.1:{} → {server} ({} PgBouncer process(es) on the port, transaction mode, {pool_size} server connections per role and process, TLS required from clients)",
        pooler.port(),
        pooler.pids().len()
    );
    println!(
        "  connect: psql \"$(dalp db url --data-dir {} --role dalp_readonly --port {})\"   stop: Ctrl-C",
        root.display(),
        pooler.port()
    );
    match &ha {
        Some(cluster) => {
            tokio::select! {
                _ = shutdown_signal() => {},
                _ = pooler.follow_leader(cluster, Duration::from_secs(1)) => {},
            }
        }
        None => shutdown_signal().await,
    }
    eprintln!("stopping the pooler …");
    pooler.stop();
    Ok(ExitCode::SUCCESS)
}
