//! Resolving `--data-dir` / `--database-url` into connection options.

use anyhow::Context;
use dalp_db::connect::ConnectOptions;
use dalp_db::MIGRATOR_ROLE;
use std::path::Path;

use dalp_ops::{HaCluster, Layout};
use tokio_postgres::Client;

use crate::cli::TargetArgs;

/// Options for `role` on the instance in `dir`: an embedded instance (`dalp up`) or a local
/// HA cluster (`dalp cluster up`, every node listed, writes to the primary).
pub fn dir_options(dir: &Path, role: &str) -> anyhow::Result<ConnectOptions> {
    if dalp_ops::HaCluster::is_cluster_dir(dir) {
        return Ok(HaCluster::open(dir)?.connect_options(role)?);
    }
    Layout::new(dir)
        .connect_options(role)
        .with_context(|| format!("instance in {}", dir.display()))
}

/// Options for the administrative (migrator) connection of the target.
pub fn admin_options(target: &TargetArgs) -> anyhow::Result<ConnectOptions> {
    match &target.database_url {
        Some(url) => Ok(ConnectOptions::from_url(url)?),
        None => dir_options(&target.data_dir, MIGRATOR_ROLE),
    }
}

/// Connects as the target's administrative role.
pub async fn connect_admin(target: &TargetArgs) -> anyhow::Result<Client> {
    let mut opts = admin_options(target)?;
    opts.application_name = "dalp-cli".into();
    let client = opts
        .connect()
        .await
        .with_context(|| match &target.database_url {
            Some(_) => "connect to the --database-url cluster".to_string(),
            None => format!(
                "connect to the instance in {} (is `dalp up` running?)",
                target.data_dir.display()
            ),
        })?;
    Ok(client)
}

/// A small pool as `component`'s role of the embedded instance, or as the URL's user.
pub fn component_pool(
    target: &TargetArgs,
    component: dalp_db::Component,
) -> anyhow::Result<deadpool_postgres::Pool> {
    use deadpool_postgres::{Pool, RecyclingMethod, Runtime};
    let mut opts = match &target.database_url {
        Some(url) => ConnectOptions::from_url(url)?,
        None => dir_options(&target.data_dir, component.role())?,
    };
    opts.application_name = component.application_name().into();
    let manager = opts.manager(RecyclingMethod::Fast)?;
    Ok(Pool::builder(manager)
        .max_size(4)
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .create_timeout(Some(opts.connect_timeout))
        .runtime(Runtime::Tokio1)
        .build()?)
}
