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
    managed: bool,
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
        match dalp_db::migrate::status(&client, &dalp_app::catalog::MIGRATIONS).await {
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
        match dalp_db::access::check(&client, &dalp_app::catalog::ACCESS).await {
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
        let lint = dalp_app::catalog::lint_options();
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
            Some(pools) => {
                component_checks(&pools, &mut checks).await;
                audit_key_checks(&pools, &layout.keys_dir(), &mut checks).await;
            }
        }
        let provider = if embedded {
            None
        } else {
            managed_provider(&client)
                .await
                .or(managed.then(|| "the provider".to_string()))
        };
        match &provider {
            Some(p) => provider_checks(p, &mut checks),
            None => {
                replication_checks(&client, &target.data_dir, embedded, &mut checks).await;
                archiving_checks(&client, embedded, &mut checks).await;
            }
        }
        extension_checks(&client, embedded, &mut checks).await;
    }
    if embedded {
        backup_checks(&target.data_dir, now, &mut checks).await;
    }

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

/// Replicas streaming from the primary (the admin role reads pg_stat_replication through
/// pg_read_all_stats); for a local HA cluster, every node must stream and one be synchronous.
async fn replication_checks(
    c: &tokio_postgres::Client,
    data_dir: &Path,
    embedded: bool,
    checks: &mut Vec<Check>,
) {
    let ha = if embedded && dalp_ops::HaCluster::is_cluster_dir(data_dir) {
        dalp_ops::HaCluster::open(data_dir).ok()
    } else {
        None
    };
    if let Some(cluster) = &ha {
        checks.push(watchdog_check(Path::new(dalp_ops::ha::WATCHDOG_DEVICE)));
        checks.extend(guard_checks(cluster));
    }
    let rows = match c
        .query(
            "SELECT application_name, state, sync_state, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint FROM pg_stat_replication ORDER BY 1",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            checks.push(check("replication", "warning", e.to_string(), "the admin role needs pg_read_all_stats"));
            return;
        }
    };
    let sync_names: String = c
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or_default();
    let streaming: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, String>(1) == "streaming")
        .map(|r| r.get(0))
        .collect();
    let expected = ha.as_ref().map(|h| h.nodes().len() - 1);
    match expected {
        None if rows.is_empty() => checks.push(check(
            "replication",
            "info",
            "no replicas: a single node",
            "for high availability run `dalp cluster up` (or `dalp up --ha`)",
        )),
        Some(n) if streaming.len() < n => {
            // Every node but the one answering (the primary) should stream from it.
            let primary_port: Option<i32> = c
                .query_one("SELECT inet_server_port()", &[])
                .await
                .ok()
                .and_then(|r| r.get(0));
            let missing: Vec<String> = ha
                .as_ref()
                .map(|h| {
                    h.nodes()
                        .iter()
                        .filter(|x| Some(x.pg_port as i32) != primary_port)
                        .map(|x| x.name.clone())
                        .filter(|name| !streaming.contains(name))
                        .collect()
                })
                .unwrap_or_default();
            checks.push(check(
                "replication",
                "error",
                format!(
                    "{} of {n} replicas streaming; not streaming: {}",
                    streaming.len(),
                    missing.join(", ")
                ),
                format!(
                    "see `dalp cluster status --dir {}`; start the missing node again with `dalp cluster up --dir {}`",
                    data_dir.display(),
                    data_dir.display()
                ),
            ))
        }
        _ => {
            let lagging: Vec<String> = rows
                .iter()
                .filter(|r| r.get::<_, i64>(3) > 16 << 20)
                .map(|r| {
                    format!(
                        "{} ({} MB behind)",
                        r.get::<_, String>(0),
                        r.get::<_, i64>(3) >> 20
                    )
                })
                .collect();
            checks.push(if !lagging.is_empty() {
                check(
                    "replication",
                    "warning",
                    format!("lagging: {}", lagging.join(", ")),
                    "check the replica's disk and load; reads skip it while it lags",
                )
            } else {
                check(
                    "replication",
                    "ok",
                    format!(
                        "{} replica(s) streaming: {}",
                        streaming.len(),
                        rows.iter()
                            .map(|r| format!(
                                "{} ({})",
                                r.get::<_, String>(0),
                                r.get::<_, String>(2)
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "",
                )
            });
        }
    }
    // `sync` in one-standby synchronous mode, `quorum` under quorum commit (ANY n (…)).
    let acknowledging =
        |r: &tokio_postgres::Row| matches!(r.get::<_, String>(2).as_str(), "sync" | "quorum");
    if !sync_names.is_empty() && !rows.iter().any(acknowledging) {
        checks.push(check(
            "replication",
            "error",
            format!("synchronous_standby_names is `{sync_names}` but no synchronous standby is connected: commits wait (strict mode) or are not replicated"),
            "bring a replica back (`dalp cluster status`)",
        ));
    }
}

/// Whether pgAudit (database-level audit of data access) and pg_stat_statements (`dalp db
/// top`) are loaded. Their settings show in pg_settings only when the library is preloaded,
/// which any role may read (`shared_preload_libraries` itself is superuser-only).
async fn extension_checks(c: &tokio_postgres::Client, embedded: bool, checks: &mut Vec<Check>) {
    for (lib, probe, what) in [
        (
            "pgaudit",
            "pgaudit.log",
            "database-level audit of writes, DDL, role changes and reads",
        ),
        (
            "pg_stat_statements",
            "pg_stat_statements.max",
            "statement statistics for `dalp db top|explain`",
        ),
    ] {
        let loaded = match c
            .query_one(
                "SELECT count(*) > 0 FROM pg_settings WHERE name = $1",
                &[&probe],
            )
            .await
        {
            Ok(r) => r.get::<_, bool>(0),
            Err(e) => {
                checks.push(check("extensions", "warning", e.to_string(), ""));
                continue;
            }
        };
        checks.push(if loaded {
            check("extensions", "ok", format!("{lib} is loaded"), "")
        } else {
            check(
                "extensions",
                "warning",
                format!("{lib} is not loaded: no {what}"),
                if embedded {
                    format!("install Debian's postgresql-15-{} (scripts/deps.sh) and restart `dalp up`", if lib == "pgaudit" { "pgaudit" } else { "contrib" })
                } else {
                    format!("add {lib} to shared_preload_libraries: RDS parameter group, Cloud SQL flag (cloudsql.enable_pgaudit for pgAudit), Azure server parameter (and azure.extensions); then restart the instance (docs/deploy-managed.md)")
                },
            )
        });
    }
}

/// The managed service behind a URL target, from the settings only it has.
async fn managed_provider(c: &tokio_postgres::Client) -> Option<String> {
    let row = c
        .query_one(
            "SELECT bool_or(name LIKE 'rds.%'), bool_or(name LIKE 'cloudsql.%'), bool_or(name LIKE 'azure.%')
               FROM pg_settings",
            &[],
        )
        .await
        .ok()?;
    let named = |i: usize| row.get::<_, Option<bool>>(i).unwrap_or(false);
    [
        (0, "AWS RDS"),
        (1, "GCP Cloud SQL"),
        (2, "Azure Database for PostgreSQL"),
    ]
    .into_iter()
    .find(|(i, _)| named(*i))
    .map(|(_, p)| p.to_string())
}

/// On a managed service, high availability, backups and point-in-time recovery are the
/// provider's: reported as info, saying what to confirm in its console.
fn provider_checks(provider: &str, checks: &mut Vec<Check>) {
    checks.push(check(
        "replication",
        "info",
        format!("high availability is {provider}'s (RDS Multi-AZ, Cloud SQL regional HA, Azure zone-redundant HA); its standbys are not visible to dalp"),
        "confirm HA is enabled for the instance in the provider's console (docs/deploy-managed.md)",
    ));
    checks.push(check(
        "archiving",
        "info",
        format!("WAL archiving and point-in-time recovery are {provider}'s"),
        "keep automated backups with a point-in-time window of at least 30 days (docs/deploy-managed.md)",
    ));
    checks.push(check(
        "backups",
        "info",
        format!("backups are {provider}'s"),
        "keep snapshots 90 days and export to an archive kept 7 years, with customer-managed keys (docs/deploy-managed.md)",
    ));
}

/// Whether Patroni can fence a stalled primary with a kernel watchdog.
fn watchdog_check(device: &Path) -> Check {
    if device.exists() {
        check(
            "watchdog",
            "ok",
            format!("{} is present", device.display()),
            "",
        )
    } else {
        check(
            "watchdog",
            "info",
            format!("no {}: Patroni runs without a watchdog", device.display()),
            "each node's guard fences a primary whose Patroni is stalled (SIGSTOP, a hung process) before its leader key expires, but a frozen host (VM pause) freezes the guard too: such a primary keeps accepting connections until it resumes and Patroni demotes it (synchronous replication keeps those writes unacknowledged once the standby is promoted; clients see errors or unknown outcomes). Load the softdog module (modprobe softdog) or give the host a hardware watchdog to fence it",
        )
    }
}

/// Whether each node this directory runs has its guard (`dalp node guard`), and the last
/// fence it made.
fn guard_checks(cluster: &dalp_ops::HaCluster) -> Vec<Check> {
    let running = cluster.running_processes();
    let start = if cluster.spans_hosts() {
        format!("dalp node up --bundle {}", cluster.root().display())
    } else {
        format!("dalp cluster heal --dir {}", cluster.root().display())
    };
    cluster
        .local_node_names()
        .into_iter()
        .map(|name| {
            let last = cluster.guard_events(&name).pop().map(|e| {
                format!(
                    "; last fence {}: {}",
                    e["at"].as_str().unwrap_or("?"),
                    e["reason"].as_str().unwrap_or("?")
                )
            });
            let mut last = last.unwrap_or_else(|| "; no fence so far".into());
            let restarts = cluster.guard_restarts(&name);
            if let Some(r) = restarts.last() {
                last.push_str(&format!(
                    "; Patroni restarted {} time(s), last {}",
                    restarts.len(),
                    r["at"].as_str().unwrap_or("?")
                ));
            }
            if running.contains(&format!("guard {name}")) {
                check("guard", "ok", format!("{name}'s guard runs{last}"), "")
            } else {
                check(
                    "guard",
                    "warning",
                    format!("{name} runs without its guard{last}"),
                    format!("a frozen postmaster, or a primary whose Patroni is frozen or dead, is not fenced, and a Patroni that exits is not started again; `{start}` starts it"),
                )
            }
        })
        .collect()
}

/// Whether WAL archiving works (pg_stat_archiver).
/// `owned`: dalp runs this cluster (a data directory), so archiving is its job; on a
/// cluster given by URL the operator may back up by other means.
async fn archiving_checks(c: &tokio_postgres::Client, owned: bool, checks: &mut Vec<Check>) {
    let row = match c
        .query_one(
            "SELECT current_setting('archive_mode'), archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal, last_failed_time, current_setting('archive_timeout'),
                    position('dalp_receivewal' IN current_setting('synchronous_standby_names')) > 0,
                    (SELECT state || '/' || sync_state FROM pg_stat_replication WHERE application_name = 'dalp_receivewal' LIMIT 1)
               FROM pg_stat_archiver",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            checks.push(check("archiving", "warning", e.to_string(), ""));
            return;
        }
    };
    let mode: String = row.get(0);
    let last_ok: Option<DateTime<Utc>> = row.get(3);
    let last_failed: Option<DateTime<Utc>> = row.get(6);
    if mode == "off" {
        checks.push(check(
            "archiving",
            if owned { "warning" } else { "info" },
            "archive_mode is off: no point-in-time recovery from this server's WAL",
            if owned {
                "start `dalp up` without --no-archive (pgBackRest must be installed)"
            } else {
                "make sure the service backs up and archives WAL by other means"
            },
        ));
    } else if last_failed.is_some_and(|f| last_ok.is_none_or(|o| f > o)) {
        checks.push(check(
            "archiving",
            "error",
            format!(
                "archive_command is failing: {} failures, last for WAL {} at {}; WAL piles up in pg_wal until it works",
                row.get::<_, i64>(4),
                row.get::<_, Option<String>>(5).unwrap_or_default(),
                last_failed.map(|t| t.to_rfc3339()).unwrap_or_default()
            ),
            "check archive_command (SHOW archive_command) and the pgBackRest log in DATA_DIR/backup/log; `dalp backup run` shows the cause",
        ));
    } else if row.get::<_, bool>(8) {
        let state: Option<String> = row.get(9);
        checks.push(match state.as_deref() {
            Some("streaming/sync") => check(
                "rpo",
                "ok",
                "achieved RPO bound: 0 — every commit waits for the synchronous WAL receiver (wal_receiver_dir) to flush its WAL",
                "",
            ),
            other => check(
                "rpo",
                "error",
                format!(
                    "the synchronous WAL receiver is not streaming ({}): commits wait for it",
                    other.unwrap_or("not connected")
                ),
                "see DATA_DIR/log/pg_receivewal.log; `dalp up` restarts it — is its directory (wal_receiver_dir) writable and its disk mounted?",
            ),
        });
        archived_ok(&row, last_ok, checks);
    } else {
        let timeout: String = row.get(7);
        checks.push(check(
            "rpo",
            if timeout == "0" { "warning" } else { "ok" },
            if timeout == "0" {
                "archive_timeout is 0: a quiet server may keep committed work out of the archive indefinitely".to_string()
            } else {
                format!("achieved RPO bound: losing this server loses at most the last {timeout} of committed work (archive_timeout; WAL not yet archived)")
            },
            if timeout == "0" {
                "set rpo_secs in backup.toml (dalp sets archive_timeout from it)"
            } else {
                ""
            },
        ));
        archived_ok(&row, last_ok, checks);
    }
}

fn archived_ok(row: &tokio_postgres::Row, last_ok: Option<DateTime<Utc>>, checks: &mut Vec<Check>) {
    checks.push(check(
        "archiving",
        "ok",
        format!(
            "{} segments archived, last {} at {}",
            row.get::<_, i64>(1),
            row.get::<_, Option<String>>(2)
                .unwrap_or_else(|| "none yet".into()),
            last_ok
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "-".into())
        ),
        "",
    ));
}

/// Backups against the policy: each repository's newest full within its interval.
async fn backup_checks(data_dir: &Path, now: DateTime<Utc>, checks: &mut Vec<Check>) {
    let b = match dalp_ops::backup::for_dir(data_dir) {
        Ok(b) => b,
        Err(e) => {
            checks.push(check(
                "backups",
                "info",
                format!("not configured: {e}"),
                "install pgBackRest and restart `dalp up`",
            ));
            return;
        }
    };
    if !b.is_set_up() {
        checks.push(check(
            "backups",
            "info",
            format!(
                "not configured: no backup directory at {} (started with --no-archive?)",
                b.dir().display()
            ),
            "restart `dalp up` without --no-archive to archive WAL and take backups",
        ));
        return;
    }
    let policy = b.policy().clone();
    let encrypted = b.is_encrypted();
    let list = match tokio::task::spawn_blocking(move || b.list()).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            checks.push(check(
                "backups",
                "error",
                e.to_string(),
                "run `dalp backup list` to see the repository error",
            ));
            return;
        }
        Err(e) => {
            checks.push(check("backups", "error", e.to_string(), ""));
            return;
        }
    };
    checks.push(if encrypted {
        check(
            "encryption",
            "ok",
            format!("repositories encrypted ({}); the passphrase is in keys/, not the database — keep `dalp keys export` current", dalp_ops::backup::CIPHER_TYPE),
            "",
        )
    } else {
        check(
            "encryption",
            "warning",
            "repositories are not encrypted (they held backups before dalp encrypted new ones, or backup.toml says encrypt = false)",
            "start encrypted repositories: new repo paths in backup.toml, `dalp backup run` to each, retire the old ones after their retention (docs/architecture.md)",
        )
    });
    for (repo, every) in [
        (1u8, chrono::Duration::hours(policy.full_every_hours.into())),
        (2, chrono::Duration::days(policy.archive_every_days.into())),
    ] {
        let newest = list
            .iter()
            .filter(|x| x.repo == repo && x.kind == "full")
            .map(|x| x.stopped)
            .max();
        checks.push(match newest {
            None => check(
                "backups",
                "warning",
                format!("repo{repo} has no full backup"),
                format!("run `dalp backup run --repo {repo}`, and schedule `dalp backup due` (`dalp backup schedule`)"),
            ),
            Some(t) if now - t > every + every / 2 => check(
                "backups",
                "warning",
                format!("repo{repo}: newest full backup ended {} ({} h ago), the policy wants one every {} h", t.to_rfc3339(), (now - t).num_hours(), every.num_hours()),
                "is `dalp backup due` scheduled? (`dalp backup schedule`)",
            ),
            Some(t) => check("backups", "ok", format!("repo{repo}: newest full backup ended {}", t.to_rfc3339()), ""),
        });
    }
}

/// The signing key the sealer holds must be the one the chain expects (else sealing has
/// stopped), and the witnessed head must keep up with the chain.
async fn audit_key_checks(pools: &ComponentPools, keys_dir: &Path, checks: &mut Vec<Check>) {
    let key = match dalp_audit::AuditKey::open(&keys_dir.join(dalp_app::keys::AUDIT_KEY_FILE)) {
        Ok(k) => k,
        Err(e) => {
            checks.push(check(
                "audit_key",
                "error",
                e.to_string(),
                "restore the audit signing key from the key bundle",
            ));
            return;
        }
    };
    let Ok(client) = pools.get(Component::Auditor).get().await else {
        return;
    };
    let expected = match dalp_audit::Sealer::next_signer(&client).await {
        Ok(k) => k,
        Err(e) => {
            checks.push(check("audit_key", "error", e.to_string(), ""));
            return;
        }
    };
    match expected {
        Some(k) if k != key.key_id => checks.push(check(
            "audit_key",
            "error",
            format!("the chain expects signing key {k}, the key file holds {}: sealing has stopped", key.key_id),
            "restore the original audit-ed25519.json from the key bundle (a new key never continues a chain)",
        )),
        _ => checks.push(check("audit_key", "ok", format!("signing key {}", key.key_id), "")),
    }
    let witness = dalp_audit::Witness::new(keys_dir.join(dalp_app::keys::AUDIT_WITNESS_DIR));
    let head = dalp_audit::Sealer::checkpoint(&client).await.ok().flatten();
    match (witness.heads().map(|h| h.last().cloned()), head) {
        (Err(e), _) => checks.push(check("audit_witness", "error", e.to_string(), "")),
        (Ok(_), None) => checks.push(check("audit_witness", "ok", "nothing sealed yet", "")),
        (Ok(None), Some(_)) => checks.push(check(
            "audit_witness",
            "warning",
            format!("no head witnessed in {} yet", witness.dir().display()),
            "a running dalp witnesses the chain head every 10 s",
        )),
        (Ok(Some(w)), Some(h)) if h.sealed_at - w.sealed_at > chrono::Duration::minutes(5) => checks.push(check(
            "audit_witness",
            "warning",
            format!("the last witnessed head (batch {}) is {} min older than the chain's (batch {})", w.batch_no, (h.sealed_at - w.sealed_at).num_minutes(), h.batch_no),
            "is dalp running? can it write the witness directory?",
        )),
        (Ok(Some(w)), Some(_)) => checks.push(check("audit_witness", "ok", format!("head witnessed at batch {} in {}", w.batch_no, witness.dir().display()), "")),
    }
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
                        if let Some(d) = &s.diverged {
                            checks.push(check(
                                "indexer",
                                "error",
                                format!(
                                    "chain {}: diverged from its node at block {} since {}: {}",
                                    c.chain_id,
                                    d.block,
                                    d.since.to_rfc3339(),
                                    d.reason
                                ),
                                d.next.clone(),
                            ));
                            continue;
                        }
                        if let Ok(list) = indexed.reconciliations(c.chain_id).await {
                            for r in dalp_indexed::reconcile::drifting(&list) {
                                checks.push(check(
                                    "indexer",
                                    "warning",
                                    format!(
                                        "chain {}: token {} disagrees with its contract at block {}: supply indexed {} node {}, {} of {} sampled balance(s) differ",
                                        c.chain_id,
                                        r.token,
                                        r.block,
                                        r.indexed_supply,
                                        r.node_supply.as_deref().unwrap_or("-"),
                                        r.drifted_accounts.len(),
                                        r.balances_checked
                                    ),
                                    "the token moves value without Transfer events, or indexing began after its deployment (--from-block); compare `dalp index status`, and re-index it with `dalp index rewind --beyond-finality` if events were missed",
                                ));
                            }
                        }
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
    match wf.stranded_nonces().await {
        Ok(list) => {
            let signers = dalp_workflows::stranded_per_signer(&list);
            if signers.is_empty() {
                checks.push(check("nonces", "ok", "no stranded nonce", ""));
            }
            for s in signers {
                // A replacement normally lands within minutes; older means it is stuck too.
                let level = if s.oldest_age_seconds > 600.0 {
                    "warning"
                } else {
                    "info"
                };
                checks.push(check(
                    "nonces",
                    level,
                    format!(
                        "chain {} signer {}: {} stranded nonce(s), oldest {} waiting {:.0} s for its replacement",
                        s.chain_id, s.signer, s.count, s.oldest_nonce, s.oldest_age_seconds
                    ),
                    "every later nonce of this signer is unmineable until the replacement is mined; see `dalp workflows status` and drive the replacement request",
                ));
            }
        }
        Err(e) => checks.push(check("nonces", "error", e.to_string(), "")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_watchdog_is_reported_with_the_risk_and_the_remedy() {
        let c = watchdog_check(Path::new("/nonexistent/watchdog"));
        assert_eq!((c.check, c.status), ("watchdog", "info"));
        assert!(
            c.next.contains("softdog") && c.next.contains("stalled") && c.next.contains("guard"),
            "{}",
            c.next
        );
        let present = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(watchdog_check(present.path()).status, "ok");
    }
}
