//! `dalp workflows worker|selftest|status|runs|show|retry|cancel`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_workflows::worker::{selftest_handler, Worker, WorkerOptions};
use dalp_workflows::{NewRun, WorkflowStore};
use serde_json::json;
use uuid::Uuid;

use crate::cli::TargetArgs;
use crate::target::component_pool;

// ---- command line ------------------------------------------------------------------

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// Run a worker for the built-in kinds (the engine's self-test, `dalp.selftest`) until
    /// Ctrl-C: claims ready runs in batches, keeps leases alive, finishes in batches. A worker
    /// killed with -9 loses nothing: its leases expire and another worker resumes its runs
    /// from their step journals.
    Worker {
        #[command(flatten)]
        target: TargetArgs,
        /// Runs executed at once.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
        concurrency: u32,
        /// Lease length; a worker that stops heartbeating loses its runs after this.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        lease_seconds: u64,
        /// Milliseconds between polls when idle (NOTIFY wakes it earlier on a direct connection).
        #[arg(long, default_value_t = 500)]
        poll_ms: u64,
        /// Base of the exponential retry backoff, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        retry_base_ms: u64,
    },
    /// Enqueue self-test runs (`dalp.selftest`): each executes --steps journaled steps that
    /// record one row each, so `dalp workflows show` can prove every step ran exactly once.
    Selftest {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 10)]
        runs: u32,
        #[arg(long, default_value_t = 5)]
        steps: u32,
        /// Milliseconds between steps.
        #[arg(long, default_value_t = 100)]
        step_ms: u32,
    },
    /// Queue depth, running and stalled runs, dead letters, claim latency.
    Status {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        json: bool,
    },
    /// List runs, newest change first.
    Runs {
        #[command(flatten)]
        target: TargetArgs,
        /// pending, running, sleeping, waiting, completed, failed, cancelled, dead_letter, or
        /// stalled (running with an expired lease).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one run (or transaction request) with its journal.
    Show {
        #[command(flatten)]
        target: TargetArgs,
        id: String,
    },
    /// Make a dead-lettered or failed run ready again (attempts reset).
    Retry {
        #[command(flatten)]
        target: TargetArgs,
        id: String,
    },
    /// Cancel a run that has not ended.
    Cancel {
        #[command(flatten)]
        target: TargetArgs,
        id: String,
    },
    /// Delete completed and cancelled runs (with their step journals) that ended more than
    /// --older-than-days ago; failed and dead-lettered runs stay for operators.
    Purge {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3650))]
        older_than_days: u64,
    },
}

fn store(target: &TargetArgs) -> anyhow::Result<WorkflowStore> {
    Ok(WorkflowStore::new(component_pool(
        target,
        Component::Workflows,
    )?))
}

fn operator() -> RequestContext {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    RequestContext::service(&format!("cli:{user}"))
}

fn parse_id(s: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(s).with_context(|| format!("{s:?} is not a run id (a UUID)"))
}

pub async fn run(command: WorkflowsCommand) -> anyhow::Result<ExitCode> {
    match command {
        WorkflowsCommand::Worker {
            target,
            concurrency,
            lease_seconds,
            poll_ms,
            retry_base_ms,
        } => {
            let opts = WorkerOptions {
                concurrency: concurrency as usize,
                batch: i64::from(concurrency),
                lease: Duration::from_secs(lease_seconds),
                poll_interval: Duration::from_millis(poll_ms),
                retry_base: Duration::from_millis(retry_base_ms),
                ..WorkerOptions::default()
            };
            let worker =
                Worker::new(store(&target)?, opts).handle("dalp.selftest", selftest_handler());
            eprintln!(
                "worker {} running kinds: dalp.selftest (Ctrl-C stops after in-flight runs)",
                worker.id()
            );
            worker
                .run(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
            eprintln!("worker stopped");
        }
        WorkflowsCommand::Selftest {
            target,
            runs,
            steps,
            step_ms,
        } => {
            let store = store(&target)?;
            let batch = Uuid::new_v4();
            for i in 0..runs {
                let (run, _) = store
                    .start(
                        &operator(),
                        &NewRun::new(
                            Uuid::nil(),
                            "dalp.selftest",
                            &format!("{batch}-{i}"),
                            json!({ "steps": steps, "step_ms": step_ms }),
                        ),
                    )
                    .await?;
                println!("{}", run.id);
            }
        }
        WorkflowsCommand::Status { target, json } => {
            let store = store(&target)?;
            let stats = store.stats().await?;
            let stranded = dalp_workflows::stranded_per_signer(&store.stranded_nonces().await?);
            if json {
                let mut v = serde_json::to_value(&stats)?;
                v["stranded_nonces"] = serde_json::to_value(&stranded)?;
                println!("{v}");
            } else {
                println!("ready        {}", stats.ready);
                println!(
                    "running      {} ({} stalled: lease expired)",
                    stats.running, stats.stalled
                );
                println!("sleeping     {}", stats.sleeping);
                println!("waiting      {}", stats.waiting);
                println!("dead_letter  {}", stats.dead_letter);
                println!("failed       {}", stats.failed);
                println!("oldest ready {:.1} s", stats.oldest_ready_seconds);
                println!(
                    "claim latency p50 {:.3} s, p99 {:.3} s (last 5 minutes)",
                    stats.claim_latency_p50_seconds, stats.claim_latency_p99_seconds
                );
                if stranded.is_empty() {
                    println!("stranded nonces: none");
                }
                for s in &stranded {
                    println!(
                        "stranded nonces: chain {} signer {}: {} (oldest nonce {}, replacement queued {:.0} s ago)",
                        s.chain_id, s.signer, s.count, s.oldest_nonce, s.oldest_age_seconds
                    );
                }
            }
            if stats.stalled > 0 || stats.dead_letter > 0 {
                eprintln!("attention: stalled or dead-lettered runs; see `dalp workflows runs --status dead_letter|stalled`");
                return Ok(ExitCode::from(2));
            }
        }
        WorkflowsCommand::Runs {
            target,
            status,
            limit,
            json,
        } => {
            let runs = store(&target)?
                .list(status.as_deref(), limit.clamp(1, 1000))
                .await?;
            if json {
                println!("{}", serde_json::to_string(&runs)?);
            } else {
                for r in runs {
                    println!(
                        "{}  {:<11} {:<20} attempts {}/{}  {}",
                        r.id,
                        r.status,
                        r.kind,
                        r.attempts,
                        r.max_attempts,
                        r.error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        WorkflowsCommand::Show { target, id } => {
            let id = parse_id(&id)?;
            let store = store(&target)?;
            match store.get(id).await {
                Ok(run) => println!("{}", serde_json::to_string_pretty(&run)?),
                Err(dalp_workflows::WorkflowError::NotFound(_)) => {
                    let req = store.tx_request(id).await?;
                    let transitions = store.tx_transitions(id).await?;
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &json!({ "request": req, "transitions": transitions })
                        )?
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        WorkflowsCommand::Retry { target, id } => {
            let run = store(&target)?.retry(&operator(), parse_id(&id)?).await?;
            println!("{} is {} again", run.id, run.status);
        }
        WorkflowsCommand::Purge {
            target,
            older_than_days,
        } => {
            let store = store(&target)?;
            let mut total = 0;
            loop {
                let n = store
                    .purge_finished(Duration::from_secs(older_than_days * 86_400), 10_000)
                    .await?;
                total += n;
                if n < 10_000 {
                    break;
                }
            }
            println!("purged {total} finished runs older than {older_than_days} days");
        }
        WorkflowsCommand::Cancel { target, id } => {
            let run = store(&target)?.cancel(&operator(), parse_id(&id)?).await?;
            println!("{} is {}", run.id, run.status);
        }
    }
    Ok(ExitCode::SUCCESS)
}
