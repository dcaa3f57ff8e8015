//! `dalp index follow|status`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_indexed::follow::{FollowOptions, Follower};
use dalp_indexed::rpc::RpcClient;
use dalp_indexed::types::parse_address;
use dalp_indexed::{IndexError, IndexedStore};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::TargetArgs;
use crate::target::component_pool;

pub async fn follow(
    target: &TargetArgs,
    rpc_url: &str,
    mut opts: FollowOptions,
    contracts: &[String],
    name: Option<String>,
    finality_depth: i32,
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
    let follower = Follower::new(&store, rpc, opts);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} block {pos}/{len} ({per_sec}, eta {eta}) {msg}")
            .expect("template"),
    );
    let started = Instant::now();
    let mut first: Option<i64> = None;
    let result = follower
        .run(
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
        )
        .await;
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
    if json {
        let counts: serde_json::Map<String, serde_json::Value> =
            counts.into_iter().map(|(t, n)| (t, n.into())).collect();
        println!(
            "{}",
            serde_json::json!({ "status": status, "rows": counts })
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
        for (table, n) in counts {
            println!("rows        {table:<16} {n}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
