//! `dalp serve`: the HTTP API against an external cluster.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dalp_api::ApiSettings;
use dalp_app::config::Config;
use dalp_db::{ComponentPools, Secrets, MIGRATOR_ROLE};

use super::lifecycle::{Process, ProcessSpec};

/// The role passwords a configuration points at (file, environment, secrets command).
pub fn config_secrets(config: &Config) -> anyhow::Result<Secrets> {
    let mut secrets = match &config.database.secrets_file {
        Some(f) => Secrets::load(f)?,
        None => Secrets::default(),
    };
    secrets.command = config.database.secrets_command.clone();
    Ok(secrets)
}

/// The component pools a configuration describes (through its pooler when it names one).
pub fn config_pools(config: &Config, pool_size: usize) -> anyhow::Result<ComponentPools> {
    let secrets = config_secrets(config)?;
    let base = config.connect_options(MIGRATOR_ROLE, "dalp");
    let pooled = config
        .pooler_options(MIGRATOR_ROLE, "dalp")
        .unwrap_or_else(|| base.clone());
    Ok(ComponentPools::build_via(
        &pooled,
        &base,
        &secrets,
        pool_size,
        Duration::from_millis(config.database.pool_wait_timeout_ms),
    )?)
}

/// `keys.dir` of a configuration, which every verb that reads or writes PII needs.
pub fn config_keys_dir(config: &Config) -> anyhow::Result<&Path> {
    config
        .keys
        .dir
        .as_deref()
        .context("keys.dir is not set: dalp needs its key files (PII encryption, audit signing)")
}

pub async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(Some(path), std::env::vars())?;
    let pools = config_pools(&config, config.database.pool_max_size)?;
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("bind the API to {}", config.api.listen))?;
    let keys_dir = config_keys_dir(&config)?;
    let m = &config.maintenance;
    let mut owner = config.connect_options(MIGRATOR_ROLE, "dalp-maintenance");
    owner.password = Some(
        config_secrets(&config)?
            .password(MIGRATOR_ROLE)
            .context("partition maintenance connects as dalp_migrator")?,
    );
    let backups = match &m.backup_dir {
        Some(dir) => Some(dalp_ops::backup::for_dir(dir).with_context(|| {
            format!(
                "maintenance.backup_dir {}: no pgBackRest repository there",
                dir.display()
            )
        })?),
        None => None,
    };
    let tls = match (&config.api.tls_cert, &config.api.tls_key) {
        (Some(cert), Some(key)) => Some(dalp_api::tls::server_config(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let process = Process::start(ProcessSpec {
        pools: Arc::new(pools),
        keys_dir,
        settings: ApiSettings {
            max_body_bytes: config.api.max_body_bytes,
            login_attempts_per_minute: config.api.login_attempts_per_minute,
        },
        replicas: config.replica_hosts(),
        maintenance: (
            owner,
            dalp_app::catalog::Retention {
                audit_months: m.audit_retention_months,
                indexed_months: m.indexed_retention_months,
            },
            Duration::from_secs(m.partition_interval_secs),
        ),
        maintenance_now: true,
        backups,
        listener,
        tls,
        limits: dalp_api::server::ConnectionLimits::from_config(&config.api),
    })
    .await?;
    eprintln!("serving the API on {scheme}://{}", process.addr);
    process.run_until_shutdown().await?;
    Ok(ExitCode::SUCCESS)
}
