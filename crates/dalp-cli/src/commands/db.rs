//! `dalp db url|top|lint`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dalp_db::analysis::{self, Severity, TopOrder};
use dalp_db::component::login_roles;

use crate::cli::TargetArgs;
use crate::target::connect_admin;

// ---- command line ------------------------------------------------------------------

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Print a libpq URL (sslmode=verify-full, sslrootcert set) for a role of the embedded
    /// instance; it contains the role's password, and `psql` accepts it as is.
    Url {
        /// Data directory of the embedded instance.
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Login role, e.g. dalp_indexer_svc, dalp_auditor, dalp_readonly, dalp_migrator.
        #[arg(long)]
        role: String,
        /// Connect through a pooler on this 127.0.0.1 port (see `dalp pool up`) instead
        /// of PostgreSQL itself.
        #[arg(long)]
        port: Option<u16>,
    },
    /// The heaviest statements (pg_stat_statements) with the component that ran them:
    /// calls, total and mean time, and a rough p95 (mean + 2 standard deviations).
    Top {
        #[command(flatten)]
        target: TargetArgs,
        /// total, mean or calls.
        #[arg(long, default_value = "total")]
        by: String,
        #[arg(long, default_value_t = 15)]
        limit: i64,
        /// Only this component's statements (identity, assets, indexer, workflows, auditor,
        /// readonly, audit-sealer, migrator).
        #[arg(long)]
        component: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Generic plans of a component's heaviest statements (from pg_stat_statements), to see
    /// which indexes its hot queries use. Plans of slow statements as they ran are in the
    /// server log (auto_explain).
    Explain {
        #[command(flatten)]
        target: TargetArgs,
        /// identity, assets, indexer, workflows, auditor, readonly, audit-sealer or migrator.
        #[arg(long)]
        component: String,
        /// total, mean or calls.
        #[arg(long, default_value = "total")]
        by: String,
        #[arg(long, default_value_t = 5)]
        limit: i64,
    },
    /// Index coverage and health: unindexed foreign keys, duplicate and unused indexes,
    /// tables read by sequential scans, bloat on the workflow tables, partitions missing
    /// ahead. Exits 1 when a finding is at or above --fail-on.
    Lint {
        #[command(flatten)]
        target: TargetArgs,
        /// info, warning or error.
        #[arg(long, default_value = "warning")]
        fail_on: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn url(data_dir: &Path, role: &str, port: Option<u16>) -> anyhow::Result<ExitCode> {
    if !login_roles().any(|r| r == role) && role != dalp_db::component::ADMIN_ROLE {
        bail!(
            "unknown role `{role}`; login roles are: {}",
            login_roles().collect::<Vec<_>>().join(", ")
        );
    }
    let mut opts = crate::target::dir_options(data_dir, role)?;
    opts.application_name = "psql".into();
    if let Some(port) = port {
        opts.hosts = vec![("127.0.0.1".into(), port)];
        opts.read_write = false;
    }
    println!("{}", opts.to_url());
    Ok(ExitCode::SUCCESS)
}

fn role_arg(component: &str) -> anyhow::Result<&'static str> {
    analysis::role_of_component(component).with_context(|| {
        format!("--component {component}: use identity, assets, indexer, workflows, auditor, readonly, audit-sealer or migrator")
    })
}

pub async fn explain(
    target: &TargetArgs,
    component: &str,
    by: &str,
    limit: i64,
) -> anyhow::Result<ExitCode> {
    let order =
        TopOrder::parse(by).with_context(|| format!("--by {by}: use total, mean or calls"))?;
    let role = role_arg(component)?;
    let mut client = connect_admin(target).await?;
    let plans = analysis::explain(&mut client, role, order, limit.clamp(1, 50)).await?;
    if plans.is_empty() {
        println!("no explainable statements recorded for {component} yet");
    }
    for p in plans {
        println!(
            "── {} calls, mean {:.3} ms, total {:.1} ms\n{}\n",
            p.statement.calls, p.statement.mean_ms, p.statement.total_ms, p.statement.query
        );
        match p.plan {
            Ok(plan) => println!("{plan}\n"),
            Err(e) => println!("(no plan: {e})\n"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn top(
    target: &TargetArgs,
    by: &str,
    limit: i64,
    component: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let order =
        TopOrder::parse(by).with_context(|| format!("--by {by}: use total, mean or calls"))?;
    let role = component.map(role_arg).transpose()?;
    let client = connect_admin(target).await?;
    let rows = analysis::top(&client, order, limit.clamp(1, 500), role).await?;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:>9} {:>12} {:>10} {:>10}  statement",
        "component", "calls", "total ms", "mean ms", "~p95 ms"
    );
    for r in rows {
        println!(
            "{:<16} {:>9} {:>12.1} {:>10.3} {:>10.3}  {}",
            r.component, r.calls, r.total_ms, r.mean_ms, r.p95ish_ms, r.query
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn lint(target: &TargetArgs, fail_on: &str, json: bool) -> anyhow::Result<ExitCode> {
    let threshold = Severity::parse(fail_on)
        .with_context(|| format!("--fail-on {fail_on}: use info, warning or error"))?;
    let client = connect_admin(target).await?;
    let opts = dalp_app::catalog::lint_options();
    let findings = analysis::lint(&client, &opts, chrono::Utc::now()).await?;
    if json {
        println!("{}", serde_json::to_string(&findings)?);
    } else if findings.is_empty() {
        println!("no findings in {}", opts.schemas.join(", "));
    } else {
        for f in &findings {
            println!(
                "{:<8} {:<22} {}: {}\n         fix: {}",
                f.severity.as_str(),
                f.check,
                f.object,
                f.message,
                f.fix
            );
        }
    }
    Ok(if findings.iter().any(|f| f.severity >= threshold) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
