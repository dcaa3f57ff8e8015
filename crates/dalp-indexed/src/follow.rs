//! The EVM follower: polls a JSON-RPC node and feeds [`IndexedStore::ingest`] batch by batch.
//! Each batch commits with its checkpoint, so a follower killed at any point resumes from the
//! checkpoint with nothing missing or duplicated. A batch whose parent does not match the
//! stored chain makes it walk back block by block to the fork point and re-ingest from there
//! (the store rolls the old branch back); node and database errors are retried with
//! exponential backoff and jitter (honouring `Retry-After`).
//!
//! While behind, it fetches the next range from the node while the previous one is written
//! (one batch ahead; a prefetched batch whose parent no longer matches is re-fetched through
//! the fork logic, so the guarantees are those of one batch at a time).
//!
//! When the node no longer has dalp's chain within the finality depth (a node reset with its
//! state lost, another chain behind the same URL, a reorg deeper than finality), the chain is
//! marked diverged in the database and the follower stops: status, reads, metrics and
//! `dalp doctor` say so until an operator re-points or rewinds.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dalp_audit::RequestContext;
use rand::Rng;

use crate::rpc::{RpcClient, RpcError};
use crate::store::{IndexError, IndexedStore, Reorg};
use crate::types::{hex0x, parse_batch, Address, Block, BlockInput};

#[derive(Debug, Clone)]
pub struct FollowOptions {
    pub chain_id: i64,
    /// First block to index when the chain has no checkpoint yet.
    pub from_block: u64,
    /// Only logs (and transactions) of these contracts; all when empty.
    pub contracts: Vec<Address>,
    /// Blocks per batch (one ingest transaction).
    pub batch_blocks: u64,
    /// Wait between polls once caught up.
    pub poll_interval: Duration,
    /// Return once the checkpoint reaches the node's head instead of following forever.
    pub until_caught_up: bool,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// Give up after this many consecutive failed attempts (node or database down);
    /// `None` retries forever.
    pub give_up_after: Option<u32>,
    /// Fetch the next range while the previous one is written (off only to measure).
    pub pipeline: bool,
    /// Read transactions and logs from `eth_getBlockReceipts` (falls back by itself when
    /// the node lacks it); off: full blocks and `eth_getLogs`.
    pub block_receipts: bool,
}

impl FollowOptions {
    pub fn new(chain_id: i64) -> FollowOptions {
        FollowOptions {
            chain_id,
            from_block: 0,
            contracts: Vec::new(),
            batch_blocks: 100,
            poll_interval: Duration::from_secs(2),
            until_caught_up: false,
            max_backoff: Duration::from_secs(30),
            give_up_after: None,
            pipeline: true,
            block_receipts: true,
        }
    }
}

/// Reported after every batch.
#[derive(Debug, Clone)]
pub struct Progress {
    pub checkpoint: i64,
    pub head: u64,
    pub applied: usize,
    pub logs: usize,
    pub reorg: Option<Reorg>,
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("the node is on chain {node}, not chain {expected}; check --rpc and --chain-id")]
    WrongChain { node: u64, expected: i64 },
    #[error("the node switched branches while blocks {from}..{to} were fetched; fetching again")]
    BranchChanged { from: u64, to: u64 },
    #[error("no common ancestor with the node within the finality depth {depth} below block {checkpoint}: the reorg is deeper than the chain allows; nothing was changed")]
    NoCommonAncestor { checkpoint: i64, depth: i64 },
}

impl FollowError {
    /// Worth retrying: the node or the database may recover.
    pub fn is_transient(&self) -> bool {
        match self {
            FollowError::Rpc(RpcError::Malformed(_)) => false,
            FollowError::Rpc(_) | FollowError::BranchChanged { .. } => true,
            FollowError::Index(IndexError::Pool(_) | IndexError::Db(_)) => true,
            _ => false,
        }
    }
}

enum Step {
    Batch(Progress),
    CaughtUp,
}

/// A range fetched ahead while the previous one was written.
struct Fetched {
    from: u64,
    to: u64,
    blocks: Vec<Block>,
}

pub struct Follower<'a> {
    store: &'a IndexedStore,
    rpc: RpcClient,
    ctx: RequestContext,
    opts: FollowOptions,
    /// Set once the node said it has no `eth_getBlockReceipts`.
    no_block_receipts: AtomicBool,
}

impl<'a> Follower<'a> {
    pub fn new(store: &'a IndexedStore, rpc: RpcClient, opts: FollowOptions) -> Follower<'a> {
        let no_block_receipts = AtomicBool::new(!opts.block_receipts);
        Follower {
            store,
            rpc,
            ctx: RequestContext::service("indexer"),
            opts,
            no_block_receipts,
        }
    }

    /// Follows until `shutdown` completes (or, with `until_caught_up`, the head is reached).
    pub async fn run<F: FnMut(&Progress)>(
        &self,
        mut on_progress: F,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), FollowError> {
        tokio::pin!(shutdown);
        let mut failures = 0u32;
        let node_chain = loop {
            match self.rpc.chain_id().await {
                Ok(id) => break id,
                Err(e) => {
                    let e = FollowError::from(e);
                    failures += 1;
                    if !e.is_transient() || self.gave_up(failures) {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "node not answering eth_chainId; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = &mut shutdown => return Ok(()),
                    }
                }
            }
        };
        if node_chain as i64 != self.opts.chain_id {
            return Err(FollowError::WrongChain {
                node: node_chain,
                expected: self.opts.chain_id,
            });
        }
        let mut backoff = Duration::from_millis(250);
        let mut ahead: Option<Fetched> = None;
        loop {
            let wait = match self.step(&mut ahead).await {
                Ok(Step::Batch(p)) => {
                    backoff = Duration::from_millis(250);
                    failures = 0;
                    on_progress(&p);
                    Duration::ZERO
                }
                Ok(Step::CaughtUp) if self.opts.until_caught_up => return Ok(()),
                Ok(Step::CaughtUp) => {
                    // A poll that worked: failures are counted consecutively, and the
                    // backoff starts over.
                    backoff = Duration::from_millis(250);
                    failures = 0;
                    self.opts.poll_interval
                }
                Err(e) if e.is_transient() && !self.gave_up(failures + 1) => {
                    failures += 1;
                    let asked = match &e {
                        FollowError::Rpc(r) => r.retry_after(),
                        _ => None,
                    };
                    let jitter = rand::rng().random_range(0.5..1.0);
                    let wait = asked.unwrap_or(backoff.mul_f64(jitter));
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "retrying");
                    backoff = (backoff * 2).min(self.opts.max_backoff);
                    wait
                }
                Err(e) => return Err(e),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }
    }

    fn gave_up(&self, failures: u32) -> bool {
        self.opts.give_up_after.is_some_and(|n| failures >= n)
    }

    /// One poll. `ahead` holds the batch prefetched by the previous step; it is used only
    /// when it starts right after the checkpoint, and replaced only by a new prefetch.
    async fn step(&self, ahead: &mut Option<Fetched>) -> Result<Step, FollowError> {
        let prefetched = ahead.take();
        let chain_id = self.opts.chain_id;
        let status = self.store.status(chain_id).await?;
        if let Some(d) = status.diverged {
            return Err(IndexError::Diverged {
                chain: chain_id,
                block: d.block,
                reason: d.reason,
            }
            .into());
        }
        let depth = i64::from(status.finality_depth);
        // One round trip: chain id, head and the node's hash at our checkpoint.
        let (node_chain, head, node_hash) =
            self.rpc.poll(status.checkpoint.map(|c| c as u64)).await?;
        if node_chain as i64 != chain_id {
            let at = status.checkpoint.unwrap_or(-1);
            return Err(self
                .diverge(
                    at,
                    format!("the node at the RPC URL is now on chain {node_chain}, not {chain_id}"),
                )
                .await);
        }
        // Every poll: does the node still have our checkpoint? A reorg onto a shorter or
        // equal-length branch adds no block above it, so only this notices it.
        if let Some(cp) = status.checkpoint {
            let stored = status.checkpoint_hash.as_deref();
            if node_hash.as_deref().map(str::to_ascii_lowercase).as_deref() != stored {
                let reorg = match self.rewind_replaced(cp, head, depth).await {
                    Ok(r) => r,
                    Err(e) => return Err(self.diverge_on(e, cp).await),
                };
                return Ok(Step::Batch(Progress {
                    checkpoint: reorg.fork,
                    head,
                    applied: 0,
                    logs: 0,
                    reorg: Some(reorg),
                }));
            }
        }
        let next = status
            .checkpoint
            .map(|c| c as u64 + 1)
            .unwrap_or(self.opts.from_block);
        if next > head {
            return Ok(Step::CaughtUp);
        }
        let (to, blocks) = match prefetched {
            Some(f) if f.from == next => (f.to, f.blocks),
            _ => {
                let to = head.min(next + self.opts.batch_blocks - 1);
                (to, self.fetch(next, to).await?)
            }
        };
        let ingest = self
            .store
            .ingest(&self.ctx, chain_id, &blocks, Some(head as i64));
        let after = to + 1;
        let outcome = if self.opts.pipeline && after <= head {
            let until = head.min(after + self.opts.batch_blocks - 1);
            let (outcome, fetched) = tokio::join!(ingest, self.fetch(after, until));
            match fetched {
                Ok(blocks) if outcome.is_ok() => {
                    *ahead = Some(Fetched {
                        from: after,
                        to: until,
                        blocks,
                    })
                }
                Ok(_) => {}
                // Fetched again next step, where a lasting failure is retried and reported.
                Err(e) => tracing::debug!(error = %e, "prefetch failed"),
            }
            outcome
        } else {
            ingest.await
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(IndexError::ParentMismatch { number }) => {
                let cp = status.checkpoint.unwrap_or(number - 1);
                let fork = match self.find_fork(number - 1, cp, depth).await {
                    Ok(f) => f,
                    Err(e) => return Err(self.diverge_on(e, cp).await),
                };
                tracing::warn!(
                    chain_id,
                    fork,
                    "parent hash mismatch; re-ingesting from the fork point"
                );
                let from = fork as u64 + 1;
                let blocks = self
                    .fetch(from, head.min(from + self.opts.batch_blocks - 1))
                    .await?;
                match self
                    .store
                    .ingest(&self.ctx, chain_id, &blocks, Some(head as i64))
                    .await
                {
                    Ok(o) => o,
                    Err(e) => return Err(self.diverge_on(e.into(), cp).await),
                }
            }
            Err(e) => {
                let cp = status.checkpoint.unwrap_or(-1);
                return Err(self.diverge_on(e.into(), cp).await);
            }
        };
        Ok(Step::Batch(Progress {
            checkpoint: outcome.checkpoint,
            head,
            applied: outcome.applied,
            logs: outcome.logs,
            reorg: outcome.reorg,
        }))
    }

    /// Errors that mean the node no longer has our chain become a recorded divergence;
    /// others pass through.
    async fn diverge_on(&self, e: FollowError, checkpoint: i64) -> FollowError {
        match e {
            FollowError::NoCommonAncestor { .. }
            | FollowError::Index(IndexError::DeepReorg { .. }) => {
                self.diverge(checkpoint, e.to_string()).await
            }
            other => other,
        }
    }

    /// Records the divergence; the follower then stops (the error is not transient).
    async fn diverge(&self, block: i64, reason: String) -> FollowError {
        let chain = self.opts.chain_id;
        match self
            .store
            .mark_diverged(&self.ctx, chain, block, &reason)
            .await
        {
            Ok(()) => {
                tracing::error!(
                    chain_id = chain,
                    block,
                    %reason,
                    "the node no longer has the indexed chain: marked diverged, ingest stopped"
                );
                FollowError::Index(IndexError::Diverged {
                    chain,
                    block,
                    reason,
                })
            }
            // Not recorded (database trouble): retried, and the next poll finds it again.
            Err(e) => e.into(),
        }
    }

    /// The node replaced our checkpoint's block (or no longer has it): roll back to the
    /// fork point, which must lie within the finality depth below the checkpoint.
    async fn rewind_replaced(
        &self,
        checkpoint: i64,
        head: u64,
        depth: i64,
    ) -> Result<Reorg, FollowError> {
        let below = checkpoint.min(head as i64);
        let fork = self.find_fork(below, checkpoint, depth).await?;
        let reorg = self
            .store
            .rewind(&self.ctx, self.opts.chain_id, fork)
            .await?;
        tracing::warn!(
            chain_id = self.opts.chain_id,
            fork,
            checkpoint,
            head,
            "the node replaced our checkpoint's block (a reorg onto a shorter or equal branch); rolled back to the fork point"
        );
        Ok(reorg)
    }

    /// The newest stored block at or below `below` whose hash the node agrees with, no
    /// deeper than the finality depth under `checkpoint`.
    async fn find_fork(&self, below: i64, checkpoint: i64, depth: i64) -> Result<i64, FollowError> {
        let lowest = (checkpoint - depth).max(0);
        let mut k = below;
        while k >= lowest {
            let Some(stored) = self.store.block_hash(self.opts.chain_id, k).await? else {
                // Below the first indexed block: everything indexed is on the new branch's side.
                return Ok(k);
            };
            if self.rpc.block_hash(k as u64).await?.as_deref() == Some(hex0x(&stored).as_str()) {
                return Ok(k);
            }
            k -= 1;
        }
        Err(FollowError::NoCommonAncestor { checkpoint, depth })
    }

    /// Blocks `from..=to` with their (filtered) transactions and logs, parsed (public for
    /// the benchmark's fetch-only ceiling). Headers with block receipts when the node has
    /// `eth_getBlockReceipts`; otherwise full blocks and `eth_getLogs`.
    pub async fn fetch(&self, from: u64, to: u64) -> Result<Vec<Block>, FollowError> {
        let started = Instant::now();
        let mut inputs = None;
        if !self.no_block_receipts.load(Ordering::Relaxed) {
            match self.rpc.blocks_with_receipts(from, to).await {
                Ok(blocks) => inputs = Some(self.keep_ours(blocks)),
                Err(e) if e.is_unsupported_method() => {
                    tracing::info!(error = %e, "the node has no eth_getBlockReceipts; fetching full blocks and logs instead");
                    self.no_block_receipts.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let inputs = match inputs {
            Some(i) => i,
            None => self.fetch_blocks_and_logs(from, to).await?,
        };
        // Parsed on the blocking pool: in a pipelined step this runs on another core while
        // this task encodes the previous batch's rows for the database.
        let blocks = tokio::task::spawn_blocking(move || parse_batch(&inputs))
            .await
            .expect("parse_batch does not panic")
            .map_err(IndexError::from)?;
        tracing::debug!(
            from,
            to,
            ms = started.elapsed().as_millis() as u64,
            "fetched"
        );
        Ok(blocks)
    }

    /// Logs in log-index order and, with `--contracts`, only their logs and only the
    /// transactions that left one of those logs or called one of them. (Both fetch paths.)
    fn keep_ours(&self, mut blocks: Vec<BlockInput>) -> Vec<BlockInput> {
        for b in &mut blocks {
            b.logs.sort_by_key(|l| l.log_index);
        }
        if self.opts.contracts.is_empty() {
            return blocks;
        }
        let contracts: HashSet<String> = self.opts.contracts.iter().map(|a| hex0x(a)).collect();
        for b in &mut blocks {
            b.logs
                .retain(|l| contracts.contains(&l.address.to_ascii_lowercase()));
            let with_logs: HashSet<String> = b
                .logs
                .iter()
                .map(|l| l.tx_hash.to_ascii_lowercase())
                .collect();
            b.transactions.retain(|t| {
                with_logs.contains(&t.hash.to_ascii_lowercase())
                    || t.to
                        .as_ref()
                        .is_some_and(|to| contracts.contains(&to.to_ascii_lowercase()))
            });
        }
        blocks
    }

    /// Full blocks and (filtered) `eth_getLogs`, asked for at once, kept as [`keep_ours`]
    /// says, then receipts for kept transactions that left no log.
    async fn fetch_blocks_and_logs(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<BlockInput>, FollowError> {
        let (inputs, logs) = tokio::join!(self.rpc.blocks(from, to), self.logs_chunked(from, to));
        let mut inputs: Vec<BlockInput> = inputs?;
        let logs = logs?;
        let mut with_logs: HashSet<String> = HashSet::new();
        for (block_hash, number, log) in logs {
            if number < from || number > to {
                return Err(RpcError::Malformed(format!(
                    "eth_getLogs for blocks {from}..{to} returned a log of block {number}"
                ))
                .into());
            }
            let block = &mut inputs[(number - from) as usize];
            if !block.hash.eq_ignore_ascii_case(&block_hash) {
                return Err(FollowError::BranchChanged { from, to });
            }
            with_logs.insert(log.tx_hash.to_ascii_lowercase());
            block.logs.push(log);
        }
        let mut inputs = self.keep_ours(inputs);
        let mut unknown = Vec::new();
        for b in &mut inputs {
            for t in &mut b.transactions {
                if with_logs.contains(&t.hash.to_ascii_lowercase()) {
                    t.status = Some(1); // only successful transactions leave logs
                } else {
                    unknown.push(t.hash.clone());
                }
            }
        }
        if !unknown.is_empty() {
            let statuses = self.rpc.statuses(&unknown).await?;
            let by_hash: std::collections::HashMap<&String, Option<u8>> =
                unknown.iter().zip(statuses).collect();
            for t in inputs.iter_mut().flat_map(|b| b.transactions.iter_mut()) {
                if t.status.is_none() {
                    t.status = by_hash.get(&t.hash).copied().flatten();
                }
            }
        }
        Ok(inputs)
    }

    /// `eth_getLogs` over `from..=to`, halving the range while the node says it is too large.
    async fn logs_chunked(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<(String, u64, crate::types::LogInput)>, FollowError> {
        let mut out = Vec::new();
        let mut ranges = vec![(from, to)];
        while let Some((a, b)) = ranges.pop() {
            match self.rpc.logs(a, b, &self.opts.contracts).await {
                Ok(mut logs) => out.append(&mut logs),
                Err(e) if e.is_range_too_large() && b > a => {
                    let mid = a + (b - a) / 2;
                    ranges.push((mid + 1, b));
                    ranges.push((a, mid));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }
}
