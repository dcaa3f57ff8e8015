//! `dalp roles check` and `dalp roles create`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use dalp_app::catalog::ACCESS;
use dalp_db::connect::ConnectOptions;
use dalp_db::{access, roles, Secrets};

use crate::cli::TargetArgs;
use crate::target::connect_admin;

// ---- command line ------------------------------------------------------------------

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum RolesCommand {
    /// Print the actual role × schema × privilege matrix; exit 1 if it differs from the
    /// declared one.
    Check {
        #[command(flatten)]
        target: TargetArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Create dalp's roles on an external cluster (needs CREATEROLE, e.g. the managed
    /// service's admin user) and prepare the database. Passwords come from --secrets-file,
    /// which is generated (mode 0600) when it does not exist.
    Create {
        /// Admin connection URL (sslmode=verify-full).
        #[arg(long, env = "DALP_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// JSON file with the role passwords.
        #[arg(long)]
        secrets_file: PathBuf,
    },
}

pub async fn check(target: &TargetArgs, json: bool) -> anyhow::Result<ExitCode> {
    let client = connect_admin(target).await?;
    let report = access::check(&client, &ACCESS)
        .await
        .context("read privileges")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
        if report.is_clean() {
            println!("ok: the actual privileges match the declared matrix");
        } else {
            println!(
                "DRIFT: {} difference(s) from the declared matrix:",
                report.drift.len()
            );
            for d in &report.drift {
                println!("  - {d}");
            }
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn create(database_url: &str, secrets_file: &Path) -> anyhow::Result<ExitCode> {
    let opts = ConnectOptions::from_url(database_url)?;
    let secrets = if secrets_file.exists() {
        Secrets::load(secrets_file)?
    } else {
        let s = roles::generate_secrets();
        dalp_db::secrets::write_private(secrets_file, &serde_json::to_string_pretty(&s)?)
            .with_context(|| format!("write {}", secrets_file.display()))?;
        println!(
            "generated role passwords in {} (mode 0600)",
            secrets_file.display()
        );
        s
    };
    let client = opts.connect().await?;
    roles::ensure_roles(&client, &secrets).await?;
    roles::prepare_database(&client, &opts.dbname).await?;
    println!("roles created and database {} prepared", opts.dbname);
    Ok(ExitCode::SUCCESS)
}
