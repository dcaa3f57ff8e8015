//! `dalp up`: the main job. Embedded cluster, migrations, roles, HTTP API; Ctrl-C or
//! SIGTERM stops the API first, then PostgreSQL.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dalp_api::ApiSettings;
use dalp_db::{ComponentPools, MIGRATOR_ROLE};
use dalp_ops::embedded::DATABASE;
use dalp_ops::{HaCluster, Instance, OpsError, RunningCluster, StartOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::lifecycle::{apply_migrations, Process, ProcessSpec};
use super::maintenance::maintain_partitions;

// ---- command line ------------------------------------------------------------------

use super::maintenance::RetentionArgs;
use crate::cli::HaArgs;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory: PostgreSQL data, TLS material, role passwords, logs.
    #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
    pub data_dir: PathBuf,
    /// PostgreSQL port on 127.0.0.1 and ::1 [default: the previous port if free, else any free port].
    #[arg(long)]
    pub pg_port: Option<u16>,
    /// HTTP API port on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    pub api_port: u16,
    /// Serve the API over TLS with this PEM certificate chain (with --api-tls-key).
    #[arg(long)]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key for --api-tls-cert.
    #[arg(long)]
    pub api_tls_key: Option<PathBuf>,
    /// pgAudit session classes logged when pgAudit is installed (comma-separated: read,
    /// write, function, role, ddl, misc, misc_set, all, none).
    #[arg(long, default_value = "write, ddl, role")]
    pub pgaudit_log: String,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Log the plan of every statement slower than this many milliseconds (auto_explain).
    #[arg(long, default_value_t = 500)]
    pub slow_query_ms: u32,
    /// PostgreSQL's max_connections (embedded instance). Clients beyond it belong behind
    /// `dalp pool up`.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(20..=5000))]
    pub max_connections: u32,
    /// Seed a demo organisation, an administrator (password printed once), a bond and a
    /// stablecoin, unless they exist.
    #[arg(long)]
    pub demo: bool,
    /// Run on a local HA cluster (Patroni + etcd, synchronous replication) in --data-dir
    /// instead of a single embedded instance: started if it is not running, stopped on exit
    /// if this command started it.
    #[arg(long)]
    pub ha: bool,
    #[command(flatten)]
    pub ha_opts: HaArgs,
}

pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    // Claim the API port before anything else, so a busy port fails fast and clearly.
    let api_addr = SocketAddr::from(([127, 0, 0, 1], args.api_port));
    let listener = match tokio::net::TcpListener::bind(api_addr).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(OpsError::PortInUse {
                port: args.api_port,
                host: "127.0.0.1".into(),
                flag: "--api-port",
            }
            .into())
        }
        Err(e) => return Err(e).with_context(|| format!("bind the API to {api_addr}")),
    };
    let api_addr = listener.local_addr()?;
    let tls = match (&args.api_tls_cert, &args.api_tls_key) {
        (Some(c), Some(k)) => Some(dalp_api::tls::server_config(c, k)?),
        (None, None) => None,
        _ => anyhow::bail!("--api-tls-cert and --api-tls-key go together"),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };

    let backend = if args.ha {
        Backend::start_ha(&args).await?
    } else {
        Backend::start_embedded(&args).await?
    };
    let migrator = backend.migrator()?;
    let mut client = migrator
        .connect()
        .await
        .context("connect as the migrator over TLS")?;
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    eprintln!(
        "PostgreSQL {version} at {} (TLS only)",
        migrator
            .hosts
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    apply_migrations(&mut client).await?;
    maintain_partitions(&mut client, args.retention.retention()).await?;
    drop(client);

    // The same pool size and maintenance interval `dalp serve` uses when its config does not
    // set them: up is serve plus the embedded PostgreSQL.
    let pools = Arc::new(ComponentPools::build(
        &migrator,
        backend.secrets(),
        dalp_db::config::DatabaseConfig::default().pool_max_size,
        Duration::from_secs(5),
    )?);
    // On an HA cluster every node is a read replica candidate (the one that is primary now
    // is read as the primary; after a failover the routing follows).
    let keys_dir = backend.keys_dir();
    let started = Process::start(ProcessSpec {
        pools: pools.clone(),
        keys_dir: &keys_dir,
        settings: ApiSettings::default(),
        replicas: backend.replicas(),
        maintenance: (
            migrator.clone(),
            args.retention.retention(),
            Duration::from_secs(
                dalp_app::config::MaintenanceConfig::default().partition_interval_secs,
            ),
        ),
        // The first round ran above, before serving.
        maintenance_now: false,
        backups: backend.backups(),
        listener,
        tls: tls.clone(),
        limits: Default::default(),
    })
    .await;
    let process = match started {
        Ok(p) => p,
        Err(e) => {
            pools.close();
            tokio::task::spawn_blocking(move || backend.shutdown()).await??;
            return Err(e);
        }
    };
    let demo_password = if args.demo {
        super::demo::seed(&process.services.state)
            .await
            .context("seed the demo data")
    } else {
        Ok(None)
    };

    // "ready" only once the API really answers and the database is current.
    let ready = match demo_password {
        Err(e) => Err(e),
        Ok(pw) if tls.is_some() => {
            // Over TLS the self-check stops at the TCP accept; /readyz is for clients with
            // the CA.
            tokio::net::TcpStream::connect(api_addr)
                .await
                .map(|_| pw)
                .context("the API does not accept connections")
        }
        Ok(pw) => wait_ready(api_addr, Duration::from_secs(30))
            .await
            .map(|_| pw),
    };
    let demo_password = match ready {
        Ok(pw) => pw,
        Err(e) => {
            process.stop().await;
            tokio::task::spawn_blocking(move || backend.shutdown()).await??;
            return Err(e);
        }
    };
    println!(
        "dalp ready: api {scheme}://{api_addr}  postgres {}  data {}  ca {}",
        backend.describe(),
        backend.root().display(),
        backend.ca_cert().display()
    );
    println!(
        "  connect: psql \"$(dalp db url --data-dir {} --role dalp_readonly)\"   stop: Ctrl-C",
        backend.root().display()
    );
    if let Some(pw) = demo_password {
        println!(
            "  demo: organisation `{}`, admin {} password {pw} (shown once; enrol TOTP at first login), a bond and a stablecoin",
            super::demo::DEMO_ORG,
            super::demo::DEMO_ADMIN
        );
    }

    let served = process.run_until_shutdown().await;
    if let Err(e) = &served {
        eprintln!("{e:#}");
    }
    tokio::task::spawn_blocking(move || backend.shutdown())
        .await
        .context("stop PostgreSQL")??;
    eprintln!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// What `dalp up` runs on: one embedded instance, or a local HA cluster.
enum Backend {
    Embedded(RunningCluster),
    Ha {
        cluster: Box<HaCluster>,
        /// Stop it on exit only when this command started it.
        started_here: bool,
    },
}

impl Backend {
    async fn start_embedded(args: &UpArgs) -> anyhow::Result<Backend> {
        let instance = Instance::open(&args.data_dir)?;
        let fresh = !instance.layout().pgdata().join("PG_VERSION").exists();
        eprintln!(
            "{} PostgreSQL in {} …",
            if fresh {
                "initialising and starting"
            } else {
                "starting"
            },
            instance.layout().root().display()
        );
        let opts = StartOptions {
            pg_port: args.pg_port,
            bin_dir: None,
            pgaudit_log: Some(args.pgaudit_log.clone()),
            slow_query_ms: Some(args.slow_query_ms),
            max_connections: Some(args.max_connections),
            archive_command: None,
            archive_timeout_secs: None,
            managed: false,
        };
        // WAL archiving to pgBackRest unless turned off.
        let cluster = if !args.ha_opts.no_archive && dalp_ops::backup::available() {
            let cluster = dalp_ops::backup::start_archiving(instance, opts)
                .await
                .context("start with WAL archiving (use --no-archive to run without it)")?;
            eprintln!(
                "WAL archiving to pgBackRest in {} (take backups with `dalp backup run`, or schedule `dalp backup due`)",
                cluster.layout().root().join("backup").display()
            );
            cluster
        } else {
            instance.start(opts).await?
        };
        Ok(Backend::Embedded(cluster))
    }

    async fn start_ha(args: &UpArgs) -> anyhow::Result<Backend> {
        if args.pg_port.is_some() {
            anyhow::bail!("--pg-port does not apply with --ha: each node gets a free port (see `dalp cluster status`)");
        }
        if dalp_ops::HaCluster::is_cluster_dir(&args.data_dir) {
            let cluster = HaCluster::open(&args.data_dir)?;
            if !cluster.running_processes().is_empty() {
                cluster.leader().await.context(
                    "the HA cluster in --data-dir runs but has no leader; see `dalp cluster status`",
                )?;
                eprintln!(
                    "using the running HA cluster in {}",
                    cluster.root().display()
                );
                return Ok(Backend::Ha {
                    cluster: Box::new(cluster),
                    started_here: false,
                });
            }
        }
        let cluster = super::cluster::up(
            &args.data_dir,
            args.ha_opts.options(&args.pgaudit_log, args.slow_query_ms),
        )
        .await?;
        Ok(Backend::Ha {
            cluster: Box::new(cluster),
            started_here: true,
        })
    }

    /// Read replicas: every node of an HA cluster; none for the embedded instance.
    fn replicas(&self) -> Vec<(String, u16)> {
        match self {
            Backend::Embedded(_) => Vec::new(),
            Backend::Ha { cluster, .. } => cluster
                .nodes()
                .iter()
                .map(|n| (n.address.clone(), n.pg_port))
                .collect(),
        }
    }

    /// pgBackRest for this backend when it archives WAL.
    fn backups(&self) -> Option<dalp_ops::backup::Backups> {
        match self {
            Backend::Embedded(c) => {
                let b = dalp_ops::backup::embedded_backups(c.layout()).ok()?;
                b.config_path().exists().then_some(b)
            }
            Backend::Ha { cluster, .. } => cluster.backups().ok().flatten(),
        }
    }

    fn migrator(&self) -> anyhow::Result<dalp_db::ConnectOptions> {
        Ok(match self {
            Backend::Embedded(c) => c.role_options(MIGRATOR_ROLE, DATABASE),
            Backend::Ha { cluster, .. } => cluster.connect_options(MIGRATOR_ROLE)?,
        })
    }

    fn secrets(&self) -> &dalp_db::Secrets {
        match self {
            Backend::Embedded(c) => c.secrets(),
            Backend::Ha { cluster, .. } => cluster.secrets(),
        }
    }

    fn root(&self) -> &std::path::Path {
        match self {
            Backend::Embedded(c) => c.layout().root(),
            Backend::Ha { cluster, .. } => cluster.root(),
        }
    }

    fn keys_dir(&self) -> std::path::PathBuf {
        self.root().join("keys")
    }

    fn ca_cert(&self) -> std::path::PathBuf {
        match self {
            Backend::Embedded(c) => c.layout().ca_cert(),
            Backend::Ha { cluster, .. } => cluster.ca_cert(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Backend::Embedded(c) => format!("127.0.0.1:{}", c.port()),
            Backend::Ha { cluster, .. } => format!(
                "HA {} nodes (127.0.0.1:{})",
                cluster.nodes().len(),
                cluster
                    .nodes()
                    .iter()
                    .map(|n| n.pg_port.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    fn shutdown(self) -> anyhow::Result<()> {
        match self {
            Backend::Embedded(c) => c.shutdown()?,
            Backend::Ha {
                cluster,
                started_here: true,
            } => cluster.down(),
            Backend::Ha { .. } => {}
        }
        Ok(())
    }
}

/// Polls `GET /readyz` until it answers 200.
async fn wait_ready(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match http_get(addr, "/readyz").await {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => last = format!("HTTP {status}: {body}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the API did not become ready within {timeout:?}: {last}")
}

/// A minimal HTTP/1.1 GET, enough for a self-check without an HTTP client dependency.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}
