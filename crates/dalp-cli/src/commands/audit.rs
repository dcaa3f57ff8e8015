//! `dalp audit verify|checkpoint` and `dalp partitions`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use dalp_api::catalog::PARTITIONS;
use dalp_audit::{AuditKey, Checkpoint, Sealer};
use dalp_db::connect::ConnectOptions;
use dalp_db::partitions;
use dalp_ops::Layout;
use tokio_postgres::Client;

use crate::cli::{AuditKeyArgs, TargetArgs};
use crate::target::connect_admin;

/// Audit reads run as the auditor role on an embedded instance, or as the URL's user.
async fn connect_auditor(target: &TargetArgs) -> anyhow::Result<Client> {
    let opts = match &target.database_url {
        Some(url) => ConnectOptions::from_url(url)?,
        None => Layout::new(&target.data_dir)
            .connect_options("dalp_auditor")
            .with_context(|| format!("instance in {}", target.data_dir.display()))?,
    };
    Ok(opts.connect().await?)
}

pub async fn verify(
    target: &TargetArgs,
    key: &AuditKeyArgs,
    checkpoint: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let key_path = key.audit_key.clone().unwrap_or_else(|| {
        Layout::new(&target.data_dir)
            .keys_dir()
            .join(dalp_api::AUDIT_KEY_FILE)
    });
    let key = AuditKey::open(&key_path)?;
    let cp: Option<Checkpoint> = match checkpoint {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?,
            )
            .with_context(|| format!("{} is not a dalp checkpoint", p.display()))?,
        ),
        None => None,
    };
    let client = connect_auditor(target).await?;
    let report = dalp_audit::verify(&client, &key.public(), cp.as_ref()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} batches, {} events checked, {} removed by retention, last sequence {}",
            report.batches, report.events_checked, report.events_retained, report.last_seq
        );
        match &report.problem {
            None => println!(
                "ok: the audit chain is intact{}",
                if cp.is_some() {
                    " and reaches the checkpoint"
                } else {
                    ""
                }
            ),
            Some(p) => println!("TAMPERED: {p}"),
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn checkpoint(target: &TargetArgs, out: Option<&Path>) -> anyhow::Result<ExitCode> {
    let client = connect_auditor(target).await?;
    let cp = Sealer::checkpoint(&client)
        .await?
        .context("nothing is sealed yet: no checkpoint to export")?;
    let text = serde_json::to_string_pretty(&cp)?;
    match out {
        Some(p) => {
            std::fs::write(p, format!("{text}\n"))
                .with_context(|| format!("write {}", p.display()))?;
            eprintln!(
                "checkpoint of batch {} (sequence {}) written to {}",
                cp.batch_no,
                cp.last_seq,
                p.display()
            );
        }
        None => println!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn partitions(target: &TargetArgs, apply: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = connect_admin(target).await?;
    let mut out = Vec::new();
    for policy in &PARTITIONS {
        let table = format!("{}.{}", policy.schema, policy.table);
        if apply {
            let m = partitions::maintain(&mut client, policy, chrono::Utc::now()).await?;
            if !json {
                println!(
                    "{table}: created {:?}, dropped {:?}, covered until {}",
                    m.created,
                    m.dropped,
                    m.horizon
                        .map(|h| h.to_rfc3339())
                        .unwrap_or_else(|| "-".into())
                );
            }
        }
        let parts = partitions::list(&client, policy).await?;
        if !json {
            println!(
                "{table}: {} partitions, retention {}, {} months kept ahead",
                parts.len(),
                policy
                    .retention_months
                    .map(|m| format!("{m} months"))
                    .unwrap_or_else(|| "none".into()),
                policy.ahead_months
            );
            for p in &parts {
                println!(
                    "  {:24} {} .. {}",
                    p.name,
                    p.from.format("%Y-%m-%d"),
                    p.to.format("%Y-%m-%d")
                );
            }
        }
        out.push(serde_json::json!({ "table": table, "partitions": parts }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(ExitCode::SUCCESS)
}
