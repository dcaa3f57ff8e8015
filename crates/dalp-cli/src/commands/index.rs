//! `dalp index follow|status|rewind|reconcile`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_indexed::follow::{FollowOptions, Follower};
use dalp_indexed::reconcile::{reconcile, ReconcileOptions, TokenReconciliation};
use dalp_indexed::rpc::RpcClient;
use dalp_indexed::types::parse_address;
use dalp_indexed::{IndexError, IndexedStore};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::TargetArgs;
use crate::target::component_pool;

// ---- command line ------------------------------------------------------------------

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Follow an EVM JSON-RPC node: ingest blocks, transactions and token events batch by
    /// batch (each batch commits with its checkpoint, so a restart or kill resumes exactly),
    /// detect reorgs from parent hashes and roll back to the fork point. Runs until Ctrl-C,
    /// or with --once until it has caught up with the node's head. Connects as
    /// dalp_indexer_svc (or the --database-url user).
    Follow {
        #[command(flatten)]
        target: TargetArgs,
        /// JSON-RPC endpoint of the node, e.g. http://127.0.0.1:8545.
        #[arg(long)]
        rpc: String,
        /// Chain id; the node must report the same (eth_chainId).
        #[arg(long)]
        chain_id: i64,
        /// First block to index when the chain has no checkpoint yet (later runs resume
        /// from the checkpoint). Balances are exact when this is at or before the tokens'
        /// deployment.
        #[arg(long, default_value_t = 0)]
        from_block: u64,
        /// Only these contracts' logs and transactions (comma-separated addresses)
        /// [default: every log and transaction].
        #[arg(long, value_delimiter = ',')]
        contracts: Vec<String>,
        /// Blocks per batch (one transaction).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        batch: u64,
        /// Milliseconds between polls once caught up.
        #[arg(long, default_value_t = 2000)]
        poll_ms: u64,
        /// Exit once the checkpoint has reached the node's head.
        #[arg(long)]
        once: bool,
        /// Give up (exit 1 with the last error) after this many consecutive failed attempts
        /// to reach the node or the database [default: 8 with --once, else retry forever].
        #[arg(long)]
        give_up_after: Option<u32>,
        /// Name to register the chain under if it is not registered yet.
        #[arg(long)]
        name: Option<String>,
        /// Reorgs deeper than this many blocks are refused (set when registering the chain).
        #[arg(long, default_value_t = 64)]
        finality_depth: i32,
        /// Read blocks as full transaction objects plus `eth_getLogs` instead of headers
        /// plus `eth_getBlockReceipts` (used by default, and given up automatically on a
        /// node without it).
        #[arg(long)]
        no_block_receipts: bool,
        /// Seconds between reconciliation rounds while following (compare indexed supply
        /// and sampled balances with the contracts at the finalized block; see `dalp index
        /// reconcile`); 0 turns it off. Not run with --once.
        #[arg(long, default_value_t = 600)]
        reconcile_every_secs: u64,
        #[command(flatten)]
        reconcile: ReconcileArgs,
    },
    /// Show a chain's sync status: checkpoint, finalized block, head and lag, whether it
    /// diverged from its node, the last reconciliation per token, row counts. Exit 1 when
    /// the chain is diverged or a token disagrees with its contract.
    Status {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        chain_id: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Roll a chain's index back to a block (everything above it is removed and re-indexed
    /// by the next `dalp index follow`). Within the finality depth by default; with
    /// --beyond-finality any block, or -1 to empty the chain's index and re-index from
    /// scratch. This also ends a divergence (the operator decides where indexing resumes).
    Rewind {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        chain_id: i64,
        /// The last block to keep (-1: keep nothing).
        #[arg(long, allow_hyphen_values = true)]
        to: i64,
        /// Allow going below the finalized block (after a divergence, e.g. a node reset).
        #[arg(long)]
        beyond_finality: bool,
    },
    /// One reconciliation round: at the finalized block, compare each token's indexed supply
    /// with `totalSupply()` and a random sample of indexed balances with `balanceOf()` on the
    /// node; the result is kept per token (status, /metrics, doctor). Exit 1 when a token
    /// disagrees.
    Reconcile {
        #[command(flatten)]
        target: TargetArgs,
        /// JSON-RPC endpoint of the node.
        #[arg(long)]
        rpc: String,
        #[arg(long)]
        chain_id: i64,
        #[command(flatten)]
        reconcile: ReconcileArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// How much one reconciliation round compares.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    /// Balances compared per token (a random sample of its holders).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub reconcile_sample: u32,
    /// Tokens per round (the least recently checked first).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub reconcile_tokens: u32,
}

impl ReconcileArgs {
    pub fn options(&self) -> dalp_indexed::reconcile::ReconcileOptions {
        dalp_indexed::reconcile::ReconcileOptions {
            sample: self.reconcile_sample as usize,
            max_tokens: self.reconcile_tokens as usize,
        }
    }
}

pub async fn run(command: IndexCommand) -> anyhow::Result<ExitCode> {
    match command {
        IndexCommand::Status {
            target,
            chain_id,
            json,
        } => status(&target, chain_id, json).await,
        IndexCommand::Follow {
            target,
            rpc,
            chain_id,
            from_block,
            contracts,
            batch,
            poll_ms,
            once,
            give_up_after,
            name,
            finality_depth,
            no_block_receipts,
            reconcile_every_secs,
            reconcile,
        } => {
            let mut opts = FollowOptions::new(chain_id);
            opts.block_receipts = !no_block_receipts;
            opts.from_block = from_block;
            opts.batch_blocks = batch;
            opts.poll_interval = Duration::from_millis(poll_ms);
            opts.until_caught_up = once;
            opts.give_up_after = give_up_after.or(once.then_some(8));
            let every = (!once && reconcile_every_secs > 0).then(|| {
                (
                    Duration::from_secs(reconcile_every_secs),
                    reconcile.options(),
                )
            });
            follow(&target, &rpc, opts, &contracts, name, finality_depth, every).await
        }
        IndexCommand::Rewind {
            target,
            chain_id,
            to,
            beyond_finality,
        } => rewind(&target, chain_id, to, beyond_finality).await,
        IndexCommand::Reconcile {
            target,
            rpc,
            chain_id,
            reconcile,
            json,
        } => reconcile_once(&target, &rpc, chain_id, &reconcile.options(), json).await,
    }
}

/// Reconciliation rounds every `every` until dropped; failures are logged and retried at
/// the next round.
async fn reconcile_loop(
    store: &IndexedStore,
    rpc: &RpcClient,
    chain_id: i64,
    every: Duration,
    opts: &ReconcileOptions,
) {
    loop {
        tokio::time::sleep(every).await;
        match reconcile(store, rpc, chain_id, opts).await {
            Ok(list) => tracing::info!(
                chain_id,
                tokens = list.len(),
                drifting = dalp_indexed::reconcile::drifting(&list).count(),
                "reconciliation round"
            ),
            Err(e) => {
                tracing::warn!(chain_id, error = %e, "reconciliation round failed; next round retries")
            }
        }
    }
}

pub async fn follow(
    target: &TargetArgs,
    rpc_url: &str,
    mut opts: FollowOptions,
    contracts: &[String],
    name: Option<String>,
    finality_depth: i32,
    reconcile_every: Option<(Duration, ReconcileOptions)>,
) -> anyhow::Result<ExitCode> {
    for c in contracts {
        opts.contracts.push(
            parse_address("contracts", c, c).map_err(|e| anyhow::anyhow!("--contracts {e}"))?,
        );
    }
    let store = IndexedStore::new(component_pool(target, Component::Indexer)?);
    let chain_id = opts.chain_id;
    match store.status(chain_id).await {
        Ok(s) => {
            if s.finality_depth != finality_depth {
                eprintln!(
                    "note: chain {chain_id} is registered with finality depth {}; --finality-depth {finality_depth} is ignored",
                    s.finality_depth
                );
            }
        }
        Err(IndexError::UnknownChain(_)) => {
            let name = name.unwrap_or_else(|| format!("chain-{chain_id}"));
            store
                .register_chain(
                    &RequestContext::service("indexer"),
                    chain_id,
                    &name,
                    finality_depth,
                )
                .await
                .context("register the chain")?;
            eprintln!("registered chain {chain_id} ({name}, finality depth {finality_depth})");
        }
        Err(e) => return Err(e).context("read the chain's checkpoint"),
    }
    let rpc = RpcClient::new(rpc_url)?;
    let follower = Follower::new(&store, rpc.clone(), opts);
    let reconciling = async {
        match &reconcile_every {
            Some((every, ropts)) => reconcile_loop(&store, &rpc, chain_id, *every, ropts).await,
            None => std::future::pending().await,
        }
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} block {pos}/{len} ({per_sec}, eta {eta}) {msg}")
            .expect("template"),
    );
    let started = Instant::now();
    let mut first: Option<i64> = None;
    let following = follower.run(
        |p| {
            let start = *first.get_or_insert(p.checkpoint - p.applied as i64);
            bar.set_length(p.head.saturating_sub(start.max(0) as u64));
            bar.set_position((p.checkpoint - start).max(0) as u64);
            if let Some(r) = &p.reorg {
                bar.suspend(|| {
                    eprintln!(
                        "reorg: rolled back {} block(s) above block {}",
                        r.depth, r.fork
                    )
                });
            }
            bar.set_message(format!("checkpoint {} head {}", p.checkpoint, p.head));
        },
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    );
    let result = tokio::select! {
        r = following => r,
        () = reconciling => Ok(()),
    };
    bar.finish_and_clear();
    let status = store.status(chain_id).await?;
    eprintln!(
        "chain {chain_id}: checkpoint {}, head {}, lag {} ({:.1} s)",
        status.checkpoint.map_or("none".into(), |c| c.to_string()),
        status.head.map_or("unknown".into(), |c| c.to_string()),
        status.lag.map_or("unknown".into(), |c| c.to_string()),
        started.elapsed().as_secs_f64()
    );
    result?;
    Ok(ExitCode::SUCCESS)
}

pub async fn status(target: &TargetArgs, chain_id: i64, json: bool) -> anyhow::Result<ExitCode> {
    let store = IndexedStore::new(component_pool(target, Component::Indexer)?);
    let status = store.status(chain_id).await?;
    let counts = store.counts(chain_id).await?;
    let reconciled = store.reconciliations(chain_id).await?;
    let healthy = !status.is_diverged()
        && dalp_indexed::reconcile::drifting(&reconciled)
            .next()
            .is_none();
    if json {
        let counts: serde_json::Map<String, serde_json::Value> =
            counts.into_iter().map(|(t, n)| (t, n.into())).collect();
        println!(
            "{}",
            serde_json::json!({ "status": status, "reconciliations": reconciled, "rows": counts })
        );
    } else {
        println!("chain       {} ({})", status.chain_id, status.name);
        let show = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "checkpoint  {} {}",
            show(status.checkpoint),
            status.checkpoint_hash.as_deref().unwrap_or("")
        );
        println!(
            "finalized   {} (finality depth {})",
            show(status.finalized),
            status.finality_depth
        );
        println!("head        {}", show(status.head));
        println!("lag         {}", show(status.lag));
        match &status.diverged {
            None => println!("state       following"),
            Some(d) => {
                println!(
                    "state       DIVERGED since {} at block {}: {}",
                    d.since.format("%Y-%m-%d %H:%M:%S UTC"),
                    d.block,
                    d.reason
                );
                println!("            {}", d.next);
            }
        }
        for r in &reconciled {
            print_reconciliation(r);
        }
        for (table, n) in counts {
            println!("rows        {table:<16} {n}");
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_reconciliation(r: &TokenReconciliation) {
    let verdict = if r.in_agreement {
        "agrees"
    } else {
        "DISAGREES"
    };
    println!(
        "reconciled  {} at block {}: {verdict}; supply indexed {} node {}; {} balance(s) compared, {} differ{}",
        r.token,
        r.block,
        r.indexed_supply,
        r.node_supply.as_deref().unwrap_or("(no totalSupply)"),
        r.balances_checked,
        r.drifted_accounts.len(),
        if r.drifted_accounts.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.drifted_accounts.join(", "))
        }
    );
}

async fn rewind(
    target: &TargetArgs,
    chain_id: i64,
    to: i64,
    beyond_finality: bool,
) -> anyhow::Result<ExitCode> {
    let store = IndexedStore::new(component_pool(target, Component::Indexer)?);
    let reorg = store
        .rewind_with(
            &RequestContext::service("cli"),
            chain_id,
            to,
            beyond_finality,
        )
        .await
        .map_err(|e| match e {
            IndexError::DeepReorg { .. } => anyhow::anyhow!(
                "{e}\nadd --beyond-finality to roll back below the finalized block anyway"
            ),
            e => e.into(),
        })?;
    eprintln!(
        "chain {chain_id}: rolled back {} block(s); the index now ends at block {} (the next `dalp index follow` continues from there)",
        reorg.depth,
        if to < 0 { "none".to_string() } else { to.to_string() }
    );
    Ok(ExitCode::SUCCESS)
}

async fn reconcile_once(
    target: &TargetArgs,
    rpc_url: &str,
    chain_id: i64,
    opts: &ReconcileOptions,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let store = IndexedStore::new(component_pool(target, Component::Indexer)?);
    let rpc = RpcClient::new(rpc_url)?;
    let list = reconcile(&store, &rpc, chain_id, opts).await?;
    if json {
        println!("{}", serde_json::json!({ "reconciliations": list }));
    } else if list.is_empty() {
        println!("nothing to reconcile yet (no finalized block with token activity)");
    } else {
        for r in &list {
            print_reconciliation(r);
        }
    }
    Ok(
        if dalp_indexed::reconcile::drifting(&list).next().is_none() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}
