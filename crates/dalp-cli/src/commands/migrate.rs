//! `dalp migrate`.

use std::process::ExitCode;

use dalp_app::catalog::MIGRATIONS;
use dalp_db::migrate;

use crate::cli::TargetArgs;
use crate::target::connect_admin;

pub async fn run(target: &TargetArgs, dry_run: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect_admin(target).await?;
    let report = migrate::migrate(&mut client, &MIGRATIONS, dry_run).await?;
    let verb = if dry_run { "would apply" } else { "applied" };
    for (schema, version, name, took) in &report.applied {
        println!(
            "{verb} {schema}/{version:04}_{name} ({} ms)",
            took.as_millis()
        );
    }
    println!(
        "{} migration(s) {verb}, {} already applied",
        report.applied.len(),
        report.already_applied
    );
    Ok(ExitCode::SUCCESS)
}
