//! What several verbs share about a process's life: stopping on Ctrl-C or SIGTERM, and
//! bringing an instance's schemas to the catalog's latest version. (Shared here so that
//! `up`, `cluster`, `serve`, `pool` and `audit` do not import each other.)

use anyhow::Context;
use dalp_app::catalog::MIGRATIONS;
use dalp_db::migrate;

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
