//! Partition maintenance, the background duty of every serving process (`dalp up` and
//! `dalp serve`): partitions created ahead, those past retention dropped. Several processes
//! may serve one database; a session advisory lock lets one of them do each round.

use std::time::Duration;

use anyhow::Context;
use dalp_app::catalog::Retention;

// ---- command line ------------------------------------------------------------------

use clap::Args;

/// How long time-partitioned data is kept (whole monthly partitions are dropped).
#[derive(Debug, Args, Clone, Copy)]
pub struct RetentionArgs {
    /// Months audit partitions are kept before retention drops them (recorded in the audit
    /// retention log).
    #[arg(long, default_value_t = 84, value_parser = clap::value_parser!(u32).range(1..=1200))]
    pub audit_retention_months: u32,
    /// Months indexed chain data (transactions, logs, transfers, balance history) is kept
    /// [default: forever; it can always be re-read from the chain].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1200))]
    pub indexed_retention_months: Option<u32>,
}

impl RetentionArgs {
    pub fn retention(self) -> dalp_app::catalog::Retention {
        dalp_app::catalog::Retention {
            audit_months: self.audit_retention_months,
            indexed_months: self.indexed_retention_months,
        }
    }
}

/// Key of the advisory lock a maintenance round holds.
pub const PARTITION_MAINTENANCE_LOCK: i64 = 0x6461_6c70_7061_7274; // "dalppart"

/// Creates partitions ahead and drops those past retention, for every partitioned table.
pub async fn maintain_partitions(
    owner: &mut tokio_postgres::Client,
    retention: Retention,
) -> anyhow::Result<()> {
    for policy in &dalp_app::catalog::partition_policies(retention) {
        let m = dalp_db::partitions::maintain(owner, policy, chrono::Utc::now())
            .await
            .with_context(|| {
                format!("maintain partitions of {}.{}", policy.schema, policy.table)
            })?;
        if !m.created.is_empty() || !m.dropped.is_empty() {
            eprintln!(
                "partitions of {}: created {:?}, dropped {:?}",
                m.table, m.created, m.dropped
            );
        }
    }
    Ok(())
}

/// One round on a connection of its own, unless another process holds the lock (it is doing
/// the same round). Returns whether this process did it.
pub async fn maintenance_round(
    migrator: &dalp_db::ConnectOptions,
    retention: Retention,
) -> anyhow::Result<bool> {
    let mut c = migrator
        .connect()
        .await
        .context("connect as the migrator for partition maintenance")?;
    let locked: bool = c
        .query_one(
            "SELECT pg_try_advisory_lock($1)",
            &[&PARTITION_MAINTENANCE_LOCK],
        )
        .await?
        .get(0);
    if !locked {
        return Ok(false);
    }
    // The lock is the session's: it goes with the connection.
    maintain_partitions(&mut c, retention).await?;
    Ok(true)
}

/// Maintenance every `interval`, as the migrator (owner); with `now`, the first round runs at
/// once. Failures are logged and retried at the next round.
pub async fn partition_maintenance(
    migrator: dalp_db::ConnectOptions,
    retention: Retention,
    interval: Duration,
    now: bool,
) {
    if !now {
        tokio::time::sleep(interval).await;
    }
    loop {
        match maintenance_round(&migrator, retention).await {
            Ok(true) => tracing::debug!("partition maintenance done"),
            Ok(false) => {
                tracing::debug!("partition maintenance skipped: another process holds the lock")
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "partition maintenance failed; retrying at the next round")
            }
        }
        tokio::time::sleep(interval).await;
    }
}
