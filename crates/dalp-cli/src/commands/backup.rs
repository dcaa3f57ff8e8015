//! `dalp backup run|list|schedule|due|verify` and `dalp restore`: pgBackRest driven by the
//! data-protection policy.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, NaiveDateTime, Utc};
use dalp_app::catalog::MIGRATIONS;
use dalp_ops::backup::{self, RestoredServer, Target};
use dalp_ops::embedded::{DATABASE, DEFAULT_PG_BIN};
use dalp_ops::{HaCluster, Layout};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

// ---- command line ------------------------------------------------------------------

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a backup now (then expire what the policy no longer keeps).
    Run {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// full, diff (changes since the last full) or incr (since the last backup).
        #[arg(long = "type", default_value = "full", value_parser = ["full", "diff", "incr"])]
        kind: String,
        /// Repository: 1 (daily tier, PITR) or 2 (long-term archive).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        repo: u8,
    },
    /// Backups in both repositories (type, time, duration, size, WAL range) and the window
    /// each can restore to: from the oldest backup whose WAL is still archived to the newest
    /// archived WAL.
    List {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Recovery evidence from the audit trail: every backup (WAL range, sizes, duration),
    /// restore drill (outcome, recovery time) and restore (target, RTO achieved), newest
    /// first — when recovery was last proven and how long it took.
    Evidence {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// At most this many, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Print the schedule that implements the policy: cron (default) or systemd units
    /// calling `dalp backup due`.
    Schedule {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Print a systemd service + timer instead of a crontab line.
        #[arg(long)]
        systemd: bool,
    },
    /// Run whatever the policy says is due now (any scheduler can call this often).
    Due {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        /// Only say what is due.
        #[arg(long)]
        dry_run: bool,
    },
    /// Restore drill: restore the latest backup to a fresh restore point in a scratch
    /// directory, start it, run pg_amcheck, the migration status and the audit chain
    /// verification, compare row counts and checksums of every domain table with the
    /// source at that point, report the recovery time, clean up. Exit 1 on any mismatch.
    Verify {
        #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        repo: u8,
        /// Keep the scratch copy (stopped) for inspection.
        #[arg(long)]
        keep: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["target_time", "target_lsn", "latest"])))]
pub struct RestoreArgs {
    /// The instance whose backups to restore (`dalp up` or `dalp cluster up` directory).
    #[arg(long, env = "DALP_DATA_DIR", default_value = ".dalp")]
    pub data_dir: PathBuf,
    /// Recover to this moment: RFC 3339 (2026-11-24T10:15:00Z) or "2026-11-24 10:15:00+00".
    #[arg(long)]
    pub target_time: Option<String>,
    /// Recover to this WAL position (e.g. 0/3000060).
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Recover everything archived.
    #[arg(long)]
    pub latest: bool,
    /// New directory for the copy (must not exist or be empty).
    #[arg(long)]
    pub into: PathBuf,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub repo: u8,
    /// The instance is lost (disk or host): rebuild it in --into from the repository and
    /// this key bundle (`dalp keys export`) instead of from --data-dir. The result is a
    /// complete data directory; `dalp up --data-dir INTO` starts it, and archiving goes on
    /// into the same repository on a new timeline.
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// File holding the key bundle's passphrase [default: DALP_KEYS_PASSPHRASE, else one
    /// line from stdin].
    #[arg(long, requires = "keys")]
    pub passphrase_file: Option<PathBuf>,
    /// With --keys: repo1 is now at this path (a posix repository moved or mounted
    /// elsewhere), instead of where the bundle's backup.toml says.
    #[arg(long, requires = "keys")]
    pub repo1_path: Option<PathBuf>,
    /// With --keys: the synchronous WAL receiver's directory is now here, instead of where
    /// the bundle's backup.toml says (its segments are replayed after the archive's).
    #[arg(long, requires = "keys")]
    pub wal_receiver_dir: Option<PathBuf>,
}

fn pg_bin() -> PathBuf {
    std::env::var_os("DALP_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN))
}

/// A spinner showing pgBackRest's latest line, for long work.
fn spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {prefix}: {wide_msg}")
            .expect("template"),
    );
    bar.set_prefix(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// pgBackRest lines start with a timestamp and the process; keep the message.
fn short(line: &str) -> String {
    line.split_once(": ")
        .map(|(_, m)| m)
        .unwrap_or(line)
        .chars()
        .take(120)
        .collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, dalp_ops::OpsError> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// Runs pgBackRest work off the runtime with a spinner showing its latest line.
async fn with_progress<T: Send + 'static>(
    what: &str,
    work: impl FnOnce(&dyn Fn(&str)) -> Result<T, dalp_ops::OpsError> + Send + 'static,
) -> anyhow::Result<T> {
    let bar = spinner(what);
    let shown = bar.clone();
    let result = blocking(move || work(&|line| shown.set_message(short(line)))).await;
    bar.finish_and_clear();
    result
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

pub async fn run(command: BackupCommand) -> anyhow::Result<ExitCode> {
    match command {
        BackupCommand::Run {
            data_dir,
            kind,
            repo,
        } => {
            let b = backup::for_dir(&data_dir)?;
            let info = with_progress(&format!("{kind} backup to repo{repo}"), {
                let b = b.clone();
                move |p| b.backup(&kind, repo, p)
            })
            .await?;
            evidence(&data_dir, "backup.completed", backup_details(&b, &info)).await;
            println!(
                "backup {} ({}) to repo{}: {} of data, {} stored, {:.1} s, WAL {}..{}",
                info.label,
                info.kind,
                info.repo,
                human(info.size),
                human(info.repo_size),
                info.duration().as_secs_f64(),
                info.wal_start,
                info.wal_stop
            );
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Evidence {
            data_dir,
            limit,
            json,
        } => evidence_list(&data_dir, limit, json).await,
        BackupCommand::List { data_dir, json } => {
            let b = backup::for_dir(&data_dir)?;
            let (list, windows) = blocking(move || {
                let list = b.list()?;
                let windows = [b.window(1)?, b.window(2)?];
                Ok((list, windows))
            })
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "backups": list,
                        "windows": windows.iter().flatten().collect::<Vec<_>>(),
                    }))?
                );
            } else if list.is_empty() {
                println!("no backups yet; take one with `dalp backup run`");
            } else {
                println!(
                    "{:<5} {:<32} {:<5} {:<20} {:>8} {:>10} {:>10}  wal",
                    "repo", "label", "type", "started (UTC)", "secs", "size", "stored"
                );
                for w in windows.iter().flatten() {
                    println!("{}", w.describe());
                }
                for i in &list {
                    println!(
                        "{:<5} {:<32} {:<5} {:<20} {:>8.1} {:>10} {:>10}  {}..{}",
                        i.repo,
                        i.label,
                        i.kind,
                        i.started.format("%Y-%m-%d %H:%M:%S"),
                        i.duration().as_secs_f64(),
                        human(i.size),
                        human(i.repo_size),
                        i.wal_start,
                        i.wal_stop
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Schedule { data_dir, systemd } => {
            let b = backup::for_dir(&data_dir)?;
            let dir = std::fs::canonicalize(&data_dir)?;
            let exe = std::env::current_exe()?;
            let p = b.policy();
            let cmd = format!("{} backup due --data-dir {}", exe.display(), dir.display());
            println!(
                "# dalp backup policy: repo1 full every {} h, kept {} days, PITR {} days; repo2 full every {} days, kept {} days.",
                p.full_every_hours, p.full_retention_days, p.pitr_days, p.archive_every_days, p.archive_retention_days
            );
            println!("# `dalp backup due` takes whatever is due and expires the rest; running it every 15 minutes keeps every interval.");
            if systemd {
                println!("# /etc/systemd/system/dalp-backup.service\n[Unit]\nDescription=dalp backups due under the policy\n\n[Service]\nType=oneshot\nExecStart={cmd}\n");
                println!("# /etc/systemd/system/dalp-backup.timer\n[Unit]\nDescription=Run dalp backup due every 15 minutes\n\n[Timer]\nOnCalendar=*:0/15\nPersistent=true\n\n[Install]\nWantedBy=timers.target");
            } else {
                println!(
                    "# /etc/cron.d/dalp-backup\n*/15 * * * * root {cmd} >> {}/backup/due.log 2>&1",
                    dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Due { data_dir, dry_run } => {
            let b = backup::for_dir(&data_dir)?;
            let due = {
                let b = b.clone();
                blocking(move || b.due(Utc::now())).await?
            };
            if due.is_empty() {
                println!("nothing due");
                return Ok(ExitCode::SUCCESS);
            }
            for (repo, kind) in due {
                if dry_run {
                    println!("due: {kind} backup to repo{repo}");
                    continue;
                }
                let info = with_progress(&format!("{kind} backup to repo{repo}"), {
                    let b = b.clone();
                    move |p| b.backup(kind, repo, p)
                })
                .await?;
                evidence(&data_dir, "backup.completed", backup_details(&b, &info)).await;
                println!(
                    "took {} backup {} to repo{} ({}, {:.1} s)",
                    info.kind,
                    info.label,
                    info.repo,
                    human(info.size),
                    info.duration().as_secs_f64()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Verify {
            data_dir,
            repo,
            keep,
            json,
        } => verify(&data_dir, repo, keep, json).await,
    }
}

async fn evidence_list(data_dir: &Path, limit: i64, json: bool) -> anyhow::Result<ExitCode> {
    let opts = evidence_target(data_dir)
        .await
        .context("the instance is not running: start it (`dalp up`) to read its audit trail")?;
    let client = opts.connect().await?;
    let rows = client
        .query(
            "SELECT occurred_at, action, details FROM dalp_audit.events
              WHERE resource_type = 'backup' AND action LIKE 'backup.%'
              ORDER BY occurred_at DESC LIMIT $1",
            &[&limit],
        )
        .await?;
    let events: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "at": r.get::<_, DateTime<Utc>>(0),
                "action": r.get::<_, String>(1),
                "details": r.get::<_, serde_json::Value>(2),
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&events)?);
        return Ok(ExitCode::SUCCESS);
    }
    if events.is_empty() {
        println!("no recovery evidence yet: take a backup (`dalp backup run`) and a drill (`dalp backup verify`)");
        return Ok(ExitCode::SUCCESS);
    }
    for e in &events {
        let d = &e["details"];
        let what = match e["action"].as_str().unwrap_or_default() {
            "backup.completed" => format!(
                "{} backup {} to repo{}: WAL {}..{}, {} stored, {:.1} s{}",
                d["kind"].as_str().unwrap_or("?"),
                d["label"].as_str().unwrap_or("?"),
                d["repo"],
                d["wal_start"].as_str().unwrap_or("?"),
                d["wal_stop"].as_str().unwrap_or("?"),
                human(d["stored_bytes"].as_u64().unwrap_or(0)),
                d["duration_seconds"].as_f64().unwrap_or(0.0),
                if d["encrypted"] == true {
                    ", encrypted"
                } else {
                    ""
                }
            ),
            "backup.drill" => format!(
                "restore drill from repo{}: {} — recovered in {:.1} s, {} tables, {} mismatched",
                d["repo"],
                if d["ok"] == true { "PASSED" } else { "FAILED" },
                d["recovery_seconds"].as_f64().unwrap_or(0.0),
                d["tables"],
                d["tables_mismatched"]
            ),
            "backup.restore" => format!(
                "restore ({}) to {}: LSN {}, timeline {}, RTO {:.1} s",
                d["kind"].as_str().unwrap_or("?"),
                d["target"].as_str().unwrap_or("?"),
                d["recovered_lsn"].as_str().unwrap_or("?"),
                d["timeline"],
                d["rto_seconds"].as_f64().unwrap_or(0.0)
            ),
            other => other.to_string(),
        };
        println!(
            "{}  {what}",
            e["at"]
                .as_str()
                .unwrap_or_default()
                .get(..19)
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses RFC 3339, or `YYYY-MM-DD HH:MM:SS[.f][+TZ]` (UTC without a zone).
fn parse_time(s: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc());
        }
    }
    bail!("--target-time `{s}` is not a time; use RFC 3339, e.g. 2026-11-24T10:15:00Z")
}

/// Whether the source's primary runs (then its current WAL is flushed to the archive first).
fn source_running(data_dir: &Path) -> bool {
    if dalp_ops::HaCluster::is_cluster_dir(data_dir) {
        HaCluster::open(data_dir)
            .map(|c| !c.running_processes().is_empty())
            .unwrap_or(false)
    } else {
        dalp_ops::embedded::inspect(data_dir).running
    }
}

fn restore_target(args: &RestoreArgs) -> anyhow::Result<Target> {
    Ok(match (&args.target_time, &args.target_lsn, args.latest) {
        (Some(t), _, _) => Target::Time(parse_time(t)?),
        (_, Some(l), _) => Target::Lsn(l.clone()),
        _ => Target::Latest,
    })
}

fn describe_target(target: &Target) -> String {
    match target {
        Target::Time(t) => t.to_rfc3339(),
        Target::Lsn(l) => format!("LSN {l}"),
        Target::Name(n) => format!("restore point {n}"),
        Target::Latest => "the end of the archive".into(),
    }
}

fn print_recovered(target: &Target, recovered: &backup::Recovered, seconds: f64) {
    println!(
        "recovered to {}: last transaction {}, LSN {}, timeline {} ({seconds:.1} s)",
        describe_target(target),
        recovered
            .last_transaction
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "none replayed".into()),
        recovered.lsn,
        recovered.timeline,
    );
}

/// Removes what a failed restore wrote: the directory, or its contents when it existed
/// (empty) before.
fn clean_up(into: &Path, existed: bool) {
    if existed {
        for entry in std::fs::read_dir(into).into_iter().flatten().flatten() {
            let p = entry.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    } else {
        let _ = std::fs::remove_dir_all(into);
    }
}

/// `dalp restore --keys BUNDLE --into DIR`: the instance is lost; rebuild it from the
/// repository and the key bundle as a complete data directory that `dalp up` starts.
async fn restore_lost_instance(args: RestoreArgs, bundle: &Path) -> anyhow::Result<ExitCode> {
    let target = restore_target(&args)?;
    let into = args.into.clone();
    let existed = into.exists();
    if existed
        && std::fs::read_dir(&into)
            .with_context(|| format!("read {}", into.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty; a lost instance is rebuilt only in a new directory",
            into.display()
        );
    }
    let sealed = std::fs::read(bundle).with_context(|| format!("read {}", bundle.display()))?;
    let pass = super::keys::passphrase(args.passphrase_file.as_deref(), false)?;
    let started = Instant::now();
    let outcome = async {
        dalp_ops::keybundle::import(&sealed, &pass, &into)?;
        let layout = Layout::new(&into);
        if let Some(path) = &args.repo1_path {
            let toml_path = into.join("backup.toml");
            let mut policy = backup::Policy::load(&toml_path)?;
            policy.repo1 = Some(backup::Repo::Posix { path: path.clone() });
            policy.save(&toml_path)?;
        }
        let b = backup::embedded_backups(&layout)?;
        b.write_config()?;
        let pgdata = layout.pgdata();
        let archive_command = b.archive_command();
        with_progress("restore", {
            let (b, target, repo) = (b.clone(), target.clone(), args.repo);
            move |p| b.restore_pgdata(&target, &pgdata, repo, true, p)
        })
        .await?;
        // What the synchronous WAL receiver has beyond the archive: RPO 0.
        let received = match (&b.policy().wal_receiver_dir, &target) {
            (Some(dir), Target::Latest) if dir.is_dir() => {
                dalp_ops::walreceiver::fill_pg_wal(dir, &layout.pgdata())?
            }
            _ => 0,
        };
        if received > 0 {
            eprintln!(
                "{received} WAL files from the synchronous receiver replay after the archive"
            );
        }
        eprintln!(
            "restored into {}; recovering to the target …",
            into.display()
        );
        // Recover and promote with the instance's own TLS material and archiving into the
        // same repository, so the new timeline's first segments are archived too.
        let tls = layout.tls_dir();
        let tls_file = |f: &str| tls.join(f).display().to_string();
        let server = RestoredServer::start_with(
            &into,
            &pg_bin(),
            false,
            Duration::from_secs(1800),
            &[
                ("archive_mode", "on".into()),
                ("archive_command", archive_command),
                ("ssl_cert_file", tls_file(dalp_ops::pki::SERVER_CERT)),
                ("ssl_key_file", tls_file(dalp_ops::pki::SERVER_KEY)),
                ("ssl_ca_file", tls_file(dalp_ops::pki::CA_CERT)),
                ("ssl_crl_file", tls_file(dalp_ops::pki::CRL)),
            ],
        )
        .await?;
        let recovered = server.recovered().await?;
        let seconds = started.elapsed().as_secs_f64();
        record_evidence(
            &server.superuser_options(DATABASE),
            "backup.restore",
            serde_json::json!({
                "kind": "lost_instance",
                "target": describe_target(&target),
                "repo": args.repo,
                "recovered_lsn": recovered.lsn,
                "timeline": recovered.timeline,
                "last_transaction": recovered.last_transaction,
                "rto_seconds": seconds,
            }),
        )
        .await?;
        server.stop();
        anyhow::Ok((recovered, seconds))
    }
    .await;
    let (recovered, seconds) = match outcome {
        Ok(r) => r,
        Err(e) => {
            clean_up(&into, existed);
            return Err(e.context(format!(
                "rebuilding the lost instance in {} failed (removed what was written)",
                into.display()
            )));
        }
    };
    print_recovered(&target, &recovered, seconds);
    println!(
        "the instance is rebuilt in {0}; start it with: dalp up --data-dir {0}",
        into.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The superuser of the running instance (or HA leader) in `data_dir`, to record evidence
/// in; `None` when it is not running.
async fn evidence_target(data_dir: &Path) -> Option<dalp_db::ConnectOptions> {
    if !source_running(data_dir) {
        return None;
    }
    source_superuser(data_dir).await.ok().map(|(su, _)| su)
}

/// The superuser of the instance (or HA leader) in `data_dir`, and its key directory.
async fn source_superuser(
    data_dir: &Path,
) -> anyhow::Result<(dalp_db::ConnectOptions, std::path::PathBuf)> {
    Ok(if HaCluster::is_cluster_dir(data_dir) {
        let c = HaCluster::open(data_dir)?;
        let leader = c.leader().await?;
        (
            c.superuser_options(&leader, DATABASE),
            c.root().join("keys"),
        )
    } else {
        let l = Layout::new(data_dir);
        (l.superuser_options(DATABASE)?, l.keys_dir())
    })
}

/// Records recovery evidence in the running instance of `data_dir`; says so when it cannot
/// (the backup itself stands).
async fn evidence(data_dir: &Path, action: &'static str, details: serde_json::Value) {
    let outcome = match evidence_target(data_dir).await {
        Some(opts) => record_evidence(&opts, action, details).await,
        None => Err(anyhow::anyhow!("the instance is not running")),
    };
    if let Err(e) = outcome {
        eprintln!("warning: {action} evidence not recorded in the audit trail: {e:#}");
    }
}

/// What a backup proves, as recorded in the audit trail.
fn backup_details(b: &backup::Backups, info: &backup::BackupInfo) -> serde_json::Value {
    serde_json::json!({
        "label": info.label,
        "kind": info.kind,
        "repo": info.repo,
        "wal_start": info.wal_start,
        "wal_stop": info.wal_stop,
        "lsn_start": info.lsn_start,
        "lsn_stop": info.lsn_stop,
        "size_bytes": info.size,
        "stored_bytes": info.repo_size,
        "duration_seconds": info.duration().as_secs_f64(),
        "encrypted": b.is_encrypted(),
    })
}

/// Writes a recovery-evidence event into the audit trail of the instance at `opts` (sealed
/// with the rest by the instance's sealer).
async fn record_evidence(
    opts: &dalp_db::ConnectOptions,
    action: &'static str,
    details: serde_json::Value,
) -> anyhow::Result<()> {
    let client = opts
        .connect()
        .await
        .context("connect to record the recovery evidence")?;
    let event =
        dalp_audit::AuditEvent::new("service:dalp-backup", action, "backup").details(details);
    dalp_audit::record(&client, &event)
        .await
        .context("record the recovery evidence")?;
    Ok(())
}

pub async fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    if let Some(bundle) = args.keys.clone() {
        return restore_lost_instance(args, &bundle).await;
    }
    let target = restore_target(&args)?;
    let b = backup::for_dir(&args.data_dir)?;
    if source_running(&args.data_dir) {
        // Push the current WAL segment so the archive reaches "now".
        let b2 = b.clone();
        if let Err(e) = blocking(move || b2.check()).await {
            eprintln!("warning: could not flush the current WAL to the archive: {e:#}");
        }
    }
    let into = args.into.clone();
    let into_existed = into.exists();
    // A restore or recovery that fails leaves nothing half-done behind (restore only writes
    // into an empty or new directory, so all of it is ours).
    let clean_up = |into: &Path| clean_up(into, into_existed);
    let started = Instant::now();
    {
        let (target, into) = (target.clone(), into.clone());
        let empty_before = !into_existed
            || std::fs::read_dir(&into)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        let restored = with_progress("restore", {
            let into = into.clone();
            move |p| b.restore(&target, &into, args.repo, p)
        })
        .await;
        if let Err(e) = restored {
            if empty_before && into.join("pgdata").exists() {
                clean_up(&into);
            }
            return Err(e);
        }
    }
    eprintln!(
        "restored into {}; recovering to the target …",
        into.display()
    );
    let server =
        match RestoredServer::start(&into, &pg_bin(), true, Duration::from_secs(1800)).await {
            Ok(s) => s,
            Err(e) => {
                clean_up(&into);
                return Err(anyhow::Error::new(e).context(format!(
                    "the restored copy in {} did not recover (removed it)",
                    into.display()
                )));
            }
        };
    let recovered = server.recovered().await?;
    let seconds = started.elapsed().as_secs_f64();
    evidence(
        &args.data_dir,
        "backup.restore",
        serde_json::json!({
            "kind": "copy",
            "into": into.display().to_string(),
            "target": describe_target(&target),
            "repo": args.repo,
            "recovered_lsn": recovered.lsn,
            "timeline": recovered.timeline,
            "last_transaction": recovered.last_transaction,
            "rto_seconds": seconds,
        }),
    )
    .await;
    print_recovered(&target, &recovered, seconds);
    println!(
        "running on 127.0.0.1:{} (the source's roles and TLS certificate); superuser: psql -h {} -p {} -U postgres {DATABASE}",
        server.port,
        server.socket_dir().display(),
        server.port
    );
    println!(
        "stop it: kill -INT $(head -1 {}/postmaster.pid)",
        server.data_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct TableCheck {
    table: String,
    source_rows: i64,
    restored_rows: i64,
    matches: bool,
}

#[derive(Debug, Serialize)]
struct DrillReport {
    restore_point: String,
    recovery_seconds: f64,
    amcheck_ok: bool,
    amcheck_output: String,
    migrations_current: bool,
    audit_chain_ok: Option<bool>,
    tables: Vec<TableCheck>,
    ok: bool,
}

const DOMAIN_TABLES: &str = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname LIKE 'dalp\\_%' AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1";

/// Row count and an order-independent checksum of every row's text.
async fn table_sums(
    c: &impl tokio_postgres::GenericClient,
    tables: &[String],
) -> anyhow::Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    for t in tables {
        let row = c
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(sum(hashtext(x::text)::bigint), 0)::bigint FROM {t} x"
                ),
                &[],
            )
            .await
            .with_context(|| format!("checksum {t}"))?;
        out.push((row.get(0), row.get(1)));
    }
    Ok(out)
}

async fn verify(data_dir: &Path, repo: u8, keep: bool, json: bool) -> anyhow::Result<ExitCode> {
    let b = backup::for_dir(data_dir)?;
    let (su_options, keys_dir) = source_superuser(data_dir).await?;
    let mut su = su_options
        .connect()
        .await
        .context("connect to the source as the superuser (is it running?)")?;
    let tables: Vec<String> = su
        .query(DOMAIN_TABLES, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A restore point with no domain write in flight: SHARE locks wait for open writers and
    // hold new ones back while the point is made and the source is summed, so the copy
    // recovered to that point must match the sums exactly.
    let point = format!("dalp-verify-{}", Utc::now().format("%Y%m%dT%H%M%S%3f"));
    let source = {
        let tx = su
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await?;
        if !tables.is_empty() {
            tx.batch_execute(&format!("LOCK TABLE {} IN SHARE MODE", tables.join(", ")))
                .await?;
        }
        tx.query_one("SELECT pg_create_restore_point($1)::text", &[&point])
            .await?;
        let sums = table_sums(&tx, &tables).await?;
        tx.commit().await?;
        sums
    };
    drop(su);
    {
        let b = b.clone();
        blocking(move || b.check())
            .await
            .context("archive the restore point")?;
    }
    let drill = data_dir
        .join("backup")
        .join(format!("drill-{}", std::process::id()));
    let started = Instant::now();
    let restored = {
        let (b, drill, point) = (b.clone(), drill.clone(), point.clone());
        with_progress("restore drill", move |p| {
            b.restore(&Target::Name(point), &drill, repo, p)
        })
        .await
    };
    if let Err(e) = restored {
        let _ = std::fs::remove_dir_all(&drill);
        return Err(e.context("the restore drill failed"));
    }
    let server =
        match RestoredServer::start(&drill, &pg_bin(), false, Duration::from_secs(1800)).await {
            Ok(s) => s,
            Err(e) => {
                if !keep {
                    let _ = std::fs::remove_dir_all(&drill);
                }
                return Err(anyhow::Error::new(e).context("the restored copy did not recover"));
            }
        };
    let recovery_seconds = started.elapsed().as_secs_f64();

    let amcheck = std::process::Command::new(pg_bin().join("pg_amcheck"))
        .args(["-h", &server.socket_dir().display().to_string()])
        .args([
            "-p",
            &server.port.to_string(),
            "-U",
            "postgres",
            "--install-missing",
        ])
        .args(["-d", DATABASE])
        .output()
        .context("run pg_amcheck")?;
    let copy = server.superuser_options(DATABASE).connect().await?;
    let migrations_current = dalp_db::migrate::status(&copy, &MIGRATIONS)
        .await?
        .iter()
        .all(|s| s.applied_version == s.latest_version);
    // Verified from the trust anchor, so a chain whose key was rotated still verifies.
    let audit_chain_ok = match dalp_app::keys::trusted_audit_keys(&keys_dir) {
        Ok(keys) => Some(
            dalp_audit::verify_with(&copy, &dalp_audit::VerifyOptions::new(&keys))
                .await?
                .ok(),
        ),
        Err(_) => None,
    };
    let restored = table_sums(&copy, &tables).await?;
    drop(copy);
    server.stop();
    let table_checks: Vec<TableCheck> = tables
        .iter()
        .zip(source.iter().zip(restored.iter()))
        .map(|(t, (s, r))| TableCheck {
            table: t.clone(),
            source_rows: s.0,
            restored_rows: r.0,
            matches: s == r,
        })
        .collect();
    let report = DrillReport {
        restore_point: point,
        recovery_seconds,
        amcheck_ok: amcheck.status.success(),
        amcheck_output: format!(
            "{}{}",
            String::from_utf8_lossy(&amcheck.stdout),
            String::from_utf8_lossy(&amcheck.stderr)
        )
        .trim()
        .to_string(),
        migrations_current,
        audit_chain_ok,
        ok: amcheck.status.success()
            && migrations_current
            && audit_chain_ok != Some(false)
            && table_checks.iter().all(|t| t.matches),
        tables: table_checks,
    };
    if !keep {
        std::fs::remove_dir_all(&drill).ok();
    }
    evidence(
        data_dir,
        "backup.drill",
        serde_json::json!({
            "repo": repo,
            "ok": report.ok,
            "restore_point": report.restore_point,
            "recovery_seconds": report.recovery_seconds,
            "amcheck_ok": report.amcheck_ok,
            "migrations_current": report.migrations_current,
            "audit_chain_ok": report.audit_chain_ok,
            "tables": report.tables.len(),
            "tables_mismatched": report.tables.iter().filter(|t| !t.matches).count(),
        }),
    )
    .await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "restore drill to {} from repo{repo}: recovered in {:.1} s",
            report.restore_point, report.recovery_seconds
        );
        println!(
            "  pg_amcheck: {}",
            if report.amcheck_ok {
                "ok".to_string()
            } else {
                format!("FAILED\n{}", report.amcheck_output)
            }
        );
        println!(
            "  migrations current: {}",
            if report.migrations_current {
                "yes"
            } else {
                "NO"
            }
        );
        println!(
            "  audit chain: {}",
            match report.audit_chain_ok {
                Some(true) => "verifies",
                Some(false) => "FAILED",
                None => "not checked (no audit key in this data directory)",
            }
        );
        let bad: Vec<&TableCheck> = report.tables.iter().filter(|t| !t.matches).collect();
        println!(
            "  tables: {} of {} match the source (rows and checksums)",
            report.tables.len() - bad.len(),
            report.tables.len()
        );
        for t in bad {
            println!(
                "    MISMATCH {}: source {} rows, restored {} rows",
                t.table, t.source_rows, t.restored_rows
            );
        }
        if keep {
            println!("  copy kept in {}", drill.display());
        }
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("the restore drill found problems (see above)");
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_times_parse_in_the_usual_forms() {
        let want = "2026-11-24T10:15:00Z".parse::<DateTime<Utc>>().unwrap();
        for s in [
            "2026-11-24T10:15:00Z",
            "2026-11-24T11:15:00+01:00",
            "2026-11-24 10:15:00",
            "2026-11-24 10:15:00+00",
            "2026-11-24 10:15:00.000+00:00",
        ] {
            assert_eq!(parse_time(s).unwrap(), want, "{s}");
        }
        assert!(parse_time("yesterday").is_err());
    }
}
