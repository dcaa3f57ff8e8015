//! What several verbs share about a process's life: the serving process itself
//! ([`Process`], the same for `dalp up` and `dalp serve`), stopping on Ctrl-C or SIGTERM,
//! and bringing an instance's schemas to the catalog's latest version. (Shared here so
//! that `up`, `cluster`, `serve`, `pool` and `audit` do not import each other.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dalp_api::server::ConnectionLimits;
use dalp_api::{ApiSettings, Services};
use dalp_app::catalog::{Retention, MIGRATIONS};
use dalp_db::{migrate, ComponentPools, ConnectOptions};
use dalp_ops::backup::Backups;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::maintenance::partition_maintenance;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

/// Applies every pending migration through `client` (the migrator) and says how many.
pub async fn apply_migrations(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    let report = migrate::migrate(client, &MIGRATIONS, false)
        .await
        .context("apply migrations")?;
    eprintln!(
        "migrations: {} applied now, {} already applied",
        report.applied.len(),
        report.already_applied
    );
    Ok(())
}

/// What a serving process is given once PostgreSQL is reachable. `dalp serve` builds it from
/// its config file; `dalp up` from the embedded instance or local HA cluster it started.
pub struct ProcessSpec<'a> {
    pub pools: Arc<ComponentPools>,
    pub keys_dir: &'a Path,
    pub settings: ApiSettings,
    /// Read replicas (`host`, `port`) for reads that tolerate one.
    pub replicas: Vec<(String, u16)>,
    /// Partition maintenance: the owner's connection options, what to keep, how often
    /// (advisory-locked, so several API processes may run it).
    pub maintenance: (ConnectOptions, Retention, Duration),
    /// Run the first maintenance round at once (`serve`); `up` has run one before serving,
    /// so its loop starts with a wait.
    pub maintenance_now: bool,
    /// The pgBackRest repositories whose newest backups `/metrics` reports, if any.
    pub backups: Option<Backups>,
    pub listener: TcpListener,
    pub tls: Option<dalp_api::tls::ServerTls>,
    pub limits: ConnectionLimits,
}

/// One running dalp: the application (stores, caches, sealer, replica routing), partition
/// maintenance, the backup-age watch and the HTTP API. `dalp up` and `dalp serve` both run
/// exactly this; `up` only adds the embedded PostgreSQL in front of it.
pub struct Process {
    pub services: Services,
    pub addr: std::net::SocketAddr,
    /// The HTTP server; taken once it has ended.
    server: Option<JoinHandle<std::io::Result<()>>>,
    stop: tokio::sync::oneshot::Sender<()>,
    tasks: Vec<JoinHandle<()>>,
    pools: Arc<ComponentPools>,
}

impl Process {
    pub async fn start(spec: ProcessSpec<'_>) -> anyhow::Result<Process> {
        let services = Services::start_with_replicas(
            spec.pools.clone(),
            spec.keys_dir,
            spec.settings,
            &spec.replicas,
        )?;
        let (owner, retention, interval) = spec.maintenance;
        let mut tasks = vec![tokio::spawn(partition_maintenance(
            owner,
            retention,
            interval,
            spec.maintenance_now,
        ))];
        if let Some(b) = spec.backups {
            tasks.push(tokio::spawn(watch_backups(
                b,
                services.state.backups.clone(),
            )));
        }
        let addr = spec.listener.local_addr()?;
        let app = services.router();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = stop_rx.await;
        };
        let server = match spec.tls {
            Some(config) => tokio::spawn(dalp_api::serve_tls(
                spec.listener,
                config,
                app,
                spec.limits,
                stopped,
            )),
            None => tokio::spawn(dalp_api::serve(spec.listener, app, spec.limits, stopped)),
        };
        Ok(Process {
            services,
            addr,
            server: Some(server),
            stop,
            tasks,
            pools: spec.pools,
        })
    }

    /// Serves until Ctrl-C or SIGTERM (then stops gracefully) or until the server fails
    /// (an error).
    pub async fn run_until_shutdown(mut self) -> anyhow::Result<()> {
        let server = self.server.as_mut().expect("serving");
        let crashed = tokio::select! {
            _ = shutdown_signal() => None,
            r = server => Some(r),
        };
        if crashed.is_some() {
            self.server = None;
        }
        eprintln!("stopping …");
        self.stop().await;
        match crashed {
            None => Ok(()),
            Some(Ok(Ok(()))) => anyhow::bail!("the API server stopped unexpectedly"),
            Some(Ok(Err(e))) => Err(e).context("the API server failed"),
            Some(Err(e)) => Err(e).context("the API server task failed"),
        }
    }

    /// Stops serving (in-flight requests finish), the background tasks and the pools.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        if let Some(server) = self.server {
            let _ = server.await;
        }
        for t in &self.tasks {
            t.abort();
        }
        drop(self.services);
        self.pools.close();
    }
}

/// Keeps `/metrics`' newest-backup ages current (once a minute).
async fn watch_backups(
    backups: Backups,
    into: std::sync::Arc<std::sync::RwLock<Option<dalp_app::BackupSnapshot>>>,
) {
    loop {
        let b = backups.clone();
        match tokio::task::spawn_blocking(move || b.list()).await {
            Ok(Ok(list)) => {
                let mut newest: Vec<(u8, chrono::DateTime<chrono::Utc>)> = Vec::new();
                for i in list {
                    match newest.iter_mut().find(|(r, _)| *r == i.repo) {
                        Some((_, t)) if *t < i.stopped => *t = i.stopped,
                        Some(_) => {}
                        None => newest.push((i.repo, i.stopped)),
                    }
                }
                newest.sort();
                *into.write().unwrap_or_else(|e| e.into_inner()) = Some(dalp_app::BackupSnapshot {
                    newest_by_repo: newest,
                });
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "reading the backup repositories failed"),
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}
