//! `dalp doctor`: one pass over what can go wrong, each finding with what to do next.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dalp_db::analysis;
use dalp_db::{Component, ComponentPools, ConnectOptions};
use dalp_ops::Layout;
use serde::Serialize;

use crate::cli::TargetArgs;
use crate::target::admin_options;

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    /// ok, info, warning or error.
    status: &'static str,
    detail: String,
    /// What to do next (empty when fine).
    next: String,
}

fn check(
    check: &'static str,
    status: &'static str,
    detail: impl Into<String>,
    next: impl Into<String>,
) -> Check {
    Check {
        check,
        status,
        detail: detail.into(),
        next: next.into(),
    }
}

/// Expiry of the certificates in `path` (PEM, possibly several).
fn cert_findings(path: &Path, warn_days: i64, now: DateTime<Utc>) -> Vec<Check> {
    let pem = match std::fs::read(path) {
        Ok(p) => p,
        Err(e) => {
            return vec![check(
                "certificate",
                "error",
                format!("{}: cannot read: {e}", path.display()),
                "check the path and permissions",
            )]
        }
    };
    let mut out = Vec::new();
    for item in x509_parser::pem::Pem::iter_from_buffer(&pem) {
        let parsed = item.ok().and_then(|p| {
            p.parse_x509()
                .ok()
                .map(|c| (c.subject().to_string(), c.validity().not_after.timestamp()))
        });
        let Some((subject, not_after)) = parsed else {
            out.push(check(
                "certificate",
                "error",
                format!("{}: not a PEM certificate", path.display()),
                "replace the file",
            ));
            continue;
        };
        let expires = DateTime::from_timestamp(not_after, 0).unwrap_or(now);
        let days = (expires - now).num_days();
        let what = format!(
            "{} ({subject}) expires {}",
            path.display(),
            expires.to_rfc3339()
        );
        out.push(if expires <= now {
            check("certificate", "error", format!("{what}: EXPIRED"), "replace it now: verify-full clients refuse it (the embedded cluster's certificates are in DATA_DIR/tls)")
        } else if days < warn_days {
            check("certificate", "warning", format!("{what}: in {days} days"), "rotate it before it expires")
        } else {
            check("certificate", "ok", format!("{what} (in {days} days)"), "")
        });
    }
    out
}

pub async fn run(
    target: &TargetArgs,
    certs: &[PathBuf],
    warn_days: i64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let now = Utc::now();
    let mut checks = Vec::new();
    let embedded = target.database_url.is_none();
    let layout = Layout::new(&target.data_dir);

    // Certificates.
    let mut cert_files: Vec<PathBuf> = certs.to_vec();
    if cert_files.is_empty() {
        if embedded {
            cert_files.push(layout.tls_dir().join(dalp_ops::pki::CA_CERT));
            cert_files.push(layout.tls_dir().join(dalp_ops::pki::SERVER_CERT));
        } else if let Ok(opts) = admin_options(target) {
            cert_files.extend(opts.ca_file.clone());
        }
    }
    for f in &cert_files {
        checks.extend(cert_findings(f, warn_days, now));
    }

    // Reachability over TLS.
    let opts: Option<ConnectOptions> = match admin_options(target) {
        Ok(o) => Some(o),
        Err(e) => {
            checks.push(check(
                "connect",
                "error",
                format!("{e:#}"),
                "start it with `dalp up`, or pass --database-url",
            ));
            None
        }
    };
    let client = match &opts {
        None => None,
        Some(o) => match o.connect().await {
            Ok(c) => {
                checks.push(check(
                    "connect",
                    "ok",
                    format!(
                        "{} over TLS (verify-full)",
                        o.to_url()
                            .split('@')
                            .nth(1)
                            .unwrap_or("")
                            .split('?')
                            .next()
                            .unwrap_or("")
                    ),
                    "",
                ));
                Some(c)
            }
            Err(e) => {
                checks.push(check("connect", "error", e.to_string(), "is the server running and its certificate valid for this host? (`dalp status`)"));
                None
            }
        },
    };

    if let Some(client) = client {
        // Migrations.
        match dalp_db::migrate::status(&client, &dalp_api::catalog::MIGRATIONS).await {
            Ok(st) => {
                let behind: Vec<String> = st
                    .iter()
                    .filter(|s| s.applied_version < s.latest_version)
                    .map(|s| format!("{} {}/{}", s.schema, s.applied_version, s.latest_version))
                    .collect();
                checks.push(if behind.is_empty() {
                    check("migrations", "ok", "every schema at its latest version", "")
                } else {
                    check(
                        "migrations",
                        "warning",
                        format!("behind: {}", behind.join(", ")),
                        "run `dalp migrate`",
                    )
                });
            }
            Err(e) => checks.push(check(
                "migrations",
                "error",
                e.to_string(),
                "run `dalp migrate`",
            )),
        }
        // Roles.
        match dalp_db::access::check(&client, &dalp_api::catalog::ACCESS).await {
            Ok(r) if r.is_clean() => checks.push(check(
                "roles",
                "ok",
                "privileges match the declared matrix",
                "",
            )),
            Ok(r) => checks.push(check(
                "roles",
                "error",
                r.drift.join("; "),
                "inspect `dalp roles check`; revoke what is not declared",
            )),
            Err(e) => checks.push(check("roles", "error", e.to_string(), "")),
        }
        // Index coverage and partitions.
        let lint = dalp_api::catalog::lint_options();
        match analysis::lint(&client, &lint, now).await {
            Ok(f) if f.is_empty() => checks.push(check(
                "schema_health",
                "ok",
                "indexes cover foreign keys; partitions ahead",
                "",
            )),
            Ok(f) => {
                for x in f {
                    checks.push(check(
                        "schema_health",
                        x.severity.as_str(),
                        format!("{}: {}: {}", x.check, x.object, x.message),
                        x.fix,
                    ));
                }
            }
            Err(e) => checks.push(check("schema_health", "warning", e.to_string(), "")),
        }
        let _ = client.batch_execute("RESET ROLE").await;
        // Component checks need the component roles: the embedded instance has their passwords.
        let pools = if embedded {
            dalp_db::Secrets::load(&layout.secrets_file())
                .ok()
                .and_then(|s| {
                    ComponentPools::build(
                        opts.as_ref().expect("connected"),
                        &s,
                        1,
                        Duration::from_secs(5),
                    )
                    .ok()
                })
        } else {
            None
        };
        match pools {
            None => checks.push(check("components", "info", "audit, indexer and workflow checks skipped: they connect as the component roles, whose passwords only the embedded instance keeps", "run `dalp doctor` with --data-dir on the instance, or watch /metrics")),
            Some(pools) => component_checks(&pools, &mut checks).await,
        }
    }
    checks.push(check(
        "replication",
        "info",
        "not configured: a single embedded node",
        "for HA see `dalp cluster up` (not built yet)",
    ));
    checks.push(check(
        "backups",
        "info",
        "not configured: no pgBackRest repository",
        "backups and PITR are not built yet",
    ));

    let worst = checks
        .iter()
        .map(|c| match c.status {
            "error" => 2,
            "warning" => 1,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    if json {
        println!("{}", serde_json::to_string(&checks)?);
    } else {
        for c in &checks {
            println!("{:<8} {:<14} {}", c.status, c.check, c.detail);
            if !c.next.is_empty() && c.status != "ok" {
                println!("{:<8} {:<14} → {}", "", "", c.next);
            }
        }
    }
    Ok(ExitCode::from(worst))
}

async fn component_checks(pools: &ComponentPools, checks: &mut Vec<Check>) {
    match dalp_audit::Sealer::lag(pools.get(Component::AuditSealer)).await {
        Ok(l) if l <= 60.0 => checks.push(check("audit_sealing", "ok", format!("seal lag {l:.1} s"), "")),
        Ok(l) => checks.push(check("audit_sealing", "warning", format!("seal lag {l:.0} s"), "is a sealer running (`dalp up`)? a long-open transaction holds sealing back (see pg_stat_activity)")),
        Err(e) => checks.push(check("audit_sealing", "error", e.to_string(), "")),
    }
    let indexed = dalp_indexed::IndexedStore::new(pools.get(Component::Indexer).clone());
    match indexed.chains().await {
        Ok(chains) if chains.is_empty() => {
            checks.push(check("indexer", "ok", "no chains registered", ""))
        }
        Ok(chains) => {
            for c in chains {
                match indexed.status(c.chain_id).await {
                    Ok(s) => {
                        let stale = s
                            .updated_at
                            .is_some_and(|u| Utc::now() - u > chrono::Duration::minutes(10));
                        let lag = s.lag.unwrap_or(0);
                        checks.push(if lag > 100 || (stale && lag > 0) {
                            check(
                                "indexer",
                                "warning",
                                format!(
                                    "chain {}: lag {lag} blocks, last batch {}",
                                    c.chain_id,
                                    s.updated_at.map(|u| u.to_rfc3339()).unwrap_or_default()
                                ),
                                "is `dalp index follow` running and the node reachable?",
                            )
                        } else {
                            check(
                                "indexer",
                                "ok",
                                format!(
                                    "chain {}: checkpoint {:?}, lag {lag}",
                                    c.chain_id, s.checkpoint
                                ),
                                "",
                            )
                        });
                    }
                    Err(e) => checks.push(check("indexer", "error", e.to_string(), "")),
                }
            }
        }
        Err(e) => checks.push(check("indexer", "error", e.to_string(), "")),
    }
    let wf = dalp_workflows::WorkflowStore::new(pools.get(Component::Workflows).clone());
    match wf.stats().await {
        Ok(s) if s.dead_letter == 0 && s.stalled == 0 => checks.push(check(
            "workflows",
            "ok",
            format!(
                "{} ready, {} running, oldest ready {:.1} s",
                s.ready, s.running, s.oldest_ready_seconds
            ),
            "",
        )),
        Ok(s) => checks.push(check(
            "workflows",
            "warning",
            format!(
                "{} dead-lettered, {} stalled (lease expired)",
                s.dead_letter, s.stalled
            ),
            "see `dalp workflows runs --status dead_letter|stalled`; retry or cancel",
        )),
        Err(e) => checks.push(check("workflows", "error", e.to_string(), "")),
    }
}
