//! `dalp audit verify|checkpoint` and `dalp partitions`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use dalp_audit::{Checkpoint, Sealer, TrustedKeys};
use dalp_db::connect::ConnectOptions;
use dalp_db::partitions;
use dalp_ops::Layout;
use tokio_postgres::Client;

use crate::cli::TargetArgs;
use crate::target::connect_admin;
use dalp_audit::export::{self, Format, Framer, SiemTls, SyslogSink, SyslogTarget};

// ---- command line ------------------------------------------------------------------

use crate::cli::InstanceArgs;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// How messages reach a SIEM.
#[derive(Debug, Args, Clone)]
pub struct SiemArgs {
    /// CA bundle the receiver's certificate must chain to (required for a SIEM target).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The SD-ID of the structured data carrying each event's context, NAME@PEN. The
    /// default uses 32473, the documentation-only enterprise number (RFC 5612); set your
    /// organisation's Private Enterprise Number.
    #[arg(long, default_value = dalp_audit::export::DEFAULT_SD_ID)]
    pub sd_id: String,
    /// Largest message in octets (at least 480); larger events have their details replaced
    /// by a size marker. rsyslog's default maxMessageSize is 8192.
    #[arg(long, default_value_t = dalp_audit::export::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// HOSTNAME in each message [default: this machine's host name].
    #[arg(long)]
    pub hostname: Option<String>,
    /// Client certificate (PEM) for receivers that require mutual TLS, such as rsyslog's
    /// imrelp; with --client-key.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

/// Where the audit signing key is.
#[derive(Debug, Args, Clone)]
pub struct AuditKeyArgs {
    /// Trusted audit key files: public (audit-ed25519.pub.json) or signing keys; repeat for
    /// keys of earlier periods. A batch signed by any other key fails verification
    /// [default: DATA_DIR/keys/audit-ed25519.pub.json, else the signing key beside it].
    #[arg(long)]
    pub audit_key: Vec<PathBuf>,
    /// Directory of witnessed chain heads (heads.jsonl) to check the chain against
    /// [default: DATA_DIR/keys/audit-witness].
    #[arg(long)]
    pub witness: Option<PathBuf>,
    /// Check no witnessed heads (only the chain itself and any --checkpoint).
    #[arg(long, conflicts_with = "witness")]
    pub no_witness: bool,
    /// The retention policy in months: a retention drop of anything younger is forgery.
    #[arg(long, default_value_t = 84)]
    pub retention_months: u32,
    /// Start from the head the last successful verification reached (recorded in the
    /// witness directory): only what is new is recomputed. Run a full verification
    /// regularly as well; an incremental one does not re-read older history.
    #[arg(long, conflicts_with = "no_witness")]
    pub incremental: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the whole hash chain: links, hashes, signatures, every sealed event, no event
    /// inserted below the watermark, deletions only where retention recorded them. Exits 1
    /// and names the first broken batch and event on any tampering.
    Verify {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        key: AuditKeyArgs,
        /// A checkpoint exported earlier (`dalp audit checkpoint`): the chain must still reach it.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Only batches sealed at or after this time (RFC 3339), linked to the one before.
        #[arg(long)]
        from: Option<String>,
        /// Only batches sealed before this time (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Export sealed events in sequence order to a file (or standard output) or a SIEM,
    /// with progress. To a SIEM the connection ends with TLS close_notify and the export
    /// fails (exit 1) unless the receiver confirms it read everything.
    Export {
        #[command(flatten)]
        target: TargetArgs,
        /// jsonl, csv, cef or rfc5424 (to a SIEM: the body inside the RFC 5424 message;
        /// csv is for files only).
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Only events at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// A file, syslog+tls://HOST:PORT or relp+tls://HOST:PORT [default: standard output].
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        siem: SiemArgs,
    },
    /// Ship sealed events to a SIEM continuously, resuming from a durable cursor after any
    /// restart. At-least-once: the cursor moves only past what the receiver is known to hold
    /// (RELP: acknowledged by the receiver; syslog: acknowledged by its TCP stack with the
    /// connection still open --settle-ms later); after a reconnect what was in flight is sent
    /// again, each message carrying its sequence number (seq=) for the SIEM to drop
    /// duplicates. Runs until Ctrl-C, then closes with TLS close_notify.
    Forward {
        #[command(flatten)]
        target: TargetArgs,
        /// syslog+tls://HOST:PORT (RFC 5425) or relp+tls://HOST:PORT (acknowledged delivery).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        siem: SiemArgs,
        /// Cursor name; each destination keeps its own.
        #[arg(long, default_value = "default")]
        name: String,
        /// The message body inside the RFC 5424 header: rfc5424 (the event's details as
        /// JSON), cef or jsonl.
        #[arg(long, default_value = "rfc5424")]
        format: String,
        /// Events per batch.
        #[arg(long, default_value_t = 500)]
        batch: i64,
        /// Syslog only: milliseconds the connection must stay open after the receiver's TCP
        /// stack acknowledged a batch before the batch counts as delivered.
        #[arg(long, default_value_t = 2000)]
        settle_ms: u64,
        /// Also ship pgAudit's AUDIT entries from the JSON server logs in this directory
        /// (the embedded instance's is DATA_DIR/log).
        #[arg(long)]
        pgaudit_logs: Option<PathBuf>,
    },
    /// Rotate the audit signing key: seal what is pending, append a batch signed by the
    /// current key that names the new one (so verifiers trusting the first key follow it),
    /// install the new key and keep the old one as audit-ed25519.<id>.retired.json. A
    /// running dalp picks the new key up at its next seal. Safe to run again if interrupted.
    RotateKey {
        #[command(flatten)]
        instance: InstanceArgs,
    },
    /// Print (or write) the latest signed batch head, to anchor the chain outside the database.
    Checkpoint {
        #[command(flatten)]
        target: TargetArgs,
        /// Write it to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Options for `role` on an embedded instance, or the URL's user.
fn audit_options(target: &TargetArgs, role: &str) -> anyhow::Result<ConnectOptions> {
    Ok(match &target.database_url {
        Some(url) => ConnectOptions::from_url(url)?,
        None => Layout::new(&target.data_dir)
            .connect_options(role)
            .with_context(|| format!("instance in {}", target.data_dir.display()))?,
    })
}

/// Audit reads run as the auditor role on an embedded instance, or as the URL's user.
async fn connect_auditor(target: &TargetArgs) -> anyhow::Result<Client> {
    Ok(audit_options(target, "dalp_auditor")?.connect().await?)
}

/// The framing a SIEM target gets from `--format` and the SIEM flags.
fn framer(format: Format, siem: &SiemArgs) -> anyhow::Result<Framer> {
    let host = siem.hostname.clone().unwrap_or_else(hostname);
    Framer::new(format, &host, &siem.sd_id, siem.max_frame).map_err(anyhow::Error::msg)
}

fn siem_tls(siem: &SiemArgs) -> anyhow::Result<SiemTls> {
    let ca = siem
        .ca
        .clone()
        .context("--ca is required with a SIEM target: the CA bundle its certificate chains to")?;
    Ok(SiemTls {
        ca_file: ca,
        client: siem.client_cert.clone().zip(siem.client_key.clone()),
    })
}

pub async fn export(
    target: &TargetArgs,
    format: &str,
    since: Option<&str>,
    to: Option<&str>,
    siem: &SiemArgs,
) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let format = Format::parse(format).map_err(anyhow::Error::msg)?;
    let since = since
        .map(|s| chrono::DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&chrono::Utc)))
        .transpose()
        .context("--since must be an RFC 3339 time, e.g. 2026-11-01T00:00:00Z")?;
    enum Out {
        Writer(Box<dyn Write>),
        Siem(Box<SyslogSink>, Framer),
    }
    let mut out = match to {
        Some(t) if SyslogTarget::is_target(t) => {
            let framer = framer(format, siem)?;
            let target = SyslogTarget::parse(t).map_err(anyhow::Error::msg)?;
            let sink = SyslogSink::connect(&target, &siem_tls(siem)?)
                .await
                .with_context(|| format!("connect to {t}"))?;
            Out::Siem(Box::new(sink), framer)
        }
        Some(path) => Out::Writer(Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {path}"))?,
        ))),
        None => Out::Writer(Box::new(std::io::BufWriter::new(std::io::stdout()))),
    };
    let client = connect_auditor(target).await?;
    let total = Sealer::checkpoint(&client)
        .await?
        .map(|c| c.last_seq)
        .unwrap_or(0);
    if let (Out::Writer(w), Format::Csv) = (&mut out, format) {
        writeln!(w, "{}", export::CSV_HEADER)?;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("exporting {bar:30} {pos}/{len} events")
            .expect("template"),
    );
    if to.is_none() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let host = siem.hostname.clone().unwrap_or_else(hostname);
    let mut after = 0;
    let mut n = 0u64;
    loop {
        let events = export::read_sealed(&client, after, since, 1000).await?;
        let Some(last) = events.last() else { break };
        after = last.seq;
        match &mut out {
            Out::Writer(w) => {
                for e in &events {
                    writeln!(w, "{}", export::render(format, e, &host))?;
                }
            }
            Out::Siem(sink, framer) => {
                let messages: Vec<String> = events.iter().map(|e| framer.event(e)).collect();
                sink.send(&messages).await?;
            }
        }
        n += events.len() as u64;
        bar.set_position(after as u64);
    }
    bar.finish_and_clear();
    match out {
        Out::Writer(mut w) => w.flush()?,
        Out::Siem(sink, _) => {
            if !sink.close().await {
                anyhow::bail!(
                    "sent {n} events, but the SIEM did not confirm the end of the stream \
                     (no close after TLS close_notify): it may not have read them all; export again"
                );
            }
        }
    }
    eprintln!("exported {n} events");
    Ok(ExitCode::SUCCESS)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `dalp audit forward`'s own settings.
pub struct ForwardOptions {
    pub name: String,
    pub format: String,
    pub batch: i64,
    pub settle: std::time::Duration,
    pub pgaudit_logs: Option<std::path::PathBuf>,
}

pub async fn forward(
    target: &TargetArgs,
    to: &str,
    siem: &SiemArgs,
    o: ForwardOptions,
) -> anyhow::Result<ExitCode> {
    use dalp_audit::export::{Forwarder, Progress};
    let format = Format::parse(&o.format).map_err(anyhow::Error::msg)?;
    if !(1..=10_000).contains(&o.batch) {
        anyhow::bail!("--batch must be 1 to 10000");
    }
    let framer = framer(format, siem)?;
    let opts = audit_options(target, "dalp_audit_sealer")?;
    let pool =
        deadpool_postgres::Pool::builder(opts.manager(deadpool_postgres::RecyclingMethod::Fast)?)
            .max_size(2)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()?;
    let f = Forwarder {
        pool,
        name: o.name.clone(),
        framer,
        target: SyslogTarget::parse(to).map_err(anyhow::Error::msg)?,
        tls: siem_tls(siem)?,
        batch: o.batch,
        pace: std::time::Duration::ZERO,
        pgaudit_dir: o.pgaudit_logs,
        settle: o.settle,
    };
    let start = f.cursor().await.context("read the forwarding cursor")?;
    eprintln!(
        "forwarding to {to} from sequence {} (cursor `{}`); Ctrl-C stops",
        start + 1,
        o.name
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        super::lifecycle::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    f.run(stop, |p| match p {
        Progress::Sent { messages } => tracing::debug!(messages, "sent"),
        Progress::Delivered { through } => {
            eprintln!("delivered through sequence {through}")
        }
        Progress::Problem {
            message,
            certificate: true,
        } => tracing::error!(
            "{message}; retrying until the receiver presents a certificate the CA signed"
        ),
        Progress::Problem { message, .. } => tracing::warn!("{message}; retrying"),
        Progress::Recovered => tracing::info!("the SIEM is reachable again"),
    })
    .await?;
    eprintln!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn parse_time(
    flag: &str,
    v: Option<&str>,
) -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
    v.map(|s| {
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&chrono::Utc))
            .with_context(|| format!("{flag} must be an RFC 3339 time, e.g. 2026-11-01T00:00:00Z"))
    })
    .transpose()
}

pub async fn verify(
    target: &TargetArgs,
    key: &AuditKeyArgs,
    checkpoint: Option<&Path>,
    from: Option<&str>,
    to: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (from, to) = (parse_time("--from", from)?, parse_time("--to", to)?);
    let keys_dir = Layout::new(&target.data_dir).keys_dir();
    let mut keys = if key.audit_key.is_empty() {
        dalp_app::keys::trusted_audit_keys(&keys_dir)?
    } else {
        TrustedKeys::default()
    };
    for p in &key.audit_key {
        keys.load(p)?;
    }
    let mut heads: Vec<Checkpoint> = Vec::new();
    let mut witness = None;
    if !key.no_witness {
        let dir = key
            .witness
            .clone()
            .unwrap_or_else(|| keys_dir.join(dalp_app::keys::AUDIT_WITNESS_DIR));
        if key.witness.is_some() && !dir.exists() {
            anyhow::bail!("witness directory {} does not exist", dir.display());
        }
        let w = dalp_audit::Witness::new(dir);
        heads = w.heads()?;
        witness = Some(w);
    }
    let after = match (&witness, key.incremental) {
        (Some(w), true) => w.verified()?,
        _ => None,
    };
    if key.incremental && after.is_none() {
        eprintln!("no earlier verification recorded: verifying the whole chain");
    }
    let witnessed = heads.len();
    if let Some(p) = checkpoint {
        heads.push(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?,
            )
            .with_context(|| format!("{} is not a dalp checkpoint", p.display()))?,
        );
    }
    let client = connect_auditor(target).await?;
    let report = dalp_audit::verify_with(
        &client,
        &dalp_audit::VerifyOptions {
            heads: &heads,
            from,
            to,
            retention_months: key.retention_months,
            after: after.as_ref(),
            ..dalp_audit::VerifyOptions::new(&keys)
        },
    )
    .await?;
    // A whole or incremental run that found nothing wrong moves the incremental start.
    if let (Some(w), true, None, None) = (&witness, report.ok(), from, to) {
        if report.last_batch > 0 {
            if let Some(head) = Sealer::checkpoint_of(&client, report.last_batch).await? {
                if head.batch_hash == report.last_hash {
                    w.record_verified(&head)?;
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} batches, {} events checked, {} removed by retention, last sequence {}",
            report.batches, report.events_checked, report.events_retained, report.last_seq
        );
        println!(
            "keys trusted: {}; heads checked: {} of {} ({} witnessed{}){}",
            keys.ids().join(", "),
            report.heads_checked,
            heads.len(),
            witnessed,
            if checkpoint.is_some() {
                " + the checkpoint"
            } else {
                ""
            },
            if report.heads_skipped > 0 {
                format!(
                    "; {} outside the verified window not checked",
                    report.heads_skipped
                )
            } else {
                String::new()
            }
        );
        if let Some(a) = &after {
            println!(
                "incremental: from batch {} (verified before) to batch {}",
                a.batch_no, report.last_batch
            );
        }
        match &report.problem {
            None => println!("ok: the audit chain is intact"),
            Some(p) => println!("TAMPERED: {p}"),
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `dalp audit rotate-key`: a new signing key, handed over inside the chain.
pub async fn rotate_key(instance: &crate::cli::InstanceArgs) -> anyhow::Result<ExitCode> {
    use dalp_audit::AuditKey;
    let (pools, keys_dir) = super::identity::instance_pools(instance)?;
    let current_file = keys_dir.join(dalp_app::keys::AUDIT_KEY_FILE);
    let next_file = keys_dir.join("audit-ed25519.next.json");
    let current = std::sync::Arc::new(AuditKey::open(&current_file)?);
    // The trust anchor must exist before the first key is retired.
    let anchor = keys_dir.join(dalp_app::keys::AUDIT_PUBLIC_KEY_FILE);
    if !anchor.exists() {
        current.write_public(&anchor)?;
    }
    // Reused when an earlier run stopped between the rotation batch and the renames.
    let next = AuditKey::open_or_create(&next_file)?;
    let pool = pools.get(dalp_db::Component::AuditSealer).clone();
    let client = dalp_db::pool::checkout(&pool, "audit").await?;
    let signer = Sealer::next_signer(&client).await?;
    drop(client);
    if signer.as_deref() != Some(next.key_id.as_str()) {
        let batch = Sealer::new(pool, current.clone()).rotate(&next).await?;
        eprintln!(
            "batch {batch} hands the chain over from {} to {}",
            current.key_id, next.key_id
        );
    } else {
        eprintln!(
            "the chain was already handed over to {}: finishing",
            next.key_id
        );
    }
    let short = current.key_id.trim_start_matches("ed25519:");
    let retired = keys_dir.join(format!("audit-ed25519.{short}.retired.json"));
    std::fs::rename(&current_file, &retired)
        .with_context(|| format!("keep the old key as {}", retired.display()))?;
    std::fs::rename(&next_file, &current_file)
        .with_context(|| format!("install the new key as {}", current_file.display()))?;
    eprintln!(
        "new signing key {} in {}; the old one is kept as {} (signatures need only the trust \
         anchor {}); a running dalp signs with the new key from its next seal",
        next.key_id,
        current_file.display(),
        retired.display(),
        anchor.display()
    );
    Ok(ExitCode::SUCCESS)
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

pub async fn partitions(
    target: &TargetArgs,
    apply: bool,
    retention: dalp_app::catalog::Retention,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = connect_admin(target).await?;
    let mut out = Vec::new();
    for policy in &dalp_app::catalog::partition_policies(retention) {
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
